"""Words and mathematics for an analysis: what `recdsl show` prints.

Per-step quantities are written with a subscript t (`g_t[a]`); states as
`S_{t-1}` / `S_t`; chunked forms over a chunk of C steps with cumulative log
decays `G`.
"""

from __future__ import annotations

import re

from .analysis import Analysis, ChunkPlan, StateAnalysis, TransitionClass, readable_dummies
from .printing import spec_text
from .step_ir import NEW_SUFFIX

# The chunk plan's own index names (key, value, query axes; a flattened pair's two key axes) -> the letter `show`
# writes, and the letters tried after it when the text already names something so (an input `a`, a scalar `b`).
_INDEX_NAMES = (("a__k", "a"), ("a__v", "b"), ("a__q", "a"), ("p__k0", "a"), ("p__k1", "b"), ("p__q0", "a"),
                ("p__q1", "b"), ("p__v", "j"))
_INDEX_LETTERS = {"a": "acepx", "b": "bdfry", "j": "jlnsz"}


def _index_letters(text: str) -> dict[str, str]:
    """The letter each of `text`'s plan indices is written as: its own (`a`) unless the text names something else
    so (`v_t[b] = sigmoid(b)*v[b]` for a scalar input b), then the next free one."""
    internal = {i for i, _ in _INDEX_NAMES}
    taken = set(re.findall(r"[A-Za-z_]\w*", text)) - internal
    letters: dict[str, str] = {}
    for base in _INDEX_LETTERS:
        if any(i in text for i, shown in _INDEX_NAMES if shown == base):
            free = [c for c in _INDEX_LETTERS[base] if c not in taken and c not in letters.values()]
            letters[base] = free[0] if free else f"{base}_"
    return letters


def tidy(expr) -> str:
    """`expr` in the spec's syntax (`spec_text`), or a message quoting it, with the IR's internal names made
    readable (a__k -> a, i__0 -> i_0, S__new -> S_t): the one tidy of every message that shows an expression
    (`show`, `check`, a form's CallError).
    Tidy a whole line at once: a plan index is written with a letter no other name in the text has."""
    text = spec_text(expr)  # in the spec's syntax: sum(i, x), -0.5, inf
    text = text.replace(NEW_SUFFIX, "_t")
    letters = _index_letters(text)
    for internal, shown in _INDEX_NAMES:
        text = text.replace(internal, letters.get(shown, shown))
    return readable_dummies(text)


def _idx(indices) -> str:
    return "[" + ", ".join(str(i) for i in indices) + "]" if indices else ""


def _rank_r_lines(sa: StateAnalysis, plan: ChunkPlan) -> list[str]:
    """A rank-r update's chunked form: its r updates per step as r delta-rule sub-steps (DeltaProduct)."""
    s, r = sa.name, len(plan.sub_steps)
    lines = [f"    {s}_t = (I - beta_{r} k_{r} k_{r}^T) D_{r} ... (I - beta_1 k_1 k_1^T) D_1 {s}_(t-1) + ...   "
             f"(rank r = {r}: {r} Householder factors per step)"]
    for n, sub in enumerate(plan.sub_steps, start=1):
        decay = "1" if sub.log_decay is None else f"exp({tidy(sub.log_decay.expr)})"
        lines.append(f"    update {n}: k_{n}[a] = {tidy(sub.k.expr)};  v_{n}[b] = {tidy(sub.v.expr)};  "
                     f"beta_{n} = {tidy(sub.beta.expr)};  D_{n} = {decay}")
    positions = ", ".join(f"{r}t + {n}" if n else f"{r}t" for n in range(r))
    lines.append(f"    chunked: the updates of step t are delta-rule steps {positions} of a sequence {r} times as long "
                 "(decay 1 where an update has none), run in the UT/WY form below; step t's")
    lines.append(f"    outputs are read after step {r}t + {r - 1} (a readout of {s}_(t-1) before step {r}t)")
    lines.append("    T = (I + tril(diag(beta) (K K^T * Gamma), -1))^-1   (UT transform, C x C, over the sub-steps)")
    lines.append(f"    U = T (V - diag(beta * exp(G)) K {s}_0);  {s}_C = exp(G_C) {s}_0 + (K * exp(G_C - G))^T U")
    return lines


def _sub_step_lines(sa: StateAnalysis, plan: ChunkPlan) -> list[str]:
    """A diagonal decay whose injection is a sum of r outer products: r linear sub-steps per step."""
    s, r = sa.name, len(plan.sub_steps)
    terms = " + ".join(f"k_{n} v_{n}^T" for n in range(1, r + 1))
    lines = [f"    {s}_t = D_t {s}_(t-1) + {terms}   (the injection is a sum of r = {r} outer products)"]
    for n, sub in enumerate(plan.sub_steps, start=1):
        lines.append(tidy(f"    k_{n}{_idx(sub.k.indices)} = {spec_text(sub.k.expr)};  "
                          f"v_{n}{_idx(sub.v.indices)} = {spec_text(sub.v.expr)}"))
    if plan.log_decay is not None:
        note = "" if plan.decay_exact else "   (needs the decay > 0)"
        lines.append(tidy(f"    log decay ({plan.decay_axis}) g_t{_idx(plan.log_decay.indices)} = "
                          f"{spec_text(plan.log_decay.expr)}") + note)
    positions = ", ".join(f"{r}t + {n}" if n else f"{r}t" for n in range(r))
    later = f" k_{r} v_{r}^T" if r == 2 else f" k_n v_n^T (n = 2 .. {r})"
    lines.append(f"    by linearity: step t is sub-steps {positions} of a sequence {r} times as long, {r}t applying "
                 f"D_t and k_1 v_1^T, then{later} with decay 1 (g = 0)")
    lines.append(f"    outputs are read after sub-step {r}t + {r - 1} (a readout of {s}_(t-1) before sub-step {r}t); "
                 "each chunk of sub-steps runs the linear chunked form:")
    if plan.decay_axis == "key":
        lines.append("    O = (Q * exp(G)) S_0 + (A * causal) V,  A_ts = sum_a q_t[a] k_s[a] exp(G_t[a] - G_s[a])")
        lines.append(f"    {s}_C = exp(G_C) * {s}_0 + (K * exp(G_C - G))^T V   (G over the sub-steps)")
    elif plan.decay_axis == "value":
        lines.append("    O_t[b] = (q_t^T S_0)[b] exp(G_t[b]) + sum_{s <= t} (q_t . k_s) exp(G_t[b] - G_s[b]) v_s[b]")
        lines.append(f"    {s}_C = {s}_0 * exp(G_C) + K^T (V * exp(G_C - G))   (G over the sub-steps)")
    elif plan.decay_axis == "scalar":
        lines.append("    O = exp(G) * (Q S_0) + ((Q K^T) * M) V,  M_ts = exp(G_t - G_s) for s <= t")
        lines.append(f"    {s}_C = exp(G_C) {s}_0 + (K * exp(G_C - G))^T V   (G over the sub-steps)")
    else:
        lines.append(f"    O = Q S_0 + ((Q K^T) * causal) V;  {s}_C = {s}_0 + K^T V")
    return lines


def _chunk_lines(sa: StateAnalysis, plan: ChunkPlan) -> list[str]:
    s = sa.name
    if sa.cls is TransitionClass.RANK_R_UPDATE:
        return _rank_r_lines(sa, plan)
    if plan.sub_steps:
        return _sub_step_lines(sa, plan)
    lines = [tidy(f"    k_t{_idx(plan.k.indices)} = {spec_text(plan.k.expr)}")]
    if plan.v is not None:
        lines.append(tidy(f"    v_t{_idx(plan.v.indices)} = {spec_text(plan.v.expr)}"))
    else:
        lines.append("    v_t = 1  (the state has no value axis)")
    if plan.log_decay is not None:
        note = "" if plan.decay_exact else "   (needs the decay > 0)"
        lines.append(tidy(f"    log decay ({plan.decay_axis}) g_t{_idx(plan.log_decay.indices)} = "
                          f"{spec_text(plan.log_decay.expr)}") + note)
        lines.append("    G_t = sum_{r <= t in the chunk} g_r               (cumulative log decay)")
        if plan.decay_axis == "key":
            mask = "A_ts = sum_a q_t[a] k_s[a] exp(G_t[a] - G_s[a])   for s <= t"
            inter = "(Q * exp(G)) S_0"
            carry = f"{s}_C = exp(G_C) * {s}_0 + (K * exp(G_C - G))^T V"
        elif plan.decay_axis == "value":
            mask = "O_t[b] = sum_{s <= t} (q_t . k_s) exp(G_t[b] - G_s[b]) v_s[b]"
            inter = "(Q S_0) * exp(G)"
            carry = f"{s}_C = {s}_0 * exp(G_C) + K^T (V * exp(G_C - G))"
        else:
            mask = "M_ts = exp(G_t - G_s)   for s <= t                 (decay mask)"
            inter = "exp(G) * (Q S_0)"
            carry = f"{s}_C = exp(G_C) {s}_0 + (K * exp(G_C - G))^T V"
    else:
        mask = "M_ts = 1   for s <= t                              (causal mask)"
        inter = "Q S_0"
        carry = f"{s}_C = {s}_0 + K^T V"
    if sa.cls is TransitionClass.DIAGONAL_PLUS_RANK_ONE:
        lines.append(tidy(f"    a_t = {spec_text(plan.mix_read.expr)};  b_t = {spec_text(plan.mix_write.expr)};  ")
                     + f"{s}_t = (D_t + b_t a_t^T) {s}_(t-1) + k_t v_t^T")
        lines.append(f"    u_t = {s}_(t-1)^T a_t;  then {s}_t = D_t {s}_(t-1) + b_t u_t^T + k_t v_t^T   (keys b, k)")
        lines.append("    (I - L_ab) U = (A * exp(G_(t-1))) S_0 + L_ak V,  L_xy[t, s] = (x_t . y_s) decayed, s < t")
        lines.append(f"    O = {inter} + (decayed Q B^T) U + (decayed Q K^T) V")
        lines.append(f"    {s}_C = exp(G_C) {s}_0 + (B * exp(G_C - G))^T U + (K * exp(G_C - G))^T V")
        return lines
    if sa.cls is TransitionClass.RANK_ONE_UPDATE:
        lines.append(f"    beta_t = {tidy(plan.beta.expr)};  {s}_t = (I - beta_t k_t k_t^T) D_t {s}_(t-1) "
                     "+ k_t v_t^T")
        lines.append("    T = (I + tril(diag(beta) (K K^T * Gamma), -1))^-1   (UT transform, C x C)")
        lines.append(f"    U = T (V - diag(beta * exp(G)) K {s}_0)             (pseudo-values)")
        lines.append(f"    O = exp(G) * (Q {s}_0) + ((Q K^T) * Gamma * causal) U")
        lines.append(f"    {s}_C = exp(G_C) {s}_0 + (K * exp(G_C - G))^T U")
        return lines
    lines.append(f"    {mask}")
    intra = "(A * causal) V" if plan.decay_axis == "key" else "((Q K^T) * M) V"
    lines.append(f"    O = {inter} + {intra}   (intra-chunk masked product)")
    lines.append(f"    {carry}   (state passed once per chunk)")
    return lines


def explain(analysis: Analysis) -> str:
    """The derived forms of one recurrence as mathematics a reader can check."""
    rec = analysis.recurrence
    lines = [f"recurrence {rec.name}: class {analysis.cls.value}; forms: {', '.join(analysis.forms)}"]
    if rec.reverse:
        lines.append("  reverse: steps run t = T-1, ..., 0 (per sequence); each form below runs forward on the "
                     "time-flipped sequence and its outputs are flipped back")
    view = analysis.chunk_analysis
    shifted = analysis.shift.names if analysis.shift is not None else ()
    for name, sa in analysis.states.items():
        update = analysis.ir.updates[name]
        lines.append(f"  state {name}{_idx(update.indices)}: {sa.cls.value} -- {tidy(sa.reason)}")
        step = tidy(update.expr).replace(name + "[", name + "_(t-1)[")
        for x in shifted:  # (a shift state read in the step is its previous value)
            step = re.sub(rf"\b{re.escape(x)}\b(?!_\()", f"{x}_(t-1)", step)
        lines.append(f"    step: {name}_t{_idx(update.indices)} = {step}")
        if sa.cls is TransitionClass.SHIFT:
            idx = _idx(update.indices)
            lines.append(f"    shifted: {name}_t{idx} computed for every t at once on [B, T, H, ...] tensors, then "
                         f"{name}_(t-1){idx} = {name}_t{idx} one step later along T ({name}_(-1) the initial state; "
                         "reverse: one step earlier), before the recurrence runs; the rest of the recurrence, "
                         f"{analysis.shift.inner.name}, reads it as an input")
            continue
        if name in view.transposed:
            update = view.ir.updates[name]
            lines.append(f"    chunked as {name}^T, read along its first axis: "
                         f"{name}^T_t{_idx(update.indices)} = {tidy(update.expr).replace(name + '[', name + '^T[')}")
        if sa.block is not None and sa.block.states[0] == name:
            members = ", ".join(sa.block.states)
            idx = _idx(sa.block.indices)
            for r, row in enumerate(sa.block.matrix):
                cells = ", ".join(tidy(c) for c in row)
                lines.append(f"    block row {r}: {sa.block.states[r]}_t{idx} = [{cells}] . ({members})_(t-1){idx} + "
                             f"{tidy(sa.block.injection[r])}")
            lines.append("    scan combine: (A1, b1) . (A2, b2) = (A2 A1, A2 b1 + b2), per element")
        lift = view.lifted.get(name)
        if lift:
            held = f"{name}[1]" if lift == "scalar" else f"{name}[1, {tidy(update.indices[0])}]"
            lines.append(f"    chunked as {held}: a key axis of size 1 in front, so "
                         + (f"{name} is a key-only state with k_t its injection"
                            if lift == "scalar" else f"an elementwise read {name}[d] is a readout with q = 1 and "
                                                     "a per-channel decay is a value-axis decay"))
        sa = view.states[name]
        pair = sa.chunk is not None and sa.chunk.pair
        if pair:
            x, y, j = (tidy(i) for i in update.indices)
            lines.append(f"    chunked as {name}[({x}, {y}), {j}]: its first two axes flattened into one key axis of "
                         f"size {sa.dims[0]} * {sa.dims[1]} (p = {x} * {sa.dims[1]} + {y}), with k_t[p] and each "
                         f"readout's q_t[p] built per step from the pair")
        if sa.chunk is not None:
            if "chunked" not in analysis.forms:  # the state chunks, the recurrence does not (see "no chunked form")
                lines.append(f"    {name} alone would chunk as below; the recurrence has no chunked form (see the "
                             "end)")
            lines.extend(_chunk_lines(sa, sa.chunk))
        shown = f"{name}^T" if name in view.transposed else name
        for r in (sa.chunk.readouts if sa.chunk else []):
            when = f"{shown}_(t-1)" if r.exclusive else f"{shown}_t"
            value = f"[{r.value_index}]" if r.value_index is not None else ""
            # (the query's own index names, so that one tidy of the line writes the sum's letters as the query's)
            key = "p__q0, p__q1" if pair else "a__q"
            axes = key + (f", {r.value_index}" if r.value_index is not None else "")
            summed = f"sum_({key})" if pair else f"sum_{key}"
            lines.append(tidy(f"    readout {r.name}{value} = {summed} ({spec_text(r.query.expr)}) * {when}[{axes}]"))
    for name, oa in view.outputs.items():
        lines.append(f"  output {name}{_idx(oa.indices)} = {tidy(oa.expr)}")
    for form, why in analysis.unavailable.items():
        lines.append(f"  no {form} form: {tidy(why)}")
    return "\n".join(lines)
