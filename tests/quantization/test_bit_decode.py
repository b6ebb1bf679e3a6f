"""The bit-moving FP8 / FP4 decoders (`bit_decode.py`) give exactly what the plain cast / table path gives: over every
code and every E8M0 scale, through the model's logits, and they step aside where they could not (NaN codes, large
scales, flush-denormal mode)."""

import pytest
import torch

from modeling_deepseek_v4 import bit_decode, quant_formats
from modeling_deepseek_v4.quant_formats import dequantize_fp4, dequantize_fp8_blocks, e8m0_to_float, quantize_fp4

torch.set_num_threads(1)

FINITE_CODES = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)


def _plain_fp8(w, scale, block, dtype):
    """The cast path: E4M3 -> dtype exactly, times the block's scale (one rounding)."""
    s = e8m0_to_float(scale).repeat_interleave(block[0], -2).repeat_interleave(block[1], -1)
    s = s[..., : w.shape[-2], : w.shape[-1]]
    return w.to(dtype) * s.to(dtype)


def _bits(t):
    return t.view({torch.bfloat16: torch.int16, torch.float32: torch.int32}[t.dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_bits_equal_the_cast_for_every_code_and_scale(dtype):
    # rows = the 254 finite codes, one 1x1 block per (code, scale byte): every product, incl. subnormal results
    scale_bytes = torch.arange(0, 255, dtype=torch.uint8)  # 255 is NaN: never usable, tested below
    w = FINITE_CODES.view(torch.float8_e4m3fn).view(-1, 1).expand(-1, scale_bytes.numel()).contiguous()
    scale = scale_bytes.view(1, -1).expand(w.shape[0], -1).contiguous().view(torch.float8_e8m0fnu)
    small = scale.view(torch.uint8) <= 127 + 7  # scales up to 2**7 take the bit path
    for cols in (small[0], ~small[0]):
        ws, ss = w[:, cols].contiguous(), scale[:, cols].contiguous()
        expected_fast = bool(cols[0] == small[0][0])
        assert bit_decode.fp8_bits_usable(ws, e8m0_to_float(ss), dtype) == expected_fast
        got = dequantize_fp8_blocks(ws, ss, block=(1, 1), dtype=dtype)
        assert torch.equal(_bits(got), _bits(_plain_fp8(ws, ss, (1, 1), dtype)))


def test_fp8_bits_step_aside_for_nan_codes_and_flushed_denormals():
    w = torch.randn(128, 256).mul(50).to(torch.float8_e4m3fn)
    scale = torch.full((1, 2), 120, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    assert bit_decode.fp8_bits_usable(w, e8m0_to_float(scale), torch.bfloat16)
    for nan_code in (0x7F, 0xFF):
        bad = w.clone()
        bad.view(torch.uint8)[3, 5] = nan_code
        assert not bit_decode.fp8_bits_usable(bad, e8m0_to_float(scale), torch.bfloat16)
        got = dequantize_fp8_blocks(bad, scale, dtype=torch.bfloat16)
        assert torch.isnan(got[3, 5]) and torch.equal(_bits(got), _bits(_plain_fp8(bad, scale, (128, 128), got.dtype)))
    assert not bit_decode.fp8_bits_usable(w, e8m0_to_float(scale), torch.float16)  # only bf16 / fp32 outputs
    try:
        torch.set_flush_denormal(True)
        flushing = bit_decode._denormals_flushed()
        usable = bit_decode.fp8_bits_usable(w, e8m0_to_float(scale), torch.bfloat16)
    finally:
        torch.set_flush_denormal(False)
    if flushing:  # where the CPU supports the mode at all
        assert not usable
    assert not bit_decode._denormals_flushed()


@pytest.mark.parametrize("shape", [(2, 256, 384), (300, 200), (3, 96, 160)])
def test_fp8_blocks_of_any_shape_match_the_cast(shape):
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(shape, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    grid = (*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128))
    scale = torch.randint(100, 135, grid, dtype=torch.uint8, generator=gen).view(torch.float8_e8m0fnu)
    for dtype in (torch.bfloat16, torch.float32):
        got = dequantize_fp8_blocks(w, scale, dtype=dtype)
        assert torch.equal(_bits(got), _bits(_plain_fp8(w, scale, (128, 128), dtype)))


@pytest.mark.parametrize("shape", [(4, 64, 128), (96, 64), (8, 32)])
def test_fp4_quad_gather_equals_the_per_code_table(shape):
    gen = torch.Generator().manual_seed(1)
    packed, scale = quantize_fp4(torch.randn(shape, generator=gen))
    packed[..., :2].view(torch.uint8).copy_(torch.tensor([0x08, 0x80], dtype=torch.uint8))  # +-0 codes
    codes = quant_formats.unpack_fp4(packed)
    expected = quant_formats.fp4_codes_to_float(codes) * e8m0_to_float(scale).repeat_interleave(32, -1)
    assert bit_decode.fp4_quad_usable(packed.view(torch.uint8), torch.bfloat16) == (shape[-1] // 2 % 2 == 0)
    got = dequantize_fp4(packed, scale, torch.bfloat16)
    assert torch.equal(_bits(got), _bits(expected.to(torch.bfloat16)))
    assert torch.equal(_bits(dequantize_fp4(packed, scale, torch.float32)), _bits(expected))


def test_every_byte_pair_decodes_like_its_two_bytes():
    pairs = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.uint8).view(1, -1)
    table = bit_decode.fp4_quad_gather(pairs, quant_formats._fp4_pair_lut(pairs.device))
    per_byte = quant_formats._fp4_pair_lut(pairs.device)[pairs.long()].flatten(-2).to(torch.bfloat16)
    assert torch.equal(_bits(table), _bits(per_byte))


@pytest.mark.parametrize("experts", ["fp4", "fp8"])
def test_model_logits_are_bit_identical_with_and_without_the_bit_paths(experts, monkeypatch):
    from modeling_deepseek_v4.quantization import quantize_model
    from tests.conftest import tiny_model

    model = tiny_model(hidden_size=128, moe_intermediate_size=64).to(torch.bfloat16)
    quantize_model(model, weights="fp8", experts=experts)
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    calls = []
    monkeypatch.setattr(quant_formats, "fp8_bits", lambda *a: calls.append(1) or bit_decode.fp8_bits(*a))
    with torch.no_grad():
        fast = model(ids).logits
        assert calls  # the bit path ran
        monkeypatch.setattr(quant_formats, "fp8_bits_usable", lambda *a: False)
        monkeypatch.setattr(quant_formats, "fp4_quad_usable", lambda *a: False)
        plain = model(ids).logits
    assert torch.equal(fast.view(torch.int32), plain.view(torch.int32))
