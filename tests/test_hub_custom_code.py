"""A saved folder loads with `trust_remote_code=True` from an offline Hub cache where this package is NOT
importable and Triton is blocked (hf-integration.md §5: the Hub-only import check runs on every copied file)."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from modeling_deepseek_v4.quantization import quantize_model
from tests.conftest import tiny_model

CHILD = textwrap.dedent(
    """
    import sys
    for name in ("modeling_deepseek_v4", "triton"):
        sys.modules[name] = None  # importing either now fails
    import torch
    torch.set_num_threads(1)
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    repo = "dsv4-tests/tiny-v4"
    model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert type(AutoConfig.from_pretrained(repo, trust_remote_code=True)).__name__ == "DeepseekV4ExtConfig"
    assert type(AutoModel.from_pretrained(repo, trust_remote_code=True)).__name__ == "DeepseekV4ExtModel"
    if len(sys.argv) > 3:  # quantized folder: the quantized modules come from the Hub copy too
        experts = type(model.model.layers[0].mlp.experts)
        assert experts.__name__ == sys.argv[3] and experts.__module__.startswith("transformers_modules"), experts
        assert model.model.layers[0].self_attn.q_a_proj.weight.dtype == torch.float8_e4m3fn
    ids = torch.load(sys.argv[1])
    with torch.no_grad():
        torch.save(model(ids, use_cache=False).logits, sys.argv[2])
    """
)


def fake_hub_cache(folder, cache, repo="dsv4-tests/tiny-v4", revision="0123456789abcdef0123456789abcdef01234567"):
    """Lay `folder` out as `huggingface_hub`'s cache: models--org--name/{refs/main, snapshots/<sha>/...}."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(revision)
    shutil.copytree(folder, root / "snapshots" / revision)


def test_saved_folder_carries_custom_code(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "deepseek_v4_ext"
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    files = {p.name for p in tmp_path.iterdir()}
    assert {"modeling_deepseek_v4.py", "configuration_deepseek_v4.py", "ops.py", "requirements.txt"} <= files
    assert not {"__init__.py", "__main__.py", "demo.py"} & files  # pip-only files stay out


def run_offline(code: str, args: list[str], tmp_path) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter in `tmp_path`, offline, with the fake Hub cache `tmp_path/hub` and a clean
    modules cache (the child blocks the package itself)."""
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "mods")}
    env["PATH"] = "/usr/bin:/bin"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "fp8-fp4"])
def test_loads_from_offline_hub_cache_without_the_package(tmp_path, quantized):
    model = tiny_model()
    if quantized:
        quantize_model(model, weights="fp8", experts="fp4")
    model.save_pretrained(tmp_path / "saved")
    fake_hub_cache(tmp_path / "saved", tmp_path / "hub")
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    torch.save(ids, tmp_path / "ids.pt")
    args = [str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")] + (["DeepseekV4QuantizedExperts"] if quantized else [])
    run = run_offline(CHILD, args, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    # Same weights and code; another process may pick other BLAS kernels (last-ulp differences).
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, atol=1e-5, rtol=0)
