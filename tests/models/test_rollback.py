"""Exact cache rollback (`DeepseekV4Cache.crop`) and the decoding modes that need it (hf-integration.md §6.2)."""

import pytest
import torch

from modeling_deepseek_v4 import DeepseekV4Cache
from tests.conftest import tiny_model

KW = dict(pad_token_id=0, eos_token_id=None, do_sample=False)


def logits_after(model, cache, tokens):
    with torch.no_grad():
        return model(tokens, past_key_values=cache).logits


@pytest.mark.parametrize("prefill,extra,remove", [(29, 7, 3), (31, 6, 6), (16, 9, 1), (40, 12, 12)])
def test_crop_then_redecode_equals_never_decoding(schedule, prefill, extra, remove):
    """Windows completing inside the removed tokens, CSA overlap state and the partial buffers all rewind."""
    model = tiny_model(schedule)
    g = torch.Generator().manual_seed(prefill)
    ids = torch.randint(2, 97, (1, prefill + extra), generator=g)
    other = torch.randint(2, 97, (1, remove + 2), generator=g)
    with torch.no_grad():
        cache = model(ids[:, :prefill], use_cache=True).past_key_values
        model(ids[:, prefill:], past_key_values=cache)  # one verification-style call of `extra` tokens
        cache.crop(-remove)
        assert cache.get_seq_length() == prefill + extra - remove
        got = logits_after(model, cache, other)
        reference = model(torch.cat([ids[:, : prefill + extra - remove], other], 1), use_cache=False).logits
    torch.testing.assert_close(got, reference[:, -other.shape[1] :], atol=1e-5, rtol=0)


def test_crop_across_several_decode_steps(schedule):
    model = tiny_model(schedule)
    ids = torch.randint(2, 97, (1, 45), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = model(ids[:, :30], use_cache=True).past_key_values
        for t in range(30, 45):
            model(ids[:, t : t + 1], past_key_values=cache)
        cache.crop(-11)
        got = logits_after(model, cache, ids[:, 34:40])
        reference = model(ids[:, :40], use_cache=False).logits[:, 34:]
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)


def test_crop_beyond_recorded_calls_is_refused():
    model = tiny_model()
    with torch.no_grad():
        cache = model(torch.randint(2, 97, (1, 80)), use_cache=True).past_key_values
    with pytest.raises(ValueError, match="roll the DeepSeek-V4 cache back"):
        cache.crop(-1)
    with pytest.raises(ValueError, match="negative"):
        cache.crop(3)


def test_prompt_lookup_decoding_equals_greedy(schedule, monkeypatch):
    removed = []
    original = DeepseekV4Cache.crop
    monkeypatch.setattr(DeepseekV4Cache, "crop", lambda self, n: (removed.append(-n), original(self, n))[1])
    model = tiny_model(schedule)
    base = torch.randint(2, 97, (1, 12), generator=torch.Generator().manual_seed(6))
    ids = torch.cat([base, base, base[:, :5]], dim=1)  # repetitive, so n-gram lookup proposes candidates
    greedy = model.generate(ids, max_new_tokens=16, **KW)
    lookup = model.generate(ids, max_new_tokens=16, prompt_lookup_num_tokens=4, **KW)
    assert lookup.tolist() == greedy.tolist()
    assert any(n > 0 for n in removed), "no candidate was rejected: the rollback path was not exercised"


def test_assisted_decoding_with_a_tiny_assistant_equals_greedy(schedule):
    model = tiny_model(schedule)
    assistant = tiny_model(schedule, seed=5)
    ids = torch.randint(2, 97, (1, 33), generator=torch.Generator().manual_seed(8))
    greedy = model.generate(ids, max_new_tokens=14, **KW)
    assisted = model.generate(ids, max_new_tokens=14, assistant_model=assistant, **KW)
    assert assisted.tolist() == greedy.tolist()
