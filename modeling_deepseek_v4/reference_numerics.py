"""Opt-in "reference numerics": the official forward's simulated training-time quantization (forward-math.md §9;
official `inference/model.py`: `linear` -> `act_quant`, `Attention.forward`, `Compressor.forward`,
`Indexer.forward`; tech report §2.3.4, §3.4).

- R1: FP8 round trip of the input (1x128 blocks along K, pow2 scales) of every linear the checkpoint stores in
  FP8 / FP4, except `o_a_proj` (the reference runs `wo_a` in bf16), and of x and h inside the routed experts.
  Compressor projections, the indexer's `weights_proj`, routers, the head and mHC are left alone, as there.
- R2: FP8 round trip (1x64 blocks) of the non-RoPE dims of the window KV and of the main compressor's entries.
- R3: indexer queries (after RoPE) and indexer-compressor entries: normalized Walsh-Hadamard rotation over the
  `index_head_dim` dims, then an E2M1 round trip in 1x32 groups.
- R4: index scores rounded to bf16 before the top-k. (R5, fp32 logits, is always on.)

Off by default (`config.reference_numerics`). The rotation cancels in exact q . k; with the FP4 rounding it is what
the official indexer computes. Hooks and flags are reinstalled by `set_reference_numerics`, so call it again after
swapping modules (the quantization tools do).
"""

from __future__ import annotations

import torch
from torch import nn

from .quant_formats import fp4_act_roundtrip, fp8_act_roundtrip
from .weight_formats import is_official_fp8_linear


def _is_r1_linear(name: str) -> bool:
    """Linears whose input the reference FP8-quantizes: the official FP8 linears (`OFFICIAL_FP8_LINEARS`, the one
    table) except `o_a_proj`, which the reference runs as `wo_a` in bf16."""
    return is_official_fp8_linear(name) and not name.endswith("o_a_proj")


_HOOK = "_dsv4_r1_hook"


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """Normalized Walsh-Hadamard transform over the last dim (a power of two), `x [..., n] -> [..., n]` in fp32
    butterflies, returned in x.dtype. Orthogonal and its own inverse: H H x = x."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"hadamard_transform needs a power-of-two last dim, got {n}")
    y = x.float().contiguous()
    h = 1
    while h < n:
        y = y.view(*x.shape[:-1], n // (2 * h), 2, h)
        y = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    return (y.reshape(x.shape) * n**-0.5).to(x.dtype)


def kv_fp8_roundtrip(kv: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """R2: `kv [..., D]` with dims `[0, D - rope_dim)` FP8 round-tripped in 1x64 blocks; RoPE dims unchanged."""
    nope = kv[..., : kv.shape[-1] - rope_dim]
    return torch.cat([fp8_act_roundtrip(nope, 64), kv[..., nope.shape[-1] :]], dim=-1)


def indexer_fp4_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """R3: Hadamard rotation then E2M1 round trip in 1x32 groups of indexer queries / keys `[..., c]`."""
    return fp4_act_roundtrip(hadamard_transform(x))


def _r1_pre_hook(module: nn.Module, args: tuple) -> tuple:
    return (fp8_act_roundtrip(args[0]), *args[1:])


def carry_numerics(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give a module swapped in for `old` (quantized, QAT, bitsandbytes, dense again) `old`'s numerics switch; the
    one attribute every module with reference numerics carries. Returns `new`."""
    if hasattr(old, "reference_numerics"):
        new.reference_numerics = old.reference_numerics
    return new


def set_reference_numerics(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Turn reference numerics R1-R4 on or off for every layer of `model` (idempotent); records it in the config."""
    for module in model.modules():
        handle = module.__dict__.pop(_HOOK, None)
        if handle is not None:
            handle.remove()
    for module in model.modules():
        if hasattr(module, "reference_numerics"):
            # attention (R2), compressors (R2 / R3), indexer (R3 / R4), routed experts of every storage (R1)
            module.reference_numerics = enabled
    for name, module in model.named_modules() if enabled else ():
        if _is_r1_linear(name) and _HOOK not in module.__dict__:
            module.__dict__[_HOOK] = module.register_forward_pre_hook(_r1_pre_hook)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "reference_numerics"):
        config.reference_numerics = enabled
    return model
