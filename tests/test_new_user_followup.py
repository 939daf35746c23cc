"""What a new user tripped on, each fixed: a missing form refused alike by compile() and a call; Triton's
chunk_size rule only where a chunking form runs; `recdsl check` at T=0 checking what an empty sequence must give;
`show` spelling summation indices one way in reasons and step lines."""

from __future__ import annotations

import re

import pytest
import torch

import recurrence_dsl
from recurrence_dsl.cli import main
from recurrence_dsl.sampling import sample_arguments
from recurrence_dsl.validate import check_recurrence

from .conftest import REPO, SPECS_DIR

SLSTM = REPO / "tests" / "data" / "slstm.rec"
GLA = SPECS_DIR / "gla.rec"


def _args(rec, length, batch=1, **sizes):
    sizes = {s: sizes.get(s, 4) for s in rec.checked.sizes}
    args, init = sample_arguments(rec.checked, sizes, batch, length, 2, seed=0, with_initial_state=True)
    return [a.float() for a in args], init.float() if isinstance(init, torch.Tensor) else init


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_and_a_call_refuse_a_missing_form_alike(backend):
    rec = recurrence_dsl.load(SLSTM)["slstm"]
    with pytest.raises(recurrence_dsl.CallError) as at_compile:
        recurrence_dsl.compile(rec, form="chunked", backend=backend)
    args, _ = _args(rec, 3)
    with pytest.raises(recurrence_dsl.CallError) as at_call:
        recurrence_dsl.compile(rec, tuning=False)(*args, form="chunked", backend=backend)
    message = str(at_compile.value)
    assert message == str(at_call.value)
    # The form, the class and why, in `recdsl show`'s words ("class non-linear; forms: recurrent").
    assert message.startswith("slstm has no 'chunked' form: c has a non-linear transition")
    assert "class non-linear; forms: recurrent" in message


def test_an_unknown_form_still_lists_the_forms():
    rec = recurrence_dsl.load(SLSTM)["slstm"]
    with pytest.raises(recurrence_dsl.CallError, match=r"no 'chunkd' form: choose from recurrent or auto"):
        recurrence_dsl.compile(rec, form="chunkd")


def test_triton_chunk_size_rule_binds_only_where_a_chunking_form_runs():
    rec = recurrence_dsl.load(GLA)["gla"]
    layer = recurrence_dsl.compile(rec, tuning=False)
    args, init = _args(rec, 6)
    want, want_final = layer(*args, initial_state=init, output_final_state=True, backend="torch", form="recurrent")
    # The recurrent form ignores chunk_size: 8 runs there, and "auto" over 6 steps picks the recurrent form.
    for form in ("recurrent", "auto"):
        out, final = layer(*args, initial_state=init, output_final_state=True, backend="triton", form=form,
                           chunk_size=8)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(final, want_final, rtol=1e-5, atol=1e-5)
    assert layer.config_for(*args, backend="triton", form="recurrent", chunk_size=8)["chunk_size"] == 8
    compiled = recurrence_dsl.compile(rec, backend="triton", form="recurrent", chunk_size=8, tuning=False)
    torch.testing.assert_close(compiled(*args, initial_state=init)[0], want, rtol=1e-5, atol=1e-5)
    # Where the chunked kernels run, the rule and its message are unchanged.
    refused = "chunk_size must be a power of two >= 16 on the triton backend, got 8"
    with pytest.raises(recurrence_dsl.CallError, match=refused):
        layer(*args, backend="triton", form="chunked", chunk_size=8)
    long_args, _ = _args(rec, 40)
    with pytest.raises(recurrence_dsl.CallError, match=refused):  # auto picks chunked over 40 steps
        layer(*long_args, backend="triton", chunk_size=8)
    with pytest.raises(recurrence_dsl.CallError, match=refused):  # packed sequences may each pick chunked
        layer(*args, backend="triton", chunk_size=8, cu_seqlens=torch.tensor([0, 2, 6]))
    with pytest.raises(recurrence_dsl.CallError, match=r"chunk_size must be an integer >= 1, got 0"):
        layer(*args, backend="triton", form="recurrent", chunk_size=0)


def test_check_at_t0_checks_empty_outputs_and_the_final_state(capsys):
    code = main(["check", str(GLA), "--shape", "B=1,T=0,H=2,K=4,V=3"])
    out, err = capsys.readouterr()
    assert code == 0, err
    for path in ("reference", "torch/recurrent", "torch/chunked", "triton/recurrent", "triton/chunked"):
        assert re.search(rf"{re.escape(path)} +o empty \[1, 0, 2, 3\] .* ok", out), out
        assert re.search(rf"{re.escape(path)} +final S = initial .* ok", out), out
    assert "all paths within tolerance" not in out
    assert "all paths agree at T=0: each returned empty outputs of the reference's shape" in out


def test_check_at_t0_fails_a_path_that_changes_the_state_or_the_shape():
    rec = recurrence_dsl.load(GLA)["gla"]
    layer = recurrence_dsl.compile(rec, backend="torch", tuning=False)

    def moves_the_state(*args, **kwargs):
        out, final = layer(*args, **kwargs)
        return out, final + 1e-3

    def drops_a_dim(*args, **kwargs):
        out, final = layer(*args, **kwargs)
        return out[..., 0], final

    report = check_recurrence(rec, {"K": 4, "V": 3}, 1, 0, 2, triton=False,
                              paths={"moves": moves_the_state, "drops": drops_a_dim})
    rows = {(r.path, r.value): r for r in report.rows}
    assert not report.ok
    assert not rows[("moves", "final S = initial")].ok
    assert rows[("moves", "o empty [1, 0, 2, 3]")].ok
    assert rows[("drops", "o")].error == "shape [1, 0, 2] where the reference's is [1, 0, 2, 3]"
    assert rows[("drops", "final S = initial")].ok


def test_show_spells_summation_indices_as_the_step_lines_do(capsys):
    assert main(["show", str(SLSTM)]) == 0
    out = capsys.readouterr().out
    assert not re.findall(r"\b[A-Za-z]+__\d+", out)
    reason = next(line for line in out.splitlines() if line.startswith("  state c[d]:"))
    assert "sum(e, Rf[d, e]*h[e])" in reason and "Sum(" not in out
