"""Regressions from a new user's trial of the language's breadth (specs written from LANGUAGE.md, not specs/).

Each test failed before its fix (checked by running it against the unfixed code)."""

from __future__ import annotations

import recurrence_dsl
from recurrence_dsl.analysis import analyse
from recurrence_dsl.prove import prove


def _proof(text: str) -> dict:
    rec = next(iter(recurrence_dsl.load(text).values()))
    return {(r.form, r.value): r for r in prove(analyse(rec.checked))}


def test_prove_a_recurrence_with_no_size_names():
    # Every input and state a scalar: the lifted state h[1]'s key index has no range in the body. `--prove` ended
    # in an internal IndexError (the first size name was looked up, and there is none).
    results = _proof("""
recurrence ema(x, a) -> y {
    state h
    h = sigmoid(a) * h + (1 - sigmoid(a)) * x
    y = relu(h) + min(h, 0.5)
}
""")
    assert {form for form, _ in results} == {"scan", "chunked", "parallel"}
    assert all(r.proved for r in results.values()), [r.verdict for r in results.values()]


def test_prove_a_literal_key_size():
    # A key of exactly 4 channels: the chunk plan's key was evaluated over the instance size (2), then read at
    # key 2 (KeyError: (2,)), an internal error.
    results = _proof("""
recurrence lit4(q[4], k[4], v[V]) -> o[V] {
    state S[4, V]
    S[i, j] = 0.5 * S[i, j] + k[i] * v[j]
    o[j] = sum(i, q[i] * S[i, j])
}
""")
    assert results and all(r.proved for r in results.values()), [r.verdict for r in results.values()]
    assert results[("chunked", "final S")].elements == 4 * 2  # the literal key size 4 times V = 2


def test_prove_a_decimal_decay_inside_exp():
    # exp(-0.1) is a float in the step IR (0.904837...); the parallel form's masks hold exp(-0.2), exp(-0.3).
    # Read as their nearest rationals they do not compose, and the proof said DIFFERENT (by 1e-16).
    results = _proof("""
recurrence decimal(q[K], k[K], v[V]) -> o[V] {
    state S[K, V]
    S[i, j] = exp(-0.1) * S[i, j] + k[i] * v[j]
    o[j] = sum(i, q[i] * S[i, j])
}
""")
    assert set(results) >= {("parallel", "o"), ("chunked", "o"), ("scan", "o")}
    assert all(r.proved for r in results.values()), [r.verdict for r in results.values()]
