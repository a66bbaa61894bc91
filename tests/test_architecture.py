"""The package's imports run one way: every module sits in a layer of docs/architecture.md and
imports only from its own layer or lower ones, and no chain of imports comes back to where it began.

Imports are read from the source (function-level ones included, since those are how heavy
dependencies are deferred), so the check needs no import of the package itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "knowsam"

# Bottom to top; a module belongs to the first layer with a matching prefix (docs/architecture.md).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "foundation",
        (
            "knowsam",
            "knowsam.errors",
            "knowsam.fileio",
            "knowsam.config",
            "knowsam.machine",
            "knowsam.download",
            "knowsam.distributed",
            "knowsam.step_timing",
            "knowsam.pipeline",
            "knowsam.log",
        ),
    ),
    ("data and measures", ("knowsam.data", "knowsam.dice", "knowsam.metrics", "knowsam.losses")),
    ("models", ("knowsam.models",)),
    ("methods", ("knowsam.methods",)),
    (
        "runs",
        (
            "knowsam.runs",
            "knowsam.run_state",
            "knowsam.validation",
            "knowsam.train",
            "knowsam.evaluate",
            "knowsam.describe",
            "knowsam.embed",
            "knowsam.teacher_check",
            "knowsam.summaries",
        ),
    ),
    ("reports", ("knowsam.report",)),
    (
        "entry points",
        ("knowsam.cli", "knowsam.bench", "knowsam.plan", "knowsam.run_missing", "knowsam.dvc_yaml", "knowsam.__main__"),
    ),
]


def module_files() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> package modules it imports anywhere in its source (``from pkg import module`` included)."""
    mods = module_files()
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names}
        graph[name] = {t for t in targets if t in mods and t != name}
    return graph


def layer_of(module: str) -> int:
    """Index of the module's layer: the longest matching prefix decides (``knowsam`` alone is the package root)."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (prefix != "knowsam" and module.startswith(prefix + "."))
            if matches and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    assert best is not None, f"{module} is in no layer of LAYERS (and docs/architecture.md)"
    return best


def test_every_import_goes_to_the_same_layer_or_below():
    upward = [
        f"{a} ({LAYERS[layer_of(a)][0]}) -> {b} ({LAYERS[layer_of(b)][0]})"
        for a, targets in import_graph().items()
        for b in sorted(targets)
        if layer_of(b) > layer_of(a)
    ]
    assert not upward, "imports running up the layers:\n" + "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_checks_catch_what_they_promise_to():
    """An upward edge and a circle planted in a copy of the real graph are both found."""
    graph = {k: set(v) for k, v in import_graph().items()}
    graph["knowsam.config"].add("knowsam.methods.registry")
    assert layer_of("knowsam.methods.registry") > layer_of("knowsam.config")
    assert find_cycle(graph) is not None  # registry imports config: config -> registry -> config


def test_architecture_document_names_every_layer_and_module():
    text = (REPO / "docs/architecture.md").read_text(encoding="utf-8")
    for name, _ in LAYERS:
        assert f"### {name[0].upper()}{name[1:]}" in text, name
    for module in module_files():
        if module not in ("knowsam", "knowsam.__main__"):
            assert f"`{module.removeprefix('knowsam.')}`" in text, f"docs/architecture.md does not mention {module}"
