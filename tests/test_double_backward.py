"""A double backward (a gradient taken with create_graph=True, then differentiated again) through a form whose
backward records no graph (Triton kernels, the derived adjoint, printed VJPs) raises a CallError naming the layer,
the form and the backend, and pointing at the torch recurrent form under RECURRENCE_DSL_RECURRENT_BACKWARD=autograd,
which supports it. Neither a plain backward nor a create_graph=True one that is never differentiated again changes:
same gradients, None where there was None (codegen/dispatch.py `_first_order`)."""

from __future__ import annotations

import pytest
import torch

import recurrence_dsl
from codegen.dispatch import RECURRENT_BACKWARD
from recurrence_dsl.errors import CallError
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPECS_DIR, as_dict

RECS = {name: recurrence_dsl.load(SPECS_DIR / f"{name}.rec")[name] for name in ("gla", "mamba", "delta_net")}
LAYERS = {name: recurrence_dsl.compile(rec, tuning=False) for name, rec in RECS.items()}

# (recurrence, backend, form): every form of the task's three classes whose backward records no graph
CASES = [("gla", "triton", "chunked"), ("gla", "triton", "parallel"), ("gla", "triton", "recurrent"),
         ("gla", "torch", "chunked"), ("gla", "torch", "recurrent"), ("mamba", "triton", "scan"),
         ("mamba", "torch", "scan"), ("delta_net", "triton", "chunked"), ("delta_net", "torch", "chunked")]


def _leaves(name: str, backend: str, T: int = 32, seed: int = 3):
    """Inputs and params, then the initial states, all leaves requiring grad: float32 for Triton, else float64.
    Sizes of 16 (the Triton kernels' smallest blocks), batch 1, 2 heads, T steps (two chunks of 16)."""
    rec = RECS[name].checked
    dtype = torch.float32 if backend == "triton" else torch.float64
    args, init = sample_arguments(rec, {s: 16 for s in rec.sizes}, 1, T, 2, dtype=torch.float64, seed=seed,
                                  with_initial_state=True)
    args = [a.to(dtype).requires_grad_() for a in args]
    init = {k: v.to(dtype).requires_grad_() for k, v in as_dict(init, rec.states).items()}
    return args, init


def _loss(name, backend, form, args, init, square=True, states=True, **kwargs):
    """sum(out^2) (square: its incoming gradient has a graph) or sum(out), plus sum(final states) when `states`."""
    rec = RECS[name].checked
    out, final = LAYERS[name](*args, initial_state=init, output_final_state=True, form=form, backend=backend,
                              chunk_size=16, **kwargs)
    out = as_dict(out, rec.outputs)
    loss = sum((o.square() if square else o).sum() for o in out.values())
    return loss + sum(f.sum() for f in as_dict(final, rec.states).values()) if states else loss


def _message(name, backend, form) -> str:
    return (rf"^{name}: double backward \(differentiating a gradient taken with create_graph=True\) is not "
            rf"supported by its {form} form on the {backend} backend: .*RECURRENCE_DSL_RECURRENT_BACKWARD=autograd"
            r".*backend='torch', form='recurrent'")


@pytest.mark.parametrize("name, backend, form", CASES)
def test_a_double_backward_names_the_layer_form_and_backend(name, backend, form, monkeypatch):
    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.delenv(RECURRENT_BACKWARD, raising=False)
    args, init = _leaves(name, backend)
    leaves = args + list(init.values())
    # A loss whose incoming gradient has a graph, differentiated by autograd.grad: torch alone returned a second
    # derivative without the form's terms here (once_differentiable's error node lies off the path to the leaves).
    grads = torch.autograd.grad(_loss(name, backend, form, args, init), leaves, create_graph=True)
    plain = torch.autograd.grad(_loss(name, backend, form, args, init), leaves)
    for g, p in zip(grads, plain):
        assert g.requires_grad and not p.requires_grad
        torch.testing.assert_close(g.detach(), p, rtol=1e-6, atol=1e-6)
    penalty = sum(g.square().sum() for g in grads)
    with pytest.raises(CallError, match=_message(name, backend, form)):
        torch.autograd.grad(penalty, leaves)
    # A linear loss (a constant incoming gradient) and .backward(): torch said "element 0 of tensors does not
    # require grad" here.
    grads = torch.autograd.grad(_loss(name, backend, form, args, init, square=False), leaves, create_graph=True)
    with pytest.raises(CallError, match=_message(name, backend, form)):
        sum(g.square().sum() for g in grads).backward()


@pytest.mark.parametrize("name, backend, form", [("gla", "triton", "chunked"), ("gla", "torch", "chunked"),
                                                 ("mamba", "triton", "scan"), ("delta_net", "torch", "chunked")])
def test_create_graph_without_a_second_derivative_changes_nothing(name, backend, form):
    """Gradients taken with create_graph=True and only used (an optimiser step, a first-order backward of the same
    graph after them) are the plain ones, None where a plain backward gives None (the outputs alone do not depend
    on the initial states' ... and a loss on the final states alone gives no query a gradient)."""
    if backend == "triton":
        pytest.importorskip("triton")
    args, init = _leaves(name, backend, seed=4)
    leaves = args + list(init.values())
    for states in (True, False):
        loss = _loss(name, backend, form, args, init, states=states)
        got = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        plain = torch.autograd.grad(_loss(name, backend, form, args, init, states=states), leaves,
                                    allow_unused=True)
        assert [g is None for g in got] == [p is None for p in plain]
        for g, p in zip(got, plain):
            if p is not None:
                torch.testing.assert_close(g.detach(), p, rtol=1e-6, atol=1e-6)
        with torch.no_grad():  # used as an optimiser would use them, never differentiated
            stepped = [x - 0.1 * g for x, g in zip(leaves, got) if g is not None]
        assert all(torch.isfinite(s).all() for s in stepped)
        loss.backward()  # the forward graph, kept by create_graph, differentiated once more: first order
        for x, p in zip(leaves, plain):
            if p is None:
                assert x.grad is None
            else:
                torch.testing.assert_close(x.grad, p, rtol=1e-6, atol=1e-6)
            x.grad = None


@pytest.mark.parametrize("name", ["gla", "mamba"])
def test_the_torch_recurrent_form_under_autograd_matches_the_reference_second_derivative(name, monkeypatch):
    """The supported path: autograd through the torch recurrent form's step loop, second derivatives of a gradient
    penalty against float64 autograd through the reference, with an initial state."""
    monkeypatch.setenv(RECURRENT_BACKWARD, "autograd")
    rec = RECS[name].checked
    args, init = _leaves(name, "torch", T=12, seed=5)
    leaves = args + list(init.values())
    grads = torch.autograd.grad(_loss(name, "torch", "recurrent", args, init), leaves, create_graph=True)
    got = torch.autograd.grad(sum(g.square().sum() for g in grads), leaves)

    ref_args = [a.detach().clone().requires_grad_() for a in args]
    ref_init = {k: v.detach().clone().requires_grad_() for k, v in init.items()}
    ref_leaves = ref_args + list(ref_init.values())
    out, final = RECS[name].reference(*ref_args, initial_state=ref_init, output_final_state=True)
    loss = sum(o.square().sum() for o in as_dict(out, rec.outputs).values())
    loss = loss + sum(f.sum() for f in as_dict(final, rec.states).values())
    ref_grads = torch.autograd.grad(loss, ref_leaves, create_graph=True)
    want = torch.autograd.grad(sum(g.square().sum() for g in ref_grads), ref_leaves)
    for g, w in zip(got, want):
        assert w.norm() > 0
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_a_runtime_called_outside_a_layer_names_its_function():
    """codegen/torch_runtime.py called directly (no layer call to name): the message names the autograd Function."""
    from codegen.torch_runtime import chunked_linear

    gen = torch.Generator().manual_seed(0)
    q, k, log_decay = (torch.randn(1, 32, 2, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    v = torch.randn(1, 32, 2, 16, generator=gen, dtype=torch.float64)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    log_decay = (-torch.nn.functional.softplus(log_decay)).requires_grad_()
    (out,), _ = chunked_linear([(q, False)], k, v, log_decay, "key", chunk_size=16)
    grads = torch.autograd.grad(out.square().sum(), [q, k, v, log_decay], create_graph=True)
    with pytest.raises(CallError, match=r"^double backward .* not supported by _DiagonalScores: .*written out by "
                                        r"hand.*RECURRENCE_DSL_RECURRENT_BACKWARD=autograd"):
        torch.autograd.grad(sum(g.square().sum() for g in grads), [q, k, v, log_decay])


def test_the_module_names_the_form_auto_ran():
    """The nn.Module (form 'auto', backend 'torch'): the message names the form auto ran (the scan, past 16 steps),
    for a double backward through a param's gradient."""
    import sys

    module = sys.modules[type(LAYERS["mamba"]).__module__]
    layer = module.Mamba(2, {"D": 16, "N": 16}, backend="torch")
    args, _ = _leaves("mamba", "torch", T=40)
    out, _ = layer(*[a.detach().float() for a in args[:4]])
    (grad,) = torch.autograd.grad(out.square().sum(), [layer.A], create_graph=True)
    with pytest.raises(CallError, match=_message("mamba", "torch", "scan")):
        grad.sum().backward()
