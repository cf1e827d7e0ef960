"""The cost of an S3 mirror: durable time of a save with and without one.

    python bench/s3_mirror.py                       # 256 MiB, 3 rounds, moto on loopback
    python bench/s3_mirror.py --size-mb 1024 --rounds 5
    AWS_ENDPOINT_URL=... python bench/s3_mirror.py --bucket my-bucket   # a real store

Without ``--bucket`` it starts moto's S3 server (``python -m moto.server``, needs
``moto[server]``) on a free loopback port and points the pool at it: those numbers say
what zckpt's upload path costs on this machine, not what S3 would take (moto keeps
objects in its own Python process, on the same CPUs as the writers). Both pools use
``bench/configs/fanout-2-s3-mirror.toml``'s settings (2 writers), durable (fsync) local
saves; one without mirrors, one with the S3 mirror. Median of ``--rounds`` after a
warm-up save each, alternating which goes first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import the bench package from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import zckpt  # noqa: E402
from zckpt import s3 as S3  # noqa: E402

CONFIG = Path(__file__).resolve().parent / "configs" / "fanout-2-s3-mirror.toml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not start (pip install 'moto[server]')") from None
            time.sleep(0.05)   # polling cadence: the connection decides


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bucket", help="use this bucket of the store in the AWS environment instead of moto")
    args = ap.parse_args(argv)
    moto = None
    if args.bucket is None:
        moto, endpoint = start_moto()
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1")
        bucket = f"zckpt-bench-{uuid.uuid4().hex[:8]}"
        S3.client().create_bucket(Bucket=bucket)
    else:
        bucket = args.bucket
    work = Path(tempfile.mkdtemp(prefix="zckpt-s3-bench-"))
    n = 32
    sd = {f"w{i}": torch.randn(args.size_mb * 2**20 // 4 // n) for i in range(n)}
    base = zckpt.PoolConfig.from_toml(CONFIG).replace(keep_last=None)
    prefix = f"s3://{bucket}/zckpt-bench-{uuid.uuid4().hex[:8]}"
    pools = {"local only": zckpt.CheckpointPool(config=base.replace(mirrors=())),
             "local + S3 mirror": zckpt.CheckpointPool(config=base.replace(mirrors=(prefix,)))}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in pools}
    try:
        for pool in pools.values():
            pool.reserve(sd)
        for r in range(args.rounds + 1):
            order = list(pools) if r % 2 == 0 else list(reversed(pools))
            for name in order:
                fut = pools[name].save(sd, work / name.replace(" ", "_").replace("+", "and") / f"step-{r}")
                fut.result(timeout=600)
                if fut.mirror_errors:
                    raise RuntimeError(f"mirror failed: {fut.mirror_errors}")
                if r:   # round 0 warms up (arena, workers, boto3 import and connections)
                    times[name].append((fut.timings["blocked_s"], fut.timings["durable_s"]))
        t0 = time.perf_counter()
        back = zckpt.load(f"{prefix}/step-{args.rounds}")
        load_s = time.perf_counter() - t0
        assert all(torch.equal(back[k], sd[k]) for k in sd)
    finally:
        for pool in pools.values():
            pool.close()
        shutil.rmtree(work, ignore_errors=True)
        if moto is not None:
            moto.kill()
            moto.wait()
    where = "moto on loopback (NOT a real S3 number)" if moto is not None else os.environ.get("AWS_ENDPOINT_URL", "S3")
    print(f"{args.size_mb} MiB state dict, 2 writers, durable local saves; store: {where}; "
          f"median of {args.rounds}")
    for name, ts in times.items():
        blocked = sorted(t[0] for t in ts)[len(ts) // 2]
        durable = sorted(t[1] for t in ts)[len(ts) // 2]
        print(f"  {name:<18} blocked {blocked:.3f} s   durable {durable:.3f} s   "
              f"(durable runs: {', '.join(f'{t[1]:.2f}' for t in ts)})")
    print(f"  zckpt.load from the S3 mirror (verified): {load_s:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
