"""A generated module's source as its top-level statements ("units"), for the passes that run on the whole module.

A generated module is about half a megabyte of Python, most of it the project's runtime (the same in every
module). The passes after printing (`specialize`, `module._prune`, the name and kernel checks) each needed the
whole module's AST; parsing and walking it five times was most of a compile's time (about 8 of 10 s per spec,
2026-12-02). Split into units, the runtime's pieces are parsed once per process (`split_units` caches by text)
and each pass reads or replaces units: folding one runtime function re-parses that function only.

A unit is whole lines of the source: one top-level statement with its decorators (`nodes` holds it; two only
when they share a line), or the comments and blank lines between statements (`nodes` empty). Joining the units'
texts gives the source back exactly.
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass

_LINE = re.compile(r"[^\n]*\n|[^\n]+\Z")  # a line with its newline (only "\n" ends a line for the parser too)


@dataclass(frozen=True, eq=False)
class Unit:
    """Whole lines of a module's source: its top-level statements `nodes` (their line numbers count from this
    unit's first line), or none for comments and blank lines."""

    text: str
    nodes: tuple[ast.stmt, ...]

    @functools.cached_property
    def defines(self) -> tuple[str, ...]:
        """The names the unit's statements bind at the top level (functions, classes, assignments' targets)."""
        return tuple(name for node in self.nodes for name in defined_names(node))

    @functools.cached_property
    def reads(self) -> frozenset[str]:
        """Every name the unit's statements mention, in any scope (what keeps a definition alive in `_prune`)."""
        return frozenset(n.id for node in self.nodes for n in ast.walk(node) if isinstance(n, ast.Name))

    @property
    def function(self) -> ast.FunctionDef | None:
        """The unit's statement when it is one function definition."""
        if len(self.nodes) == 1 and isinstance(self.nodes[0], ast.FunctionDef):
            return self.nodes[0]
        return None


def defined_names(node: ast.stmt) -> list[str]:
    """The names a top-level statement defines: a function's or class's name, an assignment's targets."""
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    return []


@functools.lru_cache(maxsize=128)
def split_units(text: str) -> tuple[Unit, ...]:
    """`units_of(text)`, cached: the runtime's pieces, the same text in every module, are parsed once per process.
    The units and their AST nodes are shared between callers: read them, never edit them."""
    return units_of(text)


def units_of(text: str) -> tuple[Unit, ...]:
    """`text` (Python source of whole statements) as units. Raises SyntaxError when it does not parse."""
    lines = _LINE.findall(text)
    tree = ast.parse(text)
    spans: list[list] = []  # [first line, end line (exclusive), nodes], 0-based
    for node in tree.body:
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
        if spans and first < spans[-1][1]:  # shares a line with the statement before (`a = 1; b = 2`)
            spans[-1][1] = max(spans[-1][1], node.end_lineno)
            spans[-1][2].append(node)
        else:
            spans.append([first, node.end_lineno, [node]])
    units, at = [], 0
    for first, end, nodes in spans:
        if first > at:
            units.append(Unit("".join(lines[at:first]), ()))
        if first:
            for node in nodes:
                ast.increment_lineno(node, -first)
        units.append(Unit("".join(lines[first:end]), tuple(nodes)))
        at = end
    if at < len(lines):
        units.append(Unit("".join(lines[at:]), ()))
    return tuple(units)


def joined(units) -> str:
    """The source the units make up."""
    return "".join(u.text for u in units)
