"""Inputs users pass that are easy to get subtly wrong: empty sequences or batches, additive float masks,
`inputs_embeds` (to the model and to `generate`) next to the hash-routed layers. Each gives the right answer or a
clear error, never a wrong answer (issue #12)."""

import re

import pytest
import torch

from tests.conftest import tiny_model

GENERATE = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return tiny_model()


@pytest.fixture(scope="module")
def batch():
    ids = torch.randint(1, 97, (2, 150), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 150, dtype=torch.long)
    mask[0, :40] = 0  # row 0 left-padded
    return ids, mask


@pytest.mark.parametrize("shape", [(1, 0), (0, 12)])
def test_empty_input_is_refused_clearly(model, shape):
    with pytest.raises(ValueError, match=re.escape(f"The input is empty (batch x tokens = {shape})")):
        model(torch.zeros(shape, dtype=torch.long))
    with pytest.raises(ValueError, match="The input is empty"):
        model.generate(torch.zeros(shape, dtype=torch.long), **GENERATE)


def test_additive_float_mask_means_the_same_as_the_binary_one(model, batch):
    ids, mask = batch
    additive = torch.zeros(2, 150)
    additive[mask == 0] = float("-inf")
    finite = torch.where(mask == 0, torch.tensor(torch.finfo(torch.float32).min), torch.tensor(0.0))
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
        for other in (additive, finite, mask.float()):
            torch.testing.assert_close(model(ids, attention_mask=other).logits[mask.bool()], reference[mask.bool()])


@pytest.mark.parametrize("values", [[0, 2], [0.5, 1.0], [-1.0, 0.0]])
def test_masks_that_are_neither_binary_nor_additive_are_refused(model, batch, values):
    ids, mask = batch
    bad = torch.where(mask == 0, torch.tensor(values[0]), torch.tensor(values[1]))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=bad)


def test_inputs_embeds_with_input_ids_equals_input_ids(model, batch):
    ids, mask = batch
    embeds = model.get_input_embeddings()(ids)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, inputs_embeds=embeds, attention_mask=mask).logits,
            model(ids, attention_mask=mask).logits,
            atol=0,
            rtol=0,
        )
    with_embeds = model.generate(input_ids=ids, inputs_embeds=embeds, attention_mask=mask, **GENERATE)
    assert with_embeds.tolist() == model.generate(ids, attention_mask=mask, **GENERATE).tolist()
    with pytest.raises(ValueError, match="must name the tokens of inputs_embeds"):
        model(input_ids=ids[:, 1:], inputs_embeds=embeds)


def test_inputs_embeds_alone_need_no_ids_without_hash_layers_and_say_so_with_them(model, batch):
    ids, mask = batch
    embeds = model.get_input_embeddings()(ids)
    with pytest.raises(ValueError, match="hash-routed .* pass them together with `inputs_embeds`"):
        model.generate(inputs_embeds=embeds, attention_mask=mask, **GENERATE)
    plain = tiny_model(num_hash_layers=0)
    embeds = plain.get_input_embeddings()(ids)
    from_embeds = plain.generate(inputs_embeds=embeds, attention_mask=mask, **GENERATE)
    # generate returns only the new tokens when it starts from embeddings.
    assert from_embeds.tolist() == plain.generate(ids, attention_mask=mask, **GENERATE)[:, 150:].tolist()
