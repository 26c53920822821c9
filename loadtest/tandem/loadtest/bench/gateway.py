"""`tandem bench gateway`: streaming tokens/s through the gateway against calling the decode
worker directly, in one run, plus the scheduler's decision latency.

Setup: embedded Redis, one decode worker (one torch thread) and one gateway process, all on
loopback. The gateway is told to prefill locally, so both paths do the same work on the
worker: prefill a fresh random prompt, then decode `max_tokens` tokens (ignore_eos, greedy).
The worker is pinned to core 0, the gateway and this process to core 1 (as a deployment
gives the gateway cores of its own). Rounds alternate the two paths so that both see the same machine; each round sends
`concurrency` requests at once and measures tokens received / wall time until the last one
finishes. Direct = `grpc.aio` Decode streams from this process. Gateway = streaming
`/v1/completions` over HTTP/1.1 from this process, counting `token_ids` of each SSE chunk.
The goal is gateway / direct >= 0.85 at concurrency 32.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tandem.common import codec
from tandem.common.embedded_redis import EmbeddedRedis
from tandem.common.options import to_argv
from tandem.common.pb import tandem_pb2_grpc as pb_grpc
from tandem.common.plane_auth import TOKEN_ENV, ClusterToken, aio_channel
from tandem.common.request import SamplingParams
from tandem.common.workers import WorkerRole
from tandem.engine.config import EngineConfig, MiB
from tandem.gateway.admission import AdmissionConfig
from tandem.gateway.concurrency_limit import LimitConfig
from tandem.gateway.config import GatewayConfig
from tandem.launcher.processes import ChildProcess
from tandem.scheduler.config import SchedulerConfig
from tandem.worker.config import WorkerConfig

GOAL = 0.85
# The decode worker gets a core of its own; the gateway and this process's clients share the
# other, so the gateway's work never slows the worker and both paths pay the same client cost.
WORKER_CPU, CLIENT_CPU = 0, 1
# The throughput sections measure the serving path, not overload control: their gateways run
# without the adaptive concurrency limit, whose starting value (32) is these sections'
# concurrency, so that one slow first token would turn part of a round into 503s.
THROUGHPUT_ADMISSION = AdmissionConfig(limit=LimitConfig(adaptive=False))
READY_TIMEOUT_S = 120.0


def _prompts(seed: int, n: int, length: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 500) for _ in range(length)] for _ in range(n)]


async def stream_direct(
    address: str, prompts: list[list[int]], max_tokens: int, tag: str, token: ClusterToken | None
) -> float:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    async with aio_channel(address, token) as channel:
        stub = pb_grpc.WorkerStub(channel)

        async def one(i: int, prompt: list[int]) -> int:
            request = codec.Request(f"{tag}-{i}", tuple(prompt), sampling)
            n = 0
            async for delta in stub.Decode(codec.decode_request_to_proto(codec.DecodeRequest(request))):
                n += len(codec.decode_delta_from_proto(delta).token_ids)
            return n

        start = time.perf_counter()
        counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        elapsed = time.perf_counter() - start
    if sum(counts) != max_tokens * len(prompts):
        raise RuntimeError(f"direct path returned {sum(counts)} tokens, expected {max_tokens * len(prompts)}")
    return sum(counts) / elapsed


async def _stream_completion(host: str, port: int, body: bytes) -> int:
    """POST one streaming completion; the number of token ids received over SSE. A refusal or
    an error event raises, naming it."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
    )
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:  # the whole answer (headers and body) says which refusal it was
        rest = await asyncio.wait_for(reader.read(), timeout=5)  # `Connection: close`: until EOF
        writer.close()
        raise RuntimeError(f"gateway answered {status!r}: {rest[: 1 << 16]!r}")
    while (await reader.readline()) not in (b"\r\n", b""):
        pass  # headers
    n = 0
    async for line in reader:  # chunked framing lines interleave with SSE lines; only data lines count
        if line.startswith(b"data: {"):
            chunk = json.loads(line[6:])
            if "error" in chunk:  # a stream that failed after its 200 says why in an error event
                writer.close()
                raise RuntimeError(f"gateway stream failed after {n} tokens: {chunk['error']}")
            for choice in chunk.get("choices", ()):
                n += len(choice.get("token_ids") or ())
    writer.close()
    return n


async def stream_via_gateway(url: str, model: str, prompts: list[list[int]], max_tokens: int) -> float:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    bodies = [
        json.dumps(
            {
                "model": model,
                "prompt": p,
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "ignore_eos": True,
                "return_token_ids": True,
            }
        ).encode()
        for p in prompts
    ]
    start = time.perf_counter()
    counts = await asyncio.gather(*(_stream_completion(host, int(port), b) for b in bodies))
    elapsed = time.perf_counter() - start
    if sum(counts) != max_tokens * len(prompts):
        raise RuntimeError(f"gateway path returned {sum(counts)} tokens, expected {max_tokens * len(prompts)}")
    return sum(counts) / elapsed


def _pin(pid: int, cpu: int) -> None:
    """Pin a process to one core when the host has more than one (Linux only)."""
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(pid, {cpu})


def _wait_http_ok(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s} s")


@dataclass(frozen=True)
class GatewayBenchReport:
    """Tokens/s of each alternating round, per path."""

    direct: list[float]
    via_gateway: list[float]
    concurrency: int
    prompt_len: int
    max_tokens: int

    @property
    def ratio(self) -> float:
        return statistics.median(self.via_gateway) / statistics.median(self.direct)


def measure_gateway(
    model_dir: Path, concurrency: int = 32, prompt_len: int = 32, max_tokens: int = 64, rounds: int = 7
) -> GatewayBenchReport:
    """Start the processes, run the alternating rounds, stop everything; the tokens/s."""
    redis = EmbeddedRedis.start()
    python = [sys.executable, "-m", "tandem"]
    token = ClusterToken.generate()  # the children's, in their environment
    env = {**os.environ, TOKEN_ENV: token.secret}
    children: list[ChildProcess] = []
    own_cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        worker = WorkerConfig(
            role=WorkerRole.DECODE,
            worker_id="bench-decode",
            model_dir=model_dir,
            port=0,
            redis_url=redis.url,
            engine=EngineConfig(num_threads=1, kv_cache_bytes=64 * MiB),
        )
        decode = ChildProcess.spawn("decode", [*python, "decode", *to_argv(worker)], env=env, forward=False)
        children.append(decode)
        _pin(decode.pid, WORKER_CPU)
        address = decode.wait_ready(READY_TIMEOUT_S)["address"]
        # every prompt prefills on the decode worker: no prefill pool here
        config = GatewayConfig(
            model_dir=model_dir,
            redis_url=redis.url,
            port=0,
            scheduler=SchedulerConfig(local_prefill_max_tokens=1_000_000),
            admission=THROUGHPUT_ADMISSION,
        )
        gateway = ChildProcess.spawn("gateway", [*python, "gateway", *to_argv(config)], env=env, forward=False)
        children.append(gateway)
        _pin(gateway.pid, CLIENT_CPU)
        _pin(0, CLIENT_CPU)  # this process: the clients of both paths
        url = gateway.wait_ready(READY_TIMEOUT_S)["address"]
        _wait_http_ok(url + "/ready", READY_TIMEOUT_S)
        model = model_dir.name
        asyncio.run(stream_direct(address, _prompts(0, 2, prompt_len), 4, "warmup", token))
        asyncio.run(stream_via_gateway(url, model, _prompts(1, 2, prompt_len), 4))
        direct, via = [], []
        for r in range(rounds):
            direct.append(
                asyncio.run(
                    stream_direct(address, _prompts(10 + 2 * r, concurrency, prompt_len), max_tokens, f"r{r}", token)
                )
            )
            via.append(
                asyncio.run(stream_via_gateway(url, model, _prompts(11 + 2 * r, concurrency, prompt_len), max_tokens))
            )
    finally:
        for child in reversed(children):
            child.stop(10.0)
        redis.stop()
        if own_cpus is not None:
            os.sched_setaffinity(0, own_cpus)
    return GatewayBenchReport(direct, via, concurrency, prompt_len, max_tokens)


def run_gateway_bench(
    model_dir: Path,
    out: Callable[[str], None] = print,
    concurrency: int = 32,
    prompt_len: int = 32,
    max_tokens: int = 64,
    rounds: int = 7,
) -> int:
    """Run both measurements and print them; returns 0."""
    report = measure_gateway(model_dir, concurrency, prompt_len, max_tokens, rounds)
    d, g = statistics.median(report.direct), statistics.median(report.via_gateway)
    out(
        f"streaming at concurrency {concurrency} ({prompt_len}-token prompts, {max_tokens} tokens each, "
        f"median of {rounds} alternating rounds):"
    )
    out(f"  direct to decode worker  {d:8.1f} tokens/s   rounds {', '.join(f'{x:.0f}' for x in report.direct)}")
    out(f"  through the gateway      {g:8.1f} tokens/s   rounds {', '.join(f'{x:.0f}' for x in report.via_gateway)}")
    out(f"  gateway / direct         {g / d:8.2f}        (goal >= {GOAL})")
    from tandem.loadtest.bench.scheduler import run_scheduler_bench

    run_scheduler_bench(out=out)
    return 0
