"""What a new-user trial ran into, each now a clear error (or accepted) rather than an internal error: a recurrence
without a state, `compile` given a path or `load`'s dict, a wrong recurrence name, `--device cuda` without CUDA,
and a UTF-8 byte-order mark at the start of a file."""

from __future__ import annotations

import pytest
import torch

import recurrence_dsl
from recurrence_dsl.cli import main

from .conftest import SPECS_DIR

GLA = str(SPECS_DIR / "gla.rec")


def test_a_recurrence_without_a_state_is_an_error_at_its_name_when_compiled(tmp_path, capsys):
    path = tmp_path / "nostate.rec"
    path.write_text("recurrence nostate(x[D]) -> y[D] {\n    y[d] = 2 * x[d]\n}\n")
    rec = recurrence_dsl.load(str(path))["nostate"]  # a valid body: the reference runs it
    x = torch.randn(1, 3, 1, 2, dtype=torch.float64)
    assert torch.equal(rec.reference(x)[0], 2 * x)
    with pytest.raises(recurrence_dsl.SpecError) as info:
        recurrence_dsl.compile(rec)
    assert (info.value.line, info.value.column) == (1, 12)
    assert "needs at least one state" in info.value.message and "state h[D]" in info.value.hint
    for command in (["show"], ["check"], ["compile", "-o", str(tmp_path / "m.py")]):
        assert main(command[:1] + [str(path)] + command[1:]) == 2
        err = capsys.readouterr().err
        assert "nostate.rec:1:12: error:" in err and "internal error" not in err


@pytest.mark.parametrize("wrong", [GLA, "gla", 3])
def test_compile_of_a_path_or_anything_else_says_to_load_first(wrong):
    with pytest.raises(TypeError, match=r"load\(path\)\[name\]"):
        recurrence_dsl.compile(wrong)


def test_compile_of_loads_dict_names_its_recurrences():
    with pytest.raises(TypeError, match=r"not the dict that load\(\) returns \(its recurrences: 'gla'\)"):
        recurrence_dsl.compile(recurrence_dsl.load(GLA))


def test_a_wrong_recurrence_name_names_those_the_file_has():
    recs = recurrence_dsl.load(GLA)
    assert recs["gla"].name == "gla" and list(recs) == ["gla"]
    with pytest.raises(KeyError, match=r"has no recurrence 'GLA'; it has 'gla'"):
        recs["GLA"]
    with pytest.raises(KeyError, match=r"did you mean 'gla'"):
        recs["gls"]
    assert recs.get("GLA") is None  # dict.get does not call __missing__


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_a_usage_error(capsys):
    assert main(["check", GLA, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda:" in err and "cpu" in err and "internal error" not in err


def test_a_leading_byte_order_mark_is_accepted(tmp_path, capsys):
    text = (SPECS_DIR / "gla.rec").read_text()
    path = tmp_path / "bom.rec"
    path.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    (rec,) = recurrence_dsl.load(str(path)).values()
    assert rec.checked.text == recurrence_dsl.load(GLA)["gla"].checked.text
    assert main(["show", str(path)]) == 0
    # a mark anywhere else is still an unexpected character
    path.write_bytes(text.encode() + b"\xef\xbb\xbf\n")
    assert main(["show", str(path)]) == 2
    assert "unexpected character" in capsys.readouterr().err


@pytest.mark.parametrize(("update", "column"), [("1e400 * h[d] + x[d]", 12), ("exp(1000) * h[d] + x[d]", 12),
                                                ("x[d] + h[d] * -1e999", 12)])
def test_an_infinite_decay_is_an_error_at_the_update_when_compiled(tmp_path, capsys, update, column):
    path = tmp_path / "inf.rec"
    path.write_text(f"recurrence r(x[D]) -> y[D] {{\n    state h[D]\n    h[d] = {update}\n    y[d] = h[d]\n}}\n")
    rec = recurrence_dsl.load(str(path))["r"]
    with pytest.raises(recurrence_dsl.SpecError) as info:
        recurrence_dsl.compile(rec)
    assert (info.value.line, info.value.column) == (3, column)
    assert "'h' is NaN" in info.value.message and "without an initial state" in info.value.message
    # the reference computes that NaN (inf * 0) too
    assert torch.isnan(rec.reference(torch.ones(1, 2, 1, 2, dtype=torch.float64))[0]).all()
    assert main(["show", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"inf.rec:3:{column}: error:" in err and "internal error" not in err


def test_an_infinite_constant_that_does_not_multiply_the_state_still_compiles():
    rec = recurrence_dsl.load_text("recurrence r(x[D]) -> y[D] {\n    state h[D]\n    h[d] = h[d] + 1e999 * x[d]\n"
                                   "    y[d] = h[d]\n}\n")["r"]
    x = torch.ones(1, 2, 1, 2, dtype=torch.float64)
    out, _ = recurrence_dsl.compile(rec, backend="torch")(x)
    assert torch.equal(out, rec.reference(x)[0]) and torch.isinf(out).all()


NDELTA = """\
recurrence ndelta(q[K], k[K], v[V], b) -> o[V] {
    state S[K, V]
    n = sqrt(sum(i, k[i] * k[i]) + 1e-6)
    kn[i] = k[i] / n
    u[j] = v[j] - sum(i, kn[i] * S[i, j])
    S[i, j] = S[i, j] + sigmoid(b) * kn[i] * u[j]
    o[j] = sum(i, q[i] * S[i, j])
}
"""


def test_messages_quoting_a_sum_show_no_internal_index_names(tmp_path, capsys):
    path = tmp_path / "ndelta.rec"
    path.write_text(NDELTA)
    rec = recurrence_dsl.load(str(path))["ndelta"]
    with pytest.raises(recurrence_dsl.CallError) as info:
        recurrence_dsl.compile(rec, form="scan")
    assert "sum(i, k[i]**2)" in str(info.value) and "__" not in str(info.value)
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "state S[i, j]: rank-one-update -- S is updated by" in out and "sum(i, k[i]**2)" in out and "__" not in out
    assert main(["check", str(path), "--shape", "B=1,T=3,H=1,K=2,V=2", "--device", "cpu", "--no-triton"]) == 0
    out = capsys.readouterr().out
    assert "not available: S has a rank-one-update" in out and "sum(i, k[i]**2)" in out and "__" not in out


@pytest.mark.parametrize("text, message", [("recurrence x", r"<string>:1:13: error: unexpected end of line"),
                                           ("  recurrence r(x) -> y", r"<string>:1:")])
def test_one_line_spec_text_is_parsed_not_taken_for_a_path(text, message):
    with pytest.raises(recurrence_dsl.SpecError, match=message):
        recurrence_dsl.load(text)


@pytest.mark.parametrize("text", ["# nothing", "", "   "])
def test_comment_only_or_blank_text_loads_no_recurrence(text):
    assert dict(recurrence_dsl.load(text)) == {}


def test_a_missing_path_is_still_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such .rec file"):
        recurrence_dsl.load(str(tmp_path / "gla.rec"))
    assert list(recurrence_dsl.load(tmp_path.joinpath("x.rec").__class__("specs/gla.rec"))) == ["gla"]
