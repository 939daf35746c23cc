"""Print step-IR (sympy) expressions as PyTorch source.

Every tensor carries leading batch axes ([B, H] in a step, [B, T, H] when
vectorised over time) followed by one axis per index symbol. `print_expr(e,
axes)` returns source evaluating `e` broadcastable to `[..., *axes]`: operands
are moved and padded with `None` so that each index lines up with `axes`, and
a `sum` over a product is contracted two operands at a time, each pair a
vector-matrix product (`x[..., None, :] @ M`) or a broadcast product summed
(never `torch.einsum`, whose planning costs more than a small step's arithmetic).
With `fuse`, `rest + a * b` is one `torch.addcmul`.
"""

from __future__ import annotations

import re

import sympy

from recurrence_dsl.step_ir import elu, expm1, log1p, logsigmoid, relu, sigmoid, silu, softplus, tanh

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
    tanh: "torch.tanh",
    sympy.tanh: "torch.tanh",  # (the step IR's is `tanh`)
    sigmoid: "torch.sigmoid",
    logsigmoid: "F.logsigmoid",
    softplus: "F.softplus",
    silu: "F.silu",
    elu: "F.elu",
    relu: "torch.relu",
    sympy.cos: "torch.cos",
    sympy.sin: "torch.sin",
    sympy.sign: "torch.sign",  # the derivative of abs
    expm1: "torch.expm1",  # 1 - exp(y), exp(y) - 1 (step_ir.precise)
    log1p: "torch.log1p",  # log(1 + y)
}

_RELATIONS = {sympy.StrictGreaterThan: ">", sympy.StrictLessThan: "<", sympy.GreaterThan: ">=",
              sympy.LessThan: "<="}

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _contraction_order(subscripts: list[str], out: str) -> list[int]:
    """An order of a product's operands (their axes as letters) whose contraction two at a time, left to right,
    keeps every intermediate small: greedily, the pair and then the next operand leaving the fewest axes, where
    an axis is left while the output or a later operand has it. Ties keep the written order."""
    n = len(subscripts)
    if n < 3:
        return list(range(n))

    def left(axes: set[str], rest: list[int]) -> int:
        return len({a for a in axes if a in out or any(a in subscripts[r] for r in rest)})

    pairs = [(left(set(subscripts[i]) | set(subscripts[j]), [r for r in range(n) if r not in (i, j)]), i, j)
             for i in range(n) for j in range(i + 1, n)]
    _, i, j = min(pairs)
    order, axes = [i, j], set(subscripts[i]) | set(subscripts[j])
    while len(order) < n:
        rest = [r for r in range(n) if r not in order]
        _, nxt = min((left(axes | set(subscripts[r]), [x for x in rest if x != r]), r) for r in rest)
        order.append(nxt)
        axes = {a for a in axes | set(subscripts[nxt])}
    return order


class TorchPrinter(ExprPrinter):
    """`names` maps a tensor or scalar's IR name to the Python expression holding it."""

    def __init__(self, sizes: set[str], ranges: dict[sympy.Symbol, sympy.Expr], names: dict[str, str] | None = None,
                 fuse: bool = False):
        self.sizes = sizes
        self.ranges = ranges
        self.names = names or {}
        # fuse: a sum with a product term as one torch.addcmul (one pass over the result instead of two): the
        # step loops of the recurrent form, where `decay * S + k * v` is most of a step's memory traffic.
        self.fuse = fuse

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
        if isinstance(e, sympy.Add) and self.fuse:
            fused = self._addcmul(e, axes)
            if fused is not None:
                return fused, _ATOM
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
        if isinstance(e, sympy.Heaviside):  # the derivative of relu, max, min: 0 at 0, as torch's relu backward
            return f"torch.relu(torch.sign({self._p(e.args[0], axes)[0]}))", _ATOM
        if isinstance(e, sympy.Piecewise):  # the derivative of elu
            return self._piecewise(e.args, axes), _ATOM
        if type(e) in _RELATIONS:
            a, b = e.args
            return f"{self._wrap(a, axes, _ADD)} {_RELATIONS[type(e)]} {self._wrap(b, axes, _ADD)}", 0
        if isinstance(e, sympy.Function) and type(e) in FUNCTIONS:
            return f"{FUNCTIONS[type(e)]}({self._p(e.args[0], axes)[0]})", _ATOM
        raise NotImplementedError(f"cannot print {type(e).__name__}: {e}")

    def _piecewise(self, pieces, axes) -> str:
        (value, cond), rest = pieces[0], pieces[1:]
        if cond == sympy.true or not rest:
            return self._p(value, axes)[0]
        return f"torch.where({self._p(cond, axes)[0]}, {self._p(value, axes)[0]}, {self._piecewise(rest, axes)})"

    def _axes_of(self, e: sympy.Expr) -> set:
        return {s for s in e.free_symbols if s in self.ranges}

    def _addcmul(self, e: sympy.Add, axes) -> str | None:
        """`rest + a * b` as `torch.addcmul(rest, a, b)`, the term a product of at least two tensors: the one with
        the most axes (the last such), split into its factor with the most axes and the others (numbers too), so
        an outer product such as `beta * k[i] * u[j]` is never formed on its own."""
        terms = list(sympy.Add.make_args(e))
        best = None
        for n, term in enumerate(terms):
            factors = [f for f in sympy.Mul.make_args(term) if not is_constant(f, self.sizes)]
            if isinstance(term, sympy.Mul) and len(factors) > 1:
                size = len(self._axes_of(term))
                if best is None or size >= best[0]:
                    best = (size, n, factors)
        if best is None:
            return None
        _, n, factors = best
        rest = sympy.Add(*(terms[:n] + terms[n + 1:]))
        if is_constant(rest, self.sizes):
            return None  # addcmul's first operand is a tensor
        k = max(range(len(factors)), key=lambda i: len(self._axes_of(factors[i])))
        constant = [f for f in sympy.Mul.make_args(terms[n]) if is_constant(f, self.sizes)]
        small = sympy.Mul(*constant, *(factors[:k] + factors[k + 1:]))
        other = factors[k]
        return (f"torch.addcmul({self._p(rest, axes)[0]}, {self._p(small, axes)[0]}, "
                f"{self._p(other, axes)[0]})")

    def _mul(self, e: sympy.Mul, axes) -> tuple[str, int]:
        """As `ExprPrinter._mul`, but numbers and sizes scale the factor with the fewest axes rather than the
        product: `(q[..., :, None] / K ** 0.5) * do[..., None, :]`, one [K] division instead of a [K, V] one."""
        factors = sympy.Mul.make_args(e)
        constant = [f for f in factors if is_constant(f, self.sizes)]
        tensors = [f for f in factors if not is_constant(f, self.sizes)]
        if constant and len(tensors) > 1:
            axes_of = [{s for s in f.free_symbols if s in self.ranges} for f in tensors]
            ranks = [len(a) for a in axes_of]
            if len(set().union(*axes_of)) > min(ranks):
                k = ranks.index(min(ranks))
                small, rest = sympy.Mul(*constant, tensors[k]), sympy.Mul(*tensors[:k], *tensors[k + 1:])
                return f"{self._wrap(small, axes, _MUL)} * {self._wrap(rest, axes, _MUL)}", _MUL
        return super()._mul(e, axes)

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
            # Factors free of the summed indices multiply the sum, not every term of it.
            factors = sympy.Mul.make_args(body)
            outside = [f for f in factors if not (f.free_symbols & set(bound))]
            inside = [f for f in factors if f.free_symbols & set(bound)]
            if outside and inside:
                body = sympy.Mul(*inside)
            text = f"({self._p(body, inner)[0]}).sum(dim={dims if len(dims) > 1 else dims[0]})"
            if outside and inside:
                text = f"{self._wrap(sympy.Mul(*outside), axes, _MUL)} * {text}"
        if scale != 1:
            text = f"{text} * {self._wrap(scale, axes, _POW)}"
        return text

    def _pair(self, a: tuple[str, tuple], b: tuple[str, tuple], summed: list) -> tuple[str, tuple] | None:
        """`sum_c x[c] * M[c, f]` and the like (two vectors or matrices, the one axis `summed`, none kept by
        both) as a matrix product with the vector on the left, `(x[..., None, :] @ M)[..., 0, :]`: on a CPU a
        vector times a matrix is several times faster than torch.einsum's plan (a batched matrix times a column).
        `a`, `b`: (source, its trailing axes). Returns (source, its trailing axes), or None."""
        (_, ia), (_, ib) = a, b
        if (len(summed) != 1 or summed[0] not in ia or summed[0] not in ib or len(ia) > 2 or len(ib) > 2
                or (len(ia) == 1 and len(ib) == 1) or any(i in ib and i not in summed for i in ia)):
            return None
        c = summed[0]
        (ltext, li), (rtext, ri) = (a, b) if len(ia) <= len(ib) else (b, a)
        lfree = [i for i in li if i != c]
        rfree = [i for i in ri if i != c]
        if not lfree:
            ltext = f"{ltext}[..., None, :]"
        elif li != (lfree[0], c):
            ltext = f"{ltext}.mT"
        if ri != (c, rfree[0]):
            rtext = f"{rtext}.mT"
        text = f"({ltext} @ {rtext})" + ("" if lfree else "[..., 0, :]")
        return text, tuple(lfree + rfree)

    def _einsum(self, body, axes, bound) -> str | None:
        """`sum_b x[a, b] * y[b]` when the body is a product: tensors, other factors over some of the indices
        (printed as tensors over those), and factors over none (folded into the operand with the fewest axes, so
        they scale the smallest tensor, not the result). The operands are taken two at a time in an order that
        keeps intermediates small, each pair as a vector-matrix product (`_pair`) or a broadcast product summed
        over the indices no later operand reads: no torch.einsum, whose planning costs more than a small step."""
        index_set = tuple(axes) + tuple(bound)
        operands, scalars = [], []
        for f in sympy.Mul.make_args(body):
            if isinstance(f, sympy.Indexed):
                idx = tuple(f.indices)
                if len(set(idx)) < len(idx):
                    return None  # a diagonal: torch.diagonal in the fallback
            else:
                idx = tuple(sorted((s for s in f.free_symbols if s in self.ranges), key=lambda s: s.name))
            if any(i not in index_set for i in idx):
                return None
            (operands if idx else scalars).append((f, idx))
        if len(operands) < 2:
            return None
        if scalars:
            k = min(range(len(operands)), key=lambda n: len(operands[n][1]))
            operands[k] = (sympy.Mul(*[f for f, _ in scalars], operands[k][0]), operands[k][1])
        if len(operands) == 2:
            kept = [i for _, idx in operands for i in idx if i not in bound]
            if len(kept) > len(set(kept)):
                return None  # an axis both keep (sum_j S[i, j] * G[i, j]): the fallback's product and sum
        sources = []
        for f, idx in operands:
            if isinstance(f, sympy.Indexed):
                sources.append((self.name(str(f.base)), idx))
            else:
                text, prec = self._p(f, idx)
                sources.append((text if prec >= _ATOM else f"({text})", idx))
        letters = {s: _LETTERS[n] for n, s in enumerate(index_set)}
        order = _contraction_order(["".join(letters[i] for i in idx) for _, idx in sources],
                                   "".join(letters[a] for a in axes))
        current = sources[order[0]]
        for n, nxt in enumerate(order[1:], start=2):
            later = [sources[m][1] for m in order[n:]]
            summed = [i for i in bound if (i in current[1] or i in sources[nxt][1])
                      and not any(i in idx for idx in later)]
            pair = self._pair(current, sources[nxt], summed)
            if pair is None:  # a broadcast product, summed over `summed`
                union = tuple(dict.fromkeys(current[1] + sources[nxt][1]))
                text = f"{self._place(*current, union)} * {self._place(*sources[nxt], union)}"
                if summed:
                    dims = tuple(union.index(i) - len(union) for i in summed)
                    text = f"({text}).sum(dim={dims if len(dims) > 1 else dims[0]})"
                    union = tuple(i for i in union if i not in summed)
                else:
                    text = f"({text})"
                pair = (text, union)
            current = pair
        text, idx = current
        return self._place(text, idx, tuple(axes)) if idx != tuple(axes) else text
