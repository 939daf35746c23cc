"""Triton runtime for the chunked forms of a per-step linear recurrence (GPU path: the forwards, and the backwards of
chunked_linear and of the delta rule).

Same arguments, maths and layout as `codegen/torch_runtime.py` (B batch, T time, H heads, K key dim, V value dim;
per-step tensors [B, T, H, ...], states [B, H, K, V]; a query (q, exclusive) reads S_{t-1} if exclusive, else S_t):

  chunked_linear   S_t = D_t S_{t-1} + k_t v_t^T                        decay_axis None, "scalar", "key", "value"
  chunked_delta    S_t = (I - beta_t k_t k_t^T) D_t S_{t-1} + k_t y_t^T decay_axis None, "scalar", "key"
  chunked_dplr     S_t = (D_t + b_t a_t^T) S_{t-1} + k_t v_t^T          decay_axis None, "scalar", "key" (forward only;
                                                                         cu_seqlens as the others, `_Packed`)

plus keyword-only tuning arguments chosen by the caller (never `triton.autotune`): `block_k`, `block_v`,
`num_warps`, `num_stages`, `allow_tf32`; the chunk length is BT = min(chunk_size, pow2(T)). A tuning argument left
None takes each kernel's default (`_WARPS` and the constants beside it); one given applies to every launch.
Shared structure: the torch runtime cuts a sequence exactly like this one for the same chunk_size (its
`_chunk_sizes` returns this file's (BT, 16)) and computes the per-channel-decay intra-chunk sums in the same
grouping: 16-row sub-chunks, sub-blocks below the diagonal through the state after sub-chunk i - 1 and one matmul,
diagonal sub-blocks directly; so a CPU test of the torch path exercises this algorithm. It forms each decay
factor from sums over the steps it spans where this file uses differences of the chunk-local G (exponents <= 0).
One difference from the torch runtime: outputs come back in k's dtype (it returns its float32 compute dtype for
half inputs); the final state is float32 in both.

Kernels (the split of flash-linear-attention's chunk_h / chunk_o, written afresh), with their grids:

  _cumsum_kernel        (NT, cdiv(D, BD), B*H)   chunk-local inclusive cumulative sum G of the log decays (D = 1
                                                  for a scalar decay, K or V for a per-channel one), each floored
                                                  at _LOG_DECAY_FLOOR = -1000, float64; for a key decay also
                                                  exp(G) in float32 (read by the output and WY kernels, so they
                                                  hold no float64 tile for a lone G). Not launched by the linear
                                                  form's forward with a key decay (GLA): its kernels sum the log
                                                  decays themselves over the steps each factor spans (SPANS).
  _intra_attn_kernel    (NT, NC*NC, B*H)         key/value decay only: the intra-chunk scores
                                                  A_ts = sum_i q_t[i] k_s[i] exp(Gq_t[i] - G_s[i]) (s <= t, or s < t),
                                                  one 16 x 16 sub-block (i, j) per program (NC = BT / 16): below the
                                                  diagonal both factors go through G at the end of sub-chunk i - 1
                                                  (every exponent <= 0) and one tl.dot; on the diagonal a loop over the
                                                  16 key columns. With no key decay (value axis) it is plain q k^T.
  _delta_wy_kernel      (NT, B*H)                delta only: L = tril(diag(beta) (K K^T decayed), -1), the C x C
                                                  inverse T = (I + L)^-1 by forward substitution (row by row, in
                                                  registers), then W = T diag(beta) (K * exp(G)) and Uy = T Y.
  _dplr_wy_kernel       (NT, B*H)                diagonal plus rank one only: Tm = (I - L)^-1 for L_ts = a_t . b_s
                                                  decayed from s to t - 1 (s < t), then w = -Tm (a exp(G_{t-1})) and
                                                  u = Tm M v (M: the same scores for a_t . k_s); the state kernel is
                                                  _delta_state_kernel with DPLR (keys b, pseudo-values U = u - w S,
                                                  plus (k exp(G_last - G))^T v), the output kernel's DPLR adds the
                                                  (b, U) pair. Its backward is the recurrent form's derived adjoint
                                                  from the chunk-start states (`chunk_every`, codegen/dispatch.py),
                                                  run chunk-parallel (codegen/triton_recurrent.py, segments).
  _chunk_state_kernel   (cdiv(K, BK), cdiv(V, BV), B*H)
                                                  linear only: the state passed over chunks in float32 registers;
                                                  writes the start state of every chunk to h [B, H, NT, K, V]
                                                  (float32) and the final state.
  _delta_state_kernel   (cdiv(V, BV), B*H)       delta only: the same, for whole columns of S (BK >= K), held as
                                                  NK <= 4 row blocks of KB = 64 rows (`_delta_blocks`), each its own
                                                  tile; it also resolves the pseudo-values U = Uy - W S in place.
  _chunk_output_kernel  (cdiv(V, BV), NT, B*H)   decay None / scalar / key: o = (q * exp(Gq)) @ S_start
                                                  + (A masked) @ v, A = q k^T (decayed) built in the K loop, or read
                                                  from _intra_attn_kernel for a key decay.
  _chunk_output_value_kernel (cdiv(V, BV), NT*NC, B*H)
                                                  value decay: one 16-row query sub-chunk per program; inter term
                                                  (q @ S_start) * exp(Gq), earlier sub-chunks by tl.dot against
                                                  v * exp(Gref - G), the diagonal sub-block by a 16-column loop.

Backward of chunked_linear (`_ChunkedLinearFunction`; the formulas above `_chunk_dstate_kernel`), from the saved
chunk-start states h. No transposed copy of h or dh is made (the kernels that contract with h^T or dh^T read them in
place: TRANS_H, TRANS_DM), a scalar decay's G stays [B, T, H] (its kernels load one G per row: DECAY 1) and no decay
has no G (DECAY 0):

  _chunk_dstate_kernel  (cdiv(K, BK), cdiv(V, BV), B*H)
                                                  the state gradient run backwards over chunks, one query per
                                                  launch (later ones add in): dh [B, H, NT, K, V] at chunk ends, dh0.
  _intra_attn_kernel                              the forward's scores A and the scores dA of do against v: for a
                                                  key / value decay one of the two decayed over the decay axis, for
                                                  a scalar or no decay both plain (the kernels below decay them).
  _chunk_output_kernel (DECAY 0 / 1, or 2 for a value decay) / _chunk_output_value_kernel (key decay), TRANS_H
                                                  reused for dq: do against h^T, dA (decayed) against k.
  _chunk_bwd_decayed_kernel (cdiv(D, BD), NT*NC, B*H)
                                                  anti-causal mirror of _chunk_output_value_kernel (decay on the
                                                  output axis D): dk for a key decay, dv for a value decay.
  _chunk_bwd_plain_kernel (cdiv(D, BD), NT, B*H)  A^T @ x plus the chunk-end term (z exp(G_last - G)) @ dh: dv for
                                                  a key decay, dk for a value decay, both for a scalar or no decay.
  _dlog_chunk_kernel    (NT, cdiv(D, BD), B*H)    a key / value decay's log-decay gradient, summed term by term (a
                                                  [BT, BT] block per lane of D for the pairs inside the chunk, dots
                                                  for the chunk-start / chunk-end state terms).
  _dlog_scalar_kernel   (NT, B*H)                 a scalar decay's: the same sum with the lanes summed inside its
                                                  terms, one [BT, BT] block per chunk.

Launch defaults (a call's num_warps / block_v override them): 4 warps and 2 stages, BK = BV = 64 (the delta
rule's state kernel: BV = 32 and 8 warps; the key-decay output kernel: 8 warps), chosen so that no kernel spills
registers on sm_80 or sm_90 at K = V <= 128 with tf32 dots (checked by `recdsl kernels`, tests/test_no_spills.py
and benchmarks/kernel_matrix.py). float32 ("ieee") dots run as FMA loops, which need far more registers: the delta
rule under them runs chunks of at most 32 steps at 8 warps and 1 stage (`_delta_ieee_defaults`).

Numerics: every load is masked and upcast to float32, except G (float64); arithmetic and accumulation are float32;
outputs are stored in k's dtype (float16, bfloat16 or float32), the final state in float32 (the compute dtype of the
torch runtime). tl.dot runs with input_precision "ieee" unless allow_tf32 (default: True for half-precision inputs,
whose own mantissa is no wider than tf32's; False for float32 inputs); its operands are always float32. A generated
module passes allow_tf32 itself from the call's dtype (codegen/dispatch.py, `triton_options`), False for a call whose
inputs mix dtypes, which it hands these kernels as float32 copies (`mixed_dtypes`: outputs and intermediates are
stored in k's dtype, which may be narrower than another input's).
Decays are exact for every log decay in [-inf, 0]: `_cumsum_kernel` floors each log decay at -1000 (a select, so NaN
stays NaN; exp(-1000) is exactly 0, so a floored step zeroes every decay spanning it, as -inf does, and G never holds
-inf, so no -inf - -inf = nan) and sums in float64, so a small log decay after a reset gate (one step of -1e4) is not
lost to float32 rounding of G. The linear form's forward with a
key decay allocates no G (SPANS in _intra_attn_kernel and _chunk_output_kernel; _chunk_state_kernel's DECAY 2):
each kernel loads the floored log decays (in their own dtype, upcast) and forms every exponent as the float32 sum
over exactly the steps the factor spans (a cumulative sum down a tile, reversed for G_last - G_s, plus whole
sub-chunk sums between a key sub-chunk and the reference row), as the torch runtime does. A sum of <= 64 terms of
one sign has a relative error of a few float32 ulps, and a floored step inside a span makes that exponent <= -1000,
so a reset zeroes exactly what it should and a small log decay after it stays exact (tests/test_decay_exactness.py:
8.8e-8 against 8.6e-8 with float64 G for GLA with a reset of -1e4). A decay factor is formed by
`_decay`: the difference G_a - G_b (G_a later than G_b, so <= 0) in float64, rounded to float32 at once, then exp in
float32; a lone G (exp(G_t), exp(G_last)) is rounded the same way. `_safe_exp` clamps the exponent at 0 so padded
rows (whose G is loaded as 0) can never make an inf, and masks select (tl.where) rather than multiply, hence no 0 *
inf = nan.

GPU rules kept by construction (the Triton interpreter does not check them): every tl.dot operand dimension is
>= 16 (BT, BK, BV are powers of two >= 16, checked in Python before launch, sub-chunks are 16), no
tl.make_block_ptr (pointer arithmetic only), no `.to()` on loop variables, masks on every load and store.
A scalar row test is broadcast before it meets a block mask (`o_k * 0 + t < T`): the interpreter turns
`block_bool & scalar_bool` into an int32 mask that tl.load rejects. Addresses: int64 chunk bases, int32 offsets
inside a chunk, so long sequences do not overflow.


Backward of the delta rule (decay None, scalar and key; `chunked_delta_by` under autograd, `_ChunkedDeltaFunction`).
Per chunk, with S0 the state entering it, G the chunk-local cumulative log decay and Gq the query's (G_{t-1}
for an exclusive query, 0 at the chunk start), the forward is
  Tm = (I + L)^-1, L_ts = beta_t (k_t . k_s) exp(G_t - G_s) (s < t);  W = Tm diag(beta) (K * exp(G));  U = Tm Y - W S0
  o_t = exp(Gq_t) q_t^T S0 + sum_{s <= t} P_ts U_s,  P_ts = (q_t . k_s) exp(Gq_t - G_s)   (s < t if exclusive)
  S1 = exp(G_last) S0 + (K * exp(G_last - G))^T U
(Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence Length", eqs. 5-8, with
the gate of Yang, Kautz, Hatamizadeh 2024, "Gated Delta Networks", Sec. 3.3). Its reverse mode, given dO and dS1:
  dU  = P^T dO + (K * exp(G_last - G)) dS1                        (_delta_bwd_local_kernel, _delta_bwd_dh_kernel)
  dS0 = exp(G_last) dS1 + (q * exp(Gq))^T dO - W^T dU             (the same, backwards over the chunks)
  dq  = exp(Gq) (dO S0^T) + (dP * D) K,  dP = (dO U^T) masked,  D_ts = exp(Gq_t - G_s)      (_delta_bwd_dqk_kernel)
  dk  = (dP * D)^T Q + exp(G_last - G) (U dS1^T) + [WY terms];  dW = -dU S0^T
  dY  = Tm^T dU;  dTm = dU Y^T + dW (beta K exp(G))^T;  dL = -Tm^T dTm Tm^T (strictly lower) (_delta_bwd_wy_kernel)
  dbeta_t = sum_s dL_ts (L_ts / beta_t) + (Tm^T dW)_t . k_t exp(G_t)
and G enters only through factors exp(G_a - G_b), so dG_t = sum of (x . dx) over the factors where t is a and
minus those where t is b, plus dG_last += sum(dS1 * S1): with q-side factors q_t . dq_t (at Gq's row), k-side
factors k_t . dk_t by path. The log decays' gradient is the chunk-local reverse cumulative sum of dG, zero where
the forward floored the log decay (at _LOG_DECAY_FLOOR, so -inf gives 0). Only S0 of every chunk is recomputed
(by the forward's own kernels); no per-step state is formed.

With a key decay (KDA; `KeyDeltaDecay`) G_t is a vector over the key axis and every factor above acts per key:
exp(G_last - G_s) and exp(Gq_t) multiply k_s and q_t elementwise, exp(G_last) the rows of S and dS, and P, L carry
exp(Gq_t[c] - G_s[c]) inside their sums over c. The chunk-level terms keep their form with those elementwise
factors (_delta_bwd_local_kernel reads P from the forward's _intra_attn_kernel, _delta_bwd_dh_kernel and
_delta_bwd_dqk_kernel form exp(G_last - G) per key from float64 differences). The intra-chunk contractions
  dq_t[c] += sum_s dP_ts k_s[c] exp(Gq_t[c] - G_s[c]),   dk_s[c] += sum_t dP_ts q_t[c] exp(Gq_t[c] - G_s[c])
and the same two for dA (the WY scores' gradient, Gq = G) cannot be one tl.dot: _delta_bwd_intra_kernel does them
with the forward's 16-step sub-chunks, off-diagonal pairs through a reference row between the two sub-chunks (both
exponents <= 0) and diagonal sub-blocks one column at a time. For dG every k-side term is kept in one of two sums,
G_t on the factor's plus side (dA's rows, W's beta k exp(G)) or minus side (the state update, dP's and dA's
columns), so dG_t = k_t * (plus - minus) + q_t * dq_t (at Gq's row) + (dS1 * S1 summed over V) at the last row,
per key, and dg its chunk-local reverse cumulative sum (_delta_bwd_wy_k_kernel).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .dispatch import _first_order, _form_call

Tensor = torch.Tensor

_AXES = (None, "scalar", "key", "value")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SUB = 16  # sub-chunk length for per-channel decays (and the smallest legal tl.dot dimension)
_LOG_DECAY_FLOOR = -1000.0  # _cumsum_kernel floors every log decay here (exp(-1000) is exactly 0)
# Launch defaults, for a call that gives no num_warps / num_stages / block_v (a given one applies to every launch).
# Every tile is float32 (tl.dot operands included: tf32 or ieee), so a tile takes twice the registers of the bf16
# tiles of hand-written kernels: the two kernels that hold the most tiles get 8 warps where those run 4.
_WARPS, _STAGES = 4, 2  # every launch but the three below
_KEY_OUTPUT_WARPS = 8  # _chunk_output_kernel with a key decay (q, exp(G), S tiles in the K loop; scores; v)
# _chunk_state_kernel with a key decay ([BK, BT] k, log-decay and reverse-cumsum tiles beside [BT, BV] v and the
# [BK, BV] state): at 4 warps every one took all 255 registers on sm_80 and hgrn2's spilled 8 B (bfloat16, K = V = 64
# and 128); at 8, 192 registers and none
# (8 under ieee dots too, float32, at 1 stage: `_IEEE_LINEAR_STAGES`)
_KEY_STATE_WARPS = 8
_DLOG_WARPS = 8  # _dlog_chunk_kernel: at 4 warps rwkv6's exclusive query spilled 24 B (255 registers, sm_90, bf16)
# _chunk_output_kernel's value tile with a fused per-step v factor or skip term (Mamba2's dt and D * x): at BV = 64
# it spilled 64 B at 4 warps (16 B at 8) on sm_80 at K = V = 64; at BV = 32 (or BK = 32) 182 registers, no spill
_FUSED_OUTPUT_BV = 32
_DELTA_STATE_WARPS = 8  # _delta_state_kernel (whole [K, BV] columns of S, [BT, KB] tiles of W and k)
_DELTA_STATE_BV = 32  # its default BV (16 with a key decay, whose G tiles are float64)
# _delta_state_kernel with DPLR at K > 64 below sm_90: 1 stage (2 stages need 177 KB of shared memory at K = 128,
# sm_80 has 163 KB; on sm_90, 1 stage spilled 160 B where 2 stages run clean in 222 KB)
_DPLR_STATE_STAGES_SMALL_SHARED = 1
# _delta_wy_kernel with half-precision inputs (bfloat16 / float16 pointers, upcast at the load): 8 warps; at 4 it
# spilled 8 B on sm_80 at K = 64 (168 registers), where float32 inputs compile clean at 4 (219 registers)
_DELTA_WY_HALF_WARPS = 8
_DPLR_WY_WARPS = 8  # _dplr_wy_kernel ([BT, BT] L, M, Tm and Tm M tiles): 16 B spilled at 4 warps (sm_80, K = 128)
# The delta rule under "ieee" dots (float32 inputs without tf32): Triton runs such a tl.dot as an FMA loop whose
# operands sit in registers in full along the contraction (a thread's rows of A and columns of B), not as tensor-core
# fragments, so at the defaults above (BT = 64, 4 warps, 2 stages) ten of gated DeltaNet's thirteen kernels spilled
# on sm_90 at K = V = 128 (up to 7.6 KB a thread: the WY, local, dh and dL kernels). Chunks of 32 steps halve every
# [BT, BT] and [BT, KB] operand, 8 warps halve each thread's share, and 1 stage drops the prefetched copy of the
# next chunk's tiles from the state kernels (`_delta_ieee_defaults`).
_IEEE_DELTA_BT = 32
_IEEE_DELTA_WARPS = 8
_IEEE_DELTA_STAGES = 1
# The linear (non-delta) chunked form under "ieee" dots keeps chunks of 64 steps (the chunk states a training step
# keeps scale with 1 / BT: tests/test_intermediate_bytes.py) and narrows the K / V blocks instead: at the
# half-precision blocks (64) linear_attention's output kernel spilled 9.8 KB a thread (sm_80, K = V = 64) and its
# backward's plain kernel 16 B; at 32, none (`_config`). A key or value decay's state kernel (float64 G tiles beside
# the [BK, BV] state) still spilled 16 B at BV = 32 (gla, rwkv6, sm_90, K = V = 128): BV 16 there, 244 registers.
_IEEE_LINEAR_BLOCK = 32
_IEEE_LANE_DECAY_BV = 16
# ... and runs every kernel at 1 stage (as the delta rule's `_IEEE_DELTA_STAGES`): at 2, mlstm's two state kernels
# spilled 32 B at 255 registers (sm_90, K = V = 128, BK = BV = 32; one at 4 warps, the other at 8) and
# normalized_linear_attention's backward plain kernel 40 B (8 warps); at 1, 71 and 96 registers and none
_IEEE_LINEAR_STAGES = 1
# The diagonal-plus-rank-one form (rwkv7) under ieee dots, chunk 64 kept (its chunk is the recurrent adjoint's
# checkpoint spacing): BV 16 for its WY and output kernels and 1 stage for its state kernel. At sm_80, K = V = 64 the
# output kernel then compiles clean (250 registers; 136 B spilled at BV = 64) and the state kernel too (218; 16 B at
# 2 stages); the WY kernel still spills (248 B, 6.2 KB at BV = 64: its [BT, BT] L, M and Tm tiles under FMA dots
# want sub-chunk tiling), as does the state kernel at K = 128 on sm_90 (3.7 KB)
_IEEE_DPLR_BV = 16
_IEEE_DPLR_STATE_STAGES = 1


# ----------------------------------------------------------------------------------------------------------
# register limits: a kernel that ptxas would otherwise stop short of the registers it needs declares it once, above
# its @triton.jit (`_register_limited`), and every launch of it goes through `_launch`, which adds the limit
# ----------------------------------------------------------------------------------------------------------


def _register_limit(num_warps: int) -> dict:
    """{"maxnreg": an SM's 64K registers over a num_warps program's threads, at most 255} when Triton compiles for
    a CUDA target (a GPU, or `recdsl kernels`' compile-only driver), {} elsewhere (the interpreter). Unasked, ptxas
    caps an 8-warp kernel at 128 registers (168 at 4) and spills below that, or keeps a stack slot far below it
    (the kernels declared `_register_limited` say where; codegen/triton_recurrent.py launches the recurrent adjoints
    with it too)."""
    try:
        backend = triton.runtime.driver.active.get_current_target().backend
    except Exception:  # no active driver (the interpreter on a machine without a GPU)
        return {}
    return {"maxnreg": min(255, 65536 // (32 * num_warps))} if backend == "cuda" else {}


def _register_limited(when=None):
    """Declare that a kernel launches with `_register_limit(num_warps)`: always (when None), or at the launches where
    `when(args)` holds, args the launch's arguments by parameter name (its constexprs: DECAY, PREC, ...). Used as a
    decorator above `@triton.jit`; `_launch` applies it."""

    def declare(kernel):
        code = getattr(kernel, "fn", kernel).__code__  # the Python function (a plain one where triton is missing)
        kernel.register_limited = (when, code.co_varnames[:code.co_argcount])
        return kernel

    return declare


def _launch(kernel, grid, *args, **options):
    """kernel[grid](*args, **options), with `_register_limit(num_warps)` added where the kernel's declaration
    (`_register_limited`) asks for it at these arguments (a maxnreg given in options wins)."""
    declared = getattr(kernel, "register_limited", None)
    if declared is not None:
        when, names = declared
        if when is None or when({**dict(zip(names, args)), **options}):
            options = {**_register_limit(options.get("num_warps", 4)), **options}
    return kernel[grid](*args, **options)


# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _safe_exp(x):
    """exp(x) for x <= 0; clamped at 0 so garbage in masked-out lanes never overflows."""
    return tl.exp(tl.minimum(x, 0.0))


@triton.jit
def _decay(g_to, g_from):
    """exp(g_to - g_from) for float64 cumulative log decays (g_to at or after g_from, so the exponent is <= 0):
    the difference is exact in float64, rounded to float32 at once, and exponentiated in float32."""
    return _safe_exp((g_to - g_from).to(tl.float32))


@triton.jit
def _floored(x):
    """A tile of log decays as float32, each floored at _LOG_DECAY_FLOOR = -1000 as `_cumsum_kernel` floors them
    (a select, so a NaN stays NaN)."""
    x = x.to(tl.float32)
    return tl.where(x < -1000.0, -1000.0, x)


@triton.jit
def _mapped(x, m, MAP: tl.constexpr):
    """MAP(x) on the lanes of mask m, 0 elsewhere: a spec's elementwise feature map or gate (a printed `@triton.jit`
    helper of the generated module, passed as a constexpr function; None for none) applied where the kernel loads
    its raw input. A map of 0 need not be 0 (elu(0) + 1 = 1), so masked lanes are zeroed again after it."""
    if MAP is not None:
        x = tl.where(m, MAP(x), 0.0)
    return x


@triton.jit
def _paired(x, y, p, m, MAP: tl.constexpr):
    """MAP(x, y[p]) on the lanes of mask m, 0 elsewhere; x itself when MAP is None: a key that is a spec's
    elementwise function of two raw inputs (RWKV-7's b = -(a * kk), `_Fused.b_map`: a printed `@triton.jit` helper
    passed as a constexpr function), x the first input's tile as the kernel loaded it, y the second's pointer and p
    the tile's offsets in it (both inputs [B, T, H, K])."""
    if MAP is not None:
        x = tl.where(m, MAP(x, tl.load(y + p, mask=m, other=0.0).to(tl.float32)), 0.0)
    return x


@triton.jit
def _row_scale_kernel(v, x, out, dv, dx, R, V: tl.constexpr, BR: tl.constexpr, BV: tl.constexpr, MAP: tl.constexpr,
                      VJP: tl.constexpr, BACK: tl.constexpr):
    """A per-step factor MAP(x[r]) of the rows r of v [R, V] (x [R]: the raw input of `_Fused.v_step_map`), for
    the linear backward, which runs on v * v_step: forward (not BACK) out[r] = MAP(x[r]) * v[r] in out's dtype;
    BACK, from dv [R, V] float32 the gradient of out: dx[r] = VJP(x[r], sum(dv[r] * v[r])) (the raw input's
    gradient, float32) and dv[r] *= MAP(x[r]) in place (v's). No [R] factor is stored."""
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    m_r = o_r < R
    b_x = tl.load(x + o_r, mask=m_r, other=0.0).to(tl.float32)
    b_s = _mapped(b_x, m_r, MAP)
    b_d = tl.zeros([BR], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m = m_r[:, None] & (o_v < V)[None, :]
        p = o_r.to(tl.int64)[:, None] * V + o_v[None, :]
        b_v = tl.load(v + p, mask=m, other=0.0).to(tl.float32)
        if BACK:
            b_g = tl.load(dv + p, mask=m, other=0.0)
            b_d += tl.sum(b_g * b_v, axis=1)
            tl.store(dv + p, b_g * b_s[:, None], mask=m)
        else:
            tl.store(out + p, (b_v * b_s[:, None]).to(out.dtype.element_ty), mask=m)
    if BACK:
        tl.store(dx + o_r, tl.where(m_r, VJP(b_x, b_d), 0.0), mask=m_r)


@triton.jit
def _scalar_map_kernel(x, y, dy, dx, unsafe, R, T, H, BR: tl.constexpr, MAP: tl.constexpr, VJP: tl.constexpr,
                       BACK: tl.constexpr, LOG: tl.constexpr, CHECK: tl.constexpr):
    """A per-step value y = MAP(x) of its raw input x [B, T, H] (R = B * T * H rows), stored in y's dtype, for a
    runtime that takes the values themselves (the parallel form); CHECK lowers unsafe [1] int32 to the first step t
    whose value is NaN or > 0 (LOG: a log decay) or not finite (else), `_check_steps`' test. BACK: dx = VJP(x, dy)."""
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    m_r = o_r < R
    b_x = tl.load(x + o_r, mask=m_r, other=0.0).to(tl.float32)
    if BACK:
        b_dy = tl.load(dy + o_r, mask=m_r, other=0.0).to(tl.float32)
        tl.store(dx + o_r, VJP(b_x, b_dy).to(dx.dtype.element_ty), mask=m_r)
    else:
        b_y = MAP(b_x)
        tl.store(y + o_r, b_y.to(y.dtype.element_ty), mask=m_r)
        if CHECK:
            if LOG:
                bad = m_r & ~(b_y <= 0.0)
            else:
                bad = m_r & ~(tl.abs(b_y) < float("inf"))
            tl.atomic_min(unsafe, tl.min(tl.where(bad, (o_r // H) % T, T), axis=0))


# Addressing: a per-step tensor [B, T, H, D] is addressed from `bos`, the int64 flat row index (b, t0, h) of the
# chunk's first step, plus int32 offsets local to the chunk (row i at i * H * D): no int32 overflow for any T.


@triton.jit
def _cumsum_kernel(g, gc, eg, gh, T, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                   FLOOR: tl.constexpr, EXP: tl.constexpr, HEAD: tl.constexpr, GMAP: tl.constexpr, vs, unsafe, src,
                   T_SRC, VSMAP: tl.constexpr, CHECK: tl.constexpr, PACKED: tl.constexpr):
    """gc[b, t, h, :] = sum over s = t0 .. t (the chunk starting at t0) of max(g[b, s, h, :], FLOOR), in float64;
    with EXP also eg = exp(gc) in float32 (gc rounded to float32 first, as every lone G is: see `_decay`).
    HEAD (a fused prologue): the log decay is g[b, s, h, :] * gh[h], the product rounded to float32 as the torch
    prologue rounded it (Mamba2's dt * A), so no [B, T, H] product is allocated.

    The floor is a select, so a NaN stays NaN; float64 keeps a small log decay exact after a large one.

    GMAP (a printed `@triton.jit` helper, `_Fused.log_decay_map`): g holds the raw input of the log decays, mapped
    here as it is loaded (mLSTM's logsigmoid(fg) of fg), so no [B, T, H] log decay is stored. PACKED (`_Packed`,
    B = 1): src [NT * BT] gives each padded step's packed step (T_SRC for a filler step), whose mapped log decay is
    0, the identity, as a raw 0 is without a map. CHECK (the forward's): lowers unsafe [1] int32 to the first step
    (the packed one when PACKED; T_SRC means none) whose log decay is NaN or > 0 or whose per-step factor
    VSMAP(vs[t]) (vs: the raw input of `_Fused.v_step_map`, [B, T, H], or None) is not finite: the check
    `_check_steps` makes on the prologue's values, made where they are first computed."""
    i_n, i_d, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    t0 = i_n * BT
    bos = (i_b.to(tl.int64) * T + t0) * H + i_h
    o_i = tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    m = (t0 + o_i < T)[:, None] & (o_d < D)[None, :]
    offs = bos * D + o_i[:, None] * (H * D) + o_d[None, :]  # [BT, BD]
    if HEAD:
        b_gh = tl.load(gh + i_h, mask=i_h < H, other=0.0).to(tl.float32)  # (the mask: the GPU rule's form)
        # masked lanes load 1, not 0: a reset head (gh = -inf) would make 0 * -inf = NaN there (never stored, but
        # a floating-point "invalid" the interpreter reports as a RuntimeWarning)
        b_g = (tl.load(g + offs, mask=m, other=1.0).to(tl.float32) * b_gh).to(tl.float64)
    elif GMAP is not None:
        b_g = tl.where(m, GMAP(tl.load(g + offs, mask=m, other=0.0).to(tl.float32)), 0.0)
        m_s = t0 + o_i < T  # the rows of real steps (PACKED: not a filler step)
        o_s = t0 + o_i  # their step, as `_check_steps` numbers it
        if PACKED:
            o_s = tl.load(src + t0 + o_i, mask=m_s, other=T_SRC)
            m_s = o_s < T_SRC
        b_g = tl.where(m_s[:, None], b_g, 0.0)
        if CHECK:
            bad = tl.max((m_s[:, None] & m & ~(b_g <= 0.0)).to(tl.int32), axis=1) > 0  # [BT]: NaN or > 0
            if VSMAP is not None:
                b_vs = VSMAP(tl.load(vs + (bos + o_i * H), mask=m_s, other=0.0).to(tl.float32))
                bad = bad | (m_s & ~(tl.abs(b_vs) < float("inf")))
            tl.atomic_min(unsafe, tl.min(tl.where(bad, o_s, T_SRC), axis=0))
        b_g = b_g.to(tl.float64)
    else:
        b_g = tl.load(g + offs, mask=m, other=0.0).to(tl.float64)
    b_g = tl.where(b_g < FLOOR, FLOOR, b_g)
    b_gc = tl.cumsum(b_g, axis=0)
    tl.store(gc + offs, b_gc, mask=m)
    if EXP:
        tl.store(eg + offs, _safe_exp(b_gc.to(tl.float32)), mask=m)


@_register_limited(lambda a: a.get("SPANS", False) or a["PREC"] == "ieee")
# the key decay's forward scores (SPANS): unasked, ptxas kept an 8 B stack slot at 72 registers in rwkv6's (float16,
# sm_90, K = V = 128; benchmarks/kernel_matrix.py), 114 registers and none with the limit; likewise under ieee dots
# (float32) in min_gru's backward (8 B at 40 registers, sm_90, K = V = 64 and 128)
@triton.jit
def _intra_attn_kernel(q, k, k2, gc, A, T, H: tl.constexpr, K: tl.constexpr,
                       BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, NC: tl.constexpr,
                       DECAY: tl.constexpr, SHIFT: tl.constexpr, STRICT: tl.constexpr, PREC: tl.constexpr,
                       SPANS: tl.constexpr = False, QMAP: tl.constexpr = None, KMAP: tl.constexpr = None,
                       KMAP2: tl.constexpr = None):
    """One [BC, BC] block (i, j) of the intra-chunk scores of chunk n, stored in A [B*H, NT*BT, BT] (float32).

    A_ts = sum_c q_t[c] k_s[c] exp(Gq_t[c] - G_s[c]) for s <= t (s < t if STRICT), 0 elsewhere, where
    Gq_t = G_t, or G_{t-1} if SHIFT (0 at the chunk start). With DECAY 2 (a key decay); with DECAY 3 (a value
    decay, applied by the output kernel) plain q_t . k_s.
    An exclusive query is SHIFT and STRICT; the delta rule's K K^T is STRICT only.
    SPANS (a key decay): gc holds the log decays themselves, not G, and every exponent is the float32 sum of the
    floored log decays over the steps it spans (`_linear_forward`), never a difference of G.
    QMAP, KMAP (`_mapped`): the spec's elementwise maps of the raw q and k, applied as they are loaded; KMAP2
    (`_paired`): the keys are KMAP2(k, k2) of two raw inputs (the diagonal-plus-rank-one class's b, `_Fused.b_map`).
    """
    i_n, i_ij, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_i, i_j = i_ij // NC, i_ij % NC
    i_b, i_h = i_bh // H, i_bh % H
    NT = tl.cdiv(T, BT)
    t0 = i_n * BT
    bos = (i_b.to(tl.int64) * T + t0) * H + i_h
    p_q, p_k, p_g, p_k2 = q + bos * K, k + bos * K, gc + bos * K, k2 + bos * K
    o_c = tl.arange(0, BC)
    o_iq = i_i * BC + o_c  # [BC] query rows (local to the chunk)
    o_ik = i_j * BC + o_c  # [BC] key rows
    m_tq, m_tk = t0 + o_iq < T, t0 + o_ik < T
    if SHIFT:  # Gq_t = G_{t-1} inside the chunk, 0 at its start
        o_ig = o_iq - 1
        m_tg = m_tq & (o_iq > 0)
    else:
        o_ig = o_iq
        m_tg = m_tq
    b_A = tl.zeros([BC, BC], dtype=tl.float32)
    if i_i > i_j:
        i_ref = i_i * BC - 1  # last row of sub-chunk i - 1: Gq_t <= G_ref <= G_s for t in sub-chunk i, s in j
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            m_kt = m_k[:, None] & m_tk[None, :]
            b_q = tl.load(p_q + o_iq[:, None] * (H * K) + o_k[None, :], mask=m_tq[:, None] & m_k[None, :],
                          other=0.0).to(tl.float32)  # [BC, BK]
            b_kt = tl.load(p_k + o_ik[None, :] * (H * K) + o_k[:, None], mask=m_kt, other=0.0).to(tl.float32)
            b_q = _mapped(b_q, m_tq[:, None] & m_k[None, :], QMAP)
            b_kt = _paired(_mapped(b_kt, m_kt, KMAP), p_k2, o_ik[None, :] * (H * K) + o_k[:, None], m_kt, KMAP2)
            if DECAY == 2:
                if SPANS:
                    # Gq_t - G_ref: the log decays of rows i * BC .. o_ig[t] (t - 1 if SHIFT), summed down the rows
                    m_gq = (m_tg & (o_ig >= i_i * BC))[:, None] & m_k[None, :]
                    b_dq = tl.cumsum(_floored(tl.load(p_g + o_ig[:, None] * (H * K) + o_k[None, :], mask=m_gq,
                                                      other=0.0)), axis=0)  # [BC, BK]
                    # G_ref - G_s: rows s + 1 .. i * BC - 1, the rest of sub-chunk j (summed up from its end) and the
                    # whole sub-chunks between j and i
                    o_in = o_ik + 1
                    m_gk = m_k[:, None] & ((o_in < (i_j + 1) * BC) & (t0 + o_in < T))[None, :]
                    b_dk = tl.cumsum(_floored(tl.load(p_g + o_in[None, :] * (H * K) + o_k[:, None], mask=m_gk,
                                                      other=0.0)), axis=1, reverse=True)  # [BK, BC]
                    for i_m in range(i_j + 1, i_i):
                        o_im = i_m * BC + o_c
                        m_gm = m_k[:, None] & (t0 + o_im < T)[None, :]
                        b_dk += tl.sum(_floored(tl.load(p_g + o_im[None, :] * (H * K) + o_k[:, None], mask=m_gm,
                                                        other=0.0)), axis=1)[:, None]
                    b_q = b_q * _safe_exp(b_dq)
                    b_kt = b_kt * _safe_exp(b_dk)
                else:
                    b_gq = tl.load(p_g + o_ig[:, None] * (H * K) + o_k[None, :], mask=m_tg[:, None] & m_k[None, :],
                                   other=0.0)  # [BC, BK]
                    b_gk = tl.load(p_g + o_ik[None, :] * (H * K) + o_k[:, None], mask=m_kt, other=0.0)  # [BK, BC]
                    b_gr = tl.load(p_g + i_ref * (H * K) + o_k, mask=m_k & (o_k * 0 + t0 + i_ref < T), other=0.0)
                    b_q = b_q * _decay(b_gq, b_gr[None, :])
                    b_kt = b_kt * _decay(b_gr[:, None], b_gk)
            b_A += tl.dot(b_q, b_kt, input_precision=PREC)
    elif i_i == i_j:
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            b_q = tl.load(p_q + o_iq[:, None] * (H * K) + o_k[None, :], mask=m_tq[:, None] & m_k[None, :],
                          other=0.0).to(tl.float32)  # [BC, BK]
            b_q = _mapped(b_q, m_tq[:, None] & m_k[None, :], QMAP)
            if DECAY == 2:
                if SPANS:
                    # the rows' own log decays (row t holds step o_ig[t]); rows before the sub-chunk are never spanned
                    m_gq = (m_tg & (o_ig >= i_i * BC))[:, None] & m_k[None, :]
                    b_gq = _floored(tl.load(p_g + o_ig[:, None] * (H * K) + o_k[None, :], mask=m_gq, other=0.0))
                    # one key column at a time: Gq_t - G_s summed over the steps s + 1 .. o_ig[t]
                    for c in range(0, BC):
                        i_s = i_i * BC + c
                        m_s = m_k & (o_k * 0 + t0 + i_s < T)
                        b_ks = tl.load(p_k + i_s * (H * K) + o_k, mask=m_s, other=0.0).to(tl.float32)  # [BK]
                        b_ks = _paired(_mapped(b_ks, m_s, KMAP), p_k2, i_s * (H * K) + o_k, m_s, KMAP2)
                        b_span = tl.cumsum(tl.where((o_ig > i_s)[:, None], b_gq, 0.0), axis=0)  # [BC, BK]
                        b_col = tl.sum(b_q * b_ks[None, :] * _safe_exp(b_span), axis=1)  # [BC]
                        b_A += tl.where(o_c[None, :] == c, b_col[:, None], 0.0)
                else:
                    b_gq = tl.load(p_g + o_ig[:, None] * (H * K) + o_k[None, :], mask=m_tg[:, None] & m_k[None, :],
                                   other=0.0)  # [BC, BK] float64: every column's difference needs it exact
                    for c in range(0, BC):  # one key column at a time: exp(Gq_t - G_s) directly, t >= s
                        i_s = i_i * BC + c
                        m_s = m_k & (o_k * 0 + t0 + i_s < T)
                        b_ks = tl.load(p_k + i_s * (H * K) + o_k, mask=m_s, other=0.0).to(tl.float32)  # [BK]
                        b_ks = _paired(_mapped(b_ks, m_s, KMAP), p_k2, i_s * (H * K) + o_k, m_s, KMAP2)
                        b_gs = tl.load(p_g + i_s * (H * K) + o_k, mask=m_s, other=0.0)  # [BK]
                        b_col = tl.sum(b_q * b_ks[None, :] * _decay(b_gq, b_gs[None, :]), axis=1)  # [BC]
                        b_A += tl.where(o_c[None, :] == c, b_col[:, None], 0.0)
            else:
                b_kt = tl.load(p_k + o_ik[None, :] * (H * K) + o_k[:, None], mask=m_k[:, None] & m_tk[None, :],
                               other=0.0).to(tl.float32)
                b_kt = _paired(_mapped(b_kt, m_k[:, None] & m_tk[None, :], KMAP), p_k2,
                               o_ik[None, :] * (H * K) + o_k[:, None], m_k[:, None] & m_tk[None, :], KMAP2)
                b_A += tl.dot(b_q, b_kt, input_precision=PREC)
        if STRICT:
            b_A = tl.where(o_c[:, None] > o_c[None, :], b_A, 0.0)
        else:
            b_A = tl.where(o_c[:, None] >= o_c[None, :], b_A, 0.0)
    # rows t0 + o_iq of A always exist (it has NT * BT rows); blocks above the diagonal are written as zeros
    p_A = A + (i_bh.to(tl.int64) * NT * BT + t0) * BT + o_iq[:, None] * BT + o_ik[None, :]
    tl.store(p_A, b_A, mask=(o_iq[:, None] < BT) & (o_ik[None, :] < BT))


@triton.jit
def _unit_lower_inverse(b_N, o_i, BT: tl.constexpr):
    """(I - N)^-1 for a strictly lower [BT, BT] N, by forward substitution: X = (I - N)^-1 - I is strictly lower
    and its row i is X_i = N_i + sum_{j<i} N_ij X_j (rows above i already hold X when row i is formed)."""
    b_T = b_N
    for i in range(1, BT):
        b_row = tl.sum(tl.where(o_i[:, None] == i, b_T, 0.0), axis=0)
        b_row = b_row + tl.sum(b_row[:, None] * b_T, axis=0)
        b_T = tl.where(o_i[:, None] == i, b_row[None, :], b_T)
    return b_T + tl.where(o_i[:, None] == o_i[None, :], 1.0, 0.0)


@triton.jit
def _delta_wy_kernel(k, y, beta, gc, eg, Akk, w, u, vs, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                     BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr,
                     PREC: tl.constexpr, VSTEP: tl.constexpr):
    """Per chunk: Tm = (I + L)^-1, L_ts = beta_t (k_t . k_s) decayed, s < t; w = Tm (beta k exp(G)), u = Tm y.
    VSTEP (a fused prologue): y_t is vs[t] * y[t] (gated DeltaNet's beta * v), scaled as it is loaded."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    NT = tl.cdiv(T, BT)
    t0 = i_n * BT
    bos = (i_b.to(tl.int64) * T + t0) * H + i_h
    o_i = tl.arange(0, BT)
    m_t = t0 + o_i < T
    b_beta = tl.load(beta + bos + o_i * H, mask=m_t, other=0.0).to(tl.float32)  # [BT]
    if DECAY == 1:
        b_g = tl.load(gc + bos + o_i * H, mask=m_t, other=0.0)  # [BT]
    # decayed k_t . k_s [BT, BT] (only s < t is used)
    if DECAY == 2:
        p_A = Akk + (i_bh.to(tl.int64) * NT * BT + t0) * BT + o_i[:, None] * BT + o_i[None, :]
        b_A = tl.load(p_A, mask=(o_i[:, None] < BT) & (o_i[None, :] < BT), other=0.0)
    else:
        b_A = tl.zeros([BT, BT], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            b_k = tl.load(k + bos * K + o_i[:, None] * (H * K) + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                          other=0.0).to(tl.float32)  # [BT, BK]
            b_kt = tl.load(k + bos * K + o_i[None, :] * (H * K) + o_k[:, None], mask=m_k[:, None] & m_t[None, :],
                           other=0.0).to(tl.float32)  # [BK, BT]
            b_A += tl.dot(b_k, b_kt, input_precision=PREC)
        if DECAY == 1:
            b_A = b_A * _decay(b_g[:, None], b_g[None, :])
    b_L = tl.where(o_i[:, None] > o_i[None, :], b_beta[:, None] * b_A, 0.0)
    b_T = _unit_lower_inverse(-b_L, o_i, BT)  # Tm = (I + L)^-1
    # w = Tm (beta_t k_t exp(G_t))  [BT, K]
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m = m_t[:, None] & (o_k < K)[None, :]
        offs = bos * K + o_i[:, None] * (H * K) + o_k[None, :]
        b_k = tl.load(k + offs, mask=m, other=0.0).to(tl.float32)
        if DECAY == 1:
            b_k = b_k * (b_beta * _safe_exp(b_g.to(tl.float32)))[:, None]
        elif DECAY == 2:
            b_k = b_k * tl.load(eg + offs, mask=m, other=1.0) * b_beta[:, None]
        else:
            b_k = b_k * b_beta[:, None]
        tl.store(w + offs, tl.dot(b_T, b_k, input_precision=PREC), mask=m)
    # uy = Tm y  [BT, V]
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m = m_t[:, None] & (o_v < V)[None, :]
        offs = bos * V + o_i[:, None] * (H * V) + o_v[None, :]
        b_y = tl.load(y + offs, mask=m, other=0.0).to(tl.float32)
        if VSTEP:
            b_y = b_y * tl.load(vs + bos + o_i * H, mask=m_t, other=0.0).to(tl.float32)[:, None]
        tl.store(u + offs, tl.dot(b_T, b_y, input_precision=PREC), mask=m)


@triton.jit
def _dplr_wy_kernel(a, b, k, v, gc, eg, Aab, Aak, w, u, b2, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr, PREC: tl.constexpr,
                    BMAP: tl.constexpr = None):
    """Diagonal plus rank one, per chunk: Tm = (I - L)^-1 with L_ts = (a_t . b_s) decayed from s to t - 1 (s < t),
    M_ts the same for a_t . k_s; w = -Tm (a exp(G_{t-1})) and u = Tm M v (the pseudo-values' parts, U = u - w S0
    in `_delta_state_kernel`). A key decay's L and M come from `_intra_attn_kernel` (Aab, Aak), others' are formed
    here from a b^T and a k^T. BMAP (`_paired`): b is BMAP(b, b2) of two raw inputs (`_Fused.b_map`)."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    NT = tl.cdiv(T, BT)
    t0 = i_n * BT
    bos = (i_b.to(tl.int64) * T + t0) * H + i_h
    o_i = tl.arange(0, BT)
    m_t = t0 + o_i < T
    m_tg = m_t & (o_i > 0)  # G_{t-1} inside the chunk, 0 (no decay) at its start
    if DECAY == 1:
        b_gq = tl.load(gc + bos + (o_i - 1) * H, mask=m_tg, other=0.0)  # [BT] G_{t-1}
        b_g = tl.load(gc + bos + o_i * H, mask=m_t, other=0.0)  # [BT]
    if DECAY == 2:
        p_A = (i_bh.to(tl.int64) * NT * BT + t0) * BT + o_i[:, None] * BT + o_i[None, :]
        m_A = (o_i[:, None] < BT) & (o_i[None, :] < BT)
        b_L = tl.load(Aab + p_A, mask=m_A, other=0.0)
        b_M = tl.load(Aak + p_A, mask=m_A, other=0.0)
    else:
        b_L = tl.zeros([BT, BT], dtype=tl.float32)
        b_M = tl.zeros([BT, BT], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            b_a = tl.load(a + bos * K + o_i[:, None] * (H * K) + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                          other=0.0).to(tl.float32)  # [BT, BK]
            p_kt = bos * K + o_i[None, :] * (H * K) + o_k[:, None]  # [BK, BT] offsets of a transposed key
            m_kt = m_k[:, None] & m_t[None, :]
            b_bt = _paired(tl.load(b + p_kt, mask=m_kt, other=0.0).to(tl.float32), b2, p_kt, m_kt, BMAP)
            b_L += tl.dot(b_a, b_bt, input_precision=PREC)
            b_M += tl.dot(b_a, tl.load(k + p_kt, mask=m_kt, other=0.0).to(tl.float32), input_precision=PREC)
        if DECAY == 1:
            b_L = b_L * _decay(b_gq[:, None], b_g[None, :])
            b_M = b_M * _decay(b_gq[:, None], b_g[None, :])
        b_L = tl.where(o_i[:, None] > o_i[None, :], b_L, 0.0)
        b_M = tl.where(o_i[:, None] > o_i[None, :], b_M, 0.0)
    b_T = _unit_lower_inverse(b_L, o_i, BT)  # Tm = (I - L)^-1
    # w = -Tm (a_t exp(G_{t-1}))  [BT, K]
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m = m_t[:, None] & (o_k < K)[None, :]
        offs = bos * K + o_i[:, None] * (H * K) + o_k[None, :]
        b_a = tl.load(a + offs, mask=m, other=0.0).to(tl.float32)
        if DECAY == 1:
            b_a = b_a * _safe_exp(b_gq.to(tl.float32))[:, None]
        elif DECAY == 2:
            b_a = b_a * tl.load(eg + offs - H * K, mask=m_tg[:, None] & (o_k < K)[None, :], other=1.0)
        tl.store(w + offs, -tl.dot(b_T, b_a, input_precision=PREC), mask=m)
    # u = (Tm M) v  [BT, V]
    b_TM = tl.dot(b_T, b_M, input_precision=PREC)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m = m_t[:, None] & (o_v < V)[None, :]
        offs = bos * V + o_i[:, None] * (H * V) + o_v[None, :]
        b_v = tl.load(v + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(u + offs, tl.dot(b_TM, b_v, input_precision=PREC), mask=m)


@triton.jit
def _chunk_range(offsets, i_b, i_h, i_bh, T, NT, VARLEN: tl.constexpr):
    """The chunks a state-passing program walks, (first, end, the state row, the row's first step): all NT chunks
    of batch row i_b, or with VARLEN (packed sequences, `_Packed`) sequence i_b's chunks offsets[i_b] ..
    offsets[i_b + 1] - 1 of the one packed row, whose states are [1, H, NT, ...] (row i_h)."""
    if VARLEN:
        # (the grid has one program per sequence, so both loads are in bounds: the mask is the GPU rule's form)
        c0 = tl.load(offsets + i_b, mask=i_b >= 0, other=0)
        c1 = tl.load(offsets + i_b + 1, mask=i_b >= 0, other=0)
        i_row = i_h
        bt0 = 0
    else:
        c0 = 0
        c1 = NT
        i_row = i_bh
        bt0 = i_b.to(tl.int64) * T
    return c0, c1, i_row, bt0


@_register_limited()
# unasked, ptxas spilled 8 B in normalized_linear_attention's (168 registers, its cap at 4 warps) and kept a stack
# slot in mlstm's (80 registers), sm_80, bfloat16, K = V = 64 and 128 (benchmarks/kernel_matrix.py)
@triton.jit
def _chunk_state_kernel(k, v, gc, h, h0, ht, offsets, vs, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                        NT, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr,
                        USE_H0: tl.constexpr, STORE_HT: tl.constexpr, PREC: tl.constexpr, VARLEN: tl.constexpr,
                        VSTEP: tl.constexpr, KMAP: tl.constexpr = None, VSMAP: tl.constexpr = None):
    """State passing over the chunks of one (BK tile, BV tile, batch*head), the state in float32 registers.

    h[bh, n] = state entering chunk n; S <- exp(G_last) S + (k exp(G_last - G))^T v (decay on the matching axis).
    VARLEN (packed sequences, `_Packed`): i_bh is (sequence, head) of one packed row whose sequences start at chunk
    boundaries; the program walks chunks offsets[seq] .. offsets[seq + 1] - 1 from h0[seq] and stores ht[seq].
    VSTEP (a fused prologue): v_t is vs[t] * v[t], a per-step scalar (a factor of k_t v_t^T: Mamba2's dt), scaled
    as it is loaded; KMAP (`_mapped`): the spec's elementwise map of the raw k, applied as it is loaded; VSMAP:
    that of the raw per-step input vs holds (mLSTM's exp(ig) of ig), applied as vs is loaded.
    A key decay (DECAY 2) reads the log decays themselves from gc, not G: G_last - G_s is their float32 sum over
    s + 1 .. last (a reverse cumulative sum), G_last their sum over the chunk (`_linear_forward`).
    """
    i_kt, i_vt, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    c0, c1, i_row, bt0 = _chunk_range(offsets, i_b, i_h, i_bh, T, NT, VARLEN)  # VARLEN: h is [1, H, NT, K, V]
    o_i = tl.arange(0, BT)
    o_k = i_kt * BK + tl.arange(0, BK)
    o_v = i_vt * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]  # [BK, BV]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_bh.to(tl.int64) * (K * V) + o_kv, mask=m_kv, other=0.0).to(tl.float32)
    for i_n in range(c0, c1):
        tl.store(h + (i_row.to(tl.int64) * NT + i_n) * (K * V) + o_kv, b_h, mask=m_kv)
        t0 = i_n * BT
        bos = (bt0 + t0) * H + i_h
        m_t = t0 + o_i < T
        i_last = tl.minimum(BT, T - t0) - 1  # last valid row of the chunk
        m_kt = m_k[:, None] & m_t[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        p_kt = bos * K + o_i[None, :] * (H * K) + o_k[:, None]  # [BK, BT] offsets of k^T
        p_tv = bos * V + o_i[:, None] * (H * V) + o_v[None, :]  # [BT, BV] offsets of v
        b_kt = tl.load(k + p_kt, mask=m_kt, other=0.0).to(tl.float32)
        b_kt = _mapped(b_kt, m_kt, KMAP)
        b_v = tl.load(v + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        if VSTEP:
            b_vs = _mapped(tl.load(vs + bos + o_i * H, mask=m_t, other=0.0).to(tl.float32), m_t, VSMAP)
            b_v = b_v * b_vs[:, None]
        if DECAY == 1:
            b_gl = tl.load(gc + bos + i_last * H, mask=i_last >= 0, other=0.0)
            b_g = tl.load(gc + bos + o_i * H, mask=m_t, other=0.0)  # [BT]
            b_kt = b_kt * _decay(b_gl, b_g)[None, :]
            b_h = b_h * tl.exp(b_gl.to(tl.float32))
        elif DECAY == 2:
            m_kn = m_k[:, None] & ((o_i + 1 < BT) & (t0 + o_i + 1 < T))[None, :]
            b_gn = _floored(tl.load(gc + p_kt + H * K, mask=m_kn, other=0.0))  # [BK, BT] the log decay of step s + 1
            b_kt = b_kt * _safe_exp(tl.cumsum(b_gn, axis=1, reverse=True))  # exp(G_last - G_s)
            b_gl = tl.sum(_floored(tl.load(gc + p_kt, mask=m_kt, other=0.0)), axis=1)  # [BK] G_last
            b_h = b_h * _safe_exp(b_gl)[:, None]
        elif DECAY == 3:
            b_gl = tl.load(gc + bos * V + i_last * (H * V) + o_v, mask=m_v, other=0.0)  # [BV]
            b_g = tl.load(gc + p_tv, mask=m_tv, other=0.0)  # [BT, BV]
            b_v = b_v * _decay(b_gl[None, :], b_g)
            b_h = b_h * tl.exp(b_gl.to(tl.float32))[None, :]
        b_h += tl.dot(b_kt, b_v, input_precision=PREC)
    if STORE_HT:
        tl.store(ht + i_bh.to(tl.int64) * (K * V) + o_kv, b_h, mask=m_kv)


# The delta rule's state kernel holds whole columns of S (U = Uy - W S reads all K rows of a column) as NK <= 4
# row blocks of KB rows, each its own [KB, BV] tile (b_h1 .. b_h4), so every tl.dot and every k / w tile is
# [BT, KB] or [KB, BT] and is loaded just before its use: no [BT, K] tile is ever live (flash-linear-attention's
# chunk_gated_delta_rule_fwd_h splits K the same way). The helpers below work on one row block.


@triton.jit
def _block_load(p, i_kb, o_v, m_v, K: tl.constexpr, V: tl.constexpr, KB: tl.constexpr):
    """Rows i_kb * KB .. + KB of a [K, V] float32 matrix at p, columns o_v."""
    o_k = i_kb * KB + tl.arange(0, KB)
    return tl.load(p + o_k[:, None] * V + o_v[None, :], mask=(o_k < K)[:, None] & m_v[None, :], other=0.0)


@triton.jit
def _block_store(p, b, i_kb, o_v, m_v, K: tl.constexpr, V: tl.constexpr, KB: tl.constexpr):
    o_k = i_kb * KB + tl.arange(0, KB)
    tl.store(p + o_k[:, None] * V + o_v[None, :], b, mask=(o_k < K)[:, None] & m_v[None, :])


@triton.jit
def _delta_ws(w, b_h, bos, o_i, m_t, i_kb, H: tl.constexpr, K: tl.constexpr, KB: tl.constexpr,
              PREC: tl.constexpr):
    """W[:, block] @ S[block, :] for one chunk ([BT, BV]): the block's share of W S."""
    o_k = i_kb * KB + tl.arange(0, KB)
    b_w = tl.load(w + bos * K + o_i[:, None] * (H * K) + o_k[None, :], mask=m_t[:, None] & (o_k < K)[None, :],
                  other=0.0).to(tl.float32)  # [BT, KB] (W is stored in a half input's dtype)
    return tl.dot(b_w, b_h, input_precision=PREC)


@triton.jit
def _delta_h_update(k, gc, b_h, b_u, bos, o_i, m_t, i_last, i_kb, H: tl.constexpr, K: tl.constexpr,
                    KB: tl.constexpr, DECAY: tl.constexpr, PREC: tl.constexpr):
    """S[block] <- D S[block] + (k exp(G_last - G))[:, block]^T U (a scalar decay is already in S and U)."""
    o_k = i_kb * KB + tl.arange(0, KB)
    m_k = o_k < K
    m_kt = m_k[:, None] & m_t[None, :]
    p_kt = bos * K + o_i[None, :] * (H * K) + o_k[:, None]  # [KB, BT] offsets of k^T
    b_kt = tl.load(k + p_kt, mask=m_kt, other=0.0).to(tl.float32)
    if DECAY == 2:
        b_gl = tl.load(gc + bos * K + i_last * (H * K) + o_k, mask=m_k, other=0.0)  # [KB]
        b_g = tl.load(gc + p_kt, mask=m_kt, other=0.0)  # [KB, BT]
        b_kt = b_kt * _decay(b_gl[:, None], b_g)
        b_h = b_h * tl.exp(b_gl.to(tl.float32))[:, None]
    return b_h + tl.dot(b_kt, b_u, input_precision=PREC)


@triton.jit
def _dplr_h_update(b, k, gc, b_h, b_u, b_v, bos, o_i, m_t, i_last, i_kb, H: tl.constexpr, K: tl.constexpr,
                   KB: tl.constexpr, DECAY: tl.constexpr, PREC: tl.constexpr, b2, BMAP: tl.constexpr):
    """S[block] <- D S[block] + (b exp(G_last - G))[:, block]^T U + (k exp(G_last - G))[:, block]^T v: the delta
    update with the diagonal-plus-rank-one step's own k v^T beside it, both keys decayed by one factor tile (a
    scalar decay is already in S, U and v). BMAP (`_paired`): b is BMAP(b, b2) of two raw inputs."""
    o_k = i_kb * KB + tl.arange(0, KB)
    m_k = o_k < K
    m_kt = m_k[:, None] & m_t[None, :]
    p_kt = bos * K + o_i[None, :] * (H * K) + o_k[:, None]  # [KB, BT] offsets of b^T and k^T
    b_bt = _paired(tl.load(b + p_kt, mask=m_kt, other=0.0).to(tl.float32), b2, p_kt, m_kt, BMAP)
    if DECAY == 2:
        b_gl = tl.load(gc + bos * K + i_last * (H * K) + o_k, mask=m_k, other=0.0)  # [KB]
        b_dec = _decay(b_gl[:, None], tl.load(gc + p_kt, mask=m_kt, other=0.0))  # [KB, BT]
        b_h = b_h * tl.exp(b_gl.to(tl.float32))[:, None] + tl.dot(b_bt * b_dec, b_u, input_precision=PREC)
        b_kt = tl.load(k + p_kt, mask=m_kt, other=0.0).to(tl.float32) * b_dec  # (loaded once b's tile is spent)
    else:
        b_h = b_h + tl.dot(b_bt, b_u, input_precision=PREC)
        b_kt = tl.load(k + p_kt, mask=m_kt, other=0.0).to(tl.float32)
    return b_h + tl.dot(b_kt, b_v, input_precision=PREC)


@triton.jit
def _delta_state_kernel(k, u, gc, w, h, h0, ht, offsets, k2, v2, b2, T, H: tl.constexpr, K: tl.constexpr,
                        V: tl.constexpr, NT, BT: tl.constexpr, KB: tl.constexpr, NK: tl.constexpr, BV: tl.constexpr,
                        DECAY: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr, PREC: tl.constexpr,
                        VARLEN: tl.constexpr, DPLR: tl.constexpr, BMAP: tl.constexpr = None):
    """Delta rule: state passing over the chunks of one (BV tile, batch*head), whole columns of S in NK <= 4
    row blocks of KB rows (NK * KB >= K). u holds Uy and is overwritten in place by U = Uy - W S; then
    S <- exp(G_last) S + (k exp(G_last - G))^T U. h[bh, n] = state entering chunk n. VARLEN: as in
    _chunk_state_kernel (one program per (sequence, head), its chunks offsets[seq] .. offsets[seq + 1] - 1).
    DPLR (the diagonal-plus-rank-one class, `chunked_dplr_by`: k holds its b, W its -W): the step's own key and
    value add (k2 exp(G_last - G))^T v2 to every chunk's update; BMAP (`_paired`): its b is BMAP(k, b2)."""
    i_vt, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    c0, c1, i_row, bt0 = _chunk_range(offsets, i_b, i_h, i_bh, T, NT, VARLEN)  # VARLEN: h is [1, H, NT, K, V]
    o_i = tl.arange(0, BT)
    o_v = i_vt * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_h1 = tl.zeros([KB, BV], dtype=tl.float32)
    if NK > 1:
        b_h2 = tl.zeros([KB, BV], dtype=tl.float32)
    if NK > 2:
        b_h3 = tl.zeros([KB, BV], dtype=tl.float32)
        b_h4 = tl.zeros([KB, BV], dtype=tl.float32)
    if USE_H0:
        p_h0 = h0 + i_bh.to(tl.int64) * (K * V)
        b_h1 += _block_load(p_h0, 0, o_v, m_v, K, V, KB)
        if NK > 1:
            b_h2 += _block_load(p_h0, 1, o_v, m_v, K, V, KB)
        if NK > 2:
            b_h3 += _block_load(p_h0, 2, o_v, m_v, K, V, KB)
            b_h4 += _block_load(p_h0, 3, o_v, m_v, K, V, KB)
    for i_n in range(c0, c1):
        p_hn = h + (i_row.to(tl.int64) * NT + i_n) * (K * V)
        _block_store(p_hn, b_h1, 0, o_v, m_v, K, V, KB)
        if NK > 1:
            _block_store(p_hn, b_h2, 1, o_v, m_v, K, V, KB)
        if NK > 2:
            _block_store(p_hn, b_h3, 2, o_v, m_v, K, V, KB)
            _block_store(p_hn, b_h4, 3, o_v, m_v, K, V, KB)
        t0 = i_n * BT
        bos = (bt0 + t0) * H + i_h
        m_t = t0 + o_i < T
        i_last = tl.minimum(BT, T - t0) - 1  # last valid row of the chunk
        m_tv = m_t[:, None] & m_v[None, :]
        p_tv = bos * V + o_i[:, None] * (H * V) + o_v[None, :]  # [BT, BV] offsets of u
        b_u = tl.load(u + p_tv, mask=m_tv, other=0.0).to(tl.float32) - _delta_ws(w, b_h1, bos, o_i, m_t, 0, H, K,
                                                                                 KB, PREC)
        if NK > 1:
            b_u -= _delta_ws(w, b_h2, bos, o_i, m_t, 1, H, K, KB, PREC)
        if NK > 2:
            b_u -= _delta_ws(w, b_h3, bos, o_i, m_t, 2, H, K, KB, PREC)
            b_u -= _delta_ws(w, b_h4, bos, o_i, m_t, 3, H, K, KB, PREC)
        tl.store(u + p_tv, b_u, mask=m_tv)
        if DPLR:  # the step's own k v^T beside (b, U): (k2 exp(G_last - G))^T v2
            b_v2 = tl.load(v2 + p_tv, mask=m_tv, other=0.0).to(tl.float32)  # [BT, BV]
        if DECAY == 1:  # a scalar decay: exp(G_last - G_t) on the rows of U, exp(G_last) on S
            b_gl = tl.load(gc + bos + i_last * H, mask=i_last >= 0, other=0.0)
            b_g = tl.load(gc + bos + o_i * H, mask=m_t, other=0.0)  # [BT]
            b_u = b_u * _decay(b_gl, b_g)[:, None]
            if DPLR:
                b_v2 = b_v2 * _decay(b_gl, b_g)[:, None]
            b_dh = tl.exp(b_gl.to(tl.float32))
            b_h1 = b_h1 * b_dh
            if NK > 1:
                b_h2 = b_h2 * b_dh
            if NK > 2:
                b_h3 = b_h3 * b_dh
                b_h4 = b_h4 * b_dh
        if DPLR:
            b_h1 = _dplr_h_update(k, k2, gc, b_h1, b_u, b_v2, bos, o_i, m_t, i_last, 0, H, K, KB, DECAY, PREC, b2,
                                  BMAP)
            if NK > 1:
                b_h2 = _dplr_h_update(k, k2, gc, b_h2, b_u, b_v2, bos, o_i, m_t, i_last, 1, H, K, KB, DECAY, PREC, b2,
                                      BMAP)
            if NK > 2:
                b_h3 = _dplr_h_update(k, k2, gc, b_h3, b_u, b_v2, bos, o_i, m_t, i_last, 2, H, K, KB, DECAY, PREC, b2,
                                      BMAP)
                b_h4 = _dplr_h_update(k, k2, gc, b_h4, b_u, b_v2, bos, o_i, m_t, i_last, 3, H, K, KB, DECAY, PREC, b2,
                                      BMAP)
        else:
            b_h1 = _delta_h_update(k, gc, b_h1, b_u, bos, o_i, m_t, i_last, 0, H, K, KB, DECAY, PREC)
            if NK > 1:
                b_h2 = _delta_h_update(k, gc, b_h2, b_u, bos, o_i, m_t, i_last, 1, H, K, KB, DECAY, PREC)
            if NK > 2:
                b_h3 = _delta_h_update(k, gc, b_h3, b_u, bos, o_i, m_t, i_last, 2, H, K, KB, DECAY, PREC)
                b_h4 = _delta_h_update(k, gc, b_h4, b_u, bos, o_i, m_t, i_last, 3, H, K, KB, DECAY, PREC)
    if STORE_HT:
        p_ht = ht + i_bh.to(tl.int64) * (K * V)
        _block_store(p_ht, b_h1, 0, o_v, m_v, K, V, KB)
        if NK > 1:
            _block_store(p_ht, b_h2, 1, o_v, m_v, K, V, KB)
        if NK > 2:
            _block_store(p_ht, b_h3, 2, o_v, m_v, K, V, KB)
            _block_store(p_ht, b_h4, 3, o_v, m_v, K, V, KB)


@_register_limited(lambda a: (a["DECAY"] == 2 or a["PREC"] == "ieee") and not a.get("TRANS_H", False))
# a key decay's output (q, exp(G) and S tiles in the K loop): unasked, 8 B spilled (float16, sm_80, K = V = 128); the
# value decay's dq in the backward (TRANS_H) compiles clean without the limit (80 registers, sm_80, K = V = 128).
# Under ieee dots (float32; 8 warps, `_chunk_output`) unasked ptxas stopped Mamba2's at 168 registers at 4 warps and
# spilled 16 B (sm_90, K = V = 128, BK = BV = 32); its backward dq (TRANS_H) runs clean unasked at 202 registers and
# spilled 16 B with the limit
@triton.jit
def _chunk_output_kernel(q, k, v, gc, eg, h, A, o, k2, v2, A2, b2, vs, sx, sw, ox, scale, T, H: tl.constexpr,
                         K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                         DECAY: tl.constexpr, EXCLUSIVE: tl.constexpr, PREC: tl.constexpr, DPLR: tl.constexpr,
                         VSTEP: tl.constexpr, SKIP: tl.constexpr, SPANS: tl.constexpr = False,
                         QMAP: tl.constexpr = None, KMAP: tl.constexpr = None, TRANS_H: tl.constexpr = False,
                         VMAP: tl.constexpr = None, OVJP: tl.constexpr = None, SKIP_STEP: tl.constexpr = False,
                         VSMAP: tl.constexpr = None, BMAP: tl.constexpr = None, BONUS: tl.constexpr = False):
    """o = (q * exp(Gq)) @ S_start + (A masked) @ v for one (BV tile, chunk, batch*head); decay None/scalar/key.
    DPLR: a second key / value pair adds (A2 masked) @ v2, A2 = q k2^T decayed like A (read from A2 for a key
    decay): the diagonal-plus-rank-one class's b / U pair beside its k / v; BMAP (`_paired`): k2 is BMAP(k2, b2)
    of two raw inputs (`_Fused.b_map`).

    The fused prologue and epilogue (the spec's per-step expressions, applied at the loads and the store instead of
    as [B, T, H, ...] torch tensors): VSTEP v_t is vs[t] * v[t]; the result is stored as scale * o (the readout's
    constant factor, K ** -0.5), plus with SKIP sw[h] * sx[t] (a per-head weight times a per-step input: Mamba2's
    D * x; with SKIP_STEP sw[t], a weight per step [B, T, H]: RWKV-6's bonus sum(r * u * k) * v; with BONUS the
    weight per step sum_i q_t[i] sw[h, i] k_t[i], RWKV's current-token bonus with sw its u [H, K], summed here over
    the K tiles from the q and k the kernel loads, so no [B, T, H] weight is computed before it); QMAP, KMAP
    (`_mapped`) the spec's elementwise maps of the raw q and k, applied as they are loaded.
    SPANS (a key decay): gc holds the log decays themselves and exp(Gq) comes from their float32 sum over the
    chunk's steps up to t (t - 1 if EXCLUSIVE), not from eg.
    TRANS_H: h holds [V, K] matrices, read as S_start^T in place (the backward's dq: this kernel's K and V are the
    state's V and K, `_linear_backward`), so no transposed copy of h is made.
    VMAP, OVJP (the backward's dq of a mapped query, whose v is the raw k): VMAP maps v as it is loaded; the result
    is stored as OVJP(ox, o), the raw query ox's gradient (a printed derivative helper, grad * map'(x))."""
    i_vt, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    NT = tl.cdiv(T, BT)
    t0 = i_n * BT
    bos = (i_b.to(tl.int64) * T + t0) * H + i_h
    o_i = tl.arange(0, BT)
    m_t = t0 + o_i < T
    if EXCLUSIVE:  # Gq_t = G_{t-1} inside the chunk, 0 at its start
        o_ig = o_i - 1
        m_tg = m_t & (o_i > 0)
    else:
        o_ig = o_i
        m_tg = m_t
    o_v = i_vt * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    if DPLR:
        b_A2 = tl.zeros([BT, BT], dtype=tl.float32)
    if BONUS:
        b_bonus = tl.zeros([BT], dtype=tl.float32)
    p_h = h + (i_bh.to(tl.int64) * NT + i_n) * (K * V)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_q = tl.load(q + bos * K + o_i[:, None] * (H * K) + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                      other=0.0).to(tl.float32)  # [BT, BK]
        b_q = _mapped(b_q, m_t[:, None] & m_k[None, :], QMAP)
        if BONUS:  # the skip weight sum_i q_t[i] u[i] k_t[i], one K tile at a time
            b_kq = tl.load(k + bos * K + o_i[:, None] * (H * K) + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                           other=0.0).to(tl.float32)  # [BT, BK]
            b_uk = tl.load(sw + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)  # [BK]
            b_bonus += tl.sum(b_q * b_kq * b_uk[None, :], axis=1)
        if TRANS_H:  # element (k, v) of a stored [V, K] matrix
            p_hkv = p_h + o_v[None, :] * K + o_k[:, None]
        else:
            p_hkv = p_h + o_k[:, None] * V + o_v[None, :]
        b_h = tl.load(p_hkv, mask=m_k[:, None] & m_v[None, :],
                      other=0.0).to(tl.float32)  # (bfloat16 or float32 for bfloat16: `_chunk_states`)
        if DECAY == 2:
            if SPANS:  # exp(Gq): the log decays of steps 0 .. o_ig[t] summed down the chunk
                b_eq = _safe_exp(tl.cumsum(_floored(tl.load(gc + bos * K + o_ig[:, None] * (H * K) + o_k[None, :],
                                                            mask=m_tg[:, None] & m_k[None, :], other=0.0)), axis=0))
                b_o += tl.dot(b_q * b_eq, b_h, input_precision=PREC)
            else:  # exp(Gq) from the cumsum kernel (float32: half the registers of float64 G)
                b_eq = tl.load(eg + bos * K + o_ig[:, None] * (H * K) + o_k[None, :],
                               mask=m_tg[:, None] & m_k[None, :], other=1.0)
                b_o += tl.dot(b_q * b_eq, b_h, input_precision=PREC)
        else:
            b_kt = tl.load(k + bos * K + o_i[None, :] * (H * K) + o_k[:, None], mask=m_k[:, None] & m_t[None, :],
                           other=0.0).to(tl.float32)  # [BK, BT]
            b_kt = _mapped(b_kt, m_k[:, None] & m_t[None, :], KMAP)
            b_o += tl.dot(b_q, b_h, input_precision=PREC)
            b_A += tl.dot(b_q, b_kt, input_precision=PREC)
            if DPLR:
                p_k2t = bos * K + o_i[None, :] * (H * K) + o_k[:, None]
                b_k2t = _paired(tl.load(k2 + p_k2t, mask=m_k[:, None] & m_t[None, :], other=0.0).to(tl.float32), b2,
                                p_k2t, m_k[:, None] & m_t[None, :], BMAP)  # [BK, BT]
                b_A2 += tl.dot(b_q, b_k2t, input_precision=PREC)
    if DECAY == 2:
        p_A = (i_bh.to(tl.int64) * NT * BT + t0) * BT + o_i[:, None] * BT + o_i[None, :]
        b_A = tl.load(A + p_A, mask=(o_i[:, None] < BT) & (o_i[None, :] < BT), other=0.0)
        if DPLR:
            b_A2 = tl.load(A2 + p_A, mask=(o_i[:, None] < BT) & (o_i[None, :] < BT), other=0.0)
    else:
        if DECAY == 1:
            b_gq = tl.load(gc + bos + o_ig * H, mask=m_tg, other=0.0)  # [BT]
            b_g = tl.load(gc + bos + o_i * H, mask=m_t, other=0.0)  # [BT]
            b_o = b_o * _safe_exp(b_gq.to(tl.float32))[:, None]
            b_A = b_A * _decay(b_gq[:, None], b_g[None, :])
            if DPLR:
                b_A2 = b_A2 * _decay(b_gq[:, None], b_g[None, :])
        if EXCLUSIVE:
            m_A = o_i[:, None] > o_i[None, :]
        else:
            m_A = o_i[:, None] >= o_i[None, :]
        b_A = tl.where(m_A, b_A, 0.0)
        if DPLR:
            b_A2 = tl.where(m_A, b_A2, 0.0)
    m_tv = m_t[:, None] & m_v[None, :]
    p_tv = bos * V + o_i[:, None] * (H * V) + o_v[None, :]
    b_v = _mapped(tl.load(v + p_tv, mask=m_tv, other=0.0).to(tl.float32), m_tv, VMAP)
    if VSTEP:  # (VSMAP: vs holds the raw input of a per-step factor, mapped as loaded, as in _chunk_state_kernel)
        b_vs = _mapped(tl.load(vs + bos + o_i * H, mask=m_t, other=0.0).to(tl.float32), m_t, VSMAP)
        b_v = b_v * b_vs[:, None]
    b_o += tl.dot(b_A, b_v, input_precision=PREC)
    if DPLR:
        b_v2 = tl.load(v2 + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        b_o += tl.dot(b_A2, b_v2, input_precision=PREC)
    b_o = b_o * scale
    if SKIP:
        if BONUS:
            b_sw = b_bonus[:, None]  # [BT, 1]
        elif SKIP_STEP:
            b_sw = tl.load(sw + bos + o_i * H, mask=m_t, other=0.0).to(tl.float32)[:, None]  # [BT, 1]
        else:
            b_sw = tl.load(sw + i_h, mask=i_h < H, other=0.0).to(tl.float32)
        b_o += b_sw * tl.load(sx + p_tv, mask=m_tv, other=0.0).to(tl.float32)
    if OVJP is not None:
        b_o = OVJP(tl.load(ox + p_tv, mask=m_tv, other=0.0).to(tl.float32), b_o)
    tl.store(o + p_tv, b_o.to(o.dtype.element_ty), mask=m_tv)


@triton.jit
def _chunk_output_value_kernel(q, v, gc, h, A, o, ox, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                               BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                               NC: tl.constexpr, EXCLUSIVE: tl.constexpr, PREC: tl.constexpr,
                               TRANS_H: tl.constexpr = False, VMAP: tl.constexpr = None, OVJP: tl.constexpr = None):
    """Value decay, one BC-row query sub-chunk i of chunk n per program (A = causal q k^T from _intra_attn_kernel):
    o_t = exp(Gq_t) * (q_t @ S_start) + sum_{s <= t} A_ts exp(Gq_t - G_s) * v_s, all exponents <= 0.
    TRANS_H: h holds [V, K] matrices, read as S_start^T in place (the key-decay backward's dq, `_linear_backward`).
    VMAP, OVJP: as in `_chunk_output_kernel` (the key-decay backward's dq of a mapped query, v the raw k)."""
    i_vt, i_nc, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_i = i_nc // NC, i_nc % NC
    i_b, i_h = i_bh // H, i_bh % H
    NT = tl.cdiv(T, BT)
    t0 = i_n * BT
    bos = (i_b.to(tl.int64) * T + t0) * H + i_h
    p_v, p_g = v + bos * V, gc + bos * V
    o_c = tl.arange(0, BC)
    o_it = i_i * BC + o_c  # [BC] query rows (local to the chunk)
    m_t = t0 + o_it < T
    if EXCLUSIVE:
        o_ig = o_it - 1
        m_tg = m_t & (o_it > 0)
    else:
        o_ig = o_it
        m_tg = m_t
    o_v = i_vt * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_tv = m_t[:, None] & m_v[None, :]
    # inter-chunk term
    b_o = tl.zeros([BC, BV], dtype=tl.float32)
    p_h = h + (i_bh.to(tl.int64) * NT + i_n) * (K * V)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_q = tl.load(q + bos * K + o_it[:, None] * (H * K) + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                      other=0.0).to(tl.float32)
        if TRANS_H:  # element (k, v) of a stored [V, K] matrix
            p_hkv = p_h + o_v[None, :] * K + o_k[:, None]
        else:
            p_hkv = p_h + o_k[:, None] * V + o_v[None, :]
        b_h = tl.load(p_hkv, mask=m_k[:, None] & m_v[None, :],
                      other=0.0).to(tl.float32)  # (bfloat16 or float32 for bfloat16: `_chunk_states`)
        b_o += tl.dot(b_q, b_h, input_precision=PREC)
    b_gq = tl.load(p_g + o_ig[:, None] * (H * V) + o_v[None, :], mask=m_tg[:, None] & m_v[None, :],
                   other=0.0)  # [BC, BV] float64, kept for the diagonal sub-block
    b_o = b_o * _safe_exp(b_gq.to(tl.float32))
    p_A = A + (i_bh.to(tl.int64) * NT * BT + t0) * BT + o_it * BT  # [BC] row starts of A
    # earlier sub-chunks j < i, through G at the end of sub-chunk i - 1
    if i_i > 0:
        i_ref = i_i * BC - 1
        b_gr = tl.load(p_g + i_ref * (H * V) + o_v, mask=m_v & (o_v * 0 + t0 + i_ref < T), other=0.0)  # [BV]
        b_off = tl.zeros([BC, BV], dtype=tl.float32)
        for j in range(0, i_i):
            o_is = j * BC + o_c
            m_sv = (t0 + o_is < T)[:, None] & m_v[None, :]
            p_sv = o_is[:, None] * (H * V) + o_v[None, :]
            b_vs = _mapped(tl.load(p_v + p_sv, mask=m_sv, other=0.0).to(tl.float32), m_sv, VMAP)
            b_gs = tl.load(p_g + p_sv, mask=m_sv, other=0.0)
            b_Aj = tl.load(p_A[:, None] + o_is[None, :], mask=(o_c[:, None] < BC) & (o_is[None, :] < BT),
                           other=0.0)  # [BC, BC]
            b_off += tl.dot(b_Aj, b_vs * _decay(b_gr[None, :], b_gs), input_precision=PREC)
        b_o += b_off * _decay(b_gq, b_gr[None, :])
    # diagonal sub-block, one key column at a time (A is already causally masked)
    for c in range(0, BC):
        i_s = i_i * BC + c
        m_s = m_v & (o_v * 0 + t0 + i_s < T)
        b_a = tl.load(p_A + i_s, mask=o_c < BC, other=0.0)  # [BC] column s of A
        b_vs = _mapped(tl.load(p_v + i_s * (H * V) + o_v, mask=m_s, other=0.0).to(tl.float32), m_s, VMAP)  # [BV]
        b_gs = tl.load(p_g + i_s * (H * V) + o_v, mask=m_s, other=0.0)  # [BV]
        b_o += b_a[:, None] * b_vs[None, :] * _decay(b_gq, b_gs[None, :])
    p_tv = bos * V + o_it[:, None] * (H * V) + o_v[None, :]
    if OVJP is not None:
        b_o = OVJP(tl.load(ox + p_tv, mask=m_tv, other=0.0).to(tl.float32), b_o)
    tl.store(o + p_tv, b_o.to(o.dtype.element_ty), mask=m_tv)


# ----------------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------------


def _or(given, default):
    """A launch option: the call's, else the kernel's default."""
    return default if given is None else given


def _arch() -> int:
    """The compute capability Triton compiles for (80 for sm_80) as its active driver reports it; 90 when there is
    none to ask (the interpreter) or it is not a CUDA target. Picks launch defaults that depend on shared memory
    (and the recurrent adjoint's num_warps: codegen/triton_recurrent.py prints this function into its modules)."""
    try:
        arch = triton.runtime.driver.active.get_current_target().arch
    except Exception:  # no active driver (the interpreter on a machine without a GPU)
        return 90
    return arch if isinstance(arch, int) else 90


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(max(int(n), 1)))


def _check_block(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16 (tl.dot needs every dimension >= 16 on a GPU), "
                         f"got {value!r}")


def _check_inputs(queries, k: Tensor, v: Tensor, log_decay, decay_axis, initial_state) -> None:
    """Shapes, decay axis and dtypes (the same rules and messages as the torch runtime)."""
    if decay_axis not in _AXES:
        raise ValueError(f"decay_axis must be one of {_AXES}, got {decay_axis!r}")
    if k.dim() != 4 or v.dim() != 4 or tuple(v.shape[:3]) != tuple(k.shape[:3]):
        raise ValueError(f"k must be [B, T, H, K] and v [B, T, H, V], got {list(k.shape)} and {list(v.shape)}")
    if decay_axis is None:
        if log_decay is not None:
            raise ValueError("log_decay given but decay_axis is None; pass decay_axis='scalar', 'key' or 'value'")
    else:
        if log_decay is None:
            raise ValueError(f"decay_axis={decay_axis!r} needs a log_decay tensor")
        expected = {"scalar": tuple(k.shape[:3]), "key": tuple(k.shape), "value": tuple(v.shape)}[decay_axis]
        if tuple(log_decay.shape) != expected:
            raise ValueError(f"log_decay for decay_axis={decay_axis!r} must have shape {list(expected)}, "
                             f"got {list(log_decay.shape)}")
    for q, _ in queries:
        if tuple(q.shape) != tuple(k.shape):
            raise ValueError(f"every query must have k's shape {list(k.shape)}, got {list(q.shape)}")
    B, _, H, K = k.shape
    if initial_state is not None and tuple(initial_state.shape) != (B, H, K, v.shape[-1]):
        raise ValueError(f"initial_state must have shape {[B, H, K, v.shape[-1]]}, got {list(initial_state.shape)}")
    for name, x in [("k", k), ("v", v)] + [("q", q) for q, _ in queries]:
        if x.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16 or float32 for the Triton runtime, got {x.dtype}")


def _config(k: Tensor, V: int, chunk_size, block_k, block_v, allow_tf32, delta: bool, lane_decay: bool = False):
    """(BT, BK, BV, dot precision) with the defaults filled in and the GPU's rules checked.

    BT = min(chunk_size, pow2(T)): like the torch runtime's C = min(chunk_size, T), a chunk_size >= T gives one
    chunk (the parallel form) without padding it to the full chunk_size. BK defaults to min(64, pow2(K)) (delta:
    pow2(K), the whole of K, which every kernel but the state kernel walks in blocks of KB = `_delta_blocks`),
    BV to min(pow2(V), 64 / 32 / 16 for a K block <= 64 / 128 / more) to bound registers. Under "ieee" dots
    (float32 k, allow_tf32 None or False) the linear form's (not delta) BK and BV default to at most
    _IEEE_LINEAR_BLOCK, BV to _IEEE_LANE_DECAY_BV with a key or value decay (lane_decay); BT is unchanged.
    """
    T, K = k.shape[1], k.shape[-1]
    _check_block("chunk_size", chunk_size)
    BT = min(chunk_size, _pow2_at_least_16(T))
    # CUDA allows 65535 programs on grid axes 1 and 2, where the kernels put B * H and the chunks' 16-step
    # sub-chunks; a layer's call runs in pieces within both (codegen/dispatch.py `in_grid_pieces`)
    if k.shape[0] * k.shape[2] > 65535 or triton.cdiv(T, BT) * max(BT // _SUB, 1) > 65535:
        raise ValueError(f"k {list(k.shape)}: B * H = {k.shape[0] * k.shape[2]} (at most 65535) or T = {T} (at most "
                         f"65535 sub-chunks of {_SUB} steps) is past CUDA's grid limits; split the call (a layer "
                         "does: codegen/dispatch.py in_grid_pieces)")
    if allow_tf32 is None:
        allow_tf32 = k.dtype != torch.float32
    # ieee dots run as FMA loops with whole operand rows in registers: narrower blocks (see _IEEE_LINEAR_BLOCK)
    ieee_linear = not allow_tf32 and not delta
    if block_k is None:
        widest = _IEEE_LINEAR_BLOCK if ieee_linear else 64
        block_k = _pow2_at_least_16(K) if delta else min(widest, _pow2_at_least_16(K))
    _check_block("block_k", block_k)
    if block_v is None:
        kb = _delta_blocks(block_k)[0] if delta else block_k
        block_v = min(_pow2_at_least_16(V), 64 if kb <= 64 else (32 if kb <= 128 else 16))
        if ieee_linear:
            block_v = min(block_v, _IEEE_LANE_DECAY_BV if lane_decay else _IEEE_LINEAR_BLOCK)
    _check_block("block_v", block_v)
    if delta and block_k < K:
        raise ValueError(f"chunked_delta needs block_k >= K (the state program holds whole columns of S to form "
                         f"U = Uy - W S), got block_k={block_k} < K={K}")
    return BT, block_k, block_v, ("tf32" if allow_tf32 else "ieee")


def _delta_ieee_defaults(k: Tensor, chunk_size: int, num_warps: int | None, num_stages: int | None,
                         allow_tf32: bool | None) -> tuple[int, int | None, int | None]:
    """(chunk_size, num_warps, num_stages) of a delta-rule call (chunked_delta_by): under "ieee" dots (allow_tf32
    False, or None with float32 k) the chunk is at most _IEEE_DELTA_BT steps and num_warps / num_stages default to
    _IEEE_DELTA_WARPS / _IEEE_DELTA_STAGES (a given one is kept), so that no kernel spills registers (see the
    constants); with tf32 dots (half-precision inputs) all three come back as given. Raises ValueError for a
    chunk_size that is not a power of two >= 16 (checked before the cap, so a bad one is never hidden)."""
    _check_block("chunk_size", chunk_size)
    if allow_tf32 or (allow_tf32 is None and k.dtype != torch.float32):
        return chunk_size, num_warps, num_stages
    return (delta_chunk(chunk_size, allow_tf32, k.dtype), _or(num_warps, _IEEE_DELTA_WARPS),
            _or(num_stages, _IEEE_DELTA_STAGES))


def delta_chunk(chunk_size: int, allow_tf32: bool | None, dtype: torch.dtype = torch.float32) -> int:
    """The chunk length a delta-rule call (chunked_delta_by) of `chunk_size` runs: at most _IEEE_DELTA_BT steps under
    "ieee" dots (allow_tf32 False, or None with `dtype` float32 inputs), else chunk_size. A layer reports it
    (codegen/dispatch.py `chunk_run`, the Triton chunked form of a delta-rule spec; `Layer.config_for`)."""
    ieee = not allow_tf32 and (allow_tf32 is not None or dtype == torch.float32)
    return min(chunk_size, _IEEE_DELTA_BT) if ieee else chunk_size


class _Packed:
    """Packed sequences (`cu_seqlens`) laid out for the chunked kernels, as index tables built once per call.

    Each sequence is moved to start at a chunk boundary of one packed row of NT chunks of BT steps (its last chunk
    filled up with zero steps): every kernel but the two that pass the state over chunks then runs as for one long
    sequence, and those two (`_chunk_state_kernel`, `_chunk_dstate_kernel`; the delta rule's `_delta_state_kernel`,
    `_delta_bwd_dh_kernel`) run one program per (sequence, head) over its chunks offsets[n] .. offsets[n + 1] - 1,
    from its own initial state (to its own final state), as flash-linear-attention's varlen kernels walk their
    chunk index tables. A zero step (k = 0, v = 0, beta = 0, log decay 0; a = b = 0 in the diagonal-plus-rank-one
    class) is the identity of every linear, delta-rule and DPLR step, so the filler changes no state; its outputs
    are dropped by `unpad`.

    cu_seqlens: int64 [N + 1] (checked by the caller); T: the packed length; chunk_size: the call's. BT is
    min(chunk_size, pow2(longest sequence), at least 16), so short sequences are not padded to a long chunk.
    Tables (on `device`): src [NT * BT] (the packed step each padded step reads, T for a zero step), dst [T] (the
    padded step of each packed step), offsets int32 [N + 1] (each sequence's first chunk), last_chunk / last_seq
    (the last chunk of each non-empty sequence, and that sequence)."""

    def __init__(self, cu_seqlens: Tensor, T: int, chunk_size: int, device):
        cu = cu_seqlens.detach().to("cpu", torch.int64)
        lengths = cu[1:] - cu[:-1]
        self.N, self.T = len(lengths), T
        self.BT = BT = min(chunk_size, _pow2_at_least_16(int(lengths.max()) if self.N else 1))
        chunks = (lengths + BT - 1) // BT
        offsets = torch.cat([chunks.new_zeros(1), chunks.cumsum(0)])
        self.NT = int(offsets[-1])
        seq = torch.repeat_interleave(torch.arange(self.N), lengths, output_size=T)
        dst = offsets[seq] * BT + torch.arange(T) - cu[:-1][seq]
        src = torch.full((self.NT * BT,), T, dtype=torch.int64)
        src[dst] = torch.arange(T)
        self.src, self.dst = src.to(device), dst.to(device)
        self.offsets = offsets.to(device=device, dtype=torch.int32)
        nonempty = chunks > 0
        self.last_chunk = (offsets[1:] - 1)[nonempty].to(device)
        self.last_seq = torch.nonzero(nonempty)[:, 0].to(device)

    def pad(self, x: Tensor | None) -> Tensor | None:
        """[1, T, H, ...] -> [1, NT * BT, H, ...], zero steps filling each sequence's last chunk (differentiable)."""
        if x is None:
            return None
        return torch.cat([x, x.new_zeros((1, 1) + tuple(x.shape[2:]))], dim=1).index_select(1, self.src)

    def unpad(self, x: Tensor) -> Tensor:
        """[1, NT * BT, H, ...] -> [1, T, H, ...]: the packed steps' rows back in packed order."""
        return x.index_select(1, self.dst)

    def chunk_ends(self, h: Tensor, ht: Tensor) -> Tensor:
        """The state at the end of every chunk [1, H, NT, K, V]: the next chunk's start state h, or at a sequence's
        last chunk that sequence's final state ht [N, H, K, V]."""
        ends = torch.cat([h[:, :, 1:], torch.zeros_like(h[:, :, :1])], dim=2).to(ht.dtype)
        ends[0, :, self.last_chunk] = ht[self.last_seq].transpose(0, 1)
        return ends


def _delta_blocks(BK: int) -> tuple[int, int]:
    """(KB, NK): the delta state kernel's row blocks, NK <= 4 blocks of KB = max(min(64, BK), BK / 4) rows."""
    KB = max(min(64, BK), BK // 4)
    return KB, BK // KB


def _cumsum(log_decay: Tensor, D: int, BT: int, num_warps: int, with_exp: bool = False, head: Tensor | None = None,
            g_map=None, packed=None, check=None):
    """(gc, eg): the chunk-local inclusive cumulative sum of the log decays floored at _LOG_DECAY_FLOOR, float64,
    same layout ([B, T, H] or [B, T, H, D]), and with_exp its float32 exp(gc) (else None). head: a per-head factor
    [H] of every log decay (fused: `_Fused.decay_head`), or None. g_map: None, or the (map, vjp) helpers of
    `_Fused.log_decay_map` (log_decay is then their raw input; packed: its `_Packed` layout, whose filler steps
    map to 0); check: None, or (unsafe [1] int32, v_step or None, v_step_map or None), the forward's step check
    (`_cumsum_kernel`'s CHECK)."""
    g = log_decay.contiguous()
    B, T, H = g.shape[:3]
    BD = min(32, _pow2_at_least_16(D))  # a [BT, BD] float64 tile
    gc = torch.empty(g.shape, dtype=torch.float64, device=g.device)
    eg = torch.empty(g.shape, dtype=torch.float32, device=g.device) if with_exp else None
    unsafe, vs, vs_map = check if check is not None else (None, None, None)
    mapped_packed = g_map is not None and packed is not None  # (only a map needs the filler steps told apart)
    _cumsum_kernel[(triton.cdiv(T, BT), triton.cdiv(D, BD), B * H)](
        g, gc, eg if with_exp else gc, head if head is not None else g, T, H, D, BT, BD, _LOG_DECAY_FLOOR, with_exp,
        head is not None, _map_of(g_map), vs.contiguous() if vs is not None else g,
        unsafe if unsafe is not None else gc, packed.src if mapped_packed else gc,
        packed.T if mapped_packed else T, _map_of(vs_map), unsafe is not None, mapped_packed,
        num_warps=_or(num_warps, _WARPS))
    return gc, eg


def _intra_attn(q: Tensor, k: Tensor, gc, decay: int, shift: bool, strict: bool, BT: int, BK: int, prec: str,
                num_warps: int, num_stages: int, spans: bool = False, q_map=None, k_map=None, k_pair=None) -> Tensor:
    """The intra-chunk scores A [B * H, NT * BT, BT] float32 of `_intra_attn_kernel`; spans: gc holds the log decays
    themselves (its SPANS); q_map, k_map: None or the (map, vjp) helpers applied to q and k as loaded (`_Fused`);
    k_pair: None or (map, y), the keys map(k, y) of two raw inputs (its KMAP2, `_Fused.b_map`)."""
    B, T, H, K = k.shape
    NT, NC = triton.cdiv(T, BT), BT // _SUB
    A = torch.empty((B * H, NT * BT, BT), dtype=torch.float32, device=k.device)
    _launch(
        _intra_attn_kernel, (NT, NC * NC, B * H),
        q, k, k if k_pair is None else k_pair[1], gc if gc is not None else k, A, T, H, K, BT, _SUB, BK, NC, decay,
        shift, strict, prec, spans, num_warps=_or(num_warps, _WARPS), num_stages=_or(num_stages, _STAGES),
        QMAP=_map_of(q_map), KMAP=_map_of(k_map), KMAP2=_map_of(k_pair))
    return A


def _chunk_states(k, v, gc, initial_state, decay: int, output_final_state, BT, BK, BV, prec, num_warps,
                  num_stages, packed=None, v_step=None, k_map=None, float32_states=False, v_step_map=None):
    """(h [B, H, NT, K, V] chunk-start states, final state [B, H, K, V] float32 or None); packed (a
    `_Packed`, k and v in its layout, B = 1): one program per (sequence, head), final states [N, H, K, V];
    v_step: a per-step factor [B, T, H] of v (fused), or None; k_map: None or the (map, vjp) helpers of k (fused,
    `_Fused`); v_step_map: those of v_step's raw input (`_Fused.v_step_map`), or None. With a key decay (2) gc
    holds the log decays themselves, not their cumulative sum. h is float32, or bfloat16 for bfloat16 inputs (as
    flash-linear-attention keeps it in the input dtype: the kernel carries the state in float32 registers and rounds
    only the copy it stores, which the output kernel reads as it reads bfloat16 q); float16 keeps float32, since a
    state summing many steps can pass float16's largest number (65504). float32_states: float32 for bfloat16 too
    (`chunked_linear_by`: a call whose readouts a printed epilogue divides, where bfloat16 states' rounding is
    magnified)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    NT = triton.cdiv(T, BT)
    rows = B if packed is None else packed.N  # the states' batch
    half = k.dtype == torch.bfloat16 and not float32_states
    h = torch.empty((B, H, NT, K, V), dtype=torch.bfloat16 if half else torch.float32, device=k.device)
    ht = torch.empty((rows, H, K, V), dtype=torch.float32, device=k.device) if output_final_state else None
    h0 = None if initial_state is None else initial_state.contiguous()
    _launch(
        _chunk_state_kernel, (triton.cdiv(K, BK), triton.cdiv(V, BV), rows * H),
        k, v, gc if gc is not None else k, h, h0 if h0 is not None else h, ht if ht is not None else h,
        packed.offsets if packed is not None else h, v_step if v_step is not None else h, T, H, K, V, NT, BT, BK,
        BV, decay, h0 is not None, ht is not None, prec, packed is not None, v_step is not None,
        num_warps=_or(num_warps, _KEY_STATE_WARPS if decay == 2 or prec == "ieee" else _WARPS),
        num_stages=_or(num_stages, _STAGES), KMAP=_map_of(k_map), VSMAP=_map_of(v_step_map))
    return h, ht


def _delta_states(k, u, gc, w, initial_state, decay: int, output_final_state, BT, BK, BV, prec, num_warps,
                  num_stages, packed=None, kv=None, float32_states=False, b_map=None):
    """_chunk_states for the delta rule (u: Uy in, U out); BK >= K; packed as for _chunk_states. kv: None, or
    the diagonal-plus-rank-one class's (k, v), whose k v^T each step adds (`_delta_state_kernel`'s DPLR). h is
    bfloat16 for bfloat16 inputs as in `_chunk_states` (float32 for the DPLR class, whose recurrent adjoint starts
    from these states; float32_states: float32 always). b_map: None, or (map, y) with k the diagonal-plus-rank-one
    class's raw b, its keys map(k, y) (`_Fused.b_map`)."""
    B, T, H, K = k.shape
    V = u.shape[-1]
    NT = triton.cdiv(T, BT)
    KB, NK = _delta_blocks(BK)
    rows = B if packed is None else packed.N  # the states' batch
    half = k.dtype == torch.bfloat16 and kv is None and not float32_states
    h = torch.empty((B, H, NT, K, V), dtype=torch.bfloat16 if half else torch.float32, device=k.device)
    ht = torch.empty((rows, H, K, V), dtype=torch.float32, device=k.device) if output_final_state else None
    h0 = None if initial_state is None else initial_state.contiguous()
    _delta_state_kernel[(triton.cdiv(V, BV), rows * H)](
        k, u, gc if gc is not None else k, w, h, h0 if h0 is not None else h, ht if ht is not None else h,
        packed.offsets if packed is not None else h, k if kv is None else kv[0], u if kv is None else kv[1],
        k if b_map is None else b_map[1], T, H, K, V, NT, BT, KB, NK, BV, decay, h0 is not None, ht is not None, prec,
        packed is not None, kv is not None, BMAP=_map_of(b_map), num_warps=_or(num_warps, _DELTA_STATE_WARPS),
        num_stages=_or(num_stages, _STAGES))
    return h, ht


def _chunk_output(q, exclusive, k, v, gc, eg, h, A, o, decay: int, BT, BK, BV, prec, num_warps,
                  num_stages, pair=None, fused=None) -> None:
    """Launch _chunk_output_kernel (decay None, scalar or key; A and eg: the key decay's intra-chunk scores and
    exp(G); eg None with a key decay: gc holds the log decays themselves, the kernel's SPANS). pair: None, or the
    diagonal-plus-rank-one class's second (keys, values, scores or None) (its DPLR); fused: the `_Fused` prologue
    and epilogue of this output, or None."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    k2, v2, A2 = pair if pair is not None else (k, v, A)
    f = fused if fused is not None else _NOT_FUSED
    vs = f.v_step
    if vs is not None or f.skip is not None:
        BV = min(BV, _FUSED_OUTPUT_BV)
    # 8 warps under ieee dots too (float32: FMA-loop dots hold whole operand rows; see _chunk_output_kernel)
    warps = _or(num_warps, _KEY_OUTPUT_WARPS if decay == 2 or prec == "ieee" else _WARPS)
    _launch(
        _chunk_output_kernel, (triton.cdiv(V, BV), triton.cdiv(T, BT), B * H),
        q, k, v, gc if gc is not None else k, eg if eg is not None else k, h, A, o, k2, v2,
        A2 if A2 is not None else A, k2 if f.b_map is None else f.b_map[1], vs if vs is not None else o,
        f.skip if f.skip is not None else o,
        f.bonus if f.bonus is not None else f.skip_weight if f.skip_weight is not None else o, o, float(f.scale), T,
        H, K, V, BT, BK, BV, decay, exclusive, prec,
        pair is not None, vs is not None, f.skip is not None, decay == 2 and eg is None,
        num_warps=warps, num_stages=_or(num_stages, _STAGES), QMAP=_map_of(f.q_map), KMAP=_map_of(f.k_map),
        SKIP_STEP=f.skip_step, VSMAP=_map_of(f.v_step_map), BMAP=_map_of(f.b_map), BONUS=f.bonus is not None)


# ----------------------------------------------------------------------------------------------------------
# one class per decay axis: the host-side steps that differ (cumulative sums, the delta rule's decayed K K^T,
# the output launch) and the kernels' DECAY code. The public forms pick one by `decay_axis` through `_DECAYS`;
# a generated module names the class its chunk plan fixes (`chunked_linear_by(KeyDecay, ...)`), so it keeps
# only the kernels that class launches, and codegen/specialize.py drops the kernels' branches for other codes.
# ----------------------------------------------------------------------------------------------------------


class NoDecay:
    """decay_axis None: no log decays."""

    code = 0  # the kernels' DECAY
    delta_backward = True  # chunked_delta_by differentiates in Triton kernels (`_delta_backward`)

    @staticmethod
    def cumsum(log_decay, BT, num_warps, head=None):
        """(G, exp(G)): the float64 cumulative log decays (times the per-head factor `head` [H], if given) and,
        where the kernels read it, their float32 exp."""
        return None, None

    @staticmethod
    def wy_scores(k, gc, BT, BK, prec, num_warps, num_stages):
        """The delta rule's decayed k_t . k_s, when the WY kernel does not form it itself."""
        return None

    @staticmethod
    def dplr_scores(a, b, k, gc, BT, BK, prec, num_warps, num_stages, b_map=None):
        """The diagonal-plus-rank-one class's scores, when `_dplr_wy_kernel` does not form them itself (b_map: its b
        is map(b, y) of two raw inputs, `_Fused.b_map`)."""
        return None, None

    @staticmethod
    def output(q, exclusive, k, v, gc, eg, h, o, BT, BK, BV, prec, num_warps, num_stages, pair=None,
               fused=None):
        """o = q's readouts of the chunk-start states h plus the intra-chunk sums over (k, v), and over pair
        (the diagonal-plus-rank-one class's (b, U)) when given."""
        _chunk_output(q, exclusive, k, v, gc, eg, h, h, o, 0, BT, BK, BV, prec, num_warps, num_stages,
                      None if pair is None else (*pair, None), fused)


class ScalarDecay:
    """decay_axis "scalar": log_decay [B, T, H]."""

    code = 1
    delta_backward = True

    @staticmethod
    def cumsum(log_decay, BT, num_warps, head=None):
        return _cumsum(log_decay, 1, BT, num_warps, head=head)

    @staticmethod
    def wy_scores(k, gc, BT, BK, prec, num_warps, num_stages):
        return None

    @staticmethod
    def dplr_scores(a, b, k, gc, BT, BK, prec, num_warps, num_stages, b_map=None):
        return None, None

    @staticmethod
    def output(q, exclusive, k, v, gc, eg, h, o, BT, BK, BV, prec, num_warps, num_stages, pair=None,
               fused=None):
        _chunk_output(q, exclusive, k, v, gc, eg, h, h, o, 1, BT, BK, BV, prec, num_warps, num_stages,
                      None if pair is None else (*pair, None), fused)


class KeyDecay:
    """decay_axis "key": log_decay [B, T, H, K]; intra-chunk scores from _intra_attn_kernel."""

    code = 2
    delta_backward = False  # KeyDeltaDecay has it

    @staticmethod
    def cumsum(log_decay, BT, num_warps, head=None):
        return _cumsum(log_decay, log_decay.shape[3], BT, num_warps, with_exp=True, head=head)

    @staticmethod
    def wy_scores(k, gc, BT, BK, prec, num_warps, num_stages):
        return _intra_attn(k, k, gc, 2, False, True, BT, BK, prec, num_warps, num_stages)

    @staticmethod
    def output(q, exclusive, k, v, gc, eg, h, o, BT, BK, BV, prec, num_warps, num_stages, pair=None,
               fused=None):
        """eg None: gc holds the log decays themselves (the linear form's spans, `_linear_forward`)."""
        spans = eg is None
        f = fused if fused is not None else _NOT_FUSED
        A = _intra_attn(q, k, gc, 2, exclusive, exclusive, BT, BK, prec, num_warps, num_stages, spans, f.q_map,
                        f.k_map)
        if pair is not None:  # the diagonal-plus-rank-one class's (b, U): its scores q_t . b_s decayed the same way
            pair = (*pair, _intra_attn(q, pair[0], gc, 2, exclusive, exclusive, BT, BK, prec, num_warps, num_stages,
                                       spans, k_pair=f.b_map))
        _chunk_output(q, exclusive, k, v, gc, eg, h, A, o, 2, BT, BK, BV, prec, num_warps, num_stages, pair,
                      fused)

    @staticmethod
    def dplr_scores(a, b, k, gc, BT, BK, prec, num_warps, num_stages, b_map=None):
        """The diagonal-plus-rank-one class's decayed a_t . b_s and a_t . k_s, s < t, through G_{t-1} (exclusive),
        each [B * H, NT * BT, BT] float32; other decays form them in `_dplr_wy_kernel` (b_map: b is map(b, y))."""
        return (_intra_attn(a, b, gc, 2, True, True, BT, BK, prec, num_warps, num_stages, k_pair=b_map),
                _intra_attn(a, k, gc, 2, True, True, BT, BK, prec, num_warps, num_stages))


class KeyDeltaDecay(KeyDecay):
    """decay_axis "key" in the delta rule: KeyDecay plus the steps of its Triton backward that no other class
    takes. A class of its own because generated modules are pruned by name: a linear form's module names KeyDecay
    and keeps none of these kernels, a delta rule's without a key decay names neither."""

    delta_backward = True

    @staticmethod
    def delta_bwd_scores(q, k, gc, exclusive, BT, BK, prec, num_warps, num_stages):
        """The forward's decayed scores P of one query, recomputed for _delta_bwd_local_kernel."""
        return _intra_attn(q, k, gc, 2, exclusive, exclusive, BT, BK, prec, num_warps, num_stages)

    @staticmethod
    def delta_bwd_intra(M, x, gc, out, shift, trans, acc, BT, BK, prec, num_warps, num_stages):
        """out (+)= M's intra-chunk contraction with x under the key decay (`_delta_bwd_intra_kernel`)."""
        _delta_bwd_intra(M, x, gc, out, shift, trans, acc, BT, BK, prec, num_warps, num_stages)


class ValueDecay:
    """decay_axis "value": log_decay [B, T, H, V] (linear form only); outputs by _chunk_output_value_kernel."""

    code = 3
    delta_backward = False

    @staticmethod
    def cumsum(log_decay, BT, num_warps, head=None):
        return _cumsum(log_decay, log_decay.shape[3], BT, num_warps, head=head)

    @staticmethod
    def output(q, exclusive, k, v, gc, eg, h, o, BT, BK, BV, prec, num_warps, num_stages, fused=None):
        if fused is not None and fused.epilogue:
            raise NotImplementedError("the value-decay output kernel takes no fused prologue or epilogue")
        B, T, H, K = k.shape
        V = v.shape[-1]
        A = _intra_attn(q, k, None, 3, exclusive, exclusive, BT, BK, prec, num_warps, num_stages)
        _chunk_output_value_kernel[(triton.cdiv(V, BV), triton.cdiv(T, BT) * (BT // _SUB), B * H)](
            q, v, gc, h, A, o, o, T, H, K, V, BT, _SUB, BK, BV, BT // _SUB, exclusive, prec,
            num_warps=_or(num_warps, _WARPS), num_stages=_or(num_stages, _STAGES))


_DECAYS = {None: NoDecay, "scalar": ScalarDecay, "key": KeyDecay, "value": ValueDecay}
_DELTA_DECAYS = {**_DECAYS, "key": KeyDeltaDecay}  # chunked_delta's classes


def _outputs(queries, decay_cls, k, v, gc, eg, h, BT, BK, BV, prec, num_warps, num_stages, out_dtype, fused=None):
    B, T, H, K = k.shape
    V = v.shape[-1]
    outs = []
    for q, exclusive in queries:
        o = torch.empty((B, T, H, V), dtype=out_dtype, device=k.device)
        decay_cls.output(q.contiguous(), bool(exclusive), k, v, gc, eg, h, o, BT, BK, BV, prec, num_warps,
                         num_stages, fused=fused)
        outs.append(o)
    return outs


class _Fused:
    """The per-step prologue and the readout's epilogue of a spec, applied by the kernels at their loads and
    stores instead of as [B, T, H, ...] torch tensors (the issue's "prologue fused into the kernels", done here as
    runtime kernel arguments, not yet as printed @triton.jit helpers):

      v_step [B, T, H]      a per-step scalar factor of the update k_t v_t^T (gated DeltaNet's beta * v, Mamba2's
                            dt * B), applied to the rows of v (of y in the delta rule) as they are loaded;
      decay_head [H]        a per-head factor of the log decays (Mamba2's dt * A, the log decay of exp(dt * A)),
                            applied by the cumulative-sum kernel;
      scale (a number)      the readout's constant factor (K ** -0.5, flash-linear-attention's `scale`);
      skip [B, T, H, V], skip_weight [H] or [B, T, H]
                            o += skip_weight[h] * skip[t] (Mamba2's D * x), or skip_weight[t] * skip[t] with a
                            weight per step (RWKV-6's bonus sum(r * u * k) * v), added as the output is stored;
      q_map, k_map          (map, vjp): a spec's elementwise feature map of every query / of the keys (a printed
                            `@triton.jit` helper `map(x)` of the raw input x and its derivative helper
                            `vjp(x, grad)`, e.g. normalized linear attention's 1 + elu(q)), applied by the forward
                            and backward kernels where they load q and k (`_mapped`); the backward kernels store dq
                            and dk through vjp, so the gradients are the raw inputs' and no mapped copy is made;
      v_step_map, log_decay_map
                            (map, vjp): v_step / the scalar log decays are map(x) of the raw input [B, T, H] passed
                            in their place (mLSTM's exp(ig), logsigmoid(fg)): the forward kernels that load them
                            apply the map (`_chunk_state_kernel`, `_chunk_output_kernel`, `_cumsum_kernel`), the
                            backward's kernels store the raw input's gradient through vjp (`_dlog_scalar_kernel`,
                            `_row_scale_kernel`), so no [B, T, H] value tensor is allocated;
      b_map (map, y)        the diagonal-plus-rank-one class's b is map(b, y) of the raw b passed and a second raw
                            input y of its shape (RWKV-7's -(a * kk): a printed `@triton.jit` helper of two tiles),
                            applied by its forward kernels wherever they load b (`_paired`), so no [B, T, H, K] b is
                            allocated. Forward only, as `chunked_dplr_by` (its backward is the derived adjoint);
      bonus [H * K]         with skip and no skip_weight: the skip weight per step is sum_i q_t[i] bonus[h, i] k_t[i]
                            (RWKV-7's current-token bonus, u), summed by the DPLR output kernel from the q and k it
                            loads (BONUS), so no [B, T, H] weight and no prologue launch. Forward only, as b_map.

    One query only for scale and skip (the epilogue belongs to its output); not with a value decay."""

    def __init__(self, v_step=None, decay_head=None, scale=1.0, skip=None, skip_weight=None, q_map=None,
                 k_map=None, v_step_map=None, log_decay_map=None, b_map=None, bonus=None):
        self.v_step, self.decay_head, self.scale = v_step, decay_head, scale
        self.skip, self.skip_weight = skip, skip_weight
        self.q_map, self.k_map = q_map, k_map
        self.v_step_map, self.log_decay_map = v_step_map, log_decay_map
        self.b_map, self.bonus = b_map, bonus

    @property
    def epilogue(self) -> bool:
        return self.scale != 1.0 or self.skip is not None or self.v_step is not None

    @property
    def skip_step(self) -> bool:
        """The skip term's weight is one per step, skip_weight [B, T, H] (else one per head, [H]: `_fused_of`)."""
        return self.skip_weight is not None and self.skip_weight.dim() == 3

    @property
    def maps(self) -> tuple:
        return self.q_map, self.k_map, self.v_step_map, self.log_decay_map

    def tensors(self) -> list:
        return [self.v_step, self.decay_head, self.skip, self.skip_weight]


_NOT_FUSED = _Fused()


def _map_of(pair):
    """The map helper of a (map, vjp) pair, or None: a kernel's QMAP / KMAP."""
    return None if pair is None else pair[0]


def _vjp_of(pair):
    """The derivative helper of a (map, vjp) pair, or None: a backward kernel's OVJP."""
    return None if pair is None else pair[1]


def _check_map(name: str, pair) -> None:
    if pair is None:
        return
    if (not isinstance(pair, tuple) or len(pair) != 2
            or not all(callable(f) for f in pair)):
        raise ValueError(f"{name} must be None or a pair (map, vjp) of @triton.jit functions, map(x) and "
                         f"vjp(x, grad), got {pair!r}")


def _fused_of(v_step, decay_head, scale, skip, skip_weight, queries, decay_cls, H: int, q_map=None, k_map=None,
              v_step_map=None, log_decay_map=None):
    """The call's `_Fused` (None when it fuses nothing), checked: ValueError naming the argument."""
    if v_step_map is not None or log_decay_map is not None:  # (its own branch, folded away in modules without)
        _check_map("v_step_map", v_step_map)
        _check_map("log_decay_map", log_decay_map)
        if decay_cls.code != 1 or log_decay_map is None or decay_head is not None:
            raise ValueError("v_step_map and log_decay_map are applied by a scalar decay's kernels, with "
                             "log_decay_map given and no decay_head (its cumulative-sum kernel checks the mapped "
                             "values)")
        if v_step_map is not None and v_step is None:
            raise ValueError("v_step_map maps v_step's raw input: pass it as v_step")
    if q_map is not None or k_map is not None:  # a branch of its own, so a module without maps folds it away
        _check_map("q_map", q_map)
        _check_map("k_map", k_map)
        if decay_cls.code == 3:
            raise ValueError("q_map and k_map are applied by the linear kernels of identity, scalar and key decays, "
                             "not by a value decay's")
    if (v_step is None and decay_head is None and scale == 1.0 and skip is None and q_map is None and k_map is None
            and log_decay_map is None):
        return None
    if (scale != 1.0 or skip is not None) and len(queries) != 1:
        raise ValueError(f"scale and skip fuse the epilogue of one output; got {len(queries)} queries")
    if decay_cls.code == 3 and (v_step is not None or scale != 1.0 or skip is not None):
        raise ValueError("a value decay's output kernel takes no fused v_step, scale or skip")
    if decay_head is not None:
        decay_head = decay_head.reshape(-1)
        if decay_head.numel() != H:
            raise ValueError(f"decay_head must have one factor per head ([{H}]), got {decay_head.numel()}")
    if (skip is None) != (skip_weight is None):
        raise ValueError("skip and skip_weight come together (o += skip_weight[h] * skip[t], or skip_weight[t])")
    if skip_weight is not None and skip_weight.numel() == H:  # one weight per head (Mamba2's D), kept [H]
        skip_weight = skip_weight.reshape(-1)
    elif skip_weight is not None and tuple(skip_weight.shape) != tuple(skip.shape[:3]):
        raise ValueError(f"skip_weight must have one weight per head ([{H}]) or one per step (skip's [B, T, H] = "
                         f"{list(skip.shape[:3])}), got shape {list(skip_weight.shape)}")
    # The kernels index these with contiguous strides: a view (Mamba2's A and D as columns of one [H, 2] param, a
    # strided slice of x as the skip) is copied here (trial 10: such an A gave a relative error of 0.99).
    v_step, decay_head, skip, skip_weight = (None if t is None else t.contiguous()
                                             for t in (v_step, decay_head, skip, skip_weight))
    return _Fused(v_step, decay_head, float(scale), skip, skip_weight, q_map, k_map, v_step_map, log_decay_map)


_ROW_SCALE_BR = 16  # _row_scale_kernel's rows per program


def _row_scale(v: Tensor, x: Tensor, pair, dv: Tensor | None = None):
    """`_row_scale_kernel`: v * map(x)[..., None] (v [B, T, H, V], x [B, T, H] the raw input of a per-step factor,
    pair its (map, vjp)) in v's dtype; or with dv (v's float32 gradient of that product, contiguous) the raw
    input's gradient [B, T, H] float32, dv scaled by map(x) in place."""
    v, x = v.contiguous(), x.contiguous()
    R, V = x.numel(), v.shape[-1]
    out = torch.empty_like(v) if dv is None else dv
    dx = torch.empty(x.shape, dtype=torch.float32, device=x.device) if dv is not None else out
    if R:
        _row_scale_kernel[(triton.cdiv(R, _ROW_SCALE_BR),)](
            v, x, out, out, dx, R, V, _ROW_SCALE_BR, min(64, _pow2_at_least_16(V)), pair[0], pair[1],
            dv is not None)
    return out if dv is None else dx


class _ScalarMapFunction(torch.autograd.Function):
    """map(x) of a raw per-step input x [B, T, H] as a float32 tensor (`_scalar_map_kernel`), its backward the
    printed vjp: the values the parallel form takes where the chunked form maps them at its kernels' loads."""

    @staticmethod
    def forward(ctx, pair, log, unsafe, x):
        x_c = x.contiguous()
        B, T, H = x.shape[:3]
        y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        if x.numel():
            _scalar_map_kernel[(triton.cdiv(x.numel(), _ROW_SCALE_BR),)](
                x_c, y, y, y, unsafe if unsafe is not None else y, x.numel(), T, H, _ROW_SCALE_BR, pair[0], pair[1],
                False, log, unsafe is not None)
        ctx.save_for_backward(x_c)
        ctx.pair = pair
        return y

    @staticmethod
    @_first_order("its backward runs a Triton kernel, which records no graph")
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dx = torch.empty_like(x)
        if x.numel():
            _scalar_map_kernel[(triton.cdiv(x.numel(), _ROW_SCALE_BR),)](
                x, x, dy.contiguous(), dx, x, x.numel(), 1, 1, _ROW_SCALE_BR, ctx.pair[0], ctx.pair[1], True, False,
                False)
        return None, None, None, dx


def _unfuse(fused, v, log_decay, grads_out, dv, dlog):
    """The chain rule through a fused prologue and epilogue, for a backward that ran on the materialised tensors
    v * v_step and log_decay * decay_head with the outputs' gradients times scale: returns
    (dv, dlog_decay, d v_step, d decay_head, d skip, d skip_weight) for the call's own arguments. dv and dlog are
    the backward's own float32 buffers and are scaled in place; the per-step sums are contractions (no [B, T, H, V]
    product is allocated); a skip term that is v itself (Mamba2's D * x) adds its gradient into dv and returns no
    d skip, so autograd has no second [B, T, H, V] gradient to sum."""
    dvs = ddh = dskip = dsw = None
    if fused.v_step_map is not None:  # v_step is the raw input of its map: the kernel stores that input's gradient
        dvs = _row_scale(v, fused.v_step, fused.v_step_map, dv)
    elif fused.v_step is not None:
        dvs = torch.einsum("bthv,bthv->bth", dv, v.to(dv.dtype))
        dv = dv.mul_(fused.v_step.to(dv.dtype)[..., None])
    if fused.decay_head is not None and dlog is not None:
        shape = (1, 1, -1) + (1,) * (log_decay.dim() - 3)
        ddh = (dlog * log_decay.float()).sum([d for d in range(dlog.dim()) if d != 2])
        dlog = dlog.mul_(fused.decay_head.float().view(shape))
    if fused.skip is not None and grads_out is not None:
        go = grads_out.float()  # one float32 copy (none for float32) serves both terms
        dsw = torch.einsum("bthv,bthv->bth", go, fused.skip.to(go.dtype))
        if fused.skip_step:  # one weight per step [B, T, H]
            weight = fused.skip_weight.float()[..., None]
        else:  # one per head [H], summed over B and T
            weight = fused.skip_weight.float().view(1, 1, -1, 1)
            dsw = dsw.sum((0, 1))
        if _same_tensor(fused.skip, v) and dv.dtype == go.dtype:
            dv = dv.addcmul_(go, weight)
        else:
            dskip = go * weight
    return dv, dlog, dvs, ddh, dskip, dsw


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    """a and b are views of the same elements (the same argument passed twice)."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


def _materialise(fused, v, log_decay):
    """(v * v_step, log_decay * decay_head) as the unfused backward reads them (v_step mapped from its raw input by
    `_row_scale` where it has a map)."""
    if fused.v_step_map is not None:
        v = _row_scale(v, fused.v_step, fused.v_step_map)
    elif fused.v_step is not None:
        v = v * fused.v_step[..., None].to(v.dtype)
    if fused.decay_head is not None and log_decay is not None:
        log_decay = log_decay * fused.decay_head.view((1, 1, -1) + (1,) * (log_decay.dim() - 3)).to(log_decay.dtype)
    return v, log_decay


def _empty_result(queries, k, v, initial_state, output_final_state):
    B, _, H, K = k.shape
    V = v.shape[-1]
    outs = [torch.empty((B, 0, H, V), dtype=k.dtype, device=k.device) for _ in queries]
    if not output_final_state:
        return outs, None
    s0 = (torch.zeros((B, H, K, V), dtype=torch.float32, device=k.device) if initial_state is None
          else initial_state.to(torch.float32))
    return outs, s0


def _out_dtype(k: Tensor, readouts: bool) -> torch.dtype:
    """The outputs' dtype: k's, but float32 for float16 readouts that a printed epilogue combines (`readouts`,
    mLSTM's h = (q C) / max(|q n|, 1)): q C and q n pass float16's largest number, 65504, once the input gates
    exp(ig) pass about e^6, where the epilogue's ratio is of the size of v. bfloat16 has float32's range."""
    return torch.float32 if readouts and k.dtype == torch.float16 else k.dtype


# ----------------------------------------------------------------------------------------------------------
# public forms
# ----------------------------------------------------------------------------------------------------------


def chunked_linear(queries, k, v, log_decay=None, decay_axis=None, initial_state=None, chunk_size=64,
                   output_final_state=False, *, block_k=None, block_v=None, num_warps=None, num_stages=None,
                   allow_tf32=None):
    """Chunked form of S_t = D_t S_{t-1} + k_t v_t^T on the GPU (Triton); see codegen.torch_runtime.chunked_linear.

    queries: list of (q [B, T, H, K], exclusive); k [B, T, H, K]; v [B, T, H, V]; log_decay per decay_axis
    (None, "scalar" [B, T, H], "key" [B, T, H, K], "value" [B, T, H, V]); initial_state [B, H, K, V] or None.
    Returns (list of outputs [B, T, H, V] in k's dtype, final state [B, H, K, V] float32 or None).
    chunk_size, block_k, block_v: powers of two >= 16; the chunk length is BT = min(chunk_size, pow2(T)), so a
    chunk_size >= T is the parallel form (one chunk). Defaults: BK = min(64, pow2(K)), BV = min(64, pow2(V)).
    num_warps, num_stages: passed to every launch (None: each kernel's default, see the module docstring).
    allow_tf32: tl.dot input precision "tf32" instead of "ieee" (None: only for float16 / bfloat16 inputs).
    """
    _check_inputs(queries, k, v, log_decay, decay_axis, initial_state)
    return chunked_linear_by(_DECAYS[decay_axis], queries, k, v, log_decay, initial_state, chunk_size,
                             output_final_state, block_k=block_k, block_v=block_v, num_warps=num_warps,
                             num_stages=num_stages, allow_tf32=allow_tf32)


def chunked_linear_by(decay_cls, queries, k, v, log_decay=None, initial_state=None, chunk_size=64,
                      output_final_state=False, *, block_k=None, block_v=None, num_warps=None, num_stages=None,
                      allow_tf32=None, cu_seqlens=None, v_step=None, decay_head=None, scale=1.0, skip=None,
                      skip_weight=None, q_map=None, k_map=None, parallel=None, readouts=False,
                      float32_states=False, v_step_map=None, log_decay_map=None, unsafe=None):
    """chunked_linear with the decay axis given as its class (NoDecay, ScalarDecay, KeyDecay or ValueDecay), the
    entry point of generated modules; shapes and dtypes are not checked (chunked_linear does that).

    Differentiable: with grad enabled and an input that requires grad it runs as _ChunkedLinearFunction, whose
    backward is the Triton kernels below (gradients of every query, k, v, log_decay and initial_state, with the
    final state's incoming gradient), keeping the chunk-start states h [B, H, NT, K, V] (float32; bfloat16 for
    bfloat16 inputs unless float32_states) for it.

    cu_seqlens: None, or int64 [N + 1] boundaries (checked by the caller; on the CPU or the device) of N sequences
    packed into B = 1: each runs from its own row of initial_state [N, H, K, V] (zero if None) and the final state
    is [N, H, K, V]. The kernel launches are the same for any N (`_Packed`).

    The spec's prologue and epilogue, fused into the kernels (`_Fused`; one query, no value decay): v_step
    [B, T, H] (the update is k_t (v_step_t v_t)^T), decay_head [H] (the log decays are log_decay * decay_head),
    scale (the output is scale * o) and skip [B, T, H, V] with skip_weight [H] (plus skip_weight[h] * skip_t).
    Their gradients come from the unfused backward's by the chain rule (`_unfuse`). q_map, k_map: None or
    (map, vjp), a pair of `@triton.jit` helpers of the spec's elementwise feature map of every query / of the keys
    (printed by the generated module, `NAME__map_<value>`): q and k are then the raw inputs, mapped where the
    kernels (forward and backward) load them, and their gradients are the raw inputs' (`_Fused`). ValueError for a
    bad one.

    parallel: None, or the parallel form's runtime (codegen/triton_parallel.py `parallel_linear_by`, passed by the
    `in_parallel` wrapper of a generated module's chunked form), which then runs the call with these arguments but
    chunk_size (it has no chunks) and cu_seqlens (which `in_parallel` hands to `parallel_linear_by` itself).

    readouts: the outputs are readouts that a printed epilogue combines in float32 (a generated module passes
    True where it does): float16 ones come back in float32 (`_out_dtype`), others in k's dtype.

    float32_states: keep the chunk-start states h in float32 for bfloat16 inputs too (float16 and float32 ones
    always are). A generated module passes True for a call with normaliser columns (mLSTM's q C / max(|q n|, 1)):
    numerator and denominator are sums that cancel, so h's bfloat16 rounding (2^-9) came out magnified, 0.09 of
    mLSTM's output at input gates ~ N(6, 1), T = 96 (tests/test_numerics.py). Costs 2 bytes more per entry of h
    ([B, H, NT, K, V]), forward and saved for the backward. The parallel form keeps no chunk states (ignored).

    v_step_map, log_decay_map: None or (map, vjp) helpers (a scalar decay only, log_decay_map given): v_step and
    log_decay are then raw inputs [B, T, H] of the per-step factor and the log decays (mLSTM's ig and fg, mapped
    to exp(ig) and logsigmoid(fg)), mapped where the kernels load them and differentiated through vjp (`_Fused`);
    the parallel form gets them as float32 tensors (`_ScalarMapFunction`). unsafe: None, or [1] int32 holding T,
    lowered to the first step whose mapped log decay is NaN or > 0 or whose mapped v_step is not finite (for the
    caller's `_check_steps`)."""
    if log_decay_map is not None and parallel is not None:
        _fused_of(v_step, decay_head, scale, skip, skip_weight, queries, decay_cls, k.shape[2], q_map, k_map,
                  v_step_map, log_decay_map)  # (checked as the chunked form checks them)
        log_decay = _ScalarMapFunction.apply(log_decay_map, True, unsafe, log_decay)
        if v_step_map is not None:
            v_step = _ScalarMapFunction.apply(v_step_map, False, unsafe, v_step)
        v_step_map = log_decay_map = None
    if parallel is not None:
        if cu_seqlens is not None:
            raise ValueError("the parallel Triton form takes cu_seqlens through `in_parallel`'s option, not the "
                             "chunked runtime's")
        return parallel(decay_cls, queries, k, v, log_decay, initial_state, output_final_state, block_k=block_k,
                        block_v=block_v, num_warps=num_warps, num_stages=num_stages, allow_tf32=allow_tf32,
                        v_step=v_step, decay_head=decay_head, scale=scale, skip=skip, skip_weight=skip_weight,
                        q_map=q_map, k_map=k_map, readouts=readouts)
    fused = _fused_of(v_step, decay_head, scale, skip, skip_weight, queries, decay_cls, k.shape[2], q_map, k_map,
                      v_step_map, log_decay_map)
    if cu_seqlens is not None:
        packed = _Packed(cu_seqlens, k.shape[1], chunk_size, k.device)
        if initial_state is None:
            initial_state = k.new_zeros((packed.N, k.shape[2], k.shape[3], v.shape[-1]), dtype=torch.float32)
        k, v, log_decay = packed.pad(k), packed.pad(v), packed.pad(log_decay)
        queries = [(packed.pad(q), e) for q, e in queries]
        if fused is not None:
            fused = _Fused(packed.pad(fused.v_step), fused.decay_head, fused.scale, packed.pad(fused.skip),
                           packed.pad(fused.skip_weight) if fused.skip_step else fused.skip_weight,
                           *fused.maps)
    else:
        packed = None
    BT, BK, BV, prec = _config(k, v.shape[-1], chunk_size, block_k, block_v, allow_tf32, delta=False,
                               lane_decay=decay_cls.code >= 2)
    if prec == "ieee":
        num_stages = _or(num_stages, _IEEE_LINEAR_STAGES)
    if packed is not None:
        BT = packed.BT  # the sequences start at multiples of the packed layout's chunk
    if k.shape[1] == 0:
        return _empty_result(queries, k, v, initial_state, output_final_state)
    cfg = (BT, BK, BV, prec, num_warps, num_stages)
    f = fused if fused is not None else _NOT_FUSED
    out_dtype = _out_dtype(k, readouts)
    tensors = [k, v, log_decay, initial_state] + f.tensors() + [q for q, _ in queries]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        exclusive = tuple(bool(e) for _, e in queries)
        flat = _ChunkedLinearFunction.apply(decay_cls, exclusive, cfg, packed, f.scale, f.maps, out_dtype,
                                            bool(float32_states), unsafe, k, v, log_decay, initial_state,
                                            *f.tensors(), *[q for q, _ in queries])
        outs, ht = list(flat[:-1]), flat[-1]
    else:
        outs, ht, _ = _linear_forward(decay_cls, queries, k.contiguous(), v.contiguous(), log_decay,
                                      initial_state, output_final_state, cfg, packed, fused, out_dtype,
                                      bool(float32_states), unsafe)
    if packed is not None:
        outs = [packed.unpad(o) for o in outs]
    return outs, (ht if output_final_state else None)


# ----------------------------------------------------------------------------------------------------------
# backward of the linear chunked form (identity, scalar, key and value decays)
#
# With S_t = D_t S_{t-1} + k_t v_t^T and o_t = S_t^T q_t (S_{t-1}^T q_t for an exclusive query), the adjoint runs
# backwards over chunks (the Backward section of /work/shared/design/DESIGN.md; the split into a state-gradient
# pass and per-chunk gradient kernels is that of flash-linear-attention's chunk_gla / chunk_simple_gla backward,
# written afresh). Per chunk n, with h_n the chunk-start state saved by the forward (never per-step states),
# dh_n = dL/d(state at the end of chunk n) and G the float64 chunk-local cumsum of the log decays:
#
#   key axis   dq = exp(Gq) * (do h^T) + sum_{s<=t} dA_ts k_s exp(Gq_t - G_s),                dA = do v^T masked
#              dk = exp(G_last - G) * (v dh^T) + sum_{t>=s} dA_ts q_t exp(Gq_t - G_s)
#              dv = A^T do + (k exp(G_last - G)) dh,                       A = the forward's decayed q k^T scores
#   value axis dq = (do exp(Gq)) h^T + dA k,                              dA_ts = sum_j do_t v_s exp(Gq_t - G_s)
#              dv = exp(G_last - G) * (k dh) + sum_{t>=s} A_ts do_t exp(Gq_t - G_s),      A = q k^T masked
#              dk = dA^T q + (v exp(G_last - G)) dh^T
#
# A scalar decay (and no decay, G = 0) is the key-axis case with G constant over K: its G stays [B, T, H], its
# decay factors are one per row (or pair of rows) of A, dA and the state terms, so dq, dk and dv come from the
# undecayed-axis kernels, and its dlog_decay is the key-axis sum over K taken inside each term. The log decays'
# gradient is the reverse cumulative sum inside the chunk of the per-step terms (GLA, Yang et al. 2023, section 4:
# writing q~ = q exp(G), k~ = k exp(-G), dG = q dq - k dk; for a value decay dG = o do - v dv)
# plus the end-of-chunk term sum(h_{n+1} * dh_n) over the undecayed axis; an exclusive query's term belongs to the
# step before it (a strict reverse sum). Every decay factor is `_decay` of a difference of G, as in the forward.
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _chunk_dstate_kernel(q, do, gc, dh, dht, dh0, offsets, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                         NT, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr,
                         EXCLUSIVE: tl.constexpr, USE_DHT: tl.constexpr, ACC: tl.constexpr,
                         STORE_DH0: tl.constexpr, PREC: tl.constexpr, VARLEN: tl.constexpr,
                         QMAP: tl.constexpr = None):
    """The state gradient run backwards over the chunks of one (BK tile, BV tile, batch*head), for one query:
    dh[bh, n] (+)= dL/d(state at the end of chunk n), then dh <- exp(G_last) dh + (q exp(Gq))^T do (a value
    decay: dh exp(G_last) + q^T (do exp(Gq)), its G over V); the gradient of the initial state last (dh0).
    DECAY 0: no G (gc is not read); 1: a scalar decay, G [B, T, H] (one per row); 2 / 3: G [B, T, H, K / V].
    Queries after the first add into dh and dh0 (ACC): the recurrence is linear, so their sum is the total.
    VARLEN: as in _chunk_state_kernel, sequence i_bh // H's chunks only, from dht[seq] back to dh0[seq].
    QMAP (`_mapped`): the spec's elementwise map of the raw q, applied as it is loaded."""
    i_kt, i_vt, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    c0, c1, i_row, bt0 = _chunk_range(offsets, i_b, i_h, i_bh, T, NT, VARLEN)  # VARLEN: dh is [1, H, NT, K, V]
    o_i = tl.arange(0, BT)
    o_k = i_kt * BK + tl.arange(0, BK)
    o_v = i_vt * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]  # [BK, BV]
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dh += tl.load(dht + i_bh.to(tl.int64) * (K * V) + o_kv, mask=m_kv, other=0.0).to(tl.float32)
    for i_r in range(0, c1 - c0):
        i_n = c1 - 1 - i_r
        p_dh = dh + (i_row.to(tl.int64) * NT + i_n) * (K * V) + o_kv
        if ACC:
            tl.store(p_dh, tl.load(p_dh, mask=m_kv, other=0.0) + b_dh, mask=m_kv)
        else:
            tl.store(p_dh, b_dh, mask=m_kv)
        t0 = i_n * BT
        bos = (bt0 + t0) * H + i_h
        m_t = t0 + o_i < T
        i_last = tl.minimum(BT, T - t0) - 1
        if EXCLUSIVE:  # Gq_t = G_{t-1} inside the chunk, 0 at its start
            o_ig = o_i - 1
            m_tg = m_t & (o_i > 0)
        else:
            o_ig = o_i
            m_tg = m_t
        b_qt = tl.load(q + bos * K + o_i[None, :] * (H * K) + o_k[:, None], mask=m_k[:, None] & m_t[None, :],
                       other=0.0).to(tl.float32)  # [BK, BT]
        b_qt = _mapped(b_qt, m_k[:, None] & m_t[None, :], QMAP)
        b_do = tl.load(do + bos * V + o_i[:, None] * (H * V) + o_v[None, :], mask=m_t[:, None] & m_v[None, :],
                       other=0.0).to(tl.float32)  # [BT, BV]
        if DECAY == 3:
            b_gl = tl.load(gc + bos * V + i_last * (H * V) + o_v, mask=m_v, other=0.0)  # [BV]
            b_gq = tl.load(gc + bos * V + o_ig[:, None] * (H * V) + o_v[None, :], mask=m_tg[:, None] & m_v[None, :],
                           other=0.0)  # [BT, BV]
            b_dh = b_dh * tl.exp(b_gl.to(tl.float32))[None, :]
            b_dh += tl.dot(b_qt, b_do * _safe_exp(b_gq.to(tl.float32)), input_precision=PREC)
        elif DECAY == 2:
            b_gl = tl.load(gc + bos * K + i_last * (H * K) + o_k, mask=m_k, other=0.0)  # [BK]
            b_gq = tl.load(gc + bos * K + o_ig[None, :] * (H * K) + o_k[:, None], mask=m_k[:, None] & m_tg[None, :],
                           other=0.0)  # [BK, BT]
            b_dh = b_dh * tl.exp(b_gl.to(tl.float32))[:, None]
            b_dh += tl.dot(b_qt * _safe_exp(b_gq.to(tl.float32)), b_do, input_precision=PREC)
        elif DECAY == 1:  # one G per row, broadcast over K
            b_gl = tl.load(gc + bos + i_last * H, mask=i_last >= 0, other=0.0)
            b_gq = tl.load(gc + bos + o_ig * H, mask=m_tg, other=0.0)  # [BT]
            b_dh = b_dh * tl.exp(b_gl.to(tl.float32))
            b_dh += tl.dot(b_qt * _safe_exp(b_gq.to(tl.float32))[None, :], b_do, input_precision=PREC)
        else:
            b_dh += tl.dot(b_qt, b_do, input_precision=PREC)
    if STORE_DH0:
        p_dh0 = dh0 + i_bh.to(tl.int64) * (K * V) + o_kv
        if ACC:
            b_dh += tl.load(p_dh0, mask=m_kv, other=0.0)
        tl.store(p_dh0, b_dh, mask=m_kv)


@triton.jit
def _chunk_bwd_decayed_kernel(M, x, gc, z, dm, out, ox, T, H: tl.constexpr, D: tl.constexpr, DZ: tl.constexpr,
                              BT: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr, BZ: tl.constexpr,
                              NC: tl.constexpr, EXCLUSIVE: tl.constexpr, USE_H: tl.constexpr, ACC: tl.constexpr,
                              PREC: tl.constexpr, TRANS_DM: tl.constexpr, XMAP: tl.constexpr = None,
                              OVJP: tl.constexpr = None):
    """One BC-row sub-chunk j of chunk n (rows s), decay on the output axis D (G [B, T, H, D], float64):
    out_s (+)= sum_{t >= s} M_ts x_t exp(Gq_t - G_s) [+ USE_H: exp(G_last - G_s) * (z_s @ dm_n)],
    M [B*H, NT*BT, BT] already causally masked (s <= t, or s < t), dm [B*H, NT, DZ, D] the chunk's state gradient
    (TRANS_DM: stored [B*H, NT, D, DZ] and read transposed in place: a key decay's dk reads dh [K, V] as dh^T).
    The time-reversed mirror of _chunk_output_value_kernel: later sub-chunks i > j by tl.dot through G at the end of
    sub-chunk j (G_s >= G_ref >= Gq_t, every exponent <= 0), the diagonal sub-block one row t at a time.
    XMAP, OVJP (a key decay's dk with mapped q and k): XMAP maps the raw q x as it is loaded, and this launch's
    share of out is OVJP(ox, share), the raw key ox's gradient (grad * map'(x), linear in grad, so the shares of
    several queries still add up)."""
    i_dt, i_nc, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_j = i_nc // NC, i_nc % NC
    i_b, i_h = i_bh // H, i_bh % H
    NT = tl.cdiv(T, BT)
    t0 = i_n * BT
    bos = (i_b.to(tl.int64) * T + t0) * H + i_h
    p_x, p_g = x + bos * D, gc + bos * D
    o_c = tl.arange(0, BC)
    o_is = i_j * BC + o_c  # [BC] output rows s (local to the chunk)
    m_s = t0 + o_is < T
    o_d = i_dt * BD + tl.arange(0, BD)
    m_d = o_d < D
    m_sd = m_s[:, None] & m_d[None, :]
    p_sd = o_is[:, None] * (H * D) + o_d[None, :]
    b_gs = tl.load(p_g + p_sd, mask=m_sd, other=0.0)  # [BC, BD] float64
    p_M = M + (i_bh.to(tl.int64) * NT * BT + t0) * BT  # row t, column s at t * BT + s
    b_o = tl.zeros([BC, BD], dtype=tl.float32)
    if i_j < NC - 1:  # later sub-chunks, through G at the last row of sub-chunk j
        i_ref = i_j * BC + BC - 1
        b_gr = tl.load(p_g + i_ref * (H * D) + o_d, mask=m_d & (o_d * 0 + t0 + i_ref < T), other=0.0)  # [BD]
        b_acc = tl.zeros([BC, BD], dtype=tl.float32)
        for i in range(i_j + 1, NC):
            o_it = i * BC + o_c
            m_td = (t0 + o_it < T)[:, None] & m_d[None, :]
            b_x = tl.load(p_x + o_it[:, None] * (H * D) + o_d[None, :], mask=m_td, other=0.0).to(tl.float32)
            b_x = _mapped(b_x, m_td, XMAP)
            if EXCLUSIVE:  # Gq_t = G_{t-1}; t - 1 >= i_ref here
                b_gq = tl.load(p_g + (o_it - 1)[:, None] * (H * D) + o_d[None, :], mask=m_td, other=0.0)
            else:
                b_gq = tl.load(p_g + o_it[:, None] * (H * D) + o_d[None, :], mask=m_td, other=0.0)
            b_Mt = tl.load(p_M + o_it[None, :] * BT + o_is[:, None], mask=(o_is[:, None] < BT) & (o_it[None, :] < BT),
                           other=0.0)  # [BC (s), BC (t)]: M^T
            b_acc += tl.dot(b_Mt, b_x * _decay(b_gq, b_gr[None, :]), input_precision=PREC)
        b_o += b_acc * _decay(b_gr[None, :], b_gs)
    for c in range(0, BC):  # the diagonal sub-block, one row t of M at a time (M is zero where s > t)
        i_t = i_j * BC + c
        m_td = m_d & (o_d * 0 + t0 + i_t < T)
        b_m = tl.load(p_M + i_t * BT + o_is, mask=o_is < BT, other=0.0)  # [BC] row t of M, columns s
        b_xt = _mapped(tl.load(p_x + i_t * (H * D) + o_d, mask=m_td, other=0.0).to(tl.float32), m_td, XMAP)  # [BD]
        if EXCLUSIVE:
            b_gqt = tl.load(p_g + (i_t - 1) * (H * D) + o_d, mask=m_td & (o_d * 0 + i_t > 0), other=0.0)
        else:
            b_gqt = tl.load(p_g + i_t * (H * D) + o_d, mask=m_td, other=0.0)
        b_o += b_m[:, None] * b_xt[None, :] * _decay(b_gqt[None, :], b_gs)
    if USE_H:  # the chunk-end state gradient's share: exp(G_last - G_s) * (z_s @ dm)
        i_last = tl.minimum(BT, T - t0) - 1
        b_gl = tl.load(p_g + i_last * (H * D) + o_d, mask=m_d, other=0.0)  # [BD]
        p_dm = dm + (i_bh.to(tl.int64) * NT + i_n) * (DZ * D)
        b_zh = tl.zeros([BC, BD], dtype=tl.float32)
        for i_z in range(0, tl.cdiv(DZ, BZ)):
            o_z = i_z * BZ + tl.arange(0, BZ)
            m_z = o_z < DZ
            b_z = tl.load(z + bos * DZ + o_is[:, None] * (H * DZ) + o_z[None, :], mask=m_s[:, None] & m_z[None, :],
                          other=0.0).to(tl.float32)  # [BC, BZ]
            if TRANS_DM:  # element (z, d) of a stored [D, DZ] matrix
                p_zd = p_dm + o_d[None, :] * DZ + o_z[:, None]
            else:
                p_zd = p_dm + o_z[:, None] * D + o_d[None, :]
            b_dm = tl.load(p_zd, mask=m_z[:, None] & m_d[None, :], other=0.0)
            b_zh += tl.dot(b_z, b_dm, input_precision=PREC)
        b_o += b_zh * _decay(b_gl[None, :], b_gs)
    if OVJP is not None:
        b_o = OVJP(tl.load(ox + bos * D + p_sd, mask=m_sd, other=0.0).to(tl.float32), b_o)
    p_out = out + bos * D + p_sd
    if ACC:
        b_o += tl.load(p_out, mask=m_sd, other=0.0)
    tl.store(p_out, b_o, mask=m_sd)


@_register_limited(lambda a: a["DECAY"] == 0)
# no decay: unasked, ptxas kept an 8 B stack slot at 72 registers in one of based's (sm_80, bfloat16 and float16,
# K = V = 64 and 128; benchmarks/kernel_matrix.py), none with the limit
@triton.jit
def _chunk_bwd_plain_kernel(M, x, gc, z, dm, out, ox, T, H: tl.constexpr, D: tl.constexpr, DZ: tl.constexpr,
                            BT: tl.constexpr, BD: tl.constexpr, BZ: tl.constexpr, USE_H: tl.constexpr,
                            ACC: tl.constexpr, PREC: tl.constexpr, DECAY: tl.constexpr, EXCLUSIVE: tl.constexpr,
                            TRANS_DM: tl.constexpr, XMAP: tl.constexpr = None, ZMAP: tl.constexpr = None,
                            OVJP: tl.constexpr = None):
    """One chunk, BD columns: out (+)= M^T @ x [+ USE_H: (z * exp(G_last - G)) @ dm_n], M [B*H, NT*BT, BT] scores
    with their causal mask, dm [B*H, NT, DZ, D] the chunk's state gradient (TRANS_DM: stored [B*H, NT, D, DZ] and
    read transposed in place). G, float64, by DECAY: 2 / 3 (a key / value decay) G [B, T, H, DZ] over z's axis (the
    contraction axis of the state term), M holding its decays already; 1 (a scalar decay) G [B, T, H], one per row,
    and M the plain scores, decayed here as loaded, M_ts exp(Gq_t - G_s) (Gq_t = G_{t-1} if EXCLUSIVE); 0 no G.
    XMAP, ZMAP, OVJP (mapped q and k): the maps of the raw x and z as they are loaded (dk's q, dv's k), and this
    launch's share of out stored as OVJP(ox, share), the raw key ox's gradient (as `_chunk_bwd_decayed_kernel`)."""
    i_dt, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    NT = tl.cdiv(T, BT)
    t0 = i_n * BT
    bos = (i_b.to(tl.int64) * T + t0) * H + i_h
    o_i = tl.arange(0, BT)
    m_t = t0 + o_i < T
    o_d = i_dt * BD + tl.arange(0, BD)
    m_d = o_d < D
    m_td = m_t[:, None] & m_d[None, :]
    p_td = bos * D + o_i[:, None] * (H * D) + o_d[None, :]
    p_M = M + (i_bh.to(tl.int64) * NT * BT + t0) * BT
    b_Mt = tl.load(p_M + o_i[None, :] * BT + o_i[:, None], mask=(o_i[:, None] < BT) & (o_i[None, :] < BT),
                   other=0.0)  # [BT (s), BT (t)]: M^T
    i_last = tl.minimum(BT, T - t0) - 1
    if DECAY == 1:  # plain scores: M_ts exp(Gq_t - G_s) (M is 0 where s > t, whose factor _decay keeps <= 1)
        b_gs = tl.load(gc + bos + o_i * H, mask=m_t, other=0.0)  # [BT] float64
        if EXCLUSIVE:
            b_gq = tl.load(gc + bos + (o_i - 1) * H, mask=m_t & (o_i > 0), other=0.0)
        else:
            b_gq = b_gs
        b_Mt = b_Mt * _decay(b_gq[None, :], b_gs[:, None])
    b_x = _mapped(tl.load(x + p_td, mask=m_td, other=0.0).to(tl.float32), m_td, XMAP)  # [BT, BD]
    b_o = tl.dot(b_Mt, b_x, input_precision=PREC)
    if USE_H:
        p_dm = dm + (i_bh.to(tl.int64) * NT + i_n) * (DZ * D)
        if DECAY == 1:  # exp(G_last - G_s), one per row
            b_zl = _decay(tl.load(gc + bos + i_last * H, mask=i_last >= 0, other=0.0), b_gs)  # [BT]
        for i_z in range(0, tl.cdiv(DZ, BZ)):
            o_z = i_z * BZ + tl.arange(0, BZ)
            m_z = o_z < DZ
            m_tz = m_t[:, None] & m_z[None, :]
            p_tz = bos * DZ + o_i[:, None] * (H * DZ) + o_z[None, :]
            b_z = _mapped(tl.load(z + p_tz, mask=m_tz, other=0.0).to(tl.float32), m_tz, ZMAP)  # [BT, BZ]
            if DECAY == 1:
                b_z = b_z * b_zl[:, None]
            elif DECAY != 0:
                b_g = tl.load(gc + p_tz, mask=m_tz, other=0.0)  # [BT, BZ] float64
                b_gl = tl.load(gc + bos * DZ + i_last * (H * DZ) + o_z, mask=m_z, other=0.0)  # [BZ]
                b_z = b_z * _decay(b_gl[None, :], b_g)
            if TRANS_DM:  # element (z, d) of a stored [D, DZ] matrix
                p_zd = p_dm + o_d[None, :] * DZ + o_z[:, None]
            else:
                p_zd = p_dm + o_z[:, None] * D + o_d[None, :]
            b_dm = tl.load(p_zd, mask=m_z[:, None] & m_d[None, :], other=0.0)
            b_o += tl.dot(b_z, b_dm, input_precision=PREC)
    if OVJP is not None:
        b_o = OVJP(tl.load(ox + p_td, mask=m_td, other=0.0).to(tl.float32), b_o)
    if ACC:
        b_o += tl.load(out + p_td, mask=m_td, other=0.0)
    tl.store(out + p_td, b_o, mask=m_td)


@_register_limited()  # at _DLOG_WARPS (8) ptxas stops at 128 registers unasked
@triton.jit
def _dlog_chunk_kernel(M, x, y, w, z, h, dh, g, gc, r, T, H: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
                       BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, VALUE: tl.constexpr,
                       SHIFT: tl.constexpr, STATE: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                       FLOOR: tl.constexpr, XMAP: tl.constexpr = None, YMAP: tl.constexpr = None):
    """The log decays' gradient of one chunk n and BD lanes d of the decayed axis D, summed term by term (see
    `_dlog_decay`): r_t (+)= [exp(G_L) sum(h_n * dh_n) + sum_{s<t} y_s exp(G_L - G_s) (z_s . dh_n) if STATE]
    + sum_{u>=t} x_u exp(Gq_u) (w_u . h_n) + sum_{s<t<=u} M_us x_u y_s exp(Gq_u - G_s) (u > t if SHIFT).
    M [B*H, NT*BT, BT] the plain scores over the undecayed axis E, [u, s], causal mask included; x, y [B, T, H, D];
    w, z [B, T, H, E]; h, dh [B, H, NT, K, V] float32 (D = K rows if not VALUE, V columns if VALUE); G [B, T, H, D]
    float64 chunk-local; Gq_u = G_u, or G_{u-1} if SHIFT (an exclusive query). Every exponent is <= 0 and every
    term a part of the true sum: nothing cancels. 0 where the log decay g was floored (exp' = exp is 0 there, as in
    the reference: a -inf step gets no gradient). The pair term is one [BT, BT] block per lane (a reverse cumsum
    over u, a masked sum over s), O(BT^2) per lane; the state terms are [BT, BE] x [BE, BD] dots.
    XMAP, YMAP (`_mapped`): the spec's elementwise maps of the raw x and y (a key decay's q and k) as loaded."""
    i_n, i_d, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    NT = tl.cdiv(T, BT)
    t0 = i_n * BT
    bos = (i_b.to(tl.int64) * T + t0) * H + i_h
    o_i = tl.arange(0, BT)
    o_j = tl.arange(0, BD)
    o_d = i_d * BD + o_j
    m_d = o_d < D
    m_t = t0 + o_i < T
    m = m_t[:, None] & m_d[None, :]
    offs = bos * D + o_i[:, None] * (H * D) + o_d[None, :]  # [BT, BD]
    last = tl.minimum(BT, T - t0) - 1  # the chunk's last step, local
    b_g = tl.load(gc + offs, mask=m, other=0.0)  # float64
    b_gl = tl.load(gc + bos * D + last * (H * D) + o_d, mask=m_d, other=0.0)  # [BD] G_L
    if SHIFT:
        b_gq = tl.load(gc + offs - H * D, mask=m & (o_i[:, None] >= 1), other=0.0)
    else:
        b_gq = b_g
    b_x = _mapped(tl.load(x + offs, mask=m, other=0.0).to(tl.float32), m, XMAP)
    # the state terms: w_u . h_n and z_s . dh_n over the undecayed axis E, h_n's [d, e] element at d*V + e (rows)
    # or e*V + d (a value decay's columns)
    p_h = (i_bh.to(tl.int64) * NT + i_n) * (D * E)
    offs_e = bos * E + o_i[:, None] * (H * E)
    b_wh = tl.zeros([BT, BD], dtype=tl.float32)
    b_zd = tl.zeros([BT, BD], dtype=tl.float32)
    b_hdh = tl.zeros([BD], dtype=tl.float32)
    for e0 in range(0, E, BE):
        o_e = e0 + tl.arange(0, BE)
        m_e = o_e < E
        if VALUE:
            p_de = o_e[:, None] * D + o_d[None, :]  # [BE, BD]
        else:
            p_de = o_d[None, :] * E + o_e[:, None]
        m_de = m_e[:, None] & m_d[None, :]
        b_h = tl.load(h + p_h + p_de, mask=m_de, other=0.0).to(tl.float32)  # h may be stored in the input dtype
        b_w = tl.load(w + offs_e + o_e[None, :], mask=m_t[:, None] & m_e[None, :], other=0.0).to(tl.float32)
        b_wh += tl.dot(b_w, b_h, input_precision=PREC)
        if STATE:
            b_dh = tl.load(dh + p_h + p_de, mask=m_de, other=0.0).to(tl.float32)
            b_z = tl.load(z + offs_e + o_e[None, :], mask=m_t[:, None] & m_e[None, :], other=0.0).to(tl.float32)
            b_zd += tl.dot(b_z, b_dh, input_precision=PREC)
            b_hdh += tl.sum(b_h * b_dh, axis=0)
    # sum_{u >= t} x_u exp(Gq_u) (w_u . h_n); a strict reverse sum for an exclusive query
    b_t2 = tl.where(m, b_x * _decay(b_gq, 0.0) * b_wh, 0.0)
    b_r = tl.cumsum(b_t2, axis=0, reverse=True)
    if SHIFT:
        b_r -= b_t2
    if STATE:
        b_y = _mapped(tl.load(y + offs, mask=m, other=0.0).to(tl.float32), m, YMAP)
        b_t3 = tl.where(m, b_y * _decay(b_gl[None, :], tl.where(m, b_g, b_gl[None, :])) * b_zd, 0.0)
        b_r += tl.cumsum(b_t3, axis=0) - b_t3  # for s < t
        b_r += (_decay(b_gl, 0.0) * b_hdh)[None, :]
    # the pair term, one lane at a time: P[u, s] = M_us x_u y_s exp(Gq_u - G_s) for s < u, then
    # C[t, s] = sum_{u >= t} P[u, s] and r_t += sum_{s < t} C[t, s]
    p_M = M + (i_bh.to(tl.int64) * NT * BT + t0) * BT
    m_us = o_i[None, :] < o_i[:, None]  # s < u
    b_M = tl.load(p_M + o_i[:, None] * BT + o_i[None, :], mask=m_t[:, None] & m_t[None, :], other=0.0)
    b_M = tl.where(m_us, b_M, 0.0)
    for j in range(0, BD):
        d = i_d * BD + j
        m_c = m_t & (o_i * 0 + d < D)  # a [BT] mask (the interpreter takes no scalar one)
        p_c = bos * D + o_i * (H * D) + d
        b_xc = _mapped(tl.load(x + p_c, mask=m_c, other=0.0).to(tl.float32), m_c, XMAP)
        b_yc = _mapped(tl.load(y + p_c, mask=m_c, other=0.0).to(tl.float32), m_c, YMAP)
        b_gc = tl.load(gc + p_c, mask=m_c, other=0.0)
        if SHIFT:
            b_gqc = tl.load(gc + p_c - H * D, mask=m_c & (o_i >= 1), other=0.0)
        else:
            b_gqc = b_gc
        b_gu = tl.where(m_us, b_gqc[:, None], b_gc[None, :])  # masked pairs get exp(0), times M = 0
        b_P = b_M * b_xc[:, None] * b_yc[None, :] * _decay(b_gu, b_gc[None, :])
        b_C = tl.cumsum(b_P, axis=0, reverse=True)
        if SHIFT:
            b_C -= b_P
        b_rc = tl.sum(tl.where(m_us, b_C, 0.0), axis=1)  # [t]: the rows are t, s < t
        b_r += tl.where(o_j[None, :] == j, b_rc[:, None], 0.0)
    if ACC:
        b_r += tl.load(r + offs, mask=m, other=0.0)
    b_r = tl.where(tl.load(g + offs, mask=m, other=0.0).to(tl.float32) < FLOOR, 0.0, b_r)
    tl.store(r + offs, b_r, mask=m)


@_register_limited(lambda a: a["PREC"] == "ieee")
# under ieee dots (float32) unasked ptxas stopped Mamba2's at 128 registers (8 warps) and spilled 16 B (sm_90, K = V =
# 128); the half-precision binaries stay as they were
@triton.jit
def _dlog_scalar_kernel(A, dA, q, k, v, do, h, dh, g, gc, r, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, SHIFT: tl.constexpr,
                        STATE: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, FLOOR: tl.constexpr,
                        QMAP: tl.constexpr = None, KMAP: tl.constexpr = None, GMAP: tl.constexpr = None,
                        GVJP: tl.constexpr = None):
    """A scalar decay's log-decay gradient r [B, T, H] for one chunk n: `_dlog_chunk_kernel`'s sum with its K lanes
    summed inside the terms, so the pair term is one [BT, BT] block per chunk, never one per lane:
        r_t (+)= [exp(G_L) sum(h_n * dh_n) + sum_{s<t} exp(G_L - G_s) (k_s^T dh_n v_s) if STATE]
               + sum_{u>=t} exp(Gq_u) (q_u^T h_n do_u) + sum_{s<t<=u} A_us dA_us exp(Gq_u - G_s)   (u > t if SHIFT)
    A = q k^T and dA = do v^T the plain scores [B*H, NT*BT, BT] (causal mask included), G [B, T, H] float64
    chunk-local, Gq_u = G_u or G_{u-1} if SHIFT; h, dh [B, H, NT, K, V] (h may be bfloat16). 0 where the log decay g
    [B, T, H] was floored. The bilinear state terms are [BT, BK] x [BK, BV] dots reduced against [BT, BV] tiles.
    QMAP, KMAP (`_mapped`): the spec's elementwise maps of the raw q and k, applied as they are loaded. GMAP, GVJP
    (`_Fused.log_decay_map`): g holds the log decays' raw input x, mapped for the floor test, and r stores x's
    gradient GVJP(x, share) of this launch's share (linear in it, so shares added over queries stay right)."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    NT = tl.cdiv(T, BT)
    t0 = i_n * BT
    bos = (i_b.to(tl.int64) * T + t0) * H + i_h
    o_i = tl.arange(0, BT)
    m_t = t0 + o_i < T
    last = tl.minimum(BT, T - t0) - 1  # the chunk's last step, local
    b_g = tl.load(gc + bos + o_i * H, mask=m_t, other=0.0)  # [BT] float64
    b_gl = tl.load(gc + bos + last * H, mask=last >= 0, other=0.0)  # G_L
    if SHIFT:
        b_gq = tl.load(gc + bos + (o_i - 1) * H, mask=m_t & (o_i >= 1), other=0.0)
    else:
        b_gq = b_g
    p_h = (i_bh.to(tl.int64) * NT + i_n) * (K * V)
    b_wh = tl.zeros([BT], dtype=tl.float32)  # q_u^T h_n do_u
    b_zd = tl.zeros([BT], dtype=tl.float32)  # k_s^T dh_n v_s
    b_hdh = tl.zeros([BV], dtype=tl.float32)  # sum(h_n * dh_n), by column
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        p_tv = bos * V + o_i[:, None] * (H * V) + o_v[None, :]
        b_qh = tl.zeros([BT, BV], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_tk = m_t[:, None] & (o_k < K)[None, :]
            m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
            b_q = tl.load(q + bos * K + o_i[:, None] * (H * K) + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
            b_q = _mapped(b_q, m_tk, QMAP)
            b_h = tl.load(h + p_h + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0).to(tl.float32)
            b_qh += tl.dot(b_q, b_h, input_precision=PREC)
        b_wh += tl.sum(b_qh * tl.load(do + p_tv, mask=m_tv, other=0.0).to(tl.float32), axis=1)
        if STATE:  # a second K loop, so that only one [BT, BV] accumulator is live at a time
            b_kd = tl.zeros([BT, BV], dtype=tl.float32)
            for i_k in range(0, tl.cdiv(K, BK)):
                o_k = i_k * BK + tl.arange(0, BK)
                m_tk = m_t[:, None] & (o_k < K)[None, :]
                m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
                b_k = _mapped(tl.load(k + bos * K + o_i[:, None] * (H * K) + o_k[None, :], mask=m_tk,
                                      other=0.0).to(tl.float32), m_tk, KMAP)
                b_dh = tl.load(dh + p_h + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0)
                b_kd += tl.dot(b_k, b_dh, input_precision=PREC)
                b_h = tl.load(h + p_h + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0).to(tl.float32)
                b_hdh += tl.sum(b_h * b_dh, axis=0)
            b_zd += tl.sum(b_kd * tl.load(v + p_tv, mask=m_tv, other=0.0).to(tl.float32), axis=1)
    # sum_{u >= t} exp(Gq_u) (q_u^T h_n do_u); a strict reverse sum for an exclusive query
    b_t2 = tl.where(m_t, _decay(b_gq, 0.0) * b_wh, 0.0)
    b_r = tl.cumsum(b_t2, axis=0, reverse=True)
    if SHIFT:
        b_r -= b_t2
    if STATE:
        b_t3 = tl.where(m_t, _decay(b_gl, tl.where(m_t, b_g, b_gl)) * b_zd, 0.0)
        b_r += tl.cumsum(b_t3, axis=0) - b_t3  # for s < t
        b_r += _decay(b_gl, 0.0) * tl.sum(b_hdh, axis=0)
    # the pair term: P[u, s] = A_us dA_us exp(Gq_u - G_s) for s < u, C[t, s] = sum_{u >= t} P[u, s],
    # r_t += sum_{s < t} C[t, s]
    p_A = (i_bh.to(tl.int64) * NT * BT + t0) * BT + o_i[:, None] * BT + o_i[None, :]
    m_A = m_t[:, None] & m_t[None, :]
    m_us = o_i[None, :] < o_i[:, None]  # s < u
    b_P = tl.load(A + p_A, mask=m_A, other=0.0) * tl.load(dA + p_A, mask=m_A, other=0.0)
    # (a pair s >= u is dropped by the select; _decay clamps its exponent at 0, so it is never inf)
    b_P = tl.where(m_us, b_P * _decay(b_gq[:, None], b_g[None, :]), 0.0)
    b_C = tl.cumsum(b_P, axis=0, reverse=True)
    if SHIFT:
        b_C -= b_P
    b_r += tl.sum(tl.where(m_us, b_C, 0.0), axis=1)
    b_x = tl.load(g + bos + o_i * H, mask=m_t, other=0.0).to(tl.float32)
    b_r = tl.where(_mapped(b_x, m_t, GMAP) < FLOOR, 0.0, b_r)
    if GVJP is not None:
        b_r = tl.where(m_t, GVJP(b_x, b_r), 0.0)
    if ACC:
        b_r += tl.load(r + bos + o_i * H, mask=m_t, other=0.0)
    tl.store(r + bos + o_i * H, b_r, mask=m_t)


def _linear_forward(decay_cls, queries, k, v, log_decay, initial_state, output_final_state, cfg, packed=None,
                    fused=None, out_dtype=None, float32_states=False, unsafe=None):
    """(outputs, final state, chunk-start states h) of the linear chunked form; cfg = (BT, BK, BV, prec,
    num_warps, num_stages); packed: a `_Packed` whose layout the tensors are in, or None; fused: a `_Fused`;
    out_dtype: the outputs' dtype (None: k's; `_out_dtype`); float32_states: h in float32 for bfloat16 inputs
    too (`_chunk_states`); unsafe: None, or [1] int32 that the cumulative-sum kernel lowers to the first unsafe
    step of the mapped log decays and v_step (`_Fused.log_decay_map`)."""
    BT, BK, BV, prec, num_warps, num_stages = cfg
    f = fused if fused is not None else _NOT_FUSED
    vs = None if f.v_step is None else f.v_step.contiguous()
    if decay_cls.code == 2:
        # A key decay's kernels sum the log decays over the steps each factor spans (their SPANS): no G, no exp(G)
        # is allocated (flash-linear-attention keeps a float32 G [B, T, H, K]), and no factor is a difference of
        # two large partial sums, so a small log decay after a reset keeps its float32 precision. A per-head factor
        # (no spec of specs/ fuses one with a key decay) is applied in torch.
        head = f.decay_head
        gc = log_decay if head is None else log_decay * head.view(1, 1, -1, 1).to(log_decay.dtype)
        gc, eg = gc.contiguous(), None
    elif f.log_decay_map is not None:  # a scalar decay mapped from its raw input, checked as it is mapped
        gc, eg = _cumsum(log_decay, 1, BT, num_warps, g_map=f.log_decay_map, packed=packed,
                         check=None if unsafe is None else (unsafe, vs, f.v_step_map))
    else:
        gc, eg = decay_cls.cumsum(log_decay, BT, num_warps, head=f.decay_head)  # None without a decay
    h, ht = _chunk_states(k, v, gc, initial_state, decay_cls.code, output_final_state, BT, BK, BV, prec, num_warps,
                          num_stages, packed, vs, f.k_map, float32_states, f.v_step_map)
    if fused is not None:
        fused = _Fused(vs, f.decay_head, f.scale, None if f.skip is None else f.skip.contiguous(),
                       None if f.skip_weight is None else f.skip_weight.contiguous(), q_map=f.q_map, k_map=f.k_map,
                       v_step_map=f.v_step_map)
    outs = _outputs(queries, decay_cls, k, v, gc, eg, h, BT, BK, BV, prec, num_warps, num_stages,
                    out_dtype or k.dtype, fused)
    return outs, ht, h


class _ChunkedLinearFunction(torch.autograd.Function):
    """chunked_linear_by with its backward in the Triton kernels above; saves the chunk-start states h
    [B, H, NT, K, V] (float32, or bfloat16 for bfloat16 inputs without float32_states: `_chunk_states`) and the
    final state, never per-step states."""

    @staticmethod
    def forward(ctx, decay_cls, exclusive, cfg, packed, scale, maps, out_dtype, float32_states, unsafe, k, v,
                log_decay, initial_state, v_step, decay_head, skip, skip_weight, *qs):
        k, v = k.contiguous(), v.contiguous()
        qs = tuple(q.contiguous() for q in qs)
        fused = _Fused(v_step, decay_head, scale, skip, skip_weight, *maps)
        outs, ht, h = _linear_forward(decay_cls, list(zip(qs, exclusive)), k, v, log_decay, initial_state, True,
                                      cfg, packed, fused, out_dtype, float32_states, unsafe)
        # A value decay's dlog_decay reads o do: it keeps its own copy of o, as autograd refuses a backward whose
        # saved output the caller changed in place (`o += residual`). Not ht: the backward does not read it.
        saved_outs = [o.clone() for o in outs] if decay_cls.code == 3 else []
        ctx.save_for_backward(k, v, log_decay, initial_state, h, v_step, decay_head, skip, skip_weight, *qs,
                              *saved_outs)
        ctx.decay_cls, ctx.exclusive, ctx.cfg, ctx.packed, ctx.scale = decay_cls, exclusive, cfg, packed, scale
        ctx.maps, ctx.where = maps, _form_call()
        return (*outs, ht)

    @staticmethod
    @_first_order("its backward runs Triton kernels, which record no graph")
    def backward(ctx, *grads):
        k, v, log_decay, initial_state, h, v_step, decay_head, skip, skip_weight, *rest = ctx.saved_tensors
        nq = len(ctx.exclusive)
        qs, outs = rest[:nq], rest[nq:]
        fused = _Fused(v_step, decay_head, ctx.scale, skip, skip_weight, v_step_map=ctx.maps[2])
        # The backward runs on the materialised prologue (v * v_step, log_decay * decay_head: transient tensors of
        # the backward only) and the outputs' gradients times the scale; `_unfuse` maps the result back. The maps of
        # q and k (`_Fused.q_map`, `k_map`) are applied by the backward's kernels as they load the raw inputs, and
        # dq and dk come back as the raw inputs' gradients (their vjp helpers at the stores): no mapped copy. A
        # mapped scalar log decay is mapped where the backward loads it, and its gradient stored through its vjp
        # (`_dlog_scalar_kernel`); a mapped v_step is applied to v and differentiated by `_row_scale_kernel`.
        v_m, log_m = _materialise(fused, v, log_decay)
        dos = [None if g is None else g * ctx.scale for g in grads[:nq]] if ctx.scale != 1.0 else grads[:nq]
        dk, dv, dlog, dh0, dqs = _linear_backward(ctx.decay_cls, ctx.exclusive, ctx.cfg, qs, k, v_m, log_m,
                                                  initial_state, h, outs, dos, grads[nq], ctx.packed, ctx.maps)
        dv, dlog, dvs, ddh, dskip, dsw = _unfuse(fused, v, log_decay, grads[0] if nq else None, dv, dlog)
        need = ctx.needs_input_grad

        def cast(grad, like, i):
            return None if grad is None or not need[i] else grad.to(like.dtype)

        return (None, None, None, None, None, None, None, None, None, cast(dk, k, 9), cast(dv, v, 10),
                cast(dlog, log_decay, 11), cast(dh0, initial_state, 12), cast(dvs, v_step, 13),
                cast(ddh, decay_head, 14), cast(dskip, skip, 15), cast(dsw, skip_weight, 16),
                *(cast(dq, q, 17 + i) for i, (dq, q) in enumerate(zip(dqs, qs))))


def _linear_backward(decay_cls, exclusive, cfg, qs, k, v, log_decay, initial_state, h, outs, dos, dht,
                     packed=None, maps=(None, None)):
    """(dk, dv, dlog_decay, d initial_state, [dq per query]) in float32; the formulas above. packed: as for
    `_linear_forward` (the state gradient then runs per sequence, dht and dh0 [N, H, K, V]).

    maps: the (q_map, k_map) pairs of `_Fused` (None, or (map, vjp) helpers; not with a value decay): qs and k are
    then the raw inputs, mapped by every kernel where it loads them, and dq and dk are the raw inputs' gradients,
    each kernel storing them through the vjp helper (grad * map'(x), applied to its own share, so that shares added
    over several queries stay right). No mapped q or k and no separate pass over the gradients.

    No [B, T, H, K] G for a scalar or no decay: a scalar decay's G stays [B, T, H] (as the forward's ScalarDecay
    keeps it) and its kernels load one G per row (their DECAY 1), no decay has none (DECAY 0); and no transposed
    copy of h or dh: the kernels that contract with h^T or dh^T read them in place (TRANS_H, TRANS_DM)."""
    BT, BK, BV, prec, num_warps, num_stages = cfg
    B, T, H, K = k.shape
    V = v.shape[-1]
    NT, NC = triton.cdiv(T, BT), BT // _SUB
    value = decay_cls.code == 3
    dev, f32 = k.device, torch.float32
    # G over the decayed axis D (K, or V for a value decay), [B, T, H] for a scalar decay, None without a decay
    g = gc = eg = None
    g_map = maps[3] if len(maps) > 3 else None  # `_Fused.log_decay_map`: log_decay is its raw input
    if decay_cls.code == 1:
        g = log_decay.contiguous()
        gc, eg = _cumsum(g, 1, BT, num_warps, g_map=g_map, packed=packed)
    elif decay_cls.code == 2 or decay_cls.code == 3:
        g = log_decay.contiguous()
        gc, eg = _cumsum(g, V if value else K, BT, num_warps, with_exp=value)
    dos = [torch.zeros((B, T, H, V), dtype=f32, device=dev) if do is None else do.contiguous() for do in dos]
    dht = None if dht is None else dht.to(f32).contiguous()
    warps, stages = _or(num_warps, _WARPS), _or(num_stages, _STAGES)
    q_map, k_map = maps[:2]
    qmap, kmap, qvjp, kvjp = _map_of(q_map), _map_of(k_map), _vjp_of(q_map), _vjp_of(k_map)

    # dh[:, :, n]: the gradient of the state at the end of chunk n; dh0: of the initial state
    rows = B if packed is None else packed.N  # the states' batch
    dh = torch.empty((B, H, NT, K, V), dtype=f32, device=dev)
    dh0 = torch.empty((rows, H, K, V), dtype=f32, device=dev) if initial_state is not None else None
    for i, (q, excl, do) in enumerate(zip(qs, exclusive, dos)):
        _chunk_dstate_kernel[(triton.cdiv(K, BK), triton.cdiv(V, BV), rows * H)](
            q, do, gc if gc is not None else dh, dh, dht if dht is not None else dh, dh0 if dh0 is not None else dh,
            packed.offsets if packed is not None else dh, T, H, K, V, NT, BT, BK, BV, decay_cls.code, excl,
            i == 0 and dht is not None, i > 0, dh0 is not None, prec, packed is not None, num_warps=warps,
            num_stages=stages, QMAP=qmap)

    dk = torch.empty((B, T, H, K), dtype=f32, device=dev)
    dv = torch.empty((B, T, H, V), dtype=f32, device=dev)
    dqs, A_all, dA_all = [], [], []  # the scores of each query that the log decays' gradient reads
    for i, (q, excl, do) in enumerate(zip(qs, exclusive, dos)):
        first = i == 0
        dq = torch.empty((B, T, H, K), dtype=f32, device=dev)
        if decay_cls.code == 0 or decay_cls.code == 1:
            # the plain scores A = q k^T and dA = do v^T, masked; a scalar decay's exp(Gq_t - G_s) is applied by
            # the kernels that read them
            A = _intra_attn(q, k, None, 3, excl, excl, BT, BK, prec, num_warps, num_stages, False, q_map, k_map)
            dA = _intra_attn(do, v, None, 3, excl, excl, BT, BV, prec, num_warps, num_stages)
            A_all.append(A)
            dA_all.append(dA)
            # dq = exp(Gq) (do h^T) + (do v^T decayed, masked) k: the forward's output kernel with (q, k, v, h) =
            # (do, v, k, h^T), h read transposed in place (k mapped as loaded, dq stored as the raw q's)
            _launch(
                _chunk_output_kernel, (triton.cdiv(K, BK), NT, B * H),
                do, v, k, gc if gc is not None else do, do, h, dA, dq, v, k, dA, v, dq, dq, dq, q, 1.0, T, H, V, K, BT,
                BV, BK, decay_cls.code, excl, prec, False, False, False, TRANS_H=True, VMAP=kmap, OVJP=qvjp,
                num_warps=warps, num_stages=stages)
            # dk = (dA decayed)^T q + exp(G_last - G) (v dh^T), dv = (A decayed)^T do + exp(G_last - G) (k dh);
            # (..., the map of x, of z, the vjp of out's raw input, that input)
            # 8 warps under ieee dots too: at 4 linear_attention's spilled 16 B at 255 registers (float32, sm_90,
            # K = V = 128), none at 8 (228 registers)
            plain_warps = _or(num_warps, _CHUNK_BWD_PLAIN_WARPS if decay_cls.code or prec == "ieee" else _WARPS)
            for M, x, z, trans, out, D, DZ, BD, BZ, xmap, zmap, ovjp, ox in (
                    (dA, q, v, True, dk, K, V, BK, BV, qmap, None, kvjp, k),
                    (A, do, k, False, dv, V, K, BV, BK, None, kmap, None, dv)):
                _launch(
                    _chunk_bwd_plain_kernel, (triton.cdiv(D, BD), NT, B * H),
                    M, x, gc if gc is not None else M, z, dh, out, ox, T, H, D, DZ, BT, BD, BZ, first, not first,
                    prec, decay_cls.code, excl, trans, XMAP=xmap, ZMAP=zmap, OVJP=ovjp,
                    num_warps=plain_warps, num_stages=stages)
        else:
            # a key or value decay: the forward's scores A = q k^T and dA = do v^T, masked; the one over the decayed
            # axis carries its decay
            A = _intra_attn(q, k, None if value else gc, 3 if value else 2, excl, excl, BT, BK, prec, num_warps,
                            num_stages, False, q_map, k_map)
            dA = _intra_attn(do, v, gc if value else None, 2 if value else 3, excl, excl, BT, BV, prec, num_warps,
                             num_stages)
            (A_all if value else dA_all).append(A if value else dA)
            if value:  # dq = (do exp(Gq)) h^T + dA k: the key-decay output kernel with (q, v, h) = (do, k, h^T)
                _launch(
                    _chunk_output_kernel, (triton.cdiv(K, BK), NT, B * H),
                    do, do, k, gc, eg, h, dA, dq, do, k, dA, do, dq, dq, dq, dq, 1.0, T, H, V, K, BT, BV, BK, 2, excl,
                    prec, False, False, False, TRANS_H=True, num_warps=_or(num_warps, _KEY_OUTPUT_WARPS),
                    num_stages=stages)
            else:  # dq = exp(Gq) (do h^T) + decayed dA k: the value-decay output kernel, (q, v, h) = (do, k, h^T)
                _chunk_output_value_kernel[(triton.cdiv(K, BK), NT * NC, B * H)](
                    do, k, gc, h, dA, dq, q, T, H, V, K, BT, _SUB, BV, BK, NC, excl, prec, TRANS_H=True, VMAP=kmap,
                    OVJP=qvjp, num_warps=warps, num_stages=stages)
            # (scores, x, z, dh read as dh^T, out, its width, z's width, their blocks): dk from dA and q, dv from A
            # and do; the side whose output axis is the decayed one takes the sub-chunked kernel
            # (..., the map of x, of z, the vjp of out's raw input, that input; no maps with a value decay)
            for_dk = (dA, q, v, True, dk, K, V, BK, BV, qmap, None, kvjp, k)
            for_dv = (A, do, k, False, dv, V, K, BV, BK, None, kmap, None, dv)
            decayed, plain = (for_dv, for_dk) if value else (for_dk, for_dv)
            M, x, z, trans, out, D, DZ, BD, BZ, xmap, _, ovjp, ox = decayed
            _chunk_bwd_decayed_kernel[(triton.cdiv(D, BD), NT * NC, B * H)](
                M, x, gc, z, dh, out, ox, T, H, D, DZ, BT, _SUB, BD, BZ, NC, excl, first, not first, prec, trans,
                XMAP=xmap, OVJP=ovjp, num_warps=warps, num_stages=stages)
            M, x, z, trans, out, D, DZ, BD, BZ, xmap, zmap, ovjp, ox = plain
            _launch(
                _chunk_bwd_plain_kernel, (triton.cdiv(D, BD), NT, B * H),
                M, x, gc, z, dh, out, ox, T, H, D, DZ, BT, BD, BZ, first, not first, prec, decay_cls.code, excl,
                trans, XMAP=xmap, ZMAP=zmap, OVJP=ovjp, num_warps=_or(num_warps, _CHUNK_BWD_PLAIN_WARPS),
                num_stages=stages)
        dqs.append(dq)

    dlog = None  # (tests of `decay_cls.code`, not of g: codegen/specialize.py folds them per module)
    if decay_cls.code == 1:
        dlog = _dlog_scalar(exclusive, qs, k, v, dos, g, gc, h, dh, A_all, dA_all, BT, prec, num_warps, qmap, kmap,
                            g_map)
    elif decay_cls.code == 2 or decay_cls.code == 3:
        dlog = _dlog_decay(value, exclusive, qs, k, v, dos, g, gc, h, dh, (dA_all, A_all)[value], BT, prec, warps,
                           qmap, kmap)
    return dk, dv, dlog, dh0, dqs


_DLOG_SCALAR_BV = 32  # _dlog_scalar_kernel's V block: [BT, BV] accumulator and operand tiles beside [BT, BK] ones
# _dlog_scalar_kernel: 8 warps; at 4 it spilled 64 B (255 registers) on sm_90 at K = V = 128 in bfloat16
_DLOG_SCALAR_WARPS = 8
# its K block under ieee dots (float32): Mamba2's (K = V = 128) spilled 112 B at 255 registers on sm_80 at BK = 64, 8 B
# on sm_90 at BK = 32 (mlstm's too); at 16, 233 registers and none on both
_IEEE_DLOG_SCALAR_BK = 16


def _dlog_scalar(exclusive, qs, k, v, dos, g, gc, h, dh, A_all, dA_all, BT: int, prec: str,
                 num_warps: int | None, qmap=None, kmap=None, g_map=None) -> Tensor:
    """dL/d(log decay) [B, T, H] float32 of a scalar decay: `_dlog_decay`'s sum with the K lanes summed inside its
    terms (`_dlog_scalar_kernel`, one launch per query), so neither G nor the result is ever [B, T, H, K]. A_all,
    dA_all: each query's plain scores q k^T and do v^T; g [B, T, H] the uncumulated log decays, gc their float64
    chunk-local cumulative sum. qmap, kmap: the maps of the raw q and k (`_Fused`), or None; g_map: None, or the
    (map, vjp) helpers of g's raw input (`_Fused.log_decay_map`), whose gradient is then the one returned."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    NT = triton.cdiv(T, BT)
    r = torch.empty((B, T, H), dtype=torch.float32, device=k.device)
    BK = min(_IEEE_DLOG_SCALAR_BK if prec == "ieee" else 64, _pow2_at_least_16(K))
    BV = min(_DLOG_SCALAR_BV, _pow2_at_least_16(V))
    for i, (q, excl, do, A, dA) in enumerate(zip(qs, exclusive, dos, A_all, dA_all)):
        _launch(
            _dlog_scalar_kernel, (NT, B * H),
            A, dA, q, k, v, do, h, dh, g, gc, r, T, H, K, V, BT, BK, BV, excl, i == 0, i > 0, prec, _LOG_DECAY_FLOOR,
            QMAP=qmap, KMAP=kmap, GMAP=_map_of(g_map), GVJP=_vjp_of(g_map),
            num_warps=_or(num_warps, _DLOG_SCALAR_WARPS))
    return r


def _dlog_decay(value: bool, exclusive, qs, k, v, dos, g, gc, h, dh, plain, BT: int, prec: str, warps: int,
                qmap=None, kmap=None) -> Tensor:
    """dL/d(log decay) [B, T, H, D] float32 of the linear chunked form (D = K, or V for a value decay), summed
    directly as sum_{k or v} (D_t S_{t-1}) * dS_t, never as the reverse sum of q dq - k dk (GLA's dG formula, Yang
    et al. 2023 section 4), whose two sides are each near the large state term and cancel (issue 9: a per-head
    param summing dG over every step lost 1e-5 relative). Per chunk n (start state h_n, gradient dh_n of its end
    state, G chunk-local, G_L its last), with the state S_{t-1} = exp(G_{t-1}) h_n + sum_{s<t} exp(G_{t-1} - G_s)
    k_s v_s^T and dS_t = exp(G_L - G_t) dh_n + sum_{u>=t} exp(Gq_u - G_t) q_u do_u^T (over D: key decay rows,
    value decay columns):
        dG_t = exp(G_L) sum(h_n * dh_n)                                 (every t)
             + sum_{u>=t} x_u exp(Gq_u) (w_u . h_n)                     (u > t for an exclusive query)
             + sum_{s<t} y_s exp(G_L - G_s) (z_s . dh_n)
             + sum_{s<t<=u} M_us x_u y_s exp(Gq_u - G_s)
    with (x, y, w, z, M) = (q, k, do, v, do v^T) for a key decay, (do, v, q, k, q k^T) for a value decay: every
    exponent <= 0 and every term a part of the true sum. One `_dlog_chunk_kernel` launch per query, in float32,
    O(BT^2 D + BT K V) per chunk; 0 where g [B, T, H, D] (the uncumulated log decay) was floored. qmap, kmap: the
    maps of the raw q and k (`_Fused`; a key decay's x and y), or None."""
    B, T, H, D = gc.shape
    NT = triton.cdiv(T, BT)
    y, z = (v, k) if value else (k, v)
    E = z.shape[-1]
    r = torch.empty((B, T, H, D), dtype=torch.float32, device=gc.device)
    BD = min(32, _pow2_at_least_16(D))
    BE = min(64, _pow2_at_least_16(E))
    for i, (q, excl, do, M) in enumerate(zip(qs, exclusive, dos, plain)):
        x, w = (do, q) if value else (q, do)
        _launch(
            _dlog_chunk_kernel, (NT, triton.cdiv(D, BD), B * H),
            M, x, y, w, z, h, dh, g, gc, r, T, H, D, E, BT, BD, BE, value, excl, i == 0, i > 0, prec,
            _LOG_DECAY_FLOOR, XMAP=None if value else qmap, YMAP=None if value else kmap, num_warps=_DLOG_WARPS)
    return r


def chunked_delta(queries, k, y, beta, log_decay=None, decay_axis=None, initial_state=None, chunk_size=64,
                  output_final_state=False, *, block_k=None, block_v=None, num_warps=None, num_stages=None,
                  allow_tf32=None):
    """Chunked (WY/UT) form of S_t = (I - beta_t k_t k_t^T) D_t S_{t-1} + k_t y_t^T on the GPU (Triton).

    Same arguments and returns as chunked_linear, plus beta [B, T, H]; decay_axis None, "scalar" or "key".
    Per chunk (see codegen.torch_runtime.chunked_delta for the derivation): L_ts = beta_t (k_t . k_s) decayed for
    s < t, Tm = (I + L)^-1, W = Tm diag(beta) (K * exp(G)), Uy = Tm Y; then, passing the state, U = Uy - W S0 and
    S <- D_chunk S0 + (K * exp(G_last - G))^T U; outputs are chunked_linear's with v replaced by U.
    block_k must cover K (default pow2(K)): the state kernel holds whole columns of S, as row blocks of 64
    (`_delta_blocks`), which every other kernel walks K by. block_v defaults to min(pow2(V), 64), and to 32 in the
    state kernel (16 with a key decay). Under "ieee" dots (float32 inputs, allow_tf32 not True) the chunk is at most
    32 steps and num_warps / num_stages default to 8 / 1 (`_delta_ieee_defaults`: fewer registers a thread).
    """
    if decay_axis == "value":
        raise NotImplementedError("chunked_delta supports decay_axis None, 'scalar' or 'key'; a value-axis decay "
                                  "does not commute with (I - beta k k^T) into one C x C solve: use recurrent_delta")
    _check_inputs(queries, k, y, log_decay, decay_axis, initial_state)
    B, T, H, K = k.shape
    if tuple(beta.shape) != (B, T, H):
        raise ValueError(f"beta must have shape {[B, T, H]}, got {list(beta.shape)}")
    return chunked_delta_by(_DELTA_DECAYS[decay_axis], queries, k, y, beta, log_decay, initial_state, chunk_size,
                            output_final_state, block_k=block_k, block_v=block_v, num_warps=num_warps,
                            num_stages=num_stages, allow_tf32=allow_tf32)


def chunked_delta_by(decay_cls, queries, k, y, beta, log_decay=None, initial_state=None, chunk_size=64,
                     output_final_state=False, *, block_k=None, block_v=None, num_warps=None, num_stages=None,
                     allow_tf32=None, cu_seqlens=None, v_step=None, decay_head=None, scale=1.0, skip=None,
                     skip_weight=None):
    """chunked_delta with the decay axis given as its class (NoDecay, ScalarDecay or KeyDeltaDecay; KeyDecay runs
    forward only), the entry point of generated modules; shapes and dtypes are not checked (chunked_delta does
    that). Under autograd (an input requiring grad) it is `_ChunkedDeltaFunction`, differentiated by Triton
    kernels; a class whose `delta_backward` is False raises NotImplementedError there.

    cu_seqlens: None, or int64 [N + 1] boundaries of N sequences packed into B = 1, as for chunked_linear_by
    (a zero step, beta = 0 and k = 0, is the identity of the delta step too).

    v_step, decay_head, scale, skip, skip_weight: the fused prologue and epilogue, as for chunked_linear_by (the
    values are y_t = v_step_t * y_t, gated DeltaNet's beta * v, applied by the WY kernel)."""
    # float32 dots: smaller chunks, more warps, one stage (before the packed layout, whose chunk this sets)
    chunk_size, num_warps, num_stages = _delta_ieee_defaults(k, chunk_size, num_warps, num_stages, allow_tf32)
    options = dict(chunk_size=chunk_size, block_k=block_k, block_v=block_v, num_warps=num_warps,
                   num_stages=num_stages, allow_tf32=allow_tf32)
    fused = _fused_of(v_step, decay_head, scale, skip, skip_weight, queries, decay_cls, k.shape[2])
    if cu_seqlens is None:
        return _delta_by(decay_cls, queries, k, y, beta, log_decay, initial_state, output_final_state, fused=fused,
                         **options)
    packed = _Packed(cu_seqlens, k.shape[1], chunk_size, k.device)
    if initial_state is None:
        initial_state = k.new_zeros((packed.N, k.shape[2], k.shape[3], y.shape[-1]), dtype=torch.float32)
    if fused is not None:
        fused = _Fused(packed.pad(fused.v_step), fused.decay_head, fused.scale, packed.pad(fused.skip),
                       packed.pad(fused.skip_weight) if fused.skip_step else fused.skip_weight)
    outs, ht = _delta_by(decay_cls, [(packed.pad(q), e) for q, e in queries], packed.pad(k), packed.pad(y),
                         packed.pad(beta), packed.pad(log_decay), initial_state, output_final_state, packed=packed,
                         fused=fused, **options)
    return [packed.unpad(o) for o in outs], ht


def _delta_by(decay_cls, queries, k, y, beta, log_decay, initial_state, output_final_state, *, chunk_size,
              block_k, block_v, num_warps, num_stages, allow_tf32, packed=None, fused=None):
    """chunked_delta_by on tensors in the layout of `packed` (a `_Packed`, or None: not packed); fused: a
    `_Fused` or None."""
    f = fused if fused is not None else _NOT_FUSED
    B, T, H, K = k.shape
    V = y.shape[-1]
    BT, BK, BV, prec = _config(k, V, chunk_size, block_k, block_v, allow_tf32, delta=True)
    if packed is not None:
        BT = packed.BT
    if T == 0:
        return _empty_result(queries, k, y, initial_state, output_final_state)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad
                                       for x in [k, y, beta, log_decay, initial_state] + f.tensors()
                                       + [q for q, _ in queries]):
        if not decay_cls.delta_backward:
            raise NotImplementedError(f"chunked_delta_by({decay_cls.__name__}) has no Triton backward yet (a key "
                                      "decay's is KeyDeltaDecay); call it under torch.no_grad() and differentiate "
                                      "another form")
        options = dict(chunk_size=chunk_size, block_k=block_k, block_v=block_v, num_warps=num_warps,
                       num_stages=num_stages, allow_tf32=allow_tf32, packed=packed)
        *outs, ht = _ChunkedDeltaFunction.apply(decay_cls, tuple(bool(e) for _, e in queries), options, f.scale, k, y,
                                                beta, log_decay, initial_state, *f.tensors(),
                                                *[q for q, _ in queries])
        return list(outs), (ht if output_final_state else None)
    BVS = BV if block_v is not None else min(BV, _DELTA_STATE_BV // (2 if decay_cls.code == 2 else 1))
    k, y, beta = k.contiguous(), y.contiguous(), beta.contiguous()
    KB = _delta_blocks(BK)[0]  # every kernel but the state kernel loops over K in blocks of KB
    vs = None if f.v_step is None else f.v_step.contiguous()
    gc, eg, _, w, u, h, ht = _delta_chunks(decay_cls, k, y, beta, log_decay, initial_state, output_final_state, BT,
                                           BK, BV, BVS, prec, num_warps, num_stages, packed, vs, f.decay_head)
    if fused is not None:  # U already carries v_step: the output kernel applies only the epilogue
        fused = _Fused(None, None, f.scale, None if f.skip is None else f.skip.contiguous(),
                       None if f.skip_weight is None else f.skip_weight.contiguous())
    outs = _outputs(queries, decay_cls, k, u, gc, eg, h, BT, KB, BV, prec, num_warps, num_stages, k.dtype, fused)
    return outs, ht


# ----------------------------------------------------------------------------------------------------------
# the delta rule's backward (see the module docstring for the derivation)
# ----------------------------------------------------------------------------------------------------------

_DELTA_BWD_WY_WARPS = 8  # _delta_bwd_wy_kernel holds four [BT, BT] float32 tiles (scores, Tm^T, dTm, dL)
_DELTA_BWD_WY_BV = 32  # its V block (the dU / Y tiles of dTm and dy): 64 spilled on sm_80
# _delta_bwd_dqk_kernel keeps four accumulators ([BT, BT] dP, three [BT, BK]) across its V loop: 8 warps, K blocks
# of 32 and V blocks of 32 (K blocks of 64 spilled 112-536 B on sm_80)
_DELTA_BWD_DQK_WARPS = 8
_DELTA_BWD_DQK_BK = 32
_DELTA_BWD_DQK_BV = 32
# _delta_bwd_local_kernel's V block with a decay (64 spilled 232-248 B on sm_80 with a scalar decay; without a decay
# 64 runs clean and 32 leaves ptxas an 8-byte stack slot at K = 128 on sm_80, so no decay keeps the call's BV)
_DELTA_BWD_LOCAL_BV = 32
_CHUNK_BWD_PLAIN_WARPS = 8  # _chunk_bwd_plain_kernel: [BT, 64] x [64, 64] tiles spilled 16 B on sm_80 at 4 warps
# (without a decay it takes the default 4: at 8 it spilled 8 B on sm_80 at K = V = 128 in float16, 80 registers)
_DELTA_BWD_WY_K_BK = 32  # _delta_bwd_wy_k_kernel's K block: [BT, 64] tiles spill there at K = 128 (sm_90)


@triton.jit
def _delta_bwd_local_kernel(q, k, gc, eg, A, do, dv, dhq, scale, T, H: tl.constexpr, K: tl.constexpr,
                            V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                            DECAY: tl.constexpr, EXCLUSIVE: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """One query's chunk-local terms for one (BV tile, chunk, batch*head): dv (+)= P^T dO, the scores' share of
    dU, and dhq[n] (+)= (q * exp(Gq))^T dO, the query's share of the gradient of the chunk's start state. With a
    key decay (DECAY 2) P is read from A (the forward's _intra_attn_kernel scores) and exp(Gq) from eg. dO is the
    output's gradient in its own dtype, times the fused readout's scale as it is loaded (no scaled or float32 copy);
    dhq may be bfloat16 (the backward's dh buffer for bfloat16 inputs): it is summed in float32 and rounded once."""
    i_vt, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    NT = tl.cdiv(T, BT)
    t0 = i_n * BT
    bos = (i_b.to(tl.int64) * T + t0) * H + i_h
    o_i = tl.arange(0, BT)
    m_t = t0 + o_i < T
    if EXCLUSIVE:  # Gq_t = G_{t-1} inside the chunk, 0 at its start
        o_ig = o_i - 1
        m_tg = m_t & (o_i > 0)
    else:
        o_ig = o_i
        m_tg = m_t
    o_v = i_vt * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_tv = m_t[:, None] & m_v[None, :]
    p_tv = bos * V + o_i[:, None] * (H * V) + o_v[None, :]
    b_do = tl.load(do + p_tv, mask=m_tv, other=0.0).to(tl.float32) * scale  # [BT, BV]
    if DECAY == 1:
        b_gq = tl.load(gc + bos + o_ig * H, mask=m_tg, other=0.0)  # [BT] float64
        b_g = tl.load(gc + bos + o_i * H, mask=m_t, other=0.0)  # [BT]
        b_doq = b_do * _safe_exp(b_gq.to(tl.float32))[:, None]  # (q exp(Gq))^T dO = q^T (exp(Gq) dO)
    else:
        b_doq = b_do
    b_At = tl.zeros([BT, BT], dtype=tl.float32)  # [s, t]: P_ts
    p_hq = dhq + (i_bh.to(tl.int64) * NT + i_n) * (K * V)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_qt = tl.load(q + bos * K + o_i[None, :] * (H * K) + o_k[:, None], mask=m_k[:, None] & m_t[None, :],
                       other=0.0).to(tl.float32)  # [BK, BT]
        b_k = tl.load(k + bos * K + o_i[:, None] * (H * K) + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                      other=0.0).to(tl.float32)  # [BT, BK]
        if DECAY == 2:  # exp(Gq) per key on q, as the forward's output kernel applies it
            b_eqt = tl.load(eg + bos * K + o_ig[None, :] * (H * K) + o_k[:, None],
                            mask=m_k[:, None] & m_tg[None, :], other=1.0)  # [BK, BT]
            b_hq = tl.dot(b_qt * b_eqt, b_doq, input_precision=PREC)  # [BK, BV]
        else:
            b_At += tl.dot(b_k, b_qt, input_precision=PREC)
            b_hq = tl.dot(b_qt, b_doq, input_precision=PREC)  # [BK, BV]
        p_kv = p_hq + o_k[:, None] * V + o_v[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        if ACC:
            b_hq += tl.load(p_kv, mask=m_kv, other=0.0).to(tl.float32)
        tl.store(p_kv, b_hq.to(dhq.dtype.element_ty), mask=m_kv)
    if DECAY == 1:
        b_At = b_At * _decay(b_gq[None, :], b_g[:, None])
    elif DECAY == 2:  # A [t, s] is already decayed and masked; read it transposed
        b_At = tl.load(A + (i_bh.to(tl.int64) * NT * BT + t0) * BT + o_i[None, :] * BT + o_i[:, None],
                       mask=(o_i[:, None] < BT) & (o_i[None, :] < BT), other=0.0)
    if EXCLUSIVE:
        b_At = tl.where(o_i[None, :] > o_i[:, None], b_At, 0.0)
    else:
        b_At = tl.where(o_i[None, :] >= o_i[:, None], b_At, 0.0)
    b_dv = tl.dot(b_At, b_do, input_precision=PREC)  # [BT, BV]
    if ACC:
        b_dv += tl.load(dv + p_tv, mask=m_tv, other=0.0)
    tl.store(dv + p_tv, b_dv, mask=m_tv)


@triton.jit
def _delta_dh_du(k, gc, b_dh, b_gl, bos, o_i, m_t, i_last, i_kb, H: tl.constexpr, K: tl.constexpr,
                 KB: tl.constexpr, DECAY: tl.constexpr, PREC: tl.constexpr):
    """(k exp(G_last - G))[:, block] @ dS[block, :] for one chunk ([BT, BV] float32): the block's share of dU.
    b_gl: a scalar decay's G_last (DECAY 1; the caller loads it once per chunk)."""
    o_k = i_kb * KB + tl.arange(0, KB)
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    p_tk = bos * K + o_i[:, None] * (H * K) + o_k[None, :]  # [BT, KB] offsets of k
    b_k = tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    if DECAY == 1:
        b_g = tl.load(gc + bos + o_i * H, mask=m_t, other=0.0)  # [BT]
        b_k = b_k * _decay(b_gl, b_g)[:, None]
    elif DECAY == 2:  # per key: exp(G_last - G_t) on k
        b_gl = tl.load(gc + bos * K + i_last * (H * K) + o_k, mask=m_k, other=0.0)  # [KB] float64
        b_k = b_k * _decay(b_gl[None, :], tl.load(gc + p_tk, mask=m_tk, other=0.0))
    return tl.dot(b_k, b_dh, input_precision=PREC)


@triton.jit
def _delta_dh_update(w, gc, dhq, dh, b_dh, b_du, b_gl, p_n, bos, o_i, m_t, i_last, o_v, m_v, i_kb, H: tl.constexpr,
                     K: tl.constexpr, V: tl.constexpr, KB: tl.constexpr, DECAY: tl.constexpr, PREC: tl.constexpr):
    """Stores dS[block] as dh[n][block] and returns exp(G_last) dS[block] + dhq[n][block] - W[:, block]^T dU
    ([KB, BV] float32). dhq[n] is read before dh[n] is stored, so dh and dhq may be one buffer (the tile is this
    program's). b_gl: as in _delta_dh_du."""
    o_k = i_kb * KB + tl.arange(0, KB)
    m_k = o_k < K
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]  # [KB, BV]
    b_wt = tl.load(w + bos * K + o_i[None, :] * (H * K) + o_k[:, None], mask=m_k[:, None] & m_t[None, :],
                   other=0.0).to(tl.float32)  # [KB, BT]
    b_dhq = tl.load(dhq + p_n + o_kv, mask=m_kv, other=0.0).to(tl.float32)
    tl.store(dh + p_n + o_kv, b_dh.to(dh.dtype.element_ty), mask=m_kv)
    if DECAY == 1:
        b_dh = b_dh * tl.exp(b_gl.to(tl.float32))
    elif DECAY == 2:  # per key: exp(G_last) on the rows of dS
        b_gl = tl.load(gc + bos * K + i_last * (H * K) + o_k, mask=m_k, other=0.0)  # [KB] float64
        b_dh = b_dh * tl.exp(b_gl.to(tl.float32))[:, None]
    return b_dh + (b_dhq - tl.dot(b_wt, b_du, input_precision=PREC))


@triton.jit
def _delta_bwd_dh_kernel(k, gc, w, dv, dhq, dht, dh, dh0, du, offsets, T, H: tl.constexpr, K: tl.constexpr,
                         V: tl.constexpr, NT, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                         DECAY: tl.constexpr, USE_DHT: tl.constexpr, PREC: tl.constexpr, VARLEN: tl.constexpr):
    """The state's gradient dS passed backwards over the chunks of one (BV tile, batch*head), whole columns in one
    [BK, BV] float32 tile (BK >= K). For n = NT - 1 .. 0: dh[n] = dS (the gradient of the state after chunk n),
    dU = dv + (k exp(G_last - G)) dS (stored to du), dS <- exp(G_last) dS + dhq[n] - W^T dU; then dh0 = dS.
    dS is carried in float32; dh and dhq (one buffer) may be bfloat16, as flash-linear-attention keeps dh in the
    input dtype (`chunk_gated_delta_rule_bwd_dhu`). VARLEN: as in _delta_state_kernel, sequence i_bh // H's chunks
    only, from dht[seq] back to dh0[seq]."""
    i_vt, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    c0, c1, i_row, bt0 = _chunk_range(offsets, i_b, i_h, i_bh, T, NT, VARLEN)  # VARLEN: dh, dhq [1, H, NT, K, V]
    o_i = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_vt * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]  # [BK, BV]
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dh += tl.load(dht + i_bh.to(tl.int64) * (K * V) + o_kv, mask=m_kv, other=0.0).to(tl.float32)
    for i_r in range(0, c1 - c0):
        i_n = c1 - 1 - i_r
        p_n = (i_row.to(tl.int64) * NT + i_n) * (K * V)
        t0 = i_n * BT
        bos = (bt0 + t0) * H + i_h
        m_t = t0 + o_i < T
        i_last = tl.minimum(BT, T - t0) - 1  # last valid row of the chunk
        m_tk = m_t[:, None] & m_k[None, :]
        p_tk = bos * K + o_i[:, None] * (H * K) + o_k[None, :]  # [BT, BK] offsets of k and w
        b_k = tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32)
        if DECAY == 1:
            b_gl = tl.load(gc + bos + i_last * H, mask=i_last >= 0, other=0.0)
            b_g = tl.load(gc + bos + o_i * H, mask=m_t, other=0.0)  # [BT]
            b_k = b_k * _decay(b_gl, b_g)[:, None]
        elif DECAY == 2:  # per key: exp(G_last - G_t) on k, exp(G_last) on the rows of dS
            b_gl = tl.load(gc + bos * K + i_last * (H * K) + o_k, mask=m_k, other=0.0)  # [BK] float64
            b_k = b_k * _decay(b_gl[None, :], tl.load(gc + p_tk, mask=m_tk, other=0.0))
        m_tv = m_t[:, None] & m_v[None, :]
        p_tv = bos * V + o_i[:, None] * (H * V) + o_v[None, :]
        b_du = tl.load(dv + p_tv, mask=m_tv, other=0.0) + tl.dot(b_k, b_dh, input_precision=PREC)  # [BT, BV]
        tl.store(du + p_tv, b_du, mask=m_tv)
        b_wt = tl.load(w + bos * K + o_i[None, :] * (H * K) + o_k[:, None], mask=m_k[:, None] & m_t[None, :],
                       other=0.0).to(tl.float32)  # [BK, BT]
        # dhq[n] is read before dh[n] is stored, so dh and dhq may be one buffer (the tile is this program's)
        b_dhq = tl.load(dhq + p_n + o_kv, mask=m_kv, other=0.0).to(tl.float32)
        tl.store(dh + p_n + o_kv, b_dh.to(dh.dtype.element_ty), mask=m_kv)
        if DECAY == 1:
            b_dh = b_dh * tl.exp(b_gl.to(tl.float32))
        elif DECAY == 2:
            b_dh = b_dh * tl.exp(b_gl.to(tl.float32))[:, None]
        b_dh += b_dhq - tl.dot(b_wt, b_du, input_precision=PREC)
    tl.store(dh0 + i_bh.to(tl.int64) * (K * V) + o_kv, b_dh, mask=m_kv)


@triton.jit
def _delta_bwd_dh_rows_kernel(k, gc, w, dv, dhq, dht, dh, dh0, du, offsets, T, H: tl.constexpr, K: tl.constexpr,
                              V: tl.constexpr, NT, BT: tl.constexpr, KB: tl.constexpr, NK: tl.constexpr,
                              BV: tl.constexpr, DECAY: tl.constexpr, USE_DHT: tl.constexpr, PREC: tl.constexpr,
                              VARLEN: tl.constexpr):
    """_delta_bwd_dh_kernel's pass with dS in NK <= 4 float32 row blocks of KB rows (NK * KB >= K), for "ieee" dots
    (float32 inputs at K > 64, `_delta_bwd_dh_blocks`): Triton lowers an ieee dot to FMA loops that hold an
    operand's whole K extent per thread, so k [BT, 128] @ dS [128, BV] in one block spilled. Each chunk sums every
    block's share of dU = dv + (k exp(G_last - G)) dS before any block of dS moves on (dU couples all K rows); the
    rest is as in _delta_bwd_dh_kernel, which the half-precision calls keep (one block: its registers unchanged)."""
    i_vt, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    c0, c1, i_row, bt0 = _chunk_range(offsets, i_b, i_h, i_bh, T, NT, VARLEN)  # VARLEN: dh, dhq [1, H, NT, K, V]
    o_i = tl.arange(0, BT)
    o_v = i_vt * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_dh1 = tl.zeros([KB, BV], dtype=tl.float32)
    if NK > 1:
        b_dh2 = tl.zeros([KB, BV], dtype=tl.float32)
    if NK > 2:
        b_dh3 = tl.zeros([KB, BV], dtype=tl.float32)
        b_dh4 = tl.zeros([KB, BV], dtype=tl.float32)
    if USE_DHT:
        p_dht = dht + i_bh.to(tl.int64) * (K * V)
        b_dh1 += _block_load(p_dht, 0, o_v, m_v, K, V, KB)
        if NK > 1:
            b_dh2 += _block_load(p_dht, 1, o_v, m_v, K, V, KB)
        if NK > 2:
            b_dh3 += _block_load(p_dht, 2, o_v, m_v, K, V, KB)
            b_dh4 += _block_load(p_dht, 3, o_v, m_v, K, V, KB)
    for i_r in range(0, c1 - c0):
        i_n = c1 - 1 - i_r
        p_n = (i_row.to(tl.int64) * NT + i_n) * (K * V)
        t0 = i_n * BT
        bos = (bt0 + t0) * H + i_h
        m_t = t0 + o_i < T
        i_last = tl.minimum(BT, T - t0) - 1  # last valid row of the chunk
        m_tv = m_t[:, None] & m_v[None, :]
        p_tv = bos * V + o_i[:, None] * (H * V) + o_v[None, :]
        b_gl = 0.0  # a scalar decay's G_last, loaded once for every block
        if DECAY == 1:
            b_gl = tl.load(gc + bos + i_last * H, mask=i_last >= 0, other=0.0)
        # every block's share of dU before any block of dS moves on (dU couples all K rows)
        b_du = tl.load(dv + p_tv, mask=m_tv, other=0.0) + _delta_dh_du(k, gc, b_dh1, b_gl, bos, o_i, m_t, i_last, 0, H,
                                                                       K, KB, DECAY, PREC)
        if NK > 1:
            b_du += _delta_dh_du(k, gc, b_dh2, b_gl, bos, o_i, m_t, i_last, 1, H, K, KB, DECAY, PREC)
        if NK > 2:
            b_du += _delta_dh_du(k, gc, b_dh3, b_gl, bos, o_i, m_t, i_last, 2, H, K, KB, DECAY, PREC)
            b_du += _delta_dh_du(k, gc, b_dh4, b_gl, bos, o_i, m_t, i_last, 3, H, K, KB, DECAY, PREC)
        tl.store(du + p_tv, b_du, mask=m_tv)
        b_dh1 = _delta_dh_update(w, gc, dhq, dh, b_dh1, b_du, b_gl, p_n, bos, o_i, m_t, i_last, o_v, m_v, 0,
                                 H, K, V, KB, DECAY, PREC)
        if NK > 1:
            b_dh2 = _delta_dh_update(w, gc, dhq, dh, b_dh2, b_du, b_gl, p_n, bos, o_i, m_t, i_last, o_v, m_v, 1,
                                     H, K, V, KB, DECAY, PREC)
        if NK > 2:
            b_dh3 = _delta_dh_update(w, gc, dhq, dh, b_dh3, b_du, b_gl, p_n, bos, o_i, m_t, i_last, o_v, m_v, 2,
                                     H, K, V, KB, DECAY, PREC)
            b_dh4 = _delta_dh_update(w, gc, dhq, dh, b_dh4, b_du, b_gl, p_n, bos, o_i, m_t, i_last, o_v, m_v, 3,
                                     H, K, V, KB, DECAY, PREC)
    p_dh0 = dh0 + i_bh.to(tl.int64) * (K * V)
    _block_store(p_dh0, b_dh1, 0, o_v, m_v, K, V, KB)
    if NK > 1:
        _block_store(p_dh0, b_dh2, 1, o_v, m_v, K, V, KB)
    if NK > 2:
        _block_store(p_dh0, b_dh3, 2, o_v, m_v, K, V, KB)
        _block_store(p_dh0, b_dh4, 3, o_v, m_v, K, V, KB)


@_register_limited(lambda a: a["PREC"] == "ieee")
# under ieee dots ptxas stopped DeltaNet's float32 dqk kernel at 128 registers and spilled 8 B (sm_80, K = V = 128);
# the half-precision calls' binaries stay as they were
@triton.jit
def _delta_bwd_dqk_kernel(q, k, gc, eg, h, ht, u, du, dh, do, dq, dk, dw, dgk, dPs, scale, T, H: tl.constexpr,
                          K: tl.constexpr, V: tl.constexpr, NT, NKB: tl.constexpr, BT: tl.constexpr,
                          BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr, EXCLUSIVE: tl.constexpr,
                          FIRST: tl.constexpr, PREC: tl.constexpr, ENDS: tl.constexpr):
    """For one (BK block, chunk, batch*head) and one query: dq; the scores' share of dk (added to dk unless FIRST);
    with FIRST also the state update's share of dk, dW = -dU S0^T and, with a decay, dG's k-side and G_last terms;
    with a scalar decay also its q-side term q_t . dq_t at Gq's row (dgk [B, T, H, NKB], one column per K block,
    summed by the caller). dO in its own dtype times `scale` (as _delta_bwd_local_kernel); h and dh may be
    bfloat16 (upcast at the load), the final state ht float32; dq is stored in its buffer's dtype (the query's own
    for decay None and scalar: the gradient handed back, summed in float32 and rounded once).

    With a key decay (DECAY 2) the intra-chunk terms need a per-key factor exp(Gq_t[i] - G_s[i]) that no plain
    tl.dot carries: this kernel stores the masked dP = dO U^T to dPs [B*H, NT*BT, BT] for _delta_bwd_intra_kernel
    and writes only dq's inter-chunk term exp(Gq) (dO S0^T), with FIRST dk = exp(G_last - G) (U dS1^T) (the state
    update's share, every factor with G_t on its minus side) and dgk [B, T, H, K] = sum over V of dS1 * S1 on the
    chunk's last row (the G_last term), zero on the others. ENDS (packed sequences): `ht` holds the state at the end
    of every chunk, [B, H, NT, K, V] (`_Packed.chunk_ends`), since a sequence's last chunk is not the row's."""
    i_kt, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    t0 = i_n * BT
    bos = (i_b.to(tl.int64) * T + t0) * H + i_h
    o_i = tl.arange(0, BT)
    m_t = t0 + o_i < T
    i_last = tl.minimum(BT, T - t0) - 1
    if EXCLUSIVE:
        o_ig = o_i - 1
        m_tg = m_t & (o_i > 0)
    else:
        o_ig = o_i
        m_tg = m_t
    o_k = i_kt * BK + tl.arange(0, BK)
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    p_tk = bos * K + o_i[:, None] * (H * K) + o_k[None, :]  # [BT, BK]
    p_h = h + (i_bh.to(tl.int64) * NT + i_n) * (K * V)  # S0 of the chunk
    p_dh = dh + (i_bh.to(tl.int64) * NT + i_n) * (K * V)  # dS1
    if ENDS:
        p_hn = ht + (i_bh.to(tl.int64) * NT + i_n) * (K * V)  # S1, the chunk's end state
    else:  # S1: the next chunk's S0 (h's dtype), or after the last chunk the final state (ht, float32)
        p_hn = h + (i_bh.to(tl.int64) * NT + i_n + 1) * (K * V)
        p_ht = ht + i_bh.to(tl.int64) * (K * V)
    b_dP = tl.zeros([BT, BT], dtype=tl.float32)  # dO U^T
    b_dqh = tl.zeros([BT, BK], dtype=tl.float32)  # dO S0^T
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_dkh = tl.zeros([BT, BK], dtype=tl.float32)  # U dS1^T
    b_dgl = tl.zeros([BK], dtype=tl.float32)  # sum over V of dS1 * S1
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        p_tv = bos * V + o_i[:, None] * (H * V) + o_v[None, :]
        o_kv = o_k[:, None] * V + o_v[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        b_do = tl.load(do + p_tv, mask=m_tv, other=0.0).to(tl.float32) * scale  # [BT, BV]
        b_u = tl.load(u + p_tv, mask=m_tv, other=0.0).to(tl.float32)  # [BT, BV] (a half input's dtype stored)
        b_h = tl.load(p_h + o_kv, mask=m_kv, other=0.0).to(tl.float32)  # [BK, BV]
        b_dP += tl.dot(b_do, tl.trans(b_u), input_precision=PREC)
        b_dqh += tl.dot(b_do, tl.trans(b_h), input_precision=PREC)
        if FIRST:
            b_du = tl.load(du + p_tv, mask=m_tv, other=0.0)
            b_dh = tl.load(p_dh + o_kv, mask=m_kv, other=0.0).to(tl.float32)
            b_dw -= tl.dot(b_du, tl.trans(b_h), input_precision=PREC)
            b_dkh += tl.dot(b_u, tl.trans(b_dh), input_precision=PREC)
            if DECAY != 0:
                if ENDS:
                    b_hn = tl.load(p_hn + o_kv, mask=m_kv, other=0.0)
                else:
                    b_hn = (tl.load(p_hn + o_kv, mask=m_kv & (o_kv * 0 + i_n < NT - 1), other=0.0).to(tl.float32)
                            + tl.load(p_ht + o_kv, mask=m_kv & (o_kv * 0 + i_n == NT - 1), other=0.0))
                b_dgl += tl.sum(b_dh * b_hn, axis=1)
    b_q = tl.load(q + p_tk, mask=m_tk, other=0.0).to(tl.float32)  # [BT, BK]
    b_k = tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    if EXCLUSIVE:
        b_dP = tl.where(o_i[:, None] > o_i[None, :], b_dP, 0.0)
    else:
        b_dP = tl.where(o_i[:, None] >= o_i[None, :], b_dP, 0.0)
    if DECAY == 2:
        if i_kt == 0:
            p_P = dPs + (i_bh.to(tl.int64) * NT * BT + t0) * BT + o_i[:, None] * BT + o_i[None, :]
            tl.store(p_P, b_dP, mask=(o_i[:, None] < BT) & (o_i[None, :] < BT))
        b_eq = tl.load(eg + bos * K + o_ig[:, None] * (H * K) + o_k[None, :], mask=m_tg[:, None] & m_k[None, :],
                       other=1.0)  # [BT, BK] exp(Gq)
        tl.store(dq + p_tk, (b_dqh * b_eq).to(dq.dtype.element_ty), mask=m_tk)
        if FIRST:
            b_gl = tl.load(gc + bos * K + i_last * (H * K) + o_k, mask=m_k, other=0.0)  # [BK] float64
            b_dkh = b_dkh * _decay(b_gl[None, :], tl.load(gc + p_tk, mask=m_tk, other=0.0))
            tl.store(dw + p_tk, b_dw, mask=m_tk)
            tl.store(dk + p_tk, b_dkh, mask=m_tk)
            tl.store(dgk + p_tk, tl.where((o_i == i_last)[:, None], b_dgl[None, :], 0.0), mask=m_tk)
        return
    if DECAY == 1:
        b_gq = tl.load(gc + bos + o_ig * H, mask=m_tg, other=0.0)  # [BT] float64
        b_g = tl.load(gc + bos + o_i * H, mask=m_t, other=0.0)
        b_dP = b_dP * _decay(b_gq[:, None], b_g[None, :])
        b_dqh = b_dqh * _safe_exp(b_gq.to(tl.float32))[:, None]
    b_dq = b_dqh + tl.dot(b_dP, b_k, input_precision=PREC)
    tl.store(dq + p_tk, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    if DECAY == 1:  # the q-side factor exp(Gq_t): q_t . dq_t, at row t - 1 for an exclusive query (none at row 0)
        b_qdq = tl.sum(b_q * b_dq, axis=1)  # [BT]
        if EXCLUSIVE:
            b_qdq = tl.sum(tl.where(o_i[None, :] == o_i[:, None] + 1, b_qdq[None, :], 0.0), axis=1)
    b_dkn = tl.dot(tl.trans(b_dP), b_q, input_precision=PREC)  # [BT, BK] this call's k-side share of dk
    if FIRST:
        if DECAY == 1:
            b_gl = tl.load(gc + bos + i_last * H, mask=i_last >= 0, other=0.0)
            b_dkh = b_dkh * _decay(b_gl, b_g)[:, None]
        b_dkn += b_dkh
        tl.store(dw + p_tk, b_dw, mask=m_tk)
        tl.store(dk + p_tk, b_dkn, mask=m_tk)
    else:
        tl.store(dk + p_tk, b_dkn + tl.load(dk + p_tk, mask=m_tk, other=0.0), mask=m_tk)
    if DECAY == 1:
        b_dg = b_qdq - tl.sum(b_k * b_dkn, axis=1)  # [BT]: every k-side factor here has G_t on its minus side
        if FIRST:
            b_dg += tl.where(o_i == i_last, tl.sum(b_dgl, axis=0), 0.0)
        p_dg = dgk + (bos + o_i * H) * NKB + i_kt
        if not FIRST:
            b_dg += tl.load(p_dg, mask=m_t, other=0.0)
        tl.store(p_dg, b_dg, mask=m_t)


@triton.jit
def _delta_bwd_intra_kernel(M, x, gc, out, T, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                            BC: tl.constexpr, BK: tl.constexpr, NC: tl.constexpr, SHIFT: tl.constexpr,
                            TRANS: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Key decay only: the intra-chunk contraction of a masked [BT, BT] matrix M (per chunk, in a [B*H, NT*BT, BT]
    buffer: dP or dA, zero where s > t) with a per-key decay, for one BC-row sub-chunk i of out [B, T, H, K]:
      rows    (not TRANS)  out_t[c] (+)= sum_s M_ts x_s[c] exp(Gq_t[c] - G_s[c])   (dq from dP, dk's row side of dA)
      columns (TRANS)      out_s[c] (+)= sum_t M_ts x_t[c] exp(Gq_t[c] - G_s[c])   (dk's column side of dP and dA)
    with Gq_t = G_t, or G_{t-1} if SHIFT (0 at the chunk start). The forward's sub-chunking (_intra_attn_kernel):
    a sub-chunk pair off the diagonal goes through G at a reference row between them, so both factors have an
    exponent <= 0 and the sum is one tl.dot (rows: the last row of sub-chunk i - 1; columns: the last row of
    sub-chunk i); the diagonal sub-block takes exp(Gq_t - G_s) directly, one row or column at a time."""
    i_nc, i_kt, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_i = i_nc // NC, i_nc % NC
    i_b, i_h = i_bh // H, i_bh % H
    NT = tl.cdiv(T, BT)
    t0 = i_n * BT
    bos = (i_b.to(tl.int64) * T + t0) * H + i_h
    p_x, p_g = x + bos * K, gc + bos * K
    p_M = M + (i_bh.to(tl.int64) * NT * BT + t0) * BT
    o_c = tl.arange(0, BC)
    o_r = i_i * BC + o_c  # [BC] the output rows (local to the chunk)
    m_r = t0 + o_r < T
    o_k = i_kt * BK + tl.arange(0, BK)
    m_k = o_k < K
    m_rk = m_r[:, None] & m_k[None, :]
    p_rk = o_r[:, None] * (H * K) + o_k[None, :]  # [BC, BK]
    m_cc = (o_c[:, None] < BC) & (o_c[None, :] < BC)  # M has every row and column of the chunk
    b_out = tl.zeros([BC, BK], dtype=tl.float32)
    if not TRANS:
        if SHIFT:
            b_gq = tl.load(p_g + p_rk - H * K, mask=m_rk & (o_r > 0)[:, None], other=0.0)  # [BC, BK] float64
        else:
            b_gq = tl.load(p_g + p_rk, mask=m_rk, other=0.0)
        if i_i > 0:
            i_ref = i_i * BC - 1  # Gq_t <= G_ref <= G_s for t in sub-chunk i, s before it
            b_gr = tl.load(p_g + i_ref * (H * K) + o_k, mask=m_k & (o_k * 0 + t0 + i_ref < T), other=0.0)
            b_acc = tl.zeros([BC, BK], dtype=tl.float32)
            for j in range(0, i_i):
                o_s = j * BC + o_c
                m_sk = (t0 + o_s < T)[:, None] & m_k[None, :]
                p_sk = o_s[:, None] * (H * K) + o_k[None, :]
                b_xs = tl.load(p_x + p_sk, mask=m_sk, other=0.0).to(tl.float32)
                b_gs = tl.load(p_g + p_sk, mask=m_sk, other=0.0)
                b_m = tl.load(p_M + o_r[:, None] * BT + o_s[None, :], mask=m_cc, other=0.0)  # [BC t, BC s]
                b_acc += tl.dot(b_m, b_xs * _decay(b_gr[None, :], b_gs), input_precision=PREC)
            b_out += b_acc * _decay(b_gq, b_gr[None, :])
        for c in range(0, BC):  # the diagonal sub-block, one column s at a time
            i_s = i_i * BC + c
            m_s = m_k & (o_k * 0 + t0 + i_s < T)
            b_m = tl.load(p_M + o_r * BT + i_s, mask=o_c < BC, other=0.0)  # [BC] column s of M
            b_xs = tl.load(p_x + i_s * (H * K) + o_k, mask=m_s, other=0.0).to(tl.float32)  # [BK]
            b_gs = tl.load(p_g + i_s * (H * K) + o_k, mask=m_s, other=0.0)
            b_out += b_m[:, None] * b_xs[None, :] * _decay(b_gq, b_gs[None, :])
    else:
        b_gs = tl.load(p_g + p_rk, mask=m_rk, other=0.0)  # [BC, BK] float64 G_s
        if i_i < NC - 1:
            i_ref = i_i * BC + BC - 1  # G_s >= G_ref >= Gq_t for s in sub-chunk i, t after it
            b_gr = tl.load(p_g + i_ref * (H * K) + o_k, mask=m_k & (o_k * 0 + t0 + i_ref < T), other=0.0)
            b_acc = tl.zeros([BC, BK], dtype=tl.float32)
            for j in range(i_i + 1, NC):
                o_t = j * BC + o_c
                m_tk = (t0 + o_t < T)[:, None] & m_k[None, :]
                p_tk = o_t[:, None] * (H * K) + o_k[None, :]
                b_xt = tl.load(p_x + p_tk, mask=m_tk, other=0.0).to(tl.float32)
                if SHIFT:  # o_t >= BC here, so G_{t-1} is inside the chunk
                    b_gq = tl.load(p_g + p_tk - H * K, mask=m_tk, other=0.0)
                else:
                    b_gq = tl.load(p_g + p_tk, mask=m_tk, other=0.0)
                b_m = tl.load(p_M + o_t[None, :] * BT + o_r[:, None], mask=m_cc, other=0.0)  # [BC s, BC t] M^T
                b_acc += tl.dot(b_m, b_xt * _decay(b_gq, b_gr[None, :]), input_precision=PREC)
            b_out += b_acc * _decay(b_gr[None, :], b_gs)
        for c in range(0, BC):  # the diagonal sub-block, one row t at a time
            i_t = i_i * BC + c
            m_t = m_k & (o_k * 0 + t0 + i_t < T)
            b_m = tl.load(p_M + i_t * BT + o_r, mask=o_c < BC, other=0.0)  # [BC] row t of M
            b_xt = tl.load(p_x + i_t * (H * K) + o_k, mask=m_t, other=0.0).to(tl.float32)  # [BK]
            if SHIFT:
                b_gq = tl.load(p_g + (i_t - 1) * (H * K) + o_k, mask=m_t & (o_k * 0 + i_t > 0), other=0.0)
            else:
                b_gq = tl.load(p_g + i_t * (H * K) + o_k, mask=m_t, other=0.0)
            b_out += b_m[:, None] * b_xt[None, :] * _decay(b_gq[None, :], b_gs)
    p_out = out + bos * K + p_rk
    if ACC:
        b_out += tl.load(p_out, mask=m_rk, other=0.0)
    tl.store(p_out, b_out, mask=m_rk)


@triton.jit
def _delta_bwd_wy_kernel(k, y, beta, gc, eg, Akk, dw, du, dy, Tt, dA, Ab, vs, dvs, T, H: tl.constexpr,
                         K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                         DECAY: tl.constexpr, PREC: tl.constexpr, USE_VS: tl.constexpr):
    """The WY representation's backward for one (chunk, batch*head), first part: Tm recomputed as the forward forms
    it; dy = Tm^T dU; dTm = dU Y^T + dW (beta K exp(G))^T. Stores Tm^T to Tt and dTm to dA [B*H, NT*BT, BT] and,
    without a key decay, the decayed scores to Ab (same shape), for _delta_bwd_dl_kernel, which forms dL, dbeta's
    share and dA from them. With a key decay the decayed scores are the forward's (Akk, from _intra_attn_kernel)
    and exp(G) per key comes from eg. USE_VS: the values are Y = v_step * y (gated DeltaNet's beta * v, the fused
    prologue of `_Fused`): y's gradient is stored as v_step * (Tm^T dU), in dy's dtype, and v_step's, the row sum
    of (Tm^T dU) * y, to dvs [B, T, H] float32, so no product v_step * y nor its gradient is a tensor."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    NT = tl.cdiv(T, BT)
    t0 = i_n * BT
    bos = ((i_bh // H).to(tl.int64) * T + t0) * H + i_bh % H
    o_i = tl.arange(0, BT)
    m_t = t0 + o_i < T
    b_beta = tl.load(beta + bos + o_i * H, mask=m_t, other=0.0).to(tl.float32)  # [BT]
    p_tt = (i_bh.to(tl.int64) * NT * BT + t0) * BT + o_i[:, None] * BT + o_i[None, :]  # [BT, BT]
    m_tt = (o_i[:, None] < BT) & (o_i[None, :] < BT)  # every row of the buffers exists (NT * BT rows)
    if DECAY == 2:
        b_A = tl.load(Akk + p_tt, mask=m_tt, other=0.0)  # decayed k_t . k_s, zero where s >= t
    else:
        b_A = tl.zeros([BT, BT], dtype=tl.float32)  # k_t . k_s
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            b_k = tl.load(k + bos * K + o_i[:, None] * (H * K) + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                          other=0.0).to(tl.float32)  # [BT, BK]
            b_A += tl.dot(b_k, tl.trans(b_k), input_precision=PREC)
    if DECAY == 1:
        b_g = tl.load(gc + bos + o_i * H, mask=m_t, other=0.0)  # [BT] float64
        b_D = tl.where(o_i[:, None] > o_i[None, :], _decay(b_g[:, None], b_g[None, :]), 0.0)
        b_be = b_beta * _safe_exp(b_g.to(tl.float32))  # [BT] beta_t exp(G_t)
    else:
        b_D = tl.where(o_i[:, None] > o_i[None, :], 1.0, 0.0)
        b_be = b_beta
    b_A = b_A * b_D  # decayed and strictly lower: L = diag(beta) A
    # Tm = (I + L)^-1 by the forward's substitution, row by row
    b_T = -(b_beta[:, None] * b_A)
    if DECAY != 2:  # the decayed scores, for _delta_bwd_dl_kernel's dbeta (a key decay's are Akk already)
        tl.store(Ab + p_tt, b_A, mask=m_tt)
    for i in range(1, BT):
        b_row = tl.sum(tl.where(o_i[:, None] == i, b_T, 0.0), axis=0)
        b_row = b_row + tl.sum(b_row[:, None] * b_T, axis=0)
        b_T = tl.where(o_i[:, None] == i, b_row[None, :], b_T)
    b_T += tl.where(o_i[:, None] == o_i[None, :], 1.0, 0.0)
    b_Tt = tl.trans(b_T)
    b_dT = tl.zeros([BT, BT], dtype=tl.float32)
    if USE_VS:
        b_vs = tl.load(vs + bos + o_i * H, mask=m_t, other=0.0).to(tl.float32)  # [BT]
        b_dvs = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        p_tv = bos * V + o_i[:, None] * (H * V) + o_v[None, :]
        b_du = tl.load(du + p_tv, mask=m_tv, other=0.0).to(tl.float32)  # [BT, BV]
        b_y = tl.load(y + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        b_dy = tl.dot(b_Tt, b_du, input_precision=PREC)
        if USE_VS:
            b_dvs += tl.sum(b_dy * b_y, axis=1)
            b_y = b_y * b_vs[:, None]
            b_dy = b_dy * b_vs[:, None]
        b_dT += tl.dot(b_du, tl.trans(b_y), input_precision=PREC)
        tl.store(dy + p_tv, b_dy.to(dy.dtype.element_ty), mask=m_tv)
    if USE_VS:
        tl.store(dvs + bos + o_i * H, b_dvs, mask=m_t)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        p_tk = bos * K + o_i[:, None] * (H * K) + o_k[None, :]
        b_kb = tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32) * b_be[:, None]
        if DECAY == 2:
            b_kb = b_kb * tl.load(eg + p_tk, mask=m_tk, other=0.0)
        b_dT += tl.dot(tl.load(dw + p_tk, mask=m_tk, other=0.0), tl.trans(b_kb), input_precision=PREC)
    tl.store(Tt + p_tt, b_Tt, mask=m_tt)
    tl.store(dA + p_tt, b_dT, mask=m_tt)  # dTm, which _delta_bwd_dl_kernel turns into dA in place


@triton.jit
def _delta_bwd_dl_kernel(beta, gc, Ab, Tt, dA, dbeta, T, H: tl.constexpr, BT: tl.constexpr, DECAY: tl.constexpr,
                         PREC: tl.constexpr):
    """The WY representation's backward for one (chunk, batch*head), middle part: dL = -Tm^T dTm Tm^T (strictly
    lower) from Tm^T (Tt) and dTm (dA, as _delta_bwd_wy_kernel left it); dbeta = sum_s dL_ts (L_ts / beta_t), from
    the decayed scores Ab; dA = diag(beta) dL * decay, in place of dTm. A kernel of its own because the two chained
    [BT, BT] dots, next to the first part's tiles, spilled registers on sm_80."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    NT = tl.cdiv(T, BT)
    t0 = i_n * BT
    bos = ((i_bh // H).to(tl.int64) * T + t0) * H + i_bh % H
    o_i = tl.arange(0, BT)
    m_t = t0 + o_i < T
    p_tt = (i_bh.to(tl.int64) * NT * BT + t0) * BT + o_i[:, None] * BT + o_i[None, :]  # [BT, BT]
    m_tt = (o_i[:, None] < BT) & (o_i[None, :] < BT)
    b_Tt = tl.load(Tt + p_tt, mask=m_tt, other=0.0)
    b_dT = tl.load(dA + p_tt, mask=m_tt, other=0.0)
    b_dL = -tl.dot(tl.dot(b_Tt, b_dT, input_precision=PREC), b_Tt, input_precision=PREC)
    b_dL = tl.where(o_i[:, None] > o_i[None, :], b_dL, 0.0)
    b_A = tl.where(o_i[:, None] > o_i[None, :], tl.load(Ab + p_tt, mask=m_tt, other=0.0), 0.0)  # decayed k_t . k_s
    b_beta = tl.load(beta + bos + o_i * H, mask=m_t, other=0.0).to(tl.float32)
    tl.store(dbeta + bos + o_i * H, tl.sum(b_dL * b_A, axis=1), mask=m_t)
    if DECAY == 1:
        b_g = tl.load(gc + bos + o_i * H, mask=m_t, other=0.0)  # [BT] float64
        b_D = tl.where(o_i[:, None] > o_i[None, :], _decay(b_g[:, None], b_g[None, :]), 0.0)
    else:
        b_D = tl.where(o_i[:, None] > o_i[None, :], 1.0, 0.0)
    tl.store(dA + p_tt, b_dL * b_beta[:, None] * b_D, mask=m_tt)


@triton.jit
def _delta_bwd_wy_k_kernel(k, beta, g, gc, eg, dw, Tt, dA, dkp, dk, dbeta, dgin, dg, T, H: tl.constexpr,
                           K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, DECAY: tl.constexpr,
                           FLOOR: tl.constexpr, PREC: tl.constexpr):
    """The WY representation's backward for one (chunk, batch*head), second part: with d(beta k exp(G)) = Tm^T dW
    and dA from _delta_bwd_wy_kernel, dk (+)= its WY paths and dbeta (+)= its W path; with a decay dG (its WY terms
    plus dgin, the other kernels' terms) and dg = the chunk-local reverse cumulative sum of dG, zero where the log
    decay is below FLOOR.

    With a key decay (DECAY 2) the scores' paths are already summed by _delta_bwd_intra_kernel: dkp holds the
    terms whose factors have G_t on their plus side (dA's rows), dk those with G_t on the minus side (the state
    update, dP's and dA's columns); then dk = dkp + dk + the W path, and per key dG = dgin + k (plus - minus),
    reverse-summed over the chunk's rows."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    NT = tl.cdiv(T, BT)
    t0 = i_n * BT
    bos = ((i_bh // H).to(tl.int64) * T + t0) * H + i_bh % H
    o_i = tl.arange(0, BT)
    m_t = t0 + o_i < T
    if DECAY == 1:
        b_eg = _safe_exp(tl.load(gc + bos + o_i * H, mask=m_t, other=0.0).to(tl.float32))  # [BT] exp(G_t)
    else:
        b_eg = tl.where(m_t, 1.0, 0.0)
    b_be = tl.load(beta + bos + o_i * H, mask=m_t, other=0.0).to(tl.float32) * b_eg  # beta_t exp(G_t)
    p_tt = (i_bh.to(tl.int64) * NT * BT + t0) * BT + o_i[:, None] * BT + o_i[None, :]  # [BT, BT]
    m_tt = (o_i[:, None] < BT) & (o_i[None, :] < BT)  # every row of the buffers exists (NT * BT rows)
    b_Tt = tl.load(Tt + p_tt, mask=m_tt, other=0.0)
    b_dA = tl.load(dA + p_tt, mask=m_tt, other=0.0)
    b_dbeta = tl.load(dbeta + bos + o_i * H, mask=m_t, other=0.0)  # the scores' share, from the first part
    b_dG = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        p_tk = bos * K + o_i[:, None] * (H * K) + o_k[None, :]
        b_k = tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32)  # [BT, BK]
        b_dkb = tl.dot(b_Tt, tl.load(dw + p_tk, mask=m_tk, other=0.0), input_precision=PREC)  # d(beta k exp(G))
        if DECAY == 2:
            b_egk = tl.load(eg + p_tk, mask=m_tk, other=0.0)  # [BT, BK] exp(G_t) per key
            b_dbeta += tl.sum(b_dkb * b_k * b_egk, axis=1)
            b_dkp = b_dkb * b_be[:, None] * b_egk + tl.load(dkp + p_tk, mask=m_tk, other=0.0)
            b_dkm = tl.load(dk + p_tk, mask=m_tk, other=0.0)
            tl.store(dk + p_tk, b_dkp + b_dkm, mask=m_tk)
            b_dGk = tl.load(dgin + p_tk, mask=m_tk, other=0.0) + b_k * (b_dkp - b_dkm)
            b_dgk = tl.cumsum(b_dGk, axis=0, reverse=True)  # G_t[c] = sum_{s <= t} g_s[c] inside the chunk
            b_graw = tl.load(g + p_tk, mask=m_tk, other=0.0).to(tl.float32)
            tl.store(dg + p_tk, tl.where(b_graw < FLOOR, 0.0, b_dgk), mask=m_tk)
        else:
            b_dbeta += tl.sum(b_dkb * b_k, axis=1) * b_eg
            # factors with G_t on the plus side (W's beta k exp(G), the scores' row t) and on the minus side
            # (column s)
            b_dkt = b_dkb * b_be[:, None] + tl.dot(b_dA, b_k, input_precision=PREC)
            b_dks = tl.dot(tl.trans(b_dA), b_k, input_precision=PREC)
            if DECAY == 1:
                b_dG += tl.sum(b_k * (b_dkt - b_dks), axis=1)
            tl.store(dk + p_tk, tl.load(dk + p_tk, mask=m_tk, other=0.0) + b_dkt + b_dks, mask=m_tk)
    tl.store(dbeta + bos + o_i * H, b_dbeta, mask=m_t)
    if DECAY == 1:
        b_dG += tl.load(dgin + bos + o_i * H, mask=m_t, other=0.0)
        b_dg = tl.cumsum(b_dG, axis=0, reverse=True)  # G_t = sum_{s <= t} g_s inside the chunk
        b_graw = tl.load(g + bos + o_i * H, mask=m_t, other=0.0).to(tl.float32)
        tl.store(dg + bos + o_i * H, tl.where(b_graw < FLOOR, 0.0, b_dg), mask=m_t)


def _delta_chunks(decay_cls, k, y, beta, log_decay, initial_state, output_final_state, BT, BK, BV, BVS, prec,
                  num_warps, num_stages, packed=None, v_step=None, decay_head=None):
    """The forward's per-chunk quantities (gc, eg, Akk, w, u, h, ht): G and exp(G), the key decay's K K^T scores,
    W and the pseudo-values U [B, T, H, K / V] (float32; bfloat16 / float16 for such inputs), the chunk-start states
    h [B, H, NT, K, V] (as `_delta_states`: bfloat16 for bfloat16 inputs, which the backward's kernels read too)
    and the final state (or None). k, y, beta contiguous; v_step [B, T, H] contiguous and decay_head [H]: fused
    (`_Fused`)."""
    B, T, H, K = k.shape
    V = y.shape[-1]
    NT = triton.cdiv(T, BT)
    KB = _delta_blocks(BK)[0]
    gc, eg = decay_cls.cumsum(log_decay, BT, num_warps, head=decay_head)  # None without a decay
    Akk = decay_cls.wy_scores(k, gc, BT, KB, prec, num_warps, num_stages)  # None: the WY kernel forms it itself
    # W and U in a half input's dtype, as flash-linear-attention keeps them (`recompute_w_u_fwd`): the kernels compute
    # in float32 and round only the stored copy; float32 inputs keep float32
    wu = k.dtype if k.dtype in (torch.bfloat16, torch.float16) else torch.float32
    w = torch.empty((B, T, H, K), dtype=wu, device=k.device)
    u = torch.empty((B, T, H, V), dtype=wu, device=k.device)
    _delta_wy_kernel[(NT, B * H)](
        k, y, beta, gc if gc is not None else k, eg if eg is not None else k, Akk if Akk is not None else w, w, u,
        v_step if v_step is not None else w, T, H, K, V, BT, KB, min(BV, 64), decay_cls.code, prec, v_step is not None,
        num_warps=_or(num_warps, _WARPS if k.dtype == torch.float32 else _DELTA_WY_HALF_WARPS),
        num_stages=_or(num_stages, _STAGES))
    h, ht = _delta_states(k, u, gc, w, initial_state, decay_cls.code, output_final_state, BT, BK, BVS, prec,
                          num_warps, num_stages, packed)
    return gc, eg, Akk, w, u, h, ht


def _delta_bwd_intra(M: Tensor, x: Tensor, gc: Tensor, out: Tensor, shift: bool, trans: bool, acc: bool, BT: int,
                     BK: int, prec: str, num_warps, num_stages) -> None:
    """Launch _delta_bwd_intra_kernel: out (+)= M's intra-chunk contraction with x under the key decay (rows, or
    columns if trans); M [B*H, NT*BT, BT] float32, x [B, T, H, K], gc float64, out [B, T, H, K] float32."""
    B, T, H, K = x.shape
    NC = BT // _SUB
    _delta_bwd_intra_kernel[(triton.cdiv(T, BT) * NC, triton.cdiv(K, BK), B * H)](
        M, x, gc, out, T, H, K, BT, _SUB, BK, NC, shift, trans, acc, prec, num_warps=_or(num_warps, _WARPS),
        num_stages=_or(num_stages, _STAGES))


def _scratch(pool: list, shape: tuple, dtype: torch.dtype, device) -> Tensor:
    """A [shape] dtype buffer on the storage of a buffer of `pool` that no kernel reads any more (each entry a
    contiguous tensor, or the uint8 rest of one), or a new one when none has room; the rest of the one it takes
    stays in the pool. Memory is then reused across the backward's phases as a hand-written backward reuses it,
    rather than allocated per phase."""
    nbytes = math.prod(shape) * dtype.itemsize
    for i, buf in enumerate(pool):
        raw = buf.reshape(-1).view(torch.uint8)  # the whole storage of a contiguous buffer, as bytes
        if raw.numel() >= nbytes and raw.storage_offset() % 16 == 0:
            taken = -(-nbytes // 16) * 16  # keep the rest 16-byte aligned
            pool[i] = raw[taken:]
            return raw[:nbytes].view(dtype).view(shape)
    return torch.empty(shape, dtype=dtype, device=device)


def _delta_bwd_dh_blocks(BK: int, prec: str) -> tuple[int, int]:
    """(KB, NK): the row blocks of dS in the state gradient's pass. Under "ieee" dots (float32 inputs) those of the
    state kernel (`_delta_blocks`: K = 128 as 2 blocks of 64, run by _delta_bwd_dh_rows_kernel), since one
    [128, BV] block spilled 288-344 B there (gated DeltaNet and DeltaNet, sm_80 and sm_90); under tf32 dots (half
    inputs) one block of BK rows (_delta_bwd_dh_kernel, which does not spill)."""
    return _delta_blocks(BK) if prec == "ieee" else (BK, 1)


def _delta_backward(decay_cls, queries, k, y, beta, log_decay, initial_state, grad_outputs, grad_final, *,
                    chunk_size, block_k, block_v, num_warps, num_stages, allow_tf32, packed=None, scale=1.0,
                    v_step=None):
    """Gradients of chunked_delta_by's inputs: ([dq per query], dk, dy, dbeta, dlog_decay or None, dS0, dv_step or
    None) for the outputs' gradients grad_outputs (a list, None for an unused output; each times `scale`, the fused
    readout's factor, as the kernels load it) and the final state's (or None); v_step [B, T, H] or None: the values
    are v_step * y (`_Fused`), differentiated in _delta_bwd_wy_kernel. dq (decay None and scalar) and dy come in
    the input's dtype (summed in float32 in the kernels, rounded once), the others float32. packed: as for
    `_delta_by` (the state gradient then runs per sequence, grad_final and dS0 [N, H, K, V]).

    Memory, for bfloat16 inputs as flash-linear-attention's chunk_gated_delta_rule_bwd keeps it: the recomputed
    chunk-start states h and their gradients dh in bfloat16 (dS carried in float32 inside _delta_bwd_dh_kernel),
    W and U in the input dtype; the per-chunk WY buffers (Tm^T, dA, the decayed scores) on the storage of h and dh
    once _delta_bwd_dqk_kernel has read them, dW on that of the scores' dv (`_scratch`)."""
    B, T, H, K = k.shape
    V = y.shape[-1]
    f32 = dict(dtype=torch.float32, device=k.device)
    code = decay_cls.code
    # (T == 0 never gets here: chunked_delta_by returns the empty result before the Function runs)
    BT, BK, BV, prec = _config(k, V, chunk_size, block_k, block_v, allow_tf32, delta=True)
    if packed is not None:
        BT = packed.BT
    BVS = BV if block_v is not None else min(BV, _DELTA_STATE_BV // (2 if code == 2 else 1))
    KB = _delta_blocks(BK)[0]
    KBQ = KB if block_k is not None else min(KB, _DELTA_BWD_DQK_BK)  # _delta_bwd_dqk_kernel's K block
    BVL = BV if block_v is not None or code == 0 else min(BV, _DELTA_BWD_LOCAL_BV)  # the local kernel's V block
    NT, NKB = triton.cdiv(T, BT), triton.cdiv(K, KBQ)
    rows = B if packed is None else packed.N  # the states' batch
    k, y, beta = k.contiguous(), y.contiguous(), beta.contiguous()
    vs = None if v_step is None else v_step.contiguous()
    # the chunk-start states recomputed as the forward keeps them (bfloat16 for bfloat16 inputs)
    gc, eg, Akk, w, u, h, ht = _delta_chunks(decay_cls, k, y, beta, log_decay, initial_state, True, BT, BK, BV,
                                             BVS, prec, num_warps, num_stages, packed, vs)
    ends = None if packed is None else packed.chunk_ends(h, ht)  # each chunk's end state, for dqk
    warps, stages = _or(num_warps, _WARPS), _or(num_stages, _STAGES)
    if not queries:  # no readout: one zero query carries the query-independent terms
        queries, grad_outputs = [(torch.zeros_like(k), False)], [None]
    qs = [q.contiguous() for q, _ in queries]
    # dO as autograd hands it (its dtype; times scale at the load): no float32 or scaled copy
    dos = [torch.zeros((B, T, H, V), dtype=k.dtype, device=k.device) if d is None else d.contiguous()
           for d in grad_outputs]
    g_or_k = gc if gc is not None else k
    eg_or_k = eg if eg is not None else k
    dv = torch.empty((B, T, H, V), **f32)
    # dh (and the queries' shares dhq summed into the same buffer) in h's dtype
    dhq = torch.empty((B, H, NT, K, V), dtype=h.dtype, device=k.device)
    for j, ((_, exclusive), q, do) in enumerate(zip(queries, qs, dos)):
        # a key decay's P: the forward's decayed scores (_intra_attn_kernel), recomputed
        A = decay_cls.delta_bwd_scores(q, k, gc, bool(exclusive), BT, KB, prec, num_warps,
                                       num_stages) if code == 2 else k
        _delta_bwd_local_kernel[(triton.cdiv(V, BVL), NT, B * H)](
            q, k, g_or_k, eg_or_k, A, do, dv, dhq, float(scale), T, H, K, V, BT, KB, BVL, code, bool(exclusive),
            j > 0, prec, num_warps=warps, num_stages=stages)
    dh = dhq  # the dh kernel reads each chunk's dhq before it stores that chunk's dh over it
    dS0 = torch.empty((rows, H, K, V), **f32)
    du = torch.empty((B, T, H, V), **f32)
    dht = None if grad_final is None else grad_final.float().contiguous()
    KBS, NKS = _delta_bwd_dh_blocks(BK, prec)
    dh_args = (k, g_or_k, w, dv, dhq, dht if dht is not None else dh, dh, dS0, du,
               packed.offsets if packed is not None else dh, T, H, K, V, NT, BT)
    dh_flags = (code, dht is not None, prec, packed is not None)
    dh_launch = dict(num_warps=_or(num_warps, _DELTA_STATE_WARPS), num_stages=stages)
    if NKS == 1:
        _delta_bwd_dh_kernel[(triton.cdiv(V, BVS), rows * H)](*dh_args, BK, BVS, *dh_flags, **dh_launch)
    else:
        _delta_bwd_dh_rows_kernel[(triton.cdiv(V, BVS), rows * H)](*dh_args, KBS, NKS, BVS, *dh_flags, **dh_launch)
    # a key decay's dq is summed over three kernels (float32); otherwise one kernel stores it, in q's dtype
    dqs = [torch.empty((B, T, H, K), dtype=torch.float32 if code == 2 else q.dtype, device=k.device) for q in qs]
    dk = torch.empty((B, T, H, K), **f32)
    dw = _scratch([dv], (B, T, H, K), torch.float32, k.device)  # dv is read by the dh kernel only
    dgk = {1: lambda: torch.empty((B, T, H, NKB), **f32), 2: lambda: torch.empty((B, T, H, K), **f32)}.get(
        code, lambda: dk)()
    dPs = torch.empty((B * H, NT * BT, BT), **f32) if code == 2 else dk  # a key decay's masked dO U^T
    BVQ = BV if block_v is not None else min(BV, _DELTA_BWD_DQK_BV)
    for j, ((_, exclusive), q, do) in enumerate(zip(queries, qs, dos)):
        _launch(
            _delta_bwd_dqk_kernel, (NKB, NT, B * H),
            q, k, g_or_k, eg_or_k, h, ht if ends is None else ends, u, du, dh, do, dqs[j], dk, dw, dgk, dPs,
            float(scale), T, H, K, V, NT, NKB, BT, KBQ, BVQ, code, bool(exclusive), j == 0, prec, ends is not None,
            num_warps=_or(num_warps, _DELTA_BWD_DQK_WARPS), num_stages=stages)
        if code == 2:  # dq's and dk's intra-chunk terms, with their per-key decay factors
            decay_cls.delta_bwd_intra(dPs, k, gc, dqs[j], bool(exclusive), False, True, BT, KB, prec, num_warps,
                                      num_stages)
            decay_cls.delta_bwd_intra(dPs, q, gc, dk, bool(exclusive), True, True, BT, KB, prec, num_warps,
                                      num_stages)
    dG = dg = None
    if code == 1:  # its q-side terms are in dgk already (_delta_bwd_dqk_kernel)
        dG = dgk.sum(-1)
    elif code == 2:
        dG = dgk
        first = (torch.arange(T, device=k.device) % BT == 0).view(1, T, 1, 1)
        for (_, exclusive), q, dq in zip(queries, qs, dqs):
            qdq = q.to(dq.dtype) * dq  # the q-side factor exp(Gq_t) per key, at Gq's row
            if exclusive:  # Gq_t = G_{t-1} inside the chunk: row t's term goes to row t - 1, a chunk's first to none
                qdq = torch.where(first, 0.0, qdq)
                dG[:, :-1] += qdq[:, 1:]
            else:
                dG += qdq
    if code in (1, 2):
        dg = torch.empty(log_decay.shape, **f32)
    # h and dh are read by nothing after the dqk kernel (a key decay's dPs lives on)
    pool = [h, dh] if ends is None else [h, dh, ends]
    dy = torch.empty((B, T, H, V), dtype=y.dtype, device=k.device)  # y's gradient, handed back
    dvs = None if vs is None else torch.empty((B, T, H), **f32)
    dbeta = torch.empty((B, T, H), **f32)
    Tt = _scratch(pool, (B * H, NT * BT, BT), torch.float32, k.device)  # per chunk: Tm^T, and dA, the gradient
    dA = _scratch(pool, (B * H, NT * BT, BT), torch.float32, k.device)  # of the decayed K K^T
    Ab = Akk if code == 2 else _scratch(pool, (B * H, NT * BT, BT), torch.float32, k.device)  # decayed scores
    _delta_bwd_wy_kernel[(NT, B * H)](
        k, y, beta, g_or_k, eg_or_k, Akk if Akk is not None else dA, dw, du, dy, Tt, dA, Ab,
        vs if vs is not None else beta, dvs if dvs is not None else dbeta, T, H, K, V, BT, KB,
        min(BV, _DELTA_BWD_WY_BV), code, prec, vs is not None,
        num_warps=_or(num_warps, _DELTA_BWD_WY_WARPS), num_stages=stages)
    _delta_bwd_dl_kernel[(NT, B * H)](beta, g_or_k, Ab, Tt, dA, dbeta, T, H, BT, code, prec, num_warps=warps,
                                      num_stages=stages)
    dkp = dk
    if code == 2:  # dA's per-key decayed paths: rows (G_t on the plus side) to dkp, columns added to dk
        dkp = torch.empty((B, T, H, K), **f32)
        decay_cls.delta_bwd_intra(dA, k, gc, dkp, False, False, False, BT, KB, prec, num_warps, num_stages)
        decay_cls.delta_bwd_intra(dA, k, gc, dk, False, True, True, BT, KB, prec, num_warps, num_stages)
    _delta_bwd_wy_k_kernel[(NT, B * H)](
        k, beta, log_decay.contiguous() if log_decay is not None else k, g_or_k, eg_or_k, dw, Tt, dA, dkp, dk, dbeta,
        dG if dG is not None else dk, dg if dg is not None else dk, T, H, K, BT, min(KB, _DELTA_BWD_WY_K_BK), code,
        _LOG_DECAY_FLOOR, prec, num_warps=warps, num_stages=stages)
    return dqs, dk, dy, dbeta, dg, dS0, dvs


class _ChunkedDeltaFunction(torch.autograd.Function):
    """chunked_delta_by under autograd: the Triton forward, and a backward in Triton kernels (`_delta_backward`)
    that recomputes the chunk-start states from the saved inputs (nothing per step or per chunk is saved)."""

    @staticmethod
    def forward(ctx, decay_cls, exclusives, options, scale, k, y, beta, log_decay, initial_state, v_step, decay_head,
                skip, skip_weight, *qs):
        queries = list(zip(qs, exclusives))
        fused = _Fused(v_step, decay_head, scale, skip, skip_weight)
        outs, ht = _delta_by(decay_cls, queries, k, y, beta, log_decay, initial_state, True, fused=fused, **options)
        ctx.save_for_backward(k, y, beta, log_decay, initial_state, v_step, decay_head, skip, skip_weight, *qs)
        ctx.decay_cls, ctx.exclusives, ctx.options, ctx.scale = decay_cls, exclusives, options, scale
        ctx.where = _form_call()
        return (*outs, ht)

    @staticmethod
    @_first_order("its backward runs Triton kernels, which record no graph")
    def backward(ctx, *grads):
        k, y, beta, log_decay, initial_state, v_step, decay_head, skip, skip_weight, *qs = ctx.saved_tensors
        # the kernels apply v_step (the WY kernels) and scale (at dO's loads) themselves; the rest of the prologue
        # is materialised for the backward and chained back (`_unfuse`), as in _ChunkedLinearFunction
        fused = _Fused(None, decay_head, ctx.scale, skip, skip_weight)
        _, log_m = _materialise(fused, None, log_decay)
        dqs, dk, dy, dbeta, dg, dS0, dvs = _delta_backward(
            ctx.decay_cls, list(zip(qs, ctx.exclusives)), k, y, beta, log_m, initial_state, list(grads[:-1]),
            grads[-1], scale=ctx.scale, v_step=v_step, **ctx.options)
        dy, dg, _, ddh, dskip, dsw = _unfuse(fused, y, log_decay, grads[0] if qs else None, dy, dg)

        def cast(grad, like):
            return None if grad is None or like is None else grad.to(like.dtype)

        return (None, None, None, None, dk.to(k.dtype), dy.to(y.dtype), dbeta.to(beta.dtype), cast(dg, log_decay),
                cast(dS0, initial_state), cast(dvs, v_step), cast(ddh, decay_head), cast(dskip, skip),
                cast(dsw, skip_weight), *[dq.to(q.dtype) for dq, q in zip(dqs, qs)])


# ----------------------------------------------------------------------------------------------------------
# the diagonal-plus-rank-one class (RWKV-7): forward kernels; its backward is the derived adjoint
# ----------------------------------------------------------------------------------------------------------


def chunk_every(length: int, options: dict) -> int:
    """The chunk length BT = min(chunk_size, pow2(T) >= 16) of a call of `length` steps with these form options:
    the steps between the chunk-start states `chunked_dplr_by` returns, so the recurrent form's derived adjoint
    (`with_adjoint(..., every_of=chunk_every)` in codegen/dispatch.py) recomputes each chunk from its start.
    With `cu_seqlens` among the options (packed sequences) it is `_Packed`'s BT, min(chunk_size, pow2(longest
    sequence) >= 16): every sequence starts a chunk, so sequence n's chunk starts are its cdiv(length_n, BT)
    checkpoints, the layout of the adjoint's packed checkpoints (one table row per sequence)."""
    cu = options.get("cu_seqlens")
    if cu is not None:
        lengths = cu[1:] - cu[:-1]
        length = int(lengths.max()) if len(lengths) else 1
    return min(int(options.get("chunk_size", 64)), _pow2_at_least_16(length))


def chunked_dplr(queries, k, v, a, b, log_decay=None, decay_axis=None, initial_state=None, chunk_size=64,
                 output_final_state=False, *, block_k=None, block_v=None, num_warps=None, num_stages=None,
                 allow_tf32=None, output_chunk_states=False, cu_seqlens=None):
    """Chunked form of S_t = (D_t + b_t a_t^T) S_{t-1} + k_t v_t^T on the GPU (Triton); the same maths and
    arguments as codegen.torch_runtime.chunked_dplr (RWKV-7: Peng et al. 2025, arXiv:2503.14456, eq. 16).

    k, a, b [B, T, H, K] and v [B, T, H, V] in float16, bfloat16 or float32; decay_axis None, "scalar" or "key"
    (a value decay raises NotImplementedError); queries, initial_state, chunk_size, the tuning arguments and the
    returns as chunked_linear (block_k, when given, must be >= K, as for chunked_delta). output_chunk_states: also
    return the float32 state entering every chunk, [B, H, NT, K, V]. Forward only: under autograd it raises
    NotImplementedError (a generated module differentiates its chunked form through the derived adjoint).
    cu_seqlens: None, or int64 [N + 1] boundaries of N sequences packed into B = 1, as for chunked_linear_by
    (initial and final states [N, H, K, V]; the chunk-start states [1, H, NT, K, V], sequence n's chunks from
    `_Packed.offsets[n]`). Raises ValueError naming the argument for a bad shape, dtype, block size or
    cu_seqlens."""
    if decay_axis == "value":
        raise NotImplementedError("chunked_dplr supports decay_axis None, 'scalar' or 'key'")
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, k)
        rows = len(cu_seqlens) - 1  # the states' batch: one row per sequence
        if initial_state is not None and tuple(initial_state.shape) != (rows, *k.shape[2:], v.shape[-1]):
            raise ValueError(f"initial_state must have shape {[rows, *k.shape[2:], v.shape[-1]]} (one row per "
                             f"sequence of cu_seqlens), got {list(initial_state.shape)}")
    _check_inputs(queries, k, v, log_decay, decay_axis, None if cu_seqlens is not None else initial_state)
    for name, x in (("a", a), ("b", b)):
        if tuple(x.shape) != tuple(k.shape):
            raise ValueError(f"{name} must have k's shape {list(k.shape)}, got {list(x.shape)}")
        if x.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16 or float32 for the Triton runtime, got {x.dtype}")
    return chunked_dplr_by(_DECAYS[decay_axis], queries, k, v, a, b, log_decay, initial_state, chunk_size,
                           output_final_state, block_k=block_k, block_v=block_v, num_warps=num_warps,
                           num_stages=num_stages, allow_tf32=allow_tf32, output_chunk_states=output_chunk_states,
                           cu_seqlens=cu_seqlens)


def _check_cu_seqlens(cu_seqlens, k: Tensor) -> None:
    """cu_seqlens as the packed kernels read it: int64 [N + 1], from 0 to k's T, non-decreasing, over one row."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or len(cu_seqlens) < 1 \
            or cu_seqlens.dtype != torch.int64:
        raise ValueError("cu_seqlens must be an int64 tensor [N + 1] of sequence boundaries")
    cu = cu_seqlens.detach().cpu()
    if k.shape[0] != 1 or int(cu[0]) != 0 or int(cu[-1]) != k.shape[1] or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must run from 0 to T = {k.shape[1]} without decreasing, over inputs of one "
                         f"row (B = 1), got {cu.tolist()[:6]} for B = {k.shape[0]}")


def chunked_dplr_by(decay_cls, queries, k, v, a, b, log_decay=None, initial_state=None, chunk_size=64,
                    output_final_state=False, *, block_k=None, block_v=None, num_warps=None, num_stages=None,
                    allow_tf32=None, output_chunk_states=False, cu_seqlens=None, scale=1.0, skip=None,
                    skip_weight=None, b_map=None, bonus=None):
    """chunked_dplr with the decay axis given as its class (NoDecay, ScalarDecay or KeyDecay), the entry point of
    generated modules; its arguments are not checked (chunked_dplr does that).

    scale, skip, skip_weight: the readout's fused epilogue, applied by the output kernel as it stores (`_Fused`, as
    for chunked_linear_by): o = scale * o + skip_weight * skip, RWKV-7's bonus sum(r * u * k) * v with skip = v and
    a weight per step [B, T, H], so no [B, T, H, V] epilogue tensor is made. One query only.

    b_map: None, or (map, y): b is passed raw and the kernels load map(b, y) wherever they load b (`_Fused.b_map`;
    map a `@triton.jit` function of two float32 tiles, y a tensor of b's shape), so a b that is an elementwise
    function of two inputs (RWKV-7's -(a * kk)) is never stored. map need not keep zeros: a packed call's filler
    steps have a = 0, so their b multiplies nothing.

    bonus: None, or u [H, K] (any shape of H * K numbers) with skip and no skip_weight: the skip weight per step is
    sum_i q_t[i] u[h, i] k_t[i] (RWKV-7's current-token bonus), summed by the output kernel (`_Fused.bonus`).

    cu_seqlens: None, or int64 [N + 1] boundaries of N sequences packed into B = 1 (`_Packed`: each sequence moved
    to a chunk boundary, its last chunk filled with zero steps, a = b = k = v = 0 and log decay 0, the identity of
    the step): the WY and output kernels run as for one long row, the state kernel one program per (sequence, head,
    V block) over that sequence's chunks, so the launches are the same for any N. States [N, H, K, V]; the
    chunk-start states [1, H, NT, K, V] hold sequence n's at `_Packed.offsets[n]` onwards, the order of the
    recurrent adjoint's packed checkpoints every `chunk_every` steps.

    Per chunk with start state S0 (the derivation of codegen.torch_runtime.chunked_dplr): u_t = S_{t-1}^T a_t
    solves (I - L) U = Ag S0 + M V, so U = Tm M V + Tm Ag S0 (`_dplr_wy_kernel`, Tm = (I - L)^-1); the state
    passes as S' = D S0 + Bd^T U + Kd^T V (`_delta_state_kernel` with DPLR, resolving U per chunk); the outputs are
    the linear form's over both pairs (b, U) and (k, v) (`_chunk_output_kernel` with DPLR). Returns (outputs,
    final state or None) and, with output_chunk_states, the chunk-start states h [B, H, NT, K, V] float32."""
    if bonus is not None:
        if skip is None or skip_weight is not None or len(queries) != 1 or bonus.numel() != k.shape[2] * k.shape[3]:
            raise ValueError(f"bonus must be u [H, K] = {list(k.shape[2:])} with skip, no skip_weight and one query")
        fused = _Fused(None, None, float(scale), skip, None, bonus=bonus.reshape(-1))
    else:
        fused = _fused_of(None, None, scale, skip, skip_weight, queries, decay_cls, k.shape[2])
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad
                                       for x in [k, v, a, b, log_decay, initial_state, skip, skip_weight, bonus,
                                                 None if b_map is None else b_map[1]] + [q for q, _ in queries]):
        raise NotImplementedError("chunked_dplr_by has no autograd of its own: a generated module differentiates "
                                  "its chunked form through the recurrent form's derived adjoint; call it under "
                                  "torch.no_grad()")
    options = dict(chunk_size=chunk_size, block_k=block_k, block_v=block_v, num_warps=num_warps,
                   num_stages=num_stages, allow_tf32=allow_tf32, output_chunk_states=output_chunk_states)
    if cu_seqlens is None:
        return _dplr_by(decay_cls, queries, k, v, a, b, log_decay, initial_state, output_final_state, fused=fused,
                        b_map=b_map, **options)
    packed = _Packed(cu_seqlens, k.shape[1], chunk_size, k.device)
    if initial_state is None:
        initial_state = k.new_zeros((packed.N, k.shape[2], k.shape[3], v.shape[-1]), dtype=torch.float32)
    if packed.NT == 0:  # every sequence empty: no chunk, the final states are the initial ones
        outs, ht = _empty_result(queries, k, v, initial_state, output_final_state)
        empty = torch.empty((1, k.shape[2], 0, k.shape[3], v.shape[-1]), dtype=torch.float32, device=k.device)
        return (outs, ht, empty) if output_chunk_states else (outs, ht)
    if fused is not None:  # the epilogue's per-step tensors in the packed layout (zero steps between sequences)
        fused = _Fused(None, None, fused.scale, packed.pad(fused.skip),
                       packed.pad(fused.skip_weight) if fused.skip_step else fused.skip_weight, bonus=fused.bonus)
    result = _dplr_by(decay_cls, [(packed.pad(q), e) for q, e in queries], packed.pad(k), packed.pad(v),
                      packed.pad(a), packed.pad(b), packed.pad(log_decay), initial_state, output_final_state,
                      packed=packed, fused=fused, b_map=None if b_map is None else (b_map[0], packed.pad(b_map[1])),
                      **options)
    return ([packed.unpad(o) for o in result[0]],) + tuple(result[1:])


def _dplr_by(decay_cls, queries, k, v, a, b, log_decay, initial_state, output_final_state, *, chunk_size, block_k,
             block_v, num_warps, num_stages, allow_tf32, output_chunk_states, packed=None, fused=None, b_map=None):
    """chunked_dplr_by on tensors in the layout of `packed` (a `_Packed`, or None: not packed); fused: the
    output's `_Fused` epilogue, or None; b_map: None, or (map, y), b's map of two raw inputs (`_Fused.b_map`)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    BT, BK, BV, prec = _config(k, V, chunk_size, block_k, block_v, allow_tf32, delta=True)
    if prec == "ieee" and block_v is None:
        BV = min(BV, _IEEE_DPLR_BV)
    if packed is not None:
        BT = packed.BT  # the sequences start at multiples of the packed layout's chunk
    if T == 0:
        outs, ht = _empty_result(queries, k, v, initial_state, output_final_state)
        empty = torch.empty((B, H, 0, K, V), dtype=torch.float32, device=k.device)
        return (outs, ht, empty) if output_chunk_states else (outs, ht)
    BVS = BV if block_v is not None else min(BV, _DELTA_STATE_BV // (2 if decay_cls.code == 2 else 1))
    k, v, a, b = k.contiguous(), v.contiguous(), a.contiguous(), b.contiguous()
    if b_map is not None:
        b_map = (b_map[0], b_map[1].contiguous())
    KB = _delta_blocks(BK)[0]  # every kernel but the state kernel loops over K in blocks of KB
    NT = triton.cdiv(T, BT)
    gc, eg = decay_cls.cumsum(log_decay, BT, num_warps)  # None without a decay
    Aab, Aak = decay_cls.dplr_scores(a, b, k, gc, BT, KB, prec, num_warps, num_stages, b_map)  # None: in the kernel
    w = torch.empty((B, T, H, K), dtype=torch.float32, device=k.device)
    u = torch.empty((B, T, H, V), dtype=torch.float32, device=k.device)
    _dplr_wy_kernel[(NT, B * H)](
        a, b, k, v, gc if gc is not None else k, eg if eg is not None else k, Aab if Aab is not None else w,
        Aak if Aak is not None else w, w, u, b if b_map is None else b_map[1], T, H, K, V, BT, KB, min(BV, 64),
        decay_cls.code, prec, BMAP=_map_of(b_map), num_warps=_or(num_warps, _DPLR_WY_WARPS),
        num_stages=_or(num_stages, _STAGES))
    h, ht = _delta_states(b, u, gc, w, initial_state, decay_cls.code, output_final_state, BT, BK, BVS, prec,
                          num_warps, _or(num_stages, _IEEE_DPLR_STATE_STAGES if prec == "ieee" else
                                         _DPLR_STATE_STAGES_SMALL_SHARED if K > 64 and _arch() < 90 else _STAGES),
                          packed=packed, kv=(k, v), b_map=b_map)
    if fused is not None:  # the output kernel reads skip and skip_weight as dense [B, T, H, ...] rows
        fused = _Fused(None, None, fused.scale, None if fused.skip is None else fused.skip.contiguous(),
                       None if fused.skip_weight is None else fused.skip_weight.contiguous(), b_map=b_map,
                       bonus=None if fused.bonus is None else fused.bonus.contiguous())
    elif b_map is not None:
        fused = _Fused(b_map=b_map)
    outs = []
    for q, exclusive in queries:
        o = torch.empty((B, T, H, V), dtype=k.dtype, device=k.device)
        decay_cls.output(q.contiguous(), bool(exclusive), k, v, gc, eg, h, o, BT, KB, BV, prec, num_warps,
                         num_stages, pair=(b, u), fused=fused)
        outs.append(o)
    return (outs, ht, h) if output_chunk_states else (outs, ht)
