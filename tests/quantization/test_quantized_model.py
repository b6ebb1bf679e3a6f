"""Quantized inference modules: FP8 linears and FP4 / FP8 expert banks kept quantized in memory
(quantized_modules.py, official-format.md §8)."""

import copy
import json

import pytest
import torch
from torch import nn

from modeling_deepseek_v4 import DeepseekV4ExtForCausalLM
from modeling_deepseek_v4.conversion import convert_official_to_plugin, transcode_experts_to_fp8
from modeling_deepseek_v4.quantization import dequantize_model, quantize_model, resident_weight_bytes
from modeling_deepseek_v4.quantized_modules import (
    DeepseekV4Fp8GroupedLinear,
    DeepseekV4Fp8Linear,
    DeepseekV4QuantizedExperts,
    QuantizationLayout,
)
from tests.conftest import tiny_config, tiny_model
from tests.conversion.official_synth import make_official_checkpoint


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


@pytest.mark.parametrize("experts", ["fp4", "fp8"])
def test_quantized_model_equals_its_dequantized_weights(experts):
    model = quantize_model(tiny_model(), weights="fp8", experts=experts)
    dense = dequantize_model(copy.deepcopy(model), torch.float32)
    assert count(dense, (DeepseekV4Fp8Linear, DeepseekV4QuantizedExperts)) == 0
    ids = torch.randint(0, 97, (2, 37))
    # Same weights, same ops: the quantized forward dequantizes exactly to fp32 before each matmul.
    assert torch.equal(logits(model, ids), logits(dense, ids))


def test_what_is_quantized_and_resident_bytes():
    model = quantize_model(tiny_model("pro"), weights="fp8", experts="fp4")
    cfg = model.config
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    csa = sum(r == 4 for r in cfg.compress_ratios)
    # 4 attention linears + o_b per block (o_a grouped), 3 shared-expert linears, indexer q_b, MTP e/h
    assert count(model, DeepseekV4Fp8Linear) == layers * (4 + 3) + csa + 2 * cfg.num_nextn_predict_layers
    assert count(model, DeepseekV4Fp8GroupedLinear) == layers
    assert count(model, DeepseekV4QuantizedExperts) == layers
    # full precision: routers, norms, mHC, compressors, the indexer's weights_proj, embeddings, head
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name
    assert isinstance(model.lm_head, nn.Linear) and type(model.lm_head) is nn.Linear
    sizes = resident_weight_bytes(model)
    assert sizes["experts"]["bytes_per_param"] <= 0.55  # 0.5 packed + 1/32 E8M0 scale
    assert sizes["fp8_linears"]["bytes_per_param"] <= 1.05
    assert sizes["experts"]["params"] == layers * cfg.n_routed_experts * 3 * cfg.hidden_size * 32


def test_bf16_model_and_dtype_casts_keep_the_storage():
    model = quantize_model(tiny_model(), weights="fp8", experts="fp4").to(torch.bfloat16)
    attn, experts = model.model.layers[2].self_attn, model.model.layers[2].mlp.experts
    assert attn.q_a_proj.weight.dtype == torch.float8_e4m3fn
    assert attn.q_a_proj.weight_scale_inv.dtype == torch.float8_e8m0fnu
    assert experts.gate_up_proj.dtype == torch.int8 and experts.down_proj_scale_inv.dtype == torch.float8_e8m0fnu
    dense = dequantize_model(copy.deepcopy(model), torch.bfloat16)
    ids = torch.randint(0, 97, (1, 30))
    # bf16 dequantization is exact (<= 4 significant bits): same bf16 weights, same result
    assert torch.equal(logits(model, ids), logits(dense, ids))


def test_save_and_from_pretrained_round_trip(tmp_path):
    model = quantize_model(tiny_model(), weights="fp8", experts="fp4", scale_dtype="float32")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["dsv4_quantization"] == {"weights": "fp8", "experts": "fp4", "scale_dtype": "float32"}
    loaded = DeepseekV4ExtForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert loaded.model.layers[0].mlp.experts.gate_up_proj_scale_inv.dtype == torch.float32
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name
    ids = torch.randint(0, 97, (1, 30))
    assert torch.equal(logits(model, ids), logits(loaded, ids))


def test_quantized_generate_matches_dequantized_generate():
    model = quantize_model(tiny_model(), weights="fp8", experts="fp4")
    dense = dequantize_model(copy.deepcopy(model), torch.float32)
    ids = torch.randint(0, 97, (2, 12))
    kwargs = dict(max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), dense.generate(ids, **kwargs))


@pytest.mark.parametrize("experts", ["fp4", "fp8"])
def test_converted_keep_folder_loads_quantized(tmp_path, experts):
    official = make_official_checkpoint(tmp_path / "official", tiny_config("flash"), n_shards=2)
    src = official.folder
    if experts == "fp8":
        transcode_experts_to_fp8(src, tmp_path / "fp8", progress=False)
        src = tmp_path / "fp8"
    convert_official_to_plugin(src, tmp_path / "keep", dtype="keep", progress=False)
    convert_official_to_plugin(src, tmp_path / "fp32", dtype="fp32", progress=False)
    keep = DeepseekV4ExtForCausalLM.from_pretrained(tmp_path / "keep", dtype=torch.float32).eval()
    assert QuantizationLayout.from_config(keep.config) == QuantizationLayout("fp8", experts, "float8_e8m0fnu")
    assert keep.model.layers[2].mlp.experts.fmt == experts
    dense = DeepseekV4ExtForCausalLM.from_pretrained(tmp_path / "fp32").eval()
    ids = torch.randint(0, 97, (1, 40))
    # the keep folder holds the official bytes, the fp32 folder their exact dequantization
    torch.testing.assert_close(logits(keep, ids), logits(dense, ids), atol=1e-5, rtol=0)
    per_param = resident_weight_bytes(keep)["experts"]["bytes_per_param"]
    assert per_param <= (0.55 if experts == "fp4" else 1.05)


def test_lora_on_fp8_linears_trains_only_the_adapter():
    peft = pytest.importorskip("peft")
    model = quantize_model(tiny_model(), weights="fp8", experts="fp4")
    config = peft.LoraConfig(r=4, target_modules=r".*self_attn\.(q_a_proj|kv_proj|o_b_proj)")
    lora = peft.get_peft_model(model, config)
    before = {n: b.clone() for n, b in lora.named_buffers() if b.dtype == torch.float8_e4m3fn}
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 97, (2, 20))
    losses = []
    for _ in range(4):
        loss = lora(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, buf in lora.named_buffers():
        if name in before:
            assert torch.equal(buf.view(torch.uint8), before[name].view(torch.uint8)), name


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="experts='fp2'"):
        QuantizationLayout("fp8", "fp2")
    with pytest.raises(ValueError, match="unknown keys"):
        DeepseekV4ExtForCausalLM(tiny_config(dsv4_quantization={"weights": "fp8", "expert": "fp4"}))
    model = quantize_model(tiny_model(), weights="fp8", experts=None)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model)
