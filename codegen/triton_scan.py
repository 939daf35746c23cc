"""Triton runtime of the scan form: every state element as an affine recurrence, by chunked associative scans.

Same arguments, maths and layout as `scan_diagonal` and `scan_block` in `codegen/torch_runtime.py` (B batch, T time,
per-step tensors [B, T, ...], the state elements flattened to N numbers per step):

  scan_diagonal   s_t = a_t * s_{t-1} + b_t, elementwise                  (the identity, scalar, diagonal and
                                                                            elementwise classes)
  scan_block      s_t = A_t s_{t-1} + b_t, a 2 x 2 block per element      (coupled-elementwise: a cascade of two
                                                                            diagonal decays, a complex diagonal as
                                                                            a real and an imaginary state)

The combine of two steps, earlier (A1, b1) then later (A2, b2), is (A2 A1, A2 b1 + b2): it composes affine maps, so
it is associative (Blelloch 1990, "Prefix sums and their applications", section 1.4) and `tl.associative_scan` runs
it over a chunk of BT steps in log2(BT) levels. A program owns BN state elements of one batch row and walks its
chunks in order, carrying the state at each chunk's end into the next chunk: s_t = (A_t ... A_c) s_(c-1) +
(the chunk's scan from a zero start), c the chunk's first step. Elements are independent, so the grid is
(cdiv(N, BN), B) and nothing is shared between programs.

Backward (`_ScanFunction`, `_BlockScanFunction`): with g_t the gradient of the loss with respect to s_t through every
later step, g_t = ds_t + A_(t+1)^T g_(t+1) (g_(T-1) = ds_(T-1)): the same affine recurrence run from the last step
to the first, with the transposed transitions shifted by one step. The kernels scan it with `reverse=True` over each
chunk, carrying g across chunks from the last, and form the local gradients at once:
db_t = g_t, dA_t = g_t s_(t-1)^T (s_(-1) the initial state), and for the initial state A_0^T g_0. The saved states
s_t of the forward are all the backward reads besides a; nothing is recomputed.

Kernels and grids:

  (B: the rows, or the packed sequences)
  _scan_fwd_kernel        (cdiv(N, BN), B)   diagonal: states s [B, T, N] from a, b [B, T, N] and h0 [B, N]
  _scan_bwd_kernel        (cdiv(N, BN), B)   diagonal: da, db [B, T, N] and dh0 [B, N] from ds and the saved s
  _block_scan_fwd_kernel  (cdiv(N, BN), B)   2 x 2 blocks: a [B, T, N, 2, 2], b and s [B, T, N, 2], h0 [B, N, 2]
  _block_scan_bwd_kernel  (cdiv(N, BN), B)   2 x 2 blocks: da, db, dh0 likewise

Packed sequences (`cu_seqlens=`): N sequences in one row [1, T, ...], with initial states [N, ...]; the grid's
second axis runs over the sequences, each program reads its sequence's first step and length from the boundaries
(VARLEN) and scans from its own initial state, so the carry resets at every sequence's start and one launch (forward,
backward) serves any N. `scan_final_states` and `scan_previous_states` pick each sequence's last state and shift
the states by one step within each sequence.

Numerics: loads are masked and taken to the states' dtype (float32 for every call of a generated module, whose
dispatcher upcasts half inputs; float64 where a caller passes float64, as gradcheck does); steps past T load as
the identity step (A = I, b = 0), so the last row of a chunk's scan is always the state at its last real step.
Block sizes (`block_t`, `block_n`, `num_warps`) are keyword arguments with defaults chosen so that no kernel
spills on sm_80 / sm_90 (`recdsl kernels`, tests/test_triton_scan.py), never `triton.autotune`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_SCAN_BT = 32  # steps per chunk: each level of the in-chunk scan is one shuffle round over BT rows
_SCAN_BN = 64  # state elements per program
_SCAN_BN_BLOCK = 32  # 2 x 2 blocks per program: six scanned tiles (the backward reached 255 registers at 64)
_SCAN_WARPS = 4


@triton.jit
def _scan_combine(a1, b1, a2, b2):
    """(a1, b1) then (a2, b2): the affine map s -> a2 (a1 s + b1) + b2."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _scan_last_row(x, BT: tl.constexpr):
    """Row BT - 1 of x [BT, BN] as [BN] (a select, so a non-finite value in another row stays there)."""
    return tl.sum(tl.where((tl.arange(0, BT) == BT - 1)[:, None], x, 0.0), axis=0)


@triton.jit
def _scan_first_row(x, BT: tl.constexpr):
    return tl.sum(tl.where((tl.arange(0, BT) == 0)[:, None], x, 0.0), axis=0)


@triton.jit
def _first_step_mask(m_n, T, VARLEN: tl.constexpr):
    """The lanes of step 0 to load: a packed row's empty sequence has no step 0 (and its g is zero); a row of its
    own has T >= 1 (the launcher's rule)."""
    if VARLEN:
        return m_n & (tl.zeros_like(m_n.to(tl.int32)) < T)  # (a tensor: T is a plain int in the interpreter)
    else:
        return m_n


@triton.jit
def _scan_fwd_kernel(a, b, h0, s, cu, T, N, BT: tl.constexpr, BN: tl.constexpr, VARLEN: tl.constexpr):
    i_n, i_b = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    if VARLEN:  # sequence i_b of the packed row: steps cu[i_b] .. cu[i_b + 1]
        bos = tl.load(cu + i_b).to(tl.int64)
        T = (tl.load(cu + i_b + 1) - bos).to(tl.int32)
    else:
        bos = i_b.to(tl.int64) * T
    base = bos * N  # the sequence's first step in [B, T, N]
    b_h = tl.load(h0 + i_b.to(tl.int64) * N + o_n, mask=m_n, other=0.0).to(s.dtype.element_ty)  # [BN]
    for i_t in range(0, tl.cdiv(T, BT)):
        o_t = i_t * BT + tl.arange(0, BT)
        m = (o_t < T)[:, None] & m_n[None, :]
        off = base + o_t[:, None].to(tl.int64) * N + o_n[None, :]  # [BT, BN]
        b_a = tl.load(a + off, mask=m, other=1.0).to(s.dtype.element_ty)
        b_b = tl.load(b + off, mask=m, other=0.0).to(s.dtype.element_ty)
        b_A, b_B = tl.associative_scan((b_a, b_b), 0, _scan_combine)  # the chunk from a zero start
        b_s = b_A * b_h[None, :] + b_B
        tl.store(s + off, b_s.to(s.dtype.element_ty), mask=m)
        b_h = _scan_last_row(b_s, BT)  # the state after the chunk (padded steps are the identity)


@triton.jit
def _scan_bwd_kernel(
    a, s, h0, ds, da, db, dh0, cu, T, N, BT: tl.constexpr, BN: tl.constexpr, VARLEN: tl.constexpr,
):
    i_n, i_b = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    if VARLEN:  # sequence i_b of the packed row: steps cu[i_b] .. cu[i_b + 1]
        bos = tl.load(cu + i_b).to(tl.int64)
        T = (tl.load(cu + i_b + 1) - bos).to(tl.int32)
    else:
        bos = i_b.to(tl.int64) * T
    base = bos * N  # the sequence's first step in [B, T, N]
    b_h0 = tl.load(h0 + i_b.to(tl.int64) * N + o_n, mask=m_n, other=0.0).to(da.dtype.element_ty)
    b_g = tl.zeros([BN], dtype=da.dtype.element_ty)  # g at the first step after the chunk
    NT = tl.cdiv(T, BT)
    for i_r in range(0, NT):
        i_t = NT - 1 - i_r
        o_t = i_t * BT + tl.arange(0, BT)
        m = (o_t < T)[:, None] & m_n[None, :]
        off = base + o_t[:, None].to(tl.int64) * N + o_n[None, :]
        # a_(t+1), the factor that carries g_(t+1) back to step t (1 past the end: nothing comes from there)
        m_next = (o_t + 1 < T)[:, None] & m_n[None, :]
        b_an = tl.load(a + off + N, mask=m_next, other=1.0).to(da.dtype.element_ty)
        b_ds = tl.load(ds + off, mask=m, other=0.0).to(da.dtype.element_ty)
        b_A, b_G = tl.associative_scan((b_an, b_ds), 0, _scan_combine, reverse=True)
        b_gt = b_A * b_g[None, :] + b_G  # [BT, BN] g_t
        m_prev = (o_t >= 1)[:, None] & m
        b_sp = tl.load(s + off - N, mask=m_prev, other=0.0).to(da.dtype.element_ty)  # s_(t-1)
        b_sp = tl.where((o_t == 0)[:, None], b_h0[None, :], b_sp)
        tl.store(db + off, b_gt.to(db.dtype.element_ty), mask=m)
        tl.store(da + off, (b_gt * b_sp).to(da.dtype.element_ty), mask=m)
        b_g = _scan_first_row(b_gt, BT)
    # step 0 (an empty sequence of a packed row: none, and its g is zero)
    m_0 = _first_step_mask(m_n, T, VARLEN)
    b_a0 = tl.load(a + base + o_n, mask=m_0, other=0.0).to(da.dtype.element_ty)
    tl.store(dh0 + i_b.to(tl.int64) * N + o_n, (b_a0 * b_g).to(dh0.dtype.element_ty), mask=m_n)


@triton.jit
def _block_combine(p1, q1, r1, u1, x1, y1, p2, q2, r2, u2, x2, y2):
    """([[p1, q1], [r1, u1]], [x1, y1]) then ([[p2, q2], [r2, u2]], [x2, y2]): (A2 A1, A2 b1 + b2)."""
    return (p2 * p1 + q2 * r1, p2 * q1 + q2 * u1, r2 * p1 + u2 * r1, r2 * q1 + u2 * u1,
            p2 * x1 + q2 * y1 + x2, r2 * x1 + u2 * y1 + y2)


@triton.jit
def _block_scan_fwd_kernel(a, b, h0, s, cu, T, N, BT: tl.constexpr, BN: tl.constexpr, VARLEN: tl.constexpr):
    i_n, i_b = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    if VARLEN:  # sequence i_b of the packed row: steps cu[i_b] .. cu[i_b + 1]
        bos = tl.load(cu + i_b).to(tl.int64)
        T = (tl.load(cu + i_b + 1) - bos).to(tl.int32)
    else:
        bos = i_b.to(tl.int64) * T
    base = bos * N  # the sequence's first step in [B, T, N]
    p_h0 = h0 + (i_b.to(tl.int64) * N + o_n) * 2
    b_h1 = tl.load(p_h0, mask=m_n, other=0.0).to(s.dtype.element_ty)  # [BN] the first state of the pair
    b_h2 = tl.load(p_h0 + 1, mask=m_n, other=0.0).to(s.dtype.element_ty)
    for i_t in range(0, tl.cdiv(T, BT)):
        o_t = i_t * BT + tl.arange(0, BT)
        m = (o_t < T)[:, None] & m_n[None, :]
        off = base + o_t[:, None].to(tl.int64) * N + o_n[None, :]  # [BT, BN] element index
        # the transition [[p, q], [r, u]] (row r: the coefficients of both states in state r's update); a padded
        # step is the identity
        b_p = tl.load(a + off * 4, mask=m, other=1.0).to(s.dtype.element_ty)
        b_q = tl.load(a + off * 4 + 1, mask=m, other=0.0).to(s.dtype.element_ty)
        b_r = tl.load(a + off * 4 + 2, mask=m, other=0.0).to(s.dtype.element_ty)
        b_u = tl.load(a + off * 4 + 3, mask=m, other=1.0).to(s.dtype.element_ty)
        b_x = tl.load(b + off * 2, mask=m, other=0.0).to(s.dtype.element_ty)
        b_y = tl.load(b + off * 2 + 1, mask=m, other=0.0).to(s.dtype.element_ty)
        b_p, b_q, b_r, b_u, b_x, b_y = tl.associative_scan((b_p, b_q, b_r, b_u, b_x, b_y), 0, _block_combine)
        b_s1 = b_p * b_h1[None, :] + b_q * b_h2[None, :] + b_x
        b_s2 = b_r * b_h1[None, :] + b_u * b_h2[None, :] + b_y
        tl.store(s + off * 2, b_s1.to(s.dtype.element_ty), mask=m)
        tl.store(s + off * 2 + 1, b_s2.to(s.dtype.element_ty), mask=m)
        b_h1 = _scan_last_row(b_s1, BT)
        b_h2 = _scan_last_row(b_s2, BT)


@triton.jit
def _block_scan_bwd_kernel(
    a, s, h0, ds, da, db, dh0, cu, T, N, BT: tl.constexpr, BN: tl.constexpr, VARLEN: tl.constexpr,
):
    i_n, i_b = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    if VARLEN:  # sequence i_b of the packed row: steps cu[i_b] .. cu[i_b + 1]
        bos = tl.load(cu + i_b).to(tl.int64)
        T = (tl.load(cu + i_b + 1) - bos).to(tl.int32)
    else:
        bos = i_b.to(tl.int64) * T
    base = bos * N  # the sequence's first step in [B, T, N]
    p_h0 = h0 + (i_b.to(tl.int64) * N + o_n) * 2
    b_h01 = tl.load(p_h0, mask=m_n, other=0.0).to(da.dtype.element_ty)
    b_h02 = tl.load(p_h0 + 1, mask=m_n, other=0.0).to(da.dtype.element_ty)
    b_g1 = tl.zeros([BN], dtype=da.dtype.element_ty)  # g at the first step after the chunk
    b_g2 = tl.zeros([BN], dtype=da.dtype.element_ty)
    NT = tl.cdiv(T, BT)
    for i_r in range(0, NT):
        i_t = NT - 1 - i_r
        o_t = i_t * BT + tl.arange(0, BT)
        m = (o_t < T)[:, None] & m_n[None, :]
        off = base + o_t[:, None].to(tl.int64) * N + o_n[None, :]
        # A_(t+1)^T carries g_(t+1) back to step t: [[p, r], [q, u]] of the next step (past the end: I)
        m_next = (o_t + 1 < T)[:, None] & m_n[None, :]
        p_an = a + (off + N) * 4
        b_p = tl.load(p_an, mask=m_next, other=1.0).to(da.dtype.element_ty)
        b_q = tl.load(p_an + 1, mask=m_next, other=0.0).to(da.dtype.element_ty)
        b_r = tl.load(p_an + 2, mask=m_next, other=0.0).to(da.dtype.element_ty)
        b_u = tl.load(p_an + 3, mask=m_next, other=1.0).to(da.dtype.element_ty)
        b_d1 = tl.load(ds + off * 2, mask=m, other=0.0).to(da.dtype.element_ty)
        b_d2 = tl.load(ds + off * 2 + 1, mask=m, other=0.0).to(da.dtype.element_ty)
        # scanned as the transposes (p, r, q, u); b_p .. b_u then hold the entries of the products of the transposes
        b_p, b_q, b_r, b_u, b_d1, b_d2 = tl.associative_scan((b_p, b_r, b_q, b_u, b_d1, b_d2), 0, _block_combine,
                                                             reverse=True)
        b_gt1 = b_p * b_g1[None, :] + b_q * b_g2[None, :] + b_d1  # [BT, BN] g_t
        b_gt2 = b_r * b_g1[None, :] + b_u * b_g2[None, :] + b_d2
        m_prev = (o_t >= 1)[:, None] & m
        b_s1 = tl.load(s + (off - N) * 2, mask=m_prev, other=0.0).to(da.dtype.element_ty)  # s_(t-1)
        b_s2 = tl.load(s + (off - N) * 2 + 1, mask=m_prev, other=0.0).to(da.dtype.element_ty)
        first = (o_t == 0)[:, None]
        b_s1 = tl.where(first, b_h01[None, :], b_s1)
        b_s2 = tl.where(first, b_h02[None, :], b_s2)
        tl.store(db + off * 2, b_gt1.to(db.dtype.element_ty), mask=m)
        tl.store(db + off * 2 + 1, b_gt2.to(db.dtype.element_ty), mask=m)
        tl.store(da + off * 4, (b_gt1 * b_s1).to(da.dtype.element_ty), mask=m)  # dA_t = g_t s_(t-1)^T
        tl.store(da + off * 4 + 1, (b_gt1 * b_s2).to(da.dtype.element_ty), mask=m)
        tl.store(da + off * 4 + 2, (b_gt2 * b_s1).to(da.dtype.element_ty), mask=m)
        tl.store(da + off * 4 + 3, (b_gt2 * b_s2).to(da.dtype.element_ty), mask=m)
        b_g1 = _scan_first_row(b_gt1, BT)
        b_g2 = _scan_first_row(b_gt2, BT)
    # the initial state's gradient A_0^T g_0
    p_a0 = a + (base + o_n) * 4
    m_0 = _first_step_mask(m_n, T, VARLEN)
    b_p0 = tl.load(p_a0, mask=m_0, other=0.0).to(da.dtype.element_ty)
    b_q0 = tl.load(p_a0 + 1, mask=m_0, other=0.0).to(da.dtype.element_ty)
    b_r0 = tl.load(p_a0 + 2, mask=m_0, other=0.0).to(da.dtype.element_ty)
    b_u0 = tl.load(p_a0 + 3, mask=m_0, other=0.0).to(da.dtype.element_ty)
    p_dh0 = dh0 + (i_b.to(tl.int64) * N + o_n) * 2
    tl.store(p_dh0, (b_p0 * b_g1 + b_r0 * b_g2).to(dh0.dtype.element_ty), mask=m_n)
    tl.store(p_dh0 + 1, (b_q0 * b_g1 + b_u0 * b_g2).to(dh0.dtype.element_ty), mask=m_n)


def _scan_config(block_t, block_n, num_warps, m: int) -> tuple[int, int, int]:
    BT = _SCAN_BT if block_t is None else block_t
    BN = (_SCAN_BN if m == 1 else _SCAN_BN_BLOCK) if block_n is None else block_n
    for name, value in (("block_t", BT), ("block_n", BN)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two, got {value!r}")
    return BT, BN, _SCAN_WARPS if num_warps is None else num_warps


class _ScanFunction(torch.autograd.Function):
    """s = scan of (a, b) from h0 by `kernels` = (forward, backward): the diagonal pair (a [B, T, N], b [B, T, N],
    h0 [B, N]) or the 2 x 2 block pair (a [B, T, N, 2, 2], b [B, T, N, 2], h0 [B, N, 2]); all contiguous, one dtype;
    T >= 1. cu: None, or the int64 [N_seq + 1] boundaries (on the tensors' device) of N_seq sequences packed in one
    row (B = 1, h0 [N_seq, ...]), each scanned from its own initial state. (The kernels come as an argument so that
    a generated module holds only the pair its layer uses.)"""

    @staticmethod
    def forward(ctx, a, b, h0, cu, kernels, config):
        BT, BN, warps = config
        T, N = b.shape[1:3]
        B = h0.shape[0]  # rows, or packed sequences (cu: their int64 [B + 1] boundaries in the one row)
        s = torch.empty_like(b)
        kernels[0][(triton.cdiv(N, BN), B)](a, b, h0, s, cu, T, N, BT=BT, BN=BN, VARLEN=cu is not None,
                                             num_warps=warps)
        ctx.save_for_backward(a, s, h0)
        ctx.cu, ctx.kernels, ctx.config = cu, kernels, config
        return s

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, ds):
        a, s, h0 = ctx.saved_tensors
        BT, BN, warps = ctx.config
        T, N = s.shape[1:3]
        ds = ds.contiguous()
        da, db, dh0 = torch.empty_like(a), torch.empty_like(s), torch.empty_like(h0)
        ctx.kernels[1][(triton.cdiv(N, BN), h0.shape[0])](a, s, h0, ds, da, db, dh0, ctx.cu, T, N, BT=BT, BN=BN,
                                                          VARLEN=ctx.cu is not None, num_warps=warps)
        return da, db, dh0, None, None, None


def _scan_dtype(b: Tensor) -> torch.dtype:
    return torch.float64 if b.dtype == torch.float64 else torch.float32


def scan_diagonal(a: Tensor, b: Tensor, initial_state: Tensor | None = None, *, block_t: int | None = None,
                  block_n: int | None = None, num_warps: int | None = None,
                  cu_seqlens: Tensor | None = None) -> Tensor:
    """All states of the elementwise recurrence s_t = a_t * s_{t-1} + b_t, by `_scan_fwd_kernel`.

    b [B, T, H, *S] (float16, bfloat16, float32 or float64); a broadcastable to b with as many dims (e.g.
    [B, T, H, K, 1] for a key decay, [1, 1, 1, 1] for a constant); initial_state [B, H, *S] or None (zeros).
    Returns [B, T, H, *S] in float32 (float64 for float64 b): s_t for every t. Differentiable in a, b and
    initial_state through `_scan_bwd_kernel` (a broadcast a gets its gradient summed by autograd's expand).
    cu_seqlens: None, or int64 [N + 1] boundaries of N sequences packed in one row (b [1, T, H, *S],
    initial_state [N, H, *S], cu_seqlens[-1] = T): one launch scans them all, each from its own initial state
    (`_packed`). Raises ValueError for a's number of dims, shapes that do not broadcast, a block size not a power
    of two or bad boundaries.
    """
    dt = _scan_dtype(b)
    config = _scan_config(block_t, block_n, num_warps, 1)
    if a.dim() != b.dim():
        raise ValueError(f"a must have as many dims as b ({b.dim()}), got shape {list(a.shape)}")
    B, T = b.shape[:2]
    cu, B = _packed(cu_seqlens, b, B)
    state_shape = (B,) + tuple(b.shape[2:])
    if initial_state is not None and tuple(initial_state.shape) != state_shape:
        raise ValueError(f"initial_state must be {list(state_shape)}, got {list(initial_state.shape)}")
    if T == 0 or B == 0:  # nothing to scan: the (empty) states
        return b.to(dt)
    a = a.to(dt).expand(b.shape).contiguous()  # [B, T, H, *S]: the expand's backward sums a broadcast gradient
    b = b.to(dt).contiguous()
    h0 = b.new_zeros(state_shape) if initial_state is None else initial_state.to(dt).contiguous()
    rows, N = b.shape[0], b[0, 0].numel()
    s = _ScanFunction.apply(a.view(rows, T, N), b.view(rows, T, N), h0.view(B, N), cu,
                            (_scan_fwd_kernel, _scan_bwd_kernel), config)
    return s.view(b.shape)


def scan_block(a: Tensor, b: Tensor, initial_state: Tensor | None = None, *, block_t: int | None = None,
               block_n: int | None = None, num_warps: int | None = None, cu_seqlens: Tensor | None = None) -> Tensor:
    """All states of the coupled elementwise recurrence s_t = A_t s_{t-1} + b_t, 2 states per element, by
    `_block_scan_fwd_kernel`.

    a [B, T, H, *S, 2, 2] (A_t per element: row r holds the coefficients of both states in the update of state
    r); b [B, T, H, *S, 2]; initial_state [B, H, *S, 2] or None (zeros). Returns [B, T, H, *S, 2] in float32
    (float64 for float64 b). Differentiable in a, b and initial_state through `_block_scan_bwd_kernel`.
    cu_seqlens: packed sequences, as for `scan_diagonal`. Raises ValueError for blocks other than 2 x 2 (the torch
    runtime's `scan_block` takes any size), mismatched shapes or bad boundaries.
    """
    dt = _scan_dtype(b)
    config = _scan_config(block_t, block_n, num_warps, 2)
    m = b.shape[-1]
    if m != 2 or tuple(a.shape[-2:]) != (2, 2):
        raise ValueError(f"the Triton block scan takes 2 x 2 blocks: b [..., 2] and a [..., 2, 2], got b "
                         f"{list(b.shape)} and a {list(a.shape)}")
    B, T = b.shape[:2]
    cu, B = _packed(cu_seqlens, b, B)
    state_shape = (B,) + tuple(b.shape[2:])
    if initial_state is not None and tuple(initial_state.shape) != state_shape:
        raise ValueError(f"initial_state must be {list(state_shape)}, got {list(initial_state.shape)}")
    if T == 0 or B == 0:  # nothing to scan: the (empty) states
        return b.to(dt)
    a = a.to(dt).expand(tuple(b.shape) + (2,)).contiguous()
    b = b.to(dt).contiguous()
    h0 = b.new_zeros(state_shape) if initial_state is None else initial_state.to(dt).contiguous()
    rows, N = b.shape[0], b[0, 0].numel() // 2
    s = _ScanFunction.apply(a.view(rows, T, N, 2, 2), b.view(rows, T, N, 2), h0.view(B, N, 2), cu,
                            (_block_scan_fwd_kernel, _block_scan_bwd_kernel), config)
    return s.view(b.shape)


def _packed(cu_seqlens: Tensor | None, b: Tensor, rows: int) -> tuple[Tensor | None, int]:
    """(the boundaries on b's device or None, the number of scanned sequences): `rows` unpacked, N packed.
    Raises ValueError unless cu_seqlens is int64 [N + 1], from 0 to b's length, not decreasing, with b of one row."""
    if cu_seqlens is None:
        return None, rows
    cu = cu_seqlens.detach().to("cpu")
    T = b.shape[1]
    if (cu.dtype != torch.int64 or cu.dim() != 1 or len(cu) < 2 or int(cu[0]) != 0 or int(cu[-1]) != T
            or bool((cu[1:] < cu[:-1]).any()) or rows != 1):
        raise ValueError(f"cu_seqlens must be int64 [N + 1] boundaries from 0 to T = {T} of sequences packed in one "
                         f"row, got {cu.tolist()[:8]} for b of shape {list(b.shape)}")
    return cu.to(b.device), len(cu) - 1


def scan_final_states(states: Tensor, initial_state: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
    """The state after each sequence's last step: states [B, T, H, *S] (every step's, from `scan_diagonal`),
    initial_state [B, H, *S]; packed (cu_seqlens int64 [N + 1], states [1, T, ...], initial_state [N, ...]) the
    state at step cu[n + 1] - 1 of the row, or sequence n's initial state where it is empty. Returns [B or N, H, *S]."""
    if cu_seqlens is None:
        return states[:, -1] if states.shape[1] else initial_state
    cu = cu_seqlens.detach().to(states.device)
    last = states[0].index_select(0, (cu[1:] - 1).clamp_min(0))
    empty = (cu[1:] == cu[:-1]).view((-1,) + (1,) * (last.dim() - 1))
    return torch.where(empty, initial_state.to(last.dtype), last)


def scan_previous_states(states: Tensor, initial_state: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
    """The state before each step: states [B, T, H, *S] shifted one step later, each sequence's first step getting
    its initial state (initial_state [B, H, *S]; packed: [N, H, *S], with states [1, T, ...] and cu_seqlens int64
    [N + 1]). Returns [B, T, H, *S]."""
    initial_state = initial_state.to(states.dtype)
    if cu_seqlens is None:
        return torch.cat([initial_state[:, None], states[:, :-1]], dim=1)
    cu = cu_seqlens.detach().to(states.device)
    T = states.shape[1]
    lengths = cu[1:] - cu[:-1]
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=states.device), lengths, output_size=T)
    first = torch.arange(T, device=states.device) == cu[:-1][seq]  # the steps that start a sequence
    shifted = torch.cat([states[:, :1], states[:, :-1]], dim=1)
    start = initial_state.index_select(0, seq)[None]  # [1, T, H, *S]
    return torch.where(first.view((1, T) + (1,) * (states.dim() - 2)), start, shifted)


if "vectorise_interpreter_scans" not in globals():  # imported from the package (a generated module drops this)
    from .interpreter import vectorise_interpreter_scans

    vectorise_interpreter_scans()  # the interpreter's associative_scan, one numpy call per step (interpreter.py)


__all__ = ["scan_block", "scan_diagonal", "scan_final_states", "scan_previous_states"]
