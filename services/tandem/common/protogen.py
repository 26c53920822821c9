"""Generate the gRPC/protobuf stubs in services/tandem/common/pb from proto/ (`make proto`).

The `-I tandem/common/pb=proto` mapping (output under `services/`) makes the generated modules import each other as
`tandem.common.pb.*`, so they work inside the package without path hacks.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
PROTO_DIR = REPO_ROOT / "proto"
PB_PACKAGE = "tandem/common/pb"
OUT_ROOT = REPO_ROOT / "services"


def generate(out_root: Path) -> list[Path]:
    """Write the stubs under `out_root/tandem/common/pb`; return the files written."""
    from grpc_tools import protoc

    protos = sorted(PROTO_DIR.glob("*.proto"))
    (out_root / PB_PACKAGE).mkdir(parents=True, exist_ok=True)
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PB_PACKAGE}={PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {[p.name for p in protos]}")
    return sorted((out_root / PB_PACKAGE).glob("*_pb2*.py*"))


if __name__ == "__main__":
    written = generate(OUT_ROOT)
    sys.stdout.write("".join(f"wrote {p.relative_to(REPO_ROOT)}\n" for p in written))
