"""Hash parity at registration, what the gateways report about it: the gateway view's Redis
encoding, the routing-mode gauge, and `tandem status` with gateways' views (exact values)."""

from __future__ import annotations

import logging

import pytest

from tandem.common.gateway_view import MAX_REASON_CHARS, GatewayView, RoutingMode
from tandem.common.workers import WorkerInfo, WorkerLoad, WorkerRole
from tandem.gateway.metrics import GatewayMetrics
from tandem.launcher.status import GatewayRow, render, summarize
from tests.unit.test_gateway_metrics import samples, value

BIG = "model_id (ours 'tiny', theirs 'big'), reference block hash (ours 0xbe417b77101df27b, theirs 0xad189f2fdc6ff53a)"
OLD = "no reference block hash published (a worker older than the hash parity check)"


def test_gateway_view_round_trips_through_its_redis_fields() -> None:
    view = GatewayView.of("gw-1", RoutingMode.DEGRADED, {"d-9": BIG, "d-2": OLD})
    assert view.refused == (("d-2", OLD), ("d-9", BIG))  # sorted by worker id
    fields = view.to_fields()
    assert fields == {"routing_mode": "degraded", "refused:d-2": OLD, "refused:d-9": BIG}
    raw = {k.encode(): v.encode() for k, v in fields.items()}
    assert GatewayView.from_fields("gw-1", raw) == view
    # A newer gateway's extra field is ignored, not fatal.
    assert GatewayView.from_fields("gw-1", {**raw, b"future": b"x"}) == view
    assert GatewayView.from_fields("gw-1", {}) is None  # expired between SCAN and HGETALL


def test_gateway_view_cuts_long_reasons() -> None:
    view = GatewayView.of("gw-1", RoutingMode.EXACT, {"d-0": "x" * (MAX_REASON_CHARS + 5)})
    assert view.refused == (("d-0", "x" * MAX_REASON_CHARS),)


@pytest.mark.parametrize(
    ("gateway_id", "fields", "why"),
    [
        ("gw-1", {b"refused:d-0": b"why"}, "missing field 'routing_mode'"),
        ("gw-1", {b"routing_mode": b"fast"}, "'fast' is not a valid RoutingMode"),
        ("gw-1", {b"routing_mode": b"exact", b"refused:bad id*": b"why"}, "refused worker id must be 1-128 chars"),
        ("gw-1", {b"routing_mode": b"exact", b"refused:d-0": b""}, "a refusal reason must be 1-1024 characters"),
        ("gw-1", {b"routing_mode": b"\xff"}, "'utf-8' codec can't decode byte 0xff"),
        ("gw:1", {b"routing_mode": b"exact"}, "gateway_id must be 1-128 chars"),
    ],
)
def test_malformed_gateway_views_are_skipped_with_a_warning(
    gateway_id: str, fields: dict[bytes, bytes], why: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="tandem.common.gateway_view"):
        assert GatewayView.from_fields(gateway_id, fields) is None
    [message] = caplog.messages
    assert message.startswith(f"skipping malformed gateway view {gateway_id!r}: {why}")


def test_routing_mode_gauge_has_one_series_at_one() -> None:
    metrics = GatewayMetrics("tiny-llama")
    modes = ("exact", "degraded", "load_only")

    def gauge() -> dict[str, float]:
        s = samples(metrics)
        return {m: value(s, "tandem_routing_mode", mode=m) for m in modes}

    assert gauge() == {"exact": 0, "degraded": 0, "load_only": 1}  # before the first scrape
    metrics.set_routing_mode(RoutingMode.EXACT)
    assert gauge() == {"exact": 1, "degraded": 0, "load_only": 0}
    metrics.set_routing_mode("degraded")
    assert gauge() == {"exact": 0, "degraded": 1, "load_only": 0}
    with pytest.raises(ValueError, match="'fast' is not a valid RoutingMode"):
        metrics.set_routing_mode("fast")
    assert gauge() == {"exact": 0, "degraded": 1, "load_only": 0}


def _info(worker_id: str, role: WorkerRole) -> WorkerInfo:
    return WorkerInfo(worker_id, role, f"127.0.0.1:{5000 + len(worker_id)}", "ab12", 100, "0.1.0")


def test_status_shows_incompatible_workers_with_why_and_each_gateways_routing_mode() -> None:
    workers = [_info("decode-0", WorkerRole.DECODE), _info("decode-big", WorkerRole.DECODE)]
    workers.append(_info("prefill-old", WorkerRole.PREFILL))
    loads: dict[str, WorkerLoad | None] = {"decode-0": WorkerLoad(0, 1, 0, 10, 100, 1.0)}
    views = [
        GatewayView.of("gw-b", RoutingMode.EXACT, {"decode-big": BIG, "prefill-old": OLD}),
        GatewayView.of("gw-a", RoutingMode.DEGRADED, {"decode-big": BIG}),
    ]
    status = summarize("c1", workers, loads, views)
    assert [(w.worker_id, w.incompatible) for w in status.workers] == [
        ("prefill-old", OLD),
        ("decode-0", None),
        ("decode-big", BIG),  # one reason, though two gateways refuse it
    ]
    assert status.gateways == (GatewayRow("gw-a", "degraded", 1), GatewayRow("gw-b", "exact", 2))
    assert status.to_json()["gateways"] == [
        {"gateway_id": "gw-a", "routing_mode": "degraded", "refused": 1},
        {"gateway_id": "gw-b", "routing_mode": "exact", "refused": 2},
    ]
    lines = render(status).splitlines()
    assert [line.split()[0] for line in lines[3:6]] == ["prefill-old", "decode-0", "decode-big"]
    assert [line.split()[-1] for line in lines[3:6]] == ["incompatible", "ok", "incompatible"]
    assert lines[6:9] == ["", f"incompatible prefill-old: {OLD}", f"incompatible decode-big: {BIG}"]
    assert lines[-4:] == [
        "",
        "GATEWAY  ROUTING_MODE  REFUSED",
        "gw-a     degraded      1",
        "gw-b     exact         2",
    ]


def test_status_joins_differing_reasons_of_two_gateways() -> None:
    views = [
        GatewayView.of("gw-a", RoutingMode.EXACT, {"decode-0": "block_size (ours 16, theirs 32)"}),
        GatewayView.of("gw-b", RoutingMode.EXACT, {"decode-0": "block_size (ours 8, theirs 32)"}),
    ]
    status = summarize("c1", [_info("decode-0", WorkerRole.DECODE)], {}, views)
    assert status.workers[0].incompatible == "block_size (ours 16, theirs 32); block_size (ours 8, theirs 32)"
