"""The Triton `indexer_topk` (``triton_indexer.py``) against the reference and an exact brute force: several query
chunks, query blocks per program and entry tiles with ragged tails, padded heads and head dims, rows with at most k
causal entries, different positions per batch row, exact ties from duplicated keys (lowest index wins), bf16
rounding of the scores, `static_shapes`, and chunk-size invariance. Runs under ``TRITON_INTERPRET=1`` on CPU.
"""

from __future__ import annotations

import pytest
import torch

from modeling_deepseek_v4 import ops
from tests.ops.harness import reference_fn
from tests.ops.tolerances import _sorted_rows, assert_parity

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif("triton" not in ops.available_backends("indexer_topk"), reason="Triton backend not loaded"),
]

torch.set_num_threads(1)

VARIANTS = {
    "dynamic": {},
    "static": {"static_shapes": True},
    "rounded": {"round_scores": True},
}
DTYPES = (torch.float32, torch.bfloat16)

# name: (B, S, H, c, N, ratio, k, first position per batch row, chunk)
CONFIGS = {
    # 3 entry tiles (ragged), padded heads (3 -> 4) and head dim (24 -> 32), 3 chunks (ragged); batch row 0 has
    # rows with limit <= k and a chunk with no scored row, row 1 has limits past N.
    "tiles": (2, 37, 3, 24, 150, 2, 8, (0, 260), 16),
    # V4-Flash head count: M = 2 queries x 64 heads, 4 query blocks per program; limits just below N.
    "v4_heads": (1, 9, 64, 32, 70, 4, 16, (250,), 8),
    # 16 heads: 8 queries per block, 5 blocks per program, and a ragged last chunk.
    "query_blocks": (2, 45, 16, 16, 100, 1, 5, (0, 50), 40),
}


def _inputs(config: str, dtype: torch.dtype, seed: int = 0):
    b, s, h, c, n, ratio, k, starts, chunk = CONFIGS[config]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, h, c, generator=g).to(dtype)
    keys = torch.randn(b, n, c, generator=g).to(dtype)
    weights = torch.rand(b, s, h, generator=g) - 0.2
    positions = torch.tensor(starts)[:, None] + torch.arange(s)
    return (q, keys, weights, positions, ratio, k), chunk


def _triton(*args, **kwargs) -> torch.Tensor:
    with ops.use_backend("triton"):
        return ops.indexer_topk(*args, **kwargs)


def _full_kwargs(**kwargs) -> dict:
    return {"chunk": 256, "head_group": 8, "static_shapes": False, "round_scores": False, **kwargs}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("config", CONFIGS)
def test_matches_reference(config, variant, dtype):
    args, chunk = _inputs(config, dtype)
    kwargs = _full_kwargs(chunk=chunk, **VARIANTS[variant])
    got = _triton(*args, **kwargs)
    ref = reference_fn("indexer_topk")(*args, **kwargs)
    assert_parity("indexer_topk", dtype, "forward", (got,), (ref,))
    if variant != "static":
        assert torch.equal(got, ref)  # the dynamic path also lists each row ascending, -1 last, like the reference


@pytest.mark.parametrize("static", [False, True])
def test_chunk_size_does_not_change_the_result(static):
    args, _ = _inputs("tiles", torch.float32, seed=1)
    outs = [_triton(*args, **_full_kwargs(chunk=chunk, static_shapes=static)) for chunk in (7, 16, 64)]
    for out in outs[1:]:
        assert torch.equal(_sorted_rows(out), _sorted_rows(outs[0]))


def _exact_inputs(dtype: torch.dtype, seed: int = 0):
    """Small-integer q, keys, weights: every score is an exact integer in fp32 whatever the summation order, and
    keys drawn from 5 distinct rows make equal scores everywhere (many above 256, where bf16 rounding has ties)."""
    b, s, h, c, n, ratio, k = 2, 21, 4, 16, 90, 2, 6
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-4, 5, (b, s, h, c), generator=g).float()
    base = torch.randint(-4, 5, (b, 5, c), generator=g).float()
    keys = torch.gather(base, 1, torch.randint(0, 5, (b, n, 1), generator=g).expand(b, n, c))
    weights = torch.randint(-3, 4, (b, s, h), generator=g).float()
    positions = torch.tensor([[140], [3]]) + torch.arange(s)
    return (q.to(dtype), keys.to(dtype), weights, positions, ratio, k)


def _brute_force(q, keys, weights, positions, ratio, k, round_scores=False) -> torch.Tensor:
    """Exact top-k (float64 scores, stable descending sort: lowest index first among equal scores), -1 past the
    causal limit."""
    scores = torch.einsum("bshc,bnc->bshn", q.double(), keys.double()).relu()
    scores = (scores * weights.double().unsqueeze(-1)).sum(2)
    if round_scores:
        scores = scores.float().bfloat16().double()
    limits = ((positions + 1) // ratio).unsqueeze(-1)
    cols = torch.arange(keys.shape[1])
    scores = scores.masked_fill(cols >= limits, float("-inf"))
    idx = scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.where(idx < limits, idx, -1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_exact_ties_take_the_lowest_index(variant, dtype):
    args = _exact_inputs(dtype)
    kwargs = _full_kwargs(chunk=8, **VARIANTS[variant])
    truth = _brute_force(*args, round_scores=kwargs["round_scores"])
    got = _triton(*args, **kwargs)
    assert torch.equal(_sorted_rows(got), _sorted_rows(truth))
    assert torch.equal(_sorted_rows(reference_fn("indexer_topk")(*args, **kwargs)), _sorted_rows(truth))


def test_rounding_is_round_to_nearest_even():
    """Integer scores in [256, 512) include exact bf16 halfway cases (odd values): the kernel rounds them to the
    nearest even like torch, not by truncation."""
    from modeling_deepseek_v4.triton_indexer import _chunk_scores

    g = torch.Generator().manual_seed(2)
    b, s, h, c, n, k = 1, 16, 4, 16, 64, 4
    q = torch.randint(-8, 9, (b, s, h, c), generator=g).float()
    keys = torch.randint(-8, 9, (b, n, c), generator=g).float()
    weights = torch.randint(-2, 3, (b, s, h), generator=g).float()
    lim = torch.full((b, s), n, dtype=torch.int32)
    exact = torch.einsum("bshc,bnc->bshn", q, keys).relu().mul(weights.unsqueeze(-1)).sum(2)
    halfway = (exact.abs() >= 256) & (exact.abs() < 512) & (exact.remainder(2) == 1)
    assert int(halfway.sum()) >= 10
    got = _chunk_scores(q, keys, weights, lim, k, n, round_scores=True)
    assert torch.equal(got, exact.bfloat16().float())


@pytest.mark.parametrize("round_scores", [False, True])
def test_scores_block_fully_written(round_scores):
    """Every element of a NaN-filled score block is written: fp32 scores on the causal entries of scored rows
    (close to a float64 computation), 0 on the causal entries of rows with limit <= k, -inf past the limit."""
    from modeling_deepseek_v4.triton_indexer import _chunk_scores

    (q, keys, weights, positions, ratio, k), _ = _inputs("tiles", torch.float32, seed=3)
    lim = ((positions + 1) // ratio).clamp(0, keys.shape[1]).to(torch.int32)
    n_cols = 131  # ragged third tile, fewer columns than keys
    out = torch.full((q.shape[0], q.shape[1], n_cols), float("nan"))
    _chunk_scores(q, keys, weights, lim, k, n_cols, round_scores, out=out)
    assert not bool(out.isnan().any())
    want = torch.einsum("bshc,bnc->bshn", q.double(), keys.double()).relu()
    want = (want * weights.double().unsqueeze(-1)).sum(2)[..., :n_cols]
    if round_scores:
        want = want.float().bfloat16().double()
    cols = torch.arange(n_cols)
    causal = cols < lim.unsqueeze(-1)
    scored = causal & (lim > k).unsqueeze(-1)
    assert bool(scored.any()) and bool((causal & ~scored).any())
    bound = 1e-5 if not round_scores else 1e-2
    assert torch.allclose(out[scored].double(), want[scored], rtol=bound, atol=bound)
    assert bool((out[causal & ~scored] == 0).all())
    assert bool((out[~causal] == float("-inf")).all())


@pytest.mark.parametrize("static", [False, True])
def test_short_rows_and_k_at_least_n(static):
    """No row exceeds k (no scores at all), k >= N, and padding positions (-1: no causal entry)."""
    (q, keys, weights, positions, ratio, _), _ = _inputs("tiles", torch.float32, seed=4)
    positions = positions.clone()
    positions[1, :5] = -1
    reference = reference_fn("indexer_topk")
    for k in (20, 150, 400):
        kwargs = _full_kwargs(chunk=16, static_shapes=static)
        got = _triton(q, keys, weights, positions if k > 20 else positions.clamp(max=30), ratio, k, **kwargs)
        ref = reference(q, keys, weights, positions if k > 20 else positions.clamp(max=30), ratio, k, **kwargs)
        assert got.shape == (2, 37, min(k, 150))
        assert torch.equal(_sorted_rows(got), _sorted_rows(ref))
        assert bool((got[1, :5] == -1).all())


def test_supports_and_no_grad():
    """Inputs that require grad give a plain integer result; float64 or mismatched shapes fall back (auto) and
    raise when triton is forced."""
    from modeling_deepseek_v4.triton_indexer import _supports

    (q, keys, weights, positions, ratio, k), chunk = _inputs("v4_heads", torch.float32)
    leaves = [t.clone().requires_grad_(True) for t in (q, keys, weights)]
    out = _triton(*leaves, positions, ratio, k, **_full_kwargs(chunk=chunk))
    assert out.dtype == torch.long and not out.requires_grad
    assert _supports(q, keys, weights, positions, ratio, k)
    assert not _supports(q.double(), keys.double(), weights.double(), positions, ratio, k)
    assert not _supports(q, keys[..., :16], weights, positions, ratio, k)
    assert not _supports(q, keys, weights, positions.float(), ratio, k)
    with pytest.raises(RuntimeError, match="cannot run this call"):
        _triton(q.double(), keys.double(), weights.double(), positions, ratio, k)
