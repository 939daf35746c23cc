"""torch.compile of models made of generated layers: one graph, no graph break, no recompile per length.

Every layer runs under torch.compile as one `torch.library` custom op per recurrence (`codegen/layer.py`,
`_LayerOp`): the argument checks are traced, the forms run inside the op, its fake implementation carries a
symbolic T, and its backward op recomputes the forward under autograd. Here a two-layer model (GLA from a module
file written by `recdsl compile`, DeltaNet from `recurrence_dsl.compile`) is compiled with
`fullgraph=True, dynamic=True` and run forward and backward at three lengths, with `cu_seqlens`, and with an
initial state and `output_final_state=True`; outputs and gradients must equal eager mode's, with one compiled
graph and no graph break. Backend "aot_eager" (Dynamo, fake tensors and AOTAutograd as inductor gets them,
without its C++ compile, which took 35-95 s for the model on the 2-core development machine) except one inductor
run of a single layer.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import recurrence_dsl
from codegen.layer import interpreting
from recurrence_dsl.cli import main
from recurrence_dsl.compiler import triton_available
from recurrence_dsl.errors import CallError

from .conftest import SPECS_DIR

H, K, D = 2, 8, 12  # heads, key/value size per head, model width (no length below equals one: duck sizing)
LENGTHS = (20, 45, 83)  # auto picks the parallel form (<= chunk 64) for two, the chunked form for the third


def gla_is_triton_ready() -> bool:
    """Whether backend="triton" runs CPU tensors here: triton imports and runs in its interpreter (conftest sets
    TRITON_INTERPRET=1 on every machine without a GPU, CI included)."""
    return triton_available() and interpreting()


@pytest.fixture(scope="module")
def gla_module(tmp_path_factory):
    """specs/gla.rec through `recdsl compile`, imported from the file it wrote."""
    out = tmp_path_factory.mktemp("compile") / "gen_gla_compile.py"
    assert main(["compile", str(SPECS_DIR / "gla.rec"), "-o", str(out)]) == 0
    spec = importlib.util.spec_from_file_location("gen_gla_compile", out)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def delta_net():
    rec = recurrence_dsl.load(SPECS_DIR / "delta_net.rec")["delta_net"]
    return recurrence_dsl.compile(rec, backend="torch", tuning=False)


class TwoLayers(torch.nn.Module):
    """x [B, T, D] -> GLA block -> DeltaNet block, each a projection, the layer and a residual output projection."""

    def __init__(self, gla, delta_net):
        super().__init__()
        torch.manual_seed(0)
        self.gla, self.delta_net = gla, delta_net
        self.gla_in = torch.nn.Linear(D, 4 * H * K)
        self.gla_out = torch.nn.Linear(H * K, D)
        self.delta_in = torch.nn.Linear(D, 3 * H * K + H)
        self.delta_out = torch.nn.Linear(H * K, D)

    def forward(self, x, cu_seqlens=None):
        B, T, _ = x.shape
        q, k, v, g = self.gla_in(x).view(B, T, H, 4, K).unbind(3)
        o, _ = self.gla(q, k, v, F.logsigmoid(g) / 8, cu_seqlens=cu_seqlens, backend="torch")
        x = x + self.gla_out(o.reshape(B, T, H * K))
        qkv, beta = self.delta_in(x).split([3 * H * K, H], dim=-1)
        q, k, v = qkv.view(B, T, H, 3, K).unbind(3)
        o, _ = self.delta_net(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, beta.sigmoid(), cu_seqlens=cu_seqlens)
        return x + self.delta_out(o.reshape(B, T, H * K))


def _counting(backend: str, compiled: list):
    """A torch.compile backend that records every graph it is given and hands it to `backend`."""
    inner = torch._dynamo.lookup_backend(backend)

    def compile_graph(gm, example_inputs):
        compiled.append(gm)
        return inner(gm, example_inputs)

    return compile_graph


def _step(model, x, **kwargs):
    """(output, gradients of the params and of x) of one forward and backward."""
    x = x.detach().requires_grad_(True)
    y = model(x, **kwargs)
    y.square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()] + [x.grad]
    model.zero_grad()
    return y.detach(), grads


def _assert_same(got, want):
    (y, grads), (y_ref, grads_ref) = got, want
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def _compiled_runs(model, calls, backend="aot_eager"):
    """Run `calls` ((x, kwargs) pairs) through torch.compile(model, fullgraph=True, dynamic=True) and eagerly;
    assert equal results, and return the graphs compiled and the graph breaks counted."""
    torch._dynamo.reset()
    counters.clear()
    graphs: list = []
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=_counting(backend, graphs))
    for x, kwargs in calls:
        _assert_same(_step(compiled, x, **kwargs), _step(model, x, **kwargs))
    return graphs, sum(counters["graph_break"].values())


def test_two_generated_layers_compile_once_for_three_lengths(gla_module, delta_net):
    model = TwoLayers(gla_module.gla, delta_net)
    calls = [(torch.randn(2, T, D), {}) for T in LENGTHS]
    graphs, breaks = _compiled_runs(model, calls)
    assert (len(graphs), breaks) == (1, 0)
    ops = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert {str(gla_module.gla._op), str(delta_net._op)} <= ops  # each layer is its op in the graph


def test_packed_sequences_compile_once(gla_module, delta_net):
    model = TwoLayers(gla_module.gla, delta_net)
    calls = [(torch.randn(1, T, D), {"cu_seqlens": torch.tensor([0, T // 3, T // 3, T])}) for T in LENGTHS]
    graphs, breaks = _compiled_runs(model, calls)
    assert (len(graphs), breaks) == (1, 0)


def _gla_args(T, B=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, K, generator=gen) for _ in range(3))
    g = F.logsigmoid(torch.randn(B, T, H, K, generator=gen))
    return [q, k, v, g]


def test_initial_and_final_states_through_the_compiled_op(gla_module):
    gla = gla_module.gla

    def run(q, k, v, g, h0):
        o, h = gla(q, k, v, g, initial_state=h0, output_final_state=True, backend="torch", chunk_size=16)
        return o.square().sum() + (h * h).sum()  # the final state gets an incoming gradient

    torch._dynamo.reset()
    counters.clear()
    graphs: list = []
    compiled = torch.compile(run, fullgraph=True, dynamic=True, backend=_counting("aot_eager", graphs))
    for T in LENGTHS:
        leaves = [a.requires_grad_() for a in _gla_args(T)] + [torch.randn(2, H, K, K, requires_grad=True)]
        loss = compiled(*leaves)
        grads = torch.autograd.grad(loss, leaves)
        loss_ref = run(*leaves)
        grads_ref = torch.autograd.grad(loss_ref, leaves)
        torch.testing.assert_close(loss, loss_ref)
        for g, g_ref in zip(grads, grads_ref):
            torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    assert (len(graphs), sum(counters["graph_break"].values())) == (1, 0)


REVERSE_SPEC = """reverse recurrence rs(x[D], a[D]) -> y[D] {
    state h[D]
    h[d] = sigmoid(a[d]) * h[d] + x[d]
    y[d] = h[d]
}
"""


@pytest.mark.parametrize("direction", ["reverse=True", "reverse=False on a reverse spec"])
def test_the_compiled_op_runs_the_direction_of_the_call(gla_module, direction):
    """A call's `reverse=` reaches the op (it was dropped: the compiled call ran the spec's own direction, so a
    bidirectional layer compiled to two forward passes), outputs, final states and gradients, packed too."""
    if direction == "reverse=True":
        layer, reverse, make = gla_module.gla, True, _gla_args
    else:
        layer = recurrence_dsl.compile(recurrence_dsl.load_text(REVERSE_SPEC)["rs"], backend="torch", tuning=False)
        reverse = False

        def make(T):
            return [torch.randn(2, T, H, K), torch.randn(2, T, H, K)]

    def run(*args, cu_seqlens=None):
        o, h = layer(*args, reverse=reverse, output_final_state=True, backend="torch", cu_seqlens=cu_seqlens)
        return o.square().sum() + (h * h).sum()

    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True, dynamic=True, backend="aot_eager")
    for T, cu in ((20, None), (45, torch.tensor([0, 7, 30, 45]))):
        leaves = [a[:1] if cu is not None else a for a in make(T)]
        leaves = [a.detach().requires_grad_() for a in leaves]
        loss = compiled(*leaves, cu_seqlens=cu)
        loss_ref = run(*leaves, cu_seqlens=cu)
        torch.testing.assert_close(loss, loss_ref)
        o, h = layer(*leaves, reverse=not reverse, output_final_state=True, backend="torch", cu_seqlens=cu)
        assert not torch.allclose(loss_ref, o.square().sum() + (h * h).sum())  # the direction matters here
        for g, g_ref in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(loss_ref, leaves)):
            torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


def test_inductor_compiles_a_layer_once(gla_module):
    """The default backend: inductor takes the op as an extern call (a small graph around it: its C++ compile
    dominates the test, ~30 s on a cold cache on 2 cores; the models above use aot_eager)."""
    gla = gla_module.gla

    def run(q, k, v, g):
        return gla(q, k, v, g, backend="torch")[0].square().sum()

    torch._dynamo.reset()
    counters.clear()
    graphs: list = []
    compiled = torch.compile(run, fullgraph=True, dynamic=True, backend=_counting("inductor", graphs))
    for T in LENGTHS[:2]:
        leaves = [a.requires_grad_() for a in _gla_args(T)]
        loss, loss_ref = compiled(*leaves), run(*leaves)
        torch.testing.assert_close(loss, loss_ref)
        for g, g_ref in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(loss_ref, leaves)):
            torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    assert (len(graphs), sum(counters["graph_break"].values())) == (1, 0)


def test_bad_calls_raise_the_eager_message_under_compile(gla_module):
    """A shape error is found while Dynamo traces the checks: without fullgraph Dynamo gives the frame up and the
    call raises the eager CallError; with fullgraph=True Dynamo must stop with its own error, which carries the
    CallError's message. A value error (cu_seqlens' boundaries) is found inside the op: the CallError itself."""
    gla = gla_module.gla
    q, k, v, g = _gla_args(24, B=1)
    bad = [
        ((q, k[:, :20], v, g), {}, False),  # a second input of another length
        ((q, k, v[..., :5], g), {"initial_state": torch.zeros(1, H, K, K)}, False),  # V disagrees with the state
        ((q, k, v, g), {"cu_seqlens": torch.tensor([0, 30, 24])}, True),  # decreasing: checked inside the op
    ]
    for args, kwargs, in_op in bad:
        with pytest.raises(CallError) as eager:
            gla(*args, backend="torch", **kwargs)
        for fullgraph in (False, True):
            torch._dynamo.reset()
            compiled = torch.compile(lambda *a, **kw: gla(*a, backend="torch", **kw), fullgraph=fullgraph,
                                     dynamic=True, backend="aot_eager")
            if fullgraph and not in_op:
                with pytest.raises(torch._dynamo.exc.Unsupported) as traced:
                    compiled(*args, **kwargs)
                assert str(eager.value) in str(traced.value)
            else:
                with pytest.raises(CallError) as traced:
                    compiled(*args, **kwargs)
                assert str(traced.value) == str(eager.value)


def test_the_op_passes_opcheck(gla_module):
    gla = gla_module.gla
    args = [a.requires_grad_() for a in _gla_args(20)]
    h0 = torch.randn(2, H, K, K, requires_grad=True)
    static = ("auto", "torch", 16, "", True, False, True, gla._op_index)  # ..., reverse, check_steps, layer
    torch.library.opcheck(gla._op, (args + [h0], None, *static))
    cu = torch.tensor([0, 7, 20])
    one = [a[:1].detach().requires_grad_() for a in args]
    torch.library.opcheck(gla._op, (one, cu, "chunked", "torch", 16, "chunked.chunk_size=8", True, True, False,
                                    gla._op_index))


def test_a_module_loaded_twice_shares_its_op_and_runs_its_own_layers(gla_module):
    rec = recurrence_dsl.load(SPECS_DIR / "gla.rec")["gla"]
    cached = recurrence_dsl.compile(rec, tuning=False)
    assert type(cached).__module__ != gla_module.__name__  # two copies of the module in this process
    assert cached._op is gla_module.gla._op  # one op
    table = torch.ops.recurrence_dsl.__dict__[gla_module._OP_TABLE][gla_module.op_name(cached.recurrence)]
    # Each index runs its own module's forms. (Layers of one module and store share an index, `_LayerOp.add`: an
    # earlier test's compile of gla, tuning=False, may be the layer kept for `cached`'s.)
    assert table.layers[cached._op_index].forms is cached.forms
    assert table.layers[gla_module.gla._op_index].forms is gla_module.gla.forms
    assert cached.forms is not gla_module.gla.forms
    # The block sizes a call plans (here a config for the chunked form) travel through the op as its `options`.
    args = _gla_args(30)

    def run(*a):
        return cached(*a, backend="torch", form="chunked", config={"chunk_size": 8})[0]

    compiled = torch.compile(run, fullgraph=True, dynamic=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), run(*args))
    torch.testing.assert_close(compiled(*args), cached(*args, backend="torch", form="recurrent")[0])


@pytest.mark.skipif(not gla_is_triton_ready(), reason="needs triton in its interpreter (no GPU)")
def test_the_triton_backend_compiles_once_too(gla_module):
    """The op runs the Triton forms (here in Triton's interpreter) and its backward op their backward."""
    gla = gla_module.gla

    def run(q, k, v, g):
        return gla(q, k, v, g, backend="triton", form="chunked", chunk_size=16)[0].square().sum()

    torch._dynamo.reset()
    counters.clear()
    graphs: list = []
    compiled = torch.compile(run, fullgraph=True, dynamic=True, backend=_counting("aot_eager", graphs))
    for T in (12, 19):  # one and two chunks
        leaves = [a.requires_grad_() for a in _gla_args(T, B=1)]
        loss, loss_ref = compiled(*leaves), run(*leaves)
        torch.testing.assert_close(loss, loss_ref)
        for g, g_ref in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(loss_ref, leaves)):
            torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    assert (len(graphs), sum(counters["graph_break"].values())) == (1, 0)
