"""S3-compatible object storage: s3:// mirrors, reading s3:// checkpoints, failures.

Against moto's S3 server on 127.0.0.1 (a free port), started once for the module in this
process and stopped at teardown. The pool's workers are spawned with the trainer's
environment (zckpt.supervisor copies os.environ), so the endpoint and credentials set
here with monkeypatch reach them. Faults are injected through botocore's event hooks,
registered by the workers' init_fn (tests/_s3_faults.py).
"""

from __future__ import annotations

import os
import time
import uuid

import pytest
import torch

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")

import zckpt  # noqa: E402
from zckpt import PoolConfig  # noqa: E402
from zckpt import s3 as S3  # noqa: E402

pytestmark = pytest.mark.timeout(180)

CONFIG = os.path.join(os.path.dirname(__file__), "..", "bench", "configs", "fanout-2-s3-mirror.toml")
MiB = 1 << 20


@pytest.fixture(scope="module")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def bucket(moto_endpoint, monkeypatch):
    """A fresh bucket; the endpoint and credentials in the environment (for the workers too)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ZCKPT_S3_PART_BYTES", str(5 * MiB))   # S3's smallest part: multipart at test sizes
    name = f"zckpt-{uuid.uuid4().hex[:12]}"
    client = S3.client()
    client.create_bucket(Bucket=name)
    return name


def _keys(bucket: str, prefix: str) -> list[str]:
    return sorted(o["Key"] for o in S3.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []))


def _uploads(bucket: str) -> list[str]:
    return [u["Key"] for u in S3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def _wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)   # polling cadence; the predicate decides


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(1536, 1024, generator=g)                       # 6 MiB: a multipart shard (5 MiB parts)
    return {"w": w, "tied": w, "wt": w.t(), "b": torch.randn(2048, 1024, generator=g).to(torch.bfloat16),
            "i": torch.arange(7, dtype=torch.int64) + seed, "step": seed, "name": f"run-{seed}"}


def _same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k, v in b.items():
        if isinstance(v, torch.Tensor):
            assert a[k].dtype == v.dtype and a[k].shape == v.shape and a[k].stride() == v.stride(), k
            assert torch.equal(a[k], v), k
        else:
            assert a[k] == v, k
    assert a["tied"].untyped_storage().data_ptr() == a["w"].untyped_storage().data_ptr()


def _config(root: str, **kw) -> PoolConfig:
    return PoolConfig(num_workers=2, fsync=False, heartbeat_interval_s=0.2, init_timeout_s=60.0, mirrors=(root,),
                      **kw)


def test_the_s3_mirror_config_loads():
    cfg = PoolConfig.from_toml(CONFIG)
    assert cfg.num_workers == 2 and len(cfg.mirrors) == 1 and cfg.mirrors[0].startswith("s3://")  # not made relative
    with pytest.raises(ValueError, match="names no bucket"):
        PoolConfig(mirrors=("s3:///prefix",))


@pytest.mark.timeout(180)
def test_save_with_an_s3_mirror_then_load_verify_latest_from_s3(make_pool, bucket, tmp_path):
    root = f"s3://{bucket}/ckpts"
    pool = make_pool(config=_config(root))
    sds = {step: _state(step) for step in (1, 2)}
    for step, sd in sds.items():
        fut = pool.save(sd, tmp_path / "main" / f"step-{step}")
        assert fut.result(timeout=120) == str(tmp_path / "main" / f"step-{step}")
        assert fut.mirror_errors == []
    assert _uploads(bucket) == []
    keys = _keys(bucket, "ckpts/step-1/")
    assert "ckpts/step-1/manifest.json" in keys and len(keys) == 3     # two shards + the manifest
    etags = [S3.client().head_object(Bucket=bucket, Key=k)["ETag"] for k in keys if k.endswith(".safetensors")]
    assert any("-" in e for e in etags)   # at least one shard went as a multipart upload

    assert zckpt.latest(root) == f"{root}/step-2"
    assert zckpt.commit.committed(root) == [f"{root}/step-1", f"{root}/step-2"]
    for step, sd in sds.items():
        _same(zckpt.load(f"{root}/step-{step}"), sd)
        summary = zckpt.verify(f"{root}/step-{step}")
        assert summary["files"] == 2 and summary["bytes_checked"] > 6 * MiB
    assert zckpt.load_metadata(f"{root}/step-1") is None
    from zckpt.cli import main as cli
    assert cli(["inspect", f"{root}/step-1"]) == 0 and cli(["verify", f"{root}/step-1"]) == 0
    assert cli(["latest", root]) == 0
    # load(into=...) reads straight into existing tensors, from S3 as from disk.
    target = {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else v) for k, v in sds[1].items()}
    target["tied"] = target["w"]
    zckpt.load(f"{root}/step-1", into=target)
    assert torch.equal(target["w"], sds[1]["w"]) and torch.equal(target["b"], sds[1]["b"])

    # A damaged shard object is caught by the checksums, naming the object.
    shard = next(k for k in _keys(bucket, "ckpts/step-2/") if k.endswith(".safetensors"))
    raw = bytearray(S3.client().get_object(Bucket=bucket, Key=shard)["Body"].read())
    raw[-1] ^= 0xFF
    S3.client().put_object(Bucket=bucket, Key=shard, Body=bytes(raw))
    with pytest.raises(zckpt.CorruptCheckpointError, match="checksum mismatch"):
        zckpt.verify(f"{root}/step-2")
    with pytest.raises(zckpt.CorruptCheckpointError, match="checksum mismatch"):
        zckpt.load(f"{root}/step-2")
    # Not a checkpoint: a name without a manifest object, and nothing at all.
    S3.client().put_object(Bucket=bucket, Key="ckpts/step-9/shard.safetensors", Body=b"x")
    with pytest.raises(zckpt.CorruptCheckpointError, match="no manifest.json"):
        zckpt.load(f"{root}/step-9")
    with pytest.raises(FileNotFoundError):
        zckpt.load(f"{root}/nothing")
    assert zckpt.latest(root) == f"{root}/step-2"   # step-9 is no checkpoint; step-2's manifest is whole
    assert zckpt.latest(f"s3://{bucket}/empty") is None


@pytest.mark.timeout(240)
def test_a_failed_upload_leaves_no_visible_mirror_checkpoint_and_the_next_save_completes_it(
        make_pool, bucket, tmp_path):
    from _s3_faults import fail_upload_part

    root = f"s3://{bucket}/ckpts"
    main = tmp_path / "main"
    fault = tmp_path / "fault-on"
    fault.touch()
    pool = make_pool(config=_config(root), init_fn=fail_upload_part, init_args=("step-2/", 2, str(fault)))
    sd1, sd2, sd3 = _state(1), _state(2), _state(3)
    assert pool.save(sd1, main / "step-1").result(timeout=120) and _uploads(bucket) == []

    fut = pool.save(sd2, main / "step-2")
    assert fut.result(timeout=120) == str(main / "step-2")         # the primary decides
    assert fut.mirror_errors and all(e.startswith(f"{root}/step-2: ") for e in fut.mirror_errors)
    assert "injected fault" in fut.mirror_errors[0]
    assert "ckpts/step-2/manifest.json" not in _keys(bucket, "ckpts/step-2/")   # never visible
    assert _uploads(bucket) == []                                            # the upload was aborted
    _wait_until(lambda: _keys(bucket, "ckpts/step-2/") == [], 30, "the failed mirror's objects to be removed")
    assert zckpt.latest(root) == f"{root}/step-1"
    _same(zckpt.load(f"{root}/step-1"), sd1)                                 # the earlier one is intact
    _same(zckpt.load(main / "step-2"), sd2)                                  # and so is the primary
    _same(zckpt.load(main / "step-1"), sd1)
    zckpt.verify(main / "step-2")

    # The next save's commit first uploads the checkpoint the mirror lacks, then its own.
    fault.unlink()
    fut = pool.save(sd3, main / "step-3")
    assert fut.result(timeout=120) and fut.mirror_errors == []
    assert zckpt.commit.committed(root) == [f"{root}/step-1", f"{root}/step-2", f"{root}/step-3"]
    _same(zckpt.load(f"{root}/step-2"), sd2)
    _same(zckpt.load(f"{root}/step-3"), sd3)
    assert _uploads(bucket) == []


@pytest.mark.timeout(180)
def test_throttling_is_retried_by_the_worker(make_pool, bucket, tmp_path):
    from _s3_faults import throttle_first_part

    root = f"s3://{bucket}/ckpts"
    pool = make_pool(config=_config(root), init_fn=throttle_first_part, init_args=(1,))
    sd = _state(5)
    fut = pool.save(sd, tmp_path / "main" / "step-5")
    assert fut.result(timeout=120) and fut.mirror_errors == []
    assert fut.timings["write_retries"] >= 1
    _same(zckpt.load(f"{root}/step-5"), sd)
    assert _uploads(bucket) == []


@pytest.mark.timeout(180)
def test_the_conditional_create_never_overwrites_a_manifest(make_pool, bucket, tmp_path):
    root = f"s3://{bucket}/ckpts"
    pool = make_pool(config=_config(root))
    sd = _state(1)
    pool.save(sd, tmp_path / "main" / "step-1").result(timeout=120)
    key = "ckpts/step-1/manifest.json"
    before = S3.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    body = zckpt.manifest.read_manifest_body(str(tmp_path / "main" / "step-1"))
    with pytest.raises(FileExistsError):
        S3.commit(f"{root}/step-1", dict(body, metadata={"other": True}))
    assert S3.client().get_object(Bucket=bucket, Key=key)["Body"].read() == before
    # Through the pool: the mirror already has the name, so it is left out (never overwritten).
    os.rename(tmp_path / "main" / "step-1", tmp_path / "main" / "moved")
    fut = pool.save(_state(2), tmp_path / "main" / "step-1")
    assert fut.result(timeout=120) and "already exists" in fut.mirror_errors[0]
    assert S3.client().get_object(Bucket=bucket, Key=key)["Body"].read() == before
    _same(zckpt.load(f"{root}/step-1"), sd)


@pytest.mark.timeout(120)
def test_an_s3_primary_path_is_refused_clearly(make_pool, bucket):
    pool = make_pool(config=PoolConfig(num_workers=1, fsync=False, heartbeat_interval_s=0.2))
    with pytest.raises(ValueError, match="mirror root, not as the primary"):
        pool.save({"a": torch.ones(2)}, f"s3://{bucket}/ckpts/step-1")
    assert _keys(bucket, "") == []


def test_the_writer_uploads_parts_from_a_memoryview_and_aborts_on_failure(bucket, monkeypatch):
    data = bytearray(os.urandom(11 * MiB + 123))
    writer = S3.S3ShardWriter(part_bytes=5 * MiB, max_concurrency=3)
    seen: list[int] = []
    with memoryview(data) as view:
        writer.write_file(f"s3://{bucket}/w/file", view, progress=seen.append)
    assert sum(seen) == len(data)
    obj = S3.client().get_object(Bucket=bucket, Key="w/file")
    assert obj["Body"].read() == bytes(data) and obj["ETag"].endswith('-3"')

    real = S3.client()

    class PartThreeRefused:   # substituted for the client: part 3 is refused, the others go through
        def __getattr__(self, name):
            return getattr(real, name)

        def upload_part(self, **kwargs):
            if kwargs["PartNumber"] == 3:
                from botocore.exceptions import ClientError
                raise ClientError({"Error": {"Code": "AccessDenied", "Message": "injected"},
                                   "ResponseMetadata": {"HTTPStatusCode": 403}}, "UploadPart")
            return real.upload_part(**kwargs)

    monkeypatch.setattr(S3, "client", lambda *a, **k: PartThreeRefused())
    with memoryview(data) as view, pytest.raises(PermissionError, match="UploadPart 3/3"):
        writer.write_file(f"s3://{bucket}/w/broken", view, progress=lambda n: None)
    assert _uploads(bucket) == [] and _keys(bucket, "w/broken") == []


def test_botocore_errors_map_to_os_errors():
    from botocore.exceptions import ClientError, EndpointConnectionError

    def err(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                           "PutObject")

    assert isinstance(S3._os_error(err("SlowDown", 503), "x"), zckpt.TransientWriteError)
    assert isinstance(S3._os_error(err("InternalError", 500), "x"), zckpt.TransientWriteError)
    assert isinstance(S3._os_error(EndpointConnectionError(endpoint_url="http://x"), "x"), zckpt.TransientWriteError)
    assert type(S3._os_error(err("PreconditionFailed", 412), "x")) is FileExistsError
    assert type(S3._os_error(err("AccessDenied", 403), "x")) is PermissionError
    assert type(S3._os_error(err("NoSuchKey", 404), "x")) is FileNotFoundError


@pytest.mark.timeout(180)
def test_retention_applies_under_the_s3_mirror(make_pool, bucket, tmp_path):
    root = f"s3://{bucket}/ckpts"
    pool = make_pool(config=_config(root, keep_last=2))
    for step in range(1, 5):
        assert pool.save({"s": torch.tensor(step)}, tmp_path / "main" / f"step-{step}").result(timeout=120)
    assert zckpt.commit.committed(root) == [f"{root}/step-3", f"{root}/step-4"]
    assert _keys(bucket, "ckpts/step-1/") == [] and _keys(bucket, "ckpts/step-2/") == []
    assert zckpt.load(zckpt.latest(root))["s"].item() == 4


@pytest.mark.timeout(180)
def test_a_worker_dying_mid_upload_costs_a_retry_and_leaves_no_open_upload(make_pool, bucket, tmp_path):
    from _s3_faults import die_in_upload_part

    root = f"s3://{bucket}/ckpts"
    once = tmp_path / "die-once"
    once.touch()
    pool = make_pool(config=_config(root), init_fn=die_in_upload_part, init_args=(2, str(once)))
    sd = _state(7)
    fut = pool.save(sd, tmp_path / "main" / "step-7")
    assert fut.result(timeout=120) and fut.mirror_errors == []
    assert not once.exists() and fut.timings["shard_retries"] == 1   # the dead worker's shard, written again
    assert _uploads(bucket) == []                                     # its open upload was aborted at commit
    _same(zckpt.load(f"{root}/step-7"), sd)
    _same(zckpt.load(tmp_path / "main" / "step-7"), sd)


@pytest.mark.timeout(180)
def test_an_empty_manifest_object_does_not_block_the_mirror(make_pool, bucket, tmp_path):
    """A zero-byte <root>/<name>/manifest.json (another tool, an interrupted copy) is no
    checkpoint: latest() passes it by and commits to the mirror go on."""
    root = f"s3://{bucket}/ckpts"
    S3.client().put_object(Bucket=bucket, Key="ckpts/junk/manifest.json", Body=b"")
    pool = make_pool(config=_config(root))
    for step in (1, 2):
        fut = pool.save(_state(step), tmp_path / "main" / f"step-{step}")
        assert fut.result(timeout=120) and fut.mirror_errors == []
    assert zckpt.latest(root) == f"{root}/step-2"


@pytest.mark.timeout(180)
def test_an_upload_never_touches_a_local_path_that_spells_the_url(make_pool, bucket, tmp_path, monkeypatch):
    """``s3://b/p/...`` read as a relative path is ``s3:/b/p/...``: a local file there stays."""
    monkeypatch.chdir(tmp_path)
    root = f"s3://{bucket}/ckpts"
    pool = make_pool(config=_config(root))
    fut = pool.save(_state(1), tmp_path / "main" / "step-1")
    fut.result(timeout=120)
    names = [f.name for f in zckpt.manifest.read_manifest(str(tmp_path / "main" / "step-1")).files]
    victims = [tmp_path / "s3:" / bucket / "ckpts" / "step-2" / n for n in names]
    for v in victims:
        v.parent.mkdir(parents=True, exist_ok=True)
        v.write_text("precious local data")
    fut = pool.save(_state(2), tmp_path / "main" / "step-2")
    assert fut.result(timeout=120) and fut.mirror_errors == []
    assert all(v.read_text() == "precious local data" for v in victims)
