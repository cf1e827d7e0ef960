"""GPU state: the trainer's stall and durable time of zckpt against the link and the peers.

    python bench/gpu.py                                     # 1, 4 and 16 GiB of bf16 state on cuda:0
    python bench/gpu.py --sizes-gib 1,4 --later 3 --out gpu.json --markdown gpu.md
    python bench/gpu.py --dry-run --out /tmp/gpu.json       # the same code, a few MiB on the CPU

For each size, one transformer-shaped state dict of bf16 tensors is made on the device and
each method saves it once (the *first* save: what allocating, page-locking and mapping
cost) and then ``--later`` more times (their median is *later*). Every save starts on a
quiet device (``synchronize()`` first) and is durable before the next one starts.

- ``link``: the floor, measured in the same run: every tensor ``copy_()``'d into a host
  buffer page-locked before timing (``pin_memory=True``), ``non_blocking=True``, then
  ``torch.cuda.synchronize()``. Its GB/s is what the PCIe/NVLink link gives these tensors.
- ``zckpt``: ``CheckpointPool(num_workers=W)``, checksums and fsync on. Blocked = until
  ``save()`` returns (staged), durable = ``fut.result()``. No ``reserve()``: the first save
  allocates and page-locks the arena.
- ``dcp``: ``torch.distributed.checkpoint.async_save`` (THREAD executor, no process group:
  ``no_dist``) with DCP's ``DefaultStager`` on page-locked memory and non-blocking copies
  (synchronous staging: ``async_save`` returns once staged), kept across saves so its
  pinned copies are reused, and ``FileSystemWriter(sync_files=True, thread_count=W)``; the
  bench fsyncs the directories.
- ``torch_save``: ``torch.save`` of the CUDA state dict, then the bench fsyncs it.
- ``zckpt_async`` (not run unless named): ``PoolConfig(async_staging=True)``; blocked =
  ``save()``'s return, the copy runs on a thread until ``fut.staged``.

Same-run ratios: zckpt's staging GB/s over the link's (target >= 0.8), and zckpt's
blocked time over each peer's (target < 1). ``--budget-s`` skips what would not finish in
time (predicted from the smaller sizes), so a bounded run still reports what it measured;
results are written to ``--out`` after every method.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import math
import os
import platform
import shutil
import sys
import time
import traceback
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: import the bench package from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import harness, report  # noqa: E402
from bench.harness import median  # noqa: E402
from bench.methods import Method, Pending, Stamp  # noqa: E402

GIB = 1 << 30
# DCP says so on every save and load without a process group, which is the point here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
DEFAULT_METHODS = ("link", "zckpt", "dcp", "torch_save")
ALL_METHODS = DEFAULT_METHODS + ("zckpt_async",)


# ----------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------


def make_state(nbytes: int, device: torch.device, n_layers: int = 8, seed: int = 0) -> dict[str, Any]:
    """About ``nbytes`` of bf16 tensors on ``device``, shaped like a transformer's weights:
    per layer four d x d attention matrices, two 4d x d MLP matrices and two norms; an
    embedding takes the rest of the budget. Filled on the device (fast at 16 GiB)."""
    d = max(64, int(math.sqrt(nbytes / (2 * 12 * n_layers))) // 64 * 64)
    gen = torch.Generator(device=device).manual_seed(seed)

    def t(*shape: int) -> torch.Tensor:
        x = torch.empty(*shape, dtype=torch.bfloat16, device=device)
        x.normal_(generator=gen)
        return x

    model: dict[str, torch.Tensor] = {}
    for i in range(n_layers):
        p = f"layers.{i}."
        for name in ("wq", "wk", "wv", "wo"):
            model[p + f"attn.{name}.weight"] = t(d, d)
        model[p + "mlp.w1.weight"] = t(4 * d, d)
        model[p + "mlp.w2.weight"] = t(d, 4 * d)
        model[p + "ln1.weight"] = t(d)
        model[p + "ln2.weight"] = t(d)
    used = sum(x.numel() * 2 for x in model.values())
    rows = max(1, (nbytes - used - 2 * d) // (2 * d))
    model = {"embed.weight": t(rows, d), **model, "norm.weight": t(d)}
    return {"model": model, "step": 1000 + seed}


def tensors(sd: Any) -> list[torch.Tensor]:
    return [t for _, t in harness.iter_tensors(sd)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    """Give back what a finished method held: Python garbage, the CUDA caching
    allocator's and the pinned host allocator's caches."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        empty_host = getattr(torch._C, "_host_emptyCache", None)
        if empty_host is not None:
            empty_host()
    harness.release_free_memory()


def same_values(loaded: Any, expected: dict[str, Any], device: torch.device) -> str:
    """"ok", or what differs (compared on ``device``, bit for bit)."""
    want = dict(harness.iter_tensors(expected))
    got = dict(harness.iter_tensors(loaded))
    if got.keys() != want.keys():
        return f"MISMATCH: keys differ ({sorted(set(got) ^ set(want))[:3]})"
    bad = [k for k, w in want.items()
           if got[k].dtype != w.dtype or got[k].shape != w.shape
           or not torch.equal(got[k].to(device).view(torch.uint8), w.view(torch.uint8))]
    return "ok" if not bad else f"MISMATCH: {len(bad)} of {len(want)} tensors differ ({bad[:3]})"


# ----------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------


class LinkLimit(Method):
    """copy_ of every tensor into a pre-pinned host buffer, non_blocking, synchronised."""

    name = "link"
    fsync = "none"
    note = "copy_ into pre-pinned memory, non_blocking, synchronised (after one untimed copy): the floor"

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._buf: torch.Tensor | None = None
        self._pinned = False

    def start(self, sd: dict[str, Any]) -> None:
        ts = tensors(sd)
        offsets, total = [], 0
        for t in ts:
            offsets.append(total)
            total += -(-t.numel() * t.element_size() // 64) * 64
        # Page-locked with cudaHostRegister, as zckpt's arena and DCP's stager are: the exact
        # size (the pinned caching allocator would round 16 GiB + a little up to 32 GiB).
        self._buf = torch.empty(max(total, 1), dtype=torch.uint8)
        self._buf.fill_(0)   # resident before timing
        if self._device.type == "cuda":
            rc = torch.cuda.cudart().cudaHostRegister(self._buf.data_ptr(), self._buf.numel(), 0)
            if int(rc) != 0:
                raise RuntimeError(f"cudaHostRegister of {self._buf.numel()} bytes failed with error {int(rc)}")
            self._pinned = True
            assert self._buf.is_pinned(), "registered memory that CUDA does not see as page-locked"
        self._pairs = [(self._buf[o: o + t.numel() * t.element_size()].view(t.dtype).view(t.shape), t)
                       for o, t in zip(offsets, ts, strict=True)]
        self.save(sd, Path("unused"))   # one untimed copy: lazy set-up (thread pools, DMA paths) is not the link

    def save(self, sd: dict[str, Any], path: Path) -> Pending:
        nb = self._device.type == "cuda"
        for dst, src in self._pairs:
            dst.copy_(src, non_blocking=nb)
        sync(self._device)
        return Pending()

    def load(self, path: Path, expected: dict[str, Any]) -> Any:
        it = iter(dst.clone() for dst, _ in self._pairs)
        return harness.map_tensors(expected, lambda _t: next(it))

    def close(self) -> None:
        self._pairs = []
        if self._pinned and self._buf is not None:
            torch.cuda.cudart().cudaHostUnregister(self._buf.data_ptr())
            self._pinned = False
        self._buf = None


class ZckptGpu(Method):
    """zckpt's CheckpointPool, fsync and checksums on, no reserve()."""

    fsync = "self"

    def __init__(self, workers: int, device: torch.device, async_staging: bool = False) -> None:
        self.name = "zckpt_async" if async_staging else "zckpt"
        self.note = f"{workers} workers, fsync, xxh3" + ("; async staging" if async_staging else "")
        self._workers = workers
        self._device = device
        self._async = async_staging
        self._pool: Any = None
        self._last: Any = None

    def start(self, sd: dict[str, Any]) -> None:
        import zckpt

        cfg = zckpt.PoolConfig(num_workers=self._workers, async_staging=self._async, init_timeout_s=120.0)
        self._pool = zckpt.CheckpointPool(config=cfg)

    def save(self, sd: dict[str, Any], path: Path) -> Pending:
        fut = self._pool.save(sd, str(path))
        self._last = fut
        return Pending(staged=Stamp(fut.staged), done=Stamp(fut))

    def load(self, path: Path, expected: dict[str, Any]) -> Any:
        import zckpt

        return zckpt.load(str(path), map_location=self._device)

    def last_timings(self) -> dict[str, float]:
        return dict(getattr(self._last, "timings", None) or {})

    def stats(self) -> dict[str, Any]:
        s = self._pool.stats
        return {"arena_bytes": s.arena_nbytes, "arena_allocations": s.arena_allocations}

    def child_pids(self) -> list[int]:
        return list(self._pool.worker_pids) if self._pool is not None else []

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def kill(self) -> None:
        if self._pool is not None:
            self._pool.kill()
            self._pool = None


def _supports(fn: Any, arg: str) -> bool:
    try:
        return arg in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class DcpPinned(Method):
    """DCP async_save (THREAD) with DefaultStager on pinned memory, no process group."""

    name = "dcp"
    fsync = "dirs"

    def __init__(self, workers: int, device: torch.device) -> None:
        self._workers = workers
        self._device = device
        self._stager: Any = None
        cuda = device.type == "cuda"
        self.note = (f"async_save THREAD, DefaultStager pinned={cuda} non_blocking={cuda}, sync staging, "
                     f"FileSystemWriter(sync_files, thread_count={workers})")

    def start(self, sd: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        cuda = self._device.type == "cuda"
        self._stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                    use_async_staging=False, use_non_blocking_copy=cuda))

    def save(self, sd: dict[str, Any], path: Path) -> Pending:
        import torch.distributed.checkpoint as dcp

        kwargs: dict[str, Any] = {}
        if _supports(dcp.async_save, "no_dist"):
            kwargs["no_dist"] = True
        writer = dcp.FileSystemWriter(str(path), sync_files=True, thread_count=self._workers)
        resp = dcp.async_save(sd, storage_writer=writer, async_stager=self._stager, **kwargs)
        if isinstance(resp, Future):   # synchronous staging: returns once staged, with the upload future
            return Pending(staged=None, done=Stamp(resp))
        return Pending(staged=Stamp(resp.staging_completion), done=Stamp(resp.upload_completion))

    def load(self, path: Path, expected: dict[str, Any]) -> Any:
        import torch.distributed.checkpoint as dcp

        template = harness.map_tensors(expected, torch.empty_like)
        kwargs = {"no_dist": True} if _supports(dcp.load, "no_dist") else {}
        dcp.load(template, checkpoint_id=str(path), **kwargs)
        return template

    def close(self) -> None:
        if self._stager is not None:
            self._stager.close()
            self._stager = None


class TorchSaveGpu(Method):
    """torch.save of the CUDA state dict into one file (the bench fsyncs it)."""

    name = "torch_save"
    fsync = "bench"
    note = "synchronous; bench fsyncs"

    def __init__(self, device: torch.device) -> None:
        self._device = device

    def save(self, sd: dict[str, Any], path: Path) -> Pending:
        path.mkdir(parents=True)
        torch.save(sd, path / "model.pt")
        return Pending()

    def load(self, path: Path, expected: dict[str, Any]) -> Any:
        return torch.load(path / "model.pt", map_location=self._device, weights_only=True)


def make(name: str, workers: int, device: torch.device) -> Method:
    if name == "link":
        return LinkLimit(device)
    if name == "zckpt":
        return ZckptGpu(workers, device)
    if name == "zckpt_async":
        return ZckptGpu(workers, device, async_staging=True)
    if name == "dcp":
        return DcpPinned(workers, device)
    if name == "torch_save":
        return TorchSaveGpu(device)
    raise ValueError(f"unknown method {name!r} (known: {', '.join(ALL_METHODS)})")


# ----------------------------------------------------------------------------------
# Runner
# ----------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[gpu {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def durable_fsync(m: Method, path: Path) -> None:
    if m.fsync == "bench":
        harness.fsync_tree(path)
    elif m.fsync == "dirs":
        harness.fsync_tree(path, files=False)


def run_method(m: Method, sd: dict[str, Any], nbytes: int, root: Path, later: int, timeout_s: float,
               verify: bool, device: torch.device) -> dict[str, Any]:
    row: dict[str, Any] = {"method": m.name, "note": m.note, "bytes": nbytes, "samples": [], "error": None,
                           "correct": None}
    t0 = time.perf_counter()
    try:
        m.start(sd)
        row["start_s"] = time.perf_counter() - t0
        for i in range(1 + later):
            path = root / f"{m.name}-{i}"
            sync(device)
            gc.collect()
            t0 = time.perf_counter()
            pending = m.save(sd, path)
            t_ret = time.perf_counter()
            t_staged, t_done = pending.wait(t_ret, timeout_s)
            durable_fsync(m, path)
            t_end = time.perf_counter()
            sample = {"returned_s": t_ret - t0, "blocked_s": t_staged - t0,
                      "durable_s": None if m.fsync == "none" else t_end - t0,
                      "timings": m.last_timings()}
            row["samples"].append(sample)
            log(f"  {m.name} save {i}: blocked {sample['blocked_s']:.4f}s ({nbytes / sample['blocked_s'] / 1e9:.2f}"
                f" GB/s) durable {report.fmt_s(sample['durable_s'])}s")
            if verify and i == later:
                row["correct"] = same_values(m.load(path, sd), sd, device)
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)
        if isinstance(m, ZckptGpu):
            row["pool_stats"] = m.stats()
    except Exception as e:  # noqa: BLE001 - one method's failure is a row, not the end of the run
        row["error"] = harness.first_line(e)
        row["traceback"] = traceback.format_exc()[-4000:]
        log(f"  {m.name} failed: {row['error']}")
    finally:
        err = harness.call_bounded(m.close, 120)
        if err is not None:
            log(f"  {m.name} close: {harness.first_line(err)}; killing")
            m.kill()
    summarise(row)
    return row


def summarise(row: dict[str, Any]) -> None:
    s = row["samples"]
    first, rest = (s[0], s[1:]) if s else (None, [])
    row["first_blocked_s"] = first["blocked_s"] if first else None
    row["first_durable_s"] = first["durable_s"] if first else None
    row["blocked_s"] = median([x["blocked_s"] for x in rest]) if rest else None
    row["blocked_min_s"] = min((x["blocked_s"] for x in rest), default=None)
    durs = [x["durable_s"] for x in rest if x["durable_s"] is not None]
    row["durable_s"] = median(durs) if durs else None
    b = row["blocked_s"]
    row["staging_gbps"] = row["bytes"] / b / 1e9 if b else None
    row["first_staging_gbps"] = row["bytes"] / row["first_blocked_s"] / 1e9 if row["first_blocked_s"] else None


def ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Same-run ratios for one size: zckpt against the link and against each peer."""
    by = {r["method"]: r for r in rows if r.get("error") is None}
    z = by.get("zckpt")
    out: dict[str, Any] = {}
    if z is None:
        return out
    link = by.get("link")
    if link is not None:
        out["staging_vs_link"] = report.ratio(z["staging_gbps"], link["staging_gbps"])
        out["first_staging_vs_link"] = report.ratio(z["first_staging_gbps"], link["staging_gbps"])
    for peer in ("link", "dcp", "torch_save", "zckpt_async"):
        p = by.get(peer)
        if p is None:
            continue
        out[f"blocked_vs_{peer}"] = report.ratio(z["blocked_s"], p["blocked_s"])
        out[f"first_blocked_vs_{peer}_first"] = report.ratio(z["first_blocked_s"], p["first_blocked_s"])
        if peer != "link":
            out[f"durable_vs_{peer}"] = report.ratio(z["durable_s"], p["durable_s"])
    return out


def environment(device: torch.device, root: Path) -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "torch_cuda": torch.version.cuda, "device": str(device), "cpus": os.cpu_count(),
                           "host": platform.node()}
    try:
        import zckpt

        env["zckpt"] = zckpt.__version__
    except Exception as e:  # noqa: BLE001
        env["zckpt"] = f"unavailable: {e}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / GIB, 1), gpu_count=torch.cuda.device_count())
    mem = harness.proc_status_kib("self", "VmRSS")
    env["rss_mib_at_start"] = None if mem is None else mem // 1024
    try:
        with open("/proc/meminfo") as f:
            env["mem_total_gib"] = round(int(f.readline().split()[1]) / (1 << 20), 1)
    except (OSError, ValueError, IndexError):
        pass
    env["dir"] = str(root)
    env["dir_fs"] = _fs_type(root)
    return env


def _fs_type(path: Path) -> str | None:
    best, fs = "", None
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                    best, fs = parts[1], f"{parts[2]} on {parts[1]}"
    except OSError:
        return None
    return fs


def parse_sizes(text: str) -> list[float]:
    sizes = [float(x) for x in text.split(",") if x.strip()]
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"bad --sizes-gib {text!r}")
    return sizes


def size_label(gib: float) -> str:
    return f"{gib:g} GiB" if gib >= 0.25 else f"{gib * 1024:g} MiB"


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("bench/gpu.py: --device cuda but torch.cuda.is_available() is False "
                             "(use --dry-run or --device cpu)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.cuda.init()
    methods = [m for m in args.methods.split(",") if m]
    for name in methods:
        if name not in ALL_METHODS:
            raise SystemExit(f"unknown method {name!r} (known: {', '.join(ALL_METHODS)})")
    t_start = time.monotonic()
    payload: dict[str, Any] = {"config": {}, "rows": [], "ratios": [], "skipped": []}
    with harness.work_dir("zckpt-gpu-", args.dir) as root:
        payload["config"] = {**environment(device, root), "sizes_gib": args.sizes_gib, "later": args.later,
                             "workers": args.workers, "methods": methods, "budget_s": args.budget_s,
                             "dry_run": args.dry_run}
        log(f"{payload['config']}")
        took: dict[str, tuple[int, float]] = {}     # method -> (bytes, seconds) of its last size
        for gib in args.sizes_gib:
            nbytes = int(gib * GIB)
            sd = make_state(nbytes, device)
            nbytes = harness.state_dict_nbytes(sd)
            sync(device)
            label = size_label(gib)
            log(f"{label}: {len(tensors(sd))} bf16 tensors on {device}")
            rows = []
            for name in methods:
                elapsed = time.monotonic() - t_start
                prev = took.get(name)
                predicted = prev[1] * nbytes / prev[0] if prev else 0.0
                if args.budget_s is not None and elapsed + predicted > args.budget_s:
                    why = (f"time budget: {elapsed:.0f}s spent + {predicted:.0f}s predicted > "
                           f"--budget-s {args.budget_s:g}")
                    payload["skipped"].append({"size": label, "method": name, "why": why})
                    log(f"  {name} at {label} skipped ({why})")
                    continue
                log(f"  {name} at {label} ...")
                t0 = time.monotonic()
                verify = args.verify_max_gib is not None and nbytes <= args.verify_max_gib * GIB
                row = run_method(make(name, args.workers, device), sd, nbytes, root, args.later,
                                 args.save_timeout, verify, device)
                took[name] = (nbytes, time.monotonic() - t0)
                row.update(size=label, size_gib=nbytes / GIB, wall_s=took[name][1])
                rows.append(row)
                payload["rows"].append(row)
                harness.clear_dir(root)
                release_memory(device)
                write_json(args, payload)
            payload["ratios"].append({"size": label, **ratios(rows)})
            write_json(args, payload)
            del sd, rows
            release_memory(device)
    payload["wall_s"] = time.monotonic() - t_start
    return payload


def write_json(args: argparse.Namespace, payload: dict[str, Any]) -> None:
    if args.json:
        import json

        tmp = Path(args.json + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        os.replace(tmp, args.json)


def tables(payload: dict[str, Any]) -> list[report.Table]:
    cfg = payload["config"]
    where = cfg.get("gpu") or cfg.get("device")
    t = report.Table(f"GPU checkpoint: bf16 state on {where} (torch {cfg.get('torch')}, {cfg.get('workers')} workers, "
                     f"first save, then median of {cfg.get('later')} later saves; checkpoints on {cfg.get('dir_fs')})",
                     ["size", "method", "blocked first", "blocked later", "GB/s later", "durable first",
                      "durable later", "start", "correct", "note"], free_last=True)
    for r in payload["rows"]:
        if r.get("error"):
            t.add([r["size"], r["method"], "-", "-", "-", "-", "-", "-", "-", f"ERROR {r['error']}"])
            continue
        t.add([r["size"], r["method"], report.fmt_s(r["first_blocked_s"]), report.fmt_s(r["blocked_s"]),
               report.fmt_num(r["staging_gbps"]), report.fmt_s(r["first_durable_s"]), report.fmt_s(r["durable_s"]),
               report.fmt_s(r.get("start_s")), r["correct"] or "-", r["note"]])
    for s in payload["skipped"]:
        t.add([s["size"], s["method"], "-", "-", "-", "-", "-", "-", "-", f"skipped: {s['why']}"])
    q = report.Table("same-run ratios (zckpt over each; staging: GB/s, target >= 0.80x the link; blocked: target "
                     "< 1.00x every peer)",
                     ["size", "staging/link", "first staging/link", "blocked/link", "blocked/dcp",
                      "blocked/torch_save", "first blocked/dcp first", "durable/dcp", "durable/torch_save"])
    for r in payload["ratios"]:
        q.add([r["size"]] + [report.fmt_ratio(r.get(k)) for k in (
            "staging_vs_link", "first_staging_vs_link", "blocked_vs_link", "blocked_vs_dcp", "blocked_vs_torch_save",
            "first_blocked_vs_dcp_first", "durable_vs_dcp", "durable_vs_torch_save")])
    return [t, q]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-gib", type=parse_sizes, default=None,
                    help="comma list of state sizes in GiB (default 1,4,16; --dry-run: 4 and 8 MiB)")
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default cuda; --dry-run: cpu)")
    ap.add_argument("--dry-run", action="store_true",
                    help="the same code path on the CPU with a few MiB: checks the script, measures nothing")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma list of {', '.join(ALL_METHODS)}")
    ap.add_argument("--later", type=int, default=None, help="saves after the first (default 3; --dry-run: 1)")
    ap.add_argument("--workers", type=int, default=None, help="zckpt workers and DCP writer threads (default 4)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip a (size, method) whose predicted end is past this many seconds from the start")
    ap.add_argument("--verify-max-gib", type=float, default=1.0,
                    help="load and compare bit for bit the last checkpoint of each method up to this size")
    ap.add_argument("--save-timeout", type=float, default=900.0, help="seconds one save may take")
    ap.add_argument("--dir", default=None, help="where checkpoints go (default: the system temp dir)")
    ap.add_argument("--out", "--json", dest="json", default=None, metavar="PATH",
                    help="write results as JSON (rewritten after every method)")
    ap.add_argument("--markdown", default=None, metavar="PATH", help="also write the tables as Markdown")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device = args.device or "cpu"
        args.sizes_gib = args.sizes_gib or [4 / 1024, 8 / 1024]
        args.later = 1 if args.later is None else args.later
        args.workers = args.workers or 2
    args.device = args.device or "cuda"
    args.sizes_gib = args.sizes_gib or [1.0, 4.0, 16.0]
    args.later = 3 if args.later is None else args.later
    args.workers = args.workers or 4
    payload = run(args)
    write_json(args, payload)
    report.emit(argparse.Namespace(markdown=args.markdown), tables(payload), payload)
    errors = [r for r in payload["rows"] if r.get("error")]
    wrong = [r for r in payload["rows"] if r.get("correct") not in (None, "ok")]
    for r in errors + wrong:
        print(f"[gpu] {r['method']} at {r['size']}: {r.get('error') or r.get('correct')}", file=sys.stderr)
    return 1 if errors or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
