"""CPU benchmark of the in-memory weight formats: resident weight memory and forward time of the same model as
dense bf16, as FP8 linears + FP4 experts / FP8 experts (`quantize_model`, the official formats kept quantized,
dequantized at call time) and as bitsandbytes NF4 (`from_pretrained(..., BitsAndBytesConfig(load_in_4bit=True))`,
every linear and the routed experts), on the tests' tiny config and a mid-size config.

Command (about 3 minutes on a 2-vCPU VM):

    python benchmarks/bench_quant.py --out benchmarks/results_quant.md

Memory = bytes of every parameter and buffer of the model (what stays resident), split into the routed experts
and the rest. Forward = median of `--repeats` timed `model(ids, use_cache=False, logits_to_keep=1)` calls after one
warm-up, the formats timed in turn (one forward of each per round, so that the drift of a shared machine hits all
alike), batch 1, `--seq` tokens, compute in bf16, `torch.set_num_threads(--threads)`. The quantized paths use the
pure-PyTorch reference ops (exact dequantization, then matmul); fused kernels come later, so on CPU they trade
time for memory.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prefill import emit, environment, source_id  # noqa: E402

CONFIGS = {
    "tiny": dict(
        vocab_size=97,
        hidden_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=5,
        num_attention_heads=4,
        head_dim=32,
        qk_rope_head_dim=8,
        q_lora_rank=32,
        o_groups=2,
        o_lora_rank=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        index_n_heads=8,
        index_head_dim=16,
        index_topk=3,
        sliding_window=8,
        compress_ratios=[0, 0, 4, 8, 4, 0],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        num_hash_layers=2,
    ),
    "mid": dict(
        vocab_size=8192,
        hidden_size=1024,
        moe_intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        head_dim=128,
        qk_rope_head_dim=32,
        q_lora_rank=256,
        o_groups=4,
        o_lora_rank=128,
        n_routed_experts=32,
        num_experts_per_tok=4,
        index_n_heads=8,
        index_head_dim=64,
        index_topk=32,
        sliding_window=64,
        compress_ratios=[0, 4, 32, 4, 0],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 32},
        num_hash_layers=1,
    ),
}
MODES = ("bf16", "fp8 + fp4 experts", "fp8 + fp8 experts", "nf4 (bitsandbytes)")


def weight_bytes(model) -> tuple[int, int]:
    """(bytes of the routed experts, bytes of everything else) over parameters and buffers."""
    experts = rest = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        nbytes = t.numel() * t.element_size()
        if ".mlp.experts." in name:
            experts += nbytes
        else:
            rest += nbytes
    for module in model.modules():  # NF4 expert banks may keep their packed bytes outside named tensors
        extra = getattr(module, "extra_resident_bytes", None)
        if callable(extra):
            experts += extra()
    return experts, rest


def build(mode: str, config_kwargs: dict, folder: Path):
    import torch
    from transformers import BitsAndBytesConfig

    from modeling_deepseek_v4 import DeepseekV4ExtConfig, DeepseekV4ExtForCausalLM
    from modeling_deepseek_v4.quantization import quantize_model

    if mode.startswith("nf4"):
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        return DeepseekV4ExtForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.bfloat16).eval()
    torch.manual_seed(0)
    model = DeepseekV4ExtForCausalLM(DeepseekV4ExtConfig(**config_kwargs)).to(torch.bfloat16).eval()
    if mode == "fp8 + fp4 experts":
        quantize_model(model, weights="fp8", experts="fp4")
    elif mode == "fp8 + fp8 experts":
        quantize_model(model, weights="fp8", experts="fp8")
    if mode == "bf16" and not (folder / "config.json").exists():
        model.save_pretrained(folder)
    return model


def time_forwards(models: dict, ids, repeats: int) -> dict:
    """Median forward seconds per model, the models timed in turn (round robin) so that drift of a shared machine
    falls on every format alike."""
    import torch

    times = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(ids, use_cache=False, logits_to_keep=1)
        for _ in range(repeats):
            for name, model in models.items():
                t0 = time.perf_counter()
                model(ids, use_cache=False, logits_to_keep=1)
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    start = source_id()
    lines = [
        "# In-memory weight formats: resident weights and forward time (CPU)",
        "",
        f"Command: `python benchmarks/bench_quant.py{' --out ' + args.out if args.out else ''}`",
        "",
        environment(args.threads).replace("fp32, batch 1", "bf16 compute, batch 1"),
        f"Sequence {args.seq} tokens, median of {args.repeats} forwards after one warm-up.",
        "",
        "| config | format | experts MiB | rest MiB | total MiB | vs bf16 | forward s | vs bf16 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in args.configs:
        kwargs = CONFIGS[name]
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, kwargs["vocab_size"], (1, args.seq), generator=gen)
        models, failed = {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            for mode in MODES:
                try:
                    models[mode] = build(mode, kwargs, Path(tmp))
                except Exception as exc:  # bitsandbytes missing or unable to run here
                    failed[mode] = f"{type(exc).__name__}: {str(exc)[:80]}"
            seconds = time_forwards(models, ids, args.repeats)
        base = None
        for mode in MODES:
            if mode in failed:
                lines.append(f"| {name} | {mode} | n/a | | | | | ({failed[mode]}) |")
                continue
            experts, rest = weight_bytes(models[mode])
            total = experts + rest
            base = base or (total, seconds[mode])
            lines.append(
                f"| {name} | {mode} | {experts / 2**20:.2f} | {rest / 2**20:.2f} | {total / 2**20:.2f} | "
                f"{total / base[0]:.2f}x | {seconds[mode]:.3f} | {seconds[mode] / base[1]:.2f}x |"
            )
        del models
    emit(lines, start, source_id(), args.out)


if __name__ == "__main__":
    main()
