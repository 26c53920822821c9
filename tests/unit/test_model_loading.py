"""A broken model directory gives an error that names the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tandem.engine import Engine


@pytest.fixture
def model_copy(tmp_path: Path, tiny_model_dir: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(tiny_model_dir, target)
    return target


def _edit_config(path: Path, **changes: object) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_missing_config(model_copy: Path) -> None:
    (model_copy / "config.json").unlink()
    with pytest.raises(ValueError, match="has no config.json"):
        Engine.from_pretrained(model_copy, num_blocks=4)


def test_invalid_config_json(model_copy: Path) -> None:
    (model_copy / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        Engine.from_pretrained(model_copy, num_blocks=4)


def test_missing_weights(model_copy: Path) -> None:
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"has no \*.safetensors weights file"):
        Engine.from_pretrained(model_copy, num_blocks=4)


def test_unsupported_architecture(model_copy: Path) -> None:
    _edit_config(model_copy, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ValueError, match="unsupported architecture \\['GPT2LMHeadModel'\\]"):
        Engine.from_pretrained(model_copy, num_blocks=4)


def test_unsupported_rope_type(model_copy: Path) -> None:
    _edit_config(model_copy, rope_scaling={"rope_type": "longrope", "factor": 2.0})
    with pytest.raises(ValueError, match="unsupported rope type 'longrope'"):
        Engine.from_pretrained(model_copy, num_blocks=4)


def test_missing_required_field(model_copy: Path) -> None:
    config = json.loads((model_copy / "config.json").read_text())
    del config["hidden_size"]
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing required field 'hidden_size'"):
        Engine.from_pretrained(model_copy, num_blocks=4)


def test_wrong_tensor_shape(model_copy: Path) -> None:
    weights = load_file(model_copy / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj.weight"
    weights[name] = weights[name][:-1].contiguous()
    save_file(weights, model_copy / "model.safetensors")
    with pytest.raises(ValueError, match=f"tensor '{name}' has shape \\(31, 64\\), expected \\(32, 64\\)"):
        Engine.from_pretrained(model_copy, num_blocks=4)


def test_missing_tensor(model_copy: Path) -> None:
    weights = load_file(model_copy / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, model_copy / "model.safetensors")
    with pytest.raises(ValueError, match="weights missing 1 tensors: model.norm.weight"):
        Engine.from_pretrained(model_copy, num_blocks=4)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no config.json"):
        Engine.from_pretrained(tmp_path / "nowhere", num_blocks=4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"block_size": 12}, "block_size must be a power of two"),
        ({"num_blocks": 0}, "num_blocks must be a positive integer"),
        ({"attention_backend": "flash"}, "attention_backend must be one of"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"device": "tpu"}, "device must be"),
    ],
)
def test_bad_engine_options(tiny_model_dir: Path, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Engine.from_pretrained(tiny_model_dir, **options)
