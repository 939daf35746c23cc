"""The chunked forms' prologue and epilogue and their VJPs printed from sympy (issue 9).

A generated module computes the tensors its chunked runtime receives (k, v, log decays, queries, beta, the fused
per-step factor) in one printed function `NAME__chunked_prologue_fwd`, and its outputs from the runtime's readouts in
`NAME__chunked_epilogue_fwd`; their backwards are printed too (`..._vjp`, reverse mode on the sympy expressions,
codegen/torch_forms.py `_write_printed_vjp`), joined by dispatch's `with_vjp` into one autograd node each, so the
backward of both backends runs the printed derivatives and no autograd graph is built through the gates and
feature maps.

Checked here: every input's, param's and initial state's gradient against the float64 reference's autograd
(float32, relative error <= 1e-5) for the specs whose prologue or epilogue is more than the inputs themselves, on
the torch and the Triton backend (the interpreter); the autograd graph of a call (the printed node sits directly
over the inputs the prologue maps, and makes the output); float64 gradcheck of the torch chunked form on tiny
shapes; the printed derivatives in the module's source.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import recurrence_dsl
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPEC_FILES, as_dict, weighted_gradients

SPECS: dict[str, recurrence_dsl.Recurrence] = {}
for _path in SPEC_FILES:
    SPECS.update(recurrence_dsl.load(_path))

# Specs whose chunked prologue or epilogue is more than the inputs as they are: a gate (exp, sigmoid, logsigmoid,
# softplus), a feature map (elu(x) + 1, the Taylor features of based), a per-head param broadcast over B and T,
# an output divided by a readout (mlstm, normalized attention) or with a skip term (mamba2's D * x).
NONTRIVIAL = ["based", "gated_delta_net", "hgrn2", "lightning_attention", "mamba2", "min_gru", "mlstm",
              "normalized_linear_attention", "rg_lru", "rwkv6"]
B, T, H, CHUNK, SIZE = 1, 19, 2, 16, 4  # chunks of 16 + 3 steps (the Triton runtime takes chunks >= 16)
TOL = 1e-5
PRINTED = "_PrintedVJPBackward"
# The Triton chunked forms of every spec here are checked against the reference by tests/test_triton_backward.py
# and tests/test_triton_delta_backward.py (through the same printed VJPs); here only a few, to keep the interpreter's
# time small: a gate and a divided epilogue (mlstm), a per-head param under a gate (rg_lru), a fused skip (mamba2).
TRITON_HERE = {"mlstm", "rg_lru", "mamba2"}


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _arguments(rec, seed=0):
    sizes = {s: SIZE for s in rec.checked.sizes}
    return sample_arguments(rec.checked, sizes, B, T, H, dtype=torch.float64, seed=seed, with_initial_state=True)


@pytest.mark.parametrize("name", NONTRIVIAL)
def test_gradients_match_the_reference(name):
    """Both backends' chunked forms, through the printed VJPs: every gradient within 1e-5 of the reference's."""
    rec = SPECS[name]
    args, initial = _arguments(rec)
    ref, weights = weighted_gradients(rec.reference, rec, args, initial)
    layer = recurrence_dsl.compile(rec, form="chunked", chunk_size=CHUNK, tuning=False)
    names = [s.name for s in rec.checked.inputs + rec.checked.params + rec.checked.states]
    init32 = {k: v.float() for k, v in as_dict(initial, rec.checked.states).items()}
    errors = {}
    for backend in ("torch", "triton") if name in TRITON_HERE else ("torch",):
        got, _ = weighted_gradients(layer, rec, [a.float() for a in args], init32, weights, backend=backend)
        errors.update({f"{backend}:{n}": _rel(g, r) for n, g, r in zip(names, got, ref)})
    assert max(errors.values()) <= TOL, errors


def _consumers(output: torch.Tensor, leaf: torch.Tensor) -> set[str]:
    """The names of the autograd nodes of `output`'s graph that read `leaf` directly."""
    found, seen, todo = set(), set(), [output.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is not None and getattr(nxt, "variable", None) is leaf:
                found.add(node.name())
            todo.append(nxt)
    return found


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name, mapped", [("normalized_linear_attention", ("q", "k")), ("mlstm", ("ig", "fg")),
                                          ("rg_lru", ("gr", "gi"))])
def test_no_graph_through_the_prologue(name, mapped, backend):
    """The inputs the prologue maps (elu(q) + 1, exp(ig), logsigmoid(fg), sigmoid(gr)) are read by the printed node
    alone, not by torch's elu / exp / sigmoid nodes; an output computed by the epilogue is made by the printed node.
    On Triton, normalized linear attention's feature maps and mLSTM's exp(ig) and logsigmoid(fg) are applied by the
    kernels at their loads (tests/test_prologue_maps.py): those inputs are read by the chunked kernels' node alone."""
    rec = SPECS[name]
    args, initial = _arguments(rec)
    leaves = [a.float().requires_grad_() for a in args]
    layer = recurrence_dsl.compile(rec, form="chunked", chunk_size=CHUNK, tuning=False)
    out, _ = layer(*leaves, backend=backend)
    by_name = dict(zip([s.name for s in rec.checked.inputs + rec.checked.params], leaves))
    in_kernels = backend == "triton" and name in ("normalized_linear_attention", "mlstm")
    for x in mapped:
        want = {"_triton_ChunkedLinearFunctionBackward"} if in_kernels else {PRINTED}
        assert _consumers(out, by_name[x]) == want, (x, _consumers(out, by_name[x]))
    if name != "rg_lru":  # rg_lru's output is its readout as it is: no epilogue
        made = out.grad_fn
        if made.name() == "CloneBackward0":  # the layer's copy of a view it returns (dispatch.py `_owned`)
            made = made.next_functions[0][0]
        assert made.name() == PRINTED, made.name()


@pytest.mark.parametrize("name", ["mlstm", "normalized_linear_attention", "rg_lru", "mamba2"])
def test_gradcheck_of_the_torch_chunked_form(name):
    """float64 gradcheck (finite differences) of the torch chunked form on tiny shapes, with an initial state."""
    rec = SPECS[name]
    sizes = {s: 2 for s in rec.checked.sizes}
    args, initial = sample_arguments(rec.checked, sizes, 1, 5, 1, dtype=torch.float64, seed=3,
                                     with_initial_state=True)
    layer = recurrence_dsl.compile(rec, backend="torch", form="chunked", chunk_size=4, tuning=False)
    states = as_dict(initial, rec.checked.states)
    n = len(args)

    def run(*xs):
        init = dict(zip(states, xs[n:]))
        out, final = layer(*xs[:n], initial_state=init if len(init) > 1 else xs[n], output_final_state=True)
        return (*as_dict(out, rec.checked.outputs).values(), *as_dict(final, rec.checked.states).values())

    xs = [a.detach().clone().requires_grad_() for a in list(args) + list(states.values())]
    assert torch.autograd.gradcheck(run, xs, eps=1e-6, atol=1e-7, rtol=1e-5)


def _source(name: str) -> str:
    """The generated module's source, as compile() wrote it (the module the other tests ran)."""
    layer = recurrence_dsl.compile(SPECS[name], form="chunked", chunk_size=CHUNK, tuning=False)
    return Path(layer.forms["chunked"].__globals__["__file__"]).read_text()


def test_the_module_prints_the_vjps():
    """The generated source holds the printed prologue and epilogue and their derivatives: logsigmoid's is
    sigmoid(-x), elu's the indicator-weighted exp, the clamp of mlstm's normaliser a step function. The Triton
    chunked form maps mlstm's gates at the kernels' loads, so it prints the epilogue's VJP but no prologue VJP."""
    text = _source("mlstm")
    for piece in ("def mlstm__chunked_prologue_vjp(", "def mlstm__chunked_epilogue_vjp(",
                  "mlstm__chunked_prologue = with_vjp(mlstm__chunked_prologue_fwd, mlstm__chunked_prologue_vjp",
                  "def mlstm__chunked_epilogue_vjp_triton(", "torch.sigmoid(-fg)", "torch.sign(read_n)"):
        assert piece in text, piece
    assert "def mlstm__chunked_prologue_vjp_triton(" not in text
    nla = _source("normalized_linear_attention")
    vjp = nla.split("def normalized_linear_attention__chunked_prologue_vjp(")[1].split("\n\n\n")[0]
    assert "grad_q_S * torch.where(q > 0.0, 1.0, torch.exp(q))".replace("grad_q_S", "grad_query_read_S") in vjp, vjp
    assert "F.elu" not in vjp  # the derivative, not the map


L2_GLA = recurrence_dsl.load_text("""
recurrence l2_gla(q[K], k[K], v[V], beta, w[K]) -> o[V] {
    param u[K]
    state S[K, V]
    kn[i] = k[i] / sqrt(sum(m, k[m] * k[m]) + 1e-6)
    qn[i] = softplus(u[i]) * q[i] / sqrt(sum(m, q[m] * q[m]) + 1e-6)
    S[i, j] = exp(-softplus(w[i])) * S[i, j] + sigmoid(beta) * kn[i] * v[j]
    o[j] = sum(i, qn[i] * S[i, j]) * tanh(beta)
}
""", "l2_gla.rec")["l2_gla"]


def test_sums_and_a_vector_param_in_the_prologue():
    """L2-normalised keys and queries (a sum over the key axis inside the prologue and the epilogue: the VJP of
    k / |k| contracts over it), a per-head vector param u[K] broadcast over B and T (its gradient sums over them),
    a gate of a scalar input in both; both backends against the reference."""
    rec = L2_GLA
    args, initial = _arguments(rec)
    ref, weights = weighted_gradients(rec.reference, rec, args, initial)
    layer = recurrence_dsl.compile(rec, form="chunked", chunk_size=CHUNK, tuning=False)
    source = Path(layer.forms["chunked"].__globals__["__file__"]).read_text()
    assert "def l2_gla__chunked_prologue_vjp(" in source and "def l2_gla__chunked_epilogue_vjp(" in source
    names = [s.name for s in rec.checked.inputs + rec.checked.params + rec.checked.states]
    init32 = {k: v.float() for k, v in as_dict(initial, rec.checked.states).items()}
    errors = {}
    for backend in ("torch", "triton"):
        got, _ = weighted_gradients(layer, rec, [a.float() for a in args], init32, weights, backend=backend)
        errors.update({f"{backend}:{n}": _rel(g, r) for n, g, r in zip(names, got, ref)})
    assert max(errors.values()) <= TOL, errors


def test_rg_lru_lam_on_the_triton_chunked_form():
    """Issue 9: rg_lru's per-channel lam sums the log decay's gradient over every step; the Triton chunked backward
    once formed it as reverse sums of o do - v dv, two sides near the state term that cancel (lam 1.2e-5, gr 3.7e-6
    at this shape). Summed directly (`_dlog_decay`), every gradient is within 1e-5 of the float64 reference."""
    rec = SPECS["rg_lru"]
    sizes = {s: 8 for s in rec.checked.sizes}
    args, initial = sample_arguments(rec.checked, sizes, 1, 21, H, dtype=torch.float64, seed=0,
                                     with_initial_state=True)
    ref, weights = weighted_gradients(rec.reference, rec, args, initial)
    layer = recurrence_dsl.compile(rec, form="chunked", chunk_size=CHUNK, tuning=False)
    init32 = {k: v.float() for k, v in as_dict(initial, rec.checked.states).items()}
    got, _ = weighted_gradients(layer, rec, [a.float() for a in args], init32, weights, backend="triton")
    names = [s.name for s in rec.checked.inputs + rec.checked.params + rec.checked.states]
    errors = {n: _rel(g, r) for n, g, r in zip(names, got, ref)}
    assert errors["lam"] <= TOL and errors["gr"] <= TOL and max(errors.values()) <= TOL, errors
