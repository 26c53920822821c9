"""Tokenizer of a local Hugging Face model directory, without transformers.

The gateway tokenizes prompts, renders chat messages and detokenizes streamed tokens with this
class; the engine reads `eos_token_ids` to stop sequences. Results equal transformers 5's
`AutoTokenizer` for tokenizers saved as `PreTrainedTokenizerFast` / `TokenizersBackend`
(tests/unit/test_tokenizer.py checks it), because both run the same `tokenizers` pipeline from
tokenizer.json:

    1. tokenizer.json is the whole pipeline, post-processor included. transformers 5 drops
       `add_bos_token` / `add_eos_token` from tokenizer_config.json whenever tokenizer.json
       exists, so BOS/EOS are added exactly as the tokenizer.json post-processor says.
    2. Named special tokens from tokenizer_config.json (or legacy special_tokens_map.json)
       that tokenizer.json does not list as added tokens are added as special tokens, as
       transformers does, so their text is never split.
    3. Chat templates are loaded and rendered by `tandem.engine.chat_template`;
       `apply_chat_template` passes them the named special tokens.

Model classes that transformers 5 rebuilds from vocab and merges (e.g. `LlamaTokenizer` for
SentencePiece-style checkpoints) are matched only insofar as tokenizer.json matches them.
A `Tokenizer` is immutable after `from_pretrained` and safe to share between threads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer

from tandem.engine.chat_template import ChatTemplate, load_chat_templates, render_chat

# The named special tokens transformers passes to chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass(frozen=True, eq=False)
class Tokenizer:
    """Encode, decode and chat rendering for one model. Build it with `from_pretrained`.

    `backend` is owned by this object and never reconfigured after construction.
    `special_tokens` maps names such as "bos_token" to token text; chat templates see them.
    """

    backend: BackendTokenizer
    special_tokens: Mapping[str, str]
    eos_token_ids: frozenset[int]
    chat_templates: Mapping[str, ChatTemplate]
    model_max_length: int | None
    clean_up_tokenization_spaces: bool

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer of the model directory `path`; called once per model at startup.

        Raises ValueError naming the file for a missing tokenizer.json, unreadable or invalid
        JSON, wrongly typed fields, or a chat template that does not compile.
        """
        root = Path(path)
        backend = _load_backend(root / "tokenizer.json")
        config = _read_json(root / "tokenizer_config.json", required=False) or {}
        special_tokens, added = _special_tokens(root, config, backend)
        missing = [token for token in added if token.content not in _added_token_texts(backend)]
        if missing:
            backend.add_special_tokens(missing)
        backend.no_truncation()
        backend.no_padding()
        eos_ids = set()
        if "eos_token" in special_tokens:
            eos_ids.add(_require_id(backend, special_tokens["eos_token"], root / "tokenizer_config.json"))
        for name in ("generation_config.json", "config.json"):
            file_config = _read_json(root / name, required=False) or {}
            eos_ids.update(_eos_ids(file_config.get("eos_token_id"), root / name))
        max_length = config.get("model_max_length")
        return cls(
            backend=backend,
            special_tokens=MappingProxyType(special_tokens),
            eos_token_ids=frozenset(eos_ids),
            chat_templates=MappingProxyType(load_chat_templates(root, config)),
            model_max_length=int(max_length) if isinstance(max_length, (int, float)) else None,
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        )

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (transformers' `len(tokenizer)`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def chat_template(self) -> str | None:
        """The default chat template's source, or None if the model has none."""
        template = self.chat_templates.get("default")
        return template.source if template is not None else None

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; BOS/EOS only as tokenizer.json's post-processor adds them."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Callers that stream must decode a growing window, not single ids."""
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        # transformers skips this WordPiece-era cleanup for BPE: it would corrupt the text.
        if self.clean_up_tokenization_spaces and type(self.backend.model).__name__ != "BPE":
            text = _clean_up_tokenization(text)
        return text

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render `messages` to the prompt text, as transformers' apply_chat_template(tokenize=False).

        Called by the gateway per chat request. Tokenize the result with
        `encode(text, add_special_tokens=False)`: templates write their own BOS. Extra
        `kwargs` (e.g. `enable_thinking`, `documents`) reach the template and override the
        special tokens. Raises ValueError for a model without a chat template, bad inputs,
        and template errors, including the template's own `raise_exception(...)`.
        """
        return render_chat(self.chat_templates, messages, add_generation_prompt, tools, self.special_tokens, kwargs)

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return self.backend.token_to_id(token) if token is not None else None


def _read_json(path: Path, required: bool) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise ValueError(f"{path}: file not found")
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read JSON: {error}") from error
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _load_backend(path: Path) -> BackendTokenizer:
    _read_json(path, required=True)  # a clear "file not found" / "invalid JSON" first
    try:
        return BackendTokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises plain Exception for bad content
        raise ValueError(f"{path}: not a valid tokenizers file: {error}") from error


def _special_tokens(
    root: Path, config: Mapping[str, Any], backend: BackendTokenizer
) -> tuple[dict[str, str], list[AddedToken]]:
    """Named special tokens (text by name) and the AddedTokens transformers would ensure exist."""
    sources: dict[str, Any] = dict(config)
    if "added_tokens_decoder" not in config:
        # Legacy layout: transformers lets special_tokens_map.json override tokenizer_config.json.
        sources.update(_read_json(root / "special_tokens_map.json", required=False) or {})
    extra = sources.get("extra_special_tokens", sources.get("additional_special_tokens"))
    # Model-specific "*_token" keys count too (transformers: only when given as plain strings).
    named_values = [
        (key, value)
        for key, value in sources.items()
        if key in _NAMED_SPECIAL_TOKENS or (key.endswith("_token") and isinstance(value, str))
    ]
    named_values += list(extra.items()) if isinstance(extra, dict) else []
    padding = backend.padding  # transformers takes a default pad token from tokenizer.json's padding
    if padding is not None and sources.get("pad_token") is None and padding.get("pad_token"):
        named_values.append(("pad_token", padding["pad_token"]))
    named: dict[str, str] = {}
    added: list[AddedToken] = []
    for name, value in named_values:
        token = _added_token(value, root / "tokenizer_config.json", name)
        if token is not None:
            named[name] = token.content
            added.append(token)
    for value in extra if isinstance(extra, list) else []:
        token = _added_token(value, root / "tokenizer_config.json", "extra_special_tokens")
        if token is not None:
            added.append(token)
    return named, added


def _added_token(value: Any, origin: Path, name: str) -> AddedToken | None:
    if value is None:
        return None
    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        flags = {key: bool(value[key]) for key in ("single_word", "lstrip", "rstrip", "normalized") if key in value}
        return AddedToken(value["content"], special=True, **flags)
    raise ValueError(f"{origin}: {name} must be a string or an object with 'content', got {value!r}")


def _added_token_texts(backend: BackendTokenizer) -> set[str]:
    return {token.content for token in backend.get_added_tokens_decoder().values()}


def _require_id(backend: BackendTokenizer, token: str, origin: Path) -> int:
    token_id = backend.token_to_id(token)
    if token_id is None:
        raise ValueError(f"{origin}: token {token!r} is not in the vocabulary")
    return token_id


def _eos_ids(value: Any, origin: Path) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(item, int) and not isinstance(item, bool) and item >= 0 for item in values):
        raise ValueError(f"{origin}: eos_token_id must be a non-negative int or a list of them, got {value!r}")
    return list(values)


def _clean_up_tokenization(text: str) -> str:
    pairs: tuple[tuple[str, str], ...] = (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
    )
    pairs += ((" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
    for before, after in pairs:
        text = text.replace(before, after)
    return text
