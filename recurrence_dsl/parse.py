"""Parse `.rec` text into the syntax tree (`syntax.py`), turning lark's errors into `SpecError`s."""

from __future__ import annotations

from functools import lru_cache

import lark
from lark import Token, v_args
from lark.visitors import Transformer_NonRecursive

from grammar import grammar_text

from . import syntax as ast
from .errors import (
    CAUSAL_HINT,
    MAX_DEPTH,
    MAX_NESTING,
    MAX_NODES,
    MAX_RECURRENCES,
    MAX_SOURCE_CHARS,
    Source,
    Span,
    SpecError,
    did_you_mean,
    shown_number,
)

__all__ = ["parse_program"]

# What the user typed for each terminal, for messages like "expected ')'".
_TERMINAL_WORDS = {
    "NAME": "a name",
    "INT": "an integer",
    "NUMBER": "a number",
    "_NL": "end of line",
    "$END": "end of file",
}


@lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    return lark.Lark(grammar_text(), parser="lalr", propagate_positions=True, maybe_placeholders=True)


def _token_span(tok: Token) -> Span:
    return Span(tok.line, tok.column, tok.end_line, tok.end_column)


def _meta_span(meta) -> Span:
    return Span(meta.line, meta.column, meta.end_line, meta.end_column)


def _join(a: Span, b: Span) -> Span:
    return Span(a.line, a.column, b.end_line, b.end_column)


def _span_of(node) -> Span:
    return node.span if not isinstance(node, Token) else _token_span(node)


# The largest dimension a tensor can have (torch sizes are int64).
MAX_DIMENSION = 2**63 - 1


def _int_literal(tok: Token) -> int:
    """An INT token's value, capped at MAX_DIMENSION + 1 (so that no digit string, however long, is converted:
    Python refuses int() of more than 4300 digits)."""
    digits = str(tok).lstrip("0") or "0"
    return int(digits) if len(digits) <= 19 else MAX_DIMENSION + 1


@v_args(meta=True)
class _ToSyntax(Transformer_NonRecursive):
    """Builds `syntax` nodes bottom-up; every node keeps the span of its text."""

    def __init__(self, source: Source):
        super().__init__()
        self.source = source

    def start(self, meta, children):
        return tuple(children)

    def recurrence(self, meta, children):
        reverse, name, inputs, outputs, *statements = children
        return ast.RecurrenceSyntax(
            name=str(name),
            inputs=inputs or (),
            outputs=outputs,
            statements=tuple(s for s in statements if s is not None),
            span=_meta_span(meta),
            name_span=_token_span(name),
            reverse=reverse is not None,
        )

    def decl_list(self, meta, children):
        return tuple(children)

    def decl(self, meta, children):
        name, *dims = children
        dims = tuple(d for d in dims if d is not None)
        return ast.Decl(str(name), dims, _meta_span(meta))

    def size_name(self, meta, children):
        (tok,) = children
        return ast.Dim(str(tok), _token_span(tok))

    def size_literal(self, meta, children):
        (tok,) = children
        size = _int_literal(tok)
        if size > MAX_DIMENSION:
            raise SpecError(f"dimension {shown_number(str(tok))} is too large: a dimension is at most 2**63 - 1",
                            _token_span(tok), self.source)
        return ast.Dim(size, _token_span(tok))

    def param_stmt(self, meta, children):
        return ast.DeclStatement("param", children[0], _meta_span(meta))

    def state_stmt(self, meta, children):
        return ast.DeclStatement("state", children[0], _meta_span(meta))

    def target(self, meta, children):
        name, *indices = children
        return name, tuple(i for i in indices if i is not None)

    def assign(self, meta, children):
        (name, indices), value = children
        return ast.Assign(str(name), indices, value, _meta_span(meta), _token_span(name))

    def index_var(self, meta, children):
        (tok,) = children
        return ast.IndexVar(str(tok), _token_span(tok))

    def index_literal(self, meta, children):
        (tok,) = children
        return ast.IndexLiteral(_int_literal(tok), _token_span(tok))  # only its position is ever reported

    def number(self, meta, children):
        (tok,) = children
        # float() of the text: the float64 nearest the literal (inf beyond 1.8e308), digits of any length.
        return ast.Number(float(tok), str(tok), _token_span(tok))

    def name(self, meta, children):
        (tok,) = children
        return ast.Name(str(tok), _token_span(tok))

    def indexed(self, meta, children):
        name, *indices = children
        return ast.Indexed(str(name), tuple(indices), _meta_span(meta), _token_span(name))

    def call(self, meta, children):
        func, *args = children
        args = tuple(a for a in args if a is not None)
        return ast.Call(str(func), args, _meta_span(meta), _token_span(func))

    def _binop(op):  # noqa: N805 - a factory used in the class body
        def build(self, meta, children):
            left, right = children
            return ast.BinOp(op, left, right, _join(_span_of(left), _span_of(right)))

        return build

    add = _binop("+")
    sub = _binop("-")
    mul = _binop("*")
    div = _binop("/")
    pow = _binop("**")

    def neg(self, meta, children):
        (operand,) = children
        return ast.Neg(operand, _meta_span(meta))

    def pos(self, meta, children):
        (operand,) = children
        return operand


def _describe_token(tok: Token) -> str:
    if tok.type == "_NL":
        return "end of line"
    if tok.type == "$END":
        return "end of file"
    if tok.type == "NAME":
        return f"name '{tok}'"
    if tok.type in ("INT", "NUMBER"):
        return f"number {tok}"
    return f"'{tok}'"


def _describe_expected(expected: set[str]) -> str:
    parser = _parser()
    words = []
    for name in sorted(expected):
        if name in _TERMINAL_WORDS:
            words.append(_TERMINAL_WORDS[name])
            continue
        try:
            pattern = parser.get_terminal(name).pattern
        except KeyError:
            continue
        words.append(f"'{pattern.value}'" if pattern.type == "str" else name.lower())
    words = sorted(set(words))
    if not words:
        return ""
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " or " + words[-1]


# Characters from other languages' notations, and what to write in a spec instead.
_CHARACTER_HINTS = {
    "^": "write a power as x ** y ('^' is not an operator)",
    "@": "there is no matrix product: write the contraction with sum, e.g. o[j] = sum(i, q[i] * S[i, j])",
    "'": "there is no transpose: index the other way, e.g. S[j, i], or sum over the other axis",
    ";": "a statement ends at the end of its line: remove the ';' (a '\\' at a line's end continues it)",
    # Characters pasted from a paper or a word processor: their ASCII spelling.
    "\u00d7": "write a product as '*'",  # multiplication sign
    "\u00b7": "write a product as '*'",  # middle dot
    "\u22c5": "write a product as '*'",  # dot operator
    "\u2212": "write a minus as '-' (this is the Unicode minus sign)",
    "\u2013": "write a minus as '-' (this is an en dash)",
    "\u00f7": "write a division as '/'",
    "\u2211": "write a sum as sum(i, x[i])",
}


def _character_hint(char: str) -> str | None:
    if char in _CHARACTER_HINTS:
        return _CHARACTER_HINTS[char]
    if char.isalpha() and not char.isascii():
        return "names are ASCII letters, digits and '_': spell it out (e.g. 'gamma' for '\u03b3')"
    return None


def _backslash_hint(text: str, pos: int) -> str:
    """Why a '\\' did not continue its statement: only one that ends its line does."""
    rest = text[pos + 1:].split("\n", 1)[0].rstrip("\r")
    if rest.strip().startswith("#"):
        return ("a '\\' continues a statement only as the last character of its line: put the comment on a line "
                "of its own")
    if not rest.strip():
        return "a '\\' continues a statement only as the last character of its line: remove the spaces after it"
    return "a '\\' continues a statement only at the very end of its line"


_DECLARATIONS = ("state", "param")


def _syntax_error(err: lark.exceptions.UnexpectedInput, source: Source) -> SpecError:
    if isinstance(err, lark.exceptions.UnexpectedCharacters):
        char = source.text[err.pos_in_stream] if err.pos_in_stream < len(source.text) else "?"
        span = Span(err.line, err.column, err.line, err.column + 1)
        shown = char if char.isprintable() else repr(char)[1:-1]  # '\r', '\x00' rather than the raw byte
        hint = _backslash_hint(source.text, err.pos_in_stream) if char == "\\" else _character_hint(char)
        return SpecError(f"unexpected character '{shown}'", span, source, hint=hint)
    if isinstance(err, lark.exceptions.UnexpectedEOF):
        lines = source.lines() or [""]
        span = Span(len(lines), len(lines[-1]) + 1, len(lines), len(lines[-1]) + 2)
        expected = _describe_expected(set(err.expected))
        return SpecError(f"unexpected end of file, expected {expected}", span, source,
                         hint="is a closing '}' missing?")
    assert isinstance(err, lark.exceptions.UnexpectedToken)
    tok = err.token
    expected = set(err.expected)
    if tok.type == "$END":
        lines = source.lines() or [""]
        span = Span(len(lines), len(lines[-1]) + 1, len(lines), len(lines[-1]) + 2)
        return SpecError(f"unexpected end of file, expected {_describe_expected(expected)}", span, source,
                         hint="is a closing '}' missing?")
    span = _token_span(tok)
    if tok.type == "_NL":
        # Point at the end of the line rather than at the newline's own (next-line) position.
        span = Span(tok.line, tok.column, tok.line, tok.column + 1)
    message = f"unexpected {_describe_token(tok)}"
    described = _describe_expected(expected)
    if described:
        message += f", expected {described}"
    hint = None
    if tok.type == "_NL" and "RPAR" in expected:
        hint = "a ')' is missing before the end of the line"
    elif tok.type == "_NL" and "RSQB" in expected:
        hint = "a ']' is missing before the end of the line"
    elif tok.type == "EQUAL" and expected & {"EQUAL"} == set():
        hint = "only one assignment per line; '==' is not an operator"
    elif tok.type in ("PLUS", "MINUS") and "RSQB" in expected:
        hint = "an index is a name, never shifted: " + CAUSAL_HINT  # x[t + 1], x[d - 1]
    elif tok.type == "REVERSE":
        hint = "'reverse' goes before 'recurrence' (once): 'reverse recurrence NAME(...)'"
    elif tok.type == "NAME" and "RECURRENCE" in expected:
        hint = ("a recurrence starts 'recurrence NAME(...)', or 'reverse recurrence NAME(...)' to run from the "
                "last step to the first; a bidirectional layer is a forward and a reverse recurrence whose "
                "outputs you combine (docs/language.md, Direction)")
    elif tok.type == "_NL" and (err.token_history or [None])[-1] is not None and \
            str(err.token_history[-1]) == "reverse":
        hint = ("'reverse' is not a statement: to run from the last step to the first, write 'reverse recurrence "
                "NAME(...)' or call the layer with reverse=True")
    elif tok.type == "NAME" and "LBRACE" in expected:
        hint = "the body of a recurrence starts with '{' after its outputs"
    elif tok.type == "NAME" and "EQUAL" in expected and err.token_history and \
            err.token_history[-1].type == "NAME" and did_you_mean(str(err.token_history[-1]), _DECLARATIONS):
        # `stat S[K, V]`, `params A`: a misspelt declaration parses as the start of an assignment to it.
        prev = err.token_history[-1]
        return SpecError(f"unknown declaration '{prev}'", _token_span(prev), source,
                         hint=f"{did_you_mean(str(prev), _DECLARATIONS)} A declaration reads 'state S[K, V]' or "
                              "'param A, u[K]'")
    return SpecError(message, span, source, hint=hint)


def _position(text: str, offset: int) -> Span:
    """The 1-based line and column of character `offset` of `text`."""
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return Span(line, column, line, column + 1)


# Expression nodes that nest their operands (a chain `a + b - c` of binary operators does not).
_NESTING_RULES = frozenset({"call", "neg", "pos", "pow"})
_LEAF_RULES = frozenset({"number", "name", "indexed"})  # (an index of `indexed` is no expression)
_EXPRESSION_RULES = _NESTING_RULES | _LEAF_RULES | {"add", "sub", "mul", "div"}


def _check_limits(tree: lark.Tree, source: Source) -> None:
    """Refuse, at its position, the first thing in the parse tree beyond MAX_RECURRENCES, MAX_NESTING, MAX_DEPTH
    or MAX_NODES. Iterative, so that it cannot itself run out of Python's stack; every later stage recurses over
    expressions and relies on these bounds."""
    recurrences = [c for c in tree.children if isinstance(c, lark.Tree)]
    if len(recurrences) > MAX_RECURRENCES:
        # (children[0] is the optional `reverse` keyword, None when absent)
        name = next(c for c in recurrences[MAX_RECURRENCES].children if isinstance(c, Token) and c.type == "NAME")
        raise SpecError(f"too many recurrences in one file: at most {MAX_RECURRENCES}, and this is recurrence "
                        f"{MAX_RECURRENCES + 1} of {len(recurrences)}", _token_span(name), source,
                        hint="split the recurrences over several files")
    for rec in recurrences:
        for stmt in rec.children:
            if not isinstance(stmt, lark.Tree) or stmt.data != "assign":
                continue
            expr = stmt.children[1]
            nodes = 0
            # (node, operations on the path down to it, nesting ones among them), counting the node's own
            stack = [(expr, int(getattr(expr, "data", "") not in _LEAF_RULES),
                      int(getattr(expr, "data", "") in _NESTING_RULES))]
            while stack:
                node, depth, nesting = stack.pop()
                if not isinstance(node, lark.Tree):
                    continue
                nodes += 1
                span = _meta_span(node.meta)
                if nesting > MAX_NESTING:
                    raise SpecError(f"this expression nests more than {MAX_NESTING} function calls, sums, signs "
                                    f"and powers inside one another", span, source,
                                    hint="compute the inner part into a temporary on a line of its own")
                if depth > MAX_DEPTH:
                    raise SpecError(f"this expression is more than {MAX_DEPTH} operations deep", span, source,
                                    hint="split a long sum or product over temporaries, a few terms a line")
                if nodes > MAX_NODES:
                    raise SpecError(f"this expression has more than {MAX_NODES} names, numbers and operations",
                                    _meta_span(expr.meta), source,
                                    hint="split it over temporaries on lines of their own")
                for child in node.children:
                    if isinstance(child, lark.Tree) and child.data in _EXPRESSION_RULES:
                        stack.append((child, depth + (child.data not in _LEAF_RULES),
                                      nesting + (child.data in _NESTING_RULES)))


def parse_program(text: str, filename: str = "<string>") -> ast.Program:
    """Parse a whole `.rec` file. Raises `SpecError` on a syntax error, and on a text beyond the limits of
    `errors.py` (MAX_SOURCE_CHARS characters, MAX_RECURRENCES recurrences; per expression MAX_NESTING nested
    calls, sums, signs and powers, MAX_DEPTH operations deep, MAX_NODES nodes)."""
    source = Source(text, filename)
    if len(text) > MAX_SOURCE_CHARS:
        raise SpecError(f"the file is too large: {len(text)} characters, at most {MAX_SOURCE_CHARS}",
                        _position(text, MAX_SOURCE_CHARS), source, hint="split it into several files")
    if not text.endswith("\n"):
        text += "\n"
    try:
        tree = _parser().parse(text)
    except lark.exceptions.UnexpectedInput as err:
        raise _syntax_error(err, source) from None
    _check_limits(tree, source)
    try:
        recurrences = _ToSyntax(source).transform(tree)
    except lark.exceptions.VisitError as err:
        if isinstance(err.orig_exc, SpecError):
            raise err.orig_exc from None
        raise
    return ast.Program(recurrences, source)
