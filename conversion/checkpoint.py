"""Writing sharded safetensors checkpoints safely (used by both conversion directions); reading is
`modeling_deepseek_v4.checkpoint_reader` (`SourceCheckpoint`, re-exported here).

- `ShardedWriter` writes output shards of a fixed plan into a temporary folder next to the destination, verifies
  each shard after writing, and renames the folder into place at the end (`finalize`). Shards that are already
  complete in the temporary folder are skipped on `--resume`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
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
    CheckpointError,
    SourceCheckpoint,
    TensorInfo,
    read_header,
)
from modeling_deepseek_v4.checkpoint_reader import CheckpointError as ConversionError
from modeling_deepseek_v4.official_layout import copy_side_files

__all__ = [
    "DTYPES",
    "ConversionError",
    "ConversionInterrupted",
    "SourceCheckpoint",
    "TensorInfo",
    "fingerprint",
    "read_header",
    "write_safetensors",
]


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


class ConversionInterrupted(ConversionError):
    """Ctrl-C / SIGTERM during a conversion (the CLI exits 130)."""


# Write errors after which the finished shards are worth keeping: free space (or a larger file system) and rerun.
_RESUMABLE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
FINGERPRINT_FILE = ".dsv4-resume.json"


def fingerprint(source: SourceCheckpoint, **options) -> dict:
    """What a `--resume` must find unchanged: the options and, per source shard, its size, modification time and a
    hash of its header (names, dtypes, shapes and offsets of every tensor)."""
    shards = {}
    for file in source.files:
        path = source.folder / file
        with open(path, "rb") as f:
            length = struct.unpack("<Q", f.read(8))[0]
            f.seek(0)
            digest = hashlib.sha256(f.read(8 + length)).hexdigest()
        stat = path.stat()
        # The modification time catches a shard rewritten with the same header (new values, same shapes).
        shards[file] = {"bytes": stat.st_size, "header_sha256": digest, "mtime_ns": stat.st_mtime_ns}
    return {"options": options, "source_shards": shards}


class OutputFolder:
    """The destination of a conversion: refuses an existing destination (or a dangling link there), a missing or
    unwritable parent, and a second conversion into the same destination (a lock file next to it); keeps an
    interrupted run's temporary folder only for `--resume`, which must find the same source and options (a
    fingerprint in the temporary folder); checks free disk space for what is left to write; shows byte progress;
    and renames into place at the end. `writing()` turns failures while writing into one clean error."""

    def __init__(
        self,
        destination: Path,
        total_bytes: int,
        resume: bool,
        progress: bool,
        what: str = "conversion",
        fingerprint: dict | None = None,
    ):
        destination = Path(destination).absolute()
        self.destination, self.resume, self.what, self.bar = destination, resume, what, None
        if os.path.lexists(destination):
            kind = "is a link to a missing target" if not destination.exists() else "already exists"
            raise ConversionError(f"{destination}: {kind}; remove it or choose another destination.")
        parent = destination.parent
        if not parent.is_dir():
            raise ConversionError(f"{parent}: the destination's parent folder does not exist; create it first.")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConversionError(
                f"{parent}: cannot write here (no permission or a read-only file system); choose another destination."
            )
        self.lock = parent / f".{destination.name}.dsv4-lock"
        self._acquire_lock()
        try:
            self.tmp = temp_dir_for(destination)
            written = self._check_previous_run(fingerprint)
            check_disk_space(destination, total_bytes - written)
            self.tmp.mkdir(exist_ok=True)
            if fingerprint is not None:
                (self.tmp / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")
        except BaseException:
            self._release_lock()
            raise
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=what)

    def _acquire_lock(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.lock.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _alive(pid):
                    raise ConversionError(
                        f"{self.destination}: another conversion (process {pid}) is writing this destination; wait "
                        f"for it to finish, or delete {self.lock} if that process is gone."
                    ) from None
                self.lock.unlink(missing_ok=True)  # left by a process that no longer runs
                continue
            except OSError as exc:
                raise ConversionError(f"{self.lock}: cannot create the lock file ({exc.strerror}).") from None
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return
        raise ConversionError(f"{self.lock}: could not take the lock; delete it and retry.")

    def _release_lock(self) -> None:
        self.lock.unlink(missing_ok=True)

    def _check_previous_run(self, wanted: dict | None) -> int:
        """Bytes of output shards an interrupted run left (0 without one); refuses what `--resume` cannot use."""
        if not self.tmp.exists():
            return 0
        if not self.resume:
            raise ConversionError(
                f"{self.tmp}: a previous {self.what} was interrupted; pass --resume to continue it or delete it."
            )
        if wanted is not None:
            try:
                found = json.loads((self.tmp / FINGERPRINT_FILE).read_text())
            except (OSError, json.JSONDecodeError):
                found = None
            if found != json.loads(json.dumps(wanted)):
                raise ConversionError(
                    f"{self.tmp}: cannot --resume: {_differences(found, wanted)}. Rerun with the original source and "
                    "options, or delete this folder to start over."
                )
        return sum(p.stat().st_size for p in self.tmp.glob("*.safetensors"))

    def writer(self, plan: ShardPlan, prefix: str = "model", resume: bool = False) -> ShardedWriter:
        return ShardedWriter(self.tmp, plan, prefix, resume, self.bar)

    @contextlib.contextmanager
    def writing(self):
        """Failures while writing become one `ConversionError` line. Ctrl-C / SIGTERM, a full disk or a file-size
        limit keep the finished shards for `--resume` (and say so), as does any failure of a `--resume` run (it
        never deletes earlier progress); otherwise the temporary folder is removed."""
        try:
            yield
        except BaseException as exc:
            interrupted = isinstance(exc, KeyboardInterrupt)
            resumable = isinstance(exc, OSError) and exc.errno in _RESUMABLE_ERRNOS
            if isinstance(exc, (KeyboardInterrupt, CheckpointError, OSError)):
                reason = "interrupted" if interrupted else _describe(exc)
            else:  # a bug: keep the traceback, but never leave a half-written folder behind
                reason = None
            if interrupted or resumable or self.resume:
                self._close_bar()
                self._release_lock()
                after = f"the finished shards are kept in {self.tmp}; rerun the same command with --resume"
            else:
                self.discard()
                after = "nothing was written"
            if reason is None:
                raise
            error = ConversionInterrupted if interrupted else ConversionError
            raise error(f"{reason}; {after}.") from None

    def copy_from(self, src: Path, names: Iterable[str]) -> None:
        """Copy the side files among `names` that `src` has into the temporary folder (`copy_side_files`: links
        only from inside the source)."""
        copy_side_files(src, self.tmp, names)

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def discard(self) -> None:
        self._close_bar()
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._release_lock()

    def finish(self) -> None:
        self._close_bar()
        (self.tmp / FINGERPRINT_FILE).unlink(missing_ok=True)
        try:
            finalize(self.tmp, self.destination)
        finally:
            self._release_lock()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _differences(found: dict | None, wanted: dict) -> str:
    if not isinstance(found, dict):
        return "the interrupted run left no record of its source and options"
    changes = []
    for key, value in wanted["options"].items():
        if found.get("options", {}).get(key) != value:
            changes.append(f"{key} was {found.get('options', {}).get(key)!r}, now {value!r}")
    old, new = found.get("source_shards", {}), wanted["source_shards"]
    changed = sorted(f for f in set(old) | set(new) if old.get(f) != new.get(f))
    if changed:
        changes.append(
            f"the source shards changed since ({', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''})"
        )
    return "; ".join(changes) or "the record differs"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, CheckpointError):
        where = f"{exc.filename}: " if exc.filename else ""
        hint = {
            errno.ENOSPC: " (disk full: free space)",
            errno.EDQUOT: " (disk quota exceeded)",
            errno.EFBIG: " (file too large for this file system: use a smaller --shard-size)",
        }.get(exc.errno, "")
        return f"{where}{exc.strerror or exc}{hint}"
    return str(exc)


def temp_dir_for(destination: Path) -> Path:
    return destination.parent / f".{destination.name}.dsv4-partial"


def check_disk_space(destination: Path, needed: int) -> None:
    """Refuse to start when the file system lacks about `needed` bytes (what is left to write, 5% margin)."""
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
