"""The Triton recurrent form of every spec against the float64 reference interpreter (Triton interpreter, CPU).

Relative error ||x - ref|| / ||ref|| of every output and final state: <= 1e-5 with float32 inputs,
<= 5e-3 with float16 inputs (states stay float32). Sizes 16 (exactly one tile) and 48 (padded to 64,
so masks and padding lanes are exercised), plus one run with distinct sizes (a swapped axis shows).
Triton is required: this file fails, not skips, without it.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import sympy  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402, F401  (fail loudly if triton is missing)

import recurrence_dsl  # noqa: E402
from codegen.triton_printer import TritonPrinter  # noqa: E402
from codegen.triton_recurrent import build_triton_recurrent, triton_recurrent_source  # noqa: E402
from recurrence_dsl.analysis import analyse  # noqa: E402
from recurrence_dsl.sampling import sample_arguments  # noqa: E402

from .conftest import SPEC_FILES, as_dict  # noqa: E402

B, H = 1, 2
TOL = {torch.float32: 1e-5, torch.float16: 5e-3}
SPEC_NAMES = [name for path in SPEC_FILES for name in recurrence_dsl.load(path)]
_RECS = {name: rec for path in SPEC_FILES for name, rec in recurrence_dsl.load(path).items()}
_LAUNCHERS: dict = {}
WORST: dict = {}


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def launcher(name: str):
    if name not in _LAUNCHERS:
        _LAUNCHERS[name] = build_triton_recurrent(analyse(_RECS[name].checked))
    return _LAUNCHERS[name]


def run_case(name: str, sizes: dict, T: int, dtype: torch.dtype, seed: int = 0) -> float:
    rec = _RECS[name]
    checked = rec.checked
    args, initial = sample_arguments(checked, sizes, B, T, H, dtype=torch.float64, seed=seed,
                                     with_initial_state=True)
    out, final = rec.reference(*args, initial_state=initial, output_final_state=True)
    ref_out = as_dict(out, checked.outputs)
    ref_final = as_dict(final, checked.states)
    states = {k: v.to(torch.float32) for k, v in as_dict(initial, checked.states).items()}
    # The launcher runs forward in time; a reverse recurrence is the forward run on the time-flipped inputs, its
    # outputs flipped back, as the layer's dispatcher calls it.
    n_inputs = len(checked.inputs)
    launch = [a.flip(1) if checked.reverse and i < n_inputs else a for i, a in enumerate(args)]
    got_out, got_final = launcher(name)(*(a.to(dtype) for a in launch), states, *(sizes[s] for s in checked.sizes))
    if checked.reverse:
        got_out = {k: v.flip(1) for k, v in got_out.items()}
    worst = 0.0
    for o in checked.outputs:
        assert got_out[o.name].shape == ref_out[o.name].shape
        assert got_out[o.name].dtype == dtype
        worst = max(worst, rel(got_out[o.name], ref_out[o.name]))
    for s in checked.states:
        assert got_final[s.name].shape == ref_final[s.name].shape
        assert got_final[s.name].dtype == torch.float32
        worst = max(worst, rel(got_final[s.name], ref_final[s.name]))
    key = (dtype, T)
    WORST[key] = max(WORST.get(key, 0.0), worst)
    return worst


@pytest.mark.parametrize("name", SPEC_NAMES)
@pytest.mark.parametrize("size", [16, 48])
@pytest.mark.parametrize("T", [1, 63])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_against_reference(name, size, T, dtype):
    sizes = {s: size for s in _RECS[name].checked.sizes}
    err = run_case(name, sizes, T, dtype)
    assert err <= TOL[dtype], f"{name} size={size} T={T} {dtype}: relative error {err:.3e}"


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_distinct_sizes(name):
    """Every size different (and none a power of two but 16): a swapped or mis-padded axis cannot pass."""
    choices = [48, 20, 33, 16]
    sizes = {s: choices[i % len(choices)] for i, s in enumerate(_RECS[name].checked.sizes)}
    err = run_case(name, sizes, 17, torch.float32, seed=1)
    assert err <= TOL[torch.float32], f"{name} {sizes}: relative error {err:.3e}"


def test_zero_length_and_missing_state():
    """T = 0 returns empty outputs and the initial state; a state left out of `states` starts at zero."""
    name = "gla"
    rec = _RECS[name]
    sizes = {"K": 20, "V": 24}
    args, initial = sample_arguments(rec.checked, sizes, B, 0, H, dtype=torch.float32, seed=0,
                                     with_initial_state=True)
    out, final = launcher(name)(*args, {"S": initial}, 20, 24)
    assert out["o"].shape == (B, 0, H, 24)
    assert torch.equal(final["S"], initial)
    args, _ = sample_arguments(rec.checked, sizes, B, 5, H, dtype=torch.float64, seed=0)
    ref_out, ref_final = rec.reference(*args, output_final_state=True)
    out, final = launcher(name)(*(a.float() for a in args), {}, 20, 24)
    assert rel(out["o"], ref_out) <= 1e-5 and rel(final["S"], ref_final) <= 1e-5


def test_block_size_arguments():
    """Block sizes are launcher arguments: a larger power of two works, a too-small one is refused."""
    name = "mamba2"
    rec = _RECS[name]
    sizes = {"P": 20, "N": 24}
    args, initial = sample_arguments(rec.checked, sizes, B, 4, H, dtype=torch.float64, seed=0,
                                     with_initial_state=True)
    ref_out, ref_final = rec.reference(*args, initial_state=initial, output_final_state=True)
    fn = launcher(name)
    out, final = fn(*(a.float() for a in args), {"h": initial.float()}, 20, 24, block_P=64, block_N=32, num_warps=2)
    assert rel(out["y"], ref_out) <= 1e-5 and rel(final["h"], ref_final) <= 1e-5
    # P is split over programs (no step couples its lanes): a block below P is a tile, here two of 16 lanes
    out, final = fn(*(a.float() for a in args), {"h": initial.float()}, 20, 24, block_P=16)
    assert rel(out["y"], ref_out) <= 1e-5 and rel(final["h"], ref_final) <= 1e-5
    with pytest.raises(ValueError, match="BLOCK_N"):  # N is summed over: one program holds all of it
        fn(*(a.float() for a in args), {"h": initial.float()}, 20, 24, block_N=16)
    with pytest.raises(ValueError, match="BLOCK_P"):
        fn(*(a.float() for a in args), {"h": initial.float()}, 20, 24, block_P=24)


TILE_AXES = {"gla": "V", "delta_net": "V", "gated_delta_net": "V", "rwkv7": "V", "rwkv6": "V", "hgrn2": "V",
             "normalized_linear_attention": "V", "mamba": "D", "mamba2": "P", "indrnn": "D", "minimal_rnn": None}

ACROSS = """
recurrence read_across_v(q[K], k[K], v[V]) -> o[K] {
    state S[K, V]
    S[i, j] = S[i, j] + k[i] * v[j]
    o[i] = sum(j, S[i, j] * v[j]) * q[i]
}

recurrence read_both(q[K], k[K], v[V]) -> o {
    state S[K, V]
    S[i, j] = 0.5 * S[i, j] + k[i] * v[j]
    o = sum(i, j, q[i] * S[i, j])
}

recurrence transposed_read(q[K], k[K], v[K]) -> o[K] {
    state S[K, K]
    S[i, j] = S[i, j] + k[i] * v[j]
    o[j] = sum(i, q[i] * S[i, j])
}
"""


def test_tiled_axis():
    """The recurrent kernel splits over programs the one axis no step couples (the value axis of S[K, V] read
    through sum(i, q[i] * S[i, j])); a state read across V is split along K instead, one read across both (or
    a square state, whose two axes are one size) is not split. Each runs against the reference, tiled."""
    from codegen.triton_recurrent import TritonRecurrentWriter

    def tile_of(rec):
        writer = TritonRecurrentWriter(analyse(rec.checked))
        writer.write()
        return None if writer.tile is None else writer.tile.name

    for name, axis in TILE_AXES.items():
        assert tile_of(_RECS[name]) == axis, name
    recs = recurrence_dsl.load(ACROSS)
    assert [tile_of(recs[n]) for n in ("read_across_v", "read_both", "transposed_read")] == ["K", None, None]
    src = triton_recurrent_source(analyse(_RECS["gla"].checked))
    assert "offs_V = i_tile * BLOCK_V + tl.arange(0, BLOCK_V)" in src and "offs_K = tl.arange(0, BLOCK_K)" in src
    assert "[(B_ * H_, triton.cdiv(max(V, 1), BLOCK_V))]" in src
    check_spec(ACROSS, "read_across_v", {"K": 40, "V": 20})
    check_spec(ACROSS, "read_both", {"K": 40, "V": 20})
    check_spec(ACROSS, "transposed_read", {"K": 40})


SCALAR_AND_3D = """
recurrence scalar_state(x, w[D]) -> y, z[D] {
    param a
    state c, m[D, E, F]
    c = tanh(a * c + x)
    m[d, e, f] = exp(-softplus(w[d])) * m[d, e, f] + silu(w[d]) * x * c
    y = c * 2 + sum(d, e, f, m[d, e, f]) / (D * E * F)
    z[d] = logsigmoid(w[d]) + elu(sum(e, f, m[d, e, f])) + relu(w[d]) + min(w[d], 0.1) + max(abs(w[d]), sqrt(a))
}
"""


ODDITIES = """
recurrence oddities(x[4], y[K], unused) -> o[4], c, k2[K], d[K] {
    param tl[K], W[K, K]
    state S[4, K], carried[K], T_
    S[a, b] = 0.5 * S[a, b] + x[a] * y[b] * tl[b] * W[b, b]
    T_ = T_ + 1
    o[a] = sum(b, S[a, b]) / K + 3
    c = 2.5
    k2[b] = carried[b] + K + y[b] ** 2 - 1 / (1 + y[b] ** 2) + (abs(y[b]) + 1) ** 0.3
    d[b] = sum(e, W[e, e] * y[e]) * carried[b] + sum(a, S[a, b]) ** 3
}
"""


def check_spec(text: str, name: str, sizes: dict, T: int = 7):
    rec = recurrence_dsl.load(text)[name]
    checked = rec.checked
    args, initial = sample_arguments(checked, sizes, B, T, H, dtype=torch.float64, seed=2,
                                     with_initial_state=True)
    out, final = rec.reference(*args, initial_state=initial, output_final_state=True)
    fn = build_triton_recurrent(analyse(checked))
    got_out, got_final = fn(*(a.float() for a in args),
                            {k: v.float() for k, v in as_dict(initial, checked.states).items()},
                            *(sizes[s] for s in checked.sizes))
    ref_out, ref_final = as_dict(out, checked.outputs), as_dict(final, checked.states)
    for o in checked.outputs:
        assert rel(got_out[o.name], ref_out[o.name]) <= 1e-5, o.name
    for s in checked.states:
        assert rel(got_final[s.name], ref_final[s.name]) <= 1e-5, s.name


COUPLED = """
recurrence coupled_after(q[K], k[K], v[V]) -> o[V] {
    state S[K, V], z[K]
    z[i] = 0.5 * z[i] + elu(k[i])
    S[i, j] = S[i, j] + z[i] * v[j] + elu(k[i]) * exp(z[i])
    o[j] = sum(i, q[i] * S[i, j]) + sum(i, z[i])
}

recurrence coupled_before(q[K], k[K], v[V]) -> o[V] {
    state S[K, V], z[K]
    S[i, j] = S[i, j] + z[i] * v[j]
    z[i] = 0.5 * z[i] + k[i]
    o[j] = sum(i, q[i] * S[i, j])
}
"""


@pytest.mark.parametrize("name", ["coupled_after", "coupled_before"])
def test_state_reading_another_states_new_value(name):
    """S's update reads z after (or before) z's update: states are updated in assignment order."""
    check_spec(COUPLED, name, {"K": 20, "V": 24})


def test_scalar_state_three_axes_and_every_function():
    """A 0-axis state, a 3-axis state, scalar inputs and outputs, and the functions not used by specs/."""
    check_spec(SCALAR_AND_3D, "scalar_state", {"D": 20, "E": 3, "F": 17})


def test_oddities():
    """Literal sizes, an unused input, a state never assigned, a constant output, a diagonal W[b, b], powers,
    names that clash with the kernel's own (`tl`, `T_`)."""
    check_spec(ODDITIES, "oddities", {"K": 20})


def test_generated_source_is_readable_and_gpu_legal():
    """One kernel per spec; no make_block_ptr, no autotune; sums reduce the state in place (no transpose)."""
    for name in SPEC_NAMES:
        src = triton_recurrent_source(analyse(_RECS[name].checked))
        assert f"def {name}__triton_recurrent_kernel(" in src and f"def {name}__triton_recurrent(" in src
        assert "make_block_ptr" not in src and "autotune" not in src
        assert "i_t.to(" not in src
    gla = triton_recurrent_source(analyse(_RECS["gla"].checked))
    assert "tl.sum(b_q[:, None] * b_S_new, axis=0)" in gla
    assert "tl.trans" not in gla


def test_padding_analysis():
    """Sums and state updates are masked exactly when padding lanes could be non-zero."""
    i, j = sympy.Symbol("i", integer=True), sympy.Symbol("j", integer=True)
    K, V = sympy.Symbol("K", integer=True, positive=True), sympy.Symbol("V", integer=True, positive=True)
    x, y, S = sympy.IndexedBase("x"), sympy.IndexedBase("y"), sympy.IndexedBase("S")
    p = TritonPrinter({"K", "V"}, {i: K, j: V}, zero_padded={"x", "y", "S"})
    assert p.is_zero(x[i] * S[i, j], i)
    assert not p.is_zero(sympy.exp(x[i]) * y[j], i)
    assert not p.is_zero(S[i, j] / x[i], i)  # 0 * inf
    assert p.is_zero(sympy.tanh(x[i]) + S[i, j], i)
    assert "tl.where" in p.print_expr(sympy.Sum(sympy.exp(x[i]), (i, 0, K - 1)), ())
    assert "tl.where" not in p.print_expr(sympy.Sum(x[i] * S[i, j], (i, 0, K - 1)), (j,))


def test_report_worst_errors():
    """Runs last: prints the worst relative error per (dtype, T) seen above (pytest -s shows it)."""
    for (dtype, T), err in sorted(WORST.items(), key=str):
        print(f"worst relative error {str(dtype):>14} T={T:>2}: {err:.3e}")
