"""Package-level checks: the demo (main job), the CLI, and importing without optional dependencies."""

import subprocess
import sys
import textwrap

from modeling_deepseek_v4.__main__ import main


def test_demo_runs_and_checks_itself(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path), "--new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "demo OK" in out and "reloaded with AutoModelForCausalLM.from_pretrained" in out
    assert "official layout (FP8 + FP4 experts)" in out and "converted back with dsv4-convert" in out
    assert (tmp_path / "converted" / "README.md").read_text().startswith("---")
    assert (tmp_path / "official" / "config.json").exists() and (tmp_path / "converted" / "config.json").exists()


def test_demo_fails_loudly_when_cached_decoding_is_wrong(tmp_path, capsys, monkeypatch):
    """The failure transformers 5.24 caused before the cache-name seam: every step starts from an empty cache.
    The demo must print the difference and exit non-zero, not "demo OK"."""
    import modeling_deepseek_v4.modeling_deepseek_v4 as modeling

    monkeypatch.setattr(modeling, "pick_cache", lambda cache=None, past_key_values=None: None)
    assert main(["demo", "--output-dir", str(tmp_path), "--new-tokens", "6"]) == 1
    out = capsys.readouterr().out
    assert "demo OK" not in out and "demo FAILED" in out
    assert "MISMATCH batch row 0: first difference at new token" in out


def test_imports_and_runs_with_triton_bitsandbytes_and_peft_blocked():
    code = textwrap.dedent(
        """
        import sys
        for name in ("triton", "bitsandbytes", "peft"):
            sys.modules[name] = None  # any import of these now raises ImportError
        import torch
        from modeling_deepseek_v4 import DeepseekV4ExtConfig, DeepseekV4ExtForCausalLM, ops
        from modeling_deepseek_v4.demo import tiny_demo_config
        model = DeepseekV4ExtForCausalLM(tiny_demo_config()).eval()
        with torch.no_grad():
            logits = model(torch.randint(0, 512, (1, 20))).logits
        assert torch.isfinite(logits).all()
        assert ops.available_backends("sparse_attention") == ["reference"]
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
