"""Shift states: states whose previous value is a shift of the inputs along T, split off the recurrence.

A state `x` is a shift state when its value after a step reads no state's previous value but other shift
states' (`klast[i] = k[i]`, a cache of the last key as in RWKV's token shift; `x2 = x1; x1 = x`, the window of a
short causal convolution), composed through the reads of other states' new values. Its new value is then a
function of the step's inputs, params and the previous values of other shift states, and its previous value at
step t, the value the body reads before the update, is that function at step t - 1 (the initial state at the
first step): computable for every step at once, before the recurrence runs, by evaluating the function on
whole [B, T, H, ...] tensors and shifting the result one step along T (`ShiftPlan.states` in an order where
each reads only earlier ones' previous values; a chain of reads forming a cycle is no shift).

`split_shift_states` splits the step into the shift plan and the rest: a recurrence (`ShiftPlan.inner`, checked
as any spec) in which each shift state is an input holding its previous value, and its assignments are
temporaries (kept only where the rest reads the value after an assignment). The rest then has the transition
classes and forms of its own states: a linear attention beside a key cache keeps its chunked form.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from .check import CheckedRecurrence
from .errors import SpecError
from .printing import SpecPrinter
from .step_ir import NEW_SUFFIX, Definition, StepIR


@dataclass(frozen=True)
class ShiftState:
    """One shift state: `value` is its value after a step (`name[indices] = expr`), in terms of the step's
    inputs, params, sizes and the previous values of the shift states `reads` (read as their own names)."""

    name: str
    dims: tuple
    value: Definition
    reads: tuple[str, ...]


@dataclass(frozen=True)
class ShiftPlan:
    """The shift states (in an order where each reads only earlier ones), the ranges of `value`'s index symbols,
    and the rest of the recurrence (`inner`): the recurrence's inputs followed by one input per shift state whose
    previous value it reads (`read`, in the order of the recurrence's states), named as the state, holding that
    value ([B, T, H, *dims]). A shift state read only after its update is a temporary of the rest."""

    states: tuple[ShiftState, ...]
    ranges: dict
    inner: CheckedRecurrence
    read: tuple[str, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.states)


def _base(node) -> str | None:
    if isinstance(node, sympy.Indexed):
        return str(node.base)
    if isinstance(node, sympy.Symbol):
        return node.name
    return None


def _state_reads(expr: sympy.Expr, states: set[str]) -> set[str]:
    """The states whose previous value `expr` reads."""
    return {b for node in sympy.preorder_traversal(expr) if (b := _base(node)) in states}


def _composed(ir: StepIR, expr: sympy.Expr, states: set[str]) -> sympy.Expr:
    """`expr` with every read of a state's new value replaced by that state's update (recursively)."""
    for _ in range(len(states) + 1):
        news = [n for n in sympy.preorder_traversal(expr)
                if (b := _base(n)) is not None and b.endswith(NEW_SUFFIX) and b.removesuffix(NEW_SUFFIX) in states]
        if not news:
            return expr
        mapping = {}
        for n in news:
            update = ir.updates[_base(n).removesuffix(NEW_SUFFIX)]
            indices = tuple(n.indices) if isinstance(n, sympy.Indexed) else ()
            mapping[n] = update.expr.xreplace(dict(zip(update.indices, indices)))
        expr = expr.xreplace(mapping)
    return expr


def find_shift_states(rec: CheckedRecurrence, ir: StepIR) -> tuple[ShiftState, ...]:
    """The shift states of `rec`, in an order where each reads only earlier ones' previous values."""
    names = [s.name for s in rec.states]
    all_states = set(names)
    values = {n: _composed(ir, ir.updates[n].expr, all_states) for n in names}
    reads = {n: _state_reads(values[n], all_states) for n in names}
    shift = {n for n in names if n not in reads[n]}
    while True:  # drop those reading a state that is not a shift state, until none does
        drop = {n for n in shift if not reads[n] <= shift}
        if not drop:
            break
        shift -= drop
    order: list[str] = []
    placed: set[str] = set()
    while True:  # topological order; the members of a cycle of reads never place (x1 = x2; x2 = x1 is no shift)
        ready = [n for n in names if n in shift and n not in placed and reads[n] <= placed]
        if not ready:
            break
        order += ready
        placed |= set(ready)
    dims = {s.name: s.dims for s in rec.states}
    return tuple(ShiftState(n, dims[n], Definition(n, ir.updates[n].indices, values[n]),
                            tuple(sorted(reads[n]))) for n in order)


class _ExactPrinter(SpecPrinter):
    """Spec text with every float written as float64 reads it back (no cut to 10 digits)."""

    def _print_Float(self, expr):
        value = float(expr)
        text = repr(value)
        return text if "inf" not in text else ("1e999" if value > 0 else "-1e999")


def _written(expr: sympy.Expr) -> str:
    return _ExactPrinter().doprint(expr)


def _decl(sym) -> str:
    return sym.name + (f"[{', '.join(str(d) for d in sym.dims)}]" if sym.dims else "")


def _fresh(name: str, taken: set[str]) -> str:
    new = f"{name}_new"
    while new in taken:
        new += "_"
    taken.add(new)
    return new


def _read_names(expr: sympy.Expr) -> set[str]:
    return {b for node in sympy.preorder_traversal(expr) if (b := _base(node)) is not None}


def _inner_text(rec: CheckedRecurrence, ir: StepIR, shift: set[str], name: str) -> tuple[str, tuple[str, ...]]:
    """The rest of `rec` as spec text, shift states as inputs and their assignments as temporaries, and the shift
    states it reads the previous value of (its inputs after `rec`'s, in this order)."""
    taken = {s.name for s in rec.inputs + rec.params + rec.states + rec.outputs + rec.temps} | set(rec.sizes)
    current = {n: _fresh(n, taken) for n in sorted(shift)}  # the temporary holding a shift state after an assignment
    lines: list[tuple[str, tuple, sympy.Expr]] = []
    assigned: set[str] = set()
    for stmt in ir.statements:
        # (the step IR writes a read after a state's last assignment as S__new, one between two as S)
        rename = {}
        for s in rec.states:
            now = current[s.name] if s.name in shift else s.name
            rename[sympy.IndexedBase(s.name + NEW_SUFFIX)] = sympy.IndexedBase(now)
            rename[sympy.Symbol(s.name + NEW_SUFFIX)] = sympy.Symbol(now)
        for n in assigned:
            rename[sympy.IndexedBase(n)] = sympy.IndexedBase(current[n])
            rename[sympy.Symbol(n)] = sympy.Symbol(current[n])
        expr = stmt.expr.xreplace(rename)
        target = stmt.name
        if target in shift:
            assigned.add(target)
            target = current[target]
        lines.append((target, stmt.indices, expr))
    # Keep what the outputs and the other states' last values need (backwards: a value is needed until assigned).
    needed = {o.name for o in rec.outputs} | {s.name for s in rec.states if s.name not in shift}
    kept = []
    for target, indices, expr in reversed(lines):
        if target in needed:
            kept.append((target, indices, expr))
            needed.discard(target)
            needed |= _read_names(expr)
    kept.reverse()
    read = tuple(s.name for s in rec.states if s.name in shift and s.name in needed)  # (read before assigned)
    inputs = [_decl(s) for s in rec.inputs] + [_decl(rec.symbol(n)) for n in read]
    body = [f"    param {_decl(p)}" for p in rec.params]
    body += [f"    state {_decl(s)}" for s in rec.states if s.name not in shift]
    for target, indices, expr in kept:
        lhs = target + (f"[{', '.join(i.name for i in indices)}]" if indices else "")
        body.append(f"    {lhs} = {_written(expr)}")
    head = ("reverse " if rec.reverse else "") + f"recurrence {name}({', '.join(inputs)}) -> "
    head += ", ".join(_decl(o) for o in rec.outputs) + " {"
    return "\n".join([head] + body + ["}"]) + "\n", read


def inner_name(rec: CheckedRecurrence) -> str:
    """The name of the recurrence left once the shift states are split off."""
    return f"{rec.name}_unshifted"


def split_shift_states(rec: CheckedRecurrence, ir: StepIR) -> ShiftPlan | None:
    """The shift plan of `rec`, or None when it has no shift state, or only shift states (nothing left to run as a
    recurrence: the body is then compiled as it is)."""
    states = find_shift_states(rec, ir)
    if not states or len(states) == len(rec.states):
        return None
    from .api import load_text  # (api imports the reference, which this module's callers need not)

    text, read = _inner_text(rec, ir, {s.name for s in states}, inner_name(rec))
    filename = f"<{rec.name} without its shift states {', '.join(s.name for s in states)}>"
    try:
        inner = load_text(text, filename)[inner_name(rec)].checked
    except SpecError:  # (a printing the checker refuses: compiled as written, as before shift states)
        return None
    assert [s.name for s in inner.inputs[len(rec.inputs):]] == list(read)
    return ShiftPlan(states, dict(ir.ranges), inner, read)
