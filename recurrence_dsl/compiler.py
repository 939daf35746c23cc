"""`compile`: from an analysed recurrence to a callable layer with LANGUAGE.md's calling convention.

The torch backend prints every available form to Python source
(`codegen.torch_forms`), executes it once, and dispatches calls to the form
chosen by `form=` ("auto" picks by class and length). Compiled layers are
cached by spec hash, backend and chunk size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from codegen import torch_runtime
from codegen.dispatch import pick_form, run_forms
from codegen.torch_forms import PRELUDE, torch_forms_source

from .analysis import Analysis, analyse
from .calling import bind_call
from .errors import CallError

BACKENDS = ("torch",)


class CompiledLayer:
    """A recurrence compiled for one backend; call it like the reference."""

    def __init__(self, analysis: Analysis, backend: str, form: str, chunk_size: int):
        self.analysis = analysis
        self.recurrence = analysis.recurrence
        self.backend = backend
        self.form = form
        self.chunk_size = chunk_size
        self.source = PRELUDE + "\n\n" + torch_forms_source(analysis)
        namespace = {"torch": torch, "F": F, "_rt": torch_runtime}
        exec(compile(self.source, f"<recurrence_dsl torch forms of {self.recurrence.name}>", "exec"), namespace)
        name = self.recurrence.name
        self.forms = {form_name: namespace[f"{name}__{'chunked' if form_name == 'parallel' else form_name}"]
                      for form_name in analysis.forms}

    @property
    def name(self) -> str:
        return self.recurrence.name

    def pick_form(self, length: int) -> str:
        """The form `auto` runs for a sequence of `length` steps."""
        return pick_form(self.analysis.forms, length, self.chunk_size)

    def __call__(self, *args, form: str | None = None, chunk_size: int | None = None, **kwargs):
        call = bind_call(self.recurrence, args, kwargs)
        form = form or self.form
        if form != "auto" and form not in self.forms:
            why = self.analysis.unavailable.get(form, f"unknown form; choose from {', '.join(self.forms)} or auto")
            raise CallError(f"{self.name} has no '{form}' form: {why}")
        chunk = chunk_size or self.chunk_size
        return run_forms(self.recurrence, self.forms, call, form, chunk)


_CACHE: dict[tuple, CompiledLayer] = {}


def compile_recurrence(rec, backend: str = "torch", form: str = "auto", chunk_size: int = 64) -> CompiledLayer:
    """Compile a `Recurrence` (or `CheckedRecurrence`) for `backend`; cached by spec hash."""
    checked = getattr(rec, "checked", rec)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend '{backend}'; choose from {', '.join(BACKENDS)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    key = (checked.text, checked.source.filename, backend, form, chunk_size)
    if key not in _CACHE:
        layer = CompiledLayer(analyse(checked), backend, form, chunk_size)
        if form != "auto" and form not in layer.forms:
            raise ValueError(f"{checked.name} has no '{form}' form: "
                             f"{layer.analysis.unavailable.get(form, 'unknown form')}")
        _CACHE[key] = layer
    return _CACHE[key]
