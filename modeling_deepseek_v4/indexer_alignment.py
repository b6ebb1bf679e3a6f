"""Indexer alignment loss (issue #14): keep the lightning indexer in step with the main attention during
fine-tuning, as DeepSeek trained the DSA indexer (DeepSeek-V3.2 tech report §2.1, "sparse training stage"; V4 tech
report §2.3.2 reuses the indexer).

Per CSA layer and real query t, over the compressed entries S_t the indexer selected (top-k):
- target p_t(s): the main attention's distribution over S_t, each head's softmax of `q_h . K_s * scale` restricted to
  S_t, averaged over heads; no gradient (the main attention is not trained by this loss);
- indexer q_t(s) = softmax over S_t of `I[t, s] = sum_j w[t, j] relu(q^I_j . K^I_s)`;
- loss = mean over queries of KL(p_t || q_t).
The indexer runs on detached inputs while the loss is on (its top-k has no gradient anyway), so the loss trains only
the indexer's own projections and compressor. Computed in query chunks: memory O(chunk * heads * k).
"""

from __future__ import annotations

import torch


def _gather_entries(entries: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """entries `[B, N, c]`, idx `[B, s, k]` (>= 0) -> `[B, s, k, c]`."""
    b, s, k = idx.shape
    flat = torch.gather(entries, 1, idx.reshape(b, s * k, 1).expand(-1, -1, entries.shape[-1]))
    return flat.view(b, s, k, -1)


def indexer_alignment_kl(
    q: torch.Tensor,
    compressed: torch.Tensor,
    topk_idx: torch.Tensor,
    scaling: float,
    index_q: torch.Tensor,
    index_keys: torch.Tensor,
    index_weights: torch.Tensor,
    lengths: torch.Tensor,
    chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of KL over queries, number of queries) for one CSA layer.

    q `[B, S, H, D]` main queries; compressed `[B, N, D]` main compressed entries; topk_idx `[B, S, k]` (-1 = none);
    index_q `[B, S, H_I, c]`, index_keys `[B, N, c]`, index_weights `[B, S, H_I]` (the indexer's, with gradient);
    lengths `[B]` real tokens per (compacted) row. Rows without a selected entry count nothing."""
    b, s = topk_idx.shape[:2]
    total = q.new_zeros((), dtype=torch.float32)
    count = torch.zeros((), dtype=torch.long, device=q.device)
    real = torch.arange(s, device=q.device).unsqueeze(0) < lengths.unsqueeze(1)  # [B, S]
    for i0 in range(0, s, chunk):
        idx = topk_idx[:, i0 : i0 + chunk]
        valid = idx >= 0
        rows = valid.any(-1) & real[:, i0 : i0 + chunk]
        if not bool(rows.any()):
            continue
        safe = idx.clamp(min=0)
        with torch.no_grad():
            kv = _gather_entries(compressed, safe).float()
            logits = torch.einsum("bshd,bskd->bshk", q[:, i0 : i0 + chunk].float(), kv) * scaling
            logits = logits.masked_fill(~valid.unsqueeze(2), float("-inf"))
            target = torch.softmax(logits, dim=-1).nan_to_num_(0.0).mean(dim=2)  # [B, s, k]
        keys = _gather_entries(index_keys, safe).float()
        scores = torch.einsum("bshc,bskc->bshk", index_q[:, i0 : i0 + chunk].float(), keys).relu()
        index_scores = (scores * index_weights[:, i0 : i0 + chunk].float().unsqueeze(-1)).sum(dim=2)
        log_q = torch.log_softmax(index_scores.masked_fill(~valid, float("-inf")), dim=-1)
        terms = torch.where(valid & (target > 0), target * (target.clamp_min(1e-30).log() - log_q), 0.0)
        total = total + terms.sum(-1)[rows].sum()
        count = count + rows.sum()
    return total, count
