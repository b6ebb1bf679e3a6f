"""Weight formats as values (weight_formats.py): one object per format, the block shape a parameter (the 32x32-block
FP8 variant is an instance, not a code path), one table of the official FP8 linears, `PackedWeight` for the ops."""

import copy

import pytest
import torch

from modeling_deepseek_v4 import DeepseekV4ExtForCausalLM
from modeling_deepseek_v4.official_names import FP8_SUFFIXES
from modeling_deepseek_v4.quantization import dequantize_model, quantize_model
from modeling_deepseek_v4.quantized_modules import DeepseekV4QuantizedExperts, iter_fp8_targets
from modeling_deepseek_v4.weight_formats import FORMATS, FP4, FP8, FP8_BLOCK32, PackedWeight, format_of
from tests.conftest import tiny_model


def test_formats_know_their_storage_and_grids():
    assert FP8.scale_shape((300, 260)) == (3, 3) and FP8_BLOCK32.scale_shape((300, 260)) == (10, 9)
    assert FP4.storage_shape((4, 64)) == (4, 32) and FP4.scale_shape((4, 64)) == (4, 2)
    assert FP8.scale_shape((2, 96, 64), halves=2) == (2, 2, 1)  # each half of a fused gate/up bank blocked apart
    assert format_of(torch.float8_e4m3fn, (300, 260), (10, 9)) is FP8_BLOCK32
    assert format_of(torch.float8_e4m3fn, (300, 260), (3, 3)) is FP8
    assert format_of(torch.int8, (4, 32), (4, 2)) is FP4
    assert format_of(torch.float8_e4m3fn, (300, 260), (4, 4)) is None


@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
def test_round_trip_is_exact_on_the_grid_and_packed_indexing_dequantizes_the_selection(fmt):
    w = torch.randn(3, 96, 64)
    once = fmt.fake_quantize(w, halves=2)
    assert torch.equal(fmt.fake_quantize(once, halves=2), once)  # values on the grid stay put
    data, scale = fmt.quantize(w, halves=2)
    packed = PackedWeight(data, scale, fmt, torch.bfloat16, halves=2)
    assert packed.shape == w.shape
    assert torch.equal(packed[1], packed.dequantize()[1]) and torch.equal(packed.dequantize().float(), once)


def test_one_table_of_official_fp8_linears():
    model = tiny_model()
    names = {name.split(".", 3)[-1] for name, _, _ in iter_fp8_targets(model) if ".layers." in name}
    assert names == {
        "self_attn.q_a_proj",
        "self_attn.q_b_proj",
        "self_attn.kv_proj",
        "self_attn.o_a_proj",
        "self_attn.o_b_proj",
        "self_attn.compressor.indexer.q_b_proj",
        "mlp.shared_experts.gate_proj",
        "mlp.shared_experts.up_proj",
        "mlp.shared_experts.down_proj",
    }
    assert {name.rsplit(".", 1)[-1] for name, _, _ in iter_fp8_targets(model) if ".mtp." in name} >= {
        "e_proj",
        "h_proj",
    }
    assert "attn.wq_a.weight" in FP8_SUFFIXES and "main_proj.weight" in FP8_SUFFIXES and len(FP8_SUFFIXES) == 12


def test_fp8_with_32x32_blocks_is_one_more_format(tmp_path):
    model = tiny_model()
    ids = torch.randint(1, 97, (1, 60), generator=torch.Generator().manual_seed(0))
    quantized = quantize_model(copy.deepcopy(model), weights="fp8_block32", experts="fp8_block32")
    q_a = quantized.model.layers[0].self_attn.q_a_proj
    assert q_a.format is FP8_BLOCK32 and q_a.weight_scale_inv.shape == FP8_BLOCK32.scale_shape(tuple(q_a.weight.shape))
    experts = quantized.model.layers[2].mlp.experts
    assert isinstance(experts, DeepseekV4QuantizedExperts) and experts.format is FP8_BLOCK32
    with torch.no_grad():
        logits = quantized(ids).logits
        dense = dequantize_model(copy.deepcopy(quantized), torch.float32)
        assert torch.equal(dense(ids).logits, logits)  # computes with exactly its dequantized weights
    quantized.save_pretrained(tmp_path)
    reloaded = DeepseekV4ExtForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert reloaded.config.dsv4_quantization["weights"] == "fp8_block32"
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)
    # Finer blocks follow the weights more closely than 128x128 ones.
    coarse = quantize_model(copy.deepcopy(model), weights="fp8", experts=None)
    fine = quantize_model(copy.deepcopy(model), weights="fp8_block32", experts=None)
    w = model.model.layers[0].self_attn.q_a_proj.weight
    err = {
        name: (m.model.layers[0].self_attn.q_a_proj.dequantized_weight() - w).abs().mean()
        for name, m in (("coarse", coarse), ("fine", fine))
    }
    assert err["fine"] <= err["coarse"]


@pytest.mark.parametrize("fmt", [FP8, FP8_BLOCK32], ids=["fp8", "fp8_block32"])
def test_quantized_linear_op_takes_the_packed_weight_with_its_format(fmt, monkeypatch):
    from modeling_deepseek_v4 import ops

    w, x = torch.randn(96, 160), torch.randn(3, 5, 160, dtype=torch.bfloat16)
    packed = PackedWeight(*fmt.quantize(w), fmt, torch.bfloat16)
    out = ops.quantized_linear(x, packed)
    assert torch.equal(out, torch.nn.functional.linear(x, packed.dequantize()))
    seen = []
    monkeypatch.setattr(ops, "BACKEND_PRIORITY", ops.BACKEND_PRIORITY)  # restored after the test
    ops.declare_backend("spy")
    ops.register("quantized_linear", "spy", lambda x, weight, **kw: seen.append(weight.format) or x.new_zeros(1))
    try:
        with ops.use_backend("spy"):
            ops.quantized_linear(x, packed)
        assert seen == [fmt]  # a kernel receives the format explicitly, not a dtype to guess from
    finally:
        del ops._REGISTRY["quantized_linear"]["spy"]
