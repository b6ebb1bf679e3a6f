"""The kernel benchmark and the GPU check script (issue #15) stay runnable without a GPU: `bench_kernels.py
--dry-run` (tiny shapes, CPU, reference backend) prints a row with a timing for every kernel and the model part,
its useful-work formulas match brute-force counts, and `scripts/gpu_check.sh` parses."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench_kernels.py"
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
KERNELS = ("sparse_attention", "indexer_topk", "compress_pool", "hc_pre", "hc_post", "grouped_experts",
           "quantized_linear")  # fmt: skip


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_kernels", module)  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return sys.modules["bench_kernels"]


def _run(*args: str, timeout: float = 110) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def _rows(table: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")
    ]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, str]:
    out = tmp_path_factory.mktemp("bench") / "kernels.md"
    proc = _run("--dry-run", "--out", str(out))
    return proc, out.read_text() if out.exists() else ""


def test_dry_run_has_a_timed_row_per_kernel(dry_run):
    proc, table = dry_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert table and table in proc.stdout  # --out holds what was printed
    rows = _rows(table)
    head = next(r for r in rows if r[0] == "kernel")
    col = head.index("reference ms (runs)")
    timed = {}
    for row in rows:
        if row[0] in KERNELS and re.match(r"^\d+(\.\d+)? \(\d+( cold run)?\)$", row[col]):
            timed.setdefault(row[0], []).append(float(row[col].split()[0]))
    assert set(timed) == set(KERNELS), f"kernels without a timed row: {set(KERNELS) - set(timed)}\n{table}"
    assert all(t > 0 for times in timed.values() for t in times)
    # Every case of the dry run fits its budget and runs without error: nothing skipped, no note but the model's
    # list of ops on the reference.
    assert "Skipped (" not in table, table
    tail = table.split("Notes and errors:")[1] if "Notes and errors:" in table else ""
    notes = [ln for ln in tail.splitlines() if ln.startswith("- ")]
    assert all(ln.startswith("- model, plugin (auto): ops with no other backend") for ln in notes), table
    for kind in ("CSA prefill", "HCA prefill", "window prefill", "CSA decode", "HCA decode"):
        assert any(r[0] == "sparse_attention" and r[1].startswith(kind) for r in rows), kind
    # The model part: one-pass prefill for the plugin (auto, reference) and native, then the chunked long context.
    model = [r for r in rows if r[0].startswith(("prefill", "chunked"))]
    impls = {r[2] for r in model if r[0].startswith("prefill") and re.match(r"^\d+\.\d+$", r[3])}
    assert impls == {"plugin (auto)", "plugin (reference)", "native transformers"}, table
    chunked = [r for r in model if r[0].startswith("chunked")]
    assert chunked and re.match(r"^\d+\.\d+$", chunked[0][3]) and "ms/token" in chunked[0][7], table


def test_only_and_time_budget(tmp_path, capsys):
    """`--only` restricts the kernels; with no time budget nothing starts and every case is listed as skipped.
    In-process (the subprocess run above already covers the script's entry point)."""
    bench = _bench_module()
    out = tmp_path / "t.md"
    assert bench.main(["--dry-run", "--only", "hc,compressor", "--time-budget", "0", "--out", str(out)]) == 0
    table = out.read_text()
    assert table in capsys.readouterr().out
    kernels = [r[0] for r in _rows(table) if r[0] in KERNELS]
    assert set(kernels) == {"hc_pre", "hc_post", "compress_pool"}, table
    skipped = table.split("Skipped (")[1].split("\n\n")[0]
    assert skipped.count("\n- ") == len(kernels), table  # no model part without "model" in --only
    with pytest.raises(SystemExit, match="unknown kernel"):
        bench.select("hc,no_such_kernel")


def test_work_formulas_match_brute_force():
    bench = _bench_module()
    w, m, k = 8, 4, 5
    for start, s, cached in ((0, 40, 0), (33, 1, 7), (3, 6, 2)):
        pos = list(range(start, start + s))
        first = max(0, start - cached)
        brute = sum(1 for t in pos for j in range(first, start + s) if 0 <= t - j < w)
        assert bench.window_keys(start, s, w, cached) == brute
        n = (start + s) // m
        causal = [min((t + 1) // m, n) for t in pos]
        assert bench.compressed_keys(start, s, m, n, None) == sum(causal)
        assert bench.compressed_keys(start, s, m, n, k) == sum(min(c, k) for c in causal)
        assert bench.indexer_flops(start, s, m, k, 2, 3) == sum(c for c in causal if c > k) * 2 * (2 * 3 + 2)


def test_csa_topk_indices_are_causal_unique_sorted():
    bench = _bench_module()
    inp = bench.Inputs(torch.device("cpu"), torch.float32)
    start, s, m, k, n = 0, 300, 4, 16, 75
    idx = inp.csa_topk(2, s, start, m, k, n)
    assert idx.shape == (2, s, k) and idx.dtype == torch.long
    for t in range(s):
        limit = min((start + t + 1) // m, n)
        for b in range(2):
            row = idx[b, t]
            valid = row[row >= 0]
            assert len(valid) == min(k, limit)
            assert bool((valid < limit).all()) and bool((valid[1:] > valid[:-1]).all())
            assert bool((row[len(valid) :] == -1).all())


def test_gpu_check_script_parses():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not available")
    proc = subprocess.run([bash, "-n", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    text = SCRIPT.read_text()
    # Each pytest / benchmark step runs under a timeout; the benchmark gets a time budget and writes under $OUT.
    assert "timeout -s INT" in text and "--time-budget" in text and '--out "$OUT/bench_kernels.md"' in text
