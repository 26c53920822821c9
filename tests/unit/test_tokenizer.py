"""tandem.engine.tokenizer against transformers' AutoTokenizer on the same directories."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tandem.engine.tiny_model import CHAT_TEMPLATE, write_tiny_llama
from tandem.engine.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = (
    "",
    " ",
    "Hello world",
    "  leading and trailing spaces  ",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café, straße, señor, über",
    "日本語のテキストと中文",
    "emoji 🚀👍🏽 and a family 👨‍👩‍👧 (ZWJ)",
    "tabs\tand\nnewlines\r\n",
    "\x00\x01 control bytes \x7f",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<|bos|>special<|eos|> in text",
    "def f(x):\n    return x ** 2  # code",
    "é" * 40,
)

CONVERSATIONS: tuple[list[dict[str, Any]], ...] = (
    [{"role": "user", "content": "Hi!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Wie geht's? 🚀"},
        {"role": "assistant", "content": "Gut."},
        {"role": "user", "content": "日本語で?"},
    ],
    [{"role": "user", "content": [{"type": "text", "text": "part one "}, {"type": "text", "text": "part two"}]}],
)

# Exercises what transformers' environment provides: namespace, loop controls, tojson with
# indent and non-ASCII, raise_exception, {% generation %}, dropped None values, reasoning aliases,
# tools, documents=None and extra template kwargs.
RICH_TEMPLATE = """{%- set ns = namespace(system='') -%}
{%- for m in messages if m['role'] == 'system' %}{% set ns.system = m['content'] %}{% endfor -%}
{{ bos_token }}
{%- if tools %}<tools>
{{ tools | tojson(indent=2) }}
</tools>
{% endif %}
{%- if documents is not none %}DOCUMENTS PRESENT
{% endif %}
{%- if ns.system %}SYSTEM: {{ ns.system }}
{% endif %}
{%- for m in messages %}
  {%- if m['role'] == 'system' %}{% continue %}{% endif %}
  {%- if m['role'] not in ['user', 'assistant', 'tool'] %}
    {{- raise_exception('Unknown role: ' + m['role']) }}
  {%- endif %}
  {{- m['role'] | upper }}:
  {%- if m['reasoning_content'] is defined %} <think>{{ m['reasoning_content'] }}</think>{% endif %}
  {%- if m['role'] == 'assistant' %}{% generation %} {{ m['content'] }}{% endgeneration %}
  {%- else %} {{ m['content'] }}{% endif %}
  {%- if m['tool_calls'] is defined %} CALLS {{ m['tool_calls'] | tojson }}{% endif %}
  {%- if m['content'] is not defined %} (no content){% endif %}
{{ eos_token }}
{% endfor %}
{%- if add_generation_prompt %}ASSISTANT:{% if enable_thinking is defined and not enable_thinking %} /no_think{% endif %}
{%- endif %}"""  # noqa: E501

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Wetter für eine Stadt — 天気",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]

RICH_CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "Use tools when useful."},
    {"role": "user", "content": "Weather in Zürich?"},
    {
        "role": "assistant",
        "content": None,
        "reasoning": "I should call the tool.",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}],
    },
    {"role": "tool", "content": '{"temp_c": 21}'},
    {"role": "assistant", "content": "It is 21 °C."},
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tok") / "tiny")


@pytest.fixture(scope="module")
def ours(tiny_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def theirs(tiny_dir: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(tiny_dir), local_files_only=True)


def make_variant(base: Path, target: Path, config_updates: dict[str, Any], drop: tuple[str, ...] = ()) -> Path:
    """Copy the tiny tokenizer files into `target`, update tokenizer_config.json, drop files."""
    shutil.copytree(base, target)
    config = json.loads((target / "tokenizer_config.json").read_text())
    config.update(config_updates)
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    for name in drop:
        (target / name).unlink()
    return target


def load_both(path: Path) -> tuple[Tokenizer, Any]:
    return Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_transformers(ours: Tokenizer, theirs: Any, text: str) -> None:
    for add_special_tokens in (True, False):
        ids = ours.encode(text, add_special_tokens=add_special_tokens)
        assert ids == theirs.encode(text, add_special_tokens=add_special_tokens)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    # Byte-level BPE round-trips any text once special tokens are kept.
    assert ours.decode(ours.encode(text, add_special_tokens=False), skip_special_tokens=False) == text


def test_properties_of_the_tiny_tokenizer(ours: Tokenizer, theirs: Any) -> None:
    assert ours.vocab_size == len(theirs) == 512
    assert ours.bos_token_id == theirs.bos_token_id == 0
    assert ours.pad_token_id is None and theirs.pad_token_id is None
    # tokenizer_config's <|eos|> plus generation_config's [<|eos|>, <|im_end|>]
    assert ours.eos_token_ids == frozenset({1, 3})
    assert ours.chat_template == CHAT_TEMPLATE
    assert ours.model_max_length == 2048
    assert ours.encode("hi")[0] == 0 and ours.token_to_id("<|im_end|>") == 3 and ours.id_to_token(2) == "<|im_start|>"


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    ours: Tokenizer, theirs: Any, conversation: list[dict[str, Any]], add_generation_prompt: bool
) -> None:
    rendered = ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    expected = theirs.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert rendered == expected
    assert rendered.startswith("<|bos|><|im_start|>")
    assert rendered.endswith("<|im_start|>assistant\n") == add_generation_prompt
    assert ours.encode(rendered, add_special_tokens=False) == theirs.apply_chat_template(
        conversation, add_generation_prompt=add_generation_prompt, return_dict=False
    )


def test_template_from_tokenizer_config_when_no_jinja_file(tiny_dir: Path, tmp_path: Path) -> None:
    path = make_variant(tiny_dir, tmp_path / "cfg", {"chat_template": RICH_TEMPLATE}, drop=("chat_template.jinja",))
    ours, theirs = load_both(path)
    assert ours.chat_template == RICH_TEMPLATE
    for tools in (None, TOOLS):
        for add_generation_prompt in (True, False):
            kwargs: dict[str, Any] = {"add_generation_prompt": add_generation_prompt, "tools": tools}
            rendered = ours.apply_chat_template(RICH_CONVERSATION, **kwargs, enable_thinking=False)
            assert rendered == theirs.apply_chat_template(
                RICH_CONVERSATION, tokenize=False, enable_thinking=False, **kwargs
            )
    rendered = ours.apply_chat_template(RICH_CONVERSATION, tools=TOOLS)
    assert '"description": "Wetter für eine Stadt — 天気"' in rendered  # tojson keeps non-ASCII
    assert "<think>I should call the tool.</think>" in rendered and "(no content)" in rendered
    assert "DOCUMENTS PRESENT" not in rendered


def test_chat_template_jinja_file_wins_over_tokenizer_config(tiny_dir: Path, tmp_path: Path) -> None:
    path = make_variant(tiny_dir, tmp_path / "both", {"chat_template": "IGNORED"})
    ours, theirs = load_both(path)
    assert ours.chat_template == CHAT_TEMPLATE == theirs.chat_template


def test_list_form_chat_template_picks_default_or_tool_use(tiny_dir: Path, tmp_path: Path) -> None:
    templates = [
        {"name": "default", "template": "{% for m in messages %}D:{{ m['content'] }};{% endfor %}"},
        {
            "name": "tool_use",
            "template": "{{ tools | tojson }}{% for m in messages %}T:{{ m['content'] }};{% endfor %}",
        },
    ]
    path = make_variant(tiny_dir, tmp_path / "list", {"chat_template": templates}, drop=("chat_template.jinja",))
    ours, theirs = load_both(path)
    conversation = [{"role": "user", "content": "hi"}]
    assert ours.chat_template == templates[0]["template"]
    assert ours.apply_chat_template(conversation) == "D:hi;"
    assert ours.apply_chat_template(conversation) == theirs.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True
    )
    with_tools = ours.apply_chat_template(conversation, tools=TOOLS)
    assert with_tools.endswith("T:hi;")
    assert with_tools == theirs.apply_chat_template(
        conversation, tools=TOOLS, tokenize=False, add_generation_prompt=True
    )


def test_add_bos_token_in_config_is_ignored_like_transformers(tiny_dir: Path, tmp_path: Path) -> None:
    path = make_variant(tiny_dir, tmp_path / "nobos", {"add_bos_token": False, "add_eos_token": True})
    ours, theirs = load_both(path)
    assert ours.encode("hello") == theirs.encode("hello") and ours.encode("hello")[0] == 0


def test_dict_special_tokens_and_new_pad_token(tiny_dir: Path, tmp_path: Path) -> None:
    updates = {
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "normalized": False},
        "pad_token": "<|pad|>",
    }
    ours, theirs = load_both(make_variant(tiny_dir, tmp_path / "dicts", updates))
    assert ours.pad_token_id == theirs.pad_token_id == 512
    assert ours.vocab_size == len(theirs) == 513
    assert ours.eos_token_ids == frozenset({1, 3})
    text = "a<|pad|>b<|im_end|>"
    assert ours.encode(text) == theirs.encode(text)
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == theirs.decode(
        theirs.encode(text), skip_special_tokens=True
    )


def test_extra_and_model_specific_special_tokens_and_json_padding(tiny_dir: Path, tmp_path: Path) -> None:
    path = make_variant(
        tiny_dir,
        tmp_path / "extra",
        {"additional_special_tokens": ["<|tool|>"], "image_token": "<|image|>", "chat_template": "{{ image_token }}"},
        drop=("chat_template.jinja",),
    )
    backend = json.loads((path / "tokenizer.json").read_text())
    backend["padding"] = {
        "strategy": "BatchLongest",
        "direction": "Right",
        "pad_to_multiple_of": None,
        "pad_id": 1,
        "pad_type_id": 0,
        "pad_token": "<|eos|>",
    }
    backend["truncation"] = {"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0}
    (path / "tokenizer.json").write_text(json.dumps(backend))
    ours, theirs = load_both(path)
    text = "x<|tool|>y<|image|>z and a text longer than the truncation length"
    assert ours.encode(text) == theirs.encode(text)
    assert len(ours.encode(text)) > 3  # truncation and padding from tokenizer.json are not applied
    assert dict(ours.special_tokens) == theirs.special_tokens_map
    assert ours.pad_token_id == theirs.pad_token_id == 1
    assert ours.apply_chat_template([{"role": "user", "content": "a"}]) == "<|image|>"


def test_template_errors_are_value_errors(ours: Tokenizer) -> None:
    with pytest.raises(ValueError, match="empty conversation"):
        ours.apply_chat_template([])
    with pytest.raises(ValueError, match="dicts"):
        ours.apply_chat_template(["not a message"])  # type: ignore[list-item]


def test_raise_exception_in_template_is_a_value_error(tiny_dir: Path, tmp_path: Path) -> None:
    path = make_variant(tiny_dir, tmp_path / "raise", {"chat_template": RICH_TEMPLATE}, drop=("chat_template.jinja",))
    with pytest.raises(ValueError, match="Unknown role: robot"):
        Tokenizer.from_pretrained(path).apply_chat_template([{"role": "robot", "content": "beep"}])


def test_strftime_now_is_available(tiny_dir: Path, tmp_path: Path) -> None:
    template = "{{ strftime_now('%Y') | length }}"
    path = make_variant(tiny_dir, tmp_path / "time", {"chat_template": template}, drop=("chat_template.jinja",))
    assert Tokenizer.from_pretrained(path).apply_chat_template([{"role": "user", "content": "x"}]) == "4"


def test_no_chat_template_raises(tiny_dir: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_pretrained(make_variant(tiny_dir, tmp_path / "none", {}, drop=("chat_template.jinja",)))
    assert tokenizer.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_missing_tokenizer_json_names_the_file(tiny_dir: Path, tmp_path: Path) -> None:
    path = make_variant(tiny_dir, tmp_path / "missing", {}, drop=("tokenizer.json",))
    with pytest.raises(ValueError, match=r"tokenizer\.json: file not found"):
        Tokenizer.from_pretrained(path)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"])
def test_invalid_json_names_the_file(tiny_dir: Path, tmp_path: Path, name: str) -> None:
    path = make_variant(tiny_dir, tmp_path / "bad", {})
    (path / name).write_text("{not json")
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}: cannot read JSON"):
        Tokenizer.from_pretrained(path)


def test_invalid_fields_name_the_file(tiny_dir: Path, tmp_path: Path) -> None:
    path = make_variant(tiny_dir, tmp_path / "fields", {})
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": "two"}))
    with pytest.raises(ValueError, match=r"generation_config\.json: eos_token_id"):
        Tokenizer.from_pretrained(path)
    (path / "generation_config.json").write_text("{}")
    (path / "tokenizer.json").write_text(json.dumps({"model": "nonsense"}))
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a valid tokenizers file"):
        Tokenizer.from_pretrained(path)
    bad_template = make_variant(tiny_dir, tmp_path / "tmpl", {})
    (bad_template / "chat_template.jinja").write_text("{% for %}")
    with pytest.raises(ValueError, match=r"chat_template\.jinja: chat template 'default' does not compile"):
        Tokenizer.from_pretrained(bad_template)
