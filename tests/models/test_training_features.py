"""DeepSeek's training-time features (issue #14): the MTP loss and auxiliary-loss-free bias balancing."""

import pytest
import torch

from modeling_deepseek_v4.moe import DeepseekV4TopKRouter
from modeling_deepseek_v4.training_callbacks import ExpertBiasBalancer
from tests.conftest import tiny_model

torch.set_num_threads(1)

IDS = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(0))


def test_mtp_loss_is_weighted_into_the_loss_and_trains_the_mtp_block():
    model = tiny_model().train()
    plain = model(IDS, labels=IDS)
    assert plain.mtp_loss is None
    model.config.mtp_loss_weight = 0.3
    out = model(IDS, labels=IDS)
    # position t of the MTP head predicts token t + 2
    logits = model.mtp_logits(IDS)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), IDS[:, 2:].reshape(-1))
    torch.testing.assert_close(out.mtp_loss, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, plain.loss + 0.3 * out.mtp_loss, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    mtp_grads = [p.grad for n, p in model.named_parameters() if ".mtp." in n and "experts" not in n]
    assert mtp_grads and all(g is not None and torch.isfinite(g).all() for g in mtp_grads)
    assert any(g.abs().sum() > 0 for g in mtp_grads)


def test_mtp_loss_accepts_right_padding_and_refuses_left_padding():
    model = tiny_model()
    model.config.mtp_loss_weight = 1.0
    mask = torch.ones_like(IDS)
    mask[1, 30:] = 0
    labels = IDS.masked_fill(mask == 0, -100)
    right = model(IDS, attention_mask=mask, labels=labels)
    # row 1 alone, cut to its real tokens, gives the same MTP loss contribution pattern: finite and differentiable
    assert torch.isfinite(right.mtp_loss)
    with pytest.raises(ValueError, match="right-padded"):
        model(IDS, attention_mask=mask.flip(-1), labels=labels.flip(-1))


def test_mtp_loss_weight_is_validated():
    from tests.conftest import tiny_config

    with pytest.raises(ValueError, match="mtp_loss_weight"):
        tiny_config(mtp_loss_weight=-1.0)


def _skew(model) -> list[DeepseekV4TopKRouter]:
    """Make every score-routed gate send every token to expert 0 (a collapsed router)."""
    gates = [m for m in model.modules() if isinstance(m, DeepseekV4TopKRouter) and not m.is_hash]
    with torch.no_grad():
        for gate in gates:
            gate.e_score_correction_bias.zero_()[0] = 0.5
    return gates


def _imbalance(model, gates) -> float:
    loads = []
    hooks = [
        g.register_forward_hook(
            lambda m, a, out: loads.append(torch.bincount(out[-1].flatten(), minlength=m.num_experts))
        )
        for g in gates
    ]  # noqa: E501
    with torch.no_grad():
        model(IDS)
    for h in hooks:
        h.remove()
    load = torch.stack(loads).float()
    return float((load.max(dim=-1).values / load.mean(dim=-1)).mean())


def test_bias_balancing_moves_a_skewed_router_toward_balance():
    model = tiny_model().train()
    gates = _skew(model)
    before = _imbalance(model, gates)
    balancer = ExpertBiasBalancer(speed=0.05).attach(model)
    for _ in range(20):  # forwards of "one optimizer step" each (two micro-batches), then the update
        model(IDS[:1])
        model(IDS[1:])
        assert 1 <= balancer.update() <= len(gates)  # the MTP block's gate runs only with the MTP loss
    after = _imbalance(model, gates)
    assert after < before
    # the favoured expert is pushed down in every gate that ran (all but the MTP block's)
    assert sum(bool(g.e_score_correction_bias[0] < 0.5) for g in gates) == len(gates) - 1
    balancer.detach()
    model(IDS)
    assert balancer.update() == 0  # detached: nothing counted


def test_bias_balancing_ignores_eval_forwards_and_hash_layers():
    model = tiny_model().eval()
    balancer = ExpertBiasBalancer(speed=0.1).attach(model)
    model(IDS)
    assert balancer.update() == 0
    with pytest.raises(ValueError, match="speed"):
        ExpertBiasBalancer(speed=0)


def test_bias_balancing_runs_inside_the_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_model()
    gates = _skew(model)
    initial = [g.e_score_correction_bias.clone() for g in gates]
    rows = [{"input_ids": IDS[i % 2].tolist(), "labels": IDS[i % 2].tolist()} for i in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
        learning_rate=0.0, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[ExpertBiasBalancer(speed=0.01)])
    trainer.train()
    moved = [g.e_score_correction_bias - b for g, b in zip(gates, initial)]
    # two optimizer steps of +-0.01 on the gates that ran: the favoured expert went down twice
    assert all(m.abs().max() <= 0.02 + 1e-6 for m in moved)
    assert sum(bool(m[0] < -0.015) for m in moved) == len(gates) - 1  # all but the MTP block's gate


def test_indexer_alignment_loss_trains_only_the_indexer():
    model = tiny_model().train()
    plain = model(IDS, labels=IDS)
    assert plain.indexer_loss is None
    model.config.indexer_loss_weight = 0.5
    for module in model.modules():
        if hasattr(module, "align"):
            module.align = True
    out = model(IDS, labels=IDS)
    assert out.indexer_loss is not None and float(out.indexer_loss) > 0
    torch.testing.assert_close(out.loss, plain.loss + 0.5 * out.indexer_loss, atol=1e-5, rtol=1e-5)
    # its gradient reaches the indexer's projections and nothing else
    model.zero_grad()
    out.indexer_loss.backward()
    touched = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert touched and all(".indexer." in n for n in touched), sorted(touched)[:5]
    assert any("indexer.q_b_proj" in n for n in touched) and any("scorer.weights_proj" in n for n in touched)


def test_indexer_alignment_loss_survives_gradient_checkpointing():
    from modeling_deepseek_v4 import DeepseekV4ExtForCausalLM
    from tests.conftest import tiny_config

    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = DeepseekV4ExtForCausalLM(tiny_config(indexer_loss_weight=1.0)).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        out = model(IDS, labels=IDS)
        out.indexer_loss.backward()
        grads.append(model.model.layers[2].self_attn.compressor.indexer.q_b_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_bias_balancing_counts_real_tokens_only():
    model = tiny_model().train()
    counts = {}
    for padded in (False, True):
        balancer = ExpertBiasBalancer(speed=0.1).attach(model)
        if padded:  # the same two rows, right-padded with 12 pad slots each
            ids = torch.cat([IDS, torch.full((2, 12), 5)], dim=1)
            mask = torch.cat([torch.ones_like(IDS), torch.zeros(2, 12, dtype=torch.long)], dim=1)
            model(ids, attention_mask=mask)
        else:
            model(IDS)
        counts[padded] = {g: c.clone() for g, c in balancer._counts.items()}
        balancer.detach()
    assert counts[True].keys() == counts[False].keys() and counts[True]
    for gate, load in counts[False].items():
        assert torch.equal(counts[True][gate], load)


def test_sequence_wise_balance_loss_is_the_mean_of_each_sequences_own_loss():
    """`seq_aux=True` (DeepSeek's complementary sequence-wise loss, the default): the batch's aux loss is the mean of
    the loss each sequence gets alone (padding excluded); `seq_aux=False` pools the batch's tokens instead."""
    ids = torch.randint(2, 97, (2, 40), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :12] = 0  # left padding
    per_sequence, pooled = (
        tiny_model(output_router_logits=True, seq_aux=flag).eval() for flag in (True, False)
    )  # fmt: skip
    with torch.no_grad():
        batch = per_sequence(ids, attention_mask=mask).aux_loss
        alone = [per_sequence(ids[:1]).aux_loss, per_sequence(ids[1:, 12:]).aux_loss]
        pooled_loss = pooled(ids, attention_mask=mask).aux_loss
    torch.testing.assert_close(batch, (alone[0] + alone[1]) / 2, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(pooled_loss, batch)
