"""Padded batches: every row equals the sequence run alone (forward-math.md §10 row 15, hf-integration.md §6.4).

Pads must not enter compressor windows, the indexer or attention, and windows align to each row's own positions.
"""

import torch

from tests.conftest import tiny_model

LENGTHS = [41, 26, 9]


def padded_batch(lengths, side, vocab=97, seed=11):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(2, vocab, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, seq in enumerate(seqs):
        cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, cols], mask[row, cols] = seq, 1
    return seqs, ids, mask


def test_left_padded_logits_equal_single(schedule):
    model = tiny_model(schedule)
    seqs, ids, mask = padded_batch(LENGTHS, "left")
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, use_cache=False).logits
        for row, seq in enumerate(seqs):
            alone = model(seq[None], use_cache=False).logits[0]
            torch.testing.assert_close(batched[row, -len(seq) :], alone, atol=1e-5, rtol=0)


def test_right_padded_logits_equal_single(schedule):
    model = tiny_model(schedule)
    seqs, ids, mask = padded_batch(LENGTHS, "right")
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, use_cache=False).logits
        for row, seq in enumerate(seqs):
            alone = model(seq[None], use_cache=False).logits[0]
            torch.testing.assert_close(batched[row, : len(seq)], alone, atol=1e-5, rtol=0)


def test_right_padded_training_loss_equals_per_sequence_sum(schedule):
    model = tiny_model(schedule).train()
    seqs, ids, mask = padded_batch(LENGTHS, "right")
    labels = ids.masked_fill(mask == 0, -100)
    n_items = int((labels[:, 1:] != -100).sum())
    batch_loss = model(ids, attention_mask=mask, labels=labels, num_items_in_batch=n_items).loss
    single = sum(model(s[None], labels=s[None], num_items_in_batch=n_items).loss for s in seqs)
    torch.testing.assert_close(batch_loss, single, atol=1e-5, rtol=0)


def test_left_padded_chunked_prefill_and_decode_equal_single(schedule):
    """Left-padded prefill in two chunks (the first chunk is all pads for the short row), then decode."""
    model = tiny_model(schedule)
    seqs, ids, mask = padded_batch(LENGTHS, "left")
    extra = torch.randint(2, 97, (len(seqs), 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model(ids[:, :20], attention_mask=mask[:, :20], use_cache=True)
        out2 = model(ids[:, 20:], attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
        cache, steps = out2.past_key_values, []
        full_mask = mask
        for t in range(extra.shape[1]):
            full_mask = torch.cat([full_mask, torch.ones(len(seqs), 1, dtype=torch.long)], dim=1)
            steps.append(model(extra[:, t : t + 1], attention_mask=full_mask, past_key_values=cache).logits)
        decoded = torch.cat(steps, dim=1)
        prefill = torch.cat([out.logits, out2.logits], dim=1)
        for row, seq in enumerate(seqs):
            alone = model(torch.cat([seq, extra[row]])[None], use_cache=False).logits[0]
            torch.testing.assert_close(prefill[row, -len(seq) :], alone[: len(seq)], atol=1e-5, rtol=0)
            torch.testing.assert_close(decoded[row], alone[len(seq) :], atol=1e-5, rtol=0)


def test_left_padded_greedy_generate_equals_single(schedule):
    model = tiny_model(schedule)
    seqs, ids, mask = padded_batch(LENGTHS, "left")
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, **kwargs)[:, ids.shape[1] :]
        for row, seq in enumerate(seqs):
            alone = model.generate(seq[None], attention_mask=torch.ones(1, len(seq), dtype=torch.long), **kwargs)
            assert batched[row].tolist() == alone[0, len(seq) :].tolist()


def test_padded_hidden_states_lie_on_the_output_graph():
    """`hidden_states` of a padded batch are the tensors the outputs are computed from (caller's order), so
    `retain_grad()` on them receives the outputs' gradient (transformers' test_retain_grad_hidden_states_attentions);
    real positions do not depend on pads, so the pads' gradient is zero."""
    model = tiny_model()
    seqs, ids, mask = padded_batch(LENGTHS, "left")
    out = model(ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
    for hidden in out.hidden_states:
        hidden.retain_grad()
    out.logits[mask.bool()].sum().backward()
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    for hidden in out.hidden_states:
        assert hidden.grad is not None
        assert hidden.grad[mask.bool()].abs().sum() > 0
        assert hidden.grad[~mask.bool()].abs().sum() == 0
