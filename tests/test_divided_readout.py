"""Divided readouts in one chunked call: a normaliser state as one more value column (codegen/torch_forms.py
`_value_columns`).

mLSTM's n[K] and normalised linear attention's z[K] have their matrix state's transition, keys and queries, and
its injection with the value replaced by 1, so the chunked and parallel forms (torch and Triton) run C' = [C | n]
on v' = [v, 1] (and zero columns up to a multiple of 16) in ONE runtime call and split the readouts and final
states back. Checked here: the number of chunked runtime calls (two before the merge), and outputs, final states
and gradients (inputs, params, initial states) against the float64 reference with a non-power-of-two V (V + 1 =
18 columns, 32 with the zeros), with an initial state under cu_seqlens and from zero without one.
"""

from __future__ import annotations

import sys

import pytest
import torch

import recurrence_dsl
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPECS_DIR, as_dict

SPECS: dict[str, recurrence_dsl.Recurrence] = {}
for _name in ("mlstm", "normalized_linear_attention", "based"):
    SPECS.update(recurrence_dsl.load(SPECS_DIR / f"{_name}.rec"))

CU = torch.tensor([0, 13, 13, 33])  # an empty sequence, one across a chunk boundary (chunks of 16)
SIZES = {"K": 16, "V": 17}
TOL = 1e-5
# The runtime entry each backend's chunked and parallel forms call, once per chunked state or merged group.
ENTRY = {"torch": "chunked_linear_by", "triton": "triton_chunked_linear_by"}


def _layer(name: str, backend: str):
    return recurrence_dsl.compile(SPECS[name], backend=backend, chunk_size=16, tuning=False)


def _count_calls(layer, backend: str, monkeypatch) -> list:
    """Wrap the generated module's chunked runtime entry; returns the list its calls' value widths go into."""
    module = sys.modules[type(layer).__module__]
    inner = getattr(module, ENTRY[backend])
    widths = []

    def counted(decay_cls, queries, k, v, *args, **kwargs):
        widths.append(v.shape[-1])
        return inner(decay_cls, queries, k, v, *args, **kwargs)

    monkeypatch.setattr(module, ENTRY[backend], counted)
    return widths


@pytest.mark.parametrize("backend, form", [("torch", "chunked"), ("torch", "parallel"), ("triton", "chunked"),
                                           ("triton", "parallel")])
@pytest.mark.parametrize("name, calls", [("mlstm", 1), ("normalized_linear_attention", 1), ("based", 5)])
def test_the_normaliser_runs_in_the_matrix_states_call(name, calls, backend, form, monkeypatch):
    """One chunked call per (matrix state, normaliser) pair, of V + 1 columns (based: S1 with z1; S0 / z0 are held
    with a size-1 key axis and S2 / z2 have other keys, so they keep their own calls)."""
    rec = SPECS[name]
    layer = _layer(name, backend)
    widths = _count_calls(layer, backend, monkeypatch)
    args, _ = sample_arguments(rec.checked, SIZES, 1, 20, 1, seed=1)
    layer(*args, form=form, output_final_state=True)
    assert len(widths) == calls, widths
    # V + 1 columns, rounded up to a multiple of 16 by zero columns (17 + 1 -> 32)
    assert 32 in widths and max(widths) == 32, widths


def _run(fn, rec, args, initial, weights, **kwargs):
    """(outputs and final states by name, gradients of args and initial states, weights) of the loss sum(w * x)
    over every output and final state."""
    leaves = [a.detach().clone().requires_grad_() for a in args]
    init = None if initial is None else {k: v.detach().clone().requires_grad_() for k, v in initial.items()}
    out, final = fn(*leaves, initial_state=init, output_final_state=True, **kwargs)
    values = {**as_dict(out, rec.checked.outputs), **as_dict(final, rec.checked.states)}
    if weights is None:
        gen = torch.Generator().manual_seed(7)
        weights = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in values.items()}
    sum((values[k].double() * w).sum() for k, w in weights.items()).backward()
    grads = {f"grad {a.name}": x.grad for a, x in zip(rec.checked.inputs + rec.checked.params, leaves)}
    if init is not None:
        grads.update({f"grad initial_state[{k}]": v.grad for k, v in init.items()})
    return {**values, **grads}, weights


@pytest.mark.parametrize("backend, form", [("torch", "chunked"), ("torch", "parallel"), ("triton", "chunked"),
                                           ("triton", "parallel")])
@pytest.mark.parametrize("packed", [True, False], ids=["cu_seqlens-initial_state", "batch-zero_start"])
@pytest.mark.parametrize("name", ["mlstm", "normalized_linear_attention"])
def test_merged_call_matches_the_reference(name, packed, backend, form):
    _compare(name, packed, backend, form, SIZES)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", ["mlstm", "normalized_linear_attention"])
def test_no_zero_columns_where_v_plus_one_is_a_multiple_of_16(name, backend):
    """V = 15: V + 1 = 16 columns, no zero columns (an empty torch.cat part)."""
    _compare(name, True, backend, "chunked", {"K": 16, "V": 15})


def _compare(name, packed, backend, form, sizes):
    """Outputs, final states and gradients of a float32 call against the float64 reference."""
    rec = SPECS[name]
    batch, length = (1, int(CU[-1])) if packed else (2, 21)
    args, initial = sample_arguments(rec.checked, sizes, batch, length, 1, dtype=torch.float64, seed=4,
                                     with_initial_state=True, rows=len(CU) - 1 if packed else batch)
    args = [a.float().double() for a in args]  # the values the float32 call sees
    initial = {k: v.float().double() for k, v in as_dict(initial, rec.checked.states).items()} if packed else None
    extra = {"cu_seqlens": CU} if packed else {}
    want, weights = _run(rec.reference, rec, args, initial, None, **extra)
    got, _ = _run(_layer(name, backend), rec, [a.float() for a in args],
                  None if initial is None else {k: v.float() for k, v in initial.items()}, weights, form=form,
                  **extra)
    assert set(got) == set(want)
    for key, ref in want.items():
        x = got[key]
        assert x is not None and x.shape == ref.shape, (key, None if x is None else x.shape)
        err = ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        assert err <= TOL, f"{name} {backend} {form} {key}: relative error {err:.2e}"


@pytest.mark.parametrize("backend, form", [("torch", "chunked"), ("triton", "chunked"), ("triton", "parallel")])
@pytest.mark.parametrize("name", ["mlstm", "normalized_linear_attention", "based"])
def test_the_divided_readout_is_a_tensor_of_its_own(name, backend, form, monkeypatch):
    """The epilogue's division q C / q n writes a fresh tensor; it is returned as it is, not as a view of it (a
    `torch.broadcast_to` to its own shape, before), which the dispatcher copied while autograd records (dispatch
    `_owned`: 4,194,304 B of mLSTM's float32 training step at B=2, T=1024, H=4, K=V=128)."""
    layer = _layer(name, backend)
    module = sys.modules[type(layer).__module__]
    owned, seen = module._owned, []
    monkeypatch.setattr(module, "_owned", lambda t, shares=None: seen.append(t._is_view()) or owned(t, shares))
    rec = SPECS[name]
    args, _ = sample_arguments(rec.checked, SIZES, 2, 20, 2, dtype=torch.float32, seed=0)
    out, _ = layer(*[a.requires_grad_() for a in args], form=form)
    assert seen == [False]  # the one output, no final state asked for
    (out * out).sum().backward()
    assert all(a.grad is not None for a in args)
