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
from codegen.torch_forms import PRELUDE, torch_forms_source

from .analysis import Analysis, analyse
from .calling import BoundCall, bind_call, pack_result
from .errors import CallError

BACKENDS = ("torch",)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
        forms = self.analysis.forms
        if length <= 16 or len(forms) == 1:
            return "recurrent"
        if "parallel" in forms and length <= self.chunk_size:
            return "parallel"
        if "chunked" in forms:
            return "chunked"
        return "scan" if "scan" in forms else "recurrent"

    def __call__(self, *args, form: str | None = None, chunk_size: int | None = None, **kwargs):
        call = bind_call(self.recurrence, args, kwargs)
        form = form or self.form
        if form != "auto" and form not in self.forms:
            why = self.analysis.unavailable.get(form, f"unknown form; choose from {', '.join(self.forms)} or auto")
            raise CallError(f"{self.name} has no '{form}' form: {why}")
        chunk = chunk_size or self.chunk_size
        return run_forms(self, call, form, chunk)


def run_forms(layer: CompiledLayer, call: BoundCall, form: str, chunk_size: int):
    rec = layer.recurrence
    dtype = compute_dtype(call.dtype)
    inputs = {k: v.to(dtype) for k, v in call.inputs.items()}
    params = [call.params[p.name].to(dtype) for p in rec.params]
    sizes = [call.sizes[s] for s in rec.sizes]
    rows = call.num_sequences
    if call.initial_state is not None:
        states = {k: v.to(dtype) for k, v in call.initial_state.items()}
    else:
        states = {s.name: torch.zeros((rows, call.heads) + call.dims(s), dtype=dtype, device=call.device)
                  for s in rec.states}

    def run(piece: dict, piece_states: dict, length: int):
        chosen = layer.pick_form(length) if form == "auto" else form
        fn = layer.forms[chosen]
        extra = {}
        if chosen == "chunked":
            extra["chunk_size"] = chunk_size
        elif chosen == "parallel":
            extra["chunk_size"] = max(length, 1)
        ordered = [piece[i.name] for i in rec.inputs]
        return fn(*ordered, *params, piece_states, *sizes, **extra)

    if call.cu_seqlens is None:
        outputs, finals = run(inputs, states, call.length)
    else:
        bounds = call.cu_seqlens.tolist()
        out_pieces, final_pieces = [], []
        for n in range(len(bounds) - 1):
            lo, hi = bounds[n], bounds[n + 1]
            piece = {k: v[:, lo:hi] for k, v in inputs.items()}
            o, f = run(piece, {k: v[n : n + 1] for k, v in states.items()}, hi - lo)
            out_pieces.append(o)
            final_pieces.append(f)
        outputs = {o.name: torch.cat([p[o.name] for p in out_pieces], dim=1) for o in rec.outputs}
        finals = {s.name: torch.cat([f[s.name] for f in final_pieces], dim=0) for s in rec.states}
    outputs = {k: v.to(call.dtype) for k, v in outputs.items()}
    return pack_result(rec, outputs, finals if call.output_final_state else None)


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
