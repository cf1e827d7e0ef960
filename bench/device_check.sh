#!/usr/bin/env bash
# The GPU check of issue 12 in one go, for a bare GPU machine without network:
#   1. says what the machine is (GPU, driver, python, torch, disks) in the log;
#   2. installs the Python packages zckpt needs that are missing there, from the wheels
#      carried in .whl/ (pip --no-index, into a target dir put on PYTHONPATH);
#   3. runs the `cuda` tests (tests/test_cuda.py), bounded by a timeout;
#   4. runs bench/gpu.py at 1, 4 and 16 GiB of bf16 state within a time budget (what
#      would not fit is skipped and reported), bounded by a timeout;
#   5. writes a summary. Everything lands in $OUT, written as it goes, so a run that is cut
#      short still returns what it measured.
#
# Usage:
#   OUT=/tmp/devout bash bench/device_check.sh     # OUT defaults to ${TMPDIR:-/tmp}/zckpt-device-out
# Where torch.cuda.is_available() is false (a CPU machine) the tests skip, saying why, and the
# bench dry-runs on the CPU with a few MiB: that is how this script is checked before a GPU run.
#
# Knobs (environment): PYTHON (default: .venv/bin/python if present, else python3),
#   ZCKPT_TEST_TIMEOUT (s, 200), ZCKPT_BENCH_TIMEOUT (s, 230), ZCKPT_BENCH_BUDGET (s, 150),
#   ZCKPT_BENCH_SIZES (GiB list, 1,4,16), ZCKPT_BENCH_LATER (2), ZCKPT_BENCH_WORKERS (4),
#   ZCKPT_BENCH_DIR (where checkpoints go, /var/tmp), ZCKPT_SITE (install target, /tmp/zckpt-site),
#   ZCKPT_FORCE_WHEELS=1 (install every wheel in .whl/, missing or not: to check the install step).
# The device tool's call (no network there: the missing wheels travel in .whl/, named in carry):
#   run(command="export PYTHON=python3 ZCKPT_TEST_TIMEOUT=200 ZCKPT_BENCH_TIMEOUT=230 ZCKPT_BENCH_BUDGET=150
#                ZCKPT_BENCH_SIZES=1,4,16 ZCKPT_BENCH_LATER=2 ZCKPT_BENCH_WORKERS=4 ZCKPT_BENCH_DIR=/var/tmp;
#                bash bench/device_check.sh; rc=$?; ls -la \"$OUT\"; exit $rc",   (one line)
#       carry=[".whl"], timeout_s=480)
# and first, here, in the repo root (py3.12 wheels; .whl/ is git-ignored, 3.6 MiB):
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#     pyzmq==27.3.0 cloudpickle==3.1.3 xxhash==4.1.0 msgpack==1.2.4 pytest-timeout==2.4.0 \
#     pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 pygments==2.21.0
# Files in $OUT (at most 8 come back from the device): device_check.log (everything),
#   pytest.xml, gpu_bench.json, gpu_bench.md, summary.txt.

set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
OUT=${OUT:-${TMPDIR:-/tmp}/zckpt-device-out}
mkdir -p "$OUT" || exit 2
LOG=$OUT/device_check.log
: >"$LOG"
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1

log() { printf '[device_check %s] %s\n' "$(date -u +%H:%M:%S)" "$*" | tee -a "$LOG"; }

if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then
    PY=$ROOT/.venv/bin/python
else
    PY=python3
fi
T0=$(date +%s)
log "repo $ROOT, OUT $OUT, python $PY"

# --- 1. the machine ---------------------------------------------------------------------
{
    echo "== machine"
    date -u
    uname -a
    nproc
    free -g 2>/dev/null || head -3 /proc/meminfo
    df -h /tmp /var/tmp "$ROOT" 2>/dev/null
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi
        nvidia-smi topo -m 2>/dev/null
    else
        echo "nvidia-smi: not found"
    fi
    "$PY" - <<'EOF'
import sys
print("python", sys.executable, sys.version.split()[0])
try:
    import torch
except Exception as e:  # noqa: BLE001
    print("torch: cannot import:", type(e).__name__, e)
    raise SystemExit(0)
print("torch", torch.__version__, "built for CUDA", torch.version.cuda, "available", torch.cuda.is_available(),
      "devices", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name} cc {p.major}.{p.minor} {p.total_memory / 2**30:.1f} GiB")
EOF
} 2>&1 | tee -a "$LOG"

# --- 2. packages ------------------------------------------------------------------------
SITE=${ZCKPT_SITE:-/tmp/zckpt-site}
# module:distribution, for what zckpt, its tests and the bench import.
missing=$("$PY" - <<'EOF'
import importlib.util
import os
mods = {"zmq": "pyzmq", "cloudpickle": "cloudpickle", "xxhash": "xxhash", "msgpack": "msgpack",
        "pytest": "pytest", "pluggy": "pluggy", "iniconfig": "iniconfig", "packaging": "packaging",
        "pygments": "pygments", "pytest_timeout": "pytest_timeout"}
force = os.environ.get("ZCKPT_FORCE_WHEELS") == "1"
print(" ".join(d for m, d in mods.items() if force or importlib.util.find_spec(m) is None))
EOF
)
log "missing python packages: ${missing:-none}"
wheels=()
for dist in $missing; do
    whl=""
    for f in "$ROOT"/.whl/"$dist"-*.whl; do
        [ -e "$f" ] && whl=$f && break
    done
    if [ -n "$whl" ]; then
        wheels+=("$whl")
    else
        log "WARNING: $dist is missing and .whl/ has no wheel for it"
    fi
done
if [ "${#wheels[@]}" -gt 0 ]; then
    log "installing ${#wheels[@]} wheel(s) into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "${wheels[@]}" 2>&1 | tee -a "$LOG"
    log "pip exit ${PIPESTATUS[0]}"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import zmq, cloudpickle, xxhash, msgpack, pytest, pytest_timeout, zckpt
print("imports ok: pyzmq", zmq.__version__, "pytest", pytest.__version__, "zckpt", zckpt.__version__, zckpt.__file__)' \
    2>&1 | tee -a "$LOG"

# --- 3. the cuda tests ------------------------------------------------------------------
log "cuda tests (timeout ${ZCKPT_TEST_TIMEOUT:-200}s)"
timeout -k 20 "${ZCKPT_TEST_TIMEOUT:-200}" "$PY" -m pytest -m cuda tests/test_cuda.py -v -rA \
    -p no:cacheprovider --junitxml="$OUT/pytest.xml" 2>&1 | tee -a "$LOG"
test_rc=$?
log "cuda tests exit $test_rc$([ "$test_rc" = 124 ] && echo ' (timed out)')"

# --- 4. the benchmark -------------------------------------------------------------------
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    BENCH_DIR=${ZCKPT_BENCH_DIR:-/var/tmp}
    mkdir -p "$BENCH_DIR"
    bench_args=(--sizes-gib "${ZCKPT_BENCH_SIZES:-1,4,16}" --later "${ZCKPT_BENCH_LATER:-2}"
                --workers "${ZCKPT_BENCH_WORKERS:-4}" --budget-s "${ZCKPT_BENCH_BUDGET:-150}" --dir "$BENCH_DIR")
else
    log "no CUDA device here: the bench dry-runs on the CPU with a few MiB"
    bench_args=(--dry-run)
fi
log "bench/gpu.py ${bench_args[*]} (timeout ${ZCKPT_BENCH_TIMEOUT:-230}s)"
timeout -k 20 "${ZCKPT_BENCH_TIMEOUT:-230}" "$PY" bench/gpu.py "${bench_args[@]}" \
    --out "$OUT/gpu_bench.json" --markdown "$OUT/gpu_bench.md" 2>&1 | tee -a "$LOG"
bench_rc=$?
log "bench exit $bench_rc$([ "$bench_rc" = 124 ] && echo ' (timed out: gpu_bench.json holds what finished)')"

# --- 5. summary -------------------------------------------------------------------------
{
    echo "zckpt device check, $(date -u), $(($(date +%s) - T0)) s"
    echo "cuda tests: exit $test_rc"
    grep -E '^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) ' "$LOG" | sort | uniq
    grep -E '^=+ .*(passed|failed|skipped|error).* =+$' "$LOG" | tail -1
    echo "bench: exit $bench_rc"
    if [ -s "$OUT/gpu_bench.md" ]; then
        cat "$OUT/gpu_bench.md"
    elif [ -s "$OUT/gpu_bench.json" ]; then
        "$PY" - "$OUT/gpu_bench.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d.get("rows", []):
    print(r.get("size"), r.get("method"), "blocked", r.get("blocked_s"), "GB/s", r.get("staging_gbps"),
          "durable", r.get("durable_s"), "error", r.get("error"))
for r in d.get("ratios", []):
    print(r)
EOF
    fi
} 2>&1 | tee "$OUT/summary.txt" | tee -a "$LOG"

[ "$test_rc" = 0 ] && [ "$bench_rc" = 0 ]
