"""A generated module holds only what its layer runs: running it covers >= 89.5% of its statements.

For every spec of specs/ (in CI one spec per kind of module, the rest `extended`: see EXTENDED), the module
`codegen.module.module_source` generates is written to a temporary file and imported from it under coverage.py
(which also traces the Triton kernels, since TRITON_INTERPRET=1 runs them as
Python). Each layer then runs every form it offers on both backends (`layer.forms`, `layer.triton_forms`) with an
initial state, with and without `cu_seqlens` (one packed sequence empty), forward and backward; a double backward
through the torch recurrent form, refused by name and done under autograd; packed and reversed
in the form the dispatcher picks; `form="auto"` and
`backend="auto"` at lengths that pick each form; configs and a tuned lookup; its `torch.nn.Module` wrapper; and a
table of bad calls, each of which must raise CallError or ValueError. At least 89.5% of the module's statements
(MIN_COVERED) must have run; on failure the message lists the lines that did not, with their text.

The only lines excluded from the count are the module's `except ImportError:` fallbacks, which provably cannot
run in this process: the no-triton stand-in (triton is imported here: asserted through `HAVE_TRITON`) and the
local `CallError` (recurrence_dsl is imported here: asserted through the module's `CallError`); and its
`_LayerOp` class, which registers the recurrence's torch.library op once per process: the module `compile()`
caches is loaded first, so its copy registers the op and this one's cannot (asserted through the op table). Each
layer's own op kernels (`Layer._op_*`) run and count.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sqlite3
import sys
import tempfile
import unittest.mock

import pytest
import torch

import recurrence_dsl
from autotune.store import TuningStore
from codegen.layer import interpreting
from codegen.load import load_layer
from codegen.module import module_source
from recurrence_dsl.analysis import analyse
from recurrence_dsl.errors import CallError
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPEC_FILES

coverage = pytest.importorskip("coverage")
pytest.importorskip("triton")

# The runtime's fused-prologue branches (`_unfuse`, the kernels' VSTEP / HEAD / SKIP) and decay-only pieces (the
# cumulative sums) are folded per module (codegen/specialize.py, `runtime_facts`), so a spec that uses none of them
# carries none: linear_attention 90.6%, indrnn 90.3% (the lowest) on 2026-11-30. 2026-12-02: the module's own
# checks of form/backend/chunk_size when built and its repr (run below) and the runtime's scalar-decay map branches
# (folded away for specs without them only in part) left indrnn at 89.98%: the bar is 89.5%.
MIN_COVERED = 0.895
SIZE, LENGTH, HEADS, CHUNK = 16, 40, 2, 16
CU = (0, 10, 10, 37)  # packed sequences, the second one empty
TRITON_CONFIG = {"chunk_size": 32, "block_k": 16, "block_v": 16, "num_warps": 1, "num_stages": 1}  # 2 sub-chunks
# the delta rule's state passes in 4 row blocks of 64 (K = 16: 3 of them masked), as float32 calls run them at
# K = 256; otherwise a module's row-block branches (_delta_state_kernel, _delta_bwd_dh_rows_kernel) never run here
DELTA_ROWS_CONFIG = {**TRITON_CONFIG, "block_k": 256}
# Exclusions, each a line that cannot run in this process (see the module docstring); the rest counts.
EXCLUDE = [r"^except ImportError( as \w+)?:", r"^class _LayerOp\b"]


def _import(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _arguments(rec, batch, length, seed=0, rows=None):
    """(args requiring grad, initial state) for `rec` at the test's small sizes."""
    sizes = {s: SIZE for s in rec.checked.sizes}
    args, init = sample_arguments(rec.checked, sizes, batch, length, HEADS, seed=seed, with_initial_state=True,
                                  rows=rows)
    args = [x.float().requires_grad_() for x in args]
    init = {k: v.float() for k, v in init.items()} if isinstance(init, dict) else init.float()
    return args, init


def _backward(result):
    out, final = result
    outs = out if isinstance(out, tuple) else (out,)
    finals = tuple(final.values()) if isinstance(final, dict) else (() if final is None else (final,))
    loss = sum(o.float().sum() for o in outs) + sum(f.float().sum() for f in finals)
    loss.backward()


def _double_backward(layer, rec):
    """A gradient taken with create_graph=True, then differentiated: refused by name through the torch recurrent
    form's derived adjoint (codegen/dispatch.py `_first_order`), done by autograd through its step loop under
    RECURRENCE_DSL_RECURRENT_BACKWARD=autograd."""
    args, init = _arguments(rec, 1, LENGTH)
    init = {k: v.requires_grad_() for k, v in init.items()} if isinstance(init, dict) else init.requires_grad_()
    leaves = args + (list(init.values()) if isinstance(init, dict) else [init])

    def gradients():
        out, final = layer(*args, initial_state=init, output_final_state=True, form="recurrent", backend="torch")
        outs = out if isinstance(out, tuple) else (out,)
        finals = tuple(final.values()) if isinstance(final, dict) else (final,)
        loss = sum(o.square().sum() for o in outs) + sum(f.square().sum() for f in finals)
        return torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)

    penalty = sum(g.square().sum() for g in gradients() if g is not None)
    with pytest.raises(CallError, match=rf"^{rec.name}: double backward .* its recurrent form on the torch backend"):
        torch.autograd.grad(penalty, leaves, allow_unused=True)
    with unittest.mock.patch.dict(os.environ, {"RECURRENCE_DSL_RECURRENT_BACKWARD": "autograd"}):
        penalty = sum(g.square().sum() for g in gradients() if g is not None)
        again = torch.autograd.grad(penalty, leaves, allow_unused=True)
    assert any(g is not None and bool(g.abs().sum() > 0) for g in again)


def _run_forms(layer, rec):
    """Every form on both backends: initial state, packed sequences, forward and backward."""
    for backend, forms in (("torch", layer.forms), ("triton", layer.triton_forms)):
        for form in forms:
            args, init = _arguments(rec, 1, LENGTH)
            _backward(layer(*args, initial_state=init, output_final_state=True, form=form, backend=backend,
                            chunk_size=CHUNK))
            args, init = _arguments(rec, 1, CU[-1], seed=1, rows=len(CU) - 1)
            _backward(layer(*args, initial_state=init, output_final_state=True, cu_seqlens=torch.tensor(CU),
                            form=form, backend=backend, chunk_size=CHUNK))
    for backend in ("torch", "triton"):  # packed and reversed, in the form the dispatcher picks for packed calls
        args, init = _arguments(rec, 1, CU[-1], seed=2, rows=len(CU) - 1)
        _backward(layer(*args, initial_state=init, output_final_state=True, cu_seqlens=torch.tensor(CU),
                        backend=backend, reverse=True, chunk_size=CHUNK))
    if "scan" in layer.forms:  # longer than the scan's chunk of 64 steps
        args, init = _arguments(rec, 1, 80)
        layer(*[a.detach() for a in args], initial_state=init, form="scan", backend="torch")
        # Blocks of 16 steps (this state's own block is longer than 80 steps), with and without autograd.
        with unittest.mock.patch.dict(os.environ, {"RECURRENCE_DSL_SCAN_BLOCK": "16"}):
            layer(*[a.detach() for a in args], initial_state=init, form="scan", backend="torch")
            _backward(layer(*args, initial_state=init, output_final_state=True, form="scan", backend="torch"))
    if "chunked" in layer.forms:  # a chunk length that is not a power of two: leaf blocks of 3 steps
        args, init = _arguments(rec, 2, LENGTH)
        layer(*[a.detach() for a in args], initial_state=init, form="chunked", backend="torch", chunk_size=12)


def _run_meta(layer, rec):
    """A call of meta tensors: meta outputs and final states of a real call's shapes, and a backward through them
    (dispatch.py `meta_result`)."""
    args, _ = _arguments(rec, 2, LENGTH)
    real = layer(*[a.detach() for a in args], output_final_state=True, backend="torch")
    meta = [a.detach().to("meta").requires_grad_() for a in args]
    out, final = layer(*meta, output_final_state=True, backend="torch")
    for got, want in zip(torch.utils._pytree.tree_leaves((out, final)), torch.utils._pytree.tree_leaves(real)):
        assert got.device.type == "meta" and got.shape == want.shape and got.dtype == want.dtype
    _backward((out, final))
    assert all(a.grad is not None and a.grad.device.type == "meta" for a in meta)


def _run_auto(layer, rec):
    """auto form and backend at lengths that pick each form; configs; a tuned lookup; the options copy."""
    for length, chunk in ((8, CHUNK), (LENGTH, CHUNK), (LENGTH, 64)):
        args, _ = _arguments(rec, 1, length)
        args = [a.detach() for a in args]
        assert layer.pick_form(length, chunk) in layer.forms
        layer(*args, backend="torch", chunk_size=chunk)
    layer(*args, chunk_size=CHUNK)  # backend auto: triton under the interpreter
    args, _ = _arguments(rec, 1, LENGTH)
    args = [a.detach() for a in args]
    layer(*[a.double() for a in args])  # float64: auto takes torch
    if "chunked" in layer.forms:
        layer(*args, form="chunked", backend="torch", config={"chunk_size": CHUNK})
    if "chunked" in layer.triton_forms:
        layer(*args, form="chunked", backend="triton", config=TRITON_CONFIG)
        grad_args, init = _arguments(rec, 1, LENGTH)  # the backward too, through two sub-chunks per chunk
        _backward(layer(*grad_args, initial_state=init, output_final_state=True, form="chunked", backend="triton",
                        config=TRITON_CONFIG))
        if hasattr(sys.modules[type(layer).__module__], "_triton_delta_bwd_dh_rows_kernel"):
            _backward(layer(*grad_args, initial_state=init, form="chunked", backend="triton",
                            config=DELTA_ROWS_CONFIG))
    layer(*args, form="recurrent", backend="triton", config={"num_warps": 1})
    layer(*args, backend="triton", config={"num_warps": 4})  # auto: the form it runs takes its share
    if "scan" not in layer.triton_forms:  # no call weighs the scan form's held bytes (`pick_form`): weigh them here
        module = sys.modules[type(layer).__module__]
        call = module.bind_call(layer.recurrence, tuple(args), {})
        held = module.scan_held_bytes(layer.recurrence, call, LENGTH, 1)
        assert held > 0 and module.pick_form(("recurrent", "scan"), 4096, CHUNK, 1, lambda: held) == (
            "recurrent" if held > module.scan_bytes_limit() else "scan")
    one, _ = _arguments(rec, 1, LENGTH)  # packed sequences from zero states: each sequence's zeros made per call
    layer(*[a.detach() for a in one], cu_seqlens=torch.tensor([0, 20, LENGTH]), backend="torch", form="recurrent")
    _run_meta(layer, rec)
    _run_limits(layer, rec)
    tuned = layer.options(form="auto", backend="torch", tuning=os.path.join(os.sep, "nonexistent", "t.sqlite"))
    tuned(*args)  # the module's own store lookup runs (and finds no store)
    plan = tuned.config_for(*args)
    assert plan["source"] in ("default", "call") and plan["backend"] == "torch"
    _run_tuning(layer, args)
    zeros = [torch.zeros_like(a) for a in args]  # a decay of 0 is not positive for a chunked form's log
    layer(*zeros, chunk_size=CHUNK, backend="torch")  # auto steps instead where it must
    for form in ("chunked", "parallel"):
        if form in layer.forms:
            try:
                layer(*zeros, form=form, backend="torch")
            except ValueError as err:  # DecayNotPositive, where the decay is a plain input or param
                assert "not positive" in str(err)
    assert layer.name == rec.name and rec.name in repr(layer) and layer.source.startswith("# Generated")
    assert layer.backend_for(torch.device("cpu"), torch.float32) == ("triton" if interpreting() else "torch")


def _run_limits(layer, rec):
    """CUDA's grid limits made tiny (`in_grid_pieces`: rows, time pieces, packed groups) and an SM's register
    file made empty (the recurrent form's StateTooLarge, after which "auto" runs another form)."""
    module = sys.modules[type(layer).__module__]
    if "chunked" in layer.triton_forms:
        with unittest.mock.patch.multiple(module, GRID_LIMITS=(2**31 - 1, HEADS, HEADS), PIECE_STEPS=16):
            args, init = _arguments(rec, 2, LENGTH)
            layer(*[a.detach() for a in args], initial_state=init, form="chunked", backend="triton",
                  chunk_size=CHUNK)
            args, init = _arguments(rec, 1, CU[-1], seed=1, rows=len(CU) - 1)
            layer(*[a.detach() for a in args], initial_state=init, cu_seqlens=torch.tensor(CU), form="chunked",
                  backend="triton", chunk_size=CHUNK)
    # The pieces themselves on a stand-in chunked form that returns its piece and states (every module carries
    # the dispatcher, chunked Triton form or not): 2 rows of 40 steps, then 3 packed sequences.
    def echo(chosen, piece, states, length, **more):
        return dict(piece), dict(states)

    with unittest.mock.patch.multiple(module, GRID_LIMITS=(2**31 - 1, HEADS, HEADS), PIECE_STEPS=16):
        run = module.in_grid_pieces(echo, HEADS, CHUNK)
        x, s = torch.randn(2, LENGTH, HEADS), torch.randn(2, HEADS)
        out, fin = run("chunked", {"x": x}, {"s": s}, LENGTH)
        assert torch.equal(out["x"], x) and torch.equal(fin["s"], s)
        x, s = torch.randn(1, CU[-1], HEADS), torch.randn(len(CU) - 1, HEADS)
        out, fin = run("chunked", {"x": x}, {"s": s}, CU[-1], cu_seqlens=torch.tensor(CU))
        assert torch.equal(out["x"], x) and torch.equal(fin["s"], s)
    args, _ = _arguments(rec, 1, 8)
    with unittest.mock.patch.multiple(module, triton_REGISTER_FILE=0, _triton_compiles_for_cuda=lambda: True):
        if len(layer.triton_forms) > 1:
            layer(*[a.detach() for a in args], backend="triton", chunk_size=CHUNK)
        else:
            with pytest.raises(ValueError, match="more than an SM's 0 registers"):
                layer(*[a.detach() for a in args], backend="triton", chunk_size=CHUNK)


def _run_tuning(layer, args):
    """The module's own store reads (codegen/tuning.py): a choice, "default kept", an unusable config and an
    unusable store (each of the last two warns), lookups switched off. Through the layer where it has a tunable
    torch form (chunked); read directly otherwise (a Triton config is never looked up in the interpreter)."""
    module = sys.modules[type(layer).__module__]
    module._tuning_memo.clear()
    module._tuning_warned.clear()
    call = module.bind_call(layer.recurrence, args, {})
    assert module.tuning_call_mode(call) == ("fwdbwd" if any(a.requires_grad for a in args) else "fwd")
    form = "chunked" if "chunked" in layer.forms else "recurrent"
    keys = ("chunk_size",) if form == "chunked" else ("num_warps",)
    key = (layer.recurrence.spec_hash, module.tuning_device_name(call.device, "torch"),
           str(call.dtype).removeprefix("torch."), module.tuning_shape_bucket(call.batch, call.heads, call.length,
                                                                             call.sizes), form, "torch")
    tuned = layer.options(form=form, backend="torch")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "t.sqlite")
        assert module.tuning_read_choice(path, key + ("fwd",), keys)[1].startswith("no tuning store")
        store = TuningStore(path)
        store.choose(*key, "fwd", {keys[0]: 16}, True, "test")
        store.choose(*key, "fwdbwd", {keys[0]: 64}, False, "kept")
        assert module.tuning_read_choice(path, key + ("fwd",), keys)[0] == {keys[0]: 16}
        assert module.tuning_lookup(layer, call, form, "torch", keys, path)[0] == {keys[0]: 16}
        assert module.tuning_lookup(layer, call, form, "triton", keys, path)[0] is None  # the interpreter's
        assert module.tuning_read_choice(path, key[:3] + ("BH=1,T=1",) + key[4:] + ("fwd",), keys)[1].startswith(
            "nothing tuned")
        assert "default kept" in module.tuning_read_choice(path, key + ("fwdbwd",), keys)[1]
        if form == "chunked":
            tuned = tuned.options(tuning=path)
            assert tuned.config_for(*args)["chunk_size"] == 16
            tuned(*args)
            leaves = [a.detach().requires_grad_(a.is_floating_point()) for a in args]
            assert "default kept" in tuned.config_for(*leaves)["why"]
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE choices SET config = 'not json'")
        with pytest.warns(RuntimeWarning, match="not a JSON object"):
            assert module.tuning_read_choice(path, key + ("fwd",), keys)[0] is None
        os.remove(path)
        with open(path, "wb") as f:
            f.write(b"not a database" * 100)
        module._tuning_warned.clear()  # one warning per store and process: forget the first
        with pytest.warns(RuntimeWarning, match="not a usable SQLite store"):
            assert module.tuning_read_choice(path, key + ("fwd",), keys)[0] is None
    with torch.no_grad():
        assert module.tuning_call_mode(call) == "fwd"
    assert tuned.options(chunk_size=32).config_for(*args)["source"] in ("compile", "call")
    assert "tuning=False" in tuned.options(tuning=False).config_for(*args)["why"] or form != "chunked"
    with tempfile.TemporaryDirectory() as folder:  # a store of schema version 1: trials, no choices
        path = os.path.join(folder, "old.sqlite")
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE trials (id INTEGER)")
        assert "no tuning choices" in module.tuning_read_choice(path, key + ("fwd",), keys)[1]
    old = os.environ.get("RECURRENCE_DSL_TUNING")
    os.environ["RECURRENCE_DSL_TUNING"] = "0"
    try:
        assert not module.tuning_lookups_enabled()
        assert tuned.options(tuning=True).config_for(*args)["source"] == "default"
    finally:
        os.environ["RECURRENCE_DSL_TUNING"] = old if old is not None else "0"
    assert module.tuning_store_path().endswith(".sqlite")


def _run_op(layer, rec):
    """The layer's op (what torch.compile calls), eagerly: forward and backward (its backward op), with initial and
    final states; and its fake implementation under a FakeTensorMode (as torch.compile traces it)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args, init = _arguments(rec, 2, LENGTH)
    states = [init[s.name] if isinstance(init, dict) else init for s in rec.checked.states]
    tensors = [t.detach().requires_grad_() for t in args + states]
    static = ("auto", "torch", CHUNK, "", True, False, True, layer._op_index)
    results = layer._op(tensors, None, *static)
    assert len(results) == len(rec.checked.outputs) + len(rec.checked.states)
    grads = torch.autograd.grad(sum(r.square().sum() for r in results), tensors, allow_unused=True)
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)
    mode = FakeTensorMode()
    fake_tensors = [mode.from_tensor(t.detach()) for t in tensors]
    with mode:
        fake = layer._op(fake_tensors, None, *static)
    assert [f.shape for f in fake] == [r.shape for r in results]


def _run_module_class(module, rec, layer):
    cls = getattr(module, "".join(p[:1].upper() + p[1:] for p in rec.name.split("_")))
    sizes = {s: SIZE for s in rec.checked.sizes}
    args, init = _arguments(rec, 2, LENGTH)
    n_inputs = len(rec.checked.inputs)
    given = {p.name: a.detach() for p, a in zip(rec.checked.params, args[n_inputs:])}
    net = cls(HEADS, sizes, form="auto", backend="torch", chunk_size=CHUNK, **given)
    _backward(net(*args[:n_inputs], initial_state=init, output_final_state=True))
    net = cls(HEADS, sizes, backend="triton")
    net(*[a.detach()[:, :8] for a in args[:n_inputs]])
    if any(p.dims for p in rec.checked.params):
        with pytest.raises(ValueError, match="sizes"):
            cls(HEADS)
    # what the module refuses itself (codegen/module.py `_module_sizes`, `_module_params`, `_module_call`)
    bad_builds = [((0, sizes), {}), ((HEADS, [("K", 1)]), {}), ((HEADS, {"not_a_size": 1}), {})]
    bad_builds += [((HEADS, {s: 0}), {}) for s in list(sizes)[:1]]
    bad_builds += [((HEADS + 1, sizes), given)] if given else []
    bad_builds += [((HEADS, sizes), {"backend": "cuda", **given}), ((HEADS, sizes), {"chunk_size": 0, **given})]
    bad_builds += [((2.0, sizes), given)]  # heads not an int
    for build_args, build_kwargs in bad_builds:
        with pytest.raises(ValueError):
            cls(*build_args, **build_kwargs)
    # print(model) names what the module was built with (`_module_repr`)
    assert f"heads={HEADS}" in repr(cls(HEADS, sizes, backend="torch", chunk_size=CHUNK, **given))
    inputs = [a.detach() for a in args[:n_inputs]]
    net = cls(HEADS, sizes, backend="torch", **given)
    bad_forwards = [((*inputs,), {"not_an_argument": 1}), ((*[torch.cat([a] * 2, dim=2) for a in inputs],), {})]
    bad_forwards += [((*inputs,), {"backend": "torch"})]  # a per-call option the module sets when it is built
    bad_forwards += [((*[a[..., None] for a in inputs],), {})]  # one axis too many: the layer's shape check says
    if any(a.dim() > 3 for a in inputs):  # a size other than the module's sizes= (`_module_call`)
        bad_forwards.append(((*[torch.cat([a, a], dim=-1) if a.dim() > 3 else a for a in inputs],), {}))
    bad_forwards += [((*inputs,), {name: value}) for name, value in list(given.items())[:1]]
    if given and len(rec.checked.states) == 1:  # a param by position lands in initial_state
        bad_forwards.append(((*inputs, next(iter(given.values()))), {}))
    for forward_args, forward_kwargs in bad_forwards:
        with pytest.raises((CallError, TypeError)):
            net(*forward_args, **forward_kwargs)


def _bad_calls(module, layer, rec):
    """Calls the layer must refuse, each with a CallError (a ValueError) naming what is wrong."""
    args, init = _arguments(rec, 2, LENGTH)
    args = [a.detach() for a in args]
    first = rec.checked.inputs[0].name
    n_inputs = len(rec.checked.inputs)
    names = [s.name for s in rec.checked.inputs + rec.checked.params]
    kw = dict(zip(names, args))
    one, one_init = _arguments(rec, 1, LENGTH)
    one = [a.detach() for a in one]
    bad = [
        ((*args, args[0]), {}),  # too many positional arguments
        (args, {"nonsense": args[0]}),
        (args, {first: args[0]}),  # both by position and by name
        (args[:-1], {}),  # missing
        ((args[0].tolist(), *args[1:]), {}),  # not a tensor
        ((args[0].long(), *args[1:]), {}),  # not floating point
        ((args[0][0], *args[1:]), {}),  # fewer than [B, T, H]
        ((args[0][..., None], *args[1:]), {}),  # one dim too many
        (args, {"initial_state": init, "cu_seqlens": torch.tensor([0.0, 40.0])}),  # float boundaries
        (args, {"cu_seqlens": torch.tensor([0, LENGTH])}),  # B = 2
        (one, {"cu_seqlens": torch.tensor([0])}),
        (one, {"cu_seqlens": torch.tensor([0, 5])}),  # does not end at T
        (one, {"cu_seqlens": torch.tensor([0, 30, 20, LENGTH])}),  # decreasing
        (one, {"initial_state": one_init, "cu_seqlens": torch.tensor([0, 20, LENGTH])}),  # one row, two sequences
        (args, {"initial_state": {"nope": None}}),
        (args, {"initial_state": "zeros"}),
        (args, {"form": "nonsense"}),
        (args, {"backend": "nonsense"}),
        (args, {"chunk_size": 0}),
        ((args[0], *[a.to("meta") for a in args[1:]]), {}) if len(args) > 1 else ((args[0].to("meta"),), {}),
        (one, {"cu_seqlens": torch.tensor([0, LENGTH], device="meta")}),  # boundaries on another device
        (args, {"initial_state": init.to("meta") if isinstance(init, torch.Tensor)
                else {k: v.to("meta") for k, v in init.items()}}),  # an initial state on another device
        (args, {"chunk_size": 16, "config": {"chunk_size": 16}}),
        (args, {"config": {"nonsense": 1}, "backend": "torch", "form": "recurrent"}),
        (args, {"config": [16]}),  # not a dict
        (args, {"config": {}}),  # empty
        (args, {"form": "recurrent", "backend": "triton", "config": {"num_warps": "8"}}),  # not an integer
        (args, {"reverse": "yes"}),
        (args, {"output_final_state": "no"}),  # a truthy string is not True
        (args, {"form": "recurrent", "backend": "triton", "config": {"num_warps": 3}}),  # not a power of two
        (args, {"form": "recurrent", "backend": "triton", "config": {"num_stages": 0}}),
        (args, {"form": "recurrent", "backend": "triton", "config": {"num_warps": 1, "chunk_size": 16}}),  # unknown
        ([a.double() for a in args], {"backend": "triton"}),
    ]
    bad += [(args, {"form": form}) for form in ("recurrent", "scan", "chunked", "parallel") if form not in layer.forms]
    if len(rec.checked.inputs) > 1:
        bad.append(((args[0], args[1][:, :3], *args[2:]), {}))  # a second input of another length
    if len(rec.checked.states) > 1:
        bad.append((args, {"initial_state": next(iter(init.values()))}))  # several states need a dict
    if "chunked" in layer.triton_forms:
        # not a power of two (auto runs the scan ahead of the chunked form for vector states: name chunked)
        bad.append((args, {"chunk_size": 24, "backend": "triton",
                           **({"form": "chunked"} if layer.recurrence.scan_first else {})}))
        bad.append((args, {"form": "chunked", "backend": "triton", "config": {**TRITON_CONFIG, "block_k": 24}}))
        bad.append((args, {"form": "chunked", "backend": "triton", "config": {**TRITON_CONFIG, "chunk_size": 24}}))
        bad.append((args, {"form": "chunked", "backend": "triton", "config": {**TRITON_CONFIG, "num_stages": 0}}))
    for form in layer.forms:
        if form not in layer.triton_forms:
            bad.append((args, {"form": form, "backend": "triton"}))
    for p in rec.checked.params:
        bad.append(((), {**kw, p.name: torch.cat([kw[p.name]] * 2)}))  # a param with the wrong H
    for s in rec.checked.states:
        t = init[s.name] if isinstance(init, dict) else init
        states = dict(init) if isinstance(init, dict) else None
        for wrong in (t[:1], t.long(), t[..., None]):
            bad.append((args, {"initial_state": {**states, s.name: wrong} if states is not None else wrong}))
    seen = set()
    for i, sym in enumerate(rec.checked.inputs + rec.checked.params):  # a size that two arguments disagree on
        lead = 3 if i < n_inputs else 1
        again = [pos for pos, d in enumerate(sym.dims) if isinstance(d, str) and d in seen]
        if again:
            wrong = args[i].narrow(lead + again[0], 0, args[i].shape[lead + again[0]] - 1)
            bad.append(((*args[:i], wrong, *args[i + 1:]), {}))
            break
        seen.update(d for d in sym.dims if isinstance(d, str))
    for call_args, kwargs in bad:  # through Layer.__call__ (*args, **kwargs): the layer's own signature is
        with pytest.raises((CallError, ValueError)):  # stricter still, a TypeError for a wrong count
            module.Layer.__call__(layer, *call_args, **kwargs)
    for kwargs in ({"backend": "nonsense"}, {"form": "nonsense"}, {"chunk_size": 0}):
        with pytest.raises(ValueError):
            type(layer)(layer.recurrence, layer.forms, layer.triton_forms, **kwargs)
    with pytest.raises(ValueError, match="tuning"):
        type(layer)(layer.recurrence, layer.forms, layer.triton_forms, tuning=3)
    for variable in ("RECURRENCE_DSL_CHECKPOINT_EVERY", "RECURRENCE_DSL_ADJOINT_BLOCK"):  # a bad forced step count
        os.environ[variable] = "16k"
        try:
            with pytest.raises(ValueError, match=variable):
                _backward(layer(*[a.clone().requires_grad_() for a in args], initial_state=init, backend="torch",
                                form="recurrent"))
        finally:
            del os.environ[variable]
    with pytest.raises(CallError, match="torch.func transforms"):  # the forms' Functions have no functorch rules
        torch.func.grad(lambda x: layer(x, *args[1:], initial_state=init, backend="torch")[0].sum())(args[0])
    with pytest.raises(ValueError, match="triton"):
        type(layer)(layer.recurrence, layer.forms, None, backend="triton")
    no_triton = type(layer)(layer.recurrence, layer.forms, None)
    with pytest.raises(CallError, match="triton"):
        no_triton(*args, backend="triton")


class _Rest:
    """The rest of a recurrence with shift states (recurrence_dsl/shift.py `ShiftPlan.inner`, NAME_unshifted: the
    shift states' values before each step are inputs), as the helpers above take a recurrence."""

    def __init__(self, checked):
        self.checked, self.name = checked, checked.name


def _run_shifted(layer, rec):
    """A layer of a recurrence with shift states (codegen/shift_runtime.py `ShiftedLayer`) beyond its forms: a
    zero start and packed sequences without initial states (the shift's zeros), final states without outputs asked,
    config_for, options, repr, backend_for, pick_form, and calls it refuses (never naming its rest)."""
    args, _ = _arguments(rec, 1, CU[-1], seed=3)
    args = [a.detach() for a in args]
    layer(*args, cu_seqlens=torch.tensor(CU), output_final_state=True, backend="torch")
    layer(*args, output_final_state=True, backend="torch", reverse=True)
    layer(*[a[:, :0] for a in args[:len(rec.checked.inputs)]], *args[len(rec.checked.inputs):],
          output_final_state=True, backend="torch")  # no steps: the shift's final states are the (zero) starts
    plan = layer.config_for(*args, form="chunked", backend="torch", chunk_size=CHUNK)
    assert plan["form"] == "chunked" and plan["backend"] == "torch"
    copy = layer.options(form="recurrent", backend="torch")
    assert copy.form == "recurrent" and type(copy) is type(layer)
    copy(*args)
    assert "shift states" in repr(layer) and layer.source.startswith("# Generated")
    assert layer.pick_form(8, CHUNK) in layer.forms and layer.chunk_size > 0 and layer.check_steps in (True, False)
    assert layer.backend_for(torch.device("cpu"), torch.float32) == ("triton" if interpreting() else "torch")
    assert layer.tuning is not None and not layer.chunk_size_given
    for kwargs in ({"form": "nonsense"}, {"chunk_size": 0}, {"nonsense": 1}):
        with pytest.raises((CallError, ValueError)) as err:
            layer(*args, **kwargs)
        assert f"{rec.name}_unshifted" not in str(err.value)


def module_coverage(spec_path, tmp_path) -> tuple[float, list[int], str]:
    """(fraction of statements run, the line numbers not run, the source) of `spec_path`'s generated module."""
    recs = recurrence_dsl.load(spec_path)
    source = module_source([analyse(rec.checked) for rec in recs.values()], str(spec_path))
    path = tmp_path / f"covered_{spec_path.stem}.py"
    path.write_text(source)
    name = f"_covered_{spec_path.stem}"
    for rec in recs.values():  # the cached module registers the ops (see the module docstring)
        load_layer(analyse(rec.checked))
    cov = coverage.Coverage(data_file=None, include=[str(path)], config_file=False)
    for pattern in EXCLUDE:
        cov.exclude(pattern)
    cov.start()
    try:
        module = _import(path, name)
        assert module.HAVE_TRITON and module.CallError is CallError  # so the excluded fallbacks cannot run
        table = torch.ops.recurrence_dsl.__dict__[module._OP_TABLE]
        for rec in recs.values():  # nor this module's _LayerOp: another copy registered the op
            layer = getattr(module, rec.name)
            layer = getattr(layer, "inner", layer)  # shift states: the op is the rest's (a Layer)
            assert type(table[module.op_name(layer.recurrence)]) is not module._LayerOp
        for rec in recs.values():
            layer = getattr(module, rec.name)
            _run_forms(layer, rec)
            _double_backward(layer, rec)
            _run_module_class(module, rec, layer)
            if isinstance(layer, getattr(module, "ShiftedLayer", ())):
                _run_shifted(layer, rec)
                rec, layer = _Rest(analyse(rec.checked).shift.inner), layer.inner  # the rest: a Layer of its own
            _run_auto(layer, rec)
            _run_op(layer, rec)
            _bad_calls(module, layer, rec)
    finally:
        cov.stop()
        sys.modules.pop(name, None)
    _, statements, _, missing, _ = cov.analysis2(str(path))
    return 1 - len(missing) / len(statements), missing, source


# In CI, one spec per kind of module: each transition class and decay axis, the divided readouts (mlstm), two
# recurrences in a file (bidirectional_mamba) and the lowest figure (indrnn). These repeat a kind above and run
# with RECDSL_EXTENDED=1 (several hundred seconds of the 2-core machine, 2026-12-02): based's pair states (311 s in
# a loaded run), hgrn2 and rwkv6 (key decay, as gla), lightning_attention (scalar decay, as retention), min_gru and
# rg_lru (elementwise, as mamba), normalized_linear_attention (a divided readout with maps, as mlstm).
EXTENDED = {"based", "hgrn2", "rwkv6", "lightning_attention", "min_gru", "rg_lru", "normalized_linear_attention"}


@pytest.mark.parametrize("spec_path", [pytest.param(p, id=p.stem, marks=[pytest.mark.extended] * (p.stem in EXTENDED))
                                       for p in SPEC_FILES])
def test_a_module_runs_most_of_its_lines(spec_path, tmp_path):
    covered, missing, source = module_coverage(spec_path, tmp_path)
    lines = source.splitlines()
    listing = "\n".join(f"{n:5d}  {lines[n - 1]}" for n in missing)
    assert covered >= MIN_COVERED, (f"{spec_path.name}: the generated module ran {covered:.1%} of its statements "
                                    f"(< {MIN_COVERED:.0%}); not run:\n{listing}")


_KERNEL = '''@triton.jit
def _triton_kernel(x, DECAY: tl.constexpr, EXCLUSIVE: tl.constexpr, OTHER: tl.constexpr):
    if DECAY == 1:
        a = 1
    elif DECAY == 2:  # key
        a = 2
    else:
        a = 3
    if EXCLUSIVE:
        b = 1
    else:
        # inclusive
        b = 2
    if OTHER:
        c = 1
    for i in range(3):
        if DECAY == 3 or not EXCLUSIVE:
            d = 1
'''


def test_specialize_folds_only_the_branches_the_flags_decide():
    from codegen.specialize import specialize_kernels

    two = specialize_kernels(_KERNEL, {"DECAY": frozenset({1, 2}), "EXCLUSIVE": frozenset({False})})
    assert two.splitlines()[2:] == [
        "    if DECAY == 1:", "        a = 1", "    else:", "        a = 2",  # the value 3 never comes
        "    # inclusive", "    b = 2", "    if OTHER:", "        c = 1", "    for i in range(3):", "        d = 1"]
    one = specialize_kernels(_KERNEL, {"DECAY": frozenset({2}), "EXCLUSIVE": frozenset({True})})
    assert one.splitlines()[2:] == ["    a = 2", "    b = 1", "    if OTHER:", "        c = 1",
                                    "    for i in range(3):", "        pass"]
    assert specialize_kernels(_KERNEL.replace("_triton_kernel", "user_kernel"), {"DECAY": frozenset({2})}) == _KERNEL \
        .replace("_triton_kernel", "user_kernel")  # only the Triton runtime's kernels
    gla = recurrence_dsl.load(SPEC_FILES[0].parent / "gla.rec")["gla"]
    source = module_source([analyse(gla.checked)], "gla.rec")
    # only the intra-chunk scores keep a DECAY test: the Triton backward also asks them for plain do v^T (code 3);
    # and the parallel form's attention kernel, whose per-lane branches test `(DECAY == 2 or DECAY == 3) and KEY_X`
    # (or KEY_Z), undecided where both lanes run (a key decay's forward and backward)
    kept = [fn.name for fn in ast.parse(source).body
            if isinstance(fn, ast.FunctionDef) and "DECAY ==" in ast.get_source_segment(source, fn)]
    assert kept == ["_triton_intra_attn_kernel", "_triton_parallel_attn_kernel"] and "class triton_KeyDecay" in source
    assert "class ScalarDecay" not in source and "class triton_ScalarDecay" not in source


_HOST = '''def _triton_unfuse(fused, decay_cls, dv):
    if fused.v_step is not None:
        dv = dv * fused.v_step
    if decay_cls.code == 0:
        g = None
    else:  # a decay
        g = 1
    if fused.skip is not None and dv is not None:
        dv = dv + 1
    return dv, g


def triton_x__chunked(fused):  # a printed form of a spec named triton_x
    if fused.v_step is not None:
        return 1
'''


def test_specialize_folds_the_runtimes_host_code_on_the_calls_facts():
    """The host-side runtime functions lose the branches on fused keywords no printed call passes and on decay
    codes no plan has; a printed form's own function is left alone, and an `else:` keeps its comment."""
    from codegen.specialize import fused_keywords, specialize_host

    facts = {"decay_cls.code": frozenset({1, 2}), "v_step": frozenset({None}), ".v_step": frozenset({None}),
             "skip": frozenset({None}), ".skip": frozenset({None})}
    folded = specialize_host(_HOST, facts, skip={"triton_x__chunked"})
    assert folded.splitlines()[:3] == ["def _triton_unfuse(fused, decay_cls, dv):", "    g = 1", "    return dv, g"]
    assert "    if fused.v_step is not None:\n        return 1" in folded  # a printed form's: not the runtime's
    kept = specialize_host(_HOST, {"decay_cls.code": frozenset({0, 1})})
    assert "    if decay_cls.code == 0:\n        g = None\n    else:  # a decay\n" in kept
    assert "fused.v_step is not None" in kept
    call = "out = triton_chunked_delta_by(cls, q, k, v, b, v_step=v_step_S, scale=2.0, **options)"
    assert fused_keywords(call) == {"v_step"}
    assert fused_keywords("triton_chunked_linear_by(cls, q, k, v, skip=x, skip_weight=w)") == {"skip", "skip_weight"}


def test_a_module_keeps_only_the_fused_branches_its_calls_take():
    """linear_attention (no decay, no per-step factor) has no cumulative-sum kernel and no fused-prologue branch;
    mamba2 (dt * A per head, dt a factor of k v^T, D * x added) keeps the ones it runs. Read from the golden
    modules, which tests/test_golden.py holds equal to what `module_source` writes."""
    golden = SPEC_FILES[0].parent.parent / "tests" / "golden"
    plain, mamba2 = ((golden / f"{name}.module.py").read_text() for name in ("linear_attention", "mamba2"))
    for gone in ("def _triton_cumsum_kernel", "fused.v_step is not None", "fused.decay_head is not None",
                 "if VSTEP:", "if SKIP:", "if decay_cls.code == 0:"):
        assert gone not in plain, gone
    assert "def _triton_unfuse" in plain  # called by the backward either way, now without branches
    for kept in ("_triton_cumsum_kernel", "if HEAD:", "if VSTEP:", "fused.decay_head is not None",
                 "fused.v_step is not None", "decay_head=", "v_step="):
        assert kept in mamba2, kept
