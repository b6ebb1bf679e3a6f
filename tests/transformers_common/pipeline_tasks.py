"""What transformers' `PipelineTesterMixin` needs besides the mixin itself, for the text-generation and
feature-extraction pipelines of this package's classes.

The mixin loads each architecture's tiny model (with its tokenizer) from `$TRANSFORMERS_TINY_MODEL_PATH/<model_type>/
<class name>`, listed in `$TRANSFORMERS_TINY_MODEL_PATH/reports/tiny_model_summary.json` (for native models these are
`hf-internal-testing` Hub repos), builds the pipeline through a per-task test class of transformers'
`tests/pipelines/`, runs that class's checks, then runs 10 examples at batch size 4. The sdist does not ship
`tests/pipelines/`, so the two task classes below hold the checks of transformers' `TextGenerationPipelineTests` /
`FeatureExtractionPipelineTests.run_pipeline_test` that apply to a tiny random model (no Hub models, no long-input
handling); the tiny models are written locally by `write_tiny_models`.
"""

from __future__ import annotations

import json
import os
import unittest
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import FeatureExtractionPipeline, PreTrainedTokenizerFast, TextGenerationPipeline, pipeline

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
# Every word of the prompts below, so that decoding gives the prompt back.
PROMPT_WORDS = ["This", "is", "a", "test", "Another", "great", "!", "Something", "else"]


def tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Word-level tokenizer with ids `<pad>` 0, `<bos>` 1, `<eos>` 2, `<unk>` 3 (the tester's config), a BOS
    prepended to every input, and filler words up to `vocab_size`."""
    words = PROMPT_WORDS + [f"w{i}" for i in range(vocab_size - len(SPECIALS) - len(PROMPT_WORDS))]
    vocab = {token: i for i, token in enumerate(SPECIALS + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def write_summary(root: Path, model_classes) -> None:
    """`reports/tiny_model_summary.json` as transformers' `utils/create_dummy_models.py` writes it."""
    names = [cls.__name__ for cls in model_classes]
    entry = {"tokenizer_classes": ["PreTrainedTokenizerFast"], "processor_classes": [], "model_classes": names}
    (root / "reports").mkdir(parents=True, exist_ok=True)
    (root / "reports" / "tiny_model_summary.json").write_text(json.dumps(dict.fromkeys(names, entry), indent=1))


def write_tiny_models(root: Path, config, model_classes) -> None:
    """One folder per class (`<root>/<model_type>/<class name>`): random weights from `config` and the tokenizer."""
    for cls in model_classes:
        folder = root / cls.config_class.model_type / cls.__name__
        cls(config).save_pretrained(folder)
        tiny_tokenizer(config.vocab_size).save_pretrained(folder)


def point_mixin_at(pipeline_mixin_module, root: Path) -> None:
    """Resolve the two tasks' test classes to this module instead of the absent `tests.pipelines.*`."""
    mapping = pipeline_mixin_module.pipeline_test_mapping
    mapping["text-generation"]["test"] = f"{__name__}.TextGenerationPipelineTests"
    mapping["feature-extraction"]["test"] = f"{__name__}.FeatureExtractionPipelineTests"
    if Path(pipeline_mixin_module.TRANSFORMERS_TINY_MODEL_PATH) != root:
        raise RuntimeError(
            f"test_pipeline_mixin reads tiny models from {pipeline_mixin_module.TRANSFORMERS_TINY_MODEL_PATH}, not "
            f"{root}: it was imported before TRANSFORMERS_TINY_MODEL_PATH was set."
        )


def import_pipeline_mixin(root: Path):
    """Imports `test_pipeline_mixin` with `TRANSFORMERS_TINY_MODEL_PATH=root` (read once, at import)."""
    saved = os.environ.get("TRANSFORMERS_TINY_MODEL_PATH")
    os.environ["TRANSFORMERS_TINY_MODEL_PATH"] = str(root)
    try:
        from transformers_sdist_tests import test_pipeline_mixin
    finally:
        if saved is None:
            os.environ.pop("TRANSFORMERS_TINY_MODEL_PATH")
        else:
            os.environ["TRANSFORMERS_TINY_MODEL_PATH"] = saved
    point_mixin_at(test_pipeline_mixin, root)
    return test_pipeline_mixin


class TextGenerationPipelineTests(unittest.TestCase):
    """`run_pipeline_test` of transformers' `TextGenerationPipelineTests`, minus its Hub-model and long-input parts."""

    def get_test_pipeline(self, model, tokenizer=None, dtype="float32", **processors):
        generator = TextGenerationPipeline(model=model, tokenizer=tokenizer, dtype=dtype, max_new_tokens=5)
        return generator, ["This is a test", "Another test"]

    def run_pipeline_test(self, text_generator, _):
        model, tokenizer = text_generator.model, text_generator.tokenizer

        outputs = text_generator("This is a test")
        self.assertEqual(list(outputs[0]), ["generated_text"])
        self.assertTrue(outputs[0]["generated_text"].startswith("This is a test"))

        outputs = text_generator("This is a test", return_full_text=False)
        self.assertIsInstance(outputs[0]["generated_text"], str)
        self.assertNotIn("This is a test", outputs[0]["generated_text"])

        text_generator = pipeline(
            task="text-generation", model=model, tokenizer=tokenizer, return_full_text=False, max_new_tokens=5
        )
        outputs = text_generator("This is a test")
        self.assertNotIn("This is a test", outputs[0]["generated_text"])
        outputs = text_generator("This is a test", return_full_text=True)
        self.assertTrue(outputs[0]["generated_text"].startswith("This is a test"))

        prompts = ["This is great !", "Something else"]
        for batch in ({}, {"batch_size": 2}):
            outputs = text_generator(prompts, num_return_sequences=2, do_sample=True, **batch)
            self.assertEqual([len(row) for row in outputs], [2, 2])
            self.assertTrue(all(isinstance(item["generated_text"], str) for row in outputs for item in row))

        outputs = text_generator("This is a test", return_tensors=True)
        self.assertIsInstance(outputs[0]["generated_token_ids"], list)

        for conflicting in ({"return_text": True}, {"return_tensors": True}):
            with self.assertRaises(ValueError):
                text_generator("test", return_full_text=True, **conflicting)
        with self.assertRaises(ValueError):
            text_generator("test", return_text=True, return_tensors=True)

        # The tokenizer prepends a BOS, so an empty prompt is one token.
        outputs = text_generator("")
        self.assertIsInstance(outputs[0]["generated_text"], str)


class FeatureExtractionPipelineTests(unittest.TestCase):
    """`run_pipeline_test` of transformers' `FeatureExtractionPipelineTests`: nested lists [1, tokens, hidden]."""

    def get_test_pipeline(self, model, tokenizer=None, dtype="float32", **processors):
        extractor = FeatureExtractionPipeline(model=model, tokenizer=tokenizer, dtype=dtype)
        return extractor, ["This is a test", "This is another test"]

    def run_pipeline_test(self, feature_extractor, examples):
        hidden = feature_extractor.model.config.hidden_size
        outputs = feature_extractor("This is a test")
        # [1 sequence][BOS + 4 words][hidden]
        self.assertEqual((len(outputs), len(outputs[0]), len(outputs[0][0])), (1, 5, hidden))
        outputs = feature_extractor(["This is a test", "Another test"])
        self.assertEqual([(len(o), len(o[0]), len(o[0][0])) for o in outputs], [(1, 5, hidden), (1, 3, hidden)])
        tensor = feature_extractor("This is a test", return_tensors=True)
        self.assertEqual(tuple(tensor.shape), (1, 5, hidden))
