"""The scan forms' prologue and epilogue and their VJPs printed from sympy (issue 9).

A scan form runs each state element as s_t = a_t * s_(t-1) + b_t. Its generated module computes every state's
decay a_S and injection b_S from the inputs and params in one printed function `NAME__scan_prologue_fwd`, and the
outputs from the states (all_S after each step, prev_S before it) and the inputs in `NAME__scan_epilogue_fwd`; their
backwards are printed too (`..._vjp`, codegen/torch_forms.py `_write_printed_vjp`, the chunked forms' machinery),
each joined to its function by dispatch's `with_vjp` into one autograd node. The epilogue's VJP gives the states'
gradients, which the scan's own backward takes. Both backends call the same two functions (the torch `scan` blocks
and `scan_triton`).

Checked here: every input's, param's and initial state's gradient against the float64 reference's autograd
(float32, relative error <= 1e-5) on both backends (Triton: the interpreter); the autograd graph of a call (one node
per printed function, no node of a gate or feature map, the printed node the only reader of a gated input); float64
gradcheck of the torch scan form on tiny shapes, under cu_seqlens and reverse; a spec with coupled states (one
2 x 2 block scan) whose output reads a state before its update; the printed source.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

import recurrence_dsl
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPEC_FILES, as_dict, made_by

SPECS: dict[str, recurrence_dsl.Recurrence] = {}
for _path in SPEC_FILES:
    SPECS.update(recurrence_dsl.load(_path))

# Two coupled states (h2 smooths h1: one 2 x 2 block per channel), gates on an input and on a param, an output that
# reads h2 before its update (prev_h2) through tanh.
SMOOTH2 = recurrence_dsl.load_text("""
recurrence smooth2(x[D], g[D]) -> y[D] {
    param w[D]
    state h1[D], h2[D]
    before[d] = h2[d]
    h1[d] = exp(-softplus(w[d])) * h1[d] + x[d]
    h2[d] = sigmoid(g[d]) * h2[d] + (1 - sigmoid(g[d])) * h1[d]
    y[d] = tanh(before[d]) * sigmoid(g[d]) + 0.5 * h1[d]
}
""", "smooth2.rec")["smooth2"]
CASES = {**SPECS, "smooth2": SMOOTH2}

B, T, H, SIZE = 2, 11, 2, 4
TOL = 1e-5
PRINTED = "_PrintedVJPBackward"
# Nodes of the differentiated gates, feature maps and readouts: none may appear in a scan form's backward graph.
PROLOGUE_OPS = {"ExpBackward0", "SigmoidBackward0", "SoftplusBackward0", "SqrtBackward0", "TanhBackward0",
                "DivBackward0", "PowBackward0", "SumBackward1", "BmmBackward0", "MmBackward0", "NegBackward0",
                "EluBackward0"}


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _arguments(rec, batch=B, length=T, heads=H, sizes=SIZE, seed=0, **kwargs):
    return sample_arguments(rec.checked, {s: sizes for s in rec.checked.sizes}, batch, length, heads,
                            dtype=torch.float64, seed=seed, with_initial_state=True, **kwargs)


def _grads(fn, rec, args, initial, weights=None, **kwargs):
    """Gradients of every argument and initial state for sum(w * outputs) + sum(w * final states)."""
    checked = rec.checked
    leaves = [a.detach().clone().requires_grad_() for a in args]
    init = {k: v.detach().clone().requires_grad_() for k, v in as_dict(initial, checked.states).items()}
    out, final = fn(*leaves, initial_state=init if len(init) > 1 else next(iter(init.values())),
                    output_final_state=True, **kwargs)
    out, final = as_dict(out, checked.outputs), as_dict(final, checked.states)
    if weights is None:
        gen = torch.Generator().manual_seed(1)
        weights = [{k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in d.items()}
                   for d in (out, final)]
    loss = sum((out[k].double() * w).sum() for k, w in weights[0].items())
    (loss + sum((final[k].double() * w).sum() for k, w in weights[1].items())).backward()
    return [x.grad for x in leaves] + [init[s.name].grad for s in checked.states], weights


def _names(rec) -> list[str]:
    return [s.name for s in rec.checked.inputs + rec.checked.params + rec.checked.states]


# A gate and a skip term (mamba), a gated param under sqrt (rg_lru), the complement gate (min_gru), a readout
# divided by another (mlstm), elu feature maps (normalized_linear_attention), coupled states read before and after
# their update (smooth2).
TORCH_HERE = ["mamba", "rg_lru", "min_gru", "mlstm", "normalized_linear_attention", "smooth2"]
TRITON_HERE = {"mamba", "rg_lru", "smooth2"}  # the interpreter is slow; tests/test_training_gradients.py has the rest


@pytest.mark.parametrize("name", TORCH_HERE)
def test_gradients_match_the_reference(name):
    """The scan form through the printed VJPs, on both backends: every gradient within 1e-5 of the reference's."""
    rec = CASES[name]
    args, initial = _arguments(rec)
    args = [a.float().double() for a in args]  # the values the float32 call sees
    initial = {k: v.float().double() for k, v in as_dict(initial, rec.checked.states).items()}
    ref, weights = _grads(rec.reference, rec, args, initial)
    layer = recurrence_dsl.compile(rec, form="scan", tuning=False)
    init32 = {k: v.float() for k, v in initial.items()}
    errors = {}
    for backend in ("torch", "triton") if name in TRITON_HERE else ("torch",):
        got, _ = _grads(layer, rec, [a.float() for a in args], init32, weights, backend=backend)
        for n, g, r in zip(_names(rec), got, ref):
            assert g is not None and g.shape == r.shape and g.dtype == torch.float32, (backend, n, g)
            errors[f"{backend}:{n}"] = _rel(g, r)
    assert max(errors.values()) <= TOL, errors


def _graph(output: torch.Tensor, leaf_names: dict) -> tuple[Counter, dict[str, set[str]]]:
    """(the node names of `output`'s backward graph, counted; for each named leaf, the nodes that read it)."""
    count, readers, seen, todo = Counter(), {n: set() for n in leaf_names.values()}, set(), [output.grad_fn]
    by_id = {id(t): n for t, n in leaf_names.items()}
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count[node.name()] += 1
        for nxt, _ in node.next_functions:
            leaf = getattr(nxt, "variable", None)
            if leaf is not None and id(leaf) in by_id:
                readers[by_id[id(leaf)]].add(node.name())
            todo.append(nxt)
    return count, readers


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name, printed, gated", [("mamba", 2, ("dt", "B", "x")), ("rg_lru", 1, ("gr", "gi", "x")),
                                                  ("smooth2", 2, ("g", "x"))])
def test_one_node_per_printed_function(name, printed, gated, backend):
    """The backward graph holds one node per printed function (the prologue; the epilogue where the output is more
    than a state), the runtime's scan and the layout ops around it, and no node of a gate, feature map or readout;
    the inputs the prologue maps are read by the printed nodes alone (a param by the view [H, ...] -> [1, 1, H, ...]
    that feeds them)."""
    rec = CASES[name]
    args, _ = _arguments(rec, batch=1, length=7)
    leaves = [a.float().requires_grad_() for a in args]
    layer = recurrence_dsl.compile(rec, form="scan", tuning=False)
    out, _ = layer(*leaves, backend=backend)
    if printed == 2:  # the output is the epilogue's
        assert made_by(out).name() == PRINTED, made_by(out).name()
    count, readers = _graph(out, {t: n for t, n in zip(leaves, _names(rec))})
    assert not set(count) & PROLOGUE_OPS, count
    fused = "_triton_FusedScanBackward"
    if backend == "triton" and name != "smooth2":  # the prologue inside the scan kernels: its VJP runs in their
        assert count[PRINTED] == printed - 1 and count[fused] == 1, count  # backward (a block scan's is not fused)
        for x in gated:
            assert readers[x] <= {PRINTED, fused} and fused in readers[x], (x, readers[x])
        return
    if backend == "triton":
        assert count["_triton_ScanFunctionBackward"] >= 1 and not count[fused], count
    assert count[PRINTED] == printed, count
    for x in gated:
        assert readers[x] == {PRINTED}, (x, readers[x])


@pytest.mark.parametrize("name", ["mamba", "smooth2"])
@pytest.mark.parametrize("how", ["cu_seqlens", "reverse"])
def test_gradcheck_of_the_torch_scan_form(name, how):
    """float64 gradcheck (finite differences) of the torch scan form on tiny shapes, with initial states: packed
    sequences (one empty) or a reverse run."""
    rec = CASES[name]
    if how == "cu_seqlens":
        cu = torch.tensor([0, 3, 3, 7])
        args, initial = _arguments(rec, batch=1, length=7, heads=1, sizes=2, seed=3, rows=3)
        extra = {"cu_seqlens": cu}
    else:
        args, initial = _arguments(rec, batch=1, length=5, heads=1, sizes=2, seed=3)
        extra = {"reverse": True}
    layer = recurrence_dsl.compile(rec, backend="torch", form="scan", tuning=False)
    states = as_dict(initial, rec.checked.states)
    n = len(args)

    def run(*xs):
        init = dict(zip(states, xs[n:]))
        out, final = layer(*xs[:n], initial_state=init if len(init) > 1 else xs[n], output_final_state=True,
                           **extra)
        return (*as_dict(out, rec.checked.outputs).values(), *as_dict(final, rec.checked.states).values())

    xs = [a.detach().clone().requires_grad_() for a in list(args) + list(states.values())]
    assert torch.autograd.gradcheck(run, xs, eps=1e-6, atol=1e-7, rtol=1e-5)


def _source(rec) -> str:
    layer = recurrence_dsl.compile(rec, form="scan", tuning=False)
    return Path(layer.forms["scan"].__globals__["__file__"]).read_text()


def test_the_module_prints_the_vjps_once_for_both_backends():
    """The generated source holds the printed prologue and epilogue, their derivatives (softplus' is a sigmoid, the
    readout's contraction a matrix product), and the Triton scan form calls the same functions as the torch one."""
    text = _source(SPECS["mamba"])
    for piece in ("def mamba__scan_prologue_fwd(", "def mamba__scan_prologue_vjp(", "def mamba__scan_epilogue_vjp(",
                  "mamba__scan_prologue = with_vjp(mamba__scan_prologue_fwd, mamba__scan_prologue_vjp, 4)",
                  "mamba__scan_epilogue = with_vjp(mamba__scan_epilogue_fwd, mamba__scan_epilogue_vjp, 4)"):
        assert piece in text, piece
    for form in ("def mamba__scan_block(", "def mamba__scan_triton("):
        body = text.split(form)[1].split("\n\n\n")[0]
        # the Triton form computes the prologue in its scan kernels, whose backward adds its gradients itself
        # (mamba__scan_h_vjp, from the same derivatives)
        prologue = ("= mamba__scan_prologue(x, dt, B, A, D, N)" if "block" in form else
                    "None,\n        (x, dt, B, A), (states['h'],), (D, N)")
        assert prologue in body and "= mamba__scan_epilogue(all_h, " in body, body
        assert "torch.exp" not in body, body  # the decay is the prologue's
    assert "_triton(" not in text.split("def mamba__scan_prologue_vjp(")[1].split("\n\n\n")[0]
    assert "scan_prologue_fwd_triton" not in text and "scan_epilogue_vjp_triton" not in text
    rg = _source(SPECS["rg_lru"]).split("def rg_lru__scan_prologue_vjp(")[1].split("\n\n\n")[0]
    assert "torch.sigmoid(-lam)" in rg and "F.softplus(-lam)" in rg, rg  # d softplus(-lam) / d lam = -sigmoid(-lam)
