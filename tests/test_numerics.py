"""No silent wrong answer (issue 8): every form of both backends against the float64 reference, on hard inputs.

Property tests (hypothesis), one per (spec, backend, form), for every spec of specs/: float32 inputs (Triton in
its CPU interpreter), the reference run in float64 on the same values. Each example draws

- a shape: B, H in {1, 2}, T in 1..70, every size 16, chunk_size in {16, 32, 64} (chunks, partial chunks and
  sub-chunks all occur, and steps at chunk starts and ends are drawn often);
- log decays (see DECAYS for what the decay of each spec is): a base over the whole sequence, ordinary
  (U(-1, 0), U(-0.1, 0)) or extreme (0, -100, -1e4, -inf), plus up to four events setting one step, or one
  (b, h, channel) of a step, to -inf, -1e4, -100, 0 or U(-0.1, 0); in some examples a growing step (+0.5);
- up to two non-finite values (nan, +inf, -inf) at a random (b, step, h, channel) of a random input.

and asserts, for every output and final state:

(a) causality: before the first step holding a non-finite input, every output is finite and agrees with the
    reference (rel err <= TOL, measured on those steps alone);
(b) the non-finite pattern: an entry is non-finite iff the reference's is (NaN and +-inf may differ);
(c) the finite entries agree with the reference: ||x - ref|| <= TOL * max(||ref||, FLOOR) over them.

Named tests then pin the inputs of the issue one by one. Hypothesis runs derandomized with a fixed seed per
(spec, backend, form) and no shrinking (a Triton call takes up to a second in the interpreter); set
RECDSL_SHRINK=1 to shrink a failure to a minimal example, RECDSL_EXAMPLES_SCALE=k for k times the examples.
tests/test_numerics_gpu.py runs the same property on CUDA in float32, float16 and bfloat16.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, seed, settings
from hypothesis import strategies as st

import recurrence_dsl
from codegen.triton_recurrent import triton_form_names
from recurrence_dsl.analysis import analyse
from recurrence_dsl.sampling import _Roles, sample_arguments

from .conftest import SPEC_FILES, as_dict, weighted_gradients

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
TOL = {F32: 1e-5, F16: 5e-3, BF16: 2e-2}
FLOOR = 1e-3  # the absolute scale below which errors are measured absolutely (a reference norm near 0)
SIZE = 16  # every size axis: the Triton kernels need powers of two >= 16

RECS: dict[str, recurrence_dsl.Recurrence] = {}
for _path in SPEC_FILES:
    RECS.update(recurrence_dsl.load(_path))


@dataclass(frozen=True)
class Decay:
    """How a spec's decay is drawn from a target log decay L (<= 0, or > 0 for a growing step).

    kind "log":   the input `name` is the log decay (the decay is exp(name)): name = L.
    kind "dt":    the decay is exp(dt * A) with dt >= 0 an input and A < 0 a param: dt = -L (1e4 for -inf),
                  and the input `scaled` (multiplied by dt in the update) is divided by max(dt, 1) so a large
                  dt does not also blow the input up; L = 0 gives dt = 0, a decay of exactly 1.
    kind "rate":  a constant decay exp(-param): param = -L of the base, per head (no per-step events).
    kind "gamma": a constant decay param: param = exp(L) of the base, per head; 0 for -inf and -1e4, which the
                  chunked forms (which take its logarithm) refuse with DecayNotPositive.
    """

    kind: str
    name: str
    scaled: str | None = None


DECAYS = {
    "gla": Decay("log", "g"),  # exp(g[i])
    "gated_delta_net": Decay("log", "g"),  # exp(g), a scalar per step
    "hgrn2": Decay("log", "f"),  # exp(f[i]), with (1 - exp(f[i])) the input gate
    "rwkv6": Decay("log", "w"),  # exp(w[i])
    "rwkv7": Decay("log", "w"),  # exp(w[i]) on the diagonal, plus the rank-one removal
    "mamba": Decay("dt", "dt", "x"),  # exp(dt[d] * A[d, n]), input dt[d] * B[n] * x[d]
    "mamba2": Decay("dt", "dt", "x"),  # exp(dt * A), input dt * B[n] * x[p]
    # exp(A * dt) with A < 0 an input per step (drawn as sample_arguments draws it), input dt * (...) * x[p] and
    # dt * (...) * x_last[p], the last step's x
    "mamba3": Decay("dt", "dt", "x"),
    "lightning_attention": Decay("rate", "slope"),  # exp(-slope), a per-head constant
    "retention": Decay("gamma", "gamma"),  # gamma, a per-head constant
    "bidirectional_mamba_forward": Decay("dt", "dt", "x"),  # Mamba's S6 step, one pass each way
    "bidirectional_mamba_backward": Decay("dt", "dt", "x"),
}
# Specs with no decay to draw: delta_net, linear_attention and normalized_linear_attention (identity
# transitions), indrnn and minimal_rnn (non-linear: tanh / a sigmoid gate of the state). mlstm, min_gru and rg_lru
# decay through a function of their gate (exp(logsigmoid(fg)), exp(logsigmoid(-z)), exp(-8 sigmoid(gr) ...)) that no
# input sets to a chosen log decay: their gates are drawn as sample_arguments draws them, non-finite values included.

# Inputs inside an exp(...) that scale the update, not the state: drawn as sample_arguments draws them (negative).
NOT_DECAYS = {"mlstm": {"ig"}}  # exp(ig), the mLSTM's exponential input gate

LOG_VALUES = {"neginf": -math.inf, "neg1e4": -1e4, "neg100": -100.0, "zero": 0.0}


# ---------------------------------------------------------------------------------------------------------------
# One drawn example
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    B: int
    H: int
    T: int
    chunk: int
    seed: int
    base: str  # "u1", "u01", or a key of LOG_VALUES: the log decay of every step
    events: tuple = ()  # (step, kind, whole step?, position): a log decay set at one step
    growth: int | None = None  # a step whose log decay is +0.5 (a growing state)
    nonfinite: tuple = ()  # (input index, step, position, value)


STEPS = st.one_of(st.integers(0, 69), st.sampled_from([0, 1, 15, 16, 17, 31, 32, 33, 47, 48, 63, 64, 69]))
EVENT = st.tuples(STEPS, st.sampled_from(["neginf", "neg1e4", "neg100", "zero", "u01"]), st.booleans(),
                  st.integers(0, 255))
NONFINITE = st.tuples(st.integers(0, 7), STEPS, st.integers(0, 255), st.sampled_from([math.nan, math.inf, -math.inf]))
CASES = st.builds(
    Case,
    B=st.integers(1, 2), H=st.integers(1, 2), T=st.integers(1, 70), chunk=st.sampled_from([16, 32, 64]),
    seed=st.integers(0, 2**16),
    base=st.sampled_from(["u1", "u01", "u1", "u01", "zero", "neg100", "neg1e4", "neginf"]),
    events=st.lists(EVENT, max_size=4).map(tuple),
    growth=st.tuples(st.integers(0, 3), STEPS).map(lambda x: x[1] if x[0] == 3 else None),
    nonfinite=st.lists(NONFINITE, max_size=2).map(tuple),
)
# Run first for every (spec, backend, form): resets at chunk starts and ends, a whole -inf step, an exact 1 and
# NaNs (inputs 2 and 1: v and k for most specs) after them; then a growing step with a partial last chunk;
# then resets everywhere.
HARD = Case(B=2, H=2, T=70, chunk=16, seed=1, base="u1",
            events=((0, "neginf", True, 0), (16, "neg1e4", True, 0), (31, "neginf", False, 37),
                    (47, "zero", True, 0), (48, "neg100", False, 5), (63, "neginf", True, 0)),
            nonfinite=((2, 50, 11, math.nan), (1, 58, 3, math.nan)))
GROWING = Case(B=1, H=2, T=45, chunk=32, seed=2, base="u01", events=((31, "neginf", True, 0),), growth=20)
# A reset at every step but a few (for a constant decay: slope = inf, gamma = 0, dt = 1e4), an inf in q.
RESETS = Case(B=1, H=2, T=40, chunk=16, seed=3, base="neginf",
              events=((5, "u01", True, 0), (16, "zero", True, 0), (17, "neg100", False, 9)),
              nonfinite=((0, 33, 6, math.inf),))


def _u(gen, shape, lo, hi):
    return lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=F64)


def _log_decays(case: Case, shape: tuple, gen: torch.Generator, per_step: bool = True) -> torch.Tensor:
    """Target log decays of `shape` ([B, T, H, ...], or [H] for a per-head constant)."""
    if case.base == "u1":
        L = -_u(gen, shape, 0, 1)
    elif case.base == "u01":
        L = -_u(gen, shape, 0, 0.1)
    else:
        L = torch.full(shape, LOG_VALUES[case.base], dtype=F64)
    if not per_step:
        return L
    B, T, H = shape[:3]
    rest = shape[3:]
    for step, kind, whole, pos in case.events:
        value = -_u(gen, (), 0, 0.1).item() if kind == "u01" else LOG_VALUES[kind]
        t = step % T
        if whole:
            L[:, t] = value
        else:
            L[(pos % B, t, (pos // 2) % H) + tuple((pos // 4) % r for r in rest)] = value
    if case.growth is not None:
        L[:, case.growth % T] = 0.5
    return L


def draw_arguments(name: str, case: Case, dtype: torch.dtype = F32, device: str = "cpu"):
    """(args, initial state, reference args, reference initial state, first unsafe step) of one example.

    args in `dtype` on `device` (the initial state in float32), the reference's the same values in float64 on
    the CPU; the first unsafe step is the first holding a non-finite input (T when none does), counted in the
    recurrence's direction: for a reverse recurrence, from the last step (step T - 1 is its first)."""
    rec = RECS[name]
    checked = rec.checked
    args, initial = sample_arguments(checked, {s: SIZE for s in checked.sizes}, case.B, case.T, case.H, dtype=F64,
                                     seed=case.seed, with_initial_state=True)
    names = [s.name for s in checked.inputs] + [s.name for s in checked.params]
    values = dict(zip(names, args))
    gen = torch.Generator().manual_seed(case.seed + 1)
    decay = DECAYS.get(name)
    if decay is not None and decay.kind == "log":
        values[decay.name] = _log_decays(case, tuple(values[decay.name].shape), gen)
    elif decay is not None and decay.kind == "dt":
        L = _log_decays(case, tuple(values[decay.name].shape), gen)
        dt = torch.where(torch.isinf(L), torch.full_like(L, 1e4), -L)
        values[decay.name] = dt
        x = values[decay.scaled]
        values[decay.scaled] = x / dt.clamp_min(1.0).reshape(dt.shape + (1,) * (x.dim() - dt.dim()))
    elif decay is not None and decay.kind == "rate":
        values[decay.name] = -_log_decays(case, tuple(values[decay.name].shape), gen, per_step=False)
    elif decay is not None and decay.kind == "gamma":
        values[decay.name] = _log_decays(case, tuple(values[decay.name].shape), gen, per_step=False).exp()
    first_unsafe = case.T
    inputs = [s.name for s in checked.inputs]
    for index, step, pos, value in case.nonfinite:
        target = inputs[index % len(inputs)]
        x = values[target]
        B, T, H = x.shape[:3]
        t = step % T
        x[(pos % B, t, (pos // 2) % H) + tuple((pos // 4) % r for r in x.shape[3:])] = value
        reset = decay is not None and decay.kind == "log" and target == decay.name and value == -math.inf
        if not reset:  # a log decay of -inf is a reset, not a non-finite value
            first_unsafe = min(first_unsafe, T - 1 - t if checked.reverse else t)
    args = [values[n].to(device=device, dtype=dtype) for n in names]
    if isinstance(initial, dict):
        initial = {k: v.to(device=device, dtype=F32) for k, v in initial.items()}
        ref_initial = {k: v.double().cpu() for k, v in initial.items()}
    else:
        initial = initial.to(device=device, dtype=F32)
        ref_initial = initial.double().cpu()
    return args, initial, [a.double().cpu() for a in args], ref_initial, first_unsafe


# ---------------------------------------------------------------------------------------------------------------
# Comparing with the reference
# ---------------------------------------------------------------------------------------------------------------


def _where(mask: torch.Tensor, limit: int = 4) -> list:
    return [tuple(i) for i in mask.nonzero().tolist()[:limit]]


def assert_agrees(what: str, got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """(b) non-finite exactly where the reference is, (c) the finite entries within tol."""
    got = got.detach().double().cpu()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)}, reference {tuple(ref.shape)}"
    finite = torch.isfinite(ref)
    differ = torch.isfinite(got) != finite
    assert not differ.any(), (
        f"{what}: finite/non-finite differs from the reference at {int(differ.sum())} of {ref.numel()} entries, "
        f"first {_where(differ)}: got {got[differ][:4].tolist()}, reference {ref[differ][:4].tolist()} "
        f"({int((~finite).sum())} non-finite in the reference)")
    if finite.any():
        diff = (got[finite] - ref[finite]).norm().item()
        scale = max(ref[finite].norm().item(), FLOOR)
        worst = (got - ref).abs().nan_to_num(0.0).amax().item()
        assert diff <= tol * scale, (f"{what}: rel err {diff / scale:.3g} > {tol:g} (reference norm {scale:.3g}, "
                                     f"largest abs diff {worst:.3g})")


def assert_causal(what: str, got: torch.Tensor, ref: torch.Tensor, first_unsafe: int, tol: float) -> None:
    """(a) outputs [B, T, ...] before step `first_unsafe` are finite and agree with the reference's."""
    if first_unsafe == 0:
        return
    head, ref_head = got.detach().double().cpu()[:, :first_unsafe], ref[:, :first_unsafe]
    assert torch.isfinite(ref_head).all(), f"{what}: the reference is not finite before step {first_unsafe}"
    bad = ~torch.isfinite(head)
    assert not bad.any(), (f"{what}: {int(bad.sum())} non-finite outputs before the first non-finite input "
                           f"(step {first_unsafe}), first {_where(bad)}")
    assert_agrees(f"{what} before step {first_unsafe}", head, ref_head, tol)


def is_decay_not_positive(err: BaseException) -> bool:
    # (a generated module's dispatch.py takes recurrence_dsl's class where recurrence_dsl is installed)
    return isinstance(err, recurrence_dsl.DecayNotPositive)


LAYERS: dict[str, object] = {}


def layer_for(name: str):
    if name not in LAYERS:
        LAYERS[name] = recurrence_dsl.compile(RECS[name], tuning=False)
    return LAYERS[name]


def check_case(name: str, backend: str, form: str, case: Case, dtype: torch.dtype = F32, device: str = "cpu"):
    """Run one example through `form` on `backend` and assert (a), (b) and (c) for outputs and final states."""
    rec = RECS[name]
    args, initial, ref_args, ref_initial, first_unsafe = draw_arguments(name, case, dtype, device)
    ref_out, ref_final = rec.reference(*ref_args, initial_state=ref_initial, output_final_state=True)
    layer = layer_for(name)
    decay = DECAYS.get(name)
    refuses = (decay is not None and decay.kind == "gamma" and form in ("chunked", "parallel")
               and bool((args[[s.name for s in rec.checked.inputs + rec.checked.params].index(decay.name)] <= 0).any()))
    try:
        out, final = layer(*args, form=form, backend=backend, chunk_size=case.chunk, initial_state=initial,
                           output_final_state=True)
    except ValueError as err:
        if refuses and is_decay_not_positive(err):
            return  # a decay of 0 where the form takes its logarithm: a clear error, not a wrong answer
        raise
    assert not refuses, f"{name} {form}: a decay of 0 should be refused (DecayNotPositive)"
    tol = TOL[dtype]
    label = f"{name} {backend} {form} {case}"
    ref_out = as_dict(ref_out, rec.checked.outputs)
    for key, got in as_dict(out, rec.checked.outputs).items():
        assert got.dtype == dtype
        if rec.checked.reverse:  # causal in its own direction: the steps after the last non-finite input are safe
            assert_causal(f"{label}: output {key} (time flipped)", got.flip(1), ref_out[key].flip(1), first_unsafe,
                          tol)
        else:
            assert_causal(f"{label}: output {key}", got, ref_out[key], first_unsafe, tol)
        assert_agrees(f"{label}: output {key}", got, ref_out[key], tol)
    ref_final = as_dict(ref_final, rec.checked.states)
    for key, got in as_dict(final, rec.checked.states).items():
        assert_agrees(f"{label}: final state {key}", got, ref_final[key], tol)


# ---------------------------------------------------------------------------------------------------------------
# The property tests
# ---------------------------------------------------------------------------------------------------------------


def forms_of(name: str) -> list[tuple[str, str]]:
    """(backend, form) for every form of both backends; the Triton scan form only where the Triton backend has no
    chunked form (mamba: what `auto` runs there). It is one kernel for every spec, and in the interpreter a drawn
    case costs it seconds; tests/test_triton_scan.py checks it on every spec with resets."""
    torch_forms = list(layer_for(name).forms)
    triton_forms = triton_form_names(analyse(RECS[name].checked))
    return [("torch", f) for f in torch_forms] + [("triton", f) for f in triton_forms
                                                  if f != "scan" or "chunked" not in triton_forms]


COMBOS = [(name, backend, form) for name in sorted(RECS) for backend, form in forms_of(name)]
# Generated examples per combination, after HARD, GROWING and RESETS; RECDSL_EXAMPLES_SCALE=k runs k times as
# many (a longer hunt, not for CI). 10 and 4 since 2026-12-02 (16 and 6 before), for CI's time.
_SCALE = float(os.environ.get("RECDSL_EXAMPLES_SCALE", "1"))
EXAMPLES = {"torch": round(10 * _SCALE), "triton": round(4 * _SCALE)}


def run_property(name: str, backend: str, form: str, max_examples: int, dtype: torch.dtype = F32,
                 device: str = "cpu") -> None:
    """The property test of one (spec, backend, form): HARD, GROWING, RESETS, then max_examples drawn cases."""
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if os.environ.get("RECDSL_SHRINK") else [])

    @seed(zlib.crc32(f"{name}/{backend}/{form}".encode()))
    @settings(max_examples=max_examples, deadline=None, derandomize=True, database=None, phases=phases,
              suppress_health_check=list(HealthCheck))
    @given(case=CASES)
    @example(case=HARD)
    @example(case=GROWING)
    @example(case=RESETS)
    def prop(case):
        check_case(name, backend, form, case, dtype, device)

    prop()


@pytest.mark.parametrize("name,backend,form", COMBOS, ids=[f"{n}-{b}-{f}" for n, b, f in COMBOS])
def test_numerics_property(name, backend, form):
    run_property(name, backend, form, EXAMPLES[backend])


def test_every_decay_is_drawn():
    """A spec whose inputs or params enter a decay (inside exp, or multiplying the state) is in DECAYS, so the
    property tests draw its decays rather than ordinary inputs; and every DECAYS entry names a spec's symbol."""
    for name, rec in RECS.items():
        roles = _Roles(rec.checked)
        assert NOT_DECAYS.get(name, set()) <= set(roles.sign), f"{name}: NOT_DECAYS names no input inside exp"
        in_decay = (set(roles.sign) | roles.decays) - NOT_DECAYS.get(name, set())
        if in_decay:
            assert name in DECAYS, f"{name}: {sorted(in_decay)} enter its decay; add it to DECAYS"
    for name, decay in DECAYS.items():
        symbols = {s.name for s in RECS[name].checked.inputs + RECS[name].checked.params}
        assert decay.name in symbols and (decay.scaled is None or decay.scaled in symbols), name


# ---------------------------------------------------------------------------------------------------------------
# Named tests: the inputs of the issue
# ---------------------------------------------------------------------------------------------------------------


def _gla_args(T: int, B: int = 1, H: int = 2, seed_: int = 0, initial: bool = True):
    rec = RECS["gla"]
    args, init = sample_arguments(rec.checked, {"K": SIZE, "V": SIZE}, B, T, H, dtype=F64, seed=seed_,
                                  with_initial_state=initial)
    return [a.float() for a in args], (None if init is None else init.float())


def _run_and_compare(name, args, init, form, backend, chunk, first_unsafe=None):
    """Run and assert (a)-(c) against the reference; returns (output, reference output)."""
    rec = RECS[name]
    ref_args = [a.double() for a in args]
    ref_init = None if init is None else init.double()
    ref_out, ref_final = rec.reference(*ref_args, initial_state=ref_init, output_final_state=True)
    out, final = layer_for(name)(*args, form=form, backend=backend, chunk_size=chunk, initial_state=init,
                                 output_final_state=True)
    what = f"{name} {backend} {form} chunk {chunk}"
    if first_unsafe is not None:
        assert_causal(what, out, ref_out, first_unsafe, TOL[F32])
    assert_agrees(f"{what}: output", out, ref_out, TOL[F32])
    assert_agrees(f"{what}: final state", final, ref_final, TOL[F32])
    return out, ref_out


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("R", [-100.0, -1e4, -math.inf], ids=["-100", "-1e4", "-inf"])
def test_gla_one_reset_step(R, backend):
    """GLA, B=1, T=64, H=2, K=V=16, g = -0.05 except g[:, 4] = R, chunk 64, chunked."""
    args, init = _gla_args(64)
    args[3] = torch.full_like(args[3], -0.05)
    args[3][:, 4] = R
    _run_and_compare("gla", args, init, "chunked", backend, 64)


@pytest.mark.parametrize("form,backend", [("chunked", "torch"), ("chunked", "triton"), ("auto", "torch"),
                                          ("auto", "triton")])
@pytest.mark.parametrize("R", [-1e3, -1e4, -math.inf], ids=["-1e3", "-1e4", "-inf"])
def test_gated_delta_net_resets_at_chunk_starts(R, form, backend):
    """Gated DeltaNet, B=1, T=96, H=2, K=V=16, unit-norm k, beta in (0, 1), an initial state,
    g = -U(0, 0.1) except g[:, 0] = g[:, 32] = R, chunk 32."""
    rec = RECS["gated_delta_net"]
    args, init = sample_arguments(rec.checked, {"K": SIZE, "V": SIZE}, 1, 96, 2, dtype=F64, seed=3,
                                  with_initial_state=True)
    q, k, v, g, beta = [a.float() for a in args]
    assert torch.allclose(k.norm(dim=-1), torch.ones(()), atol=1e-5) and bool(((beta > 0) & (beta < 1)).all())
    g = -0.1 * torch.rand(g.shape, generator=torch.Generator().manual_seed(4))
    g[:, 0] = R
    g[:, 32] = R
    _run_and_compare("gated_delta_net", [q, k, v, g, beta], init.float(), form, backend, 32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("chunk", [16, 64])
def test_gla_reset_at_every_step(chunk, backend):
    """GLA with g = -inf at every step: S_t = k_t v_t^T, o_t = q_t . k_t v_t / sqrt(K)."""
    args, init = _gla_args(64)
    args[3] = torch.full_like(args[3], -math.inf)
    out, ref = _run_and_compare("gla", args, init, "chunked", backend, chunk)
    q, k, v = args[:3]
    direct = (q * k).sum(-1, keepdim=True) * v / 4.0
    assert torch.isfinite(out).all() and (out - direct).norm() <= 1e-5 * direct.norm()


@pytest.mark.parametrize("form,backend", [("chunked", "torch"), ("parallel", "torch"), ("chunked", "triton"),
                                          ("recurrent", "triton")])
def test_gla_growing_state(form, backend):
    """GLA with g = +0.5 everywhere: the state grows by e^0.5 per step, e^32 ~ 8e13 after T = 64 steps (finite in
    float32); the chunked and parallel forms hand such steps to the step loop, which must match the reference."""
    args, init = _gla_args(64)
    args[3] = torch.full_like(args[3], 0.5)
    out, ref = _run_and_compare("gla", args, init, form, backend, 64)
    assert torch.isfinite(ref).all() and ref.abs().max() > 1e12  # it does grow, and stays finite


@pytest.mark.parametrize("form,backend", [("recurrent", "torch"), ("scan", "torch"), ("chunked", "torch"),
                                          ("parallel", "torch"), ("recurrent", "triton"), ("chunked", "triton")])
def test_gla_nan_log_decay_at_one_step(form, backend):
    """GLA, B=1, T=64, H=2, K=V=16, g[:, 4] = NaN: the reference has 60 steps x 2 heads x 16 = 1,920 non-finite
    outputs (steps 4..63); every form non-finite exactly there, and equal to the reference before step 4."""
    args, init = _gla_args(64)
    args[3][:, 4] = math.nan
    out, ref = _run_and_compare("gla", args, init, form, backend, 64, first_unsafe=4)
    assert int((~torch.isfinite(ref)).sum()) == 1920 and bool(torch.isfinite(ref[:, :4]).all())


@pytest.mark.parametrize("form,backend,chunk", [("chunked", "torch", 16), ("parallel", "torch", 64),
                                                ("chunked", "triton", 16), ("chunked", "triton", 64)])
def test_gla_nan_value_does_not_reach_earlier_steps(form, backend, chunk):
    """GLA, T=32, v[0, 20, 0, 0] = NaN: the outputs before step 20 are finite and equal to the reference's."""
    args, init = _gla_args(32)
    args[2][0, 20, 0, 0] = math.nan
    out, ref = _run_and_compare("gla", args, init, form, backend, chunk, first_unsafe=20)
    assert bool(torch.isfinite(out[:, :20]).all()) and not bool(torch.isfinite(out[:, 20:, 0]).all())


NAN_FUNCTIONS = """
recurrence nan_functions(x[D]) -> o[D] {
    state h[D]
    h[d] = 0.5 * h[d] + relu(x[d]) + elu(x[d]) + max(x[d], 0.5) + min(x[d], -0.5)
    o[d] = h[d]
}
"""


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_through_relu_elu_min_max(backend):
    """relu, elu, min and max of a NaN are NaN on both backends, as in torch (Triton's tl.minimum / tl.maximum
    drop a NaN unless told to propagate it)."""
    rec = recurrence_dsl.load(NAN_FUNCTIONS)["nan_functions"]
    layer = recurrence_dsl.compile(rec, tuning=False)
    x = torch.randn(1, 6, 1, 16)
    x[0, 3, 0, 5] = math.nan
    out, _ = layer(x, form="recurrent", backend=backend)
    ref, _ = rec.reference(x.double())
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    assert not torch.isfinite(out[0, 3:, 0, 5]).any()
    assert torch.isfinite(out[0, :3]).all()


# ---------------------------------------------------------------------------------------------------------------
# mLSTM in float16 with large input gates (the Triton chunked and parallel forms)
# ---------------------------------------------------------------------------------------------------------------


def _mlstm_half_args(T: int = 96, B: int = 1, H: int = 2, seed_: int = 2) -> list[torch.Tensor]:
    """q, k, v [B, T, H, 16] ~ N(0, 1), ig [B, T, H] ~ U(5, 8), fg ~ N(3, 1), in float16."""
    gen = torch.Generator().manual_seed(seed_)
    q, k, v = (torch.randn(B, T, H, SIZE, generator=gen) for _ in range(3))
    ig = 5.0 + 3.0 * torch.rand(B, T, H, generator=gen)
    fg = 3.0 + torch.randn(B, T, H, generator=gen)
    return [x.half() for x in (q, k, v, ig, fg)]


def _mlstm_readouts(q, k, v, ig, fg) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_t C_t [B, T, H, V], q_t . n_t [B, T, H]) in float64, with C_t = sum_{s <= t} w_ts k_s v_s^T and
    n_t = sum_{s <= t} w_ts k_s, w_ts = exp(ig_s + L_t - L_s), L the cumulative sum of logsigmoid(fg) (mlstm.rec
    unrolled): the readouts the chunked kernels store."""
    q, k, v, ig, fg = (x.double() for x in (q, k, v, ig, fg))
    L = torch.nn.functional.logsigmoid(fg).cumsum(1)
    expo = ig[:, None, :, :] + L[:, :, None, :] - L[:, None, :, :]  # [B, t, s, H]
    causal = torch.ones(q.shape[1], q.shape[1], dtype=torch.bool).tril()[None, :, :, None]
    weights = torch.where(causal, expo, -math.inf).exp()
    scores = torch.einsum("btsh,bthk,bshk->btsh", weights, q, k)
    return torch.einsum("btsh,bshv->bthv", scores, v), scores.sum(2)


@pytest.mark.parametrize("form", ["chunked", "parallel"])
def test_mlstm_float16_large_input_gates(form):
    """mLSTM, float16, B=1, T=96, H=2, K=V=16, ig ~ U(5, 8), fg ~ N(3, 1), chunks of 32, Triton: the readouts
    q C and q n pass float16's 65504 (checked here) while h = q C / max(|q n|, 1) stays of the size of v. The
    output, the final states and every input's gradient (of a loss scaled to keep them within float16's range)
    within 5e-3 (float16's tolerance) of the float64 reference on the same float16 inputs. Before the fix the
    readouts were stored in float16 (inf, then inf / inf) and the prologue rounded exp(ig) and logsigmoid(fg) to
    float16 (errors of 3e-2 at ig ~ 4, magnified by the cancelling sum q n); the backward gave NaN gradients."""
    rec = RECS["mlstm"]
    args = _mlstm_half_args()
    read_c, read_n = _mlstm_readouts(*args)
    assert read_c.abs().max() > 65504 and read_n.abs().max() > 50000  # the case is the overflowing one
    leaves = [a.double().requires_grad_() for a in args]
    ref, ref_final = rec.reference(*leaves, output_final_state=True)
    # a loss scale that keeps the gradients (dq ~ 1e4 here) within float16's range
    weight = 1e-2 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    ref_grads = torch.autograd.grad((ref * weight).sum(), leaves)
    got_leaves = [a.clone().requires_grad_() for a in args]
    out, final = layer_for("mlstm")(*got_leaves, form=form, backend="triton", chunk_size=32,
                                    output_final_state=True)
    assert out.dtype == F16 and torch.isfinite(ref).all()
    what = f"mlstm float16 triton {form}"
    assert_agrees(f"{what}: output", out, ref.detach(), TOL[F16])
    ref_final = as_dict(ref_final, rec.checked.states)
    for key, got in as_dict(final, rec.checked.states).items():
        assert_agrees(f"{what}: final state {key}", got, ref_final[key].detach(), TOL[F16])
    grads = torch.autograd.grad((out.float() * weight.float()).sum(), got_leaves)
    for name, got, want in zip("q k v ig fg".split(), grads, ref_grads):
        assert got.dtype == F16 and torch.isfinite(want.half()).all()
        assert_agrees(f"{what}: d{name}", got, want, TOL[F16])


def test_float16_readouts_come_back_in_float32():
    """The runtimes' `readouts=True` (a printed epilogue reads the outputs): float16 outputs are stored in float32,
    bfloat16 and float32 ones in k's dtype; without it every output is in k's dtype. A float16 readout past 65504
    is then finite and equals the float32 call's."""
    from codegen import triton_parallel as tp
    from codegen import triton_runtime as rt

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 20, 2, 16, generator=gen) for _ in range(3))
    v = v * 3000.0  # q S_t sums up to 20 steps of k . q v: past 65504
    for run in (lambda *a, **kw: rt.chunked_linear_by(rt.NoDecay, *a, chunk_size=16, **kw),
                lambda *a, **kw: tp.parallel_linear_by(rt.NoDecay, *a, **kw)):
        (want,), _ = run([(q, False)], k, v)
        assert want.abs().max() > 65504
        for dtype, readouts, expected in [(F16, True, F32), (F16, False, F16), (BF16, True, BF16),
                                          (F32, True, F32)]:
            (o,), _ = run([(q.to(dtype), False)], k.to(dtype), v.to(dtype), readouts=readouts)
            assert o.dtype == expected, (dtype, readouts, o.dtype)
        # the same float16 values run in float32: the float16 call differs by its rounding of the inputs alone
        (o,), _ = run([(q.half(), False)], k.half(), v.half(), readouts=True)
        (o_f32,), _ = run([(q.half().float(), False)], k.half().float(), v.half().float())
        assert torch.isfinite(o).all() and o.abs().max() > 65504
        assert_agrees("float16 readouts", o, o_f32.double(), 1e-5)


# ---------------------------------------------------------------------------------------------------------------
# softplus / logsigmoid tails in the Triton kernels
# ---------------------------------------------------------------------------------------------------------------

# The specs of specs/ that call softplus or logsigmoid, and the input each calls it on (its sign there).
TAIL_GATES = {"rg_lru": "lam", "mlstm": "fg", "min_gru": "z"}
TAIL_COMBOS = [(name, form) for name in sorted(TAIL_GATES)
               for form in triton_form_names(analyse(RECS[name].checked))]


def _tail_arguments(name: str, T: int = 20) -> tuple[list[torch.Tensor], torch.Tensor | dict | None]:
    """`name`'s arguments (float64, sizes 16, B=1, H=2) with its softplus / logsigmoid input drawn from
    -25..-18 on half its entries and +18..+25 on the others: both tails, where a float32 log(1 + exp(-|x|))
    is exactly 0."""
    rec = RECS[name]
    args, initial = sample_arguments(rec.checked, {s: SIZE for s in ("K", "V", "D")}, 1, T, 2, dtype=F64,
                                     seed=5, with_initial_state=True)
    names = [s.name for s in rec.checked.inputs + rec.checked.params]
    i = names.index(TAIL_GATES[name])
    gen = torch.Generator().manual_seed(6)
    size = 18.0 + 7.0 * torch.rand(args[i].shape, generator=gen, dtype=F64)
    sign = torch.where(torch.rand(args[i].shape, generator=gen) < 0.5, -1.0, 1.0).double()
    args[i] = sign * size
    return args, initial


@pytest.mark.parametrize("name,form", TAIL_COMBOS, ids=[f"{n}-{f}" for n, f in TAIL_COMBOS])
def test_softplus_logsigmoid_tails_in_triton(name, form):
    """Every Triton form of the specs calling softplus or logsigmoid (rg_lru: softplus(-lam); mlstm:
    logsigmoid(fg); min_gru: logsigmoid(-z)), float32, with those inputs at |x| in 18..25: outputs, final states
    and every gradient against the float64 reference. softplus(-20) is 2.1e-9, not 0: printed as
    max(x, 0) + log(1 + exp(-|x|)) it was 0 in float32, which closed rg_lru's input weight sqrt(1 - a^2) (about
    1.8e-4 at lam = 20) to exactly 0; the kernels print log1p (the `_log1p` helper) instead."""
    rec = RECS[name]
    args, initial = _tail_arguments(name)
    ref, weights = weighted_gradients(rec.reference, rec, args, initial)
    ref_out, ref_final = rec.reference(*args, initial_state=initial, output_final_state=True)
    layer = layer_for(name)
    init32 = {k: v.float() for k, v in as_dict(initial, rec.checked.states).items()}
    args32 = [a.float() for a in args]
    out, final = layer(*args32, initial_state=init32 if len(init32) > 1 else next(iter(init32.values())),
                       output_final_state=True, backend="triton", form=form,
                       chunk_size=16)
    what = f"{name} triton {form}"
    ref_out = as_dict(ref_out, rec.checked.outputs)
    for key, got in as_dict(out, rec.checked.outputs).items():
        assert_agrees(f"{what}: output {key}", got, ref_out[key], TOL[F32])
    ref_final = as_dict(ref_final, rec.checked.states)
    for key, got in as_dict(final, rec.checked.states).items():
        assert_agrees(f"{what}: final state {key}", got, ref_final[key], TOL[F32])
    got, _ = weighted_gradients(layer, rec, args32, init32, weights, backend="triton", form=form, chunk_size=16)
    names = [s.name for s in rec.checked.inputs + rec.checked.params + rec.checked.states]
    for n, g, r in zip(names, got, ref):
        assert_agrees(f"{what}: d{n}", g, r, 1e-4)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, in the interpreter: exp underflows on purpose
def test_printed_softplus_logsigmoid_match_torch(monkeypatch):
    """softplus(x) and logsigmoid(x) as the Triton printer writes them (with the `_log1p` helper of HELPERS), run in
    the interpreter on float32 x over [-100, 100] (both tails included: 1e-43 .. 100 in size): within 1e-6 of
    torch's float64 values, relatively, wherever those are normal float32 numbers; and the renamed module spelling
    (`helper_prefix`) calls the renamed helper."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    import sympy

    from codegen.cache import load_source
    from codegen.triton_printer import HELPERS, TritonPrinter
    from recurrence_dsl.step_ir import logsigmoid, softplus

    x_sym = sympy.Symbol("x", real=True)
    printer = TritonPrinter(set(), {}, names={"x": "v"})
    sp, ls = (printer.print_expr(f(x_sym), ()) for f in (softplus, logsigmoid))
    assert "_log1p(" in sp and "_log1p(" in ls and "tl.log(1.0 +" not in sp + ls
    printer.helper_prefix = "_triton_"
    assert "_triton_log1p(" in printer.print_expr(softplus(-x_sym), ())
    source = "import triton\nimport triton.language as tl\n\n\n" + "\n\n".join(HELPERS.values()) + f'''

@triton.jit
def _tails(x, s, l, N: tl.constexpr):
    o = tl.arange(0, N)
    v = tl.load(x + o)
    tl.store(s + o, {sp})
    tl.store(l + o, {ls})
'''
    module = load_source(source, "numerics_softplus_logsigmoid")
    n = 4096
    x = torch.cat([torch.linspace(-100.0, 100.0, n - 8),
                   torch.tensor([-20.0, -17.0, -16.5, 0.0, 16.5, 17.0, 20.0, 1e-3])]).float()
    s, l = torch.empty_like(x), torch.empty_like(x)
    module._tails[(1,)](x, s, l, N=n)
    tiny = torch.finfo(F32).tiny
    for name, got, want in [("softplus", s, torch.nn.functional.softplus(x.double())),
                            ("logsigmoid", l, torch.nn.functional.logsigmoid(x.double()))]:
        normal = want.abs() >= tiny
        rel = ((got.double() - want).abs() / want.abs())[normal]
        assert rel.max() < 1e-6, f"{name}: rel err {rel.max().item():.3g} at x = {x[normal][rel.argmax()].item()}"
        assert normal.sum() > n // 2  # both tails are in: softplus below x ~ -87, logsigmoid above +87 are not
    # the tails the plain log(1.0 + exp(-|x|)) made exactly 0
    assert s[x == -20.0].item() > 0 and l[x == 20.0].item() < 0


# mLSTM in bfloat16 at large input gates. Relative errors of the output (and the worst gradient) against float64,
# measured in the interpreter (whose bfloat16 stores truncate, where a GPU rounds to nearest):
# - the prologue's per-step scalars bfloat16 -> float32 (thirteenth session), seed 2, chunks of 32: chunked 0.28 (0.60)
#   -> 0.090 (0.11), parallel 0.27 (0.60) -> 0.0035 (0.0052);
# - the chunk-start states bfloat16 -> float32 for calls with normaliser columns (`float32_states`): chunked seed 2
#   0.090 (0.11) -> 0.0035 (0.0050), at chunks of 16 0.13 -> 0.0035 (0.0050), seed 1 3.5 (3.5) -> 0.0047 (0.0064),
#   the parallel form's figures. The same seed-2 inputs in float16 with the float32 states rounded (to nearest) to
#   bfloat16 after the state kernel: 0.56 (1.6); rounded to float16: 0.049 (0.10); as kept, float32: 2e-4 (4e-4).
# (form, seed, chunk_size): the parallel form has no chunks, so one case of it
BF16_LARGE_GATE_CASES = [("chunked", 2, 32), ("chunked", 2, 16), ("chunked", 1, 32), ("parallel", 2, 32)]


@pytest.mark.parametrize("form,seed_,chunk", BF16_LARGE_GATE_CASES,
                         ids=[f"{f}-seed{s}-chunk{c}" for f, s, c in BF16_LARGE_GATE_CASES])
def test_mlstm_bfloat16_large_input_gates(form, seed_, chunk):
    """mLSTM, bfloat16, B=1, T=96, H=2, K=V=16, ig ~ N(6, 1), fg ~ N(3, 1), Triton: the output and every input's
    gradient against the float64 reference on the same bfloat16 inputs, within bfloat16's tolerance (2e-2; measured
    at most 0.0064). The prologue's per-step scalars (exp(ig), logsigmoid(fg): [B, T, H]) are float32, as for
    float16; rounded to bfloat16 (2**-8) they were magnified by the cancelling readout q n to 0.28 of the output.
    The chunked form's chunk-start states are float32 too (the normaliser column's call: `float32_states`): kept in
    bfloat16 they gave 0.09 (seed 2), 0.13 (chunks of 16) and 3.5 (seed 1). The parallel form keeps no states."""
    rec = RECS["mlstm"]
    gen = torch.Generator().manual_seed(seed_)
    q, k, v = (torch.randn(1, 96, 2, SIZE, generator=gen) for _ in range(3))
    ig = 6.0 + torch.randn(1, 96, 2, generator=gen)
    fg = 3.0 + torch.randn(1, 96, 2, generator=gen)
    args = [x.bfloat16() for x in (q, k, v, ig, fg)]
    leaves = [a.double().requires_grad_() for a in args]
    ref = rec.reference(*leaves)[0]
    weight = 1e-2 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    ref_grads = torch.autograd.grad((ref * weight).sum(), leaves)
    got_leaves = [a.clone().requires_grad_() for a in args]
    out = layer_for("mlstm")(*got_leaves, form=form, backend="triton", chunk_size=chunk)[0]
    assert out.dtype == BF16 and torch.isfinite(ref).all()
    what = f"mlstm bfloat16 triton {form} (seed {seed_}, chunks of {chunk})"
    assert_agrees(f"{what}: output", out, ref.detach(), TOL[BF16])
    grads = torch.autograd.grad((out.float() * weight.float()).sum(), got_leaves)
    for name, got, want in zip("q k v ig fg".split(), grads, ref_grads):
        assert got.dtype == BF16
        assert_agrees(f"{what}: d{name}", got, want, TOL[BF16])


def _saved_chunk_states(out: torch.Tensor) -> list[torch.Tensor]:
    """The chunk-start states h [B, H, NT, K, V] each Triton chunked linear call under `out` saved for its backward
    (`_ChunkedLinearFunction`: the fifth saved tensor)."""
    found, seen, todo = [], set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "ChunkedLinearFunction" in node.name():
            found.append(node.saved_tensors[4])
        todo.extend(n for n, _ in node.next_functions)
    return found


@pytest.mark.parametrize("name,dtype,expected", [("mlstm", BF16, F32), ("normalized_linear_attention", BF16, F32),
                                                 ("gla", BF16, BF16), ("mlstm", F16, F32)])
def test_chunk_states_dtype_of_half_precision_calls(name, dtype, expected):
    """The chunk-start states a chunked call keeps for its backward: float32 for a call with normaliser columns
    (mLSTM's C | n, normalised linear attention's S | z: `float32_states`, printed by the module) in bfloat16, whose
    divided readouts magnify the states' rounding; bfloat16 for GLA's bfloat16 call (as flash-linear-attention keeps
    them: no division); float32 for float16 (always). Forward only, B=1, T=40, H=1, sizes 16, chunks of 16."""
    rec = RECS[name]
    args, _ = sample_arguments(rec.checked, {s: SIZE for s in rec.checked.sizes}, 1, 40, 1, dtype=F64, seed=3)
    leaves = [a.to(dtype).requires_grad_() for a in args]
    out = layer_for(name)(*leaves, form="chunked", backend="triton", chunk_size=16)
    while isinstance(out, (tuple, list, dict)):  # (outputs, ...), or a dict of several outputs
        out = next(iter(out.values())) if isinstance(out, dict) else out[0]
    states = _saved_chunk_states(out)
    assert states and all(h.shape[2] == 3 for h in states), [tuple(h.shape) for h in states]
    assert {h.dtype for h in states} == {expected}, (name, dtype, [h.dtype for h in states])
