"""The published layers of issue 12 in specs/ (mLSTM, minGRU, RG-LRU, bidirectional Mamba), each against a plain
torch loop written here from its paper's equations, not from the spec.

Each loop is written the way the paper states the step (the mLSTM's sigmoid forget gate and exp input gate, minGRU's
1 - z_t, RG-LRU's a^(c r_t) as a power rather than the spec's log-space form, Vim's backward SSM as a loop from the
last token down), so a spec that says something else than its paper fails here even where the reference
interpreter, which runs the spec, agrees with the compiled forms. Every torch form the layer offers runs in float64
(relative error <= 1e-9) and float32 (<= 1e-4), every Triton form (interpreter) in float32 (<= 1e-4), at T = 19 over
chunks of 8 (torch) and 16 (Triton), from a random initial state; outputs and final states are compared. Gradients
of every torch form (float64, <= 1e-8) match autograd through the loop. The bidirectional test sums the forward and
the reverse layer, as Vim's block does, and compares with the two loops summed.
"""

from __future__ import annotations

import pytest
import torch

import recurrence_dsl
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPECS_DIR, as_dict
from .test_breadth import F32, F64, TOL, cast_state, rel
from .test_forms import flatten

T, BATCH, HEADS = 19, 2, 2
TORCH_CHUNK, TRITON_CHUNK = 8, 16


def _load(stem: str) -> dict[str, recurrence_dsl.Recurrence]:
    return recurrence_dsl.load(SPECS_DIR / f"{stem}.rec")


RECS = {**_load("mlstm"), **_load("min_gru"), **_load("rg_lru"), **_load("bidirectional_mamba")}
SIZES = {"mlstm": {"K": 4, "V": 3}, "min_gru": {"D": 5}, "rg_lru": {"D": 5},
         "bidirectional_mamba_forward": {"D": 4, "N": 3}, "bidirectional_mamba_backward": {"D": 4, "N": 3}}
# What the analysis gives each layer; a change here is a change users see (and README's class table states).
FORMS = {"mlstm": (["recurrent", "scan", "chunked", "parallel"], ["recurrent", "scan", "chunked", "parallel"]),
         "min_gru": (["recurrent", "scan", "chunked", "parallel"], ["recurrent", "scan", "chunked", "parallel"]),
         "rg_lru": (["recurrent", "scan", "chunked", "parallel"], ["recurrent", "scan", "chunked", "parallel"]),
         "bidirectional_mamba_forward": (["recurrent", "scan"], ["recurrent", "scan"]),
         "bidirectional_mamba_backward": (["recurrent", "scan"], ["recurrent", "scan"])}


# ---- the papers' steps, written out ----------------------------------------------------------------------


def mlstm_loop(q, k, v, ig, fg, initial):
    """xLSTM (Beck et al. 2024) Sec. 2.3, unstabilised: C_t = f_t C_{t-1} + i_t v_t k_t^T, n_t = f_t n_{t-1} + i_t k_t,
    h_t = C_t q_t / max(|n_t^T q_t|, 1), f_t = sigmoid(fg_t), i_t = exp(ig_t). C is kept as the paper's [V, K]."""
    C, n = initial["C"].transpose(-1, -2).clone(), initial["n"].clone()        # C: [B, H, V, K], n: [B, H, K]
    hs = []
    for t in range(q.shape[1]):
        f, i = torch.sigmoid(fg[:, t])[..., None], torch.exp(ig[:, t])[..., None]   # [B, H, 1]
        C = f[..., None] * C + i[..., None] * v[:, t, :, :, None] * k[:, t, :, None, :]
        n = f * n + i * k[:, t]
        num = (C @ q[:, t, :, :, None])[..., 0]                                     # C_t q_t: [B, H, V]
        den = (n * q[:, t]).sum(-1).abs().clamp_min(1.0)[..., None]                # max(|n^T q|, 1)
        hs.append(num / den)
    return torch.stack(hs, 1), {"C": C.transpose(-1, -2), "n": n}


def min_gru_loop(z, hc, initial):
    """Feng et al. 2024, Sec. 3.1: z_t = sigmoid(.), h_t = (1 - z_t) * h_{t-1} + z_t * h~_t."""
    h, ys = initial.clone(), []
    for t in range(z.shape[1]):
        gate = torch.sigmoid(z[:, t])
        h = (1 - gate) * h + gate * hc[:, t]
        ys.append(h)
    return torch.stack(ys, 1), h


def rg_lru_loop(x, gr, gi, lam, initial):
    """Griffin (De et al. 2024), Sec. 2.4: a = sigmoid(Lambda), a_t = a^(c r_t) with c = 8,
    h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * x_t), r_t and i_t sigmoid gates."""
    a, h, ys = torch.sigmoid(lam), initial.clone(), []                            # a: [H, D]
    for t in range(x.shape[1]):
        a_t = a ** (8 * torch.sigmoid(gr[:, t]))
        h = a_t * h + torch.sqrt(1 - a_t ** 2) * (torch.sigmoid(gi[:, t]) * x[:, t])
        ys.append(h)
    return torch.stack(ys, 1), h


def s6_loop(x, dt, B, C, A, initial, reverse: bool):
    """The S6 step of Vim's Algorithm 1 (Mamba, Gu and Dao 2023, eq. 2a-2b, Abar = exp(dt A), Bbar = dt B):
    h_t = Abar_t h + Bbar_t x_t, y_t = C_t h_t, over t = 0..T-1, or T-1..0 for the backward SSM."""
    h = initial.clone()                                                            # [B, H, D, N]
    ys = [None] * x.shape[1]
    steps = range(x.shape[1])
    for t in reversed(steps) if reverse else steps:
        h = torch.exp(dt[:, t, :, :, None] * A) * h + (dt[:, t] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys[t] = (h * C[:, t, :, None, :]).sum(-1)
    return torch.stack(ys, 1), h


def _floor_binds(args, initial) -> float:
    """The fraction of (step, batch, head) at which the mLSTM's max(|n_t^T q_t|, 1) is 1."""
    q, k, _, ig, fg = args
    n, binds = initial["n"].clone(), []
    for t in range(q.shape[1]):
        n = torch.sigmoid(fg[:, t])[..., None] * n + torch.exp(ig[:, t])[..., None] * k[:, t]
        binds.append((n * q[:, t]).sum(-1).abs() <= 1)
    return torch.stack(binds).double().mean().item()


def loop(name: str, args, initial):
    if name == "mlstm":
        return mlstm_loop(*args, initial)
    if name == "min_gru":
        return min_gru_loop(*args, initial)
    if name == "rg_lru":
        return rg_lru_loop(*args, initial)
    return s6_loop(*args, initial, reverse=name == "bidirectional_mamba_backward")


# ---- the checks --------------------------------------------------------------------------------------------


def case(name: str, seed: int = 0):
    """Arguments and initial state drawn as `recdsl check` draws them, float32-exact so one float64 loop serves both
    dtypes."""
    rec = RECS[name]
    args, initial = sample_arguments(rec.checked, SIZES[name], BATCH, T, HEADS, dtype=F64, seed=seed,
                                     with_initial_state=True)
    args = [a.to(F32).to(F64) for a in args]
    if name == "mlstm":  # a larger q, so |n_t^T q_t| crosses the normaliser's floor of 1 both ways within the run
        args[0] = 4 * args[0]
    initial = {k: v.to(F32).to(F64) for k, v in as_dict(initial, rec.checked.states).items()}
    return rec, args, initial if len(initial) > 1 else next(iter(initial.values()))


def errors(rec, layer, form, args, initial, want, dtype) -> dict[str, float]:
    out, final = layer(*[a.to(dtype) for a in args], initial_state=cast_state(initial, dtype),
                       output_final_state=True, form=form)
    got = flatten(rec, out, final)
    assert got.keys() == want.keys()
    for key, value in got.items():
        assert value.shape == want[key].shape, (key, value.shape)
    return {key: rel(got[key], want[key]) for key in want}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_every_form_matches_the_papers_loop(name):
    rec, args, initial = case(name)
    want = flatten(rec, *loop(name, args, initial))
    ref = flatten(rec, *rec.reference(*args, initial_state=initial, output_final_state=True))
    assert max(rel(ref[key], want[key]) for key in want) < 1e-12     # the spec says what the paper says
    if name == "mlstm":
        assert 0.2 < _floor_binds(args, initial) < 0.8, "both sides of max(|n^T q|, 1) should be exercised"
    torch_forms, triton_forms = FORMS[name]
    torch_layer = recurrence_dsl.compile(rec, backend="torch", chunk_size=TORCH_CHUNK, tuning=False)
    triton_layer = recurrence_dsl.compile(rec, backend="triton", chunk_size=TRITON_CHUNK, tuning=False)
    assert list(torch_layer.forms) == torch_forms and list(triton_layer.triton_forms) == triton_forms
    bad = {}
    runs = [(torch_layer, form, dtype) for form in torch_forms for dtype in (F64, F32)]
    runs += [(triton_layer, form, F32) for form in triton_forms]
    for layer, form, dtype in runs:
        errs = errors(rec, layer, form, args, initial, want, dtype)
        bad.update({(layer.backend if hasattr(layer, "backend") else "", form, str(dtype), key): f"{e:.1e}"
                    for key, e in errs.items() if not e <= TOL[dtype]})
    assert not bad, bad


def _grads(fn, args, initial, weights):
    """Gradients of sum(weights * outputs and final states) with respect to every argument and initial state."""
    leaves = [a.detach().clone().requires_grad_() for a in args]
    states = {k: v.detach().clone().requires_grad_() for k, v in initial.items()} if isinstance(initial, dict) \
        else initial.detach().clone().requires_grad_()
    flat = fn(leaves, states)
    loss = sum((weights[key] * value).sum() for key, value in flat.items())
    loss.backward()
    state_leaves = list(states.values()) if isinstance(states, dict) else [states]
    return [x.grad for x in leaves + state_leaves]


@pytest.mark.parametrize("name", sorted(SIZES))
def test_gradients_match_the_papers_loop(name):
    rec, args, initial = case(name, seed=1)
    want_flat = flatten(rec, *loop(name, args, initial))
    gen = torch.Generator().manual_seed(2)
    weights = {key: torch.randn(value.shape, generator=gen, dtype=F64) for key, value in want_flat.items()}
    want = _grads(lambda a, s: flatten(rec, *loop(name, a, s)), args, initial, weights)
    layer = recurrence_dsl.compile(rec, backend="torch", chunk_size=TORCH_CHUNK, tuning=False)
    for form in FORMS[name][0]:
        got = _grads(lambda a, s, form=form: flatten(rec, *layer(*a, initial_state=s, output_final_state=True,
                                                                  form=form)), args, initial, weights)
        errs = [rel(g, w) for g, w in zip(got, want, strict=True)]
        assert max(errs) < 1e-8, (form, errs)


def test_bidirectional_mamba_is_the_two_loops_summed():
    """Vim's block output y_forward + y_backward: the forward layer plus the reverse layer (declared `reverse
    recurrence`), each with its own inputs and A, on the torch scan form and the Triton recurrent form; and the forward
    spec called with reverse=True is the backward layer."""
    fwd_rec, bwd_rec = RECS["bidirectional_mamba_forward"], RECS["bidirectional_mamba_backward"]
    assert not fwd_rec.checked.reverse and bwd_rec.checked.reverse
    _, fwd_args, fwd_h0 = case("bidirectional_mamba_forward", seed=3)
    _, bwd_args, bwd_h0 = case("bidirectional_mamba_backward", seed=4)
    want = s6_loop(*fwd_args, fwd_h0, reverse=False)[0] + s6_loop(*bwd_args, bwd_h0, reverse=True)[0]
    for backend, form in (("torch", "scan"), ("triton", "recurrent")):
        fwd = recurrence_dsl.compile(fwd_rec, backend=backend, tuning=False)
        bwd = recurrence_dsl.compile(bwd_rec, backend=backend, tuning=False)
        y = fwd(*[a.float() for a in fwd_args], initial_state=fwd_h0.float(), form=form)[0] \
            + bwd(*[a.float() for a in bwd_args], initial_state=bwd_h0.float(), form=form)[0]
        assert y.shape == want.shape and rel(y, want) < 1e-5, (backend, rel(y, want))
        backwards = fwd(*[a.float() for a in bwd_args], initial_state=bwd_h0.float(), form=form, reverse=True)[0]
        assert rel(backwards, s6_loop(*bwd_args, bwd_h0, reverse=True)[0]) < 1e-5
