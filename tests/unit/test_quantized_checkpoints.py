"""Quantized weights: genuine compressed-tensors checkpoints against transformers, resident bytes,
`--quantization fp8`, refusals, and the flag on every command and in the chart.

Checkpoints are produced here from tiny random Llama and Qwen2 models by the compressed-tensors
library itself (`tandem.engine.quant.writer`): FP8 W8A8 (per-channel fp8 weights, dynamic
per-token fp8 activations; format float-quantized) and INT8 W8A16 (per channel, stored
int-quantized; per group of 32 columns, stored pack-quantized). transformers loads the same
directories with its compressed-tensors integration; its default load is the oracle: it
emulates the fp8 / int8 weights and the per-token fp8 activations in float32.

Tolerance on prompt logits: atol 1e-4 for INT8 W8A16 (the unquantized exactness tests' bound),
2e-3 for FP8 W8A8. Both sides compute the same quantized weights bit for bit (same scales, same
rounding, float32), so INT8 differs only by float32 accumulation order (~1e-6 relative on
logits of magnitude ~10). FP8 also quantizes every activation row at run time: an element that
lies within accumulation error of an fp8 rounding boundary can round to the neighbouring fp8
value (one step is 1/8 of its magnitude) on one side only, and that moves the logits by
~1e-4 to 1e-3 (measured up to 5.5e-4 here); 2e-3 bounds that and stays far below the effect
of quantization itself: the full-precision model's logits differ from the oracle's by more
than 10x the tolerance (asserted), so the comparison is not vacuous. Greedy tokens are equal.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch

from tandem.engine import Engine, SamplingParams
from tandem.engine.quant.linear import Fp8Linear, Int8Linear
from tandem.engine.quant.writer import write_compressed_checkpoint
from tests.conftest import MODEL_CONFIGS, random_prompts, save_random_model
from tests.unit.oracle import hf_greedy, hf_prompt_logits

BASES = {"llama": "llama_gqa_llama3_rope", "qwen2": "qwen2_bias_tied"}
# name -> (preset, group_size, storage)
SCHEMES = {
    "fp8_w8a8": ("FP8_DYNAMIC", None, None),
    "int8_w8a16_channel": ("W8A16", None, "int-quantized"),
    "int8_w8a16_group32": ("W8A16", 32, None),
}
LENGTHS = [1, 9, 17, 60]
MAX_NEW = 16
ATOL = {"fp8_w8a8": 2e-3, "int8_w8a16_channel": 1e-4, "int8_w8a16_group32": 1e-4}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """(base, scheme) -> directory; scheme "base" is the full-precision float32 model."""
    dirs: dict[tuple[str, str], Path] = {}
    for base, config_name in BASES.items():
        source = save_random_model(tmp_path_factory.mktemp(base), MODEL_CONFIGS[config_name])
        dirs[base, "base"] = source
        for scheme, (preset, group_size, storage) in SCHEMES.items():
            target = tmp_path_factory.mktemp(f"{base}-{scheme}")
            dirs[base, scheme] = write_compressed_checkpoint(source, target, preset, group_size, storage)
    return dirs


def _format(path: Path) -> str:
    return json.loads((path / "config.json").read_text())["quantization_config"]["format"]


def test_checkpoints_are_genuine_compressed_tensors(checkpoints: dict[tuple[str, str], Path]) -> None:
    assert _format(checkpoints["llama", "fp8_w8a8"]) == "float-quantized"
    assert _format(checkpoints["llama", "int8_w8a16_channel"]) == "int-quantized"
    assert _format(checkpoints["qwen2", "int8_w8a16_group32"]) == "pack-quantized"


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@pytest.mark.parametrize("base", sorted(BASES))
def test_matches_transformers(base: str, scheme: str, checkpoints: dict[tuple[str, str], Path]) -> None:
    path = checkpoints[base, scheme]
    engine = Engine.from_pretrained(path, num_blocks=64)
    prompts = random_prompts(LENGTHS, engine.model_config.vocab_size, seed=zlib.crc32(f"{base}{scheme}".encode()))
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, return_prompt_logits=True)
    outputs = engine.generate(prompts, params)
    full = Engine.from_pretrained(checkpoints[base, "base"], num_blocks=64).generate(prompts, params)
    for prompt, out, unquantized in zip(prompts, outputs, full):
        assert list(out.token_ids) == hf_greedy(path, prompt, MAX_NEW)
        ref = hf_prompt_logits(path, prompt)
        assert out.prompt_logits is not None and unquantized.prompt_logits is not None
        torch.testing.assert_close(out.prompt_logits, ref, atol=ATOL[scheme], rtol=0)
        if len(prompt) > 1:  # the quantization shows
            assert (unquantized.prompt_logits - ref).abs().max() > 10 * ATOL["fp8_w8a8"]
    layer = engine.model.model.layers[0].mlp.down_proj
    assert isinstance(layer, Fp8Linear if scheme == "fp8_w8a8" else Int8Linear)
    assert layer.weight.dtype == (torch.float8_e4m3fn if scheme == "fp8_w8a8" else torch.int8)
    engine.check_integrity()
    assert engine.is_drained()


def test_load_time_fp8_equals_the_fp8_checkpoint(checkpoints: dict[tuple[str, str], Path]) -> None:
    """`--quantization fp8` computes the scales llm-compressor's FP8_DYNAMIC does (amax / 448
    per output channel) and runs the same layer: identical weights, logits and tokens."""
    for base in BASES:
        at_load = Engine.from_pretrained(checkpoints[base, "base"], num_blocks=64, quantization="fp8")
        stored = Engine.from_pretrained(checkpoints[base, "fp8_w8a8"], num_blocks=64)
        assert at_load.quant_plan is not None and at_load.quant_plan.describe() == stored.quant_plan.describe().replace(
            "compressed-tensors", "fp8"
        )
        ours, theirs = dict(at_load.model.named_parameters()), dict(stored.model.named_parameters())
        assert sorted(ours) == sorted(theirs)
        for name, tensor in ours.items():
            assert tensor.dtype == theirs[name].dtype, name
            assert torch.equal(tensor.float(), theirs[name].float()), name
        prompts = random_prompts([5, 40], at_load.model_config.vocab_size, seed=3)
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, return_prompt_logits=True)
        for a, b in zip(at_load.generate(prompts, params), stored.generate(prompts, params)):
            assert a.token_ids == b.token_ids
            assert a.prompt_logits is not None and b.prompt_logits is not None
            assert torch.equal(a.prompt_logits, b.prompt_logits)


# Resident bytes, from the shapes alone: a bigger MLP so that linear layers dominate.
BYTES_CONFIG = dict(MODEL_CONFIGS["qwen2_bias_tied"], hidden_size=128, intermediate_size=512, num_attention_heads=4)


def _expected_bytes(linear_bytes: int) -> dict[str, int]:
    hidden, inter, vocab = 128, 512, 320
    head_dim, kv = 32, 1 * 32
    layers = 2
    # (out, in, bias) of every linear of one layer
    linears = [(hidden, hidden, True), (kv, hidden, True), (kv, hidden, True), (hidden, hidden, False)]
    linears += [(inter, hidden, False), (inter, hidden, False), (hidden, inter, False)]
    assert head_dim * 4 == hidden
    bf16 = 2
    other = (vocab * hidden + (2 * layers + 1) * hidden) * bf16  # tied embeddings, norms
    biases = layers * sum(out for out, _, bias in linears if bias) * bf16
    weights = layers * sum(out * inp for out, inp, _ in linears)
    channel_scales = layers * sum(out for out, _, _ in linears) * 4  # float32 [out, 1]
    group_scales = layers * sum(out * inp // 32 for out, inp, _ in linears) * 4
    return {
        "bf16": other + biases + weights * bf16,
        "fp8": other + biases + weights * linear_bytes + channel_scales,
        "int8_channel": other + biases + weights * linear_bytes + channel_scales,
        "int8_group32": other + biases + weights * linear_bytes + group_scales,
    }


def test_resident_weight_bytes_are_about_half(tmp_path: Path) -> None:
    source = save_random_model(tmp_path / "base", BYTES_CONFIG)
    fp8 = write_compressed_checkpoint(source, tmp_path / "fp8", "FP8_DYNAMIC")
    int8 = write_compressed_checkpoint(source, tmp_path / "int8", "W8A16")
    int8_group = write_compressed_checkpoint(source, tmp_path / "int8g", "W8A16", group_size=32)
    expected = _expected_bytes(linear_bytes=1)
    measured = {
        "bf16": Engine.from_pretrained(source, num_blocks=4, dtype="bfloat16").weight_bytes,
        "fp8": Engine.from_pretrained(fp8, num_blocks=4, dtype="bfloat16").weight_bytes,
        "int8_channel": Engine.from_pretrained(int8, num_blocks=4, dtype="bfloat16").weight_bytes,
        "int8_group32": Engine.from_pretrained(int8_group, num_blocks=4, dtype="bfloat16").weight_bytes,
    }
    assert measured == expected
    assert (
        Engine.from_pretrained(source, num_blocks=4, dtype="bfloat16", quantization="fp8").weight_bytes
        == expected["fp8"]
    )
    # 1 byte per weight instead of 2; group scales add 4 bytes per 32 weights
    for name, bound in (("fp8", 0.56), ("int8_channel", 0.56), ("int8_group32", 0.6)):
        assert 0.5 < measured[name] / measured["bf16"] < bound, name


# --- refusals ------------------------------------------------------------------------------


def _edit_quantization(path: Path, group: dict) -> None:
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"].update(group)
    (path / "config.json").write_text(json.dumps(config))


def _copy(source: Path, target: Path) -> Path:
    target.mkdir()
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


INT8_DYNAMIC = {"num_bits": 8, "type": "int", "strategy": "token", "symmetric": True, "dynamic": True}
INT4_GROUP = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": True, "dynamic": False}
SUPPORTED = (
    "supported: FP8 W8A8 (float8 weights per channel, dynamic per-token float8 activations, format "
    "float-quantized) and INT8 W8A16 (int8 weights per channel or group, format pack-quantized or int-quantized)"
)


@pytest.mark.parametrize(
    "scheme, group, described",
    [
        (
            "int8_w8a16_channel",
            {"input_activations": INT8_DYNAMIC},
            "weights int8 channel symmetric, input activations int8 token symmetric dynamic, format int-quantized",
        ),
        ("int8_w8a16_group32", {"weights": INT4_GROUP}, "weights int4 group(128) symmetric, input activations none"),
    ],
)
def test_unsupported_scheme_is_named(
    scheme: str, group: dict, described: str, checkpoints: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    path = _copy(checkpoints["qwen2", scheme], tmp_path / "m")
    _edit_quantization(path, group)
    storage = _format(path)
    if "format" not in described:
        described += f", format {storage}"
    message = f"unsupported compressed-tensors group 'group_0' ({described}); {SUPPORTED}"
    with pytest.raises(ValueError) as raised:
        Engine.from_pretrained(path, num_blocks=4)
    assert str(raised.value) == message


def test_quantization_option_on_a_quantized_checkpoint(checkpoints: dict[tuple[str, str], Path]) -> None:
    with pytest.raises(ValueError) as raised:
        Engine.from_pretrained(checkpoints["llama", "fp8_w8a8"], num_blocks=4, quantization="fp8")
    assert str(raised.value) == (
        "--quantization fp8 quantizes an unquantized checkpoint at load time, but this checkpoint is "
        "already quantized (compressed-tensors); leave --quantization unset"
    )


def test_unknown_quantization_option() -> None:
    from tandem.engine.config import EngineConfig

    with pytest.raises(ValueError) as raised:
        EngineConfig(quantization="int4")
    assert str(raised.value) == "quantization must be one of ('fp8',) or None, got 'int4'"


# --- the flag everywhere -------------------------------------------------------------------


def test_flag_on_every_command() -> None:
    from tandem.cli import build_parser
    from tandem.cli.cluster import up_config
    from tandem.cli.serve import worker_config
    from tandem.common.options import from_args
    from tandem.engine.config import EngineConfig

    parser = build_parser()
    for role in ("prefill", "decode"):
        args = parser.parse_args([role, "--model", "/m", "--quantization", "fp8"])
        assert worker_config(args).engine.quantization == "fp8"
    assert up_config(parser.parse_args(["up", "--quantization", "fp8"])).worker.engine.quantization == "fp8"
    generate = parser.parse_args(["generate", "--quantization", "fp8", "hello"])
    assert from_args(EngineConfig, generate).quantization == "fp8"
    assert from_args(EngineConfig, parser.parse_args(["generate", "hello"])).quantization is None


def test_chart_passes_quantization_to_both_pools() -> None:
    import helm_python as helm

    from tests.unit.test_helm_chart import CHART_DIR, NAMESPACE, RELEASE, container, flag, render

    with helm.Chart.load(CHART_DIR) as chart:
        for role in ("prefill", "decode"):
            assert (
                flag(container(render(chart, {"model": {"quantization": "fp8"}}), role)["args"], "--quantization")
                == "fp8"
            )
            assert "--quantization" not in container(render(chart), role)["args"]
        with pytest.raises(Exception, match="quantization"):
            chart.render({"model": {"quantization": "int4"}}, name=RELEASE, namespace=NAMESPACE)
