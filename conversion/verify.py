"""`verify`: check that a converted plugin folder is complete and sound (every tensor the config implies, with its
shape and dtype, nothing extra, every value finite, routing tables in range: `plugin_checks.py`) and, given the
official source, that a sample of tensors dequantizes identically."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import torch

from modeling_deepseek_v4.official_layout import build_output, expected_state, map_sources, read_official_config

from .checkpoint import ConversionError, SourceCheckpoint
from .plugin_checks import check_plugin_tensors, check_table, read_plugin_folder


def verify_folder(folder: str | Path, source: str | Path | None = None, samples: int = 8, seed: int = 0) -> dict:
    """Raise `ConversionError` naming the first problem; return a summary dict when the folder is sound."""
    folder = Path(folder)
    config, out = read_plugin_folder(folder)
    expected = check_plugin_tensors(out, config)
    keep = getattr(config, "dsv4_quantization", None) is not None
    for name in out.ordered_names():  # every value: NaN / Inf (in `load`) and table ranges
        check_table(name, out.load(name), config, folder / out.tensors[name].file)
    checked = []
    if source is not None:
        src = SourceCheckpoint(source)
        read_official_config(Path(source))
        # Official tensors map onto the dense state (a keep folder's scales come from the weights' `.scale`).
        dense = copy.deepcopy(config)
        dense.dsv4_quantization = None
        outputs = map_sources(src, expected_state(dense), config)
        names = sorted(outputs)
        for name in random.Random(seed).sample(names, min(samples, len(names))):
            o = outputs[name]
            stored = out.load(name)
            mode = (
                "keep" if keep else ("fp32" if stored.dtype == torch.float32 and o.source_dtype != "F32" else "bf16")
            )
            built = build_output(o, {p: src.load(p) for p in o.pieces}, mode)[name]
            if built.dtype != stored.dtype:
                built = built.to(stored.dtype)
            if not torch.equal(
                built.view(torch.uint8) if built.dtype in (torch.float8_e4m3fn,) else built,
                stored.view(torch.uint8) if stored.dtype in (torch.float8_e4m3fn,) else stored,
            ):
                raise ConversionError(f"{folder}: tensor {name!r} differs from its dequantized official source.")
            checked.append(name)
    return {"tensors": len(out.tensors), "expected": len(expected), "sampled_equal": checked}
