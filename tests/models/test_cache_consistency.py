"""Full forward == chunked prefill == token-by-token decode (DeepseekV4Cache streaming state, forward-math.md §4)."""

import pytest
import torch

from modeling_deepseek_v4 import DeepseekV4Cache
from tests.conftest import record_indexer_margin, tiny_model


def incremental_logits(model, ids, chunks):
    """Feed `ids` in consecutive pieces of the given lengths through one cache; concatenated logits."""
    cache, outs, pos = None, [], 0
    for n in chunks:
        out = model(ids[:, pos : pos + n], past_key_values=cache, use_cache=True)
        cache, pos = out.past_key_values, pos + n
        outs.append(out.logits)
    assert pos == ids.shape[1] and cache.get_seq_length() == pos
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize(
    "chunks",
    [[64], [17, 47], [5, 3, 8, 16, 32], [30] + [1] * 34, [1] * 64],
    ids=["prefill", "two-chunks", "uneven-chunks", "prefill-then-decode", "token-by-token"],
)
def test_incremental_equals_full(schedule, chunks):
    model = tiny_model(schedule)
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        inc = incremental_logits(model, ids, chunks)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=0)


def test_cache_keeps_compressed_state_per_layer(schedule):
    model = tiny_model(schedule)
    ids = torch.randint(0, model.config.vocab_size, (1, 37))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    assert isinstance(cache, DeepseekV4Cache)
    cfg = model.config
    for i, layer in enumerate(cache.layers):
        ratio = cfg.layer_compress_ratio(i)
        assert layer.window_kv.shape == (1, cfg.sliding_window - 1, cfg.head_dim)
        if ratio == 0:
            assert layer.states == {}
            continue
        names = {"compressor", "indexer"} if ratio == 4 else {"compressor"}
        assert set(layer.states) == names
        # Entries for every window that completed within the 37 tokens are present.
        assert layer.states["compressor"].entries.shape[1] >= 37 // ratio


def test_cache_batch_mismatch_is_reported():
    model = tiny_model()
    with torch.no_grad():
        cache = model(torch.randint(0, 97, (2, 5)), use_cache=True).past_key_values
        with pytest.raises(ValueError, match="batch size"):
            model(torch.randint(0, 97, (3, 1)), past_key_values=cache)


def test_foreign_cache_is_rejected():
    from transformers import DynamicCache

    model = tiny_model()
    cache = DynamicCache()
    cache.update(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), 0)
    with pytest.raises(TypeError, match="DeepseekV4Cache"):
        model(torch.randint(0, 97, (1, 3)), past_key_values=cache)


def test_beam_reorder_moves_every_state():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        swapped = model(ids.flip(0), use_cache=True).past_key_values
        cache.reorder_cache(torch.tensor([1, 0]))
        nxt = torch.tensor([[5], [6]])
        a = model(nxt, past_key_values=cache).logits
        b = model(nxt, past_key_values=swapped).logits
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_incremental_equals_full_with_many_indexer_ties(schedule):
    """One indexer head: ReLU zeros make exact score ties at the top-k boundary common. The lowest-index rule makes
    every way of feeding the tokens select the same entries (native's `torch.topk` order would not)."""
    model = tiny_model(schedule, index_n_heads=1)
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(9))
    with torch.no_grad(), record_indexer_margin() as margins:
        full = model(ids, use_cache=False).logits
    assert min(margins) == 0.0, "the test needs inputs with exact ties at the selection boundary"
    with torch.no_grad():
        for chunks in ([17, 47], [30] + [1] * 34):
            torch.testing.assert_close(incremental_logits(model, ids, chunks), full, atol=1e-5, rtol=0)
