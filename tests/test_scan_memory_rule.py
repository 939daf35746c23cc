"""`auto` on the Triton backend keeps the scan form's held tensors bounded: past `scan_bytes_limit()` bytes of
per-step decays, injections and states (float32 [B, T, H, *state] each) it runs the recurrent kernels, which
compute those in registers (codegen/dispatch.py `pick_form`, `SCAN_HELD_BYTES`). Mamba-1's h[D, N] is the case:
its scan kept 3 * D * N numbers a step where its inputs have 3 * D + 2 * N; since its prologue runs inside the scan
kernels (`fused_scan`) it keeps D * N, the states, and a coupled (block) scan still keeps 3."""

from __future__ import annotations

import functools

import pytest
import torch

import recurrence_dsl
from codegen import dispatch
from recurrence_dsl.sampling import sample_arguments

from .conftest import REPO, SPECS_DIR

SIZES = {"D": 8, "N": 4}
B, T, H = 2, 40, 2


@pytest.fixture(scope="module")
def mamba():
    rec = recurrence_dsl.load(str(SPECS_DIR / "mamba.rec"))["mamba"]
    layer = recurrence_dsl.compile(rec, tuning=False)
    args, _ = sample_arguments(rec.checked, SIZES, B, T, H, dtype=torch.float32, seed=0)
    return layer, args


def test_the_held_bytes_count_the_states_alone_where_the_prologue_is_fused(mamba):
    layer, args = mamba
    call = recurrence_dsl.calling.bind_call(layer.recurrence, args, {})
    assert layer.recurrence.scan_held == 1
    assert dispatch.scan_held_bytes(layer.recurrence, call, T, B) == 4 * B * T * H * SIZES["D"] * SIZES["N"]


def test_a_block_scan_still_counts_decays_injections_and_states():
    """A coupled pair (2 x 2 blocks: no fused kernels) keeps a, b and s: three float32 tensors per state."""
    rec = recurrence_dsl.load(str(REPO / "tests" / "data" / "coupled.rec"))["cascade"]
    layer = recurrence_dsl.compile(rec, tuning=False)
    assert layer.recurrence.scan_held == 3
    args, _ = sample_arguments(rec.checked, {n: 4 for n in rec.checked.sizes}, B, T, H, dtype=torch.float32, seed=0)
    call = recurrence_dsl.calling.bind_call(layer.recurrence, args, {})
    elements = sum(4 ** len(s.dims) for s in rec.checked.states)
    assert dispatch.scan_held_bytes(layer.recurrence, call, T, B) == 3 * 4 * B * T * H * elements


def test_pick_form_takes_the_recurrent_form_past_the_limit(monkeypatch):
    forms = ("recurrent", "scan")
    monkeypatch.delenv(dispatch.SCAN_BYTES, raising=False)
    assert dispatch.pick_form(forms, 4096, 64, 1, dispatch.SCAN_HELD_BYTES) == "scan"
    assert dispatch.pick_form(forms, 4096, 64, 1, dispatch.SCAN_HELD_BYTES + 1) == "recurrent"
    assert dispatch.pick_form(("scan", "parallel"), 4096, 64, 1, 1 << 40) == "scan"  # no recurrent form to take
    assert dispatch.pick_form(("recurrent", "chunked", "scan"), 4096, 64, 1, 1 << 40) == "chunked"
    monkeypatch.setenv(dispatch.SCAN_BYTES, "0")
    assert dispatch.pick_form(forms, 4096, 64, 1, 1) == "recurrent"
    monkeypatch.setenv(dispatch.SCAN_BYTES, "lots")
    with pytest.raises(ValueError, match="RECURRENCE_DSL_SCAN_BYTES='lots': expected a byte count >= 0"):
        dispatch.pick_form(forms, 4096, 64, 1, 1)


def _spy(layer, monkeypatch) -> list[str]:
    """The Triton forms of `layer` wrapped to record which of them ran (their attributes kept)."""
    ran: list[str] = []

    def wrap(name, fn):
        @functools.wraps(fn)
        def spied(*a, **k):
            ran.append(name)
            return fn(*a, **k)
        return spied

    monkeypatch.setattr(layer, "triton_forms", {n: wrap(n, f) for n, f in layer.triton_forms.items()})
    return ran


@pytest.mark.parametrize(("limit", "runs"), [(None, "scan"), ("0", "recurrent")])
def test_a_triton_call_runs_the_form_the_rule_picks_and_matches_the_reference(mamba, monkeypatch, limit, runs):
    layer, args = mamba
    if limit is None:
        monkeypatch.delenv(dispatch.SCAN_BYTES, raising=False)
    else:
        monkeypatch.setenv(dispatch.SCAN_BYTES, limit)
    assert layer.config_for(*args, backend="triton")["form"] == runs
    assert layer.config_for(*args, backend="torch")["form"] == "scan"  # the rule is the Triton backend's
    ran = _spy(layer, monkeypatch)
    leaves = [a.detach().clone().requires_grad_(True) for a in args]
    out = layer(*leaves, backend="triton")[0]
    assert ran == [runs]
    ref_leaves = [a.detach().clone().requires_grad_(True) for a in args]
    ref = layer(*ref_leaves, backend="torch", form="recurrent")[0]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(ref, ref_leaves, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-4)


def test_packed_sequences_follow_the_same_rule(mamba, monkeypatch):
    layer, args = mamba
    packed = [a.reshape(1, B * T, *a.shape[2:]) if a.dim() >= 2 and a.shape[:2] == (B, T) else a for a in args]
    cu = torch.tensor([0, 17, B * T], dtype=torch.int64)
    for limit, runs in ((None, "scan"), ("0", "recurrent")):
        if limit is None:
            monkeypatch.delenv(dispatch.SCAN_BYTES, raising=False)
        else:
            monkeypatch.setenv(dispatch.SCAN_BYTES, limit)
        ran = _spy(layer, monkeypatch)
        out = layer(*packed, backend="triton", cu_seqlens=cu)[0]
        assert ran == [runs]
        ref = layer(*packed, backend="torch", form="recurrent", cu_seqlens=cu)[0]
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        monkeypatch.undo()


def test_vector_states_scan_first(monkeypatch):
    """A recurrence whose states are all vectors lifted to [1, D] for the chunked form (`scan_first`: RG-LRU,
    minGRU) runs the scan form under auto, ahead of the chunked and parallel ones, on both backends and for
    packed calls; past the scan's byte limit it falls back to the usual order; a matrix state keeps chunked."""
    from codegen.module import scan_first
    from recurrence_dsl.analysis import analyse

    monkeypatch.delenv(dispatch.SCAN_BYTES, raising=False)
    for name, first in (("rg_lru", True), ("min_gru", True), ("gla", False), ("mlstm", False), ("mamba", False)):
        rec = recurrence_dsl.load(str(SPECS_DIR / f"{name}.rec"))[name]
        assert scan_first(analyse(rec.checked)) is first, name
        assert recurrence_dsl.compile(rec, tuning=False).recurrence.scan_first is first, name
    forms = ("recurrent", "scan", "chunked", "parallel")
    assert dispatch.pick_form(forms, 4096, 64, 1, 0, scan_first=True) == "scan"
    assert dispatch.pick_form(forms, 40, 64, 1, 0, scan_first=True) == "scan"  # not the parallel form
    assert dispatch.pick_form(forms, 8, 64, 1, 0, scan_first=True) == "recurrent"  # a few steps: the step loop
    assert dispatch.pick_form(forms, 4096, 64, 1, lambda: 1 << 40, scan_first=True) == "chunked"
    assert dispatch.pick_form(forms, 4096, 64, 1, 0) == "chunked"
    rec = recurrence_dsl.load(str(SPECS_DIR / "rg_lru.rec"))["rg_lru"]
    layer = recurrence_dsl.compile(rec, tuning=False)
    assert layer.pick_form(1024) == "scan"
    args, _ = sample_arguments(rec.checked, {"D": 8}, 1, 40, H, dtype=torch.float32, seed=0)
    ran = _spy(layer, monkeypatch)
    cu = torch.tensor([0, 17, 17, 40])
    out, _ = layer(*args, cu_seqlens=cu, backend="triton")
    assert ran == ["scan"]
    want, _ = rec.reference(*[a.double() for a in args], cu_seqlens=cu)
    assert torch.allclose(out.double(), want, atol=1e-5)
