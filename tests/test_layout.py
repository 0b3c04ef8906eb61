"""The package layout (DESIGN §1): every module imports in a fresh interpreter, there are no import cycles, and
the layers only import downwards — models/ sees no stage, metric, evaluation, plot or callback code."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PKG = ROOT / "src" / "monosemantic"


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        name = ".".join(p.relative_to(PKG.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports (absolute ``from x import y`` and ``import x``)."""
    mods = modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in mods and t != name}
        graph[name] = deps
    return graph


def test_every_module_imports_in_a_fresh_interpreter():
    """All modules, in sorted and in reverse order, each order in its own interpreter (an import that only
    works once another module was imported first shows up in one of them; a cycle shows up as an error)."""
    names = sorted(modules())
    assert "monosemantic.stages.sae" in names and "monosemantic.data.shards.reader" in names
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\nprint(len(sys.argv) - 1)"
    for order in (names, names[::-1]):
        r = subprocess.run([sys.executable, "-c", code, *order], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.strip() == str(len(names))


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [node, dep]))
            if dep not in state:
                visit(dep, stack + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_layers_import_only_downwards():
    graph = import_graph()
    above_models = ("monosemantic.stages", "monosemantic.evaluation", "monosemantic.metrics", "monosemantic.plots",
                    "monosemantic.callbacks", "monosemantic.export", "monosemantic.activation_cache",
                    "monosemantic.analysis", "monosemantic.steering")
    for name, deps in graph.items():
        if name.startswith("monosemantic.models"):
            assert not [d for d in deps if d.startswith(above_models)], (name, deps)
        if name.startswith(("monosemantic.models", "monosemantic.data", "monosemantic.utils",
                            "monosemantic.metrics", "monosemantic.evaluation", "monosemantic.callbacks",
                            "monosemantic.analysis", "monosemantic.steering", "monosemantic.plots")):
            assert not [d for d in deps if d.startswith("monosemantic.stages")], (name, deps)
        if name.startswith("monosemantic.utils"):  # the bottom layer, with the error classes
            assert all(d.startswith("monosemantic.utils") or d == "monosemantic.errors" for d in deps), (name, deps)
    assert not graph["monosemantic.errors"]  # which import nothing of the package
    # the metric definitions stand alone: no model code in them
    assert not [d for d in graph["monosemantic.metrics"] if d.startswith("monosemantic.models")]


def test_the_check_can_fail(monkeypatch):
    """The cycle finder finds a planted cycle (a test that cannot fail proves nothing)."""
    monkeypatch.setitem(globals(), "import_graph", lambda: {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    with pytest.raises(AssertionError, match="import cycle: a -> b -> c -> a"):
        test_no_import_cycles()


def test_entry_points_stay_thin():
    for entry in ("train.py", "cache_activations.py", "eval.py", "dashboard.py", "steer.py"):
        assert len((ROOT / "src" / entry).read_text().splitlines()) <= 35, entry
