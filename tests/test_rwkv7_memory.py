"""The intermediate bytes of an RWKV-7 training step on the chunked Triton form, whose backward is the derived
adjoint's segmented mode (codegen/triton_recurrent.py), and that mode's gradients where the memory work changed it.

Before: the launches for r_c and P_c recomputed every segment's states into scratch (of no use to them: the state
gradient's map reads no state), each program kept all `every` states of its segment, every segment had its own
program up to a 1 GiB cap and the gradients without V were [tiles, B, T, H, K] parts: 1,318,565,908 bytes at
B=2, T=1024, H=4, K=V=128 in bfloat16 (545 MB of P_c scratch, 537 MB of segment scratch). Now those launches
read no state, a segment is recomputed in two levels (about sqrt(every) sub-segment starts, then one
sub-segment's states), one launch per V tile adds its part to those gradients, and the scratch is capped at
`SEGMENT_SCRATCH_BYTES` (64 MiB) whatever T. Bytes are counted on the host without running a kernel (as
tests/test_intermediate_bytes.py does); the gradient checks run in Triton's interpreter (tests/conftest.py).
"""

from __future__ import annotations

import sys

import pytest
import torch

import recurrence_dsl
from codegen.intermediate_bytes import format_rows, measure_call
from codegen.load import load_layer
from recurrence_dsl.analysis import analyse
from recurrence_dsl.sampling import sample_arguments

from .conftest import REPO

pytest.importorskip("triton")

from codegen.triton_recurrent import SEGMENT_SCRATCH_BYTES  # noqa: E402  (after the interpreter is set)

REC = recurrence_dsl.load(REPO / "specs" / "rwkv7.rec")["rwkv7"]
# the step's total at B=2, T=1024, H=4, K=V=128, bfloat16 when this was written (forward 42,606,612, backward
# 84,674,564); before the chunked form took bfloat16 inputs as they are 165,066,776 (forward 72,003,604, of which
# 25,167,872 the dispatcher's float32 copies of the inputs and 4,194,304 a float32 o; backward 93,063,172). The
# bound: that figure and about 6%. Since the DPLR kernels form b = -(a * kk) where they load it (`b_map`, no
# [B, T, H, K] float32 b: 4,194,304 bytes less; forward 38,430,740): 123,105,304; since the output kernel sums the
# skip weight itself (`bonus`: no prologue kernel, no [B, T, H] weight; forward 38,387,728): 123,062,292.
RWKV7_STEP = 123_057_172  # (2026-12-03: the step check's one-read scratch, -5 KB)
RWKV7_STEP_BOUND = 135_000_000


def _step(monkeypatch, T: int, B: int = 2, H: int = 4, K: int = 128):
    """The intermediate bytes of a forward + backward (no kernel runs: only the host's allocations)."""
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *args, **kwargs: None)
    args, _ = sample_arguments(REC.checked, {"K": K, "V": K}, B, T, H, dtype=torch.float32, seed=0)
    layer = load_layer(analyse(REC.checked))
    return measure_call(layer, [a.to(torch.bfloat16) for a in args], form="chunked", backward=True)


def test_training_step_within_the_bound(monkeypatch):
    report = _step(monkeypatch, 1024)
    assert report.total <= RWKV7_STEP_BOUND, format_rows(report)
    assert report.total == RWKV7_STEP, format_rows(report)  # a change in either direction is worth a look
    # the bfloat16 inputs reach the kernels as they are: no float32 copy made by the dispatcher (`run_forms`)
    for row in report.rows:
        assert "x.to(dtype)" not in row.where, format_rows(report)
    # no per-step state ([B, H, T, K, V]), no [tiles, B, T, H, K] part of a gradient without V, no stacked copy of
    # the checkpoints (the chunk starts are read where the forward left them)
    chunk_states = 2 * 4 * 16 * 128 * 128 * 4  # [B, H, T / 64, K, V] float32: r_c, P_c, the ends' gradients
    for row in report.rows:
        if "__triton_recurrent_adjoint" in row.where:
            limit = SEGMENT_SCRATCH_BYTES if "sc_S = " in row.where else chunk_states
            assert row.bytes <= limit, format_rows(report)
            assert "stack" not in row.where, row.where


def test_scratch_does_not_grow_with_the_length(monkeypatch):
    """At T = 8192 (128 segments of 64 steps, B=1, H=4, K=V=128) a program per segment would take 128 MiB of scratch
    (8 + 8 states of [128, 32] float32 each); it stays within its cap: fewer programs than segments."""
    report = _step(monkeypatch, 8192, B=1, H=4, K=128)
    scratch = [r for r in report.rows if "sc_S = " in r.where]
    assert len(scratch) == 1, format_rows(report)
    assert SEGMENT_SCRATCH_BYTES // 2 < scratch[0].bytes <= SEGMENT_SCRATCH_BYTES, format_rows(report)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("lanes", [None, 1], ids=["all-lanes", "one-lane"])
def test_segmented_gradients_with_partial_sub_segments(monkeypatch, lanes):
    """Segments of 16 steps (sub-segments of 4) over T = 37: the last segment's 5 steps are one full sub-segment and
    one of a single step; V = 40: two V tiles (launches adding their parts), the second mostly padding. The
    segmented mode gives the sequential mode's gradients to float32 rounding, also with one segment lane (every
    program taking its segments in turn, as past the scratch cap), and the float64 step loop's (autograd) to 1e-5."""
    layer = recurrence_dsl.compile(REC, backend="triton", form="chunked", tuning=False)
    module = sys.modules[type(layer).__module__]
    if lanes is not None:
        monkeypatch.setattr(module, "rwkv7__segment_lanes", lambda segments, programs, slot: lanes)
    sizes = {"K": 16, "V": 40}
    args, s0 = sample_arguments(REC.checked, sizes, 2, 37, 2, dtype=torch.float32, seed=5, with_initial_state=True)
    _, final, checkpoints = module.rwkv7__chunked_triton(*args, {"S": s0}, 16, 40, chunk_size=16, every=16)
    gen = torch.Generator().manual_seed(6)
    do = {"o": torch.randn(2, 37, 2, 40, generator=gen)}
    dS = {"S": torch.randn(final["S"].shape, generator=gen)}
    (seq, seq_s), (par, par_s) = [
        module.rwkv7__triton_recurrent_adjoint(*args, checkpoints, do, dS, 16, 40, every=16, segments=segments)
        for segments in (False, True)]
    errors = [_rel(p, q) for p, q in zip(par + [par_s["S"]], seq + [seq_s["S"]], strict=True)]
    assert max(errors) <= 1e-6, errors

    # against the float64 step loop under autograd: S_t = (diag(exp(w)) - (a * kk) kk^T) S_{t-1} + k v^T
    leaves = [a.double().requires_grad_() for a in args] + [s0.double().requires_grad_()]
    r, w, k, v, kk, a, u, S = leaves
    outs = []
    for t in range(37):
        kk_t = kk[:, t]  # [B, H, K]
        S = (torch.exp(w[:, t])[..., None] * S - (a[:, t] * kk_t)[..., None] * torch.einsum("bhm,bhmj->bhj", kk_t, S)[
            :, :, None] + k[:, t][..., None] * v[:, t][:, :, None])
        bonus = (r[:, t] * u * k[:, t]).sum(-1, keepdim=True) * v[:, t]
        outs.append(torch.einsum("bhi,bhij->bhj", r[:, t], S) + bonus)
    loss = (torch.stack(outs, 1) * do["o"].double()).sum() + (S * dS["S"].double()).sum()
    ref = torch.autograd.grad(loss, leaves)
    errors = [_rel(p, q) for p, q in zip(par + [par_s["S"]], ref, strict=True)]
    assert max(errors) <= 1e-5, errors
