"""The chunked form's backward on the Triton backend for the linear classes (no decay, scalar, key- and value-axis
decays): `triton_runtime.chunked_linear_by` is differentiable through its own Triton kernels (`_ChunkedLinearFunction`),
and a generated module prints its chunked Triton form without `with_torch_backward` (`chunked_backward_in_triton`).

Every spec of specs/ whose chunked Triton form calls only `chunked_linear_by`, and a value-gated spec with two
readouts (one exclusive): gradients of every input, param and initial state, with a gradient on the final state,
against the float64 reference interpreter's autograd (relative error <= 1e-5 in float32), T = 37 in chunks of 16
(the last one partial), while every torch runtime function of the generated module raises (so no torch form runs
in the backward) and the Triton backward is counted. The runtime on its own: each decay axis with an inclusive and
an exclusive query, an initial state, and log decays with -inf and below-floor steps (their gradient is 0, as the
reference's). Kernels run in the Triton interpreter (tests/conftest.py), so shapes are small.
"""

from __future__ import annotations

import pytest
import torch

import recurrence_dsl
from codegen.specialize import chunked_backward_in_triton
from recurrence_dsl.analysis import TransitionClass, analyse

from .conftest import SPEC_FILES, as_dict, no_torch_forms, weighted_gradients

triton_runtime = pytest.importorskip("codegen.triton_runtime")

SPECS: dict[str, recurrence_dsl.Recurrence] = {}
for _path in SPEC_FILES:
    SPECS.update(recurrence_dsl.load(_path))
EXTRA = recurrence_dsl.load_text("""
recurrence value_gated(q[K], k[K], v[V], g[V]) -> o[V] {
    state S[K, V]
    before[j] = sum(i, k[i] * S[i, j])
    S[i, j] = exp(g[j]) * S[i, j] + k[i] * v[j]
    o[j] = sum(i, q[i] * S[i, j]) + before[j]
}
""", "value_gated.rec")
_DELTA = {TransitionClass.RANK_ONE_UPDATE, TransitionClass.RANK_R_UPDATE, TransitionClass.DIAGONAL_PLUS_RANK_ONE}
# the delta rule's Triton backward has its own file, tests/test_triton_delta_backward.py (the rank-r update's,
# DeltaProduct run as the delta rule, tests/test_delta_product.py)
LINEAR = sorted(n for n, r in SPECS.items() if chunked_backward_in_triton(a := analyse(r.checked))
                and not any(p.cls in _DELTA for p in a.chunk_analysis.states.values()))
B, T, H, CHUNK, SIZE = 1, 37, 2, 16, 16  # chunks of 16 + 16 + 5 steps
TOL = 1e-5
# the torch runtime's chunked functions, as a generated module names them: none may run in a Triton backward


def test_every_linear_spec_is_covered():
    """The specs this file checks: every non-delta spec with a chunked Triton form (a new one joins by itself)."""
    assert {"gla", "hgrn2", "lightning_attention", "linear_attention", "mamba2", "retention", "rwkv6"} <= set(LINEAR)
    assert "delta_net" not in LINEAR and "gated_delta_net" not in LINEAR


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _check_spec(rec, monkeypatch, args=None, initial=None):
    from recurrence_dsl.sampling import sample_arguments

    if args is None:
        sizes = {s: SIZE for s in rec.checked.sizes}
        args, initial = sample_arguments(rec.checked, sizes, B, T, H, dtype=torch.float64, seed=0,
                                         with_initial_state=True)
    ref, weights = weighted_gradients(rec.reference, rec, args, initial)
    layer = recurrence_dsl.compile(rec, backend="triton", form="chunked", chunk_size=CHUNK, tuning=False)
    runs = no_torch_forms(layer, monkeypatch, "_triton_ChunkedLinearFunction")
    init32 = {k: v.float() for k, v in as_dict(initial, rec.checked.states).items()}
    got, _ = weighted_gradients(layer, rec, [a.float() for a in args], init32, weights)
    assert runs, "the chunked Triton form's own backward did not run"
    names = [s.name for s in rec.checked.inputs + rec.checked.params + rec.checked.states]
    errors = {n: _rel(g, r) for n, g, r in zip(names, got, ref)}
    assert max(errors.values()) <= TOL, errors
    return got, ref


@pytest.mark.parametrize("name", LINEAR)
def test_gradients_match_the_reference(name, monkeypatch):
    _check_spec(SPECS[name], monkeypatch)


def test_value_decay_with_an_exclusive_second_readout(monkeypatch):
    """A value-axis decay and two queries in one call, the first exclusive (k read before the update)."""
    rec = EXTRA["value_gated"]
    assert chunked_backward_in_triton(analyse(rec.checked))
    _check_spec(rec, monkeypatch)


def test_minus_infinity_log_decays(monkeypatch):
    """GLA with resets: g = -inf at some steps and -3000 (below the kernels' floor) at others; those steps get a
    zero gradient, as in the reference, and every gradient matches it."""
    from recurrence_dsl.sampling import sample_arguments

    rec = SPECS["gla"]
    args, initial = sample_arguments(rec.checked, {s: SIZE for s in rec.checked.sizes}, B, T, H,
                                     dtype=torch.float64, seed=2, with_initial_state=True)
    g = args[3].clone()
    g[:, 3] = float("-inf")
    g[0, 20, 1, :5] = float("-inf")  # some channels of one head
    g[:, 33] = -3000.0
    args[3] = g
    got, ref = _check_spec(rec, monkeypatch, args, initial)
    assert torch.equal(ref[3][:, 3], torch.zeros_like(ref[3][:, 3]))
    assert torch.equal(got[3][:, 3], torch.zeros_like(got[3][:, 3]))
    assert torch.equal(got[3][:, 33], torch.zeros_like(got[3][:, 33]))


def _reference_steps(queries, k, v, g, axis, h0):
    """The recurrence step by step in float64: S_t = D_t S_{t-1} + k_t v_t^T, o_t = S_t^T q_t (S_{t-1} if exclusive)."""
    S, outs = h0, [[] for _ in queries]
    for t in range(k.shape[1]):
        before = S
        if axis == "scalar":
            S = S * torch.exp(g[:, t])[..., None, None]
        elif axis == "key":
            S = S * torch.exp(g[:, t])[..., None]
        elif axis == "value":
            S = S * torch.exp(g[:, t])[..., None, :]
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
        for out, (q, exclusive) in zip(outs, queries):
            out.append(torch.einsum("bhk,bhkv->bhv", q[:, t], before if exclusive else S))
    return [torch.stack(o, 1) for o in outs], S


@pytest.mark.parametrize("axis", [None, "scalar", "key", "value"])
def test_runtime_every_decay_axis(axis):
    """chunked_linear itself: an inclusive and an exclusive query, K != V, -inf and below-floor log decays."""
    gen = torch.Generator().manual_seed(3)
    Bq, Tq, Hq, K, V = 1, 37, 2, 16, 32

    def rand(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    g = None
    if axis is not None:
        shape = {"scalar": (Bq, Tq, Hq), "key": (Bq, Tq, Hq, K), "value": (Bq, Tq, Hq, V)}[axis]
        g = -torch.rand(shape, generator=gen, dtype=torch.float64)
        g[:, 5] = float("-inf")
        g[:, 21] = -3000.0
    leaves = [rand(Bq, Tq, Hq, K), rand(Bq, Tq, Hq, K), rand(Bq, Tq, Hq, K), rand(Bq, Tq, Hq, V)]
    leaves += ([g] if g is not None else []) + [rand(Bq, Hq, K, V)]
    weights = [rand(Bq, Tq, Hq, V), rand(Bq, Tq, Hq, V), rand(Bq, Hq, K, V)]

    def grads(xs, run):
        xs = [x.clone().requires_grad_() for x in xs]
        q1, q2, k, v = xs[:4]
        outs, final = run([(q1, False), (q2, True)], k, v, xs[4] if g is not None else None, xs[-1])
        loss = sum((o.double() * w).sum() for o, w in zip(outs + [final], weights))
        return torch.autograd.grad(loss, xs)

    ref = grads(leaves, lambda qs, k, v, g_, h0: _reference_steps(qs, k, v, g_, axis, h0))
    got = grads([x.float() for x in leaves], lambda qs, k, v, g_, h0: triton_runtime.chunked_linear(
        qs, k, v, g_, axis, h0, CHUNK, True, allow_tf32=False))
    errors = [_rel(a, b) for a, b in zip(got, ref)]
    assert max(errors) <= TOL, errors
    if g is not None:  # the gradient of a reset step is 0, as in the reference
        for step in (5, 21):
            assert not got[4][:, step].any() and not ref[4][:, step].any()


def test_no_gradient_no_function():
    """Without grad the forward takes the plain path (no autograd node), and its outputs equal the Function's."""
    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 1, 20, 2, 16, generator=gen)
    v = torch.randn(1, 20, 2, 16, generator=gen)
    plain, _ = triton_runtime.chunked_linear([(q, False)], k, v, chunk_size=CHUNK, allow_tf32=False)
    assert plain[0].grad_fn is None
    (tracked,), _ = triton_runtime.chunked_linear([(q.requires_grad_(), False)], k, v, chunk_size=CHUNK,
                                                  allow_tf32=False)
    assert "ChunkedLinearFunction" in type(tracked.grad_fn).__name__
    assert torch.equal(tracked.detach(), plain[0])
