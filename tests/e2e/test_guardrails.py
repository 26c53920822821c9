"""Guardrail hooks and session affinity through a real gateway on the session's cluster.

The tiny model's text is random, so the outputs that must be redacted or stopped are forced
with structured output (a `choice` grammar): the text arrives one token per delta, so an
e-mail address crosses many deltas. Greedy decoding makes the guarded and the plain gateway
generate the same tokens, which the tests compare exactly."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tandem.launcher.processes import ChildProcess
from tandem.scheduler.affinity import session_hash
from tests.e2e.cluster import GATEWAY_STOP_TIMEOUT_S, Cluster, gateway_metric

SPEC = 'regex_redactor:{"apply_to": ["input", "output"]},blocklist:{"words": ["forbidden", "secret"]}'
MAIL = "mail bob@example.com now"
SECRET = "a secret plan that goes on and on and on"


@pytest.fixture(scope="module")
def guarded(cluster: Cluster) -> Iterator[ChildProcess]:
    g = cluster.gateway("--guardrails", SPEC, "--guardrail-window-chars", "16")
    try:
        yield g
    finally:
        g.stop(GATEWAY_STOP_TIMEOUT_S)


def client(gateway: ChildProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.address + "/v1", api_key="unused", max_retries=0, timeout=120)


def forced(text: str) -> dict[str, Any]:
    return {"structured_outputs": {"choice": [text]}}


def actions(gateway: ChildProcess, guardrail: str, action: str) -> float:
    return gateway_metric(gateway, "tandem_guardrail_actions_total", guardrail=guardrail, action=action)


def stream_text(c: openai.OpenAI, model: str, **kwargs: Any) -> tuple[str, str | None, int]:
    """(text, finish_reason, completion_tokens) of a streamed completion."""
    text, finish, tokens = "", None, -1
    for chunk in c.completions.create(model=model, stream=True, stream_options={"include_usage": True}, **kwargs):
        for choice in chunk.choices:
            text += choice.text
            finish = choice.finish_reason or finish
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return text, finish, tokens


def test_an_email_is_redacted_in_stream_and_non_stream(guarded: ChildProcess, tiny_model_dir: Path) -> None:
    c = client(guarded)
    before = actions(guarded, "regex_redactor", "redact")
    args = {"prompt": "Say it", "max_tokens": 60, "temperature": 0, "extra_body": forced(MAIL)}
    assert stream_text(c, tiny_model_dir.name, **args)[:2] == ("mail [REDACTED] now", "stop")
    resp = c.completions.create(model=tiny_model_dir.name, **args)
    assert (resp.choices[0].text, resp.choices[0].finish_reason) == ("mail [REDACTED] now", "stop")
    assert actions(guarded, "regex_redactor", "redact") - before == 2  # one span per response


def test_a_blocked_word_stops_with_content_filter(
    guarded: ChildProcess, gateway: ChildProcess, tiny_model_dir: Path
) -> None:
    before = actions(guarded, "blocklist", "stop")
    args = {"prompt": "Say it", "max_tokens": 60, "temperature": 0, "extra_body": forced(SECRET)}
    text, finish, tokens = stream_text(client(guarded), tiny_model_dir.name, **args)
    assert (text, finish) == ("a ", "content_filter")
    resp = client(guarded).completions.create(model=tiny_model_dir.name, **args)
    assert (resp.choices[0].text, resp.choices[0].finish_reason) == ("a ", "content_filter")
    assert actions(guarded, "blocklist", "stop") - before == 2
    plain = client(gateway).completions.create(model=tiny_model_dir.name, **args)
    assert (plain.choices[0].text, plain.choices[0].finish_reason) == (SECRET, "stop")
    # usage counts the tokens generated until the stop: fewer than the whole text's. How many
    # depends on how the decode steps were grouped into deltas (the unit test pins one per delta).
    assert resp.usage is not None and plain.usage is not None
    assert (
        0 < tokens < plain.usage.completion_tokens and 0 < resp.usage.completion_tokens < plain.usage.completion_tokens
    )


def test_input_allow_rewrite_and_reject(guarded: ChildProcess, gateway: ChildProcess, tiny_model_dir: Path) -> None:
    model = tiny_model_dir.name
    allowed = {"prompt": "The weather today", "max_tokens": 6, "temperature": 0}
    g, p = client(guarded), client(gateway)
    rewrites, rejects = actions(guarded, "regex_redactor", "rewrite"), actions(guarded, "blocklist", "reject")
    assert g.completions.create(model=model, **allowed).choices[0].text == (
        p.completions.create(model=model, **allowed).choices[0].text
    )
    # rewrite: the prompt's address is redacted before it is tokenized (echo shows the prompt run)
    rewritten = g.completions.create(model=model, prompt=f"ask {MAIL}", echo=True, max_tokens=4, temperature=0)
    direct = p.completions.create(model=model, prompt="ask mail [REDACTED] now", echo=True, max_tokens=4, temperature=0)
    assert rewritten.choices[0].text.startswith("ask mail [REDACTED] now")
    assert rewritten.choices[0].text == direct.choices[0].text
    assert rewritten.usage is not None and direct.usage is not None
    assert rewritten.usage.prompt_tokens == direct.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as info:
        g.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Is this Forbidden?"}], max_tokens=4
        )
    assert info.value.status_code == 400
    assert info.value.body == {
        "message": "Request rejected by guardrail 'blocklist': the prompt contains a blocked word.",
        "type": "invalid_request_error",
        "param": None,
        "code": "content_policy_violation",
    }
    assert actions(guarded, "regex_redactor", "rewrite") - rewrites == 1
    assert actions(guarded, "blocklist", "reject") - rejects == 1


def test_a_session_header_records_the_decode_worker(
    guarded: ChildProcess, cluster: Cluster, tiny_model_dir: Path
) -> None:
    c = client(guarded)
    c.completions.create(
        model=tiny_model_dir.name, prompt="hello", max_tokens=2, extra_headers={"x-session-id": "conversation-9"}
    )
    redis = cluster.redis.client(socket_timeout=2.0)
    try:
        key = f"tandem:default:session:{session_hash('conversation-9')}"
        deadline = time.monotonic() + 5.0
        while redis.get(key) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert redis.get(key) in (b"decode-0", b"decode-1")
        assert 0 < redis.pttl(key) <= 600_000
    finally:
        redis.close()


def test_an_unknown_guardrail_refuses_the_start(cluster: Cluster, tiny_model_dir: Path) -> None:
    argv = [sys.executable, "-m", "tandem", "gateway", "--model", str(tiny_model_dir), "--redis", cluster.redis.url]
    done = subprocess.run([*argv, "--guardrails", "nope"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "unknown guardrail 'nope' in --guardrails; installed (tandem.guardrails entry points): " in done.stderr
    assert json.dumps({"event": "ready"})[:8] not in done.stdout
