"""Generation cache of DeepSeek-V4: sliding-window KV plus the streaming state of every compressor.

Per attention layer it keeps (forward-math.md §4 "Decode"; hf-integration.md §6.2):
- `window_kv [B, W - 1, D]`: the last W - 1 keys of each row (K = V), aligned to each row's own positions;
- per compressor ("compressor" for CSA/HCA, "indexer" for the CSA lightning indexer) a `CompressorState`:
  the raw (kv, score) projections of the partial window, the Ca overlap halves of the last complete window
  (CSA), and the compressed entries emitted so far.
Rows advance independently (`seen [B]` counts each row's real tokens), which is what makes left-padded batches
equal per-sequence runs. `get_seq_length()` returns the number of input positions processed (pads included),
which is what `generate` slices `input_ids` with.

The layer classes deliberately have no `_layer_type`, so they do not replace transformers' native cache layers
in its global registry (hf-integration.md §6.1).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


@dataclass
class CompressorState:
    """Streaming state of one compressor for a batch.

    buf_kv / buf_score: `[B, m, width]` fp32 projections of the current partial window (first `seen % m` valid).
    overlap_kv / overlap_score: `[B, m, D]` Ca halves of the last complete window (CSA only; score -inf if none).
    entries: `[B, N, D]` compressed entries; entry s of row b is final once `seen[b] >= (s + 1) * m`.
    """

    buf_kv: torch.Tensor
    buf_score: torch.Tensor
    overlap_kv: torch.Tensor | None
    overlap_score: torch.Tensor | None
    entries: torch.Tensor

    @classmethod
    def empty(cls, batch: int, ratio: int, width: int, dim: int, overlap: bool, device, dtype) -> CompressorState:
        zeros = torch.zeros(batch, ratio, width, device=device)
        ov_kv = torch.zeros(batch, ratio, dim, device=device) if overlap else None
        ov_score = torch.full((batch, ratio, dim), float("-inf"), device=device) if overlap else None
        return cls(zeros, zeros.clone(), ov_kv, ov_score, torch.zeros(batch, 0, dim, device=device, dtype=dtype))

    def map_tensors(self, fn) -> None:
        """Apply `fn` to every tensor of the state in place (beam reorder, batch select, repeat)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                setattr(self, f.name, fn(value))


class DeepseekV4LayerCache(CacheLayerMixin):
    """Cache of one DeepSeek-V4 attention layer (window KV + compressor states)."""

    is_compileable = False
    is_croppable = False
    is_sliding = True

    def __init__(self):
        super().__init__()
        self.window_kv: torch.Tensor | None = None
        self.states: dict[str, CompressorState] = {}

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("DeepseekV4LayerCache is updated by the DeepSeek-V4 attention itself, not via update().")

    def get_seq_length(self) -> int:
        raise RuntimeError("Ask the DeepseekV4Cache for the sequence length, not one of its layers.")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The model takes 2-D masks only; this keeps transformers' mask helpers consistent if they ask.
        window = 0 if self.window_kv is None else self.window_kv.shape[1]
        return window + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def _map(self, fn) -> None:
        if self.window_kv is not None:
            self.window_kv = fn(self.window_kv)
        for state in self.states.values():
            state.map_tensors(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def reset(self) -> None:
        self.window_kv = None
        self.states = {}
        self.is_initialized = False

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        # The model moves state to the input device on use; nothing to prefetch ahead.
        return None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "Rolling the DeepSeek-V4 cache back (assisted / prompt-lookup decoding) is not supported by this version; "
            "use plain greedy, sampling or beam search."
        )


class DeepseekV4Cache(Cache):
    """Cache for `DeepseekV4Model`: one `DeepseekV4LayerCache` per decoder layer plus per-row token counts."""

    def __init__(self, config=None, num_layers: int | None = None):
        if num_layers is None:
            if config is None:
                raise ValueError("DeepseekV4Cache needs the model config (or num_layers).")
            num_layers = config.num_hidden_layers
        super().__init__(layers=[DeepseekV4LayerCache() for _ in range(num_layers)])
        self.seen: torch.Tensor | None = None
        self.processed = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.processed

    def start_positions(self, batch: int, device) -> torch.Tensor:
        """`[B]` position of each row's next real token (0 for a fresh cache)."""
        if self.seen is None:
            return torch.zeros(batch, dtype=torch.long, device=device)
        if self.seen.shape[0] != batch:
            raise ValueError(
                f"The cache holds {self.seen.shape[0]} sequences but the input has batch size {batch}; "
                "pass a fresh cache (or reorder/select the cache) for a different batch."
            )
        return self.seen.to(device)

    def advance(self, lengths: torch.Tensor, processed: int) -> None:
        """Record that each row consumed `lengths[b]` real tokens out of `processed` input positions."""
        self.seen = lengths.clone() if self.seen is None else self.seen.to(lengths.device) + lengths
        self.processed += processed

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.seen is not None:
            self.seen = self.seen.index_select(0, beam_idx.to(self.seen.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.seen is not None:
            self.seen = self.seen.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.seen is not None:
            self.seen = self.seen[indices]

    def reset(self) -> None:
        super().reset()
        self.seen = None
        self.processed = 0

    @property
    def batch_size(self) -> int:
        return -1 if self.seen is None else int(self.seen.shape[0])
