"""Tensor names and formats of the official DeepSeek-V4 checkpoints and their plugin (= transformers-native) names.

Source: `docs/official-format.md` §6 (official tensors, dtypes, scale siblings) and §7 (native renames, which this
plugin keeps). Routed experts are the only many-to-one mapping: official `ffn.experts.E.w1/w3/w2` per expert become
the fused 3-D `mlp.experts.gate_up_proj` ([E, 2I, d], w1 rows first) and `mlp.experts.down_proj` ([E, d, I]).

DSpark checkpoints (`-0731`, `-Flash-DSpark`; dspark.md §2.3, official-format.md §11) use `mtp.{s}.*` for the
drafter's S stages: each stage's block tensors map like a main layer's to `model.dspark.layers.{s}.*`; the extras
`mtp.0.{main_proj,main_norm}` and `mtp.{S-1}.{norm,hc_head_*,markov_head.*,confidence_head.*}` map to
`model.dspark.*`. Whether `mtp.*` is an MTP block or a drafter comes from the config (`dspark_num_stages`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .weight_formats import OFFICIAL_FP8_LINEARS

# Per-block (decoder layer or MTP block) renames: official suffix -> plugin suffix.
_BLOCK_RENAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "hc_attn_fn": "attn_hc.fn",
    "hc_attn_base": "attn_hc.base",
    "hc_attn_scale": "attn_hc.scale",
    "hc_ffn_fn": "ffn_hc.fn",
    "hc_ffn_base": "ffn_hc.base",
    "hc_ffn_scale": "ffn_hc.scale",
    "attn.attn_sink": "self_attn.sinks",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_norm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv.weight": "self_attn.kv_proj.weight",
    "attn.kv_norm.weight": "self_attn.kv_norm.weight",
    "attn.wo_a.weight": "self_attn.o_a_proj.weight",
    "attn.wo_b.weight": "self_attn.o_b_proj.weight",
    "attn.compressor.wkv.weight": "self_attn.compressor.kv_proj.weight",
    "attn.compressor.wgate.weight": "self_attn.compressor.gate_proj.weight",
    "attn.compressor.ape": "self_attn.compressor.position_bias",
    "attn.compressor.norm.weight": "self_attn.compressor.kv_norm.weight",
    "attn.indexer.compressor.wkv.weight": "self_attn.compressor.indexer.kv_proj.weight",
    "attn.indexer.compressor.wgate.weight": "self_attn.compressor.indexer.gate_proj.weight",
    "attn.indexer.compressor.ape": "self_attn.compressor.indexer.position_bias",
    "attn.indexer.compressor.norm.weight": "self_attn.compressor.indexer.kv_norm.weight",
    "attn.indexer.wq_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
    "attn.indexer.weights_proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.gate.tid2eid": "mlp.gate.tid2eid",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    # MTP block extras (official-format.md §6.3).
    "e_proj.weight": "e_proj.weight",
    "h_proj.weight": "h_proj.weight",
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "norm.weight": "norm.weight",
    "hc_head_fn": "hc_head.hc_fn",
    "hc_head_base": "hc_head.hc_base",
    "hc_head_scale": "hc_head.hc_scale",
}
_MTP_ONLY = {"e_proj.weight", "h_proj.weight", "enorm.weight", "hnorm.weight", "norm.weight"} | {
    "hc_head_fn",
    "hc_head_base",
    "hc_head_scale",
}
# DSpark drafter extras (dspark.md §2.3): official suffix -> plugin name under `model.dspark.`, on the first stage
# (context projection) or on the last one (draft head).
_DSPARK_FIRST = {"main_proj.weight": "main_proj.weight", "main_norm.weight": "main_norm.weight"}
_DSPARK_LAST = {
    "norm.weight": "norm.weight",
    "hc_head_fn": "hc_head.hc_fn",
    "hc_head_base": "hc_head.hc_base",
    "hc_head_scale": "hc_head.hc_scale",
    "markov_head.markov_w1.weight": "markov_head.markov_w1.weight",
    "markov_head.markov_w2.weight": "markov_head.markov_w2.weight",
    "confidence_head.proj.weight": "confidence_head.proj.weight",
}
_GLOBAL_RENAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "head.weight": "lm_head.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}
# Stored in fp32 in official checkpoints (everything else that is floating is BF16 or quantized).
F32_SUFFIXES = frozenset(
    {"hc_attn_fn", "hc_attn_base", "hc_attn_scale", "hc_ffn_fn", "hc_ffn_base", "hc_ffn_scale", "attn.attn_sink"}
    | {"attn.compressor.ape", "attn.indexer.compressor.ape", "ffn.gate.bias", "hc_head_fn", "hc_head_base"}
    | {"hc_head_scale"}
)

_BLOCK = re.compile(r"^(layers|mtp)\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^ffn\.experts\.(\d+)\.(w[123])\.weight$")
_PLUGIN_BLOCK = re.compile(r"^model\.(layers|mtp|dspark\.layers)\.(\d+)\.(.+)$")
_PLUGIN_DSPARK = re.compile(r"^model\.dspark\.(.+)$")
# Official prefix of each plugin block kind: the DSpark stages live under the official `mtp.` prefix.
_OFFICIAL_KIND = {"layers": "layers", "mtp": "mtp", "dspark.layers": "mtp"}
_PLUGIN_EXPERTS = re.compile(r"^mlp\.experts\.(gate_up_proj|down_proj)$")


class UnknownTensorError(KeyError):
    """A tensor name that is not part of the DeepSeek-V4 layout."""


@dataclass(frozen=True)
class OfficialName:
    """Where an official tensor goes: `plugin` name, and for routed experts the expert id and projection."""

    plugin: str
    expert: int | None = None
    proj: str | None = None


def official_to_plugin(name: str, dspark_stages: int = 0) -> OfficialName:
    """Map an official weight name (not a `.scale`) to its plugin name; raises `UnknownTensorError`. With
    `dspark_stages` > 0 the `mtp.*` tensors are those of a DSpark drafter with that many stages."""
    if name in _GLOBAL_RENAMES:
        return OfficialName(_GLOBAL_RENAMES[name])
    match = _BLOCK.match(name)
    if match is None:
        raise UnknownTensorError(name)
    kind, index, suffix = match.groups()
    prefix = f"model.{kind}.{index}."
    if kind == "mtp" and dspark_stages:
        stage = int(index)
        if stage >= dspark_stages:
            raise UnknownTensorError(name)
        extra = (_DSPARK_FIRST if stage == 0 else {}) | (_DSPARK_LAST if stage == dspark_stages - 1 else {})
        if suffix in extra:
            return OfficialName(f"model.dspark.{extra[suffix]}")
        kind, prefix = "layers", f"model.dspark.layers.{index}."
    expert = _EXPERT.match(suffix)
    if expert is not None:
        target = "mlp.experts.down_proj" if expert.group(2) == "w2" else "mlp.experts.gate_up_proj"
        return OfficialName(prefix + target, int(expert.group(1)), expert.group(2))
    if suffix not in _BLOCK_RENAMES or (kind == "layers" and suffix in _MTP_ONLY):
        raise UnknownTensorError(name)
    return OfficialName(prefix + _BLOCK_RENAMES[suffix])


_PLUGIN_TO_OFFICIAL_BLOCK = {v: k for k, v in _BLOCK_RENAMES.items()}
_PLUGIN_TO_OFFICIAL_GLOBAL = {v: k for k, v in _GLOBAL_RENAMES.items()}
_PLUGIN_TO_OFFICIAL_DSPARK = {v: (k, False) for k, v in _DSPARK_FIRST.items()} | {
    v: (k, True) for k, v in _DSPARK_LAST.items()
}
_MTP_ONLY_PLUGIN = {_BLOCK_RENAMES[k] for k in _MTP_ONLY}
# Official suffixes of the tensors stored as FP8 E4M3 with a block-scale `.scale` sibling (official-format.md
# §6.2-6.3), from the one table of FP8 linears (`weight_formats.OFFICIAL_FP8_LINEARS`).
FP8_SUFFIXES = frozenset(
    _PLUGIN_TO_OFFICIAL_BLOCK.get(f"{path}.weight", f"{path}.weight") for path in OFFICIAL_FP8_LINEARS
)


def plugin_to_official(name: str, dspark_stages: int = 0) -> str:
    """Official name of a plugin tensor that maps one-to-one (not the fused experts); raises `UnknownTensorError`.
    `dspark_stages`: the drafter's stage count (its head extras go to the last stage, `mtp.{S-1}.`)."""
    if name in _PLUGIN_TO_OFFICIAL_GLOBAL:
        return _PLUGIN_TO_OFFICIAL_GLOBAL[name]
    match = _PLUGIN_BLOCK.match(name)
    if match is None:
        extra = _PLUGIN_DSPARK.match(name)
        if extra is None or not dspark_stages or extra.group(1) not in _PLUGIN_TO_OFFICIAL_DSPARK:
            raise UnknownTensorError(name)
        official, last = _PLUGIN_TO_OFFICIAL_DSPARK[extra.group(1)]
        return f"mtp.{dspark_stages - 1 if last else 0}.{official}"
    kind, index, suffix = match.groups()
    if suffix not in _PLUGIN_TO_OFFICIAL_BLOCK or (kind != "mtp" and suffix in _MTP_ONLY_PLUGIN):
        raise UnknownTensorError(name)
    if kind == "dspark.layers" and int(index) >= dspark_stages:
        raise UnknownTensorError(name)
    return f"{_OFFICIAL_KIND[kind]}.{index}.{_PLUGIN_TO_OFFICIAL_BLOCK[suffix]}"


def plugin_expert_param(name: str) -> tuple[str, str] | None:
    """(block prefix `model.layers.N.` / `model.mtp.K.` / `model.dspark.layers.S.`, "gate_up_proj" | "down_proj")
    for a fused expert parameter name, else None."""
    match = _PLUGIN_BLOCK.match(name)
    if match is None:
        return None
    experts = _PLUGIN_EXPERTS.match(match.group(3))
    if experts is None:
        return None
    return f"model.{match.group(1)}.{match.group(2)}.", experts.group(1)


def official_suffix(name: str) -> str:
    """The per-block suffix of an official name (`layers.3.attn.wq_a.weight` -> `attn.wq_a.weight`)."""
    match = _BLOCK.match(name)
    return match.group(3) if match else name


def official_expert_name(block_prefix: str, expert: int, proj: str) -> str:
    """Official routed-expert weight name from a plugin block prefix (`model.layers.N.`, `model.dspark.layers.S.`)."""
    kind, index = block_prefix[len("model.") :].rstrip(".").rsplit(".", 1)
    return f"{_OFFICIAL_KIND[kind]}.{index}.ffn.experts.{expert}.{proj}.weight"


def scale_name(weight_name: str) -> str:
    """Official scale sibling: `X.weight` -> `X.scale`."""
    return weight_name[: -len(".weight")] + ".scale" if weight_name.endswith(".weight") else weight_name + ".scale"


def is_fp8_official(name: str) -> bool:
    return official_suffix(name) in FP8_SUFFIXES


def is_f32_official(name: str) -> bool:
    return official_suffix(name) in F32_SUFFIXES or name in {"hc_head_fn", "hc_head_base", "hc_head_scale"}
