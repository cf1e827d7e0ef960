"""Two-phase commit of one multi-rank save over a ``torch.distributed`` Store.

No collective, no thread of the training loop: each rank's commit thread talks to the
Store through its own client (``Store.clone()``) with a deadline on every wait.

Keys, all under ``zckpt/<run nonce>/<save sequence>/``, never reused (the nonce is fresh
per checkpointer, the sequence grows with every save)::

    p/<rank>   a rank's report: {"ok": bool, "reason": str, "digest": str}  (phase 1)
    claim      set once, by compare-and-set: "committing" by the coordinator, or an abort
               verdict by a rank that gave up waiting; whoever sets it first decides
    verdict    the outcome every rank reads: {"committed": bool, "path": str,
               "reasons": {rank: str}}                                      (phase 2)
    seen       how many ranks have read the verdict; the last one deletes the keys

Why the claim: a rank that stops waiting for a verdict (the coordinator died) must not
report "aborted" while a slow but live coordinator renames the checkpoint into place.
Both race for the claim with ``compare_set``; the loser follows the winner.

``zckpt/<nonce>/structure/<digest>`` holds the key list behind a structure digest,
written by a rank when its digest changes, read only to name differences.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

__all__ = ["Report", "Verdict", "SaveKeys", "client_of", "report", "collect", "claim", "publish", "await_verdict",
           "acknowledge", "publish_structure", "read_structure", "CLAIM_COMMITTING"]

logger = logging.getLogger(__name__)

CLAIM_COMMITTING = "committing"
#: How long a rank waits for the verdict once the coordinator has claimed the commit:
#: writing the index and renaming take well under a second; fsync on a busy disk more.
CLAIMED_GRACE_S = 60.0
#: Values we read back are small JSON documents written by zckpt; anything larger is not.
_MAX_VALUE = 1 << 20


@dataclass(frozen=True)
class Report:
    ok: bool
    reason: str = ""
    digest: str = ""


@dataclass(frozen=True)
class Verdict:
    committed: bool
    path: str
    reasons: dict[int, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"committed": self.committed, "path": self.path,
                           "reasons": {str(r): m for r, m in self.reasons.items()}})

    @classmethod
    def parse(cls, raw: bytes) -> Verdict:
        doc = _json(raw, "verdict")
        reasons = doc.get("reasons", {})
        if not isinstance(doc.get("committed"), bool) or not isinstance(doc.get("path"), str) \
                or not isinstance(reasons, dict):
            raise ValueError(f"malformed verdict {raw[:200]!r}")
        return cls(doc["committed"], doc["path"], {int(r): str(m) for r, m in reasons.items()})


class SaveKeys:
    """The Store keys of save ``seq`` of run ``nonce``."""

    def __init__(self, nonce: str, seq: int) -> None:
        self.prefix = f"zckpt/{nonce}/{seq}/"

    def report(self, rank: int) -> str:
        return f"{self.prefix}p/{rank}"

    @property
    def claim(self) -> str:
        return self.prefix + "claim"

    @property
    def verdict(self) -> str:
        return self.prefix + "verdict"

    @property
    def seen(self) -> str:
        return self.prefix + "seen"


_clone_lock = threading.Lock()


def client_of(store: Any) -> Any:
    """A Store client of its own for a commit thread (``clone()``, torch >= 2.5), else the
    store itself (its calls are then serialised by the store's own client lock)."""
    clone = getattr(store, "clone", None)
    if clone is None:
        return store
    with _clone_lock:
        try:
            return clone()
        except (RuntimeError, NotImplementedError):   # a Store type without clone support
            return store


def _json(raw: bytes, what: str) -> dict[str, Any]:
    if len(raw) > _MAX_VALUE:
        raise ValueError(f"{what}: {len(raw)} bytes, more than zckpt ever writes")
    doc = json.loads(raw.decode())
    if not isinstance(doc, dict):
        raise ValueError(f"{what}: not a JSON object")
    return doc


def _wait(store: Any, key: str, timeout_s: float) -> bool:
    """Whether ``key`` exists by ``timeout_s`` seconds from now (a bounded Store wait)."""
    if timeout_s <= 0:
        return bool(store.check([key]))
    try:
        store.wait([key], timedelta(seconds=timeout_s))
        return True
    except Exception:   # noqa: BLE001 - torch raises DistStoreError/RuntimeError on timeout
        return bool(store.check([key]))


def report(store: Any, keys: SaveKeys, rank: int, rep: Report) -> None:
    """Phase 1: this rank's files are durable (``ok``), or why not."""
    store.set(keys.report(rank), json.dumps({"ok": rep.ok, "reason": rep.reason, "digest": rep.digest}))


def collect(store: Any, keys: SaveKeys, ranks: list[int], deadline: float) -> dict[int, Report | None]:
    """The coordinator: every rank's report, waiting until ``deadline`` (monotonic) for
    each; None for a rank that did not report in time."""
    out: dict[int, Report | None] = {}
    for r in ranks:
        if not _wait(store, keys.report(r), deadline - time.monotonic()):
            out[r] = None
            continue
        try:
            doc = _json(store.get(keys.report(r)), f"the report of rank {r}")
            out[r] = Report(bool(doc.get("ok")), str(doc.get("reason", "")), str(doc.get("digest", "")))
        except (ValueError, UnicodeDecodeError) as exc:
            out[r] = Report(False, f"sent an unreadable report ({exc})")
    return out


def claim(store: Any, keys: SaveKeys, value: str) -> str:
    """Set the claim to ``value`` unless it is set already; return what it holds now."""
    got = store.compare_set(keys.claim, "", value)
    return got.decode(errors="replace") if isinstance(got, bytes) else str(got)


def publish(store: Any, keys: SaveKeys, verdict: Verdict) -> None:
    store.set(keys.verdict, verdict.to_json())


def await_verdict(store: Any, keys: SaveKeys, rank: int, coordinator: int, path: str, timeout_s: float) -> Verdict:
    """A rank: the verdict, waiting ``timeout_s``; past it, claim an abort (unless the
    coordinator claimed the commit first: then wait a grace period for its verdict)."""
    if _wait(store, keys.verdict, timeout_s):
        return Verdict.parse(store.get(keys.verdict))
    mine = Verdict(False, path, {coordinator: f"no verdict from the coordinator (rank {coordinator}) within "
                                              f"{timeout_s:.0f}s: it died, hung, or its own save is that slow"})
    held = claim(store, keys, mine.to_json())
    if held == mine.to_json():
        publish(store, keys, mine)       # wake the other waiters with the same outcome
        return mine
    if held != CLAIM_COMMITTING:         # another rank claimed an abort first
        try:
            return Verdict.parse(held.encode())
        except (ValueError, UnicodeDecodeError):
            return mine
    if _wait(store, keys.verdict, CLAIMED_GRACE_S):
        return Verdict.parse(store.get(keys.verdict))
    return Verdict(False, path, {coordinator: f"the coordinator (rank {coordinator}) claimed the commit but "
                                              f"published no verdict within {CLAIMED_GRACE_S:.0f}s more: the "
                                              f"checkpoint may or may not exist at {path}; check it with "
                                              "zckpt.verify"})


def acknowledge(store: Any, keys: SaveKeys, ranks: list[int]) -> None:
    """This rank has read the verdict; the last of ``ranks`` to do so deletes the keys."""
    try:
        if store.add(keys.seen, 1) < len(ranks):
            return
        for key in [keys.report(r) for r in ranks] + [keys.claim, keys.verdict, keys.seen]:
            store.delete_key(key)
    except Exception as exc:  # noqa: BLE001 - key cleanup is best effort; the keys are unique anyway
        logger.debug("could not delete the keys of %s: %s", keys.prefix, exc)


def publish_structure(store: Any, nonce: str, digest: str, describe: list[str]) -> None:
    store.set(f"zckpt/{nonce}/structure/{digest}", json.dumps(describe))


def read_structure(store: Any, nonce: str, digest: str, timeout_s: float = 5.0) -> list[str] | None:
    key = f"zckpt/{nonce}/structure/{digest}"
    if not _wait(store, key, timeout_s):
        return None
    try:
        raw = store.get(key)
        if len(raw) > 64 * _MAX_VALUE:
            return None
        doc = json.loads(raw.decode())
    except (ValueError, UnicodeDecodeError):
        return None
    return [str(x) for x in doc] if isinstance(doc, list) else None
