"""Model part of `bench_kernels.py`: the 2-layer [CSA, HCA] Flash-shaped model (performance.md §1.2), prefill in
one pass (plugin auto / reference, native transformers side by side), the long context by chunked prefill and
decode, and the model table."""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass

import torch
from kernel_cases import GIB, OPS, TINY, Shapes, tokens_label
from kernel_timing import Runner, failure, time_limit


def model_config(sh: Shapes, args) -> dict:
    """bench_prefill's config dict with the 2-layer [CSA, HCA] model of performance.md §1.2 (Flash shapes) or, in
    the dry run, its tiny model cut to 2 layers."""
    import bench_prefill

    csa, hca = bench_prefill.CSA, bench_prefill.HCA
    if sh is TINY:
        cfg = dict(bench_prefill.TINY, num_hidden_layers=2, num_hash_layers=0)
        rates = cfg["compress_rates"]
        cfg["compress_ratios"] = [rates[csa], rates[hca], 0]
    else:
        cfg = dict(
            bench_prefill.TINY,
            hidden_size=sh.hidden,
            num_hidden_layers=2,
            compress_ratios=[sh.csa, sh.hca, 0],  # CSA, HCA (+ the MTP block's sliding layer)
            compress_rates={csa: sh.csa, hca: sh.hca},
            num_attention_heads=sh.heads,
            head_dim=sh.head_dim,
            qk_rope_head_dim=64,
            q_lora_rank=1024,
            o_groups=8,
            o_lora_rank=1024,
            index_n_heads=sh.index_heads,
            index_head_dim=sh.index_dim,
            index_topk=sh.topk,
            sliding_window=sh.window,
            n_routed_experts=args.model_experts,
            num_experts_per_tok=sh.top_experts,
            moe_intermediate_size=sh.inter,
            vocab_size=1024,
            num_hash_layers=0,
        )
    cfg["max_position_embeddings"] = max(1 << 20, args.long_context + 4096)
    return cfg


def build(impl: str, cfg: dict, device: torch.device, dtype: torch.dtype):
    """`bench_prefill.build_model(impl)` with config `cfg`, created on `device`, cast to `dtype` except the model's
    fp32 islands (`_keep_in_fp32_modules_strict`: mHC, sinks, norms, compressor projections)."""
    import re

    import bench_prefill

    saved = bench_prefill.TINY
    bench_prefill.TINY = cfg  # build_model reads the module-level config
    try:
        with device:
            model = bench_prefill.build_model(impl)
    finally:
        bench_prefill.TINY = saved
    keep = getattr(model, "_keep_in_fp32_modules_strict", None) or getattr(model, "_keep_in_fp32_modules", None)
    pattern = re.compile("|".join(map(re.escape, keep))) if keep else None
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not (pattern and pattern.search(name)):
            tensor.data = tensor.data.to(dtype)
    return model


@dataclass
class ModelRow:
    part: str
    tokens: int
    impl: str
    seconds: float | None = None
    runs: int = 0
    peak: int | None = None
    status: str = ""
    notes: str = ""


def model_part(sh: Shapes, args, runner: Runner, notes: list[str], skipped: list[str]) -> list[ModelRow]:
    """Prefill at each size (plugin auto / reference / native), then the long context by chunked prefill + decode."""
    from modeling_deepseek_v4 import ops

    rows: list[ModelRow] = []
    cfg = model_config(sh, args)
    sizes = args.model_tokens
    impls = [("plugin", "auto"), ("plugin", "reference"), ("native", None)]
    fit: list[tuple[int, float]] = []
    # last-token logits per prompt length: the Triton path ("auto") against the reference path, same weights
    last_logits: dict[str, dict[int, torch.Tensor]] = {"auto": {}, "reference": {}}
    for impl, backend in impls:
        label = f"{impl} ({backend})" if backend else "native transformers"
        if "reference" == backend and "reference" not in args.backend_list:
            continue
        if time.time() > args.deadline:
            skipped.append(f"model prefill, {label}: all sizes (time budget)")
            continue
        try:
            with time_limit(args.case_timeout * 2):
                model = build(impl, cfg, runner.device, args.torch_dtype)
        except Exception as err:
            rows.append(ModelRow("prefill", sizes[0], label, status=f"build: {failure(err)}"))
            notes.append(f"model build {label}: {type(err).__name__}: {str(err)[:300]}")
            runner.cleanup()
            continue
        weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        for tokens in sizes:
            row = ModelRow("prefill, one pass", tokens, label)
            if impl == "native" and tokens > args.native_max_tokens:
                row.status = f"not run (> --native-max-tokens {args.native_max_tokens}; OOMs at 16K, §1.2)"
                rows.append(row)
                continue
            if time.time() > args.deadline:
                skipped.append(f"model prefill {tokens_label(tokens)}, {label} (time budget)")
                continue
            ids = torch.randint(0, cfg["vocab_size"], (1, tokens), device=runner.device,
                                generator=torch.Generator(device=runner.device).manual_seed(1))  # fmt: skip
            logits = {}

            def forward(model=model, ids=ids, logits=logits):
                out = model(input_ids=ids, use_cache=False, logits_to_keep=1)
                logits["last"] = out.logits[:, -1].float()

            try:
                ctx = ops.use_backend(backend) if backend not in (None, "auto") else contextlib.nullcontext()
                with time_limit(args.case_timeout), ctx, torch.inference_mode():
                    m = runner.measure_model(forward, args.model_repeats, args.case_timeout / 3)
                row.seconds, row.runs, row.peak = m.median_ms / 1e3, len(m.times_ms), m.peak_bytes
                if impl == "plugin" and backend == "auto":
                    fit.append((tokens, row.seconds))
                if impl == "plugin":
                    last_logits[backend][tokens] = logits["last"]
                row.notes = f"weights {weights / GIB:.2f} GiB"
            except Exception as err:
                row.status = failure(err)
                notes.append(f"model prefill {tokens} {label}: {type(err).__name__}: {str(err)[:300]}")
            rows.append(row)
            del ids, logits
            runner.cleanup()
        if impl == "plugin" and backend == "auto":
            fallback = sorted({op for op, b in getattr(ops, "_LOGGED_FALLBACK", set())})
            missing = [op for op in OPS + ("rms_norm", "hc_head") if len(ops.available_backends(op)) == 1]
            notes.append(
                f"model, plugin (auto): ops with no other backend than the reference: {', '.join(missing) or 'none'}; "
                f"ops that fell back to the reference for some call: {', '.join(fallback) or 'none'}."
            )
        del model
        runner.cleanup()
    for tokens in sizes:
        a, r = last_logits["auto"].get(tokens), last_logits["reference"].get(tokens)
        if a is not None and r is not None:
            diff = float((a - r).abs().max() / r.abs().max().clamp(min=1e-12))
            for row in rows:
                if row.tokens == tokens and row.impl == "plugin (auto)":
                    row.notes += f"; last-token logits vs reference: max |Δ| / max |ref| = {diff:.2e}"
    rows += long_context(cfg, args, runner, fit, notes, skipped)
    return rows


def predict(fit: list[tuple[int, float]], tokens: int) -> float | None:
    """Seconds for `tokens` from one-pass prefill times, least squares t = a·T + b·T² (a, b >= 0)."""
    if not fit:
        return None
    if len(fit) == 1:  # quadratic from one point: pessimistic
        t0, s0 = fit[0]
        return s0 * (tokens / t0) ** 2
    xs = torch.tensor([[t, t * t] for t, _ in fit], dtype=torch.float64)
    ys = torch.tensor([s for _, s in fit], dtype=torch.float64)
    coef = torch.linalg.lstsq(xs, ys.unsqueeze(-1)).solution.squeeze(-1).clamp(min=0)
    return float(coef[0] * tokens + coef[1] * tokens * tokens)


def long_context(cfg: dict, args, runner: Runner, fit, notes: list[str], skipped: list[str]) -> list[ModelRow]:
    import modeling_deepseek_v4 as plugin
    from modeling_deepseek_v4.compat import cache_kwargs, cache_of

    total, chunk = args.long_context, args.long_chunk
    label = f"plugin (auto), chunks of {tokens_label(chunk)}"
    row = ModelRow(f"chunked prefill + {args.decode_steps} decode steps", total, label)
    remaining = args.deadline - time.time()
    guess = predict(fit, total)
    if remaining <= 0:
        skipped.append(f"{tokens_label(total)} context (time budget)")
        row.status = "skipped: time budget spent"
        return [row]
    if guess is None or guess > remaining:
        why = "no one-pass prefill time to predict from" if guess is None else f"predicted ~{guess:.0f} s"
        row.status = f"skipped: {why} > {remaining:.0f} s left of --time-budget"
        skipped.append(f"{tokens_label(total)} context ({row.status})")
        return [row]
    try:
        model = build("plugin", cfg, runner.device, args.torch_dtype)
        ids = torch.randint(0, cfg["vocab_size"], (1, total + 1), device=runner.device,
                            generator=torch.Generator(device=runner.device).manual_seed(2))  # fmt: skip
        if runner.cuda:
            runner.sync()
            torch.cuda.reset_peak_memory_stats(runner.device)
            base = torch.cuda.memory_allocated(runner.device)
        with time_limit(max(args.case_timeout, min(remaining + 30, 3 * guess + 30))), torch.inference_mode():
            cache = plugin.DeepseekV4Cache(model.config)
            runner.sync()
            start = time.perf_counter()
            out = None
            for i in range(0, total, chunk):
                out = model(ids[:, i : min(i + chunk, total)], use_cache=True, logits_to_keep=1, **cache_kwargs(cache))
                cache = cache_of(out)
            runner.sync()
            row.seconds = time.perf_counter() - start
            token = out.logits[:, -1:].argmax(-1)
            steps = []
            for _ in range(args.decode_steps + 1):  # the first step is a warm-up
                t0 = time.perf_counter()
                out = model(token, use_cache=True, **cache_kwargs(cache))
                token = out.logits[:, -1:].argmax(-1)
                runner.sync()
                steps.append(time.perf_counter() - t0)
                cache = cache_of(out)
        row.runs = 1
        row.peak = torch.cuda.max_memory_allocated(runner.device) - base if runner.cuda else None
        decode = statistics.median(steps[1:]) if len(steps) > 1 else steps[0]
        row.notes = (
            f"prefill {total / row.seconds:.0f} tok/s (predicted ~{guess:.3g} s); decode {decode * 1e3:.1f} ms/token"
        )
    except Exception as err:
        row.status = failure(err)
        notes.append(f"long context {total}: {type(err).__name__}: {str(err)[:300]}")
    runner.cleanup()
    return [row]


def model_table(rows: list[ModelRow]) -> list[str]:
    lines = [
        "| part | tokens | implementation | time (s) | tok/s | runs | peak GiB over weights | status / notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ok = r.seconds is not None
        cells = [
            r.part,
            tokens_label(r.tokens),
            r.impl,
            f"{r.seconds:.3f}" if ok else "-",
            f"{r.tokens / r.seconds:.0f}" if ok else "-",
            str(r.runs) if ok else "-",
            f"{r.peak / GIB:.2f}" if r.peak is not None else "-",
            "; ".join(x for x in (r.status, r.notes) if x) or "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
