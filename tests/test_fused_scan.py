"""The Triton scan form's prologue inside its kernels (`fused_scan`, codegen/triton_scan.py; the kernels printed by
`TorchFormWriter._fused_scan`, codegen/torch_forms.py): a and b are computed where the kernels load the raw inputs,
never stored, the backward recomputes a_(t+1) and hands da, db to the printed torch VJP.

Checked in Triton's interpreter at tiny shapes: outputs, final states and the gradient of every input, param and
initial state (float32, the Triton backend's widest) against the torch scan form in float64 (mamba, GLA, RG-LRU,
Based's several states with a constant decay, RetNet's constant per-head decay), packed sequences with reverse runs
and initial states, `torch.autograd.gradcheck` of the runtime in float64, half inputs; and that the forward stores
no decay or injection (neither the torch prologue nor the unfused scan runs, and no [B, T, H, *S] tensor but the
states is allocated)."""

from __future__ import annotations

import pytest
import torch

import recurrence_dsl
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPECS_DIR, as_dict

pytest.importorskip("triton")

F64 = torch.float64
CONFIG = {"block_t": 8, "block_n": 16, "num_warps": 1}  # several chunks and lane blocks at the tests' sizes
_LAYERS: dict = {}


def _layer(name: str):
    if name not in _LAYERS:
        rec = recurrence_dsl.load(str(SPECS_DIR / f"{name}.rec"))[name]
        _LAYERS[name] = rec, recurrence_dsl.compile(rec, backend="triton", form="scan", tuning=False)
    return _LAYERS[name]


def _call(layer, rec, args, initial, backend, **kwargs):
    """Outputs and final states, and the gradients of every argument and initial state for a fixed weighting."""
    leaves = [a.detach().clone().requires_grad_() for a in args]
    init = {k: v.detach().clone().requires_grad_() for k, v in initial.items()}
    out, final = layer(*leaves, initial_state=init if len(init) > 1 else next(iter(init.values())),
                       output_final_state=True, backend=backend, form="scan", **kwargs)
    values = list(as_dict(out, rec.checked.outputs).values()) + list(as_dict(final, rec.checked.states).values())
    gen = torch.Generator().manual_seed(3)
    loss = sum((v.double() * torch.randn(v.shape, generator=gen, dtype=F64)).sum() for v in values)
    loss.backward()
    return values, [x.grad for x in leaves] + [init[k].grad for k in init]


def _compare(name, B=2, T=21, H=2, size=4, lengths=None, dtype=torch.float32, tol=1e-5, **kwargs):
    rec, layer = _layer(name)
    rows = None if lengths is None else len(lengths)
    cu = None if lengths is None else torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    args, initial = sample_arguments(rec.checked, {s: size for s in rec.checked.sizes}, B, T, H, dtype=F64, seed=5,
                                     with_initial_state=True, rows=rows)
    initial = as_dict(initial, rec.checked.states)
    want, want_grads = _call(layer, rec, args, initial, "torch", cu_seqlens=cu, **kwargs)
    got, got_grads = _call(layer, rec, [a.to(dtype) for a in args], {k: v.to(dtype) for k, v in initial.items()},
                           "triton", cu_seqlens=cu, config={"block_t": 8, "block_n": 16, "num_warps": 1}, **kwargs)
    names = [x.name for x in rec.checked.inputs + rec.checked.params] + list(initial)
    assert len(got_grads) == len(names)
    for what, g, w in zip(["value"] * len(got) + names, got + got_grads, want + want_grads):
        assert g is not None and w is not None, what
        err = ((g.double() - w.double()).norm() / w.double().norm().clamp_min(1e-30)).item()
        assert err <= tol, (name, what, err)


def test_the_fused_forward_stores_no_decay_or_injection(monkeypatch):
    """mamba on the Triton scan form: the torch prologue and the unfused scan never run, and the forward allocates
    no [B, T, H, D, N] tensor but the states."""
    rec, layer = _layer("mamba")
    scope = layer.triton_forms["scan"].__globals__

    def refuse(*args, **kwargs):
        raise AssertionError("the unfused path ran")

    monkeypatch.setitem(scope, "mamba__scan_prologue", refuse)
    monkeypatch.setitem(scope, "triton_scan_diagonal", refuse)
    B, T, H, D, N = 2, 19, 2, 4, 3
    args, _ = sample_arguments(rec.checked, {"D": D, "N": N}, B, T, H, dtype=torch.float32, seed=0)
    made = []
    real_empty = torch.empty

    def empty(*shape, **kwargs):
        out = real_empty(*shape, **kwargs)
        made.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch, "empty", empty)
    with torch.no_grad():
        y, _ = layer(*args, backend="triton", form="scan")
    assert made.count((B, T, H * D * N)) == 1, made  # s, and no a or b
    monkeypatch.undo()
    ref, _ = layer(*args, backend="torch", form="scan")
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["mamba", "gla", "rg_lru", "based", "retention", "mlstm", "min_gru"])
def test_values_and_gradients_match_the_torch_scan(name):
    """Every input's, param's and initial state's gradient: mamba's B[n], dt[d] and x[d] shared by the lanes of h[d, n]
    (atomic adds), A[d, n] summed over the steps, rg_lru's x[d] one lane per element (added in place), mlstm's k, ig,
    fg read by both its states C and n (one buffer each, both states adding into it)."""
    _compare(name)


@pytest.mark.parametrize("name", ["mamba", "gla", "mlstm", "rg_lru"])
@pytest.mark.parametrize("reverse", [False, True])
def test_packed_reverse_and_initial_states(name, reverse):
    """Three packed sequences (one empty), each from its own initial state, either direction."""
    _compare(name, B=1, T=20, lengths=(11, 0, 9), reverse=reverse)


def _state_sized_backward_sites(layer, rec, shape, sizes, B, T, H):
    """The fused scan backward's allocation sites (`codegen.intermediate_bytes`) of B * T * H * prod(S) numbers: da,
    db of the scan's lanes (no kernel runs: only the host's allocations count)."""
    from codegen.intermediate_bytes import measure_call

    args, _ = sample_arguments(rec.checked, sizes, B, T, H, dtype=torch.float32, seed=0)
    report = measure_call(layer, args, form="scan", backward=True)
    lanes = H * int(torch.tensor(shape).prod())
    return [r for r in report.rows if int(torch.tensor(r.shape).prod()) == B * T * lanes
            and r.where.startswith("backward (")]  # (the runtime's `_FusedScan.backward`)


def test_the_backward_allocates_no_da_or_db(monkeypatch):
    """mamba's fused backward adds the tensors' gradients in its kernels: no [B, T, H * D * N] da or db."""
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *args, **kwargs: None)
    rec, layer = _layer("mamba")
    assert not _state_sized_backward_sites(layer, rec, (4, 3), {"D": 4, "N": 3}, 2, 16, 2)


def test_a_prologue_whose_derivatives_do_not_print_keeps_the_torch_vjp(monkeypatch):
    """Where a state's derivatives do not print (`TorchFormWriter._scan_vjp_terms` gives a reason), the kernels
    store da, db for the printed torch VJP, the code says why, and the gradients are the same."""
    from codegen.cache import load_source
    from codegen.module import module_source
    from codegen.torch_forms import TorchFormWriter
    from recurrence_dsl.analysis import analyse

    rec, layer = _layer("mamba")
    monkeypatch.setattr(TorchFormWriter, "_scan_vjp_terms", staticmethod(lambda *args: "a test's reason"))
    analysis = analyse(rec.checked)
    source = module_source([analysis], analysis.recurrence.source.filename)
    monkeypatch.undo()
    assert "mamba__scan_prologue_vjp (a test's reason)" in source and "def mamba__scan_h_vjp(" not in source
    unfused = load_source(source, "mamba_torch_vjp").mamba
    B, T, H, sizes = 2, 13, 2, {"D": 3, "N": 2}
    args, initial = sample_arguments(rec.checked, sizes, B, T, H, dtype=torch.float32, seed=1,
                                     with_initial_state=True)
    got = _call(unfused, rec, args, as_dict(initial, rec.checked.states), "triton", config=CONFIG)
    want = _call(layer, rec, args, as_dict(initial, rec.checked.states), "triton", config=CONFIG)
    for g, w in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *args, **kwargs: None)
    assert len(_state_sized_backward_sites(unfused, rec, (3, 2), sizes, B, T, H)) >= 1  # da, db


def test_gradcheck_of_the_runtime():
    """`torch.autograd.gradcheck` of mamba's `fused_scan` call (float64, packed, the printed kernels and VJP)."""
    rec, layer = _layer("mamba")
    scope = layer.triton_forms["scan"].__globals__
    fused, vjp = scope["triton_fused_scan"], None  # the kernels add the gradients themselves
    kernels = ((scope["mamba__scan_h_fwd_kernel"], scope["mamba__scan_h_bwd_kernel"], True),)
    D, N, H, T = 2, 3, 2, 7
    gen = torch.Generator().manual_seed(0)
    x, B_in = (torch.randn(1, T, H, n, generator=gen, dtype=F64) for n in (D, N))
    dt = torch.rand(1, T, H, D, generator=gen, dtype=F64) * 0.5
    A = -torch.rand(1, 1, H, D, N, generator=gen, dtype=F64)
    h0 = torch.randn(2, H, D, N, generator=gen, dtype=F64)
    cu = torch.tensor([0, 4, T])

    def run(x, dt, B_in, A, h0):
        return fused(kernels, vjp, (x, dt, B_in, A), (h0,), (D, N), (1, T, H), cu_seqlens=cu, block_t=4,
                     block_n=8)[0]

    leaves = [t.requires_grad_() for t in (x, dt, B_in, A, h0)]
    assert torch.autograd.gradcheck(run, leaves, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_inputs_compute_in_float32(dtype):
    """Half inputs reach the fused form as they are (`takes_input_dtype`): the kernels upcast every load and
    compute in float32, the epilogue runs on float32 copies; the result is the float64 one to the inputs' rounding,
    and every gradient comes back in its tensor's dtype."""
    _compare("mamba", dtype=dtype, tol=2e-2)
    _compare("rg_lru", dtype=dtype, tol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_inputs_are_not_copied_to_float32(dtype, monkeypatch):
    """The fused scan's forward on half inputs allocates no float32 copy of them (rg_lru: nothing of [B, T, H, D]
    but the states, which are the output; before, one float32 copy per input), and its gradients are the inputs'
    dtype; the printed torch VJP's path still computes on float32 copies (its own `t.to(dt)`)."""
    from codegen.intermediate_bytes import format_rows, measure_call
    from codegen.load import load_layer
    from recurrence_dsl.analysis import analyse

    rec, _ = _layer("rg_lru")
    args, _ = sample_arguments(rec.checked, {"D": 16}, 2, 40, 2, dtype=dtype, seed=0)
    layer = load_layer(analyse(rec.checked))
    report = measure_call(layer, args, form="scan")
    assert not [r for r in report.rows if r.dtype == "float32" and tuple(r.shape) == (2, 40, 2, 16)], \
        format_rows(report)
    leaves = [a.detach().clone().requires_grad_() for a in args]
    out, _ = layer(*leaves, form="scan", backend="triton")
    out.float().sum().backward()
    assert out.dtype == dtype and all(x.grad.dtype == dtype and torch.isfinite(x.grad).all() for x in leaves)


def test_no_steps_give_empty_states_and_zero_gradients():
    """T = 0: nothing to scan (no kernel runs); the states are empty and every tensor and initial state gets a zero
    gradient, as from the unfused runtime."""
    rec, layer = _layer("mamba")
    scope = layer.triton_forms["scan"].__globals__
    fused, vjp = scope["triton_fused_scan"], None  # the kernels add the gradients themselves
    kernels = ((scope["mamba__scan_h_fwd_kernel"], scope["mamba__scan_h_bwd_kernel"], True),)
    D, N, H = 2, 3, 2
    x, dt = torch.randn(2, 0, H, D, requires_grad=True), torch.randn(2, 0, H, D, requires_grad=True)
    B_in, A = torch.randn(2, 0, H, N, requires_grad=True), torch.randn(1, 1, H, D, N, requires_grad=True)
    h0 = torch.randn(2, H, D, N, requires_grad=True)
    s, = fused(kernels, vjp, (x, dt, B_in, A), (h0,), (D, N), (2, 0, H))
    assert s.shape == (2, 0, H, D, N) and s.dtype == torch.float32
    s.sum().backward()
    for t in (x, dt, B_in, A, h0):
        assert t.grad is not None and not t.grad.any()


def test_the_module_spec_takes_fusion_from_the_writer():
    """`scan_held` of a module's spec comes from the form writer's decision (`TorchFormWriter.scan_fused`, returned
    by `_triton_sources`), not from searching the printed text: mamba's scan is fused (1 number per lane kept),
    tests/data/rotation.rec's coupled `rotation` scans as blocks with a torch prologue (3), its `rotary_la` is fused."""
    from pathlib import Path

    from codegen import module as module_writer
    from recurrence_dsl.analysis import analyse

    def fused_of(path) -> tuple[set, str]:
        analyses = [analyse(rec.checked) for rec in recurrence_dsl.load(str(path)).values()]
        _, _, fused = module_writer._triton_sources(analyses)
        return fused, "".join(module_writer._spec_data(a, a.recurrence.name in fused) for a in analyses)

    fused, data = fused_of(SPECS_DIR / "mamba.rec")
    assert fused == {"mamba"} and "scan_held=1" in data
    fused, data = fused_of(Path(__file__).parent / "data" / "rotation.rec")  # rotary_la's scan is fused
    assert fused == {"rotary_la"} and data.count("scan_held=1") == 1
