"""Reference ops: `compress_pool` (forward-math.md §4) and `indexer_topk` (§5, lowest-index tie rule)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.ops.harness import reference_op

compress_pool, indexer_topk = reference_op("compress_pool"), reference_op("indexer_topk")

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------------- compress_pool


def _pool(slots_kv: list[list[float]], slots_score: list[list[float]], d: int) -> list[float]:
    """Per-channel softmax over slots of `score`, weighted sum of `kv` (float64, plain python)."""
    out = []
    for c in range(d):
        scores = [s[c] for s in slots_score]
        m = max(scores)
        e = [math.exp(v - m) if v != float("-inf") else 0.0 for v in scores]
        out.append(sum(w * kv[c] for w, kv in zip(e, slots_kv)) / sum(e))
    return out


def _loop_compress(kv, score, ratio, overlap_kv=None, overlap_score=None):
    b_, length, width = kv.shape
    n_w = length // ratio
    d = width // 2 if overlap_kv is not None else width
    out = torch.zeros(b_, n_w, d, dtype=torch.float64)
    for b in range(b_):
        for i in range(n_w):
            tokens = range(i * ratio, (i + 1) * ratio)
            if overlap_kv is None:
                slots_kv = [kv[b, a].tolist() for a in tokens]
                slots_score = [score[b, a].tolist() for a in tokens]
            else:
                if i == 0:
                    prev_kv = [overlap_kv[b, a].tolist() for a in range(ratio)]
                    prev_score = [overlap_score[b, a].tolist() for a in range(ratio)]
                else:
                    prev = range((i - 1) * ratio, i * ratio)
                    prev_kv = [kv[b, a, :d].tolist() for a in prev]  # Ca halves of window i - 1
                    prev_score = [score[b, a, :d].tolist() for a in prev]
                slots_kv = prev_kv + [kv[b, a, d:].tolist() for a in tokens]  # + Cb halves of window i
                slots_score = prev_score + [score[b, a, d:].tolist() for a in tokens]
            out[b, i] = torch.tensor(_pool(slots_kv, slots_score, d), dtype=torch.float64)
    return out


@pytest.mark.parametrize("ratio", [1, 4])
def test_compress_pool_hca_matches_window_loop(ratio):
    torch.manual_seed(0)
    kv = torch.randn(2, 3 * ratio, 6)
    score = torch.randn(2, 3 * ratio, 6) * 2
    out = compress_pool(kv, score, ratio)
    assert out.shape == (2, 3, 6) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _loop_compress(kv, score, ratio), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("has_previous", [False, True])
def test_compress_pool_csa_matches_window_loop(has_previous):
    torch.manual_seed(1)
    ratio, d = 4, 5
    kv = torch.randn(2, 3 * ratio, 2 * d)
    score = torch.randn(2, 3 * ratio, 2 * d) * 2
    if has_previous:
        overlap_kv, overlap_score = torch.randn(2, ratio, d), torch.randn(2, ratio, d)
    else:
        overlap_kv, overlap_score = torch.zeros(2, ratio, d), torch.full((2, ratio, d), float("-inf"))
    out = compress_pool(kv, score, ratio, overlap_kv, overlap_score)
    assert out.shape == (2, 3, d)
    expected = _loop_compress(kv, score, ratio, overlap_kv, overlap_score)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    if not has_previous:  # window 0 pools its own Cb halves only
        own = _loop_compress(kv[:, :ratio, d:], score[:, :ratio, d:], ratio)
        torch.testing.assert_close(out[:, :1].double(), own, rtol=1e-5, atol=1e-6)


def test_compress_pool_csa_halves_not_swapped():
    """Entry i takes Ca = [:D] of window i - 1 and Cb = [D:] of window i; the swapped split differs."""
    torch.manual_seed(2)
    ratio, d = 2, 3
    kv, score = torch.randn(1, 3 * ratio, 2 * d), torch.randn(1, 3 * ratio, 2 * d)
    ov_kv, ov_score = torch.randn(1, ratio, d), torch.randn(1, ratio, d)
    out = compress_pool(kv, score, ratio, ov_kv, ov_score).double()
    swapped = _loop_compress(kv.roll(d, -1), score.roll(d, -1), ratio, ov_kv, ov_score)
    assert (out - swapped).abs().max() > 1e-2


# -------------------------------------------------------------------------------------------------------- indexer_topk


def _brute_topk(q, keys, weights, positions, ratio, topk):
    """Per query: full scores in float64, causal s < (t + 1) // ratio, top-k by (score desc, index asc), -1 pad."""
    b_, s_, h_, _ = q.shape
    n = keys.shape[1]
    k = min(topk, n)
    out = torch.full((b_, s_, k), -1, dtype=torch.long)
    for b in range(b_):
        for i in range(s_):
            limit = min((int(positions[b, i]) + 1) // ratio, n)
            scored = []
            for s in range(limit):
                val = sum(
                    float(weights[b, i, h]) * max(float(q[b, i, h].double() @ keys[b, s].double()), 0.0)
                    for h in range(h_)
                )
                scored.append((-val, s))
            chosen = sorted(s for _, s in sorted(scored)[:k])
            out[b, i, : len(chosen)] = torch.tensor(chosen, dtype=torch.long)
    return out


def _canon(idx: torch.Tensor) -> torch.Tensor:
    """Ascending selected entries, -1 padding at the end (the op does not promise an order)."""
    big = torch.iinfo(torch.long).max
    srt = torch.where(idx < 0, big, idx).sort(-1).values
    return torch.where(srt == big, -1, srt)


def _indexer_inputs(seed, b=2, s=12, h=4, c=8, n=9, integer=False):
    g = torch.Generator().manual_seed(seed)
    if integer:  # exact fp32 arithmetic: many exact ties, independent of the summation order
        q = torch.randint(-2, 3, (b, s, h, c), generator=g).float()
        keys = torch.randint(-2, 3, (b, n, c), generator=g).float()
        weights = torch.randint(0, 3, (b, s, h), generator=g).float()
    else:
        q, keys = torch.randn(b, s, h, c, generator=g), torch.randn(b, n, c, generator=g)
        weights = torch.rand(b, s, h, generator=g)
    start = torch.tensor([0, 7])[:b]
    positions = start[:, None] + torch.arange(s)
    return q, keys, weights, positions


@pytest.mark.parametrize("integer", [False, True])
@pytest.mark.parametrize("topk", [1, 3, 20])
def test_indexer_topk_matches_brute_force(integer, topk):
    q, keys, weights, positions = _indexer_inputs(seed=3, integer=integer)
    out = indexer_topk(q, keys, weights, positions, ratio=2, topk=topk)
    assert out.dtype == torch.long and out.shape == (2, 12, min(topk, 9))
    assert torch.equal(_canon(out), _brute_topk(q, keys, weights, positions, 2, topk))


def test_indexer_topk_ties_pick_lowest_index():
    q, keys, weights, positions = _indexer_inputs(seed=4, s=6, n=10)
    weights[0, :3] = 0.0  # every score 0
    weights[1, :, 1:] = 0.0  # one head only
    keys[1, 5:] = keys[1, 2]  # identical keys: entries 2, 5, 6, ... tie exactly
    keys[1, 0] = -keys[1, 2]  # relu zeros on the remaining head for some entries
    positions = torch.tensor([[19, 19, 19, 12, 19, 19], [19, 15, 19, 19, 19, 19]])
    out = indexer_topk(q, keys, weights, positions, ratio=2, topk=3)
    assert torch.equal(out[0, :3], torch.tensor([[0, 1, 2]] * 3))
    assert torch.equal(_canon(out), _brute_topk(q, keys, weights, positions, 2, 3))


def test_indexer_topk_relu_zero_ties():
    """All heads negative on most entries: ReLU makes exact zero scores, the lowest indices must fill up."""
    q, keys, weights, positions = _indexer_inputs(seed=5, s=4, n=8)
    q = q.abs()
    keys = -keys.abs()
    keys[:, 5] = keys[:, 5].abs()  # the only entry with a positive score
    positions = torch.full((2, 4), 100)
    out = indexer_topk(q, keys, weights, positions, ratio=4, topk=3)
    assert torch.equal(_canon(out), torch.tensor([0, 1, 5]).expand(2, 4, 3))


@pytest.mark.parametrize("integer", [False, True])
def test_indexer_topk_chunk_and_head_group_invariant(integer):
    q, keys, weights, positions = _indexer_inputs(seed=6, s=13, h=9, n=11, integer=integer)
    ref = indexer_topk(q, keys, weights, positions, ratio=2, topk=4, chunk=1000, head_group=8)
    for chunk in (1, 3, 1000):
        for head_group in (1, 8):
            out = indexer_topk(q, keys, weights, positions, ratio=2, topk=4, chunk=chunk, head_group=head_group)
            assert torch.equal(out, ref), (chunk, head_group)
    assert torch.equal(_canon(ref), _brute_topk(q, keys, weights, positions, 2, 4))


def test_indexer_topk_few_causal_entries_get_all():
    q, keys, weights, positions = _indexer_inputs(seed=7, s=10, n=12)
    out = indexer_topk(q, keys, weights, positions, ratio=4, topk=3)
    limits = ((positions + 1) // 4).clamp(max=12)
    for b in range(2):
        for i in range(10):
            lim = int(limits[b, i])
            valid = out[b, i][out[b, i] >= 0]
            assert bool((valid < lim).all())  # never a future entry
            if lim <= 3:
                assert sorted(valid.tolist()) == list(range(lim))
                assert int((out[b, i] < 0).sum()) == 3 - lim
            else:
                assert valid.numel() == 3 and len(set(valid.tolist())) == 3


def test_indexer_topk_no_entries_and_garbage_keys():
    q, keys, weights, positions = _indexer_inputs(seed=8, b=1, s=5, n=6)
    out = indexer_topk(q, keys, weights, positions, ratio=8, topk=2)
    assert torch.equal(out, torch.full((1, 5, 2), -1))  # (t + 1) // 8 == 0 for t < 5
    keys2 = keys.clone()
    keys2[:, 2:] = 1e4  # entries beyond every query's limit: never selected
    positions = torch.tensor([[8, 9, 10, 11, 12]])
    assert torch.equal(
        indexer_topk(q, keys2, weights, positions, ratio=4, topk=2),
        indexer_topk(q, keys, weights, positions, ratio=4, topk=2),
    )
