"""The fine-tuning example runs as a user would run it and fails when it should."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "finetune_lora.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_finetune_example_learns_the_toy_task_and_reloads_its_adapter(tmp_path):
    done = _run("--steps", "20", "--output-dir", str(tmp_path / "adapter"))
    assert done.returncode == 0, done.stderr[-2000:]
    before, after = map(float, re.search(r"before ([\d.]+), after ([\d.]+)", done.stdout).groups())
    assert after - before >= 0.3
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert "reloaded adapter accuracy" in done.stdout


def test_finetune_example_fails_when_it_does_not_learn(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("finetune_lora", SCRIPT)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)  # in this process: the subprocess run above already covers the CLI
    assert example.main(["--steps", "1", "--lr", "0", "--output-dir", str(tmp_path / "adapter")]) == 1
    assert "FAILED: accuracy rose by" in capsys.readouterr().err
