"""Preallocated cache and the shape-static decode step (`torch.compile` without graph breaks; hf-integration.md §6.5).

`DeepseekV4StaticCache` holds, per layer, the window keys `[B, W - 1, D]` and per compressor the partial-window
buffer `[B, m, width]`, the CSA overlap `[B, m, D]` and the entries `[B, ceil(max_len / m) + 1, D]`, all allocated
once: prefill runs the ordinary streaming path and then pads the entries to capacity, and every decode step of one
real token per row only *writes into* these buffers (`compress_step`), with counts kept as tensors. Nothing in the
step reads a tensor value into Python, so `torch.compile(..., fullgraph=True)` captures the whole step.

Limits: decode tokens must be real tokens (left padding belongs to the prefill), and the static cache does not roll
back (use the dynamic `DeepseekV4Cache` for assisted / prompt-lookup decoding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cache import CompressorState, DeepseekV4Cache
from .ops import compress_pool
from .rope import BatchMeta

NO_ROLLBACK_MESSAGE = (
    "DeepseekV4StaticCache does not roll back; use the default DeepseekV4Cache for assisted, prompt-lookup or MTP "
    "decoding."
)


class DeepseekV4StaticCache(DeepseekV4Cache):
    """Fixed-size DeepSeek-V4 cache for `max_cache_len` positions per row."""

    def __init__(self, config=None, max_cache_len: int = 4096, num_layers: int | None = None, **kwargs):
        super().__init__(config, num_layers)
        self.max_cache_len = max_cache_len
        self.ready = False
        for layer in self.layers:
            layer.is_compileable = True

    @property
    def is_compileable(self) -> bool:
        return True

    @property
    def is_croppable(self) -> bool:
        return False

    def ensure_rollback(self, rollback_tokens: int, exact: bool = False) -> None:
        if rollback_tokens > 0:
            raise ValueError(NO_ROLLBACK_MESSAGE)

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(NO_ROLLBACK_MESSAGE)

    def freeze_shapes(self, config) -> None:
        """After prefill: pad every compressor's entries to capacity so decode steps keep static shapes."""
        for layer in self.layers:
            for state in layer.states.values():
                ratio = state.buf_kv.shape[1]
                capacity = -(-self.max_cache_len // ratio) + 1
                if state.entries.shape[1] > capacity:
                    raise ValueError(
                        f"The prompt is longer than max_cache_len={self.max_cache_len}; pass a larger max_length."
                    )
                state.entries = F.pad(state.entries, (0, 0, 0, capacity - state.entries.shape[1]))
        self.ready = True


def compress_step(module, x: torch.Tensor, meta: BatchMeta, state: CompressorState) -> torch.Tensor:
    """One decode token per row into a compressor's fixed buffers; returns the entries `[B, N_cap, D]`.

    The token goes to slot `t % m` of the window buffer; the window's entry is (re)computed every step and written at
    index `t // m`: until the window completes it is never visible (query t sees entries s < (t + 1) // m), and at
    the window's last token it is final. The CSA overlap advances when a window completes.
    """
    m = module.compress_rate
    kv, score = module._project(x, meta)
    slot = (meta.start % m).view(-1, 1, 1).expand(-1, 1, kv.shape[-1])
    state.buf_kv = state.buf_kv.scatter(1, slot, kv)
    state.buf_score = state.buf_score.scatter(1, slot, score)
    pooled = compress_pool(state.buf_kv, state.buf_score, m, state.overlap_kv, state.overlap_score)
    entry = meta.start // m
    cos, sin = meta.tables.cos_sin("compress", (entry * m).unsqueeze(1))
    value = module.entries(pooled, x.dtype, cos, sin)
    index = entry.view(-1, 1, 1).expand(-1, 1, value.shape[-1])
    state.entries = state.entries.scatter(1, index, value.to(state.entries.dtype))
    if state.overlap_kv is not None:
        complete = ((meta.start + 1) % m == 0).view(-1, 1, 1)
        d = module.head_dim
        state.overlap_kv = torch.where(complete, state.buf_kv[..., :d], state.overlap_kv)
        state.overlap_score = torch.where(complete, state.buf_score[..., :d], state.overlap_score)
    return state.entries


def window_step(window_kv: torch.Tensor, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys for the step `[B, W, D]` (cached W - 1 then the new one) and the next window `[B, W - 1, D]`."""
    keys = torch.cat([window_kv.to(kv.dtype), kv], dim=1)
    # A fresh tensor (not a view of `keys`): equal strides every step, so a compiled step is not recompiled.
    return keys, torch.cat([window_kv[:, 1:].to(kv.dtype), kv], dim=1)
