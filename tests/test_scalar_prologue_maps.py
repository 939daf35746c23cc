"""A scalar decay's per-step prologue values computed at the chunked kernels' loads (issue 10: mLSTM's gates).

mLSTM's log decays logsigmoid(fg) and its per-step factor exp(ig) of k v^T are functions of one raw input [B, T, H]
each: the module prints them as `@triton.jit` helpers (`mlstm__map_fg`, `mlstm__map_ig` and their `_vjp`) and passes
the raw fg and ig to `triton_chunked_linear_by(..., log_decay_map=, v_step_map=, unsafe=)`. The cumulative-sum
kernel maps fg (and checks both values for `_check_steps`), the state and output kernels map ig, the backward's
log-decay kernel stores fg's gradient through the vjp helper and `_row_scale_kernel` ig's: no prologue kernel, no
[B, T, H] value tensor, forward or backward.

- The runtime with maps against the same call on the materialised values: dense and packed, chunked and parallel.
- The layer against the float64 reference (values and every gradient), dense and packed, with an initial state.
- An unsafe step (exp(ig) overflowing, fg NaN) is found by the kernel and leaves the chunks as before.
- Launches per call: no prologue kernel.

Kernels run in Triton's interpreter (tests/conftest.py).
"""

from __future__ import annotations

import collections

import pytest
import torch

import recurrence_dsl
from codegen.load import load_layer
from codegen.module import module_source
from recurrence_dsl.analysis import analyse
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPECS_DIR
from .test_elementwise_prologue import _compare

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
rt = pytest.importorskip("codegen.triton_runtime")
tp = pytest.importorskip("codegen.triton_parallel")


@triton.jit
def _logsigmoid(x):
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _logsigmoid_vjp(x, grad):
    return grad * tl.sigmoid(-x)


@triton.jit
def _exp(x):
    return tl.exp(x)


@triton.jit
def _exp_vjp(x, grad):
    return grad * tl.exp(x)


T, H, K, V = 40, 2, 16, 16
MAPS = {"v_step_map": (_exp, _exp_vjp), "log_decay_map": (_logsigmoid, _logsigmoid_vjp)}


def _rec() -> recurrence_dsl.Recurrence:
    return recurrence_dsl.load(SPECS_DIR / "mlstm.rec")["mlstm"]


def _inputs(rows: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(rows, T, H, K, generator=gen) for _ in range(2))
    v = torch.randn(rows, T, H, V, generator=gen)
    ig = 0.5 * torch.randn(rows, T, H, generator=gen)
    fg = torch.randn(rows, T, H, generator=gen) + 2.0
    return [q, k, v, ig, fg]


def _call(mapped: bool, form: str, cu_seqlens, q, k, v, ig, fg, h0, unsafe=None):
    where = ({"parallel": lambda *a, **kw: tp.parallel_linear_by(*a, cu_seqlens=cu_seqlens, **kw)}
             if form == "parallel" else {"cu_seqlens": cu_seqlens})
    if mapped:
        return rt.chunked_linear_by(rt.ScalarDecay, [(q, False)], k, v, fg, initial_state=h0, chunk_size=16,
                                    output_final_state=True, v_step=ig, unsafe=unsafe, **MAPS, **where)
    return rt.chunked_linear_by(rt.ScalarDecay, [(q, False)], k, v, torch.nn.functional.logsigmoid(fg),
                                initial_state=h0, chunk_size=16, output_final_state=True, v_step=ig.exp(), **where)


@pytest.mark.parametrize("form", ["chunked", "parallel"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "cu_seqlens"])
def test_mapped_values_match_the_materialised_ones(form, packed):
    """Outputs, final states and the gradients of q, k, v, ig, fg and the initial state: the call given the raw
    ig, fg and the maps against the call given exp(ig), logsigmoid(fg) (float32 rounding apart)."""
    cu = torch.tensor([0, 7, T]) if packed else None
    rows = 1 if packed else 2
    results = []
    for mapped in (True, False):
        leaves = [x.clone().requires_grad_() for x in _inputs(rows)]
        h0 = torch.randn(2, H, K, V, generator=torch.Generator().manual_seed(1)).requires_grad_()
        unsafe = torch.full((1,), T, dtype=torch.int32)
        (o,), ht = _call(mapped, form, cu, *leaves, h0, unsafe=unsafe)
        gen = torch.Generator().manual_seed(2)
        loss = (o * torch.randn(o.shape, generator=gen)).sum() + (ht * torch.randn(ht.shape, generator=gen)).sum()
        grads = torch.autograd.grad(loss, leaves + [h0])
        results.append([o, ht, *grads])
        if mapped:
            assert int(unsafe) == T  # every step safe
    for name, got, want in zip(["o", "ht", "dq", "dk", "dv", "dig", "dfg", "dh0"], *results):
        assert ((got - want).norm() / want.norm()).item() < 1e-5, name


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("form", ["chunked", "parallel"])
def test_the_kernels_find_the_first_unsafe_step(form):
    """exp(ig) overflowing float32 at step 23 and fg NaN at step 30: the first, 23, in `unsafe`; fg NaN alone: 30.
    Packed (two sequences of 7 and 33 steps): the step of the packed layout, as `_check_steps` numbers it."""
    q, k, v, ig, fg = _inputs(2)
    ig[1, 23, 1] = 100.0
    fg[0, 30, 0] = float("nan")
    for ig_, want in ((ig, 23), (ig.clamp(max=1.0), 30)):
        unsafe = torch.full((1,), T, dtype=torch.int32)
        _call(True, form, None, q, k, v, ig_, fg, None, unsafe=unsafe)
        assert int(unsafe) == want
    q, k, v, ig, fg = _inputs(1)
    fg[0, 9, 1] = float("nan")  # the second sequence's step 2, packed step 9
    unsafe = torch.full((1,), T, dtype=torch.int32)
    _call(True, form, torch.tensor([0, 7, T]), q, k, v, ig, fg, None, unsafe=unsafe)
    assert int(unsafe) == 9


def test_the_maps_are_checked():
    q, k, v, ig, fg = _inputs(1)
    with pytest.raises(ValueError, match="scalar decay"):
        rt.chunked_linear_by(rt.KeyDecay, [(q, False)], k, v, fg[..., None].expand(-1, -1, -1, K), **MAPS,
                             v_step=ig)
    with pytest.raises(ValueError, match="v_step_map must be None or a pair"):
        rt.chunked_linear_by(rt.ScalarDecay, [(q, False)], k, v, fg, v_step=ig, v_step_map=_exp,
                             log_decay_map=MAPS["log_decay_map"])
    with pytest.raises(ValueError, match="pass it as v_step"):
        rt.chunked_linear_by(rt.ScalarDecay, [(q, False)], k, v, fg, **MAPS)


def test_the_module_maps_ig_and_fg_in_the_kernels():
    analysis = analyse(_rec().checked)
    source = module_source([analysis], analysis.recurrence.source.filename)
    assert "mlstm__chunked_prologue_triton" not in source
    assert "v_step_map=(mlstm__map_ig, mlstm__map_ig_vjp), log_decay_map=(mlstm__map_fg, mlstm__map_fg_vjp)" in source
    assert "@triton.jit\ndef mlstm__map_fg(x):" in source and "@triton.jit\ndef mlstm__map_ig_vjp(x, grad):" in source
    lines = [line.strip() for line in source.split("def mlstm__chunked_triton(", 1)[1].split("\n\n\n")[0].splitlines()]
    assert "v_step_C = ig  # a factor of k v^T: exp(ig), mapped by mlstm__map_ig in the kernels" in lines
    call = next(i for i, line in enumerate(lines) if "= triton_chunked_linear_by(" in line)
    # the check reads the kernels' unsafe_ after the call, and no value of the prologue (unless check_steps=False)
    assert lines[call + 1:call + 3] == ["if check_steps:",
                                        "_check_steps([query_read_C, k_C, v_C_n], [], first=(unsafe_, T_))"], lines


@pytest.mark.parametrize("form", ["chunked", "parallel"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "cu_seqlens"])
def test_values_and_gradients_match_the_float64_reference(form, packed):
    errors = _compare("mlstm", form, packed)
    assert max(errors.values()) <= 1e-5, errors


def test_an_unsafe_step_found_by_the_kernels_leaves_the_chunks():
    """fg = NaN at step 20 (head 1): the cumulative-sum kernel reports it, the steps from 20 run one at a time as
    the reference does, and the results before it match."""
    rec = _rec()
    args, _ = sample_arguments(rec.checked, {"K": 16, "V": 16}, 1, 37, 2, dtype=torch.float32, seed=3)
    fg = args[4].clone()
    fg[0, 20, 1] = float("nan")
    layer = recurrence_dsl.compile(rec, backend="triton", form="chunked", chunk_size=16, tuning=False)
    out = layer(*args[:4], fg)[0]
    ref = rec.reference(*[a.double() for a in args[:4]], fg.double())[0]
    out = out["h"] if isinstance(out, dict) else out
    ref = ref["h"] if isinstance(ref, dict) else ref
    assert torch.isnan(out[0, 20:, 1]).all() and torch.isfinite(out[0, :20]).all()
    assert torch.allclose(out[0, :20].double(), ref[0, :20], rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))


def test_no_prologue_kernel_is_launched(monkeypatch):
    """The Triton launches of a training step (kernels not run): forward the cumulative-sum, state and output
    kernels only (4 before, with the prologue kernel), backward no prologue VJP kernel (9 Triton launches before,
    10 now with `_row_scale_kernel` twice, which replaces a torch multiply, an einsum and an in-place multiply)."""
    from triton.runtime.interpreter import InterpretedFunction

    launched = collections.Counter()
    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *a, **kw: launched.update([self.fn.__name__]))
    rec = _rec()
    args, _ = sample_arguments(rec.checked, {"K": 64, "V": 64}, 2, 256, 4, dtype=torch.float32, seed=0)
    leaves = [a.clone().requires_grad_() for a in args]
    out = load_layer(analyse(rec.checked))(*leaves, form="chunked", backend="triton")[0]
    forward = dict(launched)
    launched.clear()
    (out["h"] if isinstance(out, dict) else out).sum().backward()
    assert forward == {"_triton_cumsum_kernel": 1, "_triton_chunk_state_kernel": 1,
                       "_triton_chunk_output_kernel": 1}, forward
    assert not [n for n in launched if "prologue" in n] and launched["_triton_row_scale_kernel"] == 2, launched
    assert sum(launched.values()) == 10, launched
