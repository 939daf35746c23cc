"""Generate the Triton RECURRENT form of one analysed recurrence: every class, linear or not.

`triton_recurrent_source(analysis)` returns a standalone Python module: one `@triton.jit` kernel
`NAME__triton_recurrent_kernel` and its launcher

    NAME__triton_recurrent(*inputs, *params, states, *sizes, block_<SIZE>=None, num_warps=None, num_stages=1)
        -> (outputs: dict, final_states: dict)

with the call convention of the torch `NAME__recurrent` (`codegen/torch_forms.py`): inputs
[B, T, H, ...], params [H, ...], `states` a dict of initial states [B, H, ...] (a missing one is
zero), sizes as ints. Outputs come back [B, T, H, ...] in the first input's dtype, final states
[B, H, ...] in float32. `build_triton_recurrent(analysis)` imports the module and returns the launcher.

Kernel design (the torch per-step loop, moved into one program):

- grid (B * H, tiles): one program per (batch, head) and tile of the one axis that no step couples
  (`_tile_axis`: no `sum` runs over it and every tile with that axis is indexed by a plain index of
  it, once; the value axis V of `S[K, V]` read as `sum(i, q[i] * S[i, j])`, also under the delta
  rule, whose `sum(i, k[i] * S[i, j])` couples only K). That axis is cut into tiles of
  `BLOCK_<SIZE>` = min(pow2(n), TILE = 32) lanes (`block_<SIZE>=` may be any power of two >= 16),
  so B = 1, H = 16, K = V = 128 runs 64 programs of [128, 32] state tiles; with no such axis (a
  state read across every axis, like minimal_rnn's h through its [D, D] params) the grid is
  (B * H, 1). The loop over t runs inside the program;
- every state lives in registers as a float32 tile, one axis per state dimension, each axis
  padded to a power of two >= 16 (`BLOCK_<SIZE>`, a `tl.constexpr` chosen by the launcher, or
  given as `block_<SIZE>=`, which must cover the axis unless it is the tiled one); padding lanes
  are masked on every load and store and kept exactly zero (see `triton_printer.py` for the rule
  that guarantees it through sums and state updates);
- num_warps defaults to the fewest of 4, 8, 16 that keep a program's loop-resident tiles (each
  state twice, S and S_new, each param and loop-invariant temporary once) to ELEMENTS_PER_THREAD
  float32 values a thread;
- each step loads its inputs in their own dtype and upcasts them to float32 in registers (the dispatcher
  hands a float16 / bfloat16 call's inputs over as they are, `takes_input_dtype`: no float32 copy),
  computes every new state `b_S_new` from the composed updates of the step IR (which read the previous
  states, and, where a state is assigned after another one, that one's new value: states are updated in
  the order of their last assignment, as the torch form does), then the outputs (which may read both S
  and S__new), stores the outputs in the output tensor's dtype, and only then swaps `b_S = b_S_new`;
- common subexpressions are computed once per step as named temporary tiles: every `sum`, every
  repeated subexpression (alpha-equivalent sums included: `sum(e, Uh[d, e] h[e])` written twice is
  one temporary), a diagonal `W[d, d]`, and the non-trivial argument of a function printed with its
  argument repeated (elu, silu, ...); each is written just before its first use; one that reads only
  params is computed once, before the loop, the Triton analogue of the torch form's hoisting;
  size-only constants (`K ** -0.5`) are computed by the launcher and passed as float arguments;
- not supported: a recurrence with no input (no time axis); a state tile is held in registers,
  so a state with no axis to split (or a very large tile of one) will spill.
- pointers: inputs and outputs are made contiguous; the (batch, head) base offset is int64, and
  per-step pointers advance by H * (elements per step) each step (no `.to()` on the loop variable);
- packed sequences (`cu_seqlens=`, int64 [N + 1] boundaries of N sequences in one row [1, T, H, ...]):
  the same kernels with VARLEN set, a program per (sequence, head, tile) whose loop runs its own steps
  cu[n] .. cu[n + 1] (read in the kernel, as fla's IS_VARLEN kernels do), initial and final states
  [N, H, ...]; the checkpoints of sequence n (cdiv(length_n, every) of them) are rows first[n] .. of one
  [1, H, NC, ...] tensor, `first` a table the launcher builds once per call (`_sequences`), so one launch
  of the loop and one of the adjoint serve any N.
- a reverse run (`reverse=True`, REVERSE): the same kernels, step i_t reading and writing the sequence's step
  L_ - 1 - i_t (the forward's pointers start at the last step and move back; the adjoint's addresses,
  `_STEP`), packed or not, so the dispatcher flips no copies of the inputs and outputs for this form
  (codegen/dispatch.py `walks_back`); checkpoints and segments are those of the steps in the order taken.
- the adjoint's chunk-parallel mode (`segments=True`; printed where the writer is asked for it and
  `TritonAdjointWriter._segmentable` holds: one state [A, F] whose gradient's map across a segment is linear and
  the same for every lane of the tiled axis F): for segment c, dS_start = P_c dS_end + r_c with P_c [A, A]. The
  kernel's SEGMENTS variant runs one program per (batch, head, F tile, segment) from a given dS_end; launched on
  zero dS_end it gives r_c, launched on the identity (F standing for A lanes, every value over F zero) it gives
  P_c; `NAME__triton_segment_scan_kernel` then walks the segments from the last (NC small matmuls per program, no
  step) for every segment's dS_end, and a last SEGMENTS launch per F tile computes every gradient, all segments
  at once, each tile's launch adding its part to the gradients without F (ACCUMULATE: no [tiles, B, T, H, ...]
  parts). The r_c and P_c launches read no state (RECOMPUTE off: the map reads none; P_c's identity is made in
  the kernel, EYE); the gradient launches recompute a segment in two levels, its sub-segments' first states
  (SUB_ ~ sqrt(every) steps apart) then one sub-segment's states, so a program's scratch is NSUB_ + SUB_ states
  rather than `every`, and the programs' scratch is capped (SEGMENT_SCRATCH_BYTES: fewer segment lanes past it).
  The chunked form of the diagonal-plus-rank-one class (RWKV-7) trains on it (codegen/module.py), its
  checkpoints the chunk starts (read in place when they are slices of one tensor, `_stacked`).
"""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

import sympy
from sympy.core.relational import Relational
from sympy.functions.elementary.piecewise import ExprCondPair

from recurrence_dsl.adjoint import AdjointStep, NoAdjoint, derive_adjoint, grad_name
from recurrence_dsl.analysis import Analysis, TransitionClass
from recurrence_dsl.dataflow import cite
from recurrence_dsl.step_ir import NEW_SUFFIX, has_infinity

from .cache import load_source
from .kernel_rules import check_kernel_source
from .printing import SourceWriter, constant_source, py_name
from .triton_block_scan import triton_scan_refusal
from .triton_printer import (
    MULTI_USE,
    TritonPrinter,
    block_for,
    block_name,
    helpers_source,
    mask_name,
    offs_name,
    size_key,
)

# Names the generated module uses itself; a user name equal to one of them, or starting with one of the
# generated prefixes, gets a trailing underscore inside the kernel.
_RESERVED = {"tl", "triton", "torch", "math", "range", "float", "int", "min", "max", "states", "i_b", "i_h",
             "i_bh", "i_t", "i_tile", "T_", "H_", "B_", "R_", "num_warps", "num_stages", "kernel", "out_dtype", "dev",
             "cu_", "ck_first_", "bos_", "L_", "NS_", "TT_", "VARLEN", "cu_seqlens", "LMAX_", "ck_row_",
             "footprint_", "elements_", "REVERSE", "first_", "step_", "reverse"}
_PREFIXES = ("b_", "p_", "m_", "c_", "offs_", "mask_", "BLOCK_", "h0_", "ht_", "block_", "_")
TILE = 32  # default lanes per program of the axis split over programs
ELEMENTS_PER_THREAD = 96  # the launcher's num_warps default keeps a program's loop-resident tiles to this a thread
# The adjoint's step holds more temporaries than its footprint counts (the state's gradient terms): below sm_90, past
# this many footprint elements a thread at 4 warps it runs 8 (rwkv6 / rwkv7 at K = V = 64 spilled 8 B on sm_80 at 4
# warps; on sm_90 4 warps run clean there and 8 left lightning_attention's adjoint an 8-byte stack slot).
ADJOINT_ELEMENTS_AT_4_WARPS = 48
# The segmented adjoint's scratch (each program's sub-segment starts and one sub-segment's states) is capped here:
# past it, fewer programs than segments, each taking several in turn (issue 9's memory bound: the states are never
# all held at once). 64 MiB: RWKV-7 at B=2, H=4, K=V=128 keeps 8 of 16 lanes (256 programs, about two per SM of an
# H100); at 1 GiB every segment had its own and a training step allocated 1.3 GB.
SEGMENT_SCRATCH_BYTES = 64 << 20
# A [D0, D1] param's gradient that is a sum of at most this many outer products per step is not summed in registers:
# the adjoint kernel stores the per-step factors and the launcher contracts them over (batch, time) in one matmul.
OUTER_FACTORS_MAX = 4
# The adjoint kernel's place of step i_t in its sequence: i_t, or from the end under REVERSE (a reverse run walks each
# sequence backwards in the kernels rather than on flipped copies of the inputs and outputs)
_STEP = "(L_ - 1 - i_t if REVERSE else i_t)"
_TEMP_PREFIX = "_tmp"  # IR names of temporaries (user names cannot clash: they are renamed in the kernel anyway)
_CONST_PREFIX = "_const"


def _user(name: str) -> str:
    return py_name(name, _RESERVED, _PREFIXES)


def _const_name(src: str, number: str, taken: set[str]) -> str:
    """A launcher constant named after its source: `K**(-0.5)` is `c_K_pow_m0_5` (`c_<n>` when too long)."""
    words = src.replace("**", " pow ").replace("*", " mul ").replace("/", " div ").replace("+", " plus ")
    words = re.sub(r"-", " m", words).replace(".", "_")
    name = "c_" + "_".join(re.sub(r"[^0-9A-Za-z_]+", " ", words).split())
    if len(name) > 32 or not name.isidentifier() or name in taken:
        name = f"c_{number}"
    return name


def _leaf(e: sympy.Expr) -> bool:
    return isinstance(e, (sympy.Indexed, sympy.Symbol, sympy.Number, sympy.NumberSymbol,
                          sympy.logic.boolalg.BooleanAtom))


def _leaf_names(e: sympy.Expr) -> set[str]:
    names = set()
    for n in sympy.preorder_traversal(e):
        if isinstance(n, sympy.Indexed):
            names.add(str(n.base))
        elif isinstance(n, sympy.Symbol):
            names.add(n.name)
    return names


class TritonRecurrentWriter:
    """Writes the Triton kernel and launcher of one recurrence's recurrent form."""

    def __init__(self, analysis: Analysis):
        self.a = analysis
        self.rec = analysis.recurrence
        self.fn = self.rec.name
        self.sizes = list(self.rec.sizes)
        self.size_syms = {sympy.Symbol(s, integer=True, positive=True) for s in self.sizes}
        self.ranges: dict[sympy.Symbol, sympy.Expr] = dict(analysis.ir.ranges)
        self.inputs = list(self.rec.inputs)
        self.params = list(self.rec.params)
        self.states = list(self.rec.states)
        self.outputs = list(self.rec.outputs)
        if not self.inputs:
            raise NotImplementedError(f"{self.fn}: a recurrence without inputs has no time axis to run over")
        self.input_names = {s.name for s in self.inputs}
        self.param_names = {s.name for s in self.params}
        self.state_names = {s.name for s in self.states}
        self.new_names = {s.name + NEW_SUFFIX for s in self.states}
        # Launcher constants: name -> python source; temporaries: IR name -> (axes, expr, phase, source name).
        self.consts: dict[str, tuple[str, str, tuple[str, ...]]] = {}  # key -> (IR name, source, its sizes)
        self.temps: dict[str, tuple[tuple[sympy.Symbol, ...], sympy.Expr]] = {}
        self.temp_phase: dict[str, str] = {}
        self.temp_src: dict[str, str] = {}
        self.counter = itertools.count()
        self.cite = {n: cite(self.rec, n) for n in [s.name for s in self.states + self.outputs]}

    # -- size-only constants ----------------------------------------------------

    def _size_only(self, e: sympy.Expr) -> bool:
        """Sizes and numbers only, and finite: a launcher constant (an infinity stays in the kernel, where the
        padding analysis sees it)."""
        return (not isinstance(e, (sympy.Number, sympy.NumberSymbol)) and e.free_symbols <= self.size_syms
                and not any(isinstance(n, sympy.Indexed) for n in sympy.preorder_traversal(e))
                and not has_infinity(e))

    def _constant(self, e: sympy.Expr) -> sympy.Symbol:
        value = e.doit() if e.has(sympy.Sum) else e
        src = constant_source(value, _user)
        key = sympy.srepr(value)
        if key not in self.consts:
            free = {sym.name for sym in value.free_symbols}
            used = tuple(_user(s) for s in self.sizes if s in free)
            self.consts[key] = (f"{_CONST_PREFIX}{len(self.consts)}", src, used)
        return sympy.Symbol(self.consts[key][0])

    def _fold_constants(self, e: sympy.Expr) -> sympy.Expr:
        """Replace maximal subexpressions of sizes and numbers (`K ** -0.5`, the factors 1/D and 1/E of one
        product together) by launcher constants; number-only expressions (`exp(-1)`) by their value."""
        if isinstance(e, (sympy.Number, sympy.Indexed, sympy.Symbol, sympy.logic.boolalg.BooleanAtom)):
            return e  # (true: the last condition of a Piecewise)
        if not e.free_symbols:
            return sympy.Float(float(e.evalf()))
        if self._size_only(e) and not isinstance(e, sympy.Symbol):
            return self._constant(e)
        if isinstance(e, sympy.Sum):
            return sympy.Sum(self._fold_constants(e.function), *e.limits)
        if isinstance(e, (sympy.Mul, sympy.Add)):
            const = [a for a in e.args if self._size_only(a) and not isinstance(a, sympy.Symbol)]
            if len(const) > 1:
                rest = [self._fold_constants(a) for a in e.args if a not in const]
                return e.func(self._constant(e.func(*const)), *rest)
        return e.func(*[self._fold_constants(a) for a in e.args])

    # -- common subexpressions ---------------------------------------------------

    def _canon(self, e: sympy.Expr):
        """An alpha-normal form of `e`: bound indices renamed by depth, free indices by first occurrence.

        Returns (key, free indices in placeholder order, placeholders)."""
        free = []
        symbols = e.free_symbols  # once: it is recomputed on every access, and a deep `e` made this cubic
        for n in sympy.preorder_traversal(e):
            if isinstance(n, sympy.Symbol) and n in self.ranges and n in symbols and n not in free:
                free.append(n)
        holders = []
        for k, f in enumerate(free):
            h = sympy.Symbol(f"_f{k}_{size_key(self.ranges[f])}", integer=True)
            holders.append(h)
        renamed = self._rename_bound(e.xreplace(dict(zip(free, holders, strict=True))), 0)
        return sympy.srepr(renamed), free, holders

    def _rename_bound(self, e: sympy.Expr, depth: int) -> sympy.Expr:
        if _leaf(e):
            return e
        if isinstance(e, sympy.Sum):
            mapping = {}
            limits = []
            for k, (var, lo, hi) in enumerate(e.limits):
                new = sympy.Symbol(f"_b{depth}_{k}", integer=True)
                mapping[var] = new
                limits.append((new, lo, hi))
            return sympy.Sum(self._rename_bound(e.function.xreplace(mapping), depth + 1), *limits)
        return e.func(*[self._rename_bound(a, depth) for a in e.args])

    def _count(self, e: sympy.Expr, counts: dict) -> None:
        """Occurrences of every non-leaf subexpression; a repeated one is not descended into again."""
        if _leaf(e):
            return
        key = self._canon(e)[0]
        counts[key] = counts.get(key, 0) + 1
        if counts[key] > 1:
            return
        args = (e.function,) if isinstance(e, sympy.Sum) else e.args
        for a in args:
            self._count(a, counts)

    def _invariant(self, e: sympy.Expr) -> bool:
        """Reads no input and no state (params, constants, sizes and numbers only)."""
        for name in _leaf_names(e):
            if name in self.input_names or name in self.state_names or name in self.new_names:
                return False
            if name in self.temps and self.temp_phase[name] != "prologue":
                return False
        return True

    def _worth_a_temp(self, e: sympy.Expr, counts: dict, parent) -> bool:
        if _leaf(e) or isinstance(e, (ExprCondPair, Relational)):
            return False  # (a branch of a Piecewise, or its condition: printed in place)
        if isinstance(e, sympy.Sum):
            return True
        if isinstance(e, sympy.Mul) and len(e.args) == 2 and e.args[0].is_number and _leaf(e.args[1]):
            return False  # -x, 2 * x: cheaper to recompute
        if counts.get(self._canon(e)[0], 0) > 1:
            return True
        if parent is not None and type(parent) in MULTI_USE:
            return True  # the argument of a function whose printed form repeats it
        heavy = isinstance(e, (sympy.Pow, sympy.Function)) and not isinstance(e, (sympy.Min, sympy.Max))
        return heavy and self._invariant(e) and any(n in self.param_names for n in _leaf_names(e))

    def _bind(self, e: sympy.Expr, counts: dict, parent=None) -> sympy.Expr:
        """Post-order: rewrite `e`'s children, then replace `e` by a temporary if it is worth one."""
        if isinstance(e, sympy.Indexed) and len(set(e.indices)) < len(e.indices):
            return self._temp(e, e)  # a diagonal W[d, d]: extracted once (before the loop for a param)
        if _leaf(e):
            return e
        if isinstance(e, sympy.Sum):
            rebuilt = sympy.Sum(self._bind(e.function, counts, e), *e.limits)
        else:
            rebuilt = e.func(*[self._bind(a, counts, e) for a in e.args])
        if not self._worth_a_temp(e, counts, parent):
            return rebuilt
        return self._temp(e, rebuilt)

    def _temp(self, e: sympy.Expr, rebuilt: sympy.Expr) -> sympy.Expr:
        """The temporary holding `e` (children already rewritten: `rebuilt`), created on first use."""
        key, free, holders = self._canon(e)
        if key not in self.temp_key:
            name = f"{_TEMP_PREFIX}{next(self.counter)}"
            for h, f in zip(holders, free, strict=True):
                self.ranges[h] = self.ranges[f]
            definition = rebuilt.xreplace(dict(zip(free, holders, strict=True)))
            self.temp_key[key] = (name, len(free))
            self.temps[name] = (tuple(holders), definition)
            self.temp_phase[name] = self._phase(definition)
            self.temp_src[name] = self._temp_source_name(e, name)
        name, _ = self.temp_key[key]
        return sympy.IndexedBase(name)[tuple(free)] if free else sympy.Symbol(name)

    def _phase(self, e: sympy.Expr) -> str:
        """prologue (computed once, before the loop) or step (inside it, just before its first use)."""
        return "prologue" if self._invariant(e) else "step"

    def _temp_source_name(self, e: sympy.Expr, ir_name: str) -> str:
        n = ir_name[len(_TEMP_PREFIX):]
        if isinstance(e, sympy.Sum):
            return f"b_sum{n}"
        if isinstance(e, sympy.Function) and not isinstance(e, (sympy.Min, sympy.Max)):
            return f"b_{type(e).__name__.lower()}{n}"
        if isinstance(e, sympy.Indexed):
            return f"b_diag{n}"
        return f"b_t{n}"

    def _prepare(self) -> None:
        ir = self.a.ir
        self.temp_key: dict[str, tuple[str, int]] = {}
        updates = {n: (d.indices, self._fold_constants(d.expr)) for n, d in ir.updates.items()}
        outputs = {n: (d.indices, self._fold_constants(d.expr)) for n, d in ir.outputs.items()}
        counts: dict = {}
        for _, e in list(updates.values()) + list(outputs.values()):
            self._count(e, counts)
        self.updates = {n: (idx, self._bind(e, counts)) for n, (idx, e) in updates.items()}
        self.outputs_ir = {n: (idx, self._bind(e, counts)) for n, (idx, e) in outputs.items()}

    # -- naming -------------------------------------------------------------------

    def _names(self) -> dict[str, str]:
        names = {}
        for s in self.inputs + self.params + self.states:
            names[s.name] = f"b_{_user(s.name)}"
        for s in self.states:
            names[s.name + NEW_SUFFIX] = f"b_{_user(s.name)}_new"
        for ir_name, src in self.temp_src.items():
            names[ir_name] = src
        taken = set(names.values()) | {_user(s) for s in self.sizes}
        for ir_name, src, _ in self.consts.values():
            names[ir_name] = _const_name(src, ir_name[len(_CONST_PREFIX):], taken)
            taken.add(names[ir_name])
        for s in self.sizes:
            names[s] = _user(s)
        return names

    def _dims(self, sym) -> list[sympy.Expr]:
        return [sympy.Symbol(d, integer=True, positive=True) if isinstance(d, str) else sympy.Integer(d)
                for d in sym.dims]

    def _size_src(self, size: sympy.Expr) -> str:
        return _user(size.name) if isinstance(size, sympy.Symbol) else str(int(size))

    def _numel(self, sym) -> str:
        dims = self._dims(sym)
        if not dims:
            return "1"
        return " * ".join(self._size_src(d) for d in dims)

    def _factor(self, sym) -> str:
        """Elements per (batch, head) block, ready to multiply: `K` or `(K * V)`."""
        numel = self._numel(sym)
        return f"({numel})" if " " in numel else numel

    def _offsets(self, sym) -> str:
        """The element offsets of a [d1, d2, ...] tile inside one contiguous [d1, d2, ...] block."""
        dims = self._dims(sym)
        n = len(dims)
        parts = []
        for p, d in enumerate(dims):
            text = offs_name(d)
            if n > 1:
                text += "[" + ", ".join(":" if q == p else "None" for q in range(n)) + "]"
            rest = dims[p + 1:]
            if rest:
                stride = " * ".join(self._size_src(r) for r in rest)
                text += f" * {stride}" if len(rest) == 1 else f" * ({stride})"
            parts.append(text)
        return " + ".join(parts)

    def _mask(self, sym) -> str:
        dims = self._dims(sym)
        n = len(dims)
        if n == 1:
            return mask_name(dims[0])
        return " & ".join(mask_name(d) + "[" + ", ".join(":" if q == p else "None" for q in range(n)) + "]"
                          for p, d in enumerate(dims))

    def _shape(self, sym) -> str:
        return "[" + ", ".join(block_name(d) for d in self._dims(sym)) + "]"

    # -- the kernel ---------------------------------------------------------------

    def write(self) -> str:
        self._prepare()
        names = self._names()
        zero_padded = {s.name for s in self.inputs + self.params + self.states} | self.new_names
        printer = TritonPrinter(set(self.sizes), self.ranges, names, zero_padded, self.temps)
        all_sizes = []
        for sym in self.inputs + self.params + self.states + self.outputs:
            for d in self._dims(sym):
                if d not in all_sizes:
                    all_sizes.append(d)
        for h in self.ranges.values():
            if h not in all_sizes:
                all_sizes.append(h)
        self.block_sizes = all_sizes
        self.tile = self._tile_axis()
        used = set()
        for _, e in list(self.updates.values()) + list(self.outputs_ir.values()):
            used |= _leaf_names(e)
        for _, e in self.temps.values():
            used |= _leaf_names(e)
        self.used = used

        w = SourceWriter()
        kernel = f"{self.fn}__triton_recurrent_kernel"
        consts = [names[c] for c, _, _ in self.consts.values()]
        args = ([_user(s.name) for s in self.inputs] + [_user(s.name) for s in self.params]
                + [f"h0_{_user(s.name)}" for s in self.states] + [_user(s.name) for s in self.outputs]
                + [f"ht_{_user(s.name)}" for s in self.states] + [f"ck_{_user(s.name)}" for s in self.states]
                + ["cu_", "ck_first_"] + consts + ["T_", "H_", "every", "NC_"]
                + [_user(s) for s in self.sizes] + [f"{block_name(d)}: tl.constexpr" for d in all_sizes]
                + ["CHECKPOINT: tl.constexpr", "VARLEN: tl.constexpr", "REVERSE: tl.constexpr"])
        w("@triton.jit", 0)
        w(f"def {kernel}(", 0)
        w(", ".join(args[: len(self.inputs) + len(self.params)]) + ",  # inputs [B, T, H, ...], params [H, ...]")
        rest = args[len(self.inputs) + len(self.params):]
        w(", ".join(rest) + ",  # states in, outputs, states out, checkpoints, cu_seqlens, constants, sizes, blocks")
        w("):", 0)
        if self.tile is None:
            w('"""One (batch, head) per program; the whole state in registers; t = 0 .. L_ - 1 in a loop.')
        else:
            size = self._size_src(self.tile)
            w(f'"""One (batch, head, {block_name(self.tile)} lanes of {size}) per program (no step couples lanes of '
              f'{size}); its tile of the state in registers; t = 0 .. L_ - 1 in a loop.')
        w("VARLEN: the batch index is a sequence of the one packed row [1, T_, H_, ...], steps cu_[i_b] ..")
        w("cu_[i_b + 1]; its checkpoints start at row ck_first_[i_b] of the [1, H_, NC_, ...] checkpoints.")
        w("REVERSE: step i_t reads and writes the sequence's step L_ - 1 - i_t (a reverse run, no flipped copies);")
        w('the checkpoints and the final state are those of the steps in that order."""')
        w("i_bh = tl.program_id(0)")
        w("i_b = i_bh // H_")
        w("i_h = i_bh % H_")
        if self.tile is not None:
            w("i_tile = tl.program_id(1)")
        self._write_sequence(w)
        for d in all_sizes:
            if d == self.tile:
                w(f"{offs_name(d)} = i_tile * {block_name(d)} + tl.arange(0, {block_name(d)})")
            else:
                w(f"{offs_name(d)} = tl.arange(0, {block_name(d)})")
            w(f"{mask_name(d)} = {offs_name(d)} < {self._size_src(d)}")

        # params: loaded once
        for p in self.params:
            if p.name not in used:
                continue
            u = _user(p.name)
            if p.dims:
                w(f"b_{u} = tl.load({u} + i_h * {self._factor(p)} + {self._offsets(p)}, mask={self._mask(p)}, "
                  f"other=0.0).to(tl.float32)  # {self._shape(p)}")
            else:
                w(f"b_{u} = tl.load({u} + i_h).to(tl.float32)")
        # states: initial values
        for s in self.states:
            u = _user(s.name)
            if s.dims:
                if len(s.dims) > 1:
                    w(f"m_{u} = {self._mask(s)}")
                mask = f"m_{u}" if len(s.dims) > 1 else self._mask(s)
                w(f"b_{u} = tl.load(h0_{u} + i_bh.to(tl.int64) * {self._factor(s)} + {self._offsets(s)}, "
                  f"mask={mask}, other=0.0).to(tl.float32)  # {self._shape(s)}")
            else:
                w(f"b_{u} = tl.load(h0_{u} + i_bh).to(tl.float32)")
        # the checkpoints [B, H, NC_, ...]: the states before steps 0, every, 2 * every, ... (CHECKPOINT only)
        for s in self.states:
            u = _user(s.name)
            w(f"p_ck_{u} = ck_{u} + ck_row_ * {self._factor(s)}" + (f" + {self._offsets(s)}" if s.dims else ""))
        # loop-invariant temporaries
        self._write_prologue_temps(w, printer)
        # per-step pointers at the first step taken: the sequence's first, or its last under REVERSE, each step
        # moving them by step_ rows of H_ heads (back under REVERSE)
        w("if REVERSE:")
        w("first_ = bos_ + L_ - 1", 2)
        w("step_ = -H_", 2)
        w("else:")
        w("first_ = bos_", 2)
        w("step_ = H_", 2)
        seq_base = "(first_ * H_ + i_h)"
        stepped = []
        for s in self.inputs:
            if s.name not in used:
                continue
            u = _user(s.name)
            if s.dims:
                w(f"p_{u} = {u} + {seq_base} * {self._factor(s)} + {self._offsets(s)}")
            else:
                w(f"p_{u} = {u} + {seq_base}")
            stepped.append(s)
        for o in self.outputs:
            u = _user(o.name)
            if o.dims:
                w(f"p_{u} = {u} + {seq_base} * {self._factor(o)} + {self._offsets(o)}")
                if len(o.dims) > 1:
                    w(f"m_{u} = {self._mask(o)}")
            else:
                w(f"p_{u} = {u} + {seq_base}")
            stepped.append(o)

        w("for i_t in range(0, L_):")
        w("if CHECKPOINT:", 2)
        w("if i_t % every == 0:  # the state before step i_t, from which the backward recomputes the segment", 3)
        for s in self.states:
            u = _user(s.name)
            at = f"p_ck_{u} + (i_t // every) * {self._factor(s)}"
            if s.dims:
                mask = f"m_{u}" if len(s.dims) > 1 else self._mask(s)
                w(f"tl.store({at}, b_{u}, mask={mask})", 4)
            else:
                w(f"tl.store({at}, b_{u})", 4)
        for s in self.inputs:
            if s.name not in used:
                continue
            u = _user(s.name)
            if s.dims:
                w(f"b_{u} = tl.load(p_{u}, mask={self._mask(s)}, other=0.0).to(tl.float32)  # {self._shape(s)}", 2)
            else:
                w(f"b_{u} = tl.load(p_{u}).to(tl.float32)", 2)
        emitted: set[str] = set()
        for s in self._update_order():
            idx, e = self.updates[s.name]
            u = _user(s.name)
            self._write_temps_for(w, printer, e, emitted)
            text = self._full(printer, e, idx)
            if idx and printer.needs_mask(e, idx):
                mask = f"m_{u}" if len(idx) > 1 else printer.mask(idx)
                text = f"tl.where({mask}, {text}, 0.0)"
            w(f"b_{u}_new = {text}  # " + (f"{self._shape(s)} " if s.dims else "") + self.cite[s.name], 2)
        for o in self.outputs:
            idx, e = self.outputs_ir[o.name]
            u = _user(o.name)
            self._write_temps_for(w, printer, e, emitted)
            w(f"b_{u} = {self._full(printer, e, idx)}  # " + (f"{self._shape(o)} " if o.dims else "")
              + self.cite[o.name], 2)
            if o.dims:
                mask = f"m_{u}" if len(o.dims) > 1 else self._mask(o)
                w(f"tl.store(p_{u}, b_{u}.to(p_{u}.dtype.element_ty), mask={mask})", 2)
            else:
                w(f"tl.store(p_{u}, b_{u}.to(p_{u}.dtype.element_ty))", 2)
        for s in self.states:
            u = _user(s.name)
            w(f"b_{u} = b_{u}_new", 2)
        for s in stepped:
            u = _user(s.name)
            w(f"p_{u} += step_ * {self._numel(s)}" if s.dims else f"p_{u} += step_", 2)
        for s in self.states:
            u = _user(s.name)
            if s.dims:
                mask = f"m_{u}" if len(s.dims) > 1 else self._mask(s)
                w(f"tl.store(ht_{u} + i_bh.to(tl.int64) * {self._factor(s)} + {self._offsets(s)}, b_{u}, "
                  f"mask={mask})")
            else:
                w(f"tl.store(ht_{u} + i_bh, b_{u})")
        return w.text()

    def _write_sequence(self, w: SourceWriter, adjoint: bool = False) -> None:
        """The program's sequence: its first step `bos_` in the rows of [R, T_, H_, ...] steps, its length `L_` and
        its first checkpoint row `ck_row_` ([R, H_, NC_, ...] checkpoints); in the adjoint also its segments `NS_`.
        Packed (VARLEN, one row R = 1 holding the sequences cu_[0] .. cu_[N]), the sequence's checkpoints are
        contiguous from ck_first_[i_b], a table the launcher builds once per call, since their count differs
        between sequences (as fla's IS_VARLEN kernels read bos / eos from cu_seqlens). Unpacked, the length and
        the segments stay the kernel's arguments (no register holds them through the loops)."""
        w("if VARLEN:")
        w("bos_ = tl.load(cu_ + i_b).to(tl.int64)", 2)
        w("L_ = tl.load(cu_ + i_b + 1).to(tl.int64) - bos_", 2)
        w("ck_row_ = i_h * NC_ + tl.load(ck_first_ + i_b).to(tl.int64)", 2)
        if adjoint:
            w("NS_ = (L_ + every - 1) // every  # the sequence's segments (and checkpoints)", 2)
        w("else:")
        w("bos_ = i_b.to(tl.int64) * T_", 2)
        w("L_ = T_", 2)
        w("ck_row_ = i_bh.to(tl.int64) * NC_", 2)
        if adjoint:
            w("NS_ = NC_", 2)

    def _tile_axis(self) -> sympy.Symbol | None:
        """The size whose lanes no step couples, so that its axis can be split over programs: no `sum` runs over
        it, and wherever a tile has an axis of that size it is indexed by a plain index of that size, once (so
        lane j of every value depends only on lanes j). For `S[K, V]` read as `sum(i, q[i] * S[i, j])` it is V
        (the delta rule's `sum(i, k[i] * S[i, j])` couples only K); a state read across V keeps V whole. Of the
        sizes that qualify, the one spanning the most state elements (the last of equals); None when no
        state has a size that qualifies (the whole state is then one program's)."""
        key = size_key
        dims = {}
        for sym in self.inputs + self.params + self.states + self.outputs:
            dims[sym.name] = [key(d) for d in self._dims(sym)]
        for sym in self.states:
            dims[sym.name + NEW_SUFFIX] = dims[sym.name]
        for name, (axes, _) in self.temps.items():
            dims[name] = [key(self.ranges[a]) for a in axes]
        coupled = {d for ds in dims.values() for d in ds if ds.count(d) > 1}
        exprs = ([e for _, e in self.updates.values()] + [e for _, e in self.outputs_ir.values()]
                 + [e for _, e in self.temps.values()])
        for e in exprs:
            for n in sympy.preorder_traversal(e):
                if isinstance(n, sympy.Sum):
                    coupled.update(key(self.ranges[lim[0]]) for lim in n.limits)
                elif isinstance(n, sympy.Indexed):
                    for idx, d in zip(n.indices, dims.get(str(n.base), ()), strict=False):
                        if not (isinstance(idx, sympy.Symbol) and idx in self.ranges and key(self.ranges[idx]) == d):
                            coupled.add(d)
        weight: dict[str, int] = {}
        for sym in self.states:
            for d in self._dims(sym):
                if isinstance(d, sympy.Symbol) and key(d) not in coupled:
                    weight[key(d)] = weight.get(key(d), 0) + len(sym.dims)
        if not weight:
            return None
        best = max(weight.values())
        name = [d for d in weight if weight[d] == best][-1]
        return next(d for d in self.block_sizes if isinstance(d, sympy.Symbol) and key(d) == name)

    def _full(self, printer: TritonPrinter, e: sympy.Expr, idx) -> str:
        """`e` as a float32 tile of exactly the shape of `idx` (a state must keep its type across the loop)."""
        text = printer.print_expr(e, idx)
        spanned = {s for s in e.free_symbols if s in self.ranges}
        if not any(isinstance(n, (sympy.Indexed, sympy.Symbol)) and str(n) not in self.sizes
                   for n in sympy.preorder_traversal(e)):
            return f"tl.full({printer.shape(idx)}, {text}, tl.float32)"
        if not set(idx) <= spanned:
            return f"tl.broadcast_to({text}, {printer.shape(idx)})"
        return text

    def _update_order(self) -> list:
        """States in the order of their last assignment: an update may read another state's new value."""
        last = {st.target.name: st.index for st in self.rec.statements}
        return sorted(self.states, key=lambda s: last.get(s.name, -1))

    def _write_temp(self, w: SourceWriter, printer: TritonPrinter, name: str, indent: int) -> None:
        axes, e = self.temps[name]
        shape = printer.shape(axes) if axes else "scalar"
        w(f"{self.temp_src[name]} = {printer.print_expr(e, axes)}  # {shape}", indent)

    def _write_prologue_temps(self, w: SourceWriter, printer: TritonPrinter) -> None:
        for name in self.temps:
            if self.temp_phase[name] == "prologue":
                self._write_temp(w, printer, name, 1)

    def _write_temps_for(self, w: SourceWriter, printer: TritonPrinter, e: sympy.Expr, emitted: set,
                         indent: int = 2) -> None:
        """Emit (in the loop) the step temporaries `e` reads that are not computed yet, dependencies first:
        each lands just before its first use, so one reading a new state comes after that state's update."""
        order = list(self.temps)
        for name in sorted(_leaf_names(e) & set(self.temps), key=order.index):
            if name in emitted or self.temp_phase[name] == "prologue":
                continue
            self._write_temps_for(w, printer, self.temps[name][1], emitted, indent)
            self._write_temp(w, printer, name, indent)
            emitted.add(name)

    # -- the launcher -------------------------------------------------------------

    def _footprint(self) -> str:
        """Source of the float32 elements a program holds through its loop: each state tile twice (S and S_new),
        each param tile and each loop-invariant temporary once (the launcher's num_warps default reads it)."""
        def tile(dims) -> str:
            return " * ".join(block_name(d) for d in dims) if dims else "1"

        terms = [f"2 * {tile(self._dims(st))}" if self._dims(st) else "2" for st in self.states]
        terms += [tile(self._dims(p)) for p in self.params if p.name in self.used]
        terms += [tile([self.ranges[a] for a in self.temps[n][0]]) for n in self.temps
                  if self.temp_phase[n] == "prologue"]
        return " + ".join(terms) or "0"

    def write_launcher(self) -> str:
        w = SourceWriter()
        args = [_user(s.name) for s in self.inputs + self.params]
        sizes = [_user(s) for s in self.sizes]
        blocks = [f"block_{size_key(d)}=None" for d in self.block_sizes if isinstance(d, sympy.Symbol)]
        sig = ", ".join(args + ["states"] + sizes + ["*", "every=0", "cu_seqlens=None", "reverse=False"] + blocks
                        + ["num_warps=None", "num_stages=1"])
        w(f"def {self.fn}__triton_recurrent_loop({sig}):", 0)
        if self.tile is None:
            w('"""Per-step loop in one Triton program per (batch, head); returns (outputs, final states, checkpoints):')
        else:
            w(f'"""Per-step loop in one Triton program per (batch, head, tile of {block_name(self.tile)} lanes of '
              f'{self._size_src(self.tile)}); returns')
            w("(outputs, final states, checkpoints):")
        w("with every > 0, the float32 states before steps 0, every, 2 * every, ... (one dict of [B, H, ...] each),")
        w("from which the derived backward recomputes the others. cu_seqlens: None, or int64 [N + 1] boundaries of N")
        w("sequences packed in one row (inputs [1, T, H, ...], states [N, H, ...]), run in the same launch; their")
        w("checkpoints are then the dicts of [1, H, ...] in the order of the sequences (`_sequences`). reverse: each")
        w("sequence from its last step to its first, the kernel walking its steps backwards (no flipped copies);")
        w('the checkpoints are then every `every` steps of that order."""')
        first = _user(self.inputs[0].name)
        w(f"R_, T_, H_ = {first}.shape[:3]")
        w(f"dev = {first}.device")
        w("B_, cu_, ck_first_, NC_, _ = _sequences(cu_seqlens, R_, T_, every, dev)  # B_: rows or sequences")
        for a in args:
            w(f"{a} = {a}.contiguous()")
        w("states = states or {}")
        for s in self.states:
            dims = "".join(f", {self._size_src(d)}" for d in self._dims(s))
            w(f"h0_{_user(s.name)} = _initial_state(states, {s.name!r}, (B_, H_{dims}), dev)")
        for o in self.outputs:
            dims = "".join(f", {self._size_src(d)}" for d in self._dims(o))
            w(f"{_user(o.name)} = torch.empty((R_, T_, H_{dims}), dtype={first}.dtype, device=dev)")
        for s in self.states:
            w(f"ht_{_user(s.name)} = torch.empty_like(h0_{_user(s.name)})")
        for s in self.states:
            dims = "".join(f", {self._size_src(d)}" for d in self._dims(s))
            w(f"ck_{_user(s.name)} = torch.empty((R_, H_, NC_{dims}), dtype=torch.float32, device=dev)")
        kw = []
        for d in self.block_sizes:
            if d == self.tile:
                w(f"{block_name(d)} = _tile({self._size_src(d)}, block_{size_key(d)}, {block_name(d)!r})")
            elif isinstance(d, sympy.Symbol):
                w(f"{block_name(d)} = _block({self._size_src(d)}, block_{size_key(d)}, {block_name(d)!r})")
            else:
                w(f"{block_name(d)} = {block_for(int(d))}")
            kw.append(f"{block_name(d)}={block_name(d)}")
        # The footprint is printed once: a function of the tile where the tile can narrow, else a value.
        if self.tile is not None:
            t = block_name(self.tile)
            w(f"def footprint_({t}):  # float32 values a program holds through its loop")
            w(f"return {self._footprint()}", 2)
            w(f"{t} = _fit_tile(footprint_, {t}, block_{size_key(self.tile)})  # a narrower tile while a program "
              "would pass an SM's registers")
            w(f"elements_ = footprint_({t})")
        else:
            w(f"elements_ = {self._footprint()}  # float32 values a program holds through its loop")
        w(f"_check_fits(elements_, {self.fn + '__triton_recurrent_kernel'!r})")
        w("if num_warps is None:")
        w("num_warps = _warps(elements_)", 2)
        names = self._names()
        for ir_name, src, used in self.consts.values():
            # float64 arithmetic on the sizes, as the reference's: K ** -0.5 at K = 0 is inf (Python's raises).
            w(f"{names[ir_name]} = _size_constant(lambda {', '.join(used)}: {src}, {', '.join(used)})")
        call = ([_user(s.name) for s in self.inputs + self.params] + [f"h0_{_user(s.name)}" for s in self.states]
                + [_user(o.name) for o in self.outputs] + [f"ht_{_user(s.name)}" for s in self.states]
                + [f"ck_{_user(s.name)}" for s in self.states] + ["cu_", "ck_first_"]
                + [names[c] for c, _, _ in self.consts.values()] + ["T_", "H_", "max(every, 1)", "NC_"] + sizes + kw
                + ["CHECKPOINT=NC_ > 0", "VARLEN=cu_ is not None", "REVERSE=bool(reverse)", "num_warps=num_warps",
                   "num_stages=num_stages"])
        if self.tile is None:
            grid = "(B_ * H_,)"
        else:
            grid = f"(B_ * H_, triton.cdiv(max({self._size_src(self.tile)}, 1), {block_name(self.tile)}))"
        w("if B_ * H_ > 0:")
        w(f"{self.fn}__triton_recurrent_kernel[{grid}](", 2)
        w(", ".join(call) + ",", 3)
        w(")", 2)
        outs = ", ".join(f"{o.name!r}: {_user(o.name)}" for o in self.outputs)
        finals = ", ".join(f"{s.name!r}: ht_{_user(s.name)}" for s in self.states)
        checkpoints = ", ".join(f"{s.name!r}: ck_{_user(s.name)}[:, :, n]" for s in self.states)
        w(f"return {{{outs}}}, {{{finals}}}, [{{{checkpoints}}} for n in range(NC_)]")
        w("")
        w("")
        w(f"def {self.fn}__triton_recurrent({', '.join(args + ['states'] + sizes)}, **options):", 0)
        w(f'"""The forward alone: (outputs, final states) of {self.fn}__triton_recurrent_loop."""')
        w(f"outputs, finals, _ = {self.fn}__triton_recurrent_loop({', '.join(args + ['states'] + sizes)}, **options)")
        w("return outputs, finals")
        return w.text()


def split_sums(e: sympy.Expr, ranges: dict) -> sympy.Expr:
    """`e` with every sum over several indices nested one index at a time, innermost the index whose factors span
    the fewest axes, so that no tile has more axes than it must: dk of the delta rule,
    `sum(i', j, S[i, j] * dS[i', j] * k[i'])`, becomes `sum(j, S[i, j] * sum(i', dS[i', j] * k[i']))`, two [K, V]
    products rather than one [K, K, V] (which spills on a GPU). A body that is not a product stays whole."""
    if not e.has(sympy.Sum) or _leaf(e):
        return e
    if not isinstance(e, sympy.Sum):
        return e.func(*[split_sums(a, ranges) for a in e.args])
    body, limits = split_sums(e.function, ranges), list(e.limits)
    while len(limits) > 1:
        factors = sympy.Mul.make_args(body)

        def axes(var, factors=factors) -> set:
            return {s for f in factors if var in f.free_symbols for s in f.free_symbols if s in ranges}

        best = min(limits, key=lambda limit: len(axes(limit[0])))
        inside = [f for f in factors if best[0] in f.free_symbols]
        if len(inside) == len(factors):
            break  # every factor reads it: nothing to take out
        outside = [f for f in factors if best[0] not in f.free_symbols]
        body = sympy.Mul(*outside) * sympy.Sum(sympy.Mul(*inside), best)
        limits.remove(best)
    return sympy.Sum(body, *limits)


def outer_factors(e: sympy.Expr, row: sympy.Symbol, col: sympy.Symbol,
                  most: int = OUTER_FACTORS_MAX) -> list[tuple[sympy.Expr, sympy.Expr]] | None:
    """`e[row, col]` as a short sum of outer products `sum_j L_j[row] * R_j[col]`, as [(L_j, R_j)], or None.

    Each term of `e` (as written, not expanded) must be a product whose factors read `row` or `col` but not both;
    terms with the same `col` factor share one pair, so minimal_rnn's dUh, `a[d] h[e] - b[d] h[e]`, is the one pair
    (a - b, h). None when a factor reads both indices (a state `S[d, n]`, say) or more than `most` pairs remain."""
    pairs: dict[sympy.Expr, sympy.Expr] = {}
    for term in sympy.Add.make_args(e):
        left, right = [], []
        for f in sympy.Mul.make_args(term):
            reads = f.free_symbols & {row, col}
            if reads == {row, col}:
                return None
            (right if col in reads else left).append(f)
        key = sympy.Mul(*right)
        pairs[key] = pairs.get(key, sympy.Integer(0)) + sympy.Mul(*left)
    if len(pairs) > most:
        return None
    return [(left, right) for right, left in pairs.items()]


def merge_sums(e: sympy.Expr, tiles: set[str]) -> sympy.Expr:
    """`e` with the sums of one Add that read the same tile of a param in `tiles` (as `P[v, j]`, `v` the summed
    index) merged into one sum over `P` times the sum of the rest: minimal_rnn's dh, `sum(d, Uh[d, e] a[d]) -
    sum(d, Uh[d, e] b[d])` as the adjoint derives it, becomes `sum(d, Uh[d, e] (a[d] - b[d]))`, one pass over a
    [D, D] tile instead of two. Sums with several limits, or whose body is not one read of the tile times the
    rest, stay."""
    if not e.args or _leaf(e):
        return e
    e = e.func(*[merge_sums(a, tiles) for a in e.args])
    if not isinstance(e, sympy.Add):
        return e
    key_var = sympy.Symbol("_merged")  # the summed index, renamed alike in every sum of a group for its key
    groups: dict[tuple, list[tuple[sympy.Symbol, sympy.Expr, sympy.Expr]]] = {}
    kept = []
    for term in e.args:
        sums = [f for f in sympy.Mul.make_args(term) if isinstance(f, sympy.Sum)]
        if len(sums) != 1 or len(sums[0].limits) != 1:
            kept.append(term)
            continue
        (total,) = sums
        var, lo, hi = total.limits[0]
        factors = sympy.Mul.make_args(total.function)
        reads = [f for f in factors if isinstance(f, sympy.Indexed) and str(f.base) in tiles and var in f.indices]
        if len(reads) != 1:
            kept.append(term)
            continue
        rest = sympy.Mul(*[f for f in factors if f != reads[0]])
        coeff = sympy.Mul(*[f for f in sympy.Mul.make_args(term) if f is not total])
        groups.setdefault((reads[0].subs(var, key_var), lo, hi), []).append((var, coeff * rest, term))
    for (read, lo, hi), parts in groups.items():
        if len(parts) == 1:
            kept.append(parts[0][2])
            continue
        var = parts[0][0]
        body = sympy.Add(*[part.subs(v, var) for v, part, _ in parts])
        kept.append(sympy.Sum(read.subs(key_var, var) * body, (var, lo, hi)))
    return sympy.Add(*kept)


class TritonAdjointWriter(TritonRecurrentWriter):
    """Writes the Triton kernel and launcher of the recurrent form's derived backward
    (`NAME__triton_recurrent_adjoint`).

    The kernel runs the adjoint step that `recurrence_dsl.adjoint.derive_adjoint` differentiates from the spec (the
    same sympy expressions the torch form `NAME__recurrent_adjoint` prints), one program per (batch, head, tile of
    the forward's free axis), segments of `every` steps from the last: the segment's states are recomputed from its
    checkpoint (stored by the forward kernel's CHECKPOINT variant) into a per-program scratch buffer of `every`
    states, then the states' gradients run back through the segment one step at a time, each input's gradient is
    stored at its step and each param's accumulated in registers. With `segments` (and `_segmentable`), also the
    chunk-parallel mode (the module docstring; `_write_segmented_launch`, `_segment_scan_kernel`).

    Splitting over the free axis (V of `S[K, V]`): no step couples its lanes, so every gradient is linear in the
    lanes' cotangents, and a program computes the part of each gradient that its own lanes' cotangents cause.
    A gradient over the free axis (dv) is its program's alone; one without it (dq, dk, dg, a param's, a state's
    without the axis) is a partial sum over the program's lanes, stored per tile ([tiles, B, T, H, ...]) and summed
    by the launcher. A cotangent without the free axis (an output or a final state without it) is seeded in the
    first tile only, so it is counted once.

    Registers (issue 10: no spills at the default configs). With no free axis, a program holds whole [D0, D1]
    params (minimal_rnn's Uh, Uz): such a param is read at each use (`streamed`: one tile live at a time, from L1)
    and the step's sums over it are merged (`merge_sums`: dh's two passes over Uh become one); a [D0, D1] param whose
    step gradient is a few outer products (`outer_factors`, `sum_j L_j[r] R_j[c]`) is not summed in a register
    tile: the kernel stores L_j and R_j per step ([B, T, H, J, D0] and [B, T, H, J, D1]) and the launcher contracts
    them over (batch, time) in one einsum, a matmul. The kernel is declared `_register_limited` (its launches pass
    maxnreg = 64K registers over the program's threads, at most 255): unasked, ptxas stops at 128 registers a thread
    at 8 warps and spills.
    """

    def __init__(self, analysis: Analysis, adjoint: AdjointStep, segments: bool = False):
        super().__init__(analysis)
        self.adj = adjoint
        self.want_segments = segments  # print the chunk-parallel mode where `_segmentable` allows it
        self.ranges.update(adjoint.ranges)
        self.out_grads = {grad_name(o.name) for o in self.outputs}
        self.carried = {grad_name(s.name) for s in self.states}
        self.totals = {grad_name(s.name + NEW_SUFFIX) for s in self.states}
        # Values known step by step (never loop-invariant temporaries): the cotangents and state gradients too.
        self.input_names |= self.out_grads
        self.state_names |= self.carried
        self.new_names |= self.totals
        self.grads = [x for x in self.inputs + self.params if {**adjoint.inputs, **adjoint.params}[x.name] is not None]

    # -- preparation ----------------------------------------------------------------

    def _forward_layout(self) -> None:
        """The forward kernel's blocks and free axis: the backward splits the same axis the forward does."""
        forward = TritonRecurrentWriter(self.a)
        forward.write()
        self.tile = forward.tile
        self.block_sizes = list(forward.block_sizes)
        for h in self.ranges.values():
            if h not in self.block_sizes:
                self.block_sizes.append(h)

    def _prepare_adjoint(self) -> None:
        self.temp_key = {}
        fold = self._fold_constants
        adj = self.adj
        updates = {n: (d.indices, fold(d.expr)) for n, d in self.a.ir.updates.items()}

        # [D0, D1] params held whole by one program (no tiled axis: minimal_rnn's Uh, Uz) are read at each use
        # rather than held through the loops: two [128, 128] float32 tiles are all of a 16-warp program's registers,
        # while the L1-resident tile costs a load per use. The sums over one such tile are merged (`merge_sums`).
        self.streamed = {p.name for p in self.params if len(p.dims) >= 2 and self.tile is None}

        def prepared(d) -> sympy.Expr:
            return fold(merge_sums(split_sums(d.expr, self.ranges), self.streamed))

        totals = [(d.name, d.indices, prepared(d)) for d in adj.new_states]
        previous = {n: (d.indices, prepared(d)) for n, d in adj.previous.items()}
        grads = {x.name: ({**adj.inputs, **adj.params}[x.name].indices, prepared({**adj.inputs, **adj.params}[x.name]))
                 for x in self.grads}
        counts: dict = {}
        for e in ([e for _, e in updates.values()] + [e for _, _, e in totals] + [e for _, e in previous.values()]
                  + [e for _, e in grads.values()]):
            self._count(e, counts)
        self.updates = {n: (idx, self._bind(e, counts)) for n, (idx, e) in updates.items()}
        self.totals_ir = [(n, idx, self._bind(e, counts)) for n, idx, e in totals]
        self.previous_ir = {n: (idx, self._bind(e, counts)) for n, (idx, e) in previous.items()}
        self.grads_ir = {n: (idx, self._bind(e, counts)) for n, (idx, e) in grads.items()}
        self.outputs_ir = {}
        # [D0, D1] params whose per-step gradient is a few outer products: their factors go to memory, not a
        # [D0, D1] register tile per param (minimal_rnn's Uh and Uz at D = 128 spilled 608-728 B). Only without
        # a tiled axis: a program then holds every lane of both factors.
        self.outer: dict[str, list[tuple[sympy.Expr, sympy.Expr]]] = {}
        for p in self.params:
            if p in self.grads and len(p.dims) == 2 and self.tile is None:
                idx, e = self.grads_ir[p.name]
                pairs = outer_factors(e, *idx)
                if pairs is not None:
                    self.outer[p.name] = pairs

    def _segmentable(self) -> bool:
        """Whether the state gradient's map across a segment is one linear map shared by every lane of the tiled
        axis: one state [A, F], F the tiled axis (V of S[K, V]), whose adjoint step dS_{t-1} = A_t^T dS_t + (terms
        of the outputs' gradients) reads, once the outputs' gradients are zero, only the state's gradients and
        inputs and params without F, and sums over no F (so no state, no lane's own data: the linear classes with
        a transition on the first axis, the delta rule, the diagonal-plus-rank-one class). Then a segment's
        dS_start = P_c dS_end + r_c with P_c an [A, A] matrix: the segmented mode (`SEGMENTS`) forms P_c by running
        the segment on the identity (F := A lanes), r_c on the outputs' gradients alone, and every segment runs in
        parallel from the dS_end a scan over segments gives it."""
        if self.tile is None or len(self.states) != 1:
            return False
        dims = self._dims(self.states[0])
        if len(dims) != 2 or size_key(dims[1]) != size_key(self.tile) or size_key(dims[0]) == size_key(self.tile):
            return False
        zero = {grad_name(o.name) for o in self.outputs}
        allowed = self.carried | self.totals | {x.name for x in self.inputs + self.params if not self._spans_tile(x)}
        tiled = size_key(self.tile)
        exprs = [d.expr for d in self.adj.new_states] + [d.expr for d in self.adj.previous.values()]
        for e in exprs:
            e = e.xreplace({n: sympy.Integer(0) for n in e.atoms(sympy.Indexed, sympy.Symbol)
                            if (str(n.base) if isinstance(n, sympy.Indexed) else n.name) in zero})
            for n in sympy.preorder_traversal(e):
                if isinstance(n, sympy.Sum) and any(size_key(self.ranges[v]) == tiled for v, _, _ in n.limits):
                    return False
                if isinstance(n, sympy.Indexed) and str(n.base) not in allowed:
                    return False
                if isinstance(n, sympy.Symbol) and n not in self.ranges and n.name not in self.sizes \
                        and n.name not in allowed:
                    return False
        # r_c's launch recomputes no state (RECOMPUTE off): an outputs' gradient term that reads one keeps the
        # sequential mode
        return not self._map_reads_state()

    def _map_reads_state(self) -> bool:
        """Whether the state gradient's step, the outputs' gradients' terms included, reads a state (before or after
        the step): then the segmented mode is not offered (`_segmentable`: its r_c launch holds no states)."""
        states = {s.name for s in self.states} | {s.name + NEW_SUFFIX for s in self.states}
        exprs = [e for _, _, e in self.totals_ir] + [e for _, e in self.previous_ir.values()]
        return bool(self._reads(exprs) & states)

    def _reads(self, exprs) -> set[str]:
        """The names `exprs` read, through the temporaries they read."""
        names: set[str] = set()
        todo = list(exprs)
        while todo:
            new = _leaf_names(todo.pop()) - names
            names |= new
            todo += [self.temps[n][1] for n in new if n in self.temps]
        return names

    # -- naming ---------------------------------------------------------------------

    def _adjoint_names(self) -> dict[str, str]:
        names = self._names()
        taken = set(names.values()) | {_user(s.name) for s in self.inputs + self.params + self.states + self.outputs}

        def fresh(short: str, long: str) -> str:
            name = short if short not in taken else long
            taken.add(name)
            return name

        self.grad_ptr = {}
        for sym in self.outputs + self.inputs + self.params + self.states:
            u = _user(sym.name)
            self.grad_ptr[sym.name] = fresh(f"d{u}", f"grad_{u}")
        # an outer-product param's gradient: its row factors [B, T, H, J, D0] and column factors [B, T, H, J, D1]
        self.factor_ptr = {n: (fresh(f"d{_user(n)}_row", f"grad_{_user(n)}_row"),
                               fresh(f"d{_user(n)}_col", f"grad_{_user(n)}_col")) for n in self.outer}
        for o in self.outputs:
            names[grad_name(o.name)] = fresh(f"b_d{_user(o.name)}", f"b_grad_{_user(o.name)}")
        for x in self.grads:
            names[grad_name(x.name)] = fresh(f"b_d{_user(x.name)}", f"b_grad_{_user(x.name)}")
        for s in self.states:
            u = _user(s.name)
            names[grad_name(s.name)] = fresh(f"b_d{u}", f"b_grad_{u}")
            names[grad_name(s.name + NEW_SUFFIX)] = fresh(f"b_d{u}_new", f"b_grad_{u}_new")
            names[grad_name(s.name) + "_prev"] = fresh(f"b_d{u}_prev", f"b_grad_{u}_prev")
        return names

    def _grad_args(self) -> list[str]:
        """The kernel's gradient arguments of the inputs and params: an outer-product param's two factor buffers."""
        return [a for x in self.inputs + self.params
                for a in (self.factor_ptr[x.name] if x.name in self.outer else (self.grad_ptr[x.name],))]

    def _spans_tile(self, sym) -> bool:
        return self.tile is not None and size_key(self.tile) in [size_key(d) for d in self._dims(sym)]

    def _local_offsets(self, sym) -> str:
        """Offsets of a state's tile inside its program's scratch slot: the tile's own lanes, padding included."""
        dims = self._dims(sym)
        n = len(dims)
        parts = []
        for p, d in enumerate(dims):
            text = f"tl.arange(0, {block_name(d)})"
            if n > 1:
                text += "[" + ", ".join(":" if q == p else "None" for q in range(n)) + "]"
            rest = dims[p + 1:]
            if rest:
                text += " * " + " * ".join(block_name(r) for r in rest)
            parts.append(text)
        return " + ".join(parts)

    def _slot(self, sym) -> str:
        dims = self._dims(sym)
        return " * ".join(block_name(d) for d in dims) if dims else "1"

    def _state_mask(self, sym) -> str:
        return f"m_{_user(sym.name)}" if len(sym.dims) > 1 else self._mask(sym)

    # -- the kernel -------------------------------------------------------------------

    def write(self) -> str:  # noqa: C901 - one kernel, printed top to bottom
        self._forward_layout()
        self._prepare_adjoint()
        names = self._adjoint_names()
        for p in self.params:
            if p.name in self.streamed:  # printed as its load wherever the step reads it
                u = _user(p.name)
                names[p.name] = (f"tl.load({u} + i_h * {self._factor(p)} + {self._offsets(p)}, mask={self._mask(p)}, "
                                 "other=0.0).to(tl.float32)")
        zero_padded = ({s.name for s in self.inputs + self.params + self.states} | self.new_names | self.carried
                       | self.out_grads)
        printer = TritonPrinter(set(self.sizes), self.ranges, names, zero_padded, self.temps)
        printer.group_factors = bool(self.streamed)  # the sums over a streamed tile: one full-tile product each
        update_exprs = [e for _, e in self.updates.values()]
        adjoint_exprs = ([e for _, _, e in self.totals_ir] + [e for _, e in self.previous_ir.values()]
                         + [e for _, e in self.grads_ir.values()])
        read_update = self._reads(update_exprs)
        read_adjoint = self._reads(adjoint_exprs)
        self.used = read_update | read_adjoint
        tile = self.tile
        self.segmented = seg = self.want_segments and self._segmentable()
        state = _user(self.states[0].name) if seg else None

        w = SourceWriter()
        kernel = f"{self.fn}__triton_recurrent_adjoint_kernel"
        consts = [names[c] for c, _, _ in self.consts.values()]
        head = [_user(s.name) for s in self.inputs + self.params]
        rest = ([f"ck_{_user(s.name)}" for s in self.states] + [f"dht_{_user(s.name)}" for s in self.states]
                + [self.grad_ptr[o.name] for o in self.outputs]
                + self._grad_args()
                + [f"dh0_{_user(s.name)}" for s in self.states] + [f"sc_{_user(s.name)}" for s in self.states]
                + ["cu_", "ck_first_"] + consts + ["B_", "T_", "TT_", "H_", "every", "NC_", "SLOTS_"]
                + [_user(s) for s in self.sizes] + [f"{block_name(d)}: tl.constexpr" for d in self.block_sizes]
                + ["VARLEN: tl.constexpr", "REVERSE: tl.constexpr"])
        if seg:  # the segmented mode's gradients at the segments' ends (in) and starts (out), its table and flags
            rest += [f"de_{state}", f"ds_{state}", "seq_", "NP_", "SUB_", "NSUB_", "SEGMENTS: tl.constexpr",
                     "TILE0_", "STORE_GRADS: tl.constexpr", "RECOMPUTE: tl.constexpr", "EYE: tl.constexpr",
                     "ACCUMULATE: tl.constexpr"]
        # unasked, ptxas stops at 128 registers a thread at 8 warps and spilled 8-32 B (the class docstring)
        w("@_register_limited()", 0)
        w("@triton.jit", 0)
        w(f"def {kernel}(", 0)
        w(", ".join(head) + ",  # inputs [B, T, H, ...], params [H, ...]")
        w(", ".join(rest) + ",  # checkpoints, final states' and outputs' gradients, gradients out, scratch, ...")
        w("):", 0)
        where = ("(batch, head)" if tile is None
                 else f"(batch, head, {block_name(tile)} lanes of {self._size_src(tile)})")
        w(f'"""The derived backward of {self.fn}__triton_recurrent_kernel, one {where} per program.')
        w("Segments of `every` steps from the last: the segment's states recomputed from its checkpoint into the")
        w("program's scratch slots, then the adjoint step (recurrence_dsl/adjoint.py) backwards through them.")
        if seg:
            w("VARLEN: packed sequences, as in the forward kernel; each program walks its own sequence's segments.")
            w("SEGMENTS: one program per (batch, head, tile, segment lane i_p) taking segments i_p, i_p + NP_, ... of")
            w("the launch (packed: of every sequence, its sequence from the table seq_), each from the state gradient")
            w("at its end, de, storing the one at its start to ds (`_segmentable`); STORE_GRADS: store the inputs'")
            w("and params' gradients (off where only ds is wanted); RECOMPUTE: recompute the states (off where the")
            w("state gradient's map reads none); EYE: the identity at every segment's end instead of de (P_c). The")
            w('scratch: NSUB_ sub-segments\' first states, SUB_ steps apart, then one sub-segment\'s SUB_ states."""')
        else:
            w('VARLEN: packed sequences, as in the forward kernel; each program walks its own sequence\'s segments."""')
        w("i_bh = tl.program_id(0)")
        w("i_b = i_bh // H_")
        w("i_h = i_bh % H_")
        if tile is not None:
            w("i_tile = tl.program_id(1)" + (" + TILE0_  # (a launch per tile: from TILE0_)" if seg else ""))
            w("i_row = i_tile * B_ + i_b  # the row of a gradient summed over tiles afterwards ([tiles, B, ...])")
            w("i_slot = i_bh.to(tl.int64) * tl.num_programs(1) + " + ("tl.program_id(1)" if seg else "i_tile")
              + "  # this program's scratch")
        else:
            w("i_row = i_b")
            w("i_slot = i_bh.to(tl.int64)  # this program's scratch")
        if seg:
            w("if SEGMENTS:")
            w("i_p = tl.program_id(2)  # the segment lane", 2)
            w("i_row = (i_tile * NP_ + i_p) * B_ + i_b", 2)
            w("i_slot = i_slot * NP_ + i_p", 2)
        self._write_sequence(w, adjoint=True)
        for d in self.block_sizes:
            if d == tile:
                w(f"{offs_name(d)} = i_tile * {block_name(d)} + tl.arange(0, {block_name(d)})")
            else:
                w(f"{offs_name(d)} = tl.arange(0, {block_name(d)})")
            w(f"{mask_name(d)} = {offs_name(d)} < {self._size_src(d)}")

        def seed(sym, at: str) -> str:
            """The load of a cotangent (float32): zero outside the first tile when it lacks the free axis."""
            mask = (self._state_mask(sym) if sym in self.states else self._mask(sym)) if sym.dims else ""
            load = f"tl.load({at}, mask={mask}, other=0.0)" if mask else f"tl.load({at})"
            if tile is not None and not self._spans_tile(sym):
                return f"tl.where(i_tile == 0, {load}.to(tl.float32), 0.0)  # counted once, in the first tile"
            return f"{load}.to(tl.float32)"

        for p in self.params:
            if p.name not in self.used or p.name in self.streamed:
                continue
            u = _user(p.name)
            if p.dims:
                w(f"b_{u} = tl.load({u} + i_h * {self._factor(p)} + {self._offsets(p)}, mask={self._mask(p)}, "
                  f"other=0.0).to(tl.float32)  # {self._shape(p)}")
            else:
                w(f"b_{u} = tl.load({u} + i_h).to(tl.float32)")
        for p in self.params:
            if p in self.grads and p.name not in self.outer:
                shape = f"[{', '.join(block_name(d) for d in self._dims(p))}]"
                w(f"{names[grad_name(p.name)]} = tl.zeros({shape}, dtype=tl.float32)  # summed over the steps")
        w("# The final states' gradients (from the loss), then carried back step by step.")
        for s in self.states:
            u = _user(s.name)
            at = f"dht_{u} + i_bh.to(tl.int64) * {self._factor(s)}" + (f" + {self._offsets(s)}" if s.dims else "")
            if s.dims and len(s.dims) > 1:
                w(f"m_{u} = {self._mask(s)}")
            if seg:  # (segments: seeded from de, each at its own end)
                w("if SEGMENTS:")
                w(f"{names[grad_name(s.name)]} = tl.zeros({self._shape(s)}, dtype=tl.float32)", 2)
                w("else:")
                w(f"{names[grad_name(s.name)]} = {seed(s, at)}", 2)
            else:
                w(f"{names[grad_name(s.name)]} = {seed(s, at)}")
            w(f"p_ck_{u} = ck_{u} + ck_row_ * {self._factor(s)}" + (f" + {self._offsets(s)}" if s.dims else ""))
            slots = "(NSUB_ + SUB_)" if seg else "SLOTS_"  # (segmented: sub-segments' first states, then one's)
            w(f"p_sc_{u} = sc_{u} + i_slot * {slots} * {self._slot(s)}"
              + (f" + {self._local_offsets(s)}" if s.dims else ""))
        self._write_prologue_temps(w, printer)

        def load_state(s, at: str, indent: int) -> None:
            u = _user(s.name)
            if s.dims:
                w(f"b_{u} = tl.load({at}, mask={self._state_mask(s)}, other=0.0)", indent)
            else:
                w(f"b_{u} = tl.load({at})", indent)

        def load_inputs(read: set[str], indent: int) -> None:
            for x in self.inputs:
                if x.name not in read:
                    continue
                u = _user(x.name)
                at = f"{u} + ((bos_ + {_STEP}) * H_ + i_h) * {self._factor(x)}"
                if x.dims:
                    w(f"b_{u} = tl.load({at} + {self._offsets(x)}, mask={self._mask(x)}, other=0.0).to(tl.float32)"
                      f"  # {self._shape(x)}", indent)
                else:
                    w(f"b_{u} = tl.load({at}).to(tl.float32)", indent)

        if seg:
            s0 = self.states[0]
            w("r0_ = 0")
            w("r1_ = NS_")
            w("rs_ = 1")
            w("if SEGMENTS:  # every segment of the launch (packed: of all sequences), NP_ apart")
            w("r0_ = i_p", 2)
            w("r1_ = NC_", 2)
            w("rs_ = NP_", 2)
            w("for i_r in range(r0_, r1_, rs_):")
        else:
            w("for i_r in range(0, NS_):")
        w("i_c = NS_ - 1 - i_r  # segments from the last", 2)
        if seg:
            w("if SEGMENTS:", 2)
            w("i_c = i_r", 3)
            w("if VARLEN:  # the sequence of packed segment i_r", 3)
            w("i_b = tl.load(seq_ + i_r)", 4)
            w("bos_ = tl.load(cu_ + i_b).to(tl.int64)", 4)
            w("L_ = tl.load(cu_ + i_b + 1).to(tl.int64) - bos_", 4)
            w("i_c = i_r - tl.load(ck_first_ + i_b)", 4)
            w("ck_row_ = i_h * NC_ + tl.load(ck_first_ + i_b).to(tl.int64)", 4)
            w(f"p_ck_{state} = ck_{state} + ck_row_ * {self._factor(s0)} + {self._offsets(s0)}", 4)
            a_offs, f_offs = (offs_name(d) for d in self._dims(s0))
            w("if EYE:  # (P_c: the identity, the tiled axis standing for the first)", 3)
            w(f"{names[grad_name(s0.name)]} = tl.where({self._state_mask(s0)} & ({a_offs}[:, None] == "
              f"{f_offs}[None, :]), 1.0, 0.0)", 4)
            w("else:", 3)
            w(f"{names[grad_name(s0.name)]} = tl.load(de_{state} + (ck_row_ + i_c) * {self._factor(s0)} + "
              f"{self._offsets(s0)}, mask={self._state_mask(s0)}, other=0.0)  # at the segment's end", 4)
        w("t0 = i_c * every", 2)
        w("t1 = t0 + every", 2)
        w("if t1 > L_:", 2)
        w("t1 = L_", 3)
        bi = 4 if seg else 3  # the indent of the adjoint step's body (segmented: inside the sub-segments' loop)

        def recompute(first: str, last: str, slot: str, indent: int, every_sub: bool = False) -> None:
            """The states of steps first .. last - 1 recomputed from b_<state>, the one before each step stored at
            slot (every_sub: only at the sub-segments' starts, slot then their number)."""
            w(f"for i_t in range({first}, {last}):", indent)
            if every_sub:
                w("if (i_t - t0) % SUB_ == 0:  # a sub-segment's first state", indent + 1)
            for s in self.states:
                u = _user(s.name)
                at = f"p_sc_{u} + ({slot}) * {self._slot(s)}"
                w(f"tl.store({at}, b_{u}, mask={self._state_mask(s)})" if s.dims else f"tl.store({at}, b_{u})",
                  indent + 1 + every_sub)
            load_inputs(read_update, indent + 1)
            emitted: set[str] = set()
            for s in self._update_order():
                idx, e = self.updates[s.name]
                u = _user(s.name)
                self._write_temps_for(w, printer, e, emitted, indent + 1)
                text = self._full(printer, e, idx)
                if idx and printer.needs_mask(e, idx):
                    text = f"tl.where({self._state_mask(s)}, {text}, 0.0)"
                w(f"b_{u}_new = {text}  # " + (f"{self._shape(s)} " if s.dims else "") + self.cite[s.name],
                  indent + 1)
            for s in self.states:
                w(f"b_{_user(s.name)} = b_{_user(s.name)}_new", indent + 1)

        if seg:
            # Two levels (issue: RWKV-7's step kept [B, H, T, K, V] float32 states in scratch): the segment's
            # states recomputed once to keep each sub-segment's first (SUB_ steps apart, NSUB_ slots), then each
            # sub-segment's again, from the last, into SUB_ slots after those, and the adjoint run back through it.
            # RECOMPUTE off (the launches for r_c and P_c, whose map reads no state): no state is read at all.
            st0 = _user(self.states[0].name)
            w("# The segment's states recomputed from its checkpoint, keeping each sub-segment's first state (SUB_", 2)
            w("# steps apart), then each sub-segment's from the last into SUB_ more slots, the adjoint step back", 2)
            w("# through them. RECOMPUTE off: no state is read (the gradient's map reads none).", 2)
            w("NQ_ = (t1 - t0 + SUB_ - 1) // SUB_  # sub-segments", 2)
            w("if RECOMPUTE:", 2)
            w("tl.debug_barrier()", 3)
            load_state(self.states[0], f"p_ck_{st0} + i_c * {self._factor(self.states[0])}", 3)
            recompute("t0", "t0 + (NQ_ - 1) * SUB_", "(i_t - t0) // SUB_", 3, every_sub=True)
            w(f"tl.store(p_sc_{st0} + (NQ_ - 1) * {self._slot(self.states[0])}, b_{st0}, "
              f"mask={self._state_mask(self.states[0])})  # the last sub-segment's first state", 3)
            w("else:", 2)
            w(f"b_{st0} = tl.zeros({self._shape(self.states[0])}, dtype=tl.float32)  # (read by no stored value)", 3)
            w("for i_q in range(0, NQ_):", 2)
            w("q0_ = t0 + (NQ_ - 1 - i_q) * SUB_  # the sub-segment's steps q0_ .. q1_ - 1, from the last", 3)
            w("q1_ = q0_ + SUB_", 3)
            w("if q1_ > t1:", 3)
            w("q1_ = t1", 4)
            w("if RECOMPUTE:", 3)
            w("tl.debug_barrier()  # (a slot is written and read by different threads of the program)", 4)
            load_state(self.states[0], f"p_sc_{st0} + ((q0_ - t0) // SUB_) * {self._slot(self.states[0])}", 4)
            recompute("q0_", "q1_", "NSUB_ + i_t - q0_", 4)
            w("tl.debug_barrier()", 4)
            w(f"b_{st0}_new = b_{st0}  # the state after the sub-segment's last step", 3)
            w("for i_s in range(0, q1_ - q0_):", 3)
            w("i_t = q1_ - 1 - i_s", 4)
            w("if RECOMPUTE:", 4)
            load_state(self.states[0], f"p_sc_{st0} + (NSUB_ + i_t - q0_) * {self._slot(self.states[0])}", 5)
        else:
            w("# The segment's states, recomputed from its checkpoint; the state before each step kept in a scratch",
              2)
            w("# slot (the barriers: a slot is written and read by different threads of the program).", 2)
            w("tl.debug_barrier()", 2)
            for s in self.states:
                load_state(s, f"p_ck_{_user(s.name)} + i_c * {self._factor(s)}", 2)
            recompute("t0", "t1", "i_t - t0", 2)
            w("tl.debug_barrier()", 2)
            w("# The adjoint step, backwards in time: from the gradient of the state after step i_t, the one before "
              "it.", 2)
            for s in self.states:
                w(f"b_{_user(s.name)}_new = b_{_user(s.name)}  # the state after the segment's last step", 2)
            w("for i_s in range(0, t1 - t0):", 2)
            w("i_t = t1 - 1 - i_s", 3)
            for s in self.states:
                load_state(s, f"p_sc_{_user(s.name)} + (i_t - t0) * {self._slot(s)}", 3)
        load_inputs(read_adjoint, bi)
        for o in self.outputs:
            if grad_name(o.name) not in read_adjoint:
                continue
            at = f"{self.grad_ptr[o.name]} + ((bos_ + {_STEP}) * H_ + i_h) * {self._factor(o)}"
            if o.dims:
                at += f" + {self._offsets(o)}"
            w(f"{names[grad_name(o.name)]} = {seed(o, at)}", bi)
        emitted = set()
        by_total = {grad_name(s.name + NEW_SUFFIX): s for s in self.states}
        for name, idx, e in self.totals_ir:
            s = by_total[name]
            self._write_temps_for(w, printer, e, emitted, bi)
            text = self._full(printer, e, idx)
            if idx and printer.needs_mask(e, idx):
                text = f"tl.where({self._state_mask(s)}, {text}, 0.0)"
            w(f"{names[name]} = {text}  # d loss / d {s.name} after step i_t", bi)
        for x in self.grads:
            idx, e = self.grads_ir[x.name]
            if x.name in self.outer:
                self._write_outer_factors(w, printer, x, idx, emitted)
                continue
            self._write_temps_for(w, printer, e, emitted, bi)
            text = self._full(printer, e, idx)
            u = names[grad_name(x.name)]
            if x in self.params:
                w(f"{u} += {text}", bi)
                continue
            # its own gradient, or its tile's part ([tiles, R, T_, H_, ...]: a tile's part is TT_ = R * T_ steps on)
            row = "bos_" if self._spans_tile(x) else ("bos_ + i_tile * TT_" if self.tile is not None else "bos_")
            at = f"{self.grad_ptr[x.name]} + (({row} + {_STEP}) * H_ + i_h) * {self._factor(x)}"
            w(f"{u} = {text}" + (f"  # {self._shape(x)}" if x.dims else ""), bi)
            if seg:
                w("if STORE_GRADS:", bi)
            mask = f", mask={self._mask(x)}" if x.dims else ""
            at += f" + {self._offsets(x)}" if x.dims else ""
            if seg and not self._spans_tile(x):  # (one launch per tile, each adding its part: TT_ = 0)
                w("if ACCUMULATE:", bi + 1)
                w(f"{u} += tl.load({at}{mask}{', other=0.0' if mask else ''})", bi + 2)
            w(f"tl.store({at}, {u}{mask})", bi + 1 if seg else bi)
        for s in self.states:
            idx, e = self.previous_ir[s.name]
            self._write_temps_for(w, printer, e, emitted, bi)
            text = self._full(printer, e, idx)
            if idx and printer.needs_mask(e, idx):
                text = f"tl.where({self._state_mask(s)}, {text}, 0.0)"
            w(f"{names[grad_name(s.name) + '_prev']} = {text}  # d loss / d {s.name} before step i_t", bi)
        for s in self.states:
            u = _user(s.name)
            w(f"{names[grad_name(s.name)]} = {names[grad_name(s.name) + '_prev']}", bi)
            w(f"b_{u}_new = b_{u}", bi)
        if seg:
            s0 = self.states[0]
            w("if SEGMENTS:", 2)
            w(f"tl.store(ds_{state} + (ck_row_ + i_c) * {self._factor(s0)} + {self._offsets(s0)}, "
              f"{names[grad_name(s0.name)]}, mask={self._state_mask(s0)})  # at the segment's start", 3)
        w("# The initial states' gradients; the params' (this program's part: summed by the launcher).")
        if seg:
            w("if not SEGMENTS:  # (segments: the launcher's scan over them gives the initial states' gradients)")
        for s in self.states:
            u = _user(s.name)
            row = "i_b" if self._spans_tile(s) or tile is None else "i_row"
            at = f"dh0_{u} + ({row}.to(tl.int64) * H_ + i_h) * {self._factor(s)}"
            if s.dims:
                w(f"tl.store({at} + {self._offsets(s)}, {names[grad_name(s.name)]}, mask={self._state_mask(s)})",
                  2 if seg else 1)
            else:
                w(f"tl.store({at}, {names[grad_name(s.name)]})", 2 if seg else 1)
        if seg and any(p in self.grads and p.name not in self.outer for p in self.params):
            w("if STORE_GRADS:")
        for p in self.params:
            if p not in self.grads or p.name in self.outer:
                continue
            at = f"{self.grad_ptr[p.name]} + (i_row.to(tl.int64) * H_ + i_h) * {self._factor(p)}"
            if p.dims:
                w(f"tl.store({at} + {self._offsets(p)}, {names[grad_name(p.name)]}, mask={self._mask(p)})",
                  2 if seg else 1)
            else:
                w(f"tl.store({at}, {names[grad_name(p.name)]})", 2 if seg else 1)
        return w.text()

    def _write_outer_factors(self, w: SourceWriter, printer: TritonPrinter, p, idx, emitted: set) -> None:
        """Store step i_t's factors of an outer-product param's gradient, `d p[r, c] = sum_j L_j[r] * R_j[c]`:
        L_j at [r, t, h, j, :] of the row buffer (r, t: the step's row and place in it, packed or not), R_j of the
        column buffer (the launcher contracts them)."""
        rows, cols = self.factor_ptr[p.name]
        pairs = self.outer[p.name]
        dims = self._dims(p)
        u = _user(p.name)
        for j, (left, right) in enumerate(pairs):
            for buf, e, axis, dim, side in ((rows, left, idx[0], dims[0], "row"),
                                            (cols, right, idx[1], dims[1], "col")):
                self._write_temps_for(w, printer, e, emitted, 3)
                step = f"((bos_ + {_STEP}) * H_ + i_h)"  # the step's place in [R, T_, H_]: packed or not
                if len(pairs) > 1:
                    step = f"({step} * {len(pairs)} + {j})"
                at = f"{buf} + {step} * {self._size_src(dim)} + {offs_name(dim)}"
                w(f"b_d{u}_{side}{j} = {self._full(printer, e, (axis,))}  # [{block_name(dim)}]", 3)
                w(f"tl.store({at}, b_d{u}_{side}{j}, mask={mask_name(dim)})", 3)

    # -- the launcher -------------------------------------------------------------------

    def _adjoint_footprint(self) -> str:
        """Float32 elements a program holds through its loops: each state tile four times (S, S_new and their
        gradients), each param and its gradient (not an outer-product param's: its factors go to memory), the
        largest param tile read at each use, each loop-invariant temporary."""
        def tile(dims) -> str:
            return " * ".join(block_name(d) for d in dims) if dims else "1"

        terms = [f"4 * {tile(self._dims(st))}" if self._dims(st) else "4" for st in self.states]
        terms += [("" if p.name in self.outer else "2 * ") + tile(self._dims(p)) for p in self.params
                  if p.name in self.used and p.name not in self.streamed]  # an outer-product param's gradient
        streamed = sorted({tile(self._dims(p)) for p in self.params if p.name in self.used and p.name in self.streamed})
        if streamed:  # one tile of the params read at each use is live at a time
            terms.append(streamed[0] if len(streamed) == 1 else f"max({', '.join(streamed)})")
        terms += [tile([self.ranges[a] for a in self.temps[n][0]]) for n in self.temps
                  if self.temp_phase[n] == "prologue"]
        return " + ".join(terms) or "0"

    def write_launcher(self) -> str:
        w = SourceWriter()
        args = [_user(s.name) for s in self.inputs + self.params]
        sizes = [_user(s) for s in self.sizes]
        blocks = [f"block_{size_key(d)}=None" for d in self.block_sizes if isinstance(d, sympy.Symbol)]
        seg = self.segmented
        sig = ", ".join(args + ["checkpoints", "grad_outputs", "grad_states"] + sizes
                        + ["*", "every=64", "cu_seqlens=None", "reverse=False"] + blocks
                        + ["num_warps=None", "num_stages=1"]
                        + (["segments=False"] if seg else []))
        w(f"def {self.fn}__triton_recurrent_adjoint({sig}):", 0)
        w(f'"""The backward of {self.fn}__triton_recurrent_loop in one Triton kernel, derived from the step')
        w(f"(recurrence_dsl/adjoint.py; the torch form {self.fn}__recurrent_adjoint prints the same expressions).")
        w("checkpoints: the loop's, every `every` steps; grad_outputs / grad_states: the loss's gradients of the")
        w("outputs [B, T, H, ...] and of the final states [B, H, ...]; cu_seqlens: the loop's (packed sequences:")
        w("inputs [1, T, H, ...], states [N, H, ...], each program walking its own sequence's segments); reverse: the")
        w("loop's (its steps taken from each sequence's last, the checkpoints of that order).")
        if seg:
            w("segments: the chunk-parallel backward (one program per (batch, head, tile, segment); `_segmentable`):")
            w("each segment's map of the state gradient, dS_start = P_c dS_end + r_c, as r_c (the segment run on the")
            w("outputs' gradients alone) and P_c (run on the identity, the tiled axis of the state standing for its")
            w("first axis, every value over it zero), a scan over the segments for each one's dS_end (the only")
            w("sequential part: NC_ small matmuls), then every segment's gradients in parallel from its dS_end.")
        w("Returns ([the gradient of each input and param, in its dtype], {state: its initial value's float32 "
          'gradient})."""')
        first = _user(self.inputs[0].name)
        w(f"R_, T_, H_ = {first}.shape[:3]")
        w(f"dev = {first}.device")
        w("B_, cu_, ck_first_, NC_, LMAX_ = _sequences(cu_seqlens, R_, T_, every, dev)  # B_: rows or sequences")
        w("if NC_ != len(checkpoints):")
        w("raise ValueError(f\"{len(checkpoints)} checkpoints given, {NC_} expected every {every} steps\")", 2)
        for a in args:
            w(f"{a} = {a}.contiguous()")
        for s in self.states:
            u = _user(s.name)
            dims = "".join(f", {self._size_src(d)}" for d in self._dims(s))
            w(f"ck_{u} = (_stacked([c[{s.name!r}] for c in checkpoints], 2) if NC_ else "
              f"torch.empty((R_, H_, 0{dims}), device=dev)).float().contiguous()  # [R, H, NC, ...]")
            w(f"dht_{u} = grad_states[{s.name!r}].float().contiguous()")
        for o in self.outputs:
            w(f"{self.grad_ptr[o.name]} = grad_outputs[{o.name!r}].contiguous()")
        kw = []
        for d in self.block_sizes:
            if d == self.tile:
                w(f"{block_name(d)} = _tile({self._size_src(d)}, block_{size_key(d)}, {block_name(d)!r})")
            elif isinstance(d, sympy.Symbol):
                w(f"{block_name(d)} = _block({self._size_src(d)}, block_{size_key(d)}, {block_name(d)!r})")
            else:
                w(f"{block_name(d)} = {block_for(int(d))}")
            kw.append(f"{block_name(d)}={block_name(d)}")
        if self.tile is None:
            w("NT_ = 1  # one program per (batch, head)")
        else:
            w(f"NT_ = triton.cdiv(max({self._size_src(self.tile)}, 1), {block_name(self.tile)})  # tiles of "
              f"{self._size_src(self.tile)}")
        w("SLOTS_ = max(min(every, LMAX_), 1)  # states kept per segment")
        f32 = "dtype=torch.float32, device=dev"
        if seg:
            st = self.states[0]
            w("segments = bool(segments) and NC_ > 0 and B_ * H_ > 0")
            w("G0_ = (1 if cu_ is not None else B_) * H_  # grid axis 0 of the segmented launches: (row, head)")
            w("# sub-segments of SUB_ steps, about sqrt(SLOTS_): the scratch holds NSUB_ + SUB_ states, not SLOTS_")
            w("# (the sequential launch keeps one sub-segment, the segment, as before)")
            w("SUB_ = math.isqrt(SLOTS_ - 1) + 1 if segments else SLOTS_")
            w("NSUB_ = triton.cdiv(SLOTS_, SUB_)")
            w(f"NP_ = {self.fn}__segment_lanes(NC_, G0_, (NSUB_ + SUB_) * {self._slot(st)}) if segments else 1")
        # An input's gradient in its own dtype (the recurrent form and the chunked DPLR form take float16 / bfloat16
        # inputs as they are, `takes_input_dtype`), stored once from the kernel's float32 value; where tiles' parts
        # are summed (NT_ > 1) they are summed in float32 and cast once at the end, so no partial sum is rounded to
        # half precision.
        for x in self.inputs:
            dims = "".join(f", {self._size_src(d)}" for d in self._dims(x))
            lead = "" if self._spans_tile(x) else ("1 if segments else NT_, " if seg else "NT_, ")
            note = "" if self._spans_tile(x) else "  # a part per tile, summed below"
            if seg and not self._spans_tile(x):
                note = "  # a part per tile, summed below (segments: one, each tile's launch adding to it)"
            u = _user(x.name)
            dtype = (f"dtype={u}.dtype, device=dev" if self._spans_tile(x) else
                     f"dtype={u}.dtype if NT_ == 1 else torch.float32, device=dev")
            w(f"{self.grad_ptr[x.name]} = torch.{'empty' if x in self.grads else 'zeros'}(({lead}R_, T_, H_{dims}), "
              f"{dtype}){note}")
        for p in self.params:
            dims = "".join(f", {self._size_src(d)}" for d in self._dims(p))
            if p.name in self.outer:
                rows, cols = self.factor_ptr[p.name]
                pairs = len(self.outer[p.name])
                for buf, d in ((rows, self._dims(p)[0]), (cols, self._dims(p)[1])):
                    w(f"{buf} = torch.empty((R_, T_, H_, {pairs}, {self._size_src(d)}), {f32})  # per-step factors "
                      f"of d{_user(p.name)}")
                continue
            if seg:
                w(f"{self.grad_ptr[p.name]} = torch.zeros((NT_ * NP_, B_, H_{dims}), {f32})  # a part per tile, "
                  "segment lane and row, summed below")
                continue
            w(f"{self.grad_ptr[p.name]} = torch.zeros((NT_, B_, H_{dims}), {f32})  # a part per tile and row, summed "
              "below")
        for s in self.states:
            u = _user(s.name)
            dims = "".join(f", {self._size_src(d)}" for d in self._dims(s))
            lead = "" if self._spans_tile(s) or self.tile is None else "NT_, "
            w(f"dh0_{u} = torch.empty(({lead}B_, H_{dims}), {f32})")
            if seg:
                w(f"sc_{u} = torch.empty(((G0_ * NP_ if segments else B_ * H_ * NT_) * (NSUB_ + SUB_) * "
                  f"{self._slot(s)},), {f32})  # scratch: a segment's states per program (segments: a tile's launch's)")
                continue
            w(f"sc_{u} = torch.empty((B_ * H_ * NT_ * SLOTS_ * {self._slot(s)},), {f32})  # scratch: a segment's "
              "states")
        w(f"elements_ = {self._adjoint_footprint()}  # float32 values a program holds through its loops")
        w(f"_check_fits(elements_, {self.fn + '__triton_recurrent_adjoint_kernel'!r})")
        w("if num_warps is None:")
        w("num_warps = _adjoint_warps(elements_)", 2)
        names = self._adjoint_names()
        for ir_name, src, used in self.consts.values():
            w(f"{names[ir_name]} = _size_constant(lambda {', '.join(used)}: {src}, {', '.join(used)})")
        call = (args + [f"ck_{_user(s.name)}" for s in self.states] + [f"dht_{_user(s.name)}" for s in self.states]
                + [self.grad_ptr[o.name] for o in self.outputs]
                + self._grad_args()
                + [f"dh0_{_user(s.name)}" for s in self.states] + [f"sc_{_user(s.name)}" for s in self.states]
                + ["cu_", "ck_first_"]
                + [names[c] for c, _, _ in self.consts.values()]
                + ["B_", "T_", "R_ * T_", "H_", "max(every, 1)", "NC_", "SLOTS_"]
                + sizes + kw + ["VARLEN=cu_ is not None", "REVERSE=bool(reverse)", "num_warps=num_warps",
                                "num_stages=num_stages"])
        if seg:
            self._write_segmented_launch(w, args, sizes, call, names)
        else:
            w("if B_ * H_ > 0:")
            w("_launch(", 2)
            w(f"{self.fn}__triton_recurrent_adjoint_kernel, (B_ * H_, NT_),", 3)
            w(", ".join(call) + ",", 3)
            w(")", 2)
        grads = []
        parts = [self.grad_ptr[x.name] for x in self.inputs if not self._spans_tile(x)]
        if seg and parts:  # (the tiles' parts summed into the first in place: no new [R, T, H, ...] per gradient)
            w(f"for i_ in range(1, {parts[0]}.shape[0]):")
            for g in parts:
                w(f"{g}[0] += {g}[i_]", 2)
        for x in self.inputs:
            g, cast = self.grad_ptr[x.name], f".to({_user(x.name)}.dtype)"
            if self._spans_tile(x):
                grads.append(g)
            elif seg:
                grads.append(f"{g}[0]{cast}")
            else:  # (one tile: its part is the gradient, in the input's dtype)
                grads.append(f"({g}[0] if NT_ == 1 else {g}.sum(0){cast})")
        for p in self.params:  # (summed in float32, then in the param's dtype)
            cast = f".to({_user(p.name)}.dtype)"
            if p.name in self.outer:
                rows, cols = self.factor_ptr[p.name]
                grads.append(f'torch.einsum("bthjr,bthjc->hrc", {rows}, {cols}){cast}')
            else:
                grads.append(f"{self.grad_ptr[p.name]}.sum((0, 1)){cast}")
        finals = []
        for s in self.states:
            u = _user(s.name)
            finals.append(f"{s.name!r}: dh0_{u}" + ("" if self._spans_tile(s) or self.tile is None else ".sum(0)"))
        w(f"return [{', '.join(grads)}], {{{', '.join(finals)}}}")
        if seg:
            return self._segment_scan_kernel() + "\n\n" + w.text()
        return w.text()

    def _write_segmented_launch(self, w: SourceWriter, args: list[str], sizes: list[str], call: list[str],
                                names: dict) -> None:
        """The launches of the segmented mode (`_segmentable`), or the one sequential launch without `segments`."""
        st = self.states[0]
        u = _user(st.name)
        A, F = self._dims(st)
        a_src, f_src = self._size_src(A), self._size_src(F)
        f32 = "dtype=torch.float32, device=dev"
        flags = ["seq_=seq_", "SUB_=SUB_", "NSUB_=NSUB_"]
        # the launches for r_c and P_c hold no states (RECOMPUTE off): every segment its own program (NC_ lanes)
        light = flags + ["TILE0_=0", "ACCUMULATE=False", "NP_=NC_", "SEGMENTS=True", "STORE_GRADS=False",
                         "RECOMPUTE=False"]
        w("if not segments:")
        w("if B_ * H_ > 0:", 2)
        w("_launch(", 3)
        w(f"{self.fn}__triton_recurrent_adjoint_kernel, (B_ * H_, NT_),", 4)
        w(", ".join(call + [f"de_{u}=dh0_{u}", f"ds_{u}=dh0_{u}", "seq_=None", "NP_=1", "SUB_=SUB_", "NSUB_=NSUB_",
                            "TILE0_=0", "SEGMENTS=False", "STORE_GRADS=True", "RECOMPUTE=True", "EYE=False",
                            "ACCUMULATE=False"]) + ",", 4)
        w(")", 3)
        w("else:")
        w(f"seq_ = {self.fn}__segment_sequences(cu_, ck_first_, NC_, dev)  # each packed segment's sequence (or None)",
          2)
        w(f"r_{u} = torch.empty((R_, H_, NC_, {a_src}, {f_src}), {f32})  # r_c", 2)
        w(f"de_{u} = torch.zeros_like(r_{u})", 2)
        w(f"dummy_{u} = torch.empty((1,), {f32})  # the scratch of a launch that recomputes no state", 2)
        w("# 1. r_c: each segment's gradient at its start from its outputs' gradients alone (zero at its end)", 2)
        w("_launch(", 2)
        w(f"{self.fn}__triton_recurrent_adjoint_kernel, (G0_, NT_, NC_),", 3)
        w(", ".join([f"dummy_{u}" if c == f"sc_{u}" else c for c in call]
                    + [f"de_{u}=de_{u}", f"ds_{u}=r_{u}"] + light + ["EYE=False"]) + ",", 3)
        w(")", 2)
        # 2. P_c: the same kernel on A lanes for F, every value over F zero, the identity at each segment's end
        w(f"# 2. P_c [{a_src}, {a_src}]: the segment's map of the gradient at its end, run on the identity: the "
          f"tiled axis {f_src} stands", 2)
        w(f"# for {a_src} lanes, every input, param and output gradient over it zero (the map reads none of them)", 2)
        bp = f"{block_name(F)}_P"
        w(f"{bp} = _tile({a_src}, None, {block_name(F)!r})", 2)
        w(f"NTP_ = triton.cdiv(max({a_src}, 1), {bp})", 2)
        swap = {}
        zeros: dict[str, str] = {}  # shape -> the zeros standing for every read-only value of that shape

        def zero(name: str, shape: str) -> str:
            if shape not in zeros:
                zeros[shape] = f"zero_{name}"
                w(f"zero_{name} = torch.zeros({shape}, {f32})", 2)
            return zeros[shape]

        for x in self.inputs + self.params:
            if not self._spans_tile(x):
                continue
            dims = ", ".join(a_src if size_key(d) == size_key(F) else self._size_src(d) for d in self._dims(x))
            lead = "R_, T_, H_, " if x in self.inputs else "H_, "
            swap[_user(x.name)] = zero(_user(x.name), f"({lead}{dims})")
        for o in self.outputs:
            g = self.grad_ptr[o.name]
            if self._spans_tile(o):
                dims = ", ".join(a_src if size_key(d) == size_key(F) else self._size_src(d) for d in self._dims(o))
                swap[g] = zero(g, f"(R_, T_, H_, {dims})")
            else:
                w(f"zero_{g} = torch.zeros_like({g})", 2)
                swap[g] = f"zero_{g}"
        w(f"P_{u} = torch.empty((R_, H_, NC_, {a_src}, {a_src}), {f32})", 2)
        swap[f"sc_{u}"] = f"dummy_{u}"  # (no state is recomputed: the checkpoints and scratch are not read)
        for x in self.inputs + self.params:  # no gradient is stored: any float32 buffer stands for them
            if x in self.grads:
                for a in (self.factor_ptr[x.name] if x.name in self.outer else (self.grad_ptr[x.name],)):
                    swap[a] = f"P_{u}"
        swap[f"dh0_{u}"] = f"P_{u}"
        swap[f_src] = a_src
        swap[f"{block_name(F)}={block_name(F)}"] = f"{block_name(F)}={bp}"
        p_call = [swap.get(c, c) for c in call]
        w("_launch(", 2)
        w(f"{self.fn}__triton_recurrent_adjoint_kernel, (G0_, NTP_, NC_),", 3)
        w(", ".join(p_call + [f"de_{u}=P_{u}", f"ds_{u}=P_{u}"] + light + ["EYE=True"]) + ",", 3)
        w(")", 2)
        w("# 3. the gradient at every segment's end: from the final state's, dS_end(c - 1) = P_c dS_end(c) + r_c", 2)
        w(f"{self.fn}__triton_segment_scan_kernel[(B_ * H_, NT_)](", 2)
        w(f"P_{u}, r_{u}, de_{u}, dht_{u}, dh0_{u}, cu_, ck_first_, every, NC_, H_, {a_src}, {f_src}, "
          f"{block_name(A)}, {block_name(F)}, min({block_name(A)}, 32), VARLEN=cu_ is not None, "
          "num_warps=num_warps,", 3)
        w(")", 2)
        w("# 4. every segment's gradients, in parallel from its end's: a launch per tile of "
          f"{f_src}, in order, each adding its", 2)
        w(f"# part to the gradients without {f_src} (no [tiles, R, T, H, ...] parts; the sum's order fixed)", 2)
        w("for i_ in range(NT_):", 2)
        w("_launch(", 3)
        w(f"{self.fn}__triton_recurrent_adjoint_kernel, (G0_, 1, NP_),", 4)
        w(", ".join(["0" if c == "R_ * T_" else c for c in call] + [f"de_{u}=de_{u}", f"ds_{u}=r_{u}"] + flags
                    + ["TILE0_=i_", "NP_=NP_", "SEGMENTS=True", "STORE_GRADS=True", "RECOMPUTE=True", "EYE=False",
                       "ACCUMULATE=i_ > 0"]) + ",", 4)
        w(")", 3)

    def _segment_scan_kernel(self) -> str:
        """The segmented mode's scan over segments, one program per (batch, head, tile of the state's F axis)."""
        st = self.states[0]
        A, F = self._dims(st)
        ba, bf = block_name(A), block_name(F)
        return f'''@triton.jit
def {self.fn}__triton_segment_scan_kernel(P, r, de, dht, dh0, cu_, ck_first_, every, NC_, H_, A, F,
                                  {ba}: tl.constexpr, {bf}: tl.constexpr, BM: tl.constexpr,
                                  VARLEN: tl.constexpr):
    """The state gradient at every segment's end, from the last segment: de[c] = dS, then dS = P_c dS + r_c (the
    segment's linear map, P [R, H, NC, A, A] and r [R, H, NC, A, F]); the initial state's gradient dh0 = dS.
    One program per (batch, head, {bf} lanes of F): its segments only (packed: its sequence's, from
    ck_first_[sequence]). P_c dS runs over BM columns of P at a time against the rows of dS just stored to de[c]
    (a whole [A, A] tile of P spilled at A = 128); tf32x3 dots keep float32's accuracy on tensor cores."""
    i_bh = tl.program_id(0)
    i_b = i_bh // H_
    i_h = i_bh % H_
    i_tile = tl.program_id(1)
    if VARLEN:
        L_ = tl.load(cu_ + i_b + 1).to(tl.int64) - tl.load(cu_ + i_b).to(tl.int64)
        NS_ = (L_ + every - 1) // every
        ck_row_ = i_h * NC_ + tl.load(ck_first_ + i_b).to(tl.int64)
    else:
        NS_ = NC_
        ck_row_ = i_bh.to(tl.int64) * NC_
    o_a = tl.arange(0, {ba})
    o_f = i_tile * {bf} + tl.arange(0, {bf})
    m_a = o_a < A
    m_af = m_a[:, None] & (o_f < F)[None, :]
    o_af = o_a[:, None] * F + o_f[None, :]
    b_dS = tl.load(dht + i_bh.to(tl.int64) * (A * F) + o_af, mask=m_af, other=0.0).to(tl.float32)  # [{ba}, {bf}]
    for i_r in range(0, NS_):
        i_c = NS_ - 1 - i_r
        p_de = de + (ck_row_ + i_c) * (A * F)
        tl.store(p_de + o_af, b_dS, mask=m_af)
        tl.debug_barrier()  # (the blocks below read rows that other threads of the program stored)
        b_dS = tl.load(r + (ck_row_ + i_c) * (A * F) + o_af, mask=m_af, other=0.0)
        for i_m in range(0, tl.cdiv(A, BM)):
            o_m = i_m * BM + tl.arange(0, BM)
            m_m = o_m < A
            b_P = tl.load(P + (ck_row_ + i_c) * (A * A) + o_a[:, None] * A + o_m[None, :],
                          mask=m_a[:, None] & m_m[None, :], other=0.0)  # [{ba}, BM]
            b_x = tl.load(p_de + o_m[:, None] * F + o_f[None, :], mask=m_m[:, None] & (o_f < F)[None, :],
                          other=0.0)  # [BM, {bf}]
            b_dS += tl.dot(b_P, b_x, input_precision="tf32x3")
    tl.store(dh0 + i_bh.to(tl.int64) * (A * F) + o_af, b_dS, mask=m_af)


def {self.fn}__segment_lanes(segments, programs, slot):
    """NP_, the segment lanes of a segmented launch of `programs` programs per lane: every segment its own program
    (NP_ = segments) unless their scratch, NP_ * programs * slot float32 values, passes {SEGMENT_SCRATCH_BYTES >> 20}
    MiB; then fewer lanes, each taking its segments in turn (memory stays bounded whatever T)."""
    return max(1, min(segments, {SEGMENT_SCRATCH_BYTES} // max(1, 4 * programs * slot)))


def {self.fn}__segment_sequences(cu, first, segments, dev):
    """The sequence of each of the `segments` packed segments (int32, on dev; None when not packed): sequence n
    holds segments first[n] .. first[n + 1] - 1."""
    if cu is None:
        return None
    counts = torch.diff(first.cpu(), append=torch.tensor([segments], dtype=first.dtype))
    return torch.repeat_interleave(torch.arange(len(counts)), counts).to(device=dev, dtype=torch.int32)'''


PRELUDE = '''"""Generated by recurrence_dsl (codegen/triton_recurrent.py): the Triton recurrent form of {name}."""

import math

import torch
import triton
import triton.language as tl


def _block(n, given, what):
    """The tile extent of an axis of n lanes: a power of two >= 16 (or `given`, checked)."""
    block = max(16, triton.next_power_of_2(int(n))) if given is None else int(given)
    if block < n or block < 16 or block & (block - 1):
        raise ValueError(f"{{what}} must be a power of two >= 16 and >= {{n}}, got {{block}}")
    return block


def _tile(n, given, what):
    """The tile extent of an axis split over programs: min(pow2(n), {tile}) lanes, at least 16 (or `given`,
    a power of two >= 16, checked)."""
    block = min(max(16, triton.next_power_of_2(int(n))), {tile}) if given is None else int(given)
    if block < 16 or block & (block - 1):
        raise ValueError(f"{{what}} must be a power of two >= 16, got {{block}}")
    return block


def _warps(elements):
    """num_warps for a program holding `elements` float32 values through its loop: at most {per_thread} a thread
    (4 warps at least, 16 at most)."""
    warps = 4
    while warps < 16 and elements > {per_thread} * 32 * warps:
        warps *= 2
    return warps


def _adjoint_warps(elements):
    """num_warps for an adjoint program: `_warps`, but on a GPU below sm_90 8 rather than 4 past {adjoint_at_4}
    elements a thread at 4 warps (its step holds gradient temporaries its footprint does not count)."""
    warps = _warps(elements)
    return 8 if warps == 4 and elements > {adjoint_at_4} * 32 * 4 and _arch() < 90 else warps


# An SM's register file: 64K 32-bit registers on sm_80, sm_90 and sm_100 (the CUDA C++ Programming Guide,
# "Technical Specifications per Compute Capability"), the most one program (thread block) can hold.
REGISTER_FILE = 65536


class StateTooLarge(ValueError):
    """The recurrent form's program would hold more float32 values through its loop than an SM has registers, so
    its state tile cannot stay in registers at these sizes (based's S2[K, K, V] at K = V = 64: [64, 64, 16] tiles).
    `does_not_fit`: the dispatcher's "auto" then runs another form (codegen/dispatch.py)."""

    does_not_fit = True


def _fit_tile(footprint, block, given):
    """The widest tile <= block, halved down to 16 lanes, whose program footprint (`footprint(tile)` float32
    values) fits an SM's registers: more programs, each holding less (based's S2[K, K, V] at K = 32 fits at 16
    lanes of V, not at 32). A block the caller gave (`given`) is kept as given."""
    while given is None and block > 16 and footprint(block) > REGISTER_FILE and _compiles_for_cuda():
        block //= 2
    return block


def _check_fits(elements, kernel):
    """Raise StateTooLarge when a program of `kernel` holds `elements` (its footprint: each state tile as S and
    S_new, params, loop-invariant temporaries) > REGISTER_FILE float32 values: no num_warps keeps them in registers,
    and compiling such a kernel takes minutes and gigabytes for a program that spills most of its state."""
    if elements > REGISTER_FILE and _compiles_for_cuda():
        raise StateTooLarge(f"{{kernel}}: a program would hold {{elements}} float32 values through its loop (its state "
                            f"tiles, params and loop-invariant temporaries), more than an SM's {{REGISTER_FILE}} "
                            "registers, so the recurrent form cannot keep its state in registers at these sizes; "
                            "form='auto' runs the chunked or scan form instead where the recurrence has one (they "
                            "hold tiles of the state), and a recurrence with neither runs at these sizes only with "
                            "backend='torch'")


def _compiles_for_cuda():
    """Whether Triton's active driver compiles for a CUDA target (a GPU, or `recdsl kernels`' compile-only
    stand-in); False in the CPU interpreter, where no kernel is compiled and registers do not limit a program."""
    try:
        target = triton.runtime.driver.active.get_current_target()
    except Exception:  # no active driver (the interpreter on a machine without a GPU)
        return False
    return getattr(target, "backend", None) == "cuda"


def _size_constant(value, *sizes):
    """A launcher constant of sizes, computed as the reference computes it: `value` gets each size as a
    float64 tensor, so K ** -0.5 at K = 0 is inf (as a Python int, 0 ** -0.5 raises)."""
    return float(value(*(torch.tensor(float(s), dtype=torch.float64) for s in sizes)))


def _sequences(cu_seqlens, rows, length, every, dev):
    """(B, cu, first, NC, longest) of a call on [rows, length, H, ...] inputs with checkpoints every `every` steps
    (none when every = 0): without cu_seqlens B = rows, cu = first = None, NC = cdiv(length, every) checkpoints per
    row; with cu_seqlens (int64 [N + 1] boundaries of N sequences packed in one row, cu_seqlens[-1] = length) B = N,
    cu the boundaries on `dev`, first[n] the first of sequence n's cdiv(length_n, every) checkpoints, NC their total
    (a table built once on the host: the sequences' checkpoint counts differ) and longest the longest sequence.
    Raises ValueError for packed inputs of more than one row or boundaries that do not end at `length`."""
    if cu_seqlens is None:
        return rows, None, None, (triton.cdiv(length, every) if every > 0 else 0), length
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    if rows != 1 or int(cu[-1]) != length:
        raise ValueError(f"cu_seqlens {{cu.tolist()[:4]}}... must pack its sequences in one row of {{length}} steps, "
                         f"got inputs of {{rows}} rows")
    lengths = cu[1:] - cu[:-1]
    counts = (lengths + every - 1) // every if every > 0 else torch.zeros_like(lengths)
    first = torch.cumsum(counts, 0) - counts
    longest = int(lengths.max()) if len(lengths) else 0
    return len(lengths), cu.to(dev), first.to(dev), int(counts.sum()), longest


def _stacked(views, dim):
    """torch.stack(views, dim), or without a copy the tensor whose slices along dim they are, when they are all of
    them in order (a loop's checkpoints `starts[:, :, n]`)."""
    base = views[0]._base if views else None
    if base is None or base.dim() != views[0].dim() + 1 or base.shape[dim] != len(views):
        return torch.stack(views, dim)
    for n, v in enumerate(views):
        s = base.select(dim, n)
        if (v._base is not base or v.shape != s.shape or v.stride() != s.stride()
                or v.storage_offset() != s.storage_offset()):
            return torch.stack(views, dim)
    return base


def _initial_state(states, name, shape, dev):
    """The initial state [B, H, ...] as contiguous float32 (zero when not given)."""
    s = states.get(name)
    if s is None:
        return torch.zeros(shape, dtype=torch.float32, device=dev)
    if tuple(s.shape) != tuple(shape):
        raise ValueError(f"initial state {{name!r}} has shape {{tuple(s.shape)}}, expected {{tuple(shape)}}")
    return s.to(device=dev, dtype=torch.float32).contiguous()
'''


def prelude(name: str, standalone: bool = True) -> str:
    """The recurrent module's header and helpers (`PRELUDE` with its numbers filled in). `standalone`: with the
    Triton runtime's `_arch` and register limits (`_register_limit`, `_register_limited`, `_launch`;
    codegen/triton_runtime.py, copied as text); a generated module that holds the whole runtime (codegen/module.py)
    passes False and reads the runtime's own."""
    source = PRELUDE.format(name=name, tile=TILE, per_thread=ELEMENTS_PER_THREAD,
                            adjoint_at_4=ADJOINT_ELEMENTS_AT_4_WARPS)
    if not standalone:
        return source
    return "\n\n".join([source.rstrip("\n") + "\n"] + [_runtime_function(f) for f in (
        "_arch", "_register_limit", "_register_limited", "_launch")])


def _runtime_function(name: str) -> str:
    """The source of the top-level function `name` of codegen/triton_runtime.py, read as text (printing imports
    no triton) so a standalone recurrent module shares the runtime's helper rather than a copy kept in step."""
    text = (Path(__file__).parent / "triton_runtime.py").read_text(encoding="utf-8")
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return ast.get_source_segment(text, node) + "\n"
    raise LookupError(f"codegen/triton_runtime.py defines no function {name!r}")


def triton_recurrent_source(analysis: Analysis) -> str:
    """The source of a standalone module: the Triton recurrent kernel of `analysis` and its launcher."""
    writer = TritonRecurrentWriter(analysis)
    kernel = writer.write()
    launcher = writer.write_launcher()
    helpers = helpers_source(kernel)  # expm1 / log1p, where the kernel calls them
    source = "\n\n".join(part for part in (prelude(analysis.recurrence.name), helpers, kernel, launcher) if part)
    check_kernel_source(source)
    return source


def triton_adjoint_source(analysis: Analysis) -> str | None:
    """The Triton backward of `analysis`'s recurrent form (`NAME__triton_recurrent_adjoint_kernel` and its launcher),
    or None where the step has no derived adjoint (`NoAdjoint`: a leaf read with a repeated index) or the adjoint
    holds a function the Triton printer lacks; the recurrent form then keeps the torch form's backward."""
    key = id(analysis)
    if key not in _ADJOINT_SOURCES:
        segmented = False
        try:
            # the chunk-parallel mode where the chunked Triton form trains through this adjoint
            writer = TritonAdjointWriter(analysis, derive_adjoint(analysis.recurrence, analysis.ir),
                                         segments=_dplr_chunk_plan(analysis))
            source = writer.write() + "\n\n" + writer.write_launcher()
            segmented = writer.segmented
        except (NoAdjoint, NotImplementedError):
            source = None
        _ADJOINT_SOURCES[key] = (analysis, source, segmented)  # the analysis kept alive, so its id is not reused
    return _ADJOINT_SOURCES[key][1]


def has_segmented_adjoint(analysis: Analysis) -> bool:
    """Whether the Triton adjoint has the chunk-parallel mode (`segments=True`, `TritonAdjointWriter._segmentable`)."""
    return triton_adjoint_source(analysis) is not None and _ADJOINT_SOURCES[id(analysis)][2]


def has_triton_adjoint(analysis: Analysis) -> bool:
    """Whether the Triton recurrent form trains on its own backward kernel (else on the torch form's backward)."""
    return triton_adjoint_source(analysis) is not None


_ADJOINT_SOURCES: dict[int, tuple[Analysis, str | None, bool]] = {}


# -- loading ----------------------------------------------------------------------------------------------

def dplr_chunked_in_triton(analysis: Analysis) -> bool:
    """Whether `analysis`'s chunked form runs on the Triton runtime's diagonal-plus-rank-one kernels
    (`chunked_dplr_by`) and trains on the recurrent form's derived Triton adjoint, fed the chunk-start states as its
    checkpoints: every state of the chunk plan diagonal-plus-rank-one, held as itself (not transposed, lifted or a
    flattened pair; the checkpoints are the states the step loop holds), with no decay, a scalar or a key decay,
    and the step has a derived Triton adjoint."""
    return _dplr_chunk_plan(analysis) and has_triton_adjoint(analysis)


def _dplr_chunk_plan(analysis: Analysis) -> bool:
    """`dplr_chunked_in_triton` but for the adjoint (which it reads)."""
    if "chunked" not in analysis.forms:
        return False
    view = analysis.chunk_analysis
    plans = [view.states[s.name] for s in analysis.recurrence.states]
    return (all(p.cls is TransitionClass.DIAGONAL_PLUS_RANK_ONE and not p.chunk.pair and p.chunk.v is not None
                and p.chunk.decay_axis in (None, "scalar", "key") for p in plans)
            and not view.transposed and not view.lifted)


def triton_unavailable(analysis: Analysis) -> dict[str, str]:
    """Why the Triton backend lacks each form the analysis found (the torch backend runs it): {form: why}."""
    if analysis.inner is not None:  # shift states: the forms are those of the rest of the recurrence
        return triton_unavailable(analysis.inner)
    why = {}
    if "chunked" in analysis.forms:
        rank = [n for n, s in analysis.chunk_analysis.states.items()
                if s.cls is TransitionClass.DIAGONAL_PLUS_RANK_ONE]
        if rank and not dplr_chunked_in_triton(analysis):
            why["chunked"] = (f"{rank[0]} is diagonal-plus-rank-one, whose chunked Triton kernels need every "
                              "state diagonal-plus-rank-one, untransposed, with no, a scalar or a key decay, and a "
                              "derived Triton adjoint (the torch chunked form runs it)")
    if "parallel" in analysis.forms and "chunked" in why:
        why["parallel"] = "it runs the chunked Triton form's function (codegen/triton_parallel.py), which is missing"
    if "scan" in analysis.forms:
        for s in analysis.states.values():
            refusal = None if s.block is None else triton_scan_refusal(len(s.block.states))
            if refusal:
                why["scan"] = f"{', '.join(s.block.states)} are coupled in blocks of {len(s.block.states)}: {refusal}"
                break
    return why


def triton_form_names(analysis: Analysis) -> tuple[str, ...]:
    """The forms the Triton backend runs: recurrent always; scan where `triton_scan` has its kernels (every
    state elementwise, or coupled in m x m blocks, m <= `triton_block_scan.MAX_BLOCK`); chunked where
    `triton_runtime` has its kernels (every chunkable class; diagonal-plus-rank-one where `dplr_chunked_in_triton`,
    trained through the derived adjoint); parallel wherever the analysis offers it (`triton_parallel`: every
    linear class, no, a scalar, a key or a value decay). `triton_unavailable` says why a form is missing."""
    if analysis.inner is not None:  # shift states: the forms are those of the rest of the recurrence
        return triton_form_names(analysis.inner)
    missing = triton_unavailable(analysis)
    return ("recurrent",) + tuple(f for f in ("scan", "chunked", "parallel")
                                  if f in analysis.forms and f not in missing)


def build_triton_recurrent(analysis: Analysis):
    """The launcher `NAME__triton_recurrent` of `analysis`'s generated module (see the module docstring)."""
    source = triton_recurrent_source(analysis)
    module = load_source(source, f"{analysis.recurrence.name}_triton_recurrent")
    launcher = getattr(module, f"{analysis.recurrence.name}__triton_recurrent")
    launcher.source = source
    return launcher


__all__ = ["TritonAdjointWriter", "TritonRecurrentWriter", "build_triton_recurrent", "dplr_chunked_in_triton",
           "has_segmented_adjoint", "has_triton_adjoint", "triton_adjoint_source", "triton_form_names",
           "triton_recurrent_source", "triton_unavailable"]
