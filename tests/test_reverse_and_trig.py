"""`cos` / `sin` in the language, checked on every form and backend against the float64 reference.

tests/data/rotation.rec holds two specs: `rotary_la`, linear attention whose keys are turned by an angle (the
rotation is a per-step prologue, so it has every form of a scalar decay), and `rotation`, a damped rotation of a
(real, imaginary) state pair per channel (coupled states: the recurrent form). Every torch form runs in float64
(relative error <= 1e-9) and float32 (<= 1e-4); every Triton form (interpreter) in float32, T = 5 and 19 with
chunks of 8 (torch) and 16 (Triton). Gradients: the recurrent form's derived adjoint (whose derivatives of cos and
sin come from sympy) passes `gradcheck` in float64, and every torch form's gradients match the reference's
autograd in float64.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import recurrence_dsl
from recurrence_dsl.adjoint import derive_adjoint
from recurrence_dsl.analysis import analyse
from recurrence_dsl.cli import main as recdsl_main
from recurrence_dsl.errors import SpecError
from recurrence_dsl.sampling import sample_arguments

from .conftest import as_dict
from .test_breadth import F32, F64, compare, rel
from .test_forms import flatten

DATA = Path(__file__).parent / "data"
ROTATION = recurrence_dsl.load(DATA / "rotation.rec")
SIZES = {"rotary_la": {"K": 4, "V": 3}, "rotation": {"D": 5}}


def _case(name: str, T: int, batch: int = 1, seed: int = 0):
    rec = ROTATION[name]
    args, initial = sample_arguments(rec.checked, SIZES[name], batch, T, 2, dtype=F64, seed=seed,
                                     with_initial_state=True)
    out, final = rec.reference(*args, initial_state=initial, output_final_state=True)
    return rec, args, initial, flatten(rec, out, final)


def test_cos_and_sin_check_and_fold():
    """Both are one-argument functions; a constant argument folds as the reference computes it."""
    from recurrence_dsl.check import FUNCTIONS, constant_value
    from recurrence_dsl.parse import parse_program

    assert {"cos", "sin"} <= set(FUNCTIONS)
    text = "recurrence f(x) -> y {\n    y = x * cos(0.5) + sin(0)\n}\n"
    expr = parse_program(text).recurrences[0].statements[0].value.left.right
    assert constant_value(expr) == pytest.approx(0.8775825618903728, rel=1e-15)
    with pytest.raises(SpecError, match=r"cos\(\) takes 1 argument, got 2") as raised:
        recurrence_dsl.load_text("recurrence f(x) -> y {\n    y = x * cos(x, x)\n}\n")
    assert "<string>:2:13" in str(raised.value)


@pytest.mark.parametrize("name", sorted(ROTATION))
def test_every_form_matches_the_reference(name):
    expected = {"rotary_la": ["recurrent", "scan", "chunked", "parallel"], "rotation": ["recurrent"]}[name]
    failures = []
    for T in (5, 19):
        rec, args, initial, ref = _case(name, T)
        torch_layer = recurrence_dsl.compile(rec, backend="torch", chunk_size=8, tuning=False)
        assert list(torch_layer.forms) == expected
        for form in torch_layer.forms:
            for dtype in (F64, F32):
                problem = compare(rec, torch_layer, form, args, initial, ref, dtype)
                if problem:
                    failures.append((f"torch/{form} {dtype} T={T}", problem))
        triton_layer = recurrence_dsl.compile(rec, backend="triton", chunk_size=16, tuning=False)
        assert list(triton_layer.triton_forms) == ["recurrent"] + (["chunked"] if "chunked" in expected else [])
        for form in triton_layer.triton_forms:
            problem = compare(rec, triton_layer, form, args, initial, ref, F32)
            if problem:
                failures.append((f"triton/{form} float32 T={T}", problem))
    assert not failures, failures


@pytest.mark.parametrize("name", sorted(ROTATION))
def test_the_adjoint_differentiates_cos_and_sin(name):
    """d cos / d theta = -sin and d sin / d theta = cos appear in the derived backward step, and the recurrent
    form's backward passes gradcheck in float64."""
    rec = ROTATION[name]
    a = analyse(rec.checked)
    theta_grad = str(derive_adjoint(a.recurrence, a.ir).inputs["theta"].expr)
    assert "-sin(theta[" in theta_grad.replace("- sin", "-sin") or "-sigmoid(r[d])*sin(theta[d])" in theta_grad
    assert "cos(theta[" in theta_grad
    args, initial = sample_arguments(rec.checked, {k: 2 for k in SIZES[name]}, 1, 5, 1, dtype=F64, seed=3,
                                     with_initial_state=True)
    initial = as_dict(initial, rec.checked.states)
    names = list(initial)
    layer = recurrence_dsl.compile(rec, backend="torch", form="recurrent", tuning=False)

    def fn(*xs):
        states = dict(zip(names, xs[len(args):]))
        out, final = layer(*xs[: len(args)], initial_state=states if len(names) > 1 else states[names[0]],
                           output_final_state=True)
        return tuple(as_dict(out, rec.checked.outputs).values()) + tuple(as_dict(final, rec.checked.states).values())

    leaves = [x.clone().requires_grad_() for x in args] + [initial[n].clone().requires_grad_() for n in names]
    assert "_AdjointBackward" in type(fn(*leaves)[0].grad_fn).__name__
    assert torch.autograd.gradcheck(fn, leaves)


def _grads(fn, rec, args, initial, weights, **kwargs):
    leaves = [x.detach().clone().requires_grad_() for x in args]
    init = {k: v.detach().clone().requires_grad_() for k, v in as_dict(initial, rec.checked.states).items()}
    given = init if len(init) > 1 else next(iter(init.values()))
    out, final = fn(*leaves, initial_state=given, output_final_state=True, **kwargs)
    flat = flatten(rec, out, final)
    loss = sum((flat[k] * w).sum() for k, w in weights.items())
    loss.backward()
    return [x.grad for x in leaves] + [v.grad for v in init.values()]


def test_gradients_of_every_torch_form():
    """float64 gradients of rotary_la's four torch forms against the reference's autograd (T = 11, chunks of 4)."""
    rec, args, initial, ref = _case("rotary_la", 11, batch=2)
    gen = torch.Generator().manual_seed(1)
    weights = {k: torch.randn(v.shape, generator=gen, dtype=F64) for k, v in ref.items()}
    want = _grads(rec.reference, rec, args, initial, weights)
    layer = recurrence_dsl.compile(rec, backend="torch", chunk_size=4, tuning=False)
    for form in layer.forms:
        got = _grads(layer, rec, args, initial, weights, form=form)
        errors = [rel(g, w) for g, w in zip(got, want)]
        assert max(errors) <= 1e-9, (form, errors)


def test_recdsl_check_prove_passes(capsys):
    code = recdsl_main(["check", str(DATA / "rotation.rec"), "--prove", "--shape", "B=1,T=9,H=1,K=4,V=3,D=5"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "triton/chunked" in printed and "equal (exact)" in printed
