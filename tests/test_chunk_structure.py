"""The torch and Triton runtimes share their chunked algorithm: same chunk boundaries, same 16-step sub-chunks.

For a chunk_size the Triton runtime accepts (a power of two >= 16), codegen.torch_runtime._chunk_sizes must give the
Triton runtime's (BT, 16) for every T, and for a per-channel decay the two compute the same sums in the same grouping,
so in float32 they agree to float32 rounding (the Triton kernels run in Triton's CPU interpreter).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402, F401  (fail loudly if triton is missing)

from codegen import torch_runtime as trt  # noqa: E402
from codegen import triton_runtime as tri  # noqa: E402


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("chunk_size", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("T", [1, 5, 16, 17, 31, 32, 33, 64, 70, 100, 128, 129, 300, 1000])
def test_same_chunk_and_sub_chunk_lengths(T, chunk_size):
    k = torch.zeros(1, T, 1, 8)
    BT = tri._config(k, 8, chunk_size, None, None, None, delta=False)[0]
    assert trt._chunk_sizes(T, chunk_size) == (BT, tri._SUB)


@pytest.mark.parametrize("T, chunk_size, expected", [(100, 4, (4, 4)), (100, 12, (12, 12)), (100, 48, (48, 16)),
                                                     (100, 20, (32, 16)), (7, 48, (7, 7)), (30, 8, (8, 8))])
def test_other_chunk_sizes_use_sub_chunks_of_at_most_16(T, chunk_size, expected):
    """Chunk sizes Triton refuses: C0 = min(chunk_size, T), sub-chunks of min(16, C0), C0 padded to a multiple."""
    assert trt._chunk_sizes(T, chunk_size) == expected


@pytest.mark.parametrize("axis", ["key", "value"])
def test_torch_and_triton_agree_in_float32(axis):
    """T = 70, chunk 32 (three chunks, the last one padded; two sub-chunks each): both runtimes in float32, both
    queries (exclusive and inclusive), the initial and final state; they agree to 1e-6."""
    gen = torch.Generator().manual_seed(0)
    B, T, H, K, V = 2, 70, 2, 16, 32
    q1, q2, k = (torch.randn(B, T, H, K, generator=gen) for _ in range(3))
    v = torch.randn(B, T, H, V, generator=gen)
    D = K if axis == "key" else V
    g = -torch.rand(B, T, H, D, generator=gen)  # log decays in [-1, 0]
    s0 = torch.randn(B, H, K, V, generator=gen)
    queries = [(q1, True), (q2, False)]
    outs_t, final_t = trt.chunked_linear(queries, k, v, g, axis, s0, chunk_size=32, output_final_state=True)
    outs_g, final_g = tri.chunked_linear(queries, k, v, g, axis, s0, chunk_size=32, output_final_state=True)
    for a, b in zip(outs_t, outs_g, strict=True):
        assert a.dtype == b.dtype == torch.float32
        assert rel(b, a) <= 1e-6
    assert rel(final_g, final_t) <= 1e-6
