"""Parity and interchange with transformers' native `DeepseekV4ForCausalLM` (forward-math.md §11, policy 2).

Native's tie order among equal indexer scores is arbitrary (`torch.topk`), while the plugin takes the lowest
index (forward-math.md §10 row 18). These tests therefore run on inputs certified free of ties at the selection
boundary (`record_indexer_margin`), with 8 indexer heads so exact ReLU-zero ties are rare.
"""

import pytest
import torch
import transformers
from packaging import version

from modeling_deepseek_v4.compat import cache_kwargs, cache_of
from tests.conftest import record_indexer_margin, tiny_model

NATIVE = getattr(transformers, "DeepseekV4ForCausalLM", None)
pytestmark = pytest.mark.skipif(
    NATIVE is None or version.parse(transformers.__version__) < version.parse("5.8.1"),
    reason=f"transformers {transformers.__version__} has no native deepseek_v4 >= 5.8.1 to compare with",
)


def native_from(model) -> "transformers.DeepseekV4ForCausalLM":
    """A native model with the plugin's config and weights (MTP weights are not part of native)."""
    native = NATIVE(transformers.DeepseekV4Config.from_dict(model.config.to_dict())).eval()
    state = {k: v for k, v in model.state_dict().items() if ".mtp." not in k}
    native.load_state_dict(state, strict=True)
    return native


@pytest.mark.parametrize("seq_len", [48, 61])
def test_logits_match_native(schedule, seq_len):
    model = tiny_model(schedule)
    native = native_from(model)
    ids = torch.randint(0, model.config.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), record_indexer_margin() as margins:
        ours = model(ids, use_cache=False).logits
    with torch.no_grad():
        theirs = native(ids, use_cache=False).logits
    # Selection really happened (entries > index_topk) and no query had a tie at the boundary.
    assert margins and min(margins) > 1e-6
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_logits_match_native_with_cache_decode(schedule):
    """Native's own prefill + decode agrees with the plugin's full forward on tie-free inputs."""
    model = tiny_model(schedule)
    native = native_from(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), record_indexer_margin() as margins:
        ours = model(ids, use_cache=False).logits
    assert margins and min(margins) > 1e-6
    with torch.no_grad():
        out = native(ids[:, :33], use_cache=True)
        steps = [out.logits]
        for t in range(33, 40):
            out = native(ids[:, t : t + 1], use_cache=True, **cache_kwargs(cache_of(out)))
            steps.append(out.logits)
    torch.testing.assert_close(ours, torch.cat(steps, 1), atol=1e-4, rtol=0)


def test_native_state_dict_loads_into_plugin(schedule):
    model = tiny_model(schedule)
    native = native_from(tiny_model(schedule, seed=3))
    missing, unexpected = model.load_state_dict(native.state_dict(), strict=False)
    # Only the MTP block is plugin-only; everything native has maps 1:1.
    assert unexpected == []
    assert missing and all(".mtp." in k for k in missing)
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), record_indexer_margin() as margins:
        ours = model(ids, use_cache=False).logits
        theirs = native(ids, use_cache=False).logits
    assert not margins or min(margins) > 1e-6
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_plugin_folder_loads_into_native_without_key_noise(tmp_path, schedule):
    model = tiny_model(schedule)
    model.save_pretrained(tmp_path)
    native, info = NATIVE.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() or info["missing_keys"] == []
    assert not info["unexpected_keys"]
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), record_indexer_margin() as margins:
        ours = model(ids, use_cache=False).logits
        theirs = native.eval()(ids, use_cache=False).logits
    assert margins and min(margins) > 1e-6
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
