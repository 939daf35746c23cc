"""The compiled layer: one object per recurrence, the same in `recurrence_dsl.compile()` and generated modules.

A generated module defines, per recurrence, a subclass of `Layer` whose `__call__` has the recurrence's own
signature and an instance of it named like the recurrence; `compile()` imports that module and returns that
instance (or `instance.options(...)`, a copy with other defaults). So there is one set of arguments, one
backend rule and one set of checks, wherever a layer comes from.

Imports only torch and is copied verbatim into generated modules, next to `recurrence_dsl/calling.py`
(`bind_call`, `CallError`), `codegen/dispatch.py` (`run_forms`, `pick_form`) and `codegen/tuning.py` (the
tuning store a call reads, and the rule that decides which config a call runs).
"""

from __future__ import annotations

import ast
import os

import torch

BACKENDS = ("auto", "torch", "triton")
DEFAULT_CHUNK_SIZE = 64  # the chunked form's chunk length when neither the caller nor the store chooses one

# The keyword arguments a config may carry, per (form, backend): what the form functions accept. (The tuner's
# search space, autotune.space.SPACES, offers values for exactly these keys.)
CONFIG_KEYS = {
    ("chunked", "torch"): ("chunk_size",),
    ("chunked", "triton"): ("chunk_size", "block_k", "block_v", "num_warps", "num_stages"),
    ("parallel", "triton"): ("block_t", "block_k", "block_v", "num_warps", "num_stages"),
    ("recurrent", "triton"): ("num_warps",),
    ("scan", "triton"): ("block_t", "block_n", "num_warps"),
}


# The values of TRITON_INTERPRET that switch Triton's interpreter on, in any case (triton.knobs reads the variable
# so); any other value, "false" and "off" among them, leaves it off, and must here too.
_INTERPRET_ON = ("1", "true", "on", "yes", "y")


def interpreting() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set before import)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in _INTERPRET_ON


# Triton decides at import whether its kernels run in the interpreter, so the backend rule reads the setting
# as it was when this module (and its kernels) were imported, not as it is at call time.
_INTERPRETING = interpreting()


def _needs_triton() -> str:
    """Why backend='triton' cannot run: triton does not import, with that import's own error (a generated module's
    TRITON_IMPORT_ERROR: triton missing, or present but missing what it needs, such as numpy)."""
    why = globals().get("TRITON_IMPORT_ERROR")
    return ("backend='triton' needs triton, which does not import here" + (f" ({why})" if why else "")
            + ": install it (pip install triton), or what its import error names; or use backend='torch'")


def _runs_triton(device: torch.device) -> bool:
    """Whether Triton kernels run on tensors of `device`: CUDA, or the CPU in Triton's interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and _INTERPRETING)


# The forms whose kernels take the call's chunk_size as a block dimension, where Triton's power-of-two rule binds.
# (The parallel form runs the chunked function with chunk_size = its length, `run_forms`: the call's is unused.)
CHUNKING_FORMS = ("chunked",)


def _chunk_size_error(chunk_size, backend: str) -> str | None:
    """Why `chunk_size` cannot run a chunking form on `backend`, or None. Pass backend "torch" when no chunking
    form runs: the value must still be an integer >= 1, but Triton's power-of-two rule (a block dimension) only
    binds the Triton chunked kernels."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        return f"chunk_size must be an integer >= 1, got {chunk_size!r}"
    if backend == "triton" and (chunk_size < 16 or chunk_size & (chunk_size - 1)):
        return f"chunk_size must be a power of two >= 16 on the triton backend, got {chunk_size}"
    return None


def _form_error(spec, form: str, forms: dict, triton_forms: dict | None, backend: str) -> str | None:
    """Why `form` cannot run on `backend` ("auto" always can), or None. A form the analysis did not derive is
    explained as `recdsl show` explains it: why not, then the recurrence's class and the forms it has."""
    if form != "auto" and form not in forms:
        why = dict(spec.unavailable).get(form)
        if why is None:  # not a form name at all
            return f"{spec.name} has no {form!r} form: choose from {', '.join(forms)} or auto"
        return (f"{spec.name} has no {form!r} form: {why} ({spec.name}: class {spec.recurrence_class}; "
                f"forms: {', '.join(forms)}, or auto)")
    if backend == "triton" and form != "auto" and triton_forms is not None and form not in triton_forms:
        why = dict(getattr(spec, "triton_unavailable", ())).get(form)
        return (f"{spec.name} has no {form!r} form on the triton backend" + (f" ({why})" if why else "")
                + f"; it has {', '.join(triton_forms)} (use backend='torch' for the others)")
    return None


def check_steps_error(check_steps) -> str | None:
    """Why `check_steps` (a layer's, a module's or a call's option) is not a bool, or None."""
    if not isinstance(check_steps, bool):
        return f"check_steps must be True or False, got {check_steps!r}"
    return None


def defaults_error(spec, forms: dict, triton_forms: dict | None, form, backend, chunk_size) -> str | None:
    """Why a layer's (or a generated module's) defaults `form`, `backend` and `chunk_size` cannot run, or None.
    chunk_size meets Triton's power-of-two rule when the backend is "triton" and a chunking form may run (form
    auto or chunked); under backend "auto" a CPU call runs torch, where any chunk_size >= 1 works, so the rule is
    checked per call."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}"
    if backend == "triton" and triton_forms is None:
        return _needs_triton()
    chunking = backend == "triton" and form in ("auto", *CHUNKING_FORMS) and any(f in triton_forms
                                                                                 for f in CHUNKING_FORMS)
    return _form_error(spec, form, forms, triton_forms, backend) or (
        None if chunk_size is None else _chunk_size_error(chunk_size, "triton" if chunking else "torch"))


class Layer:
    """A recurrence compiled to torch forms and (when triton imports) Triton forms; call it like the reference.

    spec: the declarations (name, inputs, params, states, outputs, sizes, spec_hash); forms / triton_forms:
    form name -> form function (`triton_forms` None without triton). form, backend: the defaults of every call.
    chunk_size: None (64, and a tuned config may replace it) or an explicit chunk length, which every call
    without its own `chunk_size=`/`config=` runs: an explicit chunk_size always wins over the store. tuning:
    where a call looks its config up (see codegen/tuning.py for the store rule and the order of precedence):
    True (the rule's store), a path, or False (never).

    check_steps: True (default) or False, the default of every call without its own `check_steps=`. True: before
    their masked matmuls the chunked and parallel forms check each step's values (`_check_steps`: a non-finite
    input, a log decay that is NaN or > 0; and `_require_positive`, a decay the form takes the log of), at the
    cost of reading the inputs once more and one host sync per state; from the first unsafe step on the steps
    run one at a time, as the reference runs them, so the results match it for any values. False skips the
    checks and their syncs (no host read of a value, so the CPU can run ahead of the GPU): the forms then give
    whatever their matmuls give. A NaN or inf at one step can then spread to earlier steps of its chunk (a masked
    matmul multiplies it by the zeros above the diagonal), a log decay > 0 can overflow, and a decay < 0 whose log
    the form takes gives NaN on the torch backend, wrong finite values on the Triton one (where "auto" would
    otherwise have stepped through).
    Finite inputs with log decays <= 0 give exactly what check_steps=True gives.

    Under torch.compile a call is one call of the recurrence's custom op, `recurrence_dsl::<name>_<spec hash>`
    (registered at the first layer of the spec in the process; see `_LayerOp`), so `torch.compile(model,
    fullgraph=True, dynamic=True)` of a model of layers compiles one graph for every sequence length, forward and
    backward. Eager calls run the forms directly.
    """

    def __init__(self, spec, forms: dict, triton_forms: dict | None, *, form: str = "auto", backend: str = "auto",
                 chunk_size: int | None = None, tuning=True, check_steps: bool = True):
        # CallError (a ValueError), as a call with the same bad argument raises: compile(rec, form="chunked") and
        # layer(..., form="chunked") of a recurrence without a chunked form fail alike.
        why = defaults_error(spec, forms, triton_forms, form, backend, chunk_size) or check_steps_error(check_steps)
        if why:
            raise CallError(why)  # noqa: F821
        if not (isinstance(tuning, (bool, str)) or hasattr(tuning, "__fspath__")):
            raise CallError(f"tuning must be True, False or a store path, got {type(tuning).__name__}")  # noqa: F821
        self.recurrence = spec
        self.forms = forms
        self.triton_forms = triton_forms
        self.form, self.backend, self.tuning, self.check_steps = form, backend, tuning, check_steps
        self.chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
        self.chunk_size_given = chunk_size is not None  # an explicit chunk_size always wins over the store
        # The op is registered here, not at the first compiled call: Dynamo cannot trace a registration.
        self._op, self._op_index = _layer_op(self)
        # How a pickle rebuilds this layer when its module cannot be imported by name (`__reduce_ex__`): None, or
        # (build, source) with build(*source, form, backend, chunk_size, tuning, check_steps) -> the layer;
        # compile() sets it.
        self._rebuild = None

    @property
    def name(self) -> str:
        return self.recurrence.name

    @property
    def source(self) -> str:
        """The text of the module this layer was generated into."""
        import sys

        with open(sys.modules[type(self).__module__].__file__) as f:
            return f.read()

    def options(self, *, form: str | None = None, backend: str | None = None, chunk_size: int | None = None,
                tuning=None, check_steps: bool | None = None):
        """A copy of this layer with other defaults (None keeps this layer's); check_steps: see the class."""
        return type(self)(self.recurrence, self.forms, self.triton_forms,
                          form=self.form if form is None else form,
                          backend=self.backend if backend is None else backend,
                          chunk_size=(self.chunk_size if self.chunk_size_given else None) if chunk_size is None
                          else chunk_size,
                          tuning=self.tuning if tuning is None else tuning,
                          check_steps=self.check_steps if check_steps is None else check_steps,
                          )._rebuilt_by(self._rebuild)

    def _rebuilt_by(self, rebuild):
        """This layer, pickled as `rebuild` says (see `_rebuild` in `__init__`)."""
        self._rebuild = rebuild
        return self

    def backend_for(self, device: torch.device, dtype: torch.dtype, backend: str | None = None,
                    form: str = "auto") -> str:
        """The backend a call on `device` with inputs of `dtype` runs `form` on: "auto" takes triton for CUDA
        tensors (or CPU tensors when TRITON_INTERPRET=1 was set before import) when triton imports and has the
        form; torch otherwise, for float64 and for other devices (meta, mps)."""
        backend = self.backend if backend is None else backend
        if backend not in BACKENDS:
            raise CallError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")  # noqa: F821
        if backend != "auto":
            return backend
        if (self.triton_forms is not None and dtype != torch.float64 and (form == "auto" or form in self.triton_forms)
                and _runs_triton(device)):
            return "triton"
        return "torch"

    def pick_form(self, length: int, chunk_size: int | None = None) -> str:
        """The form "auto" runs on the torch backend for a sequence of `length` steps."""
        return pick_form(tuple(self.forms), length, self.chunk_size if chunk_size is None else chunk_size,  # noqa: F821
                         scan_first=self.recurrence.scan_first)

    def _call(self, args: tuple, kwargs: dict, form, backend, chunk_size, config, check_steps=None):
        """Bind and check a call, choose backend, form and config, and run it (see `__call__`).

        Under torch.compile the checks run while Dynamo traces (so a bad call raises the same `CallError` as in
        eager mode, at trace time) and the run is one call of the recurrence's op (`_layer_op`), which Dynamo
        and AOTAutograd take as opaque; in eager mode the forms run directly, as fast as before the op existed
        (the op keeps a table of autograd graphs and falls back to recomputing, which an eager call need not)."""
        compiling = torch.compiler.is_compiling()
        try:
            # (while tracing, cu_seqlens' boundaries are values Dynamo does not have: the op checks them, `_op_results`)
            check = self._resolved_check_steps(check_steps)
            call = bind_call(self.recurrence, args, kwargs, check_values=not compiling)  # noqa: F821 - calling.py
            backend, _, form, chunk, options, _, _ = self._plan(call, form, backend, chunk_size, config)
            if compiling:
                return self._through_op(call, form, backend, chunk, options, check)
            return self._run(call, form, backend, chunk, options, check)
        except RuntimeError as err:
            if compiling or not _functorch_active():  # (compiling first: Dynamo need not trace that query)
                raise
            # torch.func's transforms meet the forms' autograd.Functions (no setup_context) or a host read of a
            # value (vmap: the call's checks, a form's step check); under grad, torch's own error names neither.
            said = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CallError(  # noqa: F821
                f"{self.name}: torch.func transforms (grad, vjp, jacrev, jvp, vmap) are not supported here: the "
                "forms' backwards are torch.autograd.Functions without functorch rules, and a call reads values on "
                "the host. Take gradients with torch.autograd.grad or .backward() and batch along the batch axis; "
                "or, for torch.func.grad, run backend='torch', form='recurrent' with "
                "RECURRENCE_DSL_RECURRENT_BACKWARD=autograd in the environment (autograd through its step loop, "
                f"which torch.func differentiates). (torch: {said[:200]})") from None

    def _resolved_check_steps(self, check_steps) -> bool:
        """A call's check_steps: its own (checked: CallError for one that is not a bool), else this layer's."""
        if check_steps is None:
            return self.check_steps
        why = check_steps_error(check_steps)
        if why:
            raise CallError(why)  # noqa: F821
        return check_steps

    def _run(self, call, form: str, backend: str, chunk: int, options: dict, check_steps: bool = True):
        """Run a planned call through the forms (options: form name -> that form's keyword arguments)."""
        fns = self.triton_forms if backend == "triton" else self.forms
        if backend == "triton":
            options = triton_options(call, options)  # noqa: F821 - from dispatch.py
        return run_forms(self.recurrence, fns, call, form, chunk, options,  # noqa: F821 - from dispatch.py
                         grid_limits=backend == "triton", backend=backend, check_steps=check_steps)

    def config_for(self, *args, form: str | None = None, backend: str | None = None, chunk_size: int | None = None,
                   config: dict | None = None, check_steps: bool | None = None, **kwargs) -> dict:
        """Which config a call with these arguments would run, and why, without running it: {"backend",
        "form" (the form "auto" resolves to), "chunk_size" (the chunk its kernels run), "config" (the block sizes
        handed to the form, {} when none), "source" ("call", "compile", "store" or "default"), "why" (in words)}.
        Raises CallError as the call would. The precedence is codegen/tuning.py's: call > compile's chunk_size > store >
        default. Shapes decide, not values: where the chunked or parallel form meets a decay that is not positive (say a
        negative retention `gamma`), a call under form "auto" steps instead (an explicit form raises
        DecayNotPositive), and from a non-finite step on, any call steps (with check_steps on). check_steps, which
        chooses no config, is taken and checked as the call checks it."""
        self._resolved_check_steps(check_steps)
        call = bind_call(self.recurrence, args, kwargs)  # noqa: F821 - from calling.py
        backend, fns, form, chunk, options, source, why = self._plan(call, form, backend, chunk_size, config)
        resolved = form if form != "auto" else self._auto_form(call, fns, chunk, backend)
        # the chunk its kernels run (the Triton delta rule's under float32 dots: at most 32 steps, `chunk_run`)
        given = triton_options(call, options) if backend == "triton" else options  # noqa: F821 - from dispatch.py
        runs = chunk_run(fns.get(resolved), chunk, given.get(resolved, {}))  # noqa: F821 - from dispatch.py
        why, chunk = (why, chunk) if runs == chunk else (f"{why}; its kernels run chunks of {runs} steps", runs)
        return {"backend": backend, "form": resolved, "chunk_size": chunk,
                "config": dict(options.get(resolved, {})), "source": source, "why": why}

    def _plan(self, call, form, backend, chunk_size, config):
        """(backend, form functions, form, chunk, options per form, source, why) of a bound call."""
        form = self.form if form is None else form
        why = _form_error(self.recurrence, form, self.forms, None, "torch")
        if why:
            raise CallError(why)  # noqa: F821
        if config is not None and chunk_size is not None:
            raise CallError("give chunk_size or config, not both (a config carries its own chunk_size)")  # noqa: F821
        backend = self.backend_for(call.device, call.dtype, backend, form)
        if backend == "triton":
            if self.triton_forms is None:
                raise CallError(_needs_triton())  # noqa: F821
            if not _runs_triton(call.device) and call.device.type != "meta":  # (meta: shapes only, any backend)
                raise CallError(f"backend='triton' runs CUDA tensors, or CPU tensors in Triton's interpreter "  # noqa: F821
                                f"(TRITON_INTERPRET=1 set before triton is imported); got {call.device.type} "
                                "tensors: use backend='torch' (or 'auto')")
            if call.dtype == torch.float64:
                raise CallError("backend='triton' takes float16, bfloat16 or float32 inputs, got float64; "  # noqa: F821
                                "use backend='torch' (or 'auto')")
            why = _form_error(self.recurrence, form, self.forms, self.triton_forms, backend)
            if why:
                raise CallError(why)  # noqa: F821
        fns = self.triton_forms if backend == "triton" else self.forms
        chunk = self.chunk_size if chunk_size is None else chunk_size
        why = _chunk_size_error(chunk, backend if self._chunks(call, form, fns, chunk) else "torch")
        if config is not None or chunk_size is not None:
            source, reason = "call", "given to the call"
        elif self.chunk_size_given:
            source, reason = "compile", f"chunk_size={self.chunk_size} given to compile(): it wins over the store"
        elif self.tuning is False:
            source, reason = "default", "tuning lookups off for this layer (tuning=False)"
        elif why:
            source, reason = "default", why
        elif torch.compiler.is_compiling():  # file access cannot be traced: see codegen/tuning.py
            source, reason = "default", "torch.compile is tracing: the store is not read (pass chunk_size=)"
        else:
            resolved = form if form != "auto" else self._auto_form(call, fns, chunk, backend)
            config, reason = tuning_lookup(self, call, resolved, backend,  # noqa: F821 - from tuning.py
                                           CONFIG_KEYS.get((resolved, backend)),
                                           None if self.tuning is True else self.tuning)
            source = "store" if config is not None else "default"
        options = {}
        if config is not None:
            # the store's config is for the form it was looked up for; a call's under auto goes to every form
            # taking its keys, so that the one auto runs gets its share
            given = form if form != "auto" else (resolved if source == "store" else None)
            shares = self._config_forms(config, given, fns, backend)
            chunk = config.get("chunk_size", chunk)
            if form == "auto" and source == "call" and call.cu_seqlens is None:
                picks = chunk if isinstance(chunk, int) and chunk >= 1 else 1  # (a bad chunk_size is named below)
                runs = self._auto_form(call, fns, picks, backend)
                blocks = [k for k in config if k != "chunk_size"]
                if blocks and not set(shares.get(runs, {})) - {"chunk_size"}:
                    takers = [f for f, share in shares.items() if set(share) - {"chunk_size"}]
                    forms = " and ".join(takers) + (" forms" if len(takers) > 1 else " form")
                    raise CallError(f"config {', '.join(blocks)} is for the {forms}, but auto "  # noqa: F821
                                    f"runs the {runs} form for this call ({call.length} steps): pass form= to run "
                                    "one that takes it, or leave those keys out")
            why = _chunk_size_error(chunk, backend if self._chunks(call, form, fns, chunk, given) else "torch")
            options = {f: {k: v for k, v in share.items() if k != "chunk_size"} for f, share in shares.items()}
        if why:
            raise CallError(why)  # noqa: F821
        return backend, fns, form, chunk, options, source, reason

    def _auto_form(self, call, fns: dict, chunk: int, backend: str) -> str:
        """The form "auto" runs for the whole of `call` (one sequence length: packed sequences pick per length)."""
        # The Triton scan form's held tensors, counted only where `pick_form` weighs the scan form.
        rows = 1 if call.cu_seqlens is not None else call.num_sequences
        held = ((lambda: scan_held_bytes(self.recurrence, call, call.length, rows))  # noqa: F821 - from dispatch.py
                if backend == "triton" else 0)
        return pick_form(tuple(fns), call.length, chunk, 1, held, self.recurrence.scan_first)  # noqa: F821

    def _chunks(self, call, form: str, fns: dict, chunk, target: str | None = None) -> bool:
        """Whether the call may run a form whose kernels take the chunk length (`CHUNKING_FORMS`: chunked), so the
        backend's chunk_size rule binds: the form given; with "auto", the config's form (`target`) or the one auto
        picks for the call's length, and any chunking form the recurrence has when packed sequences each pick
        their own. The recurrent, scan and parallel forms ignore chunk_size (auto reads it only to pick the
        parallel form for a length up to it), so the Triton rule must not refuse them."""
        if form != "auto":
            return form in CHUNKING_FORMS
        if target is not None:
            return target in CHUNKING_FORMS
        if not any(f in fns for f in CHUNKING_FORMS):
            return False
        # (Under torch.compile the length is symbolic: picking would guard on it, so the rule binds as before.)
        if call.cu_seqlens is not None or torch.compiler.is_compiling():
            return True
        picks = pick_form(tuple(fns), call.length, chunk if isinstance(chunk, int) and chunk >= 1 else 1,  # noqa: F821
                          scan_first=self.recurrence.scan_first)
        return picks in CHUNKING_FORMS

    def _through_op(self, call, form: str, backend: str, chunk: int, options: dict, check_steps: bool = True):
        """A planned call as one call of the recurrence's op (what torch.compile traces); the op runs `_op_forward`
        of this layer. (The tuning store is not read while tracing: codegen/tuning.py.)"""
        spec = self.recurrence
        tensors = [call.inputs[s.name] for s in spec.inputs] + [call.params[s.name] for s in spec.params]
        if call.initial_state is not None:
            tensors += [call.initial_state[s.name] for s in spec.states]
        # Which tensors a backward will want gradients of, known while Dynamo traces (it guards on grad mode and
        # on its inputs' requires_grad): with any, the op keeps its forward's autograd graph for the backward op
        # and returns one more output, the token naming it (ignored here: `flat` is indexed below).
        needs = [torch.is_grad_enabled() and t.requires_grad for t in tensors]
        flat = self._op(tensors, call.cu_seqlens, form, backend, chunk, _encode_options(options),
                        call.output_final_state, call.reverse, check_steps, self._op_index,
                        needs if any(needs) else None)
        count = len(spec.outputs)
        outputs = {o.name: flat[n] for n, o in enumerate(spec.outputs)}
        finals = {s.name: flat[count + n] for n, s in enumerate(spec.states)} if call.output_final_state else None
        return pack_result(spec, outputs, finals)  # noqa: F821 - from calling.py

    # The op's kernels for this layer's calls (see `_LayerOp`), in the order: forward, fake, backward.
    def _op_results(self, tensors, cu_seqlens, form, backend, chunk_size, options, output_final_state,
                    reverse, check_steps=True) -> list:
        """The outputs (and final states) of one call from the op's arguments, bound and checked again, now with
        the values (`cu_seqlens`' boundaries), and run as an eager call runs."""
        spec = self.recurrence
        count = len(spec.inputs) + len(spec.params)
        states = list(tensors[count:])
        kwargs = {"initial_state": {s.name: t for s, t in zip(spec.states, states)} if states else None,
                  "output_final_state": output_final_state, "cu_seqlens": cu_seqlens, "reverse": reverse}
        call = bind_call(spec, tuple(tensors[:count]), kwargs)  # noqa: F821 - from calling.py
        output, final = self._run(call, form, backend, chunk_size, _decode_options(options), check_steps)
        flat = list(output) if len(spec.outputs) > 1 else [output]
        if final is not None:
            flat += [final[s.name] for s in spec.states] if isinstance(final, dict) else [final]
        return flat

    def _op_forward(self, tensors, cu_seqlens, *static) -> list:
        """The op's outputs, run without autograd: contiguous, aliasing neither the inputs nor each other."""
        with torch.no_grad():
            return _unaliased(self._op_results(tensors, cu_seqlens, *static), tensors)

    def _op_fake(self, tensors, cu_seqlens, output_final_state) -> list:
        """Empty outputs [B, T, H, dims] in the inputs' dtype and final states [N, H, dims] in the compute dtype,
        the sizes read from the arguments' shapes (symbolic under torch.compile(dynamic=True))."""
        spec = self.recurrence
        sizes, at = {}, 0
        for symbols, lead in ((spec.inputs, 3), (spec.params, 1), (spec.states, 2)):
            for sym, t in zip(symbols, tensors[at:at + len(symbols)]):
                for pos, dim in enumerate(sym.dims):
                    if isinstance(dim, str):
                        sizes.setdefault(dim, t.shape[lead + pos])
            at += len(symbols)

        def dims(sym) -> tuple:
            return tuple(sizes[d] if isinstance(d, str) else d for d in sym.dims)

        first = tensors[0]
        batch, length, heads = first.shape[:3]
        results = [first.new_empty((batch, length, heads) + dims(o)) for o in spec.outputs]
        if output_final_state:
            rows = batch if cu_seqlens is None else cu_seqlens.shape[0] - 1
            results += [first.new_empty((rows, heads) + dims(s), dtype=compute_dtype(first.dtype))  # noqa: F821
                        for s in spec.states]
        return results

    def _op_backward(self, tensors, cu_seqlens, grads, needs, *static) -> list:
        """The gradients of the tensors in `needs`: the forward recomputed under autograd, then differentiated (the
        op's backward when its forward kept no graph it can use: see `_LayerOp`)."""
        leaves = [t.detach().requires_grad_(need) for t, need in zip(tensors, needs)]
        with _autograd_reenabled(), torch.enable_grad():
            flat = self._op_results(leaves, cu_seqlens, *static)
            return _grads(flat, grads, [t for t in leaves if t.requires_grad])

    @staticmethod
    def _config_forms(config, form: str | None, fns: dict, backend: str) -> dict[str, dict]:
        """form -> its share of a config (`form` when given, else every form of `fns` taking some of its keys),
        the config checked (dispatch.py's `config_forms`): a config may give some of a form's keys."""
        accepted = {f: CONFIG_KEYS[(f, backend)] for f in ([form] if form else fns) if (f, backend) in CONFIG_KEYS}
        return config_forms(config, accepted, backend, form)  # noqa: F821 - from dispatch.py

    def __call__(self, *args, form: str | None = None, backend: str | None = None, chunk_size: int | None = None,
                 config: dict | None = None, check_steps: bool | None = None, **kwargs):
        """`(output, final_state)`; the arguments of the calling convention (docs/language.md) plus form, backend,
        chunk_size, check_steps (defaults: this layer's; check_steps=False skips the chunked and parallel forms'
        value checks and their host sync, see the class) and config (a tuning config for the form that runs)."""
        return self._call(args, kwargs, form, backend, chunk_size, config, check_steps)

    def __reduce_ex__(self, protocol: int):
        """Pickle (`torch.save` of a model holding this layer) by how to rebuild the layer, not by its form
        functions (closures, which do not pickle): a `recurrence_dsl.compile()` layer by its spec's source text
        and its defaults, rebuilt through compile() when loaded; a layer of a generated module imported by name
        (a file on sys.path) by that module and its defaults. Raises pickle.PicklingError for a layer whose
        module cannot be imported by name and that compile() did not make (e.g. `codegen.load.load_layer`'s)."""
        import pickle
        import sys

        chunk_size = self.chunk_size if self.chunk_size_given else None
        defaults = (self.form, self.backend, chunk_size, self.tuning, self.check_steps)
        if self._rebuild is not None:
            build, source = self._rebuild
            return build, (*source, *defaults)
        module = sys.modules.get(type(self).__module__)
        if getattr(module, "__spec__", None) is None:  # executed from text (the cache), not found by an import
            raise pickle.PicklingError(
                f"cannot pickle the {self.name} layer: its module {type(self).__module__} was not imported by "
                "name, so another process could not find it; pickle a layer of recurrence_dsl.compile(...) or "
                "of a generated module imported from a file on sys.path")
        return _module_layer, (module.__name__, self.name, *defaults)

    # Copies stay in this process: copy the attributes, as without `__reduce_ex__` (no rebuild from source).
    def __copy__(self):
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        return twin

    def __deepcopy__(self, memo: dict):
        import copy

        twin = object.__new__(type(self))
        memo[id(self)] = twin
        twin.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return twin

    def __repr__(self) -> str:
        return f"<{self.name} layer: forms {', '.join(self.forms)}; backend={self.backend!r}, form={self.form!r}>"


def _module_layer(module_name: str, name: str, form: str, backend: str, chunk_size: int | None, tuning,
                  check_steps: bool = True):
    """The layer `name` of the generated module `module_name` with these defaults: a pickled layer, loaded (one
    pickled before check_steps existed passes none: True)."""
    import importlib

    return getattr(importlib.import_module(module_name), name).options(form=form, backend=backend,
                                                                        chunk_size=chunk_size, tuning=tuning,
                                                                        check_steps=check_steps)


def _functorch_active() -> bool:
    """Whether a torch.func transform (grad, vmap, ...) is running (a private torch query; False where it is gone)."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


# ----------------------------------------------------------------------------------------------------------------
# torch.compile: one torch.library custom op per recurrence.
#
# Dynamo cannot trace the forms: they read values on the host (the chunked forms' `_check_steps` sync, packed
# sequences' `cu_seqlens.tolist()`, the fall-back to the step-by-step form on an unsafe step) and branch on them.
# So under torch.compile a layer call is one opaque op, `recurrence_dsl::<name>_<spec hash>`, taking the flat
# tensors (inputs, params, initial states or none, cu_seqlens or none) and the static choices (form, backend,
# chunk_size, block sizes, output_final_state, reverse, check_steps, and which layer), and returning the outputs
# and, when asked, the final states. Its fake implementation gives the shapes from the spec's dims and the
# arguments' shapes, so a symbolic T flows through and one graph serves every length.
#
# Its autograd formula is a second op, `..._backward`. A training step must run the forward once (issue 9), but
# AOTAutograd runs the op's kernel with autograd off and cannot see inside it, and the forms' residuals are
# form-, length- and data-dependent (autograd through the chunked form, the fall-back to the step-by-step form,
# the Triton path's own saved tensors), so they cannot be declared as outputs with shapes the fake knows. So the
# forward op takes one more static argument, `needs` (which tensors a backward wants gradients of; _through_op
# reads requires_grad and grad mode while Dynamo traces, and Dynamo guards on both): when any, its kernel runs the
# forms under autograd (`_autograd_reenabled`) on detached leaves, keeps (leaves, outputs) in the op's table under
# an integer token, and returns the token as one more output, a 0-dim int64 CPU tensor (the fake returns one too).
# The backward op takes the token, pops the entry and differentiates it (torch.autograd.grad), so whatever backward
# the form has runs inside it, unchanged. It also takes the forward's outputs, unused, so a compiled graph cannot
# reuse their memory while the kept graph may still read them.
#
# Correctness never depends on the table: with no usable entry (evicted, popped by a first backward through
# retain_graph, a process that never ran this forward, a tensor changed in place since) the backward op recomputes
# the forward under autograd from its saved inputs, as it did before the table existed. The table cannot grow
# without bound: an entry goes when its token tensor dies (the step's graph freed without a backward: validation
# under grad, an exception) and the oldest go past STORED_FORWARDS_LIMIT live entries; a lock guards it. Without
# `needs` (torch.no_grad, inference_mode, no tensor requiring grad, callers of the op that leave it out) the op
# keeps nothing and returns no token. (retain_graph under torch.compile also needs
# torch._functorch.config.donated_buffer=False, as any compiled graph saving an intermediate does.) Eager calls
# keep calling the forms directly (Layer._call): autograd records them with no op in between.
#
# The op is keyed by the spec's hash, so a module loaded twice in one process (the compile() cache and a file
# written by `recdsl compile`) registers it once: the second finds it in a table kept on the `torch.ops` namespace
# object (shared by every copy of this code, which a module-level dict here would not be). The op's `layer`
# argument indexes the layers of that table, and every kernel runs the methods of that layer (Layer._op_*), so
# each module's layers run their own module's code; the table of kept graphs is the registering copy's `_LayerOp`.
# ----------------------------------------------------------------------------------------------------------------

OP_NAMESPACE = "recurrence_dsl"
_OP_TABLE = "_recurrence_dsl_layer_ops"  # attribute of torch.ops.recurrence_dsl: op name -> _LayerOp
_OP_SCHEMA = ("(Tensor[] tensors, Tensor? cu_seqlens, str form, str backend, int chunk_size, str options, "
              "bool output_final_state, bool reverse, bool check_steps, int layer, bool[]? needs=None) -> Tensor[]")
_OP_BACKWARD_SCHEMA = ("(Tensor[] tensors, Tensor? cu_seqlens, Tensor[] results, Tensor? token, Tensor?[] grads, "
                       "bool[] needs, str form, str backend, int chunk_size, str options, bool output_final_state, "
                       "bool reverse, bool check_steps, int layer) -> Tensor[]")
# In every op's name: a copy of this code whose schemas differ (a module written by an earlier version, loaded
# beside a newer one) registers ops of other names, rather than calling ops of another schema. Version 2: reverse;
# 3: check_steps.
_OP_SCHEMA_VERSION = 3
# At most this many forwards' graphs are kept for their backward (oldest dropped first): a graph is also dropped
# when its token dies, so this bounds only forwards whose outputs stay alive without a backward (each holds what
# eager autograd would hold for it). A backward whose graph was dropped recomputes the forward.
STORED_FORWARDS_LIMIT = 256


def op_name(spec) -> str:
    """The op's name in the `recurrence_dsl` namespace: `<name>_<spec hash>_v<schema version>` (ASCII letters,
    digits and _)."""
    name = "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in spec.name)
    return f"{name}_{spec.spec_hash}_v{_OP_SCHEMA_VERSION}"


def _encode_options(options: dict) -> str:
    """Per-form options ({form: {key: int or bool}}) as the op's `options` string ("" for none):
    `form.key=repr(value)` items, sorted, comma-separated (plain string formatting, which Dynamo traces; json.dumps
    it does not)."""
    return ",".join(f"{form}.{k}={v!r}" for form, values in sorted(options.items()) for k, v in sorted(values.items()))


def _decode_options(text: str) -> dict:
    options: dict = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=", 1)
        form, name = key.split(".", 1)
        options.setdefault(form, {})[name] = ast.literal_eval(value)
    return options


def _unaliased(flat: list, tensors: list) -> list:
    """`flat` made contiguous and aliasing neither `tensors` nor each other (copies where they would), as an op's
    outputs must be (the final state of an empty sequence is its initial state), laid out as the fake ones are."""
    seen = {t.untyped_storage().data_ptr() for t in tensors if t.numel()}
    # (No assignment inside an `if` here or below: module.py's name check counts those as module names.)
    results = []
    for value in flat:
        value = value.contiguous()
        value = value.clone() if value.numel() and value.untyped_storage().data_ptr() in seen else value
        seen.add(value.untyped_storage().data_ptr())
        results.append(value)
    return results


def _grads(flat: list, grads: list, wanted: list) -> list:
    """The gradients of `wanted` (leaves) given the incoming `grads` of `flat` (None: no gradient), zeros for a
    leaf the outputs do not depend on. Called under `_autograd_reenabled()`."""
    pairs = [(r, g) for r, g in zip(flat, grads) if g is not None and r.requires_grad]
    got = (torch.autograd.grad([r for r, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
           if pairs and wanted else [None] * len(wanted))
    return [torch.zeros_like(t) if g is None else g.contiguous() for g, t in zip(got, wanted)]


def _autograd_reenabled():
    """A guard under which autograd records again inside an op's kernel: torch runs custom-op kernels below
    autograd (its autograd dispatch keys excluded, thread-locally), so without it the backward's recompute
    would build no graph to differentiate. There is no public API for this; torch's own leaf functions
    (torch/_higher_order_ops/invoke_leaf_function.py) use the same private guard."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor, keys.ADInplaceOrView):
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


class _LayerOp:
    """A recurrence's forward and backward ops, the layers (of every module copy) that call them, and the autograd
    graphs its forwards keep for its backward.

    The table of kept graphs, by token (an int): `_keep` returns the token as a 0-dim int64 CPU tensor (read in the
    backward without a device sync) and drops the entry when that tensor dies (the step's graph freed without a
    backward: a forward under grad for validation, an exception) or when more than `limit` entries live (oldest
    first); `_take` removes it once. A lock guards it: a token may die on any thread, this one included."""

    def __init__(self, name: str):
        import itertools
        import threading

        self.layers: list = []
        self.keys: dict = {}
        self.stored: dict = {}  # token -> (leaves, roots, weak reference to the token tensor); oldest first
        self.limit = STORED_FORWARDS_LIMIT
        self._tokens = itertools.count(1)
        self._lock = threading.RLock()
        qualified = f"{OP_NAMESPACE}::{name}"
        # The forms read values on the host (syncs), so a CUDA graph may not capture the op: inductor's cudagraph
        # trees run it between graphs.
        tags = tuple(t for t in (getattr(torch.Tag, "cudagraph_unsafe", None),) if t is not None)
        forward = torch.library.custom_op(qualified, self._forward, mutates_args=(), schema=_OP_SCHEMA, tags=tags)
        forward.register_fake(self._forward_fake)
        backward = torch.library.custom_op(qualified + "_backward", self._backward, mutates_args=(),
                                           schema=_OP_BACKWARD_SCHEMA, tags=tags)
        backward.register_fake(self._backward_fake)
        forward.register_autograd(self._differentiate, setup_context=self._setup_context)
        packet = getattr(torch.ops, OP_NAMESPACE)
        self.forward = getattr(packet, name).default
        self.backward = getattr(packet, name + "_backward").default

    def add(self, layer) -> int:
        """The op's `layer` argument for `layer`; layers that run alike (same class, forms and store) share one."""
        index = self.keys.setdefault((type(layer), id(layer.forms), id(layer.triton_forms), str(layer.tuning)),
                                     len(self.layers))
        if index == len(self.layers):
            self.layers.append(layer)  # kept: the ids in the key stay those of live objects
        return index

    # The kernels: each hands the forms' run to the layer it names (its own module's code).
    def _forward(self, tensors, cu_seqlens, form, backend, chunk_size, options, output_final_state, reverse,
                 check_steps, layer, needs=None):
        static = (form, backend, chunk_size, options, output_final_state, reverse, check_steps)
        if not needs or not any(needs):
            return self.layers[layer]._op_forward(tensors, cu_seqlens, *static)
        # A backward will follow: run the forms under autograd on detached leaves and keep the graph, so the
        # backward op differentiates it instead of running the forward again.
        leaves = [t.detach().requires_grad_(bool(need)) for t, need in zip(tensors, needs)]
        with _autograd_reenabled(), torch.enable_grad():
            # The copies _unaliased makes are recorded too: each output is the very tensor differentiated.
            roots = _unaliased(self.layers[layer]._op_results(leaves, cu_seqlens, *static), leaves)
        # (detach shares the version counter: an output changed in place makes the kept graph refuse, and the
        # backward recomputes.)
        return [r.detach() for r in roots] + [self._keep(leaves, roots)]

    def _forward_fake(self, tensors, cu_seqlens, form, backend, chunk_size, options, output_final_state, reverse,
                      check_steps, layer, needs=None):
        results = self.layers[layer]._op_fake(tensors, cu_seqlens, output_final_state)
        # The token: a CPU tensor whatever the inputs' device, as `_keep` makes it.
        return results + ([torch.empty((), dtype=torch.int64)] if needs and any(needs) else [])

    def _backward(self, tensors, cu_seqlens, results, token, grads, needs, *static):
        # (`results`, the forward's outputs, are unused: taking them keeps a compiled graph from reusing their
        # memory before this backward, while the kept graph may still read them.)
        got = self._kept_grads(self._take(token), grads, needs)
        if got is not None:
            return got
        return self.layers[static[-1]]._op_backward(tensors, cu_seqlens, grads, needs, *static[:-1])

    def _backward_fake(self, tensors, cu_seqlens, results, token, grads, needs, *static):
        return [t.new_empty(t.shape) for t, need in zip(tensors, needs) if need]

    def _setup_context(self, ctx, inputs, output):
        tensors, cu_seqlens, *static, needs = inputs  # (torch fills `needs` in when the call left it out)
        kept = bool(needs) and any(needs)  # the forward kept its graph: its last output is the token
        ctx.needs = [t.requires_grad for t in tensors]
        ctx.static = static
        # The backward returns one gradient per argument the dispatcher passed on, and it drops a trailing
        # argument equal to its default: `needs` counts only when it is not None.
        ctx.count, ctx.kept, ctx.arity = len(tensors), kept, len(inputs) - (needs is None)
        ctx.save_for_backward(*tensors, cu_seqlens, *(output if kept else ()))

    def _differentiate(self, ctx, grads):
        saved = ctx.saved_tensors
        tensors, cu_seqlens, kept = list(saved[:ctx.count]), saved[ctx.count], list(saved[ctx.count + 1:])
        results, token = (kept[:-1], kept[-1]) if ctx.kept else ([], None)
        grads = list(grads[:len(grads) - ctx.kept])  # none for the token
        got = iter(self.backward(tensors, cu_seqlens, results, token, grads, ctx.needs, *ctx.static))
        return ([next(got) if need else None for need in ctx.needs],) + (None,) * (ctx.arity - 1)

    # The table of kept graphs.
    def _keep(self, leaves: list, roots: list) -> torch.Tensor:
        import weakref

        with self._lock:
            key = next(self._tokens)
        token = torch.tensor(key, dtype=torch.int64)
        entry = (leaves, roots, weakref.ref(token, lambda _, key=key: self._drop(key)))
        with self._lock:
            self.stored[key] = entry
            evicted = [self.stored.pop(k) for k in list(self.stored)[:max(0, len(self.stored) - self.limit)]]
        del evicted  # their graphs are freed here, outside the lock
        return token

    def _take(self, token: torch.Tensor | None) -> tuple | None:
        """(leaves, roots) of the forward `token` names, removed from the table; None when it is not there."""
        if token is None:
            return None
        with self._lock:
            entry = self.stored.pop(int(token), None)
        return None if entry is None else entry[:2]

    def _drop(self, key: int) -> None:
        with self._lock:
            entry = self.stored.pop(key, None)
        del entry

    @staticmethod
    def _kept_grads(entry: tuple | None, grads: list, needs: list) -> list | None:
        """The gradients of the tensors in `needs` from a kept graph (`entry`: its leaves and outputs), or None
        where there is none or it cannot give them: a tensor needed that the forward did not record, or a saved
        tensor changed in place since (autograd refuses; recomputing from the op's saved inputs is still right)."""
        if entry is None:
            return None
        leaves, roots = entry
        if any(need and not leaf.requires_grad for leaf, need in zip(leaves, needs)):
            return None
        wanted = [leaf for leaf, need in zip(leaves, needs) if need]
        try:
            with _autograd_reenabled(), torch.enable_grad():
                return _grads(roots, grads, wanted)
        except RuntimeError as error:
            if "modified by an inplace operation" in str(error):
                return None
            raise


def _layer_op(layer) -> tuple:
    """`(forward op, layer index)`: the op of the layer's recurrence (registered by the first layer of that spec in
    the process) and the `layer` argument its calls pass."""
    namespace = getattr(torch.ops, OP_NAMESPACE)
    table = namespace.__dict__.setdefault(_OP_TABLE, {})
    name = op_name(layer.recurrence)
    entry = table[name] if name in table else table.setdefault(name, _LayerOp(name))
    return entry.forward, entry.add(layer)


if "bind_call" not in globals():  # imported as a package module rather than copied into a generated module
    from recurrence_dsl.calling import bind_call, pack_result  # noqa: E402, F401
    from recurrence_dsl.errors import CallError  # noqa: E402, F401

    from .dispatch import chunk_run, compute_dtype, pick_form, run_forms, scan_held_bytes, triton_options  # noqa: E402, F401
    from .tuning import tuning_lookup  # noqa: E402, F401
