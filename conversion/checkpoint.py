"""Writing sharded safetensors checkpoints safely (used by both conversion directions); reading is
`modeling_deepseek_v4.checkpoint_reader` (`SourceCheckpoint`, re-exported here).

- `ShardedWriter` writes output shards of a fixed plan into a temporary folder next to the destination, verifies
  each shard after writing, and renames the folder into place at the end (`finalize`). Shards that are already
  complete in the temporary folder are skipped on `--resume`.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modeling_deepseek_v4.checkpoint_reader import (
    DTYPES,
    TORCH_TO_ST,
    SourceCheckpoint,
    TensorInfo,
    read_header,
)
from modeling_deepseek_v4.checkpoint_reader import CheckpointError as ConversionError

__all__ = ["DTYPES", "ConversionError", "SourceCheckpoint", "TensorInfo", "read_header", "write_safetensors"]


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file streaming each tensor's bytes (no serialized copy of the whole shard in memory)."""
    header: dict[str, object] = {"__metadata__": metadata or {}}
    offset = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": TORCH_TO_ST[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for tensor in tensors.values():
            if tensor.numel():
                f.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))


@dataclass
class ShardPlan:
    """Which output tensors go into which output shard (deterministic, so `--resume` can match shards)."""

    shards: list[list[str]] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(cls, ordered: Iterable[tuple[str, int]], max_bytes: int) -> ShardPlan:
        plan, current, used = cls(), [], 0
        for name, nbytes in ordered:
            if current and used + nbytes > max_bytes:
                plan.shards.append(current)
                current, used = [], 0
            current.append(name)
            used += nbytes
            plan.sizes[name] = nbytes
        if current:
            plan.shards.append(current)
        return plan

    def file_name(self, i: int, prefix: str = "model") -> str:
        n = len(self.shards)
        return f"{prefix}.safetensors" if n == 1 else f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors"

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())


class ShardedWriter:
    """Writes the tensors of a `ShardPlan` as they arrive; each shard is flushed once all its tensors are in."""

    def __init__(self, tmp_dir: Path, plan: ShardPlan, prefix: str = "model", resume: bool = False, progress=None):
        self.tmp_dir, self.plan, self.prefix, self.progress = tmp_dir, plan, prefix, progress
        self.shard_of = {name: i for i, names in enumerate(plan.shards) for name in names}
        self.pending: dict[int, dict[str, torch.Tensor]] = {}
        self.done: set[int] = set()
        if resume:
            for i in range(len(plan.shards)):
                if self._verify(i):
                    self.done.add(i)
                    if progress is not None:
                        progress.update(sum(plan.sizes[n] for n in plan.shards[i]))

    def _verify(self, i: int) -> bool:
        path = self.tmp_dir / self.plan.file_name(i, self.prefix)
        if not path.exists():
            return False
        try:
            header = read_header(path)
        except ConversionError:
            return False
        names = {n for n in header if n != "__metadata__"}
        return names == set(self.plan.shards[i]) and all(
            DTYPES[header[n]["dtype"]][1] * _prod(header[n]["shape"]) == self.plan.sizes[n] for n in names
        )

    def wants(self, name: str) -> bool:
        """False when the tensor's shard is already complete (resume), so the caller can skip computing it."""
        return self.shard_of[name] not in self.done

    def add(self, name: str, tensor: torch.Tensor) -> None:
        i = self.shard_of.get(name)
        if i is None:
            raise ConversionError(f"internal: tensor {name!r} is not in the output plan.")
        if i in self.done:
            return
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes != self.plan.sizes[name]:
            raise ConversionError(f"tensor {name!r}: {nbytes} bytes produced, {self.plan.sizes[name]} planned.")
        shard = self.pending.setdefault(i, {})
        shard[name] = tensor.contiguous()
        if len(shard) == len(self.plan.shards[i]):
            path = self.tmp_dir / self.plan.file_name(i, self.prefix)
            partial = path.with_suffix(".partial")
            write_safetensors(partial, self.pending.pop(i), metadata={"format": "pt"})
            os.replace(partial, path)
            self.done.add(i)
            if self.progress is not None:
                self.progress.update(sum(self.plan.sizes[n] for n in self.plan.shards[i]))

    def finish(self) -> None:
        missing = [self.plan.file_name(i, self.prefix) for i in range(len(self.plan.shards)) if i not in self.done]
        if missing:
            raise ConversionError(f"internal: output shards {missing} were not completed.")
        weight_map = {name: self.plan.file_name(i, self.prefix) for name, i in self.shard_of.items()}
        index = {"metadata": {"total_size": self.plan.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.tmp_dir / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _prod(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class OutputFolder:
    """The destination of a conversion: refuses an existing destination, keeps an interrupted run's temporary
    folder only for `--resume`, checks free disk space, shows byte progress, and renames into place at the end."""

    def __init__(self, destination: Path, total_bytes: int, resume: bool, progress: bool, what: str = "conversion"):
        if destination.exists():
            raise ConversionError(f"{destination}: already exists; remove it or choose another destination.")
        self.destination = destination
        self.tmp = temp_dir_for(destination)
        if self.tmp.exists() and not resume:
            raise ConversionError(
                f"{self.tmp}: a previous {what} was interrupted; pass --resume to continue it or delete it."
            )
        check_disk_space(destination, total_bytes)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=what)

    def writer(self, plan: ShardPlan, prefix: str = "model", resume: bool = False) -> ShardedWriter:
        return ShardedWriter(self.tmp, plan, prefix, resume, self.bar)

    def copy_from(self, src: Path, names: Iterable[str]) -> None:
        """Copy the side files and folders among `names` that exist in `src` (tokenizer, chat template, the
        official `encoding/` helpers, generation config, license) into the temporary folder."""
        for name in names:
            if (src / name).is_dir():
                # dirs_exist_ok: a resumed run may have copied it already; bytecode caches are not part of a release.
                ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
                shutil.copytree(src / name, self.tmp / name, ignore=ignore, dirs_exist_ok=True)
            elif (src / name).exists():
                shutil.copy2(src / name, self.tmp / name)

    def discard(self) -> None:
        if self.bar is not None:
            self.bar.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()
        finalize(self.tmp, self.destination)


def temp_dir_for(destination: Path) -> Path:
    return destination.parent / f".{destination.name}.dsv4-partial"


def check_disk_space(destination: Path, needed: int) -> None:
    free = shutil.disk_usage(destination.parent).free
    if free < needed * 1.05:
        raise ConversionError(
            f"{destination.parent}: {free / 1e9:.2f} GB free, the output needs about {needed / 1e9:.2f} GB; "
            "free some space or choose another destination."
        )


def finalize(tmp_dir: Path, destination: Path) -> None:
    """Atomically move the finished temporary folder into place (the destination must not exist)."""
    if destination.exists():
        raise ConversionError(f"{destination}: already exists; remove it or choose another destination.")
    os.replace(tmp_dir, destination)
