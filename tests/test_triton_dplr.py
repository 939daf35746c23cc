"""The diagonal-plus-rank-one class's chunked Triton form (RWKV-7; issues 10 and 9), in Triton's interpreter.

Forward: `codegen.triton_runtime.chunked_dplr` (the WY-like solve per chunk, one state pass, the outputs over the
(k, v) and (b, U) pairs) against a float64 step-by-step loop of S_t = (D_t + b_t a_t^T) S_{t-1} + k_t v_t^T: outputs,
final state and the state entering every chunk, for no decay, a scalar and a key decay, inclusive and exclusive
queries, a last chunk that is partly padding, and reset decays (-inf and -1e4 log decays, exact).
Backward: the generated rwkv7 layer's `backend="triton", form="chunked"` trains through the recurrent form's derived
Triton adjoint, fed the chunked forward's chunk-start states as its checkpoints. Its gradients of every input, param
and the initial state (with an incoming final-state gradient) match the float64 reference's autograd to 1e-5
(float32), with every torch form of the module made to raise, also under `cu_seqlens` (every sequence in one call:
the kernels read the boundaries, the adjoint's checkpoints are each sequence's chunk starts; against one call per
sequence too) and for no steps; `form="auto"` picks it where it picks chunked. Relative errors: ||x - ref|| / ||ref||.
"""

from __future__ import annotations

import sys

import pytest
import torch

import recurrence_dsl
from recurrence_dsl.sampling import sample_arguments

from .conftest import REPO, made_by

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402, F401  (visible to the @triton.jit helper below)

from codegen import triton_runtime as tr  # noqa: E402  (after the interpreter is set by conftest)

TOL = 1e-5
REC = recurrence_dsl.load(REPO / "specs" / "rwkv7.rec")["rwkv7"]
SIZES = {"K": 16, "V": 16}
# the generated module's torch forms: none may run on the Triton chunked path, forward or backward
TORCH_FORMS = ("recurrent_loop", "recurrent_adjoint", "chunked")
TORCH_RUNTIME = ("chunked_dplr_by", "chunked_linear_by", "chunked_delta_by")


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _steps(queries, k, v, a, b, log_decay, axis, s0, chunk):
    """float64 step loop: (outputs, final state, the state entering every chunk of `chunk` steps)."""
    B, T, H, K = k.shape
    S = s0.double().clone()
    outs = [torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64) for _ in queries]
    starts = []
    for t in range(T):
        if t % chunk == 0:
            starts.append(S.clone())
        if axis is None:
            D = torch.ones(B, H, K, 1, dtype=torch.float64)
        elif axis == "scalar":
            D = torch.exp(log_decay[:, t].double())[..., None, None].expand(B, H, K, 1)
        else:
            D = torch.exp(log_decay[:, t].double())[..., None]
        new = D * S + b[:, t, ..., None].double() * (a[:, t, :, None, :].double() @ S) \
            + k[:, t, ..., None].double() * v[:, t, :, None, :].double()
        for o, (q, exclusive) in zip(outs, queries):
            o[:, t] = (q[:, t, :, None, :].double() @ (S if exclusive else new))[..., 0, :]
        S = new
    return outs, S, torch.stack(starts, dim=2) if starts else S.new_zeros(B, H, 0, K, v.shape[-1])


def _inputs(axis, B=1, T=37, H=2, K=16, V=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(B, T, H, K, generator=gen) * 0.3
    v = torch.randn(B, T, H, V, generator=gen)
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    lr = torch.rand(B, T, H, K, generator=gen)  # RWKV-7's in-context learning rate in (0, 1)
    q = torch.randn(B, T, H, K, generator=gen)
    shape = {None: None, "scalar": (B, T, H), "key": (B, T, H, K)}[axis]
    g = None if shape is None else -torch.rand(shape, generator=gen) * 0.5
    s0 = torch.randn(B, H, K, V, generator=gen)
    return q, k, v, kk, -lr * kk, g, s0


@pytest.mark.parametrize("axis,exclusive", [(None, False), ("scalar", True), ("key", False), ("key", True)])
def test_forward_matches_the_step_loop(axis, exclusive):
    """Outputs, final state and chunk-start states; T = 37 is chunks of 16 + 16 + 5 (the last partly padding)."""
    q, k, v, a, b, g, s0 = _inputs(axis)
    (o,), S, h = tr.chunked_dplr([(q, exclusive)], k, v, a, b, g, axis, s0, 16, True, output_chunk_states=True)
    (ro,), rS, rh = _steps([(q, exclusive)], k, v, a, b, g, axis, s0, 16)
    errors = {"o": _rel(o, ro), "S": _rel(S, rS), "h": _rel(h, rh)}
    print(axis, exclusive, {n: f"{e:.1e}" for n, e in errors.items()})
    assert h.shape == (1, 2, 3, 16, 16) and o.dtype == torch.float32 and S.dtype == torch.float32
    assert max(errors.values()) <= TOL, errors


def test_reset_decays_are_exact():
    """Log decays of -inf (a reset: exp = 0 exactly) and -1e4 at some steps and channels, a small one after them:
    every decay factor spanning a reset is 0, the others keep float32's accuracy."""
    q, k, v, a, b, g, s0 = _inputs("key", T=33, seed=3)
    g[:, 5, :, :4] = -float("inf")
    g[:, 20, 1] = -float("inf")
    g[:, 9, 0, 8:] = -1e4
    g[:, 10:12] = -1e-4
    (o,), S = tr.chunked_dplr([(q, False)], k, v, a, b, g, "key", s0, 16, True)
    (ro,), rS, _ = _steps([(q, False)], k, v, a, b, g, "key", s0, 16)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    assert _rel(o, ro) <= TOL and _rel(S, rS) <= TOL, (_rel(o, ro), _rel(S, rS))


def test_runtime_checks_its_arguments_and_refuses_autograd():
    q, k, v, a, b, g, s0 = _inputs(None, T=5)
    with pytest.raises(ValueError, match=r"b must have k's shape"):
        tr.chunked_dplr([], k, v, a, b[..., :8])
    with pytest.raises(NotImplementedError, match="decay_axis None, 'scalar' or 'key'"):
        tr.chunked_dplr([], k, v, a, b, torch.zeros(1, 5, 2, 16), "value")
    wide = torch.randn(1, 5, 2, 32)  # K = 32 keys: the state program holds whole columns of S
    with pytest.raises(ValueError, match="block_k >= K"):
        tr.chunked_dplr([], wide, v, wide, wide, block_k=16)
    with pytest.raises(NotImplementedError, match="derived adjoint"):
        tr.chunked_dplr([(q, False)], k.requires_grad_(), v, a, b)


def test_chunk_every_is_the_chunk_length():
    """The adjoint's checkpoints fall where the forward's chunks start: BT = min(chunk_size, pow2(T) >= 16)."""
    assert tr.chunk_every(37, {"chunk_size": 16}) == 16
    assert tr.chunk_every(5, {"chunk_size": 64}) == 16
    assert tr.chunk_every(100, {"chunk_size": 64}) == 64
    assert tr.chunk_every(100, {}) == 64


def _layer(monkeypatch):
    """The rwkv7 layer on the Triton backend, with its module's torch forms and torch runtime made to raise."""
    layer = recurrence_dsl.compile(REC, backend="triton", form="chunked", tuning=False)
    module = sys.modules[type(layer).__module__]

    def refuse(*args, **kwargs):
        raise AssertionError("a torch form of the recurrence ran on the Triton path")

    for form in TORCH_FORMS:
        fn = getattr(module, f"rwkv7__{form}")
        monkeypatch.setattr(fn, "__code__", refuse.__code__)  # every reference to it (closures too) raises
    for name in TORCH_RUNTIME:
        if hasattr(module, name):
            monkeypatch.setattr(module, name, refuse)
    return layer


def _grads(fn, args, s0, weights=None, **kwargs):
    """Gradients of every argument and the initial state for sum(w * output) + sum(w * final state)."""
    leaves = [x.detach().clone().requires_grad_() for x in args]
    init = s0.detach().clone().requires_grad_()
    out, final = fn(*leaves, initial_state=init, output_final_state=True, **kwargs)
    if weights is None:
        gen = torch.Generator().manual_seed(5)
        weights = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in (out, final)]
    ((out.double() * weights[0]).sum() + (final.double() * weights[1]).sum()).backward()
    return [x.grad for x in leaves] + [init.grad], weights, out


NAMES = [s.name for s in REC.checked.inputs + REC.checked.params] + ["initial_state"]


def _compare(monkeypatch, batch, length, layer=None, **call) -> dict[str, float]:
    rows = None if "cu_seqlens" not in call else len(call["cu_seqlens"]) - 1
    args, s0 = sample_arguments(REC.checked, SIZES, batch, length, 2, dtype=torch.float64, seed=2,
                                with_initial_state=True, rows=rows)
    ref, weights, _ = _grads(REC.reference, args, s0, **call)
    layer = layer if layer is not None else _layer(monkeypatch)
    got, _, out = _grads(layer, [x.float() for x in args], s0.float(), weights, chunk_size=16, **call)
    assert "_AdjointBackward" in type(made_by(out)).__name__  # the derived backward, not a torch re-run
    for n, g, r in zip(NAMES, got, ref):
        assert g is not None and g.shape == r.shape, n
    return {n: _rel(g, r) for n, g, r in zip(NAMES, got, ref)}


class _Grids:
    """A kernel whose launches record their grids (the interpreter looks the kernel up at each launch)."""

    def __init__(self, kernel, grids: list):
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]


def test_gradients_through_the_adjoint(monkeypatch):
    """Every input's, the param's and the initial state's gradient (with the final state's); T = 37: three chunks
    of 16 + 16 + 5 steps, so the adjoint gets three checkpoints, the chunk-start states, 16 steps apart, and runs
    chunk-parallel: each of its three launches has a program per (batch * head, V tile, chunk), 2 x 1 x 3, around
    one scan over the chunks (a program per (batch * head, V tile))."""
    layer = _layer(monkeypatch)
    run = layer.triton_forms["chunked"]
    cell = dict(zip(run.__code__.co_freevars, run.__closure__))["adjoint"]  # with_adjoint's derived backward
    adjoint, seen, grids = cell.cell_contents, [], {}

    def spy(*args, every, **kwargs):
        seen.append((every, [c["S"].shape for c in args[7]]))  # after r, w, k, v, kk, a, u: the checkpoints
        return adjoint(*args, every=every, **kwargs)

    monkeypatch.setattr(cell, "cell_contents", spy)
    module = sys.modules[type(layer).__module__]
    for name in ("rwkv7__triton_recurrent_adjoint_kernel", "rwkv7__triton_segment_scan_kernel"):
        monkeypatch.setattr(module, name, _Grids(getattr(module, name), grids.setdefault(name, [])))
    errors = _compare(monkeypatch, 1, 37, layer=layer)
    print({n: f"{e:.1e}" for n, e in errors.items()}, grids)
    assert seen == [(16, [(1, 2, 16, 16)] * 3)]
    assert grids == {"rwkv7__triton_recurrent_adjoint_kernel": [(2, 1, 3)] * 3,
                     "rwkv7__triton_segment_scan_kernel": [(2, 1)]}
    assert max(errors.values()) <= TOL, errors


def test_segmented_adjoint_equals_the_sequential_one(monkeypatch):
    """The derived adjoint's two modes on the same checkpoints (the chunk starts, every 16 steps; T = 40, V = 48:
    two V tiles, the second half padding; one head): the chunk-parallel one (segments=True) gives the sequential
    one's gradients to float32 rounding, on two rows and on packed sequences (three, one empty), these also with
    fewer programs than chunks (two segment lanes, as past the scratch cap: each program takes its chunks in turn)."""
    layer = recurrence_dsl.compile(REC, backend="triton", form="chunked", tuning=False)
    module = sys.modules[type(layer).__module__]
    sizes = {"K": 16, "V": 48}
    for cu in (None, torch.tensor([0, 23, 23, 40])):
        rows = 2 if cu is None else 1
        args, s0 = sample_arguments(REC.checked, sizes, rows, 40, 1, dtype=torch.float32, seed=11,
                                    with_initial_state=True, rows=None if cu is None else 3)
        options = {} if cu is None else {"cu_seqlens": cu}
        _, final, checkpoints = module.rwkv7__chunked_triton(*args, {"S": s0}, 16, 48, chunk_size=16, every=16,
                                                             **options)
        gen = torch.Generator().manual_seed(12)
        do = {"o": torch.randn(rows, 40, 1, 48, generator=gen)}
        dS = {"S": torch.randn(final["S"].shape, generator=gen)}
        results = [module.rwkv7__triton_recurrent_adjoint(*args, checkpoints, do, dS, 16, 48, every=16,
                                                          segments=segments, **options)
                   for segments in (False, True)]
        if cu is not None:  # two segment lanes for four chunks: packed only, the harder case
            with monkeypatch.context() as patch:
                patch.setattr(module, "rwkv7__segment_lanes", lambda segments, programs, slot: 2)
                results.append(module.rwkv7__triton_recurrent_adjoint(*args, checkpoints, do, dS, 16, 48,
                                                                       every=16, segments=True, **options))
        (seq, seq_s), *others = results
        for par, par_s in others:
            errors = [_rel(p, q) for p, q in zip(par + [par_s["S"]], seq + [seq_s["S"]], strict=True)]
            print(cu, [f"{e:.1e}" for e in errors])
            assert max(errors) <= 1e-6, errors


def test_which_adjoints_are_segmented():
    """`_segmentable`: one [A, F] state whose gradient's map reads no state and nothing over the tiled axis F (the
    DPLR class, the delta rule, a key decay), not Mamba's (its decay exp(dt[d] * A[d, n]) is over the tiled axis)
    or a non-linear state; the mode is printed only where asked (the DPLR chunked form's adjoint)."""
    from codegen.triton_recurrent import TritonAdjointWriter, has_segmented_adjoint
    from recurrence_dsl.adjoint import derive_adjoint
    from recurrence_dsl.analysis import analyse

    found = {}
    for name in ("rwkv7", "gla", "delta_net", "mamba", "minimal_rnn"):
        analysis = analyse(recurrence_dsl.load(REPO / "specs" / f"{name}.rec")[name].checked)
        writer = TritonAdjointWriter(analysis, derive_adjoint(analysis.recurrence, analysis.ir), segments=True)
        writer.write()
        found[name] = (writer.segmented, has_segmented_adjoint(analysis))
    assert found == {"rwkv7": (True, True), "gla": (True, False), "delta_net": (True, False),
                     "mamba": (False, False), "minimal_rnn": (False, False)}


def test_gradients_of_packed_sequences(monkeypatch):
    """cu_seqlens with an empty sequence: one call of the chunked form takes every sequence (its kernels read the
    boundaries), against the float64 reference's autograd."""
    layer = _layer(monkeypatch)
    calls = []
    run = layer.triton_forms["chunked"]

    def counted(*args, **kwargs):
        calls.append(kwargs.get("cu_seqlens") is not None)
        return run(*args, **kwargs)

    counted.run_packed = run.run_packed  # (takes_cu_seqlens)
    monkeypatch.setitem(layer.triton_forms, "chunked", counted)
    errors = _compare(monkeypatch, 1, 21, layer=layer, cu_seqlens=torch.tensor([0, 6, 6, 21]))
    print({n: f"{e:.1e}" for n, e in errors.items()})
    assert calls == [True]
    assert max(errors.values()) <= TOL, errors


PACKED = (5, 1, 0, 17, 3, 33)  # a 1-step and an empty sequence, lengths across one and three chunks of 16


@pytest.mark.parametrize("axis", [None, "scalar", "key"])
def test_packed_chunked_dplr_matches_the_step_loop(axis):
    """`chunked_dplr(..., cu_seqlens=)`: outputs, final states and the chunk-start states of every sequence (in the
    packed layout: sequence n's chunks from _Packed.offsets[n]), each sequence from its own initial state."""
    cu = torch.tensor([0] + torch.tensor(PACKED).cumsum(0).tolist())
    q, k, v, a, b, g, _ = _inputs(axis, T=int(cu[-1]), seed=6)
    s0 = torch.randn(len(PACKED), 2, 16, 16, generator=torch.Generator().manual_seed(7))
    (o,), S, h = tr.chunked_dplr([(q, axis == "scalar")], k, v, a, b, g, axis, s0, 16, True,
                                 output_chunk_states=True, cu_seqlens=cu)
    errors, starts = {}, []
    for n in range(len(PACKED)):
        lo, hi = int(cu[n]), int(cu[n + 1])
        part = [None if x is None else x[:, lo:hi] for x in (q, k, v, a, b, g)]
        (ro,), rS, rh = _steps([(part[0], axis == "scalar")], *part[1:], axis, s0[n:n + 1], 16)
        if hi > lo:
            errors[f"o{n}"] = _rel(o[:, lo:hi], ro)
        errors[f"S{n}"] = _rel(S[n:n + 1], rS)
        starts.append(rh)
    assert h.shape == (1, 2, 1 + 1 + 0 + 2 + 1 + 3, 16, 16) and S.shape == (len(PACKED), 2, 16, 16)
    errors["h"] = _rel(h, torch.cat(starts, dim=2))
    assert max(errors.values()) <= TOL, errors


@triton.jit
def _shifted_product(x, y):
    """b = 0.05 - x * y: a map of two raw inputs that does not keep zeros (a packed call's filler steps get b != 0)."""
    return 0.05 - x * y


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("axis", [None, "scalar", "key"])
def test_b_map_forms_b_where_the_kernels_load_it(axis, packed):
    """`chunked_dplr_by(..., b_map=(map, y))`: b passed raw and formed as map(b, y) by every forward kernel that
    loads it (the WY kernel's scores for no or a scalar decay, the key decay's scores, the state pass and the output
    kernel's second pair) against the float64 step loop on the materialised b, each sequence from its own initial
    state; the map's non-zero value at a packed call's filler steps changes nothing (their a is 0)."""
    lengths = PACKED if packed else [37]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    q, k, v, a, _, g, _ = _inputs(axis, T=int(cu[-1]), seed=8)
    gen = torch.Generator().manual_seed(9)
    lr, s0 = torch.rand(a.shape, generator=gen), torch.randn(len(lengths), 2, 16, 16, generator=gen)
    b = 0.05 - lr.double() * a.double()
    (o,), S, h = tr.chunked_dplr_by(tr._DECAYS[axis], [(q, axis == "scalar")], k, v, a, lr, g, s0, 16, True,
                                    output_chunk_states=True, cu_seqlens=cu if packed else None,
                                    b_map=(_shifted_product, a))
    errors, starts = {}, []
    for n in range(len(lengths)):
        lo, hi = int(cu[n]), int(cu[n + 1])
        part = [None if x is None else x[:, lo:hi] for x in (q, k, v, a, b, g)]
        (ro,), rS, rh = _steps([(part[0], axis == "scalar")], *part[1:], axis, s0[n:n + 1], 16)
        if hi > lo:
            errors[f"o{n}"] = _rel(o[:, lo:hi], ro)
        errors[f"S{n}"] = _rel(S[n:n + 1], rS)
        starts.append(rh)
    errors["h"] = _rel(h, torch.cat(starts, dim=2))
    print(axis, packed, {n: f"{e:.1e}" for n, e in errors.items()})
    assert max(errors.values()) <= TOL, errors


def test_packed_runtime_checks_cu_seqlens():
    q, k, v, a, b, g, _ = _inputs(None, T=9)
    with pytest.raises(ValueError, match="cu_seqlens must run from 0 to T = 9"):
        tr.chunked_dplr([(q, False)], k, v, a, b, cu_seqlens=torch.tensor([0, 4, 8]))
    with pytest.raises(ValueError, match="cu_seqlens must be an int64"):
        tr.chunked_dplr([(q, False)], k, v, a, b, cu_seqlens=torch.tensor([0, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="one row per sequence"):
        tr.chunked_dplr([(q, False)], k, v, a, b, initial_state=torch.zeros(3, 2, 16, 16),
                        cu_seqlens=torch.tensor([0, 4, 9]))
    assert tr.chunk_every(9, {"chunk_size": 64, "cu_seqlens": torch.tensor([0, 4, 9])}) == 16
    assert tr.chunk_every(200, {"chunk_size": 64, "cu_seqlens": torch.tensor([0, 20, 200])}) == 64
    assert tr.chunk_every(200, {"chunk_size": 64, "cu_seqlens": torch.tensor([0, 20, 40, 60])}) == 32


def test_packed_layer_matches_one_call_per_sequence(monkeypatch):
    """The layer on packed sequences (one call, the kernels reading cu_seqlens; the adjoint's checkpoints each
    sequence's chunk starts) against one call per sequence: outputs, final states and the gradients of every input,
    the param and the initial states agree to float32 rounding (float32, the interpreter)."""
    layer = _layer(monkeypatch)
    cu = torch.tensor([0] + torch.tensor(PACKED).cumsum(0).tolist())
    args, s0 = sample_arguments(REC.checked, SIZES, len(PACKED), int(cu[-1]), 1, dtype=torch.float32, seed=8,
                                with_initial_state=True)
    inputs = len(REC.checked.inputs)
    args = [x[:1] if i < inputs else x for i, x in enumerate(args)]

    def run(packed: bool):
        leaves = [x.detach().clone().requires_grad_() for x in args]
        init = s0.detach().clone().requires_grad_()
        if packed:
            out, final = layer(*leaves, initial_state=init, output_final_state=True, cu_seqlens=cu, chunk_size=16)
        else:
            parts = [layer(*[x[:, int(cu[n]):int(cu[n + 1])] if i < inputs else x for i, x in enumerate(leaves)],
                           initial_state=init[n:n + 1], output_final_state=True, chunk_size=16)
                     for n in range(len(PACKED))]
            out, final = torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts])
        gen = torch.Generator().manual_seed(9)
        loss = sum((x.double() * torch.randn(x.shape, generator=gen, dtype=torch.float64)).sum() for x in (out, final))
        loss.backward()
        return [out.detach(), final.detach()] + [x.grad for x in leaves] + [init.grad]

    names = ["o", "final"] + NAMES
    errors = {n: _rel(g, w) for n, g, w in zip(names, run(True), run(False), strict=True)}
    print({n: f"{e:.1e}" for n, e in errors.items()})
    assert max(errors.values()) <= 1e-6, errors


# The class without a decay and with a scalar one (and an exclusive readout), through a generated module: its
# kernels specialised to DECAY 0 / 1 (codegen/specialize.py), the adjoint derived from each body.
BODIES = recurrence_dsl.load_text("""
recurrence dplr_plain(q[K], k[K], v[V], a[K], b[K]) -> o[V] {
    state S[K, V]
    S[i, j] = S[i, j] + b[i] * sum(m, a[m] * S[m, j]) + k[i] * v[j]
    o[j] = sum(i, q[i] * S[i, j])
}
recurrence dplr_scalar(q[K], k[K], v[V], a[K], b[K], g) -> o[V] {
    state S[K, V]
    before[j] = sum(i, q[i] * S[i, j])
    S[i, j] = exp(g) * S[i, j] + b[i] * sum(m, a[m] * S[m, j]) + k[i] * v[j]
    o[j] = sum(i, q[i] * S[i, j]) + before[j]
}
""", "dplr_bodies.rec")


@pytest.mark.parametrize("name,axis", [("dplr_plain", None), ("dplr_scalar", "scalar")])
def test_bodies_without_a_key_decay(name, axis):
    rec = BODIES[name]
    q, k, v, a, b, g, s0 = _inputs(axis, T=21, H=1, seed=4)  # chunks of 16 + 5
    args = [q, k, v, a, b] + ([] if g is None else [g])
    ref, weights, _ = _grads(rec.reference, [x.double() for x in args], s0.double())
    layer = recurrence_dsl.compile(rec, backend="triton", form="chunked", tuning=False)
    got, _, out = _grads(layer, args, s0, weights, chunk_size=16)
    assert "_AdjointBackward" in type(made_by(out)).__name__
    names = ["q", "k", "v", "a", "b"] + ([] if g is None else ["g"]) + ["initial_state"]
    errors = {n: _rel(x, r) for n, x, r in zip(names, got, ref, strict=True)}
    print(name, {n: f"{e:.1e}" for n, e in errors.items()})
    assert max(errors.values()) <= TOL, errors


# An erase along e, a write along another key k (the delta rule writes along e): S = (D - beta e e^T) S + k v^T, the
# class with b = -beta e, a = e and D = 1 (no decay: the plan's log decay absent, as a 0) or a constant scalar decay.
ERASE_WRITE = recurrence_dsl.load_text("""
recurrence erase_write(q[K], e[K], k[K], v[V], beta) -> o[V] {
    state S[K, V]
    S[i, j] = S[i, j] - beta * e[i] * sum(a, e[a] * S[a, j]) + k[i] * v[j]
    o[j] = sum(i, q[i] * S[i, j])
}
recurrence erase_write_scalar(q[K], e[K], k[K], v[V], beta) -> o[V] {
    state S[K, V]
    S[i, j] = 0.9 * S[i, j] - beta * e[i] * sum(a, e[a] * S[a, j]) + k[i] * v[j]
    o[j] = sum(i, q[i] * S[i, j])
}
""", "erase_write.rec")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name,axis", [("erase_write", None), ("erase_write_scalar", "scalar")])
def test_erase_and_write_along_different_keys(name, axis, backend):
    """The chunked form (torch's chunked_dplr_by; Triton's kernels and derived adjoint) of an erase along e with a
    write along k against the float64 reference: the output, and the gradients of every input and the initial
    state (with the final state's); B = 1, T = 24, H = 2, K = V = 8, chunks of 8 (torch) and of 16 + 8 (Triton's
    least chunk: the last partly padding)."""
    from recurrence_dsl.analysis import TransitionClass, analyse

    rec = ERASE_WRITE[name]
    plan = analyse(rec.checked).states["S"]
    assert plan.cls is TransitionClass.DIAGONAL_PLUS_RANK_ONE and plan.chunk.decay_axis == axis, plan.reason
    args, s0 = sample_arguments(rec.checked, {"K": 8, "V": 8}, 1, 24, 2, dtype=torch.float64, seed=13,
                                with_initial_state=True)
    ref, weights, ref_out = _grads(rec.reference, args, s0)
    layer = recurrence_dsl.compile(rec, backend=backend, form="chunked", tuning=False)
    got, _, out = _grads(layer, [x.float() for x in args], s0.float(), weights,
                         chunk_size=8 if backend == "torch" else 16)
    if backend == "triton":
        assert "_AdjointBackward" in type(made_by(out)).__name__
    names = [s.name for s in rec.checked.inputs] + ["initial_state"]
    errors = {n: _rel(g, r) for n, g, r in zip(names, got, ref, strict=True)}
    errors["o"] = _rel(out, ref_out)
    print(name, backend, {n: f"{e:.1e}" for n, e in errors.items()})
    assert max(errors.values()) <= TOL, errors


def test_no_steps(monkeypatch):
    """T = 0: no chunk, no checkpoint; zero input gradients, the final state's gradient for the initial one."""
    args, s0 = sample_arguments(REC.checked, SIZES, 2, 0, 2, dtype=torch.float32, seed=0, with_initial_state=True)
    got, weights, _ = _grads(_layer(monkeypatch), args, s0, chunk_size=16)
    for g, x in zip(got, args):
        assert g.shape == x.shape and not g.any()
    assert torch.allclose(got[-1], weights[1].float())


def test_auto_picks_the_chunked_triton_form():
    layer = recurrence_dsl.compile(REC, backend="triton", tuning=False)
    assert "chunked" in layer.triton_forms
    args, s0 = sample_arguments(REC.checked, SIZES, 1, 512, 2, dtype=torch.float32, seed=0, with_initial_state=True)
    chosen = layer.config_for(*args, initial_state=s0)
    assert chosen["backend"] == "triton" and chosen["form"] == "chunked", chosen


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_gradients_on_a_gpu(dtype):
    """On CUDA (deselected elsewhere, see conftest.py): K = V = 64, T = 300 (five chunks of 64, the last partial),
    inputs in `dtype`, against the float64 reference on the same rounded inputs (bfloat16: fla's relative RMS
    tolerance for dq/dk/dv, 0.008, doubled for the chain through six inputs)."""
    assert torch.cuda.is_available(), "selected with -m gpu without a CUDA GPU"
    args, s0 = sample_arguments(REC.checked, {"K": 64, "V": 64}, 2, 300, 2, dtype=torch.float64, seed=5,
                                with_initial_state=True)
    args = [x.to("cuda", dtype) for x in args]
    s0 = s0.to("cuda", torch.float32)
    ref, weights, _ = _grads(REC.reference, [x.double() for x in args], s0.double())
    layer = recurrence_dsl.compile(REC, backend="triton", form="chunked", tuning=False)
    got, _, _ = _grads(layer, args, s0, [w.cuda() for w in weights], chunk_size=64)
    tol = TOL * 10 if dtype == torch.float32 else 0.016
    errors = {n: _rel(g, r) for n, g, r in zip(NAMES, got, ref)}
    print(errors)
    assert max(errors.values()) <= tol, errors


@pytest.mark.parametrize("V,packed", [(16, False), (40, False), (16, True)],
                         ids=["one-V-tile", "two-V-tiles", "packed"])
def test_float16_inputs_taken_as_they_are(monkeypatch, V, packed):
    """A float16 call of the chunked form hands its kernels the float16 inputs themselves (the form is
    `takes_input_dtype`: no float32 copy of the [B, T, H, ...] inputs by the dispatcher), and its derived adjoint
    the same tensors; the output and every input's gradient come back in float16, the param's (float32 here, as a
    module holds it) and the initial state's in float32, and all match the float32 call's to float16's rounding
    (the inputs rounded to float16 once, both calls computing in float32). V = 40: two V tiles, whose parts of the
    gradients without V are summed in float32 before the one cast; packed: cu_seqlens (an empty sequence too).
    float16, not bfloat16: bfloat16 arithmetic is wrong in Triton's interpreter."""
    layer = _layer(monkeypatch)
    run = layer.triton_forms["chunked"]
    assert getattr(run, "input_dtype", False)
    cells = dict(zip(run.__code__.co_freevars, run.__closure__))  # with_adjoint's loop and derived backward
    loop, adjoint, seen = cells["loop"].cell_contents, cells["adjoint"].cell_contents, {}

    def spy_loop(*args, **kwargs):
        seen["loop"] = [x.dtype for x in args[:7]]  # r, w, k, v, kk, a, u
        return loop(*args, **kwargs)

    def spy_adjoint(*args, **kwargs):
        seen["adjoint"] = [x.dtype for x in args[:7]]
        grads, states = adjoint(*args, **kwargs)
        seen["grads"] = [g.dtype for g in grads]
        return grads, states

    monkeypatch.setattr(cells["loop"], "cell_contents", spy_loop)
    monkeypatch.setattr(cells["adjoint"], "cell_contents", spy_adjoint)
    call = {"cu_seqlens": torch.tensor([0, 6, 6, 37])} if packed else {}
    rows = 3 if packed else None
    args, s0 = sample_arguments(REC.checked, {"K": 16, "V": V}, 1 if packed else 2, 37, 2, dtype=torch.float32,
                                seed=7, with_initial_state=True, rows=rows)
    half = [x.half() if x.dim() == 4 else x for x in args]  # the inputs in float16, the param u as a module's
    got, weights, out = _grads(layer, half, s0, chunk_size=16, **call)
    f16, f32 = torch.float16, torch.float32
    assert seen == {"loop": [f16] * 6 + [f32], "adjoint": [f16] * 6 + [f32], "grads": [f16] * 6 + [f32]}, seen
    assert out.dtype == f16 and [g.dtype for g in got] == [f16] * 6 + [f32, f32]
    ref, _, ref_out = _grads(layer, [x.float() for x in half], s0, weights, chunk_size=16, **call)
    errors = {n: _rel(g, r) for n, g, r in zip(NAMES, got, ref)}
    errors["o"] = _rel(out, ref_out)
    print({n: f"{e:.1e}" for n, e in errors.items()})
    assert max(errors.values()) <= 4e-3, errors  # float16: 2**-11 per rounding of a value or a gradient


def test_float16_through_a_torch_prologue(monkeypatch):
    """The chunked Triton form has no prologue at all (b = -a * kk from `b_map`, the skip weight from `bonus`, both
    formed in float32 by the kernels from the raw inputs as they load them), so even where prologues are printed as
    torch ops (here forced: the kernel printer made to decline) a float16 call's kernels get the same b and bonus
    as the float32 call's: the final states agree to float32 rounding and the outputs to float16's."""
    from codegen import torch_forms
    from codegen.cache import load_source
    from codegen.module import module_source
    from recurrence_dsl.analysis import analyse

    monkeypatch.setattr(torch_forms.TorchFormWriter, "_elementwise_prologue", lambda self, *args, **kwargs: None)
    text = module_source([analyse(REC.checked)], "rwkv7.rec")
    assert "def rwkv7__chunked_prologue_fwd_triton(" not in text
    assert "b_map=(rwkv7__map_a_kk, kk)" in text and "bonus=u" in text
    layer = load_source(text, "rwkv7").rwkv7
    args, s0 = sample_arguments(REC.checked, SIZES, 2, 37, 2, dtype=torch.float32, seed=3, with_initial_state=True)
    half = [x.half() if x.dim() == 4 else x for x in args]
    kw = dict(initial_state=s0, output_final_state=True, chunk_size=16, backend="triton", form="chunked")
    o16, s16 = layer(*half, **kw)
    o32, s32 = layer(*[x.float() for x in half], **kw)
    assert o16.dtype == torch.float16 and s16.dtype == torch.float32
    assert _rel(s16, s32) <= 1e-6 and _rel(o16, o32) <= 2e-3, (_rel(s16, s32), _rel(o16, o32))
