"""DeepSeek-V4 hybrid attention (tech report §2.3; official `inference/model.py`, `Attention`).

Every layer: low-rank query path (`q_a_proj` -> `q_a_norm` -> `q_b_proj` -> per-head unweighted RMSNorm), one
shared K = V head (`kv_proj` -> `kv_norm`, MQA), partial interleaved RoPE, a 128-token sliding window, a per-head
sink in the softmax denominator, inverse RoPE on the output and the grouped low-rank output projection
(`o_a_proj` per group of heads, then `o_b_proj`). CSA layers add the top-k compressed entries picked by the
lightning indexer; HCA layers add every causal compressed entry.

Memory-bounded by construction: `sparse_attention` walks query chunks over a key band, never an S x S mask
(deviation from native transformers' dense masks, forward-math.md §10 row 16). Names match the native port.
"""

from __future__ import annotations

import torch
from torch import nn

from .batch_meta import BatchMeta
from .cache import DeepseekV4LayerCache, last_valid_window
from .compressor import DeepseekV4CSACompressor, DeepseekV4HCACompressor
from .indexer_alignment import indexer_alignment_kl
from .norm import DeepseekV4RMSNorm
from .ops import rms_norm, sparse_attention
from .parallel_plans import refuse_buffer_weights
from .reference_numerics import kv_fp8_roundtrip
from .rope import apply_rope
from .weight_formats import grouped_linear


def window_step(window_kv: torch.Tensor, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sliding window of a static decode step (one token per row, `DeepseekV4StaticCache`): keys for the step
    `[B, W, D]` (cached W - 1 then the new one) and the next window `[B, W - 1, D]`."""
    keys = torch.cat([window_kv.to(kv.dtype), kv], dim=1)
    # A fresh tensor (not a view of `keys`): equal strides every step, so a compiled step is not recompiled.
    return keys, torch.cat([window_kv[:, 1:].to(kv.dtype), kv], dim=1)


class DeepseekV4GroupedLinear(nn.Module):
    """Grouped output projection `o_a_proj` (tech report §2.3.1 "Grouped Output Projection").

    `weight [g * d_g, H * D / g]` like the native port, but deliberately *not* an `nn.Linear`: group j maps the
    j-th slice of consecutive heads with rows `[j * d_g, (j + 1) * d_g)`, and a PEFT LoRA that treated it as one
    dense Linear would mix groups (hf-integration.md §8). Target it with PEFT `target_parameters`.
    """

    def __init__(self, in_features_per_group: int, out_features: int, n_groups: int):
        super().__init__()
        self.in_features = in_features_per_group
        self.out_features = out_features
        self.n_groups = n_groups
        self.weight = nn.Parameter(torch.empty(out_features, in_features_per_group))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `[..., g, H * D / g]` -> `[..., g * d_g]`. The group count is x's: under tensor parallelism
        (parallel_plans.py) x and the weight rows hold this rank's groups only."""
        return grouped_linear(x, self.weight, x.shape[-2])

    def extra_repr(self) -> str:
        return f"groups={self.n_groups}, in_per_group={self.in_features}, out={self.out_features}"


class DeepseekV4Attention(nn.Module):
    """One attention layer; `compress_ratio` 0 = sliding only, CSA rate = CSA, HCA rate = HCA."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        ratio = config.layer_compress_ratio(layer_idx)
        csa_rate = config.compress_rates["compressed_sparse_attention"]
        self.layer_type = (
            "sliding_attention"
            if ratio == 0
            else "compressed_sparse_attention"
            if ratio == csa_rate
            else "heavily_compressed_attention"
        )
        self.rope_type = "main" if ratio == 0 else "compress"
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.sliding_window = config.sliding_window
        self.scaling = self.head_dim**-0.5
        self.eps = config.rms_norm_eps
        self.chunk = config.attn_chunk_size
        self.backend = config.ops_backend
        self.o_groups = config.o_groups
        self.rope_dim = config.qk_rope_head_dim
        self.reference_numerics = False  # R2 (reference_numerics.py), set by `set_reference_numerics`
        self.indexer_kl = None  # the last training forward's indexer alignment loss (indexer_alignment.py)

        self.q_a_proj = nn.Linear(config.hidden_size, config.q_lora_rank, bias=False)
        self.q_a_norm = DeepseekV4RMSNorm(config.q_lora_rank, eps=config.rms_norm_eps)
        self.q_b_proj = nn.Linear(config.q_lora_rank, self.num_heads * self.head_dim, bias=False)
        self.kv_proj = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.kv_norm = DeepseekV4RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.o_a_proj = DeepseekV4GroupedLinear(
            self.num_heads * self.head_dim // config.o_groups, config.o_groups * config.o_lora_rank, config.o_groups
        )
        self.o_b_proj = nn.Linear(config.o_groups * config.o_lora_rank, config.hidden_size, bias=False)
        self.sinks = nn.Parameter(torch.empty(self.num_heads))
        if self.layer_type == "compressed_sparse_attention":
            self.compressor = DeepseekV4CSACompressor(config)
        elif self.layer_type == "heavily_compressed_attention":
            self.compressor = DeepseekV4HCACompressor(config)
        else:
            self.compressor = None

    def forward(self, x: torch.Tensor, meta: BatchMeta, cache: DeepseekV4LayerCache | None = None) -> torch.Tensor:
        """x `[B, S, d]` (compacted batch, see `BatchMeta`) -> `[B, S, d]`; updates `cache` in place. With
        `meta.static` (one token per row on a `DeepseekV4StaticCache`) every shape is fixed (static_cache.py)."""
        b, s, _ = x.shape
        refuse_buffer_weights(self.q_b_proj, self.o_a_proj, self.o_b_proj)
        cos, sin = meta.rope[self.rope_type]
        q_residual = self.q_a_norm(self.q_a_proj(x))
        # `-1` heads: under tensor parallelism `q_b_proj` (colwise) returns this rank's heads only (parallel_plans.py)
        q = self.q_b_proj(q_residual).view(b, s, -1, self.head_dim)
        q = apply_rope(rms_norm(q, None, self.eps), cos, sin)
        kv = apply_rope(self.kv_norm(self.kv_proj(x)), cos, sin)
        if self.reference_numerics:
            kv = kv_fp8_roundtrip(kv, self.rope_dim)

        if meta.static:
            keys, cache.window_kv = window_step(cache.window_kv, kv)
        else:
            keys = self._window_keys(kv, meta, cache)

        compressed, topk_idx, ratio = None, None, 0
        self.indexer_kl = None
        if self.compressor is not None:
            # Through the compressor's and the indexer's own forward (never a helper method): accelerate's offload
            # hooks, PEFT and FSDP wrap `forward`, so that is where their tensors are loaded (hf-integration.md §12).
            ratio = self.compressor.compress_rate
            compressed = self.compressor(x, meta, self._state(cache, "compressor", self.compressor, x))
            if self.layer_type == "compressed_sparse_attention":
                indexer = self.compressor.indexer
                topk_idx = indexer(x, q_residual, meta, self._state(cache, "indexer", indexer, x))
                self.indexer_kl = self._alignment(q, compressed, topk_idx, meta, indexer)
        return self._attend(q, keys, meta, compressed, ratio, topk_idx, cos, sin)

    def _alignment(self, q, compressed, topk_idx, meta: BatchMeta, indexer) -> torch.Tensor | None:
        """Mean indexer alignment KL of this forward's queries (training with `indexer_loss_weight` > 0), else None."""
        inputs, indexer.alignment_inputs = indexer.alignment_inputs, None
        if inputs is None:
            return None
        total, count = indexer_alignment_kl(q, compressed, topk_idx, self.scaling, *inputs, meta.lengths, self.chunk)
        return total / count.clamp(min=1)

    def _window_keys(self, kv: torch.Tensor, meta: BatchMeta, cache: DeepseekV4LayerCache | None) -> torch.Tensor:
        """Sliding-window keys `[B, W - 1 + S, D]` (cached then new), keeping the next window in the cache; `kv`
        `[B, S, D]` itself without a cache."""
        if cache is None:
            return kv
        # The cache keeps W - 1 keys per row, plus the rollback history (cache.py); attention reads W - 1.
        kept = cache.window_history(self.sliding_window)
        prior = cache.window_kv
        if prior is None:
            prior = kv.new_zeros(kv.shape[0], kept, self.head_dim)
        history = torch.cat([prior.to(kv.dtype), kv], dim=1)
        cache.window_kv = last_valid_window(history, meta.lengths, kept, kept)
        cache.is_initialized = True
        return history[:, kept - (self.sliding_window - 1) :]

    def _attend(self, q, keys, meta: BatchMeta, compressed, ratio: int, topk_idx, cos, sin) -> torch.Tensor:
        """Core attention, inverse RoPE and the grouped output projection: `[B, S, H, D]` queries -> `[B, S, d]`."""
        b, s = q.shape[:2]
        out = sparse_attention(
            q,
            keys,
            meta.start,
            self.sliding_window,
            self.sinks,
            self.scaling,
            compressed,
            ratio,
            topk_idx,
            self.chunk,
            backend=self.backend,
            static_shapes=meta.static,
        )
        out = apply_rope(out, cos, sin, inverse=True)
        # This rank's groups of heads (all of them without tensor parallelism); a rank must hold whole groups.
        if q.shape[2] % (self.num_heads // self.o_groups):
            raise ValueError(
                f"{q.shape[2]} of {self.num_heads} attention heads on this rank do not make whole groups of the "
                f"grouped output projection ({self.o_groups} groups): tensor parallelism needs tp_size to divide "
                "o_groups"
            )
        return self.o_b_proj(self.o_a_proj(out.reshape(b, s, -1, self.num_heads * self.head_dim // self.o_groups)))

    @staticmethod
    def _state(cache: DeepseekV4LayerCache | None, name: str, compressor, x: torch.Tensor):
        """The cached streaming state of `compressor` (created on first use), or None without a cache."""
        if cache is None:
            return None
        if name not in cache.states:
            cache.states[name] = compressor.new_state(x, cache.rollback_tokens)
        return cache.states[name]
