"""Generation cache of DeepSeek-V4: sliding-window KV plus the streaming state of every compressor.

Per attention layer it keeps (docs/forward-math.md §4 "Decode"; docs/hf-integration.md §6.2):
- `window_kv [B, W - 1 + R, D]`: the last W - 1 + R keys of each row (K = V), aligned to each row's own end; the
  attention reads the last W - 1 of them;
- per compressor ("compressor" for CSA/HCA, "indexer" for the CSA lightning indexer) a `CompressorState`:
  the raw (kv, score) projections of the partial window, the Ca overlap halves of the last complete window
  (CSA), the compressed entries emitted so far and, when R > 0, the raw projections of the last R + 2m tokens.
Rows advance independently (`seen [B]` counts each row's real tokens), which is what makes left-padded batches
equal per-sequence runs. `get_seq_length()` returns the number of input positions processed (pads included),
which is what `generate` slices `input_ids` with.

Rollback (`crop`, for assisted / prompt-lookup / MTP decoding): R (`rollback_tokens`) is how many of the latest
positions `crop` can undo, across any number of calls of any length. What it needs is bounded by the window and
the compressor windows, not by the calls: the keys of the W - 1 positions before the new end, and the raw
projections of the partial window and the window before it (the CSA overlap). Entries of windows that complete
after the new end need nothing: they are invisible until their window completes, and the call that completes it
recomputes them. R = 0 (the default of a plain cache) keeps no history; `generate` sizes R for its speculative
modes (`generation_hooks.py`).

The layer classes deliberately have no `_layer_type`, so they do not replace transformers' native cache layers
in its global registry (docs/hf-integration.md §6.1).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin


def last_valid_window(keys: torch.Tensor, lengths: torch.Tensor, n_cached: int, keep: int) -> torch.Tensor:
    """The `keep` rows before each row's first pad: `keys [B, P + S, w]` (P cached, then S new of which the first
    `lengths [B]` are real) -> `[B, keep, w]`, end-aligned; rows with fewer than `keep` get index-0 filler in front."""
    end = (lengths + n_cached).unsqueeze(1)
    index = (end - keep + torch.arange(keep, device=keys.device)).clamp(min=0)
    return torch.gather(keys, 1, index.unsqueeze(-1).expand(-1, -1, keys.shape[-1]))


def shift_right(x: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
    """End-aligned history `x [B, L, w]` after dropping each row's last `amount [B]` entries -> `[B, L, w]` (the
    front `amount` entries are filler)."""
    index = (torch.arange(x.shape[1], device=x.device) - amount.unsqueeze(1)).clamp(min=0)
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


@dataclass
class CompressorState:
    """Streaming state of one compressor for a batch.

    buf_kv / buf_score: `[B, m, width]` fp32 projections of the current partial window (first `seen % m` valid).
    overlap_kv / overlap_score: `[B, m, D]` Ca halves of the last complete window (CSA only; score -inf if none).
    entries: `[B, N, D]` compressed entries; entry s of row b is final once `seen[b] >= (s + 1) * m`.
    history_kv / history_score: `[B, R + 2m, width]` (`R + m` without overlap) fp32 projections of each row's last
    real tokens, end-aligned (rollback only; None when the cache keeps no rollback history).
    """

    buf_kv: torch.Tensor
    buf_score: torch.Tensor
    overlap_kv: torch.Tensor | None
    overlap_score: torch.Tensor | None
    entries: torch.Tensor
    history_kv: torch.Tensor | None = None
    history_score: torch.Tensor | None = None

    @classmethod
    def empty(
        cls, batch: int, ratio: int, width: int, dim: int, overlap: bool, device, dtype, rollback: int = 0
    ) -> CompressorState:
        zeros = torch.zeros(batch, ratio, width, device=device)
        ov_kv = torch.zeros(batch, ratio, dim, device=device) if overlap else None
        ov_score = torch.full((batch, ratio, dim), float("-inf"), device=device) if overlap else None
        state = cls(zeros, zeros.clone(), ov_kv, ov_score, torch.zeros(batch, 0, dim, device=device, dtype=dtype))
        state.ensure_history(rollback, torch.zeros(batch, dtype=torch.long, device=device))
        return state

    @property
    def ratio(self) -> int:
        return self.buf_kv.shape[1]

    def history_length(self, rollback: int) -> int:
        """Projections needed to undo `rollback` tokens: the partial window and, for CSA, the window before it."""
        return rollback + (2 if self.overlap_kv is not None else 1) * self.ratio

    def settle(
        self,
        aligned_kv: torch.Tensor,
        aligned_score: torch.Tensor,
        overlap_kv: torch.Tensor | None,
        overlap_score: torch.Tensor | None,
        total: torch.Tensor,
        dim: int,
    ) -> None:
        """Set the partial-window buffer and the CSA overlap after a call that consumed `total [B]` aligned tokens.

        aligned_*: `[B, nW * m, width]` window-aligned projections of the call (buffered tokens first); overlap_*:
        the Ca halves before its first window.
        """
        b, length, _ = aligned_kv.shape
        ratio = self.ratio
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

    def remember(self, kv: torch.Tensor, score: torch.Tensor, lengths: torch.Tensor) -> None:
        """Append a call's projections `[B, S, width]` (first `lengths [B]` real) to the rollback history."""
        if self.history_kv is None:
            return
        keep = self.history_kv.shape[1]
        self.history_kv = last_valid_window(torch.cat([self.history_kv, kv], 1), lengths, keep, keep)
        self.history_score = last_valid_window(torch.cat([self.history_score, score], 1), lengths, keep, keep)

    def ensure_history(self, rollback: int, seen: torch.Tensor) -> None:
        """Keep at least enough history to undo `rollback` tokens from now on. Started on a non-empty state, the
        history is seeded from the partial window and the overlap (all a rollback to `seen` or later reads)."""
        if rollback <= 0:
            return
        length = self.history_length(rollback)
        if self.history_kv is None:
            m = self.ratio
            kv, score = self.buf_kv, self.buf_score
            if self.overlap_kv is not None:
                # The window before the partial one: its Ca halves (the only part a rollback can read from it).
                pad = kv.shape[-1] - self.overlap_kv.shape[-1]
                kv = torch.cat([F.pad(self.overlap_kv, (0, pad)), kv], 1)
                score = torch.cat([F.pad(self.overlap_score, (0, pad), value=float("-inf")), score], 1)
            n_cached = kv.shape[1] - m
            self.history_kv = last_valid_window(kv, seen % m, n_cached, length)
            self.history_score = last_valid_window(score, seen % m, n_cached, length)
        elif self.history_kv.shape[1] < length:
            grow = length - self.history_kv.shape[1]
            self.history_kv = F.pad(self.history_kv, (0, 0, grow, 0))
            self.history_score = F.pad(self.history_score, (0, 0, grow, 0))

    def rewind(self, remove: torch.Tensor, seen_after: torch.Tensor) -> None:
        """Undo each row's last `remove [B]` real tokens, leaving `seen_after [B]`: the partial window and the CSA
        overlap are read back from the history (entries past the new end stay; they are invisible until
        recomputed)."""
        m = self.ratio
        length = self.history_kv.shape[1]
        # History index of the new partial window's first token (position seen_after - seen_after % m).
        start = length - remove - seen_after % m
        window = start.unsqueeze(1) + torch.arange(m, device=remove.device)
        # Slots at or past the new end are never read (filler), so they may repeat the last entry.
        index = window.clamp(max=length - 1).unsqueeze(-1).expand(-1, -1, self.history_kv.shape[-1])
        self.buf_kv = torch.gather(self.history_kv, 1, index)
        self.buf_score = torch.gather(self.history_score, 1, index)
        if self.overlap_kv is not None:
            dim = self.overlap_kv.shape[-1]
            before = (window - m).clamp(min=0).unsqueeze(-1).expand(-1, -1, dim)
            has_window = (seen_after >= m).view(-1, 1, 1)
            kv = torch.gather(self.history_kv[..., :dim], 1, before)
            score = torch.gather(self.history_score[..., :dim], 1, before)
            self.overlap_kv = torch.where(has_window, kv, torch.zeros_like(kv))
            self.overlap_score = torch.where(has_window, score, torch.full_like(score, float("-inf")))
        self.history_kv = shift_right(self.history_kv, remove)
        self.history_score = shift_right(self.history_score, remove)

    def map_tensors(self, fn) -> None:
        """Apply `fn` to every tensor of the state in place (beam reorder, batch select, repeat)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                setattr(self, f.name, fn(value))


class DeepseekV4LayerCache(CacheLayerMixin):
    """Cache of one DeepSeek-V4 attention layer (window KV + compressor states)."""

    is_compileable = False
    is_sliding = True

    def __init__(self, rollback_tokens: int = 0):
        super().__init__()
        self.window_kv: torch.Tensor | None = None
        self.states: dict[str, CompressorState] = {}
        # Tokens `crop` can undo (set by DeepseekV4Cache); sizes the key and projection histories.
        self.rollback_tokens = rollback_tokens

    @property
    def is_croppable(self) -> bool:
        return self.rollback_tokens > 0

    def window_history(self, window: int) -> int:
        """Keys kept per row for a `window`-token sliding window: W - 1 plus the rollback history."""
        return window - 1 + self.rollback_tokens

    def ensure_rollback(self, rollback: int, seen: torch.Tensor | None) -> None:
        """Grow the histories to undo `rollback` tokens; only tokens processed from now on can be undone (the new
        front is filler), `seen [B]` is each row's token count (None before the first call)."""
        grow = rollback - self.rollback_tokens
        if grow <= 0:
            return
        self.rollback_tokens = rollback
        if self.window_kv is not None:
            self.window_kv = F.pad(self.window_kv, (0, 0, grow, 0))
        for state in self.states.values():
            state.ensure_history(rollback, seen)

    def rewind(self, remove: torch.Tensor, seen_after: torch.Tensor) -> None:
        """Undo each row's last `remove [B]` real tokens (`seen_after [B]` remain)."""
        if self.window_kv is not None:
            self.window_kv = shift_right(self.window_kv, remove)
        for state in self.states.values():
            state.rewind(remove, seen_after)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("DeepseekV4LayerCache is updated by the DeepSeek-V4 attention itself, not via update().")

    def get_seq_length(self) -> int:
        raise RuntimeError("Ask the DeepseekV4Cache for the sequence length, not one of its layers.")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The model takes 2-D masks only; this keeps transformers' mask helpers consistent if they ask.
        window = 0 if self.window_kv is None else self.window_kv.shape[1] - self.rollback_tokens
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
        raise RuntimeError("Crop the DeepseekV4Cache, not one of its layers (the token counts live there).")


# Rollback horizon of `activate_past_recording()` without an explicit size (transformers calls it that way).
DEFAULT_ROLLBACK_TOKENS = 128


class DeepseekV4Cache(Cache):
    """Cache for `DeepseekV4ExtModel`: one `DeepseekV4LayerCache` per decoder layer plus per-row token counts.

    rollback_tokens: how many of the latest positions `crop` can undo (0: none, no history kept). `generate` sets
    it for assisted, prompt-lookup and MTP decoding; `ensure_rollback` / `activate_past_recording` raise it later
    (then only positions processed afterwards can be undone).
    """

    def __init__(self, config=None, num_layers: int | None = None, rollback_tokens: int = 0):
        if num_layers is None:
            if config is None:
                raise ValueError("DeepseekV4Cache needs the model config (or num_layers).")
            num_layers = config.num_hidden_layers
        if rollback_tokens < 0:
            raise ValueError(f"rollback_tokens must be >= 0, got {rollback_tokens}.")
        super().__init__(layers=[DeepseekV4LayerCache(rollback_tokens) for _ in range(num_layers)])
        self.seen: torch.Tensor | None = None
        self.processed = 0
        self.rollback_tokens = rollback_tokens
        # [B, R] bool, end-aligned: which of the last R positions were real tokens of each row (pads are not
        # in any history); `undoable`: positions `crop` may remove now (processed since the history began, <= R).
        self.real_positions: torch.Tensor | None = None
        self.undoable = 0

    def ensure_rollback(self, rollback_tokens: int, exact: bool = False) -> None:
        """Make `crop` able to undo up to `rollback_tokens` positions processed from now on. With `exact`, a cache
        that holds nothing yet gets exactly that horizon, also a smaller one (how `generate` sizes its cache)."""
        if exact and self.seen is None:
            self.rollback_tokens = rollback_tokens
            for layer in self.layers:
                layer.rollback_tokens = rollback_tokens
            return
        grow = rollback_tokens - self.rollback_tokens
        if grow <= 0:
            return
        self.rollback_tokens = rollback_tokens
        for layer in self.layers:
            layer.ensure_rollback(rollback_tokens, self.seen)
        if self.real_positions is not None:
            self.real_positions = F.pad(self.real_positions, (grow, 0))

    def activate_past_recording(self, rollback_tokens: int | None = None) -> None:
        """transformers' hook for caches that will be cropped (assisted decoding): keep a rollback history of
        `rollback_tokens`, or, without a size, the one `generate` already gave this cache (else the default)."""
        self.ensure_rollback(rollback_tokens or self.rollback_tokens or DEFAULT_ROLLBACK_TOKENS)

    @property
    def is_croppable(self) -> bool:
        return self.rollback_tokens > 0

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` positions (transformers' convention: a negative count) exactly:
        window keys, partial-window buffers, CSA overlap state and token counts return to what they were before
        those positions; each row loses the real tokens it had among them."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number of tokens to remove.")
        remove = -tokens_to_remove
        if remove == 0:
            return
        if remove > self.undoable:
            raise ValueError(
                f"Cannot roll the DeepSeek-V4 cache back by {remove} token(s): it can undo {self.undoable} now "
                f"(rollback_tokens={self.rollback_tokens}, counted from when the history started). Create it as "
                f"DeepseekV4Cache(config, rollback_tokens=N) or call cache.ensure_rollback(N) before the tokens "
                "you may want to undo are processed."
            )
        removed = self.real_positions[:, -remove:].sum(dim=1)
        seen_after = self.seen - removed.to(self.seen.device)
        for layer in self.layers:
            layer.rewind(removed.to(self.seen.device), seen_after)
        self.seen = seen_after
        self.processed -= remove
        self.undoable -= remove
        self.real_positions = F.pad(self.real_positions[:, :-remove], (remove, 0))

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

    def advance(self, lengths: torch.Tensor, processed: int, valid: torch.Tensor | None = None) -> None:
        """Record that each row consumed `lengths[b]` real tokens out of `processed` input positions; `valid
        [B, processed]` marks which positions were real (None: all)."""
        self.seen = lengths.clone() if self.seen is None else self.seen.to(lengths.device) + lengths
        self.processed += processed
        if self.rollback_tokens:
            if valid is None:
                valid = torch.ones(lengths.shape[0], processed, dtype=torch.bool, device=lengths.device)
            prior = self.real_positions
            if prior is None:
                prior = torch.zeros(lengths.shape[0], self.rollback_tokens, dtype=torch.bool, device=valid.device)
            self.real_positions = torch.cat([prior.to(valid.device), valid.bool()], 1)[:, -self.rollback_tokens :]
            self.undoable = min(self.undoable + processed, self.rollback_tokens)

    def skip(self, positions: int, batch: int = 1, device=None) -> None:
        """Start a fresh cache at `positions` without content (a sliding-only block whose window starts there)."""
        if self.seen is not None:
            raise ValueError("skip() only starts a fresh cache.")
        self.seen = torch.full((batch,), positions, dtype=torch.long, device=device)
        self.processed = positions

    def _map_counts(self, fn) -> None:
        if self.seen is not None:
            self.seen = fn(self.seen)
        if self.real_positions is not None:
            self.real_positions = fn(self.real_positions)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_counts(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_counts(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_counts(lambda t: t[indices])

    def reset(self) -> None:
        super().reset()
        self.seen = None
        self.processed = 0
        self.real_positions = None
        self.undoable = 0

    @property
    def batch_size(self) -> int:
        return -1 if self.seen is None else int(self.seen.shape[0])
