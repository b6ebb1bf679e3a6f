"""Exact FP8 / FP4 decoding by moving bits instead of converting values (docs/official-format.md §1-2).

PyTorch's CPU `float8_e4m3fn -> bfloat16` cast converts element by element (about 3x slower than the integer ops
below on a 2-vCPU Xeon), and gathering two bf16 values per FP4 byte costs one 4-byte gather per byte. Both decoders
here give bit-identical results to the plain path (tested over every code and scale in
`tests/quantization/test_bit_decode.py`):

- E4M3 -> bf16 / fp32: the sign, exponent and mantissa fields move into the wider format's fields with one shift and
  one mask, which reads as `value * 2**-120` (E4M3 subnormals land on bf16 / fp32 subnormals, whose exponent field is
  0 too); the caller folds `2**120` into the block scale, so each output still rounds once (value x scale).
- FP4 E2M1 pairs of bytes -> four values with one 8-byte gather from a 65536-entry table (512 KiB, cache resident).

The FP8 path does not map the two NaN codes (0x7f, 0xff) and multiplies subnormal intermediates, so
`fp8_bits_usable` sends NaN-carrying weights, flush-denormal mode and compiled graphs to the plain cast.
"""

from __future__ import annotations

import sys

import torch

# E4M3 bits shifted into bf16 / fp32 fields read as value * 2**-120 (exponent bias 127 instead of 7).
FP8_BITS_FACTOR = 2.0**120
# after the sign-extending widening and the shift: keep the sign bit and the 7 exponent/mantissa bits
_MASKS = {
    torch.bfloat16: (torch.int16, 4, 0x87F0 - (1 << 16)),
    torch.float32: (torch.int32, 20, 0x87F00000 - (1 << 32)),
}
# largest scale whose product with 2**120 stays finite in bf16 / fp32 (max finite 2**128 * (1 - eps))
_MAX_SCALE = 2.0**7


def _denormals_flushed() -> bool:
    """Whether `torch.set_flush_denormal(True)` is on (subnormal fp32 inputs then read as zero)."""
    return bool(torch.tensor(2.0**-130, dtype=torch.float32).mul(1.0).item() == 0.0)


def fp8_bits_usable(w: torch.Tensor, scale: torch.Tensor, work: torch.dtype) -> bool:
    """Whether `fp8_bits` + a `2**120`-folded scale reproduces the cast for E4M3 `w` with fp32 multipliers `scale`:
    CPU eager, bf16 / fp32 output, no NaN code in `w`, every |scale| <= 2**7, denormals not flushed."""
    if work not in _MASKS or w.device.type != "cpu" or torch.compiler.is_compiling() or not w.numel():
        return False
    if not bool(scale.abs().amax() <= _MAX_SCALE):  # also False for NaN scales
        return False
    # NaN codes: 0x7f is the int8 maximum, 0xff the uint8 maximum (two 1-byte reductions, no temporary)
    if int(w.view(torch.int8).max()) == 127 or int(w.view(torch.uint8).max()) == 255:
        return False
    return not _denormals_flushed()


def fp8_bits(w: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """E4M3 `w` (no NaN code) -> contiguous `work` tensor (bf16 / fp32) of `value * 2**-120`, same shape, exactly."""
    wide, shift, mask = _MASKS[work]
    x = w.view(torch.int8).to(
        wide, memory_format=torch.contiguous_format
    )  # sign-extends: the sign reaches the top bit
    return x.bitwise_left_shift_(shift).bitwise_and_(mask).view(work)


_QUAD_TABLES: dict[torch.device, torch.Tensor] = {}


def _fp4_quad_table(pair_lut: torch.Tensor) -> torch.Tensor:
    """[65536] int64: the four bf16 values of each 2-byte pair, bits packed little-endian (first byte's first)."""
    table = _QUAD_TABLES.get(pair_lut.device)
    if table is None:
        pairs = pair_lut.to(torch.bfloat16).contiguous().view(torch.int32).reshape(256).to(torch.int64) & 0xFFFFFFFF
        code = torch.arange(65536, device=pair_lut.device)
        table = _QUAD_TABLES[pair_lut.device] = pairs[code & 255] | (pairs[code >> 8] << 32)
    return table


def fp4_quad_usable(packed: torch.Tensor, work: torch.dtype) -> bool:
    """Whether `fp4_quad_gather` applies: bf16 output, little-endian host, an even number of bytes per row."""
    return work == torch.bfloat16 and sys.byteorder == "little" and packed.shape[-1] % 2 == 0


def fp4_quad_gather(packed: torch.Tensor, pair_lut: torch.Tensor) -> torch.Tensor:
    """Packed FP4 bytes `[..., K/2]` (uint8, K/2 even) -> bf16 `[..., K]`, two bytes (four values) per gather.
    `pair_lut`: `[256, 2]` values of (low nibble, high nibble) of each byte, always the E2M1 table (cached once per
    device)."""
    index = packed.contiguous().view(torch.uint16).reshape(-1).to(torch.int32)
    out = torch.index_select(_fp4_quad_table(pair_lut), 0, index).view(torch.bfloat16)
    return out.reshape(*packed.shape[:-1], packed.shape[-1] * 2)
