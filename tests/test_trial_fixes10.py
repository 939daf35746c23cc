"""A tenth trial's fixes (a researcher putting generated layers into a model and training it): per-head params
passed as strided views gave wrong numbers on the Triton chunked and parallel forms."""

from __future__ import annotations

import pytest
import torch

import recurrence_dsl
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPECS_DIR

pytest.importorskip("triton")

_LAYERS: dict = {}


def _layer(name: str):
    """(file stem, recurrence name) -> (recurrence, its Triton layer)."""
    if name not in _LAYERS:
        stem, rec_name = name
        rec = recurrence_dsl.load(str(SPECS_DIR / f"{stem}.rec"))[rec_name]
        _LAYERS[name] = rec, recurrence_dsl.compile(rec, backend="triton", chunk_size=16, tuning=False)
    return _LAYERS[name]


def _strided(x: torch.Tensor) -> torch.Tensor:
    """x's values as a view with stride 2 on its last axis (a column of a wider tensor), x itself for a scalar."""
    if x.dim() == 0:
        return x
    view = torch.stack([x, torch.full_like(x, 7.0)], dim=-1)[..., 0]
    assert not view.is_contiguous()
    return view


def _first(out):
    return out[0] if isinstance(out, tuple) else out


SPECS_WITH_PARAMS = sorted((p.stem, name) for p in SPECS_DIR.glob("*.rec") if "param " in p.read_text()
                           for name in recurrence_dsl.load(str(p)))


@pytest.mark.parametrize("name", SPECS_WITH_PARAMS, ids=lambda n: n[1])
def test_strided_params_give_what_contiguous_ones_give(name):
    """Mamba2's A and D kept as the columns of one [H, 2] param: the chunked and parallel kernels read the strided
    views as contiguous ones (a relative error of 0.99); every Triton form now gives what contiguous params give."""
    rec, layer = _layer(name)
    n_inputs = len(rec.checked.inputs)
    args, _ = sample_arguments(rec.checked, {s: 8 for s in rec.checked.sizes}, 1, 20, 2, seed=3)
    inputs, params = args[:n_inputs], args[n_inputs:]
    assert params and any(p.dim() > 0 for p in params), name
    strided = [_strided(p) for p in params]
    for form in layer.triton_forms:
        want = _first(layer(*inputs, *params, form=form))
        got = _first(layer(*inputs, *strided, form=form))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name} {form}: {m}")


def test_mamba2_gradients_with_strided_params():
    rec, layer = _layer(("mamba2", "mamba2"))
    n_inputs = len(rec.checked.inputs)
    args, _ = sample_arguments(rec.checked, {s: 8 for s in rec.checked.sizes}, 1, 20, 2, seed=4)
    for form in ("chunked", "parallel"):
        grads = []
        for make in (lambda p: p, _strided):
            leaves = [a.clone().requires_grad_() for a in args]
            call = leaves[:n_inputs] + [make(p) for p in leaves[n_inputs:]]
            out, final = layer(*call, form=form, output_final_state=True)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            grads.append([out.detach(), final.detach()] + [a.grad for a in leaves])
        for got, want in zip(grads[1], grads[0]):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=lambda m: f"{form}: {m}")


@pytest.mark.parametrize("backend,form", [("torch", "recurrent"), ("torch", "chunked"), ("triton", "chunked")])
def test_a_state_left_out_of_initial_state_starts_at_zero(backend, form):
    """A dict initial_state had to name every state (CallError "initial_state is missing state(s) ['n']"), where
    the docs say states start at zero unless given. Left out or None, a state now starts at zero; packed too."""
    rec, layer = _layer(("mlstm", "mlstm"))
    args, init = sample_arguments(rec.checked, {s: 8 for s in rec.checked.sizes}, 1, 20, 2, seed=6,
                                  with_initial_state=True)
    cu = torch.tensor([0, 7, 20])
    C0 = init["C"].repeat(2, 1, 1, 1).requires_grad_()
    zeros = {"C": C0, "n": torch.zeros(2, *init["n"].shape[1:])}
    want, want_final = layer(*args, initial_state=zeros, output_final_state=True, cu_seqlens=cu, backend=backend,
                             form=form)
    (want_grad,) = torch.autograd.grad(want.sum() + want_final["n"].sum(), C0)
    for partial in ({"C": C0}, {"C": C0, "n": None}):
        got, got_final = layer(*args, initial_state=partial, output_final_state=True, cu_seqlens=cu,
                               backend=backend, form=form)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_final, want_final)
        (got_grad,) = torch.autograd.grad(got.sum() + got_final["n"].sum(), C0)
        torch.testing.assert_close(got_grad, want_grad)
    ref, _ = rec.reference(*args, initial_state={"C": C0}, cu_seqlens=cu)
    torch.testing.assert_close(ref.float(), want, rtol=1e-4, atol=1e-5)
    none, _ = layer(*args, cu_seqlens=cu, backend=backend, form=form)
    empty, _ = layer(*args, initial_state={}, cu_seqlens=cu, backend=backend, form=form)
    torch.testing.assert_close(empty, none)
