"""Muon (tech report §2.4): the hybrid Newton-Schulz iteration against a float64 reference, batched expert
matrices, the Muon / AdamW split, and a bit-for-bit resume from the optimizer's state_dict."""

import torch

from modeling_deepseek_v4.muon import NS_SCHEDULE, is_muon_parameter, muon_optimizer, newton_schulz
from tests.conftest import tiny_model

torch.set_num_threads(1)


def _reference(g: torch.Tensor) -> torch.Tensor:
    """One matrix, float64, the iteration written out."""
    x = g.double() / (g.double().norm() + 1e-7)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for step in range(10):
        a, b, c = (3.4445, -4.7750, 2.0315) if step < 8 else (2.0, -1.5, 0.5)
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def test_schedule_is_the_papers():
    assert NS_SCHEDULE == ((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2


def test_newton_schulz_matches_a_float64_reference_batched_over_experts():
    g = torch.randn(5, 48, 24, generator=torch.Generator().manual_seed(0))
    got = newton_schulz(g)
    for e in range(5):  # each expert's matrix on its own, in float64
        torch.testing.assert_close(got[e].double(), _reference(g[e]), atol=2e-5, rtol=1e-4)
    # the result is close to orthogonal: singular values near 1
    sv = torch.linalg.svdvals(got.double())
    assert float((sv - 1).abs().max()) < 0.35


def test_parameters_split_between_muon_and_adamw():
    model = tiny_model()
    kinds = {n: is_muon_parameter(n, p) for n, p in model.named_parameters()}
    assert kinds["model.layers.0.self_attn.q_a_proj.weight"] and kinds["model.layers.0.mlp.experts.gate_up_proj"]
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.input_layernorm.weight",
                 "model.layers.0.self_attn.sinks", "model.layers.0.attn_hc.fn"):  # fmt: skip
        assert name in kinds and not kinds[name], name


def _train(model, optimizer, steps, ids):
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_training_reduces_the_loss_and_resumes_bit_for_bit(tmp_path):
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    straight = tiny_model()
    opt = muon_optimizer(straight, lr=1e-3, weight_decay=0.01)
    with torch.no_grad():
        start = straight(ids, labels=ids).loss
    _train(straight, opt, 4, ids)
    with torch.no_grad():
        assert straight(ids, labels=ids).loss < start

    first = tiny_model()
    opt = muon_optimizer(first, lr=1e-3, weight_decay=0.01)
    _train(first, opt, 2, ids)
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    resumed = tiny_model(seed=5)  # different initial weights: everything must come from the checkpoint
    saved = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(saved["model"])
    opt = muon_optimizer(resumed, lr=1e-3, weight_decay=0.01)
    opt.load_state_dict(saved["optimizer"])
    _train(resumed, opt, 2, ids)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_trainer_with_muon_resumes_bit_for_bit(tmp_path):
    """Trainer with `optimizers=(muon_optimizer(...), None)`: checkpoint at 2, resume to 4 == 4 steps straight."""
    from transformers import Trainer, TrainingArguments

    gen = torch.Generator().manual_seed(2)
    rows = [{"input_ids": r, "labels": r} for r in torch.randint(0, 97, (16, 24), generator=gen).tolist()]

    def run(output_dir, resume=None, seed_model=0):
        model = tiny_model(seed=seed_model)
        args = TrainingArguments(
            output_dir=str(output_dir), per_device_train_batch_size=2, max_steps=4, save_steps=2,
            learning_rate=1e-3, lr_scheduler_type="linear", report_to=[], use_cpu=True, seed=0, logging_strategy="no",
        )  # fmt: skip
        optimizer = muon_optimizer(model, lr=1e-3, weight_decay=0.01)
        trainer = Trainer(model=model, args=args, train_dataset=rows, optimizers=(optimizer, None))
        trainer.train(resume_from_checkpoint=resume)
        return model

    straight = run(tmp_path / "straight")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "straight" / "checkpoint-2"), seed_model=7)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
