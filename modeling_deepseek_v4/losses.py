"""Auxiliary training losses of DeepSeek-V4 (tech report §2.1, DeepSeekMoE balance loss).

The router balance loss is the Switch/DeepSeekMoE form `E * sum_e f_e * P_e` on score-routed layers (hash layers
have fixed routing and are excluded): `f_e` is the share of (token, slot) assignments that go to expert e under
top-k of the normalized scores, `P_e` the mean normalized score. Padding tokens are excluded.
"""

from __future__ import annotations

import torch


def router_balance_loss(
    router_scores: tuple[torch.Tensor, ...], top_k: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over layers of the balance loss.

    Args:
        router_scores: per score-routed layer, `[B * S, E]` non-negative router scores in input order.
        top_k: experts per token.
        attention_mask: `[B, past + S]` 0/1; its last S columns mark the real tokens.
    Returns: scalar fp32 tensor.
    """
    losses = []
    for scores in router_scores:
        tokens, experts = scores.shape
        probs = scores.float() / scores.float().sum(dim=-1, keepdim=True)
        if attention_mask is None:
            mask = torch.ones(tokens, device=scores.device)
        else:
            seq_len = tokens // attention_mask.shape[0]
            mask = attention_mask[:, -seq_len:].reshape(-1).to(scores.device, torch.float32)
        chosen = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, dim=-1).indices, 1.0)
        count = mask.sum().clamp(min=1.0)
        share = (chosen * mask.unsqueeze(1)).sum(0) / (count * top_k)
        mean_prob = (probs * mask.unsqueeze(1)).sum(0) / count
        # Layers of a model split across devices (accelerate `device_map`) score on their own devices.
        losses.append((experts * (share * mean_prob).sum()).to(router_scores[0].device))
    return torch.stack(losses).mean()
