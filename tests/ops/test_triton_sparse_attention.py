"""Triton `sparse_attention` (triton_sparse_attention.py) against the reference on shapes that tile: several query
blocks and key tiles, ragged tails, rows whose cached keys sit at negative positions, HCA prefixes longer than the
stored entries, CSA holes, decode steps over a long cache, and `static_shapes`. Runs under TRITON_INTERPRET=1
(or on CUDA); skipped when the backend is not registered."""

from __future__ import annotations

import math

import pytest
import torch

from modeling_deepseek_v4 import ops
from tests.ops.harness import reference_fn
from tests.ops.tolerances import assert_parity

pytestmark = pytest.mark.interpret
torch.set_num_threads(1)

OP = "sparse_attention"
if "triton" not in ops.available_backends(OP):
    pytest.skip("the triton backend of sparse_attention is not registered", allow_module_level=True)

from modeling_deepseek_v4 import triton_sparse_attention as tsa  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not tsa.interpreting() else "cpu"
SMALL = tsa.Blocks(block_h=4, block_q=4, block_n=16, block_d=32, num_warps=4)  # M = 16: many blocks and tiles


class _NanEmpty:
    """Stand-in for the `torch` module inside the kernel file: `empty` returns NaN-filled float tensors, so an
    element a kernel forgets to write shows up."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        out = torch.empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    monkeypatch.setattr(tsa, "torch", _NanEmpty())


def _inputs(mode, b, s, h, d, n_cached, starts, n_comp=0, topk=0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, h, d, generator=g).to(dtype)
    window_kv = torch.randn(b, n_cached + s, d, generator=g)
    start = torch.tensor(starts)
    for row, st in enumerate(starts):  # keys at negative positions: large garbage that must never be attended
        window_kv[row, : max(0, n_cached - st)] = 4.0
    kwargs = {}
    if mode in ("hca", "csa"):
        kwargs["compressed_kv"] = torch.randn(b, n_comp, d, generator=g).to(dtype)
    if mode == "csa":
        idx = torch.stack([torch.randperm(n_comp, generator=g)[:topk] for _ in range(b * s)]).view(b, s, topk)
        kwargs["topk_idx"] = idx.masked_fill(torch.rand(b, s, topk, generator=g) < 0.3, -1)
    args = (q, window_kv.to(dtype), start, torch.randn(h, generator=g).to(dtype))
    move = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    return tuple(a.to(DEVICE) for a in args), move


def _run(fn, args, kwargs, window, scale, ratio, grad_out=None, upcast=False, **extra):
    """fn(q, window_kv, start, window, sinks, scale, ...) and the gradients of q, window_kv, sinks, compressed_kv."""
    q, window_kv, start, sinks = args

    def leaf(t):
        return t.detach().to(torch.float64 if upcast else t.dtype).requires_grad_(grad_out is not None)

    q, window_kv, sinks = leaf(q), leaf(window_kv), leaf(sinks)
    kwargs = dict(kwargs)
    if "compressed_kv" in kwargs:
        kwargs["compressed_kv"] = leaf(kwargs["compressed_kv"])
    out = fn(q, window_kv, start, window, sinks, scale, ratio=ratio, **kwargs, **extra)
    if grad_out is None:
        return out, ()
    leaves = [q, window_kv, sinks] + ([kwargs["compressed_kv"]] if "compressed_kv" in kwargs else [])
    return out, torch.autograd.grad(out, leaves, grad_out.to(out.dtype))


def _triton(*args, **kwargs):
    with ops.use_backend("triton"):
        return ops.sparse_attention(*args, **kwargs)


def _check(args, kwargs, window, ratio, dtype, scale=None, **extra):
    """Forward and backward of the triton backend against the reference by the parity tolerance table."""
    scale = scale if scale is not None else 1 / math.sqrt(args[0].shape[-1])
    ref = reference_fn(OP)
    ref_out, _ = _run(ref, args, kwargs, window, scale, ratio, **extra)
    grad_out = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(7)).to(ref_out.device)
    ref_out, ref_grads = _run(ref, args, kwargs, window, scale, ratio, grad_out, **extra)
    got_out, got_grads = _run(_triton, args, kwargs, window, scale, ratio, grad_out, **extra)
    truth_out, truth_grads = _run(ref, args, kwargs, window, scale, ratio, grad_out, upcast=True, **extra)
    assert not torch.isnan(got_out).any()
    assert_parity(OP, dtype, "forward", [got_out], [ref_out], [truth_out])
    assert_parity(OP, dtype, "backward", got_grads, ref_grads, truth_grads)
    return got_out


# S = 40 queries, window 16 with 15 cached keys, three rows: start 0 and 5 (cached keys at negative positions) and
# 37; HCA: 20 stored entries at ratio 2 (later queries' causal limit exceeds 20); CSA: top-5 of 20 with -1 holes.
PREFILL = {"b": 3, "s": 40, "h": 4, "d": 32, "n_cached": 15, "starts": [0, 5, 37], "n_comp": 20, "topk": 5}


@pytest.mark.parametrize("mode", ["window", "hca", "csa"])
def test_prefill_small_tiles(mode, monkeypatch):
    """Forced 4 queries x 4 heads x 16 keys tiles: 10 query blocks, 2 band tiles, 2 HCA tiles, 2 CSA tiles."""
    monkeypatch.setattr(tsa, "choose_blocks", lambda *a, **k: SMALL)
    args, kwargs = _inputs(mode, **PREFILL)
    _check(args, kwargs, window=16, ratio=2, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["hca", "csa"])
def test_prefill_default_blocks(mode, dtype):
    """The production tile choice (16 queries x 4 heads per program, ragged last block), fp32 and bf16."""
    args, kwargs = _inputs(mode, dtype=dtype, seed=1, **dict(PREFILL, s=37, d=24))
    _check(args, kwargs, window=16, ratio=2, dtype=dtype)


@pytest.mark.parametrize("s", [1, 2])
@pytest.mark.parametrize("mode", ["window", "hca", "csa"])
def test_decode_long_cache(mode, s):
    """Decode: one or two new tokens over a 63-key window cache and up to 40 compressed entries."""
    args, kwargs = _inputs(mode, b=2, s=s, h=8, d=32, n_cached=63, starts=[60, 200], n_comp=40, topk=6, seed=2)
    _check(args, kwargs, window=64, ratio=4, dtype=torch.float32)


def test_static_shapes_same_result():
    """`static_shapes=True` runs the same kernel: identical to the dynamic call and to the static reference."""
    args, kwargs = _inputs("hca", b=2, s=2, h=4, d=16, n_cached=7, starts=[3, 30], n_comp=9, seed=3)
    static = _check(args, kwargs, window=8, ratio=4, dtype=torch.float32, static_shapes=True)
    dynamic, _ = _run(_triton, args, kwargs, 8, 0.25, 4)
    assert torch.equal(static, _run(_triton, args, kwargs, 8, 0.25, 4, static_shapes=True)[0])
    assert torch.equal(dynamic, _run(_triton, args, kwargs, 8, 0.25, 4, static_shapes=True)[0])


def test_no_compressed_entries_is_window_only():
    """`compressed_kv` with zero entries (the first tokens of an HCA layer) is the window-only attention."""
    args, kwargs = _inputs("hca", b=2, s=5, h=2, d=16, n_cached=3, starts=[0, 9], n_comp=0, seed=4)
    with_empty, _ = _run(_triton, args, kwargs, 4, 0.25, 2)
    window_only = _check(args, {}, window=4, ratio=0, dtype=torch.float32, scale=0.25)
    assert torch.equal(with_empty, window_only)


def test_supports():
    args, kwargs = _inputs("csa", b=1, s=3, h=2, d=16, n_cached=2, starts=[4], n_comp=5, topk=2)
    assert tsa.supports(*args[:3], 3, args[3], 0.5, ratio=4, **kwargs)
    q64 = args[0].double()
    assert not tsa.supports(q64, args[1].double(), args[2], 3, args[3], 0.5)  # float64: reference (gradcheck)
    assert not tsa.supports(args[0], args[1].bfloat16(), args[2], 3, args[3], 0.5)  # mixed q / KV dtypes
    big = torch.zeros(1, 3, 2, 1024, device=DEVICE)
    assert not tsa.supports(big, torch.zeros(1, 5, 1024, device=DEVICE), args[2], 3, args[3], 0.5)
    hca = {"compressed_kv": kwargs["compressed_kv"]}
    assert not tsa.supports(*args[:3], 3, args[3], 0.5, ratio=0, **hca)  # HCA needs a ratio
    assert ops.resolve(OP, *args[:3], 3, args[3], 0.5, ratio=4, **kwargs) is tsa.sparse_attention
