"""The import graph of the `tandem` namespace keeps the layers of DESIGN.md section 3.

- `common` and `kernels` are leaves: they import nothing else from the project.
- `engine` sits above them, then `kvtransfer`, then `worker`, then `prefill` / `decode`.
- `scheduler` sits below `gateway`.
- Nothing imports `cli`; only `cli` imports `loadtest`. Only the entry points (`cli`, `loadtest`)
  import the gateway service; the launcher reads just its frozen config (`tandem.gateway.config`)
  to build the gateway child's configuration, and that module stays free of the HTTP app.
- No cycles between packages, and none between modules.

Every import counts, including those inside functions and under `TYPE_CHECKING`: a lazy import
is still a dependency.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCE_ROOTS = ("services", "kernels", "loadtest")

# package -> the packages it may import (besides itself)
ALLOWED: dict[str, frozenset[str]] = {
    "common": frozenset(),
    "kernels": frozenset(),
    "engine": frozenset({"common", "kernels"}),
    "kvtransfer": frozenset({"common", "kernels", "engine"}),
    "worker": frozenset({"common", "kernels", "engine", "kvtransfer"}),
    "prefill": frozenset({"common", "kernels", "engine", "kvtransfer", "worker"}),
    "decode": frozenset({"common", "kernels", "engine", "kvtransfer", "worker"}),
    "scheduler": frozenset({"common"}),
    # the gateway tokenizes (engine's tokenizer and chat template, torch-free) and routes
    "gateway": frozenset({"common", "engine", "scheduler"}),
    "autoscaler": frozenset({"common"}),
    # `tandem up` composes the cluster: it builds each child's config from the worker and gateway
    # config templates (only `tandem.gateway.config`: see the test below), starts the children as
    # processes (argv, not imports), and runs an autoscaler
    "launcher": frozenset({"common", "engine", "kvtransfer", "worker", "scheduler", "gateway", "autoscaler"}),
    "sim": frozenset({"common", "scheduler", "autoscaler"}),
}
# entry points: cli (and `python -m tandem`) may import anything, loadtest anything but cli
TOP = {"cli", "__main__", "loadtest"}


def _modules() -> Iterator[tuple[str, Path]]:
    for root in SOURCE_ROOTS:
        base = REPO_ROOT / root
        for path in sorted(base.rglob("*.py")):
            if "pb" in path.relative_to(base).parts:  # generated stubs
                continue
            parts = path.relative_to(base).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts), path


def _imports(module: str, path: Path) -> set[str]:
    """Dotted names of the tandem modules that `module` imports."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; the project imports absolutely"
            name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "tandem" or name.startswith("tandem.")}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in _modules():
        source = _package(module)
        targets = {_package(name) for name in _imports(module, path)}
        graph.setdefault(source, set()).update(t for t in targets if t and t != source)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_package_is_in_the_layer_table() -> None:
    packages = {_package(module) for module, _ in _modules()} - {""}
    assert packages - TOP - set(ALLOWED) == set()


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_the_layers_below_it(package: str) -> None:
    imported = _package_graph().get(package, set())
    assert sorted(imported - ALLOWED[package]) == []


def test_nothing_imports_cli_and_only_entry_points_import_gateway_and_loadtest() -> None:
    graph = _package_graph()
    assert sorted(p for p, targets in graph.items() if "cli" in targets) == ["__main__"]
    assert sorted(p for p, targets in graph.items() if "loadtest" in targets) == ["cli"]
    assert sorted(p for p, targets in graph.items() if "gateway" in targets) == ["cli", "launcher", "loadtest"]


def test_outside_the_entry_points_only_the_gateway_config_is_imported() -> None:
    modules = dict(_modules())
    outside = {
        name
        for module, path in modules.items()
        if _package(module) not in TOP | {"gateway"}
        for name in _imports(module, path)
        if _package(name) == "gateway"
    }
    # `from tandem.gateway.config import X` names the module and `tandem.gateway.config.X`
    imported = {name if name == "tandem.gateway.config" else name.rpartition(".")[0] for name in outside}
    assert imported == {"tandem.gateway.config"}
    config_imports = {_package(name) for name in _imports("tandem.gateway.config", modules["tandem.gateway.config"])}
    limits_imports = {_package(name) for name in _imports("tandem.gateway.limits", modules["tandem.gateway.limits"])}
    assert config_imports | limits_imports <= {"common", "scheduler", "gateway"}
    assert (
        _imports("tandem.gateway.config", modules["tandem.gateway.config"])
        & {f"tandem.gateway.{m}" for m in ("app", "server", "pipeline", "serving")}
        == set()
    )


def test_no_cycles_between_packages() -> None:
    assert _cycles(_package_graph()) == []


def test_no_cycles_between_modules() -> None:
    modules = dict(_modules())
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = set()
        for name in _imports(module, path):
            # `from tandem.x import y` names either module tandem.x.y or attribute y of tandem.x
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):
                targets.add(name)
        graph[module] = targets
    assert _cycles(graph) == []


def test_the_layer_checker_sees_a_cycle_and_a_violation() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
