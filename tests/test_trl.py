"""TRL (1.16) trainers on the plugin: `SFTTrainer` and `DPOTrainer` with default arguments, and loading by path.

TRL reads the MoE aux-loss settings from the config (`router_aux_loss_coef`, `output_router_logits`, `num_experts`,
`num_experts_per_tok`), replaces `model.forward` by a fused LM head that calls the backbone `model.model(...)`, and
builds a model given by path from `config.architectures` / `auto_map` (hf-integration.md §12). Defaults kept except
what a CPU test needs: `use_cpu`, fp32 (TRL turns bf16 on by default), two steps, small batches, no reporting.
"""

import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tests.conftest import tiny_model

trl = pytest.importorskip("trl", minversion="1.16", reason="TRL is optional: pip install -e '.[trl]'")
datasets = pytest.importorskip("datasets", reason="datasets comes with TRL: pip install -e '.[trl]'")

SPECIALS = ["<bos>", "<eos>", "<pad>", "<unk>"]
# The tiny config's vocab_size is 97; ids 0 / 1 are its bos / eos.
WORDS = [f"w{i}" for i in range(97 - len(SPECIALS))]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the tiny model's 97 ids (`<bos>` 0, `<eos>` 1, `<pad>` 2, `<unk>` 3, words)."""
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def sentences(count: int, lengths: range, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        n = lengths[i % len(lengths)]
        out.append(" ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (n,), generator=g).tolist()))
    return out


def cpu_args(config_cls, tmp_path, **overrides):
    """TRL's defaults except what a CPU unit test needs (TRL defaults to bf16 and gradient checkpointing on)."""
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
    )
    kwargs.update(overrides)
    return config_cls(**kwargs)


def saved_folder(tmp_path):
    """A tiny model and the tokenizer saved together, as a Hub repo would hold them; returns (folder, model)."""
    model = tiny_model()
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder, model


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def check_trained(model, before: dict[str, torch.Tensor], log_history: list[dict]) -> None:
    """Finite losses and aux losses on every step; LM head, embeddings and a score-routed gate moved."""
    steps = [entry for entry in log_history if "loss" in entry]
    assert len(steps) == 2
    for entry in steps:
        assert math.isfinite(entry["loss"]), entry
        # TRL's MoE aux-loss path is on: it logs the load-balancing loss of the router logits it requested.
        assert math.isfinite(entry["aux_loss"]) and entry["aux_loss"] > 0, entry
    gate = f"model.layers.{model.config.num_hash_layers}.mlp.gate.weight"
    for name in ("lm_head.weight", "model.embed_tokens.weight", gate):
        assert not torch.equal(dict(model.named_parameters())[name], before[name]), f"{name} did not change"


def test_sft_trainer_defaults_train_with_aux_loss(tmp_path):
    model = tiny_model()
    train = datasets.Dataset.from_dict({"text": sentences(8, range(5, 9))})
    args = cpu_args(trl.SFTConfig, tmp_path)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tiny_tokenizer())
    # `router_aux_loss_coef` (0.001) in the config turns TRL's aux path on, and TRL switches the config to match.
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == model.config.router_aux_loss_coef
    assert model.config.output_router_logits is True
    before = snapshot(model)
    trainer.train()
    check_trained(model, before, trainer.state.log_history)

    # The fused LM head runs the backbone `model.model(...)` itself: on a right-padded batch its per-token
    # log-probabilities equal those of the model's own forward.
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    assert not bool(batch["attention_mask"].all())
    model.eval()
    with torch.no_grad():
        fused = model(**batch, fused_lm_head=True)
        own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=False)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    expected = own.logits[:, :-1].log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(fused.log_probs, expected * mask, atol=1e-5, rtol=1e-5)
    assert fused.aux_loss is not None and torch.isfinite(fused.aux_loss)


def test_dpo_trainer_defaults_train_with_aux_loss(tmp_path):
    # DPOTrainer builds its reference model from the policy's path, so the policy is given by path too.
    folder, _ = saved_folder(tmp_path)
    prompts = sentences(4, range(3, 6), seed=1)
    # Completions start with a space: TRL tokenizes prompt + completion as one string.
    chosen = [" " + s for s in sentences(4, range(2, 5), seed=2)]
    rejected = [" " + s for s in sentences(4, range(2, 5), seed=3)]
    train = datasets.Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": rejected})
    trainer = trl.DPOTrainer(model=str(folder), args=cpu_args(trl.DPOConfig, tmp_path), train_dataset=train)
    assert type(trainer.model).__name__ == type(trainer.ref_model).__name__ == "DeepseekV4ExtForCausalLM"
    assert trainer.aux_loss_enabled
    before, ref_before = snapshot(trainer.model), snapshot(trainer.ref_model)
    trainer.train()
    check_trained(trainer.model, before, trainer.state.log_history)
    assert all(torch.equal(p, ref_before[n]) for n, p in trainer.ref_model.named_parameters())


def test_sft_trainer_from_saved_folder_builds_the_plugin_class_with_mtp(tmp_path):
    folder, saved = saved_folder(tmp_path)
    trainer = trl.SFTTrainer(
        model=str(folder),
        args=cpu_args(trl.SFTConfig, tmp_path),
        train_dataset=datasets.Dataset.from_dict({"text": sentences(2, range(4, 6))}),
    )
    # Not transformers' native DeepseekV4ForCausalLM, which would drop the MTP block.
    assert type(trainer.model).__name__ == "DeepseekV4ExtForCausalLM"
    loaded, reference = trainer.model.state_dict(), saved.state_dict()
    mtp = [name for name in reference if name.startswith("model.mtp.")]
    assert mtp
    for name in mtp:
        assert torch.equal(loaded[name], reference[name]), name


def test_sft_trainer_packed_documents_train_as_if_alone(tmp_path):
    """`packing=True` (TRL's padding-free BFD packing: position_ids restart per document): the model unpacks the
    documents (packing.py), so the packed batch gives each document the log-probabilities it gets alone."""
    model = tiny_model()
    train = datasets.Dataset.from_dict({"text": sentences(8, range(5, 9))})
    args = cpu_args(trl.SFTConfig, tmp_path, packing=True, max_length=32)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tiny_tokenizer())
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    positions = batch["position_ids"]
    assert bool((positions[:, 1:] <= positions[:, :-1]).any())  # several documents in a row
    before = snapshot(model)
    trainer.train()
    check_trained(model, before, trainer.state.log_history)

    model.eval()
    with torch.no_grad():
        fused = model(**batch, fused_lm_head=True)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    starts = [0, *(torch.nonzero(positions[0, 1:] <= positions[0, :-1]).flatten() + 1).tolist(), ids.numel()]
    for a, b in zip(starts[:-1], starts[1:]):
        with torch.no_grad():
            alone = model(input_ids=ids[None, a:b], output_router_logits=False).logits[0, :-1].log_softmax(-1)
        target = labels[a + 1 : b]
        expected = alone.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (target != -100)
        torch.testing.assert_close(fused.log_probs[0, a : b - 1], expected, atol=1e-5, rtol=1e-5)


def test_dpo_and_sft_train_the_grouped_expert_lora(tmp_path):
    """TRL with `peft_config=expert_lora_config(...)`: the grouped expert / o_a_proj LoRA trains under DPO (the
    reference is the policy with adapters disabled) and SFT, the base weights stay."""
    pytest.importorskip("peft")
    from modeling_deepseek_v4.expert_lora import expert_lora_config

    config = expert_lora_config(r=4, lora_alpha=8, target_modules=["q_a_proj", "o_a_proj", "experts"])
    prompts = sentences(4, range(3, 6), seed=1)
    chosen = [" " + s for s in sentences(4, range(2, 5), seed=2)]
    rejected = [" " + s for s in sentences(4, range(2, 5), seed=3)]
    runs = {
        "dpo": lambda model: trl.DPOTrainer(
            model=model, args=cpu_args(trl.DPOConfig, tmp_path / "dpo"), processing_class=tiny_tokenizer(),
            train_dataset=datasets.Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": rejected}),
            peft_config=config,
        ),
        "sft": lambda model: trl.SFTTrainer(
            model=model, args=cpu_args(trl.SFTConfig, tmp_path / "sft"), processing_class=tiny_tokenizer(),
            train_dataset=datasets.Dataset.from_dict({"text": sentences(8, range(5, 9))}), peft_config=config,
        ),
    }  # fmt: skip
    for name, build in runs.items():
        trainer = build(tiny_model())
        model = trainer.model
        lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_B." in n}
        base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
        assert any(".experts.lora_B." in n for n in lora_b) and any(".o_a_proj.lora_B." in n for n in lora_b)
        trainer.train()
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        assert losses and all(math.isfinite(v) for v in losses), name
        params = dict(model.named_parameters())
        assert any(not torch.equal(params[n], v) for n, v in lora_b.items() if ".experts." in n), name
        assert all(torch.equal(params[n], v) for n, v in base.items()), name
