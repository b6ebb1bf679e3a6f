"""Saving and loading grouped expert LoRA adapters trained under expert parallelism (expert_lora.py).

Under transformers' EP (`grouped_gemm`: banks `Shard(0)` over the EP mesh) each rank's `DeepseekV4ExpertsLora` holds
the factors of its own experts only (`[E_local, ...]`). A saved adapter must not depend on the layout it was trained
on: the state-dict hook gathers the factors of all `E` experts (a PEFT adapter folder equal to a one-process one), and
the load hook gives each rank its slice of a full adapter. Shared factors (`rank_pattern={"experts.shared": 1}`,
`[1, ...]`) are replicated and pass through unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from .parallel_plans import expert_group


def _per_expert_keys(layer: nn.Module, prefix: str):
    """(state-dict key, local factor) of the per-expert factors `[E_local, ...]` (not the shared ones `[1, ...]`)."""
    for kind in ("lora_A", "lora_B"):
        for adapter, factors in getattr(layer, kind).items():
            if not layer.shared_factors.get(adapter):
                for name, param in factors.named_parameters():
                    yield f"{prefix}{kind}.{adapter}.{name}", param


def gather_expert_factors(layer, state_dict, prefix, local_metadata) -> None:
    """State-dict post-hook under expert parallelism: each rank's `[E_local, ...]` factors gathered into `[E, ...]`
    (rank order is expert order: `grouped_gemm` shards the banks `Shard(0)`), so a saved adapter holds every expert
    and loads anywhere. A collective: every rank of the EP group calls `state_dict()` (PEFT's `save_pretrained` does,
    on all ranks, and so does the Trainer for models sharded at load)."""
    group = expert_group(layer.get_base_layer())
    for key, _ in _per_expert_keys(layer, prefix):
        if key in state_dict:
            local = state_dict[key].detach().contiguous()
            parts = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size(group))]
            torch.distributed.all_gather(parts, local, group=group)
            state_dict[key] = torch.cat(parts)


def slice_expert_factors(layer, state_dict, prefix, *args) -> None:
    """Load pre-hook under expert parallelism: factors saved for all `E` experts keep this rank's `[E_local, ...]`."""
    group = expert_group(layer.get_base_layer())
    rank, size = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
    for key, param in _per_expert_keys(layer, prefix):
        full = state_dict.get(key)
        if full is not None and full.shape[0] == param.shape[0] * size and size > 1:
            state_dict[key] = full[rank * param.shape[0] : (rank + 1) * param.shape[0]]


__all__ = ["gather_expert_factors", "slice_expert_factors"]
