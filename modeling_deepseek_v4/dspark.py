"""The DSpark speculative drafter of `DeepSeek-V4-Flash-0731` / `-Flash-DSpark`, held as `model.dspark`: its modules
and weights. Drafting with it (`generate(..., use_dspark=True)`) is `dspark_drafting.py`.

Facts this module relies on (docs/dspark.md §2.2-2.4, restated; official-format.md §11):

- These releases store the drafter under the official `mtp.*` prefix, where the April releases keep the MTP block.
  `mtp.{0..S-1}.*` are S = 3 full V4 blocks: sliding window only (`compress_ratios` ends with S zeros), a learned
  gate with bias (score-routed, no `tid2eid`), FP4 routed experts and FP8 attention / shared experts. Each stage is
  therefore built as a `DeepseekV4DecoderLayer` at layer index `num_hidden_layers + s`, like the MTP block is.
- Extras: `mtp.0.main_proj` (FP8 `[d, k d]`, k = len(dspark_target_layer_ids) = 3) and `mtp.0.main_norm` turn the
  hc-averaged outputs of the target layers into the context (`main_norm(main_proj(cat taps))`, `[B, S, d]`); on the
  last stage `norm` and `hc_head_{fn,base,scale}` (V4's HyperHead, no Sinkhorn) collapse the draft streams like the
  main model's head; `markov_head.markov_w1` (bf16 `[V, r]`, an embedding of the previous token) and
  `markov_head.markov_w2` (bf16 `[V, r]`, a Linear r -> V) add `w2 . w1[prev]` to each draft row's logits;
  `confidence_head.proj` (bf16 `[1, d + r]`, no bias) scores `cat(y, w1[prev])` (y: the post-hc_head, pre-norm
  hidden) as an acceptance logit. Embedding and LM head are the main model's (no `embed` / `head` under `mtp.*`).
- `num_nextn_predict_layers` in these files still says 1 (stale); the stage count comes from the tensors.

Plugin names follow the native style: `model.dspark.layers.{s}.<same names as a main layer>`, `model.dspark.
{main_proj, main_norm, norm, hc_head.hc_fn/hc_base/hc_scale, markov_head.markov_w1.weight, markov_head.markov_w2.
weight, confidence_head.proj.weight}`. With `config.dsv4_quantization` the stages and `main_proj` are kept FP8 / FP4
like the main layers (`quantized_modules.FP8_MODULES`); the Markov and confidence weights stay dense (bf16 in the
official files).
"""

from __future__ import annotations

import torch
from torch import nn

from .hyper_connection import DeepseekV4HyperHead
from .norm import DeepseekV4RMSNorm


class DeepseekV4DSparkMarkovHead(nn.Module):
    """Rank-r transition bias of the previous token: `markov_w1` embedding `[V, r]`, `markov_w2` Linear r -> V."""

    def __init__(self, config):
        super().__init__()
        self.markov_w1 = nn.Embedding(config.vocab_size, config.dspark_markov_rank)
        self.markov_w2 = nn.Linear(config.dspark_markov_rank, config.vocab_size, bias=False)

    def forward(self, prev_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """prev_ids `[...]` -> (logit bias `[..., V]` fp32, embedding `[..., r]` for the confidence head)."""
        e = self.markov_w1(prev_ids)
        return self.markov_w2(e).float(), e


class DeepseekV4DSparkConfidenceHead(nn.Module):
    """Acceptance logit of a draft row: `proj` Linear `d + r -> 1` without bias, computed in fp32 (dspark.md §2.6)."""

    def __init__(self, config):
        super().__init__()
        self.proj = nn.Linear(config.hidden_size + config.dspark_markov_rank, 1, bias=False)

    def forward(self, hidden: torch.Tensor, markov: torch.Tensor) -> torch.Tensor:
        """hidden `[..., d]` (post hc_head, pre norm), markov `[..., r]` -> logit `[...]` fp32."""
        x = torch.cat([hidden.float(), markov.float()], dim=-1)
        return nn.functional.linear(x, self.proj.weight.float()).squeeze(-1)


class DeepseekV4DSparkDrafter(nn.Module):
    """`layers` (`dspark_num_stages` decoder blocks), `main_proj` / `main_norm` (context), `norm` / `hc_head` (draft
    head), `markov_head`, `confidence_head`. `block_cls` is `DeepseekV4DecoderLayer`, passed in by the model so that
    imports stay one-way (modeling_deepseek_v4 imports this file)."""

    def __init__(self, config, block_cls: type[nn.Module]):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        first = config.num_hidden_layers + config.num_nextn_predict_layers
        self.layers = nn.ModuleList(block_cls(config, first + s) for s in range(config.dspark_num_stages))
        self.main_proj = nn.Linear(len(config.dspark_target_layer_ids) * d, d, bias=False)
        self.main_norm = DeepseekV4RMSNorm(d, eps=eps)
        self.norm = DeepseekV4RMSNorm(d, eps=eps)
        self.hc_head = DeepseekV4HyperHead(config)
        self.markov_head = DeepseekV4DSparkMarkovHead(config)
        self.confidence_head = DeepseekV4DSparkConfidenceHead(config)


__all__ = ["DeepseekV4DSparkConfidenceHead", "DeepseekV4DSparkDrafter", "DeepseekV4DSparkMarkovHead"]
