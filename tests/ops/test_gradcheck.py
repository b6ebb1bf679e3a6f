"""float64 gradcheck of every differentiable reference op on tiny shapes (design.md, "Tests")."""

import torch
from torch.autograd import gradcheck

from tests.ops.harness import reference_op

# Through the custom ops: gradcheck also checks their backward (a recompute of the reference, ops_custom.py).
compress_pool, grouped_experts, hc_head, hc_post, hc_pre, rms_norm = map(
    reference_op, ("compress_pool", "grouped_experts", "hc_head", "hc_post", "hc_pre", "rms_norm")
)

torch.set_num_threads(1)


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()


def test_rms_norm_gradcheck():
    assert gradcheck(lambda x, w: rms_norm(x, w, 1e-6), (rand(3, 5), rand(5, seed=1)))


def test_hc_pre_post_head_gradcheck():
    n, d = 3, 4
    x, fn, base, scale = rand(1, 2, n, d), rand((2 + n) * n, n * d, seed=1), rand((2 + n) * n, seed=2), rand(3, seed=3)
    assert gradcheck(lambda *a: hc_pre(*a, 4, 1e-6, 1e-6), (x, fn, base, scale))
    post, comb = torch.rand(1, 2, n, dtype=torch.float64), torch.rand(1, 2, n, n, dtype=torch.float64)
    assert gradcheck(hc_post, (rand(1, 2, d, seed=4), x, post.requires_grad_(), comb.requires_grad_()))
    assert gradcheck(lambda *a: hc_head(*a, 1e-6, 1e-6), (x, rand(n, n * d, seed=5), rand(n, seed=6), rand(1, seed=7)))


def test_compress_pool_gradcheck():
    m, d = 2, 3
    kv, score = rand(1, 3 * m, 2 * d), rand(1, 3 * m, 2 * d, seed=1)
    ov_kv, ov_score = rand(1, m, d, seed=2), rand(1, m, d, seed=3)
    assert gradcheck(lambda *a: compress_pool(a[0], a[1], m, a[2], a[3]), (kv, score, ov_kv, ov_score))
    assert gradcheck(lambda a, b: compress_pool(a, b, m), (rand(1, 2 * m, d, seed=4), rand(1, 2 * m, d, seed=5)))


def test_grouped_experts_gradcheck():
    x, gate_up, down = rand(5, 4), rand(3, 6, 4, seed=1), rand(3, 4, 3, seed=2)
    idx = torch.tensor([[0, 2], [1, 2], [2, 0], [1, 0], [0, 1]])
    weights = torch.rand(5, 2, dtype=torch.float64).requires_grad_()
    assert gradcheck(lambda *a: grouped_experts(a[0], a[1], a[2], idx, a[3], 1.5), (x, gate_up, down, weights))
