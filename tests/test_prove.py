"""`recdsl check --prove`: each derived form against the unrolled recurrence (T = 4, sizes 2)."""

from __future__ import annotations

import importlib

import pytest
import sympy

import recurrence_dsl
from recurrence_dsl.analysis import TransitionClass, analyse
from recurrence_dsl.cli import print_proof
from recurrence_dsl.prove import ProofResult, _Instance, _unrolled, prove
from recurrence_dsl.step_ir import Definition

from .conftest import SPEC_FILES


def only(text: str) -> recurrence_dsl.Recurrence:
    (rec,) = recurrence_dsl.load_text(text).values()
    return rec


# Kimi Delta Attention: the gated delta rule with a per-key-channel decay exp(g[i]).
KDA = """
recurrence kda(q[K], k[K], v[V], g[K], beta) -> o[V] {
    state S[K, V]
    u[j] = v[j] - sum(i, k[i] * exp(g[i]) * S[i, j])
    S[i, j] = exp(g[i]) * S[i, j] + beta * k[i] * u[j]
    o[j] = sum(i, q[i] * S[i, j])
}
"""

# Titans-style memory: a momentum m of the delta rule's gradient, and S stepping along m's new value.
TITANS = """
recurrence titans(q[K], k[K], v[V], eta, theta, alpha) -> o[V] {
    state m[K, V]
    state S[K, V]
    err[j] = sum(i, k[i] * S[i, j]) - v[j]
    m[i, j] = eta * m[i, j] - theta * k[i] * err[j]
    S[i, j] = (1 - alpha) * S[i, j] + m[i, j]
    o[j] = sum(i, q[i] * S[i, j])
}
"""

# Longhorn (arXiv:2407.14207): S = (1 - dt k^2) * S + dt x k with dt = b / (1 + b k.k), per value channel.
LONGHORN = """
recurrence longhorn(q[K], k[K], x[V], b[V]) -> o[V] {
    state S[K, V]
    dt[j] = b[j] / (1 + b[j] * sum(m, k[m] * k[m]))
    S[i, j] = (1 - dt[j] * k[i] * k[i]) * S[i, j] + dt[j] * k[i] * x[j]
    o[j] = sum(i, q[i] * S[i, j])
}
"""

# The same denominator inside a per-value-channel decay: chunked and parallel forms too.
LONGHORN_DECAY = """
recurrence longhorn_decay(q[K], k[K], x[V], b[V], A[V]) -> o[V] {
    state S[K, V]
    dt[j] = b[j] / (1 + b[j] * sum(m, k[m] * k[m]))
    S[i, j] = exp(-A[j] * dt[j]) * S[i, j] + dt[j] * k[i] * x[j]
    o[j] = sum(i, q[i] * S[i, j])
}
"""


def assert_all_symbolic(results: list[ProofResult]) -> None:
    assert results
    for r in results:
        assert r.proved and r.symbolic == r.elements, (r.form, r.value, r.verdict)
        assert r.verdict == "equal (exact)"


def test_kda_key_decay_is_proved_for_every_form():
    analysis = analyse(only(KDA).checked)
    plan = analysis.chunk_analysis.states["S"].chunk
    assert analysis.cls is TransitionClass.RANK_ONE_UPDATE and plan.decay_axis == "key"
    results = prove(analysis)
    assert {r.form for r in results} == {f for f in analysis.forms if f != "recurrent"} == {"chunked"}
    assert_all_symbolic(results)


def test_a_key_decay_read_as_a_scalar_is_different(monkeypatch):
    """The old misreading of KDA's plan (one decay for every key row) is caught, with the element named."""
    analysis = analyse(only(KDA).checked)
    plan = analysis.chunk_analysis.states["S"].chunk
    first_row = plan.log_decay.expr.xreplace({plan.log_decay.indices[0]: 0})
    plan.decay_axis, plan.log_decay = "scalar", Definition(plan.log_decay.name, (), first_row)
    expansions = _count_symbolic_checks(monkeypatch)
    results = prove(analysis)
    assert results and not any(r.proved for r in results)
    # Found at the rational points with no symbolic expansion at all: the misread decay already acts on the
    # initial state at t = 0, so each value's first element differs and its comparison stops there.
    assert expansions[0] == 0, expansions
    assert all(r.verdict.startswith("DIFFERENT: ") and "differs at a random rational point" in r.verdict
               for r in results), [r.verdict for r in results]


def test_a_state_reading_another_states_new_value_gets_a_verdict(capsys):
    rec = only(TITANS)
    analysis = analyse(rec.checked)
    assert analysis.forms == ("recurrent",)
    assert prove(analysis) == []
    assert print_proof(rec)
    assert "only the recurrent form exists (general): nothing to prove" in capsys.readouterr().out
    # The unrolled step (the reference every form is held to) reads m's new value in S's update.
    inst = _Instance(analysis, 1, 2)
    _, finals = _unrolled(inst)
    s = {n: sympy.Symbol(n, real=True) for n in ("eta0", "theta0", "alpha0", "m0_0_0", "S0_0_0", "S0_1_0",
                                                 "k0_0", "k0_1", "v0_0")}
    m_new = s["eta0"] * s["m0_0_0"] - s["theta0"] * s["k0_0"] * (
        s["k0_0"] * s["S0_0_0"] + s["k0_1"] * s["S0_1_0"] - s["v0_0"])
    assert sympy.expand(finals["S"][(0, 0)] - ((1 - s["alpha0"]) * s["S0_0_0"] + m_new)) == 0
    assert sympy.expand(finals["m"][(0, 0)] - m_new) == 0


def _no_simplify(monkeypatch) -> None:
    """Make sympy's `simplify` (function and method) raise: it ran for hours on Longhorn's 1 / (1 + dt k.k), and a
    proof must settle such elements by expansion over one denominator instead."""
    def refuse(*args, **kwargs):
        raise AssertionError("the proof called sympy.simplify, whose work has no bound")

    monkeypatch.setattr(sympy, "simplify", refuse)
    monkeypatch.setattr(importlib.import_module("sympy.simplify.simplify"), "simplify", refuse)


def _count_symbolic_checks(monkeypatch) -> list[int]:
    """A one-element list counting the calls of the proof's symbolic expansion (`prove._symbolic_zero`)."""
    import recurrence_dsl.prove as prove_module

    count, check = [0], prove_module._symbolic_zero

    def counted(diff):
        count[0] += 1
        return check(diff)

    monkeypatch.setattr(prove_module, "_symbolic_zero", counted)
    return count


@pytest.mark.parametrize("text", [LONGHORN, LONGHORN_DECAY], ids=["longhorn", "longhorn_decay"])
def test_a_longhorn_denominator_is_proved_by_expansion(text, monkeypatch):
    """Bounded work, not a wall-clock limit (which a loaded CI machine breaks): no `simplify` anywhere, and every
    element settled by the one expansion per element (none left to the rational points)."""
    analysis = analyse(only(text).checked)
    _no_simplify(monkeypatch)
    expansions = _count_symbolic_checks(monkeypatch)
    results = prove(analysis)
    assert_all_symbolic(results)
    assert expansions[0] == sum(r.elements for r in results)


def test_the_verdict_says_how_exact():
    assert ProofResult("scan", "o", 8, True, symbolic=8, points=3).verdict == "equal (exact)"
    assert ProofResult("scan", "o", 8, True, symbolic=5, points=3).verdict == (
        "equal: 5 symbolically, 3 at 3 random rational points (exact arithmetic)")
    assert ProofResult("scan", "o", 8, False, "o[0] at t = 1 differs").verdict == "DIFFERENT: o[0] at t = 1 differs"


@pytest.mark.parametrize("path", SPEC_FILES, ids=[p.stem for p in SPEC_FILES])
def test_every_spec_is_proved(path):
    for rec in recurrence_dsl.load(path).values():
        analysis = analyse(rec.checked)
        results = prove(analysis)
        assert len(results) == sum(f != "recurrent" for f in analysis.forms) * (
            len(rec.checked.outputs) + len(rec.checked.states))
        for r in results:
            assert r.proved and r.symbolic == r.elements, (r.form, r.value, r.verdict)
