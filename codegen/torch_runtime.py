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

Chunks (chunk_size C): inside a chunk, the pairs s < t of a key- or value-axis decay are covered by a binary
hierarchy of blocks (leaves of c <= 4 steps, C = c 2^L): for two sibling blocks (left, right) the scores
factor through the state at their boundary, (q_R * decay to t) @ (k_L * decay from s)^T, one matmul with both
factors <= 1. It replaces the usual sub-chunks of 16 with a direct [16, 16, K] mask: O(C K log C)
elementwise work per chunk instead of O(C^2 K), which is what makes the chunked form fast on a CPU.

This file imports only torch and is copied verbatim into generated modules; it holds no global state.
"""

import torch

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
    """(chunk length C, leaf length c) with C = c * 2^L >= min(chunk_size, T): c = 1 when that is a power of
    two, else c in {3, 4} (or C itself when C <= 4): padding under 40% of C, leaves of at most 4 steps."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    C = max(1, min(chunk_size, T))
    if C & (C - 1) == 0 or C <= 4:
        return C, (1 if C & (C - 1) == 0 else C)
    levels = C.bit_length() - 3  # C / 2^levels in [4, 8)
    c = -(-C // (1 << levels))
    if c > 4:
        levels += 1
        c = -(-C // (1 << levels))
    return c << levels, c


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
# the block hierarchy inside a chunk (key- and value-axis decays)
# ----------------------------------------------------------------------------------------------------------


def _block_decays(g: Tensor, c: int) -> list:
    """exp(total log decay) of every block, level by level: g [.., C, D] -> [[.., C / b, 1, D] for b = c, 2c, .., C]."""
    lead, C, D = g.shape[:-2], g.shape[-2], g.shape[-1]
    e = torch.exp(g.reshape(*lead, C, 1, D) if c == 1 else g.reshape(*lead, C // c, c, D).sum(-2, keepdim=True))
    out = [e]
    while e.shape[-3] > 1:
        e2 = e.reshape(*lead, -1, 2, 1, D)
        e = e2[..., 0, :, :] * e2[..., 1, :, :]  # [.., m, 1, D]
        out.append(e)
    return out


def _decayed_levels(x: Tensor | None, g: Tensor, side: str, mode: str, c: int, blocks: list) -> list:
    """x scaled by the decay inside its block, for every block size b = c, 2c, .., C: [[.., C / b, b, D], ..].

    side "query": decay from the block start to the state a query at t reads (through t, or through t - 1 when
    mode is "exclusive"); side "key": decay from after step s to the block end. x None gives the factors alone.
    The factors of a block of 2b are those of its halves times the other half's whole-block decay (products of
    factors <= 1: no overflow, no cancellation). The last entry (b = C) is the chunk-level factor:
    q * exp(decay from the chunk start) or k * exp(decay to the chunk end).
    """
    lead, C, D = g.shape[:-2], g.shape[-2], g.shape[-1]
    n = C // c
    if c == 1 and (side == "key" or mode == "exclusive"):
        cur = torch.ones_like(g) if x is None else x  # nothing inside a one-step block: factor 1
        cur = cur.reshape(*lead, n, 1, -1)
    elif c == 1:  # the query reads the state after its own step: the step's decay
        cur = blocks[0] if x is None else x.reshape(*lead, n, 1, -1) * blocks[0]
    else:
        gs = g.reshape(*lead, n, c, D)
        if side == "key":
            logs = _suffix(gs, -2)
        else:
            logs = gs.cumsum(-2)
            logs = _shift(logs, -2) if mode == "exclusive" else logs
        f = torch.exp(logs)  # [.., n, c, D]
        cur = f if x is None else x.reshape(*lead, n, c, -1) * f
    levels, b = [cur], c
    for e in blocks[:-1]:
        m = C // (2 * b)
        e2 = e.reshape(*lead, m, 2, 1, D)
        one = torch.ones_like(e2[..., :1, :, :])
        if side == "query":
            scale = torch.cat([one, e2[..., :1, :, :]], dim=-3)  # right half: times the left half's decay
        else:
            scale = torch.cat([e2[..., 1:, :, :], one], dim=-3)  # left half: times the right half's decay
        cur = (cur.reshape(*lead, m, 2, b, -1) * scale).reshape(*lead, m, 2 * b, -1)
        levels.append(cur)
        b *= 2
    return levels


def _pairs(x: Tensor, b: int, right: bool) -> Tensor:
    """The right (or left) block of every sibling pair of size-b blocks: [.., C, D] -> [.., C / 2b, b, D]."""
    lead, C = x.shape[:-2], x.shape[-2]
    return x.reshape(*lead, C // (2 * b), 2, b, x.shape[-1])[..., 1 if right else 0, :, :]


def _scores(x: Tensor, y: Tensor) -> Tensor:
    """x @ y^T for [.., m, b, D] blocks; for b <= 2 as a broadcast product (tiny batched matmuls are slow on CPU)."""
    if x.shape[-2] <= 2:
        return (x.unsqueeze(-2) * y.unsqueeze(-3)).sum(-1)
    return x @ y.transpose(-1, -2)


def _leaf_decay(g: Tensor, mode: str, t: int, s: int) -> Tensor | None:
    """exp(log decay from step s to the state read at step t) inside leaf blocks: g [.., n, c, D] -> [.., n, D],
    or None where the mode masks the pair (s > t; s == t unless inclusive)."""
    if s > t or (s == t and mode != "inclusive"):
        return None
    stop = t if mode == "exclusive" else t + 1
    return torch.exp(g[..., s + 1:stop, :].sum(-2))


def _leaf_attn_key(q: Tensor, k: Tensor, g: Tensor, mode: str, c: int) -> Tensor:
    """Scores inside leaf blocks for a key decay, pair by pair: q, k, g [.., C, K] -> [.., C / c, c, c]."""
    lead, C, K = q.shape[:-2], q.shape[-2], q.shape[-1]
    if c == 1:  # a one-step block: only the diagonal, undecayed
        diag = (q * k).sum(-1) if mode == "inclusive" else q.new_zeros(q.shape[:-1])
        return diag.reshape(*lead, C, 1, 1)
    qs, ks, gs = (x.reshape(*lead, C // c, c, K) for x in (q, k, g))
    zero = qs.new_zeros(qs.shape[:-2])  # [.., n]
    rows = []
    for t in range(c):
        row = []
        for s in range(c):
            decay = _leaf_decay(gs, mode, t, s)
            row.append(zero if decay is None else (qs[..., t, :] * decay * ks[..., s, :]).sum(-1))
        rows.append(torch.stack(row, dim=-1))
    return torch.stack(rows, dim=-2)


def _attn_key(q: Tensor, k: Tensor, g: Tensor, mode: str, c: int, qlev: list, klev: list) -> Tensor:
    """Decayed scores for a key decay, A_ts = sum_i q_t[i] k_s[i] exp(decay_i from s to t), masked per mode:
    leaf blocks direct, then A[R, L] = qlev_R @ klev_L^T for every sibling pair. Returns [.., C, C]."""
    lead, C = q.shape[:-2], q.shape[-2]
    a = _leaf_attn_key(q, k, g, mode, c)  # [.., C / c, c, c]
    b = c
    for ql, kl in zip(qlev[:-1], klev[:-1], strict=True):
        m = C // (2 * b)
        a_rl = _scores(_pairs(ql.reshape(*lead, C, -1), b, True), _pairs(kl.reshape(*lead, C, -1), b, False))
        a2 = a.reshape(*lead, m, 2, b, b)
        top = torch.nn.functional.pad(a2[..., 0, :, :], (0, b))  # [.., m, b, 2b]
        bottom = torch.cat([a_rl, a2[..., 1, :, :]], dim=-1)
        a = torch.cat([top, bottom], dim=-2)  # [.., m, 2b, 2b]
        b *= 2
    return a.reshape(*lead, C, C)


def _add_right(o: Tensor, contrib: Tensor, b: int) -> Tensor:
    """o [.., C, V] plus contrib [.., C / 2b, b, V] on the right block of every sibling pair."""
    lead, C, V = o.shape[:-2], o.shape[-2], o.shape[-1]
    o2 = o.reshape(*lead, C // (2 * b), 2, b, V)
    return torch.stack([o2[..., 0, :, :], o2[..., 1, :, :] + contrib], dim=-3).reshape(*lead, C, V)


def _intra_value(q, k, v, g, mode, c, elev, vlev) -> Tensor:
    """Intra-chunk output for a value decay, o_t[j] = sum_s (q_t . k_s) exp(decay_j from s to t) v_s[j]:
    leaf blocks direct, then o_R += elev_R * ((q_R k_L^T) @ vlev_L) for every sibling pair."""
    lead, C, V = q.shape[:-2], q.shape[-2], v.shape[-1]
    n = C // c
    if c == 1:
        o = (q * k).sum(-1, keepdim=True) * v if mode == "inclusive" else torch.zeros_like(v)
    else:
        a = q.reshape(*lead, n, c, -1) @ k.reshape(*lead, n, c, -1).transpose(-1, -2)  # [.., n, c, c]
        vs, gs = v.reshape(*lead, n, c, V), g.reshape(*lead, n, c, V)
        rows = []
        for t in range(c):
            row = torch.zeros_like(vs[..., 0, :])
            for s in range(c):
                decay = _leaf_decay(gs, mode, t, s)
                if decay is not None:
                    row = row + a[..., t, s, None] * decay * vs[..., s, :]
            rows.append(row)
        o = torch.stack(rows, dim=-2).reshape(v.shape)
    b = c
    for el, vl in zip(elev[:-1], vlev[:-1], strict=True):
        a_rl = _scores(_pairs(q, b, True), _pairs(k, b, False))  # [.., m, b, b]
        er, vr = _pairs(el.reshape(*lead, C, V), b, True), _pairs(vl.reshape(*lead, C, V), b, False)
        o = _add_right(o, er * (a_rl @ vr), b)
        b *= 2
    return o


# ----------------------------------------------------------------------------------------------------------
# chunk-level pieces shared by the linear, delta and DPLR forms: one class per decay axis
# ----------------------------------------------------------------------------------------------------------
#
# Each class holds the decays of one call, chunked (per-chunk factors for the state pass, per-query intra- and
# inter-chunk parts), built from lg: log decays [N, B, H, C(, D)] or None, c: the leaf length, and the chunked
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
        """Per-level factors of the block hierarchy (key and value decays only)."""
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
        """No block hierarchy for a scalar decay."""
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
    """decay_axis "key": lg [N, B, H, C, K] scales row i of the state; the block hierarchy inside a chunk."""

    axis = "key"

    def __init__(self, lg: Tensor, c: int, k: Tensor, v: Tensor, blocks: list | None = None):
        self.lg, self.c, self.k, self.v = lg, c, k, v
        self.blocks = blocks if blocks is not None else _block_decays(lg, c)  # (shared by calls on one lg)
        self.klev = _decayed_levels(k, lg, "key", "inclusive", c, self.blocks)

    def whole(self) -> Tensor:
        """Decay of the state over each whole chunk, [N, B, H, K, 1] (its rows)."""
        e = self.blocks[-1]  # [N, B, H, 1, 1, K]
        return e.reshape(e.shape[:-3] + (1, e.shape[-1])).transpose(-1, -2)

    def k_to_end(self) -> Tensor:
        """k_s decayed to the chunk end, [N, B, H, C, K]."""
        return self.klev[-1].reshape(self.k.shape)

    def v_to_end(self) -> Tensor:
        """v (the decay is on k's side)."""
        return self.v

    def query_levels(self, q: Tensor, mode: str) -> list:
        """q decayed inside blocks, per level."""
        return _decayed_levels(q, self.lg, "query", mode, self.c, self.blocks)

    def attn(self, q: Tensor, mode: str, qlev: list) -> Tensor:
        """Decayed scores [N, B, H, C, C]."""
        return _attn_key(q, self.k, self.lg, mode, self.c, qlev, self.klev)

    def from_start(self, q: Tensor, mode: str, qlev: list) -> Tensor:
        """q_t decayed from the chunk start to the state it reads (the last level of qlev)."""
        return qlev[-1].reshape(q.shape)

    def inter(self, q: Tensor, mode: str, qlev: list, starts: Tensor) -> Tensor:
        """Outputs from the chunk start states."""
        return qlev[-1].reshape(q.shape) @ starts

    def intra(self, q: Tensor, v: Tensor, mode: str, qlev: list) -> Tensor:
        """Outputs from the steps of the same chunk."""
        return self.attn(q, mode, qlev) @ v


class ValueDecay:
    """decay_axis "value": lg [N, B, H, C, V] scales column j of the state (linear form only)."""

    axis = "value"

    def __init__(self, lg: Tensor, c: int, k: Tensor, v: Tensor, blocks: list | None = None):
        self.lg, self.c, self.k, self.v = lg, c, k, v
        self.blocks = blocks if blocks is not None else _block_decays(lg, c)
        self.klev = _decayed_levels(v, lg, "key", "inclusive", c, self.blocks)

    def whole(self) -> Tensor:
        """Decay of the state over each whole chunk, [N, B, H, 1, V] (its columns)."""
        e = self.blocks[-1]  # [N, B, H, 1, 1, V]
        return e.reshape(e.shape[:-3] + (1, e.shape[-1]))

    def k_to_end(self) -> Tensor:
        """k itself (the decay is on v's side)."""
        return self.k

    def v_to_end(self) -> Tensor:
        """v_s decayed to the chunk end, [N, B, H, C, V]."""
        return self.klev[-1].reshape(self.v.shape)

    def query_levels(self, q: Tensor, mode: str) -> list:
        """The bare decay factors inside blocks, per level (they scale outputs, not q)."""
        return _decayed_levels(None, self.lg, "query", mode, self.c, self.blocks)

    def inter(self, q: Tensor, mode: str, qlev: list, starts: Tensor) -> Tensor:
        """Outputs from the chunk start states."""
        return (q @ starts) * qlev[-1].reshape(q.shape[:-1] + (starts.shape[-1],))

    def intra(self, q: Tensor, v: Tensor, mode: str, qlev: list) -> Tensor:
        """Outputs from the steps of the same chunk."""
        return _intra_value(q, self.k, v, self.lg, mode, self.c, qlev, self.klev)


_DECAYS = {None: NoDecay, "scalar": ScalarDecay, "key": KeyDecay, "value": ValueDecay}


def _prepare(k, log_decay, initial_state, chunk_size, v_dim):
    """Common set-up: compute dtype, chunk sizes, chunked log decays, start state."""
    dt = _compute_dtype(k)
    B, T, H, K = k.shape
    C, c = _chunk_sizes(T, chunk_size)
    lg = None if log_decay is None else _chunk(log_decay.to(dt), C)  # [N, B, H, C(, D)]
    s0 = k.new_zeros((B, H, K, v_dim), dtype=dt) if initial_state is None else initial_state.to(dt)
    return dt, C, c, lg, s0


def _outputs(queries, dt, C, decay, v: Tensor, starts: Tensor, T: int) -> list:
    """Per query: inter-chunk (start state) plus intra-chunk parts, back to [B, T, H, V]."""
    outs = []
    for q, exclusive in queries:
        qc = _chunk(q.to(dt), C)  # [N, B, H, C, K]
        mode = "exclusive" if exclusive else "inclusive"
        qlev = decay.query_levels(qc, mode)
        outs.append(_unchunk(decay.inter(qc, mode, qlev, starts) + decay.intra(qc, v, mode, qlev), T))
    return outs


def _unit_lower_inverse(L: Tensor, c: int) -> Tensor:
    """(I + L)^-1 for a strictly lower triangular L [.., C, C], C = c 2^levels: leaf blocks by their finite
    Neumann series, then sibling blocks merged bottom-up, [[A, 0], [X, B]]^-1 = [[A^-1, 0], [-B^-1 X A^-1, B^-1]]
    (matmuls only; a batched LAPACK triangular solve is several times slower on a CPU)."""
    lead, C = L.shape[:-2], L.shape[-1]
    n = C // c
    eye = torch.eye(c, dtype=L.dtype, device=L.device)
    leaf = torch.diagonal(L.reshape(*lead, n, c, n, c), dim1=-4, dim2=-2).movedim(-1, -3)  # [.., n, c, c]
    inv, term = eye.expand(leaf.shape), eye.expand(leaf.shape)
    for _ in range(c - 1):
        term = -(term @ leaf)
        inv = inv + term
    b = c
    while b < C:
        m = C // (2 * b)
        blocks = L.reshape(*lead, m, 2, b, m, 2, b)
        x = torch.diagonal(blocks, dim1=-6, dim2=-3)[..., 1, :, 0, :, :].movedim(-1, -3)  # [.., m, b, b]
        inv2 = inv.reshape(*lead, m, 2, b, b)
        a_inv, b_inv = inv2[..., 0, :, :], inv2[..., 1, :, :]
        x_inv = -(b_inv @ x @ a_inv)
        top = torch.nn.functional.pad(a_inv, (0, b))
        bottom = torch.cat([x_inv, b_inv], dim=-1)
        inv = torch.cat([top, bottom], dim=-2)  # [.., m, 2b, 2b]
        b *= 2
    return inv.reshape(*lead, C, C)


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
    B, T, H, K = k.shape
    V = v.shape[-1]
    dt, C, c, lg, s0 = _prepare(k, log_decay, initial_state, chunk_size, V)
    if T == 0:
        return [k.new_zeros((B, 0, H, V), dtype=dt) for _ in queries], (s0 if output_final_state else None)
    kc, vc = _chunk(k.to(dt), C), _chunk(v.to(dt), C)  # [N, B, H, C, K], [N, B, H, C, V]
    decay = decay_cls(lg, c, kc, vc)
    ds = decay.k_to_end().transpose(-1, -2) @ decay.v_to_end()  # [N, B, H, K, V] each chunk's own increment
    whole = decay.whole()
    state, starts = s0, []
    for i in range(kc.shape[0]):  # pass the state once per chunk
        starts.append(state)
        state = ds[i] + (state if whole is None else whole[i] * state)
    starts = torch.stack(starts)  # [N, B, H, K, V]
    outs = _outputs(queries, dt, C, decay, vc, starts, T)
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
    B, T, H, K = k.shape
    V = y.shape[-1]
    dt, C, c, lg, s0 = _prepare(k, log_decay, initial_state, chunk_size, V)
    if T == 0:
        return [k.new_zeros((B, 0, H, V), dtype=dt) for _ in queries], (s0 if output_final_state else None)
    kc, yc = _chunk(k.to(dt), C), _chunk(y.to(dt), C)  # [N, B, H, C, K], [N, B, H, C, V]
    bc = _chunk(beta.to(dt), C).unsqueeze(-1)  # [N, B, H, C, 1]
    decay = decay_cls(lg, c, kc, yc)
    klev = decay.query_levels(kc, "inclusive")  # k as a query of the state after its own step
    lower = bc * decay.attn(kc, "strict", klev)  # [N, B, H, C, C], L_ts = beta_t decayed (k_t . k_s), s < t
    kg = decay.from_start(kc, "inclusive", klev)  # k_t * exp(G_t)
    inv = _unit_lower_inverse(lower, c)  # [N, B, H, C, C]
    uy, w = inv @ yc, inv @ (bc * kg)  # [N, B, H, C, V], [N, B, H, C, K]
    kd_t = decay.k_to_end().transpose(-1, -2)  # [N, B, H, K, C]
    whole = decay.whole()
    state, starts, us = s0, [], []
    for i in range(kc.shape[0]):  # pass the state once per chunk, resolving the pseudo-values against it
        u = uy[i] - w[i] @ state  # [B, H, C, V]
        starts.append(state)
        us.append(u)
        state = kd_t[i] @ u + (state if whole is None else whole[i] * state)
    starts, u = torch.stack(starts), torch.stack(us)  # [N, B, H, K, V], [N, B, H, C, V]
    outs = _outputs(queries, dt, C, decay, u, starts, T)
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
    B, T, H, K = k.shape
    V = v.shape[-1]
    dt, C, c, lg, s0 = _prepare(k, log_decay, initial_state, chunk_size, V)
    if T == 0:
        return [k.new_zeros((B, 0, H, V), dtype=dt) for _ in queries], (s0 if output_final_state else None)
    kc, vc, ac, bc = (_chunk(x.to(dt), C) for x in (k, v, a, b))  # [N, B, H, C, K|V]
    by_k = decay_cls(lg, c, kc, vc)
    by_b = decay_cls(lg, c, bc, vc, blocks=by_k.blocks)
    alev = by_k.query_levels(ac, "exclusive")
    inv = _unit_lower_inverse(-by_b.attn(ac, "exclusive", alev), c)  # (I - L)^-1, [N, B, H, C, C]
    uv = inv @ (by_k.attn(ac, "exclusive", alev) @ vc)  # [N, B, H, C, V]
    ag = by_k.from_start(ac, "exclusive", alev)  # a_t * exp(G_{t-1})
    w = inv @ ag  # [N, B, H, C, K]
    kd_t, bd_t = by_k.k_to_end().transpose(-1, -2), by_b.k_to_end().transpose(-1, -2)  # [N, B, H, K, C]
    kv = kd_t @ vc  # [N, B, H, K, V]
    whole = by_k.whole()
    state, starts, us = s0, [], []
    for i in range(kc.shape[0]):  # pass the state once per chunk, resolving the rank-one reads against it
        u = uv[i] + w[i] @ state  # [B, H, C, V]
        starts.append(state)
        us.append(u)
        state = kv[i] + bd_t[i] @ u + (state if whole is None else whole[i] * state)
    starts, u = torch.stack(starts), torch.stack(us)  # [N, B, H, K, V], [N, B, H, C, V]
    outs = []
    for q, exclusive in queries:
        qc = _chunk(q.to(dt), C)
        mode = "exclusive" if exclusive else "inclusive"
        qlev = by_k.query_levels(qc, mode)
        o = by_k.inter(qc, mode, qlev, starts) + by_k.intra(qc, vc, mode, qlev) + by_b.intra(qc, u, mode, qlev)
        outs.append(_unchunk(o, T))
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
