"""Registration with the Auto classes and exact save -> from_pretrained round trips (MTP kept)."""

import torch
import transformers
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import modeling_deepseek_v4
from modeling_deepseek_v4 import DeepseekV4ExtConfig, DeepseekV4ExtForCausalLM, DeepseekV4ExtModel
from tests.conftest import tiny_model


def test_auto_classes_resolve_to_plugin_without_touching_native():
    cfg = AutoConfig.for_model("deepseek_v4_ext")
    assert type(cfg) is DeepseekV4ExtConfig
    assert AutoConfig.for_model("deepseek_v4").__class__ is transformers.DeepseekV4Config
    assert type(AutoModel.from_config(tiny_model().config)) is DeepseekV4ExtModel
    # Re-importing (pip package + a Hub copy in one process) is idempotent.
    import importlib

    importlib.reload(modeling_deepseek_v4)


def test_saved_architectures_cannot_resolve_to_native_classes(tmp_path):
    """Tools such as TRL look `architectures` up in transformers first; our names must not be found there."""
    tiny_model().save_pretrained(tmp_path)
    architectures = AutoConfig.from_pretrained(tmp_path).architectures
    assert architectures == ["DeepseekV4ExtForCausalLM"]
    for name in [*architectures, DeepseekV4ExtConfig.__name__, DeepseekV4ExtModel.__name__]:
        assert getattr(transformers, name, None) is None, name


def test_round_trip_is_exact(tmp_path, schedule):
    model = tiny_model(schedule)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == "DeepseekV4ExtForCausalLM" and isinstance(loaded, DeepseekV4ExtForCausalLM)
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, loaded(ids, use_cache=False).logits)


def test_mtp_and_buffers_are_saved(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert any(k.startswith("model.mtp.0.self_attn.") for k in keys)
    assert {"model.mtp.0.e_proj.weight", "model.mtp.0.h_proj.weight", "model.mtp.0.hc_head.hc_fn"} <= keys
    assert "model.layers.0.mlp.gate.tid2eid" in keys
    assert "model.layers.3.mlp.gate.e_score_correction_bias" in keys
    loaded = DeepseekV4ExtForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.model.layers[0].mlp.gate.tid2eid, model.model.layers[0].mlp.gate.tid2eid)


def test_bf16_load_keeps_fp32_islands(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    layer = model.model.layers[2]
    assert layer.self_attn.q_b_proj.weight.dtype == torch.bfloat16
    assert layer.mlp.experts.gate_up_proj.dtype == torch.bfloat16
    for param in (layer.attn_hc.fn, layer.self_attn.sinks, layer.input_layernorm.weight, model.model.hc_head.hc_fn):
        assert param.dtype == torch.float32
    assert layer.self_attn.compressor.kv_proj.weight.dtype == torch.float32
    with torch.no_grad():
        logits = model(torch.randint(0, 97, (1, 24)), use_cache=False).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_random_init_hash_table_has_distinct_experts():
    table = tiny_model().model.layers[0].mlp.gate.tid2eid
    assert table.shape == (97, 2)
    assert (table[:, 0] != table[:, 1]).all()
    assert int(table.max()) < 4
