"""Request preparation: a raw body in, a request ready to charge, trace and run out.

Who calls what, per request (DESIGN.md section 2, step 1):
    `prepare(raw, chat, served)` (completions and chat) does, in this order, each step raising
    `OpenAIError` with OpenAI's status, message and param:
    1. `parse_body` decodes and validates the body into a frozen model (`bodies.py`): 400 for
       bad UTF-8, bad JSON, NaN/Infinity, wrong types, out-of-range values, unsupported features.
    2. The `model` field must name the served model (404).
    3. `prompt_inputs` (completions) or `chat_prompt` (chat) tokenizes the prompt(s).
    4. `resolve_max_tokens` checks each prompt against the context and picks its budget.
    5. `to_sampling` builds the engine's `SamplingParams` of each choice, `stop_strings` the
       strings the gateway cuts the text at. Chat's `tools` and `tool_choice` become a
       `ToolChoice` (tools/choice.py): the tools the template sees, and for "required" or a
       named function the structured output that enforces it; otherwise the body's own
       structured output (structured.py), if any.
    `tokenize_body` and `detokenize_body` do steps 1 and 2 for /tokenize and /detokenize and
    return the answer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, TypeVar

from pydantic import ValidationError

from tandem.common.request import SamplingParams, StructuredOutput
from tandem.engine.tokenizer import Tokenizer
from tandem.gateway.bodies import (
    INT64_MIN,
    Body,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from tandem.gateway.controls import sampling_controls
from tandem.gateway.errors import OpenAIError, bad_request, context_length_exceeded, model_not_found
from tandem.gateway.generation import ChoiceSpec
from tandem.gateway.structured import requested
from tandem.gateway.tools.choice import ToolChoice

__all__ = [
    "PreparedRequest",
    "ServedModel",
    "chat_prompt",
    "check_token_ids",
    "detokenize_body",
    "logprob_count",
    "parse_body",
    "prepare",
    "prompt_inputs",
    "resolve_max_tokens",
    "stop_strings",
    "to_sampling",
    "tokenize_body",
    "tokenize_request",
]

BodyT = TypeVar("BodyT", bound=Body)


@dataclass(frozen=True, eq=False)
class ServedModel:
    """What preparation checks a request against; built once by `GatewayState`.

    `name` is what clients pass as `model`, `max_model_len` the prompt + completion limit,
    `max_n` the cap on choices per request.
    """

    name: str
    tokenizer: Tokenizer
    vocab_size: int
    max_model_len: int
    max_n: int
    tool_call_parser: str | None = None  # the gateway's --tool-call-parser


@dataclass(frozen=True)
class PreparedRequest:
    """A validated completions or chat request. `prompts` holds each prompt's token ids;
    `choices` one `ChoiceSpec` per choice (prompt p, choice i: index p * n + i, as vLLM);
    `logprob_count` the top logprobs per token (None: logprobs not requested); `tool_choice`
    how the output relates to the chat's tools (None: no tools)."""

    body: CompletionRequest | ChatCompletionRequest
    prompts: tuple[tuple[int, ...], ...]
    choices: tuple[ChoiceSpec, ...]
    tool_choice: ToolChoice | None = None

    @property
    def skip_special_tokens(self) -> bool:
        """The body's, unless the tool-call parser reads a special token (mistral's [TOOL_CALLS])."""
        keep = self.tool_choice is not None and self.tool_choice.keeps_special_tokens
        return self.body.skip_special_tokens and not keep

    @property
    def chat(self) -> bool:
        return isinstance(self.body, ChatCompletionRequest)

    @property
    def stop(self) -> tuple[str, ...]:
        return stop_strings(self.body)

    @property
    def logprob_count(self) -> int | None:
        return logprob_count(self.body)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def requested_priority(self) -> int | None:
        """The body's `priority` (vLLM's: lower is more important); None: the API key's default."""
        return self.body.priority

    @property
    def num_charged_tokens(self) -> int:
        """What the token rate limit charges: prompt + max_tokens of every choice."""
        return sum(len(c.prompt_token_ids) + c.sampling.max_tokens for c in self.choices)


def prepare(raw: bytes, chat: bool, served: ServedModel) -> PreparedRequest:
    """Steps 1 to 5 of the module docstring for /v1/chat/completions (`chat`) or /v1/completions."""
    body: CompletionRequest | ChatCompletionRequest
    kind: Literal["prompt", "messages"]
    tool_choice: ToolChoice | None = None
    if chat:
        body = parse_body(raw, ChatCompletionRequest, served.max_n)
        _check_model(body.model, served)
        tool_choice = ToolChoice.of(body, served.tool_call_parser)
        tools = None if tool_choice is None else tool_choice.template_tools()
        prompts = [chat_prompt(body, served.tokenizer, tools)]
        requested, kind = body.requested_max_tokens, "messages"
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    else:
        body = parse_body(raw, CompletionRequest, served.max_n)
        _check_model(body.model, served)
        prompts = prompt_inputs(body, served.tokenizer, served.vocab_size)
        requested, kind, param = body.max_tokens, "prompt", "max_tokens"
    structured = structured_output(body, tool_choice)
    min_max_tokens = 0 if isinstance(body, CompletionRequest) and body.echo else 1  # echo: the prompt alone
    prompt_ids = tuple(tuple(p) for p in prompts)  # one copy, shared by the prompt's choices
    choices: list[ChoiceSpec] = []
    for p, prompt in enumerate(prompt_ids):
        max_tokens = resolve_max_tokens(requested, len(prompt), served.max_model_len, kind, param, min_max_tokens)
        controls = sampling_controls(body, served.tokenizer, served.vocab_size, max_tokens)
        for i in range(body.n):
            choices.append(ChoiceSpec(p * body.n + i, prompt, to_sampling(body, max_tokens, i, controls, structured)))
    return PreparedRequest(body, prompt_ids, tuple(choices), tool_choice)


def structured_output(
    body: CompletionRequest | ChatCompletionRequest, tool_choice: ToolChoice | None
) -> StructuredOutput | None:
    """The output constraint: the tool choice's ("required", named) or the body's, never both."""
    own = requested(body)
    forced = None if tool_choice is None else tool_choice.structured_output()
    if own is not None and forced is not None:
        raise bad_request(
            'tool_choice "required" or a named function constrains the output itself; '
            "it cannot be combined with response_format or structured outputs.",
            "tool_choice",
        )
    return forced or own


def tokenize_body(raw: bytes, served: ServedModel) -> list[int]:
    """The token ids /tokenize answers for the body `raw`."""
    req = parse_body(raw, TokenizeRequest, served.max_n)
    _check_model(req.model, served)
    return tokenize_request(req, served.tokenizer)


def detokenize_body(raw: bytes, served: ServedModel) -> str:
    """The text /detokenize answers for the body `raw` (special tokens kept)."""
    req = parse_body(raw, DetokenizeRequest, served.max_n)
    _check_model(req.model, served)
    check_token_ids(req.tokens, served.vocab_size, "tokens")
    return served.tokenizer.decode(req.tokens, skip_special_tokens=False)


def parse_body(raw: bytes, model_cls: type[BodyT], max_n: int) -> BodyT:
    """Decode, parse and validate a request body; OpenAIError 400 naming the problem otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise bad_request(f"The request body is not valid UTF-8: {error.reason} at byte {error.start}.") from None
    constants: list[str] = []  # NaN / Infinity / -Infinity: not JSON, though Python's json reads them

    def constant(name: str) -> float:
        constants.append(name)
        return float(name)

    try:
        value = json.loads(text, parse_constant=constant)
    except json.JSONDecodeError as error:
        raise bad_request(f"The request body is not valid JSON: {error}.") from None
    except RecursionError:
        raise bad_request("The request body is not valid JSON: it is nested too deeply.") from None
    except ValueError:  # an integer over Python's digit limit
        raise bad_request("The request body is not valid JSON: a number has too many digits.") from None
    if not isinstance(value, dict):
        raise bad_request(f"The request body must be a JSON object, got {_json_type(value)}.")
    try:
        # Validation first, so that a NaN in a known field is reported with its name.
        request = model_cls.model_validate(value, context={"max_n": max_n})
    except ValidationError as error:
        raise _validation_error(error) from None
    if constants:
        raise bad_request(f"The request body is not valid JSON: {constants[0]} is not a valid JSON number.")
    return request


def resolve_max_tokens(
    requested: int | None,
    num_prompt_tokens: int,
    max_model_len: int,
    kind: Literal["prompt", "messages"],
    param: str = "max_tokens",
    minimum: int = 1,
) -> int:
    """The completion budget: `requested`, or all the context the prompt leaves when None.
    `minimum` is 0 for completions with echo (max_tokens 0: the prompt alone)."""
    if num_prompt_tokens >= max_model_len:
        raise context_length_exceeded(
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{num_prompt_tokens} input tokens. Please reduce the length of the input {kind}.",
            kind,
        )
    if requested is None:
        return max_model_len - num_prompt_tokens
    if requested < minimum:
        raise bad_request(f"{param} must be at least {minimum}, got {requested}.", param)
    if num_prompt_tokens + requested > max_model_len:
        raise context_length_exceeded(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the {kind}, {requested} in the "
            f"completion). Please reduce the length of the {kind} or completion.",
            param,
        )
    return requested


def prompt_inputs(req: CompletionRequest, tokenizer: Tokenizer, vocab_size: int) -> list[list[int]]:
    """Token ids of each prompt: strings encoded with the tokenizer's special tokens (BOS)."""
    prompt = req.prompt
    if isinstance(prompt, str):
        prompts = [tokenizer.encode(prompt)]
    elif isinstance(prompt[0], str):  # the body validated that lists are not empty and not mixed
        prompts = [tokenizer.encode(p) for p in prompt]
    elif isinstance(prompt[0], int):
        prompts = [list(prompt)]
    else:
        prompts = [list(p) for p in prompt]
    for ids in prompts:
        check_token_ids(ids, vocab_size, "prompt")
    return prompts


def chat_prompt(
    req: ChatCompletionRequest | TokenizeRequest, tokenizer: Tokenizer, tools: list[dict[str, Any]] | None = None
) -> list[int]:
    """Render the chat template (with `tools`, OpenAI's shape, as transformers' `tools=`) and
    tokenize it without special tokens (the template has BOS)."""
    messages = [m.for_template() for m in req.messages or ()]
    try:
        text = tokenizer.apply_chat_template(
            messages, req.add_generation_prompt, tools, **(req.chat_template_kwargs or {})
        )
    except (ValueError, TypeError) as error:
        raise bad_request(f"The messages could not be rendered with the chat template: {error}", "messages") from None
    add_special = isinstance(req, TokenizeRequest) and bool(req.add_special_tokens)
    ids = tokenizer.encode(text, add_special_tokens=add_special)
    if not ids:
        raise bad_request("The prompt is empty after applying the chat template.", "messages")
    return ids


def tokenize_request(req: TokenizeRequest, tokenizer: Tokenizer) -> list[int]:
    """Token ids for /tokenize: the prompt's (with special tokens unless told not to) or the chat's."""
    if req.prompt is not None:
        return tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
    return chat_prompt(req, tokenizer)


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str) -> None:
    """400 unless every id is in [0, vocab_size) and there is at least one; the error names
    the first id out of range."""
    if not ids:
        raise bad_request(f"{param} must not be empty.", param)
    if min(ids) >= 0 and max(ids) < vocab_size:  # two C-level passes; the search below only on failure
        return
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise bad_request(f"Token id {bad} is out of vocabulary (vocab size {vocab_size}).", param)


def to_sampling(
    req: CompletionRequest | ChatCompletionRequest,
    max_tokens: int,
    choice_index: int,
    controls: Mapping[str, Any] = MappingProxyType({}),
    structured_output: StructuredOutput | None = None,
) -> SamplingParams:
    """Engine parameters of choice `choice_index` (0..n-1): seed + index, as vLLM's parallel
    sampling. `controls`: the sampling controls' fields (`controls.sampling_controls`);
    `structured_output`: the output constraint (`structured_output`)."""
    seed = None if req.seed is None else (req.seed + choice_index - INT64_MIN) % 2**64 + INT64_MIN
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_k=req.top_k if req.top_k is not None and req.top_k > 0 else None,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=seed,
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
        logprobs=logprob_count(req),
        structured_output=structured_output,
        **controls,
    )


def stop_strings(req: CompletionRequest | ChatCompletionRequest) -> tuple[str, ...]:
    if req.stop is None:
        return ()
    return (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)


def logprob_count(req: CompletionRequest | ChatCompletionRequest) -> int | None:
    """Top logprobs per token the response reports; None: logprobs not requested."""
    if isinstance(req, ChatCompletionRequest):
        return (req.top_logprobs or 0) if req.logprobs else None
    return req.logprobs


def _check_model(model: str | None, served: ServedModel) -> None:
    if model is not None and model != served.name:
        raise model_not_found(model)


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def _validation_error(error: ValidationError) -> OpenAIError:
    """The first pydantic error as OpenAI words it: param is the field path, e.g. messages[0].role."""
    first = error.errors(include_url=False)[0]
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"]).lstrip(".")
    if first["type"] == "missing":
        return bad_request(f"Missing required parameter: '{path}'.", path)
    message = first["msg"].removeprefix("Value error, ").rstrip(".")
    kind = "type" if first["type"].endswith("_type") else "value"
    return bad_request(f"Invalid {kind} for '{path}': {message}.", path or None)
