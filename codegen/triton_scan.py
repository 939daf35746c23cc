"""Triton runtime of the scan form: every state element as an affine recurrence, by chunked associative scans.

Same arguments, maths and layout as `scan_diagonal` and `scan_block` in `codegen/torch_runtime.py` (B batch, T time,
per-step tensors [B, T, ...], the state elements flattened to N numbers per step):

  scan_diagonal   s_t = a_t * s_{t-1} + b_t, elementwise                  (the identity, scalar, diagonal and
                                                                            elementwise classes)
  scan_block      s_t = A_t s_{t-1} + b_t, an m x m block per element,    (coupled-elementwise: a cascade of
                  m = 2 .. 4                                               diagonal decays, a complex diagonal as
                                                                            a real and an imaginary state, ...)

The combine of two steps, earlier (A1, b1) then later (A2, b2), is (A2 A1, A2 b1 + b2): it composes affine maps, so
it is associative (Blelloch 1990, "Prefix sums and their applications", section 1.4) and `tl.associative_scan` runs
it over a chunk of BT steps in log2(BT) levels. A program owns BN state elements of one batch row and walks its
chunks in order, carrying the state at each chunk's end into the next chunk: s_t = (A_t ... A_c) s_(c-1) +
(the chunk's scan from a zero start), c the chunk's first step. Elements are independent, so the grid is
B * cdiv(N, BN) programs on one axis (`_scan_program`) and nothing is shared between programs.

Backward (`_ScanFunction`, for both kinds): with g_t the gradient of the loss with respect to s_t through every
later step, g_t = ds_t + A_(t+1)^T g_(t+1) (g_(T-1) = ds_(T-1)): the same affine recurrence run from the last step
to the first, with the transposed transitions shifted by one step. The kernels scan it with `reverse=True` over each
chunk, carrying g across chunks from the last, and form the local gradients at once:
db_t = g_t, dA_t = g_t s_(t-1)^T (s_(-1) the initial state), and for the initial state A_0^T g_0. The saved states
s_t of the forward are all the backward reads besides a; nothing is recomputed.

Kernels and grids:

  _scan_fwd_kernel        (B * cdiv(N, BN),)   diagonal: states s [B, T, N] from a, b [B, T, N] and h0 [B, N]
  _scan_bwd_kernel        (B * cdiv(N, BN),)   diagonal: da, db [B, T, N] and dh0 [B, N] from ds and the saved s
  NAME__scan_S_fwd_kernel, NAME__scan_S_bwd_kernel   (B * cdiv(N, BN),)   printed per spec and state (fused
                          prologue, below): the same as the diagonal pair, taking the raw tensors for a and b; the
                          backward adds the tensors' gradients (or stores da, db) and dh0
  _block{m}_scan_fwd_kernel, _block{m}_scan_bwd_kernel   (B * cdiv(N, BN),)   m x m blocks: a [B, T, N, m, m], b and s
                          [B, T, N, m], h0 [B, N, m]; printed for each m by `codegen/triton_block_scan.py` (one tile
                          per entry of A and b, the combine written out for that m) and found in `_BLOCK_KERNELS`

Fused prologue (`fused_scan`, `_FusedScan`): a generated module's Triton scan form does not call `scan_diagonal` on
a and b from a torch prologue. For each state it prints (`TorchFormWriter._fused_scan`, codegen/torch_forms.py) a
kernel pair that computes a_t and b_t from the raw inputs [B, T, H, ...] and params [H, ...] where it loads them
(lanes: the state's (h, *S) flattened, an input gathered at its own axes' coordinates) and otherwise scans as
`_scan_fwd_kernel` / `_scan_bwd_kernel`; the backward recomputes a_(t+1) from the inputs and, per chunk of steps,
adds each input's and param's gradient from da_t = g_t s_(t-1) and db_t = g_t itself (the printed
`NAME__scan_S_vjp`: an input covering every lane axis in place, one gathered at fewer axes, e.g. mamba's B[n] of
h[d, n], by `tl.atomic_add`, a param summed over the program's steps and added once), into buffers zeroed before
the first state's launch, which every state adds into (mlstm's C and n both read k, ig and fg). Where a spec's
derivatives do not print, its backward kernels store da, db [B, T, N] and the printed torch VJP of the prologue
maps them to the gradients (`vjp`). Only the states s are kept between forward and backward (a and b are never
stored). Atomic float additions make a gradient's rounding depend on the order of the programs' adds. Coupled
(block) scans, and prologues that are not elementwise per lane, keep the torch prologue and `scan_diagonal` /
`scan_block`.

Packed sequences (`cu_seqlens=`): N sequences in one row [1, T, ...], with initial states [N, ...]; the programs'
rows are the sequences, each program reads its sequence's first step and length from the boundaries
(VARLEN) and scans from its own initial state, so the carry resets at every sequence's start and one launch (forward,
backward) serves any N. `scan_final_states` and `scan_previous_states` pick each sequence's last state and shift
the states by one step within each sequence.

Numerics: loads are masked and taken to the states' dtype (float32 for every call of a generated module, whose
dispatcher upcasts half inputs; float64 where a caller passes float64, as gradcheck does); steps past T load as
the identity step (A = I, b = 0), so the last row of a chunk's scan is always the state at its last real step.
Block sizes (`block_t`, `block_n`, `num_warps`) are keyword arguments with defaults chosen so that no kernel
spills on sm_80 / sm_90 (`recdsl kernels`, tests/test_triton_scan.py), never `triton.autotune`: a layer's config
for the scan form (`recdsl tune`, autotune/space.py's ("scan", "triton") space, which repeats these defaults) gives
them. A backward that adds the gradients itself runs min(block_t, `_SCAN_BT_VJP`) steps a chunk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .dispatch import _first_order, _form_call

_SCAN_BT = 32  # steps per chunk: each level of the in-chunk scan is one shuffle round over BT rows
_SCAN_BN = 64  # state elements per program
# steps per chunk of a fused backward that adds the tensors' gradients itself (`fused_scan` without a torch VJP):
# it holds the loads and derivatives of a step tile besides the scan's: mamba's at 32 steps reached 255 registers
# and spilled on sm_90 (bfloat16, D = 64 and 128; 168 at 16), mlstm's n at 16 spilled a stack slot (8 B at 96
# registers; 72 at 8, C's 96): `recdsl kernels --backward`. A smaller block_t lowers it, a larger one does not raise it
_SCAN_BT_VJP = 8
_SCAN_BN_BLOCK = {2: 32, 3: 16, 4: 8}  # m x m blocks per program, by m (see `_scan_config`)
_BLOCK_KERNELS = {}  # m -> (forward, backward) kernels of the m x m block scan (see `_block_kernels`)
_PRINT_BLOCK_KERNELS = None  # the package's printer of the block kernels for any m (see `_block_kernels`)
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
    """Row 0 of x [BT, BN] as [BN] (a select, as `_scan_last_row`)."""
    return tl.sum(tl.where((tl.arange(0, BT) == 0)[:, None], x, 0.0), axis=0)


@triton.jit
def _scan_program(N, BN: tl.constexpr):
    """(batch row, block of BN state elements) of this program. The grid is one axis of B * cdiv(N, BN) programs,
    the element blocks of a row adjacent: a CUDA grid's second and third axes stop at 65535, and B can pass that
    (`_run_packed` batches every packed sequence of one length as a row)."""
    NB = tl.cdiv(N, BN)
    i = tl.program_id(0)
    return i // NB, i % NB


@triton.jit
def _sequence_start(cu, i_b, T, VARLEN: tl.constexpr):
    """(its first step's index in the [B, T] steps, its length) of the sequence of batch row i_b: under VARLEN
    sequence i_b of the packed row, steps cu[i_b] .. cu[i_b + 1]; else row i_b, T steps."""
    if VARLEN:
        bos = tl.load(cu + i_b).to(tl.int64)
        return bos, (tl.load(cu + i_b + 1) - bos).to(tl.int32)
    else:
        return i_b.to(tl.int64) * T, T


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
    i_b, i_n = _scan_program(N, BN)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    bos, T = _sequence_start(cu, i_b, T, VARLEN)
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
    i_b, i_n = _scan_program(N, BN)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    bos, T = _sequence_start(cu, i_b, T, VARLEN)
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


def _scan_config(block_t, block_n, num_warps, m: int) -> tuple[int, int, int]:
    """(BT, BN, num_warps) for m states per element (1: the diagonal scan). An m x m block scans m * m + m tiles
    of [BT, BN] (the backward 2 m more), so BN shrinks with m; at the sizes of `_SCAN_BN_BLOCK` no kernel spills at
    sm_80 / sm_90 in bfloat16 (the 2 x 2 backward reached 255 registers at BN = 64; tests/test_triton_scan.py).
    Raises ValueError for a value that is not a power of two (Triton's rule for a tl.arange length and for
    num_warps)."""
    BT = _SCAN_BT if block_t is None else block_t
    BN = (_SCAN_BN if m == 1 else _SCAN_BN_BLOCK.get(m, 4)) if block_n is None else block_n
    warps = _SCAN_WARPS if num_warps is None else num_warps
    for name, value in (("block_t", BT), ("block_n", BN), ("num_warps", warps)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two, got {value!r}")
    return BT, BN, warps


class _ScanFunction(torch.autograd.Function):
    """s = scan of (a, b) from h0 by `kernels` = (forward, backward): the diagonal pair (a [B, T, N], b [B, T, N],
    h0 [B, N]) or the m x m block pair (a [B, T, N, m, m], b [B, T, N, m], h0 [B, N, m]); all contiguous, one dtype;
    T >= 1. cu: None, or the int64 [N_seq + 1] boundaries (on the tensors' device) of N_seq sequences packed in one
    row (B = 1, h0 [N_seq, ...]), each scanned from its own initial state. (The kernels come as an argument so that
    a generated module holds only the pair its layer uses.)"""

    @staticmethod
    def forward(ctx, a, b, h0, cu, kernels, config):
        BT, BN, warps = config
        T, N = b.shape[1:3]
        B = h0.shape[0]  # rows, or packed sequences (cu: their int64 [B + 1] boundaries in the one row)
        s = torch.empty_like(b)
        kernels[0][(triton.cdiv(N, BN) * B,)](a, b, h0, s, cu, T, N, BT=BT, BN=BN, VARLEN=cu is not None,
                                              num_warps=warps)
        ctx.save_for_backward(a, s, h0)
        ctx.cu, ctx.kernels, ctx.config, ctx.where = cu, kernels, config, _form_call()
        return s

    @staticmethod
    @_first_order("its backward runs Triton kernels, which record no graph")
    def backward(ctx, ds):
        a, s, h0 = ctx.saved_tensors
        BT, BN, warps = ctx.config
        T, N = s.shape[1:3]
        ds = ds.contiguous()
        da, db, dh0 = torch.empty_like(a), torch.empty_like(s), torch.empty_like(h0)
        ctx.kernels[1][(triton.cdiv(N, BN) * h0.shape[0],)](a, s, h0, ds, da, db, dh0, ctx.cu, T, N, BT=BT, BN=BN,
                                                            VARLEN=ctx.cu is not None, num_warps=warps)
        return da, db, dh0, None, None, None


def _scan_dtype(b: Tensor) -> torch.dtype:
    return torch.float64 if b.dtype == torch.float64 else torch.float32


def _scan_operands(a: Tensor, b: Tensor, initial_state: Tensor | None, m: int, states: int):
    """The checks and layout both scans share. m = 1: diagonal (a broadcastable to b [B, T, ...]); m >= 2: m x m
    blocks (b [B, T, ..., m], a broadcastable to [B, T, ..., m, m]). Returns (s, None) when there is nothing to
    scan (B = 0 or T = 0): s the empty states, a function of a, b and initial_state all the same so that each gets
    its zero gradient, as from the torch runtime; else (None, (a, b, h0)) in the compute dtype (`_scan_dtype`),
    contiguous, a expanded to its full shape (the expand's backward sums a broadcast gradient), h0 [B, ...]
    (zeros for None). states: the number of initial states, B or (packed, b of one row) the sequences' number.
    Raises ValueError naming the argument whose shape does not fit."""
    if b.dim() < 2 + (m > 1):
        raise ValueError(f"b must be [B, T, ...{', m' if m > 1 else ''}], got shape {list(b.shape)}")
    if m > 1 and (b.shape[-1] != m or tuple(a.shape[-2:]) != (m, m)):
        raise ValueError(f"the Triton block scan takes m x m blocks, m >= 2: b [..., m] and a [..., m, m], got b "
                         f"{list(b.shape)} and a {list(a.shape)}")
    a_shape = tuple(b.shape) + ((m,) if m > 1 else ())
    if a.dim() != len(a_shape):
        what = "as many dims as b" if m == 1 else "one dim more than b"
        raise ValueError(f"a must have {what} ({len(a_shape)}), got shape {list(a.shape)}")
    if any(x not in (1, y) for x, y in zip(a.shape, a_shape)):
        raise ValueError(f"a {list(a.shape)} does not broadcast to {list(a_shape)} (b {list(b.shape)})")
    B, T = b.shape[:2]
    state_shape = (states,) + tuple(b.shape[2:])
    if initial_state is not None and tuple(initial_state.shape) != state_shape:
        raise ValueError(f"initial_state must be {list(state_shape)}, got {list(initial_state.shape)}")
    dt = _scan_dtype(b)
    a = a.to(dt).expand(a_shape)
    if T == 0 or B == 0:  # (every term is empty: only the autograd graph matters)
        s = b.to(dt) + (a.sum(-1) if m > 1 else a)
        return (s if initial_state is None else s + initial_state.to(dt).sum(0, keepdim=True)[:, None]), None
    b = b.to(dt).contiguous()
    h0 = b.new_zeros(state_shape) if initial_state is None else initial_state.to(dt).contiguous()
    return None, (a.contiguous(), b, h0)


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
    config = _scan_config(block_t, block_n, num_warps, 1)
    cu, states = _packed(cu_seqlens, b)
    empty, operands = _scan_operands(a, b, initial_state, 1, states)
    if operands is None:
        return empty
    a, b, h0 = operands
    rows, T = b.shape[:2]
    N = b[0, 0].numel()
    s = _ScanFunction.apply(a.view(rows, T, N), b.view(rows, T, N), h0.view(states, N), cu,
                            (_scan_fwd_kernel, _scan_bwd_kernel), config)
    return s.view(b.shape)


class _FusedScan(torch.autograd.Function):
    """The states of a spec's diagonal scans from its raw inputs and params: each state's printed kernel pair
    (`fused_scan`) computes a_t and b_t where it loads them, forward and backward, so only the states s are kept.
    Arguments: plan (a `_FusedPlan`), then the prologue's tensors (inputs [B, T, H, ...], params [1, 1, H, ...];
    contiguous; the compute dtype, or float16 / bfloat16 as given where the kernels add the gradients themselves),
    then each state's initial state [rows or sequences, H, *S] (the compute dtype)."""

    @staticmethod
    def forward(ctx, plan, *args):
        tensors, h0s = args[: plan.count], args[plan.count:]
        BT, BN, warps = plan.config
        rows, T = plan.rows, plan.T
        states = []
        for (fwd, _, _), h0 in zip(plan.kernels, h0s):
            N = h0[0].numel()  # lanes: (h, *S) flattened
            s = torch.empty((rows, T, N), dtype=h0.dtype, device=h0.device)
            fwd[(triton.cdiv(N, BN) * h0.shape[0],)](*tensors, h0, s, plan.cu, T, N, plan.heads, *plan.sizes, BT=BT,
                                                     BN=BN, VARLEN=plan.cu is not None, num_warps=warps)
            states.append(s.view((rows, T) + tuple(h0.shape[1:])))
        ctx.save_for_backward(*tensors, *h0s, *states)
        ctx.plan, ctx.where = plan, _form_call()
        return tuple(states)

    @staticmethod
    @_first_order("its backward runs Triton kernels, which record no graph")
    def backward(ctx, *dss):
        plan = ctx.plan
        saved = ctx.saved_tensors
        k = len(plan.kernels)
        tensors, h0s, states = saved[: plan.count], saved[plan.count: plan.count + k], saved[plan.count + k:]
        BT, BN, warps = plan.config
        if plan.vjp is None:  # the kernels add the tensors' gradients into zeroed buffers themselves
            # (in the states' dtype: a half tensor's gradient is summed in float32, returned in its dtype)
            grads = [torch.zeros(t.shape, dtype=h0s[0].dtype, device=t.device) for t in tensors]
            dh0s = []
            BT = plan.vjp_block_t
            for (_, bwd, _), h0, s, ds in zip(plan.kernels, h0s, states, dss):
                N = h0[0].numel()
                ds = torch.zeros_like(s) if ds is None else ds.to(s.dtype).contiguous()
                dh0 = torch.empty_like(h0)
                bwd[(triton.cdiv(N, BN) * h0.shape[0],)](*tensors, s, h0, ds, *grads, dh0, plan.cu, plan.T, N,
                                                         plan.heads, *plan.sizes, BT=BT, BN=BN,
                                                         VARLEN=plan.cu is not None, num_warps=warps)
                dh0s.append(dh0)
            return (None, *(g.to(t.dtype) for g, t in zip(grads, tensors)), *dh0s)
        grads, dh0s = [], []  # grads: the prologue values' gradients, in the prologue's order
        for (_, bwd, decays), h0, s, ds in zip(plan.kernels, h0s, states, dss):
            N = h0[0].numel()
            ds = torch.zeros_like(s) if ds is None else ds.to(s.dtype).contiguous()
            da, db, dh0 = torch.empty_like(s), torch.empty_like(s), torch.empty_like(h0)
            bwd[(triton.cdiv(N, BN) * h0.shape[0],)](*tensors, s, h0, ds, da, db, dh0, plan.cu, plan.T, N,
                                                     plan.heads, *plan.sizes, BT=BT, BN=BN,
                                                     VARLEN=plan.cu is not None, num_warps=warps)
            grads += [da, db] if decays else [db]  # (a constant decay is no prologue value)
            dh0s.append(dh0)
        got = plan.vjp(*tensors, *grads, *plan.sizes) if any(ctx.needs_input_grad[1: plan.count + 1]) else \
            (None,) * plan.count
        return (None, *got, *dh0s)


class _FusedPlan:
    """What `_FusedScan` needs besides tensors: the per-state kernels [(forward, backward, whether the decay is a
    prologue value)], the prologue's printed VJP, how many tensors it takes, the sizes, rows, steps, heads, the
    packed boundaries and the block config."""

    def __init__(self, kernels, vjp, count, sizes, rows, T, heads, cu, config, vjp_block_t):
        self.kernels, self.vjp, self.count, self.sizes = kernels, vjp, count, sizes
        self.rows, self.T, self.heads, self.cu, self.config = rows, T, heads, cu, config
        self.vjp_block_t = vjp_block_t  # steps per chunk of a backward that adds the gradients itself (vjp None)


def fused_scan(kernels, vjp, tensors, initial_states, sizes, shape, *, block_t: int | None = None,
               block_n: int | None = None, num_warps: int | None = None, cu_seqlens: Tensor | None = None) -> tuple:
    """Every state of a spec's diagonal scans s_t = a_t * s_(t-1) + b_t, a and b computed inside the kernels from
    the raw tensors (never stored): the scan form's fused path, printed by `write_scan` (codegen/torch_forms.py).

    kernels: per state (forward, backward, decays) as `_FusedScan` takes them; vjp: None where the backward kernels
    add the tensors' gradients themselves (into float32 / float64 buffers zeroed here; chunks of min(block_t,
    `_SCAN_BT_VJP`) steps; atomic adds, so the sums' rounding depends on the programs' order), else the
    printed torch VJP of the scan prologue, (tensors, the values' gradients [B, T, H, *S], sizes) -> each tensor's
    gradient or None, run on the kernels' da, db;
    tensors: the prologue's inputs [B, T, H, ...] and params [1, 1, H, ...]; initial_states: per state
    [B (packed: sequences), H, *S]; sizes: the spec's sizes as ints; shape: (B, T, H) of the call. Returns per
    state [B, T, H, *S] in float32 (float64 when a tensor is float64). cu_seqlens: packed sequences, as for
    `scan_diagonal`. Differentiable in every tensor and initial state; the backward keeps only the states."""
    config = _scan_config(block_t, block_n, num_warps, 1)
    rows, T, H = shape
    first = next(t for t in tensors if t.dim() >= 2 and t.shape[:2] == (rows, T))  # an input: [B, T, H, ...]
    cu, _ = _packed(cu_seqlens, first)
    dt = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    # Half-precision tensors stay as they are where the kernels add the gradients themselves: every load upcasts
    # to the states' dtype, and the gradients are summed in that dtype (`_FusedScan.backward`). The printed torch
    # VJP's path takes copies in the states' dtype.
    tensors = [(t if vjp is None and t.dtype in (torch.float16, torch.bfloat16) else t.to(dt)).contiguous()
               for t in tensors]
    h0s = [h.to(dt).contiguous() for h in initial_states]
    if rows == 0 or T == 0:  # nothing to scan: empty states that depend on every tensor (zero gradients)
        anchor = sum(t.sum() * 0 for t in tensors)
        return tuple(h.sum(0, keepdim=True)[:, None].expand(rows, T, *h.shape[1:]) * 0 + anchor for h in h0s)
    vjp_block_t = min(config[0], _SCAN_BT_VJP)  # (block_t lowers the backward's chunk, never raises it)
    plan = _FusedPlan(kernels, vjp, len(tensors), tuple(int(n) for n in sizes), rows, T, H, cu, config, vjp_block_t)
    return _FusedScan.apply(plan, *tensors, *h0s)


def _block_kernels(m: int) -> tuple:
    """(forward, backward) kernels of the m x m block scan. A generated module registers in `_BLOCK_KERNELS` the
    sizes its layers use, next to their printed kernels; imported from the package, any size is printed and
    loaded on first use (`_PRINT_BLOCK_KERNELS`: codegen/triton_block_scan.py's `load_block_kernels`)."""
    if m not in _BLOCK_KERNELS:
        if _PRINT_BLOCK_KERNELS is None:  # a generated module holds the sizes of its own layers only
            raise ValueError(f"this module has no Triton scan kernels for {m} x {m} blocks (it has "
                             f"{sorted(_BLOCK_KERNELS) or 'none'})")
        _BLOCK_KERNELS[m] = _PRINT_BLOCK_KERNELS(m)
    return _BLOCK_KERNELS[m]


def scan_block(a: Tensor, b: Tensor, initial_state: Tensor | None = None, *, block_t: int | None = None,
               block_n: int | None = None, num_warps: int | None = None, cu_seqlens: Tensor | None = None) -> Tensor:
    """All states of the coupled elementwise recurrence s_t = A_t s_{t-1} + b_t, m states per element (m = 2 .. 4),
    by the printed `_block{m}_scan_fwd_kernel`.

    a [B, T, H, *S, m, m] or broadcastable to it (A_t per element: row r holds the coefficients of every state in
    the update of state r); b [B, T, H, *S, m]; initial_state [B, H, *S, m] or None (zeros). Returns
    [B, T, H, *S, m] in float32 (float64 for float64 b). Differentiable in a, b and initial_state through
    `_block{m}_scan_bwd_kernel`. Raises ValueError for a block size without kernels (m < 2, m > 4; the torch
    runtime's `scan_block` takes any size), a not [..., m, m] for b [..., m], mismatched shapes, a block size
    not a power of two or bad boundaries. cu_seqlens: packed sequences, as for `scan_diagonal`.
    """
    m = b.shape[-1] if b.dim() >= 3 else 0
    if m < 2:
        raise ValueError(f"the Triton block scan takes m x m blocks, m >= 2: b [B, T, ..., m], got b "
                         f"{list(b.shape)} and a {list(a.shape)}")
    config = _scan_config(block_t, block_n, num_warps, m)
    cu, states = _packed(cu_seqlens, b)
    empty, operands = _scan_operands(a, b, initial_state, m, states)
    if operands is None:
        return empty
    kernels = _block_kernels(m)
    a, b, h0 = operands
    rows, T = b.shape[:2]
    N = b[0, 0].numel() // m
    s = _ScanFunction.apply(a.view(rows, T, N, m, m), b.view(rows, T, N, m), h0.view(states, N, m), cu, kernels,
                            config)
    return s.view(b.shape)


def _packed(cu_seqlens: Tensor | None, b: Tensor) -> tuple[Tensor | None, int]:
    """(the boundaries on b's device or None, the number of scanned sequences): b's rows unpacked, N packed.
    Raises ValueError unless cu_seqlens is int64 [N + 1], from 0 to b's length, not decreasing, with b of one row."""
    if cu_seqlens is None:
        return None, (b.shape[0] if b.dim() else 0)
    cu = cu_seqlens.detach().to("cpu")
    T = b.shape[1]
    if (cu.dtype != torch.int64 or cu.dim() != 1 or len(cu) < 2 or int(cu[0]) != 0 or int(cu[-1]) != T
            or bool((cu[1:] < cu[:-1]).any()) or b.shape[0] != 1):
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
        return torch.cat([initial_state[:, None], states], dim=1)[:, :-1]  # (T = 0: no step, not one)
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
    from .triton_block_scan import load_block_kernels as _PRINT_BLOCK_KERNELS  # noqa: N811

    vectorise_interpreter_scans()  # the interpreter's associative_scan, one numpy call per step (interpreter.py)


__all__ = ["fused_scan", "scan_block", "scan_diagonal", "scan_final_states", "scan_previous_states"]
