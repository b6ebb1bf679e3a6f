"""Fine-tune DeepSeek-V4 with grouped expert LoRA (+ LoRA on attention) through `Trainer`, and check it learned.

On CPU in a few minutes, with the built-in tiny random model and a toy task (pairs `x f(x)` for a fixed random
permutation f of 24 symbols; accuracy = how often the model predicts f(x) after x, teacher-forced):

    python examples/finetune_lora.py

prints the accuracy before and after and exits non-zero unless it rose by `--min-gain` (0.3 by default). The same
script on a real checkpoint (one H200 or more; the routed experts stay in their FP4 storage, only LoRA factors train):

    python examples/finetune_lora.py --model deepseek-ai/DeepSeek-V4-Flash --dtype keep --device-map auto \\
        --r 16 --steps 200 --batch-size 4 --seq-len 2048 --lr 1e-4 --output-dir v4-flash-lora

Options: `--quantize fp4` keeps the tiny model's experts in packed FP4 (the official format) while training LoRA on
them; `--optimizer muon` uses `modeling_deepseek_v4.muon` (Muon on the LoRA matrices, AdamW elsewhere);
`--balance` adds the auxiliary-loss-free `ExpertBiasBalancer` callback. The adapter is saved to `--output-dir` and
reloaded with `load_expert_lora` to check that the reloaded model scores the same.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch

SYMBOLS = 24  # toy task alphabet (token ids 2 .. 2 + SYMBOLS)


def tiny_model():
    from modeling_deepseek_v4 import DeepseekV4ExtConfig, DeepseekV4ExtForCausalLM

    config = DeepseekV4ExtConfig(
        vocab_size=64, hidden_size=64, moe_intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        head_dim=32, qk_rope_head_dim=8, q_lora_rank=32, o_groups=2, o_lora_rank=16, n_routed_experts=8,
        num_experts_per_tok=2, index_n_heads=4, index_head_dim=16, index_topk=4, sliding_window=8,
        compress_ratios=[0, 4, 8, 0], num_hash_layers=1,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    )  # fmt: skip
    torch.manual_seed(0)
    return DeepseekV4ExtForCausalLM(config)


def toy_rows(count: int, pairs: int, seed: int) -> list[dict]:
    """Rows `bos x1 f(x1) x2 f(x2) ...`; labels only on the f(x) positions."""
    gen = torch.Generator().manual_seed(0)
    table = torch.randperm(SYMBOLS, generator=gen) + 2  # f, fixed for the task
    gen.manual_seed(seed)
    rows = []
    for _ in range(count):
        xs = torch.randint(0, SYMBOLS, (pairs,), generator=gen)
        ids = torch.stack([xs + 2, table[xs]], dim=1).flatten()
        ids = torch.cat([torch.tensor([0]), ids])
        labels = torch.full_like(ids, -100)
        labels[2::2] = ids[2::2]
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return rows


@torch.no_grad()
def accuracy(model, rows) -> float:
    model.eval()
    ids = torch.tensor([r["input_ids"] for r in rows], device=model.device)
    labels = torch.tensor([r["labels"] for r in rows], device=model.device)
    pred = model(input_ids=ids, use_cache=False).logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    mask = target != -100
    return float((pred == target)[mask].float().mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (built in) or a folder / Hub id")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or keep (official FP8 / FP4 stays)")
    parser.add_argument("--device-map", default=None)
    parser.add_argument("--quantize", choices=["none", "fp4", "fp8"], default="none", help="tiny model's experts")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=33, help="tokens per toy row (odd)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw")
    parser.add_argument("--balance", action="store_true")
    parser.add_argument("--min-gain", type=float, default=0.3)
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args(argv)

    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from modeling_deepseek_v4 import DeepseekV4ExtForCausalLM
    from modeling_deepseek_v4.expert_lora import expert_lora_config, load_expert_lora

    torch.set_num_threads(min(torch.get_num_threads(), 2) if args.model == "tiny" else torch.get_num_threads())
    if args.model == "tiny":
        model = tiny_model()
        if args.quantize != "none":
            from modeling_deepseek_v4.quantization import quantize_model

            quantize_model(model, weights=None, experts=args.quantize)
    else:
        dtype = args.dtype if args.dtype == "keep" else getattr(torch, args.dtype)
        model = DeepseekV4ExtForCausalLM.from_pretrained(
            args.model, dtype=None if dtype == "keep" else dtype, device_map=args.device_map
        )
    pairs = (args.seq_len - 1) // 2
    train, test = toy_rows(2048, pairs, seed=1), toy_rows(128, pairs, seed=2)
    before = accuracy(model, test)

    targets = ["q_a_proj", "q_b_proj", "kv_proj", "o_a_proj", "o_b_proj", "experts"]
    config = expert_lora_config(r=args.r, lora_alpha=2 * args.r, target_modules=targets)
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    optimizers = (None, None)
    if args.optimizer == "muon":
        from modeling_deepseek_v4.muon import muon_optimizer

        optimizers = (muon_optimizer(model, lr=args.lr / 10, adamw_lr=args.lr, weight_decay=0.0), None)
    callbacks = []
    if args.balance:
        from modeling_deepseek_v4.training_callbacks import ExpertBiasBalancer

        callbacks.append(ExpertBiasBalancer(speed=1e-3))
    out_dir = args.output_dir or tempfile.mkdtemp(prefix="dsv4-lora-")
    training = TrainingArguments(
        output_dir=out_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=max(args.steps // 5, 1), report_to=[],
        save_strategy="no", use_cpu=not torch.cuda.is_available(), seed=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=training, train_dataset=train, optimizers=optimizers, callbacks=callbacks)
    trainer.train()
    after = accuracy(model, test)
    model.save_pretrained(out_dir)
    print(f"toy-task accuracy: before {before:.3f}, after {after:.3f} (adapter saved to {out_dir})")

    if args.model == "tiny":  # the saved adapter reloads onto a fresh base and scores the same
        base = tiny_model()
        if args.quantize != "none":
            from modeling_deepseek_v4.quantization import quantize_model

            quantize_model(base, weights=None, experts=args.quantize)
        reloaded = accuracy(load_expert_lora(base, out_dir), test)
        print(f"reloaded adapter accuracy: {reloaded:.3f}")
        if abs(reloaded - after) > 1e-6:
            print("FAILED: the reloaded adapter does not reproduce the trained model", file=sys.stderr)
            return 1
    if after - before < args.min_gain:
        print(f"FAILED: accuracy rose by {after - before:.3f} < --min-gain {args.min_gain}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
