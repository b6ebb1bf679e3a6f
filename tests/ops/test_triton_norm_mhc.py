"""Triton backends of `rms_norm`, `hc_pre`, `hc_post`, `hc_head` (``triton_norm_mhc.py``) against the reference.

Run under Triton's interpreter (`TRITON_INTERPRET=1`). The tile sizes are shrunk so that tiny shapes still cross
several tiles: token counts that are not multiples of `BLOCK_T`, `d = 24` (not a power of two, ragged `d` tiles),
several `K = n d` tiles, several programs in the strided backward reductions. Every `torch.empty` is NaN-filled so
an element a kernel forgets to write shows up.
"""

from __future__ import annotations

import math

import pytest
import torch

from modeling_deepseek_v4 import ops
from tests.ops.harness import reference_fn
from tests.ops.tolerances import TOLERANCES, assert_parity

pytestmark = pytest.mark.interpret
torch.set_num_threads(1)

OPS = ("rms_norm", "hc_pre", "hc_post", "hc_head")
if not all("triton" in ops.available_backends(op) for op in OPS):
    pytest.skip("the triton backend of the norm / mHC ops is not registered", allow_module_level=True)

from modeling_deepseek_v4 import triton_norm_mhc as tk  # noqa: E402  (only importable when Triton is usable)

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _small_tiles_and_nan_empty(monkeypatch):
    monkeypatch.setitem(tk.BLOCKS, "rows", 64)  # rms_norm: 2-4 rows per program for these widths
    monkeypatch.setitem(tk.BLOCKS, "k", 16)
    monkeypatch.setitem(tk.BLOCKS, "d", 16)
    monkeypatch.setitem(tk.BLOCKS, "post_d", 16)
    empty, empty_like = torch.empty, torch.empty_like

    def nan_empty(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    def nan_empty_like(*args, **kwargs):
        out = empty_like(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)


def _leaves(tensors):
    return [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in tensors]


def _run(fn, inputs, extra, grad_seed=7, used=None):
    """Forward of `fn(*inputs, *extra)` and the gradients of the float inputs for random output gradients
    (`used`: indices of the outputs that get a gradient; the others are left out of the loss)."""
    leaves = _leaves(inputs)
    outs = fn(*leaves, *extra)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(grad_seed)
    used = range(len(outs)) if used is None else used
    pairs = [(outs[i], torch.randn(outs[i].shape, generator=g).to(outs[i].dtype)) for i in used]
    wrt = [t for t in leaves if t is not None]
    grads = torch.autograd.grad([o for o, _ in pairs], wrt, [gr for _, gr in pairs])
    return [o.detach() for o in outs], grads


def _compare(op, dtype, inputs, extra, used=None):
    got_out, got_grads = _run(getattr(tk, op), inputs, extra, used=used)
    ref_out, ref_grads = _run(reference_fn(op), inputs, extra, used=used)
    for o in got_out:
        assert not o.isnan().any(), f"{op}: unwritten output elements"
    for gr in got_grads:
        assert not gr.isnan().any(), f"{op}: unwritten gradient elements"
    assert_parity(op, dtype, "forward", got_out, ref_out)
    # `scale` gradients are single numbers summed over every token and stream, with cancellation: there the
    # reference itself can be ~1e-5 off, so they are held to the float64 truth by the reference's own error.
    big = [i for i, gr in enumerate(got_grads) if gr.numel() > 3]
    assert_parity(op, dtype, "backward", [got_grads[i] for i in big], [ref_grads[i] for i in big])
    scalars = [i for i in range(len(got_grads)) if i not in big]
    if scalars:
        _, truth = _run(reference_fn(op), [t.double() if t is not None else None for t in inputs], extra, used=used)
        for i in scalars:
            got_err = (got_grads[i].double() - truth[i]).norm()
            ref_err = (ref_grads[i].double() - truth[i]).norm()
            bound = TOLERANCES[op].backward[dtype] * truth[i].norm()
            assert got_err <= 3 * ref_err + bound, (
                f"{op} scale gradient: error {got_err:.3g}, reference's {ref_err:.3g}"
            )


def _hc_inputs(lead, n, d, mixes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, n, d, generator=g) * 2).to(dtype)
    fn = torch.randn(mixes, n * d, generator=g) / math.sqrt(n * d)
    base = torch.randn(mixes, generator=g)
    return x, fn, base


# ----------------------------------------------------------------------------------------------------------- rms_norm


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "unweighted"])
@pytest.mark.parametrize("shape", [(13, 24), (2, 3, 5, 40)], ids=["2d", "4d"])
def test_rms_norm(shape, weighted, dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    w = torch.randn(shape[-1], generator=g).to(dtype) if weighted else None
    _compare("rms_norm", dtype, (x, w), (1e-6,))


def test_rms_norm_non_contiguous_input():
    x = torch.randn(24, 10).t()  # [10, 24], strided
    w = torch.randn(24)
    _compare("rms_norm", torch.float32, (x, w), (1e-6,))


# ------------------------------------------------------------------------------------------------- hc_pre / hc_head


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d,iters", [(4, 24, 20), (2, 24, 3), (4, 16, 1)])
def test_hc_pre(n, d, iters, dtype):
    """18 tokens: two token blocks, the second ragged; K = n d crosses 3-6 tiles of 16; 24 gives ragged d tiles."""
    mixes = (2 + n) * n
    x, fn, base = _hc_inputs((2, 9), n, d, mixes, dtype)
    scale = torch.tensor([0.7, 1.3, 2.0])
    _compare("hc_pre", dtype, (x, fn, base, scale), (iters, 1e-6, 1e-6))


@pytest.mark.parametrize("used", [(0,), (1, 2), (2,)], ids=["collapsed", "post_comb", "comb"])
def test_hc_pre_partial_gradients(used):
    """Outputs left out of the loss reach backward as None gradients (no collapse gradient: no `dpre` pass)."""
    x, fn, base = _hc_inputs((17,), 4, 24, 24, torch.float32, seed=3)
    _compare("hc_pre", torch.float32, (x, fn, base, torch.tensor([0.5, 1.0, 1.5])), (20, 1e-6, 1e-6), used=used)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", [(4, 24), (2, 24), (4, 8)])
def test_hc_head(n, d, dtype):
    x, fn, base = _hc_inputs((3, 7), n, d, n, dtype, seed=2)
    _compare("hc_head", dtype, (x, fn, base, torch.tensor([1.3])), (1e-6, 1e-6))


def test_hc_pre_outputs_are_the_reference_dtypes_and_doubly_stochastic():
    x, fn, base = _hc_inputs((1, 5), 4, 24, 24, torch.bfloat16, seed=4)
    collapsed, post, comb = tk.hc_pre(x, fn, base, torch.tensor([1.0, 1.0, 1.0]), 20, 1e-6, 1e-6)
    assert collapsed.dtype == torch.bfloat16 and collapsed.shape == (1, 5, 24)
    assert post.dtype == comb.dtype == torch.float32 and post.shape == (1, 5, 4) and comb.shape == (1, 5, 4, 4)
    torch.testing.assert_close(comb.sum(-2), torch.ones(1, 5, 4), atol=1e-4, rtol=0)
    torch.testing.assert_close(comb.sum(-1), torch.ones(1, 5, 4), atol=1e-3, rtol=0)


# ------------------------------------------------------------------------------------------------------------- hc_post


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", [(4, 24), (2, 24), (4, 16)])
def test_hc_post(n, d, dtype):
    g = torch.Generator().manual_seed(5)
    f, x = torch.randn(2, 9, d, generator=g).to(dtype), torch.randn(2, 9, n, d, generator=g).to(dtype)
    post, comb = 2 * torch.rand(2, 9, n, generator=g), torch.rand(2, 9, n, n, generator=g)
    _compare("hc_post", dtype, (f, x, post, comb), ())


# ----------------------------------------------------------------------------------------------- dispatch and shapes


def test_empty_token_dimension():
    x, fn, base = _hc_inputs((0,), 4, 24, 24, torch.float32)
    collapsed, post, comb = tk.hc_pre(x, fn, base, torch.ones(3), 20, 1e-6, 1e-6)
    assert collapsed.shape == (0, 24) and post.shape == (0, 4) and comb.shape == (0, 4, 4)
    assert tk.rms_norm(torch.randn(0, 24), None, 1e-6).shape == (0, 24)
    assert tk.hc_post(torch.randn(0, 24), x, torch.rand(0, 4), torch.rand(0, 4, 4)).shape == (0, 4, 24)


def test_supports_rejects_what_the_kernels_do_not_handle():
    x, fn, base = _hc_inputs((2, 3), 4, 8, 24, torch.float32)
    scale = torch.ones(3)
    assert tk._hc_pre_supports(x, fn, base, scale, 20, 1e-6, 1e-6)
    assert not tk._hc_pre_supports(x.double(), fn, base, scale, 20, 1e-6, 1e-6)  # float64 gradcheck inputs
    assert not tk._hc_pre_supports(x, fn.bfloat16(), base, scale, 20, 1e-6, 1e-6)  # fn must be fp32
    assert not tk._hc_pre_supports(x, fn[:, :-1], base, scale, 20, 1e-6, 1e-6)  # fn width != n d
    assert not tk._hc_head_supports(x, fn[:4], base[:4], scale, 1e-6, 1e-6)  # hc_head takes one scale
    assert tk._hc_head_supports(x, fn[:4], base[:4], scale[:1], 1e-6, 1e-6)
    post, comb = torch.rand(2, 3, 4), torch.rand(2, 3, 4, 4)
    assert tk._hc_post_supports(x[..., 0, :], x, post, comb)
    assert not tk._hc_post_supports(x[..., 0, :], x, post.bfloat16(), comb)
    assert not tk._hc_post_supports(x[..., 0, :], x, post, comb[..., :3])
    assert tk._rms_norm_supports(x, None, 1e-6) and tk._rms_norm_supports(x, torch.ones(8), 1e-6)
    assert not tk._rms_norm_supports(x, torch.ones(7), 1e-6)
    assert not tk._rms_norm_supports(x.double(), None, 1e-6)
    with ops.use_backend("triton"), pytest.raises(RuntimeError):
        ops.rms_norm(x.double(), None, 1e-6)
