"""The chunked Triton form's elementwise prologue as printed `@triton.jit` kernels (issue 10: RG-LRU's gates).

RG-LRU's prologue, v = sqrt(1 - exp(2 log_a)) sigmoid(gi) x and log_a = -8 sigmoid(gr) softplus(-lam), is
elementwise over D: its module prints `rg_lru__chunked_prologue_triton_kernel`, which writes v and log_a once
each from the raw inputs (and checks them for `_check_steps` as it goes), and its VJP kernel, which writes each
input's gradient once and lam's as per-block sums; the torch prologue's per-op [B, T, H, D] temporaries are gone.

- Results and every gradient against the float64 reference, float32, T = 37 in chunks of 16, with an initial
  state, and with three sequences packed by cu_seqlens; the parallel form too; a NaN step leaves the chunks.
- The training step's intermediate bytes at B=2, T=1024, H=4, D=128 (host allocations, no kernel runs).

Kernels run in Triton's interpreter (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

import recurrence_dsl
from codegen.intermediate_bytes import format_rows, measure_call
from codegen.load import load_layer
from codegen.module import module_source
from recurrence_dsl.analysis import analyse
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPECS_DIR, as_dict
from .test_prologue_maps import _rel, _run

triton = pytest.importorskip("triton")

B, T, H, D, CHUNK = 1, 37, 2, 16, 16


def _rec(name: str = "rg_lru") -> recurrence_dsl.Recurrence:
    return recurrence_dsl.load(SPECS_DIR / f"{name}.rec")[name]


# spec -> its prologue values the kernels write (the rest of its prologue, if any, is constant). mLSTM's since
# 2026-12-02 are computed at the chunked kernels' loads instead (tests/test_scalar_prologue_maps.py).
PRINTED = {"rg_lru": "v_h, log_decay_h", "min_gru": "v_h, log_decay_h", "rwkv6": "skip_weight_S"}


def _compare(name: str, form: str, packed: bool) -> dict:
    """Relative errors of every result and gradient of the Triton form against the float64 reference."""
    rec = _rec(name)
    rows = 3 if packed else B
    args, initial = sample_arguments(rec.checked, {s: D for s in rec.checked.sizes}, B, T, H,
                                     dtype=torch.float64, seed=3, with_initial_state=True)
    if packed:
        initial = {s.name: torch.randn((rows, H) + (D,) * len(s.dims), dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(4)) for s in rec.checked.states}
    kwargs = {"cu_seqlens": torch.tensor([0, 5, 22, T])} if packed else {}
    gen = torch.Generator().manual_seed(1)
    shapes = ([(o.name, (B, T, H) + (D,) * len(o.dims)) for o in rec.checked.outputs],
              [(s.name, (rows, H) + (D,) * len(s.dims)) for s in rec.checked.states])
    weights = [{n: torch.randn(shape, generator=gen, dtype=torch.float64) for n, shape in part} for part in shapes]
    ref_values, ref_grads = _run(rec.reference, rec, args, initial, weights, **kwargs)
    layer = recurrence_dsl.compile(rec, backend="triton", form=form, chunk_size=CHUNK, tuning=False)
    init32 = {k: v.float() for k, v in as_dict(initial, rec.checked.states).items()}
    values, grads = _run(layer, rec, [a.float() for a in args], init32, weights, **kwargs)
    names = [s.name for s in rec.checked.inputs + rec.checked.params + rec.checked.states]
    errors = {f"value {i}": _rel(v, r) for i, (v, r) in enumerate(zip(values, ref_values))}
    errors.update({f"d{n}": _rel(g, r) for n, g, r in zip(names, grads, ref_grads)})
    assert len(errors) == len(ref_values) + len(names) and all(g is not None for g in grads)
    return errors


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "cu_seqlens"])
@pytest.mark.parametrize("name", sorted(PRINTED))
def test_values_and_gradients_match_the_float64_reference(name, packed):
    errors = _compare(name, "chunked", packed)
    assert max(errors.values()) <= 1e-5, errors


@pytest.mark.parametrize("name", ["rg_lru", "min_gru"])
def test_a_transposed_input_gets_the_right_gradient(name):
    """A head-first input viewed as [B, T, H, D] (fla's old layout, `.transpose(1, 2)`): the VJP kernel writes its
    gradient densely, so the gradient buffer must be dense too (an `empty_like` copy of the strides scrambled it)."""
    rec = _rec(name)
    args, _ = sample_arguments(rec.checked, {s: D for s in rec.checked.sizes}, B, T, H, dtype=torch.float64, seed=5)
    n_in = len(rec.checked.inputs)
    leaves = [a.transpose(1, 2).contiguous().transpose(1, 2) if i < n_in else a for i, a in enumerate(args)]
    assert not leaves[0].is_contiguous()
    layer = recurrence_dsl.compile(rec, backend="triton", form="chunked", chunk_size=CHUNK, tuning=False)
    got = [a.detach().float().requires_grad_() for a in leaves]
    want = [a.detach().clone().requires_grad_() for a in leaves]
    weights = torch.randn((B, T, H, D), dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    (layer(*got)[0].double() * weights).sum().backward()
    (rec.reference(*want)[0] * weights).sum().backward()
    for g, w in zip(got, want):
        assert _rel(g.grad, w.grad) <= 1e-5


@pytest.mark.parametrize("name", ["rg_lru", "rwkv6"])
def test_the_parallel_form_runs_the_same_prologue(name):
    errors = _compare(name, "parallel", False)
    assert max(errors.values()) <= 1e-5, errors


def test_an_unsafe_step_found_by_the_prologue_kernel_leaves_the_chunks():
    """x = NaN at step 20 makes v NaN there: the prologue kernel reports step 20 (`unsafe_`), the steps from it run
    one at a time as the reference does (NaN only in that channel from step 20 on, not spread to earlier steps by a
    masked matmul), and the results before it still match."""
    rec = _rec()
    args, _ = sample_arguments(rec.checked, {"D": D}, B, T, H, dtype=torch.float32, seed=3)
    layer = recurrence_dsl.compile(rec, backend="triton", form="chunked", chunk_size=CHUNK, tuning=False)
    x = args[0].clone()
    x[0, 20, 1, 3] = float("nan")
    out, _ = layer(x, *args[1:], output_final_state=True)
    ref, _ = rec.reference(x.double(), *[a.double() for a in args[1:]], output_final_state=True)
    out = out["y"] if isinstance(out, dict) else out
    ref = ref["y"] if isinstance(ref, dict) else ref
    assert torch.isnan(out[0, 20:, 1, 3]).all() and torch.isfinite(out[0, :20]).all()
    assert torch.allclose(out[0, :20].double(), ref[0, :20], rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))


@pytest.mark.parametrize("name", sorted(PRINTED))
def test_the_module_prints_the_kernels_and_checks_their_values_there(name):
    rec = _rec(name)
    analysis = analyse(rec.checked)
    source = module_source([analysis], analysis.recurrence.source.filename)
    assert f"@triton.jit\ndef {name}__chunked_prologue_triton_kernel(" in source
    assert f"@triton.jit\ndef {name}__chunked_prologue_triton_vjp_kernel(" in source
    assert f"{PRINTED[name]}, unsafe_ = torch.empty" not in source
    call = next(line for line in source.splitlines() if f"= {name}__chunked_prologue_triton(" in line)
    assert PRINTED[name] in call and call.split(" = ")[0].endswith(", unsafe_"), call
    checks = [line.strip() for line in source.splitlines() if "_check_steps([" in line and "first=" in line]
    assert checks and all(v not in c for c in checks for v in PRINTED[name].split(", ")), checks


# (spec, dtype) -> the chunked Triton call's training step, B=2, T=1024, H=4, D=128, host allocations (no kernel
# runs). Before (the torch prologue and its printed torch VJP): rg_lru float32 228,976,656, bfloat16 136,634,384;
# min_gru 82,159,632 / 63,225,872. What is left is the runtime's (float64 cumulative log decays, scores, float32
# gradient buffers), v and log_a themselves, lam's per-block sums.
# Since 2026-12-02 the value-decay chunked call keeps its own copy of its output o for the log decay's gradient
# (`_ChunkedLinearFunction`: the caller may change the returned o in place, tests/test_training_usage.py): one
# [B, T, H, D] more, 4,194,304 B in float32, 2,097,152 B in bfloat16 (before: rg_lru 44,649,496 / 44,602,392,
# min_gru 44,387,352 / 44,338,200).
STEPS = {("rg_lru", torch.float32): 48_854_040, ("rg_lru", torch.bfloat16): 46_701_592,
         ("min_gru", torch.float32): 48_591_896, ("min_gru", torch.bfloat16): 46_437_400}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", ["rg_lru", "min_gru"])
def test_training_step_allocates_no_prologue_temporary(name, dtype, monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *args, **kwargs: None)
    rec = _rec(name)
    args, _ = sample_arguments(rec.checked, {"D": 128}, 2, 1024, 4, dtype=torch.float32, seed=0)
    report = measure_call(load_layer(analyse(rec.checked)), [a.to(dtype) for a in args], form="chunked",
                          backward=True)
    text = format_rows(report, limit=40)
    assert report.total == STEPS[(name, dtype)], text
    prologue = [r for r in report.rows if "prologue" in r.where]
    # of the prologue's [B, T, H, D] tensors only the two values the runtime reads, once each
    full = [r for r in prologue if r.shape == (2, 1024, 4, 128)]
    assert sorted(r.where.split(": ", 1)[1].split(" =")[0] for r in full) == ["log_decay_h", "v_h"], text
    assert all(r.count == 1 for r in full), text
