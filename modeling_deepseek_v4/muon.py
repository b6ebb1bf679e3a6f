"""Muon as DeepSeek-V4 trains with it (tech report §2.4 "Muon optimizer"): momentum, then the update of every hidden
matrix orthogonalised by a hybrid Newton-Schulz iteration (8 steps with coefficients (3.4445, -4.7750, 2.0315) for
fast convergence, then 2 with (2, -1.5, 0.5) to settle the singular values at 1), rescaled to AdamW's update RMS
(`0.2 * sqrt(max(out, in))`, Moonlight), with decoupled weight decay. Each routed expert's matrix is its own matrix:
a 3-D bank `[E, out, in]` runs the iteration batched over E. AdamW updates what is not a hidden matrix: embeddings,
the LM head, norms, biases, mHC parameters, attention sinks and compressor position biases.

`muon_optimizer(model, lr=...)` returns one `torch.optim.Optimizer` holding both kinds of group, so its
`state_dict()` saves and resumes like any optimizer: pass `optimizers=(muon_optimizer(model, ...), None)` to
`Trainer`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# (a, b, c) of X <- a X + (b A + c A @ A) X, A = X X^T
NS_FAST = (3.4445, -4.7750, 2.0315)
NS_SETTLE = (2.0, -1.5, 0.5)
NS_SCHEDULE = (NS_FAST,) * 8 + (NS_SETTLE,) * 2

# parameters AdamW updates (tech report §2.4): matched on the name
_ADAMW_NAMES = ("embed_tokens", "lm_head", "hc", "sinks", "position_bias", "ape", "norm", "bias", "tid2eid")


def newton_schulz(g: torch.Tensor, schedule=NS_SCHEDULE, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalise each matrix of g `[..., m, n]` (same shape out): normalise by the Frobenius
    norm, then iterate `X <- a X + (b A + c A A) X` with `A = X X^T` on the wide orientation (m <= n)."""
    x = g / (g.norm(dim=(-2, -1), keepdim=True) + eps)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.transpose(-2, -1)
    for a, b, c in schedule:
        gram = x @ x.transpose(-2, -1)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.transpose(-2, -1) if tall else x


def is_muon_parameter(name: str, param: nn.Parameter) -> bool:
    """Hidden matrices (2-D linears, 3-D expert banks), not the AdamW kinds of `_ADAMW_NAMES`."""
    return param.ndim >= 2 and not any(part in name for part in _ADAMW_NAMES)


class DeepseekV4Muon(torch.optim.Optimizer):
    """Groups with `use_muon=True` take Muon steps, the others AdamW steps (`betas`, `eps`)."""

    def __init__(self, params, lr=2e-4, weight_decay=0.1, momentum=0.95, nesterov=True, betas=(0.9, 0.95), eps=1e-8):
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, betas=betas, eps=eps, use_muon=True
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            if group["use_muon"]:
                self._muon(group, params)
            else:
                self._adamw(group, params)
        return loss

    def _muon(self, group, params) -> None:
        for p in params:
            state = self.state[p]
            buf = state.setdefault("momentum_buffer", torch.zeros_like(p, dtype=torch.float32))
            grad = p.grad.float()
            buf.mul_(group["momentum"]).add_(grad)
            update = grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
            update = newton_schulz(update)
            scale = 0.2 * math.sqrt(max(p.shape[-2], p.shape[-1]))
            p.add_(update.to(p.dtype), alpha=-group["lr"] * scale)

    def _adamw(self, group, params) -> None:
        beta1, beta2 = group["betas"]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            state["step"] += 1
            step = float(state["step"])
            grad = p.grad.float()
            state["exp_avg"].lerp_(grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(group["eps"])
            p.add_((state["exp_avg"] / (1 - beta1**step) / denom).to(p.dtype), alpha=-group["lr"])


def muon_optimizer(model: nn.Module, lr: float = 2e-4, adamw_lr: float | None = None, **kwargs) -> DeepseekV4Muon:
    """One optimizer for `model`'s trainable parameters: Muon on the hidden matrices, AdamW (at `adamw_lr`, default
    `lr`) on the rest. For `Trainer(optimizers=(muon_optimizer(model, lr=...), None))`."""
    muon, adamw = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (muon if is_muon_parameter(name, param) else adamw).append(param)
    groups = [{"params": muon, "use_muon": True}, {"params": adamw, "use_muon": False, "lr": adamw_lr or lr}]
    return DeepseekV4Muon([g for g in groups if g["params"]], lr=lr, **kwargs)


__all__ = ["DeepseekV4Muon", "NS_SCHEDULE", "is_muon_parameter", "muon_optimizer", "newton_schulz"]
