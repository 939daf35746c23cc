"""The step IR: each statement as a sympy expression over indexed symbols, and the
statements composed into one map per step.

Naming inside the IR:
- a tensor `x[D...]` is `IndexedBase("x")`, indexed by integer `Symbol`s;
- a scalar is a plain `Symbol`; a size is a positive integer `Symbol`;
- a state read before its (last) update is `S` (the previous step's value, S_{t-1});
  a read after the last update is `S__new` (S_t); a read between two updates is
  inlined as the intermediate expression;
- temporaries are inlined, their summation indices renamed so nothing is captured.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import mpmath
import sympy
from mpmath.libmp import prec_to_dps

from . import syntax as ast
from .check import CheckedAssign, CheckedRecurrence, SymbolKind, constant_value
from .errors import MAX_INLINED, SpecError
from .printing import spec_text

NEW_SUFFIX = "__new"


class _NamedFunction(sympy.Function):
    """A DSL function sympy lacks; `elementary(x)` spells it in sympy's own functions, so that numbers
    evaluate (`sigmoid(2.0).evalf()`) and constants print as plain Python (`to_elementary`)."""

    @staticmethod
    def elementary(x: sympy.Expr) -> sympy.Expr:
        raise NotImplementedError

    def _eval_evalf(self, prec):
        if self.args[0].is_number:
            return self.elementary(self.args[0]).evalf(prec_to_dps(prec))
        return None


class sigmoid(_NamedFunction):  # noqa: N801 - sympy function classes are lower-case like exp
    """1 / (1 + exp(-x))."""

    @staticmethod
    def elementary(x):
        return 1 / (1 + sympy.exp(-x))

    def fdiff(self, argindex=1):
        x = self.args[0]
        return sigmoid(x) * (1 - sigmoid(x))


class logsigmoid(_NamedFunction):  # noqa: N801
    @staticmethod
    def elementary(x):
        return -sympy.log(1 + sympy.exp(-x))

    def fdiff(self, argindex=1):
        return sigmoid(-self.args[0])


class softplus(_NamedFunction):  # noqa: N801
    @staticmethod
    def elementary(x):
        return sympy.log(1 + sympy.exp(x))

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])


class silu(_NamedFunction):  # noqa: N801
    @staticmethod
    def elementary(x):
        return x / (1 + sympy.exp(-x))

    def fdiff(self, argindex=1):
        x = self.args[0]
        return sigmoid(x) * (1 + x * (1 - sigmoid(x)))


class elu(_NamedFunction):  # noqa: N801
    @staticmethod
    def elementary(x):
        return sympy.Piecewise((x, x > 0), (sympy.exp(x) - 1, True))

    def fdiff(self, argindex=1):
        x = self.args[0]
        return sympy.Piecewise((1, x > 0), (sympy.exp(x), True))


class tanh(_NamedFunction):  # noqa: N801
    """The hyperbolic tangent, kept as the DSL's own function rather than `sympy.tanh`: sympy's asks, on every
    new `tanh(u)`, whether `u` is real, and for a `u` that is itself a tanh it answers through `as_real_imag`,
    whose size doubles with each level (ten nested tanh took a minute to build). Here nothing is asked."""

    @staticmethod
    def elementary(x):
        return sympy.tanh(x)

    def fdiff(self, argindex=1):
        return 1 - tanh(self.args[0]) ** 2


class relu(_NamedFunction):  # noqa: N801
    @staticmethod
    def elementary(x):
        return sympy.Max(x, 0)

    def fdiff(self, argindex=1):
        return sympy.Heaviside(self.args[0])


class expm1(_NamedFunction):  # noqa: N801
    """exp(x) - 1, computed without the cancellation of exp(x) - 1 near x = 0 (torch.expm1): the step IR's
    spelling of `exp(x) - 1` and of `1 - exp(x)` (as -expm1(x)), see `precise`."""

    @classmethod
    def eval(cls, x):
        if x.is_zero:
            return sympy.Integer(0)
        if x is sympy.S.NegativeInfinity or x is sympy.S.Infinity:
            return sympy.exp(x) - 1  # -1, oo: sympy's limits at a reset (x -> -oo) evaluate
        return None

    @staticmethod
    def elementary(x):
        return sympy.exp(x) - 1

    def _eval_evalf(self, prec):
        # mpmath's own expm1, not the elementary form's cancellation at the working precision
        if self.args[0].is_number:
            with mpmath.workprec(prec):
                return sympy.Float(mpmath.expm1(self.args[0]._to_mpmath(prec)), precision=prec)
        return None

    def fdiff(self, argindex=1):
        return sympy.exp(self.args[0])


class log1p(_NamedFunction):  # noqa: N801
    """log(1 + x), accurate for small x (torch.log1p): the step IR's spelling of `log(1 + x)`, see `precise`."""

    @classmethod
    def eval(cls, x):
        if x.is_zero:
            return sympy.Integer(0)
        if x is sympy.S.Infinity:
            return sympy.S.Infinity
        return None

    @staticmethod
    def elementary(x):
        return sympy.log(1 + x)

    def _eval_evalf(self, prec):
        # mpmath's own log1p, not the elementary form's cancellation at the working precision
        if self.args[0].is_number:
            with mpmath.workprec(prec):
                return sympy.Float(mpmath.log1p(self.args[0]._to_mpmath(prec)), precision=prec)
        return None

    def fdiff(self, argindex=1):
        return 1 / (1 + self.args[0])


def precise(expr: sympy.Expr) -> sympy.Expr:
    """`expr` (one node: its arguments are already rewritten) with the forms that lose every digit to
    cancellation in float32 spelled with expm1 / log1p: `c - c * exp(y)` (c a nonzero number, other terms
    allowed) is `-c * expm1(y)`, so `1 - exp(y)` is `-expm1(y)` and `exp(y) - 1` is `expm1(y)`; `log(1 + y)` is
    `log1p(y)`. Same value in exact arithmetic; in float32, 1 - exp(-2e-9) is 0 but -expm1(-2e-9) is 2e-9, and
    the derivative of sqrt(1 - exp(y)) (RG-LRU's input weight, a nearly closed gate) stays finite."""
    if isinstance(expr, sympy.Add):
        c, rest = expr.as_coeff_Add()
        if c.is_zero or not c.is_finite:
            return expr
        terms = sympy.Add.make_args(rest)
        for k, term in enumerate(terms):
            coeff, factor = term.as_coeff_Mul()
            if isinstance(factor, sympy.exp) and coeff == -c:
                return sympy.Add(*terms[:k], *terms[k + 1:], -c * expm1(factor.args[0]))
        return expr
    if isinstance(expr, sympy.log) and isinstance(expr.args[0], sympy.Add) and sympy.Integer(1) in expr.args[0].args:
        return log1p(expr.args[0] - 1)
    return expr


def to_elementary(expr: sympy.Expr) -> sympy.Expr:
    """`expr` with the DSL's own functions (sigmoid, softplus, ...) spelled in sympy's."""
    return expr.replace(lambda e: isinstance(e, _NamedFunction), lambda e: e.elementary(e.args[0]))


SYMPY_FUNCTIONS = {
    "exp": sympy.exp,
    "log": sympy.log,
    "sqrt": sympy.sqrt,
    "abs": sympy.Abs,
    "tanh": tanh,
    "sigmoid": sigmoid,
    "logsigmoid": logsigmoid,
    "softplus": softplus,
    "silu": silu,
    "elu": elu,
    "relu": relu,
    "cos": sympy.cos,
    "sin": sympy.sin,
    "min": sympy.Min,
    "max": sympy.Max,
}


def float_number(value: float) -> sympy.Expr:
    """A float64 value as a sympy number: `oo` / `-oo` for the infinities, an exact `Integer` for an integer
    that float64 holds exactly (so `x ** 2.0` is a square and `1 - u` stays integral), else a 53-bit `Float`."""
    if math.isnan(value):
        raise ValueError("NaN has no sympy number that the printers can write")
    if math.isinf(value):
        return sympy.oo if value > 0 else -sympy.oo
    if value.is_integer() and abs(value) <= 2**53:
        return sympy.Integer(int(value))
    return sympy.Float(value)


def has_infinity(expr: sympy.Expr) -> bool:
    """Whether `expr` contains an infinite number (a literal beyond float64's range: `1e999`, `-1e999`)."""
    return any(n.is_infinite for n in expr.atoms(sympy.Number))


def undefined(expr: sympy.Expr) -> bool:
    """Whether sympy made `expr` NaN, complex infinity or complex (`oo - oo`, `x / 0`, `sqrt(-K)`): a value
    float64 cannot hold, which no generated code may contain."""
    return expr.has(sympy.nan, sympy.zoo, sympy.I)


def tree_size(expr: sympy.Expr) -> int:
    """The number of nodes of `expr` written out as a tree, counted over its shared subexpressions once each (so
    in time linear in the distinct subexpressions, however large the tree)."""
    sizes: dict[sympy.Basic, int] = {}
    stack = [expr]
    while stack:
        node = stack[-1]
        missing = [a for a in node.args if a not in sizes]
        if missing:
            stack.extend(missing)
            continue
        stack.pop()
        sizes[node] = 1 + sum(sizes[a] for a in node.args)
    return sizes[expr]


def size_symbol(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, integer=True, positive=True)


def index_symbol(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, integer=True)


@dataclass(frozen=True)
class Definition:
    """`name[indices] = expr`: a composed value of the step."""

    name: str
    indices: tuple[sympy.Symbol, ...]
    expr: sympy.Expr


@dataclass(frozen=True)
class StepIR:
    """The step as sympy: per-statement expressions and the composed map.

    `statements`: each assignment as written (temporaries not inlined).
    `updates`: each state's value after the step, in terms of inputs, params and S_{t-1}.
    `outputs`: each output, in terms of inputs, params, S_{t-1} (`S`) and S_t (`S__new`).
    `ranges`: the size each index symbol ranges over (targets and sums alike).
    `stages`: for each state assigned more than once in the step, its assignments one by one, each in terms of
    the state's value just before it (read as the state's own name, `S`) and of inputs, params and the other
    states as `updates` reads them; a read of another stage's value (an output or a second state reading `S`
    between two of its assignments) stays a `S__stageN` symbol, so it reads as another state. DeltaProduct's
    r Householder updates per step are r stages.
    """

    statements: tuple[Definition, ...]
    updates: dict[str, Definition]
    outputs: dict[str, Definition]
    ranges: dict[sympy.Symbol, sympy.Expr]
    sizes: tuple[sympy.Symbol, ...]
    stages: dict[str, tuple[Definition, ...]] = field(default_factory=dict)


def _size(dim) -> sympy.Expr:
    return size_symbol(dim) if isinstance(dim, str) else sympy.Integer(dim)


STAGE_SUFFIX = "__stage"


class _Builder:
    def __init__(self, rec: CheckedRecurrence, staged: bool = False):
        self.rec = rec
        # Staged: a state's value between two of its assignments is a symbol S__stageN, not the expression that
        # made it, so that each assignment can be read on its own (`StepIR.stages`).
        self.staged = staged
        self.stage_count: dict[str, int] = {}
        self.fresh = itertools.count()
        self.ranges: dict[sympy.Symbol, sympy.Expr] = {}
        self.kinds = {s.name: s.kind for s in rec.inputs + rec.params + rec.states + rec.outputs + rec.temps}
        last: dict[str, int] = {}
        for stmt in rec.statements:
            if stmt.target.kind is SymbolKind.STATE:
                last[stmt.target.name] = stmt.index
        self.last_update = last
        # Current value of every assigned name: (target indices, expression), or None for "S_{t-1}".
        self.current: dict[str, tuple[tuple[sympy.Symbol, ...], sympy.Expr]] = {}
        self.written: list[Definition] = []

    def rename_bound(self, expr: sympy.Expr) -> sympy.Expr:
        """Give every summation index in `expr` a fresh name (inlining must not capture)."""
        # In the order the sums appear in `expr` (its args are in sympy's canonical order), not the order of
        # `atoms()`, a set: that follows the hashes of the symbols, which differ from process to process
        # (PYTHONHASHSEED), and the numbers given here are printed (`e_2` in `recdsl show` and in the reasons)
        sums = [s for s in sympy.preorder_traversal(expr) if isinstance(s, sympy.Sum)]
        if not sums:
            return expr
        mapping = {}
        for s in sums:
            for limit in s.limits:
                var = limit[0]
                if var not in mapping:
                    new = index_symbol(f"{var.name.split('__')[0]}__{next(self.fresh)}")
                    self.ranges[new] = self.ranges[var]
                    mapping[var] = new
        return expr.xreplace(mapping)

    def read(self, name: str, indices: tuple[sympy.Symbol, ...], as_written: bool) -> sympy.Expr:
        kind = self.kinds.get(name)
        if kind is SymbolKind.STATE:
            if name not in self.current:
                return sympy.IndexedBase(name)[indices] if indices else sympy.Symbol(name)
            if self.current[name] is None:  # after the last update
                new = name + NEW_SUFFIX
                return sympy.IndexedBase(new)[indices] if indices else sympy.Symbol(new)
        if kind in (SymbolKind.INPUT, SymbolKind.PARAM) or (as_written and kind is not SymbolKind.STATE):
            return sympy.IndexedBase(name)[indices] if indices else sympy.Symbol(name)
        if as_written and kind is SymbolKind.STATE:
            return sympy.IndexedBase(name)[indices] if indices else sympy.Symbol(name)
        target, expr = self.current[name]
        expr = self.rename_bound(expr)
        return expr.xreplace(dict(zip(target, indices)))

    def expr(self, e: ast.Expr, as_written: bool) -> sympy.Expr:
        result = precise(self._expr(e, as_written))
        if undefined(result):
            text = spec_text(result)
            shown = text if len(text) <= 60 else text[:57] + "..."
            by_zero = " (inf from a division by zero)" if result.has(sympy.zoo) else ""
            raise SpecError("this expression is undefined in float64 (NaN, or a division by zero) for every input: "
                            f"it simplifies to {shown}{by_zero}", e.span, self.rec.source,
                            hint="a number beyond 1.8e308 is infinity; inf - inf, 0 * inf, x / 0 and the square "
                                 "root or log of a negative number are undefined")
        return result

    def _expr(self, e: ast.Expr, as_written: bool) -> sympy.Expr:
        value = constant_value(e)
        if value is not None:
            # Numbers only: folded in float64 as the reference computes it (`1e999` is oo, `2 ** 0.5` a
            # 53-bit float), never in sympy's exact arithmetic, which would differ (`1e999 - 1e999` is 0 there).
            return float_number(value)
        if isinstance(e, ast.Name):
            if e.name in self.rec.sizes:
                return size_symbol(e.name)
            return self.read(e.name, (), as_written)
        if isinstance(e, ast.Indexed):
            return self.read(e.name, tuple(index_symbol(i.name) for i in e.indices), as_written)
        if isinstance(e, ast.BinOp):
            a, b = self.expr(e.left, as_written), self.expr(e.right, as_written)
            return {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "/": lambda: a / b,
                    "**": lambda: a**b}[e.op]()
        if isinstance(e, ast.Neg):
            return -self.expr(e.operand, as_written)
        if isinstance(e, ast.Call):
            return SYMPY_FUNCTIONS[e.func](*(self.expr(a, as_written) for a in e.args))
        if isinstance(e, ast.Sum):
            limits = []
            for var, size in zip(e.indices, e.ranges):
                sym = index_symbol(var.name)
                self.ranges[sym] = _size(size)
                limits.append((sym, 0, _size(size) - 1))
            return sympy.Sum(self.expr(e.body, as_written), *limits)
        raise TypeError(f"unexpected node {e!r}")

    def statement(self, stmt: CheckedAssign) -> None:
        indices = tuple(index_symbol(n) for n in stmt.indices)
        for sym, dim in zip(indices, stmt.target.dims):
            self.ranges[sym] = _size(dim)
        as_written = self.expr(stmt.value, as_written=True)
        self.written.append(Definition(stmt.target.name, indices, as_written))
        composed = self.expr(stmt.value, as_written=False)
        size = tree_size(composed)
        if size > MAX_INLINED:
            raise SpecError(f"with the temporaries it reads written out, this value has {size} nodes, more than "
                            f"{MAX_INLINED}", stmt.value.span, self.rec.source,
                            hint="a temporary that reads itself (t = t * x + t) doubles in size each time; "
                                 "keep such a value in a state, or use fewer reassignments")
        name = stmt.target.name
        if stmt.target.kind is SymbolKind.STATE:
            self.updates_so_far[name] = Definition(name, indices, composed)
            if self.staged:
                n = self.stage_count.get(name, 0)
                previous = f"{name}{STAGE_SUFFIX}{n}"
                if n:  # S (the previous step's value, read through a temporary) -> S__stage0, then S__stageN -> S
                    composed = self._rename_state(composed, name, f"{name}{STAGE_SUFFIX}0")
                    composed = self._rename_state(composed, previous, name)
                self.stage_defs.setdefault(name, []).append(Definition(name, indices, composed))
                self.stage_count[name] = n + 1
                if self.last_update[name] != stmt.index:
                    value = f"{name}{STAGE_SUFFIX}{n + 1}"
                    self.current[name] = (indices, sympy.IndexedBase(value)[indices] if indices
                                          else sympy.Symbol(value))
                    return
            if self.last_update[name] == stmt.index:
                self.current[name] = None
                return
        self.current[name] = (indices, composed)

    @staticmethod
    def _rename_state(expr: sympy.Expr, old: str, new: str) -> sympy.Expr:
        return expr.xreplace({sympy.IndexedBase(old): sympy.IndexedBase(new), sympy.Symbol(old): sympy.Symbol(new)})

    def build(self) -> StepIR:
        self.updates_so_far: dict[str, Definition] = {}
        self.stage_defs: dict[str, list[Definition]] = {}
        for stmt in self.rec.statements:
            self.statement(stmt)
        updates = {}
        for sym in self.rec.states:
            if sym.name in self.updates_so_far:
                updates[sym.name] = self.updates_so_far[sym.name]
            else:  # never assigned: carried unchanged
                idx = tuple(index_symbol(f"s{p}") for p in range(len(sym.dims)))
                for s, d in zip(idx, sym.dims):
                    self.ranges[s] = _size(d)
                base = sympy.IndexedBase(sym.name)[idx] if idx else sympy.Symbol(sym.name)
                updates[sym.name] = Definition(sym.name, idx, base)
        outputs = {}
        for sym in self.rec.outputs:
            indices, expr = self.current[sym.name]
            outputs[sym.name] = Definition(sym.name, indices, expr)
        stages = {n: tuple(d) for n, d in self.stage_defs.items() if len(d) > 1}
        return StepIR(tuple(self.written), updates, outputs, dict(self.ranges),
                      tuple(size_symbol(s) for s in self.rec.sizes), stages)


def build_step_ir(rec: CheckedRecurrence) -> StepIR:
    """Translate a checked recurrence into sympy and compose its statements (with `stages` for every state
    assigned more than once)."""
    first = _Builder(rec)
    ir = first.build()
    if not any(n > 1 for n in _assignment_counts(rec).values()):
        return ir
    builder = _Builder(rec, staged=True)
    builder.fresh = itertools.count(next(first.fresh))  # its renamed sums must not clash with the first pass's
    staged = builder.build()
    # (index symbols of the staged pass's sums join the ranges; both passes name targets alike)
    return StepIR(ir.statements, ir.updates, ir.outputs, {**staged.ranges, **ir.ranges}, ir.sizes, staged.stages)


def _assignment_counts(rec: CheckedRecurrence) -> dict[str, int]:
    counts: dict[str, int] = {}
    for stmt in rec.statements:
        if stmt.target.kind is SymbolKind.STATE:
            counts[stmt.target.name] = counts.get(stmt.target.name, 0) + 1
    return counts
