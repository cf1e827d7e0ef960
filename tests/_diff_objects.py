"""Module-level types for tests/test_differential.py.

They live in a module of their own (not in the test file) so that a spawned zckpt worker,
which unpickles by module name with the trainer's ``sys.path``, can import them, and so
that ``torch.load(weights_only=False)`` finds them again.
"""

from __future__ import annotations

import collections
from typing import Any, NamedTuple


class UserDict(dict):
    """A user's dict subclass, possibly with instance attributes."""


class UserList(list):
    """A user's list subclass."""


Pair = collections.namedtuple("Pair", ["first", "second"])


class Triple(NamedTuple):
    x: Any
    y: Any
    z: Any


class Holder:
    """An object holding tensors (and anything else) in its attributes."""

    def __init__(self, **attrs: Any) -> None:
        self.__dict__.update(attrs)

    def __repr__(self) -> str:
        return f"Holder({', '.join(f'{k}={v!r}' for k, v in self.__dict__.items())})"


def noop_init(*args: Any) -> None:
    """A subprocess_init_fn that does nothing (importable in the worker by module name)."""
