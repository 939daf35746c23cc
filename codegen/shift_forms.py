"""The printed pieces of a recurrence with shift states (recurrence_dsl/shift.py): the function that computes the
shift states' values before every step by shifting along T, and the layer and nn.Module that run it before the
layer of the rest of the recurrence (`ShiftPlan.inner`, printed as any recurrence)."""

from __future__ import annotations

import textwrap

import sympy

from recurrence_dsl.analysis import Analysis
from recurrence_dsl.dataflow import cite
from recurrence_dsl.explain import tidy
from recurrence_dsl.printing import spec_text

from .printing import SourceWriter
from .torch_forms import TorchFormWriter
from .torch_printer import TorchPrinter


def shift_function_name(analysis: Analysis) -> str:
    return f"{analysis.recurrence.name}__shift"


def write_shift(analysis: Analysis) -> str:
    """`NAME__shift(inputs..., params..., states, sizes..., cu_seqlens=None, reverse=False, final=False)`: each
    shift state's value after every step as torch code over [B, T, H, ...], shifted one step along T; returns
    (values before every step by name, final states by name or None)."""
    plan = analysis.shift
    rec = analysis.recurrence
    writer = TorchFormWriter(analysis)
    py = dict(writer.py)
    taken = set(py.values()) | {"B_", "T_", "H_", "states", "cu_seqlens", "reverse", "final", "before", "finals",
                                "dtype_"}
    after = {}
    for s in plan.states:
        name = f"{py[s.name]}_after"
        while name in taken:
            name += "_"
        taken.add(name)
        after[s.name] = name
    first = py[rec.inputs[0].name]
    names = ", ".join(plan.names)
    inputs = (f"the inputs {', '.join(plan.read)} of {plan.inner.name}" if plan.read else
              f"{plan.inner.name} reads none of them")
    w = SourceWriter()
    signature = ", ".join(writer.args + ["states"] + [py[n] for n in rec.sizes])
    w(f"def {shift_function_name(analysis)}({signature}, cu_seqlens=None, reverse=False, final=False):", 0)
    doc = (f"The shift states {names} of {rec.name} before every step ({inputs}). "
           "A shift state's value after a step reads only the step's inputs, params and shift states, so it is "
           "computed for every step at once; shifted one step along T (the initial state at each sequence's first "
           "step; under reverse, the next step's value) it is the value before every step. Returns (those values, "
           "their final states: None unless final).")
    lines = textwrap.wrap(doc, 112)
    lines[0], lines[-1] = '"""' + lines[0], lines[-1] + '"""'
    for line in lines:
        w(line)
    writer._unpack_shape(w)
    read = {b for s in plan.states for b in _names(s.value.expr)}
    for p in rec.params:  # [H, ...] -> [1, 1, H, ...], to broadcast against the steps' [B, T, H, ...]
        if p.name in read:
            w(f"{py[p.name]} = {py[p.name]}[None, None]  # [1, 1, H{''.join(', ' + str(d) for d in p.dims)}]")
    printer = TorchPrinter(writer.sizes, plan.ranges, py)
    wanted = set(plan.read) | {r for s in plan.states for r in s.reads}  # the previous values something reads
    full = frozenset([s.name for s in rec.inputs] + list(plan.names))  # already [B, T, H, *dims]
    def after_steps(s, indent=1):
        sym = rec.symbol(s.name)
        w(f"# {s.name} after each step ({cite(rec, s.name)}): {tidy(spec_text(s.value.expr))}", indent)
        w(f"{after[s.name]} = {writer._full(printer, s.value.expr, s.value.indices, sym.dims, full)}  "
          f"# {writer._shape_comment(s.value.indices, plan.ranges)}", indent)

    for s in plan.states:
        if s.name in wanted:
            after_steps(s)
            w(f"{py[s.name]} = shift_steps({after[s.name]}, states['{s.name}'], cu_seqlens, reverse)  "
              "# before each step")
    before = ", ".join(f"'{n}': {py[n]}" for n in plan.read)
    w(f"before = {{{before}}}")
    w("if not final:")
    w("return before, None", 2)
    for s in plan.states:  # read by nothing before its update (a temporary of the rest): its final state only
        if s.name not in wanted:
            after_steps(s)
    w(f"dtype_ = torch.float32 if {first}.dtype in (torch.float16, torch.bfloat16) else {first}.dtype")
    w("finals = {}")
    for s in plan.states:
        w(f"finals['{s.name}'] = shift_final({after[s.name]}, states['{s.name}'], cu_seqlens, reverse, dtype_)")
    w("return before, finals")
    return w.text()


def _names(expr: sympy.Expr) -> set[str]:
    """The names of the tensors and scalars `expr` reads."""
    return {str(x.base) if isinstance(x, sympy.Indexed) else x.name
            for x in expr.atoms(sympy.Indexed, sympy.Symbol)}


def shift_entry_points(analysis: Analysis, class_name: str) -> str:
    """The recurrence's layer (a `ShiftedLayer` running its shift function, then the inner recurrence's layer) and
    its `torch.nn.Module` wrapper, as `codegen.module._entry_points` writes them for other recurrences: the module
    is the one every recurrence has (`module_class`: the spec's params as its own `nn.Parameter`s, its repr), its
    forward calling this layer, and its params start as the rest's module would start them."""
    rec = analysis.recurrence
    name, inner = rec.name, analysis.shift.inner.name
    cls = class_name
    args = [s.name for s in rec.inputs + rec.params]
    shapes = "\n".join(
        [f"            {s.name}: [B, T, H{''.join(', ' + str(d) for d in s.dims)}]  (input)" for s in rec.inputs]
        + [f"            {s.name}: [H{''.join(', ' + str(d) for d in s.dims)}]  (param)" for s in rec.params])
    state_doc = ", ".join(f"{s.name}: [rows, H{''.join(', ' + str(d) for d in s.dims)}]" for s in rec.states)
    out_doc = ", ".join(f"{s.name}: [B, T, H{''.join(', ' + str(d) for d in s.dims)}]" for s in rec.outputs)
    shifts = ", ".join(analysis.shift.names)
    from .module import module_class

    return f'''
class _{cls}Layer(ShiftedLayer):
    """{name}: {analysis.cls.value} recurrence with shift states {shifts} (computed by shifting along T, then
    {inner}); forms {", ".join(analysis.forms)}."""

    def __call__(self, *args, initial_state=None, output_final_state=False, cu_seqlens=None, reverse=None,
                 form=None, backend=None, chunk_size=None, config=None, check_steps=None, **inputs):
        """{name}({", ".join(args)}, ...): (output, final_state), final_state None unless output_final_state.

        Inputs and params by position or by name. Shapes:
{shapes}
        initial_state / final_state: {state_doc} (rows: B, or the number of packed sequences under cu_seqlens)
        output: {out_doc}
        {shifts}: computed before the recurrence for every step by {name}__shift (their previous values, shifted
        along T, the initial state at each sequence's first step); form, backend, chunk_size, config and check_steps
        are those of {inner} (see its layer), which runs the rest with them as inputs.
        """
        return self._call(args, dict(inputs, initial_state=initial_state, output_final_state=output_final_state,
                                     cu_seqlens=cu_seqlens, reverse=reverse), form, backend, chunk_size, config,
                          check_steps)


{name} = _{cls}Layer(_{name}_spec, {inner}, {name}__shift)


''' + module_class(analysis, analysis.inner)
