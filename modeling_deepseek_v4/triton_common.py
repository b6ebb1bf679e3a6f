"""Shared plumbing of the Triton kernel files (`triton_*.py`, issue #15; design.md "Backend dispatch").

Triton is optional: this file imports without it (`triton` / `tl` are then None and no kernel file is loaded, see
`ops_backends.py`). A kernel runs on CUDA tensors, or on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`,
read when the kernel files are imported: `triton.jit` picks the interpreter at decoration time). Everything else
goes to the reference backend: `supports` predicates built from `on_kernel_device` say so per call.

Interpreter traps met in Triton 3.9 (the kernels work around them; the GPU path is unaffected): a 16-bit `tl.dot`
returns garbage (upcast both sides to fp32 under `interpreting()`: bf16 products are exact in fp32), fp32 -> bf16
`.to()` truncates instead of rounding to nearest even (round with integer ops where bits matter), and FP8 casts are
wrong (FP8 / FP4 numerics are tested on GPU, or decoded with integer ops).
"""

from __future__ import annotations

import os

import torch

try:  # optional dependency
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None


def interpreting() -> bool:
    """Triton's CPU interpreter is on (`TRITON_INTERPRET=1`): kernels take CPU tensors, slowly (tiny shapes)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def on_kernel_device(*tensors: torch.Tensor | None) -> bool:
    """Every given tensor lives where a kernel can read it: CUDA, or the CPU under the interpreter. None is skipped."""
    if triton is None:
        return False
    wanted = "cpu" if interpreting() else "cuda"
    return all(t is None or (isinstance(t, torch.Tensor) and t.device.type == wanted) for t in tensors)


def block_size(n: int, minimum: int = 16) -> int:
    """The power of two >= max(n, minimum) that a `tl.constexpr` block dimension needs (`tl.dot` wants >= 16)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def float_dtypes_ok(*tensors: torch.Tensor | None) -> bool:
    """Inputs are fp32 / bf16 / fp16 (the kernels compute in fp32 and do not do float64 gradcheck inputs)."""
    ok = (torch.float32, torch.bfloat16, torch.float16)
    return all(t is None or t.dtype in ok for t in tensors)
