"""Official DeepSeek-V4 checkpoint (FP8 + FP4 experts) -> this plugin's Hugging Face folder.

Streams the source shard by shard (tensors are read one at a time with plain reads, never memory-mapped); an
output tensor is built as soon as all of its pieces were read (a weight and its `.scale`, or all experts of a
layer) and written into its planned output shard, so peak memory is about one output shard plus pieces that
straddle source shards. Everything is validated from the headers before anything is written. DSpark releases
(`-0731`; dspark.md §2.3) convert too: their `mtp.{s}.*` drafter goes to `model.dspark.*`, with the stage count taken
from the tensors (their `num_nextn_predict_layers: 1` is stale). Output dtypes:
`bf16` (exact: FP8/FP4 with power-of-two scales need <= 4 significant bits, official-format.md §9 corollary),
`fp32`, or `keep` (FP8 / packed FP4 data with `*_scale_inv` E8M0 scales, for the quantized modules). In `bf16` /
`fp32` mode the official scales are kept in `official_scales*.safetensors` so that exporting an unchanged model
back is bit-identical. The folder is as self-contained as a `save_pretrained` one (custom code, complete `auto_map`,
`requirements.txt`: `custom_code.py`) and carries the source's tokenizer files, chat template and `encoding/`
helpers; everything goes through the temporary folder that is renamed into place at the end.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modeling_deepseek_v4 import DeepseekV4ExtForCausalLM, __version__
from modeling_deepseek_v4.quant_formats import dequantize_fp4, dequantize_fp8_blocks

from .checkpoint import (
    ConversionError,
    OutputFolder,
    ShardPlan,
    SourceCheckpoint,
)
from .custom_code import write_custom_code
from .names import UnknownTensorError, official_to_plugin
from .official_config import is_dspark, plugin_config_from_official, read_official_config

# Side files (and the official `encoding/` folder of Python chat-encoding helpers) copied when the source has them.
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "encoding",
    "LICENSE",
)
OUT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "keep": torch.bfloat16}


@dataclass
class Output:
    """One plugin tensor: the official pieces it is built from."""

    name: str
    shape: tuple[int, ...]
    pieces: list[str] = field(default_factory=list)
    experts: dict[tuple[int, str], str] = field(default_factory=dict)
    source_dtype: str = ""


@dataclass
class Report:
    tensors_in: int
    bytes_in: int
    tensors_out: int
    bytes_out: int
    shards_out: int
    destination: str
    dry_run: bool

    @classmethod
    def of(cls, source: SourceCheckpoint, plan: ShardPlan, dst: Path, dry_run: bool) -> Report:
        """Report for writing `plan` (the model shards) from `source` to `dst`."""
        sizes = (len(plan.sizes), plan.total_bytes, len(plan.shards))
        return cls(len(source.tensors), source.total_bytes, *sizes, str(dst), dry_run)

    def __str__(self) -> str:
        verb = "would write" if self.dry_run else "wrote"
        return (
            f"{self.tensors_in} official tensors ({self.bytes_in / 1e9:.3f} GB) -> {verb} {self.tensors_out} "
            f"tensors ({self.bytes_out / 1e9:.3f} GB) in {self.shards_out} shard(s) to {self.destination}"
        )


def _expected_state(config) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = DeepseekV4ExtForCausalLM(config)
    return {k: v.shape for k, v in model.state_dict().items()}


def mtp_stage_count(source: SourceCheckpoint) -> int:
    """Number of official `mtp.{i}.*` blocks (MTP blocks or DSpark stages), checked to be numbered 0..n-1."""
    found = sorted({int(name.split(".")[1]) for name in source.tensors if re.match(r"mtp\.\d+\.", name)})
    if found != list(range(len(found))):
        raise ConversionError(f"{source.folder}: the mtp.* blocks are numbered {found}; expected 0..{len(found) - 1}.")
    return len(found)


def _map_sources(source: SourceCheckpoint, expected: dict[str, torch.Size], config) -> dict[str, Output]:
    outputs: dict[str, Output] = {}
    n_mtp, stages = config.num_nextn_predict_layers, config.dspark_num_stages
    for name, info in source.tensors.items():
        if name.endswith(".scale"):
            weight = name[: -len(".scale")] + ".weight"
            if weight not in source.tensors:
                raise ConversionError(f"{source.folder / info.file}: scale {name!r} has no weight {weight!r}.")
            continue
        if not stages and name.startswith("mtp.") and int(name.split(".")[1]) >= n_mtp:
            raise ConversionError(
                f"{source.folder / info.file}: tensor {name!r} belongs to mtp block {name.split('.')[1]}, but "
                f"config.json declares {n_mtp} MTP block(s) and no dspark_* keys; a DSpark drafter's config keys are "
                "missing (official-format.md §11)."
            )
        try:
            target = official_to_plugin(name, stages)
        except UnknownTensorError:
            hint = " (a DSpark drafter tensor? config.json has no dspark_* keys)" if name.startswith("mtp.") else ""
            raise ConversionError(
                f"{source.folder / info.file}: unknown tensor {name!r}: not part of the DeepSeek-V4 layout{hint}."
            ) from None
        if target.plugin not in expected:
            raise ConversionError(
                f"{source.folder / info.file}: tensor {name!r} maps to {target.plugin!r}, which the config "
                "(config.json) does not have; the config and the weights disagree."
            )
        out = outputs.setdefault(target.plugin, Output(target.plugin, tuple(expected[target.plugin])))
        out.pieces.append(name)
        if _scale_of(name) in source.tensors:
            out.pieces.append(_scale_of(name))
        out.source_dtype = info.dtype
        if target.expert is not None:
            out.experts[(target.expert, target.proj)] = name
    missing = sorted(set(expected) - set(outputs))
    if missing:
        raise ConversionError(
            f"{source.folder}: the checkpoint lacks tensors for {missing[:5]}{' ...' if len(missing) > 5 else ''} "
            f"({len(missing)} in all); a shard is probably missing or the config does not match the weights."
        )
    return outputs


# Plugin names of the linears the quantized model keeps in FP8 (`quantized_modules.FP8_MODULES`).
_FP8_TARGET = re.compile(
    r"\.(self_attn\.(q_a|q_b|kv|o_a|o_b)_proj|indexer\.q_b_proj|shared_experts\.(gate|up|down)_proj|[eh]_proj|main_proj)"
    r"\.weight$"
)
_EXPERT_FORMATS = {"I8": "fp4", "F8_E4M3": "fp8", "BF16": None, "F32": None}
_SCALE_DTYPES = {"F8_E8M0": "float8_e8m0fnu", "F32": "float32"}


def _keep_layout(source: SourceCheckpoint, outputs: dict[str, Output]) -> dict:
    """The `dsv4_quantization` layout of a `--dtype keep` folder, read from the tensor dtypes (not the config:
    official-format.md §3 says to trust dtypes), or `ConversionError` if the checkpoint mixes formats."""
    fp8 = {o.source_dtype for name, o in outputs.items() if _FP8_TARGET.search(name)}
    experts = {o.source_dtype for o in outputs.values() if o.experts}
    scales = {source.tensors[p].dtype for o in outputs.values() for p in o.pieces if p.endswith(".scale")}
    problems = []
    if fp8 - {"F8_E4M3"} and fp8 != {"BF16"}:
        problems.append(f"the FP8 linears come in {sorted(fp8)}")
    if len(experts) != 1 or not experts <= set(_EXPERT_FORMATS):
        problems.append(f"the routed experts come in {sorted(experts)}")
    if len(scales) > 1 or not scales <= set(_SCALE_DTYPES):
        problems.append(f"the scales come in {sorted(scales)}")
    if problems:
        raise ConversionError(
            f"{source.folder}: --dtype keep needs one storage format per kind of weight, but {'; '.join(problems)}. "
            "Convert with --dtype bf16 instead (exact)."
        )
    return {
        "weights": "fp8" if fp8 == {"F8_E4M3"} else None,
        "experts": _EXPERT_FORMATS[experts.pop()],
        "scale_dtype": _SCALE_DTYPES[scales.pop()] if scales else "float8_e8m0fnu",
    }


def _dequantized_shape(source: SourceCheckpoint, name: str) -> tuple[int, ...]:
    info = source.tensors[name]
    if info.dtype == "I8":
        return (*info.shape[:-1], info.shape[-1] * 2)
    return info.shape


def _check_shapes(source: SourceCheckpoint, outputs: dict[str, Output], config) -> None:
    inter = config.moe_intermediate_size
    for out in outputs.values():
        if out.experts:
            n_experts = out.shape[0]
            projs = ("w2",) if out.name.endswith("down_proj") else ("w1", "w3")
            for e in range(n_experts):
                for proj in projs:
                    name = out.experts.get((e, proj))
                    if name is None:
                        raise ConversionError(f"{source.folder}: expert {e} {proj} of {out.name} is missing.")
                    want = (out.shape[1], out.shape[2]) if proj == "w2" else (inter, out.shape[2])
                    if _dequantized_shape(source, name) != want:
                        raise ConversionError(
                            f"{source.folder / source.tensors[name].file}: tensor {name!r} has shape "
                            f"{_dequantized_shape(source, name)}, the config implies {want}."
                        )
            continue
        name = out.pieces[0]
        if _dequantized_shape(source, name) != out.shape:
            raise ConversionError(
                f"{source.folder / source.tensors[name].file}: tensor {name!r} has shape "
                f"{_dequantized_shape(source, name)}, the config implies {out.shape} for {out.name}."
            )


def _out_dtype(out: Output, dtype: str) -> torch.dtype:
    if out.source_dtype == "I64":
        return torch.int64
    if dtype == "fp32" or out.source_dtype == "F32":
        return torch.float32
    return torch.bfloat16


def _dequantize(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if weight.dtype == torch.int8:
        return dequantize_fp4(weight, scale, dtype)
    if weight.dtype == torch.float8_e4m3fn:
        return dequantize_fp8_blocks(weight, scale, dtype=dtype)
    return weight.to(dtype)


def _scale_of(name: str) -> str:
    return name[: -len(".weight")] + ".scale" if name.endswith(".weight") else name + ".scale"


def _build(out: Output, pieces: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """The output tensors (and kept scales) of one plugin parameter from its loaded official pieces."""
    keep = dtype == "keep"
    result: dict[str, torch.Tensor] = {}
    if out.experts:
        projs = ("w2",) if out.name.endswith("down_proj") else ("w1", "w3")
        weights, scales = [], []
        for e in range(out.shape[0]):
            names = [out.experts[(e, p)] for p in projs]
            scale_list = [pieces.get(_scale_of(n)) for n in names]
            if keep:
                weights.append(torch.cat([pieces[n] for n in names], dim=0))
            else:
                weights.append(
                    torch.cat([_dequantize(pieces[n], s, OUT_DTYPES[dtype]) for n, s in zip(names, scale_list)])
                )
            if scale_list[0] is not None:
                scales.append(torch.cat(scale_list, dim=0))
        result[out.name] = torch.stack(weights)
        if scales:
            result[out.name + ("_scale_inv" if keep else ".official_scale")] = torch.stack(scales)
        return result
    name = out.pieces[0]
    weight, scale = pieces[name], pieces.get(_scale_of(name))
    if keep and scale is not None:
        result[out.name] = weight
        result[out.name + "_scale_inv"] = scale
        return result
    result[out.name] = _dequantize(weight, scale, _out_dtype(out, dtype))
    if scale is not None:
        result[out.name + ".official_scale"] = scale
    return result


def _plan_entries(source: SourceCheckpoint, outputs: dict[str, Output], dtype: str):
    """(completion order of outputs, byte sizes of every produced tensor), computed from headers only."""
    last_piece = {}
    order = {name: i for i, name in enumerate(source.ordered_names())}
    for out in outputs.values():
        last_piece[out.name] = max(order[p] for p in out.pieces)
    completion = sorted(outputs, key=lambda n: (last_piece[n], n))
    sizes: dict[str, int] = {}
    for name in completion:
        out = outputs[name]
        fake = {p: _meta(source, p) for p in out.pieces}
        for produced, tensor in _build(out, fake, dtype).items():
            sizes[produced] = tensor.numel() * tensor.element_size()
    return completion, sizes


def _meta(source: SourceCheckpoint, name: str) -> torch.Tensor:
    from .checkpoint import DTYPES

    info = source.tensors[name]
    return torch.empty(info.shape, dtype=DTYPES[info.dtype][0], device="meta")


def dspark_stages(source: SourceCheckpoint, raw: dict) -> int | None:
    """The DSpark stage count of a checkpoint with `dspark_*` config keys, from its `mtp.*` tensors; else None."""
    stages = mtp_stage_count(source)
    if not is_dspark(raw):
        drafter = any(name.startswith("mtp.0.main_proj.") for name in source.tensors)
        if drafter or stages > raw.get("num_nextn_predict_layers", 1):
            raise ConversionError(
                f"{source.folder}: the mtp.* tensors ({stages} block(s){', main_proj' if drafter else ''}) are a "
                "DSpark drafter, but config.json has no dspark_* keys (dspark_block_size, dspark_noise_token_id, "
                "dspark_target_layer_ids, dspark_markov_rank); use the release's own config.json."
            )
        return None
    if stages == 0:
        raise ConversionError(
            f"{source.folder}: config.json has dspark_* keys but the checkpoint has no mtp.* (DSpark drafter) tensors."
        )
    return stages


def convert_official_to_plugin(
    src: str | Path,
    dst: str | Path,
    dtype: str = "bf16",
    shard_size: int = 5 * 10**9,
    dry_run: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> Report:
    """Convert an official DeepSeek-V4 folder into a plugin folder loadable by `AutoModelForCausalLM`."""
    if dtype not in OUT_DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not supported; use one of {sorted(OUT_DTYPES)}.")
    src, dst = Path(src), Path(dst)
    raw = read_official_config(src)
    source = SourceCheckpoint(src)
    config = plugin_config_from_official(raw, dtype, dspark_stages(source, raw))
    outputs = _map_sources(source, _expected_state(config), config)
    _check_shapes(source, outputs, config)
    if dtype == "keep":
        config.dsv4_quantization = _keep_layout(source, outputs)
    completion, sizes = _plan_entries(source, outputs, dtype)
    is_scale = [n for n in sizes if n.endswith(".official_scale")]
    model_plan = ShardPlan.build(((n, s) for n, s in sizes.items() if n not in is_scale), shard_size)
    scale_plan = ShardPlan.build(((n, sizes[n]) for n in is_scale), shard_size)
    report = Report.of(source, model_plan, dst, dry_run)
    if dry_run:
        return report
    out = OutputFolder(dst, model_plan.total_bytes + scale_plan.total_bytes, resume, progress)
    writers = [out.writer(model_plan, "model", resume)]
    if scale_plan.shards:
        writers.append(out.writer(scale_plan, "official_scales", resume))
    route = {name: w for w in writers for name in w.plan.sizes}
    pending: dict[str, torch.Tensor] = {}
    remaining = {name: set(outputs[name].pieces) for name in completion}
    needed_by: dict[str, list[str]] = {}
    for name in completion:
        if any(
            route[p].wants(p)
            for p in _build(outputs[name], {p: _meta(source, p) for p in outputs[name].pieces}, dtype)
        ):
            for piece in outputs[name].pieces:
                needed_by.setdefault(piece, []).append(name)
    for file in source.files:
        for piece in sorted(t.name for t in source.tensors.values() if t.file == file):
            for name in needed_by.get(piece, []):
                pending[piece] = source.load(piece)
                remaining[name].discard(piece)
                if not remaining[name]:
                    built = _build(outputs[name], {p: pending[p] for p in outputs[name].pieces}, dtype)
                    for produced, tensor in built.items():
                        route[produced].add(produced, tensor)
                    for p in outputs[name].pieces:
                        pending.pop(p, None)
        source.close(file)
    for writer in writers:
        writer.finish()
    _write_side_files(src, out, config, raw, dtype)
    out.finish()
    return report


def _write_side_files(src: Path, out: OutputFolder, config, raw: dict, dtype: str) -> None:
    """Config with the custom code, generation config, copied tokenizer / template / encoding files, provenance."""
    tmp = out.tmp
    write_custom_code(tmp, config)
    generation = src / "generation_config.json"
    if generation.exists():
        shutil.copy2(generation, tmp / "generation_config.json")
    else:
        gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    out.copy_from(src, COPIED_FILES)
    info = {
        "converter": f"modeling_deepseek_v4 {__version__}",
        "direction": "official->plugin",
        "source": str(src.resolve()),
        "source_revision": _revision(src),
        "dtype": dtype,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "official_expert_dtype": raw.get("expert_dtype"),
    }
    (tmp / "dsv4_conversion.json").write_text(json.dumps(info, indent=2) + "\n")


def _revision(src: Path) -> str | None:
    """The Hub snapshot hash when the source is a `huggingface_hub` cache snapshot folder, else None."""
    parts = src.resolve().parts
    return parts[-1] if len(parts) >= 2 and parts[-2] == "snapshots" else None
