"""Generated layers used as a training script uses them: autocast, odd batch shapes, state carried between calls.

Each test is a regression of something a user met (the docstring says what failed before the fix). Shapes are
tiny; values are compared with the float64 reference interpreter on the same (rounded) values.
"""

from __future__ import annotations

import pytest
import torch

import recurrence_dsl
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPECS_DIR

BF16 = torch.bfloat16


def _spec(name: str) -> recurrence_dsl.Recurrence:
    return recurrence_dsl.load(SPECS_DIR / f"{name}.rec")[name]


def _sizes(rec) -> dict[str, int]:
    return {n: (4, 8)[i % 2] for i, n in enumerate(rec.checked.sizes)}


def _args(rec, batch: int, length: int, heads: int = 2, seed: int = 0):
    return sample_arguments(rec.checked, _sizes(rec), batch, length, heads, seed=seed, with_initial_state=True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------------------------
# torch.autocast around the forward
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gla", "delta_net"])
def test_autocast_forward_then_backward_outside(name):
    """q and k come from a Linear under autocast (bfloat16), v and the gate stay float32. Before the fix the
    forms' matmuls ran in bfloat16 under autocast, kept mixed-dtype tensors, and the backward (outside autocast,
    as a training loop calls it) raised "expected scalar type BFloat16 but found Float" in the derived adjoint."""
    rec = _spec(name)
    layer = recurrence_dsl.compile(rec, backend="torch", form="recurrent")
    (q, k, *rest), s0 = _args(rec, 2, 6)
    lin = torch.nn.Linear(q.shape[-1], q.shape[-1])
    with torch.autocast("cpu", dtype=BF16):
        q16, k16 = lin(q), lin(k)
        assert q16.dtype == BF16
        leaves = [x.detach().requires_grad_() for x in (q16, k16, *rest)]
        out, _ = layer(*leaves, initial_state=s0)
    assert out.dtype == BF16  # the first input's dtype
    weight = torch.randn(out.shape, dtype=torch.float64)
    (out.double() * weight).sum().backward()

    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ref, _ = rec.reference(*ref_leaves, initial_state=s0, output_final_state=True)
    (ref * weight).sum().backward()
    assert _rel(out, ref) < 1e-2  # bfloat16 output rounding
    for got, want in zip(leaves, ref_leaves):
        assert got.grad.dtype == got.dtype
        assert _rel(got.grad, want.grad) < 2e-2


@pytest.mark.parametrize("form", ["recurrent", "chunked"])
def test_autocast_leaves_float32_calls_in_float32(form):
    """float32 inputs under autocast: the layer computes as without autocast (it picks its own dtypes). Before
    the fix its matmuls ran in bfloat16, 2.6e-3 relative error where float32 gives 6e-8."""
    rec = _spec("gla")
    layer = recurrence_dsl.compile(rec, backend="torch", form=form, chunk_size=4)
    args, s0 = _args(rec, 2, 7)
    plain, plain_state = layer(*args, initial_state=s0, output_final_state=True)
    with torch.autocast("cpu", dtype=BF16):
        under, under_state = layer(*args, initial_state=s0, output_final_state=True)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(under_state, plain_state, rtol=1e-6, atol=1e-6)


def test_backward_called_inside_autocast():
    """A backward called inside the autocast block (as some training loops do) gives the float32 gradients."""
    rec = _spec("gla")
    layer = recurrence_dsl.compile(rec, backend="torch", form="recurrent")
    args, s0 = _args(rec, 1, 5)
    plain = [x.clone().requires_grad_() for x in args]
    (layer(*plain, initial_state=s0)[0] ** 2).sum().backward()
    under = [x.clone().requires_grad_() for x in args]
    with torch.autocast("cpu", dtype=BF16):
        (layer(*under, initial_state=s0)[0] ** 2).sum().backward()
    for a, b in zip(under, plain):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Empty batches
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["delta_net", "gated_delta_net"])
def test_empty_batch_backward_of_the_delta_rule_adjoint(name):
    """B = 0 (an empty shard of a batch). Before the fix the delta rule's derived adjoint viewed its empty step
    buffers as `.view(-1, B * H, K, V)` and raised "cannot reshape tensor of 0 elements"."""
    rec = _spec(name)
    layer = recurrence_dsl.compile(rec, backend="torch", form="recurrent")
    args, s0 = _args(rec, 0, 5)
    leaves = [x.clone().requires_grad_() for x in args]
    init = s0.clone().requires_grad_()
    out, final = layer(*leaves, initial_state=init, output_final_state=True)
    assert out.shape[0] == 0 and final.shape[0] == 0
    (out.sum() + final.sum()).backward()
    for x in leaves + [init]:
        assert x.grad is not None and x.grad.shape == x.shape


# ---------------------------------------------------------------------------------------------------------------
# Empty sequences (T = 0): the final state is the initial state, and so is its gradient
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_length_scan_of_a_state_read_before_its_update(backend):
    """rwkv6 reads S before updating it, so its scan form builds the states before each step. With T = 0 that
    was [initial state] (one step), and a loss on the (empty) output and the final state raised "The expanded
    size of the tensor (1) must match the existing size (0)" in the epilogue's backward."""
    rec = _spec("rwkv6")
    layer = recurrence_dsl.compile(rec, backend=backend, form="scan")
    args, s0 = _args(rec, 1, 0, heads=1)
    leaves = [x.clone().requires_grad_() for x in args]
    init = s0.clone().requires_grad_()
    out, final = layer(*leaves, initial_state=init, output_final_state=True)
    assert out.shape[1] == 0
    torch.testing.assert_close(final, s0)
    weight = torch.randn(final.shape)
    (out.sum() + (final * weight).sum()).backward()
    torch.testing.assert_close(init.grad, weight)
    assert all(x.grad is None or not x.grad.any() for x in leaves)  # nothing reaches the (empty) inputs or u


# ---------------------------------------------------------------------------------------------------------------
# In-place ops on what a layer returns
# ---------------------------------------------------------------------------------------------------------------


def _losses_with_and_without_in_place(layer, rec, args, s0):
    """Gradients of one loss computed twice: once changing the output and the final state in place (a residual
    `out += x`, a state reset `state.mul_(mask)`), once out of place."""
    grads = []
    for in_place in (True, False):
        leaves = [x.clone().requires_grad_() for x in args]
        init = s0.clone().requires_grad_()
        out, final = layer(*leaves, initial_state=init, output_final_state=True)
        mask = torch.tensor([1.0, 0.0]).view((2,) + (1,) * (final.dim() - 1))
        residual = next(x for x in leaves if x.shape == out.shape)
        if in_place:
            out += residual
            final.mul_(mask)
        else:
            out, final = out + residual, final * mask
        ((out ** 2).sum() + (final ** 2).sum()).backward()
        grads.append([x.grad for x in leaves + [init]])
    return grads


@pytest.mark.parametrize("name,backend,form", [("gla", "torch", "recurrent"), ("gla", "torch", "chunked"),
                                               ("gla", "torch", "scan"), ("gla", "triton", "chunked"),
                                               ("gla", "triton", "scan"), ("rg_lru", "triton", "chunked"),
                                               ("rwkv6", "triton", "scan"), ("mamba", "torch", "scan")])
def test_in_place_ops_on_outputs_and_final_states(name, backend, form):
    """Before the fix: "Output 0 of _PrintedVJP is a view and is being modified inplace" (torch forms, Triton
    scan), "Output 1 of _AdjointBackward is a view ..." (the recurrent form's final state), "one of the variables
    needed for gradient computation has been modified by an inplace operation" (the Triton chunked form saves its
    final state, and RG-LRU's value decay its output)."""
    rec = _spec(name)
    layer = recurrence_dsl.compile(rec, backend=backend, form=form, chunk_size=16)
    args, s0 = _args(rec, 2, 5, heads=1)
    got, want = _losses_with_and_without_in_place(layer, rec, args, s0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_zero_length_final_state_is_not_the_initial_state():
    """With T = 0 the final state equals the initial state; changing it in place must not change the caller's
    initial state (a state carried across calls and reset in place)."""
    rec = _spec("gla")
    layer = recurrence_dsl.compile(rec, backend="torch")
    args, s0 = _args(rec, 2, 0, heads=1)
    keep = s0.clone()
    _, final = layer(*args, initial_state=s0, output_final_state=True)
    final.zero_()
    torch.testing.assert_close(s0, keep)
