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
import contextlib
import gc
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

PEAK_FLOPS = 790e12  # dense bf16, achievable on one H200 (performance.md §2)
PEAK_BYTES = 4.3e12  # HBM copy bandwidth, achievable (performance.md §2)
GIB = 1024**3
FLUSH_BYTES = 256 * 1024**2  # larger than the H200's 50 MB L2
# Substrings of the error `ops.resolve` raises when a forced backend cannot run the call.
UNSUPPORTED = "cannot run this call"
OPS = ("sparse_attention", "indexer_topk", "compress_pool", "hc_pre", "hc_post", "grouped_experts", "quantized_linear")
ALIASES = {
    "attention": ("sparse_attention",),
    "indexer": ("indexer_topk",),
    "compressor": ("compress_pool",),
    "hc": ("hc_pre", "hc_post"),
    "experts": ("grouped_experts",),
    "linear": ("quantized_linear",),
}


# ------------------------------------------------------------------------------------------------------------ shapes


@dataclass(frozen=True)
class Shapes:
    """One layer's sizes (official-format.md §3) and the benchmark's token counts."""

    name: str
    hidden: int
    heads: int
    head_dim: int
    window: int
    csa: int  # CSA compress ratio
    hca: int  # HCA compress ratio
    index_heads: int
    index_dim: int
    topk: int
    hc: int
    sinkhorn: int
    experts: int
    top_experts: int
    inter: int
    prefill: tuple[int, int, int]  # small, main, large prefill lengths
    decode_context: int
    decode_batches: tuple[int, int]  # main (goal), secondary
    expert_tokens: int
    linears: tuple[tuple[str, int, int], ...]  # (name, in K, out N) of FP8 linears
    decode_tokens: int  # tokens of the decode-sized hc / linear cases


FLASH = Shapes(
    "V4-Flash", hidden=4096, heads=64, head_dim=512, window=128, csa=4, hca=128, index_heads=64, index_dim=128,
    topk=512, hc=4, sinkhorn=20, experts=256, top_experts=6, inter=2048, prefill=(8192, 32768, 131072),
    decode_context=32768, decode_batches=(16, 1), expert_tokens=8192,
    linears=(("q_b_proj", 1024, 32768), ("o_b_proj", 8192, 4096)), decode_tokens=16,
)  # fmt: skip
TINY = Shapes(
    "tiny (dry run)", hidden=64, heads=4, head_dim=32, window=8, csa=4, hca=16, index_heads=4, index_dim=16, topk=8,
    hc=4, sinkhorn=3, experts=8, top_experts=2, inter=32, prefill=(64, 128, 256), decode_context=256,
    decode_batches=(4, 1), expert_tokens=64, linears=(("q_b_proj", 32, 128), ("o_b_proj", 64, 64)), decode_tokens=4,
)  # fmt: skip


def tokens_label(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


# ------------------------------------------------------------------------------------------------- useful work


def query_positions(start: int, s: int) -> torch.Tensor:
    return torch.arange(start, start + s, dtype=torch.int64)


def window_keys(start: int, s: int, window: int, cached: int) -> int:
    """Keys visible to queries at positions start .. start + s - 1 of one row: `0 <= t - pos < window` among the
    keys that exist (positions >= max(0, start - cached))."""
    pos = query_positions(start, s)
    first = max(0, start - cached)
    return int(torch.minimum((pos + 1).clamp(max=window), pos - first + 1).sum())


def compressed_keys(start: int, s: int, ratio: int, n: int, topk: int | None) -> int:
    """Compressed entries visible to the queries of one row: HCA every causal entry `s < (t + 1) // ratio`; CSA
    (topk given) the selected ones, min(topk, causal)."""
    causal = ((query_positions(start, s) + 1) // ratio).clamp(max=n)
    return int(causal.clamp(max=topk).sum() if topk is not None else causal.sum())


def attention_flops(heads: int, dim: int, keys: int) -> float:
    """4·H·D per (query, visible key): QK^T 2·D and PV 2·D per head (MQA, K = V; FlashMLA's 2·H·(d_qk + d_v))."""
    return 4.0 * heads * dim * keys


def indexer_flops(start: int, s: int, ratio: int, topk: int, heads: int, dim: int) -> float:
    """Σ over queries that must score (more causal entries than topk; the others take every entry) of
    causal · H · (2·c + 2): the q·K dot products, then the weighted ReLU sum over heads."""
    causal = (query_positions(start, s) + 1) // ratio
    return float(causal[causal > topk].sum()) * heads * (2 * dim + 2)


# ------------------------------------------------------------------------------------------------------- inputs


class Inputs:
    """Random tensors on one device from one seeded generator."""

    def __init__(self, device: torch.device, dtype: torch.dtype, seed: int = 0):
        self.device, self.dtype = device, dtype
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def randn(self, *shape: int, dtype: torch.dtype | None = None, scale: float = 1.0) -> torch.Tensor:
        # Drawn in the target dtype and scaled in place: no fp32 temporary of the large tensors (an 8.6 GB bf16
        # expert bank would otherwise need 17 GB more).
        x = torch.randn(*shape, generator=self.gen, device=self.device, dtype=dtype or self.dtype)
        return x.mul_(scale) if scale != 1.0 else x

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.gen, device=self.device)

    def csa_topk(self, b: int, s: int, start: int, ratio: int, k: int, n: int) -> torch.Tensor:
        """`[b, s, k]` int64: per query min(k, causal) unique ascending entries of [0, causal), then -1. With more
        than k causal entries, slot j draws from the j-th of k equal strata of [0, causal)."""
        limit = ((query_positions(start, s).to(self.device) + 1) // ratio).clamp(max=n).view(1, s, 1)
        j = torch.arange(k, device=self.device).view(1, 1, k)
        lo, hi = (j * limit) // k, ((j + 1) * limit) // k
        pick = lo + (self.rand(b, s, k) * (hi - lo).clamp(min=1)).long().clamp(max=(hi - lo - 1).clamp(min=0))
        few = torch.where(j < limit, j, -1)  # every causal entry, then -1
        return torch.where(limit > k, pick, few.expand(b, s, k)).contiguous()


def packed_bank(inp: Inputs, fmt_key: str, e: int, rows: int, cols: int, halves: int, scale: float):
    """A `PackedWeight` `[e, rows, cols]` in format `fmt_key`, quantized a few experts at a time (bounded fp32
    temporaries), computing in the activation dtype."""
    from modeling_deepseek_v4.weight_formats import PackedWeight, weight_format

    fmt = weight_format(fmt_key)
    data, scales = [], []
    step = max(1, (1 << 28) // (rows * cols))  # <= 1 GiB of fp32 per slice
    for e0 in range(0, e, step):
        d, s = fmt.quantize(inp.randn(min(step, e - e0), rows, cols, dtype=torch.float32, scale=scale), halves=halves)
        data.append(d)
        scales.append(s)
    return PackedWeight(torch.cat(data), torch.cat(scales), fmt, inp.dtype, halves)


def packed_bytes(w) -> int:
    return w.data.numel() * w.data.element_size() + w.scale.numel() * w.scale.element_size()


# -------------------------------------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One benchmark row: `make(inputs)` builds the op's inputs and returns a zero-argument call of the public op."""

    op: str
    label: str
    shape: str
    make: Callable[[Inputs], Callable[[], object]]
    flops: float
    bytes: float
    metric: str  # "flops" or "bytes": the roofline the row is judged on
    goal: float | None  # fraction of that roofline the issue asks for (None: reported only)
    priority: int = 1  # 0 runs first (one main case per kernel), so a short budget still covers every kernel
    results: dict = field(default_factory=dict)  # backend -> Measurement or status string
    check: str = "-"  # agreement of the first backend's output with the reference's


def attention_cases(sh: Shapes, elem: int) -> list[Case]:
    from modeling_deepseek_v4 import ops

    h, d, w = sh.heads, sh.head_dim, sh.window
    scale = d**-0.5
    cases = []

    def make(b: int, s: int, start: int, cached: int, kind: str, n: int):
        def build(inp: Inputs):
            q = inp.randn(b, s, h, d)
            window_kv = inp.randn(b, cached + s, d)
            starts = torch.full((b,), start, dtype=torch.int64, device=inp.device)
            sinks = inp.randn(h, dtype=torch.float32)
            kwargs = {}
            if kind != "window":
                ratio = sh.csa if kind == "CSA" else sh.hca
                kwargs = dict(compressed_kv=inp.randn(b, n, d), ratio=ratio)
                if kind == "CSA":
                    kwargs["topk_idx"] = inp.csa_topk(b, s, start, sh.csa, sh.topk, n)
            return lambda: ops.sparse_attention(q, window_kv, starts, w, sinks, scale, **kwargs)

        return build

    def work(b: int, s: int, start: int, cached: int, kind: str, n: int) -> tuple[float, float]:
        keys = window_keys(start, s, w, cached)
        if kind != "window":
            keys += compressed_keys(
                start, s, sh.csa if kind == "CSA" else sh.hca, n, sh.topk if kind == "CSA" else None
            )
        keys *= b
        if s == 1:  # decode: every visible KV row is read once per query (distinct per sequence)
            kv_bytes = keys * d * elem
        else:  # prefill: the whole window_kv and compressed tensors once
            kv_bytes = b * (cached + s + (n if kind != "window" else 0)) * d * elem
        return attention_flops(h, d, keys), kv_bytes + 2 * b * s * h * d * elem

    goals = {"CSA": 0.35, "HCA": 0.50, "window": 0.50}
    for kind in ("CSA", "HCA", "window"):
        for i, s in enumerate(sh.prefill):
            n = s // (sh.csa if kind == "CSA" else sh.hca)
            flops, nbytes = work(1, s, 0, 0, kind, n)
            shape = f"B 1, S {s}, H {h}, D {d}, W {w}" + (f", N {n}" if kind != "window" else "")
            shape += f", k {sh.topk}" if kind == "CSA" else ""
            cases.append(
                Case(
                    "sparse_attention",
                    f"{kind} prefill {tokens_label(s)}",
                    shape,
                    make(1, s, 0, 0, kind, n),
                    flops,
                    nbytes,
                    "flops",
                    goals[kind],
                    0 if i == 1 else 1,
                )  # fmt: skip
            )
    ctx = sh.decode_context
    for kind in ("CSA", "HCA"):
        n = ctx // (sh.csa if kind == "CSA" else sh.hca)
        for j, b in enumerate(sh.decode_batches):
            start, cached = ctx - 1, w - 1
            flops, nbytes = work(b, 1, start, cached, kind, n)
            shape = f"B {b}, 1 query at {tokens_label(ctx)} context, {cached} cached window keys, N {n}"
            goal = 0.50 if j == 0 else None  # the goal holds at batch >= 16
            cases.append(
                Case(
                    "sparse_attention",
                    f"{kind} decode b{b} {tokens_label(ctx)}",
                    shape,
                    make(b, 1, start, cached, kind, n),
                    flops,
                    nbytes,
                    "bytes",
                    goal,
                    0 if j == 0 else 1,
                )  # fmt: skip
            )
    return cases


def indexer_cases(sh: Shapes, elem: int) -> list[Case]:
    from modeling_deepseek_v4 import ops

    h, c, k, m = sh.index_heads, sh.index_dim, sh.topk, sh.csa
    cases = []

    def make(b: int, s: int, start: int, n: int):
        def build(inp: Inputs):
            q = inp.randn(b, s, h, c)
            keys = inp.randn(b, n, c)
            weights = inp.randn(b, s, h, dtype=torch.float32, scale=(h * c) ** -0.5)
            positions = query_positions(start, s).to(inp.device).expand(b, s).contiguous()
            return lambda: ops.indexer_topk(q, keys, weights, positions, m, k)

        return build

    for i, s in enumerate(sh.prefill):
        n = s // m
        flops = indexer_flops(0, s, m, k, h, c)
        nbytes = s * h * c * elem + n * c * elem + s * h * 4 + s * min(k, n) * 8
        shape = f"B 1, S {s}, H_I {h}, c {c}, N {n}, k {k}"
        cases.append(
            Case(
                "indexer_topk",
                f"prefill {tokens_label(s)}",
                shape,
                make(1, s, 0, n),
                flops,
                nbytes,
                "flops",
                0.50,
                0 if i == 1 else 1,
            )  # fmt: skip
        )
    ctx, b = sh.decode_context, sh.decode_batches[0]
    n = ctx // m
    flops = b * indexer_flops(ctx - 1, 1, m, k, h, c)
    nbytes = b * (n * c * elem + h * c * elem + h * 4 + min(k, n) * 8)
    shape = f"B {b}, 1 query at {tokens_label(ctx)} context, N {n}, k {k}"
    cases.append(Case("indexer_topk", f"decode b{b} {tokens_label(ctx)}", shape, make(b, 1, ctx - 1, n), flops,
                      nbytes, "bytes", None))  # fmt: skip
    return cases


def compressor_cases(sh: Shapes) -> list[Case]:
    from modeling_deepseek_v4 import ops

    cases = []

    def make(s: int, ratio: int, d: int, overlap: bool):
        width = 2 * d if overlap else d

        def build(inp: Inputs):
            kv = inp.randn(1, s, width, dtype=torch.float32)
            score = inp.randn(1, s, width, dtype=torch.float32, scale=2.0)
            if not overlap:
                return lambda: ops.compress_pool(kv, score, ratio)
            okv = inp.randn(1, ratio, d, dtype=torch.float32)
            oscore = torch.full((1, ratio, d), float("-inf"), device=inp.device)  # no window before window 0
            return lambda: ops.compress_pool(kv, score, ratio, okv, oscore)

        return build

    specs = [
        ("CSA", sh.prefill[1], sh.csa, sh.head_dim, True, 0),
        ("CSA", sh.prefill[2], sh.csa, sh.head_dim, True, 1),
        ("HCA", sh.prefill[2], sh.hca, sh.head_dim, False, 1),
        ("indexer CSA", sh.prefill[2], sh.csa, sh.index_dim, True, 1),
    ]
    for name, s, ratio, d, overlap, prio in specs:
        width = 2 * d if overlap else d
        nw = s // ratio
        nbytes = 2 * s * width * 4 + (2 * ratio * d * 4 if overlap else 0) + nw * d * 4
        flops = nw * d * (2 if overlap else 1) * ratio * 4.0  # exp, sum, multiply-add per slot (softmax pooling)
        shape = f"B 1, S {s}, m {ratio}, width {width} -> [{nw}, {d}] fp32"
        cases.append(Case("compress_pool", f"{name} {tokens_label(s)}", shape, make(s, ratio, d, overlap), flops,
                          nbytes, "bytes", None, prio))  # fmt: skip
    return cases


def hc_cases(sh: Shapes, elem: int) -> list[Case]:
    from modeling_deepseek_v4 import ops

    n, d = sh.hc, sh.hidden
    mix = (2 + n) * n
    cases = []
    for tokens, label, prio in ((sh.prefill[1], f"prefill {tokens_label(sh.prefill[1])}", 0),
                                (sh.decode_tokens, f"decode {sh.decode_tokens} tokens", 1)):  # fmt: skip
        b, s = (1, tokens) if tokens != sh.decode_tokens else (tokens, 1)

        def build_pre(inp: Inputs, b=b, s=s):
            x = inp.randn(b, s, n, d)
            fn = inp.randn(mix, n * d, dtype=torch.float32, scale=(n * d) ** -0.5)
            base, scale = inp.randn(mix, dtype=torch.float32), inp.rand(3) + 0.5
            return lambda: ops.hc_pre(x, fn, base, scale, sh.sinkhorn, 1e-6, 1e-6)

        def build_post(inp: Inputs, b=b, s=s):
            f, x = inp.randn(b, s, d), inp.randn(b, s, n, d)
            post, comb = 2 * inp.rand(b, s, n), inp.rand(b, s, n, n)
            return lambda: ops.hc_post(f, x, post, comb)

        t = b * s
        pre_bytes = t * n * d * elem + mix * n * d * 4 + t * d * elem + t * (n + n * n) * 4
        pre_flops = t * (2.0 * mix * n * d + 3 * n * d)
        post_bytes = t * d * elem + 2 * t * n * d * elem + t * (n + n * n) * 4
        post_flops = t * (2.0 * n * n * d + 2 * n * d)
        shape = f"B {b}, S {s}, n {n}, d {d}"
        cases.append(Case("hc_pre", label, shape + f", sinkhorn {sh.sinkhorn}", build_pre, pre_flops, pre_bytes,
                          "bytes", None, prio))  # fmt: skip
        cases.append(Case("hc_post", label, shape, build_post, post_flops, post_bytes, "bytes", None, prio))
    return cases


def expert_cases(sh: Shapes, elem: int) -> list[Case]:
    from modeling_deepseek_v4 import ops

    t, d, i, e, k = sh.expert_tokens, sh.hidden, sh.inter, sh.experts, sh.top_experts
    flops = 6.0 * t * k * d * i  # gate/up 2·T·K·d·2I + down 2·T·K·I·d
    cases = []
    for fmt, prio in ((None, 0), ("fp8", 1), ("fp4", 1)):

        def build(inp: Inputs, fmt=fmt):
            x = inp.randn(t, d)
            if fmt is None:
                gate_up, down = inp.randn(e, 2 * i, d, scale=0.02), inp.randn(e, d, i, scale=0.02)
            else:
                gate_up = packed_bank(inp, fmt, e, 2 * i, d, 2, 0.02)
                down = packed_bank(inp, fmt, e, d, i, 1, 0.02)
            idx = inp.rand(t, e).topk(k, dim=-1).indices
            weights = inp.rand(t, k) + 0.1
            weights = weights / weights.sum(-1, keepdim=True)
            return lambda: ops.grouped_experts(x, gate_up, down, idx, weights, 10.0)

        per_weight = {None: elem, "fp8": 1 + 1 / (128 * 128), "fp4": 0.5 + 1 / 32}[fmt]
        nbytes = e * 3 * i * d * per_weight + t * d * elem + t * d * 4 + t * k * 12
        name = {None: "bf16" if elem == 2 else "dense", "fp8": "FP8 weights", "fp4": "FP4 weights"}[fmt]
        shape = f"T {t}, d {d}, I {i}, E {e}, top-{k}" + (f", {fmt} 1 B/32 scales" if fmt == "fp4" else "")
        goal = 0.40 if fmt is None else None
        cases.append(Case("grouped_experts", f"{name} {tokens_label(t)} tokens", shape, build, flops, nbytes, "flops",
                          goal, prio))  # fmt: skip
    return cases


def linear_cases(sh: Shapes, elem: int) -> list[Case]:
    from modeling_deepseek_v4 import ops

    cases = []
    specs = [(name, kk, nn, sh.expert_tokens, "flops", j) for j, (name, kk, nn) in enumerate(sh.linears)]
    name, kk, nn = sh.linears[0]
    specs.append((name, kk, nn, sh.decode_tokens, "bytes", 1))
    for name, kk, nn, t, metric, prio in specs:

        def build(inp: Inputs, kk=kk, nn=nn, t=t):
            x = inp.randn(t, kk)
            w = packed_bank(inp, "fp8", 1, nn, kk, 1, 0.02)
            weight = type(w)(w.data[0], w.scale[0], w.format, w.dtype)
            return lambda: ops.quantized_linear(x, weight)

        flops = 2.0 * t * nn * kk
        nbytes = nn * kk * (1 + 1 / (128 * 128)) + t * kk * elem + t * nn * elem
        cases.append(Case("quantized_linear", f"FP8 {name} T {t}", f"[{t}, {kk}] x FP8 [{nn}, {kk}]^T", build,
                          flops, nbytes, metric, None, prio))  # fmt: skip
    return cases


def all_cases(sh: Shapes, dtype: torch.dtype) -> list[Case]:
    elem = torch.tensor([], dtype=dtype).element_size()
    return [
        *attention_cases(sh, elem),
        *indexer_cases(sh, elem),
        *compressor_cases(sh),
        *hc_cases(sh, elem),
        *expert_cases(sh, elem),
        *linear_cases(sh, elem),
    ]


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


FORMULAS = """\
Useful work (only visible keys / causal entries count; masked or padded work does not):
- sparse_attention FLOP = 4·H·D·Σ visible keys (QKᵀ 2·D + PV 2·D per head and key, MQA with K = V; FlashMLA's
  2·H·(d_qk + d_v)). A query at position t sees min(W, t + 1) window keys (that exist) plus, HCA: ⌊(t+1)/128⌋
  entries; CSA: min(k, ⌊(t+1)/4⌋) selected entries. Bytes: prefill q + out + window_kv + compressed_kv, each once;
  decode: q + out + every visible KV row once per sequence (the goal's metric at batch >= 16).
- indexer_topk FLOP = Σ over queries with more than k causal entries of ⌊(t+1)/4⌋·H_I·(2·c + 2) (queries with
  <= k entries take them all: no scoring needed). Bytes: q + keys + weights (fp32) + indices (int64).
- compress_pool bytes = kv + score read (fp32) + overlap halves + pooled entries written (fp32).
- hc_pre bytes = streams x read + fn (fp32) + collapsed written + post, comb (fp32); hc_post bytes = f + x + post +
  comb read + new streams written. One read and one write of the n·d residual is the floor (performance.md §5).
- grouped_experts FLOP = 6·T·K·d·I (gate/up 2·T·K·d·2I, down 2·T·K·I·d), against the bf16 peak whatever the weight
  format; bytes = every expert's weights once (bf16 2 B, FP8 1 B + one scale per 128×128, FP4 0.5 B + 1 B per 32)
  + x + fp32 out + routing.
- quantized_linear FLOP = 2·T·N·K; bytes = FP8 weight + scales + x + y.
- vs reference: the first backend's output against the reference's on the same inputs, max |Δ| / max |ref| (every
  output of a tuple), or for indexer_topk the share of equal indices after sorting each row (ties may differ).
- % of roofline = achieved / ceiling of the row's metric: 790 TFLOP/s (dense bf16) or 4.3 TB/s (HBM), H200
  achievable figures (performance.md §2). Goals: performance.md §5. PASS/FAIL only for the first backend when it
  is not the reference."""


# ---------------------------------------------------------------------------------------------------- model part


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
