"""Every spec of specs/ is one `torch.library` custom op under torch.compile (issue 9), not only the GLA and
DeltaNet layers of tests/test_compile.py.

For each recurrence: the layer's op has a fake implementation (its outputs' shapes and dtypes under FakeTensorMode
equal the eager call's) and a registered autograd formula; a call with an initial state and
`output_final_state=True` compiled with `torch.compile(fullgraph=True, dynamic=True)` (backend "aot_eager": Dynamo,
fake tensors and AOTAutograd, without inductor's C++ compile) is one graph with no graph break, and its outputs,
final states and the gradients of every input, param and initial state equal eager mode's (torch backend, float32,
B = 2, T = 11, H = 2, tiny sizes). A recurrence with shift states (mamba3) runs the shift in torch and then the op of
the rest of the recurrence: that op's fake implementation is checked on the rest's tensors, and the compiled graph
holds it once.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensorMode

import recurrence_dsl
from recurrence_dsl.calling import bind_call
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPEC_FILES, as_dict

SPECS: dict[str, recurrence_dsl.Recurrence] = {}
for _path in SPEC_FILES:
    SPECS.update(recurrence_dsl.load(_path))


def _call(rec, layer):
    """A function of flat tensors (inputs, params, initial states) -> outputs and final states, flat."""
    checked = rec.checked
    count = len(checked.inputs) + len(checked.params)

    def run(*tensors):
        states = dict(zip((s.name for s in checked.states), tensors[count:]))
        out, final = layer(*tensors[:count], initial_state=states if len(states) > 1 else tensors[count],
                           output_final_state=True, backend="torch")
        return (*as_dict(out, checked.outputs).values(), *as_dict(final, checked.states).values())

    return run


def _tensors(rec) -> list[torch.Tensor]:
    sizes = {s: (4, 3)[i % 2] for i, s in enumerate(rec.checked.sizes)}
    args, initial = sample_arguments(rec.checked, sizes, 2, 11, 2, seed=4, with_initial_state=True)
    return [*args, *as_dict(initial, rec.checked.states).values()]


def _inner_tensors(rec, layer, tensors):
    """A shifted layer's rest: its flat tensors (inputs, the shift states' values before each step, params, the kept
    states' initial values) for the call of `tensors`, and a function of them -> its outputs and final states."""
    spec, rest = layer.recurrence, layer.inner.recurrence
    count = len(spec.inputs) + len(spec.params)
    states = dict(zip((s.name for s in spec.states), tensors[count:]))
    call = bind_call(spec, tuple(tensors[:count]), {"initial_state": states, "output_final_state": True})
    args, kwargs, _ = layer._inner_call(call)
    initial = kwargs["initial_state"]

    def run(*flat):
        out, final = layer.inner(*flat[:len(args)], initial_state=dict(zip(initial, flat[len(args):])),
                                 output_final_state=True, backend="torch")
        return (*as_dict(out, rest.outputs).values(), *as_dict(final, rest.states).values())

    return [*args, *initial.values()], run


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_layer_compiles_as_one_op_forward_and_backward(name):
    rec = SPECS[name]
    layer = recurrence_dsl.compile(rec, backend="torch", tuning=False)
    run = _call(rec, layer)
    tensors = _tensors(rec)

    # the op and its fake implementation; a recurrence with shift states (mamba3) is the shift in torch, then the op
    # of the rest of the recurrence (codegen/shift_runtime.py, ShiftedLayer), called with the rest's tensors
    target, flat, eager_of = layer, tensors, run
    if hasattr(layer, "inner"):
        target, flat, eager_of = layer.inner, *_inner_tensors(rec, layer, tensors)
    op = target._op
    assert isinstance(op, torch._ops.OpOverload) and op.namespace == "recurrence_dsl", op
    with FakeTensorMode() as fake_mode:
        fake_flat = fake_mode.from_tensor
        static = ("auto", "torch", target.chunk_size, "", True, False, True, target._op_index)
        fakes = op([fake_flat(t) for t in flat], None, *static)
    eager = eager_of(*flat)
    assert [(f.shape, f.dtype) for f in fakes] == [(e.shape, e.dtype) for e in eager]
    # (the autograd formula: the compiled graph holds the op opaque, so its gradients below come from it)

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        results = fn(*leaves)
        gen = torch.Generator().manual_seed(0)
        loss = sum((r * torch.randn(r.shape, generator=gen)).sum() for r in results)
        return [r.detach() for r in results], torch.autograd.grad(loss, leaves)

    torch._dynamo.reset()
    counters.clear()
    graphs: list = []
    inner = torch._dynamo.lookup_backend("aot_eager")

    def counting(gm, example_inputs):
        graphs.append(gm)
        return inner(gm, example_inputs)

    compiled = torch.compile(run, fullgraph=True, dynamic=True, backend=counting)
    (got, got_grads), (want, want_grads) = grads(compiled), grads(run)
    assert (len(graphs), sum(counters["graph_break"].values())) == (1, 0), (len(graphs), dict(counters["graph_break"]))
    assert [n.target for n in graphs[0].graph.nodes if n.op == "call_function"].count(op) == 1, graphs[0].graph
    for g, w in zip([*got, *got_grads], [*want, *want_grads], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
