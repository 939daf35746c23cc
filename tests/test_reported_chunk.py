"""The chunk a layer reports (`Layer.config_for`, hence `recdsl show` / `check`'s "config of a call" lines) is the
chunk its kernels run, and tune's "(default)" row (`autotune.space.default_config`) is the same: the Triton delta
rule runs chunks of at most 32 steps under float32 ("ieee") dots (codegen/triton_runtime.py `delta_chunk`), which
config_for once reported as the compile default of 64 (codegen/dispatch.py `chunk_run`). Triton's interpreter,
tiny shapes; the launcher `_triton_delta_by` of the generated module is wrapped to record the chunk it is given."""

from __future__ import annotations

import sys

import pytest
import torch

import recurrence_dsl
from autotune.space import Problem, default_config
from recurrence_dsl.analysis import analyse
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPECS_DIR

pytest.importorskip("triton")


def _ran_chunks(layer, args, **kwargs) -> list:
    """The chunk_size each delta-rule launch of a call got."""
    mod = sys.modules[type(layer).__module__]
    seen, launch = [], mod._triton_delta_by

    def spy(*a, **kw):
        seen.append(kw["chunk_size"])
        return launch(*a, **kw)

    mod._triton_delta_by = spy
    try:
        layer(*args, **kwargs)
    finally:
        mod._triton_delta_by = launch
    return seen


@pytest.mark.parametrize("name", ["gated_delta_net", "delta_net"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reported_chunk_is_the_one_run(name, dtype):
    rec = recurrence_dsl.load(str(SPECS_DIR / f"{name}.rec"))[name]
    layer = recurrence_dsl.compile(rec, backend="triton", form="chunked", tuning=False)
    sizes, T = {s: 16 for s in rec.checked.sizes}, 100
    args, _ = sample_arguments(rec.checked, sizes, 1, T, 2, dtype=torch.float32, seed=1)
    args = [a.to(dtype) for a in args]
    reported = layer.config_for(*args)["chunk_size"]
    ran = _ran_chunks(layer, args)
    problem = Problem.from_analysis(analyse(rec.checked), sizes, T, str(dtype).removeprefix("torch."), heads=2)
    default = default_config("chunked", "triton", problem)["chunk_size"]
    assert ran and set(ran) == {reported} and reported == default, (ran, reported, default)
    assert reported == (32 if dtype == torch.float32 else 64)


def test_reported_chunk_of_a_given_chunk_size():
    """A call's own chunk_size=64 in float32 runs, and is reported as, 32 steps a chunk; 16 stays 16."""
    rec = recurrence_dsl.load(str(SPECS_DIR / "gated_delta_net.rec"))["gated_delta_net"]
    layer = recurrence_dsl.compile(rec, backend="triton", form="chunked", tuning=False)
    args, _ = sample_arguments(rec.checked, {s: 16 for s in rec.checked.sizes}, 1, 70, 2, seed=2)
    for given, runs in ((64, 32), (16, 16)):
        c = layer.config_for(*args, chunk_size=given)
        assert c["chunk_size"] == runs and _ran_chunks(layer, args, chunk_size=given) == [runs]
