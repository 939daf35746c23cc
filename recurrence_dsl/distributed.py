"""Context parallelism across devices: the time axis split over the ranks of a `torch.distributed` group.

`context_parallel(layer, group=None)` wraps a compiled layer so that each rank of `group` passes its own
contiguous slice of the time axis (`[B, T_r, H, ...]`, slices in rank order, lengths may differ) and gets its
slice of the outputs back, with gradients that match the single-process layer. The algorithm is LASP-2
(Sun et al. 2025, "LASP-2: Rethinking Sequence Parallelism for Linear Attention and Its Hybrid"): a linear
recurrence `S_t = A_t S_{t-1} + B_t` carried over a slice is the affine map

    S_out = M S_in + f,      M = A_{T_r} ... A_1 (the slice's transition),  f = the slice's state from zero,

and these pairs compose associatively, so one `all_gather` of the pairs tells every rank the state entering
its slice. `M` has the size of the transition class: nothing for identity (linear attention), one number per
head for scalar decays (RetNet, Mamba-2), a vector for diagonal ones (GLA: the key axis), the state's shape
for elementwise ones (Mamba), a K x K matrix for the delta rule's `prod (I - beta k k^T) D`.

Forward, per rank (ranks whose slice starts the sequence skip the probe and pass 2):
  pass 1  the local layer from a zero state, batched with probe rows whose initial state is `c * E` (E all
          ones for diagonal classes, identity blocks for matrix ones): by linearity
          `M E = (F(c E) - F(0)) / c`, read off the probe rows' final states; `f = F(0)`.
  gather  one all_gather of (M, f) (`summary_bytes` per rank).
  combine every rank folds the gathered pairs in rank order: the state entering each slice and the final
          state of the whole sequence.
  pass 2  the local layer again, from the incoming state: the outputs.
So a rank runs about three local forwards (2 rows of pass 1 + pass 2; a delta-rule state with V < K
needs ceil(K / V) probe rows): a correction-only pass 2 per class would save one, and is not done here.

Backward, per rank: recompute pass 2 under autograd and take the gradient of the incoming state; one
all_gather of those gradients (and of the final state's); fold them back through the gathered transitions
(the adjoint chain `lambda_r = g_r + M_r^T lambda_{r+1}`, by autograd over the combine); recompute pass 1
and push the summaries' gradients through it. Params are replicated, so their per-rank gradients are
summed with one all_reduce (the usual data-parallel reduction, param-sized): every rank ends with the
single-process gradient of every param.

Classes with no associative summary (general, non-linear) relay the state from rank to rank with
send/recv instead, forward and backward: correct for every class, but the ranks run one after another
(the slower path). So does a recurrence with shift states (recurrence_dsl/shift.py): a shift state's value at a
rank boundary is its value after the previous rank's last step, that rank's final state, which the relay hands on
with the others (the all_gather path has no summary kind for them).

`cu_seqlens` (global offsets, B == 1, the same on every rank) packs sequences that may cross ranks. Then one
small all_gather of the slice lengths comes first, a given `initial_state` ([N, H, ...] on rank 0) is
broadcast, and with `output_final_state` one all_reduce assembles the N final states on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from codegen.load import analysis_of

from .analysis import Analysis, TransitionClass, analyse
from .calling import bind_call
from .errors import CallError

__all__ = ["ContextParallel", "context_parallel", "summary_elements"]

# The probe rows start from PROBE_SCALE * E: (F(cE) - F(0)) / c has rounding error eps * (|M| + |f| / c),
# so a large c keeps the slice's own state f out of the transition read from it.
PROBE_SCALE = 4096.0

# Diagonal classes: the state axes along which the slice's decay product varies (None: every axis).
_DIAGONAL_AXES = {
    TransitionClass.SCALAR: (),
    TransitionClass.DIAGONAL_ROW: (0,),
    TransitionClass.DIAGONAL_COL: (1,),
    TransitionClass.ELEMENTWISE: None,
}
# Matrix classes: the transition mixes one state axis, (I - beta k k^T) D or (D + b a^T).
_MATRIX = (TransitionClass.RANK_ONE_UPDATE, TransitionClass.RANK_R_UPDATE, TransitionClass.DIAGONAL_PLUS_RANK_ONE)


@dataclass(frozen=True)
class _Kind:
    """How one state's slice transition M is held: "identity" (none), "diagonal" (a decay product that varies
    along `axes`, broadcast over the rest), or "matrix" (D x D acting on state axis `axis`)."""

    kind: str
    axes: tuple[int, ...] = ()
    axis: int = 0


def _kinds(analysis: Analysis) -> dict[str, _Kind] | None:
    """Each state's summary kind, or None when some state has no associative summary (general, non-linear)."""
    kinds = {}
    for name, sa in analysis.states.items():
        if sa.cls is TransitionClass.IDENTITY:
            kinds[name] = _Kind("identity")
        elif sa.cls in _DIAGONAL_AXES:
            axes = _DIAGONAL_AXES[sa.cls]
            kinds[name] = _Kind("diagonal", tuple(range(len(sa.dims))) if axes is None else axes)
        elif sa.cls in _MATRIX and len(sa.dims) in (1, 2):
            # A state written in the papers' S[V, K] layout mixes its second axis (analysis.transposed).
            kinds[name] = _Kind("matrix", axis=1 if name in analysis.transposed else 0)
        else:
            return None
    return kinds


def summary_elements(kind: _Kind, dims: tuple[int, ...]) -> int:
    """Numbers of M per (row, head) for a state of shape `dims` (f adds prod(dims))."""
    if kind.kind == "identity":
        return 0
    if kind.kind == "diagonal":
        return math.prod(d for i, d in enumerate(dims) if i in kind.axes)
    return dims[kind.axis] ** 2


def _m_shape(kind: _Kind, rows: int, heads: int, dims: tuple[int, ...]) -> tuple[int, ...] | None:
    if kind.kind == "identity":
        return None
    if kind.kind == "diagonal":
        return (rows, heads) + tuple(d if i in kind.axes else 1 for i, d in enumerate(dims))
    return (rows, heads, dims[kind.axis], dims[kind.axis])


def _probe_count(kind: _Kind, dims: tuple[int, ...]) -> int:
    """Probe rows a state needs: one for a diagonal class; ceil(D / other) for a D x D matrix, whose identity
    probe is spread over the state's other axis (each of its columns evolves by the same D x D map)."""
    if kind.kind == "identity":
        return 0
    if kind.kind == "diagonal":
        return 1
    other = math.prod(d for i, d in enumerate(dims) if i != kind.axis)
    return math.ceil(dims[kind.axis] / max(other, 1))


def _axis_first(x: torch.Tensor, axis: int) -> torch.Tensor:
    """[R, H, *dims] -> [R, H, D, rest] with state axis `axis` first (D) and the others flattened (rest)."""
    x = x.movedim(2 + axis, 2)
    return x.reshape(x.shape[0], x.shape[1], x.shape[2], -1)


def _probe_state(kind: _Kind, j: int, rows: int, heads: int, dims, dtype, device) -> torch.Tensor:
    """Probe row block j's initial state [rows, H, *dims]."""
    if kind.kind == "identity" or j >= _probe_count(kind, dims):
        return torch.zeros((rows, heads) + dims, dtype=dtype, device=device)
    if kind.kind == "diagonal":
        return torch.full((rows, heads) + dims, PROBE_SCALE, dtype=dtype, device=device)
    d = dims[kind.axis]
    moved = (d,) + tuple(x for i, x in enumerate(dims) if i != kind.axis)
    other = math.prod(moved[1:])
    e = torch.zeros(d, other, dtype=dtype, device=device)
    cols = range(j * other, min(d, (j + 1) * other))
    e[list(cols), [c - j * other for c in cols]] = PROBE_SCALE
    return e.reshape(moved).movedim(0, kind.axis).expand((rows, heads) + dims).contiguous()


def _read_m(kind: _Kind, f: torch.Tensor, probed: list[torch.Tensor], dims) -> torch.Tensor | None:
    """M from the final states of the zero rows (`f`) and of each probe block (`probed`)."""
    if kind.kind == "identity":
        return None
    if kind.kind == "diagonal":
        full = (probed[0] - f) / PROBE_SCALE
        index = tuple(slice(None) if i in kind.axes else slice(0, 1) for i in range(len(dims)))
        return full[(slice(None), slice(None)) + index]
    d = dims[kind.axis]
    other = math.prod(x for i, x in enumerate(dims) if i != kind.axis)
    blocks = []
    for j in range(_probe_count(kind, dims)):
        width = min(d, (j + 1) * other) - j * other
        blocks.append(_axis_first((probed[j] - f) / PROBE_SCALE, kind.axis)[..., :width])
    return torch.cat(blocks, dim=-1)  # [R, H, D, D]: column c is M applied to unit vector c


def _apply(kind: _Kind, m: torch.Tensor | None, s: torch.Tensor) -> torch.Tensor:
    """M S for one state [R, H, *dims]."""
    if kind.kind == "identity":
        return s
    if kind.kind == "diagonal":
        return m * s
    moved = s.movedim(2 + kind.axis, 2)
    out = m @ moved.reshape(moved.shape[0], moved.shape[1], moved.shape[2], -1)
    return out.reshape(moved.shape).movedim(2, 2 + kind.axis)


@dataclass
class _Piece:
    """A run of the local layer: local time range [lo, hi), one sequence per row when `cu` is None, else the
    packed sequences `seqs` (global indices) with local offsets `cu`."""

    lo: int
    hi: int
    cu: list[int] | None = None
    seqs: tuple[int, ...] = ()


class _Plan:
    """Where one rank's slice sits: which part depends on the incoming state (`head`), which does not
    (`rest`), whether the slice's end state depends on it (`depends`, for every rank), who owns which final."""

    def __init__(self, rank: int, world: int, length: int, rows: int, lengths: list[int] | None,
                 cu: list[int] | None):
        self.rank, self.world, self.rows = rank, world, rows
        self.cu = cu
        self.head: _Piece | None = None
        self.rest: _Piece | None = None
        self.head_seq: int | None = None  # the sequence the head continues
        if cu is None:
            self.depends = [r > 0 for r in range(world)]
            if rank > 0:
                self.head = _Piece(0, length)
            else:
                self.rest = _Piece(0, length)
            return
        starts = [sum(lengths[:r]) for r in range(world)]
        self.lo, self.hi = starts[rank], starts[rank] + length
        self.depends = [self._continues(starts[r], starts[r] + lengths[r])[1] for r in range(world)]
        continuing, _ = self._continues(self.lo, self.hi)
        n = self._seq_at(self.lo)
        first_rest = n
        if continuing:
            self.head_seq = n
            self.head = _Piece(0, min(self.hi, cu[n + 1]) - self.lo)
            first_rest = n + 1
        seqs = tuple(m for m in range(first_rest, len(cu) - 1) if cu[m] < cu[m + 1] and cu[m] < self.hi)
        if seqs:
            start = cu[seqs[0]]
            bounds = [cu[m] - start for m in seqs] + [self.hi - start]
            self.rest = _Piece(start - self.lo, self.hi - self.lo, bounds, seqs)

    def _seq_at(self, t: int) -> int:
        """The (non-empty) sequence holding global step t."""
        cu = self.cu
        return next(m for m in range(len(cu) - 1) if cu[m] <= t < cu[m + 1])

    def _continues(self, lo: int, hi: int) -> tuple[bool, bool]:
        """(slice [lo, hi) continues a sequence begun on an earlier rank, its end state depends on that)."""
        if hi <= lo:
            raise CallError("every rank's slice must hold at least one step with cu_seqlens")
        n = self._seq_at(lo)
        continuing = self.cu[n] < lo
        return continuing, continuing and self.cu[n + 1] >= hi

    def owns(self, seq: int) -> bool:
        """Whether this rank assembles sequence `seq`'s final state (the rank holding its last step; rank 0 for
        empty sequences)."""
        lo, hi = self.cu[seq], self.cu[seq + 1]
        if lo == hi:
            return self.rank == 0
        return self.lo < hi <= self.hi


class ContextParallel:
    """A layer whose time axis is split over the ranks of a process group (see the module docs).

    Call it like the layer: `cp(*inputs, *params, initial_state=None, output_final_state=False,
    cu_seqlens=None, form=None, backend=None, chunk_size=None, config=None, check_steps=None)`, on every rank of
    the group, with that rank's slice `[B, T_r, H, ...]` of every input and the same params `[H, ...]`. Returns
    `(output, final_state)` as the layer does: this rank's slice of the outputs `[B, T_r, H, ...]`, and with
    `output_final_state` the final state of the whole sequence (`[B, H, ...]`, `[N, H, ...]` with
    cu_seqlens) on every rank. `initial_state` is given on rank 0 only. B, H and the sizes must agree on
    every rank, and every slice holds at least one step. Raises `CallError` for a bad call (a mismatched
    slice, an initial state off rank 0, cu_seqlens that do not cover the ranks' slices). A check that fails on
    one rank only raises there, before any collective, and leaves the other ranks waiting in their first
    collective until the process group's timeout, as any rank's failure in torch.distributed does.
    """

    def __init__(self, layer, group=None, analysis: Analysis | None = None, path: str | None = None):
        if path not in (None, "all_gather", "relay"):
            raise ValueError(f"path must be 'all_gather', 'relay' or None (the class decides), got {path!r}")
        if analysis is None:
            analysis = analysis_of(layer)
        if analysis is None:
            raise ValueError(f"context_parallel needs the analysis of {layer!r}: pass a layer made by "
                             "recurrence_dsl.compile() in this process, or analysis=analyse(rec.checked)")
        if not analysis.states:
            raise ValueError(f"{layer.name} has no state: its steps are independent, run it on each slice")
        self.layer, self.group, self.analysis = layer, group, analysis
        self.spec = layer.recurrence
        self.kinds = _kinds(analysis)
        if path == "all_gather" and self.kinds is None:
            if analysis.shift is not None:
                raise ValueError(
                    f"{layer.name} has shift states ({', '.join(analysis.shift.names)}), computed by shifting along "
                    "T, which the all_gather path does not summarise: each rank's shift needs the previous rank's "
                    "last values of them; use path='relay' (the default for it), which hands every state, the "
                    "shift states included, from rank to rank")
            raise ValueError(f"{layer.name} has a {analysis.cls.value} transition: no associative summary to "
                             "all_gather; use path='relay'")
        self.path = path or ("all_gather" if self.kinds is not None else "relay")
        # Bytes this object handed to collectives (sent by this rank) in its last call, forward and backward.
        self.sent_bytes = {"forward": 0, "backward": 0}

    def __repr__(self) -> str:
        return f"<context_parallel {self.layer.name}: {self.path} path>"

    def __call__(self, *args, initial_state=None, output_final_state: bool = False, cu_seqlens=None,
                 form: str | None = None, backend: str | None = None, chunk_size: int | None = None,
                 config: dict | None = None, check_steps: bool | None = None, **kwargs):
        if not dist.is_initialized():
            raise CallError("context_parallel needs torch.distributed initialised (dist.init_process_group)")
        group = self.group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if initial_state is not None and rank != 0:
            raise CallError(f"initial_state is given on rank 0 only (it applies to the start of the sequence); "
                            f"rank {rank} passed one")
        call = bind_call(self.spec, args, dict(kwargs, output_final_state=output_final_state))
        if call.reverse:
            # Each rank would run its slice backwards while the ranks stay chained in forward order.
            raise CallError(f"context_parallel runs forward recurrences only; {self.spec.name} runs in reverse "
                            "(a reverse recurrence or reverse=True): call the layer on one process, or flip the "
                            "time axis across ranks yourself")
        options = {k: v for k, v in (("form", form), ("backend", backend), ("chunk_size", chunk_size),
                                     ("config", config), ("check_steps", check_steps)) if v is not None}
        states = [s.name for s in self.spec.states]
        dtype = torch.float64 if call.dtype == torch.float64 else torch.float32
        dims = {s.name: call.dims(s) for s in self.spec.states}
        cu = lengths = None
        has_initial = initial_state is not None
        if cu_seqlens is not None:
            if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
                raise CallError("cu_seqlens must be a 1-D integer tensor [N + 1] of global sequence boundaries")
            if call.batch != 1:
                raise CallError(f"cu_seqlens packs sequences along T and needs B == 1, got B={call.batch}")
            meta = torch.tensor([call.length, int(has_initial)], dtype=torch.int64, device=call.device)
            gathered = [torch.empty_like(meta) for _ in range(world)]
            dist.all_gather(gathered, meta, group=group)
            lengths = [int(g[0]) for g in gathered]
            has_initial = bool(gathered[0][1])
            cu = cu_seqlens.detach().to("cpu", torch.int64).tolist()
            total = sum(lengths)
            if len(cu) < 2 or cu[0] != 0 or cu[-1] != total or any(b < a for a, b in zip(cu, cu[1:])):
                raise CallError(f"cu_seqlens must be non-decreasing global offsets from 0 to the total length "
                                f"{total} (slices {lengths}), got {cu}")
        rows = call.batch if cu is None else len(cu) - 1
        s0 = None
        if initial_state is not None:
            s0 = initial_state if isinstance(initial_state, dict) else (
                {states[0]: initial_state} if len(states) == 1 else None)
            if s0 is None or set(s0) != set(states):
                raise CallError(f"initial_state must be a dict keyed by {states}" if len(states) > 1 else
                                "initial_state must be a tensor")
            for name in states:
                want = (rows, call.heads) + dims[name]
                if not isinstance(s0[name], torch.Tensor) or tuple(s0[name].shape) != want:
                    got = tuple(s0[name].shape) if isinstance(s0[name], torch.Tensor) else type(s0[name]).__name__
                    raise CallError(f"initial_state['{name}'] must have shape {list(want)}, got {got}")
        plan = _Plan(rank, world, call.length, call.batch if cu is None else 1, lengths, cu)
        run = _Run(self, plan, call, options, dims, dtype, has_initial, output_final_state)
        inputs = [call.inputs[s.name] for s in self.spec.inputs]
        params = [call.params[s.name] for s in self.spec.params]
        initial = [s0[n] for n in states] if s0 is not None else []
        self.sent_bytes = run.sent
        flat = _ContextParallelFn.apply(run, *inputs, *params, *initial)
        outs = list(flat[: len(self.spec.outputs)])
        output = outs[0] if len(outs) == 1 else tuple(outs)
        if not output_final_state:
            return output, None
        finals = dict(zip(states, flat[len(self.spec.outputs):]))
        return output, finals[states[0]] if len(states) == 1 else finals


def context_parallel(layer, group=None, analysis: Analysis | None = None, path: str | None = None) -> ContextParallel:
    """`layer` with its time axis split over the ranks of `group` (default: the world); see `ContextParallel`.

    layer: a layer from `recurrence_dsl.compile` (or a `Recurrence`, compiled here). analysis: only for a
    layer imported from a module file, `analyse(rec.checked)`. path: None (all_gather where every state has
    an associative summary, relay otherwise), or "relay" to hand the state rank to rank for any class (to
    compare against). Raises ValueError for a layer with no state, whose analysis cannot be found, or
    path="all_gather" for a class without a summary.
    """
    if hasattr(layer, "checked"):  # a Recurrence
        from codegen.load import load_layer

        analysis = analysis or analyse(layer.checked)
        layer = load_layer(analysis)
    return ContextParallel(layer, group, analysis, path)


class _Run:
    """One call's state: the plan, the layer calls of each pass, the collectives (counted in `sent`)."""

    def __init__(self, cp: ContextParallel, plan: _Plan, call, options: dict, dims: dict, dtype, has_initial: bool,
                 output_final_state: bool):
        self.cp, self.plan, self.call, self.options, self.dims, self.dtype = cp, plan, call, options, dims, dtype
        self.spec, self.group = cp.spec, cp.group
        self.states = [s.name for s in cp.spec.states]
        self.outputs = [s.name for s in cp.spec.outputs]
        self.n_in, self.n_par = len(cp.spec.inputs), len(cp.spec.params)
        self.has_initial = has_initial
        self.output_final_state = output_final_state
        self.sent = {"forward": 0, "backward": 0}
        self.heads = call.heads
        self.device = call.device

    # ---------------------------------------------------------------------------------------------- layer calls

    def _layer(self, inputs: list, params: list, init: dict | None, cu: list[int] | None):
        """(outputs dict, final states dict) of the local layer."""
        states = self.states
        arg = None if init is None else (init[states[0]] if len(states) == 1 else init)
        out, fin = self.cp.layer(*inputs, *params, initial_state=arg, output_final_state=True,
                                 cu_seqlens=None if cu is None else torch.tensor(cu, dtype=torch.int64),
                                 **self.options)
        out = out if isinstance(out, tuple) else (out,)
        return dict(zip(self.outputs, out)), (fin if isinstance(fin, dict) else {states[0]: fin})

    def _zeros(self, rows: int) -> dict:
        return {n: torch.zeros((rows, self.heads) + self.dims[n], dtype=self.dtype, device=self.device)
                for n in self.states}

    def _rest_init(self, s0: dict | None) -> dict:
        plan = self.plan
        if plan.cu is None:
            return s0 if s0 is not None else self._zeros(plan.rows)
        seqs = list(plan.rest.seqs)
        if s0 is None:
            return self._zeros(len(seqs))
        return {n: s0[n][seqs].to(self.dtype) for n in self.states}

    def run_rest(self, inputs, params, s0):
        piece = self.plan.rest
        local = [x[:, piece.lo:piece.hi] for x in inputs]
        return self._layer(local, params, self._rest_init(s0), piece.cu)

    def run_head(self, inputs, params, s_in: dict):
        piece = self.plan.head
        return self._layer([x[:, piece.lo:piece.hi] for x in inputs], params, s_in, None)

    def probe_count(self) -> int:
        return max(_probe_count(self.cp.kinds[n], self.dims[n]) for n in self.states)

    def run_probe(self, inputs, params):
        """Pass 1 of a rank whose end state depends on the incoming one: (M, f) per state, from one batched run of
        zero rows and probe rows."""
        rows, p = self.plan.rows, self.probe_count()
        piece = self.plan.head
        local = [x[:, piece.lo:piece.hi] for x in inputs]
        if p == 0:  # identity transitions everywhere: M = I, only f
            _, fin = self._layer(local, params, self._zeros(rows), None)
            return {n: None for n in self.states}, fin
        kinds = self.cp.kinds
        init = {n: torch.cat([torch.zeros((rows, self.heads) + self.dims[n], dtype=self.dtype, device=self.device)]
                             + [_probe_state(kinds[n], j, rows, self.heads, self.dims[n], self.dtype, self.device)
                                for j in range(p)]) for n in self.states}
        _, fin = self._layer([x.repeat((p + 1,) + (1,) * (x.dim() - 1)) for x in local], params, init, None)
        f = {n: fin[n][:rows] for n in self.states}
        m = {n: _read_m(kinds[n], f[n], [fin[n][(j + 1) * rows:(j + 2) * rows] for j in range(p)], self.dims[n])
             for n in self.states}
        return m, f

    # ---------------------------------------------------------------------------------------------- summaries

    def m_shapes(self) -> dict:
        return {n: _m_shape(self.cp.kinds[n], self.plan.rows, self.heads, self.dims[n]) for n in self.states}

    def pack(self, m: dict, f: dict) -> torch.Tensor:
        parts = []
        for n, shape in self.m_shapes().items():
            if shape is not None:
                mn = m.get(n)
                parts.append((mn if mn is not None else torch.zeros(shape, dtype=self.dtype, device=self.device))
                             .reshape(-1))
            parts.append(f[n].to(self.dtype).reshape(-1))
        return torch.cat(parts)

    def unpack(self, flat: torch.Tensor) -> tuple[dict, dict]:
        m, f, at = {}, {}, 0
        for n, shape in self.m_shapes().items():
            if shape is not None:
                size = math.prod(shape)
                m[n] = flat[at:at + size].reshape(shape)
                at += size
            else:
                m[n] = None
            shape_f = (self.plan.rows, self.heads) + self.dims[n]
            f[n] = flat[at:at + math.prod(shape_f)].reshape(shape_f)
            at += math.prod(shape_f)
        return m, f

    def chain(self, pairs: list[tuple[dict, dict]]) -> list[dict]:
        """S_out of every rank, folding the gathered (M, f) in rank order."""
        outs, prev = [], None
        for r, (m, f) in enumerate(pairs):
            if self.plan.depends[r]:
                prev = {n: _apply(self.cp.kinds[n], m[n], prev[n]) + f[n] for n in self.states}
            else:
                prev = dict(f)
            outs.append(prev)
        return outs

    # ---------------------------------------------------------------------------------------------- collectives

    def all_gather(self, x: torch.Tensor, phase: str) -> list[torch.Tensor]:
        world = self.plan.world
        got = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(got, x.contiguous(), group=self.group)
        self.sent[phase] += x.numel() * x.element_size() * (world - 1)
        return got

    def all_reduce(self, x: torch.Tensor, phase: str) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=self.group)
        self.sent[phase] += 2 * x.numel() * x.element_size() * (self.plan.world - 1) // self.plan.world
        return x

    def broadcast(self, x: torch.Tensor, src: int, phase: str) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.broadcast(x, self._global(src), group=self.group)
        if self.plan.rank == src:
            self.sent[phase] += x.numel() * x.element_size()
        return x

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def send(self, x: torch.Tensor, to: int, phase: str):
        self.sent[phase] += x.numel() * x.element_size()
        return dist.isend(x.contiguous(), self._global(to), group=self.group)

    def recv(self, like: torch.Tensor, src: int) -> torch.Tensor:
        x = torch.empty_like(like)
        dist.recv(x, self._global(src), group=self.group)
        return x

    def flat_states(self, s: dict) -> torch.Tensor:
        return torch.cat([s[n].to(self.dtype).reshape(-1) for n in self.states])

    def unflat_states(self, flat: torch.Tensor, rows: int) -> dict:
        out, at = {}, 0
        for n in self.states:
            shape = (rows, self.heads) + self.dims[n]
            out[n] = flat[at:at + math.prod(shape)].reshape(shape)
            at += math.prod(shape)
        return out


def _grad(outputs: list, inputs: list, grads: list) -> list:
    """d(sum <output, grad>)/d(input) for every input (zeros where unused), skipping outputs with no gradient."""
    pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o is not None and o.requires_grad]
    if not pairs:
        return [torch.zeros_like(x) for x in inputs]
    got = torch.autograd.grad([o for o, _ in pairs], inputs, [g.to(o.dtype) for o, g in pairs], allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(got, inputs)]


def _leaves(tensors):
    return [t.detach().requires_grad_(True) for t in tensors]


class _ContextParallelFn(torch.autograd.Function):
    """The whole distributed call as one autograd node, so each rank's backward runs its collectives exactly
    once and in the same order as every other rank's (a composition of differentiable collectives would skip
    those a rank's own loss does not reach, and hang the others)."""

    @staticmethod
    def forward(ctx, run: _Run, *tensors):
        inputs = list(tensors[: run.n_in])
        params = list(tensors[run.n_in: run.n_in + run.n_par])
        given = tensors[run.n_in + run.n_par:]
        s0 = dict(zip(run.states, given)) if given else None
        plan = run.plan
        if plan.cu is not None and run.has_initial:
            # Sequences start on every rank: each needs its own rows of rank 0's initial states.
            like = torch.zeros(sum(math.prod((len(plan.cu) - 1, run.heads) + run.dims[n]) for n in run.states),
                               dtype=run.dtype, device=run.device)
            flat = run.flat_states(s0) if s0 is not None else like
            s0 = run.unflat_states(run.broadcast(flat, 0, "forward"), len(plan.cu) - 1)
        with torch.no_grad():
            if run.cp.path == "all_gather":
                outputs, finals, saved = _forward_gather(run, inputs, params, s0)
            else:
                outputs, finals, saved = _forward_relay(run, inputs, params, s0)
        ctx.run, ctx.saved = run, saved
        ctx.s0 = s0
        ctx.save_for_backward(*tensors)
        result = [outputs[n] for n in run.outputs]
        if run.output_final_state:
            result += [finals[n] for n in run.states]
        return tuple(result)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        run = ctx.run
        tensors = ctx.saved_tensors
        inputs = _leaves(tensors[: run.n_in])
        params = _leaves(tensors[run.n_in: run.n_in + run.n_par])
        s0 = {n: t.detach().requires_grad_(True) for n, t in ctx.s0.items()} if ctx.s0 is not None else None
        d_out = {n: g for n, g in zip(run.outputs, grads)}
        d_fin = dict(zip(run.states, grads[len(run.outputs):])) if run.output_final_state else {}
        d_fin = {n: d_fin.get(n) if d_fin.get(n) is not None else
                 torch.zeros(((len(run.plan.cu) - 1) if run.plan.cu is not None else run.plan.rows, run.heads)
                             + run.dims[n], dtype=run.dtype, device=run.device) for n in run.states}
        if run.cp.path == "all_gather":
            g_in, g_par, g_s0 = _backward_gather(run, ctx.saved, inputs, params, s0, d_out, d_fin)
        else:
            g_in, g_par, g_s0 = _backward_relay(run, ctx.saved, inputs, params, s0, d_out, d_fin)
        # Params (and with cu_seqlens the broadcast initial states) are replicated: sum their gradients.
        replicated = [g.reshape(-1) for g in g_par]
        broadcast_s0 = run.plan.cu is not None and run.has_initial
        if broadcast_s0:
            replicated += [g_s0[n].reshape(-1).to(g_par[0].dtype if g_par else run.dtype) for n in run.states]
        if replicated:
            summed = run.all_reduce(torch.cat([r.to(run.dtype) for r in replicated]), "backward")
            at, out = 0, []
            for g in g_par:
                out.append(summed[at:at + g.numel()].reshape(g.shape).to(g.dtype))
                at += g.numel()
            g_par = out
            if broadcast_s0:
                g_s0 = {}
                for n in run.states:
                    shape = (len(run.plan.cu) - 1, run.heads) + run.dims[n]
                    g_s0[n] = summed[at:at + math.prod(shape)].reshape(shape)
                    at += math.prod(shape)
        given = len(tensors) - run.n_in - run.n_par
        g_init = [g_s0[n].to(tensors[run.n_in + run.n_par + i].dtype) if g_s0 is not None else None
                  for i, n in enumerate(run.states[:given])]
        return (None, *g_in, *g_par, *g_init)


# ------------------------------------------------------------------------------------------ the all_gather path


def _forward_gather(run: _Run, inputs, params, s0):
    plan = run.plan
    rest = head = None
    if plan.rest is not None:
        rest = run.run_rest(inputs, params, s0)
    if plan.depends[plan.rank]:
        m, f = run.run_probe(inputs, params)
    else:
        m = {n: None for n in run.states}
        f = {n: rest[1][n][-plan.rows:] for n in run.states}  # the slice's last sequence (or every row)
    pairs = [run.unpack(x) for x in run.all_gather(run.pack(m, f), "forward")]
    chain = run.chain(pairs)
    s_in = chain[plan.rank - 1] if plan.rank > 0 else None
    if plan.head is not None:
        head = run.run_head(inputs, params, s_in)
    pieces = [p for p in (head, rest) if p is not None]
    outputs = {n: torch.cat([p[0][n] for p in pieces], dim=1) for n in run.outputs}
    finals = None
    if run.output_final_state:
        finals = chain[-1] if plan.cu is None else _assemble_finals(run, head, rest, s0)
    return outputs, finals, {"pairs": pairs, "s_in": s_in}


def _assemble_finals(run: _Run, head, rest, s0) -> dict:
    """The N final states of packed sequences on every rank: each rank fills the rows it owns; one all_reduce."""
    plan = run.plan
    n_seq = len(plan.cu) - 1
    fin = run._zeros(n_seq)
    for n in run.states:
        rows = []
        for seq in range(n_seq):
            if not plan.owns(seq):
                continue
            if plan.cu[seq] == plan.cu[seq + 1]:
                value = s0[n][seq].to(run.dtype) if s0 is not None else None
            elif head is not None and seq == plan.head_seq:
                value = head[1][n][0]
            else:
                value = rest[1][n][plan.rest.seqs.index(seq)]
            if value is not None:
                rows.append((seq, value))
        if rows:
            index = torch.tensor([s for s, _ in rows], device=run.device)
            fin[n] = fin[n].index_copy(0, index, torch.stack([v for _, v in rows]).to(run.dtype))
    flat = run.all_reduce(run.flat_states(fin), "forward")
    return run.unflat_states(flat, n_seq)


def _owned_rows(run: _Run, d_fin: dict, seqs) -> dict:
    """The final-state gradient rows of `seqs` this rank owns (zero for the others)."""
    plan = run.plan
    out = {}
    for n in run.states:
        rows = [d_fin[n][s] if plan.owns(s) else torch.zeros_like(d_fin[n][s]) for s in seqs]
        out[n] = torch.stack(rows) if rows else None
    return out


def _backward_gather(run: _Run, saved, inputs, params, s0, d_out, d_fin):
    plan = run.plan
    g_inputs = [torch.zeros_like(x) for x in inputs]
    g_params = [torch.zeros_like(p) for p in params]
    g_s0 = {n: torch.zeros_like(t) for n, t in s0.items()} if s0 is not None else None
    cu = plan.cu
    if cu is not None and run.output_final_state:
        # The mirror of the forward all_reduce: every rank's loss reaches every final state.
        d_fin = run.unflat_states(run.all_reduce(run.flat_states(d_fin), "backward"), len(cu) - 1)

    def add(grads):  # gradients with respect to the whole local inputs (each run slices its piece itself)
        for i in range(run.n_in):
            g_inputs[i] += grads[i]
        for i in range(run.n_par):
            g_params[i] += grads[run.n_in + i]

    # Pass 2's gradient: the head's outputs (and its sequence's final state when this rank owns it).
    g_state_in = {n: torch.zeros((plan.rows, run.heads) + run.dims[n], dtype=run.dtype, device=run.device)
                  for n in run.states}
    if plan.head is not None:
        s_in = {n: t.detach().requires_grad_(True) for n, t in saved["s_in"].items()}
        with torch.enable_grad():
            out, fin = run.run_head(inputs, params, s_in)
        piece = plan.head
        targets = [out[n] for n in run.outputs]
        grads = [d_out[n][:, piece.lo:piece.hi] if d_out[n] is not None else None for n in run.outputs]
        if cu is not None and run.output_final_state and plan.owns(plan.head_seq):
            targets += [fin[n] for n in run.states]
            grads += [d_fin[n][plan.head_seq:plan.head_seq + 1] for n in run.states]
        leaves = inputs + params + [s_in[n] for n in run.states]
        got = _grad(targets, leaves, grads)
        add(got)
        g_state_in = dict(zip(run.states, got[run.n_in + run.n_par:]))
    # One all_gather: each rank's incoming-state gradient (and, without cu_seqlens, its final-state gradient: every
    # rank holds the final state, which the chain computed from every rank's summary).
    payload = run.flat_states(g_state_in)
    size = payload.numel()
    with_final = cu is None and run.output_final_state
    if with_final:
        payload = torch.cat([payload, run.flat_states(d_fin)])
    got = run.all_gather(payload, "backward")
    g_in_all = [run.unflat_states(x[:size], plan.rows) for x in got]
    # The adjoint chain by autograd over the combine, with this rank's (M, f) as leaves.
    pairs = [(dict(m), dict(f)) for m, f in saved["pairs"]]
    mine_m = {n: (v.detach().requires_grad_(True) if v is not None else None) for n, v in pairs[plan.rank][0].items()}
    mine_f = {n: v.detach().requires_grad_(True) for n, v in pairs[plan.rank][1].items()}
    pairs[plan.rank] = (mine_m, mine_f)
    with torch.enable_grad():
        chain = run.chain(pairs)
        terms = []
        for r in range(1, plan.world):
            terms += [(chain[r - 1][n] * g_in_all[r][n]).sum() for n in run.states]
        if with_final:
            total = [sum(run.unflat_states(x[size:], plan.rows)[n] for x in got) for n in run.states]
            terms += [(chain[-1][n] * t).sum() for n, t in zip(run.states, total)]
        leaves = [v for v in mine_m.values() if v is not None] + list(mine_f.values())
        objective = sum(terms) if terms else None
        if objective is not None and objective.requires_grad:
            d_pair = torch.autograd.grad(objective, leaves, allow_unused=True)
        else:
            d_pair = [None] * len(leaves)
    d_pair = [torch.zeros_like(v) if g is None else g for g, v in zip(d_pair, leaves)]
    at = sum(1 for v in mine_m.values() if v is not None)
    d_m = dict(zip([n for n, v in mine_m.items() if v is not None], d_pair[:at]))
    d_f = dict(zip(run.states, d_pair[at:]))
    # Pass 1's gradient.
    if plan.depends[plan.rank]:
        with torch.enable_grad():
            m, f = run.run_probe(inputs, params)
        targets = [m[n] for n in d_m] + [f[n] for n in run.states]
        grads = [d_m[n] for n in d_m] + [d_f[n] for n in run.states]
        add(_grad(targets, inputs + params, grads))
    if plan.rest is not None:
        s0_leaf = s0
        with torch.enable_grad():
            out, fin = run.run_rest(inputs, params, s0_leaf)
        piece = plan.rest
        targets = [out[n] for n in run.outputs] + [fin[n] for n in run.states]
        grads = [d_out[n][:, piece.lo:piece.hi] if d_out[n] is not None else None for n in run.outputs]
        if cu is None:
            d_tail = d_f
            grads += [d_tail[n] for n in run.states]
        else:
            owned = _owned_rows(run, d_fin, piece.seqs) if run.output_final_state else {
                n: torch.zeros_like(fin[n]) for n in run.states}
            for n in run.states:
                g = owned[n].clone()
                if not plan.depends[plan.rank]:
                    g[-1] += d_f[n][0]  # the slice's end state, which later ranks read
                grads.append(g)
        leaves = inputs + params + ([s0_leaf[n] for n in run.states] if s0_leaf is not None else [])
        got = _grad(targets, leaves, grads)
        add(got)
        if s0_leaf is not None:
            for n, g in zip(run.states, got[run.n_in + run.n_par:]):
                g_s0[n] = g_s0[n] + g
    if cu is not None and run.output_final_state and s0 is not None and plan.rank == 0:
        for n in run.states:
            for seq in range(len(cu) - 1):
                if cu[seq] == cu[seq + 1]:  # an empty sequence's final state is its initial state
                    g_s0[n][seq] += d_fin[n][seq].to(g_s0[n].dtype)
    return g_inputs, g_params, g_s0


# ------------------------------------------------------------------------------------------ the relay path


def _forward_relay(run: _Run, inputs, params, s0):
    """Classes with no associative summary: the state handed from rank to rank (send/recv), in rank order."""
    plan = run.plan
    rest = head = None
    pending = []
    if plan.rest is not None:
        rest = run.run_rest(inputs, params, s0)
    like = run.flat_states(run._zeros(plan.rows))
    if not plan.depends[plan.rank] and plan.rank + 1 < plan.world:
        # This slice's end state does not wait for the incoming one: hand it on at once.
        pending.append(run.send(run.flat_states({n: rest[1][n][-plan.rows:] for n in run.states}),
                                plan.rank + 1, "forward"))
    s_in = None
    if plan.rank > 0:
        s_in = run.unflat_states(run.recv(like, plan.rank - 1), plan.rows)
    if plan.head is not None:
        head = run.run_head(inputs, params, s_in)
    end = {n: (head[1][n] if plan.depends[plan.rank] else rest[1][n][-plan.rows:]) for n in run.states}
    if plan.depends[plan.rank] and plan.rank + 1 < plan.world:
        pending.append(run.send(run.flat_states(end), plan.rank + 1, "forward"))
    for work in pending:
        work.wait()
    pieces = [p for p in (head, rest) if p is not None]
    outputs = {n: torch.cat([p[0][n] for p in pieces], dim=1) for n in run.outputs}
    finals = None
    if run.output_final_state:
        if plan.cu is None:
            flat = run.broadcast(run.flat_states(end), plan.world - 1, "forward")
            finals = run.unflat_states(flat, plan.rows)
        else:
            finals = _assemble_finals(run, head, rest, s0)
    return outputs, finals, {"s_in": s_in}


def _backward_relay(run: _Run, saved, inputs, params, s0, d_out, d_fin):
    plan = run.plan
    cu = plan.cu
    g_inputs = [torch.zeros_like(x) for x in inputs]
    g_params = [torch.zeros_like(p) for p in params]
    g_s0 = {n: torch.zeros_like(t) for n, t in s0.items()} if s0 is not None else None
    if run.output_final_state:
        d_fin = run.unflat_states(run.all_reduce(run.flat_states(d_fin), "backward"),
                                  plan.rows if cu is None else len(cu) - 1)
    like = run.flat_states(run._zeros(plan.rows))
    pending = []

    def add(grads):  # gradients with respect to the whole local inputs (each run slices its piece itself)
        for i in range(run.n_in):
            g_inputs[i] += grads[i]
        for i in range(run.n_par):
            g_params[i] += grads[run.n_in + i]

    def head_grad(d_end: dict | None):
        s_in = {n: t.detach().requires_grad_(True) for n, t in saved["s_in"].items()}
        with torch.enable_grad():
            out, fin = run.run_head(inputs, params, s_in)
        piece = plan.head
        targets = [out[n] for n in run.outputs] + [fin[n] for n in run.states]
        grads = [d_out[n][:, piece.lo:piece.hi] if d_out[n] is not None else None for n in run.outputs]
        for n in run.states:
            g = torch.zeros_like(fin[n])
            if cu is not None and run.output_final_state and plan.owns(plan.head_seq):
                g = g + d_fin[n][plan.head_seq:plan.head_seq + 1]
            if d_end is not None:
                g = g + d_end[n]
            grads.append(g)
        got = _grad(targets, inputs + params + [s_in[n] for n in run.states], grads)
        add(got)
        return dict(zip(run.states, got[run.n_in + run.n_par:]))

    # d loss / d (this slice's end state): from the next rank, plus the final state's on the last rank.
    last_end = d_fin if (cu is None and run.output_final_state) else None
    d_end = None
    if plan.head is not None and not plan.depends[plan.rank]:
        pending.append(run.send(run.flat_states(head_grad(None)), plan.rank - 1, "backward"))
    if plan.rank + 1 < plan.world:
        d_end = run.unflat_states(run.recv(like, plan.rank + 1), plan.rows)
    elif last_end is not None:
        d_end = last_end
    if plan.head is not None and plan.depends[plan.rank]:
        pending.append(run.send(run.flat_states(head_grad(d_end)), plan.rank - 1, "backward"))
    elif plan.head is None and plan.rank > 0:
        pending.append(run.send(like.clone(), plan.rank - 1, "backward"))  # nothing here reads the incoming state
    if plan.rest is not None:
        with torch.enable_grad():
            out, fin = run.run_rest(inputs, params, s0)
        piece = plan.rest
        targets = [out[n] for n in run.outputs] + [fin[n] for n in run.states]
        grads = [d_out[n][:, piece.lo:piece.hi] if d_out[n] is not None else None for n in run.outputs]
        owned = _owned_rows(run, d_fin, piece.seqs) if cu is not None and run.output_final_state else None
        for n in run.states:
            g = torch.zeros_like(fin[n])
            if owned is not None:
                g = g + owned[n]
            if not plan.depends[plan.rank] and d_end is not None:
                g[-plan.rows:] += d_end[n]
            grads.append(g)
        leaves = inputs + params + ([s0[n] for n in run.states] if s0 is not None else [])
        got = _grad(targets, leaves, grads)
        add(got)
        if s0 is not None:
            for n, g in zip(run.states, got[run.n_in + run.n_par:]):
                g_s0[n] = g_s0[n] + g
    if cu is not None and run.output_final_state and s0 is not None and plan.rank == 0:
        for n in run.states:
            for seq in range(len(cu) - 1):
                if cu[seq] == cu[seq + 1]:
                    g_s0[n][seq] += d_fin[n][seq].to(g_s0[n].dtype)
    for work in pending:
        work.wait()
    return g_inputs, g_params, g_s0
