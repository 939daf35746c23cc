"""The Triton recurrent form's backward: the derived adjoint (recurrence_dsl/adjoint.py) as a Triton kernel
(codegen/triton_recurrent.py `TritonAdjointWriter`), run in Triton's interpreter.

Every spec of specs/: gradients of every input, param and initial state, with a gradient on the final state too, of
`backend="triton", form="recurrent"` against the float64 reference interpreter's autograd (relative error <= 1e-5
in float32), over several checkpoint segments (a checkpoint every 4 steps, the last segment shorter); with the
generated module's torch recurrent forms made to raise, so a torch form running anywhere in the call or its
backward fails the test. Then the free axis split over several programs (sizes of 40 lanes: a full and a partial
tile of 32), where gradients without that axis are summed over the tiles' parts; tests/test_adjoint.py's bodies (a
scalar and a 3-axis state, every function, coupled states); a body with no adjoint keeping the torch backward;
packed sequences; no steps; the kernels compiled for sm_90 (bfloat16, 64 lanes) without spills; and, on a GPU only,
K = V = 64 and T = 300 in float32 and bfloat16.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

import recurrence_dsl
from codegen import kernel_report
from codegen.dispatch import CHECKPOINT_EVERY, RECURRENT_BACKWARD, with_torch_backward
from codegen.triton_recurrent import has_triton_adjoint
from recurrence_dsl.analysis import analyse
from recurrence_dsl.sampling import sample_arguments

from .children import Child
from .conftest import REPO, SPEC_FILES, as_dict, made_by, small_sizes, weighted_gradients
from .test_adjoint import EXTRA

pytest.importorskip("triton")

SPECS: dict[str, recurrence_dsl.Recurrence] = {}
for _path in SPEC_FILES:
    SPECS.update(recurrence_dsl.load(_path))

B, T, H, EVERY = 2, 11, 2, 4  # three segments: 4 + 4 + 3 steps
TOL = 1e-5


def _torch_form_ran(*args, **kwargs):
    raise AssertionError("a torch form of the recurrence ran on the Triton path")


@pytest.fixture
def every(monkeypatch):
    monkeypatch.setenv(CHECKPOINT_EVERY, str(EVERY))


def _layer(rec, monkeypatch):
    """The Triton recurrent layer of `rec`, with its module's torch recurrent forms (the step loop and the torch
    adjoint, which the old backward re-ran) replaced in place by a function that raises."""
    layer = recurrence_dsl.compile(rec, backend="triton", form="recurrent", tuning=False)
    module = sys.modules[type(layer).__module__]
    for form in ("recurrent_loop", "recurrent_adjoint"):
        fn = getattr(module, f"{rec.name}__{form}", None)
        if fn is not None:  # its code swapped, so every reference to it (the forms' closures too) raises
            monkeypatch.setattr(fn, "__code__", _torch_form_ran.__code__)
    return layer, module


def _grads(fn, rec, args, initial, weights=None, seed=0, **kwargs):
    """Gradients of every argument and initial state for sum(w * outputs) + sum(w * final states), the weights,
    and the first output (to see which backward it has)."""
    calls = []

    def call(*inputs, **options):  # keeps the call's result: its first output's grad_fn names the backward
        calls.append(fn(*inputs, **options))
        return calls[-1]

    grads, weights = weighted_gradients(call, rec, args, initial, weights, seed=seed, **kwargs)
    first = next(iter(as_dict(calls[0][0], rec.checked.outputs).values()))
    return grads, weights, first


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _compare(rec, monkeypatch, sizes=None, batch=B, length=T, **call) -> dict[str, float]:
    """Relative errors of the Triton recurrent form's gradients against the reference's, by argument name."""
    sizes = sizes or small_sizes(rec)
    rows = None if "cu_seqlens" not in call else len(call["cu_seqlens"]) - 1
    args, initial = sample_arguments(rec.checked, sizes, batch, length, H, dtype=torch.float64, seed=1,
                                     with_initial_state=True, rows=rows)
    ref, weights, _ = _grads(rec.reference, rec, args, initial, **call)
    layer, _ = _layer(rec, monkeypatch)
    init32 = {k: v.float() for k, v in as_dict(initial, rec.checked.states).items()}
    got, _, out = _grads(layer, rec, [a.float() for a in args], init32, weights, **call)
    if "cu_seqlens" not in call:  # (packed sequences are concatenated after their backward functions)
        node = made_by(out)
        while type(node).__name__ == "FlipBackward0":  # a reverse run: the forward run's outputs, flipped back
            node = node.next_functions[0][0]
        assert "_AdjointBackward" in type(node).__name__  # the derived backward, not a torch re-run
    names = [s.name for s in rec.checked.inputs + rec.checked.params + rec.checked.states]
    for n, g, r in zip(names, got, ref):
        assert g is not None and g.shape == r.shape, n
    return {n: _rel(g, r) for n, g, r in zip(names, got, ref)}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_gradients_match_the_reference(name, every, monkeypatch):
    errors = _compare(SPECS[name], monkeypatch)  # (the layer's backward is the adjoint kernel: asserted there)
    print(name, {n: f"{e:.1e}" for n, e in errors.items()})
    assert max(errors.values()) <= TOL, errors


# Specs whose free axis (V, or D for mamba, P for mamba2) gets 40 lanes: two programs, the second partly padding.
# normalized_linear_attention: a state (z[K]) and a readout without the free axis; mamba: params along it
# (A[D, N], Dskip[D]); retention, gated_delta_net: a scalar param or inputs, summed over every lane.
SPLIT = ["normalized_linear_attention", "mamba", "retention", "gated_delta_net"]


@pytest.mark.parametrize("name", SPLIT)
def test_gradients_with_the_free_axis_over_several_programs(name, every, monkeypatch):
    rec = SPECS[name]
    free = {"mamba": "D", "mamba2": "P"}.get(name, "V")
    sizes = {**small_sizes(rec), free: 40}
    errors = _compare(rec, monkeypatch, sizes=sizes, batch=1)
    print(name, {n: f"{e:.1e}" for n, e in errors.items()})
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("name", ["scalar_state", "coupled_after", "coupled_before"])
def test_bodies_beyond_the_specs(name, every, monkeypatch):
    """tests/test_adjoint.py's bodies: a scalar state beside a 3-axis one and every function the language has;
    two states, one reading the other's new value, or the other's old value before its own update."""
    errors = _compare(EXTRA[name], monkeypatch)
    print(name, {n: f"{e:.1e}" for n, e in errors.items()})
    assert max(errors.values()) <= TOL, errors


def test_a_body_with_no_adjoint_keeps_the_torch_backward():
    """A diagonal read (`x[d, d]`) has no derived adjoint: has_triton_adjoint says so, and the Triton recurrent form
    differentiates by re-running the torch form (autograd through its loop), as before."""
    rec = EXTRA["diagonal"]
    assert not has_triton_adjoint(analyse(rec.checked))
    layer = recurrence_dsl.compile(rec, backend="triton", form="recurrent", tuning=False)
    x = torch.randn(1, 5, 1, 3, 3, requires_grad=True)
    a = torch.rand(1, 5, 1, 3, requires_grad=True)
    out, _ = layer(x, a)
    assert "_RecomputeBackward" in type(made_by(out)).__name__
    out.sum().backward()
    ref_x, ref_a = x.detach().double().requires_grad_(), a.detach().double().requires_grad_()
    rec.reference(ref_x, ref_a)[0].sum().backward()
    assert _rel(x.grad, ref_x.grad) <= TOL and _rel(a.grad, ref_a.grad) <= TOL


def test_the_autograd_setting_leaves_the_kernels_on_their_adjoint(every, monkeypatch):
    """RECURRENCE_DSL_RECURRENT_BACKWARD=autograd (autograd through the torch step loop, for comparisons) cannot
    apply to a loop of kernels: the Triton form keeps its adjoint and its gradients."""
    monkeypatch.setenv(RECURRENT_BACKWARD, "autograd")
    errors = _compare(SPECS["indrnn"], monkeypatch)
    assert max(errors.values()) <= TOL, errors


def test_packed_sequences(every, monkeypatch):
    """cu_seqlens with an empty sequence: each sequence from its own initial state and checkpoints."""
    errors = _compare(SPECS["gated_delta_net"], monkeypatch, batch=1, length=15, cu_seqlens=torch.tensor([0, 6, 6, 15]))
    assert max(errors.values()) <= TOL, errors


def test_no_steps(monkeypatch):
    """T = 0: no checkpoint, no segment; zero gradients for inputs, the final state's gradient for the initial one."""
    rec = SPECS["rwkv7"]
    args, initial = sample_arguments(rec.checked, small_sizes(rec), B, 0, H, dtype=torch.float32, seed=0,
                                     with_initial_state=True)
    layer, _ = _layer(rec, monkeypatch)
    got, weights, _ = _grads(layer, rec, args, initial)
    for g, a in zip(got, args):
        assert g.shape == a.shape and not g.any()
    assert torch.allclose(got[-1], weights[1]["S"].float())


def test_the_raising_torch_forms_catch_the_old_backward(monkeypatch):
    """The check above can fail: the old Triton backward (re-running the torch recurrent form) raises under it."""
    rec = SPECS["gla"]
    layer, module = _layer(rec, monkeypatch)
    def forward(*args):
        return module.gla__triton_recurrent_loop(*args)[:2]

    old = with_torch_backward(forward, module.gla__recurrent, ("o",), ("S",))  # (the module no longer needs it)
    args, _ = sample_arguments(rec.checked, small_sizes(rec), 1, 3, 1, dtype=torch.float32, seed=0)
    args = [a.requires_grad_() for a in args]
    outputs, _ = old(*args, {"S": torch.zeros(1, 1, 4, 3)}, 4, 3)
    with pytest.raises(AssertionError, match="a torch form of the recurrence ran"):
        outputs["o"].sum().backward()


CHILD = """
import json, sys
import torch
import recurrence_dsl
from codegen import kernel_report as kr

runs = []
for name in json.loads(sys.argv[1]):
    rec = recurrence_dsl.load(f"{sys.argv[2]}/{name}.rec")[name]
    sizes = {s: 64 for s in rec.checked.sizes}
    kernels = kr.report_recurrence(rec, sizes, 1, 64, 4, dtype=torch.bfloat16, target="sm_90", form="recurrent",
                                   backward=True)
    runs += [dict(k.as_dict(), spec=name) for k in kernels]
print(json.dumps(runs))
"""


def _compile_tools_missing() -> str:
    try:
        kernel_report.find_tools("sm_90")
    except kernel_report.ToolMissing as err:
        return str(err)
    return ""


ADJOINT_NAMES = ["gated_delta_net", "minimal_rnn"]
# run in the background from the start of the session (tests/children.py)
ADJOINT_COMPILES = Child("triton_adjoint_sm90", [sys.executable, "-c", CHILD, json.dumps(ADJOINT_NAMES),
                                                 str(REPO / "specs")])


@pytest.mark.skipif(bool(_compile_tools_missing()), reason=_compile_tools_missing() or "-")
@ADJOINT_COMPILES.needed
def test_the_adjoint_kernels_compile_for_sm90_without_spills():
    """bfloat16, K = V = 64 (D = 64): the two adjoint kernels with the least headroom, gated_delta_net's (the
    delta rule, split over V) and minimal_rnn's (whole [D, D] params and their gradients in one program), compiled
    for sm_90 in a child process without the interpreter (as tests/test_no_spills.py does): no local memory."""
    names = ADJOINT_NAMES
    done = ADJOINT_COMPILES.result()
    assert done.returncode == 0, done.stderr[-3000:]
    kernels = json.loads(done.stdout.strip().splitlines()[-1])
    adjoints = [k for k in kernels if k["name"].endswith("__triton_recurrent_adjoint_kernel")]
    assert sorted(k["spec"] for k in adjoints) == names  # the backward launched the adjoint kernel, once each
    for k in kernels:
        assert k["spill_bytes"] == 0, k
        assert 0 < k["registers"] <= kernel_report.MAX_REGISTERS, k


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["gla", "gated_delta_net", "rwkv7", "minimal_rnn"])
def test_gradients_on_a_gpu(name, dtype):
    """On CUDA (deselected elsewhere, see conftest.py): K = V = 64, T = 300 (five segments at the default
    checkpoint spacing of 64), inputs in `dtype`, against the float64 reference on the same rounded inputs."""
    assert torch.cuda.is_available(), "selected with -m gpu without a CUDA GPU"
    rec = SPECS[name]
    args, initial = sample_arguments(rec.checked, {s: 64 for s in rec.checked.sizes}, 2, 300, 2, dtype=torch.float64,
                                     seed=5, with_initial_state=True)
    args = [a.to("cuda", dtype) for a in args]
    initial = initial.to("cuda", torch.float32)
    ref, weights, _ = _grads(rec.reference, rec, [a.double() for a in args], initial.double())
    layer = recurrence_dsl.compile(rec, backend="triton", form="recurrent", tuning=False)
    got, _, out = _grads(layer, rec, args, initial, weights)
    fn = made_by(out)  # _AdjointBackward, or the cast of its output to bfloat16 right after it
    assert "_AdjointBackward" in {type(f).__name__ for f in [fn] + [f for f, _ in fn.next_functions if f is not None]}
    errors = [_rel(g, r) for g, r in zip(got, ref, strict=True)]
    assert max(errors) <= (1e-4 if dtype == torch.float32 else 2e-2), (name, errors)
