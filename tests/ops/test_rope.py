"""Partial interleaved RoPE (forward-math.md §3.2): frequencies vs transformers, rotation vs complex products."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding

from modeling_deepseek_v4.batch_meta import BatchMeta
from modeling_deepseek_v4.rope import RopeTables, apply_rope, rope_inv_freq

torch.set_num_threads(1)

YARN = {"rope_type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1}
V4_ROPE = {"main": {"rope_type": "default", "rope_theta": 10000.0}, "compress": dict(YARN, rope_theta=160000.0)}


def _native_rotary(**kwargs) -> DeepseekV4RotaryEmbedding:
    return DeepseekV4RotaryEmbedding(transformers.DeepseekV4Config(**kwargs))


def test_inv_freq_defaults_match_transformers():
    cfg = transformers.DeepseekV4Config()
    native = DeepseekV4RotaryEmbedding(cfg)
    for name in ("main", "compress"):
        assert torch.equal(rope_inv_freq(cfg.rope_parameters[name], 64), getattr(native, f"{name}_inv_freq")), name


def test_inv_freq_v4_yarn_matches_transformers():
    native = _native_rotary(rope_parameters=dict(YARN))
    assert native.rope_type["compress"] == "yarn"
    assert native.compress_attention_scaling == 1.0  # no mscale
    ours = rope_inv_freq(V4_ROPE["compress"], 64)
    assert ours.dtype == torch.float32 and ours.shape == (32,)
    assert torch.equal(ours, native.compress_inv_freq)
    assert torch.equal(rope_inv_freq(V4_ROPE["main"], 64), native.main_inv_freq)


def test_inv_freq_v4_yarn_closed_form():
    """corr(b) = 64 ln(65536 / (2 pi b)) / (2 ln 160000); low = 15, high = 25; linear ramp between f and f / 16."""
    theta, r = 160000.0, 64
    corr = [r * math.log(65536 / (2 * math.pi * beta)) / (2 * math.log(theta)) for beta in (32, 1)]
    low, high = math.floor(corr[0]), math.ceil(corr[1])
    assert (low, high) == (15, 25)
    expected = []
    for i in range(r // 2):
        f = theta ** (-2 * i / r)
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        expected.append(f * (1 - ramp) + f / 16 * ramp)
    got = rope_inv_freq(V4_ROPE["compress"], 64).double()
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
    plain = rope_inv_freq({"rope_type": "default", "rope_theta": 10000.0}, 64).double()
    torch.testing.assert_close(
        plain, 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64), rtol=1e-6, atol=0
    )


def test_inv_freq_rejects_unknown_type():
    with pytest.raises(ValueError, match="rope_type"):
        rope_inv_freq({"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}, 64)


def _complex_rotate(x: torch.Tensor, angles: torch.Tensor, r: int) -> torch.Tensor:
    """x[..., -r:] as complex pairs (2i, 2i+1) times exp(i * angle), in float64."""
    pairs = torch.view_as_complex(x[..., -r:].double().reshape(*x.shape[:-1], r // 2, 2).contiguous())
    rotated = torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(-2)
    return torch.cat([x[..., :-r].double(), rotated], dim=-1)


def _rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, r: int) -> torch.Tensor:
    rope = x[..., -r:]
    a, b = rope[..., : r // 2], rope[..., r // 2 :]
    return torch.cat([x[..., :-r], a * cos - b * sin, b * cos + a * sin], dim=-1)


def _angles(seed: int, shape, r: int):
    g = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, 5000, shape[:2], generator=g)
    inv_freq = rope_inv_freq(V4_ROPE["compress"], r)
    angles = positions.double().unsqueeze(-1) * inv_freq.double()
    return angles, angles.cos().float(), angles.sin().float()


@pytest.mark.parametrize("shape", [(2, 5, 24), (2, 5, 3, 24)])
def test_apply_rope_is_interleaved_complex_product(shape):
    r = 16
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    angles, cos, sin = _angles(1, shape, r)
    out = apply_rope(x, cos, sin)
    assert out.shape == x.shape and out.dtype == x.dtype
    if len(shape) == 4:
        angles = angles.unsqueeze(2)
    torch.testing.assert_close(out.double(), _complex_rotate(x, angles, r), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[..., :-r], x[..., :-r])  # only the last r dims change
    c4, s4 = (cos.unsqueeze(2), sin.unsqueeze(2)) if len(shape) == 4 else (cos, sin)
    rotate_half = _rotate_half(x, c4, s4, r)
    assert (out - rotate_half).abs().max() > 0.1  # regression §12: not rotate-half


def test_apply_rope_inverse():
    r, shape = 8, (1, 4, 2, 12)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    angles, cos, sin = _angles(3, shape, r)
    back = apply_rope(apply_rope(x, cos, sin), cos, sin, inverse=True)
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)
    inv = apply_rope(x, cos, sin, inverse=True)
    torch.testing.assert_close(inv.double(), _complex_rotate(x, -angles.unsqueeze(2), r), rtol=1e-5, atol=1e-5)


def test_apply_rope_bf16_keeps_dtype_and_nope_bits():
    r, shape = 8, (2, 3, 16)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4)).bfloat16()
    angles, cos, sin = _angles(5, shape, r)
    out = apply_rope(x, cos, sin)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[..., :-r], x[..., :-r])
    torch.testing.assert_close(out.double(), _complex_rotate(x, angles, r), rtol=2e-2, atol=2e-2)


def test_rope_tables_and_batch_meta():
    tables = RopeTables(V4_ROPE, 64)
    meta = BatchMeta(torch.tensor([0, 7]), torch.tensor([3, 3]), 3, tables)
    assert torch.equal(meta.positions, torch.tensor([[0, 1, 2], [7, 8, 9]]))
    for name in ("main", "compress"):
        cos, sin = meta.rope[name]
        assert cos.shape == (2, 3, 32) and cos.dtype == torch.float32
        angles = meta.positions.double().unsqueeze(-1) * rope_inv_freq(V4_ROPE[name], 64).double()
        torch.testing.assert_close(cos.double(), angles.cos(), rtol=0, atol=1e-5)
        torch.testing.assert_close(sin.double(), angles.sin(), rtol=0, atol=1e-5)
    assert not torch.equal(meta.rope["main"][0], meta.rope["compress"][0])  # regression §12: two bases
