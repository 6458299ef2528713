"""The one way through: every harness module belongs to a stage (ARCHITECTURE.md), and imports only from
its own stage or earlier ones, so no arrow points back up the pipeline."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

STAGES = [  # in pipeline order; a module may import from its own stage and the ones before it
    ("foundations", {"harness", "errors", "paths", "locks", "digests", "code_identity", "tensors", "metrics",
                     "predictor", "corruptions", "sources", "store", "progress", "provenance"}),
    ("spec", {"spec"}),
    ("inputs", {"zoo", "identity"}),
    ("model pool", {"families", "pool", "moe", "suites"}),
    ("methods", {"registry", "api", "methods"}),
    ("plan", {"planner"}),
    ("fuse and evaluate", {"isolation", "fusion_worker", "evaluate", "uncertainty"}),
    ("run", {"runner", "executors", "validate", "reproduce", "export"}),
    ("present", {"leaderboard", "site", "site_pages"}),
    ("shell", {"ci", "cli"}),
]
STAGE_OF = {name: i for i, (_, names) in enumerate(STAGES) for name in names}


def owner(module: str) -> str:
    """The stage key of a dotted module: harness.families.clip_vision -> 'families', methods.x -> 'methods'."""
    parts = module.split(".")
    if parts[0] == "methods":
        return "methods"
    return parts[1] if len(parts) > 1 else "harness"


def runtime_nodes(tree: ast.AST):
    """Every node but those under `if TYPE_CHECKING:` (imports for annotations only, never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            continue
        yield node
        yield from runtime_nodes(node)


def imports(path: Path) -> set[str]:
    """The harness and methods modules a file imports when it runs (at the top or inside functions)."""
    found = set()
    for node in runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in ("harness", "methods"):
                found.add(node.module)
                if node.module == "harness":  # from harness import registry
                    found.update(f"harness.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] in ("harness", "methods"))
    return found


def modules() -> dict[str, Path]:
    out = {}
    for root in ("harness", "methods"):
        for path in sorted((REPO / root).rglob("*.py")):
            out[".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")] = path
    return out


def test_every_module_has_a_stage():
    assert not sorted({owner(m) for m in modules()} - set(STAGE_OF)), "add the module to a stage (ARCHITECTURE.md)"


def test_no_import_points_back_up_the_pipeline():
    backwards = []
    for module, path in modules().items():
        here = STAGE_OF[owner(module)]
        for target in imports(path):
            there = STAGE_OF.get(owner(target))
            if there is not None and there > here:
                backwards.append(f"{module} ({STAGES[here][0]}) imports {target} ({STAGES[there][0]})")
    assert not backwards, "\n".join(backwards)


def test_no_two_modules_import_each_other():
    """Within a stage too: a cycle means two modules share one job, or one holds what belongs to the other."""
    graph = {m: {t for t in imports(p) if t in modules() and t != m} for m, p in modules().items()}
    cycles = sorted(f"{a} <-> {b}" for a, targets in graph.items() for b in targets if a < b and a in graph.get(b, ()))
    assert not cycles, cycles
