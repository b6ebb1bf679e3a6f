"""Auxiliary training losses of DeepSeek-V4 (tech report §2.1; DeepSeek-V3 report §2.1.2, "complementary
sequence-wise auxiliary loss").

The router balance loss is `E * sum_e f_e * P_e` on score-routed layers (hash layers have fixed routing and are
excluded): `f_e` is the share of (token, slot) assignments that go to expert e under top-k of the normalized scores,
`P_e` the mean normalized score. DeepSeek computes both per sequence and averages the sequences' losses
(`seq_aux=True`, the default: it only keeps each sequence from collapsing onto a few experts, the batch-level balance
coming from the bias update of `training_callbacks.ExpertBiasBalancer`); `seq_aux=False` pools every token of the
batch (the Switch / DeepSeekMoE form). Padding tokens are excluded either way; a packed row counts as one sequence.
"""

from __future__ import annotations

import torch


def router_balance_loss(
    router_scores: tuple[torch.Tensor, ...],
    top_k: int,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 1,
    per_sequence: bool = False,
) -> torch.Tensor:
    """Mean over layers of the balance loss.

    Args:
        router_scores: per score-routed layer, `[B * S, E]` non-negative router scores in input order.
        top_k: experts per token.
        attention_mask: `[B, past + S]` 0/1; its last S columns mark the real tokens.
        batch_size: B (needed without `attention_mask` when `per_sequence`).
        per_sequence: the loss of each row, averaged over the rows holding real tokens; else one batch-wide loss.
    Returns: scalar fp32 tensor.
    """
    losses = []
    for scores in router_scores:
        tokens, experts = scores.shape
        rows = attention_mask.shape[0] if attention_mask is not None else batch_size
        probs = scores.float() / scores.float().sum(dim=-1, keepdim=True)
        if attention_mask is None:
            mask = torch.ones(tokens, device=scores.device)
        else:
            mask = attention_mask[:, -(tokens // rows) :].reshape(-1).to(scores.device, torch.float32)
        chosen = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, dim=-1).indices, 1.0)
        groups = rows if per_sequence else 1
        # [groups, tokens per group, E]: one loss per sequence, or one for the whole batch.
        mask = mask.view(groups, -1, 1)
        chosen, probs = chosen.view(groups, -1, experts), probs.view(groups, -1, experts)
        count = mask.sum(dim=1)
        share = (chosen * mask).sum(dim=1) / (count.clamp(min=1.0) * top_k)
        mean_prob = (probs * mask).sum(dim=1) / count.clamp(min=1.0)
        per_group = experts * (share * mean_prob).sum(dim=-1)
        real = (count.squeeze(-1) > 0).float()
        loss = (per_group * real).sum() / real.sum().clamp(min=1.0)
        # Layers of a model split across devices (accelerate `device_map`) score on their own devices.
        losses.append(loss.to(router_scores[0].device))
    return torch.stack(losses).mean()
