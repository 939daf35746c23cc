"""Every LANGUAGE.md example and every spec parses, checks and runs; the checked form is what the text says."""

from __future__ import annotations

import pytest
import torch

import recurrence_dsl
from recurrence_dsl.check import SymbolKind
from recurrence_dsl.parse import parse_program

from .conftest import (
    LANGUAGE_EXAMPLES_FALLBACK,
    LANGUAGE_MD,
    SPEC_FILES,
    extract_rec_blocks,
    language_examples,
    run_small,
    small_sizes,
    split_fallback,
)

EXAMPLES, EXAMPLES_FROM = language_examples()
EXAMPLE_NAMES = {"gla", "retention", "mamba2", "delta_net", "rwkv6", "normalized_linear_attention"}
SPEC_NAMES = {
    "delta_net", "gated_delta_net", "gla", "hgrn2", "indrnn", "lightning_attention", "linear_attention", "mamba",
    "mamba2", "minimal_rnn", "normalized_linear_attention", "retention", "rwkv6", "rwkv7",
}


def _expected_shapes(rec, batch, length, heads):
    sizes = small_sizes(rec)

    def dims(sym):
        return tuple(sizes[d] if isinstance(d, str) else d for d in sym.dims)

    outs = {o.name: (batch, length, heads) + dims(o) for o in rec.checked.outputs}
    finals = {s.name: (batch, heads) + dims(s) for s in rec.checked.states}
    return outs, finals


def _check_runs(rec, batch=2, length=5, heads=2):
    _, initial, out, final = run_small(rec, batch, length, heads)
    outs, finals = _expected_shapes(rec, batch, length, heads)
    out_t = out if isinstance(out, tuple) else (out,)
    assert [tuple(o.shape) for o in out_t] == list(outs.values())
    for o in out_t:
        assert o.dtype == torch.float64
        assert torch.isfinite(o).all()
    if len(finals) == 1:
        assert isinstance(final, torch.Tensor)
        final = {next(iter(finals)): final}
    assert {k: tuple(v.shape) for k, v in final.items()} == finals
    for v in final.values():
        assert torch.isfinite(v).all()


# -- LANGUAGE.md ----------------------------------------------------------------------------------------------


def test_language_examples_are_found():
    assert len(EXAMPLES) >= 2, EXAMPLES_FROM
    names = set()
    for block in EXAMPLES:
        names |= set(recurrence_dsl.load_text(block))
    assert EXAMPLE_NAMES <= names


def test_committed_copy_of_the_examples_matches_language_md():
    """tests/data/language_examples.rec stands in for LANGUAGE.md when ../shared is absent: keep it in sync."""
    if not LANGUAGE_MD.is_file():
        pytest.skip(f"{LANGUAGE_MD} is not checked out beside the repository")
    assert split_fallback(LANGUAGE_EXAMPLES_FALLBACK.read_text()) == extract_rec_blocks(LANGUAGE_MD.read_text())


def test_committed_copy_of_the_examples_loads_on_its_own():
    blocks = split_fallback(LANGUAGE_EXAMPLES_FALLBACK.read_text())
    names = set()
    for block in blocks:
        names |= set(recurrence_dsl.load_text(block))
    assert EXAMPLE_NAMES <= names


def test_extract_rec_blocks_ignores_other_fences():
    md = "intro\n```text\nrecurrence not_this\n```\n```rec\nA\n```\nmid\n```rec\nB\nC\n```\n"
    assert extract_rec_blocks(md) == ["A\n", "B\nC\n"]


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_language_example_parses_checks_and_runs(index):
    recs = recurrence_dsl.load_text(EXAMPLES[index], f"LANGUAGE.md example {index + 1}")
    assert recs
    for rec in recs.values():
        _check_runs(rec)


def test_language_examples_agree_with_the_spec_library(specs):
    """The examples in LANGUAGE.md and the specs of the same name compute the same thing."""
    for block in EXAMPLES:
        for name, example in recurrence_dsl.load_text(block).items():
            if name not in specs:
                continue
            spec = specs[name]
            assert [(s.name, s.dims) for s in example.checked.inputs] == [(s.name, s.dims) for s in spec.checked.inputs]
            args, initial, out, final = run_small(example, seed=3)
            out2, final2 = spec.reference(*args, initial_state=initial, output_final_state=True)
            torch.testing.assert_close(out2, out, rtol=0, atol=0)
            torch.testing.assert_close(final2, final, rtol=0, atol=0)


# -- the spec library -------------------------------------------------------------------------------------------


def test_spec_library_is_complete():
    assert SPEC_NAMES <= {p.stem for p in SPEC_FILES}


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.stem)
def test_spec_parses_checks_and_runs(path):
    recs = recurrence_dsl.load(path)
    # One recurrence named after the file; a layer made of several passes (a bidirectional layer's forward and
    # reverse recurrence) names each after the file, `<stem>_<pass>`, one direction each.
    if len(recs) == 1:
        assert list(recs) == [path.stem], "a spec file with one recurrence names it after the file"
    else:
        assert all(name.startswith(path.stem + "_") for name in recs), list(recs)
        assert len({rec.checked.reverse for rec in recs.values()}) == 2, "several passes: forward and reverse"
    for rec in recs.values():
        assert rec.checked.source.filename == str(path)
        _check_runs(rec)
        _check_runs(rec, batch=1, length=1, heads=1)


def test_load_accepts_text_path_and_str_path(specs):
    path = next(p for p in SPEC_FILES if p.stem == "delta_net")  # a file of one recurrence named after it
    by_path = recurrence_dsl.load(path)
    by_str = recurrence_dsl.load(str(path))
    by_text = recurrence_dsl.load(path.read_text())
    assert list(by_path) == list(by_str) == list(by_text)
    assert by_path[path.stem].spec_hash == by_text[path.stem].spec_hash
    with pytest.raises(FileNotFoundError):
        recurrence_dsl.load(path.with_name("no_such_spec.rec"))


# -- what the checker makes of the text --------------------------------------------------------------------------


def _syms(group):
    return [(s.name, s.dims) for s in group]


def test_gla_declarations(specs):
    c = specs["gla"].checked
    assert _syms(c.inputs) == [("q", ("K",)), ("k", ("K",)), ("v", ("V",)), ("g", ("K",))]
    assert _syms(c.states) == [("S", ("K", "V"))]
    assert _syms(c.outputs) == [("o", ("V",))]
    assert c.params == () and c.temps == ()
    assert c.sizes == ("K", "V")
    assert [s.target.name for s in c.statements] == ["S", "o"]
    assert [s.indices for s in c.statements] == [("i", "j"), ("j",)]
    assert c.symbol("S").kind is SymbolKind.STATE
    with pytest.raises(KeyError):
        c.symbol("nope")


def test_mamba2_scalar_inputs_and_params(specs):
    c = specs["mamba2"].checked
    assert _syms(c.inputs) == [("x", ("P",)), ("dt", ()), ("B", ("N",)), ("C", ("N",))]
    assert _syms(c.params) == [("A", ()), ("D", ())]
    assert _syms(c.states) == [("h", ("N", "P"))]
    assert c.sizes == ("P", "N")


def test_mamba_sizes_in_order_of_first_declaration(specs):
    c = specs["mamba"].checked
    assert c.sizes == ("D", "N")
    assert _syms(c.params) == [("A", ("D", "N")), ("Dskip", ("D",))]


def test_temporaries_get_their_shapes(specs):
    assert _syms(specs["delta_net"].checked.temps) == [("u", ("V",))]
    c = specs["normalized_linear_attention"].checked
    assert _syms(c.temps) == [("fq", ("K",)), ("fk", ("K",))]
    assert _syms(c.states) == [("S", ("K", "V")), ("z", ("K",))]
    assert all(t.kind is SymbolKind.TEMP for t in c.temps)
    assert _syms(specs["minimal_rnn"].checked.temps) == [("z", ("D",)), ("u", ("D",))]


def test_rwkv6_keeps_statement_order(specs):
    c = specs["rwkv6"].checked
    assert [s.target.name for s in c.statements] == ["o", "S"]
    assert [s.index for s in c.statements] == [0, 1]
    assert _syms(c.params) == [("u", ("K",))]


def test_sum_ranges_are_inferred(specs):
    o = specs["gla"].checked.statements[1]
    # o[j] = K ** -0.5 * sum(i, q[i] * S[i, j]): the sum is the right operand of the product.
    total = o.value.right
    assert [i.name for i in total.indices] == ["i"]
    assert total.ranges == ("K",)


def test_recurrence_text_and_spec_hash():
    one = "recurrence a(x[D]) -> y[D] {\n    y[d] = x[d]\n}\n"
    two = "recurrence b(x[D]) -> y[D] {\n    y[d] = 2 * x[d]\n}\n"
    recs = recurrence_dsl.load_text("# header\n\n" + one + "\n" + two)
    assert list(recs) == ["a", "b"]
    assert recs["a"].checked.text == one
    assert recs["b"].checked.text == two
    # The hash depends on the recurrence's own text only, not on where it sits in a file.
    assert recs["b"].spec_hash == recurrence_dsl.load_text(two)["b"].spec_hash
    assert recs["a"].spec_hash != recs["b"].spec_hash
    assert len(recs["a"].spec_hash) == 16
    assert repr(recs["a"]) == "<Recurrence a(x) -> y>"


def test_spans_point_at_the_source():
    text = "recurrence f(x[D]) -> y[D] {\n    state h[D]\n    h[d] = h[d] + x[d]\n    y[d] = h[d]\n}\n"
    (rec,) = parse_program(text).recurrences
    assert (rec.name_span.line, rec.name_span.column) == (1, 12)
    assert (rec.span.line, rec.span.end_line) == (1, 5)
    assign = rec.statements[1]
    assert (assign.target_span.line, assign.target_span.column) == (3, 5)
    assert assign.value.right.span.column == 19  # x[d]
    assert rec.inputs[0].dims[0].span.column == 16


# -- lexical structure ---------------------------------------------------------------------------------------------


VARIANTS = {
    "comments and blank lines": "# top\n\n\nrecurrence f(x[D]) -> y[D] {   # trailing\n\n    # inside\n"
                                "    y[d] = x[d]   # after\n\n}\n# end\n",
    "whitespace-only lines": "  \t\nrecurrence f(x[D]) -> y[D] {\n    \n    y[d] = x[d]\n  \n}\n   \n   ",
    "indented comment lines": "  # a\nrecurrence f(x[D]) -> y[D] {\n    # b\n\t# c\n    y[d] = x[d]\n    # d\n}\n  # e",
    "no final newline": "recurrence f(x[D]) -> y[D] {\n    y[d] = x[d]\n}",
    "CRLF line ends": "recurrence f(x[D]) -> y[D] {\r\n    y[d] = x[d]\r\n}\r\n",
    "tabs": "recurrence\tf(x[D])\t->\ty[D]\t{\n\ty[d]\t=\tx[d]\n}\n",
    "backslash continuation": "recurrence f(x[D]) -> y[D] {\n    y[d] = x[d] \\\n        * 1\n}\n",
    "one-line body": "recurrence f(x[D]) -> y[D] { y[d] = x[d] }\n",
    "last statement before brace": "recurrence f(x[D]) -> y[D] {\n    y[d] = x[d] }\n",
    "form feed": "\x0c\nrecurrence f(x[D]) -> y[D] {\x0c\n    y[d] = x[d]\n}\n",
    "keyword prefixes are names": "recurrence f(stateful[D], params[D]) -> recurrences[D] {\n"
                                  "    recurrences[d] = stateful[d] + 0 * params[d]\n}\n",
    "no spaces": "recurrence f(x[D])->y[D]{\ny[d]=x[d]\n}\n",
}


@pytest.mark.parametrize("text", VARIANTS.values(), ids=VARIANTS.keys())
def test_lexical_variants_mean_the_same(text):
    (rec,) = recurrence_dsl.load_text(text).values()
    x = torch.randn(1, 3, 1, 4, dtype=torch.float64)
    args = [x] + [torch.zeros_like(x)] * (len(rec.checked.inputs) - 1)
    out, _ = rec.reference(*args)
    torch.testing.assert_close(out, x)


def test_empty_and_comment_only_files_hold_no_recurrence():
    assert recurrence_dsl.load_text("") == {}
    assert recurrence_dsl.load_text("# nothing here\n\n") == {}


def test_number_forms():
    text = "recurrence f(x) -> y {\n    y = x * 0 + 1 + 0.5 + 1e-6 + .25 + 2. + 3E+2 + 1.5e1\n}\n"
    rec = recurrence_dsl.load_text(text)["f"]
    out, _ = rec.reference(torch.zeros(1, 2, 1, dtype=torch.float64))
    torch.testing.assert_close(out, torch.full((1, 2, 1), 1 + 0.5 + 1e-6 + 0.25 + 2.0 + 300 + 15, dtype=torch.float64))


def test_integer_dimensions_and_size_names_as_numbers():
    text = "recurrence f(x[3], w[D]) -> y[3], n {\n    y[i] = 2 * x[i]\n    n = D + 0 * sum(d, w[d])\n}\n"
    rec = recurrence_dsl.load_text(text)["f"]
    assert rec.checked.inputs[0].dims == (3,)
    assert rec.checked.sizes == ("D",)
    x = torch.randn(2, 4, 1, 3, dtype=torch.float64)
    w = torch.randn(2, 4, 1, 7, dtype=torch.float64)
    (y, n), final = rec.reference(x, w, output_final_state=True)
    torch.testing.assert_close(y, 2 * x)
    torch.testing.assert_close(n, torch.full((2, 4, 1), 7.0, dtype=torch.float64))
    assert not final  # no state, so no final state to return


def test_a_non_linear_body_is_a_valid_program(specs):
    # LANGUAGE.md: a body whose state update is not affine still parses, checks and runs.
    rec = recurrence_dsl.load_text("recurrence r(w[D], x[D]) -> y[D] {\n    state h[D]\n"
                                   "    h[d] = tanh(w[d] * h[d] + x[d])\n    y[d] = h[d]\n}\n")["r"]
    _check_runs(rec)
    _check_runs(specs["indrnn"])
    _check_runs(specs["minimal_rnn"])
