"""The checkpoint worker process.

Run as ``python -m zckpt.worker ENDPOINT SLOT GEN PARENT_PID HB_S ORPHAN_S KEY_FD``.

A worker is a direct child of the trainer. It:

1. sets a parent-death signal and checks its parent is still the trainer (so a trainer
   killed by SIGKILL takes its workers with it);
2. reads the pool's secret and its routing-id token from the inherited pipe ``KEY_FD``
   (never the command line or the environment, which other processes can read), closes
   it, connects a command socket (``w-<slot>-<gen>-<token>``) and a heartbeat socket
   (``h-<slot>-<gen>-<token>``, owned by a thread) to the trainer's ROUTER, and says
   HELLO; every message it sends carries the proof that it holds the secret;
3. on INIT, extends ``sys.path`` like the trainer's, unpickles (cloudpickle) and runs
   ``init_fn(*init_args)``, then builds its writer; any failure goes back as INIT_FAILED
   with the traceback, and the worker exits;
4. serves JOB messages (shard writes, compat state writes, arena mappings, commits)
   until TERMINATE, mapping the trainer's segments once and keeping them mapped; every
   job answers DONE or FAILED.

The heartbeat thread keeps beating while the main thread writes (``os.write`` and the
checksum release the GIL), carries a progress counter (busy is not hung), and ends the
process if the trainer disappears: parent changed, or silent past ``orphan_timeout_s``.
torch is imported only by compat's state-dict jobs. Jobs are dispatched on their type
through one table (``Worker._jobs``).
"""

from __future__ import annotations

import bisect
import faulthandler
import functools
import itertools
import logging
import os
import pickle
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq

from . import protocol as P
from ._proc import set_parent_death_signal
from .errors import ZckptError, pack_exception
from .s3 import is_url
from .writers import default_writer_factory, map_segment

# Not __name__: run with -m, this module is "__main__", outside the "zckpt" hierarchy
# whose level the trainer passes down.
logger = logging.getLogger("zckpt.worker")

EXIT_ORPHANED = 70

# The method each writer kind must have, as error messages spell it.
_WRITER_SIGNATURES = {"write_file": "write_file(path, data, *, progress, **kwargs)",
                      "write": "write(path, state_dict, **kwargs)"}


def _exit_orphaned(endpoint: str, parent_pid: int, why: str, settle_s: float = 0.0) -> None:
    """The trainer is gone: remove its socket directory (it cannot) and exit now.

    Only when the parent really changed: a worker giving up on a trainer that lives but
    went silent (stopped) must not delete the trainer's live socket. The parent-death signal
    can arrive while the dying trainer's other threads still hold its pid, so wait up
    to ``settle_s`` for the reparenting to show.
    """
    deadline = time.monotonic() + settle_s
    while os.getppid() == parent_pid and time.monotonic() < deadline:
        time.sleep(0.01)
    if os.getppid() != parent_pid:
        ipc_dir = os.path.dirname(endpoint[len("ipc://"):])
        if os.path.basename(ipc_dir).startswith(f"zckpt-{parent_pid}-"):
            shutil.rmtree(ipc_dir, ignore_errors=True)
    logger.error("%s; worker exits", why)
    os._exit(EXIT_ORPHANED)


def _on_sigterm(endpoint: str, parent_pid: int, signum: int, frame: Any) -> None:
    """SIGTERM handler: exit only if the trainer is gone; the live trainer decides otherwise."""
    if os.getppid() == parent_pid:
        logger.warning("ignoring SIGTERM: the trainer (pid %d) is alive and decides when its workers stop "
                       "(a preemption signals the whole process group)", parent_pid)
        return
    _exit_orphaned(endpoint, parent_pid, "received SIGTERM after the trainer died")


class _Heartbeat(threading.Thread):
    def __init__(self, ctx: zmq.Context, endpoint: str, identity: bytes, secret: bytes, parent_pid: int,
                 interval_s: float, orphan_timeout_s: float, progress: list[int]) -> None:
        super().__init__(name="zckpt-heartbeat", daemon=True)
        self._ctx, self._endpoint, self._identity = ctx, endpoint, identity
        self._secret = secret
        self._proof = P.proof(secret, identity)   # constant per routing id: computed once
        self._parent_pid = parent_pid
        self._interval_s = interval_s
        self._orphan_timeout_s = orphan_timeout_s
        self._progress = progress
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self._identity)
        sock.connect(self._endpoint)
        last_heard = time.monotonic()
        next_beat = 0.0
        try:
            while not self._stop_event.is_set():
                now = time.monotonic()
                if now >= next_beat:
                    msg = P.encode(P.Kind.HEARTBEAT, P.Heartbeat(self._progress[0], os.getpid()), self._proof)
                    try:
                        sock.send_multipart(msg, flags=zmq.NOBLOCK)
                    except zmq.Again:
                        pass  # trainer not reading: its silence is judged below
                    next_beat = now + self._interval_s
                wait_ms = max(1, int(min(next_beat - now, 0.25) * 1000))
                if sock.poll(wait_ms):
                    while sock.poll(0):
                        if _from_trainer(self._secret, self._identity, sock.recv_multipart()) is not None:
                            last_heard = time.monotonic()  # only the real trainer keeps us alive
                if os.getppid() != self._parent_pid:
                    _exit_orphaned(self._endpoint, self._parent_pid, f"trainer (pid {self._parent_pid}) is gone")
                if time.monotonic() - last_heard > self._orphan_timeout_s:
                    _exit_orphaned(self._endpoint, self._parent_pid,
                                   f"no heartbeat from the trainer for {time.monotonic() - last_heard:.1f}s")
        finally:
            sock.close(linger=0)


class Worker:
    """State of one worker process: sockets, writer, mapped segments."""

    def __init__(self, endpoint: str, slot: int, generation: int, parent_pid: int,
                 heartbeat_interval_s: float, orphan_timeout_s: float, secret: bytes, token: str) -> None:
        self.slot, self.generation, self.parent_pid = slot, generation, parent_pid
        self.ctx = zmq.Context()
        self.ctx.setsockopt(zmq.LINGER, 0)
        self.cmd = self.ctx.socket(zmq.DEALER)
        cmd_id = P.command_id(slot, generation, token)
        hb_id = P.heartbeat_id(slot, generation, token)
        self._proof = P.proof(secret, cmd_id)   # constant per routing id: computed once
        self.cmd.setsockopt(zmq.ROUTING_ID, cmd_id)
        self.cmd.connect(endpoint)
        self.progress = [0]
        self._secret, self._cmd_id = secret, cmd_id
        self.heartbeat = _Heartbeat(self.ctx, endpoint, hb_id, secret, parent_pid,
                                    heartbeat_interval_s, orphan_timeout_s, self.progress)
        self.orphan_timeout_s = orphan_timeout_s
        self.init: P.InitRequest | None = None
        self.writer: Any = None
        self._s3_writer: Any = None            # built at the first upload to an s3:// mirror
        self._maps: dict[str, Any] = {}        # segment key -> mmap (files mode)
        self._storages: dict[str, Any] = {}    # segment key -> (nbytes, torch storage) (state mode)
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="zckpt-hash")
        # One table from job type to handler: what a worker can do is read here.
        self._jobs: dict[type, Any] = {
            P.WriteFiles: self._write_files, P.MapSegments: self._map_segments,
            P.CommitJob: self._commit, P.WriteState: self._write_state,
        }

    def send(self, kind: P.Kind, body: Any = P.EMPTY) -> None:
        self.cmd.send_multipart(P.encode(kind, body, self._proof))

    def recv(self, timeout_s: float) -> tuple[P.Kind, Any] | None:
        if not self.cmd.poll(int(timeout_s * 1000)):
            return None
        header = _from_trainer(self._secret, self._cmd_id, self.cmd.recv_multipart())
        if header is None:
            return None
        try:
            # Trusted (pickle allowed): the sender proved it holds the pool's secret,
            # which only the trainer and its workers have.
            return header.kind, P.decode_body(header, trusted=True)
        except P.ProtocolError as exc:
            logger.error("dropping bad message from trainer: %s", exc)
            return None

    def run(self) -> int:
        self.heartbeat.start()
        self.send(P.Kind.HELLO, P.Hello(os.getpid(), self.slot, self.generation))
        deadline = time.monotonic() + self.orphan_timeout_s
        while self.init is None:
            if time.monotonic() > deadline:
                logger.error("no INIT from the trainer within %.1fs", self.orphan_timeout_s)
                return 2
            msg = self.recv(0.5)
            if msg is None:
                continue
            kind, body = msg
            if kind is P.Kind.TERMINATE:
                self.send(P.Kind.BYE)
                return 0
            if kind is P.Kind.INIT:
                self.init = body
        if not self._initialize(self.init):
            return 1
        self.send(P.Kind.INIT_OK)
        while True:
            msg = self.recv(1.0)
            if msg is None:
                continue
            kind, body = msg
            if kind is P.Kind.JOB:
                self._serve(body)
            elif kind is P.Kind.TERMINATE:
                self._close_writer()
                self.send(P.Kind.BYE)
                return 0
            else:
                logger.warning("ignoring unexpected %s", kind.name)

    def _initialize(self, req: P.InitRequest) -> bool:
        logging.getLogger("zckpt").setLevel(req.log_level)
        for entry in req.sys_path:  # functions pickled by reference must import here too
            if entry not in sys.path:
                sys.path.append(entry)
        phase = "unpickling init_fn / writer_factory"
        try:
            import cloudpickle  # noqa: F401  (cloudpickle payloads need it importable)
            init_fn, init_args, factory, factory_kwargs = pickle.loads(req.payload)
            if init_fn is not None:
                phase = "init_fn"
                init_fn(*init_args)
            phase = "writer_factory"
            if factory is None:
                self.writer = default_writer_factory(req.write_chunk_bytes, req.fsync, req.direct_io)
            else:
                self.writer = factory(**factory_kwargs)
            if not callable(getattr(self.writer, req.writer_method, None)):
                raise TypeError(f"writer_factory returned {type(self.writer).__name__}, which has no "
                                f"{_WRITER_SIGNATURES.get(req.writer_method, req.writer_method)} method")
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the trainer
            (exc_type, exc_args), text = pack_exception(exc)
            logger.error("worker %d failed in %s:\n%s", self.slot, phase, text)
            self.send(P.Kind.INIT_FAILED, P.ErrorReport(None, exc_type, exc_args, text, phase))
            return False
        return True

    def _serve(self, job: Any) -> None:
        logger.debug("worker %d: %s job %d", self.slot, type(job).__name__, job.job_id)
        try:
            run = self._jobs.get(type(job))
            if run is None:
                raise TypeError(f"this worker runs no {P.job_name(job)} job")
            result = run(job)
        except BaseException as exc:  # noqa: BLE001
            (exc_type, exc_args), text = pack_exception(exc)
            logger.error("worker %d %s job %d failed:\n%s", self.slot, P.job_name(job), job.job_id, text)
            self.send(P.Kind.FAILED, P.ErrorReport(job.job_id, exc_type, exc_args, text, P.job_name(job)))
            return
        self.send(P.Kind.DONE, result)

    def _add_progress(self, nbytes: int) -> None:
        self.progress[0] += nbytes

    def _drop_unlisted(self, live_keys: list[str]) -> None:
        live = set(live_keys)
        for key in [k for k in self._maps if k not in live]:
            self._maps.pop(key).close()
        for key in [k for k in self._storages if k not in live]:
            del self._storages[key]

    def _commit(self, job: P.CommitJob) -> P.JobResult:
        """Commit the primary, then each mirror; a mirror that fails does not fail the save.

        The promise (README, "Mirrors"): ``result()`` returns once the primary is
        committed. Each mirror is committed right after it; one that cannot be (its disk
        full or gone, or a power loss in between) is completed by the next save's commit,
        which first copies the primary's previous checkpoint into any mirror lacking it.
        """
        from .commit import apply_retention, commit_dir, discard, fsync_created, repair_mirror

        if job.fsync:
            fsync_created(job.created)   # else a power loss could take the new parents away
        commit_dir(job.tmp_dirs[0], job.finals[0], job.manifest, fsync=job.fsync)
        committed = [job.finals[0]]
        errors: list[str] = []
        primary_root = os.path.dirname(job.finals[0])
        for tmp, final in zip(job.tmp_dirs[1:], job.finals[1:], strict=True):
            try:
                repair_mirror(primary_root, os.path.dirname(final), fsync=job.fsync,
                              skip=os.path.basename(final))
            except (OSError, ValueError, ZckptError) as exc:   # the earlier one stays missing there: said, not fatal
                errors.append(f"{os.path.dirname(final)}: completing it from {primary_root} failed: "
                              f"{type(exc).__name__}: {exc}")
            try:
                commit_dir(tmp, final, job.manifest, fsync=job.fsync)
                committed.append(final)
            except OSError as exc:
                errors.append(f"{final}: {type(exc).__name__}: {exc}")
                discard(tmp)
        if job.keep_last is not None:
            for final in committed:
                try:
                    apply_retention(os.path.dirname(final), job.keep_last, protect=final)
                except OSError as exc:   # housekeeping: the save is committed; the next one tries again
                    logger.warning("retention under %s failed: %s", os.path.dirname(final), exc)
        return P.JobResult(job.job_id, [], errors)

    def _map_segments(self, job: P.MapSegments) -> P.JobResult:
        assert self.init is not None
        self._drop_unlisted(job.live_keys)
        for seg in job.segments:
            self._mapping(seg)
        # Warm what the first real save would otherwise pay for: the hash thread and
        # the commit module.
        self._hasher.submit(int).result()
        from . import commit  # noqa: F401
        return P.JobResult(job.job_id, [])

    def _mapping(self, seg: P.SegmentRef) -> Any:
        """The cached read-only mapping of an arena segment holding shard file images."""
        mm = self._maps.get(seg.key)
        if mm is None:
            mm = self._maps[seg.key] = map_segment(seg.path, seg.nbytes)
        return mm

    def _write_one(self, path: str, data: Any, kwargs: dict[str, Any],
                   call: Callable[..., None] | None = None) -> int:
        """Have the writer store ``data`` at ``path`` (``call``: the writer method, by
        default ``write_file``); retry a TransientWriteError with backoff (see its
        docstring). Returns how many retries it took."""
        from .errors import TransientWriteError
        assert self.init is not None
        write = call if call is not None else self.writer.write_file
        for attempt in range(self.init.transient_retries + 1):
            if not is_url(path) and os.path.lexists(path):   # a partial file: of a dead worker's attempt, or ours
                os.unlink(path)
            try:
                write(path, data, progress=self._add_progress, **kwargs)
                return attempt
            except TransientWriteError as exc:
                if attempt == self.init.transient_retries:
                    raise
                delay = min(5.0, 0.1 * 2 ** attempt)
                logger.warning("transient failure writing %s (%s); retry %d in %.1fs", path, exc, attempt + 1,
                               delay)
                time.sleep(delay)   # a bounded backoff, not synchronisation
        raise AssertionError("unreachable")

    def _write_files(self, job: P.WriteFiles) -> P.JobResult:
        assert self.init is not None
        self._drop_unlisted(job.live_keys)
        results = []
        mirror_errors: list[str] = []   # s3:// mirrors whose upload failed: the mirror's failure, not the save's
        for task in job.files:
            mm = self._mapping(task.segment)
            if task.runs is not None:
                results.append(self._write_gathered(job, task, mm))
                continue
            with memoryview(mm) as whole, whole[task.offset: task.offset + task.nbytes] as data:
                sums = None
                if self.init.checksum != "none":
                    sums = self._hasher.submit(_checksums, data, task.chunks)
                t0 = time.perf_counter()
                retries = 0
                for i, d in enumerate(job.dirs):
                    if i and is_url(d):
                        retries += self._write_url(d, task.name, data, mirror_errors)
                        continue
                    retries += self._write_one(os.path.join(d, task.name), data, job.kwargs)
                write_s = time.perf_counter() - t0
                digests, hash_s = sums.result() if sums is not None else ([], 0.0)
            results.append(P.FileResult(task.name, task.nbytes, digests, write_s, hash_s, retries))
        return P.JobResult(job.job_id, results, mirror_errors)

    def _write_url(self, root: str, name: str, data: memoryview, mirror_errors: list[str]) -> int:
        """Upload a shard to an ``s3://`` mirror (zckpt.s3). A failure (after the writer
        aborted its upload, and after the transient retries) is recorded as
        ``"<root>: <error>"``: the trainer leaves that mirror out of the commit."""
        assert self.init is not None
        if any(e.startswith(f"{root}: ") for e in mirror_errors):
            return 0   # failed already in this job
        try:
            from .s3 import mirror_writer, prepare
            if self._s3_writer is None:
                self._s3_writer = mirror_writer(self.init.write_chunk_bytes)
            prepare(root)   # FileExistsError if a checkpoint is committed there: never overwritten
            return self._upload(f"{root}/{name}", data)
        except Exception as exc:  # noqa: BLE001 - the mirror's failure, reported with the result
            logger.error("worker %d: upload of %s to %s failed: %s", self.slot, name, root, exc)
            mirror_errors.append(f"{root}: {type(exc).__name__}: {exc}")
            return 0

    def _upload(self, url: str, data: memoryview) -> int:
        """One shard to an object store: a TransientWriteError (throttling, a 5xx) is retried
        with backoff while the upload is younger than MIRROR_RETRY_WINDOW_S. A store that
        does not answer makes each attempt last up to 2 x 12 s (zckpt.s3's client): retrying
        those would outlast stall_timeout_s (30 s) and get this worker declared hung, which
        fails the local save too; a mirror that fails instead is left out of this save and
        completed by the next commit. Returns how many retries it took."""
        from .errors import TransientWriteError
        assert self.init is not None and self._s3_writer is not None
        t0 = time.monotonic()
        for attempt in range(self.init.transient_retries + 1):
            try:
                self._s3_writer.write_file(url, data, progress=self._add_progress)
                return attempt
            except TransientWriteError as exc:
                delay = min(5.0, 0.1 * 2 ** attempt)
                if attempt == self.init.transient_retries or time.monotonic() - t0 + delay > MIRROR_RETRY_WINDOW_S:
                    raise
                logger.warning("transient failure uploading %s (%s); retry %d in %.1fs", url, exc, attempt + 1, delay)
                time.sleep(delay)   # a bounded backoff, not synchronisation
        raise AssertionError("unreachable")

    def _write_gathered(self, job: P.WriteFiles, task: P.FileTask, mm: Any) -> P.FileResult:
        """A file made of several ranges of one segment (see FileTask.runs): the writer's
        ``write_parts`` stores them in order without joining them; a writer without one
        gets them joined into one buffer first (one copy, in this process)."""
        assert self.init is not None and task.runs is not None
        whole = memoryview(mm)
        parts = [whole[off: off + n] for off, n in task.runs]
        try:
            sums = None
            if self.init.checksum != "none":
                sums = self._hasher.submit(_gathered_checksums, parts, task.chunks)
            t0 = time.perf_counter()
            retries = 0
            for d in job.dirs:
                retries += self._write_parts(os.path.join(d, task.name), parts, job.kwargs)
            write_s = time.perf_counter() - t0
            digests, hash_s = sums.result() if sums is not None else ([], 0.0)
        finally:
            for part in parts:
                part.release()
            whole.release()
        return P.FileResult(task.name, task.nbytes, digests, write_s, hash_s, retries)

    def _write_parts(self, path: str, parts: list[memoryview], kwargs: dict[str, Any]) -> int:
        write_parts = getattr(self.writer, "write_parts", None)
        if write_parts is None:
            joined = memoryview(b"".join(parts))
            return self._write_one(path, joined, kwargs)
        return self._write_one(path, parts, kwargs, call=write_parts)

    def _write_state(self, job: P.WriteState) -> P.JobResult:
        import torch

        from .tree import load_skeleton, rebuild_tensor

        self._drop_unlisted(job.live_keys)
        # One storage per caller storage, of exactly its size: torch.save in the writer
        # then writes that storage and nothing of the arena around it, and tensors share
        # a storage here exactly where they shared one in the trainer.
        storages: list[Any] = []
        for spec in job.storages:
            if spec.segment is None:
                storages.append(torch.UntypedStorage(0))
            elif spec.cacheable:
                storages.append(self._state_storage(spec.segment, spec.nbytes))
            else:  # the caller's own shared memory: mapped for this job only
                storages.append(torch.UntypedStorage.from_file(spec.segment.path, shared=True, nbytes=spec.nbytes))
        built: dict[int, Any] = {}

        def tensor(index: int) -> Any:
            t = built.get(index)
            if t is None:
                ts = job.tensors[index]
                t = built[index] = rebuild_tensor(
                    storages[ts.storage], getattr(torch, ts.dtype), ts.storage_offset, ts.shape, ts.stride,
                    requires_grad=ts.requires_grad, is_param=ts.is_param, conj=ts.conj, neg=ts.neg)
            return t

        def storage(sid: int, dtype: Any) -> Any:
            if dtype is None:
                return storages[sid]
            return torch.storage.TypedStorage(wrap_storage=storages[sid], dtype=dtype, _internal=True)

        # The trainer is this worker's parent and the only peer that can reach it: its
        # pickle is trusted as the original CheckpointProcess trusts its pipe.
        state_dict = load_skeleton(job.tree, tensor, storage, weights_only=False)
        try:
            self.writer.write(path=job.path, state_dict=state_dict, **job.kwargs)
        finally:
            # Nothing of this job outlives it (no cycle holds it either): the caller's
            # own shared memory is unmapped now, not at the next garbage collection.
            built.clear()
            storages.clear()
            state_dict = None
        return P.JobResult(job.job_id, [])

    def _state_storage(self, seg: P.SegmentRef, nbytes: int) -> Any:
        """A cached storage of exactly ``nbytes`` over an arena segment (one per segment)."""
        cached = self._storages.get(seg.key)
        if cached is None or cached[0] != nbytes:
            import torch
            storage = torch.UntypedStorage.from_file(seg.path, shared=True, nbytes=nbytes)
            self._storages[seg.key] = cached = (nbytes, storage)
        return cached[1]

    def _close_writer(self) -> None:
        close = getattr(self.writer, "close", None)
        if callable(close):
            try:
                close()
            except Exception:
                logger.exception("writer.close() raised")

    def close(self) -> None:
        self.heartbeat.stop()
        self.heartbeat.join(timeout=2.0)
        self._hasher.shutdown(wait=False)
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:
                pass
        self._maps.clear()
        self.cmd.close(linger=0)
        self.ctx.term()


def _checksums(data: memoryview, chunks: list[tuple[int, int]]) -> tuple[list[str], float]:
    import xxhash

    t0 = time.perf_counter()
    out = []
    for off, n in chunks:
        with data[off: off + n] as piece:
            out.append(xxhash.xxh3_64_hexdigest(piece))
    return out, time.perf_counter() - t0


#: Retries of a mirror upload stop this long after it began (see Worker._upload).
MIRROR_RETRY_WINDOW_S = 10.0


def _gathered_checksums(parts: list[memoryview], chunks: list[tuple[int, int]]) -> tuple[list[str], float]:
    """Checksums of ``chunks`` (file offset, nbytes) of the file that ``parts`` make in
    order; a chunk lies within one part (zckpt.dcp makes one chunk per item)."""
    import xxhash

    t0 = time.perf_counter()
    starts = list(itertools.accumulate((len(p) for p in parts), initial=0))
    out = []
    for off, n in chunks:
        if n == 0:
            out.append(xxhash.xxh3_64_hexdigest(b""))
            continue
        i = bisect.bisect_right(starts, off) - 1
        if not 0 <= i < len(parts) or off + n > starts[i + 1]:
            raise ValueError(f"checksum range [{off}, {off + n}) does not lie within one part of the file")
        with parts[i][off - starts[i]: off - starts[i] + n] as piece:
            out.append(xxhash.xxh3_64_hexdigest(piece))
    return out, time.perf_counter() - t0


def _from_trainer(secret: bytes, routing_id: bytes, frames: list[bytes]) -> P.Header | None:
    """The header of a message the trainer proved it sent to ``routing_id``; None (logged) otherwise.

    A process of the same user could replace the socket file and be the peer a worker
    connects to; without the secret its messages (an INIT with a payload to unpickle)
    are dropped here, before any body is decoded.
    """
    try:
        header = P.split(frames)
    except P.ProtocolError as exc:
        logger.error("dropping bad message from the trainer's socket: %s", exc)
        return None
    if not P.check_proof(secret, P.trainer_identity(routing_id), header):
        logger.error("dropping %s without the trainer's proof", header.kind.name)
        return None
    return header


def read_key(fd: int) -> tuple[bytes, str]:
    """Read (secret, routing-id token) from the pipe the trainer passed, then close it.

    Blocks until the trainer has written and closed its end (it writes before starting
    the process, so at once). Raises ValueError if the pipe holds anything else.
    """
    want = P.SECRET_BYTES + 2 * P.TOKEN_BYTES
    data = b""
    try:
        while len(data) <= want:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    if len(data) != want:
        raise ValueError(f"key pipe held {len(data)} bytes, expected {want}")
    return data[:P.SECRET_BYTES], data[P.SECRET_BYTES:].decode("ascii")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    endpoint, slot, generation, parent_pid = args[0], int(args[1]), int(args[2]), int(args[3])
    hb_s, orphan_s = float(args[4]), float(args[5])
    secret, token = read_key(int(args[6]))
    faulthandler.enable()  # a crash leaves a stack on stderr
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: where is it stuck?
    # Ctrl-C reaches the whole process group: the trainer decides what happens (it may
    # want to save one last checkpoint), so workers ignore SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM means two things here. The trainer's death (even by SIGKILL) sends it as
    # the parent-death signal: then the handler removes the trainer's socket directory
    # and exits. But preemption (SLURM, Kubernetes) sends it to the whole process group
    # while the trainer lives, and the trainer's handler may want to finish the save in
    # flight and save once more: so while the parent is still the trainer, it is ignored.
    # A death signal that arrives before the reparenting shows is ignored too; the
    # heartbeat thread's getppid() check (every <= 0.25 s) then ends the worker, and
    # also covers a main thread stuck in a long system call.
    signal.signal(signal.SIGTERM, functools.partial(_on_sigterm, endpoint, parent_pid))
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent_pid:  # the trainer died before the signal was armed
        _exit_orphaned(endpoint, parent_pid, "trainer died before the worker started")
    logging.basicConfig(
        level=logging.WARNING,
        format=f"zckpt-worker[slot={slot} gen={generation} pid=%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    worker = Worker(endpoint, slot, generation, parent_pid, hb_s, orphan_s, secret, token)
    try:
        return worker.run()
    finally:
        worker.close()


if __name__ == "__main__":
    sys.exit(main())
