"""The roofline cost model against hand-computed figures for a tiny shape, the presets against
their published parameter counts, and ModelShape.from_hf_config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tandem.sim.costmodel import (
    MODELS,
    Efficiency,
    Link,
    RooflineCostModel,
    kv_bytes_per_token,
    layer_params,
    model_shape,
    step_bytes,
    step_flops,
    weight_params,
)
from tandem.sim.types import CostModel, GpuSpec, ModelShape, StepShape

# layers 2, hidden 8, heads 2 (1 KV head) of dim 4, gated MLP of 16, vocabulary 10, 2 bytes
TINY = ModelShape("tiny", 2, 8, 2, 1, 4, 16, 10)
TOY_GPU = GpuSpec("toy", peak_flops=1000.0, mem_bandwidth=100.0, memory_bytes=10_000, cost_per_hour_usd=1.0, source="")
EFFICIENCY = Efficiency(mfu=0.5, mbu=0.8, step_overhead_s=0.5)
# 3 prompt tokens (contexts 1 + 2 + 3) and 2 decode sequences over 10 cached tokens
STEP = StepShape(prefill_tokens=3, prefill_context_tokens=6, decode_seqs=2, decode_context_tokens=10)


def test_tiny_shape_counts() -> None:
    assert layer_params(TINY) == 2 * 8 * 2 * 4 + 2 * 8 * 1 * 4 + 3 * 8 * 16 == 576
    assert weight_params(TINY) == 2 * 576 + 10 * 8 == 1232
    assert kv_bytes_per_token(TINY) == 2 * 2 * 1 * 4 * 2 == 32


def test_step_flops_and_bytes_by_hand() -> None:
    # linear 2 x 2 x 576 x 5 = 11520; LM head 2 x 10 x 8 x 2 = 320; attention 4 x 2 x 2 x 4 x 16 = 1024
    assert step_flops(TINY, STEP) == 12864.0
    # weights 1232 x 2 = 2464; KV 32 x (10 read + 5 written) = 480; activations 2 x 2 x 8 x 2 x 5 = 320
    assert step_bytes(TINY, STEP) == 3264.0


def test_step_seconds_is_the_roofline_plus_overhead() -> None:
    model = RooflineCostModel(TINY, TOY_GPU, efficiency=EFFICIENCY)
    assert model.compute_seconds(STEP) == pytest.approx(12864 / 500)  # 25.728 s
    assert model.memory_seconds(STEP) == pytest.approx(3264 / 80)  # 40.8 s: memory-bound
    assert model.step_seconds(STEP) == pytest.approx(40.8 + 0.5)
    # a prefill of 100 tokens is compute-bound: 2 x 2 x 576 x 100 + 4 x 2 x 2 x 4 x 5050 = 553,600 FLOPs
    prefill = StepShape(prefill_tokens=100, prefill_context_tokens=5050)
    assert model.step_seconds(prefill) == pytest.approx(553_600 / 500 + 0.5)


def test_idle_step_costs_nothing() -> None:
    assert RooflineCostModel(TINY, TOY_GPU, efficiency=EFFICIENCY).step_seconds(StepShape()) == 0.0


def test_tensor_parallel_divides_and_adds_all_reduces() -> None:
    model = RooflineCostModel(TINY, TOY_GPU, tp=2, efficiency=EFFICIENCY, tp_link=Link(bandwidth=40.0, latency_s=0.25))
    # per all-reduce and GPU: 2 x (2 - 1) / 2 x 5 tokens x 8 x 2 bytes = 80 bytes -> 2 s + 0.25 s; 2 per layer
    assert model.all_reduce_seconds(STEP) == pytest.approx(4 * 2.25)
    assert model.step_seconds(STEP) == pytest.approx(40.8 / 2 + 9.0 + 0.5)


def test_transfer_and_capacity() -> None:
    model: CostModel = RooflineCostModel(TINY, TOY_GPU, kv_link=Link(bandwidth=500.0, latency_s=0.1))
    assert model.transfer_seconds(1000) == pytest.approx(2.1)
    assert model.kv_bytes_per_token() == 32
    assert RooflineCostModel(TINY, TOY_GPU).kv_capacity_tokens(0.9) == (9000 - 2464) // 32 == 204
    assert RooflineCostModel(MODELS["llama-3-70b"], TOY_GPU).kv_capacity_tokens() == 0


def test_llama_3_8b_preset_matches_its_published_parameter_count() -> None:
    shape = model_shape("Llama-3-8B")
    embedding = shape.vocab_size * shape.hidden_size
    norms = (2 * shape.num_layers + 1) * shape.hidden_size
    assert weight_params(shape) + embedding + norms == 8_030_261_248  # Meta-Llama-3-8B


@pytest.mark.parametrize(("name", "billions"), [("opt-13b", 12.85), ("opt-66b", 65.7), ("opt-175b", 174.6)])
def test_opt_presets_are_within_one_percent_of_their_size(name: str, billions: float) -> None:
    shape = MODELS[name]
    assert shape.num_kv_heads == shape.num_heads and not shape.gated_mlp
    assert weight_params(shape) == pytest.approx(billions * 1e9, rel=0.01)  # LM head tied to the embedding


def test_unknown_model_lists_the_presets() -> None:
    with pytest.raises(ValueError, match=r"^Unknown model 'gpt-2'; known: llama-3-70b, llama-3-8b, opt-13b"):
        model_shape("gpt-2")


def test_from_hf_config_reads_a_llama_directory(tmp_path: Path) -> None:
    config = {
        "_name_or_path": "bench",
        "model_type": "llama",
        "num_hidden_layers": 4,
        "hidden_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "intermediate_size": 768,
        "vocab_size": 512,
        "torch_dtype": "float32",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert ModelShape.from_hf_config(tmp_path) == ModelShape("bench", 4, 256, 4, 2, 64, 768, 512, dtype_bytes=4)


def test_from_hf_config_reads_opt(tmp_path: Path) -> None:
    config = {
        "model_type": "opt",
        "num_hidden_layers": 40,
        "hidden_size": 5120,
        "num_attention_heads": 40,
        "ffn_dim": 20480,
        "vocab_size": 50272,
        "torch_dtype": "float16",
    }
    path = tmp_path / "opt-13b" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(config))
    assert ModelShape.from_hf_config(path) == MODELS["opt-13b"]


def test_from_hf_config_names_a_bad_key(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"num_attention_heads": 4, "hidden_size": 0}))
    with pytest.raises(ValueError, match=r"config\.json: hidden_size must be a positive int, got 0$"):
        ModelShape.from_hf_config(path)
