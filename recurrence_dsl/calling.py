"""The calling convention of every layer (LANGUAGE.md): bind and check a call's arguments.

`bind_call` turns `layer(*inputs, *params, initial_state=..., output_final_state=...,
cu_seqlens=..., reverse=...)` into a `BoundCall` with every size known, or raises `CallError`
naming the argument, the shape it should have and the shape it has.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from .check import CheckedRecurrence, Size, Symbol
from .errors import CallError


def settle_cpu_vector_math() -> None:
    """Call once, on one element in float32 and float64, each unary op ATen hands to oneMKL's vector math (VML).

    oneMKL 2024.2 (in the PyTorch wheels) picks a VML function's kernel on its first call; when that call runs on
    several intra-op threads at once, one thread's chunk can run the low-accuracy kernel (pytorch/pytorch#188792):
    seen here as a float32 exp off by 1.5e-4 relative in one half of a [2, 37, 2, 12, 8] tensor, on a loaded
    2-core machine. A single-element call, which runs on one thread, settles each choice first."""
    for dtype in (torch.float32, torch.float64):
        x = torch.full((1,), 0.5, dtype=dtype, device="cpu")
        for op in (torch.abs, torch.acos, torch.asin, torch.atan, torch.cos, torch.erf, torch.erfc, torch.erfinv,
                   torch.exp, torch.expm1, torch.log, torch.log10, torch.log1p, torch.log2, torch.sin, torch.sqrt,
                   torch.tan, torch.tanh, torch.trunc):
            op(x)


settle_cpu_vector_math()


@dataclass
class BoundCall:
    inputs: dict[str, torch.Tensor]  # [B, T, H, *dims]
    params: dict[str, torch.Tensor]  # [H, *dims]
    initial_state: dict[str, torch.Tensor] | None  # [N or B, H, *dims]
    output_final_state: bool
    cu_seqlens: torch.Tensor | None  # int64 [N + 1] on the CPU (as given, unchecked, with check_values=False)
    batch: int
    length: int
    heads: int
    sizes: dict[str, int]
    device: torch.device
    dtype: torch.dtype  # of the first input: the dtype outputs come back in
    reverse: bool = False  # steps run from the last to the first (each packed sequence on its own)

    @property
    def num_sequences(self) -> int:
        return self.batch if self.cu_seqlens is None else len(self.cu_seqlens) - 1

    def dims(self, sym: Symbol) -> tuple[int, ...]:
        return tuple(self.sizes[d] if isinstance(d, str) else d for d in sym.dims)


def _n(size) -> str:
    """A size as text, also when it is symbolic under torch.compile: Dynamo turns a symbolic int into a plain one
    through operator.index (specialising on it, harmless on the way to an error), where it cannot trace str() or
    an f-string of it."""
    return str(operator.index(size))


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(_n(s) for s in t.shape) + "]"


# cu_seqlens' dtypes, the integers: a bool or complex tensor is not floating point either, and was turned into int64
# boundaries without a word
_INDEX_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _with_article(word: str) -> str:
    """`word` after the article its sound takes: "an int64", "a float32", "a uint8" (said "you-int")."""
    return f"{'an' if word[:1].lower() in ('a', 'e', 'i', 'o') else 'a'} {word}"


def _what(value) -> str:
    """What a call passed where a tensor was expected, for its error: a tensor's dtype and shape, else its type."""
    if isinstance(value, torch.Tensor):
        return f"{_with_article(str(value.dtype).removeprefix('torch.'))} tensor of shape {_shape(value)}"
    return type(value).__name__


def _expected(prefix: tuple[str, ...], sym: Symbol) -> str:
    return "[" + ", ".join(prefix + tuple(str(d) for d in sym.dims)) + "]"


class _SizeBinder:
    """Learns each size from the first argument that has it; a disagreement is an error."""

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}
        self.origin: dict[str, tuple[str, torch.Tensor]] = {}  # size -> (the argument it came from, that argument)

    def bind(self, size: Size, value: int, what: str, describe, got: torch.Tensor) -> None:
        # Messages are built only when raised, their sizes through _n(): under torch.compile a size is symbolic.
        if isinstance(size, int):
            if value != size:
                raise CallError(f"{what} must have shape {describe()}, got {_shape(got)}: size {_n(value)} where "
                                f"{size} is declared")
            return
        if size in self.sizes and self.sizes[size] != value:
            first, first_tensor = self.origin[size]
            raise CallError(f"size {size} is {_n(self.sizes[size])} from {first} (shape {_shape(first_tensor)}) but "
                            f"{_n(value)} from {what} (expected {describe()}, got {_shape(got)})")
        self.sizes.setdefault(size, value)
        self.origin.setdefault(size, (what, got))


def bind_call(rec: CheckedRecurrence, args: tuple, kwargs: dict, check_values: bool = True) -> BoundCall:
    """Match positional and keyword arguments to inputs and params, and check every shape.

    check_values=False leaves out the one check that reads tensor values, `cu_seqlens`' boundaries
    (`check_cu_seqlens`), and keeps `cu_seqlens` where it is: under torch.compile the checks run while Dynamo
    traces, where a value read would break the graph, and the boundaries are checked inside the layer's op."""
    kwargs = dict(kwargs)
    initial_state = kwargs.pop("initial_state", None)
    output_final_state = kwargs.pop("output_final_state", False)
    if not isinstance(output_final_state, bool):  # a truthy string such as "no" must not mean True
        raise CallError(f"output_final_state must be True (return the final states) or False, got "
                        f"{output_final_state!r}")
    cu_seqlens = kwargs.pop("cu_seqlens", None)
    # None: the direction the spec declares (`reverse recurrence` runs backwards); a bool overrides it.
    reverse = kwargs.pop("reverse", None)
    if reverse is None:
        reverse = bool(getattr(rec, "reverse", False))
    elif not isinstance(reverse, bool):
        raise CallError(f"reverse must be True (last step to first), False (first to last) or None (the "
                        f"direction {rec.name} declares), got {reverse!r}")
    declared = list(rec.inputs) + list(rec.params)
    if len(args) > len(declared):
        raise CallError(f"{rec.name}() takes {len(declared)} tensors ({', '.join(s.name for s in declared)}), "
                        f"got {len(args)} positional arguments")
    values: dict[str, object] = {}
    for sym, value in zip(declared, args):
        values[sym.name] = value
    for name, value in kwargs.items():
        if name not in {s.name for s in declared}:
            raise CallError(f"{rec.name}() got an unexpected keyword argument '{name}'; it takes "
                            f"{', '.join(s.name for s in declared)}, initial_state, output_final_state, cu_seqlens, "
                            "reverse (and a compiled layer form, backend, chunk_size, config, check_steps)")
        if name in values:
            raise CallError(f"{rec.name}() got argument '{name}' both by position and by name")
        values[name] = value
    missing = [s.name for s in declared if s.name not in values]
    if missing:
        raise CallError(f"{rec.name}() is missing argument(s): {', '.join(missing)}")

    for sym in declared:
        value = values[sym.name]
        if not isinstance(value, torch.Tensor):
            raise CallError(f"argument '{sym.name}' must be a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise CallError(f"argument '{sym.name}' must be a floating-point tensor, got {value.dtype}")

    binder = _SizeBinder()
    first = values[rec.inputs[0].name] if rec.inputs else None
    if first is None:
        raise CallError(f"{rec.name}() declares no inputs, so the batch and length are unknown")
    if first.dim() < 3:
        raise CallError(f"input '{rec.inputs[0].name}' must have shape {_expected(('B', 'T', 'H'), rec.inputs[0])}, "
                        f"got {_shape(first)}")
    batch, length, heads = first.shape[:3]
    device = first.device
    for sym in rec.inputs:
        t = values[sym.name]
        want = 3 + len(sym.dims)

        def describe(sym=sym):
            return _expected(("B", "T", "H"), sym)

        if t.dim() != want:
            raise CallError(f"input '{sym.name}' must have shape {describe()}, got {_shape(t)}")
        if tuple(t.shape[:3]) != (batch, length, heads):
            raise CallError(f"input '{sym.name}' must have shape {describe()} with B={_n(batch)}, T={_n(length)}, "
                            f"H={_n(heads)} (from '{rec.inputs[0].name}'), got {_shape(t)}")
        if t.device != device:
            raise CallError(f"input '{sym.name}' is on {t.device} but '{rec.inputs[0].name}' is on {device}")
        for pos, size in enumerate(sym.dims):
            binder.bind(size, t.shape[3 + pos], f"input '{sym.name}'", describe, t)
    for sym in rec.params:
        t = values[sym.name]

        def describe(sym=sym):
            return _expected(("H",), sym)

        if t.dim() != 1 + len(sym.dims) or t.shape[0] != heads:
            head_first = (t.dim() == 1 + len(sym.dims) and t.shape[0] == length and length != heads)
            raise CallError(f"param '{sym.name}' must have shape {describe()} with H={_n(heads)}, got {_shape(t)}"
                            + (f"; its {_n(length)} heads are the inputs' T axis: inputs are [B, T, H, ...], so "
                               "head-first ones [B, H, T, ...] want .transpose(1, 2)" if head_first else ""))
        if t.device != device:
            raise CallError(f"param '{sym.name}' is on {t.device} but the inputs are on {device}")
        for pos, size in enumerate(sym.dims):
            binder.bind(size, t.shape[1 + pos], f"param '{sym.name}'", describe, t)

    cu = None
    if cu_seqlens is not None:
        if (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1
                or cu_seqlens.dtype not in _INDEX_DTYPES):
            raise CallError(f"cu_seqlens must be a 1-D integer tensor [N + 1] of sequence boundaries, got "
                            f"{_what(cu_seqlens)}")
        if batch != 1:
            raise CallError(f"cu_seqlens packs sequences along T and needs B == 1, got B={_n(batch)}")
        if cu_seqlens.shape[0] < 2:
            raise CallError("cu_seqlens must hold at least two boundaries [0, T]")
        on_meta = cu_seqlens.device.type == "meta"  # (device, not is_meta: a FakeTensor under torch.compile)
        if on_meta != (device.type == "meta"):
            raise CallError(f"cu_seqlens is on {cu_seqlens.device} but the inputs are on {device}: a meta call "
                            "(shapes only) takes a meta cu_seqlens, any other call one with values")
        # (A meta cu_seqlens has no values to check: a meta call only gives the outputs' shapes.)
        cu = check_cu_seqlens(cu_seqlens, length) if check_values and not on_meta else cu_seqlens
    rows = batch if cu is None else cu.shape[0] - 1

    states = _normalise_states(rec, initial_state)
    if states is not None:
        for sym in rec.states:
            if sym.name not in states:
                continue
            t = states[sym.name]
            what = f"initial_state['{sym.name}']" if len(rec.states) > 1 else "initial_state"

            def describe(sym=sym):
                return _expected(("N" if cu is not None else "B", "H"), sym)

            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise CallError(f"{what} must be a floating-point tensor of shape {describe()}, got {_what(t)}")
            if t.dim() != 2 + len(sym.dims) or t.shape[0] != rows or t.shape[1] != heads:
                rows_word = f"N={_n(rows)} sequences" if cu is not None else f"B={_n(rows)}"
                raise CallError(f"{what} must have shape {describe()} with {rows_word}, H={_n(heads)}, "
                                f"got {_shape(t)}")
            if t.device != device:
                raise CallError(f"{what} is on {t.device} but the inputs are on {device}")
            for pos, size in enumerate(sym.dims):
                binder.bind(size, t.shape[2 + pos], what, describe, t)

    for name in rec.sizes:
        if name not in binder.sizes:
            raise CallError(f"size {name} is not fixed by any argument; pass an initial_state, or declare an input "
                            f"or param that has it")
    if states is not None and len(states) < len(rec.states):
        states = {sym.name: states[sym.name] if sym.name in states else next(iter(states.values())).new_zeros(
                  (rows, heads, *(binder.sizes[d] if isinstance(d, str) else d for d in sym.dims)))
                  for sym in rec.states}
    return BoundCall(
        inputs={s.name: values[s.name] for s in rec.inputs},
        params={s.name: values[s.name] for s in rec.params},
        initial_state=states,
        output_final_state=output_final_state,
        cu_seqlens=cu,
        batch=batch,
        length=length,
        heads=heads,
        sizes=dict(binder.sizes),
        device=device,
        dtype=first.dtype,
        reverse=reverse,
    )


def check_cu_seqlens(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """`cu_seqlens` (a 1-D integer tensor of at least two boundaries) as int64 on the CPU, checked: it starts at 0,
    ends at T=`length` and never decreases; raises `CallError` otherwise."""
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    if cu[0] != 0 or cu[-1] != length:
        raise CallError(f"cu_seqlens must start at 0 and end at T={length}, got {cu.tolist()}")
    if bool((cu[1:] < cu[:-1]).any()):
        raise CallError(f"cu_seqlens must be non-decreasing, got {cu.tolist()}")
    return cu


def _normalise_states(rec: CheckedRecurrence, initial_state) -> dict[str, torch.Tensor] | None:
    if initial_state is None:
        return None
    if not rec.states:
        raise CallError(f"{rec.name} has no state, so initial_state must be None")
    if isinstance(initial_state, dict):
        names = {s.name for s in rec.states}
        unknown = set(initial_state) - names
        if unknown:
            raise CallError(f"initial_state has unknown state(s) {sorted(unknown)}; {rec.name} has {sorted(names)}")
        # A state left out (or given as None) starts at zero, as every state does without an initial_state: its
        # zeros are made once the sizes are bound (`bind_call`).
        given = {name: t for name, t in initial_state.items() if t is not None}
        return given or None
    if len(rec.states) > 1:
        raise CallError(f"{rec.name} has {len(rec.states)} states, so initial_state must be a dict keyed by "
                        f"{[s.name for s in rec.states]}")
    return {rec.states[0].name: initial_state}


def pack_result(rec: CheckedRecurrence, outputs: dict[str, torch.Tensor],
                final_states: dict[str, torch.Tensor] | None):
    """`(output, final_state)` as LANGUAGE.md returns them: tuples and dicts only when there are several."""
    out = tuple(outputs[o.name] for o in rec.outputs)
    output = out[0] if len(out) == 1 else out
    if final_states is None:
        return output, None
    if len(rec.states) == 1:
        return output, final_states[rec.states[0].name]
    return output, dict(final_states)
