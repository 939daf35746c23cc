"""Mistakes a new user makes in a first spec, and what they are told (found by trying the tool from a fresh clone).

Errors: a size only an output uses is named as such, before the body reports it as an index over two sizes; `^`,
`@` and `'` from other notations get a hint; a misspelt declaration (`stat`, `params`) is reported at the word
itself. Warnings (`Recurrence.warnings`, printed on stderr by every command): an input or param never read, a state
never assigned, a state whose value never reaches an output, a temporary never read. No spec in specs/ warns.
"""

from __future__ import annotations

import pytest
import torch

import recurrence_dsl
from recurrence_dsl.cli import main

from .conftest import SPECS_DIR

GLA_BODY = """\
    state S[K, V]
    S[i, j] = exp(g[i]) * S[i, j] + k[i] * v[j]
    o[j] = sum(i, q[i] * S[i, j])
}
"""


def error_of(text: str) -> recurrence_dsl.SpecError:
    with pytest.raises(recurrence_dsl.SpecError) as info:
        recurrence_dsl.load_text(text, "bad.rec")
    return info.value


def test_output_only_size_is_named_before_the_body():
    err = error_of("recurrence gla(q[K], k[K], v[V], g[K]) -> o[M] {\n" + GLA_BODY)
    assert err.message == "size 'M' is used only by outputs, so no argument fixes it"
    assert (err.line, err.column) == (1, 45)
    assert err.hint == "give an input, param or state this dimension"


@pytest.mark.parametrize(("line", "column", "hint"), [
    ("    o[j] = K ^ -0.5 * sum(i, q[i] * S[i, j])", 14, "write a power as x ** y ('^' is not an operator)"),
    ("    o = q @ S", 11, "there is no matrix product: write the contraction with sum, e.g. o[j] = sum(i, q[i] * "
                          "S[i, j])"),
    ("    o[j] = sum(i, q[i] * S'[i, j])", 27, "there is no transpose: index the other way, e.g. S[j, i], or sum "
                                               "over the other axis"),
])
def test_other_notations_get_a_hint(line, column, hint):
    err = error_of("recurrence la(q[K], k[K], v[V]) -> o[V] {\n    state S[K, V]\n"
                   "    S[i, j] = S[i, j] + k[i] * v[j]\n" + line + "\n}\n")
    assert (err.line, err.column, err.hint) == (4, column, hint)
    assert err.message.startswith("unexpected character")


@pytest.mark.parametrize(("word", "meant"), [("stat", "state"), ("states", "state"), ("params", "param"),
                                             ("parm", "param")])
def test_misspelt_declaration_is_reported_at_the_word(word, meant):
    err = error_of(f"recurrence r(x[D]) -> y[D] {{\n    {word} h[D]\n    h[d] = 0.5 * h[d] + x[d]\n"
                   "    y[d] = h[d]\n}\n")
    assert err.message == f"unknown declaration '{word}'"
    assert (err.line, err.column) == (2, 5)
    assert err.hint.startswith(f"did you mean '{meant}'?")
    assert f"^{'~' * (len(word) - 1)}\n" in err.render()


def test_an_assignment_to_an_unrelated_name_keeps_the_plain_message():
    err = error_of("recurrence r(x[D]) -> y[D] {\n    state h[D]\n    hh d = 0.5 * h[d] + x[d]\n    y[d] = h[d]\n}\n")
    assert err.message == "unexpected name 'd', expected '=' or '['"
    assert err.hint is None


def warnings_of(text: str) -> list[tuple[int, int, str]]:
    (rec,) = recurrence_dsl.load_text(text, "w.rec").values()
    return [(w.line, w.column, w.message) for w in rec.warnings]


def test_state_that_never_reaches_an_output():
    text = ("recurrence la(q[K], k[K], v[V]) -> o[V] {\n    state S[K, V], z[K]\n"
            "    S[i, j] = S[i, j] + k[i] * v[j]\n    z[i] = z[i] + k[i]\n    o[j] = sum(i, q[i] * S[i, j])\n}\n")
    assert warnings_of(text) == [(2, 20, "state 'z' never reaches an output: only its final state "
                                         "(output_final_state=True) shows it")]


def test_state_read_through_a_temporary_and_another_state_reaches_the_output():
    # z feeds n, n feeds the output through a temporary: no warning.
    text = ("recurrence la(q[K], k[K], v[V]) -> o[V] {\n    state S[K, V], z[K], n\n"
            "    z[i] = 0.5 * z[i] + k[i]\n    n = n + sum(i, z[i])\n    S[i, j] = S[i, j] + k[i] * v[j]\n"
            "    t = n + 1\n    o[j] = sum(i, q[i] * S[i, j]) / t\n}\n")
    assert warnings_of(text) == []


def test_state_never_assigned_and_inputs_never_read():
    text = "recurrence la(q[K], k[K], v[V]) -> o[V] {\n    param w\n    state S[K, V]\n" \
           "    o[j] = sum(i, q[i] * S[i, j])\n}\n"
    assert warnings_of(text) == [
        (1, 21, "input 'k' is never read"), (1, 27, "input 'v' is never read"), (2, 11, "param 'w' is never read"),
        (3, 11, "state 'S' is never assigned, so every step sees its initial state (zero unless initial_state "
                "gives one)")]


def test_temporary_never_read_suggests_the_name_read():
    text = ("recurrence dn(q[K], k[K], v[V], beta) -> o[V] {\n    state S[K, V]\n"
            "    err[j] = v[j] - sum(i, k[i] * S[i, j])\n    er[j] = 0 * v[j]\n"
            "    S[i, j] = S[i, j] + beta * k[i] * er[j]\n    o[j] = sum(i, q[i] * S[i, j])\n}\n")
    (rec,) = recurrence_dsl.load_text(text, "w.rec").values()
    (warning,) = rec.warnings
    assert (warning.line, warning.column, warning.message) == (3, 5, "temporary 'err' is assigned but never read")
    assert warning.hint == "did you mean 'er'?"


def test_cli_prints_warnings_on_stderr_and_succeeds(tmp_path, capsys):
    spec = tmp_path / "la.rec"
    spec.write_text("recurrence la(q[K], k[K], v[V]) -> o[V] {\n    state S[K, V], z[K]\n"
                    "    S[i, j] = S[i, j] + k[i] * v[j]\n    z[i] = z[i] + k[i]\n"
                    "    o[j] = sum(i, q[i] * S[i, j])\n}\n")
    assert main(["show", str(spec), "--json"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("{") and "warning" not in out
    assert err.splitlines()[:3] == [f"{spec}:2:20: warning: state 'z' never reaches an output: only its final "
                                    "state (output_final_state=True) shows it",
                                    "        state S[K, V], z[K]", "                       ^~~~"]


@pytest.mark.parametrize("path", sorted(SPECS_DIR.glob("*.rec")), ids=lambda p: p.stem)
def test_no_published_spec_warns(path):
    for rec in recurrence_dsl.load(path).values():
        assert rec.warnings == (), [w.render() for w in rec.warnings]


def test_non_linear_reasons_stay_short_and_use_the_step_names():
    """sLSTM (tests/data/slstm.rec) writes each gate out in full: a reason quotes at most 160 characters of it,
    and a state's value from this step as `n_t` (the step lines' name), not the step IR's `n__new`."""
    from recurrence_dsl.analysis import analyse

    from .conftest import TESTS

    (rec,) = recurrence_dsl.load(TESTS / "data" / "slstm.rec").values()
    analysis = analyse(rec.checked)
    reasons = [s.reason for s in analysis.states.values()]
    assert len(reasons) == 4 and all(len(r) < 320 for r in reasons), reasons
    assert not any("__new" in r for r in reasons)
    assert any("1/n_t[d] * c_t[d]" in r for r in reasons)
    assert len(analysis.unavailable["scan"]) < 1400


def test_output_final_state_takes_a_bool_only():
    """A truthy non-bool such as "no" must not quietly return the final states (found by trying the tool)."""
    gla = recurrence_dsl.load(SPECS_DIR / "gla.rec")["gla"]
    q, k, v, g = (torch.randn(1, 3, 1, 2) for _ in range(4))
    for bad in ("no", 1, None):
        with pytest.raises(recurrence_dsl.CallError, match=r"output_final_state must be True .* got"):
            gla.reference(q, k, v, -g.abs(), output_final_state=bad)
    o, final = gla.reference(q, k, v, -g.abs(), output_final_state=False)
    assert o.shape == (1, 3, 1, 2) and final is None


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_forced_parallel_form_with_a_zero_decay_is_named(backend):
    """The parallel form runs the chunked form's prologue: its refusal of a decay that is not positive names it too
    (it named only 'chunked', found by trying the tool)."""
    if backend == "triton":
        pytest.importorskip("triton")
    retention = recurrence_dsl.load(SPECS_DIR / "retention.rec")["retention"]
    layer = recurrence_dsl.compile(retention, tuning=False)
    q = torch.randn(1, 20, 2, 16)
    with pytest.raises(ValueError, match=r"forms 'chunked' and 'parallel' take the logarithm of the decay gamma"):
        layer(q, q, q, torch.tensor([0.0, 0.9]), form="parallel", backend=backend)
    out, _ = layer(q, q, q, torch.tensor([0.0, 0.9]), form="auto", backend=backend)  # auto steps instead
    assert torch.isfinite(out).all()


# -- messages quote expressions in the spec's own syntax, not sympy's (found by trying the tool) -----------------

def _analysis(text: str):
    from recurrence_dsl.analysis import analyse

    (rec,) = recurrence_dsl.load_text(text, "spec.rec").values()
    return analyse(rec.checked)


def test_spec_text_writes_the_language_not_sympy():
    import sympy

    from recurrence_dsl.printing import spec_text
    from recurrence_dsl.step_ir import index_symbol, size_symbol

    k, x = sympy.IndexedBase("k"), sympy.IndexedBase("x")
    i, a1, a3, K = index_symbol("i"), index_symbol("a__1"), index_symbol("a__3"), size_symbol("K")
    beta, h = sympy.Symbol("beta"), sympy.Symbol("h")
    assert spec_text(sympy.Sum(k[i] * x[i], (i, 0, K - 1))) == "sum(i, k[i]*x[i])"
    assert spec_text(sympy.Float(-0.5) * h) == "-0.5*h"
    assert spec_text(sympy.Float(1e-6) + h) == "h + 1e-6"
    assert spec_text(sympy.log(sympy.Float(0.9))) == "-0.1053605157"
    assert spec_text(sympy.zoo * x[i]) == "inf*x[i]" and spec_text(-sympy.oo) == "-inf"
    assert spec_text(sympy.Max(beta, h, sympy.Abs(beta))) == "max(beta, max(h, abs(beta)))"
    # one norm built twice (its summation indices numbered apart) reads once: sqrt(n) * sqrt(n) is n
    norm = [sympy.sqrt(sympy.Sum(k[a] ** 2, (a, 0, K - 1)) + sympy.Float(1e-6)) for a in (a1, a3)]
    assert spec_text(beta / (norm[0] * norm[1])) == "beta/(sum(a, k[a]**2) + 1e-6)"
    # a summation index never takes the name of an index free around it (the language binds none twice)
    assert spec_text(k[index_symbol("a")] * sympy.Sum(k[a1], (a1, 0, K - 1))) == "k[a]*sum(a__0, k[a__0])"


def test_an_undefined_expression_is_quoted_as_written_not_as_sympy_prints_it():
    with pytest.raises(recurrence_dsl.SpecError) as info:
        _analysis("recurrence r(x[D]) -> y[D] {\n    state h[D]\n    h[d] = 0.5 * h[d] + x[d] / (D - D)\n"
                  "    y[d] = h[d]\n}\n")
    err = info.value
    assert "it simplifies to inf*x[d] (inf from a division by zero)" in err.message
    assert "zoo" not in err.message


def test_reasons_quote_numbers_sums_and_functions_as_a_spec_writes_them(capsys, tmp_path):
    negative = _analysis("recurrence r(x[D]) -> y[D] {\n    state h[D]\n    h[d] = -0.5 * h[d] + x[d]\n"
                         "    y[d] = h[d]\n}\n")
    assert negative.states["h"].reason == "h is scaled by the scalar -0.5"
    assert negative.unavailable["chunked"].startswith("the decay -0.5 of h is not positive")
    delta = _analysis("recurrence d(q[K], k[K], v[V], beta) -> o[V] {\n    state S[K, V]\n"
                      "    kn[i] = k[i] / sqrt(sum(a, k[a] * k[a]) + 1e-6)\n"
                      "    u[j] = v[j] - sum(i, kn[i] * S[i, j])\n    S[i, j] = S[i, j] + beta * kn[i] * u[j]\n"
                      "    o[j] = sum(i, q[i] * S[i, j])\n}\n")
    assert "with beta = beta/(sum(a, k[a]**2) + 1e-6), k = k[i], D = 1" in delta.states["S"].reason
    mlstm = ("recurrence m(q[K], k[K], v[V], ig, fg) -> h[V] {\n    state C[K, V], n[K], m\n"
             "    mnew = max(logsigmoid(fg) + m, ig)\n    C[i, j] = exp(logsigmoid(fg) + m - mnew) * C[i, j] + "
             "exp(ig - mnew) * k[i] * v[j]\n    n[i] = exp(logsigmoid(fg) + m - mnew) * n[i] + exp(ig - mnew) * k[i]\n"
             "    m = mnew\n    h[j] = sum(i, q[i] * C[i, j]) / max(abs(sum(i, q[i] * n[i])), exp(-m))\n}\n")
    assert "max() applied to a state: max(ig, m + logsigmoid(fg))" in _analysis(mlstm).states["m"].reason
    path = tmp_path / "m.rec"
    path.write_text(mlstm)
    assert main(["explain", str(path)]) == 0
    out = capsys.readouterr().out
    assert "output h[j] = sum(i, C_t[i, j]*q[i])/max(exp(-m_t), abs(sum(i, n_t[i]*q[i])))" in out
    assert not any(word in out for word in ("Sum(", "Max(", "Abs(", "00000000"))


def test_an_undefined_name_says_how_to_declare_it():
    err = error_of("recurrence delta_undef(q[K], k[K], v[V]) -> o[V] {\n    state S[K, V]\n"
                   "    u[j] = v[j] - sum(i, k[i] * S[i, j])\n    S[i, j] = S[i, j] + beta * k[i] * u[j]\n"
                   "    o[j] = sum(i, q[i] * S[i, j])\n}\n")
    assert (err.message, err.line, err.column) == ("undefined name 'beta'", 4, 25)
    assert err.hint == ("declare it: as an input (a value per step), in the header `recurrence delta_undef(q[K], "
                        "k[K], v[V], beta) -> o[V]`, or as a per-head constant, with a line `param beta` in the body")
    # read indexed: declared with the sizes of its indices
    err = error_of("recurrence r(x[D]) -> y[D] {\n    state h[D]\n    h[d] = w[d] * h[d] + x[d]\n"
                   "    y[d] = h[d]\n}\n")
    assert "header `recurrence r(x[D], w[D]) -> y[D]`" in err.hint and "`param w[D]`" in err.hint
    # a name close to a declared one: the likely typo, as before
    err = error_of("recurrence r(x[D], beta) -> y[D] {\n    state h[D]\n    h[d] = bta * h[d] + x[d]\n"
                   "    y[d] = h[d]\n}\n")
    assert err.hint == "did you mean 'beta'?"
    assert "hint: declare it" in error_of("recurrence r(x[D]) -> y[D] {\n    state h[D]\n"
                                          "    h[d] = zeta * h[d] + x[d]\n    y[d] = h[d]\n}\n").render()


def test_an_index_with_no_range_says_how_to_give_it_one():
    err = error_of("recurrence tr(x[D]) -> y[D] {\n    state h[D]\n    c[e] = 1\n    h[d] = 0.5 * h[d] + x[d]\n"
                   "    y[d] = h[d] + sum(e, c[e])\n}\n")
    assert err.message == "cannot tell the range of index 'e': nothing on the right indexes it"
    assert (err.line, err.column) == (3, 7)
    assert err.hint == ("an index takes its size from a tensor it indexes on the right: read one with it there "
                        "(`c[e] = w[e]`, w an input or param declared `w[N]`); a value the same for every e needs no "
                        "index: write `c = ...`")


@pytest.mark.parametrize(("size", "axis"), [("T", "time"), ("H", "head"), ("B", "batch")])
def test_a_size_named_as_a_call_axis_is_refused_at_the_size(size, axis):
    """`--shape B=..,T=..,H=..` sets the call's batch, time and head axes: a spec size so named could not be told
    apart from them (found by trying the tool: `--shape T=8` set both)."""
    err = error_of(f"recurrence r(q[K], k[K], v[{size}]) -> o[{size}] {{\n    state S[K, {size}]\n"
                   "    S[i, j] = 0.9 * S[i, j] + k[i] * v[j]\n    o[j] = sum(i, q[i] * S[i, j])\n}\n")
    assert err.message == (f"size '{size}' has the name of every call's {axis} axis: a layer's tensors are "
                           "[B, T, H, ...] and --shape B=..,T=..,H=.. sets those, so no spec size may be called B, "
                           "T or H")
    assert (err.line, err.column) == (1, 28)
    assert err.hint == "rename the size, say 'N'"
    # values may have those names (Mamba's input B)
    recurrence_dsl.load_text("recurrence r(x[D], B[N], C[N]) -> y[D] {\n    state h[D, N]\n"
                             "    h[d, n] = 0.5 * h[d, n] + B[n] * x[d]\n    y[d] = sum(n, C[n] * h[d, n])\n}\n",
                             "ok.rec")


def test_a_recurrence_without_inputs_is_a_spec_error():
    """LANGUAGE.md's header takes inputs: a call's B and T come from them. With none, `explain` accepted it and
    `compile` failed with an internal error; now the checker refuses it at the name."""
    err = error_of("recurrence no_inputs() -> y {\n    param a\n    state h\n    h = sigmoid(a) * h + 1\n"
                   "    y = h\n}\n")
    assert err.message.startswith("recurrence 'no_inputs' declares no inputs")
    assert (err.line, err.column) == (1, 12)
    assert err.hint.startswith("add a per-step input, e.g. `recurrence no_inputs(x) -> y`")


def test_a_product_reason_keeps_a_sum_factor_in_parentheses():
    """GRU's (1 - z) * tanh(...) was quoted `1 - sigmoid(...) * tanh(...)`, which reads as another product."""
    from recurrence_dsl.analysis import analyse

    rec = recurrence_dsl.load_text("recurrence g(x[D], z[D]) -> y[D] {\n    state h[D]\n"
                                   "    h[d] = (1 - sigmoid(z[d] + h[d])) * tanh(h[d] + x[d])\n    y[d] = h[d]\n}\n")
    reason = analyse(rec["g"].checked).states["h"].reason
    assert "factors: (1 - sigmoid(" in reason, reason


def test_check_header_without_named_sizes(capsys, tmp_path):
    path = tmp_path / "lit.rec"
    path.write_text("recurrence lit(x[4]) -> y[4] {\n    state h[4]\n    h[d] = 0.5 * h[d] + x[d]\n"
                    "    y[d] = h[d]\n}\n")
    assert main(["check", str(path), "--no-triton", "--no-grad", "--shape", "B=1,T=6,H=1"]) == 0
    assert "lit  (float32 against the float64 reference)" in capsys.readouterr().out


def test_explain_says_a_state_chunks_where_the_recurrence_does_not():
    """A state read through tanh inside the contraction chunks on its own, but its output is no readout: explain
    printed the chunk derivation and then "no chunked form" with nothing between them."""
    from recurrence_dsl.analysis import analyse
    from recurrence_dsl.explain import explain

    rec = recurrence_dsl.load_text("recurrence r(q[K], k[K], v[V], g[K]) -> o[V] {\n    state S[K, V]\n"
                                   "    S[i, j] = exp(g[i]) * S[i, j] + k[i] * v[j]\n"
                                   "    o[j] = sum(i, q[i] * tanh(S[i, j]))\n}\n")["r"]
    text = explain(analyse(rec.checked))
    assert "S alone would chunk as below; the recurrence has no chunked form" in text
    assert text.index("alone would chunk") < text.index("G_t =") < text.index("no chunked form:")
