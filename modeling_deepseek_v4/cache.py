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

    def settle(
        self,
        aligned_kv: torch.Tensor,
        aligned_score: torch.Tensor,
        overlap_kv: torch.Tensor | None,
        overlap_score: torch.Tensor | None,
        total: torch.Tensor,
        ratio: int,
        dim: int,
    ) -> None:
        """Set the partial-window buffer and the CSA overlap for `total [B]` aligned tokens consumed.

        aligned_*: `[B, nW * m, width]` window-aligned projections of a call (buffered tokens first); overlap_*:
        the Ca halves before its first window. Used after every call, and by `crop` to rewind into a call.
        """
        b, length, _ = aligned_kv.shape
        done = total // ratio
        keep = ((done * ratio).unsqueeze(1) + torch.arange(ratio, device=total.device)).clamp(max=length - 1)
        index = keep.unsqueeze(-1).expand(-1, -1, aligned_kv.shape[-1])
        self.buf_kv = torch.gather(aligned_kv, 1, index)
        self.buf_score = torch.gather(aligned_score, 1, index)
        if overlap_kv is not None:
            n_windows = length // ratio
            ca_kv = torch.cat([overlap_kv.unsqueeze(1), aligned_kv.view(b, n_windows, ratio, -1)[..., :dim]], 1)
            ca_score = torch.cat(
                [overlap_score.unsqueeze(1), aligned_score.view(b, n_windows, ratio, -1)[..., :dim]], 1
            )
            rows = torch.arange(b, device=total.device)
            self.overlap_kv, self.overlap_score = ca_kv[rows, done], ca_score[rows, done]

    def map_tensors(self, fn) -> None:
        """Apply `fn` to every tensor of the state in place (beam reorder, batch select, repeat)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                setattr(self, f.name, fn(value))


@dataclass
class CompressorRecord:
    """What rolling one call of a compressor back needs: its aligned projections and the state before it."""

    aligned_kv: torch.Tensor
    aligned_score: torch.Tensor
    overlap_kv: torch.Tensor | None
    overlap_score: torch.Tensor | None
    buffered: torch.Tensor
    ratio: int
    dim: int

    def rewind(self, state: CompressorState, keep: torch.Tensor) -> None:
        """Put `state` back to `keep [B]` tokens into this call (entries past them are never visible and get
        recomputed by the next call, so they stay)."""
        total = self.buffered + keep
        state.settle(
            self.aligned_kv, self.aligned_score, self.overlap_kv, self.overlap_score, total, self.ratio, self.dim
        )


@dataclass
class LayerRecord:
    """One recorded call of one layer: window keys `[B, P + S, D]` with P cached, and the compressor records."""

    keys: torch.Tensor
    n_cached: int
    window_keep: int
    compressors: dict[str, CompressorRecord]


def last_valid_window(keys: torch.Tensor, lengths: torch.Tensor, n_cached: int, keep: int) -> torch.Tensor:
    """The `keep` keys before each row's first pad: `keys [B, P + S, D]` -> `[B, keep, D]`."""
    end = (lengths + n_cached).unsqueeze(1)
    index = (end - keep + torch.arange(keep, device=keys.device)).clamp(min=0)
    return torch.gather(keys, 1, index.unsqueeze(-1).expand(-1, -1, keys.shape[-1]))


class DeepseekV4LayerCache(CacheLayerMixin):
    """Cache of one DeepSeek-V4 attention layer (window KV + compressor states)."""

    is_compileable = False
    is_croppable = True
    is_sliding = True

    def __init__(self):
        super().__init__()
        self.window_kv: torch.Tensor | None = None
        self.states: dict[str, CompressorState] = {}
        # Set per call by DeepseekV4Cache.begin_call; records of recent calls make `crop` exact.
        self.recording = False
        self.records: list[LayerRecord] = []

    def rewind(self, keep: torch.Tensor) -> None:
        """Rewind the last recorded call to its first `keep [B]` tokens."""
        record = self.records[-1]
        self.window_kv = last_valid_window(record.keys, keep, record.n_cached, record.window_keep)
        for name, compressor_record in record.compressors.items():
            compressor_record.rewind(self.states[name], keep)

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
        # Recorded calls refer to the old batch layout; rolling back across a reorder is not meaningful.
        self.records = []

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def reset(self) -> None:
        self.window_kv = None
        self.states = {}
        self.records = []
        self.is_initialized = False

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        # The model moves state to the input device on use; nothing to prefetch ahead.
        return None

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("Crop the DeepseekV4Cache, not one of its layers (the token counts live there).")


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
        # Rollback: calls of at most `max_record_tokens` new tokens (decode steps, speculative verification) are
        # recorded, the last `max_records` of them; `activate_past_recording` records every call.
        self.record_past = False
        self.max_record_tokens = 64
        self.max_records = 64
        self.calls: list[torch.Tensor] = []

    def begin_call(self, seq_len: int) -> None:
        """Called by the model before a forward of `seq_len` new positions: decide whether to record it."""
        recording = self.record_past or seq_len <= self.max_record_tokens
        for layer in self.layers:
            layer.recording = recording
            if not recording:
                layer.records = []
        if not recording:
            self.calls = []

    def activate_past_recording(self) -> None:
        self.record_past = True

    @property
    def is_croppable(self) -> bool:
        return True

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` tokens (transformers' convention: a negative count) exactly: window
        keys, partial-window buffers, CSA overlap state and token counts return to what they were after the kept
        tokens. `crop(0)` only drops records that can no longer be needed."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number of tokens to remove.")
        remove = -tokens_to_remove
        if remove == 0:
            for layer in self.layers:
                layer.records = layer.records[-1:]
            self.calls = self.calls[-1:]
            return
        while remove > 0:
            if not self.calls:
                raise ValueError(
                    f"Cannot roll the DeepSeek-V4 cache back by {remove} more token(s): only recent calls of at most "
                    f"{self.max_record_tokens} tokens are recorded (call `activate_past_recording()` to record all)."
                )
            lengths = self.calls[-1]
            if int(lengths.min()) != int(lengths.max()):
                raise ValueError("Cannot crop a call in which the rows consumed different numbers of real tokens.")
            take = min(remove, int(lengths.max()))
            keep = lengths - take
            for layer in self.layers:
                if layer.records:
                    layer.rewind(keep)
            self.seen = self.seen - take
            self.processed -= take
            remove -= take
            if int(keep.max()) == 0:
                self.calls.pop()
                for layer in self.layers:
                    if layer.records:
                        layer.records.pop()
            else:
                self.calls[-1] = keep

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
        if self.layers and self.layers[0].recording:
            self.calls.append(lengths.clone())
            if len(self.calls) > self.max_records:
                self.calls.pop(0)
                for layer in self.layers:
                    if layer.records:
                        layer.records.pop(0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.calls = []
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
        self.calls = []

    @property
    def batch_size(self) -> int:
        return -1 if self.seen is None else int(self.seen.shape[0])
