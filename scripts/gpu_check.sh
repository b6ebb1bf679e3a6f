#!/usr/bin/env bash
# The GPU check of the Triton ops backends (issue #15; performance.md §0: "GPU checks run as one prepared,
# time-boxed script"). Written for the device machine: one H200, 16 CPU cores, possibly no network.
#
#   OUT=/some/dir bash scripts/gpu_check.sh        # results and logs under $OUT (default ./gpu_check_out)
#
# Steps, each under `timeout` (SIGINT first, so pytest still prints its summary) and each allowed to fail without
# stopping the others:
#   1. environment: nvidia-smi, versions, `import torch, triton, transformers`; when an import fails,
#      `pip install -e ".[dev,triton]"` once (reported clearly when it fails, e.g. without network); the backends
#      each op has on CUDA (the loader's warnings show a kernel file that did not load);
#   2. the parity harness on CUDA: `pytest tests/ops/test_parity.py -k cuda`;
#   3. the other GPU tests: `pytest -m gpu tests/ops` minus test_parity.py (run in step 2);
#   4. a short smoke of the whole CPU test suite with Triton loaded (only when time is left; stops at the first
#      failure or at its timeout, whichever comes first);
#   5. `benchmarks/bench_kernels.py --device cuda` with a time budget (kernels at V4-Flash shapes, then the 2-layer
#      model: prefill to 128K, 1M context chunked, native side by side);
#   6. `benchmarks/bench_prefill.py`, short: it has no device or shape flags (tiny config, fp32, CPU), so it runs
#      as a CPU sanity check of plugin vs native; the V4-Flash-shaped model numbers are in step 5.
# A summary (steps, pass counts, the benchmark's PASS/FAIL goal rows) is printed at the end and written to
# $OUT/summary.txt. Exit status: 0 when every step succeeded, 1 otherwise (only after all steps ran).
# Whole script: under GPU_CHECK_BUDGET_S seconds (default 450, i.e. under 8 minutes). BENCH_ARGS: extra arguments
# for bench_kernels.py (e.g. BENCH_ARGS="--only model" for a rerun of one part).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT"
BUDGET_S="${GPU_CHECK_BUDGET_S:-450}"
START=$SECONDS
PY="${PYTHON:-python}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
unset TRITON_INTERPRET # kernels must compile for the GPU, not run in Triton's CPU interpreter
SUMMARY=()
FAILED=0

left() { echo $((BUDGET_S - (SECONDS - START))); }

# step NAME LIMIT_S CMD...: run CMD under a timeout of min(LIMIT_S, time left - 5 s), output in $OUT/NAME.log.
step() {
    local name=$1 limit=$2
    shift 2
    local avail=$(($(left) - 5))
    ((limit > avail)) && limit=$avail
    if ((limit < 10)); then
        SUMMARY+=("$name: SKIPPED (no time left)")
        echo "=== $name: skipped, no time left ==="
        return 0
    fi
    echo "=== [$((SECONDS - START)) s] $name (limit ${limit} s): $* ==="
    local t0=$SECONDS rc status
    timeout -s INT -k 15 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    tail -n "${TAIL_LINES:-15}" "$OUT/$name.log"
    case $rc in
    0) status=OK ;;
    5) status="NO TESTS COLLECTED (pytest exit 5)" && [ "${ALLOW_EMPTY:-0}" = 1 ] && rc=0 ;;
    124 | 137) status="TIMEOUT after ${limit} s (exit $rc)" ;;
    *) status="FAILED (exit $rc)" ;;
    esac
    ((rc != 0)) && FAILED=1
    SUMMARY+=("$name: $status, $((SECONDS - t0)) s, log $name.log")
    return 0
}

# pytest's counts from a JUnit report (scripts/junit_summary.py), or why there are none.
junit_counts() {
    if [ -s "$1" ]; then "$PY" scripts/junit_summary.py "$1" 2>&1; else echo "no JUnit report (crashed or killed)"; fi
}

# ------------------------------------------------------------------------------------------------ 1. environment
echo "=== [$((SECONDS - START)) s] environment ==="
{
    echo "date: $(date -u)"
    echo "host: $(uname -a)"
    echo "python: $(command -v "$PY") ($("$PY" --version 2>&1))"
    echo "cpus: $(nproc)"
    nvidia-smi 2>&1 || echo "nvidia-smi not available"
} >"$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt" | head -n 30

IMPORT_CHECK='import torch, triton, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("triton", triton.__version__, "transformers", transformers.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")'
if ! timeout 120 "$PY" -c "$IMPORT_CHECK" >>"$OUT/environment.txt" 2>&1; then
    for mod in torch triton transformers pytest; do
        timeout 60 "$PY" -c "import $mod" >/dev/null 2>&1 || echo "missing: $mod" | tee -a "$OUT/environment.txt"
    done
    echo "=== some imports failed: pip install -e \".[dev,triton]\" (needs PyPI) ==="
    step pip_install 240 "$PY" -m pip install --retries 1 --timeout 15 -e ".[dev,triton]"
    if ! timeout 120 "$PY" -c "$IMPORT_CHECK" >>"$OUT/environment.txt" 2>&1; then
        SUMMARY+=("environment: torch / triton / transformers NOT importable after the install attempt (see pip_install.log); later steps will fail")
        FAILED=1
    fi
fi
# Subpackages mapped by pyproject's package-dir (conversion, quantization) need an install; offline, no deps.
if ! timeout 60 "$PY" -c "import modeling_deepseek_v4.quantization" >/dev/null 2>&1; then
    step pip_editable 120 "$PY" -m pip install --no-deps --no-build-isolation -e .
fi
timeout 60 "$PY" -m pytest --version >>"$OUT/environment.txt" 2>&1 || echo "pytest: not importable" >>"$OUT/environment.txt"

BACKENDS_CHECK='import logging
logging.basicConfig(level=logging.WARNING)  # the loader logs a kernel file that failed to import or register
from modeling_deepseek_v4 import ops
ops_names = ("rms_norm", "hc_pre", "hc_post", "hc_head", "compress_pool", "indexer_topk", "sparse_attention",
             "grouped_experts", "quantized_linear")
for op in ops_names:
    print(f"{op:18s} {ops.available_backends(op)}")
missing = [op for op in ops_names if "triton" not in ops.available_backends(op)]
print("ops without a triton backend:", ", ".join(missing) or "none")'
echo "--- backends per op on this machine ---" | tee -a "$OUT/environment.txt"
timeout 180 "$PY" -c "$BACKENDS_CHECK" 2>&1 | tee -a "$OUT/environment.txt"
SUMMARY+=("environment: $(grep -m1 '^torch ' "$OUT/environment.txt" || echo 'torch not importable'); $(grep -m1 '^device ' "$OUT/environment.txt" || echo 'no device line'); $(grep -m1 'ops without a triton backend' "$OUT/environment.txt" || echo 'backend check failed')")

# ------------------------------------------------------------------------------------------------ 2-3. GPU tests
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfE)
step parity_cuda 130 "${PYTEST[@]}" tests/ops/test_parity.py -k cuda --junitxml="$OUT/junit_parity_cuda.xml"
SUMMARY+=("  parity on CUDA: $(junit_counts "$OUT/junit_parity_cuda.xml")")
# No other GPU-marked test is not an error (exit 5 accepted here); no CUDA parity case is.
ALLOW_EMPTY=1 step gpu_tests 60 "${PYTEST[@]}" -m gpu tests/ops --ignore=tests/ops/test_parity.py \
    --junitxml="$OUT/junit_gpu.xml"
SUMMARY+=("  other GPU tests: $(junit_counts "$OUT/junit_gpu.xml")")

# ------------------------------------------------------------------------------- 4. suite smoke (if time allows)
BENCH_RESERVE=240 # seconds kept for steps 5-6
if (($(left) > BENCH_RESERVE + 40)); then
    SMOKE=$(($(left) - BENCH_RESERVE))
    ((SMOKE > 60)) && SMOKE=60
    step suite_smoke "$SMOKE" "${PYTEST[@]}" -x -m "not gpu and not slow" tests --ignore=tests/ops/test_parity.py \
        --junitxml="$OUT/junit_suite_smoke.xml"
    SUMMARY+=("  suite smoke (stops at the first failure or the timeout): $(grep -E '(passed|failed|error)' "$OUT/suite_smoke.log" | tail -n 1)")
else
    SUMMARY+=("suite_smoke: SKIPPED (only $(left) s left, ${BENCH_RESERVE} s kept for the benchmarks)")
fi

# ----------------------------------------------------------------------------------------------- 5. bench_kernels
BENCH_LIMIT=$(($(left) - 75)) # 60 s for bench_prefill, 15 s for the summary
CASE_TIMEOUT=45
BENCH_BUDGET=$((BENCH_LIMIT - CASE_TIMEOUT - 30)) # no new case after it; a started one may take CASE_TIMEOUT
((BENCH_BUDGET < 30)) && BENCH_BUDGET=30
TAIL_LINES=80 step bench_kernels "$BENCH_LIMIT" "$PY" benchmarks/bench_kernels.py --device cuda \
    --time-budget "$BENCH_BUDGET" --case-timeout "$CASE_TIMEOUT" --out "$OUT/bench_kernels.md" ${BENCH_ARGS:-}
if [ -s "$OUT/bench_kernels.md" ]; then
    SUMMARY+=("  bench_kernels goals: $(grep -c '| PASS |' "$OUT/bench_kernels.md") PASS, $(grep -c '| FAIL |' "$OUT/bench_kernels.md") FAIL (table in bench_kernels.md)")
else
    SUMMARY+=("  bench_kernels: no table written (see bench_kernels.log)")
fi

# ----------------------------------------------------------------------------------------------- 6. bench_prefill
# No --device / shape flags: tiny config, fp32, CPU, plugin vs native; kept short.
step bench_prefill 60 "$PY" benchmarks/bench_prefill.py --sizes 1024 4096 --plugin-only-sizes --repeats 3 \
    --threads 16 --timeout 40 --out "$OUT/bench_prefill.md"

# --------------------------------------------------------------------------------------------------- summary
{
    echo "=== summary (${BUDGET_S} s budget, $((SECONDS - START)) s used) ==="
    printf '%s\n' "${SUMMARY[@]}"
    if [ -s "$OUT/bench_kernels.md" ]; then
        echo "--- bench_kernels rows with a goal ---"
        grep -E '\| (PASS|FAIL|n/a \([a-z]+\)) \|$' "$OUT/bench_kernels.md" || true
        echo "--- bench_kernels model rows ---"
        grep -E '^\| (prefill|chunked)' "$OUT/bench_kernels.md" || true
    fi
    echo "files under $OUT:"
    ls -la "$OUT"
} 2>&1 | tee "$OUT/summary.txt"
exit $FAILED
