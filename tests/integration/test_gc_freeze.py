"""Both server processes freeze their startup heap before they report ready, so that their full
garbage collections (a 30 to 190 ms pause measured on them) walk only what they allocated since."""

from __future__ import annotations

import re
from pathlib import Path

from tests.e2e.cluster import GATEWAY_STOP_TIMEOUT_S, start_gateway
from tests.integration.workers import STOP_TIMEOUT_S, start_worker


def test_the_worker_and_the_gateway_freeze_their_startup_heap(tiny_model_dir: Path, redis_server) -> None:
    worker = start_worker("decode", tiny_model_dir, "--redis", redis_server.url, worker_id="d-gc")
    try:
        gateway = start_gateway(tiny_model_dir, redis_server.url, wait_ready=False)
        try:
            for process, name in ((worker, "d-gc"), (gateway, "gateway")):
                found = re.search(
                    rf"{name}: (\d+) startup objects frozen out of garbage collection", process.output_tail()
                )
                assert found is not None, process.output_tail()
                assert int(found.group(1)) > 10_000  # the model, the app, gRPC: well beyond a bare interpreter
        finally:
            assert gateway.stop(GATEWAY_STOP_TIMEOUT_S) == 0
    finally:
        assert worker.stop(STOP_TIMEOUT_S) == 0
