"""recurrence_dsl: a compiler for linear recurrences written as a per-step body.

    import recurrence_dsl
    gla = recurrence_dsl.load("specs/gla.rec")["gla"]
    o, S = gla.reference(q, k, v, g, output_final_state=True)

This package is the facade, the top of the import layers (the contracts are `[tool.importlinter]` in
pyproject.toml). `load`, `load_text`, `Recurrence` and `compile` are resolved on first use (PEP 562), so
importing a lower module such as `recurrence_dsl.analysis`, which runs this file first, imports neither
codegen nor autotune.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import CallError, DecayNotPositive, SpecError
from .version import __version__

if TYPE_CHECKING:
    from .api import Recurrence, load, load_text
    from .compiler import compile_recurrence as compile

__all__ = ["CallError", "DecayNotPositive", "Recurrence", "SpecError", "compile", "load", "load_text", "__version__"]


def __getattr__(name: str):
    """`load`, `load_text`, `Recurrence` (from `.api`) and `compile` (from `.compiler`), on first use."""
    if name in ("Recurrence", "load", "load_text"):
        from . import api

        value = getattr(api, name)
    elif name == "compile":
        from .compiler import compile_recurrence as value
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
