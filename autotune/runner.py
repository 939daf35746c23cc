"""Run a compiled layer with one tuning config: the tuner's timed call, and what a tuned `compile()` runs.

A config is the keyword arguments of `autotune.space` ({"chunk_size": 32} for torch chunked; chunk_size,
block_k, block_v, num_warps, num_stages for Triton chunked; num_warps for Triton recurrent). The printed forms
call their runtime as `_rt.chunked_linear(..., chunk_size=...)` and take no block sizes, so a Triton chunked
config is bound into the runtime itself (`BoundRuntime`) and the printed forms are executed once more against
it (`CompiledLayer.forms_over`, the same source the layer runs); the Triton recurrent launcher takes
`num_warps` directly, through `run_forms`' options. Bound forms are cached per layer and config.
"""

from __future__ import annotations

import functools
import weakref

from .space import SPACES, config_key

_CHUNKED_ENTRY_POINTS = ("chunked_linear", "chunked_delta")
_TRITON_CHUNKED_OPTIONS = ("block_k", "block_v", "num_warps", "num_stages")


class BoundRuntime:
    """A runtime module whose chunked entry points get `options` (block sizes, warps, stages) bound in."""

    def __init__(self, module, **options):
        self._module = module
        self._options = options

    def __getattr__(self, name):
        attr = getattr(self._module, name)
        if name in _CHUNKED_ENTRY_POINTS and self._options:
            return functools.partial(attr, **self._options)
        return attr

    def __repr__(self) -> str:
        return f"BoundRuntime({self._module.__name__}, {self._options})"


_BOUND: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> {(form, config key): form function}


def _check(form: str, backend: str, config: dict) -> None:
    space = SPACES.get((form, backend))
    if space is None:
        raise ValueError(f"no tuning config applies to form={form!r}, backend={backend!r}")
    if set(config) != set(space):
        raise ValueError(f"a {form}/{backend} config has keys {sorted(space)}, got {sorted(config)}")


def configured_forms(layer, backend: str, form: str, config: dict) -> dict:
    """The form functions of `layer` on `backend`, with `form`'s one replaced by a version running `config`.

    torch: the layer's own forms (chunk_size goes to `run_forms`). triton chunked: the printed forms executed
    against the Triton runtime with block_k / block_v / num_warps / num_stages bound. triton recurrent: the
    launcher with num_warps bound."""
    _check(form, backend, config)
    if backend == "torch":
        return layer.forms
    forms = dict(layer.triton_forms)
    if form not in forms:
        raise ValueError(f"{layer.name} has no '{form}' form on the triton backend")
    cache = _BOUND.setdefault(layer, {})
    key = (form, config_key(config))
    if key not in cache:
        if form == "chunked":
            from codegen import triton_runtime
            from codegen.dispatch import with_torch_backward

            options = {k: config[k] for k in _TRITON_CHUNKED_OPTIONS}
            chunked = layer.forms_over(BoundRuntime(triton_runtime, **options))["chunked"]
            cache[key] = with_torch_backward(chunked, layer.forms["chunked"],
                                             [o.name for o in layer.recurrence.outputs],
                                             [s.name for s in layer.recurrence.states])
        else:
            cache[key] = functools.partial(forms["recurrent"], num_warps=config["num_warps"])
    forms[form] = cache[key]
    return forms


def run_config(layer, backend: str, form: str, config: dict, *args, **kwargs):
    """Call `layer` (calling convention of `CompiledLayer.__call__`) on `backend`'s `form` with `config`."""
    from codegen.dispatch import run_forms
    from recurrence_dsl.calling import bind_call
    from recurrence_dsl.errors import CallError

    call = bind_call(layer.recurrence, args, kwargs)
    if backend == "triton":
        import torch

        if call.dtype == torch.float64:
            raise CallError("backend='triton' takes float16, bfloat16 or float32 inputs, got float64")
    forms = configured_forms(layer, backend, form, config)
    return run_forms(layer.recurrence, forms, call, form, config.get("chunk_size", layer.chunk_size))


__all__ = ["BoundRuntime", "configured_forms", "run_config"]
