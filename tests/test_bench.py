"""Smoke runs of the benchmark scripts at a few MiB, so they never rot.

They check that each script runs to the end, reports every method it was asked for,
and finds every checkpoint correct; the numbers themselves are not asserted (speed is
judged by ratios in a full run, not in tests on a shared machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
    assert (tmp_path / "t.md").read_text().startswith(("|", "state dict", "#"))


def test_fanout_tiny(tmp_path):
    out = run("bench/fanout.py", "--workers", "1,2", "--sizes-mb", "2", "--rounds", "1",
              "--json", str(tmp_path / "f.json"), "--dir", str(tmp_path))
    assert "knee at" in out.stdout
    rows = json.loads((tmp_path / "f.json").read_text())["rows"]
    assert [r["workers"] for r in rows] == [1, 2] and all(r["correct"] for r in rows)


def test_overhead_tiny(tmp_path):
    out = run("bench/overhead.py", "--width", "64", "--depth", "3", "--steps", "6", "--every", "3",
              "--json", str(tmp_path / "o.json"))
    modes = [r["mode"] for r in json.loads((tmp_path / "o.json").read_text())]
    assert modes == ["none", "torch.save", "zckpt"] and "blocked/save" in out.stdout
