"""Packed sequences (`cu_seqlens`) run batched (issue 10).

The torch path runs the sequences of one length as one batch (codegen/dispatch.py `_run_packed`); the chunked
Triton forms of linear and delta-rule classes take `cu_seqlens` into their kernels (codegen/triton_runtime.py
`_Packed`: sequences moved to chunk boundaries, the state passed per sequence), so their launches do not grow with
the number of sequences. Each is checked against the one-call-per-sequence loop (what a packed call ran before):
outputs, final states and the gradients of every input, param and initial state, float32 and float64 (torch),
float32 (Triton, in the interpreter), with repeated lengths, a 1-step and an empty sequence and lengths that are
no multiple of the chunk; reverse runs; a NaN that sends the packed form back to the batches. The launch count
for 1000 packed sequences against one (linear attention and DeltaNet, forward and backward) comes from the
compile-only driver (codegen/kernel_report.py) in a child process without TRITON_INTERPRET, as
tests/test_kernel_report.py does.
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

import recurrence_dsl
from codegen.dispatch import length_groups
from codegen.kernel_report import ToolMissing, find_tools
from recurrence_dsl.sampling import sample_arguments

from .children import Child
from .conftest import SPECS_DIR

LENGTHS = (5, 1, 0, 17, 3, 5, 1)  # repeated lengths, a 1-step and an empty sequence, none a multiple of 16
CU = torch.tensor([0] + torch.tensor(LENGTHS).cumsum(0).tolist())
SIZE, HEADS, CHUNK = 16, 2, 16
_LAYERS: dict = {}


def _layer(name: str):
    if name not in _LAYERS:
        rec = recurrence_dsl.load(SPECS_DIR / f"{name}.rec")[name]
        _LAYERS[name] = recurrence_dsl.compile(rec, tuning=False)
        _LAYERS[name].checked = rec.checked
    return _LAYERS[name]


def _case(layer, dtype: torch.dtype, seed: int = 0, heads: int = HEADS):
    """(args [1, T, H, ...] and params, initial states {name: [N, H, ...]}) at the test's sizes."""
    rec = layer.checked
    args, init = sample_arguments(rec, {s: SIZE for s in rec.sizes}, len(LENGTHS), int(CU[-1]), heads,
                                  dtype=torch.float64, seed=seed, with_initial_state=True)
    inputs = len(rec.inputs)
    args = [(a[:1] if i < inputs else a).to(dtype) for i, a in enumerate(args)]
    init = init if isinstance(init, dict) else {rec.states[0].name: init}
    return args, {k: v.to(dtype) for k, v in init.items()}


def _flat(layer, out, final) -> list:
    outs = out if isinstance(out, tuple) else (out,)
    finals = [final[s.name] for s in layer.recurrence.states] if isinstance(final, dict) else [final]
    return list(outs) + finals


def _results(layer, args, init, packed: bool, cu=CU, **kwargs) -> list:
    """Outputs, final states, then the gradients of args and initial states of a fixed weighted sum of both
    (init {}: no initial state)."""
    rec = layer.recurrence
    leaves = [a.detach().requires_grad_() for a in args]
    states = {k: v.detach().requires_grad_() for k, v in init.items()}

    def call(tensors, rows):
        state = rows if len(rows) > 1 else next(iter(rows.values()), None)
        return _flat(layer, *layer(*tensors, initial_state=state, output_final_state=True, **kwargs))

    if packed:
        flat = call(leaves, states)
    else:  # one call per sequence
        inputs = len(rec.inputs)
        pieces = []
        for n in range(len(cu) - 1):
            lo, hi = int(cu[n]), int(cu[n + 1])
            pieces.append(call([a[:, lo:hi] if i < inputs else a for i, a in enumerate(leaves)],
                               {k: v[n:n + 1] for k, v in states.items()}))
        count = len(rec.outputs)
        flat = [torch.cat([p[i] for p in pieces], dim=1 if i < count else 0) for i in range(len(pieces[0]))]
    gen = torch.Generator().manual_seed(1)
    loss = sum((r.double() * torch.randn(r.shape, generator=gen, dtype=torch.float64)).sum() for r in flat)
    loss.backward()
    return [r.detach() for r in flat] + [t.grad for t in leaves + list(states.values())]


def _assert_close(got: list, want: list, tol: float) -> None:
    for n, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape, (n, g.shape, w.shape)
        err = ((g.double() - w.double()).norm() / w.double().norm().clamp_min(1e-30)).item()
        assert err <= tol, f"result {n}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("name", ["gla", "delta_net", "mamba2", "minimal_rnn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_torch_path_batches_packed_sequences_as_the_loop_does(name, dtype):
    layer = _layer(name)
    args, init = _case(layer, dtype)
    reverse = name in ("gla", "minimal_rnn") and dtype == torch.float64
    kwargs = dict(backend="torch", chunk_size=CHUNK, reverse=reverse)
    want = _results(layer, args, init, packed=False, **kwargs)
    got = _results(layer, args, init, packed=True, cu_seqlens=CU, **kwargs)
    _assert_close(got, want, 1e-11 if dtype == torch.float64 else 2e-6)


# one chunk from zero (16 steps, chunks of 16) and three chunks (40 steps) per sequence
@pytest.mark.parametrize("name", ["delta_net", "gla", "mamba2"])
@pytest.mark.parametrize("length", [16, 40])
def test_one_length_packed_sequences_without_initial_state_match_the_loop(name, length):
    """Sequences of one length and no initial state: one batch of views from a zero start (no zero state), as
    bench_varlen.py times it; float64, outputs, final states and gradients against one call per sequence."""
    layer = _layer(name)
    cu = torch.arange(0, 4 * length + 1, length)
    rec = layer.checked
    args, _ = sample_arguments(rec, {s: SIZE for s in rec.sizes}, 1, int(cu[-1]), HEADS, dtype=torch.float64, seed=2)
    kwargs = dict(backend="torch", chunk_size=CHUNK)
    want = _results(layer, args, {}, packed=False, cu=cu, **kwargs)
    got = _results(layer, args, {}, packed=True, cu=cu, cu_seqlens=cu, **kwargs)
    _assert_close(got, want, 1e-12)


def test_one_length_packed_sequences_run_as_one_batch_of_views_from_no_state():
    """256 x 16 as bench_varlen.py runs it, at small sizes: one chunked-form call with B = 256, its inputs views of
    the packed ones (no gather), its states None (no zero [256, H, K, V] state allocated), outputs back as views."""
    layer = _layer("delta_net")
    calls = []

    def counted(fn):
        def run(*args, **kwargs):
            calls.append((args[0].shape[:2], args[0].data_ptr(), args[len(layer.checked.inputs)]))
            return fn(*args, **kwargs)
        run.no_initial_state = getattr(fn, "no_initial_state", False)
        return run

    counting = type(layer)(layer.recurrence, {k: counted(f) for k, f in layer.forms.items()}, layer.triton_forms,
                           backend="torch", tuning=False)
    cu = torch.arange(0, 256 * 16 + 1, 16)
    args, _ = sample_arguments(layer.checked, {s: 8 for s in layer.checked.sizes}, 1, 4096, 1, seed=3)
    out, final = counting(*args, cu_seqlens=cu, output_final_state=True)
    assert [(shape, ptr) for shape, ptr, _ in calls] == [((256, 16), args[0].data_ptr())]
    assert calls[0][2] == {"S": None}
    assert out.shape == (1, 4096, 1, 8) and final.shape == (256, 1, 8, 8)


def test_torch_path_calls_a_form_once_per_distinct_length():
    layer = _layer("gla")
    calls = []

    def counted(fn):
        def run(*args, **kwargs):
            calls.append(args[0].shape[:2])
            return fn(*args, **kwargs)
        return run

    counting = type(layer)(layer.recurrence, {k: counted(f) for k, f in layer.forms.items()}, layer.triton_forms,
                           backend="torch", tuning=False)
    args, init = _case(layer, torch.float32)
    counting(*args, initial_state=init["S"], cu_seqlens=CU)
    # lengths 1 (x2), 3, 5 (x2), 17: one call each, B = the sequences of that length; the empty one needs none
    assert sorted(calls) == sorted([(2, 1), (1, 3), (2, 5), (1, 17)])


def test_length_groups_are_ascending_and_cover_every_sequence():
    groups = length_groups(CU)
    assert [length for length, _ in groups] == [0, 1, 3, 5, 17]
    assert sorted(torch.cat([ids for _, ids in groups]).tolist()) == list(range(len(LENGTHS)))
    assert [ids.tolist() for _, ids in groups] == [[2], [1, 6], [4], [0, 5], [3]]


# decays on the key axis, the value axis, none (two states); a delta rule
@pytest.mark.parametrize("name,form", [("gla", "chunked"), ("hgrn2", "chunked"),
                                       ("normalized_linear_attention", "auto"), ("gated_delta_net", "auto")])
def test_triton_chunked_kernels_take_packed_sequences(name, form):
    layer = _layer(name)
    assert getattr(layer.triton_forms["chunked"], "run_packed", None) is not None  # takes_cu_seqlens
    args, init = _case(layer, torch.float32, heads=1)  # one head: the interpreter runs every program in turn
    kwargs = dict(backend="triton", form=form, chunk_size=CHUNK, reverse=name == "gla")
    # the loop's sequences of 1 to 5 steps take the recurrent kernel under "auto"; both are exact
    want = _results(layer, args, init, packed=False, **kwargs)
    got = _results(layer, args, init, packed=True, cu_seqlens=CU, **kwargs)
    _assert_close(got, want, 2e-5)


def test_a_nan_sends_the_packed_triton_form_back_to_the_batches():
    layer = _layer("gla")
    args, init = _case(layer, torch.float32)
    args[2] = args[2].clone()
    args[2][0, int(CU[3]) + 4] = float("nan")  # step 4 of the 17-step sequence
    kwargs = dict(initial_state=init["S"], output_final_state=True, chunk_size=CHUNK)
    out, final = layer(*args, cu_seqlens=CU, backend="triton", **kwargs)
    ref_out, ref_final = layer.options(backend="torch")(*args, cu_seqlens=CU, **kwargs)
    nan = torch.isnan(ref_out)
    assert nan.any() and torch.equal(torch.isnan(out), nan)
    assert torch.allclose(out[~nan], ref_out[~nan], rtol=1e-4, atol=1e-5)
    assert torch.equal(torch.isnan(final), torch.isnan(ref_final))
    assert torch.allclose(final.nan_to_num(), ref_final.nan_to_num(), rtol=1e-4, atol=1e-5)


def _tools_missing() -> str:
    try:
        find_tools("sm_90")
    except ToolMissing as err:
        return str(err)
    return ""


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
    for path, name in zip(sys.argv[1::2], sys.argv[2::2]):
        rec = recurrence_dsl.load(path)[name]
        layer = recurrence_dsl.compile(rec, tuning=False)
        args, _ = sample_arguments(rec.checked, {s: 16 for s in rec.checked.sizes}, 1, T, 2, dtype=torch.float32,
                                   seed=0)
        for label, cu in (("1", torch.tensor([0, T])), ("1000", many)):
            # cached: the 1000-sequence call launches the kernels the one-sequence call compiled (CI time)
            kernels = report_call(layer, args, {"cu_seqlens": cu}, target="sm_90", backward=True, cached=True)
            counts[f"{name} {label}"] = sorted((k.name, k.phase, k.launches, list(k.grid)) for k in kernels)
    print(json.dumps(counts))
''')


# run in the background from the start of the session (tests/children.py)
PACKED_LAUNCHES = Child("varlen_launches", [sys.executable, "-c", LAUNCHES, str(SPECS_DIR / "linear_attention.rec"),
                                            "linear_attention", str(SPECS_DIR / "delta_net.rec"), "delta_net"])


@pytest.mark.skipif(bool(_tools_missing()), reason=_tools_missing() or "-")
@PACKED_LAUNCHES.needed
def test_launches_for_1000_packed_sequences_equal_those_for_one():
    """Forward and backward, the linear class (linear attention) and the delta rule (DeltaNet: its WY, state and
    output kernels, and the five backward kernels)."""
    run = PACKED_LAUNCHES.result()
    assert run.returncode == 0, run.stderr[-3000:]
    counts = json.loads(run.stdout.strip().splitlines()[-1])
    for name in ("linear_attention", "delta_net"):
        one, many = counts[f"{name} 1"], counts[f"{name} 1000"]
        assert [k[:3] for k in one] == [k[:3] for k in many], name  # the same kernels, each launched as often
        assert {k[1] for k in one} == {"forward", "backward"} and sum(k[2] for k in one) >= 6, name
    grids = {(k[0], k[1]): k[3] for k in counts["linear_attention 1000"]}
    # the state passes run one program per (sequence, head): 1000 * 2 in the last grid axis
    assert grids[("_triton_chunk_state_kernel", "forward")][2] == 2000
    assert grids[("_triton_chunk_dstate_kernel", "backward")][2] == 2000
    grids = {(k[0], k[1]): k[3] for k in counts["delta_net 1000"]}
    # the delta rule's state passes, forward and backward (dS across chunks), one program per (sequence, head)
    assert grids[("_triton_delta_state_kernel", "forward")] == [1, 2000, 1]
    assert grids[("_triton_delta_bwd_dh_kernel", "backward")] == [1, 2000, 1]
    assert {k[0] for k in counts["delta_net 1"] if k[1] == "backward"} >= {
        f"_triton_delta_bwd_{k}_kernel" for k in ("dh", "dqk", "local", "wy")}
