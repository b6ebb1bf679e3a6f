"""Static cache + compiled decode step (hf-integration.md §6.5)."""

import pytest
import torch

from modeling_deepseek_v4.compat import cache_of
from modeling_deepseek_v4.static_cache import DeepseekV4StaticCache
from tests.conftest import tiny_model
from tests.models.test_padding import padded_batch

KW = dict(pad_token_id=0, eos_token_id=None, do_sample=False, max_new_tokens=18)


def test_static_cache_greedy_equals_dynamic(schedule):
    model = tiny_model(schedule)
    ids = torch.randint(2, 97, (2, 30), generator=torch.Generator().manual_seed(1))
    dynamic = model.generate(ids, **KW)
    static = model.generate(ids, cache_implementation="static", return_dict_in_generate=True, **KW)
    assert static.sequences.tolist() == dynamic.tolist()
    assert isinstance(cache_of(static), DeepseekV4StaticCache)
    state = cache_of(static).layers[2].states["compressor"]
    assert state.entries.shape[1] == -(-48 // 4) + 1  # sized from max_length (30 + 18), never grown


def test_static_cache_left_padded_batch_equals_single():
    model = tiny_model()
    seqs, ids, mask = padded_batch([33, 19], "left")
    batched = model.generate(ids, attention_mask=mask, cache_implementation="static", **KW)[:, ids.shape[1] :]
    for row, seq in enumerate(seqs):
        assert batched[row].tolist() == model.generate(seq[None], **KW)[0, len(seq) :].tolist()


def test_compiled_decode_step_has_no_graph_break_and_equals_eager():
    model = tiny_model()
    ids = torch.randint(2, 97, (2, 29), generator=torch.Generator().manual_seed(2))

    def decode(steps=6):
        cache = DeepseekV4StaticCache(model.config, max_cache_len=64)
        with torch.no_grad():
            model(ids[:, :20], past_key_values=cache)
            return torch.cat(
                [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(20, 20 + steps)], 1
            )

    eager = decode()
    # fullgraph=True raises on any graph break; aot_eager keeps the test fast (no code generation).
    model.model.compile_decode(backend="aot_eager", fullgraph=True)
    try:
        compiled = decode()
    finally:
        model.model.__dict__.pop("_compiled_decode_step")
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=0)


def test_static_cache_limits_are_clear():
    model = tiny_model()
    cache = DeepseekV4StaticCache(model.config, max_cache_len=16)
    with torch.no_grad(), pytest.raises(ValueError, match="max_cache_len"):
        model(torch.randint(2, 97, (1, 40)), past_key_values=cache)
    with pytest.raises(ValueError, match="does not roll back"):
        DeepseekV4StaticCache(model.config).crop(-1)
