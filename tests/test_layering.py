"""The layering check: the data path runs one way, and no two modules import each other.

    common < envs < datasets < policy < rollout < run_policy.py

A module may import from its own layer or a lower one (`common`, the ground floor, imports none of
ours). Every import counts, module-level or inside a function, except those under `if TYPE_CHECKING:`
(they never run). Cycles are found between modules (a package's `__init__` is the module `pkg`), so a
lazy import that closes a circle fails too.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

from tests.helpers import ROOT

LAYERS = {"common": 0, "envs": 1, "datasets": 2, "policy": 3, "rollout": 4, "run_policy": 5}


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for every module of our packages and run_policy.py."""
    found = {"run_policy": root / "run_policy.py"}
    for pkg in LAYERS:
        base = root / pkg
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module of ours, line) for every import in the file, resolved to the deepest module
    that exists: `from envs import experts` is envs.experts, `from envs.scene import X` is envs.scene."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[tuple[str, int]] = []

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] in LAYERS and (m := resolve(alias.name)):
                        out.append((m, child.lineno))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                if mod.split(".")[0] not in LAYERS:
                    continue
                for alias in child.names:
                    m = resolve(f"{mod}.{alias.name}") if f"{mod}.{alias.name}" in modules else resolve(mod)
                    if m:
                        out.append((m, child.lineno))
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return [(m, line) for m, line in out if m != name]


def import_graph(root: Path = ROOT) -> dict[str, dict[str, int]]:
    modules = module_files(root)
    graph: dict[str, dict[str, int]] = defaultdict(dict)
    for name, path in modules.items():
        graph[name]
        for target, line in imports_of(name, path, modules):
            graph[name].setdefault(target, line)
    return graph


def layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def upward_imports(graph: dict[str, dict[str, int]], modules: dict[str, Path], root: Path = ROOT) -> list[str]:
    return [f"{modules[src].relative_to(root)}:{line}: {src} (layer {src.split('.')[0]}) imports {dst} "
            f"(layer {dst.split('.')[0]}), which is above it"
            for src, targets in sorted(graph.items()) for dst, line in sorted(targets.items())
            if layer(dst) > layer(src)]


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def describe_cycle(comp: list[str], graph: dict[str, dict[str, int]]) -> str:
    members = set(comp)
    edges = [f"{a} -> {b} (line {graph[a][b]})" for a in comp for b in sorted(graph[a]) if b in members]
    return "import cycle between " + ", ".join(comp) + ": " + "; ".join(edges)


def test_no_import_runs_up_the_data_path():
    modules = module_files()
    assert len(modules) > 40  # the walk found the packages
    bad = upward_imports(import_graph(), modules)
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_modules():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "\n".join(describe_cycle(c, graph) for c in found)


def test_the_ground_floor_imports_nothing_of_ours():
    graph = import_graph()
    bad = {m: sorted(t) for m, t in graph.items() if m.split(".")[0] == "common" and any(
        x.split(".")[0] != "common" for x in t)}
    assert not bad


# The checker itself, on a small tree written here: it must see what it claims to see.
def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    (tmp_path / "run_policy.py").touch()
    return tmp_path


def test_the_check_names_both_ends_of_an_upward_import_and_a_cycle(tmp_path):
    root = _tree(tmp_path, {
        "common/__init__.py": "",
        "envs/__init__.py": "",
        "envs/a.py": "def f():\n    from rollout.b import g\n",  # lazy, still counted
        "envs/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from rollout.b import g\n",
        "datasets/__init__.py": "",
        "datasets/x.py": "from datasets import y\n",
        "datasets/y.py": "def f():\n    from datasets.x import z\n",
        "policy/__init__.py": "",
        "rollout/__init__.py": "",
        "rollout/b.py": "import envs.a\n",
    })
    modules = module_files(root)
    graph = import_graph(root)
    assert graph["envs.a"] == {"rollout.b": 2} and graph["envs.c"] == {}  # TYPE_CHECKING ignored
    assert graph["datasets.x"] == {"datasets.y": 1}  # `from pkg import submodule` is the submodule
    assert upward_imports(graph, modules, root) == [
        "envs/a.py:2: envs.a (layer envs) imports rollout.b (layer rollout), which is above it"]
    assert sorted(map(tuple, cycles(graph))) == [("datasets.x", "datasets.y"), ("envs.a", "rollout.b")]
    assert "datasets.x -> datasets.y (line 1)" in describe_cycle(["datasets.x", "datasets.y"], graph)


@pytest.mark.parametrize("pkg", sorted(set(LAYERS) - {"run_policy"}))
def test_every_layer_is_a_package_here(pkg):
    assert (ROOT / pkg / "__init__.py").is_file()
