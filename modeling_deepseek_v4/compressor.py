"""KV compressors and the lightning indexer (DeepSeek-V4 tech report §2.3.1-2.3.2; official `inference/model.py`,
`Compressor` and `Indexer`).

- HCA compressor: every m (128) tokens of a row pool into one entry, softmax-gated per channel.
- CSA compressor: width 2D; entry i pools the Ca halves of window i - 1 with the Cb halves of window i (2m slots).
- Indexer (CSA only): its own CSA compressor at `index_head_dim` gives the keys; queries score entries with
  `sum_h w_h relu(q_h . K_s)` and keep the top-k causal ones (lowest index first among ties).

One streaming code path serves prefill, chunked prefill and decode: each call window-aligns the row's buffered
partial window with its new real tokens (per row, so left-padded rows align to their own positions and pads never
enter a window), pools every window, writes the entries at their absolute index, and keeps the remainder. Entries
of windows that are not complete yet are garbage but never visible: query t only sees entries s < (t + 1) // m,
and the next call recomputes that window. A one-token decode step on a `DeepseekV4StaticCache` takes the
shape-static `_static_step` instead (writes into fixed buffers, `torch.compile` fullgraph). Projections, softmax
and pooling run in fp32 (reference precision). Parameter names match transformers' native port (`kv_proj`,
`gate_proj`, `position_bias`, `kv_norm`, `indexer.q_b_proj`, `indexer.scorer.weights_proj`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .batch_meta import BatchMeta
from .cache import CompressorState
from .norm import DeepseekV4RMSNorm
from .ops import compress_pool, indexer_topk
from .reference_numerics import indexer_fp4_roundtrip, kv_fp8_roundtrip
from .rope import apply_rope


def _gather_rows(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`src [B, L, w]` gathered along dim 1 with `index [B, A]` -> `[B, A, w]`."""
    return torch.gather(src, 1, index.unsqueeze(-1).expand(-1, -1, src.shape[-1]))


class DeepseekV4HCACompressor(nn.Module):
    """Windowed softmax-pooling compressor; HCA as is, the base of the CSA compressor and of the indexer."""

    overlap = False

    def __init__(self, config, ratio: int | None = None, head_dim: int | None = None):
        super().__init__()
        self.compress_rate = ratio or config.compress_rates["heavily_compressed_attention"]
        self.head_dim = head_dim or config.head_dim
        width = 2 * self.head_dim if self.overlap else self.head_dim
        self.kv_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.position_bias = nn.Parameter(torch.empty(self.compress_rate, width))
        self.kv_norm = DeepseekV4RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.rope_dim = config.qk_rope_head_dim
        self.reference_numerics = False  # R2 / R3 (reference_numerics.py), set by `set_reference_numerics`

    def entries(self, pooled: torch.Tensor, dtype: torch.dtype, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Pooled windows `[B, N, D]` fp32 -> entries in `dtype`: norm, RoPE, and in reference numerics the FP8
        round trip of the non-RoPE dims (R2)."""
        out = apply_rope(self.kv_norm(pooled.to(dtype)), cos, sin)
        return kv_fp8_roundtrip(out, self.rope_dim) if self.reference_numerics else out

    def _project(self, x: torch.Tensor, meta: BatchMeta) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 kv and score `[B, S, width]`; the score gets `ape[position % m]`."""
        kv = self.kv_proj(x.to(self.kv_proj.weight.dtype)).float()
        score = self.gate_proj(x.to(self.gate_proj.weight.dtype)).float()
        score = score + self.position_bias.float()[meta.positions % self.compress_rate]
        return kv, score

    def new_state(self, x: torch.Tensor, rollback: int = 0) -> CompressorState:
        """Empty streaming state for a batch like `x [B, S, d]`, with a history to undo `rollback` tokens."""
        width = self.kv_proj.out_features
        return CompressorState.empty(
            x.shape[0], self.compress_rate, width, self.head_dim, self.overlap, x.device, x.dtype, rollback
        )

    def forward(self, x: torch.Tensor, meta: BatchMeta, state: CompressorState | None) -> torch.Tensor:
        """Consume the new tokens of `x [B, S, d]`; returns the row-aligned entries `[B, N, D]` (x.dtype).

        `state` (from the cache) is updated in place; None means a stateless call starting at position 0. A static
        decode step (`meta.static`) writes into the fixed buffers of a `DeepseekV4StaticCache` instead. Both run
        here, in `forward`, because `position_bias` is read here: accelerate's offload hooks load a module's own
        tensors only around its `forward` (hf-integration.md §12).
        """
        if meta.static:
            return self._static_step(x, meta, state)
        m = self.compress_rate
        kv, score = self._project(x, meta)
        b, s, _ = kv.shape
        if state is None:
            state = self.new_state(x)
        buffered = meta.start % m
        first_entry = meta.start // m
        total = buffered + meta.lengths
        n_windows = (int(buffered.max()) + s + m - 1) // m
        # Token a of the aligned row is the buffered token a (a < buffered) or new token a - buffered.
        slot = torch.arange(n_windows * m, device=x.device).unsqueeze(0)
        take = torch.where(slot < buffered.unsqueeze(1), slot, m + slot - buffered.unsqueeze(1)).clamp(max=m + s - 1)
        aligned_kv = _gather_rows(torch.cat([state.buf_kv, kv], dim=1), take)
        aligned_score = _gather_rows(torch.cat([state.buf_score, score], dim=1), take)
        pooled = compress_pool(aligned_kv, aligned_score, m, state.overlap_kv, state.overlap_score)

        entry_idx = first_entry.unsqueeze(1) + torch.arange(n_windows, device=x.device)
        cos, sin = meta.tables.cos_sin("compress", entry_idx * m)
        entries = self.entries(pooled, x.dtype, cos, sin)

        state.remember(kv, score, meta.lengths)
        state.settle(aligned_kv, aligned_score, state.overlap_kv, state.overlap_score, total, self.head_dim)

        old = state.entries
        if old.shape[1] == 0 and not bool(first_entry.any()):
            state.entries = entries
        else:
            capacity = max(old.shape[1], int(entry_idx.max()) + 1)
            grown = F.pad(old.to(entries.dtype), (0, 0, 0, capacity - old.shape[1]))
            index = entry_idx.unsqueeze(-1).expand(-1, -1, entries.shape[-1])
            state.entries = grown.scatter(1, index, entries)
        return state.entries

    def _static_step(self, x: torch.Tensor, meta: BatchMeta, state: CompressorState) -> torch.Tensor:
        """One decode token per row into the fixed buffers of a `DeepseekV4StaticCache`; returns the entries
        `[B, N_cap, D]`. Shape-static: no tensor value is read into Python (`compile_decode`, static_cache.py).

        The token goes to slot `t % m` of the window buffer; the window's entry is (re)computed every step and
        written at index `t // m`: until the window completes it is never visible (query t sees entries
        s < (t + 1) // m), and at the window's last token it is final. The CSA overlap advances when a window
        completes.
        """
        m = self.compress_rate
        kv, score = self._project(x, meta)
        slot = (meta.start % m).view(-1, 1, 1).expand(-1, 1, kv.shape[-1])
        state.buf_kv = state.buf_kv.scatter(1, slot, kv)
        state.buf_score = state.buf_score.scatter(1, slot, score)
        pooled = compress_pool(state.buf_kv, state.buf_score, m, state.overlap_kv, state.overlap_score)
        entry = meta.start // m
        cos, sin = meta.tables.cos_sin("compress", (entry * m).unsqueeze(1))
        value = self.entries(pooled, x.dtype, cos, sin)
        index = entry.view(-1, 1, 1).expand(-1, 1, value.shape[-1])
        state.entries = state.entries.scatter(1, index, value.to(state.entries.dtype))
        if state.overlap_kv is not None:
            complete = ((meta.start + 1) % m == 0).view(-1, 1, 1)
            d = self.head_dim
            state.overlap_kv = torch.where(complete, state.buf_kv[..., :d], state.overlap_kv)
            state.overlap_score = torch.where(complete, state.buf_score[..., :d], state.overlap_score)
        return state.entries


class DeepseekV4IndexerScorer(nn.Module):
    """Per-head query weights of the lightning indexer (`weights_proj`, official `Indexer.weights_proj`)."""

    def __init__(self, config):
        super().__init__()
        self.weights_proj = nn.Linear(config.hidden_size, config.index_n_heads, bias=False)
        # Folded into the weights: I = sum_h (w_h H^-1/2) relu(q_h . K) c^-1/2.
        self.scaling = config.index_n_heads**-0.5 * config.index_head_dim**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `[B, S, d]` -> weights `[B, S, H_I]` fp32."""
        return self.weights_proj(x).float() * self.scaling


class DeepseekV4Indexer(DeepseekV4HCACompressor):
    """Lightning indexer: a CSA compressor at `index_head_dim` for keys, plus query projection and weights."""

    overlap = True

    def __init__(self, config):
        super().__init__(config, config.compress_rates["compressed_sparse_attention"], config.index_head_dim)
        self.num_heads = config.index_n_heads
        self.index_topk = config.index_topk
        self.chunk = config.indexer_chunk_size
        self.backend = config.ops_backend
        self.q_b_proj = nn.Linear(config.q_lora_rank, self.num_heads * self.head_dim, bias=False)
        self.scorer = DeepseekV4IndexerScorer(config)
        self.align = config.indexer_loss_weight > 0  # indexer_alignment.py
        self.alignment_inputs = None

    def entries(self, pooled: torch.Tensor, dtype: torch.dtype, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """As the compressor's, with the indexer's Hadamard + FP4 round trip in reference numerics (R3)."""
        out = apply_rope(self.kv_norm(pooled.to(dtype)), cos, sin)
        return indexer_fp4_roundtrip(out) if self.reference_numerics else out

    def forward(
        self,
        x: torch.Tensor,
        q_residual: torch.Tensor,
        meta: BatchMeta,
        state: CompressorState | None,
    ) -> torch.Tensor:
        """Top-k entry indices `[B, S, min(k, N)]` (-1 = none) for the new queries: the keys come from the
        compressor's forward (streaming or static step), then the new queries `[B, S, H_I, c_I]` score them."""
        align = self.align and self.training and torch.is_grad_enabled()
        if align:  # trained by the alignment loss alone: its inputs carry no gradient back (the top-k has none)
            x, q_residual = x.detach(), q_residual.detach()
        keys = super().forward(x, meta, state)
        b, s, _ = x.shape
        q = self.q_b_proj(q_residual).view(b, s, self.num_heads, self.head_dim)
        q = apply_rope(q, *meta.rope["compress"])
        if self.reference_numerics:
            q = indexer_fp4_roundtrip(q)
        weights = self.scorer(x)
        self.alignment_inputs = (q, keys, weights) if align else None
        return indexer_topk(
            q,
            keys,
            weights,
            meta.positions,
            self.compress_rate,
            self.index_topk,
            self.chunk,
            backend=self.backend,
            static_shapes=meta.static,
            round_scores=self.reference_numerics,
        )


class DeepseekV4CSACompressor(DeepseekV4HCACompressor):
    """CSA compressor (ratio 4, overlapping windows) with its lightning indexer."""

    overlap = True

    def __init__(self, config):
        super().__init__(config, config.compress_rates["compressed_sparse_attention"])
        self.indexer = DeepseekV4Indexer(config)
