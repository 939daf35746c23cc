"""Run a compiled layer's forms on a bound call: dtype, initial states, packed sequences, auto form choice.

Imports only torch and recurrence_dsl.errors' DecayNotPositive, and is copied verbatim (without its imports) into
generated modules, next to `recurrence_dsl/calling.py` (whose `BoundCall` and `pack_result` it uses).
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

from recurrence_dsl.errors import DecayNotPositive  # (a generated module's own import: codegen/module.py `_SUPPORT`)

# The forms whose functions check the values of a call before their masked matmuls (`UnsafeSteps`) and take
# `check_steps=False` to skip that (`run_forms`): the chunked form, and the parallel one that runs its function.
CHECKED_FORMS = ("chunked", "parallel")


class UnsafeSteps(Exception):  # noqa: N818 - a signal between a form and the dispatcher, like StopIteration
    """A chunked or parallel form met, at step `step` and not before, a value its masked matmuls cannot take
    exactly (a non-finite value, a log decay > 0 or NaN); the dispatcher runs the steps from there one at a time."""

    def __init__(self, step: int):
        super().__init__(f"step {step} needs the step-by-step form")
        self.step = step


def autocast_off(device: torch.device):
    """A context with autocast off for `device`'s type, around every form's forward and backward. The forms pick
    their own dtypes (arithmetic in `compute_dtype`, outputs in the call's dtype); under a training script's
    `torch.autocast` their matmuls would run in bfloat16 behind that choice (float32 inputs lose precision) and
    their saved tensors would mix dtypes that a backward outside autocast cannot multiply (a RuntimeError)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (float32, float16, bfloat16) computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def mixed_dtypes(call) -> bool:
    """Whether the call's inputs come in more than one dtype (say a bfloat16 k beside float32 q and v). Such a call
    computes as a call in its widest dtype: every form gets its inputs and params in the compute dtype (float32; a
    float64 first input: float64), also a form that `takes_input_dtype` (whose kernels would otherwise store their
    outputs and intermediates in one input's dtype, k's, and run their dots at the first input's precision), and
    the chunked and parallel kernels' dots run as float32 ("ieee", `triton_options`). Outputs still come back in
    the first input's dtype (`run_forms`)."""
    return len({x.dtype for x in call.inputs.values()}) > 1


def triton_options(call, options: dict | None) -> dict:
    """A Triton call's per-form options (`run_forms`' `options`): the chunked and parallel forms' kernels get the dot
    precision of the call's inputs. `run_forms` hands most forms float32 tensors (all but those that
    `takes_input_dtype`), so their kernels cannot tell a float16 or bfloat16 call from a float32 one; for half
    inputs their tl.dot operands are rounded to tf32 (`allow_tf32`, the Triton runtime's default for half inputs:
    tf32 keeps float16's 10-bit mantissa, more than bfloat16's), which runs on tensor cores, where float32 ("ieee")
    dots run as FMA loops. A call whose inputs mix dtypes (`mixed_dtypes`) computes as a float32 call: "ieee" dots.
    A config's own `allow_tf32` wins."""
    options = dict(options or {})
    half = call.dtype in (torch.float16, torch.bfloat16) and not mixed_dtypes(call)
    for form in ("chunked", "parallel"):
        chosen = dict(options.get(form, {}))
        chosen.setdefault("allow_tf32", half)
        options[form] = chosen
    return options


# The least block size a config may give, per form: the chunked and parallel kernels' blocks are tl.dot operands,
# whose every dimension must be >= 16 on a GPU; the scan's are tl.arange lengths, any power of two.
_LEAST_BLOCK = {"chunked": 16, "parallel": 16}


def _config_value_error(form: str, key: str, value, name_form: bool = True) -> str | None:
    """Why `value` cannot be `key` of a config for `form`, or None (chunk_size is checked by the layer, by the
    chunk_size rule of the backend). Triton takes num_warps a power of two up to 32 (1024 threads a CTA)."""
    if key == "chunk_size":
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        return f"config {key} must be an integer, got {value!r}"
    if key == "num_stages":
        return None if value >= 1 else f"config num_stages must be an integer >= 1, got {value}"
    least = 1 if key == "num_warps" or form not in _LEAST_BLOCK else _LEAST_BLOCK[form]
    if value < least or value & (value - 1) or (key == "num_warps" and value > 32):
        bounds = "from 1 to 32" if key == "num_warps" else f">= {least}"
        # (under auto, name_form False, a form only where the bound is that form's: num_warps' is every form's)
        whose = f" (the {form} form)" if name_form or least > 1 else ""
        return f"config {key} must be a power of two {bounds}, got {value}{whose}"
    return None


def _close(key: str, keys) -> str:
    """' (did you mean 'x'?)' when `key` looks like a misspelling of one of `keys`, else ''."""
    import difflib  # here: a generated module copies this file without its top-level imports

    match = difflib.get_close_matches(key, list(keys), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def config_forms(config, accepted: dict, backend: str, form: str | None) -> dict[str, dict]:
    """form name -> the part of a call's `config=` that form takes, after checking the config; its keys override
    that form's defaults (the form's defaults fill in the keys it does not give).

    accepted: form name -> the keys a config of that form may give on `backend` (codegen.layer.CONFIG_KEYS),
    for the form given or, with form None ("auto"), for every form the layer has there. With a form, every key
    must be one of its keys; with None, each form gets the keys it takes (`{"num_warps": 8}` goes to every form,
    `{"block_k": 16}` to the chunked and parallel ones), so the one auto runs has its share. CallError (from
    calling.py) for a config that is not a dict or is empty, a key no form takes (naming it, the form and its
    keys, with a close match), or a bad value (naming the key and the form)."""
    if not isinstance(config, dict):
        raise CallError(f"config must be a dict of block sizes, got {type(config).__name__}")  # noqa: F821
    accepted = {f: tuple(keys) for f, keys in accepted.items()}
    where = f"on the {backend} backend"
    if not accepted:
        raise CallError(f"no form{' ' + repr(form) if form else ''} takes a config {where}; got "  # noqa: F821
                        f"{sorted(config)}")
    if not config:
        raise CallError("config is empty: give at least one key, or leave config out")  # noqa: F821
    taken = {k for keys in accepted.values() for k in keys}
    valid = "valid keys: " + "; ".join(f"{f} takes {', '.join(keys)}" for f, keys in accepted.items())
    unknown = [k for k in config if k not in taken]
    if unknown:
        key = unknown[0]
        named = f"a key of the {form} form" if form else "taken by any form"
        raise CallError(f"config key {key!r} is not {named} {where}{_close(str(key), taken)}; {valid}")  # noqa: F821
    shares = {f: {k: v for k, v in config.items() if k in keys} for f, keys in accepted.items()}
    shares = {f: share for f, share in shares.items() if share}
    for f, share in shares.items():
        for key, value in share.items():
            why = _config_value_error(f, key, value, name_form=form is not None)
            if why:
                raise CallError(why)  # noqa: F821
    return shares


def _context_variable(name: str):
    """A contextvars.ContextVar named `name`, None by default: per thread (and asyncio task), so calls on two
    threads each see their own."""
    import contextvars  # here rather than at the top: generated modules copy this file without its imports

    return contextvars.ContextVar(name, default=None)


# The form call running now, (recurrence name, form, backend), set by `run_forms` around each form function it
# calls. The forms' autograd Functions keep it from their forward (`ctx.where = _form_call()`), so that a double
# backward through one of them names the call (`_first_order`).
_FORM_CALL = _context_variable("recurrence_dsl_form_call")


def _form_call():
    """(recurrence name, form, backend) of the form call running now; None outside `run_forms`."""
    return _FORM_CALL.get()


def _first_order(why: str):
    """Decorates the backward of an autograd Function whose backward records no graph (Triton kernels, a derived
    adjoint, a printed VJP; `why` says which), in place of torch's `once_differentiable`: the backward runs under
    no_grad, and under create_graph=True its gradients come back through `_NotTwice`, so that differentiating them
    again raises a CallError naming the form call (`ctx.where`, kept by the forward) and `why`. (torch's own answer
    is "element 0 of tensors does not require grad", or, through `torch.autograd.grad` with an incoming gradient
    that has a graph, a second derivative silently missing this Function's terms.) A plain backward gets the same
    gradients, and its graph the same nodes."""

    def wrap(backward):
        def run(ctx, *grads):
            device = next((g.device for g in grads if torch.is_tensor(g)), torch.device("cpu"))
            with torch.no_grad(), autocast_off(device):  # (a backward called inside torch.autocast)
                got = backward(ctx, *grads)
            if not torch.is_grad_enabled():  # a plain backward, or create_graph=False
                return got
            return _not_twice(ctx, why, grads, got)

        return run

    return wrap


def _not_twice(ctx, why: str, grads: tuple, got):
    """`got` (a backward's gradients, a tensor or a tuple with None for no gradient) with each tensor passed through
    `_NotTwice`, whose inputs also include the Function's saved tensors and incoming gradients that require grad:
    its node then lies on the path from these gradients to the call's inputs, so `torch.autograd.grad` of them
    reaches it (a node off that path, as once_differentiable's, would never run)."""
    single = torch.is_tensor(got)
    got = [got] if single else list(got)
    at = [n for n, g in enumerate(got) if torch.is_tensor(g)]
    if not at:
        return got[0] if single else tuple(got)
    ties = [t for t in tuple(ctx.saved_tensors) + grads if torch.is_tensor(t) and t.requires_grad]
    if not ties:  # nothing to tie to: a leaf, so that the gradients require grad and a .backward() still gets here
        ties = [torch.zeros((), requires_grad=True)]
    where = getattr(ctx, "where", None)  # None: the Function ran outside a layer call (its runtime called directly)
    head = f"{where[0]}: double backward" if where else "double backward"
    by = f"its {where[1]} form on the {where[2]} backend" if where else type(ctx).__name__.removesuffix("Backward")
    message = (f"{head} (differentiating a gradient taken with create_graph=True) is not supported by {by}: {why}. "
               "The torch recurrent form supports it with RECURRENCE_DSL_RECURRENT_BACKWARD=autograd in the "
               "environment (autograd through its step loop): call with backend='torch', form='recurrent'.")
    passed = _NotTwice.apply(message, len(at), *[got[n] for n in at], *ties)
    for n, g in zip(at, passed):
        got[n] = g
    return got[0] if single else tuple(got)


class _NotTwice(torch.autograd.Function):
    """The first `n` tensors as they are (the others only tie the node to the call's inputs, `_not_twice`);
    differentiating them raises CallError(message)."""

    @staticmethod
    def forward(ctx, message, n, *tensors):
        ctx.message = message
        return tuple(t.view_as(t) for t in tensors[:n])

    @staticmethod
    def backward(ctx, *grads):
        raise CallError(ctx.message)  # noqa: F821 - from calling.py


# Rows from which a batch of short sequences (packed ones of one length) takes a chunked form: the step loop then
# writes rows x length states where a chunk writes rows states (256 x 16 steps of mamba2 on CPU: 5.7x one sequence
# of 4096 steps through the loop, 1.9x through chunks; benchmarks/bench_varlen.py).
BATCHED_ROWS = 8


# Bytes of per-step state tensors the Triton scan form may keep for its backward before "auto" runs the Triton
# recurrent form instead. The scan writes each state element's decay a, injection b and value s for every step
# (float32 [B, T, H, *state]) and its backward reads them back; the recurrent kernels compute a and b in registers
# from the inputs and keep only chunk checkpoints of the state. For Mamba-1 (h[D, N] from inputs of D and N
# numbers) that is 3 * D * N against 3 * D + 2 * N numbers a step: at B=2, T=1024, H=4, D=128, N=16 a training
# step allocates 1,072 MB through the scan and 38 MB through the recurrent kernels (`recdsl kernels --json`), as
# mamba_ssm's selective scan keeps only its inputs and checkpoints. Where the scan kernels compute a and b from the
# inputs themselves (`fused_scan`: every diagonal scan whose prologue is elementwise per lane) only s is kept
# (`_Spec.scan_held`): the same step then allocates 803 MB, 22 MB of it in the forward (bfloat16 inputs). The
# limit is a memory bound, not a measured crossover in time (no GPU run has compared the two yet); set
# RECURRENCE_DSL_SCAN_BYTES to move it (0: never the scan when the recurrent form exists).
SCAN_BYTES = "RECURRENCE_DSL_SCAN_BYTES"
SCAN_HELD_BYTES = 256 << 20


def scan_held_bytes(spec, call, length: int, rows: int) -> int:
    """Bytes of the float32 [rows, length, H, *state] tensors the Triton scan form keeps for its backward in a call
    of `rows` sequences of `length` steps (`pick_form`'s `scan_bytes`): the states alone where its kernels compute
    the decays and injections from the inputs (`spec.scan_held` = 1, codegen/triton_scan.py `fused_scan`), else
    the decays, injections and states (3)."""
    elements = sum(math.prod(call.dims(s)) for s in spec.states)
    return getattr(spec, "scan_held", 3) * 4 * rows * length * call.heads * elements


def scan_bytes_limit() -> int:
    """`SCAN_HELD_BYTES`, or the environment's RECURRENCE_DSL_SCAN_BYTES (a byte count, >= 0)."""
    given = os.environ.get(SCAN_BYTES, "").strip() or str(SCAN_HELD_BYTES)
    if not given.isdigit():
        raise ValueError(f"{SCAN_BYTES}={given!r}: expected a byte count >= 0")
    return int(given)


def pick_form(forms, length: int, chunk_size: int, rows: int = 1, scan_bytes=0, scan_first: bool = False) -> str:
    """The form `auto` runs for a sequence of `length` steps, given the forms a recurrence has; rows: how many
    packed sequences of that length run together (`_run_packed`); scan_bytes: what the scan form would keep for
    its backward (`scan_held_bytes`, given on the Triton backend), an int or a function returning it, called only
    where the choice involves the scan form: past `scan_bytes_limit()` the recurrent form runs. scan_first (the
    spec's `scan_first`: vector states): the scan form ahead of the chunked and parallel ones while it is within
    that limit."""
    if (length <= 16 and rows < BATCHED_ROWS) or len(forms) == 1:
        return "recurrent"
    if scan_first and "scan" in forms:
        held = scan_bytes() if callable(scan_bytes) else scan_bytes
        if held <= scan_bytes_limit():
            return "scan"
        scan_bytes = held  # past the limit: the order below (parallel, chunked, else recurrent)
    if "parallel" in forms and length <= chunk_size:
        return "parallel"
    if "chunked" in forms:
        return "chunked"
    if "scan" not in forms:
        return "recurrent"
    if "recurrent" not in forms:
        return "scan"
    held = scan_bytes() if callable(scan_bytes) else scan_bytes
    return "recurrent" if held > scan_bytes_limit() else "scan"


def run_forms(spec, form_fns: dict, call, form: str, chunk_size: int, options: dict | None = None,
              grid_limits: bool = False, backend: str | None = None, check_steps: bool = True):
    """`(output, final_state)` of `spec` on `call` through `form_fns[form]` ("auto" picks per sequence).

    Each form function takes `(*inputs, *params, states, *sizes, **extra)` in the compute dtype (in the call's
    dtype where it `takes_input_dtype`; states always in the compute dtype) and returns `(outputs: dict,
    final_states: dict)`; outputs come back in the call's dtype. Packed sequences (`cu_seqlens`) run batched
    (`_run_packed`); with `call.reverse` each sequence runs from its last step to its first.
    `options`: form name -> keyword arguments for that form's function (block sizes, warps of a config).
    grid_limits: the forms launch CUDA kernels (the Triton backend), so a chunked call too large for CUDA's grid
    limits runs in pieces that fit (`in_grid_pieces`). backend: the forms' backend as an error names it (None:
    "triton" with grid_limits, else "torch"). check_steps: False hands `check_steps=False` to the chunked and
    parallel forms (`CHECKED_FORMS`), which then skip their value checks and the host sync they make
    (codegen/torch_forms.py `_check_steps`, `_require_positive`): no `UnsafeSteps` and no `DecayNotPositive` comes
    back, so no step runs one at a time and "auto" keeps the form it chose whatever the values.
    """
    options = options or {}
    if call.device.type == "meta":
        return meta_result(spec, call)
    backend = backend or ("triton" if grid_limits else "torch")
    dtype = compute_dtype(call.dtype)
    # Inputs and params stay in the call's dtype until a form is chosen: a form that loads them as they are
    # (`takes_input_dtype`) gets them so, every other form a copy in the compute dtype (`call_form`). Inputs of
    # mixed dtypes (`mixed_dtypes`) go to every form in the compute dtype: the forms that take them as they are
    # store their outputs and intermediates in one input's dtype, which may be narrower than another's; there a
    # param narrower than the inputs is cast up to their dtype.
    as_given = not mixed_dtypes(call)
    inputs = dict(call.inputs)
    params = [call.params[p.name] for p in spec.params]
    sizes = [call.sizes[s] for s in spec.sizes]
    if call.initial_state is not None:
        states = {k: v.to(dtype) for k, v in call.initial_state.items()}
    else:
        # No initial state: None per state, which a form that `takes_no_initial_state` gets as it is (its kernels
        # start from zero without reading one); `call_form` gives every other form zeros of its piece's rows.
        states = {s.name: None for s in spec.states}

    def zero_states(piece: dict, piece_states: dict, more: dict) -> dict:
        """piece_states with zeros [rows, H, ...] for each None: rows, the piece's sequences (packed or batch)."""
        cu = more.get("cu_seqlens")
        if cu is not None:
            rows = len(cu) - 1
        else:
            rows = next(iter(piece.values())).shape[0] if piece else call.num_sequences
        return {s.name: torch.zeros((rows, call.heads) + call.dims(s), dtype=dtype, device=call.device)
                if piece_states[s.name] is None else piece_states[s.name] for s in spec.states}

    def call_inner(chosen: str, piece: dict, piece_states: dict, length: int, **more):
        fn = form_fns[chosen]
        if not getattr(fn, "no_initial_state", False) and any(v is None for v in piece_states.values()):
            piece_states = zero_states(piece, piece_states, more)
        extra = dict(options.get(chosen, {}), **more)
        if chosen == "chunked":
            extra["chunk_size"] = chunk_size
        elif chosen == "parallel":
            extra["chunk_size"] = max(length, 1)
        if not check_steps and chosen in CHECKED_FORMS:
            extra["check_steps"] = False
        ordered = [piece[i.name] for i in spec.inputs]
        if not (as_given and getattr(fn, "input_dtype", False)):
            ordered, given = [x.to(dtype) for x in ordered], [p.to(dtype) for p in params]
        else:
            # a param narrower than the inputs, cast up to their dtype: a form's torch prologue computes with it (a
            # bfloat16 retention gamma's log in bfloat16 lost 1e-3 of a float32 call's outputs)
            given = [p.to(torch.promote_types(p.dtype, call.dtype)) for p in params]
        # for the forms' autograd Functions; under the name of the recurrence whose rest this is, if it is one
        running = _FORM_CALL.set((getattr(spec, "rest_of", "") or spec.name, chosen, backend))
        try:
            with autocast_off(call.device):
                return fn(*ordered, *given, piece_states, *sizes, **extra)
        finally:
            _FORM_CALL.reset(running)

    if grid_limits:
        call_inner = in_grid_pieces(call_inner, call.heads, chunk_size)

    def call_form(chosen: str, piece: dict, piece_states: dict, length: int, **more):
        """`call_inner` in the call's direction. A reverse run on a form that walks its steps backwards itself
        (`walks_back`: the Triton recurrent kernels) passes it reverse=True, with no copies; on any other form it is
        the forward run on the time-flipped sequences, its outputs flipped back (every form, and its backward
        through the flips, serves both directions). Packed (cu_seqlens), each sequence is flipped in place."""
        if not call.reverse:
            return call_inner(chosen, piece, piece_states, length, **more)
        if getattr(form_fns[chosen], "walks_back", False):
            return call_inner(chosen, piece, piece_states, length, reverse=True, **more)
        flip = _flipper(more.get("cu_seqlens"), length, call.device)
        out, fin = call_inner(chosen, {k: flip(v) for k, v in piece.items()}, piece_states, length, **more)
        return {k: flip(v) for k, v in out.items()}, fin

    def run(piece: dict, piece_states: dict, length: int, rows: int = 1):
        if form == "auto":
            # (a function: `pick_form` counts the held bytes only where it weighs the scan form)
            held = ((lambda: scan_held_bytes(spec, call, length, next(iter(piece.values())).shape[0]))
                    if backend == "triton" and piece else 0)
            chosen = pick_form(tuple(form_fns), length, chunk_size, rows, held, getattr(spec, "scan_first", False))
        else:
            chosen = form
        try:
            return call_form(chosen, piece, piece_states, length)
        except DecayNotPositive:
            if form != "auto":
                raise
            # The decay is not positive somewhere (say a zero-initialised gamma): step through instead.
            return call_form("recurrent", piece, piece_states, length)
        except ValueError as err:
            others = tuple(f for f in form_fns if f != chosen)
            if form != "auto" or not getattr(err, "does_not_fit", False) or not others:
                raise
            # The form cannot hold its state at these sizes (the Triton recurrent form's `StateTooLarge`): the
            # chunked form, else the scan, holds tiles of it.
            fallback = next((f for f in ("chunked", "scan") if f in others), others[0])
            return call_form(fallback, piece, piece_states, length)
        except UnsafeSteps as unsafe:
            # Steps before `unsafe.step` are exact in the chosen form; from there on, one step at a time as the
            # reference takes them, so a NaN or inf reaches only later steps and a growing decay is right. (The
            # steps in the order taken: a reverse run's first `step` are the piece's last.)
            step = unsafe.step
            if step == 0:
                return call_form("recurrent", piece, piece_states, length)
            first, rest = ((slice(length - step, length), slice(0, length - step)) if call.reverse
                           else (slice(0, step), slice(step, length)))
            head_out, head_states = run({k: v[:, first] for k, v in piece.items()}, piece_states, step)
            tail_out, tail_states = call_form("recurrent", {k: v[:, rest] for k, v in piece.items()}, head_states,
                                              length - step)
            return {k: torch.cat([tail_out[k], head_out[k]] if call.reverse else [head_out[k], tail_out[k]], dim=1)
                    for k in tail_out}, tail_states

    if call.cu_seqlens is None:
        outputs, finals = run(inputs, states, call.length)
    else:
        # (under cu_seqlens each row of a batch by length is one sequence, so `call_form` flips each on its own)
        outputs, finals = _run_packed(spec, form_fns, call, form, chunk_size, inputs, states, run, call_form)
    outputs = {k: _owned(v.to(call.dtype)) for k, v in outputs.items()}
    if call.output_final_state:
        given = call.initial_state or {}
        finals = {k: _owned(v, shares=given.get(k)) for k, v in finals.items()}
    return pack_result(spec, outputs, finals if call.output_final_state else None)  # noqa: F821 - from calling.py


def _owned(t: torch.Tensor, shares: torch.Tensor | None = None) -> torch.Tensor:
    """`t`, or a copy of it that the caller may change in place (`out += residual`, a state reset `state.mul_(mask)`)
    without breaking the backward or the caller's own tensors. Autograd refuses an in-place op on a view made inside
    a form's autograd Function, on one of several views (a split), and on a view of a tensor a backward reads (a scan's
    states); the forms' outputs are often such views, so while autograd records every view is copied (the size of
    the outputs; the forms' Functions save no output or final state that they return as it is). A final state of a
    call with no steps may be the caller's initial state itself: a tensor sharing memory with `shares` is copied
    always."""
    if shares is not None and t.untyped_storage().data_ptr() == shares.untyped_storage().data_ptr():
        return t.clone()
    return t.clone() if t.requires_grad and t._is_view() else t


def meta_result(spec, call):
    """What a call of meta tensors returns: meta outputs [B, T, H, *dims] in the call's dtype and, when asked,
    final states [N, H, *dims] in the compute dtype, as a call with data would (shape inference: a model built
    on the meta device runs, and its backward gives meta gradients of the right shapes). No form runs: a meta
    tensor has no values, and the forms read some (the chunked forms' step check, the packed sequences'
    boundaries). The outputs depend on every input and param that requires grad, through a zero, so autograd
    reaches them."""
    tensors = list(call.inputs.values()) + list(call.params.values()) + list((call.initial_state or {}).values())
    anchor = None
    if torch.is_grad_enabled():
        for t in tensors:
            if t.requires_grad:
                anchor = t.sum() * 0 if anchor is None else anchor + t.sum() * 0

    def empty(shape, dtype):
        out = torch.empty(shape, dtype=dtype, device="meta")
        return out if anchor is None else out + anchor.to(dtype)

    outputs = {o.name: empty((call.batch, call.length, call.heads) + call.dims(o), call.dtype) for o in spec.outputs}
    finals = None
    if call.output_final_state:
        finals = {s.name: empty((call.num_sequences, call.heads) + call.dims(s), compute_dtype(call.dtype))
                  for s in spec.states}
    return pack_result(spec, outputs, finals)  # noqa: F821 - from calling.py


# CUDA's grid limits (the CUDA C++ Programming Guide, "Technical Specifications per Compute Capability"): at most
# 2^31 - 1 blocks along a grid's x axis (Triton's axis 0) and 65535 along y and z (axes 1 and 2).
GRID_LIMITS = (2**31 - 1, 65535, 65535)
# The steps of one piece of a chunked call: its kernels put the chunks, or the 16-step sub-chunks, of a sequence
# on axis 0 or 1, cdiv(T, BT) * BT / 16 <= 2^15 of them here for every chunk length BT <= 2^19 (a power of two).
PIECE_STEPS = 1 << 19


def in_grid_pieces(call_form, heads: int, chunk_size: int):
    """`call_form` (of `run_forms`) whose chunked form runs a call too large for `GRID_LIMITS` in pieces that fit.

    The chunked Triton kernels (codegen/triton_runtime.py) put batch * heads, or sequences * heads for packed
    sequences, on grid axis 1 or 2 (at most 65535 programs) and the chunks or sub-chunks of the time axis on axis
    0 or 1, so: rows (batch, or packed sequences) run in groups of at most 65535 // heads, each group's outputs
    and final states concatenated (a row never meets another, so this is exact); a sequence longer than
    `PIECE_STEPS` runs piece after piece in time, each from the state the last one ended in (exactly what the
    chunked form does between its own chunks); packed sequences group so that a group's padded steps (each
    sequence padded to whole chunks of at most `chunk_size`) stay within `PIECE_STEPS`, and one sequence longer
    than that runs alone, unpacked, in time pieces. Gradients flow through the concatenations and the carried
    states. Other forms launch grids within the limits for any call (batch * heads on axis 0) and run unchanged.
    Raises ValueError when the heads alone exceed axis 1's limit."""
    rows_limit = GRID_LIMITS[1]

    def per_rows() -> int:
        if heads > rows_limit:
            raise ValueError(f"heads: {heads} heads exceed the {rows_limit} programs a CUDA grid axis holds; the "
                             "chunked Triton kernels launch one program per (row, head) on that axis")
        return max(1, rows_limit // max(heads, 1))

    def cat_results(parts, out_dim: int):
        outs = {k: torch.cat([o[k] for o, _ in parts], dim=out_dim) for k in parts[0][0]}
        return outs, {k: torch.cat([f[k] for _, f in parts], dim=0) for k in parts[0][1]}

    def in_time(chosen, piece, states, length, **more):
        if length <= PIECE_STEPS:
            return call_form(chosen, piece, states, length, **more)
        outs = []
        for t0 in range(0, length, PIECE_STEPS):
            steps = min(PIECE_STEPS, length - t0)
            try:
                out, states = call_form(chosen, {k: v[:, t0:t0 + steps] for k, v in piece.items()}, states, steps,
                                        **more)
            except UnsafeSteps as unsafe:  # its step counts from this piece's start
                raise UnsafeSteps(t0 + unsafe.step) from None
            outs.append(out)
        return {k: torch.cat([o[k] for o in outs], dim=1) for k in outs[0]}, states

    def run(chosen: str, piece: dict, piece_states: dict, length: int, **more):
        if chosen != "chunked":
            return call_form(chosen, piece, piece_states, length, **more)
        cu = more.pop("cu_seqlens", None)
        per = per_rows()
        if cu is None:
            rows = next(iter(piece.values())).shape[0]
            if rows <= per:
                return in_time(chosen, piece, piece_states, length, **more)
            return cat_results([in_time(chosen, {k: v[r:r + per] for k, v in piece.items()},
                                        {k: _rows(v, r, r + per) for k, v in piece_states.items()}, length,
                                        **more)
                                for r in range(0, rows, per)], 0)
        groups = sequence_groups(cu, per, chunk_size)
        if len(groups) == 1 and (groups[0][1] - groups[0][0] > 1 or length <= PIECE_STEPS):
            return call_form(chosen, piece, piece_states, length, cu_seqlens=cu, **more)
        parts = []
        for n0, n1 in groups:
            t0, t1 = int(cu[n0]), int(cu[n1])
            sub = {k: v[:, t0:t1] for k, v in piece.items()}
            sub_states = {k: _rows(v, n0, n1) for k, v in piece_states.items()}
            if n1 - n0 == 1:  # one sequence: a batch of one row, in time pieces if it is long
                parts.append(in_time(chosen, sub, sub_states, t1 - t0, **more))
            else:
                parts.append(call_form(chosen, sub, sub_states, t1 - t0, cu_seqlens=cu[n0:n1 + 1] - cu[n0], **more))
        return cat_results(parts, 1)

    return run


def _rows(state, r0: int, r1: int):
    """Rows r0 .. r1 - 1 of an initial state, or None for none (`run_forms`)."""
    return None if state is None else state[r0:r1]


def sequence_groups(cu_seqlens: torch.Tensor, per: int, chunk_size: int) -> list[tuple[int, int]]:
    """Consecutive packed sequences [(n0, n1)] of `cu_seqlens` (int64 [N + 1], CPU) in groups of at most `per`
    sequences whose steps, each sequence padded to whole chunks of `chunk_size` (the most a packed chunked call
    pads one to), total at most `PIECE_STEPS`; a sequence longer than that makes a group of its own. Empty
    sequences join any group (none for N = 0)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    groups, start, steps = [], 0, 0
    for n, length in enumerate(lengths):
        padded = -(-length // chunk_size) * chunk_size
        if n > start and (n - start >= per or steps + padded > PIECE_STEPS):
            groups.append((start, n))
            start, steps = n, 0
        steps += padded
    groups.append((start, len(lengths)))
    return groups


def takes_cu_seqlens(fn):
    """Mark the form function `fn` as one that runs packed sequences itself, given `cu_seqlens=` (the call's int64
    [N + 1] boundaries, checked, on the CPU) with [1, T, H, ...] inputs and [N, H, ...] states: the Triton forms
    whose kernels read the boundaries (the chunked forms of linear and delta-rule classes through chunk index
    tables, codegen/triton_runtime.py `_Packed`; the parallel forms of linear classes through `_Packed`'s layout and
    a per-block table, codegen/triton_parallel.py `_Varlen`; the recurrent kernels and their derived adjoints, a
    program per (sequence, head, tile) walking its sequence's steps, codegen/triton_recurrent.py; the scan kernels,
    codegen/triton_scan.py). Returns `fn`, whose `run_packed` is `_run_packed_form` (an attribute, so a generated
    module without such a form keeps none of it)."""
    fn.run_packed = _run_packed_form
    return fn


def takes_input_dtype(fn):
    """Mark the form function `fn` as one that takes float16 / bfloat16 inputs and params as they are: the Triton
    chunked forms whose kernels upcast every load to float32, compute and accumulate in float32 and store outputs
    (and, through their autograd.Function, gradients) in the inputs' dtype (codegen/triton_runtime.py), so a half
    call makes no float32 copy of q, k, v, g; the diagonal-plus-rank-one chunked form (RWKV-7), whose kernels
    do the same and whose derived adjoint (codegen/triton_recurrent.py) returns gradients in the inputs' dtypes;
    and the Triton recurrent form where it trains on that derived adjoint (its step loop's kernel upcasts each
    load and stores its outputs in the first input's dtype). Every other form gets its inputs cast to
    `compute_dtype` (`run_forms`), as does every form in a call whose inputs mix dtypes (`mixed_dtypes`); a param
    narrower than the inputs (a bfloat16 one in a float32 call) reaches this form in the inputs' dtype.
    States are float32 for every form. Returns `fn`."""
    fn.input_dtype = True
    return fn


def chunk_run(fn, chunk_size: int, options: dict) -> int:
    """The chunk length the form function `fn` runs when handed `chunk_size` and its `options` (its `allow_tf32`,
    `triton_options`): `chunk_size`, or `fn.chunk_run(chunk_size, allow_tf32)` where a generated module sets one (the
    Triton delta rule's chunked form runs at most 32 steps a chunk under float32 dots: codegen/triton_runtime.py
    `delta_chunk`), so that a layer's `config_for` (and `recdsl show` / `check`) reports the chunk a call runs."""
    return getattr(fn, "chunk_run", lambda given, _: given)(chunk_size, options.get("allow_tf32"))


def walks_back(fn):
    """Mark the form function `fn` as one that runs a reverse call itself, given `reverse=True`: each sequence
    (packed ones too) from its last step to its first, outputs in place, as the Triton recurrent kernels and their
    derived adjoint do by walking the steps backwards (codegen/triton_recurrent.py, REVERSE). Every other form
    runs a reverse call on time-flipped copies of its inputs, its outputs flipped back (`run_forms`). Returns
    `fn`."""
    fn.walks_back = True
    return fn


def takes_no_initial_state(fn):
    """Mark the form function `fn` as one that takes None for a state the call gives no initial value of, as the
    chunked Triton kernels do (their flag for an initial state off: the state starts at zero in registers, and no
    zero [N, H, ...] tensor is allocated or, in the backward, its gradient): the Triton chunked forms whose runtime
    calls pass each state only as `initial_state=` (codegen/triton_runtime.py `chunked_linear_by`,
    `chunked_delta_by`), and the torch chunked and parallel forms (codegen/torch_runtime.py: the first chunk skips
    its start state's terms, and one chunk from zero, a batch of short packed sequences, reads no start state at
    all). Every other form gets zeros (`run_forms`). Returns `fn`."""
    fn.no_initial_state = True
    return fn


def packed_form(form_fns, form: str, call, chunk_size: int, spec=None) -> str | None:
    """The form that runs every packed sequence of `call` in one call (`takes_cu_seqlens`), or None (the batches by
    length then run): `form` itself, or under "auto" the chunked form where it takes cu_seqlens, else what
    `pick_form` picks among the forms that do for the longest sequence, all N sequences counted as rows. "auto"
    keeps the chunked form even where the parallel one also takes cu_seqlens and the longest sequence fits
    `pick_form`'s parallel rule: no GPU measurement says the packed parallel kernels are faster there. spec: the
    recurrence, for the scan form's held bytes (only Triton forms take cu_seqlens)."""
    if call.length == 0:
        return None
    packed = tuple(name for name, fn in form_fns.items() if getattr(fn, "run_packed", None) is not None)
    if form != "auto":
        return form if form in packed else None
    scan_first = getattr(spec, "scan_first", False)
    if not packed or ("chunked" in packed and not (scan_first and "scan" in packed)):
        return "chunked" if packed else None
    lengths = call.cu_seqlens[1:] - call.cu_seqlens[:-1]
    # (the packed kernels keep every sequence's steps: the packed length, as one row)
    held = (lambda: scan_held_bytes(spec, call, call.length, 1)) if spec is not None else 0
    return pick_form(packed, int(lengths.max()), chunk_size, len(lengths), held, scan_first)


def _run_packed_form(chosen, form, call, inputs, states, call_form):
    """(outputs, final states) of every packed sequence of `call` in one call of the form `chosen`, or None where
    a chunked form meets a step its masked matmuls cannot take (`UnsafeSteps`, whose step counts along the packed
    T) or, under "auto", a decay that is not positive: then the recurrent kernels take every sequence in one call
    where they can (they step exactly as the reference does), else the batches by length step through.
    A reverse run: `call_form`'s (each sequence flipped in place, or walked backwards by the kernels)."""
    try:
        return call_form(chosen, inputs, states, call.length, cu_seqlens=call.cu_seqlens)
    except (UnsafeSteps, DecayNotPositive) as failed:
        if isinstance(failed, DecayNotPositive) and form != "auto":
            raise
        return None


def _flipper(cu, length: int, device):
    """A function reversing the time axis (dim 1) of a tensor of `length` steps: each packed sequence in place
    under cu (cu_seqlens: int64 [N + 1], on the CPU; a permutation of the packed steps that is its own inverse),
    else (None) the whole axis. Copies: a form that walks back itself (`walks_back`) is handed reverse=True."""
    if cu is None:
        return lambda x: x.flip(1)
    seq = torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1], output_size=length)
    index = (cu[:-1][seq] + cu[1:][seq] - 1 - torch.arange(length)).to(device)  # a + b - 1 - t
    return lambda x: x.index_select(1, index)


def length_groups(cu_seqlens: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """The packed sequences of `cu_seqlens` (int64 [N + 1] on the CPU) grouped by length: [(length, ids)], ids an
    int64 tensor of the sequences of that length in order, lengths ascending. N sequences in T steps have at most
    sqrt(2 T) + 1 distinct lengths, so this is also a bound on the number of groups."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    values, inverse = torch.unique(lengths, sorted=True, return_inverse=True)
    order = torch.argsort(inverse, stable=True)
    counts = torch.bincount(inverse, minlength=len(values)).tolist()
    return list(zip(values.tolist(), torch.split(order, counts)))


def _run_packed(spec, form_fns, call, form, chunk_size, inputs, states, run, call_form):
    """(outputs [1, T, H, ...], final states [N, H, ...]) of the packed sequences of `call`, batched.

    A form that takes `cu_seqlens` itself (`takes_cu_seqlens`: the Triton chunked, parallel, scan and recurrent
    forms; chosen by `packed_form`) runs once for all sequences (`_run_packed_form`): its launches do not grow
    with N. Otherwise the sequences of each length run as one batch of B = (how many have that length) rows,
    gathered from the packed tensor and scattered back by index (differentiable; views of it when all sequences
    have one length, the packed row then being the batch itself): no step of one sequence meets
    another's or any padding, so outputs and final states are those of the one-by-one loop for every class,
    linear or not, and a reverse run flips each row on its own. N sequences of T steps make at most sqrt(2 T) + 1
    batches (`length_groups`), each of which "auto" gives the form it would give one sequence of its length."""
    cu = call.cu_seqlens
    dtype = compute_dtype(call.dtype)
    chosen = packed_form(form_fns, form, call, chunk_size, spec)
    if chosen is not None:
        done = form_fns[chosen].run_packed(chosen, form, call, inputs, states, call_form)
        if done is None and chosen != "recurrent" and form == "auto" and packed_form(form_fns, "recurrent", call,
                                                                                      chunk_size):
            done = _run_packed_form("recurrent", form, call, inputs, states, call_form)
        if done is not None:
            return done
    groups = length_groups(cu)
    if len(groups) == 1 and groups[0][0] > 0:
        # Every sequence of one length L: the packed row [1, N * L, ...] is already the batch [N, L, ...] (ids in
        # order), so the inputs go in and the outputs come out as views, with no gather, scatter or state reorder.
        length, ids = groups[0]
        piece = {k: v[0].unflatten(0, (len(ids), length)) for k, v in inputs.items()}
        out, fin = run(piece, states, length, len(ids))
        return {k: v.flatten(0, 1)[None] for k, v in out.items()}, fin
    starts = cu[:-1]
    out_parts: dict[str, list] = {o.name: [] for o in spec.outputs}
    final_parts: dict[str, list] = {s.name: [] for s in spec.states}
    positions, order = [], []
    for length, ids in groups:
        order.append(ids)
        rows = {k: None if v is None else v.index_select(0, ids.to(v.device)) for k, v in states.items()}
        if length == 0:  # empty sequences: no step, the final state is the initial one (zero when none is given)
            for s in spec.states:
                zero = torch.zeros((len(ids), call.heads) + call.dims(s), dtype=dtype, device=call.device)
                final_parts[s.name].append(zero if rows[s.name] is None else rows[s.name])
            continue
        index = (starts[ids][:, None] + torch.arange(length)[None, :]).reshape(-1)  # [m * length] packed steps
        positions.append(index)
        index = index.to(call.device)
        piece = {k: v[0].index_select(0, index).unflatten(0, (len(ids), length)) for k, v in inputs.items()}
        out, fin = run(piece, rows, length, len(ids))
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
        ctx.slow, ctx.layout, ctx.where = slow, layout, _form_call()
        ctx.save_for_backward(*tensors)
        return tuple(outputs[n] for n in names[0]) + tuple(finals[n] for n in names[1])

    @staticmethod
    @_first_order("its backward takes the first derivatives of the matching torch form only")
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

    `slow` receives only `chunk_size` and `check_steps` of the keyword options (block sizes are the fast form's)."""

    def run(*args, **extra):
        layout, tensors = _flatten(args)
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            return fast(*args, **extra)
        slow_extra = {k: v for k, v in extra.items() if k in ("chunk_size", "check_steps")}
        names = (tuple(output_names), tuple(state_names))
        flat = _RecomputeBackward.apply(lambda *a: fast(*a, **extra), lambda *a: slow(*a, **slow_extra), layout,
                                        names, *tensors)
        n = len(names[0])
        return dict(zip(names[0], flat[:n])), dict(zip(names[1], flat[n:]))

    return run


# The recurrent form's backward: "adjoint" (the default) runs the derived adjoint (`with_adjoint`); "autograd"
# runs autograd through the step loop, keeping every step's tensors (the old way, kept to compare against).
RECURRENT_BACKWARD = "RECURRENCE_DSL_RECURRENT_BACKWARD"
# Steps between two checkpoints of the derived backward; unset or 0: max(64, isqrt(T)), and on CPU at most as many
# steps as keep a segment's two buffers (its states and their total gradients) within SEGMENT_BYTES, but at least
# MIN_EVERY. The backward re-reads those buffers three times (the reverse loop, the block gradients); a segment that
# stays in the cache made fwd+bwd of GLA / Mamba2 (B=2, H=4, K=V=64, T=2048, CPU time, one run each under load)
# 13-15% faster at 16 steps than at 64. Memory is (T / every + 2 * every) states either way: for these shapes 160
# states at 16 and at 64.
CHECKPOINT_EVERY = "RECURRENCE_DSL_CHECKPOINT_EVERY"
SEGMENT_BYTES = 4 << 20
MIN_EVERY = 16


# How many consecutive steps' input and param gradients the derived backward computes at once (on slices of its
# segment buffers, time-major), as soon as its reverse loop has passed them: a positive number forces it; unset or 0:
# on CPU the segment in as many equal blocks as keep a block's states and their gradients near BLOCK_BYTES (at least
# 1 step, at most a segment); on a GPU a whole segment (each call is a kernel launch). Measured on a 2-core EPYC
# (1 MiB L2 per core, 32 MiB L3), fwd+bwd of GLA and DeltaNet, B=2, H=4: at K=V=64 (128 KiB states) blocks of
# 16-64 steps were fastest, at K=V=128 (512 KiB) blocks of 2-4, slower beyond: large blocks fall out of cache.
ADJOINT_BLOCK = "RECURRENCE_DSL_ADJOINT_BLOCK"
BLOCK_BYTES = 4 << 20


def forced_steps(variable: str) -> int:
    """The number of steps the environment variable `variable` forces (ADJOINT_BLOCK, CHECKPOINT_EVERY,
    SCAN_BLOCK); 0 where it is unset, empty or 0 (the size is then chosen per call). Raises ValueError naming the
    variable for a value that is not a whole number >= 0 (a bare int() error would name none)."""
    text = os.environ.get(variable, "").strip()
    if not text:
        return 0
    try:
        steps = int(text)
    except ValueError:
        steps = -1
    if steps < 0:
        raise ValueError(f"{variable} must be a whole number of steps (unset or 0: chosen per call), got {text!r}")
    return steps


def adjoint_block(states, every: int) -> int:
    """Steps per block of the derived backward's gradients for states like `states` ([B, H, ...] each)."""
    forced = forced_steps(ADJOINT_BLOCK)
    if forced > 0:
        return forced
    states = list(states)
    if not all(s.device.type == "cpu" for s in states):
        return every
    step_bytes = 2 * sum(s.numel() * s.element_size() for s in states)  # the states and their total gradients
    # The segment in equal blocks of about BLOCK_BYTES: a cap of BLOCK_BYTES // step_bytes would cut mLSTM's
    # 16-step segment (C[K, V] and n[K], a little over 256 KiB a step) into 15 steps and 1, and each block costs
    # its own dozen batched calls.
    blocks = max(1, round(every * step_bytes / BLOCK_BYTES))
    return max(1, -(-every // blocks))


def checkpoint_every(length: int, states=(), on_cpu: bool | None = None) -> int:
    """Steps between the checkpoints of a sequence of `length` steps with initial states like `states` ([B, H, ...]
    each, real or "meta" tensors; none given: the rule for the length alone): memory O(T / every + every) states.
    on_cpu: whether the call runs on the CPU (None: where `states` are)."""
    every = forced_steps(CHECKPOINT_EVERY)
    if every > 0:
        return every
    every = max(64, math.isqrt(length))
    states = list(states)
    if on_cpu is None:
        on_cpu = all(s.device.type == "cpu" for s in states)
    if states and on_cpu:
        step_bytes = 2 * sum(s.numel() * s.element_size() for s in states)  # a step's states and total gradients
        every = max(MIN_EVERY, min(every, SEGMENT_BYTES // max(step_bytes, 1)))
    return every


def _save_with_states(ctx, tensors, snapshots: list[dict], state_names) -> None:
    """Save `tensors` and the states of every snapshot (a dict per checkpoint or block) for the backward."""
    ctx.count = (len(tensors), len(snapshots))
    ctx.save_for_backward(*tensors, *[snap[n] for snap in snapshots for n in state_names])


def _saved_with_states(ctx, state_names) -> tuple[tuple, list[dict]]:
    """(tensors, snapshots) as `_save_with_states` saved them."""
    saved = ctx.saved_tensors
    tensors, flat = saved[: ctx.count[0]], saved[ctx.count[0]:]
    per = len(state_names)
    return tensors, [dict(zip(state_names, flat[n * per:(n + 1) * per])) for n in range(ctx.count[1])]


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
        ctx.where = _form_call()
        ctx.shapes = [(r.shape, r.dtype) for r in results]
        _save_with_states(ctx, tensors, checkpoints, names[1])
        return tuple(results)

    @staticmethod
    @_first_order("its backward is the adjoint derived from the spec, which records no graph")
    def backward(ctx, *grads):
        out_names, state_names = ctx.names
        tensors, checkpoints = _saved_with_states(ctx, state_names)
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


def with_adjoint(loop, adjoint, output_names, state_names, kernels=False, every_of=None, state_dims=None):
    """The recurrent form from its printed step loop `loop` (returning outputs, final states and checkpoints)
    and its derived backward `adjoint` (None: none was derived, and autograd runs through the loop). Keyword
    options of a call (a Triton kernel's num_warps) go to the loop only: the backward picks its own.
    kernels: the loop runs Triton kernels, which autograd cannot run through, so RECURRENT_BACKWARD=autograd
    does not apply to it. every_of: None (checkpoints every `checkpoint_every(T)` steps), or (T, the call's keyword
    options) -> the steps between the checkpoints `loop` stores, for a loop whose structure fixes them: the
    chunked Triton form of the diagonal-plus-rank-one class, whose chunk-start states are the checkpoints.
    A `cu_seqlens=` option (packed sequences, `takes_cu_seqlens`: the Triton kernels walk each sequence
    themselves) and a `reverse=` option (`walks_back`: they walk its steps backwards) go to both the loop and the
    backward. state_dims: None, or (the call's sizes) -> {state: its dims
    after [B, H]}, for the checkpoint rule's state bytes when a call starts from zero and passes no state
    (`takes_no_initial_state`)."""
    names = (tuple(output_names), tuple(state_names))

    def run(*args, **extra):
        layout, tensors = _flatten(args)
        if (adjoint is None or not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
                or (not kernels and os.environ.get(RECURRENT_BACKWARD, "adjoint") == "autograd")):
            outputs, finals, _ = loop(*args, **extra)
            return outputs, finals
        forward = (lambda *a, every: loop(*a, every=every, **extra)) if extra else loop
        length = tensors[0].shape[1]
        at = next(i for i, a in enumerate(args) if isinstance(a, dict))
        states = list(args[at].values())
        if state_dims is not None and len(states) < len(state_names):
            # a zero start: the missing states' sizes as "meta" tensors (no memory), the call's device decides
            dims = state_dims(*args[at + 1:])
            first = tensors[0]
            states += [torch.empty((first.shape[0], first.shape[2]) + tuple(dims[n]), dtype=first.dtype,
                                   device="meta") for n in state_names if n not in args[at]]
        on_cpu = tensors[0].device.type == "cpu" if tensors else None
        every = checkpoint_every(length, states, on_cpu) if every_of is None else every_of(length, extra)
        # (the loop's packed sequences and direction are the backward's too)
        shared = {k: extra[k] for k in ("cu_seqlens", "reverse") if extra.get(k) is not None and extra[k] is not False}
        backward = adjoint if not shared else (lambda *a, **more: adjoint(*a, **shared, **more))
        flat = _AdjointBackward.apply(forward, backward, layout, names, every, kernels, *tensors)
        n = len(names[0])
        return dict(zip(names[0], flat[:n])), dict(zip(names[1], flat[n:]))

    return run


# Steps per block of the scan form (`in_blocks`); unset or 0: a power of two in [16, 1024] that keeps one block's
# states near SCAN_BLOCK_ELEMENTS numbers, so a block's tensors stay in cache whatever the sequence's length.
SCAN_BLOCK = "RECURRENCE_DSL_SCAN_BLOCK"
SCAN_BLOCK_ELEMENTS = 1 << 17


def scan_block_steps(states) -> int:
    """Steps per block for states (tensors [B, H, ...]) of this size: fixed for a shape, independent of T."""
    forced = forced_steps(SCAN_BLOCK)
    if forced > 0:
        return forced
    per_step = max(1, sum(s.numel() for s in states))
    return 1 << max(4, min(10, (SCAN_BLOCK_ELEMENTS // per_step).bit_length() - 1))


def in_blocks(block, n_inputs, output_names, state_names):
    """The scan form from `block`, the scan of one stretch of steps (same signature as a form function; it
    returns its outputs [B, L, H, ...] and the states after its last step).

    Sequences longer than `scan_block_steps` run block by block, the states carried from one block to the next.
    The scan of a whole sequence would keep every doubling level of the [B, T, H, *S] states for its backward;
    here memory and time per step do not depend on T. Under autograd (`_BlockBackward`) the forward keeps the
    inputs and the state entering each block; the backward walks the blocks from the last, re-runs each under
    autograd from its entering state and writes its inputs' gradients into full-length buffers (one slice per
    block, never a full-size zero gradient per block). Under torch.compile the whole sequence is one block: the
    compiled graph then does not depend on the number of blocks, so lengths do not recompile."""
    names = (tuple(output_names), tuple(state_names))

    def run(*args):
        at = next(n for n, a in enumerate(args) if isinstance(a, dict))  # the states
        steps = scan_block_steps(args[at].values())
        if args[0].shape[1] <= steps or torch.compiler.is_compiling():
            return block(*args)
        layout, tensors = _flatten(args)
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            outputs, finals, _ = _run_blocks(block, args, n_inputs, at, steps)
            return outputs, finals
        flat = _BlockBackward.apply(block, layout, names, n_inputs, steps, *tensors)
        n = len(names[0])
        return dict(zip(names[0], flat[:n])), dict(zip(names[1], flat[n:]))

    return run


def _run_blocks(block, args, n_inputs, at, steps):
    """(outputs, final states, the states entering each block) of `block` run over blocks of `steps` steps."""
    pieces = [x.split(steps, dim=1) for x in args[:n_inputs]]
    states, entering, outputs = args[at], [], []
    for n in range(len(pieces[0])):
        entering.append(states)
        out, finals = block(*[p[n] for p in pieces], *args[n_inputs:at], states, *args[at + 1:])
        outputs.append(out)
        # A copy: the final state is a view of the block's [B, L, H, *S] states, which it would keep alive.
        states = {k: v.clone() for k, v in finals.items()}
    return {k: torch.cat([o[k] for o in outputs], dim=1) for k in outputs[0]}, states, entering


class _BlockBackward(torch.autograd.Function):
    """The scan form run block by block (`in_blocks`) under autograd: forward without a graph, keeping the inputs
    and the state entering each block; backward one block at a time from the last, re-running the block under
    autograd and carrying the states' gradient to the block before."""

    @staticmethod
    def forward(ctx, block, layout, names, n_inputs, steps, *tensors):
        args = _unflatten(layout, tensors)
        at = next(n for n, (kind, _) in enumerate(layout) if kind == "dict")
        with torch.no_grad():
            outputs, finals, entering = _run_blocks(block, args, n_inputs, at, steps)
        ctx.block, ctx.layout, ctx.names, ctx.n_inputs, ctx.steps, ctx.at = block, layout, names, n_inputs, steps, at
        ctx.where = _form_call()
        # An output the loss does not use comes to the backward as None, not zeros: no block differentiates it.
        ctx.set_materialize_grads(False)
        _save_with_states(ctx, tensors, entering, names[1])
        return tuple(outputs[n] for n in names[0]) + tuple(finals[n] for n in names[1])

    @staticmethod
    @_first_order("its backward re-runs each block of steps for first derivatives only")
    def backward(ctx, *grads):
        out_names, state_names = ctx.names
        n_in, at = ctx.n_inputs, ctx.at
        tensors, entering = _saved_with_states(ctx, state_names)
        args = _unflatten(ctx.layout, tensors)
        inputs, params, sizes = args[:n_in], args[n_in:at], args[at + 1:]
        need = ctx.needs_input_grad[5:]
        need_inputs, need_params = need[:n_in], need[n_in:at]
        pieces = [x.split(ctx.steps, dim=1) for x in inputs]
        grad_pieces = [g.split(ctx.steps, dim=1) if g is not None else None for g in grads[: len(out_names)]]
        # The inputs' gradients: full-length buffers, each block writes its own slice.
        buffers = [torch.empty(x.shape, dtype=x.dtype, device=x.device) if want else None
                   for x, want in zip(inputs, need_inputs)]
        buffer_pieces = [b.split(ctx.steps, dim=1) if b is not None else None for b in buffers]
        used = [False] * len(inputs)  # an input no block's results depend on gets None, as from one block
        param_grads = [None] * len(params)
        carried = dict(zip(state_names, grads[len(out_names):]))  # d loss / d (states after the block)
        for n in reversed(range(len(entering))):
            with torch.enable_grad():
                block_inputs = [p[n].detach().requires_grad_(want) for p, want in zip(pieces, need_inputs)]
                block_params = [p.detach().requires_grad_(want) for p, want in zip(params, need_params)]
                block_states = {k: v.detach().requires_grad_() for k, v in entering[n].items()}
                outputs, finals = ctx.block(*block_inputs, *block_params, block_states, *sizes)
            pairs = [(outputs[name], g[n]) for name, g in zip(out_names, grad_pieces) if g is not None]
            pairs += [(finals[name], carried[name]) for name in state_names if carried[name] is not None]
            pairs = [(r, g) for r, g in pairs if r.requires_grad]
            wanted = [t for t in block_inputs + block_params + list(block_states.values()) if t.requires_grad]
            got = (torch.autograd.grad([r for r, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
                   if pairs else [None] * len(wanted))
            got = iter(got)
            for i, t in enumerate(block_inputs):
                if t.requires_grad:
                    g = next(got)
                    if g is None:
                        buffer_pieces[i][n].zero_()
                    else:
                        buffer_pieces[i][n].copy_(g)
                        used[i] = True
            for i, t in enumerate(block_params):
                if t.requires_grad:
                    g = next(got)
                    if g is not None:
                        param_grads[i] = g if param_grads[i] is None else param_grads[i] + g
            carried = {name: next(got) for name in state_names}
        need_states = need[at:]
        state_grads = [carried[k] if want else None for k, want in zip(ctx.layout[at][1], need_states)]
        buffers = [b if u else None for b, u in zip(buffers, used)]
        return (None,) * 5 + tuple(buffers) + tuple(param_grads) + tuple(state_grads)


class _PrintedVJP(torch.autograd.Function):
    """A printed function of tensors (a chunked or scan form's prologue or epilogue) whose backward is its printed
    vector-Jacobian product: the forward runs without an autograd graph, the backward calls the VJP on the saved
    arguments and the outputs' gradients (zeros for an output the loss does not use)."""

    @staticmethod
    def forward(ctx, fn, vjp, n_tensors, *args):
        tensors, rest = args[:n_tensors], args[n_tensors:]
        ctx.vjp, ctx.rest, ctx.where = vjp, rest, _form_call()
        ctx.save_for_backward(*tensors)
        outs = fn(*args)
        # An output that is an argument itself (a bare input) is returned as a view, as autograd.Function needs.
        return tuple(o.view_as(o) if any(o is t for t in tensors) else o for o in outs)

    @staticmethod
    @_first_order("the backward of its prologue or epilogue is a printed vector-Jacobian product, which records no "
                  "graph")
    def backward(ctx, *grads):
        tensors = ctx.saved_tensors
        got = ctx.vjp(*tensors, *grads, *ctx.rest)
        return (None, None, None) + tuple(got) + (None,) * len(ctx.rest)


def with_vjp(fn, vjp, n_tensors: int):
    """`fn(*tensors, *sizes) -> tuple of tensors` as one autograd node whose backward is
    `vjp(*tensors, *grads of fn's outputs, *sizes) -> [gradient or None for each of the n_tensors tensors]`
    (each gradient of its tensor's shape): the chunked and scan forms' prologue and epilogue, their VJPs printed from
    sympy's derivatives (codegen/torch_forms.py `_write_printed_vjp`), so no graph is built through their ops."""

    def call(*args):
        return _PrintedVJP.apply(fn, vjp, n_tensors, *args)

    call.__name__ = getattr(fn, "__name__", "printed")
    return call


if "pack_result" not in globals():  # imported as a package module rather than copied beside calling.py
    from recurrence_dsl.calling import pack_result  # noqa: E402
    from recurrence_dsl.errors import CallError  # noqa: E402
