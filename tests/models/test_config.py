"""Tests for `DeepseekV4ExtConfig`: input spellings (own, native, official), normalisation, interop, validation."""

import copy
import json

import pytest
import transformers
from transformers import PreTrainedConfig

from modeling_deepseek_v4.configuration_deepseek_v4 import DeepseekV4ExtConfig

NativeConfig = transformers.DeepseekV4Config
CSA, HCA, SWA = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"
FLASH_RATIOS = [0, 0] + [4, 128] * 20 + [4] + [0]
PRO_RATIOS = [128, 128] + [4, 128] * 29 + [4] + [0]
YARN = {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1}
FP8_QUANT = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "scale_fmt": "ue8m0",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}

# Root `config.json` of deepseek-ai/DeepSeek-V4-Flash (official-format.md §3).
OFFICIAL_FLASH = {
    "architectures": ["DeepseekV4ExtForCausalLM"],
    "model_type": "deepseek_v4",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.57.1",
    "vocab_size": 129280,
    "hidden_size": 4096,
    "num_hidden_layers": 43,
    "num_attention_heads": 64,
    "num_key_value_heads": 1,
    "head_dim": 512,
    "qk_rope_head_dim": 64,
    "q_lora_rank": 1024,
    "o_groups": 8,
    "o_lora_rank": 1024,
    "sliding_window": 128,
    "compress_ratios": FLASH_RATIOS,
    "rope_theta": 10000,
    "compress_rope_theta": 160000,
    "rope_scaling": YARN,
    "max_position_embeddings": 1048576,
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 512,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 6,
    "moe_intermediate_size": 2048,
    "num_hash_layers": 3,
    "scoring_func": "sqrtsoftplus",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.5,
    "swiglu_limit": 10.0,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
    "num_nextn_predict_layers": 1,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
    "expert_dtype": "fp4",
    "quantization_config": FP8_QUANT,
}

TINY = {
    "vocab_size": 256,
    "hidden_size": 64,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "head_dim": 32,
    "q_lora_rank": 16,
    "o_groups": 2,
    "o_lora_rank": 16,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "index_n_heads": 2,
    "index_head_dim": 16,
    "index_topk": 4,
    "sliding_window": 8,
    "max_position_embeddings": 4096,
}
TINY_TYPES = [SWA, SWA, CSA, HCA]


def tiny(**overrides):
    return DeepseekV4ExtConfig(**{**TINY, **overrides})


def official_flash() -> dict:
    return copy.deepcopy(OFFICIAL_FLASH)


# DSpark keys of the `-0731` / `-Flash-DSpark` root config.json (dspark.md §2.2).
DSPARK_0731 = {
    "dspark_block_size": 5,
    "dspark_noise_token_id": 128799,
    "dspark_target_layer_ids": [40, 41, 42],
    "dspark_markov_rank": 256,
}
TINY_DSPARK = {
    "dspark_block_size": 5,
    "dspark_noise_token_id": 255,
    "dspark_target_layer_ids": [1, 2, 3],
    "dspark_markov_rank": 8,
}


def official_0731() -> dict:
    """The 0731 root config: V4-Flash plus the DSpark keys, 46 `compress_ratios`, the stale MTP count of 1."""
    config = {**official_flash(), **copy.deepcopy(DSPARK_0731)}
    config["compress_ratios"] = FLASH_RATIOS[:-1] + [0, 0, 0]
    return config


def test_defaults_are_v4_flash():
    config = DeepseekV4ExtConfig()
    assert config.model_type == "deepseek_v4_ext"
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.head_dim) == (
        4096,
        43,
        64,
        512,
    )
    assert (config.n_routed_experts, config.num_experts_per_tok, config.index_topk) == (256, 6, 512)
    assert config.compress_ratios == FLASH_RATIOS
    assert config.layer_types == [SWA, SWA] + [CSA, HCA] * 20 + [CSA]
    assert config.compress_rates == {CSA: 4, HCA: 128}
    assert config.num_hash_layers == 3
    assert config.qk_rope_head_dim == 64
    assert config.partial_rotary_factor == 64 / 512
    assert config.tie_word_embeddings is False
    assert (config.attn_chunk_size, config.indexer_chunk_size, config.ops_backend) == (256, 256, "auto")
    assert config.expert_dtype is None
    assert config.rope_parameters == {
        "main": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.125},
        # No rope given: the official YaRN of the compressed layers (not native's unscaled default).
        "compress": {
            "rope_type": "yarn",
            "factor": 16,
            "original_max_position_embeddings": 65536,
            "beta_fast": 32,
            "beta_slow": 1,
            "rope_theta": 160000.0,
            "partial_rotary_factor": 0.125,
            "attention_factor": 1.0,
        },
    }
    # Aliases as in native, plus `num_experts` (read by TRL's MoE aux loss, hf-integration.md §12).
    assert config.num_local_experts == config.num_experts == 256 and config.intermediate_size == 2048
    assert "num_experts" not in config.to_dict()
    assert "mlp_layer_types" not in config.to_dict()


def test_default_schedule_deviates_from_native():
    # forward-math.md §10 row 13: official pattern (CSA at layer 2), not native's HCA-first default.
    assert tiny().layer_types == TINY_TYPES
    assert NativeConfig(**TINY).layer_types[:3] == [HCA, HCA, HCA]


def test_official_flash_root_config():
    config = DeepseekV4ExtConfig.from_dict(official_flash())
    assert config.compress_ratios == FLASH_RATIOS and len(config.compress_ratios) == 44
    assert config.layer_types == [SWA, SWA] + [CSA, HCA] * 20 + [CSA]
    assert config.layer_types.count(CSA) == 21 and config.layer_types.count(HCA) == 20
    assert config.num_hash_layers == 3
    assert config.qk_rope_head_dim == 64
    assert config.rope_parameters["main"] == {
        "rope_type": "default",
        "rope_theta": 10000,
        "partial_rotary_factor": 0.125,
    }
    assert config.rope_parameters["compress"] == {
        "rope_type": "yarn",
        "factor": 16,
        "original_max_position_embeddings": 65536,
        "beta_fast": 32,
        "beta_slow": 1,
        "attention_factor": 1.0,
        "rope_theta": 160000,
        "partial_rotary_factor": 0.125,
    }
    assert config.expert_dtype == "fp4"
    # Kept verbatim: `expert_dtype` is not folded in (native >= 5.21 does).
    assert config.quantization_config == FP8_QUANT
    assert config.dtype is not None and str(config.dtype).endswith("bfloat16")
    saved = config.to_dict()
    assert saved["model_type"] == "deepseek_v4_ext"
    assert "rope_scaling" not in saved and "mlp_layer_types" not in saved


def test_official_pro_schedule():
    config = tiny(num_hidden_layers=61, compress_ratios=PRO_RATIOS)
    assert config.layer_types[:3] == [HCA, HCA, CSA]
    assert config.layer_types.count(CSA) == 30 and config.layer_types.count(HCA) == 31
    assert config.layer_compress_ratio(61) == 0


def test_compress_ratios_without_mtp_entry_get_zero_appended():
    config = tiny(compress_ratios=[0, 0, 4, 128])
    assert config.compress_ratios == [0, 0, 4, 128, 0]
    config = tiny(compress_ratios=[0, 0, 4, 128], num_nextn_predict_layers=2)
    assert config.compress_ratios == [0, 0, 4, 128, 0, 0]


def test_official_and_native_spellings_normalise_equal():
    official = tiny(
        compress_ratios=[0, 0, 4, 128, 0],
        num_hash_layers=2,
        qk_rope_head_dim=8,
        rope_scaling=dict(YARN),
        model_type="deepseek_v4",
    )
    native = tiny(
        layer_types=TINY_TYPES,
        mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
        partial_rotary_factor=0.25,
        rope_parameters={
            "main": {"rope_type": "default", "rope_theta": 10000.0},
            "compress": {"rope_type": "yarn", **{k: v for k, v in YARN.items() if k != "type"}},
        },
    )
    assert official.to_dict() == native.to_dict()
    assert official.qk_rope_head_dim == native.qk_rope_head_dim == 8


def test_native_dict_round_trip():
    native = NativeConfig(**TINY, layer_types=[HCA, HCA, CSA, SWA], num_hash_layers=1, rope_scaling=dict(YARN))
    config = DeepseekV4ExtConfig.from_dict(native.to_dict())
    assert config.layer_types == native.layer_types
    assert config.compress_ratios == [128, 128, 4, 0, 0]
    assert native.mlp_layer_types == ["hash_moe", "moe", "moe", "moe"]
    assert config.num_hash_layers == 1
    assert config.partial_rotary_factor == native.partial_rotary_factor
    assert config.qk_rope_head_dim == native.qk_rope_head_dim
    assert config.compress_rates == native.compress_rates
    native_rope = copy.deepcopy(native.rope_parameters)
    # Native keeps the legacy `type` key next to `rope_type`; the plugin drops it.
    native_rope["compress"].pop("type", None)
    assert config.rope_parameters == native_rope
    assert DeepseekV4ExtConfig(**native.to_dict()).to_dict() == config.to_dict()


def test_native_loads_plugin_dict():
    config = DeepseekV4ExtConfig.from_dict(official_flash())
    native = NativeConfig.from_dict(config.to_dict())
    reference = NativeConfig.from_dict(official_flash())
    assert native.layer_types == config.layer_types == reference.layer_types
    assert native.mlp_layer_types == ["hash_moe"] * 3 + ["moe"] * 40 == reference.mlp_layer_types
    assert native.compress_rates == config.compress_rates
    assert native.rope_parameters == config.rope_parameters
    assert native.qk_rope_head_dim == config.qk_rope_head_dim


@pytest.mark.parametrize("source", ["default", "official", "tiny", "official_0731"])
def test_save_load_round_trip_is_idempotent(tmp_path, source):
    config = {
        "default": DeepseekV4ExtConfig,
        "official": lambda: DeepseekV4ExtConfig.from_dict(official_flash()),
        "official_0731": lambda: DeepseekV4ExtConfig.from_dict(official_0731()),
        "tiny": lambda: tiny(expert_dtype="fp8", attn_chunk_size=16, indexer_chunk_size=8, ops_backend="reference"),
    }[source]()
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "deepseek_v4_ext"
    assert "rope_scaling" not in saved and "mlp_layer_types" not in saved
    loaded = DeepseekV4ExtConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    again = DeepseekV4ExtConfig.from_dict(loaded.to_dict())
    assert again.to_dict() == loaded.to_dict()
    assert DeepseekV4ExtConfig(**saved).to_dict() == loaded.to_dict()


def test_base_config_reads_saved_file(tmp_path):
    # Trainer resume re-reads `config.json` through the base class (hf-integration.md §10.5).
    DeepseekV4ExtConfig.from_dict(official_flash()).save_pretrained(tmp_path)
    base = PreTrainedConfig.from_json_file(tmp_path / "config.json")
    assert base.layer_types[:3] == [SWA, SWA, CSA]
    assert base.num_hash_layers == 3


def test_native_loads_saved_folder(tmp_path):
    tiny(compress_ratios=[0, 0, 4, 128, 0], num_hash_layers=2).save_pretrained(tmp_path)
    native = NativeConfig.from_pretrained(tmp_path)
    assert native.layer_types == TINY_TYPES
    assert native.mlp_layer_types == ["hash_moe", "hash_moe", "moe", "moe"]


def test_legacy_compress_rate_kwargs_fold_in():
    config = tiny(compress_rate_csa=8, compress_rate_hca=64, compress_ratios=[0, 0, 8, 64])
    assert config.compress_rates == {CSA: 8, HCA: 64}
    assert config.layer_types == TINY_TYPES


def test_default_hash_layers_clamped_for_small_models():
    assert tiny(num_hidden_layers=2).num_hash_layers == 2
    assert tiny().num_hash_layers == 3


def test_helpers():
    config = tiny(compress_ratios=[0, 0, 4, 128, 0], num_hash_layers=2)
    assert [config.layer_compress_ratio(i) for i in range(5)] == [0, 0, 4, 128, 0]
    assert [config.is_hash_layer(i) for i in range(5)] == [True, True, False, False, False]
    with pytest.raises(IndexError):
        config.layer_compress_ratio(5)
    with pytest.raises(IndexError):
        config.is_hash_layer(-1)


INVALID = [
    ("compress_ratios", {"compress_ratios": [0, 0, 8, 128]}),
    ("compress_ratios", {"compress_ratios": [0, 0, 4]}),
    ("compress_ratios", {"compress_ratios": [0, 0, 4, 128, 0, 0]}),
    ("compress_rates", {"compress_rates": {CSA: 4}}),
    ("compress_rates", {"compress_rates": {CSA: 4, HCA: 4}}),
    ("compress_rates", {"compress_rates": {CSA: 0, HCA: 128}}),
    ("compress_rates", {"compress_rates": {CSA: 4, HCA: 128, "extra": 2}}),
    ("layer_types", {"layer_types": [SWA, SWA, CSA]}),
    ("layer_types", {"layer_types": ["full_attention"] * 4}),
    ("layer_types", {"layer_types": [CSA] * 4, "compress_ratios": [0, 0, 4, 128]}),
    ("num_hidden_layers", {"num_hidden_layers": 0}),
    ("num_nextn_predict_layers", {"num_nextn_predict_layers": -1}),
    ("o_groups", {"o_groups": 3}),
    ("o_groups", {"o_groups": 0}),
    ("index_topk", {"index_topk": 0}),
    ("num_key_value_heads", {"num_key_value_heads": 2}),
    ("qk_rope_head_dim", {"qk_rope_head_dim": 7}),
    ("qk_rope_head_dim", {"partial_rotary_factor": 2.0}),
    ("qk_rope_head_dim", {"partial_rotary_factor": 0.0}),
    ("qk_rope_head_dim", {"index_head_dim": 2}),
    ("qk_rope_head_dim", {"qk_rope_head_dim": 8, "partial_rotary_factor": 0.5}),
    ("num_experts_per_tok", {"num_experts_per_tok": 0}),
    ("num_experts_per_tok", {"num_experts_per_tok": 9}),
    ("num_hash_layers", {"num_hash_layers": 5}),
    ("num_hash_layers", {"num_hash_layers": -1}),
    ("scoring_func", {"scoring_func": "relu"}),
    ("sliding_window", {"sliding_window": 0}),
    ("hc_mult", {"hc_mult": 0}),
    ("hc_sinkhorn_iters", {"hc_sinkhorn_iters": 0}),
    ("attn_chunk_size", {"attn_chunk_size": 0}),
    ("indexer_chunk_size", {"indexer_chunk_size": 0}),
    ("ops_backend", {"ops_backend": "cuda"}),
    ("tie_word_embeddings", {"tie_word_embeddings": True}),
    ("n_shared_experts", {"n_shared_experts": 2}),
    ("expert_dtype", {"expert_dtype": "int4"}),
    ("model_type", {"model_type": "llama"}),
    ("mlp_layer_types", {"mlp_layer_types": ["moe", "hash_moe", "moe", "moe"]}),
    ("mlp_layer_types", {"mlp_layer_types": ["hash_moe", "dense", "moe", "moe"]}),
    ("num_hash_layers", {"mlp_layer_types": ["hash_moe", "moe", "moe", "moe"], "num_hash_layers": 2}),
    ("rope_type", {"rope_scaling": {"type": "llama3", "factor": 8.0}}),
    ("dspark_num_stages", {"dspark_num_stages": -1}),
    ("dspark_target_layer_ids", {**TINY_DSPARK, "dspark_target_layer_ids": [1, 2, 4], "dspark_num_stages": 3}),
    ("dspark_target_layer_ids", {**TINY_DSPARK, "dspark_target_layer_ids": [3, 2, 1], "dspark_num_stages": 3}),
    ("dspark_target_layer_ids", {**TINY_DSPARK, "dspark_target_layer_ids": [], "dspark_num_stages": 3}),
    ("dspark_target_layer_ids", {**TINY_DSPARK, "dspark_target_layer_ids": [-1, 2], "dspark_num_stages": 3}),
    ("dspark_noise_token_id", {**TINY_DSPARK, "dspark_noise_token_id": 256, "dspark_num_stages": 3}),
    ("dspark_markov_rank", {**TINY_DSPARK, "dspark_markov_rank": 0, "dspark_num_stages": 3}),
    ("dspark_block_size", {**TINY_DSPARK, "dspark_block_size": 0, "dspark_num_stages": 3}),
    ("dspark_markov_rank", {**TINY_DSPARK, "dspark_markov_rank": None, "dspark_num_stages": 3}),
    ("dspark_markov_rank", {"dspark_num_stages": 3}),
    ("dspark_num_stages", {**TINY_DSPARK, "compress_ratios": [0, 0, 4, 128]}),
    ("compress_ratios", {**TINY_DSPARK, "compress_ratios": [0, 0, 4, 128, 0, 4, 0]}),
    ("compress_ratios", {**TINY_DSPARK, "compress_ratios": [0, 0, 4, 128, 0], "dspark_num_stages": 3}),
    ("dspark_markov_rank", {**TINY_DSPARK, "dspark_num_stages": 3, "markov_rank": 16}),
    ("dspark_noise_token_id", {**TINY_DSPARK, "dspark_num_stages": 3, "dspark_config": {"mask_token_id": 3}}),
    ("dspark_config", {**TINY_DSPARK, "dspark_num_stages": 3, "dspark_config": {"gamma": 5}}),
    ("dspark_config", {**TINY_DSPARK, "dspark_num_stages": 3, "dspark_config": [5]}),
]


@pytest.mark.parametrize(("field", "overrides"), INVALID, ids=[f"{f}-{i}" for i, (f, _) in enumerate(INVALID)])
def test_invalid_values_raise_naming_the_field(field, overrides):
    with pytest.raises(ValueError, match=field):
        tiny(**overrides)


def test_validate_rechecks_after_edit():
    config = tiny()
    config.ops_backend = "cuda"
    with pytest.raises(Exception, match="ops_backend"):
        config.validate()


@pytest.mark.parametrize(
    "extra",
    [{"model_type": "deepseek_v41"}, {"text_config": {}, "vision_config": {}}],
    ids=["model_type", "sub_configs"],
)
def test_deepseek_v41_refused(extra):
    with pytest.raises(ValueError, match="V4.1"):
        DeepseekV4ExtConfig.from_dict({**official_flash(), **extra})


def test_reference_inference_config_refused():
    with pytest.raises(ValueError, match="inference/config.json"):
        DeepseekV4ExtConfig(dim=4096, n_layers=43, n_heads=64)


# ---- DSpark (`-0731` / `-Flash-DSpark`, dspark.md §2.2) --------------------------------------------------------


def test_official_0731_root_config():
    config = DeepseekV4ExtConfig.from_dict(official_0731())
    # The three trailing compress_ratios are the drafter's stages; the file's `num_nextn_predict_layers: 1` is stale.
    assert (config.dspark_num_stages, config.num_nextn_predict_layers) == (3, 0)
    assert config.compress_ratios == FLASH_RATIOS[:-1] + [0, 0, 0] and len(config.layer_types) == 43
    assert [config.layer_compress_ratio(i) for i in (43, 44, 45)] == [0, 0, 0]
    assert not any(config.is_hash_layer(i) for i in (43, 44, 45))
    for key, value in DSPARK_0731.items():
        assert getattr(config, key) == value, key
    plain = DeepseekV4ExtConfig.from_dict(official_flash())
    assert (plain.dspark_num_stages, plain.num_nextn_predict_layers, plain.dspark_markov_rank) == (0, 1, None)


def test_dspark_aliases_fold_in():
    """A nested `dspark_config` and an unprefixed `markov_rank` (as SGLang accepts them) equal the official keys."""
    raw = official_0731()
    for key in DSPARK_0731:
        del raw[key]
    raw["dspark_config"] = {"block_size": 5, "mask_token_id": 128799, "target_layer_ids": [40, 41, 42]}
    raw["markov_rank"] = 256
    config = DeepseekV4ExtConfig.from_dict(raw)
    assert config.to_dict() == DeepseekV4ExtConfig.from_dict(official_0731()).to_dict()
    assert not hasattr(config, "dspark_config") and not hasattr(config, "markov_rank")


def test_dspark_stage_count_given_explicitly():
    config = tiny(compress_ratios=[0, 0, 4, 128], dspark_num_stages=2, **TINY_DSPARK)
    assert config.compress_ratios == [0, 0, 4, 128, 0, 0] and config.num_nextn_predict_layers == 0
    # The stage count wins over a stale MTP count; compress_ratios then needs one entry per stage.
    config = tiny(compress_ratios=[0, 0, 4, 128, 0, 0], dspark_num_stages=2, num_nextn_predict_layers=1, **TINY_DSPARK)
    assert (config.dspark_num_stages, config.num_nextn_predict_layers) == (2, 0)


def test_dspark_validate_rechecks_after_edit():
    config = tiny(dspark_num_stages=3, **TINY_DSPARK)
    config.num_nextn_predict_layers = 1
    with pytest.raises(Exception, match="num_nextn_predict_layers"):
        config.validate()
    config = tiny(dspark_num_stages=3, **TINY_DSPARK)
    config.dspark_target_layer_ids = [1, 9]
    with pytest.raises(Exception, match="dspark_target_layer_ids"):
        config.validate()
