"""A second new-user trial of the newest features: what it ran into in the calling convention and the CLI, each now
a clear error naming the argument and what it got (recurrence_dsl/calling.py, recurrence_dsl/cli.py)."""

from __future__ import annotations

import os
import threading

import pytest
import torch

import recurrence_dsl
from recurrence_dsl.cli import main
from recurrence_dsl.errors import CallError
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPECS_DIR

MIN_GRU = recurrence_dsl.load(SPECS_DIR / "min_gru.rec")["min_gru"]
LAYER = recurrence_dsl.compile(MIN_GRU, backend="torch", tuning=False)


def _packed(length: int = 9):
    args, init = sample_arguments(MIN_GRU.checked, {"D": 4}, 1, length, 2, seed=1, with_initial_state=True, rows=2)
    return args, init


@pytest.mark.parametrize(("cu_seqlens", "got"), [
    (torch.tensor([0, 4, 9], dtype=torch.bool), "a bool tensor of shape [3]"),  # torch read it as [0, 1, 1]
    (torch.tensor([0, 4, 9], dtype=torch.complex64), "a complex64 tensor of shape [3]"),
    (torch.tensor([0.0, 4.0, 9.0]), "a float32 tensor of shape [3]"),
    (torch.tensor([[0, 4, 9]]), "an int64 tensor of shape [1, 3]"),
    ([0, 4, 9], "list"),
])
def test_a_bad_cu_seqlens_says_what_it_got(cu_seqlens, got):
    args, _ = _packed()
    with pytest.raises(CallError) as info:
        LAYER(*args, cu_seqlens=cu_seqlens)
    assert str(info.value) == f"cu_seqlens must be a 1-D integer tensor [N + 1] of sequence boundaries, got {got}"


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8])
def test_integer_cu_seqlens_of_any_width_still_run(dtype):
    args, init = _packed()
    cu = torch.tensor([0, 4, 9], dtype=dtype)
    out, final = LAYER(*args, initial_state=init, output_final_state=True, cu_seqlens=cu)
    ref, ref_final = MIN_GRU.reference(*args, initial_state=init, output_final_state=True, cu_seqlens=cu)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(final.double(), ref_final, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("state", "got"), [(torch.zeros(1, 2, 4, dtype=torch.int64), "an int64 tensor of shape "
                                             r"\[1, 2, 4\]"), ([0.0] * 4, "list")])
def test_a_non_float_initial_state_says_what_it_got(state, got):
    args, _ = _packed()
    with pytest.raises(CallError, match=rf"^initial_state must be a floating-point tensor of shape \[B, H, D\], "
                                        rf"got {got}$"):
        LAYER(*args, initial_state=state)


def test_tune_description_shows_a_single_percent_sign(capsys):
    with pytest.raises(SystemExit) as info:
        main(["tune", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "by more than 5% and" in text and "%%" not in text


def test_tune_of_no_steps_is_a_usage_error_before_any_trial(tmp_path, capsys):
    store = tmp_path / "t.sqlite"
    code = main(["tune", str(SPECS_DIR / "min_gru.rec"), "--shape", "B=1,T=0,H=2,D=16", "--store", str(store)])
    captured = capsys.readouterr()
    assert code == 2
    assert "--shape: tune times calls of at least one step, got T=0" in captured.err
    assert "failed" not in captured.out and not store.exists()  # it stored no failed trial


def test_tune_of_float64_on_triton_names_the_option(tmp_path, capsys):
    code = main(["tune", str(SPECS_DIR / "min_gru.rec"), "--backend", "triton", "--dtype", "float64", "--device",
                 "cpu", "--store", str(tmp_path / "t.sqlite")])
    err = capsys.readouterr().err
    assert code == 2
    assert "--dtype float64 with --backend triton: the triton backend takes float32, float16 or bfloat16" in err
    assert "Problem" not in err


def test_bfloat16_log_decay_gradients_of_the_chunked_triton_form_are_not_floored_away():
    """The dlog kernels compared the raw bfloat16 log decay with FLOOR: Triton's interpreter gets comparisons of a
    loaded bfloat16 tensor wrong, so every step read as floored and dg came back all zeros. Compared in float32
    now (as the GPU compiles it anyway); dg against the float32 call's."""
    rec = recurrence_dsl.load(SPECS_DIR / "gla.rec")["gla"]
    layer = recurrence_dsl.compile(rec, tuning=False)
    args, _ = sample_arguments(rec.checked, {"K": 16, "V": 16}, 1, 40, 1, dtype=torch.float32, seed=3)
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        leaves = [a.detach().to(dtype).requires_grad_(True) for a in args]
        out = layer(*leaves, backend="triton", form="chunked", chunk_size=16)[0]
        seed = torch.Generator().manual_seed(0)
        out.backward(torch.randn(out.shape, generator=seed).to(dtype))
        grads[dtype] = leaves[3].grad.float()  # g, the log decay
    want, got = grads[torch.float32], grads[torch.bfloat16]
    assert want.abs().max() > 1e-3
    assert (got - want).norm() <= 5e-2 * want.norm()


def test_a_spec_from_a_pipe_is_read(tmp_path, capsys):
    """`recdsl explain <(...)` (bash's process substitution, a pipe under /dev/fd) and /dev/null were "no such
    .rec file" though they exist: only a path that does not exist is."""
    fifo = tmp_path / "spec.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_text, args=((SPECS_DIR / "gla.rec").read_text(),))
    writer.start()
    assert main(["explain", str(fifo)]) == 0
    writer.join()
    assert capsys.readouterr().out.startswith("recurrence gla: class diagonal-row")
    assert main(["explain", os.devnull]) == 2
    assert "no recurrence in this file" in capsys.readouterr().err
    assert main(["explain", str(tmp_path / "missing.rec")]) == 2
    assert "no such .rec file" in capsys.readouterr().err


def test_a_bad_num_warps_under_auto_names_no_form_it_may_not_run(tmp_path):
    """Under form auto a T=200 call runs the chunked form, but a bad num_warps said "(the recurrent form)": the
    first form checked. num_warps' bound is every form's, so no form is named; a block's least size is its form's."""
    rec = recurrence_dsl.load(SPECS_DIR / "gla.rec")["gla"]
    layer = recurrence_dsl.compile(rec, tuning=False)
    args, _ = sample_arguments(rec.checked, {"K": 8, "V": 8}, 1, 200, 1, dtype=torch.float32, seed=0)
    with pytest.raises(CallError) as info:
        layer(*args, backend="triton", config={"num_warps": 3})
    assert str(info.value) == "config num_warps must be a power of two from 1 to 32, got 3"
    with pytest.raises(CallError, match=r"config block_k must be a power of two >= 16, got 8 \(the chunked form\)"):
        layer(*args, backend="triton", form="chunked", config={"block_k": 8})
