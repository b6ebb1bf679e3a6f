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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from modeling_deepseek_v4 import __version__
from modeling_deepseek_v4.official_layout import (
    COPIED_FILES,
    Output,
    build_output,
    meta_piece,
    plan_official,
    stream_outputs,
)

from .checkpoint import OutputFolder, ShardPlan, SourceCheckpoint, fingerprint
from .custom_code import write_custom_code


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
        fake = {p: meta_piece(source, p) for p in out.pieces}
        for produced, tensor in build_output(out, fake, dtype).items():
            sizes[produced] = tensor.numel() * tensor.element_size()
    return completion, sizes


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
    src, dst = Path(src), Path(dst)
    plan = plan_official(src, dtype)
    source, config, outputs = plan.source, plan.config, plan.outputs
    completion, sizes = _plan_entries(source, outputs, dtype)
    is_scale = [n for n in sizes if n.endswith(".official_scale")]
    model_plan = ShardPlan.build(((n, s) for n, s in sizes.items() if n not in is_scale), shard_size)
    scale_plan = ShardPlan.build(((n, sizes[n]) for n in is_scale), shard_size)
    report = Report.of(source, model_plan, dst, dry_run)
    if dry_run:
        return report
    options = {"command": "to-hf", "dtype": dtype, "shard_size": shard_size}
    total = model_plan.total_bytes + scale_plan.total_bytes
    out = OutputFolder(dst, total, resume, progress, fingerprint=fingerprint(source, **options))
    with out.writing():
        writers = [out.writer(model_plan, "model", resume)]
        if scale_plan.shards:
            writers.append(out.writer(scale_plan, "official_scales", resume))
        route = {name: w for w in writers for name in w.plan.sizes}

        def wanted(name: str) -> bool:
            # On --resume, outputs whose shards are complete are neither read nor rebuilt.
            fake = {p: meta_piece(source, p) for p in outputs[name].pieces}
            return any(route[p].wants(p) for p in build_output(outputs[name], fake, dtype))

        for _, built in stream_outputs(plan, dtype, wanted):
            for produced, tensor in built.items():
                route[produced].add(produced, tensor)
        for writer in writers:
            writer.finish()
        _write_side_files(src, out, config, plan.raw, dtype)
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
        # A Hub repo id or the folder's name: an absolute path would publish the user's directories with the model.
        "source": _source_name(src),
        "source_revision": _revision(src),
        "dtype": dtype,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "official_expert_dtype": raw.get("expert_dtype"),
    }
    (tmp / "dsv4_conversion.json").write_text(json.dumps(info, indent=2) + "\n")


def _source_name(src: Path) -> str:
    """`org/name` for a Hub cache snapshot (`.../models--org--name/snapshots/<rev>`), else the folder's name."""
    parts = src.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--") :].replace("--", "/")
    return parts[-1]


def _revision(src: Path) -> str | None:
    """The Hub snapshot hash when the source is a `huggingface_hub` cache snapshot folder, else None."""
    parts = src.resolve().parts
    return parts[-1] if len(parts) >= 2 and parts[-2] == "snapshots" else None
