"""Specialise the Triton runtime's kernels in a generated module to the constexpr flags its plans fix.

The chunked Triton kernels are one family switched by `tl.constexpr` flags, as in fla's `ops/common`:

  DECAY      0 none, 1 scalar, 2 key, 3 value   the decay axis of the state's chunk plan
  DELTA      True for a rank-one (delta rule) update, False for a linear one
  EXCLUSIVE  whether a readout reads the state before its own step (output kernels only)
  DPLR       True for the diagonal-plus-rank-one class (a second key / value pair in the delta state and output
             kernels), False for every other
  SPANS      True only in the linear class's forward with a key decay (the kernels sum the raw log decays over
             the steps each factor spans); False everywhere else

The generated module launches these kernels only through the decay class its chunk plan names
(`triton_chunked_linear_by(triton_KeyDecay, ...)`, see codegen/triton_runtime.py), so over the whole module each
flag takes only the values its plans give. `specialize` removes, on the AST of each `@triton.jit` function of the
Triton runtime, the `if` / `elif` / `else` branches that no such value can take, and hoists a branch that every
value takes: `if DECAY == 2: A else: B` becomes `A` in a key-decay module. The kernel's signature and its call
sites stay as they are (the flag is still passed and still a constexpr), so specialising changes no result; it
only leaves out code that cannot run, which keeps a module to what its layer runs (tests/test_module_coverage.py).

The same folding applies to the runtime's host-side (Python) functions, on two facts of the module: the decay
codes of its plans (`decay_cls.code`, the class the printed call names) and the fused prologue and epilogue keywords
its printed calls pass (`v_step`, `decay_head`, `skip`, `skip_weight`, `q_map`, `k_map`, `v_step_map`,
`log_decay_map`, `b_map`, `bonus` of `_Fused`, and the step check's `unsafe`): one no call
passes is None in every runtime function (the variable of that name, or any `x.v_step` attribute), and the kernels'
VSTEP, HEAD and SKIP flags are False; and without a skip weight per step (`skip_per_step`) the kernels' SKIP_STEP
and `_Fused.skip_step` are False. So a spec without a fused per-head decay keeps no `_unfuse` branch for one, a
module without a decay no cumulative-sum kernel, and one without a prologue map (every spec but normalized linear
attention's and HGRN2's) none of the map checks (`_check_map`).

Only tests of the form `FLAG`, `not FLAG`, `FLAG == constant`, `FLAG != constant`, `x is None`, `x is not None`
(FLAG and x a name or an attribute with a known value) and their `and` / `or` are decided; any other test is kept
whole. Comments and layout of the kept lines are preserved (the edits are made
on the text, at the lines the AST gives).
"""

from __future__ import annotations

import ast
import functools

from recurrence_dsl.analysis import Analysis, TransitionClass

from .kernel_rules import _is_triton_jit
from .source_units import Unit, joined, units_of
from .triton_recurrent import triton_form_names

_DECAY_CODES = {None: 0, "scalar": 1, "key": 2, "value": 3}  # the `code` of the runtime's decay classes
_RUNTIME_PREFIX = "_triton_"  # the Triton runtime's kernels as renamed in a generated module


# The linear chunked form's Triton backward (codegen/triton_runtime.py, `_linear_backward`) launches two forward
# kernels with decay codes other than its plan's: the intra-chunk scores with a per-channel decay and with none
# (2 and 3) for a key or value decay, with none (3) for a scalar or no decay (whose kernels apply a scalar decay to
# the plain scores themselves), and for a value decay dq through the key-decay output kernel (2). Those kernels keep
# the branches for these codes; every other kernel keeps only its plans' own.
_LINEAR_BACKWARD_DECAYS = {
    "_intra_attn_kernel": lambda axis: {2, 3} if axis in ("key", "value") else {3},
    "_chunk_output_kernel": lambda axis: {2} if axis == "value" else set(),
}


# The delta-rule chunk plans whose Triton runtime call (`chunked_delta_by`) is differentiable on its own:
# (transition class, decay axis). Every linear plan (`chunked_linear_by`: identity, scalar or diagonal decay) is.
# A rank-r update runs as the delta rule over its interleaved updates (torch_forms, `_write_rank_r`).
_DELTA_BACKWARD_IN_TRITON = frozenset({(cls, axis) for cls in (TransitionClass.RANK_ONE_UPDATE,
                                                              TransitionClass.RANK_R_UPDATE)
                                       for axis in (None, "scalar", "key")})


def chunked_backward_in_triton(analysis: Analysis) -> bool:
    """True when `analysis` has a chunked Triton form whose runtime calls all carry their own Triton backward
    (autograd.Functions in codegen/triton_runtime.py): every state of its chunk plan linear (`chunked_linear_by`), or
    a delta rule with a decay in `_DELTA_BACKWARD_IN_TRITON`. Such a form is differentiable on its own; any other is
    differentiated by re-running its torch form (`with_torch_backward`)."""
    if "chunked" not in triton_form_names(analysis):
        return False
    view = analysis.chunk_analysis

    def in_triton(plan) -> bool:
        if plan.cls in (TransitionClass.RANK_ONE_UPDATE, TransitionClass.RANK_R_UPDATE,
                        TransitionClass.DIAGONAL_PLUS_RANK_ONE):
            return (plan.cls, plan.chunk.decay_axis) in _DELTA_BACKWARD_IN_TRITON
        return True

    return all(in_triton(view.states[s.name]) for s in analysis.recurrence.states)


# The chunk plans whose Triton runtime call takes `cu_seqlens` (packed sequences in the kernels, `_Packed` in
# codegen/triton_runtime.py): every linear plan (`chunked_linear_by`), and the delta-rule plans of
# `_DELTA_BACKWARD_IN_TRITON` (`chunked_delta_by`). Not the DPLR class, whose chunked Triton form trains on the derived
# adjoint, which runs each sequence on its own.
_PACKED_IN_TRITON = frozenset({TransitionClass.IDENTITY, TransitionClass.SCALAR, TransitionClass.DIAGONAL_ROW,
                               TransitionClass.DIAGONAL_COL})


def chunked_packed_in_triton(analysis: Analysis) -> bool:
    """True when `analysis` has a chunked Triton form whose runtime calls all take `cu_seqlens`, so the form runs
    every packed sequence in one set of launches (codegen/dispatch.py `takes_cu_seqlens`)."""
    if "chunked" not in triton_form_names(analysis):
        return False
    view = analysis.chunk_analysis

    def packed(plan) -> bool:
        return plan.cls in _PACKED_IN_TRITON or (plan.cls, plan.chunk.decay_axis) in _DELTA_BACKWARD_IN_TRITON

    return all(packed(view.states[s.name]) for s in analysis.recurrence.states)


def backward_flags(analyses: list[Analysis]) -> dict[str, dict[str, frozenset]]:
    """Runtime kernel name -> flag -> the values the Triton backward of `analyses`' chunked forms adds to
    `plan_flags` for that kernel only (`_LINEAR_BACKWARD_DECAYS`)."""
    extra: dict[str, set] = {}
    for a in analyses:
        if not chunked_backward_in_triton(a):
            continue
        view = a.chunk_analysis
        for s in a.recurrence.states:
            for kernel, codes in _LINEAR_BACKWARD_DECAYS.items():
                extra.setdefault(kernel, set()).update(codes(view.states[s.name].chunk.decay_axis))
    return {kernel: {"DECAY": frozenset(codes)} for kernel, codes in extra.items() if codes}


def plan_flags(analyses: list[Analysis]) -> dict[str, frozenset]:
    """The values each kernel flag takes over the chunked Triton forms of `analyses` (empty: no such form)."""
    decay, delta, exclusive, dplr = set(), set(), set(), set()
    spans = {False}  # the default, and every backward's
    for a in analyses:
        if "chunked" not in triton_form_names(a):
            continue
        view = a.chunk_analysis
        for s in a.recurrence.states:
            sa = view.states[s.name]
            code = _DECAY_CODES[sa.chunk.decay_axis]
            decay.add(code)
            is_delta = sa.cls in (TransitionClass.RANK_ONE_UPDATE, TransitionClass.RANK_R_UPDATE)
            delta.add(is_delta)
            exclusive.update(bool(r.exclusive) for r in sa.chunk.readouts)
            dplr.add(sa.cls is TransitionClass.DIAGONAL_PLUS_RANK_ONE)
            # Only the linear class's forward with a key decay sums its log decays over spans (`_linear_forward`).
            spans.add(code == 2 and not is_delta and sa.cls is not TransitionClass.DIAGONAL_PLUS_RANK_ONE)
    return {"DECAY": frozenset(decay), "DELTA": frozenset(delta), "EXCLUSIVE": frozenset(exclusive),
            "DPLR": frozenset(dplr), "SPANS": frozenset(spans)}


# The keywords of the runtime's fused prologue and epilogue (`_Fused` in codegen/triton_runtime.py) that are None
# when a call leaves them out, and the kernel flag each one sets (`x is not None` at the launch). `scale` is not
# here: left out it is 1.0, and the name means other things in other runtime functions.
_FUSED_FLAGS = {"v_step": "VSTEP", "decay_head": "HEAD", "skip": "SKIP", "skip_weight": None, "q_map": None,
                "k_map": None, "v_step_map": None, "log_decay_map": None, "b_map": None, "bonus": "BONUS",
                "unsafe": None}
# The kernels' map arguments (constexpr helpers, None when the call passes no map) set by the map keywords above that
# only some modules pass (mLSTM's scalar maps, RWKV-7's b): None in every kernel of a module whose calls leave them
# out.
_MAP_FLAGS = {"log_decay_map": ("GMAP", "GVJP", "CHECK"), "v_step_map": ("VSMAP",), "b_map": ("BMAP", "KMAP2")}
_RUNTIME_ENTRIES = ("chunked_linear_by", "chunked_delta_by", "chunked_dplr_by")  # the calls taking fused keywords


def fused_keywords(printed: str) -> frozenset[str]:
    """The fused keywords (`_FUSED_FLAGS`) that the printed forms' source `printed` passes to the runtime's chunked
    entry points. A `**options` argument is a call's form options (block sizes, `layer.CONFIG_KEYS`), never a fused
    keyword."""
    used = set()
    for node in ast.walk(ast.parse(printed)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id.endswith(_RUNTIME_ENTRIES)):
            used.update(kw.arg for kw in node.keywords if kw.arg in _FUSED_FLAGS)
    return frozenset(used)


def skip_per_step(printed: str) -> bool:
    """True when a call of the runtime's chunked entry points in the printed forms' source `printed` may pass a skip
    weight per step ([B, T, H]: `_Fused.skip_step`, the kernels' SKIP_STEP). The printer passes a per-head weight
    (Mamba2's D) as the spec's param, an argument of the printed function, and a per-step one (RWKV-6's bonus) as a
    value its prologue computes: a `skip_weight` that is anything but an argument of the function around the call
    counts as per step, so an unknown one keeps the branch."""
    tree = ast.parse(printed)
    # innermost function first (ast.walk lists outer ones before inner ones): a call is judged by its own function's
    # arguments
    scopes = [(fn, {a.arg for a in fn.args.args + fn.args.kwonlyargs})
              for fn in reversed(list(ast.walk(tree))) if isinstance(fn, ast.FunctionDef)] + [(tree, set())]
    seen = set()
    for scope, arguments in scopes:
        for node in ast.walk(scope):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id.endswith(_RUNTIME_ENTRIES) and id(node) not in seen):
                seen.add(id(node))
                for kw in node.keywords:
                    if kw.arg == "skip_weight" and not (isinstance(kw.value, ast.Name) and kw.value.id in arguments):
                        return True
    return False


def runtime_facts(analyses: list[Analysis], fused: frozenset[str], per_step: bool = True) -> dict[str, frozenset]:
    """What the runtime's host-side functions can see in a module of `analyses` whose printed calls pass the fused
    keywords `fused`: `decay_cls.code` (the plans' decay codes), None for each fused keyword left out (the name,
    and `.name` for the attribute on any object), and False for `skip_step` (`_Fused.skip_step`, and the name)
    unless `per_step` (`skip_per_step`)."""
    facts = {}
    codes = plan_flags(analyses)["DECAY"]
    if codes:
        facts["decay_cls.code"] = codes
    for name in _FUSED_FLAGS:
        if name not in fused:
            facts[name] = facts["." + name] = frozenset({None})
    if not per_step:
        facts["skip_step"] = facts[".skip_step"] = frozenset({False})
    return facts


def specialize(text: str, analyses: list[Analysis], printed: str | None = None) -> str:
    """`text` (a generated module) with the runtime's never-taken branches removed: the kernels' flag branches, and
    with `printed` (the source of the module's printed forms, which make its runtime calls) the host-side
    functions' branches on the decay code and on the fused keywords those calls leave out (`runtime_facts`)."""
    return joined(specialize_units(units_of(text), analyses, printed))


def specialize_units(units: list[Unit], analyses: list[Analysis], printed: str | None = None) -> list[Unit]:
    """`specialize` on a module's units (codegen/source_units.py): the units of the functions it folds replaced."""
    flags = dict(plan_flags(analyses))
    facts, skip = None, frozenset()
    if printed is not None:
        fused = fused_keywords(printed)
        per_step = "skip_weight" in fused and skip_per_step(printed)
        if flags["DECAY"]:  # a chunked Triton form exists: its kernels' fused flags are known too
            flags.update({flag: frozenset({False, name in fused}) for name, flag in _FUSED_FLAGS.items() if flag})
            flags["SKIP_STEP"] = frozenset({False, per_step})
            flags.update({flag: frozenset({False if flag == "CHECK" else None}) for name, names in _MAP_FLAGS.items()
                          if name not in fused for flag in names})
        facts = runtime_facts(analyses, fused, per_step)
        skip = frozenset(n for u in units_of(printed) for node in u.nodes for n in _defined_names(node))
    units = _specialize_kernel_units(units, flags, backward_flags(analyses))
    return units if facts is None else _specialize_host_units(units, facts, skip)


def _defined_names(node: ast.stmt) -> list[str]:
    return [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else []


def specialize_host(text: str, facts: dict[str, frozenset], skip: set[str] = frozenset()) -> str:
    """Fold the branches that `facts` (an expression's text, or `.attr` for that attribute on any object -> the
    values it can take) decide in the runtime's top-level host-side functions (named `triton_...` or `_triton_...`,
    not `@triton.jit`, not in `skip`: the printed forms' own)."""
    return joined(_specialize_host_units(units_of(text), facts, frozenset(skip)))


def _specialize_host_units(units, facts: dict[str, frozenset], skip: frozenset[str]) -> list[Unit]:
    key = _frozen(facts)
    out = []
    for unit in units:
        fn = unit.function
        if (fn is not None and fn.name.startswith((_RUNTIME_PREFIX, _RUNTIME_PREFIX[1:]))
                and not _is_triton_jit(fn) and fn.name not in skip):
            unit = _folded_unit(unit, key)
        out.append(unit)
    return out


def specialize_kernels(text: str, flags: dict[str, frozenset],
                       extra: dict[str, dict[str, frozenset]] | None = None) -> str:
    """Fold the branches on `flags` (name -> the values it can take) in the Triton runtime's jit functions;
    `extra`: runtime kernel name (as in codegen/triton_runtime.py) -> flag -> more values that kernel takes."""
    return joined(_specialize_kernel_units(units_of(text), flags, extra))


def _specialize_kernel_units(units, flags: dict[str, frozenset],
                             extra: dict[str, dict[str, frozenset]] | None = None) -> list[Unit]:
    flags = {name: values for name, values in flags.items() if values}
    if not flags:
        return list(units)
    extra = extra or {}
    out = []
    for unit in units:
        fn = unit.function
        if fn is not None and fn.name.startswith(_RUNTIME_PREFIX) and _is_triton_jit(fn):
            constexpr = _constexpr_arguments(fn)
            more = extra.get(fn.name[len(_RUNTIME_PREFIX) - 1:], {})  # `_triton_x_kernel` -> `_x_kernel`
            known = {name: values | more.get(name, frozenset()) for name, values in flags.items() if name in constexpr}
            if known:
                unit = _folded_unit(unit, _frozen(known))
        out.append(unit)
    return out


def _constexpr_arguments(fn: ast.FunctionDef) -> set[str]:
    return {a.arg for a in fn.args.args if a.annotation is not None and ast.unparse(a.annotation) == "tl.constexpr"}


def _frozen(known: dict[str, frozenset]) -> tuple:
    return tuple(sorted(known.items()))


@functools.lru_cache(maxsize=4096)
def _folded_unit(unit: Unit, known: tuple) -> Unit:
    """The function unit `unit` with `_fold_function` applied to its lines from the `def` on (its decorators kept);
    cached, as the runtime's units and a module's flags repeat from module to module."""
    lines = unit.text.splitlines()
    start = unit.function.lineno - 1  # the decorators' lines stay as they are
    new = lines[:start] + _fold_function(lines[start:], dict(known))
    if new == lines:
        return unit
    return units_of("\n".join(new) + ("\n" if unit.text.endswith("\n") else ""))[0]


def _values(node: ast.expr, known: dict[str, frozenset]) -> frozenset | None:
    """The values `known` gives the name or attribute `node` (by its text, else `.attr` for an attribute), or None."""
    if isinstance(node, ast.Name):
        return known.get(node.id)
    if isinstance(node, ast.Attribute):
        return known.get(ast.unparse(node), known.get("." + node.attr))
    return None


def _truth(test: ast.expr, known: dict[str, frozenset]) -> bool | None:
    """True / False when every value of the known flags decides `test`, else None."""
    values = _values(test, known) if isinstance(test, (ast.Name, ast.Attribute)) else None
    compared = (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.comparators[0], ast.Constant)
                and _values(test.left, known))
    if values is not None:
        outcomes = {bool(v) for v in values}
    elif isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        inner = _truth(test.operand, known)
        return None if inner is None else not inner
    elif compared and isinstance(test.ops[0], (ast.Eq, ast.NotEq)):
        c = test.comparators[0].value
        outcomes = {(v == c) == isinstance(test.ops[0], ast.Eq) for v in compared}
    elif compared and isinstance(test.ops[0], (ast.Is, ast.IsNot)) and test.comparators[0].value is None:
        outcomes = {(v is None) == isinstance(test.ops[0], ast.Is) for v in compared}
    elif isinstance(test, ast.BoolOp):
        parts = [_truth(v, known) for v in test.values]
        stop = isinstance(test.op, ast.Or)  # the value that decides the whole
        if stop in parts:
            return stop
        return None if None in parts else not stop
    else:
        return None
    return outcomes.pop() if len(outcomes) == 1 else None


def _fold_function(lines: list[str], known: dict[str, frozenset]) -> list[str]:
    """Fold one if-chain at a time (outermost first) until no chain changes."""
    while True:
        tree = ast.parse("\n".join(lines))
        found = _first_foldable(tree.body[0].body, lines, known)
        if found is None:
            return lines
        node, new = found
        lines[node.lineno - 1:node.end_lineno] = new


def _chain(node: ast.If, lines: list[str]) -> tuple[list[ast.If], list]:
    """An if / elif / ... chain as ([branch nodes], else body)."""
    branches = [node]
    while (len(node.orelse) == 1 and isinstance(node.orelse[0], ast.If)
           and lines[node.orelse[0].lineno - 1].lstrip().startswith("elif")):
        node = node.orelse[0]
        branches.append(node)
    return branches, node.orelse


def _first_foldable(body: list[ast.stmt], lines: list[str], known) -> tuple[ast.If, list[str]] | None:
    """The first if-chain in `body` (outermost first) that folding changes, with its new lines."""
    for stmt in body:
        if isinstance(stmt, ast.If):
            new = _folded(stmt, body, lines, known)
            if new != lines[stmt.lineno - 1:stmt.end_lineno]:
                return stmt, new
            branches, orelse = _chain(stmt, lines)
            blocks = [b.body for b in branches] + [orelse]
        else:
            blocks = [getattr(stmt, field) for field in ("body", "orelse", "finalbody") if hasattr(stmt, field)]
        for block in blocks:
            if block and isinstance(block, list):
                found = _first_foldable(block, lines, known)
                if found is not None:
                    return found
    return None


def _assignments(known: dict[str, frozenset]) -> list[dict[str, frozenset]]:
    """Every combination of the flags' values, each flag as a one-value set."""
    out = [{}]
    for name, values in known.items():
        out = [{**a, name: frozenset({v})} for a in out for v in sorted(values, key=repr)]
    return out


def _folded(node: ast.If, siblings: list, lines: list[str], known) -> list[str]:
    """The lines that replace the if-chain `node`: the branches some combination of flag values takes, each
    tested as before, except that a branch every combination reaching it takes becomes the chain's `else`."""
    branches, orelse = _chain(node, lines)
    spans = []  # per branch: (first line, first body line, end), 0-based, end exclusive
    for i, branch in enumerate(branches):
        if i + 1 < len(branches):
            end = branches[i + 1].lineno - 1
        elif orelse:
            end = next(n for n in range(orelse[0].lineno - 2, branch.body[-1].end_lineno - 1, -1)
                       if lines[n].lstrip().startswith("else"))
        else:
            end = node.end_lineno
        spans.append((branch.lineno - 1, branch.body[0].lineno - 1, end))
    taken = [False] * len(branches)
    always = [True] * len(branches)  # true for every combination that reaches it
    reaches_else = False
    for assignment in _assignments(known):
        for i, branch in enumerate(branches):
            truth = _truth(branch.test, assignment)
            always[i] = always[i] and truth is True
            if truth is not False:
                taken[i] = True
            if truth is True:
                break
        else:
            reaches_else = True
    kept, final = [], None
    for i, (start, body_start, end) in enumerate(spans):
        if not taken[i]:
            continue
        if always[i]:
            final = (body_start, end)
            break
        kept.append((start, body_start, end))
    else:
        if orelse and reaches_else:
            final = (spans[-1][2] + 1, node.end_lineno)
    indent = " " * node.col_offset
    if not kept:
        if final is None:
            return [indent + "pass"] if len(siblings) == 1 else []
        shift = node.body[0].col_offset - node.col_offset
        return [_dedent(line, shift) for line in lines[final[0]:final[1]]]
    out = []
    for i, (start, body_start, end) in enumerate(kept):
        header = lines[start:body_start]
        first = header[0].lstrip()
        first = first[first.index(" "):] if first.startswith(("if ", "elif ")) else first
        out += [indent + ("if" if i == 0 else "elif") + first] + header[1:] + lines[body_start:end]
    if final is not None:
        header = lines[final[0] - 1].lstrip()  # the `else:` line itself keeps its comment; a hoisted branch's does not
        out += [indent + (header if header.startswith("else") else "else:")] + lines[final[0]:final[1]]
    return out


def _dedent(line: str, n: int) -> str:
    spaces = len(line) - len(line.lstrip(" "))
    return line[min(n, spaces):]
