"""End-to-end demo on a built-in tiny DeepSeek-V4 (pip package only; not part of a Hub upload).

Builds a random tiny model with every V4 component (sliding, CSA and HCA layers, hash and score-routed MoE, mHC,
MTP), saves it, reloads it through `AutoModelForCausalLM.from_pretrained`, checks the reload is exact, and
generates for a left-padded batch, checking each row against the sequence generated alone.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from .configuration_deepseek_v4 import DeepseekV4Config
from .modeling_deepseek_v4 import DeepseekV4ForCausalLM


def tiny_demo_config() -> DeepseekV4Config:
    """A ~2.4M-parameter V4 with the official layer pattern at toy scale (HCA rate 16 instead of 128)."""
    return DeepseekV4Config(
        vocab_size=512,
        hidden_size=128,
        moe_intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        head_dim=64,
        qk_rope_head_dim=16,
        q_lora_rank=64,
        o_groups=2,
        o_lora_rank=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        index_n_heads=4,
        index_head_dim=32,
        index_topk=8,
        sliding_window=16,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
        compress_ratios=[0, 0, 4, 16, 4, 16, 0],
        num_hash_layers=2,
    )


def run_demo(output_dir: str | None = None, new_tokens: int = 16, seed: int = 0) -> dict:
    """Run the demo; returns a summary dict (also printed). Raises AssertionError if a check fails."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    model = DeepseekV4ForCausalLM(tiny_demo_config()).eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built tiny DeepSeek-V4: {n_params / 1e6:.2f}M parameters, layers {model.config.layer_types}")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(output_dir or tmp)
        model.save_pretrained(folder)
        print(f"saved to {folder} ({', '.join(sorted(p.name for p in folder.iterdir()))})")
        loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    print(f"reloaded with AutoModelForCausalLM.from_pretrained -> {type(loaded).__name__}")
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert same, "reloaded weights differ from the saved ones"

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, 512, (n,), generator=g) for n in (40, 23)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = prompt, 1
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        batched = loaded.generate(ids, attention_mask=mask, **kwargs)[:, width:]
        for row, prompt in enumerate(prompts):
            alone = loaded.generate(prompt[None], **kwargs)[0, len(prompt) :]
            assert batched[row].tolist() == alone.tolist(), f"row {row}: batched generation differs from alone"
            print(f"prompt {row} ({len(prompt)} tokens, left-padded to {width}): generated {batched[row].tolist()}")
    summary = {
        "parameters": n_params,
        "reload_exact": same,
        "left_padded_batch_equals_single": True,
        "seconds": round(time.perf_counter() - started, 2),
    }
    print(f"demo OK: {summary}")
    return summary
