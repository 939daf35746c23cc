"""Under torch.compile a training step runs a layer's forward once (codegen/layer.py, `_LayerOp`).

The recurrence's op, told at trace time which tensors need gradients, runs its forms under autograd, keeps the
graph in a table by token and returns the token; the backward op pops it and differentiates that graph. Here the
forms' runs are counted (the op's kernels call `Layer._op_results` once per run of the forms) for a fwd+bwd step
with backend "aot_eager" (torch forms, and Triton forms in Triton's interpreter) and one inductor step; gradients
must equal eager mode's. The fallback, a recompute, must stay right: a second backward through retain_graph, an
evicted entry. A loop of forwards without a backward must keep the table bounded, and no_grad / inference_mode
must store nothing. Small shapes: the file runs in ~40 s on 2 idle cores, most of it inductor's compile.
"""

from __future__ import annotations

import gc

import pytest
import torch
import torch._functorch.config
import torch.nn.functional as F

import recurrence_dsl
from codegen.layer import _LayerOp, interpreting
from recurrence_dsl.compiler import triton_available

from .conftest import SPECS_DIR

H, K = 2, 8


@pytest.fixture(scope="module")
def gla():
    rec = recurrence_dsl.load(SPECS_DIR / "gla.rec")["gla"]
    return recurrence_dsl.compile(rec, tuning=False)


def _op_entry(layer):
    """The `_LayerOp` behind `layer` (its table of kept forwards is `.stored`)."""
    from codegen.layer import op_name

    table = torch.ops.recurrence_dsl.__dict__["_recurrence_dsl_layer_ops"]
    return table[op_name(layer.recurrence)]


@pytest.fixture
def runs(gla, monkeypatch):
    """A counter of the forms' runs inside the op's kernels: `runs[0]`."""
    entry = _op_entry(gla)
    layer = entry.layers[gla._op_index]  # the layer whose methods the kernels call
    count = [0]
    original = layer._op_results

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(layer, "_op_results", counted)
    yield count
    gc.collect()
    assert len(entry.stored) == 0, "a test left a forward's graph in the table"


def _args(T, B=2, seed=0, grad=True):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, K, generator=gen) for _ in range(3))
    g = F.logsigmoid(torch.randn(B, T, H, K, generator=gen))
    h0 = torch.randn(B, H, K, K, generator=gen)
    return [a.requires_grad_(grad) for a in (q, k, v, g, h0)]


def _loss_fn(gla, **options):
    def loss(q, k, v, g, h0):
        o, h = gla(q, k, v, g, initial_state=h0, output_final_state=True, **options)
        return o.square().sum() + (h * h).sum()  # the final state gets an incoming gradient too

    return loss


def _assert_grads(got, want):
    for g, g_ref in zip(got, want, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_compiled_training_step_runs_the_forward_once(gla, runs, backend):
    if backend == "triton" and not (triton_available() and interpreting()):
        pytest.skip("needs triton in its interpreter (no GPU)")
    options = {"backend": backend, "form": "chunked", "chunk_size": 16}
    lengths = (20, 45) if backend == "torch" else (12,)  # the interpreter is slow: one length, one chunk
    loss_fn = _loss_fn(gla, **options)
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=True, backend="aot_eager")
    stored = _op_entry(gla).stored
    for T in lengths:
        leaves = _args(T, B=2 if backend == "torch" else 1)
        runs[0] = 0
        loss = compiled(*leaves)
        assert (runs[0], len(stored)) == (1, 1)  # the forward ran once and kept its graph
        grads = torch.autograd.grad(loss, leaves)
        assert (runs[0], len(stored)) == (1, 0)  # the backward used it: no second forward, nothing left
        loss_ref = loss_fn(*leaves)  # eager: the forms directly, never the op
        assert runs[0] == 1
        torch.testing.assert_close(loss, loss_ref)
        _assert_grads(grads, torch.autograd.grad(loss_ref, leaves))


def test_inductor_runs_the_forward_once(gla, runs):
    """Inductor takes the op as an extern kernel and must not recompute it in the backward graph."""
    loss_fn = _loss_fn(gla, backend="torch", chunk_size=16)
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=True)
    leaves = _args(20)
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    assert runs[0] == 1
    _assert_grads(grads, torch.autograd.grad(loss_fn(*leaves), leaves))


def test_retain_graph_backward_twice_recomputes_the_second_time(gla, runs):
    """The first backward pops the kept graph; the second finds none and recomputes the forward. (AOTAutograd
    refuses retain_graph while it donates saved buffers to the backward: off here, as a user must turn it off.)"""
    loss_fn = _loss_fn(gla, backend="torch", chunk_size=16)
    torch._dynamo.reset()
    with torch._functorch.config.patch(donated_buffer=False):
        compiled = torch.compile(loss_fn, fullgraph=True, dynamic=True, backend="aot_eager")
        leaves = _args(20)
        loss = compiled(*leaves)
        first = torch.autograd.grad(loss, leaves, retain_graph=True)
        assert runs[0] == 1
        second = torch.autograd.grad(loss, leaves)
        assert runs[0] == 2
    want = torch.autograd.grad(loss_fn(*leaves), leaves)
    _assert_grads(first, want)
    _assert_grads(second, want)


def test_forwards_without_a_backward_keep_the_table_bounded(gla, runs, monkeypatch):
    loss_fn = _loss_fn(gla, backend="torch", chunk_size=16)
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=True, backend="aot_eager")
    entry = _op_entry(gla)
    stored = entry.stored
    leaves = _args(20)
    for _ in range(4):  # validation under grad: each step's graph dies with its loss, and its entry with it
        compiled(*leaves)
        assert len(stored) == 0
    monkeypatch.setattr(entry, "limit", 3)
    kept = []
    for _ in range(6):  # losses kept alive without a backward: at most `limit` graphs stay, the oldest go
        kept.append(compiled(*leaves))
        assert len(stored) <= 3
    assert len(stored) == 3
    runs[0] = 0
    grads = torch.autograd.grad(kept[0], leaves)  # its graph was evicted: recomputed, and still right
    assert runs[0] == 1
    _assert_grads(grads, torch.autograd.grad(loss_fn(*leaves), leaves))
    kept.clear()
    gc.collect()
    assert len(stored) == 0


def test_no_grad_and_inference_store_nothing(gla, runs):
    loss_fn = _loss_fn(gla, backend="torch", chunk_size=16)
    stored = _op_entry(gla).stored
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=True, backend="aot_eager")
    leaves = _args(20)
    want = loss_fn(*leaves).detach()
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            loss = compiled(*leaves)
        assert len(stored) == 0
        torch.testing.assert_close(loss, want)
    loss = compiled(*_args(20, grad=False))  # grad mode on, but nothing requires a gradient
    assert len(stored) == 0 and not loss.requires_grad
    torch.testing.assert_close(loss, want)
    assert runs[0] == 3


def test_the_op_told_its_needs_returns_a_token_and_its_backward_uses_it(gla, runs):
    """Called directly (as a compiled graph calls it), with `needs`: one more output, a 0-dim int64 CPU token;
    opcheck's schema, fake and autograd-registration checks pass (its AOT check would compare two runs' tokens,
    which differ by design: the compiled runs above check that path)."""
    leaves = _args(20)
    static = ("auto", "torch", 16, "", True, False, True, gla._op_index)
    needs = [True, True, False, True, True]
    leaves[2].requires_grad_(False)
    torch.library.opcheck(gla._op, (leaves, None, *static, needs),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    gc.collect()
    stored = _op_entry(gla).stored
    runs[0] = 0
    o, h, token = gla._op(leaves, None, *static, needs)
    assert (token.shape, token.dtype, token.device.type, len(stored)) == ((), torch.int64, "cpu", 1)
    wanted = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(o.square().sum() + (h * h).sum(), wanted)
    assert (runs[0], len(stored)) == (1, 0)
    _assert_grads(grads, torch.autograd.grad(_loss_fn(gla, backend="torch", chunk_size=16)(*leaves), wanted))


def test_the_table_of_kept_graphs(gla, monkeypatch):
    entry = _op_entry(gla)
    monkeypatch.setattr(entry, "limit", 2)
    x = torch.ones(3, requires_grad=True)
    tokens = [entry._keep([x], [x * n]) for n in range(3)]
    assert len(entry.stored) == 2 and entry._take(tokens[0]) is None  # the oldest went
    leaves, roots = entry._take(tokens[1])
    assert leaves[0] is x and entry._take(tokens[1]) is None  # taken once only
    del tokens
    gc.collect()
    assert len(entry.stored) == 0  # the last entry went with its token
    # A graph whose saved tensor changed in place since cannot give gradients: None, and the caller recomputes.
    y = x.exp()
    with torch.no_grad():
        y.add_(1)
    assert _LayerOp._kept_grads(([x], [y]), [torch.ones(3)], [True]) is None
    z = x.exp()
    torch.testing.assert_close(_LayerOp._kept_grads(([x], [z]), [torch.ones(3)], [True])[0], x.detach().exp())
