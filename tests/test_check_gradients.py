"""`recdsl check` compares gradients too: each path's gradients of one weighted sum of its outputs and final states,
with respect to every input, param and initial state, against the float64 reference's autograd gradients, with
the forward's tolerance per dtype. A form whose backward is wrong (here one made wrong on purpose: the gradient
of one input scaled by 1.01 while its forward stays exact) fails the check, and the command exits 1."""

from __future__ import annotations

import re

import torch

import recurrence_dsl
from recurrence_dsl import validate
from recurrence_dsl.cli import main

from .conftest import SPECS_DIR

GLA = str(SPECS_DIR / "gla.rec")
SHAPE = "B=1,T=5,H=2,K=3,V=2"
EXECUTABLE_PATHS = validate.executable_paths  # (the test below replaces the module's)


class _ScaleGradient(torch.autograd.Function):
    """The identity forward; a backward that scales the gradient by `factor` (a deliberately wrong backward)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _wrong_backward_paths(rec, *args, **kwargs):
    """The torch paths, with the chunked form's gradient of k scaled by 1.01."""
    paths, skipped = EXECUTABLE_PATHS(rec, triton=False, dtype=kwargs.get("dtype", torch.float32))
    chunked = paths["torch/chunked"]

    def wrong(q, k, v, g, **call):
        return chunked(q, _ScaleGradient.apply(k, 1.01), v, g, **call)

    return {**paths, "torch/chunked (wrong backward)": wrong}, skipped


def test_gradient_rows_pass_for_every_form_of_a_correct_spec():
    rec = recurrence_dsl.load(GLA)["gla"]
    report = validate.check_recurrence(rec, {"K": 3, "V": 2}, 1, 5, 2, dtype=torch.float64, triton=False)
    grads = [r for r in report.rows if r.value.startswith("grad ")]
    assert {r.value for r in grads} == {"grad q", "grad k", "grad v", "grad g", "grad initial S"}
    assert {r.path for r in grads} == {"reference", "torch/recurrent", "torch/scan", "torch/chunked",
                                       "torch/parallel"}
    assert report.ok and all(r.rel_error < 1e-10 for r in grads)
    assert "grad initial S" in validate.format_report(report)
    plain = validate.check_recurrence(rec, {"K": 3, "V": 2}, 1, 5, 2, dtype=torch.float64, triton=False, grad=False)
    assert not any(r.value.startswith("grad ") for r in plain.rows)


def test_a_wrong_backward_fails_its_gradient_row_only():
    rec = recurrence_dsl.load(GLA)["gla"]
    paths, _ = _wrong_backward_paths(rec, dtype=torch.float64)
    report = validate.check_recurrence(rec, {"K": 3, "V": 2}, 1, 5, 2, dtype=torch.float64, paths=paths)
    assert not report.ok
    failed = [(r.path, r.value) for r in report.rows if not r.ok]
    assert failed == [("torch/chunked (wrong backward)", "grad k")]
    row = next(r for r in report.rows if r.value == "grad k" and r.path.endswith("(wrong backward)"))
    assert 5e-3 < row.rel_error < 2e-2  # 1.01 times the true gradient: a relative error of 0.01


def test_check_exits_1_on_a_wrong_backward_and_0_without_one(monkeypatch, capsys):
    assert main(["check", GLA, "--shape", SHAPE, "--device", "cpu", "--no-triton"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"torch/chunked +grad k +\S+ +1e-05  ok", out) and "all paths within tolerance" in out
    monkeypatch.setattr(validate, "executable_paths", _wrong_backward_paths)
    assert main(["check", GLA, "--shape", SHAPE, "--device", "cpu", "--no-triton"]) == 1
    out = capsys.readouterr().out
    wrong = [line for line in out.splitlines() if "(wrong backward)" in line]
    assert any("grad k" in line and line.endswith("FAIL") for line in wrong)
    assert any(" o " in line and line.endswith("ok") for line in wrong)  # its forward is right
    # --no-grad checks the forward only, which is right
    assert main(["check", GLA, "--shape", SHAPE, "--device", "cpu", "--no-triton", "--no-grad"]) == 0
