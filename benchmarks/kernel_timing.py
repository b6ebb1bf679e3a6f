"""Timing of `bench_kernels.py`: the `Runner` (cold, warm and timed calls, peak memory, L2 flush), the per-case
time limit, one case's run over the backends with the comparison against the reference, and the kernel table."""

from __future__ import annotations

import contextlib
import gc
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from kernel_cases import GIB, PEAK_BYTES, PEAK_FLOPS, Case, Inputs

FLUSH_BYTES = 256 * 1024**2  # larger than the H200's 50 MB L2
# Substrings of the error `ops.resolve` raises when a forced backend cannot run the call.
UNSUPPORTED = "cannot run this call"


# ------------------------------------------------------------------------------------------------------ measuring


@dataclass
class Measurement:
    times_ms: list[float]
    peak_bytes: int | None  # extra over what was allocated before the calls (CUDA only)
    cold: bool = False  # the single cold call is the measurement

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)


class BudgetTimeout(Exception):
    """A backend run went past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise `BudgetTimeout` inside the block after `seconds` (SIGALRM: main thread, between Python ops)."""
    if seconds <= 0 or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(*_):
        raise BudgetTimeout(f"over {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Runner:
    """Times zero-argument calls on one device."""

    def __init__(self, device: torch.device, repeats: int, target_s: float):
        self.device, self.repeats, self.target_s = device, repeats, target_s
        self.cuda = device.type == "cuda"
        self._flush = None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def wall(self, fn: Callable[[], object]) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def measure(self, fn: Callable[[], object]) -> tuple[Measurement, object]:
        """Time `fn`; also returns the output of its cold call (kept for the comparison with the reference; the
        peak memory is taken over the timed calls, above what is allocated before them, that output included)."""
        if self.cuda and self._flush is None:
            self._flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=self.device)
        base = self._reset()
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        cold = time.perf_counter() - start
        if cold > self.target_s:
            return Measurement([cold * 1e3], self._peak(base), cold=True), out
        warm = self.wall(fn)
        n = max(1, min(self.repeats, int(self.target_s / max(warm, 1e-6))))
        base = self._reset()
        if not self.cuda:
            return Measurement([self.wall(fn) * 1e3 for _ in range(n)], None), out
        events = []
        for _ in range(n):
            self._flush.zero_()  # evict the inputs from L2: the timed call reads them from HBM
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        self.sync()
        return Measurement([s.elapsed_time(e) for s, e in events], self._peak(base)), out

    def _reset(self) -> int | None:
        """Start a peak-memory window; returns the memory allocated now (None on CPU)."""
        if not self.cuda:
            return None
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def measure_model(self, fn: Callable[[], object], repeats: int, max_s: float) -> Measurement:
        """Wall-clock model forwards: one cold call (JIT compilation, autotuning), then up to `repeats` timed ones
        while they fit in `target_s` x 4, at least one when the cold call took under `max_s`."""
        base = self._reset()
        cold = self.wall(fn)
        times = []
        if cold <= max_s:
            n = max(1, min(repeats, int(self.target_s * 4 / max(cold, 1e-6))))
            times = [self.wall(fn) for _ in range(n)]
        return Measurement([t * 1e3 for t in times] or [cold * 1e3], self._peak(base), cold=not times)

    def _peak(self, base: int | None) -> int | None:
        return None if base is None else torch.cuda.max_memory_allocated(self.device) - base

    def cleanup(self) -> None:
        """Free the device memory of dropped tensors (CPU tensors go with their last reference; a full
        `gc.collect` costs ~0.1 s with transformers loaded, too much per case for the dry run)."""
        if self.cuda:
            gc.collect()
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()


def failure(err: BaseException) -> str:
    """A short status for a failed run."""
    if isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower():
        return "OOM"
    if isinstance(err, BudgetTimeout):
        return f"timeout ({err})"
    if isinstance(err, RuntimeError) and UNSUPPORTED in str(err):
        return "cannot run this call"
    return f"error: {type(err).__name__}"


def run_case(case: Case, backends: list[str], runner: Runner, args, notes: list[str]) -> None:
    """Fill `case.results` with a Measurement or a status per backend; never raises (but KeyboardInterrupt)."""
    from modeling_deepseek_v4 import ops

    inp = Inputs(runner.device, args.torch_dtype)
    call = None
    try:
        with time_limit(args.case_timeout):
            call = case.make(inp)
            runner.sync()
    except Exception as err:  # inputs did not fit, or building them failed
        status = failure(err)
        for b in backends:
            case.results[b] = f"inputs: {status}"
        notes.append(f"{case.op} / {case.label}: building inputs failed: {type(err).__name__}: {str(err)[:300]}")
        runner.cleanup()
        return
    # The first backend's output is compared with the reference's (performance.md §0: a speed-up counts only
    # when the results agree); each output lives until the comparison.
    compare = backends[0] != "reference" and "reference" in backends
    outputs: dict[str, object] = {}
    for backend in backends:
        if backend not in ops.available_backends(case.op):
            case.results[backend] = "not registered"
            continue
        if time.time() > args.deadline and backend != backends[0]:
            case.results[backend] = "skipped (time budget)"
            continue
        try:
            with time_limit(args.case_timeout), ops.use_backend(backend), torch.inference_mode():
                case.results[backend], out = runner.measure(call)
            if compare and backend in (backends[0], "reference"):
                outputs[backend] = out
            del out
        except Exception as err:
            case.results[backend] = failure(err)
            notes.append(f"{case.op} / {case.label} / {backend}: {type(err).__name__}: {str(err)[:300]}")
        if len(outputs) == 2:
            try:
                case.check = agreement(outputs[backends[0]], outputs["reference"])
            except Exception as err:  # e.g. shapes differ: that is the finding
                case.check = f"compare failed: {type(err).__name__}"
            outputs.clear()
        runner.cleanup()
    del call, inp, outputs
    runner.cleanup()


def agreement(out, ref) -> str:
    """How far a backend's output is from the reference's: max |Δ| / max |ref| over float outputs (every tensor of
    a tuple), or for index outputs (`indexer_topk`) the fraction of equal entries after sorting each row (ties may
    pick different entries)."""
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    worst, parts = 0.0, []
    for a, b in zip(outs, refs):
        if a.shape != b.shape:
            return f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
        if a.is_floating_point():
            a, b = a.float(), b.float()
            if not bool(torch.isfinite(a).all()):
                parts.append("non-finite values")
            worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)))
        else:
            same = (a.sort(dim=-1).values == b.sort(dim=-1).values).float().mean()
            parts.append(f"{100 * float(same):.2f}% indices equal")
    if any(x.is_floating_point() for x in outs):
        parts.insert(0, f"rel err {worst:.1e}")
    return ", ".join(parts)


# -------------------------------------------------------------------------------------------------------- output


def fmt_ms(r) -> str:
    if isinstance(r, Measurement):
        ms = r.median_ms
        text = f"{ms:.3f}" if ms < 100 else f"{ms:.0f}"
        return text + (" (1 cold run)" if r.cold else f" ({len(r.times_ms)})")
    return r if r is not None else "-"


def fmt_peak(r) -> str:
    if isinstance(r, Measurement) and r.peak_bytes is not None:
        return f"{r.peak_bytes / GIB:.2f}"
    return "-"


def si(value: float, unit: str) -> str:
    """`value` with a T / G / M / k prefix and 3 significant digits."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def fmt_work(case: Case) -> str:
    return si(case.flops, "FLOP") if case.metric == "flops" else si(case.bytes, "B")


def achieved(case: Case, r: Measurement) -> tuple[str, float]:
    """Achieved rate on the case's metric, and its fraction of the roofline."""
    seconds = r.median_ms / 1e3
    if case.metric == "flops":
        rate = case.flops / seconds
        return si(rate, "FLOP/s"), rate / PEAK_FLOPS
    rate = case.bytes / seconds
    return si(rate, "B/s"), rate / PEAK_BYTES


def kernel_table(cases: list[Case], backends: list[str]) -> list[str]:
    head = ["kernel", "case", "shape"]
    for b in backends:
        head += [f"{b} ms (runs)", f"{b} peak GiB"]
    head += ["speed-up", "vs reference", "useful work", "achieved", "% of roofline", "goal", "result"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    primary = backends[0]
    for case in cases:
        cells = [case.op, case.label, case.shape]
        for b in backends:
            cells += [fmt_ms(case.results.get(b, "not run")), fmt_peak(case.results.get(b))]
        timed = [b for b in backends if isinstance(case.results.get(b), Measurement)]
        ref = case.results.get("reference")
        first = case.results.get(primary)
        speed = "-"
        if primary != "reference" and isinstance(first, Measurement) and isinstance(ref, Measurement):
            speed = f"{ref.median_ms / first.median_ms:.3g}x"
        rate, frac, goal, result = "-", "-", "-", "-"
        if timed:
            who = timed[0]
            rate, f = achieved(case, case.results[who])
            frac = f"{100 * f:.3g}%" + ("" if who == primary else f" ({who})")
            if case.goal is not None:
                goal = f">= {100 * case.goal:.0f}% {'FLOP' if case.metric == 'flops' else 'HBM'}"
                result = ("PASS" if f >= case.goal else "FAIL") if who == primary != "reference" else f"n/a ({who})"
        elif case.goal is not None:
            goal = f">= {100 * case.goal:.0f}% {'FLOP' if case.metric == 'flops' else 'HBM'}"
        cells += [speed, case.check, fmt_work(case), rate, frac, goal, result]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
