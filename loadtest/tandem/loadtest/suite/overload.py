"""Overload sweep through the gateway's admission control (issue 15, `tandem bench overload`).

One decode worker alone on core 0 (local prefill, one torch thread), the gateway and the
clients on core 1. Capacity is measured first: completed requests per second of a closed loop
that keeps `CAPACITY_CONCURRENCY` streams busy (a stream refused with 503 or 429 sends the
same request again after its Retry-After, as a client would, and the rate is taken up to the
last completion: refusals are not load, and a stream that drew them must not spin through the
requests). Then an open loop offers 0.5x, 1x, 2x and 3x
that rate (evenly spaced arrivals) for `duration` seconds each. Every request streams
`PROMPT_LEN`-token prompts and `MAX_TOKENS` output tokens with a client deadline of
`DEADLINE_S`.

Figures: goodput (requests that got 200, all their tokens, and a TTFT within the SLO, per
second of offered load) at 3x over goodput at 1x (goal >= 0.9), requests past their deadline
(goal 0), and the admitted requests' TTFT p99 at 3x (goal: within the SLO). The table gives the
status histogram, the admitted requests' TTFT p50 / p99 against the unloaded TTFT, the
refusals by reason and the gateway's adaptive limit at the end of each phase.

The gateway is configured from the SLO it is measured against, as an operator would: its TTFT
budget is the SLO (`SLO_TTFT_S`), and its adaptive limit holds the p90 TTFT under
`TARGET_FRACTION` of it, which leaves the p99 a margin for the limit's overshoot.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections import Counter
from dataclasses import dataclass

import torch

from tandem.gateway.admission_policy import AdmissionConfig
from tandem.gateway.concurrency_limit import LimitConfig
from tandem.loadtest.suite.cluster import BenchCluster, ClusterSpec, WorkerSpec
from tandem.loadtest.suite.context import BenchContext
from tandem.loadtest.suite.figures import Direction, Figure, Section

WORKER_CPU, CLIENT_CPU = 0, 1
PROMPT_LEN = 64
MAX_TOKENS = 64
DEADLINE_S = 60.0
SLO_TTFT_S = 1.0
TARGET_FRACTION = 0.5
REASONS = ("limit", "ttft", "inflight", "key")
CAPACITY_CONCURRENCY = 32
MULTIPLIERS = (0.5, 1.0, 2.0, 3.0)
GOAL = 0.9


@dataclass(frozen=True)
class Outcome:
    """One request: its HTTP status (0: no answer before the deadline), TTFT (None without a
    token), tokens received and wall time; a refusal's Retry-After (seconds, 0: none)."""

    status: int
    ttft_s: float | None
    tokens: int
    elapsed_s: float
    retry_after_s: float = 0.0


async def _request(host: str, port: int, body: bytes) -> Outcome:
    start = time.perf_counter()
    try:
        return await asyncio.wait_for(_stream(host, port, body, start), DEADLINE_S)
    except (asyncio.TimeoutError, OSError):
        return Outcome(0, None, 0, time.perf_counter() - start)


async def _stream(host: str, port: int, body: bytes, start: float) -> Outcome:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        ttft_s: float | None = None
        tokens = 0
        retry_after_s = 0.0
        async for line in reader:
            if line.lower().startswith(b"retry-after:"):
                retry_after_s = float(line.split(b":", 1)[1])
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return Outcome(500, ttft_s, tokens, time.perf_counter() - start)
            n = sum(len(c.get("token_ids") or ()) for c in event.get("choices", ()))
            if n and ttft_s is None:
                ttft_s = time.perf_counter() - start
            tokens += n
        return Outcome(status, ttft_s, tokens, time.perf_counter() - start, retry_after_s)
    finally:
        writer.close()


def _bodies(model: str, count: int, seed: int) -> list[bytes]:
    g = torch.Generator().manual_seed(seed)
    return [
        json.dumps(
            {
                "model": model,
                "prompt": torch.randint(4, 500, (PROMPT_LEN,), generator=g).tolist(),
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "return_token_ids": True,
            }
        ).encode()
        for _ in range(count)
    ]


async def _open_loop(url: str, bodies: list[bytes], rate_rps: float) -> list[Outcome]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    tasks = []
    start = time.perf_counter()
    for i, body in enumerate(bodies):
        await asyncio.sleep(max(0.0, start + i / rate_rps - time.perf_counter()))
        tasks.append(asyncio.create_task(_request(host, int(port), body)))
    return list(await asyncio.gather(*tasks))


async def _closed_loop(url: str, bodies: list[bytes], concurrency: int) -> float:
    """Completed requests per second, up to the last completion, of `concurrency` streams that
    each send the next request when theirs ended, or the same one again after its Retry-After
    when it was refused."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    queue = list(bodies)
    done = 0
    start = last = time.perf_counter()

    async def client() -> None:
        nonlocal done, last
        while queue:
            body = queue.pop()
            outcome = await _request(host, int(port), body)
            if outcome.status in (429, 503):
                queue.append(body)
                await asyncio.sleep(outcome.retry_after_s or 1.0)
            elif outcome.status == 200 and outcome.tokens == MAX_TOKENS:
                done += 1
                last = time.perf_counter()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return done / (last - start) if done else 0.0


def _p(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def _delta(before: dict[str, float], after: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def run(ctx: BenchContext) -> Section:
    duration_s = ctx.size(20, 3)
    admission = AdmissionConfig(ttft_budget_s=SLO_TTFT_S, limit=LimitConfig(ttft_target_s=SLO_TTFT_S * TARGET_FRACTION))
    spec = ClusterSpec(
        ctx.model_dir, (WorkerSpec("decode", WORKER_CPU),), gateway_cpu=CLIENT_CPU,
        local_prefill_max_tokens=1_000_000, admission=admission,
    )  # fmt: skip
    rows = [
        (
            "offered",
            "requests/s",
            "sent",
            "statuses",
            "goodput (req/s)",
            "TTFT p50 / p99 (ms)",
            "past deadline",
            "refused by",
            "limit",
        )
    ]
    goodput: dict[float, float] = {}
    p99_ms: dict[float, float] = {}
    late_total = 0
    with BenchCluster.start(spec) as cluster:
        url, model = cluster.url, cluster.model
        asyncio.run(_closed_loop(url, _bodies(model, 8, 0), 2))  # warm-up
        unloaded = [asyncio.run(_open_loop(url, _bodies(model, 1, 100 + i), 1.0))[0] for i in range(10)]
        unloaded_ttft = statistics.median(o.ttft_s or 0.0 for o in unloaded)
        ctx.log(f"overload: unloaded TTFT {unloaded_ttft * 1000:.1f} ms; measuring capacity")
        capacity_rps = asyncio.run(
            _closed_loop(url, _bodies(model, ctx.size(320, 48), 1), ctx.size(CAPACITY_CONCURRENCY, 8))
        )
        for m in MULTIPLIERS:
            rate = m * capacity_rps
            ctx.log(f"overload: {m}x = {rate:.1f} requests/s for {duration_s} s")
            before = cluster.metrics()
            outcomes = asyncio.run(
                _open_loop(url, _bodies(model, max(1, round(rate * duration_s)), 10 + int(m * 10)), rate)
            )
            statuses = Counter(o.status for o in outcomes)
            good = [o for o in outcomes if o.status == 200 and o.tokens == MAX_TOKENS]
            within = [o for o in good if o.ttft_s is not None and o.ttft_s <= SLO_TTFT_S]
            goodput[m] = len(within) / duration_s
            late = sum(o.status == 0 or o.elapsed_s > DEADLINE_S for o in outcomes)
            late_total += late
            ttfts = [o.ttft_s * 1000 for o in good if o.ttft_s is not None]
            p99_ms[m] = _p(ttfts, 99) if ttfts else 0.0
            after = cluster.metrics()
            refused = {r: _delta(before, after, f"tandem_admission_refusals_total{{reason={r}}}") for r in REASONS}
            rows.append(
                (
                    f"{m:g}x",
                    f"{rate:.1f}",
                    str(len(outcomes)),
                    ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())),
                    f"{goodput[m]:.1f}",
                    f"{_p(ttfts, 50):.0f} / {_p(ttfts, 99):.0f}" if ttfts else "-",
                    str(late),
                    ", ".join(f"{r}: {n:.0f}" for r, n in refused.items() if n) or "-",
                    f"{after.get('tandem_admission_limit{}', 0.0):.0f}",
                )
            )
    figures = (
        Figure("goodput at 3x / goodput at 1x", goodput[3.0] / goodput[1.0] if goodput[1.0] else 0.0, goal=GOAL),
        Figure("requests past their deadline", float(late_total), unit="", goal=0, direction=Direction.AT_MOST),
        Figure("admitted TTFT p99 at 3x", p99_ms[3.0], unit=" ms", goal=SLO_TTFT_S * 1000, direction=Direction.AT_MOST),
        Figure("capacity (closed loop)", capacity_rps, unit=" req/s"),
        Figure("unloaded TTFT", unloaded_ttft * 1000, unit=" ms"),
    )
    setup = (
        f"decode worker alone on core {WORKER_CPU} (local prefill, one torch thread); gateway and clients on core "
        f"{CLIENT_CPU}. {PROMPT_LEN}-token prompts, {MAX_TOKENS} output tokens, streaming. Capacity: a closed loop "
        f"of {ctx.size(CAPACITY_CONCURRENCY, 8)} streams. Then open-loop arrivals at each multiple of it for "
        f"{duration_s} s. SLO: TTFT <= {SLO_TTFT_S} s. Admission: TTFT budget {SLO_TTFT_S} s, adaptive limit "
        f"holding the p90 TTFT under {SLO_TTFT_S * TARGET_FRACTION} s; deadline {DEADLINE_S} s. Status 0: no "
        "answer before the deadline. Limit: the gateway's adaptive limit at the end of the phase."
    )
    return Section("overload", "Overload sweep: goodput under admission control", setup, figures, tuple(rows))
