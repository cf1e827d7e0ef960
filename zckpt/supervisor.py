"""The supervisor thread: owns the ROUTER socket, the worker processes and their liveness.

One thread does all socket I/O (ZeroMQ sockets are not thread-safe). It blocks in one
poll over the ROUTER, a wakeup pipe (other threads queue commands, then write a byte)
and every worker's pidfd, so a result, a request and a death all wake it at once; the
poll timeout is the next heartbeat or deadline that is due.

Liveness, per worker incarnation (slot + generation):

- death: the pidfd (or ``Popen.poll`` where pidfds are missing) -> declared dead at once;
- hang: no message on either of its sockets for ``heartbeat_interval_s *
  heartbeat_liveness`` -> SIGKILL, declared dead. Messages queued while this thread was
  starved of the GIL are drained *before* silence is judged, so a busy trainer does not
  produce false deaths;
- start-up: HELLO, INIT, INIT_OK within ``init_timeout_s``;
- stall: a shard-file job whose heartbeats report no new bytes written for
  ``stall_timeout_s`` -> SIGKILL, declared dead (busy is not hung, but busy writing
  nothing is). Only write jobs: commits (fsync, retention), arena mappings and compat
  writers report no bytes, and fall to ``save_timeout_s``.

A dead worker's job fails with :class:`WorkerDiedError`, and a replacement (generation
+1) is started so the next save works. Workers are spawned from this long-lived thread
because the parent-death signal follows the thread that forked the child.

Trust: the pool has a secret (32 random bytes) and each incarnation a random routing-id
token; both reach the worker through an inherited pipe, never argv or the environment.
A frame is looked up by its exact routing id (unknown ids are dropped), then its
fixed-format header must carry the HMAC proof for that id before the body is decoded,
and bodies are decoded as data only (msgpack): a process that merely reaches the socket
can neither run code here nor take the place of a worker. Dropped frames cost nothing
but a rate-limited log line.

The supervisor's own life is one :class:`SupervisorState`, changed only by ``_to``,
which logs every transition.
"""

from __future__ import annotations

import enum
import logging
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from . import protocol as P
from ._proc import kill_quietly, open_pidfd, sweep_stale_ipc_dirs
from .config import PoolConfig
from .errors import PoolClosedError, WorkerDiedError, WorkerInitError, describe_exit, unpack_exception

__all__ = ["Supervisor", "ShardJob", "SlotState", "SupervisorState"]

logger = logging.getLogger(__name__)

_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MAX_IPC_PATH = 100  # bytes of a socket path; sun_path holds 107 and a NUL
# Frames from unknown or unproven peers are dropped; a flood of them must not flood the
# log too, so the drops are counted and summarised at most this often.
DROP_LOG_INTERVAL_S = 5.0
# Messages from workers are small (results, checksums, a traceback's text: KBs). libzmq
# drops the connection of a peer that sends more, before a byte reaches Python, so an
# unproven peer cannot make the trainer buffer gigabytes; 16 MiB leaves real workers
# three orders of magnitude of room.
MAX_MESSAGE_BYTES = 16 << 20


class SupervisorState(enum.Enum):
    STARTING = "starting"    # workers spawned, not all have run their init yet
    RUNNING = "running"      # taking work
    STOPPING = "stopping"    # graceful shutdown: drain, TERMINATE, kill at the deadline
    KILLING = "killing"      # kill(): every worker SIGKILLed, jobs fail as "killed"
    BROKEN = "broken"        # cannot go on (start-up failed, or a death without replacement)
    FINISHED = "finished"    # the thread ended: sockets, pipe and pidfds are closed


_TRANSITIONS: dict[SupervisorState, frozenset[SupervisorState]] = {
    SupervisorState.STARTING: frozenset({SupervisorState.RUNNING, SupervisorState.STOPPING, SupervisorState.KILLING,
                                         SupervisorState.BROKEN, SupervisorState.FINISHED}),
    SupervisorState.RUNNING: frozenset({SupervisorState.STOPPING, SupervisorState.KILLING, SupervisorState.BROKEN,
                                        SupervisorState.FINISHED}),
    SupervisorState.STOPPING: frozenset({SupervisorState.KILLING, SupervisorState.BROKEN, SupervisorState.FINISHED}),
    SupervisorState.BROKEN: frozenset({SupervisorState.KILLING, SupervisorState.FINISHED}),
    SupervisorState.KILLING: frozenset({SupervisorState.FINISHED}),
    SupervisorState.FINISHED: frozenset(),
}


class SlotState(enum.Enum):
    SPAWNING = "spawning"          # process started, INIT_OK not yet received
    READY = "ready"                # idle
    BUSY = "busy"                  # running a job
    STOPPING = "stopping"          # TERMINATE sent
    DEAD = "dead"


@dataclass
class ShardJob:
    """One worker's part of a save. ``on_done(result, exc)`` runs on the supervisor thread."""

    slot: int
    message: Any                   # P.WriteFiles or P.WriteState
    on_done: Callable[[P.JobResult | None, BaseException | None], None]
    deadline: float                # monotonic
    describe: str = ""
    retries: int = 0               # times it may go to a replacement if its worker dies or hangs
    attempts: int = 1              # how many workers have been given it


@dataclass
class _Slot:
    index: int
    generation: int = -1
    state: SlotState = SlotState.DEAD
    proc: subprocess.Popen | None = None
    pidfd: int | None = None
    started: float = 0.0
    last_seen: float = 0.0
    hello: bool = False
    job: ShardJob | None = None
    queue: deque = field(default_factory=deque)
    progress: int = 0              # bytes written by this incarnation, from its heartbeats
    progress_at: float = 0.0       # when ``progress`` last moved, or the current job started
    job_progress0: int = 0         # ``progress`` when the current job started
    cmd_id: bytes = b""            # this incarnation's routing ids (random token inside)
    hb_id: bytes = b""
    cmd_proof: bytes = b""         # what the trainer's messages to those ids carry
    hb_proof: bytes = b""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def who(self) -> str:
        return f"worker slot={self.index} gen={self.generation} pid={self.pid}"


class Supervisor(threading.Thread):
    """Starts, watches and stops the worker processes; dispatches shard jobs to them.

    Args:
        config: the pool's configuration.
        init_payload: cloudpickled (init_fn, init_args, writer_factory, writer_kwargs).
        writer_method: the method the writer must have (``"write_file"`` for the pool's
            shard files, ``"write"`` for compat's state dicts), checked at worker init.
        on_broken: called (on this thread) with the cause when the pool cannot go on.
    """

    def __init__(self, config: PoolConfig, init_payload: bytes, writer_method: str,
                 on_broken: Callable[[BaseException], None]) -> None:
        super().__init__(name="zckpt-supervisor", daemon=True)
        self.config = config
        self._payload = init_payload
        self._writer_method = writer_method
        self._on_broken = on_broken
        self._lock = threading.Lock()
        self._slots = [_Slot(i) for i in range(config.num_workers)]
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        # Check the socket path before creating anything, so that raising leaves no pipe
        # or directory behind (mkdtemp appends 8 random characters to the prefix).
        tmpdir = tempfile.gettempdir()
        prefix = f"zckpt-{os.getpid()}-"
        path_len = len(os.path.join(tmpdir, prefix + "x" * 8, "ctl"))
        if path_len > _MAX_IPC_PATH:
            raise OSError(f"the ipc socket path under TMPDIR={tmpdir!r} would be {path_len} bytes, over "
                          f"{_MAX_IPC_PATH} (ipc paths stop at 107 bytes): set TMPDIR to a shorter directory")
        sweep_stale_ipc_dirs(tmpdir)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        ipc_dir = None
        try:
            # Private 0700 directory: unpickling runs code, so only our user may connect.
            ipc_dir = tempfile.mkdtemp(prefix=prefix, dir=tmpdir)
            os.chmod(ipc_dir, 0o700)
        except BaseException:
            os.close(self._wake_r)
            os.close(self._wake_w)
            if ipc_dir is not None:
                shutil.rmtree(ipc_dir, ignore_errors=True)
            raise
        self._ipc_dir = ipc_dir
        self.endpoint = f"ipc://{self._ipc_dir}/ctl"
        self.started_ok = threading.Event()    # every worker ran its init (or start-up failed)
        self.start_error: BaseException | None = None
        self._state = SupervisorState.STARTING
        self._shutdown_deadline = 0.0
        self._next_heartbeat = 0.0
        self.finished = threading.Event()
        self._local_commands = False
        # Proves a worker is ours: it reaches workers only through inherited pipes.
        self._secret = secrets.token_bytes(P.SECRET_BYTES)
        self._peers: dict[bytes, _Slot] = {}   # current routing ids -> slot (exact match only)
        self._dropped = 0                      # since the last summary line
        self._kill_requested = threading.Event()  # kill_now() called (before its signals land)
        self.dropped_frames = 0                # in all (for stats and tests)
        self._drop_logged_at = 0.0
        self.restarts = 0

    # --- called from other threads -------------------------------------------------
    def submit(self, job: ShardJob) -> None:
        if not 0 <= job.slot < len(self._slots):   # raised here: in the loop it would crash the supervisor
            raise ValueError(f"job {job.describe!r} names slot {job.slot}; there are {len(self._slots)}")
        self._command("job", job)

    def shutdown(self, deadline: float) -> None:
        """Ask for a graceful stop: TERMINATE idle workers, kill the rest at ``deadline``."""
        self._command("shutdown", deadline)

    def kill_now(self) -> None:
        """SIGKILL every worker from the calling thread, then let the loop clean up."""
        # Said before any signal: the loop may see the deaths before it reads the "kill"
        # command, and must not take them for crashes (it replaced workers and failed the
        # save in flight with WorkerDiedError, 1 kill() in 5 under load).
        self._kill_requested.set()
        with self._lock:
            pids = [s.proc.pid for s in self._slots if s.proc is not None and s.proc.returncode is None]
        for pid in pids:
            kill_quietly(pid, signal.SIGKILL)
        self._command("kill", None)

    def reset_locks_after_fork(self) -> None:
        """In a forked child: a fresh lock (the parent's copy may be held by this thread, absent there)."""
        self._lock = threading.Lock()

    @property
    def worker_pids(self) -> list[int]:
        with self._lock:
            return [s.proc.pid for s in self._slots
                    if s.proc is not None and s.state in (SlotState.READY, SlotState.BUSY, SlotState.SPAWNING)
                    and s.proc.returncode is None]

    def slot_process(self, index: int) -> subprocess.Popen | None:
        """The current process of a slot (for compat's ``process.processes``)."""
        with self._lock:
            return self._slots[index].proc

    @property
    def state(self) -> SupervisorState:
        return self._state

    def _to(self, new: SupervisorState, why: str) -> bool:
        """Move to ``new`` if allowed from the current state (log it); False if not allowed.

        Runs on the supervisor thread; the write is under the lock because ``_command``
        reads the state from other threads (FINISHED means the wakeup pipe is closed).
        """
        with self._lock:
            old = self._state
            if new not in _TRANSITIONS[old]:
                if new is not old:
                    logger.debug("supervisor stays %s (not -> %s: %s)", old.name, new.name, why)
                return False
            self._state = new
        logger.info("supervisor %s -> %s: %s", old.name, new.name, why)
        return True

    def _command(self, what: str, arg: Any) -> None:
        with self._lock:
            gone = self._state is SupervisorState.FINISHED  # its fd numbers may be reused by now
            if not gone:
                self._commands.put((what, arg))
                if threading.current_thread() is self:
                    self._local_commands = True  # drained this iteration: no wakeup syscall
                else:
                    try:
                        os.write(self._wake_w, b"x")
                    except BlockingIOError:
                        pass  # pipe full: the thread is awake anyway
        if gone and what == "job":
            arg.on_done(None, PoolClosedError("the checkpoint pool was shut down"))

    # --- the thread ------------------------------------------------------------------
    def run(self) -> None:
        ctx = zmq.Context()
        ctx.setsockopt(zmq.LINGER, 0)   # the default -1 makes ctx.term() hang
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sends to a gone peer raise, not vanish
        router.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        try:
            router.bind(self.endpoint)
            self._router = router
            for slot in self._slots:
                self._spawn(slot)
            self._loop(router)
        except BaseException as exc:  # noqa: BLE001 - never die silently
            logger.exception("supervisor crashed")
            self._break(exc)
            self._kill_all()
        finally:
            self._reap_all(timeout_s=5.0)
            self._fail_all_jobs(PoolClosedError("the checkpoint pool was shut down"))
            router.close(linger=0)
            ctx.term()
            shutil.rmtree(self._ipc_dir, ignore_errors=True)
            self._to(SupervisorState.FINISHED, "the supervisor thread ends")
            with self._lock:
                for fd in (self._wake_r, self._wake_w):
                    os.close(fd)
                for s in self._slots:
                    self._close_pidfd(s)
            # Commands that raced with the end: fail their jobs rather than drop them.
            while True:
                try:
                    what, arg = self._commands.get_nowait()
                except queue.Empty:
                    break
                if what == "job":
                    arg.on_done(None, PoolClosedError("the checkpoint pool was shut down"))
            if not self.started_ok.is_set() and self.start_error is None:
                self.start_error = PoolClosedError("the pool stopped before its workers started")
            self.started_ok.set()
            self.finished.set()

    def _loop(self, router: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        registered: set[int] = set()
        interval = self.config.heartbeat_interval_s
        next_sweep = 0.0
        while True:
            with self._lock:
                fds = {s.pidfd for s in self._slots if s.pidfd is not None}
                all_pidfds = all(s.pidfd is not None for s in self._slots if s.proc is not None
                                 and s.state is not SlotState.DEAD)
            for fd in fds - registered:
                poller.register(fd, zmq.POLLIN)
            for fd in registered - fds:
                poller.unregister(fd)
            registered = fds
            timeout_s = min(interval / 4, max(0.0, self._next_heartbeat - time.monotonic()))
            timeout_ms = 0 if self._local_commands else max(1, int(timeout_s * 1000))
            events = dict(poller.poll(timeout_ms))
            now = time.monotonic()
            # Touch only what is ready: under a busy training loop every system call
            # that releases the GIL costs up to a switch interval (5 ms) to get it back.
            if router in events:
                self._drain_router(router, now)
            if self._wake_r in events:
                self._drain_pipe()
            if self._wake_r in events or self._local_commands:
                self._local_commands = False
                self._drain_commands(now)
            if (registered & events.keys()) or not all_pidfds or now >= next_sweep:
                self._check_processes(now)
                next_sweep = now + interval  # a backstop for a missed pidfd event
            if now >= self._next_heartbeat:
                self._send_heartbeats(router)
                self._next_heartbeat = now + interval
            self._check_deadlines(time.monotonic())
            self._dispatch(router)
            if self._done():
                return

    def _done(self) -> bool:
        if self._state not in (SupervisorState.STOPPING, SupervisorState.KILLING, SupervisorState.BROKEN):
            return False
        with self._lock:
            return all(s.state is SlotState.DEAD for s in self._slots)

    # --- processes -------------------------------------------------------------------
    def _spawn(self, slot: _Slot) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([_PKG_PARENT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        cfg = self.config
        generation = slot.generation + 1
        token = P.new_token()
        # The secret and token travel through a pipe only this child inherits (os.pipe
        # fds are non-inheritable; pass_fds opens this one for this child alone). Written
        # before the start: 48 bytes fit any pipe buffer, so this never blocks.
        key_r, key_w = os.pipe()
        try:
            os.write(key_w, self._secret + token.encode("ascii"))
            os.close(key_w)
            key_w = -1
            argv = [sys.executable, "-m", "zckpt.worker", self.endpoint, str(slot.index), str(generation),
                    str(os.getpid()), repr(cfg.heartbeat_interval_s), repr(cfg.orphan_timeout_s), str(key_r)]
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, close_fds=True, pass_fds=(key_r,))
        finally:
            os.close(key_r)
            if key_w >= 0:
                os.close(key_w)
        for old_id in (slot.cmd_id, slot.hb_id):  # the previous incarnation's ids stop working now
            self._peers.pop(old_id, None)
        cmd_id, hb_id = P.command_id(slot.index, generation, token), P.heartbeat_id(slot.index, generation, token)
        for ident in (cmd_id, hb_id):
            self._peers[ident] = slot
        now = time.monotonic()
        with self._lock:
            slot.cmd_id, slot.hb_id = cmd_id, hb_id
            slot.cmd_proof = P.proof(self._secret, P.trainer_identity(cmd_id))
            slot.hb_proof = P.proof(self._secret, P.trainer_identity(hb_id))
            slot.generation = generation
            slot.proc = proc
            slot.pidfd = open_pidfd(proc.pid)
            slot.state = SlotState.SPAWNING
            slot.started = slot.last_seen = now
            slot.hello = False
            slot.progress = slot.job_progress0 = 0
        logger.info("started %s", slot.who())

    def _close_pidfd(self, slot: _Slot) -> None:
        if slot.pidfd is not None:
            os.close(slot.pidfd)
            slot.pidfd = None

    def _check_processes(self, now: float) -> None:
        for slot in self._slots:
            if slot.proc is not None and slot.state is not SlotState.DEAD and slot.proc.poll() is not None:
                self._declare_dead(slot, f"exited with {describe_exit(slot.proc.returncode)}", now)

    def _declare_dead(self, slot: _Slot, why: str, now: float) -> None:
        """Kill (if needed) and reap a worker, fail its job, and replace it unless stopping."""
        was = slot.state
        assert slot.proc is not None
        self._kill_and_reap(slot)
        with self._lock:
            slot.state = SlotState.DEAD
            self._close_pidfd(slot)
            job, slot.job = slot.job, None
        if was is SlotState.STOPPING:
            logger.info("%s stopped (%s)", slot.who(), why)
            return
        silent = now - slot.last_seen
        msg = (f"checkpoint {slot.who()} {why}; last heard {silent:.2f}s ago"
               f"{f' during its {P.job_name(job.message)} job for {job.describe}' if job else ''}")
        facts: dict[str, Any] = dict(slot=slot.index, generation=slot.generation, pid=slot.pid,
                                     exitcode=slot.proc.returncode, silent_s=silent,
                                     job=job.describe if job else None)
        if self._state is SupervisorState.KILLING or self._kill_requested.is_set():
            logger.info("%s killed", slot.who())
            if job:
                job.on_done(None, PoolClosedError("the checkpoint pool was killed"))
            return
        logger.warning(msg)
        retry = (job is not None and job.retries > 0 and self.config.replace_dead_workers
                 and was is not SlotState.SPAWNING and now < job.deadline
                 and self._state not in (SupervisorState.STOPPING, SupervisorState.BROKEN))
        if job and retry:
            # The replacement maps the same shared memory: the shard is written again from
            # the same snapshot. A death costs a retry, not the save.
            job.retries -= 1
            job.attempts += 1
            slot.queue.appendleft(job)
            logger.warning("handing %s to the replacement of slot %d (attempt %d)", job.describe, slot.index,
                           job.attempts)
        elif job:
            job.on_done(None, WorkerDiedError(msg, **facts))
        if was is SlotState.SPAWNING:
            self._start_failed(slot, WorkerInitError(f"{msg} during start-up"))
            return
        if self._state in (SupervisorState.STOPPING, SupervisorState.BROKEN):
            return
        if not self.config.replace_dead_workers:
            self._break(WorkerDiedError(msg, **facts))
            self._kill_all()
            return
        logger.warning("replacing slot %d (generation %d -> %d)", slot.index, slot.generation,
                       slot.generation + 1)
        self.restarts += 1
        self._spawn(slot)

    def _start_failed(self, slot: _Slot, exc: BaseException) -> None:
        if not self.started_ok.is_set():  # the pool's constructor is waiting: it raises this
            if self.start_error is None:
                self.start_error = exc
            self.started_ok.set()
        self._break(exc)
        self._kill_all()

    def _kill_all(self) -> None:
        for slot in self._slots:
            if slot.proc is not None and slot.proc.returncode is None:
                kill_quietly(slot.proc.pid, signal.SIGKILL)

    def _reap_all(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for slot in self._slots:
            if slot.proc is None:
                continue
            self._kill_and_reap(slot, grace_s=max(0.0, deadline - time.monotonic()))
            with self._lock:
                slot.state = SlotState.DEAD

    def _kill_and_reap(self, slot: _Slot, grace_s: float = 0.0) -> None:
        """Let a worker exit within ``grace_s``, else SIGKILL it; reap it either way (bounded)."""
        assert slot.proc is not None
        if slot.proc.poll() is not None:
            return
        if grace_s > 0:
            try:
                slot.proc.wait(timeout=grace_s)
                return
            except subprocess.TimeoutExpired:
                pass
        kill_quietly(slot.proc.pid, signal.SIGKILL)
        try:
            slot.proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            logger.error("%s survived SIGKILL for 5s", slot.who())

    def _break(self, exc: BaseException) -> None:
        if not self._to(SupervisorState.BROKEN, f"{type(exc).__name__}: {exc}"):
            return
        for slot in self._slots:
            while slot.queue:
                slot.queue.popleft().on_done(None, _fresh(exc))
        try:
            self._on_broken(exc)
        except Exception:
            logger.exception("on_broken callback raised")

    def _fail_all_jobs(self, exc: BaseException) -> None:
        for slot in self._slots:
            jobs = list(slot.queue) + ([slot.job] if slot.job else [])
            slot.queue.clear()
            slot.job = None
            for job in jobs:
                job.on_done(None, _fresh(exc))

    # --- messages --------------------------------------------------------------------
    def _drain_router(self, router: zmq.Socket, now: float) -> None:
        """Read every queued frame; handle those from proven current workers, drop the rest.

        Never blocks (NOBLOCK) and never raises for what a peer sent.
        """
        while True:
            try:
                frames = router.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            identity, rest = frames[0], frames[1:]
            slot = self._peers.get(identity)   # exact: a guessed or stale id is simply unknown
            if slot is None:
                self._drop(identity, "unknown routing id", now)
                continue
            try:
                header = P.split(rest)
            except P.ProtocolError as exc:
                self._drop(identity, str(exc), now)
                continue
            if not P.check_proof(self._secret, identity, header):
                self._drop(identity, f"{header.kind.name} without a valid proof", now)
                continue
            # From here on the peer holds the secret: it is our worker.
            if header.version != P.VERSION:
                self._version_mismatch(slot, header.version, now)
                continue
            try:
                body = P.decode_body(header)
            except P.ProtocolError as exc:
                logger.warning("invalid message from %s: %s", slot.who(), exc)
                continue
            slot.last_seen = now
            self._handle(router, slot, header.kind, body)

    def _drop(self, identity: bytes, why: str, now: float) -> None:
        """Count a frame from an unknown or unproven peer; log a summary at most every few seconds."""
        self._dropped += 1
        self.dropped_frames += 1
        logger.debug("dropping frame from %r: %s", identity[:64], why)
        if now - self._drop_logged_at >= DROP_LOG_INTERVAL_S:
            logger.warning("dropped %d frame(s) from unknown or unproven peers on %s (last from %r: %s)",
                           self._dropped, self.endpoint, identity[:64], why)
            self._dropped = 0
            self._drop_logged_at = now

    def _version_mismatch(self, slot: _Slot, version: int, now: float) -> None:
        exc = WorkerInitError(f"{slot.who()} speaks zckpt protocol version {version}, this trainer speaks "
                              f"{P.VERSION}: the worker ran another zckpt installation ({sys.executable})")
        logger.error("%s", exc)
        if slot.proc is not None:
            kill_quietly(slot.proc.pid)
        with self._lock:
            slot.state = SlotState.STOPPING   # its death is expected now: no replacement
        self._start_failed(slot, exc)

    def _send(self, router: zmq.Socket, slot: _Slot, kind: P.Kind, body: Any = P.EMPTY) -> bool:
        try:
            router.send_multipart([slot.cmd_id] + P.encode(kind, body, slot.cmd_proof))
            return True
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer is gone; its death is handled elsewhere
            logger.debug("send %s to %s failed: %s", kind.name, slot.who(), exc)
            return False

    def _handle(self, router: zmq.Socket, slot: _Slot, kind: P.Kind, body: Any) -> None:
        if kind is P.Kind.HEARTBEAT:
            if body.progress != slot.progress:
                slot.progress = body.progress
                slot.progress_at = slot.last_seen
            return
        if kind is P.Kind.HELLO:
            slot.hello = True
            self._send(router, slot, P.Kind.INIT, self._init_request())
        elif kind is P.Kind.INIT_OK:
            with self._lock:
                slot.state = SlotState.READY
            logger.info("%s ready in %.3fs", slot.who(), time.monotonic() - slot.started)
            if not self.started_ok.is_set() and all(s.state is SlotState.READY for s in self._slots):
                self._to(SupervisorState.RUNNING, "every worker ran its init")
                self.started_ok.set()
        elif kind is P.Kind.INIT_FAILED:
            exc = WorkerInitError(
                f"{slot.who()} failed in {body.phase}: "
                f"{body.text.strip().splitlines()[-1] if body.text.strip() else '?'}",
                remote_traceback=body.text)
            exc.__cause__ = unpack_exception((body.exc_type, body.exc_args), body.text, f"in {slot.who()}")
            with self._lock:
                slot.state = SlotState.STOPPING  # it exits by itself after reporting
            self._start_failed(slot, exc)
        elif kind in (P.Kind.DONE, P.Kind.FAILED):
            job = slot.job
            if job is None or body.job_id != job.message.job_id:
                logger.warning("%s answered job %s it was not running", slot.who(), body.job_id)
                return
            with self._lock:
                slot.job = None
                if slot.state is SlotState.BUSY:
                    slot.state = SlotState.READY
            if kind is P.Kind.DONE:
                job.on_done(body, None)
            else:
                job.on_done(None, unpack_exception(
                    (body.exc_type, body.exc_args), body.text,
                    f"raised in {slot.who()} during its {P.job_name(job.message)} job for {job.describe}"))
        elif kind is P.Kind.BYE:
            with self._lock:
                slot.state = SlotState.STOPPING
        else:
            logger.warning("unexpected %s from %s", kind.name, slot.who())

    def _init_request(self) -> P.InitRequest:
        cfg = self.config
        return P.InitRequest(
            sys_path=[p for p in sys.path if p], payload=self._payload, writer_method=self._writer_method,
            heartbeat_interval_s=cfg.heartbeat_interval_s, orphan_timeout_s=cfg.orphan_timeout_s,
            write_chunk_bytes=cfg.write_chunk_bytes, checksum=cfg.checksum, fsync=cfg.fsync,
            direct_io=cfg.direct_io, log_level=logging.getLogger("zckpt").getEffectiveLevel(),
            transient_retries=cfg.transient_retries,
        )

    def _send_heartbeats(self, router: zmq.Socket) -> None:
        for slot in self._slots:
            if slot.hello and slot.state in (SlotState.SPAWNING, SlotState.READY, SlotState.BUSY):
                try:
                    router.send_multipart([slot.hb_id]
                                          + P.encode(P.Kind.HEARTBEAT, P.Heartbeat(0, os.getpid()), slot.hb_proof),
                                          flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # heartbeat socket not connected yet, or gone

    # --- commands, deadlines, dispatch -----------------------------------------------
    def _drain_pipe(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _drain_commands(self, now: float) -> None:
        while True:
            try:
                what, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if what == "job":
                if self._state not in (SupervisorState.STARTING, SupervisorState.RUNNING):
                    arg.on_done(None, PoolClosedError("the checkpoint pool is not taking work"))
                else:
                    self._slots[arg.slot].queue.append(arg)
            elif what == "shutdown":
                self._shutdown_deadline = arg
                self._to(SupervisorState.STOPPING, "close() asked for a graceful stop")
            elif what == "kill":
                self._to(SupervisorState.KILLING, "kill() asked to kill every worker now")
                self._kill_all()

    def _check_deadlines(self, now: float) -> None:
        cfg = self.config
        for slot in self._slots:
            if slot.state is SlotState.DEAD or slot.proc is None:
                continue
            if slot.state is SlotState.SPAWNING and now - slot.started > cfg.init_timeout_s:
                why = "did not finish start-up and init" if slot.hello else "did not connect"
                exc = TimeoutError(f"timed out after {cfg.init_timeout_s:.1f}s: {slot.who()} {why}")
                kill_quietly(slot.proc.pid)
                if not self.started_ok.is_set():
                    self._start_failed(slot, exc)
                else:
                    self._declare_dead(slot, f"{why} within {cfg.init_timeout_s:.1f}s", now)
                continue
            if slot.state in (SlotState.READY, SlotState.BUSY) and now - slot.last_seen > cfg.dead_after_s:
                self._declare_dead(slot, f"went silent (no heartbeat for {now - slot.last_seen:.2f}s, "
                                         f"limit {cfg.dead_after_s:.2f}s: hung or stopped)", now)
                continue
            job = slot.job
            if job is not None and isinstance(job.message, P.WriteFiles) \
                    and now - slot.progress_at > cfg.stall_timeout_s:
                self._declare_dead(slot, f"made no progress for {now - slot.progress_at:.1f}s "
                                         f"(stall_timeout_s={cfg.stall_timeout_s:g}; hung) with "
                                         f"{slot.progress - slot.job_progress0} bytes written", now)
                continue
            if slot.job is not None and now > slot.job.deadline:
                self._declare_dead(slot, f"did not finish within save_timeout_s={cfg.save_timeout_s:.0f}s",
                                   now)
                continue
            if self._state is SupervisorState.STOPPING and now > self._shutdown_deadline \
                    and slot.state is not SlotState.DEAD:
                logger.warning("%s still running at the shutdown deadline: killing it", slot.who())
                kill_quietly(slot.proc.pid)
        for slot in self._slots:
            stale = [j for j in slot.queue if now > j.deadline]
            for job in stale:
                slot.queue.remove(job)
                job.on_done(None, TimeoutError(f"{job.describe} waited past save_timeout_s for slot {slot.index}"))

    def _dispatch(self, router: zmq.Socket) -> None:
        for slot in self._slots:
            if slot.state is SlotState.READY and slot.job is None and slot.queue:
                job = slot.queue.popleft()
                with self._lock:
                    slot.job = job
                    slot.state = SlotState.BUSY
                slot.progress_at, slot.job_progress0 = time.monotonic(), slot.progress
                logger.debug("dispatching %s (%s) to %s", job.describe, type(job.message).__name__, slot.who())
                if not self._send(router, slot, P.Kind.JOB, job.message):
                    with self._lock:
                        slot.job = None
                        slot.state = SlotState.READY
                    slot.queue.appendleft(job)  # retried once its death or recovery is seen
            elif self._state is SupervisorState.STOPPING and slot.state is SlotState.READY and not slot.queue:
                with self._lock:
                    slot.state = SlotState.STOPPING
                self._send(router, slot, P.Kind.TERMINATE)
            elif self._state is SupervisorState.STOPPING and slot.state is SlotState.SPAWNING:
                with self._lock:
                    slot.state = SlotState.STOPPING
                if slot.hello:
                    self._send(router, slot, P.Kind.TERMINATE)
                elif slot.proc is not None:
                    kill_quietly(slot.proc.pid)


def _fresh(exc: BaseException) -> BaseException:
    """A new exception of the same type and message (each future gets its own)."""
    try:
        new = type(exc)(*exc.args)
        new.__dict__.update(exc.__dict__)  # attributes such as WorkerDiedError.slot
    except Exception:  # noqa: BLE001 - an exception type with another constructor
        new = PoolClosedError(str(exc))
    new.__cause__ = exc.__cause__ if exc.__cause__ is not None else exc
    return new
