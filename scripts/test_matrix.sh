#!/usr/bin/env bash
# The CPU test suite under both ends of the supported transformers range (floor and newest published release),
# each in its own fresh virtual environment; README "Tests" and .ci/run run exactly this. Prints pytest's summary per
# version, then a total line; exits non-zero if any version fails to install or has a failing test.
# Widening the supported range: add the new release here, run this script, then raise the upper bound in
# pyproject.toml and modeling_deepseek_v4/compat.py (tests/test_compat.py checks that the three agree).
set -uo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
TRANSFORMERS_VERSIONS=(5.23.0 5.24.0)

status=0
lines=()
reports=()
for version in "${TRANSFORMERS_VERSIONS[@]}"; do
    env=".venv-ci-$version"
    rm -rf "$env"
    echo "=== transformers $version: installing into $env ==="
    if ! { python3 -m venv "$env" &&
        "$env/bin/pip" install -q torch==2.13.0 "transformers==$version" -e ".[dev]"; }; then
        echo "=== transformers $version: installation FAILED ==="
        lines+=("transformers $version: installation failed")
        status=1
        continue
    fi
    echo "=== transformers $version: tests ==="
    "$env/bin/python" -m pytest -q -m "not gpu" -p no:cacheprovider --junitxml="$env/junit.xml"
    rc=$?
    # pytest exits 5 when it collected nothing: that is a failure here too.
    [ "$rc" -ne 0 ] && status=1
    counts="no test report"
    if [ -f "$env/junit.xml" ]; then
        reports+=("$env/junit.xml")
        counts=$(python3 scripts/junit_summary.py "$env/junit.xml")
    fi
    lines+=("transformers $version: $counts (pytest exit $rc)")
done

echo "=== summary ==="
printf '%s\n' "${lines[@]}"
python3 scripts/junit_summary.py --total "${reports[@]}"
exit $status
