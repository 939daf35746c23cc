"""`recdsl check --prove`: each derived form against the unrolled recurrence (T = 4, sizes 2)."""

from __future__ import annotations

import importlib
import re

import pytest
import sympy

import recurrence_dsl
from recurrence_dsl.analysis import TransitionClass, analyse
from recurrence_dsl.cli import print_proof
from recurrence_dsl.prove import ProofResult, _expanded_zero, _Instance, _opaque, _symbolic_zero, _unrolled, prove
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

# DeltaNet with k and q L2-normalised inside the step (a new user's trial): the chunked form regroups the norms
# (k unnormalised, both of k's norms in beta, q's applied to the readout), which expanding over the sums under the
# roots took minutes to show; as opaque symbols, seconds.
DELTA_L2 = """
recurrence delta_l2(q[K], k[K], v[V], b, g) -> o[V] {
    state S[K, V]
    kn[i] = k[i] / sqrt(sum(a, k[a] * k[a]) + 1e-6)
    qn[i] = q[i] / sqrt(sum(a, q[a] * q[a]) + 1e-6)
    beta = sigmoid(b)
    u[j] = v[j] - sum(i, kn[i] * exp(g) * S[i, j])
    S[i, j] = exp(g) * S[i, j] + beta * kn[i] * u[j]
    o[j] = sum(i, qn[i] * S[i, j])
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

    def counted(diff, *args, **kwargs):
        count[0] += 1
        return check(diff, *args, **kwargs)

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
        # shift states (mamba3's B_last, x_last) are shifted inputs in every form: their rest is what is proved
        shifted = len(analysis.shift.states) if analysis.shift is not None else 0
        assert len(results) == sum(f != "recurrent" for f in analysis.forms) * (
            len(rec.checked.outputs) + len(rec.checked.states) - shifted)
        for r in results:
            assert r.proved and r.symbolic == r.elements, (r.form, r.value, r.verdict)


def _without_one_norm(analysis) -> None:
    """Break the chunked form of DELTA_L2: its beta, sigmoid(b) over both of k's norms, loses one of them."""
    plan = analysis.chunk_analysis.states["S"].chunk
    norms = [p for p in plan.beta.expr.atoms(sympy.Pow) if p.exp == sympy.Rational(-1, 2)]
    assert len(norms) == 2, plan.beta
    plan.beta = Definition(plan.beta.name, plan.beta.indices, plan.beta.expr / norms[0])


def test_an_l2_normalised_delta_rule_is_proved_with_its_norms_opaque(monkeypatch):
    """Bounded work again: every element settled with the sums under the norms' roots as symbols, never put over
    one denominator (`together`, then an expansion that took half a minute an element) nor `simplify`d."""
    analysis = analyse(only(DELTA_L2).checked)
    _no_simplify(monkeypatch)

    def refuse(*args, **kwargs):
        raise AssertionError("the proof expanded the norms' sums over one denominator")

    monkeypatch.setattr(sympy, "together", refuse)
    events = []
    results = prove(analysis, progress=lambda part, seconds: events.append((part, seconds)))
    assert_all_symbolic(results)
    assert [r.elements for r in results] == [8, 4]
    # Each part of the proof announced as it starts, then again with its time as it ends.
    parts = ["unrolling the recurrence (4 steps)", "building the chunked form", "proving chunked o (8 elements)",
             "proving chunked final S (4 elements)"]
    assert [part for part, _ in events] == [part for part in parts for _ in (0, 1)]
    assert [seconds is None for _, seconds in events] == [True, False] * len(parts)
    assert all(seconds >= 0 for _, seconds in events[1::2])


def test_a_missing_norm_is_different():
    """A wrong form with the norms: found at the rational points (the norms there are roots of rationals)."""
    analysis = analyse(only(DELTA_L2).checked)
    _without_one_norm(analysis)
    results = prove(analysis)
    assert results and not any(r.proved for r in results)
    assert all(r.verdict.startswith("DIFFERENT: ") for r in results), [r.verdict for r in results]


def test_opaque_norms_never_prove_a_wrong_form(monkeypatch):
    """With the rational points silenced (each undecided), the symbolic check alone must refuse the missing norm:
    opaque norms are symbols of their own, one per sum, and a wrong form stays wrong in them. One step, so that
    the expansion over the written-out sums after them stays short."""
    import recurrence_dsl.prove as prove_module

    analysis = analyse(only(DELTA_L2).checked)
    _without_one_norm(analysis)
    monkeypatch.setattr(prove_module, "_at", lambda diff, point: None)
    results = prove(analysis, steps=1)
    assert results and not any(r.proved for r in results)
    assert all(r.verdict.startswith("undecided") for r in results), [r.verdict for r in results]


def test_a_sum_under_a_root_opaque_or_written_out():
    """`_symbolic_zero`: one norm regrouped is proved with its sum opaque; a difference zero only through what the
    sum is (k.k / n + 1e-6 / n = 1) still is, by the expansion over the written-out sum after the opaque one; two
    different norms, or a norm and its square, are never equal."""
    k0, k1, v, s = sympy.symbols("k0 k1 v s", real=True)
    n = k0**2 + k1**2 + sympy.Rational(1, 10**6)
    regrouped = k0 / sympy.sqrt(n) * (v - k0 / sympy.sqrt(n) * s) - (k0 * v / sympy.sqrt(n) - k0**2 * s / n)
    assert regrouped != 0 and _symbolic_zero(regrouped)
    opaque = _opaque(regrouped)
    assert not any(isinstance(p.base, sympy.Add) for p in opaque.atoms(sympy.Pow))
    assert _expanded_zero(opaque, together=False)
    through_the_sum = (k0**2 + k1**2) / n + sympy.Rational(1, 10**6) / n - 1
    assert not _expanded_zero(_opaque(through_the_sum), together=False) and _symbolic_zero(through_the_sum)
    assert not _symbolic_zero(k0 / sympy.sqrt(n) - k0 / sympy.sqrt(n + 1))
    assert not _symbolic_zero(k0 / sympy.sqrt(n) - k0 / n)


def test_print_proof_shows_its_progress_on_stderr(capsys):
    """`recdsl check --prove` never waits on a silent terminal: one stderr line a part of the proof, as it starts,
    with its time when it ends; the verdicts stay on stdout."""
    assert print_proof(only(KDA))
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    parts = ["unrolling the recurrence (4 steps)", "building the chunked form", "proving chunked o (8 elements)",
             "proving chunked final S (4 elements)"]
    assert len(lines) == len(parts), captured.err
    for line, part in zip(lines, parts):
        assert re.fullmatch(rf"kda: {re.escape(part)}\.\.\. \d+\.\d s", line), line
    assert "proving" not in captured.out and "chunked   o            8 elements  equal (exact)" in captured.out
