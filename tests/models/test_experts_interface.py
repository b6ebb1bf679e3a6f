"""transformers' `experts_implementation` on the routed experts (`experts_interface.py`).

Every accepted choice (`eager` = this package's op, `grouped_mm`, `batched_mm` = transformers' functions) gives the
eager logits and gradients (fp32, 1e-5) on the tiny model, whose first two layers are hash-routed; the SwiGLU
limit is lowered so that the clamp binds (a test shows that dropping it moves the logits). Names the model does
not support raise and say what is allowed; quantized / QAT banks and grouped LoRA stay on this package's op with a
warning; the choice is runtime state that `save_pretrained` does not write.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations.moe import _default_apply_gate

from modeling_deepseek_v4 import experts_interface
from modeling_deepseek_v4.moe import DeepseekV4Experts
from tests.conftest import tiny_model

torch.set_num_threads(1)

LIMIT = 0.5  # the tiny model's gate / up projections reach ~2: the clamp binds on many entries
IDS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
ALLOWED = ('"eager"', '"grouped_mm"', '"batched_mm"')


def _model():
    model = tiny_model(swiglu_limit=LIMIT)
    assert model.config._experts_implementation == "eager"  # not transformers' `grouped_mm` default
    return model


@pytest.fixture
def calls(monkeypatch):
    """Count the calls of transformers' experts functions, by name."""
    seen: dict[str, int] = {}
    original = experts_interface._transformers_function

    def counting(name):
        fn = original(name)

        def wrapped(*args, **kwargs):
            seen[name] = seen.get(name, 0) + 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(experts_interface, "_transformers_function", counting)
    return seen


@pytest.fixture
def warnings(monkeypatch):
    seen: list[str] = []
    monkeypatch.setattr(experts_interface.logger, "warning_once", lambda msg, *a, **k: seen.append(msg))
    return seen


def _logits_and_grads(model, implementation):
    model.set_experts_implementation(implementation)
    model.zero_grad()
    out = model(IDS, labels=IDS, use_cache=False)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def _moe_layers(model) -> int:
    """Experts run by a plain forward: the decoder layers' (the MTP layers' experts run only when drafting)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return sum(isinstance(m, DeepseekV4Experts) for m in base.model.layers.modules())


def test_transformers_implementations_match_eager_logits_and_gradients(calls, warnings):
    model = _model()
    ref_logits, ref_grads = _logits_and_grads(model, "eager")
    assert not calls
    assert any(name.endswith("experts.gate_up_proj") for name in ref_grads)
    for implementation in ("grouped_mm", "batched_mm"):
        logits, grads = _logits_and_grads(model, implementation)
        assert model.get_experts_implementation() == {"": implementation}
        # every decoder MoE (hash layers included) went through transformers' function
        assert calls.pop(implementation) == _moe_layers(model)
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=1e-5, msg=name)
    assert not warnings


def test_the_clamped_swiglu_matters_for_this_comparison():
    """transformers' default gate (no clamp) gives other logits on this model: the comparison above sees the clamp."""
    model = _model()
    model.set_experts_implementation("grouped_mm")
    with torch.no_grad():
        clamped = model(IDS, use_cache=False).logits
        for module in model.modules():
            if isinstance(module, DeepseekV4Experts):
                module._apply_gate = _default_apply_gate.__get__(module)
                module.act_fn = torch.nn.functional.silu
        unclamped = model(IDS, use_cache=False).logits
    assert (clamped - unclamped).abs().max() > 1e-3  # 100x the tolerance of the comparisons


def test_from_pretrained_choice_is_runtime_state_not_saved(tmp_path, calls):
    model = _model().eval()
    with torch.no_grad():
        ref = model(IDS, use_cache=False).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert not any("experts_implementation" in key for key in saved)
    for implementation in ("grouped_mm", "batched_mm"):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation=implementation).eval()
        assert loaded.config._experts_implementation == implementation
        with torch.no_grad():
            torch.testing.assert_close(loaded(IDS, use_cache=False).logits, ref, rtol=0, atol=1e-5)
        assert calls.pop(implementation) == _moe_layers(loaded)
        loaded.save_pretrained(tmp_path / implementation)
        # transformers does not write the choice: a reload without the argument runs the default again
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / implementation)
        assert reloaded.config._experts_implementation == "eager"


@pytest.mark.parametrize("name", ["sonicmoe", "deepgemm", "no_such_kernel"])
def test_unsupported_choices_raise_and_name_the_allowed_ones(tmp_path, name):
    model = _model()
    with pytest.raises(ValueError, match=name) as error:
        model.set_experts_implementation(name)
    assert all(choice in str(error.value) for choice in ALLOWED)
    assert model.config._experts_implementation == "eager"
    if name == "sonicmoe":  # the load path runs the same check
        model.save_pretrained(tmp_path)
        with pytest.raises(ValueError, match="DeepSeek-V4 experts accept"):
            AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation=name)


def _quantized(model):
    from modeling_deepseek_v4.quantization import quantize_model

    return quantize_model(model, weights=None, experts="fp8")


def _qat(model):
    from modeling_deepseek_v4.quantization import prepare_fp4_qat

    return prepare_fp4_qat(model)


def _bnb(model):
    from modeling_deepseek_v4.bnb_quant import DeepseekV4Bnb4bitExperts, bnb_4bit_available

    available, reason = bnb_4bit_available()
    if not available:
        pytest.skip(reason)
    for block in [m for m in model.modules() if isinstance(getattr(m, "experts", None), DeepseekV4Experts)]:
        block.experts = DeepseekV4Bnb4bitExperts(block.experts, "nf4", torch.float32)
    return model


def _grouped_lora(model):
    pytest.importorskip("peft")
    from peft import get_peft_model

    from modeling_deepseek_v4.expert_lora import expert_lora_config

    config = expert_lora_config(r=2, lora_alpha=4, target_modules=["experts"], init_lora_weights=False)
    return get_peft_model(model, config)


@pytest.mark.parametrize(
    ("convert", "who"),
    [
        (_quantized, "DeepseekV4QuantizedExperts"),
        (_qat, "DeepseekV4QATExperts"),
        (_bnb, "DeepseekV4Bnb4bitExperts"),
        (_grouped_lora, "LoRA"),
    ],
)
def test_quantized_qat_and_grouped_lora_stay_on_the_plugin_op_with_a_warning(convert, who, calls, warnings):
    model = convert(_model()).eval()
    with torch.no_grad():
        ref = model(IDS, use_cache=False).logits
        model.set_experts_implementation("grouped_mm")
        out = model(IDS, use_cache=False).logits
    assert not calls
    assert torch.equal(out, ref)
    assert warnings and all("grouped_mm" in msg and "eager" in msg for msg in warnings)
    assert any(who in msg for msg in warnings), warnings


def test_peft_target_parameters_lora_runs_through_grouped_mm(calls, warnings):
    """PEFT's own LoRA on the 3-D banks parametrizes `gate_up_proj` / `down_proj`; transformers' functions read them
    at call time, so the adapter is seen (same loss and adapter gradients as eager)."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    targets = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    config = LoraConfig(r=2, lora_alpha=4, target_parameters=targets, init_lora_weights=False)
    model = get_peft_model(_model(), config)
    results = {}
    for implementation in ("eager", "grouped_mm"):
        model.set_experts_implementation(implementation)
        model.zero_grad()
        loss = model(IDS, labels=IDS, use_cache=False).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        results[implementation] = (loss.detach(), grads)
    assert calls.get("grouped_mm") == _moe_layers(model)
    (ref_loss, ref_grads), (loss, grads) = results["eager"], results["grouped_mm"]
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and any("lora" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=1e-5, msg=name)
    assert not warnings
