"""The Triton chunked forms (codegen/triton_runtime.py) against the torch runtime, in the Triton interpreter on CPU.

The oracle is codegen.torch_runtime run in float64 on the very same inputs (float32 or float16 values upcast), so
the figure measured is the Triton kernels' own rounding; the torch runtime run in float32 is itself ~1e-6 away
from it with a -5 per step log decay and 64-step chunks (cumulative sums of -300 lose digits in float32).
Tolerances: relative error ||x - ref|| / ||ref|| <= 1e-5 for float32 inputs, <= 5e-3 for float16 inputs.

Shapes are kept small (B = 1, H = 1 but in the batch test) and the grid of cases sparse: the interpreter runs
every program one after another. A missing triton makes this module fail at import, it is never skipped.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402, F401  (fail loudly if triton is missing)

from codegen import torch_runtime as ref_rt  # noqa: E402
from codegen import triton_runtime as tri  # noqa: E402

F32, F16, F64 = torch.float32, torch.float16, torch.float64
TOL = {F32: 1e-5, F16: 5e-3}
WORST: dict[str, float] = {}


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def make(T, K, V, axis, dtype=F32, B=1, H=1, seed=0, low=-5.0, delta=False, with_s0=True):
    """Two queries (exclusive, inclusive), k (L2-normalised for delta), v, beta, log decay in [low, 0], s0."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    k = rnd(B, T, H, K)
    if delta:
        k = k / k.norm(dim=-1, keepdim=True)
    shape = {None: None, "scalar": (B, T, H), "key": (B, T, H, K), "value": (B, T, H, V)}[axis]
    d = dict(q1=rnd(B, T, H, K), q2=rnd(B, T, H, K), k=k, v=rnd(B, T, H, V),
             beta=torch.rand(B, T, H, generator=gen, dtype=F64) * 0.98 + 0.01,
             g=None if shape is None else torch.rand(*shape, generator=gen, dtype=F64) * low,
             s0=rnd(B, H, K, V) if with_s0 else None)
    return {name: None if x is None else x.to(dtype) for name, x in d.items()}


def call(fn, d, axis, delta, **kw):
    queries = [(d["q1"], True), (d["q2"], False)]
    if delta:
        return fn(queries, d["k"], d["v"], d["beta"], d["g"], axis, d["s0"], **kw)
    return fn(queries, d["k"], d["v"], d["g"], axis, d["s0"], **kw)


def compare(d, axis, delta, label, chunk_size=64, final=True, **kw):
    """Run both runtimes, check dtypes, shapes and finiteness, and return the worst relative error."""
    up = {name: None if x is None else x.to(F64) for name, x in d.items()}
    ref_fn = ref_rt.chunked_delta if delta else ref_rt.chunked_linear
    tri_fn = tri.chunked_delta if delta else tri.chunked_linear
    ref_outs, ref_final = call(ref_fn, up, axis, delta, chunk_size=chunk_size, output_final_state=final)
    outs, fin = call(tri_fn, d, axis, delta, chunk_size=chunk_size, output_final_state=final, **kw)
    assert len(outs) == 2
    for o, r in zip(outs, ref_outs, strict=True):
        assert o.dtype == d["k"].dtype and o.shape == r.shape and torch.isfinite(o).all()
    errs = [rel(o, r) for o, r in zip(outs, ref_outs, strict=True)]
    if final:
        assert fin.dtype == F32 and fin.shape == ref_final.shape and torch.isfinite(fin).all()
        errs.append(rel(fin, ref_final))
    else:
        assert fin is None
    worst = max(errs)
    key = f"{'delta' if delta else 'linear'}/{axis}/{d['k'].dtype}"
    WORST[key] = max(WORST.get(key, 0.0), worst)
    print(f"{label}: errors (excl, incl{', final' if final else ''}) = {[f'{e:.2e}' for e in errs]}")
    assert worst <= TOL[d["k"].dtype], (label, errs)
    return worst


@pytest.fixture(scope="module", autouse=True)
def report_worst():
    yield
    print("\nworst relative errors:", {k: f"{v:.2e}" for k, v in sorted(WORST.items())})


# (T, K = V, chunk size): every T of {1, 63, 64, 200}, every size of {16, 32, 48}, both chunk sizes
CASES_F32 = [(1, 16, 16), (63, 48, 64), (64, 32, 16), (200, 48, 64), (200, 16, 16)]
CASES_F16 = [(63, 32, 16), (64, 48, 64)]
LINEAR_AXES = [None, "scalar", "key", "value"]
DELTA_AXES = [None, "scalar", "key"]


def _id(case):
    return "T{}-K{}-C{}".format(*case)


# ---------------------------------------------------------------------------------------------------------
# agreement with the torch runtime
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES_F32, ids=_id)
@pytest.mark.parametrize("axis", LINEAR_AXES)
def test_linear_float32(axis, case):
    T, K, C = case
    compare(make(T, K, K, axis), axis, False, f"linear {axis} T={T} K=V={K} C={C}", chunk_size=C)


@pytest.mark.parametrize("case", CASES_F32, ids=_id)
@pytest.mark.parametrize("axis", DELTA_AXES)
def test_delta_float32(axis, case):
    T, K, C = case
    compare(make(T, K, K, axis, delta=True), axis, True, f"delta {axis} T={T} K=V={K} C={C}", chunk_size=C)


@pytest.mark.parametrize("case", CASES_F16, ids=_id)
@pytest.mark.parametrize("axis", LINEAR_AXES)
def test_linear_float16(axis, case):
    T, K, C = case
    compare(make(T, K, K, axis, dtype=F16), axis, False, f"linear f16 {axis} T={T} K=V={K} C={C}", chunk_size=C)


@pytest.mark.parametrize("case", CASES_F16, ids=_id)
@pytest.mark.parametrize("axis", DELTA_AXES)
def test_delta_float16(axis, case):
    T, K, C = case
    compare(make(T, K, K, axis, dtype=F16, delta=True), axis, True, f"delta f16 {axis} T={T} K=V={K} C={C}",
            chunk_size=C)


@pytest.mark.parametrize("axis", LINEAR_AXES)
def test_linear_tiled_k_and_v(axis):
    """K and V split over several BK / BV tiles (K = 48 as 3 x 16, V = 40 as 3 x 16 with a masked tail)."""
    compare(make(70, 48, 40, axis), axis, False, f"linear {axis} tiled", chunk_size=32, block_k=16, block_v=16)


@pytest.mark.parametrize("axis", DELTA_AXES)
def test_delta_tiled_v(axis):
    """Delta keeps all of K in one tile (BK = 64 > K = 40) and splits V = 40 over 3 BV tiles of 16."""
    compare(make(70, 40, 40, axis, delta=True), axis, True, f"delta {axis} tiled", chunk_size=32,
            block_v=16)


@pytest.mark.parametrize("axis", DELTA_AXES)
@pytest.mark.parametrize("K", [80, 144])
def test_delta_row_blocks(axis, K):
    """The delta state kernel holds whole columns of S as NK row blocks of KB = 64 rows: K = 80 is BK = 128 in two
    blocks (the second partly masked), K = 144 is BK = 256 in four (the third partly, the fourth wholly masked)."""
    assert tri._delta_blocks(triton.next_power_of_2(K)) == ((64, 2) if K == 80 else (64, 4))
    compare(make(40, K, 24, axis, delta=True), axis, True, f"delta {axis} K={K} blocks", chunk_size=16)


@pytest.mark.parametrize("axis", ["scalar", "key"])
@pytest.mark.parametrize("delta", [False, True])
def test_batch_heads_no_initial_state_no_final(delta, axis):
    """B = 2, H = 2 (the batch*head program index), no initial state, no final state asked for."""
    d = make(40, 16, 32, axis, B=2, H=2, delta=delta, with_s0=False)
    compare(d, axis, delta, f"{'delta' if delta else 'linear'} {axis} batch", chunk_size=16, final=False)


@pytest.mark.parametrize("axis", LINEAR_AXES)
def test_strong_decay_finite(axis):
    """Log decays down to -20 per step: no overflow, no nan, still exact to float32 rounding."""
    compare(make(50, 16, 16, axis, low=-20.0), axis, False, f"linear {axis} strong decay", chunk_size=32)
    if axis != "value":
        compare(make(50, 16, 16, axis, low=-20.0, delta=True), axis, True, f"delta {axis} strong decay",
                chunk_size=32)


def test_delta_defaults_under_ieee_dots():
    """float32 inputs without tf32 (FMA-loop dots): the delta rule's chunk is capped at 32 steps and num_warps /
    num_stages default to 8 / 1 (gated DeltaNet's backward spilled up to 7.6 KB a thread at 64 / 4 / 2 on sm_90);
    tf32 dots (half inputs, or allow_tf32=True) and given warps / stages are left alone; a bad chunk_size still
    raises, the cap does not hide it."""
    k32, k16 = torch.zeros(1, 8, 1, 16, dtype=F32), torch.zeros(1, 8, 1, 16, dtype=F16)
    assert tri._delta_ieee_defaults(k32, 64, None, None, None) == (32, 8, 1)
    assert tri._delta_ieee_defaults(k32, 64, None, None, False) == (32, 8, 1)
    assert tri._delta_ieee_defaults(k32, 16, 4, 2, None) == (16, 4, 2)
    assert tri._delta_ieee_defaults(k32, 64, None, None, True) == (64, None, None)
    assert tri._delta_ieee_defaults(k16, 64, None, None, None) == (64, None, None)
    assert tri._delta_ieee_defaults(k16, 64, None, None, False) == (32, 8, 1)
    with pytest.raises(ValueError, match="chunk_size"):
        tri._delta_ieee_defaults(k32, 48, None, None, None)


def test_delta_float32_chunk_64_runs_chunks_of_32():
    """A float32 call at chunk_size=64 gives the 32-step chunked result (the chunk is what the cap says) and agrees
    with the float64 torch runtime at 64."""
    d = make(70, 16, 16, "scalar", delta=True)
    at_64, final_64 = call(tri.chunked_delta, d, "scalar", True, chunk_size=64, output_final_state=True)
    at_32, final_32 = call(tri.chunked_delta, d, "scalar", True, chunk_size=32, output_final_state=True)
    for a, b in zip(at_64 + [final_64], at_32 + [final_32], strict=True):
        assert torch.equal(a, b)
    compare(d, "scalar", True, "delta f32 C=64 (runs 32)", chunk_size=64)


@pytest.mark.parametrize("delta", [False, True])
def test_chunk_size_above_length(delta):
    """chunk_size >= T is one chunk (the parallel form), as in the torch runtime: BT = min(chunk_size, pow2(T))."""
    compare(make(40, 16, 16, "scalar", delta=delta), "scalar", delta, "one chunk", chunk_size=1024)


def test_non_contiguous_inputs_and_tf32_flag():
    """Strided views are accepted (made contiguous); allow_tf32 only changes the dot precision (not emulated)."""
    d = make(33, 16, 16, "key")
    d = {n: None if x is None else torch.cat([x, x], dim=-1)[..., ::2] for n, x in d.items()}  # stride-2 views
    assert not d["k"].is_contiguous()
    compare(d, "key", False, "linear key strided", chunk_size=16, allow_tf32=True)


def test_bfloat16_runs():
    """bfloat16 inputs: loads upcast to float32, outputs stored in bfloat16 (only the output rounding differs)."""
    d = make(40, 16, 16, "scalar", dtype=torch.bfloat16)
    up = {n: None if x is None else x.to(F64) for n, x in d.items()}
    ref_outs, ref_final = call(ref_rt.chunked_linear, up, "scalar", False, chunk_size=16, output_final_state=True)
    outs, fin = call(tri.chunked_linear, d, "scalar", False, chunk_size=16, output_final_state=True)
    assert outs[0].dtype == torch.bfloat16 and fin.dtype == F32
    assert max(rel(o, r) for o, r in zip(outs, ref_outs, strict=True)) <= 2e-2
    assert rel(fin, ref_final) <= 1e-5


# ---------------------------------------------------------------------------------------------------------
# edges and errors
# ---------------------------------------------------------------------------------------------------------


def test_zero_length_and_no_queries():
    d = make(0, 16, 16, "key")
    outs, fin = call(tri.chunked_linear, d, "key", False, output_final_state=True)
    assert outs[0].shape == (1, 0, 1, 16) and outs[0].dtype == F32 and torch.equal(fin, d["s0"])
    d = make(0, 16, 16, None, delta=True, with_s0=False)
    outs, fin = call(tri.chunked_delta, d, None, True, output_final_state=True)
    assert outs[1].shape == (1, 0, 1, 16) and torch.equal(fin, torch.zeros(1, 1, 16, 16))
    d = make(5, 16, 16, None)
    outs, fin = tri.chunked_linear([], d["k"], d["v"], initial_state=d["s0"], output_final_state=True)
    ref = ref_rt.chunked_linear([], d["k"].double(), d["v"].double(), initial_state=d["s0"].double(),
                                output_final_state=True)[1]
    assert outs == [] and rel(fin, ref) <= 1e-6


def test_block_sizes_checked():
    d = make(20, 48, 48, None, delta=True)
    for kw in [dict(chunk_size=24), dict(chunk_size=8), dict(block_k=8), dict(block_v=48), dict(block_v=0)]:
        with pytest.raises(ValueError, match="power of two >= 16"):
            call(tri.chunked_linear, d, None, False, **kw)
    with pytest.raises(ValueError, match="block_k >= K"):
        call(tri.chunked_delta, d, None, True, block_k=32)


def test_bad_arguments():
    d = make(5, 16, 32, "value", delta=True)
    with pytest.raises(NotImplementedError, match="value"):
        call(tri.chunked_delta, d, "value", True)
    with pytest.raises(ValueError, match="decay_axis"):
        call(tri.chunked_linear, d, "rows", False)
    with pytest.raises(ValueError, match="log_decay"):
        call(tri.chunked_linear, d, None, False)
    with pytest.raises(ValueError, match="shape"):
        call(tri.chunked_linear, d, "key", False)
    with pytest.raises(ValueError, match="beta"):
        tri.chunked_delta([], d["k"], d["v"], d["beta"][:, :3])
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        tri.chunked_linear([], d["k"].double(), d["v"].double())


def test_kernel_source_rules():
    """The GPU's rules the interpreter does not enforce, checked on the source: masks on every load and store,
    an explicit dot precision, no tl.make_block_ptr (gone in Triton 3.9), no .to() on loop variables, no autotune."""
    import inspect
    import re

    src = inspect.getsource(tri)
    code = src[src.index("@triton.jit"):]  # past the module docstring
    for m in re.finditer(r"tl\.(load|store)\(", code):
        depth, i = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(code[i], 0)
            i += 1
        assert "mask=" in code[m.start():i], code[m.start():i]
    assert code.count("tl.dot(") == code.count("input_precision=PREC") > 0
    assert "make_block_ptr" not in code and "autotune" not in code
    for var in re.findall(r"for (\w+) in range", code):
        assert not re.search(rf"\b{var}\.to\(", code), var
