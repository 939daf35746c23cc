"""Calls whose inputs mix dtypes (say a bfloat16 k beside float32 q and v) on the Triton backend: such a call
computes as a call in its widest dtype (codegen/dispatch.py `mixed_dtypes`): every form gets its inputs in float32,
also the chunked, parallel, scan and recurrent forms that take half inputs as they are (`takes_input_dtype`, whose
kernels store outputs and intermediates in k's dtype), and the chunked and parallel kernels' dots run as float32
("ieee"). Outputs come in the first input's dtype, gradients in each input's own dtype, final states in float32.

Checked in Triton's interpreter at tiny shapes against the torch backend in float64 on the same (bfloat16-rounded)
values: the linear chunked and parallel forms (linear attention), the delta rule's chunked form (gated DeltaNet),
the diagonal-plus-rank-one chunked form (RWKV-7) and the fused scan (GLA). Before the fix a bfloat16 k in a float32
call lost the chunked form's output to bfloat16 (a relative error of 5.7e-3 against 9.3e-8)."""

from __future__ import annotations

import pytest
import torch

import recurrence_dsl
from codegen.dispatch import triton_options
from recurrence_dsl.calling import bind_call
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPECS_DIR, as_dict

pytest.importorskip("triton")

F64 = torch.float64
_LAYERS: dict = {}


def _layer(name: str):
    if name not in _LAYERS:
        rec = recurrence_dsl.load(str(SPECS_DIR / f"{name}.rec"))[name]
        _LAYERS[name] = rec, recurrence_dsl.compile(rec, backend="triton", chunk_size=16, tuning=False)
    return _LAYERS[name]


def _call(layer, rec, args, backend, form):
    """Outputs and final states, and the gradient of every argument for a fixed weighting of them."""
    leaves = [a.detach().clone().requires_grad_() for a in args]
    out, final = layer(*leaves, output_final_state=True, backend=backend, form=form)
    values = list(as_dict(out, rec.checked.outputs).values()) + list(as_dict(final, rec.checked.states).values())
    gen = torch.Generator().manual_seed(3)
    loss = sum((v.double() * torch.randn(v.shape, generator=gen, dtype=F64)).sum() for v in values)
    loss.backward()
    return values, [x.grad for x in leaves]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def _dtypes(rec, narrow: str, first: torch.dtype = torch.float32) -> list[torch.dtype]:
    """Per argument: the input `narrow` in bfloat16, the first input in `first`, everything else float32."""
    names = [s.name for s in rec.checked.inputs + rec.checked.params]
    return [torch.bfloat16 if n == narrow else first if i == 0 else torch.float32 for i, n in enumerate(names)]


CASES = [
    ("linear_attention", "chunked", "k"),
    ("linear_attention", "parallel", "k"),
    ("linear_attention", "chunked", "v"),
    ("gated_delta_net", "chunked", "k"),
    ("rwkv7", "chunked", "k"),
    ("gla", "scan", "k"),
    ("retention", "chunked", "gamma"),  # a bfloat16 param: the form's prologue takes log(gamma) in float32
    ("retention", "parallel", "gamma"),
]


@pytest.mark.parametrize("name,form,narrow", CASES)
def test_mixed_call_computes_in_float32(name, form, narrow):
    """A float32 call with one bfloat16 input matches float64 on the same rounded values to float32 precision:
    outputs (in float32, the first input's dtype), final states (float32) and the gradients of the float32
    arguments within 1e-5; the bfloat16 input's gradient comes in bfloat16, the float64 one rounded."""
    rec, layer = _layer(name)
    args, _ = sample_arguments(rec.checked, {s: 8 for s in rec.checked.sizes}, 1, 40, 2, dtype=F64, seed=5)
    dtypes = _dtypes(rec, narrow)
    rounded = [a.to(d).to(F64) for a, d in zip(args, dtypes)]
    want, want_grads = _call(layer, rec, rounded, "torch", "recurrent")
    got, got_grads = _call(layer, rec, [a.to(d) for a, d in zip(rounded, dtypes)], "triton", form)
    n_out = len(rec.checked.outputs)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == torch.float32, (i, g.dtype)  # outputs: the first input's; states: float32
        assert _rel(g, w) < 1e-5, (name, form, i, _rel(g, w), "output" if i < n_out else "state")
    names = [s.name for s in rec.checked.inputs + rec.checked.params]
    for n, d, g, w in zip(names, dtypes, got_grads, want_grads):
        assert g is not None and g.dtype == d, (n, None if g is None else g.dtype)
        tol = 1e-5 if d == torch.float32 else 2 ** -8  # a bfloat16 gradient: the float64 one rounded
        assert _rel(g, w) < tol, (name, form, n, _rel(g, w))


@pytest.mark.parametrize("form", ["chunked", "parallel"])
def test_mixed_call_outputs_in_first_input_dtype(form):
    """A bfloat16 first input with float32 others returns bfloat16 outputs (the first input's dtype) and float32
    final states; the outputs are the float32 result rounded to bfloat16."""
    rec, layer = _layer("linear_attention")
    args, _ = sample_arguments(rec.checked, {s: 8 for s in rec.checked.sizes}, 1, 40, 2, dtype=F64, seed=7)
    dtypes = [torch.bfloat16, torch.float32, torch.float32]
    rounded = [a.to(d).to(F64) for a, d in zip(args, dtypes)]
    wo, ws = layer(*rounded, output_final_state=True, backend="torch", form="recurrent")
    o, s = layer(*[a.to(d) for a, d in zip(rounded, dtypes)], output_final_state=True, backend="triton", form=form)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert _rel(s, ws) < 1e-5
    assert _rel(o, wo) < 2 ** -8


def test_mixed_call_dots_are_float32():
    """The chunked and parallel kernels' dot precision: tf32 for an all-half call, "ieee" for a mixed one."""
    rec, _ = _layer("linear_attention")
    x = torch.zeros(1, 4, 2, 8)
    half = bind_call(rec.checked, (x.bfloat16(),) * 3, {})
    mixed = bind_call(rec.checked, (x, x.bfloat16(), x), {})
    assert triton_options(half, None)["chunked"]["allow_tf32"] is True
    assert triton_options(mixed, None)["parallel"]["allow_tf32"] is False
