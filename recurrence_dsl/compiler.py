"""`compile`: from an analysed recurrence to a callable layer with LANGUAGE.md's calling convention.

The torch backend prints every available form to Python source
(`codegen.torch_forms`), executes it once, and dispatches calls to the form
chosen by `form=` ("auto" picks by class and length). The triton backend runs
the same printed prologue and epilogue around the Triton chunked kernels
(`codegen.triton_runtime`, which has the torch runtime's API) and the Triton
recurrent kernel printed from the step IR (`codegen.triton_recurrent`); its
backward re-runs the matching torch form under autograd. `backend="auto"`
takes triton for CUDA tensors (or on CPU under TRITON_INTERPRET=1) when triton
imports, torch otherwise. Compiled layers are cached by spec text, backend,
form, chunk size and tuning store.

Block sizes come from the tuning store (`autotune/`, filled by `recdsl tune`): when a call gives neither
`chunk_size=` nor `config=`, the fastest stored config for (spec, device, dtype, shape bucket, form,
backend) is looked up (once per key and process) and used; with nothing stored, the layer's chunk_size and
the kernels' own block sizes run. `compile(..., tuning=False)` never looks up.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from codegen import torch_runtime
from codegen.dispatch import DecayNotPositive, pick_form, run_forms, with_torch_backward
from codegen.torch_forms import PRELUDE, torch_forms_source

from .analysis import Analysis, analyse
from .calling import bind_call
from .errors import CallError

BACKENDS = ("torch", "triton", "auto")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class CompiledLayer:
    """A recurrence compiled for one backend; call it like the reference."""

    def __init__(self, analysis: Analysis, backend: str, form: str, chunk_size: int, tuning=True):
        self.analysis = analysis
        self.recurrence = analysis.recurrence
        self.backend = backend
        self.form = form
        self.chunk_size = chunk_size
        # Where calls look their config up: True (the default store), a path or TuningStore, or False (never).
        self.tuning = tuning
        self.source = PRELUDE + "\n\n" + torch_forms_source(analysis)
        self.forms = self.forms_over(torch_runtime)
        self._triton_forms: dict | None = None

    def forms_over(self, runtime) -> dict:
        """The printed forms, executed with `_rt` bound to `runtime` (torch or Triton: the same API)."""
        namespace = {"math": math, "torch": torch, "F": F, "_rt": runtime, "DecayNotPositive": DecayNotPositive}
        exec(compile(self.source, f"<recurrence_dsl forms of {self.recurrence.name}>", "exec"), namespace)
        name = self.recurrence.name
        return {form: namespace[f"{name}__{'chunked' if form == 'parallel' else form}"]
                for form in self.analysis.forms}

    @property
    def triton_forms(self) -> dict:
        """recurrent (every class) and chunked (where the analysis allows it) through Triton kernels."""
        if self._triton_forms is None:
            from codegen import triton_runtime
            from codegen.triton_recurrent import build_triton_recurrent, triton_form_names

            outputs = [o.name for o in self.recurrence.outputs]
            states = [s.name for s in self.recurrence.states]
            forms = {"recurrent": with_torch_backward(build_triton_recurrent(self.analysis), self.forms["recurrent"],
                                                      outputs, states)}
            if "chunked" in triton_form_names(self.analysis):
                chunked = self.forms_over(triton_runtime)["chunked"]
                forms["chunked"] = with_torch_backward(chunked, self.forms["chunked"], outputs, states)
            self._triton_forms = forms
        return self._triton_forms

    def backend_for(self, device: torch.device, dtype: torch.dtype) -> str:
        """The backend a call on `device` with inputs of `dtype` runs on (Triton kernels take no float64)."""
        if self.backend != "auto":
            return self.backend
        if (device.type == "cuda" or _interpreting()) and dtype != torch.float64 and triton_available():
            return "triton"
        return "torch"

    @property
    def name(self) -> str:
        return self.recurrence.name

    def pick_form(self, length: int) -> str:
        """The form `auto` runs for a sequence of `length` steps."""
        return pick_form(self.analysis.forms, length, self.chunk_size)

    def tuned_config(self, call, form: str, backend: str) -> tuple[str, dict] | None:
        """(form, config) from the tuning store for a bound call, or None (nothing stored, or lookups off)."""
        if self.tuning is False:
            return None
        resolved = form if form != "auto" else self.pick_form(call.length)
        from autotune.lookup import tuned_config_for_call

        config = tuned_config_for_call(self, call, resolved, backend, store=self.tuning)
        return (resolved, config) if config else None

    def __call__(self, *args, form: str | None = None, chunk_size: int | None = None, config: dict | None = None,
                 **kwargs):
        """Run the layer. `config`: a tuning config for the form that runs (say `tune(...).best`); without
        `chunk_size` and `config`, the best stored config of this call's shape, if any."""
        call = bind_call(self.recurrence, args, kwargs)
        form = form or self.form
        if form != "auto" and form not in self.forms:
            why = self.analysis.unavailable.get(form, f"unknown form; choose from {', '.join(self.forms)} or auto")
            raise CallError(f"{self.name} has no '{form}' form: {why}")
        if config is not None and chunk_size is not None:
            raise CallError("give chunk_size or config, not both (a config carries its own chunk_size)")
        chunk = self.chunk_size if chunk_size is None else chunk_size
        if chunk < 1:
            raise CallError(f"chunk_size must be at least 1, got {chunk}")
        backend = self.backend_for(call.device, call.dtype)
        if config is not None:
            tuned = (form if form != "auto" else self.pick_form(call.length), config)
        else:
            tuned = self.tuned_config(call, form, backend) if chunk_size is None else None
        forms = None
        if tuned is not None:
            from autotune.runner import configured_forms

            try:
                forms = configured_forms(self, backend, *tuned)
            except ValueError as err:
                raise CallError(str(err)) from None
            chunk = tuned[1].get("chunk_size", chunk)
        if backend == "torch":
            return run_forms(self.recurrence, forms or self.forms, call, form, chunk)
        if call.dtype == torch.float64:
            raise CallError("backend='triton' takes float16, bfloat16 or float32 inputs, got float64; "
                            "use backend='torch' (or 'auto')")
        forms = forms or self.triton_forms
        if form != "auto" and form not in forms:
            raise CallError(f"{self.name} has no '{form}' form on the triton backend; it has {', '.join(forms)} "
                            "(use backend='torch' for the others)")
        if "chunked" in forms and (chunk < 16 or chunk & (chunk - 1)):
            raise CallError(f"chunk_size must be a power of two >= 16 on the triton backend, got {chunk}")
        return run_forms(self.recurrence, forms, call, form, chunk)


_CACHE: dict[tuple, CompiledLayer] = {}


def compile_recurrence(rec, backend: str = "auto", form: str = "auto", chunk_size: int = 64,
                       tuning=True) -> CompiledLayer:
    """Compile a `Recurrence` (or `CheckedRecurrence`) for `backend`; cached by spec hash.

    chunk_size: used when no tuned config is stored for a call. tuning: where calls look their config up:
    True (the default store), a path or an `autotune.TuningStore`, or False (never)."""
    checked = getattr(rec, "checked", rec)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend '{backend}'; choose from {', '.join(BACKENDS)}")
    if backend == "triton" and not triton_available():
        raise ValueError("backend='triton' needs triton installed (pip install 'recurrence-dsl[triton]')")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    store_key = tuning if isinstance(tuning, bool) else str(getattr(tuning, "path", tuning))
    key = (checked.text, checked.source.filename, backend, form, chunk_size, store_key)
    if key not in _CACHE:
        layer = CompiledLayer(analyse(checked), backend, form, chunk_size, tuning)
        if form != "auto" and form not in layer.forms:
            raise ValueError(f"{checked.name} has no '{form}' form: "
                             f"{layer.analysis.unavailable.get(form, 'unknown form')}")
        _CACHE[key] = layer
    return _CACHE[key]
