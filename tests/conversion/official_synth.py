"""Synthetic checkpoints in DeepSeek's OFFICIAL layout (official-format.md §3, §6, §8, §11) for tiny configs.

Written independently of the package's converter: official names, shapes and dtypes come from the tables of
official-format.md §6 and the native names of the reference state dict from §7; nothing here imports
`modeling_deepseek_v4.conversion` or any name-mapping code of the package. Only the numeric formats
(`modeling_deepseek_v4.quant_formats`) are shared; they are tested on their own.

`make_official_checkpoint(folder, config)` writes a folder that looks like a (tiny) `deepseek-ai/DeepSeek-V4-*`
Hub snapshot and returns an `OfficialCheckpoint` with

- `official`: every tensor exactly as written (official names, no prefix; FP8 `float8_e4m3fn` + `<module>.scale`
  `float8_e8m0fnu` per 128x128 block, FP4 experts as packed int8 + 1x32 E8M0 scales, BF16, F32, I64);
- `reference`: what a correct converter must produce in fp32 mode: native names (`model.` prefix, `lm_head`,
  MTP under `model.mtp.K.`, a DSpark drafter under `model.dspark.`), every float dequantized exactly to fp32, routed
  experts fused into `mlp.experts.gate_up_proj` [E, 2I, d] (w1 then w3) and `mlp.experts.down_proj` [E, d, I]. It
  matches `DeepseekV4ExtForCausalLM(config).state_dict()` key for key and shape for shape, where `config` is the
  plugin config given, or for `dspark=True` the one read from the written root config
  (`DeepseekV4ExtConfig.from_dict(ckpt.config)`).

Spec choices made here (see official-format.md):

- Scale siblings: weight `X.weight` -> scale `X.scale` (the module path plus `.scale`, the counterpart of HF's
  `X.weight_scale_inv`; official `convert.py` renames `weight_scale_inv` -> `scale`). Never `X.weight.scale`.
- Shards: tensors are written in a fixed order (weight immediately followed by its scale) and cut into contiguous
  shards such that one layer's routed experts straddle two shards AND a weight and its `.scale` land in different
  shards (worst cases of real checkpoints a loader must survive). `n_shards=2` gets both from one cut.
- Base variant (`expert_format="fp8"`): routed experts in FP8 128x128 blocks with float32 (power-of-two) scales and
  no `expert_dtype` key (official-format.md §2, unverified upstream).
- DSpark (`dspark=True`; the `-0731` / `-Flash-DSpark` contract of dspark.md §2.2-2.3): no MTP block; instead
  `mtp.{0,1,2}.*` are three full blocks (sliding only, learned gate with bias, FP4 experts, FP8 attention and shared
  experts) plus `mtp.0.main_proj` (FP8 [d, k d], k = number of target layers) and `mtp.0.main_norm`, and on the
  last stage `norm`, `hc_head_{fn,base,scale}`, `markov_head.markov_w1/markov_w2.weight` (bf16 [V, r]) and
  `confidence_head.proj.weight` (bf16 [1, d + r]). Config: the four `dspark_*` keys, `compress_ratios` with
  num_hidden_layers + 3 entries whose last 3 are 0, and the stale `num_nextn_predict_layers: 1`. Block tensors are
  written stage by stage, `main_proj` / `main_norm` before stage 0 and the head extras after the last stage.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from modeling_deepseek_v4.quant_formats import (
    dequantize_fp4,
    dequantize_fp8_blocks,
    quantize_fp4,
    quantize_fp8_blocks,
)

CSA_KEY = "compressed_sparse_attention"
HCA_KEY = "heavily_compressed_attention"
OFFICIAL_RATES = {CSA_KEY: 4, HCA_KEY: 128}
OFFICIAL_YARN = {
    "type": "yarn",
    "factor": 16,
    "original_max_position_embeddings": 65536,
    "beta_fast": 32,
    "beta_slow": 1,
}
QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "scale_fmt": "ue8m0",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}
GENERATION_CONFIG = {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 1.0, "top_p": 1.0}
BOS_TOKEN, EOS_TOKEN = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
INDEX_NAME = "model.safetensors.index.json"
BLOCK = 128
FP4_GROUP = 32


def shard_name(i: int, n: int) -> str:
    """`model-0000{i}-of-0000{n}.safetensors`, 1-based, 5 digits (the Hub spelling)."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


@dataclass
class OfficialCheckpoint:
    """What `make_official_checkpoint` wrote and what a correct fp32 conversion of it must give."""

    folder: Path
    config: dict  # root config.json as written
    official: dict[str, torch.Tensor]  # every tensor as written, official names, file order
    reference: dict[str, torch.Tensor]  # native names, fp32 (int64 tid2eid), loads strictly into the plugin model
    weight_map: dict[str, str]  # official name -> shard file name (as in the index json)
    files: list[Path]  # every file written (shards, index, configs, tokenizer files, chat template, encoding/)
    dspark: list[str] = field(default_factory=list)  # official names of the DSpark drafter (`mtp.*`), file order

    @property
    def shards(self) -> list[Path]:
        return [p for p in self.files if p.name.endswith(".safetensors")]


# ---- tensor generation -----------------------------------------------------------------------------------------


class _Builder:
    """Generates random fp32 weights, stores them in official form and their exact fp32 decode in native form."""

    def __init__(self, seed: int, expert_format: str):
        self.gen = torch.Generator().manual_seed(seed)
        self.expert_format = expert_format
        self.official: dict[str, torch.Tensor] = {}
        self.reference: dict[str, torch.Tensor] = {}

    # random values
    def _randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen)

    def _spread(self, *shape: int) -> torch.Tensor:
        """Integer exponents in [-3, 3]: multiplies magnitudes by 2**e so block / group scales differ."""
        return torch.randint(-3, 4, shape, generator=self.gen).float().exp2()

    def _matrix(self, *shape: int, block: tuple[int, int]) -> torch.Tensor:
        """std ~0.02 values `[..., out, in]` whose magnitude varies by 2**[-3, 3] from one block to the next."""
        *lead, rows, cols = shape
        nr, nc = math.ceil(rows / block[0]), math.ceil(cols / block[1])
        factor = self._spread(*lead, nr, nc).repeat_interleave(block[0], -2).repeat_interleave(block[1], -1)
        # a second, finer spread inside each block so the within-block amax is not the whole story
        fine = 1.0 + 0.5 * torch.rand(*shape, generator=self.gen)
        return 0.02 * self._randn(*shape) * fine * factor[..., :rows, :cols]

    def _put(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.official:
            raise AssertionError(f"duplicate official tensor {name}")
        self.official[name] = tensor.contiguous()

    def _ref(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.reference:
            raise AssertionError(f"duplicate reference tensor {name}")
        self.reference[name] = tensor.contiguous()

    # typed writers: `official` is the module path (FP8) or the full tensor name (others)
    def fp8(self, module: str, native: str | None, out: int, inp: int) -> None:
        q, s = quantize_fp8_blocks(self._matrix(out, inp, block=(BLOCK, BLOCK)))
        self._put(f"{module}.weight", q)
        self._put(f"{module}.scale", s)
        if native is not None:
            self._ref(native, dequantize_fp8_blocks(q, s))

    def bf16(self, name: str, native: str | None, *shape: int, norm: bool = False) -> None:
        values = 1.0 + 0.1 * self._randn(*shape) if norm else 0.02 * self._randn(*shape) * self._spread(*shape[:-1], 1)
        stored = values.to(torch.bfloat16)
        self._put(name, stored)
        if native is not None:
            self._ref(native, stored.float())

    def f32(self, name: str, native: str, *shape: int, std: float = 1.0) -> None:
        stored = std * self._randn(*shape)
        self._put(name, stored)
        self._ref(native, stored.clone())

    def tid2eid(self, name: str, native: str, vocab: int, n_experts: int, k: int) -> None:
        # k distinct expert ids per token: the first k of a random permutation of each row
        ids = torch.rand(vocab, n_experts, generator=self.gen).argsort(dim=-1)[:, :k].to(torch.int64)
        self._put(name, ids)
        self._ref(native, ids.clone())

    def experts(self, prefix: str, native: str, n_experts: int, inter: int, hidden: int) -> None:
        """`{prefix}.E.w{1,2,3}.{weight,scale}` + fused `{native}.gate_up_proj` / `{native}.down_proj`."""
        shapes = {"w1": (inter, hidden), "w2": (hidden, inter), "w3": (inter, hidden)}
        stored, decoded = {}, {}
        for w, (out, inp) in shapes.items():
            if self.expert_format == "fp4":
                if inp % FP4_GROUP:
                    raise ValueError(
                        f"FP4 routed experts need an input dim divisible by {FP4_GROUP}: {prefix}.*.{w} is "
                        f"[{out}, {inp}]; pick hidden_size / moe_intermediate_size multiples of {FP4_GROUP} or use "
                        'expert_format="fp8"'
                    )
                stored[w] = quantize_fp4(self._matrix(n_experts, out, inp, block=(1, FP4_GROUP)))
                decoded[w] = dequantize_fp4(*stored[w])
            else:
                values = self._matrix(n_experts, out, inp, block=(BLOCK, BLOCK))
                stored[w] = quantize_fp8_blocks(values, scale_dtype=torch.float32)
                decoded[w] = dequantize_fp8_blocks(*stored[w])
        # official order: per expert, w1 / w2 / w3, each weight immediately followed by its scale
        for e in range(n_experts):
            for w, (packed, scale) in stored.items():
                self._put(f"{prefix}.{e}.{w}.weight", packed[e].clone())
                self._put(f"{prefix}.{e}.{w}.scale", scale[e].clone())
        self._ref(f"{native}.gate_up_proj", torch.cat((decoded["w1"], decoded["w3"]), dim=1))
        self._ref(f"{native}.down_proj", decoded["w2"])


def _rates(cfg) -> dict[str, int]:
    return dict(cfg.compress_rates or OFFICIAL_RATES)


def _block(b: _Builder, cfg, off: str, nat: str, ratio: int, hash_layer: bool, mtp: bool) -> None:
    """One decoder block (official-format.md §6.2; §6.3 for MTP extras). `off` / `nat` end with a dot."""
    d, n = cfg.hidden_size, cfg.hc_mult
    heads, hd, qr = cfg.num_attention_heads, cfg.head_dim, cfg.q_lora_rank
    groups, o_rank = cfg.o_groups, cfg.o_lora_rank
    rates = _rates(cfg)
    mix = (2 + n) * n

    if mtp:
        b.fp8(f"{off}e_proj", f"{nat}e_proj.weight", d, d)
        b.fp8(f"{off}h_proj", f"{nat}h_proj.weight", d, d)
        b.bf16(f"{off}enorm.weight", f"{nat}enorm.weight", d, norm=True)
        b.bf16(f"{off}hnorm.weight", f"{nat}hnorm.weight", d, norm=True)
    b.bf16(f"{off}attn_norm.weight", f"{nat}input_layernorm.weight", d, norm=True)
    b.bf16(f"{off}ffn_norm.weight", f"{nat}post_attention_layernorm.weight", d, norm=True)
    for site, native_site in (("attn", "attn_hc"), ("ffn", "ffn_hc")):
        b.f32(f"{off}hc_{site}_fn", f"{nat}{native_site}.fn", mix, n * d, std=0.05)
        b.f32(f"{off}hc_{site}_base", f"{nat}{native_site}.base", mix, std=0.5)
        b.f32(f"{off}hc_{site}_scale", f"{nat}{native_site}.scale", 3, std=0.5)

    a, sa = f"{off}attn.", f"{nat}self_attn."
    b.f32(f"{a}attn_sink", f"{sa}sinks", heads)
    b.fp8(f"{a}wq_a", f"{sa}q_a_proj.weight", qr, d)
    b.bf16(f"{a}q_norm.weight", f"{sa}q_a_norm.weight", qr, norm=True)
    b.fp8(f"{a}wq_b", f"{sa}q_b_proj.weight", heads * hd, qr)
    b.fp8(f"{a}wkv", f"{sa}kv_proj.weight", hd, d)
    b.bf16(f"{a}kv_norm.weight", f"{sa}kv_norm.weight", hd, norm=True)
    b.fp8(f"{a}wo_a", f"{sa}o_a_proj.weight", groups * o_rank, heads * hd // groups)
    b.fp8(f"{a}wo_b", f"{sa}o_b_proj.weight", d, groups * o_rank)
    if ratio != 0:
        csa = ratio == rates[CSA_KEY]
        width = 2 * hd if csa else hd
        c, sc = f"{a}compressor.", f"{sa}compressor."
        b.bf16(f"{c}wkv.weight", f"{sc}kv_proj.weight", width, d)
        b.bf16(f"{c}wgate.weight", f"{sc}gate_proj.weight", width, d)
        b.f32(f"{c}ape", f"{sc}position_bias", ratio, width)
        b.bf16(f"{c}norm.weight", f"{sc}kv_norm.weight", hd, norm=True)
        if csa:
            ih, ihd = cfg.index_n_heads, cfg.index_head_dim
            i, si = f"{a}indexer.", f"{sc}indexer."
            b.fp8(f"{i}wq_b", f"{si}q_b_proj.weight", ih * ihd, qr)
            b.bf16(f"{i}weights_proj.weight", f"{si}scorer.weights_proj.weight", ih, d)
            b.bf16(f"{i}compressor.wkv.weight", f"{si}kv_proj.weight", 2 * ihd, d)
            b.bf16(f"{i}compressor.wgate.weight", f"{si}gate_proj.weight", 2 * ihd, d)
            b.f32(f"{i}compressor.ape", f"{si}position_bias", ratio, 2 * ihd)
            b.bf16(f"{i}compressor.norm.weight", f"{si}kv_norm.weight", ihd, norm=True)

    f, sf = f"{off}ffn.", f"{nat}mlp."
    n_exp, inter = cfg.n_routed_experts, cfg.moe_intermediate_size
    b.bf16(f"{f}gate.weight", f"{sf}gate.weight", n_exp, d)
    if hash_layer:
        b.tid2eid(f"{f}gate.tid2eid", f"{sf}gate.tid2eid", cfg.vocab_size, n_exp, cfg.num_experts_per_tok)
    else:
        b.f32(f"{f}gate.bias", f"{sf}gate.e_score_correction_bias", n_exp, std=0.1)
    b.experts(f"{f}experts", f"{sf}experts", n_exp, inter, d)
    if cfg.n_shared_experts:
        se, sse = f"{f}shared_experts.", f"{sf}shared_experts."
        b.fp8(f"{se}w1", f"{sse}gate_proj.weight", inter, d)
        b.fp8(f"{se}w2", f"{sse}down_proj.weight", d, inter)
        b.fp8(f"{se}w3", f"{sse}up_proj.weight", inter, d)

    if mtp:
        b.bf16(f"{off}norm.weight", f"{nat}norm.weight", d, norm=True)
        _hc_head(b, cfg, off, f"{nat}hc_head.")


def _hc_head(b: _Builder, cfg, off: str, nat: str) -> None:
    n, d = cfg.hc_mult, cfg.hidden_size
    b.f32(f"{off}hc_head_fn", f"{nat}hc_fn", n, n * d, std=0.05)
    b.f32(f"{off}hc_head_base", f"{nat}hc_base", n, std=0.5)
    b.f32(f"{off}hc_head_scale", f"{nat}hc_scale", 1, std=0.5)


DSPARK_STAGES = 3
DSPARK_MARKOV_RANK = 8


def _dspark_keys(cfg) -> dict:
    """The four official DSpark config keys (dspark.md §2.2) at tiny scale; targets are the last three layers."""
    n = cfg.num_hidden_layers
    return {
        "dspark_block_size": 5,
        "dspark_noise_token_id": cfg.vocab_size - 1,
        "dspark_target_layer_ids": list(range(max(0, n - 3), n)),
        "dspark_markov_rank": DSPARK_MARKOV_RANK,
    }


def _dspark_tensors(b: _Builder, cfg) -> list[str]:
    """The DSpark drafter `mtp.{0..2}.*` of the 0731 release (dspark.md §2.3); native names under `model.dspark.`."""
    d, vocab = cfg.hidden_size, cfg.vocab_size
    keys = _dspark_keys(cfg)
    rank, taps = keys["dspark_markov_rank"], len(keys["dspark_target_layer_ids"])
    before = set(b.official)
    b.fp8("mtp.0.main_proj", "model.dspark.main_proj.weight", d, taps * d)
    b.bf16("mtp.0.main_norm.weight", "model.dspark.main_norm.weight", d, norm=True)
    for s in range(DSPARK_STAGES):
        # A full V4 block: sliding only (ratio 0) and score-routed (gate bias, no tid2eid) like the MTP block.
        _block(b, cfg, f"mtp.{s}.", f"model.dspark.layers.{s}.", 0, False, mtp=False)
    last = f"mtp.{DSPARK_STAGES - 1}."
    b.bf16(f"{last}norm.weight", "model.dspark.norm.weight", d, norm=True)
    _hc_head(b, cfg, last, "model.dspark.hc_head.")
    for w in ("markov_w1", "markov_w2"):
        b.bf16(f"{last}markov_head.{w}.weight", f"model.dspark.markov_head.{w}.weight", vocab, rank)
    b.bf16(f"{last}confidence_head.proj.weight", "model.dspark.confidence_head.proj.weight", 1, d + rank)
    return [name for name in b.official if name not in before]


# ---- config ------------------------------------------------------------------------------------------------------


def official_config_dict(cfg, *, expert_format: str = "fp4", dspark: bool = False) -> dict:
    """The root `config.json` of an official release (official-format.md §3) for the plugin config `cfg`."""
    rope = cfg.rope_parameters or {}
    main, compress = rope.get("main", {}), rope.get("compress", {})
    if compress.get("rope_type") == "yarn":
        rope_scaling = {
            "type": "yarn",
            "factor": compress["factor"],
            "original_max_position_embeddings": compress.get("original_max_position_embeddings", 65536),
            "beta_fast": compress.get("beta_fast", 32),
            "beta_slow": compress.get("beta_slow", 1),
        }
    else:
        # official files always carry the YaRN block; a non-YaRN plugin config gets the official values
        rope_scaling = dict(OFFICIAL_YARN)
    ratios = list(cfg.compress_ratios)
    out = {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "compress_ratios": ratios,
        "compress_rope_theta": compress.get("rope_theta", cfg.compress_rope_theta),
        "hc_eps": cfg.hc_eps,
        "hc_mult": cfg.hc_mult,
        "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "index_head_dim": cfg.index_head_dim,
        "index_n_heads": cfg.index_n_heads,
        "index_topk": cfg.index_topk,
        "max_position_embeddings": cfg.max_position_embeddings,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "norm_topk_prob": cfg.norm_topk_prob,
        "num_attention_heads": cfg.num_attention_heads,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "num_hash_layers": cfg.num_hash_layers,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": 1,
        "num_nextn_predict_layers": cfg.num_nextn_predict_layers,
        "o_groups": cfg.o_groups,
        "o_lora_rank": cfg.o_lora_rank,
        "q_lora_rank": cfg.q_lora_rank,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "quantization_config": dict(QUANTIZATION_CONFIG),
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_scaling": rope_scaling,
        "rope_theta": main.get("rope_theta", cfg.rope_theta),
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "scoring_func": cfg.scoring_func,
        "sliding_window": cfg.sliding_window,
        "swiglu_limit": cfg.swiglu_limit,
        "tie_word_embeddings": False,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.57.1",
        "use_cache": True,
        "vocab_size": cfg.vocab_size,
    }
    if expert_format == "fp4":
        out["expert_dtype"] = "fp4"
    rates = _rates(cfg)
    if rates != OFFICIAL_RATES:
        # NOT an official key: real files imply CSA 4 / HCA 128. Tiny test configs use other rates (e.g. HCA 8),
        # which a loader cannot infer from `compress_ratios` alone, so they are spelled out in native form.
        out["compress_rates"] = rates
    if dspark:
        # dspark.md §2.2: one trailing 0 per drafter stage (0731: 46 entries) and the stale MTP count of 1.
        out["compress_ratios"] = ratios[: cfg.num_hidden_layers] + [0] * DSPARK_STAGES
        out["num_nextn_predict_layers"] = 1
        out.update(_dspark_keys(cfg))
    return dict(sorted(out.items()))


def _tokenizer_files(vocab_size: int) -> dict[str, dict]:
    """A minimal but loadable WordLevel `tokenizer.json` (bos 0, eos 1) and its `tokenizer_config.json`."""
    vocab = {BOS_TOKEN: 0, EOS_TOKEN: 1, **{f"t{i}": i for i in range(2, vocab_size)}}
    added = [
        {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for tok, i in ((BOS_TOKEN, 0), (EOS_TOKEN, 1))
    ]  # fmt: skip
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": f"t{vocab_size - 1}"},
    }
    tokenizer_config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": 1048576,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    special_tokens_map = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN}
    return {
        "tokenizer.json": tokenizer,
        "tokenizer_config.json": tokenizer_config,
        "special_tokens_map.json": special_tokens_map,
    }


# Small stand-ins for the chat template and the `encoding/` folder of Python helpers that the V4 releases ship;
# a converter only copies them, so their content just has to be recognisable.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<{{ message['role'] }}>{{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
ENCODING_FILES = {
    "encoding/encoding_dsv4.py": '"""Synthetic stand-in for the official DeepSeek-V4 chat encoding helpers."""\n\n\n'
    'def encode_messages(messages):\n    return "".join(m["content"] for m in messages)\n',
    "encoding/README.md": "# encoding (synthetic)\n",
}


# ---- sharding ----------------------------------------------------------------------------------------------------


def _cuts(names: list[str], cfg, n_shards: int) -> list[int]:
    """Start indices of shards 2..n: cut A inside one layer's experts between `w1.weight` and `w1.scale` (splits
    the experts and a weight/scale pair), cut B between a `wq_a.weight` and its scale, then evenly spread cuts."""
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    if n_shards > len(names):
        raise ValueError(f"n_shards={n_shards} exceeds the number of tensors ({len(names)})")
    n_layers = cfg.num_hidden_layers
    layer_a, layer_b = n_layers // 3, (2 * n_layers) // 3
    wanted = [names.index(f"layers.{layer_a}.ffn.experts.{cfg.n_routed_experts // 2}.w1.scale")]
    if n_shards >= 3:
        wanted.append(names.index(f"layers.{layer_b}.attn.wq_a.scale"))
    cuts = set(wanted[: n_shards - 1])
    k = 1
    while len(cuts) < n_shards - 1:
        candidate = round(k * len(names) / n_shards) % len(names)
        k += 1
        while candidate in cuts or candidate == 0:
            candidate = candidate % (len(names) - 1) + 1
        cuts.add(candidate)
    return sorted(cuts)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_index(folder: Path, tensors: dict[str, torch.Tensor], weight_map: dict[str, str]) -> Path:
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    path = folder / INDEX_NAME
    _write_json(path, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return path


# ---- public API --------------------------------------------------------------------------------------------------


def make_official_checkpoint(
    folder,
    plugin_config,
    *,
    n_shards: int = 3,
    seed: int = 0,
    expert_format: str = "fp4",
    dspark: bool = False,
    extra_files: bool = True,
) -> OfficialCheckpoint:
    """Write a synthetic official-layout checkpoint for `plugin_config` into `folder` (created if needed).

    expert_format: "fp4" (instruct releases: packed I8 + E8M0 1x32 scales, `expert_dtype: "fp4"`) or "fp8" (Base
    releases: FP8 128x128 blocks with float32 scales, no `expert_dtype`). dspark writes a DSpark release: the
    drafter's `mtp.{0,1,2}.*` instead of the MTP block, and the `dspark_*` keys. extra_files writes
    `generation_config.json`, `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`,
    `chat_template.jinja` and an `encoding/` folder.
    """
    if expert_format not in ("fp4", "fp8"):
        raise ValueError(f'expert_format must be "fp4" or "fp8", got {expert_format!r}')
    cfg = plugin_config
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_layers, n_mtp = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    ratios = list(cfg.compress_ratios)
    if len(ratios) != n_layers + n_mtp:
        raise ValueError(f"compress_ratios has {len(ratios)} entries, expected {n_layers + n_mtp} (layers + MTP)")

    b = _Builder(seed, expert_format)
    d = cfg.hidden_size
    b.bf16("embed.weight", "model.embed_tokens.weight", cfg.vocab_size, d)
    for i in range(n_layers):
        _block(b, cfg, f"layers.{i}.", f"model.layers.{i}.", ratios[i], i < cfg.num_hash_layers, mtp=False)
    b.bf16("norm.weight", "model.norm.weight", d, norm=True)
    _hc_head(b, cfg, "", "model.hc_head.")
    b.bf16("head.weight", "lm_head.weight", cfg.vocab_size, d)
    for k in range(0 if dspark else n_mtp):
        _block(b, cfg, f"mtp.{k}.", f"model.mtp.{k}.", ratios[n_layers + k], False, mtp=True)
    drafter = _dspark_tensors(b, cfg) if dspark else []

    names = list(b.official)
    bounds = [0, *_cuts(names, cfg, n_shards), len(names)]
    weight_map: dict[str, str] = {}
    files: list[Path] = []
    for s in range(n_shards):
        fname = shard_name(s + 1, n_shards)
        chunk = {name: b.official[name] for name in names[bounds[s] : bounds[s + 1]]}
        save_file(chunk, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, fname))
        files.append(folder / fname)
    files.append(_write_index(folder, b.official, weight_map))

    config = official_config_dict(cfg, expert_format=expert_format, dspark=dspark)
    _write_json(folder / "config.json", config)
    files.append(folder / "config.json")
    if extra_files:
        _write_json(folder / "generation_config.json", dict(GENERATION_CONFIG))
        files.append(folder / "generation_config.json")
        for fname, obj in _tokenizer_files(cfg.vocab_size).items():
            _write_json(folder / fname, obj)
            files.append(folder / fname)
        for fname, text in {"chat_template.jinja": CHAT_TEMPLATE, **ENCODING_FILES}.items():
            (folder / fname).parent.mkdir(exist_ok=True)
            (folder / fname).write_text(text, encoding="utf-8")
            files.append(folder / fname)
    return OfficialCheckpoint(folder, config, b.official, b.reference, weight_map, files, drafter)


# ---- damage helpers for negative tests ---------------------------------------------------------------------------


def truncate_file(path, n_bytes: int) -> None:
    """Cut the LAST `n_bytes` bytes off `path` (a partial download: the header promises more data than is there)."""
    path = Path(path)
    size = path.stat().st_size
    if not 0 < n_bytes <= size:
        raise ValueError(f"n_bytes must be in [1, {size}], got {n_bytes}")
    with path.open("r+b") as fh:
        fh.truncate(size - n_bytes)


def corrupt_header(path, part: str = "length") -> None:
    """Damage a safetensors header in place: part="length" overwrites the 8-byte little-endian header length with a
    value far beyond the file size; part="json" overwrites the header JSON with same-length non-JSON garbage."""
    path = Path(path)
    with path.open("r+b") as fh:
        if part == "length":
            fh.write(struct.pack("<Q", 0xFFFF_FFFF_FFFF))
        elif part == "json":
            (n,) = struct.unpack("<Q", fh.read(8))
            fh.write((b"\x00garbage{" * (n // 9 + 1))[:n])
        else:
            raise ValueError(f'part must be "length" or "json", got {part!r}')


def _load_shard(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    with safe_open(str(path), framework="pt") as fh:
        return {name: fh.get_tensor(name) for name in fh.keys()}, fh.metadata()


def _edit(folder, name: str, rename_to: str | None) -> None:
    folder = Path(folder)
    index = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))
    weight_map = index["weight_map"]
    if name not in weight_map:
        raise KeyError(f"{name} is not in {folder / INDEX_NAME}")
    if rename_to is not None and rename_to in weight_map:
        raise KeyError(f"{rename_to} already exists in {folder / INDEX_NAME}")
    shard = folder / weight_map[name]
    tensors, metadata = _load_shard(shard)
    tensor = tensors.pop(name)
    del weight_map[name]
    if rename_to is None:
        index["metadata"]["total_size"] -= tensor.numel() * tensor.element_size()
    else:
        tensors[rename_to] = tensor
        weight_map[rename_to] = shard.name
    save_file(tensors, str(shard), metadata=metadata)
    index["weight_map"] = dict(sorted(weight_map.items()))
    _write_json(folder / INDEX_NAME, index)


def drop_tensor(folder, name: str) -> None:
    """Remove official tensor `name` from its shard and from the index (total_size updated)."""
    _edit(folder, name, None)


def rename_tensor(folder, old: str, new: str) -> None:
    """Rename official tensor `old` to `new` in its shard and in the index."""
    _edit(folder, old, new)


__all__ = [
    "OfficialCheckpoint",
    "corrupt_header",
    "drop_tensor",
    "make_official_checkpoint",
    "official_config_dict",
    "rename_tensor",
    "shard_name",
    "truncate_file",
]
