"""Sampling controls, echo and prompt logprobs through a real cluster (2 prefill, 2 decode
workers): disaggregated (the prefill worker samples the first token, a decode worker the
rest) and with the decode worker prefilling locally. Each token equals the reference formula
applied to transformers' logits of the same prefix; echo with max_tokens 0 equals
transformers' log-softmax of the prompt logits, with and without a prefix-cache hit."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from tandem.common.request import SamplingParams
from tandem.engine.tokenizer import Tokenizer
from tandem.launcher.processes import ChildProcess
from tests.conftest import random_prompts
from tests.e2e.cluster import GATEWAY_STOP_TIMEOUT_S, Cluster
from tests.unit.oracle import hf_prompt_logits
from tests.unit.test_logits_processors import CONTROLS, reference

VOCAB = 512


@pytest.fixture(scope="module", params=["disaggregated", "local"])
def base_url(request: pytest.FixtureRequest, cluster: Cluster) -> Iterator[str]:
    threshold = "0" if request.param == "disaggregated" else "100000"
    g: ChildProcess = cluster.gateway("--local-prefill-max-tokens", threshold)
    try:
        yield g.address
    finally:
        g.stop(GATEWAY_STOP_TIMEOUT_S)


def _post(base_url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        base_url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
        return json.loads(response.read())


@pytest.mark.parametrize("name", ["repetition", "frequency", "presence", "logit_bias", "min_tokens", "bad_words"])
def test_each_control_equals_its_formula(name: str, base_url: str, tiny_model_dir: Path, cluster: Cluster) -> None:
    p = CONTROLS[name]
    (prompt,) = random_prompts([19], VOCAB, seed=11)
    body: dict[str, Any] = {
        "prompt": prompt,
        "max_tokens": 5,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
        "presence_penalty": p.presence_penalty,
        "frequency_penalty": p.frequency_penalty,
        "repetition_penalty": p.repetition_penalty,
        "logit_bias": {str(t): b for t, b in p.logit_bias},
        "min_tokens": p.min_tokens,
        "stop_token_ids": list(p.stop_token_ids),
    }
    if p.bad_words_token_ids:
        body["bad_words"] = ["hello"]
        tok = Tokenizer.from_pretrained(tiny_model_dir)
        words = (
            tuple(tok.encode("hello", add_special_tokens=False)),
            tuple(tok.encode(" hello", add_special_tokens=False)),
        )
        p = SamplingParams(bad_words_token_ids=words)
    tokens = _post(base_url, "/v1/completions", body)["choices"][0]["token_ids"]
    output: list[int] = []
    for token in tokens:
        logits = hf_prompt_logits(tiny_model_dir, prompt + output)[-1]
        expected = reference(logits.tolist(), p, prompt, output)
        assert token == max(range(VOCAB), key=lambda t: expected[t]), (name, output)
        output.append(token)
    assert len(tokens) == 5
    cluster.assert_drained()


def _check_echo(choice: Any, prompt: list[int], tiny_model_dir: Path, tok: Tokenizer) -> None:
    ref = torch.log_softmax(hf_prompt_logits(tiny_model_dir, prompt), dim=-1)
    lp = choice.logprobs
    assert lp.tokens == [tok.decode([t], skip_special_tokens=False) for t in prompt]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(prompt)):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i - 1, prompt[i]]), abs=1e-4)
        best = int(ref[i - 1].argmax())
        assert lp.top_logprobs[i][tok.decode([best], skip_special_tokens=False)] == pytest.approx(
            float(ref[i - 1, best]), abs=1e-4
        )
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(prompt))]
    assert choice.finish_reason == "length"


def test_echo_max_tokens_0_equals_transformers(base_url: str, tiny_model_dir: Path, cluster: Cluster) -> None:
    """lm-evaluation-harness's loglikelihood request, cold and after the same prompt ran."""
    tok = Tokenizer.from_pretrained(tiny_model_dir)
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    text = "The capital of France is Paris, and the capital of Spain is"
    prompt = tok.encode(text)
    for warm in (False, True):
        if warm:
            client.completions.create(model=tiny_model_dir.name, prompt=text, max_tokens=2, temperature=0)
        resp = client.completions.create(model=tiny_model_dir.name, prompt=text, echo=True, logprobs=1, max_tokens=0)
        (choice,) = resp.choices
        assert choice.text == text
        _check_echo(choice, prompt, tiny_model_dir, tok)
        assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (len(prompt), 0)
    raw = _post(base_url, "/v1/completions", {"prompt": prompt, "echo": True, "max_tokens": 0, "prompt_logprobs": 2})
    entries = raw["choices"][0]["prompt_logprobs"]
    ref = torch.log_softmax(hf_prompt_logits(tiny_model_dir, prompt), dim=-1)
    assert entries[0] is None and len(entries) == len(prompt)
    for i in range(1, len(prompt)):
        first_key, first = next(iter(entries[i].items()))
        assert first_key == str(prompt[i])
        assert first["logprob"] == pytest.approx(float(ref[i - 1, prompt[i]]), abs=1e-4)
        assert first["rank"] == int((ref[i - 1] > ref[i - 1, prompt[i]]).sum()) + 1
        top = ref[i - 1].topk(2).indices.tolist()
        assert [entries[i][str(t)]["rank"] for t in top] == [1, 2]
    assert raw["choices"][0]["text"] == tok.decode(prompt, skip_special_tokens=False)
    cluster.assert_drained()


def test_echo_with_generation_streams_the_prompt_first(base_url: str, tiny_model_dir: Path, cluster: Cluster) -> None:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    text = "Once upon a time"
    full = client.completions.create(model=tiny_model_dir.name, prompt=text, echo=True, max_tokens=4, temperature=0)
    plain = client.completions.create(model=tiny_model_dir.name, prompt=text, max_tokens=4, temperature=0)
    assert full.choices[0].text == text + plain.choices[0].text
    chunks = list(
        client.completions.create(
            model=tiny_model_dir.name, prompt=text, echo=True, max_tokens=4, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].text.startswith(text)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    chat = _post(
        base_url,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "prompt_logprobs": 0, "temperature": 0},
    )
    assert chat["prompt_logprobs"][0] is None and all(len(e) == 1 for e in chat["prompt_logprobs"][1:])
    cluster.assert_drained()
