"""The chunked and parallel forms' value checks (`_check_steps`, codegen/torch_forms.py) and the `check_steps`
switch that skips them.

With check_steps=True (the default) a chunked or parallel call reads each value once for both extremes
(`_step_extremes`: torch.aminmax, which propagates NaN) and makes one host read per state to find the first step
its masked matmuls cannot take; with check_steps=False it makes no host read of a value computed from the call's
data (counted here as `aten._local_scalar_dense`, the op a host read of a tensor is, under a TorchDispatchMode that
follows which tensors derive from the inputs), packed calls and the Triton chunked path included, and gives on
finite inputs exactly what check_steps=True gives.
"""

from __future__ import annotations

import math
import pickle
import re

import pytest
import torch
from torch.utils._pytree import tree_leaves

import recurrence_dsl
from codegen.layer import interpreting
from recurrence_dsl import CallError
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPECS_DIR

try:
    import triton  # noqa: F401

    HAVE_TRITON = interpreting() or torch.cuda.is_available()
except ImportError:
    HAVE_TRITON = False

_READ = torch.ops.aten._local_scalar_dense.default


class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every host read of a tensor's value (`aten._local_scalar_dense`: `int(t)`, `bool(t)`, `t.item()`)
    made inside it, each as True when the tensor read derives from one of `sources` (an op's outputs derive from
    its tensor arguments; an op that writes into an argument makes that argument derive from them too)."""

    def __init__(self, sources):
        super().__init__()
        self.kept = list(sources)  # (held, so that the ids below stay theirs)
        self.derived = {id(t) for t in self.kept}
        self.reads: list[bool] = []

    def _mark(self, tensors) -> None:
        for t in tensors:
            if id(t) not in self.derived:
                self.kept.append(t)
                self.derived.add(id(t))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        from_data = any(id(t) in self.derived for t in tensors)
        if func is _READ:
            self.reads.append(from_data)
        elif from_data:
            written = [a for a, arg in zip(args, func._schema.arguments)
                       if isinstance(a, torch.Tensor) and arg.alias_info is not None and arg.alias_info.is_write]
            self._mark([t for t in tree_leaves(out) if isinstance(t, torch.Tensor)] + written)
        return out

    @property
    def data_reads(self) -> int:
        return sum(self.reads)


@pytest.fixture(scope="module")
def layers():
    """(spec name, backend) -> (its recurrence, its compiled layer). Tuning is left at its default (conftest.py
    turns lookups off): a tuning=False layer of another backend made here first would be the one the torch.compile
    op's table keeps for tuning=False layers (`_LayerOp.add`), which tests/test_compile.py checks is compile()'s."""
    made: dict = {}

    def get(name: str, backend: str = "torch"):
        if (name, backend) not in made:
            rec = recurrence_dsl.load(SPECS_DIR / f"{name}.rec")[name]
            made[name, backend] = (rec, recurrence_dsl.compile(rec, backend=backend))
        return made[name, backend]

    return get


def _args(rec, batch=2, length=40, heads=2, size=8, seed=0, dtype=torch.float32):
    args, _ = sample_arguments(rec.checked, {k: size for k in rec.checked.sizes}, batch, length, heads, dtype=dtype,
                               seed=seed)
    return args


def _tensors(value) -> list[torch.Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


# --- the cheaper check --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_aminmax_propagates_nan_and_inf_on_cpu(dtype):
    """`_step_extremes` relies on torch.aminmax returning NaN for both extremes of a row holding a NaN (as amin and
    amax do), along the last axis and along the first."""
    x = torch.randn(3, 5, 7).to(dtype)
    x[1, 2, 4] = math.nan
    x[2, 3, 0] = math.inf
    x[0, 4, 6] = -math.inf
    for dim in (-1, 0):
        lo, hi = torch.aminmax(x, dim=dim)
        torch.testing.assert_close(lo, x.amin(dim=dim), equal_nan=True, rtol=0, atol=0)
        torch.testing.assert_close(hi, x.amax(dim=dim), equal_nan=True, rtol=0, atol=0)
    lo, hi = torch.aminmax(x, dim=-1)
    assert lo[1, 2].isnan() and hi[1, 2].isnan()
    assert hi[2, 3] == math.inf and lo[0, 4] == -math.inf


def _prelude(layers):
    """The generated module's globals (its PRELUDE's `_check_steps`, `_step_extremes`, `UnsafeSteps`)."""
    _, layer = layers("gla")
    return layer.forms["chunked"].__globals__


@pytest.mark.parametrize("shape", [(3, 6, 2, 4), (1, 6, 2, 4), (9, 6, 1), (2, 6, 5), (4, 6, 2, 1)])
@pytest.mark.parametrize("keep", [2, 3])
def test_step_extremes_are_amin_and_amax(layers, shape, keep):
    """Per step (keep 2) or per (step, head) (keep 3), over B and the trailing axes, whichever axis aminmax reduces
    first, for contiguous, expanded and sliced tensors alike; a NaN shows in both extremes of its step."""
    extremes = _prelude(layers)["_step_extremes"]
    x = torch.randn(shape)
    x[0, 3, 0] = math.nan
    expanded = x[:, :, :, None].expand(*shape, 3) if len(shape) == 3 else x[..., :1].expand(*shape)
    sliced = torch.randn(*shape[:-1], shape[-1] + 2)[..., 1:-1]
    for value in (x, expanded, sliced):
        dims = [0] + list(range(keep, value.dim()))
        lo, hi = extremes(value, keep)
        torch.testing.assert_close(lo, value.amin(dim=dims), equal_nan=True, rtol=0, atol=0)
        torch.testing.assert_close(hi, value.amax(dim=dims), equal_nan=True, rtol=0, atol=0)
    lo, hi = extremes(x, keep)
    assert lo[3].isnan().any() and hi[3].isnan().any()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_check_steps_names_the_first_unsafe_step(layers, bad):
    """A non-finite value anywhere in a step (any batch row, head, channel) makes that step the first unsafe one;
    a log decay > 0 or NaN too, -inf (a reset) not; a headed log decay g * head[h] is checked as a product."""
    scope = _prelude(layers)
    check, unsafe = scope["_check_steps"], scope["UnsafeSteps"]
    q, k = torch.randn(2, 12, 3, 4), torch.randn(2, 12, 3, 4)
    g = -torch.rand(2, 12, 3, 4)
    g[1, 2, 0, 0] = -math.inf
    check([q, k], [g])  # all safe: no exception
    k[1, 9, 2, 3] = bad
    q[0, 11, 0, 0] = bad
    with pytest.raises(unsafe) as got:
        check([q, k], [g])
    assert got.value.step == 9
    g[0, 5, 1, 2] = 0.5 if not math.isnan(bad) else bad
    with pytest.raises(unsafe) as got:
        check([q, k], [g])
    assert got.value.step == 5
    dt, head = torch.rand(2, 12, 3), torch.tensor([-1.0, -2.0, 0.5])
    with pytest.raises(unsafe) as got:  # head 2 is positive: every step of dt > 0 is unsafe
        check([q[..., :0]], [(dt, head)])  # (a value fixes T: here one with no channels, never read)
    assert got.value.step == 0
    check([q[..., :0]], [(dt, -head.abs())])


def test_check_steps_allocates_no_tensor_of_a_values_size(layers):
    """The check reads each value without a flag or copy of its size (the largest tensor it makes is per step)."""
    check = _prelude(layers)["_check_steps"]
    q, k, v = (torch.randn(4, 32, 2, 16) for _ in range(3))
    g = -torch.rand(4, 32, 2, 16)
    sizes: list[int] = []

    class Sizes(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view:  # (a view allocates nothing)
                sizes.extend(t.numel() for t in _tensors(out))
            return out

    with Sizes():
        check([q, k, v], [g])
    assert max(sizes) <= q.numel() // 4  # (aminmax over 2 heads x 16 channels first: [4, 32] each)


# --- the switch ---------------------------------------------------------------------------------------------------

CASES = [("gla", "chunked"), ("gla", "parallel"), ("retention", "chunked"), ("delta_net", "chunked"),
         ("based", "chunked")]


@pytest.mark.parametrize("name,form", CASES)
@pytest.mark.parametrize("packed", [False, True])
def test_no_host_read_of_the_data_with_the_check_off(layers, name, form, packed):
    """check_steps=False: not one host read of a value computed from the inputs (the check's sync, and retention's
    positive-decay check, skipped), one sequence or packed; check_steps=True reads at least once."""
    rec, layer = layers(name)
    if form not in layer.forms:
        pytest.skip(f"{name} has no {form} form")
    args = _args(rec, batch=1 if packed else 2)
    extra = {"cu_seqlens": torch.tensor([0, 7, 25, 40])} if packed else {}
    sources = [a for a in args if isinstance(a, torch.Tensor)]
    with HostReads(sources) as on:
        layer(*args, form=form, chunk_size=16, **extra)
    with HostReads(sources) as off:
        layer(*args, form=form, chunk_size=16, check_steps=False, **extra)
    assert on.data_reads >= 1 and off.data_reads == 0, (on.reads, off.reads)
    if not packed:  # (a packed call still reads its cu_seqlens, a CPU tensor, to batch the sequences by length)
        assert off.reads == []


@pytest.mark.parametrize("name,form", CASES)
def test_finite_results_and_gradients_are_those_of_the_check(layers, name, form):
    """On finite inputs with log decays <= 0 the switch changes nothing: outputs, final states and gradients are
    bitwise those of check_steps=True."""
    rec, layer = layers(name)
    if form not in layer.forms:
        pytest.skip(f"{name} has no {form} form")
    results = []
    for check in (True, False):
        leaves = [a.detach().clone().requires_grad_() if a.is_floating_point() else a for a in _args(rec)]
        out, final = layer(*leaves, form=form, chunk_size=16, output_final_state=True, check_steps=check)
        loss = sum((t.double() ** 2).sum() for t in _tensors((out, final)))
        loss.backward()
        results.append(_tensors((out, final)) + [a.grad for a in leaves if a.grad is not None])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_non_finite_inputs_with_the_check_on_and_off(layers):
    """check_steps=True: a NaN and an inf give the reference's results (non-finite exactly where the reference's
    are, the rest close); check_steps=False: the call returns without a host read whatever the values, and steps
    before the first non-finite one's chunk are still the reference's (only its own chunk and later can differ)."""
    rec, layer = layers("gla")
    q, k, v, g = _args(rec, dtype=torch.float64)
    k[1, 21, 0, 3] = math.nan
    v[0, 35, 1, 2] = math.inf
    ref, _ = rec.reference(q, k, v, g)
    for form, chunk in (("chunked", 16), ("parallel", 16)):
        out, _ = layer(q, k, v, g, form=form, chunk_size=chunk)
        assert torch.equal(out.isfinite(), ref.isfinite())
        torch.testing.assert_close(out[ref.isfinite()], ref[ref.isfinite()])
    with HostReads([q, k, v, g]) as off:
        out, _ = layer(q, k, v, g, form="chunked", chunk_size=16, check_steps=False)
    assert off.reads == []
    torch.testing.assert_close(out[:, :16], ref[:, :16])  # the chunk before the NaN's (steps 16..31)


def test_a_decay_that_is_not_positive_with_the_check_on_and_off(layers):
    """retention's chunked form takes log(gamma): with the check, a gamma <= 0 is DecayNotPositive (form="chunked")
    or the step-by-step form (auto); without it there is no check, and log(-0.5) is NaN."""
    rec, layer = layers("retention")
    q, k, v, gamma = _args(rec)
    gamma = gamma.clone()
    gamma[0] = -0.5
    with pytest.raises(recurrence_dsl.DecayNotPositive):
        layer(q, k, v, gamma, form="chunked", chunk_size=16)
    out, _ = layer(q, k, v, gamma, form="chunked", chunk_size=16, check_steps=False)
    assert out[:, :, 0].isnan().any() and out[:, :, 1].isfinite().all()


def test_the_switch_as_a_default_of_compile_options_and_the_module(layers, tmp_path):
    """compile(check_steps=False), Layer.options(check_steps=...) and a module's check_steps= set the default of
    its calls; a call's own check_steps wins; the default survives a pickle and shows in the module's repr."""
    rec, layer = layers("gla")
    args = _args(rec)
    assert layer.check_steps is True
    quiet = recurrence_dsl.compile(rec, backend="torch", check_steps=False)
    assert quiet.check_steps is False and quiet is not layer
    assert recurrence_dsl.compile(rec, backend="torch", check_steps=False) is quiet
    assert layer.options(check_steps=False).check_steps is False
    assert quiet.options(form="chunked").check_steps is False  # (None keeps the layer's)
    assert pickle.loads(pickle.dumps(quiet)).check_steps is False
    with HostReads(args) as off:
        quiet(*args, form="chunked", chunk_size=16)
    with HostReads(args) as on:
        quiet(*args, form="chunked", chunk_size=16, check_steps=True)
    assert (off.data_reads, on.data_reads) == (0, 1)

    scope = layer.forms["chunked"].__globals__
    module_cls = next(v for k, v in scope.items() if isinstance(v, type) and issubclass(v, torch.nn.Module)
                      and k.lower() == "gla")
    module = module_cls(heads=2, sizes={"K": 8, "V": 8}, check_steps=False)
    assert "check_steps=False" in repr(module)
    q, k, v, g = args
    with HostReads(args) as off:
        module(q, k, v, g)
    assert off.data_reads == 0
    with pytest.raises(TypeError, match="check_steps"):
        module(q, k, v, g, check_steps=True)


@pytest.mark.parametrize("bad", ["no", 0, 1, 1.0])
def test_a_check_steps_that_is_not_a_bool_is_a_call_error(layers, bad):
    rec, layer = layers("gla")
    args = _args(rec, length=20)
    message = f"check_steps must be True or False, got {bad!r}"
    with pytest.raises(CallError, match="check_steps must be True or False"):
        layer(*args, check_steps=bad)
    with pytest.raises(CallError, match="check_steps must be True or False"):
        layer.config_for(*args, check_steps=bad)
    with pytest.raises(CallError) as got:
        layer.options(check_steps=bad)
    assert str(got.value) == message
    with pytest.raises(CallError, match="check_steps must be True or False"):
        recurrence_dsl.compile(rec, check_steps=bad)
    scope = layer.forms["chunked"].__globals__
    module_cls = next(v for k, v in scope.items() if isinstance(v, type) and issubclass(v, torch.nn.Module)
                      and k.lower() == "gla")
    with pytest.raises(CallError, match=re.escape(f"{module_cls.__name__}: {message}")):
        module_cls(heads=2, sizes={"K": 8, "V": 8}, check_steps=bad)


def test_compile_refuses_a_check_steps_of_none(layers):
    # A call's and options()'s None mean "the layer's own"; compile() has no layer to take one from, and the
    # generated module refuses None, so compile() does too (it took None as True).
    rec, _ = layers("gla")
    with pytest.raises(CallError, match="check_steps must be True or False, got None"):
        recurrence_dsl.compile(rec, check_steps=None)


def test_an_input_cannot_be_called_check_steps():
    spec = "recurrence r(check_steps[D]) -> y[D] {\n    state h[D]\n    h[d] = 0.5 * h[d] + check_steps[d]\n" \
           "    y[d] = h[d]\n}\n"
    with pytest.raises(recurrence_dsl.SpecError, match="check_steps"):
        recurrence_dsl.load_text(spec)


def test_the_switch_reaches_the_forms_under_torch_compile(layers, monkeypatch):
    """Under torch.compile a call is one op (codegen/layer.py `_LayerOp`), whose static arguments carry check_steps:
    the check (made to fail here) runs with the default and not with check_steps=False, forward and backward."""
    rec, layer = layers("gla")
    scope = layer.forms["chunked"].__globals__

    def refuse(*args, **kwargs):
        raise AssertionError("_check_steps ran")

    monkeypatch.setitem(scope, "_check_steps", refuse)

    def run(q, k, v, g, check):
        out, _ = layer(q, k, v, g, form="chunked", chunk_size=16, check_steps=check)
        return out.square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True, dynamic=True, backend="aot_eager")
    leaves = [a.detach().requires_grad_() for a in _args(rec)]
    loss = compiled(*leaves, False)
    grads = torch.autograd.grad(loss, leaves)
    monkeypatch.undo()
    expected = torch.autograd.grad(run(*leaves, True), leaves)
    for a, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, b)
    monkeypatch.setitem(scope, "_check_steps", refuse)
    with pytest.raises(AssertionError, match="_check_steps ran"):
        compiled(*leaves, True)
    torch._dynamo.reset()


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton (a GPU or its interpreter)")
@pytest.mark.parametrize("form", ["chunked", "parallel"])
def test_the_triton_parallel_form_makes_no_host_read_with_the_check_off(layers, form):
    """gla's Triton chunked and parallel forms (the parallel one runs the chunked function's prologue and checks)."""
    rec, layer = layers("gla", "triton")
    args = _args(rec, size=16)
    with HostReads(args) as on:
        out_on, _ = layer(*args, form=form, chunk_size=16)
    with HostReads(args) as off:
        out_off, _ = layer(*args, form=form, chunk_size=16, check_steps=False)
    assert on.data_reads >= 1 and off.reads == []
    assert torch.equal(out_on, out_off)


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton (a GPU or its interpreter)")
@pytest.mark.parametrize("packed", [False, True])
def test_the_triton_chunked_path_makes_no_host_read_with_the_check_off(layers, packed):
    """mLSTM's Triton chunked form maps its gates in the kernels, which check the mapped values as they compute
    them (`unsafe_`, read by `_check_steps(..., first=...)`): with check_steps=False that flag is never read, one
    sequence or packed, and finite results are the same; with the check a NaN still gives the reference's."""
    rec, layer = layers("mlstm", "triton")
    args = _args(rec, batch=1 if packed else 2, size=16)
    extra = {"cu_seqlens": torch.tensor([0, 7, 25, 40])} if packed else {}
    with HostReads(args) as on:
        out_on, _ = layer(*args, form="chunked", chunk_size=16, **extra)
    with HostReads(args) as off:
        out_off, _ = layer(*args, form="chunked", chunk_size=16, check_steps=False, **extra)
    assert on.data_reads >= 1 and off.data_reads == 0, (on.reads, off.reads)
    if not packed:
        assert off.reads == []
    assert torch.equal(out_on, out_off)
    if not packed:
        bad = [a.clone() for a in args]
        bad[0][1, 30, 0, 2] = math.nan
        ref, _ = rec.reference(*bad)
        out, _ = layer(*bad, form="chunked", chunk_size=16)
        assert torch.equal(out.isfinite(), ref.isfinite())
        torch.testing.assert_close(out[ref.isfinite()], ref[ref.isfinite()].float(), rtol=1e-3, atol=1e-3)
