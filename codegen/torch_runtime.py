"""PyTorch runtime for the canonical forms of a per-step linear recurrence (CPU path, differentiable).

Layout: B batch, T time, H heads, K key dim, V value dim. Per-step tensors are [B, T, H, ...];
states are [B, H, K, V]. A query is a pair (q [B, T, H, K], exclusive): its output is o_t = S_t^T q_t
(inclusive: after the step-t update) or o_t = S_{t-1}^T q_t (exclusive: before it).

Decays act on the state as D_t = exp(log_decay_t):
  decay_axis=None    D_t = I                       (log_decay must be None)
  "scalar"           log_decay [B, T, H]           multiplies the whole state
  "key"              log_decay [B, T, H, K]        multiplies row i of S by exp(log_decay[..., i])
  "value"            log_decay [B, T, H, V]        multiplies column j of S by exp(log_decay[..., j])

Forms:
  chunked_linear   S_t = D_t S_{t-1} + k_t v_t^T                        (chunked; chunk_size >= T: parallel)
  chunked_delta    S_t = (I - beta_t k_t k_t^T) D_t S_{t-1} + k_t y_t^T (chunked, WY/UT form)
  scan_diagonal    s_t = a_t * s_{t-1} + b_t, elementwise              (associative scan)
  recurrent_linear, recurrent_delta                                     (step-by-step loop, the baseline)

Numerics: inputs in float16/bfloat16 are computed in float32, otherwise in their own dtype; outputs come
back in that compute dtype (the caller casts). Decay factors are only ever formed as exp(G_a - G_b) with
G_a <= G_b (G a cumulative sum of log decays <= 0), never exp(-G) alone, so log decays of -20 per step
neither overflow nor produce nan, in values or gradients. No in-place ops: everything is differentiable.

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
    expected = {
        "scalar": tuple(k.shape[:3]),
        "key": tuple(k.shape),
        "value": tuple(v.shape),
    }[decay_axis]
    if tuple(log_decay.shape) != expected:
        raise ValueError(f"log_decay for decay_axis={decay_axis!r} must have shape {list(expected)}, "
                         f"got {list(log_decay.shape)}")


def _chunk_sizes(T: int, chunk_size: int, decay_axis: str | None) -> tuple[int, int]:
    """(chunk length C, sub-chunk length c): C = min(chunk_size, T), rounded up to a multiple of c."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    C = min(chunk_size, T)
    c = min(16, C) if decay_axis in ("key", "value") else C
    C = -(-C // c) * c
    return C, c


def _chunk(x: Tensor, C: int) -> Tensor:
    """[B, T, H, *D] -> [B, H, N, C, *D], zero-padded along T to N * C."""
    B, T = x.shape[:2]
    N = -(-T // C)
    if N * C != T:
        x = torch.cat([x, x.new_zeros((B, N * C - T) + tuple(x.shape[2:]))], dim=1)
    x = x.reshape((B, N, C) + tuple(x.shape[2:]))
    return x.permute(0, 3, 1, 2, *range(4, x.dim()))


def _unchunk(x: Tensor, T: int) -> Tensor:
    """[B, H, N, C, *D] -> [B, T, H, *D] (drops the padding)."""
    B, H, N, C = x.shape[:4]
    x = x.permute(0, 2, 3, 1, *range(4, x.dim()))
    return x.reshape((B, N * C, H) + tuple(x.shape[4:]))[:, :T]


def _shift(g: Tensor) -> Tensor:
    """Exclusive from inclusive cumulative sum along the chunk axis (dim 3): [.., C, ..] -> G_{t-1}, G_{-1} = 0."""
    return torch.cat([torch.zeros_like(g[:, :, :, :1]), g[:, :, :, :-1]], dim=3)


def _causal(C: int, strict: bool, device: torch.device) -> Tensor:
    """[C, C] bool: s <= t (s < t if strict)."""
    return torch.ones(C, C, dtype=torch.bool, device=device).tril(-1 if strict else 0)


def _masked_exp(arg: Tensor, keep: Tensor) -> Tensor:
    """exp(arg) where keep, exactly 0 elsewhere (no inf, no nan in the gradient)."""
    return torch.exp(arg.masked_fill(~keep, float("-inf")))


def _sub_ref(g: Tensor) -> Tensor:
    """G at the end of the previous sub-chunk: [.., n, c, D] -> [.., n, D] (0 for the first sub-chunk)."""
    last = g[..., :, -1, :]  # [.., n, D]
    return torch.cat([torch.zeros_like(last[..., :1, :]), last[..., :-1, :]], dim=-2)


def _attn(q: Tensor, gq: Tensor | None, k: Tensor, g: Tensor | None, decay_axis: str | None, strict: bool,
          c: int) -> Tensor:
    """Intra-chunk decayed scores A_ts = sum_i q_t[i] k_s[i] exp(gq_t[i] - g_s[i]) for s <= t (s < t if strict).

    q, k: [B, H, N, C, K]; gq, g: [B, H, N, C] (scalar), [B, H, N, C, K] (key) or None. Returns [B, H, N, C, C].
    For key decay the chunk is cut into n = C / c sub-chunks: off-diagonal blocks factor through the G at the
    end of the previous query sub-chunk (both factors <= 1) and use matmuls; diagonal blocks are direct.
    """
    C = q.shape[-2]
    mask = _causal(C, strict, q.device)  # [C, C]
    if decay_axis is None:
        return (q @ k.transpose(-1, -2)).masked_fill(~mask, 0.0)
    if decay_axis == "scalar":
        decay = _masked_exp(gq.unsqueeze(-1) - g.unsqueeze(-2), mask)  # [B, H, N, C, C]
        return (q @ k.transpose(-1, -2)) * decay
    if decay_axis != "key":
        raise ValueError(f"_attn handles decay_axis None, 'scalar' or 'key', got {decay_axis!r}")
    lead, K, n = q.shape[:-2], q.shape[-1], C // c
    qs, ks = q.reshape(*lead, n, c, K), k.reshape(*lead, n, c, K)  # [B, H, N, n, c, K]
    gqs, gs = gq.reshape(*lead, n, c, K), g.reshape(*lead, n, c, K)
    gref = _sub_ref(gs)  # [B, H, N, n, K]
    # off-diagonal blocks (query sub-chunk i > key sub-chunk j)
    qr = qs * torch.exp(gqs - gref.unsqueeze(-2))  # [B, H, N, n, c, K]
    below = torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-1)  # [n, n]
    kdecay = _masked_exp(gref[..., :, None, None, :] - gs[..., None, :, :, :], below[:, :, None, None])
    kr = kdecay * ks.unsqueeze(-4)  # [B, H, N, n(i), n(j), c, K]
    a_off = torch.einsum("...ick,...ijdk->...icjd", qr, kr)  # [B, H, N, n, c, n, c]
    # diagonal blocks, masked within the sub-chunk
    sub_mask = _causal(c, strict, q.device)  # [c, c]
    e = _masked_exp(gqs.unsqueeze(-2) - gs.unsqueeze(-3), sub_mask.unsqueeze(-1))  # [B, H, N, n, c, c, K]
    a_diag = (qs.unsqueeze(-2) * e * ks.unsqueeze(-3)).sum(-1)  # [B, H, N, n, c, c]
    eye = torch.eye(n, dtype=q.dtype, device=q.device)  # [n, n]
    a = a_off + a_diag.unsqueeze(-2) * eye[:, None, :, None]  # [B, H, N, n, c, n, c]
    return a.reshape(*lead, C, C)


def _intra_value(q: Tensor, gq: Tensor, k: Tensor, g: Tensor, v: Tensor, strict: bool, c: int) -> Tensor:
    """Intra-chunk output for value decay: o_t[j] = sum_s (q_t . k_s) exp(gq_t[j] - g_s[j]) v_s[j], s <= t.

    q, k: [B, H, N, C, K]; gq, g, v: [B, H, N, C, V]. Returns [B, H, N, C, V]. Sub-chunks as in _attn.
    """
    lead, C, V = q.shape[:-2], q.shape[-2], v.shape[-1]
    n = C // c
    a = (q @ k.transpose(-1, -2)).reshape(*lead, n, c, n, c)  # [B, H, N, n, c, n, c]
    gqs, gs, vs = gq.reshape(*lead, n, c, V), g.reshape(*lead, n, c, V), v.reshape(*lead, n, c, V)
    gref = _sub_ref(gs)  # [B, H, N, n, V]
    # off-diagonal blocks (i > j)
    below = torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-1)  # [n, n]
    vdecay = _masked_exp(gref[..., :, None, None, :] - gs[..., None, :, :, :], below[:, :, None, None])
    vr = vdecay * vs.unsqueeze(-4)  # [B, H, N, n(i), n(j), c, V]
    o_off = torch.einsum("...icjd,...ijdv->...icv", a, vr) * torch.exp(gqs - gref.unsqueeze(-2))  # [.., n, c, V]
    # diagonal blocks
    a_diag = torch.diagonal(a, dim1=-4, dim2=-2).permute(*range(len(lead)), -1, -3, -2)  # [B, H, N, n, c, c]
    e = _masked_exp(gqs.unsqueeze(-2) - gs.unsqueeze(-3), _causal(c, strict, q.device).unsqueeze(-1))
    o_diag = (a_diag.unsqueeze(-1) * e * vs.unsqueeze(-3)).sum(-2)  # [B, H, N, n, c, V]
    return (o_off + o_diag).reshape(*lead, C, V)


def _inter(q: Tensor, gq: Tensor | None, starts: Tensor, decay_axis: str | None) -> Tensor:
    """Contribution of the chunk start state: q [B, H, N, C, K], starts [B, H, N, K, V] -> [B, H, N, C, V]."""
    if decay_axis is None:
        return q @ starts
    if decay_axis == "scalar":
        return (q @ starts) * torch.exp(gq).unsqueeze(-1)
    if decay_axis == "key":
        return (q * torch.exp(gq)) @ starts
    return (q @ starts) * torch.exp(gq)


def _chunk_decay(g: Tensor | None, decay_axis: str | None) -> tuple[Tensor | None, Tensor | None]:
    """(state decay over each chunk, broadcastable to [B, H, N, K, V]; exp(G_last - G_s) per step)."""
    if decay_axis is None:
        return None, None
    if decay_axis == "scalar":
        last = g[..., -1:]  # [B, H, N, 1]
        return torch.exp(last).unsqueeze(-1), torch.exp(last - g)  # [B, H, N, 1, 1], [B, H, N, C]
    last = g[..., -1:, :]  # [B, H, N, 1, D]
    whole = torch.exp(last).transpose(-1, -2) if decay_axis == "key" else torch.exp(last)  # [.., K, 1] / [.., 1, V]
    return whole, torch.exp(last - g)  # [B, H, N, C, D]


def _prepare(k, log_decay, decay_axis, initial_state, chunk_size, v_dim):
    """Common set-up: compute dtype, chunk sizes, chunked cumulative log decays, start state."""
    dt = _compute_dtype(k)
    B, T, H, K = k.shape
    C, c = _chunk_sizes(max(T, 1), chunk_size, decay_axis)
    g = None if log_decay is None else _chunk(log_decay.to(dt), C).cumsum(3)  # [B, H, N, C(, D)]
    if initial_state is None:
        s0 = k.new_zeros((B, H, K, v_dim), dtype=dt)
    else:
        s0 = initial_state.to(dt)  # [B, H, K, V]
    return dt, C, c, g, s0


def _outputs(queries, dt, C, c, g, kc, vc, starts, decay_axis, T):
    """Per query: inter-chunk (start state) plus intra-chunk (masked matmul) parts, back to [B, T, H, V]."""
    outs = []
    for q, exclusive in queries:
        qc = _chunk(q.to(dt), C)  # [B, H, N, C, K]
        gq = g if (g is None or not exclusive) else _shift(g)
        if decay_axis == "value":
            intra = _intra_value(qc, gq, kc, g, vc, exclusive, c)
        else:
            intra = _attn(qc, gq, kc, g, decay_axis, exclusive, c) @ vc
        outs.append(_unchunk(_inter(qc, gq, starts, decay_axis) + intra, T))  # [B, T, H, V]
    return outs


# ----------------------------------------------------------------------------------------------------------
# chunked forms
# ----------------------------------------------------------------------------------------------------------


def chunked_linear(queries, k, v, log_decay=None, decay_axis=None, initial_state=None, chunk_size=64,
                   output_final_state=False):
    """Chunked form of S_t = D_t S_{t-1} + k_t v_t^T.

    queries: list of (q [B, T, H, K], exclusive); k [B, T, H, K]; v [B, T, H, V]; log_decay per decay_axis;
    initial_state [B, H, K, V] or None. Returns (list of outputs [B, T, H, V], final state [B, H, K, V] or None).
    chunk_size >= T gives the parallel form (one chunk, no state materialised between chunks).
    """
    _check_decay(log_decay, decay_axis, k, v)
    B, T, H, K = k.shape
    V = v.shape[-1]
    dt, C, c, g, s0 = _prepare(k, log_decay, decay_axis, initial_state, chunk_size, V)
    if T == 0:
        return [k.new_zeros((B, 0, H, V), dtype=dt) for _ in queries], (s0 if output_final_state else None)
    kc, vc = _chunk(k.to(dt), C), _chunk(v.to(dt), C)  # [B, H, N, C, K], [B, H, N, C, V]
    whole, to_end = _chunk_decay(g, decay_axis)
    # state increment of each chunk: sum_s exp(G_last - G_s) k_s v_s^T
    if decay_axis is None:
        ds = kc.transpose(-1, -2) @ vc
    elif decay_axis == "scalar":
        ds = (kc * to_end.unsqueeze(-1)).transpose(-1, -2) @ vc
    elif decay_axis == "key":
        ds = (kc * to_end).transpose(-1, -2) @ vc
    else:
        ds = kc.transpose(-1, -2) @ (vc * to_end)  # [B, H, N, K, V]
    # pass the state once per chunk
    state, starts = s0, []
    for i in range(kc.shape[2]):
        starts.append(state)
        carried = state if whole is None else whole[:, :, i] * state
        state = carried + ds[:, :, i]
    starts = torch.stack(starts, dim=2)  # [B, H, N, K, V]
    outs = _outputs(queries, dt, C, c, g, kc, vc, starts, decay_axis, T)
    return outs, (state if output_final_state else None)


def chunked_delta(queries, k, y, beta, log_decay=None, decay_axis=None, initial_state=None, chunk_size=64,
                  output_final_state=False):
    """Chunked (WY/UT) form of S_t = (I - beta_t k_t k_t^T) D_t S_{t-1} + k_t y_t^T.

    k [B, T, H, K]; y [B, T, H, V]; beta [B, T, H]; decay_axis None, "scalar" or "key". Same queries and
    returns as chunked_linear. Derivation: with u_t = y_t - beta_t (D_t S_{t-1})^T k_t the step is
    S_t = D_t S_{t-1} + k_t u_t^T, a linear recurrence in the pseudo-values u. Inside a chunk with start
    state S0 and G the inclusive cumulative log decay,
        u_t + beta_t sum_{s<t} (sum_i k_t[i] k_s[i] exp(G_t[i] - G_s[i])) u_s = y_t - beta_t (k_t * exp(G_t))^T S0,
    i.e. (I + L) U = Y - W' S0 with L strictly lower triangular; one unitriangular solve gives
    U = Uy - W S0 (Uy = (I + L)^-1 Y, W = (I + L)^-1 diag(beta) (K * exp(G))), and then outputs and the
    next state are those of chunked_linear with v replaced by u.
    """
    if decay_axis == "value":
        raise NotImplementedError("chunked_delta supports decay_axis None, 'scalar' or 'key'; a value-axis decay "
                                  "does not commute with (I - beta k k^T) into one C x C solve: use recurrent_delta")
    _check_decay(log_decay, decay_axis, k, y)
    B, T, H, K = k.shape
    V = y.shape[-1]
    if tuple(beta.shape) != (B, T, H):
        raise ValueError(f"beta must have shape {[B, T, H]}, got {list(beta.shape)}")
    dt, C, c, g, s0 = _prepare(k, log_decay, decay_axis, initial_state, chunk_size, V)
    if T == 0:
        return [k.new_zeros((B, 0, H, V), dtype=dt) for _ in queries], (s0 if output_final_state else None)
    kc, yc, bc = _chunk(k.to(dt), C), _chunk(y.to(dt), C), _chunk(beta.to(dt), C)  # [B, H, N, C, (K|V)]
    whole, to_end = _chunk_decay(g, decay_axis)
    # L_ts = beta_t * decayed (k_t . k_s), s < t; the solve reads only the strict lower triangle
    lower = bc.unsqueeze(-1) * _attn(kc, g, kc, g, decay_axis, True, c)  # [B, H, N, C, C]
    if decay_axis is None:
        kb, kd = kc * bc.unsqueeze(-1), kc  # beta_t k_t, exp(G_last - G_t) k_t
    elif decay_axis == "scalar":
        kb, kd = kc * (bc * torch.exp(g)).unsqueeze(-1), kc * to_end.unsqueeze(-1)
    else:
        kb, kd = kc * torch.exp(g) * bc.unsqueeze(-1), kc * to_end
    rhs = torch.cat([yc, kb], dim=-1)  # [B, H, N, C, V + K]
    sol = torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True)
    uy, w = sol[..., :V], sol[..., V:]  # [B, H, N, C, V], [B, H, N, C, K]
    kd_t = kd.transpose(-1, -2)  # [B, H, N, K, C]
    # pass the state once per chunk, resolving the pseudo-values against it
    state, starts, us = s0, [], []
    for i in range(kc.shape[2]):
        u = uy[:, :, i] - w[:, :, i] @ state  # [B, H, C, V]
        starts.append(state)
        us.append(u)
        carried = state if whole is None else whole[:, :, i] * state
        state = carried + kd_t[:, :, i] @ u
    starts, uc = torch.stack(starts, dim=2), torch.stack(us, dim=2)  # [B, H, N, K, V], [B, H, N, C, V]
    outs = _outputs(queries, dt, C, c, g, kc, uc, starts, decay_axis, T)
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


def _step_decays(log_decay: Tensor | None, decay_axis: str | None, dt: torch.dtype) -> list | None:
    """exp(log_decay) once, per step, shaped to multiply a [B, H, K, V] state."""
    if decay_axis is None:
        return None
    a = torch.exp(log_decay.to(dt))
    a = {"scalar": a[..., None, None], "key": a.unsqueeze(-1), "value": a.unsqueeze(-2)}[decay_axis]
    return a.unbind(1)  # T x [B, H, K|1, V|1]


def _query_slots(queries, dt: torch.dtype) -> tuple[list, list, list]:
    """(per-query output lists, [(q steps, list)] read before the update, [(q steps, list)] read after)."""
    outs = [[] for _ in queries]
    before, after = [], []
    for (q, exclusive), out in zip(queries, outs, strict=True):
        (before if exclusive else after).append((q.to(dt).unsqueeze(-2).unbind(1), out))  # T x [B, H, 1, K]
    return outs, before, after


def _stack_outputs(outs: list, B: int, H: int, V: int, dt, device) -> list:
    """Per-query lists of T x [B, H, 1, V] -> [B, T, H, V]."""
    if not outs or not outs[0]:
        return [torch.zeros((B, 0, H, V), dtype=dt, device=device) for _ in outs]
    return [torch.stack(o, dim=1).squeeze(-2) for o in outs]


def recurrent_linear(queries, k, v, log_decay=None, decay_axis=None, initial_state=None, output_final_state=False):
    """Step-by-step S_t = D_t S_{t-1} + k_t v_t^T (any decay axis). Same arguments and returns as chunked_linear."""
    _check_decay(log_decay, decay_axis, k, v)
    dt = _compute_dtype(k)
    B, T, H, K = k.shape
    V = v.shape[-1]
    state = k.new_zeros((B, H, K, V), dtype=dt) if initial_state is None else initial_state.to(dt)
    decays = _step_decays(log_decay, decay_axis, dt)
    ks = k.to(dt).unsqueeze(-1).unbind(1)  # T x [B, H, K, 1]
    vs = v.to(dt).unsqueeze(-2).unbind(1)  # T x [B, H, 1, V]
    outs, before, after = _query_slots(queries, dt)
    for t in range(T):
        for q, out in before:
            out.append(q[t] @ state)  # [B, H, 1, V]
        carried = state if decays is None else state * decays[t]
        state = torch.addcmul(carried, ks[t], vs[t])
        for q, out in after:
            out.append(q[t] @ state)
    return _stack_outputs(outs, B, H, V, dt, k.device), (state if output_final_state else None)


def recurrent_delta(queries, k, y, beta, log_decay=None, decay_axis=None, initial_state=None,
                    output_final_state=False):
    """Step-by-step S_t = (I - beta_t k_t k_t^T) D_t S_{t-1} + k_t y_t^T (any decay axis).

    Same arguments and returns as chunked_delta.
    """
    _check_decay(log_decay, decay_axis, k, y)
    dt = _compute_dtype(k)
    B, T, H, K = k.shape
    V = y.shape[-1]
    state = k.new_zeros((B, H, K, V), dtype=dt) if initial_state is None else initial_state.to(dt)
    decays = _step_decays(log_decay, decay_axis, dt)
    kt = k.to(dt)
    kcols = kt.unsqueeze(-1).unbind(1)  # T x [B, H, K, 1]
    krows = kt.unsqueeze(-2).unbind(1)  # T x [B, H, 1, K]
    ys = y.to(dt).unsqueeze(-2).unbind(1)  # T x [B, H, 1, V]
    betas = beta.to(dt)[..., None, None].unbind(1)  # T x [B, H, 1, 1]
    outs, before, after = _query_slots(queries, dt)
    for t in range(T):
        for q, out in before:
            out.append(q[t] @ state)  # [B, H, 1, V]
        carried = state if decays is None else state * decays[t]
        u = ys[t] - betas[t] * (krows[t] @ carried)  # [B, H, 1, V]
        state = torch.addcmul(carried, kcols[t], u)
        for q, out in after:
            out.append(q[t] @ state)
    return _stack_outputs(outs, B, H, V, dt, k.device), (state if output_final_state else None)
