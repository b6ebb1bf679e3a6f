"""`benchmarks/bench_scaleout.py --quick` in a subprocess (2 gloo CPU ranks, ~20 s on 2 cores): the report has a
prefill row and a training-step row per configuration (single process, TP, EP, FSDP2) with numbers for every rank,
and the numbers are consistent with what each configuration shards:
- params + buffers per rank: TP and EP below the single process (heads, experts, vocabulary split; KV head,
  compressors, indexer, MTP replicated), equal to each other (EP on the TP ranks: whole experts instead of halves of
  every expert, the same bytes), FSDP2 half of it (every tensor sharded on dim 0; 0.45-0.55 allows padding);
- the first training step's loss (before any update) equals the single process's to 1e-5 absolute (fp32; the
  ranks reduce in another order; observed equal to the 6 printed decimals), so every configuration ran the same
  model on the same batch.
Timings are not checked beyond being positive: the machine's cores are shared."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("single process", "TP (tp_size=2)", "EP (tp_size=2, ep_size=2)", "FSDP2 (fsdp_size=2)")
NUMBER = r"\d+(?:\.\d+)?"


def _per_rank(cell: str, ranks: int) -> list[float]:
    values = cell.split(" / ")
    assert len(values) == ranks and all(re.fullmatch(NUMBER, v) for v in values), cell
    return [float(v) for v in values]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    out = tmp_path_factory.mktemp("bench") / "scaleout.md"
    command = [sys.executable, os.path.join("benchmarks", "bench_scaleout.py"), "--quick", "--out", str(out)]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-4000:]
    text = out.read_text()
    assert text.strip() in run.stdout  # stdout carries the same report
    return text


def _rows(text: str) -> dict[tuple[str, str], dict]:
    """`{(configuration, phase): row}` from the markdown table, per-rank cells parsed."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 9 or cells[0] not in CONFIGS:
            continue
        ranks = int(cells[2])
        assert not cells[3].startswith("failed"), line
        rows[cells[0], cells[1]] = {
            "ranks": ranks,
            "tokens_s": float(cells[3]),
            "step_s": float(cells[4]),
            "peak": _per_rank(cells[5], ranks),
            "growth": _per_rank(cells[6], ranks),
            "held": _per_rank(cells[7], ranks),
            "loss": None if cells[8] == "-" else float(cells[8]),
        }
    return rows


def test_header_names_command_commit_and_caveat(report):
    assert "Command: `python benchmarks/bench_scaleout.py --quick --out" in report
    assert re.search(r"Commit [0-9a-f]{4,40}|Commit unknown", report)
    assert "not speed" in report


def test_a_row_per_configuration_and_phase_with_numbers(report):
    rows = _rows(report)
    assert set(rows) == {(c, p) for c in CONFIGS for p in ("prefill forward", "training step")}
    for (name, _), row in rows.items():
        assert row["ranks"] == (1 if name == "single process" else 2)
        assert row["tokens_s"] > 0 and row["step_s"] > 0
        assert all(p > 0 for p in row["peak"]) and all(h > 0 for h in row["held"])


def test_held_bytes_and_first_loss_follow_the_sharding(report):
    rows = _rows(report)
    single = rows["single process", "training step"]
    tp, ep = rows["TP (tp_size=2)", "training step"], rows["EP (tp_size=2, ep_size=2)", "training step"]
    fsdp = rows["FSDP2 (fsdp_size=2)", "training step"]
    full = single["held"][0]
    for rank in range(2):
        assert tp["held"][rank] < 0.9 * full and ep["held"][rank] == pytest.approx(tp["held"][rank], abs=0.01)
        assert 0.45 * full < fsdp["held"][rank] < 0.55 * full
    for row in (tp, ep, fsdp):
        assert row["loss"] == pytest.approx(single["loss"], abs=1e-5)
