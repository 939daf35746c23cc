"""The chunked Triton form's elementwise prologue maps as printed `@triton.jit` helpers (issue 10: the prologue
fused into the kernels' loads).

A prologue value that is an elementwise function of one raw input of its own layout (normalized linear attention's
feature maps 1 + elu(q), 1 + elu(k); HGRN2's input gate 1 - exp(f) of its log forget gate f) is printed as a helper
`NAME__map_<input>(x)` with its derivative `NAME__map_<input>_vjp(x, grad)` and handed to
`triton_chunked_linear_by` as `q_map` / `k_map`: the forward and backward kernels apply it where they load q or k,
and the backward kernels store dq and dk through the derivative helper, so the gradient the call returns is the raw
input's and no mapped copy of q or k is made.

- Results and every gradient against the float64 reference, float32, relative error <= 1e-5, T = 37 in chunks of 16,
  with an initial state, and with three sequences packed by cu_seqlens.
- The forward allocates no [B, T, H, K] tensor for a mapped value (`codegen.intermediate_bytes`), and the module's
  source holds the printed helpers, the call passes them, and no torch prologue computes them.
- A module without maps (gla) carries none of the runtime's map helpers and kernels; one with maps all of them.
- The runtime: bad maps are refused naming the argument; a map matches the same call on the mapped tensors, with a
  scalar and a key decay, an inclusive and an exclusive query.

Kernels run in Triton's interpreter (tests/conftest.py); about 40 s on an idle two-core machine.
"""

from __future__ import annotations

import ast

import pytest
import torch
import torch.nn.functional as F

import recurrence_dsl
from codegen.intermediate_bytes import measure_call
from codegen.load import load_layer
from codegen.module import module_source
from recurrence_dsl.analysis import analyse
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPECS_DIR, as_dict

triton = pytest.importorskip("triton")
tl = triton.language

# spec -> (the helpers its module prints, the keywords its chunked Triton form passes)
MAPPED = {
    "normalized_linear_attention": (["normalized_linear_attention__map_q", "normalized_linear_attention__map_k"],
                                    ["q_map=(normalized_linear_attention__map_q, ",
                                     "k_map=(normalized_linear_attention__map_k, "]),
    "hgrn2": (["hgrn2__map_f"], ["k_map=(hgrn2__map_f, hgrn2__map_f_vjp)"]),
}
B, T, H, D, CHUNK = 1, 37, 2, 16, 16


def _rec(name: str) -> recurrence_dsl.Recurrence:
    return recurrence_dsl.load(SPECS_DIR / f"{name}.rec")[name]


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _run(fn, rec, args, initial, weights, **kwargs):
    """(values, gradients of every input, param and initial state) of sum(weights * results)."""
    checked = rec.checked
    leaves = [a.detach().clone().requires_grad_() for a in args]
    init = {k: v.detach().clone().requires_grad_() for k, v in as_dict(initial, checked.states).items()}
    out, final = fn(*leaves, initial_state=init if len(init) > 1 else next(iter(init.values())),
                    output_final_state=True, **kwargs)
    out, final = as_dict(out, checked.outputs), as_dict(final, checked.states)
    loss = sum((out[k].double() * w).sum() for k, w in weights[0].items())
    loss = loss + sum((final[k].double() * w).sum() for k, w in weights[1].items())
    loss.backward()
    values = [v.detach().double() for v in list(out.values()) + list(final.values())]
    return values, [x.grad for x in leaves] + [init[s.name].grad for s in checked.states]


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "cu_seqlens"])
@pytest.mark.parametrize("name", sorted(MAPPED))
def test_values_and_gradients_match_the_float64_reference(name, packed):
    rec = _rec(name)
    rows = 3 if packed else B  # three packed sequences start from three initial states
    args, initial = sample_arguments(rec.checked, {s: D for s in rec.checked.sizes}, B, T, H,
                                     dtype=torch.float64, seed=3, with_initial_state=True)
    if packed:
        initial = {s.name: torch.randn((rows, H) + (D,) * len(s.dims), dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(4)) for s in rec.checked.states}
    kwargs = {"cu_seqlens": torch.tensor([0, 5, 22, T])} if packed else {}
    gen = torch.Generator().manual_seed(1)
    shapes = ([(o.name, (B, T, H) + (D,) * len(o.dims)) for o in rec.checked.outputs],
              [(s.name, (rows, H) + (D,) * len(s.dims)) for s in rec.checked.states])
    weights = [{n: torch.randn(shape, generator=gen, dtype=torch.float64) for n, shape in part} for part in shapes]
    ref_values, ref_grads = _run(rec.reference, rec, args, initial, weights, **kwargs)
    layer = recurrence_dsl.compile(rec, backend="triton", form="chunked", chunk_size=CHUNK, tuning=False)
    init32 = {k: v.float() for k, v in as_dict(initial, rec.checked.states).items()}
    values, grads = _run(layer, rec, [a.float() for a in args], init32, weights, **kwargs)
    names = [s.name for s in rec.checked.inputs + rec.checked.params + rec.checked.states]
    errors = {f"value {i}": _rel(v, r) for i, (v, r) in enumerate(zip(values, ref_values))}
    errors.update({f"d{n}": _rel(g, r) for n, g, r in zip(names, grads, ref_grads)})
    assert len(errors) == len(ref_values) + len(names)
    assert max(errors.values()) <= 1e-5, errors


@pytest.mark.parametrize("name", sorted(MAPPED))
def test_the_module_prints_the_helpers_and_no_prologue_tensor_is_allocated(name):
    rec = _rec(name)
    analysis = analyse(rec.checked)
    source = module_source([analysis], analysis.recurrence.source.filename)
    helpers, keywords = MAPPED[name]
    for helper in helpers:
        assert f"@triton.jit\ndef {helper}(x):" in source, helper
        assert f"@triton.jit\ndef {helper}_vjp(x, grad):" in source, helper
    assert all(k in source for k in keywords), keywords
    assert f"{name}__chunked_prologue_fwd_triton" not in source  # every prologue value of these two is mapped

    args, _ = sample_arguments(rec.checked, {s: 32 for s in rec.checked.sizes}, 1, 64, 2, dtype=torch.float32,
                               seed=0)
    report = measure_call(load_layer(analysis), args, form="chunked", chunk_size=32)
    full = [r for r in report.rows if r.shape == (1, 64, 2, 32)]
    # the [B, T, H, K] buffers left are none of the prologue's (no elu / exp of an input in torch)
    assert not [r for r in report.rows if "elu(" in r.where or "exp(" in r.where], [r.where for r in report.rows]
    assert all("torch.empty" in r.where for r in full), [r.where for r in full]


# The runtime's map machinery as renamed in a generated module (codegen/triton_runtime.py `_check_map`): the maps
# themselves are kernel arguments (QMAP, KMAP, ...), applied at the loads of the forward and backward kernels.
MAP_MACHINERY = {"_triton_check_map"}


@pytest.mark.parametrize("name", ["gla", "normalized_linear_attention"])
def test_only_a_module_with_maps_carries_the_map_machinery(name):
    """codegen/specialize.py folds `q_map` / `k_map` to None where no printed call passes them (gla), so the
    module defines and names none of the map helpers and kernels; a module with maps keeps them all."""
    analysis = analyse(_rec(name).checked)
    tree = ast.parse(module_source([analysis], analysis.recurrence.source.filename))
    defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    if name in MAPPED:
        assert MAP_MACHINERY <= defined and MAP_MACHINERY <= used
    else:
        assert not MAP_MACHINERY & (defined | used), sorted(MAP_MACHINERY & (defined | used))


# -- the runtime ---------------------------------------------------------------------------------------------------


@triton.jit
def _elu1(x):
    return tl.where(x > 0.0, x, tl.exp(tl.where(x > 0.0, 0.0, x)) - 1.0) + 1.0


@triton.jit
def _elu1_vjp(x, grad):
    return grad * tl.where(x > 0.0, 1.0, tl.exp(x))


@pytest.mark.parametrize("decay", ["ScalarDecay", "KeyDecay"])
def test_runtime_maps_match_the_mapped_tensors_and_refuse_bad_ones(decay):
    """Two queries, one exclusive (the key decay's dq runs through the value-decay output kernel and its dk through
    the sub-chunked kernel, each with the maps at their loads and the vjp at their stores)."""
    from codegen import triton_runtime as rt

    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 20, 2, 16, generator=gen, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 20, 2, 16, generator=gen, requires_grad=True)
    g = (-torch.rand((1, 20, 2) + ((16,) if decay == "KeyDecay" else ()), generator=gen)).requires_grad_()
    pair = (_elu1, _elu1_vjp)
    cls = getattr(rt, decay)
    outs, ht = rt.chunked_linear_by(cls, [(q, False), (q, True)], k, v, g, None, 16, True, q_map=pair, k_map=pair)
    ref_outs, ref_ht = rt.chunked_linear_by(cls, [(1 + F.elu(q), False), (1 + F.elu(q), True)], 1 + F.elu(k), v, g,
                                            None, 16, True)
    w = [torch.randn(o.shape, generator=gen) for o in outs] + [torch.randn(ht.shape, generator=gen)]
    got = torch.autograd.grad(sum((x * y).sum() for x, y in zip([*outs, ht], w)), [q, k, v, g])
    want = torch.autograd.grad(sum((x * y).sum() for x, y in zip([*ref_outs, ref_ht], w)), [q, k, v, g])
    for x, y in zip([*outs, ht, *got], [*ref_outs, ref_ht, *want]):
        assert _rel(x, y.double()) <= 1e-5

    with pytest.raises(ValueError, match="k_map must be None or a pair"):
        rt.chunked_linear_by(rt.NoDecay, [(q, False)], k, v, k_map=_elu1)
    with pytest.raises(ValueError, match="q_map and k_map .* not by a value decay"):
        rt.chunked_linear_by(rt.ValueDecay, [(q, False)], k, v, -torch.rand(1, 20, 2, 16), q_map=pair)


def test_bfloat16_runs_in_its_own_dtype():
    """A bfloat16 call (whose arithmetic Triton's interpreter gets wrong, so only run): outputs and the raw inputs'
    gradients come back in bfloat16 and finite; its backward keeps the mapped inputs in bfloat16."""
    rec = _rec("hgrn2")
    args, _ = sample_arguments(rec.checked, {s: D for s in rec.checked.sizes}, B, T, H, dtype=torch.float32, seed=5)
    layer = recurrence_dsl.compile(rec, backend="triton", form="chunked", chunk_size=CHUNK, tuning=False)
    leaves = [a.bfloat16().requires_grad_() for a in args]
    out, _ = layer(*leaves)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().sum().backward()
    assert all(x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all() for x in leaves)


def test_a_reset_stays_in_the_chunks():
    """HGRN2's key is mapped from its log decay f: a reset (f = -inf, key 1 - exp(-inf) = 1) is checked as a log
    decay only, so the chunked Triton form takes it (no UnsafeSteps) and matches the float64 reference."""
    from codegen.load import load_module

    rec = _rec("hgrn2")
    args, initial = sample_arguments(rec.checked, {s: D for s in rec.checked.sizes}, B, T, H, dtype=torch.float64,
                                     seed=6, with_initial_state=True)
    q, f, v = args
    f = f.clone()
    f[:, 20, 1, :5] = float("-inf")
    module = load_module(analyse(rec.checked))
    outs, finals = module.hgrn2__chunked_triton(q.float(), f.float(), v.float(), {"S": initial.float()}, D, D,
                                                 chunk_size=CHUNK)
    ref, ref_final = rec.reference(q, f, v, initial_state=initial, output_final_state=True)
    assert torch.isfinite(outs["o"]).all()
    assert _rel(outs["o"], ref) <= 1e-5 and _rel(finals["S"], ref_final) <= 1e-5
