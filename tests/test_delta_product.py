"""The rank-r update class (DeltaProduct, Siems et al. 2025): a state updated by r rank-one delta-rule updates per
step, written as the state assigned r times.

- the analysis finds `rank-r-update` with r = 2 and 3 (a decay on the first update, or written as an assignment of
  its own), through a transposed `S[V, K]` too; bodies that are not r delta updates keep their class, and the
  reason names the assignment at fault at its line:col;
- `recdsl show --json` and `recdsl check --prove` state the class and r;
- specs/delta_product.rec against a plain Python loop written here from the paper's equation;
- the chunked form (the r updates interleaved into the delta rule's WY/UT form) against the reference: torch in
  float64 and float32, Triton (interpreter) in float32, forward and the gradients of every input and the initial
  state, with an initial state, packed sequences (cu_seqlens) and reverse runs.
"""

from __future__ import annotations

import json

import pytest
import torch

import recurrence_dsl
from codegen.specialize import chunked_backward_in_triton
from recurrence_dsl.analysis import TransitionClass, analyse
from recurrence_dsl.cli import main as recdsl_main
from recurrence_dsl.prove import prove
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPECS_DIR, TESTS, as_dict

SPEC = recurrence_dsl.load(SPECS_DIR / "delta_product.rec")["delta_product"]
GATED = recurrence_dsl.load(TESTS / "data" / "gated_delta_product.rec")["gated_delta_product"]

# r = 3, a key-axis decay written as its own assignment (KDA's gate), the readout before and after the updates.
KEY_R3 = """
recurrence key_product(q[K], k1[K], k2[K], k3[K], v1[V], v2[V], v3[V], b1, b2, b3, g[K]) -> o[V], p[V] {
    state S[K, V]
    p[j] = sum(i, q[i] * S[i, j])
    S[i, j] = exp(g[i]) * S[i, j]
    S[i, j] = S[i, j] + b1 * k1[i] * (v1[j] - sum(a, k1[a] * S[a, j]))
    S[i, j] = S[i, j] + b2 * k2[i] * (v2[j] - sum(a, k2[a] * S[a, j]))
    S[i, j] = S[i, j] + b3 * k3[i] * (v3[j] - sum(a, k3[a] * S[a, j]))
    o[j] = sum(i, q[i] * S[i, j])
}
"""

# The papers' layout, S[V, K] read along its second axis.
TRANSPOSED = """
recurrence product_t(q[K], k1[K], k2[K], v1[V], v2[V], b1, b2) -> o[V] {
    state S[V, K]
    u1[i] = v1[i] - sum(j, S[i, j] * k1[j])
    S[i, j] = S[i, j] + b1 * u1[i] * k1[j]
    u2[i] = v2[i] - sum(j, S[i, j] * k2[j])
    S[i, j] = S[i, j] + b2 * u2[i] * k2[j]
    o[i] = sum(j, S[i, j] * q[j])
}
"""


def _load(text: str) -> recurrence_dsl.Recurrence:
    return next(iter(recurrence_dsl.load(text).values()))


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.detach().double() - ref.detach().double()).norm() / ref.detach().double().norm()).item()


# ---------------------------------------------------------------------------------------------------------
# the analysis
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rec", "r", "decay"), [(SPEC, 2, None), (GATED, 2, "scalar"), (_load(KEY_R3), 3, "key"),
                                                 (_load(TRANSPOSED), 2, None)],
                         ids=["delta_product", "gated", "key-r3", "transposed"])
def test_the_rank_r_class_is_found(rec, r, decay):
    a = analyse(rec.checked)
    sa = a.states["S"]
    assert a.cls is TransitionClass.RANK_R_UPDATE and sa.cls is TransitionClass.RANK_R_UPDATE
    assert sa.rank == r and f"r = {r} rank-one delta updates" in sa.reason
    assert a.forms == ("recurrent", "chunked")
    plan = a.chunk_analysis.states["S"].chunk
    assert len(plan.sub_steps) == r and plan.decay_axis == decay
    # only the first update carries the decay
    assert [p.log_decay is not None for p in plan.sub_steps] == [decay is not None] + [False] * (r - 1)


def test_other_bodies_that_assign_a_state_twice_keep_their_class():
    # Both updates use the error against S_(t-1): (I - (b1 k1 + b2 k2) k1^T) S, one rank-one matrix (DPLR).
    dplr = _load("""
recurrence two_writes(q[K], k1[K], k2[K], v1[V], b1, b2) -> o[V] {
    state S[K, V]
    u[j] = v1[j] - sum(i, k1[i] * S[i, j])
    S[i, j] = S[i, j] + b1 * k1[i] * u[j]
    S[i, j] = S[i, j] + b2 * k2[i] * u[j]
    o[j] = sum(i, q[i] * S[i, j])
}
""")
    assert analyse(dplr.checked).states["S"].cls is TransitionClass.DIAGONAL_PLUS_RANK_ONE
    # A delta update then a column-mixing one: general, and the reason names the second assignment's line:col.
    mixed = _load("""
recurrence not_a_product(q[K], k1[K], v1[V], b1, w[V]) -> o[V] {
    state S[K, V]
    S[i, j] = S[i, j] + b1 * k1[i] * (v1[j] - sum(a, k1[a] * S[a, j]))
    S[i, j] = S[i, j] + sum(c, S[i, c] * w[c]) * w[j]
    o[j] = sum(i, q[i] * S[i, j])
}
""")
    sa = analyse(mixed.checked).states["S"]
    assert sa.cls is TransitionClass.GENERAL
    assert "assignment 2 of S (at 5:5)" in sa.reason and "not a rank-one delta update" in sa.reason
    # Two diagonal decays in one step compose as before: no rank-r class for them.
    scalar = _load("""
recurrence twice(k[K], v[V], g) -> o[V] {
    state S[K, V]
    S[i, j] = exp(g) * S[i, j]
    S[i, j] = 0.5 * S[i, j] + k[i] * v[j]
    o[j] = sum(i, k[i] * S[i, j])
}
""")
    assert analyse(scalar.checked).states["S"].cls is TransitionClass.SCALAR


def test_show_json_and_prove_state_the_class_and_r(tmp_path, capsys):
    assert recdsl_main(["show", str(SPECS_DIR / "delta_product.rec"), "--json"]) == 0
    (state,) = json.loads(capsys.readouterr().out)["recurrences"][0]["states"]
    assert (state["class"], state["rank"]) == ("rank-r-update", 2)
    path = tmp_path / "key_product.rec"
    path.write_text(KEY_R3)
    assert recdsl_main(["show", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "class rank-r-update" in shown and "rank r = 3" in shown and "steps 3t, 3t + 1, 3t + 2" in shown
    # --prove: the chunked form over the r = 2 sub-steps, chunks of 3 (boundaries inside steps), exactly equal
    results = prove(analyse(GATED.checked))
    assert {(r.form, r.value) for r in results} == {("chunked", "o"), ("chunked", "final S")}
    assert all(r.verdict == "equal (exact)" for r in results), [r.verdict for r in results]


# ---------------------------------------------------------------------------------------------------------
# the spec against a loop written from the paper
# ---------------------------------------------------------------------------------------------------------


def _paper_loop(q, k1, k2, v1, v2, b1, b2, S0):
    """Siems et al. 2025, Sec. 3: per token, n_h = 2 DeltaNet steps S <- S + beta_j k_j (v_j - S^T k_j)^T, for S
    [K, V]; the output o_t = K^-0.5 S_t^T q_t after both."""
    B, T, H, K = q.shape
    S = S0.clone()
    outs = []
    for t in range(T):
        for k, v, b in ((k1, v1, b1), (k2, v2, b2)):
            kt, vt, bt = k[:, t], v[:, t], b[:, t]  # [B, H, K], [B, H, V], [B, H]
            err = vt - torch.einsum("bhk,bhkv->bhv", kt, S)
            S = S + bt[..., None, None] * kt[..., :, None] * err[..., None, :]
        outs.append(K ** -0.5 * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outs, dim=1), S


def test_the_spec_matches_a_loop_written_from_the_paper():
    B, T, H, K, V = 2, 9, 2, 8, 6
    gen = torch.Generator().manual_seed(0)
    q, k1, k2 = (torch.randn(B, T, H, K, generator=gen, dtype=torch.float64) for _ in range(3))
    k1, k2 = torch.nn.functional.normalize(k1, dim=-1), torch.nn.functional.normalize(k2, dim=-1)
    v1, v2 = (torch.randn(B, T, H, V, generator=gen, dtype=torch.float64) for _ in range(2))
    b1, b2 = (2 * torch.rand(B, T, H, generator=gen, dtype=torch.float64) for _ in range(2))  # in (0, 2)
    S0 = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    o_loop, S_loop = _paper_loop(q, k1, k2, v1, v2, b1, b2, S0)
    layer = recurrence_dsl.compile(SPEC, backend="torch", tuning=False)
    for form in ("recurrent", "chunked"):
        o, S = layer(q, k1, k2, v1, v2, b1, b2, initial_state=S0, output_final_state=True, form=form, chunk_size=4)
        assert _rel(o, o_loop) < 1e-12 and _rel(S, S_loop) < 1e-12, form


# ---------------------------------------------------------------------------------------------------------
# the chunked form against the reference, forward and backward
# ---------------------------------------------------------------------------------------------------------


def _sample(rec, batch, length, heads=2, seed=0):
    sizes = {s: (8 if s == "K" else 6) for s in rec.checked.sizes}
    return sample_arguments(rec.checked, sizes, batch, length, heads, dtype=torch.float64, seed=seed,
                            with_initial_state=True)


def _grads(fn, rec, args, initial, weights, dtype, **call):
    """Outputs, final state and the gradients of every input and the initial state of
    sum(w * outputs) + sum(w * final state), run in `dtype`."""
    leaves = [a.detach().to(dtype).requires_grad_() for a in args]
    s0 = initial.detach().to(dtype).requires_grad_()
    out, final = fn(*leaves, initial_state=s0, output_final_state=True, **call)
    out = as_dict(out, rec.checked.outputs)
    loss = sum((out[k].double() * w).sum() for k, w in weights[0].items()) + (final.double() * weights[1]).sum()
    loss.backward()
    return out, final, [x.grad for x in leaves] + [s0.grad]


def _check(rec, backend, dtype, tol, batch=2, length=9, chunk=16, seed=0, **call):
    """The chunked form against the reference: outputs, final state, every gradient; the worst relative error."""
    args, initial = _sample(rec, batch, length, seed=seed)
    if "cu_seqlens" in call:  # one row packing the sequences, an initial state for each
        args = [a[:1] for a in args]
    ref_out, ref_final = rec.reference(*args, initial_state=initial, output_final_state=True, **call)
    gen = torch.Generator().manual_seed(1)
    weights = ({k: torch.randn(v.shape, generator=gen, dtype=torch.float64)
                for k, v in as_dict(ref_out, rec.checked.outputs).items()},
               torch.randn(ref_final.shape, generator=gen, dtype=torch.float64))
    ref = _grads(rec.reference, rec, args, initial, weights, torch.float64, **call)
    layer = recurrence_dsl.compile(rec, backend=backend, form="chunked", chunk_size=chunk, tuning=False)
    got = _grads(layer, rec, args, initial, weights, dtype, **call)
    names = [f"out {n}" for n in ref[0]] + ["final S"] + [f"d{s.name}" for s in rec.checked.inputs] + ["dS0"]
    errors = dict(zip(names, [_rel(got[0][n], ref[0][n]) for n in ref[0]] + [_rel(got[1], ref[1])]
                      + [_rel(g, r) for g, r in zip(got[2], ref[2])]))
    assert max(errors.values()) <= tol, errors
    return errors


@pytest.mark.parametrize("rec", [GATED, _load(KEY_R3)], ids=["gated", "key-r3"])
@pytest.mark.parametrize(("backend", "dtype", "tol"), [("torch", torch.float64, 1e-10), ("torch", torch.float32, 1e-5),
                                                       ("triton", torch.float32, 1e-5)],
                         ids=["torch-f64", "torch-f32", "triton-f32"])
def test_chunked_forward_and_gradients_match_the_reference(rec, backend, dtype, tol):
    """T = 9 in chunks of 16 sub-steps: 18 (r = 2) or 27 (r = 3, the chunk boundary inside a step) sub-steps."""
    _check(rec, backend, dtype, tol)


@pytest.mark.parametrize(("backend", "dtype", "tol"),
                         [("torch", torch.float64, 1e-10), ("triton", torch.float32, 1e-5)],
                         ids=["torch-f64", "triton-f32"])
def test_packed_sequences_and_reverse_runs(backend, dtype, tol):
    """cu_seqlens [0, 7, 7, 18] (an empty sequence; each from its own initial state), forward and reverse."""
    args, initial = _sample(GATED, 3, 18, seed=3)
    for reverse in (False, True):
        cu = torch.tensor([0, 7, 7, 18])
        packed = [a[:1] for a in args]
        ref_out, ref_final = GATED.reference(*packed, initial_state=initial, output_final_state=True, cu_seqlens=cu,
                                             reverse=reverse)
        layer = recurrence_dsl.compile(GATED, backend=backend, form="chunked", chunk_size=16, tuning=False)
        out, final = layer(*[a.to(dtype) for a in packed], initial_state=initial.to(dtype), output_final_state=True,
                           cu_seqlens=cu, reverse=reverse)
        assert _rel(out, ref_out) <= tol and _rel(final, ref_final) <= tol, reverse
    _check(GATED, backend, dtype, tol, batch=2, length=18, seed=4, cu_seqlens=torch.tensor([0, 11, 18]))
    _check(GATED, backend, dtype, tol, seed=5, reverse=True)


def test_the_triton_chunked_form_has_its_own_backward():
    """The interleaved updates run through chunked_delta_by, an autograd.Function with Triton kernels: no torch
    recompute for the backward (codegen/specialize.py)."""
    for rec in (SPEC, GATED, _load(KEY_R3)):
        assert chunked_backward_in_triton(analyse(rec.checked)), rec.name
