"""Manifold-constrained hyper-connections (mHC, DeepSeek-V4 tech report §2.2; official `inference/model.py`,
`Block.hc_pre` / `Block.hc_post` / `Transformer.hc_head`).

The residual is `hc_mult` (4) parallel streams `[B, S, n, d]`. Before each sub-layer the streams are collapsed
with `pre` weights; after it the output is expanded with `post` weights and the streams are mixed with a
Sinkhorn-projected doubly-stochastic `comb` (applied transposed: row = source stream). All of it runs in fp32
(forward-math.md §2); parameter names match transformers' native port (`attn_hc.fn/base/scale`,
`hc_head.hc_fn/hc_base/hc_scale`).
"""

from __future__ import annotations

import torch
from torch import nn

from .ops import hc_head, hc_post, hc_pre


class DeepseekV4HyperConnection(nn.Module):
    """Mixing weights of one sub-layer: `fn [(2+n)n, n d]`, `base [(2+n)n]`, `scale [3]` (pre, post, comb)."""

    def __init__(self, config):
        super().__init__()
        self.hc_mult = config.hc_mult
        self.sinkhorn_iters = config.hc_sinkhorn_iters
        self.hc_eps = config.hc_eps
        self.norm_eps = config.rms_norm_eps
        mix = (2 + self.hc_mult) * self.hc_mult
        self.fn = nn.Parameter(torch.empty(mix, self.hc_mult * config.hidden_size))
        self.base = nn.Parameter(torch.empty(mix))
        self.scale = nn.Parameter(torch.empty(3))

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams `[B, S, n, d]` -> (collapsed `[B, S, d]`, post `[B, S, n]`, comb `[B, S, n, n]`)."""
        return hc_pre(streams, self.fn, self.base, self.scale, self.sinkhorn_iters, self.hc_eps, self.norm_eps)

    @staticmethod
    def expand(output: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """Sub-layer output `[B, S, d]` back into streams `[B, S, n, d]`."""
        return hc_post(output, streams, post, comb)


class DeepseekV4HyperHead(nn.Module):
    """Final collapse of the streams before the last norm (`hc_fn [n, n d]`, `hc_base [n]`, `hc_scale [1]`)."""

    def __init__(self, config):
        super().__init__()
        self.hc_mult = config.hc_mult
        self.eps = config.hc_eps
        self.norm_eps = config.rms_norm_eps
        self.hc_fn = nn.Parameter(torch.empty(self.hc_mult, self.hc_mult * config.hidden_size))
        self.hc_base = nn.Parameter(torch.empty(self.hc_mult))
        self.hc_scale = nn.Parameter(torch.empty(1))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        """streams `[B, S, n, d]` -> `[B, S, d]`."""
        return hc_head(streams, self.hc_fn, self.hc_base, self.hc_scale, self.eps, self.norm_eps)
