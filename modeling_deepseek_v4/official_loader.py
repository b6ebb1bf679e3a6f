"""`from_pretrained(<official folder or Hub id>)`: DeepSeek's own release layout loaded directly, no conversion step.

A folder whose `config.json` says `model_type: deepseek_v4` (the official `deepseek-ai/DeepSeek-V4-*` releases and
folders saved by transformers' native class, which writes the official tensor names back; docs/hf-integration.md §3)
is read through `official_layout.py`, the same plan and assembly the offline converter uses (docs/official-format.md
§6-§9):

- `dtype` unset or "auto": the quantized layout stays resident, as `dsv4-convert to-hf --dtype keep` writes it (FP8
  linears with E8M0 block scales, packed FP4 routed experts); `torch.bfloat16` / `torch.float32`: dequantized
  exactly (FP8 / FP4 values with power-of-two scales fit in bf16, official-format.md §9);
- shards are read one at a time, one tensor at a time, into a model built on the meta device, and every tensor goes
  straight to its place (`device_map`, including "cpu" and "disk" offload through accelerate), so host memory peaks
  at about the model plus the pieces of one output in flight;
- the MTP blocks (or the `-0731` DSpark drafter) are kept; `save_pretrained` afterwards writes a plugin folder that
  carries the source's tokenizer files, chat template and `encoding/` helpers, like the converter's.

Everything is validated from the config and the shard headers before any data is read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers.utils import logging

from .official_layout import copy_side_files, plan_official, stream_outputs

logger = logging.get_logger(__name__)

OFFICIAL_MODEL_TYPE = "deepseek_v4"
# `from_pretrained` options that only choose where the files come from.
HUB_OPTIONS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies", "subfolder")
# Accepted and without effect here (the load is always streamed; safetensors is the only official format).
_NO_EFFECT = (
    "low_cpu_mem_usage",
    "trust_remote_code",
    "use_safetensors",
    "_from_auto",
    "_from_pipeline",
    "_commit_hash",
    "code_revision",
)
_TORCH_DTYPES = {None: "keep", "auto": "keep", torch.bfloat16: "bf16", torch.float32: "fp32"}
_WEIGHT_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "*.model", "encoding/*", "LICENSE*"]


def official_config_dict(path: str | os.PathLike, **hub: object) -> dict | None:
    """The root `config.json` of a local folder or Hub repo if it declares `model_type: deepseek_v4`, else None.
    Network and missing-file errors are left to the regular `from_pretrained` path that follows."""
    from transformers.utils import cached_file

    try:
        resolved = cached_file(str(path), "config.json", _raise_exceptions_for_missing_entries=False, **hub)
    except (OSError, ValueError):
        return None
    if resolved is None:
        return None
    try:
        with open(resolved) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return raw if isinstance(raw, dict) and raw.get("model_type") == OFFICIAL_MODEL_TYPE else None


def _local_folder(path: str | os.PathLike, hub: dict) -> Path:
    """The folder holding the files: `path` itself, or a Hub snapshot with the weights and the tokenizer files."""
    subfolder = hub.pop("subfolder", None) or ""
    if os.path.isdir(path):
        return Path(path) / subfolder
    from huggingface_hub import snapshot_download

    patterns = [f"{subfolder}/{p}" if subfolder else p for p in _WEIGHT_PATTERNS]
    return Path(snapshot_download(str(path), allow_patterns=patterns, **hub)) / subfolder


def _dtype_mode(kwargs: dict) -> str:
    dtype = kwargs.pop("dtype", None)
    legacy = kwargs.pop("torch_dtype", None)
    dtype = dtype if dtype is not None else legacy
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype, dtype)
    if dtype not in _TORCH_DTYPES:
        raise ValueError(
            f"dtype={dtype!r} is not available for an official DeepSeek-V4 checkpoint: leave it unset (or 'auto') to "
            "keep the FP8 / FP4 weights quantized in memory, or pass torch.bfloat16 / torch.float32 for an exact "
            "dequantization."
        )
    return _TORCH_DTYPES[dtype]


def load_official(cls, path, official_config: dict, model_args: tuple, kwargs: dict):
    """Build `cls` (the causal LM or the base model) from an official-layout folder or Hub repo; see the module
    docstring. Returns the model, or `(model, loading_info)` with `output_loading_info=True`."""
    from transformers import GenerationConfig

    if model_args:
        raise TypeError(f"{cls.__name__}.from_pretrained takes no positional model arguments for an official folder.")
    kwargs = dict(kwargs)
    want_info = kwargs.pop("output_loading_info", False)
    config = kwargs.pop("config", None)
    if config is not None and getattr(config, "model_type", None) != OFFICIAL_MODEL_TYPE:
        raise ValueError(
            f"config= cannot be combined with a direct load of the official checkpoint {path}: the configuration is "
            "read from its config.json. Pass runtime settings (e.g. use_cache=False) as keyword arguments, or convert "
            "once with `dsv4-convert to-hf` and load the converted folder with your config."
        )
    mode = _dtype_mode(kwargs)
    hub = {key: kwargs.pop(key) for key in HUB_OPTIONS if key in kwargs}
    placement = {key: kwargs.pop(key, None) for key in ("device_map", "max_memory", "offload_folder")}
    offload_buffers = kwargs.pop("offload_buffers", False)
    for key in _NO_EFFECT:
        kwargs.pop(key, None)
    if not (kwargs.get("adapter_kwargs") or {}).get("_adapter_model_path"):
        kwargs.pop("adapter_kwargs", None)  # what the Auto classes pass when the folder holds no adapter
    if kwargs.get("attn_implementation") in (None, "eager"):
        kwargs.pop("attn_implementation", None)  # the model has one attention implementation of its own
    overrides = {key: kwargs.pop(key) for key in list(kwargs) if key in _RUNTIME_CONFIG_KEYS}
    if kwargs:
        raise TypeError(
            f"{cls.__name__}.from_pretrained({path!r}) loads DeepSeek's official layout directly and does not take "
            f"{sorted(kwargs)}. Convert once with `dsv4-convert to-hf {path} DST --dtype bf16` and pass these options "
            "when loading DST."
        )
    folder = _local_folder(path, hub)
    plan = plan_official(folder, mode, overrides)
    config = plan.config
    config._name_or_path = str(path)

    with torch.device("meta"):
        model = cls._from_config(config, dtype=torch.float32 if mode == "fp32" else torch.bfloat16)
    prefix = "" if hasattr(model, "lm_head") else f"{cls.base_model_prefix}."
    expected = set(model.state_dict())
    buffers = {name for name, _ in model.named_buffers()}
    device_map, offload_folder = _device_map(model, placement)
    from accelerate.utils import offload_weight, save_offload_index, set_module_tensor_to_device

    offload_index: dict = {}
    loaded: set[str] = set()
    for _, built in stream_outputs(plan, mode):
        for produced, tensor in built.items():
            if produced.endswith(".official_scale"):
                continue  # kept by the converter for a bit-exact export, not part of the model
            name = produced[len(prefix) :] if prefix and produced.startswith(prefix) else produced
            if name not in expected:
                continue  # lm_head (and nothing else) when loading the base model
            device = _device_of(name, device_map)
            if device == "disk" and not (name in buffers and not offload_buffers):
                offload_weight(tensor, name, offload_folder, index=offload_index)
            elif device == "disk":  # as transformers does: without offload_buffers, buffers stay in memory
                set_module_tensor_to_device(model, name, "cpu", value=tensor)
            else:
                set_module_tensor_to_device(model, name, device, value=tensor)
            loaded.add(name)
    missing = sorted(expected - loaded)
    if missing:  # cannot happen for a validated plan; never hand out a model with meta (random) weights
        raise RuntimeError(f"internal: the official load left {len(missing)} tensors unset: {missing[:5]}")
    if offload_index:
        save_offload_index(offload_index, offload_folder)
    _dispatch(model, device_map, offload_folder, offload_buffers)
    model.eval()
    model.name_or_path = str(path)
    model._official_source = folder
    if (folder / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    logger.info(f"Loaded the official DeepSeek-V4 checkpoint {path} directly ({mode}).")
    info = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    return (model, info) if want_info else model


# Settings that change how the model runs, not which weights it has; passed as keyword arguments they override
# the config like in transformers' `from_pretrained`.
_RUNTIME_CONFIG_KEYS = frozenset({"use_cache", "output_hidden_states", "return_dict", "index_topk"})


def _device_map(model, placement: dict) -> tuple[dict | None, str | None]:
    """The final `{module prefix: device}` map with transformers' semantics ("auto", "sequential", a device, a
    dict), or None for everything on the CPU; the offload folder when the map uses the disk."""
    from transformers.integrations.accelerate import _get_device_map, check_and_set_device_map

    device_map = placement["device_map"]
    if device_map is None:
        return None, None
    device_map = _get_device_map(model, check_and_set_device_map(device_map), placement["max_memory"], None)
    offload_folder = placement["offload_folder"]
    if "disk" in device_map.values():
        if offload_folder is None:
            raise ValueError(
                "The device_map puts part of the model on the disk but no offload_folder was given; pass "
                "offload_folder=<a folder with room for the offloaded weights>, or more max_memory."
            )
        os.makedirs(offload_folder, exist_ok=True)
    return device_map, offload_folder


def _device_of(name: str, device_map: dict | None):
    if device_map is None:
        return "cpu"
    parts = name.split(".")
    for end in range(len(parts), -1, -1):
        key = ".".join(parts[:end])
        if key in device_map:
            return device_map[key]
    raise ValueError(f"device_map does not place {name!r}; give a device for it or for one of its parent modules.")


def _dispatch(model, device_map: dict | None, offload_folder: str | None, offload_buffers: bool) -> None:
    """accelerate hooks for a model split across devices or offloaded (what transformers' loader does)."""
    if device_map is None:
        return
    model.hf_device_map = dict(device_map)
    if len(set(device_map.values())) > 1 or "disk" in device_map.values():
        from accelerate import dispatch_model

        dispatch_model(
            model,
            device_map=device_map,
            offload_dir=offload_folder,
            # The kept-quantized weights are buffers: with offload_buffers they are on the disk and reloaded per
            # forward like parameters; without, they stay resident (transformers' semantics).
            offload_buffers=offload_buffers,
            skip_keys=model._skip_keys_device_placement,
        )


def copy_official_side_files(source: Path | None, save_directory: str | os.PathLike) -> None:
    """After `save_pretrained` of a directly loaded model: the source's tokenizer files, chat template, `encoding/`
    helpers and license ride along (what the converter copies), without replacing files already written there."""
    if source is not None:
        copy_side_files(source, Path(save_directory), replace=False)
