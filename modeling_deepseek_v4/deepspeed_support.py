"""DeepSpeed ZeRO-3 support: the MoE block is a ZeRO-3 *leaf module* (issue #16; docs/hf-integration.md, DeepSpeed).

ZeRO-3 partitions every parameter across the ranks and gathers a module's own parameters in a forward pre-hook of
that module. A rank that routes no token to an expert never calls a per-expert submodule, so its peers wait in that
submodule's all-gather forever (the known hang of Mixtral / Qwen-MoE under ZeRO-3). Marking the whole MoE block a
leaf (`deepspeed.utils.set_z3_leaf_modules`) makes DeepSpeed gather all of the block's parameters (router, expert
banks, shared expert, and whatever PEFT / quantization hangs below it) in one collective at the block's entry, which
every rank reaches; no hook is installed below it. transformers 5.23 / 5.24 mark no module of a custom model.

In this package the routed experts are one module with 3-D banks (`DeepseekV4Experts`, `gate_up_proj [E, 2I, d]`,
`down_proj [E, d, I]`) that runs on every rank whatever the routing, so the unmarked model does not hang either
(tests/distributed/test_deepspeed.py trains it with an expert starved on one rank). The leaf marking is still what
DeepSpeed recommends for MoE blocks: it keeps the block safe for expert layouts and adapters that do call
submodules per expert, and it replaces five gathers per block (router, expert banks, the shared expert's three
linears) with one.

`mark_zero3_leaf_modules(model)` marks every `DeepseekV4SparseMoeBlock` (decoder layers, the MTP block, the DSpark
drafter) when ZeRO-3 is active, i.e. when a live `HfDeepSpeedConfig` says stage 3: `TrainingArguments(deepspeed=...)`
creates one. The model calls it from `post_init`, which runs at the end of construction, also inside
`deepspeed.zero.Init` where `from_pretrained` builds the model under ZeRO-3; the mark is a plain module attribute
that `deepspeed.initialize` reads later. DeepSpeed is imported only then, so the package never needs it.

Use with the Trainer (examples/deepspeed_zero3.json, examples/deepspeed_zero2.json):

    args = TrainingArguments(..., deepspeed="examples/deepspeed_zero3.json")  # before from_pretrained
    model = AutoModelForCausalLM.from_pretrained(path)  # built in zero.Init, MoE blocks marked
    Trainer(model=model, args=args, ...).train()  # launch: `deepspeed --num_gpus N train.py` or torchrun

The order matters: a model built *before* the `TrainingArguments` sees no ZeRO-3 config (transformers' own rule for
`zero.Init`). The zero3 example therefore also names the block in DeepSpeed's `zero_optimization.leaf_module` (read
by `deepspeed.initialize`; tested with DeepSpeed 0.19.8, and releases without that key reject it: delete it
there and call `mark_zero3_leaf_modules(model, force=True)` instead). With `accelerate launch` and a DeepSpeed plugin,
`deepspeed_moe_layer_cls_names: DeepseekV4SparseMoeBlock` does the same. ZeRO-1 / 2 shard only optimizer state and
gradients, run every module whole, and need no marking. On a machine without a GPU, accelerate (1.15) never
enables DeepSpeed for the Trainer (`PartialState` takes its DeepSpeed branch only off CPU), so CPU runs call
`deepspeed.initialize` directly, as the tests do.
"""

from __future__ import annotations

from torch import nn

from .moe import DeepseekV4SparseMoeBlock

# Modules whose parameters ZeRO-3 gathers as one unit (their subtree gets no hooks of its own).
ZERO3_LEAF_CLASSES: tuple[type[nn.Module], ...] = (DeepseekV4SparseMoeBlock,)


def zero3_enabled() -> bool:
    """Whether a live transformers `HfDeepSpeedConfig` (made by `TrainingArguments(deepspeed=...)`) says ZeRO-3."""
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # a transformers without the DeepSpeed integration cannot have ZeRO-3 enabled
        return False
    return bool(is_deepspeed_zero3_enabled())


def mark_zero3_leaf_modules(model: nn.Module, force: bool = False) -> list[nn.Module]:
    """Mark the MoE blocks of `model` as DeepSpeed ZeRO-3 leaf modules, when ZeRO-3 is active (or `force`).

    Returns the modules marked; `[]` (nothing done, DeepSpeed not imported) when ZeRO-3 is not active, when DeepSpeed
    is not installed, or when `model` has no MoE block. Idempotent: the model calls it on every `post_init` (the
    causal LM runs it for its inner model and again for itself).
    """
    if not (force or zero3_enabled()):
        return []
    if not any(isinstance(module, ZERO3_LEAF_CLASSES) for module in model.modules()):
        return []  # DeepSpeed < 0.18 raises when no module matches; nothing to mark anyway
    try:
        from deepspeed.utils import set_z3_leaf_modules
    except ImportError:  # optional dependency: without DeepSpeed there is no ZeRO-3 to prepare for
        return []
    return list(set_z3_leaf_modules(model, list(ZERO3_LEAF_CLASSES)))
