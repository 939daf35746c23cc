"""A diagonal decay whose injection is a sum of r outer products, S_t = D_t S_(t-1) + sum_m k_m v_m^T
(analysis `_plan_sum_of_outer`): by linearity r sub-steps per step, the decay on the first, run by the linear
chunked runtime over a sequence r times as long (codegen/torch_forms.py `_write_sub_steps`).

- the analysis gives such states the chunked and parallel forms (Mamba-3's trapezoidal step with the previous
  step's B and x as inputs, a key-side bias u[i] beside k v^T, a key decay with two injections); `explain` shows
  the r sub-steps; one outer product per state (the user's split of Mamba-3) keeps its plain plans;
- the chunked form against the float64 reference, torch (float64) and Triton (interpreter, float32): outputs, final
  state and the gradients of every input, param and the initial state, dense and packed (cu_seqlens with an empty
  sequence), forward and reverse; the parallel form (the chunked function with one chunk) likewise, packed too.
"""

from __future__ import annotations

import pytest
import torch

import recurrence_dsl
from recurrence_dsl.analysis import TransitionClass, analyse
from recurrence_dsl.cli import describe
from recurrence_dsl.explain import explain
from recurrence_dsl.prove import prove
from recurrence_dsl.sampling import sample_arguments

from .conftest import TESTS, as_dict

DATA = TESTS / "data"
MAMBA3 = recurrence_dsl.load(DATA / "mamba3_shift.rec")["mamba3_shift"]
BIAS = recurrence_dsl.load(DATA / "rank2_inject.rec")["rank2_inject"]
KEY = recurrence_dsl.load(DATA / "key_two_inject.rec")["key_two_inject"]

SPLIT = """
recurrence mamba3_split(x[P], xp[P], dt, lam, B[N], Bp[N], C[N]) -> y[P] {
    param A
    state h1[N, P], h2[N, P]
    a = exp(dt * A)
    h1[n, p] = a * h1[n, p] + lam * dt * B[n] * x[p]
    h2[n, p] = a * h2[n, p] + (1 - lam) * dt * a * Bp[n] * xp[p]
    y[p] = sum(n, C[n] * h1[n, p]) + sum(n, C[n] * h2[n, p])
}
"""


@pytest.mark.parametrize(("rec", "cls", "decay"), [(MAMBA3, TransitionClass.SCALAR, "scalar"),
                                                   (BIAS, TransitionClass.SCALAR, "scalar"),
                                                   (KEY, TransitionClass.DIAGONAL_ROW, "key")],
                         ids=["mamba3", "bias", "key"])
def test_the_sum_is_planned_as_sub_steps(rec, cls, decay):
    a = analyse(rec.checked)
    sa = a.states[rec.checked.states[0].name]
    assert a.forms == ("recurrent", "scan", "chunked", "parallel") and sa.cls is cls, a.unavailable
    subs = sa.chunk.sub_steps
    assert len(subs) == 2 and subs[0].decay_axis == decay and subs[1].log_decay is None
    text = explain(a)
    assert "the injection is a sum of r = 2 outer products" in text and "sub-steps 2t, 2t + 1" in text, text
    assert describe(rec)["states"][0]["chunked_outer_products"] == 2


def test_one_outer_product_per_state_is_unchanged():
    a = analyse(next(iter(recurrence_dsl.load(SPLIT).values())).checked)
    assert a.forms == ("recurrent", "scan", "chunked", "parallel")
    assert all(not sa.chunk.sub_steps for sa in a.states.values())
    assert all("chunked_outer_products" not in s for s in describe(next(iter(recurrence_dsl.load(SPLIT).values())))
               ["states"])


def test_an_injection_that_is_no_sum_of_outer_products_says_so():
    a = analyse(next(iter(recurrence_dsl.load("""
recurrence r(q[K], k[K], v[V], W[K, V]) -> o[V] {
    state S[K, V]
    S[i, j] = 0.5 * S[i, j] + k[i] * v[j] + W[i, j]
    o[j] = sum(i, q[i] * S[i, j])
}
""").values())).checked)
    why = a.unavailable["chunked"]
    assert "is not an outer product k[a] * v[b] nor a sum of them" in why and "W[i, j]" in why, why


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.detach().double() - ref.detach().double()).norm() / ref.detach().double().norm().clamp_min(1e-30)).item()


def _sample(rec, batch, length, seed):
    sizes = {s: (8 if s in ("K", "N") else 6) for s in rec.checked.sizes}
    return sample_arguments(rec.checked, sizes, batch, length, 2, dtype=torch.float64, seed=seed,
                            with_initial_state=True)


def _grads(fn, rec, args, initial, weights, dtype, **call):
    """Outputs, final state and the gradients of every input, param and the initial state of
    sum(w * outputs) + sum(w * final state), run in `dtype`."""
    leaves = [a.detach().to(dtype).requires_grad_() for a in args]
    s0 = initial.detach().to(dtype).requires_grad_()
    out, final = fn(*leaves, initial_state=s0, output_final_state=True, **call)
    out = as_dict(out, rec.checked.outputs)
    loss = sum((out[k].double() * w).sum() for k, w in weights[0].items()) + (final.double() * weights[1]).sum()
    loss.backward()
    return out, final, [x.grad for x in leaves] + [s0.grad]


def _check(rec, backend, form, dtype, tol, batch=2, length=9, seed=0, **call):
    args, initial = _sample(rec, batch, length, seed)
    if "cu_seqlens" in call:  # one row packing the sequences, an initial state for each
        n = len(call["cu_seqlens"]) - 1
        args = [a[:1] if a.dim() > 1 and a.shape[0] == batch and i < len(rec.checked.inputs) else a
                for i, a in enumerate(args)]
        initial = torch.randn((n,) + tuple(initial.shape[1:]), generator=torch.Generator().manual_seed(seed),
                              dtype=torch.float64)
    ref_out, ref_final = rec.reference(*args, initial_state=initial, output_final_state=True, **call)
    gen = torch.Generator().manual_seed(1)
    weights = ({k: torch.randn(v.shape, generator=gen, dtype=torch.float64)
                for k, v in as_dict(ref_out, rec.checked.outputs).items()},
               torch.randn(ref_final.shape, generator=gen, dtype=torch.float64))
    ref = _grads(rec.reference, rec, args, initial, weights, torch.float64, **call)
    layer = recurrence_dsl.compile(rec, backend=backend, form=form, chunk_size=16, tuning=False)
    got = _grads(layer, rec, args, initial, weights, dtype, **call)
    names = ([f"out {n}" for n in ref[0]] + ["final"]
             + [f"d{s.name}" for s in rec.checked.inputs + rec.checked.params] + ["dS0"])
    errors = dict(zip(names, [_rel(got[0][n], ref[0][n]) for n in ref[0]] + [_rel(got[1], ref[1])]
                      + [_rel(g, r) for g, r in zip(got[2], ref[2])], strict=True))
    assert max(errors.values()) <= tol, errors


CASES = [("torch", torch.float64, 1e-10), ("triton", torch.float32, 2e-5)]


@pytest.mark.parametrize("rec", [MAMBA3, BIAS, KEY], ids=["mamba3", "bias", "key"])
@pytest.mark.parametrize(("backend", "dtype", "tol"), CASES, ids=["torch-f64", "triton-f32"])
def test_chunked_form_matches_the_reference(rec, backend, dtype, tol):
    """T = 9 in chunks of 16 sub-steps (a chunk boundary inside step 8); then packed sequences [0, 7, 7, 13] (an
    empty one, each from its own initial state) forward and reverse."""
    _check(rec, backend, "chunked", dtype, tol)
    _check(rec, backend, "chunked", dtype, tol, batch=3, length=13, seed=2,
           cu_seqlens=torch.tensor([0, 7, 7, 13]), reverse=True)


@pytest.mark.parametrize(("backend", "dtype", "tol"), CASES, ids=["torch-f64", "triton-f32"])
def test_parallel_form_matches_the_reference(backend, dtype, tol):
    """The parallel form (the chunked function with one chunk; on Triton attention-style kernels whose packed
    bounds `in_parallel` scales by r)."""
    if backend == "torch":
        _check(KEY, backend, "parallel", dtype, tol, length=7, seed=3)
    _check(MAMBA3, backend, "parallel", dtype, tol, batch=3, length=13, seed=4, cu_seqlens=torch.tensor([0, 6, 6, 13]))


def test_a_sum_over_an_index_is_not_taken_and_says_why():
    """Mamba-3 MIMO's rank-R input: R is a size, not a number of terms written out."""
    a = analyse(next(iter(recurrence_dsl.load("""
recurrence mimo(x[P, R], dt, B[N, R], C[N, R]) -> y[P, R] {
    param A
    state h[N, P]
    h[n, p] = exp(dt * A) * h[n, p] + dt * sum(r, B[n, r] * x[p, r])
    y[p, r] = sum(n, C[n, r] * h[n, p])
}
""").values())).checked)
    why = a.unavailable["chunked"]
    assert "sums outer products over r (size R)" in why and "written out term by term" in why, why


@pytest.mark.parametrize("rec", [BIAS, KEY], ids=["bias", "key"])
def test_prove_shows_the_sub_steps_equal_the_recurrence(rec):
    """`recdsl check --prove` runs the r sub-steps (prove._sub_steps_chunked): chunks of 2 steps (a boundary inside
    a step) and the parallel form's one chunk."""
    results = prove(analyse(rec.checked))
    assert {r.form for r in results} == {"scan", "chunked", "parallel"}
    assert all(r.proved and r.symbolic == r.elements for r in results), [(r.form, r.value, r.verdict) for r in results]
