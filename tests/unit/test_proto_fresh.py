"""The generated stubs in services/tandem/common/pb are exactly what proto/ generates today."""

from __future__ import annotations

from pathlib import Path

from tandem.common.protogen import OUT_ROOT, PB_PACKAGE, generate


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    fresh = generate(tmp_path)
    assert [p.name for p in fresh] == ["tandem_pb2.py", "tandem_pb2.pyi", "tandem_pb2_grpc.py"]
    for path in fresh:
        committed = OUT_ROOT / PB_PACKAGE / path.name
        assert committed.read_bytes() == path.read_bytes(), f"{committed} is stale: run `make proto`"
