"""The layer of a recurrence with shift states (recurrence_dsl/shift.py): their previous values, computed for every
step at once by shifting along T, passed to the layer of the rest of the recurrence as inputs.

Imports only torch and is copied into the generated modules of such recurrences, next to codegen/layer.py.
"""

from __future__ import annotations

import torch


def _first_steps(cu_seqlens: torch.Tensor, length: int, reverse: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per step of packed sequences: whether it is its sequence's first step in the direction of the run, and the
    index of its sequence ([T] bool, [T] int64)."""
    bounds = cu_seqlens.to(device=device, dtype=torch.int64)
    lengths = bounds[1:] - bounds[:-1]
    sequence = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths, output_size=length)
    starts = bounds[1:] - 1 if reverse else bounds[:-1]
    first = torch.zeros(length, dtype=torch.bool, device=device)
    first[starts[lengths > 0]] = True
    return first, sequence


def shift_steps(after: torch.Tensor, initial: torch.Tensor | None, cu_seqlens: torch.Tensor | None = None,
                reverse: bool = False) -> torch.Tensor:
    """A shift state's value before each step, from its value after each step (`after`, [B, T, H, ...]): the
    previous step's value, and the initial state (`initial`, [N, H, ...]; None: zero) at the first step of each
    sequence (each packed sequence of `cu_seqlens`, B = 1). reverse: the steps run from the last to the first, so
    the value before step t is the value after step t + 1."""
    if initial is None:
        rows = after.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
        initial = after.new_zeros((rows,) + after.shape[2:])
    initial = initial.to(after.dtype)
    if after.shape[1] == 0:
        return after
    if cu_seqlens is None:
        start = initial[:, None]
        return torch.cat([after[:, 1:], start], 1) if reverse else torch.cat([start, after[:, :-1]], 1)
    zero = torch.zeros_like(after[:, :1])
    shifted = torch.cat([after[:, 1:], zero], 1) if reverse else torch.cat([zero, after[:, :-1]], 1)
    first, sequence = _first_steps(cu_seqlens, after.shape[1], reverse, after.device)
    first = first.view((1, -1) + (1,) * (after.dim() - 2))
    return torch.where(first, initial[sequence][None], shifted)


def shift_final(after: torch.Tensor, initial: torch.Tensor | None, cu_seqlens: torch.Tensor | None = None,
                reverse: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A shift state's final state ([N, H, ...], in `dtype`): its value after the last step of each sequence (the
    first under reverse), or its initial state (None: zero) for a sequence of no steps."""
    dtype = after.dtype if dtype is None else dtype
    if cu_seqlens is None and after.shape[1] > 0:  # (the initial state is not read)
        return after[:, 0 if reverse else -1].to(dtype)
    rows = after.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if initial is None:
        initial = after.new_zeros((rows,) + after.shape[2:], dtype=dtype)
    initial = initial.to(dtype)
    if after.shape[1] == 0:
        return initial.clone()
    bounds = cu_seqlens.to(device=after.device, dtype=torch.int64)
    empty = (bounds[1:] == bounds[:-1]).view((-1,) + (1,) * (after.dim() - 2))
    last = (bounds[:-1] if reverse else bounds[1:] - 1).clamp(0, after.shape[1] - 1)
    return torch.where(empty, initial, after[0, last].to(dtype))


class ShiftedLayer:
    """The layer of a recurrence with shift states: called as the recurrence (its inputs, params and states), it
    runs `shift` (the printed function that computes each shift state's value before every step, and its final
    state) and then `inner`, the layer of the rest of the recurrence, which takes those values as inputs after
    its own; forms, backends, chunk sizes and configs are the inner layer's."""

    def __init__(self, spec, inner, shift):
        self.recurrence = spec
        self.inner = inner
        self.shift = shift
        self._rebuild = None  # as Layer's: set by recurrence_dsl.compile()

    name = property(lambda self: self.recurrence.name)
    forms = property(lambda self: self.inner.forms)
    triton_forms = property(lambda self: self.inner.triton_forms)
    form = property(lambda self: self.inner.form)
    backend = property(lambda self: self.inner.backend)
    tuning = property(lambda self: self.inner.tuning)
    check_steps = property(lambda self: self.inner.check_steps)
    chunk_size = property(lambda self: self.inner.chunk_size)
    chunk_size_given = property(lambda self: self.inner.chunk_size_given)

    @property
    def source(self) -> str:
        """The text of the module this layer was generated into."""
        import sys

        with open(sys.modules[type(self).__module__].__file__) as f:
            return f.read()

    def options(self, **defaults):
        """A copy of this layer with other defaults (those of `Layer.options`)."""
        inner = self._of_inner(self.inner.options, **defaults)
        return type(self)(self.recurrence, inner, self.shift)._rebuilt_by(self._rebuild)

    def _of_inner(self, method, *args, **kwargs):
        """`method(*args, **kwargs)` of the inner layer, a CallError of it (a form the rest lacks, a bad chunk_size,
        torch.func) said as this layer's: the rest's name (NAME_unshifted, a name the user never wrote) replaced by
        the recurrence's, so the message reads as a recurrence without shift states would say it."""
        try:
            return method(*args, **kwargs)
        except CallError as err:  # noqa: F821 - calling.py
            raise CallError(str(err).replace(self.inner.name, self.name)) from None  # noqa: F821

    def _rebuilt_by(self, rebuild):
        self._rebuild = rebuild
        return self

    def backend_for(self, device, dtype, backend=None, form="auto") -> str:
        return self.inner.backend_for(device, dtype, backend, form)

    def pick_form(self, length: int, chunk_size: int | None = None) -> str:
        return self.inner.pick_form(length, chunk_size)

    def _inner_call(self, call) -> tuple[tuple, dict, dict]:
        """The inner layer's arguments for a bound call, and the shift states' final states (or None)."""
        spec = self.recurrence
        initial = call.initial_state or {}
        before, finals = self.shift(*[call.inputs[s.name] for s in spec.inputs],
                                    *[call.params[s.name] for s in spec.params],
                                    {s.name: initial.get(s.name) for s in spec.states},
                                    *[call.sizes[n] for n in spec.sizes], cu_seqlens=call.cu_seqlens,
                                    reverse=call.reverse, final=call.output_final_state)
        args = (*[call.inputs[s.name] for s in spec.inputs], *before.values(),
                *[call.params[s.name] for s in spec.params])
        kept = [s.name for s in self.inner.recurrence.states]
        kwargs = {"initial_state": {n: initial[n] for n in kept} if call.initial_state is not None else None,
                  "output_final_state": call.output_final_state, "cu_seqlens": call.cu_seqlens,
                  "reverse": call.reverse}
        return args, kwargs, finals

    def _call(self, args: tuple, kwargs: dict, form, backend, chunk_size, config, check_steps=None):
        # (while torch.compile traces, cu_seqlens' boundaries are checked by the inner layer's op, as Layer does)
        call = bind_call(self.recurrence, args, kwargs,  # noqa: F821 - calling.py
                         check_values=not torch.compiler.is_compiling())
        return self._shifted(call, lambda inner_args, inner_kwargs: self.inner._call(
            inner_args, inner_kwargs, form, backend, chunk_size, config, check_steps))

    def _shifted(self, call, run_inner):
        """`(output, final_state)` of a bound call: the shift, then `run_inner(args, kwargs)` running the rest (the
        inner layer's call, or the kernel report's run of its Triton forms), the final states merged."""
        inner_args, inner_kwargs, finals = self._inner_call(call)
        output, final = self._of_inner(run_inner, inner_args, inner_kwargs)
        outputs = dict(zip([o.name for o in self.recurrence.outputs], output if len(self.recurrence.outputs) > 1
                           else (output,)))
        if final is None:
            return pack_result(self.recurrence, outputs, None)  # noqa: F821 - calling.py
        kept = self.inner.recurrence.states
        final = final if isinstance(final, dict) else {kept[0].name: final}
        states = {s.name: final[s.name] if s.name in final else finals[s.name] for s in self.recurrence.states}
        return pack_result(self.recurrence, outputs, states)  # noqa: F821 - calling.py

    def config_for(self, *args, form=None, backend=None, chunk_size=None, config=None, check_steps=None, **kwargs):
        """Which config a call with these arguments would run, and why (`Layer.config_for` of the inner layer)."""
        call = bind_call(self.recurrence, args, kwargs)  # noqa: F821 - calling.py
        with torch.no_grad():
            inner_args, inner_kwargs, _ = self._inner_call(call)
        return self._of_inner(self.inner.config_for, *inner_args, form=form, backend=backend,
                              chunk_size=chunk_size, config=config, check_steps=check_steps, **inner_kwargs)

    def __call__(self, *args, form=None, backend=None, chunk_size=None, config=None, check_steps=None, **kwargs):
        """`(output, final_state)`, as `Layer.__call__`."""
        return self._call(args, kwargs, form, backend, chunk_size, config, check_steps)

    def __reduce_ex__(self, protocol: int):
        """Pickled as `Layer` pickles: by how to rebuild it (compile()'s source, or its module's name)."""
        import pickle
        import sys

        chunk_size = self.chunk_size if self.chunk_size_given else None
        defaults = (self.form, self.backend, chunk_size, self.tuning, self.check_steps)
        if self._rebuild is not None:
            build, source = self._rebuild
            return build, (*source, *defaults)
        module = sys.modules.get(type(self).__module__)
        if getattr(module, "__spec__", None) is None:
            raise pickle.PicklingError(f"cannot pickle the {self.name} layer: its module {type(self).__module__} "
                                       "was not imported by name; pickle a layer of recurrence_dsl.compile(...)")
        return _module_layer, (module.__name__, self.name, *defaults)  # noqa: F821 - layer.py

    def __repr__(self) -> str:
        return (f"<{self.name} layer: shift states computed by shifting along T, then forms "
                f"{', '.join(self.forms)}; backend={self.backend!r}, form={self.form!r}>")


if "bind_call" not in globals():  # imported as a package module rather than copied into a generated module
    from recurrence_dsl.calling import bind_call, pack_result  # noqa: E402, F401
    from recurrence_dsl.errors import CallError  # noqa: E402, F401

    from .layer import _module_layer  # noqa: E402, F401
