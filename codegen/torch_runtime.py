"""PyTorch runtime for the canonical forms of a per-step linear recurrence (CPU path, differentiable).

Layout: B batch, T time, H heads, K key dim, V value dim. Per-step tensors are [B, T, H, ...];
states are [B, H, K, V]. A query is a pair (q [B, T, H, K], exclusive): its output is o_t = S_t^T q_t
(inclusive: after the step-t update) or o_t = S_{t-1}^T q_t (exclusive: before it; S_{-1} = initial state).

Decays act on the state as D_t = exp(log_decay_t), log_decay <= 0:
  decay_axis=None    D_t = I                       (log_decay must be None)
  "scalar"           log_decay [B, T, H]           multiplies the whole state
  "key"              log_decay [B, T, H, K]        multiplies row i of S by exp(log_decay[..., i])
  "value"            log_decay [B, T, H, V]        multiplies column j of S by exp(log_decay[..., j])

Forms:
  chunked_linear   S_t = D_t S_{t-1} + k_t v_t^T                        (chunked; chunk_size >= T: parallel)
  chunked_delta    S_t = (I - beta_t k_t k_t^T) D_t S_{t-1} + k_t y_t^T (chunked, WY/UT form)
  scan_diagonal    s_t = a_t * s_{t-1} + b_t, elementwise              (associative scan)
  recurrent_linear, recurrent_delta                                     (step-by-step loop, the baseline)
The chunked forms check their arguments and route by decay_axis to chunked_linear_by / chunked_delta_by /
chunked_dplr_by, which take the decay axis as one of the classes NoDecay, ScalarDecay, KeyDecay, ValueDecay:
what a generated module calls, so that it holds only its own axis' code.

Numerics: float16/bfloat16 inputs are computed in float32, others in their own dtype; outputs come back in
that compute dtype (the caller casts). A decay between two steps is only ever formed as exp of a sum of the
log decays between them (or as a product of such factors, all <= 1), never as exp(G_t - G_s) of two large
prefix sums and never as exp(-G): no overflow for log decays of -20 per step, and every decay factor keeps
float32's relative accuracy whatever the chunk's total decay. No in-place ops: everything is differentiable.

Chunks: the same chunks and 16-step sub-chunks as codegen/triton_runtime.py, so that a CPU test of this path
exercises the GPU algorithm. For a chunk_size that is a power of two >= 16 (the only ones the Triton runtime
accepts) the chunk length is Triton's BT = min(chunk_size, pow2(T) >= 16) (a short sequence is zero-padded like
Triton's) and a chunk is cut into sub-chunks of c = 16 steps (`_chunk_sizes`). For any other chunk_size (e.g. 4,
12, 48, which only this runtime accepts) the same sub-chunk algorithm runs with C0 = min(chunk_size, T),
c = min(16, C0) and C = C0 rounded up to a multiple of c. Inside a chunk, for a key- or value-axis decay
(`_SubDecays`, `_attn_key`, `_intra_value`), as in Triton's _intra_attn_kernel / _chunk_output_value_kernel:
  - sub-block (i, j), i > j: through the reference point of query sub-chunk i, the state after the last step of
    sub-chunk i - 1: (q_t * decay(ref_i -> t)) @ (k_s * decay(s -> ref_i))^T, one matmul, both factors <= 1
    (for a value decay: (sum_j A_ij @ (v_j * decay(s -> ref_i))) * decay(ref_i -> t) with A = q k^T);
  - diagonal sub-blocks: a direct masked product with the decay of every pair (row t: its s <= t, [m_t, D]).
Unlike Triton, which forms decay(a -> b) as exp(G_b - G_a) of chunk-level prefix sums G (float64, log decays
floored at -1000, the difference rounded to float32 before exp), every factor here is exp of a sum over exactly
the steps it spans: inside a sub-chunk a masked [16, 16] cumulative sum (or the local
prefix / suffix sum), across sub-chunks the local sums plus whole-sub-chunk totals. The delta rule's UT inverse
(`_unit_lower_inverse`) uses the same sub-chunks: diagonal 16 x 16 blocks, then block forward substitution.
Cost: the diagonal sub-blocks are O(C 16 D) elementwise work (exps included) per chunk, against O(C D log C) for
the binary block hierarchy this replaces; on a CPU the chunked form with a per-channel decay is about 2-2.5x slower
than it was (gla, rwkv7 at T = 4096, K = V = 64, chunk 64), the price of running the GPU's algorithm.

This file imports only torch and is copied verbatim into generated modules; it holds no global state.
"""

import torch

if "_first_order" not in globals():  # imported as a package module rather than copied beside dispatch.py
    from .dispatch import _first_order, _form_call

Tensor = torch.Tensor

_AXES = (None, "scalar", "key", "value")


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half-precision inputs, else the input's own dtype."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _check_decay(log_decay: Tensor | None, decay_axis: str | None, k: Tensor, v: Tensor) -> None:
    """Validate decay_axis and the shape of log_decay against k [B, T, H, K] and v [B, T, H, V]."""
    if decay_axis not in _AXES:
        raise ValueError(f"decay_axis must be one of {_AXES}, got {decay_axis!r}")
    if decay_axis is None:
        if log_decay is not None:
            raise ValueError("log_decay given but decay_axis is None; pass decay_axis='scalar', 'key' or 'value'")
        return
    if log_decay is None:
        raise ValueError(f"decay_axis={decay_axis!r} needs a log_decay tensor")
    expected = {"scalar": tuple(k.shape[:3]), "key": tuple(k.shape), "value": tuple(v.shape)}[decay_axis]
    if tuple(log_decay.shape) != expected:
        raise ValueError(f"log_decay for decay_axis={decay_axis!r} must have shape {list(expected)}, "
                         f"got {list(log_decay.shape)}")


def _chunk_sizes(T: int, chunk_size: int) -> tuple[int, int]:
    """(chunk length C, sub-chunk length c), C a multiple of c.

    chunk_size a power of two >= 16 (the only ones the Triton runtime accepts): exactly its (BT, 16),
    C = min(chunk_size, pow2(T) >= 16), c = 16, so both runtimes cut a sequence at the same steps.
    Any other chunk_size: c = min(16, C0), C0 = min(chunk_size, T), and C = C0 rounded up to a multiple of c."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if chunk_size >= 16 and chunk_size & (chunk_size - 1) == 0:
        return min(chunk_size, max(16, 1 << max(T - 1, 0).bit_length())), 16
    C = max(1, min(chunk_size, T))
    c = min(16, C)
    return -(-C // c) * c, c


def _chunk(x: Tensor, C: int) -> Tensor:
    """[B, T, H, *D] -> [N, B, H, C, *D] (contiguous), zero-padded along T to N * C."""
    B, T = x.shape[:2]
    N = -(-T // C)
    if N * C != T:
        x = torch.cat([x, x.new_zeros((B, N * C - T) + tuple(x.shape[2:]))], dim=1)
    x = x.reshape((B, N, C) + tuple(x.shape[2:]))
    return x.permute(1, 0, 3, 2, *range(4, x.dim())).contiguous()


def _unchunk(x: Tensor, T: int) -> Tensor:
    """[N, B, H, C, *D] -> [B, T, H, *D] (drops the padding)."""
    N, B, H, C = x.shape[:4]
    x = x.permute(1, 0, 3, 2, *range(4, x.dim()))
    return x.reshape((B, N * C, H) + tuple(x.shape[4:]))[:, :T]


def _shift(x: Tensor, dim: int) -> Tensor:
    """x_{t-1} along dim, 0 first (an inclusive cumulative sum becomes an exclusive one)."""
    dim = dim % x.dim()
    first = torch.zeros_like(x.narrow(dim, 0, 1))
    return torch.cat([first, x.narrow(dim, 0, x.shape[dim] - 1)], dim=dim)


def _suffix(x: Tensor, dim: int) -> Tensor:
    """Exclusive suffix sum along dim, sum_{r > s} x_r, summed directly (not as a difference of prefix sums)."""
    dim = dim % x.dim()
    incl = x.flip(dim).cumsum(dim).flip(dim)
    last = torch.zeros_like(x.narrow(dim, 0, 1))
    return torch.cat([incl.narrow(dim, 1, x.shape[dim] - 1), last], dim=dim)


def _causal(C: int, mode: str, device: torch.device) -> Tensor:
    """[C, C] bool over (t, s): s <= t for mode "inclusive", s < t for "strict" and "exclusive"."""
    return torch.ones(C, C, dtype=torch.bool, device=device).tril(0 if mode == "inclusive" else -1)


def _segsum(x: Tensor, mode: str) -> Tensor:
    """Segment sums of log decays x [..., L] -> [..., L(t), L(s)], -inf where masked (exp gives an exact 0).

    inclusive: sum_{s < r <= t} x_r for s <= t   (decay from after step s to the state after step t)
    strict:    the same, for s < t only
    exclusive: sum_{s < r < t} x_r for s < t     (decay from after step s to the state before step t)
    """
    L = x.shape[-1]
    below = _causal(L, "strict", x.device)  # [L, L]
    seg = x.unsqueeze(-1).expand(*x.shape, L).masked_fill(~below, 0.0).cumsum(-2)  # [..., t, s]
    if mode == "exclusive":
        seg = _shift(seg, -2)
    return seg.masked_fill(~_causal(L, mode, x.device), float("-inf"))


# ----------------------------------------------------------------------------------------------------------
# 16-step sub-chunks inside a chunk (key- and value-axis decays), the Triton runtime's structure
# ----------------------------------------------------------------------------------------------------------


def _segsum_rows(x: Tensor, mode: str) -> Tensor:
    """_segsum along dim -2 with a channel dim last: x [.., L, D] -> [.., L(t), L(s), D], -inf where masked. Row t
    is a running sum over the steps r (s < r <= t; r < t when exclusive), one step added at a time."""
    L = x.shape[-2]
    idx = torch.arange(L, device=x.device).unsqueeze(-1)  # [L(s), 1]
    seg, rows = torch.zeros_like(x), []
    # Steps by unbind, not x[..., t:t + 1, :]: the backward of one unbind stacks the gradients once, where each
    # slice's backward would write a full-size zero gradient (L of them: quadratic work in the backward).
    for t, x_t in enumerate(x.unbind(-2)):
        if mode == "exclusive":
            rows.append(seg)
        seg = torch.where(idx < t, seg + x_t.unsqueeze(-2), seg)
        if mode != "exclusive":
            rows.append(seg)
    return torch.stack(rows, dim=-3).masked_fill(~_causal(L, mode, x.device).unsqueeze(-1), float("-inf"))


class _SubDecays:
    """The log decays of a chunk cut into sub-chunks of c steps, g [.., C, D] with C = n c, and the decay factors
    that the sub-chunk structure reads, every one exp of a sum over exactly the steps it spans (sums inside a
    sub-chunk plus whole-sub-chunk totals, never a difference of prefix sums; all factors <= 1).

    Reference point of query sub-chunk i: the state after the last step of sub-chunk i - 1. For t in sub-chunk i and
    s in an earlier sub-chunk j, decay(s -> t) = decay(ref_i -> t) * decay(s -> ref_i): `query(mode)` gives the
    first (the local prefix of t), `key_ref` the second (the local suffix of s plus the totals of the sub-chunks
    strictly between j and i; exactly 0 for j >= i)."""

    def __init__(self, g: Tensor, c: int):
        lead, C, D = g.shape[:-2], g.shape[-2], g.shape[-1]
        self.c, self.n = c, C // c
        self.g = g.reshape(*lead, self.n, c, D)  # [.., n, c, D]
        self.tot = self.g.sum(-2)  # [.., n, D] log decay over each whole sub-chunk
        self.suf = _suffix(self.g, -2)  # [.., n, c, D] from after step s to the end of its sub-chunk
        self.pre = self.g.cumsum(-2)  # [.., n, c, D] from the start of its sub-chunk through step t
        between = _segsum_rows(self.tot, "exclusive")  # [.., n(i), n(j), D] sub-chunks strictly between j < i
        self.key_ref = torch.exp(self.suf.unsqueeze(-4) + between.unsqueeze(-2))  # [.., n(i), n(j), c, D]
        self._query, self._diagonal = {}, {}

    def whole(self) -> Tensor:
        """exp(log decay over the whole chunk), [.., D]."""
        return torch.exp(self.tot.sum(-2))

    def query(self, mode: str) -> Tensor:
        """exp(log decay from the sub-chunk start to the state a query at t reads), [.., n, c, D]."""
        key = "exclusive" if mode == "exclusive" else "inclusive"
        if key not in self._query:
            self._query[key] = torch.exp(_shift(self.pre, -2) if key == "exclusive" else self.pre)
        return self._query[key]

    def from_start(self, mode: str) -> Tensor:
        """exp(log decay from the chunk start to the state a query at t reads), [.., n, c, D]."""
        before = _shift(self.tot.cumsum(-2), -2).unsqueeze(-2)  # [.., n, 1, D] totals of earlier sub-chunks
        return torch.exp((_shift(self.pre, -2) if mode == "exclusive" else self.pre) + before)

    def to_end(self) -> Tensor:
        """exp(log decay from after step s to the chunk end), [.., n, c, D]."""
        return torch.exp(self.suf + _suffix(self.tot, -2).unsqueeze(-2))

    def diagonal(self, mode: str) -> list:
        """Per row t of a sub-chunk, exp(log decay from s to the state read at t) for the s of the same sub-chunk that
        the mode keeps (s <= t, or s < t): [[.., n, m_t, D] for t < c], m_t = t + 1 or t. Row t's decays are
        row t - 1's times step t's factor, a product of per-step factors <= 1 (kept per mode: the DPLR form reads
        them four times)."""
        if mode not in self._diagonal:
            a = torch.exp(self.g)  # [.., n, c, D] the per-step factors, each <= 1
            one = torch.ones_like(a[..., :1, :])
            prev, rows = a[..., :0, :], []  # prev: row t - 1's decays from s to t - 1, for s < t - 1
            for t, a_t in enumerate(a.unbind(-2)):  # unbind, not slices: see _segsum_rows
                at = a_t.unsqueeze(-2)
                cur = torch.cat([prev * at, at], dim=-2) if t > 0 else prev  # decays from s to t, s < t
                if mode == "exclusive":  # decays from s to t - 1: row t - 1's, and 1 for s = t - 1
                    rows.append(torch.cat([prev, one], dim=-2) if t > 0 else prev)
                else:
                    rows.append(torch.cat([cur, one], dim=-2) if mode == "inclusive" else cur)
                prev = cur
            self._diagonal[mode] = rows
        return self._diagonal[mode]


class _DiagonalScores(torch.autograd.Function):
    """The diagonal sub-blocks of the key-decay scores, D[.., t, s] = sum_i q_t[i] k_s[i] e_t[s, i] for the s < m_t
    that row t keeps, 0 beyond (qs, ks [.., n, c, K]; rows e_t [.., n, m_t, K] from _SubDecays.diagonal; returns
    [.., n, c(t), c(s)]).

    By hand rather than by autograd through a loop over rows: autograd would keep a product k_s e_t per row and
    give every row's slice of k a gradient the size of all of k (c zero-filled full-size tensors per call, most of
    the backward at T = 16k, issue 14). Here nothing per row is kept; the backward recomputes k_s e_t row by row
    and accumulates k's gradient into one buffer. First derivatives only (a double backward raises, `_first_order`)."""

    @staticmethod
    def forward(ctx, qs: Tensor, ks: Tensor, *rows: Tensor) -> Tensor:
        out = qs.new_zeros(qs.shape[:-1] + (ks.shape[-2],))
        for t, e in enumerate(rows):
            m = e.shape[-2]
            if m:
                out[..., t, :m] = ((ks[..., :m, :] * e) @ qs[..., t, :, None]).squeeze(-1)
        ctx.save_for_backward(qs, ks, *rows)
        ctx.where = _form_call()
        return out

    @staticmethod
    @_first_order("the backward of its key-decay scores is written out by hand and records no graph")
    def backward(ctx, grad: Tensor) -> tuple:
        qs, ks, *rows = ctx.saved_tensors
        grad_q, grad_k, grad_rows = torch.zeros_like(qs), torch.zeros_like(ks), []
        for t, e in enumerate(rows):
            m = e.shape[-2]
            if not m:
                grad_rows.append(torch.zeros_like(e))
                continue
            g, k_m = grad[..., t, :m].unsqueeze(-1), ks[..., :m, :]  # [.., n, m, 1], [.., n, m, K]
            grad_q[..., t, :] = (g * k_m * e).sum(-2)
            gq = g * qs[..., t, None, :]  # [.., n, m, K]
            grad_rows.append(gq * k_m)
            grad_k[..., :m, :] += gq * e
        return (grad_q, grad_k, *grad_rows)


def _sub(x: Tensor, c: int) -> Tensor:
    """[.., C, D] -> [.., C / c, c, D]."""
    return x.reshape(*x.shape[:-2], x.shape[-2] // c, c, x.shape[-1])


def _blocks_to_full(a: Tensor) -> Tensor:
    """Sub-chunk blocks [.., n(i), n(j), c, c] -> the [.., C, C] matrix."""
    lead, n, c = a.shape[:-4], a.shape[-4], a.shape[-1]
    return a.transpose(-3, -2).reshape(*lead, n * c, n * c)


def _attn_key(q: Tensor, k: Tensor, sub: _SubDecays, mode: str, qref: Tensor, kref: Tensor) -> Tensor:
    """Decayed scores for a key decay, A_ts = sum_i q_t[i] k_s[i] exp(decay_i from s to t), masked per mode:
    sub-blocks below the diagonal through the reference points, (q_t * query factor) @ (k_s * key_ref)^T, one
    matmul; diagonal sub-blocks as a direct [c, c, K] masked product. Returns [.., C, C]."""
    qs, ks = _sub(q, sub.c), _sub(k, sub.c)  # [.., n, c, K]
    off = qref.unsqueeze(-3) @ kref.transpose(-1, -2)  # [.., n(i), n(j), c, c]; 0 for j >= i (key_ref = 0)
    diag = _DiagonalScores.apply(qs, ks, *sub.diagonal(mode))  # [.., n, c(t), c(s)]
    eye = torch.eye(sub.n, dtype=torch.bool, device=q.device)[:, :, None, None]
    return _blocks_to_full(torch.where(eye, diag.unsqueeze(-3), off))


def _intra_value(q: Tensor, k: Tensor, v: Tensor, sub: _SubDecays, mode: str) -> Tensor:
    """Intra-chunk output for a value decay, o_t[j] = sum_s (q_t . k_s) exp(decay_j from s to t) v_s[j]:
    earlier sub-chunks as (sum_j A_ij @ (v_j * key_ref)) * query factor, the diagonal sub-block directly."""
    c = sub.c
    qs, ks, vs = _sub(q, c), _sub(k, c), _sub(v, c)  # [.., n, c, K|V]
    a = qs.unsqueeze(-3) @ ks.unsqueeze(-4).transpose(-1, -2)  # [.., n(i), n(j), c, c] plain q k^T
    off = (a @ (vs.unsqueeze(-4) * sub.key_ref)).sum(-3) * sub.query(mode)  # [.., n, c, V]
    diag_a = torch.diagonal(a, dim1=-4, dim2=-3).movedim(-1, -3)  # [.., n, c(t), c(s)]
    diag = torch.stack([(diag_a[..., t:t + 1, :e.shape[-2]] @ (vs[..., :e.shape[-2], :] * e)).squeeze(-2)
                        for t, e in enumerate(sub.diagonal(mode))], dim=-2)  # [.., n, c, V] row by row
    return (off + diag).reshape(v.shape)


# ----------------------------------------------------------------------------------------------------------
# chunk-level pieces shared by the linear, delta and DPLR forms: one class per decay axis
# ----------------------------------------------------------------------------------------------------------
#
# Each class holds the decays of one call, chunked (per-chunk factors for the state pass, per-query intra- and
# inter-chunk parts), built from lg: log decays [N, B, H, C(, D)] or None, c: the sub-chunk length, and the chunked
# keys k and values v. They share one interface (whole, k_to_end, v_to_end, query_levels, attn, inter, intra,
# from_start) and no code: the public forms pick one by `decay_axis` through `_DECAYS`, while a generated module
# names the class its chunk plan fixes (`chunked_linear_by(KeyDecay, ...)`), so the module's pruning keeps that
# class and the helpers it reads, and none of the other axes' code.


class NoDecay:
    """decay_axis None: D_t = I."""

    axis = None

    def __init__(self, lg: None, c: int, k: Tensor, v: Tensor, blocks: list | None = None):
        self.k, self.v, self.blocks = k, v, None

    def whole(self) -> None:
        """Decay of the state over each whole chunk (None: the identity)."""
        return None

    def k_to_end(self) -> Tensor:
        """k_s decayed to the chunk end, [N, B, H, C, K]."""
        return self.k

    def v_to_end(self) -> Tensor:
        """v_s decayed to the chunk end, [N, B, H, C, V]."""
        return self.v

    def query_levels(self, q: Tensor, mode: str) -> None:
        """Per-query decay factors (key decays only)."""
        return None

    def attn(self, q: Tensor, mode: str, qlev: None) -> Tensor:
        """Masked scores [N, B, H, C, C]."""
        return (q @ self.k.transpose(-1, -2)).masked_fill(~_causal(q.shape[-2], mode, q.device), 0.0)

    def from_start(self, q: Tensor, mode: str, qlev: None) -> Tensor:
        """q_t decayed from the chunk start to the state it reads, [N, B, H, C, K]."""
        return q

    def inter(self, q: Tensor, mode: str, qlev: None, starts: Tensor) -> Tensor:
        """Outputs from the chunk start states: q [N, B, H, C, K], starts [N, B, H, K, V] -> [N, B, H, C, V]."""
        return q @ starts

    def intra(self, q: Tensor, v: Tensor, mode: str, qlev: None) -> Tensor:
        """Outputs from the steps of the same chunk, [N, B, H, C, V]."""
        return self.attn(q, mode, qlev) @ v


class ScalarDecay:
    """decay_axis "scalar": lg [N, B, H, C], one factor for the whole state."""

    axis = "scalar"

    def __init__(self, lg: Tensor, c: int, k: Tensor, v: Tensor, blocks: list | None = None):
        self.lg, self.k, self.v, self.blocks = lg, k, v, None

    def whole(self) -> Tensor:
        """Decay of the state over each whole chunk, [N, B, H, 1, 1]."""
        return torch.exp(self.lg.sum(-1))[..., None, None]

    def k_to_end(self) -> Tensor:
        """k_s decayed to the chunk end, [N, B, H, C, K]."""
        return self.k * torch.exp(_suffix(self.lg, -1)).unsqueeze(-1)

    def v_to_end(self) -> Tensor:
        """v (the decay is on k's side)."""
        return self.v

    def query_levels(self, q: Tensor, mode: str) -> None:
        """Nothing per query for a scalar decay."""
        return None

    def attn(self, q: Tensor, mode: str, qlev: None) -> Tensor:
        """Decayed scores [N, B, H, C, C], exp of segment sums (exactly 0 where masked)."""
        return (q @ self.k.transpose(-1, -2)) * torch.exp(_segsum(self.lg, mode))

    def _from_start(self, mode: str) -> Tensor:
        G = self.lg.cumsum(-1)
        return torch.exp(_shift(G, -1) if mode == "exclusive" else G).unsqueeze(-1)

    def from_start(self, q: Tensor, mode: str, qlev: None) -> Tensor:
        """q_t decayed from the chunk start to the state it reads."""
        return q * self._from_start(mode)

    def inter(self, q: Tensor, mode: str, qlev: None, starts: Tensor) -> Tensor:
        """Outputs from the chunk start states."""
        return (q @ starts) * self._from_start(mode)

    def intra(self, q: Tensor, v: Tensor, mode: str, qlev: None) -> Tensor:
        """Outputs from the steps of the same chunk."""
        return self.attn(q, mode, qlev) @ v


class KeyDecay:
    """decay_axis "key": lg [N, B, H, C, K] scales row i of the state; 16-step sub-chunks inside a chunk."""

    axis = "key"

    def __init__(self, lg: Tensor, c: int, k: Tensor, v: Tensor, blocks: _SubDecays | None = None):
        self.lg, self.c, self.k, self.v = lg, c, k, v
        self.blocks = blocks if blocks is not None else _SubDecays(lg, c)  # (shared by calls on one lg)
        self.kref = _sub(k, c).unsqueeze(-4) * self.blocks.key_ref  # [N, B, H, n(i), n(j), c, K]

    def whole(self) -> Tensor:
        """Decay of the state over each whole chunk, [N, B, H, K, 1] (its rows)."""
        return self.blocks.whole().unsqueeze(-1)

    def k_to_end(self) -> Tensor:
        """k_s decayed to the chunk end, [N, B, H, C, K]."""
        return (_sub(self.k, self.c) * self.blocks.to_end()).reshape(self.k.shape)

    def v_to_end(self) -> Tensor:
        """v (the decay is on k's side)."""
        return self.v

    def query_levels(self, q: Tensor, mode: str) -> tuple:
        """q decayed from its sub-chunk's reference point [.., n, c, K] and from the chunk start [.., C, K]."""
        qs = _sub(q, self.c)
        return qs * self.blocks.query(mode), (qs * self.blocks.from_start(mode)).reshape(q.shape)

    def attn(self, q: Tensor, mode: str, qlev: tuple) -> Tensor:
        """Decayed scores [N, B, H, C, C]."""
        return _attn_key(q, self.k, self.blocks, mode, qlev[0], self.kref)

    def from_start(self, q: Tensor, mode: str, qlev: tuple) -> Tensor:
        """q_t decayed from the chunk start to the state it reads."""
        return qlev[1]

    def inter(self, q: Tensor, mode: str, qlev: tuple, starts: Tensor) -> Tensor:
        """Outputs from the chunk start states."""
        return qlev[1] @ starts

    def intra(self, q: Tensor, v: Tensor, mode: str, qlev: tuple) -> Tensor:
        """Outputs from the steps of the same chunk."""
        return self.attn(q, mode, qlev) @ v


class ValueDecay:
    """decay_axis "value": lg [N, B, H, C, V] scales column j of the state (linear form only)."""

    axis = "value"

    def __init__(self, lg: Tensor, c: int, k: Tensor, v: Tensor, blocks: _SubDecays | None = None):
        self.lg, self.c, self.k, self.v = lg, c, k, v
        self.blocks = blocks if blocks is not None else _SubDecays(lg, c)

    def whole(self) -> Tensor:
        """Decay of the state over each whole chunk, [N, B, H, 1, V] (its columns)."""
        return self.blocks.whole().unsqueeze(-2)

    def k_to_end(self) -> Tensor:
        """k itself (the decay is on v's side)."""
        return self.k

    def v_to_end(self) -> Tensor:
        """v_s decayed to the chunk end, [N, B, H, C, V]."""
        return (_sub(self.v, self.c) * self.blocks.to_end()).reshape(self.v.shape)

    def query_levels(self, q: Tensor, mode: str) -> None:
        """Nothing per query: the decay factors scale outputs, not q."""
        return None

    def inter(self, q: Tensor, mode: str, qlev: None, starts: Tensor) -> Tensor:
        """Outputs from the chunk start states."""
        o = _sub(q @ starts, self.c) * self.blocks.from_start(mode)
        return o.reshape(q.shape[:-1] + (starts.shape[-1],))

    def intra(self, q: Tensor, v: Tensor, mode: str, qlev: None) -> Tensor:
        """Outputs from the steps of the same chunk."""
        return _intra_value(q, self.k, v, self.blocks, mode)


_DECAYS = {None: NoDecay, "scalar": ScalarDecay, "key": KeyDecay, "value": ValueDecay}
KeyDeltaDecay = KeyDecay  # the delta rule's key decay (the Triton runtime's adds the steps of its backward)


def _prepare(k, log_decay, initial_state, chunk_size):
    """Common set-up: compute dtype, chunk sizes, chunked log decays, start state (None: zero, never allocated)."""
    dt = _compute_dtype(k)
    C, c = _chunk_sizes(k.shape[1], chunk_size)
    lg = None if log_decay is None else _chunk(log_decay.to(dt), C)  # [N, B, H, C(, D)]
    return dt, C, c, lg, None if initial_state is None else initial_state.to(dt)


def _empty_result(queries, k, s0, v_dim: int, dt, output_final_state: bool):
    """What a chunked form returns for T = 0: empty outputs, and the start state (zeros for none) as the final one."""
    B, _, H, K = k.shape
    if output_final_state and s0 is None:
        s0 = k.new_zeros((B, H, K, v_dim), dtype=dt)
    return [k.new_zeros((B, 0, H, v_dim), dtype=dt) for _ in queries], (s0 if output_final_state else None)


def _stack(xs: list) -> Tensor:
    """torch.stack along a new dim 0, a view for one tensor (a one-chunk call, e.g. a batch of short packed
    sequences, then copies no [B, H, K, V] state or [B, H, C, V] value tensor)."""
    return xs[0].unsqueeze(0) if len(xs) == 1 else torch.stack(xs)


def _chunk_starts(starts: list) -> Tensor | None:
    """[N, B, H, K, V] the states entering each chunk, from the per-chunk list whose first entry is None for a zero
    start: None when that is the only chunk (no output reads a start state then), else zeros in its place."""
    if starts[0] is None:
        if len(starts) == 1:
            return None
        starts = [torch.zeros_like(starts[1])] + starts[1:]
    return _stack(starts)


def _outputs(queries, dt, C, decay, v: Tensor, starts: Tensor | None, T: int) -> list:
    """Per query: inter-chunk (start state; none for starts None: one chunk from zero) plus intra-chunk parts,
    back to [B, T, H, V]."""
    outs = []
    for q, exclusive in queries:
        qc = _chunk(q.to(dt), C)  # [N, B, H, C, K]
        mode = "exclusive" if exclusive else "inclusive"
        qlev = decay.query_levels(qc, mode)
        o = decay.intra(qc, v, mode, qlev)
        if starts is not None:
            o = decay.inter(qc, mode, qlev, starts) + o
        outs.append(_unchunk(o, T))
    return outs


def _unit_lower_inverse(L: Tensor, c: int) -> Tensor:
    """(I + L)^-1 for a strictly lower triangular L [.., C, C], C = n c, by sub-chunks of c: each diagonal block's
    inverse by its finite Neumann series in product form, (I - L)(I + L^2)(I + L^4).. (L^c = 0), then block
    forward substitution over the sub-chunks, X_ij = -X_ii sum_{j <= m < i} L_im X_mj (matmuls only; a batched
    LAPACK triangular solve is several times slower on a CPU)."""
    lead, C = L.shape[:-2], L.shape[-1]
    n = C // c
    eye = torch.eye(c, dtype=L.dtype, device=L.device)
    p = -torch.diagonal(L.reshape(*lead, n, c, n, c), dim1=-4, dim2=-2).movedim(-1, -3)  # [.., n, c, c]
    leaf, span = eye + p, 2
    while span < c:
        p = p @ p
        leaf = leaf + leaf @ p
        span *= 2
    inv = leaf[..., 0, :, :]  # [.., c, c] the inverse of the top-left i c x i c block, grown one sub-chunk a time
    for i in range(1, n):
        row = -(leaf[..., i, :, :] @ (L[..., i * c:(i + 1) * c, :i * c] @ inv))  # [.., c, i c]
        top = torch.nn.functional.pad(inv, (0, c))
        inv = torch.cat([top, torch.cat([row, leaf[..., i, :, :]], dim=-1)], dim=-2)
    return inv


# ----------------------------------------------------------------------------------------------------------
# chunked forms
# ----------------------------------------------------------------------------------------------------------


def chunked_linear(queries, k, v, log_decay=None, decay_axis=None, initial_state=None, chunk_size=64,
                   output_final_state=False):
    """Chunked form of S_t = D_t S_{t-1} + k_t v_t^T.

    queries: list of (q [B, T, H, K], exclusive); k [B, T, H, K]; v [B, T, H, V]; log_decay per decay_axis;
    initial_state [B, H, K, V] or None. Returns (list of outputs [B, T, H, V], final state [B, H, K, V] or None).
    chunk_size >= T gives the parallel form (one chunk, no state passed between chunks).
    """
    _check_decay(log_decay, decay_axis, k, v)
    return chunked_linear_by(_DECAYS[decay_axis], queries, k, v, log_decay, initial_state, chunk_size,
                             output_final_state)


def chunked_linear_by(decay_cls, queries, k, v, log_decay=None, initial_state=None, chunk_size=64,
                      output_final_state=False):
    """chunked_linear with the decay axis given as its class (NoDecay, ScalarDecay, KeyDecay or ValueDecay), the
    entry point of generated modules; log_decay is not checked against it (chunked_linear does that)."""
    T, V = k.shape[1], v.shape[-1]
    dt, C, c, lg, s0 = _prepare(k, log_decay, initial_state, chunk_size)
    if T == 0:
        return _empty_result(queries, k, s0, V, dt, output_final_state)
    kc, vc = _chunk(k.to(dt), C), _chunk(v.to(dt), C)  # [N, B, H, C, K], [N, B, H, C, V]
    decay = decay_cls(lg, c, kc, vc)
    ds = decay.k_to_end().transpose(-1, -2) @ decay.v_to_end()  # [N, B, H, K, V] each chunk's own increment
    whole = decay.whole()
    whole_i = None if whole is None else whole.unbind(0)
    state, starts = s0, []  # state None: zero, so the first chunk adds nothing to its increment
    # Per-chunk views by unbind, not ds[i]: the backward of one unbind stacks the gradients once, where N
    # index ops would each build a full-size zero gradient (O(N^2) in the number of chunks).
    for i, ds_i in enumerate(ds.unbind(0)):  # pass the state once per chunk
        starts.append(state)
        state = ds_i if state is None else ds_i + (state if whole is None else whole_i[i] * state)
    outs = _outputs(queries, dt, C, decay, vc, _chunk_starts(starts), T)
    return outs, (state if output_final_state else None)


def chunked_delta(queries, k, y, beta, log_decay=None, decay_axis=None, initial_state=None, chunk_size=64,
                  output_final_state=False):
    """Chunked (WY/UT) form of S_t = (I - beta_t k_t k_t^T) D_t S_{t-1} + k_t y_t^T.

    k [B, T, H, K]; y [B, T, H, V]; beta [B, T, H]; decay_axis None, "scalar" or "key". Same queries and
    returns as chunked_linear. Derivation: with u_t = y_t - beta_t (D_t S_{t-1})^T k_t the step is
    S_t = D_t S_{t-1} + k_t u_t^T, a linear recurrence in the pseudo-values u. Inside a chunk with start
    state S0 and G_t the log decay from the chunk start through step t,
        u_t + beta_t sum_{s<t} (sum_i k_t[i] k_s[i] exp(G_t[i] - G_s[i])) u_s = y_t - beta_t (k_t * exp(G_t))^T S0,
    i.e. (I + L) U = Y - diag(beta) (K * exp(G)) S0 with L strictly lower triangular, so
    U = Uy - W S0 with Uy = (I + L)^-1 Y and W = (I + L)^-1 diag(beta) (K * exp(G)) (the UT transform; the
    inverse comes from _unit_lower_inverse). The state passes once per chunk as S' = D_chunk S0 + Kd^T U
    (Kd: k decayed to the chunk end); the outputs are those of chunked_linear with v replaced by u.
    """
    if decay_axis == "value":
        raise NotImplementedError("chunked_delta supports decay_axis None, 'scalar' or 'key'; a value-axis decay "
                                  "does not commute with (I - beta k k^T) into one C x C solve: use recurrent_delta")
    _check_decay(log_decay, decay_axis, k, y)
    B, T, H, K = k.shape
    if tuple(beta.shape) != (B, T, H):
        raise ValueError(f"beta must have shape {[B, T, H]}, got {list(beta.shape)}")
    return chunked_delta_by(_DECAYS[decay_axis], queries, k, y, beta, log_decay, initial_state, chunk_size,
                            output_final_state)


def chunked_delta_by(decay_cls, queries, k, y, beta, log_decay=None, initial_state=None, chunk_size=64,
                     output_final_state=False):
    """chunked_delta with the decay axis given as its class (NoDecay, ScalarDecay or KeyDecay), the entry point
    of generated modules; its arguments are not checked (chunked_delta does that)."""
    T, V = k.shape[1], y.shape[-1]
    dt, C, c, lg, s0 = _prepare(k, log_decay, initial_state, chunk_size)
    if T == 0:
        return _empty_result(queries, k, s0, V, dt, output_final_state)
    kc, yc = _chunk(k.to(dt), C), _chunk(y.to(dt), C)  # [N, B, H, C, K], [N, B, H, C, V]
    bc = _chunk(beta.to(dt), C).unsqueeze(-1)  # [N, B, H, C, 1]
    decay = decay_cls(lg, c, kc, yc)
    klev = decay.query_levels(kc, "inclusive")  # k as a query of the state after its own step
    lower = bc * decay.attn(kc, "strict", klev)  # [N, B, H, C, C], L_ts = beta_t decayed (k_t . k_s), s < t
    inv = _unit_lower_inverse(lower, c)  # [N, B, H, C, C]
    uy = inv @ yc  # [N, B, H, C, V]
    # W maps a chunk's start state into its pseudo-values; one chunk from zero (a batch of short packed sequences)
    # has no start state to map, so neither W nor k_t * exp(G_t) is formed.
    if s0 is None and kc.shape[0] == 1:
        w = [None]
    else:
        kg = decay.from_start(kc, "inclusive", klev)  # k_t * exp(G_t)
        w = (inv @ (bc * kg)).unbind(0)  # [B, H, C, K] per chunk
    kd_t = decay.k_to_end().transpose(-1, -2)  # [N, B, H, K, C]
    whole = decay.whole()
    whole_i = None if whole is None else whole.unbind(0)
    state, starts, us = s0, [], []  # state None: zero, so the first chunk's pseudo-values are its uy
    chunks = zip(uy.unbind(0), w, kd_t.unbind(0))  # unbind: see chunked_linear_by
    for i, (uy_i, w_i, kd_t_i) in enumerate(chunks):  # pass the state once per chunk, resolving the pseudo-values
        u = uy_i if state is None else uy_i - w_i @ state  # [B, H, C, V]
        starts.append(state)
        us.append(u)
        grown = kd_t_i @ u
        state = grown if state is None else grown + (state if whole is None else whole_i[i] * state)
    outs = _outputs(queries, dt, C, decay, _stack(us), _chunk_starts(starts), T)  # u: [N, B, H, C, V]
    return outs, (state if output_final_state else None)


def chunked_dplr(queries, k, v, a, b, log_decay=None, decay_axis=None, initial_state=None, chunk_size=64,
                 output_final_state=False):
    """Chunked form of S_t = (D_t + b_t a_t^T) S_{t-1} + k_t v_t^T (diagonal plus rank one, as in RWKV-7).

    k, a, b [B, T, H, K]; v [B, T, H, V]; decay_axis None, "scalar" or "key". Same queries and returns as
    chunked_linear. Derivation: with u_t = S_{t-1}^T a_t (an exclusive readout) the step is
    S_t = D_t S_{t-1} + b_t u_t^T + k_t v_t^T, a linear recurrence with keys (b, k) and values (u, v). Inside a
    chunk with start state S0 and G_t the log decay from the chunk start through step t,
        u_t - sum_{s<t} (a_t . b_s)_G u_s = (a_t * exp(G_{t-1}))^T S0 + sum_{s<t} (a_t . k_s)_G v_s,
    where (x_t . y_s)_G = sum_i x_t[i] y_s[i] exp(G_{t-1}[i] - G_s[i]); so (I - L) U = Ag S0 + M V with L, M
    strictly lower triangular, and U = Uv + W S0 with Uv = (I - L)^-1 M V, W = (I - L)^-1 Ag. The state passes
    once per chunk as S' = D_chunk S0 + Kd^T V + Bd^T U, and each output is chunked_linear's with both pairs.
    """
    if decay_axis == "value":
        raise NotImplementedError("chunked_dplr supports decay_axis None, 'scalar' or 'key'")
    _check_decay(log_decay, decay_axis, k, v)
    B, T, H, K = k.shape
    for name, x in (("a", a), ("b", b)):
        if tuple(x.shape) != (B, T, H, K):
            raise ValueError(f"{name} must have shape {[B, T, H, K]}, got {list(x.shape)}")
    return chunked_dplr_by(_DECAYS[decay_axis], queries, k, v, a, b, log_decay, initial_state, chunk_size,
                           output_final_state)


def chunked_dplr_by(decay_cls, queries, k, v, a, b, log_decay=None, initial_state=None, chunk_size=64,
                    output_final_state=False):
    """chunked_dplr with the decay axis given as its class (NoDecay, ScalarDecay or KeyDecay), the entry point
    of generated modules; its arguments are not checked (chunked_dplr does that)."""
    T, V = k.shape[1], v.shape[-1]
    dt, C, c, lg, s0 = _prepare(k, log_decay, initial_state, chunk_size)
    if T == 0:
        return _empty_result(queries, k, s0, V, dt, output_final_state)
    kc, vc, ac, bc = (_chunk(x.to(dt), C) for x in (k, v, a, b))  # [N, B, H, C, K|V]
    by_k = decay_cls(lg, c, kc, vc)
    by_b = decay_cls(lg, c, bc, vc, blocks=by_k.blocks)
    alev = by_k.query_levels(ac, "exclusive")
    inv = _unit_lower_inverse(-by_b.attn(ac, "exclusive", alev), c)  # (I - L)^-1, [N, B, H, C, C]
    uv = inv @ (by_k.attn(ac, "exclusive", alev) @ vc)  # [N, B, H, C, V]
    if s0 is None and ac.shape[0] == 1:  # one chunk from zero: no start state to read (see chunked_delta_by)
        w = [None]
    else:
        ag = by_k.from_start(ac, "exclusive", alev)  # a_t * exp(G_{t-1})
        w = (inv @ ag).unbind(0)  # [B, H, C, K] per chunk
    kd_t, bd_t = by_k.k_to_end().transpose(-1, -2), by_b.k_to_end().transpose(-1, -2)  # [N, B, H, K, C]
    kv = kd_t @ vc  # [N, B, H, K, V]
    whole = by_k.whole()
    whole_i = None if whole is None else whole.unbind(0)
    state, starts, us = s0, [], []  # state None: zero, so the first chunk's reads are its uv
    chunks = zip(uv.unbind(0), w, kv.unbind(0), bd_t.unbind(0))  # unbind: see chunked_linear_by
    for i, (uv_i, w_i, kv_i, bd_t_i) in enumerate(chunks):  # pass the state once per chunk, resolving the reads
        u = uv_i if state is None else uv_i + w_i @ state  # [B, H, C, V]
        starts.append(state)
        us.append(u)
        grown = kv_i + bd_t_i @ u
        state = grown if state is None else grown + (state if whole is None else whole_i[i] * state)
    starts, u = _chunk_starts(starts), _stack(us)  # [N, B, H, K, V] or None, [N, B, H, C, V]
    outs = []
    for q, exclusive in queries:
        qc = _chunk(q.to(dt), C)
        mode = "exclusive" if exclusive else "inclusive"
        qlev = by_k.query_levels(qc, mode)
        o = by_k.intra(qc, vc, mode, qlev)
        if starts is not None:
            o = by_k.inter(qc, mode, qlev, starts) + o
        outs.append(_unchunk(o + by_b.intra(qc, u, mode, qlev), T))
    return outs, (state if output_final_state else None)


# ----------------------------------------------------------------------------------------------------------
# scan form
# ----------------------------------------------------------------------------------------------------------


def _doubling_scan(a: Tensor, b: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Hillis-Steele inclusive scan of (a, b) pairs along dim: (prod a_{0..t}, s_t with s_{-1} = 0)."""
    L, d = b.shape[dim], 1
    while d < L:
        a_prev = torch.cat([torch.ones_like(a.narrow(dim, 0, d)), a.narrow(dim, 0, L - d)], dim=dim)
        b_prev = torch.cat([torch.zeros_like(b.narrow(dim, 0, d)), b.narrow(dim, 0, L - d)], dim=dim)
        b = a * b_prev + b
        a = a * a_prev
        d *= 2
    return a, b


def _chunked_scan(a: Tensor, b: Tensor, chunk: int) -> Tensor:
    """All states of s_t = a_t s_{t-1} + b_t (s_{-1} = 0) along dim 1: doubling inside chunks, then the
    chunk-end states by the same scan over chunks (recursively), then one broadcast fix-up."""
    T = b.shape[1]
    if T <= chunk:
        return _doubling_scan(a, b, 1)[1]
    N = -(-T // chunk)
    if N * chunk != T:
        pad = N * chunk - T
        a = torch.cat([a, a.new_ones((a.shape[0], pad) + tuple(a.shape[2:]))], dim=1)
        b = torch.cat([b, b.new_zeros((b.shape[0], pad) + tuple(b.shape[2:]))], dim=1)
    a = a.reshape((a.shape[0], N, chunk) + tuple(a.shape[2:]))  # [B, N, C, H, *S]
    b = b.reshape((b.shape[0], N, chunk) + tuple(b.shape[2:]))
    a_cum, s_local = _doubling_scan(a, b, 2)  # states with a zero start inside each chunk
    ends = _chunked_scan(a_cum[:, :, -1], s_local[:, :, -1], chunk)  # [B, N, H, *S] true chunk-end states
    before = torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], dim=1)  # state entering each chunk
    s = s_local + a_cum * before.unsqueeze(2)  # [B, N, C, H, *S]
    return s.reshape((s.shape[0], N * chunk) + tuple(s.shape[3:]))[:, :T]


def scan_diagonal(a, b, initial_state=None):
    """All states of the elementwise recurrence s_t = a_t * s_{t-1} + b_t.

    b [B, T, H, *S]; a broadcastable to b (e.g. [B, T, H, K, 1]), any sign; initial_state [B, H, *S] or None
    (zeros). Returns [B, T, H, *S]: s_t for every t (s_{t-1} is the previous row, or initial_state).
    """
    dt = _compute_dtype(b)
    a, b = a.to(dt), b.to(dt)
    if a.dim() != b.dim():
        raise ValueError(f"a must have as many dims as b ({b.dim()}), got shape {list(a.shape)}")
    T = b.shape[1]
    if T == 0:
        return b
    if a.shape[1] != T:
        a = a.expand((a.shape[0], T) + tuple(a.shape[2:]))
    if initial_state is not None:
        b0 = b[:, :1] + a[:, :1] * initial_state.to(dt).unsqueeze(1)  # fold s_{-1} into the first step
        b = torch.cat([b0, b[:, 1:]], dim=1)
    return _chunked_scan(a, b, 64)


def _block_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a [..., m, m] @ b [..., m, m] for small m as m outer products (column k of a times row k of b): batched
    matmuls of 2 x 2 blocks, or a broadcast product summed over a middle axis, are several times slower."""
    out = a[..., :, :1] * b[..., :1, :]
    for k in range(1, a.shape[-1]):
        out = out + a[..., :, k : k + 1] * b[..., k : k + 1, :]
    return out


def _block_matvec(a: Tensor, x: Tensor) -> Tensor:
    """a [..., m, m] applied to x [..., m]."""
    out = a[..., :, 0] * x[..., :1]
    for k in range(1, a.shape[-1]):
        out = out + a[..., :, k] * x[..., k : k + 1]
    return out


def _chunked_block_scan(a: Tensor, b: Tensor) -> Tensor:
    """All states of s_t = A_t s_{t-1} + b_t (s_{-1} = 0) along dim 1, in chunks of C ~ sqrt(T) steps: the
    chunks step together from a zero start (C steps, each over every chunk at once), then the states entering
    each chunk are carried across chunks (T / C steps), then one fix-up s_t += (A_t ... A_start) s_entry. That is
    O(T m^3) work in about 2 sqrt(T) vectorised steps; a doubling scan needs log2(C) times the block products."""
    T, m = b.shape[1], b.shape[-1]
    C = max(1, int(T**0.5))
    N = -(-T // C)
    eye = torch.eye(m, dtype=a.dtype, device=a.device)
    if N * C != T:
        pad = N * C - T
        a = torch.cat([a, eye.expand((a.shape[0], pad) + tuple(a.shape[2:]))], dim=1)
        b = torch.cat([b, b.new_zeros((b.shape[0], pad) + tuple(b.shape[2:]))], dim=1)
    a = a.reshape((a.shape[0], N, C) + tuple(a.shape[2:]))  # [B, N, C, H, *S, m, m]
    b = b.reshape((b.shape[0], N, C) + tuple(b.shape[2:]))  # [B, N, C, H, *S, m]
    s, prod = b[:, :, 0], a[:, :, 0]
    local, prods = [s], [prod]
    for c in range(1, C):  # every chunk from a zero start, all chunks at once
        s = _block_matvec(a[:, :, c], s) + b[:, :, c]
        prod = _block_matmul(a[:, :, c], prod)
        local.append(s)
        prods.append(prod)
    local, prods = torch.stack(local, dim=2), torch.stack(prods, dim=2)
    entry, entries = torch.zeros_like(local[:, 0, 0]), []
    for n in range(N):  # the state entering each chunk
        entries.append(entry)
        entry = _block_matvec(prods[:, n, -1], entry) + local[:, n, -1]
    entries = torch.stack(entries, dim=1)  # [B, N, H, *S, m]
    out = local + _block_matvec(prods, entries.unsqueeze(2))
    return out.reshape((out.shape[0], N * C) + tuple(out.shape[3:]))[:, :T]


def scan_block(a, b, initial_state=None):
    """All states of the coupled elementwise recurrence s_t = A_t s_{t-1} + b_t, m states per element.

    a [B, T, H, *S, m, m] (A_t per element: row r holds the coefficients of every state in the update of state
    r); b [B, T, H, *S, m]; initial_state [B, H, *S, m] or None (zeros). Returns [B, T, H, *S, m]. The combine
    (A1, b1) . (A2, b2) = (A2 A1, A2 b1 + b2) is associative (it composes affine maps, Blelloch 1990, section
    1.4), so the steps regroup into chunks (`_chunked_block_scan`)."""
    dt = _compute_dtype(b)
    a, b = a.to(dt), b.to(dt)
    T = b.shape[1]
    if T == 0:
        return b
    if initial_state is not None:  # fold s_{-1} into the first step
        b0 = b[:, :1] + _block_matvec(a[:, :1], initial_state.to(dt).unsqueeze(1))
        b = torch.cat([b0, b[:, 1:]], dim=1)
    return _chunked_block_scan(a, b)


# ----------------------------------------------------------------------------------------------------------
# recurrent forms (step-by-step baseline)
# ----------------------------------------------------------------------------------------------------------


def _steps(x: Tensor, dt: torch.dtype, shape: tuple) -> Tensor:
    """[B, T, H, ...] -> time-major contiguous [T, B * H, *shape], so each step is one contiguous slice."""
    B, T, H = x.shape[:3]
    return x.to(dt).transpose(0, 1).reshape((T, B * H) + shape).contiguous()


def _step_decays(log_decay: Tensor | None, decay_axis: str | None, dt: torch.dtype, K: int, V: int):
    """exp(log_decay) once, time-major, shaped to multiply a [B * H, K, V] state (None: no decay)."""
    if decay_axis is None:
        return None
    shape = {"scalar": (1, 1), "key": (K, 1), "value": (1, V)}[decay_axis]
    return _steps(torch.exp(log_decay.to(dt)), dt, shape)


def _recurrent(queries, k, v, beta, log_decay, decay_axis, initial_state, output_final_state):
    """The step loop shared by recurrent_linear (beta None) and recurrent_delta."""
    dt = _compute_dtype(k)
    B, T, H, K = k.shape
    V = v.shape[-1]
    state = k.new_zeros((B * H, K, V), dtype=dt) if initial_state is None else initial_state.to(dt).reshape(
        B * H, K, V)
    decays = _step_decays(log_decay, decay_axis, dt, K, V)  # [T, B * H, K|1, V|1]
    ks, vs = _steps(k, dt, (K, 1)), _steps(v, dt, (1, V))  # [T, B * H, K, 1], [T, B * H, 1, V]
    krows = None if beta is None else ks.reshape(T, B * H, 1, K)
    betas = None if beta is None else _steps(beta, dt, (1, 1))
    before, after, outs = [], [], []
    for q, exclusive in queries:
        outs.append([])
        (before if exclusive else after).append((_steps(q, dt, (1, K)), outs[-1]))  # [T, B * H, 1, K]
    for t in range(T):
        for q, out in before:
            out.append(torch.bmm(q[t], state))  # [B * H, 1, V]
        if decays is not None:
            state = state * decays[t]
        if beta is None:
            state = torch.baddbmm(state, ks[t], vs[t])  # + k v^T
        else:
            u = torch.addcmul(vs[t], betas[t], torch.bmm(krows[t], state), value=-1.0)  # y - beta k^T S
            state = torch.baddbmm(state, ks[t], u)
        for q, out in after:
            out.append(torch.bmm(q[t], state))
    results = []
    for out in outs:
        o = torch.stack(out) if out else k.new_zeros((0, B * H, 1, V), dtype=dt)  # [T, B * H, 1, V]
        results.append(o.reshape(T, B, H, V).transpose(0, 1))
    return results, (state.reshape(B, H, K, V) if output_final_state else None)


def recurrent_linear(queries, k, v, log_decay=None, decay_axis=None, initial_state=None, output_final_state=False):
    """Step-by-step S_t = D_t S_{t-1} + k_t v_t^T (any decay axis). Same arguments and returns as chunked_linear."""
    _check_decay(log_decay, decay_axis, k, v)
    return _recurrent(queries, k, v, None, log_decay, decay_axis, initial_state, output_final_state)


def recurrent_delta(queries, k, y, beta, log_decay=None, decay_axis=None, initial_state=None,
                    output_final_state=False):
    """Step-by-step S_t = (I - beta_t k_t k_t^T) D_t S_{t-1} + k_t y_t^T (any decay axis).

    Same arguments and returns as chunked_delta.
    """
    _check_decay(log_decay, decay_axis, k, y)
    return _recurrent(queries, k, y, beta, log_decay, decay_axis, initial_state, output_final_state)
