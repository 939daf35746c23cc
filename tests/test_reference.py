"""The reference interpreter against per-step loops written by hand in plain torch.

Each `hand_*` function below is written from the spec's text alone (not from the interpreter): inputs come as
`[B, T, H, ...]`, params as `[H, ...]`, states as `[B, H, ...]`; it returns `(outputs [B, T, H, ...], final)`.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch alias

import recurrence_dsl
from recurrence_dsl.sampling import sample_arguments

from .conftest import small_sizes

F64 = torch.float64


def _zeros_like_state(batch, heads, *dims, like):
    return torch.zeros(batch, heads, *dims, dtype=like.dtype)


def _outer(a, b):
    return torch.einsum("bhk,bhv->bhkv", a, b)


def _readout(q, S):
    return torch.einsum("bhk,bhkv->bhv", q, S)


def hand_linear_attention(q, k, v, S0=None):
    Bn, T, H, K = q.shape
    S = _zeros_like_state(Bn, H, K, v.shape[-1], like=q) if S0 is None else S0.clone()
    out = []
    for t in range(T):
        S = S + _outer(k[:, t], v[:, t])
        out.append(K ** -0.5 * _readout(q[:, t], S))
    return torch.stack(out, 1), S


def hand_gla(q, k, v, g, S0=None):
    Bn, T, H, K = q.shape
    S = _zeros_like_state(Bn, H, K, v.shape[-1], like=q) if S0 is None else S0.clone()
    out = []
    for t in range(T):
        S = torch.exp(g[:, t])[..., None] * S + _outer(k[:, t], v[:, t])
        out.append(K ** -0.5 * _readout(q[:, t], S))
    return torch.stack(out, 1), S


def hand_retention(q, k, v, gamma, S0=None):
    Bn, T, H, K = q.shape
    S = _zeros_like_state(Bn, H, K, v.shape[-1], like=q) if S0 is None else S0.clone()
    out = []
    for t in range(T):
        S = gamma[None, :, None, None] * S + _outer(k[:, t], v[:, t])
        out.append(K ** -0.5 * _readout(q[:, t], S))
    return torch.stack(out, 1), S


def hand_lightning_attention(q, k, v, slope, S0=None):
    Bn, T, H, K = q.shape
    S = _zeros_like_state(Bn, H, K, v.shape[-1], like=q) if S0 is None else S0.clone()
    out = []
    for t in range(T):
        S = torch.exp(-slope)[None, :, None, None] * S + _outer(k[:, t], v[:, t])
        out.append(_readout(q[:, t], S))
    return torch.stack(out, 1), S


def hand_hgrn2(q, f, v, S0=None):
    Bn, T, H, K = q.shape
    S = _zeros_like_state(Bn, H, K, v.shape[-1], like=q) if S0 is None else S0.clone()
    out = []
    for t in range(T):
        a = torch.exp(f[:, t])
        S = a[..., None] * S + _outer(1 - a, v[:, t])
        out.append(_readout(q[:, t], S))
    return torch.stack(out, 1), S


def hand_rwkv6(r, k, v, w, u, S0=None):
    """The output reads S *before* the update, plus the bonus u for the current token."""
    Bn, T, H, K = r.shape
    S = _zeros_like_state(Bn, H, K, v.shape[-1], like=r) if S0 is None else S0.clone()
    out = []
    for t in range(T):
        kv = _outer(k[:, t], v[:, t])
        out.append(_readout(r[:, t], S + u[None, :, :, None] * kv))
        S = torch.exp(w[:, t])[..., None] * S + kv
    return torch.stack(out, 1), S


def hand_rwkv7(r, w, k, v, kk, a, u, S0=None):
    """S_t = (diag(exp(w_t)) - (a_t * kk_t) kk_t^T) S_{t-1} + k_t v_t^T, read after the update, plus the bonus."""
    Bn, T, H, K = r.shape
    S = _zeros_like_state(Bn, H, K, v.shape[-1], like=r) if S0 is None else S0.clone()
    out = []
    for t in range(T):
        removed = torch.einsum("bhk,bhkv->bhv", kk[:, t], S)  # kk^T S
        S = (torch.exp(w[:, t])[..., None] * S - (a[:, t] * kk[:, t])[..., None] * removed[..., None, :]
             + _outer(k[:, t], v[:, t]))
        bonus = (r[:, t] * u[None] * k[:, t]).sum(-1, keepdim=True) * v[:, t]
        out.append(_readout(r[:, t], S) + bonus)
    return torch.stack(out, 1), S


def hand_normalized_linear_attention(q, k, v, S0=None):
    """Two states: S[K, V] and the normaliser z[K]; S0 is a dict or None."""
    Bn, T, H, K = q.shape
    if S0 is None:
        S = _zeros_like_state(Bn, H, K, v.shape[-1], like=q)
        z = _zeros_like_state(Bn, H, K, like=q)
    else:
        S, z = S0["S"].clone(), S0["z"].clone()
    out = []
    for t in range(T):
        fq = F.elu(q[:, t]) + 1
        fk = F.elu(k[:, t]) + 1
        S = S + _outer(fk, v[:, t])
        z = z + fk
        num = _readout(fq, S)
        den = torch.einsum("bhk,bhk->bh", fq, z) + 1e-6
        out.append(num / den[..., None])
    return torch.stack(out, 1), {"S": S, "z": z}


def hand_delta_net(q, k, v, beta, S0=None):
    Bn, T, H, K = q.shape
    S = _zeros_like_state(Bn, H, K, v.shape[-1], like=q) if S0 is None else S0.clone()
    out = []
    for t in range(T):
        u = v[:, t] - _readout(k[:, t], S)  # prediction error
        S = S + beta[:, t, :, None, None] * _outer(k[:, t], u)
        out.append(K ** -0.5 * _readout(q[:, t], S))
    return torch.stack(out, 1), S


def hand_gated_delta_net(q, k, v, g, beta, S0=None):
    Bn, T, H, K = q.shape
    S = _zeros_like_state(Bn, H, K, v.shape[-1], like=q) if S0 is None else S0.clone()
    out = []
    for t in range(T):
        decayed = torch.exp(g[:, t])[..., None, None] * S
        u = v[:, t] - _readout(k[:, t], decayed)
        S = decayed + beta[:, t, :, None, None] * _outer(k[:, t], u)
        out.append(K ** -0.5 * _readout(q[:, t], S))
    return torch.stack(out, 1), S


def hand_mamba2(x, dt, Bm, C, A, D, h0=None):
    """h[N, P]; scalar per-head decay exp(dt * A); params A, D are [H]."""
    Bn, T, H, P = x.shape
    N = Bm.shape[-1]
    h = _zeros_like_state(Bn, H, N, P, like=x) if h0 is None else h0.clone()
    out = []
    for t in range(T):
        decay = torch.exp(dt[:, t] * A[None, :])[..., None, None]
        h = decay * h + dt[:, t, :, None, None] * torch.einsum("bhn,bhp->bhnp", Bm[:, t], x[:, t])
        out.append(torch.einsum("bhn,bhnp->bhp", C[:, t], h) + D[None, :, None] * x[:, t])
    return torch.stack(out, 1), h


def hand_mamba(x, dt, Bm, C, A, Dskip, h0=None):
    """h[D, N]; per-channel, per-state decay exp(dt[d] * A[d, n]); readout over the second axis."""
    Bn, T, H, Dn = x.shape
    N = Bm.shape[-1]
    h = _zeros_like_state(Bn, H, Dn, N, like=x) if h0 is None else h0.clone()
    out = []
    for t in range(T):
        decay = torch.exp(dt[:, t, :, :, None] * A[None])
        h = decay * h + dt[:, t, :, :, None] * torch.einsum("bhn,bhd->bhdn", Bm[:, t], x[:, t])
        out.append(torch.einsum("bhn,bhdn->bhd", C[:, t], h) + Dskip[None] * x[:, t])
    return torch.stack(out, 1), h


def hand_indrnn(x, w, h0=None):
    Bn, T, H, Dn = x.shape
    h = _zeros_like_state(Bn, H, Dn, like=x) if h0 is None else h0.clone()
    out = []
    for t in range(T):
        h = torch.tanh(w[None] * h + x[:, t])
        out.append(h)
    return torch.stack(out, 1), h


def hand_minimal_rnn(x, Uh, Uz, bu, h0=None):
    Bn, T, H, Dn = x.shape
    h = _zeros_like_state(Bn, H, Dn, like=x) if h0 is None else h0.clone()
    out = []
    for t in range(T):
        z = torch.tanh(x[:, t])
        u = torch.sigmoid(torch.einsum("hde,bhe->bhd", Uh, h) + torch.einsum("hde,bhe->bhd", Uz, z) + bu[None])
        h = u * h + (1 - u) * z
        out.append(h)
    return torch.stack(out, 1), h


def hand_based(q, k, v, S0=None):
    """Based (Arora et al. 2024): the paper's states sum phi(k) v^T and sum phi(k) kept as their parts of order 0,
    1, 2; o = phi(x)^T S / phi(x)^T z with phi(x) = [1, x, x (x) x / sqrt(2)] and x = q / sqrt(K)."""
    Bn, T, H, K = q.shape
    V = v.shape[-1]
    names = {"S0": (V,), "S1": (K, V), "S2": (K, K, V), "z0": (), "z1": (K,), "z2": (K, K)}
    st = {n: (S0[n].clone() if S0 is not None else q.new_zeros((Bn, H) + d)) for n, d in names.items()}
    out = []
    for t in range(T):
        kt, vt, x = k[:, t], v[:, t], q[:, t] / math.sqrt(K)
        kk = kt[..., :, None] * kt[..., None, :]
        st["S0"], st["S1"] = st["S0"] + vt, st["S1"] + _outer(kt, vt)
        st["S2"] = st["S2"] + kk[..., None] * vt[..., None, None, :]
        st["z0"], st["z1"], st["z2"] = st["z0"] + 1, st["z1"] + kt, st["z2"] + kk
        xx = x[..., :, None] * x[..., None, :]
        num = st["S0"] + _readout(x, st["S1"]) + torch.einsum("bhxy,bhxyv->bhv", xx, st["S2"]) / 2
        den = st["z0"] + (x * st["z1"]).sum(-1) + (xx * st["z2"]).sum((-2, -1)) / 2
        out.append(num / den[..., None])
    return torch.stack(out, 1), st


HAND_LOOPS = {
    "based": hand_based,
    "linear_attention": hand_linear_attention,
    "gla": hand_gla,
    "retention": hand_retention,
    "lightning_attention": hand_lightning_attention,
    "hgrn2": hand_hgrn2,
    "rwkv6": hand_rwkv6,
    "rwkv7": hand_rwkv7,
    "normalized_linear_attention": hand_normalized_linear_attention,
    "delta_net": hand_delta_net,
    "gated_delta_net": hand_gated_delta_net,
    "mamba2": hand_mamba2,
    "mamba": hand_mamba,
    "indrnn": hand_indrnn,
    "minimal_rnn": hand_minimal_rnn,
}


def _sample(rec, batch=2, length=6, heads=2, seed=0, rows=None, initial=True):
    args, init = sample_arguments(rec.checked, small_sizes(rec), batch, length, heads, dtype=F64, seed=seed,
                                  with_initial_state=initial, rows=rows)
    return args, init


def _assert_same(got, want):
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-10, atol=1e-12)
    else:
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_every_spec_of_the_library_has_a_hand_loop(specs):
    """Here, or written from the paper in the spec's own test file (tests/test_published_specs.py,
    tests/test_delta_product.py, tests/test_mamba3.py)."""
    from . import test_delta_product, test_mamba3, test_published_specs

    elsewhere = set(test_published_specs.RECS) | {test_delta_product.SPEC.name, test_mamba3.REC.name}
    assert callable(test_delta_product._paper_loop) and callable(test_published_specs.loop)
    assert callable(test_mamba3.mamba3_loop)
    assert not set(HAND_LOOPS) & elsewhere
    assert set(HAND_LOOPS) | elsewhere == set(specs)


@pytest.mark.parametrize("name", sorted(HAND_LOOPS))
def test_reference_matches_hand_loop_with_initial_state(specs, name):
    rec = specs[name]
    args, initial = _sample(rec, seed=1)
    out, final = rec.reference(*args, initial_state=initial, output_final_state=True)
    want_out, want_final = HAND_LOOPS[name](*args, initial)
    assert out.dtype == F64
    _assert_same(out, want_out)
    _assert_same(final, want_final)


@pytest.mark.parametrize("name", ["gla", "rwkv6", "normalized_linear_attention", "delta_net", "mamba2", "mamba"])
def test_reference_matches_hand_loop_from_zero_state(specs, name):
    rec = specs[name]
    args, _ = _sample(rec, seed=2, initial=False)
    out, final = rec.reference(*args)
    assert final is None
    want_out, want_final = HAND_LOOPS[name](*args)
    _assert_same(out, want_out)
    out2, final2 = rec.reference(*args, output_final_state=True)
    _assert_same(out2, want_out)
    _assert_same(final2, want_final)


def test_rwkv6_reads_the_state_before_the_update(specs):
    """At t = 0 from a zero state, rwkv6's output is the bonus term alone; gla's already sees k v."""
    rec = specs["rwkv6"]
    (r, k, v, w, u), _ = _sample(rec, length=1, initial=False)
    out, _ = rec.reference(r, k, v, w, u)
    bonus = torch.einsum("bhk,bhk,bhv->bhv", r[:, 0], u[None] * k[:, 0], v[:, 0])
    torch.testing.assert_close(out[:, 0], bonus)


@pytest.mark.parametrize("name", ["gla", "normalized_linear_attention", "mamba2", "rwkv6"])
def test_cu_seqlens_equals_running_the_sequences_one_by_one(specs, name):
    rec = specs[name]
    lengths = [3, 7, 2]
    total = sum(lengths)
    args, initial = _sample(rec, batch=1, length=total, heads=2, seed=4, rows=len(lengths))
    cu = torch.tensor([0, 3, 10, 12], dtype=torch.int32)
    out, final = rec.reference(*args, initial_state=initial, output_final_state=True, cu_seqlens=cu)
    n_inputs = len(rec.checked.inputs)
    pieces, finals = [], []
    for n, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        seq_args = [a[:, lo:hi] for a in args[:n_inputs]] + args[n_inputs:]
        row = {key: s[n:n + 1] for key, s in initial.items()} if isinstance(initial, dict) else initial[n:n + 1]
        o, f = rec.reference(*seq_args, initial_state=row, output_final_state=True)
        want_o, want_f = HAND_LOOPS[name](*seq_args, row)
        _assert_same(o, want_o)
        _assert_same(f, want_f)
        pieces.append(o)
        finals.append(f)
    _assert_same(out, torch.cat(pieces, dim=1))
    if isinstance(final, dict):
        _assert_same(final, {key: torch.cat([f[key] for f in finals]) for key in final})
    else:
        assert final.shape[0] == len(lengths)
        _assert_same(final, torch.cat(finals))


def test_cu_seqlens_does_not_leak_state_between_sequences(specs):
    rec = specs["gla"]
    args, _ = _sample(rec, batch=1, length=8, initial=False)
    packed, final = rec.reference(*args, cu_seqlens=torch.tensor([0, 5, 8]), output_final_state=True)
    alone, _ = rec.reference(*[a[:, 5:] for a in args])
    _assert_same(packed[:, 5:], alone)
    assert final.shape[0] == 2


def test_cu_seqlens_with_an_empty_sequence(specs):
    rec = specs["gla"]
    args, initial = _sample(rec, batch=1, length=6, rows=3)
    out, final = rec.reference(*args, initial_state=initial, output_final_state=True,
                               cu_seqlens=torch.tensor([0, 4, 4, 6]))
    assert out.shape[1] == 6
    _assert_same(final[1], initial[1])  # an empty sequence keeps its initial state


def test_zero_length_sequence(specs):
    rec = specs["gla"]
    args, initial = _sample(rec, length=0)
    out, final = rec.reference(*args, initial_state=initial, output_final_state=True)
    assert out.shape == (2, 0, 2, small_sizes(rec)["V"])
    _assert_same(final, initial)


def test_arguments_by_name_match_by_position(specs):
    rec = specs["mamba2"]
    args, initial = _sample(rec, seed=5)
    names = [s.name for s in rec.checked.inputs + rec.checked.params]
    by_pos = rec.reference(*args, initial_state=initial, output_final_state=True)
    by_name = rec.reference(**dict(reversed(list(zip(names, args, strict=True)))), initial_state=initial,
                            output_final_state=True)
    mixed = rec.reference(*args[:2], **dict(zip(names[2:], args[2:], strict=True)), initial_state=initial,
                          output_final_state=True)
    for got in (by_name, mixed):
        _assert_same(got[0], by_pos[0])
        _assert_same(got[1], by_pos[1])


def test_reference_does_not_modify_its_arguments(specs):
    rec = specs["normalized_linear_attention"]
    args, initial = _sample(rec)
    before = [a.clone() for a in args], {k: v.clone() for k, v in initial.items()}
    rec.reference(*args, initial_state=initial, output_final_state=True)
    for a, b in zip(args, before[0], strict=True):
        assert torch.equal(a, b)
    for key in initial:
        assert torch.equal(initial[key], before[1][key])


def test_reference_in_float32(specs):
    rec = specs["gla"]
    args, initial = _sample(rec)
    want, want_final = rec.reference(*args, initial_state=initial, output_final_state=True)
    out, final = rec.reference(*[a.float() for a in args], initial_state=initial.float(), output_final_state=True,
                               dtype=torch.float32)
    assert out.dtype == torch.float32 and final.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(final.double(), want_final, rtol=1e-4, atol=1e-5)


# -- autograd -----------------------------------------------------------------------------------------------------


def test_gradcheck_through_the_reference(specs):
    rec = specs["gla"]
    args, initial = _sample(rec, batch=1, length=3, heads=1, seed=6)
    leaves = [a.clone().requires_grad_() for a in args] + [initial.clone().requires_grad_()]

    def fn(*xs):
        out, final = rec.reference(*xs[:-1], initial_state=xs[-1], output_final_state=True)
        return out, final

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["rwkv6", "mamba2", "normalized_linear_attention", "delta_net"])
def test_gradients_match_the_hand_loop(specs, name):
    rec = specs[name]
    args, initial = _sample(rec, batch=1, length=4, seed=7)

    def leaves():
        xs = [a.clone().requires_grad_() for a in args]
        if isinstance(initial, dict):
            init = {k: v.clone().requires_grad_() for k, v in initial.items()}
            return xs, init, xs + list(init.values())
        init = initial.clone().requires_grad_()
        return xs, init, xs + [init]

    def loss(out, final):
        finals = final.values() if isinstance(final, dict) else [final]
        return (out * torch.linspace(-1, 1, out.numel(), dtype=F64).reshape(out.shape)).sum() + sum(
            (f ** 2).sum() for f in finals)

    xs, init, all_leaves = leaves()
    got = torch.autograd.grad(loss(*rec.reference(*xs, initial_state=init, output_final_state=True)), all_leaves)
    xs, init, all_leaves = leaves()
    want = torch.autograd.grad(loss(*HAND_LOOPS[name](*xs, init)), all_leaves)
    for g, w in zip(got, want, strict=True):
        assert g is not None
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


# -- expressions: precedence, functions, indexing ---------------------------------------------------------------------

EXPRESSIONS = {
    "x - 2 - 3": lambda x, y: x - 2 - 3,
    "x / 2 / 4": lambda x, y: x / 2 / 4,
    "-x ** 2": lambda x, y: -(x ** 2),
    "2 ** -1 * x": lambda x, y: 0.5 * x,
    "2 ** 3 ** 2 + x": lambda x, y: 512 + x,
    "(x + 1) * (x - 1)": lambda x, y: (x + 1) * (x - 1),
    "x + y * 2": lambda x, y: x + 2 * y,
    "-(-x) + +y": lambda x, y: x + y,
    "x * -2": lambda x, y: -2 * x,
    "1 - -x": lambda x, y: 1 + x,
    "abs(y) ** 0.5": lambda x, y: y.abs().sqrt(),
    "exp(x)": lambda x, y: torch.exp(x),
    "log(abs(x) + 1)": lambda x, y: torch.log(x.abs() + 1),
    "sqrt(abs(x))": lambda x, y: x.abs().sqrt(),
    "abs(x)": lambda x, y: x.abs(),
    "tanh(x)": lambda x, y: torch.tanh(x),
    "sigmoid(x)": lambda x, y: torch.sigmoid(x),
    "logsigmoid(x)": lambda x, y: F.logsigmoid(x),
    "softplus(x)": lambda x, y: F.softplus(x),
    "silu(x)": lambda x, y: x * torch.sigmoid(x),
    "elu(x)": lambda x, y: torch.where(x > 0, x, torch.exp(x) - 1),
    "relu(x)": lambda x, y: x.clamp_min(0),
    "min(x, y)": lambda x, y: torch.minimum(x, y),
    "max(x, 0.25)": lambda x, y: x.clamp_min(0.25),
}


@pytest.mark.parametrize("expr", EXPRESSIONS)
def test_expression_semantics(expr):
    rec = recurrence_dsl.load_text(f"recurrence f(x, y) -> o {{\n    o = {expr}\n}}\n")["f"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, generator=gen, dtype=F64)
    y = torch.randn(2, 5, 3, generator=gen, dtype=F64)
    out, _ = rec.reference(x, y)
    torch.testing.assert_close(out, EXPRESSIONS[expr](x, y), rtol=1e-12, atol=1e-12)


def _run(text, *args, **kwargs):
    (rec,) = recurrence_dsl.load_text(text).values()
    return rec.reference(*args, **kwargs)


def test_broadcast_transpose_and_sums():
    text = """recurrence f(A[M, N], x[M]) -> t[N, M], b[M, N], s, r[M] {
    t[j, i] = A[i, j]
    b[i, j] = x[i]
    s = sum(i, j, A[i, j] * x[i])
    r[i] = sum(j, A[i, j]) * sum(k, x[k])
}
"""
    A = torch.randn(2, 3, 2, 4, 5, dtype=F64)
    x = torch.randn(2, 3, 2, 4, dtype=F64)
    (t, b, s, r), final = _run(text, A, x)
    assert final is None
    torch.testing.assert_close(t, A.transpose(-1, -2))
    torch.testing.assert_close(b, x[..., None].expand(2, 3, 2, 4, 5))
    torch.testing.assert_close(s, torch.einsum("bthij,bthi->bth", A, x))
    torch.testing.assert_close(r, A.sum(-1) * x.sum(-1, keepdim=True))


def test_repeated_index_reads_the_diagonal():
    text = "recurrence f(A[D, D]) -> d[D], tr {\n    d[i] = A[i, i]\n    tr = sum(i, A[i, i])\n}\n"
    A = torch.randn(1, 2, 1, 3, 3, dtype=F64)
    (d, tr), _ = _run(text, A)
    torch.testing.assert_close(d, torch.diagonal(A, dim1=-2, dim2=-1))
    torch.testing.assert_close(tr, torch.diagonal(A, dim1=-2, dim2=-1).sum(-1))


def test_several_outputs_and_states_in_declared_order():
    text = """recurrence f(x[D]) -> y[D], n {
    state c, h[D]
    c = c + 1
    h[d] = h[d] + x[d]
    n = c
    y[d] = h[d] / c
}
"""
    x = torch.randn(2, 4, 3, 5, dtype=F64)
    init = {"c": torch.zeros(2, 3, dtype=F64), "h": torch.zeros(2, 3, 5, dtype=F64)}
    (y, n), final = _run(text, x, initial_state=init, output_final_state=True)
    steps = torch.arange(1, 5, dtype=F64)
    torch.testing.assert_close(n, steps[None, :, None].expand(2, 4, 3))
    torch.testing.assert_close(y, x.cumsum(1) / steps[None, :, None, None])
    assert list(final) == ["c", "h"]
    torch.testing.assert_close(final["c"], torch.full((2, 3), 4.0, dtype=F64))
    torch.testing.assert_close(final["h"], x.sum(1))


def test_temporary_reassigned_and_state_never_assigned():
    text = """recurrence f(x[D]) -> y[D] {
    state m[D]
    t[d] = x[d] + m[d]
    t[d] = 2 * t[d]
    y[d] = t[d]
}
"""
    x = torch.randn(1, 3, 2, 4, dtype=F64)
    m = torch.randn(1, 2, 4, dtype=F64)
    y, final = _run(text, x, initial_state=m, output_final_state=True)
    torch.testing.assert_close(y, 2 * (x + m[:, None]))
    torch.testing.assert_close(final, m)


def test_size_names_are_numbers_at_call_time():
    x = torch.randn(1, 2, 1, 6, dtype=F64)
    y, _ = _run("recurrence f(x[D]) -> y[D] {\n    y[d] = D * x[d] + D ** -0.5\n}\n", x)
    torch.testing.assert_close(y, 6 * x + 6 ** -0.5)


def test_state_only_size_is_fixed_by_the_initial_state():
    text = "recurrence f(x) -> y {\n    state h[M]\n    h[m] = h[m] + x\n    y = sum(m, h[m])\n}\n"
    x = torch.randn(1, 3, 2, dtype=F64)
    h0 = torch.randn(1, 2, 4, dtype=F64)
    y, final = _run(text, x, initial_state=h0, output_final_state=True)
    torch.testing.assert_close(final, h0 + x.sum(1)[..., None])
    torch.testing.assert_close(y, h0.sum(-1)[:, None] + 4 * x.cumsum(1))
    with pytest.raises(recurrence_dsl.CallError, match="size M"):
        _run(text, x)
