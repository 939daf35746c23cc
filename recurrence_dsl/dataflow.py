"""The dataflow graph of one step (networkx): who reads what, before or after an update.

Nodes are the values of the step: inputs, params, states before (`S@t-1`) and
after (`S@t`) the step, and one node per assignment (`stmt3:u`). An edge
`a -> b` says b's expression reads a. Temporaries that reach no state and no
output are dead and dropped by the analysis (inlining never reads them).
"""

from __future__ import annotations

from pathlib import PurePath

import networkx as nx

from . import syntax as ast
from .check import CheckedRecurrence, SymbolKind


def _reads(expr) -> set[str]:
    found: set[str] = set()

    def walk(e):
        if isinstance(e, (ast.Name, ast.Indexed)):
            found.add(e.name)
        elif isinstance(e, ast.BinOp):
            walk(e.left)
            walk(e.right)
        elif isinstance(e, ast.Neg):
            walk(e.operand)
        elif isinstance(e, ast.Call):
            for a in e.args:
                walk(a)
        elif isinstance(e, ast.Sum):
            walk(e.body)

    walk(expr)
    return found


def build_dataflow(rec: CheckedRecurrence) -> nx.DiGraph:
    """The step's dataflow graph; edge attribute `when` is "before update" or "after update" for state reads."""
    g = nx.DiGraph(name=rec.name)
    for sym in rec.inputs:
        g.add_node(sym.name, kind="input")
    for sym in rec.params:
        g.add_node(sym.name, kind="param")
    current: dict[str, str] = {sym.name: sym.name for sym in rec.inputs + rec.params}
    for sym in rec.states:
        node = f"{sym.name}@t-1"
        g.add_node(node, kind="state", when="t-1")
        current[sym.name] = node
    updated: set[str] = set()
    for stmt in rec.statements:
        node = f"stmt{stmt.index}:{stmt.target.name}"
        g.add_node(node, kind=stmt.target.kind.value, line=stmt.span.line, target=stmt.target.name)
        for name in _reads(stmt.value):
            if name in current:
                when = None
                if rec.symbol(name).kind is SymbolKind.STATE:
                    when = "after update" if name in updated else "before update"
                g.add_edge(current[name], node, when=when)
        current[stmt.target.name] = node
        if stmt.target.kind is SymbolKind.STATE:
            updated.add(stmt.target.name)
    for sym in rec.states:
        g.add_node(f"{sym.name}@t", kind="state", when="t")
        g.add_edge(current[sym.name], f"{sym.name}@t")
    for sym in rec.outputs:
        g.nodes[current[sym.name]]["output"] = True
    return g


def dead_temporaries(graph: nx.DiGraph) -> list[str]:
    """Assignments whose value reaches no state and no output."""
    sinks = {n for n, d in graph.nodes(data=True) if d.get("when") == "t" or d.get("output")}
    dead = []
    for node, data in graph.nodes(data=True):
        if data.get("kind") != SymbolKind.TEMP.value:
            continue
        if not (nx.descendants(graph, node) & sinks):
            dead.append(data["target"])
    return dead


def to_dot(graph: nx.DiGraph) -> str:
    """Graphviz source for the graph (`recdsl show --graph`)."""
    shapes = {"input": "box", "param": "box", "state": "doubleoctagon", "output": "ellipse", "temporary": "ellipse"}
    lines = [f'digraph "{graph.graph.get("name", "step")}" {{', "  rankdir=LR;"]
    for node, data in graph.nodes(data=True):
        shape = shapes.get(data.get("kind"), "ellipse")
        style = ', style=bold' if data.get("output") else ""
        lines.append(f'  "{node}" [shape={shape}{style}];')
    for a, b, data in graph.edges(data=True):
        label = f' [label="{data["when"]}"]' if data.get("when") else ""
        lines.append(f'  "{a}" -> "{b}"{label};')
    lines.append("}")
    return "\n".join(lines) + "\n"


def source_lines(rec: CheckedRecurrence) -> dict[str, tuple[int, ...]]:
    """Per state and output, the lines of the statements its new value comes from: its own assignment and
    the temporaries that assignment reads (through other temporaries too); generated code cites them."""
    graph = build_dataflow(rec)
    found: dict[str, tuple[int, ...]] = {}
    for node, data in graph.nodes(data=True):
        target = data.get("target")
        if target is None or data.get("kind") == SymbolKind.TEMP.value:
            continue
        lines, todo = {data["line"]}, [node]
        while todo:  # up through temporaries only: another state's statement is cited where it is written
            for up in graph.predecessors(todo.pop()):
                if graph.nodes[up].get("kind") == SymbolKind.TEMP.value and graph.nodes[up]["line"] not in lines:
                    lines.add(graph.nodes[up]["line"])
                    todo.append(up)
        found[target] = tuple(sorted(lines | set(found.get(target, ()))))
    return found


def printable(text: str) -> str:
    """`text` as is, but for each character that is not printable (a line break of any kind, a control character, a
    lone surrogate from a file name that is not UTF-8) written as its Python escape (`\\n`, `\\x00`, `\\udce9`):
    one line of readable text (`é` stays `é`), safe in a comment of generated code. Inside a string literal it
    still needs that literal's own escaping (quotes, backslashes)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in text)


def spec_file_name(filename: str) -> str:
    """How generated code names a spec file (`printable`): its base name (`gla.rec` of `specs/gla.rec`), or the path
    as given for a pipe or a file descriptor (`/dev/fd/63` of `<(cat gla.rec)`, whose base name `63` says
    nothing)."""
    if filename == "<string>":
        return filename
    pipe = filename.startswith(("/dev/", "/proc/"))
    return printable(filename if pipe else PurePath(filename).name)


def cite(rec: CheckedRecurrence, name: str) -> str:
    """`gla.rec:4` (or `delta_net.rec:13,14`): where a state's or output's value is written in the spec."""
    lines = source_lines(rec).get(name, ())
    # The name lands in comments (and docstrings) of generated code: printable, it holds no line break.
    file = spec_file_name(rec.source.filename)
    return f"{file}:{','.join(map(str, lines))}" if lines else file
