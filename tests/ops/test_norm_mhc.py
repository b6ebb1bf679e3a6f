"""Reference ops: `rms_norm` and the mHC hyper-connection ops (forward-math.md §2, regressions of §12)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.ops.harness import reference_op

hc_head, hc_post, hc_pre, rms_norm = map(reference_op, ("hc_head", "hc_post", "hc_pre", "rms_norm"))

torch.set_num_threads(1)

N_HC, D, ITERS = 4, 8, 20


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


# ----------------------------------------------------------------------------------------------------------- rms_norm


@pytest.mark.parametrize("weighted", [False, True])
def test_rms_norm_matches_float64_formula(weighted):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16) * 3
    w = torch.randn(16) if weighted else None
    eps = 1e-6
    xd = x.double()
    expected = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
    if weighted:
        expected = expected * w.double()
    out = rms_norm(x, w, eps)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_rms_norm_eps_is_inside_the_root():
    x = torch.full((1, 4), 1e-3)
    out = rms_norm(x, None, eps=1e-6)
    torch.testing.assert_close(out, torch.full((1, 4), 1e-3 / math.sqrt(1e-6 + 1e-6)))


@pytest.mark.parametrize("weighted", [False, True])
def test_rms_norm_preserves_bf16(weighted):
    torch.manual_seed(1)
    x = (torch.randn(3, 32) * 5).bfloat16()
    w = torch.randn(32).bfloat16() if weighted else None
    out = rms_norm(x, w, 1e-6)
    assert out.dtype == torch.bfloat16
    xd = x.double()
    expected = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)
    if weighted:
        expected = expected * w.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------------------------------------------------------- hc_pre


def _hc_params(seed: int, comb_scale: float = 1.0, d: int = D):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, N_HC, d, generator=g)
    fn = torch.randn((2 + N_HC) * N_HC, N_HC * d, generator=g) / math.sqrt(N_HC * d)
    base = torch.randn((2 + N_HC) * N_HC, generator=g)
    scale = torch.tensor([0.7, 1.3, comb_scale])
    return x, fn, base, scale


def _loop_hc_pre(x, fn, base, scale, iters, hc_eps, norm_eps, column_first=True):
    """Straightforward float64 transcription of forward-math.md §2, one token at a time."""
    b_, s_, n, d = x.shape
    x, fn, base, scale = x.double(), fn.double(), base.double(), scale.double()
    collapsed = torch.zeros(b_, s_, d, dtype=torch.float64)
    post = torch.zeros(b_, s_, n, dtype=torch.float64)
    comb = torch.zeros(b_, s_, n, n, dtype=torch.float64)
    for b in range(b_):
        for s in range(s_):
            flat = x[b, s].reshape(-1).tolist()
            rs = 1.0 / math.sqrt(sum(v * v for v in flat) / len(flat) + norm_eps)
            mix = [sum(a * f for a, f in zip(flat, fn[k].tolist())) * rs for k in range(fn.shape[0])]
            pre = [_sigmoid(mix[i] * scale[0].item() + base[i].item()) + hc_eps for i in range(n)]
            for i in range(n):
                post[b, s, i] = 2 * _sigmoid(mix[n + i] * scale[1].item() + base[n + i].item())
                collapsed[b, s] += pre[i] * x[b, s, i]
            logit = [
                [mix[2 * n + i * n + j] * scale[2].item() + base[2 * n + i * n + j].item() for j in range(n)]
                for i in range(n)
            ]
            c = []
            for i in range(n):
                m = max(logit[i])
                e = [math.exp(v - m) for v in logit[i]]
                c.append([v / sum(e) + hc_eps for v in e])

            def norm_cols(c):
                sums = [sum(c[i][j] for i in range(n)) for j in range(n)]
                return [[c[i][j] / (sums[j] + hc_eps) for j in range(n)] for i in range(n)]

            def norm_rows(c):
                return [[c[i][j] / (sum(c[i]) + hc_eps) for j in range(n)] for i in range(n)]

            first, second = (norm_cols, norm_rows) if column_first else (norm_rows, norm_cols)
            c = first(c)
            for _ in range(iters - 1):
                c = first(second(c))
            comb[b, s] = torch.tensor(c, dtype=torch.float64)
    return collapsed, post, comb


@pytest.mark.parametrize("hc_eps", [1e-6, 1e-2])
def test_hc_pre_matches_loop(hc_eps):
    x, fn, base, scale = _hc_params(seed=2)
    collapsed, post, comb = hc_pre(x, fn, base, scale, ITERS, hc_eps, 1e-6)
    e_collapsed, e_post, e_comb = _loop_hc_pre(x, fn, base, scale, ITERS, hc_eps, 1e-6)
    assert collapsed.dtype == x.dtype and post.dtype == torch.float32 and comb.dtype == torch.float32
    torch.testing.assert_close(collapsed.double(), e_collapsed, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(post.double(), e_post, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(comb.double(), e_comb, rtol=1e-5, atol=1e-6)


def test_hc_pre_doubly_stochastic_and_ranges():
    x, fn, base, scale = _hc_params(seed=3)
    collapsed, post, comb = hc_pre(x, fn, base, scale, ITERS, 1e-6, 1e-6)
    ones = torch.ones(comb.shape[:-1])
    torch.testing.assert_close(comb.sum(-2), ones, rtol=0, atol=1e-5)  # columns (normalised last)
    torch.testing.assert_close(comb.sum(-1), ones, rtol=0, atol=1e-4)  # rows
    assert bool((comb > 0).all())
    assert bool((post > 0).all()) and bool((post < 2).all())


def test_hc_pre_eps_on_pre_not_on_post():
    """pre = sigmoid + eps (> 0 even when sigmoid underflows), post = 2 sigmoid with no eps (§12)."""
    x, fn, base, scale = _hc_params(seed=4)
    base = base.clone()
    base[: 2 * N_HC] = -40.0  # sigmoid(-40 + O(1)) ~ 1e-17: far below hc_eps
    scale = torch.tensor([0.1, 0.1, 1.0])
    hc_eps = 1e-2
    collapsed, post, _ = hc_pre(x, fn, base, scale, ITERS, hc_eps, 1e-6)
    assert bool((post < 1e-12).all())  # an eps on post would give >= 1e-2
    torch.testing.assert_close(collapsed, hc_eps * x.sum(-2), rtol=1e-4, atol=1e-7)


def test_hc_pre_sinkhorn_is_column_first():
    """Ill-conditioned logits so that 20 iterations do not converge: the order is visible (regression §12)."""
    x, fn, base, scale = _hc_params(seed=5, comb_scale=4.0)
    base = base.clone()
    base[2 * N_HC :] *= 3
    _, _, comb = hc_pre(x, fn, base, scale, ITERS, 1e-6, 1e-6)
    _, _, col_first = _loop_hc_pre(x, fn, base, scale, ITERS, 1e-6, 1e-6, column_first=True)
    _, _, row_first = _loop_hc_pre(x, fn, base, scale, ITERS, 1e-6, 1e-6, column_first=False)
    assert (col_first - row_first).abs().max() > 1e-2, "inputs too well conditioned to tell the orders apart"
    torch.testing.assert_close(comb.double(), col_first, rtol=1e-4, atol=1e-5)


def test_hc_pre_bf16_streams():
    x, fn, base, scale = _hc_params(seed=6)
    collapsed, _, _ = hc_pre(x.bfloat16(), fn, base, scale, ITERS, 1e-6, 1e-6)
    assert collapsed.dtype == torch.bfloat16
    e_collapsed, _, _ = _loop_hc_pre(x.bfloat16().float(), fn, base, scale, ITERS, 1e-6, 1e-6)
    torch.testing.assert_close(collapsed.double(), e_collapsed, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------------------------------------ hc_post


def test_hc_post_is_comb_transposed():
    """out[j] = post_j f + sum_i comb[i, j] x[i]: row i = source stream (regression §12)."""
    torch.manual_seed(7)
    x = torch.randn(2, 3, N_HC, D)
    f = torch.randn(2, 3, D)
    post = 2 * torch.rand(2, 3, N_HC)
    comb = torch.rand(2, 3, N_HC, N_HC)
    out = hc_post(f, x, post, comb)
    assert out.shape == x.shape and out.dtype == x.dtype
    expected = torch.zeros(x.shape, dtype=torch.float64)
    untransposed = torch.zeros(x.shape, dtype=torch.float64)
    xd, fd, pd, cd = x.double(), f.double(), post.double(), comb.double()
    for j in range(N_HC):
        expected[..., j, :] = pd[..., j, None] * fd
        untransposed[..., j, :] = pd[..., j, None] * fd
        for i in range(N_HC):
            expected[..., j, :] += cd[..., i, j, None] * xd[..., i, :]
            untransposed[..., j, :] += cd[..., j, i, None] * xd[..., i, :]
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert (out.double() - untransposed).abs().max() > 0.1


def test_hc_post_bf16_streams():
    torch.manual_seed(8)
    x = torch.randn(1, 2, N_HC, D).bfloat16()
    f = torch.randn(1, 2, D).bfloat16()
    post, comb = 2 * torch.rand(1, 2, N_HC), torch.rand(1, 2, N_HC, N_HC)
    out = hc_post(f, x, post, comb)
    assert out.dtype == torch.bfloat16
    expected = post[..., None] * f.float()[..., None, :] + torch.einsum("bsij,bsid->bsjd", comb, x.float())
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------------------------------------------------------ hc_head


@pytest.mark.parametrize("hc_eps", [1e-6, 1e-2])
def test_hc_head_matches_formula(hc_eps):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, N_HC, D, generator=g)
    fn = torch.randn(N_HC, N_HC * D, generator=g) / math.sqrt(N_HC * D)
    base = torch.randn(N_HC, generator=g)
    scale = torch.tensor([0.8])
    norm_eps = 1e-6
    out = hc_head(x, fn, base, scale, hc_eps, norm_eps)
    assert out.shape == (2, 3, D) and out.dtype == x.dtype
    expected = torch.zeros(2, 3, D, dtype=torch.float64)
    for b in range(2):
        for s in range(3):
            flat = x[b, s].reshape(-1).double()
            rs = 1.0 / math.sqrt(float(flat.pow(2).mean()) + norm_eps)
            for i in range(N_HC):
                mix = float(flat @ fn[i].double()) * rs
                pre = _sigmoid(mix * 0.8 + base[i].item()) + hc_eps
                expected[b, s] += pre * x[b, s, i].double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
