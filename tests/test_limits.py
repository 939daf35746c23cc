"""Deep and huge specs (issue 11): each limit of `recurrence_dsl/errors.py` is a spec error at the first place over
it, what lies within it loads, analyses and compiles in bounded time, and no stage recurses past Python's stack.
The command line reports a bug (any other exception) in one line, with the version, and exit status 3."""

from __future__ import annotations

import ast
import time

import pytest

import recurrence_dsl
from codegen.module import module_source
from recurrence_dsl import SpecError
from recurrence_dsl.analysis import analyse
from recurrence_dsl.cli import BUG_EXIT, main
from recurrence_dsl.errors import MAX_DEPTH, MAX_INLINED, MAX_NESTING, MAX_NODES, MAX_RECURRENCES, MAX_SOURCE_CHARS

# Column where the value of `    y = VALUE` starts.
VALUE_COLUMN = 9


def scalar(value: str) -> str:
    return f"recurrence r(x) -> y {{\n    y = {value}\n}}\n"


def stateful(value: str) -> str:
    """A state updated by `value` (which reads h[d] and x[d]): the update is analysed and differentiated."""
    return f"recurrence r(x[D]) -> y[D] {{\n    state h[D]\n    h[d] = {value}\n    y[d] = h[d]\n}}\n"


def spec_error(text: str) -> SpecError:
    """The error of loading and analysing `text` (the inlined size is known only to the analysis)."""
    with pytest.raises(SpecError) as info:
        for rec in recurrence_dsl.load_text(text, "deep.rec").values():
            analyse(rec.checked)
    return info.value


def compiles(text: str) -> str:
    """The generated module of `text`, parsed."""
    analyses = [analyse(r.checked) for r in recurrence_dsl.load_text(text, "deep.rec").values()]
    source = module_source(analyses, "deep.rec")
    ast.parse(source)
    return source


def test_a_thousand_unary_minus_signs_are_an_error_at_the_first_sign_over_the_limit():
    err = spec_error(scalar("-" * 1000 + "x"))
    assert (err.line, err.column) == (2, VALUE_COLUMN + MAX_NESTING)
    assert f"more than {MAX_NESTING}" in err.message and "nests" in err.message
    assert "temporary" in err.hint


def test_a_500_term_sum_is_an_error_not_a_recursion_error():
    err = spec_error(scalar(" + ".join(["x"] * 500)))
    assert recurrence_dsl.load_text(scalar(" + ".join(["x"] * (MAX_DEPTH + 1))))
    assert err.line == 2 and VALUE_COLUMN <= err.column <= len(" + ".join(["x"] * 500)) + VALUE_COLUMN
    assert f"more than {MAX_DEPTH} operations deep" in err.message


@pytest.mark.parametrize("function", ["tanh", "exp", "sigmoid", "-", "abs"])
def test_nesting_beyond_the_limit_points_at_the_first_call_over_it(function):
    opening = f"{function}(" if function != "-" else "-"
    closing = ")" if function != "-" else ""
    err = spec_error(stateful(opening * (MAX_NESTING + 1) + "h[d] + x[d]" + closing * (MAX_NESTING + 1)))
    assert (err.line, err.column) == (3, 12 + MAX_NESTING * len(opening))


def test_nested_tanh_at_the_limit_compiles_in_bounded_time():
    """sympy.tanh asked, on each new tanh(u), whether u is real, through a form doubling with each level: ten nested
    tanh took a minute, sixteen would take an hour. Now the whole module is written in seconds."""
    text = stateful("tanh(" * MAX_NESTING + "h[d] + x[d]" + ")" * MAX_NESTING)
    start = time.perf_counter()
    source = compiles(text)
    assert time.perf_counter() - start < 120
    assert source.count("torch.tanh(") >= 1


def test_a_sum_and_an_alternating_chain_at_the_depth_limit_compile():
    compiles(stateful("0.5 * h[d] + " + " + ".join(["x[d]"] * (MAX_DEPTH - 1))))
    half = MAX_DEPTH // 2 - 1
    compiles(stateful("".join(f"x[d] {'*+'[i % 2]} (" for i in range(half)) + "h[d]" + ")" * half))


def test_an_expression_with_too_many_nodes_is_an_error():
    # 32 products of 32 names: 2047 nodes but only 63 operations deep.
    product = " * ".join(["x"] * 32)
    err = spec_error(scalar(" + ".join([f"({product})"] * 32)))
    assert f"more than {MAX_NODES}" in err.message
    assert (err.line, err.column) == (2, VALUE_COLUMN)


def test_a_huge_file_is_refused_before_parsing_at_the_character_over_the_limit():
    text = scalar(" + ".join(["x"] * (MAX_SOURCE_CHARS // 4)))
    start = time.perf_counter()
    err = spec_error(text)
    assert time.perf_counter() - start < 10
    line_two_starts = text.index("\n") + 1
    assert (err.line, err.column) == (2, MAX_SOURCE_CHARS - line_two_starts + 1)
    assert f"{len(text)} characters, at most {MAX_SOURCE_CHARS}" in err.message
    # The rendered line is a window around the column, not a megabyte.
    assert len(err.render()) < 600


def test_too_many_recurrences_is_an_error_at_the_first_one_over_the_limit():
    one = "recurrence r{}(x[D]) -> y[D] {{\n    y[d] = 0.5 * x[d]\n}}\n"
    assert len(recurrence_dsl.load_text("".join(one.format(i) for i in range(MAX_RECURRENCES)))) == MAX_RECURRENCES
    err = spec_error("".join(one.format(i) for i in range(MAX_RECURRENCES + 5)))
    assert (err.line, err.column) == (3 * MAX_RECURRENCES + 1, 12)
    assert f"at most {MAX_RECURRENCES}" in err.message


def test_a_temporary_that_doubles_each_line_is_an_error_at_the_line_over_the_limit():
    lines = ["recurrence r(x) -> y {", "    t = x"] + ["    t = t * x + t + 1"] * 30 + ["    y = t", "}"]
    err = spec_error("\n".join(lines) + "\n")
    # t has 2**(n+2) - 2 nodes after n reassignments: over MAX_INLINED first at n = 11, on line 2 + 11.
    assert (err.line, err.column) == (13, VALUE_COLUMN)
    assert f"more than {MAX_INLINED}" in err.message
    (rec,) = recurrence_dsl.load_text("\n".join(lines[:12] + lines[-2:]) + "\n").values()
    assert analyse(rec.checked).forms


def test_huge_literals_are_quick_spec_errors_or_infinities():
    start = time.perf_counter()
    err = spec_error(scalar("1" * 5000 + " * x"))
    assert (err.line, err.column) == (2, VALUE_COLUMN) and "too large" in err.message
    (rec,) = recurrence_dsl.load_text(scalar("1e999999 * x")).values()
    assert analyse(rec.checked).forms == ("recurrent",)
    assert time.perf_counter() - start < 30


def test_the_command_line_reports_a_deep_spec_as_a_spec_error(tmp_path, capsys):
    spec = tmp_path / "deep.rec"
    spec.write_text(scalar("-" * 1000 + "x"))
    assert main(["compile", str(spec), "-o", str(tmp_path / "out.py")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{spec}:2:{VALUE_COLUMN + MAX_NESTING}: error: ") and "Traceback" not in err
    assert not (tmp_path / "out.py").exists()


@pytest.fixture
def broken_spec(tmp_path, monkeypatch):
    """A valid spec whose analysis raises (a bug of ours, as `recdsl` sees it). It has a state: every command refuses
    a stateless one before analysing it."""
    spec = tmp_path / "ok.rec"
    spec.write_text(stateful("0.5 * h[d] + x[d]"))

    def broken(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr("recurrence_dsl.cli.analyse", broken)
    return spec


def test_an_internal_error_is_reported_as_a_bug_in_one_line(broken_spec, capsys, monkeypatch):
    spec = broken_spec
    monkeypatch.delenv("RECURRENCE_DSL_DEBUG", raising=False)
    assert main(["show", str(spec)]) == BUG_EXIT
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith(f"recdsl show: internal error (recdsl {recurrence_dsl.__version__}): RecursionError: ")
    assert "bug" in err and "--debug" in err
    assert main(["--debug", "show", str(spec)]) == BUG_EXIT
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("RECURRENCE_DSL_DEBUG", "1")
    assert main(["show", str(spec)]) == BUG_EXIT
    assert "Traceback" in capsys.readouterr().err


def test_recurrence_dsl_debug_off_words_keep_the_traceback_out(broken_spec, capsys, monkeypatch):
    # RECURRENCE_DSL_DEBUG reads as RECURRENCE_DSL_TUNING does: 0, off, false, no (any case, spaces) are off.
    spec = broken_spec
    for off in ("0", "false", "No", " off ", ""):
        monkeypatch.setenv("RECURRENCE_DSL_DEBUG", off)
        assert main(["show", str(spec)]) == BUG_EXIT
        assert "Traceback" not in capsys.readouterr().err, off
    for on in ("1", "yes", "TRUE"):
        monkeypatch.setenv("RECURRENCE_DSL_DEBUG", on)
        assert main(["show", str(spec)]) == BUG_EXIT
        assert "Traceback" in capsys.readouterr().err, on
