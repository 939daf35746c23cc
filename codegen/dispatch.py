"""Run a compiled layer's forms on a bound call: dtype, initial states, packed sequences, auto form choice.

Imports only torch and is copied verbatim into generated modules, next to
`recurrence_dsl/calling.py` (whose `BoundCall` and `pack_result` it uses).
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (float32, float16, bfloat16) computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def pick_form(forms, length: int, chunk_size: int) -> str:
    """The form `auto` runs for a sequence of `length` steps, given the forms a recurrence has."""
    if length <= 16 or len(forms) == 1:
        return "recurrent"
    if "parallel" in forms and length <= chunk_size:
        return "parallel"
    if "chunked" in forms:
        return "chunked"
    return "scan" if "scan" in forms else "recurrent"


def run_forms(spec, form_fns: dict, call, form: str, chunk_size: int, **options):
    """`(output, final_state)` of `spec` on `call` through `form_fns[form]` ("auto" picks per sequence).

    Each form function takes `(*inputs, *params, states, *sizes, **extra)` in the compute dtype and
    returns `(outputs: dict, final_states: dict)`. Packed sequences (`cu_seqlens`) run one by one.
    `options` are passed to every form function (e.g. block sizes of a Triton backend).
    """
    dtype = compute_dtype(call.dtype)
    inputs = {k: v.to(dtype) for k, v in call.inputs.items()}
    params = [call.params[p.name].to(dtype) for p in spec.params]
    sizes = [call.sizes[s] for s in spec.sizes]
    if call.initial_state is not None:
        states = {k: v.to(dtype) for k, v in call.initial_state.items()}
    else:
        states = {s.name: torch.zeros((call.num_sequences, call.heads) + call.dims(s), dtype=dtype,
                                      device=call.device) for s in spec.states}

    def run(piece: dict, piece_states: dict, length: int):
        chosen = pick_form(tuple(form_fns), length, chunk_size) if form == "auto" else form
        extra = dict(options)
        if chosen == "chunked":
            extra["chunk_size"] = chunk_size
        elif chosen == "parallel":
            extra["chunk_size"] = max(length, 1)
        ordered = [piece[i.name] for i in spec.inputs]
        return form_fns[chosen](*ordered, *params, piece_states, *sizes, **extra)

    if call.cu_seqlens is None:
        outputs, finals = run(inputs, states, call.length)
    else:
        bounds = call.cu_seqlens.tolist()
        out_pieces, final_pieces = [], []
        for n in range(len(bounds) - 1):
            lo, hi = bounds[n], bounds[n + 1]
            piece = {k: v[:, lo:hi] for k, v in inputs.items()}
            o, f = run(piece, {k: v[n : n + 1] for k, v in states.items()}, hi - lo)
            out_pieces.append(o)
            final_pieces.append(f)
        outputs = {o.name: torch.cat([p[o.name] for p in out_pieces], dim=1) for o in spec.outputs}
        finals = {s.name: torch.cat([f[s.name] for f in final_pieces], dim=0) for s in spec.states}
    outputs = {k: v.to(call.dtype) for k, v in outputs.items()}
    return pack_result(spec, outputs, finals if call.output_final_state else None)  # noqa: F821 - from calling.py


if "pack_result" not in globals():  # imported as a package module rather than copied beside calling.py
    from recurrence_dsl.calling import pack_result  # noqa: E402
