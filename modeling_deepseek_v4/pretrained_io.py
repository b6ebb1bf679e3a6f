"""Loading and saving hooks of the DeepSeek-V4 models (a mixin before `PreTrainedModel`).

- `from_pretrained`: with a bitsandbytes 4-bit `quantization_config`, the routed experts and the grouped `o_a_proj`
  are stored 4-bit too (bitsandbytes swaps only exact `nn.Linear`, hf-integration.md §9; `bnb_quant.py`).
- `save_pretrained`: the custom-code folder is complete (hf-integration.md §5): `auto_map` for AutoConfig,
  AutoModel and AutoModelForCausalLM (transformers writes one model class per save) and a `requirements.txt`, both
  written through a temporary file and renamed;
- `add_adapter` / `load_adapter`: the grouped LoRA layers of `expert_lora.py` are registered on the `LoraConfig`
  (PEFT does not save that registration); transformers >= 5.24 needs PEFT >= 0.22 for them, and the error then says
  what works with the installed PEFT (`compat.peft_version_hint`);
- `resize_token_embeddings`: the hash-routed layers' `tid2eid [vocab, K]` tables follow the vocabulary;
- `num_parameters`: weights kept quantized (FP8 / packed FP4 buffers, not parameters) are counted as weights.
"""

from __future__ import annotations

import json
import os
import re
import sys

import torch
from transformers.utils import logging

from .bnb_quant import apply_bnb_to_custom_weights, bnb_4bit_settings, is_bnb_8bit, with_dense_modules
from .compat import REQUIREMENTS_TXT, peft_version_hint
from .moe import DeepseekV4HashRouter, default_tid2eid
from .official_loader import HUB_OPTIONS, copy_official_side_files, load_official, official_config_dict
from .quantized_modules import _KeepsStorageDtype

logger = logging.get_logger(__name__)


class DeepseekV4PretrainedIO:
    """`from_pretrained` / `save_pretrained` additions; expects to precede `PreTrainedModel` in the bases."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As transformers', but a load that would leave weights uninitialised (random) raises, naming them and the
        fix. With a bitsandbytes 4-bit `quantization_config`, the routed experts and the grouped `o_a_proj` (which
        bitsandbytes leaves dense: it swaps only exact `nn.Linear`) are stored 4-bit too, while `lm_head` and the
        strict-fp32 compressor projections stay dense (`bnb_quant.py`). A folder or Hub repo in DeepSeek's official
        layout (`model_type: deepseek_v4`) is loaded directly, without a conversion step (`official_loader.py`)."""
        path = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        hub = {key: kwargs[key] for key in HUB_OPTIONS if key in kwargs}
        official = official_config_dict(path, **hub) if isinstance(path, (str, os.PathLike)) else None
        if official is not None:
            kwargs.pop("pretrained_model_name_or_path", None)
            return load_official(cls, path, official, args[1:], kwargs)
        if kwargs.get("quantization_config") is not None:
            kwargs["quantization_config"] = with_dense_modules(
                kwargs["quantization_config"], cls._keep_in_fp32_modules_strict
            )
            if is_bnb_8bit(kwargs["quantization_config"]):
                logger.warning(
                    "bitsandbytes 8-bit quantizes the attention, shared-expert and MTP linears only: the routed "
                    "experts (most of the weights) and the grouped o_a_proj stay dense. Use load_in_4bit=True for "
                    "4-bit experts, or the official FP8/FP4 layout (dsv4-convert to-hf --dtype keep)."
                )
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        refuse_incomplete_load(type(model).__name__, info)
        quantization_config = getattr(model.config, "quantization_config", None)
        if bnb_4bit_settings(quantization_config) is not None:
            apply_bnb_to_custom_weights(model, quantization_config)
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As transformers', and the custom-code folder is complete: `auto_map` names the config, the base model
        and the causal LM (transformers writes one model class per save), plus a `requirements.txt`; a model loaded
        directly from an official folder also carries its tokenizer files, chat template and `encoding/`."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if not _is_main_process(kwargs):  # ranks of a distributed save: rank 0 writes the folder's extras
            return result
        _copy_plugin_code(self, save_directory)
        copy_official_side_files(getattr(self, "_official_source", None), save_directory)
        path = os.path.join(save_directory, "config.json")
        if getattr(self, "_auto_class", None) is not None and os.path.exists(path):
            with open(path) as f:
                config = json.load(f)
            config.setdefault("auto_map", {}).update(
                {
                    "AutoConfig": "configuration_deepseek_v4.DeepseekV4ExtConfig",
                    "AutoModel": "modeling_deepseek_v4.DeepseekV4ExtModel",
                    "AutoModelForCausalLM": "modeling_deepseek_v4.DeepseekV4ExtForCausalLM",
                }
            )
            _write_text_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
            _write_text_atomic(os.path.join(save_directory, "requirements.txt"), REQUIREMENTS_TXT)
        return result

    def resize_token_embeddings(self, *args, **kwargs):
        """As transformers', and every hash-routed layer's `tid2eid [vocab, K]` follows the new vocabulary: existing
        tokens keep their experts, new tokens get the default balanced hash (as at random init)."""
        result = super().resize_token_embeddings(*args, **kwargs)
        vocab = self.get_input_embeddings().weight.shape[0]
        for module in self.modules():
            if isinstance(module, DeepseekV4HashRouter) and module.tid2eid.shape[0] != vocab:
                table = default_tid2eid((vocab, module.tid2eid.shape[1]), module.num_experts)
                kept = min(vocab, module.tid2eid.shape[0])
                table[:kept] = module.tid2eid[:kept].cpu()
                module.tid2eid = table.to(module.tid2eid.device)
        return result

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """As transformers', plus the weights kept quantized in buffers (FP8: one value per byte, packed FP4: two;
        scales not counted), which are frozen, so only counted when `only_trainable` is False."""
        count = super().num_parameters(only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
        if only_trainable:
            return count
        for module in self.modules():
            if isinstance(module, _KeepsStorageDtype):
                for name in module._quantized_buffers:
                    buf = module._buffers.get(name)
                    if buf is not None and not name.endswith("_scale_inv"):
                        count += buf.numel() * (2 if buf.dtype in (torch.int8, torch.uint8) else 1)
        return count

    def add_adapter(self, adapter_config, adapter_name: str | None = None) -> None:
        """transformers' `add_adapter`, with the grouped LoRA layers registered on a `LoraConfig` (so "experts" and
        "o_a_proj" can be targeted, and "all-linear" means the modules the loss trains: `expert_lora.py`); with a
        PEFT too old for this transformers, the error names the PEFT calls that work instead."""
        from .expert_lora import prepare_lora_config

        with peft_version_hint("add_adapter"):
            return super().add_adapter(prepare_lora_config(adapter_config), adapter_name)

    def load_adapter(self, peft_model_id: str | None = None, adapter_name: str | None = None, peft_config=None,
                     *args, **kwargs):  # fmt: skip
        """transformers' `load_adapter` (also what `AutoModelForCausalLM.from_pretrained(<adapter folder>)` calls),
        with the grouped LoRA layers registered on the adapter's `LoraConfig`: PEFT does not save that registration,
        so a saved grouped adapter would otherwise be refused ("Target module ... is not supported"). With a PEFT too
        old for this transformers, the error names the PEFT calls that work instead."""
        from .expert_lora import prepare_lora_config

        with peft_version_hint("load_adapter"):
            if peft_config is None and peft_model_id is not None:
                from peft import PeftConfig

                # Read the adapter's config as transformers would (its download options plus `adapter_kwargs`);
                # transformers applies `adapter_kwargs` to the weights' download only when it reads the config
                # itself, so that is done here too.
                load_config, adapter_kwargs = kwargs.get("load_config"), kwargs.get("adapter_kwargs") or {}
                hub = {**(getattr(load_config, "download_kwargs", None) or {}), **adapter_kwargs}
                peft_config = PeftConfig.from_pretrained(peft_model_id, **hub)
                if load_config is not None:
                    load_config.download_kwargs.update(adapter_kwargs)
            return super().load_adapter(
                peft_model_id, adapter_name, prepare_lora_config(peft_config) if peft_config is not None else None,
                *args, **kwargs,
            )  # fmt: skip


# Official / native-saved tensor names (docs/official-format.md §6): `embed.weight`, `layers.N.attn.*`, `head.weight`.
_OFFICIAL_NAME = re.compile(r"^(model\.)?(embed\.weight|head\.weight|layers\.\d+\.(attn|ffn|hc_attn|hc_ffn)[._])")


def refuse_incomplete_load(model_name: str, info: dict) -> None:
    """Raise if `from_pretrained` left weights missing: they would stay random and the model would compute garbage
    with only a log line to say so (wrong shapes already raise in transformers unless `ignore_mismatched_sizes`)."""
    missing = sorted(info.get("missing_keys") or ())
    if not missing:
        return
    unexpected = sorted(info.get("unexpected_keys") or ())
    if any(_OFFICIAL_NAME.match(name) for name in unexpected):
        fix = (
            "The checkpoint uses DeepSeek's official tensor names (an official release, or a folder saved by "
            "transformers' native deepseek_v4) but its config.json is not the official one: with the release's own "
            "config.json (model_type deepseek_v4) from_pretrained loads it directly, or convert it once with "
            "`dsv4-convert to-hf SRC DST` (add `--dtype keep` to keep the FP8 / FP4 weights in memory) and load DST."
        )
    else:
        fix = (
            "Load a folder saved from this model class with the same configuration (layers, experts, MTP blocks), "
            "or pass the matching config."
        )
    problems = [f"{len(missing)} missing: {_listing(missing)}"]
    if unexpected:
        problems.append(f"{len(unexpected)} in the checkpoint but not in the model: {_listing(unexpected)}")
    raise ValueError(
        f"{model_name}.from_pretrained would leave weights uninitialised (random): {'; '.join(problems)}. {fix}"
    )


def _listing(names: list[str], shown: int = 6) -> str:
    more = f", ... (+{len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _is_main_process(kwargs: dict) -> bool:
    """`save_pretrained`'s `is_main_process`, and rank 0 when torch.distributed is initialized (FSDP / TP saves call
    `save_pretrained` on every rank)."""
    if not kwargs.get("is_main_process", True):
        return False
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def _copy_plugin_code(model, save_directory: str) -> None:
    """FSDP2's `fully_shard` swaps the model's class for a generated `FSDP<Name>` whose module is torch's, so
    transformers' `custom_object_save` copies torch's FSDP files instead of this package's: put the plugin's modeling
    files there instead (and drop the copied torch files)."""
    cls = type(model)
    origin = next(c for c in cls.__mro__ if not c.__module__.startswith("torch."))
    if origin is cls or getattr(model, "_auto_class", None) is None:
        return
    from transformers.dynamic_module_utils import custom_object_save, get_relative_import_files

    wrong = sys.modules[cls.__module__].__file__
    for file in [wrong, *get_relative_import_files(wrong)]:
        copied = os.path.join(save_directory, os.path.basename(file))
        if os.path.exists(copied):
            os.remove(copied)
    custom_object_save(origin, save_directory)


def _write_text_atomic(path: str, text: str) -> None:
    """Write through a temporary file and rename, so a crash never leaves a half-written file (the name is unique
    per process: ranks of a distributed save never share a temporary file)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
