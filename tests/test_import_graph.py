"""The library's shape: no import circle between owl_jax modules (function-local imports included,
which hide a circle from Python but not from a reader), the demo above the library (never imported by
it), and no module too long to read."""
import ast
import os

from conftest import REPO

PACKAGE = os.path.join(REPO, "owl_jax")
MAX_LINES = 450


def _modules() -> dict[str, str]:
    """{dotted module name: file path} for every module of owl_jax."""
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                parts = os.path.relpath(path, REPO)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                out[".".join(parts)] = path
    return out


def _imports(path: str, module: str, modules: dict[str, str]) -> set[str]:
    """The owl_jax modules `module` imports anywhere in its file."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules and name != module)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_circle():
    modules = _modules()
    graph = {m: _imports(p, m, modules) for m, p in modules.items()}
    assert "owl_jax.models.owl" in graph["owl_jax.training.trainer"]  # the graph sees imports at all
    # A package's __init__ that re-exports its modules is not a circle with them.
    for module in graph:
        graph[module] = {m for m in graph[module] if not module.startswith(m + ".")}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_library_never_imports_the_demo():
    modules = _modules()
    assert "owl_jax.demo.scenes" in _imports(modules["owl_jax.demo.dataset"], "owl_jax.demo.dataset", modules)
    upward = {m: sorted(d for d in _imports(p, m, modules) if d == "owl_jax.demo" or d.startswith("owl_jax.demo."))
              for m, p in modules.items() if not m.startswith("owl_jax.demo")}
    assert not {m: d for m, d in upward.items() if d}


def test_a_circle_is_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_over_450_lines():
    long = {
        os.path.relpath(p, REPO): n for p in _modules().values() if (n := len(open(p).read().splitlines())) > MAX_LINES
    }
    assert not long, long
