"""Bit-exact tests of the DeepSeek-V4 numeric formats (official-format.md §8-9, §12; forward-math.md §9 R1, R3)."""

from __future__ import annotations

import pytest
import torch

from modeling_deepseek_v4.fp4_transcode import fp4_to_fp8_blocks
from modeling_deepseek_v4.quant_formats import (
    FP4_VALUES,
    dequantize_fp4,
    dequantize_fp8_blocks,
    e8m0_to_float,
    float_to_e8m0,
    float_to_fp4_codes,
    fp4_act_roundtrip,
    fp4_codes_to_float,
    fp8_act_roundtrip,
    pack_fp4,
    pow2_scale,
    quantize_fp4,
    quantize_fp8_act,
    quantize_fp8_blocks,
    unpack_fp4,
)

torch.set_num_threads(1)
E8M0 = torch.float8_e8m0fnu


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def _ref_pow2_scale(amax: torch.Tensor, max_value: float, min_amax: float) -> torch.Tensor:
    """2**ceil(log2(max(amax, min_amax) / max_value)) in float64."""
    mantissa, exponent = torch.frexp(amax.double().clamp_min(min_amax) / max_value)
    return torch.ldexp(torch.ones_like(mantissa), exponent - (mantissa == 0.5).long()).float()


def _ref_fp4_grid(v: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value by brute force in float64, ties to the even code, saturating at 6, sign kept."""
    mags = torch.tensor(FP4_VALUES, dtype=torch.float64)
    dist = (v.double().abs().clamp(max=6)[..., None] - mags).abs()
    best = dist == dist.amin(-1, keepdim=True)
    idx = best.to(torch.uint8).argmax(-1)
    idx = torch.where((best.sum(-1) > 1) & (idx % 2 == 1), idx + 1, idx)
    return torch.where(torch.signbit(v), -mags[idx], mags[idx])


def _fp4(codes: torch.Tensor, exps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 codes `[..., N, K]` and unbiased group exponents `[..., N, ceil(K/32)]` -> (packed, E8M0 scale)."""
    return pack_fp4(codes), (exps + 127).to(torch.uint8).view(E8M0)


def _random_fp4(shape, lo: int, hi: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, shape, generator=g, dtype=torch.uint8)
    exps = torch.randint(lo, hi + 1, (*shape[:-1], -(-shape[-1] // 32)), generator=g)
    return _fp4(codes, exps)


def test_nibble_order_literal():
    packed = torch.tensor([[0x21, 0x9A - 256]], dtype=torch.int8)
    assert unpack_fp4(packed).tolist() == [[1, 2, 10, 9]]
    assert dequantize_fp4(packed, torch.ones(1, 1)).tolist() == [[0.5, 1.0, -1.0, -0.5]]
    assert torch.equal(pack_fp4(torch.tensor([[1, 2, 10, 9]], dtype=torch.uint8)), packed)


def test_pack_unpack_all_bytes():
    b = torch.arange(256, dtype=torch.uint8)[None]
    codes = unpack_fp4(b)
    assert torch.equal(codes[0, 0::2], b[0] & 15) and torch.equal(codes[0, 1::2], b[0] >> 4)
    assert torch.equal(_bytes(pack_fp4(codes)), b)
    assert torch.equal(fp4_codes_to_float(torch.arange(16)), torch.tensor(FP4_VALUES + tuple(-v for v in FP4_VALUES)))
    with pytest.raises(ValueError, match="0, 15"):
        pack_fp4(torch.tensor([16, 0]))


def test_e8m0_decode_and_never_numeric_cast():
    b = torch.tensor([0, 1, 126, 127, 128, 254, 255], dtype=torch.uint8)
    want = [2.0**-127, 2.0**-126, 0.5, 1.0, 2.0, 2.0**127]
    for s in (b, b.view(E8M0)):
        got = e8m0_to_float(s)
        assert got.dtype == torch.float32 and got[:-1].tolist() == want and got[-1].isnan()
    all_bytes = torch.arange(255, dtype=torch.uint8)
    assert torch.equal(e8m0_to_float(all_bytes), torch.tensor([2.0 ** (i - 127) for i in range(255)]))
    with pytest.raises(TypeError):
        e8m0_to_float(b.to(torch.int8))


def test_float_to_e8m0():
    b = torch.arange(255, dtype=torch.uint8)
    assert torch.equal(_bytes(float_to_e8m0(e8m0_to_float(b))), b)
    for bad in (0.75, 3.0, 0.0, -1.0, float("inf"), float("nan"), 2.0**-128, 2.0**128):
        with pytest.raises(ValueError, match="powers of two"):
            float_to_e8m0(torch.tensor([1.0, bad], dtype=torch.float64))


@pytest.mark.parametrize("max_value,min_amax", [(448.0, 1e-4), (6.0, 6 * 2.0**-126)])
def test_pow2_scale_official_rule(max_value, min_amax):
    edges = torch.tensor([max_value * 2.0**k for k in range(-40, 40)], dtype=torch.float32)
    amax = torch.cat([edges, edges.nextafter(torch.tensor(0.0)), edges.nextafter(torch.tensor(1e38))])
    amax = torch.cat([amax, torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 1e3, torch.zeros(1)])
    assert torch.equal(pow2_scale(amax, max_value, min_amax), _ref_pow2_scale(amax, max_value, min_amax))
    assert torch.equal(
        pow2_scale(amax.bfloat16(), max_value, min_amax), _ref_pow2_scale(amax.bfloat16(), max_value, min_amax)
    )
    # clamping: amax below the floor takes the floor's scale (FP8: 2**-22, FP4: 2**-126)
    assert pow2_scale(torch.zeros(1), max_value, min_amax).item() == (2.0**-22 if max_value == 448 else 2.0**-126)


def test_fp4_rounding_ties_to_even():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0, 0.0, -0.0, 7.0, -1e9, 0.26, 4.99])
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -4.0, 0.0, -0.0, 6.0, -6.0, 0.5, 4.0]
    codes = float_to_fp4_codes(x)
    assert codes.tolist() == [0, 2, 2, 4, 4, 6, 6, 8, 14, 0, 8, 7, 15, 1, 6]
    assert torch.equal(fp4_codes_to_float(codes).signbit(), torch.tensor(want).signbit())
    assert fp4_codes_to_float(codes).tolist() == want
    dense = torch.cat([torch.linspace(-7, 7, 28001), torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]) * -1])
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        v = dense.to(dtype)
        assert torch.equal(fp4_codes_to_float(float_to_fp4_codes(v)).double(), _ref_fp4_grid(v))


@pytest.mark.parametrize("shape", [(3, 64), (5, 70), (2, 3, 38)])
def test_fp4_quantize_dequantize_is_identity_on_representable(shape):
    packed, scale = _random_fp4(shape, -20, 20)
    # each group must reach magnitude 4 or 6 for the pow2 rule to give back the same scale
    codes = unpack_fp4(packed)
    codes[..., ::32] = 7 | (codes[..., ::32] & 8)
    packed = pack_fp4(codes)
    q, s = quantize_fp4(dequantize_fp4(packed, scale))
    assert torch.equal(q, packed) and torch.equal(_bytes(s), _bytes(scale))


def test_fp4_group_scale_indexing_and_error_bound():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 70, generator=g) * torch.logspace(-6, 6, 70, base=2.0)
    q, s = quantize_fp4(w)
    assert q.shape == (6, 35) and s.shape == (6, 3)
    s_full = e8m0_to_float(s).repeat_interleave(32, -1)[:, :70]
    v = w / s_full
    assert v.abs().max() <= 6
    ulp = torch.exp2(v.abs().log2().floor().clamp(min=0) - 1)
    assert ((dequantize_fp4(q, s) - w).abs() <= 0.5 * ulp * s_full).all()
    assert torch.equal(dequantize_fp4(q, s), fp4_codes_to_float(unpack_fp4(q)) * s_full)


def test_fp4_act_roundtrip_matches_brute_force():
    x = (torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(2)) * 3).bfloat16()
    x[0, 0, :32] = 0
    amax = x.float().abs().unflatten(-1, (4, 32)).amax(-1, keepdim=True)
    s = _ref_pow2_scale(amax, 6.0, 6 * 2.0**-126)
    want = (_ref_fp4_grid(x.float().unflatten(-1, (4, 32)) / s) * s).flatten(-2).bfloat16()
    y = fp4_act_roundtrip(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)


def _random_e4m3(shape, seed: int = 0) -> torch.Tensor:
    b = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return b.masked_fill((b & 0x7F) == 0x7F, 0x7E).view(torch.float8_e4m3fn)


@pytest.mark.parametrize("shape", [(256, 128), (200, 300), (2, 130, 129)])
def test_fp8_quantize_dequantize_is_identity_on_representable(shape):
    q = _random_e4m3(shape)
    # one +-448 per block so its pow2 scale comes back unchanged
    corner = _bytes(q)[..., ::128, ::128]
    corner.copy_((corner & 0x80) | 0x7E)
    grid = (*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128))
    scale = (torch.randint(-30, 30, grid, generator=torch.Generator().manual_seed(1)) + 127).to(torch.uint8).view(E8M0)
    q2, s2 = quantize_fp8_blocks(dequantize_fp8_blocks(q, scale))
    assert torch.equal(_bytes(q2), _bytes(q)) and torch.equal(_bytes(s2), _bytes(scale))


def test_fp8_block_edge_scale_indexing_and_error_bound():
    n, k = 260, 200
    exps = torch.tensor([[-20, 9], [3, -7], [14, -1]])
    rows, cols = torch.arange(n)[:, None] // 128, torch.arange(k)[None] // 128
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3)) * torch.exp2(exps[rows, cols].float())
    q, s = quantize_fp8_blocks(w)
    assert s.shape == (3, 2) and s.dtype == E8M0
    s_full = e8m0_to_float(s)[rows, cols]
    assert torch.equal(e8m0_to_float(s), _block_ref_scales(w))
    v = w / s_full
    ulp = torch.exp2(v.abs().log2().floor().clamp(min=-6) - 3)
    deq = dequantize_fp8_blocks(q, s)
    assert ((deq - w).abs() <= 0.5 * ulp * s_full).all()
    assert torch.equal(deq, q.float() * s_full)
    assert torch.equal(dequantize_fp8_blocks(q.t(), s.t()), deq.t().contiguous())


def _block_ref_scales(w: torch.Tensor) -> torch.Tensor:
    blocks = torch.nn.functional.pad(w.abs(), (0, -w.shape[1] % 128, 0, -w.shape[0] % 128))
    amax = blocks.unflatten(0, (-1, 128)).unflatten(-1, (-1, 128)).amax((1, 3))
    return _ref_pow2_scale(amax, 448.0, 1e-4)


def test_fp8_act_quant_and_roundtrip():
    x = (torch.randn(2, 5, 384, generator=torch.Generator().manual_seed(4)) * 50).bfloat16()
    x[1, 2, 128:256] = 0
    q, s = quantize_fp8_act(x)
    assert q.shape == x.shape and s.shape == (2, 5, 3)
    s_ref = _ref_pow2_scale(x.float().unflatten(-1, (3, 128)).abs().amax(-1), 448.0, 1e-4)
    assert torch.equal(e8m0_to_float(s), s_ref)
    want = (q.float().unflatten(-1, (3, 128)) * s_ref[..., None]).flatten(-2).bfloat16()
    assert torch.equal(fp8_act_roundtrip(x), want)
    assert torch.equal(quantize_fp8_act(x, scale_dtype=torch.float32)[1], s_ref)


@pytest.mark.parametrize("pow2", [True, False])
def test_bf16_dequantization_is_fp32_cast(pow2):
    q = _random_e4m3((130, 260))
    packed, s4 = _random_fp4((7, 96), -40, 40)
    s8 = (torch.randint(-40, 40, (2, 3)) + 127).to(torch.uint8).view(E8M0)
    if not pow2:
        # Base checkpoints: float32 multipliers that are not powers of two
        s8, s4 = e8m0_to_float(s8) * 1.37, e8m0_to_float(s4) * 0.91
    assert torch.equal(dequantize_fp8_blocks(q, s8, dtype=torch.bfloat16), dequantize_fp8_blocks(q, s8).bfloat16())
    assert torch.equal(dequantize_fp4(packed, s4, dtype=torch.bfloat16), dequantize_fp4(packed, s4).bfloat16())


def _exact(packed, scale, fp8, s8) -> bool:
    return torch.equal(dequantize_fp8_blocks(fp8, s8), dequantize_fp4(packed, scale))


def test_transcode_lossless_when_d_at_most_14():
    packed, scale = _random_fp4((2, 300, 352), -30, -16)
    fp8, s8, issues = fp4_to_fp8_blocks(packed, scale, strict=True)
    assert issues == [] and s8.shape == (2, 3, 3) and _exact(packed, scale, fp8, s8)
    # float32 power-of-two scales are accepted as well; anything else is refused
    assert torch.equal(_bytes(fp4_to_fp8_blocks(packed, e8m0_to_float(scale))[0]), _bytes(fp8))
    with pytest.raises(ValueError, match="powers of two"):
        fp4_to_fp8_blocks(packed, e8m0_to_float(scale) * 3)


def _two_group_block(code_lo: int, d: int, rows: int = 128, cols: int = 128, e_max: int = 0):
    """One block: group 0 holds 6.0 at exponent e_max, group 1 holds `code_lo` at e_max - d, the rest zero."""
    codes = torch.zeros(rows, cols, dtype=torch.uint8)
    exps = torch.full((rows, -(-cols // 32)), e_max)
    codes[:, 0], codes[:, 32], exps[:, 1] = 7, code_lo, e_max - d
    return _fp4(codes, exps)


@pytest.mark.parametrize("code_lo", [1, 3, 9, 11, 2, 5])
def test_transcode_d14_is_exact(code_lo):
    packed, scale = _two_group_block(code_lo, 14)
    fp8, s8, issues = fp4_to_fp8_blocks(packed, scale, strict=True)
    assert issues == [] and _bytes(s8).item() == 127 - 6 and _exact(packed, scale, fp8, s8)


@pytest.mark.parametrize("code_lo", [1, 9, 3, 11])
def test_transcode_d15_half_codes_detected(code_lo):
    packed, scale = _two_group_block(code_lo, 15)
    fp8, s8, issues = fp4_to_fp8_blocks(packed, scale)
    assert issues == [((0, 0), 15, False, False)] and not _exact(packed, scale, fp8, s8)
    with pytest.raises(ValueError, match=r"\(0, 0\) \(d=15\)"):
        fp4_to_fp8_blocks(packed, scale, strict=True, name="layers.3.ffn.experts.7.w1.weight")


@pytest.mark.parametrize("code_lo", [2, 5, 6, 7, 13])
def test_transcode_d15_representable_codes_count_as_exact(code_lo):
    # at d = 15 only +-0.5 and +-1.5 fall off E4M3's 2**-9 subnormal grid; the round trip decides, not the ratio
    packed, scale = _two_group_block(code_lo, 15)
    fp8, s8, issues = fp4_to_fp8_blocks(packed, scale, strict=True)
    assert issues == [] and _exact(packed, scale, fp8, s8)


def test_transcode_all_zero_subgroups_do_not_count():
    packed, scale = _two_group_block(1, 14, e_max=-10)
    codes, exps = unpack_fp4(packed), e8m0_to_float(scale).log2().long()
    codes[:, 64:96] = 8  # -0 only
    exps[:, 2], exps[:, 3] = 40, -120
    packed, scale = _fp4(codes, exps)
    fp8, s8, issues = fp4_to_fp8_blocks(packed, scale, strict=True)
    assert issues == [] and _bytes(s8).item() == 127 - 10 - 6 and _exact(packed, scale, fp8, s8)


def test_transcode_partial_edge_blocks_and_leading_dims():
    codes = torch.full((2, 130, 160), 2, dtype=torch.uint8)
    exps = torch.zeros(2, 130, 5, dtype=torch.long)
    # expert 1, block (1, 1): row 129, the 5th (last, partial-block) group gets d = 15 with a 0.5 code
    codes[1, 129, 128], exps[1, 129, 4] = 1, -15
    codes[1, 128, 129] = 7
    packed, scale = _fp4(codes, exps)
    fp8, s8, issues = fp4_to_fp8_blocks(packed, scale)
    assert s8.shape == (2, 2, 2) and issues == [((1, 1, 1), 15, False, False)]
    expected = dequantize_fp4(packed, scale)
    mismatch = (dequantize_fp8_blocks(fp8, s8) != expected).nonzero().tolist()
    assert mismatch == [[1, 129, 128]]


@pytest.mark.parametrize("e_max,underflow", [(-121, False), (-122, True)])
def test_transcode_scale_underflow_flagged(e_max, underflow):
    # the block scale 2**(e_max - 6) must stay >= 2**-127; below that it is clamped there and reported
    packed, scale = _two_group_block(2, 0, e_max=e_max)
    fp8, s8, issues = fp4_to_fp8_blocks(packed, scale)
    assert [i.scale_underflow for i in issues] == [True] * underflow and _bytes(s8).item() == 0
    assert _exact(packed, scale, fp8, s8)
    if underflow:
        with pytest.raises(ValueError, match="scale underflow"):
            fp4_to_fp8_blocks(packed, scale, strict=True)
