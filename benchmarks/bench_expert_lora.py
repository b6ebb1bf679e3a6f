"""CPU benchmark of one LoRA training step on the routed experts: the plugin's grouped expert LoRA
(`modeling_deepseek_v4.expert_lora`) against PEFT's `target_parameters` LoRA on the same model, dense fp32 base and
packed-FP4 base (PEFT cannot target a quantized bank), plus a sweep over the number of experts at a fixed token
count (a step touches the same number of (token, expert) pairs; only the experts that receive none change).

Command (about 4 minutes on a 2-vCPU VM):

    python benchmarks/bench_expert_lora.py --out benchmarks/results_expert_lora.md --plot benchmarks/expert_lora.svg

Each measurement runs in a fresh process: build the model (hidden 512, 2 MoE layers + MTP, experts of 256, top-6,
LoRA r=8 alpha 16 on gate_up / down of every routed expert), one warm-up step, then `--steps` timed steps of
forward + backward + AdamW on batch 1 x `--seq` tokens. Step time = median; tokens/s = seq / step time; peak memory =
the highest resident set size sampled every millisecond during the timed steps minus the RSS before them (what a step
adds on top of the model and optimizer state).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_prefill import emit, environment, source_id  # noqa: E402

CONFIG = dict(
    vocab_size=2048,
    hidden_size=512,
    moe_intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    head_dim=64,
    qk_rope_head_dim=16,
    q_lora_rank=128,
    o_groups=2,
    o_lora_rank=64,
    num_experts_per_tok=6,
    index_n_heads=4,
    index_head_dim=32,
    index_topk=16,
    sliding_window=64,
    compress_ratios=[0, 4, 0],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 32},
    num_hash_layers=0,
)


def measure(method: str, base: str, experts: int, seq: int, steps: int, threads: int) -> dict:
    """One (method, base, experts) point in this process: step seconds and peak added RSS bytes."""
    import torch
    from peft import LoraConfig, get_peft_model

    from modeling_deepseek_v4 import DeepseekV4ExtConfig, DeepseekV4ExtForCausalLM
    from modeling_deepseek_v4.expert_lora import expert_lora_config
    from modeling_deepseek_v4.quantization import quantize_model
    from tests.rss import peak_rss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = DeepseekV4ExtForCausalLM(DeepseekV4ExtConfig(**CONFIG, n_routed_experts=experts))
    if base == "fp4":
        quantize_model(model, weights=None, experts="fp4")
    lora = dict(r=8, lora_alpha=16)
    if method == "grouped":
        model = get_peft_model(model, expert_lora_config(**lora, target_modules=["experts"]))
    else:
        targets = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
        model = get_peft_model(model, LoraConfig(**lora, target_parameters=targets))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CONFIG["vocab_size"], (1, seq), generator=gen)

    def step():
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state, allocator pools
    times = []

    def timed():
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)

    _, before, peak = peak_rss(timed)
    return {"seconds": statistics.median(times), "peak_added": peak - before}


def run_point(method: str, base: str, experts: int, args) -> dict | str:
    cmd = [sys.executable, __file__, "--point", method, base, str(experts), "--seq", str(args.seq)]
    cmd += ["--steps", str(args.steps), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        return (done.stderr.strip().splitlines() or ["failed"])[-1][:100]
    return json.loads(done.stdout.strip().splitlines()[-1])


def svg_plot(series: dict, xs: list[int], path: str) -> None:
    """Two line charts side by side (step seconds, peak MiB vs experts) as a dependency-free SVG."""
    w, h, pad = 360, 240, 44
    colors = {"grouped LoRA (plugin)": "#1f77b4", "PEFT target_parameters": "#d62728"}
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * w}" height="{h}" font-family="sans-serif" '
        'font-size="11">'
    ]
    for panel, (key, label) in enumerate((("seconds", "step time (s)"), ("mib", "peak added memory (MiB)"))):
        x0 = panel * w
        top = max(max(v[key] for v in pts.values()) for pts in series.values() if pts) * 1.1 or 1

        def px(x, x0=x0):
            return x0 + pad + xs.index(x) * (w - 2 * pad) / max(len(xs) - 1, 1)

        def py(y, top=top):
            return h - pad - y / top * (h - 2 * pad)

        parts.append(f'<text x="{x0 + w / 2}" y="16" text-anchor="middle">{label} vs routed experts</text>')
        parts.append(f'<line x1="{x0 + pad}" y1="{h - pad}" x2="{x0 + w - pad}" y2="{h - pad}" stroke="black"/>')
        parts.append(f'<line x1="{x0 + pad}" y1="{pad}" x2="{x0 + pad}" y2="{h - pad}" stroke="black"/>')
        for x in xs:
            parts.append(f'<text x="{px(x)}" y="{h - pad + 14}" text-anchor="middle">{x}</text>')
        for frac in (0.5, 1.0):
            value = top * frac / 1.1
            parts.append(f'<text x="{x0 + pad - 4}" y="{py(value)}" text-anchor="end">{value:.3g}</text>')
        for row, (name, pts) in enumerate(series.items()):
            line = " ".join(f"{px(x)},{py(pts[x][key])}" for x in xs if x in pts)
            parts.append(f'<polyline points="{line}" fill="none" stroke="{colors[name]}" stroke-width="2"/>')
            parts.append(f'<text x="{x0 + pad + 6}" y="{pad + 12 * row}" fill="{colors[name]}">{name}</text>')
    parts.append("</svg>")
    Path(path).write_text("\n".join(parts) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--point", nargs=3, metavar=("METHOD", "BASE", "EXPERTS"), help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sweep", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--out", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    if args.point:
        method, base, experts = args.point
        print(json.dumps(measure(method, base, int(experts), args.seq, args.steps, args.threads)))
        return

    start = source_id()
    command = "python benchmarks/bench_expert_lora.py"
    command += (f" --out {args.out}" if args.out else "") + (f" --plot {args.plot}" if args.plot else "")
    lines = [
        "# One LoRA training step on the routed experts: grouped LoRA vs PEFT target_parameters (CPU)",
        "",
        f"Command: `{command}`",
        "",
        environment(args.threads).replace("fp32, batch 1, use_cache=False, logits_to_keep=1.", "fp32 training step."),
        f"Batch 1 x {args.seq} tokens, median of {args.steps} steps after one warm-up, each point in a fresh process.",
        "",
        "| experts | base | method | step s | tokens/s | peak added MiB | PEFT / plugin time | PEFT / plugin memory |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    series = {"grouped LoRA (plugin)": {}, "PEFT target_parameters": {}}
    points = [(e, "dense") for e in args.sweep] + [(64, "fp4")]
    for experts, base in points:
        ours = run_point("grouped", base, experts, args)
        theirs = run_point("peft", base, experts, args) if base == "dense" else "PEFT cannot target a quantized bank"
        for name, res in (("grouped LoRA (plugin)", ours), ("PEFT target_parameters", theirs)):
            if isinstance(res, str):
                lines.append(f"| {experts} | {base} | {name} | n/a | | | | ({res}) |")
                continue
            mib = res["peak_added"] / 2**20
            if base == "dense":
                series[name][experts] = {"seconds": res["seconds"], "mib": mib}
            ratio = ""
            if name.startswith("PEFT") and not isinstance(ours, str):
                ratio = (
                    f"{res['seconds'] / ours['seconds']:.1f}x | {res['peak_added'] / max(ours['peak_added'], 1):.1f}x"
                )
            else:
                ratio = " | "
            lines.append(
                f"| {experts} | {base} | {name} | {res['seconds']:.3f} | {args.seq / res['seconds']:.0f} | "
                f"{mib:.1f} | {ratio} |"
            )
    if args.plot:
        svg_plot(series, args.sweep, args.plot)
        lines += [
            "",
            f"Plot: `{args.plot}` (step time and peak added memory vs number of routed experts, dense base).",
        ]
    emit(lines, start, source_id(), args.out)


if __name__ == "__main__":
    main()
