"""This plugin's PEFT LoRA adapters <-> the per-expert PEFT layout that vLLM and SGLang read for DeepSeek-V4.

What the engines read (public code, read for this module; snapshots of differing age, so re-check before relying on
a detail):

vLLM
- Keys are PEFT keys `base_model.model.<module>.lora_A.weight` `[r, in]` / `.lora_B.weight` `[out, r]`. The prefix is
  stripped and the model's `hf_to_vllm_mapper` renames the rest before matching (vllm-project/vllm
  `vllm/lora/utils.py`, `parse_fine_tuned_lora_name`; `vllm/lora/lora_model.py`, `from_local_checkpoint`, which also
  skips the model's `lora_skip_prefixes` and accepts an expert key only if its `experts.<e>.<proj>` suffix is an
  expected module). DeepSeek-V4's mapper turns official checkpoint names into vLLM's (`layers.` -> `model.layers.`,
  `.shared_experts.w2` -> `.shared_experts.down_proj`; vllm-project/vllm `vllm/model_executor/models/deepseek_v4.py`,
  `_make_deepseek_v4_weights_mapper`), so an adapter for V4 uses the *official* names: `layers.N.attn.wq_a`,
  `layers.N.ffn.experts.E.w1` / `w2` / `w3`, `mtp.K.*`.
- Routed experts, "2-D" layout (what DeepSeek models use: `is_3d_moe_weight` stays False): one ordinary PEFT pair per
  expert and projection, names from the model's `get_expert_mapping()` (`experts.{e}.{ckpt name}`, packed into the
  `experts` module by `process_packed_modules_mapping` in `vllm/lora/utils.py`). V4's mapping uses `w1` (gate), `w2`
  (down), `w3` (up) (`vllm/model_executor/models/deepseek_v4.py`, `get_expert_mapping`); V2/V3 use `gate_proj` /
  `down_proj` / `up_proj` (`vllm/model_executor/models/deepseek_v2.py`, `DeepseekV2ForCausalLM.get_expert_mapping`,
  `SupportsLoRA`, `packed_modules_mapping = {"gate_up_proj": [...], "fused_qkv_a_proj": [...]}`).
  `PackedLoRALayerWeights.pack_moe` (`vllm/lora/lora_weights.py`) stacks them per projection and asserts that every
  expert has all three (all or nothing). `FusedMoEWithLoRA.set_lora` (`vllm/lora/layers/fused_moe.py`) copies w1
  and w3 into *separate* A buffers (`w13_lora_a_stacked[0]` / `[1]`) sliced to each tensor's own rank, so gate and up
  each need their own A (our shared gate/up A is written twice: exact) and smaller ranks than `r` are accepted.
  The "3-D" layout (PEFT `target_parameters`: `experts.base_layer.lora_A` = gate_up `[E*r, d]`, `experts.lora_A` =
  down) is only read for models with `is_3d_moe_weight` or with `enable_mixed_moe_lora_format`
  (`vllm/lora/model_manager.py`, `_stack_moe_lora_weights`, `_convert_3d_to_2d_moe_lora`); not used here.
- Scaling: one `lora_alpha / r` (or `/ sqrt(r)` with `use_rslora`) for the whole adapter; `rank_pattern` and
  `alpha_pattern` are dropped (`vllm/lora/peft_helper.py`, `PEFTHelper.__post_init__` / `from_dict`), so a
  per-projection scaling must be folded into B.
- DeepSeek-V4 LoRA itself: older snapshots declare only `SupportsPP` (`vllm/model_executor/models/deepseek_v4.py`).
  vllm-project/vllm PR #53361 ("[LoRA] feat: Support LoRA for DeepSeek V4", merged 2026-08-22) adds `SupportsLoRA`
  with `packed_modules_mapping = {"gate_up_proj": ["w1", "w3"], "fused_wqa_wkv": ["wq_a", "wkv"], "fused_wkv_wgate":
  ["wkv", "wgate"]}` and `lora_skip_prefixes = ["mtp."]` (seen in `vllm/models/deepseek_v4/xpu/model.py` on
  docs.vllm.ai and in the V4.1 classes `vllm/models/deepseek_v41/*/model.py`); issue #57166 (open) asks for V4.1.
  The MTP block is never adapted there.
- `wo_a`: **vLLM does not apply a LoRA on `wo_a`.** The module is a `ColumnParallelLinear` of the stored weight's
  shape (`in = n_heads * head_dim / o_groups`, `out = o_groups * o_lora_rank`), so an adapter pair of that shape
  loads, but the output projection reads `wo_a.weight` and its scale directly into a grouped FP8 einsum and never
  calls the module (`vllm/models/deepseek_v4/nvidia/ops/o_proj.py`, `deep_gemm_fp8_o_proj`;
  `vllm/model_executor/layers/deepseek_v4_attention.py`, `DeepseekV4MultiHeadLatentAttentionWrapper.forward`): the
  delta is silently ignored.

SGLang
- Keys: any PEFT key; the layer comes from `layers.(\\d+).` in the name and the module from a substring match against
  the normalized `target_modules` (`gate_proj`/`up_proj` -> `gate_up_proj`). A key with `experts.(\\d+).` goes to the
  `<module>_moe` buffer of that expert (sgl-project/sglang `python/sglang/srt/lora/mem_pool.py`,
  `load_lora_weight_to_buffer`); expert `w1`/`w3`/`w2` are renamed to `gate_proj`/`up_proj`/`down_proj` and gate and
  up are stacked, A rows `[gate A; up A]` (`python/sglang/srt/lora/lora.py`, `_rename_expert_w_to_proj`,
  `normalize_gate_up_proj`): again separate A per gate and up.
- Rank: every tensor is copied into `buffer[..., :r * c, :]` with an exact-shape assert (`mem_pool.py`,
  `load_lora_weight_tensor`), so all pairs must have exactly the config's `r`: smaller ranks are zero-padded here
  (exact). Scaling: `lora_alpha / r`, no rsLoRA (`lora.py`, `LoRAAdapter.__init__`).
- Names: V4 loads under `model.layers.N.self_attn.{wq_a,wkv,wq_b,wo_a,wo_b}` and `model.layers.N.mlp.experts`
  (`python/sglang/srt/models/deepseek_v4.py`, `remap_weight_name_to_dpsk_hf_format`: `.attn.` -> `.self_attn.`,
  `.ffn.` -> `.mlp.`, `w1`/`w2`/`w3` -> `gate_proj`/`down_proj`/`up_proj`); this layout uses those names.
- DeepSeek-V4 LoRA itself: **not supported upstream** in the stored `deepseek_v4.py` (no LoRA hooks; the generic
  `get_hidden_dim` fallback knows none of V4's projections, and the MoE buffers size experts from `num_experts`, which
  V4's config lacks). Open PRs add it: sgl-project/sglang #36578 (V4 attention targets) and #36579 ("Preserve
  DeepSeek-V4 grouped wo_a semantics": A routed with the adapter index repeated per group, B with a composite
  adapter/group index, so only the group diagonal of a `wo_a`-shaped pair is used). Upstream `wo_a` is read as
  `weight.view(G, R, D)` in an einsum, so like vLLM it ignores a LoRA there.

Conversions (all exact, in the factors' dtype):
- Linear LoRA (e.g. `q_a_proj`): renamed to its official module (`official_names.plugin_to_official`).
- Experts: bank `[E, ...]` -> per expert `w1` (gate: B rows `[:I]`), `w3` (up: B rows `[I:]`), both with the shared
  A (duplicated), and `w2` (down).
- `o_a_proj` (`wo_a`, `wo_a="stacked"`): the engines' module has the *stored* weight shape `[g * d_g, in_g]` and
  applies row block j to input group j, so a pair of that module's shape is applied group-diagonally (SGLang #36579).
  Our per-group pairs become one pair of rank `g * r`: A = `[A_0; ...; A_{g-1}]` `[g * r, in_g]`, B = block-diagonal
  `diag(B_0, ..., B_{g-1})` `[g * d_g, g * r]`; row block j of `B A` is exactly `B_j A_j`. (A dense
  `[g * r, g * in_g]` block-diagonal A would fit a linear over all groups' inputs at once, which neither engine's
  `wo_a` module is.) `wo_a="drop"` leaves it out. Either way no engine applies it today (see above), and its rank
  `g * r` raises the adapter's `r`, which vLLM's `--max-lora-rank` must cover.
- Scaling: exported `r` = the largest pair rank, `lora_alpha` = our main scaling times that `r` (so the main
  projections' B is copied bit for bit) and `use_rslora` false; each other projection's B is multiplied by
  `its scaling / exported scaling` (exact when that ratio is a power of two, as for power-of-two ranks).
- The original adapter_config and each module's rank / fold factor ride in the safetensors metadata
  (`dsv4_lora_export`), which `import_lora` uses to give back the original tensors; without it (an adapter from
  elsewhere) `import_lora` builds an equivalent adapter (same deltas, possibly other ranks, `rank_pattern` entries).
- `mtp.*` / DSpark modules are exported under their official names; vLLM skips `mtp.` and SGLang ignores keys without
  `layers.N.`, so the drafter stays unadapted there.

The writer follows the repository's rule: everything is read and converted in memory first (bad input fails before
anything is created), then written into a temporary folder next to the destination (`checkpoint.OutputFolder`,
with its lock) that is renamed into place at the end and removed on any failure.

Not verified here (no engine installed): loading the files in a running vLLM or SGLang; vLLM's DeepSeek-V4 MoE LoRA
on its FP4 / FP8 expert kernels; SGLang's V4 LoRA, which exists only in open PRs.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from modeling_deepseek_v4.official_names import (
    UnknownTensorError,
    official_expert_name,
    official_to_plugin,
    plugin_to_official,
)

from .checkpoint import ConversionError, OutputFolder, temp_dir_for

logger = logging.getLogger(__name__)

LAYOUTS = ("vllm", "sglang")
WO_A_MODES = ("stacked", "drop")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
METADATA_KEY = "dsv4_lora_export"
METADATA_VERSION = 1

_PREFIX = "base_model.model."
_LINEAR_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_EXPERTS_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+\.mlp\.experts)\.lora_(?P<ab>[AB])\.(?P<proj>gate_up_proj|down_proj)$"
)
_BLOCK = re.compile(r"^model\.(layers|mtp|dspark\.layers)\.(\d+)\.")
_DSPARK = re.compile(r"^model\.dspark\.layers\.(\d+)\.")
_OFFICIAL_EXPERT = re.compile(r"^(?P<block>(?:layers|mtp)\.\d+)\.ffn\.experts\.(?P<expert>\d+)\.(?P<w>w[123])$")
_EXPERT_PROJ = {"w1": "gate", "w2": "down", "w3": "up"}
_KNOWN_KEYS = (
    "`<module>.lora_A.weight` / `.lora_B.weight` of a Linear or `o_a_proj`, or "
    "`<block>.mlp.experts.lora_A.gate_up_proj` / `.down_proj` (and lora_B) of grouped experts"
)


# ------------------------------------------------------------------------------------------------------ helpers
def _scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _pattern_value(patterns: dict | None, module: str, default):
    """PEFT's `rank_pattern` / `alpha_pattern` lookup (`peft.utils.other.get_pattern_key`)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _fold(b: torch.Tensor, factor: float) -> torch.Tensor:
    return b.clone() if factor == 1.0 else b * factor


def _unfold(b: torch.Tensor, factor: float) -> torch.Tensor:
    return b.clone() if factor == 1.0 else b / factor


def _pad(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad a pair `A [k, in]`, `B [out, k]` to rank `rank` (adds nothing to `B A`)."""
    extra = rank - a.shape[-2]
    if extra <= 0:
        return a, b
    a = torch.cat([a, a.new_zeros(*a.shape[:-2], extra, a.shape[-1])], -2)
    return a, torch.cat([b, b.new_zeros(*b.shape[:-1], extra)], -1)


def _engine_name(official: str, layout: str) -> str:
    """Module name in `layout` of an official module name (no `.weight`)."""
    if layout == "vllm":
        return official  # the model's hf_to_vllm_mapper renames official names itself
    name = ("model." + official if official.startswith("layers.") else official) + "."
    name = name.replace(".attn.", ".self_attn.").replace(".ffn.", ".mlp.")  # remap_weight_name_to_dpsk_hf_format
    name = name.replace(".w1.", ".gate_proj.").replace(".w2.", ".down_proj.").replace(".w3.", ".up_proj.")
    return name[:-1]


def _official_name(engine: str, layout: str) -> str:
    if layout == "vllm":
        return engine
    name = (engine[len("model.") :] if engine.startswith("model.layers.") else engine) + "."
    name = name.replace(".self_attn.", ".attn.").replace(".mlp.", ".ffn.")
    name = name.replace(".gate_proj.", ".w1.").replace(".down_proj.", ".w2.").replace(".up_proj.", ".w3.")
    return name[:-1]


def _keys(module: str) -> tuple[str, str]:
    return f"{_PREFIX}{module}.lora_A.weight", f"{_PREFIX}{module}.lora_B.weight"


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not supported; choose one of {', '.join(LAYOUTS)}")


# -------------------------------------------------------------------------------------------------- reading
@dataclass
class _Adapter:
    folder: Path
    config: dict
    config_text: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)


def _read_adapter(src: Path) -> _Adapter:
    src = Path(src)
    if not src.is_dir():
        raise ConversionError(f"{src}: not a folder; pass the folder that `peft_model.save_pretrained(folder)` wrote.")
    config_path, weights = src / ADAPTER_CONFIG, src / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise ConversionError(
            f"{src}: no {ADAPTER_CONFIG}, so this is not a PEFT adapter folder; pass the folder that "
            "`peft_model.save_pretrained(folder)` wrote."
        )
    if not weights.is_file():
        bin_only = (src / "adapter_model.bin").exists()
        hint = " (it has adapter_model.bin: save it again with safe_serialization=True)" if bin_only else ""
        raise ConversionError(f"{src}: no {ADAPTER_WEIGHTS}{hint}; only safetensors adapters can be converted.")
    text = config_path.read_text()
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{config_path}: not valid JSON ({exc}); restore the file PEFT wrote.") from None
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
        raise ConversionError(
            f"{config_path}: peft_type is {config.get('peft_type') if isinstance(config, dict) else None!r}, not "
            "'LORA'; only LoRA adapters can be converted."
        )
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank <= 0 or not isinstance(alpha, (int, float)):
        raise ConversionError(
            f"{config_path}: needs a positive integer `r` and a number `lora_alpha` (found r={rank!r}, "
            f"lora_alpha={alpha!r}); restore the file PEFT wrote."
        )
    for name, bad in (
        ("use_dora", config.get("use_dora")),
        ("lora_bias", config.get("lora_bias")),
        ("modules_to_save", config.get("modules_to_save")),
        ("trainable_token_indices", config.get("trainable_token_indices")),
    ):
        if bad:
            raise ConversionError(
                f"{config_path}: `{name}` is set ({bad!r}); the engines' LoRA loaders read plain A/B pairs only "
                "(vLLM refuses DoRA and modules_to_save), so retrain without it."
            )
    try:
        with safe_open(weights, framework="pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(weights)
    except Exception as exc:  # safetensors raises its own error types
        raise ConversionError(f"{weights}: cannot read it ({exc}); the file is damaged or not safetensors.") from None
    return _Adapter(src, config, text, tensors, metadata)


def _unknown(where: Path, keys: list[str], why: str) -> ConversionError:
    shown = ", ".join(repr(k) for k in sorted(keys)[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
    return ConversionError(f"{where}: {why}: {shown}; remove them or convert an adapter this plugin wrote.")


@dataclass
class _Module:
    """One LoRA'd module of our adapter: kind `linear`, `grouped` (o_a_proj) or `experts`."""

    path: str
    kind: str
    a: dict[str, torch.Tensor] = field(default_factory=dict)  # projection -> A ("weight" for linear / grouped)
    b: dict[str, torch.Tensor] = field(default_factory=dict)


def _our_modules(adapter: _Adapter) -> dict[str, _Module]:
    """Group our adapter's tensors by module and check their shapes."""
    where = adapter.folder / ADAPTER_WEIGHTS
    modules: dict[str, _Module] = {}
    unknown = []
    for key, tensor in adapter.tensors.items():
        if (m := _EXPERTS_KEY.match(key)) is not None:
            module = modules.setdefault(m["module"], _Module(m["module"], "experts"))
            (module.a if m["ab"] == "A" else module.b)[m["proj"]] = tensor
        elif (m := _LINEAR_KEY.match(key)) is not None:
            kind = "grouped" if m["module"].endswith("self_attn.o_a_proj") else "linear"
            module = modules.setdefault(m["module"], _Module(m["module"], kind))
            (module.a if m["ab"] == "A" else module.b)["weight"] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise _unknown(where, unknown, f"keys that are not LoRA factors this export knows (expected {_KNOWN_KEYS})")
    if not modules:
        raise ConversionError(f"{where}: holds no LoRA factors; nothing to convert.")
    for module in modules.values():
        if _BLOCK.match(module.path) is None:
            raise ConversionError(
                f"{where}: LoRA on `{module.path}` (outside the decoder / MTP / DSpark blocks) has no counterpart in "
                "the engines' per-block LoRA layout; retrain without it in target_modules."
            )
        names = ("gate_up_proj", "down_proj") if module.kind == "experts" else ("weight",)
        ndim = 2 if module.kind == "linear" else 3
        for name in names:
            a, b = module.a.get(name), module.b.get(name)
            if a is None or b is None:
                raise ConversionError(
                    f"{where}: `{module.path}` has lora_{'A' if a is None else 'B'} of `{name}` missing; the adapter "
                    "is incomplete, save it again."
                )
            if a.ndim != ndim or b.ndim != ndim or a.shape[-2] != b.shape[-1] or a.shape[:-2] != b.shape[:-2]:
                raise ConversionError(
                    f"{where}: `{module.path}` `{name}` has A {tuple(a.shape)} and B {tuple(b.shape)}, which are not "
                    f"a pair of {ndim}-D LoRA factors; the adapter is damaged, save it again."
                )
        if module.kind == "experts":
            gu, down = module.b["gate_up_proj"], module.a["down_proj"]
            if gu.shape[1] % 2 or gu.shape[1] // 2 != down.shape[-1] or gu.shape[0] != down.shape[0]:
                raise ConversionError(
                    f"{where}: `{module.path}` gate_up B {tuple(gu.shape)} and down A {tuple(down.shape)} do not fit "
                    "one expert bank `[E, 2I, r]` / `[E, r, I]`; the adapter is damaged, save it again."
                )
    return modules


# ------------------------------------------------------------------------------------------------ the export
@dataclass
class _Pair:
    name: str  # engine module name
    a: torch.Tensor
    b: torch.Tensor
    scale: float  # the scaling our adapter applies to B @ A


def _module_names(path: str, kind: str, experts: int, layout: str, stages: int) -> list[str]:
    """Engine module names of one of our modules (per expert: gate, up, down), in the order `_pairs` yields them."""
    if kind == "experts":
        block = path[: -len("mlp.experts")]
        return [
            _engine_name(official_expert_name(block, e, w)[: -len(".weight")], layout)
            for e in range(experts)
            for w in ("w1", "w3", "w2")
        ]
    return [_engine_name(plugin_to_official(path + ".weight", stages)[: -len(".weight")], layout)]


def _pairs(module: _Module, config: dict, layout: str, stages: int) -> tuple[list[_Pair], dict]:
    """Engine pairs (unscaled factors + our scaling) of one module, and its metadata entry."""
    alpha = _pattern_value(config.get("alpha_pattern"), module.path, config["lora_alpha"])
    rslora = bool(config.get("use_rslora"))
    experts = module.a["gate_up_proj"].shape[0] if module.kind == "experts" else 0
    names = _module_names(module.path, module.kind, experts, layout, stages)
    if module.kind == "linear":
        a, b = module.a["weight"], module.b["weight"]
        scale = _scale(alpha, a.shape[0], rslora)
        return [_Pair(names[0], a, b, scale)], {"rank": a.shape[0], "scale": scale}
    if module.kind == "grouped":
        a, b = module.a["weight"], module.b["weight"]  # [g, r, in_g], [g, d_g, r]
        groups, rank = a.shape[0], a.shape[1]
        scale = _scale(alpha, rank, rslora)
        stacked = _Pair(names[0], a.reshape(groups * rank, a.shape[-1]), torch.block_diag(*b.unbind(0)), scale)
        return [stacked], {"rank": rank, "scale": scale, "groups": groups}
    a_gu, b_gu, a_d, b_d = (
        module.a["gate_up_proj"],
        module.b["gate_up_proj"],
        module.a["down_proj"],
        module.b["down_proj"],
    )
    inter = b_gu.shape[1] // 2
    s_gu, s_d = _scale(alpha, a_gu.shape[1], rslora), _scale(alpha, a_d.shape[1], rslora)
    pairs = []
    for e in range(a_gu.shape[0]):
        gate, up, down = names[3 * e : 3 * e + 3]
        pairs.append(_Pair(gate, a_gu[e], b_gu[e, :inter], s_gu))
        pairs.append(_Pair(up, a_gu[e], b_gu[e, inter:], s_gu))
        pairs.append(_Pair(down, a_d[e], b_d[e], s_d))
    entry = {
        "experts": a_gu.shape[0],
        "rank": {"gate_up_proj": a_gu.shape[1], "down_proj": a_d.shape[1]},
        "scale": {"gate_up_proj": s_gu, "down_proj": s_d},
    }
    return pairs, entry


def _exported_scaling(config: dict, rank: int) -> tuple[float | int, float]:
    """(lora_alpha, scaling) of the exported config: our main scaling when `alpha / rank` gives it back exactly."""
    main = _scale(config["lora_alpha"], config["r"], bool(config.get("use_rslora")))
    alpha: float | int = main * rank
    if alpha / rank != main:
        alpha = rank  # scaling 1.0 exactly; every B gets its own scaling folded in
    if float(alpha).is_integer():
        alpha = int(alpha)
    return alpha, alpha / rank


def export_lora(src_dir, dst_dir, layout: str = "vllm", *, wo_a: str = "stacked") -> dict:
    """Convert this plugin's saved PEFT adapter `src_dir` into `layout` ("vllm" or "sglang") in the new folder
    `dst_dir` (adapter_model.safetensors + adapter_config.json); see the module docstring for what each engine reads.
    `wo_a="stacked"` exports `o_a_proj` as one block-diagonal pair of rank `groups * r`, `"drop"` leaves it out.
    Returns a summary (`layout`, `r`, `lora_alpha`, `modules`, `tensors`, `dropped`)."""
    _check_layout(layout)
    if wo_a not in WO_A_MODES:
        raise ValueError(f"wo_a={wo_a!r} is not supported; choose one of {', '.join(WO_A_MODES)}")
    dst = Path(dst_dir)
    _check_destination(dst)
    adapter = _read_adapter(Path(src_dir))
    if (adapter.config.get("rank_pattern") or {}).get("experts.shared"):
        raise ConversionError(
            f"{adapter.folder}: this adapter shares one expert LoRA pair across all experts "
            "(rank_pattern experts.shared), which the engines' per-expert layouts cannot express without the expert "
            "count; merge it instead (merge_and_unload, then dsv4-convert to-official)."
        )
    modules = _our_modules(adapter)
    stages = 1 + max((int(m[1]) for p in modules if (m := _DSPARK.match(p))), default=-1)
    dropped = sorted(p for p, mod in modules.items() if mod.kind == "grouped") if wo_a == "drop" else []
    pairs: list[_Pair] = []
    entries = []
    for path in sorted(modules):
        if path in dropped:
            continue
        module = modules[path]
        try:
            module_pairs, entry = _pairs(module, adapter.config, layout, stages)
        except UnknownTensorError:
            raise ConversionError(
                f"{adapter.folder / ADAPTER_WEIGHTS}: `{path}` has no official DeepSeek-V4 name, so no engine module "
                "to carry its LoRA; retrain without it in target_modules."
            ) from None
        pairs += module_pairs
        entries.append({"module": path, "kind": module.kind, **entry})
    if not pairs:
        raise ConversionError(f"{adapter.folder}: nothing left to export (wo_a='drop' removed every module).")

    rank = max(p.a.shape[0] for p in pairs)
    alpha, scaling = _exported_scaling(adapter.config, rank)
    tensors: dict[str, torch.Tensor] = {}
    for pair in pairs:
        a, b = pair.a.clone(), _fold(pair.b, pair.scale / scaling)
        if layout == "sglang":
            a, b = _pad(a, b, rank)
        key_a, key_b = _keys(pair.name)
        tensors[key_a], tensors[key_b] = a.contiguous(), b.contiguous()
    for entry in entries:  # the fold factor import_lora undoes
        scale = entry["scale"]
        entry["fold"] = {k: v / scaling for k, v in scale.items()} if isinstance(scale, dict) else scale / scaling

    grouped = [e["module"] for e in entries if e["kind"] == "grouped"]
    if grouped:
        logger.warning(
            "%d o_a_proj (wo_a) LoRA pairs exported with rank %d: vLLM reads wo_a's weight directly and ignores a "
            "LoRA there; upstream SGLang too (PR #36579 is open). Pass wo_a='drop' to leave them out.",
            len(grouped),
            rank,
        )
    if any(not e["module"].startswith("model.layers.") for e in entries):
        logger.warning("MTP / DSpark LoRA exported under mtp.* names: vLLM skips them, SGLang ignores them.")

    targets = sorted({p.name.rsplit(".", 1)[-1] for p in pairs})
    config = dict(adapter.config)
    config.update(
        r=rank,
        lora_alpha=alpha,
        use_rslora=False,
        rank_pattern={},
        alpha_pattern={},
        target_modules=targets,
        target_parameters=None,
        auto_mapping=None,
    )
    metadata = {
        "version": METADATA_VERSION,
        "layout": layout,
        "dspark_stages": stages,
        "source_config": adapter.config_text,
        "modules": entries,
        "dropped": dropped,
    }
    _write(dst, tensors, config, {METADATA_KEY: json.dumps(metadata)}, "LoRA export")
    return {
        "layout": layout,
        "r": rank,
        "lora_alpha": alpha,
        "modules": len(entries),
        "tensors": len(tensors),
        "dropped": dropped,
    }


# ------------------------------------------------------------------------------------------------ the import
def import_lora(
    src_dir, dst_dir, layout: str = "vllm", *, groups: int | None = None, use_metadata: bool = True
) -> dict:
    """Convert an adapter in `layout` ("vllm" or "sglang") back into this plugin's PEFT layout in the new folder
    `dst_dir` (loadable with `expert_lora.load_expert_lora`). An adapter written by `export_lora` comes back exactly
    as it was (its metadata holds the original config and ranks; with `wo_a="drop"` without `o_a_proj`, also in its
    target_modules). Any other adapter, or `use_metadata=False`, is
    rebuilt with the same deltas: gate/up pairs with equal A share it, others are stacked; ranks that differ from the
    config's `r` get `rank_pattern` entries. `groups` (the model's `o_groups`) is needed then for `wo_a` pairs.
    Returns a summary (`modules`, `tensors`, `exact`)."""
    _check_layout(layout)
    dst = Path(dst_dir)
    _check_destination(dst)
    adapter = _read_adapter(Path(src_dir))
    where = adapter.folder / ADAPTER_WEIGHTS
    raw = adapter.metadata.get(METADATA_KEY) if use_metadata else None
    if raw is not None:
        try:
            metadata = json.loads(raw)
            version, exported_layout = metadata["version"], metadata["layout"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConversionError(
                f"{where}: its `{METADATA_KEY}` metadata is damaged; pass use_metadata=False to import it as a plain "
                "engine adapter."
            ) from None
        if version != METADATA_VERSION:
            raise ConversionError(
                f"{where}: export metadata version {version} is not {METADATA_VERSION}; use the matching release or "
                "pass use_metadata=False."
            )
        if exported_layout != layout:
            raise ConversionError(
                f"{where}: was exported for {exported_layout!r}, not {layout!r}; pass layout={exported_layout!r}."
            )
        tensors, config_text = _import_exact(adapter, metadata, layout)
        exact = not metadata.get("dropped")
        if not exact:  # o_a_proj was left out: its LoRA must not come back as freshly initialized factors
            config_text = _without_o_a_proj(config_text, where)
    else:
        tensors, config = _import_generic(adapter, layout, groups)
        config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        exact = False
    modules = {k.split(".lora_", 1)[0] for k in tensors}
    _write(dst, tensors, config_text, {}, "LoRA import")
    return {"modules": len(modules), "tensors": len(tensors), "exact": exact}


def _import_exact(adapter: _Adapter, metadata: dict, layout: str) -> tuple[dict[str, torch.Tensor], str]:
    where = adapter.folder / ADAPTER_WEIGHTS
    pool = dict(adapter.tensors)
    stages = int(metadata.get("dspark_stages", 0))

    def take(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        key_a, key_b = _keys(name)
        if key_a not in pool or key_b not in pool:
            raise ConversionError(
                f"{where}: `{name}` (listed in the export metadata) has no "
                f"{'lora_A' if key_a not in pool else 'lora_B'}; the folder was changed after export, so pass "
                "use_metadata=False."
            )
        return pool.pop(key_a), pool.pop(key_b)

    def trim(name: str, a: torch.Tensor, b: torch.Tensor, rank: int, fold: float):
        if a[rank:].any() or b[:, rank:].any():
            raise ConversionError(
                f"{where}: `{name}` has non-zero factors beyond its original rank {rank}; the adapter was changed "
                "after export, so pass use_metadata=False."
            )
        return a[:rank].clone(), _unfold(b[:, :rank], fold)

    out: dict[str, torch.Tensor] = {}
    for entry in metadata["modules"]:
        path, kind = entry["module"], entry["kind"]
        names = _module_names(path, kind, entry.get("experts", 0), layout, stages)
        if kind == "linear":
            a, b = trim(names[0], *take(names[0]), entry["rank"], entry["fold"])
            out[f"{_PREFIX}{path}.lora_A.weight"], out[f"{_PREFIX}{path}.lora_B.weight"] = a, b
        elif kind == "grouped":
            a, b = take(names[0])
            g, rank = entry["groups"], entry["rank"]
            a, b = trim(names[0], a, b, g * rank, entry["fold"])
            d = b.shape[0] // g
            blocks = b.reshape(g, d, g, rank)
            diagonal = torch.stack([blocks[j, :, j] for j in range(g)])
            if blocks.count_nonzero() != diagonal.count_nonzero():
                raise ConversionError(
                    f"{where}: `{names[0]}` B is no longer block-diagonal; the adapter was changed after export, so "
                    "pass use_metadata=False (with groups=...)."
                )
            out[f"{_PREFIX}{path}.lora_A.weight"] = a.reshape(g, rank, -1).clone()
            out[f"{_PREFIX}{path}.lora_B.weight"] = diagonal.contiguous()
        else:
            ranks, folds = entry["rank"], entry["fold"]
            a_gu, b_gu, a_d, b_d = [], [], [], []
            for e in range(entry["experts"]):
                gate, up, down = names[3 * e : 3 * e + 3]
                ag, bg = trim(gate, *take(gate), ranks["gate_up_proj"], folds["gate_up_proj"])
                au, bu = trim(up, *take(up), ranks["gate_up_proj"], folds["gate_up_proj"])
                if not torch.equal(ag, au):
                    raise ConversionError(
                        f"{where}: `{gate}` and `{up}` have different lora_A; the adapter was changed after export, "
                        "so pass use_metadata=False."
                    )
                ad, bd = trim(down, *take(down), ranks["down_proj"], folds["down_proj"])
                a_gu.append(ag), b_gu.append(torch.cat([bg, bu])), a_d.append(ad), b_d.append(bd)
            out[f"{_PREFIX}{path}.lora_A.gate_up_proj"] = torch.stack(a_gu)
            out[f"{_PREFIX}{path}.lora_B.gate_up_proj"] = torch.stack(b_gu)
            out[f"{_PREFIX}{path}.lora_A.down_proj"] = torch.stack(a_d)
            out[f"{_PREFIX}{path}.lora_B.down_proj"] = torch.stack(b_d)
    if pool:
        raise _unknown(
            where, list(pool), "keys the export metadata does not list (the folder was changed after export)"
        )
    return out, metadata["source_config"]


def _without_o_a_proj(config_text: str, where: Path) -> str:
    config = json.loads(config_text)
    targets = config.get("target_modules")
    if not isinstance(targets, list):
        raise ConversionError(
            f"{where}: was exported with wo_a='drop' and its original target_modules {targets!r} is not a list, so "
            "o_a_proj cannot be taken out of it; export again with wo_a='stacked'."
        )
    config["target_modules"] = [t for t in targets if t != "o_a_proj"]
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def _import_generic(adapter: _Adapter, layout: str, groups: int | None) -> tuple[dict[str, torch.Tensor], dict]:
    """Rebuild our layout from plain engine pairs (no export metadata): same deltas, possibly other ranks."""
    where = adapter.folder / ADAPTER_WEIGHTS
    cfg = adapter.config
    rank_t, alpha_t = cfg["r"], cfg["lora_alpha"]
    rslora = bool(cfg.get("use_rslora")) and layout == "vllm"  # SGLang ignores use_rslora
    engine_scale = _scale(alpha_t, rank_t, rslora)

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in adapter.tensors.items():
        m = _LINEAR_KEY.match(key)
        if m is None or tensor.ndim != 2:
            unknown.append(key)
            continue
        pairs.setdefault(m["module"], {})[m["ab"]] = tensor
    if unknown:
        raise _unknown(
            where, unknown, "keys that are not 2-D PEFT LoRA factors `<module>.lora_A.weight` / `.lora_B.weight`"
        )

    linear: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    grouped: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    experts: dict[str, dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = {}
    for name, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"} or pair["A"].shape[0] != pair["B"].shape[1]:
            raise ConversionError(
                f"{where}: `{name}` is not a complete LoRA pair (A [r, in], B [out, r]); fix the adapter."
            )
        official = _official_name(name, layout)
        try:
            if (m := _OFFICIAL_EXPERT.match(official)) is not None:
                block = official_to_plugin(official + ".weight").plugin.rsplit(".", 1)[0]  # ...mlp.experts
                experts.setdefault(block, {}).setdefault(int(m["expert"]), {})[_EXPERT_PROJ[m["w"]]] = (
                    pair["A"],
                    pair["B"],
                )
                continue
            plugin = official_to_plugin(official + ".weight").plugin[: -len(".weight")]
        except UnknownTensorError:
            raise ConversionError(
                f"{where}: `{name}` is not a DeepSeek-V4 module in the {layout} layout; remove it or pick the right "
                "layout."
            ) from None
        if _BLOCK.match(plugin) is None:
            raise ConversionError(
                f"{where}: `{name}` is outside the decoder blocks; this plugin's adapters hold none."
            )
        (grouped if plugin.endswith("self_attn.o_a_proj") else linear)[plugin] = (pair["A"], pair["B"])

    out: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}

    def fold_for(rank: int) -> float:
        return engine_scale / _scale(alpha_t, rank, rslora)

    for path, (a, b) in linear.items():
        if a.shape[0] != rank_t:
            rank_pattern[path] = a.shape[0]
        out[f"{_PREFIX}{path}.lora_A.weight"] = a.clone()
        out[f"{_PREFIX}{path}.lora_B.weight"] = _fold(b, fold_for(a.shape[0]))

    if grouped:
        if not groups:
            raise ConversionError(
                f"{where}: has wo_a LoRA pairs but no export metadata; pass groups=<the model's o_groups> to split "
                "them."
            )
        split = {}
        for path, (a, b) in grouped.items():
            if b.shape[0] % groups:
                raise ConversionError(f"{where}: `{path}` B has {b.shape[0]} rows, not a multiple of groups={groups}.")
            d, rank = b.shape[0] // groups, a.shape[0]
            blocks = b.reshape(groups, d, groups, rank // groups) if rank % groups == 0 else None
            if blocks is not None and blocks.count_nonzero() == sum(
                blocks[j, :, j].count_nonzero() for j in range(groups)
            ):  # block-diagonal: group j owns rank slice j
                split[path] = (
                    a.reshape(groups, rank // groups, -1),
                    torch.stack([blocks[j, :, j] for j in range(groups)]),
                )
            else:  # one A shared by every group
                split[path] = (a.expand(groups, -1, -1), b.reshape(groups, d, rank))
        width = max(a.shape[1] for a, _ in split.values())
        if width != rank_t:
            rank_pattern["o_a_proj"] = width
        for path, (a, b) in split.items():
            a, b = _pad(a, b, width)
            out[f"{_PREFIX}{path}.lora_A.weight"] = a.contiguous().clone()
            out[f"{_PREFIX}{path}.lora_B.weight"] = _fold(b, fold_for(width)).contiguous()

    banks = {}
    for block, per_expert in experts.items():
        count = len(per_expert)
        if sorted(per_expert) != list(range(count)) or any(len(p) != 3 for p in per_expert.values()):
            raise ConversionError(
                f"{where}: the routed experts of `{block}` are incomplete (every expert 0..E-1 needs gate, up and "
                "down pairs, as vLLM's pack_moe requires too); fix the adapter."
            )
        a_gu, b_gu, a_d, b_d = [], [], [], []
        shared = all(torch.equal(p["gate"][0], p["up"][0]) for p in per_expert.values())
        for e in range(count):
            (ag, bg), (au, bu), (ad, bd) = (per_expert[e][k] for k in ("gate", "up", "down"))
            if shared:
                a_gu.append(ag), b_gu.append(torch.cat([bg, bu]))
            else:  # stack the two ranks: [[Bg, 0], [0, Bu]] @ [Ag; Au]
                a_gu.append(torch.cat([ag, au])), b_gu.append(torch.block_diag(bg, bu))
            a_d.append(ad), b_d.append(bd)
        banks[block] = [torch.stack(t) for t in (a_gu, b_gu, a_d, b_d)]
    if banks:
        width_gu = max(v[0].shape[1] for v in banks.values())
        width_d = max(v[2].shape[1] for v in banks.values())
        for name, width in (("experts.gate_up_proj", width_gu), ("experts.down_proj", width_d)):
            if width != rank_t:
                rank_pattern[name] = width
        for block, (a_gu, b_gu, a_d, b_d) in banks.items():
            a_gu, b_gu = _pad(a_gu, b_gu, width_gu)
            a_d, b_d = _pad(a_d, b_d, width_d)
            out[f"{_PREFIX}{block}.lora_A.gate_up_proj"] = a_gu
            out[f"{_PREFIX}{block}.lora_B.gate_up_proj"] = _fold(b_gu, fold_for(width_gu))
            out[f"{_PREFIX}{block}.lora_A.down_proj"] = a_d
            out[f"{_PREFIX}{block}.lora_B.down_proj"] = _fold(b_d, fold_for(width_d))

    targets = sorted(
        {p.rsplit(".", 1)[-1] for p in linear}
        | ({"o_a_proj"} if grouped else set())
        | ({"experts"} if banks else set())
    )
    config = dict(cfg)
    config.update(
        r=rank_t,
        lora_alpha=alpha_t,
        use_rslora=rslora,
        rank_pattern=rank_pattern,
        alpha_pattern={},
        target_modules=targets,
        target_parameters=None,
    )
    return out, config


# ------------------------------------------------------------------------------------------------ the writer
def _check_destination(dst: Path) -> None:
    """Refuse early, before any work: an existing destination, or an interrupted run's temporary folder."""
    dst = dst.absolute()
    if dst.exists() or dst.is_symlink():
        raise ConversionError(f"{dst}: already exists; remove it or choose another destination.")
    tmp = temp_dir_for(dst)
    if tmp.exists():
        raise ConversionError(f"{tmp}: left by an interrupted run; delete it and run again.")


def _write(dst: Path, tensors: dict[str, torch.Tensor], config, metadata: dict[str, str], what: str) -> None:
    """Write the adapter into a temporary folder next to `dst` and rename it into place (nothing is left behind on
    failure)."""
    size = sum(t.numel() * t.element_size() for t in tensors.values()) + (1 << 20)
    out = OutputFolder(dst.absolute(), size, resume=False, progress=False, what=what)
    try:  # OutputFolder.writing() would keep a disk-full run for --resume; an adapter is cheap to write again
        ordered = {k: tensors[k].contiguous() for k in sorted(tensors)}
        save_file(ordered, str(out.tmp / ADAPTER_WEIGHTS), metadata={"format": "pt", **metadata})
        text = config if isinstance(config, str) else json.dumps(config, indent=2, sort_keys=True) + "\n"
        (out.tmp / ADAPTER_CONFIG).write_text(text)
    except BaseException as exc:
        out.discard()
        if isinstance(exc, OSError):
            where = exc.filename or out.tmp
            raise ConversionError(
                f"{where}: {exc.strerror or exc}; nothing was written, fix that and run again."
            ) from None
        raise
    out.finish()


__all__ = ["LAYOUTS", "export_lora", "import_lora"]
