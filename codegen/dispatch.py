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


def pick_form(forms, length: int, chunk_size: int) -> str:
    """The form `auto` runs for a sequence of `length` steps, given the forms a recurrence has."""
    if length <= 16 or len(forms) == 1:
        return "recurrent"
    if "parallel" in forms and length <= chunk_size:
        return "parallel"
    if "chunked" in forms:
        return "chunked"
    return "scan" if "scan" in forms else "recurrent"


def run_forms(spec, form_fns: dict, call, form: str, chunk_size: int, options: dict | None = None):
    """`(output, final_state)` of `spec` on `call` through `form_fns[form]` ("auto" picks per sequence).

    Each form function takes `(*inputs, *params, states, *sizes, **extra)` in the compute dtype and
    returns `(outputs: dict, final_states: dict)`. Packed sequences (`cu_seqlens`) run one by one; with
    `call.reverse` each sequence runs from its last step to its first.
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

    def call_form(chosen: str, piece: dict, piece_states: dict, length: int):
        extra = dict(options.get(chosen, {}))
        if chosen == "chunked":
            extra["chunk_size"] = chunk_size
        elif chosen == "parallel":
            extra["chunk_size"] = max(length, 1)
        ordered = [piece[i.name] for i in spec.inputs]
        return form_fns[chosen](*ordered, *params, piece_states, *sizes, **extra)

    def run(piece: dict, piece_states: dict, length: int):
        chosen = pick_form(tuple(form_fns), length, chunk_size) if form == "auto" else form
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

    def run_directed(piece: dict, piece_states: dict, length: int):
        if not call.reverse:
            return run(piece, piece_states, length)
        # A reverse run is the forward run on the time-flipped sequence, its outputs flipped back: every form
        # (and its backward, through the flips) serves both directions. Under cu_seqlens each piece is one
        # sequence, so each is flipped on its own.
        out, fin = run({k: v.flip(1) for k, v in piece.items()}, piece_states, length)
        return {k: v.flip(1) for k, v in out.items()}, fin

    if call.cu_seqlens is None:
        outputs, finals = run_directed(inputs, states, call.length)
    else:
        bounds = call.cu_seqlens.tolist()
        out_pieces, final_pieces = [], []
        for n in range(len(bounds) - 1):
            lo, hi = bounds[n], bounds[n + 1]
            piece = {k: v[:, lo:hi] for k, v in inputs.items()}
            o, f = run_directed(piece, {k: v[n : n + 1] for k, v in states.items()}, hi - lo)
            out_pieces.append(o)
            final_pieces.append(f)
        outputs = {o.name: torch.cat([p[o.name] for p in out_pieces], dim=1) for o in spec.outputs}
        finals = {s.name: torch.cat([f[s.name] for f in final_pieces], dim=0) for s in spec.states}
    outputs = {k: v.to(call.dtype) for k, v in outputs.items()}
    return pack_result(spec, outputs, finals if call.output_final_state else None)  # noqa: F821 - from calling.py


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


# How many consecutive steps' input and param gradients the derived backward computes at once (on slices of its
# segment buffers, time-major), as soon as its reverse loop has passed them: a positive number forces it; unset or 0:
# on CPU as many steps as keep the block's states and their gradients within BLOCK_BYTES, at least 1 and at most a
# segment; on a GPU a whole segment (each call is a kernel launch). Measured on a 2-core EPYC (1 MiB L2 per core,
# 32 MiB L3), fwd+bwd of GLA and DeltaNet, B=2, H=4: at K=V=64 (128 KiB states) blocks of 16-64 steps were
# fastest, at K=V=128 (512 KiB) blocks of 2-4, slower beyond: large blocks fall out of cache.
ADJOINT_BLOCK = "RECURRENCE_DSL_ADJOINT_BLOCK"
BLOCK_BYTES = 4 << 20


def adjoint_block(states, every: int) -> int:
    """Steps per block of the derived backward's gradients for states like `states` ([B, H, ...] each)."""
    forced = int(os.environ.get(ADJOINT_BLOCK, "0") or 0)
    if forced > 0:
        return forced
    states = list(states)
    if not all(s.device.type == "cpu" for s in states):
        return every
    step_bytes = 2 * sum(s.numel() * s.element_size() for s in states)  # the states and their total gradients
    return max(1, min(every, BLOCK_BYTES // max(step_bytes, 1)))


def checkpoint_every(length: int) -> int:
    """Steps between the checkpoints of a sequence of `length` steps: memory O(T / every + every) states."""
    every = int(os.environ.get(CHECKPOINT_EVERY, "0") or 0)
    return every if every > 0 else max(64, math.isqrt(length))


class _AdjointBackward(torch.autograd.Function):
    """The recurrent form under autograd: forward through the step loop, keeping only the inputs and a checkpoint
    of the states every `every` steps; backward through the adjoint derived from the spec (printed beside the
    loop by codegen/torch_forms.py), which recomputes each segment's states from its checkpoint."""

    @staticmethod
    def forward(ctx, loop, adjoint, layout, names, every, kernels, *tensors):
        args = _unflatten(layout, tensors)
        outputs, finals, checkpoints = loop(*args, every=every)
        results = [outputs[n] for n in names[0]] + [finals[n] for n in names[1]]
        # A final state that is the initial one (no steps) leaves as a copy: an output of this function.
        results = [r.clone() if any(r is t for t in tensors) else r for r in results]
        ctx.adjoint, ctx.layout, ctx.names, ctx.every, ctx.kernels = adjoint, layout, names, every, kernels
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
        # (A Triton adjoint is one kernel: it has no blocks to choose.)
        extra = {} if ctx.kernels else {"block": adjoint_block(grad_states.values(), ctx.every)}
        positional, state_grads = ctx.adjoint(*args[:at], checkpoints, grad_outputs, grad_states, *args[at + 1:],
                                              every=ctx.every, **extra)
        positional = iter(positional)
        flat_grads = []
        for kind, info in ctx.layout:
            if kind == "tensor":
                flat_grads.append(next(positional))
            elif kind == "dict":
                flat_grads.extend(state_grads[k] for k in info)
        needed = ctx.needs_input_grad[6:]
        return (None,) * 6 + tuple(g if need else None for g, need in zip(flat_grads, needed))


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
                                      kernels, *tensors)
        n = len(names[0])
        return dict(zip(names[0], flat[:n])), dict(zip(names[1], flat[n:]))

    return run


if "pack_result" not in globals():  # imported as a package module rather than copied beside calling.py
    from recurrence_dsl.calling import pack_result  # noqa: E402
