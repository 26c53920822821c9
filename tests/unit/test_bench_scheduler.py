"""The scheduler micro-benchmark (loadtest/tandem/loadtest/bench/scheduler.py) on a tiny setup:
every path is timed and reported."""

from __future__ import annotations

from tandem.loadtest.bench.scheduler import run_scheduler_bench

PATHS = ("route", "route_cold", "match", "hash_blocks")


def test_every_path_is_timed_and_printed() -> None:
    lines: list[str] = []
    results = run_scheduler_bench(num_workers=4, prompt_tokens=256, iterations=5, out=lines.append)
    assert set(results) == {f"{path}_{q}_us" for path in PATHS for q in ("p50", "p99", "max")}
    assert all(results[f"{path}_p50_us"] <= results[f"{path}_p99_us"] <= results[f"{path}_max_us"] for path in PATHS)
    assert lines[0] == "scheduler bench: 4 workers, 256-token prompt (16 blocks), policy prefix_aware"
    assert [line.split()[:2] for line in lines[2:]] == [
        ["route", "5"],
        ["route_cold", "5"],
        ["match", "5"],
        ["hash_blocks", "5"],
    ]
