"""Print step-IR (sympy) expressions as PyTorch source.

Every tensor carries leading batch axes ([B, H] in a step, [B, T, H] when
vectorised over time) followed by one axis per index symbol. `print_expr(e,
axes)` returns source evaluating `e` broadcastable to `[..., *axes]`: operands
are moved and padded with `None` so that each index lines up with `axes`, and
a `sum` over a product of tensors becomes one `torch.einsum`.
"""

from __future__ import annotations

import re

import sympy

from recurrence_dsl.step_ir import elu, logsigmoid, relu, sigmoid, silu, softplus

from .printing import ADD as _ADD
from .printing import ATOM as _ATOM
from .printing import MUL as _MUL
from .printing import POW as _POW
from .printing import UNARY as _UNARY
from .printing import ExprPrinter, constant_source, is_constant

_PLAIN_NUMBER = re.compile(r"[0-9.]+(e[+-]?[0-9]+)?")

FUNCTIONS = {
    sympy.exp: "torch.exp",
    sympy.log: "torch.log",
    sympy.Abs: "torch.abs",
    sympy.tanh: "torch.tanh",
    sigmoid: "torch.sigmoid",
    logsigmoid: "F.logsigmoid",
    softplus: "F.softplus",
    silu: "F.silu",
    elu: "F.elu",
    relu: "torch.relu",
}

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


class TorchPrinter(ExprPrinter):
    """`names` maps a tensor or scalar's IR name to the Python expression holding it."""

    def __init__(self, sizes: set[str], ranges: dict[sympy.Symbol, sympy.Expr], names: dict[str, str] | None = None):
        self.sizes = sizes
        self.ranges = ranges
        self.names = names or {}

    def name(self, ir_name: str) -> str:
        return self.names.get(ir_name, ir_name)

    def print_expr(self, expr: sympy.Expr, axes: tuple[sympy.Symbol, ...]) -> str:
        return self._p(expr, axes)[0]

    # -- helpers --------------------------------------------------------

    def _place(self, src_name: str, src: tuple[sympy.Symbol, ...], axes: tuple[sympy.Symbol, ...]) -> str:
        """Source for tensor `src_name` (trailing axes `src`) aligned to `axes`."""
        text = src_name
        src = list(src)
        # A repeated index (x[i, i]) reads the diagonal, which torch puts last.
        while len(set(src)) < len(src):
            dup = next(s for s in src if src.count(s) > 1)
            p = src.index(dup)
            q = src.index(dup, p + 1)
            n = len(src)
            text = f"torch.diagonal({text}, dim1={p - n}, dim2={q - n})"
            src = [s for k, s in enumerate(src) if k not in (p, q)] + [dup]
        order = sorted(range(len(src)), key=lambda p: axes.index(src[p]))
        n = len(src)
        if order != list(range(n)):
            moved_from = tuple(p - n for p in order)
            moved_to = tuple(range(-n, 0))
            text = f"{text}.movedim({moved_from}, {moved_to})"
        present = {src[p] for p in order}
        if all(a in present for a in axes):
            return text
        # Pad with None for the axes the operand does not have.
        parts = [":" if a in present else "None" for a in axes]
        return f"{text}[..., {', '.join(parts)}]"

    # -- the recursive printer: (source, precedence) ------------------------

    def _p(self, e: sympy.Expr, axes) -> tuple[str, int]:
        if not isinstance(e, (sympy.Number, sympy.Symbol)) and is_constant(e, self.sizes):
            # sqrt(K), exp(-1/8), sigmoid(2.0): a Python float, not a torch call on a non-tensor.
            text = constant_source(e, self.name)
            return (text if _PLAIN_NUMBER.fullmatch(text) else f"({text})"), _ATOM
        if isinstance(e, sympy.Number):
            text = self._number(e)
            return (f"({text})", _ATOM) if text.startswith("-") else (text, _ATOM)
        if isinstance(e, sympy.Indexed):
            return self._place(self.name(str(e.base)), tuple(e.indices), axes), _ATOM
        if isinstance(e, sympy.Symbol):
            if e.name in self.sizes:
                return self.name(e.name), _ATOM
            if e in self.ranges:
                raise ValueError(f"index {e} used as a value")
            return self._place(self.name(e.name), (), axes), _ATOM
        if isinstance(e, sympy.Add):
            terms = []
            for k, arg in enumerate(sympy.Add.make_args(e)):
                coeff, rest = arg.as_coeff_Mul()
                if k and coeff.is_number and coeff < 0:
                    text = self._wrap(-arg, axes, _MUL)
                    terms.append(f" - {text}")
                else:
                    terms.append((" + " if k else "") + self._wrap(arg, axes, _ADD))
            return "".join(terms), _ADD
        if isinstance(e, sympy.Mul):
            return self._mul(e, axes)
        if isinstance(e, sympy.Pow):
            base, exp = e.args
            if exp == sympy.Rational(1, 2):
                return f"torch.sqrt({self._p(base, axes)[0]})", _ATOM
            if exp == -1:
                return f"1.0 / {self._wrap(base, axes, _POW)}", _MUL
            return f"{self._wrap(base, axes, _POW + 1)} ** {self._wrap(exp, axes, _UNARY)}", _POW
        if isinstance(e, sympy.Sum):
            return self._sum(e, axes), _ATOM
        if isinstance(e, (sympy.Min, sympy.Max)):
            return self._minmax(e, axes), _ATOM
        if isinstance(e, sympy.Function) and type(e) in FUNCTIONS:
            return f"{FUNCTIONS[type(e)]}({self._p(e.args[0], axes)[0]})", _ATOM
        raise NotImplementedError(f"cannot print {type(e).__name__}: {e}")

    def _minmax(self, e, axes) -> str:
        a, b = e.args[0], sympy.Min(*e.args[1:]) if isinstance(e, sympy.Min) else sympy.Max(*e.args[1:])
        bound = "max" if isinstance(e, sympy.Min) else "min"
        if b.is_number:
            return f"torch.clamp({self._p(a, axes)[0]}, {bound}={self._number(b)})"
        if a.is_number:
            return f"torch.clamp({self._p(b, axes)[0]}, {bound}={self._number(a)})"
        fn = "torch.minimum" if isinstance(e, sympy.Min) else "torch.maximum"
        return f"{fn}({self._p(a, axes)[0]}, {self._p(b, axes)[0]})"

    def _sum(self, e: sympy.Sum, axes) -> str:
        bound = tuple(limit[0] for limit in e.limits)
        inner = tuple(axes) + bound
        body = e.function
        scale = sympy.Integer(1)
        for var in bound:
            if var not in body.free_symbols:
                scale *= self.ranges[var]
        einsum = self._einsum(body, axes, bound)
        if einsum is not None:
            text = einsum
        else:
            dims = tuple(range(-len(bound), 0))
            text = f"({self._p(body, inner)[0]}).sum(dim={dims if len(dims) > 1 else dims[0]})"
        if scale != 1:
            text = f"{text} * {self._wrap(scale, axes, _POW)}"
        return text

    def _einsum(self, body, axes, bound) -> str | None:
        """`sum_b x[a, b] * y[b]` as one einsum when the body is a product of tensors and scalars."""
        factors = sympy.Mul.make_args(body)
        tensors = [f for f in factors if isinstance(f, sympy.Indexed)]
        scalars = [f for f in factors if not isinstance(f, sympy.Indexed)]
        if len(tensors) < 2 or any(f.free_symbols & set(bound) for f in scalars):
            return None
        letters = {}
        for s in tuple(axes) + tuple(bound):
            letters[s] = _LETTERS[len(letters)]
        operands, subscripts = [], []
        for f in tensors:
            if len(set(f.indices)) < len(f.indices) or any(i not in letters for i in f.indices):
                return None
            operands.append(self.name(str(f.base)))
            subscripts.append("..." + "".join(letters[i] for i in f.indices))
        out_axes = [a for a in axes if any(a in f.indices for f in tensors)]
        out = "..." + "".join(letters[a] for a in out_axes)
        text = f"torch.einsum('{','.join(subscripts)}->{out}', {', '.join(operands)})"
        if out_axes != list(axes):
            text = self._place(text, tuple(out_axes), tuple(axes))
        if scalars:
            text = " * ".join([self._wrap(sympy.Mul(*scalars), axes, _MUL), text])
        return text
