"""The official `openai` client against the gateway of a real cluster (2 prefill, 2 decode
workers, embedded Redis): the text equals the single-process engine's, on every path."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tandem.engine import Engine, SamplingParams
from tandem.engine.tokenizer import Tokenizer
from tandem.launcher.processes import ChildProcess
from tests.e2e.cluster import Cluster

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours, please."}]


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> Engine:
    return Engine.from_pretrained(tiny_model_dir, num_blocks=256)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def client(gateway: ChildProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.address + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI, tiny_model_dir: Path) -> str:
    models = client.models.list().data
    assert [m.id for m in models] == [tiny_model_dir.name]
    return models[0].id


def _expected(
    reference: Engine, tokenizer: Tokenizer, prompt_ids: list[int], sampling: SamplingParams
) -> tuple[list[int], str]:
    out = reference.generate([prompt_ids], sampling)[0]
    return list(out.token_ids), tokenizer.decode(list(out.token_ids), skip_special_tokens=True)


def _chat_ids(tokenizer: Tokenizer) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template(CHAT, add_generation_prompt=True), add_special_tokens=False)


def test_completion_matches_engine(client, model, reference, tokenizer, cluster: Cluster) -> None:
    prompt = "The quick brown fox jumps over the lazy dog, and then"
    ids, text = _expected(
        reference, tokenizer, tokenizer.encode(prompt), SamplingParams(max_tokens=24, temperature=0.0)
    )
    resp = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0)
    assert resp.choices[0].text == text
    assert resp.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert resp.usage.completion_tokens == len(ids)
    assert resp.choices[0].finish_reason == ("length" if len(ids) == 24 else "stop")
    streamed = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == resp.choices[0].finish_reason
    cluster.assert_drained()


def test_chat_matches_engine(client, model, reference, tokenizer, cluster: Cluster) -> None:
    prompt_ids = _chat_ids(tokenizer)
    ids, text = _expected(reference, tokenizer, prompt_ids, SamplingParams(max_tokens=20, temperature=0.0))
    resp = client.chat.completions.create(model=model, messages=CHAT, max_tokens=20, temperature=0)
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == text
    assert resp.usage.prompt_tokens == len(prompt_ids)
    assert resp.usage.completion_tokens == len(ids)
    stream = client.chat.completions.create(model=model, messages=CHAT, max_tokens=20, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    cluster.assert_drained()


def test_n2_seeded_with_usage(client, model, reference, tokenizer, cluster: Cluster) -> None:
    prompt_ids = _chat_ids(tokenizer)
    expected = [
        _expected(
            reference,
            tokenizer,
            prompt_ids,
            SamplingParams(max_tokens=12, temperature=1.0, seed=7 + i, ignore_eos=True),
        )
        for i in range(2)
    ]
    stream = client.chat.completions.create(
        model=model,
        messages=CHAT,
        max_tokens=12,
        temperature=1.0,
        seed=7,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    texts = {0: "", 1: ""}
    for c in chunks[:-1]:
        assert c.usage is None
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == {0: expected[0][1], 1: expected[1][1]}
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == len(prompt_ids)
    assert chunks[-1].usage.completion_tokens == 24
    resp = client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=12, temperature=1.0, seed=7, n=2, extra_body={"ignore_eos": True}
    )
    assert [c.message.content for c in resp.choices] == [expected[0][1], expected[1][1]]
    assert resp.usage.completion_tokens == 24
    cluster.assert_drained()


def test_prompt_forms_and_token_ids(client, model, reference, tokenizer, cluster: Cluster) -> None:
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    extra = {"ignore_eos": True, "return_token_ids": True}
    texts = ["first prompt", "third one, longer than the rest"]
    id_lists = [list(range(40, 75)), [9] * 3]
    for form, prompts in (
        (texts, [tokenizer.encode(t) for t in texts]),
        (id_lists, id_lists),
        (id_lists[0], id_lists[:1]),
    ):
        expected = [_expected(reference, tokenizer, p, greedy) for p in prompts]
        resp = client.completions.create(model=model, prompt=form, max_tokens=8, temperature=0, extra_body=extra)
        assert [c.index for c in resp.choices] == list(range(len(prompts)))
        for choice, (ids, text), prompt in zip(resp.choices, expected, prompts):
            assert choice.text == text
            assert choice.model_extra["token_ids"] == ids
            assert choice.model_extra["prompt_token_ids"] == prompt
        assert resp.usage.prompt_tokens == sum(len(p) for p in prompts)
        assert resp.usage.completion_tokens == 8 * len(prompts)
    cluster.assert_drained()


def test_stop_string_cuts_and_frees(client, model, reference, tokenizer, cluster: Cluster) -> None:
    prompt = "The quick brown fox jumps over the lazy dog, and then"
    _, text = _expected(
        reference, tokenizer, tokenizer.encode(prompt), SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    )
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop and stop in text
    resp = client.completions.create(
        model=model, prompt=prompt, max_tokens=40, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    )
    assert resp.choices[0].text == text[: text.index(stop)]
    assert resp.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=40,
        temperature=0,
        stop=[stop],
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text[: text.index(stop)]
    cluster.assert_drained()


def test_tokenize_and_detokenize(gateway: ChildProcess, tokenizer: Tokenizer, model: str) -> None:
    import json

    from tests.e2e.test_gateway_errors import post

    status, _, got = post(gateway.address, "/tokenize", json.dumps({"model": model, "prompt": "Hello there"}).encode())
    assert status == 200
    assert got == {
        "count": len(tokenizer.encode("Hello there")),
        "max_model_len": 2048,
        "tokens": tokenizer.encode("Hello there"),
    }
    status, _, got = post(
        gateway.address, "/detokenize", json.dumps({"model": model, "tokens": got["tokens"]}).encode()
    )
    assert status == 200
    assert got == {"prompt": tokenizer.decode(tokenizer.encode("Hello there"), skip_special_tokens=False)}
