"""An eleventh trial's fixes (a researcher writing shift states and recent layers): the hint for `x[t - 1]` points
to shift states, and a coupled-states message lists each state's shape in the order it names the states."""

from __future__ import annotations

import pytest

import recurrence_dsl
from recurrence_dsl.errors import SpecError

PREVIOUS_INPUT = """
recurrence c(q[K], k[K], v[V]) -> o[V] {
    state S[K, V]
    S[i, j] = S[i, j] + k[t-1][i] * v[j]
    o[j] = sum(i, q[i] * S[i, j])
}
"""

# What the hint says to write instead: the previous step's key kept in a shift state.
AS_THE_HINT_SAYS = """
recurrence c(q[K], k[K], v[V]) -> o[V] {
    state k_last[K]
    state S[K, V]
    S[i, j] = S[i, j] + k_last[i] * v[j]
    k_last[i] = k[i]
    o[j] = sum(i, q[i] * S[i, j])
}
"""


def test_the_previous_step_hint_names_shift_states():
    with pytest.raises(SpecError) as err:
        recurrence_dsl.load_text(PREVIOUS_INPUT)
    text = str(err.value)
    assert "shift state" in text and "x_last[d] = x[d]" in text
    assert "torch.nn.functional.pad" not in text  # a pad outside leaks across packed sequences


def test_what_the_hint_says_keeps_the_chunked_form():
    rec = recurrence_dsl.load_text(AS_THE_HINT_SAYS)["c"]
    layer = recurrence_dsl.compile(rec, backend="torch")
    assert {"chunked", "parallel"} <= set(layer.forms)


COUPLED = """
recurrence s_feedback(q[K], k[K], v[V]) -> o[V] {
    state ol[V]
    state S[K, V]
    S[i, j] = 0.9 * S[i, j] + k[i] * (v[j] + ol[j])
    y[j] = sum(i, q[i] * S[i, j])
    ol[j] = y[j]
    o[j] = y[j]
}
"""


def test_coupled_states_shapes_follow_their_names():
    from recurrence_dsl.analysis import analyse

    analysis = analyse(recurrence_dsl.load_text(COUPLED)["s_feedback"].checked)
    reasons = " ".join(s.reason for s in analysis.states.values())
    assert "the coupled states ol, S have different shapes (['V'] and ['K', 'V'])" in reasons
