"""One import namespace, `tandem` (PEP 420), and no top-level name that another project owns.

transformers imports Hugging Face's `kernels` package. A top-level `kernels` of ours (or
`services`, `loadtest`) shadowed it, or was shadowed by it, depending on the working directory.
These tests run imports in fresh interpreters from the repository root and from a temp folder,
build the wheel and read its contents, and check that pyproject's package list is the tree.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCE_ROOTS = ("services", "kernels", "loadtest")

PROBE = """
import json, importlib.util, sys
import kernels, tandem.kernels, tandem.engine, tandem.loadtest
import transformers.integrations.hub_kernels
print(json.dumps({
    "kernels": kernels.__file__,
    "tandem.kernels": tandem.kernels.__file__,
    "tandem.engine": tandem.engine.__file__,
    "tandem.loadtest": tandem.loadtest.__file__,
    "tandem": list(tandem.__path__),
}))
"""


def _probe(cwd: Path) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("where", ["repo_root", "temp_folder"])
def test_hugging_face_kernels_and_tandem_kernels_resolve_to_their_own_homes(where: str, tmp_path: Path) -> None:
    found = _probe(REPO_ROOT if where == "repo_root" else tmp_path)
    site_packages = Path(sys.modules["pytest"].__file__).resolve().parents[1]  # .../site-packages
    assert Path(str(found["kernels"])).resolve() == site_packages / "kernels" / "__init__.py"
    assert Path(str(found["tandem.kernels"])).resolve() == REPO_ROOT / "kernels/tandem/kernels/__init__.py"
    assert Path(str(found["tandem.engine"])).resolve() == REPO_ROOT / "services/tandem/engine/__init__.py"
    assert Path(str(found["tandem.loadtest"])).resolve() == REPO_ROOT / "loadtest/tandem/loadtest/__init__.py"


def test_python_dash_m_tandem_is_the_tandem_command(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tandem", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("usage: tandem ")


def test_no_init_py_in_the_source_roots_or_any_tandem_folder() -> None:
    offenders = [str(p.relative_to(REPO_ROOT)) for root in SOURCE_ROOTS for p in [REPO_ROOT / root / "__init__.py"]]
    offenders = [o for o in offenders if (REPO_ROOT / o).exists()]
    offenders += [
        str(init.relative_to(REPO_ROOT))
        for root in SOURCE_ROOTS
        for init in (REPO_ROOT / root).rglob("tandem/__init__.py")
    ]
    assert offenders == []
    # each source root holds exactly one thing: its part of the namespace
    for root in SOURCE_ROOTS:
        assert sorted(p.name for p in (REPO_ROOT / root).iterdir() if p.name != "__pycache__") == ["tandem"], root


def _tree_packages() -> set[str]:
    """Every folder under a source root's tandem/ that holds Python modules, as a dotted name."""
    packages: set[str] = set()
    for root in SOURCE_ROOTS:
        base = REPO_ROOT / root
        for module in base.rglob("*.py"):
            packages.add(".".join(module.parent.relative_to(base).parts))
    return packages


def test_pyproject_lists_exactly_the_packages_of_the_tree() -> None:
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(config["packages"]) == _tree_packages()
    assert config["package-dir"] == {
        "tandem": "services/tandem",
        "tandem.kernels": "kernels/tandem/kernels",
        "tandem.loadtest": "loadtest/tandem/loadtest",
    }


@pytest.mark.slow
def test_the_wheel_installs_one_top_level_import_package_tandem(tmp_path: Path) -> None:
    # build from a copy of the sources, so that setuptools' build/ folder starts empty
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in (*SOURCE_ROOTS, "proto"):
        shutil.copytree(REPO_ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, source / name)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("tandem-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"tandem"}
    assert "tandem/__init__.py" not in names  # a PEP 420 namespace
    assert "tandem/__main__.py" in names
    assert "tandem/kernels/reference.py" in names
    assert "tandem/loadtest/workloads/smoke.yaml" in names
    assert "tandem/common/pb/tandem_pb2.py" in names
    packaged = {".".join(Path(n).parent.parts) for n in names if n.endswith(".py")}
    assert packaged == _tree_packages()
