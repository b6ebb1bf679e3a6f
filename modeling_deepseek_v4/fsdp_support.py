"""FSDP2 helpers: parameters no loss trains, and a sharded save / resume of model + optimizer (issue #16).

Why they exist:
- With `mtp_loss_weight = 0` the MTP block gets no gradient, and with `indexer_loss_weight = 0` neither does the
  lightning indexer (its top-k has no gradient; `indexer_alignment.py`). An optimizer then holds no state for them,
  while `torch.distributed.checkpoint.state_dict.get_optimizer_state_dict` on a *fresh* optimizer (what every
  sharded resume calls, accelerate's `load_state` included) first runs a zero-gradient step that gives every
  trainable parameter a state. The load then asks the checkpoint for states it never had and fails with
  "Missing key in checkpoint state_dict: optimizer.state.model.layers.2.self_attn.compressor.indexer...".
  `freeze_untrained_parameters` (before building the optimizer) avoids that and saves their optimizer memory;
  `load_sharded_state` copes without it.
- transformers' Trainer refuses to resume a model sharded at load (`from_pretrained(distributed_config=
  DistributedConfig(fsdp_size=...))`). `save_sharded_state` / `load_sharded_state` are the resume path for such
  models (and for any FSDP2 model): one `torch.distributed.checkpoint` folder with the model's sharded parameters,
  its buffers (router `e_score_correction_bias`, hash `tid2eid`) and the optimizer state keyed by parameter name,
  written and read by every rank. Tensor + FSDP meshes with strided shards are not covered (FSDP only).
"""

from __future__ import annotations

import os

from torch import nn

# (substring of a parameter name, config weight whose 0 means no loss reaches it)
_UNTRAINED_PARTS = ((".indexer.", "indexer_loss_weight"), (".mtp.", "mtp_loss_weight"))
# Wrapper prefixes that torch's state-dict helpers drop from names (activation checkpointing, torch.compile).
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.")


def untrained_parameter_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters that no loss reaches with the model's config: the lightning indexer without
    `indexer_loss_weight` and the MTP block without `mtp_loss_weight` (a PEFT model: their LoRA factors)."""
    config = getattr(model, "config", None)
    parts = [part for part, weight in _UNTRAINED_PARTS if not getattr(config, weight, 0)]
    return [name for name, p in model.named_parameters() if p.requires_grad and any(s in f".{name}" for s in parts)]


def freeze_untrained_parameters(model: nn.Module) -> list[str]:
    """`requires_grad_(False)` on `untrained_parameter_names(model)`; call before building the optimizer (and before
    `accelerator.prepare`, so that accelerate's `load_state` resumes). Returns the names frozen."""
    names = untrained_parameter_names(model)
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(False)
    return names


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Optimizer state keyed "state.<parameter name>.<field>": independent of parameter groups and their order.
    return StateDictOptions(flatten_optimizer_state_dict=True)


def save_sharded_state(directory: str | os.PathLike, model: nn.Module, optimizer=None) -> None:
    """Write `{"model": ..., "optimizer": ...}` of an FSDP2 (or unsharded) model with `torch.distributed.checkpoint`:
    each rank writes its shards, replicated tensors (buffers) once. Every rank must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer, options=_options())
    dcp.save(state, checkpoint_id=os.fspath(directory))


def load_sharded_state(directory: str | os.PathLike, model: nn.Module, optimizer=None) -> None:
    """Read what `save_sharded_state` wrote into `model` (sharded like the saver's or otherwise: DCP reshards) and
    `optimizer` (fresh, built over the same parameter names). Every model tensor must be in the checkpoint; a
    parameter without optimizer state there (it never had a gradient) ends without state, as if never stepped, so
    continuing equals not stopping. Every rank must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    directory = os.fspath(directory)
    model_state = get_model_state_dict(model)
    state = {"model": model_state}
    optim_state, missing = None, set()
    if optimizer is not None:
        # On a fresh optimizer this runs a zero-gradient step (lr 0) that gives every trainable parameter a state.
        optim_state = get_optimizer_state_dict(model, optimizer, options=_options())
        saved = set(dcp.FileSystemReader(directory).read_metadata().state_dict_metadata)
        missing = {key for key in optim_state if key.startswith("state.") and f"optimizer.{key}" not in saved}
        state["optimizer"] = {key: value for key, value in optim_state.items() if key not in missing}
    dcp.load(state, checkpoint_id=directory)  # in place for tensors; non-tensor values are replaced in `state`
    set_model_state_dict(model, state["model"])
    if optimizer is None:
        return
    optim_state.update(state["optimizer"])
    set_optimizer_state_dict(model, optimizer, optim_state, options=_options())
    unstepped = {key[len("state.") :].rpartition(".")[0] for key in missing}
    for name, param in model.named_parameters():
        for part in _WRAPPER_PARTS:
            name = name.replace(part, "")
        if name in unstepped:
            optimizer.state.pop(param, None)


__all__ = ["freeze_untrained_parameters", "load_sharded_state", "save_sharded_state", "untrained_parameter_names"]


def _managed_dtypes(name: str, module: nn.Module, units: set[str]) -> set:
    """dtypes of the parameters FSDP2 would give the unit `name`: its own, minus those under deeper units."""
    prefix = f"{name}." if name else ""
    deeper = [u[len(prefix) :] + "." for u in units if u != name and u.startswith(prefix)]
    return {p.dtype for n, p in module.named_parameters() if not any(n.startswith(d) for d in deeper)}


def one_dtype_per_unit(model: nn.Module, fsdp_plan: dict[str, str]) -> dict[str, str]:
    """The resolved FSDP2 plan of `DistributedConfig(fsdp_size=...)` with each unit holding one dtype.

    FSDP2 shards and all-gathers a unit's parameters as one flat buffer and refuses mixed dtypes, while this model
    keeps fp32 islands inside bf16 modules (`_keep_in_fp32_modules_strict`: attention `sinks` next to its bf16
    projections, the final `norm` next to the bf16 `lm_head` that transformers groups with it). transformers gives the
    fp32 owners their own units, but such an owner (`self_attn`) still takes its bf16 children. Here every unit
    (and the root) whose parameters mix dtypes gets its children as units of their own, until none mixes; a mixed
    norm + head tail is no longer kept whole together. Returns the plan deepest first, as transformers applies it."""
    if not fsdp_plan:
        return fsdp_plan
    plan, modules = dict(fsdp_plan), dict(model.named_modules())
    keep = [n for n, style in plan.items() if style == "keep_full_weight"]
    if len({p.dtype for n in keep for p in modules[n].parameters()}) > 1:
        largest = max(keep, key=lambda n: sum(p.numel() for p in modules[n].parameters()))
        dtype = next(modules[largest].parameters()).dtype
        for n in keep:
            if {p.dtype for p in modules[n].parameters()} != {dtype}:
                plan[n] = "free_full_weight"
    pending = ["", *plan]
    while pending:
        name = pending.pop()
        if len(_managed_dtypes(name, modules[name], set(plan))) <= 1:
            continue
        for child, sub in modules[name].named_children():
            full = f"{name}.{child}" if name else child
            if full not in plan and any(True for _ in sub.parameters()):
                plan[full] = "free_full_weight"
                pending.append(full)
    return dict(sorted(plan.items(), key=lambda item: item[0].count("."), reverse=True))
