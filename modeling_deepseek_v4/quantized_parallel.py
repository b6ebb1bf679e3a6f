"""Tensor and expert parallelism for the weights kept quantized in buffers (FP8 linears, FP4 / FP8 expert banks).

transformers' distributed engine shards `nn.Parameter`s only (parallel_plans.py), and `quantized_modules.py` keeps the
official FP8 / FP4 bytes in buffers. This file gives those buffers the layout their dense counterparts get from the
same plan rules, before any weight is read:

- each quantized buffer of a module the resolved TP / EP plan names becomes a DTensor placeholder with the rule's
  placement: colwise `Shard(0)` / rowwise `Shard(1)` for FP8 linears (2-D `[out, in]`), `grouped_gemm` `Shard(0)` over
  the EP mesh for expert banks `[E, rows, cols]`, and under `moe_tp_experts` the gate and up halves split alike
  (`packed_colwise`, `_StridedShard(1, 2)`) with `down_proj` split on its input columns (`rowwise`, `Shard(2)`);
- the scales take the data's placement (same dims, one scale row / column per block), so a slice must cover whole
  scale blocks: checked here with an error naming the module, the sizes and what to do;
- transformers' loader then reads only this rank's slice of each tensor (`DtensorShardOperation`, shard-on-read: a
  rank never holds the whole bank), and `state_dict()` gives them whole (`gather_buffers`, a collective: float8
  goes as bytes, which gloo can all-gather), so `save_pretrained` and PEFT's adapter save work; the forwards use the
  local slice (`_KeepsStorageDtype.stored`).

The rules naming such buffers (`experts.gate_up_proj: grouped_gemm`, `o_a_proj.weight: colwise`...) are taken out of
the model's plan before transformers validates it, which would otherwise warn that they "match nothing" (it lists
parameters only), and applied here instead.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.utils import is_torch_distributed_available

from .fsdp_support import one_dtype_per_unit
from .parallel_plans import local_tensor, rewrap_like

if is_torch_distributed_available():
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

COLWISE = frozenset({"colwise", "colwise_rep", "colwise_gather_output"})
ROWWISE = frozenset({"rowwise", "rowwise_rep", "rowwise_split_input"})


def _wildcard(name: str) -> str:
    from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

    return replace_layer_number_by_wildcard(name)


def _quantized_modules(model: nn.Module):
    """(name, module) of the modules whose quantized buffers this file can shard (`_buffer_layout` set by
    quantized_modules.py: "linear" for FP8 `[out, in]`, "experts" for banks `[E, rows, cols]`)."""
    return [(n, m) for n, m in model.named_modules() if getattr(m, "_buffer_layout", None)]


def take_buffer_rules(model: nn.Module) -> dict[tuple[str, str], str]:
    """Remove from `model._tp_plan` / `model._ep_plan` the rules that name a quantized buffer; returns them as
    `{("tp" | "ep", wildcard buffer name): style}`."""
    buffers = {_wildcard(f"{n}.{b}") for n, m in _quantized_modules(model) for b in m._quantized_buffers}
    taken = {}
    for kind in ("tp", "ep"):
        plan = getattr(model, f"_{kind}_plan", None) or {}
        for key in [k for k in plan if k in buffers]:
            taken[(kind, key)] = plan.pop(key)
    return taken


def _check_slices(name: str, module: nn.Module, placements: dict, size: int, kind: str) -> None:
    """Raise unless every rank's slice of every data buffer covers whole scale blocks (and whole experts)."""
    fmt = module.format
    for buffer, placement in placements.items():
        if buffer.endswith("_scale_inv"):
            continue
        shape = list(fmt.dense_shape(tuple(module._buffers[buffer].shape)))
        dim = placement.dim % len(shape)
        halves = 2 if isinstance(placement, _StridedShard) else 1
        length = shape[dim] // halves
        if len(shape) == 3 and dim == 0:
            unit, what = 1, "experts"
        elif dim == len(shape) - 2:
            unit, what = fmt.block[0], "rows" + (" per gate / up half" if halves > 1 else "")
        else:
            unit, what = max(fmt.block[1], fmt.per_element), "input columns"
        if length % size or (length // size) % unit:
            raise ValueError(
                f"{name}.{buffer} ({fmt.key}): {kind}_size={size} would split its {length} {what} into slices of "
                f"{length / size:g}, but each rank must hold whole {fmt.key} scale blocks ({unit} {what}). Use a "
                f"{kind}_size whose slices are multiples of {unit}, or load a dense copy "
                "(`dsv4-convert to-hf --dtype bf16`)."
            )


def _experts_placements(style: str, bank_styles: tuple[str | None, str | None]) -> dict:
    gate_up, down = bank_styles
    if style == "ep_dispatch_experts" and gate_up == down == "grouped_gemm":
        return dict.fromkeys(("gate_up_proj", "gate_up_proj_scale_inv", "down_proj", "down_proj_scale_inv"), Shard(0))
    if style == "moe_tp_experts" and (gate_up, down) == ("packed_colwise", "rowwise"):
        packed = _StridedShard(1, split_factor=2)
        return {"gate_up_proj": packed, "gate_up_proj_scale_inv": packed, "down_proj": Shard(2),
                "down_proj_scale_inv": Shard(2)}  # fmt: skip
    return {}


def shard_quantized_buffers(model: nn.Module, mesh_manager, tp_plan: dict, ep_plan: dict, taken: dict) -> None:
    """Turn the quantized buffers of the modules in the resolved (expanded) `tp_plan` / `ep_plan` into DTensor
    placeholders on the plan's mesh, before the weights load. Idempotent."""
    for name, module in _quantized_modules(model):
        kind = "ep" if name in ep_plan else "tp" if name in tp_plan else None
        if kind is None or getattr(module, "_buffers_sharded", False):
            continue
        style = (ep_plan if kind == "ep" else tp_plan)[name]
        if module._buffer_layout == "experts":
            banks = tuple(taken.get((kind, _wildcard(f"{name}.{b}"))) for b in ("gate_up_proj", "down_proj"))
            placements = _experts_placements(style, banks)
            rule = f"{style!r} with banks {banks}"
        else:
            weight_style = taken.get((kind, _wildcard(f"{name}.weight")), style)
            dim = 0 if weight_style in COLWISE else 1 if weight_style in ROWWISE else None
            placements = dict.fromkeys(module._quantized_buffers, Shard(dim)) if dim is not None else {}
            rule = repr(weight_style)
        if not placements:
            raise NotImplementedError(
                f"{name} keeps its weights quantized ({module.format.key}) and its {kind} plan rule {rule} has no "
                "quantized layout here: use the model's default plan for this module, or load a dense copy "
                "(`dsv4-convert to-hf --dtype bf16`)."
            )
        mesh = mesh_manager.get_mesh(kind)
        _check_slices(name, module, placements, mesh.size(), kind)
        for buffer, placement in placements.items():
            module._buffers[buffer] = distribute_tensor(module._buffers[buffer], mesh, [placement], src_data_rank=None)
        if kind == "ep":
            # what `grouped_gemm` does for parameter banks: this rank's count, and routes to other ranks' experts
            # (local id `num_experts`) are dropped by `DeepseekV4Experts.forward`
            module.num_experts //= mesh.size()
            module._is_expert_parallel = True
        elif isinstance(module, nn.Linear):
            # transformers' colwise / rowwise styles then run the forward on local tensors in training too
            module._hf_quantized_needs_local_tp = True
        module._buffers_sharded = True
        module.register_state_dict_post_hook(gather_buffers)


class QuantizedParallelMixin:
    """`PreTrainedModel` mixin for `from_pretrained(..., distributed_config=...)`: the quantized buffers are sharded
    too, and each FSDP2 unit holds one dtype (`fsdp_support.one_dtype_per_unit`: bf16 models with fp32 islands)."""

    def _resolve_parallel_plans(self, distributed_config):
        # outermost: the plans come back resolved and, under PP, cut to this stage (pipeline_support.py), so only the
        # buffers of modules this rank keeps are sharded
        taken = take_buffer_rules(self)
        tp_plan, ep_plan, fsdp_plan = super()._resolve_parallel_plans(distributed_config)
        fsdp_plan = one_dtype_per_unit(self, fsdp_plan)
        # `maybe_distribute_model` sets the mesh manager before it resolves the plans
        shard_quantized_buffers(self, self._mesh_manager, tp_plan, ep_plan, taken)
        return tp_plan, ep_plan, fsdp_plan


def gather_buffers(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict post-hook of a module with sharded quantized buffers: each comes out whole (float8 through a uint8
    view: gloo cannot all-gather float8), whoever asks (transformers' `save_pretrained`, PEFT's adapter save, which
    gathers every DTensor of the model itself). A collective: every rank calls `state_dict()`, as those do."""
    for name in module._quantized_buffers:
        value = state_dict.get(prefix + name)
        # meta: transformers' loader reads the placeholders' placements from `state_dict()` (shard-on-read)
        if not hasattr(value, "device_mesh") or value.is_meta:
            continue
        if value.element_size() == 1 and value.dtype.is_floating_point:
            full = rewrap_like(local_tensor(value).view(torch.uint8), value).full_tensor().view(value.dtype)
        else:
            full = value.full_tensor()
        state_dict[prefix + name] = full


__all__ = ["QuantizedParallelMixin", "shard_quantized_buffers", "take_buffer_rules"]
