"""RG-LRU with a nearly closed gate: `sqrt(1 - exp(2 log_a))` printed as `sqrt(-expm1(2 log_a))`.

specs/rg_lru.rec weighs its input by sqrt(1 - a_t^2), a_t = exp(log_a). For gr below about -17, log_a is within
3e-8 of 0 and `1 - exp(2 log_a)` is exactly 0 in float32, so the weight is 0 and its derivative 1 / (2 sqrt(0))
made the gradients of gr, gi, x and lam inf or NaN on every backend and form. The step IR now spells it
`-expm1(2 log_a)` (recurrence_dsl/step_ir.py `precise`), which every printer writes with an accurate expm1
(torch.expm1; in Triton the printed helper `_expm1`, codegen/triton_printer.py `HELPERS`).

Checked here, float32 against the float64 reference (its autograd for the gradients): outputs, final states and
the gradients of x, gr, gi, lam and the initial state, finite and within tolerance, for the torch recurrent, scan
and chunked forms and the Triton recurrent and chunked forms (the interpreter); the helpers themselves against
torch.expm1 / torch.log1p; the rewrite's cases.
"""

from __future__ import annotations

import math

import pytest
import sympy
import torch

import recurrence_dsl
from recurrence_dsl.sampling import sample_arguments
from recurrence_dsl.step_ir import expm1, log1p, precise

from .conftest import SPEC_FILES, as_dict, weighted_gradients

SPECS: dict[str, recurrence_dsl.Recurrence] = {}
for _path in SPEC_FILES:
    SPECS.update(recurrence_dsl.load(_path))

B, T, H, D, CHUNK = 1, 19, 2, 16, 16  # a chunk of 16 and a partial one of 3 (the Triton runtime's chunks are >= 16)
TOL = 1e-4  # relative, per tensor; every gradient here is around 1e-5 before the closed channels are added
FORMS = [("torch", "recurrent"), ("torch", "scan"), ("torch", "chunked"), ("triton", "recurrent"),
         ("triton", "chunked")]


def _closed_gate_arguments():
    """rg_lru's arguments (float64) with gr = -20 on channels 0..3 of every step (sigmoid(gr) = 2e-9, log_a about
    -1.1e-8: `1 - exp(2 log_a)` is 0 in float32) and gr = -18 on channel 5 of a few steps."""
    rec = SPECS["rg_lru"]
    args, initial = sample_arguments(rec.checked, {"D": D}, B, T, H, dtype=torch.float64, seed=3,
                                     with_initial_state=True)
    names = [s.name for s in rec.checked.inputs + rec.checked.params]
    gr = args[names.index("gr")]
    gr[..., :4] = -20.0
    gr[:, 2:T:5, :, 5] = -18.0
    lam = args[names.index("lam")]
    log_a = -8 * torch.sigmoid(gr) * torch.nn.functional.softplus(-lam)
    assert (1 - torch.exp(2 * log_a.float()) == 0).any()  # the float32 weight is exactly 0 there without expm1
    return rec, args, initial


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("backend, form", FORMS)
def test_nearly_closed_gate_gradients_are_finite_and_match_the_reference(backend, form):
    rec, args, initial = _closed_gate_arguments()
    ref, weights = weighted_gradients(rec.reference, rec, args, initial)
    layer = recurrence_dsl.compile(rec, form=form, chunk_size=CHUNK, tuning=False)
    init32 = {k: v.float() for k, v in as_dict(initial, rec.checked.states).items()}
    args32 = [a.float() for a in args]
    out, final = layer(*args32, initial_state=init32["h"], output_final_state=True, backend=backend)
    ref_out, ref_final = rec.reference(*args, initial_state=initial, output_final_state=True)
    assert _rel(out, ref_out) <= 1e-5 and _rel(final, ref_final) <= 1e-5
    got, _ = weighted_gradients(layer, rec, args32, init32, weights, backend=backend)
    names = [s.name for s in rec.checked.inputs + rec.checked.params + rec.checked.states]
    for name, g, r in zip(names, got, ref):
        assert torch.isfinite(g).all(), f"{backend} {form}: d{name} has {(~torch.isfinite(g)).sum().item()} non-finite"
        assert torch.isfinite(r).all()
    errors = {n: _rel(g, r) for n, g, r in zip(names, got, ref)}
    assert max(errors.values()) <= TOL, errors
    # the closed channels' own gradients (x's is sqrt(1 - a^2) sigmoid(gi) dh, about 2e-4 of the others')
    gx, rx = got[names.index("x")], ref[names.index("x")]
    assert _rel(gx[..., :4], rx[..., :4]) <= TOL
    ggr, rgr = got[names.index("gr")], ref[names.index("gr")]
    assert _rel(ggr[..., :4], rgr[..., :4]) <= TOL


def test_the_printed_forms_use_expm1():
    """Every printed form computes the weight from expm1: the torch forms with torch.expm1, the Triton kernels with
    the module's `_triton_expm1` helper; no `1.0 - torch.exp` / `1.0 - tl.exp` / `1.0 - <temporary>` remains."""
    source = recurrence_dsl.compile(SPECS["rg_lru"], tuning=False).source
    assert "torch.sqrt(-torch.expm1(" in source
    assert "def _triton_expm1(x):" in source and "_triton_expm1((-16.0)" in source
    assert "1.0 - torch.exp(" not in source and "1.0 - tl.exp(" not in source
    assert "sqrt(1.0 - " not in source


def test_the_rewrite():
    y, z = sympy.symbols("y z", real=True)
    assert precise(1 - sympy.exp(y)) == -expm1(y)
    assert precise(sympy.exp(y) - 1) == expm1(y)
    assert precise(2 - 2 * sympy.exp(y) + z) == z - 2 * expm1(y)
    assert precise(1 - 2 * sympy.exp(y)) == 1 - 2 * sympy.exp(y)  # no cancellation to avoid: kept
    assert precise(sympy.log(1 + y)) == log1p(y)
    assert precise(sympy.log(2 + y)) == sympy.log(2 + y)
    assert sympy.diff(-expm1(y), y) == -sympy.exp(y) and sympy.diff(log1p(y), y) == 1 / (1 + y)
    assert expm1(0) == 0 and log1p(0) == 0
    assert math.isclose(float(expm1(sympy.Float(-2e-9)).evalf()), math.expm1(-2e-9), rel_tol=1e-15)
    assert math.isclose(float(log1p(sympy.Float(3e-12)).evalf()), math.log1p(3e-12), rel_tol=1e-15)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, in the interpreter: exp(100), log(-1) on purpose
def test_the_triton_helpers(monkeypatch):
    """`_expm1` and `_log1p` (codegen/triton_printer.py HELPERS) within 3 float32 ulps of torch's, relatively,
    from 1e-30 to 80 in size (both branches, the switches at 0.25 and 0.5), with inf, -inf and NaN as torch gives
    them."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton = pytest.importorskip("triton")
    import triton.language as tl  # noqa: F401 - the helpers' source reads `tl`

    from codegen.cache import load_source
    from codegen.triton_printer import HELPERS

    source = "import triton\nimport triton.language as tl\n\n\n" + "\n\n".join(HELPERS.values()) + '''

@triton.jit
def _both(x, e, l, N: tl.constexpr):
    o = tl.arange(0, N)
    v = tl.load(x + o)
    tl.store(e + o, _expm1(v))
    tl.store(l + o, _log1p(v))
'''
    module = load_source(source, "rg_lru_numerics_helpers")
    mags = torch.logspace(-30, math.log10(80.0), 500, dtype=torch.float64)
    near = torch.tensor([0.2499, 0.25, 0.2501, 0.4999, 0.5, 0.5001, 0.99], dtype=torch.float64)
    values = torch.cat([mags, -mags, near, -near, torch.zeros(1)]).float()
    specials = torch.tensor([math.inf, -math.inf, math.nan, -1.0, 100.0], dtype=torch.float32)
    x = torch.cat([values, specials])
    n = triton.next_power_of_2(x.numel())
    x = torch.cat([x, torch.zeros(n - x.numel())])
    e, l = torch.empty_like(x), torch.empty_like(x)
    module._both[(1,)](x, e, l, N=n)
    want_e, want_l = torch.expm1(x.double()), torch.log1p(x.double())
    finite = torch.isfinite(want_e) & torch.isfinite(want_l) & (x > -1)
    ulp = 2.0 ** -23
    assert ((e.double() - want_e).abs() <= 3 * ulp * want_e.abs())[finite & (want_e.abs() < 3e38)].all()
    assert ((l.double() - want_l).abs() <= 3 * ulp * want_l.abs())[finite].all()
    special = ~finite
    torch.testing.assert_close(e[special], torch.expm1(x)[special], equal_nan=True)
    torch.testing.assert_close(l[special], torch.log1p(x)[special], equal_nan=True)


@pytest.mark.parametrize("backend, form", FORMS)
def test_fully_closed_gate_gradients_are_zero_not_nan(backend, form):
    """gr = -200 on channels 0, 1: sigmoid(gr) is 0 in float32, log_a is 0 and the weight sqrt(-expm1(0)) exactly 0,
    whose derivative is inf (the float64 reference's autograd: inf for gr, NaN for lam). With sqrt's derivative
    bounded (recurrence_dsl/adjoint.py SQRT_FLOOR) the gradients of gr and lam there are their limit, 0, and every
    other gradient still matches the reference's."""
    rec, args, initial = _closed_gate_arguments()
    names = [s.name for s in rec.checked.inputs + rec.checked.params + rec.checked.states]
    args[names.index("gr")][..., :2] = -200.0
    ref, weights = weighted_gradients(rec.reference, rec, args, initial)
    layer = recurrence_dsl.compile(rec, form=form, chunk_size=CHUNK, tuning=False)
    init32 = {k: v.float() for k, v in as_dict(initial, rec.checked.states).items()}
    got, _ = weighted_gradients(layer, rec, [a.float() for a in args], init32, weights, backend=backend)
    for name, g, r in zip(names, got, ref):
        assert torch.isfinite(g).all(), f"{backend} {form}: d{name} has {(~torch.isfinite(g)).sum().item()} non-finite"
        if name in ("gr", "lam"):
            assert not torch.isfinite(r[..., :2]).all()  # the reference's own: inf / NaN
            assert (g[..., :2] == 0).all()
            g, r = g[..., 2:], r[..., 2:]
        assert _rel(g, r) <= TOL, (name, _rel(g, r))
