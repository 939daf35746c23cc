"""specs/mamba3.rec (Mamba-3 SISO, Lahoti et al. 2026) against a plain torch loop of the paper's equations, written
here and not from the spec.

The loop states the exponential-trapezoidal step as the paper does, with its three coefficients,
h_t = alpha_t h_{t-1} + beta_t B_{t-1} x_{t-1}^T + gamma_t B_t x_t^T, alpha_t = exp(dt_t A_t),
beta_t = (1 - lambda_t) dt_t alpha_t, gamma_t = lambda_t dt_t, lambda_t = sigmoid(trap_t), y_t = C_t^T h_t + D x_t,
and keeps the previous step's B and x in plain variables that start each sequence from the given initial values (the
spec's shift states B_last and x_last). It runs each sequence on its own, so a packed call (`cu_seqlens`) restarts h
and both shift states at every sequence start.

- the analysis: h is scalar with a sum of two outer products (two sub-steps), B_last and x_last are shift states, and
  every form is offered on both backends;
- the reference interpreter equals the loop (dense and packed), and with lambda = 1 the spec is mamba2.rec;
- the recurrent and chunked forms, torch (float64) and Triton (interpreter, float32), on dense rows and on packed
  sequences with an empty one, each from its own initial h, B_last and x_last (T = 40 over chunks of 16 sub-steps,
  so chunk boundaries fall inside sequences): outputs, final states and the gradients of every input, D and every
  initial state against autograd through the loop; the torch scan and parallel forms too.
"""

from __future__ import annotations

import pytest
import torch

import recurrence_dsl
from recurrence_dsl.analysis import TransitionClass, analyse
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPECS_DIR, as_dict

F64, F32 = torch.float64, torch.float32
REC = recurrence_dsl.load(SPECS_DIR / "mamba3.rec")["mamba3"]
MAMBA2 = recurrence_dsl.load(SPECS_DIR / "mamba2.rec")["mamba2"]
SIZES = {"P": 6, "N": 8}
HEADS, CHUNK = 2, 16
CU = (0, 9, 9, 23, 40)  # packed sequences, the second one empty
STATES = ("h", "B_last", "x_last")
TOL = {F64: 1e-10, F32: 3e-5}


# ---- the paper's step, written out -----------------------------------------------------------------------------


def mamba3_loop(x, dt, A, trap, B, C, D, h0, B0, x0):
    """One sequence per row: x [b, T, H, P], dt / A / trap [b, T, H], B / C [b, T, H, N], D [H]; h0 [b, H, N, P],
    B0 [b, H, N], x0 [b, H, P] (the previous step's B and x before the first step). Returns y and the final h, B, x."""
    h, b_prev, x_prev, ys = h0, B0, x0, []
    for t in range(x.shape[1]):
        alpha = torch.exp(dt[:, t] * A[:, t])                                    # [b, H]
        lam = torch.sigmoid(trap[:, t])
        beta = (1 - lam) * dt[:, t] * alpha
        gamma = lam * dt[:, t]
        h = (alpha[..., None, None] * h
             + beta[..., None, None] * b_prev[..., :, None] * x_prev[..., None, :]
             + gamma[..., None, None] * B[:, t, ..., :, None] * x[:, t, ..., None, :])
        ys.append(torch.einsum("bhn,bhnp->bhp", C[:, t], h) + D[:, None] * x[:, t])
        b_prev, x_prev = B[:, t], x[:, t]
    y = torch.stack(ys, 1) if ys else x.new_zeros(x.shape)  # an empty sequence: no output, the initial states
    return y, h, b_prev, x_prev


def loop(args, initial, cu_seqlens=None):
    """{"out:y", "state:h", "state:B_last", "state:x_last"} of the paper's loop; packed: each sequence of row 0 from
    its own row of the initial states, the outputs concatenated and the final states stacked in sequence order."""
    *inputs, D = args
    h0, B0, x0 = (initial[s] for s in STATES)
    if cu_seqlens is None:
        y, *final = mamba3_loop(*inputs, D, h0, B0, x0)
    else:
        ys, finals = [], []
        for i, (s, e) in enumerate(zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True)):
            y, *final = mamba3_loop(*[a[:, s:e] for a in inputs], D, h0[i:i + 1], B0[i:i + 1], x0[i:i + 1])
            ys.append(y)
            finals.append(final)
        y = torch.cat(ys, 1)
        final = [torch.cat(parts, 0) for parts in zip(*finals, strict=True)]
    return {"out:y": y, **{f"state:{s}": f for s, f in zip(STATES, final, strict=True)}}


# ---- cases -----------------------------------------------------------------------------------------------------


def case(packed: bool, seed: int = 0):
    """Arguments as `recdsl check` draws them (A < 0, dt > 0), rounded to float32 so one float64 loop serves both
    dtypes; packed: one row of CU[-1] steps and an initial state for each of its sequences."""
    batch, length = (1, CU[-1]) if packed else (2, 21)
    rows = len(CU) - 1 if packed else batch
    args, initial = sample_arguments(REC.checked, SIZES, batch, length, HEADS, dtype=F64, seed=seed,
                                     with_initial_state=True, rows=rows)
    args = [a.to(F32).to(F64) for a in args]
    initial = {k: v.to(F32).to(F64) for k, v in initial.items()}
    return args, initial, (torch.tensor(CU) if packed else None)


def flat(rec, out, final) -> dict[str, torch.Tensor]:
    got = {f"out:{k}": v for k, v in as_dict(out, rec.checked.outputs).items()}
    got.update({f"state:{k}": v for k, v in as_dict(final, rec.checked.states).items()})
    return got


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def test_the_analysis_chunks_the_trapezoid_as_two_sub_steps_after_the_shift():
    a = analyse(REC.checked)
    assert a.cls is TransitionClass.SCALAR and a.forms == ("recurrent", "scan", "chunked", "parallel"), a.unavailable
    assert [s.name for s in a.shift.states] == ["B_last", "x_last"]
    assert a.states["B_last"].cls is a.states["x_last"].cls is TransitionClass.SHIFT
    subs = a.states["h"].chunk.sub_steps
    assert len(subs) == 2 and subs[0].decay_axis == "scalar" and subs[1].log_decay is None
    layer = recurrence_dsl.compile(REC, backend="triton", tuning=False)
    assert list(layer.triton_forms) == ["recurrent", "scan", "chunked", "parallel"]


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_the_spec_is_the_papers_step(packed):
    args, initial, cu = case(packed)
    want = loop(args, initial, cu)
    got = flat(REC, *REC.reference(*args, initial_state=initial, output_final_state=True, cu_seqlens=cu))
    assert got.keys() == want.keys()
    assert max(rel(got[k], want[k]) for k in want) < 1e-13


def test_lambda_one_is_mamba2():
    """sigmoid(trap) = 1 in float64 (trap = 40): the trapezoid's beta is 0, gamma is dt, the step is Mamba-2's."""
    (x, dt, A, trap, B, C, D), initial, _ = case(False, seed=5)
    A = A[:1, :1, :].expand_as(A)  # mamba2's A is a per-head param: one value per head for every step
    out = REC.reference(x, dt, A, torch.full_like(trap, 40.0), B, C, D, initial_state=initial,
                        output_final_state=True)
    ref = MAMBA2.reference(x, dt, B, C, A[0, 0], D, initial_state=initial["h"], output_final_state=True)
    assert rel(out[0], ref[0]) < 1e-14 and rel(out[1]["h"], ref[1]) < 1e-14


def _grads(fn, args, initial, weights):
    """Gradients of sum(weights * (outputs, final states)) with respect to every argument and initial state."""
    leaves = [a.detach().clone().requires_grad_() for a in args]
    states = {k: v.detach().clone().requires_grad_() for k, v in initial.items()}
    got = fn(leaves, states)
    sum((weights[k] * v.double()).sum() for k, v in got.items()).backward()
    return got, [a.grad for a in leaves] + [states[s].grad for s in STATES]


GRAD_NAMES = [f"d{s.name}" for s in REC.checked.inputs + REC.checked.params] + [f"d{s}0" for s in STATES]
RUNS = ([pytest.param("torch", form, F64, id=f"torch-{form}") for form in ("recurrent", "chunked", "scan", "parallel")]
        + [pytest.param("triton", form, F32, id=f"triton-{form}") for form in ("recurrent", "chunked")])


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize(("backend", "form", "dtype"), RUNS)
def test_forms_match_the_papers_loop(backend, form, dtype, packed):
    """Outputs, final states and gradients (every input, D, and the initial h, B_last, x_last) of one form against
    autograd through the loop in float64."""
    args, initial, cu = case(packed, seed=1)
    want = loop(args, initial, cu)
    gen = torch.Generator().manual_seed(2)
    weights = {k: torch.randn(v.shape, generator=gen, dtype=F64) for k, v in want.items()}
    _, want_grads = _grads(lambda a, s: loop(a, s, cu), args, initial, weights)
    layer = recurrence_dsl.compile(REC, backend=backend, chunk_size=CHUNK, tuning=False)

    def run(a, s):
        out, final = layer(*[v.to(dtype) for v in a], initial_state={k: v.to(dtype) for k, v in s.items()},
                           output_final_state=True, form=form, cu_seqlens=cu)
        return flat(REC, out, final)

    got, got_grads = _grads(run, args, initial, weights)
    assert got.keys() == want.keys() and all(got[k].shape == want[k].shape for k in want)
    errors = {k: rel(got[k], want[k]) for k in want}
    errors.update({n: rel(g, w) for n, g, w in zip(GRAD_NAMES, got_grads, want_grads, strict=True)})
    assert max(errors.values()) <= TOL[dtype], {k: f"{e:.1e}" for k, e in errors.items()}
