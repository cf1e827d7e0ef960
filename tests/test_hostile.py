"""Hostile peers on the trainer's socket: none runs code, none costs a worker or a save.

A process of the trainer's own user can reach the pool's ipc endpoint. It does not hold
the pool's secret (it reaches workers only through inherited pipes) nor the random
token in the workers' routing ids. Each test sends what such a process could send,
waits until the supervisor has counted the frames as dropped (``dropped_frames``: the
predicate decides, no sleeps), then checks: no marker file (nothing was unpickled), the
same worker pids (no worker was lost), and the next save commits.
"""

from __future__ import annotations

import builtins
import os
import pickle
import random
import signal
from collections.abc import Iterator

import msgpack
import pytest
import torch
import zmq

import zckpt
from zckpt import PoolConfig
from zckpt import protocol as P
from zckpt.errors import RemoteError, unpack_exception
from zckpt.supervisor import SlotState

from conftest import wait_until

pytestmark = pytest.mark.timeout(120)

FAST = dict(fsync=False, heartbeat_interval_s=0.2, heartbeat_liveness=3, init_timeout_s=30.0)


class _Marker:
    """Unpickling this creates ``path``: proof that a pickle from a peer was loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    context.setsockopt(zmq.LINGER, 0)
    try:
        yield context
    finally:
        context.destroy(linger=0)  # closes every socket a test opened


def impostor(ctx: zmq.Context, pool: zckpt.CheckpointPool, identity: bytes | None) -> zmq.Socket:
    """A DEALER on the pool's endpoint, as another process of the same user could open."""
    sock = ctx.socket(zmq.DEALER)
    if identity is not None:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    sock.connect(pool._supervisor.endpoint)
    return sock


def dropped(pool: zckpt.CheckpointPool) -> int:
    return pool._supervisor.dropped_frames


def send_all(pool: zckpt.CheckpointPool, sock: zmq.Socket, messages: list[list[bytes]]) -> None:
    """Send ``messages`` and wait until the supervisor has dropped every one of them."""
    before = dropped(pool)
    for frames in messages:
        sock.send_multipart(frames)
    wait_until(lambda: dropped(pool) >= before + len(messages), 30, f"{len(messages)} frames to be dropped")


def pickled(kind: P.Kind, marker: str) -> list[list[bytes]]:
    """A marker pickle in every shape a body could take: the old wire, the new header, a msgpack ext."""
    blob = pickle.dumps(_Marker(marker))
    ext = msgpack.packb([0, msgpack.ExtType(1, blob)], use_bin_type=True)
    header = bytes([kind]) + P.VERSION.to_bytes(2, "big")
    return [
        [b"", bytes([kind]) + blob],                   # the pre-authentication wire format
        [b"", header + bytes(32) + blob],              # new header, no proof, pickle body
        [b"", header + bytes(32) + ext],               # new header, no proof, pickle as msgpack ext
        [b"", header + P.proof(b"\0" * 32, b"x") + ext],  # a proof made with a guessed secret
    ]


def well_formed(identity: bytes) -> list[list[bytes]]:
    """Messages that decode cleanly except for the proof: zeros, or HMAC with a wrong secret."""
    bodies = [
        (P.Kind.HELLO, P.Hello(os.getpid(), 0, 1)),
        (P.Kind.HEARTBEAT, P.Heartbeat(123, os.getpid())),
        (P.Kind.INIT_OK, P.Empty()),
        (P.Kind.INIT_FAILED, P.ErrorReport(None, "builtins.ValueError", ["impostor"], "tb", "init_fn")),
        (P.Kind.DONE, P.JobResult(1, [])),
        (P.Kind.FAILED, P.ErrorReport(1, "builtins.OSError", [28, "impostor"], "tb", "write")),
        (P.Kind.BYE, P.Empty()),
    ]
    wrong = P.proof(os.urandom(32), identity)
    return [P.encode(kind, body, mac) for kind, body in bodies for mac in (bytes(32), wrong)]


def assert_unharmed(pool: zckpt.CheckpointPool, pids: list[int], marker: str, path) -> None:
    assert not os.path.exists(marker), "a peer's pickle was loaded in the trainer"
    assert pool.worker_pids == pids
    pool.save({"a": torch.ones(4), "b": torch.zeros(4)}, path).result(timeout=60)
    zckpt.verify(path)
    assert pool.worker_pids == pids and pool.stats.worker_restarts == 0


# --- the wire, end to end ---------------------------------------------------------------
def test_random_frames_from_any_id_are_dropped(make_pool, ctx, tmp_path):
    pool = make_pool(num_workers=2, config=PoolConfig(**FAST))
    pids = pool.worker_pids
    marker = str(tmp_path / "marker")
    rng = random.Random(8)
    ids = [None, b"w-0-0", b"h-1-0", b"w-0-1", b"\xff\x00garbage", b"w-0-0-" + b"0" * 16]
    for identity in ids:
        sock = impostor(ctx, pool, identity)
        messages = []
        for _ in range(40):
            n = rng.randint(1, 4)
            messages.append([rng.randbytes(rng.choice([0, 1, 2, 3, 35, 36, 200, 5000])) for _ in range(n)])
        messages.append([b""])
        messages.append([b"", b""])
        send_all(pool, sock, messages)
    assert_unharmed(pool, pids, marker, tmp_path / "c")


def test_valid_looking_frames_with_every_id_pattern_are_dropped(make_pool, ctx, tmp_path):
    pool = make_pool(num_workers=2, config=PoolConfig(**FAST))
    pids = pool.worker_pids
    marker = str(tmp_path / "marker")
    current = pool._supervisor._slots[0].cmd_id
    ids = [
        b"w-0-0", b"h-0-0", b"w-0-1", b"h-0-1", b"w-1-0", b"h-1-0",   # the old, predictable ids
        current + b"x", current[:-1],                              # near misses of a live id
        b"w-0-0-" + os.urandom(8).hex().encode(),                  # the new pattern, guessed token
        b"\xff\xfe", b"w--", b"h-0-0-0-0",                         # garbage
    ]
    for identity in ids:
        sock = impostor(ctx, pool, identity)
        send_all(pool, sock, well_formed(identity) + pickled(P.Kind.HEARTBEAT, marker))
    assert_unharmed(pool, pids, marker, tmp_path / "c")


def test_impostor_holding_a_live_id_without_the_secret_gets_nothing_decoded(make_pool, ctx, tmp_path,
                                                                           monkeypatch):
    # Worst case for the routing id: the impostor knows the next incarnation's token (the
    # test makes it predictable once) and takes its heartbeat id first (a ROUTER refuses a
    # second peer with a live id). Without the secret its frames are still dropped, and
    # the replacement it shuts out of heartbeats is declared silent and replaced with a
    # fresh token: a delay, not a lost pool and no code run.
    pool = make_pool(num_workers=1, config=PoolConfig(**{**FAST, "heartbeat_liveness": 15}))  # silent after 3 s
    marker = str(tmp_path / "marker")
    token = "0123456789abcdef"
    tokens = iter([token])
    real_new_token = P.new_token
    monkeypatch.setattr(P, "new_token", lambda: next(tokens, None) or real_new_token())
    victim = pool.worker_pids[0]
    hb_id = P.heartbeat_id(0, 1, token)
    hb = impostor(ctx, pool, hb_id)
    send_all(pool, hb, [[b"", b"ping"]])  # connected before the death (the id is unknown until then)
    os.kill(victim, signal.SIGKILL)
    slot = pool._supervisor._slots[0]
    wait_until(lambda: slot.hb_id == hb_id and slot.state is SlotState.READY, 30,
               "the replacement with the predicted id to be ready")
    # The id is live now: every message kind, without a valid proof, and pickles.
    send_all(pool, hb, well_formed(hb_id) + pickled(P.Kind.HEARTBEAT, marker) + pickled(P.Kind.HELLO, marker))
    assert not os.path.exists(marker)
    wait_until(lambda: slot.generation >= 2 and slot.state is SlotState.READY, 30,
               "a replacement with a fresh token")
    pool.save({"a": torch.ones(4)}, tmp_path / "c").result(timeout=60)
    zckpt.verify(tmp_path / "c")
    assert not os.path.exists(marker)


def test_impostor_preconnected_with_guessed_future_ids_does_not_block_the_replacement(make_pool, ctx,
                                                                                      tmp_path):
    pool = make_pool(num_workers=2, config=PoolConfig(**FAST))
    marker = str(tmp_path / "marker")
    victim = pool.worker_pids[0]
    guesses = [b"w-0-1", b"h-0-1", P.command_id(0, 1, os.urandom(8).hex()), P.heartbeat_id(0, 1, os.urandom(8).hex())]
    socks = [impostor(ctx, pool, g) for g in guesses]
    for sock in socks:  # each connection is up once the supervisor has seen (and dropped) a frame
        send_all(pool, sock, pickled(P.Kind.HEARTBEAT, marker))
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(pool.worker_pids) == 2 and victim not in pool.worker_pids
               and pool._supervisor.started_ok.is_set(), 30, "a replacement")
    for sock, guess in zip(socks, guesses, strict=True):  # after the death, the guessed ids still get nowhere
        send_all(pool, sock, well_formed(guess) + pickled(P.Kind.HEARTBEAT, marker))
    pids = pool.worker_pids
    fut = pool.save({"a": torch.ones(4), "b": torch.zeros(4)}, tmp_path / "c")
    fut.result(timeout=60)
    zckpt.verify(tmp_path / "c")
    assert not os.path.exists(marker)
    assert pool.worker_pids == pids and pool.stats.worker_restarts == 1


# --- the codec and the exception path, directly -------------------------------------------
@pytest.mark.parametrize("kind", [P.Kind.HEARTBEAT, P.Kind.DONE, P.Kind.FAILED, P.Kind.HELLO])
def test_bodies_from_workers_never_unpickle(tmp_path, kind):
    marker = str(tmp_path / "marker")
    for frames in pickled(kind, marker):
        with pytest.raises(P.ProtocolError):
            P.decode(frames)
    assert not os.path.exists(marker)


def test_remote_exceptions_are_rebuilt_only_from_the_allow_list(tmp_path):
    marker = str(tmp_path / "marker")
    for name, args in [("posix.system", [f"touch {marker}"]), ("builtins.open", [marker, "w"]),
                       ("builtins.SystemExit", [3]), ("builtins.KeyboardInterrupt", []),
                       ("zckpt.pool.CheckpointPool", []), ("builtins.OSError", [{"not": "plain"}])]:
        exc = unpack_exception((name, args), "Traceback ...\nEvil: boom\n", "in worker 0")
        assert type(exc) is RemoteError and exc.remote_type == name
        assert isinstance(exc.__cause__, zckpt.errors.RemoteTraceback)
    assert not os.path.exists(marker)
    exc = unpack_exception(("builtins.OSError", [28, "disk full", "f"]), "tb", "in worker 0")
    assert type(exc) is OSError and exc.errno == 28 and exc.filename == "f"


def test_protocol_version_mismatch_is_a_clear_init_error(monkeypatch):
    # The trainer expects a version the (unpatched) worker does not speak.
    monkeypatch.setattr(P, "VERSION", P.VERSION + 1)
    with pytest.raises(zckpt.WorkerInitError, match=f"protocol version {P.VERSION - 1}.*speaks {P.VERSION}"):
        zckpt.CheckpointPool(num_workers=1, config=PoolConfig(**FAST))


def test_the_secret_is_not_on_the_command_line_or_in_the_environment(make_pool):
    pool = make_pool(num_workers=1, config=PoolConfig(**FAST))
    secret = pool._supervisor._secret
    token = pool._supervisor._slots[0].cmd_id.rsplit(b"-", 1)[1]
    pid = pool.worker_pids[0]
    for what in ("cmdline", "environ"):
        with open(f"/proc/{pid}/{what}", "rb") as f:
            data = f.read()
        assert secret not in data and secret.hex().encode() not in data and token not in data
    # and the pipe it came through is closed in the worker
    fds = os.listdir(f"/proc/{pid}/fd")
    assert not any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:") for fd in fds if fd not in ("0", "1", "2"))


def test_a_worker_drops_messages_without_the_trainers_proof(tmp_path):
    # A same-user process could replace the socket file and be the peer a worker connects
    # to: its INIT (a payload the worker would unpickle) is dropped before decoding.
    from zckpt.worker import _from_trainer

    secret, routing_id = os.urandom(32), P.command_id(0, 0, P.new_token())
    marker = str(tmp_path / "marker")
    for mac in (bytes(32), P.proof(secret, routing_id), P.proof(os.urandom(32), P.trainer_identity(routing_id))):
        for frames in [P.encode(P.Kind.JOB, P.MapSegments(1, [], []), mac)] + pickled(P.Kind.INIT, marker):
            if frames[1][3:35] == bytes(32):
                frames = [b"", frames[1][:3] + mac + frames[1][35:]]
            assert _from_trainer(secret, routing_id, frames) is None
    good = P.encode(P.Kind.JOB, P.MapSegments(1, [], []), P.proof(secret, P.trainer_identity(routing_id)))
    assert _from_trainer(secret, routing_id, good) is not None
    assert not os.path.exists(marker)
