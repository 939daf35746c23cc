"""`compile`: from a recurrence to its layer, through the module `recdsl compile` writes.

`compile(rec)` analyses the recurrence, generates its module (`codegen.module.module_source`, the same text
`recdsl compile` writes), writes it to the per-user cache and imports it (`codegen.cache.load_source`), and
returns the module's layer: the object named like the recurrence, or a copy of it with the defaults given
here (`Layer.options`). So a compiled layer and a generated module's function are one object, with one set
of arguments (`form=`, `backend=`, `chunk_size=`, `config=`), one backend rule and one set of checks
(`codegen/layer.py`).

Block sizes come from the tuning store (`autotune/`, filled by `recdsl tune`): when a call gives neither
`chunk_size=` nor `config=`, the fastest stored config for (spec, device, dtype, shape bucket, form,
backend) is looked up (once per key and process) and used; with nothing stored, the layer's chunk_size and
the kernels' own block sizes run. `compile(..., tuning=False)` never looks up.
"""

from __future__ import annotations

import functools

from codegen.load import load_layer, triton_available

from .analysis import analyse

__all__ = ["compile_recurrence", "triton_available"]


def _lookup(store, layer, call, form: str, backend: str) -> dict | None:
    from autotune.lookup import tuned_config_for_call

    return tuned_config_for_call(layer, call, form, backend, store=store)


def compile_recurrence(rec, backend: str = "auto", form: str = "auto", chunk_size: int = 64, tuning=True):
    """The layer of a `Recurrence` (or `CheckedRecurrence`): a callable with LANGUAGE.md's calling convention.

    backend: "auto" (triton for CUDA tensors, or CPU tensors under TRITON_INTERPRET=1, when triton imports;
    torch otherwise and for float64), "torch" or "triton". form: "auto" or a form the analysis derived.
    chunk_size: the chunked form's chunk length when no tuned config applies. tuning: where calls look their
    config up: True (the default store), a path or an `autotune.TuningStore`, or False (never).
    Raises ValueError for an unknown backend or form, a bad chunk_size, or backend="triton" without triton.
    """
    layer = load_layer(analyse(getattr(rec, "checked", rec)))
    if (form, backend, type(chunk_size), chunk_size, tuning) == ("auto", "auto", int, 64, False):
        return layer
    store_key = tuning if isinstance(tuning, bool) else str(getattr(tuning, "path", tuning))
    # Types in the key: True == 1 == 1.0 must not find the layer of chunk_size=1 (Layer refuses True and 1.0).
    key = (id(layer), form, backend, type(chunk_size), repr(chunk_size), store_key)
    if key not in _LAYERS:  # Layer checks the defaults (ValueError naming the bad one)
        tuned = None if tuning is False else functools.partial(_lookup, None if tuning is True else tuning)
        _LAYERS[key] = layer.options(form=form, backend=backend, chunk_size=chunk_size, tuned=tuned)
    return _LAYERS[key]


# One layer per (module layer, defaults, store): compile() twice with the same arguments gives the same object.
_LAYERS: dict[tuple, object] = {}
