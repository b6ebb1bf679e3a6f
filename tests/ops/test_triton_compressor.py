"""Triton `compress_pool` (triton_compressor.py) against the reference, under Triton's interpreter.

Tiny shapes that still cross every tile edge: several entry blocks with a ragged last one, channel blocks with a
ragged tail (D = 40), one slot tile (m = 4) and several streamed slot chunks (m = 16 with BLOCK_M = 4), one window
only (CSA's entry 0 is also the last), a batch row without a previous window (-inf overlap), -inf slots, and
all -inf channels (NaN like the reference). Kernel buffers are NaN-filled, so an element no kernel writes fails.
Run with `TRITON_INTERPRET=1` (CPU) or on a CUDA machine.
"""

from __future__ import annotations

import pytest
import torch

from modeling_deepseek_v4 import ops
from tests.ops.harness import reference_fn
from tests.ops.tolerances import FP32, assert_parity

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(
        "triton" not in ops.available_backends("compress_pool"), reason="triton backend of compress_pool not loaded"
    ),
]

torch.set_num_threads(1)
OP = "compress_pool"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def tc(monkeypatch):
    """The kernel module, with its output / gradient buffers NaN-filled instead of uninitialized."""
    from modeling_deepseek_v4 import triton_compressor

    def nan_empty(like, *shape):
        return torch.full(shape or like.shape, float("nan"), dtype=torch.float32, device=like.device)

    monkeypatch.setattr(triton_compressor, "_empty", nan_empty)
    return triton_compressor


def _inputs(b, n_windows, m, d, overlap, seed=0):
    """kv / score `[b, n_windows * m, width]` and, for CSA, overlap rows `[b, m, d]` (row 1 has no previous window)."""
    g = torch.Generator().manual_seed(seed)
    width = 2 * d if overlap else d
    kv = torch.randn(b, n_windows * m, width, generator=g)
    score = 2 * torch.randn(b, n_windows * m, width, generator=g)
    if not overlap:
        return {"kv": kv, "score": score}
    ov_kv, ov_score = torch.randn(b, m, d, generator=g), torch.randn(b, m, d, generator=g)
    ov_score[1] = float("-inf")
    return {"kv": kv, "score": score, "overlap_kv": ov_kv, "overlap_score": ov_score}


def _run(fn, m, inputs, dy=None, dtype=torch.float32):
    """Output of `fn` on fresh copies of `inputs` (in `dtype`, on DEVICE) and, with `dy`, the gradients of all."""
    leaves = {k: v.detach().to(DEVICE, dtype).requires_grad_(dy is not None) for k, v in inputs.items()}
    out = fn(leaves["kv"], leaves["score"], m, leaves.get("overlap_kv"), leaves.get("overlap_score"))
    if dy is None:
        return out, ()
    return out, torch.autograd.grad(out, list(leaves.values()), dy.to(DEVICE, dtype))


def _check(tc, m, inputs, blocks):
    """Forward without and with gradients, and the gradients of every input, against the reference (harness
    tolerance: at most twice the fp32 reference's own error against float64, plus 1e-6)."""
    reference = reference_fn(OP)

    def triton_fn(*args):
        return tc.compress_pool(*args, blocks=blocks)

    ref_out, _ = _run(reference, m, inputs)
    got_out, _ = _run(triton_fn, m, inputs)  # no gradient wanted: the kernel skips the softmax statistics
    truth_out, _ = _run(reference, m, inputs, dtype=torch.float64)
    assert_parity(OP, FP32, "forward", [got_out], [ref_out], [truth_out])

    dy = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ref_out, ref_grads = _run(reference, m, inputs, dy)
    got_out, got_grads = _run(triton_fn, m, inputs, dy)
    _, truth_grads = _run(reference, m, inputs, dy, dtype=torch.float64)
    assert_parity(OP, FP32, "forward", [got_out], [ref_out], [truth_out])
    assert_parity(OP, FP32, "backward", got_grads, ref_grads, truth_grads)
    return got_grads


# (variant, m, windows, blocks = (BLOCK_W, BLOCK_M, BLOCK_D) or None for the production tiling)
CASES = [
    ("hca", 4, 5, (2, 4, 16)),  # 3 entry blocks (last ragged), 3 channel blocks (40 = 16 + 16 + 8), 1 slot tile
    ("hca", 16, 5, (2, 4, 16)),  # 4 streamed slot chunks (online softmax)
    ("hca", 16, 3, None),
    ("csa", 4, 5, (2, 4, 16)),
    ("csa", 16, 5, (4, 8, 32)),  # 2 slot chunks on each side, 2 entry blocks, channel tail of 8
    ("csa", 4, 1, (2, 4, 16)),  # one window: entry 0 is the last entry too (its Ca rows get zero gradient)
    ("csa", 4, 5, None),
]


@pytest.mark.parametrize("variant,m,windows,blocks", CASES, ids=lambda v: str(v).replace(" ", ""))
def test_matches_reference(tc, variant, m, windows, blocks):
    inputs = _inputs(3, windows, m, 40, variant == "csa", seed=m + windows)
    grads = _check(tc, m, inputs, blocks)
    if variant == "csa":
        d_kv, d_score, d_ov_kv, d_ov_score = grads
        # Row 1 has no window before window 0: its overlap slots carry no weight and get exactly zero gradient.
        assert torch.equal(d_ov_kv[1], torch.zeros_like(d_ov_kv[1]))
        assert torch.equal(d_ov_score[1], torch.zeros_like(d_ov_score[1]))
        # No entry reads the last window's Ca halves.
        assert torch.equal(d_kv[:, -m:, :40], torch.zeros_like(d_kv[:, -m:, :40]))
        if windows > 1:  # ... while window 0's Ca halves feed entry 1
            assert bool(d_kv[:, :m, :40].ne(0).all())


def test_csa_masked_slots(tc):
    """-inf scores in Ca halves and in part of the overlap rows: zero weight, zero gradient, finite results."""
    m = 4
    inputs = _inputs(3, 4, m, 40, True, seed=3)
    g = torch.Generator().manual_seed(11)
    ca = inputs["score"][..., :40]
    ca[torch.rand(ca.shape, generator=g) < 0.3] = float("-inf")
    inputs["overlap_score"][2, :2] = float("-inf")
    _check(tc, m, inputs, (2, 4, 16))


def test_all_masked_channels_are_nan_like_reference(tc):
    """HCA channels whose m slots are all -inf: the reference's softmax gives NaN; so do forward and backward here,
    at the same places, and everything else matches."""
    m = 4
    inputs = _inputs(3, 3, m, 40, False, seed=5)
    score = inputs["score"]
    score[0, m : 2 * m, 3] = float("-inf")  # row 0, window 1, channel 3
    score[2, : 2 * m, 37:] = float("-inf")  # row 2, windows 0-1, channels 37-39 (the ragged channel tail)
    score[1, 0, :] = float("-inf")  # one masked slot only: finite
    dy = torch.randn(3, 3, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _run(reference_fn(OP), m, inputs, dy)
    got = _run(lambda *a: tc.compress_pool(*a, blocks=(2, 4, 16)), m, inputs, dy)
    assert int(torch.isnan(ref[0]).sum()) == 1 + 2 * 3
    for r, g_ in zip((ref[0], *ref[1]), (got[0], *got[1])):
        assert torch.equal(torch.isnan(r), torch.isnan(g_))
        torch.testing.assert_close(g_, r, equal_nan=True, atol=1e-6, rtol=1e-5)


def test_supports_and_dispatch(tc):
    kv, score = torch.randn(2, 8, 6, device=DEVICE), torch.randn(2, 8, 6, device=DEVICE)
    ov = torch.randn(2, 4, 3, device=DEVICE)
    assert tc.supports(kv, score, 4) and tc.supports(kv, score, 4, ov, ov)
    assert ops.resolve(OP, kv, score, 4, overlap_kv=None, overlap_score=None) is tc._registered
    assert not tc.supports(kv.double(), score.double(), 4)  # float64 (gradcheck) stays on the reference
    assert not tc.supports(kv, score, 3)  # a partial window
    assert not tc.supports(kv[:, :0], score[:, :0], 4)  # no window
    assert not tc.supports(kv, score, 4, ov, None)
    assert not tc.supports(kv, score, 4, ov[:, :2], ov[:, :2])
    assert not tc.supports(kv[..., :5], score[..., :5], 4, ov, ov)  # odd CSA width
    # The public op (eager and through the custom op's backend choice) runs the kernel.
    with ops.use_backend("triton"):
        out = ops.compress_pool(kv, score, 4, ov, ov)
    torch.testing.assert_close(out, reference_fn(OP)(kv, score, 4, ov, ov), atol=1e-6, rtol=1e-5)


def test_supports_declines_rows_beyond_int32_offsets(tc, monkeypatch):
    monkeypatch.setattr(tc, "on_kernel_device", lambda *tensors: True)  # meta tensors: shapes only
    row = torch.empty(1, 2**20, 2**11 - 4, device="meta")
    assert tc.supports(row, row, 4)
    big = torch.empty(1, 2**20, 2**11, device="meta")  # 2^31 elements in one row
    assert not tc.supports(big, big, 4)
