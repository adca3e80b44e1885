"""The package's layout holds: no import cycles between modules, `core/` stays pure (tensors
only: no Ray, vLLM, DeepSpeed or I/O-bound package, nothing from the rest of odpo_vllm), and the
packages sit on floors (docs/architecture.md, "Layers"): a module imports only from its own floor
and the floors below it, counting the imports inside functions, and no two packages import each
other."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "odpo_vllm"

# The floors, bottom first. A unit is a subpackage (`sampling`) or a module at the top of the
# package (`data`); `odpo_vllm` is the package's own __init__. A module imports only units of its
# own floor or of a floor below. docs/architecture.md draws the same floors (checked below).
LAYERS = [
    ("core", "primitives", "models", "multimodal", "validation", "data"),  # 0: the ground: no roles
    ("weights",),  # 1: what the learners send and the engines load, both ends' wire
    ("sampling",),  # 2
    ("rewards",),  # 3
    ("learning",),  # 4
    ("runtime",),  # 5: placements, engine pool, resources, weight publishers: builds and drives the roles
    ("run",),  # 6: checkpoints, evaluation, log files, plots
    ("config", "config_checks", "trainer", "train", "serve", "demo", "toy", "real_demo", "real_task", "doctor",
     "odpo_vllm"),  # 7: the trainer, its config, the entry points (doctor: checks a run's path before it runs)
]
FLOOR = {unit: floor for floor, units in enumerate(LAYERS) for unit in units}


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
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


# ------------------------------------------------------------------------------------- floors
def _unit_of_module(name: str) -> str:
    """`odpo_vllm.sampling.pipeline` -> `sampling`; `odpo_vllm.data` -> `data`; `odpo_vllm` -> itself."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _units() -> set[str]:
    """Every subpackage and top-level module of the package, and the package itself."""
    return {_unit_of_module(name) for name in _modules()}


def _unit_imports(package: Path = PACKAGE):
    """(file, line, imported module, importing unit, imported unit) for every import of another
    unit anywhere in a module: at module level, inside functions or under `if TYPE_CHECKING`."""
    root = package.parent
    modules = {_module_name(path, root) for path in package.rglob("*.py")}
    found = []
    for path in sorted(package.rglob("*.py")):
        name = _module_name(path, root)
        unit = _unit_of_module(name)
        own_package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = own_package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                # `from odpo_vllm import multimodal`, `from odpo_vllm.run import checkpoint`: the module
                targets = list(dict.fromkeys(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                                             for alias in node.names))
            else:
                continue
            for target in targets:
                if target.split(".")[0] != package.name:
                    continue
                other = _unit_of_module(target)
                if other != unit:
                    found.append((path.relative_to(root), node.lineno, target, unit, other))
    return found


def _upward(imports) -> list[str]:
    """The imports that reach a higher floor, each as `file:line imports module: unit (floor n) may
    not import other (floor m, above it)`."""
    return [f"{path}:{line} imports {target}: {unit} (floor {FLOOR[unit]}) may not import {other} (floor "
            f"{FLOOR[other]}, above it)" for path, line, target, unit, other in imports
            if FLOOR.get(other, -1) > FLOOR.get(unit, len(LAYERS))]


def test_every_unit_has_a_floor():
    placed = [unit for units in LAYERS for unit in units]
    assert len(placed) == len(set(placed)), "a unit on two floors in LAYERS"
    missing = sorted(_units() - set(placed))
    assert not missing, f"{', '.join(missing)}: not on any floor; add it to LAYERS here and to docs/architecture.md"
    gone = sorted(set(placed) - _units())
    assert not gone, f"{', '.join(gone)}: in LAYERS but not in the package"


def test_imports_go_down_the_floors():
    upward = _upward(_unit_imports())
    assert not upward, "imports up the floors (docs/architecture.md, Layers):\n" + "\n".join(upward)


def test_no_import_loop_between_packages():
    """Imports inside functions count: a lazy import hides a loop from the module-level test only."""
    graph: dict[str, set[str]] = {unit: set() for unit in _units()}
    where: dict[tuple[str, str], str] = {}
    for path, line, target, unit, other in _unit_imports():
        graph[unit].add(other)
        where.setdefault((unit, other), f"{path}:{line} imports {target}")
    cycle = _find_cycle(graph)
    assert cycle is None, "import loop between packages: " + "; ".join(
        where[edge] for edge in zip(cycle, cycle[1:]))


def test_floor_checks_catch_an_upward_import():
    """The checks see an import from a lower floor to a higher one and a loop, wherever they are."""
    imports = [(Path("odpo_vllm/sampling/x.py"), 3, "odpo_vllm.runtime.engine_pool", "sampling", "runtime"),
               (Path("odpo_vllm/runtime/y.py"), 5, "odpo_vllm.sampling.pipeline", "runtime", "sampling")]
    assert _upward(imports) == ["odpo_vllm/sampling/x.py:3 imports odpo_vllm.runtime.engine_pool: sampling "
                                "(floor 2) may not import runtime (floor 5, above it)"]
    assert _find_cycle({"sampling": {"runtime"}, "runtime": {"sampling"}}) == ["runtime", "sampling", "runtime"]


def test_architecture_page_draws_the_same_floors():
    """docs/architecture.md's Layers block: a line per floor, `n  ...` (indented lines go on),
    naming its units."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("## Layers", 1)[1].split("```", 2)[1]
    drawn: dict[int, set[str]] = {}
    floor = None
    for line in block.splitlines():
        words = line.replace("/", " ").replace(",", " ").replace("(", " ").replace(")", " ").split()
        if words and words[0].isdigit():
            floor = int(words[0])
            drawn[floor] = set(words[1:])
        elif words and floor is not None:
            drawn[floor] |= set(words)
    assert sorted(drawn) == list(range(len(LAYERS))), f"floors drawn: {sorted(drawn)}"
    for floor, units in enumerate(LAYERS):
        absent = [unit for unit in units if unit not in drawn[floor] and f"{unit}.py" not in drawn[floor]]
        assert not absent, f"docs/architecture.md, floor {floor}: {', '.join(absent)} not drawn there"
