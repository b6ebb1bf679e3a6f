"""Reference op `grouped_experts` (forward-math.md §6) against a per-token loop, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.ops.harness import reference_op

grouped_experts = reference_op("grouped_experts")

torch.set_num_threads(1)

T, D, INTER, E, K = 7, 6, 5, 5, 2
LIMIT = 1.0  # small, so that both clamps are active on randn inputs


def _inputs(seed: int, used_experts=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    gate_up = torch.randn(E, 2 * INTER, D, generator=g)
    down = torch.randn(E, D, INTER, generator=g) / 2
    pool = used_experts if used_experts is not None else list(range(E))
    idx = torch.stack([torch.tensor(pool)[torch.randperm(len(pool), generator=g)[:K]] for _ in range(T)])
    weights = torch.rand(T, K, generator=g) + 0.1
    return x, gate_up, down, idx, weights


def _loop(x, gate_up, down, idx, weights, limit=LIMIT, gate_first=True):
    """y_t = sum_k w_tk * down_e(silu(min(g, limit)) * clamp(u, -limit, limit)), (g, u) = gate_up_e x_t."""
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros(x.shape[1], dtype=x.dtype)
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            proj = gate_up[e] @ x[t]
            gate, up = (proj[:INTER], proj[INTER:]) if gate_first else (proj[INTER:], proj[:INTER])
            h = F.silu(torch.clamp(gate, max=limit)) * torch.clamp(up, min=-limit, max=limit)
            y = y + down[e] @ (weights[t, k] * h)
        rows.append(y)
    return torch.stack(rows)


def test_grouped_experts_matches_loop():
    x, gate_up, down, idx, weights = _inputs(seed=0)
    proj = torch.einsum("eid,td->tei", gate_up, x)
    # both clamps are exercised
    assert bool((proj[..., :INTER] > LIMIT).any()) and bool((proj[..., INTER:].abs() > LIMIT).any())
    out = grouped_experts(x, gate_up, down, idx, weights, LIMIT)
    assert out.shape == (T, D) and out.dtype == torch.float32
    expected = _loop(*(v.double() if v.is_floating_point() else v for v in (x, gate_up, down, idx, weights)))
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_grouped_experts_clamp_and_gate_order_matter():
    x, gate_up, down, idx, weights = _inputs(seed=1)
    out = grouped_experts(x, gate_up, down, idx, weights, LIMIT)
    assert (out - _loop(x, gate_up, down, idx, weights, limit=1e9)).abs().max() > 1e-2
    assert (out - _loop(x, gate_up, down, idx, weights, gate_first=False)).abs().max() > 1e-2


def test_grouped_experts_gradients_match_loop():
    x, gate_up, down, idx, weights = _inputs(seed=2)
    leaves = [v.clone().requires_grad_(True) for v in (x, gate_up, down, weights)]
    loop_leaves = [v.double().requires_grad_(True) for v in (x, gate_up, down, weights)]
    grad_out = torch.randn(T, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a, b, c, w = leaves
    out = grouped_experts(a, b, c, idx, w, LIMIT)
    got = torch.autograd.grad((out.double() * grad_out).sum(), leaves)
    a, b, c, w = loop_leaves
    expected = torch.autograd.grad((_loop(a, b, c, idx, w) * grad_out).sum(), loop_leaves)
    for name, g, e in zip(("x", "gate_up_proj", "down_proj", "weights"), got, expected):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("used", [[3], [0, 4], [1, 2, 3]])
def test_grouped_experts_unused_experts(used):
    x, gate_up, down, idx, weights = _inputs(seed=4, used_experts=used)
    idx = idx[:, : min(K, len(used))].contiguous()
    weights = weights[:, : idx.shape[1]].contiguous()
    gate_up.requires_grad_(True)
    down.requires_grad_(True)
    out = grouped_experts(x, gate_up, down, idx, weights, LIMIT)
    torch.testing.assert_close(out, _loop(x, gate_up, down, idx, weights), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    unused = [e for e in range(E) if e not in used]
    assert bool((gate_up.grad[unused] == 0).all()) and bool((down.grad[unused] == 0).all())
    assert bool((gate_up.grad[used] != 0).any())


def test_grouped_experts_no_tokens():
    x, gate_up, down, _, _ = _inputs(seed=5)
    out = grouped_experts(x[:0], gate_up, down, torch.zeros(0, K, dtype=torch.long), torch.zeros(0, K), LIMIT)
    assert out.shape == (0, D)


def test_grouped_experts_bf16_inputs():
    x, gate_up, down, idx, weights = _inputs(seed=6)
    xb, gub, db = x.bfloat16(), gate_up.bfloat16(), down.bfloat16()
    out = grouped_experts(xb, gub, db, idx, weights, LIMIT)
    assert out.dtype == torch.float32  # fp32 accumulation buffer
    expected = _loop(xb.double(), gub.double(), db.double(), idx, weights.double())
    torch.testing.assert_close(out.double(), expected, rtol=3e-2, atol=3e-2)
