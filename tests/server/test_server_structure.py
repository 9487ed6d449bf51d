"""The server package's import structure (#18 item 7): route modules share the serving layer and never import
each other, and server/ has no import cycle (cli -> launch, never back)."""

from __future__ import annotations

import ast
from pathlib import Path

SERVER = Path(__file__).resolve().parents[2] / "server"
ROUTE_MODULES = {"openai_api", "anthropic_api", "responses_api"}


def server_imports() -> dict[str, set[str]]:
    """module -> the server modules it imports (anywhere in the file, function-level imports included)."""
    graph: dict[str, set[str]] = {}
    for path in SERVER.glob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("server."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("server.")}
        graph[path.stem] = deps
    return graph


def test_route_modules_do_not_import_each_other():
    graph = server_imports()
    assert ROUTE_MODULES <= set(graph)
    for module in ROUTE_MODULES:
        assert not graph[module] & ROUTE_MODULES, (module, graph[module] & ROUTE_MODULES)


def test_server_has_no_import_cycle():
    graph = server_imports()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, " -> ".join([*path, module])
        if module in done:
            return
        for dep in sorted(graph.get(module, ())):
            visit(dep, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
