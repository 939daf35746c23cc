"""Block-size tuning: configs chosen at run time from a tuning store, never by `triton.autotune`.

    autotune.space    the config space per (form, backend) and the constraint model that prunes it
    autotune.store    the SQLite store of every trial and of each key's choice (stdlib only)
    autotune.tuner    tune(): candidates (all, or optuna's screen), timed interleaved in the layer's mode
                      (fwd / fwdbwd), a winner over the default only beyond the noise
    autotune.runner   run a compiled layer with one config
    autotune.lookup   the choice a call of a key reads (the read path is codegen/tuning.py's, which generated
                      modules carry too, with the rule of which store)
    autotune.threads  the CPU thread settings a timing ran with, and when they make it unreliable

The `recdsl tune` command is in `recurrence_dsl.cli`, at the top of the import layers: autotune is a
library below it and above codegen (see `[tool.importlinter]` in pyproject.toml).

Names are imported lazily, so `import autotune.store` stays free of torch and optuna.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "tune": "tuner", "TuneResult": "tuner", "TrialResult": "tuner", "NoLegalConfig": "tuner",
    "TuningStore": "store", "shape_bucket": "store", "default_path": "store", "StoreError": "store",
    "StoreLocked": "store", "merge_side_file": "store", "thread_settings": "threads", "timing_warnings": "threads",
    "config_space": "space", "check_config": "space", "Problem": "space", "DeviceLimits": "space",
    "device_limits": "space",
    "tuned_config": "lookup", "tuned_choice": "lookup", "device_name": "lookup",
    "run_config": "runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'autotune' has no attribute {name!r}")
