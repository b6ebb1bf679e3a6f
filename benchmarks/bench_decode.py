"""CPU decode benchmark: ms/token of the plugin `modeling_deepseek_v4.DeepseekV4ExtForCausalLM` vs native
`transformers.DeepseekV4ForCausalLM`, same weights, tiny config of `bench_prefill.py`, fp32 (performance.md §0).

Command (about 15 minutes on an idle 2-vCPU VM; `--modes dspark --contexts 1024` for one cell):

    python benchmarks/bench_decode.py --out benchmarks/results_decode.md

Each (mode, context) runs in a fresh subprocess (`--worker plugin 8192`): one prefill of the context with a cache
(plugin: `DeepseekV4Cache`; native: `use_cache=True`), then `--warmup` (4) + `--steps` (32) greedy one-token steps
`model(next_token, cache=cache)` (`past_key_values=` before transformers 5.24); the median step is reported. A
native prefill out of memory (address space capped at 80% of MemAvailable) or longer than `--prefill-limit-s` is
recorded as "OOM" / "skipped".
Rows measured only when the package supports them at run time (else "not available in this version"):
- MTP / DSpark: `generate(ids, max_new_tokens=32, do_sample=False, use_mtp=True / use_dspark=True)`; a streamer
  timestamps each accepted block: ms/token = (last - first new token) / tokens after the first, so the prefill is
  left out (total / tokens and a plain greedy `generate` are listed under the table); acceptance rate and tokens per
  target forward from `model.last_mtp_stats` / `last_dspark_stats`. A run whose speculative tokens differ from plain
  greedy prints FAIL and exits nonzero: speed over wrong tokens is no result.
- compiled: `cache_implementation="static"`'s `DeepseekV4StaticCache`, eager prefill, then the decode step compiled
  with `model.model.compile_decode()` (inductor, `fullgraph=True`); the warm-up steps include the compilation.
- Drafters are trained briefly, then measured on a prompt they never saw: the measured prompt is seed 1, the
  training set the model's own greedy continuations (`--train-new`, 96 tokens) of `--train-prompts` (48) other random
  prompts of `--train-len` (256) tokens, seeds 2, 3, ... MTP: only `mtp.*`, `--mtp-train-steps` (60) Adam steps, loss
  on the generated tokens only. DSpark (`build_dspark_model`: the same seed-0 main weights plus a 3-stage drafter,
  W = 5, last 3 main layers tapped, Markov rank 16): only `model.model.dspark`, `--dspark-train-steps` (400) Adam
  steps of `train_dspark`, which drafts exactly as `generate(use_dspark=True)` does, with teacher forcing.
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

MODES = ("plugin", "native", "mtp", "dspark", "compiled")
LABELS = ("plugin eager", "native transformers", "plugin + MTP speculation", "plugin + DSpark speculation")
LABELS += ("plugin compiled + static cache",)
LABELS = dict(zip(MODES, LABELS))
NOT_AVAILABLE = "not available in this version"


def static_cache_class():
    try:
        from modeling_deepseek_v4.static_cache import DeepseekV4StaticCache
    except ImportError:
        return None
    return DeepseekV4StaticCache


def training_data(model, args):
    """The drafters' training set: `--train-prompts` random prompts of `--train-len` tokens (seeds 2, 3, ...; the
    measured prompt is seed 1, so it is held out) and the model's own greedy continuations of `--train-new` tokens.
    Returns (sequences `[N, len + new]`, prompt length)."""
    import torch

    vocab, n = TINY["vocab_size"], args.train_len
    prompts = [
        torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(2 + i))
        for i in range(args.train_prompts)
    ]
    prompts = torch.cat(prompts)
    with torch.no_grad():
        seq = model.generate(
            prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.train_new, do_sample=False
        )
    return seq.clone(), n


def frozen_but(model, module) -> list:
    """Freeze every parameter except `module`'s (the main weights stay what the other rows measure)."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(module.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def train_mtp(model, args) -> dict:
    """Briefly train only the MTP block to predict the main model's greedy continuations of the training prompts (t + 2
    targets; the block attends to a sliding window only, so the last `tail` positions are enough). Loss only on
    positions the model generated (a prompt token is noise the block cannot predict). Returns the training summary."""
    import torch

    from modeling_deepseek_v4.batch_meta import BatchMeta

    with torch.inference_mode(False):
        seq, n = training_data(model, args)
        tail = min(seq.shape[1] - 1, args.train_new + 64)
        with torch.no_grad():
            streams = model.model(seq, use_cache=False, return_streams=True).last_streams[:, -tail - 1 : -1].clone()
        nxt, target = seq[:, -tail:], seq[:, -tail + 1 :].clone()
        target[:, : max(n - (seq.shape[1] - tail + 1), 0)] = -100  # prompt tokens: ignored
        block = model.model.mtp[0]
        opt = torch.optim.Adam(frozen_but(model, block), lr=args.lr)
        lengths = torch.full((seq.shape[0],), tail, dtype=torch.long)
        meta = BatchMeta(torch.zeros_like(lengths), lengths, tail, model.model.rope_tables)
        embeds = model.model.embed_tokens(nxt).detach()
        losses = []
        with torch.enable_grad():
            for _ in range(args.mtp_train_steps):
                hidden, _ = block(streams, embeds, meta, nxt)
                logits = model.lm_head(hidden)[:, :-1]
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
    return dict(sequences=seq.shape[0], steps=len(losses), loss_first=losses[0], loss_last=losses[-1])


def train_dspark(model, args) -> dict:
    """Briefly train only `model.model.dspark` to imitate the target's greedy continuations of the training prompts,
    the way `generate(use_dspark=True)` drafts (dspark_drafting.py): taps = hc-average of the target layers' outputs
    (forward hooks over the whole sequence), ring = `context_keys` of the last `window` committed positions <= p,
    `draft_block` with anchor = token p + 1 and a teacher-forcing `pick` (the Markov head sees the true previous
    token), cross-entropy of its W rows against tokens p + 2 .. p + W + 1. One p per step, shared by the batch of
    training sequences (same positions, hence one ring and one rope table); the confidence head is not trained."""
    import torch

    from modeling_deepseek_v4.dspark_drafting import DSparkRing, context_keys, draft_block

    config, drafter = model.config, model.model.dspark
    width, window, noise = config.dspark_block_size, config.sliding_window, config.dspark_noise_token_id
    with torch.inference_mode(False):
        seq, n = training_data(model, args)
        taps, handles = {}, []
        for i in config.dspark_target_layer_ids:
            hook = lambda module, inputs, output, i=i: taps.__setitem__(i, output[0].detach().mean(dim=2))  # noqa: E731
            handles.append(model.model.layers[i].register_forward_hook(hook))
        try:
            with torch.no_grad():
                model.model(seq, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        taps = torch.cat([taps[i] for i in config.dspark_target_layer_ids], dim=-1)

        def cos_sin(positions):
            cos, sin = model.model.rope_tables.cos_sin("main", positions)
            return cos.unsqueeze(0), sin.unsqueeze(0)

        # p + 1 (the anchor) is the first generated token at the earliest, p + W + 1 the last one at the latest.
        anchors = torch.randint(
            n - 1, seq.shape[1] - width - 1, (args.dspark_train_steps,), generator=torch.Generator().manual_seed(0)
        )
        opt = torch.optim.Adam(frozen_but(model, drafter), lr=args.lr)
        losses, hits = [], []
        with torch.enable_grad():
            for p in anchors.tolist():
                positions = torch.arange(max(p - window + 1, 0), p + 1)
                ring = DSparkRing(len(drafter.layers), window)
                ring.write(context_keys(drafter, taps[:, positions], *cos_sin(positions)), positions)
                block_ids = torch.full((seq.shape[0], width), noise, dtype=torch.long)
                block_ids[:, 0] = seq[:, p + 1]
                target = seq[:, p + 2 : p + width + 2]
                _, logits, _ = draft_block(
                    drafter,
                    model.model.embed_tokens(block_ids),
                    ring,
                    *cos_sin(torch.arange(p + 1, p + width + 1)),
                    seq[:, p + 1],
                    model.lm_head,
                    lambda row, i, target=target: target[:, i],
                )
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
                hits.append((logits.argmax(-1) == target).float().mean().item())
    k = max(len(losses) // 10, 1)  # the last tenth: teacher-forced top-1 accuracy on the training set
    return dict(
        sequences=seq.shape[0],
        steps=len(losses),
        loss_first=losses[0],
        loss_last=sum(losses[-k:]) / k,
        train_top1=sum(hits[-k:]) / k,
    )


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


def run_generate(model, ids, new: int, kind: str | None) -> tuple[StepClock, object]:
    clock = StepClock()
    mask = ids.new_ones(ids.shape)
    spec = {"mtp": dict(use_mtp=True), "dspark": dict(use_dspark=True)}.get(kind, {})
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, streamer=clock, **spec)
    return clock, out[:, ids.shape[1] :]


def decode_time(clock: StepClock) -> float:
    """Seconds per token after the first new one (the first comes with the prefill)."""
    return (clock.events[-1][0] - clock.events[1][0]) / max(sum(n for _, n in clock.events[2:]), 1)


def build_dspark_model():
    """The benchmark's model with a DSpark drafter (3 stages, W = 5, the last 3 main layers tapped, Markov rank 16)
    in place of the MTP block, carrying the main weights of `build_model("plugin")` (seed 0, as every other row);
    the drafter keeps its seed-0 init. None when this version of the package has no DSpark."""
    import torch

    import modeling_deepseek_v4 as plugin

    main, layers = build_model("plugin"), TINY["num_hidden_layers"]
    extra = dict(dspark_num_stages=3, dspark_block_size=5, dspark_noise_token_id=TINY["vocab_size"] - 1)
    extra.update(dspark_target_layer_ids=list(range(layers - 3, layers)), dspark_markov_rank=16)
    torch.manual_seed(0)
    config = dict(TINY, compress_ratios=TINY["compress_ratios"][:layers] + [0, 0, 0], **extra)
    model = plugin.DeepseekV4ExtForCausalLM(plugin.DeepseekV4ExtConfig(**config)).eval().float()
    if getattr(model.model, "dspark", None) is None:
        return None
    state = {k: v for k, v in main.state_dict().items() if ".mtp." not in k}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("model.dspark.") for k in missing):
        raise RuntimeError(f"main weights do not transfer: missing {missing}, unexpected {unexpected}")
    return model


def stats_dict(stats) -> dict | None:
    if stats is None:
        return None
    fields = {k: getattr(stats, k) for k in ("num_drafted", "num_accepted", "num_steps") if hasattr(stats, k)}
    extra = {k: getattr(stats, k) for k in ("acceptance_rate", "tokens_per_step") if hasattr(stats, k)}
    return json.loads(json.dumps(dict(fields, **extra), default=str))


def measure_speculative(model, ids, args, kind: str) -> dict:
    """Train the drafter (`kind`: "mtp" or "dspark") on the training prompts, then time `generate` with it and plain
    greedy `generate` on the held-out prompt `ids`, and compare their tokens."""
    if kind == "dspark" and model is None:
        return dict(error=NOT_AVAILABLE)
    try:
        run_generate(model, ids[:, :64], 8, kind)  # warm-up, and the support check
    except (TypeError, ValueError) as e:
        if f"use_{kind}" in str(e):
            return dict(error=NOT_AVAILABLE)
        raise
    training = None
    if kind == "mtp" and args.mtp_train_steps:
        training = train_mtp(model, args)
    elif kind == "dspark" and args.dspark_train_steps:
        training = train_dspark(model, args)
    clock, tokens = run_generate(model, ids, args.steps, kind)
    stats = stats_dict(getattr(model, f"last_{kind}_stats", None))
    plain, greedy = run_generate(model, ids, args.steps, None)
    n = tokens.shape[1]
    same = n == greedy.shape[1] and bool((tokens == greedy).all())
    result = dict(prefill=clock.events[1][0], total=clock.total, tokens=n, median=decode_time(clock), stats=stats)
    return dict(result, same=same, plain=decode_time(plain), plain_total=plain.total, training=training)


def worker(mode: str, context: int, args: argparse.Namespace) -> None:
    import torch

    import modeling_deepseek_v4 as plugin
    from modeling_deepseek_v4.compat import cache_kwargs, cache_of

    torch.set_num_threads(args.threads)
    if mode == "native" and args.mem_limit_gib > 0:  # an allocator error instead of the system OOM killer
        limit = int(args.mem_limit_gib * GIB)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    cls = static_cache_class() if mode == "compiled" else None
    model = build_dspark_model() if mode == "dspark" else build_model("native" if mode == "native" else "plugin")
    ids = torch.randint(0, TINY["vocab_size"], (1, context), generator=torch.Generator().manual_seed(1))
    result = dict(mode=mode, context=context, threads=torch.get_num_threads())

    def on_alarm(*_):
        raise TimeoutError

    signal.signal(signal.SIGALRM, on_alarm)
    try:
        with torch.inference_mode():
            if mode == "compiled" and cls is None:
                result["error"] = NOT_AVAILABLE
            elif mode in ("mtp", "dspark"):
                result.update(measure_speculative(model, ids, args, mode))
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
    for name in ("warmup", "threads", "mtp_train_steps", "dspark_train_steps", "train_prompts", "train_len"):
        cmd += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    cmd += ["--train-new", str(args.train_new), "--lr", str(args.lr)]
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
    stats = r.get("stats") or {}
    if "acceptance_rate" not in stats:
        return f"{1000 * r['median']:.1f}"
    rate, per_step = float(stats["acceptance_rate"]), float(stats.get("tokens_per_step", "nan"))
    return f"{1000 * r['median']:.1f} (acceptance {rate:.2f}, {per_step:.2f} tokens/forward)"


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
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--mtp-train-steps", type=int, default=60, help="train only mtp.* this long before measuring")
    ap.add_argument("--dspark-train-steps", type=int, default=400, help="train only the DSpark drafter this long")
    ap.add_argument("--train-prompts", type=int, default=48, help="drafter training prompts (seeds 2, 3, ...)")
    ap.add_argument("--train-len", type=int, default=256, help="tokens per training prompt")
    ap.add_argument("--train-new", type=int, default=96, help="greedy continuation trained on, per prompt")
    ap.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate of the drafters")
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

    source, load_start, wall = source_id(), os.getloadavg(), time.time()
    modes = [m for m in args.modes if not (args.skip_native and m == "native")]
    rows: dict[str, dict[int, dict]] = {m: {} for m in modes}
    for context in args.contexts:
        for mode in modes:
            if rows[mode] and all(r.get("error") == NOT_AVAILABLE for r in rows[mode].values()):
                rows[mode][context] = dict(error=NOT_AVAILABLE)  # detected once, no need to rebuild the model
                continue
            print(f"running {mode} {context} ...", file=sys.stderr, flush=True)
            rows[mode][context] = measure(mode, context, args)
    load_end = os.getloadavg()
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    dirty = "with uncommitted changes" if status.stdout.strip() else "clean"

    ctx = args.contexts
    lines = [
        "## Decode, tiny config, CPU: ms/token",
        "",
        "Command: `python " + " ".join(["benchmarks/bench_decode.py"] + sys.argv[1:]) + "`",
        "",
        environment(args.threads).split(" fp32,")[0] + " fp32, batch 1, greedy, `torch.inference_mode()`.",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(wall))}, working tree {dirty}.",
        f"Median time of {args.steps} one-token greedy steps after {args.warmup} warm-up steps, following a prefill"
        f" of the context with the cache. Speculative rows and the plain `generate` row: mean ms/token of"
        f" `generate(..., max_new_tokens={args.steps})` after its first token (after a warm-up `generate` on 64"
        " tokens), on the held-out prompt (seed 1), by a drafter trained only on the greedy continuations"
        f" ({args.train_new} tokens) of {args.train_prompts} other random prompts of {args.train_len} tokens (seeds 2-"
        f"{args.train_prompts + 1}); tokens/forward: tokens gained per target (verification) forward."
        f" 1-min load average at start {load_start[0]:.2f}, at end {load_end[0]:.2f}; wall time"
        f" {(time.time() - wall) / 60:.1f} min.",
        "",
        "| ms/token | " + " | ".join(f"{c // 1024}K context" if c % 1024 == 0 else f"{c} tokens" for c in ctx) + " |",
        "|---|" + "---|" * len(ctx),
    ]
    spec = [m for m in ("dspark", "mtp") if m in rows]
    for mode in modes:
        lines.append(f"| {LABELS[mode]} | " + " | ".join(ms(rows[mode].get(c)) for c in ctx) + " |")
        if mode == "plugin" and spec:  # plain greedy through the same `generate` loop as the speculative rows
            cells = [next((r for m in spec if "plain" in (r := rows[m].get(c, {}))), None) for c in ctx]
            cells = ["-" if r is None else f"{1000 * r['plain']:.1f} (1 token/forward)" for r in cells]
            lines.append("| plugin plain greedy `generate` | " + " | ".join(cells) + " |")
    if "native" in rows and "plugin" in rows:
        cells = [ratio(rows["native"].get(c), rows["plugin"].get(c)) for c in ctx]
        lines.append("| speed-up native/plugin eager | " + " | ".join(fx(x, 1) for x in cells) + " |")

    p_growth = ratio(rows.get("plugin", {}).get(32768), rows.get("plugin", {}).get(1024))
    c_speed = ratio(rows.get("native", {}).get(8192), rows.get("compiled", {}).get(8192))
    checked = [r for m in spec for r in rows[m].values() if "same" in r]
    identical = all(r["same"] for r in checked)
    lines += [
        "",
        "| target | measured | result |",
        "|---|---|---|",
        f"| plugin decode at 32K within 1.5x of 1K | {fx(p_growth)} | {verdict(p_growth, (p_growth or 9) <= 1.5)} |",
        f"| compiled decode >= 2x faster than native at 8K | {fx(c_speed)} | {verdict(c_speed, (c_speed or 0) >= 2)}"
        " |",
        f"| speculative output token-identical to plain greedy | {sum(r['same'] for r in checked)} / {len(checked)}"
        f" cells | {verdict(checked or None, identical)} |",
        "",
        "Per cell: prefill (s), peak RSS (GiB), 1-min load average after the cell, warm-up steps and min / max of the"
        " timed steps (ms); `noisy`: slowest / fastest timed step > 2. Training: Adam steps, cross-entropy at the"
        " first and (mean of) the last tenth of the steps, DSpark's teacher-forced top-1 on its training rows.",
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
                info += f"; same tokens as greedy: {r['same']}; last_{mode}_stats: {r['stats']}"
                lines.append(info + f"; training: {r['training']}")
    emit(lines, source, source_id(), args.out)
    if not identical:
        bad = [f"{r['mode']} {r['context']}" for r in checked if not r["same"]]
        sys.exit(f"FAIL: speculative decoding changed the greedy output ({', '.join(bad)})")


if __name__ == "__main__":
    main()
