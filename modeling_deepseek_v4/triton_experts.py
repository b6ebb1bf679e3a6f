"""Triton backends of `grouped_experts` (routed MoE experts) and `quantized_linear` (issue #15).

Specification: ``ops_reference.grouped_experts`` / ``ops_reference.quantized_linear`` (forward-math.md §6, the
official `inference/model.py` `Expert` / `linear` and the FP8 / FP4 GEMMs of `inference/kernel.py`).

grouped_experts, forward (no host synchronisation, so it is the same code for `static_shapes` True and False):
1. the T*K (token, slot) pairs are sorted by expert on the device (`argsort` + `bincount`); a tile map splits each
   expert's rows into row blocks of BM. The grid has a shape-only upper bound of tiles (cdiv(T*K, BM) + min(E, T*K));
   surplus tiles and experts without tokens get no work;
2. `_gate_up_kernel`: grid (row tile, I block), gathers x rows, computes the gate and up columns of
   x_e W13_e^T in two fp32 accumulators and fuses the clamped SwiGLU `silu(min(g, l)) * clamp(u, -l, l)` times the
   routing weight into the epilogue; writes h `[T*K, I]` in x.dtype (sorted order);
3. `_grouped_mm_kernel`: h W2_e^T per row tile, written to each pair's own slot `[T*K, d]` in x.dtype; the K
   slots of a token are summed in fp32 afterwards (deterministic, unlike atomics; the reference rounds each
   expert output to x.dtype before its fp32 accumulation too).
The reference's roundings are kept: gate/up and the down output are rounded to x.dtype, SwiGLU runs in fp32.

Backward (dense banks, all in Triton): `_grouped_mm_kernel` again for dh = dy W2_e with the SwiGLU backward fused
(dgu `[T*K, 2I]`, per-row partial d(topk_weights)), for dx = dgu W13_e (per slot, summed over K); `_wgrad_kernel`
for dW13_e = dgu_e^T x_e and dW2_e = dy_e^T h_e (grid (expert, N block, K block), a loop over the expert's rows;
experts without tokens just store zeros). Quantized banks are frozen: grads for x and topk_weights only. When a
gradient is needed the forward also stores gu `[T*K, 2I]` (x.dtype) and keeps h: no GEMM is recomputed.

Quantized weights (`PackedWeight`: FP8 E4M3 with block scales, 128x128 or 32x32; packed FP4 E2M1 with 1x32 E8M0
group scales) are dequantized tile by tile inside the GEMMs (Hopper has no FP4 tensor cores; W4A16 / W8A16 style)
by pure integer bit manipulation (`_fp8_value`, `_fp4_value`, `_scale_value`): no FP8 cast, so the interpreter
computes them exactly as the GPU does and the tests check them on CPU. Each value times its power-of-two scale is
exact in fp32 and cast once to x.dtype, as `quant_formats.dequantize_*` does. Not supported (reference runs):
`act_quant=True`, LoRA factors, QAT / bitsandbytes views, float64.
Block sizes are plain heuristics (not autotuned); fp32 inputs use `input_precision="ieee"` (fp32 parity).
"""

from __future__ import annotations

import torch

from .ops import register
from .triton_common import block_size, float_dtypes_ok, interpreting, on_kernel_device, tl, triton
from .weight_formats import PackedWeight, WeightFormat

_SCALE_DTYPES = (torch.float8_e8m0fnu, torch.uint8, torch.float32)


def _empty(*shape, dtype, device) -> torch.Tensor:
    """Allocation of every buffer the kernels fill (tests swap in a NaN-filled one to catch unwritten elements)."""
    return torch.empty(*shape, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------------ device helpers


@triton.jit
def _pow2(e):
    """Exact fp32 2**e for int32 e in [-126, 127] (built from the exponent field)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _scale_value(s, SCALE_E8M0: tl.constexpr):
    """E8M0 byte -> 2**(byte - 127) (byte 0: the subnormal 2**-127, 255: NaN), or a float scale as is."""
    if SCALE_E8M0:
        b = s.to(tl.int32) & 255
        bits = tl.where(b == 0, 0x400000, b << 23)
        bits = tl.where(b == 255, 0x7FC00000, bits)
        return bits.to(tl.float32, bitcast=True)
    else:
        return s.to(tl.float32)


@triton.jit
def _fp8_value(b):
    """E4M3 byte (int32 0..255) -> fp32 value by integer ops: subnormals m * 2**-9, normals (8 + m) * 2**(e - 10)."""
    e = (b >> 3) & 15
    m = b & 7
    mag = tl.where(e == 0, m.to(tl.float32) * 0.001953125, (m + 8).to(tl.float32) * _pow2(e - 10))
    mag = tl.where((b & 127) == 127, (b | 0x7FC00000).to(tl.float32, bitcast=True), mag)  # the NaN codes
    return tl.where((b & 128) != 0, -mag, mag)


@triton.jit
def _fp4_value(c):
    """E2M1 code (int32 0..15) -> fp32: 0, 0.5, 1, 1.5, 2, 3, 4, 6 (code 8+: negated)."""
    e = (c >> 1) & 3
    m = c & 1
    halves = tl.where(e == 0, m, (m + 2) << tl.maximum(e - 1, 0))
    mag = halves.to(tl.float32) * 0.5
    return tl.where((c & 8) != 0, -mag, mag)


@triton.jit
def _load_w(w_ptr, s_ptr, rn, rk, mask, sw_n, sw_k, ss_n, ss_k, half_rows, blocks_per_half,
            FMT: tl.constexpr, SB_N: tl.constexpr, SB_K: tl.constexpr, SCALE_E8M0: tl.constexpr):  # fmt: skip
    """Weight elements W[rn, rk] (broadcast 2-D index tensors, one expert's base pointers): dense (FMT 0, own
    dtype), FP8 block-scaled (1) or packed FP4 (2) dequantized to fp32. Scale rows follow the row halves of a fused
    gate/up bank (`half_rows` rows, `blocks_per_half` scale rows each)."""
    if FMT == 0:
        return tl.load(w_ptr + rn * sw_n + rk * sw_k, mask=mask, other=0.0)
    else:
        srow = (rn // half_rows) * blocks_per_half + (rn % half_rows) // SB_N
        s = _scale_value(tl.load(s_ptr + srow * ss_n + (rk // SB_K) * ss_k, mask=mask, other=0), SCALE_E8M0)
        if FMT == 1:
            b = tl.load(w_ptr + rn * sw_n + rk * sw_k, mask=mask, other=0).to(tl.int32) & 255
            return _fp8_value(b) * s
        else:
            b = tl.load(w_ptr + rn * sw_n + (rk // 2) * sw_k, mask=mask, other=0).to(tl.int32) & 255
            return _fp4_value((b >> ((rk & 1) * 4)) & 15) * s


# Triton 3.9's interpreter multiplies bf16 `tl.dot` operands wrongly and truncates fp32 -> bf16 casts; bf16 / fp16
# products are exact in fp32, so under the interpreter the operands go up to fp32 (same result up to summation
# order) and `_cast` rounds to nearest even by hand (what the GPU cast does).
_INTERPRETER = tl.constexpr(interpreting())


@triton.jit
def _cast(v, ct: tl.constexpr):
    """v -> ct, rounding to nearest even (on the GPU just the cast; a no-op when v is already ct)."""
    if _INTERPRETER:
        if ct == tl.bfloat16:
            bits = v.to(tl.float32).to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            v = bits.to(tl.float32, bitcast=True)
    return v.to(ct)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if _INTERPRETER:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _silu_parts(g, u, limit):
    """Clamped SwiGLU pieces in fp32: (clamped gate, sigmoid of it, silu of it, clamped up)."""
    gc = tl.minimum(g, limit)
    sig = 1.0 / (1.0 + tl.exp(-gc))
    return gc, sig, gc * sig, tl.minimum(tl.maximum(u, -limit), limit)


# --------------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _gate_up_kernel(x_ptr, tok_ptr, w_ptr, ws_ptr, rw_ptr, h_ptr, gu_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr,
                    inter, dim, sx, sw_e, sw_n, sw_k, ss_e, ss_n, ss_k, half_rows, blocks_per_half, limit,
                    FMT: tl.constexpr, SB_N: tl.constexpr, SB_K: tl.constexpr, SCALE_E8M0: tl.constexpr,
                    STORE_GU: tl.constexpr, IEEE: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    """h[r, c] = w_r * silu(min(g, l)) * clamp(u, -l, l), (g, u) = (W13_e[c], W13_e[I + c]) . x[token(r)], for the
    sorted rows r of one row tile of expert e and BN columns c of I. Optionally stores gu (x.dtype) for backward."""
    pid, pn = tl.program_id(0), tl.program_id(1)
    lo = tl.load(tile_lo_ptr + pid)
    hi = tl.load(tile_hi_ptr + pid)
    if lo >= hi:  # a surplus tile of the shape-only grid
        return
    e = tl.load(tile_e_ptr + pid).to(tl.int64)
    rows = lo + tl.arange(0, BM)
    rmask = rows < hi
    tok = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
    cols = pn * BN + tl.arange(0, BN)
    cmask = cols < inter
    wb, sb = w_ptr + e * sw_e, ws_ptr + e * ss_e
    ct = h_ptr.dtype.element_ty
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, dim, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < dim
        a = tl.load(x_ptr + tok[:, None] * sx + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wmask = kmask[:, None] & cmask[None, :]
        wg = _load_w(wb, sb, cols[None, :], ks[:, None], wmask, sw_n, sw_k, ss_n, ss_k, half_rows, blocks_per_half,
                     FMT, SB_N, SB_K, SCALE_E8M0)  # fmt: skip
        wu = _load_w(wb, sb, cols[None, :] + inter, ks[:, None], wmask, sw_n, sw_k, ss_n, ss_k, half_rows,
                     blocks_per_half, FMT, SB_N, SB_K, SCALE_E8M0)  # fmt: skip
        acc_g = _dot(_cast(a, ct), _cast(wg, ct), acc_g, IEEE)
        acc_u = _dot(_cast(a, ct), _cast(wu, ct), acc_u, IEEE)
    # the reference's F.linear output is x.dtype: round before the fp32 SwiGLU
    g = _cast(acc_g, ct)
    u = _cast(acc_u, ct)
    omask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    if STORE_GU:
        gptr = gu_ptr + rows64[:, None] * (2 * inter) + cols[None, :]
        tl.store(gptr, g, mask=omask)
        tl.store(gptr + inter, u, mask=omask)
    _, _, silu, uc = _silu_parts(g.to(tl.float32), u.to(tl.float32), limit)
    rw = tl.load(rw_ptr + rows, mask=rmask, other=0.0)
    tl.store(h_ptr + rows64[:, None] * inter + cols[None, :], _cast(silu * uc * rw[:, None], ct), mask=omask)


@triton.jit
def _grouped_mm_kernel(a_ptr, arow_ptr, w_ptr, ws_ptr, out_ptr, orow_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr,
                       gu_ptr, rw_ptr, dwp_ptr,
                       n_out, n_red, n_rows, sa, so, sw_e, sw_n, sw_k, ss_e, ss_n, ss_k, half_rows, blocks_per_half,
                       limit, GATHER_A: tl.constexpr, SCATTER_O: tl.constexpr, TRANS_W: tl.constexpr,
                       SWIGLU_BWD: tl.constexpr, FMT: tl.constexpr, SB_N: tl.constexpr, SB_K: tl.constexpr,
                       SCALE_E8M0: tl.constexpr, IEEE: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    """out[orow(r), c] = sum_j A[arow(r), j] * W_e[c, j] (W_e[j, c] with TRANS_W) for one row tile of expert e and
    BN output columns; A rows gathered (GATHER_A: arow = arow_ptr[r]) or the sorted rows, output rows scattered to
    slots (SCATTER_O) or sorted. Computes in out's dtype with fp32 accumulation.

    SWIGLU_BWD: the accumulator is dh `[BM, BN]` (columns of I); the epilogue applies the clamped-SwiGLU backward
    with gu `[rows, 2I]` and the routing weights: stores dgu (gate and up halves, out's dtype) and the per-row
    partial of d(weight) = sum_c dh * swiglu to dwp[column block, r] (fp32)."""
    pid, pn = tl.program_id(0), tl.program_id(1)
    lo = tl.load(tile_lo_ptr + pid)
    hi = tl.load(tile_hi_ptr + pid)
    if lo >= hi:
        return
    e = tl.load(tile_e_ptr + pid).to(tl.int64)
    rows = lo + tl.arange(0, BM)
    rmask = rows < hi
    if GATHER_A:
        arow = tl.load(arow_ptr + rows, mask=rmask, other=0).to(tl.int64)
    else:
        arow = rows.to(tl.int64)
    cols = pn * BN + tl.arange(0, BN)
    cmask = cols < n_out
    wb, sb = w_ptr + e * sw_e, ws_ptr + e * ss_e
    ct = out_ptr.dtype.element_ty
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, n_red, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < n_red
        a = tl.load(a_ptr + arow[:, None] * sa + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wmask = kmask[:, None] & cmask[None, :]
        if TRANS_W:
            w = _load_w(wb, sb, ks[:, None], cols[None, :], wmask, sw_n, sw_k, ss_n, ss_k, half_rows,
                        blocks_per_half, FMT, SB_N, SB_K, SCALE_E8M0)  # fmt: skip
        else:
            w = _load_w(wb, sb, cols[None, :], ks[:, None], wmask, sw_n, sw_k, ss_n, ss_k, half_rows,
                        blocks_per_half, FMT, SB_N, SB_K, SCALE_E8M0)  # fmt: skip
        acc = _dot(_cast(a, ct), _cast(w, ct), acc, IEEE)
    omask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    if SWIGLU_BWD:
        dh = _cast(acc, ct).to(tl.float32)  # the reference's dh is a gradient of an x.dtype tensor
        gptr = gu_ptr + rows64[:, None] * (2 * n_out) + cols[None, :]
        g = tl.load(gptr, mask=omask, other=0.0).to(tl.float32)
        u = tl.load(gptr + n_out, mask=omask, other=0.0).to(tl.float32)
        gc, sig, silu, uc = _silu_parts(g, u, limit)
        rw = tl.load(rw_ptr + rows, mask=rmask, other=0.0)
        tl.store(dwp_ptr + pn * n_rows + rows64, tl.sum(tl.where(omask, dh * silu * uc, 0.0), axis=1), mask=rmask)
        ds = dh * rw[:, None]
        dg = tl.where(g <= limit, ds * uc * sig * (1.0 + gc * (1.0 - sig)), 0.0)
        du = tl.where((u >= -limit) & (u <= limit), ds * silu, 0.0)
        optr = out_ptr + rows64[:, None] * (2 * n_out) + cols[None, :]
        tl.store(optr, _cast(dg, ct), mask=omask)
        tl.store(optr + n_out, _cast(du, ct), mask=omask)
    else:
        if SCATTER_O:
            orow = tl.load(orow_ptr + rows, mask=rmask, other=0).to(tl.int64)
        else:
            orow = rows64
        tl.store(out_ptr + orow[:, None] * so + cols[None, :], _cast(acc, ct), mask=omask)


@triton.jit
def _wgrad_kernel(g_ptr, grow_ptr, a_ptr, arow_ptr, out_ptr, start_ptr, count_ptr, n_out, k_out, sg, sa,
                  GATHER_G: tl.constexpr, GATHER_A: tl.constexpr, IEEE: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    """dW_e[c, j] = sum over expert e's sorted rows r of G[grow(r), c] * A[arow(r), j]; out `[E, n_out, k_out]`
    (contiguous, the bank's dtype). Experts without rows store zeros."""
    e, pn, pk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(start_ptr + e)
    count = tl.load(count_ptr + e)
    cols = pn * BN + tl.arange(0, BN)
    ks = pk * BK + tl.arange(0, BK)
    cmask, kmask = cols < n_out, ks < k_out
    ct = out_ptr.dtype.element_ty
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for r0 in range(0, count, BM):
        local = r0 + tl.arange(0, BM)
        rmask = local < count
        rows = start + local
        if GATHER_G:
            grow = tl.load(grow_ptr + rows, mask=rmask, other=0).to(tl.int64)
        else:
            grow = rows.to(tl.int64)
        if GATHER_A:
            arow = tl.load(arow_ptr + rows, mask=rmask, other=0).to(tl.int64)
        else:
            arow = rows.to(tl.int64)
        g = tl.load(g_ptr + grow[:, None] * sg + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        a = tl.load(a_ptr + arow[:, None] * sa + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        acc = _dot(tl.trans(_cast(g, ct)), _cast(a, ct), acc, IEEE)
    optr = out_ptr + e.to(tl.int64) * n_out * k_out + cols[:, None] * k_out + ks[None, :]
    tl.store(optr, _cast(acc, ct), mask=cmask[:, None] & kmask[None, :])


# ------------------------------------------------------------------------------------------------------ host side


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _blocks(n_out: int, n_red: int, wide: int = 128) -> tuple[int, int]:
    """(BN, BK): 16 x 32 under the interpreter (tiny shapes still get several blocks and ragged tails)."""
    if interpreting():
        return 16, 32
    return min(wide, block_size(n_out)), min(64, block_size(n_red))


class _Weight:
    """Kernel arguments of one weight: a dense `[E, N, K]` / `[N, K]` tensor or a `PackedWeight` (FP8 / FP4)."""

    def __init__(self, w, halves: int | None = None):
        if isinstance(w, PackedWeight):
            fp4 = w.format.per_element == 2
            self.fmt, (self.sb_n, self.sb_k) = (2 if fp4 else 1), w.format.block
            self.data, self.scale = w.data.view(torch.uint8), w.scale
            if self.scale.dtype == torch.float8_e8m0fnu:
                self.scale = self.scale.view(torch.uint8)
            self.e8m0 = self.scale.dtype == torch.uint8
            n = w.shape[-2]
            halves = w.halves if halves is None else halves
            self.half_rows = n // halves if halves > 1 else n
            self.blocks_per_half = _cdiv(self.half_rows, self.sb_n)
        else:
            self.fmt, self.sb_n, self.sb_k, self.e8m0 = 0, 1, 1, False
            self.data = self.scale = w
            self.half_rows = self.blocks_per_half = 1
        lead = self.data.dim() == 3
        self.sw = (self.data.stride(0) if lead else 0, self.data.stride(-2), self.data.stride(-1))
        self.ss = (self.scale.stride(0) if lead else 0, self.scale.stride(-2), self.scale.stride(-1))

    def args(self) -> tuple:
        return (*self.sw, *self.ss, self.half_rows, self.blocks_per_half)

    def meta(self) -> dict:
        return {"FMT": self.fmt, "SB_N": self.sb_n, "SB_K": self.sb_k, "SCALE_E8M0": self.e8m0}


def _routing(topk_idx: torch.Tensor, n_experts: int, bm: int):
    """Sort the (token, slot) pairs by expert and build the tile map, all on the device (no host sync).

    Returns order (sorted row -> slot), token (sorted row -> token, int32), starts / counts per expert, and the
    tile map (expert, first row, row end) of a grid of cdiv(T*K, BM) + min(E, T*K) tiles (surplus tiles: empty)."""
    t, k = topk_idx.shape
    flat = topk_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    starts = torch.cumsum(counts, 0) - counts
    tiles = (counts + bm - 1) // bm
    tile_end = torch.cumsum(tiles, 0)
    n_tiles = _cdiv(t * k, bm) + min(n_experts, t * k)
    p = torch.arange(n_tiles, device=flat.device)
    expert = torch.searchsorted(tile_end, p, right=True)
    valid = expert < n_experts
    ec = expert.clamp(max=n_experts - 1)
    lo = torch.where(valid, starts[ec] + (p - (tile_end[ec] - tiles[ec])) * bm, 0)
    hi = torch.where(valid, starts[ec] + counts[ec], 0)
    tile_map = (ec.to(torch.int32), lo.to(torch.int32), hi.to(torch.int32))
    token = (order // k).to(torch.int32)
    return order, token, starts.to(torch.int32), counts.to(torch.int32), tile_map


def _row_block(n_rows: int, n_experts: int) -> int:
    """BM: about the average rows per active expert, 16..64 (decode: few rows per expert)."""
    if interpreting():
        return 16
    return max(16, min(64, block_size(n_rows // max(1, min(n_experts, n_rows)), 16)))


def _mm(a, w: _Weight, out, tile_map, n_out, n_red, bm, trans, arow=None, orow=None, swiglu=None):
    """Launch `_grouped_mm_kernel` over the tile map (see its docstring); `swiglu` = (gu, rw, dwp, limit)."""
    bn, bk = _blocks(n_out, n_red)
    gu, rw, dwp, limit = swiglu if swiglu is not None else (out, out, out, 0.0)
    grid = (tile_map[0].shape[0], _cdiv(n_out, bn))
    _grouped_mm_kernel[grid](
        a, arow if arow is not None else tile_map[0], w.data, w.scale, out,
        orow if orow is not None else tile_map[0], *tile_map, gu, rw, dwp,
        n_out, n_red, gu.shape[0] if swiglu is not None else 0, a.stride(0), out.stride(0), *w.args(), float(limit),
        GATHER_A=arow is not None, SCATTER_O=orow is not None, TRANS_W=trans, SWIGLU_BWD=swiglu is not None,
        IEEE=out.dtype == torch.float32, BM=bm, BN=bn, BK=bk, **w.meta(),
    )  # fmt: skip
    return out


def _wgrad(g, grow, a, arow, starts, counts, n_experts, dtype):
    """dW `[E, N, K]` = per expert sum of G rows^T A rows (`_wgrad_kernel`)."""
    n_out, k_out = g.shape[1], a.shape[1]
    out = _empty(n_experts, n_out, k_out, dtype=dtype, device=g.device)
    bn, bk = _blocks(n_out, k_out, wide=64)
    bm = 16 if interpreting() else 32
    grid = (n_experts, _cdiv(n_out, bn), _cdiv(k_out, bk))
    _wgrad_kernel[grid](
        g, grow if grow is not None else starts, a, arow if arow is not None else starts, out, starts, counts,
        n_out, k_out, g.stride(0), a.stride(0), GATHER_G=grow is not None, GATHER_A=arow is not None,
        IEEE=dtype == torch.float32, BM=bm, BN=bn, BK=bk,
    )  # fmt: skip
    return out


class _GroupedExperts(torch.autograd.Function):
    """Routed experts over dense banks or `PackedWeight` banks (frozen); see the module docstring."""

    @staticmethod
    def forward(ctx, x, gate_up, down, topk_idx, topk_weights, limit):
        t, k = topk_idx.shape
        n_experts, two_inter, dim = gate_up.shape
        inter, n_rows = two_inter // 2, t * k
        dtype, dev = x.dtype, x.device
        x = x.contiguous()
        bm = _row_block(n_rows, n_experts)
        order, token, starts, counts, tile_map = _routing(topk_idx, n_experts, bm)
        rw = topk_weights.reshape(-1)[order].float()
        w13, w2 = _Weight(gate_up), _Weight(down)
        save = any(ctx.needs_input_grad[i] for i in (0, 1, 2, 4))
        h = _empty(n_rows, inter, dtype=dtype, device=dev)
        gu = _empty(n_rows, two_inter, dtype=dtype, device=dev) if save else h
        bn, bk = _blocks(inter, dim, wide=64)
        _gate_up_kernel[(tile_map[0].shape[0], _cdiv(inter, bn))](
            x, token, w13.data, w13.scale, rw, h, gu, *tile_map, inter, dim, x.stride(0), *w13.args(), float(limit),
            STORE_GU=save, IEEE=dtype == torch.float32, BM=bm, BN=bn, BK=bk, **w13.meta(),
        )  # fmt: skip
        slots = _mm(h, w2, _empty(n_rows, dim, dtype=dtype, device=dev), tile_map, dim, inter, bm, False, orow=order)
        if save:
            # dense banks through save_for_backward (version checks); PackedWeight views (frozen) as attributes
            banks = [b for b in (gate_up, down) if isinstance(b, torch.Tensor)]
            ctx.save_for_backward(x, h, gu, rw, order, token, starts, counts, *tile_map, *banks)
            ctx.views = [None if isinstance(b, torch.Tensor) else b for b in (gate_up, down)]
            ctx.meta = (bm, float(limit), topk_weights.dtype, k)
        return torch.sum(slots.view(t, k, dim), dim=1, dtype=torch.float32)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, h, gu, rw, order, token, starts, counts, *rest = ctx.saved_tensors
        tile_map, banks = rest[:3], iter(rest[3:])
        gate_up, down = (next(banks) if v is None else v for v in ctx.views)
        bm, limit, w_dtype, k = ctx.meta
        n_rows, inter = h.shape
        t, dim = x.shape
        dtype, dev = x.dtype, x.device
        dy = dy.contiguous().float()
        w13, w2 = _Weight(gate_up), _Weight(down)
        n_blocks = _cdiv(inter, _blocks(inter, dim)[0])
        dgu = _empty(n_rows, 2 * inter, dtype=dtype, device=dev)
        dwp = _empty(n_blocks, n_rows, dtype=torch.float32, device=dev)
        # dh = dy W2_e (gathered dy rows), SwiGLU backward fused: dgu and partial d(weights)
        _mm(dy, w2, dgu, tile_map, inter, dim, bm, True, arow=token, swiglu=(gu, rw, dwp, limit))
        dx = dw13 = dw2 = dtw = None
        if ctx.needs_input_grad[0]:
            slots = _mm(dgu, w13, _empty(n_rows, dim, dtype=dtype, device=dev), tile_map, dim, 2 * inter, bm, True,
                        orow=order)  # fmt: skip
            dx = torch.sum(slots.view(t, k, dim), dim=1, dtype=torch.float32).to(dtype)
        if ctx.needs_input_grad[1]:
            dw13 = _wgrad(dgu, None, x, token, starts, counts, gate_up.shape[0], gate_up.dtype)
        if ctx.needs_input_grad[2]:
            dw2 = _wgrad(dy, token, h, None, starts, counts, down.shape[0], down.dtype)
        if ctx.needs_input_grad[4]:
            dtw = torch.empty(n_rows, dtype=torch.float32, device=dev)
            dtw[order] = dwp.sum(0)
            dtw = dtw.view(t, k).to(w_dtype)
        return dx, dw13, dw2, None, dtw, None


def grouped_experts(x, gate_up_proj, down_proj, topk_idx, topk_weights, swiglu_limit, static_shapes=False,
                    act_quant=False, lora_a13=None, lora_b13=None, lora_a2=None, lora_b2=None):  # fmt: skip
    """Routed experts (see ``ops_reference.grouped_experts``): x `[T, d]`, gate_up_proj `[E, 2I, d]`, down_proj
    `[E, d, I]` (dense or `PackedWeight`), topk_idx / topk_weights `[T, K]` -> `[T, d]` fp32. `static_shapes` needs
    no special path: nothing here synchronises with the host."""
    if not _experts_supported(x, gate_up_proj, down_proj, topk_idx, topk_weights, act_quant,
                              (lora_a13, lora_b13, lora_a2, lora_b2)):  # fmt: skip
        raise RuntimeError("triton grouped_experts: unsupported call (see supports)")
    return _GroupedExperts.apply(x, gate_up_proj, down_proj, topk_idx, topk_weights, swiglu_limit)


# --------------------------------------------------------------------------------------------- quantized_linear


class _QuantizedLinear(torch.autograd.Function):
    """y = x W^T with W dequantized per tile; backward: dx = dy W (the weight is frozen)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.weight, ctx.shape, ctx.dtype = weight, x.shape, x.dtype
        return _linear(x.reshape(-1, x.shape[-1]), _Weight(weight, halves=1), weight.shape[0], False).view(
            *x.shape[:-1], weight.shape[0]
        )

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        weight, shape = ctx.weight, ctx.shape
        dx = _linear(dy.reshape(-1, dy.shape[-1]).to(ctx.dtype), _Weight(weight, halves=1), shape[-1], True)
        return dx.view(shape), None


def _linear(a: torch.Tensor, w: _Weight, n_out: int, trans: bool) -> torch.Tensor:
    """a `[M, R]` times the one weight ([N, K]; `trans`: W itself, else W^T) -> `[M, n_out]` in a.dtype."""
    a = a.contiguous()
    m = a.shape[0]
    out = _empty(m, n_out, dtype=a.dtype, device=a.device)
    if m == 0:
        return out
    bm = 16 if interpreting() else max(16, min(64, block_size(m)))
    p = torch.arange(_cdiv(m, bm), device=a.device, dtype=torch.int32)
    tile_map = (torch.zeros_like(p), p * bm, torch.full_like(p, m))
    return _mm(a, w, out, tile_map, n_out, a.shape[1], bm, trans)


def quantized_linear(x: torch.Tensor, weight: PackedWeight, act_quant: bool = False) -> torch.Tensor:
    """`y = x W^T` (see ``ops_reference.quantized_linear``): x `[..., K]`, weight FP8 `[N, K]` / packed FP4
    `[N, K/2]` -> `[..., N]` in x.dtype. act_quant is not supported (the reference runs it)."""
    if not _linear_supported(x, weight, act_quant):
        raise RuntimeError("triton quantized_linear: unsupported call (see supports)")
    return _QuantizedLinear.apply(x, weight)


# ------------------------------------------------------------------------------------------------------ supports


def _packed_ok(w, dtype: torch.dtype, dims: int) -> bool:
    """A `PackedWeight` in an official format (FP8 E4M3 blocks, packed FP4 1x32 groups; not bitsandbytes) with the
    scale grid the reference expects, computing in `dtype`, on the kernel device."""
    if type(w) is not PackedWeight or type(w.format) is not WeightFormat or w.dtype != dtype:
        return False
    fmt, data, scale = w.format, w.data, w.scale
    if data.dim() != dims or scale.dim() != dims or scale.dtype not in _SCALE_DTYPES:
        return False
    if fmt.per_element == 2:
        ok = data.dtype in (torch.int8, torch.uint8) and fmt.block[0] == 1
    else:
        ok = fmt.per_element == 1 and data.dtype == torch.float8_e4m3fn
    halves = w.halves if dims == 3 else 1
    return ok and tuple(scale.shape) == fmt.scale_shape(tuple(w.shape), halves) and on_kernel_device(data, scale)


def _experts_supported(x, gate_up, down, topk_idx, topk_weights, act_quant, lora) -> bool:
    if act_quant or any(t is not None for t in lora) or not isinstance(x, torch.Tensor) or x.dim() != 2:
        return False
    if topk_idx.dim() != 2 or topk_idx.numel() == 0 or topk_idx.is_floating_point():
        return False
    if topk_weights.shape != topk_idx.shape:
        return False
    if not (float_dtypes_ok(x, topk_weights) and on_kernel_device(x, topk_idx, topk_weights)):
        return False
    for bank in (gate_up, down):
        if isinstance(bank, torch.Tensor):
            if bank.dim() != 3 or bank.dtype != x.dtype or not on_kernel_device(bank):
                return False
        elif not _packed_ok(bank, x.dtype, 3):
            return False
    e, two_inter, dim = gate_up.shape
    return two_inter % 2 == 0 and dim == x.shape[1] and tuple(down.shape) == (e, dim, two_inter // 2)


def _linear_supported(x, weight, act_quant) -> bool:
    return (
        not act_quant
        and isinstance(x, torch.Tensor)
        and float_dtypes_ok(x)
        and on_kernel_device(x)
        and _packed_ok(weight, weight.dtype, 2)
        and x.shape[-1] == weight.shape[-1]
    )


def _experts_supports(x, gate_up_proj, down_proj, topk_idx, topk_weights, swiglu_limit, static_shapes=False,
                      act_quant=False, lora_a13=None, lora_b13=None, lora_a2=None, lora_b2=None) -> bool:  # fmt: skip
    return _experts_supported(x, gate_up_proj, down_proj, topk_idx, topk_weights, act_quant,
                              (lora_a13, lora_b13, lora_a2, lora_b2))  # fmt: skip


def _linear_supports(x, weight, act_quant=False) -> bool:
    return _linear_supported(x, weight, act_quant)


def register_backend() -> None:
    """Register `grouped_experts` and `quantized_linear` under "triton"."""
    register("grouped_experts", "triton", grouped_experts, _experts_supports)
    register("quantized_linear", "triton", quantized_linear, _linear_supports)
