"""The test classes behind test_common_mixins.py: transformers' `ModelTesterMixin`, `ConfigTester` and
`PipelineTesterMixin` (from the installed release's sdist, sdist_tests.py) with a tester for this package's classes,
and the same for transformers' native `deepseek_v4` classes, for the comparison in README ("transformers' common
model tests"). Import only after `sdist_tests.load_mixins()`.
"""

from __future__ import annotations

import atexit
import copy
import shutil
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV4Config, DeepseekV4ForCausalLM, DeepseekV4Model
from transformers_sdist_tests import test_modeling_common
from transformers_sdist_tests.generation.test_utils import GenerationTesterMixin
from transformers_sdist_tests.test_configuration_common import ConfigTester
from transformers_sdist_tests.test_modeling_common import ModelTesterMixin, ids_tensor

from modeling_deepseek_v4 import DeepseekV4ExtConfig, DeepseekV4ExtForCausalLM, DeepseekV4ExtModel
from tests.transformers_common import pipeline_tasks

# Tiny models for the pipeline tests (pipeline_tasks.py): the mixin reads their summary when it is imported.
TINY_MODELS = Path(tempfile.mkdtemp(prefix="dsv4-tiny-models-"))
atexit.register(shutil.rmtree, TINY_MODELS, ignore_errors=True)
PIPELINE_CLASSES = (DeepseekV4ExtModel, DeepseekV4ExtForCausalLM)
pipeline_tasks.write_summary(TINY_MODELS, PIPELINE_CLASSES)
test_pipeline_mixin = pipeline_tasks.import_pipeline_mixin(TINY_MODELS)

torch.set_num_threads(1)

GENERATION_NOT_HERE = (
    "GenerationTesterMixin (tests/generation/test_utils.py) is not in the transformers sdist; the class inherits an "
    "empty stand-in, so this inheritance check would prove nothing. generate is tested by this package's own suite "
    "(tests/models/test_generate.py, test_generation_modes.py, test_mtp_speculation.py, test_static_cache.py)"
)


class DeepseekV4ExtModelTester:
    """Tiny config and inputs for the common tests (the role of transformers' `CausalLMModelTester`): 2 layers
    [CSA rate 4, HCA rate 8] + the MTP block, window 8, indexer top-2. 20 tokens (native's tester: 7), so that the
    longer rows of the right-padded batch (row i has i + 1 real tokens) pass the window, emit HCA entries and have
    more CSA entries than the indexer keeps. No hash-routed layer: the common tests also run from `inputs_embeds`
    alone, which hash routing (by token id) cannot; tests/models cover it."""

    config_class = DeepseekV4ExtConfig
    base_model_class = DeepseekV4ExtModel
    causal_lm_class = DeepseekV4ExtForCausalLM

    def __init__(self, parent, batch_size=13, seq_length=20):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = True
        self.use_input_mask = True
        self.use_labels = True
        self.vocab_size = 99
        self.hidden_size = 64
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.num_key_value_heads = 1
        self.head_dim = 32
        self.pad_token_id = 0
        self.bos_token_id = 1
        self.eos_token_id = 2
        self.num_labels = 3

    def config_kwargs(self) -> dict:
        return dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            moe_intermediate_size=32,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            head_dim=self.head_dim,
            qk_rope_head_dim=8,
            q_lora_rank=32,
            o_groups=2,
            o_lora_rank=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            index_n_heads=2,
            index_head_dim=16,
            index_topk=2,
            sliding_window=8,
            hc_mult=2,
            hc_sinkhorn_iters=3,
            # Layer 0 CSA (rate 4), layer 1 HCA (rate 8); then the MTP block.
            compress_ratios=[4, 8, 0],
            compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
            num_hash_layers=0,
            num_nextn_predict_layers=1,
            max_position_embeddings=64,
            attn_chunk_size=4,
            indexer_chunk_size=4,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )

    def get_config(self):
        return self.config_class(**self.config_kwargs())

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        input_mask = torch.tril(torch.ones_like(input_ids))
        token_labels = ids_tensor([self.batch_size, self.seq_length], self.num_labels)
        return self.get_config(), input_ids, input_mask, token_labels

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, input_mask, _ = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": input_mask}

    def create_and_check_model(self, config, input_ids, input_mask, token_labels):
        model = self.base_model_class(config=config).eval()
        model(input_ids, attention_mask=input_mask)
        result = model(input_ids)
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size))
        lm = self.causal_lm_class(config=config).eval()
        result = lm(input_ids, attention_mask=input_mask, labels=token_labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.seq_length, self.vocab_size))
        self.parent.assertTrue(torch.isfinite(result.loss))


class CommonTestsBase(ModelTesterMixin, GenerationTesterMixin):
    """The model-independent tests that transformers' `CausalLMModelTest` (tests/causal_lm_tester.py, not in the
    sdist) adds to the mixins: `test_config`, `test_model`, `test_causal_lm_can_accept_training_kwargs` (its
    classification / QA head tests have no head to run on here, its Flash Attention test needs a GPU); and what
    both DeepSeek-V4 implementations need (4-D per-layer hidden states)."""

    model_tester_class = None
    # model_type -> (base class name, causal-LM class name) to add to transformers' static name tables for this
    # class's tests; a native model is listed there already.
    auto_names: dict[str, tuple[str, str]] = {}
    # Classes whose tiny model the pipeline tests load (listed in the tiny-model summary).
    tiny_pipeline_models: tuple = ()

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # The mixins pick the heads to build labels for (`_prepare_for_class`), to train (`test_training`) and to
        # check `shift_labels` on from the `*_MAPPING_NAMES` tables, which list native models only; a plugin's Auto
        # registration does not reach them. Add this model's names for the duration of the class.
        base = dict(test_modeling_common.MODEL_MAPPING_NAMES)
        causal = dict(test_modeling_common.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
        for model_type, (base_name, causal_name) in cls.auto_names.items():
            base[model_type], causal[model_type] = base_name, causal_name
        cls._name_patches = [
            mock.patch.object(test_modeling_common, "MODEL_MAPPING_NAMES", base),
            mock.patch.object(test_modeling_common, "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", causal),
        ]
        for patch in cls._name_patches:
            patch.start()

        if cls.tiny_pipeline_models:
            config = cls.model_tester_class(None).get_config()
            pipeline_tasks.write_tiny_models(TINY_MODELS, config, cls.tiny_pipeline_models)

    @classmethod
    def tearDownClass(cls):
        for patch in cls._name_patches:
            patch.stop()
        super().tearDownClass()

    def setUp(self):
        self.model_tester = self.model_tester_class(self)
        self.config_tester = ConfigTester(self, config_class=self.model_tester.config_class)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_causal_lm_can_accept_training_kwargs(self):
        # Through the Auto classes, as Trainer builds the model: `labels` + `num_items_in_batch`, tuple output.
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        with tempfile.TemporaryDirectory() as tmpdir:
            AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmpdir)
            model = AutoModelForCausalLM.from_pretrained(tmpdir, dtype=torch.float32)
            self.assertIsInstance(model, self.model_tester.causal_lm_class)
            inputs_dict["num_items_in_batch"] = torch.tensor(inputs_dict["input_ids"].shape[0])
            inputs_dict["labels"] = inputs_dict["input_ids"]
            loss = model(**inputs_dict, return_dict=False)[0]
            self.assertTrue(torch.isfinite(loss))

    @unittest.skip(GENERATION_NOT_HERE)
    def test_generation_tester_mixin_inheritance(self):
        pass

    def test_hidden_states_output(self):
        # As native's DeepseekV4ModelTest: each decoder layer's entry is the mHC residual streams [B, S, hc_mult,
        # hidden] (collapsed by `hc_head` only at the top), the last entry the final [B, S, hidden]; the common test
        # expects [B, S, hidden] everywhere. Same checks otherwise, also through `config.output_hidden_states`.
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        batch, seq = inputs_dict["input_ids"].shape
        for model_class in self.all_model_classes:
            for via_config in (False, True):
                run_config, inputs = copy.deepcopy(config), dict(inputs_dict)
                if via_config:
                    run_config.output_hidden_states = True
                else:
                    inputs["output_hidden_states"] = True
                model = model_class(run_config).eval()
                with torch.no_grad():
                    hidden_states = model(**inputs).hidden_states
                self.assertEqual(len(hidden_states), config.num_hidden_layers + 1)
                for layer_hidden in hidden_states[:-1]:
                    self.assertEqual(layer_hidden.shape, (batch, seq, config.hc_mult, config.hidden_size))
                self.assertEqual(hidden_states[-1].shape, (batch, seq, config.hidden_size))


ROPE_TYPES_ONLY = (
    "DeepSeek-V4 defines RoPE 'default' (main) and 'yarn' (compressed layers) only, as the official model; the config "
    "refuses other rope_type values with a ValueError instead of computing a model that was never trained"
)


def loading_refusal_off():
    """This model's `from_pretrained` raises, naming the tensors, where a folder would leave weights random (README
    'Use'; tests/models/test_load_checks.py); transformers loads, warns and reports `missing_keys`, which some
    common tests read. Off for those tests only."""
    return mock.patch("modeling_deepseek_v4.pretrained_io.refuse_incomplete_load")


class DeepseekV4ExtCommonTest(CommonTestsBase, test_pipeline_mixin.PipelineTesterMixin, unittest.TestCase):
    model_tester_class = DeepseekV4ExtModelTester
    all_model_classes = (DeepseekV4ExtModel, DeepseekV4ExtForCausalLM)
    pipeline_model_mapping = {"feature-extraction": DeepseekV4ExtModel, "text-generation": DeepseekV4ExtForCausalLM}
    auto_names = {"deepseek_v4_ext": ("DeepseekV4ExtModel", "DeepseekV4ExtForCausalLM")}
    tiny_pipeline_models = PIPELINE_CLASSES
    # No attention weights exist to return (see test_attention_outputs); the mixins' switch for that.
    has_attentions = False
    # As native's test: parameters that the main causal-LM loss does not reach get no gradient by design: the MTP
    # block (its own loss), the lightning indexer (only selects entries through a top-k) and a compressor whose
    # window the short test rows never fill.
    test_all_params_have_gradient = False
    # The mixin dates a model by the copyright line of its config file and skips this check for files without one
    # (taken as pre-2023); this package's files carry no such line, the check applies.
    test_can_init_all_missing_weights_before_2023 = True

    @unittest.skip(
        "output_attentions: the attention runs in query chunks over a key band with the sparse compressed entries "
        "and never forms the weights; the model warns once and returns attentions=None"
    )
    def test_attention_outputs(self):
        pass

    # These load folders that do not cover the model (or an empty state dict) and read `missing_keys`: with the
    # refusal off they check that `missing_keys`, which the refusal relies on, names exactly the weights left out.
    def test_correct_missing_keys(self):
        with loading_refusal_off():
            super().test_correct_missing_keys()

    def test_model_weights_reload_no_missing_tied_weights(self):
        with loading_refusal_off():
            super().test_model_weights_reload_no_missing_tied_weights()

    def test_base_model_prefix_loads_base_weights(self):
        with loading_refusal_off():
            super().test_base_model_prefix_loads_base_weights()

    def test_can_init_all_missing_weights(self):
        with loading_refusal_off():
            super().test_can_init_all_missing_weights()

    # The `yarn` case of the parameterized test runs.
    @unittest.skip(ROPE_TYPES_ONLY)
    def test_model_rope_scaling_from_config_0_linear(self):
        pass

    @unittest.skip(ROPE_TYPES_ONLY)
    def test_model_rope_scaling_from_config_1_dynamic(self):
        pass


class NativeDeepseekV4ModelTester(DeepseekV4ExtModelTester):
    """transformers' native `deepseek_v4` with the config of its own `DeepseekV4ModelTester`
    (tests/models/deepseek_v4/test_modeling_deepseek_v4.py: 2 layers [HCA, CSA], score-routed MoE, no MTP)."""

    config_class = DeepseekV4Config
    base_model_class = DeepseekV4Model
    causal_lm_class = DeepseekV4ForCausalLM

    def config_kwargs(self) -> dict:
        return dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            max_position_embeddings=64,
            head_dim=self.head_dim,
            partial_rotary_factor=8 / 32,
            q_lora_rank=32,
            o_groups=2,
            o_lora_rank=16,
            n_routed_experts=4,
            n_shared_experts=1,
            mlp_layer_types=["moe", "moe"],
            layer_types=["heavily_compressed_attention", "compressed_sparse_attention"],
            sliding_window=8,
            hc_mult=2,
            hc_sinkhorn_iters=3,
            index_n_heads=2,
            index_head_dim=16,
            index_topk=2,
            num_nextn_predict_layers=0,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )


# transformers' test_bc_cache_name_forward passes the deprecated `past_key_values` on purpose (5.24) to check the
# warning; pyproject.toml makes that warning an error for this package's own calls.
@pytest.mark.filterwarnings("default:.*past_key_values.*:FutureWarning")
class NativeDeepseekV4CommonTest(CommonTestsBase, test_pipeline_mixin.PipelineTesterMixin, unittest.TestCase):
    """The same mixins on transformers' native classes, for the comparison in README, with the skips of native's
    own test file where they apply."""

    model_tester_class = NativeDeepseekV4ModelTester
    all_model_classes = (DeepseekV4Model, DeepseekV4ForCausalLM)
    pipeline_model_mapping = {"feature-extraction": DeepseekV4Model, "text-generation": DeepseekV4ForCausalLM}
    # As native's test file.
    test_all_params_have_gradient = False

    def is_pipeline_test_to_skip(self, *args, **kwargs):
        # As native's test file.
        return True

    @unittest.skip(
        "native's test file skips it: its conversion mapping renames in two passes (official prefixes, then names "
        "inside them), which this check of single-pass reversibility cannot follow"
    )
    def test_reverse_loading_mapping(self):
        pass
