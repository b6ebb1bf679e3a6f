"""Things users hit: resizing the vocabulary with hash-routed layers, requests the model cannot honour (warned,
not silently ignored), parameter counts of quantized models."""

import torch
from transformers import AutoModelForCausalLM

import modeling_deepseek_v4.model_inputs as model_inputs
from modeling_deepseek_v4 import DeepseekV4ExtForCausalLM
from modeling_deepseek_v4.moe import DeepseekV4HashRouter
from tests.conftest import tiny_config, tiny_model


def hash_tables(model):
    return [m.tid2eid.clone() for m in model.modules() if isinstance(m, DeepseekV4HashRouter)]


def test_resize_token_embeddings_keeps_hash_routing_working(tmp_path):
    model = tiny_model()
    before = hash_tables(model)
    assert before, "the tiny model has hash-routed layers"
    ids = torch.randint(2, 97, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
    model.resize_token_embeddings(110)
    assert model.config.vocab_size == 110
    for old, new in zip(before, hash_tables(model)):
        assert new.shape == (110, old.shape[1]) and torch.equal(new[:97], old)
        assert int(new.max()) < model.config.n_routed_experts
    new_ids = torch.cat([ids, torch.arange(97, 110)[None]], 1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[..., :97], reference, atol=1e-6, rtol=0)
        logits = model(new_ids).logits  # tokens >= 97 used to raise IndexError in tid2eid
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():  # weights out of the memory map: AVX-512 BLAS sums in an alignment-dependent order
        for tensor in [*reloaded.parameters(), *reloaded.buffers()]:
            tensor.data = tensor.data.clone()
        assert torch.equal(reloaded(new_ids).logits, logits)
    model.resize_token_embeddings(90)
    assert all(t.shape[0] == 90 for t in hash_tables(model))
    with torch.no_grad():
        model(torch.randint(2, 90, (1, 12)))


def test_unsupported_requests_warn_once(monkeypatch):
    seen = []
    monkeypatch.setattr(model_inputs.logger, "warning_once", lambda msg, *a, **k: seen.append(msg))
    model = tiny_model()
    ids = torch.randint(2, 97, (1, 10))
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    assert out.attentions is None and any("output_attentions" in m for m in seen)
    seen.clear()
    model = tiny_model(attention_dropout=0.1)
    with torch.no_grad():
        model(ids)
    assert any("attention_dropout=0.1" in m for m in seen)


def test_num_parameters_counts_weights_kept_quantized():
    from modeling_deepseek_v4.quantization import quantize_model

    model = tiny_model()
    dense = model.num_parameters()
    quantize_model(model, weights="fp8", experts="fp4")
    assert model.num_parameters() == dense
    assert model.num_parameters(only_trainable=True) < dense


def test_packed_rows_run_document_by_document_in_the_base_model_too():
    """Padding-free packing (TRL) restarts positions inside a row; TRL's fused LM head calls the base model, which
    unpacks the documents like the causal LM (tests/models/test_packing.py)."""
    model = tiny_model()
    ids = torch.randint(2, 97, (1, 20))
    packed = torch.cat([torch.arange(12), torch.arange(8)])[None]
    with torch.no_grad():
        hidden = model.model(input_ids=ids, position_ids=packed).last_hidden_state
        by_cu = model.model(input_ids=ids, cu_seq_lens_q=torch.tensor([0, 12, 20])).last_hidden_state
        first = model.model(input_ids=ids[:, :12]).last_hidden_state
        second = model.model(input_ids=ids[:, 12:]).last_hidden_state
    torch.testing.assert_close(hidden, torch.cat([first, second], dim=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(by_cu, hidden, atol=0, rtol=0)
    # What generate passes (cumsum of the mask, pads set to 1) and plain positions are fine.
    mask = torch.ones(1, 20, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).masked_fill(mask == 0, 1))
        model(input_ids=ids, position_ids=torch.arange(20)[None])


def test_return_dict_false_and_config_output_hidden_states():
    """As transformers' common tests expect: `return_dict=False` gives a tuple, `config.output_hidden_states` works."""
    model = tiny_model()
    ids = torch.randint(2, 97, (1, 16))
    with torch.no_grad():
        reference = model(ids).logits
        as_tuple = model(ids, return_dict=False)
        base_tuple = model.model(ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], reference)
    assert isinstance(base_tuple, tuple) and base_tuple[0].shape == (1, 16, model.config.hidden_size)
    model.config.output_hidden_states = True
    with torch.no_grad():
        hidden = model(ids).hidden_states
    assert hidden is not None and len(hidden) == model.config.num_hidden_layers + 1


def test_fp32_islands_survive_a_half_default_dtype():
    """Norms, mHC, sinks, compressor projections and router bias stay fp32 like the reference, also when the model
    is built under a bf16 default dtype (transformers' common tests do this; `from_pretrained` already did)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = DeepseekV4ExtForCausalLM(tiny_config()).eval()
    finally:
        torch.set_default_dtype(previous)
    layer = model.model.layers[2]
    assert layer.self_attn.q_a_proj.weight.dtype == torch.bfloat16
    for tensor in (
        layer.self_attn.sinks,
        layer.attn_hc.fn,
        layer.input_layernorm.weight,
        layer.self_attn.compressor.position_bias,
        layer.self_attn.compressor.kv_proj.weight,
        layer.mlp.gate.e_score_correction_bias,
        model.model.hc_head.hc_fn,
    ):
        assert tensor.dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(2, 97, (1, 24))).logits).all()
