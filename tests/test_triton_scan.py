"""The scan form on the Triton backend (issues 10 and 12): codegen/triton_scan.py's chunked associative scans.

Every recurrence of specs/ and tests/data/ whose Triton backend has a scan form (the identity, scalar, diagonal and
elementwise classes, and coupled elementwise states in m x m blocks, m = 2 .. 4: tests/data/coupled.rec's cascade,
tests/data/rotation.rec's complex diagonal, tests/data/coupled_blocks.rec's cascades of three and four states and a
complex diagonal feeding a third state) runs `form="scan"` on the Triton backend in float32 against the float64
reference interpreter: outputs, final states, and the gradients of every input, param and initial state (a random
weighting of every output and final state), while every torch runtime scan of the generated module raises (so the
backward is the scan kernels' own, whose runs are counted). T = 37 in chunks of 16 (the last one partial) over
several programs per row, and with the default blocks; packed sequences (`cu_seqlens`) and `reverse=True` on the
elementwise and coupled classes; the runtime itself (2 x 2, 3 x 3 and 4 x 4 blocks) in float64 against
`torch.autograd.gradcheck` and the torch runtime; five coupled states, which the Triton scan refuses with its reason
(the analysis, `show` and the call's error); resets (a decay of exactly 0) and a decay above 1. The Triton
interpreter runs the kernels (conftest), with its associative_scan vectorised over the non-scan axes
(codegen/interpreter.py; checked here to give the interpreter's own numbers bit for bit). The compile-only report:
the scan kernels (diagonal, and blocks of 2, 3 and 4) for sm_90 and sm_80, bfloat16, D = 128, no spills.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

import recurrence_dsl
from codegen import kernel_report
from codegen.layer import interpreting
from codegen.triton_recurrent import triton_form_names
from recurrence_dsl.analysis import analyse
from recurrence_dsl.sampling import sample_arguments

from .children import Child
from .conftest import REPO, SPEC_FILES, as_dict

triton = pytest.importorskip("triton")
triton_scan = pytest.importorskip("codegen.triton_scan")
torch_runtime = pytest.importorskip("codegen.torch_runtime")

F32, F64 = torch.float32, torch.float64
TOL = 1e-5  # float32 against the float64 reference, relative
DATA = sorted((REPO / "tests" / "data").glob("*.rec"))
RECS: dict[str, recurrence_dsl.Recurrence] = {}
for _path in SPEC_FILES + [p for p in DATA if p.name != "language_examples.rec"]:  # (that one repeats specs/)
    for _name, _rec in recurrence_dsl.load(_path).items():
        RECS[f"{_path.stem}:{_name}"] = _rec
SCAN = sorted(k for k, r in RECS.items() if "scan" in triton_form_names(analyse(r.checked)))
BLOCKS = {"block_t": 16, "block_n": 16, "num_warps": 1}  # three chunks of T = 37, several programs per row
# the torch runtime's scans, as a generated module names them: none may run on the Triton path
TORCH_SCANS = ("scan_diagonal", "scan_block")


def test_every_scan_class_is_covered():
    """The recurrences checked here: every one with a scan form has it on the Triton backend (a new one joins by
    itself), the elementwise and coupled ones among them."""
    assert {"mamba:mamba", "gla:gla", "retention:retention", "coupled:cascade", "rotation:rotation",
            "state_shapes:running_count", "coupled_blocks:cascade3", "coupled_blocks:cascade4",
            "coupled_blocks:rotation_plus"} <= set(SCAN)
    for key, rec in RECS.items():
        a = analyse(rec.checked)
        assert ("scan" in a.forms) == (key in SCAN), key
    assert "coupled:momentum_memory" not in SCAN  # general: no scan form


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _sizes(rec) -> dict[str, int]:
    return {s: 4 for s in rec.checked.sizes}


def _run(fn, rec, args, initial, weights=None, **kwargs):
    """Outputs, final states and the gradients of every argument and initial state for a random weighting of
    every output and final state."""
    checked = rec.checked
    leaves = [a.detach().clone().requires_grad_() for a in args]
    init = {k: v.detach().clone().requires_grad_() for k, v in as_dict(initial, checked.states).items()}
    out, final = fn(*leaves, initial_state=init if len(init) > 1 else next(iter(init.values())),
                    output_final_state=True, **kwargs)
    out, final = as_dict(out, checked.outputs), as_dict(final, checked.states)
    if weights is None:
        gen = torch.Generator().manual_seed(1)
        weights = [{k: torch.randn(v.shape, generator=gen, dtype=F64) for k, v in d.items()} for d in (out, final)]
    loss = sum((out[k].double() * w).sum() for k, w in weights[0].items())
    (loss + sum((final[k].double() * w).sum() for k, w in weights[1].items())).backward()
    grads = [x.grad for x in leaves] + [init[s.name].grad for s in checked.states]
    return {**out, **{f"final {k}": v for k, v in final.items()}}, grads, weights


def _triton_only(layer, monkeypatch) -> list:
    """Make the generated module's torch scans raise; count the Triton scan's forward and backward runs."""
    scope = layer.triton_forms["scan"].__globals__

    def refuse(*args, **kwargs):
        raise AssertionError("a torch scan ran on the Triton path")

    for name in TORCH_SCANS:
        monkeypatch.setitem(scope, name, refuse)
    runs = []
    # the scan of a and b from a prologue, or the fused one that computes them in its kernels (`fused_scan`)
    # (a module keeps only the runtime it uses: a spec whose every state is fused has no _ScanFunction)
    for fn_cls in filter(None, (scope.get("_triton_ScanFunction"), scope.get("_triton_FusedScan"))):
        forward, backward = fn_cls.forward, fn_cls.backward

        def counted_forward(ctx, *args, forward=forward):
            runs.append("forward")
            return forward(ctx, *args)

        def counted_backward(ctx, *grads, backward=backward):
            runs.append("backward")
            return backward(ctx, *grads)

        monkeypatch.setattr(fn_cls, "forward", staticmethod(counted_forward))
        monkeypatch.setattr(fn_cls, "backward", staticmethod(counted_backward))
    return runs


def _check(key, monkeypatch, T=37, B=1, H=2, lengths=None, config=None, **call):
    rec = RECS[key]
    rows = None if lengths is None else len(lengths)
    cu = None if lengths is None else torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    args, initial = sample_arguments(rec.checked, _sizes(rec), B, T, H, dtype=F64, seed=7, with_initial_state=True,
                                     rows=rows)
    ref_out, ref_grads, weights = _run(rec.reference, rec, args, initial, cu_seqlens=cu, **call)
    layer = recurrence_dsl.compile(rec, backend="triton", form="scan", tuning=False)
    runs = _triton_only(layer, monkeypatch)
    init32 = {k: v.float() for k, v in as_dict(initial, rec.checked.states).items()}
    out, grads, _ = _run(layer, rec, [a.float() for a in args], init32, weights, cu_seqlens=cu, config=config,
                         **call)
    assert "forward" in runs and "backward" in runs, runs
    names = [s.name for s in rec.checked.inputs + rec.checked.params + rec.checked.states]
    errors = {k: _rel(v, ref_out[k]) for k, v in out.items()}
    errors.update({f"d{n}": _rel(g, r) for n, g, r in zip(names, grads, ref_grads)})
    assert all(v.dtype == F32 for v in out.values())
    assert max(errors.values()) <= TOL, errors
    return errors


@pytest.mark.parametrize("key", SCAN)
def test_forward_and_gradients_match_the_reference(key, monkeypatch):
    _check(key, monkeypatch, config=BLOCKS)


@pytest.mark.parametrize("key", ["mamba:mamba", "rotation:rotation", "coupled:cascade"])
def test_default_blocks_two_rows(key, monkeypatch):
    _check(key, monkeypatch, B=2, T=45)


@pytest.mark.parametrize("key", ["mamba:mamba", "rotation:rotation", "coupled:cascade", "gla:gla",
                                 "coupled_blocks:cascade3", "coupled_blocks:cascade4"])
@pytest.mark.parametrize("reverse", [False, True])
def test_packed_sequences_and_reverse(key, reverse, monkeypatch):
    """cu_seqlens with three sequences (one empty), each from its own initial state; reverse=True runs each one
    from its last step to its first, forward and backward."""
    _check(key, monkeypatch, lengths=(20, 0, 17), reverse=reverse, config=BLOCKS)


def test_auto_runs_the_scan_kernels_where_there_is_no_chunked_form(monkeypatch):
    """mamba (elementwise) on the Triton backend: `auto` runs the scan form beyond 16 steps, no longer the step
    loop."""
    rec = RECS["mamba:mamba"]
    layer = recurrence_dsl.compile(rec, backend="triton", tuning=False)
    args, initial = sample_arguments(rec.checked, _sizes(rec), 1, 40, 2, dtype=F32, seed=3, with_initial_state=True)
    assert layer.config_for(*args)["form"] == "scan"
    assert layer.config_for(*[a[:, :10] for a in args])["form"] == "recurrent"
    runs = _triton_only(layer, monkeypatch)
    with torch.no_grad():
        out, _ = layer(*args, initial_state=initial)
    assert runs == ["forward"]
    ref, _ = rec.reference(*[a.double() for a in args], initial_state=initial.double())
    assert _rel(out, ref) <= TOL


def test_a_config_reaches_the_kernels():
    rec = RECS["mamba:mamba"]
    layer = recurrence_dsl.compile(rec, backend="triton", form="scan", tuning=False)
    args, _ = sample_arguments(rec.checked, _sizes(rec), 1, 20, 1, dtype=F32, seed=4)
    assert layer.config_for(*args, config=BLOCKS)["config"] == BLOCKS
    a, b = layer(*args, config=BLOCKS)[0], layer(*args)[0]
    assert _rel(a, b) <= 1e-6
    with pytest.raises(ValueError, match="block_t must be a power of two"):
        layer(*args, config={**BLOCKS, "block_t": 12})


# ---------------------------------------------------------------------------------------------------------------
# The runtime on its own
# ---------------------------------------------------------------------------------------------------------------


def _leaves(*xs):
    return [x.clone().requires_grad_() for x in xs]


# (a, b) shapes, and smaller ones for gradcheck
@pytest.mark.parametrize("shapes", [((2, 23, 3, 4, 1), (2, 23, 3, 4, 5), (1, 6, 2, 2, 1), (1, 6, 2, 2, 3)),  # key
                                    ((1, 1, 1, 1), (2, 23, 3, 6), (1, 1, 1, 1), (1, 6, 2, 3)),  # a constant
                                    ((2, 23, 6), (2, 23, 6), (1, 9, 4), (1, 9, 4))])  # elementwise
def test_diagonal_runtime_against_torch_and_gradcheck(shapes):
    gen = torch.Generator().manual_seed(5)

    def draw(a_shape, b_shape):
        a = torch.rand(a_shape, generator=gen, dtype=F64) * 0.6 + 0.5  # some steps grow (a > 1)
        if a.shape[1] > 4:
            a[:, 3] = 0.0  # a reset
        h0 = torch.randn((b_shape[0],) + b_shape[2:], generator=gen, dtype=F64)
        return a, torch.randn(b_shape, generator=gen, dtype=F64), h0

    a, b, h0 = draw(*shapes[:2])
    mine, ref = _leaves(a, b, h0), _leaves(a, b, h0)
    s = triton_scan.scan_diagonal(*mine, block_t=8, block_n=8)
    s_ref = torch_runtime.scan_diagonal(*ref)
    w = torch.randn(s.shape, generator=gen, dtype=F64)
    (s * w).sum().backward()
    (s_ref * w).sum().backward()
    assert s.dtype == F64 and _rel(s, s_ref) <= 1e-13
    for x, y in zip(mine, ref):
        assert x.grad.shape == y.grad.shape and _rel(x.grad, y.grad) <= 1e-13
    assert torch.autograd.gradcheck(lambda a_, b_, h_: triton_scan.scan_diagonal(a_, b_, h_, block_t=4, block_n=4),
                                    _leaves(*draw(*shapes[2:])), fast_mode=True)


@pytest.mark.parametrize("m", [2, 3, 4])
def test_block_runtime_against_torch_and_gradcheck(m):
    """The printed m x m kernels against the torch runtime's block scan (T = 23 over chunks of 8, several programs
    a row, a reset of every state at step 4), and gradcheck on a small case."""
    gen = torch.Generator().manual_seed(6 + m)
    A = torch.randn(2, 23, 3, 5, m, m, generator=gen, dtype=F64) * (1.4 / m)
    A[:, 4] = 0.0  # a reset of every state
    b = torch.randn(2, 23, 3, 5, m, generator=gen, dtype=F64)
    h0 = torch.randn(2, 3, 5, m, generator=gen, dtype=F64)
    mine, ref = _leaves(A, b, h0), _leaves(A, b, h0)
    s = triton_scan.scan_block(*mine, block_t=8, block_n=4)
    s_ref = torch_runtime.scan_block(*ref)
    w = torch.randn(s.shape, generator=gen, dtype=F64)
    (s * w).sum().backward()
    (s_ref * w).sum().backward()
    assert s.dtype == F64 and _rel(s, s_ref) <= 1e-13
    for x, y in zip(mine, ref):
        assert x.grad.shape == y.grad.shape and _rel(x.grad, y.grad) <= 1e-13
    assert torch.autograd.gradcheck(lambda a_, b_, h_: triton_scan.scan_block(a_, b_, h_, block_t=4, block_n=2),
                                    _leaves(A[:1, :6, :1, :2], b[:1, :6, :1, :2], h0[:1, :1, :2]), fast_mode=True)


FIVE = """
recurrence cascade5(x[D], a[D]) -> y[D] {
    state h1[D], h2[D], h3[D], h4[D], h5[D]
    h1[d] = sigmoid(a[d]) * h1[d] + x[d]
    h2[d] = 0.5 * h2[d] + h1[d]
    h3[d] = 0.5 * h3[d] + h2[d]
    h4[d] = 0.5 * h4[d] + h3[d]
    h5[d] = 0.5 * h5[d] + h4[d]
    y[d] = h5[d]
}
"""


def test_five_coupled_states_have_no_triton_scan_and_say_why(capsys, tmp_path):
    """A 5 x 5 block: the torch backend scans it, the Triton backend refuses the scan form with the reason, in
    the call's error and in `recdsl show`; the runtime names the block size it has no kernels for."""
    from codegen.triton_block_scan import MAX_BLOCK
    from codegen.triton_recurrent import triton_unavailable
    from recurrence_dsl.cli import main as recdsl_main

    rec = recurrence_dsl.load(FIVE)["cascade5"]
    a = analyse(rec.checked)
    assert "scan" in a.forms and triton_form_names(a) == ("recurrent",) and MAX_BLOCK == 4
    why = triton_unavailable(a)["scan"]
    assert "h1, h2, h3, h4, h5 are coupled in blocks of 5" in why and "at most 4 coupled states" in why, why
    layer = recurrence_dsl.compile(rec, backend="triton", tuning=False)
    args, _ = sample_arguments(rec.checked, {"D": 3}, 1, 6, 1, dtype=F32, seed=2)
    with pytest.raises(ValueError, match=r"has no 'scan' form on the triton backend \(h1, h2, h3, h4, h5 are coupled"):
        layer(*args, form="scan")
    torch_layer = recurrence_dsl.compile(rec, backend="torch", form="scan", tuning=False)
    ref, _ = rec.reference(*[x.double() for x in args])
    assert _rel(torch_layer(*args)[0], ref) <= TOL
    with pytest.raises(ValueError, match="take 2 to 4 coupled states, got m = 5"):
        triton_scan.scan_block(torch.rand(1, 3, 2, 5, 5), torch.randn(1, 3, 2, 5))
    (tmp_path / "five.rec").write_text(FIVE)
    assert recdsl_main(["show", str(tmp_path / "five.rec")]) == 0
    shown = capsys.readouterr().out
    assert "forms: recurrent, scan" in shown
    assert "on the triton backend, no scan form: h1, h2, h3, h4, h5 are coupled in blocks of 5" in shown, shown
def test_runtime_errors_name_the_argument():
    b = torch.randn(1, 5, 2, 3)
    with pytest.raises(ValueError, match="as many dims as b"):
        triton_scan.scan_diagonal(torch.rand(1, 5, 2), b)
    with pytest.raises(ValueError, match=r"initial_state must be \[1, 2, 3\]"):
        triton_scan.scan_diagonal(torch.rand(1, 5, 2, 3), b, torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match=r"m x m blocks, m >= 2: b \[..., m\] and a \[..., m, m\]"):
        triton_scan.scan_block(torch.rand(1, 5, 2, 3, 2), torch.randn(1, 5, 2, 3))
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        triton_scan.scan_diagonal(torch.rand(1, 5, 2, 3), b, block_n=6)
    assert triton_scan.scan_diagonal(torch.rand(1, 0, 2, 3), torch.randn(1, 0, 2, 3)).shape == (1, 0, 2, 3)


@pytest.mark.skipif(not interpreting(), reason="the patch applies to Triton's interpreter only (no GPU here)")
def test_vectorised_interpreter_scan_gives_the_interpreters_numbers(monkeypatch):
    """codegen/interpreter.py's scan against the interpreter's own element-by-element one, forward and reverse,
    diagonal and block kernels: bit for bit."""
    from triton.runtime.interpreter import ScanOps

    from codegen import interpreter

    assert interpreter.vectorise_interpreter_scans() and interpreter.ORIGINAL_GENERIC_SCAN is not None
    gen = torch.Generator().manual_seed(8)
    A = torch.randn(1, 11, 3, 2, 2, generator=gen) * 0.8
    b = torch.randn(1, 11, 3, 2, generator=gen)
    h0 = torch.randn(1, 3, 2, generator=gen)

    def run():
        x = _leaves(A, b, h0)
        s = triton_scan.scan_block(*x, block_t=8, block_n=2)
        s.backward(torch.ones_like(s))  # the backward kernel's reverse scan
        d = _leaves(A[..., 0], b, h0)
        s2 = triton_scan.scan_diagonal(*d, block_t=8, block_n=2)
        s2.backward(torch.ones_like(s2))
        return [s, s2] + [t.grad for t in x + d]

    fast = run()
    monkeypatch.setattr(ScanOps, "generic_scan", interpreter.ORIGINAL_GENERIC_SCAN)
    slow = run()
    for f, s in zip(fast, slow):
        assert torch.equal(f, s)


# ---------------------------------------------------------------------------------------------------------------
# Compiled for a GPU without one
# ---------------------------------------------------------------------------------------------------------------

try:
    for _target in ("sm_80", "sm_90"):
        kernel_report.find_tools(_target)
    _MISSING = ""
except kernel_report.ToolMissing as err:
    _MISSING = str(err)

CHILD = '''
import json, sys
import torch
import recurrence_dsl
from codegen import kernel_report as kr

runs = []
for path, name, sizes, target in json.loads(sys.argv[1]):
    rec = recurrence_dsl.load(path)[name]
    kernels = kr.report_recurrence(rec, sizes, 2, 256, 4, dtype=torch.bfloat16, target=target, form="scan",
                                   backward=True)
    runs.append([k.as_dict() for k in kernels])
print(json.dumps(runs))
'''


_DATA = REPO / "tests" / "data"
SCAN_CALLS = [(str(REPO / "specs" / "mamba.rec"), "mamba", {"D": 128, "N": 16}, "sm_90"),
              (str(_DATA / "rotation.rec"), "rotation", {"D": 128}, "sm_90"),
              (str(_DATA / "rotation.rec"), "rotation", {"D": 128}, "sm_80"),
              (str(_DATA / "coupled_blocks.rec"), "cascade3", {"D": 128}, "sm_90"),
              (str(_DATA / "coupled_blocks.rec"), "cascade4", {"D": 128}, "sm_90"),
              (str(_DATA / "coupled_blocks.rec"), "cascade4", {"D": 128}, "sm_80")]
# run in the background from the start of the session (tests/children.py)
SCAN_COMPILES = Child("scan_kernels", [sys.executable, "-c", CHILD, json.dumps(SCAN_CALLS)])


@pytest.mark.skipif(bool(_MISSING), reason=_MISSING or "-")
@SCAN_COMPILES.needed
def test_scan_kernels_compile_without_spills():
    """mamba (D = 128, N = 16), the rotation (2 x 2 blocks), the three-state cascade (3 x 3) and the four-state one
    (4 x 4), D = 128, in bfloat16, forward and backward, for sm_90 and sm_80: every scan kernel compiles, uses no
    local memory and fits the target's shared memory. The compiles run in a child process without
    TRITON_INTERPRET (as in tests/test_no_spills.py)."""
    done = SCAN_COMPILES.result()
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    names = [{(k["name"], k["phase"]) for k in run} for run in runs]
    # mamba's prologue runs inside its printed scan kernels (`fused_scan`)
    assert names[0] == {("mamba__scan_h_fwd_kernel", "forward"), ("mamba__scan_h_bwd_kernel", "backward")}
    for run, m in zip(names[1:], (2, 2, 3, 4, 4)):
        assert run == {(f"_triton_block{m}_scan_fwd_kernel", "forward"), (f"_triton_block{m}_scan_bwd_kernel",
                                                                         "backward")}
    for (_, _, _, target), run in zip(SCAN_CALLS, runs):
        for k in run:
            assert k["spill_bytes"] == 0, k
            assert 0 < k["registers"] <= kernel_report.MAX_REGISTERS, k
            assert k["shared_bytes"] <= kernel_report.TARGETS[target].max_shared_bytes, k
    # mamba: B * H * D * N = 2 * 4 * 128 * 16 state elements, 64 a program: 128 programs a row, on one axis
    assert runs[0][0]["grid"] == [256, 1, 1]
    # the 4 x 4 cascade: B * H * D = 2 * 4 * 128 blocks, 8 a program: 64 programs a row, on one axis
    assert runs[4][0]["grid"] == [128, 1, 1]
