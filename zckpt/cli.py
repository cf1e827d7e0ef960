"""The ``zckpt`` command line: inspect, verify, latest, bench.

    zckpt inspect PATH     tensors, dtypes, sizes, files, which worker wrote what
    zckpt verify PATH      re-read and check every byte; exit 0 if intact, 1 if not
    zckpt latest ROOT      print the newest committed checkpoint under ROOT (exit 1: none; 2: an error)
    zckpt bench [ARGS]     run bench/throughput.py from a source checkout
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys

from . import s3
from .commit import latest
from .errors import CorruptCheckpointError
from .manifest import DcpManifest, read_any_manifest, read_manifest


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _inspect_dcp(path: str, m: DcpManifest) -> int:
    print(f"{path}: written through torch.distributed.checkpoint (zckpt.dcp, format v{m.version}), "
          f"{len(m.entries)} keys, {len(m.items)} items, {_human(m.nbytes)} in {len(m.files)} files, "
          f"checksum {m.checksum}, torch {m.torch_version or '?'}")
    print("\nfiles:")
    for f in m.files:
        print(f"  {f.name:<40} {_human(f.nbytes):>10}  rank {f.rank}")
    print("\nkeys:")
    chunks: dict[str, list[str]] = {}
    for it in m.items:
        chunks.setdefault(it.fqn, []).append(f"{m.files[it.file].name}@{it.at}")
    for fqn, e in m.entries.items():
        where = ", ".join(chunks.get(fqn, [])) or "(empty)"
        if e is None:
            print(f"  {fqn:<40} {'object':<14} {'':<16} {where}")
        else:
            shape = "x".join(map(str, e.size)) or "scalar"
            print(f"  {fqn:<40} {e.dtype:<14} {shape:<16} {len(e.chunks)} chunk(s)  {where}")
    return 0


def _inspect(path: str) -> int:
    if not s3.is_url(path):
        any_m = read_any_manifest(path)
        if isinstance(any_m, DcpManifest):
            return _inspect_dcp(path, any_m)
    m = s3.read_manifest(path) if s3.is_url(path) else read_manifest(path)
    files = m.files
    print(f"{path}: zckpt format v{m.version}, {len(m.tensors)} tensors in "
          f"{len(m.storages)} storages, {_human(m.nbytes)} in {len(files)} files, "
          f"checksum {m.checksum}, torch {m.torch_version or '?'}")
    ranks = sorted({f.rank for f in files if f.rank is not None})
    if ranks:
        print(f"multi-rank: written by {len(ranks)} ranks ({', '.join(map(str, ranks))})")
    if m.metadata is not None:
        print(f"metadata: {m.metadata}")
    print("\nfiles:")
    for f in files:
        timing = ""
        if f.write_s:
            timing = f"  write {f.write_s:.3f}s ({f.nbytes / f.write_s / 1e9:.2f} GB/s)"
            if f.hash_s is not None:
                timing += f", hash {f.hash_s:.3f}s"
        print(f"  {f.name:<40} {_human(f.nbytes):>10}  worker {f.worker}{timing}")
    print("\ntensors:")
    for t in m.tensors:
        st = m.storages[t.storage]
        where = ", ".join(f"{files[p.file].name}@{p.offset}" for p in st.parts) or "(empty)"
        shape = "x".join(map(str, t.shape)) or "scalar"
        box = ""
        if t.global_shape is not None and t.global_offset is not None:
            box = (f"  box [{', '.join(f'{o}:{o + n}' for o, n in zip(t.global_offset, t.shape, strict=True))}]"
                   f" of {'x'.join(map(str, t.global_shape)) or 'scalar'}")
            if st.rank is not None:
                box += f" (rank {st.rank})"
        print(f"  {t.name:<40} {t.dtype:<14} {shape:<16} storage {t.storage:<4} {where}{box}")
    return 0


def _verify(path: str) -> int:
    from .reader import verify
    try:
        summary = verify(path)
    except (CorruptCheckpointError, FileNotFoundError) as exc:
        print(f"CORRUPT: {exc}", file=sys.stderr)
        return 1
    print(f"OK: {path}: {summary['files']} files, {summary['tensors']} tensors, "
          f"{_human(summary['bytes_checked'])} checked")
    return 0


def _bench(args: list[str]) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    script = os.path.join(os.path.dirname(here), "bench", "throughput.py")
    if not os.path.exists(script):
        print("zckpt bench needs a source checkout (bench/throughput.py was not found)", file=sys.stderr)
        return 2
    sys.argv = [script] + args
    runpy.run_path(script, run_name="__main__")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``zckpt`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    ap = argparse.ArgumentParser(prog="zckpt", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("inspect", help="list tensors, files and writers").add_argument("path")
    sub.add_parser("verify", help="check every byte against the manifest").add_argument("path")
    sub.add_parser("latest", help="newest committed checkpoint under ROOT").add_argument("root")
    sub.add_parser("bench", help="run bench/throughput.py (source checkout)")
    args = ap.parse_args(argv)
    if args.cmd == "inspect":
        try:
            return _inspect(args.path)
        except (CorruptCheckpointError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    if args.cmd == "verify":
        return _verify(args.path)
    try:
        found = latest(args.root)
    except (OSError, ValueError) as exc:   # an object store that cannot be listed, a bad URL
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if found is None:
        print(f"no committed checkpoint under {args.root}", file=sys.stderr)
        return 1
    print(found)
    return 0


if __name__ == "__main__":
    sys.exit(main())
