"""`SKIP_STEP` (a skip term's weight per step [B, T, H], RWKV-6's bonus) folded per module by codegen/specialize.py.

- `skip_per_step` reads it off the printed calls: a `skip_weight` that is an argument of the printed function (a
  param, one weight per head: Mamba2's D) is not per step; one the prologue computes is.
- Mamba2's module (skip weight per head) keeps no SKIP_STEP branch in its kernels and no `fused.skip_step` branch in
  `_unfuse`; RWKV-6's keeps both, and its specialised chunked Triton form still matches the float64 reference
  (values and gradients, T = 20 in chunks of 16, float32).
"""

from __future__ import annotations

import pytest
import torch

import recurrence_dsl
from codegen.module import module_source
from codegen.specialize import skip_per_step
from recurrence_dsl.analysis import analyse
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPECS_DIR


def _rec(name: str) -> recurrence_dsl.Recurrence:
    return recurrence_dsl.load(SPECS_DIR / f"{name}.rec")[name]


def test_skip_per_step_reads_the_printed_calls():
    head = "def f(x, D, **options):\n    return triton_chunked_linear_by(c, q, k, v, skip=x, skip_weight=D)\n"
    step = ("def f(x, u):\n    w = u * 2\n    return triton_chunked_linear_by(c, q, k, v, skip=x, skip_weight=w)\n")
    assert not skip_per_step(head)
    assert skip_per_step(step)
    assert not skip_per_step("def f(x):\n    return triton_chunked_linear_by(c, q, k, v)\n")  # no skip at all
    # the innermost function's arguments decide: D is the outer function's, the inner one computes its weight
    nested = "def f(D):\n    def g(x):\n        D = x\n        return chunked_delta_by(c, skip=x, skip_weight=D)\n"
    assert skip_per_step(nested)
    assert skip_per_step("chunked_linear_by(c, skip=x, skip_weight=w)")  # outside a function: unknown, kept


@pytest.mark.parametrize("name, per_step", [("mamba2", False), ("rwkv6", True)])
def test_a_module_keeps_the_skip_step_branch_only_with_a_weight_per_step(name, per_step):
    source = module_source([analyse(_rec(name).checked)], f"{name}.rec")
    assert "skip=" in source  # both fuse a skip term
    for branch in ("if SKIP_STEP:", "if fused.skip_step:"):
        assert (branch in source) == per_step, (name, branch)
    assert "SKIP_STEP=f.skip_step" in source  # the launch itself is unchanged


def test_rwkv6_with_its_skip_step_branch_matches_the_reference():
    rec = _rec("rwkv6")
    args, initial = sample_arguments(rec.checked, {s: 16 for s in rec.checked.sizes}, 1, 20, 2,
                                     dtype=torch.float64, seed=3, with_initial_state=True)
    layer = recurrence_dsl.compile(rec, backend="triton", form="chunked", chunk_size=16, tuning=False)

    def run(fn, xs, init):
        leaves = [x.detach().clone().requires_grad_() for x in xs]
        s0 = init.detach().clone().requires_grad_()
        out, final = fn(*leaves, initial_state=s0, output_final_state=True)
        out = out if isinstance(out, torch.Tensor) else next(iter(out.values()))
        final = final if isinstance(final, torch.Tensor) else next(iter(final.values()))
        gen = torch.Generator().manual_seed(0)
        w_out, w_fin = torch.randn(out.shape, generator=gen), torch.randn(final.shape, generator=gen)
        ((out.double() * w_out.double()).sum() + (final.double() * w_fin.double()).sum()).backward()
        return [out.detach().double(), final.detach().double()] + [x.grad.double() for x in leaves + [s0]]

    init = initial if isinstance(initial, torch.Tensor) else next(iter(initial.values()))
    want = run(rec.reference, args, init)
    got = run(layer, [a.float() for a in args], init.float())
    for i, (g, w) in enumerate(zip(got, want)):
        assert ((g - w).norm() / w.norm().clamp_min(1e-30)).item() <= 1e-5, i
