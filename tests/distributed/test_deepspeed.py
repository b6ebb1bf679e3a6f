"""DeepSpeed ZeRO-2 / ZeRO-3 (`deepspeed_support.py`, examples/deepspeed_zero{2,3}.json).

Always run (no DeepSpeed needed): the MoE block is marked a ZeRO-3 leaf exactly when ZeRO-3 is active, through a stub
`deepspeed` module; without DeepSpeed the marking is a no-op; the example configs name the right stage and class.

With DeepSpeed installed: 2 gloo ranks on CPU train the tiny model for 3 SGD steps under ZeRO-3 (loaded with
`from_pretrained` inside `zero.Init`, every parameter partitioned) and then ZeRO-2, while rank 1 never routes a token
to expert 0 in any MoE layer (score-routed layers: a -1e4 selection bias; hash layers: only token ids whose
`tid2eid` row lacks expert 0). Each rank's losses and the final weights must equal one process that computes both
ranks' micro-batches and averages their losses (DeepSpeed averages gradients over ranks), within 1e-5 (fp32; the
reductions sum in another order). A hang fails the test after a deadline instead of blocking the suite.
"""

import contextlib
import datetime
import importlib.util
import json
import os
import sys
import traceback
import types
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from modeling_deepseek_v4 import deepspeed_support
from modeling_deepseek_v4.moe import DeepseekV4SparseMoeBlock
from tests.conftest import tiny_model
from tests.distributed.gloo import free_port

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
STEPS, LR, SEQ, MICRO = 3, 0.1, 40, 2
DEADLINE_S = 420  # both stages with start-up on a loaded 2-core machine take ~90 s; a hang waits for this


@contextlib.contextmanager
def _zero3(monkeypatch, enabled: bool):
    import transformers.integrations.deepspeed as hf_ds

    monkeypatch.setattr(hf_ds, "is_deepspeed_zero3_enabled", lambda: enabled)
    yield


def _stub_deepspeed(monkeypatch) -> list:
    """A `deepspeed` package whose `utils.set_z3_leaf_modules` records its calls and marks as DeepSpeed does."""
    calls = []

    def set_z3_leaf_modules(model, classes):
        calls.append((model, list(classes)))
        marked = [m for m in model.modules() if isinstance(m, tuple(classes))]
        for module in marked:
            module._z3_leaf = True
        return marked

    utils = types.ModuleType("deepspeed.utils")
    utils.set_z3_leaf_modules = set_z3_leaf_modules
    package = types.ModuleType("deepspeed")
    package.utils = utils
    monkeypatch.setitem(sys.modules, "deepspeed", package)
    monkeypatch.setitem(sys.modules, "deepspeed.utils", utils)
    return calls


def _moe_blocks(model) -> list:
    return [m for m in model.modules() if isinstance(m, DeepseekV4SparseMoeBlock)]


def test_without_deepspeed_the_marking_is_a_no_op(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` now raises ImportError
    monkeypatch.setitem(sys.modules, "deepspeed.utils", None)
    with _zero3(monkeypatch, True):
        model = tiny_model()  # post_init runs the marking: it must not need DeepSpeed
        assert deepspeed_support.mark_zero3_leaf_modules(model) == []
    assert not any(getattr(m, "_z3_leaf", False) for m in model.modules())


def test_the_model_marks_its_moe_blocks_when_zero3_is_active(monkeypatch):
    calls = _stub_deepspeed(monkeypatch)
    with _zero3(monkeypatch, True):
        model = tiny_model()
    assert calls, "post_init did not call deepspeed_support.mark_zero3_leaf_modules"
    assert all(classes == [DeepseekV4SparseMoeBlock] for _, classes in calls)
    assert calls[-1][0] is model
    blocks = _moe_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers + model.config.num_nextn_predict_layers
    assert all(b._z3_leaf for b in blocks)
    assert sum(getattr(m, "_z3_leaf", False) for m in model.modules()) == len(blocks)  # nothing else


def test_no_marking_without_zero3(monkeypatch):
    calls = _stub_deepspeed(monkeypatch)
    with _zero3(monkeypatch, False):
        model = tiny_model()
        assert deepspeed_support.mark_zero3_leaf_modules(model) == []
    assert calls == [] and not any(getattr(m, "_z3_leaf", False) for m in model.modules())
    assert len(deepspeed_support.mark_zero3_leaf_modules(model, force=True)) == len(_moe_blocks(model))
    assert deepspeed_support.mark_zero3_leaf_modules(torch.nn.Linear(2, 2), force=True) == []  # no block: no call
    assert len(calls) == 1


def test_example_configs():
    zero3 = json.loads((EXAMPLES / "deepspeed_zero3.json").read_text())
    zero2 = json.loads((EXAMPLES / "deepspeed_zero2.json").read_text())
    assert zero3["zero_optimization"]["stage"] == 3 and zero2["zero_optimization"]["stage"] == 2
    assert zero3["zero_optimization"]["leaf_module"]["classes"] == [DeepseekV4SparseMoeBlock.__name__]
    assert "leaf_module" not in zero2["zero_optimization"]


# ---------------------------------------------------------------- real DeepSpeed, 2 gloo ranks


def _ds_config(stage: int) -> dict:
    """The example config with Trainer's "auto" values filled as `TrainingArguments` would for this run."""
    config = json.loads((EXAMPLES / f"deepspeed_zero{stage}.json").read_text())
    auto = {"train_batch_size": 2 * MICRO, "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1}
    auto.update(gradient_clipping=0.0, reduce_bucket_size=500_000_000, stage3_prefetch_bucket_size=50_000_000)
    # Partition every parameter (all of the tiny model's are below the usual threshold, which would keep them whole
    # and gather nothing per module: the case the leaf marking is about would not be exercised).
    auto["stage3_param_persistence_threshold"] = 0

    def fill(node):
        if isinstance(node, dict):
            return {k: (auto.get(k, False) if v == "auto" else fill(v)) for k, v in node.items()}
        return node

    config = fill(config)  # bf16 / fp16 "auto" -> False (fp32 like the reference)
    config["zero_allow_untested_optimizer"] = True  # torch SGD, the reference's optimizer
    return config


def _allowed_tokens(model, rank: int) -> torch.Tensor:
    """Token ids rank `rank` draws from: rank 1 only those that no hash layer sends to expert 0."""
    ids = torch.arange(2, model.config.vocab_size)
    if rank == 0:
        return ids
    keep = torch.ones_like(ids, dtype=torch.bool)
    for block in _moe_blocks(model):
        if block.is_hash:
            keep &= ~(block.gate.tid2eid[ids] == 0).any(-1)
    return ids[keep]


def _batch(model, rank: int, step: int) -> torch.Tensor:
    allowed = _allowed_tokens(model, rank)
    g = torch.Generator().manual_seed(1000 * rank + step)
    return allowed[torch.randint(0, len(allowed), (MICRO, SEQ), generator=g)]


def _starve(model, rank: int) -> None:
    """Rank 1's score-routed layers never select expert 0 (the bias only chooses, so gradients are unchanged)."""
    for block in _moe_blocks(model):
        if not block.is_hash:
            block.gate.e_score_correction_bias[0] = -1e4 if rank == 1 else 0.0


def _train_stage(deepspeed, path: str, rank: int, stage: int) -> dict:
    from transformers.integrations import HfDeepSpeedConfig

    from modeling_deepseek_v4 import DeepseekV4ExtForCausalLM

    config = _ds_config(stage)
    hf_config = HfDeepSpeedConfig(config)  # what TrainingArguments(deepspeed=...) creates; kept alive below
    model = DeepseekV4ExtForCausalLM.from_pretrained(path).train()  # ZeRO-3: built inside deepspeed.zero.Init
    leaves_after_load = sum(getattr(m, "_z3_leaf", False) for m in model.modules())
    partitioned = all(hasattr(p, "ds_id") for p in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    _starve(engine.module, rank)
    expert0 = []
    hooks = [
        b.register_forward_hook(lambda m, a, out: expert0.append(int((out[1][1] == 0).sum())))
        for b in _moe_blocks(model)
    ]
    losses = []
    for step in range(STEPS):
        loss = engine(input_ids=(ids := _batch(engine.module, rank, step)), labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    for hook in hooks:
        hook.remove()
    params = list(engine.module.parameters())
    gather = deepspeed.zero.GatheredParameters(params) if stage == 3 else contextlib.nullcontext()
    with gather:
        weights = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    del hf_config
    return dict(
        losses=losses,
        expert0=expert0,
        leaves_after_load=leaves_after_load,
        partitioned=partitioned,
        leaves=sum(getattr(m, "_z3_leaf", False) for m in model.modules()),
        weights=weights if rank == 0 else None,
    )


def _worker(rank: int, world: int, port: int, path: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    try:  # DeepSpeed that cannot start on this machine: the parent skips with this text
        import deepspeed

        shm = sys.modules.get("deepspeed.comm.torch")
        if shm is not None and hasattr(shm, "build_shm_op"):
            # A C++ op JIT-compiled on first use (minutes here, needs a compiler) that only inference all-reduce uses.
            shm.build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    except Exception:
        torch.save({"cannot_start": traceback.format_exc()}, f"{out}/rank{rank}.pt")
        return
    results = {stage: _train_stage(deepspeed, path, rank, stage) for stage in (3, 2)}
    torch.save(results, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _reference(path: str) -> dict:
    """One process: each step averages the two ranks' losses, each with its rank's batch and routing bias."""
    from modeling_deepseek_v4 import DeepseekV4ExtForCausalLM

    model = DeepseekV4ExtForCausalLM.from_pretrained(path).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = {0: [], 1: []}
    for step in range(STEPS):
        optimizer.zero_grad()
        total = 0.0
        for rank in (0, 1):
            _starve(model, rank)
            loss = model(input_ids=(ids := _batch(model, rank, step)), labels=ids).loss
            total = total + loss / 2
            losses[rank].append(loss.item())
        total.backward()
        optimizer.step()
    return dict(losses=losses, weights={n: p.detach() for n, p in model.named_parameters()})


def _spawn(path: str, out: str) -> None:
    context = mp.start_processes(_worker, args=(2, free_port(), path, out), nprocs=2, join=False, start_method="spawn")
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=DEADLINE_S)
    while not context.join(timeout=5):
        if datetime.datetime.now() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"DeepSpeed training did not finish within {DEADLINE_S} s (a collective hung)")


def test_zero3_and_zero2_train_with_an_expert_starved_on_one_rank(tmp_path, monkeypatch):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed: No module named 'deepspeed' (pip install deepspeed)")
    torch.set_num_threads(1)
    model = tiny_model()
    model.save_pretrained(tmp_path / "tiny")
    _spawn(str(tmp_path / "tiny"), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    if any("cannot_start" in r for r in ranks):
        reason = next(r["cannot_start"] for r in ranks if "cannot_start" in r)
        pytest.skip(f"DeepSpeed cannot start on CPU with gloo here: {reason}")
    reference = _reference(str(tmp_path / "tiny"))
    n_blocks = len(_moe_blocks(model))
    for stage in (3, 2):
        # The starvation happened: rank 1 sent no token to expert 0 in any layer, rank 0 did.
        assert sum(ranks[1][stage]["expert0"]) == 0 and len(ranks[1][stage]["expert0"]) > 0
        assert sum(ranks[0][stage]["expert0"]) > 0
        for rank in (0, 1):
            torch.testing.assert_close(ranks[rank][stage]["losses"], reference["losses"][rank], rtol=1e-5, atol=1e-5)
        weights = ranks[0][stage]["weights"]
        assert weights.keys() == reference["weights"].keys()
        for name, tensor in reference["weights"].items():
            where = f"ZeRO-{stage} {name}"
            torch.testing.assert_close(weights[name], tensor, rtol=1e-5, atol=1e-5, msg=lambda m, w=where: f"{w}: {m}")
    for rank in (0, 1):
        assert ranks[rank][3]["partitioned"]  # from_pretrained built the model inside zero.Init
        assert ranks[rank][3]["leaves_after_load"] == n_blocks  # marked by post_init, before deepspeed.initialize
        assert ranks[rank][3]["leaves"] == n_blocks
        assert ranks[rank][2]["leaves_after_load"] == 0 and not ranks[rank][2]["partitioned"]
