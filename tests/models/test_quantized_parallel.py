"""quantized_parallel.py without a process group: which plan rules it takes over, and the clear errors for layouts it
cannot shard (slices that cut scale blocks, experts that do not divide, styles with no quantized layout). The sharded
forward, backward and save on 2 gloo ranks are in tests/distributed/test_tensor_expert_parallel.py."""

from __future__ import annotations

import pytest
import torch

from modeling_deepseek_v4.quantized_parallel import (
    _check_slices,
    _experts_placements,
    shard_quantized_buffers,
    take_buffer_rules,
)
from tests.conftest import tiny_model

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed (DTensor placements) is not in this build"
)

KEPT = {"weights": "fp8", "experts": "fp4", "scale_dtype": "float32"}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_buffer_rules_are_taken_out_of_the_plan():
    """transformers lists parameters only and would warn that these rules "match nothing": they name buffers here."""
    quantized = tiny_model("flash", dsv4_quantization=KEPT)
    taken = take_buffer_rules(quantized)
    assert taken[("tp", "model.layers.*.mlp.experts.gate_up_proj")] == "packed_colwise"
    assert taken[("tp", "model.layers.*.mlp.experts.down_proj")] == "rowwise"
    assert taken[("tp", "model.layers.*.self_attn.o_a_proj.weight")] == "colwise"
    assert taken[("ep", "model.layers.*.mlp.experts.gate_up_proj")] == "grouped_gemm"
    assert "model.layers.*.mlp.experts.gate_up_proj" not in quantized.tp_plan
    assert quantized.tp_plan["model.layers.*.self_attn.q_b_proj"] == "colwise"  # module rules stay
    assert quantized.ep_plan["model.layers.*.mlp.experts"] == "ep_dispatch_experts"
    dense = tiny_model("flash")
    assert take_buffer_rules(dense) == {} and "model.layers.*.mlp.experts.gate_up_proj" in dense.tp_plan


def test_slices_must_cover_whole_scale_blocks():
    model = tiny_model("flash", dsv4_quantization=KEPT)  # I = 32, E = 4, FP8 blocks of 128
    experts = model.model.layers[0].mlp.experts
    placements = _experts_placements("moe_tp_experts", ("packed_colwise", "rowwise"))
    # FP4 groups of 32 along the input: down_proj's 32 columns cannot split into 16 + 16
    with pytest.raises(
        ValueError, match=r"experts\.down_proj \(fp4\): tp_size=2 .* 32 input columns into slices of 16,"
    ):
        _check_slices("experts", experts, placements, 2, "tp")
    _check_slices("experts", experts, {"gate_up_proj": placements["gate_up_proj"]}, 2, "tp")  # rows: 1 per group
    ep = _experts_placements("ep_dispatch_experts", ("grouped_gemm", "grouped_gemm"))
    with pytest.raises(ValueError, match=r"ep_size=3 would split its 4 experts"):
        _check_slices("experts", experts, ep, 3, "ep")
    q_b = model.model.layers[0].self_attn.q_b_proj  # [128, 32] in 128x128 blocks: 64 rows are not a whole block
    with pytest.raises(ValueError, match=r"q_b\.weight \(fp8\): tp_size=2 .* slices of 64, .* blocks \(128 rows\)"):
        _check_slices("q_b", q_b, {"weight": torch.distributed.tensor.Shard(0)}, 2, "tp")


def test_a_style_without_quantized_layout_is_refused():
    model = tiny_model("flash", dsv4_quantization=KEPT)
    name = "model.layers.0.self_attn.q_b_proj"
    with pytest.raises(
        NotImplementedError, match=r"q_b_proj keeps its weights quantized \(fp8\).*'embedding_rowwise'"
    ):
        shard_quantized_buffers(model, None, {name: "embedding_rowwise"}, {}, {})
    experts = "model.layers.0.mlp.experts"  # the banks' own rules missing: no layout to give them
    with pytest.raises(NotImplementedError, match=r"experts keeps its weights quantized \(fp4\)"):
        shard_quantized_buffers(model, None, {}, {experts: "ep_dispatch_experts"}, {})
