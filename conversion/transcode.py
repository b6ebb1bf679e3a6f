"""Official FP4 routed experts -> lossless FP8 (official `convert.py --expert-dtype fp8`, for Hopper, which has no
FP4 tensor cores). Official folder in, official folder out; every other tensor is copied unchanged.

Per 128x128 block the new scale is 2^(e_max - 6) and each FP4 value is re-encoded exactly when the block's
sub-scale exponents span at most 14 (official-format.md §9). Unlike `convert.py`, blocks that would round are never
silently rounded: the conversion stops and names the tensor and the blocks (`fp4_transcode.fp4_to_fp8_blocks`).
"""

from __future__ import annotations

import json
from pathlib import Path

from modeling_deepseek_v4.fp4_transcode import fp4_to_fp8_blocks
from modeling_deepseek_v4.official_layout import COPIED_FILES

from .checkpoint import (
    ConversionError,
    OutputFolder,
    ShardPlan,
    SourceCheckpoint,
    fingerprint,
)
from .to_plugin import Report


def _is_fp4_scale(source: SourceCheckpoint, name: str) -> bool:
    """True for the `.scale` of a packed FP4 weight (it is replaced by the FP8 block scale)."""
    weight = source.tensors.get(name[: -len(".scale")] + ".weight") if name.endswith(".scale") else None
    return weight is not None and weight.dtype == "I8"


def transcode_experts_to_fp8(
    src: str | Path,
    dst: str | Path,
    shard_size: int = 5 * 10**9,
    dry_run: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> Report:
    src, dst = Path(src), Path(dst)
    source = SourceCheckpoint(src)
    sizes: dict[str, int] = {}
    for name, info in source.tensors.items():
        if info.dtype == "I8":
            rows, cols = info.shape[0], info.shape[1] * 2
            sizes[name] = rows * cols
            sizes[name[: -len(".weight")] + ".scale"] = -(-rows // 128) * -(-cols // 128)
        elif not _is_fp4_scale(source, name):
            sizes[name] = info.nbytes
    if not any(info.dtype == "I8" for info in source.tensors.values()):
        raise ConversionError(f"{src}: no packed FP4 (I8) expert tensors found; nothing to transcode.")
    order = source.ordered_names()
    plan = ShardPlan.build(((n, sizes[n]) for n in order if n in sizes), shard_size)
    report = Report.of(source, plan, dst, dry_run)
    if dry_run:
        return report
    options = {"command": "fp4-to-fp8", "shard_size": shard_size}
    out = OutputFolder(dst, plan.total_bytes, resume, progress, "transcoding", fingerprint(source, **options))
    with out.writing():
        writer = out.writer(plan, "model", resume)
        for name in order:
            if name not in sizes or not writer.wants(name) or _is_fp4_scale(source, name):
                continue
            info = source.tensors[name]
            if info.dtype == "I8":
                scale = name[: -len(".weight")] + ".scale"
                try:
                    data, block_scale, _ = fp4_to_fp8_blocks(
                        source.load(name), source.load(scale), strict=True, name=name
                    )
                except ConversionError:
                    raise
                except ValueError as exc:  # a block that would round: named by fp4_to_fp8_blocks
                    raise ConversionError(f"{src}: {exc}") from None
                writer.add(name, data)
                writer.add(scale, block_scale)
            else:
                writer.add(name, source.load(name))
        writer.finish()
        config = json.loads((src / "config.json").read_text()) if (src / "config.json").exists() else {}
        config.pop("expert_dtype", None)
        (out.tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        out.copy_from(src, ("generation_config.json", *COPIED_FILES))
        out.finish()
    return report
