"""`Layer._call`'s one path, eager and under torch.compile, and the work `auto` skips (codegen/layer.py).

A layer from `recurrence_dsl.compile` under torch.compile (Dynamo with the "eager" backend: no AOTAutograd, no
C++ compile) gives the eager call's output, and a bad call traced there raises the eager `CallError`. On the
Triton backend, `auto` counts the scan form's held bytes (`scan_held_bytes`) only where `pick_form` weighs the
scan form against the recurrent one: never for a spec without a scan form.
"""

from __future__ import annotations

import pytest
import torch

import recurrence_dsl
from codegen.layer import interpreting
from recurrence_dsl.compiler import triton_available
from recurrence_dsl.errors import CallError
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPECS_DIR

B, T, H = 2, 24, 2

needs_triton = pytest.mark.skipif(not (triton_available() and interpreting()),
                                  reason="backend='triton' runs CPU tensors only in Triton's interpreter")


def _layer(name: str, sizes: dict, length: int = T):
    rec = recurrence_dsl.load(SPECS_DIR / f"{name}.rec")[name]
    layer = recurrence_dsl.compile(rec, tuning=False)
    args, _ = sample_arguments(rec.checked, sizes, B, length, H, dtype=torch.float32, seed=0)
    return layer, args


def test_a_compiled_call_gives_the_eager_output_and_the_eager_error():
    layer, args = _layer("linear_attention", {"K": 4, "V": 4})
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a, **kw: layer(*a, backend="torch", **kw), backend="eager")
    for form in ("recurrent", "chunked"):
        want, want_final = layer(*args, backend="torch", form=form, chunk_size=8, output_final_state=True)
        got, got_final = compiled(*args, form=form, chunk_size=8, output_final_state=True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_final, want_final, rtol=1e-5, atol=1e-6)
    bad = (args[0], args[1][:, :T - 4], *args[2:])  # a second input of another length: found while tracing
    with pytest.raises(CallError) as eager:
        layer(*bad, backend="torch")
    with pytest.raises(CallError) as traced:
        compiled(*bad)
    assert str(traced.value) == str(eager.value)


def _spy_held_bytes(layer, monkeypatch) -> list[tuple]:
    """Record each `scan_held_bytes` call the layer's module makes (`_auto_form`, `run_forms`: one namespace)."""
    scope = type(layer)._auto_form.__globals__
    assert scope["run_forms"].__globals__ is scope
    real, calls = scope["scan_held_bytes"], []

    def spied(*args):
        calls.append(args[2:])  # (length, rows)
        return real(*args)

    monkeypatch.setitem(scope, "scan_held_bytes", spied)
    return calls


@needs_triton
def test_auto_counts_the_scan_bytes_only_where_the_scan_form_is_weighed(monkeypatch):
    mamba, mamba_args = _layer("mamba", {"D": 4, "N": 2}, length=40)
    calls = _spy_held_bytes(mamba, monkeypatch)
    assert mamba.config_for(*mamba_args, backend="triton")["form"] == "scan"
    assert calls == [(40, B)]  # recurrent and scan only, 40 steps: weighed
    calls.clear()
    short = [a[:, :16] if a.dim() >= 2 and a.shape[:2] == (B, 40) else a for a in mamba_args]
    assert mamba.config_for(*short, backend="triton")["form"] == "recurrent"  # <= 16 steps: recurrent as it is
    assert mamba.config_for(*mamba_args, backend="torch")["form"] == "scan"  # the rule is the Triton backend's
    assert calls == []

    # no scan form: chunked past 16 steps, never weighed
    delta_net, delta_args = _layer("delta_net", {"K": 4, "V": 4}, length=40)
    calls = _spy_held_bytes(delta_net, monkeypatch)
    assert delta_net.config_for(*delta_args, backend="triton")["form"] == "chunked"
    assert calls == []


@needs_triton
def test_a_triton_call_of_a_spec_without_a_scan_form_counts_no_scan_bytes(monkeypatch):
    layer, args = _layer("indrnn", {"D": 4})
    calls = _spy_held_bytes(layer, monkeypatch)
    out, _ = layer(*args, backend="triton")  # auto: run_forms picks per sequence
    torch.testing.assert_close(out, layer(*args, backend="torch", form="recurrent")[0], rtol=1e-5, atol=1e-6)
    packed = [a.reshape(1, B * T, *a.shape[2:]) if a.dim() >= 2 and a.shape[:2] == (B, T) else a for a in args]
    cu = torch.tensor([0, 9, B * T], dtype=torch.int64)
    layer(*packed, backend="triton", cu_seqlens=cu)  # packed_form and the per-length batches
    assert calls == []
