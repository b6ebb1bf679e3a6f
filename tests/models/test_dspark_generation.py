"""DSpark speculative decoding through `generate(use_dspark=True)` (modeling_deepseek_v4/dspark_drafting.py,
generation_hooks.py; docs/dspark.md §2.4-2.5).

What is tested and why:
- greedy DSpark == plain greedy (the verifier is lossless at T = 0) on a synthetic -0731 official checkpoint and on
  the direct tiny DSpark model with W = 2 and 5, prompts of 300 tokens (longer than the 8-slot ring, so the ring
  wraps many times), with the stats counted;
- `dspark_confidence_threshold` cuts each draft exactly at the first position with `sigmoid(c_i) < threshold`
  (checked per round against the confidences `draft_block` returned), the output staying plain greedy;
- batch > 1, padding, a model without drafter and an out-of-range threshold raise clear ValueErrors, and no forward
  hook is left on the target layers (after a success or a failure);
- the drafting functions are trainable: a drafter trained only on the target's greedy continuations of training
  prompts gets a clearly higher acceptance rate on a held-out prompt (the taps / ring / draft-block path carries
  real information, not only the Markov head), output still plain greedy;
- sampling stays lossless: the first new tokens' distribution with DSpark matches plain sampling (chi-square
  two-sample test), with a deliberately miscalibrated drafter so that most drafts are rejected and the residual
  resampling is exercised.
"""

from __future__ import annotations

import collections

import pytest
import torch

import modeling_deepseek_v4.dspark_drafting as drafting
from modeling_deepseek_v4 import DeepseekV4ExtForCausalLM
from modeling_deepseek_v4.dspark_drafting import DeepseekV4DSparkCandidateGenerator, DSparkRing, context_keys
from tests.conftest import tiny_config, tiny_dspark_model, tiny_model
from tests.conversion.official_synth import make_official_checkpoint

KW = dict(pad_token_id=0, eos_token_id=None, do_sample=False)
NOISE = 96


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def dspark_model(block: int = 4, seed: int = 0) -> DeepseekV4ExtForCausalLM:
    """The tiny direct DSpark model (5 main layers + 3 drafter stages, vocab 97)."""
    return tiny_dspark_model(block, seed)


@pytest.fixture(scope="module")
def official_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dspark-0731")
    make_official_checkpoint(folder, tiny_config(), dspark=True)
    return folder


@pytest.fixture(scope="module")
def official_model(official_folder):
    return DeepseekV4ExtForCausalLM.from_pretrained(official_folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def official_kept(official_folder):
    """The same release with its bytes kept (FP8 stages and main_proj, FP4 routed experts, as loaded by default)."""
    return DeepseekV4ExtForCausalLM.from_pretrained(official_folder).eval()


def prompt(length: int, seed: int, batch: int = 1) -> torch.Tensor:
    # tokens 2..95: never the noise token, pad or eos
    return torch.randint(2, NOISE, (batch, length), generator=torch.Generator().manual_seed(seed))


def target_hooks(model) -> list[int]:
    return [len(model.model.layers[i]._forward_hooks) for i in model.config.dspark_target_layer_ids]


@pytest.mark.parametrize("which", ["official", "official_kept", 2, 5])
def test_greedy_equals_plain_greedy(which, request):
    fixtures = {"official": "official_model", "official_kept": "official_kept"}
    model = request.getfixturevalue(fixtures[which]) if which in fixtures else dspark_model(which)
    assert model.model.dspark is not None
    if which == "official_kept":  # the drafter computes from the official FP8 / FP4 bytes
        assert model.model.dspark.main_proj.weight.dtype == torch.float8_e4m3fn
        assert model.model.dspark.layers[0].mlp.experts.gate_up_proj.dtype == torch.int8
    ids = prompt(300, 1)
    greedy = model.generate(ids, max_new_tokens=32, **KW)
    out = model.generate(ids, max_new_tokens=32, use_dspark=True, **KW)
    assert out.tolist() == greedy.tolist()
    stats = model.last_dspark_stats
    assert stats.num_steps > 0 and stats.num_drafted > 0
    assert 0 <= stats.num_accepted <= stats.num_drafted <= stats.num_steps * model.config.dspark_block_size
    assert stats.num_steps + stats.num_accepted == 32 - 1  # every verification gains 1 + accepted; prefill gives 1
    assert target_hooks(model) == [0, 0, 0]


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
def test_confidence_threshold_cuts_at_the_first_unconfident_position(threshold, monkeypatch):
    model = dspark_model(5)
    ids = prompt(300, 2)
    greedy = model.generate(ids, max_new_tokens=32, **KW)
    model.generate(ids, max_new_tokens=32, use_dspark=True, **KW)
    uncut = model.last_dspark_stats

    rounds: list[tuple[int, int, int]] = []  # (drafted, expected, block length k) per round that drafted
    seen: list[torch.Tensor] = []
    draft_block, get_candidates = drafting.draft_block, DeepseekV4DSparkCandidateGenerator.get_candidates

    def recording_draft(*args, **kwargs):
        result = draft_block(*args, **kwargs)
        seen.append(result[2][0].detach().clone())
        return result

    def recording_candidates(self, input_ids, *args, **kwargs):
        seen.clear()
        result = get_candidates(self, input_ids, *args, **kwargs)
        if seen:
            k = min(self.block, self.max_length - input_ids.shape[1] - 1)
            keep = torch.sigmoid(seen[0][:k]) >= threshold
            rounds.append((self.last_drafted, int(keep.long().cumprod(0).sum()), k))
        return result

    monkeypatch.setattr(drafting, "draft_block", recording_draft)
    monkeypatch.setattr(DeepseekV4DSparkCandidateGenerator, "get_candidates", recording_candidates)
    out = model.generate(ids, max_new_tokens=32, use_dspark=True, dspark_confidence_threshold=threshold, **KW)
    assert out.tolist() == greedy.tolist()
    stats = model.last_dspark_stats
    assert rounds and all(drafted == expected for drafted, expected, _ in rounds), rounds
    assert stats.num_drafted == sum(d for d, _, _ in rounds)
    if threshold == 0.0:  # every block drafted whole: the same rounds as without a threshold
        assert all(d == k for d, _, k in rounds) and any(k == 5 for _, _, k in rounds)
        assert (stats.num_drafted, stats.num_accepted, stats.num_steps) == (
            uncut.num_drafted,
            uncut.num_accepted,
            uncut.num_steps,
        )
    if threshold == 0.5:  # a real cut: some rounds keep a proper prefix of their block, some keep all of it
        assert any(d < k for d, _, k in rounds) and any(d > 0 for d, _, _ in rounds), rounds
    if threshold == 1.0:  # sigmoid reaches 1.0 in fp32 only for logits above ~17: none with this random head
        assert all(float(torch.sigmoid(c).max()) < 1.0 for c in seen) and stats.num_drafted == 0


def test_errors_and_no_hooks_left_behind():
    model = dspark_model(4)
    ids = prompt(20, 3)
    with pytest.raises(ValueError, match="batch size 1"):
        model.generate(prompt(20, 3, batch=2), max_new_tokens=4, use_dspark=True, **KW)
    assert target_hooks(model) == [0, 0, 0]  # removed even when generate raised
    mask = torch.ones(1, 20, dtype=torch.long)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="padded"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, use_dspark=True, **KW)
    with pytest.raises(ValueError, match=r"dspark_confidence_threshold must lie in \[0, 1\]"):
        model.generate(ids, max_new_tokens=4, use_dspark=True, dspark_confidence_threshold=1.5, **KW)
    with pytest.raises(ValueError, match="needs the DSpark drafter"):
        tiny_model().generate(ids, max_new_tokens=4, use_dspark=True, **KW)
    with pytest.raises(ValueError, match="own DSpark drafter; drop assistant_model / prompt lookup"):
        model.generate(ids, max_new_tokens=4, use_dspark=True, prompt_lookup_num_tokens=3, **KW)
    assert target_hooks(model) == [0, 0, 0]

    greedy = model.generate(ids, max_new_tokens=12, **KW)
    assert model.generate(ids, max_new_tokens=12, use_dspark=True, **KW).tolist() == greedy.tolist()
    stats = model.last_dspark_stats
    assert target_hooks(model) == [0, 0, 0]
    assert model.generate(ids, max_new_tokens=12, **KW).tolist() == greedy.tolist()
    assert target_hooks(model) == [0, 0, 0] and model.last_dspark_stats is stats  # plain generate left it alone


def full_taps(model, seqs: torch.Tensor) -> torch.Tensor:
    """hc-averaged outputs of the target layers at every position of `seqs` `[B, S]` -> `[B, S, k d]`."""
    store: dict[int, torch.Tensor] = {}
    ids = model.config.dspark_target_layer_ids
    handles = [
        model.model.layers[i].register_forward_hook(lambda mod, args, out, i=i: store.__setitem__(i, out[0].mean(2)))
        for i in ids
    ]
    try:
        with torch.no_grad():
            model(seqs)
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat([store[i] for i in ids], dim=-1)


def draft_loss(model, seqs: torch.Tensor, taps: torch.Tensor, rows: torch.Tensor, ps: torch.Tensor) -> torch.Tensor:
    """Teacher-forced cross entropy of one draft block per (row, p): the ring holds the keys of positions
    p - window + 1 .. p, the anchor is token p + 1, row i is scored against the target's token p + 2 + i."""
    drafter, w, win = model.model.dspark, model.config.dspark_block_size, model.config.sliding_window
    ctx = ps[:, None] + torch.arange(1 - win, 1)  # [B, win] context positions, per sample
    cos, sin = model.model.rope_tables.cos_sin("main", ctx)
    ring = DSparkRing(len(drafter.layers), win)
    # positions only choose ring slots (each sample's keys carry their own rotation); attention ignores slot order
    ring.write(context_keys(drafter, taps[rows[:, None], ctx], cos, sin), torch.arange(win))
    anchor = seqs[rows, ps + 1]
    targets = seqs[rows[:, None], ps[:, None] + 2 + torch.arange(w)]
    block = torch.full((len(rows), w), model.config.dspark_noise_token_id)
    block[:, 0] = anchor
    cos, sin = model.model.rope_tables.cos_sin("main", ps[:, None] + 1 + torch.arange(w))
    embeds = model.model.embed_tokens(block)
    _, logits, _ = drafting.draft_block(
        drafter, embeds, ring, cos, sin, anchor, model.lm_head, lambda r, i: targets[:, i]
    )
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def test_trained_drafter_accepts_more_on_a_held_out_prompt():
    model = dspark_model(2)
    held_out = prompt(300, 99)
    greedy = model.generate(held_out, max_new_tokens=32, **KW)
    model.generate(held_out, max_new_tokens=32, use_dspark=True, **KW)
    before = model.last_dspark_stats.acceptance_rate

    # Training data: the target's own greedy continuations of 48 other prompts (one batched generate).
    train = model.generate(prompt(32, 1000, batch=48), max_new_tokens=48, **KW)
    taps = full_taps(model, train)
    w, win = model.config.dspark_block_size, model.config.sliding_window
    first, last = 31, train.shape[1] - w - 2  # p: the last prompt position .. the last with W targets after p + 1
    assert first >= win - 1

    model.requires_grad_(False)
    model.model.dspark.requires_grad_(True)
    optimizer = torch.optim.Adam(model.model.dspark.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(80):
        rows = torch.randint(train.shape[0], (32,), generator=gen)
        ps = torch.randint(first, last + 1, (32,), generator=gen)
        loss = draft_loss(model, train, taps, rows, ps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.requires_grad_(False)
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10]), (losses[:10], losses[-10:])

    assert model.generate(held_out, max_new_tokens=32, use_dspark=True, **KW).tolist() == greedy.tolist()
    after = model.last_dspark_stats.acceptance_rate
    assert after >= before + 0.15, (before, after)


def chi_square_two_sample(a: collections.Counter, b: collections.Counter, min_count: int = 10) -> float:
    """p-value of the chi-square two-sample test of equal-size samples a, b (counts per token). Bins with fewer than
    `min_count` observations in both samples together are merged into one. p from the regularized upper incomplete
    gamma function (scipy is not installed in either env): P(chi2_df > x) = Q(df / 2, x / 2)."""
    assert sum(a.values()) == sum(b.values())
    big = [t for t in set(a) | set(b) if a[t] + b[t] >= min_count]
    pairs = [(a[t], b[t]) for t in big]
    rest = (sum(a.values()) - sum(x for x, _ in pairs), sum(b.values()) - sum(y for _, y in pairs))
    if sum(rest) > 0:
        pairs.append(rest)
    stat = sum((x - y) ** 2 / (x + y) for x, y in pairs)
    df = len(pairs) - 1
    if df == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2.0)))


@pytest.mark.slow  # 2 x 300 generate calls: ~60-90 s on a loaded 2-core box
def test_sampling_keeps_the_target_distribution():
    """Untrained drafter made overconfident (its final norm x 30): its drafts are peaked where the target is not, so
    most are rejected and tokens come from the residual norm(max(0, p_t - p_d)). Vocabulary restricted to 8 tokens
    (suppress_tokens, applied to target and draft logits alike) so 300 runs fill every bin."""
    model = dspark_model(2)
    with torch.no_grad():
        model.model.dspark.norm.weight.mul_(30.0)  # draft logits 30x sharper: near one-hot drafts
    ids = prompt(8, 4)
    sample = dict(KW, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=3)
    sample["suppress_tokens"] = [0, 1, *range(10, 97)]
    n, counts, drafted, accepted = 300, {}, 0, 0
    for use in (False, True):
        counts[use] = [collections.Counter() for _ in range(3)]
        for seed in range(n):
            torch.manual_seed(seed)
            new = model.generate(ids, use_dspark=use, **sample)[0, ids.shape[1] :].tolist()
            for j in range(3):
                counts[use][j][new[j]] += 1
            if use:
                drafted += model.last_dspark_stats.num_drafted
                accepted += model.last_dspark_stats.num_accepted
    assert all(set(c) <= set(range(2, 10)) for c in counts[True])
    # token 1 comes from the prefill (no draft), tokens 2-3 from verifying one draft (max_new_tokens 3, W 2: k = 1)
    assert drafted == n and accepted < 0.6 * drafted, (drafted, accepted)  # the residual path is exercised
    for j in range(3):
        p = chi_square_two_sample(counts[False][j], counts[True][j])
        assert p > 1e-3, (j, p, sorted(counts[False][j].items()), sorted(counts[True][j].items()))


def test_sampled_drafts_follow_the_logits_handed_to_the_verifier():
    """Lossless speculative sampling (transformers' `_speculative_sampling`, DeepSpec's verifier) holds only if each
    draft token is drawn from exactly the distribution whose logits the candidate generator returns (after the
    logits processors, Markov bias included). Many draws of the first draft row from one fixed state: their
    frequencies against softmax(returned logits) (chi-square goodness of fit, p > 1e-3), the returned logits the same
    on every draw. A drafter sharpened (norm x 10) so that a wrong temperature or a lost processor shows."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper
    from transformers.generation import GenerationConfig

    model = dspark_model(2)
    with torch.no_grad():
        model.model.dspark.norm.weight.mul_(10.0)  # top draft probability ~0.25, ~20 tokens above 1%
    ids = prompt(40, 5)
    config = GenerationConfig(do_sample=True, max_length=60, use_dspark=True)
    processors = LogitsProcessorList([TemperatureLogitsWarper(0.7)])
    with torch.no_grad(), drafting.capture_taps(model) as taps:
        anchor = model(ids).logits[:, -1].argmax(-1, keepdim=True)  # the prefill leaves its taps
        state = {i: t.clone() for i, t in taps.items()}
    candidates = torch.cat([ids, anchor], dim=1)
    counts, first_logits = collections.Counter(), None
    n = 1500
    for seed in range(n):
        generator = DeepseekV4DSparkCandidateGenerator(model, config, candidates, processors, {}, dict(state))
        torch.manual_seed(seed)
        drafted, logits = generator.get_candidates(candidates, n_last_matches=0)
        counts[int(drafted[0, candidates.shape[1]])] += 1
        if first_logits is None:
            first_logits = logits[0, 0]
        torch.testing.assert_close(logits[0, 0], first_logits, atol=0, rtol=0)
    expected = torch.softmax(first_logits.double(), -1) * n
    assert expected.max() < 0.9 * n  # not one-hot: the test could see a wrong distribution
    big = [t for t in range(expected.numel()) if expected[t] >= 5]
    observed = [counts[t] for t in big] + [n - sum(counts[t] for t in big)]
    wanted = [float(expected[t]) for t in big] + [n - float(sum(expected[t] for t in big))]
    pairs = [(o, e) for o, e in zip(observed, wanted) if e > 0]
    stat = sum((o - e) ** 2 / e for o, e in pairs)
    p = float(torch.special.gammaincc(torch.tensor((len(pairs) - 1) / 2, dtype=torch.float64), torch.tensor(stat / 2)))
    assert p > 1e-3, (p, stat, len(pairs))


def test_offloaded_drafter_drafts_like_the_in_memory_one(tmp_path):
    """accelerate loads offloaded tensors only around a hooked module's `forward`; the drafting calls the stages'
    submodules directly, so it runs the hooks itself (`dspark_drafting.loaded`). With `device_map` disk offload the
    drafter's tensors really wait on meta before the call, and the tokens and acceptance counts equal the in-memory
    model's. (`accelerate.cpu_offload` puts `model.device` on meta, where transformers' assisted loop moves the
    candidates: like MTP, speculative decoding needs a `device_map`, README.)"""
    from accelerate.utils import compute_module_sizes

    model = dspark_model(4)
    ids = prompt(200, 6)
    kw = dict(KW, max_new_tokens=16)
    expected = model.generate(ids, use_dspark=True, **kw)
    stats = model.last_dspark_stats
    assert torch.equal(expected, model.generate(ids, **kw))
    model.save_pretrained(tmp_path / "model")
    budget = compute_module_sizes(model)[""] // 2  # the later layers, the head and the drafter go to disk
    offloaded = DeepseekV4ExtForCausalLM.from_pretrained(
        tmp_path / "model",
        dtype=torch.float32,
        device_map="auto",
        max_memory={"cpu": budget},
        offload_folder=str(tmp_path / "offload"),
        offload_buffers=True,
    ).eval()
    assert any(name.startswith("model.dspark") for name, d in offloaded.hf_device_map.items() if d == "disk")
    assert all(p.is_meta for p in offloaded.model.dspark.parameters())
    assert torch.equal(offloaded.generate(ids, use_dspark=True, **kw), expected)
    assert offloaded.last_dspark_stats == stats
