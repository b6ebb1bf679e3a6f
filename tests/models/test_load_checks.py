"""A load that would leave weights random raises, naming the tensors and the fix (instead of a log line)."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from tests.conftest import tiny_model


def test_a_tensor_missing_from_the_checkpoint_is_named(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.2.self_attn.compressor.position_bias"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"1 missing: model\.layers\.2\.self_attn\.compressor\.position_bias\. Load"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_other_shapes_refused_unless_asked(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # transformers' own check
        AutoModelForCausalLM.from_pretrained(tmp_path, vocab_size=120)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, vocab_size=120, ignore_mismatched_sizes=True)
    assert model.config.vocab_size == 120


def test_complete_loads_are_unchanged(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(2, 97, (1, 20))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
