"""`recdsl check --prove`: show with sympy that each derived form equals the recurrence.

A small instance (T = 4 steps, every size 2, one batch row and head) is
unrolled symbolically: inputs, params and the initial state are symbols. The
recurrence is stepped as written; each form is then evaluated by its own
closed formula, from the same chunk plans the generated code runs (scan:
products of decays; chunked with chunks of 2 steps: cumulative log decays on
the plan's decay axis, masked sums and the state passed between chunks, the
UT transform for rank-one updates, over the r updates of each step as sub-steps for a rank-r update;
parallel: one chunk of 4).

Each output and final state element is compared in two exact steps: at a few
random rational points (exact arithmetic, so any nonzero value is a real
difference, found fast), then symbolically by expansion: first with each sum
under a root or a denominator (an L2 norm's k.k + 1e-6) as an opaque symbol,
then, where that does not settle it, with the sums written out, over one
denominator where symbols appear in one. An element the expansion does not settle is
reported as equal at those points only, never as proved. Float constants of a
spec are read as nearby rationals, alike on both sides.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import sympy

from .analysis import Analysis, TransitionClass
from .step_ir import NEW_SUFFIX, logsigmoid, sigmoid


@dataclass
class ProofResult:
    """One output or final state of one form against the recurrence. `proved`: no difference; of its
    elements, `symbolic` are equal as expressions and the rest at `points` random rational points."""

    form: str
    value: str  # an output or "final S"
    elements: int
    proved: bool
    detail: str = ""
    symbolic: int = 0
    points: int = 0

    @property
    def verdict(self) -> str:
        if not self.proved:
            return self.detail if self.detail.startswith("undecided") else f"DIFFERENT: {self.detail}"
        if self.symbolic == self.elements:
            return "equal (exact)"
        return (f"equal: {self.symbolic} symbolically, {self.elements - self.symbolic} at {self.points} random "
                "rational points (exact arithmetic)")


class _Instance:
    def __init__(self, analysis: Analysis, steps: int, size: int):
        self.a = analysis
        self.rec = analysis.recurrence
        self.steps = steps
        self.sizes = {s: size for s in self.rec.sizes}
        self.size_subs = {sym: size for sym in analysis.ir.sizes}
        self.inputs = {s.name: s for s in self.rec.inputs}
        self.params = {s.name: s for s in self.rec.params}

    def dims(self, dims) -> tuple[int, ...]:
        return tuple(self.sizes[d] if isinstance(d, str) else d for d in dims)

    def cells(self, dims):
        return list(itertools.product(*[range(n) for n in self.dims(dims)]))

    def leaf(self, name: str, idx: tuple[int, ...], t: int, env: dict) -> sympy.Expr:
        suffix = "".join(f"_{i}" for i in idx)
        if name in self.inputs:
            return sympy.Symbol(f"{name}{t}{suffix}", real=True)
        if name in self.params:
            return sympy.Symbol(f"{name}{suffix}", positive=True)
        return env[name][idx]

    def evaluate(self, expr: sympy.Expr, binding: dict, t: int, env: dict) -> sympy.Expr:
        """The value of an IR expression at step t with indices bound to integers."""
        e = expr.xreplace(self.size_subs).xreplace({k: sympy.Integer(v) for k, v in binding.items()})
        e = e.doit()
        repl = {}
        for node in e.atoms(sympy.Indexed):
            repl[node] = self.leaf(str(node.base), tuple(int(i) for i in node.indices), t, env)
        labels = {node.base.label for node in e.atoms(sympy.Indexed)}
        for node in e.atoms(sympy.Symbol) - labels:
            if node.name in self.inputs or node.name in self.params or node.name in env:
                repl[node] = self.leaf(node.name, (), t, env)
        return e.xreplace(repl)

    def definition(self, d, t: int, env: dict, ranges: tuple[int, ...] | None = None) -> dict:
        """A Definition evaluated at every cell of its indices. ranges: each index's length, where the caller knows
        it (a chunk plan's key and value indices are not the body's, and a key may be a literal size or the size-1
        axis of a lifted state); else the body's range of the index."""
        if ranges is None:
            ranges = [int(self.a.ir.ranges[i].xreplace(self.size_subs)) for i in d.indices]
        return {cell: self.evaluate(d.expr, dict(zip(d.indices, cell)), t, env)
                for cell in itertools.product(*[range(n) for n in ranges])}

    def scalar(self, d, t: int):
        """A Definition of no indices (a per-step scalar: a scalar log decay, a beta) at step t."""
        return self.definition(d, t, {}, ())[()]

    def initial(self) -> dict:
        return {s.name: {c: sympy.Symbol(f"{s.name}0" + "".join(f"_{i}" for i in c), real=True)
                         for c in self.cells(s.dims)} for s in self.rec.states}


def _unrolled(inst: _Instance):
    """Step the recurrence as written: outputs[t][name][cell], final states."""
    states = inst.initial()
    outputs = []
    for t in range(inst.steps):
        env = dict(states)
        for s in _update_order(inst.rec):  # an update may read a state updated before it (m__new)
            d = inst.a.ir.updates[s.name]
            env[s.name + NEW_SUFFIX] = {c: inst.evaluate(d.expr, dict(zip(d.indices, c)), t, env)
                                        for c in inst.cells(s.dims)}
        new = {s.name: env[s.name + NEW_SUFFIX] for s in inst.rec.states}
        step = {}
        for o in inst.rec.outputs:
            d = inst.a.ir.outputs[o.name]
            step[o.name] = {c: inst.evaluate(d.expr, dict(zip(d.indices, c)), t, env) for c in inst.cells(o.dims)}
        outputs.append(step)
        states = new
    return outputs, states


def _update_order(rec) -> list:
    """States in the order of their last assignment, as the recurrent form updates them."""
    last = {st.target.name: st.index for st in rec.statements}
    return sorted(rec.states, key=lambda s: last.get(s.name, -1))


def _scan(inst: _Instance):
    """Closed form of s_t = a_t s_(t-1) + b_t: s_t = (prod a) s_0 + sum_s (prod_(s<r<=t) a_r) b_s."""
    init = inst.initial()
    all_states = []
    for t in range(inst.steps):
        states = {}
        for s in inst.rec.states:
            sa = inst.a.states[s.name]
            if sa.block is not None:
                if sa.block.states[0] == s.name:
                    states.update(_block_closed_form(inst, sa.block, s.dims, t, init))
                continue
            cells = {}
            for c in inst.cells(s.dims):
                binding = dict(zip(sa.indices, c))
                a = [inst.evaluate(sa.diagonal, binding, r, {}) for r in range(t + 1)]
                b = [inst.evaluate(sa.injection, binding, r, {}) for r in range(t + 1)]
                value = sympy.Mul(*a) * init[s.name][c]
                for src in range(t + 1):
                    value += sympy.Mul(*a[src + 1 :]) * b[src]
                cells[c] = value
            states[s.name] = cells
        all_states.append(states)
    outputs = []
    for t in range(inst.steps):
        env = dict(all_states[t - 1] if t else init)
        env.update({k + NEW_SUFFIX: v for k, v in all_states[t].items()})
        step = {}
        for o in inst.rec.outputs:
            d = inst.a.ir.outputs[o.name]
            step[o.name] = {c: inst.evaluate(d.expr, dict(zip(d.indices, c)), t, env) for c in inst.cells(o.dims)}
        outputs.append(step)
    return outputs, all_states[-1]


def _block_closed_form(inst: _Instance, block, dims, t: int, init: dict) -> dict:
    """Coupled states at step t per element: s_t = (A_t ... A_0) s_(-1) + sum_s (A_t ... A_(s+1)) b_s, the
    products of the per-element m x m blocks the scan's combine forms."""
    m = len(block.states)
    result = {n: {} for n in block.states}
    for c in inst.cells(dims):
        binding = dict(zip(block.indices, c))
        A = [sympy.Matrix(m, m, lambda r, q: inst.evaluate(block.matrix[r][q], binding, step, {}))
             for step in range(t + 1)]
        b = [sympy.Matrix(m, 1, lambda r, _: inst.evaluate(block.injection[r], binding, step, {}))
             for step in range(t + 1)]

        def product(lo: int) -> sympy.Matrix:  # A_t ... A_lo
            out = sympy.eye(m)
            for step in range(lo, t + 1):
                out = A[step] * out
            return out

        value = product(0) * sympy.Matrix([init[n][c] for n in block.states])
        for src in range(t + 1):
            value += product(src + 1) * b[src]
        for r, n in enumerate(block.states):
            result[n][c] = value[r]
    return result


def _chunked(inst: _Instance, chunk: int):
    """The chunked formulas of DESIGN.md, chunk by chunk, with the state passed between chunks."""
    readouts: list[dict] = [dict() for _ in range(inst.steps)]
    finals = {}
    view = inst.a.chunk_analysis  # states in `view.transposed` are chunked as their transposes
    for s in inst.rec.states:
        sa = view.states[s.name]
        plan = sa.chunk
        flip = s.name in view.transposed
        # A pair plan (a 3-axis state S[X, Y, V]) holds S as [X * Y, V], the key p = a * Y + b (row-major).
        pair = inst.dims(sa.dims)[:2] if plan.pair else None
        kdim = pair[0] * pair[1] if pair else inst.dims(sa.dims)[0]
        vdim = inst.dims(sa.dims)[-1] if len(sa.dims) >= 2 else 1
        init = inst.initial()[s.name]
        lift = view.lifted.get(s.name)  # held with a size-1 key axis in front: n as n[1], h[D] as h[1, D]

        def initial(a, b):
            if lift:
                return init[()] if lift == "scalar" else init[(b,)]
            if pair:
                return init[divmod(a, pair[1]) + (b,)]
            if len(s.dims) == 2:
                return init[(b, a)] if flip else init[(a, b)]
            return init[(a,)]

        S0 = sympy.Matrix(kdim, vdim, initial)

        def vec(d, t, n):
            values = inst.definition(d, t, {}, tuple(pair) if len(d.indices) == 2 else (n,) * len(d.indices))
            if len(d.indices) == 2:  # over a pair (k, a readout's q): flattened row-major, as the forms do
                return sympy.Matrix(n, 1, lambda a, _: values[divmod(a, pair[1])])
            return sympy.Matrix(n, 1, lambda a, _: values[(a,)])

        def logdecay(t):
            if plan.log_decay is None:
                return sympy.zeros(kdim, 1), sympy.zeros(vdim, 1)
            if plan.decay_axis == "scalar":
                g = inst.scalar(plan.log_decay, t)
                return sympy.Matrix([g] * kdim), sympy.zeros(vdim, 1)
            if plan.decay_axis == "key":
                return vec(plan.log_decay, t, kdim), sympy.zeros(vdim, 1)
            return sympy.zeros(kdim, 1), vec(plan.log_decay, t, vdim)

        if sa.cls is TransitionClass.RANK_R_UPDATE:
            S0 = _rank_r_chunked(inst, plan, S0, kdim, vdim, chunk, readouts, vec)
        elif plan.sub_steps:
            S0 = _sub_steps_chunked(inst, plan, S0, kdim, vdim, chunk, readouts, vec)
        # (a rank-r update's chunks, and those of an injection that is a sum of outer products, are its sub-steps',
        # done above)
        for start in range(0, 0 if plan.sub_steps else inst.steps, chunk):
            ts = list(range(start, min(start + chunk, inst.steps)))
            ks = {t: vec(plan.k, t, kdim) for t in ts}
            vs = {t: (vec(plan.v, t, vdim) if plan.v is not None else sympy.ones(1, 1)) for t in ts}
            gk, gv = {}, {}
            run_k, run_v = sympy.zeros(kdim, 1), sympy.zeros(vdim, 1)
            G_prev_k, G_prev_v = {}, {}
            for t in ts:
                G_prev_k[t], G_prev_v[t] = run_k, run_v
                dk, dv = logdecay(t)
                run_k, run_v = run_k + dk, run_v + dv
                gk[t], gv[t] = run_k, run_v

            def decay(G_k, G_v):
                return sympy.diag(*[sympy.exp(x) for x in G_k]), sympy.diag(*[sympy.exp(x) for x in G_v])

            if sa.cls is TransitionClass.DIAGONAL_PLUS_RANK_ONE:
                # u_t = S_(t-1)^T a_t, from S0 and the chunk's earlier (b_s, u_s) and (k_s, v_s) pairs
                def ddot(x, y, Gx, Gy):
                    return sum(x[i] * y[i] * sympy.exp(Gx[i] - Gy[i]) for i in range(kdim))

                a_s = {t: vec(plan.mix_read, t, kdim) for t in ts}
                b_s = {t: vec(plan.mix_write, t, kdim) for t in ts}
                us = {}
                for t in ts:
                    u = S0.T * sympy.diag(*[sympy.exp(x) for x in G_prev_k[t]]) * a_s[t]
                    for src in ts:
                        if src < t:
                            u += ddot(a_s[t], b_s[src], G_prev_k[t], gk[src]) * us[src]
                            u += ddot(a_s[t], ks[src], G_prev_k[t], gk[src]) * vs[src]
                    us[t] = u
                for r in plan.readouts:
                    for t in ts:
                        q = vec(r.query, t, kdim)
                        Gq = G_prev_k[t] if r.exclusive else gk[t]
                        out = S0.T * sympy.diag(*[sympy.exp(x) for x in Gq]) * q
                        for src in ts:
                            if src < t or (src == t and not r.exclusive):
                                out += ddot(q, b_s[src], Gq, gk[src]) * us[src]
                                out += ddot(q, ks[src], Gq, gk[src]) * vs[src]
                        readouts[t][r.name] = out
                last = ts[-1]
                S_end = sympy.diag(*[sympy.exp(x) for x in gk[last]]) * S0
                for src in ts:
                    Mk = sympy.diag(*[sympy.exp(x) for x in gk[last] - gk[src]])
                    S_end += Mk * (b_s[src] * us[src].T + ks[src] * vs[src].T)
                S0 = S_end
                continue
            if sa.cls is TransitionClass.RANK_ONE_UPDATE:
                # S_t = D_t S_(t-1) + k_t u_t^T with u_t = y_t - beta_t (D_t S_(t-1))^T k_t; with G the key-axis log
                # decay from the chunk start (a scalar decay is the same on every key row), as chunked_delta:
                # u_t = y_t - beta_t S0^T (exp(G_t) * k_t) - beta_t sum_(s<t) (k_t . k_s)_(G_t - G_s) u_s
                def kdot(x, y, Gx, Gy):
                    return sum(x[i] * y[i] * sympy.exp(Gx[i] - Gy[i]) for i in range(kdim))

                betas = {t: inst.scalar(plan.beta, t) for t in ts}
                us = {}
                for t in ts:
                    u = vs[t] - betas[t] * S0.T * sympy.diag(*[sympy.exp(x) for x in gk[t]]) * ks[t]
                    for src in ts:
                        if src < t:
                            u -= betas[t] * kdot(ks[t], ks[src], gk[t], gk[src]) * us[src]
                    us[t] = u
                for r in plan.readouts:
                    for t in ts:
                        q = vec(r.query, t, kdim)
                        Gq = G_prev_k[t] if r.exclusive else gk[t]
                        out = S0.T * sympy.diag(*[sympy.exp(x) for x in Gq]) * q
                        for src in ts:
                            if src < t or (src == t and not r.exclusive):
                                out += kdot(q, ks[src], Gq, gk[src]) * us[src]
                        readouts[t][r.name] = out
                last = ts[-1]
                S_end = sympy.diag(*[sympy.exp(x) for x in gk[last]]) * S0
                for src in ts:
                    S_end += sympy.diag(*[sympy.exp(x) for x in gk[last] - gk[src]]) * ks[src] * us[src].T
                S0 = S_end
                continue
            for r in plan.readouts:
                for t in ts:
                    q = vec(r.query, t, kdim)
                    Gk = G_prev_k[t] if r.exclusive else gk[t]
                    Gv = G_prev_v[t] if r.exclusive else gv[t]
                    Dk, Dv = decay(Gk, Gv)
                    out = Dv * S0.T * Dk * q
                    for src in ts:
                        if src < t or (src == t and not r.exclusive):
                            Mk, Mv = decay(Gk - gk[src], Gv - gv[src])
                            out += Mv * vs[src] * (q.T * Mk * ks[src])[0]
                    readouts[t][r.name] = out
            last = ts[-1]
            Dk, Dv = decay(gk[last], gv[last])
            S_end = Dk * S0 * Dv
            for src in ts:
                Mk, Mv = decay(gk[last] - gk[src], gv[last] - gv[src])
                S_end += Mk * ks[src] * vs[src].T * Mv
            S0 = S_end
        if pair:
            finals[s.name] = {divmod(a, pair[1]) + (b,): S0[a, b] for a in range(kdim) for b in range(vdim)}
        elif lift:
            finals[s.name] = {(): S0[0, 0]} if lift == "scalar" else {(b,): S0[0, b] for b in range(vdim)}
        else:
            finals[s.name] = ({((b, a) if flip else (a, b)): S0[a, b] for a in range(kdim) for b in range(vdim)}
                              if len(s.dims) == 2 else {(a,): S0[a, 0] for a in range(kdim)})
    outputs = []
    for t in range(inst.steps):
        env = {}
        for name, value in readouts[t].items():
            env[name] = ({(b,): value[b, 0] for b in range(value.shape[0])} if value.shape[0] > 1
                         or _has_value_axis(inst, name) else {(): value[0, 0]})
        step = {}
        for o in inst.rec.outputs:
            oa = view.outputs[o.name]
            step[o.name] = {c: inst.evaluate(oa.expr, dict(zip(oa.indices, c)), t, env) for c in inst.cells(o.dims)}
        outputs.append(step)
    return outputs, finals


def _rank_r_chunked(inst: _Instance, plan, S0: sympy.Matrix, kdim: int, vdim: int, chunk: int, readouts: list,
                    vec) -> sympy.Matrix:
    """A rank-r update as its chunked form runs it: the r updates of step t are delta-rule sub-steps r t + n
    (n = 0, ..., r - 1) of a sequence r times as long, each with its own k, y, beta and log decay, through the UT
    transform of the rank-one form; a readout of S_t is read at sub-step r t + r - 1, one of S_(t-1) before sub-step
    r t. Chunks hold r * chunk - 1 sub-steps, so that their boundaries fall inside steps too (as chunks of 64
    sub-steps do for r = 3). Fills `readouts`, returns the final state."""
    r = len(plan.sub_steps)
    subs = []  # (t, n, k, y, beta, key-axis log decay)
    for t in range(inst.steps):
        for n, sub in enumerate(plan.sub_steps):
            g = sympy.zeros(kdim, 1)
            if sub.log_decay is not None:
                g = (sympy.Matrix([inst.scalar(sub.log_decay, t)] * kdim)
                     if sub.decay_axis == "scalar" else vec(sub.log_decay, t, kdim))
            subs.append((t, n, vec(sub.k, t, kdim), vec(sub.v, t, vdim), inst.scalar(sub.beta, t), g))

    def kdot(x, y, Gx, Gy):
        return sum(x[i] * y[i] * sympy.exp(Gx[i] - Gy[i]) for i in range(kdim))

    size = max(1, r * chunk - 1)
    for start in range(0, len(subs), size):
        ps = list(range(start, min(start + size, len(subs))))
        gk, g_prev, run = {}, {}, sympy.zeros(kdim, 1)
        for p in ps:
            g_prev[p] = run
            run = run + subs[p][5]
            gk[p] = run
        us = {}
        for p in ps:
            _, _, k, y, beta, _ = subs[p]
            u = y - beta * S0.T * sympy.diag(*[sympy.exp(x) for x in gk[p]]) * k
            for src in ps[:ps.index(p)]:
                u -= beta * kdot(k, subs[src][2], gk[p], gk[src]) * us[src]
            us[p] = u
        for ro in plan.readouts:
            for p in ps:
                t, n = subs[p][:2]
                if n != (0 if ro.exclusive else r - 1):
                    continue
                q = vec(ro.query, t, kdim)
                Gq = g_prev[p] if ro.exclusive else gk[p]
                out = S0.T * sympy.diag(*[sympy.exp(x) for x in Gq]) * q
                for src in ps:
                    if src < p or (src == p and not ro.exclusive):
                        out += kdot(q, subs[src][2], Gq, gk[src]) * us[src]
                readouts[t][ro.name] = out
        last = ps[-1]
        S_end = sympy.diag(*[sympy.exp(x) for x in gk[last]]) * S0
        for src in ps:
            S_end += sympy.diag(*[sympy.exp(x) for x in gk[last] - gk[src]]) * subs[src][2] * us[src].T
        S0 = S_end
    return S0


def _sub_steps_chunked(inst: _Instance, plan, S0: sympy.Matrix, kdim: int, vdim: int, chunk: int, readouts: list,
                       vec) -> sympy.Matrix:
    """A diagonal decay with an injection that is a sum of r outer products as its chunked form runs it: step t as
    linear sub-steps r t + n (n = 0, ..., r - 1) of a sequence r times as long, sub-step r t applying the decay and
    k_1 v_1^T, each later one k_(n+1) v_(n+1)^T alone; a readout of S_t at sub-step r t + r - 1, one of S_(t-1)
    before sub-step r t. Chunks hold r * chunk - 1 sub-steps (a boundary inside a step), or every sub-step where
    one chunk holds every step (the parallel form). Fills `readouts`, returns the final state."""
    r = len(plan.sub_steps)
    subs = []  # (t, n, k, v, key-axis log decay, value-axis log decay)
    for t in range(inst.steps):
        for n, sub in enumerate(plan.sub_steps):
            gk, gv = sympy.zeros(kdim, 1), sympy.zeros(vdim, 1)
            if n == 0 and plan.log_decay is not None:
                if plan.decay_axis == "scalar":
                    gk = sympy.Matrix([inst.scalar(plan.log_decay, t)] * kdim)
                elif plan.decay_axis == "key":
                    gk = vec(plan.log_decay, t, kdim)
                else:
                    gv = vec(plan.log_decay, t, vdim)
            subs.append((t, n, vec(sub.k, t, kdim), vec(sub.v, t, vdim), gk, gv))

    def decay(G):
        return sympy.diag(*[sympy.exp(x) for x in G])

    size = r * chunk if chunk >= inst.steps else max(1, r * chunk - 1)
    for start in range(0, len(subs), size):
        ps = list(range(start, min(start + size, len(subs))))
        gk, gv, prev_k, prev_v = {}, {}, {}, {}
        run_k, run_v = sympy.zeros(kdim, 1), sympy.zeros(vdim, 1)
        for p in ps:
            prev_k[p], prev_v[p] = run_k, run_v
            run_k, run_v = run_k + subs[p][4], run_v + subs[p][5]
            gk[p], gv[p] = run_k, run_v
        for ro in plan.readouts:
            for p in ps:
                t, n = subs[p][:2]
                if n != (0 if ro.exclusive else r - 1):
                    continue
                q = vec(ro.query, t, kdim)
                Gk, Gv = (prev_k[p], prev_v[p]) if ro.exclusive else (gk[p], gv[p])
                out = decay(Gv) * S0.T * decay(Gk) * q
                for src in ps:
                    if src < p or (src == p and not ro.exclusive):
                        out += decay(Gv - gv[src]) * subs[src][3] * (q.T * decay(Gk - gk[src]) * subs[src][2])[0]
                readouts[t][ro.name] = out
        last = ps[-1]
        S_end = decay(gk[last]) * S0 * decay(gv[last])
        for src in ps:
            S_end += decay(gk[last] - gk[src]) * subs[src][2] * subs[src][3].T * decay(gv[last] - gv[src])
        S0 = S_end
    return S0


def _has_value_axis(inst: _Instance, readout: str) -> bool:
    for oa in inst.a.chunk_analysis.outputs.values():
        for r in oa.readouts:
            if r.name == readout:
                return r.value_index is not None
    return False


_POINTS = 3  # random rational points each element is compared at


def _point(symbols, draw: int) -> dict:
    """Random rationals for `symbols` (positive for params); a symbol's value depends on its name and the draw
    only, so every element and form of one proof sees the same points, run after run."""
    point = {}
    for sym in symbols:
        rng = random.Random(f"{draw}:{sym.name}")
        value = sympy.Rational(rng.randint(1, 19), rng.randint(1, 9))
        point[sym] = value if sym.is_positive or rng.random() < 0.5 else -value
    return point


_SIMPLE = 1000  # the largest denominator of a rational that a spec's decimal literal is taken to mean


def _rational(f: sympy.Float) -> sympy.Expr:
    """The exact number a float constant of a spec stands for: a simple rational (0.9, 1/2), else exp of one
    (exp(-0.1) is already a float in the IR, 0.904837..., and the forms' masks hold exp(-0.2), exp(-0.3):
    as exp(-1/10) and exp(-1/5) they compose exactly, as their nearest rationals do not), else the nearest
    rational."""
    near = sympy.nsimplify(f, rational=True, tolerance=1e-12 * max(1.0, abs(float(f))))
    if near.q <= _SIMPLE or f <= 0:
        return near
    log = sympy.nsimplify(sympy.log(f), rational=True, tolerance=1e-12 * max(1.0, abs(float(sympy.log(f)))))
    return sympy.exp(log) if log.q <= _SIMPLE else near


def _exact(e: sympy.Expr) -> sympy.Expr:
    """`e` with its float constants (K ** -0.5, 1e-6, a log read off a constant decay) as nearby rationals;
    exp(c + x) with a float c becomes (the rational nearest exp(c)) exp(x), so exp(log(0.9) + g) from a
    decay 0.9 exp(g) meets 0.9 exp(g)."""
    def split(node):
        consts = [a for a in sympy.Add.make_args(node.args[0]) if isinstance(a, sympy.Float)]
        return _rational(sympy.exp(sympy.Add(*consts))) * sympy.exp(node.args[0] - sympy.Add(*consts))

    e = e.replace(lambda n: isinstance(n, sympy.exp) and any(isinstance(a, sympy.Float)
                                                             for a in sympy.Add.make_args(n.args[0])), split)
    # The analysis writes the log of a gate 1 - sigmoid(x) as logsigmoid(-x) and of sigmoid(x) as logsigmoid(x):
    # spelled back as logs of the gates, exp(log(...)) meets the decay as the recurrence writes it.
    e = e.replace(lambda n: isinstance(n, logsigmoid),
                  lambda n: sympy.log(1 - sigmoid(-n.args[0])) if n.args[0].could_extract_minus_sign()
                  else sympy.log(sigmoid(n.args[0])))
    return e.xreplace({f: _rational(f) for f in e.atoms(sympy.Float)})


def _at(diff: sympy.Expr, point: dict) -> bool | None:
    """Whether `diff` is zero at `point`, by exact arithmetic: expanded, it is a sum of rationals times
    exp(rational), which sympy merges and collects, and exps of distinct rationals are linearly independent
    (Lindemann-Weierstrass), so a nonzero sum is a real difference, which 40 digits confirm. None where the
    point is singular, or a leftover (sqrt, tanh, ...) keeps a zero out of that normal form."""
    value = sympy.expand(diff.xreplace(point))
    if value == 0:
        return True
    if value.has(sympy.zoo, sympy.oo, sympy.nan):
        return None
    if abs(sympy.N(value, 40)) > sympy.Float(10) ** -25:
        return False
    return None  # numerically zero but not exactly decided at this point


def _sums(e: sympy.Expr) -> set:
    """The sums of symbols under a denominator or a root in `e` (the 1 + b k.k of Longhorn's dt, the k.k + 1e-6
    of an L2 norm)."""
    return {p.base for p in e.atoms(sympy.Pow)
            if isinstance(p.base, sympy.Add) and p.base.free_symbols and not (p.exp.is_Integer and p.exp > 0)}


def _opaque(diff: sympy.Expr) -> sympy.Expr:
    """`diff` with each of its `_sums` as one fresh symbol, the same sum the same symbol on both sides, with the
    sign the sum is known to have. Sound: zero as a function of the new symbols, it is zero at the sums' values
    too."""
    names = {}
    for n, base in enumerate(sorted(_sums(diff), key=sympy.default_sort_key)):
        sign = {"positive": True} if base.is_positive else {"real": True} if base.is_extended_real else {}
        names[base] = sympy.Dummy(f"n{n}", **sign)
    return diff.xreplace(names)


def _expanded_zero(diff: sympy.Expr, together: bool = True) -> bool:
    """Expanded with products of exps merged; with symbols in a denominator and `together`, the numerator over
    one denominator."""
    if together and any(p.exp.is_negative and p.base.free_symbols for p in diff.atoms(sympy.Pow)):
        diff = sympy.fraction(sympy.together(diff))[0]
    return sympy.expand(sympy.powsimp(sympy.expand(diff), combine="exp")) == 0


def _symbolic_zero(diff: sympy.Expr, opaque_first: bool = True) -> bool:
    """Exact and cheap, no `simplify` (which ran for hours on Longhorn's 1 / (1 + dt k.k)): with `opaque_first`,
    first with the sums under denominators and roots as opaque symbols (`_opaque`), where the forms only regroup
    the same normalisers (an L2-normalised k, q: expanding the numerator over their sums themselves took half a
    minute an element); where that does not settle it, with the sums written out, over one denominator."""
    if opaque_first:
        opaque = _opaque(diff)
        if opaque != diff and _expanded_zero(opaque, together=False):
            return True
    return _expanded_zero(diff)


def _compare(form: str, value: str, pairs: list) -> ProofResult:
    """Compare (label, form value, recurrence value) pairs: rational points first, each exact, so a difference
    is found fast; then symbolically where the expansion settles it."""
    symbolic, undecided = 0, []
    for label, x, y in pairs:
        x, y = _exact(x), _exact(y)
        diff = x - y
        points = [_point(diff.free_symbols, draw) for draw in range(_POINTS)]
        at = [_at(diff, p) for p in points]
        if False in at:
            p = points[at.index(False)]
            gap = sympy.N(sympy.expand(diff.xreplace(p)), 6)
            return ProofResult(form, value, len(pairs), False,
                               f"{label} differs at a random rational point (by {gap}, exact arithmetic)")
        # Sums opaque first only where both sides have the same ones (a form regrouping the recurrence's norms):
        # a readout's denominator, as the chunked form sums it, is a sum of its own (Based's den), and its
        # opaque symbol would only add an expansion that cannot settle the element.
        if _symbolic_zero(diff, opaque_first=_sums(x) == _sums(y)):
            symbolic += 1
        elif None in at:
            undecided.append(label)
    if undecided:
        return ProofResult(form, value, len(pairs), False,
                           f"undecided: {undecided[0]} is not zero after expansion, and equal only to 40 digits at "
                           "some random rational points")
    return ProofResult(form, value, len(pairs), True, symbolic=symbolic, points=_POINTS)


def _rank(analysis: Analysis) -> int:
    """The largest r of a rank-r update among the states the chunked form runs (1 where there is none)."""
    return max([len(s.stages) for s in analysis.chunk_analysis.states.values()] + [1])


def proof_steps(analysis: Analysis, steps: int = 4) -> int:
    """The steps a proof unrolls: `steps`, or for a rank-r update steps / r (at least 2), so that the r t
    delta-rule sub-steps stay about `steps` (8 sub-steps of DeltaProduct took minutes of expansion, 4 a second)."""
    r = _rank(analysis)
    return steps if r == 1 else max(2, steps // r)


def proof_setup(analysis: Analysis, steps: int = 4, size: int = 2, chunk: int = 2) -> str:
    """The instance `prove` unrolls, in words (for `recdsl check --prove`)."""
    r = _rank(analysis)
    text = f"T = {proof_steps(analysis, steps)}, sizes {size}, chunks of {chunk}"
    if r > 1:
        text += f"; the rank-r update's r = {r} updates per step as sub-steps, in chunks of {r * chunk - 1}"
    return text


Progress = Callable[[str, float | None], None]


def prove(analysis: Analysis, steps: int = 4, size: int = 2, chunk: int = 2,
          progress: Progress | None = None) -> list[ProofResult]:
    """Compare every derived form of `analysis` with the unrolled recurrence (see ProofResult for how exact).
    A rank-r update unrolls `proof_steps` steps. `progress(part, None)` is called as each part of the proof starts
    (unrolling the recurrence, building a form, proving one output or final state of a form, e.g. "proving
    chunked o (8 elements)"), `progress(part, seconds)` as it ends."""
    if analysis.inner is not None:
        # Shift states: the forms are the rest's (`analysis.inner`, their previous values as inputs), which is what
        # is proved; the shift along T that computes those values is the same in every form.
        return prove(analysis.inner, steps, size, chunk, progress)

    def part(label: str, work, *args):
        if progress is None:
            return work(*args)
        progress(label, None)
        start = time.perf_counter()
        value = work(*args)
        progress(label, time.perf_counter() - start)
        return value

    steps = proof_steps(analysis, steps)
    inst = _Instance(analysis, steps, size)
    candidates = {}
    if "scan" in analysis.forms:
        candidates["scan"] = lambda: _scan(inst)
    if "chunked" in analysis.forms:
        candidates["chunked"] = lambda: _chunked(inst, chunk)
    if "parallel" in analysis.forms:
        candidates["parallel"] = lambda: _chunked(inst, steps)
    if not candidates:
        return []
    ref_outputs, ref_finals = part(f"unrolling the recurrence ({steps} steps)", _unrolled, inst)
    results = []
    for form, build in candidates.items():
        outputs, finals = part(f"building the {form} form", build)
        obligations = []
        for o in analysis.recurrence.outputs:
            obligations.append((o.name, [(f"{o.name}{_cell(c)} at t = {t}", outputs[t][o.name][c],
                                          ref_outputs[t][o.name][c])
                                         for t in range(steps) for c in ref_outputs[t][o.name]]))
        for s in analysis.recurrence.states:
            obligations.append((f"final {s.name}", [(f"final {s.name}{_cell(c)}", finals[s.name][c],
                                                     ref_finals[s.name][c]) for c in ref_finals[s.name]]))
        for value, pairs in obligations:
            results.append(part(f"proving {form} {value} ({len(pairs)} elements)", _compare, form, value, pairs))
    return results


def _cell(c: tuple) -> str:
    return f"[{', '.join(map(str, c))}]" if c else ""
