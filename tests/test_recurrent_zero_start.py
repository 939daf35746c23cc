"""The torch recurrent form of a call without an initial state starts from zero without a zero state.

The dispatcher passes None to a form marked `takes_no_initial_state` (codegen/dispatch.py); the torch recurrent form
is (`_zero_start`, codegen/torch_forms.py): its loop takes the first step with the terms that read the state left
out, and its derived backward starts the first segment's recomputation from zero in its own buffer.

- Values, final states and every gradient equal those of an explicit zero initial state (float64, T = 5: one
  segment, and T = 0), for a linear class (mLSTM, two states), a delta rule with a decay (RWKV-7, whose backward
  recomputes in place, `_write_product_recompute`), a nonlinear one (minimal RNN), one whose state update with a zero
  state is an input as it is (Based's S0 = S0 + v: the state must not be a view of v) and Mamba (a state [D, N]).
- No op in forward or backward makes a tensor of a state's shape filled with zeros (a TorchDispatchMode sees every
  aten op; a torch.zeros of that shape, as a check of the check, is seen).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import recurrence_dsl
from codegen.load import load_layer
from recurrence_dsl.analysis import analyse
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPECS_DIR, as_dict

B, H, SIZE = 2, 2, 4
# ops that make a tensor that can be all zeros (the backward's `zero_` of its own buffer's slot makes none)
_ZEROS = {"zeros", "new_zeros", "zeros_like", "new_full", "full", "full_like"}


class ZeroStates(TorchDispatchMode):
    """The shapes of the tensors made filled with zeros inside the block."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in _ZEROS:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.numel() and not bool(t.any()):
                    self.shapes.append(tuple(t.shape))
        return out


def _rec(name: str) -> recurrence_dsl.Recurrence:
    return recurrence_dsl.load(SPECS_DIR / f"{name}.rec")[name]


def _run(layer, rec, args, initial, watch=None):
    leaves = [a.detach().clone().requires_grad_() for a in args]
    mode = watch if watch is not None else ZeroStates()
    with mode:
        out, final = layer(*leaves, initial_state=initial, output_final_state=True, form="recurrent",
                           backend="torch")
        parts = [*as_dict(out, rec.checked.outputs).values(), *as_dict(final, rec.checked.states).values()]
        sum((p * (i + 1)).sum() for i, p in enumerate(parts)).backward()
    return [p.detach() for p in parts] + [x.grad for x in leaves], mode.shapes


@pytest.mark.parametrize("name", ["mlstm", "rwkv7", "minimal_rnn", "based", "mamba"])
@pytest.mark.parametrize("T", [5, 0])
def test_recurrent_form_from_no_initial_state(name, T):
    rec = _rec(name)
    args, _ = sample_arguments(rec.checked, {s: SIZE for s in rec.checked.sizes}, B, max(T, 1), H,
                               dtype=torch.float64, seed=2)
    args = [a[:, :T] if i < len(rec.checked.inputs) else a for i, a in enumerate(args)]
    layer = load_layer(analyse(rec.checked))
    assert getattr(layer.forms["recurrent"], "no_initial_state", False)
    state_shapes = {(B, H) + tuple(SIZE for _ in s.dims) for s in rec.checked.states}
    zeros = {s.name: torch.zeros((B, H) + tuple(SIZE for _ in s.dims), dtype=torch.float64)
             for s in rec.checked.states}
    got, made = _run(layer, rec, args, None)
    want, _ = _run(layer, rec, args, zeros if len(zeros) > 1 else next(iter(zeros.values())))
    for i, (x, y) in enumerate(zip(got, want)):
        if y is None:
            assert x is None, i
            continue
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    if T:
        assert not [s for s in made if s in state_shapes], made
    with ZeroStates() as explicit:  # the check sees a zero state where one is made
        torch.zeros((B, H, SIZE), dtype=torch.float64)
    assert explicit.shapes == [(B, H, SIZE)]


def test_a_zero_start_state_is_not_a_view_of_an_input():
    """Based's S0 = S0 + v from zero is v itself: the final state after one step is a tensor of its own."""
    rec = _rec("based")
    args, _ = sample_arguments(rec.checked, {s: SIZE for s in rec.checked.sizes}, B, 1, H, dtype=torch.float64,
                               seed=0)
    layer = load_layer(analyse(rec.checked))
    _, final = layer(*args, output_final_state=True, form="recurrent", backend="torch")
    s0 = as_dict(final, rec.checked.states)["S0"]
    v = args[[i.name for i in rec.checked.inputs].index("v")]
    torch.testing.assert_close(s0, v[:, 0])
    assert s0.untyped_storage().data_ptr() != v.untyped_storage().data_ptr()
