"""Render a model card for a plugin folder from its metadata, with `huggingface_hub`'s `ModelCard` /
`ModelCardData`: architecture from `config.json`, provenance from `dsv4_conversion.json` (written by
`dsv4-convert`), adapter information from `adapter_config.json` (PEFT), and what the caller adds (license, base
model, datasets, training arguments, evaluation numbers). The loading example names the repo id when the caller
knows it (`push_folder` passes it), else the folder's name."""

from __future__ import annotations

import json
import os
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from modeling_deepseek_v4 import __version__

TEMPLATE = Path(__file__).with_name("template.md")


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: unreadable JSON ({exc}); fix or remove the file.") from None


def render_model_card(
    folder: str | os.PathLike,
    *,
    repo_id: str | None = None,
    model_name: str | None = None,
    license: str | None = None,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    training: dict | None = None,
    evaluation: dict | None = None,
    tags: list[str] | None = None,
) -> ModelCard:
    """Card for `folder` (a plugin model folder, or a PEFT adapter folder on top of one). With `repo_id` (where the
    folder is published, e.g. "org/name") the loading example uses it and the title defaults to its name; without
    it they use the folder's name."""
    folder = Path(folder)
    config = _read_json(folder / "config.json")
    adapter = _read_json(folder / "adapter_config.json")
    if config is None and adapter is None:
        raise ValueError(f"{folder}: neither config.json nor adapter_config.json; is this a model folder?")
    conversion = _read_json(folder / "dsv4_conversion.json") or {}
    base_model = base_model or (adapter or {}).get("base_model_name_or_path")
    layout = (config or {}).get("dsv4_quantization") or {}
    qat = (config or {}).get("dsv4_qat") or {}
    card_tags = ["deepseek_v4", "deepseek_v4_ext", "custom_code", "mixture-of-experts"] + list(tags or [])
    card_tags += sorted({v for v in (layout.get("weights"), layout.get("experts")) if v})
    if qat:
        card_tags.append("qat")
    if adapter is not None:
        card_tags += ["peft", "lora"] if adapter.get("peft_type", "LORA") == "LORA" else ["peft"]
    data = ModelCardData(
        license=license,
        base_model=base_model,
        datasets=datasets,
        pipeline_tag="text-generation",
        library_name="peft" if adapter is not None else "transformers",
        tags=card_tags,
    )
    name = model_name or (repo_id.split("/")[-1] if repo_id else folder.resolve().name)
    architecture = _architecture(config) if config else [("adapter for", base_model or "unknown base model")]
    provenance = [(k.replace("_", " "), v) for k, v in conversion.items() if v is not None]
    if layout:
        formats = f"linears {layout.get('weights') or 'dense'}, routed experts {layout.get('experts') or 'dense'}"
        provenance.append(("weights kept quantized", f"{formats}, scales {layout.get('scale_dtype')}"))
    if qat:
        linears = " and FP8 linears" if qat.get("linears") else ""
        provenance.append(("quantization-aware training", f"{qat.get('experts')} routed experts{linears}"))
    if adapter is not None:
        provenance += [("adapter type", adapter.get("peft_type")), ("rank", adapter.get("r"))]
        provenance += [("target modules", adapter.get("target_modules"))]
        provenance += [("target parameters", adapter.get("target_parameters"))]
    return ModelCard.from_template(
        data,
        template_path=str(TEMPLATE),
        model_name=name,
        summary=_summary(config, adapter, conversion, base_model),
        architecture=architecture,
        usage=_usage(repo_id or name, adapter is not None, base_model),
        provenance=[(k, v) for k, v in provenance if v is not None],
        training=sorted((training or {}).items()),
        evaluation=sorted((evaluation or {}).items()),
        version=__version__,
    )


def write_model_card(folder: str | os.PathLike, output: str | os.PathLike | None = None, **kwargs) -> Path:
    """Render and write `README.md` (or `output`) atomically; returns the path."""
    card = render_model_card(folder, **kwargs)
    path = Path(output) if output else Path(folder) / "README.md"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(str(card))
    os.replace(tmp, path)
    return path


def _architecture(config: dict) -> list[tuple[str, object]]:
    ratios = (config.get("compress_ratios") or [])[: config.get("num_hidden_layers", 0)]
    rates = config.get("compress_rates") or {}
    csa, hca = rates.get("compressed_sparse_attention", 4), rates.get("heavily_compressed_attention", 128)
    counts = f"{sum(r == csa for r in ratios)} CSA, {sum(r == hca for r in ratios)} HCA, {ratios.count(0)} sliding"
    heads = f"{config.get('num_attention_heads')} heads x {config.get('head_dim')}"
    experts = f"{config.get('n_routed_experts')} routed (top {config.get('num_experts_per_tok')})"
    return [
        ("model_type", config.get("model_type")),
        ("layers", f"{len(ratios)} ({counts}) + {config.get('num_nextn_predict_layers', 0)} MTP"),
        ("hidden size", config.get("hidden_size")),
        ("attention", f"{heads}, window {config.get('sliding_window')}, index top-k {config.get('index_topk')}"),
        (
            "experts",
            f"{experts} + {config.get('n_shared_experts')} shared; first {config.get('num_hash_layers')} hashed",
        ),
        ("mHC streams", config.get("hc_mult")),
        ("dtype", config.get("dtype") or config.get("torch_dtype")),
    ]


def _summary(config, adapter, conversion, base_model) -> str:
    if adapter is not None:
        return f"A {adapter.get('peft_type', 'PEFT')} adapter for the DeepSeek-V4 model `{base_model}`."
    source = conversion.get("source")
    text = "A DeepSeek-V4 model in the `modeling_deepseek_v4` format (transformers plugin, own model type)."
    if source:
        text += f" Converted from the official checkpoint at `{source}`"
        text += f" (revision `{conversion['source_revision']}`)." if conversion.get("source_revision") else "."
    return text


def _usage(name: str, is_adapter: bool, base_model: str | None) -> str:
    """Loading code; `name` is the repo id when known, else the folder's name (to be replaced by the reader)."""
    if is_adapter:
        return (
            "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{base_model}", trust_remote_code=True)\n'
            f'model = PeftModel.from_pretrained(base, "{name}")'
        )
    return (
        "from transformers import AutoModelForCausalLM\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)\n'
        "# or `pip install modeling-deepseek-v4` and `import modeling_deepseek_v4` first to use the installed code"
    )
