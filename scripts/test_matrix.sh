#!/usr/bin/env bash
# The CPU test suite under both ends of the supported transformers range (floor and newest published release),
# each in its own fresh virtual environment; README "Tests" and .ci/run run exactly this. Prints pytest's summary per
# lane, then a total line; exits non-zero if any version fails to install or has a failing test.
# Lanes: the floor runs without Triton installed (the package must work without it); the newest installs the
# `triton` extra and, beside its main suite (in parallel: each lane is one busy core), runs the Triton kernels through
# Triton's CPU interpreter (`TRITON_INTERPRET=1`, tiny shapes) against the reference: every `tests/ops` test whose id
# names triton (the parity harness's triton backend and `tests/ops/test_triton_*.py`).
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

for version in "${TRANSFORMERS_VERSIONS[@]}"; do
    env=".venv-ci-$version"
    extras="dev"
    [ "$version" = "$NEWEST" ] && extras="dev,triton"
    rm -rf "$env"
    echo "=== transformers $version: installing into $env (extras: $extras) ==="
    if ! { python3 -m venv "$env" &&
        "$env/bin/pip" install -q torch==2.13.0 "transformers==$version" -e ".[$extras]"; }; then
        echo "=== transformers $version: installation FAILED ==="
        lines+=("transformers $version: installation failed")
        status=1
        continue
    fi
    interpret_pid=""
    if [ "$version" = "$NEWEST" ]; then
        echo "=== transformers $version: Triton interpreter lane (background, log in $env/interpret.log) ==="
        TRITON_INTERPRET=1 "$env/bin/python" -m pytest -q -m "not gpu" -p no:cacheprovider tests/ops -k triton \
            --junitxml="$env/junit-interpret.xml" >"$env/interpret.log" 2>&1 &
        interpret_pid=$!
    fi
    echo "=== transformers $version: tests ==="
    "$env/bin/python" -m pytest -q -m "not gpu" -p no:cacheprovider --junitxml="$env/junit.xml"
    record "transformers $version" $? "$env/junit.xml"
    if [ -n "$interpret_pid" ]; then
        wait "$interpret_pid"
        rc=$?
        echo "=== transformers $version: Triton interpreter lane ==="
        tail -n 30 "$env/interpret.log"
        record "transformers $version, Triton interpreter" "$rc" "$env/junit-interpret.xml"
    fi
done

echo "=== summary ==="
printf '%s\n' "${lines[@]}"
python3 scripts/junit_summary.py --total "${reports[@]}"
exit $status
