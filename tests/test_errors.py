"""Bad programs report the exact line and column; bad calls raise CallError naming the argument and shapes."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import recurrence_dsl
from recurrence_dsl import CallError, SpecError

# Columns below are 1-based and were counted by hand against these lines:
#
#   1  recurrence gla(q[K], k[K], v[V], g[K]) -> o[V] {
#          'gla' at 12, 'q' at 16, 'k' at 22, 'v' at 28, 'g' at 34, ')' at 38, '->' at 40, 'o' at 43, '{' at 48
#   2      state S[K, V]
#          'state' at 5, 'S' at 11, 'K' at 13, 'V' at 16, ']' at 17
#   3      S[i, j] = exp(g[i]) * S[i, j] + k[i] * v[j]
#          'S' at 5, 'i' at 7, '=' at 13, 'exp' at 15, 'g' at 19, 'S' at 27, 'k' at 37, 'v' at 44, 'j' at 46; length 47
#   4      o[j] = K ** -0.5 * sum(i, q[i] * S[i, j])
#          'o' at 5, 'j' at 7, '=' at 10, 'K' at 12, 'sum' at 24, 'i' at 28, 'q' at 31, 'S' at 38; length 45
#   5  }
GLA = """recurrence gla(q[K], k[K], v[V], g[K]) -> o[V] {
    state S[K, V]
    S[i, j] = exp(g[i]) * S[i, j] + k[i] * v[j]
    o[j] = K ** -0.5 * sum(i, q[i] * S[i, j])
}
"""
LINE3 = "    S[i, j] = exp(g[i]) * S[i, j] + k[i] * v[j]\n"
LINE4 = "    o[j] = K ** -0.5 * sum(i, q[i] * S[i, j])\n"

#   1  recurrence mamba2(x[P], dt, B[N], C[N]) -> y[P] {
#   2      param A, D
#   3      state h[N, P]
#   4      h[n, p] = exp(dt * A) * h[n, p] + dt * B[n] * x[p]       'exp' at 15, 'dt' at 19, 'A' at 24
#   5      y[p] = sum(n, C[n] * h[n, p]) + D * x[p]
#   6  }
MAMBA2 = """recurrence mamba2(x[P], dt, B[N], C[N]) -> y[P] {
    param A, D
    state h[N, P]
    h[n, p] = exp(dt * A) * h[n, p] + dt * B[n] * x[p]
    y[p] = sum(n, C[n] * h[n, p]) + D * x[p]
}
"""


def edit(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} must occur exactly once"
    return text.replace(old, new)


@dataclass
class Bad:
    text: str
    line: int
    column: int
    message: str  # a substring of the message
    hint: str | None = None  # a substring of the hint


BAD_PROGRAMS = {
    # -- syntax -------------------------------------------------------------------------------------------------
    "missing ')'": Bad(edit(GLA, "exp(g[i])", "exp(g[i]"), 3, 47,
                       "unexpected end of line, expected ')'", "')' is missing"),
    "missing ']'": Bad(edit(GLA, "state S[K, V]", "state S[K, V"), 2, 17,
                       "unexpected end of line, expected ',' or ']'", "']' is missing"),
    "stray character": Bad(edit(GLA, "+ k[i]", "+ $k[i]"), 3, 37, "unexpected character '$'"),
    "stray semicolon": Bad(edit(GLA, LINE4, LINE4.rstrip() + ";\n"), 4, 46, "unexpected character ';'",
                           "remove the ';'"),
    "comment after a continuing '\\'": Bad(edit(GLA, "S[i, j] +", "S[i, j] \\  # decayed\n        +"), 3, 35,
                                          "unexpected character '\\'", "put the comment on a line of its own"),
    "spaces after a continuing '\\'": Bad(edit(GLA, "S[i, j] +", "S[i, j] \\ \n        +"), 3, 35,
                                         "unexpected character '\\'", "remove the spaces after it"),
    "missing '}'": Bad(edit(GLA, "}\n", ""), 4, 46, "unexpected end of file", "closing '}' missing"),
    "missing '='": Bad(edit(GLA, "S[i, j] = exp", "S[i, j] exp"), 3, 13, "unexpected name 'exp', expected '='"),
    "'==' instead of '='": Bad(edit(GLA, "o[j] = K", "o[j] == K"), 4, 11, "unexpected '='",
                               "'==' is not an operator"),
    "missing '->'": Bad(edit(GLA, ") -> o[V]", ") o[V]"), 1, 40, "unexpected name 'o', expected '->'"),
    "missing '{'": Bad(edit(GLA, "o[V] {", "o[V]"), 1, 47, "unexpected end of line", None),
    "extra '}'": Bad(GLA + "}\n", 6, 1, "unexpected '}', expected 'recurrence'"),
    "state without a name": Bad(edit(GLA, "state S[K, V]", "state"), 2, 10, "expected a name"),
    "two operators": Bad(edit(GLA, "+ k[i]", "+ * k[i]"), 3, 37, "unexpected '*'"),
    "a number cannot be a target": Bad(edit(GLA, "    o[j] = K", "    1 = K"), 4, 5, "unexpected number 1"),
    "tab indentation counts one column": Bad(edit(GLA, LINE3, "\tS[i, j] = expp(g[i]) * S[i, j]\n"), 3, 12,
                                             "unknown function 'expp'", "did you mean 'exp'?"),
    # -- names and declarations --------------------------------------------------------------------------------
    "undefined name": Bad(edit(GLA, "+ k[i]", "+ kk[i]"), 3, 37, "undefined name 'kk'", "did you mean 'k'?"),
    "undefined scalar": Bad(edit(GLA, "K ** -0.5", "KK ** -0.5"), 4, 12, "undefined name 'KK'",
                            "did you mean 'K'?"),
    "state declared twice": Bad(edit(GLA, "state S[K, V]", "state S[K, V], S[K]"), 2, 20, "'S' is declared twice",
                                "first declared as state at line 2, column 11"),
    "input declared twice": Bad(edit(GLA, "k[K], v[V]", "q[K], v[V]"), 1, 22, "'q' is declared twice",
                                "first declared as input at line 1, column 16"),
    "recurrence defined twice": Bad(GLA + GLA, 6, 12, "recurrence 'gla' is defined twice",
                                    "first defined at line 1"),
    "a size cannot also name a value": Bad(edit(GLA, "state S[K, V]", "state S[K, V], K"), 2, 20,
                                           "'K' is already a size name"),
    "size fixed by no argument": Bad("recurrence f(x[D]) -> y[D], z[M] {\n    y[d] = x[d]\n    z[m] = 1\n}\n", 1, 31,
                                     "size 'M' is used only by outputs"),
    "dimension zero": Bad(edit(GLA, "state S[K, V]", "state S[K, 0]"), 2, 16, "a dimension must be at least 1, got 0"),
    # -- assignments --------------------------------------------------------------------------------------------
    "assignment to an input": Bad(edit(GLA, LINE4, "    q[i] = 2 * q[i]\n" + LINE4), 4, 5,
                                  "cannot assign to input 'q'", "read-only"),
    "assignment to a param": Bad(edit(MAMBA2, "    state h", "    A = 1\n    state h"), 3, 5,
                                 "cannot assign to param 'A'", "read-only"),
    "assignment to a size": Bad(edit(GLA, LINE4, "    K = 1\n" + LINE4), 4, 5, "cannot assign to size 'K'"),
    "output assigned twice": Bad(edit(GLA, LINE4, LINE4 + "    o[j] = v[j]\n"), 5, 5,
                                 "output 'o' is assigned more than once", "first assigned at line 4"),
    "output never assigned": Bad(edit(GLA, LINE4, ""), 1, 43, "output 'o' is never assigned",
                                 "add a line 'o[i] = ...'"),
    "state assigned before it is declared": Bad(edit(GLA, "    state S[K, V]\n" + LINE3, LINE3 + "    state S[K, V]\n"),
                                                2, 27, "state 'S' is read before it is declared",
                                                "move 'state S' above this line"),
    "temporary read before it is assigned": Bad(edit(GLA, LINE4, "    o[j] = t[j]\n    t[j] = v[j]\n"), 4, 12,
                                                "'t' is read before it is assigned", "it is assigned at line 5"),
    "param read before it is declared": Bad(edit(MAMBA2, "    param A, D\n    state h[N, P]\n",
                                                 "    state h[N, P]\n    z = A\n    param A, D\n"), 3, 9,
                                            "param 'A' is read before it is declared", "move 'param A'"),
    # -- indices -----------------------------------------------------------------------------------------------
    "one index, two ranges": Bad(edit(GLA, "k[i] * v[j]", "k[i] * v[i]"), 3, 46,
                                 "index 'i' ranges over V here but over K at line 3, column 7"),
    "free index not bound by the target": Bad(edit(GLA, "k[i] * v[j]", "k[i] * v[m]"), 3, 46,
                                              "free index 'm' is not bound by the target or a sum", "sum(m, ...)"),
    "too many indices": Bad(edit(GLA, "exp(g[i])", "exp(g[i, j])"), 3, 19,
                            "input 'g' has 1 dimension [K] but is indexed with 2 indices", "write g[i]"),
    "too few indices": Bad(edit(GLA, "* S[i, j] +", "* S[i] +"), 3, 27,
                           "state 'S' has 2 dimensions [K, V] but is indexed with 1 index", "write S[i, j]"),
    "target with too many indices": Bad(edit(GLA, "o[j] = K", "o[i, j] = K"), 4, 5,
                                        "output 'o' has 1 dimension [V] but is assigned with 2 indices"),
    "integer index": Bad(edit(GLA, "q[i] * S", "q[0] * S"), 4, 33, "a number cannot index a tensor"),
    "integer index in the target": Bad(edit(GLA, "o[j] = K", "o[0] = K"), 4, 7,
                                       "an assignment's indices must be index names"),
    "scalar indexed": Bad(edit(MAMBA2, "exp(dt * A)", "exp(dt[n] * A)"), 4, 19,
                          "input 'dt' is a scalar and cannot be indexed", "without brackets"),
    "tensor not indexed": Bad(edit(GLA, "+ k[i]", "+ k"), 3, 37, "input 'k' has 1 dimension [K] and must be indexed",
                              "write k[i]"),
    "sum index already bound": Bad(edit(GLA, "sum(i, q[i]", "sum(j, q[j]"), 4, 28, "index 'j' is already bound here",
                                   "use a different index name"),
    "index used as a value": Bad(edit(GLA, "o[j] = K", "o[j] = j"), 4, 12, "index 'j' cannot be used as a value"),
    "index with no range": Bad(edit(GLA, LINE4, "    t[m] = 1\n" + LINE4), 4, 7,
                               "cannot tell the range of index 'm'"),
    "size indexed": Bad(edit(GLA, "K ** -0.5", "K[j] ** -0.5"), 4, 12, "size 'K' cannot be indexed"),
    "index appears twice in the target": Bad(edit(GLA, "S[i, j] = exp", "S[i, i] = exp"), 3, 10,
                                             "index 'i' appears twice in the target"),
    # -- functions ---------------------------------------------------------------------------------------------
    "unknown function": Bad(edit(GLA, "exp(g[i])", "expp(g[i])"), 3, 15, "unknown function 'expp'",
                            "did you mean 'exp'?"),
    "max with one argument": Bad(edit(GLA, "exp(g[i])", "max(g[i])"), 3, 15, "max() takes 2 arguments, got 1"),
    "min with three arguments": Bad(edit(GLA, "exp(g[i])", "min(g[i], 0, 1)"), 3, 15,
                                    "min() takes 2 arguments, got 3"),
    "exp with two arguments": Bad(edit(GLA, "exp(g[i])", "exp(g[i], 1)"), 3, 15, "exp() takes 1 argument, got 2"),
    "an input called like a function": Bad(edit(GLA, "+ k[i]", "+ k(i)"), 3, 37, "'k' is an input, not a function",
                                           "index it with [ ]"),
    "sum without an index": Bad(edit(GLA, "sum(i, q[i] * S[i, j])", "sum(q[i] * S[i, j])"), 4, 24,
                                "sum() takes one or more index names", "sum(i, x[i])"),
    # -- names the generated Python or the calling convention needs -------------------------------------------------
    "input named like a call keyword": Bad(edit(GLA, "v[V], g[K])", "v[V], form)"), 1, 34,
                                           "'form' is a keyword of every layer's call", "'form_'"),
    "recurrence named a Python keyword": Bad(edit(GLA, "recurrence gla(", "recurrence lambda("), 1, 12,
                                             "'lambda' is a Python keyword", "'lambda_'"),
    "temporary named a Python keyword": Bad(edit(GLA, LINE4, "    pass = 1\n" + LINE4), 4, 5,
                                            "'pass' is a Python keyword"),
}


def _error_of(text: str, filename: str = "bad.rec") -> SpecError:
    with pytest.raises(SpecError) as info:
        recurrence_dsl.load_text(text, filename)
    return info.value


def test_there_are_many_distinct_bad_programs():
    assert len(BAD_PROGRAMS) >= 15
    assert len({b.text for b in BAD_PROGRAMS.values()}) == len(BAD_PROGRAMS)


def test_the_base_programs_are_valid():
    assert list(recurrence_dsl.load_text(GLA)) == ["gla"]
    assert list(recurrence_dsl.load_text(MAMBA2)) == ["mamba2"]


@pytest.mark.parametrize("bad", BAD_PROGRAMS.values(), ids=BAD_PROGRAMS.keys())
def test_bad_program_reports_exact_position(bad):
    err = _error_of(bad.text)
    assert (err.span.line, err.span.column) == (bad.line, bad.column), err.render()
    assert (err.line, err.column) == (bad.line, bad.column)
    assert bad.message in err.message, err.render()
    if bad.hint is not None:
        assert err.hint is not None and bad.hint in err.hint, err.render()


@pytest.mark.parametrize("bad", BAD_PROGRAMS.values(), ids=BAD_PROGRAMS.keys())
def test_render_puts_the_caret_under_the_column(bad):
    err = _error_of(bad.text)
    lines = err.render().split("\n")
    assert lines[0] == f"bad.rec:{bad.line}:{bad.column}: error: {err.message}"
    source_line = bad.text.split("\n")[bad.line - 1]
    assert lines[1] == "    " + source_line
    caret = lines[2]
    assert caret.index("^") == 4 + bad.column - 1
    assert set(caret[: caret.index("^")]) <= {" ", "\t"}
    assert set(caret[caret.index("^") + 1:]) <= {"~"}
    if err.hint:
        assert lines[3] == f"hint: {err.hint}"
    else:
        assert len(lines) == 3
    assert str(err) == err.render()


def test_render_of_an_unknown_function_in_full():
    err = _error_of(edit(GLA, "exp(g[i])", "expp(g[i])"), "specs/gla.rec")
    assert err.render() == (
        "specs/gla.rec:3:15: error: unknown function 'expp'\n"
        "        S[i, j] = expp(g[i]) * S[i, j] + k[i] * v[j]\n"
        "                  ^~~~\n"
        "hint: did you mean 'exp'?"
    )


def test_render_keeps_tabs_so_the_caret_lines_up():
    err = _error_of(edit(GLA, LINE3, "\tS[i, j] = expp(g[i]) * S[i, j]\n"))
    assert err.render().split("\n")[2] == "    \t" + " " * 10 + "^~~~"


def test_render_at_end_of_line_and_end_of_file():
    err = _error_of(edit(GLA, "exp(g[i])", "exp(g[i]"))
    assert err.render().split("\n")[2] == "    " + " " * 46 + "^"
    err = _error_of(edit(GLA, "}\n", ""))
    assert err.render().split("\n")[2] == "    " + " " * 45 + "^"


def test_control_characters_do_not_shift_the_rendered_line():
    # A form feed or NEL inside a comment is not a line break for the parser, nor for the message.
    for junk in ("\x0c", "\x85", "\u2028", "\x0b"):
        text = f"# page{junk}break\n" + edit(GLA, "+ k[i]", "+ kk[i]")
        err = _error_of(text)
        assert (err.line, err.column) == (4, 37)
        assert err.render().split("\n")[1] == "    " + edit(LINE3, "+ k[i]", "+ kk[i]").rstrip("\n")


def test_crlf_source_renders_without_carriage_returns():
    err = _error_of(edit(GLA, "+ k[i]", "+ kk[i]").replace("\n", "\r\n"))
    assert (err.line, err.column) == (3, 37)
    assert "\r" not in err.render()


def test_unprintable_stray_character_is_escaped_in_the_message():
    err = _error_of(edit(GLA, "+ k[i]", "+ \x00k[i]"))
    assert (err.line, err.column) == (3, 37)
    assert err.message == "unexpected character '\\x00'"


def test_errors_from_a_file_carry_its_name(tmp_path):
    path = tmp_path / "broken.rec"
    path.write_text(edit(GLA, "+ k[i]", "+ kk[i]"))
    with pytest.raises(SpecError) as info:
        recurrence_dsl.load(path)
    assert info.value.render().startswith(f"{path}:3:37: error: undefined name 'kk'")


# -- call-time errors -------------------------------------------------------------------------------------------

B, T, H, K, V = 2, 4, 2, 4, 3


def _t(*shape):
    return torch.randn(*shape, dtype=torch.float64)


@pytest.fixture
def gla():
    return recurrence_dsl.load_text(GLA)["gla"]


@pytest.fixture
def gla_args():
    return [_t(B, T, H, K), _t(B, T, H, K), _t(B, T, H, V), -torch.rand(B, T, H, K, dtype=torch.float64)]


def _call_error(fn, *args, **kwargs) -> str:
    with pytest.raises(CallError) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def test_call_wrong_rank(gla, gla_args):
    q, k, v, g = gla_args
    msg = _call_error(gla.reference, q, k, v, g[0])
    assert "input 'g'" in msg and "[B, T, H, K]" in msg and "[4, 2, 4]" in msg


def test_call_wrong_batch_length_or_heads(gla, gla_args):
    q, k, v, g = gla_args
    msg = _call_error(gla.reference, q, k, v[:, :2], g)
    assert "input 'v'" in msg and "[B, T, H, V]" in msg and "T=4" in msg and "[2, 2, 2, 3]" in msg


def test_call_size_mismatch_between_arguments(gla, gla_args):
    q, _, v, g = gla_args
    msg = _call_error(gla.reference, q, _t(B, T, H, 5), v, g)
    # K is 4 from q and 5 from k: both arguments, both numbers and the shape are named.
    assert "size K" in msg and "input 'q'" in msg and "input 'k'" in msg
    assert "4" in msg and "5" in msg and "[B, T, H, K]" in msg and "[2, 4, 2, 5]" in msg
    assert "from input 'q' (shape [2, 4, 2, 4])" in msg  # the first argument's shape too: either may be the wrong one


def test_call_size_mismatch_with_a_param():
    rwkv6 = recurrence_dsl.load_text("recurrence r(k[K], v[V]) -> o[V] {\n    param u[K]\n"
                                     "    o[j] = sum(i, u[i] * k[i] * v[j])\n}\n")["r"]
    msg = _call_error(rwkv6.reference, _t(1, 2, H, K), _t(1, 2, H, V), _t(H, K + 1))
    assert "param 'u'" in msg and "input 'k'" in msg and "[H, K]" in msg and "[2, 5]" in msg


def test_call_integer_dimension_mismatch():
    rec = recurrence_dsl.load_text("recurrence f(x[3]) -> y[3] {\n    y[i] = x[i]\n}\n")["f"]
    msg = _call_error(rec.reference, _t(1, 2, 1, 4))
    assert "input 'x'" in msg and "[B, T, H, 3]" in msg and "[1, 2, 1, 4]" in msg


def test_call_param_with_wrong_heads():
    mamba2 = recurrence_dsl.load_text(MAMBA2)["mamba2"]
    args = [_t(1, 3, H, 4), torch.rand(1, 3, H, dtype=torch.float64), _t(1, 3, H, 2), _t(1, 3, H, 2)]
    msg = _call_error(mamba2.reference, *args, _t(H), _t(H + 1))
    assert "param 'D'" in msg and "[H]" in msg and "[3]" in msg and "H=2" in msg


def test_call_missing_argument(gla, gla_args):
    msg = _call_error(gla.reference, *gla_args[:3])
    assert "missing" in msg and "g" in msg


def test_call_unknown_keyword(gla, gla_args):
    msg = _call_error(gla.reference, *gla_args, gg=gla_args[3])
    assert "unexpected keyword argument 'gg'" in msg


def test_call_argument_by_position_and_by_name(gla, gla_args):
    msg = _call_error(gla.reference, *gla_args, q=gla_args[0])
    assert "'q'" in msg and "both" in msg


def test_call_too_many_positional_arguments(gla, gla_args):
    msg = _call_error(gla.reference, *gla_args, gla_args[0])
    assert "takes 4" in msg and "got 5" in msg


def test_call_non_tensor_and_integer_arguments(gla, gla_args):
    q, k, v, g = gla_args
    assert "'g'" in _call_error(gla.reference, q, k, v, g.tolist())
    assert "'g'" in _call_error(gla.reference, q, k, v, g.to(torch.int64))


def test_cu_seqlens_needs_batch_one(gla, gla_args):
    msg = _call_error(gla.reference, *gla_args, cu_seqlens=torch.tensor([0, 1, 4]))
    assert "cu_seqlens" in msg and "B == 1" in msg and "B=2" in msg


@pytest.mark.parametrize("bounds, words", [
    ([0, 1, 3], ["end at T=4", "[0, 1, 3]"]),
    ([1, 2, 4], ["start at 0", "[1, 2, 4]"]),
    ([0, 3, 2, 4], ["non-decreasing", "[0, 3, 2, 4]"]),
    ([4], ["at least two"]),
])
def test_bad_cu_seqlens(gla, gla_args, bounds, words):
    args = [a[:1] for a in gla_args]
    msg = _call_error(gla.reference, *args, cu_seqlens=torch.tensor(bounds))
    assert "cu_seqlens" in msg
    for word in words:
        assert word in msg


def test_float_cu_seqlens(gla, gla_args):
    args = [a[:1] for a in gla_args]
    assert "integer" in _call_error(gla.reference, *args, cu_seqlens=torch.tensor([0.0, 4.0]))


def test_initial_state_rows_must_match_the_sequences(gla, gla_args):
    args = [a[:1] for a in gla_args]
    msg = _call_error(gla.reference, *args, cu_seqlens=torch.tensor([0, 1, 4]), initial_state=_t(1, H, K, V))
    assert "initial_state" in msg and "[N, H, K, V]" in msg and "N=2" in msg and "[1, 2, 4, 3]" in msg


def test_initial_state_rows_must_match_the_batch(gla, gla_args):
    msg = _call_error(gla.reference, *gla_args, initial_state=_t(B + 1, H, K, V))
    assert "initial_state" in msg and "[B, H, K, V]" in msg and "B=2" in msg and "[3, 2, 4, 3]" in msg


def test_initial_state_size_mismatch(gla, gla_args):
    msg = _call_error(gla.reference, *gla_args, initial_state=_t(B, H, K, V + 1))
    assert "initial_state" in msg and "size V" in msg and "[2, 2, 4, 4]" in msg


def test_initial_state_dict_keys():
    nla = recurrence_dsl.load_text("recurrence n(k[K], v[V]) -> o[V] {\n    state S[K, V], z[K]\n"
                                   "    S[i, j] = S[i, j] + k[i] * v[j]\n    z[i] = z[i] + k[i]\n"
                                   "    o[j] = sum(i, z[i] * S[i, j])\n}\n")["n"]
    k, v = _t(1, 2, H, K), _t(1, 2, H, V)
    S, z = _t(1, H, K, V), _t(1, H, K)
    assert "dict" in _call_error(nla.reference, k, v, initial_state=S)
    # a state left out starts at zero (docs/language.md, "Calling convention")
    torch.testing.assert_close(nla.reference(k, v, initial_state={"S": S})[0],
                               nla.reference(k, v, initial_state={"S": S, "z": torch.zeros_like(z)})[0])
    assert "'w'" in _call_error(nla.reference, k, v, initial_state={"S": S, "z": z, "w": z})
    msg = _call_error(nla.reference, k, v, initial_state={"S": S, "z": _t(1, H, K + 1)})
    assert "initial_state['z']" in msg and "size K" in msg and "[B, H, K]" in msg and "[1, 2, 5]" in msg


def test_initial_state_for_a_stateless_recurrence():
    rec = recurrence_dsl.load_text("recurrence f(x) -> y {\n    y = x\n}\n")["f"]
    assert "no state" in _call_error(rec.reference, _t(1, 2, 1), initial_state=_t(1, 1))
