"""DESIGN.md's one-way import rule across the rooms (`server -> engine -> spec -> model -> kernels`, `disagg ->
engine`, the server hosting disagg's routes), no import cycle between any two modules, and no module importing
another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("server", "disagg", "engine", "spec", "model", "kernels")
# each room -> the rooms it may import (everything below it)
MAY_IMPORT = {
    "kernels": set(),
    "model": {"kernels"},
    "spec": {"model", "kernels"},
    "engine": {"spec", "model", "kernels"},
    "disagg": {"engine", "spec", "model", "kernels"},
    "server": {"disagg", "engine", "spec", "model", "kernels"},
}


def sources(root: Path) -> dict[str, Path]:
    """module name -> file, for every module of the rooms under root."""
    found = {}
    for room in ROOMS:
        for path in sorted((root / room).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, names imported from it, line) for each import of a room in the file, function-level ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import (the project imports absolutely)"
            found.append((node.module or "", [a.name for a in node.names], node.lineno))
    return [f for f in found if f[0].split(".")[0] in ROOMS]


def upward_imports(src: dict[str, Path]) -> list[str]:
    bad = []
    for module, path in src.items():
        room = module.split(".")[0]
        for target, _, line in imports(path):
            other = target.split(".")[0]
            if other != room and other not in MAY_IMPORT[room]:
                bad.append(f"{path}:{line}: {room} imports {target}")
    return bad


def import_cycle(src: dict[str, Path]) -> list[str] | None:
    """One cycle of module imports (its modules, the first repeated at the end), or None."""
    graph: dict[str, set[str]] = {}
    for module, path in src.items():
        deps: set[str] = set()
        for target, names, _ in imports(path):
            # `from engine import llm` imports the module engine.llm; `from engine import LLM` the package
            subs = {f"{target}.{n}" for n in names} & src.keys()
            deps |= subs or ({target} & src.keys())
        graph[module] = deps - {module}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return [*path[path.index(module):], module]
        if module in done:
            return None
        for dep in sorted(graph[module]):
            if cycle := visit(dep, [*path, module]):
                return cycle
        done.add(module)
        return None

    return next((c for c in map(lambda m: visit(m, []), sorted(graph)) if c), None)


def private_imports(src: dict[str, Path]) -> list[str]:
    bad = []
    for module, path in src.items():
        for target, names, line in imports(path):
            if target != module:
                bad += [f"{path}:{line}: {target}.{n}" for n in names if n.startswith("_")]
    return bad


def test_rooms_import_only_the_rooms_below_them() -> None:
    bad = upward_imports(sources(ROOT))
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_modules() -> None:
    cycle = import_cycle(sources(ROOT))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_module_imports_another_modules_private_names() -> None:
    bad = private_imports(sources(ROOT))
    assert not bad, "\n".join(bad)


def test_the_checks_find_each_kind_of_violation(tmp_path: Path) -> None:
    files = {
        "kernels/__init__.py": "",
        "kernels/a.py": "from kernels.b import _helper\n",
        "kernels/b.py": "def f():\n    import model.m\n",  # upward, inside a function
        "model/__init__.py": "from model import m\n",
        "model/m.py": "from model import MODEL\n",  # m -> the package -> m
        "engine/__init__.py": "from engine.llm import LLM\n",
        "engine/llm.py": "import kernels.a\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    src = sources(tmp_path)
    assert [b.split(": ", 1)[1] for b in upward_imports(src)] == ["kernels imports model.m"]
    cycle = import_cycle(src)
    assert cycle is not None and set(cycle) == {"model", "model.m"} and cycle[0] == cycle[-1] and len(cycle) == 3
    assert [b.split(": ", 1)[1] for b in private_imports(src)] == ["kernels.b._helper"]
    (tmp_path / "model/m.py").write_text("import kernels\n")  # the cycle broken
    assert import_cycle(sources(tmp_path)) is None
