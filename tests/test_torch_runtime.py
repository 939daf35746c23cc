"""The torch runtime's forms against a naive per-step loop in float64 (relative error ||x - ref|| / ||ref||).

Run as a script (`python -m tests.test_torch_runtime`) for a one-off CPU timing of chunked vs recurrent forms.
"""

import math
import time

import pytest
import torch

from codegen.torch_runtime import (
    chunked_delta,
    chunked_dplr,
    chunked_linear,
    recurrent_delta,
    recurrent_linear,
    scan_diagonal,
)

F64 = torch.float64
AXES = [None, "scalar", "key", "value"]
DELTA_AXES = [None, "scalar", "key"]
LENGTHS = [1, 37, 100]
DIMS = [(8, 12), (16, 16)]
B, H = 2, 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The shapes here are tiny: intra-op threads only add synchronisation (several times slower on a busy box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


# ---------------------------------------------------------------------------------------------------------
# naive references: one step at a time, the transition written out as a matrix
# ---------------------------------------------------------------------------------------------------------


def decay_matrix(g: torch.Tensor | None, axis: str | None, K: int, V: int, state: torch.Tensor) -> torch.Tensor:
    """D_t applied to a state [B, H, K, V]; g is the step's log decay."""
    if axis is None:
        return state
    if axis == "scalar":
        return torch.exp(g)[..., None, None] * state
    if axis == "key":
        return torch.diag_embed(torch.exp(g)) @ state
    return state @ torch.diag_embed(torch.exp(g))


def naive(queries, k, v, beta=None, log_decay=None, axis=None, s0=None):
    """S_t = (I - beta_t k_t k_t^T) D_t S_{t-1} + k_t v_t^T (beta None: no (I - beta k k^T) factor)."""
    Bn, T, Hn, K = k.shape
    V = v.shape[-1]
    state = torch.zeros(Bn, Hn, K, V, dtype=k.dtype) if s0 is None else s0.clone()
    outs = [[] for _ in queries]
    eye = torch.eye(K, dtype=k.dtype)
    for t in range(T):
        prev = state
        state = decay_matrix(None if log_decay is None else log_decay[:, t], axis, K, V, state)
        kt = k[:, t]
        if beta is not None:
            proj = eye - beta[:, t, :, None, None] * kt[..., :, None] * kt[..., None, :]  # [B, H, K, K]
            state = proj @ state
        state = state + kt[..., :, None] * v[:, t, :, None, :]
        for (q, exclusive), out in zip(queries, outs, strict=True):
            out.append(torch.einsum("bhk,bhkv->bhv", q[:, t], prev if exclusive else state))
    return [torch.stack(o, dim=1) for o in outs], state


def make(T, K, V, axis, seed=0, dtype=F64, low=-5.0, delta=False, B=B, H=H):
    """Random inputs: two queries (exclusive, inclusive), k (L2-normalised for delta), v, beta, log decay, s0."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    k = rnd(B, T, H, K)
    if delta:
        k = k / k.norm(dim=-1, keepdim=True)
    v = rnd(B, T, H, V)
    q1, q2 = rnd(B, T, H, K), rnd(B, T, H, K)
    beta = torch.rand(B, T, H, generator=gen, dtype=F64) * 0.98 + 0.01
    shape = {None: None, "scalar": (B, T, H), "key": (B, T, H, K), "value": (B, T, H, V)}[axis]
    g = None if shape is None else torch.rand(*shape, generator=gen, dtype=F64) * low
    s0 = rnd(B, H, K, V)

    def cast(x):
        return None if x is None else x.to(dtype)

    return dict(q1=cast(q1), q2=cast(q2), k=cast(k), v=cast(v), beta=cast(beta), g=cast(g), s0=cast(s0))


def reference(d, axis, delta):
    def up(x):
        return None if x is None else x.double()

    queries = [(up(d["q1"]), True), (up(d["q2"]), False)]
    beta = up(d["beta"]) if delta else None
    return naive(queries, up(d["k"]), up(d["v"]), beta, up(d["g"]), axis, up(d["s0"]))


def run_linear(fn, d, axis, **kw):
    queries = [(d["q1"], True), (d["q2"], False)]
    return fn(queries, d["k"], d["v"], d["g"], axis, d["s0"], output_final_state=True, **kw)


def run_delta(fn, d, axis, **kw):
    queries = [(d["q1"], True), (d["q2"], False)]
    return fn(queries, d["k"], d["v"], d["beta"], d["g"], axis, d["s0"], output_final_state=True, **kw)


def check(outs, final, ref_outs, ref_final, tol):
    errs = [rel(o, r) for o, r in zip(outs, ref_outs, strict=True)] + [rel(final, ref_final)]
    assert all(torch.isfinite(o).all() for o in outs) and torch.isfinite(final).all()
    assert max(errs) <= tol, errs


# ---------------------------------------------------------------------------------------------------------
# float64 exactness
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("KV", DIMS)
@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("chunk", [16, 64, 1024])
def test_chunked_linear_float64(chunk, axis, T, KV):
    d = make(T, *KV, axis)
    ref = reference(d, axis, False)
    outs, final = run_linear(chunked_linear, d, axis, chunk_size=chunk)
    assert outs[0].dtype == F64 and outs[0].shape == (B, T, H, KV[1]) and final.shape == (B, H, *KV)
    check(outs, final, *ref, 1e-10)


@pytest.mark.parametrize("KV", DIMS)
@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("axis", DELTA_AXES)
@pytest.mark.parametrize("chunk", [16, 64, 1024])
def test_chunked_delta_float64(chunk, axis, T, KV):
    d = make(T, *KV, axis, delta=True)
    ref = reference(d, axis, True)
    outs, final = run_delta(chunked_delta, d, axis, chunk_size=chunk)
    check(outs, final, *ref, 1e-10)


@pytest.mark.parametrize("KV", DIMS)
@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("axis", AXES)
def test_recurrent_float64(axis, T, KV):
    d = make(T, *KV, axis, delta=True)
    check(*run_linear(recurrent_linear, d, axis), *reference(d, axis, False), 1e-12)
    check(*run_delta(recurrent_delta, d, axis), *reference(d, axis, True), 1e-12)


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("T_chunk", [(100, 24), (300, 1000), (5, 3)])
def test_odd_chunk_sizes_and_long_parallel(axis, T_chunk):
    """Chunks that are not a power of two (leaf blocks of 3 or 4 steps) and a parallel form over T = 300."""
    T, chunk = T_chunk
    d = make(T, 8, 12, axis, delta=True)
    check(*run_linear(chunked_linear, d, axis, chunk_size=chunk), *reference(d, axis, False), 1e-10)
    if axis != "value":
        check(*run_delta(chunked_delta, d, axis, chunk_size=chunk), *reference(d, axis, True), 1e-10)


@pytest.mark.parametrize("axis", AXES)
def test_no_initial_state_no_final(axis):
    d = make(20, 8, 12, axis)
    d["s0"] = None
    ref_outs, _ = naive([(d["q2"], False)], d["k"], d["v"], None, d["g"], axis)
    outs, final = chunked_linear([(d["q2"], False)], d["k"], d["v"], d["g"], axis, chunk_size=16)
    assert final is None and rel(outs[0], ref_outs[0]) <= 1e-10


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("chunk", [16, 64])
def test_strong_decay_finite(axis, chunk):
    """log decays of -20 per step: nothing overflows, values and gradients stay finite and exact."""
    d = make(100, 8, 12, axis, low=-20.0, delta=True)
    check(*run_linear(chunked_linear, d, axis, chunk_size=chunk), *reference(d, axis, False), 1e-10)
    if axis != "value":
        check(*run_delta(chunked_delta, d, axis, chunk_size=chunk), *reference(d, axis, True), 1e-10)
    if axis is not None:
        g = d["g"].clone().requires_grad_()
        outs, final = chunked_linear([(d["q1"], True), (d["q2"], False)], d["k"], d["v"], g, axis, d["s0"],
                                     chunk_size=chunk, output_final_state=True)
        (outs[0].sum() + outs[1].sum() + final.sum()).backward()
        assert torch.isfinite(g.grad).all()
    if axis in ("scalar", "key"):
        g = d["g"].clone().requires_grad_()
        outs, final = chunked_delta([(d["q1"], True), (d["q2"], False)], d["k"], d["v"], d["beta"], g, axis,
                                    d["s0"], chunk_size=chunk, output_final_state=True)
        (outs[0].sum() + outs[1].sum() + final.sum()).backward()
        assert torch.isfinite(g.grad).all()


def test_zero_length():
    d = make(0, 8, 12, "key")
    outs, final = run_linear(chunked_linear, d, "key")
    assert outs[0].shape == (B, 0, H, 12) and torch.equal(final, d["s0"])
    outs, final = run_delta(chunked_delta, make(0, 8, 12, None), None)
    assert outs[1].shape == (B, 0, H, 12)
    outs, _ = run_linear(recurrent_linear, d, "key")
    assert outs[0].shape == (B, 0, H, 12)


def test_value_decay_delta_not_implemented():
    d = make(5, 8, 12, "value", delta=True)
    with pytest.raises(NotImplementedError, match="value"):
        run_delta(chunked_delta, d, "value")


def test_bad_arguments():
    d = make(5, 8, 12, "key")
    with pytest.raises(ValueError, match="decay_axis"):
        chunked_linear([], d["k"], d["v"], d["g"], "rows")
    with pytest.raises(ValueError, match="log_decay"):
        chunked_linear([], d["k"], d["v"], d["g"], None)
    with pytest.raises(ValueError, match="shape"):
        chunked_linear([], d["k"], d["v"], d["g"], "value")


# ---------------------------------------------------------------------------------------------------------
# lower precision
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", AXES)
def test_float32(axis):
    d = make(100, 16, 16, axis, dtype=torch.float32, low=-1.0, delta=True)
    outs, final = run_linear(chunked_linear, d, axis, chunk_size=64)
    assert outs[0].dtype == torch.float32
    check(outs, final, *reference(d, axis, False), 1e-5)
    check(*run_linear(recurrent_linear, d, axis), *reference(d, axis, False), 1e-5)
    check(*run_delta(recurrent_delta, d, axis), *reference(d, axis, True), 1e-5)
    if axis != "value":
        check(*run_delta(chunked_delta, d, axis, chunk_size=64), *reference(d, axis, True), 1e-5)


@pytest.mark.parametrize("axis", ["scalar", "key", "value"])
def test_float32_strong_decay(axis):
    d = make(100, 16, 16, axis, dtype=torch.float32, low=-5.0, delta=True)
    check(*run_linear(chunked_linear, d, axis, chunk_size=64), *reference(d, axis, False), 1e-5)
    if axis != "value":
        check(*run_delta(chunked_delta, d, axis, chunk_size=64), *reference(d, axis, True), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32(dtype):
    d = make(37, 8, 12, "key", dtype=dtype, low=-1.0, delta=True)
    outs, final = run_linear(chunked_linear, d, "key", chunk_size=16)
    assert outs[0].dtype == torch.float32 and final.dtype == torch.float32
    check(outs, final, *reference(d, "key", False), 1e-5)  # inputs are exact in float64; only float32 rounding
    outs, final = run_delta(chunked_delta, d, "key", chunk_size=16)
    assert outs[0].dtype == torch.float32
    check(outs, final, *reference(d, "key", True), 1e-5)


# ---------------------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------------------


def test_gradcheck_chunked_linear_key():
    d = make(11, 3, 4, "key", seed=1, low=-2.0, B=1, H=1)
    d = {n: x.requires_grad_() for n, x in d.items()}

    def f(q1, q2, k, v, g, s0):
        outs, final = chunked_linear([(q1, True), (q2, False)], k, v, g, "key", s0, chunk_size=6,
                                     output_final_state=True)
        return outs[0], outs[1], final

    # T = 11, C = 6: two chunks of two leaf blocks of 3 steps (the next test has one-step leaves, 5 levels)
    assert torch.autograd.gradcheck(f, (d["q1"], d["q2"], d["k"], d["v"], d["g"], d["s0"]))


def test_gradcheck_chunked_linear_key_subchunks():
    d = make(40, 3, 4, "key", seed=2, low=-2.0, B=1, H=1)
    d = {n: x.requires_grad_() for n, x in d.items()}

    def f(q1, k, v, g):
        outs, final = chunked_linear([(q1, True)], k, v, g, "key", None, chunk_size=32, output_final_state=True)
        return outs[0], final

    assert torch.autograd.gradcheck(f, (d["q1"], d["k"], d["v"], d["g"]), fast_mode=True)


def test_gradcheck_chunked_delta_scalar():
    d = make(11, 3, 4, "scalar", seed=3, low=-2.0, delta=True, B=1, H=1)
    d = {n: x.requires_grad_() for n, x in d.items()}

    def f(q1, q2, k, v, beta, g, s0):
        outs, final = chunked_delta([(q1, True), (q2, False)], k, v, beta, g, "scalar", s0, chunk_size=6,
                                    output_final_state=True)
        return outs[0], outs[1], final

    assert torch.autograd.gradcheck(f, (d["q1"], d["q2"], d["k"], d["v"], d["beta"], d["g"], d["s0"]))


@pytest.mark.parametrize("axis", ["key", "value"])
def test_grads_match_naive_linear(axis):
    d = make(37, 8, 12, axis, seed=4)
    leaves = {n: x.clone().requires_grad_() for n, x in d.items() if n != "beta"}
    outs, final = chunked_linear([(leaves["q1"], True), (leaves["q2"], False)], leaves["k"], leaves["v"],
                                 leaves["g"], axis, leaves["s0"], chunk_size=32, output_final_state=True)
    weights = [torch.randn_like(o) for o in (*outs, final)]
    loss = sum((o * w).sum() for o, w in zip((*outs, final), weights, strict=True))
    grads = torch.autograd.grad(loss, list(leaves.values()))
    ref_leaves = {n: x.clone().requires_grad_() for n, x in d.items() if n != "beta"}
    r_outs, r_final = naive([(ref_leaves["q1"], True), (ref_leaves["q2"], False)], ref_leaves["k"],
                            ref_leaves["v"], None, ref_leaves["g"], axis, ref_leaves["s0"])
    ref_loss = sum((o * w).sum() for o, w in zip((*r_outs, r_final), weights, strict=True))
    ref_grads = torch.autograd.grad(ref_loss, list(ref_leaves.values()))
    for name, g, r in zip(leaves, grads, ref_grads, strict=True):
        assert rel(g, r) <= 1e-8, name


def test_grads_match_naive_delta_key():
    d = make(37, 8, 12, "key", seed=5, delta=True)
    leaves = {n: x.clone().requires_grad_() for n, x in d.items()}
    args = ("q1", "q2", "k", "v", "beta", "g", "s0")

    def loss_of(fn, x, weights=None):
        outs, final = fn(x)
        ws = weights or [torch.randn_like(o) for o in (*outs, final)]
        return sum((o * w).sum() for o, w in zip((*outs, final), ws, strict=True)), ws

    def chunked(x):
        return chunked_delta([(x["q1"], True), (x["q2"], False)], x["k"], x["v"], x["beta"], x["g"], "key",
                             x["s0"], chunk_size=32, output_final_state=True)

    def ref(x):
        return naive([(x["q1"], True), (x["q2"], False)], x["k"], x["v"], x["beta"], x["g"], "key", x["s0"])

    loss, ws = loss_of(chunked, leaves)
    grads = torch.autograd.grad(loss, [leaves[a] for a in args])
    ref_leaves = {n: x.clone().requires_grad_() for n, x in d.items()}
    ref_loss, _ = loss_of(ref, ref_leaves, ws)
    ref_grads = torch.autograd.grad(ref_loss, [ref_leaves[a] for a in args])
    for name, g, r in zip(args, grads, ref_grads, strict=True):
        assert rel(g, r) <= 1e-8, name


# ---------------------------------------------------------------------------------------------------------
# scan
# ---------------------------------------------------------------------------------------------------------


def naive_dplr(queries, k, v, a, b, log_decay, axis, s0):
    """S_t = (D_t + b_t a_t^T) S_{t-1} + k_t v_t^T one step at a time, in float64."""
    S = s0.clone()
    outs = [[] for _ in queries]
    for t in range(k.shape[1]):
        for (q, exclusive), out in zip(queries, outs, strict=True):
            if exclusive:
                out.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
        D = 1.0 if axis is None else torch.exp(log_decay[:, t])[..., None] if axis == "key" else \
            torch.exp(log_decay[:, t])[..., None, None]
        u = torch.einsum("bhk,bhkv->bhv", a[:, t], S)
        S = D * S + b[:, t, ..., None] * u[..., None, :] + k[:, t, ..., None] * v[:, t, ..., None, :]
        for (q, exclusive), out in zip(queries, outs, strict=True):
            if not exclusive:
                out.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return [torch.stack(o, 1) for o in outs], S


@pytest.mark.parametrize("axis", [None, "scalar", "key"])
@pytest.mark.parametrize("T,chunk", [(1, 16), (45, 8), (45, 16), (64, 64), (70, 32)])
def test_chunked_dplr_matches_the_step_loop(axis, T, chunk):
    gen = torch.Generator().manual_seed(T + chunk)
    B, H, K, V = 2, 2, 5, 6

    def draw(*shape, scale=0.4):
        return scale * torch.randn(*shape, generator=gen, dtype=F64)

    q, p, k, a, b = (draw(B, T, H, K) for _ in range(5))
    v, s0 = draw(B, T, H, V, scale=1.0), draw(B, H, K, V, scale=1.0)
    g = None if axis is None else -torch.rand(*((B, T, H, K) if axis == "key" else (B, T, H)), generator=gen,
                                             dtype=F64) * 3
    queries = [(q, False), (p, True)]
    (o, po), S = chunked_dplr(queries, k, v, a, b, g, axis, s0, chunk, output_final_state=True)
    (ro, rpo), rS = naive_dplr(queries, k, v, a, b, g, axis, s0)
    assert max(rel(o, ro), rel(po, rpo), rel(S, rS)) <= 1e-12
    (o32,), S32 = chunked_dplr([(q.float(), False)], k.float(), v.float(), a.float(), b.float(),
                               None if g is None else g.float(), axis, s0.float(), chunk, output_final_state=True)
    assert o32.dtype == torch.float32 and max(rel(o32, ro), rel(S32, rS)) <= 1e-5


def test_chunked_dplr_checks_its_arguments():
    k = torch.zeros(1, 4, 1, 3)
    v = torch.zeros(1, 4, 1, 2)
    with pytest.raises(ValueError, match="b must have shape"):
        chunked_dplr([], k, v, k, torch.zeros(1, 4, 1, 2))
    with pytest.raises(NotImplementedError, match="decay_axis"):
        chunked_dplr([], k, v, k, k, torch.zeros(1, 4, 1, 2), "value")


def naive_scan(a, b, s0):
    s = torch.zeros_like(b[:, 0]) if s0 is None else s0
    out = []
    for t in range(b.shape[1]):
        s = a[:, t] * s + b[:, t]
        out.append(s)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("T", [1, 37, 100, 300])
@pytest.mark.parametrize("broadcast", [False, True])
@pytest.mark.parametrize("with_s0", [False, True])
def test_scan_diagonal(T, broadcast, with_s0):
    gen = torch.Generator().manual_seed(T)
    b = torch.randn(B, T, H, 8, 5, generator=gen, dtype=F64)
    a = torch.rand(B, T, H, 8, 1 if broadcast else 5, generator=gen, dtype=F64) * 2.2 - 1.1  # any sign
    s0 = torch.randn(B, H, 8, 5, generator=gen, dtype=F64) if with_s0 else None
    s = scan_diagonal(a, b, s0)
    assert s.shape == b.shape and rel(s, naive_scan(a, b, s0)) <= 1e-10


def test_scan_diagonal_grads_and_float32():
    gen = torch.Generator().manual_seed(0)
    a = (torch.rand(1, 70, 1, 2, 1, generator=gen, dtype=F64) * 2 - 1).requires_grad_()
    b = torch.randn(1, 70, 1, 2, 2, generator=gen, dtype=F64, requires_grad=True)
    s0 = torch.randn(1, 1, 2, 2, generator=gen, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(scan_diagonal, (a, b, s0), fast_mode=True)
    s32 = scan_diagonal(a.detach().float(), b.detach().float(), s0.detach().float())
    assert s32.dtype == torch.float32 and rel(s32, naive_scan(a, b, s0).detach()) <= 1e-5
    s16 = scan_diagonal(a.detach().half(), b.detach().half())
    assert s16.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------
# one-off timing (not a test)
# ---------------------------------------------------------------------------------------------------------


def _bench(fn, repeat):
    """Best wall-clock time of `repeat` runs after one warm-up (min filters out a shared machine's noise)."""
    fn()
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    """Chunked vs recurrent on B=2, H=4, T=4096, K=V=64, float32, forward only, at 1 thread and the default."""
    torch.manual_seed(0)
    Bb, Hb, T, K = 2, 4, 4096, 64
    q, k, v = (torch.randn(Bb, T, Hb, K) for _ in range(3))
    kn = k / k.norm(dim=-1, keepdim=True)
    g = torch.nn.functional.logsigmoid(torch.randn(Bb, T, Hb, K)) / 16
    beta = torch.rand(Bb, T, Hb)
    y = beta[..., None] * v
    qs = [(q, False)]
    cases = {
        "chunked_linear key C=64": lambda: chunked_linear(qs, k, v, g, "key"),
        "recurrent_linear key": lambda: recurrent_linear(qs, k, v, g, "key"),
        "chunked_delta none C=64": lambda: chunked_delta(qs, kn, y, beta),
        "recurrent_delta none": lambda: recurrent_delta(qs, kn, y, beta),
    }
    default = torch.get_num_threads()
    for threads in sorted({1, default}):
        torch.set_num_threads(threads)
        with torch.no_grad():
            times = {name: _bench(fn, 5) for name, fn in cases.items()}
        print(f"threads={threads} B={Bb} H={Hb} T={T} K=V={K} float32, forward, best of 5")
        for name, t in times.items():
            print(f"  {name:26s} {t * 1e3:8.1f} ms")
        print(f"  linear: recurrent / chunked = {times['recurrent_linear key'] / times['chunked_linear key C=64']:.1f}x"
              f"   delta: recurrent / chunked = "
              f"{times['recurrent_delta none'] / times['chunked_delta none C=64']:.1f}x")
    torch.set_num_threads(default)


if __name__ == "__main__":
    main()


@pytest.mark.parametrize("form", ["linear", "delta", "dplr"])
@pytest.mark.parametrize("T", [0, 16, 45])
def test_no_initial_state_is_a_zero_start(form, T):
    """initial_state=None starts from zero without allocating it (one chunk: no start state is read at all; a
    packed batch of short sequences runs so): outputs, final state and gradients equal a zero initial state's."""
    d = make(T, 8, 12, "key", delta=True, dtype=torch.float32)
    a = (d["q1"] * 0.3).requires_grad_()  # the DPLR class's read and write vectors
    leaves = [d["k"].requires_grad_(), d["v"].requires_grad_(), d["g"].requires_grad_()]
    queries = [(d["q1"], True), (d["q2"], False)]

    def run(s0):
        if form == "linear":
            outs, final = chunked_linear(queries, d["k"], d["v"], d["g"], "key", s0, 16, output_final_state=True)
        elif form == "delta":
            outs, final = chunked_delta(queries, d["k"], d["v"], d["beta"], d["g"], "key", s0, 16,
                                        output_final_state=True)
        else:
            outs, final = chunked_dplr(queries, d["k"], d["v"], a, -a, d["g"], "key", s0, 16, output_final_state=True)
        grads = torch.autograd.grad(sum(o.sum() for o in outs) + final.square().sum(), leaves + [a],
                                    allow_unused=True) if T else []
        return outs + [final] + [g for g in grads if g is not None]

    got, want = run(None), run(torch.zeros_like(d["s0"]))
    assert len(got) == len(want) and all(torch.equal(x, y) for x, y in zip(got, want, strict=True))
