"""Kernel benchmark of the ops backends at V4-Flash layer shapes (issue #15; performance.md §2-§5), plus a 2-layer
Flash-shaped model: prefill in one pass, a 1M-token context by chunked prefill and decode, native transformers side
by side where it fits.

Commands:

    python benchmarks/bench_kernels.py --device cuda --time-budget 240 --out bench_kernels.md   # one H200
    python benchmarks/bench_kernels.py --dry-run                                                # CPU, < 60 s (CI)

What is measured. Every case calls the public op (`ops.sparse_attention`, `ops.indexer_topk`, ...) under
`ops.use_backend(b)` for each backend b of `--backends` (default `triton,reference` on CUDA, `reference` on CPU),
under `torch.inference_mode()`, with the dtypes the model passes (bf16 activations; fp32 compressor projections,
indexer weights, routing weights, sinks and mHC parameters). Time: one cold call (JIT compilation, autotuning),
one warm call, then up to `--repeats` calls timed with CUDA events (perf_counter on CPU) after a 256 MB write that
evicts the L2 cache; the median is reported. A backend whose cold call takes longer than `--target-s` is reported
from that call alone ("1 cold run"). Peak memory: `max_memory_allocated` during the calls minus the memory allocated
before them (the inputs are not counted). Each backend run of a case is limited to `--case-timeout` seconds
(SIGALRM, between kernel launches), so one slow reference cannot eat the budget. With `--device cuda` the cases
run in worker subprocesses (`--isolate`, on by default there): a crash, a hang or a sticky CUDA error of a new kernel
(an illegal address poisons the process's CUDA context) costs one row, and a fresh worker runs the rest. The first
backend's output is compared with the reference's on the same inputs ("vs reference" column).

Useful work (formulas also printed under the table): only what the op must do is counted (visible keys, causal
entries), never padding or masked work, so a kernel that skips masked tiles is not penalised and one that computes
them is not rewarded. Roofline fraction = achieved / ceiling for the case's metric: 790 TFLOP/s dense bf16 or
4.3 TB/s HBM (performance.md §2, achievable H200 figures), compared with the §5 goals. Synthetic inputs: random
values; CSA top-k lists are stratified samples of the causal entries (sorted, unique, -1 padded, as `indexer_topk`
returns them), which spreads the gathered rows over the whole prefix (no locality a real top-k might offer).

Model part: the 2-layer [CSA, HCA] model of performance.md §1.2 (V4-Flash attention and expert widths, 8 routed
experts by default, vocab 1024), built by `bench_prefill.build_model` with this config, cast to bf16 except the
model's fp32 islands. The plugin runs with ops backend "auto" (Triton where a kernel supports the call) and forced
"reference"; native transformers loads the same weights up to `--native-max-tokens` (it OOMs at 16K on an H200,
§1.2). The long context is skipped with a printed reason when the one-pass prefill times, fitted to a·T + b·T²,
predict more time than the budget has left.

`--dry-run`: tiny shapes (same code paths), CPU, fp32, reference backend, small model; finishes in well under 60 s.
Every failure (OOM, a backend that is missing or cannot run the call, an error, a timeout) becomes a row or a note
and the run goes on.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The cases, the timing and the model part live in sibling files (kernel_cases.py, kernel_timing.py,
# kernel_model.py); their names used here (and by tests/test_bench_kernels.py) are imported into this module.
from kernel_cases import (  # noqa: E402
    ALIASES,
    FLASH,
    FORMULAS,
    GIB,
    OPS,
    TINY,
    Case,
    Inputs,
    Shapes,
    all_cases,
    compressed_keys,
    indexer_flops,
    window_keys,
)
from kernel_model import ModelRow, model_part, model_table  # noqa: E402
from kernel_timing import Measurement, Runner, failure, kernel_table, run_case  # noqa: E402

# Re-exported for tests/test_bench_kernels.py, which loads this file as a module.
__all__ = ["Inputs", "compressed_keys", "indexer_flops", "main", "select", "window_keys"]


# ---------------------------------------------------------------------------------------------------------- main


def environment(device: torch.device, dtype: torch.dtype, shapes: Shapes) -> str:
    import transformers

    import modeling_deepseek_v4

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        hw = f"{props.name} ({props.total_memory / GIB:.0f} GiB, {props.multi_processor_count} SMs)"
        hw += f", CUDA {torch.version.cuda}"
    else:
        hw = f"CPU ({os.cpu_count()} logical CPUs, {torch.get_num_threads()} threads)"
    try:
        from bench_prefill import source_id

        source = source_id()
    except Exception as err:  # no git on the machine
        source = f"source id unavailable ({type(err).__name__})"
    return (
        f"torch {torch.__version__}, triton {triton_version}, transformers {transformers.__version__}, "
        f"modeling_deepseek_v4 {modeling_deepseek_v4.__version__} ({source}), Python {platform.python_version()}; "
        f"{hw}; activations {str(dtype).replace('torch.', '')}; shapes: {shapes.name}."
    )


def select(only: str | None) -> set[str]:
    if not only:
        return set(OPS) | {"model"}
    chosen = set()
    for name in (s.strip() for s in only.split(",") if s.strip()):
        if name in OPS or name == "model":
            chosen.add(name)
        elif name in ALIASES:
            chosen.update(ALIASES[name])
        else:
            raise SystemExit(f"--only: unknown kernel {name!r}; choose from {', '.join((*OPS, 'model', *ALIASES))}")
    return chosen


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, CPU, reference backend, < 60 s (CI)")
    ap.add_argument("--only", help="comma-separated kernels: " + ", ".join((*OPS, "model", *ALIASES)))
    ap.add_argument("--time-budget", type=float, default=600.0, help="seconds; no new case starts after it")
    ap.add_argument("--backends", help="comma-separated, first is judged (default: triton,reference on CUDA)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), help="activations (default bf16 CUDA, fp32 CPU)")
    ap.add_argument("--repeats", type=int, default=10, help="timed calls per backend (median)")
    ap.add_argument("--target-s", type=float, default=2.0, help="time per backend and case that sets the repeats")
    ap.add_argument("--case-timeout", type=float, default=90.0, help="seconds per backend run of a case")
    ap.add_argument("--model-tokens", help="comma-separated one-pass prefill lengths (default 8K,32K,128K)")
    ap.add_argument("--model-experts", type=int, default=8, help="routed experts of the 2-layer model (§1.2: 8)")
    ap.add_argument("--model-repeats", type=int, default=3)
    ap.add_argument("--native-max-tokens", type=int, help="largest prefill given to native (default 8192)")
    ap.add_argument("--long-context", type=int, help="chunked-prefill context (default 1M = 1048576)")
    ap.add_argument("--long-chunk", type=int, help="chunk of the chunked prefill (default 32768)")
    ap.add_argument("--decode-steps", type=int, default=4)
    ap.add_argument("--out", help="also write the markdown here")
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                    help="run the cases in worker subprocesses (default: on with --device cuda)")  # fmt: skip
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-cases", default="", help=argparse.SUPPRESS)
    ap.add_argument("--worker-model", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--deadline-at", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shapes = FLASH
    if args.dry_run:
        shapes = TINY
        args.device, args.dtype = "cpu", args.dtype or "float32"
        args.backends = args.backends or "reference"
        args.repeats, args.target_s = min(args.repeats, 3), min(args.target_s, 0.2)
        defaults = dict(model_tokens="128,256", native_max_tokens=256, long_context=1024, long_chunk=256)
        args.decode_steps = min(args.decode_steps, 2)
    else:
        defaults = dict(model_tokens="8192,32768,131072", native_max_tokens=8192, long_context=1 << 20,
                        long_chunk=32768)  # fmt: skip
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.model_tokens = [int(x) for x in str(args.model_tokens).split(",") if x.strip()]
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available on this machine (use --device cpu or --dry-run)")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.torch_dtype = getattr(torch, args.dtype)
    if args.isolate is None:
        args.isolate = args.device == "cuda"
    args.backend_list = [b.strip() for b in (args.backends or "").split(",") if b.strip()] or (
        ["triton", "reference"] if args.device == "cuda" else ["reference"]
    )
    return args, shapes


def encode(result) -> dict | str:
    if isinstance(result, Measurement):
        return {"times_ms": result.times_ms, "peak_bytes": result.peak_bytes, "cold": result.cold}
    return result


def decode(value) -> Measurement | str:
    return Measurement(**value) if isinstance(value, dict) else value


def run_here(cases: list[Case], indices: list[int], args, runner: Runner, notes, skipped, emit=None) -> None:
    """Run `cases[i]` for i in `indices`, in order, in this process; `emit(i, notes)` after each (worker mode)."""
    for i in indices:
        case = cases[i]
        case_notes: list[str] = []
        if time.time() > args.deadline:
            skipped.append(f"{case.op} / {case.label}")
            for b in args.backend_list:
                case.results[b] = "skipped (time budget)"
        else:
            print(f"[{time.strftime('%H:%M:%S')}] {case.op} / {case.label} ...", file=sys.stderr, flush=True)
            run_case(case, args.backend_list, runner, args, case_notes)
        notes += case_notes
        if emit is not None:
            emit(i, case_notes)
            if runner.cuda and not cuda_healthy(runner):  # the parent goes on in a fresh process
                print(f"WORKER_STICKY sticky CUDA error after {case.op} / {case.label}", flush=True)
                raise SystemExit(3)


def cuda_healthy(runner: Runner) -> bool:
    """False after a sticky CUDA error (illegal address, device assert): the context is then unusable."""
    try:
        torch.cuda.synchronize(runner.device)
        torch.zeros(1, device=runner.device).add_(1).item()
        return True
    except Exception:
        return False


def worker_main(args, shapes: Shapes, cases: list[Case], runner: Runner) -> int:
    """`--worker`: run the listed cases (and the model part) and print one JSON line per result for the parent."""
    import json

    notes: list[str] = []
    skipped: list[str] = []

    def emit(i: int, case_notes: list[str]) -> None:
        results = {b: encode(r) for b, r in cases[i].results.items()}
        data = {"index": i, "results": results, "check": cases[i].check, "notes": case_notes}
        print("CASE_RESULT " + json.dumps(data), flush=True)

    indices = [int(x) for x in args.worker_cases.split(",") if x]
    run_here(cases, indices, args, runner, notes, skipped, emit)
    if args.worker_model:
        try:
            rows = model_part(shapes, args, runner, notes, skipped)
        except Exception as err:  # an import or config problem: a row saying so
            notes.append(f"model part failed: {type(err).__name__}: {str(err)[:300]}")
            rows = [ModelRow("model part", 0, "-", status=failure(err))]
        rows = [r.__dict__ for r in rows]
        print("MODEL_RESULT " + json.dumps({"rows": rows, "notes": notes, "skipped": skipped}), flush=True)
    return 0


def _pump(stream, lines) -> None:
    """Copy a worker's stdout lines into a queue, then None (EOF)."""
    for line in stream:
        lines.put(line)
    lines.put(None)


def run_isolated(cases, indices, args, argv, notes, skipped, model: bool) -> list[ModelRow]:
    """Run the cases in worker subprocesses: a crash, a hang or a sticky CUDA error (a new kernel's illegal memory
    access poisons the whole CUDA context) costs one case, and a fresh worker takes the rest."""
    import json
    import queue
    import subprocess
    import threading

    base = [a for a in argv if a != "--isolate"]
    if "--out" in base:  # the worker never writes the report
        k = base.index("--out")
        del base[k : k + 2]
    pending, model_rows, model_pending = list(indices), [], model
    # A case runs its inputs and each backend under --case-timeout; the first one also pays the imports.
    watchdog = 3 * args.case_timeout + 90
    while pending or model_pending:
        cmd = [sys.executable, str(Path(__file__).resolve()), *base, "--worker", "--deadline-at", str(args.deadline)]
        cmd += ["--worker-cases", ",".join(map(str, pending))] + (["--worker-model"] if model_pending else [])
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        last, hung, sticky, progress = time.time(), False, False, 0
        while True:
            limit = watchdog if pending else max(watchdog, args.deadline - time.time() + 2 * args.case_timeout + 120)
            try:
                line = lines.get(timeout=5)
            except queue.Empty:
                if time.time() - last > limit:
                    hung = True
                    proc.kill()
                    break
                continue
            if line is None:
                break
            last = time.time()
            if line.startswith("CASE_RESULT "):
                data = json.loads(line[len("CASE_RESULT ") :])
                cases[data["index"]].results = {b: decode(r) for b, r in data["results"].items()}
                cases[data["index"]].check = data["check"]
                notes += data["notes"]
                pending.remove(data["index"])
                progress += 1
            elif line.startswith("WORKER_STICKY "):
                sticky = True
                notes.append(line.strip())
            elif line.startswith("MODEL_RESULT "):
                data = json.loads(line[len("MODEL_RESULT ") :])
                model_rows = [ModelRow(**r) for r in data["rows"]]
                notes += data["notes"]
                skipped += data["skipped"]
                model_pending = False
            else:
                print(line, end="", file=sys.stderr)
        rc = proc.wait()
        why = f"hung (no result for {watchdog:.0f} s), killed" if hung else f"worker exit code {rc}"
        if sticky and progress:  # every case it ran has its result: a fresh worker takes the rest
            continue
        if pending:  # the worker died in its current case: record it and go on with the next
            case = cases[pending.pop(0)]
            for b in args.backend_list:
                if b not in case.results:
                    case.results[b] = f"crashed ({why})"
            notes.append(f"{case.op} / {case.label}: {why}; the remaining cases ran in a fresh process")
        elif model_pending:
            model_rows = [ModelRow("model part", 0, "-", status=f"crashed ({why})")]
            model_pending = False
    return model_rows


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, shapes = parse_args(argv)
    t_start = time.time()
    args.deadline = args.deadline_at if args.deadline_at is not None else t_start + args.time_budget
    if args.device == "cpu":
        # 1 thread in the dry run: tiny ops after a GEMM stall with 2 threads on small machines (performance.md §0)
        torch.set_num_threads(1 if args.dry_run else torch.get_num_threads())
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    from modeling_deepseek_v4 import ops

    unknown = [b for b in args.backend_list if b not in ops.BACKEND_PRIORITY]
    if unknown:
        raise SystemExit(f"--backends: unknown {unknown}; known: {ops.BACKEND_PRIORITY}")
    chosen = select(args.only)
    runner = Runner(device, args.repeats, args.target_s)
    cases = [c for c in all_cases(shapes, args.torch_dtype) if c.op in chosen]
    if args.worker:
        return worker_main(args, shapes, cases, runner)
    notes: list[str] = []
    skipped: list[str] = []
    order = sorted(range(len(cases)), key=lambda i: (cases[i].priority, i))
    model_rows: list[ModelRow] = []
    # SIGINT (Ctrl-C, or `timeout -s INT` in scripts/gpu_check.sh) stops the run but still prints what was measured.
    try:
        if args.isolate:
            model_rows = run_isolated(cases, order, args, argv, notes, skipped, "model" in chosen)
        else:
            run_here(cases, order, args, runner, notes, skipped)
            if "model" in chosen:
                print(f"[{time.strftime('%H:%M:%S')}] model part ...", file=sys.stderr, flush=True)
                try:
                    model_rows = model_part(shapes, args, runner, notes, skipped)
                except Exception as err:  # an import or config problem: report it, keep the kernel table
                    notes.append(f"model part failed: {type(err).__name__}: {str(err)[:300]}")
                    model_rows = [ModelRow("model part", 0, "-", status=failure(err))]
    except KeyboardInterrupt:
        notes.append("interrupted (SIGINT): the cases without a result were not run")

    lines = [
        f"## Kernel benchmark, {shapes.name} shapes, {args.device}",
        "",
        "Command: `python " + " ".join(["benchmarks/bench_kernels.py", *argv]) + "`",
        "",
        environment(device, args.torch_dtype, shapes),
        f"Backends: {', '.join(args.backend_list)} (registered: "
        + "; ".join(f"{op} {'/'.join(ops.available_backends(op))}" for op in OPS)
        + f"). Time: median of up to {args.repeats} timed calls after a cold and a warm call (runs in brackets);"
        " peak GiB: memory allocated during the calls beyond the inputs."
        + (" Each case ran in a worker subprocess (--isolate)." if args.isolate else ""),
        "",
        *kernel_table(cases, args.backend_list),
    ]
    if "model" in chosen:
        lines += ["", "### Model level: 2-layer [CSA, HCA] model, batch 1", "", *model_table(model_rows)]
    lines += ["", FORMULAS, ""]
    if skipped:
        lines += [f"Skipped ({len(skipped)}, time budget {args.time_budget:.0f} s):", *[f"- {s}" for s in skipped], ""]
    if notes:
        lines += ["Notes and errors:", *[f"- {n}" for n in notes], ""]
    lines.append(f"Total time: {time.time() - t_start:.1f} s.")
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
