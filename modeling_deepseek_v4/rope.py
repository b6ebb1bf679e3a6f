"""Partial interleaved RoPE of DeepSeek-V4 (forward-math.md §3.2; official `inference/model.py`,
`precompute_freqs_cis` / `apply_rotary_emb`).

Only the last `qk_rope_head_dim` (64) dims of a head rotate, as interleaved pairs (2i, 2i+1), not rotate-half.
Sliding-only layers (and MTP) use `rope_parameters["main"]` (theta 10000, no scaling); CSA/HCA layers use
`rope_parameters["compress"]` (theta 160000 with YaRN, no mscale) for every rotation in the layer.

The frequency tables are plain tensors computed from the config on first use (no buffers): transformers 5.x
builds models on the meta device, where non-persistent buffers would hold garbage after `from_pretrained`.
"""

from __future__ import annotations

import math

import torch


def rope_inv_freq(params: dict, rope_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Inverse frequencies `[rope_dim // 2]` (fp32) for one `rope_parameters` sub-dict ("default" or "yarn")."""
    theta = float(params["rope_theta"])
    inv_freq = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32, device=device) / rope_dim))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type != "yarn":
        raise ValueError(f"rope_type {rope_type!r} is not supported by DeepSeek-V4 (use 'default' or 'yarn').")
    factor = float(params["factor"])
    original = float(params["original_max_position_embeddings"])
    beta_fast = float(params.get("beta_fast") or 32)
    beta_slow = float(params.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return rope_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    return inv_freq * (1 - ramp) + (inv_freq / factor) * ramp


class RopeTables:
    """Per-device cache of the "main" and "compress" inverse frequencies of one config.

    Computed lazily on the device of the first positions seen (never at construction, which may run on meta).
    """

    def __init__(self, rope_parameters: dict, rope_dim: int):
        self.rope_dim = rope_dim
        self.rope_parameters = {name: dict(rope_parameters[name]) for name in ("main", "compress")}
        self._by_device: dict[tuple[str, torch.device], torch.Tensor] = {}

    def cos_sin(self, name: str, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[*positions.shape, rope_dim // 2]` in fp32 for integer `positions`."""
        key = (name, positions.device)
        inv_freq = self._by_device.get(key)
        if inv_freq is None:
            inv_freq = rope_inv_freq(self.rope_parameters[name], self.rope_dim, positions.device)
            self._by_device[key] = inv_freq
        angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the last `2 * cos.shape[-1]` dims of `x` as interleaved pairs, in fp32, returning `x.dtype`.

    x: `[B, S, D]` or `[B, S, H, D]`; cos/sin: `[B, S, r/2]`. `inverse=True` rotates by the negative angle
    (the de-rotation of the attention output, forward-math.md §3.5).
    """
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    rope_dim = 2 * cos.shape[-1]
    nope, rope = x[..., :-rope_dim], x[..., -rope_dim:].float()
    even, odd = rope[..., 0::2], rope[..., 1::2]
    if inverse:
        sin = -sin
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    return torch.cat([nope, rotated.to(x.dtype)], dim=-1)
