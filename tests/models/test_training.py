"""Training basics: backward everywhere, gradient accumulation, gradient checkpointing, aux loss, MTP, errors."""

import pytest
import torch

from tests.conftest import tiny_model


def batch(n=4, seq=40, seed=0):
    ids = torch.randint(2, 97, (n, seq), generator=torch.Generator().manual_seed(seed))
    return ids, ids.clone()


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_backward_reaches_every_used_parameter(schedule):
    model = tiny_model(schedule).train()
    ids, labels = batch()
    model(ids, labels=labels).loss.backward()
    g = grads(model)
    # The lightning indexer only *selects* (top-k is not differentiable): the LM loss gives it no gradient, like
    # the reference, where it is trained by its own objective. MTP is not part of the main forward.
    unused = [n for n, p in model.named_parameters() if n not in g and ".mtp." not in n and ".indexer." not in n]
    assert unused == []
    assert all(torch.isfinite(v).all() for v in g.values())


def test_gradient_accumulation_equals_one_big_batch():
    ids, labels = batch()
    items = int((labels[:, 1:] != -100).sum())
    big = tiny_model().train()
    big(ids, labels=labels, num_items_in_batch=items).loss.backward()
    small = tiny_model().train()
    for part in (slice(0, 2), slice(2, 4)):
        small(ids[part], labels=labels[part], num_items_in_batch=items).loss.backward()
    ga, gb = grads(big), grads(small)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], atol=1e-6, rtol=1e-4, msg=name)


def test_gradient_checkpointing_gives_same_gradients(schedule):
    ids, labels = batch(2)
    plain = tiny_model(schedule).train()
    plain(ids, labels=labels).loss.backward()
    ckpt = tiny_model(schedule).train()
    ckpt.activation_checkpointing_enable()
    assert ckpt.model.gradient_checkpointing
    calls = []
    ckpt.model.layers[2].self_attn.register_forward_hook(lambda *args: calls.append(1))
    ckpt(ids, labels=labels).loss.backward()
    assert len(calls) == 2, "the layer was not recomputed in backward: checkpointing is not active"
    ga, gb = grads(plain), grads(ckpt)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], atol=1e-6, rtol=1e-5, msg=name)


def test_router_aux_loss_is_added_and_scaled_by_micro_batch_share():
    model = tiny_model(router_aux_loss_coef=0.5).train()
    ids, labels = batch(2)
    plain = model(ids, labels=labels)
    out = model(ids, labels=labels, output_router_logits=True)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    # Only score-routed layers report router logits (hash layers have fixed routing).
    assert len(out.router_logits) == model.config.num_hidden_layers - model.config.num_hash_layers
    torch.testing.assert_close(out.loss, plain.loss + 0.5 * out.aux_loss)
    items = int((labels[:, 1:] != -100).sum())
    scaled = model(ids, labels=labels, output_router_logits=True, num_items_in_batch=4 * items)
    torch.testing.assert_close(scaled.loss, plain.loss / 4 + 0.5 * out.aux_loss / 4)
    out.loss.backward()
    assert model.model.layers[3].mlp.gate.weight.grad.abs().sum() > 0


def test_inputs_embeds_with_hash_layers_is_a_clear_error():
    model = tiny_model()
    embeds = model.model.embed_tokens(torch.randint(2, 97, (1, 6)))
    with pytest.raises(ValueError, match="input_ids"):
        model(inputs_embeds=embeds)


def test_inputs_embeds_matches_input_ids_without_hash_layers():
    model = tiny_model(num_hash_layers=0)
    ids = torch.randint(2, 97, (1, 20))
    with torch.no_grad():
        a = model(ids, use_cache=False).logits
        b = model(inputs_embeds=model.model.embed_tokens(ids), use_cache=False).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_mtp_block_predicts_and_trains():
    model = tiny_model().train()
    ids, _ = batch(2, 24)
    logits = model.mtp_logits(ids)
    assert logits.shape == (2, 23, 97)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), ids[:, 2:].reshape(-1))
    loss.backward()
    assert model.model.mtp[0].e_proj.weight.grad.abs().sum() > 0
    assert model.model.mtp[0].self_attn.q_b_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="MTP"):
        model.mtp_logits(ids, depth=1)


def test_generate_from_a_checkpointed_model_in_training_mode_keeps_its_cache():
    """Without gradients nothing is recomputed, so the cache stays on (as transformers >= 5.24 does)."""
    model = tiny_model().train()
    model.activation_checkpointing_enable()
    ids = torch.randint(2, 97, (1, 40), generator=torch.Generator().manual_seed(9))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(ids, **kwargs)
        model.eval()
        assert cached.tolist() == model.generate(ids, use_cache=False, **kwargs).tolist()
