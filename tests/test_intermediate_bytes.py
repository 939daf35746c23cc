"""Intermediate tensors of a call (`codegen.intermediate_bytes`) and the chunked Triton form's fused prologue and
epilogue (`triton_runtime._Fused`: a per-step factor of k v^T, a per-head factor of the log decays, the output's
scale and a per-head skip term, applied in the kernels).

- The count: a known intermediate is counted at its size and site; inputs, outputs and views are not.
- Results and gradients of the chunked Triton form against the float64 reference for GLA, gated DeltaNet and
  Mamba2 (whose prologue and epilogue are fused) and for normalised linear attention (whose feature maps are
  printed helpers the kernels apply, and whose divided readout is not fused): relative error <= 1e-5 in
  float32, T = 37 in chunks of 16.
- The forward's intermediate bytes at B=1, T=128, H=2, K=V=N=P=32, chunks of 64, float32 and bfloat16, against the
  hand-written kernels' figure (`hand_written_bytes`): GLA, gated DeltaNet and Mamba2 at most that figure.
- Half precision: float16 values and gradients against the reference at float16 tolerance; bfloat16 outputs and
  gradients come back in bfloat16.
- A skip term with one weight per step (RWKV-6's bonus) against the explicit sum, packed.
- The backward (`hand_written_backward_bytes`): its formulas at one shape by hand; a gradient handed back is not an
  intermediate; GLA's and Mamba2's forward + backward at B=2, T=1024, H=4, K=V=128 in float32 and bfloat16 within
  the hand-written forward + backward (the host's allocations, no kernel launched); and, compiled for sm_90 in a
  child process (no kernel runs) at the same shape, gated DeltaNet's forward + backward within the hand-written
  forward + backward and its forward within the hand-written forward, in float32 and in bfloat16.
- DeltaProduct's forward + backward at that shape in bfloat16: its exact figure, with no prologue or epilogue tensor;
  RWKV-7's forward: its exact figure, with no epilogue tensor (the bonus in the DPLR output kernel).
- No initial state: the linear chunked Triton forms take None (no zero state, no gradient of one), GLA and mLSTM.

Kernels run in Triton's interpreter (tests/conftest.py); about 70 s on an idle two-core machine (117 s measured on the
shared one).
"""

from __future__ import annotations

import inspect
import json
import sys

import pytest
import torch

import recurrence_dsl
from codegen.intermediate_bytes import (
    format_rows,
    hand_written_backward_bytes,
    hand_written_bytes,
    hand_written_for,
    measure,
    measure_call,
)
from codegen.load import load_layer
from recurrence_dsl.analysis import analyse
from recurrence_dsl.sampling import sample_arguments

from .children import Child
from .conftest import SPECS_DIR, as_dict

pytest.importorskip("triton")

FUSED = ("gla", "gated_delta_net", "mamba2")
UNFUSED = "normalized_linear_attention"


def _rec(name: str) -> recurrence_dsl.Recurrence:
    return recurrence_dsl.load(SPECS_DIR / f"{name}.rec")[name]


def _args(rec, B, T, H, size, seed=0, initial=False):
    return sample_arguments(rec.checked, {s: size for s in rec.checked.sizes}, B, T, H, dtype=torch.float64,
                            seed=seed, with_initial_state=initial)


# -- the count --------------------------------------------------------------------------------------------------


def test_counts_a_known_intermediate_not_inputs_outputs_or_views():
    x = torch.randn(3, 5, 7)

    def fn():
        doubled = x * 2  # the intermediate: 3 * 5 * 7 float32
        view = doubled.transpose(0, 1)[..., None]  # a view: no storage of its own
        return view.sum(-1)  # the output

    report = measure(fn, [x])
    assert report.total == 3 * 5 * 7 * 4
    assert len(report.rows) == 1 and "doubled = x * 2" in report.rows[0].where
    assert report.rows[0].shape == (3, 5, 7) and report.rows[0].dtype == "float32"


def test_counts_an_unfused_prologue_of_a_spec():
    """RG-LRU's values sqrt(1 - a^2) * x * sigmoid(gi) (a value of several inputs over D, not an elementwise map of
    one that the kernels apply: tests/test_prologue_maps.py) stay a torch tensor [B, T, H, D]: the report names the
    generated line and counts it at its size."""
    rec = _rec("rg_lru")
    B, T, H, D = 1, 32, 2, 16
    args, _ = _args(rec, B, T, H, D)
    report = measure_call(load_layer(analyse(rec.checked)), [a.float() for a in args], form="chunked")
    values = [r for r in report.rows if "v_h = " in r.where]
    assert values, [r.where for r in report.rows]
    assert sum(r.bytes for r in values) >= B * T * H * D * 4


def test_mlstm_key_factor_is_a_per_step_factor_of_the_kernels():
    """mLSTM's k * exp(ig): exp(ig) is a per-step scalar [B, T, H], which the kernels apply to v as they load it
    (`_Fused.v_step`: the update c_t k_t v_t^T is k_t (c_t v_t)^T), for C and the normaliser n, one more value column
    of C's call (whose values are ones): the call reads the raw k and allocates no [B, T, H, K] key tensor."""
    rec = _rec("mlstm")
    form = load_layer(analyse(rec.checked)).triton_forms["chunked"]
    source = inspect.getsource(getattr(form, "__wrapped__", form))
    assert "v_step=v_step_C" in source and "v_C_n = torch.cat(" in source and "k_C = k  #" in source, source
    B, T, H, K = 1, 32, 2, 16
    args, _ = _args(rec, B, T, H, K)
    report = measure_call(load_layer(analyse(rec.checked)), [a.float() for a in args], form="chunked")
    assert not [r for r in report.rows if "exp(ig" in r.where and r.shape == (B, T, H, K)], format_rows(report)
    # nor exp(ig) itself [B, T, H], nor logsigmoid(fg) (only the runtime's float64 cumulative log decays): the kernels
    # map the raw ig and fg as they load them (`v_step_map`, `log_decay_map`, since 2026-12-02)
    assert "v_step_map=(mlstm__map_ig, mlstm__map_ig_vjp)" in source, source
    assert not [r for r in report.rows if r.shape == (B, T, H) and "cumsum" not in r.where], format_rows(report)


# -- results and gradients ---------------------------------------------------------------------------------------


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _grads(fn, rec, args, initial, weights):
    checked = rec.checked
    leaves = [a.detach().clone().requires_grad_() for a in args]
    init = {k: v.detach().clone().requires_grad_() for k, v in as_dict(initial, checked.states).items()}
    out, final = fn(*leaves, initial_state=init if len(init) > 1 else next(iter(init.values())),
                    output_final_state=True)
    out, final = as_dict(out, checked.outputs), as_dict(final, checked.states)
    loss = sum((out[k].double() * w).sum() for k, w in weights[0].items())
    loss = loss + sum((final[k].double() * w).sum() for k, w in weights[1].items())
    loss.backward()
    values = [v.detach().double() for v in list(out.values()) + list(final.values())]
    return values, [x.grad for x in leaves] + [init[s.name].grad for s in checked.states]


@pytest.mark.parametrize("name", [*FUSED, UNFUSED, "rwkv6", "mlstm"])
def test_results_and_gradients_match_the_reference(name):
    rec = _rec(name)
    args, initial = _args(rec, 1, 37, 2, 16, initial=True)
    gen = torch.Generator().manual_seed(1)
    shapes = ([(o.name, (1, 37, 2) + tuple(16 for _ in o.dims)) for o in rec.checked.outputs],
              [(s.name, (1, 2) + tuple(16 for _ in s.dims)) for s in rec.checked.states])
    weights = [{n: torch.randn(shape, generator=gen, dtype=torch.float64) for n, shape in part} for part in shapes]
    ref_values, ref_grads = _grads(rec.reference, rec, args, initial, weights)
    layer = recurrence_dsl.compile(rec, backend="triton", form="chunked", chunk_size=16, tuning=False)
    init32 = {k: v.float() for k, v in as_dict(initial, rec.checked.states).items()}
    values, grads = _grads(layer, rec, [a.float() for a in args], init32, weights)
    names = [s.name for s in rec.checked.inputs + rec.checked.params + rec.checked.states]
    errors = {f"value {i}": _rel(v, r) for i, (v, r) in enumerate(zip(values, ref_values))}
    errors.update({f"d{n}": _rel(g, r) for n, g, r in zip(names, grads, ref_grads)})
    assert max(errors.values()) <= 1e-5, errors


def test_the_fused_specs_call_the_fused_runtime():
    """What the generated Triton forms hand to the kernels instead of computing in torch."""
    scale = "scale=_fused_scale(lambda: (K**(-0.5)))"
    expected = {"gla": [scale], "gated_delta_net": ["v_step=v_step_S", scale],
                "mamba2": ["v_step=v_step_h", "decay_head=A", "skip=x, skip_weight=D"],
                # RWKV-6's bonus sum(i, r[i] * u[i] * k[i]) * v[j]: a weight per step [B, T, H] from the prologue
                "rwkv6": ["skip=v, skip_weight=skip_weight_S",
                          "o = read_S  # rwkv6.rec:12, its epilogue in the kernels"]}
    for name, args in expected.items():
        form = load_layer(analyse(_rec(name).checked)).triton_forms["chunked"]
        source = inspect.getsource(getattr(form, "__wrapped__", form))
        assert all(a in source for a in args), (name, source)
        assert "K**0.5" not in source and "D[..., None] * x" not in source and "beta[..., None] * v" not in source


def test_a_skip_weight_per_step_matches_the_explicit_sum():
    """`skip_weight` [B, T, H] (one weight per step, RWKV-6's bonus): the output and every gradient, the weight's
    included, equal those of the call without it plus weight * skip in torch; a key decay, an exclusive query, two
    sequences packed by cu_seqlens (the weight padded as the other per-step tensors; the dense call is
    test_results_and_gradients_match_the_reference's rwkv6). A weight of another shape is refused."""
    from codegen import triton_runtime as rt

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 20, 2, 16, generator=gen, requires_grad=True) for _ in range(3))
    g = (-torch.rand(1, 20, 2, 16, generator=gen)).requires_grad_()
    w = torch.randn(1, 20, 2, generator=gen, requires_grad=True)
    kwargs = {"cu_seqlens": torch.tensor([0, 7, 20])}
    (o,), ht = rt.chunked_linear_by(rt.KeyDecay, [(q, True)], k, v, g, None, 16, True, skip=v, skip_weight=w,
                                    **kwargs)
    (ref,), ref_ht = rt.chunked_linear_by(rt.KeyDecay, [(q, True)], k, v, g, None, 16, True, **kwargs)
    ref = ref + w[..., None] * v
    seeds = [torch.randn(o.shape, generator=gen), torch.randn(ht.shape, generator=gen)]
    got = torch.autograd.grad((o * seeds[0]).sum() + (ht * seeds[1]).sum(), [q, k, v, g, w])
    want = torch.autograd.grad((ref * seeds[0]).sum() + (ref_ht * seeds[1]).sum(), [q, k, v, g, w])
    for x, y in zip([o, *got], [ref, *want]):
        assert _rel(x, y.double()) <= 1e-6
    with pytest.raises(ValueError, match=r"skip_weight must have one weight per head \(\[2\]\) or one per step"):
        rt.chunked_linear_by(rt.KeyDecay, [(q, True)], k, v, g, skip=v, skip_weight=w[:, :5])


# -- the bytes against the hand-written kernels ------------------------------------------------------------------

SHAPE = dict(B=1, T=128, H=2)
SIZE, CHUNK = 32, 64


def _forward_bytes(name, dtype=torch.float32):
    rec = _rec(name)
    args, _ = _args(rec, SHAPE["B"], SHAPE["T"], SHAPE["H"], SIZE)
    report = measure_call(load_layer(analyse(rec.checked)), [a.to(dtype) for a in args], form="chunked",
                          chunk_size=CHUNK)
    hand = hand_written_for(name, {s: SIZE for s in rec.checked.sizes}, SHAPE["B"], SHAPE["T"], SHAPE["H"],
                            chunk=CHUNK, dtype=dtype)
    return report, hand


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", FUSED)
def test_forward_allocates_no_more_than_the_hand_written_kernels(name, dtype):
    """bfloat16 too: the dispatcher hands the chunked Triton form the call's own tensors (`takes_input_dtype`), so
    no float32 copy of an input or param and no float32 output to cast back is allocated. GLA's kernels sum its log
    decays over the spans they need (`triton_runtime._linear_forward`): no cumulative log decay is allocated."""
    report, hand = _forward_bytes(name, dtype)
    assert report.total <= hand["total"], (report.total, hand, [r.as_dict() for r in report.rows])
    if name == "gla":
        assert not [r for r in report.rows if "_cumsum" in r.where], [r.where for r in report.rows]
    # no full-size prologue or epilogue tensor: every [B, T, H, D] float32 buffer left is a kernel's
    full = SHAPE["B"] * SHAPE["T"] * SHAPE["H"] * SIZE * 4
    for row in report.rows:
        if row.bytes >= full:
            assert "torch.empty" in row.where, row.where
        assert ".to(dtype)" not in row.where and "_outputs" not in row.where or dtype == torch.float32, row.where


def test_hand_written_formulas():
    """The figures at one shape, by hand: fla's chunk_gla_fwd (B=2, T=100, H=3, K=V=64, BT=64, NT=2)."""
    got = hand_written_bytes("gla", B=2, T=100, H=3, K=64, V=64, chunk=64, elt=2)
    assert got == {"g_cumsum": 4 * 2 * 100 * 3 * 64, "h": 2 * 2 * 2 * 3 * 64 * 64, "A": 4 * 2 * 100 * 3 * 64}
    short = hand_written_bytes("mamba2", B=1, T=20, H=1, K=16, V=8, chunk=64)  # BT = pow2(20) = 32
    assert short["CB"] == 4 * 32 * 32 and short["dA_cumsum"] == 4 * 32
    with pytest.raises(ValueError, match="unknown kind"):
        hand_written_bytes("rwkv9", B=1, T=1, H=1, K=1, V=1)


# -- half precision: the kernels load float16 / bfloat16 as they are ------------------------------------------------


@pytest.mark.parametrize("name", FUSED)
def test_half_precision_runs_in_its_own_dtype(name):
    """float16 against the float64 reference (relative error <= 5e-3 for values, 2e-2 for gradients: float16 rounds
    the inputs, the outputs and the gradients handed back, everything else runs in float32); bfloat16 (whose
    arithmetic Triton's interpreter gets wrong) only runs: outputs and gradients come back in bfloat16, finite.
    T = 37 in chunks of 16, as the float32 test above."""
    rec = _rec(name)
    args, initial = _args(rec, 1, 37, 2, 16, initial=True)
    init32 = {k: v.float() for k, v in as_dict(initial, rec.checked.states).items()}
    layer = recurrence_dsl.compile(rec, backend="triton", form="chunked", chunk_size=16, tuning=False)
    shapes = ([(o.name, (1, 37, 2) + tuple(16 for _ in o.dims)) for o in rec.checked.outputs],
              [(s.name, (1, 2) + tuple(16 for _ in s.dims)) for s in rec.checked.states])
    gen = torch.Generator().manual_seed(2)
    weights = [{n: torch.randn(shape, generator=gen, dtype=torch.float64) for n, shape in part} for part in shapes]
    half = [a.half() for a in args]
    ref_values, ref_grads = _grads(rec.reference, rec, [a.double() for a in half], initial, weights)
    values, grads = _grads(layer, rec, half, init32, weights)
    errors = {f"value {i}": _rel(v, r) for i, (v, r) in enumerate(zip(values, ref_values))}
    grad_errors = {f"d{i}": _rel(g, r) for i, (g, r) in enumerate(zip(grads, ref_grads))}
    assert max(errors.values()) <= 5e-3, errors
    assert max(grad_errors.values()) <= 2e-2, grad_errors

    leaves = [a.bfloat16().requires_grad_() for a in args]
    out, _ = layer(*leaves, initial_state=init32 if len(init32) > 1 else next(iter(init32.values())),
                   output_final_state=True)
    out = as_dict(out, rec.checked.outputs)
    assert all(o.dtype == torch.bfloat16 and torch.isfinite(o).all() for o in out.values())
    sum(o.float().sum() for o in out.values()).backward()
    assert all(x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all() for x in leaves)


# -- the backward ----------------------------------------------------------------------------------------------------


def test_hand_written_backward_formulas():
    """By hand at B=1, T=100, H=2, K=V=64, BT=64, NT=2 (states: 1 * 2 * 2 * 64 * 64 = 16384 elements)."""
    gla = hand_written_backward_bytes("gla", B=1, T=100, H=2, K=64, V=64, chunk=64)
    assert gla == {"h": 4 * 16384, "dh": 4 * 16384, "dA": 4 * 200 * 64, "dq_dk_intra": 8 * 200 * 64}
    half = hand_written_backward_bytes("gla", B=1, T=100, H=2, K=64, V=64, chunk=64, elt=2)
    assert half["g_cumsum"] == 4 * 200 * 64 and half["dq_dk_dg_float32"] == 12 * 200 * 64
    delta = hand_written_backward_bytes("gated_delta", B=1, T=100, H=2, K=64, V=64, chunk=64, elt=2)
    assert delta["h"] == delta["dh"] == 2 * 16384 and delta["w"] == delta["dk_wy"] == 2 * 200 * 64
    assert delta["dg_blocks"] == 4 * 200 + 4 * 200 and "dg_cumsum" in delta
    mamba = hand_written_backward_bytes("mamba2", B=1, T=100, H=2, K=64, V=64, chunk=64)
    assert mamba["CB"] == mamba["dCB"] == 4 * 2 * 2 * 64 * 64 and mamba["states"] == 4 * 16384
    both = hand_written_for("gla", {"K": 64, "V": 64}, 1, 100, 2, backward=True)
    assert both["total"] == both["forward"] + both["backward"] == sum(both["buffers"].values()) + sum(gla.values())
    with pytest.raises(ValueError, match="unknown kind"):
        hand_written_backward_bytes("rwkv9", B=1, T=1, H=1, K=1, V=1)


def test_a_gradient_handed_back_is_not_an_intermediate():
    """The counter keeps storages alive, not tensors: a reference to the tensor would make autograd copy the
    gradient into `.grad` and the one the call returned would count."""
    x = torch.randn(4, 8, requires_grad=True)

    def fn():
        return (x * 3).sum(-1)  # backward: the gradient of x is a new [4, 8] tensor, handed back as x.grad

    report = measure(fn, [x], backward=True)
    # (the sum's backward makes a [4, 1] gradient: 16 bytes; x's own [4, 8] gradient, 128 bytes, must not count)
    assert report.by_phase.get("backward", 0) < 4 * 8 * 4, [r.as_dict() for r in report.rows]
    assert x.grad is not None and torch.equal(x.grad, torch.full((4, 8), 3.0))


# (spec, dtype) -> the hand-written figure of a training step at B=2, T=1024, H=4, K=V=128 (Mamba2: N=P=128), and what
# the linear chunked form allocated when this was written (`recdsl kernels SPEC --backward --target sm_90` gives the
# same figure, compiling the kernels instead of skipping them); before its backward read h and dh in place and kept
# a scalar decay's G [B, T, H], and before a call without an initial state
# allocated none (1 MiB less): GLA 53,581,840 / 59,846,672 and Mamba2 64,405,524 / 72,800,340
TRAINING_STEPS = {("gla", torch.float32): (41_943_040, 35_765_264), ("gla", torch.bfloat16): (54_525_952, 46_212_112),
                  ("mamba2", torch.float32): (73_793_536, 29_913_108),
                  ("mamba2", torch.bfloat16): (61_194_240, 44_566_612)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", ["gla", "mamba2"])
def test_linear_training_step_within_the_hand_written_figure(name, dtype, monkeypatch):
    """A forward + backward of GLA and Mamba2 at B=2, T=1024, H=4, K=V=128 (N=P=128) allocates no more than the
    published kernels' forward + backward (flash-linear-attention's chunk_gla, mamba_ssm's chunk scan), with no
    transposed copy of a state tensor and no scalar decay expanded over K (`triton_runtime._linear_backward`).
    The kernels are not run (Triton's interpreter launches nothing here): the count is of the host's allocations,
    the buffers the kernels would fill, as under `kernel_report.compile_only`. About 1 s each once the module is
    loaded."""
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *args, **kwargs: None)
    rec = _rec(name)
    sizes = {s: 128 for s in rec.checked.sizes}
    args, _ = sample_arguments(rec.checked, sizes, 2, 1024, 4, dtype=torch.float32, seed=0)
    report = measure_call(load_layer(analyse(rec.checked)), [a.to(dtype) for a in args], form="chunked",
                          backward=True)
    hand = hand_written_for(name, sizes, 2, 1024, 4, dtype=dtype, backward=True)
    figure, measured = TRAINING_STEPS[(name, dtype)]
    assert hand["total"] == figure
    assert report.total <= hand["total"], (report.total, hand["total"], format_rows(report))
    assert report.total == measured, format_rows(report)  # a change in either direction is worth a look
    wheres = [r.where for r in report.rows]
    assert not [w for w in wheres if "transpose" in w or "expand" in w], wheres
    if name == "mamba2":  # the scalar decay's cumulative sums are [B, T, H]
        assert all(r.shape == (2, 1024, 4) for r in report.rows if "_cumsum" in r.where), format_rows(report)


# (spec, dtype) -> a training step's intermediate bytes at B=2, T=1024, H=4, K=V=128 (host allocations, as above):
# the specs whose q and k are elementwise maps of raw inputs (tests/test_prologue_maps.py), measured with the maps
# applied by the backward's kernels at their loads and dq, dk stored through the vjp helpers (before, the backward
# mapping q and k into transient tensors, `_apply_map`: normalised linear attention 71,960,608 / 65,439,776, HGRN2
# 44,118,032 / 50,391,056); and RWKV-6, whose bonus term the output kernel adds as a skip term with a weight per step
# (before, a torch epilogue and its VJP over [B, T, H, V]: 107,157,520 / 81,915,920), and whose skip weight
# sum(r * u * k) and its VJP are printed Triton kernels (tests/test_elementwise_prologue.py; before, torch:
# 77,764,624 / 73,576,464). Normalised linear attention's z runs as a value column of S's call (V + 16 columns
# with the zeros, tests/test_divided_readout.py; before, a call of its own: 55,183,392 / 57,051,168). RWKV-6's skip
# weight [B, T, H] is float32 for bfloat16 inputs too (torch_forms: `scalar_dtype_`; before, bfloat16: 61,267,992):
# 16,384 B more for it, but `_unfuse` no longer takes a float32 copy of it (32,768 B) nor casts its gradient to
# bfloat16 (16,384 B). Normalised linear attention's chunk-start states [2, 4, 16, 128, 144] are float32 for
# bfloat16 inputs too (the normaliser column's call, `float32_states`, as mLSTM's below; before: 46,423,056).
# Since 2026-12-02 a layer copies an output or final state that is a view while autograd records (codegen/dispatch.py
# `_owned`: the caller may change it in place, tests/test_training_usage.py): the divided readouts' outputs
# (columns of one chunked call) and DeltaProduct's (every r-th step) are such views: 4,784,128 B more in float32
# and 2,686,976 B in bfloat16 (before: 52,296,720 and 51,141,648). Since 2026-12-02 (later) the epilogue returns
# its division q S / q z as it is, not as a `torch.broadcast_to` view of it (codegen/torch_forms.py `_full`), so the
# output is not copied: 4,194,304 B less in float32 and 2,097,152 B in bfloat16 (before: 57,080,848 / 53,828,624);
# the 589,824 B left are the final states S and z, columns of one buffer, copied as `measure_call` asks for them.
FUSED_STEPS = {("normalized_linear_attention", torch.float32): 52_895_760,
               ("normalized_linear_attention", torch.bfloat16): 51_728_400,
               ("hgrn2", torch.float32): 39_929_872, ("hgrn2", torch.bfloat16): 48_291_856,
               ("rwkv6", torch.float32): 52_880_408, ("rwkv6", torch.bfloat16): 61_232_152}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", ["normalized_linear_attention", "hgrn2", "rwkv6"])
def test_fused_training_step_figures(name, dtype, monkeypatch):
    """The backward of a chunked Triton form with prologue maps allocates no mapped q or k, and RWKV-6's call no
    epilogue tensor (the exact figures, and no [B, T, H, K] buffer but the kernels' own, the prologue's gradients and
    the casts of the gradients handed back). About 1 s each once the module is loaded (no kernel runs, as above)."""
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *args, **kwargs: None)
    rec = _rec(name)
    args, _ = sample_arguments(rec.checked, {s: 128 for s in rec.checked.sizes}, 2, 1024, 4, dtype=torch.float32,
                               seed=0)
    report = measure_call(load_layer(analyse(rec.checked)), [a.to(dtype) for a in args], form="chunked",
                          backward=True)
    assert report.total == FUSED_STEPS[(name, dtype)], format_rows(report)
    # every [B, T, H, 128] buffer left is a kernel's output or gradient buffer, a gradient's cast to the input
    # dtype, RWKV-6's prologue (its per-step weight and that weight's VJP) and skip weight's gradient (`_unfuse`),
    # or normalised linear attention's divided readout's epilogue in torch
    full = [r for r in report.rows if r.shape == (2, 1024, 4, 128)]
    allowed = ("torch.empty(", "grad.to(like.dtype)") + (("prologue", "_unfuse") if name == "rwkv6" else ("epilogue",))
    assert full and all(any(a in r.where for a in allowed) for r in full), format_rows(report)


# dtype -> mLSTM's chunked Triton call at B=2, T=1024, H=4, K=V=128 (host allocations, no kernel runs, as above):
# (forward, forward + backward) bytes with its input gate exp(ig) a per-step factor the kernels apply (`v_step`).
# Before, with k * exp(ig) a [B, T, H, K] prologue tensor and its VJP: float32 17,412,128 / 68,632,608, bfloat16
# 8,822,816 / 63,975,456. bfloat16's forward + backward is 0.2% over that (its backward's `_unfuse` sums dv * v over
# a float32 copy of v for each state, and k's gradient is cast back once per state)
# Its exp(ig) and logsigmoid(fg) [B, T, H] are printed Triton kernels (tests/test_elementwise_prologue.py; before,
# torch: float32 13,271,072 / 60,395,552, bfloat16 6,762,528 / 64,225,312).
# Its normaliser n runs as a value column of C's call (tests/test_divided_readout.py): the forward copies v into
# [v, 1, zeros] (V + 16 columns) and keeps wider chunk states, the backward runs one call's kernels (before, two
# calls: float32 13,191,204 / 60,217,384, bfloat16 6,719,524 / 64,133,160).
# exp(ig) and logsigmoid(fg) are float32 for bfloat16 inputs too (torch_forms: `scalar_dtype_`, for their accuracy
# at large input gates; before, bfloat16: 9,913,364 / 53,937,176): the forward 2 x 16,384 B more, the backward
# without `_unfuse`'s float32 copy of exp(ig) (32,768 B) and a cast of a [B, T, H] gradient to bfloat16 (16,384 B).
# The chunk-start states h [2, 4, 16, 128, 144] are float32 for bfloat16 inputs too (the normaliser column's call,
# `float32_states`: bfloat16 states gave 0.09 of the output at large input gates, tests/test_numerics.py): 4,718,592 B
# more in both (before, bfloat16: 9,946,132 / 53,920,792).
# Since 2026-12-02 a layer copies an output or final state that is a view while autograd records (codegen/dispatch.py
# `_owned`: the caller may change it in place, tests/test_training_usage.py): the divided readouts' outputs
# (columns of one chunked call) and DeltaProduct's (every r-th step) are such views: the step 4,784,128 B more in
# float32, 2,686,976 B in bfloat16 (before: 57,549,848 / 58,639,384). Since 2026-12-02 (later) the epilogue's division
# q C / q n is returned as it is, not as a `torch.broadcast_to` view (codegen/torch_forms.py `_full`): the output is
# not copied, the step 4,194,304 B less in float32, 2,097,152 B in bfloat16 (before: 62,333,976 / 61,326,360); the
# 589,824 B left are the final states C and n, columns of one buffer, copied as `measure_call` asks for them.
# Since 2026-12-02 exp(ig) and logsigmoid(fg) are computed at the kernels' loads from the raw ig and fg
# (tests/test_scalar_prologue_maps.py): no [B, T, H] value tensor (2 x 32,768 B in the forward, 4 x in the step),
# and the backward's `_row_scale_kernel` reads v in its dtype where `_unfuse` summed dv * v over a float32 copy of v
# [2, 1024, 4, 144] (4,718,592 B in bfloat16) (the step before it, with the division above: float32 58,139,672,
# bfloat16 59,229,208).
MLSTM_STEPS = {torch.float32: (19_646_484, 58_017_812), torch.bfloat16: (14_596_116, 54_425_620)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_mlstm_training_step_figures(dtype, monkeypatch):
    """mLSTM's forward allocates no [B, T, H, K] prologue tensor (its keys are the raw k) and its forward + backward
    the measured figures. About 1 s each once the module is loaded (no kernel runs)."""
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *args, **kwargs: None)
    rec = _rec("mlstm")
    args, _ = sample_arguments(rec.checked, {s: 128 for s in rec.checked.sizes}, 2, 1024, 4, dtype=torch.float32,
                               seed=0)
    layer = load_layer(analyse(rec.checked))
    forward = measure_call(layer, [a.to(dtype) for a in args], form="chunked")
    step = measure_call(layer, [a.to(dtype) for a in args], form="chunked", backward=True)
    assert (forward.total, step.total) == MLSTM_STEPS[dtype], (format_rows(forward), format_rows(step))
    assert not [r for r in forward.rows if r.shape == (2, 1024, 4, 128) and "torch.empty(" not in r.where], \
        format_rows(forward)


CHILD = """
import json, sys, torch
from codegen import kernel_report as kr
from codegen.intermediate_bytes import hand_written_for
import recurrence_dsl
rec = recurrence_dsl.load(sys.argv[1])["gated_delta_net"]
sizes = {"K": 128, "V": 128}
out = {}
for key, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
    kernels, counted = kr.report_recurrence(rec, sizes, 2, 1024, 4, dtype=dtype, target="sm_90", form="chunked",
                                            backward=True, intermediates=True)
    hand = hand_written_for("gated_delta_net", sizes, 2, 1024, 4, dtype=dtype, backward=True)
    out[key] = {"ours": counted.total, "hand": hand["total"], "forward": counted.by_phase["forward"],
                "hand_forward": hand["forward"], "rows": [r.as_dict() for r in counted.rows[:8]],
                "spills": [k.name for k in kernels if k.spill_bytes and dtype != torch.float32]}
print(json.dumps(out))
"""


# run in the background from the start of the session (tests/children.py)
GDN_BYTES = Child("intermediate_bytes_gated_delta_net", [sys.executable, "-c", CHILD,
                                                         str(SPECS_DIR / "gated_delta_net.rec")])


@GDN_BYTES.needed
def test_gated_delta_net_training_step_within_the_hand_written_figure():
    """Compiled for sm_90 (no kernel runs; a child process, since this one runs Triton's interpreter): at B=2,
    T=1024, H=4, K=V=128, the forward + backward allocates no more than flash-linear-attention's
    chunk_gated_delta_rule forward + backward, and the forward alone no more than its forward, in bfloat16
    (36,864,000; measured 35,667,984, 79,791,120 before: h, dh, W and U in bfloat16, dO read as given, v_step and
    scale applied in the kernels, dq and dv stored in the input dtype, the WY scratch on the storage of h and dh).
    Float32: see below. About 40 s."""
    from codegen import kernel_report

    try:
        kernel_report.find_tools("sm_90")
    except kernel_report.ToolMissing as err:
        pytest.fail(f"ptxas / cuobjdump from the triton wheel are needed: {err}")
    run = GDN_BYTES.result()
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    bf16, f32 = got["bf16"], got["f32"]
    assert bf16["ours"] <= bf16["hand"] and bf16["forward"] <= bf16["hand_forward"], bf16
    # float32 runs "ieee" dots in chunks of 32 steps (`_delta_ieee_defaults`: at 64 eight kernels spill, up to 3.9 KB),
    # so its chunk-start states are twice fla's (whose float32 dots are tf32, in chunks of 64): held to what it was
    # measured at then, 8% over fla's figure
    assert f32["ours"] <= 77_079_568 and f32["forward"] <= 25_404_432, f32
    assert not bf16["spills"], got


# -- no initial state ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gla", "mlstm"])
def test_no_initial_state_is_no_zero_state(name):
    """Without `initial_state` the linear chunked Triton forms get None (codegen/dispatch.py
    `takes_no_initial_state`; mLSTM's normaliser state reaches its runtime call as a view): neither the forward nor
    the backward allocates a zero state [B, H, ...] or its gradient, and values and gradients equal those of an
    explicit zero initial state."""
    rec = _rec(name)
    B, T, H, size = 2, 20, 2, 16
    args, _ = _args(rec, B, T, H, size)
    args = [a.float() for a in args]
    layer = load_layer(analyse(rec.checked))
    report = measure_call(layer, args, form="chunked", chunk_size=16, backward=True)
    state_shapes = {(B, H) + tuple(size for _ in s.dims) for s in rec.checked.states}
    assert not [r.where for r in report.rows if r.shape in state_shapes]

    def run(initial):
        leaves = [a.detach().clone().requires_grad_() for a in args]
        out, final = layer(*leaves, initial_state=initial, output_final_state=True, form="chunked",
                           backend="triton", chunk_size=16)
        parts = [*as_dict(out, rec.checked.outputs).values(), *as_dict(final, rec.checked.states).values()]
        sum(p.sum() * (i + 1) for i, p in enumerate(parts)).backward()
        return [p.detach() for p in parts], [x.grad for x in leaves]

    zeros = {s.name: torch.zeros((B, H) + tuple(size for _ in s.dims)) for s in rec.checked.states}
    got, want = run(None), run(zeros if len(zeros) > 1 else next(iter(zeros.values())))
    for x, y in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


# DeltaProduct's chunked Triton call at B=2, T=1024, H=4, K=V=128 in bfloat16 (host allocations, no kernel runs, as
# above): forward + backward with its updates' values b_n * v_n applied by the delta kernels (`v_step`) and the
# readout's K ** -0.5 by the output kernel and dO's loads (`scale`). Before, two [B, T, H, V] products b_n * v_n and
# their VJPs, a torch epilogue and its VJP, and the readout's queries interleaved with a zeros_like copy:
# 114,605,072 bytes (`recdsl kernels specs/delta_product.rec --backward --json` at that shape)
# Since 2026-12-02 a layer copies an output or final state that is a view while autograd records (codegen/dispatch.py
# `_owned`: the caller may change it in place, tests/test_training_usage.py): the divided readouts' outputs
# (columns of one chunked call) and DeltaProduct's (every r-th step) are such views: 4,194,304 B more
# (before: 102,120,464).
DELTA_PRODUCT_STEP = 106_307_600


def test_delta_product_training_step_figure(monkeypatch):
    """No [B, T, H, V] tensor of the prologue or epilogue: every one left is a kernel's buffer, a gradient's cast, the
    sub-steps' interleaving (k, v and the spread queries) or autograd's casts between the backward functions."""
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *args, **kwargs: None)
    rec = _rec("delta_product")
    args, _ = sample_arguments(rec.checked, {s: 128 for s in rec.checked.sizes}, 2, 1024, 4, dtype=torch.float32,
                               seed=0)
    report = measure_call(load_layer(analyse(rec.checked)), [a.to(torch.bfloat16) for a in args], form="chunked",
                          backward=True)
    assert report.total == DELTA_PRODUCT_STEP, format_rows(report)
    assert not [r for r in report.rows if "epilogue" in r.where or "prologue" in r.where or " * " in r.where
                and "__chunked" in r.where], format_rows(report)


# RWKV-7's chunked Triton forward at that shape in bfloat16 (host allocations, no kernel runs): its bonus
# sum(r * u * k) * v added by the DPLR output kernel as a skip term weighted per step. Before, a torch epilogue over
# [B, T, H, V] (16,809,984 bytes of it): 92,991,504 bytes; with the bonus fused 84,602,896; with its prologue's
# b = -(a * kk) written by a printed Triton kernel (no torch temporaries; a 4-byte unsafe-step flag) 72,003,604;
# with the bfloat16 inputs taken as they are (no float32 copies of r, w, k, v, kk, a, u, 25,167,872 bytes, nor a
# float32 o cast afterwards, 4,194,304; b and the chunk-start states float32 as they were) 42,606,612; with
# b = -(a * kk) formed by the DPLR kernels where they load b (`b_map`: no [B, T, H, K] float32 b, 4,194,304 bytes;
# the raw a is checked by `_check_steps` instead) 38,430,740. Forward + backward: 127,281,176 -> 123,105,304 (the
# backward, the derived adjoint, never read b: it takes the raw inputs); with the skip weight summed by the output
# kernel (`bonus`: no prologue kernel, no [B, T, H] float32 weight nor unsafe-step flag) 38,387,728 and 123,062,292.
RWKV7_FORWARD = 38_382_608
RWKV7_STEP = 123_057_172


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "step"])
def test_rwkv7_chunked_call_has_no_epilogue_or_b_tensor(monkeypatch, backward):
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *args, **kwargs: None)
    rec = _rec("rwkv7")
    args, _ = sample_arguments(rec.checked, {s: 128 for s in rec.checked.sizes}, 2, 1024, 4, dtype=torch.float32,
                               seed=0)
    report = measure_call(load_layer(analyse(rec.checked)), [a.to(torch.bfloat16) for a in args], form="chunked",
                          backward=backward)
    assert not [r for r in report.rows if "epilogue" in r.where], format_rows(report)
    # no prologue tensor at all (b and the skip weight are formed where the kernels load their inputs)
    assert not [r for r in report.rows if "prologue" in r.where], format_rows(report)
    assert report.total == (RWKV7_STEP if backward else RWKV7_FORWARD), format_rows(report)


# mamba's Triton scan form at B=2, T=1024, H=4, D=64, N=16, float32 inputs (host allocations, no kernel runs):
# forward bytes. Before its prologue ran inside the scan kernels (`fused_scan`), the torch prologue stored the decay
# a and injection b [B, T, H, D, N] float32 (2 x 33.6 MB) and their temporaries: 138,444,800; forward + backward
# 524,353,536 -> 390,135,808 (the backward's da and db are transient buffers of the fused backward kernel).
MAMBA_SCAN_FORWARD = 4_227_072
# Forward + backward: 390,135,808 -> 148,963,328 since the backward kernels add the prologue's gradients themselves
# (`NAME__scan_S_vjp`): no da, db [B, T, H, D, N] float32 (2 x 33.5 MB), nor the torch VJP's temporaries over them.
MAMBA_SCAN_STEP = 148_963_328


def test_mamba_fused_scan_forward_allocates_no_decay_or_injection(monkeypatch):
    """The fused scan's forward allocates no [B, T, H, D, N] tensor: s is the only one, and it is the final
    state's storage (an output), so the forward's figure is a few small buffers (exact, and far under the
    138 MB of a and b the torch prologue stored)."""
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *args, **kwargs: None)
    rec = _rec("mamba")
    args, _ = sample_arguments(rec.checked, {"D": 64, "N": 16}, 2, 1024, 4, dtype=torch.float32, seed=0)
    report = measure_call(load_layer(analyse(rec.checked)), args, form="scan")
    assert not [r for r in report.rows if r.shape == (2, 1024, 4, 64, 16)], format_rows(report)
    assert report.total == MAMBA_SCAN_FORWARD, format_rows(report)
    assert report.total < 2 * 4 * 1024 * 4 * 64 * 16  # under one [B, T, H, D, N] float32 tensor


def test_mamba_fused_scan_backward_allocates_no_da_or_db(monkeypatch):
    """The fused scan's backward adds x's, dt's, B's and A's gradients in its kernels: nothing of the torch prologue
    VJP runs, and the step's figure is pinned (what is left: the epilogue VJP's state gradient and autograd's
    accumulation of it, the saved states)."""
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *args, **kwargs: None)
    rec = _rec("mamba")
    args, _ = sample_arguments(rec.checked, {"D": 64, "N": 16}, 2, 1024, 4, dtype=torch.float32, seed=0)
    report = measure_call(load_layer(analyse(rec.checked)), args, form="scan", backward=True)
    assert not [r for r in report.rows if "prologue" in r.where], format_rows(report)
    assert report.total == MAMBA_SCAN_STEP, format_rows(report)
