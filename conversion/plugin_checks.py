"""Checks of a plugin folder (converted, saved or fine-tuned) before it is exported or declared sound: shared by
`to-official` (nothing is written for a folder that fails them) and `verify`.

From the headers: every tensor the config implies is present with its shape, stored with a dtype its module can
hold (the quantized buffers of a keep folder exactly as `quantized_modules.py` declares them, floating tensors as
some floating dtype), and nothing unexplained is there. From the values (as tensors are read): no NaN / Inf
(`SourceCheckpoint.load`), hash-routing tables inside [0, n_routed_experts).
"""

from __future__ import annotations

from pathlib import Path

import torch

from modeling_deepseek_v4 import DeepseekV4ExtConfig, DeepseekV4ExtForCausalLM
from modeling_deepseek_v4.official_layout import check_expert_ids

from .checkpoint import DTYPES, ConversionError, SourceCheckpoint


def read_plugin_folder(folder: str | Path) -> tuple[DeepseekV4ExtConfig, SourceCheckpoint]:
    """The config and the shards of a local plugin folder (never looked up on the Hub)."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise ConversionError(f"{folder}: {what}; pass the folder of a converted or saved model.")
    if not (folder / "config.json").is_file():
        raise ConversionError(f"{folder}: no config.json; pass the folder of a converted or saved model.")
    try:
        config = DeepseekV4ExtConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ConversionError(f"{folder / 'config.json'}: unusable config ({exc}).") from None
    return config, SourceCheckpoint(folder)


def check_plugin_tensors(source: SourceCheckpoint, config: DeepseekV4ExtConfig) -> dict[str, torch.Size]:
    """Names, shapes and dtypes of `source` against what `config` implies; returns the expected state's shapes."""
    with torch.device("meta"):
        state = DeepseekV4ExtForCausalLM(config).state_dict()
    expected = {name: t.shape for name, t in state.items()}
    dtypes = {name: t.dtype for name, t in state.items()}
    missing = [name for name in expected if name not in source.tensors or name not in source.indexed]
    if missing:
        more = f" ... ({len(missing)} in all)" if len(missing) > 5 else ""
        raise ConversionError(
            f"{source.folder}: tensors {missing[:5]}{more} are missing from the index / shards; the folder is "
            "incomplete (an interrupted save or copy?)."
        )
    for name, shape in expected.items():
        info = source.tensors[name]
        where = source.folder / info.file
        if tuple(info.shape) != tuple(shape):
            raise ConversionError(
                f"{where}: tensor {name!r} has shape {list(info.shape)}, the config implies {list(shape)}."
            )
        stored, wanted = DTYPES[info.dtype][0], dtypes[name]
        if wanted.is_floating_point and wanted.itemsize > 1:
            ok = stored.is_floating_point and stored.itemsize > 1
        else:  # FP8 data, E8M0 scales, packed FP4 codes, integer tables: exactly as the module declares them
            ok = stored == wanted
        if not ok:
            keep = " (FP8 / FP4 data belongs in a --dtype keep folder)" if stored.itemsize == 1 else ""
            raise ConversionError(
                f"{where}: tensor {name!r} is stored as {info.dtype}, the model holds {wanted}{keep}."
            )
    extra = [n for n in source.tensors if n not in expected]
    if extra:
        raise ConversionError(
            f"{source.folder / source.tensors[extra[0]].file}: tensors {extra[:5]} are not parameters of this "
            "config (an adapter not merged, or the config does not match the weights)."
        )
    return expected


def check_table(name: str, tensor: torch.Tensor, config: DeepseekV4ExtConfig, where: Path) -> None:
    """Hash-routing tables map tokens to experts that exist."""
    if name.endswith("tid2eid"):
        check_expert_ids(tensor, config.n_routed_experts, where, name)
