"""DeepSeek-V4 numeric formats: E8M0 scales, FP8 E4M3 in 128x128 blocks, FP4 E2M1 in 1x32 groups.

The single definition of the checkpoint formats (official `inference/convert.py`, project docs official-format.md
§8-9), of the power-of-two scale rule of the official `inference/kernel.py` (`fast_round_scale`), and of the
activation round trips of the reference numerics mode (forward-math.md §9 R1-R3). The checkpoint converter and
the quantized modules import from here.

- Scales always multiply (`w = q * s`), whatever the checkpoint calls them (`scale`, `weight_scale_inv`).
- E8M0 bytes are decoded by building the fp32 bit pattern of 2**(byte - 127), never by a numeric cast of the
  byte (ml-explore/mlx-lm#1192). Dequantizers also take any float scale (Base checkpoints) as the multiplier.
- Dequantizers compute in the target dtype when it has fp32's exponent range (bf16, fp32) and the scales are
  E8M0: a value of <= 4 significant bits times a power of two then rounds once, exactly as the fp32 result cast to
  that dtype, with one cast and one multiply and no fp32 copy. Other dtypes (fp16) and float scales go through fp32
  and cast once.
- Scale grids round up: edge blocks (rows or columns not divisible by 128, K not divisible by 32) are partial and
  own a scale. Blocked ops cover a tensor with at most four views (full blocks, right edge, bottom edge, corner),
  so nothing loops over blocks and no scale tensor is expanded to the size of the data.
- Leading dims are batch dims (stacked experts `[E, out, in]`, activations `[B, S, K]`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import torch

from .bit_decode import FP8_BITS_FACTOR, fp4_quad_gather, fp4_quad_usable, fp8_bits, fp8_bits_usable

FP8_MAX = 448.0
FP4_MAX = 6.0
# amax floors of the official kernels: FP8 `act_quant` clamps at 1e-4, FP4 `fp4_quant` at 6 * 2**-126
FP8_MIN_AMAX = 1e-4
FP4_MIN_AMAX = 6 * 2.0**-126
FP8_BLOCK = (128, 128)
FP4_GROUP = 32
# E2M1 codes 0-7; codes 8-15 are the same negated (code 8 is -0)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# `convert.py`'s MAX_OFFSET_BITS: 6 * 2**6 = 384 <= 448, so an FP4 value times 2**6 never overflows E4M3
FP4_TO_FP8_OFFSET_BITS = 6


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """Exact fp32 2**e for an integer tensor: subnormal for e < -126, 0 below -149, inf above 127."""
    e = exponent.to(torch.int32)
    normal = ((e.clamp(-126, 128) + 127) << 23).view(torch.float32)
    subnormal = (1 << (e.clamp(-149, -127) + 149)).view(torch.float32)
    return torch.where(e >= -126, normal, torch.where(e >= -149, subnormal, 0.0))


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """Decode E8M0 scales (`torch.float8_e8m0fnu`, or their raw uint8 bytes) to fp32 2**(byte - 127).

    Byte 0 is 2**-127 (an fp32 subnormal), byte 255 is NaN. Same shape as `scale`.
    """
    if scale.dtype == torch.float8_e8m0fnu:
        scale = scale.view(torch.uint8)
    elif scale.dtype != torch.uint8:
        raise TypeError(f"E8M0 scales must be torch.float8_e8m0fnu or uint8 bytes, got {scale.dtype}")
    # one gather from the 256 decoded values: scales are decoded per expert per call, so this stays two small ops
    table = _E8M0_VALUES.get(scale.device)
    if table is None:
        byte = torch.arange(256, dtype=torch.int32, device=scale.device)
        table = _E8M0_VALUES[scale.device] = _pow2(byte - 127).masked_fill_(byte == 255, float("nan"))
    return torch.index_select(table, 0, scale.reshape(-1).to(torch.int32)).view(scale.shape)


_E8M0_VALUES: dict[torch.device, torch.Tensor] = {}


def float_to_e8m0(x: torch.Tensor) -> torch.Tensor:
    """Encode exact powers of two in [2**-127, 2**127] as `torch.float8_e8m0fnu`; raise ValueError otherwise.

    E8M0 has no sign, zero, mantissa or infinity, so anything else would be silently rounded: refuse it.
    """
    x = x if x.dtype == torch.float64 else x.float()
    mantissa, exponent = torch.frexp(x)
    ok = (mantissa == 0.5) & (exponent >= -126) & (exponent <= 128)
    if not bool(ok.all()):
        bad = x[~ok]
        raise ValueError(
            f"float_to_e8m0: {bad.numel()} of {x.numel()} values are not powers of two in [2**-127, 2**127] "
            f"(first: {bad[0].item()!r}); E8M0 stores only 2**k, so quantize with pow2 scales first"
        )
    return (exponent + 126).to(torch.uint8).view(torch.float8_e8m0fnu)


def _emit_scale(s: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """fp32 pow2 scales from `pow2_scale` as `scale_dtype` (E8M0 without a host sync; NaN/inf/0 -> NaN byte 255)."""
    if scale_dtype == torch.float32:
        return s
    if scale_dtype != torch.float8_e8m0fnu:
        raise ValueError(f"scale_dtype must be torch.float8_e8m0fnu or torch.float32, got {scale_dtype}")
    mantissa, exponent = torch.frexp(s)
    byte = exponent + 126
    invalid = (mantissa != 0.5) | (byte < 0) | (byte > 254)
    return byte.masked_fill_(invalid, 255).to(torch.uint8).view(torch.float8_e8m0fnu)


def _scale_multiplier(scale: torch.Tensor) -> torch.Tensor:
    """fp32 multiplier of a scale tensor: E8M0 (or its uint8 bytes) decoded, any float dtype taken as is."""
    if scale.dtype in (torch.float8_e8m0fnu, torch.uint8):
        return e8m0_to_float(scale)
    if scale.is_floating_point():
        return scale.float()
    raise TypeError(f"scales must be float8_e8m0fnu, uint8 E8M0 bytes or a float dtype, got {scale.dtype}")


def pow2_scale(amax: torch.Tensor, max_value: float, min_amax: float) -> torch.Tensor:
    """Official power-of-two scale 2**ceil(log2(max(amax, min_amax) / max_value)), fp32, same shape as `amax`.

    Computed like `kernel.py`'s `fast_round_scale`: fp32 product with the fp32 reciprocal of `max_value`, then the
    exact ceil(log2) of that fp32 value. For max_value 448 and 6 this equals the exact-division rule for every fp32
    amax (tested at the binade boundaries). NaN / inf amax give NaN / inf scales.
    """
    ratio = amax.float().clamp_min(min_amax) * (1.0 / max_value)
    mantissa, exponent = torch.frexp(ratio)
    # frexp: ratio = m * 2**e with m in [0.5, 1), so ceil(log2(ratio)) is e - 1 exactly when m == 0.5
    scale = _pow2(exponent - (mantissa == 0.5).to(exponent.dtype))
    return torch.where(torch.isfinite(ratio), scale, ratio)


def _block_views(
    x: torch.Tensor, s: torch.Tensor, block: tuple[int, int]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Cover contiguous x `[..., M, N]` by <= 4 views `[..., nr, br, nc, bc]`, each with scales `[..., nr, 1, nc, 1]`.

    s has one entry per (partial) block: `[..., ceil(M / bm), ceil(N / bn)]`. Writes through the views land in x/s.
    """
    rows, cols = x.shape[-2:]
    lead = x.shape[:-2]
    bm, bn = block
    for r0, r1 in ((0, rows // bm * bm), (rows // bm * bm, rows)):
        for c0, c1 in ((0, cols // bn * bn), (cols // bn * bn, cols)):
            if r1 <= r0 or c1 <= c0:
                continue
            br, bc = min(bm, r1 - r0), min(bn, c1 - c0)
            nr, nc = (r1 - r0) // br, (c1 - c0) // bc
            xv = x[..., r0:r1, c0:c1].view(*lead, nr, br, nc, bc)
            yield xv, s[..., r0 // bm : r0 // bm + nr, c0 // bn : c0 // bn + nc].unsqueeze(-1).unsqueeze(-3)


def _block_reduce(x: torch.Tensor, block: tuple[int, int], reduce: Callable, dtype: torch.dtype) -> torch.Tensor:
    """Per-block reduction of x `[..., M, N]` -> `[..., ceil(M / bm), ceil(N / bn)]`."""
    out = x.new_empty(*x.shape[:-2], _cdiv(x.shape[-2], block[0]), _cdiv(x.shape[-1], block[1]), dtype=dtype)
    for xv, ov in _block_views(x, out, block):
        ov.copy_(reduce(xv, (-3, -1), keepdim=True))
    return out


def _absmax(xv: torch.Tensor, dim: tuple[int, int], keepdim: bool) -> torch.Tensor:
    # two reductions instead of xv.abs(): no full-size temporary
    return torch.maximum(xv.amax(dim, keepdim), xv.amin(dim, keepdim).neg()).float()


def _apply_scale(x: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """In place: x `[..., M, N]` *= the scale of its block. Returns x."""
    (rows, cols), (bm, bn) = x.shape[-2:], block
    if x.is_contiguous() and s.is_contiguous() and rows % bm == 0 and cols % bn == 0 and x.numel():
        # whole blocks: the fewest dims the broadcast needs (an elementwise kernel over 2 or 4 dims runs much faster
        # than over the 5+ of `_block_views`; 1 x bn groups need just [groups, bn] x [groups, 1])
        if bm == 1:
            x.view(-1, bn).mul_(s.reshape(-1, 1))
        else:
            x.view(-1, bm, cols // bn, bn).mul_(s.reshape(-1, 1, cols // bn, 1))
        return x
    for xv, sv in _block_views(x, s, block):
        xv.mul_(sv)
    return x


def _check_scale_shape(scale: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    if tuple(scale.shape) != expected:
        raise ValueError(f"{what}: scale shape {tuple(scale.shape)} does not match the data, expected {expected}")


def _quantize_blocks(
    x: torch.Tensor, block: tuple[int, int], max_value: float, min_amax: float, out_dtype: torch.dtype, cast: Callable
) -> tuple[torch.Tensor, torch.Tensor]:
    """x `[..., M, N]` -> (cast(x / s) as out_dtype `[..., M, N]`, fp32 pow2 scales s per block)."""
    x = x.contiguous()
    s = pow2_scale(_block_reduce(x, block, _absmax, torch.float32), max_value, min_amax)
    q = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    for (xv, sv), (qv, _) in zip(_block_views(x, s, block), _block_views(q, s, block)):
        # s is a power of two: x / s is exact, the only rounding is the cast
        qv.copy_(cast(xv / sv))
    return q, s


def _cast_fp8(v: torch.Tensor) -> torch.Tensor:
    # torch's E4M3 cast is not saturating on every device; the official kernel clamps first
    return v.clamp_(-FP8_MAX, FP8_MAX)


def _fp4_lut(device: torch.device) -> torch.Tensor:
    """[16] fp32 value of each E2M1 code."""
    return torch.tensor(FP4_VALUES + tuple(-v for v in FP4_VALUES), dtype=torch.float32, device=device)


def _fp4_pair_lut(device: torch.device) -> torch.Tensor:
    """[256, 2] fp32 values of a packed byte: (low nibble = element 2j, high nibble = element 2j + 1)."""
    byte, lut = torch.arange(256, device=device), _fp4_lut(device)
    return torch.stack((lut[byte & 15], lut[byte >> 4]), dim=-1)


def _packed_bytes(packed: torch.Tensor) -> torch.Tensor:
    if packed.dtype in (torch.int8, torch.uint8, getattr(torch, "float4_e2m1fn_x2", torch.uint8)):
        return packed.view(torch.uint8)
    raise TypeError(f"packed FP4 must be int8, uint8 or float4_e2m1fn_x2, got {packed.dtype}")


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Packed FP4 `[..., K/2]` (int8/uint8) -> uint8 codes `[..., K]`; byte j holds element 2j in its low nibble."""
    p = _packed_bytes(packed)
    return torch.stack((p & 15, p >> 4), dim=-1).flatten(-2)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes `[..., K]` (K even, values 0-15) -> int8 `[..., K/2]`, the checkpoint's `I8` storage."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4: the last dim must be even, got shape {tuple(codes.shape)}")
    if codes.numel() and (codes.is_floating_point() or int(codes.max()) > 15 or int(codes.min()) < 0):
        raise ValueError("pack_fp4: codes must be integers in [0, 15]")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).view(torch.int8)


def fp4_codes_to_float(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """E2M1 codes (uint8, 0-15) -> values; code 8 gives -0.0."""
    return _fp4_lut(codes.device)[codes.to(torch.int32)].to(dtype)


def float_to_fp4_codes(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E2M1 value, ties to even (the code with a clear low bit), as the CUDA cvt.rn does.

    Ties (values): 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4. |x| > 6, inf and NaN
    saturate to 6. The sign bit is kept: -0.0 and negatives that round to zero give code 8 (-0). Returns uint8 codes.
    """
    return _fp4_codes_(x.to(torch.float64 if x.dtype == torch.float64 else torch.float32, copy=True))


def _fp4_codes_(t: torch.Tensor) -> torch.Tensor:
    """`float_to_fp4_codes` of an fp32/fp64 tensor that it may overwrite (saves a full-size temporary)."""
    itype, mant_bits, bias = (torch.int64, 52, 1023) if t.dtype == torch.float64 else (torch.int32, 23, 127)
    sign = torch.signbit(t).to(torch.uint8) << 3
    a = t.abs_().clamp_(max=FP4_MAX)
    # |x| >= 1: E2M1 normals keep one mantissa bit; integer round-to-nearest-even on the IEEE bits leaves
    # (exponent << 1 | mantissa bit), and a carry moves to the next binade by itself
    bits = a.view(itype)
    r = bits >> (mant_bits - 1)
    r &= 1
    r += bits
    r += (1 << (mant_bits - 2)) - 1
    r >>= mant_bits - 1
    r -= 2 * bias - 2
    # NaN's bits land far above 7: saturate
    code = r.clamp_(0, 7).to(torch.uint8)
    del r
    # |x| < 1: subnormal grid 0, 0.5, 1 with ties 0.25 -> 0 and 0.75 -> 1.0
    sub = (a > 0.25).to(torch.uint8) + (a >= 0.75).to(torch.uint8)
    return torch.where(a < 1, sub, code).bitwise_or_(sign)


# Dtypes with fp32's exponent range: products of an FP8 / FP4 value and a power-of-two scale round once in them.
_DIRECT_DTYPES = (torch.float32, torch.bfloat16)


def _work_dtype(dtype: torch.dtype, scale: torch.Tensor) -> torch.dtype:
    """Where to dequantize: `dtype` itself when every product rounds once there (E8M0 scales are powers of two;
    float scales, as Base checkpoints may carry, are not), else fp32."""
    pow2 = scale.dtype in (torch.float8_e8m0fnu, torch.uint8)
    return dtype if pow2 and dtype in _DIRECT_DTYPES else torch.float32


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed FP4 `[..., N, K/2]` with group scales `[..., N, ceil(K/32)]` (1x32 groups along K) -> `[..., N, K]`.
    One table lookup per byte (both nibbles at once) in the working dtype, then one multiply per group."""
    p = _packed_bytes(packed)
    work = _work_dtype(dtype, scale)
    # byte -> both values at once: a table of 256 entries, each the two values' bits in one wide integer
    # (little-endian: the low nibble's value first), gathered with an int32 index and viewed back as values
    if fp4_quad_usable(p, work):
        w = fp4_quad_gather(p, _fp4_pair_lut(p.device))
    elif sys.byteorder == "little":
        wide = {torch.bfloat16: torch.int32, torch.float32: torch.int64}[work]
        pairs = _fp4_pair_lut(p.device).to(work).contiguous().view(wide).reshape(256)
        w = torch.index_select(pairs, 0, p.reshape(-1).to(torch.int32)).view(work).reshape(*p.shape[:-1], -1)
    else:
        w = _fp4_pair_lut(p.device).to(work)[p.to(torch.int64)].flatten(-2)
    s = _scale_multiplier(scale).to(work)
    _check_scale_shape(s, (*w.shape[:-1], _cdiv(w.shape[-1], FP4_GROUP)), "dequantize_fp4")
    _apply_scale(w.unsqueeze(-2), s.unsqueeze(-2), (1, FP4_GROUP))
    return w if work == dtype else w.to(dtype)


def _quantize_fp4_groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x `[..., K]` -> (uint8 codes `[..., K]`, fp32 pow2 scales `[..., ceil(K / group)]`)."""
    codes, s = _quantize_blocks(x.unsqueeze(-2), (1, group), FP4_MAX, FP4_MIN_AMAX, torch.uint8, _fp4_codes_)
    return codes.squeeze(-2), s.squeeze(-2)


def quantize_fp4(
    w: torch.Tensor, group: int = FP4_GROUP, scale_dtype: torch.dtype = torch.float8_e8m0fnu
) -> tuple[torch.Tensor, torch.Tensor]:
    """`[..., N, K]` (K even) -> (packed int8 `[..., N, K/2]`, scales `[..., N, ceil(K/group)]`).

    Scale per group: `pow2_scale(amax, 6, 6 * 2**-126)` (the official `fp4_quant` rule); values round to nearest
    even on the E2M1 grid (`float_to_fp4_codes`).
    """
    codes, s = _quantize_fp4_groups(w, group)
    return pack_fp4(codes), _emit_scale(s, scale_dtype)


def fp4_act_roundtrip(x: torch.Tensor, block: int = FP4_GROUP) -> torch.Tensor:
    """E2M1 quantize-dequantize of activations `[..., K]` in 1 x block groups (forward-math.md §9 R3 without the
    Hadamard rotation; official `fp4_act_quant(x, 32, inplace=True)`). Returns x.dtype."""
    codes, s = _quantize_fp4_groups(x, block)
    y = fp4_codes_to_float(codes)
    return _apply_scale(y.unsqueeze(-2), s.unsqueeze(-2), (1, block)).squeeze(-2).to(x.dtype)


def dequantize_fp8_blocks(
    w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = FP8_BLOCK, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """E4M3 `[..., N, K]` with block scales `[..., ceil(N/128), ceil(K/128)]` -> `[..., N, K]` in `dtype`."""
    if w.dtype != torch.float8_e4m3fn:
        raise TypeError(f"dequantize_fp8_blocks expects torch.float8_e4m3fn data, got {w.dtype}")
    work = _work_dtype(dtype, scale)
    s = _scale_multiplier(scale)
    expected = (*w.shape[:-2], _cdiv(w.shape[-2], block[0]), _cdiv(w.shape[-1], block[1]))
    _check_scale_shape(s, expected, "dequantize_fp8_blocks")
    if fp8_bits_usable(w, s, work):
        # bits moved, not values converted: value * 2**-120, the 2**120 folded into the (exact) scale product
        out, s = fp8_bits(w, work), s * FP8_BITS_FACTOR
    else:
        out = w.to(work, memory_format=torch.contiguous_format)
    _apply_scale(out, s.to(work), block)
    return out if work == dtype else out.to(dtype)


def quantize_fp8_blocks(
    w: torch.Tensor, block: tuple[int, int] = FP8_BLOCK, scale_dtype: torch.dtype = torch.float8_e8m0fnu
) -> tuple[torch.Tensor, torch.Tensor]:
    """`[..., N, K]` -> (E4M3 `[..., N, K]`, scales `[..., ceil(N/128), ceil(K/128)]`), pow2 scale per block
    (`pow2_scale(amax, 448, 1e-4)`), values clamped to +-448 and cast with round-to-nearest-even."""
    q, s = _quantize_blocks(w, block, FP8_MAX, FP8_MIN_AMAX, torch.float8_e4m3fn, _cast_fp8)
    return q, _emit_scale(s, scale_dtype)


def quantize_fp8_act(
    x: torch.Tensor, block: int = 128, scale_dtype: torch.dtype = torch.float8_e8m0fnu
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations `[..., K]` -> (E4M3 `[..., K]`, scales `[..., ceil(K/block)]`): the official `act_quant` with
    `scale_fmt="ue8m0"` (1 x block groups along K, pow2 scales, amax >= 1e-4)."""
    q, s = _quantize_blocks(x.unsqueeze(-2), (1, block), FP8_MAX, FP8_MIN_AMAX, torch.float8_e4m3fn, _cast_fp8)
    return q.squeeze(-2), _emit_scale(s.squeeze(-2), scale_dtype)


def fp8_act_roundtrip(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """E4M3 quantize-dequantize of activations `[..., K]` (forward-math.md §9 R1 with block 128, R2 with block 64;
    official `act_quant(x, block, "ue8m0", inplace=True)`). Returns x.dtype."""
    q, s = _quantize_blocks(x.unsqueeze(-2), (1, block), FP8_MAX, FP8_MIN_AMAX, torch.float8_e4m3fn, _cast_fp8)
    return _apply_scale(q.float(), s, (1, block)).squeeze(-2).to(x.dtype)


def dequantize_weight(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize a stored weight by its storage dtype: E4M3 `[..., N, K]` with block scales (128x128 or 32x32, read
    from the scale grid), or packed FP4 (int8 / uint8) `[..., N, K/2]` with 1x32 group scales. Returns `[..., N, K]`
    in `dtype`."""
    if data.dtype == torch.float8_e4m3fn:
        return dequantize_fp8_blocks(data, scale, block=fp8_block_of(data.shape, scale.shape), dtype=dtype)
    return dequantize_fp4(data, scale, dtype)


# FP8 block shapes in use: 128x128 (DeepSeek-V4), 32x32 (later releases; `weight_formats.FP8_BLOCK32`).
FP8_BLOCKS = (FP8_BLOCK, (32, 32))


def fp8_block_of(shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> tuple[int, int]:
    """The block of an E4M3 weight `[..., N, K]` from its scale grid (blocks with the same grid for this shape
    dequantize identically, so the first match is the answer)."""
    for block in FP8_BLOCKS:
        if tuple(scale_shape[-2:]) == (_cdiv(shape[-2], block[0]), _cdiv(shape[-1], block[1])):
            return block
    raise ValueError(
        f"E4M3 weight {tuple(shape)} with scales {tuple(scale_shape)}: no known block shape ({FP8_BLOCKS}) fits"
    )
