"""The delta rule's chunked form differentiated by Triton kernels (codegen/triton_runtime.py, `_delta_backward`).

`chunked_delta_by` with decay None, scalar or key is an autograd.Function whose backward recomputes the chunk-start
states and runs the backward kernels; a generated module's chunked Triton form of such a plan is therefore printed
without `with_torch_backward` (codegen/specialize.py, `chunked_backward_in_triton`). Checked here, in the Triton
interpreter at float32 against float64 autograd (relative error <= 1e-5):

- every spec of specs/ with a chunked Triton delta form (delta_net, gated_delta_net; rwkv7's diagonal-plus-rank-one
  chunked form trains through the derived adjoint instead, tests/test_triton_dplr.py): gradients of every input
  and the initial state, with a gradient on the final state too, T not a multiple of the chunk, against the
  reference interpreter's autograd;
- the key-axis decay (KDA, tests/data/kda.rec): gradients of every input and the initial state against the
  reference's autograd, with chunks of two 16-step sub-chunks (so the intra-chunk terms take both the sub-chunk
  pairs through a reference row and the diagonal sub-blocks), and with -inf log decays on whole steps and on some
  key channels only;
- -inf log decays (a reset), through the layer and through the runtime;
- packed sequences (cu_seqlens, one of them empty) through delta_net's chunked Triton form;
- the runtime itself against the torch runtime's float64 autograd: several queries (exclusive and not), no initial
  state, no gradient on the final state or on an output, zero length;
- no torch form runs during the Triton backward (the module's torch runtime entry patched to raise).
"""

from __future__ import annotations

import sys

import pytest
import torch

import recurrence_dsl
from codegen import torch_runtime, triton_runtime
from codegen.dispatch import with_torch_backward
from codegen.specialize import chunked_backward_in_triton
from codegen.triton_recurrent import triton_form_names
from recurrence_dsl.analysis import TransitionClass, analyse
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPEC_FILES, TESTS, as_dict

pytest.importorskip("triton")

SPECS: dict[str, recurrence_dsl.Recurrence] = {}
for _path in SPEC_FILES:
    SPECS.update(recurrence_dsl.load(_path))
KDA = recurrence_dsl.load(TESTS / "data" / "kda.rec")["kda"]  # the key-axis decay class

B, T, H, SIZE, CHUNK = 2, 37, 2, 16, 16  # three chunks, the last one 5 steps
TOL = 1e-5
DELTA_SPECS = ["delta_net", "gated_delta_net"]


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _grads(fn, rec, args, initial, weights, **call):
    """Gradients of every argument and the initial state for sum(w * outputs) + sum(w * final states)."""
    leaves = [a.detach().clone().requires_grad_() for a in args]
    init = {k: v.detach().clone().requires_grad_() for k, v in as_dict(initial, rec.checked.states).items()}
    given = init if len(init) > 1 else next(iter(init.values()))
    out, final = fn(*leaves, initial_state=given, output_final_state=True, **call)
    out, final = as_dict(out, rec.checked.outputs), as_dict(final, rec.checked.states)
    loss = sum((out[k].double() * w).sum() for k, w in weights[0].items())
    loss = loss + sum((final[k].double() * w).sum() for k, w in weights[1].items())
    loss.backward()
    return [x.grad for x in leaves] + [init[s.name].grad for s in rec.checked.states]


def _layer_vs_reference(rec, args, initial, chunk=CHUNK, **call):
    """{name: relative error} of the chunked Triton layer's gradients (float32) against the reference's (float64)."""
    out, final = rec.reference(*args, initial_state=initial, output_final_state=True, **call)
    gen = torch.Generator().manual_seed(1)
    weights = ({k: torch.randn(v.shape, generator=gen, dtype=torch.float64)
                for k, v in as_dict(out, rec.checked.outputs).items()},
               {k: torch.randn(v.shape, generator=gen, dtype=torch.float64)
                for k, v in as_dict(final, rec.checked.states).items()})
    ref = _grads(rec.reference, rec, args, initial, weights, **call)
    layer = recurrence_dsl.compile(rec, backend="triton", form="chunked", chunk_size=chunk, tuning=False)
    init32 = {k: v.float() for k, v in as_dict(initial, rec.checked.states).items()}
    got = _grads(layer, rec, [a.float() for a in args], init32, weights, **call)
    names = [s.name for s in rec.checked.inputs + rec.checked.params + rec.checked.states]
    for n, g in zip(names, got):
        assert torch.isfinite(g).all(), n
    return {n: _rel(g, r) for n, g, r in zip(names, got, ref)}


def _sample(rec, seed=0, batch=B, length=T):
    return sample_arguments(rec.checked, {s: SIZE for s in rec.checked.sizes}, batch, length, H,
                            dtype=torch.float64, seed=seed, with_initial_state=True)


def test_the_delta_specs_are_the_ones_with_a_differentiable_chunked_triton_form():
    """Every spec whose chunked Triton form is a delta rule with decay None / scalar is tested below (specs/ has
    none with a key decay: KDA comes from tests/data); rwkv7 (diagonal-plus-rank-one) has a chunked Triton form
    that trains through the recurrent form's derived adjoint instead (tests/test_triton_dplr.py)."""
    analyses = {name: analyse(rec.checked) for name, rec in SPECS.items()}
    delta = {TransitionClass.RANK_ONE_UPDATE, TransitionClass.DIAGONAL_PLUS_RANK_ONE}
    found = sorted(name for name, a in analyses.items() if chunked_backward_in_triton(a)
                   and any(p.cls in delta for p in a.chunk_analysis.states.values()))
    assert found == DELTA_SPECS
    assert "chunked" in triton_form_names(analyses["rwkv7"]) and not chunked_backward_in_triton(analyses["rwkv7"])
    kda = analyse(KDA.checked)
    assert kda.chunk_analysis.states["S"].chunk.decay_axis == "key"
    assert "chunked" in triton_form_names(kda) and chunked_backward_in_triton(kda)


@pytest.mark.parametrize("name", DELTA_SPECS)
def test_layer_gradients_match_the_reference(name):
    rec = SPECS[name]
    errors = _layer_vs_reference(rec, *_sample(rec))
    assert max(errors.values()) <= TOL, errors


def test_minus_infinity_log_decays_through_the_layer():
    """gated_delta_net's g = -inf at some steps (a full reset): finite gradients matching the reference's."""
    rec = SPECS["gated_delta_net"]
    args, initial = _sample(rec, seed=2)
    names = [s.name for s in rec.checked.inputs]
    g = args[names.index("g")].clone()
    g[:, 5] = float("-inf")  # inside the first chunk
    g[0, 16, 1] = float("-inf")  # the first step of the second chunk, one row and head
    g[:, 36] = float("-inf")  # the last step
    args[names.index("g")] = g
    errors = _layer_vs_reference(rec, args, initial)
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("neg_inf", [False, True], ids=["finite", "minus-inf"])
def test_key_decay_layer_gradients_match_the_reference(neg_inf):
    """KDA, chunks of 32 (two sub-chunks) over T = 37; with neg_inf, g = -inf on a whole step inside the first
    chunk's second sub-chunk, on half the key channels of one step of the first sub-chunk, and on the last step."""
    args, initial = _sample(KDA, seed=4)
    if neg_inf:
        i = [s.name for s in KDA.checked.inputs].index("g")
        g = args[i].clone()
        g[:, 20] = float("-inf")
        g[1, 3, 0, : SIZE // 2] = float("-inf")
        g[:, T - 1] = float("-inf")
        args[i] = g
    errors = _layer_vs_reference(KDA, args, initial, chunk=32)
    assert max(errors.values()) <= TOL, errors


def test_packed_sequences_through_the_chunked_triton_form(monkeypatch):
    """delta_net with cu_seqlens [0, 21, 21, 40] (an empty sequence in the middle; the first crosses a chunk
    boundary, the last ends mid-chunk): each sequence from its own initial state, gradients of every input and
    of the initial states as the reference's; the Triton runtime ran once, on all the packed steps, under autograd
    (its kernels walk each sequence's chunks: tests/test_varlen.py)."""
    rec = SPECS["delta_net"]
    layer = recurrence_dsl.compile(rec, backend="triton", form="chunked", chunk_size=CHUNK, tuning=False)
    module = sys.modules[type(layer).__module__]
    lengths = []

    def spy(decay_cls, queries, k, *args, **kwargs):
        if torch.is_grad_enabled():  # the differentiable entry, not the autograd.Function's own forward
            lengths.append(k.shape[1])
        return runtime(decay_cls, queries, k, *args, **kwargs)

    runtime = module.triton_chunked_delta_by
    monkeypatch.setattr(module, "triton_chunked_delta_by", spy)
    args, initial = _sample(rec, seed=5, batch=3, length=40)  # three rows of initial state, one per sequence
    args = [a[:1] for a in args]  # B = 1: the sequences are packed along T
    errors = _layer_vs_reference(rec, args, initial, cu_seqlens=torch.tensor([0, 21, 21, 40]))
    assert max(errors.values()) <= TOL, errors
    assert lengths == [40]


def _runtime_case(axis, excl, length, seed, with_initial=True, neg_inf=False, K=16, V=32):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    qs = [rnd(B, length, H, K) for _ in excl]
    k = torch.nn.functional.normalize(rnd(B, length, H, K), dim=-1)
    y = rnd(B, length, H, V)
    beta = torch.rand(B, length, H, generator=gen, dtype=torch.float64)
    log_decay = None
    if axis is not None:
        shape = (B, length, H) if axis == "scalar" else (B, length, H, K)
        log_decay = -torch.rand(*shape, generator=gen, dtype=torch.float64)
        if neg_inf and length:
            log_decay[:, length // 3] = float("-inf")
            log_decay[1, length // 2, 0] = float("-inf")
    s0 = rnd(B, H, K, V) if with_initial else None
    return qs, k, y, beta, log_decay, s0


def _runtime_grads(chunked_delta, case, excl, dtype, weights, chunk_size=CHUNK, axis=None):
    """Gradients of every tensor of `case` (those given) for sum(w * outputs) + sum(w * final) (when weighted)."""
    tensors = [x for x in [*case[0], *case[1:]] if x is not None]
    leaves = [x.detach().to(dtype).requires_grad_() for x in tensors]
    it = iter(leaves)
    qs = [next(it) for _ in case[0]]
    k, y, beta = next(it), next(it), next(it)
    log_decay = next(it) if case[4] is not None else None
    s0 = next(it) if case[5] is not None else None
    outs, final = chunked_delta(list(zip(qs, excl)), k, y, beta, log_decay, axis, s0, chunk_size, True)
    loss = sum((o.double() * w).sum() for o, w in zip(outs, weights[0]) if w is not None)
    if weights[1] is not None:
        loss = loss + (final.double() * weights[1]).sum()
    loss.backward()
    return [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves]


RUNTIME_CASES = [
    pytest.param(None, (False,), 37, True, True, id="none"),
    pytest.param("scalar", (False,), 37, True, True, id="scalar"),
    pytest.param("scalar", (True, False), 45, True, True, id="scalar-two-queries-one-exclusive"),
    pytest.param(None, (True,), 20, False, True, id="none-exclusive-no-initial-state"),
    pytest.param("scalar", (False, True), 33, True, False, id="scalar-no-final-gradient-unused-output"),
    pytest.param("key", (True, False), 45, True, True, id="key-two-queries-one-exclusive"),
    pytest.param("key", (True,), 20, False, True, id="key-exclusive-no-initial-state"),
]


@pytest.mark.parametrize(("axis", "excl", "length", "with_initial", "final_grad"), RUNTIME_CASES)
def test_runtime_gradients_match_the_torch_runtime(axis, excl, length, with_initial, final_grad):
    case = _runtime_case(axis, excl, length, seed=length, with_initial=with_initial, neg_inf=axis is not None)
    gen = torch.Generator().manual_seed(7)
    wo = [torch.randn(B, length, H, 32, generator=gen, dtype=torch.float64) for _ in excl]
    if not final_grad:
        wo[-1] = None  # the last output takes no part in the loss
    weights = (wo, torch.randn(B, H, 16, 32, generator=gen, dtype=torch.float64) if final_grad else None)
    chunk = 32 if axis == "key" else CHUNK  # a key decay's sub-chunk pairs need two sub-chunks in a chunk
    ref = _runtime_grads(torch_runtime.chunked_delta, case, excl, torch.float64, weights, chunk, axis)
    got = _runtime_grads(triton_runtime.chunked_delta, case, excl, torch.float32, weights, chunk, axis)
    errors = [_rel(g, r) for g, r in zip(got, ref) if r.norm() > 0]
    assert max(errors) <= TOL, errors
    for g, r in zip(got, ref):
        if r.norm() == 0:  # an unused query: exactly zero
            assert not g.any()


@pytest.mark.parametrize("axis", [None, "scalar"])
def test_runtime_gradients_with_several_key_and_value_blocks(axis):
    """K = V = 64: the default blocks split the backward's loops (_delta_bwd_dqk_kernel over two K blocks of 32
    and V blocks of 32, _delta_bwd_local_kernel over two V tiles, _delta_bwd_wy_kernel's V loop in two, dL in
    _delta_bwd_dl_kernel), the configs chosen so that nothing spills on sm_80 (tests/test_no_spills.py)."""
    excl, length = (True, False), 21
    case = _runtime_case(axis, excl, length, seed=3, neg_inf=axis is not None, K=64, V=64)
    gen = torch.Generator().manual_seed(8)
    weights = ([torch.randn(B, length, H, 64, generator=gen, dtype=torch.float64) for _ in excl],
               torch.randn(B, H, 64, 64, generator=gen, dtype=torch.float64))
    ref = _runtime_grads(torch_runtime.chunked_delta, case, excl, torch.float64, weights, CHUNK, axis)
    got = _runtime_grads(triton_runtime.chunked_delta, case, excl, torch.float32, weights, CHUNK, axis)
    errors = [_rel(g, r) for g, r in zip(got, ref)]
    assert max(errors) <= TOL, errors


@pytest.mark.parametrize("axis", ["scalar", "key"])
def test_state_gradient_in_row_blocks(axis, monkeypatch):
    """_delta_bwd_dh_kernel with dS in row blocks, as float32 calls run it at K = 128 (2 blocks of 64, since one
    [128, BV] block spilled under ieee dots): here K = 64 in 4 blocks of 16, so every block's share of dU is summed
    before any block moves on, each block with its own rows of the key decay."""
    assert triton_runtime._delta_bwd_dh_blocks(128, "ieee") == (64, 2)
    assert triton_runtime._delta_bwd_dh_blocks(128, "tf32") == (128, 1)
    monkeypatch.setattr(triton_runtime, "_delta_bwd_dh_blocks", lambda BK, prec: (BK // 4, 4))
    excl, length = (False,), 21
    case = _runtime_case(axis, excl, length, seed=4, neg_inf=True, K=64, V=16)
    gen = torch.Generator().manual_seed(9)
    weights = ([torch.randn(B, length, H, 16, generator=gen, dtype=torch.float64)],
               torch.randn(B, H, 64, 16, generator=gen, dtype=torch.float64))
    ref = _runtime_grads(torch_runtime.chunked_delta, case, excl, torch.float64, weights, CHUNK, axis)
    got = _runtime_grads(triton_runtime.chunked_delta, case, excl, torch.float32, weights, CHUNK, axis)
    errors = [_rel(g, r) for g, r in zip(got, ref)]
    assert max(errors) <= TOL, errors


def test_zero_length():
    """No steps: zero gradients, and the initial state takes the final state's gradient."""
    case = _runtime_case("scalar", (False,), 0, seed=0)
    dfinal = torch.randn(B, H, 16, 32, dtype=torch.float64)
    got = _runtime_grads(triton_runtime.chunked_delta, case, (False,), torch.float32, ([None], dfinal),
                         axis="scalar")
    assert all(not g.any() for g in got[:-1]) and torch.equal(got[-1], dfinal.float())


def test_a_decay_class_without_a_backward_needs_no_grad():
    """A decay class without a Triton delta backward (the value axis, which the public chunked_delta rejects
    outright) refuses gradients in chunked_delta_by instead of silently returning none."""
    case = _runtime_case(None, (False,), 20, seed=0)
    qs, k, y, beta, _, s0 = case
    log_decay = -torch.rand(B, 20, H, 32, dtype=torch.float32)
    with pytest.raises(NotImplementedError, match="no Triton backward"):
        triton_runtime.chunked_delta_by(triton_runtime.ValueDecay, [(qs[0].float(), False)],
                                        k.float().requires_grad_(), y.float(), beta.float(), log_decay, s0.float(),
                                        CHUNK)


@pytest.mark.parametrize("name", [*DELTA_SPECS, "kda"])
def test_no_torch_form_runs_in_the_triton_backward(name, monkeypatch):
    """The module's torch chunked runtime patched to raise: the Triton chunked form still runs forward and
    backward; the old wrapper (re-running the torch form in the backward) hits the patch."""
    rec = KDA if name == "kda" else SPECS[name]
    layer = recurrence_dsl.compile(rec, backend="triton", form="chunked", chunk_size=CHUNK, tuning=False)
    module = sys.modules[type(layer).__module__]
    assert layer.triton_forms["chunked"] is getattr(module, f"{name}__chunked_triton")

    def refuse(*args, **kwargs):
        raise AssertionError("a torch form ran")

    monkeypatch.setattr(module, "chunked_delta_by", refuse)  # what the torch chunked form calls
    args, initial = _sample(rec, seed=3)
    leaves = [a.float().requires_grad_() for a in args]
    init = initial.float().requires_grad_()
    out, final = layer(*leaves, initial_state=init, output_final_state=True)
    (out.square().sum() + final.square().sum()).backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in leaves + [init])
    old = with_torch_backward(getattr(module, f"{name}__chunked_triton"), getattr(module, f"{name}__chunked"),
                              tuple(o.name for o in rec.checked.outputs), tuple(s.name for s in rec.checked.states))
    monkeypatch.setattr(layer, "triton_forms", {**layer.triton_forms, "chunked": old})
    out, final = layer(*leaves, initial_state=init, output_final_state=True)
    with pytest.raises(AssertionError, match="a torch form ran"):
        (out.sum() + final.sum()).backward()
