"""Property tests: whatever text `load_text` is given, the only exception it raises is a well-placed SpecError.

Two sources of text: mutations of valid programs (characters and tokens deleted, inserted, replaced; lines
swapped or duplicated) and random programs drawn from a small grammar-like strategy. A program that does load is
also run through the reference on tiny shapes, which must not raise. Fewer of them, with token-level mutations
(tokens deleted, duplicated, swapped; numbers, names, operators and indices changed), go the whole way: load,
analysis, module generation and `ast.parse` of the module.

Deterministic by default (CI); set RECDSL_FUZZ_RANDOM=1 to explore with fresh seeds and RECDSL_FUZZ_EXAMPLES=N for
more examples.
"""

from __future__ import annotations

import ast
import os
import re

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import recurrence_dsl
from codegen.module import module_source
from recurrence_dsl import SpecError
from recurrence_dsl.analysis import analyse
from recurrence_dsl.errors import Source
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPEC_FILES, language_examples

FUZZ = settings(
    max_examples=int(os.environ.get("RECDSL_FUZZ_EXAMPLES", "250")),
    deadline=None,
    derandomize=not os.environ.get("RECDSL_FUZZ_RANDOM"),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

EXTRA_BASES = [
    "recurrence f(x[D]) -> y[D] {\n    state h[D]\n    h[d] = tanh(h[d] + x[d])\n    y[d] = h[d]\n}\n",
    "recurrence f(x, y) -> o, p {\n    o = min(x, y) ** 2\n    p = -o / (1 + abs(y))\n}\n",
    "recurrence f(A[M, N], x[M]) -> t[N, M], s {\n    t[j, i] = A[i, j]\n    s = sum(i, j, A[i, j] * x[i])\n}\n",
    "recurrence a(x[3]) -> y[3] { y[i] = x[i] }\nrecurrence b(x[D]) -> y[D] {\n    y[d] = x[d] \\\n + 1\n}\n",
]
BASES = [p.read_text() for p in SPEC_FILES] + language_examples()[0] + EXTRA_BASES

PIECES = [
    "(", ")", "[", "]", "{", "}", ",", "=", "==", "+", "-", "*", "/", "**", "->", "#", "\n", " ", "\t", "\\\n",
    "\r\n", "\r", ".", "..", "0", "1", "1e-6", ".5", "1e", "i", "j", "K", "S", "x", "sum", "sum(", "exp", "expp",
    "min", "max", "state", "param", "recurrence", "$", ";", "@", "é", "\x00", "\x0c", "\x85", "\u2028", "\ufeff",
]

TOKEN = re.compile(r"[A-Za-z_][A-Za-z_0-9]*|[0-9.]+(?:[eE][+-]?[0-9]+)?|\*\*|->|\s+|.", re.S)


@st.composite
def mutated_programs(draw):
    text = draw(st.sampled_from(BASES))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["delete", "insert", "replace", "token", "line"]))
        pos = draw(st.integers(0, len(text)))
        if kind == "delete":
            text = text[:pos] + text[pos + draw(st.integers(1, 3)):]
        elif kind == "insert":
            text = text[:pos] + draw(st.sampled_from(PIECES)) + text[pos:]
        elif kind == "replace":
            text = text[:pos] + draw(st.sampled_from(PIECES)) + text[pos + 1:]
        elif kind == "token":
            tokens = TOKEN.findall(text)
            if tokens:
                at = draw(st.integers(0, len(tokens) - 1))
                tokens[at] = draw(st.sampled_from(["", *PIECES, tokens[at - 1], tokens[at] * 2]))
            text = "".join(tokens)
        else:
            lines = text.split("\n")
            a = draw(st.integers(0, len(lines) - 1))
            b = draw(st.integers(0, len(lines) - 1))
            choice = draw(st.sampled_from(["swap", "duplicate", "drop"]))
            if choice == "swap":
                lines[a], lines[b] = lines[b], lines[a]
            elif choice == "duplicate":
                lines.insert(b, lines[a])
            else:
                del lines[a]
            text = "\n".join(lines)
    return text


# -- random programs from a small grammar ------------------------------------------------------------------------

# Each size has a usual index letter; programs mostly use it, so a fair share of them check.
SIZES = {"K": "i", "V": "j", "N": "n", "3": "m"}
VALUES = {"q": ("K",), "k": ("K",), "v": ("V",), "g": ("K",), "x": ("N",), "beta": (), "dt": (), "W": ("K", "V")}
FUNCTIONS = ["exp", "log", "sqrt", "abs", "tanh", "sigmoid", "logsigmoid", "softplus", "silu", "elu", "relu", "min",
             "max", "sum", "expp", "q"]


def _decl(name, dims):
    return name + ("[" + ", ".join(dims) + "]" if dims else "")


@st.composite
def indexed_values(draw):
    name = draw(st.sampled_from(sorted(VALUES) + ["S", "h", "o", "t", "u", "K", "zz"]))
    dims = VALUES.get(name, ("K", "V") if name == "S" else ("K",))
    if draw(st.integers(0, 9)) == 0:
        dims = dims + ("K",)  # wrong number of indices, now and then
    letters = [SIZES.get(d, "i") if draw(st.integers(0, 5)) else draw(st.sampled_from("ijnmp0")) for d in dims]
    return name + ("[" + ", ".join(letters) + "]" if letters else "")


def _expressions():
    leaves = st.one_of(
        st.sampled_from(["1", "0.5", "1e-6", "2", ".25", "K", "V", "beta", "dt", "q", "i"]),
        indexed_values(),
    )

    def extend(inner):
        return st.one_of(
            st.tuples(inner, st.sampled_from(["+", "-", "*", "/", "**"]), inner).map(" ".join),
            inner.map(lambda e: f"-{e}"),
            inner.map(lambda e: f"({e})"),
            st.tuples(st.sampled_from(FUNCTIONS), st.lists(inner, min_size=1, max_size=3)).map(
                lambda fa: f"{fa[0]}({', '.join(fa[1])})"),
            st.tuples(st.sampled_from(["i", "j", "n", "i, j"]), inner).map(lambda ie: f"sum({ie[0]}, {ie[1]})"),
        )

    return st.recursive(leaves, extend, max_leaves=8)


EXPRESSIONS = _expressions()


@st.composite
def loose_programs(draw):
    """Programs whose pieces are drawn independently: mostly semantically wrong somewhere."""
    names = draw(st.lists(st.sampled_from(sorted(VALUES)), min_size=0, max_size=4, unique=True))
    inputs = ", ".join(_decl(n, VALUES[n]) for n in names)
    outputs = draw(st.sampled_from(["o[V]", "o", "o[V], p", "o[K, V]"]))
    lines = [f"recurrence f({inputs}) -> {outputs} {{"]
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["state", "param", "assign", "assign", "assign"]))
        if kind == "state":
            lines.append("    state " + draw(st.sampled_from(["S[K, V]", "h[K]", "S[K, V], h[K]", "c"])))
        elif kind == "param":
            lines.append("    param " + draw(st.sampled_from(["u[K]", "A", "A, D", "w[K, V]"])))
        else:
            target = draw(st.sampled_from(["o[j]", "o", "S[i, j]", "h[i]", "t[i]", "u", "p", "o[i, j]", "q[i]"]))
            lines.append(f"    {target} = {draw(EXPRESSIONS)}")
    lines.append(draw(st.sampled_from(["}", "}", "", "} }"])))
    return "\n".join(lines) + draw(st.sampled_from(["\n", "", "\n\n# end\n"]))


# Values a well-formed program may read: name -> index letters (K -> i, V -> j).
READABLE = {"q": "i", "k": "i", "v": "j", "g": "i", "W": "ij", "beta": "", "dt": "", "u": "i", "A": "", "S": "ij",
            "h": "i", "c": ""}
UNARY = ["exp", "log", "sqrt", "abs", "tanh", "sigmoid", "logsigmoid", "softplus", "silu", "elu", "relu"]


@st.composite
def bound_expressions(draw, bound: str, depth: int = 3):
    """An expression whose free indices all lie in `bound`, so that it usually checks."""
    if depth == 0 or draw(st.integers(0, 2)) == 0:
        choices = [n for n, letters in READABLE.items() if set(letters) <= set(bound)]
        name = draw(st.sampled_from(choices + ["1", "0.5", "K", "V", "1e-3"]))
        letters = READABLE.get(name, "")
        return name + ("[" + ", ".join(letters) + "]" if letters else "")
    kind = draw(st.sampled_from(["binop", "binop", "neg", "call", "minmax", "sum", "paren"]))
    if kind == "binop":
        op = draw(st.sampled_from(["+", "-", "*", "/", "**"]))
        return f"{draw(bound_expressions(bound, depth - 1))} {op} {draw(bound_expressions(bound, depth - 1))}"
    if kind == "neg":
        return "-" + draw(bound_expressions(bound, depth - 1))
    if kind == "paren":
        return "(" + draw(bound_expressions(bound, depth - 1)) + ")"
    if kind == "call":
        return f"{draw(st.sampled_from(UNARY))}({draw(bound_expressions(bound, depth - 1))})"
    if kind == "minmax":
        a, b = draw(bound_expressions(bound, depth - 1)), draw(bound_expressions(bound, depth - 1))
        return f"{draw(st.sampled_from(['min', 'max']))}({a}, {b})"
    free = [c for c in "ij" if c not in bound]
    if not free:
        return draw(bound_expressions(bound, depth - 1))
    index = draw(st.sampled_from(free))
    body = draw(bound_expressions(bound + index, depth - 1))
    if index not in body:  # the sum must index its variable somewhere
        body = f"{body} * {'q' if index == 'i' else 'v'}[{index}]"
    return f"sum({index}, {body})"


@st.composite
def well_formed_programs(draw):
    """Declarations first, then assignments whose indices agree: most of these check."""
    lines = ["recurrence f(q[K], k[K], v[V], g[K], W[K, V], beta, dt) -> o[V], p {"]
    lines.append("    param " + draw(st.sampled_from(["u[K], A", "A, u[K]"])))
    lines.append("    state " + draw(st.sampled_from(["S[K, V], h[K], c", "c, h[K], S[K, V]"])))
    for _ in range(draw(st.integers(0, 3))):
        target, bound = draw(st.sampled_from([("S[i, j]", "ij"), ("h[i]", "i"), ("c", ""), ("t[i]", "i")]))
        if target.startswith("t") and any(line.startswith("    t[") for line in lines):
            continue
        value = draw(bound_expressions(bound))
        if target.startswith("t") and "i" not in value:
            value += " + q[i]"
        lines.append(f"    {target} = {value}")
    lines.append(f"    o[j] = {draw(bound_expressions('j'))}")
    lines.append(f"    p = {draw(bound_expressions(''))}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def random_programs():
    return st.one_of(well_formed_programs(), loose_programs())


# -- the property -------------------------------------------------------------------------------------------------


def _check_error_position(text: str, err: SpecError) -> None:
    lines = Source(text).lines()
    assert 1 <= err.span.line <= len(lines) + 1, (err.span, len(lines))
    assert err.span.column >= 1, err.span
    if err.span.line <= len(lines):
        # At most one past the end of the line (an error at the end of a line or of the file).
        assert err.span.column <= len(lines[err.span.line - 1]) + 1, (err.span, lines[err.span.line - 1])
    assert err.message
    rendered = err.render()
    assert rendered.startswith(f"fuzz.rec:{err.span.line}:{err.span.column}: error: ")
    if err.span.line <= len(lines) and lines[err.span.line - 1]:
        caret = rendered.split("\n")[2]
        assert caret.index("^") == 4 + err.span.column - 1


def _load_and_run(text: str) -> None:
    try:
        recs = recurrence_dsl.load_text(text, "fuzz.rec")
    except SpecError as err:
        _check_error_position(text, err)
        return
    for rec in recs.values():
        if not rec.checked.inputs:
            continue  # nothing fixes B and T: a CallError, tested elsewhere
        sizes = {name: 2 + i % 2 for i, name in enumerate(rec.checked.sizes)}
        args, initial = sample_arguments(rec.checked, sizes, 1, 2, 1, dtype=torch.float64, with_initial_state=True)
        out, final = rec.reference(*args, initial_state=initial, output_final_state=True)
        for o in out if isinstance(out, tuple) else (out,):
            assert o.shape[:3] == (1, 2, 1)


@FUZZ
@given(mutated_programs())
def test_mutated_programs_raise_only_spec_errors(text):
    _load_and_run(text)


@FUZZ
@given(random_programs())
def test_random_programs_raise_only_spec_errors(text):
    _load_and_run(text)


@FUZZ
@given(st.lists(st.sampled_from(PIECES + ["o", "y", "d", "D", ">", "<", "!", "'", '"']), max_size=40).map("".join))
def test_arbitrary_text_raises_only_spec_errors(text):
    _load_and_run(text)


# -- the whole pipeline, on token-level mutations -------------------------------------------------------------------

# Writing a module takes about a second: fewer examples than above, still deterministic by default.
PIPELINE = settings(FUZZ, max_examples=int(os.environ.get("RECDSL_FUZZ_PIPELINE_EXAMPLES", "30")))

NUMBERS = ["0", "1", "2", "0.5", "1e-6", "1e999", "1e-400", "3.0e2", "65536", "00", "9" * 30]
NAMES = ["x", "q", "k", "v", "S", "h", "i", "j", "K", "V", "D", "exp", "tanh", "sum", "min", "state", "param", "len",
         "F", "torch", "initial_state", "sizes", "B", "T", "H", "None", "lambda", "r__new"]
OPERATORS = ["+", "-", "*", "/", "**"]
INDICES = ["i", "j", "k", "d", "n", "0", "i, j", "i, i", ""]
_WORD = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")
_NUMBER = re.compile(r"[0-9.]+(?:[eE][+-]?[0-9]+)?")


@st.composite
def token_mutations(draw):
    """A program of specs/ or LANGUAGE.md (or a small extra one) with 1 to 3 token-level mutations."""
    tokens = TOKEN.findall(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 3))):
        solid = [n for n, t in enumerate(tokens) if not t.isspace()]
        if not solid:
            break
        at = draw(st.sampled_from(solid))
        token = tokens[at]
        kind = draw(st.sampled_from(["delete", "duplicate", "swap", "number", "name", "operator", "index"]))
        if kind == "delete":
            tokens[at] = ""
        elif kind == "duplicate":
            tokens[at] = token + draw(st.sampled_from(["", " "])) + token
        elif kind == "swap":
            other = draw(st.sampled_from(solid))
            tokens[at], tokens[other] = tokens[other], token
        elif kind == "number":
            numbers = [n for n in solid if _NUMBER.fullmatch(tokens[n])] or [at]
            tokens[draw(st.sampled_from(numbers))] = draw(st.sampled_from(NUMBERS))
        elif kind == "name":
            words = [n for n in solid if _WORD.fullmatch(tokens[n])] or [at]
            here = draw(st.sampled_from(words))
            tokens[here] = draw(st.sampled_from(NAMES + sorted({tokens[n] for n in words})))
        elif kind == "operator":
            ops = [n for n in solid if tokens[n] in OPERATORS] or [at]
            tokens[draw(st.sampled_from(ops))] = draw(st.sampled_from(OPERATORS))
        else:  # the indices inside one pair of brackets
            opens = [n for n in solid if tokens[n] == "["]
            if opens:
                start = draw(st.sampled_from(opens))
                end = next((n for n in range(start, len(tokens)) if tokens[n] == "]"), start)
                tokens[start + 1:end] = [draw(st.sampled_from(INDICES))]
    return "".join(tokens)


def _generate(text: str) -> None:
    """Load, analyse, write the module and parse it; the only exception allowed is a well-placed SpecError."""
    try:
        recs = recurrence_dsl.load_text(text, "fuzz.rec")
        source = module_source([analyse(r.checked) for r in recs.values()], "fuzz.rec")
    except SpecError as err:
        _check_error_position(text, err)
        return
    ast.parse(source)
    for rec in recs.values():
        assert f"def {rec.name}(" in source or f"{rec.name} =" in source, rec.name


@PIPELINE
@given(token_mutations())
def test_mutated_programs_generate_parsable_modules_or_spec_errors(text):
    _generate(text)


@settings(PIPELINE, max_examples=max(1, PIPELINE.max_examples // 3))
@given(random_programs())
def test_random_programs_generate_parsable_modules_or_spec_errors(text):
    _generate(text)


def test_the_strategies_reach_valid_and_invalid_programs():
    """Guard against a strategy that silently stops producing checkable programs."""
    seen: list[bool] = []

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(random_programs())
    def collect(text):
        try:
            recurrence_dsl.load_text(text)
            seen.append(True)
        except SpecError:
            seen.append(False)

    collect()
    valid = sum(seen)
    invalid = len(seen) - valid
    assert valid >= len(seen) // 4, (valid, invalid)


def test_token_mutations_reach_programs_that_load():
    """Guard: enough mutated programs load (about 40%) for the pipeline test to reach module generation."""
    seen: list[bool] = []

    @settings(max_examples=40, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(token_mutations())
    def collect(text):
        try:
            recurrence_dsl.load_text(text)
            seen.append(True)
        except SpecError:
            seen.append(False)

    collect()
    assert sum(seen) >= len(seen) // 5, (sum(seen), len(seen))
