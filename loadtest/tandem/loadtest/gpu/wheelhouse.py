"""`make gpu-wheels`: download, here, the runtime packages that the GPU image lacks.

The GPU machine has no network. Its python3 (CPython 3.12, manylinux x86_64) already holds torch,
triton and much else: deploy/gpu/image-packages.txt lists it. What the project needs beyond that
travels as wheels in a git-ignored folder (deploy/gpu/wheelhouse/, within the 64 MiB of ignored
paths a device call carries; BUDGET_BYTES here), installed there by deploy/gpu/check.sh with
`pip install --no-index --no-deps`.

1. Roots (`runtime_roots`): pyproject's runtime `dependencies` minus NEVER_ROOTS, plus the
   check's own client (EXTRA_ROOTS, with their specs from the `dev` extra).
2. Closure: `pip install --dry-run --report` resolves the roots for the image's Python
   (PIP_TARGET_FLAGS), ignoring whatever is installed here. TORCH_BOUND_ROOTS (packages that
   require torch themselves) resolve without their dependencies, against the image's torch;
   their other requirements (`torch_bound_needs`) join the roots of the main resolution.
3. Carried (`carried_pins`): the closure minus what the image has (`image_has`); torch, triton and
   CUDA packages in the closure are an error, never carried.
4. `pip download --no-deps` of exactly the carried pins, MANIFEST.txt, and the budget.

Steps 1 and 3, the image list and the budget are pure functions of text and sizes (tested with no
network); `main` runs pip for steps 2 and 4.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

MIB = 1024 * 1024
BUDGET_BYTES = 40 * MIB
# Not carried: the image has its own torch and triton (a CUDA build; ours would pull gigabytes of
# CUDA packages); the check runs neither Ray nor Kubernetes (`tandem up` uses local processes).
NEVER_ROOTS = frozenset({"torch", "triton", "ray", "kubernetes"})
# Roots that require torch (or triton) themselves: carried as their own wheels, resolved with
# --no-deps so that the image's torch serves them; their other needs are resolved as roots.
TORCH_BOUND_ROOTS = frozenset({"xgrammar", "compressed-tensors"})
# The check's own client for the cluster step; its spec comes from the `dev` extra.
EXTRA_ROOTS = ("openai",)
# The generated stubs (services/tandem/common/pb) check these two versions at import, so an image
# copy counts only where its recorded version meets the stubs' requirement.
STUB_CHECKED = frozenset({"grpcio", "protobuf"})
# The image: CPython 3.12.3 on Ubuntu 24.04 (glibc 2.39). pip matches a manylinux_2_N tag exactly,
# so every N the image's glibc accepts is named, newest first.
PLATFORMS = (*(f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)), "manylinux2014_x86_64", "manylinux1_x86_64")
PIP_TARGET_FLAGS = (
    "--only-binary=:all:",
    "--python-version=3.12",
    "--implementation=cp",
    "--abi=cp312",
    *(f"--platform={platform}" for platform in PLATFORMS),
)
# The marker environment of the image's python3, for the closure's `requires_dist` lines.
TARGET_MARKERS = {
    "implementation_name": "cpython",
    "implementation_version": "3.12.3",
    "os_name": "posix",
    "platform_machine": "x86_64",
    "platform_python_implementation": "CPython",
    "platform_system": "Linux",
    "python_full_version": "3.12.3",
    "python_version": "3.12",
    "sys_platform": "linux",
}


class WheelhouseError(Exception):
    """A wheelhouse that must not be built (CUDA in the closure, over budget, pip failed)."""


@dataclass(frozen=True)
class Pin:
    """One resolved package: its normalized name, its version and what it requires."""

    name: str
    version: str
    requires: tuple[Requirement, ...] = ()


def runtime_roots(pyproject_text: str) -> list[Requirement]:
    """The packages the GPU check installs: runtime `dependencies` minus NEVER_ROOTS, plus EXTRA_ROOTS."""
    project = tomllib.loads(pyproject_text)["project"]
    roots = [Requirement(spec) for spec in project["dependencies"]]
    roots = [req for req in roots if canonicalize_name(req.name) not in NEVER_ROOTS]
    dev: dict[str, Requirement] = {
        canonicalize_name(req.name): req for req in map(Requirement, project["optional-dependencies"]["dev"])
    }
    for name in EXTRA_ROOTS:
        if name not in dev:
            raise WheelhouseError(f"pyproject.toml: the dev extra has no {name} (the GPU check's client)")
        roots.append(dev[name])
    return roots


def read_image_packages(text: str) -> dict[str, Version | None]:
    """`name` or `name==version` a line, `#` comments: normalized name -> recorded version (or None)."""
    image: dict[str, Version | None] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name.strip()) or (sep and not version.strip()):
            raise WheelhouseError(f"image packages, line {number}: {raw!r} is not NAME or NAME==VERSION")
        key = canonicalize_name(name.strip())
        if key in image:
            raise WheelhouseError(f"image packages, line {number}: {key} listed twice")
        image[key] = Version(version.strip()) if sep else None
    return image


def stub_requirements(pb2_text: str, pb2_grpc_text: str) -> list[Requirement]:
    """What the generated stubs check at import: protobuf of the gencode's major, grpcio at least theirs.

    protobuf's runtime refuses gencode of another major version or newer than itself;
    `tandem_pb2_grpc` refuses a grpcio older than GRPC_GENERATED_VERSION.
    """
    protobuf = re.search(r"^# Protobuf Python Version: (\S+)$", pb2_text, re.MULTILINE)
    grpc = re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'$", pb2_grpc_text, re.MULTILINE)
    if protobuf is None or grpc is None:
        raise WheelhouseError("the generated stubs name no protobuf or grpcio version (regenerate: make proto)")
    major = Version(protobuf.group(1)).major
    return [Requirement(f"protobuf>={protobuf.group(1)},<{major + 1}"), Requirement(f"grpcio>={grpc.group(1)}")]


def closure_pins(report: Mapping[str, Any]) -> dict[str, Pin]:
    """The packages of a `pip install --report` (format 1): normalized name -> Pin."""
    pins: dict[str, Pin] = {}
    for item in report["install"]:
        metadata = item["metadata"]
        requires = tuple(Requirement(line) for line in metadata.get("requires_dist", ()))
        pin = Pin(canonicalize_name(metadata["name"]), metadata["version"], requires)
        pins[pin.name] = pin
    return pins


def split_roots(roots: Sequence[Requirement]) -> tuple[list[Requirement], list[Requirement]]:
    """(roots resolved with their dependencies, TORCH_BOUND_ROOTS resolved without)."""
    bound = [req for req in roots if canonicalize_name(req.name) in TORCH_BOUND_ROOTS]
    return [req for req in roots if req not in bound], bound


def torch_bound_needs(report: Mapping[str, Any]) -> list[Requirement]:
    """What the torch-bound packages of a --no-deps report require on the image, except torch,
    triton and CUDA packages (the image's serve): roots for the main resolution."""
    needs = [
        req
        for pin in closure_pins(report).values()
        for req in pin.requires
        if _applies(req) and not is_never_carried(canonicalize_name(req.name))
    ]
    return list({str(req): req for req in needs}.values())


def merged_report(*reports: Mapping[str, Any]) -> dict[str, Any]:
    """One report whose `install` list holds every report's packages."""
    return {"version": "1", "install": [item for report in reports for item in report["install"]]}


def is_never_carried(name: str) -> bool:
    """torch, triton and anything CUDA: the image's own builds must stay the ones imported."""
    return name in {"torch", "triton"} or name.startswith("nvidia-") or "cuda" in name


def _applies(req: Requirement) -> bool:
    """Whether a requirement holds on the image (extras never requested: none of our roots asks one)."""
    return req.marker is None or req.marker.evaluate({**TARGET_MARKERS, "extra": ""})


def _specifiers(reqs: Iterable[Requirement]) -> dict[str, SpecifierSet]:
    combined: dict[str, SpecifierSet] = {}
    for req in reqs:
        if _applies(req):
            name = canonicalize_name(req.name)
            combined[name] = combined.get(name, SpecifierSet()) & req.specifier
    return combined


def image_has(name: str, image: Mapping[str, Version | None], spec: SpecifierSet) -> bool:
    """Whether the image's copy of `name` serves: listed, and its recorded version (if any) meets `spec`.

    A grpcio or protobuf copy serves only with a recorded version that meets it (STUB_CHECKED).
    """
    if name not in image:
        return False
    version = image[name]
    if version is None:
        return name not in STUB_CHECKED
    return spec.contains(version, prereleases=True)


def carried_pins(
    report: Mapping[str, Any],
    roots: Sequence[Requirement],
    image: Mapping[str, Version | None],
    stub_reqs: Sequence[Requirement] = (),
) -> list[Pin]:
    """The closure's packages the image lacks (or has in a version that fails us), sorted by name.

    Requirements on an image package come from the roots, the stubs and every carried package (the
    image's own packages keep their own needs): carrying one package can add requirements that
    make another image copy fail, so the set grows until it is stable.
    """
    closure = closure_pins(report)
    never = sorted(name for name in closure if is_never_carried(name))
    if never:
        raise WheelhouseError(
            f"the resolved closure contains {', '.join(never)}: torch, triton and CUDA packages are never "
            "carried (the GPU image has its own); drop the requirement that pulls them in"
        )
    carried: set[str] = set()
    while True:
        reqs = [*roots, *stub_reqs, *(req for name in carried for req in closure[name].requires)]
        specs = _specifiers(reqs)
        now = {name for name in closure if not image_has(name, image, specs.get(name, SpecifierSet()))}
        if now == carried:
            return [closure[name] for name in sorted(carried)]
        carried = now


def check_budget(sizes: Mapping[str, int], budget_bytes: int = BUDGET_BYTES) -> int:
    """The total of a wheelhouse's file sizes (file name -> bytes); over the budget is an error."""
    total = sum(sizes.values())
    if total > budget_bytes:
        largest = sorted(sizes.items(), key=lambda item: (-item[1], item[0]))[:3]
        named = ", ".join(f"{file} {size / MIB:.1f} MiB" for file, size in largest)
        raise WheelhouseError(
            f"the wheelhouse is {total / MIB:.1f} MiB, over the {budget_bytes / MIB:.0f} MiB budget (largest: {named})"
        )
    return total


def wheel_sizes(folder: Path) -> dict[str, int]:
    """The wheels in a folder: file name -> bytes."""
    return {path.name: path.stat().st_size for path in sorted(folder.glob("*.whl"))}


def manifest(pins: Sequence[Pin], sizes: Mapping[str, int]) -> str:
    """MANIFEST.txt: one `name version file size_bytes` line per carried wheel, then the total."""
    files: dict[str, str] = {canonicalize_name(str(parse_wheel_filename(file)[0])): file for file in sizes}
    lines = ["# name version file size_bytes (make gpu-wheels; the GPU image lacks these)"]
    lines += [f"{pin.name} {pin.version} {files[pin.name]} {sizes[files[pin.name]]}" for pin in pins]
    lines.append(f"# total {sum(sizes.values())} bytes ({sum(sizes.values()) / MIB:.1f} MiB)")
    return "\n".join(lines) + "\n"


def check_downloaded(pins: Sequence[Pin], sizes: Mapping[str, int]) -> None:
    """Exactly one wheel per carried pin, at its version, and nothing else."""
    want = {pin.name: pin.version for pin in pins}
    got: dict[str, list[tuple[str, str]]] = {}
    for file in sorted(sizes):
        wheel_name, version, _, _ = parse_wheel_filename(file)
        got.setdefault(canonicalize_name(str(wheel_name)), []).append((str(version), file))
    wrong = []
    for name in sorted(want.keys() | got.keys()):
        files = ", ".join(file for _, file in got.get(name, []))
        if name not in want:
            wrong.append(f"{name} is not carried ({files})")
        elif name not in got:
            wrong.append(f"{name}=={want[name]} is missing")
        elif [version for version, _ in got[name]] != [want[name]]:
            wrong.append(f"{name}=={want[name]} expected, found {files}")
    if wrong:
        raise WheelhouseError(f"the wheelhouse does not match the carried set: {'; '.join(wrong)}")


# ---- the pip calls ---------------------------------------------------------------------------
def _pip(args: Sequence[str]) -> None:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise WheelhouseError(f"pip {args[0]} failed (exit {result.returncode}): {' '.join(command)}")


def resolve(roots: Sequence[Requirement], scratch: Path, no_deps: bool = False) -> dict[str, Any]:
    """The closure of `roots` for the image's Python (just `roots` with `no_deps`): pip's
    install report (format 1)."""
    if not roots:
        return {"version": "1", "install": []}
    scratch.mkdir(parents=True, exist_ok=True)
    report = scratch / "report.json"
    _pip(
        [
            "install", "--quiet", "--dry-run", "--ignore-installed", f"--report={report}",
            f"--target={scratch / 'target'}", *PIP_TARGET_FLAGS, *(["--no-deps"] if no_deps else []),
            *map(str, roots),
        ]
    )  # fmt: skip
    loaded: dict[str, Any] = json.loads(report.read_text())
    return loaded


def download(pins: Sequence[Pin], dest: Path) -> None:
    """Exactly these wheels into `dest`, after removing the wheels and manifest already there."""
    dest.mkdir(parents=True, exist_ok=True)
    for stale in [*dest.glob("*.whl"), dest / "MANIFEST.txt"]:
        stale.unlink(missing_ok=True)
    if pins:
        pinned = [f"{pin.name}=={pin.version}" for pin in pins]
        _pip(["download", "--quiet", "--no-deps", f"--dest={dest}", *PIP_TARGET_FLAGS, *pinned])


def main(argv: Sequence[str]) -> int:
    """`python -m tandem.loadtest.gpu wheels --dest DIR` (`make gpu-wheels`), run from the repo root."""
    parser = argparse.ArgumentParser(prog="python -m tandem.loadtest.gpu wheels", description=__doc__.split("\n")[0])
    parser.add_argument("--dest", type=Path, required=True, help="the wheelhouse folder (git-ignored)")
    parser.add_argument("--root", type=Path, default=Path("."), help="the repository root (default: .)")
    args = parser.parse_args(argv)
    root: Path = args.root
    pb = root / "services/tandem/common/pb"
    try:
        roots = runtime_roots((root / "pyproject.toml").read_text())
        image = read_image_packages((root / "deploy/gpu/image-packages.txt").read_text())
        stubs = stub_requirements((pb / "tandem_pb2.py").read_text(), (pb / "tandem_pb2_grpc.py").read_text())
        plain, bound = split_roots(roots)
        with tempfile.TemporaryDirectory(prefix="gpu-wheels-") as scratch:
            bound_report = resolve(bound, Path(scratch) / "torch-bound", no_deps=True)
            needs = torch_bound_needs(bound_report)
            report = merged_report(bound_report, resolve([*plain, *needs], Path(scratch) / "closure"))
            pins = carried_pins(report, [*roots, *needs], image, stubs)
        download(pins, args.dest)
        sizes = wheel_sizes(args.dest)
        check_downloaded(pins, sizes)
        (args.dest / "MANIFEST.txt").write_text(manifest(pins, sizes))
        for pin in pins:
            print(f"  {pin.name}=={pin.version}")
        total = check_budget(sizes)
    except WheelhouseError as exc:
        print(f"gpu-wheels: {exc}", file=sys.stderr)
        return 1
    print(f"gpu-wheels: {len(pins)} wheels, {total / MIB:.1f} MiB, in {args.dest}")
    return 0
