"""Every generation mode against a reference that does not go through `generate` or the cache (a full recompute per
token), on prompts of several hundred tokens, so that the tokens are the same under every supported transformers
(the cache argument is `past_key_values` in 5.23 and `cache` in 5.24; compat.py)."""

import logging
import warnings

import pytest
import torch

from modeling_deepseek_v4 import DeepseekV4Cache
from modeling_deepseek_v4.compat import cache_of
from modeling_deepseek_v4.static_cache import DeepseekV4StaticCache
from tests.conftest import tiny_model
from tests.models.test_padding import padded_batch

KW = dict(pad_token_id=0, eos_token_id=None)
NEW = 14


def full_recompute(model, ids, steps, pick=lambda logits: logits.argmax(-1, keepdim=True)):
    """Decode `steps` tokens by running the whole sequence again each step (no cache, no `generate`)."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, pick(model(ids, use_cache=False).logits[:, -1])], dim=1)
    return ids


def long_prompt(seed=21, length=300):
    """A prompt of several hundred tokens that repeats itself, so prompt lookup finds candidates to propose."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(2, 97, (1, 45), generator=g)
    return torch.cat([base, torch.randint(2, 97, (1, length), generator=g), base], dim=1)[:, -length:]


@pytest.fixture(scope="module", params=["flash", "pro"])
def setup(request):
    model = tiny_model(request.param)
    ids = long_prompt()
    return model, ids, full_recompute(model, ids, NEW)


def count_crops(monkeypatch):
    removed = []
    original = DeepseekV4Cache.crop
    monkeypatch.setattr(DeepseekV4Cache, "crop", lambda self, n: (removed.append(-n), original(self, n))[1])
    return removed


def test_cached_greedy_equals_full_recompute(setup):
    model, ids, reference = setup
    assert model.generate(ids, max_new_tokens=NEW, do_sample=False, **KW).tolist() == reference.tolist()


def test_cached_greedy_left_padded_batch_equals_full_recompute(schedule):
    model = tiny_model(schedule)
    seqs, ids, mask = padded_batch([310, 257, 131], "left", seed=17)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **KW)[:, ids.shape[1] :]
    for row, seq in enumerate(seqs):
        assert out[row].tolist() == full_recompute(model, seq[None], 10)[0, len(seq) :].tolist(), row


@pytest.mark.parametrize("mode", ["prompt_lookup", "assistant_random", "assistant_same_heuristic", "mtp1", "mtp3"])
def test_speculative_modes_equal_greedy(setup, mode, monkeypatch):
    model, ids, reference = setup
    removed = count_crops(monkeypatch)
    kwargs = dict(max_new_tokens=NEW, do_sample=False, **KW)
    if mode == "prompt_lookup":
        kwargs["prompt_lookup_num_tokens"] = 5
    elif mode == "assistant_random":
        # A different random model: nearly every draft is rejected (constant schedule, 6 drafts per round).
        assistant = tiny_model(model.config.compress_ratios and "flash", seed=5)
        assistant.generation_config.num_assistant_tokens = 6
        assistant.generation_config.num_assistant_tokens_schedule = "constant"
        kwargs["assistant_model"] = assistant
    elif mode == "assistant_same_heuristic":
        # The same weights: every draft is accepted and the heuristic schedule grows the drafts each round.
        assistant = tiny_model(seed=0, compress_ratios=model.config.compress_ratios)
        assistant.generation_config.num_assistant_tokens = 3
        assistant.generation_config.num_assistant_tokens_schedule = "heuristic"
        kwargs["assistant_model"] = assistant
    else:
        model.generation_config.mtp_num_drafts = int(mode[-1])
        kwargs["use_mtp"] = True
    out = model.generate(ids, **kwargs)
    assert out.tolist() == reference.tolist()
    if mode in ("prompt_lookup", "assistant_random"):
        assert any(n > 0 for n in removed), "no draft was rejected: the rollback path was not exercised"


@pytest.mark.parametrize(
    "mode,horizon",
    [(dict(prompt_lookup_num_tokens=3), 3), (dict(use_mtp=True), 1), (dict(), 0), (dict(assistant_model=True), 9)],
)
def test_rollback_horizon_follows_the_mode_not_the_prompt(mode, horizon):
    """The cache keeps what one verification can reject: the drafts per step, bounded by the new tokens (`max_length`
    counts the 300-token prompt, which must not size the history)."""
    model = tiny_model()
    if mode.get("assistant_model"):
        mode = dict(assistant_model=tiny_model(seed=5))  # heuristic schedule: bounded by the 9 new tokens only
        mode["assistant_model"].generation_config.num_assistant_tokens_schedule = "heuristic"
    ids = long_prompt(length=300)
    out = model.generate(ids, max_length=309, do_sample=False, return_dict_in_generate=True, **mode, **KW)
    cache = cache_of(out)
    assert cache.rollback_tokens == horizon
    assert cache.layers[0].window_kv.shape[1] == model.config.sliding_window - 1 + horizon


def test_sampling_equals_a_manual_sampling_loop():
    """Temperature + top-k sampling draws what a loop over full recomputes draws with the same random stream."""
    model = tiny_model()
    ids = long_prompt(seed=3, length=280).repeat(2, 1)
    ids[1, :7] = torch.arange(2, 9)

    def sample(logits):
        scores = logits / 0.9
        scores = scores.masked_fill(scores < scores.topk(20).values[..., -1:], float("-inf"))
        return torch.multinomial(scores.softmax(-1), num_samples=1)

    torch.manual_seed(0)
    out = model.generate(ids, max_new_tokens=10, do_sample=True, top_k=20, top_p=1.0, temperature=0.9, **KW)
    torch.manual_seed(0)
    assert out.tolist() == full_recompute(model, ids, 10, sample).tolist()


def test_beam_search_cached_equals_uncached():
    model = tiny_model("pro")
    ids = long_prompt(seed=4, length=260)
    kwargs = dict(max_new_tokens=8, num_beams=3, do_sample=False, early_stopping=False, **KW)
    assert model.generate(ids, **kwargs).tolist() == model.generate(ids, use_cache=False, **kwargs).tolist()


def test_static_cache_and_compiled_decode_equal_greedy(setup):
    model, ids, reference = setup
    kwargs = dict(max_new_tokens=NEW, do_sample=False, cache_implementation="static", return_dict_in_generate=True)
    out = model.generate(ids, **kwargs, **KW)
    assert isinstance(cache_of(out), DeepseekV4StaticCache)
    assert out.sequences.tolist() == reference.tolist()
    # aot_eager traces the same graph as inductor without generating code (seconds instead of a minute).
    model.model.compile_decode(backend="aot_eager")
    try:
        assert model.generate(ids, **kwargs, **KW).sequences.tolist() == reference.tolist()
    finally:
        model.model.__dict__.pop("_compiled_decode_step")


def test_static_cache_refuses_speculative_modes_clearly():
    model = tiny_model()
    with pytest.raises(ValueError, match="does not roll back"):
        model.generate(long_prompt(length=40), max_new_tokens=4, cache_implementation="static", use_mtp=True, **KW)


def test_no_cache_deprecation_warnings(monkeypatch):
    """Neither transformers version warns about the cache argument's name in any generation mode."""
    messages = []
    for level in ("warning", "warning_once"):
        original = getattr(logging.Logger, level)
        monkeypatch.setattr(
            logging.Logger, level, lambda self, msg, *a, _o=original, **k: (messages.append(str(msg)), _o(self, msg))
        )
    model = tiny_model()
    ids = long_prompt(length=90)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.generate(ids, max_new_tokens=4, do_sample=False, **KW)
        model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static", **KW)
        model.generate(ids, max_new_tokens=4, do_sample=False, prompt_lookup_num_tokens=3, **KW)
        model.generate(ids, max_new_tokens=4, do_sample=False, use_mtp=True, **KW)
        model.generate(ids, max_new_tokens=4, num_beams=2, do_sample=False, **KW)
        with torch.no_grad():
            out = model(ids, use_cache=True)
            model(ids[:, :1], past_key_values=out.past_key_values)
            model(ids[:, :1], cache=out.cache)
    texts = messages + [str(w.message) for w in caught]
    assert not [t for t in texts if "past_key_values" in t or "cache_params" in t], texts
