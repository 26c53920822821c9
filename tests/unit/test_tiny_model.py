"""The generated tiny Llama: deterministic bytes, a real HF checkpoint, atomic cache install."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tandem.engine.tiny_model import (
    TINY_LLAMA_CONFIG,
    TINY_MODEL_NAME,
    TINY_VOCAB_SIZE,
    ensure_tiny_model,
    write_tiny_llama,
    write_tokenizer,
)

FILES = (
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def _file_bytes(path: Path) -> dict[str, bytes]:
    return {file.name: file.read_bytes() for file in sorted(path.iterdir())}


def test_writes_exactly_the_checkpoint_files(tiny_dir: Path) -> None:
    assert sorted(file.name for file in tiny_dir.iterdir()) == list(FILES)


def test_same_seed_gives_identical_bytes(tiny_dir: Path, tmp_path: Path) -> None:
    again = write_tiny_llama(tmp_path / "again", seed=0)
    assert _file_bytes(again) == _file_bytes(tiny_dir)


def test_other_seed_changes_only_the_weights(tiny_dir: Path, tmp_path: Path) -> None:
    other = _file_bytes(write_tiny_llama(tmp_path / "other", seed=1))
    base = _file_bytes(tiny_dir)
    assert [name for name in FILES if other[name] != base[name]] == ["model.safetensors"]


def test_tokenizer_training_is_deterministic(tmp_path: Path) -> None:
    assert write_tokenizer(tmp_path / "a") == write_tokenizer(tmp_path / "b") == TINY_VOCAB_SIZE
    assert _file_bytes(tmp_path / "a") == _file_bytes(tmp_path / "b")


def test_config_is_the_constant_with_the_tokenizer_vocab(tiny_dir: Path) -> None:
    config = json.loads((tiny_dir / "config.json").read_text())
    expected = {key: list(value) if isinstance(value, tuple) else value for key, value in TINY_LLAMA_CONFIG.items()}
    assert config == expected
    assert config["vocab_size"] == TINY_VOCAB_SIZE == 512
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 16)
    tokenizer = json.loads((tiny_dir / "tokenizer.json").read_text())
    assert len(tokenizer["model"]["vocab"]) == TINY_VOCAB_SIZE
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 0, "eos_token_id": [1, 3], "pad_token_id": 1}


def test_weights_have_hf_llama_names_shapes_and_init(tiny_dir: Path) -> None:
    weights = load_file(str(tiny_dir / "model.safetensors"))
    expected = {"model.embed_tokens.weight": (512, 64), "model.norm.weight": (64,), "lm_head.weight": (512, 64)}
    for i in range(2):
        expected |= {
            f"model.layers.{i}.input_layernorm.weight": (64,),
            f"model.layers.{i}.post_attention_layernorm.weight": (64,),
            f"model.layers.{i}.self_attn.q_proj.weight": (64, 64),
            f"model.layers.{i}.self_attn.k_proj.weight": (32, 64),
            f"model.layers.{i}.self_attn.v_proj.weight": (32, 64),
            f"model.layers.{i}.self_attn.o_proj.weight": (64, 64),
            f"model.layers.{i}.mlp.gate_proj.weight": (128, 64),
            f"model.layers.{i}.mlp.up_proj.weight": (128, 64),
            f"model.layers.{i}.mlp.down_proj.weight": (64, 128),
        }
    assert {name: tuple(tensor.shape) for name, tensor in weights.items()} == expected
    assert all(tensor.dtype == torch.float32 for tensor in weights.values())
    assert abs(weights["model.embed_tokens.weight"].std().item() - 1.0) < 0.05
    assert abs(weights["model.layers.0.mlp.down_proj.weight"].std().item() - 128**-0.5) < 0.01
    assert abs(weights["model.norm.weight"].mean().item() - 1.0) < 0.05


def test_transformers_loads_and_generates_deterministically(tiny_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_dir), local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_dir), local_files_only=True)
    assert model.dtype == torch.float32
    assert model.config.num_key_value_heads == 2 and model.config.vocab_size == len(tokenizer) == 512
    inputs = tokenizer("Once upon a time", return_tensors="pt")
    assert inputs.input_ids[0, 0].item() == 0  # <|bos|> from the tokenizer.json post-processor

    def generate() -> bytes:
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
        return output.numpy().tobytes()

    first = generate()
    assert first == generate()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_dir), local_files_only=True)
    with torch.no_grad():
        output = reloaded.generate(**inputs, max_new_tokens=24, do_sample=False)
    assert output.numpy().tobytes() == first


def test_ensure_tiny_model_builds_once_under_cache_dir(tmp_path: Path) -> None:
    path = ensure_tiny_model(tmp_path)
    assert path == tmp_path / "models" / TINY_MODEL_NAME
    assert sorted(file.name for file in path.iterdir()) == list(FILES)
    assert path.stat().st_mode & 0o777 == 0o755  # readable by other users sharing the cache
    assert (path / "model.safetensors").stat().st_mode & 0o777 == 0o644
    mtime_ns = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime_ns
    assert [entry.name for entry in (tmp_path / "models").iterdir()] == [TINY_MODEL_NAME]


def test_ensure_tiny_model_defaults_to_tandem_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    assert ensure_tiny_model() == tmp_path / "cache" / "models" / TINY_MODEL_NAME


def test_concurrent_ensure_calls_agree_and_leave_no_temp_dirs(tmp_path: Path, tiny_dir: Path) -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        paths = list(pool.map(lambda _: ensure_tiny_model(tmp_path), range(4)))
    assert set(paths) == {tmp_path / "models" / TINY_MODEL_NAME}
    assert [entry.name for entry in (tmp_path / "models").iterdir()] == [TINY_MODEL_NAME]
    assert _file_bytes(paths[0]) == _file_bytes(tiny_dir)
