"""No silent wrong answer (issue 8): number literals, and zero-size axes.

Literals. A number is the float64 the reference computes with: `1e999` is inf (printed `math.inf` in torch
code, `float("inf")` in Triton kernels, never a bare `inf` that an input of that name would capture), an
integer is its nearest float64 (so `1152921504606846977 - 1152921504606846976` is 0 everywhere, as in the
reference), and a numbers-only subexpression is folded in float64, one operation at a time, as the reference
runs it. What float64 cannot hold is a `SpecError` at the literal: an integer beyond 1.8e308, a constant that
is NaN (`1e999 - 1e999`, `sqrt(-1)`), a division by a constant zero, and an expression sympy's algebra makes
NaN or complex (`x * 1e999 - x * 1e999`, `x / (D - D)`). A step with an infinite constant keeps only its
recurrent form (inf * 0 is NaN, and the other forms regroup the step's products).

Zero-size axes. B, H, T or any size of a spec equal to 0 gives outputs of the declared shape and the initial
(or zero) state as the final state, on every form of both backends (Triton in its interpreter), equal to the
reference's.
"""

from __future__ import annotations

import ast
import math
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton or the project's Triton kernel modules are imported

import pytest  # noqa: E402
import torch  # noqa: E402

import recurrence_dsl  # noqa: E402
from recurrence_dsl import SpecError  # noqa: E402
from recurrence_dsl.analysis import analyse  # noqa: E402
from recurrence_dsl.cli import main  # noqa: E402
from recurrence_dsl.sampling import sample_arguments  # noqa: E402
from recurrence_dsl.validate import relative_error  # noqa: E402

from .conftest import SPEC_FILES, as_dict  # noqa: E402

ALL_FORMS = ("recurrent", "scan", "chunked", "parallel")


def _load(text: str, name: str = "r") -> recurrence_dsl.Recurrence:
    return recurrence_dsl.load_text(text, "lit.rec")[name]


def _spec(update: str, output: str, inputs: str = "x[D]") -> str:
    return (f"recurrence r({inputs}) -> o[D] {{\n"
            f"    state S[D]\n"
            f"    S[j] = {update}\n"
            f"    o[j] = {output}\n"
            f"}}\n")


def _assert_same(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    """Same shape; the same inf and NaN entries; finite entries within `tol` (float32 against float64)."""
    assert tuple(actual.shape) == tuple(expected.shape)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol, equal_nan=True)


def _every_form(rec, args, initial=None, tol: float = 1e-5, triton: bool = True) -> list[str]:
    """Run every form of both backends on `args` (float32) against the float64 reference; the paths run."""
    ref_out, ref_final = rec.reference(*[a.double() for a in args], initial_state=initial, output_final_state=True)
    layer = recurrence_dsl.compile(rec, tuning=False)
    ran = []
    backends = (("torch", layer.forms), ("triton", layer.triton_forms if triton else {}))
    for backend, forms in backends:
        for form in forms:
            out, final = layer(*[a.float() for a in args], form=form, backend=backend, initial_state=initial,
                               output_final_state=True)
            for name, t in as_dict(out, rec.checked.outputs).items():
                _assert_same(t, as_dict(ref_out, rec.checked.outputs)[name], tol)
            for name, t in as_dict(final, rec.checked.states).items():
                _assert_same(t, as_dict(ref_final, rec.checked.states)[name], tol)
            ran.append(f"{backend}/{form}")
    return ran


def _x(*shape, seed: int = 0) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[..., 0] = 0.0  # 0 * inf is NaN: one lane of each kind
    return x


def _names(source: str) -> set[str]:
    return {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}


# ------------------------------------------------------------------------------------------------------------
# Infinity: printed as what it is, in torch and Triton code
# ------------------------------------------------------------------------------------------------------------


def test_an_overflowing_literal_is_math_inf_in_torch_and_float_inf_in_triton():
    rec = _load(_spec("S[j] + x[j]", "x[j] * 1e999 + x[j] * -1e999 * x[j] + S[j]"))
    layer = recurrence_dsl.compile(rec, tuning=False)
    source = layer.source
    assert "math.inf * x_t - math.inf * pow_x_t" in source
    assert 'float("inf") * b_x' in source  # the Triton kernel's spelling (a constant Triton folds, compiled or not)
    assert not {"inf", "nan", "oo", "zoo"} & _names(source)  # never a bare name the module does not define
    assert _every_form(rec, [_x(2, 5, 2, 3)]) == ["torch/recurrent", "triton/recurrent"]


def test_infinities_keep_only_the_recurrent_form_and_say_why():
    for update, output in [("1e999 * S[j] + x[j]", "S[j]"), ("exp(1000) * S[j] + x[j]", "S[j]"),
                           ("S[j] + x[j]", "log(0) * x[j] + S[j]")]:
        analysis = analyse(_load(_spec(update, output)).checked)
        assert analysis.forms == ("recurrent",)
        for form in ("scan", "chunked", "parallel"):
            assert "infinite constant" in analysis.unavailable[form]


def test_a_readout_scaled_by_infinity_runs_recurrent_on_both_backends():
    rec = _load("recurrence r(q[K], k[K], v[V]) -> o[V] {\n"
                "    state S[K, V]\n"
                "    S[i, j] = S[i, j] + k[i] * v[j]\n"
                "    o[j] = 1e999 * sum(i, q[i] * S[i, j])\n"
                "}\n")
    args = [_x(1, 4, 2, 3, seed=1), _x(1, 4, 2, 3, seed=2), _x(1, 4, 2, 2, seed=3)]
    assert _every_form(rec, args, initial=torch.randn(1, 2, 3, 2, dtype=torch.float64)) == [
        "torch/recurrent", "triton/recurrent"]


def test_an_input_named_inf_is_not_what_1e999_reads():
    rec = _load(_spec("S[j] + inf[j]", "x[j] * 1e999 + inf[j] + S[j]", "x[D], inf[D]"))
    args = [_x(2, 3, 1, 4, seed=0), torch.full((2, 3, 1, 4), 7.0, dtype=torch.float64)]
    assert _every_form(rec, args) == ["torch/recurrent", "triton/recurrent"]
    out, _ = recurrence_dsl.compile(rec, tuning=False)(*[a.float() for a in args], backend="torch")
    assert torch.isinf(out[..., 1:]).all() and (out[..., 0] != 0).all()  # x * inf, and inf[j] (7) where x = 0


def test_inputs_named_math_nan_e_pi_run_every_form():
    """Names the generated code or sympy might read (`math`, `nan`, `e`, `pi`, `E`, `I`, `oo`, `float`) are plain
    inputs."""
    rec = _load("recurrence r(math[K], nan[K], e[V], pi, E, I, oo, float) -> o[V] {\n"
                "    state S[K, V]\n"
                "    S[i, j] = exp(-0.5) * pi * S[i, j] + E * nan[i] * e[j] + I * oo * float * nan[i] * e[j]\n"
                "    o[j] = K ** -0.5 * sum(i, math[i] * S[i, j]) + 2.5 * e[j]\n"
                "}\n")
    layer = recurrence_dsl.compile(rec, tuning=False)
    assert {"math_", "float_"} <= _names(layer.source)  # the inputs; `math` stays the module, `float` the builtin
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(2, 9, 1, 3, generator=g), torch.randn(2, 9, 1, 3, generator=g),
            torch.randn(2, 9, 1, 2, generator=g), torch.rand(2, 9, 1, generator=g), torch.rand(2, 9, 1, generator=g),
            torch.rand(2, 9, 1, generator=g), torch.rand(2, 9, 1, generator=g), torch.rand(2, 9, 1, generator=g)]
    ran = _every_form(rec, [a.double() for a in args], tol=1e-4)
    assert set(ran) == {f"torch/{f}" for f in ALL_FORMS} | {f"triton/{f}" for f in ALL_FORMS}


# ------------------------------------------------------------------------------------------------------------
# Integers and constant folding: the reference's float64 values everywhere
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output", [
    "x[j] * (1152921504606846977 - 1152921504606846976) + S[j]",  # 0 in float64 (sympy's exact 1 was wrong)
    "x[j] * 123456789012345678901234567890 / 123456789012345678901234567891 + S[j]",
    "1e200 * 1e200 / 1e300 * x[j] + S[j]",  # inf: the overflow happens in float64, as in the reference
    "(1.00000000000000000001 - 1) * x[j] + S[j]",  # 0 in float64
    "x[j] ** 2.0 + x[j] ** 3 - 2 ** 0.5 * x[j] + S[j]",  # an integral power of a negative x is no NaN
    "x[j] * 1e-999 + x[j] * 5e-324 * 1e300 + S[j]",  # underflow to 0, a subnormal
])
def test_integers_and_folded_constants_are_the_reference_values(output):
    rec = _load(_spec("S[j] + x[j]", output))
    ran = _every_form(rec, [_x(2, 4, 1, 3, seed=4)])
    assert "torch/recurrent" in ran and "triton/recurrent" in ran


@pytest.mark.parametrize("text, line, column, words", [
    (_spec("S[j] + x[j]", "x[j] * " + "1" * 5000 + " + S[j]"), 4, 19, "integer 111111111111... (5000 characters)"),
    (_spec("S[j] + x[j]", "x[j] * 1" + "0" * 400), 4, 19, "too large"),
    (_spec("S[j] + x[j]", "x[j] * (1e999 - 1e999) + S[j]"), 4, 20, "'1e999 - 1e999' is NaN"),
    (_spec("S[j] + x[j]", "x[j] * (2 + 0 * -1e999) + S[j]"), 4, 24, "'0 * -1e999' is NaN"),
    (_spec("S[j] + x[j]", "x[j] * sqrt(-1)"), 4, 19, "'sqrt(-1)' is NaN"),
    (_spec("S[j] + x[j]", "x[j] / 0 + S[j]"), 4, 19, "division by zero: '0' is 0"),
    (_spec("S[j] + x[j] / 1e-999", "S[j]"), 3, 26, "division by zero: '1e-999' is 0"),
    ("recurrence r(x[" + "9" * 5000 + "]) -> o[D] {\n    state S[D]\n    o[j] = S[j]\n}\n", 1, 16,
     "dimension 999999999999... (5000 characters) is too large"),
    ("recurrence r(x[D]) -> o[D] {\n    state S[D]\n    o[j] = S[j] + x[" + "7" * 5000 + "]\n}\n", 3, 21,
     "indices must be index names"),
])
def test_what_float64_cannot_hold_is_a_spec_error_at_the_literal(text, line, column, words):
    with pytest.raises(SpecError) as err:
        recurrence_dsl.load_text(text, "lit.rec")
    assert (err.value.line, err.value.column) == (line, column)
    assert words in err.value.message
    assert err.value.render().startswith(f"lit.rec:{line}:{column}: error: ")
    assert all(len(row) < 200 for row in err.value.render().splitlines())  # a long line is shown in part


@pytest.mark.parametrize("output, column", [
    ("x[j] * 1e999 - x[j] * 1e999 + S[j]", 12),  # inf - inf: NaN for every x
    ("x[j] / (D - D) + S[j]", 12),  # a division by zero once sizes cancel
    ("sqrt(-D) * sqrt(-D) * x[j] + S[j]", 12),  # complex in sympy (and -D * x, wrongly), NaN in float64
])
def test_what_sympy_makes_undefined_is_a_spec_error_when_compiled(output, column):
    rec = _load(_spec("S[j] + x[j]", output))  # loads (the reference runs it: NaN) ...
    with pytest.raises(SpecError) as err:
        recurrence_dsl.compile(rec, tuning=False)  # ... but no generated code may hold nan or zoo
    assert (err.value.line, err.value.column) == (4, column)
    assert "undefined in float64" in err.value.message


def test_check_compares_infinities_and_huge_values():
    """`recdsl check`'s relative error: the same inf or NaN where the reference has one, and no overflow of the
    norms for values near 1e300."""
    ref = torch.tensor([1e300, -1e300, float("inf"), float("nan"), 1.0], dtype=torch.float64)
    assert relative_error(ref.clone(), ref) == 0.0
    assert relative_error(ref * (1 + 1e-12), ref) < 1e-11
    assert relative_error(torch.where(torch.isinf(ref), -ref, ref), ref) == math.inf
    assert relative_error(torch.nan_to_num(ref, nan=0.0), ref) == math.inf


def test_show_and_check_prove_on_infinite_literals(tmp_path, capsys):
    path = tmp_path / "inf.rec"
    path.write_text(_spec("S[j] + x[j]", "x[j] * 1e999 + S[j]"))
    assert main(["show", str(path)]) == 0
    assert main(["show", str(path), "--json"]) == 0
    assert main(["check", str(path), "--prove", "--shape", "B=1,T=3,H=1,D=2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "infinite constant" in out and "all paths within tolerance" in out
    path.write_text(_spec("S[j] + x[j]", "x[j] * (1e999 - 1e999) + S[j]"))
    assert main(["show", str(path)]) == 2
    assert "inf.rec:4:20: error:" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# Zero-size axes: every spec, every form, both backends
# ------------------------------------------------------------------------------------------------------------

RECS: dict[str, recurrence_dsl.Recurrence] = {}
for _path in SPEC_FILES:
    RECS.update(recurrence_dsl.load(_path))
ZERO_CASES = [(name, axis) for name, rec in RECS.items() for axis in ("B", "H", "T", *rec.checked.sizes)]


@pytest.mark.parametrize("name, axis", ZERO_CASES, ids=[f"{n}-{a}=0" for n, a in ZERO_CASES])
def test_a_zero_size_axis_gives_empty_outputs_and_the_initial_state(name, axis):
    rec = RECS[name]
    c = rec.checked
    sizes = {s: 0 if s == axis else 3 for s in c.sizes}
    batch, length, heads = (0 if axis == "B" else 2), (0 if axis == "T" else 5), (0 if axis == "H" else 2)
    for with_initial in (True, False):
        args, initial = sample_arguments(c, sizes, batch, length, heads, dtype=torch.float64, seed=1,
                                         with_initial_state=with_initial)
        out, final = rec.reference(*args, initial_state=initial, output_final_state=True)
        for o in c.outputs:
            shape = (batch, length, heads) + tuple(sizes[d] if isinstance(d, str) else d for d in o.dims)
            assert tuple(as_dict(out, c.outputs)[o.name].shape) == shape
        if length == 0:
            for s in c.states:
                expected = as_dict(initial, c.states)[s.name] if with_initial else 0.0
                assert torch.equal(as_dict(final, c.states)[s.name],
                                   torch.broadcast_to(torch.as_tensor(expected, dtype=torch.float64),
                                                      as_dict(final, c.states)[s.name].shape))
        ran = _every_form(rec, [a.float() for a in args], initial)
        assert "torch/recurrent" in ran and "triton/recurrent" in ran
