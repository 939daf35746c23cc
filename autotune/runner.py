"""Run a layer with one tuning config: the tuner's timed call.

A config is the keyword arguments of `autotune.space` ({"chunk_size": 32} for torch chunked; chunk_size,
block_k, block_v, num_warps, num_stages for Triton chunked; block_t, block_k, block_v, num_warps, num_stages for
Triton parallel; num_warps for Triton recurrent; block_t, block_n, num_warps for Triton scan). The layer itself
takes it (`config=`, checked against `codegen.layer.CONFIG_KEYS`) and hands it to the form that runs, the same
path a tuned `compile()` call takes.
"""

from __future__ import annotations


def run_config(layer, backend: str, form: str, config: dict, *args, **kwargs):
    """Call `layer` (a `codegen.layer.Layer`) on `backend`'s `form` with `config`: `(output, final_state)`."""
    return layer(*args, form=form, backend=backend, config=config, **kwargs)


__all__ = ["run_config"]
