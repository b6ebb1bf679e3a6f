"""The cases of `bench_kernels.py`: the V4-Flash (and dry-run) layer shapes, the useful work of each op (FLOPs,
bytes), the random input builders and one `Case` per benchmark row, plus the formulas printed under the table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

PEAK_FLOPS = 790e12  # dense bf16, achievable on one H200 (performance.md §2)
PEAK_BYTES = 4.3e12  # HBM copy bandwidth, achievable (performance.md §2)
GIB = 1024**3
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


# ------------------------------------------------------------------------------------------------------ formulas


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
