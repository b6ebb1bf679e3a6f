"""Config translation between the official DeepSeek-V4 files and the plugin's `DeepseekV4ExtConfig`.

Reading (root `config.json`, else `inference/config.json`) lives in `modeling_deepseek_v4.official_layout`, shared
with the direct official load; it is re-exported here. Export writes the official root spelling including the
legacy keys serving engines need (§5, "Interop").

DSpark releases (`-0731`, `-Flash-DSpark`; dspark.md §2.2) are recognised by their `dspark_*` keys; their stage
count comes from the tensors (`official_layout.dspark_stages`), and export writes the keys back together with the
release's stale `num_nextn_predict_layers: 1`.
"""

from __future__ import annotations

from modeling_deepseek_v4 import DeepseekV4ExtConfig
from modeling_deepseek_v4.official_layout import (
    _DSPARK_KEYS,
    is_dspark,
    plugin_config_from_official,
    read_official_config,
)

__all__ = ["is_dspark", "official_config_from_plugin", "plugin_config_from_official", "read_official_config"]


def official_config_from_plugin(config: DeepseekV4ExtConfig, expert_dtype: str) -> dict:
    """Root `config.json` in the official spelling (legacy keys included) for an exported checkpoint."""
    rope = dict(config.rope_parameters["compress"])
    rope_scaling = None
    if rope.get("rope_type") == "yarn":
        rope_scaling = {
            "type": "yarn",
            "factor": rope["factor"],
            "original_max_position_embeddings": rope["original_max_position_embeddings"],
            "beta_fast": rope.get("beta_fast", 32),
            "beta_slow": rope.get("beta_slow", 1),
        }
    out = {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "torch_dtype": "bfloat16",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "qk_rope_head_dim": config.qk_rope_head_dim,
        "q_lora_rank": config.q_lora_rank,
        "o_groups": config.o_groups,
        "o_lora_rank": config.o_lora_rank,
        "sliding_window": config.sliding_window,
        "compress_ratios": list(config.compress_ratios),
        "rope_theta": config.rope_theta,
        "compress_rope_theta": config.compress_rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": config.max_position_embeddings,
        "index_n_heads": config.index_n_heads,
        "index_head_dim": config.index_head_dim,
        "index_topk": config.index_topk,
        "n_routed_experts": config.n_routed_experts,
        "n_shared_experts": config.n_shared_experts,
        "num_experts_per_tok": config.num_experts_per_tok,
        "moe_intermediate_size": config.moe_intermediate_size,
        "num_hash_layers": config.num_hash_layers,
        "scoring_func": config.scoring_func,
        "topk_method": "noaux_tc",
        "norm_topk_prob": config.norm_topk_prob,
        "routed_scaling_factor": config.routed_scaling_factor,
        "swiglu_limit": config.swiglu_limit,
        "hc_mult": config.hc_mult,
        "hc_sinkhorn_iters": config.hc_sinkhorn_iters,
        "hc_eps": config.hc_eps,
        "num_nextn_predict_layers": config.num_nextn_predict_layers,
        "rms_norm_eps": config.rms_norm_eps,
        "hidden_act": config.hidden_act,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "tie_word_embeddings": False,
        "quantization_config": {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "scale_fmt": "ue8m0",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        },
    }
    if expert_dtype == "fp4":
        out["expert_dtype"] = "fp4"
    if config.dspark_num_stages:
        out.update({key: getattr(config, key) for key in _DSPARK_KEYS})
        # As the DSpark releases write it (stale: readers take the stage count from the mtp.* tensors).
        out["num_nextn_predict_layers"] = 1
    rates = config.compress_rates
    if rates != {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}:
        # Not an official key: only toy configs use other rates; official files imply 4 / 128.
        out["compress_rates"] = dict(rates)
    return out
