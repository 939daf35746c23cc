"""A seventh trial's fixes (a new user putting compiled layers in a PyTorch model and training it): loading and
compiling under a meta default device, a Triton chunk_size refused when the module is built, and the module's
messages and docstrings; and an eighth's (a performance engineer): a compile-only report checkpoints by the GPU's
rule, and a benchmark's smoke run leaves the committed results alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import recurrence_dsl
from codegen.load import load_module
from recurrence_dsl.analysis import analyse

from .conftest import SPECS_DIR


def test_load_and_compile_under_a_meta_default_device():
    """A model built under `torch.device("meta")` calls load() and compile() in its __init__: the spec's numeric
    constants (gla's K ** -0.5) are folded on the CPU, not on the default device (Tensor.item() of a meta tensor
    raised from deep inside the checker)."""
    with torch.device("meta"):
        rec = recurrence_dsl.load(SPECS_DIR / "gla.rec")["gla"]
        layer = recurrence_dsl.compile(rec, backend="torch", tuning=False)
        q, k, v, g = (torch.randn(1, 5, 2, 4) for _ in range(4))
        out, _ = layer(q, k, v, g)
    assert out.is_meta and out.shape == (1, 5, 2, 4)
    real = recurrence_dsl.load(SPECS_DIR / "gla.rec")["gla"]
    args = [torch.randn(1, 5, 2, 4, dtype=torch.float64) for _ in range(3)] + [-torch.rand(1, 5, 2, 4).double()]
    want = real.reference(*args)[0]
    got = recurrence_dsl.compile(rec, backend="torch", tuning=False)(*args)[0]
    torch.testing.assert_close(got, want)  # the layer built under meta computes on real tensors


def test_a_triton_chunk_size_is_refused_when_the_module_is_built():
    """`backend="triton"` with a chunk_size its chunked kernels cannot run fails at build, naming the rule; under
    `backend="auto"` the module builds (a CPU call runs torch, where 48 is fine) and the Triton call refuses it."""
    module = load_module(analyse(recurrence_dsl.load(SPECS_DIR / "mamba2.rec")["mamba2"].checked))
    refused = "chunk_size must be a power of two >= 16 on the triton backend, got 48"
    with pytest.raises(recurrence_dsl.CallError, match=refused):
        module.Mamba2(2, {"N": 4, "P": 4}, backend="triton", chunk_size=48)
    module.Mamba2(2, {"N": 4, "P": 4}, backend="triton", form="recurrent", chunk_size=48)  # no chunked kernel runs
    auto = module.Mamba2(2, {"N": 4, "P": 4}, chunk_size=48).double()  # (float64: auto runs torch on the CPU)
    x, dt = torch.randn(1, 70, 2, 4).double(), torch.rand(1, 70, 2).double()
    B, C = torch.randn(1, 70, 2, 4).double(), torch.randn(1, 70, 2, 4).double()
    out, _ = auto(x, dt, B, C)
    assert out.shape == (1, 70, 2, 4)
    auto.backend = "triton"
    with pytest.raises(recurrence_dsl.CallError, match=refused):
        auto.float()(x.float(), dt.float(), B.float(), C.float())


def test_the_module_names_how_to_change_its_form_and_its_state_rows():
    module = load_module(analyse(recurrence_dsl.load(SPECS_DIR / "mamba2.rec")["mamba2"].checked))
    layer = module.Mamba2(2, {"N": 4, "P": 4})
    x, dt = torch.randn(1, 6, 2, 4), torch.rand(1, 6, 2)
    B, C = torch.randn(1, 6, 2, 4), torch.randn(1, 6, 2, 4)
    with pytest.raises(TypeError, match=r"or on the module afterwards \(module\.form = \.\.\.\)"):
        layer(x, dt, B, C, form="recurrent")
    # the state's rows are not written N, which is also mamba2's state size
    doc = type(module.mamba2).__call__.__doc__
    assert "h: [rows, H, N, P]" in doc and "rows: B, or the number of packed sequences" in doc


def test_a_compile_only_report_checkpoints_by_the_gpu_rule():
    """An eighth trial (a performance engineer): `recdsl kernels --form recurrent --backward` split the held bytes by
    the CPU's checkpoint spacing (the report's stand-in tensors are CPU tensors), every 16 steps at K = V = 128,
    where a GPU checkpoints every max(64, sqrt T): the forward's figure 1.8x too high. Within the report's block the
    generated module takes the GPU's rule, and its own rule is back after it."""
    import sys

    from codegen.kernel_report import _device_rules

    rec = recurrence_dsl.load(SPECS_DIR / "gla.rec")["gla"]
    layer = recurrence_dsl.compile(rec, tuning=False)
    module = sys.modules[type(layer).__module__]
    states = [torch.empty(2, 4, 128, 128)]  # a CPU state: the CPU rule bounds a step's bytes
    on_cpu = module.checkpoint_every(1024, states)
    assert on_cpu < 64
    with _device_rules(layer):
        assert module.checkpoint_every(1024, states) == 64 == module.checkpoint_every(1024, states, True)
        assert module.checkpoint_every(1 << 14, states) == 128  # sqrt(T) past 64
    assert module.checkpoint_every(1024, states) == on_cpu


def test_a_smoke_run_of_a_benchmark_leaves_the_committed_results_alone(tmp_path):
    """`python benchmarks/bench_varlen.py --smoke` rewrote benchmarks/results/varlen_cpu.json with its tiny shapes
    (trial 8): a smoke run without --out now writes in the temporary folder; a full run, and --out, as before."""
    import tempfile

    from benchmarks.timing import results_path

    from .conftest import REPO

    assert results_path(None, True, "varlen_cpu.json") == Path(tempfile.gettempdir()) / "recdsl-smoke-varlen_cpu.json"
    assert results_path(None, False, "varlen_cpu.json") == REPO / "benchmarks" / "results" / "varlen_cpu.json"
    assert results_path(str(tmp_path / "x.json"), True, "varlen_cpu.json") == tmp_path / "x.json"
    for script in ("bench_backward", "bench_chunked_vs_fla", "bench_context_parallel", "bench_scaling",
                   "bench_triton", "bench_varlen"):
        text = (REPO / "benchmarks" / f"{script}.py").read_text()
        assert "out = results_path(" in text and '"--out", default=None' in text.replace(" type=Path,", ""), script
