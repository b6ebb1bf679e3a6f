"""MTP self-speculative decoding through `generate(..., use_mtp=True)` (modeling_deepseek_v4/mtp_speculation.py)."""

import pytest
import torch
from transformers import GenerationConfig

from modeling_deepseek_v4.mtp_speculation import DeepseekV4MTPCandidateGenerator, MTPStats
from tests.conftest import tiny_model

KW = dict(pad_token_id=0, eos_token_id=None, do_sample=False)


def prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(2, 97, (1, length), generator=torch.Generator().manual_seed(seed))


def mtp_generate(model, ids, drafts: int = 1, **kwargs) -> torch.Tensor:
    model.generation_config.mtp_num_drafts = drafts
    return model.generate(ids, use_mtp=True, **{**KW, **kwargs})


# Prompt lengths around the CSA (4) / HCA (8) windows and the sliding window (8); 16 new tokens cross several more.
@pytest.mark.parametrize("length,seed", [(5, 1), (13, 2), (30, 3)])
@pytest.mark.parametrize("drafts", [1, 3])
def test_mtp_greedy_equals_plain_greedy(schedule, length, seed, drafts):
    model = tiny_model(schedule)
    ids = prompt(length, seed)
    greedy = model.generate(ids, max_new_tokens=16, **KW)
    assert mtp_generate(model, ids, drafts, max_new_tokens=16).tolist() == greedy.tolist()
    stats = model.last_mtp_stats
    assert isinstance(stats, MTPStats) and stats.num_drafted > 0 and stats.num_steps > 0
    assert 0.0 <= stats.acceptance_rate <= 1.0
    assert stats.tokens_per_step * stats.num_steps == pytest.approx(16 - 1)  # the first token comes from prefill


def test_mtp_greedy_stops_at_eos_like_plain_greedy(schedule):
    model = tiny_model(schedule)
    ids = prompt(21, 4)
    eos = int(model.generate(ids, max_new_tokens=16, **KW)[0, 21 + 9])
    kwargs = dict(KW, eos_token_id=eos, max_new_tokens=16)
    assert mtp_generate(model, ids, 3, **kwargs).tolist() == model.generate(ids, **kwargs).tolist()


def test_oracle_drafter_partial_acceptance_equals_greedy(schedule, monkeypatch):
    """Drafts are the true greedy tokens except at every third position: accepted prefixes, rejections and
    multi-token acceptances all happen, so both caches' rollback is exercised."""
    model = tiny_model(schedule)
    ids = prompt(26, 5)
    greedy = model.generate(ids, max_new_tokens=16, **KW)

    def oracle(self, logits, context):
        pos = context.shape[1]
        token = int(greedy[0, pos]) if pos < greedy.shape[1] else 2
        if pos % 3 == 0:
            token = token % 96 + 2 if token % 96 + 2 != token else 3
        return torch.tensor([[token]]), logits

    monkeypatch.setattr(DeepseekV4MTPCandidateGenerator, "_pick", oracle)
    assert mtp_generate(model, ids, 3, max_new_tokens=16).tolist() == greedy.tolist()
    stats = model.last_mtp_stats
    assert 0 < stats.num_accepted < stats.num_drafted
    assert stats.tokens_per_step > 1.5


def test_first_draft_equals_full_mtp_recompute(schedule, monkeypatch):
    """The incremental MTP (own window cache, prompt truncated to the window) equals `mtp_logits` on the full
    sequence: position L - 2 (streams of L - 2, token L - 1) predicts token L."""
    model = tiny_model(schedule)
    ids = prompt(23, 6)
    seen: list[tuple[int, torch.Tensor]] = []
    original = DeepseekV4MTPCandidateGenerator._pick

    def recording(self, logits, context):
        seen.append((context.shape[1], logits.clone()))
        return original(self, logits, context)

    monkeypatch.setattr(DeepseekV4MTPCandidateGenerator, "_pick", recording)
    out = mtp_generate(model, ids, 1, max_new_tokens=12)
    with torch.no_grad():
        reference = model.mtp_logits(out)
    assert len(seen) >= 6  # one draft per verification step
    for length, logits in seen:
        torch.testing.assert_close(logits, reference[:, length - 2], atol=1e-4, rtol=0)


def test_training_only_the_mtp_block_raises_acceptance(schedule):
    """Self-distillation on the model's own greedy continuation of a repetitive prompt: training only `mtp.*`
    with `mtp_logits` + cross entropy makes the drafter agree with the main model."""
    model = tiny_model(schedule)
    base = prompt(5, 7)
    ids = torch.cat([base, base, base], dim=1)
    greedy = model.generate(ids, max_new_tokens=16, **KW)
    mtp_generate(model, ids, 1, max_new_tokens=16)
    before = model.last_mtp_stats.acceptance_rate

    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("model.mtp."))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    for _ in range(30):
        logits = model.mtp_logits(greedy)  # position t predicts token t + 2
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], greedy[0, 2:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.requires_grad_(False)

    for drafts in (1, 3):
        assert mtp_generate(model, ids, drafts, max_new_tokens=16).tolist() == greedy.tolist()
        after = model.last_mtp_stats.acceptance_rate
        assert after > before + 0.5, (before, after, drafts)


def test_sampling_with_mtp_runs_and_top_k_1_equals_greedy():
    """Sampling is supported (speculative sampling); with top_k=1 it must reduce to greedy."""
    model = tiny_model()
    ids = prompt(18, 8)
    sample = dict(KW, do_sample=True, top_k=20, temperature=0.9, max_new_tokens=12)
    torch.manual_seed(0)
    a = mtp_generate(model, ids, 2, **sample)
    torch.manual_seed(0)
    b = mtp_generate(model, ids, 2, **sample)
    assert a.tolist() == b.tolist() and a.shape == (1, 30) and int(a.max()) < model.config.vocab_size
    assert 0.0 <= model.last_mtp_stats.acceptance_rate <= 1.0
    greedy = model.generate(ids, max_new_tokens=12, **KW)
    assert mtp_generate(model, ids, 2, **dict(sample, top_k=1)).tolist() == greedy.tolist()


def test_batch_and_padding_are_refused_clearly():
    model = tiny_model()
    with pytest.raises(ValueError, match="batch size 1"):
        model.generate(prompt(10, 9).repeat(2, 1), max_new_tokens=4, use_mtp=True, **KW)
    mask = torch.ones(1, 10, dtype=torch.long)
    mask[0, :2] = 0
    with pytest.raises(ValueError, match="padded"):
        model.generate(prompt(10, 9), attention_mask=mask, max_new_tokens=4, use_mtp=True, **KW)
    with pytest.raises(ValueError, match="own MTP block; drop assistant_model / prompt lookup"):
        model.generate(prompt(10, 9), max_new_tokens=4, use_mtp=True, prompt_lookup_num_tokens=3, **KW)


def test_generation_config_object_sets_drafts_and_forward_default_is_unchanged():
    model = tiny_model()
    ids = prompt(12, 10)
    config = GenerationConfig(use_mtp=True, mtp_num_drafts=2, max_new_tokens=9, **KW)
    assert (
        model.generate(ids, generation_config=config).tolist() == model.generate(ids, max_new_tokens=9, **KW).tolist()
    )
    assert model.last_mtp_stats.num_drafted > model.last_mtp_stats.num_steps  # two drafts per step
    with torch.no_grad():
        assert model(ids).last_streams is None
        streams = model(ids, return_streams=3).last_streams
        full = model.model(ids, return_streams=True).last_streams
    assert streams.shape == (1, 3, model.config.hc_mult, model.config.hidden_size)
    torch.testing.assert_close(streams, full[:, -3:])
