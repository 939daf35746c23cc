"""The two error types a user sees: `SpecError` for a bad `.rec` program,
`CallError` for a bad call of a compiled or reference layer; and `SpecWarning`,
printed like an error, for a valid program that is most likely not what was meant.

A `SpecError` carries the source position and prints the way compilers do:

    gla.rec:4:20: error: unknown function 'expp'
        S[i, j] = expp(g[i]) * S[i, j] + k[i] * v[j]
                  ^~~~
    hint: did you mean 'exp'?
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Span:
    """A 1-based source range: from (line, column) up to, not including, (end_line, end_column)."""

    line: int
    column: int
    end_line: int
    end_column: int

    def __str__(self) -> str:
        return f"{self.line}:{self.column}"


@dataclass(frozen=True)
class Source:
    """The text of a program and the name it is reported under."""

    text: str
    filename: str = "<string>"

    def lines(self) -> list[str]:
        """The lines as the parser counts them: split at '\\n' only (not at form feeds, NEL, ...)."""
        lines = [line.removesuffix("\r") for line in self.text.split("\n")]
        return lines[:-1] if self.text.endswith("\n") else lines

    def line_text(self, line: int) -> str:
        lines = self.lines()
        return lines[line - 1] if 0 < line <= len(lines) else ""


# Limits on what one spec may ask of the compiler (docs/language.md, "Limits"). Within them, analysis and code
# generation take time and memory polynomial in the size of the spec, and no stage recurses deeper than Python
# allows; beyond them, a `SpecError` at the first place over the limit.
MAX_SOURCE_CHARS = 1_000_000  # characters in one file or text
MAX_RECURRENCES = 100  # recurrences in one file
MAX_NESTING = 16  # function calls, sum(...), signs and `**` nested inside one another in one expression
MAX_DEPTH = 64  # operations nested in one expression, a chain `a + b + c` counting one per operator
MAX_NODES = 1024  # names, numbers and operations in one expression
MAX_INLINED = 4096  # nodes of a statement's value once the temporaries it reads are inlined (step IR)

# What a user who tries to read another step (x[t + 1], x[t - 1]) or to run backwards is told.
CAUSAL_HINT = ("the language is causal: a step reads its own inputs (x[i], not x[t + 1]) and the state the "
               "previous step left (to read the previous step's input, keep it in a shift state: 'state "
               "x_last[D]' updated with 'x_last[d] = x[d]' after the line that reads it, as a token shift or "
               "Mamba-3's trapezoid does; docs/language.md, Linear bodies); to run from the last step to the "
               "first, write "
               "'reverse recurrence NAME(...)' or call the layer with reverse=True; a bidirectional layer is a "
               "forward and a reverse recurrence whose outputs you combine (docs/language.md, Direction)")

# The most characters of a source line an error shows.
_LONGEST_SHOWN = 120


def render_at(label: str, message: str, span: Span, source: Source, hint: str | None) -> str:
    """`FILE:LINE:COL: LABEL: MESSAGE`, the source line, a caret under `span`, and the hint if any."""
    head = f"{source.filename}:{span.line}:{span.column}: {label}: {message}"
    text = source.line_text(span.line)
    parts = [head]
    if text:
        width = 1
        if span.end_line == span.line and span.end_column > span.column:
            width = span.end_column - span.column
        width = max(1, min(width, len(text) - span.column + 1))
        column = span.column
        if len(text) > _LONGEST_SHOWN:
            # A very long line (a 5000-digit literal): show a window around the error, marked with '...'.
            start = max(0, column - 1 - _LONGEST_SHOWN // 3)
            end = min(len(text), start + _LONGEST_SHOWN)
            width = min(width, end - (column - 1))
            text = ("..." if start else "") + text[start:end] + ("..." if end < len(text) else "")
            column = column - start + (3 if start else 0)
        # Keep tabs in the gutter so the caret lines up under tab-indented code.
        gutter = "".join(c if c == "\t" else " " for c in text[: column - 1])
        parts.append("    " + text)
        parts.append("    " + gutter + "^" + "~" * (width - 1))
    if hint:
        parts.append(f"hint: {hint}")
    return "\n".join(parts)


class _AtSpan:
    """A message about a place in a `.rec` program: its line and column, and its rendering with the source line."""

    kind = "error"
    message: str
    span: Span
    source: Source
    hint: str | None

    @property
    def line(self) -> int:
        return self.span.line

    @property
    def column(self) -> int:
        return self.span.column

    def render(self) -> str:
        """`FILE:LINE:COL: KIND: MESSAGE`, the source line, a caret, and a hint if any."""
        return render_at(self.kind, self.message, self.span, self.source, self.hint)


class SpecError(_AtSpan, Exception):
    """An error in a `.rec` program, with its position in the source."""

    def __init__(self, message: str, span: Span, source: Source, hint: str | None = None):
        self.message = message
        self.span = span
        self.source = source
        self.hint = hint
        super().__init__(self.render())


@dataclass(frozen=True)
class SpecWarning(_AtSpan):
    """Something in a valid `.rec` program that is most likely a mistake (a state no output ever sees, an input
    never read). Not raised: `Recurrence.warnings` holds them and the command line prints them on stderr."""

    message: str
    span: Span
    source: Source = field(compare=False, repr=False)
    hint: str | None = None
    kind = "warning"


class CallError(ValueError):
    """A layer was called (or compiled, `compile(rec, form=...)`) with arguments that do not fit its declaration,
    or differentiated twice through a form whose backward records no graph (codegen/dispatch.py `_first_order`)."""


class DecayNotPositive(ValueError):
    """A chunked or parallel form takes the logarithm of a decay that a call's values make <= 0 somewhere. With
    `form="auto"` the layer runs the step-by-step forms instead; a form asked for by name raises this. Compiled
    layers and generated modules raise this one class when recurrence_dsl is installed (`recdsl check` reports such
    a form as skipped on its random inputs, not as failed)."""


def did_you_mean(word: str, candidates) -> str | None:
    """A hint naming the closest candidate, or None when nothing is close."""
    close = difflib.get_close_matches(word, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


def shown_number(text: str) -> str:
    """A number literal as messages show it: in full, or its first digits and its length when it is long."""
    return text if len(text) <= 24 else f"{text[:12]}... ({len(text)} characters)"
