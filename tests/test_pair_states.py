"""3-axis states chunked with a pair of axes flattened, and Based (specs/based.rec).

A state S[X, Y, V] updated by `S[a, b, j] = d_t * S[a, b, j] + k(a, b) * v(j)` and read as
`sum(a, b, q(a, b) * S[a, b, j])` is the matrix state S[X * Y, V] of linear attention with k[p] = k(a, b) and
q[p] = q(a, b), p = a * Y + b (recurrence_dsl/analysis.py, `_plan_pair_chunks`): the chunked and parallel forms
build k and q over the pair per step and run the existing chunked machinery, torch and Triton, forward and
backward (autograd through the flatten into the runtimes' own backward).

Based (Arora et al. 2024) is the example that needs it: its second-order Taylor term
`S2[a, b, j] = S2[a, b, j] + k[a] * k[b] * v[j]`. `based_loop` below is the paper's recurrence written by hand
(phi(x) = [1, x, vec(x (x) x) / sqrt(2)], S_t = S_(t-1) + phi(k_t) v_t^T, z_t = z_(t-1) + phi(k_t),
o_t = phi(x_t)^T S_t / phi(x_t)^T z_t with x_t = q_t / sqrt(K)); every form on both backends (Triton in the
interpreter) is compared with it: float64 torch forms to 1e-9 and float32 to 1e-4 (relative error), Triton
float32 to 1e-4, with initial and final states, under cu_seqlens, and gradients (float64 torch chunked 1e-9,
float32 Triton 1e-4). tests/data/pair_states.rec covers pairs of two sizes, scalar / pair / value decays, a
readout before the update and one summed over the value axis too; tests/data/pair_refused.rec the 3-axis states
that do not flatten, each refused with a reason at its statement's line:col.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import recurrence_dsl
from recurrence_dsl.analysis import analyse
from recurrence_dsl.cli import describe
from recurrence_dsl.cli import main as recdsl_main
from recurrence_dsl.prove import prove
from recurrence_dsl.sampling import sample_arguments

from .conftest import REPO, as_dict
from .test_forms import flatten

F64, F32 = torch.float64, torch.float32
TOL = {F64: 1e-9, F32: 1e-4}
DATA = Path(__file__).parent / "data"
BASED = recurrence_dsl.load(REPO / "specs" / "based.rec")["based"]
PAIRS = recurrence_dsl.load(DATA / "pair_states.rec")
REFUSED = recurrence_dsl.load(DATA / "pair_refused.rec")
ALL_FORMS = ["recurrent", "scan", "chunked", "parallel"]


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


# ---------------------------------------------------------------------------------------------------------
# Based, by hand from the paper
# ---------------------------------------------------------------------------------------------------------

def phi(x: torch.Tensor) -> torch.Tensor:
    """Based's second-order Taylor feature map [..., K] -> [..., 1 + K + K * K]: phi(x)^T phi(y) = 1 + x.y +
    (x.y)^2 / 2 (Arora et al. 2024, Sec. 4)."""
    second = (x[..., :, None] * x[..., None, :]).flatten(-2) / math.sqrt(2)
    return torch.cat([torch.ones_like(x[..., :1]), x, second], dim=-1)


def to_features(states: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec's states (S0, S1, S2, z0, z1, z2) as the paper's S = sum phi(k) v^T [B, H, F, V], z = sum phi(k)."""
    s2, z2 = states["S2"].flatten(-3, -2), states["z2"].flatten(-2)
    S = torch.cat([states["S0"][..., None, :], states["S1"], s2 / math.sqrt(2)], dim=-2)
    z = torch.cat([states["z0"][..., None], states["z1"], z2 / math.sqrt(2)], dim=-1)
    return S, z


def from_features(S: torch.Tensor, z: torch.Tensor, K: int) -> dict:
    return {"S0": S[..., 0, :], "S1": S[..., 1:K + 1, :], "S2": S[..., K + 1:, :].unflatten(-2, (K, K)) * math.sqrt(2),
            "z0": z[..., 0], "z1": z[..., 1:K + 1], "z2": z[..., K + 1:].unflatten(-1, (K, K)) * math.sqrt(2)}


def based_loop(q, k, v, initial: dict) -> tuple[torch.Tensor, dict]:
    """The paper's recurrence step by step: q, k [B, T, H, K], v [B, T, H, V] -> o [B, T, H, V], final states."""
    K = q.shape[-1]
    S, z = to_features(initial)
    outs = []
    for t in range(q.shape[1]):
        fk, fq = phi(k[:, t]), phi(q[:, t] / math.sqrt(K))  # [B, H, F]
        S = S + fk[..., :, None] * v[:, t][..., None, :]
        z = z + fk
        outs.append((fq[..., None, :] @ S)[..., 0, :] / (fq * z).sum(-1, keepdim=True))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape)
    return o, from_features(S, z, K)


def based_inputs(B: int, T: int, H: int = 2, K: int = 4, V: int = 3, seed: int = 0, rows: int | None = None):
    """q, k, v (float32-exact float64) and initial states, those from a random prefix of 6 steps (so the
    normaliser phi(x)^T z stays positive, as it does in a real sequence)."""
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).to(F32).to(F64)

    q, k, v = draw(B, T, H, K), draw(B, T, H, K), draw(B, T, H, V)
    rows = B if rows is None else rows
    zero = {"S0": torch.zeros(rows, H, V, dtype=F64), "S1": torch.zeros(rows, H, K, V, dtype=F64),
            "S2": torch.zeros(rows, H, K, K, V, dtype=F64), "z0": torch.zeros(rows, H, dtype=F64),
            "z1": torch.zeros(rows, H, K, dtype=F64), "z2": torch.zeros(rows, H, K, K, dtype=F64)}
    _, initial = based_loop(draw(rows, 6, H, K), draw(rows, 6, H, K), draw(rows, 6, H, V), zero)
    return [q, k, v], {n: s.to(F32).to(F64) for n, s in initial.items()}


def test_the_loop_is_the_taylor_attention_of_the_paper():
    """From zero states, based_loop equals the parallel form sum_s (1 + a + a^2 / 2) v_s / sum_s (1 + a + a^2 / 2),
    a = q_t . k_s / sqrt(K): the second-order Taylor expansion of exp in softmax attention."""
    (q, k, v), initial = based_inputs(2, 9)
    zero = {n: torch.zeros_like(s) for n, s in initial.items()}
    o, _ = based_loop(q, k, v, zero)
    a = torch.einsum("bthk,bshk->bhts", q, k) / math.sqrt(q.shape[-1])
    w = (1 + a + a * a / 2).tril()
    want = torch.einsum("bhts,bshv->bthv", w, v) / w.sum(-1).transpose(1, 2)[..., None]
    assert rel(o, want) < 1e-12


def test_based_is_chunked_with_its_pair_flattened():
    analysis = analyse(BASED.checked)
    assert list(analysis.forms) == ALL_FORMS and not analysis.unavailable
    view = analysis.chunk_analysis
    assert view.states["S2"].chunk.pair and not view.states["S1"].chunk.pair
    assert analysis.lifted == {"S0": "row", "z0": "scalar"}  # the 0- and 1-axis parts: a key axis of size 1
    assert [s["chunked_with_flattened_axes"] for s in describe(BASED)["states"]] == [[], [], [0, 1], [], [], []]


def _call(layer, args, initial, dtype, **kw):
    out, final = layer(*[a.to(dtype) for a in args], initial_state={n: s.to(dtype) for n, s in initial.items()},
                       output_final_state=True, **kw)
    return out, final


def test_based_every_form_equals_the_hand_written_loop():
    """Every torch form (float64, float32) at T = 5 and 19 and Triton form (float32) at T = 19: output and every
    final state, from initial states, against based_loop; the reference interpreter agrees with the loop too."""
    failures = []
    torch_layer = recurrence_dsl.compile(BASED, backend="torch", chunk_size=8, tuning=False)
    triton_layer = recurrence_dsl.compile(BASED, backend="triton", chunk_size=16, tuning=False)
    assert list(torch_layer.forms) == ALL_FORMS and list(triton_layer.triton_forms) == ALL_FORMS
    for T in (5, 19):
        args, initial = based_inputs(2, T, seed=T)
        o_want, final_want = based_loop(*args, initial)
        o_ref, final_ref = BASED.reference(*args, initial_state=initial, output_final_state=True)
        assert rel(o_ref, o_want) < 1e-12 and all(rel(final_ref[n], final_want[n]) < 1e-12 for n in final_want)
        cases = [(torch_layer, form, dtype) for form in torch_layer.forms for dtype in (F64, F32)]
        cases += [(triton_layer, form, F32) for form in triton_layer.triton_forms if T == 19]
        for layer, form, dtype in cases:
            o, final = _call(layer, args, initial, dtype, form=form)
            errors = {"o": rel(o, o_want), **{n: rel(final[n], final_want[n]) for n in final_want}}
            if o.dtype != dtype or max(errors.values()) > TOL[dtype]:
                failures.append((layer is triton_layer, form, dtype, T, o.dtype, errors))
    assert not failures, failures


def test_based_packed_sequences_and_gradients():
    """cu_seqlens (lengths 3, 0, 7, 9), each sequence from its own initial state: outputs, final states and the
    gradients of a weighted loss (inputs and initial states) of the torch chunked and parallel forms and the
    Triton recurrent form, and the Triton chunked form's outputs and final states, against based_loop run per
    sequence under autograd. (The Triton chunked backward of a flattened state: test_pair_states_on_every_form_
    and_backend, one state rather than Based's six, as the interpreter runs each kernel program by program.)"""
    bounds = [0, 3, 3, 10, 19]
    args, initial = based_inputs(1, bounds[-1], seed=7, rows=len(bounds) - 1)
    gen = torch.Generator().manual_seed(8)
    w_out = torch.randn(args[2].shape, generator=gen, dtype=F64)
    w_final = {n: torch.randn(s.shape, generator=gen, dtype=F64) for n, s in initial.items()}

    def loss(out, final):
        return (out * w_out).sum() + sum((final[n] * w_final[n]).sum() for n in w_final)

    def grads(run, dtype, backward=True):
        leaves = [a.detach().clone().to(dtype).requires_grad_(backward) for a in args]
        init = {n: s.detach().clone().to(dtype).requires_grad_(backward) for n, s in initial.items()}
        out, final = run(leaves, init)
        if not backward:
            return out, final, []
        loss(out.double(), {n: f.double() for n, f in final.items()}).backward()
        return out, final, [x.grad for x in leaves] + [init[n].grad for n in initial]

    def loop(leaves, init):
        outs, finals = [], []
        for i in range(len(bounds) - 1):
            lo, hi = bounds[i], bounds[i + 1]
            o, f = based_loop(*[x[:, lo:hi] for x in leaves], {n: s[i:i + 1] for n, s in init.items()})
            outs.append(o)
            finals.append(f)
        return torch.cat(outs, dim=1), {n: torch.cat([f[n] for f in finals]) for n in init}

    o_want, final_want, g_want = grads(loop, F64)
    cu = torch.tensor(bounds)
    torch_layer = recurrence_dsl.compile(BASED, backend="torch", chunk_size=4, tuning=False)
    triton_layer = recurrence_dsl.compile(BASED, backend="triton", chunk_size=16, tuning=False)
    failures = []
    for layer, form, dtype in ((torch_layer, "chunked", F64), (torch_layer, "parallel", F64),
                               (torch_layer, "chunked", F32), (triton_layer, "chunked", F32),
                               (triton_layer, "recurrent", F32)):
        with_grads = not (layer is triton_layer and form == "chunked")
        o, final, g = grads(lambda xs, init, layer=layer, form=form: layer(
            *xs, initial_state=init, output_final_state=True, cu_seqlens=cu, form=form), dtype, with_grads)
        errors = [rel(o, o_want)] + [rel(final[n], final_want[n]) for n in final_want]
        errors += [rel(x, y) for x, y in zip(g, g_want)]
        if max(errors) > TOL[dtype]:
            failures.append((layer is triton_layer, form, dtype, [f"{e:.1e}" for e in errors]))
    assert not failures, failures


# ---------------------------------------------------------------------------------------------------------
# other 3-axis states that flatten, and those that do not
# ---------------------------------------------------------------------------------------------------------

SIZES = {"K": 3, "D": 2, "V": 4}


def _sample(rec, T: int, batch: int = 2, seed: int = 0):
    args, initial = sample_arguments(rec.checked, SIZES, batch, T, 2, dtype=F64, seed=seed, with_initial_state=True)
    args = [a.to(F32).to(F64) for a in args]  # float32-exact, so one float64 reference serves both dtypes
    initial = {n: s.to(F32).to(F64) for n, s in as_dict(initial, rec.checked.states).items()}
    return args, initial if len(initial) > 1 else next(iter(initial.values()))


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_pair_states_on_every_form_and_backend(name):
    """Forward on every form (torch float64 / float32 at T = 5 and 19, Triton float32 at T = 19), the algebraic
    proof, and gradients of the chunked forms (torch float64; Triton float32 for the decay over the pair, whose
    log decay is flattened too) against the reference's autograd."""
    rec = PAIRS[name]
    analysis = analyse(rec.checked)
    assert list(analysis.forms) == ALL_FORMS and analysis.chunk_analysis.states["S"].chunk.pair
    assert all(r.proved for r in prove(analysis)), [r for r in prove(analysis) if not r.proved]
    torch_layer = recurrence_dsl.compile(rec, backend="torch", chunk_size=8, tuning=False)
    triton_layer = recurrence_dsl.compile(rec, backend="triton", chunk_size=16, tuning=False)
    assert list(triton_layer.triton_forms) == ALL_FORMS
    failures = []
    for T in (5, 19):
        args, initial = _sample(rec, T, seed=T)
        out, final = rec.reference(*args, initial_state=initial, output_final_state=True)
        want = flatten(rec, out, final)
        cases = [(torch_layer, form, dtype) for form in ALL_FORMS for dtype in (F64, F32)]
        cases += [(triton_layer, form, F32) for form in triton_layer.triton_forms if T == 19]
        for layer, form, dtype in cases:
            init = {n: s.to(dtype) for n, s in as_dict(initial, rec.checked.states).items()}
            got = flatten(rec, *layer(*[a.to(dtype) for a in args], initial_state=init["S"],
                                      output_final_state=True, form=form))
            errors = {key: rel(got[key], value) for key, value in want.items()}
            if max(errors.values()) > TOL[dtype]:
                failures.append((layer is triton_layer, form, dtype, T, errors))
    args, initial = _sample(rec, 11, seed=3)
    out, final = rec.reference(*args, initial_state=initial, output_final_state=True)
    gen = torch.Generator().manual_seed(4)
    weights = {k: torch.randn(v.shape, generator=gen, dtype=F64) for k, v in flatten(rec, out, final).items()}

    def grads(run, dtype):
        leaves = [a.detach().clone().to(dtype).requires_grad_() for a in args]
        init = initial.detach().clone().to(dtype).requires_grad_()
        got = flatten(rec, *run(*leaves, initial_state=init, output_final_state=True))
        sum((got[k].double() * w).sum() for k, w in weights.items()).backward()
        return [x.grad for x in leaves] + [init.grad]

    want = grads(rec.reference, F64)
    for layer, dtype in ((torch_layer, F64), (triton_layer, F32))[: 2 if name == "pair_key_decay" else 1]:
        errors = [rel(g, w) for g, w in zip(grads(lambda *a, layer=layer, **k: layer(*a, form="chunked", **k),
                                                  dtype), want)]
        if max(errors) > TOL[dtype]:
            failures.append((layer is triton_layer, "chunked backward", dtype, errors))
    assert not failures, failures


REFUSALS = {
    "coupled_injection": "at 7:5: the injection k[a]*x[b, j] of S is not an outer product k[a, b] * v[j] of the "
                         "pair (a, b) and j",
    "unsummed_pair": "at 15:5: output o reads S[a, b, j] other than summed over its first two axes",
    "mixed_decay": "at 21:5: the decay exp(f[j]*g[a]) of S varies along the pair (a, b) and along j",
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_a_3_axis_state_that_does_not_factor_says_why_where(name):
    analysis = analyse(REFUSED[name].checked)
    assert list(analysis.forms) == ["recurrent", "scan"]
    assert REFUSALS[name] in analysis.unavailable["chunked"], analysis.unavailable["chunked"]


def test_show_and_prove_say_what_was_flattened(capsys):
    assert recdsl_main(["show", str(REPO / "specs" / "based.rec")]) == 0
    shown = capsys.readouterr().out
    assert ("chunked as S2[(a, b), j]: its first two axes flattened into one key axis of size K * K "
            "(p = a * K + b)") in shown
    assert "= sum_(a, b) (q[a]*q[b]) * S2_t[a, b, j]" in shown
    code = recdsl_main(["check", str(DATA / "pair_states.rec"), "--name", "pair_scalar", "--prove",
                        "--shape", "B=1,T=6,H=1,K=3,D=2,V=2"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "(chunked, parallel: S[K, D, V] held as [K * D, V], its first two axes flattened into one key" in printed
    assert "chunked   final S      8 elements  equal (exact)" in printed


def test_a_flattened_state_runs_reverse():
    """reverse=True through the flattened chunked form (torch float64, Triton float32) against the reference."""
    rec = PAIRS["pair_scalar"]
    args, initial = _sample(rec, 13, seed=9)
    out, final = rec.reference(*args, initial_state=initial, output_final_state=True, reverse=True)
    for backend, dtype in (("torch", F64), ("triton", F32)):
        layer = recurrence_dsl.compile(rec, backend=backend, chunk_size=8 if backend == "torch" else 16, tuning=False)
        o, f = layer(*[a.to(dtype) for a in args], initial_state=initial.to(dtype), output_final_state=True,
                     reverse=True, form="chunked")
        assert max(rel(o, out), rel(f, final)) <= TOL[dtype], (backend, rel(o, out), rel(f, final))
