"""Triton backend of `compress_pool`: softmax-gated window pooling of the KV compressors (issue #15).

Implements ``ops_reference.compress_pool`` (forward-math.md §4; DeepSeek-V4 tech report §2.3.1-2.3.2; the pooling
of the official `inference/model.py` `Compressor`). Per channel, an entry is `C = sum_s softmax_s(score_s) kv_s`
over its slots:

- HCA (no overlap): width D, entry j pools the m tokens of window j;
- CSA (overlap given): width 2D, entry j pools the Ca halves (channels [0, D)) of window j - 1 (for j = 0 the
  `overlap_kv` / `overlap_score` rows, score -inf where a row has no window before) with the Cb halves
  (channels [D, 2D)) of window j: 2m slots per channel.

Design (memory bound: every input element is read once, in fp32):

- One program per (batch row, block of BLOCK_W entries, block of BLOCK_D channels). Slots are loaded as
  `[BLOCK_W, BLOCK_M, BLOCK_D]` tiles (channels contiguous: coalesced rows) and reduced over the slot axis in
  registers. m <= BLOCK_M (CSA m = 4, the indexer's too) is a single tile; HCA's m = 128 streams in slot chunks with
  an online softmax, so registers stay bounded. CSA's Ca tiles come from the previous window or, for entry 0, from
  the overlap rows (two masked loads and a select).
- -inf scores: the running max is replaced by 0 where it is still -inf, so masked slots contribute exp(-inf) = 0
  without NaN from `-inf - -inf`; a channel whose slots are all -inf ends with sum 0 and gives 0 / 0 = NaN, exactly
  like the reference's softmax over all -inf (CSA always has finite Cb slots, so this only matters for HCA).
- The forward stores the per-entry max and softmax denominator when a gradient is needed; the backward kernel then
  recomputes `p = exp(score - max) / sum` per slot (one read of kv and score, no second softmax pass) and writes
  `d kv = p dy`, `d score = p (kv - y) dy`. Each gradient element is written exactly once, without atomics: the
  program of entry j writes the Cb rows of window j and the Ca rows of window j - 1 (or the overlap rows for j = 0),
  and the program holding the last entry writes the zeros of the last window's Ca rows (no entry reads them).
- Offsets of the batch row are int64 (B * L * 2D passes 2^31 at long contexts); offsets inside a row stay int32
  (cheaper 3D offset tiles), so `supports` declines rows of 2^31 elements or more (2M tokens at width 1024).

The op's signature has no RMSNorm / RoPE: the compressor module applies `kv_norm` and RoPE to the pooled `[B, N, D]`
afterwards (`DeepseekV4HCACompressor.entries`), so they are not fused here. Fp32 only (the compressor pools in fp32).
"""

from __future__ import annotations

import torch

from .ops import register
from .triton_common import block_size, on_kernel_device, tl, triton


@triton.jit
def _load_slots(
    kv_ptr, score_ptr, ov_kv_ptr, ov_score_ptr, row_base, ov_base, w3, slot, d3, n_windows,
    RATIO: tl.constexpr, D: tl.constexpr, WIDTH: tl.constexpr, PREV: tl.constexpr,
):  # fmt: skip
    """kv and score tiles `[BLOCK_W, BLOCK_M, BLOCK_D]` of slots `slot` of entries `w3`: the Cb (or HCA) channels
    of window w, or with PREV the Ca channels of window w - 1 / the overlap rows for w = 0. Masked: kv 0, score
    -inf. Also returns the mask and the offsets in kv / in the overlap rows (for the backward's stores)."""
    mask = (w3 < n_windows) & (slot < RATIO) & (d3 < D)
    if PREV:
        offs = (w3 - 1) * RATIO * WIDTH + slot * WIDTH + d3
        ov_offs = slot * D + d3 + w3 * 0  # broadcast to the tile: the entries of w3 share the overlap rows
        in_kv = mask & (w3 > 0)
        in_ov = mask & (w3 == 0)
        kv = tl.load(kv_ptr + row_base + offs, mask=in_kv, other=0.0)
        s = tl.load(score_ptr + row_base + offs, mask=in_kv, other=float("-inf"))
        kv_ov = tl.load(ov_kv_ptr + ov_base + ov_offs, mask=in_ov, other=0.0)
        s_ov = tl.load(ov_score_ptr + ov_base + ov_offs, mask=in_ov, other=float("-inf"))
        kv = tl.where(w3 == 0, kv_ov, kv)
        s = tl.where(w3 == 0, s_ov, s)
    else:
        offs = w3 * RATIO * WIDTH + slot * WIDTH + (WIDTH - D) + d3
        ov_offs = offs
        kv = tl.load(kv_ptr + row_base + offs, mask=mask, other=0.0)
        s = tl.load(score_ptr + row_base + offs, mask=mask, other=float("-inf"))
    return kv, s, mask, offs, ov_offs


@triton.jit
def _online_update(kv, s, m_i, l_i, acc):
    """Fold one slot tile into the running max `m_i`, denominator `l_i` and weighted sum `acc` `[BLOCK_W, BLOCK_D]`.
    A max still at -inf is taken as 0, so all -inf slots add exp(-inf) = 0 and no `-inf - -inf` NaN appears."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None, :])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha + tl.sum(p * kv, axis=1)
    return m_new, l_i, acc


@triton.jit
def _pool_fwd_kernel(
    kv_ptr, score_ptr, ov_kv_ptr, ov_score_ptr, y_ptr, max_ptr, sum_ptr, n_windows,
    RATIO: tl.constexpr, D: tl.constexpr, WIDTH: tl.constexpr, OVERLAP: tl.constexpr, STORE_STATS: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """y `[B, nW, D]` from kv / score `[B, nW * RATIO, WIDTH]` (+ overlap `[B, RATIO, D]`); with STORE_STATS also
    the softmax max (-inf taken as 0) and denominator per entry and channel, `[B, nW, D]` each."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    w3 = offs_w[:, None, None]
    d3 = offs_d[None, None, :]
    m3 = tl.arange(0, BLOCK_M)[None, :, None]
    row_base = pid_b * n_windows * RATIO * WIDTH
    ov_base = pid_b * RATIO * D

    m_i = tl.full((BLOCK_W, BLOCK_D), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_W, BLOCK_D), tl.float32)
    acc = tl.zeros((BLOCK_W, BLOCK_D), tl.float32)
    if OVERLAP:  # the Ca slots of window j - 1 (or the overlap rows) come first, as in the reference
        for m0 in range(0, RATIO, BLOCK_M):
            kv, s, _, _, _ = _load_slots(
                kv_ptr, score_ptr, ov_kv_ptr, ov_score_ptr, row_base, ov_base, w3, m0 + m3, d3, n_windows,
                RATIO, D, WIDTH, True,
            )  # fmt: skip
            m_i, l_i, acc = _online_update(kv, s, m_i, l_i, acc)
    for m0 in range(0, RATIO, BLOCK_M):
        kv, s, _, _, _ = _load_slots(
            kv_ptr, score_ptr, ov_kv_ptr, ov_score_ptr, row_base, ov_base, w3, m0 + m3, d3, n_windows,
            RATIO, D, WIDTH, False,
        )  # fmt: skip
        m_i, l_i, acc = _online_update(kv, s, m_i, l_i, acc)

    out = pid_b * n_windows * D + offs_w[:, None] * D + offs_d[None, :]
    mask = (offs_w[:, None] < n_windows) & (offs_d[None, :] < D)
    # All slots -inf: 0 / 0 = NaN, as the reference. Lanes outside the tile divide by 1 (no NaN to warn about).
    tl.store(y_ptr + out, acc / tl.where(mask, l_i, 1.0), mask=mask)
    if STORE_STATS:
        tl.store(max_ptr + out, tl.where(m_i == float("-inf"), 0.0, m_i), mask=mask)
        tl.store(sum_ptr + out, l_i, mask=mask)


@triton.jit
def _pool_bwd_kernel(
    kv_ptr, score_ptr, ov_kv_ptr, ov_score_ptr, y_ptr, dy_ptr, max_ptr, sum_ptr,
    dkv_ptr, dscore_ptr, dov_kv_ptr, dov_score_ptr, n_windows,
    RATIO: tl.constexpr, D: tl.constexpr, WIDTH: tl.constexpr, OVERLAP: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Gradients of kv / score `[B, nW * RATIO, WIDTH]` (and of the overlap rows `[B, RATIO, D]`) for dy `[B, nW, D]`:
    per slot `p = exp(score - max) / sum`, `d kv = p dy`, `d score = p (kv - y) dy`."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    w3 = offs_w[:, None, None]
    d3 = offs_d[None, None, :]
    m3 = tl.arange(0, BLOCK_M)[None, :, None]
    row_base = pid_b * n_windows * RATIO * WIDTH
    ov_base = pid_b * RATIO * D

    ent = pid_b * n_windows * D + offs_w[:, None] * D + offs_d[None, :]
    ent_mask = (offs_w[:, None] < n_windows) & (offs_d[None, :] < D)
    y = tl.load(y_ptr + ent, mask=ent_mask, other=0.0)[:, None, :]
    dy = tl.load(dy_ptr + ent, mask=ent_mask, other=0.0)[:, None, :]
    mx = tl.load(max_ptr + ent, mask=ent_mask, other=0.0)[:, None, :]
    den = tl.load(sum_ptr + ent, mask=ent_mask, other=1.0)[:, None, :]

    for m0 in range(0, RATIO, BLOCK_M):
        kv, s, mask, offs, _ = _load_slots(
            kv_ptr, score_ptr, ov_kv_ptr, ov_score_ptr, row_base, ov_base, w3, m0 + m3, d3, n_windows,
            RATIO, D, WIDTH, False,
        )  # fmt: skip
        p = tl.exp(s - mx) / den
        tl.store(dkv_ptr + row_base + offs, p * dy, mask=mask)
        tl.store(dscore_ptr + row_base + offs, p * (kv - y) * dy, mask=mask)
    if OVERLAP:
        for m0 in range(0, RATIO, BLOCK_M):
            slot = m0 + m3
            kv, s, mask, offs, ov_offs = _load_slots(
                kv_ptr, score_ptr, ov_kv_ptr, ov_score_ptr, row_base, ov_base, w3, slot, d3, n_windows,
                RATIO, D, WIDTH, True,
            )  # fmt: skip
            p = tl.exp(s - mx) / den
            dkv = p * dy
            dscore = p * (kv - y) * dy
            # Entry j's Ca slots are window j - 1's rows, or the overlap rows for j = 0.
            tl.store(dkv_ptr + row_base + offs, dkv, mask=mask & (w3 > 0))
            tl.store(dscore_ptr + row_base + offs, dscore, mask=mask & (w3 > 0))
            tl.store(dov_kv_ptr + ov_base + ov_offs, dkv, mask=mask & (w3 == 0))
            tl.store(dov_score_ptr + ov_base + ov_offs, dscore, mask=mask & (w3 == 0))
            # No entry reads the last window's Ca rows: their gradient is zero.
            last = mask & (w3 == n_windows - 1)
            zero = tl.zeros((BLOCK_W, BLOCK_M, BLOCK_D), tl.float32)
            tail = w3 * RATIO * WIDTH + slot * WIDTH + d3
            tl.store(dkv_ptr + row_base + tail, zero, mask=last)
            tl.store(dscore_ptr + row_base + tail, zero, mask=last)


def _empty(like: torch.Tensor, *shape: int) -> torch.Tensor:
    """Uninitialized fp32 buffer on `like`'s device (every element is written by a kernel; tests fill it with NaN)."""
    return torch.empty(shape or like.shape, dtype=torch.float32, device=like.device)


def _blocks(ratio: int, d: int, n_windows: int) -> tuple[int, int, int]:
    """(BLOCK_W, BLOCK_M, BLOCK_D): about 4K elements per slot tile (32 fp32 registers per thread and tensor at
    4 warps). CSA (m = 4): 8 entries x 4 slots x 128 channels; HCA (m = 128): 2 x 32-slot chunks x 64."""
    block_m = min(block_size(ratio, 1), 32)
    block_d = min(block_size(d, 16), 128 if block_m <= 8 else 64)
    block_w = max(1, min(block_size(n_windows, 1), 4096 // (block_m * block_d)))
    return block_w, block_m, block_d


def _launch_config(kv, ratio, d, blocks):
    b, length, _ = kv.shape
    n_windows = length // ratio
    block_w, block_m, block_d = blocks or _blocks(ratio, d, n_windows)
    grid = (b, triton.cdiv(n_windows, block_w), triton.cdiv(d, block_d))
    return n_windows, grid, {"BLOCK_W": block_w, "BLOCK_M": block_m, "BLOCK_D": block_d, "num_warps": 4}


class _CompressPool(torch.autograd.Function):
    """Forward and backward both in Triton; fp32 contiguous tensors (the wrapper makes them so)."""

    @staticmethod
    def forward(ctx, kv, score, ratio, overlap_kv, overlap_score, blocks):
        b, length, width = kv.shape
        overlap = overlap_kv is not None
        d = width // 2 if overlap else width
        n_windows, grid, meta = _launch_config(kv, ratio, d, blocks)
        store_stats = any(ctx.needs_input_grad)
        y = _empty(kv, b, n_windows, d)
        stats = (_empty(kv, b, n_windows, d), _empty(kv, b, n_windows, d)) if store_stats else (y, y)
        ov_kv, ov_score = (overlap_kv, overlap_score) if overlap else (kv, score)  # unread placeholders for HCA
        _pool_fwd_kernel[grid](
            kv, score, ov_kv, ov_score, y, *stats, n_windows,
            RATIO=ratio, D=d, WIDTH=width, OVERLAP=overlap, STORE_STATS=store_stats, **meta,
        )  # fmt: skip
        if store_stats:
            ctx.save_for_backward(kv, score, overlap_kv, overlap_score, y, *stats)
            ctx.config = (ratio, d, width, overlap, blocks)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        kv, score, overlap_kv, overlap_score, y, mx, den = ctx.saved_tensors
        ratio, d, width, overlap, blocks = ctx.config
        n_windows, grid, meta = _launch_config(kv, ratio, d, blocks)
        dkv, dscore = _empty(kv), _empty(score)
        if overlap:
            ov_kv, ov_score = overlap_kv, overlap_score
            dov_kv, dov_score = _empty(overlap_kv), _empty(overlap_score)
        else:  # unread placeholders
            ov_kv, ov_score, dov_kv, dov_score = kv, score, dkv, dscore
        _pool_bwd_kernel[grid](
            kv, score, ov_kv, ov_score, y, dy.contiguous(), mx, den, dkv, dscore, dov_kv, dov_score, n_windows,
            RATIO=ratio, D=d, WIDTH=width, OVERLAP=overlap, **meta,
        )  # fmt: skip
        if not overlap:
            return dkv, dscore, None, None, None, None
        return dkv, dscore, None, dov_kv, dov_score, None


def compress_pool(
    kv: torch.Tensor,
    score: torch.Tensor,
    ratio: int,
    overlap_kv: torch.Tensor | None = None,
    overlap_score: torch.Tensor | None = None,
    *,
    blocks: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """`ops_reference.compress_pool` in Triton: kv / score `[B, nW * m, width]` fp32 (+ CSA overlap `[B, m, D]`) ->
    `[B, nW, D]` fp32. `blocks` = (BLOCK_W, BLOCK_M, BLOCK_D) powers of two overrides the tiling (tests)."""
    if overlap_kv is not None:
        overlap_kv, overlap_score = overlap_kv.contiguous(), overlap_score.contiguous()
    return _CompressPool.apply(kv.contiguous(), score.contiguous(), int(ratio), overlap_kv, overlap_score, blocks)


def supports(
    kv: torch.Tensor,
    score: torch.Tensor,
    ratio: int,
    overlap_kv: torch.Tensor | None = None,
    overlap_score: torch.Tensor | None = None,
) -> bool:
    """fp32 tensors on the kernel device with the reference's shapes: at least one whole window per row, CSA with
    both overlap tensors `[B, m, width / 2]`. Anything else (float64 gradcheck, partial windows) goes elsewhere."""
    tensors = (kv, score, overlap_kv, overlap_score)
    if not on_kernel_device(*tensors) or not isinstance(ratio, int) or ratio < 1:
        return False
    if any(t is not None and t.dtype != torch.float32 for t in tensors):
        return False
    if kv.dim() != 3 or score.shape != kv.shape:
        return False
    b, length, width = kv.shape
    # In-row offsets are int32 (the batch row's base is int64): up to 2^31 elements per row.
    if length == 0 or length % ratio or width == 0 or length * width >= 2**31:
        return False
    if (overlap_kv is None) != (overlap_score is None):
        return False
    if overlap_kv is not None:
        want = (b, ratio, width // 2)
        return width % 2 == 0 and tuple(overlap_kv.shape) == want and tuple(overlap_score.shape) == want
    return True


def _registered(kv, score, ratio, overlap_kv=None, overlap_score=None):
    return compress_pool(kv, score, ratio, overlap_kv, overlap_score)


def register_backend() -> None:
    """Register `compress_pool` under the "triton" backend."""
    register("compress_pool", "triton", _registered, supports)
