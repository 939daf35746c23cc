"""The forward of the Triton chunked and parallel forms where a spec's epilogue is fused into the kernels (`_Fused`
in codegen/triton_runtime.py): outputs and final states against the float64 reference, one call and packed
sequences (`cu_seqlens`).

tests/test_training_gradients.py compares gradients only, and an epilogue term's gradient comes from torch
(`_unfuse`), not from the kernels, so a wrong fused forward term can pass it; here the forward is compared itself.
Each spec is checked to pass the term it stands for (a spy on the generated module's `triton_chunked_linear_by`,
which the parallel form's calls go through too):

  gla                the readout's scale (K ** -0.5) with a key decay
  retention          the scale with a scalar decay
  mamba2             v_step (dt), decay_head (A), skip (x) with a weight per head (D)
  rwkv6              skip (v) with a weight per step (the bonus sum(r * u * k)), an exclusive query

and DeltaProduct (specs/delta_product.rec, and a gated variant in tests/data), whose r updates per step run as
sub-steps through `triton_chunked_delta_by`: the updates' b_n * v_n as v_step and the readout's K ** -0.5 as scale,
checked with the gradients of every input and the initial state (the delta backward applies both in its kernels);
and RWKV-7 (specs/rwkv7.rec), whose bonus sum(r * u * k) * v is the skip term of `triton_chunked_dplr_by`'s output
kernel: with gradients, and with a NaN input (the steps before it then run as strided views of the call's inputs).

Sizes 16 and 24 (a padded axis), H = 2 (a per-head term read at the wrong head shows), T = 40 in chunks / query
blocks of 16 (the last partial); packed: sequences of 17, 5 and 18 steps. Relative error <= 1e-5 in float32.
"""

from __future__ import annotations

import pytest
import torch

import recurrence_dsl
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPECS_DIR, TESTS, as_dict

pytest.importorskip("triton")

TOL = 1e-5
T, H = 40, 2
CU = torch.tensor([0, 17, 22, 40])
PARALLEL_CONFIG = {"block_t": 16, "block_k": 16, "block_v": 16, "num_warps": 4, "num_stages": 1}
# spec -> the fused terms its Triton chunked call must pass (checked on the call's keyword arguments)
TERMS = {
    "gla": ("scale",),
    "retention": ("scale",),
    "mamba2": ("v_step", "decay_head", "skip", "head_skip_weight"),
    "rwkv6": ("skip", "step_skip_weight"),
}
SPECS = {name: recurrence_dsl.load(SPECS_DIR / f"{name}.rec")[name] for name in TERMS}


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _passes(term: str, kwargs: dict) -> bool:
    """Whether a `chunked_linear_by` call's keyword arguments carry the fused `term`."""
    if term == "scale":
        return kwargs.get("scale", 1.0) != 1.0
    weight, skip = kwargs.get("skip_weight"), kwargs.get("skip")
    if term == "head_skip_weight":  # one weight per head, [H] (or [H, 1]: `_fused_of` flattens it)
        return weight is not None and weight.numel() == skip.shape[2]
    if term == "step_skip_weight":  # one weight per step, skip's [B, T, H]
        return weight is not None and tuple(weight.shape) == tuple(skip.shape[:3])
    return kwargs.get(term) is not None


def _case(rec, packed: bool):
    """(float64 args, initial state as the call takes it, call kwargs): one batch of 2, or 3 packed sequences."""
    sizes = {s: (16, 24)[i % 2] for i, s in enumerate(rec.checked.sizes)}
    batch = len(CU) - 1 if packed else 2
    args, initial = sample_arguments(rec.checked, sizes, batch, T, H, dtype=torch.float64, seed=5,
                                     with_initial_state=True)
    if packed:  # one packed row of inputs; params and initial states as they are (N rows)
        args = [a[:1] if i < len(rec.checked.inputs) else a for i, a in enumerate(args)]
    return args, initial, ({"cu_seqlens": CU} if packed else {})


def _run(layer, rec, form, args, initial, more, mutate=None):
    """(outputs, final states) as dicts of the Triton `form` in float32, and the fused calls' keyword arguments;
    mutate(kwargs): changes a call's arguments before it runs (to show a wrong term is caught)."""
    scope = layer.triton_forms["chunked"].__globals__
    original, calls = scope["triton_chunked_linear_by"], []

    def spy(*a, **kw):
        calls.append(kw)
        if mutate is not None:
            kw = mutate(dict(kw))
        return original(*a, **kw)

    scope["triton_chunked_linear_by"] = spy
    try:
        init = {k: v.float() for k, v in as_dict(initial, rec.checked.states).items()}
        state = init if len(init) > 1 else next(iter(init.values()))
        options = {"config": PARALLEL_CONFIG} if form == "parallel" else {"chunk_size": 16}
        with torch.no_grad():
            out, final = layer(*[a.float() for a in args], initial_state=state, output_final_state=True,
                               form=form, **options, **more)
    finally:
        scope["triton_chunked_linear_by"] = original
    return as_dict(out, rec.checked.outputs), as_dict(final, rec.checked.states), calls


def _errors(rec, got, ref) -> dict:
    out, final = got
    ref_out, ref_final = as_dict(ref[0], rec.checked.outputs), as_dict(ref[1], rec.checked.states)
    errors = {f"output {k}": _rel(out[k], ref_out[k]) for k in ref_out}
    errors.update({f"final {k}": _rel(final[k], ref_final[k]) for k in ref_final})
    return errors


@pytest.mark.parametrize("packed", [False, True], ids=["batch", "cu_seqlens"])
@pytest.mark.parametrize("form", ["chunked", "parallel"])
@pytest.mark.parametrize("name", sorted(TERMS))
def test_fused_epilogue_outputs_and_final_states(name, form, packed):
    rec = SPECS[name]
    layer = recurrence_dsl.compile(rec, backend="triton", tuning=False)
    assert form in layer.triton_forms
    args, initial, more = _case(rec, packed)
    ref = rec.reference(*args, initial_state=initial, output_final_state=True, **more)
    out, final, calls = _run(layer, rec, form, args, initial, more)
    assert calls and all((kw.get("parallel") is not None) == (form == "parallel") for kw in calls)
    missing = [t for t in TERMS[name] if not any(_passes(t, kw) for kw in calls)]
    assert not missing, f"{name}'s Triton call passes no fused {missing}"
    assert all(v.dtype == torch.float32 for v in {**out, **final}.values())
    errors = _errors(rec, (out, final), ref)
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("form", ["chunked", "parallel"])
def test_a_wrong_fused_term_is_caught(form):
    """RWKV-6's per-step skip weight halved on its way into the kernels: the outputs leave the tolerance (and the
    final state, which the epilogue does not touch, stays within it)."""
    rec = SPECS["rwkv6"]
    layer = recurrence_dsl.compile(rec, backend="triton", tuning=False)
    args, initial, more = _case(rec, packed=False)
    ref = rec.reference(*args, initial_state=initial, output_final_state=True)

    def halve(kw):
        kw["skip_weight"] = kw["skip_weight"] * 0.5
        return kw

    out, final, _ = _run(layer, rec, form, args, initial, more, mutate=halve)
    errors = _errors(rec, (out, final), ref)
    assert errors["output o"] > 100 * TOL and errors["final S"] <= TOL, errors


# -- a rank-r update: DeltaProduct's sub-steps through the delta rule's kernels --------------------------------------

# DeltaProduct's updates' values b_n * v_n go to `triton_chunked_delta_by` as the raw v_n with v_step (the b_n,
# interleaved like the sub-steps), and its readout's K ** -0.5 as scale: the kernels apply both, so its forward and
# its gradients (the delta backward's own dv_step and scaled dO) are compared here.
RANK_R = {name: recurrence_dsl.load(path)[name] for name, path in
          [("delta_product", SPECS_DIR / "delta_product.rec"),
           ("gated_delta_product", TESTS / "data" / "gated_delta_product.rec")]}


def _spied_grads(layer, args, initial, weights, dtype, more, calls=None, entry="triton_chunked_delta_by"):
    """[output, final state, the gradients of every input and param and of the initial state] of
    sum(w * o) + sum(w * S) in `dtype`, for a spec of one output and one state; calls: a list that receives the
    keyword arguments of each call of the runtime's `entry` the chunked Triton form makes."""
    scope = layer.triton_forms["chunked"].__globals__ if calls is not None else None
    original = scope[entry] if scope else None
    if scope:
        scope[entry] = lambda *a, **kw: calls.append(kw) or original(*a, **kw)
    try:
        leaves = [a.detach().to(dtype).requires_grad_() for a in args]
        s0 = initial.detach().to(dtype).requires_grad_()
        out, final = layer(*leaves, initial_state=s0, output_final_state=True, **more)
    finally:
        if scope:
            scope[entry] = original
    (out.double() * weights[0]).sum().add((final.double() * weights[1]).sum()).backward()
    return [out.detach(), final.detach()] + [x.grad for x in leaves] + [s0.grad]


@pytest.mark.parametrize("packed", [False, True], ids=["batch", "cu_seqlens"])
@pytest.mark.parametrize("name", sorted(RANK_R))
def test_rank_r_fused_values_and_scale_with_gradients(name, packed):
    rec = RANK_R[name]
    args, initial, more = _case(rec, packed)
    ref_out, ref_final = rec.reference(*args, initial_state=initial, output_final_state=True, **more)
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in (ref_out, ref_final)]
    ref = _spied_grads(rec.reference, args, initial, weights, torch.float64, more)
    layer = recurrence_dsl.compile(rec, backend="triton", form="chunked", chunk_size=16, tuning=False)
    calls = []
    got = _spied_grads(layer, args, initial, weights, torch.float32, more, calls)
    K = args[0].shape[-1]  # q [B, T, H, K]
    assert len(calls) == 1 and calls[0].get("v_step") is not None and calls[0].get("scale") == K ** -0.5, calls
    names = ["output o", "final S"] + [f"d{i.name}" for i in rec.checked.inputs] + ["dS0"]
    errors = {n: _rel(g, r) for n, g, r in zip(names, got, ref)}
    assert max(errors.values()) <= TOL, errors


# -- a diagonal-plus-rank-one state: RWKV-7's bonus in the output kernel ---------------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["batch", "cu_seqlens"])
def test_rwkv7_bonus_is_a_skip_term_of_the_dplr_output_kernel(packed):
    """RWKV-7's o = r . S + sum(r * u * k) * v: `triton_chunked_dplr_by` gets skip v and bonus u, no skip weight
    (its output kernel sums the weight sum(r * u * k) from the r and k it loads and adds weight * v as it stores: no
    prologue kernel runs), and the outputs, the final state and the gradients (the recurrent form's derived
    adjoint, fed the chunked form's checkpoints) match the reference."""
    rec = recurrence_dsl.load(SPECS_DIR / "rwkv7.rec")["rwkv7"]
    args, initial, more = _case(rec, packed)
    ref_out, ref_final = rec.reference(*args, initial_state=initial, output_final_state=True, **more)
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in (ref_out, ref_final)]
    ref = _spied_grads(rec.reference, args, initial, weights, torch.float64, more)
    layer = recurrence_dsl.compile(rec, backend="triton", form="chunked", chunk_size=16, tuning=False)
    calls = []
    got = _spied_grads(layer, args, initial, weights, torch.float32, more, calls, entry="triton_chunked_dplr_by")
    assert calls and all(_passes("skip", kw) and _passes("bonus", kw) and kw.get("skip_weight") is None
                         for kw in calls), calls
    names = ["output o", "final S"] + [f"d{x.name}" for x in rec.checked.inputs + rec.checked.params] + ["dS0"]
    errors = {n: _rel(g, r) for n, g, r in zip(names, got, ref)}
    assert max(errors.values()) <= TOL, errors


# A chunked call that meets a non-finite input (`_check_steps` raises UnsafeSteps) runs again on its steps before
# that one, as views x[:, :t] of the call's inputs (codegen/dispatch.py), strided for more than one row; the fused
# skip term (v itself) is one of them. (cu_seqlens, (row, step, head, channel) of a NaN in k)
AFTER_A_NAN = {
    "batch": (None, (1, 25, 0, 3)),  # steps 0..24 chunked, the rest step by step
    "cu_seqlens": (torch.tensor([0, 20, 40]), (0, 33, 1, 3)),  # two sequences of 20: one batch of 2 rows
}


@pytest.mark.parametrize("case", sorted(AFTER_A_NAN))
def test_rwkv7_bonus_before_and_after_a_nan_matches_the_reference(case):
    """RWKV-7's chunked Triton form with a NaN in k: the call that runs the steps before it takes strided views
    (its output kernel must read skip = v and the skip weight as dense rows); outputs and final state against the
    reference, non-finite exactly where the reference's are and the finite entries within TOL (the property of
    tests/test_numerics.py, whose rwkv7 example found a wrong bonus before the NaN)."""
    rec = recurrence_dsl.load(SPECS_DIR / "rwkv7.rec")["rwkv7"]
    cu, nan = AFTER_A_NAN[case]
    args, initial, more = _case(rec, packed=False)
    n_in = len(rec.checked.inputs)
    if cu is not None:  # one packed row of two sequences; their initial states
        args = [a[:1] if i < n_in else a for i, a in enumerate(args)]
        more = {"cu_seqlens": cu}
    args[2][nan] = float("nan")  # k [B, T, H, K]
    ref = rec.reference(*args, initial_state=initial, output_final_state=True, **more)
    layer = recurrence_dsl.compile(rec, backend="triton", form="chunked", chunk_size=16, tuning=False)
    scope, calls = layer.triton_forms["chunked"].__globals__, []
    original = scope["triton_chunked_dplr_by"]
    scope["triton_chunked_dplr_by"] = lambda *a, **kw: calls.append(kw) or original(*a, **kw)
    try:
        with torch.no_grad():
            out, final = layer(*[a.float() for a in args], initial_state=initial.float(), output_final_state=True,
                               **more)
    finally:
        scope["triton_chunked_dplr_by"] = original
    # the call that ran the kernels (after the refused one) took a strided skip
    assert any(kw.get("skip") is not None and not kw["skip"].is_contiguous() for kw in calls), calls
    for what, got, want in [("output o", out, ref[0]), ("final S", final, ref[1])]:
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), finite), f"{case}: {what} is non-finite where the reference is not"
        assert not finite.all(), f"{case}: {what}: the NaN should reach the reference's {what}"
        err = _rel(got[finite], want[finite])
        assert err <= TOL, f"{case}: {what}: rel err {err:.3g}"
    head = _rel(out[:, :nan[1]], ref[0][:, :nan[1]])  # the steps before the NaN (packed: of both sequences)
    assert head <= TOL, f"{case}: outputs before step {nan[1]}: rel err {head:.3g}"
