"""Smoke runs of the benchmark scripts at a few MiB, so they never rot.

They check that each script runs to the end, reports every method it was asked for,
and finds every checkpoint correct; the numbers themselves are not asserted (speed is
judged by ratios in a full run, not in tests on a shared machine). The scripts are
the ``bench`` package; they run as files (``python bench/x.py``, as the README shows),
as modules (``python -m bench.x``) and through ``zckpt bench``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.timeout(300)


def run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args} exited {out.returncode}\n{out.stdout}\n{out.stderr[-3000:]}"
    return out


def test_throughput_quick(tmp_path):
    out_json = tmp_path / "t.json"
    out = run("bench/throughput.py", "--quick", "--methods", "memcpy_warm,write_fsync,torch_save,zckpt_1,zckpt_2",
              "--json", str(out_json), "--markdown", str(tmp_path / "t.md"))
    for name in ("memcpy_warm", "write_fsync", "torch_save", "zckpt_1", "zckpt_2"):
        assert name in out.stdout
    data = json.loads(out_json.read_text())
    text = json.dumps(data)
    assert "MISMATCH" not in text and "zckpt_2" in text
    assert all(r["error"] is None for r in data["results"]), [r["error"] for r in data["results"]]
    md = (tmp_path / "t.md").read_text()
    assert md.startswith(("|", "state dict", "#"))
    # The small-tensors run: 2,000 x 256 B, first save and median of 7, beside memcpy.
    assert "small tensors: 2,000 x 256 B" in out.stdout and "small tensors" in md
    small = {r["method"]: r for r in data["small_tensors"]}
    assert list(small) == ["memcpy_warm", "zckpt_1", "zckpt_2"]
    assert all(r["correct"] == "ok" and len(r["samples"]) == 7 for r in small.values())
    assert small["zckpt_1"]["first_blocked_s"] is not None and small["zckpt_1"]["blocked_vs_memcpy"] is not None
    assert data["config"]["small_tensors"]["tensors"] == 2000


def test_throughput_as_module_and_cli(tmp_path):
    """``python -m bench.throughput`` and ``zckpt bench`` run the same script."""
    for entry in (("-m", "bench.throughput"), ("-m", "zckpt.cli", "bench")):
        out_json = tmp_path / "t.json"
        run(*entry, "--quick", "--size-mb", "1", "--methods", "memcpy_warm,zckpt_1", "--small-tensors", "50",
            "--small-rounds", "1", "--settle", "0", "--json", str(out_json))
        data = json.loads(out_json.read_text())
        assert [r["method"] for r in data["results"]] == ["memcpy_warm", "zckpt_1"]
        assert all(r["correct"] == "ok" for r in data["results"] + data["small_tensors"])


def test_fanout_tiny(tmp_path):
    out = run("bench/fanout.py", "--workers", "1,2", "--sizes-mb", "2", "--rounds", "1",
              "--json", str(tmp_path / "f.json"), "--dir", str(tmp_path))
    assert "knee at" in out.stdout
    rows = json.loads((tmp_path / "f.json").read_text())["rows"]
    assert [r["workers"] for r in rows] == [1, 2] and all(r["correct"] for r in rows)


def test_gil_tiny(tmp_path):
    out = run("bench/gil.py", "--size-mb", "2", "--rounds", "1", "--methods", "torch_save,zckpt_1",
              "--json", str(tmp_path / "g.json"), "--markdown", str(tmp_path / "g.md"), "--dir", str(tmp_path))
    rows = json.loads((tmp_path / "g.json").read_text())
    assert [r["method"] for r in rows] == ["torch_save", "zckpt_1"] and all("error" not in r for r in rows)
    assert "busy/idle" in out.stdout and (tmp_path / "g.md").read_text().count("|") > 10


def test_overhead_tiny(tmp_path):
    out = run("bench/overhead.py", "--width", "64", "--depth", "3", "--steps", "6", "--every", "3",
              "--json", str(tmp_path / "o.json"))
    modes = [r["mode"] for r in json.loads((tmp_path / "o.json").read_text())]
    assert modes == ["none", "torch.save", "zckpt"] and "blocked/save" in out.stdout


def test_registry_and_selection(monkeypatch):
    """One registry: every method has a group, groups select in table order, zckpt_<N> works."""
    monkeypatch.syspath_prepend(ROOT)
    from bench import methods

    assert len(set(methods.METHOD_NAMES)) == len(methods.METHOD_NAMES) == len(methods.REGISTRY)
    assert set(methods.METHOD_GROUPS) == {"raw", "peers", "zckpt", "all"}
    assert methods.select("zckpt_2,raw") == ["memcpy_warm", "write_fsync", "zckpt_2"]
    assert methods.select("zckpt_8_async,memcpy_warm") == ["memcpy_warm", "zckpt_8_async"]
    assert methods.make_method("zckpt_8", log_dir=Path(ROOT)).group == "zckpt"
    with pytest.raises(ValueError, match="unknown method"):
        methods.select("nope")


def test_chaos_loses_no_committed_checkpoint(tmp_path):
    """bench/chaos.py scaled down: 45 s of killed workers and trainers, a full disk and
    failing fsyncs; every committed checkpoint found must equal a replay of the run."""
    out_json = tmp_path / "chaos.json"
    run("bench/chaos.py", "--minutes", "0.75", "--quick", "--dir", str(tmp_path), "--json", str(out_json))
    r = json.loads(out_json.read_text())
    assert r["lost"] == 0, r
    assert r["committed"] > 0 and r["checked"] > 0 and r["restarts"] >= 2, r
    assert r["resumed_exactly"] == r["resumed"]
    first, last = r["resources"]
    assert last["children"] <= first["children"] + 1 and last["fds"] <= first["fds"] + 16, r["resources"]
