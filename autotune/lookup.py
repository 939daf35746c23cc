"""Reading tuned configs: the device name a store is keyed by, and the choice a call of a key would run.

The read itself is `codegen/tuning.py`'s (the same code generated modules carry): read-only, waiting at most
`TUNING_READ_TIMEOUT_S` for a locked store, never creating the file, never raising (a locked, corrupt or
unreadable store, or a stored config that is not JSON, gives None and one RuntimeWarning per store). Only a
choice `recdsl tune` declared (a config that beat the default beyond the noise) is returned; "default kept"
and configs outside the current config space give None. Interpreter timings ("cpu-interpreter") are never
returned. Answers are memoised per process; `clear_cache()` forgets them (the tuner calls it after writing).
RECURRENCE_DSL_TUNING=0 switches off lookups in the rule's store (an explicit store is still read).
"""

from __future__ import annotations

import os
import sys

from codegen.layer import CONFIG_KEYS
from codegen.tuning import (
    TUNING_INTERPRETER,
    tuning_clear_cache,
    tuning_device_name,
    tuning_lookups_enabled,
    tuning_read_choice,
    tuning_store_path,
)

from .space import SPACES
from .store import TuningStore, dtype_name, shape_bucket

INTERPRETER = TUNING_INTERPRETER

_MEMO: dict[tuple, tuple] = {}


def device_name(device, backend: str) -> str:
    """The store's device column: the GPU's name; "cpu-interpreter" for Triton on a CPU (its interpreter);
    "cpu (MODEL, N threads)" for the torch backend on a CPU (the thread count changes the timings)."""
    return tuning_device_name(device, backend)


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


def store_path_of(store) -> str | None:
    """The file a `tuning=`/`store=` value names: None or True -> the rule's store (None when lookups are
    off by RECURRENCE_DSL_TUNING=0), False -> None, a TuningStore or a path -> its absolute path."""
    if store is False:
        return None
    if store is None or store is True:
        return tuning_store_path() if tuning_lookups_enabled() else None
    path = store.path if isinstance(store, TuningStore) else store
    return os.path.abspath(os.fspath(path))


def tuned_choice(rec, device, dtype, batch: int, heads: int, length: int, sizes: dict[str, int], form: str,
                 backend: str, store=None, mode: str = "fwd") -> tuple[dict | None, str]:
    """(config or None, why in words) for a call of this key and mode (see the module docstring).

    store: a `TuningStore`, a path, None or True (the rule's store), False (no lookup); mode: "fwd" or
    "fwdbwd" (codegen.tuning.tuning_call_mode says which a call is)."""
    if (form, backend) not in SPACES:
        return None, f"nothing to tune for {form}/{backend}"
    path = store_path_of(store)
    if path is None:
        return None, "tuning lookups are off" + (" (RECURRENCE_DSL_TUNING=0)" if store is not False else "")
    name = device_name(device, backend)
    if name == INTERPRETER:
        return None, "Triton's interpreter: its timings are never looked up"
    key = (spec_hash_of(rec), name, dtype_name(dtype), shape_bucket(batch, heads, length, sizes), form, backend,
           mode)
    if (path,) + key not in _MEMO:
        config, why = tuning_read_choice(path, key, CONFIG_KEYS[(form, backend)])
        if config is not None and not _legal(config, form, backend):
            config, why = None, f"the stored config {config} is no longer in the {form}/{backend} config space"
        _MEMO[(path,) + key] = (config, why)
    config, why = _MEMO[(path,) + key]
    return (dict(config) if config is not None else None), why


def tuned_config(rec, device, dtype, batch: int, heads: int, length: int, sizes: dict[str, int], form: str,
                 backend: str, store=None, mode: str = "fwd") -> dict | None:
    """The config `tuned_choice` gives, or None."""
    return tuned_choice(rec, device, dtype, batch, heads, length, sizes, form, backend, store, mode)[0]


def clear_cache() -> None:
    """Forget memoised lookups here, in codegen.tuning and in every imported generated module (each carries
    its own copy of the read path), so calls in this process see choices stored after they first looked."""
    _MEMO.clear()
    tuning_clear_cache()
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("recdsl_"):
            for name in ("_tuning_memo", "_tuning_warned"):  # (a module keeps only what its layers reach)
                cache = getattr(module, name, None)
                if isinstance(cache, (dict, set)):
                    cache.clear()


__all__ = ["INTERPRETER", "clear_cache", "device_name", "spec_hash_of", "store_path_of", "tuned_choice",
           "tuned_config"]
