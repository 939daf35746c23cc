"""`cos` / `sin`, reverse recurrences and small states, checked on every form and backend against the float64
reference.

Trigonometry: tests/data/rotation.rec holds two specs: `rotary_la`, linear attention whose keys are turned by an
angle (the rotation is a per-step prologue, so it has every form of a scalar decay), and `rotation`, a damped
rotation of a (real, imaginary) state pair per channel (coupled states: recurrent and block scan). Every torch form runs
in float64 (relative error <= 1e-9) and float32 (<= 1e-4); every Triton form (interpreter) in float32, T = 5 and 19
with chunks of 8 (torch) and 16 (Triton). Gradients: the recurrent form's derived adjoint (whose derivatives of cos
and sin come from sympy) passes `gradcheck` in float64, and every torch form's gradients match the reference's
autograd in float64.

Reverse. tests/data/bidirectional.rec holds a forward and a `reverse recurrence` Mamba-2 SSM (a bidirectional
layer is their sum), a reverse gated delta rule (chunked through WY) and a reverse diagonal state (scan). The
reference steps t = T-1, ..., 0 on its own; it is checked against hand-written loops and against the forward
reference on time-flipped inputs. Every torch form (float64 <= 1e-9, float32 <= 1e-4) and Triton form (float32
<= 1e-4) of those specs, and of every eighth generated breadth program called with reverse=True, matches it at
T = 5 and 19; packed sequences (cu_seqlens, one empty) run reverse each on its own; gradients of reverse runs
match the reference's autograd (float64 torch forms <= 1e-9, float32 Triton forms <= 1e-4).

Small states: tests/data/state_shapes.rec holds a running count (a 0-axis state), a count beside a matrix state,
vector states read elementwise (y[d] = h[d]) with a value-axis and a key-axis decay, and readouts summed over both
axes of a matrix state. Each gets the chunked and parallel forms (the state held with a size-1 key axis in front),
checked like the specs above on every form and backend, with gradients, and proved by `--prove`'s algebra.

Coupled states: the rotation above and tests/data/coupled.rec's cascade (h2 reads h1's new value) are one
coupled-elementwise block per element with a scan form (2x2 blocks combined by a doubling scan), checked on every
form and backend, with float64 gradients through the scan and the proof; Titans-style momentum on a delta-rule
memory is refused a scan form with the line:col of the statement that reads across rows.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import recurrence_dsl
from recurrence_dsl.adjoint import derive_adjoint
from recurrence_dsl.analysis import analyse
from recurrence_dsl.cli import describe
from recurrence_dsl.cli import main as recdsl_main
from recurrence_dsl.errors import SpecError
from recurrence_dsl.prove import prove
from recurrence_dsl.sampling import sample_arguments

from .conftest import as_dict, made_by
from .test_breadth import F32, F64, PROGRAMS, compare, rel
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
    expected = {"rotary_la": ["recurrent", "scan", "chunked", "parallel"], "rotation": ["recurrent", "scan"]}[name]
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
        assert list(triton_layer.triton_forms) == expected  # (rotary_la's scalar decay: the parallel kernels too)
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
    assert "_AdjointBackward" in type(made_by(fn(*leaves)[0])).__name__
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


# ---------------------------------------------------------------------------------------------------------
# reverse recurrences
# ---------------------------------------------------------------------------------------------------------

BIDIRECTIONAL = recurrence_dsl.load(DATA / "bidirectional.rec")
REVERSE_FORMS = {"ssd_forward": ["recurrent", "scan", "chunked", "parallel"],
                 "ssd_backward": ["recurrent", "scan", "chunked", "parallel"],
                 "delta_backward": ["recurrent", "chunked"],
                 "diagonal_backward": ["recurrent", "scan", "chunked", "parallel"]}
REVERSE_SIZES = {"P": 3, "N": 4, "K": 4, "V": 3, "D": 5}


def _reverse_case(rec, sizes, T: int, batch: int = 1, seed: int = 0, **kwargs):
    args, initial = sample_arguments(rec.checked, sizes, batch, T, 2, dtype=F64, seed=seed, with_initial_state=True,
                                     **kwargs)
    args = [a.to(F32).to(F64) for a in args]  # float32-exact, so one float64 reference serves both dtypes
    initial = {k: v.to(F32).to(F64) for k, v in as_dict(initial, rec.checked.states).items()}
    initial = initial if len(initial) > 1 else next(iter(initial.values()))
    return args, initial


def _flip_inputs(rec, args):
    n = len(rec.checked.inputs)
    return [a.flip(1) if i < n else a for i, a in enumerate(args)]


def test_the_grammar_and_the_call_carry_the_direction():
    assert [BIDIRECTIONAL[n].checked.reverse for n in REVERSE_FORMS] == [False, True, True, True]
    assert BIDIRECTIONAL["ssd_backward"].checked.text.startswith("reverse recurrence ssd_backward(")
    rec = BIDIRECTIONAL["ssd_forward"]
    args, initial = _reverse_case(rec, REVERSE_SIZES, 4)
    with pytest.raises(recurrence_dsl.CallError, match="reverse must be True .* got 'yes'"):
        rec.reference(*args, reverse="yes")
    layer = recurrence_dsl.compile(rec, backend="torch", tuning=False)
    with pytest.raises(recurrence_dsl.CallError, match="reverse must be True"):
        layer(*args, reverse=1)
    with pytest.raises(SpecError, match="'reverse' is a keyword of every layer's call") as raised:
        recurrence_dsl.load_text("recurrence f(reverse) -> y {\n    y = reverse\n}\n")
    assert "<string>:1:14" in str(raised.value)
    # `reverse` stays an ordinary name where no keyword can stand: a temporary, an index.
    recurrence_dsl.load_text("recurrence f(x[D]) -> y[D] {\n    reverse[reverse] = x[reverse]\n"
                             "    y[d] = reverse[d]\n}\n")


def test_the_reference_steps_backwards_as_a_hand_written_loop():
    """ssd_backward's reference against the loop written out (t = T-1 down to 0), and against the forward spec's
    reference on time-flipped inputs; reverse=False on the reverse spec runs forward."""
    fwd, bwd = BIDIRECTIONAL["ssd_forward"], BIDIRECTIONAL["ssd_backward"]
    args, h0 = _reverse_case(bwd, REVERSE_SIZES, 7, batch=2)
    x, dt, B, C, A = args
    h, want = h0.clone(), torch.zeros_like(x)
    for t in reversed(range(x.shape[1])):
        decay = torch.exp(dt[:, t] * A)[..., None, None]                    # [B, H, 1, 1]
        h = decay * h + (dt[:, t, :, None] * B[:, t])[..., None] * x[:, t, :, None, :]
        want[:, t] = torch.einsum("bhn,bhnp->bhp", C[:, t], h)
    got, final = bwd.reference(*args, initial_state=h0, output_final_state=True)
    assert rel(got, want) < 1e-14 and rel(final, h) < 1e-14
    flipped, flipped_final = fwd.reference(*_flip_inputs(fwd, args), initial_state=h0, output_final_state=True)
    assert rel(got, flipped.flip(1)) < 1e-14 and rel(final, flipped_final) < 1e-14
    assert rel(bwd.reference(*args, initial_state=h0, reverse=False)[0],
               fwd.reference(*args, initial_state=h0)[0]) < 1e-14
    assert rel(fwd.reference(*args, initial_state=h0, reverse=True)[0], got) < 1e-14


def _check_reverse(rec, sizes, expected_forms, **call):
    """Failures of every torch and Triton form of `rec` against its reference, both with `call` (reverse=...)."""
    failures = []
    for T in (5, 19):
        args, initial = _reverse_case(rec, sizes, T)
        out, final = rec.reference(*args, initial_state=initial, output_final_state=True, **call)
        ref = flatten(rec, out, final)
        torch_layer = recurrence_dsl.compile(rec, backend="torch", chunk_size=8, tuning=False)
        assert expected_forms is None or list(torch_layer.forms) == expected_forms
        for form in torch_layer.forms:
            for dtype in (F64, F32):
                problem = compare(rec, torch_layer, form, args, initial, ref, dtype, **call)
                if problem:
                    failures.append((f"torch/{form} {dtype} T={T}", problem))
        triton_layer = recurrence_dsl.compile(rec, backend="triton", chunk_size=16, tuning=False)
        for form in triton_layer.triton_forms:
            problem = compare(rec, triton_layer, form, args, initial, ref, F32, **call)
            if problem:
                failures.append((f"triton/{form} float32 T={T}", problem))
    return failures


@pytest.mark.parametrize("name", sorted(REVERSE_FORMS))
def test_reverse_specs_on_every_form(name):
    rec = BIDIRECTIONAL[name]
    failures = _check_reverse(rec, REVERSE_SIZES, REVERSE_FORMS[name])
    if not rec.checked.reverse:  # the forward spec called with reverse=True
        failures += _check_reverse(rec, REVERSE_SIZES, REVERSE_FORMS[name], reverse=True)
    assert not failures, failures


REVERSED_PROGRAMS = PROGRAMS[::8]  # every shape: matrix, delta, vector, scalar, two states


@pytest.mark.parametrize("program", REVERSED_PROGRAMS, ids=[p.ident for p in REVERSED_PROGRAMS])
def test_generated_programs_reversed(program):
    """Generated breadth programs (tests/test_breadth.py, every shape and decay kind) called with reverse=True."""
    rec = recurrence_dsl.load(program.text)[program.name]
    failures = _check_reverse(rec, program.sizes, None, reverse=True)
    assert not failures, (failures, program.text)


def test_packed_sequences_run_reverse_each_on_its_own():
    """Under cu_seqlens (lengths 3, 0, 6, 1) every form equals separate reverse calls per sequence."""
    rec = BIDIRECTIONAL["delta_backward"]
    bounds = [0, 3, 3, 9, 10]
    args, initial = _reverse_case(rec, REVERSE_SIZES, bounds[-1], rows=len(bounds) - 1)
    assert initial.shape[0] == len(bounds) - 1  # one initial state per packed sequence
    cu = torch.tensor(bounds)
    want_out, want_final = [], []
    for n in range(len(bounds) - 1):
        piece = [a[:, bounds[n]:bounds[n + 1]] if i < 5 else a for i, a in enumerate(args)]
        o, f = rec.reference(*piece, initial_state=initial[n:n + 1], output_final_state=True)
        want_out.append(o)
        want_final.append(f)
    want_out, want_final = torch.cat(want_out, 1), torch.cat(want_final, 0)
    ref_out, ref_final = rec.reference(*args, initial_state=initial, output_final_state=True, cu_seqlens=cu)
    assert rel(ref_out, want_out) < 1e-14 and rel(ref_final, want_final) < 1e-14
    for backend, dtype, tol in (("torch", F64, 1e-9), ("triton", F32, 1e-4)):
        layer = recurrence_dsl.compile(rec, backend=backend, chunk_size=16 if backend == "triton" else 2,
                                       tuning=False)
        for form in (layer.forms if backend == "torch" else layer.triton_forms):
            out, final = layer(*[a.to(dtype) for a in args], initial_state=initial.to(dtype),
                               output_final_state=True, cu_seqlens=cu, form=form)
            assert rel(out, want_out) <= tol and rel(final, want_final) <= tol, (backend, form)


@pytest.mark.parametrize("name", ["ssd_backward", "delta_backward", "diagonal_backward"])
def test_gradients_of_reverse_runs(name):
    """Gradients of every input, param and initial state through each form of a reverse spec (T = 11, chunks
    of 4 on torch) against the reference's autograd: float64 torch forms <= 1e-9, float32 Triton forms <= 1e-4."""
    rec = BIDIRECTIONAL[name]
    args, initial = _reverse_case(rec, REVERSE_SIZES, 11, batch=2)
    out, final = rec.reference(*args, initial_state=initial, output_final_state=True)
    gen = torch.Generator().manual_seed(2)
    weights = {k: torch.randn(v.shape, generator=gen, dtype=F64) for k, v in flatten(rec, out, final).items()}
    want = _grads(rec.reference, rec, args, initial, weights)
    for backend, dtype, tol in (("torch", F64, 1e-9), ("triton", F32, 1e-4)):
        layer = recurrence_dsl.compile(rec, backend=backend, chunk_size=16 if backend == "triton" else 4,
                                       tuning=False)
        for form in (layer.forms if backend == "torch" else layer.triton_forms):
            init = {k: v.to(dtype) for k, v in as_dict(initial, rec.checked.states).items()}
            got = _grads(layer, rec, [a.to(dtype) for a in args], init, weights, form=form)
            errors = [rel(g, w) for g, w in zip(got, want)]
            assert max(errors) <= tol, (backend, form, errors)


def test_a_bidirectional_layer_is_the_sum_of_two_passes():
    """y = ssd_forward(x) + ssd_backward(x) against both references; the first output step depends on x_0 alone
    through the forward pass and on every step through the reverse pass (the last step the other way round)."""
    fwd, bwd = BIDIRECTIONAL["ssd_forward"], BIDIRECTIONAL["ssd_backward"]
    args, _ = _reverse_case(fwd, REVERSE_SIZES, 9)
    layers = [recurrence_dsl.compile(r, backend="torch", tuning=False) for r in (fwd, bwd)]
    want = fwd.reference(*args)[0] + bwd.reference(*args)[0]
    for form in ("recurrent", "chunked"):
        x = args[0].clone().requires_grad_()
        passes = [layer(x, *args[1:], form=form)[0] for layer in layers]
        assert rel(passes[0] + passes[1], want) < 1e-12
        reached = {}
        for which, step in ((0, 0), (1, 0), (0, -1), (1, -1)):
            (grad,) = torch.autograd.grad(passes[which][:, step].sum(), x, retain_graph=True)
            reached[which, step] = (grad.abs().sum(dim=(0, 2, 3)) > 0).tolist()  # per input step
        T = x.shape[1]
        assert reached[0, 0] == [True] + [False] * (T - 1) and reached[1, 0] == [True] * T
        assert reached[0, -1] == [True] * T and reached[1, -1] == [False] * (T - 1) + [True]


def test_a_generated_module_runs_reverse(tmp_path, monkeypatch):
    """`recdsl compile`'s module: the reverse spec's layer and nn.Module run backwards by default, and
    reverse=False runs them forwards (as the forward spec)."""
    import importlib.util

    out = tmp_path / "bidirectional_module.py"
    assert recdsl_main(["compile", str(DATA / "bidirectional.rec"), "-o", str(out)]) == 0
    spec = importlib.util.spec_from_file_location("bidirectional_module", out)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bidirectional_module", module)  # (its dataclasses look themselves up)
    spec.loader.exec_module(module)
    assert module._ssd_backward_spec.reverse and not module._ssd_forward_spec.reverse
    args, _ = _reverse_case(BIDIRECTIONAL["ssd_forward"], REVERSE_SIZES, 7)
    layer = module.SsdBackward(heads=2, A=args[-1].clone())
    want_reverse = BIDIRECTIONAL["ssd_backward"].reference(*args)[0]
    want_forward = BIDIRECTIONAL["ssd_forward"].reference(*args)[0]
    inputs = [a.float() for a in args[:-1]]
    assert rel(layer(*inputs)[0], want_reverse) < 1e-5
    assert rel(layer(*inputs, reverse=False)[0], want_forward) < 1e-5
    assert rel(module.ssd_backward(*args, form="chunked")[0], want_reverse) < 1e-12

SYNTAX_ERRORS = {
    "x[t + 1] in a body": ("recurrence f(x[D]) -> y[D] {\n    y[d] = x[t + 1, d]\n}\n", "2:16",
                           "the language is causal"),
    "x[d - 1] in a body": ("recurrence f(x[D]) -> y[D] {\n    y[d] = x[d - 1]\n}\n", "2:16",
                           "write 'reverse recurrence NAME(...)' or call the layer with reverse=True"),
    "x[t, d] on a vector": ("recurrence f(x[D]) -> y[D] {\n    y[d] = x[t, d]\n}\n", "2:12",
                            "time is not an axis of a value: the language is causal"),
    "bidirectional recurrence": ("bidirectional recurrence f(x) -> y {\n    y = x\n}\n", "1:1",
                                 "a bidirectional layer is a forward and a reverse recurrence"),
    "reverse after the outputs": ("recurrence f(x) -> y reverse {\n    y = x\n}\n", "1:22",
                                  "'reverse' goes before 'recurrence'"),
    "reverse as a statement": ("recurrence f(x) -> y {\n    reverse\n    y = x\n}\n", "2:12",
                               "'reverse' is not a statement"),
}


@pytest.mark.parametrize("case", sorted(SYNTAX_ERRORS))
def test_what_a_user_trying_to_run_backwards_is_told(case):
    text, where, says = SYNTAX_ERRORS[case]
    with pytest.raises(SpecError) as raised:
        recurrence_dsl.load_text(text)
    message = str(raised.value)
    assert f"<string>:{where}:" in message and says in message, message


def test_show_and_prove_name_the_direction(capsys):
    code = recdsl_main(["check", str(DATA / "bidirectional.rec"), "--prove", "--shape",
                        "B=1,T=9,H=1,P=3,N=4,K=4,V=3,D=5"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert printed.count("equal (exact)") >= 16 and "triton/chunked" in printed
    assert recdsl_main(["show", str(DATA / "bidirectional.rec")]) == 0
    shown = capsys.readouterr().out
    assert "reverse recurrence ssd_backward  (spec hash" in shown
    assert "\nrecurrence ssd_forward  (spec hash" in "\n" + shown
    assert "reverse: steps run t = T-1, ..., 0" in shown


# ---------------------------------------------------------------------------------------------------------
# small states: 0-axis, read elementwise, summed over both axes
# ---------------------------------------------------------------------------------------------------------

SHAPES = recurrence_dsl.load(DATA / "state_shapes.rec")
ALL_FORMS = ["recurrent", "scan", "chunked", "parallel"]
SHAPE_SIZES = {"D": 5, "K": 4, "V": 3}
LIFTED = {"running_count": {"n": "scalar"}, "counted_attention": {"n": "scalar"}, "leaky": {"h": "row"},
          "gated_vector": {"h": "row"}, "totals": {}}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_small_states_get_the_chunked_form(name):
    """Every form on both backends against the reference, and the analysis's account of it: which states are
    held with a size-1 key axis, and the algebraic proof."""
    rec = SHAPES[name]
    analysis = analyse(rec.checked)
    assert analysis.lifted == LIFTED[name] and not analysis.unavailable
    assert all(r.proved for r in prove(analysis)), [r for r in prove(analysis) if not r.proved]
    described = describe(rec)
    assert {s["name"] for s in described["states"] if s["chunked_with_unit_key_axis"]} == set(LIFTED[name])
    failures = _check_reverse(rec, SHAPE_SIZES, ALL_FORMS)
    assert not failures, failures


@pytest.mark.parametrize("name", ["counted_attention", "gated_vector", "totals"])
def test_gradients_through_the_chunked_form_of_small_states(name):
    rec = SHAPES[name]
    args, initial = _reverse_case(rec, SHAPE_SIZES, 11, batch=2)
    out, final = rec.reference(*args, initial_state=initial, output_final_state=True)
    gen = torch.Generator().manual_seed(4)
    weights = {k: torch.randn(v.shape, generator=gen, dtype=F64) for k, v in flatten(rec, out, final).items()}
    want = _grads(rec.reference, rec, args, initial, weights)
    for backend, dtype, tol in (("torch", F64, 1e-9), ("triton", F32, 1e-4)):
        layer = recurrence_dsl.compile(rec, backend=backend, chunk_size=16 if backend == "triton" else 4,
                                       tuning=False)
        init = {k: v.to(dtype) for k, v in as_dict(initial, rec.checked.states).items()}
        got = _grads(layer, rec, [a.to(dtype) for a in args], init, weights, form="chunked")
        errors = [rel(g, w) for g, w in zip(got, want)]
        assert max(errors) <= tol, (backend, errors)


def test_show_says_how_a_small_state_is_chunked(capsys):
    assert recdsl_main(["show", str(DATA / "state_shapes.rec")]) == 0
    shown = capsys.readouterr().out
    assert "chunked as n[1]: a key axis of size 1 in front, so n is a key-only state" in shown
    assert "chunked as h[1, d]: a key axis of size 1 in front" in shown
    assert "output n = sum(j, R_1[j])" in shown


# ---------------------------------------------------------------------------------------------------------
# coupled elementwise states: one block per element, scanned
# ---------------------------------------------------------------------------------------------------------

COUPLED = {**recurrence_dsl.load(DATA / "coupled.rec"), "rotation": ROTATION["rotation"]}


@pytest.mark.parametrize("name", ["cascade", "rotation"])
def test_coupled_states_scan_as_one_block(name):
    rec = COUPLED[name]
    analysis = analyse(rec.checked)
    assert analysis.cls.value == "coupled-elementwise" and list(analysis.forms) == ["recurrent", "scan"]
    block = next(iter(analysis.states.values())).block
    assert block.states == tuple(s.name for s in rec.checked.states) and len(block.matrix) == 2
    assert all(r.proved for r in prove(analysis))
    sizes = {"D": 5}
    failures = _check_reverse(rec, sizes, ["recurrent", "scan"])
    failures += _check_reverse(rec, sizes, ["recurrent", "scan"], reverse=True)
    assert not failures, failures
    # gradients through the scan form's block products, float64, against the reference's autograd
    args, initial = _reverse_case(rec, sizes, 13, batch=2)
    out, final = rec.reference(*args, initial_state=initial, output_final_state=True)
    gen = torch.Generator().manual_seed(5)
    weights = {k: torch.randn(v.shape, generator=gen, dtype=F64) for k, v in flatten(rec, out, final).items()}
    want = _grads(rec.reference, rec, args, initial, weights)
    layer = recurrence_dsl.compile(rec, backend="torch", tuning=False)
    got = _grads(layer, rec, args, initial, weights, form="scan")
    assert max(rel(g, w) for g, w in zip(got, want)) <= 1e-9


def test_a_block_scan_equals_the_loop():
    """codegen.torch_runtime.scan_block against s_t = A_t s_(t-1) + b_t stepped (3x3 blocks, T = 37)."""
    from codegen.torch_runtime import scan_block

    gen = torch.Generator().manual_seed(6)
    a = torch.randn(2, 37, 3, 4, 3, 3, generator=gen, dtype=F64) * 0.5
    b = torch.randn(2, 37, 3, 4, 3, generator=gen, dtype=F64)
    s0 = torch.randn(2, 3, 4, 3, generator=gen, dtype=F64)
    state, want = s0, []
    for t in range(37):
        state = (a[:, t] @ state.unsqueeze(-1)).squeeze(-1) + b[:, t]
        want.append(state)
    assert rel(scan_block(a, b, s0), torch.stack(want, dim=1)) < 1e-12
    assert scan_block(a[:, :0], b[:, :0], s0).shape == (2, 0, 3, 4, 3)


def test_coupling_without_a_block_says_where():
    analysis = analyse(COUPLED["momentum_memory"].checked)
    assert list(analysis.forms) == ["recurrent"]
    why = analysis.unavailable["scan"]
    assert "coupled with M but at 16:5: P[i, j] reads M[a, j] summed over a, not the same element" in why, why
