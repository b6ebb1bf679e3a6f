"""Scale-out benchmark on 2 gloo CPU ranks: tokens/s and peak memory per rank of one process, tensor parallelism
(`DistributedConfig(tp_size=2)`), expert parallelism (`tp_size=2, ep_size=2`: transformers 5.24 needs EP on top of a
TP or FSDP mesh of the same ranks), FSDP2 (`fsdp_size=2`) and pipeline parallelism (`pp_size=2`, inference only), for a
prefill forward and an AdamW training step of the same tiny Flash-like model (2 hash-routed layers, CSA and HCA layers,
MTP block).

Command (default, a slightly bigger config, a few minutes on 2 vCPUs; `--quick`: the tests' tiny config, < 60 s):

    python benchmarks/bench_scaleout.py --out benchmarks/results_scaleout.md

The figures show the shape of scaling (what each rank holds, what the collectives cost at toy size), not speed: on
CPU with gloo, 1 thread per rank, a model this small is dominated by Python overhead and communication, and the
machine's cores are shared. Why each number is what it is:
- One global batch `[batch, seq]` for every configuration. Single process, TP, EP and PP: every rank runs the whole
  batch (TP / EP split the weights, PP the layers, not the data; PP's stages run one after the other, transformers'
  naive schedule); FSDP2: each rank runs `batch / 2` rows (data parallel). tokens/s divides
  the global batch's tokens by the step time, the slowest rank's, median of `--repeats` after 1 warm-up.
- Peak RSS per rank: `resource.getrusage(RUSAGE_SELF).ru_maxrss` of a process that runs only this configuration,
  forked from a parent that has imported torch / transformers / the plugin (as any launcher would have; re-importing
  costs ~10 s per rank on 2 cores). Its pages count in every rank, so the growth over the RSS when the rank starts is
  given too. The forward is measured before the training step, so the train row's peak covers both.
- Params + buffers per rank: bytes of the tensors this rank holds (`DTensor.to_local()` for sharded ones), i.e. the
  model's share of the rank's memory; optimizer state (2x the trainable parameters under AdamW) comes on top.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/bench_scaleout.py` from the repository root
    sys.path.insert(0, ROOT)

CSA, HCA = "compressed_sparse_attention", "heavily_compressed_attention"
# Flash-like schedule: hash layers first (ratio 0, hash-routed MoE), then CSA / HCA, MTP (ratio 0) last.
QUICK = dict(
    model=dict(
        vocab_size=97,
        hidden_size=64,
        moe_intermediate_size=32,
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
        compress_rates={CSA: 4, HCA: 8},
    ),
    batch=2,
    seq=32,
    repeats=3,
)
DEFAULT = dict(
    model=dict(
        vocab_size=2048,
        hidden_size=256,
        moe_intermediate_size=256,
        num_attention_heads=8,
        head_dim=64,
        qk_rope_head_dim=16,
        q_lora_rank=128,
        o_groups=4,
        o_lora_rank=64,
        n_routed_experts=8,
        num_experts_per_tok=2,
        index_n_heads=4,
        index_head_dim=32,
        index_topk=8,
        sliding_window=32,
        compress_ratios=[0, 0, 4, 16, 4, 16, 4, 0],
        compress_rates={CSA: 4, HCA: 16},
    ),
    batch=4,
    seq=128,
    repeats=5,
)
COMMON = dict(num_hash_layers=2, attn_chunk_size=64, indexer_chunk_size=64)
CONFIGS = {  # name: (ranks, DistributedConfig kwargs or None for a plain single process)
    "single process": (1, None),
    "TP (tp_size=2)": (2, dict(tp_size=2)),
    "EP (tp_size=2, ep_size=2)": (2, dict(tp_size=2, ep_size=2)),
    "FSDP2 (fsdp_size=2)": (2, dict(fsdp_size=2)),
    "PP (pp_size=2)": (2, dict(pp_size=2)),  # inference only: the engine's schedule has no backward across stages
}
MIB = 1024**2


def _rss() -> int:
    """Current resident set size in bytes (Linux `/proc`; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))
    except OSError:
        return 0


def _max_rss() -> int:
    """`ru_maxrss` in bytes (KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _local_bytes(model) -> int:
    """Bytes of the parameters and buffers this rank holds (local shards of DTensors)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def _timed(fn, repeats: int) -> list[float]:
    """1 warm-up + `repeats` calls of `fn`; each call's seconds, the slowest rank's (ranks start together)."""
    times = []
    for _ in range(repeats + 1):
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        fn()
        elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(elapsed.item())
    return times[1:]


def _rank(rank: int, world: int, port: int, kwargs: dict | None, folder: str, setup: dict, out: str) -> None:
    """One rank of one configuration: load, time the prefill forward, then the training step; write a JSON record.

    Inputs: the global batch `[batch, seq]` of token ids (seed 0); under FSDP2 this rank's `batch / world` rows."""
    torch.set_num_threads(1)  # 1 thread per rank: 2 ranks on 2 cores; the single process gets 1 thread as well
    start_rss = _rss()
    if world > 1:
        env = dict(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank, LOCAL_WORLD_SIZE=world, MASTER_PORT=port)
        os.environ.update(MASTER_ADDR="127.0.0.1", **{k: str(v) for k, v in env.items()})
        # A rank that fails alone would leave the other in a collective: the timeout turns that hang into an error.
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        from transformers.distributed import DistributedConfig

        from modeling_deepseek_v4 import DeepseekV4ExtForCausalLM

        extra = {} if kwargs is None else {"distributed_config": DistributedConfig(**kwargs)}
        model = DeepseekV4ExtForCausalLM.from_pretrained(folder, **extra).eval()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(2, setup["model"]["vocab_size"], (setup["batch"], setup["seq"]), generator=g)
        if kwargs and kwargs.get("fsdp_size", 1) > 1:  # data parallel: this rank's rows
            per_rank = setup["batch"] // world
            ids = ids[rank * per_rank : (rank + 1) * per_rank]
        record = {"rank": rank, "start_rss": start_rss, "local_bytes": _local_bytes(model)}

        def forward():
            with torch.no_grad():
                model(input_ids=ids, use_cache=False, logits_to_keep=1)

        record["forward"] = {"times": _timed(forward, setup["repeats"]), "max_rss": _max_rss()}

        if kwargs and kwargs.get("pp_size", 1) > 1:
            record["train"] = {"refused": "inference only (pipeline_support.py refuses training)"}
            return
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        losses = []

        def train_step():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            losses.append(loss.detach().clone())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        record["train"] = {"times": _timed(train_step, setup["repeats"]), "max_rss": _max_rss()}
        # The first step's loss (before any update): equal to the single process's in every configuration (FSDP2:
        # the mean of the ranks' halves, equal token counts), a check that each configuration ran the same model.
        first = losses[0]
        if kwargs and kwargs.get("fsdp_size", 1) > 1:
            dist.all_reduce(first)
            first /= world
        record["first_loss"] = first.item()
    except Exception as error:  # recorded: the table says "failed" and the other configurations still run
        record = {"rank": rank, "error": f"{type(error).__name__}: {error}"}
        raise
    finally:
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(record, f)
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(world: int, kwargs: dict | None, folder: str, setup: dict) -> list[dict]:
    """Every rank's record of one configuration, each rank a fresh forked process."""
    with tempfile.TemporaryDirectory() as out:
        args = (world, _free_port(), kwargs, folder, setup, out)
        try:
            mp.start_processes(_rank, args=args, nprocs=world, start_method="fork")
        except Exception as error:  # ProcessRaisedException: the ranks' records say what failed
            failure = f"{type(error).__name__}: {str(error).strip().splitlines()[-1]}"
        else:
            failure = None
        records = []
        for rank in range(world):
            path = os.path.join(out, f"rank{rank}.json")
            records.append(json.load(open(path)) if os.path.exists(path) else {"rank": rank, "error": failure})
        return records


def _save_model(setup: dict, folder: str) -> None:
    """The random model (seed 0; sinks, mHC bases and router biases randomized too), saved once for every run."""
    from modeling_deepseek_v4 import DeepseekV4ExtConfig, DeepseekV4ExtForCausalLM

    model_kwargs = {**COMMON, **setup["model"]}
    model_kwargs["num_hidden_layers"] = len(model_kwargs["compress_ratios"]) - 1  # the last entry is the MTP block
    torch.manual_seed(0)
    model = DeepseekV4ExtForCausalLM(DeepseekV4ExtConfig(**model_kwargs))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("position_bias", "sinks", ".base", "hc_base")):
                param.normal_(0.0, 0.5)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.1)
    model.save_pretrained(folder)


def _per_rank(records: list[dict], fn) -> str:
    return " / ".join(fn(r) for r in records)


def table(results: dict[str, list[dict]], setup: dict) -> list[str]:
    """Markdown rows: one per (configuration, phase)."""
    tokens = setup["batch"] * setup["seq"]
    rows = [
        "| configuration | phase | ranks | tokens/s (global batch) | step s (median) | peak RSS per rank (MiB) "
        "| RSS growth per rank (MiB) | params + buffers per rank (MiB) | loss, step 1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, records in results.items():
        for phase in ("forward", "train"):
            label = "prefill forward" if phase == "forward" else "training step"
            if any("error" in r for r in records):
                error = next(r["error"] for r in records if "error" in r)
                rows.append(f"| {name} | {label} | {len(records)} | failed: {error} | - | - | - | - | - |")
                continue
            if "refused" in records[0][phase]:
                refused = records[0][phase]["refused"]
                rows.append(f"| {name} | {label} | {len(records)} | {refused} | - | - | - | - | - |")
                continue
            step = statistics.median(records[0][phase]["times"])  # equal on every rank (max-reduced)
            peak = _per_rank(records, lambda r, p=phase: f"{r[p]['max_rss'] / MIB:.0f}")
            growth = _per_rank(records, lambda r, p=phase: f"{(r[p]['max_rss'] - r['start_rss']) / MIB:.0f}")
            held = _per_rank(records, lambda r: f"{r['local_bytes'] / MIB:.2f}")
            loss = f"{records[0]['first_loss']:.6f}" if phase == "train" else "-"
            rows.append(
                f"| {name} | {label} | {len(records)} | {tokens / step:.0f} | {step:.3f} | {peak} | {growth} | {held} "
                f"| {loss} |"
            )
    rows += ["", "Timed runs (s, slowest rank each), to show the noise of the shared cores:", ""]
    for name, records in results.items():
        if not any("error" in r for r in records):
            for phase in ("forward", "train"):
                if "times" not in records[0][phase]:
                    continue
                rows.append(f"- {name}, {phase}: " + ", ".join(f"{t:.3f}" for t in records[0][phase]["times"]))
    return rows


def header(argv: list[str], setup: dict) -> list[str]:
    import transformers

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    m = setup["model"]
    return [
        "## Scale-out on 2 gloo CPU ranks: single process, TP, EP, FSDP2, PP",
        "",
        f"Command: `{' '.join(['python benchmarks/bench_scaleout.py', *argv])}`",
        "",
        f"Commit {commit}, {datetime.date.today().isoformat()}; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, Python {platform.python_version()}; machine: {os.cpu_count()} vCPU "
        f"({platform.machine()}); 1 thread per rank; fp32.",
        "",
        "**These figures show the shape of scaling (what each rank holds, what the collectives cost at toy size), not "
        "speed**: CPU, gloo, a model small enough that Python overhead and communication dominate, shared cores.",
        "",
        f"Model: hidden {m['hidden_size']}, {len(m['compress_ratios']) - 1} layers (compress ratios "
        f"{m['compress_ratios'][:-1]}, the first {COMMON['num_hash_layers']} hash-routed) + MTP, "
        f"{m['n_routed_experts']} experts of {m['moe_intermediate_size']} (top-{m['num_experts_per_tok']}), "
        f"{m['num_attention_heads']} heads in {m['o_groups']} groups, vocabulary {m['vocab_size']}. "
        f"Global batch {setup['batch']} x {setup['seq']} "
        "tokens: TP, EP and PP ranks each run all of it (PP: one stage after the other), FSDP2 ranks half the rows "
        "each. Time: the slowest rank's, "
        f"median of {setup['repeats']} after 1 warm-up; prefill: `use_cache=False`, `logits_to_keep=1`, no grad; "
        "training step: loss, backward, AdamW step. Peak RSS: `ru_maxrss` of a fresh rank process (forked after the "
        "imports, whose pages every rank counts; growth: over the RSS when the rank started); the training row's peak "
        "covers the forward before it. Params + buffers: the rank's local shards (AdamW state adds 2x the parameters)."
        " Loss, step 1: before any update, the same in every configuration (FSDP2: mean of the ranks' halves).",
        "",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tests' tiny config, fewer repeats (< 60 s)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs after 1 warm-up")
    parser.add_argument("--out", default=None, help="also write the markdown report to this file")
    args = parser.parse_args(argv)
    setup = dict(QUICK if args.quick else DEFAULT)
    if args.repeats:
        setup["repeats"] = args.repeats
    torch.set_num_threads(1)
    # Imported here, before the forks: every rank inherits them instead of importing again.
    import transformers.distributed  # noqa: F401

    import modeling_deepseek_v4  # noqa: F401

    transformers.utils.logging.disable_progress_bar()  # the ranks' loading bars would bury the table

    with tempfile.TemporaryDirectory() as folder:
        _save_model(setup, folder)
        results = {}
        for name, (world, kwargs) in CONFIGS.items():
            if world > 1 and not (dist.is_available() and dist.is_gloo_available()):
                results[name] = [{"rank": r, "error": "no gloo backend in this torch build"} for r in range(world)]
                continue
            results[name] = run_config(world, kwargs, folder, setup)
    lines = header(sys.argv[1:] if argv is None else argv, setup) + table(results, setup)
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
