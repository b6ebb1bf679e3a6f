"""Weight formats as values: what a stored weight is, carried with its bytes (issue #13; docs/official-format.md §8).

- `WeightFormat`: one object per storage format: its storage dtype, how many values one stored element holds, the
  block its scales cover (rows x columns of values), and the official rules to quantize / dequantize it (numerics in
  `quant_formats.py`). The block shape is a parameter: FP8 E4M3 with 128x128 blocks (the V4 releases) and with 32x32
  blocks (later DeepSeek releases) are two instances of one class, not two code paths.
- `PackedWeight`: a stored weight `(data, scale, format)` plus the dtype it computes in; indexing its leading dims
  (experts) dequantizes only the selection. This is what the quantized modules hand to the ops.
- `OFFICIAL_FP8_LINEARS`: the one table of which linears the official layout stores in FP8 (module paths inside a
  decoder block / MTP block / DSpark drafter); the converter, the quantized modules and QAT all read it.
- `grouped_linear`: the one forward of the grouped output projection `o_a_proj` (`wo_a`, forward-math.md §5) for
  every storage of its weight.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .quant_formats import (
    FP4_GROUP,
    FP8_BLOCK,
    dequantize_fp4,
    dequantize_fp8_blocks,
    quantize_fp4,
    quantize_fp8_blocks,
)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class WeightFormat:
    """A storage format. `key` names it in configs (`dsv4_quantization`); `block` is the (rows, columns) of values
    one scale covers; `per_element` values share one stored element along the last dim (2 for packed FP4)."""

    key: str
    storage_dtype: torch.dtype
    block: tuple[int, int]
    per_element: int = 1

    def storage_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Stored data shape of a dense `[..., N, K]` weight."""
        if shape[-1] % self.per_element:
            raise ValueError(f"{self.key}: the last dim ({shape[-1]}) must be a multiple of {self.per_element}")
        return (*shape[:-1], shape[-1] // self.per_element)

    def dense_shape(self, storage_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (*storage_shape[:-1], storage_shape[-1] * self.per_element)

    def scale_shape(self, shape: tuple[int, ...], halves: int = 1) -> tuple[int, ...]:
        """Scale grid of a dense `[..., N, K]` weight whose N rows are `halves` separately blocked parts (a fused
        gate/up bank: the official w1 and w3 are separate tensors)."""
        rows = shape[-2] // halves
        return (*shape[:-2], halves * _cdiv(rows, self.block[0]), _cdiv(shape[-1], self.block[1]))

    def quantize(
        self, w: torch.Tensor, scale_dtype: torch.dtype = torch.float8_e8m0fnu, halves: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense `[..., N, K]` -> (data, scale) with the official power-of-two rule, each row half on its own."""
        parts = [self._quantize(h, scale_dtype) for h in w.chunk(halves, dim=-2)]
        return torch.cat([p[0] for p in parts], dim=-2), torch.cat([p[1] for p in parts], dim=-2)

    def _quantize(self, w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.per_element == 2:
            return quantize_fp4(w.float(), scale_dtype=scale_dtype)
        return quantize_fp8_blocks(w.float(), block=self.block, scale_dtype=scale_dtype)

    def dequantize(
        self,
        data: torch.Tensor,
        scale: torch.Tensor,
        dtype: torch.dtype = torch.float32,
        halves: int = 1,
        matrix: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """(data, scale) -> dense `[..., N, K]` in `dtype`, exactly (each half blocked on its own). `matrix`: the
        dense (N, K), for formats whose storage does not determine it (flat padded storage); ignored here."""
        # halves whose rows are whole blocks share the whole tensor's block grid: no split, no concatenation
        if halves > 1 and (data.shape[-2] // halves) % self.block[0]:
            parts = zip(data.chunk(halves, dim=-2), scale.chunk(halves, dim=-2))
            return torch.cat([self._dequantize(d, s, dtype) for d, s in parts], dim=-2)
        return self._dequantize(data, scale, dtype)

    def _dequantize(self, data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.per_element == 2:
            return dequantize_fp4(data, scale, dtype)
        return dequantize_fp8_blocks(data, scale, block=self.block, dtype=dtype)

    def fake_quantize(self, w: torch.Tensor, halves: int = 1) -> torch.Tensor:
        """Quantize-dequantize round trip in fp32 (QAT's forward), same shape as `w`."""
        return self.dequantize(*self.quantize(w, torch.float8_e8m0fnu, halves), torch.float32, halves)

    def describe(self) -> str:
        groups = f"{self.block[0]}x{self.block[1]} " + ("groups" if self.block[0] == 1 else "blocks")
        return f"{self.key} ({groups})"


FP8 = WeightFormat("fp8", torch.float8_e4m3fn, FP8_BLOCK)
# The 32x32-block FP8 of later DeepSeek releases (official-format.md §2, "V4.1 ... FP8 blocks of 32x32").
FP8_BLOCK32 = WeightFormat("fp8_block32", torch.float8_e4m3fn, (32, 32))
FP4 = WeightFormat("fp4", torch.int8, (1, FP4_GROUP), per_element=2)
FORMATS = {f.key: f for f in (FP8, FP8_BLOCK32, FP4)}


def weight_format(key: str) -> WeightFormat:
    """The format named `key` ("fp8", "fp8_block32", "fp4"); raises naming the known ones."""
    if key not in FORMATS:
        raise ValueError(f"unknown weight format {key!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[key]


def format_of(
    storage_dtype: torch.dtype, shape: tuple[int, ...], scale_shape: tuple[int, ...], halves: int = 1
) -> WeightFormat | None:
    """The format that stores `storage_dtype` data of `shape` with a scale grid `scale_shape` (dtype and grid
    identify it; formats with equal grids for this shape dequantize identically), or None."""
    for fmt in FORMATS.values():
        if storage_dtype == fmt.storage_dtype:
            if fmt.scale_shape(fmt.dense_shape(tuple(shape)), halves) == tuple(scale_shape):
                return fmt
    return None


class PackedWeight:
    """A stored weight `[..., N, K]` as the ops see it: `data`, `scale`, `format`, and the `dtype` it computes in.
    `shape` is the dense shape; indexing the leading dims dequantizes only the selection (one expert, or the experts
    gathered for a few tokens). `halves=2` marks a fused gate/up bank whose two row halves were blocked apart."""

    def __init__(self, data, scale, fmt: WeightFormat, dtype: torch.dtype, halves: int = 1, shape=None):
        self.data, self.scale, self.format, self.dtype, self.halves = data, scale, fmt, dtype, halves
        # `shape`: the dense shape, for formats whose storage does not determine it (bitsandbytes' flat blocks)
        self.shape = torch.Size(shape if shape is not None else fmt.dense_shape(tuple(data.shape)))

    def __getitem__(self, index) -> torch.Tensor:
        return self.format.dequantize(self.data[index], self.scale[index], self.dtype, self.halves, self.shape[-2:])

    def dequantize(self) -> torch.Tensor:
        return self[...]


# Linears the official checkpoints store in FP8, as module paths inside a decoder layer / MTP block (attention,
# indexer, shared experts, MTP projections) or the DSpark drafter (official-format.md §6.2-6.3, dspark.md §2.3).
# `o_a_proj` is FP8 on disk; the reference runs it with a dequantized weight and no activation quantization.
OFFICIAL_FP8_LINEARS = (
    "self_attn.q_a_proj",
    "self_attn.q_b_proj",
    "self_attn.kv_proj",
    "self_attn.o_a_proj",
    "self_attn.o_b_proj",
    "self_attn.compressor.indexer.q_b_proj",
    "mlp.shared_experts.gate_proj",
    "mlp.shared_experts.up_proj",
    "mlp.shared_experts.down_proj",
    "e_proj",
    "h_proj",
    "main_proj",
)
# Full module names (`model.layers.3.self_attn.q_a_proj`, `model.mtp.0.e_proj`, `model.dspark.main_proj`, ...).
OFFICIAL_FP8_NAME = re.compile(
    r"(^|\.)(layers|mtp|dspark\.layers)\.\d+\.(" + "|".join(map(re.escape, OFFICIAL_FP8_LINEARS[:9])) + r")$"
    r"|(^|\.)mtp\.\d+\.(e_proj|h_proj)$|(^|\.)dspark\.main_proj$"
)


def is_official_fp8_linear(module_name: str) -> bool:
    """Whether the module at `module_name` (a `named_modules()` name) is stored in FP8 by the official layout."""
    return OFFICIAL_FP8_NAME.search(module_name) is not None


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, n_groups: int) -> torch.Tensor:
    """The grouped output projection: x `[..., g, H * D / g]`, weight `[g * d_g, H * D / g]` (dense, in x's dtype)
    -> `[..., g * d_g]`: each group's slice of the attention output through its own `d_g` rows."""
    w = weight.view(n_groups, -1, weight.shape[-1])
    return torch.einsum("...gi,goi->...go", x, w).flatten(-2)
