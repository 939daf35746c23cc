"""Shift states (recurrence_dsl/shift.py): a state overwritten at every step from the step's inputs and other shift
states (a token shift's key cache, a short convolution's window) is computed by shifting along T outside the
recurrence, and the rest keeps its forms. Every offered form, on both backends, against the reference interpreter
of the original spec: outputs, final states, gradients (initial state included), packed sequences, reverse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import recurrence_dsl
from recurrence_dsl.analysis import TransitionClass, analyse
from recurrence_dsl.sampling import sample_arguments

SOURCE = """
recurrence shifted_la(q[K], k[K], v[V]) -> o[V] {
    state klast[K]
    state S[K, V]
    S[i, j] = S[i, j] + (k[i] + klast[i]) * v[j]   # reads klast before its update: the previous step's k
    klast[i] = k[i]
    o[j] = sum(i, q[i] * S[i, j])
}

# A short causal convolution of width 3 on the key (its window as two shift states), then GLA.
recurrence conv_gla(q[K], k[K], v[V], g[K]) -> o[V] {
    param w0[K]
    param w1[K]
    param w2[K]
    state k1[K]
    state k2[K]
    state S[K, V]
    kc[i] = w0[i] * k[i] + w1[i] * k1[i] + w2[i] * k2[i]
    S[i, j] = exp(g[i]) * S[i, j] + kc[i] * v[j]
    k2[i] = k1[i]
    k1[i] = k[i]
    o[j] = sum(i, q[i] * S[i, j])
}

# A shift state read after its update: a temporary kept in a state.
recurrence read_after(q[K], k[K], v[V]) -> o[V] {
    state kc[K]
    state S[K, V]
    kc[i] = 2 * k[i]
    S[i, j] = S[i, j] + kc[i] * v[j]
    o[j] = sum(i, q[i] * S[i, j])
}

# A delta rule on the token-shifted key (RWKV-style mix of this step's and the last step's key).
recurrence shifted_delta(q[K], k[K], v[V], beta) -> o[V] {
    state klast[K]
    state S[K, V]
    kk[i] = 0.5 * (k[i] + klast[i])
    S[i, j] = S[i, j] + beta * kk[i] * (v[j] - sum(a, kk[a] * S[a, j]))
    klast[i] = k[i]
    o[j] = sum(i, q[i] * S[i, j])
}

# A scalar shift state (the previous step's gate), a vector state scanned.
recurrence shifted_gate(x[D], a) -> y[D] {
    state alast
    state h[D]
    h[d] = exp(-a - alast) * h[d] + x[d]
    alast = a
    y[d] = h[d]
}
"""

RECS = recurrence_dsl.load(SOURCE)
SIZES = {"K": 4, "V": 4, "D": 4}
B, T, H = 2, 7, 2


def _forms(name):
    return analyse(RECS[name].checked).forms


CASES = [pytest.param(name, backend, form, id=f"{name}-{backend}-{form}")
         for name in RECS for backend in ("torch", "triton") for form in _forms(name)]


def _arguments(name, rows=None, length=T, batch=B, seed=0):
    rec = RECS[name].checked
    sizes = {s: SIZES[s] for s in rec.sizes}
    args, initial = sample_arguments(rec, sizes, batch, length, H, dtype=torch.float64, seed=seed,
                                     with_initial_state=True, rows=rows)
    if name == "shifted_gate":  # positive gates: exp(-a - alast) a decay
        args[1] = args[1].abs() + 0.05
    if not isinstance(initial, dict):
        initial = {rec.states[0].name: initial}
    if name == "shifted_gate":
        initial["alast"] = initial["alast"].abs()
    return args, initial


def _compare(got, want, tol=2e-5):
    got, want = got.double(), want.double()
    err = (got - want).norm() / want.norm().clamp_min(1e-12)
    assert err <= tol, f"relative error {err:.3g}"


def _layer(name):
    return recurrence_dsl.compile(RECS[name], tuning=False)


def test_analysis_classes_and_forms():
    a = analyse(RECS["shifted_la"].checked)
    assert a.states["klast"].cls is TransitionClass.SHIFT
    assert a.states["S"].cls is TransitionClass.IDENTITY
    assert a.cls is TransitionClass.IDENTITY
    assert a.forms == ("recurrent", "scan", "chunked", "parallel")
    assert "shifting" in a.states["klast"].reason
    b = analyse(RECS["conv_gla"].checked)
    assert [s.name for s in b.shift.states] == ["k1", "k2"]  # k2 reads k1's previous value: after it
    assert b.shift.states[1].reads == ("k1",)
    assert b.cls is TransitionClass.DIAGONAL_ROW and "chunked" in b.forms
    c = analyse(RECS["shifted_delta"].checked)
    assert c.cls is TransitionClass.RANK_ONE_UPDATE and "chunked" in c.forms
    assert analyse(RECS["read_after"].checked).states["kc"].cls is TransitionClass.SHIFT
    assert analyse(RECS["shifted_gate"].checked).cls is TransitionClass.SCALAR


def test_not_shift_states():
    recs = recurrence_dsl.load("""
recurrence swap(x[D]) -> y[D] {
    state a[D]
    state b[D]
    state h[D]
    h[d] = h[d] + a[d] * x[d]
    a[d] = b[d]
    b[d] = a[d] + x[d]
    y[d] = h[d]
}
recurrence only_shift(x[D]) -> y[D] {
    state xl[D]
    y[d] = x[d] + xl[d]
    xl[d] = x[d]
}
recurrence cumulative(x[D]) -> y[D] {
    state a[D]
    state h[D]
    h[d] = a[d] + x[d]
    a[d] = h[d]
    y[d] = h[d]
}
""")
    # a reads b's previous value, b reads a's new one (so a's previous value): a cycle, no shift
    assert analyse(recs["swap"].checked).shift is None
    # nothing left to run as a recurrence: compiled as written (general, recurrent)
    only = analyse(recs["only_shift"].checked)
    assert only.shift is None and only.forms == ("recurrent",)
    x = torch.randn(1, 5, 1, 3)
    out, fin = recurrence_dsl.compile(recs["only_shift"], tuning=False)(x, output_final_state=True, backend="torch")
    ref, rfin = recs["only_shift"].reference(x, output_final_state=True)
    _compare(out, ref)
    _compare(fin, rfin)
    # h reads a, a reads h's new value: a cumulative sum, no shift
    assert analyse(recs["cumulative"].checked).shift is None


@pytest.mark.parametrize("name,backend,form", CASES)
def test_forward_final_and_gradients(name, backend, form):
    args, initial = _arguments(name)
    ref, ref_final = RECS[name].reference(*args, initial_state=initial, output_final_state=True)
    leaves = [a.float().requires_grad_() for a in args]
    init = {k: v.float().requires_grad_() for k, v in initial.items()}
    out, final = _layer(name)(*leaves, initial_state=init, output_final_state=True, form=form, backend=backend)
    _compare(out, ref)
    for n in initial:
        _compare(final[n] if isinstance(final, dict) else final, ref_final[n] if isinstance(ref_final, dict)
                 else ref_final)
    # gradients of a weighted sum of the outputs and final states, against the reference's autograd
    weights = torch.randn(out.shape, dtype=torch.float64)
    fw = {n: torch.randn(v.shape, dtype=torch.float64) for n, v in initial.items()}
    ref_leaves = [a.clone().requires_grad_() for a in args]
    ref_init = {k: v.clone().requires_grad_() for k, v in initial.items()}
    r_out, r_fin = RECS[name].reference(*ref_leaves, initial_state=ref_init, output_final_state=True)
    ((r_out * weights).sum() + sum((r_fin[n] * fw[n]).sum() for n in fw)).backward()
    ((out.double() * weights).sum() + sum((final[n].double() * fw[n]).sum() for n in fw)).backward()
    for got, want in zip(leaves + list(init.values()), ref_leaves + list(ref_init.values())):
        if want.grad is None:  # not read (read_after's kc: its initial value never reaches anything)
            assert got.grad is None or not got.grad.any()
        else:
            _compare(got.grad, want.grad, 1e-4)


@pytest.mark.parametrize("name,backend,form", [c for c in CASES if c.values[0] in ("shifted_la", "conv_gla")])
@pytest.mark.parametrize("reverse", [False, True])
def test_packed_and_reverse(name, backend, form, reverse):
    bounds = [0, 3, 3, 4, 9]  # an empty sequence and one of a single step among them
    args, initial = _arguments(name, rows=len(bounds) - 1, length=bounds[-1], batch=1, seed=1)
    cu = torch.tensor(bounds)
    ref, ref_final = RECS[name].reference(*args, initial_state=initial, output_final_state=True, cu_seqlens=cu,
                                          reverse=reverse)
    init = {k: v.float().requires_grad_() for k, v in initial.items()}
    leaves = [a.float().requires_grad_() for a in args]
    out, final = _layer(name)(*leaves, initial_state=init, output_final_state=True,
                              cu_seqlens=cu, reverse=reverse, form=form, backend=backend)
    _compare(out, ref)
    for n in initial:
        _compare(final[n], ref_final[n])
    # gradients, the initial states' included (an empty sequence's final state is its initial state)
    ref_leaves = [a.clone().requires_grad_() for a in args]
    ref_init = {k: v.clone().requires_grad_() for k, v in initial.items()}
    r_out, r_fin = RECS[name].reference(*ref_leaves, initial_state=ref_init, output_final_state=True, cu_seqlens=cu,
                                        reverse=reverse)
    weights = torch.randn(out.shape, dtype=torch.float64)
    ((r_out * weights).sum() + sum((r_fin[n] * (i + 1)).sum() for i, n in enumerate(initial))).backward()
    ((out.double() * weights).sum()
     + sum((final[n].double() * (i + 1)).sum() for i, n in enumerate(initial))).backward()
    for got, want in zip(leaves + list(init.values()), ref_leaves + list(ref_init.values())):
        _compare(got.grad, want.grad, 1e-4)


@pytest.mark.parametrize("reverse", [False, True])
def test_reverse_batch(reverse):
    args, initial = _arguments("conv_gla", seed=2)
    ref, ref_final = RECS["conv_gla"].reference(*args, initial_state=initial, output_final_state=True,
                                                reverse=reverse)
    for form in _forms("conv_gla"):
        out, final = _layer("conv_gla")(*[a.float() for a in args], initial_state={k: v.float() for k, v in
                                                                                    initial.items()},
                                        output_final_state=True, reverse=reverse, form=form, backend="torch")
        _compare(out, ref)
        for n in initial:
            _compare(final[n], ref_final[n])


def test_no_initial_state_and_final_shapes():
    args, _ = _arguments("shifted_la")
    ref, ref_final = RECS["shifted_la"].reference(*args, output_final_state=True)
    out, final = _layer("shifted_la")(*[a.float() for a in args], output_final_state=True, backend="torch",
                                      form="chunked")
    _compare(out, ref)
    assert set(final) == {"klast", "S"} and final["klast"].shape == (B, H, SIZES["K"])
    _compare(final["klast"], ref_final["klast"])
    out, none = _layer("shifted_la")(*[a.float() for a in args], backend="torch")
    assert none is None


def test_module_prints_the_shift():
    from codegen.module import module_source

    text = module_source([analyse(RECS["conv_gla"].checked)], "conv_gla.rec")
    assert "def conv_gla__shift(" in text
    assert "k2 = shift_steps(k2_after, states['k2'], cu_seqlens, reverse)" in text
    assert "recurrence conv_gla_unshifted(q[K], k[K], v[V], g[K], k1[K], k2[K]) -> o[V]" in text
    assert "class ConvGla(torch.nn.Module)" in text


def _generated(name, folder):
    """The generated module of RECS[name] (codegen/module.py `module_source`), imported from `folder`."""
    import importlib.util
    import sys
    from pathlib import Path

    from codegen.module import module_source

    text = module_source([analyse(RECS[name].checked)], f"{name}.rec")
    path = Path(folder) / f"{name}_module.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"{name}_module", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"{name}_module"] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(f"{name}_module", None)
    return module


def test_nn_module():
    """The module of a recurrence with shift states owns its params as any recurrence's module does: `w0`, not
    `inner.w0` (attributes, named_parameters, state_dict, repr), and forward, backward and its options work."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        module = _generated("conv_gla", folder)
        m = module.ConvGla(H, {"K": SIZES["K"]}, backend="torch")
        assert [n for n, _ in m.named_parameters()] == ["w0", "w1", "w2"]
        assert list(m.state_dict()) == ["w0", "w1", "w2"]
        assert isinstance(m.w0, torch.nn.Parameter) and m.w0.shape == (H, SIZES["K"])
        assert not list(m.children())  # no `inner` submodule
        assert repr(m) == "ConvGla(heads=2, sizes={'K': 4}, backend='torch')"
        assert (m.heads, m.sizes, m.form, m.backend, m.chunk_size, m.check_steps) == (
            H, {"K": SIZES["K"]}, "auto", "torch", None, True)
        # a state dict of the module of the same params: it loads, and the module computes the recurrence
        for p in m.parameters():
            torch.nn.init.normal_(p)
        again = module.ConvGla(H, {"K": SIZES["K"]}, backend="torch", form="chunked")
        again.load_state_dict(m.state_dict())
        args, initial = _arguments("conv_gla")
        inputs = [a.float() for a in args[:4]]
        out, _ = again(*inputs)
        ref, _ = RECS["conv_gla"].reference(*inputs, *[p.detach() for p in (m.w0, m.w1, m.w2)])
        _compare(out, ref)
        out, final = m(*inputs, initial_state={k: v.float() for k, v in initial.items()}, output_final_state=True)
        ref, ref_final = RECS["conv_gla"].reference(*inputs, *[p.detach() for p in (m.w0, m.w1, m.w2)],
                                                    initial_state=initial, output_final_state=True)
        _compare(out, ref)
        _compare(final["k2"], ref_final["k2"])
        out.sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
        # given params, and the checks any module makes of them and of its options
        w = torch.randn(H, SIZES["K"])
        assert torch.equal(module.ConvGla(H, {"K": SIZES["K"]}, w1=w).w1.detach(), w)
        with pytest.raises(ValueError, match=r"ConvGla: param w0 must have shape \[H, K\]"):
            module.ConvGla(H, {"K": SIZES["K"]}, w0=torch.zeros(H + 1, SIZES["K"]))
        with pytest.raises(recurrence_dsl.CallError, match="ConvGla: "):
            module.ConvGla(H, {"K": SIZES["K"]}, form="chunky")
        with pytest.raises(recurrence_dsl.CallError, match="ConvGla.forward\\(\\) got param 'w0'"):
            m(*inputs, w0=m.w0)


def test_nn_module_as_without_shift_states():
    """Params, their starts and the repr are those of the module of the rest of the recurrence, compiled as a spec
    of its own (the recurrence without shift states, taking their values as inputs)."""
    import tempfile

    rest = analyse(RECS["conv_gla"].checked).shift.inner
    plain = recurrence_dsl.load(rest.text)[rest.name]
    with tempfile.TemporaryDirectory() as folder:
        shifted = _generated("conv_gla", folder).ConvGla(H, {"K": SIZES["K"]}, chunk_size=16)
        RECS[rest.name] = plain
        try:
            unshifted = _generated(rest.name, folder).ConvGlaUnshifted(H, {"K": SIZES["K"]}, chunk_size=16)
        finally:
            del RECS[rest.name]
    assert repr(shifted).removeprefix("ConvGla") == repr(unshifted).removeprefix("ConvGlaUnshifted")
    assert {n: p.shape for n, p in shifted.named_parameters()} == {n: p.shape for n, p in
                                                                   unshifted.named_parameters()}
    for (n, a), (_, b) in zip(shifted.state_dict().items(), unshifted.state_dict().items()):
        assert torch.equal(a, b), n


def test_no_steps():
    args, initial = _arguments("conv_gla", length=0)
    out, final = _layer("conv_gla")(*[a.float() for a in args], initial_state={k: v.float() for k, v in
                                                                                initial.items()},
                                    output_final_state=True, backend="torch")
    assert out.shape[1] == 0
    for n in initial:  # no step: the initial state is the final state
        _compare(final[n], initial[n])


def test_declared_reverse_recurrence():
    rec = recurrence_dsl.load("""
reverse recurrence back(q[K], k[K], v[V]) -> o[V] {
    state klast[K]
    state S[K, V]
    S[i, j] = S[i, j] + (k[i] - klast[i]) * v[j]
    klast[i] = k[i]
    o[j] = sum(i, q[i] * S[i, j])
}
""")["back"]
    assert "chunked" in analyse(rec.checked).forms
    args, initial = sample_arguments(rec.checked, {"K": 4, "V": 3}, B, T, H, dtype=torch.float64,
                                     with_initial_state=True)
    ref, ref_final = rec.reference(*args, initial_state=initial, output_final_state=True)
    layer = recurrence_dsl.compile(rec, tuning=False)
    for form in layer.forms:
        out, final = layer(*[a.float() for a in args], initial_state={k: v.float() for k, v in initial.items()},
                           output_final_state=True, form=form, backend="torch")
        _compare(out, ref)
        for n in initial:
            _compare(final[n], ref_final[n])


def test_show_and_explain_say_it_is_shifted():
    from recurrence_dsl.explain import explain

    words = explain(analyse(RECS["conv_gla"].checked))
    assert "state k1[i]: shift -- k1 is overwritten each step by k[i]" in words
    assert "computed by shifting inputs along T before the recurrence runs" in words
    assert "step: k2_t[i] = k1_(t-1)[i]" in words
    assert "conv_gla_unshifted, reads it as an input" in words


def test_layer_options_config_pickle_and_errors():
    import pickle

    layer = _layer("shifted_la")
    # the rest's layer reads the tuning records of the recurrence (recdsl tune times the whole layer)
    assert layer.inner.recurrence.spec_hash == RECS["shifted_la"].spec_hash
    chunked = layer.options(form="chunked")
    assert chunked.form == "chunked" and chunked.forms.keys() == layer.forms.keys()
    args = [a.float() for a in _arguments("shifted_la")[0]]
    assert layer.config_for(*args, backend="torch", form="chunked")["form"] == "chunked"
    again = pickle.loads(pickle.dumps(chunked))
    assert again.form == "chunked"
    assert torch.equal(again(*args, backend="torch")[0], chunked(*args, backend="torch")[0])
    rec = recurrence_dsl.load("""
recurrence nl(x[D]) -> y[D] {
    state xl[D]
    state h[D]
    h[d] = tanh(h[d] + x[d] - xl[d])
    xl[d] = x[d]
    y[d] = h[d]
}
""")["nl"]
    # (the rest's reason, under the recurrence's name: as the recurrence without shift states would say it)
    with pytest.raises(recurrence_dsl.CallError, match=r"^nl has no 'chunked' form: h has a non-linear transition "
                                                         r"\(nl: class non-linear; forms: recurrent, or auto\)$"):
        recurrence_dsl.compile(rec, tuning=False)(torch.randn(1, 3, 1, 2), form="chunked")


TOKEN_SHIFT = recurrence_dsl.load((Path(__file__).parent / "data" / "token_shift.rec").read_text())


def _bad_calls(layer, rec, args):
    """(what, a call that must raise a CallError) pairs: bad shapes, dtypes, initial states, cu_seqlens and
    options, each through the layer of a recurrence with shift states."""
    n = len(rec.inputs)
    states = {s.name: torch.zeros((2, H) + tuple(4 if d == "K" else 3 for d in s.dims)) for s in rec.states}
    packed = [a[:1] if i < n else a for i, a in enumerate(args)]
    return [
        ("shape", lambda: layer(*[a[..., :-1] if i == 1 else a for i, a in enumerate(args)])),
        ("rank", lambda: layer(*[a[0] if i == 0 else a for i, a in enumerate(args)])),
        ("dtype", lambda: layer(*[a.long() if i == 2 else a for i, a in enumerate(args)])),
        ("initial shape", lambda: layer(*args, initial_state={**states, "S": torch.zeros(2, H, 4)})),
        ("initial key", lambda: layer(*args, initial_state={**states, "Z": torch.zeros(2, H, 4)})),
        ("initial tensor", lambda: layer(*args, initial_state=torch.zeros(2, H, 4, 3))),
        ("cu_seqlens", lambda: layer(*packed, cu_seqlens=torch.tensor([0, 3, 2]))),
        ("cu_seqlens rows", lambda: layer(*packed, cu_seqlens=torch.tensor([0, 2, 5]),
                                          initial_state={k: torch.cat([v, v[:1]]) for k, v in states.items()})),
        ("form", lambda: layer(*args, form="chunky")),
        ("form of options", lambda: layer.options(form="chunky")),
        ("form of config_for", lambda: layer.config_for(*args, form="chunky")),
        ("backend", lambda: layer(*args, backend="cuda")),
        ("chunk_size", lambda: layer(*args, form="chunked", chunk_size=0)),
        ("config", lambda: layer(*args, form="chunked", backend="torch", config={"bogus": 1})),
        ("check_steps", lambda: layer(*args, check_steps="yes")),
        ("missing", lambda: layer(*args[:2])),
    ]


@pytest.mark.parametrize("name", list(TOKEN_SHIFT))
def test_errors_name_the_recurrence(name):
    """A bad call of a recurrence with shift states is said as for any recurrence, under its name: never under the
    name of its rest (NAME_unshifted), which the user never wrote."""
    rec = TOKEN_SHIFT[name].checked
    layer = recurrence_dsl.compile(TOKEN_SHIFT[name], tuning=False)
    args, _ = sample_arguments(rec, {"K": 4, "V": 3}, 2, 5, H, dtype=torch.float32, seed=3)
    said = {}
    for what, call in _bad_calls(layer, rec, args):
        with pytest.raises(recurrence_dsl.CallError) as err:
            call()
        said[what] = str(err.value)
        assert "unshifted" not in said[what], (what, said[what])
    for what in ("form", "form of options", "form of config_for"):
        assert said[what] == f"{name} has no 'chunky' form: choose from recurrent, scan, chunked, parallel or auto"
    assert said["backend"] == "unknown backend 'cuda'; choose from auto, torch, triton"  # (as any layer says it)
    assert said["missing"].startswith(f"{name}() is missing argument(s)")
    # torch.func, and a double backward through a form whose backward records no graph
    leaves = [a.clone().requires_grad_() for a in args]
    with pytest.raises(recurrence_dsl.CallError, match=f"^{name}: torch.func transforms"):
        torch.func.grad(lambda *x: layer(*x, backend="torch")[0].sum())(*leaves)
    out, _ = layer(*leaves, backend="torch", form="scan")
    (grad,) = torch.autograd.grad(out.square().sum(), leaves[0], create_graph=True)
    with pytest.raises(recurrence_dsl.CallError, match=f"^{name}: double backward .* its scan form"):
        grad.sum().backward()


def test_module_errors_name_the_recurrence():
    """The generated module's errors: its own class name, its recurrence's (never the rest's) in what it passes on."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        module = _generated("conv_gla", folder)
    m = module.ConvGla(H, {"K": 4}, backend="torch")
    args, _ = sample_arguments(RECS["conv_gla"].checked, {"K": 4, "V": 3}, 2, 5, H, dtype=torch.float32)
    inputs = args[:4]
    for call in (lambda: m(*[a[..., :-1] if i == 1 else a for i, a in enumerate(inputs)]),
                 lambda: m(*inputs[:3], inputs[3].long()),
                 lambda: m(*inputs, initial_state={"S": torch.zeros(2, H, 4)}),
                 lambda: m(*inputs, initial_state=torch.zeros(2, H, 4, 3)),
                 lambda: m(inputs[0][:1], *[a[:1] for a in inputs[1:]], cu_seqlens=torch.tensor([0, 9]))):
        with pytest.raises(recurrence_dsl.CallError) as err:
            call()
        assert "unshifted" not in str(err.value), str(err.value)
    m.form = "chunky"
    with pytest.raises(recurrence_dsl.CallError, match="^conv_gla has no 'chunky' form"):
        m(*inputs)
    with pytest.raises(recurrence_dsl.CallError, match="^ConvGla: conv_gla has no 'chunky' form"):
        module.ConvGla(H, {"K": 4}, form="chunky")


def test_a_recurrence_named_as_the_rest():
    """A recurrence of the file named as the rest of another (NAME_unshifted): a spec error that says what the name
    is, at that recurrence."""
    from codegen.module import module_source
    from recurrence_dsl.errors import SpecError

    text = (Path(__file__).parent / "data" / "token_shift.rec").read_text() + """
recurrence conv_gla_unshifted(x[D]) -> y[D] {
    state h[D]
    h[d] = h[d] + x[d]
    y[d] = h[d]
}
"""
    recs = recurrence_dsl.load(text)
    with pytest.raises(SpecError) as err:
        module_source([analyse(r.checked) for r in recs.values()], "clash.rec")
    assert err.value.message.startswith("the recurrence name 'conv_gla_unshifted' is the name of the rest of "
                                        "'conv_gla' once its shift states (k1, k2)")
    assert err.value.span.line == text.count("\n", 0, text.index("recurrence conv_gla_unshifted")) + 1
