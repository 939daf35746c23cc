"""The rank-r update class found from ONE assignment of the state (issue 12): DeltaProduct's r Householder
updates per step written as a single expression (locals reading the state through the first update's error, or
the first update's result substituted into the second), tests/data/delta_product_one_assignment.rec.

- the analysis factors the transition into r (I - beta k k^T) factors: r = 2 and 3, no decay, a scalar decay and
  a key-axis decay, the papers' S[V, K] layout; each factor's k, v, beta and decay equal those the
  multi-assignment path (tests/test_delta_product.py) finds for the same layer;
- near misses (no cross term, a wrong cross term, an injection off the keys) keep `general`, and the reason
  says why at the assignment's line:col;
- `show`, `show --json` and `check --prove` say what was found;
- the chunked form against the reference (torch float64 / float32, Triton interpreter float32, forward and the
  gradient of every input and of the initial state) and against the multi-assignment spec's;
- a rank-one delta update of a 3-axis state over the pair of its first two axes (tests/data/pair_delta.rec) is
  `rank-one-update`, chunked with the pair flattened, against the reference; a near miss keeps `general`.
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

from .conftest import TESTS
from .test_delta_product import GATED, KEY_R3, SPEC, TRANSPOSED, _check, _load, _rel, _sample

ONE_PATH = TESTS / "data" / "delta_product_one_assignment.rec"
NEAR_PATH = TESTS / "data" / "delta_product_near_miss.rec"
ONE = recurrence_dsl.load(ONE_PATH)
NEAR = recurrence_dsl.load(NEAR_PATH)

# Each single-assignment layer, the multi-assignment layer with the same inputs, r and the decay axis.
PAIRS = {"product_locals": (SPEC, 2, None), "gated_product_once": (GATED, 2, "scalar"),
         "key_product_once": (_load(KEY_R3), 3, "key"), "product_t_once": (None, 3, None)}


def _plan(rec: recurrence_dsl.Recurrence):
    return analyse(rec.checked).chunk_analysis.states["S"].chunk


@pytest.mark.parametrize("name", list(PAIRS))
def test_one_assignment_is_classed_rank_r(name):
    multi, r, decay = PAIRS[name]
    a = analyse(ONE[name].checked)
    sa = a.states["S"]
    assert a.cls is TransitionClass.RANK_R_UPDATE and sa.rank == r
    assert f"r = {r} rank-one delta updates" in sa.reason and "found by factoring the transition" in sa.reason
    assert a.forms == ("recurrent", "chunked") and "chunked" not in a.unavailable
    plan = _plan(ONE[name])
    assert len(plan.sub_steps) == r and plan.decay_axis == decay
    assert [p.log_decay is not None for p in plan.sub_steps] == [decay is not None] + [False] * (r - 1)
    if multi is None:  # (r = 3 on S[V, K]: against r = 2 of the same layout, its first two updates)
        assert a.transposed == ("S",)
        multi = _load(TRANSPOSED)
    for one, other in zip(plan.sub_steps, _plan(multi).sub_steps):
        assert one.k.expr == other.k.expr and one.v.expr == other.v.expr and one.beta.expr == other.beta.expr
        assert (one.log_decay is None) == (other.log_decay is None)
        assert one.log_decay is None or one.log_decay.expr == other.log_decay.expr


def test_keys_that_are_sums_of_terms_are_found_whole():
    """A feature map `elu(k[i]) + 1` on each key: expanding the transition must not split the keys apart."""
    rec = ONE["featured_product_once"]
    sa = analyse(rec.checked).states["S"]
    assert sa.cls is TransitionClass.RANK_R_UPDATE and sa.rank == 2
    plan = sa.chunk
    assert [str(p.k.expr) for p in plan.sub_steps] == ["elu(k1[a__k]) + 1", "elu(k2[a__k]) + 1"]
    assert [str(p.v.expr) for p in plan.sub_steps] == ["b1*v1[a__v]", "b2*v2[a__v]"]
    _check(rec, "torch", torch.float64, 1e-10)


@pytest.mark.parametrize(("name", "line", "why"), [
    ("both_against_old", 8, "no cross term between k1[i] and k2[i]"),
    ("wrong_cross", 17, "has b1*b2*sum(c, k1[c]*k2[c]) * k2[i] k1[i]^T, the update b2**2*sum(c, k1[c]*k2[c])"),
    ("off_the_keys", 25, "its injection's term k3[i]*v1[j] does not lie along one of the keys"),
])
def test_near_misses_keep_general_with_the_reason(name, line, why):
    a = analyse(NEAR[name].checked)
    sa = a.states["S"]
    assert sa.cls is TransitionClass.GENERAL and a.forms == ("recurrent",)
    assert f"at {line}:5, its transition mixes rows along the 2 keys k1[i], k2[i] but is not a product of 2 (I" \
        in sa.reason
    assert why in sa.reason, sa.reason


def test_show_json_and_prove(capsys):
    assert recdsl_main(["show", str(ONE_PATH), "--json"]) == 0
    shown = {rec["name"]: rec for rec in json.loads(capsys.readouterr().out)["recurrences"]}
    for name, (_, r, _) in PAIRS.items():
        (state,) = shown[name]["states"]
        assert (state["class"], state["rank"]) == ("rank-r-update", r)
        assert "found by factoring the transition of its assignment" in state["reason"]
    assert recdsl_main(["show", str(ONE_PATH), "--name", "gated_product_once"]) == 0
    text = capsys.readouterr().out
    assert "class rank-r-update" in text and "rank r = 2" in text and "D_1 = exp(g)" in text
    assert recdsl_main(["show", str(NEAR_PATH), "--name", "both_against_old"]) == 0
    assert "at 8:5, its transition mixes rows along the 2 keys" in capsys.readouterr().out
    # --prove: the chunked form over the r = 2 sub-steps, exactly equal to the step-by-step composition
    results = prove(analyse(ONE["gated_product_once"].checked))
    assert {(r.form, r.value) for r in results} == {("chunked", "o"), ("chunked", "final S")}
    assert all(r.verdict == "equal (exact)" for r in results), [r.verdict for r in results]


def test_same_numbers_as_the_multi_assignment_spec():
    """Both ways of writing DeltaProduct, every form they have, on the same inputs (torch, float64)."""
    for name in ("product_locals", "gated_product_once", "key_product_once"):
        multi = PAIRS[name][0]
        args, initial = _sample(multi, 2, 7, seed=2)
        ref_out, ref_final = multi.reference(*args, initial_state=initial, output_final_state=True)
        for form in ("recurrent", "chunked"):
            layer = recurrence_dsl.compile(ONE[name], backend="torch", form=form, chunk_size=4, tuning=False)
            out, final = layer(*args, initial_state=initial, output_final_state=True)
            outs = out if isinstance(out, tuple) else (out,)
            refs = ref_out if isinstance(ref_out, tuple) else (ref_out,)
            assert all(_rel(o, ref) < 1e-12 for o, ref in zip(outs, refs)), (name, form)
            assert _rel(final, ref_final) < 1e-12, (name, form)


@pytest.mark.parametrize(("name", "backend", "dtype", "tol"), [
    ("gated_product_once", "torch", torch.float64, 1e-10),
    ("gated_product_once", "torch", torch.float32, 1e-5),
    ("gated_product_once", "triton", torch.float32, 1e-5),
    ("key_product_once", "torch", torch.float64, 1e-10),
    ("key_product_once", "triton", torch.float32, 1e-5),
    ("product_t_once", "torch", torch.float32, 1e-5),
    ("product_t_once", "triton", torch.float32, 1e-5),
], ids=lambda x: getattr(x, "__name__", str(x)).replace("torch.", ""))
def test_chunked_forward_and_gradients_match_the_reference(name, backend, dtype, tol):
    """T = 9 in chunks of 16 sub-steps (r = 3: a chunk boundary inside a step); every gradient."""
    _check(ONE[name], backend, dtype, tol)


def test_the_triton_chunked_form_has_its_own_backward():
    for name in PAIRS:
        assert chunked_backward_in_triton(analyse(ONE[name].checked)), name


# ---------------------------------------------------------------------------------------------------------
# a rank-one delta update of a 3-axis state over its pair (tests/data/pair_delta.rec)
# ---------------------------------------------------------------------------------------------------------

PAIR = recurrence_dsl.load(TESTS / "data" / "pair_delta.rec")

# The update reads the pair through k[c] * k[d] but writes along k[a] * w[b]: no (I - beta k k^T) over the pair.
PAIR_NEAR = """
recurrence pair_near(q[K], k[K], w[K], v[V], beta) -> o[V] {
    state S[K, K, V]
    S[a, b, j] = S[a, b, j] + beta * k[a] * w[b] * (v[j] - sum(c, d, k[c] * k[d] * S[c, d, j]))
    o[j] = sum(a, b, q[a] * q[b] * S[a, b, j])
}
"""


@pytest.mark.parametrize(("name", "decay"), [("pair_delta", None), ("pair_gated_delta", "key")])
def test_a_pair_delta_update_is_rank_one_over_the_flattened_pair(name, decay):
    a = analyse(PAIR[name].checked)
    sa = a.states["S"]
    assert sa.cls is TransitionClass.RANK_ONE_UPDATE and "over its pair (a, b) flattened" in sa.reason
    assert a.forms == ("recurrent", "chunked")
    plan = sa.chunk
    assert plan.pair and plan.beta is not None and plan.decay_axis == decay
    near = analyse(_load(PAIR_NEAR).checked)
    assert near.states["S"].cls is TransitionClass.GENERAL and near.forms == ("recurrent",)
    assert "not a (I - beta k k^T) D rank-one update over the pair" in near.states["S"].reason
    assert "at 4:5" in near.unavailable["chunked"]


@pytest.mark.parametrize(("name", "backend", "dtype", "tol"), [
    ("pair_delta", "torch", torch.float64, 1e-10),
    ("pair_gated_delta", "torch", torch.float32, 1e-5),
    ("pair_gated_delta", "triton", torch.float32, 1e-5),
], ids=lambda x: getattr(x, "__name__", str(x)).replace("torch.", ""))
def test_pair_delta_chunked_matches_the_reference(name, backend, dtype, tol):
    """K = 8: a flattened key axis of 64 (or 8 * 6); forward and every gradient."""
    _check(PAIR[name], backend, dtype, tol)
