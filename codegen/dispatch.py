"""Run a compiled layer's forms on a bound call: dtype, initial states, packed sequences, auto form choice.

Imports only torch and is copied verbatim into generated modules, next to
`recurrence_dsl/calling.py` (whose `BoundCall` and `pack_result` it uses).
"""

from __future__ import annotations

import math
import os

import torch


class DecayNotPositive(ValueError):
    """A chunked form needs log(decay) and the decay is not positive; `auto` then steps instead."""


class UnsafeSteps(Exception):  # noqa: N818 - a signal between a form and the dispatcher, like StopIteration
    """A chunked or parallel form met, at step `step` and not before, a value its masked matmuls cannot take
    exactly (a non-finite value, a log decay > 0 or NaN); the dispatcher runs the steps from there one at a time."""

    def __init__(self, step: int):
        super().__init__(f"step {step} needs the step-by-step form")
        self.step = step


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (float32, float16, bfloat16) computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def triton_options(call, options: dict | None) -> dict:
    """A Triton call's per-form options (`run_forms`' `options`): the chunked form's kernels get the dot precision
    of the call's inputs. `run_forms` hands every form float32 tensors, so the kernels cannot tell a float16 or
    bfloat16 call from a float32 one; for half inputs their tl.dot operands are rounded to tf32 (`allow_tf32`, the
    Triton runtime's default for half inputs: tf32 keeps float16's 10-bit mantissa, more than bfloat16's), which
    runs on tensor cores, where float32 ("ieee") dots run as FMA loops. A config's own `allow_tf32` wins."""
    options = dict(options or {})
    chunked = dict(options.get("chunked", {}))
    chunked.setdefault("allow_tf32", call.dtype in (torch.float16, torch.bfloat16))
    options["chunked"] = chunked
    return options


# Rows from which a batch of short sequences (packed ones of one length) takes a chunked form: the step loop then
# writes rows x length states where a chunk writes rows states (256 x 16 steps of mamba2 on CPU: 5.7x one sequence
# of 4096 steps through the loop, 1.9x through chunks; benchmarks/bench_varlen.py).
BATCHED_ROWS = 8


def pick_form(forms, length: int, chunk_size: int, rows: int = 1) -> str:
    """The form `auto` runs for a sequence of `length` steps, given the forms a recurrence has; rows: how many
    packed sequences of that length run together (`_run_packed`)."""
    if (length <= 16 and rows < BATCHED_ROWS) or len(forms) == 1:
        return "recurrent"
    if "parallel" in forms and length <= chunk_size:
        return "parallel"
    if "chunked" in forms:
        return "chunked"
    return "scan" if "scan" in forms else "recurrent"


def run_forms(spec, form_fns: dict, call, form: str, chunk_size: int, options: dict | None = None):
    """`(output, final_state)` of `spec` on `call` through `form_fns[form]` ("auto" picks per sequence).

    Each form function takes `(*inputs, *params, states, *sizes, **extra)` in the compute dtype and
    returns `(outputs: dict, final_states: dict)`. Packed sequences (`cu_seqlens`) run batched (`_run_packed`);
    with `call.reverse` each sequence runs from its last step to its first.
    `options`: form name -> keyword arguments for that form's function (block sizes, warps of a config).
    """
    options = options or {}
    dtype = compute_dtype(call.dtype)
    inputs = {k: v.to(dtype) for k, v in call.inputs.items()}
    params = [call.params[p.name].to(dtype) for p in spec.params]
    sizes = [call.sizes[s] for s in spec.sizes]
    if call.initial_state is not None:
        states = {k: v.to(dtype) for k, v in call.initial_state.items()}
    else:
        states = {s.name: torch.zeros((call.num_sequences, call.heads) + call.dims(s), dtype=dtype,
                                      device=call.device) for s in spec.states}

    def call_form(chosen: str, piece: dict, piece_states: dict, length: int, **more):
        extra = dict(options.get(chosen, {}), **more)
        if chosen == "chunked":
            extra["chunk_size"] = chunk_size
        elif chosen == "parallel":
            extra["chunk_size"] = max(length, 1)
        ordered = [piece[i.name] for i in spec.inputs]
        return form_fns[chosen](*ordered, *params, piece_states, *sizes, **extra)

    def run(piece: dict, piece_states: dict, length: int, rows: int = 1):
        chosen = pick_form(tuple(form_fns), length, chunk_size, rows) if form == "auto" else form
        try:
            return call_form(chosen, piece, piece_states, length)
        except DecayNotPositive:
            if form != "auto":
                raise
            # The decay is not positive somewhere (say a zero-initialised gamma): step through instead.
            return call_form("recurrent", piece, piece_states, length)
        except UnsafeSteps as unsafe:
            # Steps before `unsafe.step` are exact in the chosen form; from there on, one step at a time as the
            # reference takes them, so a NaN or inf reaches only later steps and a growing decay is right.
            step = unsafe.step
            if step == 0:
                return call_form("recurrent", piece, piece_states, length)
            head_out, head_states = run({k: v[:, :step] for k, v in piece.items()}, piece_states, step)
            tail_out, tail_states = call_form("recurrent", {k: v[:, step:] for k, v in piece.items()}, head_states,
                                              length - step)
            return {k: torch.cat([head_out[k], tail_out[k]], dim=1) for k in tail_out}, tail_states

    def run_directed(piece: dict, piece_states: dict, length: int, rows: int = 1):
        if not call.reverse:
            return run(piece, piece_states, length, rows)
        # A reverse run is the forward run on the time-flipped sequence, its outputs flipped back: every form
        # (and its backward, through the flips) serves both directions. Under cu_seqlens each row of a piece is
        # one sequence (all of one length), so each is flipped on its own.
        out, fin = run({k: v.flip(1) for k, v in piece.items()}, piece_states, length, rows)
        return {k: v.flip(1) for k, v in out.items()}, fin

    if call.cu_seqlens is None:
        outputs, finals = run_directed(inputs, states, call.length)
    else:
        outputs, finals = _run_packed(spec, form_fns, call, form, chunk_size, inputs, states, run_directed,
                                      call_form)
    outputs = {k: v.to(call.dtype) for k, v in outputs.items()}
    return pack_result(spec, outputs, finals if call.output_final_state else None)  # noqa: F821 - from calling.py


def takes_cu_seqlens(fn):
    """Mark the form function `fn` as one that runs packed sequences itself, given `cu_seqlens=` (the call's int64
    [N + 1] boundaries, checked, on the CPU) with [1, T, H, ...] inputs and [N, H, ...] states (the chunked Triton
    forms of linear and delta-rule classes: their kernels walk each sequence's chunks through index tables built
    once per call, codegen/triton_runtime.py `_Packed`). Returns `fn`, whose `run_packed` is `_run_packed_form`
    (an attribute, so a generated module without such a form keeps none of it)."""
    fn.run_packed = _run_packed_form
    return fn


def _run_packed_form(form, call, inputs, states, call_form):
    """(outputs, final states) of every packed sequence of `call` in one call of the chunked form, or None where
    that form meets a step its masked matmuls cannot take (`UnsafeSteps`, whose step counts along the packed T)
    or, under "auto", a decay that is not positive: the batches by length then step through instead.
    A reverse run flips each sequence in place: a permutation of the packed steps that is its own inverse."""
    cu = call.cu_seqlens
    flip = None
    if call.reverse:
        seq = torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1], output_size=call.length)
        flip = (cu[:-1][seq] + cu[1:][seq] - 1 - torch.arange(call.length)).to(call.device)  # a + b - 1 - t
    try:
        piece = {k: v if flip is None else v.index_select(1, flip) for k, v in inputs.items()}
        out, fin = call_form("chunked", piece, states, call.length, cu_seqlens=cu)
    except UnsafeSteps:
        return None
    except DecayNotPositive:
        if form != "auto":
            raise
        return None
    return {k: v if flip is None else v.index_select(1, flip) for k, v in out.items()}, fin


def length_groups(cu_seqlens: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """The packed sequences of `cu_seqlens` (int64 [N + 1] on the CPU) grouped by length: [(length, ids)], ids an
    int64 tensor of the sequences of that length in order, lengths ascending. N sequences in T steps have at most
    sqrt(2 T) + 1 distinct lengths, so this is also a bound on the number of groups."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    values, inverse = torch.unique(lengths, sorted=True, return_inverse=True)
    order = torch.argsort(inverse, stable=True)
    counts = torch.bincount(inverse, minlength=len(values)).tolist()
    return list(zip(values.tolist(), torch.split(order, counts)))


def _run_packed(spec, form_fns, call, form, chunk_size, inputs, states, run_directed, call_form):
    """(outputs [1, T, H, ...], final states [N, H, ...]) of the packed sequences of `call`, batched.

    A chunked form that takes `cu_seqlens` itself (`takes_cu_seqlens`; chosen when `form` is "chunked", or "auto"
    on a backend whose chunked form does) runs once for all sequences (`_run_packed_form`): its launches do not
    grow with N. Otherwise the sequences of each length run as one batch of B = (how many have that length) rows,
    gathered from the packed tensor and scattered back by index (differentiable): no step of one sequence meets
    another's or any padding, so outputs and final states are those of the one-by-one loop for every class,
    linear or not, and a reverse run flips each row on its own. N sequences of T steps make at most sqrt(2 T) + 1
    batches (`length_groups`), each of which "auto" gives the form it would give one sequence of its length."""
    cu = call.cu_seqlens
    runner = getattr(form_fns.get("chunked"), "run_packed", None)  # set by `takes_cu_seqlens`
    if runner is not None and form in ("auto", "chunked") and call.length > 0:
        done = runner(form, call, inputs, states, call_form)
        if done is not None:
            return done
    groups = length_groups(cu)
    starts = cu[:-1]
    out_parts: dict[str, list] = {o.name: [] for o in spec.outputs}
    final_parts: dict[str, list] = {s.name: [] for s in spec.states}
    positions, order = [], []
    for length, ids in groups:
        order.append(ids)
        rows = {k: v.index_select(0, ids.to(v.device)) for k, v in states.items()}
        if length == 0:  # empty sequences: no step, the final state is the initial one
            for name in final_parts:
                final_parts[name].append(rows[name])
            continue
        index = (starts[ids][:, None] + torch.arange(length)[None, :]).reshape(-1)  # [m * length] packed steps
        positions.append(index)
        index = index.to(call.device)
        piece = {k: v[0].index_select(0, index).unflatten(0, (len(ids), length)) for k, v in inputs.items()}
        out, fin = run_directed(piece, rows, length, len(ids))
        for name in out_parts:
            out_parts[name].append(out[name].flatten(0, 1))  # [m * length, H, ...]
        for name in final_parts:
            final_parts[name].append(fin[name])
    # Back to packed order: the groups' steps (and sequences) concatenated are a permutation of the packed ones.
    undo = torch.argsort(torch.cat(positions)).to(call.device) if positions else None
    unsort = torch.argsort(torch.cat(order)).to(call.device)
    outputs = {}
    for o in spec.outputs:
        if undo is None:
            outputs[o.name] = inputs[spec.inputs[0].name].new_zeros((1, 0, call.heads) + call.dims(o))
        else:
            outputs[o.name] = torch.cat(out_parts[o.name]).index_select(0, undo)[None]
    finals = {name: torch.cat(parts).index_select(0, unsort) for name, parts in final_parts.items()}
    return outputs, finals


class _RecomputeBackward(torch.autograd.Function):
    """Forward through a fast form (Triton kernels, no autograd of their own); backward by re-running the
    matching torch form under autograd from the saved inputs, so gradients are exactly the torch form's."""

    @staticmethod
    def forward(ctx, fast, slow, layout, names, *tensors):
        args = _unflatten(layout, tensors)
        with torch.no_grad():
            outputs, finals = fast(*args)
        ctx.slow, ctx.layout = slow, layout
        ctx.save_for_backward(*tensors)
        return tuple(outputs[n] for n in names[0]) + tuple(finals[n] for n in names[1])

    @staticmethod
    def backward(ctx, *grads):
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        with torch.enable_grad():
            outputs, finals = ctx.slow(*_unflatten(ctx.layout, inputs))
            results = list(outputs.values()) + list(finals.values())
        pairs = [(r, g) for r, g in zip(results, grads) if g is not None and r.requires_grad]
        wanted = [t for t in inputs if t.requires_grad]
        if pairs and wanted:
            got = iter(torch.autograd.grad([r for r, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
        else:
            got = iter([None] * len(wanted))
        return (None, None, None, None) + tuple(next(got) if t.requires_grad else None for t in inputs)


def _flatten(args) -> tuple[list, list]:
    """Form arguments (tensors, a states dict, ints) -> (layout, tensors) for an autograd.Function."""
    layout, tensors = [], []
    for a in args:
        if isinstance(a, dict):
            layout.append(("dict", tuple(a)))
            tensors.extend(a.values())
        elif torch.is_tensor(a):
            layout.append(("tensor", None))
            tensors.append(a)
        else:
            layout.append(("value", a))
    return layout, tensors


def _unflatten(layout, tensors) -> list:
    it = iter(tensors)
    args = []
    for kind, info in layout:
        if kind == "dict":
            args.append({k: next(it) for k in info})
        elif kind == "tensor":
            args.append(next(it))
        else:
            args.append(info)
    return args


def with_torch_backward(fast, slow, output_names, state_names):
    """A form function running `fast` forward and differentiating through `slow` (same signature).

    `slow` receives only `chunk_size` of the keyword options (block sizes are the fast form's)."""

    def run(*args, **extra):
        layout, tensors = _flatten(args)
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            return fast(*args, **extra)
        slow_extra = {k: v for k, v in extra.items() if k == "chunk_size"}
        names = (tuple(output_names), tuple(state_names))
        flat = _RecomputeBackward.apply(lambda *a: fast(*a, **extra), lambda *a: slow(*a, **slow_extra), layout,
                                        names, *tensors)
        n = len(names[0])
        return dict(zip(names[0], flat[:n])), dict(zip(names[1], flat[n:]))

    return run


# The recurrent form's backward: "adjoint" (the default) runs the derived adjoint (`with_adjoint`); "autograd"
# runs autograd through the step loop, keeping every step's tensors (the old way, kept to compare against).
RECURRENT_BACKWARD = "RECURRENCE_DSL_RECURRENT_BACKWARD"
# Steps between two checkpoints of the derived backward; unset or 0: max(64, isqrt(T)).
CHECKPOINT_EVERY = "RECURRENCE_DSL_CHECKPOINT_EVERY"


# Where the derived backward computes the inputs' and params' gradients: "1" at each step of its reverse loop, "0"
# for a whole segment at once after it; unset: at each step for CPU states of >= STEPWISE_ELEMENTS numbers (all
# rows and heads together), whose per-step tensors stay in cache where a whole segment's would not; for a whole
# segment otherwise (small states, where per-step calls cost more than the arithmetic, and GPUs, where each call
# is a kernel launch).
ADJOINT_STEPWISE = "RECURRENCE_DSL_ADJOINT_STEPWISE"
STEPWISE_ELEMENTS = 8192


def adjoint_stepwise(states) -> bool:
    forced = os.environ.get(ADJOINT_STEPWISE, "")
    if forced in ("0", "1"):
        return forced == "1"
    states = list(states)
    return (all(s.device.type == "cpu" for s in states)
            and sum(s.numel() for s in states) >= STEPWISE_ELEMENTS)


def checkpoint_every(length: int) -> int:
    """Steps between the checkpoints of a sequence of `length` steps: memory O(T / every + every) states."""
    every = int(os.environ.get(CHECKPOINT_EVERY, "0") or 0)
    return every if every > 0 else max(64, math.isqrt(length))


class _AdjointBackward(torch.autograd.Function):
    """The recurrent form under autograd: forward through the step loop, keeping only the inputs and a checkpoint
    of the states every `every` steps; backward through the adjoint derived from the spec (printed beside the
    loop by codegen/torch_forms.py), which recomputes each segment's states from its checkpoint."""

    @staticmethod
    def forward(ctx, loop, adjoint, layout, names, every, *tensors):
        args = _unflatten(layout, tensors)
        outputs, finals, checkpoints = loop(*args, every=every)
        results = [outputs[n] for n in names[0]] + [finals[n] for n in names[1]]
        # A final state that is the initial one (no steps) leaves as a copy: an output of this function.
        results = [r.clone() if any(r is t for t in tensors) else r for r in results]
        ctx.adjoint, ctx.layout, ctx.names, ctx.every = adjoint, layout, names, every
        ctx.shapes = [(r.shape, r.dtype) for r in results]
        ctx.count = (len(tensors), len(checkpoints))
        ctx.save_for_backward(*tensors, *[c[n] for c in checkpoints for n in names[1]])
        return tuple(results)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        tensors, flat = saved[: ctx.count[0]], saved[ctx.count[0]:]
        out_names, state_names = ctx.names
        per = len(state_names)
        checkpoints = [dict(zip(state_names, flat[n * per:(n + 1) * per])) for n in range(ctx.count[1])]
        # (A loss such as out.sum() sends expanded gradients, which every step's matmul would copy.)
        grads = [g.contiguous() if g is not None else torch.zeros(shape, dtype=dtype, device=tensors[0].device)
                 for g, (shape, dtype) in zip(grads, ctx.shapes)]
        grad_outputs = dict(zip(out_names, grads[: len(out_names)]))
        grad_states = dict(zip(state_names, grads[len(out_names):]))
        args = _unflatten(ctx.layout, tensors)
        at = next(n for n, (kind, _) in enumerate(ctx.layout) if kind == "dict")  # the states
        positional, state_grads = ctx.adjoint(*args[:at], checkpoints, grad_outputs, grad_states, *args[at + 1:],
                                              every=ctx.every, stepwise=adjoint_stepwise(grad_states.values()))
        positional = iter(positional)
        flat_grads = []
        for kind, info in ctx.layout:
            if kind == "tensor":
                flat_grads.append(next(positional))
            elif kind == "dict":
                flat_grads.extend(state_grads[k] for k in info)
        needed = ctx.needs_input_grad[5:]
        return (None,) * 5 + tuple(g if need else None for g, need in zip(flat_grads, needed))


def with_adjoint(loop, adjoint, output_names, state_names, kernels=False):
    """The recurrent form from its printed step loop `loop` (returning outputs, final states and checkpoints)
    and its derived backward `adjoint` (None: none was derived, and autograd runs through the loop). Keyword
    options of a call (a Triton kernel's num_warps) go to the loop only: the backward picks its own.
    kernels: the loop runs Triton kernels, which autograd cannot run through, so RECURRENT_BACKWARD=autograd
    does not apply to it."""
    names = (tuple(output_names), tuple(state_names))

    def run(*args, **extra):
        layout, tensors = _flatten(args)
        if (adjoint is None or not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
                or (not kernels and os.environ.get(RECURRENT_BACKWARD, "adjoint") == "autograd")):
            outputs, finals, _ = loop(*args, **extra)
            return outputs, finals
        forward = (lambda *a, every: loop(*a, every=every, **extra)) if extra else loop
        flat = _AdjointBackward.apply(forward, adjoint, layout, names, checkpoint_every(tensors[0].shape[1]),
                                      *tensors)
        n = len(names[0])
        return dict(zip(names[0], flat[:n])), dict(zip(names[1], flat[n:]))

    return run


if "pack_result" not in globals():  # imported as a package module rather than copied beside calling.py
    from recurrence_dsl.calling import pack_result  # noqa: E402
