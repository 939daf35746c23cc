"""Print step-IR (sympy) expressions as Triton source over register tiles.

The Triton counterpart of `torch_printer.py`. Inside a Triton program every value is a tile
with one axis per index symbol and no batch axes (the program owns one (batch, head)):
an index `i` ranging over a size `K` is a tile axis of `BLOCK_K` lanes (a power of two >= K),
of which lanes `offs_K < K` are real and the rest padding. `print_expr(e, axes)` returns
source evaluating `e` broadcastable to `[BLOCK(a) for a in axes]`: every operand is permuted
(`tl.trans` / `tl.permute`) and padded with `None` so that each of its indices lines up with
`axes`, exactly as the torch printer moves axes with `movedim` and `None`.

Padding. Tiles loaded from memory and states carry exact zeros in their padding lanes, but an
expression evaluated on them need not (exp(0) = 1, elu(0) + 1 = 1, 1 / 0 = inf). Lanes of a
value that lie in the padding of one of its axes may hold anything; only two things can move a
padding lane into a real one, and both are guarded:

- a `sum` over an index `b` masks its body with `mask_<size of b>` (`tl.where(..., 0.0)`)
  unless the body is provably exactly zero (and finite) on the padding of `b`;
- the caller masks each new state the same way (`needs_mask`), so states stay zero-padded.

Outputs are stored with masks, so their padding lanes never matter. `is_zero(e, a)` is the
conservative proof: a product is zero there when one factor is and every factor is finite
everywhere (0 * inf is nan); `is_finite(e)` holds for sums, products and bounded functions of
zero-padded tiles, never for division, log or fractional powers of a tile.

Functions: exp, log, sqrt, abs, cos, sin map to `tl.*`; sigmoid to `tl.sigmoid`; the rest are written in
numerically stable forms: tanh(x) = 2 sigmoid(2x) - 1, softplus(x) = max(x, 0) + log1p(exp(-|x|)),
logsigmoid(x) = min(x, 0) - log1p(exp(-|x|)) (log1p keeps the tails: softplus(-20) = 2.1e-9), silu(x) = x sigmoid(x),
elu(x) = where(x > 0, x, exp(where(x > 0, 0, x)) - 1), relu(x) = max(x, 0); min / max to
`tl.minimum` / `tl.maximum` with `propagate_nan=ALL`: a NaN comes out NaN, as in torch.
expm1 and log1p (the step IR's spelling of 1 - exp(y), exp(y) - 1 and log(1 + y): `step_ir.precise`) call the
@triton.jit helpers `_expm1` / `_log1p` of `HELPERS`, which every module holding printed kernels defines (tl.math has
no expm1 or log1p, and the interpreter none of libdevice's). Arithmetic is float32 throughout: Python float
constants are float32 in Triton, loads are upcast by the caller.
"""

from __future__ import annotations

import re

import sympy

from recurrence_dsl.step_ir import (
    elu,
    expm1,
    has_infinity,
    log1p,
    logsigmoid,
    relu,
    sigmoid,
    silu,
    softplus,
    tanh,
)

from .printing import ADD as _ADD
from .printing import ATOM as _ATOM
from .printing import MUL as _MUL
from .printing import POW as _POW
from .printing import ExprPrinter

# A unary function f: (source template, f(0) == 0, f maps finite inputs to finite outputs, precedence).
# Templates take the argument as `{x}`; an argument used more than once should be a name
# (the kernel writer binds non-trivial arguments of MULTI_USE functions to temporaries).
FUNCTIONS = {
    sympy.exp: ("tl.exp({x})", False, True, _ATOM),
    sympy.log: ("tl.log({x})", False, False, _ATOM),
    sympy.Abs: ("tl.abs({x})", True, True, _ATOM),
    tanh: ("2.0 * tl.sigmoid(2.0 * {x}) - 1.0", True, True, _ADD),
    sympy.tanh: ("2.0 * tl.sigmoid(2.0 * {x}) - 1.0", True, True, _ADD),  # (the step IR's is `tanh`)
    sigmoid: ("tl.sigmoid({x})", False, True, _ATOM),
    # log(1 + exp(-|x|)) through the `_log1p` helper ({h}: `TritonPrinter.helper_prefix`): tl.log(1.0 + ...) is
    # exactly 0 once exp(-|x|) is below float32's half ulp of 1 (|x| > 16.6), where softplus(-20) is 2.1e-9.
    logsigmoid: ("tl.minimum({x}, 0.0) - {h}log1p(tl.exp(-tl.abs({x})))", False, True, _ADD),
    softplus: ("tl.maximum({x}, 0.0) + {h}log1p(tl.exp(-tl.abs({x})))", False, True, _ADD),
    silu: ("{x} * tl.sigmoid({x})", True, True, _MUL),
    elu: ("tl.where({x} > 0.0, {x}, tl.exp(tl.where({x} > 0.0, 0.0, {x})) - 1.0)", True, True, _ATOM),
    relu: ("tl.maximum({x}, 0.0, propagate_nan=tl.PropagateNan.ALL)", True, True, _ATOM),
    # cos and sin are bounded, so finite on finite inputs; only sin(0) is 0.
    sympy.cos: ("tl.cos({x})", False, True, _ATOM),
    sympy.sin: ("tl.sin({x})", True, True, _ATOM),
    # Calls of the `HELPERS` below (their names as printed: `TritonPrinter.helper_prefix`). expm1(0) = log1p(0) = 0;
    # expm1 is finite where exp is, log1p(-1) is -inf.
    expm1: ("_expm1({x})", True, True, _ATOM),
    log1p: ("_log1p({x})", True, False, _ATOM),
}
_HELPER_CALLS = (expm1, log1p)

# The @triton.jit helpers the printed calls of expm1 and log1p read. Each is exact to a few float32 ulps everywhere
# and needs only tl.exp / tl.log, which a GPU may compute approximately (exp's and log's error near 1 is absolute,
# about 1e-7, so neither exp(x) - 1 nor log(1 + x) may be used where the result is small): a short series near 0,
# the plain formula from where the result is large enough (0.39, 0.22) for that error to be a few ulps.
HELPERS = {
    "_expm1": '''@triton.jit
def _expm1(x):
    """exp(x) - 1 without its cancellation near 0: for |x| < 0.5 Taylor's series to x**8 / 8! (Horner; the rest,
    below x**9 / 9!, is under 2e-8 of the value), else exp(x) - 1 (at least 0.39 in size there)."""
    series = x * (1.0 + x * (0.5 + x * (0.16666667 + x * (0.041666668 + x * (0.008333334 + x * (
        0.0013888889 + x * (1.984127e-04 + x * 2.4801588e-05)))))))
    return tl.where(tl.abs(x) < 0.5, series, tl.exp(x) - 1.0)
''',
    "_log1p": '''@triton.jit
def _log1p(x):
    """log(1 + x) without its cancellation near 0: for |x| < 0.25, 2 atanh(s) with s = x / (2 + x) by its series to
    s**7 / 7 (|s| <= 1/7; the rest, below s**9 / 9, is under 2e-8 of the value), else log(1 + x)."""
    s = x / (2.0 + x)
    s2 = s * s
    series = 2.0 * s * (1.0 + s2 * (0.33333334 + s2 * (0.2 + s2 * 0.14285715)))
    return tl.where(tl.abs(x) < 0.25, series, tl.log(1.0 + x))
''',
}


def helpers_source(text: str, prefix: str = "_") -> str:
    """The source of the `HELPERS` that `text` (printed kernels, their helpers' names spelled with `prefix` in place
    of the leading `_`) calls, so named; "" when it calls none."""
    parts = []
    for name, source in HELPERS.items():
        printed = prefix + name[1:]
        if re.search(r"(?<![\w.])" + re.escape(printed) + r"\(", text):
            parts.append(source.replace(f"def {name}(", f"def {printed}("))
    return "\n\n".join(parts)


_SIMPLE_CALL = re.compile(r"tl\.\w+\(\{x\}\)")
# Functions whose template repeats its argument: a non-trivial argument is worth a temporary.
MULTI_USE = (tanh, sympy.tanh, logsigmoid, softplus, silu, elu, sympy.sign)
# Relations (conditions of the Piecewise derivative of elu) as Triton comparisons.
_RELATIONS = {sympy.StrictGreaterThan: ">", sympy.StrictLessThan: "<", sympy.GreaterThan: ">=",
              sympy.LessThan: "<="}
# Largest integer power printed as repeated multiplication; others go through exp(n * log(x)).
MAX_INT_POWER = 8


def next_power_of_two(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def block_for(n: int) -> int:
    """The tile extent for an axis of `n` lanes: a power of two, at least 16."""
    return max(16, next_power_of_two(n))


def size_key(size: sympy.Expr) -> str:
    """The suffix naming a size's tile helpers: `K` for a size name, `n4` for the literal 4."""
    if isinstance(size, sympy.Symbol):
        return size.name
    if isinstance(size, sympy.Integer):
        return f"n{int(size)}"
    raise NotImplementedError(f"an index range must be a size name or an integer literal, not {size}")


def offs_name(size) -> str:
    return f"offs_{size_key(size)}"


def mask_name(size) -> str:
    return f"mask_{size_key(size)}"


def block_name(size) -> str:
    return f"BLOCK_{size_key(size)}"


class TritonPrinter(ExprPrinter):
    """`names` maps an IR name (tensor, scalar, temporary) to the kernel variable holding its tile.

    `zero_padded`: IR names whose tiles are exactly zero (and finite) on every padding lane: inputs and
    params loaded with `other=0`, states (kept masked). `temps`: IR name of a temporary -> (its tile axes,
    its defining expression), for the padding analysis. Other leaves (scalars, size names, launcher
    constants) are real data: finite, and spanning no axis.
    """

    # A Python float Triton folds to a float32 constant, in the interpreter and the compiler alike.
    INFINITY = 'float("inf")'

    def __init__(self, sizes: set[str], ranges: dict[sympy.Symbol, sympy.Expr], names: dict[str, str] | None = None,
                 zero_padded: set[str] | None = None, temps: dict | None = None):
        self.sizes = sizes
        self.ranges = ranges
        self.names = names or {}
        self.zero_padded = zero_padded or set()
        self.temps = temps if temps is not None else {}
        # How the printed calls spell the `HELPERS` (`_expm1`): a prefix in place of the leading `_`, for kernels
        # printed into a module whose names are renamed (codegen/module.py: `_triton_expm1`).
        self.helper_prefix = "_"
        # Print the factors of a product that span the same proper subset of its axes as one smaller tile, broadcast
        # once (`(a * b)[:, None] * W` rather than `a[:, None] * b[:, None] * W`): fewer full-tile products, fewer
        # live registers. Off by default, so the kernels that do not ask keep their printed form.
        self.group_factors = False

    def name(self, ir_name: str) -> str:
        return self.names.get(ir_name, ir_name)

    def print_expr(self, expr: sympy.Expr, axes: tuple[sympy.Symbol, ...]) -> str:
        return self._p(expr, tuple(axes))[0]

    # -- tiles, masks -------------------------------------------------------

    def block(self, sym: sympy.Symbol) -> str:
        return block_name(self.ranges[sym])

    def mask(self, axes: tuple[sympy.Symbol, ...], which=None) -> str:
        """The validity mask of `which` (default: all of `axes`) placed along `axes`."""
        which = axes if which is None else which
        parts = []
        for sym in which:
            text = mask_name(self.ranges[sym])
            if len(axes) > 1:
                text += "[" + ", ".join(":" if a == sym else "None" for a in axes) + "]"
            parts.append(text)
        return " & ".join(parts)

    def shape(self, axes: tuple[sympy.Symbol, ...]) -> str:
        return "[" + ", ".join(self.block(a) for a in axes) + "]"

    # -- padding analysis ----------------------------------------------------

    def is_finite(self, e: sympy.Expr) -> bool:
        """Every lane of `e`'s tile, padding included, is finite (given finite data)."""
        if isinstance(e, (sympy.Number, sympy.NumberSymbol)):
            return bool(e.is_finite)
        if has_infinity(e):
            return False  # 1e999 * x: infinite (or 0 * inf = NaN) on the padding, whatever spans it
        if isinstance(e, (sympy.Indexed, sympy.Symbol)):
            name = str(e.base) if isinstance(e, sympy.Indexed) else e.name
            if name in self.temps:
                return self.is_finite(self.temps[name][1])
            return True  # loaded data (padding 0), a scalar, a size or a constant
        if not self._spans(e):
            return True  # a function of real data only
        if isinstance(e, (sympy.Add, sympy.Mul, sympy.Min, sympy.Max)):
            return all(self.is_finite(a) for a in e.args)
        if isinstance(e, sympy.Pow):
            base, exp = e.args
            if exp.is_Integer and exp > 0:
                return self.is_finite(base)
            return not self._spans(base) and self.is_finite(exp)
        if isinstance(e, sympy.Sum):
            return self.is_finite(e.function)
        if type(e) in FUNCTIONS:
            return FUNCTIONS[type(e)][2] and self.is_finite(e.args[0])
        return False

    def is_zero(self, e: sympy.Expr, axis: sympy.Symbol) -> bool:
        """On every lane in the padding of `axis`, `e` is exactly 0 (a conservative proof)."""
        if isinstance(e, (sympy.Number, sympy.NumberSymbol)):
            return e == 0
        if isinstance(e, sympy.Indexed):
            name = str(e.base)
            if axis not in e.indices:
                return False
            if name in self.temps:
                t_axes, t_expr = self.temps[name]
                return self.is_zero(t_expr, t_axes[list(e.indices).index(axis)])
            return name in self.zero_padded
        if isinstance(e, sympy.Symbol):
            return False  # spans no axis
        if axis not in e.free_symbols:
            return False
        if isinstance(e, (sympy.Add, sympy.Min, sympy.Max)):
            return all(self.is_zero(a, axis) for a in e.args)
        if isinstance(e, sympy.Mul):
            return any(self.is_zero(a, axis) for a in e.args) and all(self.is_finite(a) for a in e.args)
        if isinstance(e, sympy.Pow):
            base, exp = e.args
            return bool(exp.is_number and exp > 0) and self.is_zero(base, axis) and self.is_finite(e)
        if isinstance(e, sympy.Sum):
            return self.is_zero(e.function, axis)
        if type(e) in FUNCTIONS:
            return FUNCTIONS[type(e)][1] and self.is_zero(e.args[0], axis)
        return False

    def needs_mask(self, e: sympy.Expr, axes) -> bool:
        """Whether `e`, to be kept zero-padded along `axes`, must go through `tl.where(mask, e, 0.0)`."""
        return not all(self.is_zero(e, a) for a in axes)

    def _spans(self, e: sympy.Expr) -> bool:
        """Whether `e` is a tile (depends on any index), rather than a scalar."""
        return any(s in self.ranges for s in e.free_symbols)

    # -- helpers --------------------------------------------------------

    def _place(self, src_name: str, src: tuple[sympy.Symbol, ...], axes: tuple[sympy.Symbol, ...]) -> str:
        """Source for tile `src_name` (axes `src`, in tile order) aligned to `axes`."""
        if not src:
            return src_name
        text = src_name
        src = list(src)
        # A repeated index (x[i, i]) reads the diagonal: keep the lanes where both offsets agree, sum the second away.
        while len(set(src)) < len(src):
            dup = next(a for a in src if src.count(a) > 1)
            p = src.index(dup)
            q = src.index(dup, p + 1)
            offs = offs_name(self.ranges[dup])
            at_p, at_q = (offs + "[" + ", ".join(":" if m == k else "None" for m in range(len(src))) + "]"
                          for k in (p, q))
            text = f"tl.sum(tl.where({at_p} == {at_q}, {text}, 0.0), axis={q})"
            del src[q]
        src = tuple(src)
        missing = [s for s in src if s not in axes]
        if missing:
            raise ValueError(f"index {missing[0]} of {src_name} is not among the axes {axes}")
        order = sorted(range(len(src)), key=lambda p: axes.index(src[p]))
        if order != list(range(len(src))):
            text = f"tl.trans({text})" if len(src) == 2 else f"tl.permute({text}, {tuple(order)})"
        if len(src) == len(axes):
            return text
        present = set(src)
        return f"{text}[{', '.join(':' if a in present else 'None' for a in axes)}]"

    # -- the recursive printer: (source, precedence) ------------------------

    def _p(self, e: sympy.Expr, axes) -> tuple[str, int]:
        if isinstance(e, (sympy.Number, sympy.NumberSymbol)):
            text = self._number(e)
            return (f"({text})", _ATOM) if text.startswith("-") else (text, _ATOM)
        if isinstance(e, sympy.Indexed):
            return self._place(self.name(str(e.base)), tuple(e.indices), axes), _ATOM
        if isinstance(e, sympy.Symbol):
            if e.name in self.sizes:
                return self.name(e.name), _ATOM
            if e in self.ranges:
                raise ValueError(f"index {e} used as a value")
            return self.name(e.name), _ATOM
        if isinstance(e, sympy.Add):
            terms = []
            for k, arg in enumerate(self._add_order(e)):
                coeff, _ = arg.as_coeff_Mul()
                if k and coeff.is_number and coeff < 0:
                    terms.append(f" - {self._wrap(-arg, axes, _MUL)}")
                else:
                    terms.append((" + " if k else "") + self._wrap(arg, axes, _ADD))
            return "".join(terms), _ADD
        if isinstance(e, sympy.Mul):
            return self._grouped_mul(e, axes) if self.group_factors else self._mul(e, axes)
        if isinstance(e, sympy.Pow):
            return self._pow(e, axes)
        if isinstance(e, sympy.Sum):
            return self._sum(e, axes), _ATOM
        if isinstance(e, (sympy.Min, sympy.Max)):
            return self._minmax(e, axes), _ATOM
        # Derivatives that appear in adjoint steps (recurrence_dsl/adjoint.py), as the torch printer prints them.
        if isinstance(e, sympy.Heaviside):  # of relu, max, min: 0 at 0, as torch's relu backward
            return f"tl.where({self._wrap(e.args[0], axes, _ADD)} > 0.0, 1.0, 0.0)", _ATOM
        if isinstance(e, sympy.sign):  # of abs
            x = self._wrap(e.args[0], axes, _ADD)
            return f"tl.where({x} > 0.0, 1.0, tl.where({x} < 0.0, -1.0, 0.0))", _ATOM
        if isinstance(e, sympy.Piecewise):  # of elu
            return self._piecewise(e.args, axes), _ATOM
        if type(e) in _RELATIONS:
            a, b = e.args
            return f"{self._wrap(a, axes, _ADD)} {_RELATIONS[type(e)]} {self._wrap(b, axes, _ADD)}", 0
        if type(e) in _HELPER_CALLS:
            return f"{self.helper_prefix}{type(e).__name__}({self._p(e.args[0], axes)[0]})", _ATOM
        if isinstance(e, sympy.Function) and type(e) in FUNCTIONS:
            template, _, _, prec = FUNCTIONS[type(e)]
            if _SIMPLE_CALL.fullmatch(template):
                return template.format(x=self._p(e.args[0], axes)[0]), prec
            return template.format(x=self._wrap(e.args[0], axes, _ATOM), h=self.helper_prefix), prec
        raise NotImplementedError(f"cannot print {type(e).__name__}: {e}")

    def _grouped_mul(self, e: sympy.Mul, axes) -> tuple[str, int]:
        """`e` with the factors of each proper subset of `axes` (two or more of them) multiplied as one tile of
        those axes first, then broadcast (see `group_factors`)."""
        groups: dict[tuple, list] = {}
        for factor in sympy.Mul.make_args(e):
            spans = tuple(a for a in axes if a in factor.free_symbols)
            groups.setdefault(spans, []).append(factor)
        if not any(0 < len(spans) < len(axes) and len(fs) > 1 for spans, fs in groups.items()):
            return self._mul(e, axes)
        parts = []
        for spans, factors in groups.items():
            if 0 < len(spans) < len(axes) and len(factors) > 1:
                inner = self._wrap(sympy.Mul(*factors), spans, _ATOM)
                parts.append(f"{inner}[{', '.join(':' if a in spans else 'None' for a in axes)}]")
            else:
                parts.append(self._wrap(sympy.Mul(*factors), axes, _MUL))
        return " * ".join(parts), _MUL

    def _piecewise(self, pieces, axes) -> str:
        (value, cond), rest = pieces[0], pieces[1:]
        if cond == sympy.true or not rest:
            return self._p(value, axes)[0]
        return f"tl.where({self._p(cond, axes)[0]}, {self._p(value, axes)[0]}, {self._piecewise(rest, axes)})"

    @staticmethod
    def _add_order(e: sympy.Add) -> list:
        """Terms to print: positive terms, then positive numbers, then subtracted terms (`x + 1.0`, `1.0 - x`)."""
        def rank(arg):
            coeff, _ = arg.as_coeff_Mul()
            if coeff.is_number and coeff < 0:
                return 2
            return 1 if arg.is_number else 0
        return sorted(sympy.Add.make_args(e), key=rank)

    def _pow(self, e: sympy.Pow, axes) -> tuple[str, int]:
        base, exp = e.args
        if isinstance(base, sympy.core.numbers.Exp1):
            return f"tl.exp({self._p(exp, axes)[0]})", _ATOM
        if exp == sympy.Rational(1, 2):
            return f"tl.sqrt({self._p(base, axes)[0]})", _ATOM
        if exp == sympy.Rational(-1, 2):
            return f"1.0 / tl.sqrt({self._p(base, axes)[0]})", _MUL
        if exp.is_Integer and 0 < abs(int(exp)) <= MAX_INT_POWER:
            b = self._wrap(base, axes, _POW)
            prod = " * ".join([b] * abs(int(exp)))
            if exp > 0:
                return prod, _MUL
            return (f"1.0 / {prod}" if abs(int(exp)) == 1 else f"1.0 / ({prod})"), _MUL
        # General power: exp(y * log(x)), as torch's pow for x > 0 (nan for x < 0 and non-integer y, like torch).
        return f"tl.exp({self._wrap(exp, axes, _MUL)} * tl.log({self._p(base, axes)[0]}))", _ATOM

    def _minmax(self, e, axes) -> str:
        fn = "tl.minimum" if isinstance(e, sympy.Min) else "tl.maximum"
        args = list(e.args)
        text = self._p(args[0], axes)[0]
        for a in args[1:]:
            text = f"{fn}({text}, {self._p(a, axes)[0]}, propagate_nan=tl.PropagateNan.ALL)"  # NaN in, NaN out
        return text

    @staticmethod
    def _sum_axes(body: sympy.Expr, axes: tuple, bound: tuple) -> tuple:
        """The order of the axes a sum's body is evaluated on: that of its largest operand (a state S[i, j]
        summed over i is reduced in place, never transposed), then the other axes; the (smaller) result is
        permuted to `axes` afterwards if it must be."""
        wanted = axes + bound
        leaves = [n for n in sympy.preorder_traversal(body) if isinstance(n, sympy.Indexed)]
        order: list = []
        if leaves:
            biggest = max(leaves, key=lambda n: len(set(n.indices)))
            order = [i for i in dict.fromkeys(biggest.indices) if i in wanted]
        return tuple(order + [a for a in wanted if a not in order])

    def _sum(self, e: sympy.Sum, axes) -> str:
        """`sum(b, body)`: the body on the axes `axes` and `b` (ordered by `_sum_axes`), masked along `b` unless
        provably zero-padded there, then `tl.sum` over `b`'s axis."""
        bound = tuple(limit[0] for limit in e.limits)
        body = e.function
        scale = sympy.Integer(1)
        spanned = []
        for var in bound:
            if var in body.free_symbols:
                spanned.append(var)
            else:
                scale *= self.ranges[var]
        if not spanned:
            text = self._wrap(body, axes, _MUL)
        else:
            inner = self._sum_axes(body, tuple(axes), tuple(spanned))
            text = self._p(body, inner)[0]
            unsafe = tuple(v for v in spanned if not self.is_zero(body, v))
            if unsafe:
                text = f"tl.where({self.mask(inner, unsafe)}, {text}, 0.0)"
            for pos in sorted((inner.index(v) for v in spanned), reverse=True):
                text = f"tl.sum({text}, axis={pos})"
            text = self._place(text, tuple(a for a in inner if a not in spanned), tuple(axes))
        if scale != 1:
            text = f"{text} * {self._wrap(scale, axes, _POW)}"
        return text
