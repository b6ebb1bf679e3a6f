"""Triton backend of `indexer_topk`: the lightning indexer's scores and top-k (issue #15).

Implements ``ops_reference.indexer_topk`` (forward-math.md §5, tech report "Lightning indexer"; the official
``inference/model.py`` / ``kernel.py`` score the same sum (TileLang) and take a plain top-k): per query t,
`I[t, s] = sum_h w[t, h] * relu(q[t, h] . K[s])` over the causal entries s < (pos_t + 1) // ratio, then the top-k
entries with the project's lowest-index tie rule; int64 `[B, S, min(k, N)]`, -1 where there is no entry.

Design (performance.md §3 "Indexer", §5):
- `_indexer_scores_kernel` scores one query chunk against all needed entries and writes only that chunk's
  `[B, C, N_used]` fp32 block (never `S x N`). A program holds one key tile `[BLOCK_N, c]` (loaded once) and walks
  `Q_ITERS` query blocks; each block puts all heads of `BLOCK_T` queries in the M dimension of one `tl.dot`
  (M = BLOCK_T * heads, e.g. 2 x 64 = 128 for V4-Flash), then ReLU, the per-head weight and the sum over heads stay
  in registers. bf16/fp16 inputs go to the tensor cores with fp32 accumulation (their products are exact in fp32, as
  in the reference's fp32 upcast); fp32 inputs use `input_precision="ieee"` so no tf32 rounding changes the set.
- Causality in the kernel: non-causal entries are -inf; a tile past every scored row's limit skips its GEMM; a row
  whose limit is <= k is not scored at all (its causal entries get 0, so the selection lists exactly 0..limit-1,
  like the reference's shortcut), and a chunk where no row exceeds k never launches the kernel.
- Selection reuses the reference's exact helpers on the chunk block (`_topk_lowest_index`: one `topk(k + 1)`, exact
  int-packed path only for rows tied at the boundary; `_select_topk_lowest_index` for `static_shapes`), so the set
  is the reference's whenever the fp32 scores agree. Scores only differ from the reference by fp32 summation order
  (ulp level), which can flip a near-tie but never an exact one built from equal keys.
- Each score depends only on its row and column, so results are identical for every `chunk`.
- `static_shapes` (decode under `torch.compile` / CUDA graphs): no host synchronisation and no value-dependent
  shape; every entry of every chunk is scored (the in-kernel skips are data-dependent branches, not shapes).
No backward: the output is integer (inputs that require grad are read detached).
"""

from __future__ import annotations

import torch

from .ops import register
from .ops_reference import _select_topk_lowest_index, _topk_lowest_index
from .triton_common import block_size, float_dtypes_ok, interpreting, on_kernel_device, tl, triton

BLOCK_N = 64  # entries per tile: a [128, 64] fp32 accumulator for M = 128 rows stays in registers with 4 warps
TARGET_M = 128  # rows of the tl.dot: queries x padded heads per block
MAX_Q_ITERS = 8  # query blocks per program that share one loaded key tile
MAX_HEAD_DIM = 256  # one key tile holds the whole head dim in registers
MAX_HEADS = 128


@triton.jit
def _indexer_scores_kernel(
    q_ptr,  # [B, C, H, c] queries of this chunk
    k_ptr,  # [B, N, c] keys
    w_ptr,  # [B, C, H] head weights
    lim_ptr,  # [B, C] int32 causal limits, clamped to [0, N]
    out_ptr,  # [B, C, n_cols] fp32 scores
    n_rows,
    n_cols,
    n_heads,
    head_dim,
    topk,
    sq_b,
    sq_t,
    sq_h,
    sq_d,
    sk_b,
    sk_n,
    sk_d,
    sw_b,
    sw_t,
    sw_h,
    sl_b,
    sl_t,
    so_b,
    so_t,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    Q_ITERS: tl.constexpr,
    IEEE: tl.constexpr,
    ROUND: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim

    # The key tile, transposed to [c, BLOCK_N]: loaded once, shared by the Q_ITERS query blocks below.
    kt = tl.load(
        k_ptr + b * sk_b + cols[None, :] * sk_n + offs_d[:, None] * sk_d,
        mask=d_ok[:, None] & col_ok[None, :],
        other=0.0,
    )
    if IEEE:
        kt = kt.to(tl.float32)
    # Row m of the GEMM is head m % BLOCK_H of query m // BLOCK_H of the block.
    m = tl.arange(0, BLOCK_T * BLOCK_H)
    m_t = m // BLOCK_H
    m_h = m % BLOCK_H

    for it in range(Q_ITERS):
        t0 = (pid_t * Q_ITERS + it) * BLOCK_T
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < n_rows
        lim = tl.load(lim_ptr + b * sl_b + rows * sl_t, mask=row_ok, other=0)
        # Rows with at most k causal entries select all of them: no scores needed.
        scored = row_ok & (lim > topk)
        lim_hi = tl.max(tl.where(scored, lim, 0), axis=0)
        acc = tl.zeros([BLOCK_T * BLOCK_H, BLOCK_N], dtype=tl.float32)
        if n0 < lim_hi:  # some scored row of the block reaches this tile
            mt = t0 + m_t
            m_ok = (mt < n_rows) & (m_h < n_heads)
            qb = tl.load(
                q_ptr + b * sq_b + mt[:, None] * sq_t + m_h[:, None] * sq_h + offs_d[None, :] * sq_d,
                mask=m_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            if IEEE:
                logits = tl.dot(qb.to(tl.float32), kt, input_precision="ieee")
            else:
                logits = tl.dot(qb, kt)
            # Padded heads and rows carry weight 0 (and zero logits).
            wv = tl.load(w_ptr + b * sw_b + mt * sw_t + m_h * sw_h, mask=m_ok, other=0.0).to(tl.float32)
            acc = tl.maximum(logits, 0.0) * wv[:, None]
        s = tl.sum(tl.reshape(acc, [BLOCK_T, BLOCK_H, BLOCK_N]), axis=1)
        if ROUND:
            # The reference rounds I to bf16 before the mask and the selection: round-to-nearest-even on the bits
            # (Triton's interpreter truncates in `.to(tl.bfloat16)`; this form is exact everywhere).
            bits = s.to(tl.int32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
            s = bits.to(tl.float32, bitcast=True)
        s = tl.where(scored[:, None], s, 0.0)
        s = tl.where(cols[None, :] < lim[:, None], s, float("-inf"))
        tl.store(
            out_ptr + b * so_b + rows[:, None] * so_t + cols[None, :],
            s,
            mask=row_ok[:, None] & col_ok[None, :],
        )


def _chunk_scores(
    q: torch.Tensor,
    keys: torch.Tensor,
    weights: torch.Tensor,
    lim: torch.Tensor,
    k: int,
    n_cols: int,
    round_scores: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scores of one query chunk: `[B, C, n_cols]` fp32, -inf where s >= lim; rows with lim <= k hold 0 on their
    causal entries instead of scores (their selection is every causal entry).

    Args:
        q: `[B, C, H, c]`; keys: `[B, N, c]` with N >= n_cols; weights: `[B, C, H]`;
        lim: `[B, C]` int32 causal limits clamped to [0, N]; k: the top-k width (min(topk, N)).
        out: optional `[B, C, n_cols]` fp32 buffer to write (tests pass a NaN-filled one).
    """
    b, c_rows, h, d = q.shape
    if out is None:
        out = torch.empty((b, c_rows, n_cols), dtype=torch.float32, device=q.device)
    block_h = block_size(h, 1)
    # M = BLOCK_T * BLOCK_H ~ TARGET_M, at least 16 (tl.dot), no wider than the chunk needs.
    block_t = max(min(max(1, TARGET_M // block_h), block_size(c_rows, 1)), 16 // min(block_h, 16))
    n_blocks = triton.cdiv(c_rows, block_t)
    q_iters = min(MAX_Q_ITERS, n_blocks)
    # Triton's interpreter gets 16-bit tl.dot wrong (3.9): it takes the exact fp32 path on upcast inputs instead.
    ieee = q.dtype == torch.float32 or keys.dtype != q.dtype or interpreting()
    grid = (triton.cdiv(n_cols, BLOCK_N), triton.cdiv(n_blocks, q_iters), b)
    _indexer_scores_kernel[grid](
        q, keys, weights, lim, out,
        c_rows, n_cols, h, d, k,
        *q.stride(), *keys.stride(), *weights.stride(), *lim.stride(), out.stride(0), out.stride(1),
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_size(d), BLOCK_N=BLOCK_N, Q_ITERS=q_iters,
        IEEE=ieee, ROUND=round_scores,
    )  # fmt: skip
    return out


def indexer_topk(
    q: torch.Tensor,
    keys: torch.Tensor,
    weights: torch.Tensor,
    positions: torch.Tensor,
    ratio: int,
    topk: int,
    chunk: int = 256,
    head_group: int = 8,
    static_shapes: bool = False,
    round_scores: bool = False,
) -> torch.Tensor:
    """Triton `indexer_topk` (signature and result of ``ops_reference.indexer_topk``; `head_group` is unused: all
    heads of a query share one GEMM).

    Args:
        q: `[B, S, H, c]`; keys: `[B, N, c]`; weights: `[B, S, H]`; positions: `[B, S]` absolute positions.
    Returns: `[B, S, min(topk, N)]` int64 entry indices (ascending per row unless `static_shapes`), -1 where there
    is no entry; lowest index first among equal scores.
    """
    q, keys, weights = q.detach(), keys.detach(), weights.detach()
    b, s, _, _ = q.shape
    n = keys.shape[1]
    k = min(topk, n)
    out = torch.full((b, s, k), -1, dtype=torch.long, device=q.device)
    if k == 0 or s == 0:
        return out
    limits = (positions + 1) // ratio
    lim32 = limits.clamp(0, n).to(torch.int32)
    step = max(1, int(chunk))
    if k == n:
        # Every entry fits in k: the causal ones are the selection (no scores in either mode).
        cols = torch.arange(k, device=q.device)
        return torch.where(cols < limits.unsqueeze(-1), cols, -1)
    if static_shapes:
        for i0 in range(0, s, step):
            i1 = min(i0 + step, s)
            lim = limits[:, i0:i1]
            scores = _chunk_scores(q[:, i0:i1], keys, weights[:, i0:i1], lim32[:, i0:i1], k, n, round_scores)
            idx = _select_topk_lowest_index(scores.view(-1, n), k).view(b, i1 - i0, k)
            out[:, i0:i1] = torch.where(idx < lim.unsqueeze(-1), idx, -1)
        return out
    # One host transfer for every chunk's largest limit (the reference syncs once per chunk).
    n_chunks = triton.cdiv(s, step)
    padded = torch.nn.functional.pad(lim32, (0, n_chunks * step - s))
    chunk_max = padded.view(b, n_chunks, step).amax(dim=(0, 2)).tolist()
    for ci, i0 in enumerate(range(0, s, step)):
        i1 = min(i0 + step, s)
        lim = limits[:, i0:i1]
        n_used = chunk_max[ci]
        if n_used == 0:
            continue
        if n_used <= k:
            cols = torch.arange(n_used, device=q.device)
            out[:, i0:i1, :n_used] = torch.where(cols < lim.unsqueeze(-1), cols, -1)
            continue
        scores = _chunk_scores(q[:, i0:i1], keys, weights[:, i0:i1], lim32[:, i0:i1], k, n_used, round_scores)
        idx = _topk_lowest_index(scores.view(-1, n_used), lim.reshape(-1), k).view(b, i1 - i0, k)
        out[:, i0:i1] = torch.where(idx < lim.unsqueeze(-1), idx, -1)
    return out


def _supports(q, keys, weights, positions, ratio, topk, **kwargs) -> bool:
    """Calls the kernel handles: kernel-device tensors, fp32/bf16/fp16 q, keys, weights of the documented ranks,
    head dim <= MAX_HEAD_DIM, heads <= MAX_HEADS, integer positions and a positive ratio."""
    tensors = (q, keys, weights, positions)
    if not all(isinstance(t, torch.Tensor) for t in tensors) or not on_kernel_device(*tensors):
        return False
    if not float_dtypes_ok(q, keys, weights) or positions.is_floating_point() or positions.is_complex():
        return False
    if q.dim() != 4 or keys.dim() != 3 or weights.dim() != 3 or positions.dim() != 2:
        return False
    b, s, h, c = q.shape
    return (
        keys.shape[0] == b
        and keys.shape[2] == c
        and tuple(weights.shape) == (b, s, h)
        and tuple(positions.shape) == (b, s)
        and 0 < c <= MAX_HEAD_DIM
        and 0 < h <= MAX_HEADS
        and int(ratio) > 0
    )


def register_backend() -> None:
    """Register `indexer_topk` under the "triton" backend."""
    register("indexer_topk", "triton", indexer_topk, _supports)
