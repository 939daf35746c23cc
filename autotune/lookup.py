"""Reading tuned configs at call time: the device name a store is keyed by, and a memoised `best()` lookup.

`tuned_config(...)` is what a compiled layer asks before a call that gave no explicit chunk_size / config:
the fastest stored config for (spec, device, dtype, shape bucket, form, backend), or None (then the layer
runs its defaults). It never creates the store file, never raises on a missing or unreadable store, never
returns a config measured in Triton's interpreter ("cpu-interpreter" timings mean nothing anywhere), and
ignores a stored config that is no longer part of the current config space. Answers (None included) are
memoised per process; `clear_cache()` forgets them (the tuner calls it after writing).
RECURRENCE_DSL_TUNING=0 switches off lookups in the default store (an explicit store is still read), so a
test suite can keep a developer's tuned configs out of its runs.
"""

from __future__ import annotations

import functools
import os
import platform
import sqlite3
from pathlib import Path

from .space import SPACES
from .store import TuningStore, default_path, dtype_name, open_store, shape_bucket

INTERPRETER = "cpu-interpreter"

_MEMO: dict[tuple, dict | None] = {}


@functools.lru_cache(maxsize=1)
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


@functools.cache
def _gpu_name(index: int) -> str:
    import torch

    return torch.cuda.get_device_name(index)


def device_name(device, backend: str) -> str:
    """The store's device column: the GPU's name; "cpu-interpreter" for Triton on a CPU (its interpreter);
    "cpu (MODEL, N threads)" for the torch backend on a CPU (the thread count changes the timings)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return _gpu_name(device.index if device.index is not None else torch.cuda.current_device())
    if backend == "triton":
        return INTERPRETER
    return f"{device.type} ({_cpu_model()}, {torch.get_num_threads()} threads)"


def spec_hash_of(rec) -> str:
    """`Recurrence.spec_hash` of a Recurrence or a CheckedRecurrence (or a hash string, returned as is)."""
    if isinstance(rec, str):
        return rec
    if hasattr(rec, "spec_hash"):
        return rec.spec_hash
    from recurrence_dsl.api import Recurrence

    return Recurrence(rec).spec_hash


def _legal(config, form: str, backend: str) -> bool:
    axes = SPACES.get((form, backend))
    return (isinstance(config, dict) and axes is not None and set(config) == set(axes)
            and all(config[k] in axes[k] for k in axes))


def tuned_config(rec, device, dtype, batch: int, heads: int, length: int, sizes: dict[str, int], form: str,
                 backend: str, store=None) -> dict | None:
    """The fastest stored config for this call's key, or None (see the module docstring).

    store: a `TuningStore`, a path, None or True (the default store), False (no lookup)."""
    if store is True:
        store = None
    if store is False or (form, backend) not in SPACES:
        return None
    if store is None and os.environ.get("RECURRENCE_DSL_TUNING", "1").lower() in ("0", "off", "false", "no"):
        return None
    name = device_name(device, backend)
    if name == INTERPRETER:
        return None
    path = store.path if isinstance(store, TuningStore) else Path(store) if store is not None else default_path()
    key = (str(path), spec_hash_of(rec), name, dtype_name(dtype), shape_bucket(batch, heads, length, sizes),
           form, backend)
    if key not in _MEMO:
        config = None
        if path.is_file():
            try:
                config = open_store(store if isinstance(store, TuningStore) else path).best(*key[1:])
            except sqlite3.Error:
                config = None
        _MEMO[key] = config if _legal(config, form, backend) else None
    found = _MEMO[key]
    return dict(found) if found is not None else None


def tuned_config_for_call(layer, call, form: str, backend: str, store=None) -> dict | None:
    """`tuned_config` for a bound call of a compiled layer (packed sequences: one sequence, the longest)."""
    if call.cu_seqlens is None:
        batch, length = call.batch, call.length
    else:
        bounds = call.cu_seqlens.tolist()
        batch, length = 1, max((b - a for a, b in zip(bounds, bounds[1:])), default=0)
    return tuned_config(layer.recurrence, call.device, call.dtype, batch, call.heads, length, call.sizes, form,
                        backend, store)


def clear_cache() -> None:
    """Forget memoised lookups (after new trials were stored)."""
    _MEMO.clear()


__all__ = ["INTERPRETER", "clear_cache", "device_name", "spec_hash_of", "tuned_config", "tuned_config_for_call"]
