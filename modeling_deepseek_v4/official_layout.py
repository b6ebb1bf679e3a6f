"""The official DeepSeek-V4 layout read as this package's model: config translation, tensor mapping and assembly.

Shared by the direct load (`official_loader.py`: `from_pretrained(<official folder>)`) and the offline converter
(`conversion/to_plugin.py`). Spec: docs/official-format.md §3-§4 (config spellings), §6-§7 (tensors, dtypes, native
names), §8 (FP8 / FP4 formats); DSpark releases (`-0731`): docs/dspark.md §2.2-§2.3.

- `read_official_config`: the root `config.json` (HF-style names), else `inference/config.json` (`ModelArgs`
  names), as one root-spelling dict; DeepSeek-V4.1 is refused (another architecture).
- `plan_official`: config + validated `Output` plan (every plugin tensor, the official pieces it is built from,
  shapes checked against the config from the headers alone, before any data is read).
- `build_output`: one plugin tensor from its loaded pieces, kept quantized (`keep`) or dequantized exactly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint_reader import DTYPES, CheckpointError, SourceCheckpoint
from .configuration_deepseek_v4 import DeepseekV4ExtConfig
from .official_names import OfficialName, UnknownTensorError, official_to_plugin
from .quant_formats import dequantize_weight
from .weight_formats import FORMATS, format_of, is_official_fp8_linear

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
    """Whether an official config describes a DSpark release (a set `dspark_*` key, or SGLang's `markov_rank`); a
    config saved from this package's model without a drafter carries the keys unset (None / 0)."""
    return any(key.startswith("dspark_") and raw[key] not in (None, 0, []) for key in raw) or "markov_rank" in raw


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
        raise CheckpointError(f"{folder}: no config.json (nor inference/config.json); is this a DeepSeek-V4 folder?")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: unreadable JSON ({exc}).") from None
    if raw.get("model_type") == "deepseek_v41" or "text_config" in raw or "vision_config" in raw:
        raise CheckpointError(
            f"{path}: DeepSeek-V4.1 (model_type deepseek_v41) is a different architecture (Engram memory, "
            "cross-layer KV sharing) and is not supported by this converter; use a DeepSeek-V4 checkpoint."
        )
    return raw if path == root else _from_model_args(raw)


def plugin_config_from_official(raw: dict, dtype: str, dspark_stages: int | None = None) -> DeepseekV4ExtConfig:
    """Build and validate the plugin config; raises `CheckpointError` naming the bad field. `dspark_stages`: the
    DSpark stage count found in the tensors (it overrides the config's)."""
    kwargs = {k: v for k, v in raw.items() if k not in _DROP}
    kwargs.pop("model_type", None)
    if dspark_stages is not None:
        kwargs["dspark_num_stages"] = dspark_stages
    quantization = kwargs.pop("quantization_config", None)
    try:
        config = DeepseekV4ExtConfig(**kwargs)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"config.json: {exc}") from None
    config.architectures = ["DeepseekV4ExtForCausalLM"]
    # `quantization_config` is dropped: transformers would hand it to its own FP8 quantizer. In keep mode the
    # converter records the layout it found in the tensors as `dsv4_quantization` instead.
    del quantization
    config.dtype = {"bf16": "bfloat16", "fp32": "float32", "keep": "bfloat16"}[dtype]
    return config


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


def copy_side_files(src: Path, dst: Path, names=COPIED_FILES, replace: bool = True) -> None:
    """Copy the side files and folders among `names` that exist in `src` (tokenizer, chat template, the official
    `encoding/` helpers, generation config, license) into `dst`, each through a temporary name renamed into place;
    `replace=False` keeps what `dst` already has. Links are followed only to files inside `src` (or, for a Hub cache
    snapshot, inside that repository's cache), so nothing from elsewhere on the machine is copied."""
    src, dst = Path(src), Path(dst)
    resolved = src.resolve()
    root = resolved.parent.parent if resolved.parent.name == "snapshots" else resolved
    for name in names:
        path, target = src / name, dst / name
        if not os.path.lexists(path) or (not replace and os.path.lexists(target)):
            continue
        for item in [path, *(path.rglob("*") if path.is_dir() else ())]:
            if item.is_symlink() and not item.resolve().is_relative_to(root):
                raise CheckpointError(
                    f"{item}: a link to {item.resolve()}, outside the source folder; copy the file into the "
                    "source folder or remove the link."
                )
        tmp = dst / f".{name}.tmp"
        if path.is_dir():
            # bytecode caches are not part of a release
            shutil.copytree(path, tmp, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
        elif path.exists():
            shutil.copy2(path, tmp)
        else:
            continue
        os.replace(tmp, target)


@dataclass
class Output:
    """One plugin tensor: the official pieces it is built from."""

    name: str
    shape: tuple[int, ...]
    pieces: list[str] = field(default_factory=list)
    experts: dict[tuple[int, str], str] = field(default_factory=dict)
    source_dtype: str = ""
    # Integer tables (`tid2eid`): entries must lie in [0, limit).
    limit: int | None = None


def expected_state(config) -> dict[str, torch.Size]:
    """Plugin state-dict names and shapes for `config` (built on the meta device: no memory)."""
    from .modeling_deepseek_v4 import DeepseekV4ExtForCausalLM  # the model module imports the loader, hence here

    with torch.device("meta"):
        model = DeepseekV4ExtForCausalLM(config)
    return {k: v.shape for k, v in model.state_dict().items()}


def mtp_stage_count(source: SourceCheckpoint) -> int:
    """Number of official `mtp.{i}.*` blocks (MTP blocks or DSpark stages), checked to be numbered 0..n-1."""
    found = sorted({int(name.split(".")[1]) for name in source.tensors if re.match(r"mtp\.\d+\.", name)})
    if found != list(range(len(found))):
        raise CheckpointError(f"{source.folder}: the mtp.* blocks are numbered {found}; expected 0..{len(found) - 1}.")
    return len(found)


def _target(name: str, expected: dict[str, torch.Size], stages: int) -> OfficialName:
    """Where a checkpoint tensor goes. Folders saved by transformers' native class mix spellings (`head.weight`,
    `model.layers.N.attn.*`, but `model.embed_tokens.weight`): plugin names pass through, a `model.` prefix is
    dropped before the official mapping."""
    if name in expected:
        return OfficialName(name)
    return official_to_plugin(name[len("model.") :] if name.startswith("model.") else name, stages)


def map_sources(source: SourceCheckpoint, expected: dict[str, torch.Size], config) -> dict[str, Output]:
    outputs: dict[str, Output] = {}
    n_mtp, stages = config.num_nextn_predict_layers, config.dspark_num_stages
    for name, info in source.tensors.items():
        if name.endswith(".scale") and name not in expected:
            weight = name[: -len(".scale")] + ".weight"
            if weight not in source.tensors:
                raise CheckpointError(f"{source.folder / info.file}: scale {name!r} has no weight {weight!r}.")
            continue
        if not stages and name.startswith("mtp.") and int(name.split(".")[1]) >= n_mtp:
            raise CheckpointError(
                f"{source.folder / info.file}: tensor {name!r} belongs to mtp block {name.split('.')[1]}, but "
                f"config.json declares {n_mtp} MTP block(s) and no dspark_* keys; a DSpark drafter's config keys are "
                "missing (official-format.md §11)."
            )
        try:
            target = _target(name, expected, stages)
        except UnknownTensorError:
            hint = " (a DSpark drafter tensor? config.json has no dspark_* keys)" if name.startswith("mtp.") else ""
            raise CheckpointError(
                f"{source.folder / info.file}: unknown tensor {name!r}: not part of the DeepSeek-V4 layout{hint}."
            ) from None
        if target.plugin not in expected:
            raise CheckpointError(
                f"{source.folder / info.file}: tensor {name!r} maps to {target.plugin!r}, which the config "
                "(config.json) does not have; the config and the weights disagree."
            )
        out = outputs.setdefault(target.plugin, Output(target.plugin, tuple(expected[target.plugin])))
        out.pieces.append(name)
        if scale_of(name) in source.tensors:
            out.pieces.append(scale_of(name))
        out.source_dtype = info.dtype
        if name.endswith("tid2eid"):
            out.limit = config.n_routed_experts
        if target.expert is not None:
            if target.expert >= out.shape[0]:
                raise CheckpointError(
                    f"{source.folder / info.file}: tensor {name!r} is routed expert {target.expert}, but config.json "
                    f"declares n_routed_experts={out.shape[0]} (experts 0..{out.shape[0] - 1}); the config and the "
                    "weights disagree."
                )
            out.experts[(target.expert, target.proj)] = name
    missing = sorted(set(expected) - set(outputs))
    if missing:
        raise CheckpointError(
            f"{source.folder}: the checkpoint lacks tensors for {missing[:5]}{' ...' if len(missing) > 5 else ''} "
            f"({len(missing)} in all); a shard is probably missing or the config does not match the weights."
        )
    for out in outputs.values():
        for piece in out.pieces:
            if piece.endswith(".scale") and piece not in expected:
                _check_scale_form(source, piece[: -len(".scale")] + ".weight", piece)
    return outputs


_QUANTIZED = {"F8_E4M3": "FP8", "I8": "packed FP4"}


def _check_scale_form(source: SourceCheckpoint, weight: str, scale: str | None) -> None:
    """A quantized weight has its scale with the dtype and block grid of its format (official-format.md §8); a
    weight stored unquantized has none (it would be ignored)."""
    info = source.tensors[weight]
    where = source.folder / info.file
    if info.dtype not in _QUANTIZED:
        raise CheckpointError(
            f"{where}: tensor {weight!r} is stored in {info.dtype} but has a scale {scale!r}: a scale belongs to an "
            "FP8 or packed FP4 weight, and would be ignored here; the checkpoint mixes formats (re-download it)."
        )
    scale_info = source.tensors[scale]
    fmt = format_of(DTYPES[info.dtype][0], tuple(info.shape), tuple(scale_info.shape))
    if scale_info.dtype not in _SCALE_DTYPES or fmt is None:
        grids = [
            list(f.scale_shape(f.dense_shape(tuple(info.shape))))
            for f in FORMATS.values()
            if f.storage_dtype == DTYPES[info.dtype][0]
        ]
        raise CheckpointError(
            f"{source.folder / scale_info.file}: scale {scale!r} is {scale_info.dtype} {list(scale_info.shape)}; "
            f"the {_QUANTIZED[info.dtype]} weight {weight!r} {list(info.shape)} needs F8_E8M0 or F32 "
            f"{' or '.join(map(str, grids))}."
        )


def check_quantized_pieces(source: SourceCheckpoint, outputs: dict[str, Output]) -> None:
    """Every FP8 / packed FP4 weight has its scale (`.scale` sibling); checked from the headers."""
    for out in outputs.values():
        for piece in out.pieces:
            info = source.tensors[piece]
            if info.dtype in _QUANTIZED and scale_of(piece) not in source.tensors:
                raise CheckpointError(
                    f"{source.folder / info.file}: {_QUANTIZED[info.dtype]} weight {piece!r} has no scale "
                    f"{scale_of(piece)!r}; without it the values cannot be decoded (a shard is incomplete: "
                    "re-download it)."
                )


_SCALE_DTYPES = {"F8_E8M0": "float8_e8m0fnu", "F32": "float32"}


def _piece_format(source: SourceCheckpoint, piece: str) -> str | None:
    """Format key of a stored piece ("fp8", "fp8_block32", "fp4"), or None for BF16 / F32 (dense)."""
    info = source.tensors[piece]
    scale = source.tensors.get(scale_of(piece))
    if info.dtype not in _QUANTIZED or scale is None:
        return None
    fmt = format_of(DTYPES[info.dtype][0], tuple(info.shape), tuple(scale.shape))
    return fmt.key if fmt is not None else None


def keep_layout(source: SourceCheckpoint, outputs: dict[str, Output]) -> dict:
    """The `dsv4_quantization` layout of a `--dtype keep` folder, read from the tensor dtypes and scale grids (not
    the config: official-format.md §3 says to trust dtypes), or `CheckpointError` if the checkpoint mixes formats.
    Which linears are FP8 in the official layout: `weight_formats.OFFICIAL_FP8_LINEARS`."""
    linears = [o for name, o in outputs.items() if name.endswith(".weight") and is_official_fp8_linear(name[:-7])]
    fp8 = {_piece_format(source, o.pieces[0]) for o in linears}
    experts = {_piece_format(source, p) for o in outputs.values() if o.experts for p in o.experts.values()}
    scales = {source.tensors[p].dtype for o in outputs.values() for p in o.pieces if p.endswith(".scale")}
    problems = []
    if len(fp8) > 1 or fp8 & {"fp4"}:
        problems.append(f"the FP8 linears come in {sorted(map(str, fp8))}")
    if len(experts) != 1:
        problems.append(f"the routed experts come in {sorted(map(str, experts))}")
    if len(scales) > 1 or not scales <= set(_SCALE_DTYPES):
        problems.append(f"the scales come in {sorted(scales)}")
    if problems:
        raise CheckpointError(
            f"{source.folder}: --dtype keep needs one storage format per kind of weight, but {'; '.join(problems)}. "
            "Convert with --dtype bf16 instead (exact)."
        )
    return {
        "weights": fp8.pop() if fp8 else None,
        "experts": experts.pop(),
        "scale_dtype": _SCALE_DTYPES[scales.pop()] if scales else "float8_e8m0fnu",
    }


def _dequantized_shape(source: SourceCheckpoint, name: str) -> tuple[int, ...]:
    info = source.tensors[name]
    if info.dtype == "I8":
        return (*info.shape[:-1], info.shape[-1] * 2)
    return info.shape


def check_shapes(source: SourceCheckpoint, outputs: dict[str, Output], config) -> None:
    inter = config.moe_intermediate_size
    for out in outputs.values():
        if out.experts:
            n_experts = out.shape[0]
            projs = ("w2",) if out.name.endswith("down_proj") else ("w1", "w3")
            for e in range(n_experts):
                for proj in projs:
                    name = out.experts.get((e, proj))
                    if name is None:
                        raise CheckpointError(f"{source.folder}: expert {e} {proj} of {out.name} is missing.")
                    want = (out.shape[1], out.shape[2]) if proj == "w2" else (inter, out.shape[2])
                    if _dequantized_shape(source, name) != want:
                        raise CheckpointError(
                            f"{source.folder / source.tensors[name].file}: tensor {name!r} has shape "
                            f"{_dequantized_shape(source, name)}, the config implies {want}."
                        )
            continue
        name = out.pieces[0]
        if _dequantized_shape(source, name) != out.shape:
            raise CheckpointError(
                f"{source.folder / source.tensors[name].file}: tensor {name!r} has shape "
                f"{_dequantized_shape(source, name)}, the config implies {out.shape} for {out.name}."
            )


def output_dtype(out: Output, dtype: str) -> torch.dtype:
    if out.source_dtype == "I64":
        return torch.int64
    if dtype == "fp32" or out.source_dtype == "F32":
        return torch.float32
    return torch.bfloat16


def dequantize_piece(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if weight.dtype in (torch.int8, torch.float8_e4m3fn):
        return dequantize_weight(weight, scale, dtype)  # the block shape is read from the scale grid
    return weight.to(dtype)


def scale_of(name: str) -> str:
    return name[: -len(".weight")] + ".scale" if name.endswith(".weight") else name + ".scale"


def build_output(out: Output, pieces: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """The output tensors (and kept scales) of one plugin parameter from its loaded official pieces."""
    keep = dtype == "keep"
    result: dict[str, torch.Tensor] = {}
    if out.experts:
        projs = ("w2",) if out.name.endswith("down_proj") else ("w1", "w3")
        weights, scales = [], []
        for e in range(out.shape[0]):
            names = [out.experts[(e, p)] for p in projs]
            scale_list = [pieces.get(scale_of(n)) for n in names]
            if keep:
                weights.append(torch.cat([pieces[n] for n in names], dim=0))
            else:
                weights.append(
                    torch.cat([dequantize_piece(pieces[n], s, OUT_DTYPES[dtype]) for n, s in zip(names, scale_list)])
                )
            if scale_list[0] is not None:
                scales.append(torch.cat(scale_list, dim=0))
        result[out.name] = torch.stack(weights)
        if scales:
            result[out.name + ("_scale_inv" if keep else ".official_scale")] = torch.stack(scales)
        return result
    name = out.pieces[0]
    weight, scale = pieces[name], pieces.get(scale_of(name))
    if keep and scale is not None:
        result[out.name] = weight
        result[out.name + "_scale_inv"] = scale
        return result
    result[out.name] = dequantize_piece(weight, scale, output_dtype(out, dtype))
    if scale is not None:
        result[out.name + ".official_scale"] = scale
    return result


def meta_piece(source: SourceCheckpoint, name: str) -> torch.Tensor:
    info = source.tensors[name]
    return torch.empty(info.shape, dtype=DTYPES[info.dtype][0], device="meta")


def dspark_stages(source: SourceCheckpoint, raw: dict) -> int | None:
    """The DSpark stage count of a checkpoint with `dspark_*` config keys, from its `mtp.*` tensors; else None."""
    stages = mtp_stage_count(source)
    declared = raw.get("num_nextn_predict_layers", 1)
    if not isinstance(declared, int) or isinstance(declared, bool) or declared < 0:
        raise CheckpointError(
            f"config.json: invalid `num_nextn_predict_layers`={declared!r}; expected an int >= 0 (a JSON number)."
        )
    if not is_dspark(raw):
        drafter = any(name.startswith("mtp.0.main_proj.") for name in source.tensors)
        if drafter or stages > declared:
            raise CheckpointError(
                f"{source.folder}: the mtp.* tensors ({stages} block(s){', main_proj' if drafter else ''}) are a "
                "DSpark drafter, but config.json has no dspark_* keys (dspark_block_size, dspark_noise_token_id, "
                "dspark_target_layer_ids, dspark_markov_rank); use the release's own config.json."
            )
        return None
    if stages == 0:
        raise CheckpointError(
            f"{source.folder}: config.json has dspark_* keys but the checkpoint has no mtp.* (DSpark drafter) tensors."
        )
    return stages


def is_native_saved(source: SourceCheckpoint) -> bool:
    """Whether the folder was written by transformers' native `deepseek_v4` (official names under `model.`)."""
    return "model.embed_tokens.weight" in source.tensors


@dataclass
class OfficialPlan:
    """A validated official checkpoint: its raw config, the shards, the plugin config and the output plan."""

    raw: dict
    source: SourceCheckpoint
    config: DeepseekV4ExtConfig
    outputs: dict[str, Output]


def plan_official(folder: str | Path, dtype: str, overrides: dict | None = None) -> OfficialPlan:
    """Read and validate an official folder for `dtype` ("bf16" | "fp32" | "keep") from its config (plus
    `overrides`, plugin config keys) and shard headers only; raises `CheckpointError` naming the file, the tensor
    and the fix."""
    if dtype not in OUT_DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported; use one of {sorted(OUT_DTYPES)}.")
    folder = Path(folder)
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise CheckpointError(f"{folder}: {what}; pass the folder of an official DeepSeek-V4 checkpoint.")
    raw = {**read_official_config(folder), **(overrides or {})}
    source = SourceCheckpoint(folder)
    if raw.get("num_nextn_predict_layers") and not is_dspark(raw) and is_native_saved(source):
        # transformers' native class drops the MTP block (official-format.md §7): its folders have none to load.
        if not any(re.match(r"(model\.)?mtp\.", name) for name in source.tensors):
            raw["num_nextn_predict_layers"] = 0
    config = plugin_config_from_official(raw, dtype, dspark_stages(source, raw))
    outputs = map_sources(source, expected_state(config), config)
    check_quantized_pieces(source, outputs)
    check_shapes(source, outputs, config)
    if dtype == "keep":
        config.dsv4_quantization = keep_layout(source, outputs)
    return OfficialPlan(raw, source, config, outputs)


def stream_outputs(plan: OfficialPlan, dtype: str, wanted: Callable[[str], bool] | None = None):
    """Yield `(plugin name, {produced name: tensor})` for every output `wanted` accepts, each as soon as all of its
    official pieces were read. Shards are read in order, one tensor at a time; a piece is freed once its output is
    built, so only pieces of outputs that straddle shards (a layer's experts, a weight and its scale) wait."""
    source, outputs = plan.source, plan.outputs
    needed_by: dict[str, list[str]] = {}
    remaining: dict[str, set[str]] = {}
    for name, out in outputs.items():
        if wanted is None or wanted(name):
            remaining[name] = set(out.pieces)
            for piece in out.pieces:
                needed_by.setdefault(piece, []).append(name)
    pending: dict[str, torch.Tensor] = {}
    for file in source.files:
        for piece in sorted(t.name for t in source.tensors.values() if t.file == file):
            for name in needed_by.get(piece, []):
                pending[piece] = source.load(piece) if piece not in pending else pending[piece]
                remaining[name].discard(piece)
                if not remaining[name]:
                    pieces = outputs[name].pieces
                    _check_values(source, outputs[name], pending)
                    yield name, build_output(outputs[name], {p: pending[p] for p in pieces}, dtype)
                    for p in pieces:
                        pending.pop(p, None)


def check_expert_ids(table: torch.Tensor, n_experts: int, where: Path, name: str) -> None:
    """A hash-routing table (`tid2eid`) maps tokens to experts that exist: entries in [0, n_experts)."""
    if table.numel():
        low, high = int(table.min()), int(table.max())
        if low < 0 or high >= n_experts:
            raise CheckpointError(
                f"{where}: tensor {name!r} holds expert ids in [{low}, {high}], outside [0, {n_experts}) "
                f"(n_routed_experts={n_experts}); the file is damaged or belongs to another config."
            )


def _check_values(source: SourceCheckpoint, out: Output, loaded: dict[str, torch.Tensor]) -> None:
    """Values the readers' NaN / Inf scan cannot judge: table entries in range, float32 block scales positive."""
    for piece in out.pieces:
        tensor, info = loaded[piece], source.tensors[piece]
        if out.limit is not None:
            check_expert_ids(tensor, out.limit, source.folder / info.file, piece)
        if piece.endswith(".scale") and tensor.dtype == torch.float32 and tensor.numel() and float(tensor.min()) <= 0:
            raise CheckpointError(
                f"{source.folder / info.file}: scale {piece!r} holds a value <= 0 ({float(tensor.min())}); block "
                "scales are positive powers of two: the file is damaged, re-download it."
            )
