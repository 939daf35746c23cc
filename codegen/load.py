"""Load a recurrence's layer: generate its module, write it to the per-user cache, import it from its source.

This is the one path from an analysis to something callable; `recurrence_dsl.compile` adds the tuning
lookup on top, and the tuner times layers loaded here.
"""

from __future__ import annotations

import threading

from recurrence_dsl.analysis import Analysis

from .cache import load_source
from .module import module_source


def triton_available() -> bool:
    """True when triton imports (its kernels then run on CUDA tensors, or in its CPU interpreter)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


_MODULES: dict[tuple[str, str], object] = {}
# One generation at a time: threads asking for the same module wait for it rather than each printing it, and
# CPython 3.11's ast constructors are not safe to run from several threads at once ("AST constructor recursion
# depth mismatch").
_GENERATING = threading.RLock()


def load_module(analysis: Analysis):
    """The generated module of one recurrence, imported from the cache (see `codegen.cache`); generated once
    per process for the same spec text and file name."""
    rec = analysis.recurrence
    key = (rec.text, rec.source.filename)
    with _GENERATING:
        if key not in _MODULES:
            _MODULES[key] = load_source(module_source([analysis], rec.source.filename), rec.name)
        return _MODULES[key]


def load_layer(analysis: Analysis):
    """The recurrence's layer in its generated module (a `codegen.layer.Layer`, defaults form="auto",
    backend="auto", chunk_size=64, no tuning lookup)."""
    return getattr(load_module(analysis), analysis.recurrence.name)


__all__ = ["load_layer", "load_module", "triton_available"]
