"""Shared fixtures: tiny random DeepSeek-V4 configs and models (fp32, CPU).

Schedules mirror the official ones at toy scale: compress rates 4 (CSA) and 8 (HCA, instead of 128) so that short
sequences emit several HCA entries, and `index_topk` 3 is smaller than the number of CSA entries so that the
indexer really selects.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from modeling_deepseek_v4 import DeepseekV4ExtConfig, DeepseekV4ExtForCausalLM, ops

# Tiny ops stall with 2 threads on a 2-core box (performance.md §0).
torch.set_num_threads(1)

SCHEDULES = {
    # official Flash: [0, 0] + [4, 128] * k + [4] + [0] (MTP)
    "flash": [0, 0, 4, 8, 4, 0],
    # official Pro: [128, 128] + [4, 128] * k + [4] + [0] (MTP)
    "pro": [8, 8, 4, 8, 4, 0],
}


def tiny_config(schedule: str = "flash", **overrides) -> DeepseekV4ExtConfig:
    ratios = SCHEDULES[schedule]
    kwargs = dict(
        vocab_size=97,
        hidden_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=len(ratios) - 1,
        num_attention_heads=4,
        head_dim=32,
        qk_rope_head_dim=8,
        q_lora_rank=32,
        o_groups=2,
        o_lora_rank=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        index_n_heads=8,
        index_head_dim=16,
        index_topk=3,
        sliding_window=8,
        compress_ratios=ratios,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        num_hash_layers=2,
        attn_chunk_size=16,
        indexer_chunk_size=16,
    )
    kwargs.update(overrides)
    return DeepseekV4ExtConfig(**kwargs)


def tiny_model(schedule: str = "flash", seed: int = 0, **overrides) -> DeepseekV4ExtForCausalLM:
    """A random tiny model whose zero-initialized parameters (sinks, biases, ape) are randomized too."""
    torch.manual_seed(seed)
    model = DeepseekV4ExtForCausalLM(tiny_config(schedule, **overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("position_bias", "sinks", ".base", "hc_base")):
                param.normal_(0.0, 0.5)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.1)
    return model


def tiny_dspark_model(block: int = 4, seed: int = 0) -> DeepseekV4ExtForCausalLM:
    """The tiny -0731-shaped model: 5 main layers and a 3-stage DSpark drafter tapping layers 1-3 (vocabulary 97, noise
    token 96, Markov rank 8, block size `block`)."""
    return tiny_model(
        "flash",
        seed=seed,
        compress_ratios=[0, 0, 4, 8, 4, 0, 0, 0],
        dspark_num_stages=3,
        dspark_block_size=block,
        dspark_noise_token_id=96,
        dspark_target_layer_ids=[1, 2, 3],
        dspark_markov_rank=8,
    )


@pytest.fixture(params=sorted(SCHEDULES))
def schedule(request) -> str:
    return request.param


@contextlib.contextmanager
def record_indexer_margin():
    """Record the smallest gap between the k-th and (k+1)-th indexer score over every query that selects.

    Yields a list that receives one float per indexer call; a positive minimum certifies the inputs are free of
    ties at the selection boundary (where transformers' native tie order is arbitrary).
    """
    margins: list[float] = []

    def recording(q, keys, weights, positions, ratio, topk, chunk=256, head_group=8, **kwargs):
        scores = torch.relu(torch.einsum("bshd,bnd->bshn", q.double(), keys.double())) * weights.double()[..., None]
        scores = scores.sum(2)
        limit = (positions + 1) // ratio
        causal = torch.arange(keys.shape[1]) < limit.unsqueeze(-1)
        scores = scores.masked_fill(~causal, float("-inf"))
        selecting = limit > topk
        if bool(selecting.any()):
            ordered = scores.sort(dim=-1, descending=True).values
            margins.append(float((ordered[..., topk - 1] - ordered[..., topk])[selecting].min()))
        return saved.fn(q, keys, weights, positions, ratio, topk, chunk, head_group, **kwargs)

    saved = ops._REGISTRY["indexer_topk"]["reference"]
    ops.register("indexer_topk", "reference", recording)
    try:
        yield margins
    finally:
        ops._REGISTRY["indexer_topk"]["reference"] = saved
