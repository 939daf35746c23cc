"""CUDA's grid limits on the chunked Triton form (issue 10): 2^31 - 1 programs on axis 0, 65535 on axes 1 and 2.

The chunked kernels (codegen/triton_runtime.py) put batch * heads (sequences * heads when packed) on axis 1 or 2 and
the chunks or 16-step sub-chunks on axis 0 or 1, so a call past the limits runs in pieces that fit
(codegen/dispatch.py `in_grid_pieces`): rows in groups of 65535 // heads, long sequences piece after piece in
time, packed sequences in groups. Checked here:
- in the interpreter, with the limits made tiny (the generated module's `GRID_LIMITS` and `PIECE_STEPS`), that the
  pieces give the outputs, final states and gradients of the call in one piece (float32; gla: a key decay, so the
  state passed between time pieces carries the decay; batch rows, time pieces and packed sequences);
- compiled for sm_90 without a GPU (`codegen.kernel_report`, in a child process without TRITON_INTERPRET), that a
  call at B = 512, H = 128 (65536 rows * heads: one past axis 1's limit) launches only legal grids, forward and
  backward, and that `KernelReport.problems` names a grid past the limits.
"""

from __future__ import annotations

import json
import sys
import unittest.mock

import pytest
import torch

import recurrence_dsl
from codegen import kernel_report
from codegen.dispatch import PIECE_STEPS, sequence_groups
from recurrence_dsl.sampling import sample_arguments

from .children import Child
from .conftest import SPECS_DIR

pytest.importorskip("triton")

_LAYERS: dict = {}


def _layer(name: str):
    if name not in _LAYERS:
        rec = recurrence_dsl.load(SPECS_DIR / f"{name}.rec")[name]
        _LAYERS[name] = recurrence_dsl.compile(rec, tuning=False)
        _LAYERS[name].checked = rec.checked
    return _LAYERS[name]


def test_sequence_groups():
    cu = torch.tensor([0, 5, 5, 40, 41, 100])  # lengths 5, 0, 35, 1, 59
    assert sequence_groups(cu, 65535, 16) == [(0, 5)]
    assert sequence_groups(cu, 2, 16) == [(0, 2), (2, 4), (4, 5)]  # at most 2 sequences a group
    big = PIECE_STEPS
    cu = torch.tensor([0, 10, 10 + big, 20 + big, 30 + big])  # a sequence of PIECE_STEPS steps between short ones
    assert sequence_groups(cu, 65535, 64) == [(0, 1), (1, 2), (2, 4)]
    assert sequence_groups(torch.tensor([0]), 4, 16) == [(0, 0)]


def _run(layer, args, init, **kwargs):
    """Outputs and final states, then the gradients of args and initial states of a fixed weighted sum of both."""
    leaves = [a.detach().requires_grad_() for a in args]
    states = {k: v.detach().requires_grad_() for k, v in init.items()}
    state = states if len(states) > 1 else next(iter(states.values()))
    out, final = layer(*leaves, initial_state=state, output_final_state=True, backend="triton", form="chunked",
                       chunk_size=16, **kwargs)
    flat = [out, *(final.values() if isinstance(final, dict) else [final])]
    gen = torch.Generator().manual_seed(1)
    (sum((r.double() * torch.randn(r.shape, generator=gen, dtype=torch.float64)).sum() for r in flat)).backward()
    return [r.detach() for r in flat] + [t.grad for t in leaves + list(states.values())]


@pytest.mark.parametrize("packed", [False, True], ids=["batch", "packed"])
def test_pieces_match_one_call(monkeypatch, packed):
    layer = _layer("gla")
    module = sys.modules[type(layer).__module__]
    rec = layer.checked
    rows, steps = (5, 70) if packed else (3, 70)
    lengths = [3, 0, 40, 1, 26]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    args, init = sample_arguments(rec, {s: 16 for s in rec.sizes}, rows, steps, 2, dtype=torch.float64, seed=3,
                                  with_initial_state=True)
    args = [a.float() for a in args]
    init = {k: v.float() for k, v in (init if isinstance(init, dict) else {rec.states[0].name: init}).items()}
    n_inputs = len(rec.inputs)
    if packed:  # one packed row of the 5 sequences, each from its own initial state
        args = [a[:1] if i < n_inputs else a for i, a in enumerate(args)]
    kwargs = {"cu_seqlens": cu} if packed else {}
    whole = _run(layer, args, init, **kwargs)
    calls = []
    form = layer.triton_forms["chunked"]

    def counting(*a, **k):
        calls.append(a[0].shape[:2])
        return form(*a, **k)

    counting.run_packed = getattr(form, "run_packed", None)
    monkeypatch.setitem(layer.triton_forms, "chunked", counting)
    # 2 heads: 2 rows (or sequences) a piece, and pieces of 32 steps; packed sequences are padded to whole chunks
    # of 16 in a group's budget of 32 steps, so the 40-, 1- and 26-step sequences each run alone
    monkeypatch.setattr(module, "GRID_LIMITS", (2**31 - 1, 5, 5))
    monkeypatch.setattr(module, "PIECE_STEPS", 32)
    pieces = _run(layer, args, init, **kwargs)
    if packed:  # groups (0, 2) [3 + 0 steps, packed], (2, 3) [40 steps: 32 + 8], (3, 4), (4, 5)
        assert calls == [(1, 3), (1, 32), (1, 8), (1, 1), (1, 26)]
    else:  # rows 0-1 and 2, each in time pieces of 32, 32 and 6 steps
        assert calls == [(2, 32), (2, 32), (2, 6), (1, 32), (1, 32), (1, 6)]
    for got, want in zip(pieces, whole, strict=True):
        assert got.shape == want.shape
        err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
        assert err < 1e-5, err


def test_too_many_heads_is_a_clear_error(monkeypatch):
    layer = _layer("linear_attention")
    module = sys.modules[type(layer).__module__]
    rec = layer.checked
    args, _ = sample_arguments(rec, {s: 16 for s in rec.sizes}, 1, 8, 3, dtype=torch.float64, seed=0)
    monkeypatch.setattr(module, "GRID_LIMITS", (2**31 - 1, 2, 2))
    with pytest.raises(ValueError, match="heads: 3 heads exceed the 2 programs"):
        layer(*[a.float() for a in args], backend="triton", form="chunked", chunk_size=16)


def test_problems_name_an_illegal_grid():
    k = kernel_report.KernelReport(name="_k", grid=(4, 65536, 1), num_warps=4, num_stages=2, registers=64,
                                   spill_bytes=0, shared_bytes=0, compile_seconds=0.0, target="sm_90")
    assert k.problems() == ["_k launches 65536 programs along grid axis 1; CUDA allows 65535"]
    assert not kernel_report.KernelReport(**{**k.__dict__, "grid": (2**31 - 1, 65535, 65535)}).problems()


try:
    kernel_report.find_tools("sm_90")
    _MISSING = ""
except kernel_report.ToolMissing as err:
    _MISSING = str(err)

CHILD = '''
import json, sys
import torch
import recurrence_dsl
from codegen import kernel_report as kr

rec = recurrence_dsl.load(sys.argv[1])["linear_attention"]
kernels = kr.report_recurrence(rec, {"K": 16, "V": 16}, 512, 16, 128, dtype=torch.bfloat16, target="sm_90",
                               form="chunked", backward=True, cached=True)
print(json.dumps([k.as_dict() | {"problems": k.problems()} for k in kernels]))
'''


# run in the background from the start of the session (tests/children.py)
LARGE_GRIDS = Child("grid_limits_large_batch_heads", [sys.executable, "-c", CHILD,
                                                      str(SPECS_DIR / "linear_attention.rec")])


@pytest.mark.skipif(bool(_MISSING), reason=_MISSING or "-")
@LARGE_GRIDS.needed
def test_large_batch_heads_launch_legal_grids():
    done = LARGE_GRIDS.result()
    assert done.returncode == 0, done.stderr[-3000:]
    kernels = json.loads(done.stdout.strip().splitlines()[-1])
    assert {k["phase"] for k in kernels} == {"forward", "backward"}
    for k in kernels:
        assert all(n <= limit for n, limit in zip(k["grid"], kernel_report.MAX_GRID)), k
        assert not k["problems"], k
    # 512 * 128 rows * heads = 65536: one piece of 511 batch rows (65408 programs on the axis) and one of 1
    axes = {n for k in kernels for n in k["grid"]}
    assert 511 * 128 in axes and 128 in axes, sorted(axes)


def test_recurrent_state_too_large_runs_chunked_under_auto(request):
    """based's S2[K, K, V] at K = V = 64 is [64, 64, 16] a program at the smallest value tile: twice that (S and
    S_new) is more float32 values than an SM's 64K registers, so the recurrent launcher refuses it (no kernel
    compiled) with StateTooLarge, and the form "auto", which picks the recurrent form for a short sequence, runs
    the chunked one instead: outputs as the torch backend's."""
    layer = _layer("based")
    rec = layer.checked
    args, _ = sample_arguments(rec, {"K": 64, "V": 64}, 1, 4, 1, dtype=torch.float64, seed=0)
    args = [a.float() for a in args]
    # As on a GPU: the interpreter compiles nothing, so registers limit no program there.
    cuda = unittest.mock.patch.object(sys.modules[type(layer).__module__], "_triton_compiles_for_cuda", lambda: True)
    cuda.start()
    request.addfinalizer(cuda.stop)
    with pytest.raises(ValueError, match=r"based__triton_recurrent_kernel: a program would hold \d+ float32 values"
                                         r".*more than an SM's 65536 registers") as err:
        layer(*args, backend="triton", form="recurrent")
    assert err.value.does_not_fit
    ran = []
    forms = {name: (lambda fn, name: lambda *a, **k: ran.append(name) or fn(*a, **k))(fn, name)
             for name, fn in layer.triton_forms.items()}
    auto = type(layer)(layer.recurrence, layer.forms, forms, backend="triton", tuning=False)
    got = auto(*args, form="auto", chunk_size=16)[0]
    assert ran == ["recurrent", "chunked"]  # refused before any kernel, then the chunked form
    want = layer(*args, backend="torch", form="recurrent")[0]
    assert ((got - want).norm() / want.norm()).item() < 1e-4


def test_runtime_refuses_a_call_past_the_limits():
    """The chunked runtime called directly (no dispatcher to split it): a clear error naming k's shape, before any
    kernel is launched."""
    from codegen import triton_runtime

    k = torch.zeros(65536, 1, 1, 16)  # B * H = 65536
    with pytest.raises(ValueError, match=r"k \[65536, 1, 1, 16\]: B \* H = 65536 .* past CUDA's grid limits"):
        triton_runtime.chunked_linear([(k, False)], k, k, None, None, None, 16, True)
