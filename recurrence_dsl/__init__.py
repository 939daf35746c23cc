"""recurrence_dsl: a compiler for linear recurrences written as a per-step body.

    import recurrence_dsl
    gla = recurrence_dsl.load("specs/gla.rec")["gla"]
    o, S = gla.reference(q, k, v, g, output_final_state=True)
"""

from .api import Recurrence, load, load_text
from .compiler import compile_recurrence as compile
from .errors import CallError, SpecError

__version__ = "0.1.0"

__all__ = ["CallError", "Recurrence", "SpecError", "compile", "load", "load_text", "__version__"]
