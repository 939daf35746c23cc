"""The Python entry points: `load` a `.rec` file or text, get `Recurrence` objects."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .check import CheckedRecurrence, check_program
from .errors import Source, Span, SpecError, SpecWarning, did_you_mean
from .parse import parse_program
from .reference import run_reference


def spec_hash(checked: CheckedRecurrence) -> str:
    """Hash of a recurrence's source text: identifies its generated module and its tuning records."""
    return hashlib.sha256(checked.text.encode()).hexdigest()[:16]


class Recurrence:
    """One checked recurrence: its declaration, its reference interpreter, and its compiled forms."""

    def __init__(self, checked: CheckedRecurrence):
        self.checked = checked

    @property
    def name(self) -> str:
        return self.checked.name

    @property
    def spec_hash(self) -> str:
        """Hash of the recurrence's source text: identifies compiled artefacts and tuning records."""
        return spec_hash(self.checked)

    @property
    def warnings(self) -> tuple[SpecWarning, ...]:
        """Likely mistakes in a valid spec (an input never read, a state that never reaches an output), each at
        its line:col; `w.render()` prints one as the command line does. Empty for a clean spec."""
        return self.checked.warnings

    def reference(self, *args, dtype: torch.dtype = torch.float64, **kwargs):
        """Run the body step by step in `dtype` (float64 by default): the oracle every form is checked against.

        Arguments as every layer takes them (docs/language.md, Calling convention): inputs `[B, T, H, ...]` and
        params `[H, ...]` by position or name; `initial_state=None` (`[N, H, ...]`, a dict by name for several
        states; N = B, or the number of sequences under `cu_seqlens`); `output_final_state=False`;
        `cu_seqlens=None` (`[N + 1]` int, B == 1); `reverse=None` (the declared direction). Returns
        `(output, final_state)`: outputs `[B, T, H, ...]` in `dtype`, final states `[N, H, ...]` or None.
        Raises CallError for a call whose shapes, names or values do not fit."""
        return run_reference(self.checked, *args, dtype=dtype, **kwargs)

    def __repr__(self) -> str:
        c = self.checked
        return (f"<Recurrence {c.name}({', '.join(s.name for s in c.inputs)}) -> "
                f"{', '.join(s.name for s in c.outputs)}>")


class Recurrences(dict):
    """What `load` returns: the recurrences of one file by name, in file order. A name the file lacks is a
    `KeyError` that names those it has."""

    def __init__(self, recurrences, filename: str = "<string>"):
        super().__init__(recurrences)
        self.filename = filename

    def __missing__(self, name):
        close = did_you_mean(str(name), self)
        raise KeyError(f"{self.filename} has no recurrence {name!r}; it has {', '.join(map(repr, self)) or 'none'}"
                       + (f" ({close})" if close else ""))


def load_text(text: str, filename: str = "<string>") -> Recurrences:
    """Parse and check `.rec` text; the recurrences by name, in file order. Raises `SpecError`."""
    program = parse_program(text, filename)
    return Recurrences({c.name: Recurrence(c) for c in check_program(program)}, filename)


def _is_text(path_or_text: str | Path) -> bool:
    """Whether `load` reads its argument as `.rec` text: a str with a newline or a brace, or one that no path names
    and that starts like a spec (a comment, the `recurrence` keyword) or is blank."""
    if isinstance(path_or_text, Path):
        return False
    if "\n" in path_or_text or "{" in path_or_text:
        return True
    head = path_or_text.lstrip()
    if not head:  # (Path("") is the current folder)
        return True
    return (head.startswith("#") or head.split(None, 1)[0] == "recurrence") and not Path(path_or_text).exists()


def load(path_or_text: str | Path) -> Recurrences:
    """Load a `.rec` file (a path) or `.rec` source text (`_is_text`); the recurrences by name. Raises
    FileNotFoundError for a path that names no file, SpecError for text that is not a valid spec."""
    if not _is_text(path_or_text):
        path = Path(path_or_text)
        if path.is_dir():  # FileNotFoundError too: the CLI's "no such file" exit, with what the path is
            raise FileNotFoundError(f"{path} is a directory, not a .rec file")
        if not path.exists():  # (a pipe or a device, e.g. bash's <(...) or /dev/stdin, is read as it is)
            raise FileNotFoundError(f"no such .rec file: {path}")
        return load_text(read_spec(path), str(path))
    return load_text(path_or_text)


def read_spec(path: Path) -> str:
    """The text of a `.rec` file; a `SpecError` at the line and column of the first byte that is not UTF-8."""
    data = Path(path).read_bytes()
    # A leading byte-order mark (editors on Windows write one) is not part of the text.
    data = data.removeprefix(b"\xef\xbb\xbf")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        start = data.rfind(b"\n", 0, err.start) + 1
        line = data.count(b"\n", 0, err.start) + 1
        column = len(data[start:err.start].decode("utf-8")) + 1
        text = data.decode("utf-8", errors="replace")
        raise SpecError(f"the file is not UTF-8 text: byte 0x{data[err.start]:02x} at offset {err.start} "
                        "cannot be decoded", Span(line, column, line, column + 1), Source(text, str(path)),
                        hint="save the file as UTF-8") from None
