"""Sympy expressions written in the spec's own syntax: the one printer of every message that quotes one.

`sum(i, x[i])`, not `Sum(x[i], (i, 0, K - 1))`; `-0.5`, not `-0.500000000000000`; `inf`, not `oo` or `zoo`;
`max`/`min`/`abs`, not `Max`/`Min`/`Abs`; two sums that differ only in their summation index's number (a norm
`sqrt(sum(a, k[a]**2))` built twice) written once, so that `sqrt(n)*sqrt(n)` reads `n`.
"""

from __future__ import annotations

import itertools
import math
import re

import sympy
from sympy.printing.str import StrPrinter

# A summation index of the step IR's own making (`a__3`, shown `a_3`; `c1__K`, a dot product's): renamed to the
# first free spelling of its letter.
_MADE = re.compile(r"^([A-Za-z]+)[A-Za-z0-9]*__\w+$")

# The most significant digits a number is written with: a computed constant (log(0.9)) is cut to these.
_DIGITS = 10

# sympy's names of the language's functions that it spells otherwise.
_FUNCTION_NAMES = {"Max": "max", "Min": "min", "Abs": "abs"}


def function_name(expr: sympy.Basic) -> str:
    """The language's name of the function `expr` applies (`max`, not sympy's `Max`)."""
    name = type(expr).__name__
    return _FUNCTION_NAMES.get(name, name)


def number_text(value: float) -> str:
    """A float64 as a spec would write it: the shortest text that reads back as it (`-0.5`, `1e-6`), at most
    _DIGITS significant digits, `inf` / `-inf` for the infinities."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    text = repr(value)
    mantissa = text.split("e")[0]
    if len(re.sub(r"\D", "", mantissa).strip("0")) > _DIGITS:
        text = f"{value:.{_DIGITS}g}"
    mantissa, _, exponent = text.partition("e")
    return mantissa + (f"e{int(exponent)}" if exponent else "")


class SpecPrinter(StrPrinter):
    """sympy's `str` printer with the spec's spellings (module docstring)."""

    def _print_Sum(self, expr):
        names = ", ".join(self._print(limit[0]) for limit in expr.limits)
        return f"sum({names}, {self._print(expr.function)})"

    def _print_Float(self, expr):
        return number_text(float(expr))

    def _print_Infinity(self, expr):
        return "inf"

    def _print_NegativeInfinity(self, expr):
        return "-inf"

    def _print_ComplexInfinity(self, expr):  # x / 0: float64's inf (of either sign)
        return "inf"

    def _print_NaN(self, expr):
        return "nan"

    def _print_ImaginaryUnit(self, expr):
        return "sqrt(-1)"

    def _print_Exp1(self, expr):
        return "exp(1)"

    def _nested(self, name: str, args) -> str:
        text = self._print(args[-1])
        for arg in reversed(args[:-1]):  # the language's min and max take two arguments
            text = f"{name}({self._print(arg)}, {text})"
        return text

    def _print_Max(self, expr):
        return self._nested(function_name(expr), expr.args)

    def _print_Min(self, expr):
        return self._nested(function_name(expr), expr.args)

    def _print_Abs(self, expr):
        return f"{function_name(expr)}({self._print(expr.args[0])})"

    def _print_expm1(self, expr):  # the step IR's precise spellings, as the language writes them
        return f"(exp({self._print(expr.args[0])}) - 1)"

    def _print_log1p(self, expr):
        return f"log(1 + {self._print(expr.args[0])})"


_PRINTER = SpecPrinter()


def _one_spelling(expr, taken: frozenset[str]):
    """`expr` with each summation index of the IR's making renamed to the first free name of its letter (`a`,
    `a__0`, `a__1`, ...): free, that is, of the expression's free names and of the enclosing sums' indices (the
    language binds no index twice), so that sibling sums equal up to their index become equal and sympy merges
    them."""
    if not isinstance(expr, sympy.Basic) or not expr.args or expr.is_Atom:
        return expr
    if isinstance(expr, sympy.Sum):
        body, limits = expr.function, []
        for var, *bounds in expr.limits:
            match = _MADE.match(var.name) if isinstance(var, sympy.Symbol) else None
            if match:
                inside = {s.name for s in body.atoms(sympy.Symbol)} - {var.name}
                names = itertools.chain((match[1],), (f"{match[1]}__{n}" for n in itertools.count()))
                name = next(x for x in names if x not in taken and x not in inside)
                new = sympy.Symbol(name, **var.assumptions0)
                body = body.xreplace({var: new})
                var = new
            taken = taken | {var.name}
            limits.append((var, *bounds))
        return sympy.Sum(_one_spelling(body, taken), *limits)
    args = tuple(_one_spelling(a, taken) for a in expr.args)
    return expr if args == expr.args else expr.func(*args)


def spec_text(expr) -> str:
    """`expr` (a sympy expression, or a number) in the spec's syntax; a string is returned as it is."""
    if isinstance(expr, str):
        return expr
    if isinstance(expr, float):
        return number_text(expr)
    if isinstance(expr, sympy.Basic):
        try:
            free = {s.name for s in expr.free_symbols if isinstance(s, sympy.Symbol)}
            # (a free `a__k`, a chunk plan's index that `show` writes `a`, keeps a sum's index from being `a`)
            expr = _one_spelling(expr, frozenset(free | {name.split("__")[0] for name in free}))
        except Exception:  # noqa: BLE001 - a message never fails for its tidying; print it as it is
            pass
    return _PRINTER.doprint(expr)
