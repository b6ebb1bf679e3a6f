"""`generate` runs unmodified: greedy, sampling, beam search, on the plugin's own cache."""

import pytest
import torch

from modeling_deepseek_v4 import DeepseekV4Cache
from modeling_deepseek_v4.compat import cache_of
from tests.conftest import tiny_model

KW = dict(pad_token_id=0, eos_token_id=None)


def manual_greedy(model, ids, steps):
    ids = ids.clone()
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids


def test_greedy_generate_equals_full_recompute(schedule):
    model = tiny_model(schedule)
    ids = torch.randint(2, 97, (2, 30), generator=torch.Generator().manual_seed(3))
    out = model.generate(ids, max_new_tokens=14, do_sample=False, **KW)
    assert out.tolist() == manual_greedy(model, ids, 14).tolist()


def test_generate_uses_plugin_cache():
    model = tiny_model()
    ids = torch.randint(2, 97, (1, 10))
    out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, **KW)
    assert isinstance(cache_of(out), DeepseekV4Cache)
    assert cache_of(out).get_seq_length() == 12


def test_sampling_is_reproducible_and_valid():
    model = tiny_model()
    ids = torch.randint(2, 97, (2, 12))
    torch.manual_seed(0)
    a = model.generate(ids, max_new_tokens=8, do_sample=True, top_k=20, temperature=0.9, **KW)
    torch.manual_seed(0)
    b = model.generate(ids, max_new_tokens=8, do_sample=True, top_k=20, temperature=0.9, **KW)
    assert a.tolist() == b.tolist()
    assert a.shape == (2, 20) and int(a.max()) < model.config.vocab_size


def test_beam_search_batch_equals_per_sequence(schedule):
    model = tiny_model(schedule)
    ids = torch.randint(2, 97, (2, 26), generator=torch.Generator().manual_seed(8))
    kwargs = dict(max_new_tokens=8, num_beams=3, do_sample=False, early_stopping=False, **KW)
    batched = model.generate(ids, **kwargs)
    for row in range(2):
        assert batched[row].tolist() == model.generate(ids[row : row + 1], **kwargs)[0].tolist()


def test_unknown_cache_implementation_is_refused_clearly():
    model = tiny_model()
    with pytest.raises(ValueError, match="cache_implementation"):
        model.generate(torch.randint(2, 97, (1, 5)), max_new_tokens=2, cache_implementation="offloaded", **KW)


def test_beam_search_left_padded_batch_equals_per_sequence(schedule):
    from tests.models.test_padding import padded_batch

    model = tiny_model(schedule)
    seqs, ids, mask = padded_batch([37, 22], "left")
    kwargs = dict(max_new_tokens=7, num_beams=3, do_sample=False, early_stopping=False, **KW)
    batched = model.generate(ids, attention_mask=mask, **kwargs)[:, ids.shape[1] :]
    for row, seq in enumerate(seqs):
        alone = model.generate(seq[None], **kwargs)[0, len(seq) :]
        assert batched[row].tolist() == alone.tolist()
