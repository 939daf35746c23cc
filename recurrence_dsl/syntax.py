"""The abstract syntax tree of a `.rec` program: frozen dataclasses, each with a source span."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import Source, Span


@dataclass(frozen=True)
class Number:
    value: float
    text: str
    span: Span


@dataclass(frozen=True)
class Name:
    """A bare name in an expression: a scalar value, a size used as a number, or (wrongly) a tensor."""

    name: str
    span: Span


@dataclass(frozen=True)
class IndexVar:
    name: str
    span: Span


@dataclass(frozen=True)
class IndexLiteral:
    """An integer used as an index (`x[0]`): parsed so the checker can explain it is not allowed."""

    value: int
    span: Span


@dataclass(frozen=True)
class Indexed:
    """`x[i, j]`."""

    name: str
    indices: tuple[IndexVar | IndexLiteral, ...]
    span: Span
    name_span: Span


@dataclass(frozen=True)
class Call:
    """`f(a, b)`; `sum(i, j, body)` stays a Call until the checker turns it into a `Sum`."""

    func: str
    args: tuple[Expr, ...]
    span: Span
    func_span: Span


@dataclass(frozen=True)
class Sum:
    """`sum(i, j, body)`; the checker fills `ranges` with the size each index runs over."""

    indices: tuple[IndexVar, ...]
    body: Expr
    span: Span
    ranges: tuple[str | int, ...] = ()


@dataclass(frozen=True)
class BinOp:
    op: str  # one of + - * / **
    left: Expr
    right: Expr
    span: Span


@dataclass(frozen=True)
class Neg:
    operand: Expr
    span: Span


Expr = Number | Name | Indexed | Call | Sum | BinOp | Neg


@dataclass(frozen=True)
class Dim:
    """One declared dimension: a size name (`K`) or an integer literal."""

    size: str | int
    span: Span

    def __str__(self) -> str:
        return str(self.size)


@dataclass(frozen=True)
class Decl:
    name: str
    dims: tuple[Dim, ...]
    span: Span


@dataclass(frozen=True)
class Assign:
    target: str
    indices: tuple[IndexVar | IndexLiteral, ...]
    value: Expr
    span: Span
    target_span: Span


@dataclass(frozen=True)
class DeclStatement:
    kind: str  # "param" or "state"
    decls: tuple[Decl, ...]
    span: Span


Statement = Assign | DeclStatement


@dataclass(frozen=True)
class RecurrenceSyntax:
    name: str
    inputs: tuple[Decl, ...]
    outputs: tuple[Decl, ...]
    statements: tuple[Statement, ...]
    span: Span
    name_span: Span
    reverse: bool = False  # declared `reverse recurrence`: steps run from the last to the first


@dataclass(frozen=True)
class Program:
    recurrences: tuple[RecurrenceSyntax, ...]
    source: Source = field(compare=False)
