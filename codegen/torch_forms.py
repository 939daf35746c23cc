"""Generate the PyTorch source of every form of one analysed recurrence.

For a recurrence NAME the generated source defines, each with the same
arguments `(inputs..., params..., states, sizes...)` already bound and cast:

- `NAME__recurrent`: a per-step loop (`NAME__recurrent_loop`; state-free subexpressions are hoisted into
  a prologue computed once for the whole sequence, those used twice in a step computed once per step) whose
  backward is `NAME__recurrent_adjoint`, the adjoint step that `recurrence_dsl.adjoint` derives symbolically
  from the spec, printed here and run backwards over segments recomputed from checkpoints (the two joined by
  `dispatch.with_adjoint`); a state it is not given (`_zero_start`: a call without an initial state) starts
  from zero, its first step printed with the terms that read the state left out (`_zero_states`);
- `NAME__scan`: every state element as s_t = a_t s_{t-1} + b_t, by associative scan inside blocks of a
  fixed number of steps (`NAME__scan_block`), the states carried across blocks (`dispatch.in_blocks`);
- `NAME__chunked(..., chunk_size)`: prologue (k, v, decays, queries), the chunked
  runtime (`torch_runtime.chunked_linear_by` / `chunked_delta_by` / `chunked_dplr_by` with the
  plan's decay class), epilogue;
  the parallel form is this with one chunk.

Each returns `(outputs: dict, final_states: dict)` in the compute dtype.
"""

from __future__ import annotations

import itertools
import re

import sympy

from recurrence_dsl.adjoint import (
    GRAD_SUFFIX,
    NoAdjoint,
    canonical_bound,
    canonical_key,
    derive_adjoint,
    derive_vjp,
    factor_sums,
    grad_name,
    nest_sums,
    reads,
    update_order,
)
from recurrence_dsl.analysis import Analysis, TransitionClass
from recurrence_dsl.check import require_state, undefined_from_zero
from recurrence_dsl.dataflow import cite
from recurrence_dsl.explain import tidy
from recurrence_dsl.step_ir import NEW_SUFFIX, expm1, index_symbol, size_symbol, undefined

from .printing import SourceWriter, in_docstring, is_constant, py_name
from .torch_printer import TorchPrinter
from .triton_printer import TritonPrinter, block_name, mask_name, offs_name

# The runtimes' class per decay axis: the chunked form names the one its plan fixes (`chunked_linear_by(KeyDecay,
# ...)`), so a generated module keeps only that axis' code (codegen/module.py prunes by name).
_DECAY_CLASSES = {None: "NoDecay", "scalar": "ScalarDecay", "key": "KeyDecay", "value": "ValueDecay"}


def _drop_unused_shape(text: str) -> str:
    """`text` (printed functions) without the `B_, T_, H_ = ...` line of a function that reads none of the three."""
    functions = text.split("\n\n\n")
    for n, f in enumerate(functions):
        lines = f.split("\n")
        at = [m for m, line in enumerate(lines) if line.strip().startswith("B_, T_, H_ = ")]
        if at and not any(x in line for line in lines[at[0] + 1:] for x in ("B_", "T_", "H_")):
            del lines[at[0]]
            functions[n] = "\n".join(lines)
    return "\n\n\n".join(functions)


def _leaf(e: sympy.Expr) -> bool:
    return isinstance(e, (sympy.Indexed, sympy.Symbol, sympy.Number, sympy.NumberSymbol))


def _has_whole(e: sympy.Expr, indices: set, names) -> bool:
    """Whether `e` is, or sums, multiplies or maps elementwise (a function, a power), a tensor of `names` read over
    all of `indices`."""
    if isinstance(e, sympy.Indexed):
        return str(e.base) in names and set(e.indices) == indices and len(e.indices) == len(indices)
    if isinstance(e, sympy.Symbol):
        return e.name in names and not indices
    if isinstance(e, (sympy.Add, sympy.Mul, sympy.Pow, sympy.Function, sympy.Min, sympy.Max)):
        return any(_has_whole(a, indices, names) for a in e.args)
    return False


def _linear_terms(e: sympy.Expr, readers: set[str]) -> list[tuple[sympy.Expr, sympy.Expr | None]] | None:
    """`e` as a sum of terms `coefficient * reader`, the coefficients free of `readers` and each reader one of them
    read as it is (`S[i, j]`) or contracted with a vector free of them (`sum(m, k[m] * S[m, j])`); reader None: a
    term free of them. Sums are distributed over their bodies (the delta product's second update reads the first's
    result: `sum(m, k2[m] * (S[m, j] + b1 * k1[m] * u1[j]))` is `k2^T S` plus a state-free dot product times `u1`).
    None where `e` is not linear in `readers` that way (a function of a state, a product of two, a nested
    contraction)."""
    if not reads(e, readers):
        return [(e, None)]
    if (isinstance(e, sympy.Indexed) and str(e.base) in readers) or (isinstance(e, sympy.Symbol)
                                                                    and e.name in readers):
        return [(sympy.Integer(1), e)]
    if isinstance(e, sympy.Add):
        terms: list = []
        for arg in e.args:
            found = _linear_terms(arg, readers)
            if found is None:
                return None
            terms += found
        return terms
    if isinstance(e, sympy.Mul):
        dependent = [n for n, arg in enumerate(e.args) if reads(arg, readers)]
        if len(dependent) != 1:
            return None
        rest = sympy.Mul(*[arg for n, arg in enumerate(e.args) if n != dependent[0]])
        found = _linear_terms(e.args[dependent[0]], readers)
        return None if found is None else [(rest * c, r) for c, r in found]
    if isinstance(e, sympy.Sum) and len(e.limits) == 1:
        var = e.limits[0][0]
        found = _linear_terms(e.function, readers)
        if found is None:
            return None
        terms = []
        for c, r in found:
            inside = sympy.Mul(*[f for f in sympy.Mul.make_args(c) if var in f.free_symbols])
            outside = sympy.Mul(*[f for f in sympy.Mul.make_args(c) if var not in f.free_symbols])
            if r is None:
                terms.append((sympy.Sum(c, *e.limits), None))
            elif var not in r.free_symbols:
                terms.append((outside * sympy.Sum(inside, *e.limits), r))
            elif isinstance(r, sympy.Indexed):
                terms.append((outside, sympy.Sum(inside * r, *e.limits)))
            else:
                return None  # a contraction of a contraction
        return terms
    return None


def _contraction(reader: sympy.Expr, readers: set[str], ranges: dict) -> tuple[sympy.Expr, sympy.Indexed] | None:
    """(c, X[m, j]) when `reader` is `sum(m, c[m] * X[m, j])`: a matrix X contracted over its first index with a
    vector c (a [1, K] @ [K, V] product per batch row), X one of `readers`; else None."""
    if not isinstance(reader, sympy.Sum):
        return None
    var = reader.limits[0][0]
    leaves = [f for f in sympy.Mul.make_args(reader.function) if isinstance(f, sympy.Indexed)
              and str(f.base) in readers]
    if len(leaves) != 1 or len(leaves[0].indices) != 2 or leaves[0].indices[0] != var or leaves[0].indices[1] == var:
        return None
    c = sympy.Mul(*[f for f in sympy.Mul.make_args(reader.function) if f is not leaves[0]])
    if {x for x in c.free_symbols if x in ranges} != {var}:
        return None
    return c, leaves[0]


# Torch functions whose printed call can write its result into an existing tensor (`out=`).
_OUT_CALLS = {"addcmul", "add", "sub", "mul", "div", "tanh", "sigmoid", "exp", "log", "sqrt", "abs", "neg",
              "maximum", "minimum"}


def _into(value: str, target: str) -> str:
    """Source writing the tensor `value` (printed source, of the target's shape or broadcasting to it) into the
    existing tensor `target`: through the `out=` of its top-level torch call where it is one (no extra pass over the
    result), else `target.copy_(value)` (which broadcasts; a `torch.broadcast_to` around `value` is dropped)."""
    def call(text: str) -> tuple[str, str] | None:
        """(function, arguments) of `text` when all of it is one call `torch.f(arguments)`."""
        head = text.split("(", 1)[0]
        if not head.startswith("torch.") or not text.endswith(")"):
            return None
        depth = 0
        for n, ch in enumerate(text[len(head):], len(head)):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                return (head[len("torch."):], text[len(head) + 1:-1]) if n == len(text) - 1 else None
        return None

    parts = call(value)
    if parts and parts[0] == "broadcast_to":
        inner = parts[1].rsplit(", (", 1)[0]  # broadcast_to(value, (shape)): copy_ broadcasts by itself
        return f"{target}.copy_({inner})"
    if parts and parts[0] in _OUT_CALLS:
        return f"torch.{parts[0]}({parts[1]}, out={target})"
    return f"{target}.copy_({value})"


class TorchFormWriter:
    """Writes the torch source of one recurrence's forms."""

    def _initial(self, name: str, state: str) -> str:
        """The `initial_state=` argument of a chunked runtime call: `state` (the state `name` as the call holds it, a
        view of `states[name]`). The chunked forms, torch and Triton, take None for no initial state
        (codegen/dispatch.py `takes_no_initial_state`: their runtimes start from zero without allocating one), which
        a view must pass on as None."""
        if state == f"states['{name}']":
            return state
        return f"None if states['{name}'] is None else {state}"

    def __init__(self, analysis: Analysis, runtime_prefix: str = "", suffix: str = "", options: bool = False,
                 checkpoints: bool = False):
        self.rt = runtime_prefix  # how the printed code reaches the runtime's functions
        self.suffix = suffix  # appended to every form function's name (the Triton variants in a module)
        # The chunked form takes **options (block sizes, warps, stages of a tuning config) for its runtime.
        self.options = options
        # The chunked form takes `every` and returns its chunk-start states as the checkpoints of the recurrent form's
        # derived adjoint (the diagonal-plus-rank-one class on Triton: codegen/triton_recurrent.py
        # `dplr_chunked_in_triton`), so that it trains through `with_adjoint`.
        self.checkpoints = checkpoints
        # Set by `write_scan` on the Triton form: whether its scan kernels compute the prologue themselves
        # (`_fused_scan`), which decides how many numbers per lane the module's spec says the scan keeps.
        self.scan_fused = False
        self.a = analysis
        self.rec = analysis.recurrence
        self.fn = self.rec.name
        self.sizes = set(self.rec.sizes)
        self.state_names = {s.name for s in self.rec.states} | {s.name + NEW_SUFFIX for s in self.rec.states}
        # Python names of the spec's names (a trailing _ where one would shadow a name the code uses).
        self.py = {n: py_name(n) for n in [s.name for s in self.rec.inputs + self.rec.params + self.rec.states
                                            + self.rec.outputs] + list(self.rec.sizes)}
        self.shown: dict[str, str] = {}  # internal names of hoisted expressions -> the names printed
        self.taken: set[str] = set()  # other names a function being printed has given out
        # Where each state's and output's value is written in the spec (`gla.rec:4`), cited beside its code.
        self.cite = {n: cite(self.rec, n) for n in [s.name for s in self.rec.states + self.rec.outputs]}
        self.args = [self.py[s.name] for s in self.rec.inputs + self.rec.params]
        self.signature = ", ".join(self.args + ["states"] + [self.py[n] for n in self.rec.sizes])

    # -- shared pieces ------------------------------------------------------

    @property
    def _options_arg(self) -> str:
        return ", **options" if self.options else ""

    def _shape_comment(self, indices, ranges=None, time: str = "T") -> str:
        ranges = self.a.ir.ranges if ranges is None else ranges
        return f"[B, {time}, H" + "".join(f", {ranges[i]}" for i in indices) + "]"

    def _params_to_time(self, w: SourceWriter) -> None:
        """Params [H, ...] -> [1, 1, H, ...] so they broadcast against per-step tensors [B, T, H, ...]."""
        for p in self.rec.params:
            w(f"{self.py[p.name]} = {self.py[p.name]}[None, None]  # [1, 1, H{''.join(', ' + str(d) for d in p.dims)}]")

    def _broadcast(self, printer: TorchPrinter, expr: sympy.Expr, indices, shape: str, full=frozenset()) -> str:
        """Source of `expr` as a tensor of `shape`; numbers and sizes (`K ** -0.5`) make a filled one. `full`: names
        of tensors that have the whole shape already (a sum or product with one of them over every index needs
        no broadcast); `full=None`: any shape that broadcasts will do (the value is assigned into a slice)."""
        if is_constant(expr, self.sizes):
            return f"{self.py[self.rec.inputs[0].name]}.new_full({shape}, {printer.print_expr(expr, indices)})"
        if full is None or _has_whole(expr, set(indices), full):
            return printer.print_expr(expr, indices)
        return f"torch.broadcast_to({printer.print_expr(expr, indices)}, {shape})"

    def _full(self, printer: TorchPrinter, expr: sympy.Expr, indices, sym_dims, full=frozenset()) -> str:
        """`expr` as a [B, T, H, *sym_dims] tensor (`full`: as `_broadcast`'s)."""
        return self._broadcast(printer, expr, indices, f"(B_, T_, H_{''.join(f', {self._dim(d)}' for d in sym_dims)})",
                               full)

    # -- the chunked Triton form's fused prologue and epilogue -------------------------------------------

    def _scalar_step(self, e: sympy.Expr) -> bool:
        """e is an expression of scalar inputs, scalar params and numbers/sizes that reads at least one scalar
        input: a per-step scalar [B, T, H] (`dt * A`, `beta`, mLSTM's input gate `exp(ig)`)."""
        scalar_inputs = {i.name for i in self.rec.inputs if not i.dims}
        scalar_params = {p.name for p in self.rec.params if not p.dims}
        if e.atoms(sympy.Indexed):
            return False
        names = {str(x) for x in e.free_symbols}
        return bool(names & scalar_inputs) and names <= scalar_inputs | scalar_params | self.sizes

    def _split_step(self, expr: sympy.Expr, index) -> tuple[sympy.Expr, sympy.Expr | None] | None:
        """(leaf, factor) when expr = factor * leaf, leaf an input indexed by `index` alone and factor a per-step
        scalar (`_scalar_step`; None when expr is the leaf itself); None for any other expression."""
        inputs = {i.name for i in self.rec.inputs}
        factors = sympy.Mul.make_args(expr)
        leaves = [f for f in factors if isinstance(f, sympy.Indexed)]
        if len(leaves) != 1 or str(leaves[0].base) not in inputs or tuple(leaves[0].indices) != tuple(index):
            return None
        rest = sympy.Mul(*[f for f in factors if f is not leaves[0]])
        if rest == 1:
            return leaves[0], None
        single = len(sympy.Mul.make_args(rest)) == 1 and str(rest) in {i.name for i in self.rec.inputs if not i.dims}
        return (leaves[0], rest) if single or self._scalar_step(rest) else None

    def _fusion(self, view, s, sa, printer) -> dict | None:
        """What the Triton runtime applies in its kernels for state `s` (`triton_runtime._Fused`): {"k", "v" (the
        leaves printed instead of the products), "v_step" (source of the per-step factor), "log_decay" and
        "decay_head" (a scalar log decay `input * param`), "scale", "skip", "skip_weight" (an output
        `scale * read + weight * input`, for the state's one readout, `out`: that output's name)}; None when the
        plan is not of that shape (then the prologue and epilogue stay torch tensors)."""
        plan = sa.chunk
        if (not self.options or plan.pair or s.name in view.transposed
                or view.lifted.get(s.name) or sa.cls not in (TransitionClass.IDENTITY, TransitionClass.SCALAR,
                                                              TransitionClass.DIAGONAL_ROW,
                                                              TransitionClass.RANK_ONE_UPDATE)
                or plan.decay_axis == "value"):
            return None
        ks = self._split_step(plan.k.expr, plan.k.indices)
        # a state with no value axis (mLSTM's normaliser n) runs with values of ones: a factor of its k is theirs
        vs = self._split_step(plan.v.expr, plan.v.indices) if plan.v is not None else (None, None)
        if ks is None or vs is None:
            return None
        if sa.cls is TransitionClass.RANK_ONE_UPDATE and ks[1] is not None:
            return None  # the delta rule's k enters its K K^T as well: only the values take a factor
        factor = sympy.Mul(*[f for f in (ks[1], vs[1]) if f is not None])
        out = {"k": ks[0], "v": vs[0], "v_step": None if factor == 1 else printer.print_expr(factor, ()),
               "v_step_expr": factor}
        if plan.log_decay is not None and plan.decay_axis == "scalar":
            parts = sympy.Mul.make_args(plan.log_decay.expr)
            inputs = [f for f in parts if str(f) in {i.name for i in self.rec.inputs if not i.dims}]
            params = [f for f in parts if str(f) in {p.name for p in self.rec.params if not p.dims}]
            if len(parts) == 2 and len(inputs) == 1 and len(params) == 1:
                out["log_decay"], out["decay_head"] = inputs[0], self.py[str(params[0])]
        out.update(self._epilogue_of(view, s, plan, printer) or {})
        return out

    def _value_columns(self, view, s, sa, k_expr, fuse, merged: dict) -> list[tuple[str, list]]:
        """The later states that run in state `s`'s chunked call as extra value columns: (name, pairs) for each
        state n with no value axis (mLSTM's normaliser n[K] beside C[K, V], normalised attention's z beside S) whose
        class, decay (same expression over the renamed key index) and queries are s's and whose injection
        k_n[i] is k_s[i] times s's per-step factor v_step (when fused): s's injection with its value replaced by 1.
        Then C' = [C | n] is one linear recurrence over V + 1 columns, fed v' = [v, 1] (the hand-written kernels'
        normaliser column), and its readouts and final state split back. pairs: (n's readout, s's readout of the
        same query) for each of n's readouts. Only the linear classes (identity, scalar, key decay) qualify: a
        value decay is per column and a delta rule's step reads the whole state."""
        plan = sa.chunk
        linear = (TransitionClass.IDENTITY, TransitionClass.SCALAR, TransitionClass.DIAGONAL_ROW)
        if (self.checkpoints or plan.v is None or plan.pair or s.name in view.transposed or view.lifted.get(s.name)
                or sa.cls not in linear or plan.decay_axis == "value" or not plan.readouts):
            return []
        factor = fuse["v_step_expr"] if fuse and fuse.get("v_step") else sympy.Integer(1)
        names = [x.name for x in self.rec.states]
        found = []
        for other in names[names.index(s.name) + 1:]:
            oa = view.states[other]
            op = oa.chunk
            if (other in merged or oa.cls is not sa.cls or op.v is not None or op.pair or other in view.transposed
                    or view.lifted.get(other) or op.decay_axis != plan.decay_axis
                    or op.decay_exact != plan.decay_exact or len(op.k.indices) != len(plan.k.indices)
                    or not op.readouts):
                continue
            rename = dict(zip(op.k.indices, plan.k.indices))
            if (op.log_decay is None) != (plan.log_decay is None) or (op.log_decay is not None and (
                    op.log_decay.expr.xreplace(rename) != plan.log_decay.expr
                    or tuple(rename.get(i, i) for i in op.log_decay.indices) != tuple(plan.log_decay.indices))):
                continue
            # Only a ratio of exactly 1: a column c = 1 / a (n's k without a factor a of s's) would be inf * 0 where
            # a = 0, and the calls apart are finite there.
            if sympy.simplify(op.k.expr.xreplace(rename) - k_expr * factor) != 0:
                continue
            pairs = []
            for r in op.readouts:
                for r2 in plan.readouts:
                    qmap = dict(zip(r.query.indices, r2.query.indices))
                    if (r.exclusive == r2.exclusive and len(r.query.indices) == len(r2.query.indices)
                            and r.query.expr.xreplace(qmap) == r2.query.expr):
                        pairs.append((r, r2))
                        break
            if len(pairs) == len(op.readouts):
                found.append((other, pairs))
        return found

    def _epilogue_of(self, view, s, plan, printer) -> dict | None:
        """The readout's epilogue the kernels can apply for state `s` (`triton_runtime._Fused`): {"out" (the
        output's name), "scale" (printed, or None for 1), "skip" and "skip_weight" or "skip_weight_expr" (an
        output `scale * read + weight * input`)} when the spec's one output reads the one readout of its one state
        so; None otherwise (the epilogue stays a printed torch function)."""
        if not (len(plan.readouts) == 1 and len(self.rec.outputs) == 1 and len(self.rec.states) == 1):
            return None
        o = self.rec.outputs[0]
        oa = view.outputs[o.name]
        read = plan.readouts[0].name
        scale, skip = None, None
        for t in sympy.Add.make_args(sympy.expand(oa.expr)):
            hits = [a for a in t.atoms(sympy.Indexed) if str(a.base) == read]
            if hits:
                coeff = sympy.simplify(t / hits[0])
                if (len(hits) != 1 or tuple(hits[0].indices) != tuple(oa.indices) or scale is not None
                        or not is_constant(coeff, self.sizes)):
                    return None
                scale = coeff
            else:  # weight * input: an input indexed as the output times a per-head or per-step weight
                term = self._skip_term(t, oa.indices)
                if skip is not None or term is None:
                    return None
                skip = term
        if scale is None or tuple(o.dims) != (s.dims[-1],):
            return None
        out = {"out": o.name, "scale": printer.print_expr(scale, ()) if scale != 1 else None}
        if skip is not None:
            out["skip"] = printer.print_expr(skip[0], oa.indices)
            if isinstance(skip[1], str):
                out["skip_weight"] = skip[1]
            else:
                out["skip_weight_expr"] = skip[1]
        return out

    def _skip_term(self, t: sympy.Expr, indices) -> tuple | None:
        """(leaf, weight) when the epilogue term `t` is weight * leaf, leaf an input indexed as the output
        (`indices`): weight one scalar param (returned as its Python name, a per-head weight: Mamba2's D * x), or a
        scalar expression of the inputs and params free of the output's indices (returned as the sympy expression,
        computed per step by the prologue: RWKV-6's sum(i, r[i] * u[i] * k[i]) * v[j], whose v[j] sympy keeps inside
        the sum). None for anything else."""
        inputs = {i.name for i in self.rec.inputs}
        if isinstance(t, sympy.Sum):  # pull out the factors free of the summed indices
            summed = [lim[0] for lim in t.limits]
            outside, inside = t.function.as_independent(*summed, as_Add=False)
            t = outside * sympy.Sum(inside, *t.limits)
        leaves = [f for f in sympy.Mul.make_args(t) if isinstance(f, sympy.Indexed) and str(f.base) in inputs
                  and tuple(f.indices) == tuple(indices)]
        if len(leaves) != 1:
            return None
        weight = t / leaves[0]
        if str(weight) in {p.name for p in self.rec.params if not p.dims}:
            return leaves[0], self.py[str(weight)]
        known = inputs | {p.name for p in self.rec.params}
        bound = {lim[0] for sm in weight.atoms(sympy.Sum) for lim in sm.limits}  # summed indices
        free = weight.atoms(sympy.Symbol) - bound  # sizes, scalar inputs and params, the arrays' labels
        if (weight.has(leaves[0]) or not any(x.name in known for x in free)  # a constant weight: not per step
                or not all(str(a.base) in known for a in weight.atoms(sympy.Indexed))
                or not all(x.name in known | set(self.sizes) and x not in indices for x in free)
                or any(set(a.indices) - bound for a in weight.atoms(sympy.Indexed))):
            return None
        return leaves[0], weight

    def _header(self, w: SourceWriter, form: str, extra: str = "") -> None:
        w(f"def {self.fn}__{form}{self.suffix}({self.signature}{extra}):", 0)

    def _dim(self, d) -> str:
        """A dimension (a size name or a number) as Python source."""
        return self.py.get(d, d) if isinstance(d, str) else str(d)

    def _unpack_shape(self, w: SourceWriter) -> None:
        first = self.py[self.rec.inputs[0].name]
        w(f"B_, T_, H_ = {first}.shape[:3]")

    # -- recurrent ------------------------------------------------------------

    def _mentions_state(self, e: sympy.Expr, recurrent: set[str] | None = None) -> bool:
        """Whether `e` reads a state (or another of the `recurrent` names: values known only step by step)."""
        return reads(e, self.state_names if recurrent is None else recurrent)

    def _hoist(self, expr: sympy.Expr, table: dict, counter, recurrent: set[str] | None = None,
               ranges: dict | None = None) -> sympy.Expr:
        """Replace state-free subexpressions worth computing once (functions, sums, powers) by prologue
        tensors P<n>[free indices]. Products are split into their factors first: hoisting `k[i] * v[j]`
        would only trade a cheap per-step product for a [T, K, V] tensor. Expressions equal up to the names of
        their sums' bound indices share one tensor."""
        sizes = {sympy.Symbol(s, integer=True, positive=True) for s in self.sizes}
        ranges = self.a.ir.ranges if ranges is None else ranges

        def walk(e):
            if _leaf(e):
                return e
            if self._mentions_state(e, recurrent) or isinstance(e, sympy.Mul):
                if isinstance(e, sympy.Sum):
                    return sympy.Sum(walk(e.function), *e.limits)
                return e.func(*[walk(arg) for arg in e.args])
            if not (e.free_symbols - set(ranges) - sizes):
                return e  # a constant such as K ** -0.5
            key, order = canonical_key(e, ranges)
            if key not in table:
                idx = tuple(sorted(order, key=lambda s: s.name))
                name = f"P{next(counter)}"
                while name in self.py:  # a spec may name something P0 itself
                    name = f"P{next(counter)}"
                table[key] = (name, idx, e, order)
                self.shown[name] = self._unique(self._describe(e, ranges))
            name, idx, _, first = table[key]
            site = tuple(order[first.index(i)] for i in idx)  # this occurrence's own indices
            return sympy.IndexedBase(name)[site] if site else sympy.Symbol(name)

        return walk(expr)

    def _describe(self, e: sympy.Expr, ranges: dict) -> str:
        """A readable name for a hoisted expression, from its head and the spec names it reads: `exp(g[i])` is
        `exp_g`, `sum(m, k[m] * k[m])` is `sum_k`; a gradient `o__grad` reads as `grad_o`."""
        head = {sympy.Sum: "sum", sympy.Pow: "pow", sympy.Add: "add", sympy.Mul: "mul"}.get(
            type(e), type(e).__name__.lower() if isinstance(e, sympy.Function) else "pre")
        ranges = set(ranges)
        read = sorted({str(n.base) for n in e.atoms(sympy.Indexed)}
                      | {n.name for n in e.atoms(sympy.Symbol) if n not in ranges and n.name not in self.sizes})
        read = [f"grad_{n[:-len(GRAD_SUFFIX)]}" if n.endswith(GRAD_SUFFIX) else n for n in read]
        shown = {**self.py, **self.shown}
        return "_".join([head] + [shown.get(n, n).rstrip("_") for n in read])

    def _unique(self, name: str) -> str:
        """`name`, or `name_2`, `name_3`, ...: distinct from the spec's names and the names already printed."""
        taken = set(self.py.values()) | set(self.shown.values()) | self.taken
        candidate, n = py_name(name), 2
        while candidate in taken:
            candidate, n = f"{name}_{n}", n + 1
        return candidate

    def _readers(self, view, readout: str) -> str:
        """Where the outputs a chunked readout feeds are written in the spec (`gla.rec:11`)."""
        return ", ".join(self.cite[o.name] for o in self.rec.outputs
                         if sympy.Symbol(readout) in view.outputs[o.name].expr.free_symbols) or "readout"

    @staticmethod
    def _reads(expr: sympy.Expr, name: str) -> bool:
        return any((isinstance(n, sympy.Indexed) and str(n.base) == name) or
                   (isinstance(n, sympy.Symbol) and n.name == name) for n in sympy.preorder_traversal(expr))

    def _update_order(self) -> list:
        """States in the order of their last assignment: an update may read another state's new value."""
        return update_order(self.rec)

    @staticmethod
    def _names_read(exprs) -> set[str]:
        used: set[str] = set()
        for e in exprs:
            used |= {str(n.base) for n in e.atoms(sympy.Indexed)} | {n.name for n in e.atoms(sympy.Symbol)}
        return used

    def _hoisted_kinds(self, table: dict, per_step_names: set[str]) -> tuple[list[str], list[str]]:
        """(hoisted tensors that change per step, those that do not): a hoisted expression reading an input (or
        another of `per_step_names`) changes per step; one of params and sizes only does not."""
        per_step, constant = [], []
        for name, _, e, _ in table.values():
            reads = any(str(getattr(n, "base", n)) in per_step_names for n in sympy.preorder_traversal(e)
                        if isinstance(n, (sympy.Indexed, sympy.Symbol)))
            (per_step if reads else constant).append(name)
        return per_step, constant

    def _share(self, exprs: list, ranges: dict, excluded: set[str], counter=None, known=()) -> tuple[list, list]:
        """Common subexpressions: function calls, sums and additions that occur more than once in `exprs` (equal
        up to the names of their indices) and read none of the `excluded` names, each computed once into a tensor
        over its free indices. Returns (the expressions reading those tensors, [(IR name, indices, expression)] in the
        order to compute them). `known`: tensors computed already (an earlier result), read wherever they fit."""
        kinds = (sympy.Function, sympy.Sum, sympy.Min, sympy.Max, sympy.Add)
        keys: dict = {}  # node -> its canonical key over `ranges`: each round asks again for most of the same nodes

        def key_of(node):
            if node not in keys:
                keys[node] = canonical_key(node, ranges)
            return keys[node]

        def candidate(node) -> bool:
            return (isinstance(node, kinds) and not is_constant(node, self.sizes)
                    and not self._mentions_state(node, excluded))

        def substitute(e, key, name, idx, first):
            if isinstance(e, (sympy.Indexed, sympy.Symbol, sympy.Number)) or not e.args:
                return e
            if candidate(e):
                k, order = key_of(e)
                if k == key:
                    site = tuple(order[first.index(i)] for i in idx)  # this occurrence's own indices
                    return sympy.IndexedBase(name)[site] if site else sympy.Symbol(name)
            if isinstance(e, sympy.Sum):
                return sympy.Sum(substitute(e.function, key, name, idx, first), *e.limits)
            return e.func(*[substitute(a, key, name, idx, first) for a in e.args])

        exprs, temps, counter = list(exprs), [], counter or itertools.count()
        for name, idx, e in known:  # in the order computed: a later one reads the earlier ones
            key, first = key_of(e)
            exprs = [substitute(x, key, name, idx, first) for x in exprs]
        while True:
            seen: dict[str, list] = {}
            for e in exprs + [t[2] for t in temps]:
                for node in sympy.preorder_traversal(e):
                    if candidate(node):
                        key, order = key_of(node)
                        seen.setdefault(key, [0, node, order])[0] += 1
            repeated = [(sympy.count_ops(v[1]), k) for k, v in seen.items() if v[0] > 1]
            if not repeated:
                return exprs, temps[::-1]
            _, key = max(repeated)
            _, node, first = seen[key]
            name = f"C{next(counter)}"
            while name in self.py:
                name = f"C{next(counter)}"
            idx = tuple(sorted(first, key=lambda s: s.name))
            exprs = [substitute(e, key, name, idx, first) for e in exprs]
            temps = [(n, i, substitute(e, key, name, idx, first)) for n, i, e in temps] + [(name, idx, node)]

    def _write_shared(self, w, temps, names: dict, printer_names: dict, ranges, lead: str, indent: int) -> None:
        """Print the shared subexpressions `temps` (from `_share`) as tensors [B, (steps,) H, ...]; `names` (IR
        name -> Python) gets their names."""
        for name, _, e in temps:  # inner ones first, so an outer one's name can say what it reads
            names[name] = self.shown[name] = self._unique(self._describe(e, ranges))
        printer = TorchPrinter(self.sizes, ranges, {**printer_names, **names}, fuse=True)
        for name, idx, e in temps:
            dims = "".join(f", {self._range_dim(ranges[i])}" for i in idx)
            w(f"{names[name]} = {self._broadcast(printer, e, idx, f'({lead}{dims})')}  # used more than once", indent)

    def _range_dim(self, size: sympy.Expr) -> str:
        return str(int(size)) if size.is_Integer else self._dim(str(size))

    def _state_shape(self, s) -> str:
        return f"(B_, H_{''.join(f', {self._dim(d)}' for d in s.dims)})"

    def write_recurrent(self) -> str:
        """The recurrent form: the step loop (`NAME__recurrent_loop`), the derived backward
        (`NAME__recurrent_adjoint`, see `write_recurrent_adjoint`) and `NAME__recurrent`, the two joined by
        dispatch's `with_adjoint` (without an adjoint, autograd runs through the loop)."""
        loop = self.write_recurrent_loop()
        try:
            adjoint = derive_adjoint(self.rec, self.a.ir)
        except NoAdjoint as why:
            adjoint, reason = None, str(why)
        outs = tuple(o.name for o in self.rec.outputs)
        sts = tuple(s.name for s in self.rec.states)
        name = f"{self.fn}__recurrent{self.suffix}"
        if adjoint is None:
            return (f"{loop}\n\n# No derived backward ({reason}): autograd runs through the loop.\n"
                    f"{name} = with_adjoint({self.fn}__recurrent_loop{self.suffix}, None, {outs!r}, {sts!r})\n")
        sizes = ", ".join(self.py[n] for n in self.rec.sizes)  # the loop's size arguments, as in its signature
        dims = ", ".join(f"{s.name!r}: ({', '.join(str(self.py.get(d, d)) for d in s.dims)}{',' * (len(s.dims) == 1)})"
                         for s in self.rec.states)
        return (f"{loop}\n\n{self.write_recurrent_adjoint(adjoint)}\n\n"
                f"{name} = with_adjoint({self.fn}__recurrent_loop{self.suffix}, "
                f"{self.fn}__recurrent_adjoint{self.suffix}, {outs!r}, {sts!r},\n"
                f"    state_dims=lambda {sizes}: {{{dims}}})  # the states' dims after [B, H] (checkpoint rule)\n")

    def write_recurrent_loop(self) -> str:
        self.shown, self.taken = {}, set()
        w = SourceWriter()
        w(f"def {self.fn}__recurrent_loop{self.suffix}({self.signature}, every=0):", 0)
        w('"""Per-step loop: every class, linear or not. Returns (outputs, final states, checkpoints): with every > 0, '
          'the')
        w('states before steps 0, every, 2 * every, ... (from which the derived backward recomputes the others)."""')
        self._unpack_shape(w)
        self._params_to_time(w)
        table: dict = {}
        counter = itertools.count()
        updates = {n: (d.indices, self._hoist(d.expr, table, counter)) for n, d in self.a.ir.updates.items()}
        outputs = {n: (d.indices, self._hoist(d.expr, table, counter)) for n, d in self.a.ir.outputs.items()}
        py = {**self.py, **self.shown}
        time_printer = TorchPrinter(self.sizes, self.a.ir.ranges, py)
        if table:
            w("# Hoisted: state-free subexpressions, computed once for all steps.")
        for name, idx, e, _ in table.values():
            w(f"{py[name]} = {time_printer.print_expr(e, idx)}  # {self._shape_comment(idx)}")
        hoisted_per_step, hoisted_constant = self._hoisted_kinds(table, {i.name for i in self.rec.inputs})
        new = {s.name + NEW_SUFFIX for s in self.rec.states}
        shared, temps = self._share([e for _, e in list(updates.values()) + list(outputs.values())],
                                    self.a.ir.ranges, new)
        updates = {n: (idx, e) for (n, (idx, _)), e in zip(updates.items(), shared)}
        outputs = {n: (idx, e) for (n, (idx, _)), e in zip(outputs.items(), shared[len(updates):])}
        used = self._names_read(shared + [e for _, _, e in temps])
        per_step = [n for n in [i.name for i in self.rec.inputs] + hoisted_per_step if n in used]
        constant = [n for n in [p.name for p in self.rec.params] + hoisted_constant if n in used]
        names = {**py, **{n: f"{py.get(n, n)}_t" for n in per_step + constant}}
        for s in self.rec.states:
            names[s.name + NEW_SUFFIX] = py[s.name] + NEW_SUFFIX
        for n in constant:
            w(f"{names[n]} = {py.get(n, n)}[:, 0]  # the same at every step")
        require_state(self.rec)  # (a stateless body has no first step to tell apart)
        first = py[self.rec.states[0].name]
        for s in self.rec.states:
            # absent (`_zero_start`): the call gave no initial state, and the first step starts from zero
            w(f"{py[s.name]} = states.get('{s.name}')")
        for o in self.rec.outputs:
            w(f"{py[o.name]}_steps = []")
        w("checkpoints = []")
        w("for t in range(T_):")
        w("if every and t % every == 0:", 2)
        w(f"checkpoints.append({{{', '.join(f'{s.name!r}: {py[s.name]}' for s in self.rec.states)}}})", 3)
        for n in per_step:
            w(f"{names[n]} = {py.get(n, n)}[:, t]", 2)
        for n in temps:
            names[n[0]] = self.shown[n[0]] = self._unique(self._describe(n[2], self.a.ir.ranges))
        old = {s.name for s in self.rec.states}  # the states before the step (not their `__new` values)
        zero = [(n, idx, _zero_states(e, old)) for n, idx, e in temps]
        zero_updates = {n: (idx, _zero_states(e, old)) for n, (idx, e) in updates.items()}
        zero_outputs = {n: (idx, _zero_states(e, old)) for n, (idx, e) in outputs.items()}
        for n, (_, e) in [(n, (i, e)) for n, i, e in zero] + list(zero_updates.items()) + list(zero_outputs.items()):
            if undefined(e):  # (`1e400 * h[d]`: inf * 0) NaN for every input, as in the reference
                raise undefined_from_zero(self.rec, n)
        if (zero, zero_updates) != (temps, updates) or zero_outputs != outputs:
            # The step from a zero state, with the terms that read it left out: no zero state is made or multiplied.
            # An output that reads only the new states is the same in both and follows them.
            same = {n: v for n, v in outputs.items() if zero_outputs[n] == v}
            w(f"if {first} is None:  # the first step, from a zero state", 2)
            self._write_step(w, zero, zero_updates, {n: v for n, v in zero_outputs.items() if n not in same}, names, 3)
            w("else:", 2)
            self._write_step(w, temps, updates, {n: v for n, v in outputs.items() if n not in same}, names, 3)
            self._write_step(w, [], {}, same, names, 2)
        else:
            self._write_step(w, temps, updates, outputs, names, 2)
        for s in self.rec.states:
            w(f"{py[s.name]} = {py[s.name]}{NEW_SUFFIX}", 2)
        for s in self.rec.states:  # no steps: the zero start is the final state
            w(f"{py[s.name]} = {py[s.name]} if {py[s.name]} is not None else "
              f"{py[self.rec.inputs[0].name]}.new_zeros({self._state_shape(s)})")
        outs = ", ".join(f"'{o.name}': _stack_steps({py[o.name]}_steps, B_, H_, "
                         f"({''.join(f'{self._dim(d)}, ' for d in o.dims)}), {py[self.rec.inputs[0].name]})"
                         for o in self.rec.outputs)
        finals = ", ".join(f"'{s.name}': {py[s.name]}" for s in self.rec.states)
        w(f"return {{{outs}}}, {{{finals}}}, checkpoints")
        return w.text()

    def _write_step(self, w: SourceWriter, temps, updates: dict, outputs: dict, names: dict, indent: int) -> None:
        """One step of the recurrent loop: the shared subexpressions `temps` (named in `names` already), the states'
        new values and the outputs' values appended to their lists."""
        py = self.py
        printer = TorchPrinter(self.sizes, self.a.ir.ranges, names, fuse=True)
        for name, idx, e in temps:
            dims = "".join(f", {self._range_dim(self.a.ir.ranges[i])}" for i in idx)
            w(f"{names[name]} = {self._broadcast(printer, e, idx, f'(B_, H_{dims})')}  # used more than once", indent)
        for s in [s for s in self._update_order() if s.name in updates]:
            idx, e = updates[s.name]
            value = self._broadcast(printer, e, idx, self._state_shape(s))
            if _leaf(e) and not is_constant(e, self.sizes):
                value += ".clone()"  # a step's input as it is (from a zero state): the state must not be a view of it
            w(f"{py[s.name]}{NEW_SUFFIX} = {value}  # {self.cite[s.name]}", indent)
        for o in [o for o in self.rec.outputs if o.name in outputs]:
            idx, e = outputs[o.name]
            dims = "".join(f", {self._dim(d)}" for d in o.dims)
            w(f"{py[o.name]}_steps.append({self._broadcast(printer, e, idx, f'(B_, H_{dims})')})  "
              f"# {self.cite[o.name]}", indent)

    def write_recurrent_adjoint(self, adj) -> str:
        """The backward of the step loop, printed from the adjoint step that `recurrence_dsl.adjoint` derives
        symbolically from the spec (no autograd). Segment by segment from the last, the Python loops over steps do
        only what is sequential: the segment's states are recomputed from its checkpoint into a buffer
        [every + 1, B, H, ...] (time-major, so a run of steps is one contiguous slice), and the states' gradients
        run back through its steps, the total gradient of each state after a step kept in a buffer
        [every, B, H, ...]. Every input's and param's gradient is local to its step given the states before and
        after it and that total gradient, so the same printed expressions are evaluated once for each `block`
        consecutive steps, on their slices of the buffers (batched over time), as soon as the reverse loop has
        passed them: the dispatcher picks `block` so that those slices stay in cache (codegen/dispatch.py
        `adjoint_block`). Where they apply, a state's update has its state-free terms written for the whole segment
        at once (`_split_updates`), and the reverse loop writes the readout terms of a block's total gradients at
        once and adds each step's backward map in place (`_readout_blocks`, `_write_blocked_reverse`). Where the
        update and the backward map are linear in the states, both loops are printed as in-place terms with
        coefficients made per segment, and each contraction of a state or its gradient with a vector (the delta
        rule's `k^T S`, `k^T dS`) is one `bmm` a step into a buffer the block gradients read (`_product_plan`,
        `_write_product_recompute`, `_write_product_reverse`)."""
        self.shown, self.taken = {}, set()
        rec, py = self.rec, self.py
        # Names of the spec's values at one step (x_t, S__new) are taken too; `alloc` gives out the others.
        self.taken = {f"{v}{suffix}" for v in py.values() for suffix in ("_t", NEW_SUFFIX)}

        def alloc(name: str) -> str:
            taken = set(py.values()) | set(self.shown.values()) | self.taken
            candidate, n = name, 2
            while candidate in taken:
                candidate, n = f"{name}_{n}", n + 1
            self.taken.add(candidate)
            return candidate

        grad = {o.name: alloc(f"grad_{py[o.name]}") for o in rec.outputs}  # [B, T, H, ...]
        grad_t = {o.name: alloc(f"grad_{py[o.name]}_t") for o in rec.outputs}
        for x in rec.inputs + rec.params:
            grad[x.name] = alloc(f"grad_{py[x.name]}")
        carried = {s.name: alloc(f"grad_{py[s.name]}") for s in rec.states}  # d/dS_t from after step t
        total = {s.name: alloc(f"grad_{py[s.name]}{NEW_SUFFIX}") for s in rec.states}  # d/dS_t, all of it
        state_names = [s.name for s in rec.states]
        new_names = {s + NEW_SUFFIX for s in state_names}
        carried_names = {grad_name(s) for s in state_names}
        total_names = {grad_name(s + NEW_SUFFIX) for s in state_names}
        out_grads = {grad_name(o.name) for o in rec.outputs}
        whole = set(state_names) | new_names | carried_names | total_names  # always [B, H, ...] in full
        ranges = adj.ranges
        table: dict = {}
        counter = itertools.count()

        def hoist(d, nest=True):
            # (sums over several indices nested, so that a contraction two gradients share is one sum node)
            e = factor_sums(nest_sums(d.expr, ranges)) if nest else d.expr
            return d.indices, self._hoist(e, table, counter, self.state_names | carried_names | total_names, ranges)

        updates = {n: hoist(d, nest=False) for n, d in self.a.ir.updates.items()}  # as the loop prints them
        new_states = [(d.name, hoist(d)) for d in adj.new_states]
        previous = {n: hoist(d) for n, d in adj.previous.items()}
        local = [x for x in rec.inputs + rec.params if {**adj.inputs, **adj.params}[x.name] is not None]
        grads = {x.name: hoist({**adj.inputs, **adj.params}[x.name]) for x in local}
        updates_ir, previous_ir, grads_ir = dict(updates), dict(previous), dict(grads)  # before sharing
        new_states_ir = list(new_states)
        per_step_hoisted, constant_hoisted = self._hoisted_kinds(table, {i.name for i in rec.inputs} | out_grads)
        shown = dict(self.shown)

        # Subexpressions used more than once: at a step of the recomputation; at a step of the adjoint; in the
        # gradients of a block of steps.
        temp_counter = itertools.count()
        shared, update_temps = self._share([e for _, e in updates.values()], ranges, new_names, temp_counter)
        updates = {n: (idx, e) for (n, (idx, _)), e in zip(updates.items(), shared)}
        shared, loop_temps = self._share([e for _, (_, e) in new_states] + [e for _, e in previous.values()], ranges,
                                         carried_names | total_names, temp_counter)
        new_states = [(n, (idx, e)) for (n, (idx, _)), e in zip(new_states, shared)]
        previous = {n: (idx, e) for (n, (idx, _)), e in zip(previous.items(), shared[len(new_states):])}
        shared, local_temps = self._share([e for _, e in grads.values()], ranges, set(), temp_counter)
        grads = {n: (grads[n][0], e) for n, e in zip(grads, shared)}

        update_exprs = [e for _, e in updates.values()] + [e for _, _, e in update_temps]
        loop_exprs = ([e for _, (_, e) in new_states] + [e for _, e in previous.values()]
                      + [e for _, _, e in loop_temps])
        read_update = self._names_read(update_exprs)
        read_loop = self._names_read(loop_exprs)
        read_local = self._names_read([e for _, e in grads.values()] + [e for _, _, e in local_temps])
        read_hoisted = self._names_read([e for name, _, e, _ in table.values() if name in per_step_hoisted])
        # The states kept in a buffer over the segment: those the adjoint reads, before (S) or after (S__new) a
        # step; a state none of it reads is recomputed in a variable only (a kept state's update may read it).
        keep = [s for s in rec.states if {s.name, s.name + NEW_SUFFIX} & (read_local | read_loop)]
        kept = {s.name for s in keep}
        # The total gradients after each step that the block gradients read, kept in a buffer over the segment.
        stacked = [s for s in rec.states if grad_name(s.name + NEW_SUFFIX) in read_local]
        # Split updates (see `_split_updates`): a kept state's update `U + c * S` (U free of every state) has U
        # written for the whole segment at once and only `c * S` added per step, in place.
        split = self._split_updates(updates, kept) if not update_temps else {}
        # The reverse loop in blocks (see `_readout_blocks`): each total gradient `S__grad + R` has its readout
        # terms R (free of the gradients carried back) written for a block of steps at once.
        # (Subexpressions the totals share, such as a normaliser's denominator, are then computed for the block too;
        # not where one reads a gradient carried back or the backward maps read one.)
        temp_names = {n for n, _, _ in loop_temps}
        readouts = (self._readout_blocks(new_states, previous, carried_names, total_names)
                    if not any(reads(e, carried_names | total_names) for _, _, e in loop_temps)
                    and not any(reads(e, temp_names) for _, e in previous.values()) else None)
        if readouts is not None:
            stacked = list(rec.states)  # every total gradient in a buffer: the reverse loop accumulates into it
        # The delta-rule family's per-step products (`_product_plan`): both loops then read only buffers and lists
        # made per segment, and the block gradients read the products instead of contracting again.
        plan = (self._product_plan(updates_ir, previous_ir, ranges,
                                   {s.name: grad_name(s.name + NEW_SUFFIX) for s in rec.states})
                if readouts is not None and len(keep) == len(rec.states) else None)
        products = plan["products"] if plan is not None else {}
        if plan is not None:
            split = {}
            local_exprs = [self._substitute_products(e, products, ranges) for _, e in grads_ir.values()]
            readouts_ir = self._readout_blocks(new_states_ir, previous_ir, carried_names, total_names)
            if readouts_ir is not None:
                # The readout terms and the block gradients share their subexpressions free of the gradients
                # (normalised attention's q^T S and q^T z), computed once at the block's start.
                # (not those reading a gradient, nor a product with one, known only after the reverse loop)
                of_gradients = {p[0] for p in products.values() if str(p[3].base) in total_names}
                shared, loop_temps = self._share(list(readouts_ir.values()) + local_exprs, ranges,
                                                 carried_names | total_names | of_gradients, temp_counter)
                readouts, local_exprs = dict(zip(readouts_ir, shared[:len(readouts_ir)])), shared[len(readouts_ir):]
            shared, local_temps = self._share(local_exprs, ranges, set(), temp_counter)
            grads = {n: (grads_ir[n][0], e) for n, e in zip(grads_ir, shared)}
        # What the loops read at each step: a split update only its state-dependent terms, the blocked reverse loop
        # only the states' backward maps.
        step_update = self._names_read([e for n, (_, e) in updates.items() if n not in split]
                                       + [x for n in split for x in split[n][1]] + [e for _, _, e in update_temps])
        step_loop = self._names_read([e for _, e in previous.values()]) if readouts is not None else read_loop
        if plan is not None:
            step_update, step_loop = set(), set()
        state_buffer = {s.name: alloc(f"{py[s.name]}_steps") for s in keep}  # [every + 1, B, H, ...]
        state_at = {s.name: alloc(f"{py[s.name]}_at") for s in keep}  # its views, one per step
        total_buffer = {s.name: alloc(f"{total[s.name]}_steps") for s in stacked}  # [every, B, H, ...]
        total_at = {s.name: alloc(f"{total[s.name]}_at") for s in stacked}

        # The segment's per-step values, time-major [t1 - t0, B, H, ...] (the grad outputs' too).
        read_any = read_update | read_loop | read_local | read_hoisted
        seg = {}
        for i in rec.inputs:
            if i.name in read_any:
                seg[i.name] = alloc(f"{py[i.name]}_seg")
        for o in rec.outputs:
            if grad_name(o.name) in read_any:
                seg[grad_name(o.name)] = alloc(f"{grad[o.name]}_seg")
        for n in per_step_hoisted:
            seg[n] = shown[n]
        # ... and as lists of their steps, for the loops (a list index is cheaper than a slice).
        unbound = {n: alloc(f"{seg[n][:-len('_seg')] if seg[n].endswith('_seg') else seg[n]}_steps")
                   for n in seg if n in step_update | step_loop}

        segment = {**py, **shown, **seg}  # names over the segment's steps
        step = {**py, **shown}  # names at one step t
        for n in [i.name for i in rec.inputs + rec.params] + per_step_hoisted + constant_hoisted:
            step[n] = f"{step.get(n, n)}_t"
        for o in rec.outputs:
            step[grad_name(o.name)] = grad_t[o.name]
        for s in rec.states:
            if s.name in kept:
                step[s.name] = f"{state_at[s.name]}[t]"
                step[s.name + NEW_SUFFIX] = f"{state_at[s.name]}[t + 1]"
            else:
                step[s.name + NEW_SUFFIX] = py[s.name] + NEW_SUFFIX
            step[grad_name(s.name)] = carried[s.name]
            step[grad_name(s.name + NEW_SUFFIX)] = f"{total_at[s.name]}[t]" if s in stacked else total[s.name]
        def block_names(lo: str, hi: str) -> dict:
            """Names over a block of steps lo .. hi - 1 of the segment: slices of its tensors and buffers."""
            block = {**py, **shown, **{n: f"{name}[{lo}:{hi}]" for n, name in seg.items()}}
            # (the temps printed at the block's start)
            block.update({n: self.shown[n] for n, _, _ in loop_temps if n in self.shown})
            for s in keep:
                block[s.name] = f"{state_buffer[s.name]}[{lo}:{hi}]"
                block[s.name + NEW_SUFFIX] = f"{state_buffer[s.name]}[{lo} + 1:{hi} + 1]"
            for s in stacked:
                block[grad_name(s.name + NEW_SUFFIX)] = f"{total_buffer[s.name]}[{lo}:{hi}]"
            for name, *_ in products.values():
                block[name] = f"{name}_steps[{lo}:{hi}]"
            return block

        w = SourceWriter()

        def fetch(used: set[str], indent: int) -> None:
            """The per-step values that expressions reading `used` need, at step t."""
            for n, name in unbound.items():
                if n in used:
                    w(f"{step[n]} = {name}[t]", indent)

        def dims_of(x) -> str:
            return "".join(f", {self._dim(d)}" for d in x.dims)

        args = ", ".join(self.args + ["checkpoints", "grad_outputs", "grad_states"] + [py[n] for n in rec.sizes])
        w(f"def {self.fn}__recurrent_adjoint{self.suffix}({args}, every=64, block=64):", 0)
        w(f'"""The backward of {self.fn}__recurrent_loop, derived from the step (recurrence_dsl/adjoint.py): the '
          "states' gradients")
        w("run backwards in time from grad_states, each segment of `every` steps recomputed from its checkpoint; the "
          "inputs'")
        w("and params' gradients for `block` steps at once, on slices of the segment's buffers.")
        w('Returns ([gradient of each input and param], {state: gradient of its initial value})."""')
        self._unpack_shape(w)
        for x in rec.inputs + rec.params:
            w(f"{grad[x.name]} = {py[x.name]}.new_zeros({py[x.name]}.shape)")
        self._params_to_time(w)
        for o in rec.outputs:
            w(f"{grad[o.name]} = grad_outputs['{o.name}']")
        for s in rec.states:
            w(f"{carried[s.name]} = grad_states['{s.name}']  # d loss / d {s.name} after the step, from the steps "
              "after it")
        by_name = {s.name: s for s in rec.states}
        if keep or stacked:
            w("# Buffers over a segment, time-major: the states before and after each step, the total gradient of "
              "each", 1)
            w("# state after each step (the block gradients read slices of them).", 1)
        for s in keep:
            w(f"{state_buffer[s.name]} = {carried[s.name]}.new_empty((min(every, T_) + 1, B_, H_{dims_of(s)}))", 1)
            w(f"{state_at[s.name]} = {state_buffer[s.name]}.unbind(0)", 1)
        for s in stacked:
            w(f"{total_buffer[s.name]} = {carried[s.name]}.new_empty((min(every, T_), B_, H_{dims_of(s)}))", 1)
            w(f"{total_at[s.name]} = {total_buffer[s.name]}.unbind(0)", 1)
        if plan is not None:
            bmm = self._write_product_buffers(w, plan, ranges, state_buffer, total_buffer, carried, alloc)
        constant_printer = TorchPrinter(self.sizes, ranges, {**py, **shown})
        for n in constant_hoisted:
            _, idx, e, _ = next(v for v in table.values() if v[0] == n)
            w(f"{shown[n]} = {constant_printer.print_expr(e, idx)}  # [1, 1, H, ...]: the same at every step")
        for n in [p.name for p in rec.params] + constant_hoisted:
            if n in step_update | step_loop:
                w(f"{step[n]} = {({**py, **shown})[n]}[:, 0]  # the same at every step")
        w("for t0 in reversed(range(0, T_, every)):")
        w("t1 = min(t0 + every, T_)", 2)
        for n, name in seg.items():
            if n in per_step_hoisted:
                continue
            source = f"{py[n]}[:, t0:t1]" if n in py else f"{grad[n[:-len(GRAD_SUFFIX)]]}[:, t0:t1]"
            dims = next(x for x in rec.inputs + rec.outputs if x.name == n.removesuffix(GRAD_SUFFIX)).dims
            w(f"{name} = {source}.transpose(0, 1)  # [t1 - t0, B, H{''.join(f', {self._dim(d)}' for d in dims)}]",
              2)
        if per_step_hoisted:
            w("# Hoisted: state-free subexpressions at the segment's steps.", 2)
        segment_printer = TorchPrinter(self.sizes, ranges, segment)
        for n in per_step_hoisted:
            _, idx, e, _ = next(v for v in table.values() if v[0] == n)
            shape = "[t1 - t0, B, H" + "".join(f", {ranges[i]}" for i in idx) + "]"
            w(f"{shown[n]} = {segment_printer.print_expr(e, idx)}  # {shape}", 2)
        for n, name in unbound.items():
            w(f"{name} = {seg[n]}.unbind(0)", 2)
        if plan is not None:
            per_segment = self._write_product_segment(w, plan, ranges, segment_printer, alloc, set(seg))
            self._write_product_recompute(w, plan, ranges, segment_printer, state_buffer, state_at, bmm, per_segment,
                                          dims_of, whole, set(seg))
        elif keep:
            w("# The segment's states, recomputed from its checkpoint.", 2)
            for s in rec.states:
                if s.name in kept:
                    w(f"_copy_start({state_at[s.name]}[0], checkpoints[t0 // every]['{s.name}'])", 2)
                else:
                    w(f"{py[s.name]} = _start(checkpoints[t0 // every]['{s.name}'], {carried[s.name]})", 2)
            for name, (free, _) in split.items():
                idx = updates[name][0]
                target = f"{state_buffer[name]}[1:t1 - t0 + 1]"
                shape = f"(t1 - t0, B_, H_{dims_of(by_name[name])})"
                w(f"{self._fill(segment_printer, free, idx, target, shape, set(seg), whole)}  # the state-free terms "
                  f"of {name}'s update at every step", 2)
            w("for t in range(t1 - t0):", 2)
            fetch(step_update, 3)
            self._write_shared(w, update_temps, step, step, ranges, "B_, H_", 3)
            step_printer = TorchPrinter(self.sizes, ranges, step, fuse=True)
            for s in self._update_order():
                idx, e = updates[s.name]
                if s.name in split:
                    for line in self._accumulate(step_printer, split[s.name][1], idx, step[s.name + NEW_SUFFIX]):
                        w(f"{line}  # {self.cite[s.name]}", 3)
                    continue
                value = self._broadcast(step_printer, e, idx, self._state_shape(s), whole)
                if s.name in kept:
                    w(f"{_into(value, step[s.name + NEW_SUFFIX])}  # {self.cite[s.name]}", 3)
                else:
                    w(f"{py[s.name]}{NEW_SUFFIX} = {value}  # {self.cite[s.name]}", 3)
            for s in rec.states:
                if s.name not in kept:
                    w(f"{py[s.name]} = {py[s.name]}{NEW_SUFFIX}", 3)
        if readouts is None:
            w("# The adjoint step, backwards in time: the gradient of the state before the step from the one after;",
              2)
            w("# the gradients of the inputs and params at a block of steps once the loop has passed them.", 2)
            w("for t in reversed(range(t1 - t0)):", 2)
            fetch(read_loop, 3)
            self._write_shared(w, loop_temps, step, step, ranges, "B_, H_", 3)
            step_printer = TorchPrinter(self.sizes, ranges, step, fuse=True)
            for name, (idx, e) in new_states:
                s = by_name[name[: -len(NEW_SUFFIX + GRAD_SUFFIX)]]
                value = self._broadcast(step_printer, e, idx, self._state_shape(s), whole)
                if s in stacked:
                    w(f"{_into(value, step[grad_name(s.name + NEW_SUFFIX)])}  # d loss / d {s.name} after step t", 3)
                else:
                    w(f"{total[s.name]} = {value}  # d loss / d {s.name} after step t", 3)
            for s in rec.states:
                idx, e = previous[s.name]
                w(f"{carried[s.name]} = {self._broadcast(step_printer, e, idx, self._state_shape(s), whole)}  "
                  f"# d loss / d {s.name} before step t", 3)
        def block_gradients(lo: str, hi: str, indent: int) -> None:
            """Each input's and param's gradient at the steps lo .. hi - 1 of the segment, all at once."""
            block = block_names(lo, hi)
            self._write_shared(w, local_temps, block, block, ranges, f"{hi} - {lo}, B_, H_", indent)
            block_printer = TorchPrinter(self.sizes, ranges, block, fuse=True)
            for x in local:
                idx, e = grads[x.name]
                value = self._broadcast(block_printer, e, idx, f"({hi} - {lo}, B_, H_{dims_of(x)})",
                                        None if x in rec.inputs else whole)
                outer = None if x in rec.inputs else self._outer_sum(block_printer, e, idx, ranges, whole, hi, lo)
                if x in rec.inputs:
                    w(f"{grad[x.name]}[:, t0 + {lo}:t0 + {hi}] = ({value}).transpose(0, 1)", indent)
                elif outer is not None:
                    w(f"{grad[x.name]} = {grad[x.name]} + {outer}  # summed over the block's steps and rows", indent)
                else:
                    w(f"{grad[x.name]} = {grad[x.name]} + ({value}).sum((0, 1))", indent)

        if plan is not None:
            self._write_product_reverse(w, plan, readouts, previous, block_names, block_gradients if grads else None,
                                        by_name, carried, total_at, total_buffer, bmm, per_segment, dims_of, ranges,
                                        whole, loop_temps)
        elif readouts is not None:
            self._write_blocked_reverse(w, readouts, previous, block_names, block_gradients if grads else None,
                                        step, fetch, step_loop, by_name, carried, total_at, total_buffer, dims_of,
                                        ranges, whole, loop_temps)
        if grads and readouts is None:
            w("if t % block == 0:  # each input's and param's gradient at steps t .. t2 - 1, all at once", 3)
            w("t2 = min(t + block, t1 - t0)", 4)
            block_gradients("t", "t2", 4)
        w(f"return [{', '.join(grad[x.name] for x in rec.inputs + rec.params)}], "
          f"{{{', '.join(f'{s.name!r}: {carried[s.name]}' for s in rec.states)}}}")
        return w.text()

    def _split_updates(self, updates: dict, kept: set[str]) -> dict[str, tuple[sympy.Expr, list]]:
        """{state: (U, [term])} for each kept state whose update (IR, as the recomputation prints it) is a sum
        `U + term` with U free of every state and one term reading states (`exp(g[i]) * S[i, j]`, or `S[i, j]`):
        the recomputation then writes U for the whole segment at once and adds the term per step in place, one
        pass over the state per step rather than two (`c * S` formed, then `+ k v^T`)."""
        split = {}
        for s in self.rec.states:
            if s.name not in kept:
                continue
            _, e = updates[s.name]
            terms = sympy.Add.make_args(e)
            free = [x for x in terms if not self._mentions_state(x)]
            dependent = [x for x in terms if self._mentions_state(x)]
            if free and len(dependent) == 1 and not is_constant(sympy.Add(*free), self.sizes):
                split[s.name] = (sympy.Add(*free), dependent)
        return split

    def _product_plan(self, updates: dict, previous: dict, ranges: dict, totals: dict) -> dict | None:
        """The loops' terms and the delta-rule family's per-step products, or None. Applies when every state's update
        (IR, hoisted) is `U + sum over readers of c * reader`, U free of the states and not zero, and every state's
        gradient before a step is `sum over readers of c * reader` of its own total gradient, each reader the state
        (or its total) itself or its contraction with a state-free vector (`_linear_terms`, `_contraction`).
        Returns {"update": {state: (U, [(reader, c)], indices)}, "previous": {state: [(reader, c)]},
        "products": {canonical key: (name, reader, c, X)}}: each contraction (`k^T S`, `k^T dS`) is computed once
        per step into a buffer over the segment (a [1, K] @ [K, V] `bmm`), which the block gradients read too, and
        each coefficient (`-beta k`) once per segment, so that a step is a `bmm`, an `add_` and an `addcmul_`.
        `totals`: state -> the IR name of its total gradient after a step."""
        products: dict = {}

        def group(e, readers: set[str], idx, own: str):
            terms = _linear_terms(e, readers)
            if terms is None:
                return None
            by_reader: dict = {}
            for c, r in terms:
                if r is None:
                    continue
                if isinstance(r, sympy.Indexed):
                    if str(r.base) != own or tuple(r.indices) != tuple(idx):
                        return None  # another state, or this one transposed
                else:
                    found = _contraction(r, readers, ranges)
                    if found is None:
                        return None
                    key = canonical_key(r, ranges)
                    if key[0] not in products:
                        products[key[0]] = (self._unique(self._describe(r, ranges)), r, found[0], found[1], key[1])
                        self.taken.add(products[key[0]][0])
                entry = by_reader.setdefault(canonical_bound(r), [r, sympy.Integer(0)])
                entry[1] += c
            return sympy.Add(*[c for c, r in terms if r is None]), [(r, c) for r, c in by_reader.values()]

        plan: dict = {"update": {}, "previous": {}}
        for s in self.rec.states:
            idx, e = updates[s.name]
            found = group(e, {x.name for x in self.rec.states}, idx, s.name)
            if found is None or found[0] == 0:
                return None
            plan["update"][s.name] = (*found, idx)
            idx, e = previous[s.name]
            found = group(e, {totals[s.name]}, idx, totals[s.name])
            if found is None or found[0] != 0 or not any(isinstance(r, sympy.Indexed) for r, _ in found[1]):
                return None
            plan["previous"][s.name] = found[1]
            plan.setdefault("previous_idx", {})[s.name] = idx
        plan["products"] = products
        return plan

    def _state_of(self, x: str) -> str:
        """The state whose value (S) or total gradient (S__new__grad) the IR name `x` is."""
        return x[: -len(NEW_SUFFIX + GRAD_SUFFIX)] if x.endswith(NEW_SUFFIX + GRAD_SUFFIX) else x

    def _write_product_buffers(self, w: SourceWriter, plan: dict, ranges: dict, state_buffer: dict,
                               total_buffer: dict, carried: dict, alloc) -> dict[str, str]:
        """The per-step products' buffers [every, B, H, V] (allocated once) with their views: [B * H, 1, V] per step
        for `bmm`'s out=, and placed against the state's axes for `addcmul_`; and the [B * H, K, V] views of the
        matrices they contract. Returns {IR name of each contracted matrix: its views}."""
        bmm: dict[str, str] = {}
        if plan["products"]:
            w("# The per-step products (a matrix contracted with a vector, one bmm a step) over a segment, and the", 1)
            w("# [B * H, K, V] views of the buffers they contract.", 1)
        for name, _, _, x, _ in plan["products"].values():
            s = self._state_of(str(x.base))
            buffer = state_buffer[s] if str(x.base) == s else total_buffer[s]
            rows, cols = (self._range_dim(ranges[i]) for i in x.indices)
            if str(x.base) not in bmm:
                bmm[str(x.base)] = alloc(f"{buffer.removesuffix('_steps')}_bmm")
                # (the steps' count, not -1: with B = 0 the buffer is empty and -1 is ambiguous)
                w(f"{bmm[str(x.base)]} = {buffer}.view(len({buffer}), B_ * H_, {rows}, {cols}).unbind(0)", 1)
            idx = plan["update"][s][2] if str(x.base) == s else plan["previous_idx"][s]
            free = x.indices[1]
            placed = TorchPrinter(self.sizes, ranges, {})._place(f"{name}_steps", (free,), tuple(idx))
            w(f"{name}_steps = {carried[s]}.new_empty((min(every, T_), B_, H_, {cols}))", 1)
            w(f"{name}_bmm = {name}_steps.view(len({name}_steps), B_ * H_, 1, {cols}).unbind(0)", 1)
            w(f"{name}_at = {placed}.unbind(0)", 1)
        return bmm

    def _write_product_segment(self, w: SourceWriter, plan: dict, ranges: dict, printer: TorchPrinter,
                               alloc, per_step: set[str]) -> dict:
        """Per segment: each product's vector as [B * H, 1, K] per step and each coefficient of the loops' terms
        placed against its state's axes, both as lists of steps. Returns {"vector": {product key: name},
        "coefficient": {(coefficient, indices): name}, "constant": names of those the same at every step}.
        `per_step`: the IR names that change per step."""
        made: dict = {"vector": {}, "coefficient": {}, "constant": set()}
        vectors: dict = {}
        lines = []
        for key, (_, _, c, x, _) in plan["products"].items():
            var = x.indices[0]
            c_key = canonical_key(c, ranges)[0]
            if c_key not in vectors:
                label = str(c.base) if isinstance(c, sympy.Indexed) else self._describe(c, ranges)
                vectors[c_key] = alloc(f"{self.py.get(label, label)}_bmm")
                lines.append(f"{vectors[c_key]} = ({printer.print_expr(c, (var,))}).reshape(t1 - t0, B_ * H_, 1, "
                             f"{self._range_dim(ranges[var])}).unbind(0)")
            made["vector"][key] = vectors[c_key]
        terms = [(idx, c) for _, (_, rs, idx) in plan["update"].items() for _, c in rs]
        terms += [(plan["previous_idx"][s], c) for s, rs in plan["previous"].items() for _, c in rs]
        for idx, c in terms:
            if is_constant(c, self.sizes) or (sympy.srepr(c), tuple(idx)) in made["coefficient"]:
                continue
            changes = reads(c, per_step)
            name = alloc(self._describe(c, ranges).removeprefix('pre_') + ("_steps" if changes else "_placed"))
            made["coefficient"][(sympy.srepr(c), tuple(idx))] = name
            if changes:
                lines.append(f"{name} = ({printer.print_expr(c, tuple(idx))}).unbind(0)")
            else:  # params only: the same at every step ([1, 1, H, ...] less its time axis)
                lines.append(f"{name} = ({printer.print_expr(c, tuple(idx))})[0]")
                made["constant"].add(name)
        if plan["products"]:
            w("# The vectors of the per-step products ([B * H, 1, K] a step) and the coefficients of the terms", 2)
            w("# that read the states and their gradients in the loops, for the segment's steps.", 2)
        elif lines:
            w("# The coefficients of the terms that read the states and their gradients in the loops, placed", 2)
            w("# against the states' axes, for the segment's steps.", 2)
        for line in lines:
            w(line, 2)
        return made

    def _term_line(self, target: str, reader: str, c: sympy.Expr, idx, made: dict, printer: TorchPrinter,
                   new: str | None = None) -> str:
        """Source adding `c * reader` at step t into `target` in place (`new`: into a new tensor of that name)."""
        if is_constant(c, self.sizes):
            if new is not None:
                return f"{new} = {reader}.clone()" if c == 1 else f"{new} = {reader} * {printer.print_expr(c, ())}"
            return f"{target}.add_({reader})" if c == 1 else \
                f"{target}.add_({reader}, alpha={printer.print_expr(c, ())})"
        coefficient = made["coefficient"][(sympy.srepr(c), tuple(idx))]
        if coefficient not in made["constant"]:
            coefficient += "[t]"
        if new is not None:
            return f"{new} = {coefficient} * {reader}"
        return f"{target}.addcmul_({coefficient}, {reader})"

    def _reader(self, reader: sympy.Expr, plan: dict, ranges: dict, buffer_at: str) -> str:
        """The step-t source of a term's reader: the state's (or total gradient's) buffer, or a product's."""
        if isinstance(reader, sympy.Indexed):
            return f"{buffer_at}[t]"
        return f"{plan['products'][canonical_key(reader, ranges)[0]][0]}_at[t]"

    def _write_product_recompute(self, w: SourceWriter, plan: dict, ranges: dict, printer: TorchPrinter,
                                 state_buffer: dict, state_at: dict, bmm: dict, made: dict, dims_of, whole,
                                 per_step: set[str]) -> None:
        """The recomputation of a segment's states under `_product_plan`: each update's state-free terms for the
        whole segment in one op, then per step the products with the state before it (kept for the block
        gradients) and each term reading the state added in place."""
        w("# The segment's states, recomputed from its checkpoint: each update's state-free terms for the whole", 2)
        w("# segment at once, then per step the terms that read the state before it, in place"
          + (" (its products first)." if plan["products"] else "."), 2)
        by_name = {s.name: s for s in self.rec.states}
        for s in self.rec.states:
            w(f"_copy_start({state_at[s.name]}[0], checkpoints[t0 // every]['{s.name}'])", 2)
        for s in self.rec.states:
            free, _, idx = plan["update"][s.name]
            shape = f"(t1 - t0, B_, H_{dims_of(by_name[s.name])})"
            w(f"{self._fill(printer, free, idx, f'{state_buffer[s.name]}[1:t1 - t0 + 1]', shape, per_step, whole)}"
              f"  # the state-free terms of {s.name}'s update at every step", 2)
        w("for t in range(t1 - t0):", 2)
        for key, (name, reader, _, x, _) in plan["products"].items():
            if str(x.base) in {s.name for s in self.rec.states}:
                w(f"torch.bmm({made['vector'][key]}[t], {bmm[str(x.base)]}[t], out={name}_bmm[t])  "
                  f"# {self._describe(reader, ranges)} before step t", 3)
        for s in self._update_order():
            _, terms, idx = plan["update"][s.name]
            for reader, c in terms:
                source = self._reader(reader, plan, ranges, state_at[s.name])
                w(f"{self._term_line(f'{state_at[s.name]}[t + 1]', source, c, idx, made, printer)}  "
                  f"# {self.cite[s.name]}", 3)

    def _write_product_reverse(self, w: SourceWriter, plan: dict, readouts: dict, previous: dict, block_names,
                               block_gradients, by_name: dict, carried: dict, total_at: dict, total_buffer: dict,
                               bmm: dict, made: dict, dims_of, ranges: dict, whole: set[str], temps=()) -> None:
        """The blocked reverse loop (`_write_blocked_reverse`) under `_product_plan`: within a block, from its last
        step, the products with each total gradient (kept for the block gradients) and then the backward map of
        step t added into the total of step t - 1; the map of a block's first step is added at the start of the
        block before it, once its readout terms are written."""
        w("# The adjoint, backwards in time, a block of steps t2 .. t3 - 1 at a time (from the last): the readout "
          "terms of", 2)
        reverse = [(key, p) for key, p in plan["products"].items() if str(p[3].base) not in
                   {s.name for s in self.rec.states}]
        if reverse:
            w("# each state's total gradient for the whole block at once; then step by step the products with the "
              "total of", 2)
            w("# step t, and the backward map of step t added in place into the total of step t - 1 (that of step t2 "
              "at the", 2)
            w("# start of the block before); then the inputs' and params' gradients at the block.", 2)
        else:
            w("# each state's total gradient for the whole block at once; then step by step the backward map of step t "
              "added in", 2)
            w("# place into the total of step t - 1 (that of step t2 at the start of the block before); then the "
              "inputs' and", 2)
            w("# params' gradients at the block.", 2)
        w("for t2 in reversed(range(0, t1 - t0, block)):", 2)
        w("t3 = min(t2 + block, t1 - t0)", 3)
        block = block_names("t2", "t3")
        self._write_shared(w, temps, block, block, ranges, "t3 - t2, B_, H_", 3)
        block_printer = TorchPrinter(self.sizes, ranges, block, fuse=True)
        per_step = {n for n, source in block.items() if "[t2" in source}
        printer = TorchPrinter(self.sizes, ranges, {}, fuse=True)
        for s in readouts:
            idx = previous[s][0]
            shape = f"(t3 - t2, B_, H_{dims_of(by_name[s])})"
            w(f"{self._fill(block_printer, readouts[s], idx, f'{total_buffer[s]}[t2:t3]', shape, per_step, whole)}"
              f"  # d loss / d {s} after each step, from its outputs", 3)

        def backward_map(indent: int) -> None:
            for s in readouts:
                idx = plan["previous_idx"][s]
                for reader, c in plan["previous"][s]:
                    source = self._reader(reader, plan, ranges, total_at[s])
                    w(f"{self._term_line(f'{total_at[s]}[t - 1]', source, c, idx, made, printer)}  "
                      f"# d loss / d {s} before step t", indent)

        w("if t3 == t1 - t0:  # the segment's last step: the gradient from the steps after it", 3)
        for s in readouts:
            w(f"{total_at[s]}[t3 - 1].add_({carried[s]})", 4)
        w("else:  # the backward map of step t3 (the block after this one's first)", 3)
        w("t = t3", 4)
        backward_map(4)
        if reverse:
            w("for t in reversed(range(t2, t3)):", 3)
            for key, (name, reader, _, x, _) in reverse:
                w(f"torch.bmm({made['vector'][key]}[t], {bmm[str(x.base)]}[t], out={name}_bmm[t])  "
                  f"# {self._describe(reader, ranges)} after step t", 4)
            w("if t > t2:", 4)
            backward_map(5)
        else:
            w("for t in reversed(range(t2 + 1, t3)):", 3)
            backward_map(4)
        if block_gradients is not None:
            block_gradients("t2", "t3", 3)
        w("t = 0", 2)
        for s in readouts:
            idx = plan["previous_idx"][s]
            terms = sorted(plan["previous"][s], key=lambda rc: not isinstance(rc[0], sympy.Indexed))
            for n, (reader, c) in enumerate(terms):
                source = self._reader(reader, plan, ranges, total_at[s])
                w(f"{self._term_line(carried[s], source, c, idx, made, printer, new=carried[s] if n == 0 else None)}"
                  f"  # d loss / d {s} before the segment", 2)

    def _substitute_products(self, e: sympy.Expr, products: dict, ranges: dict) -> sympy.Expr:
        """`e` with each contraction equal to a per-step product (up to index names) read from its buffer."""
        if isinstance(e, (sympy.Indexed, sympy.Symbol, sympy.Number)) or not e.args:
            return e
        if isinstance(e, sympy.Sum):
            key, order = canonical_key(e, ranges)
            if key in products:
                name, _, _, _, first = products[key]
                return sympy.IndexedBase(name)[tuple(order)] if order else sympy.Symbol(name)
            return sympy.Sum(self._substitute_products(e.function, products, ranges), *e.limits)
        return e.func(*[self._substitute_products(a, products, ranges) for a in e.args])

    def _readout_blocks(self, new_states: list, previous: dict, carried_names: set[str],
                        total_names: set[str]) -> dict[str, sympy.Expr] | None:
        """{state: R} when every state's total gradient after a step is `S__grad + R`, R free of the gradients
        carried back (the outputs' and later states' terms: `q[i] * do[j]`), and every state's gradient before the
        step reads its own total gradient only (`exp(g[i]) * S__new__grad[i, j]`); else None. Then
        S__new__grad(t - 1) = R(t - 1) + (S__grad before step t), so the reverse loop writes R for a block of steps
        at once and adds the backward map of each step into the slot of the step before it, in place."""
        readouts = {}
        for name, (idx, e) in new_states:
            s = name[: -len(NEW_SUFFIX + GRAD_SUFFIX)]
            incoming = sympy.IndexedBase(grad_name(s))[idx] if idx else sympy.Symbol(grad_name(s))
            terms = list(sympy.Add.make_args(e))
            if incoming not in terms:
                return None
            rest = [x for x in terms if x != incoming]
            if any(reads(x, carried_names | total_names) for x in rest):
                return None
            readouts[s] = sympy.Add(*rest)
        for s, (_, e) in previous.items():
            if reads(e, carried_names | (total_names - {grad_name(s + NEW_SUFFIX)})):
                return None
        return readouts

    def _accumulate(self, printer: TorchPrinter, terms, idx, target: str) -> list[str]:
        """Source adding each of `terms` (over `idx`) into the existing tensor `target` in place: a product as
        `addcmul_` (its factor with the most axes times the others), a tensor times numbers as `add_(x, alpha=c)`,
        anything else as `add_`. No temporary of the target's size is formed."""
        lines = []
        for term in terms:
            factors = sympy.Mul.make_args(term)
            constant = sympy.Mul(*[f for f in factors if is_constant(f, self.sizes)])
            tensors = [f for f in factors if not is_constant(f, self.sizes)]
            if len(tensors) == 1 and (isinstance(term, sympy.Mul) or _leaf(term)):
                x = printer.print_expr(tensors[0], idx)
                lines.append(f"{target}.add_({x})" if constant == 1 else
                             f"{target}.add_({x}, alpha={printer.print_expr(constant, idx)})")
            elif len(tensors) > 1 and isinstance(term, sympy.Mul):
                k = max(range(len(tensors)), key=lambda n: len(printer._axes_of(tensors[n])))
                small = sympy.Mul(constant, *(tensors[:k] + tensors[k + 1:]))
                lines.append(f"{target}.addcmul_({printer.print_expr(small, idx)}, "
                             f"{printer.print_expr(tensors[k], idx)})")
            else:
                lines.append(f"{target}.add_({printer.print_expr(term, idx)})")
        return lines

    def _outer_products(self, printer: TorchPrinter, e: sympy.Expr, idx, shape: str, full) -> str | None:
        """`e` over two indices (i, j) as one matrix product when it is a sum of r >= 2 outer products
        `x_r[i] * y_r[j]` (the delta product's state-free terms `b1 k1 v1^T + b2 k2 v2^T + ...`):
        `torch.matmul(stack of x [..., K, r], stack of y [..., r, V])`, one pass over the result instead of a
        temporary per term. None otherwise. `shape`: the result's, ending in the two indices' sizes."""
        if len(idx) != 2 or not isinstance(e, sympy.Add):
            return None
        dims = [self._range_dim(printer.ranges[i]) for i in idx]
        if not shape.endswith(f", {dims[0]}, {dims[1]})"):
            return None
        lead = shape[: -len(f", {dims[0]}, {dims[1]})")]
        sides: tuple[list, list] = ([], [])
        for term in e.args:
            left, right = [], []
            for f in sympy.Mul.make_args(term):
                axes = printer._axes_of(f)
                if axes <= {idx[0]}:
                    left.append(f)
                elif axes == {idx[1]}:
                    right.append(f)
                else:
                    return None
            if not right or not any(printer._axes_of(f) for f in left):
                return None
            sides[0].append(self._broadcast(printer, sympy.Mul(*left), idx[:1], f"{lead}, {dims[0]})", full))
            sides[1].append(self._broadcast(printer, sympy.Mul(*right), idx[1:], f"{lead}, {dims[1]})", full))
        return f"torch.matmul(torch.stack([{', '.join(sides[0])}], -1), torch.stack([{', '.join(sides[1])}], -2))"

    def _fill(self, printer: TorchPrinter, e: sympy.Expr, idx, target: str, shape: str, per_step: set[str],
              full) -> str:
        """Source writing `e` (over `idx`, for a run of steps) into the existing tensor `target` of `shape`: a
        product of a per-step tensor and others over all of `idx` as `torch.mul(..., out=target)` (no temporary),
        else through `_into`; zero as `zero_()`."""
        if e == 0:
            return f"{target}.zero_()"
        outer = self._outer_products(printer, e, idx, shape, set(full or ()) | set(per_step))
        if outer is not None:
            return f"{outer[:-1]}, out={target})"
        tensors = [f for f in sympy.Mul.make_args(e) if not is_constant(f, self.sizes)]
        if (isinstance(e, sympy.Mul) and len(tensors) > 1 and printer._axes_of(e) == set(idx)
                and any(reads(f, per_step) for f in tensors)):
            constant = [f for f in sympy.Mul.make_args(e) if is_constant(f, self.sizes)]
            k = max(range(len(tensors)), key=lambda n: len(printer._axes_of(tensors[n])))
            small = sympy.Mul(*constant, *(tensors[:k] + tensors[k + 1:]))
            return (f"torch.mul({printer.print_expr(small, idx)}, {printer.print_expr(tensors[k], idx)}, "
                    f"out={target})")
        return _into(self._broadcast(printer, e, idx, shape, full), target)

    def _write_blocked_reverse(self, w: SourceWriter, readouts: dict, previous: dict, block_names, block_gradients,
                               step: dict, fetch, step_loop: set[str], by_name: dict, carried: dict, total_at: dict,
                               total_buffer: dict, dims_of, ranges: dict, whole: set[str], temps=()) -> None:
        """The reverse loop of `write_recurrent_adjoint` when `_readout_blocks` applies: a block of steps t2 .. t3 - 1
        at a time (from the last), the readout terms of every state's total gradient written for the whole block
        at once, then step by step the backward map of step t added into the total gradient of step t - 1 (in
        place), then the block's input and param gradients. The gradient before the segment's first step is the
        backward map of that step."""
        names = {s: s for s in readouts}
        w("# The adjoint, backwards in time, a block of steps t2 .. t3 - 1 at a time (from the last): the readout "
          "terms of", 2)
        w("# each state's total gradient for the whole block at once, then step by step the gradient of the state "
          "before", 2)
        w("# step t added in place into the total of step t - 1; then the inputs' and params' gradients at the "
          "block.", 2)
        w("for t2 in reversed(range(0, t1 - t0, block)):", 2)
        w("t3 = min(t2 + block, t1 - t0)", 3)
        block = block_names("t2", "t3")
        self._write_shared(w, temps, block, block, ranges, "t3 - t2, B_, H_", 3)
        block_printer = TorchPrinter(self.sizes, ranges, block, fuse=True)
        per_step = {n for n, source in block.items() if "[t2" in source}  # the block's slices
        for s in names:
            idx = previous[s][0]
            shape = f"(t3 - t2, B_, H_{dims_of(by_name[s])})"
            w(f"{self._fill(block_printer, readouts[s], idx, f'{total_buffer[s]}[t2:t3]', shape, per_step, whole)}"
              f"  # d loss / d {s} after each step, from its outputs", 3)
        w("if t3 == t1 - t0:  # the segment's last step: the gradient from the steps after it", 3)
        for s in names:
            w(f"{total_at[s]}[t3 - 1].add_({carried[s]})", 4)
        step_printer = TorchPrinter(self.sizes, ranges, step, fuse=True)
        carries = [f"{line}  # d loss / d {s} before step t" for s in names
                   for line in self._accumulate(step_printer, sympy.Add.make_args(previous[s][1])
                                                if previous[s][1] != 0 else (), previous[s][0],
                                                f"{total_at[s]}[t - 1]")]
        if carries:  # (none where no state's update reads a state: each step's gradient is then its readouts' alone)
            w("for t in reversed(range(t2 + 1, min(t3 + 1, t1 - t0))):", 3)
            fetch(step_loop, 4)
            for line in carries:
                w(line, 4)
        if block_gradients is not None:
            block_gradients("t2", "t3", 3)
        w("t = 0", 2)
        fetch(step_loop, 2)
        for s in names:
            idx, e = previous[s]
            value = self._broadcast(step_printer, e, idx, self._state_shape(by_name[s]), whole)
            if value == f"{total_at[s]}[t]":  # a view of the buffer, which the segment before overwrites
                value += ".clone()"
            w(f"{carried[s]} = {value}  # d loss / d {s} before the segment", 2)

    def _outer_sum(self, printer: TorchPrinter, e: sympy.Expr, idx, ranges, full, hi: str = "t2",
                   lo: str = "t") -> str | None:
        """A matrix param's gradient over a block, `e` summed over the block's steps and rows, as matrix products
        when every term of `e` is a product of factors over its first index and factors over its second: then
        sum over (t, b) of X[t, b, h, d] * Y[t, b, h, e] is X^T Y per head, instead of a [t, B, H, D, E] tensor of
        outer products summed (MinimalRNN's Uh, Uz); terms with the same Y share one product. None when a factor
        reads both indices (Mamba's A[d, n]). `full`: names already of the block's whole shape."""
        if len(idx) != 2:
            return None
        first, second = idx
        by_right: dict[sympy.Expr, list[sympy.Expr]] = {}
        for term in sympy.Add.make_args(e):
            sides: tuple[list, list] = ([], [])
            for factor in sympy.Mul.make_args(term):
                axes = {s for s in factor.free_symbols if s in ranges}
                if axes <= {first}:
                    sides[0].append(factor)
                elif axes <= {second}:
                    sides[1].append(factor)
                else:
                    return None
            by_right.setdefault(sympy.Mul(*sides[1]), []).append(sympy.Mul(*sides[0]))
        products = []
        for right, lefts in by_right.items():
            x, y = (self._broadcast(printer, side, (var,), f"({hi} - {lo}, B_, H_, {self._range_dim(ranges[var])})",
                                    full)
                    for side, var in ((sympy.Add(*lefts), first), (right, second)))
            products.append(f"({x}).flatten(0, 1).permute(1, 2, 0) @ ({y}).flatten(0, 1).transpose(0, 1)")
        return " + ".join(f"({p})" for p in products) if len(products) > 1 else products[0]

    # -- scan -----------------------------------------------------------------

    def write_scan(self) -> str | None:
        """The scan form (torch: `NAME__scan_block`, one block of steps run by dispatch's `in_blocks`; Triton:
        `NAME__scan_triton`, the whole sequence). Three pieces, each one autograd node: the prologue
        (`NAME__scan_prologue`: inputs and params -> each state's decay a_S and injection b_S, as
        s_t = a_t * s_(t-1) + b_t), the runtime's scan (its own backward), and the epilogue (`NAME__scan_epilogue`:
        the outputs from the states before and after each step, and the inputs). The prologue's and the epilogue's
        backwards are printed from sympy (`_write_printed_vjp`, as the chunked form's); the epilogue's VJP gives
        the states' gradients, which the scan's backward takes. The Triton form computes the prologue inside its
        scan kernels where it can (`_fused_scan`: a and b never stored, the prologue's VJP run on the kernels' da,
        db); else it calls the torch prologue, with a comment saying why."""
        if "scan" not in self.a.forms:
            return None
        w = SourceWriter()
        if self.options:
            # Triton: the scan kernels loop over chunks of steps themselves, so the whole sequence is one call.
            self._header(w, "scan", ", cu_seqlens=None, **options")
            w('"""Each state element as s_t = a_t * s_(t-1) + b_t, by an associative scan over time; cu_seqlens:')
            w('None, or int64 [N + 1] boundaries of N sequences packed in one row, scanned in the same launches."""')
        else:
            self._header(w, "scan_block")
            w('"""One block of steps: each state element as s_t = a_t * s_(t-1) + b_t, by an associative scan."""')
        self._unpack_shape(w)
        self._params_to_time(w)
        printer = TorchPrinter(self.sizes, self.a.ir.ranges, self.py)
        names = dict(self.py)
        prologue: list = []  # (Python name, IR expression, indices, dims, comment): NAME__scan_prologue's values
        at = len(w.lines)  # where the call of the prologue goes
        prev_lines = []  # the states before each step, for a fused call (`_fused_scan`)
        for s in self.rec.states:
            sa = self.a.states[s.name]
            dims = "".join(f", {self._dim(d)}" for d in s.dims)
            if sa.block is not None:
                if sa.block.states[0] == s.name:
                    self._write_block_scan(w, sa.block, s.dims, names, prologue)
                continue
            if is_constant(sa.diagonal, self.sizes):
                value = printer.print_expr(sa.diagonal, sa.indices)
                w(f"a_{s.name} = b_{s.name}.new_full((1,) * b_{s.name}.dim(), {value})  # a constant decay")
            else:
                prologue.append((f"a_{s.name}", sa.diagonal, tuple(sa.indices), tuple(s.dims), "decay"))
            prologue.append((f"b_{s.name}", sa.injection, tuple(sa.indices), tuple(s.dims), self.cite[s.name]))
            w(f"all_{s.name} = {self.rt}scan_diagonal(a_{s.name}, b_{s.name}, states['{s.name}']{self._scan_options})"
              f"  # [B, T, H{dims}]")
            if any(self._reads(d.expr, s.name) for d in self.a.ir.outputs.values()):
                w(f"prev_{s.name} = {self._previous(s.name)}")
                prev_lines.append(w.lines[-1])
            names[s.name] = f"prev_{s.name}"
            names[s.name + NEW_SUFFIX] = f"all_{s.name}"
        loop_end = len(w.lines)
        # The prologue and the epilogue are the same torch ops on either backend: the Triton scan form calls the
        # torch scan form's (printed before it in the module, codegen/module.py), so each is printed once.
        functions, fused_text = [], None
        if prologue:
            text, derived, call_args = self._write_printed_vjp(
                "scan_prologue", "The scan form's prologue: each state's decay a and injection b", prologue, [],
                self.a.ir.ranges, suffix="")
            functions.append(text)
            targets = ", ".join(v[0] for v in prologue) + ("," if len(prologue) == 1 else "")
            call = (f"{targets} = {self.fn}__scan_prologue({', '.join(call_args)})"
                    + ("" if derived else "  # differentiated by autograd"))
            vjp = f"{self.fn}__scan_prologue_vjp"
            self.unfused_why = "its VJP is not printed" if self.options and not derived else None
            fused = self._fused_scan(prologue, call_args) if self.options and derived else None
            if fused is not None:  # the prologue inside the scan kernels: a and b are never stored
                fused_text, lines = fused
                self.scan_fused = True
                w.lines[at:loop_end] = ["    " + line for line in lines] + prev_lines
            else:
                lines = [f"    # the prologue; its backward: {vjp}, printed from sympy"] if derived else []
                if self.unfused_why:  # (the Triton form: why its scan kernels do not compute a and b themselves)
                    lines.insert(0, f"    # in torch, not in the scan kernels: {self.unfused_why}")
                w.lines[at:at] = [*lines, "    " + call]
        outs, epilogue = [], []  # epilogue: the outputs computed from the states (Python name, IR expr, indices, dims)
        for o in self.rec.outputs:
            d = self.a.ir.outputs[o.name]
            bare = d.expr if isinstance(d.expr, (sympy.Indexed, sympy.Symbol)) else None
            name = str(getattr(bare, "base", bare))
            if bare is not None and name in self.state_names and tuple(getattr(bare, "indices", ())) == \
                    tuple(d.indices) and len(d.indices) == len(o.dims):
                w(f"{self.py[o.name]} = {names[name]}  # {self.cite[o.name]}")  # a state as it is: no epilogue
            else:
                epilogue.append((self.py[o.name], d.expr, tuple(d.indices), tuple(o.dims)))
            outs.append(f"'{o.name}': {self.py[o.name]}")
        if epilogue:
            used = self._names_read([e[1] for e in epilogue])
            reads = [(ir, names[ir]) for ir in sorted(self.state_names & used, key=lambda n: names[n])]
            text, derived, call_args = self._write_printed_vjp(
                "scan_epilogue",
                "The scan form's epilogue: its outputs from the states (all_S after each step, prev_S before it)",
                epilogue, reads, self.a.ir.ranges, suffix="")
            functions.append(text)
            if fused_text is not None:  # (this form takes half-precision inputs and params as they are)
                tensors = {self.py[x.name] for x in self.rec.inputs + self.rec.params}
                read = [a for a in call_args if a in tensors]
                if read:
                    w("# the epilogue in the states' dtype (half-precision inputs reach this form as they are)")
                for name in read:
                    w(f"{name} = {name}.to(all_{self.rec.states[0].name}.dtype)")
            targets = ", ".join(e[0] for e in epilogue) + ("," if len(epilogue) == 1 else "")
            cites = ", ".join(self.cite[o.name] for o in self.rec.outputs if self.py[o.name] in targets)
            w(f"{targets} = {self.fn}__scan_epilogue({', '.join(call_args)})  # {cites}"
              + ("" if derived else "; differentiated by autograd"))
        if self.options:  # (packed sequences: each one's last step)
            finals = ", ".join(f"'{s.name}': {self.rt}scan_final_states(all_{s.name}, states['{s.name}'], cu_seqlens)"
                               for s in self.rec.states)
        else:
            finals = ", ".join(f"'{s.name}': all_{s.name}[:, -1] if T_ else states['{s.name}']"
                               for s in self.rec.states)
        w(f"return {{{', '.join(outs)}}}, {{{finals}}}")
        if self.options:  # (the prologue and epilogue are the torch form's; the fused kernels this form's own)
            return w.text() if fused_text is None else f"{fused_text}\n\n{w.text()}"
        text = "\n\n".join(functions + [w.text()])
        outs = tuple(o.name for o in self.rec.outputs)
        sts = tuple(s.name for s in self.rec.states)
        return (f"{text}\n\n# The scan form: blocks of steps, the states carried from one to the next "
                "(dispatch's `in_blocks`).\n"
                f"{self.fn}__scan{self.suffix} = in_blocks({self.fn}__scan_block{self.suffix}, {len(self.rec.inputs)}, "
                f"{outs!r}, {sts!r})\n")

    @property
    def _scan_options(self) -> str:
        return ", cu_seqlens=cu_seqlens, **options" if self.options else ""

    def _previous(self, name: str) -> str:
        """The state before each step, from all_NAME (the state after it); packed: each sequence from its own."""
        if self.options:
            return f"{self.rt}scan_previous_states(all_{name}, states['{name}'], cu_seqlens)"
        # (the last step dropped after the cat: with T = 0 the result has T = 0 steps, not the initial state's one)
        return f"torch.cat([states['{name}'][:, None], all_{name}], dim=1)[:, :-1]"

    def _write_block_scan(self, w: SourceWriter, block, sym_dims, names: dict, prologue: list) -> None:
        """States coupled element by element: one scan of [m] vectors with [m, m] transitions per element. The
        coefficients and injections are values of the prologue (`prologue`), stacked here."""
        members = block.states
        group = "_".join(members)
        m = len(members)
        rows = []
        for r, row in enumerate(block.matrix):
            for c, coefficient in enumerate(row):
                prologue.append((f"a_{group}_{r}{c}", coefficient, tuple(block.indices), tuple(sym_dims),
                                 f"the coefficient of {members[c]} in {members[r]}'s update"))
            rows.append(f"torch.stack([{', '.join(f'a_{group}_{r}{c}' for c in range(m))}], dim=-1)")
        for r, injection in enumerate(block.injection):
            prologue.append((f"b_{group}_{r}", injection, tuple(block.indices), tuple(sym_dims), self.cite[members[r]]))
        w(f"a_{group} = torch.stack([{', '.join(rows)}], dim=-2)  # [B, T, H, ..., {m}, {m}]")
        w(f"b_{group} = torch.stack([{', '.join(f'b_{group}_{r}' for r in range(m))}], dim=-1)  # [B, T, H, ..., {m}]")
        init = ", ".join(f"states['{n}']" for n in members)
        w(f"all_{group} = {self.rt}scan_block(a_{group}, b_{group}, torch.stack([{init}], dim=-1)"
          f"{self._scan_options})")
        for r, n in enumerate(members):
            w(f"all_{n} = all_{group}[..., {r}]  # {self.cite[n]}")
            if any(self._reads(d.expr, n) for d in self.a.ir.outputs.values()):
                w(f"prev_{n} = {self._previous(n)}")
            names[n] = f"prev_{n}"
            names[n + NEW_SUFFIX] = f"all_{n}"

    def _unfused(self, why: str) -> None:
        """No fused scan kernels (`_fused_scan`): `why`, printed as a comment above the torch prologue's call."""
        self.unfused_why = why
        return None

    def _fused_scan(self, prologue: list, call_args: list) -> tuple[str, list[str]] | None:
        """The Triton scan form's prologue at the scan kernels' loads: (the source of three `@triton.jit`
        functions per state, the lines of the form that call them through the runtime's `fused_scan`), or None
        where the prologue cannot move into the kernels (the torch prologue and `scan_diagonal` then run, as
        before): a block scan (coupled states), or a value that is not elementwise per state lane: a sum or
        product over an axis, an input read at an index that is not one of the state's axes, anything the
        Triton printer does not print.

        A state S[*dims] of H heads is N = H * prod(dims) lanes per step; a lane's (h, *S) come from its number
        by div / mod, an input x[B, T, H, *x.dims] is gathered at its own axes' coordinates (mamba's x[d] and
        B[n] of h[d, n]) and a param [H, ...] once per program. `NAME__scan_S_steps` computes a_t and b_t of
        the same IR expressions the torch prologue prints (sa.diagonal, sa.injection), the forward kernel scans
        them as `_scan_fwd_kernel` does and stores s, the backward kernel recomputes a_(t+1) (not saved) and
        stores da, db [B, T, N] and dh0, which `NAME__scan_prologue_vjp` maps to the tensors' gradients."""
        rec, py = self.rec, self.py
        sizes = [py[n] for n in rec.sizes]
        tensors = [a for a in call_args if a not in sizes]
        by_py = {py[x.name]: x for x in rec.inputs + rec.params}
        params = {x.name for x in rec.params}
        if any(self.a.states[s.name].block is not None for s in rec.states):
            return self._unfused("coupled states scan as blocks")
        if any(t not in by_py for t in tensors):
            return self._unfused("the prologue reads a tensor that is neither an input nor a param")
        local = {"h0_", "s_", "cu_", "T_", "NL_", "H_", "BT", "BN", "VARLEN", "ds_", "da_", "db_", "dh0_", "row_",
                 "m_", "m_n_", "i_h_", "o_n_", "i_b_", "i_n_", "bos_", "b_h_", "i_t_", "o_t_", "a_", "b_", "A_",
                 "B_", "s_t_", "r_", "z_", "g_", "NT_", "i_r_", "off_", "m_next_", "a_next_", "b_next_", "ds_t_",
                 "G_", "g_t_", "m_prev_", "s_prev_", "b_h0_", "m_0_", "a_0_", "b_0_", "tl", "triton"}
        grad_bufs = {t: f"grad_{t}_" for t in tensors}  # the backward kernels' gradient buffers, one per tensor
        local |= {"ga_", "gb_", "old_"} | set(grad_bufs.values())
        if local & (set(tensors) | set(sizes)) or any(re.fullmatch(r"[cvt]\d+_|sum_v\d+_", t) for t in tensors + sizes):
            return self._unfused("a name of the spec would shadow one of the fused kernels'")
        printer = TritonPrinter(set(rec.sizes), self.a.ir.ranges, {n: py[n] for n in rec.sizes})
        printer.helper_prefix = "_" + self.rt
        rt = "_" + self.rt  # the runtime's jit helpers as the module names them (`_triton_scan_program`)
        sig = ", ".join(tensors)
        size_args = "".join(f", {n}" for n in sizes)
        text, calls, found = SourceWriter(), [], []
        for s in rec.states:
            sa = self.a.states[s.name]
            indices, dims = tuple(sa.indices), [self._dim(d) for d in s.dims]
            values = [v for v in prologue if v[0] in (f"a_{s.name}", f"b_{s.name}")]
            decays = len(values) == 2
            exprs = [sa.diagonal, sa.injection]
            leaves: dict = {}  # leaf (an input or param, at the state's indices) -> its load's name
            for e in exprs:
                if e.atoms(sympy.Sum, sympy.Product):
                    return self._unfused(f"{s.name}'s decay or injection sums over an axis")
                for leaf in sorted(e.atoms(sympy.Indexed), key=str):
                    if str(leaf.base) not in {x.name for x in rec.inputs + rec.params} or \
                            any(i not in indices for i in leaf.indices):
                        return self._unfused(f"{leaf} is not read at {s.name}'s own indices")
                    leaves.setdefault(leaf, f"v{len(leaves)}_")
                # a scalar input or param (one number per step and head, or per head) is a plain symbol
                bare = e.xreplace({leaf: sympy.Symbol(leaves[leaf]) for leaf in e.atoms(sympy.Indexed)})
                for sym in sorted(bare.free_symbols, key=str):
                    if sym.name in {x.name for x in rec.inputs + rec.params}:
                        leaves.setdefault(sym, f"v{len(leaves)}_")
            try:
                printed, bares = [], []
                for e in exprs:
                    bare = e.xreplace({leaf: sympy.Symbol(name) for leaf, name in leaves.items()})
                    free = {x.name for x in bare.free_symbols} - set(leaves.values()) - set(rec.sizes)
                    if free:
                        return self._unfused(f"{s.name}'s decay or injection reads {', '.join(sorted(free))}")
                    printed.append(printer.print_expr(bare, ()))
                    bares.append(bare)
            except (NotImplementedError, ValueError, KeyError, TypeError) as err:
                return self._unfused(f"the Triton printer does not print {s.name}'s prologue ({err})")
            found.append((s, indices, dims, decays, leaves, printed, self._scan_vjp_terms(s, leaves, bares, printer)))
        # The backward kernels add the tensors' gradients themselves (`NAME__scan_S_vjp`) when every state's
        # derivatives print; else they store da, db for the printed torch VJP (`vjp_why` says why, in the code).
        vjp_why = next((derived for *_, derived in found if isinstance(derived, str)), None)
        grad_sig = ", ".join(grad_bufs.values())
        for s, indices, dims, decays, leaves, printed, derived in found:
            temps, terms = derived if vjp_why is None else ([], {})
            # the lane's coordinates: (h, *S) of its number o_n_ (the last axis varies fastest)
            coords = [f"c{k}_" for k in range(len(dims))]
            lane = ["r_ = o_n_"]
            for k in reversed(range(len(dims))):
                lane.append(f"{coords[k]} = r_ % {dims[k]}")
                lane.append(f"r_ = r_ // {dims[k]}")
            lane.append("i_h_ = r_  # the head")

            def address(leaf) -> tuple[str, str, str]:
                """(its tensor's name, the offset of the lanes' elements, its layout): an input gathered at the
                lanes' coordinates of its own axes ([BT, BN], steps row_), a param per lane ([BN])."""
                base = str(getattr(leaf, "base", leaf))
                own = [self._dim(d) for d in next(v for v in rec.inputs + rec.params if v.name == base).dims]
                size = f" * ({' * '.join(own)})" if len(own) > 1 else f" * {own[0]}" if own else ""
                shape = "".join(", " + d for d in own)
                spread = "" if base in params else "[None, :]"  # an input's tile is [BT, BN]: lanes on axis 1
                inner = ""
                for j, i in enumerate(getattr(leaf, "indices", ())):
                    stride = own[j + 1:]
                    inner += f" + {coords[indices.index(i)]}{spread}" + (
                        f" * ({' * '.join(stride)})" if len(stride) > 1 else f" * {stride[0]}" if stride else "")
                if base in params:  # [H, *dims]: one number per lane, the same at every step
                    return py[base], f"i_h_{size}{inner}", f"[H{shape}]"
                return py[base], f"(row_ * H_ + i_h_[None, :]){size}{inner}", f"[B, T, H{shape}]"

            def loads() -> list[str]:
                """A load per leaf, at `address`."""
                lines = []
                for leaf, name in leaves.items():
                    tensor, offset, layout = address(leaf)
                    if str(getattr(leaf, "base", leaf)) in params:
                        lines.append(f"{name} = tl.load({tensor} + {offset}, mask=m_n_, other=0.0)"
                                     f".to(s_.dtype.element_ty)[None, :]  # {leaf} of {layout}")
                    else:  # [B, T, H, *dims]: steps row_ [BT, 1] of lanes [BN]
                        lines.append(f"{name} = tl.load({tensor} + {offset}, "
                                     f"mask=m_, other=0.0).to(s_.dtype.element_ty)  # {leaf} of {layout}")
                return lines

            steps = f"{self.fn}__scan_{s.name}_steps"
            fwd, bwd = f"{self.fn}__scan_{s.name}_fwd_kernel", f"{self.fn}__scan_{s.name}_bwd_kernel"
            coord_args = "".join(f", {c}" for c in coords)
            t = text
            t("@triton.jit", 0)
            t(f"def {steps}({sig}, s_, row_, i_h_{coord_args}, m_, m_n_, H_{size_args}):", 0)
            where = in_docstring(self.cite[s.name])  # (the spec's file name: quotes in it escaped)
            t.doc(f"a_t and b_t of {s.name}'s lanes (i_h_{coord_args}) [BN] at the steps row_ [BT, 1] (int64, of "
                  f"the [B * T] steps), in s_'s dtype, from the raw tensors: {where}, the expressions "
                  f"the torch prologue prints. a = 1, b = 0 where m_ [BT, BN] is False (past a sequence's end).")
            for line in loads():
                t(line)
            t("z_ = tl.zeros_like(m_.to(s_.dtype.element_ty))  # (a constant or a param alone still spans the tile)")
            t(f"a_ = tl.where(m_, z_ + {printed[0]}, 1.0)" + ("  # decay" if decays else "  # a constant decay"))
            t(f"b_ = tl.where(m_, z_ + {printed[1]}, 0.0)  # {self.cite[s.name]}")
            t("return a_, b_")
            t()
            t()
            vjp_fn = f"{self.fn}__scan_{s.name}_vjp"
            sums = {}  # a param leaf -> the name of its running sum over the program's steps [BN]
            if vjp_why is None:
                sums = {leaf: f"sum_{leaves[leaf]}" for leaf in terms if str(getattr(leaf, "base", leaf)) in params}
                sum_args = "".join(f", {n}" for n in sums.values())
                t("@triton.jit", 0)
                t(f"def {vjp_fn}({sig}, {grad_sig}, s_, ga_, gb_, row_, i_h_{coord_args}, m_, m_n_, H_{size_args}"
                  f"{sum_args}):", 0)
                returned = f"; {', '.join(sums.values())}: the params' sums over the steps, returned" if sums else ""
                t.doc(f"Adds the gradients of {s.name}'s prologue at the steps row_ [BT, 1] of its lanes from "
                      f"ga_ = g_t * s_(t-1) and gb_ = g_t [BT, BN] (those of a_t and b_t), by the derivatives of "
                      f"{steps}'s expressions (`derive_vjp`, as for the torch VJP): an input's into its buffer grad_X_ "
                      f"(atomically where lanes share an element{returned}). Zero where m_ is False. Atomic float "
                      "additions make the sums' rounding depend on the programs' order.")
                for line in loads():
                    t(line)
                for name, value in temps:
                    t(f"{name} = {value}")
                bases = [str(getattr(leaf, "base", leaf)) for leaf in terms]
                for leaf, term in terms.items():
                    tensor, offset, layout = address(leaf)
                    value = f"tl.where(m_, {term}, 0.0)"
                    if leaf in sums:
                        t(f"{sums[leaf]} += tl.sum({value}, axis=0)  # {leaf} of {layout}, over the steps")
                    elif set(getattr(leaf, "indices", ())) == set(indices) and \
                            bases.count(str(getattr(leaf, "base", leaf))) == 1:
                        # one lane per element: no other lane of this launch adds there (states run one by one)
                        t(f"old_ = tl.load({grad_bufs[tensor]} + {offset}, mask=m_, other=0.0)")
                        t(f"tl.store({grad_bufs[tensor]} + {offset}, old_ + {value}, mask=m_)  # {leaf} of {layout}")
                    else:
                        t(f"tl.atomic_add({grad_bufs[tensor]} + {offset}, {value}, mask=m_)  # {leaf} of {layout}, "
                          "shared by lanes")
                if sums:
                    t(f"return {', '.join(sums.values())}")
                t()
                t()
            prelude = ["i_b_, i_n_ = " + rt + "scan_program(NL_, BN)", "o_n_ = i_n_ * BN + tl.arange(0, BN)",
                       "m_n_ = o_n_ < NL_", *lane, "bos_, T_ = " + rt + "sequence_start(cu_, i_b_, T_, VARLEN)"]

            def call(row: str, mask: str) -> str:
                return f"{steps}({sig}, s_, {row}, i_h_{coord_args}, {mask}, m_n_, H_{size_args})"

            t("@triton.jit", 0)
            t(f"def {fwd}({sig}, h0_, s_, cu_, T_, NL_, H_{size_args}, BT: tl.constexpr, BN: tl.constexpr, "
              "VARLEN: tl.constexpr):", 0)
            t.doc(f"{s.name}'s states s_ [B, T, NL_] (NL_ = H * {' * '.join(dims) or '1'} lanes) from h0_ [B, NL_], "
                  f"a and b computed at the loads ({steps}): `_scan_fwd_kernel`'s chunks, carry and packed "
                  "sequences.")
            for line in prelude:
                t(line)
            t("b_h_ = tl.load(h0_ + i_b_.to(tl.int64) * NL_ + o_n_, mask=m_n_, other=0.0).to(s_.dtype.element_ty)")
            t("for i_t_ in range(0, tl.cdiv(T_, BT)):")
            t("o_t_ = i_t_ * BT + tl.arange(0, BT)", 2)
            t("m_ = (o_t_ < T_)[:, None] & m_n_[None, :]", 2)
            t("row_ = bos_ + o_t_[:, None].to(tl.int64)  # [BT, 1] the steps", 2)
            t(f"a_, b_ = {call('row_', 'm_')}", 2)
            t(f"A_, B_ = tl.associative_scan((a_, b_), 0, {rt}scan_combine)  # the chunk from a zero start", 2)
            t("s_t_ = A_ * b_h_[None, :] + B_", 2)
            t("tl.store(s_ + row_ * NL_ + o_n_[None, :], s_t_.to(s_.dtype.element_ty), mask=m_)", 2)
            t(f"b_h_ = {rt}scan_last_row(s_t_, BT)", 2)
            t()
            t()
            t("@triton.jit", 0)
            if vjp_why is None:
                t(f"def {bwd}({sig}, s_, h0_, ds_, {grad_sig}, dh0_, cu_, T_, NL_, H_{size_args}, BT: tl.constexpr, "
                  "BN: tl.constexpr, VARLEN: tl.constexpr):", 0)
                t.doc(f"The tensors' gradients, added into grad_X_ (zeros before the first state's launch; "
                      f"{vjp_fn}), and dh0_ [B, NL_] of {s.name} from ds_ and the saved states s_, as "
                      f"`_scan_bwd_kernel`, with a_(t+1) recomputed from the raw tensors ({steps}): no da, db stored.")
            else:
                t(f"def {bwd}({sig}, s_, h0_, ds_, da_, db_, dh0_, cu_, T_, NL_, H_{size_args}, BT: tl.constexpr, "
                  "BN: tl.constexpr, VARLEN: tl.constexpr):", 0)
                t.doc(f"da_, db_ [B, T, NL_] and dh0_ [B, NL_] of {s.name} from ds_ and the saved states s_, as "
                      f"`_scan_bwd_kernel`, with a_(t+1) recomputed from the raw tensors ({steps}), not read back.")
            for line in prelude:
                t(line)
            t("b_h0_ = tl.load(h0_ + i_b_.to(tl.int64) * NL_ + o_n_, mask=m_n_, other=0.0).to(s_.dtype.element_ty)")
            t("g_ = tl.zeros([BN], dtype=s_.dtype.element_ty)  # g at the first step after the chunk")
            for leaf, name in sums.items():
                t(f"{name} = tl.zeros([BN], dtype=s_.dtype.element_ty)  # {leaf}'s gradient over this program's steps")
            t("NT_ = tl.cdiv(T_, BT)")
            t("for i_r_ in range(0, NT_):")
            t("i_t_ = NT_ - 1 - i_r_", 2)
            t("o_t_ = i_t_ * BT + tl.arange(0, BT)", 2)
            t("m_ = (o_t_ < T_)[:, None] & m_n_[None, :]", 2)
            t("row_ = bos_ + o_t_[:, None].to(tl.int64)", 2)
            t("off_ = row_ * NL_ + o_n_[None, :]", 2)
            t("m_next_ = (o_t_ + 1 < T_)[:, None] & m_n_[None, :]  # a_(t+1): 1 past the end", 2)
            t(f"a_next_, b_next_ = {call('row_ + 1', 'm_next_')}", 2)
            t("ds_t_ = tl.load(ds_ + off_, mask=m_, other=0.0).to(s_.dtype.element_ty)", 2)
            t(f"A_, G_ = tl.associative_scan((a_next_, ds_t_), 0, {rt}scan_combine, reverse=True)", 2)
            t("g_t_ = A_ * g_[None, :] + G_  # [BT, BN] g_t", 2)
            t("m_prev_ = (o_t_ >= 1)[:, None] & m_", 2)
            t("s_prev_ = tl.load(s_ + off_ - NL_, mask=m_prev_, other=0.0).to(s_.dtype.element_ty)", 2)
            t("s_prev_ = tl.where((o_t_ == 0)[:, None], b_h0_[None, :], s_prev_)", 2)
            if vjp_why is None:
                vjp_call = (f"{vjp_fn}({sig}, {grad_sig}, s_, g_t_ * s_prev_, g_t_, row_, i_h_{coord_args}, m_, m_n_, "
                            f"H_{size_args}{''.join(', ' + n for n in sums.values())})")
                t((f"{', '.join(sums.values())} = " if sums else "") + vjp_call, 2)
            else:
                t("tl.store(db_ + off_, g_t_.to(db_.dtype.element_ty), mask=m_)", 2)
                t("tl.store(da_ + off_, (g_t_ * s_prev_).to(da_.dtype.element_ty), mask=m_)", 2)
            t(f"g_ = {rt}scan_first_row(g_t_, BT)", 2)
            t(f"m_0_ = {rt}first_step_mask(m_n_, T_, VARLEN)[None, :]  # step 0 (none in an empty packed sequence)")
            t(f"a_0_, b_0_ = {call('bos_ + tl.zeros([1, 1], dtype=tl.int64)', 'm_0_')}")
            t("tl.store(dh0_ + i_b_.to(tl.int64) * NL_ + o_n_, (tl.sum(a_0_, axis=0) * g_).to(dh0_.dtype.element_ty),"
              " mask=m_n_)")
            for leaf, name in sums.items():  # once per program: its rows and steps summed
                tensor, offset, layout = address(leaf)
                t(f"tl.atomic_add({grad_bufs[tensor]} + {offset}, {name}, mask=m_n_)  # {leaf} of {layout}")
            t()
            t()
            calls.append(f"({fwd}, {bwd}, {decays})")
        targets = ", ".join(f"all_{s.name}" for s in rec.states) + ("," if len(rec.states) == 1 else "")
        h0s = ", ".join(f"states['{s.name}']" for s in rec.states) + ("," if len(rec.states) == 1 else "")
        if vjp_why is None:
            helpers = ", ".join(f"{self.fn}__scan_{s.name}_vjp" for s in rec.states)
            backward = [f"# its backward: the kernels add the tensors' gradients themselves ({helpers}): no da, db"]
        else:
            backward = [f"# its backward: the kernels' da, db through {self.fn}__scan_prologue_vjp ({vjp_why})"]
        vjp = "None" if vjp_why is None else f"{self.fn}__scan_prologue_vjp"
        lines = ["# the prologue inside the scan kernels: a and b computed where they load the inputs, never stored;",
                 *backward,
                 f"{targets} = {self.rt}fused_scan(",
                 f"    ({', '.join(calls)}{',' if len(calls) == 1 else ''}), {vjp},",
                 f"    ({', '.join(tensors)}{',' if len(tensors) == 1 else ''}), ({h0s}), "
                 f"({', '.join(sizes)}{',' if len(sizes) == 1 else ''}), (B_, T_, H_){self._scan_options})"]
        return text.text().rstrip("\n") + "\n", lines

    @staticmethod
    def _scan_vjp_terms(s, leaves: dict, bares: list, printer: TritonPrinter) -> tuple[list, dict] | str:
        """The gradient of each leaf of state `s`'s prologue (an input or param, `leaves`: leaf -> its load's name)
        from the step's: ga_ * da/dv + gb_ * db/dv, ga_ and gb_ the gradients of a_t and b_t, by `derive_vjp` (the
        walk that derives the torch VJP: the functions' `fdiff`, sqrt's derivative floored at SQRT_FLOOR) on the
        printed expressions `bares` = [a, b] in the loads' names. Returns (shared subexpressions [(name, printed)],
        {leaf: printed gradient}) by the Triton printer, leaves of zero gradient left out; a str (why) where the
        walk or the printer fails."""
        ga, gb = sympy.Symbol("ga_"), sympy.Symbol("gb_")
        try:
            found, _ = derive_vjp([("ga", (), bares[0]), ("gb", (), bares[1])], set(leaves.values()), {})
        except NoAdjoint as err:
            return f"{s.name}'s prologue is not differentiated ({err})"
        cotangents = {sympy.Symbol(grad_name("ga")): ga, sympy.Symbol(grad_name("gb")): gb}
        grads = {leaf: sympy.factor_terms(found[name].expr.xreplace(cotangents))
                 for leaf, name in leaves.items() if name in found}
        grads = {leaf: g for leaf, g in grads.items() if g != 0}
        # subexpressions the gradients share (the decay's exp in RG-LRU's), printed once as t0_, t1_, ...
        temps, reduced = sympy.cse(list(grads.values()), symbols=(sympy.Symbol(f"t{k}_") for k in itertools.count()))
        try:
            return ([(str(name), printer.print_expr(e, ())) for name, e in temps],
                    {leaf: printer.print_expr(e, ()) for leaf, e in zip(grads, reduced)})
        except (NotImplementedError, ValueError, KeyError, TypeError) as err:
            return f"the Triton printer does not print {s.name}'s derivatives ({err})"

    # -- the chunked Triton form's elementwise maps, printed as @triton.jit helpers ---------------------------

    def _map_of(self, expr: sympy.Expr, indices, log_leaf) -> tuple[sympy.Expr, sympy.Expr] | None:
        """(leaf, f(x)) when `expr` is f(leaf), an elementwise function of ONE raw input `leaf` indexed by `indices`
        alone (normalized linear attention's elu(k[i]) + 1, HGRN2's 1 - exp(f[i])) that the Triton runtime can apply
        where its kernels load the input (`triton_runtime._Fused.k_map`); None for the input itself or anything
        else. The runtime's `_check_steps` then sees the raw input, not f of it, so f must be finite wherever the
        input is: no log, division or negative power of x, and exp only of an input that is also the state's log
        decay (`log_leaf`, checked <= 0 by `_check_steps`, so exp(x) <= 1)."""
        leaves = expr.atoms(sympy.Indexed)
        if len(leaves) != 1 or isinstance(expr, sympy.Indexed):
            return None
        leaf = next(iter(leaves))
        if str(leaf.base) not in {i.name for i in self.rec.inputs} or tuple(leaf.indices) != tuple(indices):
            return None
        x = sympy.Symbol("x", real=True)
        f = expr.xreplace({leaf: x})
        if f.free_symbols != {x}:
            return None
        for node in sympy.preorder_traversal(f):
            if not (isinstance(node, sympy.Basic) and node.has(x)):
                continue
            if isinstance(node, sympy.log) or (isinstance(node, sympy.Pow) and not (node.exp.is_Integer
                                                                                     and node.exp > 0)):
                return None
            if isinstance(node, (sympy.exp, expm1)) and leaf != log_leaf:
                return None
        return leaf, f

    def _scalar_map_of(self, expr) -> tuple[sympy.Symbol, sympy.Expr] | None:
        """(leaf, f(x)) when `expr` is f(leaf) of ONE raw per-step scalar input `leaf` ([B, T, H]: mLSTM's
        exp(ig), logsigmoid(fg)), for a scalar decay's `v_step_map` / `log_decay_map` (`triton_runtime._Fused`);
        None for the input itself or anything else. Unlike `_map_of`'s maps any f goes: the runtime's
        cumulative-sum kernel checks the mapped values as `_check_steps` would (its `unsafe`)."""
        if expr is None or isinstance(expr, sympy.Symbol) or expr.atoms(sympy.Indexed):
            return None
        free = expr.free_symbols
        scalars = {i.name for i in self.rec.inputs if not i.dims}
        if len(free) != 1 or next(iter(free)).name not in scalars:
            return None
        leaf = next(iter(free))
        return leaf, expr.xreplace({leaf: sympy.Symbol("x", real=True)})

    def _pair_map_of(self, expr, indices) -> tuple[tuple[sympy.Indexed, sympy.Indexed], sympy.Expr] | None:
        """((x_leaf, y_leaf), f(x, y)) when `expr` is an elementwise function of TWO raw inputs indexed by `indices`
        alone (RWKV-7's b = -(a[i] * kk[i])), for the diagonal-plus-rank-one runtime's `b_map` (the kernels load both
        and apply f, `triton_runtime._Fused.b_map`); None for anything else. As for `_map_of`, `_check_steps` then
        sees the raw inputs, so f must be finite wherever they are: no log, exp, division or negative power."""
        leaves = expr.atoms(sympy.Indexed)
        inputs = {i.name for i in self.rec.inputs}
        if len(leaves) != 2 or any(str(leaf.base) not in inputs or tuple(leaf.indices) != tuple(indices)
                                   for leaf in leaves):
            return None
        xl, yl = sorted(leaves, key=str)
        x, y = sympy.Symbol("x", real=True), sympy.Symbol("y", real=True)
        f = expr.xreplace({xl: x, yl: y})
        if f.free_symbols != {x, y}:
            return None
        for node in sympy.preorder_traversal(f):
            if isinstance(node, (sympy.log, sympy.exp, expm1)) or (
                    isinstance(node, sympy.Pow) and node.has(x, y) and not (node.exp.is_Integer and node.exp > 0)):
                return None
        return (xl, yl), f

    def _bonus_of(self, weight, plan, k_expr) -> str | None:
        """The Python name of the param u when the per-step skip weight `weight` is sum(i, q[i] * u[i] * k[i]), q the
        plan's one query and k its key, both raw inputs, u a param [K] (RWKV-7's current-token bonus): the
        diagonal-plus-rank-one output kernel sums it from the q and k it loads (`triton_runtime._Fused.bonus`), so
        no prologue computes it. None for any other weight."""
        if not isinstance(weight, sympy.Sum) or len(weight.limits) != 1 or len(plan.readouts) != 1:
            return None
        i = weight.limits[0][0]
        query = plan.readouts[0].query.expr
        if not (isinstance(query, sympy.Indexed) and isinstance(k_expr, sympy.Indexed)):
            return None
        factors = sympy.Mul.make_args(weight.function)
        if len(factors) != 3 or not all(isinstance(f, sympy.Indexed) and tuple(f.indices) == (i,) for f in factors):
            return None
        bases = sorted(str(f.base) for f in factors)
        params = {p.name for p in self.rec.params if len(p.dims) == 1}
        rest = list(bases)
        for leaf in (query, k_expr):
            if str(leaf.base) not in rest or str(leaf.base) not in {x.name for x in self.rec.inputs}:
                return None
            rest.remove(str(leaf.base))
        return self.py[rest[0]] if rest[0] in params else None

    def _pair_map_helper(self, name: str, f: sympy.Expr, leaves: tuple) -> str:
        """The source of `name(x, y)` = f(x, y), `@triton.jit`, printed with the Triton printer (no derivative: the
        diagonal-plus-rank-one runtime that applies it is forward only, its backward the derived adjoint)."""
        printer = TritonPrinter(set(), {}, {"x": "x", "y": "y"})
        printer.helper_prefix = "_" + self.rt
        w = SourceWriter()
        w("@triton.jit", 0)
        w(f"def {name}(x, y):", 0)
        w(f'"""{sympy.sstr(f)} of the raw inputs x = {self.py[str(leaves[0].base)]}, y = '
          f'{self.py[str(leaves[1].base)]}, applied where the kernels load b (BMAP / KMAP2)."""')
        w(f"return {printer.print_expr(f, ())}")
        return w.text()

    @staticmethod
    def _finite_at_reset(f: sympy.Expr) -> bool:
        """f(x) has a finite limit as x -> -inf (a log decay's reset), as far as sympy can tell."""
        try:
            return bool(sympy.limit(f, next(iter(f.free_symbols)), -sympy.oo).is_finite)
        except (NotImplementedError, ValueError, TypeError):
            return False

    def _map_helpers(self, name: str, f: sympy.Expr, where: str = "QMAP / KMAP") -> str:
        """The source of `name(x)` = f(x) and `name_vjp(x, grad)` = grad * f'(x) (sympy's derivative), both
        `@triton.jit`, printed with the Triton printer of the recurrent kernels; `where`: the kernels' argument
        that takes it, for its docstring."""
        x, grad = sympy.Symbol("x", real=True), sympy.Symbol("grad", real=True)
        printer = TritonPrinter(set(), {}, {"x": "x", "grad": "grad"})
        printer.helper_prefix = "_" + self.rt  # its expm1 / log1p helpers as the module names them (`_triton_expm1`)
        w = SourceWriter()
        w("@triton.jit", 0)
        w(f"def {name}(x):", 0)
        w(f'"""{sympy.sstr(f)} of the raw input x, applied where the chunked kernels load it ({where})."""')
        w(f"return {printer.print_expr(f, ())}")
        w()
        w()
        w("@triton.jit", 0)
        w(f"def {name}_vjp(x, grad):", 0)
        w(f'"""grad * d/dx ({sympy.sstr(f)}): the raw input\'s gradient from its mapped value\'s, from sympy."""')
        w(f"return {printer.print_expr(grad * sympy.diff(f, x), ())}")
        return w.text()

    # -- the chunked form's prologue and epilogue, with their VJPs printed from sympy -------------------------

    def _upcast_lines(self, tensors: list[str]) -> list[str]:
        """Lines casting `tensors` to at least float32, for a torch prologue of the chunked form that takes float16
        / bfloat16 inputs as they are (the diagonal-plus-rank-one class on Triton, `self.checkpoints`: its module
        marks it `takes_input_dtype`): its values (RWKV-7's b = -a * kk) were float32 when the dispatcher handed
        the form float32 copies, and stay so, computed in float32 rather than in the inputs' half precision.
        (A prologue printed as a Triton kernel computes in float32 and stores float32 values: `dtype_`.) No lines
        for any other form, whose inputs come in float32 already or whose values keep the inputs' dtype."""
        if not self.checkpoints:
            return []
        return [f"{p} = {p}.to(torch.promote_types({p}.dtype, torch.float32))  # float32 for half inputs"
                for p in tensors]

    def _write_printed_vjp(self, stem: str, what: str, values: list, reads: list, ranges: dict,
                           suffix: str | None = None) -> tuple[str, bool, list[str]]:
        """(source, whether a VJP was derived, its arguments) of `NAME__<stem>`: a function of the tensors `reads`
        (readouts: [(IR name, Python name)]), then the spec's inputs (`[B, T, H, ...]`) and params (`[1, 1, H, ...]`,
        as the form holds them) that the values read, then the sizes, returning the `values` [(Python name, IR
        expression, indices, dims, comment)].

        Its backward is printed too (`NAME__<stem>_vjp`): reverse mode on the sympy expressions
        (recurrence_dsl/adjoint.py `derive_vjp`, the same walk as the recurrent adjoint's), each value's cotangent
        `grad_<value>` carried down to the leaves, a leaf's contribution summed over the indices it does not carry;
        a param's gradient is summed over B and T (it is broadcast over them). The two are joined by dispatch's
        `with_vjp`, so autograd builds no graph through the prologue's or the epilogue's ops. Where the walk meets
        something it cannot differentiate (`NoAdjoint`), only the function is printed and autograd runs through it.
        `suffix`: appended to the three names (default: the writer's).
        """
        rec, py = self.rec, self.py
        suffix = self.suffix if suffix is None else suffix
        self.shown, self.taken = {ir: p for ir, p in reads}, set()
        self.prologue_checked = set()  # the values a printed prologue kernel checks (`_elementwise_prologue`)
        name = f"{self.fn}__{stem}{suffix}"
        fwd, vjp = f"{self.fn}__{stem}_fwd{suffix}", f"{self.fn}__{stem}_vjp{suffix}"
        used = self._names_read([v[1] for v in values])
        spec_args = [x for x in rec.inputs + rec.params if x.name in used]
        tensors = [p for _, p in reads] + [py[x.name] for x in spec_args]
        sizes = [py[n] for n in rec.sizes]
        shaped = [py[x.name] for x in spec_args if x in rec.inputs] + [p for _, p in reads]
        constants = any(is_constant(v[1], self.sizes) for v in values)  # printed as `<first input>.new_full(...)`
        if rec.inputs[0] not in spec_args and (constants or not shaped):
            # a value of numbers and sizes alone, or only params read: the caller's first input comes along
            spec_args.insert(0, rec.inputs[0])
            tensors.insert(len(reads), py[rec.inputs[0].name])
            shaped.insert(0, py[rec.inputs[0].name])
        first = shaped[0]
        w = SourceWriter()
        w(f"def {fwd}({', '.join(tensors + sizes)}):", 0)
        w(f'"""{what}; inputs [B, T, H, ...], params [1, 1, H, ...]."""')
        w(f"B_, T_, H_ = {first}.shape[:3]")
        upcast = self._upcast_lines([py[x.name] for x in spec_args])
        for line in upcast:
            w(line)
        printer = TorchPrinter(self.sizes, ranges, {**py, **dict(reads)})
        # A readout read over all of a value's indices has the value's whole shape: no broadcast_to around it,
        # whose result is a view, which the dispatcher copies while autograd records (dispatch `_owned`): the
        # divided readout's q C / q n is a tensor of its own.
        readouts = frozenset(ir for ir, _ in reads)
        for out, expr, indices, dims, *comment in values:
            w(f"{out} = {self._full(printer, expr, indices, dims, readouts)}"
              + (f"  # {comment[0]}" if comment and comment[0] else ""))
        w(f"return {', '.join(v[0] for v in values)}{',' if len(values) == 1 else ''}")
        wrt = {ir for ir, _ in reads} | {x.name for x in spec_args}

        def fresh(text: str) -> str:  # a gradient's name, apart from the arguments' (a spec may name one grad_x)
            return fresh(text + "_") if text in tensors else text

        grads = {out: fresh(f"grad_{out}") for out, *_ in values}
        ranges = dict(ranges)
        walked = []
        try:
            for n, (out, expr, indices, dims, *_) in enumerate(values):
                # Each value's own index symbols, ranging over its own dims: the chunk plans reuse one key index
                # (a__k) for states whose key axes differ.
                if len(indices) != len(dims):
                    raise NoAdjoint(f"{out} has {len(indices)} indices for {len(dims)} axes")
                own = {i: index_symbol(f"{i.name.split('__')[0]}__p{n}_{m}") for m, i in enumerate(indices)}
                for i, d in zip(indices, dims):
                    ranges[own[i]] = size_symbol(d) if isinstance(d, str) else sympy.Integer(d)
                walked.append((out, tuple(own[i] for i in indices), expr.xreplace(own)))
            found, ranges = derive_vjp(walked, wrt, ranges)
        except NoAdjoint:
            return _drop_unused_shape(w.text().replace(f"def {fwd}(", f"def {name}(", 1)), False, tensors + sizes
        targets = [(ir, p, "read") for ir, p in reads]
        targets += [(x.name, py[x.name], "param" if x in rec.params else "input") for x in spec_args]
        derived = []  # (Python name of the tensor, kind, indices, gradient), the gradients that are not zero
        for ir, p, kind in targets:
            if ir in found:
                # common factors of the terms pulled out (factor_terms), sums nested and their constant factors
                # moved in front, as the recurrent adjoint prints them
                grad = sympy.factor_terms(found[ir].expr)
                derived.append((p, kind, found[ir].indices, factor_sums(nest_sums(grad, ranges))))
        if self.options and stem == "chunked_prologue" and not reads:
            kernels = self._elementwise_prologue(name, fwd, vjp, what, values, tensors, sizes, first, grads, derived,
                                                 ranges)
            if kernels is not None:
                return kernels, True, tensors + sizes
        exprs, temps = self._share([d[3] for d in derived], ranges, set())
        w()
        w()
        w(f"def {vjp}({', '.join(tensors + list(grads.values()) + sizes)}):", 0)
        w(f'"""The vector-Jacobian product of {fwd}, from sympy\'s derivatives of its expressions:')
        w("the gradient of each argument (None where it is not differentiable) from those of its values; a param's")
        w('summed over B and T."""')
        w(f"B_, T_, H_ = {first}.shape[:3]")
        for line in upcast:
            w(line)
        names = {**py, **dict(reads), **{grad_name(out): g for out, g in grads.items()}}
        result = {p: fresh(f"grad_{p}") for p in tensors}
        self.taken = set(names.values()) | set(result.values())
        shared: dict[str, str] = {}
        self._write_shared(w, temps, shared, names, ranges, "B_, T_, H_", 1)
        printer = TorchPrinter(self.sizes, ranges, {**names, **shared})
        for (p, kind, idx, _), e in zip(derived, exprs):
            value = printer.print_expr(e, idx)
            if kind == "param":  # broadcast over B and T in the prologue: its gradient sums over them
                w(f"{result[p]} = torch.broadcast_to({value}, (B_, T_) + {p}.shape[2:]).sum((0, 1), keepdim=True)")
            else:
                w(f"{result[p]} = torch.broadcast_to({value}, {p}.shape)")
        written = {d[0] for d in derived}
        returned = [result[p] if p in written else "None" for p in tensors]
        w(f"return {', '.join(returned)}{',' if len(tensors) == 1 else ''}")
        w()
        w()
        w(f"{name} = with_vjp({fwd}, {vjp}, {len(tensors)})", 0)
        return _drop_unused_shape(w.text()), True, tensors + sizes

    def _elementwise_prologue(self, name: str, fwd: str, vjp: str, what: str, values: list, tensors: list,
                              sizes: list, first: str, grads: dict, derived: list, ranges: dict) -> str | None:
        """The Triton chunked form's prologue as two printed `@triton.jit` kernels, when it is a function of each
        step (b, t, h) alone: every value that reads a tensor is [B, T, H, D] or [B, T, H] (a sum over D) and reads
        inputs [B, T, H, D] or [B, T, H] and params [H, D] or [H], D one size (RG-LRU's gates and input scale,
        RWKV-6's skip weight sum(r * u * k), mLSTM's exp(ig) and logsigmoid(fg)). The forward kernel writes each
        value once from the raw inputs, checking it for `_check_steps` as it goes, and the backward kernel each
        input's gradient once from the values' (the expressions `_write_printed_vjp` derives, printed by the Triton
        printer in float32), so none of the torch form's per-op temporaries is allocated. None (the torch prologue)
        for any other prologue."""
        rec, py = self.rec, self.py
        by_py = {py[x.name]: x for x in rec.inputs + rec.params}
        fields = [v for v in values if not is_constant(v[1], self.sizes)]
        if not fields or any(len(v[3]) > 1 or v[0] in self.headed_logs for v in fields):
            return None
        read = self._names_read([v[1] for v in fields])
        args = [p for p in tensors if by_py[p].name in read]  # the tensors the kernels load
        vectors = {tuple(by_py[p].dims) for p in args} | {tuple(v[3]) for v in fields}
        vectors.discard(())
        if len(vectors) > 1 or any(len(s) > 1 for s in vectors) or not any(by_py[p] in rec.inputs for p in args):
            return None
        size = next(iter(vectors))[0] if vectors else None
        outs = [(p, kind, idx, e) for p, kind, idx, e in derived if p in args]
        if len(outs) != len(derived):
            return None
        field_grads = [grads[v[0]] for v in fields]
        is_vector = {**{p: bool(by_py[p].dims) for p in args}, **{v[0]: bool(v[3]) for v in fields},
                     **{grads[v[0]]: bool(v[3]) for v in fields}}
        leaves = {x.name: f"b_{py[x.name]}" for x in rec.inputs + rec.params}
        leaves.update({grad_name(v[0]): f"b_{grads[v[0]]}" for v in fields})
        printer = TritonPrinter(set(rec.sizes), ranges, {**leaves, **{n: py[n] for n in rec.sizes}})
        printer.helper_prefix = "_" + self.rt  # its expm1 / log1p helpers as the module names them (`_triton_expm1`)
        params = {x.name for x in rec.params}
        dim = self._dim(size) if size is not None else None
        # the tile of D named as the Triton printer names it (a sum over D masks its body with `mask_D`)
        size_sym = (size_symbol(size) if isinstance(size, str) else sympy.Integer(size)) if dim else None
        block, offs, mask = (block_name(size_sym), offs_name(size_sym), mask_name(size_sym)) if dim else (None,) * 3
        kernel, kernel_vjp = f"{name}_kernel", f"{name}_vjp_kernel"
        size_args = "".join(f", {n}" for n in sizes)
        grad_outs = [f"d_{p}" for p, *_ in outs]
        # the kernels' own names must not meet a tensor's (a spec may name an input `row`)
        local = (args + [v[0] for v in fields] + field_grads + grad_outs + [f"b_{p}" for p in args + field_grads]
                 + [f"o_{v[0]}" for v in fields] + [f"b_sum_{p}" for p, *_ in outs] + sizes
                 + ["unsafe", "BT_", "H_", "T_", "BLOCK_R", "i_h", "i_r", "i", "bt", "row", "bad", "b_first"]
                 + ([offs, mask, block] if dim else []))
        if len(set(local)) != len(local) or any(n.startswith("b_t") and n[3:].isdigit() for n in local):
            return None

        def load(p: str) -> str:
            if by_py.get(p) in rec.params:  # [H, D] or [H]: this program's head
                at = f"{p} + i_h * {dim} + {offs}" if is_vector[p] else f"{p} + i_h"
            else:  # [B, T, H, D] or [B, T, H]: the step `row`
                at = f"{p} + row * {dim} + {offs}" if is_vector[p] else f"{p} + row"
            return (f"b_{p} = tl.load({at}, mask={mask}, other=0.0).to(tl.float32)" if is_vector[p]
                    else f"b_{p} = tl.load({at}).to(tl.float32)")

        def axes_of(e: sympy.Expr) -> tuple:
            """The index e spans (its leaves' but a sum's), or none: e is then one number per step."""
            bound = {lim[0] for total in e.atoms(sympy.Sum) for lim in total.limits}
            free = tuple({i for n in e.atoms(sympy.Indexed) for i in n.indices} - bound)
            if len(free) > 1:
                raise ValueError(f"{e} spans {free}")
            return free

        def body(exprs: list, loaded: list) -> tuple[list, list, list] | None:
            """(lines before the row loop, lines inside it, the printed `exprs`): the loads, then the common
            subexpressions as temporaries (sympy's cse), those of params alone before the loop (one per head)."""
            temps, reduced = sympy.cse(exprs, symbols=sympy.numbered_symbols("b_t"))
            before = [load(p) for p in loaded if by_py.get(p) in rec.params]
            inside = [load(p) for p in loaded if by_py.get(p) not in rec.params]
            hoisted: set = set()
            try:
                for sym, e in temps:
                    line = f"{sym.name} = {printer.print_expr(e, axes_of(e))}"
                    bases = {str(n.base) for n in e.atoms(sympy.Indexed)} | {s.name for s in e.atoms(sympy.Symbol)}
                    bases -= {str(i) for n in e.atoms(sympy.Indexed) for i in n.indices} | set(rec.sizes)
                    if all(b in params or sympy.Symbol(b) in hoisted for b in bases):
                        hoisted.add(sym)
                        before.append(line)
                    else:
                        inside.append(line)
                return before, inside, [printer.print_expr(e, axes_of(e)) for e in reduced]
            except (NotImplementedError, ValueError, KeyError):
                return None

        fwd_body = body([v[1] for v in fields], args)
        vjp_body = body([e for *_, e in outs], args + field_grads)
        if fwd_body is None or vjp_body is None:
            return None
        w = SourceWriter()

        def shape_of(p: str) -> str:
            lead = "[H" if by_py.get(p) in rec.params else "[B, T, H"
            return f"{p} {lead}{f', {dim}' if is_vector[p] else ''}]"
        head = ["i_h, i_r = tl.program_id(0), tl.program_id(1)  # a head, a block of BLOCK_R rows (b, t)"]
        if dim:
            head += [f"{offs} = tl.arange(0, {block})", f"{mask} = {offs} < {dim}"]
        blocks = f", {block}: tl.constexpr" if dim else ""

        def row_loop(lines: list) -> None:
            w("for i in range(BLOCK_R):")
            w("bt = i_r * BLOCK_R + i", 2)
            w("if bt < BT_:", 2)
            w("row = bt.to(tl.int64) * H_ + i_h  # the step (b, t, h); int64: B * T * H * D may pass 2**31", 3)
            for line in lines:
                w(line, 3)

        # -- the forward kernel
        w("@triton.jit", 0)
        w(f"def {kernel}({', '.join(args + [v[0] for v in fields])}, unsafe, BT_, H_, T_{size_args}, "
          f"BLOCK_R: tl.constexpr{blocks}):", 0)
        w.doc(f'{what}, step by step: its values {", ".join(shape_of(v[0]) for v in fields)} of '
              f"{', '.join(shape_of(p) for p in args)}, on BLOCK_R rows (b, t) of one head, in float32, each stored "
              "once in its own dtype: none of the torch prologue's per-op temporaries. unsafe [1] int32 (T on "
              "entry): lowered to the first step t whose values hold a non-finite number or whose log decays hold "
              "NaN or a value > 0, the check `_check_steps` makes, done here so that no value is read again for it.")
        for line in head + fwd_body[0]:
            w(line)
        w("b_first = tl.zeros([], dtype=tl.int32) + T_  # the first unsafe step of this program's rows (T: none)")
        lines, flags = list(fwd_body[1]), []
        for (out, expr, indices, dims, *_), text in zip(fields, fwd_body[2]):
            if dims and not any(sympy.sympify(expr).has(i) for i in indices if isinstance(i, sympy.Basic)):
                # a value constant along its axis (a scalar per step spread over a size-1 axis): a [BLOCK] row, as
                # the store and the check below take
                text = f"({text}) + tl.zeros([{block}], dtype=tl.float32)"
            lines.append(f"o_{out} = ({text}).to({out}.dtype.element_ty)")
            lines.append(f"tl.store({out} + row * {dim} + {offs}, o_{out}, mask={mask})" if dims
                         else f"tl.store({out} + row, o_{out})")
            # as stored: a value finite in float32 may round to inf in its dtype; NaN fails every comparison
            cond = (f"~(o_{out}.to(tl.float32) <= 0.0)" if out in self.plain_logs
                    else f"~(tl.abs(o_{out}.to(tl.float32)) < float(\"inf\"))")
            flags.append(f"(tl.max(tl.where({mask} & {cond}, 1, 0), axis=0) > 0)" if dims else cond)
        lines.append(f"bad = {' | '.join(flags)}")
        lines.append("b_first = tl.minimum(b_first, tl.where(bad, bt % T_, T_))")
        row_loop(lines)
        w("tl.atomic_min(unsafe, b_first)")
        w()
        w()
        # -- the backward kernel
        w("@triton.jit", 0)
        w(f"def {kernel_vjp}({', '.join(args + field_grads + grad_outs)}, BT_, H_{size_args}, BLOCK_R: tl.constexpr"
          f"{blocks}):", 0)
        w.doc(f'The gradients of {", ".join(args)} from those of the values (sympy\'s derivatives, those {vjp} '
              "prints for torch), in float32 on the forward's blocks: an input's stored once in its dtype, a param's "
              "summed over the block's rows into row i_r of its [cdiv(B * T, BLOCK_R), H, ...] float32 parts.")
        for line in head + vjp_body[0]:
            w(line)
        for p, kind, *_ in outs:
            if kind == "param":
                w(f"b_sum_{p} = tl.zeros([{block}], dtype=tl.float32)" if is_vector[p]
                  else f"b_sum_{p} = tl.zeros([], dtype=tl.float32)")
        lines = list(vjp_body[1])
        for (p, kind, *_), text in zip(outs, vjp_body[2]):
            if kind == "param" and is_vector[p]:  # masked: a padding lane's 0 / sqrt(0) must not reach the sum
                lines.append(f"b_sum_{p} += tl.where({mask}, {text}, 0.0)")
            elif kind == "param":
                lines.append(f"b_sum_{p} += {text}")
            elif is_vector[p]:
                lines.append(f"tl.store(d_{p} + row * {dim} + {offs}, ({text}).to(d_{p}.dtype.element_ty), "
                             f"mask={mask})")
            else:
                lines.append(f"tl.store(d_{p} + row, ({text}).to(d_{p}.dtype.element_ty))")
        row_loop(lines)
        for p, kind, *_ in outs:
            if kind == "param":
                w(f"tl.store(d_{p} + (i_r * H_ + i_h) * {dim} + {offs}, b_sum_{p}, mask={mask})" if is_vector[p]
                  else f"tl.store(d_{p} + i_r * H_ + i_h, b_sum_{p})")
        w()
        w()
        # -- the launchers: the signatures of the torch form's pair, joined by with_vjp
        grid = "(H_, triton.cdiv(B_ * T_, BLOCK_R_))"
        # max(D, 1): a zero-size axis still needs a one-lane block (every lane masked; a sum over D is then 0)
        consts = "BLOCK_R=BLOCK_R_" + (f", {block}=triton.next_power_of_2(max({dim}, 1))" if dim else "")
        w(f"def {fwd}({', '.join(tensors + sizes)}):", 0)
        w(f'"""{what}; inputs [B, T, H, ...], params [1, 1, H, ...]: its values of the inputs by {kernel}, and last '
          'unsafe_ [1] int32, the first step _check_steps would refuse in them (T: none)."""')
        w(f"B_, T_, H_ = {first}.shape[:3]")
        w(f"dtype_ = {args[0]}.dtype")
        for p in args[1:]:
            w(f"dtype_ = torch.promote_types(dtype_, {p}.dtype)  # the torch form's dtype")
        if self.checkpoints:
            w("dtype_ = torch.promote_types(dtype_, torch.float32)  # the values in float32 for half inputs too")
        if any(not dims and not is_constant(expr, self.sizes) for _, expr, _, dims, *_ in values):
            # A per-step scalar (mLSTM's exp(ig), a log decay) in float32 for float16 and bfloat16 inputs: float16
            # overflows past exp(11.1), and the rounding of exp(ig) or a log decay (2**-11 per step in float16,
            # 2**-8 in bfloat16) is magnified by a readout's cancelling sum (mLSTM's q n: at ig ~ N(6, 1) bfloat16
            # scalars gave the output a relative error of 0.1-0.3). One number per step and head: small beside
            # the [B, T, H, D] tensors, which keep the inputs' dtype.
            w("scalar_dtype_ = torch.promote_types(dtype_, torch.float32)  # float32, or float64 for float64")
        cprinter = TorchPrinter(self.sizes, ranges, py)
        for out, expr, indices, dims, *comment in values:
            note = f"  # {comment[0]}" if comment and comment[0] else ""
            if is_constant(expr, self.sizes):
                w(f"{out} = {self._full(cprinter, expr, indices, dims)}{note}")
            else:
                shape = f"(B_, T_, H_, {dim})" if dims else "(B_, T_, H_)"
                w(f"{out} = torch.empty({shape}, dtype={'dtype_' if dims else 'scalar_dtype_'}, "
                  f"device={first}.device){note}")
        w(f"unsafe_ = torch.full((1,), T_, dtype=torch.int32, device={first}.device)")
        w("BLOCK_R_ = 16  # rows (b, t) per program")
        w("if B_ * T_ * H_:")
        w(f"{kernel}[{grid}](", 2)
        w(f"{', '.join(f'{p}.contiguous()' for p in args)}, {', '.join(v[0] for v in fields)}, unsafe_, B_ * T_, H_, "
          f"T_{size_args}, {consts})", 3)
        w(f"return {', '.join(v[0] for v in values)}, unsafe_")
        w()
        w()
        w(f"def {vjp}({', '.join(tensors + list(grads.values()))}, grad_unsafe_{size_args}):", 0)
        w(f'"""The vector-Jacobian product of {fwd} by {kernel_vjp}: the gradient of each argument (None where it '
          "is not differentiable) from those of its values; a param's summed over B and T (float32 parts per block "
          'of rows, summed here)."""')
        w(f"B_, T_, H_ = {first}.shape[:3]")
        w("BLOCK_R_ = 16")
        for p, kind, *_ in outs:
            if kind == "param":
                shape = f"(triton.cdiv(B_ * T_, BLOCK_R_), H_, {dim})" if is_vector[p] else \
                    "(triton.cdiv(B_ * T_, BLOCK_R_), H_)"
                w(f"d_{p} = torch.empty({shape}, dtype=torch.float32, device={first}.device)")
            else:
                # dense like the kernel writes it: empty_like alone keeps a transposed input's strides
                w(f"d_{p} = torch.empty_like({p}, memory_format=torch.contiguous_format)")
        w("if B_ * T_ * H_:")
        w(f"{kernel_vjp}[{grid}](", 2)
        w(f"{', '.join(f'{p}.contiguous()' for p in args + field_grads)}, {', '.join(grad_outs)}, B_ * T_, H_"
          f"{size_args}, {consts})", 3)
        for p, kind, *_ in outs:
            if kind == "param":
                w(f"d_{p} = d_{p}.sum(0).view({p}.shape).to({p}.dtype)")
        returned = [f"d_{p}" if p in {o[0] for o in outs} else "None" for p in tensors]
        w(f"return {', '.join(returned)}{',' if len(tensors) == 1 else ''}")
        w()
        w()
        w(f"{name} = with_vjp({fwd}, {vjp}, {len(tensors)})", 0)
        self.prologue_checked = {v[0] for v in fields}
        return w.text()

    # -- chunked ----------------------------------------------------------------

    @staticmethod
    def _bare_readout(oa, readout_irs: set) -> str | None:
        """The readout (IR name, one of `readout_irs`) that output view `oa` is as it is, indexed as the output;
        None for an output the chunked form's epilogue computes."""
        bare = oa.expr if isinstance(oa.expr, (sympy.Indexed, sympy.Symbol)) else None
        name = str(getattr(bare, "base", bare))
        if bare is None or name not in readout_irs or tuple(getattr(bare, "indices", ())) != tuple(oa.indices):
            return None
        return name

    def _epilogue_reads(self, view, readout_irs: set) -> set[str]:
        """The IR names read by the outputs that are no readout as it is (`_bare_readout`): what the chunked form's
        printed epilogue reads, unless the kernels apply the epilogue (`_epilogue_of`: a one-state spec's one
        output)."""
        reads: set[str] = set()
        for o in self.rec.outputs:
            oa = view.outputs[o.name]
            if self._bare_readout(oa, readout_irs) is None:
                expr = sympy.sympify(oa.expr)
                reads |= {str(n.base) for n in expr.atoms(sympy.Indexed)} | {n.name for n in expr.free_symbols}
        return reads

    def write_chunked(self) -> str | None:
        """The chunked form's source, or None. Where its prologue is a Triton kernel that checks the values it
        writes (`_elementwise_prologue`), which ones is known once the prologue is printed: the form is then
        printed once more, each state's `_check_steps` line without them (`_write_chunked`)."""
        if "chunked" not in self.a.forms:
            return None
        text = self._write_chunked(frozenset())
        if self.prologue_checked:
            checked = frozenset(self.prologue_checked)
            text = self._write_chunked(checked)
            assert self.prologue_checked == checked, "the chunked prologue printed otherwise the second time"
        return text

    def _write_chunked(self, kernel_checked: frozenset) -> str:
        """The chunked form, its `_check_steps` lines leaving out `kernel_checked` (the prologue kernel's values)
        and starting from the first step that kernel found unsafe (`unsafe_`); sets `prologue_checked`."""
        self.prologue_checked = set()
        w = SourceWriter()
        self._header(w, "chunked", ", chunk_size=64, check_steps=True" + (", every=0" if self.checkpoints else "")
                     + (", **options" if self.options else ""))
        if self.checkpoints:
            w('"""Chunked form: intra-chunk masked matmuls, the state passed once per chunk. Returns (outputs, final')
            w('states, checkpoints): with every > 0 (the chunk length) the states entering every chunk, from which the')
            w('derived adjoint recomputes each chunk\'s steps."""')
        else:
            w('"""Chunked form: intra-chunk masked matmuls, the state passed once per chunk."""')
        self._unpack_shape(w)
        self._params_to_time(w)
        printer = TorchPrinter(self.sizes, self.a.ir.ranges, self.py)
        view = self.a.chunk_analysis  # the states of `view.transposed` are held as their transposes here
        readout_names = dict(self.py)
        epilogue_done: dict[str, str] = {}  # outputs the kernels store whole (a fused epilogue) -> their tensor
        readout_irs = {r.name for sa in view.states.values() for r in sa.chunk.readouts} - set(self.py)
        epilogue_reads = self._epilogue_reads(view, readout_irs)
        # The prologue: every tensor the runtime receives that is a function of the inputs and params, computed by
        # one printed function (NAME__chunked_prologue) whose VJP is printed from sympy (`_write_printed_vjp`).
        prologue: list = []  # (Python name, IR expression, indices, dims)
        seen: dict = {}  # (expression, indices, dims) -> the value computed first
        at = len(w.lines)  # where the call of the prologue goes
        # The Triton form's elementwise maps (`_map_of`), printed once each as @triton.jit helpers named after the
        # raw input they map (NAME__map_k): (input, srepr of f(x)) -> the helper's name, and the helpers' source.
        map_names: dict[tuple, str] = {}
        map_sources: list[str] = []

        def map_helper(leaf, f: sympy.Expr, where: str = "QMAP / KMAP") -> str:
            key = (str(getattr(leaf, "base", leaf)), sympy.srepr(f))  # (an input [B, T, H] is a Symbol)
            if key not in map_names:
                taken = sum(1 for k in map_names if k[0] == key[0])
                map_names[key] = f"{self.fn}__map_{self.py[key[0]]}" + (f"_{taken + 1}" if taken else "")
                map_sources.append(self._map_helpers(map_names[key], f, where))
            return map_names[key]

        inputs = {i.name for i in self.rec.inputs}
        # The log decays checked as they are (<= 0), and those checked with a per-head factor (g, head), for a
        # prologue the Triton kernels compute (`_elementwise_prologue`).
        self.plain_logs, self.headed_logs = set(), set()
        aliases: dict[str, str] = {}  # a value that is another's tensor -> that value

        def pro(name: str, expr, indices, dims, after: str = "", comment: str = "") -> None:
            if (isinstance(expr, sympy.Indexed) and str(expr.base) in inputs
                    and tuple(expr.indices) == tuple(indices)) or (isinstance(expr, sympy.Symbol) and not indices
                                                                  and expr.name in inputs):
                # an input as it is: the runtime reads the argument itself
                w(f"{name} = {self.py[str(getattr(expr, 'base', expr))]}{after}" + (f"  # {comment}" if comment
                                                                                      else ""))
                return
            key = (sympy.srepr(expr), tuple(indices), tuple(dims))
            if key in seen and not after:
                w(f"{name} = {seen[key]}  # {comment}; the same tensor" if comment else f"{name} = {seen[key]}")
                aliases[name] = seen[key]
                return
            if not after:
                seen[key] = name
            prologue.append((name, expr, tuple(indices), tuple(dims), comment))
            if after:
                w(f"{name} = {name}{after}")
        merged: dict[str, str] = {}  # a state run as value columns of another's call -> that state
        for s in self.rec.states:
            if s.name in merged:  # its readouts and final state were split off merged[s.name]'s call
                continue
            sa = view.states[s.name]
            plan = sa.chunk
            dims = sa.dims
            # The key axis: a 3-axis state's pair plan builds k and q over its first two axes and flattens them.
            kdims, flat = (dims[:2], ".flatten(-2)") if plan.pair else (dims[:1], "")
            w(f"# state {s.name} ({self.cite[s.name]}): {sa.cls.value}; {sa.reason}")
            if plan.pair:
                w(f"# {s.name} is held as [{' * '.join(map(str, kdims))}, {dims[2]}] here: its first two axes "
                  f"flattened into one key axis")
            if s.name in view.transposed:
                w(f"# {s.name} is [{', '.join(map(str, s.dims))}] and read along its second axis: the chunked form "
                  f"runs on its transpose")
            if sa.cls is TransitionClass.RANK_R_UPDATE:
                done = self._write_rank_r(w, printer, view, s, sa, readout_names)
                if done:
                    epilogue_done[done] = readout_names[sa.chunk.readouts[0].name]
                continue
            if plan.sub_steps:  # an injection that is a sum of outer products
                self._write_sub_steps(w, printer, view, s, sa, readout_names)
                continue
            fuse = self._fusion(view, s, sa, printer)
            if (sa.cls is TransitionClass.DIAGONAL_PLUS_RANK_ONE and self.options and not plan.pair
                    and s.name not in view.transposed and not view.lifted.get(s.name)
                    and plan.decay_axis != "value"):  # (a value decay's output kernel takes no fused epilogue)
                # its output kernel applies the readout's epilogue (RWKV-7's bonus as a skip term weighted per step)
                epilogue = self._epilogue_of(view, s, sa.chunk, printer)
                fuse = {"k": plan.k.expr, "v": plan.v.expr, "v_step": None, **epilogue} if epilogue else None
            if fuse and not (fuse["v_step"] or fuse.get("decay_head") or fuse.get("out")):
                fuse = None  # nothing to hand to the kernels: the plain call
            k_expr, v_expr = (fuse["k"], fuse["v"]) if fuse else (plan.k.expr, plan.v and plan.v.expr)
            fused_args, fused_checks = "", []
            # Elementwise maps of one raw input (feature maps, gates) go to the linear kernels of the Triton runtime
            # as printed helpers applied at their loads, in place of [B, T, H, K] prologue tensors.
            maps = (self.options and not plan.pair and s.name not in view.transposed and not view.lifted.get(s.name)
                    and sa.cls not in (TransitionClass.RANK_ONE_UPDATE, TransitionClass.DIAGONAL_PLUS_RANK_ONE)
                    and plan.decay_axis != "value")
            log_leaf = (plan.log_decay.expr if plan.log_decay is not None and not (fuse and fuse.get("decay_head"))
                        else None)
            k_map = self._map_of(k_expr, plan.k.indices, log_leaf) if maps else None
            q_maps = [self._map_of(r.query.expr, r.query.indices, log_leaf) for r in plan.readouts] if maps else []
            q_map = (q_maps[0] if q_maps and all(q_maps) and len({(m[0], sympy.srepr(m[1])) for m in q_maps}) == 1
                     else None)
            # A scalar decay whose log decays (and per-step factor of v, if any) are functions of one raw input
            # [B, T, H] each (mLSTM's logsigmoid(fg), exp(ig)) hands the raw inputs and printed helpers to the
            # runtime, which maps them where its kernels load them and checks the mapped values (`unsafe_`).
            scalar_maps = None
            if (maps and plan.decay_axis == "scalar" and not (fuse and fuse.get("decay_head"))
                    and plan.log_decay is not None):
                g_map = self._scalar_map_of(plan.log_decay.expr)
                vs_map = self._scalar_map_of(fuse["v_step_expr"]) if fuse and fuse["v_step"] else None
                if g_map and (vs_map or not (fuse and fuse["v_step"])):
                    scalar_maps = (g_map, vs_map)
            if fuse:
                w("# the prologue's per-step factors and the readout's epilogue are applied inside the kernels "
                  "(triton_runtime._Fused)")
                if fuse["v_step"] and scalar_maps:
                    helper = map_helper(*scalar_maps[1], where="VSMAP")
                    w(f"v_step_{s.name} = {self.py[str(scalar_maps[1][0])]}  # a factor of k v^T: "
                      f"{sympy.sstr(fuse['v_step_expr'])}, mapped by {helper} in the kernels")
                    fused_args += f", v_step=v_step_{s.name}, v_step_map=({helper}, {helper}_vjp)"
                elif fuse["v_step"]:
                    pro(f"v_step_{s.name}", fuse["v_step_expr"], (), (), comment="a factor of k v^T")
                    fused_args += f", v_step=v_step_{s.name}"
                    fused_checks.append(f"v_step_{s.name}")
            if k_map:
                helper = map_helper(*k_map)
                w(f"k_{s.name} = {self.py[str(k_map[0].base)]}  # {self.cite[s.name]}; mapped by {helper} in the "
                  "kernels")
                fused_args += f", k_map=({helper}, {helper}_vjp)"
            else:
                pro(f"k_{s.name}", k_expr, plan.k.indices, kdims, flat, self.cite[s.name])
            if plan.v is not None:
                pro(f"v_{s.name}", v_expr, plan.v.indices, (dims[-1],), comment=self.cite[s.name])
                state = f"states['{s.name}']" + (".transpose(-1, -2)" if s.name in view.transposed else "")
                if plan.pair:
                    state += ".flatten(-3, -2)"
            else:
                w(f"v_{s.name} = k_{s.name}.new_ones(B_, T_, H_, 1)  # a state with no value axis: V = 1")
                state = f"states['{s.name}'][..., None]"
            vname = f"v_{s.name}"
            columns = self._value_columns(view, s, sa, k_expr, fuse, merged)
            if columns:
                # One call for s and its partners (C' = [C | n], v' = [v, 1]): the intra-chunk scores q k^T, the
                # decays' cumsums and the chunk loop are shared instead of recomputed for one value column each.
                # Zero columns round the width up to a multiple of 16: at V + 1 = 129 the kernels' rows lose the
                # alignment of their vector loads (compile report on sm_90: 255 registers and a spill in the
                # backward at K = V = 128 bfloat16, none at 144 columns); zero columns stay zero.
                width = self._dim(dims[-1])
                w(f"pad_ = -({width} + {len(columns)}) % 16  # zero columns: a width of a multiple of 16")
                parts, starts = [vname], [state]
                for other, _ in columns:
                    merged[other] = s.name
                    w(f"# state {other} ({self.cite[other]}): {s.name}'s decay, keys and queries, its injection "
                      f"{s.name}'s with the value replaced by 1: one more value column of {s.name}'s call")
                    parts.append(f"{vname}.new_ones(B_, T_, H_, 1)")
                    starts.append(f"states['{other}'][..., None]")
                parts.append(f"{vname}.new_zeros(B_, T_, H_, pad_)")
                starts.append(f"{state}.new_zeros((*{state}.shape[:-1], pad_))")
                vname = f"v_{'_'.join([s.name] + [c[0] for c in columns])}"
                w(f"{vname} = torch.cat([{', '.join(parts)}], dim=-1)  # [B, T, H, {dims[-1]} + {len(columns)} + pad_]")
                state = f"torch.cat([{', '.join(starts)}], dim=-1)"
            lift = view.lifted.get(s.name)
            if lift:
                # held with a leading key axis of size 1: a count n as n[1], a vector read elementwise as h[1, D]
                w(f"# {s.name} is held as [{', '.join(map(str, sa.dims))}] here: a key axis of size 1 in front")
                state = f"states['{s.name}'][..., None, {'None' if lift == 'scalar' else ':'}]"
            decay = "None"
            if plan.log_decay is not None:
                shape = {"scalar": (), "key": kdims, "value": (dims[-1] if len(dims) > 1 else 1,)}
                if not plan.decay_exact:
                    _guarded(w, f"_require_positive({printer.print_expr(sa.diagonal, sa.indices)}, "
                             # (one function, both forms)
                             f"'the decay {tidy(sa.diagonal)} of {s.name}', ('chunked', 'parallel'))")
                head = fuse.get("decay_head") if fuse else None
                g_expr = fuse["log_decay"] if head else plan.log_decay.expr
                if scalar_maps:
                    helper = map_helper(*scalar_maps[0], where="GMAP")
                    w(f"log_decay_{s.name} = {self.py[str(scalar_maps[0][0])]}  # {self.cite[s.name]}: "
                      f"{sympy.sstr(g_expr)}, mapped by {helper} in the kernels")
                    fused_args += f", log_decay_map=({helper}, {helper}_vjp)"
                    if not kernel_checked:  # (else the prologue kernel's unsafe_, lowered by both)
                        w(f"unsafe_ = torch.full((1,), T_, dtype=torch.int32, "
                          f"device={self.py[str(scalar_maps[0][0])]}.device)  # the first step whose mapped values "
                          "are unsafe, lowered by the kernels (T: none)")
                    fused_args += ", unsafe=unsafe_"
                else:
                    pro(f"log_decay_{s.name}", g_expr, plan.log_decay.indices, shape[plan.decay_axis],
                        flat if plan.decay_axis == "key" else "",
                        self.cite[s.name] + (f"; times {head} per head in the kernels" if head else ""))
                decay = f"log_decay_{s.name}"
                if head:
                    fused_args += f", decay_head={head}"
            queries = []
            for n, r in enumerate(plan.readouts):
                # The readouts sum(i, query[i] * S[i, j]) of this state, named after it: read_S (read_S_2, ...).
                readout_names[r.name] = f"read_{s.name}" + (f"_{n + 1}" if n else "")
                if q_map:
                    helper = map_helper(*q_map)
                    w(f"query_{readout_names[r.name]} = {self.py[str(q_map[0].base)]}  # {self._readers(view, r.name)}"
                      f"; mapped by {helper} in the kernels")
                else:
                    pro(f"query_{readout_names[r.name]}", r.query.expr, r.query.indices, kdims, flat,
                        self._readers(view, r.name))
                queries.append(f"(query_{readout_names[r.name]}, {r.exclusive})")
            if q_map:
                fused_args += f", q_map=({helper}, {helper}_vjp)"
            checked = [f"query_{readout_names[r.name]}" for r in plan.readouts] + [f"k_{s.name}", vname]
            # The diagonal-plus-rank-one class's b as an elementwise function of two raw inputs (RWKV-7's
            # -(a * kk)): the Triton kernels load both and apply a printed helper (`b_map`), no b tensor is written.
            b_pair = (self._pair_map_of(plan.mix_write.expr, plan.mix_write.indices)
                      if sa.cls is TransitionClass.DIAGONAL_PLUS_RANK_ONE and self.options and not plan.pair
                      and s.name not in view.transposed and not view.lifted.get(s.name) else None)
            if sa.cls is TransitionClass.DIAGONAL_PLUS_RANK_ONE:
                checked += [f"a_{s.name}", f"b_{s.name}"]
                if b_pair and b_pair[0][1] != plan.mix_read.expr:  # (the second input, unless it is a's tensor)
                    checked.append(self.py[str(b_pair[0][1].base)])
            elif sa.cls is TransitionClass.RANK_ONE_UPDATE:
                checked.append(f"beta_{s.name}")
            checked += fused_checks
            if k_map and k_map[0] == log_leaf and self._finite_at_reset(k_map[1]):
                # k is the log decay's own input, mapped: its check there (NaN or > 0) covers it, and a reset (-inf)
                # maps to a finite key (HGRN2's 1 - exp(-inf) = 1), so it need not leave the chunks
                checked.remove(f"k_{s.name}")
            if fuse and fuse.get("out"):
                if fuse.get("scale"):
                    fused_args += f", scale=_fused_scale(lambda: {fuse['scale']})"
                bonus = (self._bonus_of(fuse.get("skip_weight_expr"), plan, k_expr)
                         if sa.cls is TransitionClass.DIAGONAL_PLUS_RANK_ONE and self.options else None)
                if bonus:  # the output kernel sums the weight sum(i, q[i] * u[i] * k[i]) from its q and k loads
                    q_name, k_name = (self.py[str(plan.readouts[0].query.expr.base)], self.py[str(k_expr.base)])
                    w(f"# {self.cite[fuse['out']]}: the skip term's weight per step, sum(i, {q_name}[i] * {bonus}[i] * "
                      f"{k_name}[i]), summed by the output kernel from its loads (bonus={bonus})")
                    fused_args += f", skip={fuse['skip']}, bonus={bonus}"
                elif fuse.get("skip_weight_expr") is not None:  # a weight per step: a prologue value [B, T, H]
                    pro(f"skip_weight_{s.name}", fuse["skip_weight_expr"], (), (),
                        comment=f"{self.cite[fuse['out']]}: the skip term's weight per step")
                    fused_args += f", skip={fuse['skip']}, skip_weight=skip_weight_{s.name}"
                elif fuse.get("skip"):
                    fused_args += f", skip={fuse['skip']}, skip_weight={fuse['skip_weight']}"
            # Non-finite values and log decays > 0 leave the matmuls here for the step loop (see _check_steps).
            logs = "" if decay == "None" else (f"({decay}, {fuse['decay_head']})" if fuse and fuse.get("decay_head")
                                               else decay)
            (self.headed_logs if logs.startswith("(") else self.plain_logs).add(aliases.get(decay, decay))
            if scalar_maps:
                # the runtime's kernels checked the mapped log decays and v_step (`unsafe_`): the check follows the
                # call (an unsafe call's results are dropped when it raises)
                done = kernel_checked | {a for a, v in aliases.items() if v in kernel_checked}
                rest = ", ".join(c for c in checked if c not in done)
                check = f"_check_steps([{rest}], [], first=(unsafe_, T_))"
            elif kernel_checked:  # the prologue kernel checked these (or the tensors they are) as it wrote them
                done = kernel_checked | {a for a, v in aliases.items() if v in kernel_checked}
                rest = ", ".join(c for c in checked if c not in done)
                check = f"_check_steps([{rest}], [{'' if logs in done else logs}], first=(unsafe_, T_))"
            else:
                check = f"_check_steps([{', '.join(checked)}], [{logs}])"
            axis = self.rt + _DECAY_CLASSES[plan.decay_axis]  # the runtime's class of the plan's decay axis
            if sa.cls is TransitionClass.RANK_ONE_UPDATE and plan.decay_axis == "key":
                axis = self.rt + "KeyDeltaDecay"  # the Triton runtime's key decay with the delta backward's steps
            outs = ", ".join(readout_names[r.name] for r in plan.readouts) + ("," if len(plan.readouts) == 1 else "")
            target = f"({outs}), final_{s.name}" if plan.readouts else f"_, final_{s.name}"
            if sa.cls is TransitionClass.DIAGONAL_PLUS_RANK_ONE:
                pro(f"a_{s.name}", plan.mix_read.expr, plan.mix_read.indices, kdims,
                    comment="reads the state: u_t = S_(t-1)^T a_t")
                if b_pair:
                    (x_leaf, y_leaf), f = b_pair
                    key = (f"{x_leaf.base}_{y_leaf.base}", sympy.srepr(f))
                    if key not in map_names:
                        map_names[key] = f"{self.fn}__map_{self.py[str(x_leaf.base)]}_{self.py[str(y_leaf.base)]}"
                        map_sources.append(self._pair_map_helper(map_names[key], f, b_pair[0]))
                    x_name, y_name = self.py[str(x_leaf.base)], self.py[str(y_leaf.base)]
                    shown = sympy.sstr(f.xreplace({sympy.Symbol("x", real=True): sympy.Symbol(x_name),
                                                   sympy.Symbol("y", real=True): sympy.Symbol(y_name)}))
                    w(f"b_{s.name} = {x_name}  # writes u_t back along b_t: {shown}, {map_names[key]}({x_name}, "
                      f"{y_name}) in the kernels")
                    fused_args += f", b_map=({map_names[key]}, {self.py[str(y_leaf.base)]})"
                else:
                    pro(f"b_{s.name}", plan.mix_write.expr, plan.mix_write.indices, kdims,
                        comment="writes u_t back along b_t")
                _guarded(w, check)
                starts = f", starts_{s.name}" if self.checkpoints else ""
                w(f"{target}{starts} = {self.rt}chunked_dplr_by({axis}, [{', '.join(queries)}], k_{s.name}, "
                  f"v_{s.name}, a_{s.name}, b_{s.name}, {decay}, initial_state={self._initial(s.name, state)}, "
                  f"chunk_size=chunk_size, "
                  f"output_final_state=True{', output_chunk_states=True' if self.checkpoints else ''}"
                  f"{fused_args}{self._options_arg})")
            elif sa.cls is TransitionClass.RANK_ONE_UPDATE:
                pro(f"beta_{s.name}", plan.beta.expr, (), (), comment=self.cite[s.name])
                _guarded(w, check)
                w(f"{target} = {self.rt}chunked_delta_by({axis}, [{', '.join(queries)}], k_{s.name}, v_{s.name}, "
                  f"beta_{s.name}, {decay}, initial_state={self._initial(s.name, state)}, chunk_size=chunk_size, "
                  f"output_final_state=True{fused_args}{self._options_arg})")
            else:
                if not scalar_maps:
                    _guarded(w, check)
                # The Triton runtime keeps the readouts the printed epilogue reads in float32 for float16 inputs
                # (its `readouts`): mLSTM's q C and q n pass 65504 where their ratio does not. (A fused epilogue,
                # fuse["out"], is the kernels': then no output is left for a printed one.)
                float32 = (self.rt and not (fuse and fuse.get("out"))
                           and epilogue_reads & {r.name for r in plan.readouts})
                # and its chunk-start states in float32 for bfloat16 inputs too where it carries normaliser columns
                # (its `float32_states`): the epilogue divides q C by q n, sums that cancel, and bfloat16 states'
                # rounding came out magnified (mLSTM: 0.09 of the output at input gates ~ N(6, 1))
                w(f"{target} = {self.rt}chunked_linear_by({axis}, [{', '.join(queries)}], k_{s.name}, {vname}, "
                  f"{decay}, "
                  f"initial_state={self._initial(s.name, state)}, chunk_size=chunk_size, output_final_state=True"
                  f"{fused_args}{', readouts=True' if float32 else ''}"
                  f"{', float32_states=True' if self.rt and columns else ''}"
                  f"{self._options_arg})")
                if scalar_maps:
                    _guarded(w, check)
            if fuse and fuse.get("out"):
                epilogue_done[fuse["out"]] = readout_names[plan.readouts[0].name]
            if columns:
                # split, not slices: its backward is one cat of the parts' gradients (zeros for the unused parts),
                # where each slice's would be a zero tensor of all the columns, then summed with the others'
                sizes = ", ".join([width] + ["1"] * len(columns) + ["pad_"])
                parts = ", ".join([f"final_{s.name}"] + [f"final_{other}" for other, _ in columns] + ["_"])
                w(f"{parts} = final_{s.name}.split([{sizes}], dim=-1)  # {s.name}'s columns, "
                  f"{', '.join(other for other, _ in columns)}'s, the zeros")
                for other, pairs in columns:
                    for m, (r, _) in enumerate(pairs):
                        readout_names[r.name] = f"read_{other}" + (f"_{m + 1}" if m else "")
                for r2 in plan.readouts:
                    # each partner's readouts of r2's query: the first takes its column, any other is the same tensor
                    mine = [[r for r, rs in pairs if rs is r2] for _, pairs in columns]
                    names = [readout_names[r2.name]] + [readout_names[m[0].name] if m else "_" for m in mine]
                    w(f"{', '.join(names + ['_'])} = {readout_names[r2.name]}.split([{sizes}], dim=-1)")
                    for m in mine:
                        if m:
                            w(f"{readout_names[m[0].name]} = {readout_names[m[0].name]}.squeeze(-1)")
                        for r in m[1:]:
                            w(f"{readout_names[r.name]} = {readout_names[m[0].name]}")
                for other, _ in columns:
                    w(f"final_{other} = final_{other}.squeeze(-1)")
            if s.name in view.transposed:
                w(f"final_{s.name} = final_{s.name}.transpose(-1, -2)")
            if plan.pair:
                w(f"final_{s.name} = final_{s.name}.unflatten(-2, ({', '.join(self._dim(d) for d in kdims)}))  "
                  "# the pair's two axes again")
            if plan.v is None:
                w(f"final_{s.name} = final_{s.name}[..., 0]")
                for r in plan.readouts:
                    w(f"{readout_names[r.name]} = {readout_names[r.name]}[..., 0]")
            if lift:
                rest = "" if lift == "scalar" else ", :"
                w(f"final_{s.name} = final_{s.name}[..., 0{rest}]  # without the size-1 key axis")
        outs = []
        epilogue = []  # the outputs computed from the readouts: (Python name, IR expression, indices, dims)
        for o in self.rec.outputs:
            oa = view.outputs[o.name]
            bare = self._bare_readout(oa, readout_irs)
            if o.name in epilogue_done:  # the kernels stored the whole expression
                w(f"{self.py[o.name]} = {epilogue_done[o.name]}  # {self.cite[o.name]}, its epilogue in the kernels")
            elif bare is not None:
                w(f"{self.py[o.name]} = {readout_names[bare]}  # {self.cite[o.name]}")
            else:
                epilogue.append((self.py[o.name], oa.expr, tuple(oa.indices), tuple(o.dims)))
            outs.append(f"'{o.name}': {self.py[o.name]}")
        functions = []
        if epilogue:
            reads = [(ir, p) for ir, p in readout_names.items() if ir not in self.py]
            text, derived, call_args = self._write_printed_vjp(
                "chunked_epilogue", "The chunked form's epilogue: its outputs from the runtime's readouts", epilogue,
                reads, view.ir.ranges)
            functions.append(text)
            targets = ", ".join(e[0] for e in epilogue) + ("," if len(epilogue) == 1 else "")
            call_args = ", ".join(call_args)
            w(f"{targets} = {self.fn}__chunked_epilogue{self.suffix}({call_args})  "
              f"# {', '.join(self.cite[o.name] for o in self.rec.outputs if self.py[o.name] in targets)}"
              + ("" if derived else "; differentiated by autograd"))
        if prologue:
            text, derived, call_args = self._write_printed_vjp(
                "chunked_prologue", "The chunked form's prologue: the tensors its runtime receives", prologue, [],
                self.a.ir.ranges)
            functions.insert(0, text)
            targets = ", ".join(v[0] for v in prologue) + ("," if len(prologue) == 1 else "")
            if self.prologue_checked:  # its kernel checked the values it wrote (`unsafe_`, the first step to refuse)
                targets = ", ".join(v[0] for v in prologue) + ", unsafe_"
            call = (f"{targets} = {self.fn}__chunked_prologue{self.suffix}({', '.join(call_args)})"
                    + ("" if derived else "  # differentiated by autograd"))
            vjp = f"{self.fn}__chunked_prologue_vjp{self.suffix}"
            lines = [f"    # the prologue; its backward: {vjp}, printed from sympy"] if derived else []
            lines.append("    " + call)
            w.lines[at:at] = lines
        if map_sources:
            functions.append("# The elementwise maps of raw inputs, applied by the chunked kernels where they load "
                             "them (QMAP / KMAP),\n# each with its derivative for the backward, from sympy\n\n\n"
                             + "\n\n\n".join(map_sources))
        finals = ", ".join(f"'{s.name}': final_{s.name}" for s in self.rec.states)
        if self.checkpoints:
            starts = ", ".join(f"'{s.name}': starts_{s.name}[:, :, n]" for s in self.rec.states)
            first = self.rec.states[0].name
            w(f"checkpoints = [{{{starts}}} for n in range(starts_{first}.shape[2])] if every else []")
            w(f"return {{{', '.join(outs)}}}, {{{finals}}}, checkpoints")
        else:
            w(f"return {{{', '.join(outs)}}}, {{{finals}}}")
        return "\n\n".join(functions + [w.text()])

    def _write_rank_r(self, w: SourceWriter, printer: TorchPrinter, view, s, sa, readout_names: dict) -> str | None:
        """A rank-r update (DeltaProduct): the r delta-rule updates of step t run as steps r t, ..., r t + r - 1 of
        a sequence r times as long (only the first r t + n carrying its own decay, 0 in log space where an update
        has none), through the delta rule's chunked (WY/UT) form; step t's outputs are read after its last update
        (a readout of S_(t-1) before its first). Siems et al. 2025, "DeltaProduct", Sec. 3.

        On the Triton runtime an update's values `beta_n * v_n` go in as v_n with the per-step factor `v_step`, and
        the readout's constant factor (`scale`) is applied by the output kernel (`triton_runtime._Fused`): no
        [B, T, H, V] product in the prologue or the epilogue. Returns the output the kernels stored whole, or None."""
        name = s.name
        plan = sa.chunk
        r = len(plan.sub_steps)
        kdim, vdim = sa.dims
        K = self._dim(kdim)
        positions = ", ".join(f"{r}t + {n}" if n else f"{r}t" for n in range(r))
        w(f"# its {r} updates per step run as delta-rule steps {positions} of a sequence {r} times as long")
        lines = [st.span.line for st in self.rec.statements if st.target.name == name]
        spec = cite(self.rec, "")  # the file name alone
        names = {"k": [], "v": [], "beta": [], "log_decay": [], "v_step": []}
        logs = []
        # every update's values a per-step factor times an input (DeltaProduct's b_n * v_n): the factors to the kernels
        splits = [self._split_step(sub.v.expr, sub.v.indices) for sub in plan.sub_steps] if self.options else []
        v_step = bool(splits) and all(x is not None and x[1] is not None for x in splits)
        for n, (one, sub) in enumerate(zip(sa.stages, plan.sub_steps), start=1):
            tag = f"{name}_{n}"
            where = f" ({spec}:{lines[n - 1]})" if len(lines) == r else ""  # (a decay alone is no update)
            w(f"k_{tag} = {self._full(printer, sub.k.expr, sub.k.indices, (kdim,))}  # update {n}{where}")
            v_expr = splits[n - 1][0] if v_step else sub.v.expr
            w(f"v_{tag} = {self._full(printer, v_expr, sub.v.indices, (vdim,))}")
            w(f"beta_{tag} = {self._full(printer, sub.beta.expr, (), ())}")
            if v_step and splits[n - 1][1] == sub.beta.expr:
                names["v_step"].append(f"beta_{tag}")
            elif v_step:
                w(f"v_step_{tag} = {self._full(printer, splits[n - 1][1], (), ())}  # a factor of the values")
                names["v_step"].append(f"v_step_{tag}")
            names["k"].append(f"k_{tag}")
            names["v"].append(f"v_{tag}")
            names["beta"].append(f"beta_{tag}")
            if sub.log_decay is not None:
                if not sub.decay_exact:
                    _guarded(w, f"_require_positive({printer.print_expr(one.diagonal, one.indices)}, "
                             f"'the decay {tidy(one.diagonal)} of {name} (update {n})', ('chunked',))")
                shape = (kdim,) if sub.decay_axis == "key" else ()
                w(f"log_decay_{tag} = {self._full(printer, sub.log_decay.expr, sub.log_decay.indices, shape)}")
                logs.append(f"log_decay_{tag}")
                if sub.decay_axis != plan.decay_axis:  # a scalar decay beside another update's key decay
                    w(f"log_decay_{tag} = log_decay_{tag}[..., None].expand(B_, T_, H_, {K})")
                names["log_decay"].append(f"log_decay_{tag}")
            elif plan.decay_axis is not None:
                shape = f"B_, T_, H_, {K}" if plan.decay_axis == "key" else "B_, T_, H_"
                names["log_decay"].append(f"k_{tag}.new_zeros({shape})")
        for m, ro in enumerate(plan.readouts):
            readout_names[ro.name] = f"read_{name}" + (f"_{m + 1}" if m else "")
            w(f"query_{readout_names[ro.name]} = {self._full(printer, ro.query.expr, ro.query.indices, (kdim,))}  "
              f"# {self._readers(view, ro.name)}")
        checked = [f"query_{readout_names[ro.name]}" for ro in plan.readouts]
        checked += [x for n in range(r) for x in (names["k"][n], names["v"][n], names["beta"][n])]
        checked += [x for x in names["v_step"] if x not in checked]
        # Checked per step, before interleaving, so that an unsafe step is named by its own t.
        _guarded(w, f"_check_steps([{', '.join(checked)}], [{', '.join(logs)}])")

        def interleave(values: list[str]) -> str:
            return f"torch.stack([{', '.join(values)}], dim=2).flatten(1, 2)"

        for part in ("k", "v", "beta"):
            w(f"{part}_{name} = {interleave(names[part])}  # step t's updates at {positions}")
        fused_args = ""
        if v_step:
            if names["v_step"] == names["beta"]:
                fused_args += f", v_step=beta_{name}"  # the values are beta * v: the kernels scale them
            else:
                w(f"v_step_{name} = {interleave(names['v_step'])}  # the values' factors, applied in the kernels")
                fused_args += f", v_step=v_step_{name}"
        # the readout's constant factor to the output kernel (a skip term stays in torch: it would need interleaving)
        epilogue = self._epilogue_of(view, s, plan, printer) if self.options else None
        if epilogue and epilogue.get("skip"):
            epilogue = None
        if epilogue and epilogue["scale"]:
            fused_args += f", scale=_fused_scale(lambda: {epilogue['scale']})"
        decay = "None"
        if plan.decay_axis is not None:
            w(f"log_decay_{name} = {interleave(names['log_decay'])}")
            decay = f"log_decay_{name}"
        queries = self._spread_queries(w, plan, readout_names, r)
        axis = self.rt + ("KeyDeltaDecay" if plan.decay_axis == "key" else _DECAY_CLASSES[plan.decay_axis])
        outs = ", ".join(readout_names[ro.name] for ro in plan.readouts) + ("," if len(plan.readouts) == 1 else "")
        target = f"({outs}), final_{name}" if plan.readouts else f"_, final_{name}"
        state = f"states['{name}']" + (".transpose(-1, -2)" if name in view.transposed else "")
        options = ""
        if self.options:
            self._sub_step_bounds(w, name, r)
            options = f", **options_{name}"
        w(f"{target} = {self.rt}chunked_delta_by({axis}, [{', '.join(queries)}], k_{name}, v_{name}, beta_{name}, "
          f"{decay}, initial_state={self._initial(name, state)}, chunk_size=chunk_size, output_final_state=True"
          f"{fused_args}{options})")
        self._read_back(w, plan, readout_names, r, name in view.transposed, name)
        return epilogue["out"] if epilogue else None

    def _write_sub_steps(self, w: SourceWriter, printer: TorchPrinter, view, s, sa, readout_names: dict) -> None:
        """A diagonal decay whose injection is a sum of r outer products, S_t = D_t S_(t-1) + sum_m k_m v_m^T
        (`analysis._plan_sum_of_outer`): by linearity step t runs as steps r t, ..., r t + r - 1 of a sequence r
        times as long, the first applying D_t and k_1 v_1^T, each later one a decay of 1 (0 in log space) and
        k_m v_m^T, through the linear chunked runtime; step t's outputs are read after its last sub-step (a readout
        of S_(t-1) before its first), as `_write_rank_r` runs a rank-r delta rule. A call whose chunk spans the
        sequence (the parallel form, the chunked function with chunk_size = T) spans the r T sub-steps too."""
        name = s.name
        plan = sa.chunk
        r = len(plan.sub_steps)
        kdim, vdim = sa.dims
        positions = ", ".join(f"{r}t + {n}" if n else f"{r}t" for n in range(r))
        w(f"# its injection is a sum of {r} outer products: step t runs as linear steps {positions} of a sequence "
          f"{r} times as long, the decay at {r}t only")
        names: dict[str, list[str]] = {"k": [], "v": []}
        for n, sub in enumerate(plan.sub_steps, start=1):
            tag = f"{name}_{n}"
            w(f"k_{tag} = {self._full(printer, sub.k.expr, sub.k.indices, (kdim,))}  # outer product {n} "
              f"({self.cite[name]})")
            w(f"v_{tag} = {self._full(printer, sub.v.expr, sub.v.indices, (vdim,))}")
            names["k"].append(f"k_{tag}")
            names["v"].append(f"v_{tag}")
        logs = []
        if plan.log_decay is not None:
            if not plan.decay_exact:
                _guarded(w, f"_require_positive({printer.print_expr(sa.diagonal, sa.indices)}, "
                         f"'the decay {tidy(sa.diagonal)} of {name}', ('chunked', 'parallel'))")
            shape = {"scalar": (), "key": (kdim,), "value": (vdim,)}[plan.decay_axis]
            w(f"log_decay_{name}_1 = {self._full(printer, plan.log_decay.expr, plan.log_decay.indices, shape)}")
            logs.append(f"log_decay_{name}_1")
        for m, ro in enumerate(plan.readouts):
            readout_names[ro.name] = f"read_{name}" + (f"_{m + 1}" if m else "")
            w(f"query_{readout_names[ro.name]} = {self._full(printer, ro.query.expr, ro.query.indices, (kdim,))}  "
              f"# {self._readers(view, ro.name)}")
        checked = [f"query_{readout_names[ro.name]}" for ro in plan.readouts] + names["k"] + names["v"]
        # Checked per step, before interleaving, so that an unsafe step is named by its own t.
        _guarded(w, f"_check_steps([{', '.join(checked)}], [{', '.join(logs)}])")
        for part in ("k", "v"):
            w(f"{part}_{name} = torch.stack([{', '.join(names[part])}], dim=2).flatten(1, 2)  "
              f"# step t's outer products at {positions}")
        decay = "None"
        if logs:
            w(f"log_decay_{name} = _spread_steps({logs[0]}, {r}, 0)  # the decay at sub-step 0, 1 (log 0) after")
            decay = f"log_decay_{name}"
        queries = self._spread_queries(w, plan, readout_names, r)
        axis = self.rt + _DECAY_CLASSES[plan.decay_axis]
        outs = ", ".join(readout_names[ro.name] for ro in plan.readouts) + ("," if len(plan.readouts) == 1 else "")
        target = f"({outs}), final_{name}" if plan.readouts else f"_, final_{name}"
        state = f"states['{name}']" + (".transpose(-1, -2)" if name in view.transposed else "")
        if self.options:
            # (the parallel form's runtime takes its own bounds, `triton_parallel.in_parallel`: told the r)
            self._sub_step_bounds(w, name, r)
            w(f"if options_{name}.get('parallel') is not None:")
            w(f"    parallel_{name} = options_{name}['parallel']")
            w(f"    options_{name}['parallel'] = lambda *a, **kw: parallel_{name}(*a, sub_steps={r}, **kw)")
            size, options = "chunk_size", f", **options_{name}"
        else:
            size, options = f"chunk_size * {r} if chunk_size >= T_ else chunk_size", ""  # (one chunk stays one)
        w(f"{target} = {self.rt}chunked_linear_by({axis}, [{', '.join(queries)}], k_{name}, v_{name}, {decay}, "
          f"initial_state={self._initial(name, state)}, chunk_size={size}, output_final_state=True{options})")
        self._read_back(w, plan, readout_names, r, name in view.transposed, name)

    @staticmethod
    def _spread_queries(w: SourceWriter, plan, readout_names: dict, r: int) -> list[str]:
        """Each readout's query spread over r sub-steps a step (`_write_rank_r`, `_write_sub_steps`): a readout of
        S_t reads after the step's last sub-step, one of S_(t-1) before its first; the runtime's query arguments."""
        queries = []
        for ro in plan.readouts:
            query = f"query_{readout_names[ro.name]}"
            at = 0 if ro.exclusive else r - 1
            w(f"{query} = _spread_steps({query}, {r}, {at})  # read at sub-step {at} of each step, zeros between")
            queries.append(f"({query}, {ro.exclusive})")
        return queries

    @staticmethod
    def _sub_step_bounds(w: SourceWriter, name: str, r: int) -> None:
        """Packed sequences: a sequence's step t is sub-steps r t .. r t + r - 1, so its bounds scale by r."""
        w(f"options_{name} = dict(options)")
        w(f"if options_{name}.get('cu_seqlens') is not None:")
        w(f"    options_{name}['cu_seqlens'] = options_{name}['cu_seqlens'] * {r}  # bounds in sub-steps")

    @staticmethod
    def _read_back(w: SourceWriter, plan, readout_names: dict, r: int, transposed: bool, name: str) -> None:
        """Each readout back to one value per step (the sub-step `_spread_queries` read it at), and the final
        state back to the spec's layout."""
        for ro in plan.readouts:
            at = 0 if ro.exclusive else r - 1
            w(f"{readout_names[ro.name]} = {readout_names[ro.name]}[:, {at}::{r}]  # back to one value per step")
        if transposed:
            w(f"final_{name} = final_{name}.transpose(-1, -2)")

    def write_all(self) -> str:
        parts = [self.write_recurrent(), self.write_scan(), self.write_chunked()]
        return "\n\n".join(p for p in parts if p)


def _guarded(w: SourceWriter, line: str) -> None:
    """A chunked form's value check (`_check_steps`, `_require_positive`: each a host sync) printed under its
    `check_steps` keyword, so that a call with check_steps=False makes neither the check nor the sync."""
    w("if check_steps:")
    w(line, 2)


def _zero_states(e: sympy.Expr, states: set[str]) -> sympy.Expr:
    """`e` with every read of the `states` (an indexed state, or a scalar one) set to zero: its value at a step from
    a zero state (sympy drops the products with it)."""
    e = e.xreplace({a: sympy.Integer(0) for a in e.atoms(sympy.Indexed) if str(a.base) in states})
    e = e.xreplace({x: sympy.Integer(0) for x in e.free_symbols if isinstance(x, sympy.Symbol) and x.name in states})
    # a sum over a zero state (sympy keeps Sum(0, ...)) is zero, and so are the products with it
    return e.replace(lambda x: isinstance(x, sympy.Sum) and x.function.is_zero, lambda x: sympy.Integer(0))


PRELUDE = '''
def _fused_scale(scale):
    """The readout's constant factor the kernels apply (`scale=`), from `scale()`, a size expression such as
    K ** -0.5: the number the unfused epilogue multiplies by, with a zero size's negative power (K = 0, a call with
    no keys) as inf, as the unfused `x / K ** 0.5` divides by 0.0."""
    try:
        return float(scale())
    except ZeroDivisionError:
        return math.inf


def _zero_start(form):
    """The recurrent form `form` (`with_adjoint` of a printed loop) taking None for the states of a call without an
    initial state (codegen/dispatch.py `takes_no_initial_state`): they are left out of its states dict, so its loop
    takes its first step from zero without a zero state (`states.get`), and autograd neither saves nor
    differentiates one. Returns the marked form."""
    def run(*args, **extra):
        args = [{k: v for k, v in a.items() if v is not None} if isinstance(a, dict) else a for a in args]
        return form(*args, **extra)

    return takes_no_initial_state(run)


def _copy_start(into, state):
    """A segment's first state into its buffer slot `into`: the checkpoint `state`, or zero (None: a zero start)."""
    return into.zero_() if state is None else into.copy_(state)


def _start(state, like):
    """A segment's first state: the checkpoint `state`, or (None: a zero start) zeros like `like` (the backward's
    own, made only where the recomputation reads the state in place of a buffer slot)."""
    return torch.zeros_like(like) if state is None else state


def _spread_steps(x, r, at):
    """x [B, T, H, ...] as steps at, at + r, at + 2 r, ... of a sequence r times as long, zeros between (a rank-r
    update's readout, read at one of its r sub-steps): one allocation, where a stack with zeros_like makes two."""
    out = x.new_zeros((x.shape[0], x.shape[1], r) + tuple(x.shape[2:]))
    out[:, :, at] = x
    return out.flatten(1, 2)


def _stack_steps(steps, B_, H_, dims, like):
    """Per-step outputs [B, H, ...] -> [B, T, H, ...] (an empty sequence gives T = 0)."""
    if not steps:
        return like.new_zeros((B_, 0, H_) + tuple(dims))
    return torch.stack(steps, dim=1)


def _step_extremes(x, keep):
    """(lo, hi): the least and the greatest value of x [B, T, ...] over axis 0 and the axes from `keep` on (keep 2:
    [T] each; keep 3: [T, H]), NaN where a NaN is (torch.aminmax propagates it, as amin / amax do). One read of x:
    torch.aminmax over one axis of x viewed as [B, T, (H,) R], the larger of B and R first (so that no tensor near
    x's size is allocated), then the smaller on what is left. A tensor whose axes from `keep` on cannot be viewed as
    one (an expanded one) takes amin and amax over them instead (two reads, no copy)."""
    try:
        rows = x.view(*x.shape[:keep], -1)
    except RuntimeError:
        dims = [0] + list(range(keep, x.dim()))
        return x.amin(dim=dims), x.amax(dim=dims)
    if rows.shape[-1] >= rows.shape[0]:
        lo, hi = torch.aminmax(rows, dim=-1)
        return lo.amin(dim=0), hi.amax(dim=0)
    lo, hi = torch.aminmax(rows, dim=0)
    return lo.amin(dim=-1), hi.amax(dim=-1)


def _check_steps(values, log_decays, first=None):
    """Raise UnsafeSteps(t) at the first step t whose values (q, k, v, beta, ... [B, T, H, ...]) hold a non-finite
    number or whose log decays hold NaN or a value > 0 (-inf, a reset, is fine). A masked matmul would multiply
    such a value by the zeros above the diagonal and spread it to earlier steps, and the kernels form decays for
    log decays <= 0 only; the dispatcher runs the steps from t on one at a time instead, as the reference does.
    first: None, or (unsafe [1] int32, T): the first such step of values a prologue kernel checked as it wrote them
    (T: none), taken in the same sync. Each value is read once (`_step_extremes`), each log decay once (its amax);
    no flag tensor of a value's size is allocated. A form called with check_steps=False skips this call (and its
    sync): the layer option of that name."""
    T_ = values[0].shape[1] if values else first[1]
    if T_ == 0:
        return
    bad = torch.zeros(T_, dtype=torch.bool, device=first[0].device if first is not None else values[0].device)
    if first is not None:
        bad = bad | (torch.arange(T_, device=bad.device) >= first[0])
    for x, log in [(x, False) for x in values] + [(g, True) for g in log_decays]:
        if isinstance(x, tuple):  # (g, head): the log decays are g * head[h], a factor the kernels apply (fused)
            g, head = x
            if g.numel() == 0:  # a zero-size axis: no values at any step
                continue
            head = head.reshape(-1)
            # max over the batch of g * head per (step, head), exact: rounding is monotone, so the largest product
            # is head times the largest g (the smallest for a negative head); a NaN head or g stays NaN
            lo, hi = _step_extremes(g, 3)  # [T, H] each
            hi = torch.where(head >= 0, head * hi, head * lo)
            bad = bad | ~(hi.amax(dim=-1) <= 0)
            continue
        if x.numel() == 0:
            continue
        if log:  # (only the largest matters: NaN or > 0)
            bad = bad | ~(x.amax(dim=[d for d in range(x.dim()) if d != 1]) <= 0)
        else:
            lo, hi = _step_extremes(x, 2)
            bad = bad | ~((lo > -torch.inf) & (hi < torch.inf))  # (false for NaN too)
    first = int(torch.where(bad, torch.arange(T_, device=bad.device), T_).min())  # the call's one sync
    if first < T_:
        raise UnsafeSteps(first)


def _require_positive(decay, what, forms):
    if not bool((torch.as_tensor(decay) > 0).all()):  # (a float for a decay of sizes only, say 1 - 1 / K)
        named = " and ".join(f"'{f}'" for f in forms)
        raise DecayNotPositive(f"form{'s' * (len(forms) > 1)} {named} take{'s' * (len(forms) == 1)} the logarithm "
                               f"of {what}, which is not positive everywhere; use form='recurrent' or 'scan'")
'''


__all__ = ["PRELUDE", "TorchFormWriter"]
