"""PyTorch reference of every DeepSeek-V4 op: the specification the fused kernels are tested against.

Semantics follow the official `inference/model.py` (DeepSeek-V4 tech report §2); derivations are in
`docs/forward-math.md` of this project. Everything here is memory-bounded: attention and the lightning indexer
process queries in chunks and never build an S x S (or S x compressed-length) tensor for the whole sequence.

Conventions: `B` batch, `S` new tokens, `H` heads, `D` head dim, `N` compressed entries, `W` sliding window,
`P` cached window keys in front of the new ones, `m` compress ratio, `E` experts, `K` top-k.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .quant_formats import fp8_act_roundtrip

if TYPE_CHECKING:
    from .weight_formats import PackedWeight


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs (so gradcheck in float64 sees float64 math)."""
    return torch.promote_types(x.dtype, torch.float32)


def _up(x: torch.Tensor) -> torch.Tensor:
    return x.to(_acc_dtype(x))


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in fp32; `weight` None gives the unweighted norm. Returns `x.dtype`."""
    xf = _up(x)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = _up(weight) * y
    return y.to(x.dtype)


def _hc_mixes(x: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """[B, S, n, d] streams -> rs-scaled projections `(x_flat . fn^T) * rsqrt(mean(x^2) + eps)` in fp32."""
    flat = _up(x.flatten(-2))
    flat = flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + norm_eps)
    return F.linear(flat, _up(fn))


def hc_pre(
    x: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    sinkhorn_iters: int,
    hc_eps: float,
    norm_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC mixing weights and stream collapse (forward-math.md §2).

    Args: x `[B, S, n, d]`; fn `[(2 + n) * n, n * d]`; base `[(2 + n) * n]`; scale `[3]`.
    Returns: collapsed `[B, S, d]` (x.dtype), post `[B, S, n]` (fp32), comb `[B, S, n, n]` (fp32, row = source
    stream, column = destination; doubly stochastic after the column-first Sinkhorn).
    """
    n = x.shape[-2]
    mixes = _hc_mixes(x, fn, norm_eps)
    base = _up(base)
    scale = _up(scale)
    pre = torch.sigmoid(mixes[..., :n] * scale[0] + base[:n]) + hc_eps
    post = 2 * torch.sigmoid(mixes[..., n : 2 * n] * scale[1] + base[n : 2 * n])
    comb = mixes[..., 2 * n :] * scale[2] + base[2 * n :]
    comb = torch.softmax(comb.unflatten(-1, (n, n)), dim=-1) + hc_eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
    for _ in range(sinkhorn_iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
    collapsed = (pre.unsqueeze(-1) * _up(x)).sum(dim=-2).to(x.dtype)
    return collapsed, post, comb


def hc_post(f: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """mHC expansion: `X'_j = post_j * f + sum_i comb[i, j] X_i` in fp32 (the residual term is comb^T . X).

    Args: f `[B, S, d]` sub-layer output; x `[B, S, n, d]` streams; post `[B, S, n]`; comb `[B, S, n, n]`.
    Returns `[B, S, n, d]` in x.dtype.
    """
    out = post.unsqueeze(-1) * _up(f).unsqueeze(-2) + torch.matmul(comb.transpose(-1, -2), _up(x))
    return out.to(x.dtype)


def hc_head(
    x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc_eps: float, norm_eps: float
) -> torch.Tensor:
    """Final collapse `y = sum_i (sigmoid(mix_i * scale + base_i) + eps) X_i`: x `[B, S, n, d]` -> `[B, S, d]`."""
    mixes = _hc_mixes(x, fn, norm_eps)
    pre = torch.sigmoid(mixes * _up(scale) + _up(base)) + hc_eps
    return (pre.unsqueeze(-1) * _up(x)).sum(dim=-2).to(x.dtype)


def compress_pool(
    kv: torch.Tensor,
    score: torch.Tensor,
    ratio: int,
    overlap_kv: torch.Tensor | None = None,
    overlap_score: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax-gated pooling of window-aligned token projections into compressed entries (forward-math.md §4).

    Args:
        kv, score: `[B, nW * m, width]` fp32, window aligned (token a of row b belongs to window a // m); `score`
            already holds the positional bias `ape[slot]`.
        ratio: m.
        overlap_kv, overlap_score: CSA only, `[B, m, D]`: the Ca halves of the window before window 0
            (score -inf where there is none). When given, width = 2D and entry j pools the Ca halves of window
            j - 1 with the Cb halves of window j (2m slots per channel); otherwise (HCA) width = D and entry j
            pools the m tokens of window j.
    Returns: `[B, nW, D]` fp32, softmax over slots per channel.
    """
    b, length, width = kv.shape
    n_windows = length // ratio
    kv = kv.view(b, n_windows, ratio, width)
    score = score.view(b, n_windows, ratio, width)
    if overlap_kv is not None:
        d = width // 2
        prev_kv = torch.cat([overlap_kv.unsqueeze(1), kv[:, :-1, :, :d]], dim=1)
        prev_score = torch.cat([overlap_score.unsqueeze(1), score[:, :-1, :, :d]], dim=1)
        kv = torch.cat([prev_kv, kv[..., d:]], dim=2)
        score = torch.cat([prev_score, score[..., d:]], dim=2)
    return (kv * torch.softmax(score, dim=2)).sum(dim=2)


def _select_topk_lowest_index(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k column indices per row of `scores` [R, n], ties broken by the lowest index (any order).

    fp32 scores are packed with their column into one int64 key (order-preserving float bits, then the inverted
    column), so a single `topk` is exact; other dtypes take a threshold-and-count path.
    """
    cols = torch.arange(scores.shape[-1], device=scores.device)
    if scores.dtype == torch.float32:
        # `+ 0.0` folds -0.0 into +0.0 so that both count as the same score.
        bits = (scores + 0.0).view(torch.int32)
        key = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(torch.int64) << 32
        return key.add_((2**32 - 1) - cols).topk(k, dim=-1, sorted=False).indices
    thr = scores.topk(k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    greater = scores > thr
    equal = scores == thr
    need = k - greater.sum(dim=-1, keepdim=True)
    selected = greater | (equal & (equal.cumsum(dim=-1) <= need))
    rank = torch.where(selected, selected.cumsum(dim=-1) - 1, k)
    out = torch.zeros(*scores.shape[:-1], k + 1, dtype=torch.long, device=scores.device)
    return out.scatter_(-1, rank, cols.expand_as(scores))[..., :k]


def _topk_lowest_index(scores: torch.Tensor, limit: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k of `scores [R, n]` (-inf where not causal) with the lowest-index tie rule, ascending; `[R, k]`.

    One `topk(k + 1)` decides every row whose k-th and (k+1)-th scores differ (the selected set is then unique);
    only rows with a tie at that boundary take the slower exact path.
    """
    values, index = scores.topk(k + 1, dim=-1)
    selected = index[:, :k]
    tied = (values[:, k - 1] == values[:, k]) & (limit > k)
    if bool(tied.any()):
        selected = selected.clone()
        selected[tied] = _select_topk_lowest_index(scores[tied], k)
    return selected.sort(dim=-1).values


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
    """Lightning indexer: per query, the top-k causal compressed entries by `I[t, s] = sum_h w[t, h] relu(q_h . K_s)`.

    Args:
        q: `[B, S, H, c]` indexer queries (RoPE applied).
        keys: `[B, N, c]` indexer keys (compressed, normed, RoPE applied); entry s of row b may hold garbage
            when s >= (latest position + 1) // m, it is never selected.
        weights: `[B, S, H]` per-head weights, already scaled (`weights_proj(x) * H^-1/2 * c^-1/2`).
        positions: `[B, S]` absolute positions; query t may select s < (t + 1) // ratio.
        topk: k. Chunked over queries (`chunk`) and heads (`head_group`) so memory is O(chunk * N).
        round_scores: round I to bf16 before the top-k, like the reference's bf16 einsum (reference numerics R4).
    Returns: `[B, S, min(k, N)]` int64 entry indices, -1 where there is no entry. Among equal scores the lowest
    index wins (project rule, forward-math.md §5), so prefill, chunked prefill and decode select identically.
    """
    b, s, h, _ = q.shape
    n = keys.shape[1]
    k = min(topk, n)
    out = torch.full((b, s, k), -1, dtype=torch.long, device=q.device)
    if k == 0:
        return out
    limits = (positions + 1) // ratio
    qf, kf, wf = _up(q), _up(keys), _up(weights)
    if static_shapes:
        return _indexer_topk_static(qf, kf, wf, limits, k, round_scores)
    for i0 in range(0, s, chunk):
        i1 = min(i0 + chunk, s)
        lim = limits[:, i0:i1]
        n_used = min(int(lim.max()), n)
        if n_used == 0:
            continue
        if n_used <= k:
            # Every causal entry fits: no scoring needed (most queries of short sequences).
            cols = torch.arange(n_used, device=q.device)
            out[:, i0:i1, :n_used] = torch.where(cols < lim.unsqueeze(-1), cols, -1)
            continue
        c = i1 - i0
        key_t = kf[:, :n_used].transpose(1, 2)
        scores = None
        for h0 in range(0, h, head_group):
            h1 = min(h0 + head_group, h)
            # One GEMM with M = chunk * heads, then a weighted sum over heads as a batched GEMV.
            logits = torch.bmm(qf[:, i0:i1, h0:h1].reshape(b, c * (h1 - h0), -1), key_t).relu_()
            part = torch.matmul(wf[:, i0:i1, h0:h1].unsqueeze(-2), logits.view(b, c, h1 - h0, n_used)).squeeze(-2)
            scores = part if scores is None else scores.add_(part)
        if round_scores:
            scores = scores.to(torch.bfloat16).to(scores.dtype)
        # Only columns past the smallest causal limit of the chunk can be non-causal.
        lo = min(int(lim.min()), n_used)
        tail = torch.arange(lo, n_used, device=q.device)
        scores[..., lo:].masked_fill_(tail >= lim.unsqueeze(-1), float("-inf"))
        idx = _topk_lowest_index(scores.view(b * c, n_used), lim.reshape(-1), k).view(b, c, k)
        out[:, i0:i1] = torch.where(idx < lim.unsqueeze(-1), idx, -1)
    return out


def _indexer_topk_static(
    q: torch.Tensor, keys: torch.Tensor, w: torch.Tensor, limits: torch.Tensor, k: int, round_scores: bool
):
    """`indexer_topk` without value-dependent shapes (decode step under `torch.compile`): scores every entry."""
    b, s, h, _ = q.shape
    n = keys.shape[1]
    logits = torch.bmm(q.reshape(b, s * h, -1), keys.transpose(1, 2)).relu_().view(b, s, h, n)
    scores = torch.matmul(w.unsqueeze(-2), logits).squeeze(-2)
    if round_scores:
        scores = scores.to(torch.bfloat16).to(scores.dtype)
    cols = torch.arange(n, device=q.device)
    scores = scores.masked_fill(cols >= limits.unsqueeze(-1), float("-inf"))
    idx = cols.expand(b, s, n) if k == n else _select_topk_lowest_index(scores.view(b * s, n), k).view(b, s, k)
    return torch.where(idx < limits.unsqueeze(-1), idx, -1)


def _band_logits(
    qf: torch.Tensor, win: torch.Tensor, i0: int, i1: int, n_cached: int, window: int, start: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Window logits of queries [i0, i1) over the contiguous key band they can reach: `[B, C, H, L]`, keys."""
    j0 = max(0, i0 + n_cached - window + 1)
    j1 = i1 + n_cached
    keys = _up(win[:, j0:j1])
    logits = torch.einsum("bqhd,bkd->bqhk", qf, keys)
    qi = torch.arange(i0, i1, device=qf.device).view(1, -1, 1)
    kj = torch.arange(j0, j1, device=qf.device).view(1, 1, -1)
    dist = qi + n_cached - kj
    hidden = (dist < 0) | (dist >= window) | (kj < (n_cached - start).view(-1, 1, 1))
    return logits.masked_fill_(hidden.unsqueeze(2), float("-inf")), keys


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
    """Sliding-window + compressed-entry attention with a per-head sink (forward-math.md §3.3-3.4), MQA with K = V.

    Args:
        q: `[B, S, H, D]` queries of the new tokens; query i of row b is at position `start[b] + i`.
        window_kv: `[B, P + S, D]` the P cached window keys followed by the S new keys; key j of row b is at
            position `start[b] - P + j` (keys at negative positions do not exist and are masked).
        window: W, keys with `0 <= t - pos < W` are visible (the query itself included).
        sinks: `[H]` logit of a virtual key with zero value (denominator only, not scaled).
        compressed_kv: `[B, N, D]` compressed entries. Without `topk_idx` (HCA) query t sees every entry
            s < (t + 1) // ratio; with `topk_idx` `[B, S, K]` (CSA) it sees the listed entries (-1 = none).
        chunk: queries per step; memory is O(chunk * (chunk + W + K + N_causal)) per head.
        static_shapes: no shape depends on tensor values (HCA reads all N entries under the causal mask), for
            `torch.compile` of the decode step.
    Returns: `[B, S, H, D]` in q.dtype. Logits and softmax in fp32.
    """
    b, s, h, d = q.shape
    n_cached = window_kv.shape[1] - s
    comp_all = None if compressed_kv is None or compressed_kv.shape[1] == 0 else _up(compressed_kv)
    sink = sinks.to(_acc_dtype(q)).view(1, 1, h, 1)
    outputs = []
    for i0 in range(0, s, chunk):
        i1 = min(i0 + chunk, s)
        # The softmax scale goes on q (smaller than the logits).
        qf = _up(q[:, i0:i1]) * scale
        logits, keys = _band_logits(qf, window_kv, i0, i1, n_cached, window, start)
        parts = [(logits, "bqhk,bkd->bqhd", keys)]
        if comp_all is not None and topk_idx is None:
            limit = (start.view(-1, 1) + torch.arange(i0, i1, device=q.device) + 1) // ratio
            n_used = comp_all.shape[1] if static_shapes else min(int(limit.max()), comp_all.shape[1])
            if n_used > 0:
                comp = comp_all[:, :n_used]
                comp_logits = torch.einsum("bqhd,bkd->bqhk", qf, comp)
                # Entries below the chunk's smallest limit are visible to every query: mask the tail only.
                lo = 0 if static_shapes else min(int(limit.min()), n_used)
                tail = torch.arange(lo, n_used, device=q.device).view(1, 1, -1) >= limit.unsqueeze(-1)
                comp_logits[..., lo:].masked_fill_(tail.unsqueeze(2), float("-inf"))
                parts.append((comp_logits, "bqhk,bkd->bqhd", comp))
        elif comp_all is not None:
            idx = topk_idx[:, i0:i1]
            gathered = torch.gather(
                comp_all.unsqueeze(1).expand(-1, i1 - i0, -1, -1),
                2,
                idx.clamp(min=0).unsqueeze(-1).expand(-1, -1, -1, d),
            )
            comp_logits = torch.einsum("bqhd,bqkd->bqhk", qf, gathered)
            parts.append(
                (comp_logits.masked_fill_((idx < 0).unsqueeze(2), float("-inf")), "bqhk,bqkd->bqhd", gathered)
            )
        # One softmax over [window | compressed | sink] without concatenating: shared max, exp, one denominator.
        # The max is detached: the softmax does not depend on it.
        peak = torch.stack([p[0].amax(dim=-1, keepdim=True) for p in parts], dim=0).amax(dim=0)
        peak = torch.maximum(peak, sink).detach()
        denom = torch.exp(sink - peak)
        out = None
        for part_logits, equation, values in parts:
            probs = (part_logits - peak).exp_()
            denom = denom + probs.sum(dim=-1, keepdim=True)
            term = torch.einsum(equation, probs, values)
            out = term if out is None else out + term
        outputs.append((out / denom).to(q.dtype))
    return torch.cat(outputs, dim=1)


def _swiglu(gate_up: torch.Tensor, limit: float) -> torch.Tensor:
    """Clamped SwiGLU in fp32: `silu(min(g, limit)) * clamp(u, -limit, limit)`; gate_up `[T, 2I]` (gate first)."""
    gate, up = _up(gate_up).chunk(2, dim=-1)
    return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


def grouped_experts(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    swiglu_limit: float,
    static_shapes: bool = False,
    act_quant: bool = False,
    lora_a13: torch.Tensor | None = None,
    lora_b13: torch.Tensor | None = None,
    lora_a2: torch.Tensor | None = None,
    lora_b2: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed experts (forward-math.md §6): `y_t = sum_k w_tk * W2_e(swiglu(W13_e x_t))`, accumulated in fp32.

    Args:
        x: `[T, d]`; gate_up_proj: `[E, 2I, d]` (gate rows first); down_proj: `[E, d, I]`;
        topk_idx: `[T, K]` expert ids; topk_weights: `[T, K]` routing weights (applied to h before W2).
    act_quant: FP8 round trip (1x128, pow2 scales) of x and of h before each expert matmul, as the official FP4 /
        FP8 expert GEMMs (reference numerics R1, forward-math.md §9).
    lora_a13 `[E or 1, r, d]` + lora_b13 `[E or 1, 2I, r]` (scaling folded into B), lora_a2 `[E or 1, r', I]` +
        lora_b2 `[E or 1, d, r']`: grouped expert LoRA (`expert_lora.py`), `W x + B (A x)` per expert for the rows
        routed to it (a leading 1: A / B shared by all experts); never a `[E, out, in]` delta. Computed in A's dtype.
    Returns: `[T, d]` fp32. The weights are read at call time (PEFT parametrizations and quantized modules
    swap what these tensors are): dense tensors, or `PackedWeight` values that dequantize what is indexed.
    """
    t, k = topk_idx.shape
    cast = fp8_act_roundtrip if act_quant else _identity
    x = cast(x)
    lora13, lora2 = _LoraPair(lora_a13, lora_b13), _LoraPair(lora_a2, lora_b2)
    if static_shapes:
        # Gather each token's experts (decode: a few tokens): no data-dependent loop, compiles in one graph.
        gu = lora13.add_gathered(torch.einsum("td,tkod->tko", x, gate_up_proj[topk_idx]), x, topk_idx)
        h = cast((_swiglu(gu, swiglu_limit) * _up(topk_weights).unsqueeze(-1)).to(x.dtype))
        y = lora2.add_gathered(torch.einsum("tki,tkdi->tkd", h, down_proj[topk_idx]), h, topk_idx)
        return _up(y).sum(dim=1)
    out = torch.zeros(t, x.shape[-1], dtype=_acc_dtype(x), device=x.device)
    flat_idx = topk_idx.reshape(-1)
    order = torch.argsort(flat_idx, stable=True)
    counts = torch.bincount(flat_idx, minlength=gate_up_proj.shape[0])
    starts = (torch.cumsum(counts, 0) - counts).tolist()
    token_of = order // k
    weight_of = topk_weights.reshape(-1)[order]
    used = torch.nonzero(counts).flatten().tolist()  # only experts that received tokens
    for expert, count in zip(used, counts[used].tolist()):
        span = slice(starts[expert], starts[expert] + count)
        rows = token_of[span]
        xe = x[rows]
        h = _swiglu(lora13.add(F.linear(xe, gate_up_proj[expert]), xe, expert), swiglu_limit)
        h = cast((h * _up(weight_of[span, None])).to(x.dtype))
        out.index_add_(0, rows, _up(lora2.add(F.linear(h, down_proj[expert]), h, expert)))
    return out


class _LoraPair:
    """Grouped LoRA factors A `[E or 1, r, in]`, B `[E or 1, out, r]` (scaling folded into B), or none."""

    def __init__(self, a: torch.Tensor | None, b: torch.Tensor | None):
        if (a is None) != (b is None):
            raise ValueError("grouped_experts: LoRA A and B come together (got one without the other)")
        self.a, self.b = a, b

    def add(self, y: torch.Tensor, x: torch.Tensor, expert: int) -> torch.Tensor:
        """y `[n, out]` + B_e (A_e x) for the rows x `[n, in]` of one expert, in y's dtype."""
        if self.a is None:
            return y
        e = expert if self.a.shape[0] > 1 else 0
        return y + F.linear(F.linear(x.to(self.a.dtype), self.a[e]), self.b[e]).to(y.dtype)

    def add_gathered(self, y: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """y `[T, K, out]` + per (token, slot) expert's B (A x); x `[T, in]` or `[T, K, in]`, idx `[T, K]`."""
        if self.a is None:
            return y
        idx = idx if self.a.shape[0] > 1 else torch.zeros_like(idx)
        x = x.to(self.a.dtype)
        low = torch.einsum("td,tkrd->tkr" if x.dim() == 2 else "tkd,tkrd->tkr", x, self.a[idx])
        return y + torch.einsum("tkr,tkor->tko", low, self.b[idx]).to(y.dtype)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def quantized_linear(x: torch.Tensor, weight: PackedWeight, act_quant: bool = False) -> torch.Tensor:
    """`y = x W^T` for a stored quantized weight (official `linear` in `inference/model.py`): `weight` is a
    `weight_formats.PackedWeight` (`data`, `scale`, `format`: E4M3 `[N, K]` with block scales, or packed FP4
    `[N, K/2]` with 1x32 group scales), so a kernel sees the format explicitly.

    x: `[..., K]`. The weight is dequantized exactly to x.dtype and multiplied like a dense weight, so the result
    equals `F.linear` with the dequantized weight. act_quant: FP8 round trip of x first (reference numerics R1).
    Returns `[..., N]` in x.dtype.
    """
    if act_quant:
        x = fp8_act_roundtrip(x)
    return F.linear(x, weight.format.dequantize(weight.data, weight.scale, x.dtype))
