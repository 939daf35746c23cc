"""The triton backend of `recurrence_dsl.compile` against the float64 reference (issue 4), CPU + Triton interpreter.

Every recurrence of specs/ (and every LANGUAGE.md example) through the recurrent and chunked forms of the triton
backend (`layer.triton_forms`, where the analysis allows them; its scan form: tests/test_triton_scan.py), with an
initial state, the final state checked, and `cu_seqlens` packing three sequences. Relative error
||x - ref|| / ||ref|| of every output and final state: <= 1e-5 for float32 inputs, <= 5e-3 for float16 inputs. The
reference always runs on the values the kernel sees (float32 or float16 draws cast back to float64), so only the
kernels' error is measured.

The interpreter runs every program one after another, so the matrix is sparse but covers every axis for every
spec and form:

- float32, chunk 16: the full grid T in {1, 63, 64, 200} x sizes {16, 32, 48} (H = 2 at T = 63, else H = 1),
  plus one case with a different size per axis (48, 32, ...);
- float16, chunk 16: T in {63, 200} x sizes {16, 48};
- chunk 64 (chunked form only): float32 T = 64 (one whole chunk) and T = 200, float16 T = 200;
- cu_seqlens (B = 1, three sequences, initial state with 3 rows): one case per dtype.

LANGUAGE.md examples that equal a spec of specs/ up to comments and layout get two smoke cases per form; any
other example gets the full matrix. Triton is required: this file fails, not skips, without it.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton or the project's Triton kernel modules are imported

import itertools  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402, F401  (fail loudly if triton is missing)

import recurrence_dsl  # noqa: E402
from codegen.layer import interpreting  # noqa: E402
from codegen.load import triton_available  # noqa: E402
from codegen.specialize import chunked_backward_in_triton  # noqa: E402
from codegen.triton_recurrent import dplr_chunked_in_triton  # noqa: E402
from recurrence_dsl import CallError  # noqa: E402
from recurrence_dsl.analysis import TransitionClass, analyse  # noqa: E402
from recurrence_dsl.sampling import sample_arguments  # noqa: E402

from .conftest import SPEC_FILES, as_dict, language_examples, made_by  # noqa: E402

F16, F32, F64 = torch.float16, torch.float32, torch.float64
TOL = {F32: 1e-5, F16: 5e-3}
GRAD_TOL = 1e-4
WORST: dict[tuple, float] = {}


# ---------------------------------------------------------------------------------------------------------------
# The recurrences under test: specs/ and LANGUAGE.md's examples
# ---------------------------------------------------------------------------------------------------------------


def _normalised(text: str) -> str:
    """A recurrence's text without comments and with whitespace collapsed: equal programs compare equal."""
    return " ".join(re.sub(r"#[^\n]*", "", text).split())


RECS: dict[str, recurrence_dsl.Recurrence] = {}
for _path in SPEC_FILES:
    RECS.update(recurrence_dsl.load(_path))
SPEC_NAMES = list(RECS)
_SPEC_TEXTS = {_normalised(r.checked.text) for r in RECS.values()}

FULL_KEYS = list(SPEC_NAMES)  # keys that get the full matrix
SMOKE_KEYS: list[str] = []  # LANGUAGE.md examples equal to a spec up to comments: two cases per form
_blocks, _blocks_origin = language_examples()
for _n, _block in enumerate(_blocks):
    for _name, _rec in recurrence_dsl.load_text(_block, f"LANGUAGE.md example {_n}").items():
        key = f"LANGUAGE.md#{_n}:{_name}"
        RECS[key] = _rec
        (SMOKE_KEYS if _normalised(_rec.checked.text) in _SPEC_TEXTS else FULL_KEYS).append(key)


def triton_form_names(key: str) -> list[str]:
    """The forms the triton backend should have: recurrent always, scan where the analysis derives it (the
    Triton scan kernels take every elementwise state; the specs' coupled states are blocks of 2 to 4), chunked
    where the analysis derives it and a Triton chunked kernel exists (every chunkable class; diagonal-plus-rank-one
    where it trains through the derived adjoint, `dplr_chunked_in_triton`: RWKV-7), parallel where the analysis
    derives it (codegen/triton_parallel.py: every linear class)."""
    analysis = analyse(RECS[key].checked)
    kernel = "chunked" in analysis.forms and (analysis.cls is not TransitionClass.DIAGONAL_PLUS_RANK_ONE
                                              or dplr_chunked_in_triton(analysis))
    parallel = "parallel" in analysis.forms
    return (["recurrent"] + (["scan"] if "scan" in analysis.forms else []) + (["chunked"] if kernel else [])
            + (["parallel"] if parallel else []))


TRITON_FORMS = {key: triton_form_names(key) for key in RECS}
# The matrix below runs recurrent and chunked; the scan form's matrix (every spec and data file with a scan form,
# forward and backward, cu_seqlens, reverse) is tests/test_triton_scan.py, at sizes the interpreter's scan affords;
# the parallel form's (one spec per class it takes, forward and backward, cu_seqlens) tests/test_triton_parallel.py.
FORMS = {key: [f for f in forms if f not in ("scan", "parallel")] for key, forms in TRITON_FORMS.items()}


def layer_for(key: str):
    return recurrence_dsl.compile(RECS[key], backend="triton", chunk_size=16)


# ---------------------------------------------------------------------------------------------------------------
# One case of the matrix
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    key: str
    form: str
    dtype: torch.dtype
    T: int
    sizes: tuple  # ((name, value), ...)
    chunk: int = 16
    H: int = 1
    lengths: tuple | None = None  # cu_seqlens sequence lengths (B = 1)

    @property
    def id(self) -> str:
        size_text = "-".join(f"{n}{v}" for n, v in self.sizes)
        cu = "" if self.lengths is None else "-cu" + "_".join(map(str, self.lengths))
        return (f"{self.key}-{self.form}-{'f32' if self.dtype == F32 else 'f16'}-T{self.T}-{size_text}"
                f"-c{self.chunk}-H{self.H}{cu}")


def _uniform(key: str, value: int) -> tuple:
    return tuple((s, value) for s in RECS[key].checked.sizes)


def _distinct(key: str) -> tuple:
    choices = [48, 32, 20]
    return tuple((s, choices[i % len(choices)]) for i, s in enumerate(RECS[key].checked.sizes))


def _full_cases(key: str, form: str) -> list[Case]:
    cases = []
    for T, size in itertools.product((1, 63, 64, 200), (16, 32, 48)):
        if (T, size) != (200, 32):  # (size 32's blocks run at T = 63 and 64; T = 200's chunks at 16 and 48)
            cases.append(Case(key, form, F32, T, _uniform(key, size), H=2 if T == 63 else 1))
    cases.append(Case(key, form, F32, 64, _distinct(key), H=2))
    for T, size in itertools.product((63, 200), (16, 48)):
        cases.append(Case(key, form, F16, T, _uniform(key, size)))
    if form == "chunked":
        cases.append(Case(key, form, F32, 64, _uniform(key, 16), chunk=64))
        cases.append(Case(key, form, F32, 200, _uniform(key, 48), chunk=64))
        cases.append(Case(key, form, F16, 200, _uniform(key, 32), chunk=64))
    cases.append(Case(key, form, F32, 63, _uniform(key, 32), H=2, lengths=(5, 20, 38)))
    cases.append(Case(key, form, F16, 63, _uniform(key, 16), lengths=(1, 62, 0)))
    return cases


def _smoke_cases(key: str, form: str) -> list[Case]:
    return [Case(key, form, F32, 63, _uniform(key, 32), H=2),
            Case(key, form, F32, 63, _uniform(key, 16), lengths=(1, 62, 0))]


def _sparse_cases(key: str, form: str) -> list[Case]:
    """Every axis value of the full matrix once: for a diagonal-plus-rank-one chunked form, whose key-decay kernels
    the interpreter runs slowly (its full matrix passed in 233 s for rwkv7 alone; these take about 40 s);
    tests/test_triton_dplr.py covers the rest of that form."""
    return [Case(key, form, F32, 1, _uniform(key, 48)), Case(key, form, F32, 64, _uniform(key, 32)),
            Case(key, form, F32, 200, _uniform(key, 16)), Case(key, form, F16, 63, _uniform(key, 48)),
            Case(key, form, F32, 64, _uniform(key, 16), chunk=64),
            Case(key, form, F16, 63, _uniform(key, 16), lengths=(1, 62, 0))]


def _cases(key: str, form: str) -> list[Case]:
    dplr = form == "chunked" and analyse(RECS[key].checked).cls is TransitionClass.DIAGONAL_PLUS_RANK_ONE
    return _sparse_cases(key, form) if dplr else _full_cases(key, form)


CASES = ([c for k in FULL_KEYS for f in FORMS[k] for c in _cases(k, f)]
         + [c for k in SMOKE_KEYS for f in FORMS[k] for c in _smoke_cases(k, f)])


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def map_state(state, fn):
    if state is None:
        return None
    if isinstance(state, dict):
        return {k: fn(v) for k, v in state.items()}
    return fn(state)


def cu_of(lengths) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int64)


def sample(key: str, sizes: dict, T: int, H: int, dtype: torch.dtype, seed: int, B: int = 1, rows: int | None = None):
    """Arguments in `dtype` (drawn in float64 and rounded), an initial state in float32, and both as the
    reference should see them (the rounded values cast back to float64)."""
    args64, init64 = sample_arguments(RECS[key].checked, sizes, B, T, H, dtype=F64, seed=seed,
                                      with_initial_state=True, rows=rows)
    args = [a.to(dtype) for a in args64]
    init = map_state(init64, lambda t: t.to(F32))
    return args, init, [a.to(F64) for a in args], map_state(init, lambda t: t.to(F64))


def run_case(case: Case) -> float:
    rec = RECS[case.key]
    checked = rec.checked
    sizes = dict(case.sizes)
    cu = None if case.lengths is None else cu_of(case.lengths)
    rows = None if cu is None else len(case.lengths)
    seed = zlib.crc32(case.id.encode())
    args, init, ref_args, ref_init = sample(case.key, sizes, case.T, case.H, case.dtype, seed, rows=rows)
    ref_out, ref_final = rec.reference(*ref_args, initial_state=ref_init, output_final_state=True, cu_seqlens=cu)
    layer = layer_for(case.key)
    assert case.form in layer.triton_forms
    out, final = layer(*args, initial_state=init, output_final_state=True, cu_seqlens=cu, form=case.form,
                       chunk_size=case.chunk)
    ref_out, ref_final = as_dict(ref_out, checked.outputs), as_dict(ref_final, checked.states)
    out, final = as_dict(out, checked.outputs), as_dict(final, checked.states)
    errors = {}
    for o in checked.outputs:
        assert out[o.name].shape == ref_out[o.name].shape, o.name
        assert out[o.name].dtype == case.dtype, f"output {o.name} comes back as {out[o.name].dtype}"
        assert torch.isfinite(out[o.name]).all(), f"output {o.name} has non-finite values"
        errors[o.name] = rel(out[o.name], ref_out[o.name])
    for s in checked.states:
        assert final[s.name].shape == ref_final[s.name].shape, s.name
        assert torch.isfinite(final[s.name]).all(), f"final state {s.name} has non-finite values"
        errors[f"final {s.name}"] = rel(final[s.name], ref_final[s.name])
    worst = max(errors.values())
    bucket = (str(case.dtype), case.form, "cu" if cu is not None else f"T={case.T}")
    WORST[bucket] = max(WORST.get(bucket, 0.0), worst)
    assert worst <= TOL[case.dtype], f"{case.id}: relative errors {errors} exceed {TOL[case.dtype]:g}"
    return worst


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_against_reference(case):
    run_case(case)


def test_the_matrix_covers_every_spec_form_and_axis():
    """Every spec and LANGUAGE.md example is present, with every triton form and every axis value."""
    # one recurrence a file, or several passes named <file>_<pass> (bidirectional_mamba.rec)
    assert len(SPEC_FILES) >= 13 and len(SPEC_NAMES) >= len(SPEC_FILES)
    assert all(any(n == p.stem or n.startswith(p.stem + "_") for n in SPEC_NAMES) for p in SPEC_FILES)
    assert _blocks and any(k.startswith("LANGUAGE.md") for k in RECS)
    for key in RECS:
        for form in FORMS[key]:
            mine = [c for c in CASES if c.key == key and c.form == form]
            assert {c.dtype for c in mine} >= ({F32} if key in SMOKE_KEYS else {F32, F16}), (key, form)
            assert any(c.lengths for c in mine), (key, form)
            if key in FULL_KEYS:
                assert {c.T for c in mine} >= {1, 63, 64, 200}
                assert {v for c in mine for _, v in c.sizes} >= {16, 32, 48}
                assert {c.lengths for c in mine if c.dtype == F16} - {None}
                if form == "chunked":
                    assert {c.chunk for c in mine} == {16, 64}


@pytest.mark.parametrize("key", SPEC_NAMES)
def test_triton_forms_are_recurrent_and_chunked_where_derived(key):
    layer = layer_for(key)
    assert list(layer.triton_forms) == TRITON_FORMS[key]
    assert set(layer.triton_forms) <= set(layer.forms)


# ---------------------------------------------------------------------------------------------------------------
# Gradients: the forward runs the Triton kernels; the backward runs their own Triton backward (the recurrent form's
# derived adjoint, tests/test_triton_adjoint.py; chunked forms with Triton backward kernels) or re-runs the torch form
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key,form,sizes", [
    ("gla", "chunked", {"K": 32, "V": 16}),
    ("delta_net", "chunked", {"K": 16, "V": 32}),
    ("indrnn", "recurrent", {"D": 20}),
])
def test_gradients_match_the_reference(key, form, sizes):
    """float32 gradients of every input, param and the initial state, through the triton backend, against the
    float64 reference's; where the backward re-runs the torch form they are the torch form's gradients, where it
    runs Triton backward kernels (the recurrent form's adjoint, the chunked forms of tests/test_triton_backward.py
    and tests/test_triton_delta_backward.py) they agree with them closely."""
    rec = RECS[key]
    checked = rec.checked
    recomputed = form == "chunked" and not chunked_backward_in_triton(analyse(checked))
    T, H = 40, 2
    args, init, ref_args, ref_init = sample(key, sizes, T, H, F32, seed=7)
    names = [s.name for s in checked.inputs + checked.params] + [f"initial_state[{s.name}]" for s in checked.states]

    def run(fn, values, state, **kwargs):
        """Leaves for `values` and `state`; `(outputs, finals, leaves by name)` of fn on them."""
        leaves = [v.clone().requires_grad_(True) for v in values]
        state_leaves = {k: v.clone().requires_grad_(True) for k, v in as_dict(state, checked.states).items()}
        initial = state_leaves if isinstance(state, dict) else state_leaves[checked.states[0].name]
        out, final = fn(*leaves, initial_state=initial, output_final_state=True, **kwargs)
        return as_dict(out, checked.outputs), as_dict(final, checked.states), dict(zip(names, leaves + list(
            state_leaves.values())))

    ref_out, ref_final, ref_leaves = run(rec.reference, ref_args, ref_init)
    gen = torch.Generator().manual_seed(8)
    cotangents = [torch.randn(t.shape, generator=gen, dtype=F64) for t in [*ref_out.values(), *ref_final.values()]]

    def backward(out, final):
        results = [*out.values(), *final.values()]
        sum((r.to(F64) * c).sum() for r, c in zip(results, cotangents, strict=True)).backward()

    backward(ref_out, ref_final)
    out, final, leaves = run(layer_for(key), args, init, form=form, chunk_size=16)
    for name, t in out.items():
        backward_fn = "_AdjointBackward" if form == "recurrent" else "_RecomputeBackward"
        assert (backward_fn in type(made_by(t)).__name__) == (form == "recurrent" or recomputed), type(made_by(t))
        assert rel(t, ref_out[name].detach()) <= TOL[F32]
    backward(out, final)
    torch_out, torch_final, torch_leaves = run(recurrence_dsl.compile(rec, backend="torch", chunk_size=16), args,
                                               init, form=form, chunk_size=16)
    backward(torch_out, torch_final)
    for name in names:
        got, want = leaves[name].grad, ref_leaves[name].grad
        assert got is not None, f"no gradient for {name}"
        err = rel(got, want)
        assert err <= GRAD_TOL, f"{key}/{form}: gradient of {name} relative error {err:.3e}"
        assert rel(got, torch_leaves[name].grad) <= (1e-6 if recomputed else GRAD_TOL), f"{name}: not the torch form's"


# ---------------------------------------------------------------------------------------------------------------
# Backend choice and the triton backend's own argument checks
# ---------------------------------------------------------------------------------------------------------------


def _gla_call(T=63, B=1, H=1, sizes=None, rows=None, dtype=F32):
    sizes = sizes or {"K": 16, "V": 16}
    args, init, _, _ = sample("gla", sizes, T, H, dtype, seed=3, B=B, rows=rows)
    return args, init


def test_auto_backend_picks_triton_under_the_interpreter(monkeypatch):
    assert interpreting() and triton_available()
    layer = recurrence_dsl.compile(RECS["gla"], backend="auto", chunk_size=16)
    assert layer.backend_for(torch.device("cpu"), torch.float32) == "triton"
    assert layer.backend_for(torch.device("cpu"), torch.float64) == "torch"  # Triton kernels take no float64
    seen = []
    module = sys.modules[type(layer).__module__]  # the layer's generated module
    real_run_forms = module.run_forms

    def spy(spec, form_fns, *args, **kwargs):
        seen.append(form_fns)
        return real_run_forms(spec, form_fns, *args, **kwargs)

    monkeypatch.setattr(module, "run_forms", spy)
    args, init = _gla_call()
    out, final = layer(*args, initial_state=init, output_final_state=True)
    assert len(seen) == 1 and seen[0] is layer.triton_forms
    ref_out, ref_final = RECS["gla"].reference(*(a.double() for a in args), initial_state=init.double(),
                                               output_final_state=True)
    assert rel(out, ref_out) <= TOL[F32] and rel(final, ref_final) <= TOL[F32]


def test_auto_form_on_the_triton_backend():
    """form="auto" on the triton backend: recurrent for short sequences, chunked for long ones."""
    layer = layer_for("gla")
    for T in (5, 70):
        args, init = _gla_call(T=T)
        out, final = layer(*args, initial_state=init, output_final_state=True)
        ref_out, ref_final = RECS["gla"].reference(*(a.double() for a in args), initial_state=init.double(),
                                                   output_final_state=True)
        assert rel(out, ref_out) <= TOL[F32] and rel(final, ref_final) <= TOL[F32]


@pytest.mark.parametrize("chunk", [24, 8, 48, 100, 1, -16, 0])
def test_chunk_size_must_be_a_power_of_two_from_16(chunk):
    layer = layer_for("gla")
    args, init = _gla_call(T=20)
    with pytest.raises(CallError, match="chunk_size") as info:
        layer(*args, initial_state=init, form="chunked", chunk_size=chunk)
    assert str(chunk) in str(info.value)


def test_chunk_size_of_the_compiled_layer_is_checked_too():
    """On the triton backend a chunk_size the chunked kernels cannot run is refused when the layer is built (where
    auto or chunked may run it); under auto a CPU call may run it on torch, so the call checks it."""
    with pytest.raises(ValueError, match="chunk_size must be a power of two >= 16 on the triton backend, got 24"):
        recurrence_dsl.compile(RECS["gla"], backend="triton", chunk_size=24)
    layer = recurrence_dsl.compile(RECS["gla"], chunk_size=24)
    args, init = _gla_call(T=20)
    with pytest.raises(CallError, match="chunk_size"):
        layer(*args, initial_state=init, form="chunked", backend="triton")


def test_a_form_the_triton_backend_lacks():
    """A layer whose Triton backend lacks a form the torch backend has (every linear spec now has the parallel
    Triton form, so a layer is built without it): the call names the form and every form it could run."""
    key, form = "gla", "parallel"
    full = layer_for(key)
    forms = {name: fn for name, fn in full.triton_forms.items() if name != form}
    layer = type(full)(full.recurrence, full.forms, forms, backend="triton", tuning=False)
    assert form in layer.forms  # the torch backend has it
    sizes = {s: 16 for s in RECS[key].checked.sizes}
    args, init, _, _ = sample(key, sizes, 20, 1, F32, seed=0)
    with pytest.raises(CallError) as info:
        layer(*args, initial_state=init, form=form)
    message = str(info.value)
    assert form in message
    for available in forms:
        assert available in message, f"{message!r} does not name the available form {available!r}"


def _bad_calls():
    """(label, thunk producing (args, kwargs), words the message must contain)."""
    def good(T=63, B=1, rows=None):
        args, init = _gla_call(T=T, B=B, rows=rows)
        return args, init

    def wrong_key_size():
        args, init = good()
        args[1] = torch.randn(1, 63, 1, 17)
        return args, {"initial_state": init}

    def wrong_rank():
        args, init = good()
        args[2] = args[2][..., 0]
        return args, {"initial_state": init}

    def wrong_length():
        args, init = good()
        args[3] = args[3][:, :10]
        return args, {"initial_state": init}

    def cu_with_batch_two():
        args, init = good(B=2)
        return args, {"cu_seqlens": torch.tensor([0, 30, 63])}

    def cu_not_ending_at_T():
        args, init = good(rows=3)
        return args, {"initial_state": init, "cu_seqlens": torch.tensor([0, 5, 20, 60])}

    def cu_decreasing():
        args, init = good(rows=3)
        return args, {"initial_state": init, "cu_seqlens": torch.tensor([0, 30, 20, 63])}

    def cu_float():
        args, init = good(rows=3)
        return args, {"initial_state": init, "cu_seqlens": torch.tensor([0.0, 5.0, 25.0, 63.0])}

    def initial_rows_with_cu():
        args, init = good(rows=2)
        return args, {"initial_state": init, "cu_seqlens": torch.tensor([0, 5, 25, 63])}

    def initial_rows_without_cu():
        args, init = good(rows=3)
        return args, {"initial_state": init}

    return [
        ("wrong size of k", wrong_key_size, ["'k'"]),
        ("v without its V axis", wrong_rank, ["'v'"]),
        ("g shorter than T", wrong_length, ["'g'"]),
        ("cu_seqlens with B=2", cu_with_batch_two, ["cu_seqlens", "B"]),
        ("cu_seqlens not ending at T", cu_not_ending_at_T, ["cu_seqlens", "63"]),
        ("decreasing cu_seqlens", cu_decreasing, ["cu_seqlens"]),
        ("float cu_seqlens", cu_float, ["cu_seqlens"]),
        ("initial_state with 2 rows for 3 sequences", initial_rows_with_cu, ["initial_state"]),
        ("initial_state with 3 rows for B=1", initial_rows_without_cu, ["initial_state"]),
    ]


BAD_CALLS = _bad_calls()


@pytest.mark.parametrize("label,make,words", BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
@pytest.mark.parametrize("form", ["recurrent", "chunked", "auto"])
def test_bad_calls_raise_call_error_naming_the_argument(label, make, words, form):
    layer = layer_for("gla")
    args, kwargs = make()
    with pytest.raises(CallError) as info:
        layer(*args, form=form, chunk_size=16, **kwargs)
    assert isinstance(info.value, ValueError)
    for word in words:
        assert word in str(info.value), f"{label}: {str(info.value)!r} does not mention {word!r}"


def test_bad_param_shape_names_the_param():
    layer = layer_for("indrnn")
    args, init, _, _ = sample("indrnn", {"D": 16}, 10, 2, F32, seed=0)
    with pytest.raises(CallError, match="'w'"):
        layer(args[0], args[1][:1], initial_state=init)


def test_report_worst_errors():
    """Runs last: the worst relative error per (dtype, form, length or cu_seqlens) seen above (pytest -s)."""
    for bucket, err in sorted(WORST.items()):
        print(f"worst relative error {bucket}: {err:.3e}")


# ---------------------------------------------------------------------------------------------------------------
# A state in the papers' S[V, K] layout: the Triton chunked form runs on its transpose
# ---------------------------------------------------------------------------------------------------------------

PAPER_LAYOUT = {
    "delta_net": """recurrence r(q[K], k[K], v[V], beta) -> o[V] {
    state S[V, K]
    u[i] = v[i] - sum(j, S[i, j] * k[j])
    S[i, j] = S[i, j] + beta * u[i] * k[j]
    o[i] = sum(j, S[i, j] * q[j])
}""",
    "gla": """recurrence r(q[K], k[K], v[V], g[K]) -> o[V] {
    state S[V, K]
    S[i, j] = exp(g[j]) * S[i, j] + v[i] * k[j]
    o[i] = sum(j, S[i, j] * q[j])
}""",
}


@pytest.mark.parametrize("name", sorted(PAPER_LAYOUT))
@pytest.mark.parametrize("T,dtype,lengths", [(63, F32, None), (200, F16, None), (70, F32, (20, 37, 13))])
def test_paper_layout_state_through_the_triton_chunked_form(name, T, dtype, lengths):
    rec = recurrence_dsl.load(PAPER_LAYOUT[name])["r"]
    layer = recurrence_dsl.compile(rec, backend="triton", chunk_size=16)
    assert "chunked" in layer.triton_forms and analyse(rec.checked).transposed == ("S",)
    sizes = {"K": 48, "V": 32}  # different sizes, so a layout mix-up cannot go unnoticed
    cu = None if lengths is None else cu_of(lengths)
    args64, init64 = sample_arguments(rec.checked, sizes, 1, T, 2, dtype=F64, seed=T, with_initial_state=True,
                                      rows=None if lengths is None else len(lengths))
    args = [a.to(dtype) for a in args64]
    init = init64.to(F32)
    ref_out, ref_final = rec.reference(*[a.to(F64) for a in args], initial_state=init.to(F64),
                                       output_final_state=True, cu_seqlens=cu)
    out, final = layer(*args, initial_state=init, output_final_state=True, cu_seqlens=cu, form="chunked")
    assert out.shape == ref_out.shape and final.shape == ref_final.shape == init.shape
    errors = (rel(out, ref_out), rel(final, ref_final))
    assert max(errors) <= TOL[dtype], (name, T, dtype, errors)
