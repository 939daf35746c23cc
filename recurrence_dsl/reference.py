"""The reference interpreter: runs a checked body step by step, exactly as written.

It is the oracle every compiled form is measured against, so it stays simple:
one Python loop over time, each expression evaluated with named axes (one per
index variable), float64 by default. It works on any valid body, linear or not,
and autograd flows through it.
"""

from __future__ import annotations

import torch

from . import syntax as ast
from .calling import BoundCall, bind_call, pack_result
from .check import CheckedRecurrence, SymbolKind, torch_functions

TORCH_FUNCTIONS = torch_functions()  # shared with the checker's constant folding


class _Named:
    """A tensor `[*batch, *axes]` whose trailing axes are named by index variables."""

    __slots__ = ("t", "axes")

    def __init__(self, t: torch.Tensor, axes: tuple[str, ...]):
        self.t = t
        self.axes = axes


def _align(x: _Named, axes: tuple[str, ...], nbatch: int) -> torch.Tensor:
    """x's tensor with its axes permuted into `axes` order, size-1 axes where x lacks one."""
    t = x.t
    if x.axes == axes:
        return t
    present = [a for a in axes if a in x.axes]
    perm = list(range(nbatch)) + [nbatch + x.axes.index(a) for a in present]
    if t.dim() > nbatch:
        t = t.permute(perm)
    shape = list(t.shape[:nbatch])
    it = iter(t.shape[nbatch:])
    for a in axes:
        shape.append(next(it) if a in x.axes else 1)
    return t.reshape(shape)


class StepEvaluator:
    """Evaluates checked expressions for one step; batch axes lead every tensor."""

    def __init__(self, rec: CheckedRecurrence, sizes: dict[str, int], nbatch: int, dtype: torch.dtype,
                 device: torch.device):
        self.rec = rec
        self.sizes = sizes
        self.nbatch = nbatch
        self.dtype = dtype
        self.device = device
        self.env: dict[str, torch.Tensor] = {}

    def scalar(self, value: float) -> _Named:
        return _Named(torch.tensor(value, dtype=self.dtype, device=self.device).reshape((1,) * self.nbatch), ())

    def binary(self, op, a: _Named, b: _Named) -> _Named:
        axes = a.axes + tuple(x for x in b.axes if x not in a.axes)
        return _Named(op(_align(a, axes, self.nbatch), _align(b, axes, self.nbatch)), axes)

    def eval(self, expr: ast.Expr) -> _Named:
        if isinstance(expr, ast.Number):
            return self.scalar(expr.value)
        if isinstance(expr, ast.Name):
            if expr.name in self.sizes:
                return self.scalar(float(self.sizes[expr.name]))
            return _Named(self.env[expr.name], ())
        if isinstance(expr, ast.Indexed):
            t = self.env[expr.name]
            axes = [i.name for i in expr.indices]
            # A repeated index (x[i, i]) reads the diagonal.
            while len(set(axes)) < len(axes):
                dup = next(a for a in axes if axes.count(a) > 1)
                p = axes.index(dup)
                q = axes.index(dup, p + 1)
                t = torch.diagonal(t, dim1=self.nbatch + p, dim2=self.nbatch + q)
                axes = [a for k, a in enumerate(axes) if k not in (p, q)] + [dup]
            return _Named(t, tuple(axes))
        if isinstance(expr, ast.BinOp):
            a, b = self.eval(expr.left), self.eval(expr.right)
            op = {"+": torch.add, "-": torch.sub, "*": torch.mul, "/": torch.div, "**": torch.pow}[expr.op]
            return self.binary(op, a, b)
        if isinstance(expr, ast.Neg):
            x = self.eval(expr.operand)
            return _Named(-x.t, x.axes)
        if isinstance(expr, ast.Call):
            fn = TORCH_FUNCTIONS[expr.func]
            if len(expr.args) == 1:
                x = self.eval(expr.args[0])
                return _Named(fn(x.t), x.axes)
            return self.binary(fn, self.eval(expr.args[0]), self.eval(expr.args[1]))
        if isinstance(expr, ast.Sum):
            body = self.eval(expr.body)
            names = [i.name for i in expr.indices]
            dims = [self.nbatch + body.axes.index(n) for n in names]
            return _Named(body.t.sum(dim=dims), tuple(a for a in body.axes if a not in names))
        raise TypeError(f"unexpected node {expr!r}")

    def assign(self, stmt, batch_shape: tuple[int, ...]) -> None:
        value = self.eval(stmt.value)
        dims = tuple(self.sizes[d] if isinstance(d, str) else d for d in stmt.target.dims)
        t = _align(value, stmt.indices, self.nbatch)
        self.env[stmt.target.name] = t.expand(batch_shape + dims)


def run_reference(rec: CheckedRecurrence, *args, dtype: torch.dtype = torch.float64, **kwargs):
    """Run the body step by step: `(output, final_state)` per the calling convention (docs/language.md), in
    `dtype`. `reverse=True` (or a `reverse recurrence`) steps t = T-1, ..., 0, each packed sequence of
    `cu_seqlens` on its own."""
    call = bind_call(rec, args, kwargs)
    return run_bound(rec, call, dtype)


def run_bound(rec: CheckedRecurrence, call: BoundCall, dtype: torch.dtype = torch.float64):
    if call.cu_seqlens is None:
        outputs, finals = _run_batch(rec, call, dtype, call.inputs, call.initial_state)
    else:
        # Packed sequences: each runs from its own initial state, independently.
        pieces: list[dict] = []
        final_rows: list[dict] = []
        bounds = call.cu_seqlens.tolist()
        for n in range(len(bounds) - 1):
            lo, hi = bounds[n], bounds[n + 1]
            inputs = {k: v[:, lo:hi] for k, v in call.inputs.items()}
            init = None if call.initial_state is None else {k: v[n : n + 1] for k, v in call.initial_state.items()}
            out, fin = _run_batch(rec, call, dtype, inputs, init)
            pieces.append(out)
            final_rows.append(fin)
        outputs = {o.name: torch.cat([p[o.name] for p in pieces], dim=1) for o in rec.outputs}
        finals = {s.name: torch.cat([f[s.name] for f in final_rows], dim=0) for s in rec.states}
    return pack_result(rec, outputs, finals if call.output_final_state else None)


def _run_batch(rec: CheckedRecurrence, call: BoundCall, dtype: torch.dtype, inputs: dict, initial_state):
    first = next(iter(inputs.values()))
    batch, length, heads = first.shape[:3]
    batch_shape = (batch, heads)
    ev = StepEvaluator(rec, call.sizes, 2, dtype, call.device)
    states = {}
    for sym in rec.states:
        shape = batch_shape + call.dims(sym)
        if initial_state is None:
            states[sym.name] = torch.zeros(shape, dtype=dtype, device=call.device)
        else:
            states[sym.name] = initial_state[sym.name].to(dtype)
    params = {name: p.to(dtype).unsqueeze(0) for name, p in call.params.items()}  # [1, H, ...]
    steps: dict[str, list[torch.Tensor | None]] = {o.name: [None] * length for o in rec.outputs}
    cast = {name: x.to(dtype) for name, x in inputs.items()}
    # A reverse call steps from the last step to the first here, on its own (no flips), so that it checks the
    # compiled forms' flipped runs rather than sharing their logic.
    for t in (reversed(range(length)) if call.reverse else range(length)):
        ev.env = {**params, **states}
        for name, x in cast.items():
            ev.env[name] = x[:, t]
        for stmt in rec.statements:
            ev.assign(stmt, batch_shape)
        for sym in rec.states:
            states[sym.name] = ev.env[sym.name]
        for o in rec.outputs:
            steps[o.name][t] = ev.env[o.name]
    outputs = {}
    for o in rec.outputs:
        if length:
            outputs[o.name] = torch.stack(steps[o.name], dim=1)
        else:
            outputs[o.name] = torch.zeros((batch, 0, heads) + call.dims(o), dtype=dtype, device=call.device)
    return outputs, states


__all__ = ["run_reference", "run_bound", "StepEvaluator", "TORCH_FUNCTIONS", "SymbolKind"]
