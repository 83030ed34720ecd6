"""The package's shape: imports form a layered graph (no cycle, also through imports inside functions), and
reading a config imports no network library."""

import ast
import os
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "model_collapse"


def import_graph(pkg: Path = PKG) -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its body (module level or inside functions)."""
    mods = {p.stem for p in pkg.glob("*.py")}
    graph = {}
    for p in pkg.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                parts = (node.module or "").split(".")
                if node.level:  # relative: from . import x / from .x import y
                    deps.update([parts[0]] if parts[0] else [a.name for a in node.names])
                elif parts[0] == pkg.name:
                    deps.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith(pkg.name + "."))
        graph[p.stem] = {d for d in deps if d in mods and d != p.stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(n, stack):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d, stack)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n, [])
            if found:
                return found
    return None


def test_the_cycle_finder_finds_cycles_also_inside_functions(tmp_path):
    pkg = tmp_path / "model_collapse"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from model_collapse.b import x\n")
    (pkg / "b.py").write_text("def f():\n    from model_collapse import c\n")
    (pkg / "c.py").write_text("import model_collapse.d\n")
    (pkg / "d.py").write_text("")
    assert find_cycle(import_graph(pkg)) is None
    (pkg / "d.py").write_text("def g():\n    from .a import x\n")
    assert find_cycle(import_graph(pkg)) == ["a", "b", "c", "d", "a"]


def test_package_imports_have_no_cycle():
    graph = import_graph()
    assert {"loop", "measure", "paradigms", "workers", "rundir", "report"} <= set(graph)
    assert find_cycle(graph) is None


def test_reading_a_config_imports_no_network_library():
    code = ("import sys; from model_collapse.config import resolve_config; resolve_config('demo', ['seed=3']); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_registry_name_has_a_builder():
    from model_collapse import diffusion, features, registry, selection

    assert tuple(diffusion._sampler_classes()) == registry.SAMPLERS
    assert tuple(features.SPACES) == registry.SPACES
    assert tuple(selection.SELECTORS) == registry.SELECTORS



def test_the_readme_api_example_runs(tmp_path, rng):
    """README's library example, on files it writes: every name it imports is exported by the package."""
    import re

    import numpy as np

    code = re.search(r"```python\n(from model_collapse import .*?)```",
                     (PKG.parent.parent / "README.md").read_text(), re.S).group(1)
    images = rng.integers(0, 256, size=(1500, 6, 6, 1)).astype(np.uint8)
    np.savez(tmp_path / "pool.npz", images=images)
    np.savez(tmp_path / "train.npz", images=images[:200])
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, "README", "exec"), {})
    finally:
        os.chdir(cwd)
