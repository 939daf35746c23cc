"""Generate the PyTorch source of every form of one analysed recurrence.

For a recurrence NAME the generated source defines, each with the same
arguments `(inputs..., params..., states, sizes...)` already bound and cast:

- `NAME__recurrent`: a per-step loop; state-free subexpressions are hoisted into
  a prologue computed once for the whole sequence;
- `NAME__scan`: every state element as s_t = a_t s_{t-1} + b_t, by associative scan;
- `NAME__chunked(..., chunk_size)`: prologue (k, v, decays, queries), the chunked
  runtime (`torch_runtime.chunked_linear_by` / `chunked_delta_by` / `chunked_dplr_by` with the
  plan's decay class), epilogue;
  the parallel form is this with one chunk.

Each returns `(outputs: dict, final_states: dict)` in the compute dtype.
"""

from __future__ import annotations

import itertools

import sympy

from recurrence_dsl.analysis import Analysis, TransitionClass
from recurrence_dsl.dataflow import cite
from recurrence_dsl.step_ir import NEW_SUFFIX

from .printing import SourceWriter, is_constant, py_name
from .torch_printer import TorchPrinter

# The runtimes' class per decay axis: the chunked form names the one its plan fixes (`chunked_linear_by(KeyDecay,
# ...)`), so a generated module keeps only that axis' code (codegen/module.py prunes by name).
_DECAY_CLASSES = {None: "NoDecay", "scalar": "ScalarDecay", "key": "KeyDecay", "value": "ValueDecay"}


def _leaf(e: sympy.Expr) -> bool:
    return isinstance(e, (sympy.Indexed, sympy.Symbol, sympy.Number, sympy.NumberSymbol))


class TorchFormWriter:
    """Writes the torch source of one recurrence's forms."""

    def __init__(self, analysis: Analysis, runtime_prefix: str = "", suffix: str = "", options: bool = False):
        self.rt = runtime_prefix  # how the printed code reaches the runtime's functions
        self.suffix = suffix  # appended to every form function's name (the Triton variants in a module)
        # The chunked form takes **options (block sizes, warps, stages of a tuning config) for its runtime.
        self.options = options
        self.a = analysis
        self.rec = analysis.recurrence
        self.fn = self.rec.name
        self.sizes = set(self.rec.sizes)
        self.state_names = {s.name for s in self.rec.states} | {s.name + NEW_SUFFIX for s in self.rec.states}
        # Python names of the spec's names (a trailing _ where one would shadow a name the code uses).
        self.py = {n: py_name(n) for n in [s.name for s in self.rec.inputs + self.rec.params + self.rec.states
                                            + self.rec.outputs] + list(self.rec.sizes)}
        self.shown: dict[str, str] = {}  # internal names of hoisted expressions -> the names printed
        # Where each state's and output's value is written in the spec (`gla.rec:4`), cited beside its code.
        self.cite = {n: cite(self.rec, n) for n in [s.name for s in self.rec.states + self.rec.outputs]}
        self.args = [self.py[s.name] for s in self.rec.inputs + self.rec.params]
        self.signature = ", ".join(self.args + ["states"] + [self.py[n] for n in self.rec.sizes])

    # -- shared pieces ------------------------------------------------------

    @property
    def _options_arg(self) -> str:
        return ", **options" if self.options else ""

    def _shape_comment(self, indices) -> str:
        return "[B, T, H" + "".join(f", {self.a.ir.ranges[i]}" for i in indices) + "]"

    def _params_to_time(self, w: SourceWriter) -> None:
        """Params [H, ...] -> [1, 1, H, ...] so they broadcast against per-step tensors [B, T, H, ...]."""
        for p in self.rec.params:
            w(f"{self.py[p.name]} = {self.py[p.name]}[None, None]  # [1, 1, H{''.join(', ' + str(d) for d in p.dims)}]")

    def _broadcast(self, printer: TorchPrinter, expr: sympy.Expr, indices, shape: str) -> str:
        """Source of `expr` as a tensor of `shape`; numbers and sizes (`K ** -0.5`) make a filled one."""
        if is_constant(expr, self.sizes):
            return f"{self.py[self.rec.inputs[0].name]}.new_full({shape}, {printer.print_expr(expr, indices)})"
        return f"torch.broadcast_to({printer.print_expr(expr, indices)}, {shape})"

    def _full(self, printer: TorchPrinter, expr: sympy.Expr, indices, sym_dims) -> str:
        """`expr` as a [B, T, H, *sym_dims] tensor."""
        return self._broadcast(printer, expr, indices, f"(B_, T_, H_{''.join(f', {self._dim(d)}' for d in sym_dims)})")

    def _header(self, w: SourceWriter, form: str, extra: str = "") -> None:
        w(f"def {self.fn}__{form}{self.suffix}({self.signature}{extra}):", 0)

    def _dim(self, d) -> str:
        """A dimension (a size name or a number) as Python source."""
        return self.py.get(d, d) if isinstance(d, str) else str(d)

    def _unpack_shape(self, w: SourceWriter) -> None:
        first = self.py[self.rec.inputs[0].name]
        w(f"B_, T_, H_ = {first}.shape[:3]")

    # -- recurrent ------------------------------------------------------------

    def _mentions_state(self, e: sympy.Expr) -> bool:
        return any((isinstance(n, sympy.Indexed) and str(n.base) in self.state_names)
                   or (isinstance(n, sympy.Symbol) and n.name in self.state_names)
                   for n in sympy.preorder_traversal(e))

    def _hoist(self, expr: sympy.Expr, table: dict, counter) -> sympy.Expr:
        """Replace state-free subexpressions worth computing once (functions, sums, powers) by prologue
        tensors P<n>[free indices]. Products are split into their factors first: hoisting `k[i] * v[j]`
        would only trade a cheap per-step product for a [T, K, V] tensor."""
        sizes = {sympy.Symbol(s, integer=True, positive=True) for s in self.sizes}

        def walk(e):
            if _leaf(e):
                return e
            if self._mentions_state(e) or isinstance(e, sympy.Mul):
                if isinstance(e, sympy.Sum):
                    return sympy.Sum(walk(e.function), *e.limits)
                return e.func(*[walk(arg) for arg in e.args])
            if not (e.free_symbols - set(self.a.ir.ranges) - sizes):
                return e  # a constant such as K ** -0.5
            key = sympy.srepr(e)
            if key not in table:
                idx = tuple(sorted((s for s in e.free_symbols if s in self.a.ir.ranges), key=lambda s: s.name))
                name = f"P{next(counter)}"
                while name in self.py:  # a spec may name something P0 itself
                    name = f"P{next(counter)}"
                table[key] = (name, idx, e)
                self.shown[name] = self._unique(self._describe(e))
            name, idx, _ = table[key]
            return sympy.IndexedBase(name)[idx] if idx else sympy.Symbol(name)

        return walk(expr)

    def _describe(self, e: sympy.Expr) -> str:
        """A readable name for a hoisted expression, from its head and the spec names it reads: `exp(g[i])` is
        `exp_g`, `sum(m, k[m] * k[m])` is `sum_k`."""
        head = {sympy.Sum: "sum", sympy.Pow: "pow", sympy.Add: "add", sympy.Mul: "mul"}.get(
            type(e), type(e).__name__.lower() if isinstance(e, sympy.Function) else "pre")
        ranges = set(self.a.ir.ranges)
        read = sorted({str(n.base) for n in e.atoms(sympy.Indexed)}
                      | {n.name for n in e.atoms(sympy.Symbol) if n not in ranges and n.name not in self.sizes})
        return "_".join([head] + [self.py.get(n, n).rstrip("_") for n in read])

    def _unique(self, name: str) -> str:
        """`name`, or `name_2`, `name_3`, ...: distinct from the spec's names and the names already printed."""
        taken = set(self.py.values()) | set(self.shown.values())
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
        last = {st.target.name: st.index for st in self.rec.statements}
        return sorted(self.rec.states, key=lambda s: last.get(s.name, -1))

    def write_recurrent(self) -> str:
        w = SourceWriter()
        self._header(w, "recurrent")
        w('"""Per-step loop: every class, linear or not."""')
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
        for name, idx, e in table.values():
            w(f"{py[name]} = {time_printer.print_expr(e, idx)}  # {self._shape_comment(idx)}")
        input_names = {i.name for i in self.rec.inputs}
        per_step = [i.name for i in self.rec.inputs]
        constant = [p.name for p in self.rec.params]
        for name, _, e in table.values():
            reads_input = any(str(getattr(n, "base", n)) in input_names for n in sympy.preorder_traversal(e)
                              if isinstance(n, (sympy.Indexed, sympy.Symbol)))
            (per_step if reads_input else constant).append(name)
        used = set()
        for _, e in list(updates.values()) + list(outputs.values()):
            used |= {str(n.base) for n in e.atoms(sympy.Indexed)} | {n.name for n in e.atoms(sympy.Symbol)}
        per_step = [n for n in per_step if n in used]
        constant = [n for n in constant if n in used]
        names = {**py, **{n: f"{py.get(n, n)}_t" for n in per_step + constant}}
        for s in self.rec.states:
            names[s.name + NEW_SUFFIX] = py[s.name] + NEW_SUFFIX
        for n in constant:
            w(f"{names[n]} = {py.get(n, n)}[:, 0]  # the same at every step")
        step_printer = TorchPrinter(self.sizes, self.a.ir.ranges, names)
        for s in self.rec.states:
            w(f"{py[s.name]} = states['{s.name}']")
        for o in self.rec.outputs:
            w(f"{py[o.name]}_steps = []")
        w("for t in range(T_):")
        for n in per_step:
            w(f"{names[n]} = {py.get(n, n)}[:, t]", 2)
        for s in self._update_order():
            idx, e = updates[s.name]
            dims = "".join(f", {self._dim(d)}" for d in s.dims)
            w(f"{py[s.name]}{NEW_SUFFIX} = {self._broadcast(step_printer, e, idx, f'(B_, H_{dims})')}  "
              f"# {self.cite[s.name]}", 2)
        for o in self.rec.outputs:
            idx, e = outputs[o.name]
            dims = "".join(f", {self._dim(d)}" for d in o.dims)
            w(f"{py[o.name]}_steps.append({self._broadcast(step_printer, e, idx, f'(B_, H_{dims})')})  "
              f"# {self.cite[o.name]}", 2)
        for s in self.rec.states:
            w(f"{py[s.name]} = {py[s.name]}{NEW_SUFFIX}", 2)
        outs = ", ".join(f"'{o.name}': _stack_steps({py[o.name]}_steps, B_, H_, "
                         f"({''.join(f'{self._dim(d)}, ' for d in o.dims)}), {py[self.rec.inputs[0].name]})"
                         for o in self.rec.outputs)
        finals = ", ".join(f"'{s.name}': {py[s.name]}" for s in self.rec.states)
        w(f"return {{{outs}}}, {{{finals}}}")
        return w.text()

    # -- scan -----------------------------------------------------------------

    def write_scan(self) -> str | None:
        if "scan" not in self.a.forms:
            return None
        w = SourceWriter()
        self._header(w, "scan")
        w('"""Each state element as s_t = a_t * s_(t-1) + b_t, by an associative scan over time."""')
        self._unpack_shape(w)
        self._params_to_time(w)
        printer = TorchPrinter(self.sizes, self.a.ir.ranges, self.py)
        names = dict(self.py)
        for s in self.rec.states:
            sa = self.a.states[s.name]
            dims = "".join(f", {self._dim(d)}" for d in s.dims)
            w(f"b_{s.name} = {self._full(printer, sa.injection, sa.indices, s.dims)}  # {self.cite[s.name]}")
            if is_constant(sa.diagonal, self.sizes):
                value = printer.print_expr(sa.diagonal, sa.indices)
                w(f"a_{s.name} = b_{s.name}.new_full((1,) * b_{s.name}.dim(), {value})  # a constant decay")
            else:
                w(f"a_{s.name} = {printer.print_expr(sa.diagonal, sa.indices)}  # decay, broadcastable")
            w(f"all_{s.name} = {self.rt}scan_diagonal(a_{s.name}, b_{s.name}, states['{s.name}'])  "
              f"# [B, T, H{dims}]")
            if any(self._reads(d.expr, s.name) for d in self.a.ir.outputs.values()):
                w(f"prev_{s.name} = torch.cat([states['{s.name}'][:, None], all_{s.name}[:, :-1]], dim=1)")
            names[s.name] = f"prev_{s.name}"
            names[s.name + NEW_SUFFIX] = f"all_{s.name}"
        out_printer = TorchPrinter(self.sizes, self.a.ir.ranges, names)
        outs = []
        for o in self.rec.outputs:
            d = self.a.ir.outputs[o.name]
            w(f"{self.py[o.name]} = {self._full(out_printer, d.expr, d.indices, o.dims)}  # {self.cite[o.name]}")
            outs.append(f"'{o.name}': {self.py[o.name]}")
        finals = ", ".join(f"'{s.name}': all_{s.name}[:, -1] if T_ else states['{s.name}']" for s in self.rec.states)
        w(f"return {{{', '.join(outs)}}}, {{{finals}}}")
        return w.text()

    # -- chunked ----------------------------------------------------------------

    def write_chunked(self) -> str | None:
        if "chunked" not in self.a.forms:
            return None
        w = SourceWriter()
        self._header(w, "chunked", ", chunk_size=64" + (", **options" if self.options else ""))
        w('"""Chunked form: intra-chunk masked matmuls, the state passed once per chunk."""')
        self._unpack_shape(w)
        self._params_to_time(w)
        printer = TorchPrinter(self.sizes, self.a.ir.ranges, self.py)
        view = self.a.chunk_analysis  # the states of `view.transposed` are held as their transposes here
        readout_names = dict(self.py)
        for s in self.rec.states:
            sa = view.states[s.name]
            plan = sa.chunk
            dims = sa.dims
            kdim = dims[0]
            w(f"# state {s.name} ({self.cite[s.name]}): {sa.cls.value}; {sa.reason}")
            if s.name in view.transposed:
                w(f"# {s.name} is [{', '.join(map(str, s.dims))}] and read along its second axis: the chunked form "
                  f"runs on its transpose")
            w(f"k_{s.name} = {self._full(printer, plan.k.expr, plan.k.indices, (kdim,))}  # {self.cite[s.name]}")
            if plan.v is not None:
                w(f"v_{s.name} = {self._full(printer, plan.v.expr, plan.v.indices, (dims[1],))}  "
                  f"# {self.cite[s.name]}")
                state = f"states['{s.name}']" + (".transpose(-1, -2)" if s.name in view.transposed else "")
            else:
                w(f"v_{s.name} = k_{s.name}.new_ones(B_, T_, H_, 1)  # a state with no value axis: V = 1")
                state = f"states['{s.name}'][..., None]"
            decay = "None"
            if plan.log_decay is not None:
                shape = {"scalar": (), "key": (kdim,), "value": (dims[1] if len(dims) > 1 else 1,)}
                if not plan.decay_exact:
                    w(f"_require_positive({printer.print_expr(sa.diagonal, sa.indices)}, "
                      f"'the decay {sa.diagonal} of {s.name}', 'chunked')")
                log_decay = self._full(printer, plan.log_decay.expr, plan.log_decay.indices, shape[plan.decay_axis])
                w(f"log_decay_{s.name} = {log_decay}  # {self.cite[s.name]}")
                decay = f"log_decay_{s.name}"
            queries = []
            for n, r in enumerate(plan.readouts):
                # The readouts sum(i, query[i] * S[i, j]) of this state, named after it: read_S (read_S_2, ...).
                readout_names[r.name] = f"read_{s.name}" + (f"_{n + 1}" if n else "")
                w(f"query_{readout_names[r.name]} = "
                  f"{self._full(printer, r.query.expr, r.query.indices, (kdim,))}  # {self._readers(view, r.name)}")
                queries.append(f"(query_{readout_names[r.name]}, {r.exclusive})")
            checked = [f"query_{readout_names[r.name]}" for r in plan.readouts] + [f"k_{s.name}", f"v_{s.name}"]
            if sa.cls is TransitionClass.DIAGONAL_PLUS_RANK_ONE:
                checked += [f"a_{s.name}", f"b_{s.name}"]
            elif sa.cls is TransitionClass.RANK_ONE_UPDATE:
                checked.append(f"beta_{s.name}")
            # Non-finite values and log decays > 0 leave the matmuls here for the step loop (see _check_steps).
            check = f"_check_steps([{', '.join(checked)}], [{'' if decay == 'None' else decay}])"
            axis = self.rt + _DECAY_CLASSES[plan.decay_axis]  # the runtime's class of the plan's decay axis
            outs = ", ".join(readout_names[r.name] for r in plan.readouts) + ("," if len(plan.readouts) == 1 else "")
            target = f"({outs}), final_{s.name}" if plan.readouts else f"_, final_{s.name}"
            if sa.cls is TransitionClass.DIAGONAL_PLUS_RANK_ONE:
                w(f"a_{s.name} = {self._full(printer, plan.mix_read.expr, plan.mix_read.indices, (kdim,))}  "
                  "# reads the state: u_t = S_(t-1)^T a_t")
                w(f"b_{s.name} = {self._full(printer, plan.mix_write.expr, plan.mix_write.indices, (kdim,))}  "
                  "# writes u_t back along b_t")
                w(check)
                w(f"{target} = {self.rt}chunked_dplr_by({axis}, [{', '.join(queries)}], k_{s.name}, v_{s.name}, "
                  f"a_{s.name}, b_{s.name}, {decay}, initial_state={state}, chunk_size=chunk_size, "
                  f"output_final_state=True{self._options_arg})")
            elif sa.cls is TransitionClass.RANK_ONE_UPDATE:
                w(f"beta_{s.name} = {self._full(printer, plan.beta.expr, (), ())}  # {self.cite[s.name]}")
                w(check)
                w(f"{target} = {self.rt}chunked_delta_by({axis}, [{', '.join(queries)}], k_{s.name}, v_{s.name}, "
                  f"beta_{s.name}, {decay}, initial_state={state}, chunk_size=chunk_size, "
                  f"output_final_state=True{self._options_arg})")
            else:
                w(check)
                w(f"{target} = {self.rt}chunked_linear_by({axis}, [{', '.join(queries)}], k_{s.name}, v_{s.name}, "
                  f"{decay}, "
                  f"initial_state={state}, chunk_size=chunk_size, output_final_state=True{self._options_arg})")
            if s.name in view.transposed:
                w(f"final_{s.name} = final_{s.name}.transpose(-1, -2)")
            if plan.v is None:
                w(f"final_{s.name} = final_{s.name}[..., 0]")
                for r in plan.readouts:
                    w(f"{readout_names[r.name]} = {readout_names[r.name]}[..., 0]")
        out_printer = TorchPrinter(self.sizes, view.ir.ranges, readout_names)
        outs = []
        for o in self.rec.outputs:
            oa = view.outputs[o.name]
            w(f"{self.py[o.name]} = {self._full(out_printer, oa.expr, oa.indices, o.dims)}  # {self.cite[o.name]}")
            outs.append(f"'{o.name}': {self.py[o.name]}")
        finals = ", ".join(f"'{s.name}': final_{s.name}" for s in self.rec.states)
        w(f"return {{{', '.join(outs)}}}, {{{finals}}}")
        return w.text()

    def write_all(self) -> str:
        parts = [self.write_recurrent(), self.write_scan(), self.write_chunked()]
        return "\n\n".join(p for p in parts if p)


PRELUDE = '''
def _stack_steps(steps, B_, H_, dims, like):
    """Per-step outputs [B, H, ...] -> [B, T, H, ...] (an empty sequence gives T = 0)."""
    if not steps:
        return like.new_zeros((B_, 0, H_) + tuple(dims))
    return torch.stack(steps, dim=1)


def _check_steps(values, log_decays):
    """Raise UnsafeSteps(t) at the first step t whose values (q, k, v, beta, ... [B, T, H, ...]) hold a non-finite
    number or whose log decays hold NaN or a value > 0 (-inf, a reset, is fine). A masked matmul would multiply
    such a value by the zeros above the diagonal and spread it to earlier steps, and the kernels form decays for
    log decays <= 0 only; the dispatcher runs the steps from t on one at a time instead, as the reference does."""
    T_ = values[0].shape[1]
    if T_ == 0:
        return
    bad = torch.zeros(T_, dtype=torch.bool, device=values[0].device)
    for x, log in [(x, False) for x in values] + [(g, True) for g in log_decays]:
        flags = torch.isnan(x) | (x > 0) if log else ~torch.isfinite(x)
        bad = bad | (flags.sum(dim=[d for d in range(x.dim()) if d != 1]) > 0)
    first = int(torch.where(bad, torch.arange(T_, device=bad.device), T_).min())  # the call's one sync
    if first < T_:
        raise UnsafeSteps(first)


def _require_positive(decay, what, form):
    if not bool((torch.as_tensor(decay) > 0).all()):  # (a float for a decay of sizes only, say 1 - 1 / K)
        raise DecayNotPositive(f"form '{form}' takes the logarithm of {what}, which is not positive everywhere; "
                               "use form='recurrent' or 'scan'")
'''


__all__ = ["PRELUDE", "TorchFormWriter"]
