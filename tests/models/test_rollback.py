"""Exact cache rollback (`DeepseekV4Cache.crop`, docs/hf-integration.md §6.2): any call length, any number of rejected
positions within the rollback horizon, left-padded rows, and a history whose size does not depend on the calls."""

import pytest
import torch

from modeling_deepseek_v4 import DeepseekV4Cache
from tests.conftest import tiny_model
from tests.models.test_padding import padded_batch


def random_ids(shape, seed):
    return torch.randint(2, 97, shape, generator=torch.Generator().manual_seed(seed))


def assert_resumes_like_never_decoded(model, cache, kept_ids, other):
    """After a crop, decoding `other` on the cache equals a full forward over the kept tokens + `other` (long
    enough to complete the CSA and HCA windows open at the crop, whose pooling reads the restored state)."""
    assert other.shape[1] >= 10
    with torch.no_grad():
        got = model(other, past_key_values=cache).logits
        reference = model(torch.cat([kept_ids, other], 1), use_cache=False).logits[:, -other.shape[1] :]
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)


# (prefill, extra, remove): removals inside the last call, across CSA (4) / HCA (8) window boundaries and the
# sliding window (8), including a long single call (a 300-token prompt + drafts) rolled back into itself.
@pytest.mark.parametrize("prefill,extra,remove", [(29, 7, 3), (31, 6, 6), (16, 9, 1), (40, 12, 12), (0, 300, 9)])
def test_crop_then_redecode_equals_never_decoding(schedule, prefill, extra, remove):
    model = tiny_model(schedule)
    ids = random_ids((1, prefill + extra), prefill + extra)
    other = random_ids((1, 12), remove)
    cache = DeepseekV4Cache(model.config, rollback_tokens=12)
    with torch.no_grad():
        if prefill:
            model(ids[:, :prefill], past_key_values=cache)
        model(ids[:, prefill:], past_key_values=cache)  # one verification-style call of `extra` tokens
    cache.crop(-remove)
    assert cache.get_seq_length() == prefill + extra - remove
    assert_resumes_like_never_decoded(model, cache, ids[:, : prefill + extra - remove], other)


def test_crop_across_several_calls_and_twice(schedule):
    model = tiny_model(schedule)
    ids = random_ids((1, 60), 4)
    cache = DeepseekV4Cache(model.config, rollback_tokens=16)
    with torch.no_grad():
        model(ids[:, :30], past_key_values=cache)
        for t in range(30, 40):
            model(ids[:, t : t + 1], past_key_values=cache)
        model(ids[:, 40:45], past_key_values=cache)
        cache.crop(-7)  # the 5-token call and two decode steps
        model(ids[:, 38:41], past_key_values=cache)
        cache.crop(-2)
    assert cache.get_seq_length() == 39
    assert_resumes_like_never_decoded(model, cache, ids[:, :39], ids[:, 39:51])


def test_verification_pattern_over_many_steps(schedule):
    """Speculative decoding's pattern: prefill, then calls of 1 + k tokens, each followed by a crop of the rejected
    ones (sometimes none, sometimes all), landing on every offset of the CSA (4) and HCA (8) windows."""
    model = tiny_model(schedule)
    ids = random_ids((1, 120), 14)
    cache = DeepseekV4Cache(model.config, rollback_tokens=3)
    pos = 23
    with torch.no_grad():
        model(ids[:, :pos], past_key_values=cache)
        for step, (k, rejected) in enumerate([(1, 1), (1, 0), (1, 1), (3, 2), (3, 0), (2, 2), (3, 3), (1, 1)] * 3):
            logits = model(ids[:, pos : pos + 1 + k], past_key_values=cache).logits
            reference = model(ids[:, : pos + 1 + k], use_cache=False).logits[:, -1 - k :]
            torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0, msg=f"step {step} at {pos}")
            cache.crop(-rejected)
            pos += 1 + k - rejected
            assert cache.get_seq_length() == pos


def test_left_padded_rows_roll_back_their_own_tokens(schedule):
    """A padded prompt, then draft-like calls; each row loses its own last real tokens and resumes exactly."""
    model = tiny_model(schedule)
    seqs, ids, mask = padded_batch([37, 22], "left")
    drafts = random_ids((2, 6), 12)
    cache = DeepseekV4Cache(model.config, rollback_tokens=8)
    full_mask = torch.cat([mask, torch.ones(2, 6, dtype=torch.long)], 1)
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache)
        model(drafts, attention_mask=full_mask, past_key_values=cache)
    cache.crop(-4)
    nxt = random_ids((2, 12), 13)
    resume_mask = torch.cat([full_mask[:, :-4], torch.ones(2, 12, dtype=torch.long)], 1)
    with torch.no_grad():
        got = model(nxt, attention_mask=resume_mask, past_key_values=cache).logits
        for row, seq in enumerate(seqs):
            alone = torch.cat([seq, drafts[row, :2], nxt[row]])[None]
            reference = model(alone, use_cache=False).logits[0, -12:]
            torch.testing.assert_close(got[row], reference, atol=1e-5, rtol=0)


def test_rollback_enabled_mid_stream_undoes_what_came_after(schedule):
    """`ensure_rollback` on a cache that holds tokens seeds the history from the partial window and the overlap."""
    model = tiny_model(schedule)
    ids = random_ids((1, 70), 5)
    with torch.no_grad():
        cache = model(ids[:, :43], use_cache=True).past_key_values
        assert not cache.is_croppable
        cache.ensure_rollback(10)
        model(ids[:, 43:50], past_key_values=cache)
        with pytest.raises(ValueError, match="can undo 7"):
            cache.crop(-8)  # only tokens after the history started can be undone
        cache.crop(-7)
    assert_resumes_like_never_decoded(model, cache, ids[:, :43], ids[:, 43:55])


def test_history_size_does_not_grow_with_the_calls():
    """What a rollback needs is bounded by the window, the compressor windows and R, not by the prompt."""
    model = tiny_model()
    sizes = []
    for length in (40, 400):
        cache = DeepseekV4Cache(model.config, rollback_tokens=5)
        with torch.no_grad():
            model(random_ids((1, length), 6), past_key_values=cache)
        layer = cache.layers[2]  # a CSA layer: window + compressor + indexer
        held = [layer.window_kv] + [t for s in layer.states.values() for t in (s.history_kv, s.buf_kv)]
        sizes.append([tuple(t.shape) for t in held])
    assert sizes[0] == sizes[1]
    assert cache.layers[2].window_kv.shape[1] == model.config.sliding_window - 1 + 5


def test_crop_limits_are_clear():
    model = tiny_model()
    with torch.no_grad():
        cache = model(random_ids((1, 80), 7), use_cache=True).past_key_values
    with pytest.raises(ValueError, match="roll the DeepSeek-V4 cache back by 1"):
        cache.crop(-1)
    with pytest.raises(ValueError, match="negative"):
        cache.crop(3)
    cache = DeepseekV4Cache(model.config, rollback_tokens=4)
    with torch.no_grad():
        model(random_ids((1, 30), 8), past_key_values=cache)
    with pytest.raises(ValueError, match="rollback_tokens=4"):
        cache.crop(-5)
    cache.crop(0)
    assert cache.get_seq_length() == 30
