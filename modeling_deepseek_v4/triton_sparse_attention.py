"""Triton backend of op `sparse_attention` (issue #15): sliding window + compressed entries + per-head sink, MQA.

Implements the reference `ops_reference.sparse_attention` (forward-math.md §3.3-3.4; the official
`inference/kernel.py` sparse attention and FlashMLA's sparse kernels in spirit): query t of row b sees the window
band `0 <= t - pos < W` over `window_kv` (P cached keys then the S new ones; negative positions masked), then either
the HCA causal prefix of `compressed_kv` (entry s visible when s < (t + 1) // ratio) or the CSA entries listed in
`topk_idx` (-1 = none); one softmax with the sink logit in the denominator only; K = V shared by all heads (MQA).

Design (flash-attention style, one kernel per direction):
- A program owns one batch row, `BLOCK_Q` consecutive queries and `BLOCK_H` heads: the `BLOCK_Q x BLOCK_H`
  (query, head) pairs form the M dimension of `tl.dot`, so each key tile is loaded once for all those heads (MQA).
  Row m of a tile is query `i0 + m // BLOCK_H`, head `h0 + m % BLOCK_H`.
- Online softmax in base 2 (`exp2`, logits times `scale * log2(e)`; the scale is applied to the fp32 logits, the
  same product as scaling q first). The sink initialises the running max and denominator (`m = sink * log2e`,
  `l = 1`), so a query with no visible key gives 0, never NaN.
- Keys are walked in tiles of `BLOCK_N` columns: the band `[max(P - start, i0 + P - W + 1), i_last + P]`; HCA: the
  entries `[0, (start + i_last + 1) // ratio)` under each query's causal limit; CSA: the listed entries of the
  block's queries, `BLOCK_N // BLOCK_Q` per query per tile, under a block-diagonal mask (a query sees only its own
  gathers). With 64 heads BLOCK_Q = 1, so the CSA gathers are per query and no column is wasted.
- Loop bounds come from `start` loaded inside the kernel: no host sync on tensor values, so `static_shapes` runs
  the same code (it only changes how the reference slices), and `chunk` (a memory knob of the reference) is unused.
- bf16 / fp16: `tl.dot` on the input dtype with fp32 accumulation, P cast to the KV dtype for P.V (as the official
  kernel, forward-math.md §3.4); fp32: `input_precision="ieee"` so GPU results keep fp32 parity (not tf32).
- Backward recomputes P from the saved base-2 logsumexp: dq in registers; d(KV) = scale * dS^T q + P^T dO per key
  tile, added with fp32 atomics (the shared MQA keys are reached by several query blocks and the CSA gathers are
  scattered); d(sink)_h = -sum p_sink * (dO . O), stored per (row, query, head) and summed by torch afterwards.
  HCA entries are shared by every later query block, so for long prefill their atomics contend: a separate
  key-major pass would avoid that (not implemented).
- Decode (S small, long cache) runs the same kernel with BLOCK_Q covering S; the KV range of a (row, head group) is
  walked by one program. A split-K (flash-decoding) combine over programs is not implemented.

Block sizes (H200): BLOCK_D = block_size(D) (512 in V4), BLOCK_H = min(block_size(H), 64), BLOCK_Q fills M to 64
(so one query per program with 64 heads), BLOCK_N = 32 keys for D >= 256 (a 64 x 512 fp32 accumulator plus a
32 x 512 bf16 key tile fit with 8 warps), 64 below. The backward holds q, dO and dq: M = 32 for D >= 256. fp32
inputs with D >= 256: M = 32, BLOCK_N = 16. Checked by compiling for sm_90 (not yet run on a GPU): with D = 512 and
64 heads the shared memory is 97 / 113 KB (bf16 forward / backward) and 130 / 196 KB (fp32), under H200's 227 KB.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .triton_common import block_size, float_dtypes_ok, interpreting, on_kernel_device, tl, triton

LOG2E = 1.4426950408889634
MODE_WINDOW, MODE_HCA, MODE_CSA = 0, 1, 2
MAX_HEAD_DIM = 512


@dataclass(frozen=True)
class Blocks:
    """Tile sizes of one launch: heads and queries per program (M = block_q * block_h), key columns per tile."""

    block_h: int
    block_q: int
    block_n: int
    block_d: int
    num_warps: int


def choose_blocks(s: int, h: int, d: int, backward: bool, itemsize: int = 2) -> Blocks:
    """Tile sizes for `[B, S, H, D]` queries of `itemsize`-byte elements (module docstring); tests replace it to
    force several tiles. fp32 with D >= 256 halves M and the key tile (shared memory stays under 227 KB on H200:
    the D = 512 fp32 tiles at the bf16 sizes would need 264 KB)."""
    block_d = block_size(d)
    wide = block_d >= 256
    target_m = 32 if wide and (backward or itemsize > 2) else 64
    block_h = min(block_size(h, 1), target_m)
    # M >= 16 for tl.dot; no more queries than S (decode: S = 1 or 2).
    block_q = max(16 // block_h, min(target_m // block_h, block_size(s, 1)), 1)
    block_n = (16 if itemsize > 2 else 32) if wide else 64
    return Blocks(block_h, block_q, max(block_n, block_q), block_d, 8 if wide else 4)


# ------------------------------------------------------------------------------------------------ key tile helpers
# Each returns the element offsets of the tile's key rows `[N]`, which columns may be loaded `[N]`, and which
# (row, column) logits are visible `[M, N]`.


@triton.jit
def _band_tile(j0, q_idx, row_ok, P, S, W, lo, D, BLOCK_N: tl.constexpr):
    j = j0 + tl.arange(0, BLOCK_N)
    col_ok = (j >= lo) & (j < P + S)
    dist = q_idx[:, None] + P - j[None, :]
    valid = (dist >= 0) & (dist < W) & col_ok[None, :] & row_ok[:, None]
    return j.to(tl.int64) * D, col_ok, valid


@triton.jit
def _hca_tile(e0, limit, row_ok, N_COMP, D, BLOCK_N: tl.constexpr):
    e = e0 + tl.arange(0, BLOCK_N)
    col_ok = e < N_COMP
    valid = (e[None, :] < limit[:, None]) & col_ok[None, :] & row_ok[:, None]
    return e.to(tl.int64) * D, col_ok, valid


@triton.jit
def _csa_tile(idx_base, k0, i0, q_idx, row_ok, S, TOPK, D, BLOCK_N: tl.constexpr, KC: tl.constexpr):
    c = tl.arange(0, BLOCK_N)
    iq = i0 + c // KC  # the query this column belongs to: KC gathered entries per query
    kk = k0 + c % KC
    e = tl.load(idx_base + iq.to(tl.int64) * TOPK + kk, mask=(iq < S) & (kk < TOPK), other=-1)
    col_ok = e >= 0
    valid = col_ok[None, :] & (q_idx[:, None] == iq[None, :]) & row_ok[:, None]
    return tl.maximum(e, 0).to(tl.int64) * D, col_ok, valid


@triton.jit
def _load_keys(base, offs, col_ok, d, d_ok):
    return tl.load(base + offs[:, None] + d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """`a @ b` with fp32 accumulation. PREC "upcast": operands to fp32 first, for Triton 3.9's interpreter whose
    bf16 / fp16 `tl.dot` returns garbage; the operands are already rounded to bf16, so the products are the same."""
    if PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _dot_p(a, b, PREC: tl.constexpr):
    """`a @ b` for fp32 probabilities / score gradients `a` and keys or queries `b`: `a` is cast to b's dtype (bf16
    P.V as the official kernel, forward-math.md §3.4; measured within the parity tolerance: forward error about
    0.6-0.8 of the allowed bound under the interpreter, which truncates that cast where a GPU rounds)."""
    if PREC == "ieee":
        return tl.dot(a, b, input_precision="ieee")
    else:
        return _dot(a.to(b.dtype), b, PREC)


@triton.jit
def _fwd_step(q, base, offs, col_ok, valid, d, d_ok, acc, m_i, l_i, qk_scale, PREC: tl.constexpr):
    """One online-softmax step over a key tile (K = V)."""
    kv = _load_keys(base, offs, col_ok, d, d_ok)
    s = _dot(q, tl.trans(kv), PREC) * qk_scale
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot_p(p, kv, PREC)
    return acc, m_new, l_i


@triton.jit
def _bwd_step(q, do, lse, delta, base, dbase, offs, col_ok, valid, d, d_ok, dq, qk_scale, scale, PREC: tl.constexpr):
    """Gradients of one key tile: returns dq (unscaled), adds d(KV) of the tile's keys with atomics."""
    kv = _load_keys(base, offs, col_ok, d, d_ok)
    s = _dot(q, tl.trans(kv), PREC) * qk_scale
    p = tl.exp2(tl.where(valid, s, float("-inf")) - lse[:, None])
    dp = _dot(do, tl.trans(kv), PREC)
    ds = p * (dp - delta[:, None])
    dq += _dot_p(ds, kv, PREC)
    dkv = _dot_p(tl.trans(ds), q, PREC) * scale
    dkv += _dot_p(tl.trans(p), do, PREC)
    tl.atomic_add(dbase + offs[:, None] + d[None, :], dkv, mask=col_ok[:, None] & d_ok[None, :])
    return dq


@triton.jit
def _tile_rows(S, H, D, BLOCK_H: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (query, head) rows: first query, query / head per row, row mask, q offsets, d lanes."""
    b = tl.program_id(1)
    n_hg = tl.cdiv(H, BLOCK_H)
    i0 = (tl.program_id(0) // n_hg) * BLOCK_Q
    m = tl.arange(0, BLOCK_Q * BLOCK_H)
    q_idx = i0 + m // BLOCK_H
    h_idx = (tl.program_id(0) % n_hg) * BLOCK_H + m % BLOCK_H
    row_ok = (q_idx < S) & (h_idx < H)
    lse_offs = (b.to(tl.int64) * S + q_idx) * H + h_idx
    d = tl.arange(0, BLOCK_D)
    return b, i0, q_idx, h_idx, row_ok, lse_offs, lse_offs * D, d, d < D


# --------------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _fwd_kernel(
    q_ptr, kv_ptr, comp_ptr, idx_ptr, start_ptr, sink_ptr, out_ptr, lse_ptr,
    S, H, D, P, W, N_COMP, TOPK, ratio, qk_scale,
    MODE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    b, i0, q_idx, h_idx, row_ok, lse_offs, q_offs, d, d_ok = _tile_rows(S, H, D, BLOCK_H, BLOCK_Q, BLOCK_D)
    io_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + q_offs[:, None] + d[None, :], mask=io_mask, other=0.0)
    start_b = tl.load(start_ptr + b)
    m_i = tl.load(sink_ptr + h_idx, mask=h_idx < H, other=0.0).to(tl.float32) * 1.4426950408889634
    l_i = tl.full([BLOCK_Q * BLOCK_H], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_Q * BLOCK_H, BLOCK_D], tl.float32)
    i_last = tl.minimum(i0 + BLOCK_Q, S) - 1
    b64 = b.to(tl.int64)

    kv_base = kv_ptr + b64 * (P + S) * D
    lo = tl.maximum(P - start_b, 0)  # keys below lo sit at negative positions
    for j0 in range(tl.maximum(lo, i0 + P - W + 1), i_last + P + 1, BLOCK_N):
        offs, col_ok, valid = _band_tile(j0, q_idx, row_ok, P, S, W, lo, D, BLOCK_N)
        acc, m_i, l_i = _fwd_step(q, kv_base, offs, col_ok, valid, d, d_ok, acc, m_i, l_i, qk_scale, PREC)

    comp_base = comp_ptr + b64 * N_COMP * D
    if MODE == 1:
        limit = tl.minimum((start_b + q_idx + 1) // ratio, N_COMP)
        for e0 in range(0, tl.minimum((start_b + i_last + 1) // ratio, N_COMP), BLOCK_N):
            offs, col_ok, valid = _hca_tile(e0, limit, row_ok, N_COMP, D, BLOCK_N)
            acc, m_i, l_i = _fwd_step(q, comp_base, offs, col_ok, valid, d, d_ok, acc, m_i, l_i, qk_scale, PREC)
    if MODE == 2:
        idx_base = idx_ptr + b64 * S * TOPK
        for k0 in range(0, TOPK, BLOCK_N // BLOCK_Q):
            offs, col_ok, valid = _csa_tile(idx_base, k0, i0, q_idx, row_ok, S, TOPK, D, BLOCK_N, BLOCK_N // BLOCK_Q)
            acc, m_i, l_i = _fwd_step(q, comp_base, offs, col_ok, valid, d, d_ok, acc, m_i, l_i, qk_scale, PREC)

    out = acc / l_i[:, None]
    tl.store(out_ptr + q_offs[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty), mask=io_mask)
    tl.store(lse_ptr + lse_offs, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _bwd_kernel(
    q_ptr, kv_ptr, comp_ptr, idx_ptr, start_ptr, sink_ptr, out_ptr, lse_ptr, do_ptr,
    dq_ptr, dkv_ptr, dcomp_ptr, dsink_ptr,
    S, H, D, P, W, N_COMP, TOPK, ratio, qk_scale, scale,
    MODE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    b, i0, q_idx, h_idx, row_ok, lse_offs, q_offs, d, d_ok = _tile_rows(S, H, D, BLOCK_H, BLOCK_Q, BLOCK_D)
    io_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + q_offs[:, None] + d[None, :], mask=io_mask, other=0.0)
    do = tl.load(do_ptr + q_offs[:, None] + d[None, :], mask=io_mask, other=0.0)
    o = tl.load(out_ptr + q_offs[:, None] + d[None, :], mask=io_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse = tl.load(lse_ptr + lse_offs, mask=row_ok, other=0.0)
    sink = tl.load(sink_ptr + h_idx, mask=h_idx < H, other=0.0).to(tl.float32) * 1.4426950408889634
    tl.store(dsink_ptr + lse_offs, -tl.exp2(sink - lse) * delta, mask=row_ok)
    start_b = tl.load(start_ptr + b)
    dq = tl.zeros([BLOCK_Q * BLOCK_H, BLOCK_D], tl.float32)
    i_last = tl.minimum(i0 + BLOCK_Q, S) - 1
    b64 = b.to(tl.int64)

    kv_base = kv_ptr + b64 * (P + S) * D
    dkv_base = dkv_ptr + b64 * (P + S) * D
    lo = tl.maximum(P - start_b, 0)
    for j0 in range(tl.maximum(lo, i0 + P - W + 1), i_last + P + 1, BLOCK_N):
        offs, col_ok, valid = _band_tile(j0, q_idx, row_ok, P, S, W, lo, D, BLOCK_N)
        dq = _bwd_step(q, do, lse, delta, kv_base, dkv_base, offs, col_ok, valid, d, d_ok, dq, qk_scale, scale, PREC)

    comp_base = comp_ptr + b64 * N_COMP * D
    dcomp_base = dcomp_ptr + b64 * N_COMP * D
    if MODE == 1:
        limit = tl.minimum((start_b + q_idx + 1) // ratio, N_COMP)
        for e0 in range(0, tl.minimum((start_b + i_last + 1) // ratio, N_COMP), BLOCK_N):
            offs, col_ok, valid = _hca_tile(e0, limit, row_ok, N_COMP, D, BLOCK_N)
            dq = _bwd_step(
                q, do, lse, delta, comp_base, dcomp_base, offs, col_ok, valid, d, d_ok, dq, qk_scale, scale, PREC
            )
    if MODE == 2:
        idx_base = idx_ptr + b64 * S * TOPK
        for k0 in range(0, TOPK, BLOCK_N // BLOCK_Q):
            offs, col_ok, valid = _csa_tile(idx_base, k0, i0, q_idx, row_ok, S, TOPK, D, BLOCK_N, BLOCK_N // BLOCK_Q)
            dq = _bwd_step(
                q, do, lse, delta, comp_base, dcomp_base, offs, col_ok, valid, d, d_ok, dq, qk_scale, scale, PREC
            )

    tl.store(dq_ptr + q_offs[:, None] + d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty), mask=io_mask)


# ---------------------------------------------------------------------------------------------------- host side


def _precision(dtype: torch.dtype) -> str:
    """`tl.dot` mode: exact fp32 ("ieee", not tf32) for fp32 inputs; the upcast workaround under the interpreter."""
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if interpreting() else "tf32"


def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the kernels write outputs in: Triton 3.9's interpreter truncates fp32 -> bf16 in `.to()` (GPUs round to
    nearest even), so under it the kernels write fp32 and torch rounds."""
    return torch.float32 if interpreting() else dtype


def _launch(kernel, blocks: Blocks, b: int, s: int, h: int, mode: int, dtype: torch.dtype, *args) -> None:
    grid = (triton.cdiv(s, blocks.block_q) * triton.cdiv(h, blocks.block_h), b)
    kernel[grid](
        *args, MODE=mode, BLOCK_H=blocks.block_h, BLOCK_Q=blocks.block_q, BLOCK_N=blocks.block_n,
        BLOCK_D=blocks.block_d, PREC=_precision(dtype), num_warps=blocks.num_warps,
    )  # fmt: skip


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, window_kv, start, window, sinks, scale, compressed_kv, ratio, topk_idx):
        b, s, h, d = q.shape
        n_cached = window_kv.shape[1] - s
        mode = MODE_WINDOW if compressed_kv is None else (MODE_HCA if topk_idx is None else MODE_CSA)
        q, window_kv, start, sinks = q.contiguous(), window_kv.contiguous(), start.contiguous(), sinks.contiguous()
        comp = compressed_kv.contiguous() if compressed_kv is not None else window_kv  # dummy pointer when unused
        idx = topk_idx.contiguous() if mode == MODE_CSA else start
        n_comp = compressed_kv.shape[1] if compressed_kv is not None else 0
        topk = topk_idx.shape[-1] if mode == MODE_CSA else 0
        out = torch.empty(q.shape, dtype=_store_dtype(q.dtype), device=q.device)
        lse = torch.empty(b, s, h, dtype=torch.float32, device=q.device)
        dims = (s, h, d, n_cached, window, n_comp, topk, max(ratio, 1))
        if out.numel():
            _launch(
                _fwd_kernel, choose_blocks(s, h, d, backward=False, itemsize=q.element_size()), b, s, h, mode, q.dtype,
                q, window_kv, comp, idx, start, sinks, out, lse, *dims, scale * LOG2E,
            )  # fmt: skip
        out = out.to(q.dtype)
        ctx.save_for_backward(q, window_kv, comp, idx, start, sinks, out, lse)
        ctx.meta = (mode, dims, scale, compressed_kv is not None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, window_kv, comp, idx, start, sinks, out, lse = ctx.saved_tensors
        mode, dims, scale, has_comp = ctx.meta
        b, s, h, d = q.shape
        dq = torch.empty(q.shape, dtype=_store_dtype(q.dtype), device=q.device)
        dkv = torch.zeros(window_kv.shape, dtype=torch.float32, device=q.device)
        dcomp = torch.zeros(comp.shape, dtype=torch.float32, device=q.device) if has_comp else dkv
        dsink = torch.empty(b, s, h, dtype=torch.float32, device=q.device)
        if q.numel():
            _launch(
                _bwd_kernel, choose_blocks(s, h, d, backward=True, itemsize=q.element_size()), b, s, h, mode, q.dtype,
                q, window_kv, comp, idx, start, sinks, out, lse, grad_out.contiguous().to(q.dtype),
                dq, dkv, dcomp, dsink, *dims, scale * LOG2E, scale,
            )  # fmt: skip
        else:
            dq.zero_()
        return (
            dq.to(q.dtype),
            dkv.to(window_kv.dtype),
            None,
            None,
            dsink.sum(dim=(0, 1)).to(sinks.dtype),
            None,
            dcomp.to(comp.dtype) if has_comp else None,
            None,
            None,
        )


def sparse_attention(
    q: torch.Tensor,
    window_kv: torch.Tensor,
    start: torch.Tensor,
    window: int,
    sinks: torch.Tensor,
    scale: float,
    compressed_kv: torch.Tensor | None = None,
    ratio: int = 0,
    topk_idx: torch.Tensor | None = None,
    chunk: int = 256,
    static_shapes: bool = False,
) -> torch.Tensor:
    """Triton `sparse_attention`, same contract as the reference: q `[B, S, H, D]`, window_kv `[B, P + S, D]`,
    start `[B]`, sinks `[H]`, compressed_kv `[B, N, D]`, topk_idx `[B, S, K]` -> `[B, S, H, D]` in q.dtype.
    `chunk` and `static_shapes` do not change the kernel (no host sync on values either way)."""
    if compressed_kv is not None and compressed_kv.shape[1] == 0:
        compressed_kv, topk_idx = None, None  # no entries: window only, as the reference
    if compressed_kv is None:
        topk_idx = None
    return _SparseAttention.apply(q, window_kv, start, int(window), sinks, float(scale), compressed_kv, int(ratio),
                                  topk_idx)  # fmt: skip


def supports(
    q: torch.Tensor,
    window_kv: torch.Tensor,
    start: torch.Tensor,
    window: int,
    sinks: torch.Tensor,
    scale: float,
    compressed_kv: torch.Tensor | None = None,
    ratio: int = 0,
    topk_idx: torch.Tensor | None = None,
    chunk: int = 256,
    static_shapes: bool = False,
) -> bool:
    """The kernel runs the call: tensors on the kernel device, fp32 / bf16 / fp16 (KV in q's dtype), D <= 512,
    integer start / topk_idx, and a positive ratio for HCA."""
    tensors = (q, window_kv, start, sinks, compressed_kv, topk_idx)
    if not on_kernel_device(*tensors) or not float_dtypes_ok(q, sinks):
        return False
    if q.dim() != 4 or window_kv.dim() != 3 or q.shape[-1] > MAX_HEAD_DIM or window_kv.dtype != q.dtype:
        return False
    if start.is_floating_point() or (topk_idx is not None and topk_idx.is_floating_point()):
        return False
    has_comp = compressed_kv is not None and compressed_kv.shape[1] > 0
    if has_comp and compressed_kv.dtype != q.dtype:
        return False
    return not (has_comp and topk_idx is None and ratio <= 0)


def register_backend() -> None:
    """Register `sparse_attention` under the "triton" backend (called by ops_backends when Triton is usable)."""
    from . import ops

    ops.register("sparse_attention", "triton", sparse_attention, supports)
