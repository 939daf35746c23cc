"""A double backward (a gradient taken with create_graph=True, then differentiated again) through a form whose
backward records no graph raises an error naming the layer and the form; the torch recurrent form under
RECURRENCE_DSL_RECURRENT_BACKWARD=autograd supports it and matches the reference's second derivatives."""

from __future__ import annotations

import pytest
import torch

import recurrence_dsl
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPECS_DIR, as_dict

REC = recurrence_dsl.load(SPECS_DIR / "retention.rec")["retention"]


def _arguments(dtype, size=4, T=20):
    args, _ = sample_arguments(REC.checked, {"K": size, "V": size}, 1, T, 2, dtype=torch.float64, seed=5)
    return [a.to(dtype).requires_grad_() for a in args]


def _penalty(out, args, square: bool):
    """The squared norm of d loss / d args, as a gradient penalty builds it; `square`: loss = sum(out^2) (its
    incoming gradient has a graph), else sum(out) (a constant one)."""
    out = as_dict(out, REC.checked.outputs)["o"]
    loss = out.square().sum() if square else out.sum()
    grads = torch.autograd.grad(loss, args, create_graph=True)
    return sum(g.square().sum() for g in grads), grads


@pytest.mark.parametrize("square", [False, True])
@pytest.mark.parametrize("form", ["recurrent", "scan", "chunked", "parallel"])
def test_torch_forms_name_the_layer_and_form(form, square):
    args = _arguments(torch.float64)
    out, _ = REC_LAYER(*args, form=form, backend="torch", chunk_size=16)
    penalty, grads = _penalty(out, args, square)
    # the first-order gradients are still those of a plain backward
    again = as_dict(REC_LAYER(*args, form=form, backend="torch", chunk_size=16)[0], REC.checked.outputs)["o"]
    plain = torch.autograd.grad(again.square().sum() if square else again.sum(), args)
    for g, p in zip(grads, plain):
        torch.testing.assert_close(g.detach(), p)
    with pytest.raises(RuntimeError, match=rf"retention: double backward .* not supported by the torch {form} form"
                                           r".*RECURRENCE_DSL_RECURRENT_BACKWARD=autograd"):
        penalty.backward()


def test_torch_recurrent_form_under_autograd_matches_the_reference_second_derivative(monkeypatch):
    monkeypatch.setenv("RECURRENCE_DSL_RECURRENT_BACKWARD", "autograd")
    args = _arguments(torch.float64)
    out, _ = REC_LAYER(*args, form="recurrent", backend="torch")
    _penalty(out, args, square=True)[0].backward()
    got = [a.grad.clone() for a in args]
    ref_args = [a.detach().clone().requires_grad_() for a in args]
    ref_out, _ = REC.reference(*ref_args)
    _penalty({"o": ref_out} if torch.is_tensor(ref_out) else ref_out, ref_args, square=True)[0].backward()
    for g, r in zip(got, ref_args):
        assert r.grad.norm() > 0
        torch.testing.assert_close(g, r.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("form", ["recurrent", "parallel"])
def test_triton_forms_name_the_layer_and_form(form):
    pytest.importorskip("triton")
    args = _arguments(torch.float32, size=16, T=16)
    out, _ = REC_LAYER(*args, form=form, backend="triton", chunk_size=16)
    penalty, _ = _penalty(out, args, square=False)
    with pytest.raises(RuntimeError, match=rf"retention: double backward .* not supported by the triton {form} form: "
                                           r"its backward runs Triton kernels.*backend='torch', form='recurrent'"):
        penalty.backward()


REC_LAYER = recurrence_dsl.compile(REC)
