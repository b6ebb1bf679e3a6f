"""Loading and saving hooks of the DeepSeek-V4 models (a mixin before `PreTrainedModel`).

- `from_pretrained`: with a bitsandbytes 4-bit `quantization_config`, the routed experts and the grouped `o_a_proj`
  are stored 4-bit too (bitsandbytes swaps only exact `nn.Linear`, hf-integration.md §9; `bnb_quant.py`).
- `save_pretrained`: the custom-code folder is complete (hf-integration.md §5): `auto_map` for AutoConfig,
  AutoModel and AutoModelForCausalLM (transformers writes one model class per save) and a `requirements.txt`, both
  written through a temporary file and renamed;
- `add_adapter` / `load_adapter`: transformers >= 5.24 needs PEFT >= 0.22 for them; the error then says what works
  with the installed PEFT (`compat.peft_version_hint`).
"""

from __future__ import annotations

import json
import os

from .bnb_quant import apply_bnb_to_custom_weights, bnb_4bit_settings, with_dense_modules
from .compat import TRANSFORMERS_REQUIREMENT, peft_version_hint


class DeepseekV4PretrainedIO:
    """`from_pretrained` / `save_pretrained` additions; expects to precede `PreTrainedModel` in the bases."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As transformers'; with a bitsandbytes 4-bit `quantization_config`, the routed experts and the grouped
        `o_a_proj` (which bitsandbytes leaves dense: it swaps only exact `nn.Linear`) are stored 4-bit too, while
        `lm_head` and the strict-fp32 compressor projections stay dense (`bnb_quant.py`)."""
        if kwargs.get("quantization_config") is not None:
            kwargs["quantization_config"] = with_dense_modules(
                kwargs["quantization_config"], cls._keep_in_fp32_modules_strict
            )
        result = super().from_pretrained(*args, **kwargs)
        model = result[0] if isinstance(result, tuple) else result
        quantization_config = getattr(model.config, "quantization_config", None)
        if bnb_4bit_settings(quantization_config) is not None:
            apply_bnb_to_custom_weights(model, quantization_config)
        return result

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As transformers', and the custom-code folder is complete: `auto_map` names the config, the base model
        and the causal LM (transformers writes one model class per save), plus a `requirements.txt`."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
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
            _write_text_atomic(
                os.path.join(save_directory, "requirements.txt"), f"torch>=2.11\n{TRANSFORMERS_REQUIREMENT}\n"
            )
        return result

    def add_adapter(self, *args, **kwargs):
        """transformers' `add_adapter`; with a PEFT too old for this transformers, the error names the PEFT calls
        that work instead (`peft.get_peft_model`)."""
        with peft_version_hint("add_adapter"):
            return super().add_adapter(*args, **kwargs)

    def load_adapter(self, *args, **kwargs):
        """transformers' `load_adapter`; with a PEFT too old for this transformers, the error names the PEFT calls
        that work instead (`peft.PeftModel.from_pretrained`)."""
        with peft_version_hint("load_adapter"):
            return super().load_adapter(*args, **kwargs)


def _write_text_atomic(path: str, text: str) -> None:
    """Write through a temporary file and rename, so a crash never leaves a half-written file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
