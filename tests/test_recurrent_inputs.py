"""The Triton recurrent form reads a call's inputs as they are: half precision in its own dtype, reverse in place.

- float16 inputs through the Triton recurrent form (Triton's interpreter) match the torch recurrent form on the same
  float16 values within the half tolerances of tests/test_triton_backend.py and tests/test_intermediate_bytes.py
  (relative error <= 5e-3 for values, 2e-2 for gradients), forward and gradients of every input, param and initial
  state, with several checkpoint segments; sizes 16 (one tile of the state's free axis) and 48 (two tiles, whose
  per-tile parts are summed in float32). Outputs and input gradients come back in float16, final states and the
  initial states' gradients in float32, as before.
- reverse=True on the Triton recurrent form (the kernels walk each sequence backwards, `walks_back`) matches the torch
  recurrent form (which runs on flipped copies), float32, batched and packed (cu_seqlens, one empty sequence),
  values and gradients (<= 1e-5); one whose chunked form meets a non-finite step takes the steps from there on
  the recurrent kernels walking back, as the torch recurrent form's reverse run.
- Intermediate bytes (codegen/intermediate_bytes.py, as `recdsl kernels --json` counts them): a float16 / bfloat16
  call allocates exactly what a float32 call does in its forward (no float32 copy of the inputs, no float32 output
  cast afterwards), and no row of a training step is a cast of an input; a reverse call, batched or packed,
  allocates exactly what the forward direction does (no flipped copies).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import recurrence_dsl
from codegen.intermediate_bytes import format_rows, measure_call
from codegen.load import load_layer
from recurrence_dsl.analysis import analyse
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPECS_DIR, as_dict

pytest.importorskip("triton")

HALF_TOL, HALF_GRAD_TOL, F32_TOL = 5e-3, 2e-2, 1e-5
# a linear class with a key decay (GLA), the delta rule, Mamba's [D, N] state, a nonlinear state read whole
# (minimal RNN, no tiled axis), the diagonal-plus-rank-one class (RWKV-7, whose adjoint also serves its chunked form)
SPECS = ["gla", "delta_net", "mamba", "minimal_rnn", "rwkv7"]


def _rec(name: str) -> recurrence_dsl.Recurrence:
    return recurrence_dsl.load(SPECS_DIR / f"{name}.rec")[name]


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _run(layer, rec, args, initial, backend, weights, **kwargs):
    """Values (outputs, final states) and gradients (inputs, params, initial states) of a weighted loss."""
    checked = rec.checked
    leaves = [a.detach().clone().requires_grad_() for a in args]
    init = {k: v.detach().clone().requires_grad_() for k, v in initial.items()}
    out, final = layer(*leaves, initial_state=init if len(init) > 1 else next(iter(init.values())),
                       output_final_state=True, form="recurrent", backend=backend, **kwargs)
    out, final = as_dict(out, checked.outputs), as_dict(final, checked.states)
    parts = list(out.values()) + list(final.values())
    sum((p.double() * w).sum() for p, w in zip(parts, weights)).backward()
    return parts, [x.grad for x in leaves] + [init[s.name].grad for s in checked.states]


def _weights(parts, seed: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in parts]


def _case(name: str, size: int, dtype: torch.dtype, B: int = 2, T: int = 37, H: int = 2):
    rec = _rec(name)
    args, initial = sample_arguments(rec.checked, {s: size for s in rec.checked.sizes}, B, T, H,
                                     dtype=torch.float64, seed=5, with_initial_state=True)
    initial = {k: v.float() for k, v in as_dict(initial, rec.checked.states).items()}
    return rec, [a.to(dtype) for a in args], initial


@pytest.mark.parametrize("size", [16, 48])
@pytest.mark.parametrize("name", SPECS)
def test_half_inputs_match_the_torch_recurrent_form(name, size, monkeypatch):
    monkeypatch.setenv("RECURRENCE_DSL_CHECKPOINT_EVERY", "8")  # several segments of the adjoint
    rec, args, initial = _case(name, size, torch.float16)
    layer = recurrence_dsl.compile(rec, backend="triton", tuning=False)
    assert getattr(layer.triton_forms["recurrent"], "input_dtype", False)
    weights = _weights(_shapes(layer, rec, args, initial))
    values, grads = _run(layer, rec, args, initial, "triton", weights)
    want_values, want_grads = _run(layer, rec, args, initial, "torch", weights)
    n_out = len(rec.checked.outputs)
    assert all(v.dtype == torch.float16 for v in values[:n_out])
    assert all(v.dtype == torch.float32 for v in values[n_out:])  # final states: float32, as before
    n_args = len(args)
    assert all(g.dtype == a.dtype for g, a in zip(grads[:n_args], args))  # in the inputs' and params' dtypes
    assert all(g.dtype == torch.float32 for g in grads[n_args:])
    errors = {f"value {i}": _rel(v, r) for i, (v, r) in enumerate(zip(values, want_values))}
    grad_errors = {f"d{i}": _rel(g, r) for i, (g, r) in enumerate(zip(grads, want_grads))}
    assert max(errors.values()) <= HALF_TOL, errors
    assert max(grad_errors.values()) <= HALF_GRAD_TOL, grad_errors


def _shapes(layer, rec, args, initial, **kwargs):
    """The outputs and final states of a call (for the loss weights' shapes), without gradients."""
    with torch.no_grad():
        out, final = layer(*args, initial_state=initial if len(initial) > 1 else next(iter(initial.values())),
                           output_final_state=True, form="recurrent", backend="torch", **kwargs)
    return list(as_dict(out, rec.checked.outputs).values()) + list(as_dict(final, rec.checked.states).values())


def _packed(rec, args, lengths):
    """The inputs packed into one row [1, sum(lengths), H, ...] (params as they are) and the cu_seqlens."""
    n_in = len(rec.checked.inputs)
    total = sum(lengths)
    packed = [a[:1, :total] if i < n_in else a for i, a in enumerate(args)]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int64)
    return packed, cu


@pytest.mark.parametrize("packed", [False, True], ids=["batched", "packed"])
@pytest.mark.parametrize("name", SPECS)
def test_reverse_matches_the_torch_recurrent_form(name, packed, monkeypatch):
    monkeypatch.setenv("RECURRENCE_DSL_CHECKPOINT_EVERY", "8")
    rec, args, initial = _case(name, 16, torch.float32)
    layer = recurrence_dsl.compile(rec, backend="triton", tuning=False)
    assert getattr(layer.triton_forms["recurrent"], "walks_back", False)
    kwargs = {"reverse": True}
    if packed:
        lengths = [11, 0, 26]  # one empty sequence
        args, kwargs["cu_seqlens"] = _packed(rec, args, lengths)
        initial = {k: torch.cat([v, v[:1]]) for k, v in initial.items()}  # a row per sequence
    ran = []
    fn = layer.triton_forms["recurrent"]

    def recorded(*a, **kw):
        ran.append(kw.get("reverse", False))
        return fn(*a, **kw)

    monkeypatch.setitem(layer.triton_forms, "recurrent", functools.update_wrapper(recorded, fn))  # (its marks)
    weights = _weights(_shapes(layer, rec, args, initial, **kwargs))
    values, grads = _run(layer, rec, args, initial, "triton", weights, **kwargs)
    want_values, want_grads = _run(layer, rec, args, initial, "torch", weights, **kwargs)
    assert ran == [True]  # the kernels walked back: the form was handed reverse=True, not flipped copies
    errors = {f"value {i}": _rel(v, r) for i, (v, r) in enumerate(zip(values, want_values))}
    grad_errors = {f"d{i}": _rel(g, r) for i, (g, r) in enumerate(zip(grads, want_grads))}
    assert max(errors.values()) <= F32_TOL, errors
    assert max(grad_errors.values()) <= F32_TOL, grad_errors
    # and not the forward direction's results
    forward, _ = _run(layer, rec, args, initial, "torch", weights, **dict(kwargs, reverse=False))
    assert _rel(values[0], forward[0]) > 1e-2


@pytest.mark.parametrize("bad", [(5, math.inf), (30, math.nan)], ids=["inf", "nan"])
def test_a_reverse_call_past_an_unsafe_step(bad):
    """A reverse call whose chunked form meets a non-finite value (`UnsafeSteps`, its step counted in the order the
    steps are taken) runs the steps before it chunked and the rest on the recurrent kernels walking back: the same
    values (and non-finite ones) as the torch recurrent form's reverse run."""
    rec, args, _ = _case("gla", 16, torch.float32)
    t, value = bad
    args[2][0, t, 0, 3] = value  # v
    got = recurrence_dsl.compile(rec, backend="triton", chunk_size=16, tuning=False)(*args, reverse=True,
                                                                                      form="chunked")[0]
    want = recurrence_dsl.compile(rec, backend="torch")(*args, reverse=True, form="recurrent")[0]
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    assert finite.any() and not finite.all()
    assert _rel(got[finite], want[finite]) <= F32_TOL


# -- intermediate bytes -------------------------------------------------------------------------------------------


@pytest.fixture
def no_launches(monkeypatch):
    """Host allocations only (as tests/test_intermediate_bytes.py's training steps): no kernel runs."""
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *args, **kwargs: None)


def _bytes_args(name: str):
    rec = _rec(name)
    sizes = {s: 64 for s in rec.checked.sizes}
    args, _ = sample_arguments(rec.checked, sizes, 2, 256, 4, dtype=torch.float32, seed=0)
    return rec, load_layer(analyse(rec.checked)), args


@pytest.mark.parametrize("name", ["gla", "rwkv6", "mamba"])
def test_a_half_call_makes_no_float32_copy_of_its_inputs(name, no_launches):
    rec, layer, args = _bytes_args(name)
    full = measure_call(layer, [a.float() for a in args], form="recurrent", backward=True)
    n_in = len(rec.checked.inputs)
    input_shapes = {tuple(a.shape) for a in args[:n_in]}
    for dtype in (torch.float16, torch.bfloat16):
        half = [a.to(dtype) for a in args]
        forward = measure_call(layer, half, form="recurrent")
        step = measure_call(layer, half, form="recurrent", backward=True)
        # the forward's intermediates are the float32 states (zero start, checkpoints) alone, as for float32
        assert forward.total == measure_call(layer, [a.float() for a in args], form="recurrent").total
        assert step.by_phase["forward"] == full.by_phase["forward"], format_rows(step)
        casts = [r for r in step.rows if r.dtype == "float32" and r.shape in input_shapes
                 and ("x.to(dtype)" in r.where or ".to(call.dtype)" in r.where)]
        assert not casts, format_rows(step)
        assert not [r for r in forward.rows if r.shape in input_shapes], format_rows(forward)


@pytest.mark.parametrize("name", ["gla", "delta_net"])
def test_a_reverse_call_makes_no_flipped_copies(name, no_launches):
    rec, layer, args = _bytes_args(name)
    n_in = len(rec.checked.inputs)
    packed = [a.reshape(1, -1, *a.shape[2:]) if i < n_in else a for i, a in enumerate(args)]  # B * T = 512 steps
    cu = torch.tensor([0, 100, 100, 512], dtype=torch.int64)
    for call_args, kwargs in ((args, {}), (packed, {"cu_seqlens": cu})):
        for dtype in (torch.float32, torch.bfloat16):
            typed = [a.to(dtype) for a in call_args]
            there = measure_call(layer, typed, kwargs, form="recurrent", backward=True)
            back = measure_call(layer, typed, dict(kwargs, reverse=True), form="recurrent", backward=True)
            assert back.total == there.total, (format_rows(back), format_rows(there))
            assert not [r for r in back.rows if "flip" in r.where or "index_select" in r.where], format_rows(back)
