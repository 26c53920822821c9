"""End-to-end fixtures: one real cluster (embedded Redis, 2 prefill and 2 decode worker
processes) for the whole session, and one gateway process per module that needs it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tandem.launcher.processes import ChildProcess
from tests.e2e.cluster import GATEWAY_STOP_TIMEOUT_S, Cluster


@pytest.fixture(scope="session")
def cluster(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    trace_file = tmp_path_factory.mktemp("traces") / "spans.jsonl"
    c = Cluster.start(tiny_model_dir, trace_file)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def gateway(cluster: Cluster) -> Iterator[ChildProcess]:
    """The default gateway: prefix_aware routing, always disaggregated (so both pools work),
    tracing into the cluster's span file."""
    g = cluster.gateway(
        "--local-prefill-max-tokens", "0", "--otel-exporter", "file", "--otel-file", str(cluster.trace_file)
    )
    try:
        yield g
    finally:
        g.stop(GATEWAY_STOP_TIMEOUT_S)
