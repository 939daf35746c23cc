"""The parallel form on the Triton backend (codegen/triton_parallel.py): attention-style kernels for the linear
classes (no, a scalar, a key or a value decay), forward and backward, no torch form on the way.

One spec per class it takes and its prologue variants (linear_attention: identity; based: identity with several
states and readouts, its second-order features products of q and k; retention: scalar; mamba2: scalar with the
fused v_step, decay_head and skip; lightning_attention: a per-head constant decay; hgrn2: a key decay whose key is
1 - exp(f), a map of the log decay; normalized_linear_attention: identity with a query / key map and two readouts;
gla: key decay; rwkv6: key decay with an exclusive query and a per-step skip weight; min_gru: value decay, a vector
state run as h[1, D]): outputs and gradients of every input, param and initial state, with a gradient on the final
state, against the float64 reference interpreter's autograd (relative error <= 1e-5 in float32), T = 37 in query
blocks of 16 (three blocks, the last one partial), while every torch runtime function of the generated module
raises and the parallel Triton backward is counted; the same with packed sequences (`cu_seqlens`, batched by length
by the dispatcher). The runtime on its own: exclusive queries and resets (log decay -inf), whose gradient is 0 as
the reference's, for a scalar, a key and a value decay; the log decays' gradient where GLA's q.dq - k.dk cancels
(256 steps, 4 blocks); two readouts, one exclusive, per decay class; a backward with maps makes no mapped copy of q
or k (host allocations); a bad block is refused by name. Kernels run in the Triton interpreter (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

import recurrence_dsl
from codegen.specialize import chunked_packed_in_triton
from codegen.triton_recurrent import triton_form_names
from recurrence_dsl.analysis import analyse

from .conftest import SPEC_FILES, as_dict, no_torch_forms, weighted_gradients

triton_runtime = pytest.importorskip("codegen.triton_runtime")
triton_parallel = pytest.importorskip("codegen.triton_parallel")

SPECS: dict[str, recurrence_dsl.Recurrence] = {}
for _path in SPEC_FILES:
    SPECS.update(recurrence_dsl.load(_path))
B, T, H, SIZE = 1, 37, 1, 16
TOL = 1e-5
LENGTHS = [5, 0, 37, 16, 1]  # packed, in blocks of 16: a partial block, an empty sequence, three blocks, one, a step
CONFIG = {"block_t": 16, "block_k": 16, "block_v": 16, "num_warps": 4, "num_stages": 1}  # query blocks 16 + 16 + 5


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("name", ["linear_attention", "based", "retention", "mamba2", "lightning_attention",
                                  "normalized_linear_attention", "gla", "hgrn2", "rwkv6", "min_gru"])
def test_gradients_match_the_reference(name, monkeypatch):
    from recurrence_dsl.sampling import sample_arguments

    rec = SPECS[name]
    assert "parallel" in triton_form_names(analyse(rec.checked))
    args, initial = sample_arguments(rec.checked, {s: SIZE for s in rec.checked.sizes}, B, T, H,
                                     dtype=torch.float64, seed=0, with_initial_state=True)
    ref, weights = weighted_gradients(rec.reference, rec, args, initial)
    layer = recurrence_dsl.compile(rec, backend="triton", form="parallel", tuning=False)
    runs = no_torch_forms(layer, monkeypatch, "_triton_ParallelLinearFunction")
    init32 = {k: v.float() for k, v in as_dict(initial, rec.checked.states).items()}
    got, _ = weighted_gradients(layer, rec, [a.float() for a in args], init32, weights, config=CONFIG)
    assert runs, "the parallel Triton form's own backward did not run"
    names = [s.name for s in rec.checked.inputs + rec.checked.params + rec.checked.states]
    errors = {n: _rel(g, r) for n, g, r in zip(names, got, ref)}
    # the outputs and final states too: a wrong forward term whose backward is right (the epilogue's gradients come
    # from `_unfuse`, not from the kernels) shows only here
    state = init32 if len(init32) > 1 else next(iter(init32.values()))
    with torch.no_grad():
        out, final = layer(*[a.float() for a in args], initial_state=state, output_final_state=True, config=CONFIG)
    ref_out, ref_final = rec.reference(*args, initial_state=initial, output_final_state=True)
    for label, mine, theirs in (("output", out, ref_out), ("final state", final, ref_final)):
        mine, theirs = as_dict(mine, rec.checked.outputs if label == "output" else rec.checked.states), \
            as_dict(theirs, rec.checked.outputs if label == "output" else rec.checked.states)
        errors.update({f"{label} {k}": _rel(mine[k], theirs[k]) for k in theirs})
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("name", ["linear_attention", "retention", "mamba2", "gla", "rwkv6", "min_gru"])
def test_packed_sequences_match_the_reference(name, monkeypatch):
    """cu_seqlens: sequences of 5, 0, 37, 16 and 1 steps in query blocks of 16, run by the parallel kernels in one
    call (`_Varlen`: one backward run per state, not one per length); outputs, final states and every gradient
    (inputs, params, each sequence's initial state) against the reference's packed call."""
    from recurrence_dsl.sampling import sample_arguments

    rec = SPECS[name]
    assert chunked_packed_in_triton(analyse(rec.checked))  # the module marks the form takes_cu_seqlens
    cu = torch.tensor([0] + LENGTHS).cumsum(0)
    N, Tt = len(LENGTHS), int(cu[-1])
    args, initial = sample_arguments(rec.checked, {s: SIZE for s in rec.checked.sizes}, N, Tt, H,
                                     dtype=torch.float64, seed=1, with_initial_state=True)
    args = [a[:1] if i < len(rec.checked.inputs) else a for i, a in enumerate(args)]  # one packed row
    ref, weights = weighted_gradients(rec.reference, rec, args, initial, cu_seqlens=cu)
    layer = recurrence_dsl.compile(rec, backend="triton", form="parallel", tuning=False)
    runs = no_torch_forms(layer, monkeypatch, "_triton_ParallelLinearFunction")
    init32 = {k: v.float() for k, v in as_dict(initial, rec.checked.states).items()}
    got, _ = weighted_gradients(layer, rec, [a.float() for a in args], init32, weights, cu_seqlens=cu,
                                config=CONFIG)
    assert len(runs) == len(rec.checked.states), runs
    names = [s.name for s in rec.checked.inputs + rec.checked.params + rec.checked.states]
    errors = {n: _rel(g, r) for n, g, r in zip(names, got, ref)}
    state = init32 if len(init32) > 1 else next(iter(init32.values()))
    with torch.no_grad():
        out, final = layer(*[a.float() for a in args], initial_state=state, output_final_state=True, cu_seqlens=cu,
                           config=CONFIG)
    ref_out, ref_final = rec.reference(*args, initial_state=initial, output_final_state=True, cu_seqlens=cu)
    for label, mine, theirs in (("output", out, ref_out), ("final state", final, ref_final)):
        decl = rec.checked.outputs if label == "output" else rec.checked.states
        mine, theirs = as_dict(mine, decl), as_dict(theirs, decl)
        errors.update({f"{label} {k}": _rel(mine[k], theirs[k]) for k in theirs})
    assert max(errors.values()) <= TOL, errors


def _steps(q, k, v, g, s0, exclusive):
    """The recurrence step by step in float64: (o, S_T) of S_t = exp(g_t) S_{t-1} + k_t v_t^T, g_t a scalar
    [B, T, H], per key [B, T, H, K] (rows of S) or per value [B, T, H, V] (columns)."""
    S, outs = s0, []
    for t in range(q.shape[1]):
        before = S
        if g.dim() == 3:
            decay = g[:, t, :, None, None]
        else:
            decay = g[:, t, :, :, None] if g.shape[-1] == q.shape[-1] else g[:, t, :, None, :]
        S = S * decay.exp() + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], before if exclusive else S))
    return torch.stack(outs, 1), S


@pytest.mark.parametrize("axis,exclusive", [("scalar", False), ("scalar", True), ("key", True), ("value", False)])
def test_runtime_resets_and_exclusive_queries(axis, exclusive):
    """Resets (-inf, and -2000 below the floor) and small decays right after them: outputs, the final state and
    gradients of every input (the log decays' is 0 at a reset, as the reference's) within 1e-5."""
    gen = torch.Generator().manual_seed(2)
    Bt, Tt, Ht, K, V = 1, 37, 2, 16, 32
    q, k = (torch.randn(Bt, Tt, Ht, K, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(Bt, Tt, Ht, V, generator=gen, dtype=torch.float64)
    s0 = torch.randn(Bt, Ht, K, V, generator=gen, dtype=torch.float64)
    lanes = {"scalar": (), "key": (K,), "value": (V,)}[axis]
    g = -0.1 * torch.rand((Bt, Tt, Ht) + lanes, generator=gen, dtype=torch.float64)
    g[0, 5, 0], g[0, 20, 1], g[0, 33, 1] = -float("inf"), -2000.0, -float("inf")
    leaves = [x.requires_grad_() for x in (q, k, v, g, s0)]
    o_ref, s_ref = _steps(*leaves, exclusive)
    do = torch.randn(o_ref.shape, generator=gen, dtype=torch.float64)
    ds = torch.randn(s_ref.shape, generator=gen, dtype=torch.float64)
    want = torch.autograd.grad((o_ref * do).sum() + (s_ref * ds).sum(), leaves)
    f32 = [x.detach().float().requires_grad_() for x in leaves]
    decay_cls = {"scalar": triton_runtime.ScalarDecay, "key": triton_runtime.KeyDecay,
                 "value": triton_runtime.ValueDecay}[axis]
    (o,), ht = triton_parallel.parallel_linear_by(decay_cls, [(f32[0], exclusive)], *f32[1:4], initial_state=f32[4],
                                                  output_final_state=True, block_t=16)
    assert _rel(o, o_ref) <= TOL and _rel(ht, s_ref) <= TOL
    got = torch.autograd.grad((o.double() * do).sum() + (ht.double() * ds).sum(), f32)
    errors = {n: _rel(a, b) for n, a, b in zip("q k v g s0".split(), got, want)}
    assert max(errors.values()) <= TOL, errors
    assert (got[3][0, 5, 0] == 0).all() and (got[3][0, 20, 1] == 0).all() and torch.isfinite(got[3]).all()


def test_a_bad_block_is_refused_by_name():
    k = torch.zeros(1, 4, 1, 16)
    with pytest.raises(ValueError, match="block_t must be a power of two >= 16"):
        triton_parallel.parallel_linear_by(triton_runtime.NoDecay, [(k, False)], k, k, block_t=24)


@pytest.mark.parametrize("axis", ["scalar", "key"])
def test_decay_gradient_does_not_cancel(axis):
    """256 steps in 4 query blocks of 64, k close to q and dO close to v, strong decays (log decay in [-6, -3]): each
    step's own pair (t, t), which spans no decay, dominates q . dq and k . dk, so their difference, the old
    (q . dq)_t - (k . dk)_t formula, cancelled to 1e-4 relative on the log decays' gradient and 1e-2 on the per-head
    factor's (decay_head: sum over every step of dlog * log_decay). The direct per-pair sum keeps both, and every
    other gradient, within 1e-5 of the float64 reference, with an initial state and a final state's gradient."""
    gen = torch.Generator().manual_seed(3)
    Bt, Tt, Ht, K, V = 1, 256, 2, 16, 16
    q, k = (torch.randn(Bt, Tt, Ht, K, generator=gen, dtype=torch.float64) for _ in range(2))
    k = q + 0.1 * k
    v = torch.randn(Bt, Tt, Ht, V, generator=gen, dtype=torch.float64)
    s0 = 10.0 * torch.randn(Bt, Ht, K, V, generator=gen, dtype=torch.float64)
    lanes = (K,) if axis == "key" else ()
    g = -3.0 - 3.0 * torch.rand((Bt, Tt, Ht) + lanes, generator=gen, dtype=torch.float64)
    head = torch.tensor([0.5, 2.0], dtype=torch.float64)
    leaves = [x.requires_grad_() for x in (q, k, v, g, s0, head)]
    shape = (1, 1, -1) + (1,) * len(lanes)
    o_ref, s_ref = _steps(q, k, v, g * head.view(shape), s0, False)
    do = v.detach() + 0.1 * torch.randn(o_ref.shape, generator=gen, dtype=torch.float64)
    ds = 10.0 * torch.randn(s_ref.shape, generator=gen, dtype=torch.float64)
    want = torch.autograd.grad((o_ref * do).sum() + (s_ref * ds).sum(), leaves)
    f32 = [x.detach().float().requires_grad_() for x in leaves]
    decay_cls = triton_runtime.KeyDecay if axis == "key" else triton_runtime.ScalarDecay
    (o,), ht = triton_parallel.parallel_linear_by(decay_cls, [(f32[0], False)], *f32[1:4], initial_state=f32[4],
                                                  output_final_state=True, block_t=64, decay_head=f32[5])
    got = torch.autograd.grad((o.double() * do).sum() + (ht.double() * ds).sum(), f32)
    errors = {n: _rel(a, b) for n, a, b in zip("q k v g s0 head".split(), got, want)}
    assert max(errors.values()) <= TOL, errors


# (spec, dtype) -> the parallel form's forward + backward intermediate bytes at B=2, T=256, H=4, K=V=128 (host
# allocations, no kernel run): with the maps applied by the backward's kernels at their loads and dq, dk stored
# through the vjp helpers (before, mapped transient copies of q and k, `_apply_map`, and the log decays' gradient
# from q . dq - k . dk: normalised linear attention 11,669,024 / 11,095,584, HGRN2 30,694,440 / 35,408,424); G by
# `_parallel_cumsum_kernel` (before, torch's float64 copy, where and cumsum of the log decays in the forward and
# the backward: HGRN2 17,751,072 / 20,892,192). float32 runs blocks of 16 rows (`_PARALLEL_IEEE_BT`): HGRN2's
# log-decay gradient keeps twice the per-block sums of its 32-row blocks.
# Normalised linear attention's normaliser runs as a value column of S's call since the twelfth session
# (`[v, 1, zeros]`, 144 columns: one call where there were two): float32 7,474,720 -> 7,798,544 (the copy of v),
# bfloat16 8,998,432 -> 7,509,776.
# Since 2026-12-02 a layer copies an output that is a view while autograd records (codegen/dispatch.py `_owned`: the
# caller may change it in place, tests/test_training_usage.py): the divided readout's output is one (its epilogue's
# broadcast_to), 1,638,400 B more in float32 and 1,114,112 B in bfloat16 with its gradient's path (before:
# 7,798,544 and 7,509,776).
# normalised attention's figures fell by one output-sized buffer when printed epilogues stopped returning a
# broadcast_to view that the layer then copied (commit a37dd33)
# (2026-12-03: the step check's one-read `_step_extremes` moved these by a few KB of per-step scratch.)
PARALLEL_STEPS = {("normalized_linear_attention", torch.float32): 8_390_672,
                  ("normalized_linear_attention", torch.bfloat16): 8_098_832,
                  ("hgrn2", torch.float32): 6_836_752, ("hgrn2", torch.bfloat16): 9_844_752}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", ["normalized_linear_attention", "hgrn2"])
def test_backward_makes_no_mapped_copies(name, dtype, monkeypatch):
    """The parallel form's backward of a spec with prologue maps allocates no mapped q or k: the exact figure, and
    every [B, T, H, 128] buffer is a kernel's output or gradient buffer, a gradient's cast, the divided readout's
    torch epilogue, or the log decays' G and gradient. The kernels do not run (the count is of host allocations)."""
    from triton.runtime.interpreter import InterpretedFunction

    from codegen.intermediate_bytes import format_rows, measure_call
    from codegen.load import load_layer
    from recurrence_dsl.sampling import sample_arguments

    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *args, **kwargs: None)
    rec = SPECS[name]
    args, _ = sample_arguments(rec.checked, {s: 128 for s in rec.checked.sizes}, 2, 256, 4, dtype=torch.float32,
                               seed=0)
    report = measure_call(load_layer(analyse(rec.checked)), [a.to(dtype) for a in args], form="parallel",
                          backward=True)
    assert report.total == PARALLEL_STEPS[(name, dtype)], format_rows(report)
    full = [r for r in report.rows if r.shape == (2, 256, 4, 128)]
    allowed = ("torch.empty(", "grad.to(like.dtype)", "epilogue", "_cumulative_log_decays", "_parallel_dlog")
    assert full and all(any(a in r.where for a in allowed) for r in full), format_rows(report)


@pytest.mark.parametrize("axis", ["scalar", "key", "value"])
def test_two_queries_one_exclusive(axis):
    """Two readouts of one state, the first exclusive, T = 37 in blocks of 16: each query's share of every gradient
    (the log decays' state terms once, its pair terms per query) within 1e-5 of the float64 reference."""
    gen = torch.Generator().manual_seed(4)
    Bt, Tt, Ht, K, V = 1, 37, 2, 16, 32
    q1, q2, k = (torch.randn(Bt, Tt, Ht, K, generator=gen, dtype=torch.float64) for _ in range(3))
    v = torch.randn(Bt, Tt, Ht, V, generator=gen, dtype=torch.float64)
    s0 = torch.randn(Bt, Ht, K, V, generator=gen, dtype=torch.float64)
    lanes = {"scalar": (), "key": (K,), "value": (V,)}[axis]
    g = -0.2 * torch.rand((Bt, Tt, Ht) + lanes, generator=gen, dtype=torch.float64)
    leaves = [x.requires_grad_() for x in (q1, q2, k, v, g, s0)]
    o1, s_ref = _steps(q1, k, v, g, s0, True)
    o2, _ = _steps(q2, k, v, g, s0, False)
    do1, do2 = (torch.randn(o1.shape, generator=gen, dtype=torch.float64) for _ in range(2))
    ds = torch.randn(s_ref.shape, generator=gen, dtype=torch.float64)
    want = torch.autograd.grad((o1 * do1).sum() + (o2 * do2).sum() + (s_ref * ds).sum(), leaves)
    f32 = [x.detach().float().requires_grad_() for x in leaves]
    decay_cls = {"scalar": triton_runtime.ScalarDecay, "key": triton_runtime.KeyDecay,
                 "value": triton_runtime.ValueDecay}[axis]
    (p1, p2), ht = triton_parallel.parallel_linear_by(decay_cls, [(f32[0], True), (f32[1], False)], *f32[2:5],
                                                      initial_state=f32[5], output_final_state=True, block_t=16)
    got = torch.autograd.grad((p1.double() * do1).sum() + (p2.double() * do2).sum() + (ht.double() * ds).sum(), f32)
    errors = {n: _rel(a, b) for n, a, b in zip("q1 q2 k v g s0".split(), got, want)}
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("with_initial", [True, False], ids=["s0", "zero"])
@pytest.mark.parametrize("axis,exclusive", [("none", False), ("scalar", False), ("key", True), ("key", False),
                                            ("value", False)])
def test_runtime_packed_sequences(axis, exclusive, with_initial):
    """cu_seqlens read by the kernels (`_Varlen`): sequences of LENGTHS packed into one row, run in one call, each
    from its own initial state (or zero) to its own final state (an empty one's is its initial state): outputs,
    final states and the gradients of q, k, v, the log decays, the per-head decay factor and the initial states
    within 1e-5 of the float64 step-by-step reference run per sequence, and of the one-sequence calls' outputs."""
    gen = torch.Generator().manual_seed(5)
    N, Tt, Ht, K, V = len(LENGTHS), sum(LENGTHS), 2, 16, 32
    cu = torch.tensor([0] + LENGTHS).cumsum(0)
    q, k = (torch.randn(1, Tt, Ht, K, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, Tt, Ht, V, generator=gen, dtype=torch.float64)
    s0 = torch.randn(N, Ht, K, V, generator=gen, dtype=torch.float64)
    lanes = {"none": (), "scalar": (), "key": (K,), "value": (V,)}[axis]
    g = -0.3 * torch.rand((1, Tt, Ht) + lanes, generator=gen, dtype=torch.float64)
    if axis == "none":
        g = torch.zeros_like(g)
    else:
        g[0, 30] = -float("inf")  # a reset inside the third sequence
    head = torch.tensor([0.5, 2.0], dtype=torch.float64)
    leaves = [x.requires_grad_() for x in (q, k, v, g, s0, head)]
    shape = (1, 1, -1) + (1,) * len(lanes)
    outs, finals = [], []
    for n in range(N):
        a, b = int(cu[n]), int(cu[n + 1])
        if a == b:
            outs.append(v[:, a:b])
            finals.append(s0[n:n + 1] if with_initial else torch.zeros_like(s0[n:n + 1]))
            continue
        o_n, s_n = _steps(q[:, a:b], k[:, a:b], v[:, a:b], (g * head.view(shape))[:, a:b],
                          s0[n:n + 1] if with_initial else torch.zeros_like(s0[n:n + 1]), exclusive)
        outs.append(o_n)
        finals.append(s_n)
    o_ref, s_ref = torch.cat(outs, 1), torch.cat(finals, 0)
    do = torch.randn(o_ref.shape, generator=gen, dtype=torch.float64)
    ds = torch.randn(s_ref.shape, generator=gen, dtype=torch.float64)
    used = leaves if with_initial else leaves[:4] + leaves[5:]
    want = torch.autograd.grad((o_ref * do).sum() + (s_ref * ds).sum(), used, allow_unused=True)
    f32 = [x.detach().float().requires_grad_() for x in leaves]
    decay_cls = {"none": triton_runtime.NoDecay, "scalar": triton_runtime.ScalarDecay,
                 "key": triton_runtime.KeyDecay, "value": triton_runtime.ValueDecay}[axis]
    log_decay, decay_head = (None, None) if axis == "none" else (f32[3], f32[5])
    (o,), ht = triton_parallel.parallel_linear_by(decay_cls, [(f32[0], exclusive)], f32[1], f32[2], log_decay,
                                                  f32[4] if with_initial else None, True, block_t=16,
                                                  decay_head=decay_head, cu_seqlens=cu)
    assert o.shape == (1, Tt, Ht, V) and ht.shape == (N, Ht, K, V)
    errors = {"o": _rel(o, o_ref), "ht": _rel(ht, s_ref)}
    mine = [f32[i] for i in range(6) if with_initial or i != 4]
    got = torch.autograd.grad((o.double() * do).sum() + (ht.double() * ds).sum(), mine, allow_unused=True)
    names = [n for n in "q k v g s0 head".split() if with_initial or n != "s0"]
    for n, a, b in zip(names, got, want):
        if axis == "none" and n in ("g", "head"):
            assert a is None
            continue
        errors[n] = _rel(a, b)
    assert max(errors.values()) <= TOL, errors
    if with_initial:  # the empty sequence: its final state is its initial one, its gradient dS_T's
        assert torch.equal(ht[1], f32[4][1].detach())
        assert torch.equal(got[names.index("s0")][1], ds[1].float())
    with torch.no_grad():  # the one-sequence calls
        for n in range(N):
            a, b = int(cu[n]), int(cu[n + 1])
            if a == b:
                continue
            (o_n,), _ = triton_parallel.parallel_linear_by(
                decay_cls, [(f32[0][:, a:b], exclusive)], f32[1][:, a:b], f32[2][:, a:b],
                None if log_decay is None else log_decay[:, a:b], f32[4][n:n + 1] if with_initial else None, False,
                block_t=16, decay_head=decay_head)
            assert _rel(o[:, a:b], o_n.double()) <= TOL


@pytest.mark.parametrize("axis,exclusive", [("scalar", False), ("key", True), ("value", False)])
def test_packed_launches_do_not_grow_with_n(axis, exclusive, monkeypatch):
    """The kernels launched (names, in order; the kernels themselves do not run: the count is of launches) by a
    forward and backward call on N = 1000 packed sequences of 1 to 8 steps, with initial and final states, are
    those of one sequence (10 for a scalar decay: G, the output, the final state; G again, dq, dk, dv, dS0, the
    log decays' kernel and its fold)."""
    from triton.runtime.interpreter import InterpretedFunction

    launched = []
    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *a, **kw: launched.append(self.fn.__name__))
    decay_cls = {"scalar": triton_runtime.ScalarDecay, "key": triton_runtime.KeyDecay,
                 "value": triton_runtime.ValueDecay}[axis]

    def launches(lengths):
        gen = torch.Generator().manual_seed(6)
        cu = torch.tensor([0] + lengths).cumsum(0)
        Tt, Ht, K, V = int(cu[-1]), 2, 16, 16
        lanes = {"scalar": (), "key": (K,), "value": (V,)}[axis]
        q, k, v = (torch.randn(1, Tt, Ht, 16, generator=gen).requires_grad_() for _ in range(3))
        g = (-torch.rand((1, Tt, Ht) + lanes, generator=gen)).requires_grad_()
        s0 = torch.randn(len(lengths), Ht, K, V, generator=gen).requires_grad_()
        launched.clear()
        (o,), ht = triton_parallel.parallel_linear_by(decay_cls, [(q, exclusive)], k, v, g, s0, True, block_t=16,
                                                      cu_seqlens=cu)
        (o.sum() + ht.sum()).backward()
        return list(launched)

    many = launches([1 + n % 8 for n in range(1000)])
    one = launches([8])
    assert many == one and len(one) >= 10, (many, one)


def test_packed_call_of_empty_sequences_only():
    """cu_seqlens of two empty sequences (T = 0): no kernel runs, outputs [1, 0, H, V], each final state its initial
    one (zero without one), and the initial states' gradient is the final states'."""
    k = torch.zeros(1, 0, 2, 16)
    v = torch.zeros(1, 0, 2, 32)
    s0 = torch.randn(2, 2, 16, 32, requires_grad=True)
    cu = torch.tensor([0, 0, 0])
    (o,), ht = triton_parallel.parallel_linear_by(triton_runtime.KeyDecay, [(k, True)], k, v, k, s0, True,
                                                  cu_seqlens=cu)
    assert o.shape == (1, 0, 2, 32) and torch.equal(ht, s0.detach())
    ht.sum().backward()
    assert torch.equal(s0.grad, torch.ones_like(s0))
    _, zero = triton_parallel.parallel_linear_by(triton_runtime.KeyDecay, [(k, True)], k, v, k, None, True,
                                                 cu_seqlens=cu)
    assert zero.shape == (2, 2, 16, 32) and not zero.any()
