"""Preallocated cache for the shape-static decode step (`torch.compile` without graph breaks; hf-integration.md §6.5).

`DeepseekV4StaticCache` holds, per layer, the window keys `[B, W - 1, D]` and per compressor the partial-window
buffer `[B, m, width]`, the CSA overlap `[B, m, D]` and the entries `[B, ceil(max_len / m) + 1, D]`, all allocated
once: prefill runs the ordinary streaming path and then pads the entries to capacity (`freeze_shapes`), and every
decode step of one real token per row only *writes into* these buffers, with counts kept as tensors. The step itself
lives with the modules that own it: the compressors' `_static_step` (compressor.py), the attention's `window_step`
(attention.py) and the model's `_decode_step_eager`. Nothing in it reads a tensor value into Python, so
`torch.compile(..., fullgraph=True)` captures the whole step (`model.model.compile_decode()`).

Limits: decode tokens must be real tokens (left padding belongs to the prefill), and the static cache does not roll
back (use the dynamic `DeepseekV4Cache` for assisted / prompt-lookup decoding).
"""

from __future__ import annotations

import torch.nn.functional as F

from .cache import DeepseekV4Cache

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
