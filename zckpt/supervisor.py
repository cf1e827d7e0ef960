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
- start-up: HELLO, INIT, INIT_OK within ``init_timeout_s``.

A dead worker's job fails with :class:`WorkerDiedError`, and a replacement (generation
+1) is started so the next save works. Workers are spawned from this long-lived thread
because the parent-death signal follows the thread that forked the child.
"""

from __future__ import annotations

import enum
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import zmq

from . import protocol as P
from ._proc import kill_quietly, open_pidfd, sweep_stale_ipc_dirs
from .config import PoolConfig
from .errors import PoolClosedError, WorkerDiedError, WorkerInitError, describe_exit, unpack_exception

__all__ = ["Supervisor", "ShardJob", "SlotState"]

logger = logging.getLogger(__name__)

_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MAX_IPC_PATH = 100  # bytes of a socket path; sun_path holds 107 and a NUL


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
    on_done: Callable[[Optional[P.JobResult], Optional[BaseException]], None]
    deadline: float                # monotonic
    describe: str = ""


@dataclass
class _Slot:
    index: int
    generation: int = -1
    state: SlotState = SlotState.DEAD
    proc: Optional[subprocess.Popen] = None
    pidfd: Optional[int] = None
    started: float = 0.0
    last_seen: float = 0.0
    hello: bool = False
    job: Optional[ShardJob] = None
    queue: deque = field(default_factory=deque)

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    def who(self) -> str:
        return f"worker slot={self.index} gen={self.generation} pid={self.pid}"


class Supervisor(threading.Thread):
    """Starts, watches and stops the worker processes; dispatches shard jobs to them.

    Args:
        config: the pool's configuration.
        init_payload: cloudpickled (init_fn, init_args, writer_factory, writer_kwargs).
        mode: ``"files"`` (native shard files) or ``"state"`` (compat writers).
        on_broken: called (on this thread) with the cause when the pool cannot go on.
    """

    def __init__(self, config: PoolConfig, init_payload: bytes, mode: str,
                 on_broken: Callable[[BaseException], None]) -> None:
        super().__init__(name="zckpt-supervisor", daemon=True)
        self.config = config
        self._payload = init_payload
        self._mode = mode
        self._on_broken = on_broken
        self._lock = threading.Lock()
        self._slots = [_Slot(i) for i in range(config.num_workers)]
        self._commands: "queue.SimpleQueue[tuple[str, Any]]" = queue.SimpleQueue()
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
        self.started_ok = threading.Event()    # every worker ran its init
        self.start_error: Optional[BaseException] = None
        self._stopping = False                 # graceful shutdown under way
        self._killing = False
        self._shutdown_deadline = 0.0
        self._broken = False
        self._initial = True
        self._next_heartbeat = 0.0
        self.finished = threading.Event()
        self._fds_closed = False
        self._local_commands = False
        self.restarts = 0

    # --- called from other threads -------------------------------------------------
    def submit(self, job: ShardJob) -> None:
        self._command("job", job)

    def shutdown(self, deadline: float) -> None:
        """Ask for a graceful stop: TERMINATE idle workers, kill the rest at ``deadline``."""
        self._command("shutdown", deadline)

    def kill_now(self) -> None:
        """SIGKILL every worker from the calling thread, then let the loop clean up."""
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

    def slot_process(self, index: int) -> Optional[subprocess.Popen]:
        """The current process of a slot (for compat's ``process.processes``)."""
        with self._lock:
            return self._slots[index].proc

    def _command(self, what: str, arg: Any) -> None:
        with self._lock:
            gone = self._fds_closed  # the thread is gone; its fd numbers may be reused by now
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
            with self._lock:
                self._fds_closed = True
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
        if not (self._stopping or self._killing or self._broken):
            return False
        with self._lock:
            return all(s.state is SlotState.DEAD for s in self._slots)

    # --- processes -------------------------------------------------------------------
    def _spawn(self, slot: _Slot) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([_PKG_PARENT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        cfg = self.config
        generation = slot.generation + 1
        argv = [sys.executable, "-m", "zckpt.worker", self.endpoint, str(slot.index), str(generation),
                str(os.getpid()), repr(cfg.heartbeat_interval_s), repr(cfg.orphan_timeout_s)]
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, close_fds=True)
        now = time.monotonic()
        with self._lock:
            slot.generation = generation
            slot.proc = proc
            slot.pidfd = open_pidfd(proc.pid)
            slot.state = SlotState.SPAWNING
            slot.started = slot.last_seen = now
            slot.hello = False
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
               f"{' while writing ' + job.describe if job else ''}")
        if self._killing:
            logger.info("%s killed", slot.who())
            if job:
                job.on_done(None, PoolClosedError("the checkpoint pool was killed"))
            return
        logger.warning(msg)
        if job:
            job.on_done(None, WorkerDiedError(msg))
        if was is SlotState.SPAWNING:
            self._start_failed(slot, WorkerInitError(f"{msg} during start-up"))
            return
        if self._stopping or self._broken:
            return
        if not self.config.replace_dead_workers:
            self._break(WorkerDiedError(msg))
            self._kill_all()
            return
        logger.warning("replacing slot %d (generation %d -> %d)", slot.index, slot.generation,
                       slot.generation + 1)
        self.restarts += 1
        self._spawn(slot)

    def _start_failed(self, slot: _Slot, exc: BaseException) -> None:
        if self._initial:
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
        if self._broken:
            return
        self._broken = True
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
        while True:
            try:
                frames = router.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            identity, rest = frames[0], frames[1:]
            parsed = P.parse_id(identity)
            if parsed is None or not 0 <= parsed[1] < len(self._slots) \
                    or parsed[2] != self._slots[parsed[1]].generation:
                logger.debug("dropping message from unknown or stale peer %r", identity)
                continue
            slot = self._slots[parsed[1]]
            try:
                kind, body = P.decode(rest)
            except P.ProtocolError as exc:
                logger.warning("invalid message from %s: %s", slot.who(), exc)
                continue
            slot.last_seen = now
            self._handle(router, slot, kind, body)

    def _send(self, router: zmq.Socket, slot: _Slot, kind: P.Kind, body: Any = P.Empty()) -> bool:
        try:
            router.send_multipart([P.command_id(slot.index, slot.generation)] + P.encode(kind, body))
            return True
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer is gone; its death is handled elsewhere
            logger.debug("send %s to %s failed: %s", kind.name, slot.who(), exc)
            return False

    def _handle(self, router: zmq.Socket, slot: _Slot, kind: P.Kind, body: Any) -> None:
        if kind is P.Kind.HEARTBEAT:
            return
        if kind is P.Kind.HELLO:
            slot.hello = True
            self._send(router, slot, P.Kind.INIT, self._init_request())
        elif kind is P.Kind.INIT_OK:
            with self._lock:
                slot.state = SlotState.READY
            logger.info("%s ready in %.3fs", slot.who(), time.monotonic() - slot.started)
            if self._initial and all(s.state is SlotState.READY for s in self._slots):
                self._initial = False
                self.started_ok.set()
        elif kind is P.Kind.INIT_FAILED:
            exc = WorkerInitError(
                f"{slot.who()} failed in {body.phase}: "
                f"{body.text.strip().splitlines()[-1] if body.text.strip() else '?'}",
                remote_traceback=body.text)
            exc.__cause__ = unpack_exception(body.exc_blob, body.text, f"in {slot.who()}")
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
                job.on_done(None, unpack_exception(body.exc_blob, body.text,
                                                   f"raised in {slot.who()} while writing {job.describe}"))
        elif kind is P.Kind.BYE:
            with self._lock:
                slot.state = SlotState.STOPPING
        else:
            logger.warning("unexpected %s from %s", kind.name, slot.who())

    def _init_request(self) -> P.InitRequest:
        cfg = self.config
        return P.InitRequest(
            sys_path=[p for p in sys.path if p], payload=self._payload, mode=self._mode,
            heartbeat_interval_s=cfg.heartbeat_interval_s, orphan_timeout_s=cfg.orphan_timeout_s,
            write_chunk_bytes=cfg.write_chunk_bytes, checksum=cfg.checksum, fsync=cfg.fsync,
            direct_io=cfg.direct_io, log_level=logging.getLogger("zckpt").getEffectiveLevel(),
        )

    def _send_heartbeats(self, router: zmq.Socket) -> None:
        for slot in self._slots:
            if slot.hello and slot.state in (SlotState.SPAWNING, SlotState.READY, SlotState.BUSY):
                try:
                    router.send_multipart([P.heartbeat_id(slot.index, slot.generation)]
                                          + P.encode(P.Kind.HEARTBEAT, P.Heartbeat(0, os.getpid())),
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
                if self._broken or self._stopping or self._killing:
                    arg.on_done(None, PoolClosedError("the checkpoint pool is not taking work"))
                else:
                    self._slots[arg.slot].queue.append(arg)
            elif what == "shutdown":
                self._stopping = True
                self._shutdown_deadline = arg
            elif what == "kill":
                self._killing = True
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
                if self._initial:
                    self._start_failed(slot, exc)
                else:
                    self._declare_dead(slot, f"{why} within {cfg.init_timeout_s:.1f}s", now)
                continue
            if slot.state in (SlotState.READY, SlotState.BUSY) and now - slot.last_seen > cfg.dead_after_s:
                self._declare_dead(slot, f"went silent (no heartbeat for {now - slot.last_seen:.2f}s, "
                                         f"limit {cfg.dead_after_s:.2f}s: hung or stopped)", now)
                continue
            if slot.job is not None and now > slot.job.deadline:
                self._declare_dead(slot, f"did not finish within save_timeout_s={cfg.save_timeout_s:.0f}s",
                                   now)
                continue
            if self._stopping and now > self._shutdown_deadline and slot.state is not SlotState.DEAD:
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
                logger.debug("dispatching %s (%s) to %s", job.describe, type(job.message).__name__, slot.who())
                if not self._send(router, slot, P.Kind.WRITE, job.message):
                    with self._lock:
                        slot.job = None
                        slot.state = SlotState.READY
                    slot.queue.appendleft(job)  # retried once its death or recovery is seen
            elif self._stopping and slot.state is SlotState.READY and not slot.queue:
                with self._lock:
                    slot.state = SlotState.STOPPING
                self._send(router, slot, P.Kind.TERMINATE)
            elif (self._stopping and slot.state is SlotState.SPAWNING):
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
    except Exception:
        new = PoolClosedError(str(exc))
    new.__cause__ = exc.__cause__ if exc.__cause__ is not None else exc
    return new
