"""The weighted RMSNorm module of DeepSeek-V4 (official `inference/model.py`, `RMSNorm`; precision:
forward-math.md §8), used by every norm of the model: `input_layernorm` / `post_attention_layernorm`, the attention's
`q_a_norm` / `kv_norm`, the compressors' `kv_norm`, the final `norm`, the MTP block's and the DSpark drafter's. The
math is the `rms_norm` op (`ops.py`), which the attention also calls directly for its unweighted per-head query norm.
"""

from __future__ import annotations

import torch
from torch import nn

from .ops import rms_norm


class DeepseekV4RMSNorm(nn.Module):
    """Weighted RMSNorm with fp32 math (weight kept in fp32, see `_keep_in_fp32_modules_strict`)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"
