"""Triton backends of `rms_norm`, `hc_pre`, `hc_post` and `hc_head` (issue #15; tech report §2.2 mHC, forward-math.md
§2; the official `inference/kernel.py` fuses the same pre-mix + Sinkhorn step as `hc_split_sinkhorn`).

Forward kernels, one launch per op:
- `rms_norm`: one pass over each row (the whole row sits in one tile; `supports` caps the width).
- `hc_pre` / `hc_head` (`_hc_fwd`): a program owns `BLOCK_T` tokens. It reads the flattened `[n * d]` row once in
  `BLOCK_K` tiles, accumulating the sum of squares and the `M` projections `x . fn^T` with `tl.dot` (`M = (2 + n) n`
  mixes for `hc_pre`, `n` for `hc_head`); the rs-norm factor is applied after the dot (`r * (x . fn) = (r x) . fn`).
  The mixes go to a small fp32 scratch `[T, M]` (it is also saved for backward) and are re-read, after a barrier, in
  the shapes the tiny per-token math needs: sigmoid pre/post and, for `hc_pre`, the `[n, n]` softmax + column-first
  Sinkhorn on `[BLOCK_T, n, n]` register tiles. Register tensors cannot be re-indexed in Triton, hence the scratch.
  Then the collapse `sum_i pre_i X_i` reads x a second time (the block's rows are hot in L2).
- `hc_post`: `X'_j = post_j f + sum_i comb[i, j] X_i`, one token x one `d` tile per program.

Backward:
- `rms_norm`, `hc_post`: Triton kernels; the cross-row sums (dweight, and nothing else) are per-program partials summed
  by torch; `hc_post` reduces dpost / dcomb over `d` inside one program per token.
- `hc_pre` / `hc_head`: the heavy parts are Triton: `dpre_i = sum_d g . X_i` (`_hc_dpre`), the input gradient
  `dx = pre_i g + r (dmix . fn) - (r^2 / nd) (dmix . mix) x` (`_hc_dx`) and `dfn = (r dmix)^T . x` (`_hc_dfn`, per
  token-split partials). The map mixes -> (pre, post, comb) (sigmoids, softmax and the Sinkhorn iterations, O(T n^2
  iters) on `[T, M]` fp32, no `d` axis) is differentiated by recomputing it with PyTorch autograd from the saved
  mixes: a Sinkhorn backward in Triton would save nothing measurable, the tensors are 1/(n d / M) of x.

Numerics: fp32 accumulation everywhere; `tl.dot` uses `input_precision="ieee"` for fp32 inputs (parity with the fp32
reference; tf32 would not hold 1e-6) and tf32 for bf16/fp16 inputs (x is exact in tf32, fn rounds to 2^-11). Outputs
and dtypes are the reference's: collapsed / hc_post / rms_norm in x.dtype, post / comb fp32.
"""

from __future__ import annotations

import torch

from .triton_common import block_size, float_dtypes_ok, on_kernel_device, tl, triton

# Tile sizes (module-level so the tests can shrink them to force several tiles on tiny shapes).
BLOCKS = {"rows": 4096, "t": 16, "k": 128, "d": 256, "post_d": 1024}
MAX_NORM_DIM = 32768  # rms_norm keeps one row in one tile
MAX_STREAMS = 16


def _precision(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _programs(blocks: int, x: torch.Tensor) -> int:
    """Programs of the persistent reduction kernels: a few per SM on GPU; two under the interpreter so the
    strided loop runs more than once on small tests."""
    per = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 2
    return max(1, min(blocks, per))


# ----------------------------------------------------------------------------------------------------------- rms_norm


@triton.jit
def _rms_fwd(X, W, Y, RSTD, R, D, eps, HAS_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rm, cm = rows < R, cols < D
    mask = rm[:, None] & cm[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    y = x * r[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, r, mask=rm)


@triton.jit
def _rms_bwd(X, W, G, RSTD, DX, DW, R, D, HAS_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """dx = r w g - (r^3 / D) x sum(x w g); dw partial of this program's rows (strided over row blocks)."""
    pid, nprog = tl.program_id(0), tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    cm = cols < D
    if HAS_W:
        w = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(pid * BLOCK_R, R, nprog * BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        rm = rows < R
        mask = rm[:, None] & cm[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(RSTD + rows, mask=rm, other=0.0)
        wg = g
        if HAS_W:
            wg = g * w[None, :]
        c = tl.sum(x * wg, axis=1) / D
        dx = r[:, None] * wg - (r * r * r * c)[:, None] * x
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_W:
            dw += tl.sum(g * x * r[:, None], axis=0)
    if HAS_W:
        tl.store(DW + pid * D + cols, dw, mask=cm)


def _rms_blocks(rows: int, dim: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_R, num_warps): whole rows, several rows per program while the tile is small."""
    block_d = block_size(dim)
    block_r = max(1, min(block_size(rows, 1), BLOCKS["rows"] // block_d))
    return block_d, block_r, 8 if block_r * block_d >= 4096 else 4


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape, dim = x.shape, x.shape[-1]
        x2 = x.reshape(-1, dim).contiguous()
        rows = x2.shape[0]
        y = torch.empty_like(x2)
        rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
        block_d, block_r, warps = _rms_blocks(rows, dim)
        w = weight.contiguous() if weight is not None else None
        if rows:
            _rms_fwd[(triton.cdiv(rows, block_r),)](
                x2, w, y, rstd, rows, dim, eps, HAS_W=w is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps
            )
        ctx.save_for_backward(x2, w, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, gy):
        x2, weight, rstd = ctx.saved_tensors
        rows, dim = x2.shape
        g = gy.reshape(rows, dim).contiguous()
        dx = torch.empty_like(x2)
        block_d, block_r, warps = _rms_blocks(rows, dim)
        nprog = _programs(triton.cdiv(rows, block_r), x2) if rows else 0
        dw_part = (
            torch.zeros(max(nprog, 1), dim, device=x2.device, dtype=torch.float32) if weight is not None else None
        )
        if rows:
            _rms_bwd[(nprog,)](
                x2,
                weight,
                g,
                rstd,
                dx,
                dw_part,
                rows,
                dim,
                HAS_W=weight is not None,
                BLOCK_R=block_r,
                BLOCK_D=block_d,
                num_warps=warps,
            )
        dw = dw_part.sum(0).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        return dx.view(ctx.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: x `[..., D]`, weight `[D]` or None -> `[..., D]` in x.dtype."""
    return _RMSNorm.apply(x, weight, eps)


def _rms_norm_supports(x, weight, eps) -> bool:
    return (
        on_kernel_device(x, weight)
        and float_dtypes_ok(x, weight)
        and x.dim() >= 1
        and 0 < x.shape[-1] <= MAX_NORM_DIM
        and (weight is None or tuple(weight.shape) == (x.shape[-1],))
    )


# --------------------------------------------------------------------------------------------- hc_pre / hc_head: fwd


@triton.jit
def _hc_fwd(
    X, FN, BASE, SCALE, MIX, RSTD, POST, COMB, OUT, T, D, M, iters, hc_eps, norm_eps,
    N: tl.constexpr, IS_PRE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """x `[T, N, D]` -> mixes `[T, M]`, rstd `[T]`, collapsed `[T, D]` (+ post `[T, N]`, comb `[T, N, N]`)."""
    K = N * D
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < T
    t64 = t.to(tl.int64)
    m = tl.arange(0, BLOCK_M)
    mm = m < M
    # Pass 1: sum of squares and the M projections of the flattened row, one K tile at a time.
    acc = tl.zeros([BLOCK_T, BLOCK_M], dtype=tl.float32)
    ss = tl.zeros([BLOCK_T], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < K
        x = tl.load(X + t64[:, None] * K + k[None, :], mask=tm[:, None] & km[None, :], other=0.0).to(tl.float32)
        ss += tl.sum(x * x, axis=1)
        w = tl.load(FN + m[None, :] * K + k[:, None], mask=km[:, None] & mm[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    r = tl.rsqrt(ss / K + norm_eps)
    tl.store(MIX + t64[:, None] * M + m[None, :], acc * r[:, None], mask=tm[:, None] & mm[None, :])
    tl.store(RSTD + t, r, mask=tm)
    tl.debug_barrier()  # the mixes are re-read below by other threads of this program

    i = tl.arange(0, BLOCK_N)
    im = i < N
    tim = tm[:, None] & im[None, :]
    mix = tl.load(MIX + t64[:, None] * M + i[None, :], mask=tim, other=0.0)
    pre = tl.sigmoid(mix * tl.load(SCALE) + tl.load(BASE + i, mask=im, other=0.0)[None, :]) + hc_eps
    if IS_PRE:
        mix = tl.load(MIX + t64[:, None] * M + N + i[None, :], mask=tim, other=0.0)
        post = 2 * tl.sigmoid(mix * tl.load(SCALE + 1) + tl.load(BASE + N + i, mask=im, other=0.0)[None, :])
        tl.store(POST + t64[:, None] * N + i[None, :], post, mask=tim)
        # comb [BLOCK_T, N(src row i), N(dst column j)]: softmax over j, then column-first Sinkhorn.
        cidx = i[:, None] * N + i[None, :]
        valid = im[:, None] & im[None, :]
        cmask = tm[:, None, None] & valid[None, :, :]
        c = tl.load(MIX + t64[:, None, None] * M + 2 * N + cidx[None, :, :], mask=cmask, other=0.0)
        c = c * tl.load(SCALE + 2) + tl.load(BASE + 2 * N + cidx, mask=valid, other=0.0)[None, :, :]
        c = tl.where(valid[None, :, :], c, -1e30)
        c = tl.exp(c - tl.max(c, axis=2)[:, :, None])
        c = c / tl.sum(c, axis=2)[:, :, None]
        c = tl.where(valid[None, :, :], c + hc_eps, 0.0)  # padded rows/columns stay out of the sums
        c = c / (tl.sum(c, axis=1)[:, None, :] + hc_eps)
        for _ in range(iters - 1):
            c = c / (tl.sum(c, axis=2)[:, :, None] + hc_eps)
            c = c / (tl.sum(c, axis=1)[:, None, :] + hc_eps)
        tl.store(COMB + t64[:, None, None] * (N * N) + cidx[None, :, :], c, mask=cmask)

    # Pass 2: collapse sum_i pre_i X_i, one d tile at a time.
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = tm[:, None] & (dd < D)[None, :]
        y = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for s in tl.static_range(N):
            p = tl.sum(tl.where(i[None, :] == s, pre, 0.0), axis=1)
            xs = tl.load(X + t64[:, None] * K + s * D + dd[None, :], mask=dmask, other=0.0).to(tl.float32)
            y += p[:, None] * xs
        tl.store(OUT + t64[:, None] * D + dd[None, :], y.to(OUT.dtype.element_ty), mask=dmask)


# --------------------------------------------------------------------------------------------- hc_pre / hc_head: bwd


@triton.jit
def _hc_dpre(X, G, DPRE, T, D, N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dpre[t, i] = sum_d g[t, d] x[t, i, d] (the collapse's gradient w.r.t. its weights)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < T
    t64 = t.to(tl.int64)
    i = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = tm[:, None] & (dd < D)[None, :]
        g = tl.load(G + t64[:, None] * D + dd[None, :], mask=dmask, other=0.0).to(tl.float32)
        for s in tl.static_range(N):
            xs = tl.load(X + t64[:, None] * (N * D) + s * D + dd[None, :], mask=dmask, other=0.0).to(tl.float32)
            acc += tl.where(i[None, :] == s, tl.sum(g * xs, axis=1)[:, None], 0.0)
    tl.store(DPRE + t64[:, None] * N + i[None, :], acc, mask=tm[:, None] & (i < N)[None, :])


@triton.jit
def _hc_dx(
    X, FN, G, PRE, MIX, DMIX, RSTD, DX, T, D, M,
    N: tl.constexpr, HAS_G: tl.constexpr, PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """dx = pre_i g + r (dmix . fn) - (r^2 / K) (dmix . mix) x over the flattened `[T, K = N D]` rows."""
    K = N * D
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < T
    t64 = t.to(tl.int64)
    m = tl.arange(0, BLOCK_M)
    mmask = tm[:, None] & (m < M)[None, :]
    dmix = tl.load(DMIX + t64[:, None] * M + m[None, :], mask=mmask, other=0.0)
    mix = tl.load(MIX + t64[:, None] * M + m[None, :], mask=mmask, other=0.0)
    r = tl.load(RSTD + t, mask=tm, other=0.0)
    coef = r * r / K * tl.sum(dmix * mix, axis=1)
    dmr = dmix * r[:, None]
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < K
        kmask = tm[:, None] & km[None, :]
        w = tl.load(FN + m[:, None] * K + k[None, :], mask=(m < M)[:, None] & km[None, :], other=0.0)
        dx = tl.dot(dmr, w, input_precision=PRECISION)
        x = tl.load(X + t64[:, None] * K + k[None, :], mask=kmask, other=0.0).to(tl.float32)
        dx -= coef[:, None] * x
        if HAS_G:
            s = k // D
            p = tl.load(PRE + t64[:, None] * N + s[None, :], mask=kmask, other=0.0)
            g = tl.load(G + t64[:, None] * D + (k - s * D)[None, :], mask=kmask, other=0.0).to(tl.float32)
            dx += p * g
        tl.store(DX + t64[:, None] * K + k[None, :], dx.to(DX.dtype.element_ty), mask=kmask)


@triton.jit
def _hc_dfn(
    X, DMIX, RSTD, PART, T, K, M,
    PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """PART[split] = sum over this split's token blocks of (r dmix)^T `[M, BLOCK_T]` . x `[BLOCK_T, BLOCK_K]`."""
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    km = k < K
    split, nsplit = tl.program_id(1), tl.num_programs(1)
    m = tl.arange(0, BLOCK_M)
    mm = m < M
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for t0 in range(split * BLOCK_T, T, nsplit * BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tm = t < T
        t64 = t.to(tl.int64)
        dmr = tl.load(DMIX + t64[None, :] * M + m[:, None], mask=mm[:, None] & tm[None, :], other=0.0)
        dmr = dmr * tl.load(RSTD + t, mask=tm, other=0.0)[None, :]
        x = tl.load(X + t64[:, None] * K + k[None, :], mask=tm[:, None] & km[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(dmr, x, acc, input_precision=PRECISION)
    tl.store(PART + split.to(tl.int64) * M * K + m[:, None] * K + k[None, :], acc, mask=mm[:, None] & km[None, :])


def _mix_weights(mix, base, scale, n: int, iters: int, hc_eps: float, is_pre: bool):
    """The reference's map mixes `[T, M]` -> pre `[T, n]` (, post `[T, n]`, comb `[T, n, n]`), in PyTorch: the
    backward differentiates it with autograd (module docstring)."""
    if not is_pre:
        return (torch.sigmoid(mix * scale + base) + hc_eps,)
    pre = torch.sigmoid(mix[..., :n] * scale[0] + base[:n]) + hc_eps
    post = 2 * torch.sigmoid(mix[..., n : 2 * n] * scale[1] + base[n : 2 * n])
    comb = mix[..., 2 * n :] * scale[2] + base[2 * n :]
    comb = torch.softmax(comb.unflatten(-1, (n, n)), dim=-1) + hc_eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
    return pre, post, comb


def _hc_shapes(x: torch.Tensor, m: int) -> dict:
    n, d = x.shape[-2:]
    return dict(
        N=n, BLOCK_T=BLOCKS["t"], BLOCK_K=min(BLOCKS["k"], block_size(n * d)), BLOCK_M=block_size(m),
        BLOCK_N=block_size(n, 1), BLOCK_D=min(BLOCKS["d"], block_size(d)),
    )  # fmt: skip


class _HcMix(torch.autograd.Function):
    """`hc_pre` (is_pre) and `hc_head`: both are `_hc_fwd` with `M = (2 + n) n` or `n` mixes."""

    @staticmethod
    def forward(ctx, x, fn, base, scale, iters, hc_eps, norm_eps, is_pre):
        lead, (n, d) = x.shape[:-2], x.shape[-2:]
        x3 = x.reshape(-1, n, d).contiguous()
        t_count, m = x3.shape[0], fn.shape[0]
        dev, f32 = x.device, torch.float32
        mix = torch.empty(t_count, m, device=dev, dtype=f32)
        rstd = torch.empty(t_count, device=dev, dtype=f32)
        out = torch.empty(t_count, d, device=dev, dtype=x.dtype)
        post = torch.empty(t_count, n, device=dev, dtype=f32) if is_pre else None
        comb = torch.empty(t_count, n, n, device=dev, dtype=f32) if is_pre else None
        cfg = _hc_shapes(x, m)
        if t_count:
            _hc_fwd[(triton.cdiv(t_count, cfg["BLOCK_T"]),)](
                x3, fn.contiguous(), base.contiguous(), scale.contiguous(), mix, rstd, post, comb, out,
                t_count, d, m, iters, hc_eps, norm_eps, IS_PRE=is_pre, PRECISION=_precision(x), **cfg,
            )  # fmt: skip
        ctx.save_for_backward(x3, fn, base, scale, mix, rstd)
        ctx.cfg = (lead, iters, hc_eps, is_pre)
        if not is_pre:
            return out.view(*lead, d)
        return out.view(*lead, d), post.view(*lead, n), comb.view(*lead, n, n)

    @staticmethod
    def backward(ctx, g_out, g_post=None, g_comb=None):
        x3, fn, base, scale, mix, rstd = ctx.saved_tensors
        lead, iters, hc_eps, is_pre = ctx.cfg
        t_count, n, d = x3.shape
        m, cfg = mix.shape[1], _hc_shapes(x3, mix.shape[1])
        grid = (triton.cdiv(t_count, cfg["BLOCK_T"]),)
        g = g_out.reshape(t_count, d).contiguous() if g_out is not None else None
        dpre = torch.zeros(t_count, n, device=x3.device, dtype=torch.float32)
        if g is not None and t_count:
            _hc_dpre[grid](
                x3, g, dpre, t_count, d, N=n, BLOCK_T=cfg["BLOCK_T"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"]
            )
        # The tiny mixes -> (pre, post, comb) map: recomputed and differentiated by PyTorch autograd.
        with torch.enable_grad():
            mix_ = mix.detach().requires_grad_(True)
            base_ = base.detach().float().requires_grad_(True)
            scale_ = scale.detach().float().requires_grad_(True)
            outs = _mix_weights(mix_, base_, scale_ if is_pre else scale_[0], n, iters, hc_eps, is_pre)
            grads = [dpre]
            if is_pre:
                grads += [
                    g_post.reshape(t_count, n).float() if g_post is not None else torch.zeros_like(outs[1]),
                    g_comb.reshape(t_count, n, n).float() if g_comb is not None else torch.zeros_like(outs[2]),
                ]
            dmix, dbase, dscale = torch.autograd.grad(outs, (mix_, base_, scale_), grads, allow_unused=True)
        pre = outs[0].detach().contiguous()
        dmix = dmix.contiguous()
        fn_c = fn.contiguous()
        dx = dfn = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x3)
            if t_count:
                _hc_dx[grid](
                    x3, fn_c, g, pre, mix, dmix, rstd, dx, t_count, d, m, N=n, HAS_G=g is not None,
                    PRECISION=_precision(x3), BLOCK_T=cfg["BLOCK_T"], BLOCK_K=cfg["BLOCK_K"], BLOCK_M=cfg["BLOCK_M"],
                )  # fmt: skip
            dx = dx.view(*lead, n, d)
        if ctx.needs_input_grad[1]:
            k = n * d
            ksplits = triton.cdiv(k, cfg["BLOCK_K"])
            splits = _programs(triton.cdiv(t_count, cfg["BLOCK_T"]), x3) if t_count else 1
            if x3.is_cuda:  # enough programs to fill the GPU, few partials to sum
                splits = max(1, min(triton.cdiv(t_count, cfg["BLOCK_T"]), triton.cdiv(splits, ksplits)))
            part = torch.zeros(splits, m, k, device=x3.device, dtype=torch.float32)
            if t_count:
                _hc_dfn[(ksplits, splits)](
                    x3, dmix, rstd, part, t_count, k, m, PRECISION=_precision(x3), BLOCK_T=cfg["BLOCK_T"],
                    BLOCK_K=cfg["BLOCK_K"], BLOCK_M=cfg["BLOCK_M"],
                )  # fmt: skip
            dfn = part.sum(0).to(fn.dtype)
        dbase = dbase.to(base.dtype) if ctx.needs_input_grad[2] else None
        dscale = dscale.to(scale.dtype) if ctx.needs_input_grad[3] else None
        return dx, dfn, dbase, dscale, None, None, None, None


def hc_pre(x, fn, base, scale, sinkhorn_iters, hc_eps, norm_eps):
    """mHC pre-mix: x `[B, S, n, d]`, fn `[(2 + n) n, n d]`, base `[(2 + n) n]`, scale `[3]` -> collapsed
    `[B, S, d]` (x.dtype), post `[B, S, n]` and comb `[B, S, n, n]` (fp32)."""
    return _HcMix.apply(x, fn, base, scale, int(sinkhorn_iters), float(hc_eps), float(norm_eps), True)


def hc_head(x, fn, base, scale, hc_eps, norm_eps):
    """Final mHC collapse: x `[B, S, n, d]`, fn `[n, n d]`, base `[n]`, scale `[1]` -> `[B, S, d]` (x.dtype)."""
    return _HcMix.apply(x, fn, base, scale, 0, float(hc_eps), float(norm_eps), False)


def _hc_mix_supports(x, fn, base, scale, mixes: int, scales: int) -> bool:
    if not (on_kernel_device(x, fn, base, scale) and float_dtypes_ok(x) and x.dim() >= 2):
        return False
    if any(t.dtype != torch.float32 for t in (fn, base, scale)):
        return False
    n, d = x.shape[-2:]
    return (
        1 <= n <= MAX_STREAMS
        and d >= 1
        and tuple(fn.shape) == (mixes, n * d)
        and tuple(base.shape) == (mixes,)
        and scale.dim() == 1
        and scale.numel() == scales
    )


def _hc_pre_supports(x, fn, base, scale, sinkhorn_iters, hc_eps, norm_eps) -> bool:
    n = x.shape[-2] if x.dim() >= 2 else 0
    return _hc_mix_supports(x, fn, base, scale, (2 + n) * n, 3)


def _hc_head_supports(x, fn, base, scale, hc_eps, norm_eps) -> bool:
    n = x.shape[-2] if x.dim() >= 2 else 0
    return _hc_mix_supports(x, fn, base, scale, n, 1)


# ------------------------------------------------------------------------------------------------------------- hc_post


@triton.jit
def _hc_post_fwd(F, X, POST, COMB, OUT, D, N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One token, one d tile: out[j] = post[j] f + sum_i comb[i, j] x[i]."""
    t = tl.program_id(0).to(tl.int64)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = dd < D
    j = tl.arange(0, BLOCK_N)
    jm = j < N
    f = tl.load(F + t * D + dd, mask=dm, other=0.0).to(tl.float32)
    post = tl.load(POST + t * N + j, mask=jm, other=0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for s in tl.static_range(N):
        xs = tl.load(X + t * (N * D) + s * D + dd, mask=dm, other=0.0).to(tl.float32)
        cs = tl.load(COMB + t * (N * N) + s * N + j, mask=jm, other=0.0)
        acc += cs[:, None] * xs[None, :]
    out = post[:, None] * f[None, :] + acc
    tl.store(OUT + t * (N * D) + j[:, None] * D + dd[None, :], out.to(OUT.dtype.element_ty),
             mask=jm[:, None] & dm[None, :])  # fmt: skip


@triton.jit
def _hc_post_bwd(
    F, X, POST, COMB, G, DF, DX, DPOST, DCOMB, D, N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr
):
    """One token: df = sum_j post_j g_j; dx_i = sum_j comb[i, j] g_j; dpost_j = g_j . f; dcomb[i, j] = x_i . g_j."""
    t = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_N)
    jm = j < N
    post = tl.load(POST + t * N + j, mask=jm, other=0.0)
    dpost = tl.zeros([BLOCK_N], dtype=tl.float32)
    dcomb = tl.zeros([BLOCK_N, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dm = dd < D
        gmask = jm[:, None] & dm[None, :]
        g = tl.load(G + t * (N * D) + j[:, None] * D + dd[None, :], mask=gmask, other=0.0).to(tl.float32)
        f = tl.load(F + t * D + dd, mask=dm, other=0.0).to(tl.float32)
        tl.store(DF + t * D + dd, tl.sum(post[:, None] * g, axis=0).to(DF.dtype.element_ty), mask=dm)
        dpost += tl.sum(g * f[None, :], axis=1)
        for s in tl.static_range(N):
            xs = tl.load(X + t * (N * D) + s * D + dd, mask=dm, other=0.0).to(tl.float32)
            cs = tl.load(COMB + t * (N * N) + s * N + j, mask=jm, other=0.0)
            tl.store(DX + t * (N * D) + s * D + dd, tl.sum(cs[:, None] * g, axis=0).to(DX.dtype.element_ty), mask=dm)
            dcomb += tl.where(j[:, None] == s, tl.sum(g * xs[None, :], axis=1)[None, :], 0.0)
    tl.store(DPOST + t * N + j, dpost, mask=jm)
    tl.store(DCOMB + t * (N * N) + j[:, None] * N + j[None, :], dcomb, mask=jm[:, None] & jm[None, :])


class _HcPost(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f, x, post, comb):
        n, d = x.shape[-2:]
        f2, x3 = f.reshape(-1, d).contiguous(), x.reshape(-1, n, d).contiguous()
        post2, comb3 = post.reshape(-1, n).contiguous(), comb.reshape(-1, n, n).contiguous()
        t_count = x3.shape[0]
        out = torch.empty_like(x3)
        block_d = min(BLOCKS["post_d"], block_size(d))
        if t_count:
            _hc_post_fwd[(t_count, triton.cdiv(d, block_d))](
                f2, x3, post2, comb3, out, d, N=n, BLOCK_N=block_size(n, 1), BLOCK_D=block_d
            )
        ctx.save_for_backward(f2, x3, post2, comb3)
        ctx.shapes = (f.shape, x.shape, post.shape, comb.shape)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, g):
        f2, x3, post2, comb3 = ctx.saved_tensors
        t_count, n, d = x3.shape
        g3 = g.reshape(t_count, n, d).contiguous()
        df, dx = torch.empty_like(f2), torch.empty_like(x3)
        dpost, dcomb = torch.empty_like(post2), torch.empty_like(comb3)
        if t_count:
            _hc_post_bwd[(t_count,)](
                f2, x3, post2, comb3, g3, df, dx, dpost, dcomb, d,
                N=n, BLOCK_N=block_size(n, 1), BLOCK_D=min(BLOCKS["post_d"], block_size(d)),
            )  # fmt: skip
        return tuple(t.view(s) for t, s in zip((df, dx, dpost, dcomb), ctx.shapes))


def hc_post(f, x, post, comb):
    """mHC expansion: f `[B, S, d]`, x `[B, S, n, d]`, post `[B, S, n]`, comb `[B, S, n, n]` (fp32) ->
    `[B, S, n, d]` in x.dtype."""
    return _HcPost.apply(f, x, post, comb)


def _hc_post_supports(f, x, post, comb) -> bool:
    if not (on_kernel_device(f, x, post, comb) and float_dtypes_ok(f, x) and x.dim() >= 2):
        return False
    n, d = x.shape[-2:]
    return (
        post.dtype == comb.dtype == torch.float32
        and 1 <= n <= MAX_STREAMS
        and tuple(f.shape) == (*x.shape[:-2], d)
        and tuple(post.shape) == tuple(x.shape[:-1])
        and tuple(comb.shape) == (*x.shape[:-1], n)
    )


def register_backend() -> None:
    """Register the four ops under "triton" (called by ``ops_backends.py`` when Triton is usable)."""
    from .ops import register

    register("rms_norm", "triton", rms_norm, _rms_norm_supports)
    register("hc_pre", "triton", hc_pre, _hc_pre_supports)
    register("hc_post", "triton", hc_post, _hc_post_supports)
    register("hc_head", "triton", hc_head, _hc_head_supports)
