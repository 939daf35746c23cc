"""The scan form run in blocks of a fixed number of steps (`codegen/dispatch.py`, `in_blocks`; issue 14).

A sequence longer than `scan_block_steps` steps runs block by block, the states carried across blocks, and under
autograd the backward re-runs one block at a time from the state entering it. Checked here, float64, T = 37 in
blocks of 8 (`RECURRENCE_DSL_SCAN_BLOCK`, so the last block is partial), with an initial state: every spec with a
scan form (specs/ and the coupled-state rotation of tests/data/rotation.rec) against the float64 reference
(relative error <= 1e-10, as tests/test_forms.py) and its gradients (every input, param, initial state) against
autograd through the whole sequence as one block (<= 1e-10); packed sequences and reverse runs; what autograd keeps
(no [B, T, H, *S] state history, linear in T); the block length rule.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import recurrence_dsl
from codegen.dispatch import SCAN_BLOCK, scan_block_steps
from recurrence_dsl.analysis import analyse
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPEC_FILES

F64 = torch.float64
B, H, T, BLOCK = 2, 2, 37, 8

SPECS: dict[str, recurrence_dsl.Recurrence] = {}
for _path in SPEC_FILES + [Path(__file__).parent / "data" / "rotation.rec"]:
    SPECS.update(recurrence_dsl.load(_path))
SCANNED = sorted(n for n, rec in SPECS.items() if "scan" in analyse(rec.checked).forms)


def sizes_of(rec: recurrence_dsl.Recurrence) -> dict[str, int]:
    return {name: [6, 5, 4][i % 3] for i, name in enumerate(rec.checked.sizes)}


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.detach() - ref.detach()).norm() / ref.detach().norm().clamp_min(1e-300)).item()


def flat(rec, out, final) -> list[torch.Tensor]:
    outs = list(out) if isinstance(out, tuple) else [out]
    finals = [final[s.name] for s in rec.checked.states] if isinstance(final, dict) else [final]
    return outs + finals


def run(rec, args, initial, block: int, monkeypatch, **kwargs):
    """Outputs + final states and the gradients of a fixed weighted sum of them w.r.t. every argument."""
    monkeypatch.setenv(SCAN_BLOCK, str(block))
    leaves = [a.detach().clone().requires_grad_() for a in args]
    init = {k: v.detach().clone().requires_grad_() for k, v in initial.items()} if isinstance(initial, dict) \
        else initial.detach().clone().requires_grad_()
    layer = recurrence_dsl.compile(rec, backend="torch", tuning=False)
    out, final = layer(*leaves, initial_state=init, output_final_state=True, form="scan", **kwargs)
    results = flat(rec, out, final)
    weights = torch.Generator().manual_seed(1)
    loss = sum((r * torch.randn(r.shape, generator=weights, dtype=F64)).sum() for r in results)
    grads = torch.autograd.grad(loss, leaves + (list(init.values()) if isinstance(init, dict) else [init]),
                                allow_unused=True)
    return results, grads


@pytest.mark.parametrize("name", SCANNED)
def test_blocks_match_the_reference_and_the_whole_sequence(name, monkeypatch):
    rec = SPECS[name]
    args, initial = sample_arguments(rec.checked, sizes_of(rec), B, T, H, dtype=F64, seed=0, with_initial_state=True)
    ref_out, ref_final = rec.reference(*args, initial_state=initial, output_final_state=True)
    blocked, grads = run(rec, args, initial, BLOCK, monkeypatch)
    whole, whole_grads = run(rec, args, initial, 1024, monkeypatch)
    for got, want in zip(blocked, flat(rec, ref_out, ref_final), strict=True):
        assert got.shape == want.shape and rel(got, want) <= 1e-10, (name, rel(got, want))
    for n, (got, want) in enumerate(zip(grads, whole_grads, strict=True)):
        if want is None:
            assert got is None or got.abs().max() == 0, (name, n)
            continue
        assert got is not None and got.shape == want.shape and rel(got, want) <= 1e-10, (name, n, rel(got, want))


@pytest.mark.parametrize("kwargs", [{"reverse": True}, {"cu_seqlens": torch.tensor([0, 20, 57])}],
                         ids=["reverse", "cu_seqlens"])
def test_blocks_with_reverse_runs_and_packed_sequences(kwargs, monkeypatch):
    rec = SPECS["gla"]
    packed = "cu_seqlens" in kwargs
    args, initial = sample_arguments(rec.checked, sizes_of(rec), 2 if packed else B, 57 if packed else T, H,
                                     dtype=F64, seed=2, with_initial_state=True)
    if packed:  # one row holding two sequences (20 and 37 steps), an initial state each
        args = [a[:1] for a in args]
    blocked, grads = run(rec, args, initial, BLOCK, monkeypatch, **kwargs)
    whole, whole_grads = run(rec, args, initial, 1024, monkeypatch, **kwargs)
    for got, want in zip(blocked + list(grads), whole + list(whole_grads), strict=True):
        assert rel(got, want) <= 1e-10


def test_no_grad_blocks_match(monkeypatch):
    rec = SPECS["hgrn2"]
    args, initial = sample_arguments(rec.checked, sizes_of(rec), B, T, H, dtype=F64, seed=3, with_initial_state=True)
    layer = recurrence_dsl.compile(rec, backend="torch", tuning=False)
    got = {}
    for block in (BLOCK, 1024):
        monkeypatch.setenv(SCAN_BLOCK, str(block))
        with torch.no_grad():
            got[block] = flat(rec, *layer(*args, initial_state=initial, output_final_state=True, form="scan"))
    for a, b in zip(got[BLOCK], got[1024], strict=True):
        assert rel(a, b) <= 1e-12


def saved_numbers(rec, length: int, monkeypatch) -> int:
    """How many numbers autograd keeps for the backward of one gla scan call of `length` steps (K = V = 16)."""
    monkeypatch.setenv(SCAN_BLOCK, "16")
    args, _ = sample_arguments(rec.checked, {"K": 16, "V": 16}, 1, length, 2, dtype=torch.float32, seed=0)
    leaves = [a.requires_grad_() for a in args]
    layer = recurrence_dsl.compile(rec, backend="torch", tuning=False)
    seen: dict[int, int] = {}

    def pack(t):
        seen[id(t.untyped_storage())] = t.untyped_storage().nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(*leaves, form="scan")
    return sum(seen.values())


def test_autograd_keeps_no_state_history(monkeypatch):
    """The inputs and one state per block of 16 steps: far less than one [B, T, H, K, V] history, linear in T."""
    rec = SPECS["gla"]
    short, long = saved_numbers(rec, 256, monkeypatch), saved_numbers(rec, 512, monkeypatch)
    history = 512 * 2 * 16 * 16  # [B=1, T=512, H=2, K=16, V=16]
    inputs = 512 * 2 * 16 * 4  # q, k, v, g [1, 512, 2, 16]
    assert long <= inputs + history // 16 + 2 * 16 * 16, (long, inputs, history)
    assert 1.9 <= long / short <= 2.1, (short, long)


def test_block_length_rule(monkeypatch):
    monkeypatch.delenv(SCAN_BLOCK, raising=False)
    small = [torch.zeros(1, 2, 4, 4)]
    gla = [torch.zeros(1, 2, 64, 64)]  # 8192 numbers a step
    big = [torch.zeros(8, 16, 128, 128)]
    assert scan_block_steps(small) == 1024  # at most 1024 steps
    assert scan_block_steps(gla) == 16
    assert scan_block_steps(big) == 16  # at least 16
    assert all(s & (s - 1) == 0 for s in (scan_block_steps(x) for x in (small, gla, big)))
    monkeypatch.setenv(SCAN_BLOCK, "24")
    assert scan_block_steps(gla) == 24


@pytest.mark.parametrize("variable", ["RECURRENCE_DSL_SCAN_BLOCK", "RECURRENCE_DSL_CHECKPOINT_EVERY",
                                      "RECURRENCE_DSL_ADJOINT_BLOCK"])
@pytest.mark.parametrize("value", ["16k", "2.5", "-4"])
def test_a_step_count_that_is_not_a_whole_number_names_its_variable(variable, value, monkeypatch):
    """A mistyped block size must say which variable is wrong, not raise int()'s bare message."""
    from codegen.dispatch import adjoint_block, checkpoint_every

    monkeypatch.setenv(variable, value)
    gla = [torch.zeros(1, 2, 8, 8)]
    read = {"RECURRENCE_DSL_SCAN_BLOCK": lambda: scan_block_steps(gla),
            "RECURRENCE_DSL_CHECKPOINT_EVERY": lambda: checkpoint_every(100, gla),
            "RECURRENCE_DSL_ADJOINT_BLOCK": lambda: adjoint_block(gla, 16)}[variable]
    with pytest.raises(ValueError, match=f"{variable} must be a whole number of steps.*got '{value}'"):
        read()
    monkeypatch.setenv(variable, " 0 ")  # unset or 0: chosen per call, as before
    assert read() > 0
