"""Reading sharded safetensors checkpoints safely, without memory maps (used by the direct official load in
`official_loader.py` and by both conversion directions).

`SourceCheckpoint` validates a folder before any data is read: the index (or the shard list), every shard's header
(every rule of the `safetensors` library: form, dtypes, byte ranges tiling the file; `read_header`), and that the
index and the headers agree. Each tensor read is checked for NaN / infinite values (FP8 and E8M0 NaN codes too).
Errors name the file and the tensor and say what to do. Tensors are read one at a time with plain reads, so a
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
    (`conversion` re-exports it as `ConversionError`)."""


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


# The safetensors library refuses headers above 100 MB (its `MAX_HEADER_SIZE`); so does this reader.
MAX_HEADER_BYTES = 100_000_000
_REDOWNLOAD = "re-download this shard"


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(path: Path) -> dict:
    """Parse and check a safetensors header without reading tensor data; raises `CheckpointError`.

    Every rule of the `safetensors` library applies (and the library is asked too, so nothing it refuses passes):
    the header is a JSON object of `{dtype, shape, data_offsets}` entries (plus a `__metadata__` of strings), dtypes
    are known, shapes are lists of non-negative integers, each tensor's byte range matches shape x dtype, and the
    ranges tile the data area exactly: no gap, no overlap, nothing past the end, nothing after the last tensor."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: file is truncated ({size} bytes); {_REDOWNLOAD}.")
        (length,) = struct.unpack("<Q", raw)
        if length <= 0 or 8 + length > size or length > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{path}: corrupt safetensors header (declares {length} header bytes, file has {size}); {_REDOWNLOAD}."
            )
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc}); {_REDOWNLOAD}.") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object); {_REDOWNLOAD}.")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header (`__metadata__` must map strings to strings).")
    ranges = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        ranges.append((*_check_entry(path, name, meta), name))
    data_size, position = size - 8 - length, 0
    for begin, end, name in sorted(ranges):
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else f"leaves a gap at byte {position}"
            raise CheckpointError(f"{path}: tensor {name!r} {what} (data_offsets [{begin}, {end}]); {_REDOWNLOAD}.")
        position = end
    if position != data_size:
        problem = "lie outside the file (truncated)" if position > data_size else "do not cover the whole file"
        raise CheckpointError(
            f"{path}: the tensors' byte ranges {problem}: they end at byte {position} of {data_size} data bytes; "
            f"{_REDOWNLOAD}."
        )
    _library_check(path)
    return header


def _check_entry(path: Path, name: str, meta) -> tuple[int, int]:
    """(begin, end) of one header entry after checking its form, dtype and size."""
    if not isinstance(meta, dict) or set(meta) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(
            f"{path}: tensor {name!r} has a malformed header entry {meta!r} (expected exactly dtype, shape and "
            f"data_offsets); {_REDOWNLOAD}."
        )
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if dtype not in DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype!r}, which is not one of {sorted(DTYPES)}.")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has shape {shape!r}; expected a list of integers >= 0.")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise CheckpointError(
            f"{path}: tensor {name!r} has data_offsets {offsets!r}; expected [begin, end] (non-negative integers)."
        )
    begin, end = offsets
    expected = DTYPES[dtype][1]
    for d in shape:
        expected *= d
    if end - begin != expected:
        raise CheckpointError(
            f"{path}: tensor {name!r} spans {end - begin} bytes but {dtype} x {shape} needs {expected}; {_REDOWNLOAD}."
        )
    return begin, end


def _library_check(path: Path) -> None:
    """Ask the `safetensors` library too (header only: it maps the file, reads no tensor data)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: the safetensors library refuses this file ({exc}); {_REDOWNLOAD}.") from None


def _read_index(index_path: Path) -> dict[str, str]:
    """`weight_map` of a `*.safetensors.index.json`, checked: tensor name -> shard file name inside the folder."""
    try:
        index = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{index_path}: unreadable index ({exc}); re-download it.") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: no `weight_map` object (tensor name -> shard file); re-download it.")
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file.endswith(".safetensors") or Path(file).name != file:
            raise CheckpointError(
                f"{index_path}: tensor {name!r} is mapped to {file!r}; expected the name of a .safetensors file "
                "in the same folder."
            )
    return weight_map


def count_invalid_values(tensor: torch.Tensor, chunk: int = 1 << 20) -> int:
    """Number of NaN / infinite entries, including the NaN codes of FP8 E4M3 (S.1111.111) and E8M0 (0xFF), which
    `torch.isfinite` does not evaluate for these dtypes. Integer tensors have none. Scanned in chunks of `chunk`
    elements, so the check needs a few MB whatever the tensor's size."""
    if not tensor.is_floating_point():
        return 0
    flat, bad = tensor.reshape(-1), 0
    for start in range(0, flat.numel(), chunk):
        part = flat[start : start + chunk]
        if tensor.dtype == torch.float8_e4m3fn:
            bad += int(((part.view(torch.uint8) & 0x7F) == 0x7F).sum())
        elif tensor.dtype == torch.float8_e8m0fnu:
            bad += int((part.view(torch.uint8) == 0xFF).sum())
        else:
            bad += part.numel() - int(torch.isfinite(part).sum())
    return bad


class SourceCheckpoint:
    """A validated folder of safetensors shards (`model.safetensors.index.json`, or the shards themselves)."""

    def __init__(self, folder: str | os.PathLike, index_name: str = "model.safetensors.index.json"):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: not a folder; pass the checkpoint directory.")
        index_path = self.folder / index_name
        if index_path.exists():
            weight_map = _read_index(index_path)
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
            if not path.is_file():
                missing_for = next((n for n, f in (weight_map or {}).items() if f == file), None)
                what = "is missing" if not path.exists() else "is not a file"
                raise CheckpointError(
                    f"{path}: shard listed in {index_name} (e.g. for tensor {missing_for!r}) {what}; "
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
        tensor = data.view(DTYPES[info.dtype][0]).reshape(info.shape)
        bad = count_invalid_values(tensor)
        if bad:
            raise CheckpointError(
                f"{self.folder / info.file}: tensor {name!r} ({info.dtype} {list(info.shape)}) holds {bad} NaN or "
                "infinite value(s); the file is damaged: re-download this shard."
            )
        return tensor

    def close(self, file: str | None = None) -> None:
        """Kept for callers that release a shard when done with it (reads hold no open handles)."""

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def ordered_names(self) -> list[str]:
        """Tensor names shard by shard (in file order), sorted within a shard: the streaming order."""
        return [n for f in self.files for n in sorted(t.name for t in self.tensors.values() if t.file == f)]
