"""Saving and loading grouped LoRA adapters trained on sharded bases (expert_lora.py).

Under transformers' EP (`grouped_gemm`: banks `Shard(0)` over the EP mesh) each rank's `DeepseekV4ExpertsLora` holds
the factors of its own experts only (`[E_local, ...]`); under TP, `o_a_proj`'s rows are split by head groups and each
rank's `DeepseekV4GroupedLinearLora` holds the factors of its own groups (`[g_local, ...]`). A saved adapter must not
depend on the layout it was trained on: the state-dict hook gathers the factors of all experts / groups (a PEFT
adapter folder equal to a one-process one), and the load hook gives each rank its slice of a full adapter. Shared
expert factors (`rank_pattern={"experts.shared": 1}`, `[1, ...]`) are replicated and pass through unchanged.
The group the factors are split over: `layer.factor_group()`.
"""

from __future__ import annotations

import torch
from torch import nn


def _sharded_factor_keys(layer: nn.Module, prefix: str):
    """(state-dict key, local factor) of the per-expert / per-group factors `[E_local or g_local, ...]` (not the shared
    expert factors `[1, ...]`)."""
    shared = getattr(layer, "shared_factors", {})
    for kind in ("lora_A", "lora_B"):
        for adapter, factors in getattr(layer, kind).items():
            if not shared.get(adapter):
                for name, param in factors.named_parameters():
                    yield f"{prefix}{kind}.{adapter}.{name}", param


def gather_sharded_factors(layer, state_dict, prefix, local_metadata) -> None:
    """State-dict post-hook on sharded bases: each rank's `[E_local, ...]` (`[g_local, ...]`) factors gathered into
    `[E, ...]` (`[g, ...]`; rank order is expert / group order: the bases are `Shard(0)`), so a saved adapter holds
    every expert and group and loads anywhere. A collective: every rank of the group calls `state_dict()` (PEFT's
    `save_pretrained` does, on all ranks, and so does the Trainer for models sharded at load)."""
    group = layer.factor_group()
    for key, _ in _sharded_factor_keys(layer, prefix):
        if key in state_dict:
            local = state_dict[key].detach().contiguous()
            parts = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size(group))]
            torch.distributed.all_gather(parts, local, group=group)
            state_dict[key] = torch.cat(parts)


def slice_sharded_factors(layer, state_dict, prefix, *args) -> None:
    """Load pre-hook on sharded bases: factors saved for all experts / groups keep this rank's slice."""
    group = layer.factor_group()
    rank, size = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
    for key, param in _sharded_factor_keys(layer, prefix):
        full = state_dict.get(key)
        if full is not None and full.shape[0] == param.shape[0] * size and size > 1:
            state_dict[key] = full[rank * param.shape[0] : (rank + 1) * param.shape[0]]


__all__ = ["gather_sharded_factors", "slice_sharded_factors"]
