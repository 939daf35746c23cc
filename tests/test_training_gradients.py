"""Issue 9's gradient matrix: every spec of specs/, every form, both backends, under `cu_seqlens`.

For each (spec, backend, form) one float32 call packs three sequences (B = 1; H = 2 on torch, 1 on Triton;
lengths 13, 0 and 20: an empty one, and sequences that are no multiple of the Triton chunk of 16, so chunks are
partial and one crosses a chunk boundary) from a three-row initial state, with `output_final_state=True`.
The loss weights every output and every final state with fixed random float64 cotangents, so the final states'
incoming gradient reaches the backward. The gradients of every input, param and initial-state row are compared
with the float64 reference interpreter's autograd on the same float32-rounded values
(`rec.reference(..., cu_seqlens=...)`), relative error ||x - ref|| / ||ref|| <= 1e-5 per argument.

On the Triton backend (kernels in Triton's interpreter, tests/conftest.py) every torch form of the generated
module (the step loop and its torch adjoint, the scan blocks, the chunked forms) and every torch runtime entry
(`chunked_linear_by`, `chunked_delta_by`, `chunked_dplr_by`, `scan_diagonal`, `scan_block`) has its code replaced
by one that raises, so a torch form running in the forward or the backward of a Triton call fails the test.
The torch forms also pass `torch.autograd.gradcheck` in float64 (fast mode) on tiny shapes, every spec and form.
"""

from __future__ import annotations

import sys

import pytest
import torch

import recurrence_dsl
from codegen.triton_recurrent import triton_form_names
from recurrence_dsl.analysis import analyse
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPEC_FILES, as_dict, weighted_gradients

SPECS: dict[str, recurrence_dsl.Recurrence] = {}
for _path in SPEC_FILES:
    SPECS.update(recurrence_dsl.load(_path))

LENGTHS = (13, 0, 20)  # an empty sequence; 20 = a whole chunk of 16 and a partial one
CU = torch.tensor([0, 13, 13, 33])
H, CHUNK, TOL = 2, 16, 1e-5
TRITON_H = 1  # the interpreter runs every program in turn; the torch runs keep two heads
TORCH_RUNTIME = ("chunked_linear_by", "chunked_delta_by", "chunked_dplr_by", "scan_diagonal", "scan_block")
TORCH_FORMS = ("recurrent_loop", "recurrent_adjoint", "scan_block", "chunked")


def _sizes(rec) -> dict[str, int]:
    """Distinct small sizes, so a transposed axis fails on its shape (the Triton runtime pads tiles to 16)."""
    return {name: (4, 8)[i % 2] for i, name in enumerate(rec.checked.sizes)}


def _torch_form_ran(*args, **kwargs):
    raise AssertionError("a torch form ran on the Triton path")


def _refuse_torch_forms(layer, rec, monkeypatch) -> None:
    """Replace the code of the generated module's torch forms and torch runtime entries by one that raises (the
    forms' closures and dictionaries hold the function objects, so swapping `__code__` reaches every caller)."""
    module = sys.modules[type(layer).__module__]
    names = [f"{rec.name}__{form}" for form in TORCH_FORMS] + list(TORCH_RUNTIME)
    refused = 0
    for name in names:
        fn = getattr(module, name, None)
        if callable(fn) and hasattr(fn, "__code__"):
            monkeypatch.setattr(fn, "__code__", _torch_form_ran.__code__)
            refused += 1
    assert refused >= 2, f"{rec.name}: found none of the torch forms to refuse in {module.__name__}"


def _grads(fn, rec, args, initial, weights=None, **kwargs):
    """conftest.weighted_gradients of a call packing CU's sequences (loss weights from seed 5), by argument name
    (`initial_state[S]` for a state); None for an argument the call does not use."""
    checked = rec.checked
    grads, weights = weighted_gradients(fn, rec, args, initial, weights, seed=5, cu_seqlens=CU, **kwargs)
    names = [s.name for s in checked.inputs + checked.params] + [f"initial_state[{s.name}]" for s in checked.states]
    return dict(zip(names, grads, strict=True)), weights


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _check(name: str, backend: str, form: str, monkeypatch) -> dict[str, float]:
    rec = SPECS[name]
    heads = TRITON_H if backend == "triton" else H
    args, initial = sample_arguments(rec.checked, _sizes(rec), 1, int(CU[-1]), heads, dtype=torch.float64, seed=3,
                                     with_initial_state=True, rows=len(LENGTHS))
    args = [a.float().double() for a in args]  # the values the float32 call sees
    initial = {k: v.float().double() for k, v in as_dict(initial, rec.checked.states).items()}
    ref, weights = _grads(rec.reference, rec, args, initial)
    layer = recurrence_dsl.compile(rec, backend=backend, chunk_size=CHUNK, tuning=False)
    if backend == "triton":
        _refuse_torch_forms(layer, rec, monkeypatch)
    got, _ = _grads(layer, rec, [a.float() for a in args], {k: v.float() for k, v in initial.items()}, weights,
                    form=form)
    errors = {}
    for key, want in ref.items():
        assert got[key] is not None and got[key].shape == want.shape, (key, got[key])
        assert got[key].dtype == torch.float32, (key, got[key].dtype)
        errors[key] = _rel(got[key], want)
    assert max(errors.values()) <= TOL, f"{name} {backend} {form}: relative errors {errors}"
    return errors


# Known gaps, each failing as stated (strict: a fix makes the case pass and the mark must go).
KNOWN: dict[tuple[str, str, str], str] = {}


def _cases(backend: str) -> list:
    """(spec, form) for every form of the backend (from the analysis: nothing is compiled while collecting)."""
    cases = []
    for name in sorted(SPECS):
        analysis = analyse(SPECS[name].checked)
        forms = analysis.forms if backend == "torch" else triton_form_names(analysis)
        for form in forms:
            gap = KNOWN.get((backend, name, form))
            marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=gap)] if gap else []
            cases.append(pytest.param(name, form, id=f"{name}-{form}", marks=marks))
    return cases


@pytest.mark.parametrize("name, form", _cases("torch"))
def test_torch_gradients_under_cu_seqlens(name, form, monkeypatch):
    _check(name, "torch", form, monkeypatch)


@pytest.mark.parametrize("name, form", _cases("triton"))
def test_triton_gradients_under_cu_seqlens_without_torch_forms(name, form, monkeypatch):
    _check(name, "triton", form, monkeypatch)


@pytest.mark.parametrize("name", ["gla", "rwkv7"])
def test_the_refused_torch_forms_raise_where_a_torch_form_runs(name, monkeypatch):
    """The guard reaches the forms a call runs: with it on, the same module's torch backend raises for every form,
    so a Triton form that fell back to (or re-ran) a torch form would fail the matrix above."""
    rec = SPECS[name]
    args, initial = sample_arguments(rec.checked, _sizes(rec), 1, 5, 1, with_initial_state=True)
    layer = recurrence_dsl.compile(rec, backend="triton", chunk_size=CHUNK, tuning=False)
    _refuse_torch_forms(layer, rec, monkeypatch)
    assert list(layer.triton_forms) == list(triton_form_names(analyse(rec.checked)))
    for form in analyse(rec.checked).forms:
        with pytest.raises(AssertionError, match="a torch form ran on the Triton path"):
            layer(*args, initial_state=initial, backend="torch", form=form)


@pytest.mark.parametrize("name, form", _cases("torch"))
def test_gradcheck_float64_every_torch_form(name, form):
    """`torch.autograd.gradcheck` (fast mode: a random projection of the Jacobian, against finite differences) of
    outputs and final states in every input, param and initial state; T = 7 in chunks of 4 (a partial chunk)."""
    rec = SPECS[name]
    sizes = {s: (3, 2)[i % 2] for i, s in enumerate(rec.checked.sizes)}
    args, initial = sample_arguments(rec.checked, sizes, 1, 7, 1, dtype=torch.float64, seed=2,
                                     with_initial_state=True)
    states = as_dict(initial, rec.checked.states)
    layer = recurrence_dsl.compile(rec, backend="torch", chunk_size=4, tuning=False)
    count = len(args)

    def call(*tensors):
        init = dict(zip(states, tensors[count:]))
        out, final = layer(*tensors[:count], initial_state=init if len(init) > 1 else tensors[count],
                           output_final_state=True, form=form)
        return (*as_dict(out, rec.checked.outputs).values(), *as_dict(final, rec.checked.states).values())

    leaves = tuple(t.detach().clone().requires_grad_() for t in (*args, *states.values()))
    assert torch.autograd.gradcheck(call, leaves, fast_mode=True, atol=1e-7, rtol=1e-6)
