"""Reference op `sparse_attention` (forward-math.md §3.3-3.4) against a dense per-query float64 reference."""

from __future__ import annotations

import pytest
import torch

from tests.ops.harness import reference_op

sparse_attention = reference_op("sparse_attention")

torch.set_num_threads(1)

W, RATIO, N_COMP, TOPK = 4, 2, 6, 3
P = W - 1  # cached window keys in front of the new ones
START = torch.tensor([0, 2, 9])  # row 1: start < P, so cached keys 0 and 1 sit at negative positions


def _inputs(seed: int, mode: str, b=3, s=6, h=2, d=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, h, d, generator=g, dtype=torch.float64)
    window_kv = torch.randn(b, P + s, d, generator=g, dtype=torch.float64)
    start = START[:b]
    for row in range(b):  # keys at negative positions: garbage that must never be attended
        n_missing = max(0, P - int(start[row]))
        window_kv[row, :n_missing] = 4.0
    sinks = torch.randn(h, generator=g, dtype=torch.float64)
    comp, idx = None, None
    if mode in ("hca", "csa"):
        comp = torch.randn(b, N_COMP, d, generator=g, dtype=torch.float64)
    if mode == "csa":
        idx = torch.stack([torch.randperm(N_COMP, generator=g)[:TOPK] for _ in range(b * s)]).view(b, s, TOPK)
        idx = idx.masked_fill(torch.rand(b, s, TOPK, generator=g) < 0.3, -1)
    cast = {"q": q, "window_kv": window_kv, "sinks": sinks, "compressed_kv": comp}
    cast = {k: (v.to(dtype) if v is not None else None) for k, v in cast.items()}
    return dict(cast, start=start, topk_idx=idx)


def _dense(q, window_kv, start, sinks, scale, compressed_kv=None, topk_idx=None, window=W, ratio=RATIO):
    """Per (row, query, head): gather the full key list, append the sink logit (zero value), softmax in float64."""
    b_, s_, h_, d = q.shape
    n_cached = window_kv.shape[1] - s_
    out = []
    for b in range(b_):
        for i in range(s_):
            t = int(start[b]) + i
            keys = [window_kv[b, p - int(start[b]) + n_cached] for p in range(max(0, t - window + 1), t + 1)]
            if compressed_kv is not None and topk_idx is None:
                keys += [compressed_kv[b, e] for e in range(min((t + 1) // ratio, compressed_kv.shape[1]))]
            if topk_idx is not None:
                keys += [compressed_kv[b, e] for e in topk_idx[b, i].tolist() if e >= 0]
            keys = torch.stack(keys).double()
            for h in range(h_):
                logits = torch.cat([keys @ q[b, i, h].double() * scale, sinks[h : h + 1].double()])
                probs = torch.softmax(logits, dim=0)
                out.append(probs[:-1] @ keys)
    return torch.stack(out).view(b_, s_, h_, d)


def _call(inp, chunk=256, scale=0.35):
    return sparse_attention(
        inp["q"], inp["window_kv"], inp["start"], W, inp["sinks"], scale,
        compressed_kv=inp["compressed_kv"], ratio=RATIO, topk_idx=inp["topk_idx"], chunk=chunk,
    )  # fmt: skip


def _dense_of(inp, scale=0.35):
    return _dense(inp["q"], inp["window_kv"], inp["start"], inp["sinks"], scale, inp["compressed_kv"], inp["topk_idx"])


@pytest.mark.parametrize("mode", ["window", "hca", "csa"])
def test_sparse_attention_matches_dense(mode):
    inp = _inputs(seed=0, mode=mode)
    out = _call(inp)
    assert out.shape == inp["q"].shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _dense_of(inp), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["window", "hca", "csa"])
def test_sparse_attention_chunking_invariant(mode):
    inp = _inputs(seed=1, mode=mode)
    ref = _call(inp, chunk=1000)
    for chunk in (1, 5):
        torch.testing.assert_close(_call(inp, chunk=chunk), ref, rtol=1e-6, atol=1e-6)


def test_sparse_attention_sink_is_denominator_only():
    """A very negative sink changes nothing; a very positive one drives the output to zero (zero-value key)."""
    inp = _inputs(seed=2, mode="hca")
    inp["sinks"] = torch.full_like(inp["sinks"], -1e4)
    no_sink = _dense(inp["q"], inp["window_kv"], inp["start"], torch.full_like(inp["sinks"], -1e30), 0.35,
                     inp["compressed_kv"])  # fmt: skip
    torch.testing.assert_close(_call(inp).double(), no_sink, rtol=1e-5, atol=1e-5)
    inp["sinks"] = torch.full_like(inp["sinks"], 60.0)
    assert _call(inp).abs().max() < 1e-12


def test_sparse_attention_without_compressed_entries():
    inp = _inputs(seed=3, mode="window")
    empty = torch.zeros(3, 0, 8)
    out = sparse_attention(inp["q"], inp["window_kv"], inp["start"], W, inp["sinks"], 0.35, compressed_kv=empty,
                           ratio=RATIO)  # fmt: skip
    torch.testing.assert_close(out, _call(inp), rtol=1e-6, atol=1e-6)


def test_sparse_attention_csa_per_query_keys():
    """Each query sees only its own listed entries (regression §12: gathered top-k shared across queries)."""
    inp = _inputs(seed=4, mode="csa")
    idx = inp["topk_idx"].clone()
    idx[:, 1:] = -1
    idx[:, 0] = torch.tensor([0, 1, 2])
    inp["topk_idx"] = idx
    out = _call(inp)
    torch.testing.assert_close(out.double(), _dense_of(inp), rtol=1e-5, atol=1e-5)
    window_only = _inputs(seed=4, mode="window")
    torch.testing.assert_close(out[:, 1:], _call(window_only)[:, 1:], rtol=1e-6, atol=1e-6)
    assert (out[:, 0] - _call(window_only)[:, 0]).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["window", "hca", "csa"])
def test_sparse_attention_gradients_match_dense(mode):
    inp = _inputs(seed=5, mode=mode)
    names = [k for k in ("q", "window_kv", "sinks", "compressed_kv") if inp[k] is not None]
    for k in names:
        inp[k].requires_grad_(True)
    ref = {k: inp[k].detach().double().requires_grad_(True) for k in names}
    dense_inp = dict(inp, **ref)
    grad_out = torch.randn(inp["q"].shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    got = torch.autograd.grad((_call(inp).double() * grad_out).sum(), [inp[k] for k in names])
    expected = torch.autograd.grad((_dense_of(dense_inp) * grad_out).sum(), [ref[k] for k in names])
    for name, a, e in zip(names, got, expected):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-5, msg=name)
    kv_grad = got[names.index("window_kv")]  # keys at negative positions (row 0: 3 of them, row 1: 1) get none
    assert bool((kv_grad[0, :3] == 0).all()) and bool((kv_grad[1, :1] == 0).all())


@pytest.mark.parametrize("mode", ["hca", "csa"])
def test_sparse_attention_gradcheck_float64(mode):
    inp = _inputs(seed=7, mode=mode, b=2, s=3, h=2, d=4, dtype=torch.float64)
    names = ("q", "window_kv", "compressed_kv", "sinks")
    for k in names:
        inp[k].requires_grad_(True)

    def fn(q, window_kv, compressed_kv, sinks):
        return sparse_attention(q, window_kv, inp["start"], W, sinks, 0.35, compressed_kv=compressed_kv,
                                ratio=RATIO, topk_idx=inp["topk_idx"], chunk=2)  # fmt: skip

    assert torch.autograd.gradcheck(fn, tuple(inp[k] for k in names), eps=1e-6, atol=1e-5)
