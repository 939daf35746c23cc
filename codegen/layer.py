"""The compiled layer: one object per recurrence, the same in `recurrence_dsl.compile()` and generated modules.

A generated module defines, per recurrence, a subclass of `Layer` whose `__call__` has the recurrence's own
signature and an instance of it named like the recurrence; `compile()` imports that module and returns that
instance (or `instance.options(...)`, a copy with other defaults). So there is one set of arguments, one
backend rule and one set of checks, wherever a layer comes from.

Imports only torch and is copied verbatim into generated modules, next to `recurrence_dsl/calling.py`
(`bind_call`, `CallError`), `codegen/dispatch.py` (`run_forms`, `pick_form`) and `codegen/tuning.py` (the
tuning store a call reads, and the rule that decides which config a call runs).
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton")
DEFAULT_CHUNK_SIZE = 64  # the chunked form's chunk length when neither the caller nor the store chooses one

# The keyword arguments a config may carry, per (form, backend): what the form functions accept. (The tuner's
# search space, autotune.space.SPACES, offers values for exactly these keys.)
CONFIG_KEYS = {
    ("chunked", "torch"): ("chunk_size",),
    ("chunked", "triton"): ("chunk_size", "block_k", "block_v", "num_warps", "num_stages"),
    ("recurrent", "triton"): ("num_warps",),
}


def interpreting() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Triton decides at import whether its kernels run in the interpreter, so the backend rule reads the setting
# as it was when this module (and its kernels) were imported, not as it is at call time.
_INTERPRETING = interpreting()
_NEEDS_TRITON = "backend='triton' needs triton installed (pip install 'recurrence-dsl[triton]')"


def _runs_triton(device: torch.device) -> bool:
    """Whether Triton kernels run on tensors of `device`: CUDA, or the CPU in Triton's interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and _INTERPRETING)


def _chunk_size_error(chunk_size, backend: str) -> str | None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        return f"chunk_size must be an integer >= 1, got {chunk_size!r}"
    if backend == "triton" and (chunk_size < 16 or chunk_size & (chunk_size - 1)):
        return f"chunk_size must be a power of two >= 16 on the triton backend, got {chunk_size}"
    return None


def _form_error(spec, form: str, forms: dict, triton_forms: dict | None, backend: str) -> str | None:
    """Why `form` cannot run on `backend` ("auto" always can), or None."""
    if form != "auto" and form not in forms:
        return f"{spec.name} has no {form!r} form: " + (dict(spec.unavailable).get(form)
                                                       or f"choose from {', '.join(forms)} or auto")
    if backend == "triton" and form != "auto" and triton_forms is not None and form not in triton_forms:
        return (f"{spec.name} has no {form!r} form on the triton backend; it has {', '.join(triton_forms)} "
                "(use backend='torch' for the others)")
    return None


class Layer:
    """A recurrence compiled to torch forms and (when triton imports) Triton forms; call it like the reference.

    spec: the declarations (name, inputs, params, states, outputs, sizes, spec_hash); forms / triton_forms:
    form name -> form function (`triton_forms` None without triton). form, backend: the defaults of every call.
    chunk_size: None (64, and a tuned config may replace it) or an explicit chunk length, which every call
    without its own `chunk_size=`/`config=` runs: an explicit chunk_size always wins over the store. tuning:
    where a call looks its config up (see codegen/tuning.py for the store rule and the order of precedence):
    True (the rule's store), a path, or False (never).
    """

    def __init__(self, spec, forms: dict, triton_forms: dict | None, *, form: str = "auto", backend: str = "auto",
                 chunk_size: int | None = None, tuning=True):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        if backend == "triton" and triton_forms is None:
            raise ValueError(_NEEDS_TRITON)
        why = _form_error(spec, form, forms, triton_forms, backend) or (
            None if chunk_size is None else _chunk_size_error(chunk_size, "torch"))
        if why:
            raise ValueError(why)
        if not (isinstance(tuning, (bool, str)) or hasattr(tuning, "__fspath__")):
            raise ValueError(f"tuning must be True, False or a store path, got {type(tuning).__name__}")
        self.recurrence = spec
        self.forms = forms
        self.triton_forms = triton_forms
        self.form, self.backend, self.tuning = form, backend, tuning
        self.chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
        self.chunk_size_given = chunk_size is not None  # an explicit chunk_size always wins over the store

    @property
    def name(self) -> str:
        return self.recurrence.name

    @property
    def source(self) -> str:
        """The text of the module this layer was generated into."""
        import sys

        with open(sys.modules[type(self).__module__].__file__) as f:
            return f.read()

    def options(self, *, form: str | None = None, backend: str | None = None, chunk_size: int | None = None,
                tuning=None):
        """A copy of this layer with other defaults (None keeps this layer's)."""
        return type(self)(self.recurrence, self.forms, self.triton_forms,
                          form=self.form if form is None else form,
                          backend=self.backend if backend is None else backend,
                          chunk_size=(self.chunk_size if self.chunk_size_given else None) if chunk_size is None
                          else chunk_size,
                          tuning=self.tuning if tuning is None else tuning)

    def backend_for(self, device: torch.device, dtype: torch.dtype, backend: str | None = None,
                    form: str = "auto") -> str:
        """The backend a call on `device` with inputs of `dtype` runs `form` on: "auto" takes triton for CUDA
        tensors (or CPU tensors when TRITON_INTERPRET=1 was set before import) when triton imports and has the
        form; torch otherwise, for float64 and for other devices (meta, mps)."""
        backend = self.backend if backend is None else backend
        if backend not in BACKENDS:
            raise CallError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")  # noqa: F821
        if backend != "auto":
            return backend
        if (self.triton_forms is not None and dtype != torch.float64 and (form == "auto" or form in self.triton_forms)
                and _runs_triton(device)):
            return "triton"
        return "torch"

    def pick_form(self, length: int, chunk_size: int | None = None) -> str:
        """The form "auto" runs on the torch backend for a sequence of `length` steps."""
        return pick_form(tuple(self.forms), length, self.chunk_size if chunk_size is None else chunk_size)  # noqa: F821

    def _call(self, args: tuple, kwargs: dict, form, backend, chunk_size, config):
        """Bind and check a call, choose backend, form and config, and run it (see `__call__`)."""
        call = bind_call(self.recurrence, args, kwargs)  # noqa: F821 - from calling.py
        backend, fns, form, chunk, options, _, _ = self._plan(call, form, backend, chunk_size, config)
        if backend == "triton":
            options = triton_options(call, options)  # noqa: F821 - from dispatch.py
        return run_forms(self.recurrence, fns, call, form, chunk, options)  # noqa: F821 - from dispatch.py

    def config_for(self, *args, form: str | None = None, backend: str | None = None, chunk_size: int | None = None,
                   config: dict | None = None, **kwargs) -> dict:
        """Which config a call with these arguments would run, and why, without running it: {"backend",
        "form" (the form "auto" resolves to), "chunk_size", "config" (the block sizes handed to the form, {}
        when none), "source" ("call", "compile", "store" or "default"), "why" (in words)}. Raises CallError as
        the call would. The precedence is codegen/tuning.py's: call > compile's chunk_size > store > default."""
        call = bind_call(self.recurrence, args, kwargs)  # noqa: F821 - from calling.py
        backend, fns, form, chunk, options, source, why = self._plan(call, form, backend, chunk_size, config)
        resolved = form if form != "auto" else pick_form(tuple(fns), call.length, chunk)  # noqa: F821
        return {"backend": backend, "form": resolved, "chunk_size": chunk,
                "config": dict(options.get(resolved, {})), "source": source, "why": why}

    def _plan(self, call, form, backend, chunk_size, config):
        """(backend, form functions, form, chunk, options per form, source, why) of a bound call."""
        form = self.form if form is None else form
        why = _form_error(self.recurrence, form, self.forms, None, "torch")
        if why:
            raise CallError(why)  # noqa: F821
        if config is not None and chunk_size is not None:
            raise CallError("give chunk_size or config, not both (a config carries its own chunk_size)")  # noqa: F821
        backend = self.backend_for(call.device, call.dtype, backend, form)
        if backend == "triton":
            if self.triton_forms is None:
                raise CallError(_NEEDS_TRITON)  # noqa: F821
            if not _runs_triton(call.device):
                raise CallError(f"backend='triton' runs CUDA tensors, or CPU tensors in Triton's interpreter "  # noqa: F821
                                f"(TRITON_INTERPRET=1 set before triton is imported); got {call.device.type} "
                                "tensors: use backend='torch' (or 'auto')")
            if call.dtype == torch.float64:
                raise CallError("backend='triton' takes float16, bfloat16 or float32 inputs, got float64; "  # noqa: F821
                                "use backend='torch' (or 'auto')")
            why = _form_error(self.recurrence, form, self.forms, self.triton_forms, backend)
            if why:
                raise CallError(why)  # noqa: F821
        fns = self.triton_forms if backend == "triton" else self.forms
        chunk = self.chunk_size if chunk_size is None else chunk_size
        why = _chunk_size_error(chunk, backend if "chunked" in fns else "torch")
        if config is not None or chunk_size is not None:
            source, reason = "call", "given to the call"
        elif self.chunk_size_given:
            source, reason = "compile", f"chunk_size={self.chunk_size} given to compile(): it wins over the store"
        elif self.tuning is False:
            source, reason = "default", "tuning lookups off for this layer (tuning=False)"
        elif why:
            source, reason = "default", why
        elif torch.compiler.is_compiling():  # file access cannot be traced: see codegen/tuning.py
            source, reason = "default", "torch.compile is tracing: the store is not read (pass chunk_size=)"
        else:
            resolved = form if form != "auto" else pick_form(tuple(fns), call.length, chunk)  # noqa: F821
            config, reason = tuning_lookup(self, call, resolved, backend,  # noqa: F821 - from tuning.py
                                           CONFIG_KEYS.get((resolved, backend)),
                                           None if self.tuning is True else self.tuning)
            source = "store" if config is not None else "default"
        options = {}
        if config is not None:
            target = self._config_form(config, form if form != "auto" else None, fns, backend)
            chunk = config.get("chunk_size", chunk)
            why = _chunk_size_error(chunk, backend)
            options = {target: {k: v for k, v in config.items() if k != "chunk_size"}}
        if why:
            raise CallError(why)  # noqa: F821
        return backend, fns, form, chunk, options, source, reason

    @staticmethod
    def _config_form(config, form: str | None, fns: dict, backend: str) -> str:
        """The form a config is for: `form` when given (the config must have its keys), else the one form of
        `fns` whose keys it has (with form "auto" it applies whenever that form runs)."""
        if not isinstance(config, dict):
            raise CallError(f"config must be a dict of block sizes, got {type(config).__name__}")  # noqa: F821
        fits = [f for f in ([form] if form else fns) if set(CONFIG_KEYS.get((f, backend), ("-",))) == set(config)]
        if fits:
            return fits[0]
        accepted = {f: sorted(CONFIG_KEYS[(f, backend)]) for f in ([form] if form else fns)
                    if (f, backend) in CONFIG_KEYS}
        raise CallError(f"config keys {sorted(config)} fit no form on the {backend} backend here; "  # noqa: F821
                        + ("; ".join(f"{f} takes {keys}" for f, keys in accepted.items())
                           or f"no form{' ' + repr(form) if form else ''} takes a config there"))

    def __call__(self, *args, form: str | None = None, backend: str | None = None, chunk_size: int | None = None,
                 config: dict | None = None, **kwargs):
        """`(output, final_state)`; the arguments of LANGUAGE.md's calling convention plus form, backend,
        chunk_size (defaults: this layer's) and config (a tuning config for the form that runs)."""
        return self._call(args, kwargs, form, backend, chunk_size, config)

    def __repr__(self) -> str:
        return f"<{self.name} layer: forms {', '.join(self.forms)}; backend={self.backend!r}, form={self.form!r}>"


if "bind_call" not in globals():  # imported as a package module rather than copied into a generated module
    from recurrence_dsl.calling import bind_call  # noqa: E402, F401
    from recurrence_dsl.errors import CallError  # noqa: E402, F401

    from .dispatch import pick_form, run_forms, triton_options  # noqa: E402, F401
    from .tuning import tuning_lookup  # noqa: E402, F401
