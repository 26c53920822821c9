"""Chat templates of a local Hugging Face model directory, rendered as transformers renders them.

Results equal transformers 5's `apply_chat_template(tokenize=False)` (tests/unit/test_tokenizer.py
checks it), because both use the same sandboxed Jinja setup (transformers'
utils/chat_template_utils.py):

    1. Where templates come from: chat_template.jinja and chat_templates/*.jinja take priority
       over tokenizer_config.json["chat_template"] (a string, or a list of {"name", "template"}).
    2. Which one renders: with `tools` and a "tool_use" template, that one; otherwise "default".
    3. What a template sees: the messages (None values dropped, reasoning fields aliased),
       `tools`, `add_generation_prompt`, `documents`, the tokenizer's named special tokens, and
       the caller's extra kwargs. Every input is rebuilt from plain JSON types first, so a
       template cannot reach object methods.

`load_chat_templates` runs once per model, in `Tokenizer.from_pretrained`; `render_chat` per chat
request, through `Tokenizer.apply_chat_template`. Compiled templates are immutable and safe to
share between threads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


@dataclass(frozen=True)
class ChatTemplate:
    """One compiled chat template; `source` is the Jinja text, `origin` the file it came from."""

    source: str
    origin: str
    compiled: jinja2.Template


def render_chat(
    templates: Mapping[str, ChatTemplate],
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None,
    special_tokens: Mapping[str, str],
    kwargs: Mapping[str, Any],
) -> str:
    """Render `messages` with the template `_pick_template` chooses; see
    `Tokenizer.apply_chat_template` for the contract. Raises ValueError for a model without a
    chat template, bad inputs, and template errors, including the template's own
    `raise_exception(...)`."""
    template = _pick_template(templates, tools)
    if not messages:
        raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
    if tools is not None and not all(isinstance(tool, Mapping) for tool in tools):
        raise ValueError("tools must be JSON schemas (dicts)")
    chat = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise ValueError(f"Chat messages should be dicts, but got {message!r}.")
        # Drop None values (OpenAI's content=None, tool_calls=None), as transformers does.
        plain = _plain({key: value for key, value in message.items() if value is not None})
        reasoning = next((plain[key] for key in _REASONING_FIELDS if plain.get(key) is not None), None)
        if reasoning is not None:
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        chat.append(plain)
    variables = {"documents": None, **dict(special_tokens), **_plain(kwargs)}
    try:
        return template.compiled.render(
            messages=chat, tools=_plain(tools), add_generation_prompt=add_generation_prompt, **variables
        )
    except jinja2.TemplateError as error:
        raise ValueError(f"chat template from {template.origin} failed: {error}") from error


def _pick_template(templates: Mapping[str, ChatTemplate], tools: list[dict[str, Any]] | None) -> ChatTemplate:
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    if templates:
        raise ValueError(f"This model has chat templates {sorted(templates)} but none named 'default'.")
    raise ValueError(
        "This model has no chat template (no chat_template.jinja and no chat_template in tokenizer_config.json)."
    )


def load_chat_templates(root: Path, config: Mapping[str, Any]) -> dict[str, ChatTemplate]:
    """Template files win over tokenizer_config.json, as in transformers' _from_pretrained."""
    sources: dict[str, tuple[str, Path]] = {}
    if (root / "chat_template.jinja").is_file():
        sources["default"] = (_read_text(root / "chat_template.jinja"), root / "chat_template.jinja")
    if (root / "chat_templates").is_dir():
        for file in sorted((root / "chat_templates").glob("*.jinja")):
            sources[file.name.removesuffix(".jinja")] = (_read_text(file), file)
    if not sources:
        origin = root / "tokenizer_config.json"
        value = config.get("chat_template")
        if isinstance(value, str):
            sources["default"] = (value, origin)
        elif isinstance(value, list):
            for entry in value:
                if not (
                    isinstance(entry, dict)
                    and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)
                ):
                    raise ValueError(f"{origin}: chat_template list entries need string 'name' and 'template'")
                sources[entry["name"]] = (entry["template"], origin)
        elif value is not None:
            raise ValueError(f"{origin}: chat_template must be a string or a list, got {type(value).__name__}")
    environment = _chat_environment()
    templates = {}
    for name, (source, origin) in sources.items():
        try:
            templates[name] = ChatTemplate(source, str(origin), environment.from_string(source))
        except jinja2.TemplateError as error:
            raise ValueError(f"{origin}: chat template {name!r} does not compile: {error}") from error
    return templates


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read: {error}") from error


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body (transformers uses it for masks)."""

    # jinja2 declares `tags` on Extension as an instance attribute, so a ClassVar would not type-check.
    tags = {"generation"}  # noqa: RUF012

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes, as transformers' sandbox does."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"Chat templates cannot set underscore attributes ({name!r}).")


def _chat_environment() -> ImmutableSandboxedEnvironment:
    """The Jinja environment of transformers' chat templates (utils/chat_template_utils.py)."""
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.globals["dict"] = _TemplateDict()
    environment.globals["namespace"] = _TemplateNamespace
    return environment


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Unlike Jinja's own tojson, no HTML escaping, and keyword options as in transformers.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise ValueError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict` for templates: construction and fromkeys only, no access to the type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types so templates cannot reach object methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums, numpy scalars) carry extra methods
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    return f"<{type(value).__name__}>"
