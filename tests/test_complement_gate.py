"""A decay written `1 - sigmoid(x)` (the "z" gate of GRU and minGRU, Feng et al. 2024, arXiv:2410.01201, sec. 3.1)
is a decay with the exact log decay logsigmoid(-x) (issue 12).

In float32, 1 - sigmoid(x) is exactly 0 from x ~ 17 on, so a chunked form that took log(1 - sigmoid(x)) met log(0)
and refused the call (a run-time positivity check); read as logsigmoid(-x) the log decay is finite for every finite
x and needs no check. Here: the analysis's log decays (and `--prove`'s exact proof of every form) for `1 -
sigmoid(x)`, `sigmoid(x)` and products with exp and positive numbers; `show` prints the log decay; and a GRU-gated
vector state and a GLA-like key-gated matrix state, their gates saturating at x = +30 (decay ~ 1e-13, 0 in float32)
and x = -30 (decay 1 - 1e-13, 1 in float32) on some steps and channels, run every form on both backends in float32
against the float64 reference: outputs, final states and the gradients of every input and initial state, relative
error <= 1e-5.
"""

from __future__ import annotations

import pytest
import sympy
import torch

import recurrence_dsl
from recurrence_dsl.analysis import _as_log, analyse
from recurrence_dsl.explain import explain
from recurrence_dsl.prove import prove
from recurrence_dsl.sampling import sample_arguments
from recurrence_dsl.step_ir import logsigmoid, sigmoid

from .conftest import as_dict

F32, F64 = torch.float32, torch.float64
TOL = 1e-5

SPECS = """
# minGRU's step written as the paper writes it (specs/min_gru.rec spells the decay exp(logsigmoid(-z)) by hand)
recurrence zgru(z[D], hc[D]) -> y[D] {
    state h[D]
    h[d] = (1 - sigmoid(z[d])) * h[d] + sigmoid(z[d]) * hc[d]
    y[d] = h[d]
}

# a key-gated matrix memory whose forget gate is 1 - sigmoid(g)
recurrence zgla(q[K], k[K], v[V], g[K]) -> o[V] {
    state S[K, V]
    S[i, j] = (1 - sigmoid(g[i])) * S[i, j] + k[i] * v[j]
    o[j] = sum(i, q[i] * S[i, j])
}
"""
RECS = recurrence_dsl.load(SPECS)
GATE = {"zgru": "z", "zgla": "g"}


def test_log_decays_of_sigmoid_gates():
    x, y = sympy.symbols("x y")
    assert _as_log(1 - sigmoid(x)) == (logsigmoid(-x), True)
    assert _as_log(sigmoid(x)) == (logsigmoid(x), True)
    log, exact = _as_log(sympy.Rational(1, 2) * sympy.exp(y) * (1 - sigmoid(x)))
    assert exact and abs(float((log - y - logsigmoid(-x)).evalf()) - float(sympy.log(0.5))) < 1e-15
    assert _as_log(-sigmoid(x)) is None and _as_log(-sympy.exp(y) * (1 - sigmoid(x))) is None  # never positive
    assert _as_log(1 - 2 * sigmoid(x)) == (sympy.log(1 - 2 * sigmoid(x)), False)  # not a gate: checked at run time
    assert _as_log(sympy.tanh(x))[1] is False


@pytest.mark.parametrize("name", sorted(RECS))
def test_analysis_and_show_give_the_log_decay(name):
    analysis = analyse(RECS[name].checked)
    assert list(analysis.forms) == ["recurrent", "scan", "chunked", "parallel"]
    state = next(iter(analysis.chunk_analysis.states.values()))
    plan = state.chunk
    gate = GATE[name]
    assert plan.decay_exact and plan.log_decay.expr.func is logsigmoid, plan.log_decay
    assert str(plan.log_decay.expr.args[0]).startswith(f"-{gate}[")
    source = recurrence_dsl.compile(RECS[name], backend="torch", tuning=False).source
    assert "if check_steps:\n        _require_positive(" not in source  # no run-time check of the decay
    shown = explain(analysis)  # what `recdsl show` prints for the analysis
    assert all(r.proved for r in prove(analysis))  # --prove: every form equals the recurrence, exactly
    axis = "value" if name == "zgru" else "key"
    index = "b" if name == "zgru" else "a"
    assert f"log decay ({axis}) g_t[{index}] = logsigmoid(-{gate}[{index}])\n" in shown, shown


def _case(name: str, T: int = 37):
    """Arguments in float64 with the gate at +30 and -30 on whole steps and on single channels."""
    rec = RECS[name]
    sizes = {s: 4 for s in rec.checked.sizes}
    args, initial = sample_arguments(rec.checked, sizes, 2, T, 2, dtype=F64, seed=11, with_initial_state=True)
    names = [s.name for s in rec.checked.inputs]
    gate = args[names.index(GATE[name])]
    gate[:, 5] = 30.0  # decay 1 - sigmoid(30) ~ 9.4e-14: a reset, 0 in float32
    gate[:, 20] = -30.0  # decay ~ 1 - 9.4e-14: 1 in float32
    gate[0, 9, :, 1] = 30.0  # one channel
    gate[1, 30, :, 2] = -30.0
    return rec, args, initial


def _run(fn, rec, args, initial, weights=None, **kwargs):
    leaves = [a.detach().clone().requires_grad_() for a in args]
    init = {k: v.detach().clone().requires_grad_() for k, v in as_dict(initial, rec.checked.states).items()}
    out, final = fn(*leaves, initial_state=next(iter(init.values())), output_final_state=True, **kwargs)
    out, final = as_dict(out, rec.checked.outputs), as_dict(final, rec.checked.states)
    if weights is None:
        gen = torch.Generator().manual_seed(3)
        weights = [{k: torch.randn(v.shape, generator=gen, dtype=F64) for k, v in d.items()} for d in (out, final)]
    loss = sum((out[k].double() * w).sum() for k, w in weights[0].items())
    (loss + sum((final[k].double() * w).sum() for k, w in weights[1].items())).backward()
    values = {**out, **{f"final {k}": v for k, v in final.items()}}
    grads = {f"d{s.name}": x.grad for s, x in zip(rec.checked.inputs, leaves)}
    grads.update({f"d{k} (initial)": v.grad for k, v in init.items()})
    return values, grads, weights


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _backend_forms(name: str) -> tuple:
    """((backend, the forms the compiled layer has there), ...): every form of both backends, so a form added to
    either is run here without this list changing (none on triton when triton does not import)."""
    layer = recurrence_dsl.compile(RECS[name], tuning=False)
    return ("torch", tuple(layer.forms)), ("triton", tuple(layer.triton_forms or ()))


FORMS = [(name, backend, form) for name in sorted(RECS) for backend, forms in _backend_forms(name) for form in forms]


@pytest.mark.parametrize("name", sorted(RECS))
def test_the_triton_backend_has_every_form(name):
    """Both gates are linear recurrences: the Triton backend has every form the torch backend has (parallel too),
    so the cases below run each on both."""
    pytest.importorskip("triton")
    forms = dict(_backend_forms(name))
    assert forms["triton"] == forms["torch"] and "parallel" in forms["triton"], forms


@pytest.mark.parametrize(("name", "backend", "form"), FORMS)
def test_saturated_gates_on_every_form(name, backend, form):
    rec, args, initial = _case(name)
    ref_values, ref_grads, weights = _run(rec.reference, rec, args, initial)
    layer = recurrence_dsl.compile(rec, backend=backend, form=form, tuning=False)
    init32 = {k: v.float() for k, v in as_dict(initial, rec.checked.states).items()}
    kwargs = {"chunk_size": 16} if form == "chunked" else {}
    values, grads, _ = _run(layer, rec, [a.float() for a in args], init32, weights, **kwargs)
    errors = {k: _rel(v, ref_values[k]) for k, v in values.items()}
    errors.update({k: _rel(v, ref_grads[k]) for k, v in grads.items()})
    assert all(v.dtype == F32 for v in values.values())
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert max(errors.values()) <= TOL, errors
