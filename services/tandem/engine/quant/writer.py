"""Write compressed-tensors checkpoints with the compressed-tensors library itself.

Tests and the benchmark need genuine quantized checkpoints without llm-compressor (which pins
an older transformers) and without a download. `write_compressed_checkpoint` does what
llm-compressor's one-shot does for schemes that need no calibration data:

1. load the full-precision checkpoint with transformers;
2. `apply_quantization_config` attaches the preset scheme (`FP8_DYNAMIC` or `W8A16`) to every
   `Linear` but `lm_head`, and creates each layer's `weight_scale`;
3. the weight scales are computed with the library's `calculate_qparams` from each output
   channel's (or group's) min and max: the static min-max observer's result for weights;
4. `ModelCompressor.compress_model` quantizes and packs the weights in memory,
   `save_pretrained` writes them, `update_config` writes `quantization_config`.
Activation scales of `FP8_DYNAMIC` are dynamic (computed per token at run time): nothing to
calibrate. Tokenizer and generation files are copied as they are.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

PRESETS = ("FP8_DYNAMIC", "W8A16")


def write_compressed_checkpoint(
    source: Path, target: Path, preset: str, group_size: int | None = None, storage: str | None = None
) -> Path:
    """Quantize the checkpoint in `source` with `preset` and write it to `target`; returns `target`.

    `group_size` (W8A16 only): None for one scale per output channel, else the number of
    input columns per scale (FP8_DYNAMIC is always per channel). `storage` forces the
    compressed-tensors format ("int-quantized" stores plain int8); None lets the library
    choose as llm-compressor does ("float-quantized" for FP8, "pack-quantized" for INT8).
    """
    from compressed_tensors.compressors import ModelCompressor  # type: ignore[import-untyped]
    from compressed_tensors.quantization import (  # type: ignore[import-untyped]
        QuantizationConfig,
        QuantizationStrategy,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams  # type: ignore[import-untyped]
    from transformers import AutoModelForCausalLM

    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    if group_size is not None and preset != "W8A16":
        raise ValueError(f"group_size applies to W8A16 only, not {preset}")
    model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True)
    scheme = preset_name_to_scheme(preset, ["Linear"])
    if preset == "W8A16":
        assert scheme.weights is not None
        scheme.weights.strategy = QuantizationStrategy.GROUP if group_size else QuantizationStrategy.CHANNEL
        scheme.weights.group_size = group_size
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    with torch.no_grad():
        for module in model.modules():
            args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
            if args is None:
                continue
            weight: torch.Tensor = module.get_parameter("weight")  # [out, in]
            if group_size:
                weight = weight.unflatten(-1, (-1, group_size))  # [out, groups, group_size]
            low, high = weight.amin(-1), weight.amax(-1)
            if not group_size:
                low, high = low.unsqueeze(-1), high.unsqueeze(-1)  # [out, 1]
            scale, zero_point = calculate_qparams(low, high, args)
            module.get_parameter("weight_scale").copy_(scale)
            module.get_parameter("weight_zero_point").copy_(zero_point)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=storage)
    compressor.compress_model(model)
    model.save_pretrained(target)
    compressor.update_config(str(target))
    for file in Path(source).iterdir():
        if file.is_file() and not (target / file.name).exists():
            shutil.copy(file, target / file.name)
    return target
