"""The Triton chunked kernels form every decay exactly for any log decay in [-inf, 0] (float32, CPU + interpreter).

A reset gate (one step with a large negative log decay R) used to cost accuracy: the chunk-local cumulative sum G
was float32, so after a step of size |R| every later partial sum lost the small per-step log decays (relative
error 3.3e-5 at R = -100, 2.1e-3 at R = -1e4), and R = -inf made G_b - G_a = -inf - -inf = nan. Now the log decays
are floored at -1000 (exp(-1000) is exactly 0, so a floored step zeroes every decay spanning it, as -inf does) and
summed in float64, and each difference is taken in float64 before it is rounded to float32 and exponentiated.

Every case compares the chunked Triton form, float32, with the float64 reference: relative error
||x - ref|| / ||ref|| <= 1e-5 for every output and the final state.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton or the project's Triton kernel modules are imported

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import recurrence_dsl  # noqa: E402
from recurrence_dsl.sampling import sample_arguments  # noqa: E402

from .conftest import SPECS_DIR  # noqa: E402

TOL = 1e-5
INF = math.inf

# Hand-made bodies for the decay axes that specs/ lacks as a linear recurrence (scalar, value) or at all (a key
# decay under the delta rule).
INLINE = {
    "scalar_gated": """recurrence scalar_gated(q[K], k[K], v[V], g) -> o[V] {
    state S[K, V]
    S[i, j] = exp(g) * S[i, j] + k[i] * v[j]
    o[j] = sum(i, q[i] * S[i, j])
}""",
    "value_gated": """recurrence value_gated(q[K], k[K], v[V], g[V]) -> o[V] {
    state S[K, V]
    S[i, j] = exp(g[j]) * S[i, j] + k[i] * v[j]
    o[j] = sum(i, q[i] * S[i, j])
}""",
    "key_gated_delta": """recurrence key_gated_delta(q[K], k[K], v[V], g[K], beta) -> o[V] {
    state S[K, V]
    u[j] = v[j] - sum(i, k[i] * exp(g[i]) * S[i, j])
    S[i, j] = exp(g[i]) * S[i, j] + beta * k[i] * u[j]
    o[j] = sum(i, q[i] * S[i, j])
}""",
}
_CACHE: dict[str, tuple] = {}


def _layer(name: str):
    """(recurrence, compiled layer) for a spec of specs/ or an INLINE body, compiled once per file."""
    if name not in _CACHE:
        source = INLINE.get(name, SPECS_DIR / f"{name}.rec")
        rec = recurrence_dsl.load(source)[name]
        layer = recurrence_dsl.compile(rec, tuning=False)
        assert "chunked" in layer.triton_forms, name
        _CACHE[name] = rec, layer
    return _CACHE[name]


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def _check(name: str, args: list, initial, chunk: int) -> None:
    rec, layer = _layer(name)
    out, final = layer(*args, initial_state=initial, output_final_state=True, form="chunked", backend="triton",
                       chunk_size=chunk)
    ref_out, ref_final = rec.reference(*[a.double() for a in args],
                                       initial_state=None if initial is None else initial.double(),
                                       output_final_state=True)
    outs = out if isinstance(out, (tuple, list)) else [out]
    refs = ref_out if isinstance(ref_out, (tuple, list)) else [ref_out]
    for x, ref in zip(outs + [final], refs + [ref_final]):
        assert torch.isfinite(x).all(), f"{name}: non-finite values"
        err = _rel(x, ref)
        assert err <= TOL, f"{name}: relative error {err:.3g} > {TOL}"


def _draw(name: str, T: int, H: int = 2, seed: int = 0):
    """Float32 arguments (every size 16) and an initial state, drawn like the other backend tests."""
    rec, _ = _layer(name)
    sizes = {s: 16 for s in rec.checked.sizes}
    args, initial = sample_arguments(rec.checked, sizes, 1, T, H, dtype=torch.float32, seed=seed,
                                     with_initial_state=True)
    names = [s.name for s in rec.checked.inputs] + [s.name for s in rec.checked.params]
    return dict(zip(names, args)), names, initial


# ---------------------------------------------------------------------------------------------------------------
# the measured cases
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("R", [-100.0, -1e4, -INF])
def test_gla_reset_gate(R):
    """GLA, T = 64 in one chunk of 64, g = -0.05 except g[:, 4] = R (was 3.3e-5 / 2.1e-3 / nan-sized)."""
    inputs, names, initial = _draw("gla", 64)
    g = torch.full_like(inputs["g"], -0.05)
    g[:, 4] = R
    inputs["g"] = g
    _check("gla", [inputs[n] for n in names], initial, 64)


@pytest.mark.parametrize("R", [-1e3, -1e4, -INF])
def test_gated_delta_net_reset_gate(R):
    """Gated DeltaNet, T = 96 in chunks of 32, unit-norm k, g = -U(0, 0.1) except g[:, 0] = g[:, 32] = R."""
    inputs, names, initial = _draw("gated_delta_net", 96)
    gen = torch.Generator().manual_seed(1)
    g = -0.1 * torch.rand(inputs["g"].shape, generator=gen)
    g[:, 0] = R
    g[:, 32] = R
    inputs["g"] = g
    _check("gated_delta_net", [inputs[n] for n in names], initial, 32)


@pytest.mark.parametrize("chunk", [16, 64])
def test_gla_every_step_minus_inf(chunk):
    """GLA with g = -inf at every step: each state is k_t v_t^T alone (was a relative error of 2.7 / 5.6)."""
    inputs, names, initial = _draw("gla", 64)
    inputs["g"] = torch.full_like(inputs["g"], -INF)
    _check("gla", [inputs[n] for n in names], initial, chunk)


# ---------------------------------------------------------------------------------------------------------------
# every decay axis, resets at a chunk start, inside a sub-chunk, at a sub-chunk's and a chunk's last step
# ---------------------------------------------------------------------------------------------------------------

# (recurrence, its log-decay input): key (inclusive and exclusive query), scalar and value linear, scalar and key
# delta rule.
DECAYED = [("gla", "g"), ("rwkv6", "w"), ("scalar_gated", "g"), ("value_gated", "g"), ("gated_delta_net", "g"),
           ("key_gated_delta", "g")]
# T = 64 in chunks of 32 (two 16-step sub-chunks each): 32 starts chunk 1, 41 is inside its first sub-chunk, 47
# ends that sub-chunk (the row the off-diagonal blocks factor through), 31 ends chunk 0 and 63 the sequence.
POSITIONS = {"chunk start": 32, "mid sub-chunk": 41, "sub-chunk end": 47, "chunk end": 31, "last step": 63}


@pytest.mark.parametrize("R", [-1e4, -INF])
@pytest.mark.parametrize("where", sorted(POSITIONS))
@pytest.mark.parametrize("name,gate", DECAYED, ids=[n for n, _ in DECAYED])
def test_reset_anywhere_in_a_chunk(name, gate, where, R):
    inputs, names, initial = _draw(name, 64, seed=3)
    g = inputs[gate].clone()
    g[:, POSITIONS[where]] = R
    inputs[gate] = g
    _check(name, [inputs[n] for n in names], initial, 32)


@pytest.mark.parametrize("R", [-1e4, -INF])
def test_lightning_attention_constant_reset(R):
    """A constant per-head decay exp(-slope) with slope = -R on one head: every step forgets the past."""
    inputs, names, initial = _draw("lightning_attention", 40)
    inputs["slope"] = torch.tensor([0.1, -R])
    _check("lightning_attention", [inputs[n] for n in names], initial, 16)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # no 0 * -inf in the fused head product's masked lanes
@pytest.mark.parametrize("R", [-1e4, -INF])
def test_mamba2_reset_head(R):
    """Mamba-2's log decay dt * A, with A = R on one head (dt > 0): a scalar decay read off a product, fused into
    the cumulative-sum kernel (`_cumsum_kernel`'s HEAD), with no floating-point warning for A = -inf."""
    inputs, names, initial = _draw("mamba2", 40)
    inputs["A"] = torch.tensor([-0.5, R])
    _check("mamba2", [inputs[n] for n in names], initial, 16)
