"""S3-compatible object storage: a shard writer, ``s3://`` mirror roots, and reading back.

Layout: the checkpoint ``<name>`` under the root ``s3://bucket/prefix`` is the objects
``prefix/<name>/<file>`` (the same shard file names as on disk) and
``prefix/<name>/manifest.json``. Only the manifest object makes it a checkpoint, and it is
created last and conditionally (``PutObject`` with ``IfNoneMatch='*'``): a reader sees a
checkpoint whole or not at all, and an existing one is never overwritten. Shard objects
under a name without a manifest are leftovers of a save in progress or a failed one;
:func:`latest`, :func:`committed` and retention never see them.

- :class:`S3ShardWriter` is a :class:`zckpt.writers.ShardWriter` for ``s3://`` paths:
  one ``PutObject`` for a shard up to one part, else a multipart upload whose parts go
  out in parallel threads straight from the shared-memory mapping; a failure aborts the
  upload (``AbortMultipartUpload``) and throttling, 5xx answers and dropped connections
  raise :class:`zckpt.TransientWriteError` (the worker's retry path).
- A pool with ``PoolConfig(mirrors=("s3://bucket/prefix",))`` commits each save locally
  as always, and its workers upload the same shard files under the mirror, whose
  manifest is created after the local commit. A mirror that fails (an upload, the
  conditional create) is named in ``fut.mirror_errors`` and does not fail the save; the
  next save's commit uploads the newest checkpoint the mirror lacks (:func:`repair_mirror`).
- ``zckpt.load``, ``zckpt.verify``, ``zckpt.latest`` (and ``zckpt inspect``) accept
  ``s3://bucket/prefix[/name]`` and read the manifest object and ranged GETs of the
  shard objects, checking every chunk's checksum as for local files.

Endpoint, credentials and region come from boto3's standard configuration: the
environment (``AWS_ENDPOINT_URL`` for a non-AWS store such as MinIO, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``, ``AWS_PROFILE``),
``~/.aws/config``, or an instance role. Workers are spawned with the trainer's
environment, so whatever the trainer sees they see. ``ZCKPT_S3_PART_BYTES`` (default:
``PoolConfig.write_chunk_bytes``, at least 5 MiB) and ``ZCKPT_S3_MAX_CONCURRENCY``
(default 8 parts in flight per worker) tune a mirror's uploads.

boto3 is imported only when an ``s3://`` path is used: core zckpt does not require it.
This module must not import torch (workers import it).
"""

from __future__ import annotations

import errno
import io
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any, TypeGuard

from .errors import CorruptCheckpointError, TransientWriteError
from .manifest import (
    _PEEK_BYTES,
    _PEEK_RE,
    MANIFEST_NAME,
    Manifest,
    checksum_hex,
    parse_manifest,
    seal,
    unseal,
    with_commit_record,
)

__all__ = ["S3ShardWriter", "is_url", "split_url", "read_manifest", "latest", "committed", "commit", "discard",
           "repair_mirror", "apply_retention", "S3Object"]

logger = logging.getLogger(__name__)

SCHEME = "s3://"
MIN_PART_BYTES = 5 << 20       # S3's smallest part (but the last)
MAX_PARTS = 10_000             # S3's most parts in one upload
DEFAULT_CONCURRENCY = 8
_READ_BLOCK = 8 << 20          # a ranged GET is read in blocks of this (see S3Object.read_exact)
# Error codes worth another try (S3's own, and what other S3-compatible stores answer).
_TRANSIENT_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                              "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests",
                              "RequestTimeTooSkewed", "OperationAborted"})


# --- URLs ---------------------------------------------------------------------------------------
def is_url(path: Any) -> TypeGuard[str]:
    """Whether ``path`` names object storage (``s3://...``) rather than a local path."""
    return isinstance(path, str) and path.startswith(SCHEME)


def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> ``("bucket", "a/b")``; raises ValueError without a bucket."""
    if not is_url(url):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, key = url[len(SCHEME):].partition("/")
    if not bucket:
        raise ValueError(f"{url!r} names no bucket (expected s3://bucket/prefix)")
    return bucket, key.strip("/")


def _url(bucket: str, key: str) -> str:
    return f"{SCHEME}{bucket}/{key}" if key else f"{SCHEME}{bucket}"


def _parent(url: str) -> str:
    bucket, key = split_url(url)
    return _url(bucket, key.rpartition("/")[0])


def _child_prefix(key: str) -> str:
    return f"{key}/" if key else ""


# --- the client and its errors --------------------------------------------------------------------
_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
        "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE")
_clients: dict[tuple[Any, ...], Any] = {}
_clients_lock = threading.Lock()


def client(max_pool_connections: int = 2 * DEFAULT_CONCURRENCY) -> Any:
    """A boto3 S3 client configured from the standard AWS environment (one per process and
    configuration: clients are thread-safe, and creating one costs ~50 ms)."""
    key = (os.getpid(), max_pool_connections) + tuple(os.environ.get(k) for k in _ENV)
    with _clients_lock:
        c = _clients.get(key)
        if c is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError as exc:
                raise ImportError("s3:// paths need boto3: pip install boto3") from exc
            # Timeouts and attempts so that a store that stops answering fails a request
            # (then the worker's transient retries, then the mirror) well within the
            # pool's default stall_timeout_s (30 s), instead of the worker being taken
            # for hung and replaced: at most 2 x 12 s waiting for an answer, 5 s for a send.
            # AWS_MAX_ATTEMPTS / AWS_RETRY_MODE in the environment take precedence.
            retries = None if {"AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"} & set(os.environ) else \
                {"total_max_attempts": 2, "mode": "standard"}
            # boto3.client uses boto3's default session: handlers registered on its
            # events (boto3.DEFAULT_SESSION.events) apply to this client too.
            c = _clients[key] = boto3.client("s3", config=Config(
                max_pool_connections=max_pool_connections, connect_timeout=5, read_timeout=12, retries=retries))
    return c


def _os_error(exc: BaseException, what: str) -> BaseException:
    """An OSError for a botocore failure (transient ones as TransientWriteError); other
    exceptions are returned as they are. The worker's commit and retry paths and the
    mirror bookkeeping all speak OSError."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, NoCredentialsError
        from botocore.exceptions import ConnectionError as BotoConnectionError
    except ImportError:  # pragma: no cover - boto3 is there if a client was made
        return exc
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {}) or {}
        code = str(err.get("Code", ""))
        status = int((exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
        msg = f"{what}: {code or status}: {err.get('Message') or exc}"
        if status >= 500 or status == 429 or code in _TRANSIENT_CODES:
            return TransientWriteError(errno.EAGAIN, msg)
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
            return FileExistsError(errno.EEXIST, msg)
        if code in ("NoSuchKey", "NoSuchBucket", "NoSuchUpload", "404") or status == 404:
            return FileNotFoundError(errno.ENOENT, msg)
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403") or status == 403:
            return PermissionError(errno.EACCES, msg)
        return OSError(errno.EIO, msg)
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return TransientWriteError(errno.EAGAIN, f"{what}: {type(exc).__name__}: {exc}")
    if isinstance(exc, NoCredentialsError):
        return PermissionError(errno.EACCES, f"{what}: {exc} (set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or "
                                             "AWS_PROFILE)")
    if isinstance(exc, BotoCoreError):
        return OSError(errno.EIO, f"{what}: {type(exc).__name__}: {exc}")
    return exc


def _call(what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
    try:
        return fn(**kwargs)
    except Exception as exc:
        mapped = _os_error(exc, what)
        if mapped is exc:
            raise
        raise mapped from exc


# --- writing --------------------------------------------------------------------------------------
class _ViewStream(io.RawIOBase):
    """A read-only, seekable stream over a memoryview, so boto3 sends a part straight
    from shared memory.

    What boto3 copies: botocore and http.client read the stream in blocks (16 KiB per
    socket send; 1 MiB for the request checksum and, over plain HTTP, the SigV4 payload
    hash); each block becomes a short-lived ``bytes`` of that size. Never a copy of the
    part or of the shard. ``on_read`` is told of bytes read past the furthest point read
    before (a re-read after a retry or for the checksum pass counts once), which keeps the
    worker's progress counter moving while a large part is sent.
    """

    def __init__(self, view: memoryview, on_read: Callable[[int], None] | None = None) -> None:
        super().__init__()
        self._view = view
        self._pos = 0
        self._high = 0
        self._on_read = on_read

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def __len__(self) -> int:
        return len(self._view)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def _advance(self, n: int) -> None:
        self._pos += n
        if self._pos > self._high:
            if self._on_read is not None:
                self._on_read(self._pos - self._high)
            self._high = self._pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), len(self._view) - self._pos))
        with memoryview(b) as out, out.cast("B") as flat:
            flat[:n] = self._view[self._pos:self._pos + n]
        self._advance(n)
        return n

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        start = min(self._pos, end)
        with self._view[start:end] as piece:
            out = bytes(piece)
        self._advance(len(out))
        return out

    def close(self) -> None:
        self._view.release()
        super().close()


class S3ShardWriter:
    """Writes shard files to ``s3://bucket/key`` paths (a :class:`zckpt.writers.ShardWriter`).

    Args:
        part_bytes: Size of each part of a multipart upload (at least 5 MiB; grown so a
            shard never needs more than 10,000 parts). A shard of at most one part is
            sent with one ``PutObject``.
        max_concurrency: Parts in flight at once, each on its own thread.

    ``progress(nbytes)`` is called as each part's bytes are read out (see
    :class:`_ViewStream`); the calls of one file add up to its size. A failure aborts the
    multipart upload before it is raised; throttling, 5xx answers and dropped connections
    raise :class:`zckpt.TransientWriteError`, which a pool's worker retries.
    """

    def __init__(self, part_bytes: int = 64 << 20, max_concurrency: int = DEFAULT_CONCURRENCY) -> None:
        if part_bytes < MIN_PART_BYTES:
            raise ValueError(f"part_bytes must be at least {MIN_PART_BYTES} (S3's smallest part), got {part_bytes}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self.part_bytes = part_bytes
        self.max_concurrency = max_concurrency

    def part_size(self, nbytes: int) -> int:
        return max(self.part_bytes, -(-nbytes // MAX_PARTS))

    def write_file(self, path: str, data: memoryview, *, progress: Callable[[int], None], **kwargs: Any) -> None:
        bucket, key = split_url(path)
        c = client(max(2 * DEFAULT_CONCURRENCY, 2 * self.max_concurrency))
        lock = threading.Lock()

        def report(n: int) -> None:   # parts finish on several threads; the worker's counter is not atomic
            with lock:
                progress(n)

        n = len(data)
        part = self.part_size(n)
        if n <= part:
            stream = _ViewStream(data[:], report)
            try:
                _call(f"PutObject {path}", c.put_object, Bucket=bucket, Key=key, Body=stream, ContentLength=n)
            finally:
                stream.close()
            return
        self._multipart(c, path, bucket, key, data, part, report)

    def _multipart(self, c: Any, path: str, bucket: str, key: str, data: memoryview, part: int,
                   report: Callable[[int], None]) -> None:
        n = len(data)
        count = -(-n // part)
        upload_id = _call(f"CreateMultipartUpload {path}", c.create_multipart_upload, Bucket=bucket,
                          Key=key)["UploadId"]
        stop = threading.Event()

        def send(i: int) -> dict[str, Any]:
            if stop.is_set():   # another part failed: start no more
                raise RuntimeError("cancelled")
            off, end = i * part, min(n, (i + 1) * part)
            stream = _ViewStream(data[off:end], report)
            try:
                r = _call(f"UploadPart {i + 1}/{count} of {path}", c.upload_part, Bucket=bucket, Key=key,
                          UploadId=upload_id, PartNumber=i + 1, Body=stream, ContentLength=end - off)
            finally:
                stream.close()
            return {"ETag": r["ETag"], "PartNumber": i + 1}

        try:
            with ThreadPoolExecutor(min(self.max_concurrency, count), thread_name_prefix="zckpt-s3") as ex:
                futs = [ex.submit(send, i) for i in range(count)]
                wait(futs, return_when=FIRST_EXCEPTION)
                failed = [f for f in futs if f.done() and f.exception() is not None]
                if failed:
                    stop.set()
                    for f in futs:
                        f.cancel()
                    raise failed[0].exception()  # type: ignore[misc]
                parts = [f.result() for f in futs]
            # (leaving the with-block waited for every part in flight: none is sent after this)
            _call(f"CompleteMultipartUpload {path}", c.complete_multipart_upload, Bucket=bucket, Key=key,
                  UploadId=upload_id, MultipartUpload={"Parts": parts})
        except BaseException:
            stop.set()
            try:
                c.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            except Exception as exc:  # noqa: BLE001 - the original error matters more; discard() retries
                logger.warning("could not abort the multipart upload of %s (%s); a bucket lifecycle rule "
                               "(AbortIncompleteMultipartUpload) removes its parts", path, exc)
            raise

    def close(self) -> None:
        pass


def mirror_writer(default_part_bytes: int) -> S3ShardWriter:
    """The writer a worker uses for an ``s3://`` mirror: ``ZCKPT_S3_PART_BYTES`` (else
    ``default_part_bytes``, PoolConfig.write_chunk_bytes) and ``ZCKPT_S3_MAX_CONCURRENCY``."""
    part = int(os.environ.get("ZCKPT_S3_PART_BYTES") or max(MIN_PART_BYTES, default_part_bytes))
    threads = int(os.environ.get("ZCKPT_S3_MAX_CONCURRENCY") or DEFAULT_CONCURRENCY)
    return S3ShardWriter(part_bytes=part, max_concurrency=threads)


# --- reading --------------------------------------------------------------------------------------
class S3Object:
    """Ranged reads of one object: what the reader does with a shard file.

    :meth:`read_exact` reads into the caller's buffer in blocks of 8 MiB (urllib3's
    ``readinto`` reads into a temporary ``bytes`` first, so the block bounds that copy);
    ``seek``/``read`` serve :func:`zckpt.verify`'s streaming reads.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.bucket, self.key = split_url(url)
        self._client = client()
        self._pos = 0

    def read_exact(self, view: memoryview, offset: int) -> None:
        n = len(view)
        if n == 0:
            return
        body = _call(f"GetObject {self.url}", self._client.get_object, Bucket=self.bucket, Key=self.key,
                     Range=f"bytes={offset}-{offset + n - 1}")["Body"]
        try:
            done = 0
            while done < n:
                with view[done:min(n, done + _READ_BLOCK)] as block:
                    got = body.readinto(block)
                if not got:
                    raise CorruptCheckpointError(f"{self.url}: truncated (wanted bytes up to {offset + n}, "
                                                 f"got up to {offset + done})")
                done += got
        except CorruptCheckpointError:
            raise
        except Exception as exc:
            mapped = _os_error(exc, f"reading {self.url}")
            if mapped is exc:
                raise
            raise mapped from exc
        finally:
            body.close()

    def seek(self, offset: int) -> int:
        self._pos = offset
        return offset

    def read(self, n: int) -> bytes:
        buf = bytearray(n)
        try:
            with memoryview(buf) as view:
                self.read_exact(view, self._pos)
        except (CorruptCheckpointError, FileNotFoundError):
            return b""   # past the end: the callers report a short read as a mismatch
        self._pos += n
        return bytes(buf)

    def close(self) -> None:
        pass

    def __enter__(self) -> S3Object:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _list(url_prefix_key: tuple[str, str]) -> Iterator[dict[str, Any]]:
    """Every object under ``bucket``/``prefix`` (as ListObjectsV2 gives them)."""
    bucket, prefix = url_prefix_key
    c = client()
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        if token:
            kwargs["ContinuationToken"] = token
        page = _call(f"ListObjectsV2 s3://{bucket}/{prefix}", c.list_objects_v2, **kwargs)
        yield from page.get("Contents", [])
        if not page.get("IsTruncated"):
            return
        token = page.get("NextContinuationToken")


def _get(bucket: str, key: str, what: str, rng: str | None = None) -> bytes:
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if rng:
        kwargs["Range"] = rng
    body = _call(what, client().get_object, **kwargs)["Body"]
    try:
        return body.read()
    finally:
        body.close()


def read_manifest_body(url: str) -> dict[str, Any]:
    """The checked body of the manifest object of the checkpoint at ``url``.

    Raises:
        FileNotFoundError: nothing at all under ``url``.
        CorruptCheckpointError: no manifest object (not committed), or a damaged one.
    """
    bucket, key = split_url(url)
    mkey = f"{_child_prefix(key)}{MANIFEST_NAME}"
    try:
        raw = _get(bucket, mkey, f"GetObject {url}/{MANIFEST_NAME}")
    except FileNotFoundError:
        if next(iter(_list((bucket, _child_prefix(key)))), None) is None:
            raise FileNotFoundError(errno.ENOENT, "no checkpoint at this URL", url) from None
        raise CorruptCheckpointError(f"{url!r} has no {MANIFEST_NAME} object: not a committed zckpt "
                                     "checkpoint") from None
    body = unseal(raw, f"{url}/{MANIFEST_NAME}")
    parse_manifest(body, f"{url}/{MANIFEST_NAME}")
    return body


def read_manifest(url: str) -> Manifest:
    """:func:`zckpt.manifest.read_manifest` for an ``s3://`` checkpoint."""
    return parse_manifest(read_manifest_body(url), f"{url}/{MANIFEST_NAME}")


def check_objects(url: str, m: Manifest) -> list[str]:
    """The shard objects' URLs, each checked present with the manifest's size (one listing)."""
    bucket, key = split_url(url)
    sizes = {o["Key"]: int(o["Size"]) for o in _list((bucket, _child_prefix(key)))}
    out = []
    for f in m.files:
        okey = f"{_child_prefix(key)}{f.name}"
        ourl = _url(bucket, okey)
        size = sizes.get(okey)
        if size is None:
            raise CorruptCheckpointError(f"{ourl}: shard object is missing")
        if size != f.nbytes:
            raise CorruptCheckpointError(f"{ourl}: size {size} bytes, manifest says {f.nbytes} "
                                         f"({'truncated' if size < f.nbytes else 'extended'})")
        out.append(ourl)
    return out


# --- committed checkpoints under a root -----------------------------------------------------------
# (bucket, key, etag) -> (sequence, unix_time_ns) from the manifest's first bytes / the
# verified order key (None: does not verify). An object's ETag changes with its bytes.
_peeked: dict[tuple[str, str, str], tuple[int, int] | None] = {}
_verified: dict[tuple[str, str, str], tuple[int, int, int, str] | None] = {}
_cache_lock = threading.Lock()
_CACHE_MAX = 4096


def _remember(cache: dict[Any, Any], k: Any, v: Any) -> None:
    with _cache_lock:
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        cache[k] = v


def _manifests(root: str) -> list[tuple[str, str, str]]:
    """(name, key, etag) of every manifest object directly under ``root``'s checkpoints."""
    from .commit import is_temp_dir

    bucket, prefix = split_url(root)
    base = _child_prefix(prefix)
    out = []
    for o in _list((bucket, base)):
        name, _, rest = o["Key"][len(base):].partition("/")
        # An empty object is no manifest (a ranged read of it is refused with 416).
        if rest == MANIFEST_NAME and name and not is_temp_dir(name) and o.get("Size", 1) > 0:
            out.append((name, o["Key"], str(o.get("ETag", ""))))
    return out


def _hint(bucket: str, name: str, key: str, etag: str) -> tuple[int, int, int, str] | None:
    """The unverified order key from a manifest's first bytes (a ranged GET, cached)."""
    ck = (bucket, key, etag)
    if ck in _verified:
        return _verified[ck]
    if ck not in _peeked:
        try:
            head = _get(bucket, key, f"GetObject s3://{bucket}/{key}", f"bytes=0-{_PEEK_BYTES - 1}")
        except OSError as exc:   # gone or unreadable since the listing: not a checkpoint to rank
            logger.debug("skipping s3://%s/%s: %s", bucket, key, exc)
            return None
        m = _PEEK_RE.match(head)
        _remember(_peeked, ck, (int(m.group(1)), int(m.group(2))) if m else None)
    rec = _peeked[ck]
    if rec is None:
        return _verified_key(bucket, name, key, etag)
    return (1, rec[0], rec[1], name)


def _verified_key(bucket: str, name: str, key: str, etag: str) -> tuple[int, int, int, str] | None:
    ck = (bucket, key, etag)
    if ck in _verified:
        return _verified[ck]
    url = f"s3://{bucket}/{key}"
    try:
        m = parse_manifest(unseal(_get(bucket, key, f"GetObject {url}"), url), url)
    except (FileNotFoundError, CorruptCheckpointError) as exc:
        logger.debug("skipping %s: its manifest does not verify (%s)", url, exc)
        result = None
    else:
        if m.commit is not None:
            result = (1, m.commit.sequence, m.commit.unix_time_ns, name)
        else:
            created = m.created_unix if m.created_unix is not None else 0.0
            result = (0, 0, int(created * 1e9), name)
    _remember(_verified, ck, result)
    return result


def next_sequence(root: str) -> int:
    """1 + the largest commit sequence among the manifests directly under ``root``."""
    bucket, _ = split_url(root)
    top = 0
    for name, key, etag in _manifests(root):
        hint = _hint(bucket, name, key, etag)
        if hint is not None:
            top = max(top, hint[1])
    return top + 1


def committed(root: str) -> list[str]:
    """:func:`zckpt.commit.committed` for an ``s3://`` root: URLs, oldest first."""
    bucket, prefix = split_url(root)
    keyed = []
    for name, key, etag in _manifests(root):
        k = _verified_key(bucket, name, key, etag)
        if k is not None:
            keyed.append((k, _url(bucket, f"{_child_prefix(prefix)}{name}")))
    keyed.sort()
    return [u for _, u in keyed]


def latest(root: str) -> str | None:
    """:func:`zckpt.commit.latest` for an ``s3://`` root: ranked by the manifests' first
    bytes, then verified in full from the newest down."""
    bucket, prefix = split_url(root)
    hints = []
    for name, key, etag in _manifests(root):
        hint = _hint(bucket, name, key, etag)
        if hint is not None:
            hints.append((hint, name, key, etag))
    hints.sort(reverse=True)
    for hint, name, key, etag in hints:
        k = _verified_key(bucket, name, key, etag)
        if k is None:
            continue
        if k == hint:
            return _url(bucket, f"{_child_prefix(prefix)}{name}")
        done = committed(root)
        return done[-1] if done else None
    return None


# --- committing, discarding, repairing, retention --------------------------------------------------
def prepare(final: str) -> str:
    """Before uploading under ``final`` (a worker, for each shard it uploads; never the
    trainer, so a save's blocked time has no S3 round trip): check the bucket answers and
    ``final`` is not a committed checkpoint already, whose shard objects an upload would
    replace. Returns ``final``: the objects go straight under it, since only the manifest
    object, created last, makes it a checkpoint."""
    bucket, key = split_url(final)
    try:
        _call(f"HeadObject {final}/{MANIFEST_NAME}", client().head_object, Bucket=bucket,
              Key=f"{_child_prefix(key)}{MANIFEST_NAME}")
    except FileNotFoundError:
        return final
    raise FileExistsError(errno.EEXIST, "a checkpoint already exists here", final)


def commit(final: str, manifest: dict[str, Any]) -> None:
    """Create ``final``'s manifest object, if and only if there is none (IfNoneMatch='*').

    Stamped with the next commit sequence of ``final``'s root, as a local commit is. The
    shard objects are checked present and of the manifest's sizes first (one listing), so
    a manifest never names an object that is not there.

    Raises:
        FileExistsError: a manifest object exists already (it is left as it was).
        OSError: the store refused or could not be reached.
    """
    bucket, key = split_url(final)
    base = _child_prefix(key)
    sizes = {o["Key"]: int(o["Size"]) for o in _list((bucket, base))}
    for f in manifest.get("files", []):
        if sizes.get(base + f["name"]) != f["nbytes"]:
            raise OSError(errno.EIO, f"shard object {f['name']} is missing or of the wrong size; not committed",
                          final)
    # Every shard is uploaded: an upload still open under this name is a leftover (of a
    # worker that died mid-upload, its shard then written by its replacement). Abort it now,
    # or its parts would be stored (and billed) until a lifecycle rule removes them.
    try:
        _abort_uploads(bucket, base)
    except OSError as exc:
        logger.warning("could not list the open uploads under %s: %s", final, exc)
    body = with_commit_record(manifest, next_sequence(_parent(final)), time.time_ns())
    _call(f"PutObject {final}/{MANIFEST_NAME} (IfNoneMatch='*')", client().put_object, Bucket=bucket,
          Key=base + MANIFEST_NAME, Body=seal(body), IfNoneMatch="*", ContentType="application/json")


def _delete_all(bucket: str, prefix: str) -> None:
    keys = [o["Key"] for o in _list((bucket, prefix))]
    c = client()
    for i in range(0, len(keys), 1000):
        _call(f"DeleteObjects s3://{bucket}/{prefix}", c.delete_objects, Bucket=bucket,
              Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})


def _abort_uploads(bucket: str, prefix: str) -> int:
    c = client()
    n = 0
    page = _call(f"ListMultipartUploads s3://{bucket}/{prefix}", c.list_multipart_uploads, Bucket=bucket,
                 Prefix=prefix)
    for u in page.get("Uploads", []):
        try:
            c.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
            n += 1
        except Exception as exc:  # noqa: BLE001 - best effort; logged
            logger.warning("could not abort the multipart upload of s3://%s/%s: %s", bucket, u["Key"], exc)
    return n


def discard(url: str) -> None:
    """Remove what a failed save left under ``url``: abort its multipart uploads, and
    delete its shard objects unless a manifest object says it is a committed checkpoint
    (never deleted here). Best effort, like removing a local temp directory: failures are
    logged, never raised (a later discard, or a bucket lifecycle rule, finishes the job)."""
    try:
        bucket, key = split_url(url)
        base = _child_prefix(key)
        _abort_uploads(bucket, base)
        try:
            client().head_object(Bucket=bucket, Key=base + MANIFEST_NAME)
        except Exception as exc:  # noqa: BLE001
            if not isinstance(_os_error(exc, url), FileNotFoundError):
                raise
        else:
            return   # committed (by someone): not ours to delete
        _delete_all(bucket, base)
    except Exception as exc:  # noqa: BLE001
        logger.warning("could not clean up %s after a failed save: %s", url, exc)


def apply_retention(root: str, keep_last: int, protect: str | None = None) -> list[str]:
    """:func:`zckpt.commit.apply_retention` for an ``s3://`` root: the manifest object is
    deleted first (the checkpoint is then gone at once, never half there), then the rest."""
    done = committed(root)
    keep = set(done[-max(1, keep_last):])
    if protect:
        keep.add(protect.rstrip("/"))
    removed = []
    for url in done:
        if url in keep:
            continue
        bucket, key = split_url(url)
        _call(f"DeleteObject {url}/{MANIFEST_NAME}", client().delete_object, Bucket=bucket,
              Key=f"{_child_prefix(key)}{MANIFEST_NAME}")
        _delete_all(bucket, _child_prefix(key))
        removed.append(url)
        logger.info("retention: removed %s", url)
    return removed


def repair_mirror(primary_root: str, mirror_root: str, *, skip: str | None = None,
                  writer: S3ShardWriter | None = None) -> list[str]:
    """Upload to the ``s3://`` ``mirror_root`` the newest committed checkpoint of the local
    ``primary_root`` (other than ``skip``) that the mirror lacks, and commit it there.

    Each file is checked against the manifest's checksums before it is uploaded (a
    damaged checkpoint is never copied). Returns the URLs committed.
    """
    from .commit import committed as local_committed
    from .manifest import read_manifest_body as local_body

    w = writer or mirror_writer(64 << 20)
    copied = []
    for src in [p for p in local_committed(primary_root) if os.path.basename(p) != skip][-1:]:
        dst = f"{mirror_root.rstrip('/')}/{os.path.basename(src)}"
        try:
            prepare(dst)
        except FileExistsError:
            continue
        body = local_body(src)
        try:
            for f in body.get("files", []):
                _upload_verified(w, os.path.join(src, f["name"]), f"{dst}/{f['name']}", f,
                                 body.get("checksum") != "none")
            commit(dst, body)
        except BaseException:
            discard(dst)
            raise
        logger.warning("mirror %s lacked %s: uploaded it from %s", mirror_root, os.path.basename(src), primary_root)
        copied.append(dst)
    return copied


def _upload_verified(w: S3ShardWriter, path: str, url: str, record: dict[str, Any], checks: bool) -> None:
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size != record["nbytes"]:
            raise CorruptCheckpointError(f"{path}: size {size}, manifest says {record['nbytes']}; not uploaded")
        if size == 0:
            w.write_file(url, memoryview(b""), progress=lambda n: None)
            return
        with mmap.mmap(fh.fileno(), size, prot=mmap.PROT_READ) as mm, memoryview(mm) as view:
            if checks:
                for (off, n), want in zip(record.get("chunks", []), record.get("checksums", []), strict=False):
                    with view[off:off + n] as piece:
                        if checksum_hex(piece) != want:
                            raise CorruptCheckpointError(f"{path}: bytes [{off}, {off + n}) do not match the "
                                                         "manifest's checksum; not uploaded to the mirror")
            w.write_file(url, view, progress=lambda n: None)
