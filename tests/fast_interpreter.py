"""Triton's interpreter, minus a cost paid at every launch: the test session only (tests/conftest.py installs it).

At each kernel launch the interpreter (triton/runtime/interpreter.py, `_patch_lang`) swaps the builtins of
`triton.language`, `triton.language.math` and the tensor classes for interpreted versions, and finds them with
`inspect.getmembers` on each of those objects: a getattr on every name and a sort, 4 or 5 times a launch. The
launch ends by putting every original back (`_LangPatchScope.restore`), so each launch finds the same builtins.
In this suite, where the kernels are small, that search is 15-20 % of a Triton test's CPU time (16 cases of
tests/test_triton_backend.py: 10.9 and 10.7 s without, 9.4 and 8.6 s with, the same errors to the last digit;
whole files, CPU seconds with their children, 2026-11-30: tests/test_triton_dplr.py 59.5 -> 48.4,
tests/test_triton_recurrent.py 63.9 -> 52.8).

`install()` keeps each object's list of (name, builtin) from its first search and hands the same pairs to the
interpreter's own `_patch_attr`, so every launch patches exactly what it patched before. The list is found again
when the object's own attributes change in number (something added or removed a name). Nothing is installed
unless `_patch_builtin` still has the signature (pkg, builder, scope) and `_patch_attr` exists: on another
Triton the interpreter runs unchanged. Kernels compiled for a GPU never pass through here.
"""

from __future__ import annotations

import inspect


def install() -> bool:
    """Memoise the interpreter's builtin search (see the module docstring); True when installed."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_builtin", None)
    patch_attr = getattr(interpreter, "_patch_attr", None)
    if original is None or patch_attr is None or getattr(original, "memoised", False):
        return False
    if list(inspect.signature(original).parameters) != ["pkg", "builder", "scope"]:
        return False
    found: dict[int, tuple[object, int, list]] = {}

    def patch_builtin(pkg, builder, scope):
        size = len(vars(pkg))
        entry = found.get(id(pkg))
        if entry is None or entry[0] is not pkg or entry[1] != size:
            members = [(name, member) for name, member in inspect.getmembers(pkg) if tl.core.is_builtin(member)]
            entry = found[id(pkg)] = (pkg, size, members)
        for name, member in entry[2]:
            patch_attr(pkg, name, member, builder, scope)

    patch_builtin.memoised = True
    interpreter._patch_builtin = patch_builtin
    return True
