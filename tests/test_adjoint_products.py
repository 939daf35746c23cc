"""The recurrent adjoint's per-step products and loop terms (codegen/torch_forms.py `_product_plan`).

The gradients themselves are tested for every spec in tests/test_adjoint.py; these tests pin the structure that
makes the delta-rule family's backward cheap: the update and the backward map split into terms
`coefficient * reader`, each contraction of the state (or its gradient) with a vector computed once per step
by one `bmm` into a buffer that the block gradients read again, and a segment cut into equal blocks.
"""

from __future__ import annotations

from pathlib import Path

import sympy
import torch

import recurrence_dsl
from codegen.dispatch import ADJOINT_BLOCK, adjoint_block
from codegen.torch_forms import TorchFormWriter, _linear_terms
from recurrence_dsl.adjoint import canonical_bound
from recurrence_dsl.analysis import analyse

SPECS = Path(__file__).resolve().parents[1] / "specs"


def _writer(name: str) -> TorchFormWriter:
    rec = next(iter(recurrence_dsl.load(SPECS / f"{name}.rec").values()))
    return TorchFormWriter(analyse(rec.checked))


def _adjoint_source(name: str) -> str:
    source = _writer(name).write_recurrent()
    return source[source.index(f"def {name}__recurrent_adjoint"):]


def test_delta_product_update_is_linear_in_the_state():
    """The second update reads the first's result: distributing the sums leaves the state itself and its two
    contractions `k1^T S`, `k2^T S` as the only readers, every coefficient free of the state."""
    writer = _writer("delta_product")
    update = writer.a.ir.updates["S"].expr
    terms = _linear_terms(update, {"S"})
    assert terms is not None
    contractions = [r for _, r in terms if isinstance(r, sympy.Sum)]
    assert {str(f.base) for r in contractions for f in r.function.atoms(sympy.Indexed)} == {"S", "k1", "k2"}
    assert len({canonical_bound(r) for r in contractions}) == 2  # k1^T S and k2^T S, each however often it occurs
    assert all(r == sympy.IndexedBase("S")[r.indices] for _, r in terms if isinstance(r, sympy.Indexed))
    assert all(not c.has(sympy.IndexedBase("S")) for c, _ in terms)
    assert _linear_terms(sympy.tanh(update), {"S"}) is None  # not linear: the old printing keeps it


def test_delta_rule_adjoint_steps_are_one_bmm_and_in_place_terms():
    """DeltaNet's recomputation and reverse loop: one bmm per step into a product buffer each, the terms added in
    place, and the block gradients read the products (dv = beta * k^T dS) rather than contracting again."""
    source = _adjoint_source("delta_net")
    assert "torch.bmm(k_bmm[t], S_bmm[t], out=sum_S_k_bmm[t])" in source
    assert "torch.bmm(k_bmm[t], grad_S__new_bmm[t], out=sum_grad_S__new_k_bmm[t])" in source
    assert "S_at[t + 1].addcmul_(" in source and "S_at[t + 1].add_(S_at[t])" in source
    assert "grad_v[:, t0 + t2:t0 + t3] = (beta_seg[t2:t3][..., None] * sum_grad_S__new_k_steps[t2:t3])" in source
    assert "@ grad_S__new_at[t]" not in source and "@ S_at[t]" not in source  # no per-step matmul printed inline


def test_rwkv7_contracts_with_a_product_vector():
    """RWKV-7's backward map contracts its gradient with a * kk, a vector made once per segment."""
    source = _adjoint_source("rwkv7")
    assert source.count("torch.bmm(") == 2
    assert "(a_seg * kk_seg).reshape(t1 - t0, B_ * H_, 1, K).unbind(0)" in source


def test_a_segment_is_cut_into_equal_blocks(monkeypatch):
    """mLSTM's states (C[K, V] and n[K]) are a little over 256 KiB a step with their gradients: the 16-step segment
    stays one block of 16 rather than 15 steps and 1; four times larger states give 4 blocks of 4."""
    monkeypatch.delenv(ADJOINT_BLOCK, raising=False)
    mlstm = [torch.zeros(2, 4, 64, 64), torch.zeros(2, 4, 64)]
    assert adjoint_block(mlstm, 16) == 16
    assert adjoint_block([torch.zeros(2, 4, 128, 128)], 16) == 4
    assert adjoint_block([torch.zeros(2, 4, 64, 64)], 20) == 20  # 5 MiB: one block is nearer than two
