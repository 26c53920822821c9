"""The cluster step's load: one streaming completion per prompt, all at once, through the
gateway with the official `openai` client (`AsyncOpenAI`).

Every request is `/v1/completions` with the prompt as token ids, greedy (temperature 0), a
fixed `max_tokens` with `ignore_eos` (so every stream is exactly that long), and
`return_token_ids` (vLLM's extension: every chunk carries its token ids, so the tokens are
compared with the engine's as ids, not through text) and `stream_options.include_usage`.
Timings follow `tandem.loadtest.record` (as `vllm bench serve` takes them): one arrival per
chunk that carries tokens, on one monotonic clock that starts with the load. A stream whose
usage disagrees with the tokens it carried counts as a stream error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import openai

from tandem.loadtest.metrics import Summary, summarize
from tandem.loadtest.record import ErrorKind, RequestRecord


@dataclass(frozen=True)
class Stream:
    """One request of the load: its timings and the token ids the gateway streamed."""

    record: RequestRecord
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class LoadResult:
    streams: tuple[Stream, ...]  # in prompt order
    duration_s: float  # from the first request sent to the last stream's end

    def summary(self) -> Summary:
        return summarize([s.record for s in self.streams], max(self.duration_s, 1e-9))


def run_load(
    endpoint: str, model: str, prompts: Sequence[Sequence[int]], max_tokens: int, timeout_s: float
) -> LoadResult:
    """Send every prompt at once and wait for every stream, each bounded by `timeout_s`."""
    return asyncio.run(_run(endpoint, model, prompts, max_tokens, timeout_s))


async def _run(
    endpoint: str, model: str, prompts: Sequence[Sequence[int]], max_tokens: int, timeout_s: float
) -> LoadResult:
    client = openai.AsyncOpenAI(base_url=f"{endpoint}/v1", api_key="unused", max_retries=0, timeout=timeout_s)
    async with client:
        origin_s = time.monotonic()
        streams = await asyncio.gather(
            *(
                _bounded(client, model, f"stream-{i}", prompt, max_tokens, origin_s, timeout_s)
                for i, prompt in enumerate(prompts)
            )
        )
        return LoadResult(tuple(streams), time.monotonic() - origin_s)


async def _bounded(
    client: openai.AsyncOpenAI,
    model: str,
    request_id: str,
    prompt: Sequence[int],
    max_tokens: int,
    origin_s: float,
    timeout_s: float,
) -> Stream:
    start_s = time.monotonic() - origin_s
    try:
        return await asyncio.wait_for(_stream(client, model, request_id, prompt, max_tokens, origin_s), timeout_s)
    except asyncio.TimeoutError:
        end_s = time.monotonic() - origin_s
        message = f"no end of stream within {timeout_s:.0f} s"
        record = RequestRecord(request_id, start_s, end_s, (), len(prompt), 0, ErrorKind.TIMEOUT, None, message)
        return Stream(record, ())


async def _stream(
    client: openai.AsyncOpenAI, model: str, request_id: str, prompt: Sequence[int], max_tokens: int, origin_s: float
) -> Stream:
    start_s = time.monotonic() - origin_s
    times_s: list[float] = []
    token_ids: list[int] = []
    usage_tokens: int | None = None
    error: ErrorKind | None = None
    status: int | None = None
    message = ""
    try:
        response = await client.completions.create(
            model=model,
            prompt=list(prompt),
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        status = 200
        async with response as chunks:
            async for chunk in chunks:
                for choice in chunk.choices:
                    new = (choice.model_extra or {}).get("token_ids") or []
                    if new:
                        times_s.append(time.monotonic() - origin_s)
                        token_ids.extend(int(t) for t in new)
                if chunk.usage is not None:
                    usage_tokens = chunk.usage.completion_tokens
    except openai.APIStatusError as exc:
        status, message = exc.status_code, str(exc)
        error = ErrorKind.HTTP_4XX if 400 <= exc.status_code < 500 else ErrorKind.HTTP_5XX
    except openai.APITimeoutError as exc:
        error, message = ErrorKind.TIMEOUT, str(exc)
    except openai.APIConnectionError as exc:
        error, message = ErrorKind.CONNECTION, str(exc)
    except openai.APIError as exc:  # an error event in the stream
        error, message = ErrorKind.STREAM_ERROR, str(exc)
    if error is None and usage_tokens != len(token_ids):
        error = ErrorKind.STREAM_ERROR
        message = f"usage says {usage_tokens} completion tokens; the stream carried {len(token_ids)}"
    end_s = time.monotonic() - origin_s
    record = RequestRecord(
        request_id, start_s, end_s, tuple(times_s), len(prompt), len(token_ids), error, status, message
    )
    return Stream(record, tuple(token_ids))
