"""Five published layers that are not in specs/, written from their papers by a new user (tests/data): what the
analysis makes of each, the reference against a plain torch loop of the paper's step, and every path against the
reference, forward and backward.

- comba.rec (Comba, Hu et al. 2025, Eq. 10): a scalar decay and a rank-one correction with its own gate,
  `S (alpha - bt k k^T) + beta v k^T`, is recognised as the delta rule's class with beta = bt / alpha, so it gets
  the chunked (WY) form, torch and Triton.
- longhorn.rec (Longhorn, Liu et al. 2024, Eq. 8-9): a decay `1 - eps[j] k[i]^2` that differs per element of a
  matrix state is the elementwise class: a scan, no chunked form.
- gateloop.rec (GateLoop, Katsch 2023, Eq. 3): a complex diagonal transition of a matrix state, written as a real
  and an imaginary [K, V] state, is coupled-elementwise: a 2x2 block scan. The loop here runs complex tensors.
- slstm.rec (xLSTM's sLSTM, Beck et al. 2024, Eq. 8-17): exponential gating stabilised with max, recurrent [D, D]
  params: non-linear, recurrent form only, its adjoint derived.
- titans_momentum.rec (Titans, Behrouz et al. 2024, Eq. 13-15, linear memory): a delta-rule gradient step into a
  momentum state that feeds the memory: two coupled matrix states, the general class, recurrent form only.

Budget: torch forms at B=2, T=9 (chunks of 4); the Triton interpreter once per spec (its default form, packed
sequences, initial states, forward and backward) at B=1, T=7, sizes 4.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import recurrence_dsl
from recurrence_dsl.analysis import analyse
from recurrence_dsl.sampling import sample_arguments

from .test_forms import flatten

DATA = Path(__file__).parent / "data"
FILES = {"comba": "comba", "longhorn": "longhorn", "gateloop": "gateloop", "slstm": "slstm",
         "titans": "titans_momentum"}
RECS = {name: recurrence_dsl.load(DATA / f"{stem}.rec")[name] for name, stem in FILES.items()}
# class, torch forms: what users see in `recdsl show`.
CLASSES = {"comba": ("rank-one-update", ("recurrent", "chunked")),
           "longhorn": ("elementwise", ("recurrent", "scan")),
           "gateloop": ("coupled-elementwise", ("recurrent", "scan")),
           "slstm": ("non-linear", ("recurrent",)),
           "titans": ("general", ("recurrent",))}
SIZES = {"comba": {"K": 4, "V": 3}, "longhorn": {"K": 4, "V": 3}, "gateloop": {"K": 4, "V": 3}, "slstm": {"D": 4},
         "titans": {"K": 4, "V": 3}}


# ---- the papers' steps, written out (states in the papers' layouts) --------------------------------------------


def comba_loop(a, init):
    """S_t = S_{t-1} (alpha_t I - bt_t k_t k_t^T) + beta_t v_t k_t^T, o_t = K^-1/2 S_t (q_t - d k_t); S is [V, K]."""
    q, k, v, g, bt, beta, d = a
    S = init["S"].transpose(-1, -2).clone()
    eye = torch.eye(k.shape[-1], dtype=k.dtype)
    out = []
    for t in range(q.shape[1]):
        kt = k[:, t]
        kk = kt[..., :, None] * kt[..., None, :]
        trans = torch.exp(g[:, t])[..., None, None] * eye - bt[:, t, :, None, None] * kk
        S = S @ trans + beta[:, t, :, None, None] * v[:, t, :, :, None] * kt[..., None, :]
        out.append((S @ (q[:, t] - d[:, None] * kt)[..., None])[..., 0] * k.shape[-1] ** -0.5)
    return torch.stack(out, 1), {"S": S.transpose(-1, -2)}


def longhorn_loop(a, init):
    """S_t = (1 - eps_t k_t^2^T) . S_{t-1} + (eps_t . x_t) k_t^T, eps_t = b_t / (1 + b_t k_t^T k_t); S is [V, K]."""
    q, k, x, b = a
    S = init["S"].transpose(-1, -2).clone()
    out = []
    for t in range(q.shape[1]):
        kt, bt = k[:, t], torch.sigmoid(b[:, t])
        eps = bt / (1 + bt * (kt * kt).sum(-1, keepdim=True))
        S = (1 - eps[..., :, None] * (kt * kt)[..., None, :]) * S + (eps * x[:, t])[..., :, None] * kt[..., None, :]
        out.append((S @ q[:, t, ..., None])[..., 0])
    return torch.stack(out, 1), {"S": S.transpose(-1, -2)}


def gateloop_loop(a, init):
    """S_t = a_t . S_{t-1} + k_t v_t^T, complex a_t = sigmoid(r_t) e^(i theta_t) per key row; y_t = Re(q_t^T S_t)."""
    q, k, v, r, theta = a
    S = torch.complex(init["Sr"], init["Si"])
    out = []
    for t in range(q.shape[1]):
        at = torch.sigmoid(r[:, t]) * torch.exp(1j * theta[:, t])
        S = at[..., None] * S + (k[:, t, ..., None] * v[:, t, :, None, :]).to(S.dtype)
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t].to(S.dtype), S).real)
    return torch.stack(out, 1), {"Sr": S.real, "Si": S.imag}


def slstm_loop(a, init):
    """sLSTM with stabiliser m (xLSTM Eqs. 8-17): pre-activations W x + R h_{t-1}, i = exp, f = sigmoid."""
    xz, xi, xf, xo, Rz, Ri, Rf, Ro = a
    c, n, m, h = (init[s].clone() for s in ("c", "n", "m", "h"))
    out = []
    for t in range(xz.shape[1]):
        def rec(R, h=h):
            return torch.einsum("hde,bhe->bhd", R, h)
        z = torch.tanh(xz[:, t] + rec(Rz))
        it = xi[:, t] + rec(Ri)
        logf = torch.nn.functional.logsigmoid(xf[:, t] + rec(Rf))
        o = torch.sigmoid(xo[:, t] + rec(Ro))
        m_new = torch.maximum(logf + m, it)
        i_, f_ = torch.exp(it - m_new), torch.exp(logf + m - m_new)
        c, n, m = f_ * c + i_ * z, f_ * n + i_, m_new
        h = o * c / n
        out.append(h)
    return torch.stack(out, 1), {"c": c, "n": n, "m": m, "h": h}


def titans_loop(a, init):
    """Z_t = eta Z_{t-1} - theta k (M_{t-1}^T k - v)^T (grad of ||M^T k - v||^2 / 2); M_t = (1 - alpha) M + Z_t."""
    q, k, v, eta, theta, alpha = a
    M, Z = init["M"].clone(), init["Z"].clone()
    out = []
    for t in range(q.shape[1]):
        kt = k[:, t]
        err = torch.einsum("bhk,bhkv->bhv", kt, M) - v[:, t]
        Z = eta[:, t, :, None, None] * Z - theta[:, t, :, None, None] * kt[..., :, None] * err[..., None, :]
        M = (1 - alpha[:, t, :, None, None]) * M + Z
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t], M))
    return torch.stack(out, 1), {"M": M, "Z": Z}


LOOPS = {"comba": comba_loop, "longhorn": longhorn_loop, "gateloop": gateloop_loop, "slstm": slstm_loop,
         "titans": titans_loop}


def arguments(name: str, batch: int, length: int, seed: int = 0):
    args, init = sample_arguments(RECS[name].checked, SIZES[name], batch, length, 2, dtype=torch.float64, seed=seed,
                                  with_initial_state=True)
    if not isinstance(init, dict):
        init = {RECS[name].checked.states[0].name: init}
    if name == "slstm":
        init = dict(init, n=init["n"].abs() + 1.0)   # a normaliser is positive
    return list(args), init


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ---- tests ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RECS)
def test_class_and_forms(name):
    analysis = analyse(RECS[name].checked)
    assert (analysis.cls.value, analysis.forms) == CLASSES[name]
    assert RECS[name].warnings == ()


@pytest.mark.parametrize("name", RECS)
def test_reference_is_the_papers_step(name):
    args, init = arguments(name, 2, 9)
    out, final = RECS[name].reference(*args, initial_state=init, output_final_state=True)
    final = flatten(RECS[name], out, final)
    want_out, want_final = LOOPS[name](args, init)
    assert rel(out, want_out) < 1e-12
    for state, value in want_final.items():
        assert rel(final[f"state:{state}"], value) < 1e-12, state


@pytest.mark.parametrize("name", RECS)
def test_torch_forms_forward_backward_reverse(name):
    rec = RECS[name]
    args, init = arguments(name, 2, 9, seed=1)
    layer = recurrence_dsl.compile(rec, backend="torch", chunk_size=4)
    for reverse in (False, True):
        leaves = [a.clone().requires_grad_() for a in args]
        out, final = rec.reference(*leaves, initial_state=init, output_final_state=True, reverse=reverse)
        ref = flatten(rec, out, final)
        sum(v.sum() * (i + 1) for i, v in enumerate(ref.values())).backward()
        ref_grads = [a.grad for a in leaves]
        for form in CLASSES[name][1]:
            leaves = [a.float().requires_grad_() for a in args]
            out, final = layer(*leaves, initial_state={s: v.float() for s, v in init.items()},
                               output_final_state=True, form=form, reverse=reverse)
            got = flatten(rec, out, final)
            for key in ref:
                assert rel(got[key], ref[key]) < 1e-4, (form, reverse, key)
            sum(v.sum() * (i + 1) for i, v in enumerate(got.values())).backward()
            for arg, a, g in zip(rec.checked.inputs + rec.checked.params, leaves, ref_grads, strict=True):
                assert rel(a.grad, g) < 1e-4, (form, reverse, arg.name)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter (conftest)")
@pytest.mark.parametrize("name", RECS)
def test_triton_packed_sequences_forward_backward(name):
    """The default Triton form on 3 packed sequences (one a single step) from their own initial states."""
    rec = RECS[name]
    args, init = arguments(name, 1, 7, seed=2)
    # One row per sequence; positive scales keep sLSTM's normaliser n away from 0 (h = c / n).
    init = {s: torch.cat([v, 0.5 * v, 1.5 * v]) for s, v in init.items()}
    cu_seqlens = torch.tensor([0, 3, 4, 7])
    leaves = [a.clone().requires_grad_() for a in args]
    out, final = rec.reference(*leaves, initial_state=init, output_final_state=True, cu_seqlens=cu_seqlens)
    ref = flatten(rec, out, final)
    sum(v.sum() * (i + 1) for i, v in enumerate(ref.values())).backward()
    layer = recurrence_dsl.compile(rec, backend="triton")
    tl = [a.float().requires_grad_() for a in args]
    out, final = layer(*tl, initial_state={s: v.float() for s, v in init.items()}, output_final_state=True,
                       cu_seqlens=cu_seqlens)
    got = flatten(rec, out, final)
    for key in ref:
        assert rel(got[key], ref[key]) < 1e-4, key
    sum(v.sum() * (i + 1) for i, v in enumerate(got.values())).backward()
    for arg, a, r in zip(rec.checked.inputs + rec.checked.params, tl, leaves, strict=True):
        assert rel(a.grad, r.grad) < 1e-4, arg.name
