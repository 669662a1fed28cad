"""The package's shape, read from its source with ``ast`` (nothing is imported):

- no import circle: no two modules import each other, directly or around a loop
  (imports inside functions count: a lazy import only hides a circle);
- no package module loads a file from ``tests/``;
- vLLM is imported only by the two modules that hold the plugin's vLLM coupling, and by
  the short, documented allow-list below.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# setup.py installs kernels/ and configs/ inside the package, under these names.
SOURCES = {"headkv_vllm": ROOT / "headkv_vllm", "headkv_vllm.kernels": ROOT / "kernels",
           "headkv_vllm.configs": ROOT / "configs"}

# Where the plugin reaches into vLLM (a vLLM upgrade starts there).
VLLM_MODULES = {"headkv_vllm.engine.vllm_patches", "headkv_vllm.engine.vllm_access"}
# Other modules that may import vLLM, and why. Tools that merely run `vllm serve` as a
# process import nothing from vLLM and need no entry.
VLLM_ALLOWED = {
    "headkv_vllm.tools.sim.vllm_sim": "`headkv-vllm sched-sim` builds vLLM's scheduler without a model, "
                                      "as vLLM's own scheduler tests do; the engine never loads it",
}


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module the installed package has."""
    out = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if package == "headkv_vllm" and parts[0] in ("kernels", "configs"):
                continue  # not there in the source tree; the mapped folders above are
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


MODULES = module_files()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def imported_names(name: str) -> list[tuple[str, int]]:
    """(dotted name, line) of everything ``name``'s source imports, at any depth;
    relative imports resolved; ``from a import b`` gives ``a.b`` when that is a module."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    package = name if _is_package(name) else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            out += [(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base, node.lineno)
                    for alias in node.names]
    return out


def _own_module(dotted: str) -> str | None:
    """The package module ``dotted`` names (its longest known prefix), None outside the package."""
    while dotted and dotted not in MODULES:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {module of the package it imports: the line of its first import}."""
    graph = {}
    for name in MODULES:
        edges = graph[name] = {}
        for dotted, line in imported_names(name):
            target = _own_module(dotted)
            if target is not None and target != name:
                edges.setdefault(target, line)
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively."""
    index, low, on_stack, stack, comps, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    comp.append(member)
                    if member == node:
                        break
                comps.append(sorted(comp))
    return comps


def a_cycle(graph: dict[str, dict[str, int]], comp: list[str]) -> str:
    """One loop through ``comp``'s first module, each edge with its file and line."""
    start, members = comp[0], set(comp)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in graph[node]:
                if child == start:
                    loop = paths[node] + [start]
                    return " -> ".join(f"{a} ({MODULES[a].relative_to(ROOT)}:{graph[a][b]})"
                                       for a, b in zip(loop, loop[1:])) + f" -> {start}"
                if child in members and child not in paths:
                    paths[child] = paths[node] + [child]
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"no loop through {start}")


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert {"headkv_vllm", "headkv_vllm.engine.plugin", "headkv_vllm.kernels.select_store",
            "headkv_vllm.configs", "headkv_vllm.tools.sim.sched_sim"} <= set(graph)
    # relative and absolute imports both resolve (kernels import each other relatively)
    assert "headkv_vllm.kernels.triton_common" in graph["headkv_vllm.kernels.select_store"]
    assert "headkv_vllm.engine.plugin" in graph["headkv_vllm"]  # a lazy import counts


def test_no_import_circles():
    graph = import_graph()
    circles = [f"{', '.join(comp)}; e.g. {a_cycle(graph, comp)}"
               for comp in strongly_connected(graph) if len(comp) > 1]
    assert not circles, "modules that import each other (break each circle: move the shared piece into a " \
        "module below both, or pass a callable):\n" + "\n".join(circles)


def test_strongly_connected_finds_a_planted_circle():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}}
    assert sorted(map(len, strongly_connected(graph))) == [1, 3]


# Every import is at the module's top unless a comment above it says why it waits; the
# tools are not held to it yet: many defer heavy or optional dependencies (torch,
# transformers, matplotlib) to the command that needs them.
LAZY_IMPORTS_UNCHECKED = "headkv_vllm.tools"


def unexplained_lazy_imports(name: str) -> list[str]:
    """Imports below ``name``'s top level without a comment on their line or right above
    them (above a run of imports, for the whole run). ``if TYPE_CHECKING:`` blocks count as top."""
    path = MODULES[name]
    lines = path.read_text().splitlines()
    tree = ast.parse("\n".join(lines))
    top = {id(n) for n in tree.body}
    top |= {id(n) for node in tree.body if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in node.body}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top:
            continue
        i = node.lineno - 1
        while i > 0 and lines[i - 1].strip().startswith(("import ", "from ")):
            i -= 1
        if "#" not in lines[node.lineno - 1] and not (i > 0 and lines[i - 1].strip().startswith("#")):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    return found


def test_imports_wait_only_with_a_reason():
    found = [line for name in MODULES if not name.startswith(LAZY_IMPORTS_UNCHECKED)
             for line in unexplained_lazy_imports(name)]
    assert not found, ("imports inside functions without a comment saying why (move them to the module's top, "
                       "or say in a comment above why they wait):\n" + "\n".join(found))


# Ways code reaches a file by path: importlib's file loaders, runpy, exec of a file's text.
FILE_LOADERS = {"spec_from_file_location", "SourceFileLoader", "run_path", "load_source", "exec"}
TESTS_PATH = re.compile(r"(^|[/\\])tests([/\\]|$)")


def test_nothing_loads_from_tests():
    found = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if func in FILE_LOADERS:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: calls {func}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings \
                    and TESTS_PATH.search(node.value):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: names {node.value!r}")
        for dotted, line in imported_names(name):
            if dotted == "tests" or dotted.startswith(("tests.", "support.")):
                found.append(f"{path.relative_to(ROOT)}:{line}: imports {dotted}")
    assert not found, "package modules must not load test files (move what they need into the package):\n" + \
        "\n".join(found)


def test_vllm_imported_only_where_allowed():
    assert set(VLLM_ALLOWED).isdisjoint(VLLM_MODULES)
    for name in (*VLLM_MODULES, *VLLM_ALLOWED):
        assert name in MODULES, f"{name} is listed here but does not exist: update the lists"
    found = [f"{MODULES[name].relative_to(ROOT)}:{line}: {dotted}"
             for name in MODULES if name not in VLLM_MODULES and name not in VLLM_ALLOWED
             for dotted, line in imported_names(name) if dotted == "vllm" or dotted.startswith("vllm.")]
    assert not found, ("vLLM is imported outside engine/vllm_access.py and engine/vllm_patches.py: import it "
                       "through vllm_access (or, for a tool, add the module to VLLM_ALLOWED with a reason):\n"
                       + "\n".join(found))


@pytest.mark.parametrize("name", sorted(VLLM_MODULES))
def test_the_vllm_modules_import_vllm(name):
    assert any(d == "vllm" or d.startswith("vllm.") for d, _ in imported_names(name))
