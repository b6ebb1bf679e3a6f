"""End-to-end demo on a built-in tiny DeepSeek-V4 (pip package only; not part of a Hub upload).

Builds a random tiny model with every V4 component (sliding, CSA and HCA layers, hash and score-routed MoE, mHC,
MTP), writes it in DeepSeek's official layout (FP8 128x128 weights + packed FP4 experts), converts that folder back
with the converter (`dsv4-convert to-hf`), reloads it through `AutoModelForCausalLM.from_pretrained`, checks the
reload equals the FP8/FP4 weights exactly and that the official folder loaded directly computes the same, and
generates for a left-padded batch of long prompts, checking every row, each prompt alone and the static-cache,
prompt-lookup and MTP modes against a full recompute (no cache, no `generate`). Any failed check prints the
difference and raises `DemoFailure` (the CLI exits 1).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from .configuration_deepseek_v4 import DeepseekV4ExtConfig
from .modeling_deepseek_v4 import DeepseekV4ExtForCausalLM
from .ops import backends_in_use


def tiny_demo_config() -> DeepseekV4ExtConfig:
    """A ~2.4M-parameter V4 with the official layer pattern at toy scale (HCA rate 16 instead of 128)."""
    return DeepseekV4ExtConfig(
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


def _requantized_equal(model) -> bool:
    """Export `model` to the official layout and back; True when every weight comes back bit-identical."""
    from modeling_deepseek_v4.conversion import convert_official_to_plugin, convert_plugin_to_official

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "a")
        convert_plugin_to_official(Path(tmp) / "a", Path(tmp) / "b", progress=False)
        convert_official_to_plugin(Path(tmp) / "b", Path(tmp) / "c", dtype="fp32", progress=False)
        again = AutoModelForCausalLM.from_pretrained(Path(tmp) / "c").state_dict()
    return all(torch.equal(value, again[name]) for name, value in model.state_dict().items())


def _in_own_memory(*models) -> None:
    """Copy every weight of a loaded model out of the memory-mapped file into freshly allocated (64-byte aligned)
    memory, in place. Why: on AVX-512 CPUs the BLAS kernels' summation order depends on the operands' alignment, and
    safetensors' tensors sit at any offset of the file, so bit-identical weights loaded from two files can give
    logits that differ in the last bit; the demo's checks are exact, so each side computes from aligned copies."""
    with torch.no_grad():
        for model in models:
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.data = tensor.data.clone()


def run_demo(output_dir: str | None = None, new_tokens: int = 16, seed: int = 0) -> dict:
    """Run the demo; returns a summary dict (also printed). Raises `DemoFailure` if a check fails."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    model = DeepseekV4ExtForCausalLM(tiny_demo_config()).eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built tiny DeepSeek-V4: {n_params / 1e6:.2f}M parameters, layers {model.config.layer_types}")

    # The converter builds on the modeling package (never the reverse): imported here, in the pip-only demo.
    from modeling_deepseek_v4.conversion import convert_official_to_plugin, convert_plugin_to_official

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(output_dir or tmp)
        model.save_pretrained(root / "random-bf16")
        convert_plugin_to_official(root / "random-bf16", root / "official", progress=False)
        files = sorted(p.name for p in (root / "official").iterdir())
        print(f"wrote the official layout (FP8 + FP4 experts) to {root / 'official'}: {', '.join(files)}")
        report = convert_official_to_plugin(root / "official", root / "converted", dtype="fp32", progress=False)
        print(f"converted back with dsv4-convert to-hf: {report}")
        from modeling_deepseek_v4.model_cards import write_model_card

        card = write_model_card(root / "converted", model_name="dsv4-demo-tiny")
        print(f"wrote a model card (dsv4 card) to {card}")
        loaded = AutoModelForCausalLM.from_pretrained(root / "converted").eval()
        # The same checkpoint kept quantized in memory (FP8 linears, packed FP4 experts): same logits.
        convert_official_to_plugin(root / "official", root / "keep", dtype="keep", progress=False)
        quantized = AutoModelForCausalLM.from_pretrained(root / "keep", dtype=torch.float32).eval()
        # The official folder itself, loaded directly (no conversion): FP8 / FP4 kept, then exactly dequantized.
        direct_keep = DeepseekV4ExtForCausalLM.from_pretrained(root / "official")
        direct_fp32 = DeepseekV4ExtForCausalLM.from_pretrained(root / "official", dtype=torch.float32)
        direct_bf16 = DeepseekV4ExtForCausalLM.from_pretrained(root / "official", dtype=torch.bfloat16)
        _in_own_memory(loaded, quantized, direct_keep, direct_fp32, direct_bf16)
    print(f"reloaded with AutoModelForCausalLM.from_pretrained -> {type(loaded).__name__}")
    probe = torch.randint(2, 512, (1, 48), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        gap = (quantized(probe).logits - loaded(probe).logits).abs().max().item()
        reference = loaded(probe).logits
        direct_gaps = [
            (direct_fp32(probe).logits - reference).abs().max().item(),
            # Kept FP8/FP4 computes in bf16 with exactly the dequantized weights: equal to the bf16 load.
            (direct_keep(probe).logits - direct_bf16(probe).logits).abs().max().item(),
        ]
    direct_ok = direct_gaps == [0.0, 0.0]
    print(
        "loaded the official folder directly (no conversion): max logit gap fp32 vs converted "
        f"{direct_gaps[0]:.1e}, kept FP8/FP4 vs dequantized bf16 {direct_gaps[1]:.1e}"
    )
    if not direct_ok:
        print("  MISMATCH: the direct official load does not compute what the converted folder computes")
    weights_in = sum(b.nbytes for b in quantized.buffers()) + sum(p.nbytes for p in quantized.parameters())
    print(f"quantized in memory (--dtype keep): {weights_in / 2**20:.2f} MiB of weights, max logit gap {gap:.1e}")
    quantized_ok = gap < 1e-4
    if not quantized_ok:
        print("  MISMATCH: the quantized model does not compute what its dequantized weights compute")
    # FP8 / FP4 keep at most 4 significant bits: the converted weights are the quantized ones, so compare with a
    # second export of the *loaded* model, which must reproduce them exactly.
    same = _requantized_equal(loaded)
    if not same:
        print("  MISMATCH: the converted weights are not exactly the FP8/FP4 checkpoint's values")

    generation = check_generation(loaded, new_tokens, seed)
    ran = {op: info["last_used"] for op, info in backends_in_use().items() if info["last_used"]}
    print(f"ops backends (op: backend of its latest call): {ran}")
    summary = {
        "parameters": n_params,
        "official_round_trip_exact": same,
        "quantized_equals_dequantized": quantized_ok,
        "official_loads_directly": direct_ok,
        **generation,
        "seconds": round(time.perf_counter() - started, 2),
    }
    failed = [name for name, ok in summary.items() if ok is False]
    if failed:
        print(f"demo FAILED: {', '.join(failed)}")
        raise DemoFailure(failed)
    print(f"demo OK: {summary}")
    return summary


class DemoFailure(Exception):
    """A demo check did not hold (the printed lines above it show the difference)."""


def _full_recompute(model, ids: torch.Tensor, steps: int) -> list[int]:
    """Greedy tokens by re-running the whole sequence each step: no cache, no `generate` (the reference)."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, -steps:].tolist()


def _report(name: str, got: list[int], want: list[int]) -> bool:
    if got == want:
        return True
    first = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    print(f"  MISMATCH {name}: first difference at new token {first}\n    got      {got}\n    expected {want}")
    return False


def check_generation(model, new_tokens: int, seed: int) -> dict:
    """Generate for a left-padded batch of long prompts and check, against full recomputes: cached greedy (each
    row of the batch and alone), the static cache, prompt lookup and MTP speculation (which must equal greedy)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(2, 512, (40,), generator=g)
    # The first prompt repeats itself, so prompt lookup has candidates to propose (and reject).
    prompts = [torch.cat([base, torch.randint(2, 512, (200,), generator=g), base]), torch.randint(2, 512, (131,))]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = prompt, 1
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = [_full_recompute(model, prompt[None], new_tokens) for prompt in prompts]
    batched = model.generate(ids, attention_mask=mask, **kwargs)[:, width:]
    batch_ok = single_ok = True
    for row, prompt in enumerate(prompts):
        print(f"prompt {row} ({len(prompt)} tokens, left-padded to {width}): generated {batched[row].tolist()}")
        batch_ok &= _report(f"batch row {row}", batched[row].tolist(), expected[row])
        alone = model.generate(prompt[None], **kwargs)[0, len(prompt) :].tolist()
        single_ok &= _report(f"prompt {row} alone", alone, expected[row])
    ok = {"left_padded_batch_equals_full_recompute": batch_ok, "single_equals_full_recompute": single_ok}
    modes = {
        "static_cache": dict(cache_implementation="static"),
        "prompt_lookup": dict(prompt_lookup_num_tokens=4),
        "mtp_speculation": dict(use_mtp=True),
    }
    for name, extra in modes.items():
        try:
            got = model.generate(prompts[0][None], **kwargs, **extra)[0, len(prompts[0]) :].tolist()
        except Exception as exc:  # a mode that crashes is a failed check, reported like a mismatch
            print(f"  MISMATCH {name}: raised {type(exc).__name__}: {exc}")
            got = None
        ok[f"{name}_equals_greedy"] = got is not None and _report(name, got, expected[0])
    print(f"checked cached greedy, static cache, prompt lookup and MTP speculation against full recomputes: {ok}")
    return ok
