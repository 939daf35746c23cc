"""Triton's CPU interpreter, made fast enough to run `tl.associative_scan` with a user combine in tests.

The interpreter (triton/runtime/interpreter.py, `ScanOps.generic_scan`) runs an associative scan with a combine
function of its own (anything but a sum or a product) one element at a time in Python: about 0.7 ms per element,
so the scan form's kernels (codegen/triton_scan.py) on a [T, 2, 16, 16] state took a minute per call. The fold it
computes is sequential along the scan axis, out[0] = x[0], out[i] = combine(out[i - 1], x[i]), and independent
across the other axes; a combine function is elementwise by Triton's rules (on a GPU it is called on scalars). So
running the same fold one slice of the scan axis at a time, each combine call on the whole slice, gives the same
numbers in the same order of operations, in a few numpy calls per step. `vectorise_interpreter_scans` installs that
in place of `generic_scan` (once per process; the reverse flag's flips stay the interpreter's own). Kernels
compiled for a GPU are untouched: this only changes how the interpreter evaluates them.
"""

from __future__ import annotations

from .layer import interpreting

_INSTALLED = False
ORIGINAL_GENERIC_SCAN = None  # the interpreter's own, kept to compare against (tests/test_triton_scan.py)


def _vectorised_generic_scan(self, input):
    import numpy as np
    import triton.language as tl

    data = [np.moveaxis(arg.handle.data, self.axis, 0) for arg in input]
    out = [np.empty_like(d) for d in data]
    acc = None
    for i in range(data[0].shape[0]):
        step = tuple(self.to_tensor(d[i], arg.dtype) for d, arg in zip(data, input))
        if acc is None:
            acc = step
        else:
            combined = self.combine_fn.fn(*acc, *step)
            combined = combined if isinstance(combined, tuple) else (combined,)
            acc = tuple(c if isinstance(c, tl.core.tensor) else self.to_tensor(np.full_like(d[i], c), arg.dtype)
                        for c, d, arg in zip(combined, data, input))
        for o, a in zip(out, acc):
            o[i] = a.handle.data.reshape(o[i].shape)
    return [self.to_tensor(np.moveaxis(o, 0, self.axis), arg.dtype) for o, arg in zip(out, input)]


def vectorise_interpreter_scans() -> bool:
    """Install the vectorised generic scan in Triton's interpreter when TRITON_INTERPRET is set and the
    interpreter has the `ScanOps.generic_scan` this replaces; True when it is installed."""
    global _INSTALLED, ORIGINAL_GENERIC_SCAN
    if _INSTALLED:
        return True
    if not interpreting():
        return False
    try:
        from triton.runtime import interpreter
    except Exception:
        return False
    ops = getattr(interpreter, "ScanOps", None)
    if ops is None or not hasattr(ops, "generic_scan"):
        return False
    ORIGINAL_GENERIC_SCAN = ops.generic_scan
    ops.generic_scan = _vectorised_generic_scan
    _INSTALLED = True
    return True


__all__ = ["vectorise_interpreter_scans"]
