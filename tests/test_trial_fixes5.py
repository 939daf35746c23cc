"""A fifth trial's fixes: new layers written by a new user (tests/data/trial5_*.rec is not needed: the specs are
inline)."""

from __future__ import annotations

import torch

import recurrence_dsl
from codegen.load import load_module
from recurrence_dsl.analysis import analyse


def _module_class(text: str, name: str):
    rec = recurrence_dsl.load(text)[name]
    return getattr(load_module(analyse(rec.checked)), "".join(p.title() for p in name.split("_"))), rec


def _want(heads: int) -> torch.Tensor:
    return 1 - torch.exp2(-5 - torch.arange(heads, dtype=torch.float64))


# 1. a decay param inside a second exp (Mamba-2's A = -exp(A_log)) starts where its docstring says

MAMBA2_LOG = """
recurrence mamba2_log(x[P], dt, B[N], C[N]) -> y[P] {
    param A_log
    state h[N, P]
    h[n, p] = exp(-exp(A_log) * softplus(dt)) * h[n, p] + dt * B[n] * x[p]
    y[p] = sum(n, C[n] * h[n, p])
}
"""

PER_KEY = """
recurrence per_key(q[K], k[K], v[V], a) -> o[V] {
    param A[K]
    state S[K, V]
    S[i, j] = exp(-a * exp(A[i])) * S[i, j] + k[i] * v[j]
    o[j] = sum(i, q[i] * S[i, j])
}
"""


def test_a_param_under_a_second_exp_starts_at_the_head_decays():
    cls, _ = _module_class(MAMBA2_LOG, "mamba2_log")
    module = cls(4, backend="torch")
    decay = torch.exp(-torch.exp(module.A_log.detach().double()))  # the decay with its other factor 1
    torch.testing.assert_close(decay, _want(4), rtol=0, atol=1e-6)
    assert "A_log starts where head h's decay is 1 - 2^(-5 - h)" in cls.__doc__


def test_a_per_key_param_under_a_second_exp_starts_at_the_head_decays():
    cls, _ = _module_class(PER_KEY, "per_key")
    module = cls(3, {"K": 5}, backend="torch")
    assert tuple(module.A.shape) == (3, 5)
    decay = torch.exp(-torch.exp(module.A.detach().double()))
    torch.testing.assert_close(decay, _want(3)[:, None].expand(3, 5), rtol=0, atol=1e-6)


def test_the_plain_decay_params_still_start_as_before():
    # Mamba-2's exp(dt * A): A is the log decay; lightning attention's exp(-slope): slope its negation
    for name, param, decay_of in [("mamba2", "A", torch.exp), ("lightning_attention", "slope", lambda s: torch.exp(-s)),
                                  ("retention", "gamma", lambda g: g)]:
        rec = recurrence_dsl.load(f"specs/{name}.rec")[name]
        cls = getattr(load_module(analyse(rec.checked)), "".join(p.title() for p in name.split("_")))
        module = cls(4, backend="torch")  # (scalar params: no sizes)
        decay = decay_of(getattr(module, param).detach().double())
        torch.testing.assert_close(decay, _want(4), rtol=0, atol=1e-6)


# 2. decays the sampling rules give no role: a param under softplus or sigmoid started at zero (decay 0.5 every head)

SOFTPLUS = """
recurrence softplus_retention(q[K], k[K], v[V]) -> o[V] {
    param lam
    state S[K, V]
    S[i, j] = exp(-softplus(lam)) * S[i, j] + k[i] * v[j]
    o[j] = sum(i, q[i] * S[i, j])
}
"""

SIGMOID = """
recurrence sigmoid_decay(x[D]) -> y[D] {
    param w[D]
    state h[D]
    h[d] = sigmoid(w[d]) * h[d] + x[d]
    y[d] = h[d]
}
"""


def test_a_param_under_softplus_or_sigmoid_starts_at_the_head_decays():
    cls, _ = _module_class(SOFTPLUS, "softplus_retention")
    decay = torch.exp(-torch.nn.functional.softplus(cls(4, backend="torch").lam.detach().double()))
    torch.testing.assert_close(decay, _want(4), rtol=0, atol=1e-6)
    cls, _ = _module_class(SIGMOID, "sigmoid_decay")
    decay = torch.sigmoid(cls(2, {"D": 3}, backend="torch").w.detach().double())
    torch.testing.assert_close(decay, _want(2)[:, None].expand(2, 3), rtol=0, atol=1e-6)
    assert "w starts where head h's decay is 1 - 2^(-5 - h)" in cls.__doc__


def test_a_param_mixed_with_an_input_in_its_decay_keeps_its_start():
    # exp(-exp(A + a)): A and the input a in one factor, no decay of A alone to solve: the sign rule's start
    text = MAMBA2_LOG.replace("exp(-exp(A_log) * softplus(dt))", "exp(-exp(A_log + dt))")
    cls, _ = _module_class(text, "mamba2_log")
    start = cls(2, backend="torch").A_log.detach().double()
    torch.testing.assert_close(start, torch.log(_want(2)), rtol=0, atol=1e-6)
