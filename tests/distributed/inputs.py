"""The inputs every multi-rank equivalence test compares on (each rank and the single process build the same ones)."""

from __future__ import annotations

import torch


def padded_rows() -> dict[str, torch.Tensor]:
    """Two rows of 24 tokens (several CSA / HCA entries, the indexer top-k selecting), the second left-padded by 5."""
    ids = torch.randint(2, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    return {"input_ids": ids, "attention_mask": mask}


def padded_prompts() -> dict[str, torch.Tensor]:
    """Two prompts of 160 tokens (many compressed entries, the indexer selecting), the second left-padded by 20."""
    ids = torch.randint(2, 97, (2, 160), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :20] = 0
    return {"input_ids": ids, "attention_mask": mask}


def greedy_generate(model) -> torch.Tensor:
    """Greedy decoding with the cache: 8 new tokens after `padded_prompts()` -> `[2, 168]`."""
    return model.generate(**padded_prompts(), max_new_tokens=8, do_sample=False, pad_token_id=0)
