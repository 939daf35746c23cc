"""What the torch and Triton printers share: operator precedence, products with their divisions,
numbers, and a small indented-source writer. Each backend subclasses `ExprPrinter` and prints its
own leaves, functions and sums (`_p`)."""

from __future__ import annotations

import builtins
import keyword
import math
import re
import textwrap

import sympy

from recurrence_dsl.step_ir import to_elementary

# Precedence of printed operators, loosest last: a subexpression is parenthesised when its
# precedence is below what its context needs.
ATOM, POW, UNARY, MUL, ADD = 5, 4, 3, 2, 1


class ExprPrinter:
    """Base of the backend printers: `_p(expr, axes) -> (source, precedence)` is the backend's."""

    def _p(self, e: sympy.Expr, axes) -> tuple[str, int]:
        raise NotImplementedError

    # How the backend writes float64's infinity (a Python expression: never a bare `inf`).
    INFINITY = "math.inf"

    def _number(self, value) -> str:
        """A number as a float literal (`2.0`, `1e-06`), or the backend's infinity; never NaN (the step IR
        rejects it) nor a bare `inf`, which would read whatever a spec's input named `inf` holds."""
        if value in (sympy.oo, -sympy.oo):
            return self.INFINITY if value > 0 else "-" + self.INFINITY
        if not value.is_extended_real or value is sympy.nan:
            raise ValueError(f"{value} is not a float64 number")
        if isinstance(value, sympy.Integer) and abs(value) <= 2**53:
            return f"{int(value)}.0"
        number = float(value)  # a rational or a large integer: its nearest float64
        if math.isinf(number):
            return self.INFINITY if number > 0 else "-" + self.INFINITY
        return repr(number)

    def _wrap(self, e, axes, min_prec: int) -> str:
        text, prec = self._p(e, axes)
        return text if prec >= min_prec else f"({text})"

    def _mul(self, e: sympy.Mul, axes) -> tuple[str, int]:
        """`a * b / c`: negative powers and unit fractions become divisions, a -1 a unary minus."""
        coeff, rest = e.as_coeff_Mul()
        if coeff == -1:
            return f"-{self._wrap(rest, axes, UNARY)}", UNARY
        numer, denom = [], []
        for factor in sympy.Mul.make_args(e):
            if isinstance(factor, sympy.Pow) and factor.exp.is_number and factor.exp < 0:
                denom.append(sympy.Pow(factor.base, -factor.exp))
            elif isinstance(factor, sympy.Rational) and not isinstance(factor, sympy.Integer) and factor.p == 1:
                denom.append(sympy.Integer(factor.q))
            else:
                numer.append(factor)
        text = " * ".join(self._wrap(f, axes, MUL) for f in numer) if numer else "1.0"
        for d in denom:
            text += f" / {self._wrap(d, axes, POW)}"
        return text, MUL


# Identifiers the generated torch code defines or reads itself (form functions and the module around them; the
# last line: the recurrent adjoint).
_GENERATED = {"torch", "F", "math", "states", "chunk_size", "B_", "T_", "H_", "t", "_rt", "DecayNotPositive",
              "UnsafeSteps",
              "triton", "tl", "HAVE_TRITON", "TRITON_IMPORT_ERROR", "dataclass", "annotations", "options",
              "checkpoints", "every", "grad_outputs", "grad_states", "t0", "t1", "t2", "t3", "block"}
_GENERATED_PATTERN = re.compile(
    r"P\d+|R__\d+|(k|v|q|a|b|all|prev|log_decay|beta|final|read|query)_.*|.*(_t|_steps|__new)|_.*")


def in_docstring(text: str) -> str:
    """`text` made safe inside a triple-quoted (non-raw) docstring: backslashes and quotes escaped, so three quotes or a
    trailing backslash in it cannot end the string; the docstring's value is `text` again."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


def py_name(name: str, reserved=frozenset(), prefixes: tuple[str, ...] = ()) -> str:
    """The Python identifier generated code uses for a spec's name: the name itself, or with a trailing
    underscore where it would shadow something the generated code uses (`t`, `states`, `F`, `max`, `P0`).
    A printer with names of its own adds them as `reserved` and `prefixes`."""
    if (name in _GENERATED or name in reserved or name.startswith(prefixes) or hasattr(builtins, name)
            or keyword.iskeyword(name) or _GENERATED_PATTERN.fullmatch(name)):
        return name + "_"
    return name


def is_constant(e: sympy.Expr, sizes) -> bool:
    """Whether `e` reads only numbers and sizes (no input, param, state or free index): a host scalar."""
    return (not e.has(sympy.Indexed) and all(s.name in sizes for s in e.free_symbols))


def constant_source(e: sympy.Expr, rename=lambda name: name) -> str:
    """Python source of an expression of numbers and sizes (`math.sqrt(K)`, `0.8824969025845955`).

    Sizes are printed through `rename`; the DSL's own functions are spelled in `math` terms."""
    value = to_elementary(e.doit() if e.has(sympy.Sum) else e)
    if not value.free_symbols:
        number = complex(value.evalf())
        if number.imag != 0 or math.isnan(number.real):
            return "math.nan"  # log(-1) and the like: nan, as torch computes it
        if math.isinf(number.real):
            return "math.inf" if number.real > 0 else "-math.inf"
        return repr(number.real)
    renamed = value.xreplace({s: sympy.Symbol(rename(s.name)) for s in value.free_symbols})
    return sympy.pycode(renamed, fully_qualified_modules=True)


class SourceWriter:
    """Collects lines of generated source; `w(line, indent)` appends one, indented by 4 * indent."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, line: str = "", indent: int = 1) -> None:
        self.lines.append(("    " * indent + line) if line else "")

    def doc(self, text: str, indent: int = 1, width: int = 120) -> None:
        """A docstring `text` (without its quotes), wrapped at `width` columns."""
        pad = "    " * indent
        for line in textwrap.wrap(f'"""{text}"""', width - len(pad), break_long_words=False, break_on_hyphens=False):
            self(line, indent)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"
