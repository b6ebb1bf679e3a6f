"""The two gloo ranks of `test_fsdp.py` and the training loop both sides share.

One spawn runs every scenario (starting ranks costs most of the test's time on CPU), each rank training on its half
of the same global batch; rank 0 writes what the tests check to `<out>/rank0.pt` (the other ranks only their errors):
- `accelerate_full` / `accelerate_lora`: accelerate's FSDP2 (`fsdp2_prepare_model`, auto-wrap by the model's
  `_no_split_modules`), 3 AdamW steps, `save_state` after step 2; then a fresh model (other seed: other weights and
  router buffers), `load_state` and step 3 again;
- `transformers`: `from_pretrained(distributed_config=DistributedConfig(fsdp_size=2))`, 3 steps, after step 2
  `save_pretrained(distributed_checkpoint=True)` and `fsdp_support.save_sharded_state`; then
  `from_pretrained(<that checkpoint>)`, `load_sharded_state` and step 3 again;
- `transformers_bf16`: the same in bf16 (fp32 islands kept), the plugin's default plan, 3 steps.
A failing scenario records its traceback instead of results, so the other scenarios still report; a rank that fails
alone leaves the other in a collective until the group's 120 s timeout.
"""

from __future__ import annotations

import os
import traceback

import torch
import torch.distributed as dist

from tests.distributed.gloo import process_group

STEPS, ROWS, SEQ = 3, 4, 24
# Adam's eps well above the gradients' rounding noise: an entry whose gradient is ~1e-9 (some mHC `fn` entries) would
# otherwise take a step of any size up to lr from that noise, and ranks sum in another order than one process.
ADAMW = dict(lr=1e-3, eps=1e-6)
SAVE_AFTER = 2  # steps done when the checkpoint is written
LORA_TARGETS = ["q_a_proj", "o_a_proj", "experts"]
# lm_head and the final norm in one unit kept gathered (what native models declare), the MTP block its own unit.
FSDP_PLAN = {"model.mtp.*": "free_full_weight", "lm_head": "keep_full_weight"}


def batches() -> list[torch.Tensor]:
    """The global batches `[ROWS, SEQ]`, one per step; rank r trains on rows `[r * ROWS / 2, (r + 1) * ROWS / 2)`."""
    g = torch.Generator().manual_seed(5)
    return [torch.randint(2, 97, (ROWS, SEQ), generator=g) for _ in range(STEPS)]


def build_model(seed: int = 0, lora: bool = False):
    """`tiny_model(seed)` with a random hash table (so that a resume must restore `tid2eid` too), optionally wrapped
    by PEFT with grouped expert LoRA (random B factors: the adapters act from step 1). Untrained parts frozen."""
    from modeling_deepseek_v4.fsdp_support import freeze_untrained_parameters
    from tests.conftest import tiny_model

    model = tiny_model(seed=seed).train()
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("tid2eid"):
                experts = model.config.n_routed_experts
                buf.copy_(torch.rand(buf.shape[0], experts, generator=g).argsort(-1)[:, : buf.shape[1]])
    if lora:
        from peft import get_peft_model

        from modeling_deepseek_v4.expert_lora import expert_lora_config

        torch.manual_seed(seed)
        config = expert_lora_config(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
        model = get_peft_model(model, config)
    freeze_untrained_parameters(model)
    return model


def optimizer_for(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **ADAMW)


def train_step(model, optimizer, ids: torch.Tensor, backward=None) -> float:
    """One step on this process's rows; returns the global batch's loss (the mean over ranks: equal token counts)."""
    loss = model(input_ids=ids, labels=ids).loss
    optimizer.zero_grad()
    (backward or torch.Tensor.backward)(loss)
    optimizer.step()
    loss = loss.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(loss)
        loss /= dist.get_world_size()
    return loss.item()


def rows(ids: torch.Tensor) -> torch.Tensor:
    per_rank = ids.shape[0] // dist.get_world_size()
    return ids[dist.get_rank() * per_rank : (dist.get_rank() + 1) * per_rank]


def full_state(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer gathered to full CPU tensors (collective; the result is meant for rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {name: t.clone() for name, t in get_model_state_dict(model, options=options).items()}


def layout(model) -> dict:
    """FSDP units (module names) and, per tensor, its type and placements."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    units = [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]
    tensors = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        placements = t.placements if isinstance(t, DTensor) else None
        tensors[name] = (
            type(t).__name__,
            placements and tuple(f"shard{p.dim}" if p.is_shard() else str(p) for p in placements),
        )
    return {"units": units, "tensors": tensors}


def _accelerator():
    """A fresh accelerate FSDP2 `Accelerator` on CPU. accelerate 1.15 turns `fsdp_plugin` into
    `DistributedType.FSDP` only for accelerator devices (`AcceleratorState.__init__`); on gloo it stays MULTI_CPU
    (and `prepare` would use DDP), so the type is switched after construction, in `PartialState` too: every
    `AcceleratorState()` copies the type from there again."""
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from accelerate.utils import DistributedType

    AcceleratorState._reset_state()
    GradientState._reset_state()
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", state_dict_type="SHARDED_STATE_DICT"
    )
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    return accelerator


def _accelerate(out: str, lora: bool) -> dict:
    data = batches()
    accelerator = _accelerator()
    model = build_model(0, lora)
    model, optimizer = accelerator.prepare(model, optimizer_for(model))
    result = {"layout": layout(model), "losses": []}
    checkpoint = os.path.join(out, f"accelerate_{'lora' if lora else 'full'}")
    for step, ids in enumerate(data):
        result["losses"].append(train_step(model, optimizer, rows(ids), accelerator.backward))
        if step + 1 == SAVE_AFTER:
            accelerator.save_state(checkpoint)
    result["final"] = full_state(model)

    accelerator = _accelerator()
    model = build_model(1, lora)
    model, optimizer = accelerator.prepare(model, optimizer_for(model))
    accelerator.load_state(checkpoint)
    result["resumed"] = [train_step(model, optimizer, rows(ids), accelerator.backward) for ids in data[SAVE_AFTER:]]
    return result


def _transformers(out: str) -> dict:
    from transformers.distributed import DistributedConfig

    from modeling_deepseek_v4 import DeepseekV4ExtForCausalLM
    from modeling_deepseek_v4.fsdp_support import load_sharded_state, save_sharded_state

    data = batches()
    config = DistributedConfig(fsdp_size=dist.get_world_size(), fsdp_plan=FSDP_PLAN)
    model = DeepseekV4ExtForCausalLM.from_pretrained(os.path.join(out, "init"), distributed_config=config).train()
    # Not frozen here: `load_sharded_state` must cope with the indexer / MTP parameters that never get a state.
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)
    result = {"layout": layout(model), "losses": []}
    folder, state_dir = os.path.join(out, "hf_checkpoint"), os.path.join(out, "hf_state")
    for step, ids in enumerate(data):
        result["losses"].append(train_step(model, optimizer, rows(ids)))
        if step + 1 == SAVE_AFTER:
            # transformers copies the custom code on every rank that has `_auto_class`; the plugin writes its extras
            # on rank 0 only. Only rank 0 copies code, so the ranks never race on the same files.
            if dist.get_rank():
                model._auto_class = None
            model.save_pretrained(folder, distributed_checkpoint=True)
            save_sharded_state(state_dir, model, optimizer)
            result["saved"] = full_state(model)
    result["final"] = full_state(model)
    result["files"] = sorted(os.listdir(folder))

    model = DeepseekV4ExtForCausalLM.from_pretrained(folder, distributed_config=config).train()
    result["reloaded"] = full_state(model)
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)
    load_sharded_state(state_dir, model, optimizer)
    result["resumed"] = [train_step(model, optimizer, rows(ids)) for ids in data[SAVE_AFTER:]]
    return result


def _transformers_bf16(out: str) -> dict:
    """bf16 weights with the fp32 islands (`sinks`, norms, mHC...), the plugin's default FSDP plan: 3 steps."""
    from transformers.distributed import DistributedConfig

    from modeling_deepseek_v4 import DeepseekV4ExtForCausalLM
    from modeling_deepseek_v4.fsdp_support import freeze_untrained_parameters

    config = DistributedConfig(fsdp_size=dist.get_world_size())
    model = DeepseekV4ExtForCausalLM.from_pretrained(
        os.path.join(out, "init"), dtype=torch.bfloat16, distributed_config=config
    ).train()
    freeze_untrained_parameters(model)
    optimizer = optimizer_for(model)
    result = {"layout": layout(model), "dtypes": {n: p.dtype for n, p in model.named_parameters()}}
    result["losses"] = [train_step(model, optimizer, rows(ids)) for ids in batches()]
    return result


SCENARIOS = {
    "transformers_bf16": _transformers_bf16,
    "accelerate_full": lambda out: _accelerate(out, lora=False),
    "accelerate_lora": lambda out: _accelerate(out, lora=True),
    "transformers": _transformers,
}


def run_all(rank: int, world: int, port: int, out: str) -> None:
    """`mp.spawn` target: every scenario in turn; each rank saves `{name: result or {"error": traceback}}` to
    `<out>/rank<r>.pt` (rank 0 with the gathered weights), after each scenario, so a hang still leaves a record."""
    results = {}
    with process_group(rank, world, port):
        for name, scenario in SCENARIOS.items():
            try:
                results[name] = scenario(out)
            except Exception:
                results[name] = {"error": traceback.format_exc()}
            if rank:  # the tests read rank 0's results; the others keep their errors only
                results[name] = {key: value for key, value in results[name].items() if key == "error"}
            torch.save(results, os.path.join(out, f"rank{rank}.pt"))
            dist.barrier()
