"""Triton kernels for the parallel form of a linear recurrence (no, a scalar, a key or a value decay), attention-style.

Same arguments, maths and layout as `codegen/triton_runtime.py`'s `chunked_linear_by` (B batch, T time, H heads, K
key dim, V value dim; per-step tensors [B, T, H, ...], states [B, H, K, V] float32; a query (q, exclusive) reads
S_{t-1} if exclusive, else S_t), for S_t = exp(g_t) S_{t-1} + k_t v_t^T with g_t a scalar log decay per step and
head (none: g = 0; a key decay: g_t [K] scales the rows of S, and every factor below is per key lane, inside the
sums over K). With G_t = g_0 + ... + g_t (a cumulative sum over the whole sequence) and Gq_t = G_t (G_{t-1}
for an exclusive query, G_{-1} = 0):

  o_t = exp(Gq_t) q_t^T S0 + sum_{s <= t} exp(Gq_t - G_s) (q_t . k_s) v_s        (s < t for an exclusive query)
  S_T = exp(G_last) S0 + sum_s exp(G_last - G_s) k_s v_s^T

No state is formed per step or per chunk: for each (V tile, query block of BT rows, batch*head) the output kernel
walks the key blocks j <= i and accumulates (q_i k_j^T * decay mask) v_j, as flash attention walks its key blocks;
the final state is one pass over the steps per (K tile, V tile, batch*head). The reverse mode is the same two
kernels with the roles of the tensors exchanged (one generic kernel each, `_parallel_attn_kernel` and
`_parallel_state_kernel`): with dO the outputs' gradients and dS_T the final state's,

  dq_t  = exp(Gq_t) dO_t S0^T + sum_{s <= t} exp(Gq_t - G_s) (dO_t . v_s) k_s
                                                                   causal, (x, y, z, S) = (dO, v, k, S0^T)
  dk_s  = exp(G_last - G_s) dS_T v_s + sum_{t >= s} exp(Gq_t - G_s) (v_s . dO_t) q_t
                                                                   anti-causal, (x, y, z, S) = (v, dO, q, dS_T^T)
  dv_s  = exp(G_last - G_s) dS_T^T k_s + sum_{t >= s} exp(Gq_t - G_s) (k_s . q_t) dO_t
                                                                   anti-causal, (x, y, z, S) = (k, q, dO, dS_T)
  dS0   = exp(G_last) dS_T + sum_t exp(Gq_t) q_t dO_t^T
  dg_t  = exp(G_last) sum(S0 * dS_T) + sum_{u: t <= Tq(u)} exp(Gq_u) q_u^T S0 dO_u
          + sum_{s < t} exp(G_last - G_s) k_s^T dS_T v_s + sum_{s < t <= Tq(u)} exp(Gq_u - G_s) (q_u . k_s)(dO_u . v_s)
                                                                   (`_parallel_dlog`), 0 where the forward floored g,

Tq(u) = u (u - 1 for an exclusive query), summed over the queries (each query's dq, dk and dv terms; the state terms
once). The log decays' gradient is summed directly, each term a part of the true sum and every exponent <= 0, as the
chunked backward's `_dlog_decay` with the whole sequence as one chunk: not as GLA's identity dG_t = (q . dq)_u -
(k . dk)_t reverse-summed (Yang et al. 2023 section 4), whose two sides each hold the step's own pair (t, t) and the
large state terms and cancel (the per-head slope of lightning_attention lost 2e-5 relative). The pairs that span a
step t of query block i lie in the diagonal block, in block i's rows with earlier key blocks, in its columns with
later query blocks, or between an earlier and a later block (a whole-block sum per block pair, added as a
difference array over each sequence's blocks in float64, `_parallel_dlog_fold_kernel`); see the comment that
opens the log-decay kernels' section.

Numerics: G is the float64 cumulative sum of the log decays, each floored at _LOG_DECAY_FLOOR = -1000 as the
chunked kernels floor them (a select, so a NaN stays NaN; a reset, log decay -inf, zeroes every factor spanning it
exactly, and G never holds -inf, so no -inf - -inf = nan). Every factor is `_decay` of a difference G_a - G_b with a
at or after b (<= 0), formed in float64 and rounded to float32 at once; masks select (tl.where), so a padded or
masked lane never makes 0 * inf. Loads are upcast to float32, dots and accumulators are float32, outputs are stored
in k's dtype, states in float32, as in the chunked runtime.

A key decay's factor exp(Gq_t - G_s) differs per lane, so q k^T is no longer one dot: an off-diagonal block pair
goes through a reference row r between the two blocks, q_t exp(Gq_t - G_r) and k_s exp(G_r - G_s), both bounded by
1; the diagonal block takes one key column at a time (`_parallel_attn_kernel`). dq and dk carry the factor on their
own (output) axis: the off-diagonal pairs scale z_b by exp(G_r - G_b) before the dot and the result by
exp(Gq_a - G_r) after it. The log decays' gradient is the same sum per lane (`_parallel_dlog_kernel`), the pairs'
factor q_u k_s exp(Gq_u - G_s) per key lane. A value decay (min_gru, rg_lru: g_t [V] scales the columns of S) is
the same with the axes exchanged: o and dv carry the factor on their output axis, dq and dk on the contraction
axis, and the log decays' pairs take dO_u v_s exp(Gq_u - G_s) per value lane.

Maps (`_Fused.q_map`, `k_map`: a spec's elementwise feature map of q and k, printed `@triton.jit` helpers): every
kernel, forward and backward, maps q and k where it loads them, and the backward stores dq and dk through the
maps' derivative helpers, as the chunked backward does: no mapped copy of q or k is made.

Packed sequences (`cu_seqlens`, B = 1, states [N, H, K, V]): the kernels walk them, so one set of launches runs
every sequence, forward and backward, for any N (the form is `takes_cu_seqlens`, codegen/dispatch.py). The steps
are laid out as the chunked runtime's `_Packed` lays them out (each sequence from a block boundary of BT rows, BT
at most pow2(longest sequence); zero steps, the identity, fill its last block), with a per-block table of the
block's sequence's first and last block and its index (`_Varlen`). G restarts at each sequence's first step (an
exclusive query's Gq there is 0), by one carry kernel per (sequence, head) (`_parallel_cumsum_kernel`); a query
block walks key blocks from its sequence's first block (causal) or to its last (anti-causal), its state term reads
S0 or dS_T of its sequence, G_last is G at the sequence's last row; the state kernel runs one program per
(sequence, head) over its blocks (an empty sequence's final state is its initial one); the log decays' kernels
pair blocks of one sequence, and their whole-block sums are folded per sequence in float64
(`_parallel_dlog_fold_kernel`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import _first_order, _form_call
from .triton_runtime import (
    _LOG_DECAY_FLOOR,
    _NOT_FUSED,
    _STAGES,
    _WARPS,
    _check_block,
    _decay,
    _empty_result,
    _Fused,
    _fused_of,
    _launch,
    _map_of,
    _mapped,
    _materialise,
    _or,
    _out_dtype,
    _Packed,
    _pow2_at_least_16,
    _register_limited,
    _safe_exp,
    _unfuse,
    _vjp_of,
)

Tensor = torch.Tensor

_PARALLEL_BT = 64  # rows of a query block and of a key block (the default `block_t`)
# A key or value decay's defaults: block_t, block_k and block_v 32, and the launches' register limit
# (`_register_limit`, applied by `_launch`).
# Its attention kernel holds float64 G tiles beside the scores; at 64 / 64 / 64 it spilled 320-704 B (sm_90,
# bfloat16, K = V = 64 and 128), and at 32 without the limit 24-48 B (K = V = 64, ptxas' default cap of 168).
_PARALLEL_KEY_BLOCK = 32
# The attention kernel's warps when it maps a load or a stored gradient (normalized_linear_attention, hgrn2), else
# _WARPS; every attention and state launch has the register limit (`_register_limited`): without it
# normalized_linear_attention's and based's kernels spilled 8-24 B on sm_80 (benchmarks/kernel_matrix.py).
_MAPPED_WARPS = 8
# block_t under "ieee" dots (float32 inputs without tf32), every decay class: Triton runs such a tl.dot as an FMA
# loop holding a thread's rows of A and columns of B whole in registers, not tensor-core fragments; at the defaults
# above every attention kernel spilled in float32 (up to 2.5 KB a thread: retention, mamba2; sm_80 and sm_90, K = V
# = 64 and 128), at block_t 32 the reverse launches (dk, dv) still 16-128 B, and the log-decay kernels 24-56 B
# (gla, rwkv6). At 16: no spill (benchmarks/results/kernel_matrix_float32.json).
_PARALLEL_IEEE_BT = 16
# ... where a key decay's attention kernel also runs _MAPPED_WARPS: at 4, the backward's spilled 8-16 B at K = V =
# 128 on sm_90 (gla, rwkv6; 255 registers), at 8 at most 214 registers.


@triton.jit
def _sequence(tab, i_blk, i_b, NT, VARLEN: tl.constexpr):
    """(c0, c1, n): the blocks c0 .. c1 - 1 of the sequence that block i_blk lies in, and its state row n. VARLEN
    (packed sequences, `_Varlen`): from the block table tab int32 [3, NT] (first block, last block, sequence);
    else the whole row of batch i_b (0, NT, i_b)."""
    if VARLEN:
        return tl.load(tab + i_blk), tl.load(tab + NT + i_blk) + 1, tl.load(tab + 2 * NT + i_blk)
    return i_b * 0, i_b * 0 + NT, i_b


@triton.jit
def _blocks(offsets, i_n, NT, VARLEN: tl.constexpr):
    """(c0, c1): the blocks of sequence i_n (VARLEN: from offsets int32 [N + 1], `_Packed.offsets`), else 0 .. NT."""
    if VARLEN:
        return tl.load(offsets + i_n), tl.load(offsets + i_n + 1)
    return i_n * 0, i_n * 0 + NT


@triton.jit
def _row_g(g, base, rows, m, SHIFT: tl.constexpr, H: tl.constexpr, lo=0):
    """G at the given rows [BT] of one (batch, head) (float64; 0 where masked); SHIFT: G_{t-1}, 0 at the
    sequence's first row lo."""
    if SHIFT:
        return tl.load(g + base + (rows - 1) * H, mask=m & (rows > lo), other=0.0)
    return tl.load(g + base + rows * H, mask=m, other=0.0)


@triton.jit
def _tile_g(g, base, rows, m, lanes, m_l, SHIFT: tl.constexpr, H: tl.constexpr, D: tl.constexpr, lo=0):
    """A key decay's G [BT, BD] (float64, 0 where masked) at the given rows and lanes; SHIFT: G_{t-1}, 0 at the
    sequence's first row lo."""
    if SHIFT:
        src = rows - 1
        m_src = m & (rows > lo)
    else:
        src = rows
        m_src = m
    return tl.load(g + (base + src[:, None] * H) * D + lanes[None, :], mask=m_src[:, None] & m_l[None, :], other=0.0)


@triton.jit
def _lane_g(g, base, row, lanes, m_l, SHIFT: tl.constexpr, H: tl.constexpr, D: tl.constexpr, lo=0):
    """A key decay's G [BD] at one row (m_l: the lanes' mask, the row's own test included); SHIFT: G_{row-1}, 0 at
    the sequence's first row lo."""
    if SHIFT:
        return tl.load(g + (base + (row - 1) * H) * D + lanes, mask=m_l & (lanes * 0 + row > lo), other=0.0)
    return tl.load(g + (base + row * H) * D + lanes, mask=m_l, other=0.0)


@triton.jit
def _state_factor(g, base, b_ga, lanes, m_l, t_end, H: tl.constexpr, D: tl.constexpr, REVERSE: tl.constexpr):
    """The state term's per-lane factor of rows a [BT, BD]: exp(Gq_a) (b_ga holds Gq_a), or with REVERSE
    exp(G_last - G_a) (b_ga holds G_a, G_last the sequence's last row t_end - 1)."""
    if REVERSE:
        b_gl = tl.load(g + (base + (t_end - 1) * H) * D + lanes, mask=m_l, other=0.0)
        return _decay(b_gl[None, :], b_ga)
    return _safe_exp(b_ga.to(tl.float32))


@_register_limited()
@triton.jit
def _parallel_attn_kernel(x, y, z, g, s, out, ox, zs, sx, sw, tab, scale, T, H: tl.constexpr, DX: tl.constexpr,
                          DZ: tl.constexpr, BT: tl.constexpr, BX: tl.constexpr, BZ: tl.constexpr,
                          DECAY: tl.constexpr, EXCLUSIVE: tl.constexpr, REVERSE: tl.constexpr, USE_S: tl.constexpr,
                          TRANS_S: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, ZSTEP: tl.constexpr,
                          SKIP: tl.constexpr, KEY_X: tl.constexpr = False, KEY_Z: tl.constexpr = False,
                          SHIFT_A: tl.constexpr = False, SHIFT_B: tl.constexpr = False, XMAP: tl.constexpr = None,
                          YMAP: tl.constexpr = None, SKIP_STEP: tl.constexpr = False,
                          ZMAP: tl.constexpr = None, OVJP: tl.constexpr = None, VARLEN: tl.constexpr = False):
    """One (BZ tile, block of BT rows a, batch*head) of out_a = scale * (D0_a x_a^T S + sum_b D_ab (x_a . y_b) z_b).

    x, y [B, T, H, DX]; z, out [B, T, H, DZ]; S [B, H, DX, DZ] (TRANS_S: [B, H, DZ, DX], read transposed in place).
    Causal (REVERSE False): b <= a (b < a if EXCLUSIVE), D_ab = exp(Gq_a - G_b), D0_a = exp(Gq_a), Gq the shifted G
    if EXCLUSIVE (the forward's o, the backward's dq). Anti-causal (REVERSE): b >= a (b > a), D_ab = exp(Gq_b - G_a),
    D0_a = exp(G_last - G_a) (the backward's dk and dv). DECAY 1: g is G [B, T, H] float64, one factor per pair of
    rows. DECAY 2 or 3 (a key or value decay): g is G [B, T, H, D] float64, one factor per lane of the axis of x
    and y (KEY_X: a key decay's o and dv, a value decay's dq and dk) or of z (KEY_Z: the others). A key block j
    before the diagonal goes through the reference row r next to the query block (the row before it, or with
    REVERSE its last row): the a side takes exp(Gq_a - G_r) (REVERSE exp(G_r - G_a)), the b side exp(G_r - G_b)
    (exp(Gq_b - G_r)), every exponent <= 0, and the pair is one tl.dot; on the diagonal block, where no such row
    exists, one key column at a time (as the chunked runtime's diagonal sub-blocks, `_intra_attn_kernel`, over BT
    columns instead of 16).
    The forward's fused prologue and epilogue (`_Fused`): ZSTEP z_b is zs[b] * z[b]; XMAP, YMAP map x and y as they
    are loaded; SKIP adds sw[h] * sx[a] after the scale (SKIP_STEP: sw[a], a weight per step [B, T, H]). ACC adds
    into out (later queries of the backward).
    SHIFT_A, SHIFT_B (DECAY 2, 3): whether the a side's, the b side's per-lane G is shifted (EXCLUSIVE on the later
    side: a when causal, b when REVERSE), given by the host as flags of their own.
    The backward's maps (the chunked backward's, `_Fused`): XMAP, YMAP, ZMAP map the raw x, y, z as they are
    loaded; OVJP stores out as OVJP(ox, out), the raw input ox's gradient (grad * map'(ox), a printed derivative
    helper), before ACC adds it, so each query's share goes through the map on its own.
    VARLEN (packed sequences, B = 1, `_Varlen`): the walk stays inside block a's sequence (blocks c0 .. c1 - 1 of
    the table tab, `_sequence`), S is its row n of [N, H, ...], G restarts at its first row lo."""
    i_zt, i_a, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    NT = tl.cdiv(T, BT)
    c0, c1, i_n = _sequence(tab, i_a, i_b, NT, VARLEN)
    lo = c0 * BT  # the sequence's first row, and its end t_end (the last row's G is G_last)
    t_end = tl.minimum(c1 * BT, T)
    base = i_b.to(tl.int64) * T * H + i_h  # flat row index of (b, 0, h)
    o_i = tl.arange(0, BT)
    rows_a = i_a * BT + o_i
    m_a = rows_a < T
    o_z = i_zt * BZ + tl.arange(0, BZ)
    m_z = o_z < DZ
    m_az = m_a[:, None] & m_z[None, :]
    if REVERSE:  # the reference row of the off-diagonal blocks: the query block's last, or (causal) the row before
        i_r = i_a * BT + BT - 1
    else:
        i_r = i_a * BT - 1
    b_acc = tl.zeros([BT, BZ], dtype=tl.float32)
    if DECAY == 1:
        if REVERSE:  # G_a
            b_ga = _row_g(g, base, rows_a, m_a, False, H, lo)
        else:  # Gq_a
            b_ga = _row_g(g, base, rows_a, m_a, EXCLUSIVE, H, lo)
    if (DECAY == 2 or DECAY == 3) and KEY_Z:  # the a side's G over z's lanes, and its reference row's (float64)
        b_gaz = _tile_g(g, base, rows_a, m_a, o_z, m_z, SHIFT_A, H, DZ, lo)
        b_grz = tl.load(g + (base + i_r * H) * DZ + o_z, mask=m_z & (o_z * 0 + i_r < T) & (o_z * 0 + i_r >= 0),
                        other=0.0)
    if USE_S:
        p_s = s + (i_n * H + i_h).to(tl.int64) * (DX * DZ)
        for i_x in range(0, tl.cdiv(DX, BX)):
            o_x = i_x * BX + tl.arange(0, BX)
            m_x = o_x < DX
            m_ax = m_a[:, None] & m_x[None, :]
            b_x = tl.load(x + (base + rows_a[:, None] * H) * DX + o_x[None, :], mask=m_ax, other=0.0).to(tl.float32)
            b_x = _mapped(b_x, m_ax, XMAP)
            if (DECAY == 2 or DECAY == 3) and KEY_X:
                b_gax = _tile_g(g, base, rows_a, m_a, o_x, m_x, SHIFT_A, H, DX, lo)
                b_x = b_x * _state_factor(g, base, b_gax, o_x, m_x, t_end, H, DX, REVERSE)
            if TRANS_S:
                p_xz = p_s + o_z[None, :] * DX + o_x[:, None]
            else:
                p_xz = p_s + o_x[:, None] * DZ + o_z[None, :]
            b_s = tl.load(p_xz, mask=m_x[:, None] & m_z[None, :], other=0.0).to(tl.float32)
            b_acc += tl.dot(b_x, b_s, input_precision=PREC)
        if DECAY == 1:
            if REVERSE:
                b_gl = tl.load(g + base + (t_end - 1) * H, mask=t_end > 0, other=0.0)
                b_acc = b_acc * _decay(b_gl, b_ga)[:, None]
            else:
                b_acc = b_acc * _safe_exp(b_ga.to(tl.float32))[:, None]
        if (DECAY == 2 or DECAY == 3) and KEY_Z:
            b_acc = b_acc * _state_factor(g, base, b_gaz, o_z, m_z, t_end, H, DZ, REVERSE)
    if REVERSE:
        j_lo, j_hi = i_a, c1
    else:
        j_lo, j_hi = c0, i_a + 1
    for i_j in range(j_lo, j_hi):
        rows_b = i_j * BT + o_i
        m_b = rows_b < T
        diagonal = i_j == i_a
        b_A = tl.zeros([BT, BT], dtype=tl.float32)
        for i_x in range(0, tl.cdiv(DX, BX)):
            o_x = i_x * BX + tl.arange(0, BX)
            m_x = o_x < DX
            m_ax = m_a[:, None] & m_x[None, :]
            m_xb = m_x[:, None] & m_b[None, :]
            b_x = tl.load(x + (base + rows_a[:, None] * H) * DX + o_x[None, :], mask=m_ax, other=0.0).to(tl.float32)
            b_x = _mapped(b_x, m_ax, XMAP)
            b_yt = tl.load(y + (base + rows_b[None, :] * H) * DX + o_x[:, None], mask=m_xb, other=0.0).to(tl.float32)
            b_yt = _mapped(b_yt, m_xb, YMAP)
            if (DECAY == 2 or DECAY == 3) and KEY_X:
                b_gax = _tile_g(g, base, rows_a, m_a, o_x, m_x, SHIFT_A, H, DX, lo)  # [BT, BX]
                if diagonal:  # one key column at a time: exp(G_later - G_earlier) per lane, directly
                    for c in range(0, BT):
                        i_s = i_j * BT + c
                        m_s = m_x & (o_x * 0 + i_s < T)
                        b_ys = tl.sum(tl.where(o_i[None, :] == c, b_yt, 0.0), axis=1)  # [BX] column c of y^T
                        b_gs = _lane_g(g, base, i_s, o_x, m_s, SHIFT_B, H, DX, lo)  # [BX]
                        if REVERSE:
                            b_f = _decay(b_gs[None, :], b_gax)
                        else:
                            b_f = _decay(b_gax, b_gs[None, :])
                        b_col = tl.sum(b_x * b_ys[None, :] * b_f, axis=1)  # [BT]
                        b_A += tl.where(o_i[None, :] == c, b_col[:, None], 0.0)
                else:  # through the reference row: both sides bounded, one dot
                    m_r = m_x & (o_x * 0 + i_r >= 0) & (o_x * 0 + i_r < T)
                    b_grx = tl.load(g + (base + i_r * H) * DX + o_x, mask=m_r, other=0.0)
                    b_gbx = _tile_g(g, base, rows_b, m_b, o_x, m_x, SHIFT_B, H, DX, lo)  # [BT, BX]
                    if REVERSE:
                        b_x = b_x * _decay(b_grx[None, :], b_gax)
                        b_yt = b_yt * tl.trans(_decay(b_gbx, b_grx[None, :]))
                    else:
                        b_x = b_x * _decay(b_gax, b_grx[None, :])
                        b_yt = b_yt * tl.trans(_decay(b_grx[None, :], b_gbx))
                    b_A += tl.dot(b_x, b_yt, input_precision=PREC)
            else:
                b_A += tl.dot(b_x, b_yt, input_precision=PREC)
        if REVERSE:
            if EXCLUSIVE:
                m_A = rows_b[None, :] > rows_a[:, None]
            else:
                m_A = rows_b[None, :] >= rows_a[:, None]
        else:
            if EXCLUSIVE:
                m_A = rows_b[None, :] < rows_a[:, None]
            else:
                m_A = rows_b[None, :] <= rows_a[:, None]
        m_A = m_A & m_b[None, :] & m_a[:, None]
        if DECAY == 1:
            if REVERSE:
                b_gb = _row_g(g, base, rows_b, m_b, EXCLUSIVE, H, lo)  # [BT] Gq_b
                b_A = b_A * _decay(b_gb[None, :], b_ga[:, None])
            else:
                b_gb = _row_g(g, base, rows_b, m_b, False, H)  # [BT] G_b
                b_A = b_A * _decay(b_ga[:, None], b_gb[None, :])
        b_A = tl.where(m_A, b_A, 0.0)
        m_bz = m_b[:, None] & m_z[None, :]
        b_z = tl.load(z + (base + rows_b[:, None] * H) * DZ + o_z[None, :], mask=m_bz, other=0.0).to(tl.float32)
        b_z = _mapped(b_z, m_bz, ZMAP)
        if ZSTEP:
            b_z = b_z * tl.load(zs + base + rows_b * H, mask=m_b, other=0.0).to(tl.float32)[:, None]
        if (DECAY == 2 or DECAY == 3) and KEY_Z:
            b_gbz = _tile_g(g, base, rows_b, m_b, o_z, m_z, SHIFT_B, H, DZ, lo)  # [BT, BZ]
            if diagonal:  # one key row at a time: out_a += A_ab z_b exp(G_later - G_earlier) per lane
                for c in range(0, BT):
                    b_a = tl.sum(tl.where(o_i[None, :] == c, b_A, 0.0), axis=1)  # [BT] column c of A
                    b_zc = tl.sum(tl.where(o_i[:, None] == c, b_z, 0.0), axis=0)  # [BZ] row c of z
                    b_gc = tl.sum(tl.where(o_i[:, None] == c, b_gbz, 0.0), axis=0)  # [BZ]
                    if REVERSE:
                        b_f = _decay(b_gc[None, :], b_gaz)
                    else:
                        b_f = _decay(b_gaz, b_gc[None, :])
                    b_acc += b_a[:, None] * b_zc[None, :] * b_f
            else:
                if REVERSE:
                    b_zf = b_z * _decay(b_gbz, b_grz[None, :])
                    b_acc += tl.dot(b_A, b_zf, input_precision=PREC) * _decay(b_grz[None, :], b_gaz)
                else:
                    b_zf = b_z * _decay(b_grz[None, :], b_gbz)
                    b_acc += tl.dot(b_A, b_zf, input_precision=PREC) * _decay(b_gaz, b_grz[None, :])
        else:
            b_acc += tl.dot(b_A, b_z, input_precision=PREC)
    b_acc = b_acc * scale
    p_out = out + (base + rows_a[:, None] * H) * DZ + o_z[None, :]
    if SKIP:
        if SKIP_STEP:
            b_sw = tl.load(sw + base + rows_a * H, mask=rows_a < T, other=0.0).to(tl.float32)[:, None]
        else:
            b_sw = tl.load(sw + i_h, mask=i_h < H, other=0.0).to(tl.float32)
        b_acc += b_sw * tl.load(sx + (base + rows_a[:, None] * H) * DZ + o_z[None, :], mask=m_az,
                                other=0.0).to(tl.float32)
    if OVJP is not None:
        b_ox = tl.load(ox + (base + rows_a[:, None] * H) * DZ + o_z[None, :], mask=m_az, other=0.0)
        b_acc = OVJP(b_ox.to(tl.float32), b_acc)
    if ACC:
        b_acc += tl.load(p_out, mask=m_az, other=0.0).to(tl.float32)
    tl.store(p_out, b_acc.to(out.dtype.element_ty), mask=m_az)

@_register_limited()
@triton.jit
def _parallel_state_kernel(x, z, g, s, out, zs, offsets, T, H: tl.constexpr, DX: tl.constexpr, DZ: tl.constexpr,
                           BT: tl.constexpr, BX: tl.constexpr, BZ: tl.constexpr, DECAY: tl.constexpr,
                           EXCLUSIVE: tl.constexpr, REVERSE: tl.constexpr, USE_S: tl.constexpr, ACC: tl.constexpr,
                           PREC: tl.constexpr, ZSTEP: tl.constexpr, XMAP: tl.constexpr = None,
                           VARLEN: tl.constexpr = False):
    """One (BX tile, BZ tile, batch*head) of out = exp(G_last) S + sum_t w_t x_t z_t^T, [DX, DZ] float32 (DECAY 2:
    a key decay, G [B, T, H, DX], w_t and exp(G_last) per lane of x, so per row of S; DECAY 3: a value decay,
    G [B, T, H, DZ], per lane of z, so per column of S).

    REVERSE False (the final state, x = k, z = v, S = S0): w_t = exp(G_last - G_t). REVERSE (the initial state's
    gradient, x = q, z = dO, S = dS_T): w_t = exp(Gq_t), Gq the shifted G if EXCLUSIVE. ZSTEP: z_t is zs[t] * z[t];
    XMAP maps x as it is loaded; ACC adds into out (later queries).
    VARLEN (packed sequences, B = 1, `_Varlen`): i_bh is (sequence, head) of N * H, over the sequence's blocks
    (`_blocks`); an empty sequence's out is S (G_last = 0)."""
    i_xt, i_zt, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    c0, c1 = _blocks(offsets, i_b, tl.cdiv(T, BT), VARLEN)
    t_lo = c0 * BT
    t_end = tl.minimum(c1 * BT, T)  # G_last is G at t_end - 1
    if VARLEN:  # one packed row
        base = i_h.to(tl.int64)
    else:
        base = i_b.to(tl.int64) * T * H + i_h
    o_i = tl.arange(0, BT)
    o_x = i_xt * BX + tl.arange(0, BX)
    o_z = i_zt * BZ + tl.arange(0, BZ)
    m_x, m_z = o_x < DX, o_z < DZ
    m_xz = m_x[:, None] & m_z[None, :]
    p_xz = i_bh.to(tl.int64) * (DX * DZ) + o_x[:, None] * DZ + o_z[None, :]
    b_acc = tl.zeros([BX, BZ], dtype=tl.float32)
    t_gl = tl.maximum(t_end - 1, 0)  # (an empty sequence's row: masked)
    if DECAY == 1:
        b_gl = tl.load(g + base + t_gl * H, mask=t_end > t_lo, other=0.0)
    if DECAY == 2:  # G_last per lane of x
        b_glx = tl.load(g + (base + t_gl * H) * DX + o_x, mask=m_x & (o_x * 0 + t_end > t_lo), other=0.0)
    if DECAY == 3:  # G_last per lane of z
        b_glz = tl.load(g + (base + t_gl * H) * DZ + o_z, mask=m_z & (o_z * 0 + t_end > t_lo), other=0.0)
    if USE_S:
        b_acc += tl.load(s + p_xz, mask=m_xz, other=0.0).to(tl.float32)
        if DECAY == 1:
            b_acc = b_acc * _safe_exp(b_gl.to(tl.float32))
        if DECAY == 2:
            b_acc = b_acc * _safe_exp(b_glx.to(tl.float32))[:, None]
        if DECAY == 3:
            b_acc = b_acc * _safe_exp(b_glz.to(tl.float32))[None, :]
    for i_n in range(c0, c1):
        rows = i_n * BT + o_i
        m_t = rows < T
        m_xt = m_x[:, None] & m_t[None, :]
        b_xt = tl.load(x + (base + rows[None, :] * H) * DX + o_x[:, None], mask=m_xt, other=0.0).to(tl.float32)
        b_xt = _mapped(b_xt, m_xt, XMAP)
        m_tz = m_t[:, None] & m_z[None, :]
        b_z = tl.load(z + (base + rows[:, None] * H) * DZ + o_z[None, :], mask=m_tz, other=0.0).to(tl.float32)
        if ZSTEP:
            b_z = b_z * tl.load(zs + base + rows * H, mask=m_t, other=0.0).to(tl.float32)[:, None]
        if DECAY == 1:
            if REVERSE:
                b_w = _safe_exp(_row_g(g, base, rows, m_t, EXCLUSIVE, H, t_lo).to(tl.float32))
            else:
                b_w = _decay(b_gl, _row_g(g, base, rows, m_t, False, H))
            b_xt = b_xt * tl.where(m_t, b_w, 0.0)[None, :]
        if DECAY == 2:
            if REVERSE:  # exp(Gq_t) per lane, [BX, BT]
                b_w2 = _safe_exp(tl.trans(_tile_g(g, base, rows, m_t, o_x, m_x, EXCLUSIVE, H, DX, t_lo)).to(
                    tl.float32))
            else:  # exp(G_last - G_t)
                b_w2 = _decay(b_glx[:, None], tl.trans(_tile_g(g, base, rows, m_t, o_x, m_x, False, H, DX)))
            b_xt = b_xt * tl.where(m_xt, b_w2, 0.0)
        if DECAY == 3:
            if REVERSE:  # exp(Gq_t) per lane of z, [BT, BZ]
                b_w3 = _safe_exp(_tile_g(g, base, rows, m_t, o_z, m_z, EXCLUSIVE, H, DZ, t_lo).to(tl.float32))
            else:  # exp(G_last - G_t)
                b_w3 = _decay(b_glz[None, :], _tile_g(g, base, rows, m_t, o_z, m_z, False, H, DZ))
            b_z = b_z * tl.where(m_tz, b_w3, 0.0)
        b_acc += tl.dot(b_xt, b_z, input_precision=PREC)
    if ACC:
        b_acc += tl.load(out + p_xz, mask=m_xz, other=0.0)
    tl.store(out + p_xz, b_acc, mask=m_xz)


# ----------------------------------------------------------------------------------------------------------
# The log decays' gradient, summed directly. A factor exp(Gq_u - G_s) of the pair (query step u, key step s)
# spans the steps s < t <= Tq(u) (Tq(u) = u, u - 1 for an exclusive query), so dg_t is the sum of the pair terms
# P_us over those pairs plus the state terms (`_parallel_dlog`). For t in block i and u in block a, s in block b
# (b <= i <= a): b = a = i is the diagonal block's [BT, BT] sum; b < a = i is a reverse cumulative sum of P's row
# sums over u >= t (u > t if exclusive); b = i < a an exclusive cumulative sum of its column sums over s < t; and
# b < i < a takes the whole block sum tot_ab for every t of block i, which `_parallel_dlog_fold_kernel` adds as a
# difference array over the sequence's blocks (+tot_ab from block b + 1, -tot_ab from block a on), from per-block
# sums the kernels store: block b's column side sums tot_ab over a >= b + 2 (PLUS), block a's row side over
# b <= a - 2 (MINUS). Packed sequences (`_Varlen`): every pair, and the fold, stays inside one sequence.


@triton.jit
def _scores(a, b, base, rows_a, m_a, rows_b, m_b, D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr,
            H: tl.constexpr, PREC: tl.constexpr, AMAP: tl.constexpr = None, BMAP: tl.constexpr = None):
    """a_u . b_s over D lanes for the rows u = rows_a and s = rows_b of one (batch, head): [BT, BT] float32, 0 at
    masked rows; a, b [B, T, H, D], mapped by AMAP, BMAP as loaded (`_mapped`)."""
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_ad = m_a[:, None] & (o_d < D)[None, :]
        m_db = (o_d < D)[:, None] & m_b[None, :]
        b_a = tl.load(a + (base + rows_a[:, None] * H) * D + o_d[None, :], mask=m_ad, other=0.0).to(tl.float32)
        b_bt = tl.load(b + (base + rows_b[None, :] * H) * D + o_d[:, None], mask=m_db, other=0.0).to(tl.float32)
        b_A += tl.dot(_mapped(b_a, m_ad, AMAP), _mapped(b_bt, m_db, BMAP), input_precision=PREC)
    return b_A


@triton.jit
def _block_sums(sums, c, i_blk, i_bh, NBH, NT, o_d, m_d, b_v, D: tl.constexpr):
    """sums[c, bh, i_blk, lanes] += b_v [BD] (sums [4, B*H, NT, D] float32, zeroed by the host)."""
    p = sums + ((c * NBH + i_bh).to(tl.int64) * NT + i_blk) * D + o_d
    tl.store(p, tl.load(p, mask=m_d, other=0.0) + b_v, mask=m_d)


@triton.jit
def _dlog_rows(w, z, y, g, base, rows_a, m_a, i_j, o_d, m_d, b_gr, T, H: tl.constexpr, D: tl.constexpr,
               E: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, PREC: tl.constexpr, YMAP: tl.constexpr):
    """sum over s in key block j of M_us y_s exp(G_r - G_s), [BT (u), BD] float32: M_us = w_u . z_s (rows_a u),
    y, G per lane, r the reference row (G_r [BD] in b_gr) at or after every s."""
    rows_b = i_j * BT + tl.arange(0, BT)
    m_b = rows_b < T
    m_bd = m_b[:, None] & m_d[None, :]
    b_M = _scores(w, z, base, rows_a, m_a, rows_b, m_b, E, BE, BT, H, PREC)
    b_y = _mapped(tl.load(y + (base + rows_b[:, None] * H) * D + o_d[None, :], mask=m_bd, other=0.0).to(tl.float32),
                  m_bd, YMAP)
    b_gb = tl.load(g + (base + rows_b[:, None] * H) * D + o_d[None, :], mask=m_bd, other=0.0)
    return tl.dot(b_M, b_y * _decay(b_gr[None, :], b_gb), input_precision=PREC)


@triton.jit
def _dlog_cols(w, z, x, g, base, rows_b, m_b, i_a, o_d, m_d, b_gr, T, H: tl.constexpr, D: tl.constexpr,
               E: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, PREC: tl.constexpr, SHIFT: tl.constexpr,
               XMAP: tl.constexpr, lo):
    """sum over u in query block a of M_us x_u exp(Gq_u - G_r), [BT (s), BD] float32: M_us = w_u . z_s (rows_b s),
    x, Gq per lane (Gq_u = G_{u-1} if SHIFT, 0 at the sequence's first row lo), r the reference row (b_gr) at or
    before every Tq(u)."""
    rows_a = i_a * BT + tl.arange(0, BT)
    m_a = rows_a < T
    m_ad = m_a[:, None] & m_d[None, :]
    b_M = _scores(w, z, base, rows_a, m_a, rows_b, m_b, E, BE, BT, H, PREC)
    b_x = _mapped(tl.load(x + (base + rows_a[:, None] * H) * D + o_d[None, :], mask=m_ad, other=0.0).to(tl.float32),
                  m_ad, XMAP)
    b_gq = _tile_g(g, base, rows_a, m_a, o_d, m_d, SHIFT, H, D, lo)
    return tl.dot(tl.trans(b_M), b_x * _decay(b_gq, b_gr[None, :]), input_precision=PREC)


@_register_limited()
@triton.jit
def _parallel_dlog_kernel(x, y, w, z, s, ds, g, r, sums, tab, T, H: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
                          BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, VALUE: tl.constexpr,
                          SHIFT: tl.constexpr, USE_S: tl.constexpr, STATE: tl.constexpr, ACC: tl.constexpr,
                          PREC: tl.constexpr, XMAP: tl.constexpr = None, YMAP: tl.constexpr = None,
                          VARLEN: tl.constexpr = False):
    """A key or value decay's log-decay gradient, one (block i of BT steps, BD lanes d of the decayed axis D,
    batch*head): the terms of `_parallel_dlog` that this block's steps and lanes get from its own rows, r [B, T, H, D]
    (+)= float32, and its per-block sums into sums [4, B*H, NT, D] (PLUS, MINUS, the initial state's and the final
    state's terms). x, y [B, T, H, D]; w, z [B, T, H, E]; s = S0, ds = dS_T [B, H, K, V] float32 (D = K rows of
    S, or V columns if VALUE); G [B, T, H, D] float64 over the whole sequence. Every exponent is <= 0: the pairs
    off the diagonal go through a reference row, the diagonal block one lane at a time (`_dlog_chunk_kernel`'s).
    USE_S: an initial state; STATE: a final state's gradient (the first query only); ACC adds into r.
    VARLEN (packed sequences, `_Varlen`): the pairs, states and G of block i's own sequence only (`_sequence`)."""
    i_i, i_d, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NBH = tl.num_programs(2)
    i_b, i_h = i_bh // H, i_bh % H
    NT = tl.cdiv(T, BT)
    c0, c1, i_n = _sequence(tab, i_i, i_b, NT, VARLEN)
    lo = c0 * BT
    t_end = tl.minimum(c1 * BT, T)
    base = i_b.to(tl.int64) * T * H + i_h
    o_i = tl.arange(0, BT)
    rows = i_i * BT + o_i
    m_t = rows < T
    o_j = tl.arange(0, BD)
    o_d = i_d * BD + o_j
    m_d = o_d < D
    m = m_t[:, None] & m_d[None, :]
    offs = (base + rows[:, None] * H) * D + o_d[None, :]
    b_g = tl.load(g + offs, mask=m, other=0.0)  # float64
    b_gq = _tile_g(g, base, rows, m_t, o_d, m_d, SHIFT, H, D, lo)
    b_x = _mapped(tl.load(x + offs, mask=m, other=0.0).to(tl.float32), m, XMAP)
    b_y = _mapped(tl.load(y + offs, mask=m, other=0.0).to(tl.float32), m, YMAP)
    b_r = tl.zeros([BT, BD], dtype=tl.float32)
    # the state terms: x_u exp(Gq_u) (w_u . S0) for every t <= Tq(u), y_s exp(G_L - G_s) (z_s . dS_T) for t > s;
    # S's [d, e] element at d*V + e (rows) or e*V + d (a value decay's columns)
    if USE_S or STATE:
        p_s = (i_n * H + i_h).to(tl.int64) * (D * E)
        b_ws = tl.zeros([BT, BD], dtype=tl.float32)
        b_zd = tl.zeros([BT, BD], dtype=tl.float32)
        for e0 in range(0, E, BE):
            o_e = e0 + tl.arange(0, BE)
            m_e = o_e < E
            if VALUE:
                p_de = o_e[:, None] * D + o_d[None, :]  # [BE, BD]
            else:
                p_de = o_d[None, :] * E + o_e[:, None]
            m_de = m_e[:, None] & m_d[None, :]
            m_te = m_t[:, None] & m_e[None, :]
            offs_e = (base + rows[:, None] * H) * E + o_e[None, :]
            if USE_S:
                b_w = tl.load(w + offs_e, mask=m_te, other=0.0).to(tl.float32)
                b_ws += tl.dot(b_w, tl.load(s + p_s + p_de, mask=m_de, other=0.0), input_precision=PREC)
            if STATE:
                b_z = tl.load(z + offs_e, mask=m_te, other=0.0).to(tl.float32)
                b_zd += tl.dot(b_z, tl.load(ds + p_s + p_de, mask=m_de, other=0.0), input_precision=PREC)
        if USE_S:
            b_e = tl.where(m, b_x * _decay(b_gq, 0.0) * b_ws, 0.0)
            b_r += tl.cumsum(b_e, axis=0, reverse=True)
            if SHIFT:
                b_r -= b_e
            _block_sums(sums, 2, i_i, i_bh, NBH, NT, o_d, m_d, tl.sum(b_e, axis=0), D)
        if STATE:
            b_gl = tl.load(g + (base + (t_end - 1) * H) * D + o_d, mask=m_d, other=0.0)
            b_f = tl.where(m, b_y * _decay(b_gl[None, :], b_g) * b_zd, 0.0)
            b_r += tl.cumsum(b_f, axis=0) - b_f  # for s < t
            _block_sums(sums, 3, i_i, i_bh, NBH, NT, o_d, m_d, tl.sum(b_f, axis=0), D)
    # the rows u of this block with the key blocks before it, through the reference row r = i*BT - 1 (the row
    # before the block: at or before every Tq(u), at or after every s)
    if i_i > c0:
        b_grr = tl.load(g + (base + (i_i * BT - 1) * H) * D + o_d, mask=m_d, other=0.0)
        b_xr = tl.where(m, b_x * _decay(b_gq, b_grr[None, :]), 0.0)
        b_q = tl.zeros([BT, BD], dtype=tl.float32)
        for i_j in range(c0, i_i - 1):  # b <= i - 2: also the whole-block sums of MINUS
            b_q += _dlog_rows(w, z, y, g, base, rows, m_t, i_j, o_d, m_d, b_grr, T, H, D, E, BT, BE, PREC, YMAP)
        _block_sums(sums, 1, i_i, i_bh, NBH, NT, o_d, m_d, tl.sum(b_xr * b_q, axis=0), D)
        b_q += _dlog_rows(w, z, y, g, base, rows, m_t, i_i - 1, o_d, m_d, b_grr, T, H, D, E, BT, BE, PREC, YMAP)
        b_R = b_xr * b_q  # row sums over every earlier s
        b_r += tl.cumsum(b_R, axis=0, reverse=True)
        if SHIFT:
            b_r -= b_R
    # the columns s of this block with the query blocks after it, through the reference row r = its last row
    if i_i < c1 - 1:
        b_grc = tl.load(g + (base + (i_i * BT + BT - 1) * H) * D + o_d, mask=m_d, other=0.0)
        b_yr = tl.where(m, b_y * _decay(b_grc[None, :], b_g), 0.0)
        b_c = tl.zeros([BT, BD], dtype=tl.float32)
        for i_a in range(i_i + 2, c1):  # a >= i + 2: also the whole-block sums of PLUS
            b_c += _dlog_cols(w, z, x, g, base, rows, m_t, i_a, o_d, m_d, b_grc, T, H, D, E, BT, BE, PREC, SHIFT,
                              XMAP, lo)
        _block_sums(sums, 0, i_i, i_bh, NBH, NT, o_d, m_d, tl.sum(b_yr * b_c, axis=0), D)
        b_c += _dlog_cols(w, z, x, g, base, rows, m_t, i_i + 1, o_d, m_d, b_grc, T, H, D, E, BT, BE, PREC, SHIFT,
                          XMAP, lo)
        b_C = b_yr * b_c  # column sums over every later u
        b_r += tl.cumsum(b_C, axis=0) - b_C  # for s < t
    # the diagonal block, one lane at a time: P[u, s] = M_us x_u y_s exp(Gq_u - G_s) for s < u, then
    # C[t, s] = sum_{u >= t} P[u, s] (u > t if SHIFT) and r_t += sum_{s < t} C[t, s]
    m_us = o_i[None, :] < o_i[:, None]
    b_M = tl.where(m_us, _scores(w, z, base, rows, m_t, rows, m_t, E, BE, BT, H, PREC), 0.0)
    for j in range(0, BD):
        d = i_d * BD + j
        m_c = m_t & (o_i * 0 + d < D)  # a [BT] mask (the interpreter takes no scalar one)
        p_c = (base + rows * H) * D + d
        b_xc = _mapped(tl.load(x + p_c, mask=m_c, other=0.0).to(tl.float32), m_c, XMAP)
        b_yc = _mapped(tl.load(y + p_c, mask=m_c, other=0.0).to(tl.float32), m_c, YMAP)
        b_gc = tl.load(g + p_c, mask=m_c, other=0.0)
        if SHIFT:
            b_gqc = tl.load(g + p_c - H * D, mask=m_c & (rows > lo), other=0.0)
        else:
            b_gqc = b_gc
        b_gu = tl.where(m_us, b_gqc[:, None], b_gc[None, :])  # masked pairs get exp(0), times M = 0
        b_P = b_M * b_xc[:, None] * b_yc[None, :] * _decay(b_gu, b_gc[None, :])
        b_Cd = tl.cumsum(b_P, axis=0, reverse=True)
        if SHIFT:
            b_Cd -= b_P
        b_rc = tl.sum(tl.where(m_us, b_Cd, 0.0), axis=1)
        b_r += tl.where(o_j[None, :] == j, b_rc[:, None], 0.0)
    if ACC:
        b_r += tl.load(r + offs, mask=m, other=0.0)
    tl.store(r + offs, b_r, mask=m)


@triton.jit
def _scalar_pairs(q, k, v, do, g, base, rows_a, m_a, rows_b, m_b, T, H: tl.constexpr, K: tl.constexpr,
                  V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
                  SHIFT: tl.constexpr, QMAP: tl.constexpr, KMAP: tl.constexpr, lo):
    """A scalar decay's pair terms P_us = (q_u . k_s)(do_u . v_s) exp(Gq_u - G_s) of query rows u = rows_a and
    key rows s = rows_b, [BT, BT] float32, for blocks with every s <= Tq(u) (0 at masked rows); lo: the first row
    of their sequence."""
    b_A = _scores(q, k, base, rows_a, m_a, rows_b, m_b, K, BK, BT, H, PREC, QMAP, KMAP)
    b_M = _scores(do, v, base, rows_a, m_a, rows_b, m_b, V, BV, BT, H, PREC)
    b_gq = _row_g(g, base, rows_a, m_a, SHIFT, H, lo)
    b_gs = _row_g(g, base, rows_b, m_b, False, H)
    return b_A * b_M * _decay(b_gq[:, None], b_gs[None, :])


@_register_limited()
@triton.jit
def _parallel_dlog_scalar_kernel(q, k, v, do, s, ds, g, r, sums, tab, T, H: tl.constexpr, K: tl.constexpr,
                                 V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                                 SHIFT: tl.constexpr, USE_S: tl.constexpr, STATE: tl.constexpr, ACC: tl.constexpr,
                                 PREC: tl.constexpr, QMAP: tl.constexpr = None, KMAP: tl.constexpr = None,
                                 VARLEN: tl.constexpr = False):
    """`_parallel_dlog_kernel` for a scalar decay, one (block i of BT steps, batch*head), its K lanes summed inside
    the terms: P_us = (q_u . k_s)(do_u . v_s) exp(Gq_u - G_s), the state terms exp(Gq_u) q_u^T S0 do_u and
    exp(G_L - G_s) k_s^T dS_T v_s. r [B, T, H] (+)= float32; sums [4, B*H, NT] (`_parallel_dlog`); G [B, T, H]
    float64; S0, dS_T [B, H, K, V] float32. One G per row, so no reference row: each factor is formed directly.
    VARLEN: block i's own sequence only, as `_parallel_dlog_kernel`'s."""
    i_i, i_bh = tl.program_id(0), tl.program_id(1)
    NBH = tl.num_programs(1)
    i_b, i_h = i_bh // H, i_bh % H
    NT = tl.cdiv(T, BT)
    c0, c1, i_n = _sequence(tab, i_i, i_b, NT, VARLEN)
    lo = c0 * BT
    t_end = tl.minimum(c1 * BT, T)
    base = i_b.to(tl.int64) * T * H + i_h
    o_i = tl.arange(0, BT)
    rows = i_i * BT + o_i
    m_t = rows < T
    o_0 = tl.arange(0, 1)  # the per-block sums' one slot, as a [1] tensor
    m_0 = o_0 == 0
    b_r = tl.zeros([BT], dtype=tl.float32)
    if USE_S or STATE:
        p_s = (i_n * H + i_h).to(tl.int64) * (K * V)
        b_ws = tl.zeros([BT], dtype=tl.float32)  # q_u^T S0 do_u
        b_zd = tl.zeros([BT], dtype=tl.float32)  # k_s^T dS_T v_s
        for v0 in range(0, V, BV):
            o_v = v0 + tl.arange(0, BV)
            m_tv = m_t[:, None] & (o_v < V)[None, :]
            p_tv = (base + rows[:, None] * H) * V + o_v[None, :]
            if USE_S:
                b_qs = tl.zeros([BT, BV], dtype=tl.float32)
                for k0 in range(0, K, BK):
                    o_k = k0 + tl.arange(0, BK)
                    m_tk = m_t[:, None] & (o_k < K)[None, :]
                    b_q = tl.load(q + (base + rows[:, None] * H) * K + o_k[None, :], mask=m_tk, other=0.0)
                    b_s = tl.load(s + p_s + o_k[:, None] * V + o_v[None, :],
                                  mask=(o_k < K)[:, None] & (o_v < V)[None, :], other=0.0)
                    b_qs += tl.dot(_mapped(b_q.to(tl.float32), m_tk, QMAP), b_s, input_precision=PREC)
                b_ws += tl.sum(b_qs * tl.load(do + p_tv, mask=m_tv, other=0.0).to(tl.float32), axis=1)
            if STATE:
                b_kd = tl.zeros([BT, BV], dtype=tl.float32)
                for k0 in range(0, K, BK):
                    o_k = k0 + tl.arange(0, BK)
                    m_tk = m_t[:, None] & (o_k < K)[None, :]
                    b_k = tl.load(k + (base + rows[:, None] * H) * K + o_k[None, :], mask=m_tk, other=0.0)
                    b_ds = tl.load(ds + p_s + o_k[:, None] * V + o_v[None, :],
                                   mask=(o_k < K)[:, None] & (o_v < V)[None, :], other=0.0)
                    b_kd += tl.dot(_mapped(b_k.to(tl.float32), m_tk, KMAP), b_ds, input_precision=PREC)
                b_zd += tl.sum(b_kd * tl.load(v + p_tv, mask=m_tv, other=0.0).to(tl.float32), axis=1)
        p_sum = sums + (i_bh.to(tl.int64) * NT + i_i) + o_0
        if USE_S:
            b_e = tl.where(m_t, _decay(_row_g(g, base, rows, m_t, SHIFT, H, lo), 0.0) * b_ws, 0.0)
            b_r += tl.cumsum(b_e, axis=0, reverse=True)
            if SHIFT:
                b_r -= b_e
            p_e = p_sum + 2 * NBH * NT
            tl.store(p_e, tl.load(p_e, mask=m_0, other=0.0) + tl.sum(b_e, axis=0), mask=m_0)
        if STATE:
            b_gl = tl.load(g + base + (t_end - 1) * H + o_0, mask=m_0, other=0.0)
            b_f = tl.where(m_t, _decay(b_gl, _row_g(g, base, rows, m_t, False, H)) * b_zd, 0.0)
            b_r += tl.cumsum(b_f, axis=0) - b_f  # for s < t
            p_f = p_sum + 3 * NBH * NT
            tl.store(p_f, tl.load(p_f, mask=m_0, other=0.0) + tl.sum(b_f, axis=0), mask=m_0)
    # the rows u of this block with the key blocks before it: row sums, reverse-summed over u >= t (u > t)
    b_R = tl.zeros([BT], dtype=tl.float32)
    for i_j in range(c0, i_i):
        rows_b = i_j * BT + o_i
        b_R += tl.sum(_scalar_pairs(q, k, v, do, g, base, rows, m_t, rows_b, rows_b < T, T, H, K, V, BT, BK, BV,
                                    PREC, SHIFT, QMAP, KMAP, lo), axis=1)
        if i_j == i_i - 2:  # b <= i - 2 so far: MINUS
            p_m = sums + (NBH + i_bh).to(tl.int64) * NT + i_i + o_0
            tl.store(p_m, tl.load(p_m, mask=m_0, other=0.0) + tl.sum(b_R, axis=0), mask=m_0)
    b_r += tl.cumsum(b_R, axis=0, reverse=True)
    if SHIFT:
        b_r -= b_R
    # the columns s of this block with the query blocks after it: column sums over s < t; PLUS from a >= i + 2
    b_C = tl.zeros([BT], dtype=tl.float32)
    for i_a in range(i_i + 1, c1):
        rows_a = (c1 + i_i - i_a) * BT + o_i  # a from the sequence's last block down, so that a = i + 1 comes last
        b_C += tl.sum(_scalar_pairs(q, k, v, do, g, base, rows_a, rows_a < T, rows, m_t, T, H, K, V, BT, BK, BV,
                                    PREC, SHIFT, QMAP, KMAP, lo), axis=0)
        if i_a == c1 - 2:  # a >= i + 2 so far
            p_p = sums + i_bh.to(tl.int64) * NT + i_i + o_0
            tl.store(p_p, tl.load(p_p, mask=m_0, other=0.0) + tl.sum(b_C, axis=0), mask=m_0)
    b_r += tl.cumsum(b_C, axis=0) - b_C
    # the diagonal block: P[u, s] for s < u, C[t, s] = sum_{u >= t} P[u, s] (u > t if SHIFT), r_t += sum_{s<t}
    m_us = o_i[None, :] < o_i[:, None]
    b_P = tl.where(m_us, _scalar_pairs(q, k, v, do, g, base, rows, m_t, rows, m_t, T, H, K, V, BT, BK, BV, PREC,
                                       SHIFT, QMAP, KMAP, lo), 0.0)
    b_Cd = tl.cumsum(b_P, axis=0, reverse=True)
    if SHIFT:
        b_Cd -= b_P
    b_r += tl.sum(tl.where(m_us, b_Cd, 0.0), axis=1)
    if ACC:
        b_r += tl.load(r + base + rows * H, mask=m_t, other=0.0)
    tl.store(r + base + rows * H, b_r, mask=m_t)


@triton.jit
def _parallel_dlog_fold_kernel(sums, r, c, offsets, T, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
                               BD: tl.constexpr, USE_C: tl.constexpr, VARLEN: tl.constexpr):
    """The whole-block terms of `_parallel_dlog`, one (BD lanes, sequence*head): for each block i of the sequence,
    X_i = sum_{b < i} PLUS_b - sum_{a <= i} MINUS_a + sum_{a > i} FIRST_a + sum_{b < i} LAST_b (+ c, the
    exp(G_L) sum(S0 * dS_T) term, if USE_C) summed in float64 over the sequence's own blocks (the difference array of
    the comment that opens this section, restarting per sequence), then r[rows of block i] += X_i once rounded.
    sums [4, B*H, NT, D] float32 (D = 1 for a scalar decay); r [B, T, H, D] float32; c [B*H, D] float64 ([N*H, D]
    with VARLEN). VARLEN: the program's sequence is (program 1) // H, its blocks `_blocks`, B = 1."""
    i_d, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    NT = tl.cdiv(T, BT)
    c0, c1 = _blocks(offsets, i_n, NT, VARLEN)
    if VARLEN:  # one packed row: the sums' (batch, head) is the head
        i_bh = i_h
        base = i_h.to(tl.int64)
        NBH = H
    else:
        i_bh = i_nh
        base = i_n.to(tl.int64) * T * H + i_h
        NBH = tl.num_programs(1)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    p = sums + (i_bh.to(tl.int64) * NT) * D + o_d  # PLUS; MINUS, FIRST, LAST NBH * NT * D on
    step = NBH * NT * D
    b_first = tl.zeros([BD], dtype=tl.float64)  # the sequence's FIRST total, then what is left after block i
    for i in range(c0, c1):
        b_first += tl.load(p + 2 * step + i * D, mask=m_d, other=0.0).to(tl.float64)
    if USE_C:
        b_x = tl.load(c + i_nh.to(tl.int64) * D + o_d, mask=m_d, other=0.0)
    else:
        b_x = tl.zeros([BD], dtype=tl.float64)
    o_i = tl.arange(0, BT)
    for i in range(c0, c1):
        b_plus = tl.load(p + i * D, mask=m_d, other=0.0).to(tl.float64)
        b_minus = tl.load(p + step + i * D, mask=m_d, other=0.0).to(tl.float64)
        b_f = tl.load(p + 2 * step + i * D, mask=m_d, other=0.0).to(tl.float64)
        b_last = tl.load(p + 3 * step + i * D, mask=m_d, other=0.0).to(tl.float64)
        b_first -= b_f
        b_xi = (b_x - b_minus + b_first).to(tl.float32)  # block i's value
        rows = i * BT + o_i
        m = (rows < T)[:, None] & m_d[None, :]
        p_r = r + (base + rows[:, None] * H) * D + o_d[None, :]
        tl.store(p_r, tl.load(p_r, mask=m, other=0.0) + b_xi[None, :], mask=m)
        b_x += b_plus - b_minus + b_last


@triton.jit
def _parallel_cumsum_kernel(g, out, gh, offsets, T, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
                            BD: tl.constexpr, FLOOR: tl.constexpr, HEAD: tl.constexpr, VARLEN: tl.constexpr):
    """G = the float64 cumulative sum of the log decays g [B, T, H, D] (D = 1 for a scalar decay), each floored at
    FLOOR (a select: a NaN stays NaN), one (BD lanes, sequence*head) walking its blocks of BT steps with a float64
    carry, so no [B, T, H, D] temporary is made. HEAD: g times gh[h] (a fused prologue), the product rounded to
    float32 as `_cumsum_kernel` rounds it. VARLEN (packed sequences, B = 1): sequence (program 1) // H's blocks
    (`_blocks`), G restarting at its first step; else the whole row of batch (program 1) // H."""
    i_d, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    c0, c1 = _blocks(offsets, i_n, tl.cdiv(T, BT), VARLEN)
    if VARLEN:
        base = i_h.to(tl.int64)
    else:
        base = i_n.to(tl.int64) * T * H + i_h
    o_i = tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    if HEAD:
        b_gh = tl.load(gh + i_h, mask=i_h < H, other=0.0).to(tl.float32)
    b_c = tl.zeros([BD], dtype=tl.float64)
    for i in range(c0, c1):
        rows = i * BT + o_i
        m = (rows < T)[:, None] & m_d[None, :]
        offs = (base + rows[:, None] * H) * D + o_d[None, :]
        if HEAD:  # masked lanes load 1: a reset head (-inf) would make 0 * -inf = NaN there
            b_g = (tl.load(g + offs, mask=m, other=1.0).to(tl.float32) * b_gh).to(tl.float64)
        else:
            b_g = tl.load(g + offs, mask=m, other=0.0).to(tl.float64)
        b_g = tl.where(m, tl.where(b_g < FLOOR, FLOOR, b_g), 0.0)
        b_gc = tl.cumsum(b_g, axis=0) + b_c[None, :]
        tl.store(out + offs, b_gc, mask=m)
        b_c += tl.sum(b_g, axis=0)


# ----------------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------------


class _Varlen:
    """Packed sequences (`cu_seqlens`) laid out for the parallel kernels: `_Packed`'s layout (each sequence moved to
    start at a block boundary of BT steps, zero steps filling its last block; a zero step is the identity, and its
    outputs are dropped by `unpad`) and per-block tables, so that every kernel runs once for all N sequences.
    packed: the `_Packed` (BT = min(block_t, pow2(longest sequence))); table int32 [3, NT] on the device: each
    block's sequence's first block, last block and index (`_sequence`); last_rows int64 [N]: each sequence's last
    padded row (0 for an empty one: unread), where G_last is."""

    def __init__(self, cu_seqlens: Tensor, T: int, BT: int, device):
        self.packed = p = _Packed(cu_seqlens, T, BT, device)
        offsets = p.offsets.to("cpu", torch.int64)  # each sequence's first block, as _Packed laid them out
        seq = torch.repeat_interleave(torch.arange(p.N), offsets[1:] - offsets[:-1], output_size=p.NT)
        self.table = torch.stack([offsets[seq], offsets[seq + 1] - 1, seq]).to(device=device, dtype=torch.int32)
        self.last_rows = (offsets[1:] * p.BT - 1).clamp(min=0).to(device)
        self.N, self.BT = p.N, p.BT


def _cumulative_log_decays(log_decay, head=None, BT: int = 64, varlen=None):
    """G [B, T, H] (a key or value decay's [B, T, H, D]) float64: the cumulative sum of the log decays over each
    sequence (times the per-head factor head [H], the product rounded to float32 as `_cumsum_kernel` rounds it),
    each floored at _LOG_DECAY_FLOOR (a select: a NaN stays NaN), by `_parallel_cumsum_kernel` (no temporary but
    G). varlen (a `_Varlen`, B = 1, BT its block): the sum restarts at each packed sequence's first step."""
    if log_decay is None:
        return None
    g = log_decay.contiguous()
    B, T, H = g.shape[:3]
    D = g.shape[3] if g.dim() > 3 else 1
    G = torch.empty(g.shape, dtype=torch.float64, device=g.device)
    BD = min(32, _pow2_at_least_16(D))
    rows = varlen.N if varlen is not None else B
    _parallel_cumsum_kernel[(triton.cdiv(D, BD), rows * H)](
        g, G, head if head is not None else g, varlen.packed.offsets if varlen is not None else g, T, H, D, BT, BD,
        _LOG_DECAY_FLOOR, head is not None, varlen is not None)
    return G


def _parallel_config(k: Tensor, V: int, block_t, block_k, block_v, allow_tf32, key: bool = False):
    """(BT, BK, BV, dot precision): BT = min(block_t, pow2(T)) rows per query / key block (default 64; 16 under
    "ieee" dots, `_PARALLEL_IEEE_BT`), BK and BV min(64, pow2(K or V)) as the chunked runtime's (key: a key or value
    decay, all three default to 32, block_t still 16 under "ieee"). The precision is "tf32" if allow_tf32, "ieee" if
    not, and for None "ieee" for float32 k only. ValueError for a block that is not a power of two >= 16."""
    T, K = k.shape[1], k.shape[-1]
    if allow_tf32 is None:
        allow_tf32 = k.dtype != torch.float32
    most = _PARALLEL_KEY_BLOCK if key else 64
    block_t = _or(block_t, _PARALLEL_IEEE_BT if not allow_tf32 else (_PARALLEL_KEY_BLOCK if key else _PARALLEL_BT))
    _check_block("block_t", block_t)
    block_k = _or(block_k, min(most, _pow2_at_least_16(K)))
    block_v = _or(block_v, min(most, _pow2_at_least_16(V)))
    _check_block("block_k", block_k)
    _check_block("block_v", block_v)
    if k.shape[0] * k.shape[2] > 65535 or triton.cdiv(T, min(block_t, _pow2_at_least_16(T))) > 65535:
        raise ValueError(f"k {list(k.shape)}: B * H = {k.shape[0] * k.shape[2]} (at most 65535) or the query "
                         "blocks are past CUDA's grid limits; split the call")
    return min(block_t, _pow2_at_least_16(T)), block_k, block_v, ("tf32" if allow_tf32 else "ieee")


def _attn(x, y, z, G, s, out, decay: int, exclusive: bool, reverse: bool, trans_s: bool, acc: bool, BT, BX, BZ,
          prec, num_warps, num_stages, z_step=None, scale=1.0, skip=None, skip_weight=None, x_map=None,
          y_map=None, key_z: bool = False, skip_step: bool = False, z_map=None, out_map=None, raw=None,
          varlen=None) -> None:
    """Launch `_parallel_attn_kernel` over out [B, T, H, DZ] (see it for the roles of x, y, z, S); key_z: a
    per-lane decay (a key decay 2, a value decay 3) over z's lanes, else over x's. x_map, y_map, z_map: (map, vjp)
    pairs or None, mapping x, y, z as loaded; out_map with raw: out is stored as the raw input raw's gradient.
    varlen: a `_Varlen` (B = 1, its layout) or None."""
    B, T, H, DX = x.shape
    DZ = z.shape[-1]
    key_x, key_z = decay >= 2 and not key_z, decay >= 2 and key_z
    # a mapped load or store holds the raw and the mapped tile: at 4 warps normalized_linear_attention's forward
    # spilled 24 B on sm_80 at K = 128 (168 registers), its backward 8-32 B (255)
    mapped = any(m is not None for m in (x_map, y_map, z_map, out_map))
    warps = _or(num_warps, _MAPPED_WARPS if mapped or (decay == 2 and prec == "ieee") else _WARPS)
    _launch(
        _parallel_attn_kernel, (triton.cdiv(DZ, BZ), triton.cdiv(T, BT), B * H),
        x, y, z, G if G is not None else out, s if s is not None else out, out, raw if raw is not None else out,
        z_step if z_step is not None else out, skip if skip is not None else out,
        skip_weight if skip is not None else out, varlen.table if varlen is not None else out, float(scale), T, H,
        DX, DZ, BT, BX, BZ, decay, exclusive, reverse, s is not None, trans_s, acc, prec, z_step is not None,
        skip is not None, key_x, key_z,
        exclusive and not reverse, exclusive and reverse,
        num_warps=warps, num_stages=_or(num_stages, _STAGES), XMAP=_map_of(x_map), YMAP=_map_of(y_map),
        SKIP_STEP=skip_step, ZMAP=_map_of(z_map), OVJP=_vjp_of(out_map), VARLEN=varlen is not None)


def _state(x, z, G, s, out, decay: int, exclusive: bool, reverse: bool, acc: bool, BT, BX, BZ, prec, num_warps,
           num_stages, z_step=None, x_map=None, varlen=None) -> None:
    """Launch `_parallel_state_kernel` over out [B, H, DX, DZ] float32 (varlen, a `_Varlen`: [N, H, DX, DZ])."""
    B, T, H, DX = x.shape
    DZ = z.shape[-1]
    rows = varlen.N if varlen is not None else B
    _launch(
        _parallel_state_kernel, (triton.cdiv(DX, BX), triton.cdiv(DZ, BZ), rows * H),
        x, z, G if G is not None else out, s if s is not None else out, out, z_step if z_step is not None else out,
        varlen.packed.offsets if varlen is not None else out,
        T, H, DX, DZ, BT, BX, BZ, decay, exclusive, reverse, s is not None, acc, prec, z_step is not None,
        num_warps=_or(num_warps, _WARPS), num_stages=_or(num_stages, _STAGES), XMAP=_map_of(x_map),
        VARLEN=varlen is not None)


def _parallel_forward(decay_cls, queries, k, v, log_decay, initial_state, output_final_state, cfg, fused=None,
                      varlen=None, out_dtype=None):
    """(outputs in out_dtype (None: k's), final state [B, H, K, V] float32 or None); cfg = (BT, BK, BV, prec,
    num_warps, num_stages); varlen: a `_Varlen` whose layout the tensors are in (B = 1, states [N, H, K, V]), or
    None."""
    BT, BK, BV, prec, num_warps, num_stages = cfg
    B, T, H, K = k.shape
    V = v.shape[-1]
    f = fused if fused is not None else _NOT_FUSED
    vs = None if f.v_step is None else f.v_step.contiguous()
    skip = None if f.skip is None else f.skip.contiguous()
    G = _cumulative_log_decays(log_decay, f.decay_head, BT, varlen) if decay_cls.code else None
    s0 = None if initial_state is None else initial_state.contiguous()
    outs = []
    for q, exclusive in queries:
        o = torch.empty((B, T, H, V), dtype=out_dtype or k.dtype, device=k.device)
        _attn(q.contiguous(), k, v, G, s0, o, decay_cls.code, bool(exclusive), False, False, False, BT, BK, BV, prec,
              num_warps, num_stages, vs, f.scale, skip, f.skip_weight, f.q_map, f.k_map, key_z=decay_cls.code == 3,
              skip_step=f.skip_step, varlen=varlen)
        outs.append(o)
    ht = None
    if output_final_state:
        ht = torch.empty((varlen.N if varlen is not None else B, H, K, V), dtype=torch.float32, device=k.device)
        _state(k, v, G, s0, ht, decay_cls.code, False, False, False, BT, BK, BV, prec, num_warps, num_stages, vs,
               f.k_map, varlen)
    return outs, ht


def _parallel_backward(decay_cls, exclusive, cfg, qs, k, v, log_decay, initial_state, dos, dht, maps=(None, None),
                       varlen=None):
    """(dk, dv, dlog_decay, d initial_state, [dq per query]) in float32 (the formulas of the module docstring), for
    v times v_step and log_decay times decay_head (`_materialise`). maps: the (q_map, k_map) pairs of `_Fused` (None
    or (map, vjp); not with a value decay): qs and k are the raw inputs, mapped where each kernel loads them, and dq
    and dk are stored through the vjp helpers as the raw inputs' gradients, as in the chunked backward: no mapped
    copy of q or k. varlen: as `_parallel_forward`'s (d initial_state [N, H, K, V])."""
    BT, BK, BV, prec, num_warps, num_stages = cfg
    B, T, H, K = k.shape
    V = v.shape[-1]
    dev, f32 = k.device, torch.float32
    code = decay_cls.code
    value = code == 3  # a value decay's factors sit on the V axis: dq's and dk's contraction, o's and dv's output
    G = _cumulative_log_decays(log_decay, None, BT, varlen) if code else None
    dos = [torch.zeros((B, T, H, V), dtype=f32, device=dev) if do is None else do.contiguous() for do in dos]
    dht = None if dht is None else dht.to(f32).contiguous()
    s0 = None if initial_state is None else initial_state.contiguous()
    q_map, k_map = maps
    dqs = []
    for q, excl, do in zip(qs, exclusive, dos):
        dq = torch.empty((B, T, H, K), dtype=f32, device=dev)
        _attn(do, v, k, G, s0, dq, code, excl, False, True, False, BT, BV, BK, prec, num_warps, num_stages,
              key_z=not value, z_map=k_map, out_map=q_map, raw=q, varlen=varlen)
        dqs.append(dq)
    dk = torch.empty((B, T, H, K), dtype=f32, device=dev)
    dv = torch.empty((B, T, H, V), dtype=f32, device=dev)
    for i, (q, excl, do) in enumerate(zip(qs, exclusive, dos)):
        first = i == 0  # the final state's term once, later queries add in
        _attn(v, do, q, G, dht if first else None, dk, code, excl, True, True, not first, BT, BV, BK, prec,
              num_warps, num_stages, key_z=not value, z_map=q_map, out_map=k_map, raw=k, varlen=varlen)
        _attn(k, q, do, G, dht if first else None, dv, code, excl, True, False, not first, BT, BK, BV, prec,
              num_warps, num_stages, x_map=k_map, y_map=q_map, key_z=value, varlen=varlen)
    dh0 = None
    if initial_state is not None:
        dh0 = torch.empty(initial_state.shape, dtype=f32, device=dev)
        for i, (q, excl, do) in enumerate(zip(qs, exclusive, dos)):
            _state(q, do, G, dht if i == 0 else None, dh0, code, excl, True, i > 0, BT, BK, BV, prec, num_warps,
                   num_stages, x_map=q_map, varlen=varlen)
    dlog = None
    if decay_cls.code:  # (tests of `decay_cls.code`: codegen/specialize.py folds them per module)
        dlog = _parallel_dlog(decay_cls, exclusive, qs, k, v, dos, G, log_decay, s0, dht, BT, prec, num_warps, maps,
                              num_stages, varlen)
    return dk, dv, dlog, dh0, dqs


_PARALLEL_DLOG_WARPS = 8  # as the chunked runtime's `_DLOG_WARPS`, `_DLOG_SCALAR_WARPS`
# one stage: the block loops' loads are not pipelined; at Triton's default 3, gla's key-decay kernel spilled 8 B
# (255 registers, sm_80, bfloat16, K = V = 64)
_PARALLEL_DLOG_STAGES = 1
# the scalar one's K block: at 64, mlstm's spilled 8 B (255 registers, float16, sm_80, K = V = 64); 183 at 32
_PARALLEL_DLOG_SCALAR_BK = 32
# the scalar one's warps under "ieee" dots (float32, at _PARALLEL_IEEE_BT rows): at 8, 8-48 B spilled at K = V = 128
# (retention, mamba2; sm_80 and sm_90), at 4 at most 120-128 registers. (The key and value decays' kernel keeps 8:
# at 4, gla's spilled 8-24 B at K = V = 64.)
_PARALLEL_IEEE_DLOG_SCALAR_WARPS = 4


def _parallel_dlog(decay_cls, exclusive, qs, k, v, dos, G, log_decay, s0, dht, BT: int, prec: str, num_warps,
                   maps=(None, None), num_stages=None, varlen=None) -> Tensor:
    """dL/d(log decay) float32 ([B, T, H] for a scalar decay, `decay_cls.code` 1; [B, T, H, K] a key decay, 2;
    [B, T, H, V] a value decay, 3), summed directly, never as the reverse sum of (q . dq)_u - (k . dk)_t (GLA's
    identity, Yang et al. 2023 section 4), whose two sides are each near the large state terms and cancel. The
    chunked runtime's `_dlog_decay` sum with the whole sequence as one chunk (h_n = S0, dh_n = dS_T):
        dg_t = exp(G_L) sum(S0 * dS_T)                                  (every t)
             + sum_{u: t <= Tq(u)} x_u exp(Gq_u) (w_u . S0)
             + sum_{s<t} y_s exp(G_L - G_s) (z_s . dS_T)
             + sum_{s<t<=Tq(u)} M_us x_u y_s exp(Gq_u - G_s)
    (x, y, w, z, M) = (q, k, do, v, do v^T) for a key decay, (do, v, q, k, q k^T) for a value decay, the lanes
    summed for a scalar decay; the sums over the undecayed axis. The kernels (`_parallel_dlog_kernel`,
    `_parallel_dlog_scalar_kernel`, one launch per query) sum what each block of steps gets from its own rows and
    columns; the per-block sums they store are added per sequence in float64 by `_parallel_dlog_fold_kernel` (the
    comment that opens the kernels' section). G [B, T, H(, D)] float64 over each sequence; 0 where log_decay was
    floored (the reference's -inf step).
    maps: the (q_map, k_map) pairs of `_Fused` (scalar and key decays), applied where q and k are loaded.
    varlen: a `_Varlen` (B = 1; S0, dS_T [N, H, K, V]; G restarting per sequence) or None: each term, and the
    whole-block sums' difference array (`_parallel_dlog_fold_kernel`), stays inside its own sequence."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    NT = triton.cdiv(T, BT)
    lanes = () if decay_cls.code == 1 else (G.shape[-1],)
    sums = torch.zeros((4, B * H, NT) + lanes, dtype=torch.float32, device=k.device)
    tab = varlen.table if varlen is not None else sums
    r = torch.empty((B, T, H) + lanes, dtype=torch.float32, device=k.device)
    warps, stages = _or(num_warps, _PARALLEL_DLOG_WARPS), _or(num_stages, _PARALLEL_DLOG_STAGES)
    qmap, kmap = _map_of(maps[0]), _map_of(maps[1])
    use_s = s0 is not None
    for i, (q, excl, do) in enumerate(zip(qs, exclusive, dos)):
        state, acc = i == 0 and dht is not None, i > 0
        if decay_cls.code == 1:
            _launch(
                _parallel_dlog_scalar_kernel, (NT, B * H),
                q, k, v, do, s0 if use_s else r, dht if state else r, G, r, sums, tab, T, H, K, V, BT,
                min(_PARALLEL_DLOG_SCALAR_BK, _pow2_at_least_16(K)), min(32, _pow2_at_least_16(V)), excl, use_s,
                state, acc, prec, QMAP=qmap, KMAP=kmap, num_stages=stages, VARLEN=varlen is not None,
                num_warps=_or(num_warps, _PARALLEL_DLOG_WARPS if prec == "tf32" else _PARALLEL_IEEE_DLOG_SCALAR_WARPS))
        else:
            value = decay_cls.code == 3
            x, y, w, z = (do, v, q, k) if value else (q, k, do, v)
            D, E = y.shape[-1], z.shape[-1]
            BD = min(32, _pow2_at_least_16(D))
            _launch(
                _parallel_dlog_kernel, (NT, triton.cdiv(D, BD), B * H),
                x, y, w, z, s0 if use_s else r, dht if state else r, G, r, sums, tab, T, H, D, E, BT, BD,
                min(64, _pow2_at_least_16(E)), value, excl, use_s, state, acc, prec,
                XMAP=None if value else qmap, YMAP=None if value else kmap, num_warps=warps, num_stages=stages,
                VARLEN=varlen is not None)
    # per block i, inside its sequence: the difference array of the whole-block sums, the initial state's terms of
    # the later blocks, the final state's of the earlier ones, and exp(G_L) sum(S0 * dS_T) (every step)
    c = None
    if use_s and dht is not None:
        undecayed = {1: (-2, -1), 2: (-1,), 3: (-2,)}[decay_cls.code]
        g_last = G[:, -1] if varlen is None else G[0].index_select(0, varlen.last_rows)  # [B or N, H(, D)]
        c = (g_last.exp() * (s0.double() * dht.double()).sum(undecayed)).contiguous()
    D = lanes[0] if lanes else 1
    BD = min(32, _pow2_at_least_16(D))
    _parallel_dlog_fold_kernel[(triton.cdiv(D, BD), (varlen.N if varlen is not None else B) * H)](
        sums, r, c if c is not None else sums, varlen.packed.offsets if varlen is not None else sums, T, H, D, BT,
        BD, c is not None, varlen is not None)
    return r.masked_fill_(log_decay < _LOG_DECAY_FLOOR, 0.0)  # a floored step passes no gradient


class _ParallelLinearFunction(torch.autograd.Function):
    """parallel_linear_by with its backward in the kernels above; saves the inputs only (the backward needs no
    state). The final state is formed only when asked (output_final_state), else returned as None."""

    @staticmethod
    def forward(ctx, decay_cls, exclusive, cfg, varlen, scale, maps, output_final_state, out_dtype, k, v,
                log_decay, initial_state, v_step, decay_head, skip, skip_weight, *qs):
        k, v = k.contiguous(), v.contiguous()
        qs = tuple(q.contiguous() for q in qs)
        fused = _Fused(v_step, decay_head, scale, skip, skip_weight, *maps)
        outs, ht = _parallel_forward(decay_cls, list(zip(qs, exclusive)), k, v, log_decay, initial_state,
                                     output_final_state, cfg, fused, varlen, out_dtype)
        ctx.save_for_backward(k, v, log_decay, initial_state, v_step, decay_head, skip, skip_weight, *qs)
        ctx.decay_cls, ctx.exclusive, ctx.cfg, ctx.scale, ctx.maps = decay_cls, exclusive, cfg, scale, maps
        ctx.varlen, ctx.where = varlen, _form_call()
        return (*outs, ht)

    @staticmethod
    @_first_order("its backward runs Triton kernels, which record no graph")
    def backward(ctx, *grads):
        k, v, log_decay, initial_state, v_step, decay_head, skip, skip_weight, *qs = ctx.saved_tensors
        nq = len(ctx.exclusive)
        fused = _Fused(v_step, decay_head, ctx.scale, skip, skip_weight)
        # as the chunked backward: the materialised prologue and the outputs' gradients times the scale, mapped
        # back by `_unfuse`; q and k mapped by the kernels as they load them
        v_m, log_m = _materialise(fused, v, log_decay)
        dos = [None if g is None else g * ctx.scale for g in grads[:nq]] if ctx.scale != 1.0 else grads[:nq]
        dk, dv, dlog, dh0, dqs = _parallel_backward(ctx.decay_cls, ctx.exclusive, ctx.cfg, qs, k, v_m, log_m,
                                                    initial_state, dos, grads[nq], ctx.maps, ctx.varlen)
        dv, dlog, dvs, ddh, dskip, dsw = _unfuse(fused, v, log_decay, grads[0] if nq else None, dv, dlog)
        need = ctx.needs_input_grad

        def cast(grad, like, i):
            return None if grad is None or not need[i] else grad.to(like.dtype)

        return (None, None, None, None, None, None, None, None, cast(dk, k, 8), cast(dv, v, 9),
                cast(dlog, log_decay, 10), cast(dh0, initial_state, 11), cast(dvs, v_step, 12),
                cast(ddh, decay_head, 13), cast(dskip, skip, 14), cast(dsw, skip_weight, 15),
                *(cast(dq, q, 16 + i) for i, (dq, q) in enumerate(zip(dqs, qs))))


def parallel_linear_by(decay_cls, queries, k, v, log_decay=None, initial_state=None, output_final_state=False, *,
                       block_t=None, block_k=None, block_v=None, num_warps=None, num_stages=None, allow_tf32=None,
                       v_step=None, decay_head=None, scale=1.0, skip=None, skip_weight=None, q_map=None,
                       k_map=None, cu_seqlens=None, readouts=False):
    """The parallel form of S_t = D_t S_{t-1} + k_t v_t^T on the GPU (Triton), any decay class of
    codegen/triton_runtime.py (NoDecay, ScalarDecay, KeyDecay, ValueDecay); `chunked_linear_by`'s arguments and
    results (queries: list of (q [B, T, H, K], exclusive); k [B, T, H, K]; v [B, T, H, V]; log_decay [B, T, H],
    [B, T, H, K] or [B, T, H, V];
    initial_state [B, H, K, V] or None; returns (outputs [B, T, H, V] in k's dtype, final state [B, H, K, V]
    float32 or None)) and its fused prologue and epilogue (`_Fused`), but no chunk: block_t rows (a power of two
    >= 16, default 64) per query block and key block. Differentiable (`_ParallelLinearFunction`). ValueError for a
    bad block.

    cu_seqlens: None, or int64 [N + 1] boundaries (checked by the caller; on the CPU or the device) of N sequences
    packed into B = 1, as for chunked_linear_by: each runs from its own row of initial_state [N, H, K, V] (zero if
    None), the final state is [N, H, K, V] (an empty sequence's is its initial one). The sequences are laid out as
    `_Packed` lays them out, at BT = min(block_t, pow2(longest sequence)) (`_Varlen`), and every kernel runs once
    for all N, forward and backward: the launches are those of one sequence. readouts: as for
    chunked_linear_by (float16 outputs that a printed epilogue combines come back in float32)."""
    fused = _fused_of(v_step, decay_head, scale, skip, skip_weight, queries, decay_cls, k.shape[2], q_map, k_map)
    BT, BK, BV, prec = _parallel_config(k, v.shape[-1], block_t, block_k, block_v, allow_tf32, decay_cls.code >= 2)
    varlen = None
    if cu_seqlens is not None:
        varlen = _Varlen(cu_seqlens, k.shape[1], BT, k.device)
        if varlen.packed.NT == 0:  # no step at all: each final state is its initial one
            outs = [k.new_empty((1, 0, k.shape[2], v.shape[-1])) for _ in queries]
            ht = (k.new_zeros((varlen.N, k.shape[2], k.shape[3], v.shape[-1]), dtype=torch.float32)
                  if initial_state is None else initial_state.to(torch.float32))
            return outs, (ht if output_final_state else None)
        pk, BT = varlen.packed, varlen.BT  # the sequences start at multiples of the packed layout's block
        k, v, log_decay = pk.pad(k), pk.pad(v), pk.pad(log_decay)
        queries = [(pk.pad(q), e) for q, e in queries]
        if fused is not None:
            fused = _Fused(pk.pad(fused.v_step), fused.decay_head, fused.scale, pk.pad(fused.skip),
                           pk.pad(fused.skip_weight) if fused.skip_step else fused.skip_weight,
                           q_map=fused.q_map, k_map=fused.k_map)
    if k.shape[1] == 0:
        return _empty_result(queries, k, v, initial_state, output_final_state)
    cfg = (BT, BK, BV, prec, num_warps, num_stages)
    f = fused if fused is not None else _NOT_FUSED
    out_dtype = _out_dtype(k, readouts)
    tensors = [k, v, log_decay, initial_state] + f.tensors() + [q for q, _ in queries]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        exclusive = tuple(bool(e) for _, e in queries)
        flat = _ParallelLinearFunction.apply(decay_cls, exclusive, cfg, varlen, f.scale, f.maps[:2],
                                             bool(output_final_state), out_dtype, k, v, log_decay, initial_state,
                                             *f.tensors(), *[q for q, _ in queries])
        outs, ht = list(flat[:-1]), flat[-1]
    else:
        outs, ht = _parallel_forward(decay_cls, queries, k.contiguous(), v.contiguous(), log_decay, initial_state,
                                     output_final_state, cfg, fused, varlen, out_dtype)
    if varlen is not None:
        outs = [varlen.packed.unpad(o) for o in outs]
    return outs, (ht if output_final_state else None)


def in_parallel(chunked_form):
    """The parallel Triton form of a generated module from its chunked Triton form function `chunked_form`: the
    same prologue and readouts, its `chunked_linear_by` calls run as `parallel_linear_by` (the call's chunk_size,
    the whole length, has no role: the kernels walk blocks of block_t rows, a config's key). A `cu_seqlens=` option
    goes to each `parallel_linear_by` call (its kernels walk the packed sequences), not to the chunked runtime; a
    call that runs each step as `sub_steps` steps (an injection that is a sum of outer products) scales it."""

    def parallel_form(*args, chunk_size=None, block_t=None, cu_seqlens=None, **options):
        def parallel(*call, sub_steps=1, **kwargs):
            bounds = cu_seqlens if cu_seqlens is None or sub_steps == 1 else cu_seqlens * sub_steps
            return parallel_linear_by(*call, block_t=block_t, cu_seqlens=bounds, **kwargs)

        return chunked_form(*args, parallel=parallel, **options)

    parallel_form.__name__ = chunked_form.__name__.replace("chunked", "parallel")
    return parallel_form


__all__ = ["in_parallel", "parallel_linear_by"]
