"""Random inputs that keep a recurrence stable, for `recdsl check` and the tests.

A spec says nothing about the distribution of its inputs, but a decay written
`exp(x)` only behaves when `x <= 0`, and a delta rule only when its keys have
unit norm. The rules, read off the body:

- a symbol inside an `exp(...)` argument gets the sign that makes the argument
  negative (in a product `dt * A`, the params take the sign and inputs stay
  positive, as in Mamba; with no param, the first factor takes it);
- a symbol inside `log`/`sqrt` is positive;
- a vector input contracted with a state inside a state update (the key of a
  delta rule) is L2-normalised over its last axis;
- an input or param multiplying a state directly (a decay written `a[i] * S[i, j]`,
  not `exp(...)`) lies in (0.5, 0.95): positive, as the chunked forms' logarithm needs;
  so do the inputs and params a temporary decay is written in, outside calls and sums
  (HGRN's lower bound lb in `f = lb + (1 - lb) * sigmoid(g)`, `S = f * S + ...`);
- other scalar inputs lie in (0, 1) (gates such as `beta`); everything else is
  standard normal scaled by 1/sqrt(last dim).
"""

from __future__ import annotations

import math

import torch

from . import syntax as ast
from .check import CheckedRecurrence, SymbolKind


def _symbols_in(expr) -> set[str]:
    found: set[str] = set()

    def walk(e):
        if isinstance(e, (ast.Name, ast.Indexed)):
            found.add(e.name)
        for child in _children(e):
            walk(child)

    walk(expr)
    return found


def _children(e) -> tuple:
    if isinstance(e, ast.BinOp):
        return (e.left, e.right)
    if isinstance(e, ast.Neg):
        return (e.operand,)
    if isinstance(e, ast.Call):
        return e.args
    if isinstance(e, ast.Sum):
        return (e.body,)
    return ()


class _Roles:
    def __init__(self, rec: CheckedRecurrence):
        self.rec = rec
        self.kinds = {s.name: s.kind for s in rec.inputs + rec.params}
        self.sign: dict[str, int] = {}
        self.positive: set[str] = set()
        self.unit_keys: set[str] = set()
        self.decays: set[str] = set()
        states = {s.name for s in rec.states}
        self.temps = {stmt.target.name: stmt.value for stmt in rec.statements if stmt.target in rec.temps}
        for stmt in rec.statements:
            self.visit(stmt.value, states)
            if stmt.target.name in states:
                self.decay_factors(stmt.value, stmt.target.name)

    def visit(self, e, states: set[str]) -> None:
        if isinstance(e, ast.Call) and e.func == "exp":
            self.signs(e.args[0], -1)
        if isinstance(e, ast.Call) and e.func in ("log", "sqrt"):
            self.positive |= _symbols_in(e.args[0])
        if isinstance(e, ast.Sum) and _symbols_in(e.body) & states:
            for name in _symbols_in(e.body) - states:
                if self.kinds.get(name) is SymbolKind.INPUT:
                    self.unit_keys.add(name)
        for child in _children(e):
            self.visit(child, states)

    def decay_factors(self, e, state: str) -> None:
        """Inputs and params in a term `a * S` of the state's own update (not inside sums or calls)."""
        if isinstance(e, ast.BinOp) and e.op in "+-":
            self.decay_factors(e.left, state)
            self.decay_factors(e.right, state)
        elif isinstance(e, ast.Neg):
            self.decay_factors(e.operand, state)
        elif isinstance(e, ast.BinOp) and e.op == "*":
            factors = _factors(e)
            if any(isinstance(f, (ast.Name, ast.Indexed)) and f.name == state for f in factors):
                for f in factors:
                    if isinstance(f, (ast.Name, ast.Indexed)):
                        self.decay_names(f.name, set())

    def decay_names(self, name: str, seen: set[str]) -> None:
        """Mark `name` a decay factor: an input or param itself, or through a temporary the inputs and params of
        its definition's terms and factors (not inside calls or sums, whose arguments other rules draw)."""
        if name in self.kinds:
            self.decays.add(name)
        elif name in self.temps and name not in seen:
            seen.add(name)
            for leaf in _arithmetic_leaves(self.temps[name]):
                self.decay_names(leaf, seen)

    def signs(self, e, want: int) -> None:
        if isinstance(e, (ast.Name, ast.Indexed)):
            if e.name in self.kinds:
                self.sign.setdefault(e.name, want)
        elif isinstance(e, ast.Neg):
            self.signs(e.operand, -want)
        elif isinstance(e, ast.BinOp) and e.op in "+-":
            self.signs(e.left, want)
            self.signs(e.right, want if e.op == "+" else -want)
        elif isinstance(e, ast.BinOp) and e.op in "*/":
            factors = _factors(e)
            names = [f for f in factors if isinstance(f, (ast.Name, ast.Indexed, ast.Neg))]
            params = [f for f in names if getattr(f, "name", None) and self.kinds.get(f.name) is SymbolKind.PARAM]
            lead = params[0] if params else (names[0] if names else None)
            for f in factors:
                self.signs(f, want if f is lead else 1)


def _arithmetic_leaves(e) -> list[str]:
    """The names in `e` reached through + - * / and negation alone."""
    if isinstance(e, (ast.Name, ast.Indexed)):
        return [e.name]
    if isinstance(e, ast.BinOp) and e.op in "+-*/":
        return _arithmetic_leaves(e.left) + _arithmetic_leaves(e.right)
    if isinstance(e, ast.Neg):
        return _arithmetic_leaves(e.operand)
    return []


def _factors(e) -> list:
    if isinstance(e, ast.BinOp) and e.op in "*/":
        return _factors(e.left) + _factors(e.right)
    return [e]


def sample_arguments(rec: CheckedRecurrence, sizes: dict[str, int], batch: int, length: int, heads: int,
                     dtype: torch.dtype = torch.float32, seed: int = 0, decay_scale: float = 1.0,
                     with_initial_state: bool = False, rows: int | None = None, device: str | None = None):
    """Inputs and params (in declared order) and optionally an initial state, drawn per the rules above.
    device: where to draw (default the CPU); a CUDA device draws other numbers from the same seed, in
    milliseconds where the CPU takes seconds at benchmark sizes."""
    gen = torch.Generator(device=device or "cpu").manual_seed(seed)
    roles = _Roles(rec)

    def dims(sym):
        return tuple(sizes[d] if isinstance(d, str) else d for d in sym.dims)

    def draw(sym, lead):
        shape = lead + dims(sym)
        x = torch.randn(shape, generator=gen, dtype=torch.float64, device=device)
        sign = roles.sign.get(sym.name)
        if sign is not None:
            # Log-gates: magnitudes in (0.01, decay_scale]; inputs as in Mamba's dt when a param takes the sign.
            mag = 0.01 + (decay_scale - 0.01) * torch.rand(shape, generator=gen, dtype=torch.float64, device=device)
            return sign * mag
        if sym.name in roles.positive:
            return 0.1 + torch.rand(shape, generator=gen, dtype=torch.float64, device=device)
        if sym.name in roles.decays:
            return 0.5 + 0.45 * torch.rand(shape, generator=gen, dtype=torch.float64, device=device)
        if sym.name in roles.unit_keys and sym.dims:
            return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        if not sym.dims and sym.kind is SymbolKind.INPUT:
            return torch.sigmoid(x)
        if sym.kind is SymbolKind.PARAM and not sym.dims:
            # e.g. RetNet's gamma
            return 0.5 + 0.45 * torch.rand(shape, generator=gen, dtype=torch.float64, device=device)
        scale = 1.0 / math.sqrt(shape[-1]) if sym.dims and shape[-1] else 1.0  # (a zero-size axis: empty)
        return x * scale

    args = [draw(s, (batch, length, heads)).to(dtype) for s in rec.inputs]
    args += [draw(s, (heads,)).to(dtype) for s in rec.params]
    initial = None
    if with_initial_state and rec.states:
        n = rows if rows is not None else batch
        states = {s.name: (0.5 * torch.randn((n, heads) + dims(s), generator=gen, dtype=torch.float64,
                                             device=device)).to(dtype)
                  for s in rec.states}
        initial = states if len(rec.states) > 1 else states[rec.states[0].name]
    return args, initial


def param_roles(rec: CheckedRecurrence) -> dict[str, str]:
    """How each param that the rules above constrain must be drawn, by name: "negative" or "positive" (inside an
    `exp(...)` argument, the sign that makes it negative), "factor" (multiplies a state directly: in (0, 1)).
    Params the rules say nothing about are absent. The generated nn.Module starts its decay params from these."""
    roles = _Roles(rec)
    found = {}
    for p in rec.params:
        sign = roles.sign.get(p.name)
        if sign is not None:  # the same order as `sample_arguments`' draw: a sign wins
            found[p.name] = "negative" if sign < 0 else "positive"
        elif p.name in roles.decays:
            found[p.name] = "factor"
    return found
