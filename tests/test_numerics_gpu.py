"""The property tests of tests/test_numerics.py on a CUDA GPU, in float32, float16 and bfloat16 (issue 8).

The same body (`run_property`: the HARD, GROWING and RESETS examples, then drawn ones) for every (spec, backend,
form), with the kernels compiled for the chip instead of run by Triton's interpreter. Inputs in the dtype under
test, the initial state in float32, the reference in float64 on the same (rounded) values; tolerances relative
to the norm of the finite reference entries: 1e-5 (float32), 5e-3 (float16), 2e-2 (bfloat16), as in
tests/test_gpu.py. Run on a machine with CUDA, on its own (other test files switch Triton's interpreter on):
`python -m pytest -m gpu -n 12 tests/test_numerics_gpu.py`. Without CUDA these tests are deselected
(conftest.py); selected explicitly without CUDA they fail rather than skip.
"""

from __future__ import annotations

import pytest
import torch

from .test_numerics import BF16, COMBOS, F16, F32, run_property

pytestmark = pytest.mark.gpu

GPU_EXAMPLES = 4  # drawn examples per (spec, backend, form, dtype), after the three explicit ones


@pytest.fixture(scope="module", autouse=True)
def cuda_device():
    assert torch.cuda.is_available(), "tests/test_numerics_gpu.py needs a CUDA GPU (it was selected with -m gpu)"
    return torch.device("cuda")


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name,backend,form", COMBOS, ids=[f"{n}-{b}-{f}" for n, b, f in COMBOS])
def test_numerics_property_gpu(name, backend, form, dtype):
    run_property(name, backend, form, GPU_EXAMPLES, dtype=dtype, device="cuda")
