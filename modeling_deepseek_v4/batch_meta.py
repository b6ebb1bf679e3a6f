"""Per-call batch and position metadata (`BatchMeta`), built once per forward call and read by every layer.

`DeepseekV4ExtModel.forward` builds it after compacting the batch (each row's real tokens first, from the attention
mask) and reading each row's start position from the cache; the static decode step (`_decode_step_eager`),
`mtp_logits` and the MTP speculation (`mtp_speculation.py`) build their own. Attention, compressors and the indexer
only read it. The RoPE tables it draws cos/sin from live in `rope.py`.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .rope import RopeTables


class BatchMeta:
    """Positions of one forward call, shared by every layer.

    The model works on a *compacted* batch: each row's real tokens come first (pads moved to the end), so
    row b's new tokens sit at positions `start[b] + i` for `i < lengths[b]`; slots `i >= lengths[b]` are pads
    whose outputs are discarded. cos/sin for both rope types are computed once here.
    """

    def __init__(
        self, start: torch.Tensor, lengths: torch.Tensor, seq_len: int, tables: RopeTables, static: bool = False
    ):
        # static: a one-token decode step on a DeepseekV4StaticCache (shape-static ops, see static_cache.py).
        self.static = static
        self.start = start
        self.lengths = lengths
        self.positions = start.unsqueeze(1) + torch.arange(seq_len, device=start.device)
        self.tables = tables
        self.rope = {name: tables.cos_sin(name, self.positions) for name in ("main", "compress")}

    def to(self, device: torch.device | str | int, non_blocking: bool = False) -> BatchMeta:
        """This batch's tensors on `device` (self when already there). accelerate's device hooks move every forward
        argument that has a `.to` onto the module's execution device, so the positions and cos/sin follow the
        hidden states of a model split across devices; they are copied, not recomputed, so numerics stay equal."""
        device = torch.device(device)
        if self.start.device == device:
            return self
        moved = copy.copy(self)
        moved.start = self.start.to(device, non_blocking=non_blocking)
        moved.lengths = self.lengths.to(device, non_blocking=non_blocking)
        moved.positions = self.positions.to(device, non_blocking=non_blocking)
        moved.rope = {
            name: tuple(t.to(device, non_blocking=non_blocking) for t in pair) for name, pair in self.rope.items()
        }
        return moved
