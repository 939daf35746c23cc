"""The accuracy matrix: every spec of specs/, every form it admits, against the float64 reference interpreter.

Errors are relative, ||x - ref|| / ||ref||, over outputs AND final states, with an initial state:
  float64 <= 1e-10, float32 <= 1e-5 (the float32 run is compared with the float64 reference run on the same
  float32-rounded inputs, so the figure is the form's arithmetic error, not the rounding of its inputs).
Cases: T in {1, 37, 256}; chunk sizes 16 and 64 for the chunked form (the parallel form is one chunk; the
recurrent and scan forms take no chunk size); strong decay (log decays down to -5 per step, decay_scale=5) for
the specs that decay; packed sequences (cu_seqlens) for every form; gradients of every input, param and the
initial state against the reference's autograd gradients; the error a missing form raises; the compile cache.
"""

from __future__ import annotations

import functools

import pytest
import torch

import recurrence_dsl
from recurrence_dsl import CallError
from recurrence_dsl.analysis import TransitionClass, analyse
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPEC_FILES

F64, F32 = torch.float64, torch.float32
TOL = {F64: 1e-10, F32: 1e-5}
GRAD_TOL = 1e-8
B, H = 2, 2
LENGTHS = [1, 37, 256]
CHUNKS = [16, 64]
STRONG_DECAY = 5.0

SPECS: dict[str, recurrence_dsl.Recurrence] = {}
for _path in SPEC_FILES:
    SPECS.update(recurrence_dsl.load(_path))


def sizes_of(rec: recurrence_dsl.Recurrence) -> dict[str, int]:
    """Small, distinct sizes (8, 6, 5, 7, ...): a transposed axis shows up as a shape error."""
    choices = [8, 6, 5, 7, 4]
    return {name: choices[i % len(choices)] for i, name in enumerate(rec.checked.sizes)}


def forms_of(name: str) -> tuple[str, ...]:
    return analyse(SPECS[name].checked).forms


def form_cases(chunks=CHUNKS) -> list:
    """(spec, form, chunk size) for every form every spec admits; chunk sizes only vary for chunked."""
    cases = []
    for name in sorted(SPECS):
        for form in forms_of(name):
            for chunk in (chunks if form == "chunked" else [chunks[0]]):
                cases.append(pytest.param(name, form, chunk, id=f"{name}-{form}" + (
                    f"-C{chunk}" if form == "chunked" else "")))
    return cases


def decays(name: str) -> bool:
    """Whether some state of the spec has a decay (a transition other than the identity or a bare delta rule)."""
    for sa in analyse(SPECS[name].checked).states.values():
        if sa.cls in (TransitionClass.IDENTITY, TransitionClass.GENERAL, TransitionClass.NON_LINEAR):
            continue
        if sa.cls is TransitionClass.RANK_ONE_UPDATE and sa.diagonal == 1:
            continue
        return True
    return False


DECAYING = sorted(n for n in SPECS if decays(n))


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def flatten(rec: recurrence_dsl.Recurrence, output, final) -> dict[str, torch.Tensor]:
    """Outputs and final states of one call, by name (`out:o`, `state:S`)."""
    outs = output if isinstance(output, tuple) else (output,)
    flat = {f"out:{o.name}": t for o, t in zip(rec.checked.outputs, outs, strict=True)}
    if final is not None:
        finals = final if isinstance(final, dict) else {rec.checked.states[0].name: final}
        flat.update({f"state:{k}": v for k, v in finals.items()})
    return flat


def state_tensors(initial) -> list[torch.Tensor]:
    if initial is None:
        return []
    return list(initial.values()) if isinstance(initial, dict) else [initial]


def cast_state(initial, dtype):
    if isinstance(initial, dict):
        return {k: v.to(dtype) for k, v in initial.items()}
    return None if initial is None else initial.to(dtype)


@functools.cache
def case(name: str, T: int, dtype: torch.dtype, decay_scale: float = 1.0, seed: int = 0):
    """Sampled arguments in `dtype`, an initial state, and the float64 reference on those same (rounded) values."""
    rec = SPECS[name]
    args, initial = sample_arguments(rec.checked, sizes_of(rec), B, T, H, dtype=F64, seed=seed,
                                     decay_scale=decay_scale, with_initial_state=True)
    args = [a.to(dtype) for a in args]
    initial = cast_state(initial, dtype)
    out, final = rec.reference(*[a.double() for a in args], initial_state=cast_state(initial, F64),
                               output_final_state=True)
    return args, initial, flatten(rec, out, final)


def check_against_reference(name, form, chunk, T, dtype, decay_scale=1.0, seed=0):
    rec = SPECS[name]
    args, initial, ref = case(name, T, dtype, decay_scale, seed)
    layer = recurrence_dsl.compile(rec, backend="torch", chunk_size=chunk)
    out, final = layer(*args, initial_state=initial, output_final_state=True, form=form)
    got = flatten(rec, out, final)
    assert got.keys() == ref.keys()
    errors = {}
    for key, value in got.items():
        assert value.shape == ref[key].shape, (key, value.shape, ref[key].shape)
        assert value.dtype == dtype, (key, value.dtype)
        assert torch.isfinite(value).all(), f"{key} has inf/nan"
        errors[key] = rel(value, ref[key])
    where = f"{name} {form}" + (f" C={chunk}" if form == "chunked" else "")
    assert max(errors.values()) <= TOL[dtype], (f"{where} T={T} {dtype} decay_scale={decay_scale} seed={seed}: "
                                                f"relative errors {errors}")


def _length_param(T: int):
    # The T=256 cases run like every other case (never skipped); the `slow` mark only lets one select them.
    return pytest.param(T, marks=pytest.mark.slow, id=f"T{T}") if T == 256 else pytest.param(T, id=f"T{T}")


@pytest.mark.parametrize("T", [_length_param(T) for T in LENGTHS])
@pytest.mark.parametrize("name, form, chunk", form_cases())
def test_float64(name, form, chunk, T):
    check_against_reference(name, form, chunk, T, F64)


@pytest.mark.parametrize("T", [_length_param(T) for T in LENGTHS])
@pytest.mark.parametrize("name, form, chunk", form_cases())
def test_float32(name, form, chunk, T):
    check_against_reference(name, form, chunk, T, F32)


STRONG_CASES = [p for p in form_cases() if p.values[0] in DECAYING]


def test_decaying_specs_are_the_expected_ones():
    assert DECAYING == ["bidirectional_mamba_backward", "bidirectional_mamba_forward", "delta_product",
                        "gated_delta_net", "gla", "hgrn2", "lightning_attention", "mamba", "mamba2", "mamba3",
                        "min_gru", "mlstm", "retention", "rg_lru", "rwkv6", "rwkv7"]


# float32 under strong decay sits closest to its tolerance, so it is checked on three draws, not one lucky one.
STRONG_PRECISIONS = [pytest.param(F64, 0, id="f64-seed0")] + [pytest.param(F32, s, id=f"f32-seed{s}") for s in range(3)]


@pytest.mark.parametrize("dtype, seed", STRONG_PRECISIONS)
@pytest.mark.parametrize("T", [37, 256], ids=["T37", "T256"])
@pytest.mark.parametrize("name, form, chunk", STRONG_CASES)
def test_strong_decay(name, form, chunk, T, dtype, seed):
    check_against_reference(name, form, chunk, T, dtype, STRONG_DECAY, seed)


def test_strong_decay_really_is_strong():
    """decay_scale=5 puts log decays near -5 per step (GLA's g), so a 64-step chunk spans G far below -100."""
    args, _, _ = case("gla", 256, F64, STRONG_DECAY)
    g = args[3]
    assert g.max() <= -0.01 and g.min() < -4.9
    assert g[:, :64].sum(dim=1).max() < -100


# ---------------------------------------------------------------------------------------------------------
# packed sequences
# ---------------------------------------------------------------------------------------------------------


def _cu_cases():
    return form_cases() + [pytest.param(name, "auto", 64, id=f"{name}-auto") for name in sorted(SPECS)]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("middle", [0, 1])
@pytest.mark.parametrize("name, form, chunk", _cu_cases())
def test_cu_seqlens(name, form, chunk, middle, dtype):
    """B=1, three sequences of lengths 5, 0 or 1, and 30, each from its own initial state row.

    The expected values come from the reference run on each sequence alone (B=1, no cu_seqlens), concatenated:
    an oracle that does not share the packing code with the layer or the reference.
    """
    rec = SPECS[name]
    lengths = [5, middle, 30]
    T = sum(lengths)
    args, initial = sample_arguments(rec.checked, sizes_of(rec), 1, T, H, dtype=F64, seed=7,
                                     with_initial_state=True, rows=3)
    args = [a.to(dtype) for a in args]
    initial = cast_state(initial, dtype)
    n_in = len(rec.checked.inputs)
    inputs, params = args[:n_in], args[n_in:]
    init_dict = initial if isinstance(initial, dict) else {rec.checked.states[0].name: initial}
    bounds = [0, lengths[0], lengths[0] + lengths[1], T]
    pieces = []
    for n in range(3):
        lo, hi = bounds[n], bounds[n + 1]
        row = {k: v[n:n + 1].double() for k, v in init_dict.items()}
        if hi == lo:
            outs = {f"out:{o.name}": torch.zeros((1, 0) + tuple(inputs[0].shape[2:3]) + _dims(rec, o), dtype=F64)
                    for o in rec.checked.outputs}
            outs.update({f"state:{k}": v for k, v in row.items()})
        else:
            row_arg = row if len(row) > 1 else next(iter(row.values()))
            o, f = rec.reference(*[x[:, lo:hi].double() for x in inputs], *[p.double() for p in params],
                                 initial_state=row_arg, output_final_state=True)
            outs = flatten(rec, o, f)
        pieces.append(outs)
    expected = {}
    for key in pieces[0]:
        dim = 1 if key.startswith("out:") else 0
        expected[key] = torch.cat([p[key] for p in pieces], dim=dim)

    cu = torch.tensor(bounds, dtype=torch.int32)
    layer = recurrence_dsl.compile(rec, backend="torch", chunk_size=chunk)
    out, final = layer(*args, initial_state=initial, output_final_state=True, cu_seqlens=cu, form=form)
    got = flatten(rec, out, final)
    ref_out, ref_final = rec.reference(*[a.double() for a in args], initial_state=cast_state(initial, F64),
                                       output_final_state=True, cu_seqlens=cu)
    via_reference = flatten(rec, ref_out, ref_final)
    errors, ref_errors = {}, {}
    for key, value in expected.items():
        assert got[key].shape == value.shape, (key, got[key].shape, value.shape)
        assert torch.isfinite(got[key]).all(), f"{key} has inf/nan"
        errors[key] = rel(got[key], value)
        ref_errors[key] = rel(via_reference[key], value)
    assert max(ref_errors.values()) <= 1e-14, f"reference with cu_seqlens vs per-sequence runs: {ref_errors}"
    assert max(errors.values()) <= TOL[dtype], f"{name} {form} C={chunk} lengths={lengths}: {errors}"


def _dims(rec, sym) -> tuple[int, ...]:
    sizes = sizes_of(rec)
    return tuple(sizes[d] if isinstance(d, str) else d for d in sym.dims)


# ---------------------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------------------


def _grads(fn, rec, args, initial, weights):
    """d/d(inputs, params, initial state) of sum(output * w) + sum(final_state * w)."""
    leaves = [a.detach().clone().requires_grad_(True) for a in args]
    if isinstance(initial, dict):
        init = {k: v.detach().clone().requires_grad_(True) for k, v in initial.items()}
        init_leaves = [init[s.name] for s in rec.checked.states]
    else:
        init = initial.detach().clone().requires_grad_(True)
        init_leaves = [init]
    out, final = fn(*leaves, initial_state=init, output_final_state=True)
    flat = flatten(rec, out, final)
    loss = sum((flat[k] * weights[k]).sum() for k in sorted(flat))
    names = [s.name for s in rec.checked.inputs + rec.checked.params] + [
        f"initial_state[{s.name}]" for s in rec.checked.states]
    return dict(zip(names, torch.autograd.grad(loss, leaves + init_leaves), strict=True))


def _weights(flat: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen, dtype=F64) for k, v in sorted(flat.items())}


def check_gradients(name, form, chunk, T, decay_scale=1.0):
    rec = SPECS[name]
    args, initial, ref = case(name, T, F64, decay_scale)
    weights = _weights(ref, seed=11)
    expected = _grads(rec.reference, rec, args, initial, weights)
    layer = recurrence_dsl.compile(rec, backend="torch", chunk_size=chunk)
    got = _grads(functools.partial(layer, form=form), rec, args, initial, weights)
    errors = {}
    for key, value in expected.items():
        assert torch.isfinite(got[key]).all(), f"gradient of {key} has inf/nan"
        errors[key] = rel(got[key], value)
    assert max(errors.values()) <= GRAD_TOL, f"{name} {form} C={chunk} T={T}: gradient relative errors {errors}"


@pytest.mark.parametrize("name, form, chunk", form_cases(chunks=[16]))
def test_gradients(name, form, chunk):
    check_gradients(name, form, chunk, 37)


@pytest.mark.parametrize("name, form, chunk", [p for p in form_cases(chunks=[64]) if p.values[0] in DECAYING])
def test_gradients_strong_decay(name, form, chunk):
    """Strong decay over 64 steps (one 64-step chunk): gradients stay finite and exact, no exp(-G) overflow."""
    check_gradients(name, form, chunk, 64, STRONG_DECAY)


# ---------------------------------------------------------------------------------------------------------
# forms a spec lacks; the compile cache
# ---------------------------------------------------------------------------------------------------------

MISSING = [(n, f) for n in sorted(SPECS) for f in ("scan", "chunked", "parallel") if f not in forms_of(n)]


def test_some_forms_are_missing():
    assert ("mamba", "chunked") in MISSING and ("indrnn", "chunked") in MISSING
    assert ("delta_net", "parallel") in MISSING and ("delta_net", "scan") in MISSING


@pytest.mark.parametrize("name, form", MISSING, ids=[f"{n}-{f}" for n, f in MISSING])
def test_missing_form_raises_with_reason(name, form):
    rec = SPECS[name]
    reason = analyse(rec.checked).unavailable[form]
    layer = recurrence_dsl.compile(rec, backend="torch")
    args, initial, _ = case(name, 37, F64)
    with pytest.raises(CallError) as info:
        layer(*args, initial_state=initial, form=form)
    message = str(info.value)
    assert f"'{form}'" in message and name in message, message
    assert reason and reason in message, message
    with pytest.raises(ValueError) as info:
        recurrence_dsl.compile(rec, form=form)
    assert form in str(info.value) and reason in str(info.value)


def test_compile_cache_returns_the_same_layer():
    for path in SPEC_FILES:
        for name, rec in recurrence_dsl.load(path).items():
            layer = recurrence_dsl.compile(rec)
            assert recurrence_dsl.compile(rec) is layer
            assert recurrence_dsl.compile(rec.checked) is layer
            assert recurrence_dsl.compile(SPECS[name]) is layer  # a separate load of the same file
            assert recurrence_dsl.compile(rec, backend="auto", form="auto", chunk_size=None) is layer  # the defaults
            pinned = recurrence_dsl.compile(rec, chunk_size=64)  # explicit: wins over the tuning store
            assert pinned is not layer and pinned.chunk_size_given and not layer.chunk_size_given
            assert recurrence_dsl.compile(rec, backend="torch") is not layer
            other = recurrence_dsl.compile(rec, chunk_size=16)
            assert other is not layer and other.chunk_size == 16 and layer.chunk_size == 64
            assert recurrence_dsl.compile(rec, chunk_size=16) is other
            assert set(layer.forms) == set(analyse(rec.checked).forms)
