"""The transformers-version seam (modeling_deepseek_v4/compat.py) and the supported-version policy: the declared range
is the tested range, and adapters work through PEFT on every supported transformers."""

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from modeling_deepseek_v4 import DeepseekV4Cache
from modeling_deepseek_v4.compat import (
    CACHE_FIELD,
    TRANSFORMERS_REQUIREMENT,
    cache_of,
    pick_cache,
    quiet_bitsandbytes_import,
)
from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def declared(name: str) -> SpecifierSet:
    """The version specifier of `name` in pyproject.toml's dependencies (or the dev extra)."""
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(rf'"{re.escape(name)}([<>=!~][^"]*)"', text)
    assert match, f"{name} is not declared in pyproject.toml"
    return SpecifierSet(match.group(1))


def test_declared_range_is_the_tested_range():
    spec = declared("transformers")
    assert SpecifierSet(TRANSFORMERS_REQUIREMENT.removeprefix("transformers")) == spec, (
        "pyproject.toml and compat.TRANSFORMERS_REQUIREMENT disagree"
    )
    script = (ROOT / "scripts" / "test_matrix.sh").read_text()
    tested = [Version(v) for v in re.search(r"TRANSFORMERS_VERSIONS=\(([^)]*)\)", script).group(1).split()]
    floor = min(spec, key=lambda s: s.operator != ">=")
    ceiling = next(s for s in spec if s.operator == "<")
    assert floor.operator == ">=" and min(tested) == Version(floor.version), "the floor must be tested"
    newest = max(tested)
    assert newest in spec, f"the newest tested release {newest} is outside the declared range {spec}"
    assert Version(ceiling.version) == Version(f"{newest.major}.{newest.minor + 1}"), (
        f"the upper bound {ceiling} must be the minor after the newest tested release {newest}"
    )
    assert Version(transformers.__version__) in spec, "this environment runs an untested transformers"
    assert declared("peft").contains("0.21.2") and not declared("peft").contains("0.22.0")


def test_saved_folders_require_the_tested_range(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    requirements = (tmp_path / "requirements.txt").read_text().split()
    assert TRANSFORMERS_REQUIREMENT in requirements


def test_cache_names():
    """Outputs answer both names; a forward takes either; two different caches at once are refused."""
    assert CACHE_FIELD == ("cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values")
    model = tiny_model()
    ids = torch.randint(2, 97, (1, 12))
    with torch.no_grad():
        out = model(ids, use_cache=True)
    assert out.cache is out.past_key_values is cache_of(out)
    assert isinstance(out.cache, DeepseekV4Cache)
    with pytest.raises(ValueError, match="two different caches"):
        pick_cache(DeepseekV4Cache(model.config), DeepseekV4Cache(model.config))
    with torch.no_grad():
        by_old_name = model(ids[:, :3], past_key_values=out.cache).logits
        reference = model(torch.cat([ids, ids[:, :3]], 1), use_cache=False).logits[:, -3:]
    torch.testing.assert_close(by_old_name, reference, atol=1e-5, rtol=0)


def test_peft_adapters_train_save_and_load_on_this_transformers(tmp_path):
    """`get_peft_model` and `PeftModel.from_pretrained` work on every supported transformers; `model.add_adapter`
    works, or (transformers >= 5.24 with PEFT < 0.22) fails saying what to use instead."""
    peft = pytest.importorskip("peft", reason="PEFT is an optional dependency (the dev extra installs it)")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=r".*layers\.[02]\.self_attn\.(q_a_proj|o_b_proj)")
    model = peft.get_peft_model(tiny_model(), config)
    ids = torch.randint(2, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_model(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
        assert not torch.equal(loaded(ids).logits, tiny_model()(ids).logits)

    plain = tiny_model()
    try:
        plain.add_adapter(config)
    except ImportError as exc:
        assert Version(transformers.__version__) >= Version("5.24") and Version(peft.__version__) < Version("0.22")
        assert "peft.get_peft_model" in str(exc) and "PeftModel.from_pretrained" in str(exc)
    else:
        assert any("lora_A" in name for name, _ in plain.named_parameters())


def test_bitsandbytes_kernels_hint_is_dropped_only_while_we_import_peft(caplog):
    """bitsandbytes 0.50 on AVX512-BF16 CPUs logs a missing-`kernels` hint when PEFT imports it: not on our import."""
    bnb_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    hint = "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'."
    with caplog.at_level(logging.WARNING, logger=bnb_logger.name):
        with quiet_bitsandbytes_import():
            bnb_logger.warning(hint)
            bnb_logger.warning("another bitsandbytes warning")
        bnb_logger.warning(hint)
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning", hint]
    # and importing the package prints nothing at all (on any CPU: the stray line came from that import)
    run = subprocess.run([sys.executable, "-c", "import modeling_deepseek_v4"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stderr.strip() == "" and run.stdout == "", run.stderr
