"""The package's layout holds: no import cycles between modules, and `core/` stays pure (tensors
only: no Ray, vLLM, DeepSpeed or I/O-bound package, nothing from the rest of odpo_vllm)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "odpo_vllm"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """The modules `path` imports (absolute names), at module level or anywhere."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return found


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_module_level_import_cycles():
    modules = _modules()
    graph = {name: {m for m in _imports(path, top_level_only=True) if m in modules and m != name}
             for name, path in modules.items()}
    # a package's __init__ runs before its modules: importing `odpo_vllm.x.y` imports `odpo_vllm.x`
    for name in modules:
        parent = name.rpartition(".")[0]
        while parent:
            graph[name].add(parent) if parent in modules and parent != name else None
            parent = parent.rpartition(".")[0]
    # the top package imports the trainer, which imports everything: only its own edges count
    graph = {name: {m for m in edges if m != "odpo_vllm"} for name, edges in graph.items()}
    assert _find_cycle(graph) is None, f"import cycle: {' -> '.join(_find_cycle(graph))}"


def test_core_is_pure():
    forbidden = ("ray", "vllm", "deepspeed", "transformers", "datasets")
    for path in (PACKAGE / "core").glob("*.py"):
        for module in _imports(path, top_level_only=False):
            root = module.split(".")[0]
            assert root not in forbidden, f"{path.name} imports {module}"
            if root == "odpo_vllm":
                assert module.startswith("odpo_vllm.core"), f"{path.name} imports {module}: core/ stands alone"
