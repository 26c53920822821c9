"""Cost per token: what a run's GPU time cost, per million output tokens and per million
tokens (prompt + output), from the GPU hour cost of each pool.

`--gpu-hour-cost` takes either one number, the dollars per hour of the whole cluster, or
`pool=dollars` pairs (`prefill=2.5,decode=2.5`), each the dollars per hour of that pool (all
its GPUs together); the cluster's hourly cost is their sum. A run of `duration_s` seconds costs
`dollars_per_hour * duration_s / 3600`; the per-million figures divide that by the tokens of
the run's successful requests (as the throughput figures count them), times 1e6.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

CLUSTER = "cluster"  # the pool name of a single-number cost


def _dollars(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--gpu-hour-cost: {where} must be a number of dollars per hour, got {text!r}.") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"--gpu-hour-cost: {where} must be a finite number >= 0, got {text!r}.")
    return value


@dataclass(frozen=True)
class GpuHourCost:
    """Dollars per hour of each pool, in the order given."""

    pools: tuple[tuple[str, float], ...]

    @classmethod
    def parse(cls, text: str) -> GpuHourCost:
        """`2.5` (the whole cluster) or `prefill=2.5,decode=2.5`; ValueError on anything else."""
        items = [item.strip() for item in text.split(",")]
        if len(items) == 1 and "=" not in items[0]:
            return cls(((CLUSTER, _dollars(items[0], "the cost")),))
        pools: list[tuple[str, float]] = []
        for item in items:
            name, sep, value = item.partition("=")
            name = name.strip()
            if not sep or not name:
                raise ValueError(
                    f"--gpu-hour-cost takes one number or pool=dollars pairs (prefill=2.5,decode=2.5), got {text!r}."
                )
            if name in dict(pools):
                raise ValueError(f"--gpu-hour-cost names the pool {name!r} twice: {text!r}.")
            pools.append((name, _dollars(value.strip(), f"pool {name!r}")))
        return cls(tuple(pools))

    @property
    def dollars_per_hour(self) -> float:
        return sum(dollars for _, dollars in self.pools)

    def per_gpu_dollars_per_hour(self, workers: Mapping[str, int]) -> float:
        """The hourly cost of a cluster of `workers` (pool -> workers, one GPU each) when each
        price is per GPU (`make bench`): one number prices every GPU; pool pairs price each
        pool's GPUs, and a pool with workers but no price is an error naming it."""
        if len(self.pools) == 1 and self.pools[0][0] == CLUSTER:
            return self.pools[0][1] * sum(workers.values())
        prices = dict(self.pools)
        missing = sorted(pool for pool, count in workers.items() if count and pool not in prices)
        if missing:
            raise ValueError(f"--gpu-hour-cost has no price for the pool(s) {', '.join(missing)}: {self}.")
        return sum(prices[pool] * count for pool, count in workers.items())

    def __str__(self) -> str:
        if len(self.pools) == 1 and self.pools[0][0] == CLUSTER:
            return f"{self.pools[0][1]:g}"
        return ",".join(f"{name}={dollars:g}" for name, dollars in self.pools)


def dollars_per_million(dollars_per_hour: float, tokens_per_s: float) -> float:
    """What a million tokens cost at a steady `tokens_per_s` on hardware of `dollars_per_hour`."""
    if not (math.isfinite(tokens_per_s) and tokens_per_s > 0):
        raise ValueError(f"a cost per token needs a positive tokens_per_s, got {tokens_per_s!r}.")
    return dollars_per_hour / 3600.0 / tokens_per_s * 1e6


@dataclass(frozen=True)
class TokenCost:
    """What a run cost. The per-million figures are None when the run produced no such tokens."""

    dollars: float
    per_million_output: float | None
    per_million_total: float | None

    @classmethod
    def of(cls, cost: GpuHourCost, duration_s: float, prompt_tokens: int, output_tokens: int) -> TokenCost:
        if not (math.isfinite(duration_s) and duration_s > 0):
            raise ValueError(f"a run's cost needs a positive duration_s, got {duration_s!r}.")
        dollars = cost.dollars_per_hour * duration_s / 3600.0
        total = prompt_tokens + output_tokens
        return cls(
            dollars=dollars,
            per_million_output=dollars * 1e6 / output_tokens if output_tokens else None,
            per_million_total=dollars * 1e6 / total if total else None,
        )
