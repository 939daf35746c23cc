"""`compile`: from a recurrence to its layer, through the module `recdsl compile` writes.

`compile(rec)` analyses the recurrence, generates its module (`codegen.module.module_source`, the same text
`recdsl compile` writes), writes it to the per-user cache and imports it (`codegen.cache.load_source`), and
returns the module's layer: the object named like the recurrence, or a copy of it with the defaults given
here (`Layer.options`). So a compiled layer and a generated module's function are one object, with one set
of arguments (`form=`, `backend=`, `chunk_size=`, `config=`, `check_steps=`), one backend rule and one set of checks
(`codegen/layer.py`).

Block sizes come from the tuning store (`autotune/`, filled by `recdsl tune`) under one rule, the same in
compile() layers and generated modules (`codegen/tuning.py`): a call's own `chunk_size=`/`config=` first, then
an explicit `compile(chunk_size=...)`, then the store's choice for the call's key and mode (fwd, or fwdbwd
when the call records a graph for a backward), then the defaults. The store is $RECURRENCE_DSL_TUNING_STORE,
else $RECURRENCE_DSL_CACHE/tuning.sqlite, else ~/.cache/recurrence_dsl/tuning.sqlite; `tuning=PATH` names
another, `tuning=False` never looks up. `layer.config_for(*args)` says which config a call runs and why.
"""

from __future__ import annotations

from codegen.load import load_layer, triton_available, triton_import_error

from .analysis import analyse
from .api import load_text
from .check import CheckedRecurrence, require_state
from .errors import CallError

__all__ = ["compile_recurrence", "triton_available", "triton_import_error"]


def compile_recurrence(rec, backend: str = "auto", form: str = "auto", chunk_size: int | None = None, tuning=True,
                       check_steps: bool = True):
    """The layer of a `Recurrence` (or `CheckedRecurrence`): a callable with the calling convention of docs/language.md.

    backend: "auto" (triton for CUDA tensors, or CPU tensors under TRITON_INTERPRET=1, when triton imports;
    torch otherwise and for float64), "torch" or "triton". form: "auto" or a form the analysis derived.
    chunk_size: None (64 unless the store chose another) or the chunked form's chunk length for every call
    that gives none itself (it wins over the store). tuning: where calls look their config up: True (the
    rule's store, see the module docstring), a path or an `autotune.TuningStore`, or False (never).
    check_steps: True (default) or False, for every call that gives none itself. True: the chunked and parallel
    forms check each step's values first (a non-finite input, a log decay NaN or > 0, a decay <= 0 whose log
    they take: one more read of the inputs and a host sync per state) and run the steps from the first unsafe
    one one at a time, so their results match the reference for any values. False: no check and no sync (the
    CPU can run ahead of the GPU), and such values give whatever the matmuls give: a NaN or inf at one step
    can spread to earlier steps of its chunk, a log decay > 0 can overflow, a decay < 0 gives NaN on the torch
    backend and wrong finite values on the Triton one (see Layer).
    Raises `CallError` (a ValueError), as a call with the same argument does, for an unknown backend, a form the
    recurrence lacks (naming its class and why, as `recdsl show` does), a chunk_size that is not an integer >= 1,
    a check_steps that is not a bool, or backend="triton" without triton. (Triton's power-of-two chunk_size rule
    is checked at a call that runs the chunked form: the recurrent, scan and parallel forms ignore chunk_size.)
    """
    checked = getattr(rec, "checked", rec)
    if not isinstance(checked, CheckedRecurrence):
        raise TypeError(_what_to_pass(rec))
    require_state(checked)
    if not isinstance(check_steps, bool):  # (options() reads None as "keep the layer's", so check it here)
        raise CallError(f"check_steps must be True or False, got {check_steps!r}")
    layer = load_layer(analyse(checked))
    # A pickle of the layer (torch.save of a model) holds the spec's file text and the defaults below, and
    # loading it compiles them again (Layer.__reduce_ex__): the cached module's name imports nowhere else.
    layer._rebuild = (_compiled_from_source, (checked.source.text, checked.source.filename, checked.name))
    tuning = getattr(tuning, "path", tuning)  # a TuningStore reads as its path
    if (form, backend, chunk_size, tuning) == ("auto", "auto", None, True) and check_steps is True:
        return layer
    store_key = tuning if isinstance(tuning, bool) else str(tuning)
    # Types in the key: True == 1 == 1.0 must not find the layer of chunk_size=1 (Layer refuses True and 1.0).
    key = (id(layer), form, backend, type(chunk_size), repr(chunk_size), store_key, type(check_steps),
           repr(check_steps))
    if key not in _LAYERS:  # Layer checks the defaults (CallError naming the bad one)
        # setdefault: threads that built the same layer at once all return the one stored first.
        return _LAYERS.setdefault(key, layer.options(form=form, backend=backend, chunk_size=chunk_size,
                                                     tuning=tuning, check_steps=check_steps))
    return _LAYERS[key]


def _compiled_from_source(text: str, filename: str, name: str, form: str, backend: str, chunk_size: int | None,
                          tuning, check_steps: bool = True):
    """`compile(load_text(text, filename)[name], ...)`: how a pickled compile() layer is loaded (one pickled before
    check_steps existed passes none: True)."""
    return compile_recurrence(load_text(text, filename)[name], backend=backend, form=form, chunk_size=chunk_size,
                              tuning=tuning, check_steps=check_steps)


# One layer per (module layer, defaults, store): compile() twice with the same arguments gives the same object.
_LAYERS: dict[tuple, object] = {}


def _what_to_pass(rec) -> str:
    """The TypeError message for `compile` given something other than a recurrence: what to pass instead."""
    got = f"{type(rec).__name__} {rec!r}" if isinstance(rec, str) and len(rec) <= 80 else type(rec).__name__
    if isinstance(rec, dict):
        names = ", ".join(map(repr, rec)) or "none"
        return (f"compile() takes one recurrence, not the dict that load() returns (its recurrences: {names}); "
                f"pass load(path)[name]")
    return (f"compile() takes a recurrence, got {got}; load the file first: "
            "recurrence_dsl.compile(recurrence_dsl.load(path)[name])")
