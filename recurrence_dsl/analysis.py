"""Symbolic analysis of the composed step: is each state's update affine in the
states, what is its transition `A_t` and injection `B_t`, how do outputs read
the states, and which forms (recurrent, scan, chunked, parallel) follow.

For a state S[a, b] the update is linearised into
    S_t[a, b] = d(a, b) * S_{t-1}[a, b]                     (diagonal terms)
              + sum_{a'} m(a, a') * S_{t-1}[a', b]          (row mixing)
              + B(a, b)                                      (injection)
and classified by the shape of d and m (DESIGN.md, "Transition classes").
Outputs are split into readouts `sum_{a} q(a) * S[a, b]` (linear in one state)
combined by an arbitrary state-free expression.
"""

from __future__ import annotations

import enum
import itertools
import re
from dataclasses import dataclass, field, replace

import sympy

from .check import CheckedRecurrence
from .printing import function_name, spec_text
from .shift import ShiftPlan, split_shift_states
from .step_ir import (
    NEW_SUFFIX,
    STAGE_SUFFIX,
    Definition,
    StepIR,
    build_step_ir,
    has_infinity,
    index_symbol,
    logsigmoid,
    sigmoid,
    tree_size,
)


class TransitionClass(enum.Enum):
    # A state overwritten at every step from the step's inputs and the previous values of other shift states only
    # (`klast[i] = k[i]`, a token shift's cache; a short convolution's window): its previous value is the inputs
    # shifted along T, computed for every step at once outside the recurrence (recurrence_dsl/shift.py), so it
    # counts for no form (it comes first: the recurrence's class is that of its other states).
    SHIFT = "shift"
    IDENTITY = "identity"
    SCALAR = "scalar"
    DIAGONAL_ROW = "diagonal-row"
    DIAGONAL_COL = "diagonal-col"
    ELEMENTWISE = "elementwise"
    # Several states of one shape whose updates read each other element by element (a cascade of diagonal
    # decays, a complex diagonal as real and imaginary states): per element, (s_1, ..., s_m)_t = A_t (...)_(t-1)
    # + b_t with A_t an m x m block, so the scan's combine (A1, b1) . (A2, b2) = (A2 A1, A2 b1 + b2) applies.
    COUPLED_ELEMENTWISE = "coupled-elementwise"
    RANK_ONE_UPDATE = "rank-one-update"
    # r rank-one delta updates of one state per step, the state assigned r times (DeltaProduct, Siems et al.
    # 2025): A_t = (I - beta_r k_r k_r^T) D_r ... (I - beta_1 k_1 k_1^T) D_1, a product of r generalised
    # Householder factors. Its chunked form runs the r updates as r consecutive delta-rule steps.
    RANK_R_UPDATE = "rank-r-update"
    DIAGONAL_PLUS_RANK_ONE = "diagonal-plus-rank-one"  # (D + b a^T) S, as in RWKV-7
    GENERAL = "general"
    NON_LINEAR = "non-linear"


# From least to most general; a recurrence's class is the most general over its states.
_ORDER = list(TransitionClass)
_DIAGONAL = {TransitionClass.IDENTITY, TransitionClass.SCALAR, TransitionClass.DIAGONAL_ROW,
             TransitionClass.DIAGONAL_COL, TransitionClass.ELEMENTWISE, TransitionClass.COUPLED_ELEMENTWISE}
FORMS = ("recurrent", "scan", "chunked", "parallel")


# The most characters of an expression a reason quotes: an sLSTM gate written out is thousands.
_LONGEST_QUOTED = 160


def readable_dummies(text: str) -> str:
    """Summation indices the IR numbers (`e__2`) written as `recdsl show` writes them everywhere (`e_2`): one
    spelling in the step lines and in the reasons that quote the same expression."""
    return re.sub(r"([A-Za-z])__(\d+)", r"\1_\2", text)


def _shown(expr: sympy.Expr) -> str:
    """`expr` as a reason quotes it: a state's value from this step (`c__new`, the step IR's name) written `c_t` and
    a summation index `e__2` written `e_2`, as the step lines write them, and a long expression cut to its first
    _LONGEST_QUOTED characters."""
    text = readable_dummies(re.sub(rf"(\w+){NEW_SUFFIX}\b", r"\1_t", spec_text(expr)))
    return text if len(text) <= _LONGEST_QUOTED else text[:_LONGEST_QUOTED] + " ..."


class NonLinear(Exception):
    """The expression is not affine in the states; the message says why."""


@dataclass(frozen=True)
class LinearTerm:
    """`coeff * state[indices]`, summed over `bound` (index symbols introduced by enclosing sums)."""

    coeff: sympy.Expr
    bound: tuple[sympy.Symbol, ...]
    state: str  # base name, S or S__new
    indices: tuple[sympy.Expr, ...]

    @property
    def base(self) -> str:
        return self.state.removesuffix(NEW_SUFFIX)

    @property
    def reads_new(self) -> bool:
        return self.state.endswith(NEW_SUFFIX)


def _state_of(node, states: set[str]) -> str | None:
    if isinstance(node, sympy.Indexed) and str(node.base) in states:
        return str(node.base)
    if isinstance(node, sympy.Symbol) and node.name in states:
        return node.name
    return None


def _mentions(expr: sympy.Expr, states: set[str]) -> bool:
    for node in sympy.preorder_traversal(expr):
        if _state_of(node, states):
            return True
    return False


def linearize(expr: sympy.Expr, states: set[str]) -> tuple[sympy.Expr, list[LinearTerm]]:
    """Split `expr` into (state-free part, linear terms). Raises `NonLinear` with the reason."""
    if not _mentions(expr, states):
        return expr, []
    name = _state_of(expr, states)
    if name is not None:
        indices = tuple(expr.indices) if isinstance(expr, sympy.Indexed) else ()
        return sympy.Integer(0), [LinearTerm(sympy.Integer(1), (), name, indices)]
    if isinstance(expr, sympy.Add):
        const, terms = sympy.Integer(0), []
        for arg in expr.args:
            c, t = linearize(arg, states)
            const += c
            terms += t
        return const, terms
    if isinstance(expr, sympy.Mul):
        dependent = [a for a in expr.args if _mentions(a, states)]
        free = sympy.Mul(*[a for a in expr.args if not _mentions(a, states)])
        if len(dependent) > 1:
            raise NonLinear(f"a product of two state-dependent factors: {_paren(dependent[0], _shown)} * "
                            f"{_paren(dependent[1], _shown)}")
        c, terms = linearize(dependent[0], states)
        const = free * c if c != 0 else sympy.Integer(0)  # (not oo * 0 = nan for a factor 1e999)
        return const, [LinearTerm(free * t.coeff, t.bound, t.state, t.indices) for t in terms]
    if isinstance(expr, sympy.Sum):
        c, terms = linearize(expr.function, states)
        bound = tuple(limit[0] for limit in expr.limits)
        const = sympy.Sum(c, *expr.limits) if c != 0 else sympy.Integer(0)
        return const, [LinearTerm(t.coeff, bound + t.bound, t.state, t.indices) for t in terms]
    if isinstance(expr, sympy.Pow):
        if _mentions(expr.exp, states):
            raise NonLinear(f"a state in an exponent: {_shown(expr)}")
        raise NonLinear(f"a state raised to the power {spec_text(expr.exp)}: {_shown(expr)}")
    if isinstance(expr, sympy.Function) or isinstance(expr, (sympy.Min, sympy.Max)):
        raise NonLinear(f"{function_name(expr)}() applied to a state: {_shown(expr)}")
    raise NonLinear(f"cannot see {_shown(expr)} as affine in the states")


def _free_indices(expr: sympy.Expr, index_set: set[sympy.Symbol]) -> set[sympy.Symbol]:
    return {s for s in expr.free_symbols if s in index_set}


def _split_factors(expr: sympy.Expr, groups: list[set[sympy.Symbol]], index_set: set[sympy.Symbol]):
    """Write `expr` as prod_g part_g * rest, where part_g depends only on indices in groups[g] and rest on
    none; None if some factor mixes groups (the expression does not separate)."""
    parts = [sympy.Integer(1) for _ in groups]
    rest = sympy.Integer(1)
    for factor in sympy.Mul.make_args(sympy.factor_terms(expr)):
        used = _free_indices(factor, index_set)
        if not used:
            rest *= factor
            continue
        for g, group in enumerate(groups):
            if used <= group:
                parts[g] *= factor
                break
        else:
            return None
    return parts, rest


def _exact_log(factor: sympy.Expr) -> sympy.Expr | None:
    """log(factor) where it has a form that is finite for every finite input, else None:
    exp(x) -> x; sigmoid(x) -> logsigmoid(x); 1 - sigmoid(x) -> logsigmoid(-x), as 1 - sigmoid(x) = sigmoid(-x)
    (the "z" gates of GRU and minGRU, Feng et al. 2024, arXiv:2410.01201, sec. 3.1: h_t = (1 - z_t) h_(t-1) + ...,
    whose log is logsigmoid(-x) even where 1 - sigmoid(x) rounds to 0, from x ~ 17 in float32)."""
    if isinstance(factor, sympy.exp):
        return factor.args[0]
    if isinstance(factor, sigmoid):
        return logsigmoid(factor.args[0])
    complement = sympy.expand(1 - factor)
    if isinstance(complement, sigmoid):
        return logsigmoid(-complement.args[0])
    return None


def _as_log(coeff: sympy.Expr) -> tuple[sympy.Expr, bool] | None:
    """log(coeff), and whether that is exact without a positivity check at run time (coeff is a product of
    positive numbers and factors with an exact log: exp(x), sigmoid(x), 1 - sigmoid(x); see `_exact_log`); None
    when coeff is a number that is not positive."""
    factors = sympy.Mul.make_args(coeff)
    numbers = [f for f in factors if f.is_number]
    logs = {f: _exact_log(f) for f in factors if not f.is_number}
    if any(not f.is_positive for f in numbers):
        if len(numbers) == len(factors) or all(v is not None for v in logs.values()):
            return None  # a constant <= 0, or one times positive factors: never positive
        return sympy.log(coeff), False
    if all(v is not None for v in logs.values()):
        parts = [sympy.Float(float(sympy.log(f).evalf())) for f in numbers] + list(logs.values())
        return sympy.Add(*parts), True
    return sympy.log(coeff), False


@dataclass(frozen=True)
class Readout:
    """`R[b] = sum_a q(a) * S[a, b]`: a contraction of one state along its key axis."""

    name: str
    state: str
    exclusive: bool  # reads S_{t-1} (True) or S_t (False)
    query: Definition  # q over the key index
    value_index: sympy.Symbol | None


@dataclass
class ChunkPlan:
    """What the chunked and parallel forms need for one state, in its key/value layout."""

    key_axis: int | None  # state axis contracted by the readouts; None for a scalar state
    k: Definition  # [key]
    v: Definition | None  # [value]; None for a state with no value axis
    decay_axis: str | None  # None, "scalar", "key", "value"
    log_decay: Definition | None
    decay_exact: bool  # log-decay read off exp(...): no positivity needed
    beta: Definition | None  # the rank-one update's strength, None for diagonal classes
    readouts: list[Readout] = field(default_factory=list)
    # diagonal-plus-rank-one: S_t = (D_t + b_t a_t^T) S_{t-1} + k_t v_t^T; a reads the state, b writes it back
    mix_read: Definition | None = None  # a [key]
    mix_write: Definition | None = None  # b [key]
    # A 3-axis state S[X, Y, V] held as S[X * Y, V]: its first two axes (the pair) flattened row-major into one key
    # axis. Then k, a key-axis log decay and every readout's query are Definitions over the pair's two indices
    # (k[a, b], q[a, b]), which the forms build as [X, Y] tensors and flatten (see `_plan_pair_chunks`).
    pair: bool = False
    # rank-r update: the plan of each of the r delta-rule sub-steps, in order (each with its own k, v, beta and
    # log decay, on its own decay axis; `decay_axis` above is the most general of theirs, and k, v, beta and
    # log_decay above are the first sub-step's). A diagonal decay with an injection that is a sum of r outer
    # products (`_plan_sum_of_outer`): the linear plan of each, the decay on the first only (k, v and log_decay
    # above are the first's). Empty for every other plan.
    sub_steps: tuple[ChunkPlan, ...] = ()


@dataclass
class StateAnalysis:
    name: str
    dims: tuple
    cls: TransitionClass
    reason: str  # why this class, in words
    indices: tuple[sympy.Symbol, ...] = ()
    diagonal: sympy.Expr | None = None  # d(a, b) for diagonal classes
    injection: sympy.Expr | None = None  # B(a, b)
    rank_one: tuple[sympy.Expr, sympy.Expr] | None = None  # (beta, k(a)) of a rank-one update
    plus_rank_one: tuple[sympy.Expr, sympy.Expr] | None = None  # (b(row), a(row)) of (D + b a^T)
    chunk: ChunkPlan | None = None
    chunk_reason: str = ""
    block: Block | None = None  # the coupled-elementwise block this state belongs to
    # rank-r update: each assignment of the state as its own rank-one update (r = len(stages)), in order
    stages: tuple[StateAnalysis, ...] = ()

    @property
    def rank(self) -> int:
        """r of a rank-r update (the number of rank-one factors per step); 1 for a rank-one update, else 0."""
        if self.cls is TransitionClass.RANK_R_UPDATE:
            return len(self.stages)
        return 1 if self.cls in (TransitionClass.RANK_ONE_UPDATE, TransitionClass.DIAGONAL_PLUS_RANK_ONE) else 0


@dataclass(frozen=True)
class Block:
    """States coupled element by element: for every element (`indices`), new[r] = sum_c matrix[r][c] * old[c]
    + injection[r], with every state read at the same element, and reads of another state's new value composed
    away (so `matrix` and `injection` are in terms of the previous step's states only)."""

    states: tuple[str, ...]
    indices: tuple[sympy.Symbol, ...]
    matrix: tuple[tuple[sympy.Expr, ...], ...]
    injection: tuple[sympy.Expr, ...]


@dataclass
class OutputAnalysis:
    name: str
    indices: tuple[sympy.Symbol, ...]
    expr: sympy.Expr  # with readout placeholders R0, R1, ... where readouts were found
    readouts: list[Readout]
    residual_state: bool  # reads a state other than through chunkable readouts
    residual_reason: str = ""  # why, where a more precise word than the generic one exists


@dataclass
class Analysis:
    recurrence: CheckedRecurrence
    ir: StepIR
    states: dict[str, StateAnalysis]
    outputs: dict[str, OutputAnalysis]
    forms: tuple[str, ...]
    unavailable: dict[str, str]  # form -> why not
    # Where the chunked and parallel forms only exist with some [X, Y] states read as their transposes
    # (a spec in the papers' S[V, K] convention, contracting the second axis): the analysis of that layout.
    # Its states and outputs are in the transposed layout; the forms transpose those states in and out.
    chunk_view: Analysis | None = None
    transposed: tuple[str, ...] = ()
    # States the chunked and parallel forms hold with an extra leading axis of size 1 (its key axis): a 0-axis
    # state n as n[1] ("scalar": a running count is a key-only state with k = its injection), and a vector
    # state h[D] read elementwise as h[1, D] ("row": y[d] = h[d] is the readout sum(u, 1 * h[u, d]), and a
    # per-channel decay of h becomes a value-axis decay). Name -> "scalar" or "row".
    lifted: dict[str, str] = field(default_factory=dict)
    # Where some states are shift states (`TransitionClass.SHIFT`): the plan that computes their previous values by
    # shifting the inputs along T, and the analysis of the rest of the recurrence (`shift.inner`, those values
    # as inputs), whose forms are this analysis' forms and from which the forms are generated.
    shift: ShiftPlan | None = None
    inner: Analysis | None = None

    def __post_init__(self):
        # The reasons are shown as they are (show, check, a form's CallError, the generated module's spec): with
        # explain's tidy of the IR's internal names (i__2 -> i_2). (Imported here: explain imports this module.)
        from .explain import tidy

        self.unavailable = {form: tidy(why) for form, why in self.unavailable.items()}

    @property
    def chunk_analysis(self) -> Analysis:
        """The analysis the chunked and parallel forms are built from (this one, or its transposed view)."""
        return self.chunk_view if self.chunk_view is not None else self

    @property
    def cls(self) -> TransitionClass:
        classes = [s.cls for s in self.states.values() if s.cls is not TransitionClass.SHIFT]
        if not classes:
            return TransitionClass.IDENTITY
        worst = max(classes, key=_ORDER.index)
        # A diagonal-row state next to a diagonal-col one: no single diagonal axis.
        if {TransitionClass.DIAGONAL_ROW, TransitionClass.DIAGONAL_COL} <= set(classes) and worst in (
                TransitionClass.DIAGONAL_ROW, TransitionClass.DIAGONAL_COL):
            return TransitionClass.ELEMENTWISE
        return worst


def _classify_state(ir: StepIR, name: str, dims: tuple, state_names: set[str]) -> StateAnalysis:
    update = ir.updates[name]
    target = update.indices
    try:
        const, terms = linearize(update.expr, state_names)
    except NonLinear as err:
        return StateAnalysis(name, dims, TransitionClass.NON_LINEAR,
                             f"the update of {name} is not affine in the states: {err}", target)
    index_set = set(ir.ranges)
    others = sorted({t.base for t in terms if t.base != name})
    if others:
        return StateAnalysis(name, dims, TransitionClass.GENERAL,
                             f"the update of {name} reads another state ({', '.join(others)})", target, None, const)
    diagonal = sympy.Integer(0)
    mixing: list[LinearTerm] = []
    for t in terms:
        if not t.bound and tuple(t.indices) == tuple(target):
            diagonal += t.coeff
        else:
            mixing.append(t)
    diagonal = sympy.simplify(diagonal) if diagonal.has(sympy.Sum) else diagonal
    used = _free_indices(diagonal, index_set)
    if not mixing:
        if diagonal == 0:
            return StateAnalysis(name, dims, TransitionClass.GENERAL,
                                 f"{name} is overwritten each step (its transition is zero)", target, diagonal, const)
        if diagonal == 1:
            cls, why = TransitionClass.IDENTITY, f"{name} is carried unchanged plus an injection"
        elif not used:
            cls, why = TransitionClass.SCALAR, f"{name} is scaled by the scalar {spec_text(diagonal)}"
        elif len(target) >= 1 and used == {target[0]}:
            cls, why = TransitionClass.DIAGONAL_ROW, f"row {target[0]} of {name} is scaled by {spec_text(diagonal)}"
        elif len(target) >= 2 and used == {target[1]}:
            cls, why = TransitionClass.DIAGONAL_COL, f"column {target[1]} of {name} is scaled by {spec_text(diagonal)}"
        else:
            cls, why = TransitionClass.ELEMENTWISE, f"each element of {name} is scaled by {spec_text(diagonal)}"
        return StateAnalysis(name, dims, cls, why, target, diagonal, const)
    if len(target) == 3:
        return _classify_pair_mixing(ir, name, dims, target, diagonal, mixing, const)
    # Row mixing: every mixing term must be sum_{a'} m(a, a') S[a', b].
    if len(target) not in (1, 2):
        return StateAnalysis(name, dims, TransitionClass.GENERAL,
                             f"{name} mixes its elements and has {len(target)} axes", target, None, const)
    row = target[0]
    rest = target[1:]
    m = sympy.Integer(0)
    bound_var = index_symbol("a__mix")
    for t in mixing:
        if len(t.bound) != 1 or tuple(t.indices) != (t.bound[0],) + tuple(rest):
            return StateAnalysis(name, dims, TransitionClass.GENERAL,
                                 f"{name} is mixed in a way that is not a row mixing: {spec_text(t.coeff)} * "
                                 f"{t.state}[{', '.join(map(str, t.indices))}] summed over "
                                 f"{', '.join(map(str, t.bound)) or 'nothing'}", target,
                                 None, const)
        m += t.coeff.xreplace({t.bound[0]: bound_var})
    if rest and rest[0] in m.free_symbols:
        return StateAnalysis(name, dims, TransitionClass.GENERAL,
                             f"the mixing of {name}'s rows depends on the column index {rest[0]}", target, None, const)
    if rest and rest[0] in used:
        return StateAnalysis(name, dims, TransitionClass.GENERAL,
                             f"{name} mixes rows and scales columns", target, None, const)
    # Is it (I - beta k k^T) D with D = diag(d)?  Then m(a, a') = -beta k(a) k(a') d(a').
    erased = ""
    d_at_mix = diagonal.xreplace({row: bound_var})
    ratio = sympy.simplify(m / d_at_mix) if diagonal != 0 else None
    split = _split_factors(ratio, [{row}, {bound_var}], index_set | {bound_var}) if ratio is not None else None
    if split is not None:
        (left, right), scale = split
        probe = index_symbol("a__probe")
        c = sympy.simplify(left.xreplace({row: probe}) / right.xreplace({bound_var: probe}))
        if probe not in c.free_symbols and c != 0:
            k = right.xreplace({bound_var: row})
            beta = sympy.simplify(-scale * c)
            if not _writes_elsewhere(const, k, target, index_set):
                sa = StateAnalysis(name, dims, TransitionClass.RANK_ONE_UPDATE,
                                   f"{name} is updated by (I - beta k k^T) D with beta = {spec_text(beta)}, "
                                   f"k = {spec_text(k)}, D = {spec_text(diagonal)}", target, diagonal, const)
                sa.rank_one = (beta, k)
                return sa
            # The erase is along k but the write k' v^T is along another key: not a delta rule (its chunked form
            # writes along the erased direction), but (D - beta k (D k)^T) S + k' v^T is D + b a^T, with D = 1 (a
            # log decay of 0), a scalar or a key decay: the diagonal-plus-rank-one class below.
            erased = f"; it erases along {spec_text(k)} and writes along another key, so it is no delta rule"
    # Otherwise (D + b a^T): m(a, a') = b(a) a(a'), any two vectors (RWKV-7's generalised delta rule).
    split = _split_factors(m, [{row}, {bound_var}], index_set | {bound_var})
    if split is not None:
        (left, right), scale = split
        write, read = scale * left, right.xreplace({bound_var: row})
        sa = StateAnalysis(name, dims, TransitionClass.DIAGONAL_PLUS_RANK_ONE,
                           f"{name} is updated by (D + b a^T) with D = {spec_text(diagonal)}, b = {spec_text(write)}, "
                           f"a = {spec_text(read)}{erased}", target, diagonal, const)
        sa.plus_rank_one = (write, read)
        return sa
    other_row = index_symbol(f"{row}'")  # the summed row, shown as i' in m(i, i')
    return StateAnalysis(name, dims, TransitionClass.GENERAL,
                         f"{name} mixes its rows by m({row}, {other_row}) = "
                         f"{spec_text(m.xreplace({bound_var: other_row}))} "
                         "(not a diagonal plus a (I - beta k k^T) rank-one update)",
                         target, None, const)


def _writes_elsewhere(injection: sympy.Expr, direction: sympy.Expr, target: tuple, index_set: set) -> bool:
    """Whether a rank-one update's injection is an outer product k'(a) v(b) (over the state's axes `target`) whose
    key k' is not along the update's direction k(a): then the update is no delta rule, whose chunked form needs
    B = k(a) y(b) (see `_plan_chunks`). False where the injection is along k, zero, or no outer product at all
    (which no chunked form takes, and `_plan_chunks` says so)."""
    groups = [{target[0]}] + ([{target[1]}] if len(target) > 1 else [])
    split = _split_factors(injection, groups, index_set)
    if split is None:
        return False
    parts, scale = split
    return target[0] in sympy.simplify(scale * parts[0] / direction).free_symbols


def _classify_pair_mixing(ir: StepIR, name: str, dims: tuple, target: tuple, diagonal: sympy.Expr,
                          mixing: list[LinearTerm], const: sympy.Expr) -> StateAnalysis:
    """A 3-axis state S[a, b, j] that mixes its pairs (a, b): a rank-one delta update over the flattened pair,
    `S_t[a, b, j] = D(a, b) S[a, b, j] - beta k(a, b) sum(c, d, k(c, d) D(c, d) S[c, d, j]) + B(a, b, j)`
    (DeltaNet on a second-order feature map, as in Based's Taylor state with the delta rule), which the chunked
    form runs on S held as [X * Y, V] (`_plan_pair_chunks`); anything else is general, with the reason."""
    a, b, j = target
    index_set = set(ir.ranges)
    mix = (index_symbol("a__mix0"), index_symbol("a__mix1"))
    m = sympy.Integer(0)
    for t in mixing:
        pair = tuple(t.indices[:2])
        if (len(t.indices) != 3 or t.indices[2] != j or j in t.bound or len(set(pair)) != 2
                or not set(pair) <= set(t.bound)):
            return StateAnalysis(name, dims, TransitionClass.GENERAL,
                                 f"{name} mixes its elements other than along its first two axes together "
                                 f"({spec_text(t.coeff)} * {t.state}[{', '.join(map(str, t.indices))}] summed over "
                                 f"{', '.join(map(str, t.bound)) or 'nothing'})",
                                 target, None, const)
        extra = [(x, 0, ir.ranges[x] - 1) for x in t.bound if x not in pair]
        m += (sympy.Sum(t.coeff, *extra) if extra else t.coeff).xreplace(dict(zip(pair, mix)))
    shown = m.xreplace(dict(zip(mix, (index_symbol(f"{a}'"), index_symbol(f"{b}'")))))  # the summed pair as a', b'
    general = StateAnalysis(name, dims, TransitionClass.GENERAL,
                            f"{name} mixes its pairs ({a}, {b}) by m({a}, {b}, {a}', {b}') = {spec_text(shown)} "
                            "(not a (I - beta k k^T) D rank-one update over the pair)", target, None, const)
    used = _free_indices(diagonal, index_set)
    if diagonal == 0 or j in used or j in m.free_symbols:
        return general
    ratio = sympy.simplify(m / diagonal.xreplace({a: mix[0], b: mix[1]}))
    split = _split_factors(ratio, [{a, b}, set(mix)], index_set | set(mix))
    if split is None:
        return general
    (left, right), scale = split
    probe = (index_symbol("a__probe0"), index_symbol("a__probe1"))
    c = sympy.simplify(left.xreplace(dict(zip((a, b), probe))) / right.xreplace(dict(zip(mix, probe))))
    if set(probe) & c.free_symbols or c == 0:
        return general
    k, beta = right.xreplace(dict(zip(mix, (a, b)))), sympy.simplify(-scale * c)
    sa = StateAnalysis(name, dims, TransitionClass.RANK_ONE_UPDATE,
                       f"{name} is updated by (I - beta k k^T) D over its pair ({a}, {b}) flattened, with beta = "
                       f"{spec_text(beta)}, k = {spec_text(k)}, D = {spec_text(diagonal)}", target, diagonal, const)
    sa.rank_one = (beta, k)
    return sa


def _classify_stages(rec: CheckedRecurrence, ir: StepIR, sa: StateAnalysis, state_names: set[str]) -> StateAnalysis:
    """A state assigned more than once per step whose composed update is `general`: if every assignment, read
    on its own (`StepIR.stages`), is a rank-one delta update (I - beta_n k_n k_n^T) D_n S + beta_n k_n v_n^T, or
    a decay alone (S = exp(g) S, a scalar or per-row one, folded into the next update's D_n), the state has a
    rank-r update (DeltaProduct), r the number of delta updates; otherwise `sa` with the first assignment that
    is neither named at its line:col in its reason."""
    name = sa.name
    stages = ir.stages.get(name)
    if not stages or sa.cls is not TransitionClass.GENERAL:
        return sa
    # Values between two assignments of any state read as other states: a stage reading one is not rank-one.
    between = {f"{s}{STAGE_SUFFIX}{n}" for s, defs in ir.stages.items() for n in range(len(defs))}
    spans = [st.span for st in rec.statements if st.target.name == name]
    found = []
    pending = sympy.Integer(1)  # decays written as assignments of their own, for the next delta update's D
    pending_at: tuple[sympy.Symbol, ...] = ()
    for n, stage in enumerate(stages):
        one = _classify_state(StepIR(ir.statements, {name: stage}, {}, ir.ranges, ir.sizes), name, sa.dims,
                              state_names | between)
        where = f"assignment {n + 1} of {name} (at {spans[n].line}:{spans[n].column})"
        decay_only = one.cls in (TransitionClass.IDENTITY, TransitionClass.SCALAR, TransitionClass.DIAGONAL_ROW) \
            and one.injection == 0
        if decay_only and n + 1 < len(stages):
            pending = pending * one.diagonal.xreplace(dict(zip(one.indices, pending_at or one.indices)))
            pending_at = pending_at or one.indices
            continue
        if one.cls is not TransitionClass.RANK_ONE_UPDATE:
            why = one.reason.replace(f"{STAGE_SUFFIX}0", " (the previous step's value)")
            sa.reason += (f"; read as {len(stages)} assignments, {where} is {_article(one.cls.value)} "
                          f"{one.cls.value} update, not a rank-one delta update nor a decay before one ({why})")
            return sa
        if pending != 1:
            # (I - beta k k^T) D_n (D' S): D' joins D_n, renamed to this assignment's own indices
            one.diagonal = one.diagonal * pending.xreplace(dict(zip(pending_at, one.indices)))
            one.reason += f", after the decay {spec_text(pending)} of the assignment before"
            pending, pending_at = sympy.Integer(1), ()
        found.append(one)
    r = len(found)
    if r < 2:
        return sa
    parts = "; ".join(f"{n + 1}: beta = {spec_text(one.rank_one[0])}, k = {spec_text(one.rank_one[1])}, "
                      f"D = {spec_text(one.diagonal)}"
                      for n, one in enumerate(found))
    rank_r = StateAnalysis(name, sa.dims, TransitionClass.RANK_R_UPDATE,
                           f"{name} is updated by r = {r} rank-one delta updates per step, "
                           f"prod_n (I - beta_n k_n k_n^T) D_n ({parts})", found[0].indices)
    rank_r.stages = tuple(found)
    return rank_r


# ---------------------------------------------------------------------------------------------------------
# A rank-r update written as one assignment: its transition factored into r generalised Householder factors
# ---------------------------------------------------------------------------------------------------------


def _sum_depth(expr: sympy.Expr) -> int:
    """How deeply sums nest in `expr` (0 for none)."""
    if isinstance(expr, sympy.Sum):
        return 1 + max((_sum_depth(s) for s in expr.function.atoms(sympy.Sum)), default=0)
    return max((_sum_depth(s) for s in expr.atoms(sympy.Sum)), default=0)


def _canonical(expr: sympy.Expr, made: dict[sympy.Symbol, sympy.Expr]) -> sympy.Expr:
    """`expr` expanded into monomials, every sum split over the terms of its body with the factors free of its
    index taken out, and its index renamed after its range and nesting depth (`c1__K`, recorded in `made` with its
    size): so a dot product reads the same wherever it was written, `Sum(k1[c1__K] * k2[c1__K], ...)`, and two
    transitions are equal exactly when their difference expands to 0."""
    if not expr.has(sympy.Sum):
        return sympy.expand(expr)
    if not isinstance(expr, sympy.Sum):
        return sympy.expand(expr.func(*[_canonical(a, made) for a in expr.args]))
    body = _canonical(expr.function, made)
    for var, low, high in expr.limits:  # sum(a, b, f) is sum(b, sum(a, f)): one index at a time, innermost first
        size = high - low + 1
        depth = 1 + max((_sum_depth(s) for s in body.atoms(sympy.Sum)), default=0)
        dummy = index_symbol(f"c{depth}__" + "".join(ch if ch.isalnum() else "_" for ch in str(size)))
        made[dummy] = size
        body = body.xreplace({var: dummy})
        total = sympy.Integer(0)
        for term in sympy.Add.make_args(body):
            factors = sympy.Mul.make_args(term)
            inside = [f for f in factors if dummy in f.free_symbols]
            outside = sympy.Mul(*[f for f in factors if dummy not in f.free_symbols])
            total += outside * (sympy.Sum(sympy.Mul(*inside), (dummy, low, high)) if inside else size)
        body = sympy.expand(total)
    return body


_ATOM = index_symbol("x__atom")


def _atomize(expr: sympy.Expr, index_set: set[sympy.Symbol], atoms: dict[sympy.Expr, sympy.IndexedBase],
             value: sympy.Symbol | None = None) -> sympy.Expr:
    """`expr` with every sum of terms over one index other than `value` (a feature map `elu(k[i]) + 1`, a shifted
    key) held as one vector `vec__n[i]` (its sign taken out, `atoms` maps each to its value at `x__atom`), so that
    expanding a transition does not split a key into pieces that are no keys; `_restore` puts them back. (Sums over
    the value axis are left to expand: the values solved for must cancel term by term.)"""
    def atom(e: sympy.Expr) -> sympy.Expr:
        (index,) = _free_indices(e, index_set)
        sign = -1 if e.could_extract_minus_sign() else 1
        at = (sign * e).xreplace({index: _ATOM})
        return sign * atoms.setdefault(at, sympy.IndexedBase(f"vec__{len(atoms)}"))[index]

    def vector(e: sympy.Expr) -> bool:
        used = _free_indices(e, index_set) if isinstance(e, sympy.Add) else set()
        return len(used) == 1 and value not in used

    return expr.replace(vector, atom)


def _restore(expr: sympy.Expr, atoms: dict[sympy.Expr, sympy.IndexedBase]) -> sympy.Expr:
    """`expr` with the vectors of `_atomize` written out again."""
    back = {base: value for value, base in atoms.items()}
    for _ in range(len(atoms) + 1):  # (an atom's value may hold an earlier atom)
        if not any(isinstance(e, sympy.Indexed) and e.base in back for e in sympy.preorder_traversal(expr)):
            break
        expr = expr.replace(lambda e: isinstance(e, sympy.Indexed) and e.base in back,
                            lambda e: back[e.base].xreplace({_ATOM: e.indices[0]}))
    return expr


def _outer_terms(expr: sympy.Expr, left: sympy.Symbol, right: sympy.Symbol,
                 index_set: set[sympy.Symbol]) -> list[tuple[sympy.Expr, sympy.Expr, sympy.Expr]] | str:
    """The monomials of a canonical `expr` (see `_canonical`) as (scalar, factor in `left`, factor in `right`)
    triples, so `expr = sum scalar * l(left) * r(right)`; or, where a monomial mixes the two, why not."""
    found = []
    for monomial in sympy.Add.make_args(expr):
        parts = {"scalar": sympy.Integer(1), left: sympy.Integer(1), right: sympy.Integer(1)}
        for factor in sympy.Mul.make_args(monomial):
            used = _free_indices(factor, index_set)
            if len(used) > 1 or not used <= {left, right}:
                return f"its term {spec_text(monomial)} is no product of a vector over {left} and one over {right}"
            parts[next(iter(used)) if used else "scalar"] *= factor
        found.append((parts["scalar"], parts[left], parts[right]))
    return found


def _product_of_factors(name: str, keys: list[sympy.Expr], betas: list[sympy.Expr]) -> str:
    """(I - beta_r k_r k_r^T) ... (I - beta_1 k_1 k_1^T) in words, the first factor (applied first) rightmost."""
    return "".join(f"(I - {_paren(b)} {spec_text(k)} {spec_text(k)}^T)" for b, k in reversed(list(zip(betas, keys))))


def _paren(e: sympy.Expr, show=spec_text) -> str:
    """`e` as `show` writes it, in parentheses where it is a sum (a factor of a product)."""
    return f"({show(e)})" if isinstance(e, sympy.Add) else show(e)


# The largest composed update (in tree nodes) that `_factor_rank_r` expands: its monomials double with each factor,
# and r = 6 Householder factors with a decay (about 2100 nodes) take a few seconds.
_MAX_FACTORED = 2500


def _factor_rank_r(rec: CheckedRecurrence, ir: StepIR, sa: StateAnalysis, state_names: set[str]) -> StateAnalysis:
    """A matrix state whose composed update is `general` but linear in it, `S_t = A_t S_(t-1) + B_t` with
    `A_t = (I + sum_pq C_pq k_p k_q^T) D_t`: if `A_t` is a product of r >= 2 generalised Householder factors
    `(I - beta_r k_r k_r^T) ... (I - beta_1 k_1 k_1^T) D_t` and `B_t` lies along the keys, the state has a rank-r
    update (DeltaProduct, Siems et al. 2025, Sec. 3) though it is assigned once, its r updates written as one
    expression: `S + b1 k1 u1 + b2 k2 u2` with `u2` reading the once-updated state, or the first update's result
    substituted into the second.

    How the factors are found: the mixing `m(a, a')` (sums over other indices kept as dot products) divided by
    the decay `D_t(a')` is expanded into monomials `c l(a) r(a')`; a monomial with `l = r` names a key `k_p`
    with `C_pp = -beta_p`, and a cross term `k_p k_q^T` (`p != q`) puts factor p after factor q. The product of
    the factors in that order is expanded and compared with every `C_pq` (dot products as canonical sums), and
    the injection `B_t = sum_p k_p w_p^T` is solved for each update's value: with
    `B_t = sum_n H_r ... H_(n+1) beta_n k_n v_n^T`, the coefficient of `k_n` gives `v_n` once `v_1 .. v_(n-1)`
    are known. A body with two or more keys that fails any step keeps `sa` (its class) and its reason says why,
    at the assignment's line:col. The result carries one rank-one `StateAnalysis` per factor (`stages`, the
    decay on the first), which the multi-assignment path's chunk plan (`_plan_rank_r`) takes as it is."""
    name = sa.name
    if sa.cls is not TransitionClass.GENERAL or len(sa.dims) != 2:
        return sa
    update = ir.updates[name]
    if tree_size(update.expr) > _MAX_FACTORED:
        return sa
    try:
        const, terms = linearize(update.expr, state_names)
    except NonLinear:
        return sa
    if any(t.base != name or t.reads_new for t in terms):
        return sa
    row, col = update.indices
    index_set = set(ir.ranges)
    mix = index_symbol("a__mix")
    diagonal, mixing = sympy.Integer(0), sympy.Integer(0)
    for t in terms:
        if not t.bound and tuple(t.indices) == (row, col):
            diagonal += t.coeff
            continue
        # sum(x, extra..., c(a, x, extra) * S[x, b]): a row mixing, the other sums dot products inside m(a, x)
        if len(t.indices) != 2 or t.indices[1] != col or t.indices[0] not in t.bound or col in t.bound:
            return sa
        extra = [(b, 0, ir.ranges[b] - 1) for b in t.bound if b != t.indices[0]]
        coeff = sympy.Sum(t.coeff, *extra) if extra else t.coeff
        mixing += coeff.xreplace({t.indices[0]: mix})
    if diagonal == 0 or mixing == 0 or col in _free_indices(diagonal, index_set) or col in mixing.free_symbols:
        return sa
    made: dict[sympy.Symbol, sympy.Expr] = {}
    atoms: dict[sympy.Expr, sympy.IndexedBase] = {}
    ratio = _atomize(mixing / diagonal.xreplace({row: mix}), index_set | {mix}, atoms)
    found = _outer_terms(_canonical(ratio, made), row, mix, index_set | {mix})
    if isinstance(found, str):
        return sa
    keys: list[sympy.Expr] = []
    for _, left, right in found:
        if left.xreplace({row: mix}) == right and left not in keys:
            keys.append(left)
    if len(keys) < 2:
        return sa
    where = f"at {_where(rec, name)}"
    shown = ", ".join(spec_text(_restore(k, atoms)) for k in keys)

    def near_miss(why: str) -> StateAnalysis:
        sa.reason += (f"; {where}, its transition mixes rows along the {len(keys)} keys {shown} but is not a "
                      f"product of {len(keys)} (I - beta k k^T) factors, so no rank-r update: {why}")
        return sa

    coeffs: dict[tuple[int, int], sympy.Expr] = {}
    for scalar, left, right in found:
        p, q = left, right.xreplace({mix: row})
        if p not in keys or q not in keys:
            return near_miss(f"its term {spec_text(scalar * left * right)} is not k_p[{row}] k_q[{mix}] for two "
                             "of the keys")
        coeffs[keys.index(p), keys.index(q)] = coeffs.get((keys.index(p), keys.index(q)), 0) + scalar
    r = len(keys)
    # A later factor's key multiplies an earlier one's in the cross terms: count the keys each one follows.
    follows = [sum(1 for q in range(r) if q != p and coeffs.get((p, q), 0) != 0) for p in range(r)]
    if sorted(follows) != list(range(r)):
        for p, q in itertools.combinations(range(r), 2):
            both = [coeffs.get((x, y), 0) != 0 for x, y in ((p, q), (q, p))]
            if all(both) or not any(both):
                return near_miss(f"it has {'cross terms both ways' if all(both) else 'no cross term'} between "
                                 f"{spec_text(keys[p])} and {spec_text(keys[q])}, where a product of their two factors "
                                 "has one, "
                                 "beta_p beta_q (k_p . k_q) k_p k_q^T with factor p after factor q")
        return near_miss("its cross terms k_p k_q^T do not order the keys as the factors of a product")
    order = sorted(range(r), key=follows.__getitem__)
    keys = [keys[p] for p in order]
    coeffs = {(order.index(p), order.index(q)): c for (p, q), c in coeffs.items()}
    betas = [-coeffs[p, p] for p in range(r)]
    size = ir.ranges[row]
    dummy = index_symbol("a__dot")

    def dot(p: int, q: int) -> sympy.Expr:
        return _canonical(sympy.Sum(keys[p].xreplace({row: dummy}) * keys[q].xreplace({row: dummy}),
                                    (dummy, 0, size - 1)), made)

    # The product H_r ... H_1 - I as coefficients of k_p k_q^T: H_n (I + X) = I + X - beta_n k_n (k_n^T + k_n^T X).
    product: dict[tuple[int, int], sympy.Expr] = {}
    for n in range(r):
        step = {(n, n): -betas[n]}
        for (p, q), c in product.items():
            step[n, q] = step.get((n, q), 0) - betas[n] * dot(n, p) * c
        for pq, c in step.items():
            product[pq] = product.get(pq, 0) + c
    factors = _product_of_factors(name, keys, betas)
    for p, q in sorted(set(product) | set(coeffs)):
        expected, got = product.get((p, q), sympy.Integer(0)), coeffs.get((p, q), sympy.Integer(0))
        if _canonical(expected - got, made) != 0:
            term = f"{spec_text(keys[p])} {spec_text(keys[q])}^T"
            return near_miss(f"{factors} has {spec_text(sympy.expand(expected))} * {term}, the update "
                             f"{spec_text(sympy.expand(got)) if got != 0 else 'no such term'}")
    # The injection along the keys: B = sum_p k_p w_p^T.
    along = _outer_terms(_canonical(_atomize(const, index_set, atoms, col), made), row, col, index_set)
    if isinstance(along, str):
        return near_miss(f"its injection {spec_text(const)} is not a sum of outer products k_p[{row}] "
                         f"w_p[{col}] ({along})")
    w = [sympy.Integer(0)] * r
    for scalar, left, right in along:
        if left not in keys:
            return near_miss(f"its injection's term {spec_text(scalar * left * right)} does not lie along one "
                             "of the keys")
        w[keys.index(left)] += scalar * right
    # Solve B = sum_n H_r ... H_(n+1) beta_n k_n v_n^T for v_1, ..., v_r in turn (triangular in the keys).
    values: list[sympy.Expr] = []
    reaching: list[dict[int, sympy.Expr]] = []  # H_r ... H_(n+1) k_n in the keys
    for n in range(r):
        vec = {n: sympy.Integer(1)}
        for m in range(n + 1, r):
            vec[m] = vec.get(m, 0) - betas[m] * sum((c * dot(m, p) for p, c in vec.items()), sympy.Integer(0))
        reaching.append(vec)
    for n in range(r):
        known = sum((betas[m] * reaching[m].get(n, 0) * values[m] for m in range(n)), sympy.Integer(0))
        values.append(_canonical((w[n] - known) / betas[n], made))
    ir.ranges.update(made)  # (the canonical dot products' indices, which the printers look up)
    keys, betas, values = ([_restore(e, atoms) for e in part] for part in (keys, betas, values))
    stages = []
    for n in range(r):
        decay = diagonal if n == 0 else sympy.Integer(1)
        one = StateAnalysis(name, sa.dims, TransitionClass.RANK_ONE_UPDATE,
                            f"update {n + 1} of {name}: (I - beta k k^T) D with beta = {spec_text(betas[n])}, "
                            f"k = {spec_text(keys[n])}, D = {spec_text(decay)}", (row, col), decay,
                            betas[n] * keys[n] * values[n])
        one.rank_one = (betas[n], keys[n])
        stages.append(one)
    parts = "; ".join(f"{n + 1}: beta = {spec_text(betas[n])}, k = {spec_text(keys[n])}, D = {spec_text(one.diagonal)}"
                      for n, one in enumerate(stages))
    rank_r = StateAnalysis(name, sa.dims, TransitionClass.RANK_R_UPDATE,
                           f"{name} is updated by r = {r} rank-one delta updates per step, prod_n (I - beta_n k_n "
                           f"k_n^T) D_n ({parts}), found by factoring the transition of its assignment {where}",
                           (row, col))
    rank_r.stages = tuple(stages)
    return rank_r


def _position(rec: CheckedRecurrence, name: str) -> tuple[int, int]:
    """(line, column) of the statement that last assigns state `name` (its update)."""
    spans = [st.span for st in rec.statements if st.target.name == name] or [rec.span]
    return spans[-1].line, spans[-1].column


def _where(rec: CheckedRecurrence, name: str) -> str:
    """line:col of the statement that last assigns state `name`, for messages."""
    return "{}:{}".format(*_position(rec, name))


def _compose_new_reads(ir: StepIR, expr: sympy.Expr) -> sympy.Expr:
    """`expr` with every read of a state's new value (h__new[d]) replaced by that state's update, so that it
    reads the previous step's states only."""
    for _ in range(len(ir.updates) + 1):
        news = [n for n in sympy.preorder_traversal(expr)
                if (isinstance(n, sympy.Indexed) and str(n.base).endswith(NEW_SUFFIX))
                or (isinstance(n, sympy.Symbol) and n.name.endswith(NEW_SUFFIX))]
        if not news:
            return expr
        mapping = {}
        for n in news:
            name = (str(n.base) if isinstance(n, sympy.Indexed) else n.name).removesuffix(NEW_SUFFIX)
            update = ir.updates[name]
            indices = tuple(n.indices) if isinstance(n, sympy.Indexed) else ()
            mapping[n] = update.expr.xreplace(dict(zip(update.indices, indices)))
        expr = expr.xreplace(mapping)
    return expr


def _couple_states(rec: CheckedRecurrence, ir: StepIR, states: dict[str, StateAnalysis],
                   dims: dict[str, tuple]) -> None:
    """Turn groups of states that read each other element by element into one coupled-elementwise block
    (see `Block`); where a group's coupling is not elementwise, say why at the update's line:col."""
    plain = {s.name for s in rec.states}
    readers = [n for n, sa in states.items() if sa.cls is TransitionClass.GENERAL
               and sa.reason.startswith(f"the update of {n} reads another state")]
    if not readers:
        return
    terms, consts = {}, {}
    group = {n: {n} for n in states}
    for n in readers:
        try:
            consts[n], terms[n] = linearize(_compose_new_reads(ir, ir.updates[n].expr), plain)
        except NonLinear as err:
            states[n].reason += f"; at {_where(rec, n)}, composed with the states it reads: {err}"
            terms[n] = None
            continue
        for t in terms[n]:  # union the groups of n and every state it reads
            merged = group[n] | group[t.base]
            for m in merged:
                group[m] = merged
    done: set[str] = set()
    for n in readers:
        members = tuple(s.name for s in rec.states if s.name in group[n])
        if members[0] in done or any(terms.get(m, ()) is None for m in members):
            continue
        done.update(members)
        why = _block(rec, ir, members, terms, consts, dims)
        if isinstance(why, str):
            for m in members:
                if states[m].cls is TransitionClass.GENERAL:
                    states[m].reason += f"; coupled with {', '.join(x for x in members if x != m)} but {why}, " \
                                        "so no scan form"
            continue
        for r, m in enumerate(members):
            coupled = ", ".join(members)
            states[m] = StateAnalysis(m, dims[m], TransitionClass.COUPLED_ELEMENTWISE,
                                      f"{coupled} are coupled element by element: ({coupled})_t = A_t ({coupled})_(t-1)"
                                      f" + b_t with A_t a {len(members)}x{len(members)} block per element",
                                      why.indices, None, why.injection[r])
            states[m].block = why
            states[m].chunk_reason = (f"{m} has a coupled-elementwise transition (the chunked form takes one state "
                                      "per decay)")


def _block(rec: CheckedRecurrence, ir: StepIR, members: tuple[str, ...], terms: dict, consts: dict,
           dims: dict[str, tuple]) -> Block | str:
    """The block of `members`, or why their coupling has none (at the line:col of the statement at fault)."""
    if len({tuple(dims[m]) for m in members}) > 1:  # each member's shape, in the order the members are named
        return (f"at {_where(rec, members[0])}: the coupled states {', '.join(members)} have different shapes "
                f"({' and '.join(str(list(dims[m])) for m in members)})")
    reads = set(members) | {m + NEW_SUFFIX for m in members}
    for m in sorted(members, key=lambda n: _position(rec, n)):  # each update as written: every read elementwise?
        update = ir.updates[m]
        try:
            _, written = linearize(update.expr, reads)
        except NonLinear as err:
            return f"at {_where(rec, m)}: {err}"
        for t in written:
            if t.bound or tuple(t.indices) != tuple(update.indices):
                shown = f"{t.base}[{', '.join(map(str, t.indices))}]" if t.indices else t.base
                return (f"at {_where(rec, m)}: {m}[{', '.join(map(str, update.indices))}] reads {shown}"
                        + (f" summed over {', '.join(map(str, t.bound))}" if t.bound else "")
                        + ", not the same element")
    target = ir.updates[members[0]].indices
    matrix, injection = [], []
    for m in members:
        update = ir.updates[m]
        rename = dict(zip(update.indices, target))
        if m in terms:
            const, found = consts[m], terms[m]
        else:
            const, found = linearize(update.expr, set(members))
        row = {c: sympy.Integer(0) for c in members}
        for t in found:
            if t.base not in row or t.bound or tuple(t.indices) != tuple(update.indices):
                return f"at {_where(rec, m)}: {m} reads {t.base} other than at the same element"
            row[t.base] += t.coeff.xreplace(rename)
        matrix.append(tuple(row[c] for c in members))
        injection.append(const.xreplace(rename))
    return Block(members, tuple(target), tuple(matrix), tuple(injection))


def _extract_readouts(expr: sympy.Expr, state_names: set[str], counter: list[int]):
    """Replace maximal state-linear subexpressions of an output by readout placeholders. Returns the expression,
    the (placeholder, [term]) pairs, and per placeholder the indices of the sums around it (a readout R[m] inside
    `sum(m, f(R[m]))`, e.g. an RMS norm's sum of squares, is indexed by the outer sum's m)."""
    found: list[tuple[sympy.Expr, list[LinearTerm]]] = []
    enclosing: dict[sympy.Symbol, frozenset] = {}

    def walk(e, around: frozenset):
        if not _mentions(e, state_names):
            return e
        try:
            const, terms = linearize(e, state_names)
        except NonLinear:
            if isinstance(e, sympy.Sum):
                inner = around | {lim[0] for lim in e.limits}
                return e.func(walk(e.function, inner), *e.limits)
            return e.func(*[walk(a, around) for a in e.args])
        replaced = const
        for t in terms:
            symbol = sympy.Symbol(f"R__{counter[0]}")
            counter[0] += 1
            found.append((symbol, [t]))
            enclosing[symbol] = around
            replaced += symbol
        return replaced

    return walk(expr, frozenset()), found, enclosing


def _plan_output(ir: StepIR, name: str, states: dict[str, StateAnalysis], state_names: set[str],
                 counter: list[int]) -> OutputAnalysis:
    out = ir.outputs[name]
    expr, found, enclosing = _extract_readouts(out.expr, state_names, counter)
    readouts: list[Readout] = []
    residual = _mentions(expr, state_names)
    index_set = set(ir.ranges)
    replacements = {}
    residual_reason = ""
    for symbol, (term,) in found:
        sa = states.get(term.base)
        ok = sa is not None and sa.chunk is not None
        summed_value = False  # sum(a, b, q[a] * S[a, b]): the readout R[b], then summed over b
        if ok and sa.chunk.pair:  # a 3-axis state, read over its flattened pair (see _pair_readout)
            found_pair = _pair_readout(ir, name, symbol, term, sa)
            if isinstance(found_pair, tuple):
                readouts.append(found_pair[0])
                replacements[symbol] = found_pair[1]
                continue
            residual_reason = residual_reason or found_pair
            ok = False
        if ok:
            plan = sa.chunk
            key_axis = plan.key_axis
            ok = (len(term.bound) in (1, 2) and key_axis is not None and len(term.indices) == len(sa.dims)
                  and term.indices[key_axis] in term.bound and len(set(term.indices)) == len(term.indices))
        if ok:
            key = term.indices[key_axis]
            others = [b for b in term.bound if b != key]
            value_index = None
            if len(sa.dims) == 2:
                value_index = term.indices[1 - key_axis]
                summed_value = others == [value_index]
                ok = summed_value or (not others and (value_index in set(out.indices)
                                                      or value_index in enclosing[symbol]))
            else:
                ok = not others
        if ok:
            # q(key) times factors free of the key (they may read the output's or the summed value index)
            split = _split_factors(term.coeff, [{key}, index_set - {key}], index_set)
            ok = split is not None
        if not ok:
            residual = True
            replacements[symbol] = term.coeff * (sympy.IndexedBase(term.state)[term.indices] if term.indices
                                                 else sympy.Symbol(term.state))
            if term.bound:
                limits = [(b, 0, ir.ranges[b] - 1) for b in term.bound]
                replacements[symbol] = sympy.Sum(replacements[symbol], *limits)
            continue
        (query_part, outer), rest = split
        rest = outer * rest
        q_index = index_symbol("a__q")
        query = Definition(f"q_{symbol.name}", (q_index,), query_part.xreplace({key: q_index}))
        # The same contraction read again in this output (z[j] / sqrt(sum(m, z[m] * z[m]))) is one readout.
        readout = next((r for r in readouts if r.state == term.base and r.exclusive == (not term.reads_new)
                        and r.query.expr == query.expr and (r.value_index is None) == (value_index is None)), None)
        if readout is None:
            readout = Readout(symbol.name, term.base, not term.reads_new, query, value_index)
            plan.readouts.append(readout)
            readouts.append(readout)
        placeholder = (sympy.IndexedBase(readout.name)[value_index] if value_index is not None
                       else sympy.Symbol(readout.name))
        replacements[symbol] = rest * placeholder
        if summed_value:
            replacements[symbol] = sympy.Sum(replacements[symbol], (value_index, 0, ir.ranges[value_index] - 1))
    return OutputAnalysis(name, out.indices, expr.xreplace(replacements), readouts, residual, residual_reason)


def _plan_chunks(ir: StepIR, sa: StateAnalysis) -> None:
    """Fill `sa.chunk` (key/value layout, k, v, decay, beta) or say in `sa.chunk_reason` why not."""
    if sa.cls is TransitionClass.RANK_R_UPDATE:
        _plan_rank_r(ir, sa)
        return
    if sa.cls not in {TransitionClass.IDENTITY, TransitionClass.SCALAR, TransitionClass.DIAGONAL_ROW,
                      TransitionClass.DIAGONAL_COL, TransitionClass.RANK_ONE_UPDATE,
                      TransitionClass.DIAGONAL_PLUS_RANK_ONE}:
        sa.chunk_reason = f"{sa.name} has {_article(sa.cls.value)} {sa.cls.value} transition"
        return
    if not sa.dims:
        # `analyse` holds it as name[1] when every other state has a chunked form: say so, so that a 0-axis state
        # beside a state with no chunked form is not read as the obstacle.
        sa.chunk_reason = (f"{sa.name} has 0 axes (held as {sa.name}[1] only when every other state has a "
                           "chunked form)")
        return
    if len(sa.dims) not in (1, 2):
        sa.chunk_reason = f"{sa.name} has {len(sa.dims)} axes (the chunked form takes 1 or 2)"
        return
    index_set = set(ir.ranges)
    a = sa.indices[0]
    b = sa.indices[1] if len(sa.indices) == 2 else None
    key_axis = 0
    if sa.cls is TransitionClass.DIAGONAL_COL:
        decay_axis = "value"
    elif sa.cls is TransitionClass.DIAGONAL_ROW:
        decay_axis = "key"
    elif sa.cls is TransitionClass.IDENTITY:
        decay_axis = None
    elif sa.cls is TransitionClass.SCALAR:
        decay_axis = "scalar"
    else:  # rank-one update, diagonal plus rank one: D is identity, scalar or per-row
        used = _free_indices(sa.diagonal, index_set)
        decay_axis = None if sa.diagonal == 1 else ("scalar" if not used else "key")
    injection = sa.injection if sa.injection is not None else sympy.Integer(0)
    groups = [{a}] + ([{b}] if b is not None else [])
    split = _split_factors(injection, groups, index_set)
    if split is None:
        why = _plan_sum_of_outer(ir, sa) if b is not None and sa.cls in _SUMMED else ""
        if why is not None:
            sa.chunk_reason = (f"the injection {spec_text(injection)} of {sa.name} is not an outer product k[a] * v[b]"
                               + (f" nor a sum of them ({why})" if why else ""))
        return
    parts, scale = split
    key_idx, value_idx = index_symbol("a__k"), index_symbol("a__v")
    k_expr = (scale * parts[0]).xreplace({a: key_idx})
    v_def = Definition(f"v_{sa.name}", (value_idx,), parts[1].xreplace({b: value_idx})) if b is not None else None
    beta = None
    if sa.cls is TransitionClass.RANK_ONE_UPDATE:
        beta_expr, direction = sa.rank_one
        # The injection must point along the update's direction k: B = k(a) y(b).
        ratio = sympy.simplify(k_expr / direction.xreplace({a: key_idx}))
        if key_idx in ratio.free_symbols:
            sa.chunk_reason = (f"the injection of {sa.name} is not along the rank-one update's direction "
                               f"{spec_text(direction)}")
            return
        k_expr = direction.xreplace({a: key_idx})
        if v_def is None:
            sa.chunk_reason = f"{sa.name} has no value axis for a rank-one update"
            return
        v_def = Definition(v_def.name, v_def.indices, ratio * v_def.expr)
        beta = Definition(f"beta_{sa.name}", (), beta_expr)
    log_decay = None
    exact = True
    if decay_axis is not None:
        as_log = _as_log(sa.diagonal)
        if as_log is None:
            sa.chunk_reason = (f"the decay {spec_text(sa.diagonal)} of {sa.name} is not positive, and the chunked form "
                               "works with its logarithm")
            return
        log_expr, exact = as_log
        if decay_axis == "key":
            log_decay = Definition(f"log_decay_{sa.name}", (key_idx,), log_expr.xreplace({a: key_idx}))
        elif decay_axis == "value":
            log_decay = Definition(f"log_decay_{sa.name}", (value_idx,), log_expr.xreplace({b: value_idx}))
        else:
            log_decay = Definition(f"log_decay_{sa.name}", (), log_expr)
    sa.chunk = ChunkPlan(key_axis, Definition(f"k_{sa.name}", (key_idx,), k_expr), v_def, decay_axis,
                         log_decay, exact, beta)
    if sa.cls is TransitionClass.DIAGONAL_PLUS_RANK_ONE:
        if v_def is None:
            sa.chunk, sa.chunk_reason = None, f"{sa.name} has no value axis for a diagonal-plus-rank-one update"
            return
        write, read = sa.plus_rank_one
        sa.chunk.mix_write = Definition(f"b_{sa.name}", (key_idx,), write.xreplace({a: key_idx}))
        sa.chunk.mix_read = Definition(f"a_{sa.name}", (key_idx,), read.xreplace({a: key_idx}))


# The classes whose injection may be a sum of outer products (`_plan_sum_of_outer`): a diagonal decay, applied once.
_SUMMED = {TransitionClass.IDENTITY, TransitionClass.SCALAR, TransitionClass.DIAGONAL_ROW, TransitionClass.DIAGONAL_COL}


def _plan_sum_of_outer(ir: StepIR, sa: StateAnalysis) -> str | None:
    """The chunk plan of a matrix state with a diagonal decay (none, scalar, along the keys or the values) whose
    injection is a sum of r >= 2 outer products, `S_t = D_t S_(t-1) + sum_m k_m v_m^T` (Mamba-3's trapezoidal
    step, a bias u[i] = u[i] * 1[j] beside k v^T): by linearity the same as r sub-steps per step, the first
    applying D_t and k_1 v_1^T, each later one a decay of 1 and k_m v_m^T. The plan holds one linear plan per
    outer product (`ChunkPlan.sub_steps`, the decay on the first only), which the chunked form runs as steps
    r t, ..., r t + r - 1 of a sequence r times as long, reading step t's outputs at its last sub-step (a readout of
    S_(t-1) before its first), as a rank-r update's delta-rule sub-steps (`_plan_rank_r`). The outer products
    are the injection's monomials grouped by their key (or by their value, where fewer). Sets `sa.chunk` and
    returns None, or returns why the injection is no such sum ("" for nothing more to say than the caller)."""
    a, b = sa.indices
    index_set = set(ir.ranges)
    for total in sa.injection.atoms(sympy.Sum):
        if {a, b} <= _free_indices(total.function, index_set):  # MIMO's sum(r, B[n, r] * x[p, r])
            over = ", ".join(f"{x} (size {spec_text(high + 1)})" for x, _, high in total.limits)
            return (f"{spec_text(total)} sums outer products over {over}: the chunked form takes a sum of outer "
                    "products written out term by term")
    made: dict[sympy.Symbol, sympy.Expr] = {}
    atoms: dict[sympy.Expr, sympy.IndexedBase] = {}
    found = _outer_terms(_canonical(_atomize(sa.injection, index_set, atoms, b), made), a, b, index_set)
    if isinstance(found, str):
        return found
    by_key: dict[sympy.Expr, sympy.Expr] = {}
    by_value: dict[sympy.Expr, sympy.Expr] = {}
    for scalar, left, right in found:
        by_key[left] = by_key.get(left, sympy.Integer(0)) + scalar * right
        by_value[right] = by_value.get(right, sympy.Integer(0)) + scalar * left
    if len(by_value) < len(by_key):
        pairs = [(sympy.factor_terms(left), right) for right, left in by_value.items()]
    else:
        pairs = []
        for left, right in by_key.items():
            right = sympy.factor_terms(right)  # its factors free of the value index go to the key, as for one product
            scale = sympy.Mul(*[f for f in sympy.Mul.make_args(right) if b not in f.free_symbols])
            pairs.append((scale * left, sympy.Mul(*[f for f in sympy.Mul.make_args(right) if b in f.free_symbols])))
    pairs = [(_restore(k, atoms), _restore(v, atoms)) for k, v in pairs if k != 0 and v != 0]
    if len(pairs) < 2:
        return ""
    ir.ranges.update(made)  # (the canonical sums' indices, which the printers look up)
    plans = []
    for n, (k, v) in enumerate(pairs):
        one = (replace(sa, injection=k * v, chunk=None, chunk_reason="") if n == 0 else
               StateAnalysis(sa.name, sa.dims, TransitionClass.IDENTITY, "", sa.indices, sympy.Integer(1), k * v))
        _plan_chunks(ir, one)
        if one.chunk is None:
            sa.chunk_reason = one.chunk_reason  # (the decay's: the first sub-step applies it)
            return None
        plans.append(one.chunk)
    first = plans[0]
    sa.chunk = ChunkPlan(first.key_axis, first.k, first.v, first.decay_axis, first.log_decay, first.decay_exact,
                         None, sub_steps=tuple(plans))
    return None


# The indices of a pair plan's Definitions: k[a, b] and a key log decay over the pair, q[a, b] of a readout, v[j].
PAIR_KEY = (index_symbol("p__k0"), index_symbol("p__k1"))
PAIR_QUERY = (index_symbol("p__q0"), index_symbol("p__q1"))
PAIR_VALUE = index_symbol("p__v")
_PAIR_DECAYS = {TransitionClass.IDENTITY, TransitionClass.SCALAR, TransitionClass.DIAGONAL_ROW,
                TransitionClass.DIAGONAL_COL, TransitionClass.ELEMENTWISE}


def _plan_pair_chunks(rec: CheckedRecurrence, ir: StepIR, sa: StateAnalysis) -> None:
    """The chunk plan of a 3-axis state S[a, b, j] whose update is an outer product over the pair (a, b) and j,
    `S_t[a, b, j] = d_t * S_(t-1)[a, b, j] + k_t(a, b) * v_t(j)` with a decay d_t on no axis, the pair's axes or
    j only, as Based's second-order Taylor term `S2[a, b, j] = S2[a, b, j] + k[a] * k[b] * v[j]` (Arora et al.
    2024): flattening (a, b) row-major into one key axis p = a * Y + b makes it a matrix state S[X * Y, V] of the
    linear classes, `S_t = D_t S_(t-1) + k_t v_t^T` with k_t[p] = k_t(a, b), so the existing chunked machinery
    runs on it; a readout that sums over the pair, `sum(a, b, q(a, b) * S[a, b, j])`, is q^T S with q[p] = q(a, b)
    (`_pair_readout`). Fills `sa.chunk` (with `pair=True`) or says in `sa.chunk_reason` why not, at the update's
    line:col."""
    where, name = _where(rec, sa.name), sa.name
    if len(sa.dims) != 3:
        sa.chunk_reason = (f"{name} has {len(sa.dims)} axes (the chunked form takes 1 or 2, or 3 with the first two "
                           "flattened into one key axis)")
        return
    if sa.cls not in _PAIR_DECAYS and sa.cls is not TransitionClass.RANK_ONE_UPDATE:
        sa.chunk_reason = (f"at {where}: {name} has {_article(sa.cls.value)} {sa.cls.value} transition; a 3-axis "
                           "state is chunked only as a decay times the state plus an outer product, or as a rank-one "
                           "delta update over its first two axes")
        return
    index_set = set(ir.ranges)
    a, b, j = sa.indices
    pair = f"the pair ({a}, {b})"
    used = _free_indices(sa.diagonal, index_set)
    if sa.diagonal == 1:
        decay_axis = None
    elif not used:
        decay_axis = "scalar"
    elif used <= {a, b}:
        decay_axis = "key"
    elif used == {j}:
        decay_axis = "value"
    else:
        sa.chunk_reason = (f"at {where}: the decay {spec_text(sa.diagonal)} of {name} varies along {pair} and "
                           f"along {j}, so "
                           f"{name} flattened to [{sa.dims[0]} * {sa.dims[1]}, {sa.dims[2]}] has no decay axis")
        return
    injection = sa.injection if sa.injection is not None else sympy.Integer(0)
    split = _split_factors(injection, [{a, b}, {j}], index_set)
    if split is None:
        sa.chunk_reason = (f"at {where}: the injection {spec_text(injection)} of {name} is not an outer product "
                           f"k[{a}, {b}] * v[{j}] of {pair} and {j}, so its pair cannot be flattened into one key axis")
        return
    (key_part, value_part), scale = split
    on_pair = dict(zip((a, b), PAIR_KEY))
    key, beta = scale * key_part, None
    if sa.cls is TransitionClass.RANK_ONE_UPDATE:
        # The injection must lie along the update's direction k(a, b), as in `_plan_chunks`: B = k(a, b) y(j).
        beta_expr, direction = sa.rank_one
        ratio = sympy.simplify(key / direction)
        if _free_indices(ratio, index_set) & {a, b}:
            sa.chunk_reason = (f"at {where}: the injection {spec_text(injection)} of {name} is not along the rank-one "
                               f"update's direction {spec_text(direction)}")
            return
        key, value_part = direction, ratio * value_part
        beta = Definition(f"beta_{name}", (), beta_expr)
    log_decay, exact = None, True
    if decay_axis is not None:
        as_log = _as_log(sa.diagonal)
        if as_log is None:
            sa.chunk_reason = (f"at {where}: the decay {spec_text(sa.diagonal)} of {name} is not positive, and the "
                               "chunked form works with its logarithm")
            return
        log_expr, exact = as_log
        indices = {"key": PAIR_KEY, "value": (PAIR_VALUE,), "scalar": ()}[decay_axis]
        log_decay = Definition(f"log_decay_{name}", indices, log_expr.xreplace({**on_pair, j: PAIR_VALUE}))
    sa.chunk = ChunkPlan(0, Definition(f"k_{name}", PAIR_KEY, key.xreplace(on_pair)),
                         Definition(f"v_{name}", (PAIR_VALUE,), value_part.xreplace({j: PAIR_VALUE})), decay_axis,
                         log_decay, exact, beta, pair=True)


def _pair_readout(ir: StepIR, output: str, symbol: sympy.Symbol, term: LinearTerm,
                  sa: StateAnalysis) -> tuple[Readout, sympy.Expr] | str:
    """`term` (an output's read of the pair-planned state `sa`, see `_plan_pair_chunks`) as a readout over the
    flattened pair, `R[j] = sum(a, b, q(a, b) * S[a, b, j])`, and what replaces it in the output (R[j] times the
    factors free of the pair, summed over j where the output sums j too); or why it is none."""
    index_set = set(ir.ranges)
    shown = f"{term.state.removesuffix(NEW_SUFFIX)}[{', '.join(map(str, term.indices))}]"
    why = (f"output {output} reads {shown} other than summed over its first two axes with the third free or summed, "
           f"as sum(a, b, q[a, b] * {sa.name}[a, b, j]) (the chunked form of a 3-axis state flattens those two)")
    if len(term.indices) != 3 or len(set(term.indices)) != 3:
        return why
    a, b, j = term.indices
    if not {a, b} <= set(term.bound) or not set(term.bound) <= {a, b, j} or len(term.bound) != len(set(term.bound)):
        return why
    summed_value = j in term.bound
    split = _split_factors(term.coeff, [{a, b}, index_set - {a, b}], index_set)
    if split is None:
        return why
    (query_part, outer), rest = split
    query = Definition(f"q_{symbol.name}", PAIR_QUERY, query_part.xreplace(dict(zip((a, b), PAIR_QUERY))))
    readout = Readout(symbol.name, term.base, not term.reads_new, query, j)
    sa.chunk.readouts.append(readout)
    replacement = outer * rest * sympy.IndexedBase(symbol.name)[j]
    if summed_value:
        replacement = sympy.Sum(replacement, (j, 0, ir.ranges[j] - 1))
    return readout, replacement


def _plan_rank_r(ir: StepIR, sa: StateAnalysis) -> None:
    """A rank-r update's chunk plan: one rank-one plan per assignment (`ChunkPlan.sub_steps`). Its chunked form
    runs the r updates of step t as delta-rule steps r t, ..., r t + r - 1 of a sequence r times longer (each
    with its own decay, 0 in log space where an assignment has none) and reads step t's outputs at the last
    of them (a readout of S_(t-1) at the first), as the WY form of DeltaProduct does (Siems et al. 2025)."""
    plans = []
    for n, one in enumerate(sa.stages):
        _plan_chunks(ir, one)
        if one.chunk is None:
            sa.chunk_reason = f"assignment {n + 1} of {sa.name}: {one.chunk_reason}"
            return
        plans.append(one.chunk)
    order = [None, "scalar", "key"]
    decay_axis = max((p.decay_axis for p in plans), key=order.index)
    first = plans[0]
    sa.chunk = ChunkPlan(first.key_axis, first.k, first.v, decay_axis, first.log_decay,
                         all(p.decay_exact for p in plans), first.beta, sub_steps=tuple(plans))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _no_scan_reason(states: dict[str, StateAnalysis]) -> str:
    """Why no state-wise scan: each non-diagonal state's class, what makes it so, and why that stops a scan."""
    def why(s: StateAnalysis) -> str:
        if s.cls is TransitionClass.NON_LINEAR:
            return "a scan composes affine steps only"
        if s.cls is TransitionClass.GENERAL and s.diagonal is not None and s.diagonal == 0:
            return (f"read after its update, {s.name} is a temporary (write it as one); read before, it is the "
                    "previous step's value of what it is set to: shift that input by one step outside the recurrence "
                    "and pass it as an input (docs/language.md, \"Linear bodies\")")
        # A matrix transition mixes the state's rows: a scan's combine would multiply those matrices.
        n = spec_text(s.dims[0]) if s.dims else "n"
        return (f"each step's transition is a {n} x {n} matrix, so a scan's every combine would be a {n} x {n} "
                f"matrix product (the {'chunked' if s.chunk is not None else 'recurrent'} form applies them to the "
                "state instead)")
    return "; ".join(f"{s.name} has {_article(s.cls.value)} {s.cls.value} transition ({s.reason}): {why(s)}"
                     for s in states.values() if s.cls not in _DIAGONAL)


def _transpose_states(ir: StepIR, names: set[str]) -> StepIR:
    """The same step with each named [X, Y] state stored as its [Y, X] transpose (every read and update)."""
    bases = {sympy.IndexedBase(n) for n in names} | {sympy.IndexedBase(n + NEW_SUFFIX) for n in names}

    def swap(e: sympy.Expr) -> sympy.Expr:
        return e.replace(lambda x: isinstance(x, sympy.Indexed) and x.base in bases and len(x.indices) == 2,
                         lambda x: x.base[x.indices[1], x.indices[0]])

    def definition(d: Definition, flip: bool) -> Definition:
        return Definition(d.name, tuple(reversed(d.indices)) if flip else d.indices, swap(d.expr))

    return StepIR(tuple(definition(d, d.name in names) for d in ir.statements),
                  {n: definition(d, n in names) for n, d in ir.updates.items()},
                  {n: definition(d, False) for n, d in ir.outputs.items()}, ir.ranges, ir.sizes,
                  {n: tuple(definition(d, n in names) for d in defs) for n, defs in ir.stages.items()})


def _lift_states(ir: StepIR, lifts: dict[str, str]) -> StepIR:
    """The same step with each lifted state given a leading axis of size 1 (see `Analysis.lifted`): its update
    writes `h[u, d]` (u a new index over the literal size 1), and every read elsewhere (outputs, other states)
    becomes `sum(u', h[u', d])`, a readout along the new key axis."""
    ranges = dict(ir.ranges)
    one = sympy.Integer(1)
    counter = itertools.count()

    def fresh(name: str) -> sympy.Symbol:
        sym = index_symbol(f"u__{name}{next(counter)}")
        ranges[sym] = one
        return sym

    targets = {name: fresh(name) for name in lifts}

    def lift(e: sympy.Expr, own: str | None) -> sympy.Expr:
        def read(base: str, indices: tuple) -> sympy.Expr:
            name = base.removesuffix(NEW_SUFFIX)
            if name == own and not base.endswith(NEW_SUFFIX):
                return sympy.IndexedBase(base)[(targets[name],) + indices]
            u = fresh(name)
            return sympy.Sum(sympy.IndexedBase(base)[(u,) + indices], (u, 0, 0))

        scalars = {sympy.Symbol(n + suffix): (n + suffix) for n, kind in lifts.items() if kind == "scalar"
                   for suffix in ("", NEW_SUFFIX)}
        rows = {n + suffix for n, kind in lifts.items() if kind == "row" for suffix in ("", NEW_SUFFIX)}
        e = e.replace(lambda x: isinstance(x, sympy.Indexed) and x.base.name in rows,
                      lambda x: read(x.base.name, tuple(x.indices)))
        return e.xreplace({sym: read(base, ()) for sym, base in scalars.items()})

    updates = {n: Definition(n, ((targets[n],) if n in lifts else ()) + d.indices, lift(d.expr, n))
               for n, d in ir.updates.items()}
    outputs = {n: Definition(n, d.indices, lift(d.expr, None)) for n, d in ir.outputs.items()}
    stages = {n: defs for n, defs in ir.stages.items() if n not in lifts}  # (a lifted state's own reads change)
    return StepIR(ir.statements, updates, outputs, ranges, ir.sizes, stages)


def _lift_candidates(rec: CheckedRecurrence, analysis: Analysis) -> dict[str, str]:
    """0-axis states, and vector states that an output reads other than through a readout (y[d] = h[d])."""
    lifts = {}
    for s in rec.states:
        if not s.dims:
            lifts[s.name] = "scalar"
        elif len(s.dims) == 1 and any(_mentions(o.expr, {s.name, s.name + NEW_SUFFIX})
                                      for o in analysis.outputs.values()):
            lifts[s.name] = "row"
    return lifts


def _lifted_reasons(analysis: Analysis, lifted_view: Analysis | None) -> Analysis:
    """`analysis`, where its states were tried lifted (n as n[1]) and still have no chunked form, and the only
    states without a chunk plan as written are 0-axis ones, with the lifted analysis' reasons for the chunked and
    parallel forms: "n has 0 axes" is then not the obstacle, and the lifted analysis names the one that is. (Other
    obstacles, such as coupled vector states, are best said as written.)"""
    blockers = [sa for sa in analysis.states.values() if sa.chunk is None]
    if lifted_view is not None and blockers and all(not sa.dims for sa in blockers):
        _take_chunk_reasons(analysis.unavailable, lifted_view)
    return analysis


def _take_chunk_reasons(unavailable: dict, view: Analysis) -> None:
    """`unavailable`'s reasons for the chunked and parallel forms replaced by `view`'s, where both lack them."""
    for form in ("chunked", "parallel"):
        if form in unavailable and form in view.unavailable:
            unavailable[form] = view.unavailable[form]


def _transposed_classes(analysis: Analysis, view: Analysis, flip: set[str]) -> Analysis:
    """`analysis`, with each state that is general as written but of a class as its transpose (a delta rule in the
    papers' S[V, K] layout) given that class, and the transpose's reasons for the missing forms: a body with no
    chunked form either way (an output reading S other than through a readout) is not called general for its
    layout. No chunk plan comes with it (the forms are those of `analysis`)."""
    better = [n for n in sorted(flip) if analysis.states[n].cls is TransitionClass.GENERAL
              and view.states[n].cls is not TransitionClass.GENERAL]
    if not better:
        return analysis
    states = dict(analysis.states)
    for name in better:
        sa = view.states[name]
        states[name] = replace(sa, dims=states[name].dims, reason=f"{sa.reason}, as {name}^T", chunk=None,
                               chunk_reason=sa.chunk_reason)
    unavailable = dict(analysis.unavailable)
    if "scan" in unavailable:
        unavailable["scan"] = _no_scan_reason(states)
    _take_chunk_reasons(unavailable, view)
    # `transposed` names them (context parallelism's summary mixes their second axis), as for a chunked transpose.
    return Analysis(analysis.recurrence, analysis.ir, states, analysis.outputs, analysis.forms, unavailable,
                    transposed=tuple(better), lifted=analysis.lifted)


def analyse(rec: CheckedRecurrence) -> Analysis:
    """Run the whole analysis of one recurrence."""
    ir = build_step_ir(rec)
    plan = split_shift_states(rec, ir)
    if plan is not None:
        return _shifted(rec, ir, plan)
    analysis = _analyse_ir(rec, ir, {s.name: s.dims for s in rec.states})
    if "chunked" in analysis.forms:
        return analysis
    lifts = _lift_candidates(rec, analysis)
    lifted_view = None  # the lifted states' analysis, where it was tried and has no chunked form either
    if lifts and all(len(s.dims) < 2 or analysis.states[s.name].chunk is not None for s in rec.states):
        dims = {s.name: ((1,) + s.dims if s.name in lifts else s.dims) for s in rec.states}
        view = lifted_view = _analyse_ir(rec, _lift_states(ir, lifts), dims)
        if "chunked" in view.forms:
            view.lifted = lifts
            forms = [f for f in FORMS if f in analysis.forms or (f in ("chunked", "parallel") and f in view.forms)]
            unavailable = {f: why for f, why in analysis.unavailable.items() if f not in forms}
            if "parallel" not in forms and "parallel" in view.unavailable:
                unavailable["parallel"] = view.unavailable["parallel"]
            return Analysis(rec, ir, analysis.states, analysis.outputs, tuple(forms), unavailable, view,
                            lifted=lifts)
    # No chunked form as written: try the matrix states the other way round (S[V, K] read as sum(j, q[j] S[i, j])).
    flip = {s.name for s in rec.states if len(s.dims) == 2
            and (analysis.states[s.name].chunk is None or analysis.states[s.name].cls is TransitionClass.GENERAL
                 or any(o.residual_state for o in analysis.outputs.values()))}
    if not flip:
        return _lifted_reasons(analysis, lifted_view)
    dims = {s.name: tuple(reversed(s.dims)) if s.name in flip else s.dims for s in rec.states}
    view = _analyse_ir(rec, _transpose_states(ir, flip), dims)
    if "chunked" not in view.forms:
        return _transposed_classes(_lifted_reasons(analysis, lifted_view), view, flip)
    view.transposed = tuple(sorted(flip))
    states = dict(analysis.states)
    for name in flip:
        if states[name].cls is TransitionClass.GENERAL:
            # Column mixing as written is row mixing of the transpose: say what it is.
            sa = view.states[name]  # (its indices, diagonal and chunk plan are those of the transpose)
            states[name] = replace(sa, dims=states[name].dims, reason=f"{sa.reason}, as {name}^T")
    forms = [f for f in FORMS if f in analysis.forms or (f in ("chunked", "parallel") and f in view.forms)]
    unavailable = {f: why for f, why in analysis.unavailable.items() if f not in forms}
    if "scan" in unavailable:
        unavailable["scan"] = _no_scan_reason(states)
    if "parallel" not in forms and "parallel" in view.unavailable:
        unavailable["parallel"] = view.unavailable["parallel"]
    return Analysis(rec, ir, states, analysis.outputs, tuple(forms), unavailable, view, view.transposed)


def _shifted(rec: CheckedRecurrence, ir: StepIR, plan: ShiftPlan) -> Analysis:
    """The analysis of a recurrence with shift states: theirs (class shift), and the rest's (`plan.inner`)."""
    inner = analyse(plan.inner)
    states = {}
    for s in rec.states:
        if s.name in plan.names:
            shift = next(x for x in plan.states if x.name == s.name)
            others = f" but those of shift states ({', '.join(shift.reads)})" if shift.reads else ""
            states[s.name] = StateAnalysis(
                s.name, s.dims, TransitionClass.SHIFT,
                f"{s.name} is overwritten each step by {spec_text(shift.value.expr)}, which reads no state's "
                f"previous value{others}: it is computed by shifting inputs "
                f"along T before the recurrence runs (its previous value is that value one step earlier, the "
                f"initial state at the first step), and counts for no form",
                shift.value.indices, sympy.Integer(0), shift.value.expr)
        else:
            states[s.name] = inner.states[s.name]
    return Analysis(rec, ir, states, inner.outputs, inner.forms, dict(inner.unavailable), inner.chunk_view,
                    inner.transposed, dict(inner.lifted), plan, inner)


def _analyse_ir(rec: CheckedRecurrence, ir: StepIR, dims: dict[str, tuple]) -> Analysis:
    state_names = {s.name for s in rec.states} | {s.name + NEW_SUFFIX for s in rec.states}
    infinite = [d.name for d in list(ir.updates.values()) + list(ir.outputs.values()) if has_infinity(d.expr)]
    states = {}
    for sym in rec.states:
        # Reads of another state's new value (z__new) count as state reads, so the coupling is seen.
        sa = _classify_state(ir, sym.name, dims[sym.name], state_names)
        sa = _classify_stages(rec, ir, sa, state_names)
        sa = _factor_rank_r(rec, ir, sa, state_names)
        if not infinite:  # (with an infinite constant, only the recurrent form: no chunk plan, no readouts)
            if len(dims[sym.name]) > 2:
                _plan_pair_chunks(rec, ir, sa)
            else:
                _plan_chunks(ir, sa)
        states[sym.name] = sa
    _couple_states(rec, ir, states, dims)
    counter = [0]
    outputs = {o.name: _plan_output(ir, o.name, states, state_names, counter) for o in rec.outputs}

    unavailable: dict[str, str] = {}
    forms = ["recurrent"]
    if any(s.cls not in _DIAGONAL for s in states.values()):
        unavailable["scan"] = _no_scan_reason(states)
    else:
        forms.append("scan")
    why_not_chunked = [s.chunk_reason for s in states.values() if s.chunk is None]
    if not why_not_chunked:
        why_not_chunked += [f"at {_where(rec, o.name)}: {o.residual_reason}" if o.residual_reason else
                            f"output {o.name} reads a state other than through a readout sum(a, q[a] * S[a, b])"
                            for o in outputs.values() if o.residual_state]
    if not states:
        why_not_chunked.append("the recurrence has no state")
    if why_not_chunked:
        unavailable["chunked"] = "; ".join(why_not_chunked)
        unavailable["parallel"] = unavailable["chunked"]
    else:
        forms.append("chunked")
        delta = [s for s in states.values() if s.cls in (TransitionClass.RANK_ONE_UPDATE, TransitionClass.RANK_R_UPDATE,
                                                         TransitionClass.DIAGONAL_PLUS_RANK_ONE)]
        if delta:
            unavailable["parallel"] = "; ".join(f"{s.name} has {_article(s.cls.value)} {s.cls.value} transition: its "
                                                "products do not collapse to a decay mask (use chunked)" for s in delta)
        else:
            forms.append("parallel")
    if infinite:
        # inf * 0 is NaN: the other forms regroup the step's products (cumulative decays, k v^T, masks) and
        # would make NaN where the step-by-step computation makes inf, or the reverse.
        why = (f"{' and '.join(infinite)} {'uses' if len(infinite) == 1 else 'use'} an infinite constant (such as "
               "1e999, exp(1000) or log(0)), which only the step-by-step form computes with exactly as written")
        unavailable = {f: why for f in FORMS if f != "recurrent"}
        forms = ["recurrent"]
    return Analysis(rec, ir, states, outputs, tuple(forms), unavailable)
