"""Grouped expert LoRA and `o_a_proj` LoRA (`expert_lora.py`) through PEFT's public API: equal to PEFT's own
`target_parameters` LoRA with the same factors, equal on quantized banks to LoRA on the dequantized bank, and every
PEFT lifecycle call (save / load / merge / unmerge / several adapters / disable) behaves."""

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

from modeling_deepseek_v4.expert_lora import (  # noqa: E402
    DeepseekV4ExpertsLora,
    DeepseekV4GroupedLinearLora,
    densify_lora_bases,
    expert_lora_config,
    load_expert_lora,
)
from modeling_deepseek_v4.quantization import quantize_model  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402

torch.set_num_threads(1)

PROMPT = torch.randint(0, 97, (2, 48), generator=torch.Generator().manual_seed(0))
LABELS = torch.randint(0, 97, (2, 48), generator=torch.Generator().manual_seed(1))


def _model(**overrides):
    # hidden 64 / experts of 32 are the tiny sizes; FP8 128x128 blocks and FP4 1x32 groups both fit them
    return tiny_model(**overrides)


def _ours(model, r=4, **kwargs):
    config = expert_lora_config(r=r, lora_alpha=8, target_modules=["experts"], init_lora_weights=False, **kwargs)
    return get_peft_model(model, config)


def _lora_layers(model, cls=DeepseekV4ExpertsLora):
    return [m for m in model.modules() if isinstance(m, cls)]


def _loss(model):
    return model(PROMPT, labels=LABELS).loss


def test_grouped_lora_equals_peft_target_parameters_with_the_same_factors():
    torch.manual_seed(0)
    ours = _ours(_model())
    torch.manual_seed(0)
    theirs = get_peft_model(
        _model(),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
            init_lora_weights=False,
        ),
    )
    # PEFT's 3-D layout: A weight [E * r, in] = [E, r, in]; B weight [out, r * E] = [out, r, E] (expert fastest)
    wrappers = {n: m for n, m in theirs.named_modules() if type(m).__name__ == "ParamWrapper"}
    for name, layer in ((n, m) for n, m in ours.named_modules() if isinstance(m, DeepseekV4ExpertsLora)):
        for proj in ("gate_up_proj", "down_proj"):
            wrapper = next(w for n, w in wrappers.items() if n.startswith(name) and w.parameter_name == proj)
            a, b = getattr(layer.lora_A["default"], proj), getattr(layer.lora_B["default"], proj)
            e, r = a.shape[:2]
            with torch.no_grad():
                wrapper.lora_A["default"].weight.copy_(a.reshape(e * r, -1))
                wrapper.lora_B["default"].weight.copy_(b.permute(1, 2, 0).reshape(b.shape[1], r * e))
    loss_ours, loss_theirs = _loss(ours), _loss(theirs)
    torch.testing.assert_close(loss_ours, loss_theirs, atol=1e-5, rtol=1e-5)
    loss_ours.backward()
    loss_theirs.backward()
    for name, layer in ((n, m) for n, m in ours.named_modules() if isinstance(m, DeepseekV4ExpertsLora)):
        for proj in ("gate_up_proj", "down_proj"):
            wrapper = next(w for n, w in wrappers.items() if n.startswith(name) and w.parameter_name == proj)
            a, b = getattr(layer.lora_A["default"], proj), getattr(layer.lora_B["default"], proj)
            e, r = a.shape[:2]
            if ".mtp." in name:  # the MTP block is not in the language-model loss
                assert a.grad is None and wrapper.lora_A["default"].weight.grad is None
                continue
            torch.testing.assert_close(
                a.grad.reshape(e * r, -1), wrapper.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-4
            )
            got_b = b.grad.permute(1, 2, 0).reshape(b.shape[1], r * e)
            torch.testing.assert_close(got_b, wrapper.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-4)


def test_only_the_factors_train_and_no_expert_sized_delta_is_built(monkeypatch):
    model = _ours(_model())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)

    def no_delta(*args):
        raise AssertionError("the forward formed an expert-sized B @ A")

    monkeypatch.setattr(DeepseekV4ExpertsLora, "_delta", no_delta)
    _loss(model).backward()
    layer = _lora_layers(model)[0]
    assert layer.lora_A["default"].gate_up_proj.grad is not None


def _quantized(experts: str):
    model = _model()
    if experts != "nf4":
        return quantize_model(model, weights=None, experts=experts)
    from modeling_deepseek_v4.bnb_quant import DeepseekV4Bnb4bitExperts, bnb_4bit_available

    if not bnb_4bit_available()[0]:
        pytest.skip(f"bitsandbytes 4-bit unavailable: {bnb_4bit_available()[1]}")
    for name, module in list(model.named_modules()):
        if name.endswith(".mlp"):
            module.experts = DeepseekV4Bnb4bitExperts(module.experts, "nf4", torch.float32)
    return model


@pytest.mark.parametrize("experts", ["fp8", "fp4", "nf4"])
def test_lora_on_quantized_banks_equals_lora_on_the_dequantized_bank(experts):
    quantized = _quantized(experts)
    torch.manual_seed(3)
    ours = _ours(quantized)
    dense = _model()  # the same seed: every weight but the experts equals the quantized model's
    for src, dst in zip(_lora_layers(ours), (m for n, m in dense.named_modules() if n.endswith("mlp.experts"))):
        gate_up, down = src.get_base_layer().dequantized(torch.float32)
        with torch.no_grad():
            dst.gate_up_proj.copy_(gate_up)
            dst.down_proj.copy_(down)
    torch.manual_seed(3)
    reference = _ours(dense)
    with torch.no_grad():
        for a, b in zip(_lora_layers(ours), _lora_layers(reference)):
            b.lora_A.load_state_dict(a.lora_A.state_dict())
            b.lora_B.load_state_dict(a.lora_B.state_dict())
    loss_q, loss_d = _loss(ours), _loss(reference)
    torch.testing.assert_close(loss_q, loss_d, atol=1e-5, rtol=1e-5)
    loss_q.backward()
    loss_d.backward()
    for a, b in zip(_lora_layers(ours), _lora_layers(reference)):
        torch.testing.assert_close(
            a.lora_B["default"].down_proj.grad, b.lora_B["default"].down_proj.grad, atol=1e-5, rtol=1e-4
        )


def test_save_load_merge_unmerge_and_disable(tmp_path):
    model = _ours(_model())
    with torch.no_grad():
        before = model(PROMPT).logits
        with model.disable_adapter():
            base = model(PROMPT).logits
    assert not torch.allclose(before, base)
    model.save_pretrained(tmp_path)
    reloaded = load_expert_lora(_model(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(PROMPT).logits, before, atol=0, rtol=0)
        model.merge_adapter()
        torch.testing.assert_close(model(PROMPT).logits, before, atol=2e-5, rtol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(PROMPT).logits, before, atol=2e-5, rtol=1e-5)
        with model.disable_adapter():
            torch.testing.assert_close(model(PROMPT).logits, base, atol=2e-5, rtol=1e-5)
        merged = model.merge_and_unload()
        assert not _lora_layers(merged)
        torch.testing.assert_close(merged(PROMPT).logits, before, atol=2e-5, rtol=1e-5)


def test_two_adapters_switch_and_add_up_like_their_merged_sum():
    model = _ours(_model())
    second = expert_lora_config(r=2, lora_alpha=2, target_modules=["experts"], init_lora_weights=False)
    model.add_adapter("second", second)
    with torch.no_grad():
        first = model(PROMPT).logits
        model.set_adapter("second")
        alone = model(PROMPT).logits
        model.base_model.set_adapter(["default", "second"])
        both = model(PROMPT).logits
        model.base_model.merge_adapter(["default", "second"])
        with model.disable_adapter():  # unmerges first: the base again
            pass
        model.base_model.merge_adapter(["default", "second"])
        merged = model(PROMPT).logits
    assert not torch.allclose(first, alone) and not torch.allclose(both, first)
    torch.testing.assert_close(both, merged, atol=2e-5, rtol=1e-5)


def test_rank_per_projection_from_rank_pattern(tmp_path):
    model = _ours(_model(), rank_pattern={"experts.down_proj": 2})
    layer = _lora_layers(model)[0]
    assert layer.lora_A["default"].gate_up_proj.shape[1] == 4 and layer.lora_A["default"].down_proj.shape[1] == 2
    model.save_pretrained(tmp_path)
    assert _lora_layers(load_expert_lora(_model(), tmp_path))[0].lora_B["default"].down_proj.shape[-1] == 2


@pytest.mark.parametrize("experts", ["fp8", "fp4", "nf4"])
def test_merge_into_quantized_banks_reports_and_unmerges_exactly(experts):
    peft_model = _ours(_quantized(experts))
    layer = _lora_layers(peft_model)[0]
    stored = {n: getattr(layer.get_base_layer(), n).clone() for n in layer.get_base_layer()._quantized_buffers}
    peft_model.merge_adapter()
    assert 0 < layer.merge_report["quantized_rows_changed"] <= layer.merge_report["quantized_rows"]
    peft_model.unmerge_adapter()
    for name, saved in stored.items():
        assert torch.equal(getattr(layer.get_base_layer(), name), saved)


def test_merge_to_bf16_instead_of_requantizing():
    model = _model()
    quantize_model(model, weights=None, experts="fp4")
    peft_model = _ours(model)
    with torch.no_grad():
        before = peft_model(PROMPT).logits
    assert densify_lora_bases(peft_model, torch.float32) == len(_lora_layers(peft_model))
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(PROMPT).logits, before, atol=2e-5, rtol=1e-5)


def test_lora_on_the_grouped_output_projection_keeps_groups_apart():
    model = get_peft_model(
        _model(), expert_lora_config(r=4, lora_alpha=4, target_modules=["o_a_proj"], init_lora_weights=False)
    )
    layer = _lora_layers(model, DeepseekV4GroupedLinearLora)[0]
    base = layer.get_base_layer()
    g, in_g = base.n_groups, base.in_features
    x = torch.randn(3, g, in_g)
    delta = layer._delta("default", "weight").view(g, -1, in_g)
    expected = base(x) + torch.einsum("bgi,goi->bgo", x, delta).flatten(-2)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    _loss(model).backward()
    assert layer.lora_A["default"].weight.grad is not None


def test_lora_layers_move_and_cast_like_any_module():
    model = _ours(_model())
    model.to(torch.float64)
    layer = _lora_layers(model)[0]
    assert layer.lora_A["default"].gate_up_proj.dtype == torch.float64
    model.to(torch.float32)
    with torch.no_grad():
        assert torch.isfinite(model(PROMPT).logits).all()


def test_all_linear_wraps_exactly_the_modules_that_receive_gradients():
    model = get_peft_model(_model(), expert_lora_config(r=4, lora_alpha=8, target_modules="all-linear"))
    wrapped = {n.rsplit(".lora_B", 1)[0] for n, _ in model.named_parameters() if ".lora_B." in n}
    assert any(n.endswith("mlp.experts") for n in wrapped) and any(n.endswith("o_a_proj") for n in wrapped)
    assert not any(".indexer." in n or ".mtp." in n for n in wrapped)
    _loss(model).backward()
    for name, param in model.named_parameters():
        if ".lora_B." in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    # every nn.Linear left unwrapped is one the loss cannot train (indexer, MTP) or the head
    skipped = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n not in wrapped]
    skipped = [n for n in skipped if ".lora_" not in n and ".base_layer" not in n]
    assert skipped and all(".indexer." in n or ".mtp." in n or n.endswith("lm_head") for n in skipped), skipped


def test_merged_fp4_adapter_exports_to_the_official_layout_unchanged(tmp_path):
    """Official FP4 base -> grouped LoRA -> merge into the FP4 banks -> save -> dsv4-convert to-official -> back:
    the same bytes and logits as the merged model."""
    from modeling_deepseek_v4 import DeepseekV4ExtForCausalLM
    from modeling_deepseek_v4.conversion.to_official import convert_plugin_to_official
    from modeling_deepseek_v4.conversion.to_plugin import convert_official_to_plugin

    model = quantize_model(_model(), weights="fp8", experts="fp4")
    with torch.no_grad():  # the official layout stores the dense tensors in BF16
        for p in model.parameters():
            p.copy_(p.bfloat16())
    merged = _ours(model).merge_and_unload()
    assert type(merged.model.layers[0].mlp.experts).__name__ == "DeepseekV4QuantizedExperts"
    with torch.no_grad():
        expected = merged(PROMPT).logits
    merged.save_pretrained(tmp_path / "merged")
    convert_plugin_to_official(tmp_path / "merged", tmp_path / "official", progress=False)
    convert_official_to_plugin(tmp_path / "official", tmp_path / "back", dtype="keep", progress=False)
    chunks = {"attn_chunk_size": 16, "indexer_chunk_size": 16}  # the tiny config's (the converter writes defaults)
    back = DeepseekV4ExtForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32, **chunks).eval()
    with torch.no_grad():
        assert torch.equal(back(PROMPT).logits, expected)


def test_qlora_on_nf4_experts_trains_with_trainer_and_gradient_checkpointing(tmp_path):
    from transformers import Trainer, TrainingArguments

    from tests.quantization.test_bnb import BNB_OK, BNB_REASON, load_4bit

    if not BNB_OK:
        pytest.skip(BNB_REASON)
    folder = tmp_path / "dense"
    _model(q_lora_rank=64, o_lora_rank=32, moe_intermediate_size=64).save_pretrained(folder)
    model = peft.prepare_model_for_kbit_training(load_4bit(folder), use_gradient_checkpointing=True)
    targets = ["q_a_proj", "o_a_proj", "experts"]
    model = get_peft_model(model, expert_lora_config(r=4, lora_alpha=8, target_modules=targets))
    assert any(type(m).__name__ == "DeepseekV4Bnb4bitExperts" for m in model.modules())
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    rows = [{"input_ids": r, "labels": r} for r in PROMPT.repeat(2, 1).tolist()]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
        gradient_checkpointing=True, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(v)) for v in losses)
    moved = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert any("experts.lora_B" in n for n in moved) and any("o_a_proj.lora_B" in n for n in moved)


def test_shared_expert_factors_equal_per_expert_copies_and_merge(tmp_path):
    shared = _ours(_model(), rank_pattern={"experts.shared": 1})
    layer = _lora_layers(shared)[0]
    assert layer.lora_A["default"].gate_up_proj.shape[0] == 1 and layer.lora_B["default"].down_proj.shape[0] == 1
    copies = _ours(_model())
    with torch.no_grad():
        for a, b in zip(_lora_layers(shared), _lora_layers(copies)):
            for side in ("lora_A", "lora_B"):
                for name, param in getattr(b, side)["default"].named_parameters():
                    param.copy_(getattr(getattr(a, side)["default"], name).expand_as(param))
        expected = copies(PROMPT).logits
        torch.testing.assert_close(shared(PROMPT).logits, expected, atol=1e-5, rtol=1e-5)
        shared.merge_adapter()
        torch.testing.assert_close(shared(PROMPT).logits, expected, atol=2e-5, rtol=1e-5)
        shared.unmerge_adapter()
    shared.save_pretrained(tmp_path / "shared")
    assert (
        _lora_layers(load_expert_lora(_model(), tmp_path / "shared"))[0].lora_A["default"].gate_up_proj.shape[0] == 1
    )
    from modeling_deepseek_v4.conversion.checkpoint import ConversionError
    from modeling_deepseek_v4.conversion.lora_export import export_lora

    with pytest.raises(ConversionError, match="shares one expert LoRA pair"):
        export_lora(tmp_path / "shared", tmp_path / "vllm")
    assert not (tmp_path / "vllm").exists()


def test_plain_all_linear_lora_warns_about_modules_no_loss_trains(caplog):
    """PEFT's own "all-linear" expands by module type and so wraps the indexer and MTP linears, which no loss trains
    while their loss weights are 0: the first training forward says so (and what to target instead)."""
    import logging

    model = get_peft_model(_model(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with caplog.at_level(logging.WARNING, logger="modeling_deepseek_v4.expert_lora"):
        _loss(model.train())
    assert "no loss trains" in caplog.text and "all_linear_targets" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="modeling_deepseek_v4.expert_lora"):
        _loss(get_peft_model(_model(), expert_lora_config(r=4, target_modules="all-linear")).train())
        _loss(
            get_peft_model(
                _model(mtp_loss_weight=0.3, indexer_loss_weight=0.1),
                LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
            ).train()
        )
    assert "no loss trains" not in caplog.text


def _transformers_adapter_api_or_skip():
    model = _model()  # a throwaway: delete_adapter leaves the wrapped modules in place
    try:
        model.add_adapter(LoraConfig(r=2, target_modules=["q_a_proj"]), adapter_name="probe")
    except ImportError as err:  # transformers >= 5.24 wants a newer PEFT than the newest release (compat.py)
        pytest.skip(f"transformers' adapter API refuses this PEFT: {err}")


def test_transformers_add_adapter_and_load_adapter_take_grouped_lora(tmp_path):
    """`model.add_adapter(LoraConfig(...))`, `model.load_adapter(folder)` and `AutoModelForCausalLM.from_pretrained(
    <adapter folder>)` (transformers' PEFT integration) register the grouped layers themselves: a saved grouped
    adapter loads without `load_expert_lora` and gives the trained model's logits."""
    from transformers import AutoModelForCausalLM

    _transformers_adapter_api_or_skip()
    base = _model()
    base.save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    assert _lora_layers(model) and _lora_layers(model, DeepseekV4GroupedLinearLora)
    assert not any(".indexer." in n or ".mtp." in n for n, m in model.named_modules() if hasattr(m, "lora_A"))
    with torch.no_grad():
        expected = model(PROMPT).logits
    model.save_pretrained(tmp_path / "adapter")  # with adapters attached, transformers saves the adapter only

    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    fresh.load_adapter(str(tmp_path / "adapter"))
    from_folder = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter")
    for loaded in (fresh, from_folder):
        assert _lora_layers(loaded)
        with torch.no_grad():
            torch.testing.assert_close(loaded(PROMPT).logits, expected)
