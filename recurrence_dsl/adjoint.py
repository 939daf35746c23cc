"""The adjoint of the step, derived symbolically from the step IR (reverse mode on sympy expressions).

One step maps (inputs_t, params, S_{t-1}) to (S_t, outputs_t). Given the gradients of the loss with respect to
the outputs of step t (`o__grad`) and to S_t from everything after step t (`S__grad`), reverse mode gives

    S__new__grad = S__grad + (d outputs_t / d S_t)^T o__grad + (d updates of later states / d S_t)^T ...
    S_{t-1}:  (d S_t / d S_{t-1})^T S__new__grad + (d outputs_t / d S_{t-1})^T o__grad
    x_t:      (d S_t / d x_t)^T S__new__grad + (d outputs_t / d x_t)^T o__grad          (every input x)
    p:        the same for a param p, one term per step (the caller sums them over batch rows and steps)

so the state gradient runs backwards in time, and every input's and param's gradient is local to its step given
S_{t-1}, S_t and the total gradient of S_t.

Index structure is kept: a value is `name[indices]` with named index symbols, and `sum(i, ...)` is a
`sympy.Sum`. The vector-Jacobian product walks an expression top down carrying the cotangent `C`, an expression
over the indices in scope (the target's indices and those of the enclosing sums): an `Add` passes `C` to each term,
a `Mul` multiplies it by the other factors, a function by its derivative (`fdiff`), a `Sum` widens the scope by its
bound indices. At a leaf `x[a, b]` the contribution to the gradient of `x` is `C` summed over the indices in scope
that the leaf does not carry, written over the leaf's indices: so `o[j] = sum(i, q[i] * S[i, j])` gives
`dq[i] = sum(j, do[j] * S[i, j])` and `dS[i, j] = do[j] * q[i]`, which the printers turn into matrix products.
Bound indices are renamed apart wherever an expression is copied into a new scope, so nothing is captured.
Two rewrites follow: a subexpression equal to a state's update becomes the new state (`1 - tanh(...)**2` is
`1 - h__new**2`, read from the recomputed states), and factors of a sum free of its bound indices move in front
of it (`factor_sums`), so a rank-one term stays a vector times a matrix-vector product.

No autograd is involved: the adjoint is sympy expressions, printed as torch code by codegen/torch_forms.py.

Names inside the adjoint IR, besides those of the step IR: `o__grad` (an output's gradient), `S__grad` (the
gradient of S_t from after step t), `S__new__grad` (S_t's total gradient at step t).

A leaf read with a repeated index (`x[i, i]`, a diagonal) has no gradient written over its own indices here:
`derive_adjoint` raises `NoAdjoint`, and the recurrent form keeps autograd through its loop.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import sympy

from .check import CheckedRecurrence
from .step_ir import NEW_SUFFIX, Definition, StepIR, index_symbol

GRAD_SUFFIX = "__grad"
# The least base of sqrt in its derivative (`_Deriver.walk`): float32's smallest normal number, 2**-126.
SQRT_FLOOR = sympy.Float(2.0**-126)


class NoAdjoint(Exception):  # noqa: N818 - a reason, like NonLinear in analysis
    """The step holds something the symbolic adjoint does not differentiate."""


def grad_name(name: str) -> str:
    """The IR name of the gradient with respect to `name` (an output, a state S or its new value S__new)."""
    return name + GRAD_SUFFIX


@dataclass(frozen=True)
class AdjointStep:
    """The adjoint of one step.

    `new_states`: for each state in reverse order of its last update, the total gradient of S_t
        (named `S__new__grad`); it reads `S__grad`, the outputs' gradients and the totals listed before it.
    `previous`: each state's gradient with respect to S_{t-1} (named `S`), reading the totals.
    `inputs`: each input's gradient at the step; `params`: each param's term at the step (per batch row).
    A gradient that is identically zero is `None`.
    `ranges`: the ranges of every index symbol, the step IR's and the fresh ones.
    """

    new_states: tuple[Definition, ...]
    previous: dict[str, Definition]
    inputs: dict[str, Definition | None]
    params: dict[str, Definition | None]
    ranges: dict[sympy.Symbol, sympy.Expr]


def reads(e: sympy.Expr, names: set[str]) -> bool:
    """Whether `e` reads any of `names` (an indexed tensor or a scalar of that name)."""
    return any((isinstance(n, sympy.Indexed) and str(n.base) in names)
               or (isinstance(n, sympy.Symbol) and n.name in names) for n in sympy.preorder_traversal(e))


class _Deriver:
    def __init__(self, ir: StepIR, wrt: set[str]):
        self.ranges = dict(ir.ranges)
        self.wrt = wrt
        self.counter = itertools.count()
        # name -> (leaf indices, contribution over them, in canonical indices later)
        self.found: dict[str, list[tuple[tuple, sympy.Expr]]] = {}

    def fresh(self, var: sympy.Symbol) -> sympy.Symbol:
        new = index_symbol(f"{var.name.split('__')[0]}__d{next(self.counter)}")  # apart from step_ir's i__0
        self.ranges[new] = self.ranges[var]
        return new

    def freshen(self, e: sympy.Expr) -> sympy.Expr:
        """`e` with every bound index of its sums renamed to a fresh symbol (innermost first)."""
        if not e.has(sympy.Sum):
            return e
        if isinstance(e, sympy.Sum):
            body = self.freshen(e.function)
            mapping, limits = {}, []
            for var, lo, hi in e.limits:
                mapping[var] = self.fresh(var)
                limits.append((mapping[var], lo, hi))
            return sympy.Sum(body.xreplace(mapping), *limits)
        return e.func(*[self.freshen(a) for a in e.args])

    def walk(self, e: sympy.Expr, cot: sympy.Expr, scope: tuple[sympy.Symbol, ...]) -> None:
        if not reads(e, self.wrt):
            return
        if isinstance(e, sympy.Indexed):
            self.leaf(str(e.base), tuple(e.indices), cot, scope)
        elif isinstance(e, sympy.Symbol):
            self.leaf(e.name, (), cot, scope)
        elif isinstance(e, sympy.Add):
            for arg in e.args:
                self.walk(arg, cot, scope)
        elif isinstance(e, sympy.Mul):
            args = e.args
            for k, arg in enumerate(args):
                if reads(arg, self.wrt):
                    self.walk(arg, cot * sympy.Mul(*(args[:k] + args[k + 1:])), scope)
        elif isinstance(e, sympy.Pow):
            base, exp = e.args
            if reads(base, self.wrt):
                # sqrt's derivative 1 / (2 sqrt(x)) is inf at x = 0, and NaN times a factor that is 0 there (RG-LRU's
                # fully closed gate: sqrt(1 - a^2) at a = 1, where the gate's own derivative is 0): in the derivative
                # only, x is held at least SQRT_FLOOR, so the product is its limit, 0 (Griffin's RG-LRU bounds this
                # derivative too, at a larger bound); the value, and the derivative wherever x >= SQRT_FLOOR, unchanged.
                held = sympy.Max(base, SQRT_FLOOR) if exp == sympy.Rational(1, 2) and not base.is_number else base
                self.walk(base, cot * exp * held ** (exp - 1), scope)
            if reads(exp, self.wrt):
                self.walk(exp, cot * e * sympy.log(base), scope)
        elif isinstance(e, sympy.Sum):
            self.walk(e.function, cot, scope + tuple(limit[0] for limit in e.limits))
        elif isinstance(e, (sympy.Function, sympy.Min, sympy.Max)):
            for k, arg in enumerate(e.args):
                if reads(arg, self.wrt):
                    self.walk(arg, cot * e.fdiff(k + 1), scope)
        else:
            raise NoAdjoint(f"cannot differentiate {type(e).__name__}: {e}")

    def leaf(self, name: str, indices: tuple, cot: sympy.Expr, scope: tuple) -> None:
        if name not in self.wrt:
            return
        if len(set(indices)) < len(indices):
            raise NoAdjoint(f"{name} is read with a repeated index ({name}[{', '.join(map(str, indices))}])")
        cot = self.freshen(cot)
        extras = [v for v in scope if v not in indices]
        if extras:
            renamed = {v: self.fresh(v) for v in extras}
            cot = sympy.Sum(cot.xreplace(renamed), *[(renamed[v], 0, self.ranges[v] - 1) for v in extras])
        self.found.setdefault(name, []).append((indices, cot))

    def gradient(self, name: str, canonical: tuple) -> sympy.Expr | None:
        terms = [c.xreplace(dict(zip(idx, canonical))) for idx, c in self.found.get(name, [])]
        return sympy.Add(*terms) if terms else None


class _NewStates:
    """Replaces a subexpression equal to a state's update (up to index names) by the new state it computes:
    indrnn's `1 - tanh(w[d] * h[d] + x[d])**2` becomes `1 - h__new[d]**2`, read from the recomputed states."""

    def __init__(self, ir: StepIR, ranges: dict):
        self.ranges = ranges
        self.updates = {}
        for name, d in ir.updates.items():
            if isinstance(d.expr, (sympy.Indexed, sympy.Symbol)) or set(d.indices) != {
                    s for s in d.expr.free_symbols if s in ranges}:
                continue  # a state carried as it is, or not a function of all its indices
            key, order = canonical_key(d.expr, ranges)
            self.updates[key] = (name, d.indices, order, type(d.expr))

    def __call__(self, e: sympy.Expr) -> sympy.Expr:
        if not self.updates or isinstance(e, (sympy.Indexed, sympy.Symbol, sympy.Number)):
            return e
        if any(type(e) is kind for *_, kind in self.updates.values()):
            key, order = canonical_key(e, self.ranges)
            if key in self.updates:
                name, indices, first, _ = self.updates[key]
                site = tuple(order[first.index(i)] for i in indices)
                return _tensor(name + NEW_SUFFIX, site)
        if isinstance(e, sympy.Sum):
            return sympy.Sum(self(e.function), *e.limits)
        return e.func(*[self(a) for a in e.args]) if e.args else e


def factor_sums(e: sympy.Expr) -> sympy.Expr:
    """Factors of a sum's body that do not depend on its bound indices moved in front of it:
    `sum(c, -beta * k[i] * k[c] * G[c, j])` becomes `-beta * k[i] * sum(c, k[c] * G[c, j])`, a vector times a
    vector-matrix product rather than a [K, K, V] product summed."""
    if not e.has(sympy.Sum) or isinstance(e, (sympy.Indexed, sympy.Symbol)):
        return e
    if isinstance(e, sympy.Sum):
        body = factor_sums(e.function)
        bound = {limit[0] for limit in e.limits}
        factors = sympy.Mul.make_args(body)
        outside = [f for f in factors if not (f.free_symbols & bound)]
        inside = [f for f in factors if f.free_symbols & bound]
        if outside and inside:
            return sympy.Mul(*outside) * sympy.Sum(sympy.Mul(*inside), *e.limits)
        return sympy.Sum(body, *e.limits)
    return e.func(*[factor_sums(a) for a in e.args])


def nest_sums(e: sympy.Expr, ranges: dict) -> sympy.Expr:
    """A sum over several indices of a product as nested sums, the innermost over the index whose factors leave the
    fewest free indices (`ranges`: the index symbols): `sum(i, j, S[a, j] * G[i, j] * k[i])` becomes
    `sum(j, S[a, j] * sum(i, G[i, j] * k[i]))`. The inner `k^T G` is then a sum of its own, which a printer's
    common-subexpression pass can share with another gradient that reads it (the delta rule's dk, dv and dbeta all
    contract `k` with the state's gradient)."""
    if not e.has(sympy.Sum) or isinstance(e, (sympy.Indexed, sympy.Symbol)):
        return e
    if not isinstance(e, sympy.Sum):
        return e.func(*[nest_sums(a, ranges) for a in e.args])
    body = nest_sums(e.function, ranges)
    factors = sympy.Mul.make_args(body)
    choices = []
    for n, (var, _, _) in enumerate(e.limits):
        inside = [f for f in factors if var in f.free_symbols]
        if 0 < len(inside) < len(factors):
            left = set().union(*(f.free_symbols for f in inside)) & set(ranges) - {var}
            choices.append((len(left), n, inside))
    if len(e.limits) < 2 or not choices:
        return sympy.Sum(body, *e.limits)
    _, n, inside = min(choices, key=lambda c: c[:2])
    inner = sympy.Sum(sympy.Mul(*inside), e.limits[n])
    outside = sympy.Mul(*[f for f in factors if f not in inside]) * inner
    return nest_sums(sympy.Sum(outside, *(e.limits[:n] + e.limits[n + 1:])), ranges)


def _tensor(name: str, indices: tuple) -> sympy.Expr:
    return sympy.IndexedBase(name)[indices] if indices else sympy.Symbol(name)


def canonical_bound(e: sympy.Expr) -> sympy.Expr:
    """`e` with the bound indices of its sums renamed by nesting height (`_b1_0` innermost), so that expressions
    that differ only in the names of bound indices become equal (a key for sharing them, never printed)."""

    def walk(e: sympy.Expr) -> tuple[sympy.Expr, int]:
        if not e.has(sympy.Sum):
            return e, 0
        if isinstance(e, sympy.Sum):
            body, height = walk(e.function)
            mapping = {var: index_symbol(f"_b{height + 1}_{n}") for n, (var, _, _) in enumerate(e.limits)}
            limits = [(mapping[var], lo, hi) for var, lo, hi in e.limits]
            return sympy.Sum(body.xreplace(mapping), *limits), height + 1
        parts = [walk(a) for a in e.args]
        return e.func(*[p for p, _ in parts]), max(h for _, h in parts)

    return walk(e)[0]


def canonical_key(e: sympy.Expr, ranges: dict) -> tuple[str, tuple[sympy.Symbol, ...]]:
    """(a key, the free indices of `e` in the key's order): the key is equal for expressions that differ only in
    the names of their indices, bound or free, so one tensor `P[free...]` can stand for each of them."""
    e = canonical_bound(e)
    free = sorted((s for s in e.free_symbols if s in ranges), key=lambda s: s.name)
    orders = itertools.permutations(free) if len(free) <= 4 else [tuple(free)]
    best = None
    for order in orders:
        text = sympy.srepr(e.xreplace({s: index_symbol(f"_f{k}") for k, s in enumerate(order)}))
        if best is None or text < best[0]:
            best = (text, tuple(order))
    return best


def update_order(rec: CheckedRecurrence) -> list:
    """States in the order of their last assignment (a later update may read an earlier one's new value)."""
    last = {st.target.name: st.index for st in rec.statements}
    return sorted(rec.states, key=lambda s: last.get(s.name, -1))


def derive_adjoint(rec: CheckedRecurrence, ir: StepIR) -> AdjointStep:
    """The adjoint step of `rec` (see the module docstring); raises `NoAdjoint` for what it cannot differentiate."""
    states = [s.name for s in rec.states]
    wrt = ({s.name for s in rec.inputs + rec.params} | set(states) | {s + NEW_SUFFIX for s in states})
    d = _Deriver(ir, wrt)
    for name, definition in ir.outputs.items():
        d.walk(definition.expr, _tensor(grad_name(name), definition.indices), definition.indices)
    for name, definition in ir.updates.items():
        d.walk(definition.expr, _tensor(grad_name(name + NEW_SUFFIX), definition.indices), definition.indices)

    new_states = []
    new_state = _NewStates(ir, d.ranges)

    def reuse(e: sympy.Expr) -> sympy.Expr:
        return factor_sums(new_state(e))

    for s in reversed(update_order(rec)):
        idx = ir.updates[s.name].indices
        incoming = _tensor(grad_name(s.name), idx)
        extra = d.gradient(s.name + NEW_SUFFIX, idx)
        new_states.append(Definition(grad_name(s.name + NEW_SUFFIX), idx, reuse(incoming + extra) if extra is not None
                                     else incoming))
    previous = {}
    for s in rec.states:
        idx = ir.updates[s.name].indices
        expr = d.gradient(s.name, idx)
        previous[s.name] = Definition(s.name, idx, reuse(expr) if expr is not None else sympy.Integer(0))
    inputs, params = {}, {}
    for group, out in ((rec.inputs, inputs), (rec.params, params)):
        for sym in group:
            found = d.found.get(sym.name)
            if not found:
                out[sym.name] = None
                continue
            idx = found[0][0]  # the first leaf's indices (distinct symbols), for readable printed code
            out[sym.name] = Definition(sym.name, idx, reuse(d.gradient(sym.name, idx)))
    return AdjointStep(tuple(new_states), previous, inputs, params, d.ranges)


class _Ranges:
    """What `_Deriver` reads of a step IR: the range of every index symbol."""

    def __init__(self, ranges: dict):
        self.ranges = ranges


def derive_vjp(values: list[tuple[str, tuple, sympy.Expr]], wrt: set[str],
               ranges: dict[sympy.Symbol, sympy.Expr]) -> tuple[dict[str, Definition], dict]:
    """The vector-Jacobian product of a function of tensors: `values` [(name, indices, expression)] are its results
    (each `name[indices] = expression`), `wrt` the names of its arguments; the cotangent of `name` is the tensor
    `name__grad` over the value's indices. Returns ({argument read: Definition(argument, its indices, its gradient)},
    the ranges of every index, the fresh ones of the walk included). The same reverse-mode walk as `derive_adjoint`
    (see the module docstring), for a function with no state: the chunked forms' prologue and epilogue
    (codegen/torch_forms.py). Raises `NoAdjoint` for what it cannot differentiate."""
    d = _Deriver(_Ranges(dict(ranges)), wrt)
    for name, indices, expr in values:
        d.walk(expr, _tensor(grad_name(name), indices), indices)
    out = {}
    for name, found in d.found.items():
        idx = found[0][0]  # the first leaf's indices (distinct symbols), for readable printed code
        out[name] = Definition(name, idx, d.gradient(name, idx))
    return out, d.ranges


__all__ = ["GRAD_SUFFIX", "AdjointStep", "NoAdjoint", "canonical_bound", "canonical_key", "derive_adjoint",
           "derive_vjp", "factor_sums", "grad_name", "nest_sums", "update_order"]
