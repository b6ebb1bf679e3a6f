"""Quantization tools for DeepSeek-V4 models (installed as `modeling_deepseek_v4.quantization`).

- `quantize_model` / `dequantize_model`: switch a loaded model between dense weights and the official in-memory
  formats (FP8 linears, FP4 or FP8 routed experts), exactly as the converter's `--dtype keep` folders store them.
- `prepare_fp4_qat` / `convert_qat`: FP4 quantization-aware training with straight-through gradients, and the
  quantized model whose forward equals the QAT forward.
- `set_reference_numerics`: the official forward's simulated quantization (forward-math.md §9), on or off.
- `resident_weight_bytes`: measured bytes per parameter of the quantized modules.

The formats themselves live in the modeling folder (`modeling_deepseek_v4.quant_formats`), so Hub uploads of
quantized models carry them.
"""

# From a checkout's root this folder is also importable as the top-level `quantization`, which would load its files a
# second time as other modules (other classes, e.g. a second exception type); only the installed name is allowed.
if __name__ != "modeling_deepseek_v4.quantization":
    raise ImportError(
        f"`{__name__}` is this repository's quantization/ folder; import it as `modeling_deepseek_v4.quantization`."
    )

from modeling_deepseek_v4.reference_numerics import set_reference_numerics

from .qat import convert_qat, prepare_fp4_qat
from .quantize import dequantize_model, quantize_model, resident_weight_bytes

__all__ = [
    "convert_qat",
    "dequantize_model",
    "prepare_fp4_qat",
    "quantize_model",
    "resident_weight_bytes",
    "set_reference_numerics",
]
