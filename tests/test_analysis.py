"""The analysis: the transition class of every spec, LANGUAGE.md example and hand-made body, the forms each
class admits (and why the others are not available), readouts before/after the update, and the dataflow graph.

Forms by class (DESIGN.md, "Forms"): recurrent for every class; scan for identity, scalar, diagonal and
elementwise; chunked for identity, scalar, diagonal and rank-one-update; parallel for identity, scalar, diagonal.
"""

from __future__ import annotations

import re

import pytest
import torch

import recurrence_dsl
from recurrence_dsl import dataflow
from recurrence_dsl.analysis import FORMS, TransitionClass, analyse
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPEC_FILES, language_examples

TC = TransitionClass
SPEC_CLASSES = {
    "linear_attention": TC.IDENTITY,
    "normalized_linear_attention": TC.IDENTITY,
    "based": TC.IDENTITY,
    "retention": TC.SCALAR,
    "lightning_attention": TC.SCALAR,
    "mamba2": TC.SCALAR,
    "mamba3": TC.SCALAR,  # its shift states B_last, x_last count for no class
    "gla": TC.DIAGONAL_ROW,
    "hgrn2": TC.DIAGONAL_ROW,
    "rwkv6": TC.DIAGONAL_ROW,
    "rwkv7": TC.DIAGONAL_PLUS_RANK_ONE,
    "mamba": TC.ELEMENTWISE,
    "delta_net": TC.RANK_ONE_UPDATE,
    "gated_delta_net": TC.RANK_ONE_UPDATE,
    "delta_product": TC.RANK_R_UPDATE,
    "indrnn": TC.NON_LINEAR,
    "minimal_rnn": TC.NON_LINEAR,
    "mlstm": TC.SCALAR,  # the matrix memory and its normaliser, both decayed by sigmoid(fg)
    "min_gru": TC.DIAGONAL_ROW,  # a vector state with a per-channel decay: chunked as h[1, D]
    "rg_lru": TC.DIAGONAL_ROW,
    "bidirectional_mamba_forward": TC.ELEMENTWISE,
    "bidirectional_mamba_backward": TC.ELEMENTWISE,
}
EXAMPLE_CLASSES = {
    "gla": TC.DIAGONAL_ROW,
    "retention": TC.SCALAR,
    "mamba2": TC.SCALAR,
    "delta_net": TC.RANK_ONE_UPDATE,
    "rwkv6": TC.DIAGONAL_ROW,
    "normalized_linear_attention": TC.IDENTITY,
}

SCAN = {TC.IDENTITY, TC.SCALAR, TC.DIAGONAL_ROW, TC.DIAGONAL_COL, TC.ELEMENTWISE}
CHUNKED = {TC.IDENTITY, TC.SCALAR, TC.DIAGONAL_ROW, TC.DIAGONAL_COL, TC.RANK_ONE_UPDATE, TC.RANK_R_UPDATE,
           TC.DIAGONAL_PLUS_RANK_ONE}
PARALLEL = {TC.IDENTITY, TC.SCALAR, TC.DIAGONAL_ROW, TC.DIAGONAL_COL}


def expected_forms(cls: TransitionClass) -> tuple[str, ...]:
    admits = {"recurrent": True, "scan": cls in SCAN, "chunked": cls in CHUNKED, "parallel": cls in PARALLEL}
    return tuple(f for f in FORMS if admits[f])


SPECS: dict[str, recurrence_dsl.Recurrence] = {}
for _path in SPEC_FILES:
    SPECS.update(recurrence_dsl.load(_path))

EXAMPLE_BLOCKS, EXAMPLES_FROM = language_examples()
EXAMPLES: dict[str, recurrence_dsl.Recurrence] = {}
for _block in EXAMPLE_BLOCKS:
    EXAMPLES.update(recurrence_dsl.load_text(_block, EXAMPLES_FROM))


def only(text: str) -> recurrence_dsl.Recurrence:
    recs = recurrence_dsl.load_text(text)
    assert len(recs) == 1
    return next(iter(recs.values()))


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def flat(output, final) -> list[torch.Tensor]:
    outs = list(output) if isinstance(output, tuple) else [output]
    finals = [final[k] for k in sorted(final)] if isinstance(final, dict) else [final]
    return outs + finals


def sized(rec) -> dict[str, int]:
    choices = [6, 5, 4, 7]
    return {name: choices[i % len(choices)] for i, name in enumerate(rec.checked.sizes)}


def check_every_form(rec, T: int = 37, chunk: int = 16, tol: float = 1e-10):
    """Every form the layer offers matches the float64 reference (outputs and final states)."""
    args, initial = sample_arguments(rec.checked, sized(rec), 2, T, 2, dtype=torch.float64, seed=5,
                                     with_initial_state=True)
    ref = flat(*rec.reference(*args, initial_state=initial, output_final_state=True))
    layer = recurrence_dsl.compile(rec, backend="torch", chunk_size=chunk)
    assert set(layer.forms) == set(analyse(rec.checked).forms)
    for form in layer.forms:
        got = flat(*layer(*args, initial_state=initial, output_final_state=True, form=form))
        errors = [rel(g, r) for g, r in zip(got, ref, strict=True)]
        assert max(errors) <= tol, (rec.name, form, errors)


def check_forms_and_reasons(analysis) -> None:
    """forms follow from the class; every form not offered has a reason in words that names the class."""
    assert analysis.forms == expected_forms(analysis.cls), (analysis.forms, analysis.cls)
    assert set(analysis.unavailable) == set(FORMS) - set(analysis.forms)
    for form, reason in analysis.unavailable.items():
        assert isinstance(reason, str) and reason.strip(), form
        assert len(re.findall(r"[A-Za-z][A-Za-z-]+", reason)) >= 3, f"{form}: {reason!r} is not a reason in words"
        assert analysis.cls.value in reason, f"{form}: {reason!r} does not name the {analysis.cls.value} class"


# ---------------------------------------------------------------------------------------------------------
# specs and LANGUAGE.md examples
# ---------------------------------------------------------------------------------------------------------


def test_every_spec_has_an_expected_class():
    assert set(SPECS) == set(SPEC_CLASSES)


@pytest.mark.parametrize("name", sorted(SPEC_CLASSES))
def test_spec_class(name):
    analysis = analyse(SPECS[name].checked)
    assert analysis.cls is SPEC_CLASSES[name], [(s.name, s.cls, s.reason) for s in analysis.states.values()]
    for sa in analysis.states.values():
        assert sa.reason.strip()


@pytest.mark.parametrize("name", sorted(SPEC_CLASSES))
def test_spec_forms(name):
    analysis = analyse(SPECS[name].checked)
    check_forms_and_reasons(analysis)
    assert analysis.forms == expected_forms(SPEC_CLASSES[name])
    assert tuple(recurrence_dsl.compile(SPECS[name]).forms) == analysis.forms


def test_every_example_has_an_expected_class():
    assert set(EXAMPLES) == set(EXAMPLE_CLASSES), EXAMPLES_FROM


@pytest.mark.parametrize("name", sorted(EXAMPLE_CLASSES))
def test_example_class_and_forms(name):
    analysis = analyse(EXAMPLES[name].checked)
    assert analysis.cls is EXAMPLE_CLASSES[name]
    check_forms_and_reasons(analysis)


@pytest.mark.parametrize("name", ["indrnn", "minimal_rnn"])
def test_non_linear_specs_say_which_function(name):
    function = {"indrnn": "tanh", "minimal_rnn": "sigmoid"}[name]
    analysis = analyse(SPECS[name].checked)
    assert function in analysis.states["h"].reason
    assert "affine" in analysis.states["h"].reason
    assert function in analysis.unavailable["scan"]


def test_elementwise_reason_names_the_state():
    analysis = analyse(SPECS["mamba"].checked)
    assert "h" in analysis.unavailable["chunked"] and "elementwise" in analysis.unavailable["chunked"]


def test_rank_one_update_explains_parallel():
    analysis = analyse(SPECS["delta_net"].checked)
    assert "rank-one" in analysis.unavailable["parallel"]
    sa = analysis.states["S"]
    assert sa.chunk is not None and sa.chunk.beta is not None and sa.chunk.decay_axis is None
    gated = analyse(SPECS["gated_delta_net"].checked).states["S"]
    assert gated.chunk.decay_axis == "scalar" and gated.chunk.decay_exact


# ---------------------------------------------------------------------------------------------------------
# hand-made bodies
# ---------------------------------------------------------------------------------------------------------

DIAGONAL_COL = """
recurrence value_gated(q[K], k[K], v[V], g[V]) -> o[V] {
    state S[K, V]
    S[i, j] = exp(g[j]) * S[i, j] + k[i] * v[j]
    o[j] = sum(i, q[i] * S[i, j])
}
"""

GENERAL_MIXING = """
recurrence mixing(q[K], k[K], v[V], M[K, K]) -> o[V] {
    state S[K, V]
    S[i, j] = sum(l, M[i, l] * S[l, j]) + k[i] * v[j]
    o[j] = sum(i, q[i] * S[i, j])
}
"""

# S reads z before z's update (z_{t-1}) ...
COUPLED_BEFORE = """
recurrence coupled_before(q[K], k[K], v[V]) -> o[V] {
    state S[K, V], z[K]
    S[i, j] = S[i, j] + z[i] * v[j]
    z[i] = 0.5 * z[i] + k[i]
    o[j] = sum(i, q[i] * S[i, j])
}
"""

# ... or after it (z_t = z_{t-1} + k_t): either way S's update is affine in (S, z) jointly, not in S alone.
COUPLED_AFTER = """
recurrence coupled_after(q[K], k[K], v[V]) -> o[V] {
    state S[K, V], z[K]
    z[i] = 0.5 * z[i] + k[i]
    S[i, j] = S[i, j] + z[i] * v[j]
    o[j] = sum(i, q[i] * S[i, j])
}
"""

NON_LINEAR = {
    "tanh": """
recurrence nl_tanh(x[D]) -> y[D] {
    param w[D]
    state h[D]
    h[d] = tanh(w[d] * h[d] + x[d])
    y[d] = h[d]
}
""",
    "sigmoid": """
recurrence nl_sigmoid(x[D]) -> y[D] {
    state h[D]
    h[d] = sigmoid(h[d]) + x[d]
    y[d] = h[d]
}
""",
    "max": """
recurrence nl_max(x[D]) -> y[D] {
    state h[D]
    h[d] = max(h[d], x[d])
    y[d] = h[d]
}
""",
}

SQUARED = """
recurrence nl_square(x[D]) -> y[D] {
    state h[D]
    h[d] = 0.5 * h[d] * h[d] + x[d]
    y[d] = h[d]
}
"""

DECAY_PRODUCT = {
    "scalar": ("""
recurrence dt_decay(q[K], k[K], v[V], dt) -> o[V] {
    param A
    state S[K, V]
    S[i, j] = exp(dt * A) * S[i, j] + k[i] * v[j]
    o[j] = sum(i, q[i] * S[i, j])
}
""", TC.SCALAR, "scalar"),
    "param-first": ("""
recurrence dt_decay_swapped(q[K], k[K], v[V], dt) -> o[V] {
    param A
    state S[K, V]
    S[i, j] = exp(A * dt) * S[i, j] + dt * k[i] * v[j]
    o[j] = sum(i, q[i] * S[i, j])
}
""", TC.SCALAR, "scalar"),
    "per-row": ("""
recurrence dt_decay_row(q[K], k[K], v[V], dt) -> o[V] {
    param A[K]
    state S[K, V]
    S[i, j] = exp(dt * A[i]) * S[i, j] + k[i] * v[j]
    o[j] = sum(i, q[i] * S[i, j])
}
""", TC.DIAGONAL_ROW, "key"),
}

GATED_DELTA_TWO_STATEMENTS = """
recurrence gated_delta_two_steps(q[K], k[K], v[V], g, beta) -> o[V] {
    state S[K, V]
    S[i, j] = exp(g) * S[i, j]                 # decay first
    u[j] = v[j] - sum(i, k[i] * S[i, j])       # prediction error against the decayed state
    S[i, j] = S[i, j] + beta * k[i] * u[j]     # then the delta rule
    o[j] = K ** -0.5 * sum(i, q[i] * S[i, j])
}
"""

LINEAR_ATTENTION = """
recurrence la(q[K], k[K], v[V]) -> o[V] {
    state S[K, V]
    S[i, j] = S[i, j] + k[i] * v[j]
    o[j] = K ** -0.5 * sum(i, q[i] * S[i, j])
}
"""

WITH_DEAD = """
recurrence la(q[K], k[K], v[V]) -> o[V] {
    state S[K, V]
    unused[j] = 2 * v[j] + sum(i, k[i] * S[i, j])   # reaches nothing
    also_unused[j] = unused[j] * unused[j]          # reads only a dead value
    S[i, j] = S[i, j] + k[i] * v[j]
    o[j] = K ** -0.5 * sum(i, q[i] * S[i, j])
}
"""


def test_diagonal_col():
    rec = only(DIAGONAL_COL)
    analysis = analyse(rec.checked)
    assert analysis.cls is TC.DIAGONAL_COL
    assert "j" in analysis.states["S"].reason
    check_forms_and_reasons(analysis)
    assert analysis.states["S"].chunk.decay_axis == "value"
    check_every_form(rec)


def test_general_row_mixing():
    rec = only(GENERAL_MIXING)
    analysis = analyse(rec.checked)
    assert analysis.cls is TC.GENERAL
    assert "M" in analysis.states["S"].reason
    check_forms_and_reasons(analysis)
    assert analysis.forms == ("recurrent",)
    check_every_form(rec)


@pytest.mark.parametrize("text", [COUPLED_BEFORE, COUPLED_AFTER], ids=["reads-z-before-update",
                                                                     "reads-z-after-update"])
def test_state_coupled_to_another_state_is_general(text):
    rec = only(text)
    analysis = analyse(rec.checked)
    assert analysis.states["S"].cls is TC.GENERAL, analysis.states["S"].reason
    assert "z" in analysis.states["S"].reason
    assert analysis.cls is TC.GENERAL
    check_forms_and_reasons(analysis)


@pytest.mark.parametrize("text", [COUPLED_BEFORE, COUPLED_AFTER], ids=["reads-z-before-update",
                                                                     "reads-z-after-update"])
def test_state_coupled_to_another_state_runs(text):
    """Whatever the class, the recurrent form (and any other the analysis offers) matches the reference."""
    check_every_form(only(text))


@pytest.mark.parametrize("function", sorted(NON_LINEAR))
def test_non_linear_reason_mentions_the_function(function):
    rec = only(NON_LINEAR[function])
    analysis = analyse(rec.checked)
    assert analysis.cls is TC.NON_LINEAR
    reason = analysis.states["h"].reason
    assert function in reason.lower(), reason
    check_forms_and_reasons(analysis)
    assert function in analysis.unavailable["scan"].lower()
    check_every_form(rec)


def test_non_linear_product_of_states():
    rec = only(SQUARED)
    analysis = analyse(rec.checked)
    assert analysis.cls is TC.NON_LINEAR
    reason = analysis.states["h"].reason
    assert "h" in reason and ("product" in reason or "power" in reason), reason
    check_forms_and_reasons(analysis)


@pytest.mark.parametrize("variant", sorted(DECAY_PRODUCT))
def test_decay_written_as_product_with_param(variant):
    text, cls, axis = DECAY_PRODUCT[variant]
    rec = only(text)
    analysis = analyse(rec.checked)
    assert analysis.cls is cls
    check_forms_and_reasons(analysis)
    plan = analysis.states["S"].chunk
    assert plan is not None and plan.decay_axis == axis
    assert plan.decay_exact  # log-decay read off exp(dt * A): no positivity assumption needed
    check_every_form(rec)


def test_gated_delta_in_two_statements_is_rank_one_update():
    rec = only(GATED_DELTA_TWO_STATEMENTS)
    analysis = analyse(rec.checked)
    assert analysis.cls is TC.RANK_ONE_UPDATE, analysis.states["S"].reason
    check_forms_and_reasons(analysis)
    assert analysis.states["S"].chunk.decay_axis == "scalar"
    check_every_form(rec)
    # Same numbers as the one-statement spec.
    spec = SPECS["gated_delta_net"]
    args, initial = sample_arguments(spec.checked, {"K": 6, "V": 5}, 2, 20, 2, dtype=torch.float64, seed=2,
                                     with_initial_state=True)
    a = flat(*spec.reference(*args, initial_state=initial, output_final_state=True))
    b = flat(*rec.reference(*args, initial_state=initial, output_final_state=True))
    assert max(rel(x, y) for x, y in zip(b, a, strict=True)) <= 1e-13
    layer = recurrence_dsl.compile(rec, backend="torch")
    c = flat(*layer(*args, initial_state=initial, output_final_state=True, form="chunked", chunk_size=8))
    assert max(rel(x, y) for x, y in zip(c, a, strict=True)) <= 1e-10


# An erase along e and a write along another key k: S = (D - beta e e^T) S + k v^T. Not a delta rule (whose chunked
# form writes along the erased direction), but D + b a^T with b = -beta e, a = e: the diagonal-plus-rank-one class,
# with D = 1 (no decay: a log decay of 0, the plan's decay absent), a scalar (a constant or exp(g), broadcast along
# the key axis) or a key decay (as RWKV-7). The same erase with the write along e stays a delta rule where D is not
# a key decay (then (D - beta e e^T) is no (I - beta' e e^T) D).
ERASE_WRITE = """
recurrence erase_write(q[K], e[K], k[K], v[V], w[K], beta, g) -> o[V] {{
    state S[K, V]
    S[i, j] = {decay}S[i, j] - beta * e[i] * sum(a, e[a] * S[a, j]) + {write}[i] * v[j]
    o[j] = sum(i, q[i] * S[i, j])
}}
"""
ERASE_WRITE_DECAYS = {"none": ("", None), "constant": ("0.9 * ", "scalar"), "gate": ("exp(g) * ", "scalar"),
                      "key": ("exp(w[i]) * ", "key")}


@pytest.mark.parametrize("decay", sorted(ERASE_WRITE_DECAYS))
def test_erase_and_write_along_different_keys_is_diagonal_plus_rank_one(decay):
    before, axis = ERASE_WRITE_DECAYS[decay]
    rec = only(ERASE_WRITE.format(decay=before, write="k"))
    analysis = analyse(rec.checked)
    sa = analysis.states["S"]
    assert sa.cls is TC.DIAGONAL_PLUS_RANK_ONE, sa.reason
    assert ("no delta rule" in sa.reason) == (decay != "key"), sa.reason  # a key decay never split as (I - ...) D
    check_forms_and_reasons(analysis)
    plan = sa.chunk
    assert plan is not None and plan.decay_axis == axis and plan.beta is None
    assert (plan.log_decay is None) == (axis is None) and plan.decay_exact
    assert str(plan.k.expr) == "k[a__k]" and str(plan.mix_write.expr) == "-beta*e[a__k]"
    assert str(plan.mix_read.expr) == "e[a__k]"
    check_every_form(rec, T=21, chunk=8)
    # the write along the erased key: a delta rule, as before
    delta = analyse(only(ERASE_WRITE.format(decay=before, write="e")).checked)
    assert delta.states["S"].cls is (TC.DIAGONAL_PLUS_RANK_ONE if decay == "key" else TC.RANK_ONE_UPDATE)


def test_dead_temporary_is_found_and_harmless():
    rec, plain = only(WITH_DEAD), only(LINEAR_ATTENTION)
    graph = dataflow.build_dataflow(rec.checked)
    assert sorted(dataflow.dead_temporaries(graph)) == ["also_unused", "unused"]
    assert dataflow.dead_temporaries(dataflow.build_dataflow(plain.checked)) == []
    analysis = analyse(rec.checked)
    assert analysis.cls is TC.IDENTITY
    assert analysis.forms == analyse(plain.checked).forms
    args, initial = sample_arguments(plain.checked, {"K": 6, "V": 5}, 2, 37, 2, dtype=torch.float64, seed=4,
                                     with_initial_state=True)
    want = flat(*plain.reference(*args, initial_state=initial, output_final_state=True))
    got = flat(*rec.reference(*args, initial_state=initial, output_final_state=True))
    assert all(torch.equal(x, y) for x, y in zip(got, want, strict=True))
    layer = recurrence_dsl.compile(rec, backend="torch", chunk_size=16)
    plain_layer = recurrence_dsl.compile(plain, backend="torch", chunk_size=16)
    for form in layer.forms:
        got = flat(*layer(*args, initial_state=initial, output_final_state=True, form=form))
        ref = flat(*plain_layer(*args, initial_state=initial, output_final_state=True, form=form))
        assert max(rel(x, y) for x, y in zip(got, ref, strict=True)) <= 1e-14, form
        assert max(rel(x, y) for x, y in zip(got, want, strict=True)) <= 1e-10, form


@pytest.mark.parametrize("path", SPEC_FILES, ids=[p.stem for p in SPEC_FILES])
def test_specs_have_no_dead_temporaries(path):
    for rec in recurrence_dsl.load(path).values():
        assert dataflow.dead_temporaries(dataflow.build_dataflow(rec.checked)) == []


# ---------------------------------------------------------------------------------------------------------
# readouts and the dataflow graph
# ---------------------------------------------------------------------------------------------------------


def test_before_update_readout_is_exclusive():
    readouts = analyse(SPECS["rwkv6"].checked).outputs["o"].readouts
    assert [r.state for r in readouts] == ["S"]
    assert all(r.exclusive for r in readouts)
    for name in ("gla", "delta_net", "linear_attention", "retention"):
        readouts = analyse(SPECS[name].checked).outputs["o"].readouts
        assert readouts and not any(r.exclusive for r in readouts), name


def test_rwkv6_graph_reads_state_before_update():
    graph = dataflow.build_dataflow(SPECS["rwkv6"].checked)
    output = next(n for n, d in graph.nodes(data=True) if d.get("output"))
    assert graph.edges["S@t-1", output]["when"] == "before update"


def test_delta_net_dataflow():
    graph = dataflow.build_dataflow(SPECS["delta_net"].checked)
    u = next(n for n, d in graph.nodes(data=True) if d.get("target") == "u")
    update = next(n for n, d in graph.nodes(data=True) if d.get("target") == "S")
    output = next(n for n, d in graph.nodes(data=True) if d.get("target") == "o")
    assert graph.nodes[u]["kind"] == "temporary"
    assert graph.has_edge("S@t-1", u) and graph.edges["S@t-1", u]["when"] == "before update"
    assert graph.edges["S@t-1", update]["when"] == "before update"
    assert graph.has_edge(u, update)
    assert graph.edges[update, output]["when"] == "after update"
    assert graph.has_edge(update, "S@t")
    assert graph.nodes[output].get("output")
    dot = dataflow.to_dot(graph)
    assert f'"S@t-1" -> "{u}" [label="before update"];' in dot
    assert dot.startswith('digraph "delta_net"')


# ---------------------------------------------------------------------------------------------------------
# numbers and sizes in a body: constant decays, keys, queries, scales (printed as Python floats)
# ---------------------------------------------------------------------------------------------------------

MATRIX_BODY = """
recurrence r(q[K], k[K], v[V], g) -> o[V] {{
    state S[K, V]
    S[i, j] = {decay} * S[i, j] + {key} * v[j]
    o[j] = {readout}
}}
"""
CONSTANT_PLACES = {
    "number decay": dict(decay="0.9", key="k[i]", readout="sum(i, q[i] * S[i, j])"),
    "rational exp decay": dict(decay="exp(-1 / 8)", key="k[i]", readout="sum(i, q[i] * S[i, j])"),
    "function of a number": dict(decay="sigmoid(2.0)", key="k[i]", readout="sum(i, q[i] * S[i, j])"),
    "size decay": dict(decay="(1 - 1 / K)", key="k[i]", readout="sum(i, q[i] * S[i, j])"),
    "number times exp": dict(decay="0.5 * exp(g)", key="k[i]", readout="sum(i, q[i] * S[i, j])"),
    "sqrt of a size": dict(decay="exp(g)", key="k[i]", readout="sum(i, q[i] * S[i, j]) / sqrt(K)"),
    "constant key": dict(decay="exp(g)", key="1", readout="sum(i, q[i] * S[i, j])"),
    "constant query": dict(decay="exp(g)", key="k[i]", readout="sum(i, S[i, j]) * K ** -0.5"),
    "softplus of a size": dict(decay="exp(g)", key="k[i] / softplus(K)", readout="sum(i, q[i] * S[i, j])"),
}


@pytest.mark.parametrize("place", sorted(CONSTANT_PLACES))
def test_numbers_and_sizes_anywhere_in_the_body(place):
    rec = only(MATRIX_BODY.format(**CONSTANT_PLACES[place]))
    analysis = analyse(rec.checked)
    assert {"recurrent", "scan", "chunked", "parallel"} <= set(analysis.forms), analysis.unavailable
    check_every_form(rec)


@pytest.mark.parametrize("decay", ["0.9", "exp(-1 / 8)", "sigmoid(2.0)", "0.5 * exp(g)"])
def test_a_positive_constant_factor_needs_no_run_time_check(decay):
    rec = only(MATRIX_BODY.format(decay=decay, key="k[i]", readout="sum(i, q[i] * S[i, j])"))
    plan = analyse(rec.checked).states["S"].chunk
    assert plan.decay_exact
    source = recurrence_dsl.compile(rec, backend="torch").source
    assert "\n        _require_positive(" not in source  # the prelude defines it; no form calls it (under check_steps)


@pytest.mark.parametrize("decay", ["-0.5", "-exp(g)", "-0.25 * exp(g)"])
def test_a_constant_decay_that_is_not_positive_has_no_chunked_form(decay):
    rec = only(MATRIX_BODY.format(decay=decay, key="k[i]", readout="sum(i, q[i] * S[i, j])"))
    analysis = analyse(rec.checked)
    assert "chunked" not in analysis.forms and "parallel" not in analysis.forms
    assert "not positive" in analysis.unavailable["chunked"]
    check_every_form(rec)


SCALAR_BODY = """
recurrence r(a) -> y {
    state c
    c = sigmoid(a) * c + 1
    y = c / sqrt(2)
}
"""


def test_constant_injection_and_scale_of_a_scalar_state():
    rec = only(SCALAR_BODY)
    assert "scan" in analyse(rec.checked).forms
    check_every_form(rec)


# ---------------------------------------------------------------------------------------------------------
# the papers' S[V, K] convention: a state read along its second axis is chunked as its transpose
# ---------------------------------------------------------------------------------------------------------

TRANSPOSED = {
    "delta_net": ("""
recurrence r(q[K], k[K], v[V], beta) -> o[V] {
    state S[V, K]
    u[i] = v[i] - sum(j, S[i, j] * k[j])
    S[i, j] = S[i, j] + beta * u[i] * k[j]
    o[i] = sum(j, S[i, j] * q[j])
}
""", TC.RANK_ONE_UPDATE),
    "gated_delta_net": ("""
recurrence r(q[K], k[K], v[V], beta, g) -> o[V] {
    state S[V, K]
    S[i, j] = exp(g) * (S[i, j] - beta * sum(m, S[i, m] * k[m]) * k[j]) + beta * v[i] * k[j]
    o[i] = sum(j, S[i, j] * q[j])
}
""", TC.RANK_ONE_UPDATE),
    "gla": ("""
recurrence r(q[K], k[K], v[V], g[K]) -> o[V] {
    state S[V, K]
    S[i, j] = exp(g[j]) * S[i, j] + v[i] * k[j]
    o[i] = sum(j, S[i, j] * q[j]) + sum(j, S[i, j] * k[j])
}
""", TC.DIAGONAL_COL),
}


@pytest.mark.parametrize("name", sorted(TRANSPOSED))
def test_a_state_read_along_its_second_axis_is_chunked_as_its_transpose(name):
    from recurrence_dsl.prove import prove

    text, cls = TRANSPOSED[name]
    rec = only(text)
    analysis = analyse(rec.checked)
    assert analysis.cls is cls, analysis.states["S"].reason
    assert "chunked" in analysis.forms and analysis.transposed == ("S",)
    assert analysis.chunk_analysis.states["S"].dims == ("K", "V")  # the view holds S^T
    check_every_form(rec)
    for chunk in (8, 64):  # several chunks and a partial one; one chunk holding everything
        check_every_form(rec, chunk=chunk)
    assert all(r.proved for r in prove(analysis)), [r for r in prove(analysis) if not r.proved]
    layer = recurrence_dsl.compile(rec, backend="torch")
    assert "states['S'].transpose(-1, -2)" in layer.source


def test_a_state_chunkable_as_written_is_not_transposed():
    analysis = analyse(SPECS["gla"].checked)
    assert analysis.transposed == () and analysis.chunk_view is None and analysis.chunk_analysis is analysis
