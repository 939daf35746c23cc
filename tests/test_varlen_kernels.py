"""Packed sequences (`cu_seqlens`) inside the recurrent and scan Triton kernels (issue 10).

The recurrent kernel and its derived adjoint (codegen/triton_recurrent.py) run a program per (sequence, head, state
tile) over its own steps of the packed row, with each sequence's checkpoints found through a per-sequence table; the
scan kernels (codegen/triton_scan.py) reset their carry at each sequence's start. A packed call on these forms is
one call of the form (codegen/dispatch.py `packed_form`), checked here against the one-call-per-sequence loop
(outputs, final states and the gradients of every input, param and initial state; float32 in the interpreter; the
lengths of tests/test_varlen.py: repeated, 1-step and empty sequences), forward and reverse; and its kernel launches
for 1000 sequences are those for one, also for rwkv7's chunked form, whose backward is the derived adjoint (the
compile-only driver of codegen/kernel_report.py, in a child process without TRITON_INTERPRET, as
tests/test_varlen.py counts the chunked forms').
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

import recurrence_dsl
from codegen import triton_scan
from recurrence_dsl.sampling import sample_arguments

from .children import Child
from .conftest import REPO, SPECS_DIR
from .test_varlen import CHUNK, CU, LENGTHS, SIZE, _assert_close, _case, _layer, _results, _tools_missing

DATA = REPO / "tests" / "data"


def _counting(layer, form: str, calls: list):
    """`layer` whose Triton form `form` records, per call, whether it was given cu_seqlens (one call per packed
    call when the form walks the sequences itself)."""
    fn = layer.triton_forms[form]

    def run(*args, **kwargs):
        calls.append(kwargs.get("cu_seqlens") is not None)
        return fn(*args, **kwargs)

    run.run_packed = fn.run_packed  # (takes_cu_seqlens)
    forms = dict(layer.triton_forms, **{form: run})
    counting = type(layer)(layer.recurrence, layer.forms, forms, backend="triton", tuning=False)
    counting.checked = layer.checked
    return counting


def _rotation():
    if "rotation" not in _LAYERS:
        rec = recurrence_dsl.load(DATA / "rotation.rec")["rotation"]
        layer = recurrence_dsl.compile(rec, tuning=False)
        layer.checked = rec.checked
        _LAYERS["rotation"] = layer
    return _LAYERS["rotation"]


_LAYERS: dict = {}


def _sized_case(layer, sizes: dict):
    """`_case` (float32, one head) at other sizes than the tests' 16."""
    rec = layer.checked
    args, init = sample_arguments(rec, {s: sizes.get(s, SIZE) for s in rec.sizes}, len(LENGTHS), int(CU[-1]), 1,
                                  dtype=torch.float64, seed=0, with_initial_state=True)
    inputs = len(rec.inputs)
    args = [(a[:1] if i < inputs else a).float() for i, a in enumerate(args)]
    init = init if isinstance(init, dict) else {rec.states[0].name: init}
    return args, {k: v.float() for k, v in init.items()}


# a value-tiled state (gla; V = 48: two tiles of 32 lanes, the second part padding), the delta rule, a non-linear
# state with no free axis (minimal_rnn, one program per (sequence, head)), an elementwise state; the scan: a diagonal
# state, a scalar decay, a coupled 2 x 2 block
@pytest.mark.parametrize("name,form,reverse", [
    ("gla", "recurrent", True), ("gated_delta_net", "recurrent", False), ("minimal_rnn", "recurrent", True),
    ("mamba", "recurrent", False), ("mamba", "scan", False), ("mamba2", "scan", True), ("rotation", "scan", True)])
def test_packed_kernels_match_the_loop_over_sequences(name, form, reverse):
    layer = _rotation() if name == "rotation" else _layer(name)
    assert getattr(layer.triton_forms[form], "run_packed", None) is not None  # takes_cu_seqlens
    # one head: the interpreter runs every program in turn
    args, init = _sized_case(layer, {"V": 48} if name == "gla" else {})
    calls: list = []
    packed = _counting(layer, form, calls)
    kwargs = dict(backend="triton", form=form, chunk_size=CHUNK, reverse=reverse)
    want = _results(layer, args, init, packed=False, **kwargs)
    got = _results(packed, args, init, packed=True, cu_seqlens=CU, **kwargs)
    assert calls == [True]  # every sequence in one call of the form, its kernels given cu_seqlens
    _assert_close(got, want, 2e-6)


def test_a_nan_in_a_packed_chunked_call_falls_back_to_the_packed_recurrent_kernels():
    layer = _layer("gla")
    args, init = _case(layer, torch.float32, heads=1)
    args[2] = args[2].clone()
    args[2][0, int(CU[3]) + 4] = float("nan")  # step 4 of the 17-step sequence: the chunked form refuses
    calls: list = []
    packed = _counting(layer, "recurrent", calls)
    kwargs = dict(initial_state=init["S"], output_final_state=True, chunk_size=CHUNK)
    out, final = packed(*args, cu_seqlens=CU, backend="triton", form="auto", **kwargs)
    ref_out, ref_final = layer.options(backend="torch")(*args, cu_seqlens=CU, **kwargs)
    assert calls == [True]
    nan = torch.isnan(ref_out)
    assert nan.any() and torch.equal(torch.isnan(out), nan)
    assert torch.allclose(out[~nan], ref_out[~nan], rtol=1e-4, atol=1e-5)
    assert torch.equal(torch.isnan(final), torch.isnan(ref_final))
    assert torch.allclose(final.nan_to_num(), ref_final.nan_to_num(), rtol=1e-4, atol=1e-5)


def test_packed_scan_rejects_bad_boundaries():
    b = torch.zeros(1, 6, 2)
    with pytest.raises(ValueError, match="cu_seqlens"):
        triton_scan.scan_diagonal(b, b, None, cu_seqlens=torch.tensor([0, 2, 5]))  # ends before T = 6
    with pytest.raises(ValueError, match="cu_seqlens"):
        triton_scan.scan_diagonal(b.expand(2, 6, 2), b.expand(2, 6, 2), None, cu_seqlens=torch.tensor([0, 6]))


def test_packed_recurrent_launcher_rejects_more_than_one_row():
    layer = _layer("gla")
    rec = layer.checked
    args, _ = _case(layer, torch.float32, heads=1)
    inputs = len(rec.inputs)
    two_rows = [a.expand(2, *a.shape[1:]) if i < inputs else a for i, a in enumerate(args)]
    loop = sys.modules[type(layer).__module__].gla__triton_recurrent_loop  # the generated launcher
    with pytest.raises(ValueError, match="one row"):
        loop(*two_rows, {}, *[16 for _ in rec.sizes], cu_seqlens=CU)


LAUNCHES = textwrap.dedent('''
    import json, sys
    import torch
    import recurrence_dsl
    from codegen.kernel_report import report_call
    from recurrence_dsl.sampling import sample_arguments

    lengths = torch.randint(1, 40, (1000,), generator=torch.Generator().manual_seed(0))
    many = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    T = int(many[-1])
    counts = {}
    for path, name, form in zip(sys.argv[1::3], sys.argv[2::3], sys.argv[3::3]):
        rec = recurrence_dsl.load(path)[name]
        layer = recurrence_dsl.compile(rec, tuning=False)
        args, _ = sample_arguments(rec.checked, {s: 16 for s in rec.checked.sizes}, 1, T, 2, dtype=torch.float32,
                                   seed=0)
        for label, cu in (("1", torch.tensor([0, T])), ("1000", many)):
            # cached: the 1000-sequence call launches the kernels the one-sequence call compiled (CI time)
            kernels = report_call(layer, args, {"cu_seqlens": cu}, target="sm_90", form=form, backward=True,
                                  cached=True)
            counts[f"{form} {label}"] = sorted((k.name, k.phase, k.launches, list(k.grid)) for k in kernels)
    counts["T"] = T
    print(json.dumps(counts))
''')


# run in the background from the start of the session (tests/children.py)
PACKED_LAUNCHES = Child("varlen_kernels_launches", [
    sys.executable, "-c", LAUNCHES, str(SPECS_DIR / "gla.rec"), "gla", "recurrent", str(SPECS_DIR / "mamba2.rec"),
    "mamba2", "scan", str(SPECS_DIR / "rwkv7.rec"), "rwkv7", "chunked"])


@pytest.mark.skipif(bool(_tools_missing()), reason=_tools_missing() or "-")
@PACKED_LAUNCHES.needed
def test_launches_for_1000_packed_sequences_equal_those_for_one():
    run = PACKED_LAUNCHES.result()
    assert run.returncode == 0, run.stderr[-3000:]
    counts = json.loads(run.stdout.strip().splitlines()[-1])
    expected = {"recurrent": ("gla__triton_recurrent_kernel", "gla__triton_recurrent_adjoint_kernel"),
                "scan": ("mamba2__scan_h_fwd_kernel", "mamba2__scan_h_bwd_kernel"),  # its prologue fused
                # the DPLR class's chunked forward (its state pass) and the derived adjoint it trains through
                "chunked": ("_triton_delta_state_kernel", "rwkv7__triton_recurrent_adjoint_kernel")}
    for form, kernels in expected.items():
        one, many = counts[f"{form} 1"], counts[f"{form} 1000"]
        assert [k[:3] for k in one] == [k[:3] for k in many]  # the same kernels, each launched as often
        assert {k[1] for k in one} == {"forward", "backward"}
        grids = {k[0]: k[3] for k in many}
        assert set(kernels) <= set(grids), grids
        if form == "recurrent":  # a program per (sequence, head) and tile of V
            assert [grids[k][0] for k in kernels] == [2000, 2000]
        elif form == "chunked":  # the state pass: (V blocks, sequence * head); the adjoint chunk-parallel: (head,
            # V tile, chunk of any sequence), each sequence here one chunk of 64 (one sequence: cdiv(T, 64) chunks)
            assert grids[kernels[0]] == [1, 2000, 1], grids
            assert {tuple(k[3]) for k in many if k[0] == kernels[1]} == {(2, 1, 1000)}
            assert {tuple(k[3]) for k in one if k[0] == kernels[1]} == {(2, 1, -(-counts["T"] // 64))}
            assert grids["rwkv7__triton_segment_scan_kernel"] == [2000, 1, 1]  # the scan over each one's chunks
        else:  # a program per block of state elements and sequence, on one grid axis
            assert [grids[k][0] % 1000 for k in kernels] == [0, 0] and [grids[k][1] for k in kernels] == [1, 1]
