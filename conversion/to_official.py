"""This plugin's Hugging Face folder -> official DeepSeek-V4 layout (FP8 128x128 + FP4 or FP8 routed experts).

The result loads in DeepSeek's reference `inference/`, vLLM and SGLang. Quantization follows the official formats
(power-of-two E8M0 scales, `quant_formats.py`). When the folder came from `to_plugin` it carries the official
scales (`official_scales*.safetensors`, or `*_scale_inv` in `keep` mode): each block / group whose weights are
still exactly representable with its original scale keeps it, so an unchanged model exports bit for bit; changed
blocks get the official rule's scale. `expert_dtype="fp8"` transcodes FP4 experts losslessly to FP8 per 128x128
block (official `convert.py --expert-dtype fp8`) and refuses, naming tensor and block, where that is not exact.
A DSpark drafter (`model.dspark.*`) goes back to the official `mtp.{s}.*` names and dtypes (dspark.md §2.3:
`main_proj` FP8 with its E8M0 scale, the Markov and confidence weights bf16).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from modeling_deepseek_v4.fp4_transcode import fp4_to_fp8_blocks
from modeling_deepseek_v4.official_layout import COPIED_FILES
from modeling_deepseek_v4.official_names import (
    is_f32_official,
    is_fp8_official,
    official_expert_name,
    plugin_expert_param,
    plugin_to_official,
    scale_name,
)
from modeling_deepseek_v4.quant_formats import (
    FP4_GROUP,
    FP8_BLOCK,
    e8m0_to_float,
    float_to_fp4_codes,
    pack_fp4,
)
from modeling_deepseek_v4.weight_formats import FP4, FP8, WeightFormat

from .checkpoint import (
    DTYPES,
    ConversionError,
    OutputFolder,
    ShardPlan,
    SourceCheckpoint,
    fingerprint,
)
from .official_config import official_config_from_plugin
from .plugin_checks import check_plugin_tensors, check_table, read_plugin_folder
from .to_plugin import Report


def _expand(scale: torch.Tensor, block: tuple[int, int], shape: torch.Size) -> torch.Tensor:
    """Block scale multipliers `[..., ceil(N/bn), ceil(K/bk)]` expanded to `shape [..., N, K]`."""
    mult = e8m0_to_float(scale)
    full = mult.repeat_interleave(block[0], dim=-2)[..., : shape[-2], :]
    return full.repeat_interleave(block[1], dim=-1)[..., : shape[-1]]


def _blocks_all(mask: torch.Tensor, block: tuple[int, int], grid: torch.Size) -> torch.Tensor:
    """`mask [..., N, K]` reduced with all() over each block of the scale grid `[..., gN, gK]`."""
    n, k = mask.shape[-2:]
    pad = torch.nn.functional.pad(mask.float(), (0, grid[-1] * block[1] - k, 0, grid[-2] * block[0] - n), value=1)
    pad = pad.unflatten(-1, (grid[-1], block[1])).unflatten(-3, (grid[-2], block[0]))
    return pad.amin(dim=(-3, -1)).bool()


def _encode(values: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """Already-scaled values -> FP8 E4M3 data or packed FP4 codes."""
    if fmt.per_element == 1:
        return values.clamp(-448, 448).to(fmt.storage_dtype)
    return pack_fp4(float_to_fp4_codes(values))


def _quantize(weight: torch.Tensor, hint: torch.Tensor | None, fmt: WeightFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Official quantization of `weight [N, K]` in `fmt`, keeping each block's original scale (`hint`, E8M0)
    wherever it still represents the block exactly, so unchanged weights reproduce the original bytes."""
    q_rule, s_rule = fmt.quantize(weight)
    if hint is None or hint.shape != s_rule.shape or hint.dtype != s_rule.dtype:
        return q_rule, s_rule
    if torch.equal(hint.view(torch.uint8), s_rule.view(torch.uint8)):
        return q_rule, s_rule
    w = weight.float()
    q_hint = _encode(w / _expand(hint, fmt.block, w.shape), fmt)
    back = fmt.dequantize(q_hint, hint)
    keep = _blocks_all(back == w, fmt.block, hint.shape)
    scale = torch.where(keep, hint.view(torch.uint8), s_rule.view(torch.uint8)).view(s_rule.dtype)
    return _encode(w / _expand(scale, fmt.block, w.shape), fmt), scale


def _fp8(weight, hint):
    return _quantize(weight, hint, FP8)


def _fp4(weight, hint):
    return _quantize(weight, hint, FP4)


def _official_tensors(
    name: str, tensor: torch.Tensor, hints: dict, expert_dtype: str, inter: int, stages: int = 0
) -> dict:
    """Official tensors for one plugin tensor (`hints`: original scales by plugin name, or None; `stages`: the
    DSpark stage count)."""
    expert = plugin_expert_param(name)
    if expert is not None:
        prefix, param = expert
        projs = ("w2",) if param == "down_proj" else ("w1", "w3")
        out = {}
        hint_all = hints.get(name)
        for e in range(tensor.shape[0]):
            rows = [tensor[e]] if param == "down_proj" else [tensor[e, :inter], tensor[e, inter:]]
            hint_rows = [None] * len(rows)
            if hint_all is not None:
                hint_rows = [hint_all[e]] if param == "down_proj" else [hint_all[e, :inter], hint_all[e, inter:]]
            for proj, w, h in zip(projs, rows, hint_rows):
                official = official_expert_name(prefix, e, proj)
                if w.dtype == torch.int8:
                    q, s = w, h
                elif w.dtype == torch.float8_e4m3fn:
                    q, s = w, h
                else:
                    q, s = _fp4(w, h if h is not None and h.shape[-1] == -(-w.shape[-1] // FP4_GROUP) else None)
                if expert_dtype == "fp8" and q.dtype == torch.int8:
                    q, s, _ = fp4_to_fp8_blocks(q, s, strict=True, name=official)
                out[official], out[scale_name(official)] = q, s
        return out
    if name.endswith("_scale_inv") or name.endswith(".official_scale"):
        return {}
    official = plugin_to_official(name, stages)
    if tensor.dtype == torch.float8_e4m3fn:
        return {official: tensor, scale_name(official): hints[name]}
    if is_fp8_official(official):
        q, s = _fp8(tensor, hints.get(name))
        return {official: q, scale_name(official): s}
    if tensor.dtype == torch.int64:
        return {official: tensor}
    dtype = torch.float32 if is_f32_official(official) else torch.bfloat16
    return {official: tensor.to(dtype)}


def convert_plugin_to_official(
    src: str | Path,
    dst: str | Path,
    expert_dtype: str = "fp4",
    shard_size: int = 5 * 10**9,
    dry_run: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> Report:
    """Export a plugin folder (bf16 / fp32 / keep) to the official FP8 + FP4 (or FP8) expert layout."""
    if expert_dtype not in ("fp4", "fp8"):
        raise ConversionError(f"--expert-dtype {expert_dtype!r} is not supported; use fp4 or fp8.")
    src, dst = Path(src), Path(dst)
    config, source = read_plugin_folder(src)
    # Everything the export needs is checked from the headers before anything is written.
    check_plugin_tensors(source, config)
    scales = None
    if (src / "official_scales.safetensors.index.json").exists() or (src / "official_scales.safetensors").exists():
        scales = SourceCheckpoint(src, "official_scales.safetensors.index.json")
    names = [n for n in source.ordered_names() if not n.endswith("_scale_inv")]
    stages = config.dspark_num_stages
    inter = config.moe_intermediate_size

    def hints_for(name):
        hint = {}
        if name + "_scale_inv" in source.tensors:
            hint[name] = source.load(name + "_scale_inv")
        elif scales is not None and name + ".official_scale" in scales.tensors:
            hint[name] = scales.load(name + ".official_scale")
        return hint

    sizes: dict[str, int] = {}
    for name in names:
        fake = torch.empty(source.tensors[name].shape, dtype=DTYPES[source.tensors[name].dtype][0], device="meta")
        for off, t in _planned(name, fake, expert_dtype, inter, stages).items():
            sizes[off] = t
    plan = ShardPlan.build(sizes.items(), shard_size)
    report = Report.of(source, plan, dst, dry_run)
    if dry_run:
        return report
    options = {"command": "to-official", "expert_dtype": expert_dtype, "shard_size": shard_size}
    out = OutputFolder(dst, plan.total_bytes, resume, progress, "export", fingerprint(source, **options))
    with out.writing():
        writer = out.writer(plan, "model", resume)
        for name in names:
            produced = _planned(name, None, expert_dtype, inter, stages, only_names=True)
            if not any(writer.wants(p) for p in produced):
                continue
            value = source.load(name)
            check_table(name, value, config, src / source.tensors[name].file)
            tensors = _official_tensors(name, value, hints_for(name), expert_dtype, inter, stages)
            for official, tensor in tensors.items():
                writer.add(official, tensor)
        writer.finish()
        config_json = json.dumps(official_config_from_plugin(config, expert_dtype), indent=2) + "\n"
        (out.tmp / "config.json").write_text(config_json)
        out.copy_from(src, ("generation_config.json", *COPIED_FILES))
        out.finish()
    return report


def _planned(
    name: str, fake: torch.Tensor | None, expert_dtype: str, inter: int, stages: int = 0, only_names: bool = False
):
    """Official names (and byte sizes) produced by plugin tensor `name`, from its shape/dtype only."""
    expert = plugin_expert_param(name)
    if expert is not None:
        prefix, param = expert
        projs = ("w2",) if param == "down_proj" else ("w1", "w3")
        if only_names:
            return [official_expert_name(prefix, e, p) for e in range(_num_experts_cache[name]) for p in projs]
        n_experts, rows, cols = fake.shape
        if fake.dtype == torch.int8:
            cols *= 2
        _num_experts_cache[name] = n_experts
        out = {}
        for e in range(n_experts):
            for proj in projs:
                r = rows if proj == "w2" else inter
                official = official_expert_name(prefix, e, proj)
                if expert_dtype == "fp8":
                    out[official] = r * cols
                    out[scale_name(official)] = -(-r // FP8_BLOCK[0]) * -(-cols // FP8_BLOCK[1])
                else:
                    out[official] = r * cols // 2
                    out[scale_name(official)] = r * -(-cols // FP4_GROUP)
        return out
    official = plugin_to_official(name, stages)
    if only_names:
        return [official]
    shape = fake.shape
    if is_fp8_official(official):
        return {official: shape[0] * shape[1], scale_name(official): -(-shape[0] // 128) * -(-shape[1] // 128)}
    if fake.dtype == torch.int64:
        return {official: fake.numel() * 8}
    return {official: fake.numel() * (4 if is_f32_official(official) else 2)}


_num_experts_cache: dict[str, int] = {}
