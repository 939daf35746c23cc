"""Semantic checks: names, declarations, assignment rules and index ranges.

Turns a `RecurrenceSyntax` into a `CheckedRecurrence`: every name resolved to a
`Symbol`, every `sum(...)` call into a `Sum` with its index ranges, every
temporary given its shape. Any violation raises a `SpecError` pointing at the
offending token.
"""

from __future__ import annotations

import enum
import functools
import keyword
import math
from dataclasses import dataclass, field, replace

from . import syntax as ast
from .errors import CAUSAL_HINT, Source, Span, SpecError, SpecWarning, did_you_mean, shown_number

UNARY_FUNCTIONS = ("exp", "log", "sqrt", "abs", "tanh", "sigmoid", "logsigmoid", "softplus", "silu", "elu", "relu",
                   "cos", "sin")
BINARY_FUNCTIONS = ("min", "max")
FUNCTIONS = UNARY_FUNCTIONS + BINARY_FUNCTIONS

Size = str | int  # a size name (bound at call time) or an integer literal


@functools.cache
def torch_functions() -> dict:
    """The DSL's functions as the torch calls the reference interpreter makes (and constants are folded with)."""
    import torch
    import torch.nn.functional as F

    return {"exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "abs": torch.abs, "tanh": torch.tanh,
            "sigmoid": torch.sigmoid, "logsigmoid": F.logsigmoid, "softplus": F.softplus, "silu": F.silu,
            "elu": F.elu, "relu": torch.relu, "cos": torch.cos, "sin": torch.sin, "min": torch.minimum,
            "max": torch.maximum}


_BINARY_OPS = {"+": "add", "-": "sub", "*": "mul", "/": "div", "**": "pow"}


def constant_value(expr: ast.Expr) -> float | None:
    """The value of an expression of numbers only (`2 ** 0.5`, `-1e999`), computed exactly as the reference
    computes it: float64, one torch operation at a time (so `1e999` is inf, `1e200 * 1e200` overflows to inf,
    `log(0)` is -inf). None when `expr` reads any name (a size, an input, ...)."""
    if isinstance(expr, ast.Number):
        return expr.value
    if not isinstance(expr, (ast.BinOp, ast.Neg, ast.Call)) or (isinstance(expr, ast.Call) and expr.func == "sum"):
        return None
    operands = (expr.left, expr.right) if isinstance(expr, ast.BinOp) else (
        (expr.operand,) if isinstance(expr, ast.Neg) else expr.args)
    values = [constant_value(a) for a in operands]
    if any(v is None for v in values):
        return None
    import torch

    tensors = [torch.tensor(v, dtype=torch.float64, device="cpu") for v in values]  # (not a meta default device)
    if isinstance(expr, ast.BinOp):
        result = getattr(torch, _BINARY_OPS[expr.op])(*tensors)
    elif isinstance(expr, ast.Neg):
        result = -tensors[0]
    else:
        result = torch_functions()[expr.func](*tensors)
    return float(result)


class SymbolKind(enum.Enum):
    INPUT = "input"
    PARAM = "param"
    STATE = "state"
    OUTPUT = "output"
    TEMP = "temporary"


@dataclass(frozen=True)
class Symbol:
    name: str
    kind: SymbolKind
    dims: tuple[Size, ...]
    span: Span

    def shape_text(self) -> str:
        return "[" + ", ".join(str(d) for d in self.dims) + "]" if self.dims else "(scalar)"


@dataclass(frozen=True)
class CheckedAssign:
    """One assignment with its target resolved; `value` has `Sum` nodes with ranges."""

    target: Symbol
    indices: tuple[str, ...]
    value: ast.Expr
    span: Span
    index: int  # position among the recurrence's assignments


@dataclass(frozen=True)
class CheckedRecurrence:
    name: str
    inputs: tuple[Symbol, ...]
    params: tuple[Symbol, ...]
    states: tuple[Symbol, ...]
    outputs: tuple[Symbol, ...]
    temps: tuple[Symbol, ...]
    sizes: tuple[str, ...]  # size names in order of first declaration
    statements: tuple[CheckedAssign, ...]
    span: Span
    source: Source = field(compare=False)
    reverse: bool = False  # `reverse recurrence`: a call runs its steps from the last to the first by default
    # Likely mistakes in a valid body (an input never read, a state no output sees); see `_warnings`.
    warnings: tuple[SpecWarning, ...] = field(default=(), compare=False)

    @property
    def text(self) -> str:
        """The recurrence's own source text (its `recurrence ... { ... }` block)."""
        lines = self.source.lines()
        return "\n".join(lines[self.span.line - 1 : self.span.end_line]) + "\n"

    def symbol(self, name: str) -> Symbol:
        for group in (self.inputs, self.params, self.states, self.outputs, self.temps):
            for sym in group:
                if sym.name == name:
                    return sym
        raise KeyError(name)


# The call's own axes: every layer's tensors are [B, T, H, ...] (batch, time, heads), and `--shape B=..,T=..,H=..`
# of the command line and the messages about a call's shapes name them so; a spec size may not take those names.
CALL_AXES = {"B": "batch", "T": "time", "H": "head"}

# Keyword arguments of a layer's call (LANGUAGE.md's calling convention and `compile`'s layers): an input or
# param of one of these names could not be passed by name.
CALL_KEYWORDS = frozenset({"initial_state", "output_final_state", "cu_seqlens", "reverse", "form", "backend",
                           "chunk_size", "config", "check_steps"})


def _check_python_name(name: str, span: Span, source: Source) -> None:
    """Names become Python identifiers in generated code; Python's own keywords cannot."""
    if keyword.iskeyword(name):
        raise SpecError(f"'{name}' is a Python keyword and cannot name anything in a spec", span, source,
                        hint=f"rename it, say '{name}_'")


def require_state(rec: CheckedRecurrence) -> None:
    """A `SpecError` at the recurrence's name when it declares no state. Such a body is valid and the reference
    runs it, but every compiled form (and the calling convention's final_state) carries at least one state, so
    compiling one stops here rather than deep in code generation."""
    if not rec.states:
        line = rec.source.line_text(rec.span.line)
        start = line.find(rec.name, line.find("recurrence") + len("recurrence"))
        at = Span(rec.span.line, start + 1, rec.span.line, start + 1 + len(rec.name)) if start >= 0 else rec.span
        raise SpecError(f"recurrence '{rec.name}' has no state: a compiled recurrence needs at least one state",
                        at, rec.source,
                        hint="declare one in the body, e.g. `state h[D]`, and update it; a map with no state "
                             "is plain torch code")


def undefined_from_zero(rec: CheckedRecurrence, name: str) -> SpecError:
    """The `SpecError` for a value (`name`: a state, temporary or output) that is NaN for every input at a step
    from a zero state, at its last assignment: an infinite constant times the state (`1e400 * h[d]`: inf * 0).
    The reference computes the same NaN; the compiled forms, which leave the zero state's terms out of the first
    step, have no number to write for it."""
    stmt = [s for s in rec.statements if s.target.name == name][-1]
    return SpecError(f"'{name}' is NaN (not a number) for every input at the first step of a call without an "
                     "initial state: an infinite constant multiplies the zero state (inf * 0 is NaN in float64)",
                     stmt.value.span, rec.source,
                     hint="a number beyond 1.8e308 (1e400) or exp(1000) is infinity; a decay is meant to be "
                          "finite, say exp(-g[d]) or 0.9")


def check_program(program: ast.Program) -> list[CheckedRecurrence]:
    """Check every recurrence of a program; two recurrences may not share a name."""
    seen: dict[str, ast.RecurrenceSyntax] = {}
    checked = []
    for rec in program.recurrences:
        _check_python_name(rec.name, rec.name_span, program.source)
        if rec.name in seen:
            first = seen[rec.name].name_span
            raise SpecError(f"recurrence '{rec.name}' is defined twice", rec.name_span, program.source,
                            hint=f"first defined at line {first.line}")
        seen[rec.name] = rec
        checked.append(_Checker(rec, program.source).run())
    return checked


class _Checker:
    def __init__(self, rec: ast.RecurrenceSyntax, source: Source):
        self.rec = rec
        self.source = source
        self.symbols: dict[str, Symbol] = {}
        self.sizes: dict[str, Span] = {}
        # Temporaries and outputs become readable once assigned.
        self.assigned: dict[str, Span] = {}

    def error(self, message: str, span: Span, hint: str | None = None) -> SpecError:
        return SpecError(message, span, self.source, hint=hint)

    # -- declarations -------------------------------------------------

    def declare(self, decl: ast.Decl, kind: SymbolKind) -> Symbol:
        _check_python_name(decl.name, decl.span, self.source)
        if kind in (SymbolKind.INPUT, SymbolKind.PARAM) and decl.name in CALL_KEYWORDS:
            raise self.error(f"'{decl.name}' is a keyword of every layer's call ({decl.name}=...), so "
                             f"{_a(kind.value)} cannot have that name", decl.span,
                             hint=f"rename it, say '{decl.name}_'")
        if decl.name in self.symbols:
            first = self.symbols[decl.name]
            raise self.error(f"'{decl.name}' is declared twice", decl.span,
                             hint=f"first declared as {first.kind.value} at line {first.span.line}, "
                                  f"column {first.span.column}")
        if decl.name in self.sizes:
            raise self.error(f"'{decl.name}' is already a size name and cannot also name a value", decl.span)
        dims = []
        for dim in decl.dims:
            if isinstance(dim.size, str):
                _check_python_name(dim.size, dim.span, self.source)
                if dim.size in CALL_AXES:
                    taken = set(self.sizes) | set(self.symbols) | {d.size for d in decl.dims}
                    free = next((n for n in "NMLPRDEFGQUWXYZ" if n not in taken), f"{dim.size}_")
                    raise self.error(f"size '{dim.size}' has the name of every call's {CALL_AXES[dim.size]} axis: a "
                                     "layer's tensors are [B, T, H, ...] and --shape B=..,T=..,H=.. sets those, so "
                                     "no spec size may be called B, T or H", dim.span,
                                     hint=f"rename the size, say '{free}'")
                if dim.size in self.symbols:
                    raise self.error(f"'{dim.size}' names {_a(self.symbols[dim.size].kind.value)} "
                                     "and cannot also be a size", dim.span)
                self.sizes.setdefault(dim.size, dim.span)
            elif dim.size < 1:
                raise self.error(f"a dimension must be at least 1, got {dim.size}", dim.span)
            dims.append(dim.size)
        sym = Symbol(decl.name, kind, tuple(dims), decl.span)
        self.symbols[decl.name] = sym
        return sym

    # -- the whole recurrence -----------------------------------------

    def run(self) -> CheckedRecurrence:
        rec = self.rec
        if not rec.inputs:  # LANGUAGE.md: `recurrence NAME ( INPUT, ... )`; B and T come from the inputs' shapes
            outputs = ", ".join(d.name for d in rec.outputs) or "y"
            raise self.error(f"recurrence '{rec.name}' declares no inputs: a call takes its batch and its number of "
                             "steps from the inputs' shapes [B, T, H, ...], so it needs at least one",
                             rec.name_span,
                             hint=f"add a per-step input, e.g. `recurrence {rec.name}(x) -> {outputs}`, and read it "
                                  "in the body")
        inputs = tuple(self.declare(d, SymbolKind.INPUT) for d in rec.inputs)
        outputs = tuple(self.declare(d, SymbolKind.OUTPUT) for d in rec.outputs)
        self.check_output_sizes(outputs)
        params: list[Symbol] = []
        states: list[Symbol] = []
        temps: list[Symbol] = []
        statements: list[CheckedAssign] = []
        output_assigned: dict[str, Span] = {}
        for stmt in rec.statements:
            if isinstance(stmt, ast.DeclStatement):
                kind = SymbolKind.PARAM if stmt.kind == "param" else SymbolKind.STATE
                for decl in stmt.decls:
                    if decl.name in self.assigned:
                        raise self.error(f"'{decl.name}' is assigned before it is declared as a {stmt.kind}",
                                         decl.span)
                    sym = self.declare(decl, kind)
                    (params if kind is SymbolKind.PARAM else states).append(sym)
                continue
            target = self.symbols.get(stmt.target)
            if target is None and stmt.target in self.sizes:
                raise self.error(f"cannot assign to size '{stmt.target}'", stmt.target_span)
            if target is not None and target.kind in (SymbolKind.INPUT, SymbolKind.PARAM):
                raise self.error(f"cannot assign to {target.kind.value} '{stmt.target}'", stmt.target_span,
                                 hint="inputs and params are read-only; assign to a new name for a temporary")
            if target is not None and target.kind is SymbolKind.OUTPUT:
                if stmt.target in output_assigned:
                    first = output_assigned[stmt.target]
                    raise self.error(f"output '{stmt.target}' is assigned more than once", stmt.target_span,
                                     hint=f"first assigned at line {first.line}; use a temporary for "
                                          "intermediate values")
                output_assigned[stmt.target] = stmt.target_span
            if target is None:
                _check_python_name(stmt.target, stmt.target_span, self.source)
            checked = self.check_assign(stmt, target, len(statements))
            if target is None or (target.kind is SymbolKind.TEMP and target not in temps):
                temps.append(checked.target)
            statements.append(checked)
            self.assigned.setdefault(stmt.target, stmt.span)
        for out in outputs:
            if out.name not in output_assigned:
                raise self.error(f"output '{out.name}' is never assigned", out.span,
                                 hint=f"add a line '{out.name}{_index_hint(out)} = ...' to the body")
        # A size seen only in outputs can never be bound from the call's tensors.
        bindable = {d for sym in inputs + tuple(params) + tuple(states) for d in sym.dims}
        for size, span in self.sizes.items():
            if size not in bindable:
                raise self.error(f"size '{size}' is used only by outputs, so no argument fixes it", span,
                                 hint="give an input, param or state this dimension")
        return CheckedRecurrence(
            name=rec.name,
            inputs=inputs,
            params=tuple(params),
            states=tuple(states),
            outputs=outputs,
            temps=tuple(temps),
            sizes=tuple(self.sizes),
            statements=tuple(statements),
            span=rec.span,
            source=self.source,
            reverse=rec.reverse,
            warnings=_warnings(inputs, tuple(params), tuple(states), outputs, tuple(statements), self.source),
        )

    def check_output_sizes(self, outputs: tuple[Symbol, ...]) -> None:
        """A size that only outputs use can never be bound from the call's tensors. Checked before the body,
        whose lines would otherwise report it as an index ranging over two sizes (`o[M]` assigned from `v[V]`)."""
        bindable = {d.size for d in self.rec.inputs for d in d.dims}
        bindable |= {dim.size for stmt in self.rec.statements if isinstance(stmt, ast.DeclStatement)
                     for decl in stmt.decls for dim in decl.dims}
        for out in outputs:
            for size in out.dims:
                if isinstance(size, str) and size not in bindable:
                    raise self.error(f"size '{size}' is used only by outputs, so no argument fixes it",
                                     self.sizes[size], hint="give an input, param or state this dimension")

    # -- assignments ----------------------------------------------------

    def check_assign(self, stmt: ast.Assign, target: Symbol | None, position: int) -> CheckedAssign:
        names: list[str] = []
        for idx in stmt.indices:
            if isinstance(idx, ast.IndexLiteral):
                raise self.error("an assignment's indices must be index names, not numbers", idx.span)
            if idx.name in names:
                raise self.error(f"index '{idx.name}' appears twice in the target", idx.span)
            if idx.name in self.symbols or idx.name in self.sizes:
                raise self.error(f"'{idx.name}' names a value or size and cannot be used as an index", idx.span)
            names.append(idx.name)
        if target is not None and target.kind is not SymbolKind.TEMP and len(names) != len(target.dims):
            raise self.error(
                f"{target.kind.value} '{target.name}' has {_count(len(target.dims), 'dimension')} "
                f"{target.shape_text()} but is assigned with {_count(len(names), 'index', 'indices')}",
                stmt.target_span, hint=f"write {target.name}{_index_hint(target)} = ...")
        if target is not None and target.kind is SymbolKind.TEMP and len(names) != len(target.dims):
            raise self.error(f"temporary '{target.name}' was {_count(len(target.dims), 'dimension')} "
                             f"{target.shape_text()} and is reassigned with {_count(len(names), 'index', 'indices')}",
                             stmt.target_span)
        # Each index bound by the target: the size it ranges over, and where that was learnt.
        ranges: dict[str, tuple[Size, Span] | None] = {}
        for pos, name in enumerate(names):
            if target is not None:
                ranges[name] = (target.dims[pos], stmt.indices[pos].span)
            else:
                ranges[name] = None
        value = self.check_expr(stmt.value, [ranges])
        self.check_constants(value)
        for idx in stmt.indices:
            if ranges[idx.name] is None:
                i, t = idx.name, stmt.target
                raise self.error(f"cannot tell the range of index '{i}': nothing on the right indexes it",
                                 idx.span,
                                 hint=f"an index takes its size from a tensor it indexes on the right: read one with "
                                      f"it there (`{t}[{i}] = w[{i}]`, w an input or param declared `w[N]`); a value "
                                      f"the same for every {i} needs no index: write `{t} = ...`")
        if target is None:
            target = Symbol(stmt.target, SymbolKind.TEMP, tuple(ranges[n][0] for n in names), stmt.target_span)
            self.symbols[stmt.target] = target
        elif target.kind is SymbolKind.TEMP:
            new_dims = tuple(ranges[n][0] for n in names)
            if new_dims != target.dims:
                raise self.error(f"temporary '{target.name}' was {target.shape_text()} and is reassigned as "
                                 f"[{', '.join(map(str, new_dims))}]", stmt.target_span)
        return CheckedAssign(target, tuple(names), value, stmt.span, position)

    # -- expressions ------------------------------------------------------

    def lookup_index(self, name: str, scopes) -> dict | None:
        for scope in reversed(scopes):
            if name in scope:
                return scope
        return None

    def readable(self, name: str, span: Span, indices=(), scopes=()) -> Symbol:
        """The symbol `name` reads (`name[indices]` where indexed), or the SpecError why it reads none."""
        sym = self.symbols.get(name)
        if sym is None:
            later = [s for s in self.rec.statements
                     if isinstance(s, ast.DeclStatement) and any(d.name == name for d in s.decls)]
            if later:
                kind = later[0].kind
                raise self.error(f"{kind} '{name}' is read before it is declared", span,
                                 hint=f"move 'state {name}' above this line" if kind == "state"
                                 else f"move 'param {name}' above this line")
            assigned_later = [s for s in self.rec.statements if isinstance(s, ast.Assign) and s.target == name]
            if assigned_later:
                line = assigned_later[0].span.line
                # (a read on its own assignment's line is the usual `S = a * S + ...` with `state S` forgotten)
                carry = (f"; to carry it from one step to the next, declare it first with a line `state {name}[...]` "
                         "(its sizes)" if line == span.line else
                         f"; if it should hold the previous step's value, declare it with `state {name}[...]`")
                raise self.error(f"'{name}' is read before it is assigned", span,
                                 hint=f"it is assigned at line {line}{carry}")
            known = list(self.symbols) + list(self.sizes)
            raise self.error(f"undefined name '{name}'", span,
                             hint=did_you_mean(name, known) or self.declare_hint(name, indices, scopes))
        if sym.kind in (SymbolKind.TEMP, SymbolKind.OUTPUT) and name not in self.assigned:
            raise self.error(f"{sym.kind.value} '{name}' is read before it is assigned", span)
        return sym

    def declare_hint(self, name: str, indices, scopes) -> str:
        """How to declare an undefined `name` (read as `name[indices]`): as one more input in the header, or as a
        param; with the sizes its indices range over where known (`N` where not)."""
        def shape(sizes) -> str:
            return "[" + ", ".join(map(str, sizes)) + "]" if sizes else ""

        sizes = []
        for idx in indices:
            scope = self.lookup_index(idx.name, scopes) if isinstance(idx, ast.IndexVar) else None
            known = scope.get(idx.name) if scope is not None else None
            sizes.append(known[0] if known is not None else "N")
        decl = name + shape(sizes)
        rec = self.rec
        inputs = ", ".join(d.name + shape(d.dims) for d in rec.inputs)
        outputs = ", ".join(d.name + shape(d.dims) for d in rec.outputs)
        header = f"{'reverse ' if rec.reverse else ''}recurrence {rec.name}({inputs}, {decl}) -> {outputs}"
        return (f"declare it: as an input (a value per step), in the header `{header}`, or as a per-head "
                f"constant, with a line `param {decl}` in the body")

    def check_expr(self, expr: ast.Expr, scopes: list[dict]) -> ast.Expr:
        if isinstance(expr, ast.Number):
            if expr.text.isdigit() and math.isinf(expr.value):
                raise self.error(f"integer {shown_number(expr.text)} is too large: a number is a float64, at most "
                                 "about 1.8e308", expr.span, hint="write 1e999 for infinity")
            return expr
        if isinstance(expr, ast.Name):
            if self.lookup_index(expr.name, scopes) is not None:
                raise self.error(f"index '{expr.name}' cannot be used as a value", expr.span)
            if expr.name in self.sizes:
                return expr
            sym = self.readable(expr.name, expr.span)
            if sym.dims:
                raise self.error(f"{sym.kind.value} '{sym.name}' has {_count(len(sym.dims), 'dimension')} "
                                 f"{sym.shape_text()} and must be indexed", expr.span,
                                 hint=f"write {sym.name}{_index_hint(sym)}")
            return expr
        if isinstance(expr, ast.Indexed):
            if expr.name in self.sizes:
                raise self.error(f"size '{expr.name}' cannot be indexed", expr.name_span)
            sym = self.readable(expr.name, expr.name_span, expr.indices, scopes)
            if not sym.dims:
                raise self.error(f"{sym.kind.value} '{sym.name}' is a scalar and cannot be indexed",
                                 expr.name_span, hint=f"write {sym.name} without brackets")
            if len(expr.indices) != len(sym.dims):
                timed = any(isinstance(i, ast.IndexVar) and i.name == "t" for i in expr.indices)
                raise self.error(f"{sym.kind.value} '{sym.name}' has {_count(len(sym.dims), 'dimension')} "
                                 f"{sym.shape_text()} but is indexed with "
                                 f"{_count(len(expr.indices), 'index', 'indices')}", expr.span,
                                 hint=f"write {sym.name}{_index_hint(sym)}"
                                 + ("; time is not an axis of a value: " + CAUSAL_HINT if timed else ""))
            for pos, idx in enumerate(expr.indices):
                if isinstance(idx, ast.IndexLiteral):
                    raise self.error("indices must be index names; a number cannot index a tensor", idx.span,
                                     hint="bind an index in the target or with sum(i, ...)")
                scope = self.lookup_index(idx.name, scopes)
                if scope is None:
                    if idx.name in self.symbols or idx.name in self.sizes:
                        raise self.error(f"'{idx.name}' is a value, not an index", idx.span)
                    raise self.error(f"free index '{idx.name}' is not bound by the target or a sum", idx.span,
                                     hint=f"add it to the target's indices or sum over it: sum({idx.name}, ...)"
                                     + ("; if 't' means the step, " + CAUSAL_HINT if idx.name == "t" else ""))
                self.bind_range(scope, idx.name, sym.dims[pos], idx.span)
            return expr
        if isinstance(expr, ast.BinOp):
            return replace(expr, left=self.check_expr(expr.left, scopes), right=self.check_expr(expr.right, scopes))
        if isinstance(expr, ast.Neg):
            return replace(expr, operand=self.check_expr(expr.operand, scopes))
        if isinstance(expr, ast.Call):
            if expr.func == "sum":
                return self.check_sum(expr, scopes)
            if expr.func in UNARY_FUNCTIONS or expr.func in BINARY_FUNCTIONS:
                want = 1 if expr.func in UNARY_FUNCTIONS else 2
                if len(expr.args) != want:
                    raise self.error(f"{expr.func}() takes {_count(want, 'argument')}, got {len(expr.args)}",
                                     expr.span)
                first = expr.args[0]
                if (expr.func in ("max", "min") and isinstance(first, ast.Name) and first.name not in self.symbols
                        and first.name not in self.sizes and self.lookup_index(first.name, scopes) is None):
                    # max(m, s[m]): a reduction over an index the language does not have
                    raise self.error(f"undefined name '{first.name}'", first.span,
                                     hint=f"{expr.func}(a, b) compares two values elementwise; it does not reduce "
                                          f"over an index: sum({first.name}, ...) is the only reduction (a "
                                          f"{expr.func}imum over an axis cannot be written; a softmax is written "
                                          "without its max shift)")
                return replace(expr, args=tuple(self.check_expr(a, scopes) for a in expr.args))
            if expr.func in self.symbols:
                raise self.error(f"'{expr.func}' is {_a(self.symbols[expr.func].kind.value)}, not a function",
                                 expr.func_span, hint=f"index it with [ ], e.g. {expr.func}[i]")
            raise self.error(f"unknown function '{expr.func}'", expr.func_span,
                             hint=did_you_mean(expr.func, FUNCTIONS + ("sum",)))
        raise TypeError(f"unexpected syntax node {expr!r}")  # the parser makes no other node

    def check_constants(self, expr: ast.Expr) -> None:
        """Numbers-only subexpressions are folded to their float64 value (`constant_value`); one that is NaN
        (`1e999 - 1e999`, `sqrt(-1)`) is an error, and so is a division by a constant zero, which the compiled
        forms cannot express (sympy's 1/0 is complex infinity)."""
        value = constant_value(expr)
        if value is not None:
            if math.isnan(value):
                where = expr
                while True:  # the innermost NaN: the operation that makes it
                    nan_child = [c for c in _operands(where) if _is_nan(constant_value(c))]
                    if not nan_child:
                        break
                    where = nan_child[0]
                raise self.error(f"{_quote(self.source, where.span, 'this constant')} is NaN (not a number) in "
                                 "float64", where.span,
                                 hint="a number beyond 1.8e308 is infinity, and inf - inf, 0 * inf, inf / inf, and "
                                      "the log or square root of a negative number are NaN")
            return
        if isinstance(expr, ast.BinOp) and expr.op == "/" and constant_value(expr.right) == 0:
            what = _quote(self.source, expr.right.span, "the divisor")
            raise self.error(f"division by zero: {what} is 0 in float64", expr.right.span)
        for child in _operands(expr):
            self.check_constants(child)

    def check_sum(self, expr: ast.Call, scopes: list[dict]) -> ast.Sum:
        if len(expr.args) < 2:
            raise self.error("sum() takes one or more index names and then an expression", expr.span,
                             hint="write sum(i, x[i])")
        index_args, body = expr.args[:-1], expr.args[-1]
        scope: dict[str, tuple[Size, Span] | None] = {}
        spans: list[Span] = []
        for arg in index_args:
            if not isinstance(arg, ast.Name):
                raise self.error("sum()'s leading arguments must be index names", _node_span(arg),
                                 hint="write sum(i, x[i]) or sum(i, j, x[i, j])")
            if arg.name in self.symbols or arg.name in self.sizes:
                raise self.error(f"'{arg.name}' names a value or size and cannot be a summation index", arg.span)
            if arg.name in scope or self.lookup_index(arg.name, scopes) is not None:
                raise self.error(f"index '{arg.name}' is already bound here", arg.span,
                                 hint="use a different index name")
            scope[arg.name] = None
            spans.append(arg.span)
        checked_body = self.check_expr(body, scopes + [scope])
        ranges = []
        for name, span in zip(scope, spans):
            if scope[name] is None:
                raise self.error(f"cannot tell the range of summation index '{name}': nothing in the sum indexes it",
                                 span)
            ranges.append(scope[name][0])
        indices = tuple(ast.IndexVar(a.name, a.span) for a in index_args)
        return ast.Sum(indices, checked_body, expr.span, tuple(ranges))

    def bind_range(self, scope: dict, name: str, size: Size, span: Span) -> None:
        known = scope[name]
        if known is None:
            scope[name] = (size, span)
        elif known[0] != size:
            where = known[1]
            raise self.error(f"index '{name}' ranges over {size} here but over {known[0]} at line {where.line}, "
                             f"column {where.column}", span)


def _node_span(node) -> Span:
    return node.span


def _operands(expr: ast.Expr) -> tuple[ast.Expr, ...]:
    if isinstance(expr, ast.BinOp):
        return (expr.left, expr.right)
    if isinstance(expr, ast.Neg):
        return (expr.operand,)
    if isinstance(expr, ast.Call):
        return expr.args
    if isinstance(expr, ast.Sum):
        return (expr.body,)
    return ()


def _is_nan(value: float | None) -> bool:
    return value is not None and math.isnan(value)


def _quote(source: Source, span: Span, otherwise: str) -> str:
    """The source text of `span` in quotes when it is on one line and short, else `otherwise`."""
    if span.end_line != span.line:
        return otherwise
    text = source.line_text(span.line)[span.column - 1 : span.end_column - 1]
    return f"'{text}'" if 0 < len(text) <= 40 else otherwise


def _a(word: str) -> str:
    """`word` with its indefinite article: 'an input', 'a state'."""
    return ("an " if word[:1] in "aeiou" else "a ") + word


def _count(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


def _index_hint(sym: Symbol) -> str:
    letters = "ijklmn"
    if not sym.dims:
        return ""
    return "[" + ", ".join(letters[p % len(letters)] for p in range(len(sym.dims))) + "]"


def _names_read(expr: ast.Expr) -> set[str]:
    """The value names (and sizes used as numbers) an expression reads."""
    if isinstance(expr, ast.Name):
        return {expr.name}
    if isinstance(expr, ast.Indexed):
        return {expr.name}
    if isinstance(expr, ast.Sum):
        return _names_read(expr.body)
    if isinstance(expr, ast.BinOp):
        return _names_read(expr.left) | _names_read(expr.right)
    if isinstance(expr, ast.Neg):
        return _names_read(expr.operand)
    if isinstance(expr, ast.Call):
        return set().union(*(_names_read(a) for a in expr.args))
    return set()


def _warnings(inputs: tuple[Symbol, ...], params: tuple[Symbol, ...], states: tuple[Symbol, ...],
              outputs: tuple[Symbol, ...], statements: tuple[CheckedAssign, ...],
              source: Source) -> tuple[SpecWarning, ...]:
    """Likely mistakes that still make a valid program: an input or param no line reads, a state never assigned
    (it keeps its initial state), a state or temporary whose value never reaches an output (only a final state
    would show it). Each is a `SpecWarning` at the name's declaration or first assignment."""
    reads: dict[str, set[str]] = {}
    first_assigned: dict[str, CheckedAssign] = {}
    for st in statements:
        reads.setdefault(st.target.name, set()).update(_names_read(st.value))
        first_assigned.setdefault(st.target.name, st)
    read_anywhere = set().union(*reads.values()) if reads else set()
    # Everything an output depends on, through temporaries and states, across steps.
    reaches: set[str] = set()
    todo = [o.name for o in outputs]
    while todo:
        name = todo.pop()
        if name not in reaches:
            reaches.add(name)
            todo.extend(reads.get(name, ()))
    found: list[SpecWarning] = []
    for sym in inputs + params:
        if sym.name not in read_anywhere:
            found.append(SpecWarning(f"{sym.kind.value} '{sym.name}' is never read", sym.span, source,
                                     hint="use it in the body or remove it (a call still has to pass it)"))
    for sym in states:
        if sym.name not in first_assigned:
            found.append(SpecWarning(
                f"state '{sym.name}' is never assigned, so every step sees its initial state (zero unless "
                "initial_state gives one)", sym.span, source,
                hint=f"add its update, '{sym.name}{_index_hint(sym)} = ...', or make it a param"))
        elif sym.name not in reaches:
            found.append(SpecWarning(
                f"state '{sym.name}' never reaches an output: only its final state (output_final_state=True) "
                "shows it", sym.span, source,
                hint="read it in an output's line, or remove it if it is left over"))
    for name, st in first_assigned.items():
        if st.target.kind is SymbolKind.TEMP and name not in read_anywhere:
            found.append(SpecWarning(f"temporary '{name}' is assigned but never read", st.target.span, source,
                                     hint=did_you_mean(name, read_anywhere)
                                     or "read it in a later line, or remove it"))
    return tuple(found)
