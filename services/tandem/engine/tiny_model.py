"""The project's default model: a tiny Llama generated deterministically on this machine.

Nothing is ever downloaded (DESIGN.md section 7). The tiny model is a real Hugging Face
checkpoint, so transformers can load the same directory and serve as the exactness oracle:

    models/tiny-llama-v1/
        config.json              LlamaConfig (GQA: 4 query heads, 2 KV heads, head_dim 16)
        generation_config.json   bos / eos / pad ids for `generate`
        model.safetensors        float32 weights with the HF Llama tensor names
        tokenizer.json           byte-level BPE trained on a fixed built-in corpus
        tokenizer_config.json    PreTrainedTokenizerFast, bos/eos tokens
        chat_template.jinja      ChatML-style template

Who calls what:
    1. The CLI, the engine's model loader and test fixtures call `ensure_tiny_model()` to get
       the directory; it builds the model once per cache directory, atomically.
    2. `write_tokenizer()` and `write_tiny_llama()` are the pure builders behind it; they write
       the same bytes on every run with the same library versions (no clock, no randomness
       other than the seeded torch.Generator).

Bump `TINY_MODEL_NAME` whenever the bytes this module writes change, so stale caches are
never reused.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

TINY_MODEL_NAME = "tiny-llama-v1"
TINY_VOCAB_SIZE = 512
# Special tokens, in id order: BpeTrainer gives them ids 0..3 ahead of the 256 byte tokens.
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN)
BOS_TOKEN_ID = 0
EOS_TOKEN_ID = 1
IM_END_TOKEN_ID = 3
MODEL_MAX_LENGTH = 2048

# Read-only view: the config is a constant, never patched (STYLE.md: no mutable globals).
# Use `dict(TINY_LLAMA_CONFIG)` where a real dict is needed (json.dumps, LlamaConfig(**...)).
TINY_LLAMA_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        "architectures": ("LlamaForCausalLM",),
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": TINY_VOCAB_SIZE,
        "max_position_embeddings": MODEL_MAX_LENGTH,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "use_cache": True,
        # transformers >= 5 reads "dtype"; 4.x reads "torch_dtype".
        "dtype": "float32",
        "torch_dtype": "float32",
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
    }
)

# ChatML with a leading BOS: chat prompts are tokenized with add_special_tokens=False (as
# transformers and vLLM do), so the template itself supplies the BOS that plain prompts get
# from the post-processor. Content may be a string or a list of OpenAI-style text parts.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Fixed training text. Changing one character changes the merges: bump TINY_MODEL_NAME.
_CORPUS = (
    "Tandem is a serving cluster for large language models. A gateway receives each request, "
    "a scheduler picks a prefill worker and a decode worker, and the prompt's key and value "
    "blocks travel from one to the other. The prefill worker is bound by compute; the decode "
    "worker is bound by memory bandwidth. Splitting the two lets operators scale them apart.",
    "The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore, and "
    "the shells she sells are surely sea shells. How much wood would a woodchuck chuck if a "
    "woodchuck could chuck wood? Peter Piper picked a peck of pickled peppers.",
    "Once upon a time, in a small town near the mountains, there lived an old clockmaker. "
    "Every morning he opened his shop at eight o'clock, wound every clock on the wall, and "
    "listened to them tick together. Children came after school to ask him questions: why "
    "does the moon change its shape, where do rivers begin, and how many stars are there?",
    "Hello! How are you today? I'm fine, thank you. What would you like to talk about? "
    "Let's write a short poem, solve a math problem (2 + 2 = 4, 3 * 7 = 21, 10 / 4 = 2.5), "
    "or plan a trip. The weather is sunny, with a high of 25 degrees and a light wind.",
    "def add(a: int, b: int) -> int:\n    return a + b\n\nfor i in range(10):\n    print(i)\n"
    '{"role": "user", "content": "Summarize the text in one sentence."}\n',
    "Caf\u00e9 cr\u00e8me, na\u00efve r\u00e9sum\u00e9, stra\u00dfe, \u00fcber, se\u00f1or. "
    "Tokens are the units a model reads; a byte-level tokenizer can read any text at all.",
)


def write_tokenizer(path: Path) -> int:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into `path`.

    Called by `write_tiny_llama`. Trains a byte-level BPE on `_CORPUS` (deterministic: the
    trainer breaks ties by pair order, not hash order) and returns its vocab size, which is
    always TINY_VOCAB_SIZE (a RuntimeError otherwise, since config.json depends on it).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(_CORPUS), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A:0",
        pair=f"{BOS_TOKEN} $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, BOS_TOKEN_ID)],
    )
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
    if vocab_size != TINY_VOCAB_SIZE or ids != [BOS_TOKEN_ID, EOS_TOKEN_ID, 2, IM_END_TOKEN_ID]:
        raise RuntimeError(
            f"tiny tokenizer training produced vocab size {vocab_size} and special ids {ids}; "
            f"expected {TINY_VOCAB_SIZE} and [0, 1, 2, 3] (corpus too small?)"
        )
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
    }
    _write_json(path / "tokenizer_config.json", tokenizer_config)
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return vocab_size


def write_tiny_llama(path: Path, seed: int = 0, overrides: Mapping[str, Any] | None = None) -> Path:
    """Write the whole tiny checkpoint (config, generation config, weights, tokenizer) to `path`.

    Called by `ensure_tiny_model`, by tests that need a second, differently seeded model, and by
    the benchmark set, which passes `overrides` of the size keys (hidden_size, num_hidden_layers,
    ...) for a model whose prefill costs more than the serving overheads around it.
    Weights come from one torch.Generator seeded with `seed`, drawn in a fixed order:
    embeddings ~ N(0, 1), every linear weight [out, in] ~ N(0, std=1/sqrt(in)), every RMSNorm
    weight = 1 + N(0, std=0.1). The same seed gives the same bytes. Returns `path`.
    """
    import torch
    from safetensors.torch import save_file

    vocab_size = write_tokenizer(path)
    config = {key: list(value) if isinstance(value, tuple) else value for key, value in TINY_LLAMA_CONFIG.items()}
    unknown = set(overrides or ()) - set(config)
    if unknown:
        raise ValueError(f"unknown model config keys {sorted(unknown)}")
    config.update(overrides or {})
    config["vocab_size"] = vocab_size
    _write_json(path / "config.json", config)
    _write_json(
        path / "generation_config.json",
        {
            "bos_token_id": BOS_TOKEN_ID,
            # A chat turn ends with <|im_end|>; a plain completion with <|eos|>.
            "eos_token_id": [EOS_TOKEN_ID, IM_END_TOKEN_ID],
            "pad_token_id": EOS_TOKEN_ID,
        },
    )

    generator = torch.Generator(device="cpu").manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in llama_weight_shapes(config):
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * torch.randn(shape, generator=generator, dtype=torch.float32)
        elif name == "model.embed_tokens.weight":
            value = torch.randn(shape, generator=generator, dtype=torch.float32)
        else:
            in_features = shape[-1]  # [out_features, in_features]
            value = torch.randn(shape, generator=generator, dtype=torch.float32) / math.sqrt(in_features)
        tensors[name] = value.contiguous()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "model.safetensors").chmod(0o644)  # safetensors creates it 0600; caches may be shared
    return path


def default_cache_dir() -> Path:
    """$TANDEM_CACHE_DIR, or ~/.cache/tandem. Read here only, for `ensure_tiny_model`."""
    configured = os.environ.get("TANDEM_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "tandem"


def ensure_tiny_model(cache_dir: Path | None = None) -> Path:
    """Return `<cache_dir>/models/tiny-llama-v1`, generating it first if it is missing.

    Safe across concurrent processes: each builds into its own temporary sibling directory and
    renames it into place; renaming onto an existing non-empty directory fails, so the first
    writer wins and the others discard their copy. A present directory is therefore complete.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "models" / TINY_MODEL_NAME
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{TINY_MODEL_NAME}.", dir=target.parent))
    try:
        write_tiny_llama(staging)
        staging.chmod(0o755)  # mkdtemp makes it 0700; the cache may be shared read-only
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def llama_weight_shapes(config: Mapping[str, Any]) -> list[tuple[str, tuple[int, int] | tuple[int]]]:
    """HF Llama tensor names and shapes ([out_features, in_features] for linears), in draw order."""
    hidden = int(config["hidden_size"])
    head_dim = int(config["head_dim"])
    q_size = int(config["num_attention_heads"]) * head_dim
    kv_size = int(config["num_key_value_heads"]) * head_dim
    inter = int(config["intermediate_size"])
    vocab = int(config["vocab_size"])
    shapes: list[tuple[str, tuple[int, int] | tuple[int]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(int(config["num_hidden_layers"])):
        prefix = f"model.layers.{i}"
        shapes += [
            (f"{prefix}.input_layernorm.weight", (hidden,)),
            (f"{prefix}.self_attn.q_proj.weight", (q_size, hidden)),
            (f"{prefix}.self_attn.k_proj.weight", (kv_size, hidden)),
            (f"{prefix}.self_attn.v_proj.weight", (kv_size, hidden)),
            (f"{prefix}.self_attn.o_proj.weight", (hidden, q_size)),
            (f"{prefix}.post_attention_layernorm.weight", (hidden,)),
            (f"{prefix}.mlp.gate_proj.weight", (inter, hidden)),
            (f"{prefix}.mlp.up_proj.weight", (inter, hidden)),
            (f"{prefix}.mlp.down_proj.weight", (hidden, inter)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def _write_json(path: Path, value: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(dict(value), indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
