"""dvc.yaml's code deps, written from the table of what each stage runs (``knowsam/pipeline.py``).

``write`` replaces each stage's ``deps:`` by its other deps (data, as written by hand and in their
order), one a line, then the stage's code from the table, packed; the rest of dvc.yaml (comments,
cmd, params, outs) keeps its bytes. ``check`` names each stage whose code deps differ from the
table. No stage executes this module, so editing it marks no result out of date.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from knowsam import fileio, pipeline
from knowsam.errors import KnowsamError

CODE_ROOTS = ("knowsam/", "stages/")  # a dep under these is code (the table's); any other is data
WIDTH = 120  # the code lines' length, as the package's (pyproject.toml [tool.ruff])
WRITE_HINT = "run `knowsam-bench pipeline --write` (after editing knowsam/pipeline.py if dvc.yaml was right)"


def is_code(dep: str) -> bool:
    return dep.startswith(CODE_ROOTS)


@dataclass(frozen=True)
class Deps:
    """One stage's ``deps:`` in dvc.yaml: its entries and where ``deps: ...`` lies in the text."""

    stage: str
    entries: tuple[str, ...]
    start: int  # the `deps` key
    end: int  # just after the last entry (or the closing bracket)
    column: int  # of the `deps` key


def _value(node: yaml.Node, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    """(key node, value node) of ``key`` in a mapping node, or None."""
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if k.value == key:
                return k, v
    return None


def read_deps(text: str, source: Path) -> list[Deps]:
    """Every stage's deps in dvc.yaml's text, in the file's order (a foreach stage's are under ``do``)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise KnowsamError(f"{source}: not valid YAML ({' '.join(str(exc).split())})") from exc
    stages = _value(root, "stages")
    if stages is None or not isinstance(stages[1], yaml.MappingNode):
        raise KnowsamError(f"{source}: no 'stages' mapping")
    found = []
    for name_node, body in stages[1].value:
        stage = name_node.value
        body = (_value(body, "do") or (None, body))[1]
        deps = _value(body, "deps")
        if deps is None or not isinstance(deps[1], yaml.SequenceNode) or not deps[1].value:
            raise KnowsamError(f"{source}: stage '{stage}' has no list of deps")
        key, seq = deps
        end = seq.end_mark.index if seq.flow_style else seq.value[-1].end_mark.index
        entries = tuple(item.value for item in seq.value)
        found.append(Deps(stage, entries, key.start_mark.index, end, key.start_mark.column))
    return found


def _packed(items: tuple[str, ...], width: int) -> list[str]:
    """``items`` joined by ", " into lines of at most ``width`` characters (each line ends with a comma)."""
    lines = [f"{items[0]},"]
    for item in items[1:]:
        if len(lines[-1]) + len(item) + 2 > width:
            lines.append(f"{item},")
        else:
            lines[-1] += f" {item},"
    return lines


def render(deps: Deps) -> str:
    """``deps: [...]``: the stage's other deps one a line (quoted: they hold ${...}), then its code packed."""
    indent = " " * (deps.column + 2)
    lines = [json.dumps(d) + "," for d in deps.entries if not is_code(d)]
    lines += _packed(pipeline.stage_code(deps.stage), WIDTH - len(indent))
    return "deps: [\n" + "\n".join(indent + line for line in lines)[:-1] + "]"


def _read(path: Path) -> tuple[str, list[Deps]]:
    """dvc.yaml's text and its stages' deps, after checking that its stages are the table's."""
    if not path.is_file():
        raise KnowsamError(f"{path}: no such file (run from the repository root, or give --file)")
    text = path.read_text(encoding="utf-8")
    found = read_deps(text, path)
    names = [d.stage for d in found]
    unlisted = [s for s in names if s not in pipeline.STAGES]
    absent = [s for s in pipeline.STAGES if s not in names]
    if unlisted or absent:
        raise KnowsamError(
            f"{path}: its stages and those of knowsam/pipeline.py differ (only in {path}: {unlisted or 'none'}; "
            f"only in the table: {absent or 'none'}); a stage is added to both by hand"
        )
    return text, found


def generated(text: str, found: list[Deps], source: Path) -> str:
    """dvc.yaml's text with every stage's deps written from the table."""
    for deps in reversed(found):  # from the end, so the earlier spans keep their offsets
        written = text[deps.start : deps.end]
        if any(line.lstrip().startswith("#") or " #" in line for line in written.splitlines()):
            raise KnowsamError(
                f"{source}: stage '{deps.stage}' has a comment inside its deps, which writing them would "
                "drop; move it above `deps:`"
            )
        text = text[: deps.start] + render(deps) + text[deps.end :]
    return text


def write(path: Path) -> str:
    """Write ``path``'s code deps from the table (atomically; nothing when they already agree)."""
    text, found = _read(path)
    new = generated(text, found, path)
    if new == text:
        return f"{path}: code deps already as in knowsam/pipeline.py"
    fileio.write_text(path, new)
    return f"{path}: code deps written from knowsam/pipeline.py"


def _difference(deps: Deps) -> str | None:
    """How a stage's code deps differ from the table, or None."""
    listed, table = {d for d in deps.entries if is_code(d)}, set(pipeline.stage_code(deps.stage))
    parts = []
    if missing := sorted(table - listed):
        parts.append(f"missing {', '.join(missing)}")
    if extra := sorted(listed - table):
        parts.append(f"not in the table: {', '.join(extra)}")
    return f"stage '{deps.stage}' ({'; '.join(parts)})" if parts else None


def check(path: Path) -> str:
    """One line saying the code deps agree with the table; a ``KnowsamError`` naming each stage where they do not."""
    text, found = _read(path)
    if differences := [d for d in map(_difference, found) if d]:
        raise KnowsamError(f"{path}: code deps differ from knowsam/pipeline.py: {'; '.join(differences)}; {WRITE_HINT}")
    if generated(text, found, path) != text:
        raise KnowsamError(
            f"{path}: code deps agree with knowsam/pipeline.py but not in the written order and layout; {WRITE_HINT}"
        )
    return f"{path}: code deps of {len(found)} stages agree with knowsam/pipeline.py"
