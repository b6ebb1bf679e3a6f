"""Config translation between the official DeepSeek-V4 files and the plugin's `DeepseekV4ExtConfig`.

Official root `config.json` (HF-style names, official-format.md §3) is read directly by `DeepseekV4ExtConfig`; the
reference `inference/config.json` (`ModelArgs` names, §4) is mapped here when the root file is missing. Export
writes the official root spelling including the legacy keys serving engines need (§5, "Interop").

DSpark releases (`-0731`, `-Flash-DSpark`; dspark.md §2.2) are recognised by their `dspark_*` keys; their stage
count comes from the tensors (`dspark_stages`, in to_plugin.py), and export writes the keys back together with the
release's stale `num_nextn_predict_layers: 1`.
"""

from __future__ import annotations

import json
from pathlib import Path

from modeling_deepseek_v4 import DeepseekV4ExtConfig

from .checkpoint import ConversionError

# inference/config.json (ModelArgs) -> root config.json names (official-format.md §4-§5).
_MODEL_ARGS = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "moe_inter_dim": "moe_intermediate_size",
    "n_activated_experts": "num_experts_per_tok",
    "route_scale": "routed_scaling_factor",
    "score_func": "scoring_func",
    "n_hash_layers": "num_hash_layers",
    "window_size": "sliding_window",
    "rope_head_dim": "qk_rope_head_dim",
    "norm_eps": "rms_norm_eps",
    "n_mtp_layers": "num_nextn_predict_layers",
}
_DSPARK_KEYS = ("dspark_block_size", "dspark_noise_token_id", "dspark_target_layer_ids", "dspark_markov_rank")
_COPIED = (
    "vocab_size",
    "n_routed_experts",
    "n_shared_experts",
    "q_lora_rank",
    "head_dim",
    "o_groups",
    "o_lora_rank",
    "index_n_heads",
    "index_head_dim",
    "index_topk",
    "swiglu_limit",
    "hc_mult",
    "hc_sinkhorn_iters",
    "hc_eps",
    "rope_theta",
    "compress_rope_theta",
    "compress_ratios",
    "expert_dtype",
    # Not in official files; toy checkpoints with other CSA / HCA rates carry it.
    "compress_rates",
    *_DSPARK_KEYS,
)
# Keys that exist only in official files and have no meaning for the plugin config.
_DROP = ("torch_dtype", "transformers_version", "architectures", "auto_map", "dtype", "scale_fmt", "scale_dtype")


def is_dspark(raw: dict) -> bool:
    """Whether an official config describes a DSpark release (any `dspark_*` key, or SGLang's `markov_rank`)."""
    return any(key.startswith("dspark_") for key in raw) or "markov_rank" in raw


def _from_model_args(args: dict) -> dict:
    out = {root: args[key] for key, root in _MODEL_ARGS.items() if key in args}
    if is_dspark(args) and "n_mtp_layers" in args:
        # In a DSpark release `n_mtp_layers` counts the drafter's stages (dspark.md §2.2).
        out["dspark_num_stages"] = out.pop("num_nextn_predict_layers")
    out.update({key: args[key] for key in _COPIED if key in args})
    if "rope_factor" in args:
        out["rope_scaling"] = {
            "type": "yarn",
            "factor": args["rope_factor"],
            "original_max_position_embeddings": args.get("original_seq_len", 65536),
            "beta_fast": args.get("beta_fast", 32),
            "beta_slow": args.get("beta_slow", 1),
        }
    return out


def read_official_config(folder: Path) -> dict:
    """The official config as a root-spelling dict (root `config.json`, else `inference/config.json`)."""
    root, inference = folder / "config.json", folder / "inference" / "config.json"
    if root.exists():
        path, raw = root, None
    elif inference.exists():
        path, raw = inference, None
    else:
        raise ConversionError(f"{folder}: no config.json (nor inference/config.json); is this a DeepSeek-V4 folder?")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path}: unreadable JSON ({exc}).") from None
    if raw.get("model_type") == "deepseek_v41" or "text_config" in raw or "vision_config" in raw:
        raise ConversionError(
            f"{path}: DeepSeek-V4.1 (model_type deepseek_v41) is a different architecture (Engram memory, "
            "cross-layer KV sharing) and is not supported by this converter; use a DeepSeek-V4 checkpoint."
        )
    return raw if path == root else _from_model_args(raw)


def plugin_config_from_official(raw: dict, dtype: str, dspark_stages: int | None = None) -> DeepseekV4ExtConfig:
    """Build and validate the plugin config; raises `ConversionError` naming the bad field. `dspark_stages`: the
    DSpark stage count found in the tensors (it overrides the config's)."""
    kwargs = {k: v for k, v in raw.items() if k not in _DROP}
    kwargs.pop("model_type", None)
    if dspark_stages is not None:
        kwargs["dspark_num_stages"] = dspark_stages
    quantization = kwargs.pop("quantization_config", None)
    try:
        config = DeepseekV4ExtConfig(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConversionError(f"config.json: {exc}") from None
    config.architectures = ["DeepseekV4ExtForCausalLM"]
    # `quantization_config` is dropped: transformers would hand it to its own FP8 quantizer. In keep mode the
    # converter records the layout it found in the tensors as `dsv4_quantization` instead.
    del quantization
    config.dtype = {"bf16": "bfloat16", "fp32": "float32", "keep": "bfloat16"}[dtype]
    return config


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
