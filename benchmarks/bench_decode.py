"""CPU decode benchmark: ms/token of the plugin `modeling_deepseek_v4.DeepseekV4ExtForCausalLM` vs native
`transformers.DeepseekV4ForCausalLM`, same weights, tiny config of `bench_prefill.py`, fp32 (performance.md §0).

Command (about 10 minutes on a 2-vCPU VM):

    python benchmarks/bench_decode.py --out benchmarks/results_decode.md

Each (mode, context) runs in a fresh subprocess (`--worker plugin 8192`): one prefill of the context with a cache
(plugin: `DeepseekV4Cache`; native: `use_cache=True`), then `--warmup` (4) + `--steps` (32) greedy one-token steps
`model(next_token, cache=cache)` (`past_key_values=` before transformers 5.24); the median step is reported. A
native prefill out of memory (address space capped at 80% of MemAvailable) or longer than `--prefill-limit-s` is
recorded as "OOM" / "skipped".
Rows measured only when the package supports them at run time (else "not available in this version"):
- MTP: `generate(ids, max_new_tokens=32, do_sample=False, use_mtp=True)`; a streamer timestamps each accepted block:
  ms/token = (last - first new token) / tokens after the first, so the prefill is left out (total / tokens and a
  plain greedy `generate` are listed under the table); acceptance rate from `model.last_mtp_stats` when present.
- compiled: `cache_implementation="static"`'s `DeepseekV4StaticCache`, eager prefill, then the decode step compiled
  with `model.model.compile_decode()` (inductor, `fullgraph=True`); the warm-up steps include the compilation.
- MTP acceptance is measured after training only the `mtp.*` block for `--mtp-train-steps` (60) Adam steps on the
  model's own greedy continuation of the context (the drafter learns to predict what the main model will say).
"""

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time

from bench_prefill import GIB, TINY, build_model, emit, environment, source_id

MODES = ("plugin", "native", "mtp", "compiled")
LABELS = ("plugin eager", "native transformers", "plugin + MTP speculation", "plugin compiled + static cache")
LABELS = dict(zip(MODES, LABELS))
NOT_AVAILABLE = "not available in this version"


def static_cache_class():
    try:
        from modeling_deepseek_v4.static_cache import DeepseekV4StaticCache
    except ImportError:
        return None
    return DeepseekV4StaticCache


def train_mtp(model, ids, steps: int, tail: int = 160) -> None:
    """Briefly train only the MTP block to predict the main model's own greedy continuation of `ids` (t + 2
    targets), on the last `tail` positions (the block attends to a sliding window only); the main model is frozen."""
    import torch

    from modeling_deepseek_v4.batch_meta import BatchMeta

    with torch.inference_mode(False):
        with torch.no_grad():
            seq = model.generate(ids, max_new_tokens=96, do_sample=False).clone()
            streams = model.model(seq, use_cache=False, return_streams=True).last_streams[:, -tail - 1 : -1].clone()
        nxt, target = seq[:, -tail:], seq[:, -tail + 1 :]
        block = model.model.mtp[0]
        params = list(block.parameters())
        opt = torch.optim.Adam(params, lr=3e-3)
        lengths = torch.full((1,), tail, dtype=torch.long)
        meta = BatchMeta(torch.zeros_like(lengths), lengths, tail, model.model.rope_tables)
        embeds = model.model.embed_tokens(nxt).detach()
        with torch.enable_grad():
            for _ in range(steps):
                hidden, _ = block(streams, embeds, meta, nxt)
                logits = model.lm_head(hidden)[:, :-1]
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
                opt.zero_grad()
                loss.backward()
                opt.step()


def greedy_steps(step, logits, cache, n: int) -> list[float]:
    from modeling_deepseek_v4.compat import cache_kwargs

    times, token = [], logits[:, -1:].argmax(-1)
    for _ in range(n):
        start = time.perf_counter()
        logits = step(token, use_cache=True, **cache_kwargs(cache)).logits
        token = logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - start)
    return times


class StepClock:
    """`generate` streamer: time and token count of every `put` (the prompt first, then each accepted block)."""

    def __init__(self):
        self.start, self.events = time.perf_counter(), []

    def put(self, value) -> None:
        self.events.append((time.perf_counter() - self.start, value.numel()))

    def end(self) -> None:
        self.total = time.perf_counter() - self.start


def run_generate(model, ids, new: int, use_mtp: bool) -> tuple[StepClock, object]:
    clock = StepClock()
    mask = ids.new_ones(ids.shape)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=new, do_sample=False, use_mtp=use_mtp, streamer=clock
    )
    return clock, out[:, ids.shape[1] :]


def decode_time(clock: StepClock) -> float:
    """Seconds per token after the first new one (the first comes with the prefill)."""
    return (clock.events[-1][0] - clock.events[1][0]) / max(sum(n for _, n in clock.events[2:]), 1)


def measure_mtp(model, ids, args) -> dict:
    try:
        run_generate(model, ids[:, :64], 8, use_mtp=True)  # warm-up, and the support check
    except (TypeError, ValueError) as e:
        if "use_mtp" in str(e):
            return dict(error=NOT_AVAILABLE)
        raise
    if args.mtp_train_steps:
        train_mtp(model, ids, args.mtp_train_steps)
    clock, tokens = run_generate(model, ids, args.steps, use_mtp=True)
    stats = getattr(model, "last_mtp_stats", None)
    plain, greedy = run_generate(model, ids, args.steps, use_mtp=False)
    if stats is not None:  # e.g. an MTPStats dataclass with `acceptance_rate` / `tokens_per_step` properties
        fields = dict(stats) if isinstance(stats, dict) else dict(getattr(stats, "__dict__", {"repr": repr(stats)}))
        extra = {k: getattr(stats, k) for k in ("acceptance_rate", "tokens_per_step") if hasattr(stats, k)}
        stats = json.loads(json.dumps(dict(fields, **extra), default=str))
    n = tokens.shape[1]
    same = n == greedy.shape[1] and bool((tokens == greedy).all())
    result = dict(prefill=clock.events[1][0], total=clock.total, tokens=n, median=decode_time(clock), stats=stats)
    return dict(result, same=same, plain=decode_time(plain), plain_total=plain.total)


def worker(mode: str, context: int, args: argparse.Namespace) -> None:
    import torch

    import modeling_deepseek_v4 as plugin
    from modeling_deepseek_v4.compat import cache_kwargs, cache_of

    torch.set_num_threads(args.threads)
    if mode == "native" and args.mem_limit_gib > 0:  # an allocator error instead of the system OOM killer
        limit = int(args.mem_limit_gib * GIB)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    cls = static_cache_class() if mode == "compiled" else None
    model = build_model("native" if mode == "native" else "plugin")
    ids = torch.randint(0, TINY["vocab_size"], (1, context), generator=torch.Generator().manual_seed(1))
    result = dict(mode=mode, context=context, threads=torch.get_num_threads())

    def on_alarm(*_):
        raise TimeoutError

    signal.signal(signal.SIGALRM, on_alarm)
    try:
        with torch.inference_mode():
            if mode == "compiled" and cls is None:
                result["error"] = NOT_AVAILABLE
            elif mode == "mtp":
                result.update(measure_mtp(model, ids, args))
            else:
                cache = None
                if mode == "plugin":
                    cache = plugin.DeepseekV4Cache(model.config)
                elif mode == "compiled":
                    cache = cls(model.config, max_cache_len=context + args.warmup + args.steps + 8)
                signal.alarm(int(args.prefill_limit_s))
                start = time.perf_counter()
                out = model(ids, use_cache=True, logits_to_keep=1, **cache_kwargs(cache))
                result["prefill"] = time.perf_counter() - start
                signal.alarm(0)
                if mode == "compiled":
                    model.model.compile_decode()
                step = model
                cache = cache_of(out)
                times = greedy_steps(step, out.logits, cache, args.warmup + args.steps)
                result["warmup"], result["times"] = times[: args.warmup], times[args.warmup :]
                result["median"] = statistics.median(result["times"])
    except TimeoutError:
        result["error"] = f"skipped (> {args.prefill_limit_s:.0f} s prefill)"
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and "alloc" not in str(e):
            raise
        result["error"] = "OOM"
    result["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print("RESULT " + json.dumps(result), flush=True)


def measure(mode: str, context: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, str(context), "--steps", str(args.steps)]
    cmd += [
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
        "--mtp-train-steps",
        str(args.mtp_train_steps),
    ]
    cmd += ["--prefill-limit-s", str(args.prefill_limit_s), "--mem-limit-gib", str(args.mem_limit_gib)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.prefill_limit_s + args.timeout)
    except subprocess.TimeoutExpired:
        return dict(mode=mode, context=context, error="timeout")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT ") :]), load=os.getloadavg()[0])
    oom = proc.returncode == -9 or any(s in proc.stderr for s in ("MemoryError", "can't allocate memory"))
    tail = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
    print(f"  {mode} {context}: {'OOM' if oom else 'failed'} ({tail[0][:200]})", file=sys.stderr)
    return dict(mode=mode, context=context, error="OOM" if oom else f"failed ({tail[0][:80]})")


def ms(r: dict | None) -> str:
    if r is None or "error" in r:
        return "-" if r is None else r["error"]
    rate = (r.get("stats") or {}).get("acceptance_rate")
    return f"{1000 * r['median']:.1f}" + ("" if rate is None else f" (acceptance {float(rate):.2f})")


def ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or "error" in a or "error" in b:
        return None
    return a["median"] / b["median"]


def fx(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}x"


def verdict(value: float | None, ok: bool) -> str:
    return "n/a" if value is None else ("PASS" if ok else "FAIL")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps (median reported)")
    ap.add_argument("--warmup", type=int, default=4, help="decode steps before the timed ones")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-native", action="store_true")
    ap.add_argument("--mtp-train-steps", type=int, default=60, help="train only mtp.* this long before measuring")
    ap.add_argument("--prefill-limit-s", type=float, default=300.0, help="longer prefills are recorded as skipped")
    with open("/proc/meminfo") as f:  # native workers' address space: 80% of MemAvailable
        mem_limit = round(0.8 * next(int(ln.split()[1]) for ln in f if ln.startswith("MemAvailable")) / 2**20, 1)
    ap.add_argument("--mem-limit-gib", type=float, default=mem_limit, help="native workers' address space; 0: none")
    ap.add_argument("--timeout", type=float, default=1800.0, help="per-subprocess timeout beyond the prefill limit")
    ap.add_argument("--out", help="also write the markdown to this file")
    ap.add_argument("--worker", nargs=2, metavar=("MODE", "CONTEXT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args)
        return

    source, load_start = source_id(), os.getloadavg()
    modes = [m for m in MODES if not (args.skip_native and m == "native")]
    rows: dict[str, dict[int, dict]] = {m: {} for m in modes}
    for context in args.contexts:
        for mode in modes:
            if rows[mode] and all(r.get("error") == NOT_AVAILABLE for r in rows[mode].values()):
                rows[mode][context] = dict(error=NOT_AVAILABLE)  # detected once, no need to rebuild the model
                continue
            print(f"running {mode} {context} ...", file=sys.stderr, flush=True)
            rows[mode][context] = measure(mode, context, args)
    load_end = os.getloadavg()

    ctx = args.contexts
    lines = [
        "## Decode, tiny config, CPU: ms/token",
        "",
        "Command: `python " + " ".join(["benchmarks/bench_decode.py"] + sys.argv[1:]) + "`",
        "",
        environment(args.threads).split(" fp32,")[0] + " fp32, batch 1, greedy, `torch.inference_mode()`.",
        f"Median time of {args.steps} one-token greedy steps after {args.warmup} warm-up steps, following a prefill"
        f" of the context with the cache. MTP row: mean ms/token of `generate(..., max_new_tokens={args.steps})` after"
        " its first token (after a warm-up `generate` on 64 tokens)."
        f" 1-min load average at start {load_start[0]:.2f}, at end {load_end[0]:.2f}.",
        "",
        "| ms/token | " + " | ".join(f"{c // 1024}K context" if c % 1024 == 0 else f"{c} tokens" for c in ctx) + " |",
        "|---|" + "---|" * len(ctx),
    ]
    for mode in modes:
        lines.append(f"| {LABELS[mode]} | " + " | ".join(ms(rows[mode].get(c)) for c in ctx) + " |")
    if "native" in rows:
        cells = [ratio(rows["native"].get(c), rows["plugin"].get(c)) for c in ctx]
        lines.append("| speed-up native/plugin eager | " + " | ".join(fx(x, 1) for x in cells) + " |")

    p_growth = ratio(rows["plugin"].get(32768), rows["plugin"].get(1024))
    c_speed = ratio(rows.get("native", {}).get(8192), rows["compiled"].get(8192))
    lines += [
        "",
        "| target | measured | result |",
        "|---|---|---|",
        f"| plugin decode at 32K within 1.5x of 1K | {fx(p_growth)} | {verdict(p_growth, (p_growth or 9) <= 1.5)} |",
        f"| compiled decode >= 2x faster than native at 8K | {fx(c_speed)} | {verdict(c_speed, (c_speed or 0) >= 2)}"
        " |",
        "",
        "Per cell: prefill (s), peak RSS (GiB), 1-min load average after the cell, warm-up steps and min / max of the"
        " timed steps (ms); `noisy`: slowest / fastest timed step > 2.",
        "",
    ]
    for mode in modes:
        for c, r in rows[mode].items():
            if "error" in r:
                continue
            info = f"- {mode} {c}: prefill {r['prefill']:.2f} s, peak {r['peak'] / GIB:.2f} GiB, load {r['load']:.2f}"
            if "times" in r:
                t = [1000 * x for x in r["times"]]
                noisy = " noisy" if max(t) > 2 * min(t) else ""
                info += f"; warm-up {', '.join(f'{1000 * x:.1f}' for x in r['warmup'])}; {min(t):.1f} / {max(t):.1f}"
                lines.append(info + noisy)
            else:
                info += f"; generate total {r['total']:.2f} s / {r['tokens']} tokens"
                info += f" = {1000 * r['total'] / r['tokens']:.1f} ms/token incl. prefill; plain greedy generate:"
                info += f" {1000 * r['plain']:.1f} ms/token after the first token (total {r['plain_total']:.2f} s)"
                lines.append(info + f"; same tokens as greedy: {r['same']}; last_mtp_stats: {r['stats']}")
    emit(lines, source, source_id(), args.out)


if __name__ == "__main__":
    main()
