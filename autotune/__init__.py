"""Block-size tuning: configs chosen at run time from a tuning store, never by `triton.autotune`.

    autotune.space    the config space per (form, backend) and the constraint model that prunes it
    autotune.store    the SQLite store of every trial (stdlib only)
    autotune.tuner    tune(): an optuna (TPE) search over the pruned space, timing real runs
    autotune.runner   run a compiled layer with one config
    autotune.lookup   the best stored config for a call (what a tuned compile() reads)

The `recdsl tune` command is in `recurrence_dsl.cli`, at the top of the import layers: autotune is a
library below it and above codegen (see `[tool.importlinter]` in pyproject.toml).

Names are imported lazily, so `import autotune.store` stays free of torch and optuna.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "tune": "tuner", "TuneResult": "tuner", "TrialResult": "tuner", "NoLegalConfig": "tuner",
    "TuningStore": "store", "shape_bucket": "store", "default_path": "store",
    "config_space": "space", "check_config": "space", "Problem": "space", "DeviceLimits": "space",
    "device_limits": "space",
    "tuned_config": "lookup", "device_name": "lookup",
    "run_config": "runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'autotune' has no attribute {name!r}")
