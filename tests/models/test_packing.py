"""Packed (padding-free) batches: each document gets the same logits and loss as alone (issue #14)."""

import pytest
import torch

from tests.conftest import tiny_model

torch.set_num_threads(1)

LENGTHS = (30, 50, 20)  # longer than the window (8) and several compression blocks (4, 8) each


def _docs():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(2, 97, (n,), generator=gen) for n in LENGTHS]


def _packed(docs):
    ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    labels = ids.clone()
    starts = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0)[:-1].tolist()])
    labels[0, starts] = -100  # what TRL's flattening collator does: no prediction across a boundary
    return ids, positions, labels


def test_packed_documents_get_the_logits_and_loss_they_get_alone():
    model = tiny_model()
    docs = _docs()
    ids, positions, labels = _packed(docs)
    packed = model(input_ids=ids, position_ids=positions, labels=labels)
    offset = 0
    for doc in docs:
        alone = model(input_ids=doc[None]).logits[0]
        torch.testing.assert_close(packed.logits[0, offset : offset + len(doc)], alone, atol=1e-5, rtol=1e-5)
        offset += len(doc)
    # the loss over all documents, one per row with right padding: the same tokens predicted
    batch = torch.nn.utils.rnn.pad_sequence(docs, batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(d) for d in docs], batch_first=True)
    unpacked = model(input_ids=batch, attention_mask=mask, labels=batch.masked_fill(mask == 0, -100))
    torch.testing.assert_close(packed.loss, unpacked.loss, atol=1e-5, rtol=1e-5)


def test_packed_gradients_equal_the_unpacked_batch_and_cu_seq_lens_work():
    docs = _docs()
    ids, positions, labels = _packed(docs)
    grads = []
    for kwargs in ({"position_ids": positions}, {"cu_seq_lens_q": torch.tensor([0, 30, 80, 100])}):
        model = tiny_model()
        model(input_ids=ids, labels=labels, **kwargs).loss.backward()
        grads.append(model.model.layers[2].self_attn.q_a_proj.weight.grad.clone())
    model = tiny_model()
    batch = torch.nn.utils.rnn.pad_sequence(docs, batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(d) for d in docs], batch_first=True)
    model(input_ids=batch, attention_mask=mask, labels=batch.masked_fill(mask == 0, -100)).loss.backward()
    for grad in grads:
        torch.testing.assert_close(grad, model.model.layers[2].self_attn.q_a_proj.weight.grad, atol=1e-6, rtol=1e-4)


def test_packed_batches_are_for_training_forwards():
    model = tiny_model()
    ids, positions, _ = _packed(_docs())
    with pytest.raises(ValueError, match="use_cache=False"):
        model(input_ids=ids, position_ids=positions, use_cache=True)


def test_packed_documents_get_the_mtp_loss_they_get_as_rows():
    model = tiny_model()
    model.config.mtp_loss_weight = 0.5
    docs = _docs()
    ids, positions, labels = _packed(docs)
    packed = model(input_ids=ids, position_ids=positions, labels=labels)
    batch = torch.nn.utils.rnn.pad_sequence(docs, batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(d) for d in docs], batch_first=True)
    rows = model(input_ids=batch, attention_mask=mask, labels=batch.masked_fill(mask == 0, -100))
    torch.testing.assert_close(packed.mtp_loss, rows.mtp_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.loss, rows.loss, atol=1e-5, rtol=1e-5)
    assert packed.logits.shape[:2] == ids.shape


def test_boundary_predictions_are_masked_even_when_labels_are_not():
    model = tiny_model()
    docs = _docs()
    ids, positions, masked = _packed(docs)
    plain = model(input_ids=ids, position_ids=positions, labels=ids).loss  # the collator did not mask boundaries
    torch.testing.assert_close(plain, model(input_ids=ids, position_ids=positions, labels=masked).loss)
