"""FP4 quantization-aware training (tech report §3.4): fake quantization with straight-through gradients, Trainer
and PEFT on top, and conversion to a quantized model whose logits equal the QAT model's, through an official
FP4 export and back."""

import copy

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from modeling_deepseek_v4 import DeepseekV4ExtForCausalLM
from modeling_deepseek_v4.conversion import convert_official_to_plugin, convert_plugin_to_official
from modeling_deepseek_v4.quantization import convert_qat, prepare_fp4_qat, set_reference_numerics
from modeling_deepseek_v4.quantization.qat import DeepseekV4QATExperts, fake_quantize
from modeling_deepseek_v4.quantized_modules import DeepseekV4Fp8Linear, DeepseekV4QuantizedExperts
from tests.conftest import tiny_model


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def fake_quantized_copy(qat_model):
    """A plain dense model holding the QAT model's fake-quantized weights."""
    dense = tiny_model()
    state = {}
    for name, module in qat_model.named_modules():
        if isinstance(module, DeepseekV4QATExperts):
            state[f"{name}.gate_up_proj"] = fake_quantize(module.gate_up_proj, module.fmt, halves=2)
            state[f"{name}.down_proj"] = fake_quantize(module.down_proj, module.fmt)
    full = qat_model.state_dict()
    full.update(state)
    dense.load_state_dict(full)
    return dense


def test_qat_forward_is_the_fake_quantized_model_and_gradients_pass_straight_through():
    qat = prepare_fp4_qat(tiny_model())
    assert all(isinstance(m.mlp.experts, DeepseekV4QATExperts) for m in qat.model.layers)
    assert dict(qat.named_parameters()).keys() == dict(tiny_model().named_parameters()).keys()  # names kept
    dense = fake_quantized_copy(qat)
    ids = torch.randint(0, 97, (2, 24))
    assert torch.equal(logits(qat, ids), logits(dense, ids))
    qat(input_ids=ids, labels=ids).loss.backward()
    dense(input_ids=ids, labels=ids).loss.backward()
    qat_params, dense_params = dict(qat.named_parameters()), dict(dense.named_parameters())
    for name in ("model.layers.3.mlp.experts.gate_up_proj", "model.layers.3.mlp.experts.down_proj"):
        # STE: d loss / d master == d loss / d (fake-quantized weight)
        torch.testing.assert_close(qat_params[name].grad, dense_params[name].grad, atol=1e-6, rtol=1e-5)
    assert qat_params["model.layers.3.mlp.experts.gate_up_proj"].grad.abs().sum() > 0


def toy_dataset(n=16, length=16):
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        start = int(torch.randint(0, 40, (1,), generator=gen))
        ids = torch.arange(start, start + length) % 97  # counting task: next token = token + 1
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def train(model, tmp_path, steps=12, lr=5e-3):
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=lr,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=toy_dataset())
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_qat_then_fp4_export_is_lossless(tmp_path):
    model = prepare_fp4_qat(tiny_model(), linears=True)
    assert isinstance(model.model.layers[0].self_attn.q_a_proj, nn.Linear)
    losses = train(model, tmp_path)
    assert sum(losses[-3:]) < sum(losses[:3])
    model.eval()
    ids = torch.randint(0, 97, (2, 30))
    expected = logits(model, ids)

    quantized = convert_qat(model)
    assert isinstance(quantized.model.layers[0].mlp.experts, DeepseekV4QuantizedExperts)
    assert isinstance(quantized.model.layers[0].self_attn.q_a_proj, DeepseekV4Fp8Linear)
    assert torch.equal(logits(quantized, ids), expected)  # bit-identical dequantized weights

    # save -> official FP4 checkpoint -> plugin keep folder -> load. The official layout stores the dense
    # tensors (embeddings, norms, routers, compressors) in BF16, so round those first; the quantized weights must
    # come back bit for bit, and then so do the logits.
    with torch.no_grad():
        for p in quantized.parameters():
            p.copy_(p.bfloat16())
    expected = logits(quantized, ids)
    quantized.save_pretrained(tmp_path / "saved")
    convert_plugin_to_official(tmp_path / "saved", tmp_path / "official", progress=False)
    convert_official_to_plugin(tmp_path / "official", tmp_path / "back", dtype="keep", progress=False)
    # same chunking as the tiny config (the converter writes the defaults): same summation order
    chunks = {"attn_chunk_size": 16, "indexer_chunk_size": 16}
    back = DeepseekV4ExtForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32, **chunks).eval()
    assert back.model.layers[0].mlp.experts.fmt == "fp4"
    saved = quantized.state_dict()
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor.view(torch.uint8), saved[name].view(torch.uint8)), name
    assert torch.equal(logits(back, ids), expected)


def test_peft_lora_on_top_of_qat_then_merge_and_convert(tmp_path):
    peft = pytest.importorskip("peft")
    qat = prepare_fp4_qat(tiny_model())
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=r".*self_attn\.(q_a_proj|kv_proj|o_b_proj)",
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    lora = peft.get_peft_model(qat, config)
    masters = {n: p.clone() for n, p in lora.named_parameters() if "experts" in n and "lora" not in n}
    losses = train(lora, tmp_path, steps=10, lr=1e-2)
    assert sum(losses[-3:]) < sum(losses[:3])
    for name, p in lora.named_parameters():
        if name in masters:
            assert torch.equal(p, masters[name]), name  # base frozen, adapters trained
    with pytest.raises(ValueError, match="adapter layers"):
        convert_qat(copy.deepcopy(lora.base_model.model))
    merged = lora.merge_and_unload().eval()
    ids = torch.randint(0, 97, (1, 30))
    expected = logits(merged, ids)
    assert torch.equal(logits(convert_qat(merged), ids), expected)


def test_qat_with_reference_numerics_and_errors():
    model = set_reference_numerics(prepare_fp4_qat(tiny_model()), True)
    assert all(m.mlp.experts.reference_numerics for m in model.model.layers)
    ids = torch.randint(0, 97, (1, 20))
    expected = logits(model, ids)
    assert torch.equal(logits(convert_qat(model), ids), expected)
    with pytest.raises(ValueError, match="not prepared"):
        convert_qat(tiny_model())
    with pytest.raises(ValueError, match="quantized"):
        prepare_fp4_qat(model)
    with pytest.raises(ValueError, match="'fp4' or 'fp8'"):
        prepare_fp4_qat(tiny_model(), experts="int4")
