"""Check every executable path of a recurrence against the float64 reference.

Used by `recdsl check` and the tests. A path is a function with the layer's
calling convention; each output and final state is compared by relative error
`||x - ref|| / ||ref||`, and so are the gradients of one scalar loss (every output and final state times fixed
random weights, summed) with respect to every input, param and initial state, against the float64 reference's
autograd gradients (rows `grad x`, `grad initial S`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .api import Recurrence
from .errors import DecayNotPositive
from .explain import tidy
from .sampling import sample_arguments

# Relative-error tolerance of a path run in each dtype, against the float64 reference.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 5e-2}
# A gradient row may also be off by this many times the interpreter's own error in the dtype under test: a param's
# gradient is one sum over every batch row, step and element, and where its terms cancel (RetNet's gamma at B = H = 1,
# T = 9) the float32 interpreter, stepping exactly as written, is already 2.5e-6 off, and every form 5e-6 to 1.4e-5.
GRADIENT_MARGIN = 10.0


@dataclass
class PathCheck:
    path: str  # e.g. "reference", "torch/chunked"
    value: str  # an output name, or "final S"
    rel_error: float
    tolerance: float
    error: str | None = None  # the path raised instead of returning (a compiler bug: reported, never hidden)

    @property
    def ok(self) -> bool:
        return self.error is None and self.rel_error <= self.tolerance


@dataclass
class CheckReport:
    recurrence: str
    sizes: dict[str, int]
    dtype: torch.dtype
    rows: list[PathCheck]
    skipped: list[tuple[str, str]]  # (path, why it was not run)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """`||x - ref|| / ||ref||` over the entries where `ref` is finite; where it is not (a spec computing with
    1e999), `x` must be the same inf or NaN, else the error is inf."""
    x = x.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    finite = torch.isfinite(ref)
    if not bool(finite.all()):
        same = (x == ref) | (torch.isnan(x) & torch.isnan(ref))
        if not bool(same[~finite].all()):
            return math.inf
        x, ref = x[finite], ref[finite]
    scale = ref.abs().max().item() if ref.numel() else 0.0
    if scale > 0.0:  # (norms of values near 1e300 would overflow)
        x, ref = x / scale, ref / scale
    denom = ref.norm().item()
    diff = (x - ref).norm().item()
    if denom == 0.0:
        return diff
    return diff / denom


def _as_dict(rec: Recurrence, output, final) -> dict[str, torch.Tensor]:
    c = rec.checked
    outs = output if isinstance(output, tuple) else (output,)
    values = {o.name: t for o, t in zip(c.outputs, outs)}
    if final is not None:
        finals = final if isinstance(final, dict) else {c.states[0].name: final}
        for name, t in finals.items():
            values[f"final {name}"] = t
    return values


def executable_paths(rec: Recurrence, chunk_size: int = 16, triton: bool = True,
                     dtype: torch.dtype = torch.float32) -> tuple[dict[str, Callable], list[tuple[str, str]]]:
    """Every path this project can run for `rec`, and the ones it cannot with the reason.

    Triton paths run on the GPU for CUDA inputs; on CPU tensors they need TRITON_INTERPRET=1 set before the
    kernels are imported (`recdsl check` does that when there is no GPU)."""
    from .analysis import analyse
    from .compiler import compile_recurrence, triton_import_error

    paths: dict[str, Callable] = {"reference": rec.reference}
    layer = compile_recurrence(rec, backend="torch", chunk_size=chunk_size)
    for form in layer.forms:
        paths[f"torch/{form}"] = _bind_form(layer, form)
    skipped = [(f"torch/{form}", why) for form, why in analyse(rec.checked).unavailable.items()]
    if triton and dtype == torch.float64:
        skipped.append(("triton/*", "Triton kernels take float16, bfloat16 or float32 inputs"))
    elif triton and triton_import_error() is None:
        tri = compile_recurrence(rec, backend="triton", chunk_size=max(16, chunk_size))
        for form in tri.triton_forms:
            paths[f"triton/{form}"] = _bind_form(tri, form)
    elif triton:
        skipped.append(("triton/*", f"the Triton rows were not run: triton does not import ({triton_import_error()}); "
                                    "pip install triton, or pass --no-triton"))
    return paths, skipped


def _bind_form(layer, form: str) -> Callable:
    def run(*args, **kwargs):
        return layer(*args, form=form, **kwargs)

    return run


def check_recurrence(rec: Recurrence, sizes: dict[str, int], batch: int, length: int, heads: int,
                     dtype: torch.dtype = torch.float32, seed: int = 0,
                     paths: dict[str, Callable] | None = None, device: str = "cpu",
                     triton: bool = True, grad: bool = True,
                     progress: Callable[[str, int, int], None] | None = None) -> CheckReport:
    """Run each path on the same random inputs (with an initial state) and compare with the reference.

    Every value must have the reference's shape. At length 0 the rows check empty outputs of the right shape
    and final states equal to the initial state (see `_compare`). With `grad`, each path is run once more with
    gradients and its gradients of `_loss` are compared too (`_gradient_rows`). progress: called as
    `progress(path, n, count)` before the n-th (from 1) of `count` paths runs."""
    args, initial = sample_arguments(rec.checked, sizes, batch, length, heads, dtype=torch.float64, seed=seed,
                                     with_initial_state=True)
    ref_out, ref_final = rec.reference(*args, initial_state=initial, output_final_state=True)
    reference = _as_dict(rec, ref_out, ref_final)
    ref_grads, weights = _reference_gradients(rec, args, initial, reference, seed) if grad else ({}, {})
    skipped: list[tuple[str, str]] = []
    if paths is None:
        paths, skipped = executable_paths(rec, triton=triton, dtype=dtype)
    cast_args = [a.to(device=device, dtype=dtype) for a in args]
    cast_initial = None
    if initial is not None:
        if isinstance(initial, dict):
            cast_initial = {k: v.to(device=device, dtype=dtype) for k, v in initial.items()}
        else:
            cast_initial = initial.to(device=device, dtype=dtype)
    start = _as_dict(rec, (), cast_initial)  # "final S" -> the initial S each path is given
    rows = []
    for number, (name, fn) in enumerate(paths.items(), start=1):
        if progress is not None:
            progress(name, number, len(paths))
        if fn == rec.reference:  # a bound method: a new object at each access, so `==`, not `is`
            # The interpreter in the dtype under test (bfloat16/float16 steps would only measure rounding).
            ref_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
            out, fin = rec.reference(*cast_args, initial_state=cast_initial, output_final_state=True, dtype=ref_dtype)
        else:
            try:
                out, fin = fn(*cast_args, initial_state=cast_initial, output_final_state=True)
            except DecayNotPositive as refusal:
                # A documented refusal (log of a decay these random inputs make <= 0), not a wrong answer.
                skipped.append((name, f"{refusal} (on these random inputs)"))
                continue
            except Exception as error:  # every failure becomes a FAIL row, not a traceback
                rows.append(PathCheck(name, "(all)", math.inf, TOLERANCE[dtype], f"{type(error).__name__}: {error}"))
                continue
        got = _as_dict(rec, out, fin)
        for key, ref in reference.items():
            rows.append(_compare(name, key, got.get(key), ref, start.get(key), length, TOLERANCE[dtype]))
        if grad:
            rows += _gradient_rows(rec, name, fn, cast_args, cast_initial, weights, ref_grads, dtype)
    _widen_for_conditioning(rows, {name for name, fn in paths.items() if fn == rec.reference})
    return CheckReport(rec.name, dict(sizes), dtype, rows, skipped)


def _widen_for_conditioning(rows: list[PathCheck], interpreter: set[str]) -> None:
    """Each gradient row's tolerance at least `GRADIENT_MARGIN` times the interpreter path's error in that row (the
    rounding the gradient's conditioning alone gives in this dtype); the table shows the tolerance used."""
    own = {r.value: r.rel_error for r in rows if r.path in interpreter and r.value.startswith("grad ")
           and r.error is None and math.isfinite(r.rel_error)}
    for r in rows:
        if r.path not in interpreter and r.value in own:
            r.tolerance = max(r.tolerance, GRADIENT_MARGIN * own[r.value])


def _leaves(rec: Recurrence, args, initial) -> dict[str, torch.Tensor]:
    """What the loss is differentiated against, by row name: each input and param (`x`), each initial state
    (`initial S`); copies of the call's tensors that require grad."""
    c = rec.checked
    names = [s.name for s in c.inputs + c.params]
    leaves = {n: a.detach().clone().requires_grad_() for n, a in zip(names, args)}
    if initial is not None:
        given = initial if isinstance(initial, dict) else {c.states[0].name: initial}
        leaves.update({f"initial {n}": t.detach().clone().requires_grad_() for n, t in given.items()})
    return leaves


def _call_with(rec: Recurrence, leaves: dict[str, torch.Tensor]) -> tuple[list, object]:
    """The call's positional arguments and initial_state (a tensor, or a dict for several states) from `leaves`."""
    args = [t for n, t in leaves.items() if not n.startswith("initial ")]
    states = {n.removeprefix("initial "): t for n, t in leaves.items() if n.startswith("initial ")}
    if not states:
        return args, None
    return args, states if len(rec.checked.states) > 1 else next(iter(states.values()))


def _loss(values: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """sum over every output and final state of `value * weight`, in float64: one scalar whose gradient reaches
    every output and final state with a different weight per entry (a plain sum would hide a transposed one)."""
    return sum((values[k].to(torch.float64) * w).sum() for k, w in weights.items())


def _reference_gradients(rec: Recurrence, args, initial, reference: dict[str, torch.Tensor], seed: int):
    """The float64 reference's autograd gradients of `_loss` by row name, and the loss's weights (standard normal,
    seeded by `seed`, one per entry of each output and final state)."""
    gen = torch.Generator().manual_seed(seed + 1)
    weights = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in reference.items()}
    leaves = _leaves(rec, args, initial)
    call_args, call_initial = _call_with(rec, leaves)
    out, fin = rec.reference(*call_args, initial_state=call_initial, output_final_state=True)
    return _gradients(_loss(_as_dict(rec, out, fin), weights), leaves), weights


def _gradients(loss: torch.Tensor, leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """d loss / d leaf for each leaf; zeros for a leaf the loss does not depend on."""
    if not loss.requires_grad:  # nothing reaches the loss (T = 0 with no state, say)
        return {n: torch.zeros_like(t) for n, t in leaves.items()}
    found = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(leaves.items(), found)}


def _gradient_rows(rec: Recurrence, name: str, fn: Callable, args, initial, weights, ref_grads,
                   dtype: torch.dtype) -> list[PathCheck]:
    """The rows `grad x`, `grad initial S` of one path: its gradients of `_loss` (its outputs in `dtype`, the
    loss in float64) against the reference's, with the forward's tolerance for `dtype`."""
    leaves = _leaves(rec, args, initial)
    call_args, call_initial = _call_with(rec, leaves)
    try:
        with torch.enable_grad():
            if fn == rec.reference:
                ref_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
                out, fin = rec.reference(*call_args, initial_state=call_initial, output_final_state=True,
                                         dtype=ref_dtype)
            else:
                out, fin = fn(*call_args, initial_state=call_initial, output_final_state=True)
            grads = _gradients(_loss(_as_dict(rec, out, fin), weights), leaves)
    except Exception as error:  # a backward that raises is a FAIL row, as a forward that raises is
        return [PathCheck(name, "(gradients)", math.inf, TOLERANCE[dtype], f"{type(error).__name__}: {error}")]
    return [_compare(name, f"grad {n}", grads[n], ref, None, 1, TOLERANCE[dtype]) for n, ref in ref_grads.items()]


def _compare(path: str, key: str, got: torch.Tensor | None, ref: torch.Tensor, initial: torch.Tensor | None,
             length: int, tolerance: float) -> PathCheck:
    """One row: `got` against the reference's `ref`. A value of another shape (or none) fails, naming both shapes.
    At T = 0 a relative error says nothing (the outputs are empty), so the row checks what an empty sequence
    must give: an empty output of the reference's shape, and a final state equal, exactly, to the initial state
    the path was given (in the dtype under test)."""
    if got is None or tuple(got.shape) != tuple(ref.shape):
        shape = "none" if got is None else f"shape {list(got.shape)}"
        return PathCheck(path, key, math.inf, tolerance, f"{shape} where the reference's is {list(ref.shape)}")
    if length == 0 and initial is not None:  # a final state
        return PathCheck(path, f"{key} = initial", relative_error(got, initial), 0.0)
    if length == 0:
        return PathCheck(path, f"{key} empty {list(got.shape)}", 0.0, tolerance)
    return PathCheck(path, key, relative_error(got, ref), tolerance)


def format_report(report: CheckReport) -> str:
    dtype = str(report.dtype).replace("torch.", "")
    sizes = ", ".join(f"{k}={v}" for k, v in report.sizes.items())
    lines = [f"{report.recurrence}  ({sizes + '; ' if sizes else ''}{dtype} against the float64 reference)"]
    width = max([len(r.path) for r in report.rows] + [len("path")])
    vwidth = max([len(r.value) for r in report.rows] + [len("value")])
    lines.append(f"  {'path':<{width}}  {'value':<{vwidth}}  {'rel. error':>10}  {'tolerance':>9}  result")
    for r in report.rows:
        if r.error is not None:
            lines.append(f"  {r.path:<{width}}  {r.value:<{vwidth}}  {'error':>10}  {r.tolerance:>9.0e}  "
                         f"FAIL: {r.error}")
            continue
        lines.append(f"  {r.path:<{width}}  {r.value:<{vwidth}}  {r.rel_error:>10.2e}  {r.tolerance:>9.0e}  "
                     f"{'ok' if r.ok else 'FAIL'}")
    for path, why in report.skipped:
        lines.append(f"  {path:<{width}}  not available: {tidy(why)}")
    return "\n".join(lines)
