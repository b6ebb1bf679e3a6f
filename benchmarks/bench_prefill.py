"""CPU prefill benchmark: plugin `modeling_deepseek_v4.DeepseekV4ExtForCausalLM` vs native
`transformers.DeepseekV4ForCausalLM`, same weights, tiny config, fp32 (performance.md §0, §1.1).

Command (about 10 minutes on a 2-vCPU VM):

    python benchmarks/bench_prefill.py --out benchmarks/results_prefill.md

Every (implementation, size) runs in a fresh subprocess of this script (`--worker plugin 8192`), which builds the
model, runs one warm-up forward and `--repeats` (5) timed ones (batch 1, `use_cache=False`, `logits_to_keep=1`, under
`torch.inference_mode()`), and prints one JSON line: times, `ru_maxrss` (peak RSS of the process) and the RSS just
before the first forward (baseline). A warm-up longer than `--long-run-s` (30 s) cuts the timed runs to 3 (plugin +
native sizes) or 1 (plugin-only sizes). The plugin model is built from seed 0; native loads its state dict minus
the `.mtp.` keys with `strict=True`. An OOM (SIGKILL or allocator error) or another worker failure is recorded in
the table as "OOM" / "failed" instead of stopping the run.

Threads: `torch.set_num_threads(2)` (`--threads`). On the 2-vCPU VM, 2 threads were ~1.6x faster than 1 for the
plugin at 4K (medians 0.58-0.77 s vs 0.99-1.20 s, 4 processes each), but some 2-thread runs stall for seconds on that
VM; the median and the raw times printed under the table show it.
"""

import argparse
import gc
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

CSA, HCA = "compressed_sparse_attention", "heavily_compressed_attention"
TINY = dict(
    hidden_size=256,
    num_hidden_layers=4,
    compress_ratios=[32, 4, 32, 4, 0],  # HCA, CSA, HCA, CSA (+ MTP sliding)
    compress_rates={CSA: 4, HCA: 32},
    num_attention_heads=8,
    head_dim=64,
    qk_rope_head_dim=16,
    q_lora_rank=128,
    o_groups=2,
    o_lora_rank=64,
    index_n_heads=4,
    index_head_dim=32,
    index_topk=16,
    sliding_window=16,
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=128,
    vocab_size=1024,
    num_hash_layers=1,
)
GIB = 1024**3


def emit(lines: list[str], source_at_start: str, source_at_end: str, out: str | None) -> None:
    """Print the report (warning when the package's sources changed during the run) and write it to `out`."""
    if source_at_end.split("sources")[-1] != source_at_start.split("sources")[-1]:
        lines += ["", f"WARNING: the package changed during the run (start: {source_at_start}; end: {source_at_end})."]
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)


def build_model(impl: str):
    import torch
    import transformers

    import modeling_deepseek_v4 as plugin

    torch.manual_seed(0)
    config = plugin.DeepseekV4ExtConfig(**TINY)
    model = plugin.DeepseekV4ExtForCausalLM(config).eval()
    if impl == "native":
        state = {k: v for k, v in model.state_dict().items() if ".mtp." not in k}
        native = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config.from_dict(config.to_dict()))
        native.load_state_dict(state, strict=True)
        model = native.eval()
    return model.float()


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(impl: str, tokens: int, args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    model = build_model(impl)
    ids = torch.randint(0, TINY["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(1))
    gc.collect()
    baseline = current_rss()

    def forward() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        return time.perf_counter() - start

    warmup = forward()
    repeats = min(args.repeats, args.long_repeats) if warmup > args.long_run_s else args.repeats
    times = [forward() for _ in range(repeats)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    result = dict(impl=impl, tokens=tokens, threads=torch.get_num_threads(), warmup=warmup, times=times)
    print("RESULT " + json.dumps(dict(result, peak=peak, baseline=baseline)), flush=True)


def measure(impl: str, tokens: int, args: argparse.Namespace, long_repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, str(tokens), "--repeats", str(args.repeats)]
    cmd += ["--threads", str(args.threads), "--long-run-s", str(args.long_run_s), "--long-repeats", str(long_repeats)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(impl=impl, tokens=tokens, error="timeout")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT ") :])
            res["median"] = statistics.median(res["times"])
            return res
    oom = proc.returncode == -9 or any(s in proc.stderr for s in ("MemoryError", "can't allocate memory"))
    tail = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
    print(f"  {impl} {tokens}: {'OOM' if oom else 'failed'} ({tail[0][:200]})", file=sys.stderr)
    return dict(impl=impl, tokens=tokens, error="OOM" if oom else "failed")


def fmt_time(r: dict, repeats: int) -> str:
    if "error" in r:
        return r["error"]
    n = len(r["times"])
    return f"{r['median']:.3f}" + (f" ({n} run{'s' * (n > 1)})" if n != repeats else "")


def fmt_mem(r: dict) -> str:
    if "error" in r:
        return r["error"]
    return f"{r['peak'] / GIB:.3f} (+{(r['peak'] - r['baseline']) / GIB:.3f})"


def ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    if not a or not b or "error" in a or "error" in b:
        return None
    return a[key] / b[key]


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}x"


def source_id() -> str:
    """Git commit and a hash of the package's .py files: the package may be edited while the benchmark runs."""
    import modeling_deepseek_v4

    pkg = os.path.dirname(modeling_deepseek_v4.__file__)
    digest = hashlib.sha1()
    for name in sorted(n for n in os.listdir(pkg) if n.endswith(".py")):
        with open(os.path.join(pkg, name), "rb") as f:
            digest.update(f.read())
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=pkg, capture_output=True, text=True).stdout
    return f"commit {head.strip() or 'unknown'}, sources sha1 {digest.hexdigest()[:12]}"


def environment(threads: int) -> str:
    import torch
    import transformers

    import modeling_deepseek_v4

    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "unknown")
    return (
        f"torch {torch.__version__}, transformers {transformers.__version__}, modeling_deepseek_v4 "
        f"{modeling_deepseek_v4.__version__} ({source_id()}), Python {platform.python_version()}; CPU: {cpu} "
        f"({os.cpu_count()} logical CPUs); torch.set_num_threads({threads}); fp32, batch 1, use_cache=False, "
        "logits_to_keep=1."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--plugin-only-sizes", type=int, nargs="*", default=[32768, 65536])
    ap.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up (median reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--long-run-s", type=float, default=30.0, help="warm-up longer: 3 runs (plugin-only: 1)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="per-subprocess timeout (s)")
    ap.add_argument("--out", help="also write the markdown to this file")
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "TOKENS"), help=argparse.SUPPRESS)
    ap.add_argument("--long-repeats", type=int, default=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args)
        return

    rows: dict[int, dict] = {}
    source = source_id()
    for tokens in args.sizes:
        for impl in ("plugin", "native"):
            print(f"running {impl} {tokens} ...", file=sys.stderr, flush=True)
            rows.setdefault(tokens, {})[impl] = measure(impl, tokens, args, long_repeats=3)
    for tokens in args.plugin_only_sizes:
        print(f"running plugin {tokens} ...", file=sys.stderr, flush=True)
        rows.setdefault(tokens, {})["plugin"] = measure("plugin", tokens, args, long_repeats=1)

    lines = [
        "## Prefill, tiny config, CPU: plugin vs native",
        "",
        "Command: `python " + " ".join(["benchmarks/bench_prefill.py"] + sys.argv[1:]) + "`",
        "",
        environment(args.threads),
        f"Time: median of {args.repeats} runs after 1 warm-up; when the warm-up takes > {args.long_run_s:.0f} s,"
        " 3 runs (paired sizes) or 1 run (plugin-only sizes), shown in brackets. Peak RSS: `ru_maxrss` of a fresh"
        " subprocess per cell, GiB; in brackets the growth over the RSS just before the first forward.",
        "",
        "| tokens | plugin time (s) | plugin peak RSS (GiB) | native time (s) | native peak RSS (GiB) "
        "| speed-up (native/plugin) | memory ratio (native/plugin) |",
        "|---|---|---|---|---|---|---|",
    ]
    for tokens in sorted(rows):
        p, n = rows[tokens].get("plugin"), rows[tokens].get("native")
        cells = [
            fmt_time(p, args.repeats),
            fmt_mem(p),
            fmt_time(n, args.repeats) if n else "-",
            fmt_mem(n) if n else "-",
        ]
        cells += [fmt_ratio(ratio(n, p, "median")), fmt_ratio(ratio(n, p, "peak"))]
        lines.append(f"| {tokens // 1024}K | " + " | ".join(cells) + " |")

    p8, n8 = rows.get(8192, {}).get("plugin"), rows.get(8192, {}).get("native")
    p64 = rows.get(65536, {}).get("plugin")
    t_growth, m_growth = ratio(p64, p8, "median"), ratio(p64, p8, "peak")
    speed, mem = ratio(n8, p8, "median"), ratio(n8, p8, "peak")
    ok64 = p64 is not None and "error" not in p64
    peak64 = f"{p64['peak'] / GIB:.2f} GiB" if ok64 else (p64 or {}).get("error", "not run")

    def verdict(value: float | None, ok: bool) -> str:
        return "n/a" if value is None else ("PASS" if ok else "FAIL")

    lines += [
        "",
        f"Growth 8K -> 64K (plugin): time {fmt_ratio(t_growth)}, peak RSS {fmt_ratio(m_growth)}.",
        "",
        "| target | measured | result |",
        "|---|---|---|",
        f"| 8K: >= 10x less peak memory than native | {fmt_ratio(mem)} | {verdict(mem, (mem or 0) >= 10)} |",
        f"| 8K: >= 5x faster than native | {fmt_ratio(speed)} | {verdict(speed, (speed or 0) >= 5)} |",
        f"| 64K completes under 4 GiB peak | {peak64} | "
        f"{verdict(1.0 if p64 else None, ok64 and p64['peak'] < 4 * GIB)} |",
        f"| 8K -> 64K peak memory grows <= ~8x | {fmt_ratio(m_growth)} | {verdict(m_growth, (m_growth or 99) <= 8)} |",
        f"| 8K -> 64K time grows <= ~16x | {fmt_ratio(t_growth)} | {verdict(t_growth, (t_growth or 99) <= 16)} |",
    ]
    lines += ["", "Raw times (s), warm-up first; `noisy`: slowest / fastest timed run > 2.", ""]
    for tokens in sorted(rows):
        for impl, r in rows[tokens].items():
            if "error" not in r:
                runs = ", ".join(f"{t:.3f}" for t in r["times"])
                noisy = " noisy" if max(r["times"]) > 2 * min(r["times"]) else ""
                lines.append(f"- {impl} {tokens}: {r['warmup']:.3f} | {runs}{noisy}")
    emit(lines, source, source_id(), args.out)


if __name__ == "__main__":
    main()
