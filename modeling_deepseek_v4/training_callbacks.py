"""DeepSeek's auxiliary-loss-free load balancing as a `TrainerCallback` (DeepSeek-V3 tech report §2.1.2, kept in
V4 §2.1): after each optimizer step, every score-routed gate's `e_score_correction_bias` moves by `speed` toward
balance, `b_e += speed * sign(mean_load - load_e)`, where `load_e` counts the (token, slot) assignments expert e
received over the whole step (all gradient-accumulation micro-batches, summed over data-parallel ranks). The bias
only chooses experts (it never weights them), so it needs no gradient. Hash-routed layers have no bias and are left
alone. Off unless the callback is passed to `Trainer(callbacks=[ExpertBiasBalancer(speed=1e-3)])`.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .batch_meta import BatchMeta
from .moe import DeepseekV4TopKRouter

try:  # optional at import: the class is usable without transformers' Trainer stack loaded
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - transformers is a hard dependency of the package
    TrainerCallback = object


class ExpertBiasBalancer(TrainerCallback):
    """Counts expert loads from the routers' forward passes (training mode only) and updates the selection biases
    once per optimizer step. `speed`: the bias step (DeepSeek-V3 used 0.001). Works outside the Trainer too:
    `attach(model)`, run training forwards, then `update()` after each optimizer step."""

    def __init__(self, speed: float = 1e-3):
        if not speed > 0:
            raise ValueError(f"ExpertBiasBalancer: speed must be > 0, got {speed!r}")
        self.speed = speed
        self._counts: dict[nn.Module, torch.Tensor] = {}
        self._real: dict[nn.Module, tuple[torch.Tensor, int] | None] = {}
        self._hooks: list = []

    def attach(self, model: nn.Module) -> ExpertBiasBalancer:
        """Hook every score-routed gate of `model` (idempotent), and its decoder block to learn which of the
        block's token slots are padding (the compacted rows of a padded batch end in pads, which are not counted)."""
        if self._hooks:
            return self
        for block in model.modules():
            gate = getattr(getattr(block, "mlp", None), "gate", None)
            if isinstance(gate, DeepseekV4TopKRouter) and hasattr(gate, "e_score_correction_bias"):
                remember = functools.partial(self._remember_rows, gate)
                self._hooks.append(block.register_forward_pre_hook(remember, with_kwargs=True))
                self._hooks.append(gate.register_forward_hook(self._count))
        return self

    def _remember_rows(self, gate: nn.Module, block: nn.Module, args, kwargs) -> None:
        meta = next((a for a in (*args, *kwargs.values()) if isinstance(a, BatchMeta)), None)
        self._real[gate] = None if meta is None else (meta.lengths, meta.positions.shape[-1])

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._counts.clear()
        self._real.clear()

    def _count(self, module: nn.Module, args, output) -> None:
        if not module.training:
            return
        indices = output[-1]
        rows = self._real.get(module)
        if rows is not None and rows[0].numel() * rows[1] == indices.shape[0]:  # [B * S, K]: drop the pad slots
            lengths, seq_len = rows
            real = torch.arange(seq_len, device=indices.device) < lengths.to(indices.device).unsqueeze(1)
            indices = indices[real.reshape(-1)]
        # recomputation under gradient checkpointing counts a layer twice: every expert alike, the signs unchanged
        load = torch.bincount(indices.reshape(-1), minlength=module.num_experts).to(torch.float32)
        self._counts[module] = self._counts.get(module, 0) + load

    @torch.no_grad()
    def update(self) -> int:
        """Apply one bias step from the loads counted since the last one; returns how many gates moved."""
        moved = 0
        for module, load in self._counts.items():
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(load)  # the global load of the step, the same update on every rank
            if load.sum() == 0:
                continue
            bias = module.e_score_correction_bias
            bias.add_(torch.sign(load.mean() - load).to(bias.device, bias.dtype), alpha=self.speed)
            moved += 1
        self._counts.clear()
        return moved

    # TrainerCallback hooks
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.attach(model)

    def on_step_end(self, args, state, control, **kwargs):
        self.update()

    def on_train_end(self, args, state, control, **kwargs):
        self.detach()


__all__ = ["ExpertBiasBalancer"]
