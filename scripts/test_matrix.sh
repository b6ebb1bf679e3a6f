#!/usr/bin/env bash
# The CPU test suite under both ends of the supported transformers range (floor and newest published release),
# each in its own fresh virtual environment; README "Tests" and .ci/run run exactly this. Prints pytest's summary per
# lane, then a total line; exits non-zero if any version fails to install or has a failing test.
# Lanes: the floor runs without Triton or DeepSpeed installed (the package must work without them); the newest
# installs the `triton` and `deepspeed` extras (ZeRO-2 / ZeRO-3 on 2 gloo ranks in tests/distributed) and also runs
# the Triton kernels through Triton's CPU interpreter (`TRITON_INTERPRET=1`, tiny shapes) against the reference: every
# `tests/ops` test whose id names triton (the parity harness's triton backend and `tests/ops/test_triton_*.py`). The
# lanes run at the same time (the tests are single-threaded, CI has 2 cores); each lane's output is printed when it
# ends.
# Widening the supported range: add the new release here, run this script, then raise the upper bound in
# pyproject.toml and modeling_deepseek_v4/compat.py (tests/test_compat.py checks that the three agree).
set -uo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
TRANSFORMERS_VERSIONS=(5.23.0 5.24.0)
NEWEST=${TRANSFORMERS_VERSIONS[-1]}

status=0
lines=()
reports=()
pids=()
labels=()
logs=()
junits=()

# record LABEL RC JUNIT: one summary line per lane; a missing report or a non-zero exit fails the run.
record() {
    local counts="no test report"
    # pytest exits 5 when it collected nothing: that is a failure here too.
    [ "$2" -ne 0 ] && status=1
    if [ -f "$3" ]; then
        reports+=("$3")
        counts=$(python3 scripts/junit_summary.py "$3")
    else
        status=1
    fi
    lines+=("$1: $counts (pytest exit $2)")
}

# lane LABEL LOG JUNIT [VAR=VALUE...] COMMAND...: start one pytest run in the background.
lane() {
    local label=$1 log=$2 junit=$3
    shift 3
    echo "=== $label: started (log $log) ==="
    env "$@" --junitxml="$junit" >"$log" 2>&1 &
    pids+=($!)
    labels+=("$label")
    logs+=("$log")
    junits+=("$junit")
}

for version in "${TRANSFORMERS_VERSIONS[@]}"; do
    env=".venv-ci-$version"
    extras="dev"
    [ "$version" = "$NEWEST" ] && extras="dev,triton,deepspeed"
    rm -rf "$env"
    echo "=== transformers $version: installing into $env (extras: $extras) ==="
    # DS_BUILD_OPS=0: DeepSpeed installs without compiling its CUDA ops (CPU CI; it JIT-builds what it needs).
    if ! { python3 -m venv "$env" &&
        DS_BUILD_OPS=0 "$env/bin/pip" install -q torch==2.13.0 "transformers==$version" -e ".[$extras]"; }; then
        echo "=== transformers $version: installation FAILED ==="
        lines+=("transformers $version: installation failed")
        status=1
        continue
    fi
    lane "transformers $version" "$env/tests.log" "$env/junit.xml" \
        "$env/bin/python" -m pytest -q -m "not gpu" -p no:cacheprovider
    if [ "$version" = "$NEWEST" ]; then
        lane "transformers $version, Triton interpreter" "$env/interpret.log" "$env/junit-interpret.xml" \
            TRITON_INTERPRET=1 "$env/bin/python" -m pytest -q -m "not gpu" -p no:cacheprovider \
            tests/ops -k triton
    fi
done

for i in "${!pids[@]}"; do
    wait "${pids[$i]}"
    rc=$?
    echo "=== ${labels[$i]}: finished (pytest exit $rc) ==="
    # the whole log when something failed, else its last lines (the summary)
    if [ "$rc" -ne 0 ]; then cat "${logs[$i]}"; else tail -n 15 "${logs[$i]}"; fi
    record "${labels[$i]}" "$rc" "${junits[$i]}"
done

echo "=== summary ==="
printf '%s\n' "${lines[@]}"
python3 scripts/junit_summary.py --total "${reports[@]}"
exit $status
