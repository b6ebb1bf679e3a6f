"""Reading sharded safetensors checkpoints safely, without memory maps (used by the direct official load in
`official_loader.py` and by both conversion directions).

`SourceCheckpoint` validates a folder before any data is read: the index (or the shard list), every shard's header
(length, JSON, dtypes, byte ranges inside the file, i.e. not truncated), and that the index and the headers agree.
Errors name the file and the tensor and say what to do. Tensors are then read one at a time with plain reads, so a
loader's peak memory is what it keeps plus the tensors in flight (docs/performance.md §6, memory-bounded reference).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors dtype strings -> (torch dtype, bytes per element)
DTYPES = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "BF16": (torch.bfloat16, 2),
    "F16": (torch.float16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E8M0": (torch.float8_e8m0fnu, 1),
}
TORCH_TO_ST = {v[0]: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A bad input checkpoint or an impossible request; the message names the file / tensor and the fix
    (`conversion` re-exports it as `CheckpointError`)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0  # absolute byte offset of the data in the file

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype][1]
        for d in self.shape:
            n *= d
        return n


def _header_length(path: Path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def read_header(path: Path) -> dict:
    """Parse and check a safetensors header without reading tensor data; raises `CheckpointError`."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: file is truncated ({size} bytes); re-download this shard.")
        (length,) = struct.unpack("<Q", raw)
        if length <= 0 or 8 + length > size:
            raise CheckpointError(
                f"{path}: corrupt safetensors header (declares {length} header bytes, file has {size}); "
                "re-download this shard."
            )
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc}); re-download this shard.") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object); re-download this shard.")
    data_size = size - 8 - length
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(meta, dict) or meta.get("dtype") not in DTYPES or "data_offsets" not in meta:
            raise CheckpointError(f"{path}: tensor {name!r} has an unsupported or malformed header entry {meta}.")
        begin, end = meta["data_offsets"]
        expected = DTYPES[meta["dtype"]][1]
        for d in meta["shape"]:
            expected *= d
        if end - begin != expected or end > data_size:
            raise CheckpointError(
                f"{path}: tensor {name!r} lies outside the file or has a wrong byte size (file truncated or "
                "corrupt); re-download this shard."
            )
    return header


class SourceCheckpoint:
    """A validated folder of safetensors shards (`model.safetensors.index.json`, or the shards themselves)."""

    def __init__(self, folder: str | os.PathLike, index_name: str = "model.safetensors.index.json"):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: not a folder; pass the checkpoint directory.")
        index_path = self.folder / index_name
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index_path}: unreadable index ({exc}).") from None
            files = sorted(set(weight_map.values()))
        else:
            prefix = index_name.split(".safetensors")[0]
            files = sorted(p.name for p in self.folder.glob(f"{prefix}*.safetensors"))
            weight_map = None
            if not files:
                raise CheckpointError(f"{self.folder}: no *.safetensors files and no {index_name}.")
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            path = self.folder / file
            if not path.exists():
                missing_for = next(n for n, f in weight_map.items() if f == file)
                raise CheckpointError(
                    f"{path}: shard listed in {index_name} (e.g. for tensor {missing_for!r}) is missing; "
                    "download it and retry."
                )
            header = read_header(path)
            data_start = 8 + _header_length(path)
            for name, meta in header.items():
                if name != "__metadata__":
                    begin = data_start + meta["data_offsets"][0]
                    self.tensors[name] = TensorInfo(name, file, meta["dtype"], tuple(meta["shape"]), begin)
        if weight_map is not None:
            for name, file in weight_map.items():
                info = self.tensors.get(name)
                if info is None or info.file != file:
                    raise CheckpointError(
                        f"{index_path}: tensor {name!r} is mapped to {file} but that shard does not contain it."
                    )
        self.files = files
        # Names the index lists (what `from_pretrained` will load); all header tensors when there is no index.
        self.indexed = set(weight_map) if weight_map is not None else set(self.tensors)

    def load(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh memory with plain reads (no memory map: mapped pages would count in the
        process's resident memory on top of the copy, doubling the peak for large tensors)."""
        info = self.tensors[name]
        data = torch.empty(info.nbytes, dtype=torch.uint8)
        with open(self.folder / info.file, "rb") as f:
            f.seek(info.offset)
            if f.readinto(memoryview(data.numpy())) != info.nbytes:
                raise CheckpointError(f"{self.folder / info.file}: tensor {name!r} is truncated; re-download it.")
        return data.view(DTYPES[info.dtype][0]).reshape(info.shape)

    def close(self, file: str | None = None) -> None:
        """Kept for callers that release a shard when done with it (reads hold no open handles)."""

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def ordered_names(self) -> list[str]:
        """Tensor names shard by shard (in file order), sorted within a shard: the streaming order."""
        return [n for f in self.files for n in sorted(t.name for t in self.tensors.values() if t.file == f)]
