"""A ninth trial's fixes (a researcher writing new layers from the docs alone): a state whose update does not read
its previous value crashed the compiler, and messages for a forgotten `state`, an unknown keyword and head-first
inputs."""

from __future__ import annotations

import pytest
import torch

import recurrence_dsl
from recurrence_dsl.analysis import analyse
from recurrence_dsl.errors import CallError, SpecError
from recurrence_dsl.explain import explain

from .conftest import SPECS_DIR

# Each state's transition is zero: its update does not read it (or reads it to cancel it). The recurrent form's
# adjoint printed an empty `for` loop (no gradient passes from one step to the one before), so compile() raised
# an IndentationError from the generated source, and `recdsl check` exited 3.
ZERO_TRANSITIONS = {
    "zero_decay": "h[d] = 0 * h[d] + x[d]\n    y[d] = h[d]",
    "cancelled": "h[d] = h[d] - h[d] + x[d]\n    y[d] = 2 * h[d]",
    "tanh_only": "h[d] = tanh(x[d])\n    y[d] = h[d]",
    "read_before": "y[d] = h[d] + x[d]\n    h[d] = x[d] * x[d]",
}


@pytest.mark.parametrize("name", sorted(ZERO_TRANSITIONS))
def test_a_state_with_a_zero_transition_compiles_and_matches_the_reference(name):
    text = f"recurrence {name}(x[D]) -> y[D] {{\n    state h[D]\n    {ZERO_TRANSITIONS[name]}\n}}\n"
    rec = recurrence_dsl.load(text)[name]
    layer = recurrence_dsl.compile(rec, backend="torch", tuning=False)
    torch.manual_seed(0)
    x = torch.randn(2, 150, 3, 5, dtype=torch.float64, requires_grad=True)  # several checkpoint segments
    h0 = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    got, got_h = layer(x, initial_state=h0, output_final_state=True)
    want, want_h = rec.reference(x, initial_state=h0, output_final_state=True)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_h, want_h)
    w = torch.randn_like(got)
    grads = torch.autograd.grad((got * w).sum() + got_h.sum(), (x, h0), materialize_grads=True)
    want_grads = torch.autograd.grad((want * w).sum() + want_h.sum(), (x, h0), materialize_grads=True)
    for g, g_ref in zip(grads, want_grads):
        torch.testing.assert_close(g, g_ref)


def test_explain_says_what_to_do_with_a_state_overwritten_each_step():
    """The reason read "each step's transition is a D x D matrix", which a state that only caches its step's key
    does not have; such a state is now a shift state, and where it is alone, the analysis says to make it a
    temporary or to shift the input outside."""
    text = """recurrence cached(q[K], k[K], v[V], g[K]) -> o[V] {
    state S[K, V], klast[K]
    S[i, j] = exp(g[i]) * S[i, j] + k[i] * v[j]
    o[j] = sum(i, q[i] * S[i, j]) + sum(i, klast[i]) * v[j]
    klast[i] = k[i]
}
"""
    analysis = analyse(recurrence_dsl.load(text)["cached"].checked)
    words = explain(analysis)
    # Now a shift state (docs/language.md, "Linear bodies"): computed by shifting k along T, S keeps its forms.
    assert "state klast[i]: shift -- klast is overwritten each step by k[i]" in words
    assert "computed by shifting inputs along T" in words
    assert analysis.forms == ("recurrent", "scan", "chunked", "parallel")
    # A body of such states alone has nothing left to run as a recurrence: the advice to shift the input outside.
    alone = analyse(recurrence_dsl.load("""recurrence cached(k[K], v[V]) -> o[K] {
    state klast[K]
    o[i] = k[i] + klast[i]
    klast[i] = k[i]
}
""")["cached"].checked)
    words = explain(alone)
    assert "klast is overwritten each step (its transition is zero)" in words
    assert "shift that input by one step outside the recurrence" in words
    assert "x K matrix" not in alone.unavailable["scan"]


def test_a_forgotten_state_declaration_gets_a_hint_to_declare_it():
    text = "recurrence nost(q[K], k[K], v[V]) -> o[V] {\n    S[i, j] = S[i, j] + k[i] * v[j]\n" \
           "    o[j] = sum(i, q[i] * S[i, j])\n}\n"
    with pytest.raises(SpecError) as err:
        recurrence_dsl.load(text)
    shown = err.value.render()
    assert "2:15: error: 'S' is read before it is assigned" in shown
    assert "declare it first with a line `state S[...]`" in shown


def test_an_unknown_keyword_names_the_layer_keywords_too():
    rec = recurrence_dsl.load(SPECS_DIR / "gla.rec")["gla"]
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(CallError, match="a compiled layer form, backend, chunk_size, config, check_steps"):
        rec.reference(q, q, q, -q.abs(), chunksize=16)


def test_head_first_inputs_are_named_when_a_param_sees_the_time_axis():
    """[B, H, T, K] inputs made the per-head param's error blame the param; it now says the layout."""
    layer = recurrence_dsl.compile(recurrence_dsl.load(SPECS_DIR / "retention.rec")["retention"], backend="torch",
                                   tuning=False)
    q = torch.randn(1, 2, 20, 8)  # head-first: H=2, T=20
    with pytest.raises(CallError) as err:
        layer(q, q, q, torch.full((2,), 0.9))
    assert "param 'gamma' must have shape [H] with H=20, got [2]" in str(err.value)
    assert "head-first ones [B, H, T, ...] want .transpose(1, 2)" in str(err.value)
    with pytest.raises(CallError) as err:  # a plain wrong size gets no such guess
        layer(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2), torch.full((3,), 0.9))
    assert "head-first" not in str(err.value)
