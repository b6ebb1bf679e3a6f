"""Lossless FP4 -> FP8 transcoding of expert weights (docs/official-format.md §9; official `convert.py
--expert-dtype fp8`): packed E2M1 with 1x32 power-of-two group scales to E4M3 with 128x128 block scales, with a
per-block report of what is not exact. Numerics building blocks from `quant_formats.py`."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .quant_formats import (
    FP4_GROUP,
    FP4_TO_FP8_OFFSET_BITS,
    FP8_BLOCK,
    _apply_scale,
    _block_reduce,
    _block_views,
    _cdiv,
    _check_scale_shape,
    _fp4_pair_lut,
    _packed_bytes,
    _pow2,
    float_to_e8m0,
)


class TranscodeIssue(NamedTuple):
    """A 128x128 block whose FP4 -> FP8 transcoding is not clean."""

    block: tuple[int, ...]  # (*leading indices, block row, block col)
    max_exponent_diff: int  # d = e_max - e_min over the sub-groups holding a nonzero code
    exact: bool  # whether the E4M3 block still dequantizes to exactly the FP4 values
    scale_underflow: bool  # e_max - 6 < -127: the block scale was clamped to 2**-127


def fp4_to_fp8_blocks(
    packed: torch.Tensor, scale: torch.Tensor, strict: bool = False, name: str = "tensor"
) -> tuple[torch.Tensor, torch.Tensor, list[TranscodeIssue]]:
    """Transcode FP4 `[..., N, K/2]` + pow2 group scales `[..., N, ceil(K/32)]` to E4M3 `[..., N, K]` + E8M0 block
    scales `[..., ceil(N/128), ceil(K/128)]` (official-format.md §9; `convert.py --expert-dtype fp8`).

    Per block: e_max = the largest sub-scale exponent among sub-groups holding a nonzero code (all-zero sub-groups
    do not count; `convert.py` takes the max over all of them), block scale 2**(e_max - 6), element
    LUT[code] * 2**(e_sub - e_max + 6). All-zero blocks take the max over all their sub-scales. Exactness is checked
    per element by casting back (the pre-cast fp32 values are exact and both scales are powers of two, so this is
    the same as comparing the two dequantizations); d <= 14 guarantees it, d >= 15 is exact when the codes allow.

    Returns (e4m3, e8m0 block scales, issues): one `TranscodeIssue` per inexact or scale-underflow block, empty if
    the result is lossless. strict=True raises ValueError naming the blocks instead of returning issues.
    """
    p = _packed_bytes(packed).contiguous()
    if p.dim() < 2:
        raise ValueError(f"fp4_to_fp8_blocks: {name} must be at least 2-D, got shape {tuple(p.shape)}")
    if scale.dtype not in (torch.float8_e8m0fnu, torch.uint8):
        scale = float_to_e8m0(scale)
    e_sub = scale.view(torch.uint8)
    rows, cols = p.shape[-2], 2 * p.shape[-1]
    _check_scale_shape(e_sub, (*p.shape[:-1], _cdiv(cols, FP4_GROUP)), f"fp4_to_fp8_blocks({name})")
    if bool((e_sub == 255).any()):
        raise ValueError(f"fp4_to_fp8_blocks: {name} has NaN (0xFF) E8M0 scales")

    # sub-groups holding a nonzero magnitude: 0x77 keeps both nibbles' magnitude bits (code 8 is -0)
    nonzero = torch.empty(e_sub.shape, dtype=torch.bool, device=p.device)
    for pv, nv in _block_views(p, nonzero, (1, FP4_GROUP // 2)):
        nv.copy_(torch.any((pv & 0x77) != 0, dim=(-3, -1), keepdim=True))

    e = e_sub.to(torch.int16)
    sub_block = (FP8_BLOCK[0], FP8_BLOCK[1] // FP4_GROUP)
    e_max_nz = _block_reduce(e.masked_fill(~nonzero, -1), sub_block, torch.amax, torch.int16)
    e_min_nz = _block_reduce(e.masked_fill(~nonzero, 255), sub_block, torch.amin, torch.int16)
    has_nz = e_max_nz >= 0
    e_max = torch.where(has_nz, e_max_nz, _block_reduce(e, sub_block, torch.amax, torch.int16))
    d = torch.where(has_nz, e_max_nz - e_min_nz, 0)
    new = e_max - FP4_TO_FP8_OFFSET_BITS
    underflow = has_nz & (new < 0)
    new.clamp_(min=0)

    # per sub-group shift e_sub - e_new; zero sub-groups above e_max are capped so their multiplier stays finite
    new_per_group = new.repeat_interleave(sub_block[0], dim=-2)[..., :rows, :]
    new_per_group = new_per_group.repeat_interleave(sub_block[1], dim=-1)[..., : e.shape[-1]]
    shift = (e - new_per_group).clamp_(max=FP4_TO_FP8_OFFSET_BITS)
    vals = _fp4_pair_lut(p.device)[p.to(torch.int32)].flatten(-2)
    _apply_scale(vals, _pow2(shift), (1, FP4_GROUP))
    fp8 = vals.to(torch.float8_e4m3fn)

    # vals is exact in fp32 down to shift -140 (0.5 * 2**-140 is still an fp32 subnormal); below that even
    # 6 * 2**shift is far under E4M3's 2**-9, so any nonzero sub-group there is inexact on its own
    mismatch = fp8.float() != vals
    inexact = _block_reduce(mismatch, FP8_BLOCK, torch.any, torch.bool)
    inexact |= _block_reduce(nonzero & (shift < -140), sub_block, torch.any, torch.bool)

    flagged = inexact | underflow
    issues = [
        TranscodeIssue(tuple(idx), diff, not bad, under)
        for idx, diff, bad, under in zip(
            flagged.nonzero().tolist(), d[flagged].tolist(), inexact[flagged].tolist(), underflow[flagged].tolist()
        )
    ]
    if strict and issues:
        shown = ", ".join(
            f"{i.block} (d={i.max_exponent_diff}{', scale underflow' if i.scale_underflow else ''})"
            for i in issues[:8]
        )
        raise ValueError(
            f"FP4 -> FP8 transcoding of {name} is not lossless in {len(issues)} of {flagged.numel()} 128x128 blocks: "
            f"{shown}{' ...' if len(issues) > 8 else ''}; keep this tensor in BF16 or FP4"
        )
    return fp8, new.to(torch.uint8).view(torch.float8_e8m0fnu), issues
