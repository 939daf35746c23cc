"""The recurrent form's backward: the adjoint derived from the spec (recurrence_dsl/adjoint.py), run backwards over
segments recomputed from checkpoints (codegen/dispatch.py `with_adjoint`, codegen/torch_forms.py).

Every spec of specs/: gradients of every input, param and initial state, with a gradient on the final state too,
from the recurrent form against the float64 reference interpreter's autograd (relative error <= 1e-5 in float32),
on the torch backend (the inputs' gradients for blocks of one and of three steps) and on the triton
backend (the same adjoint as a Triton kernel, tests/test_triton_adjoint.py); several segments (a checkpoint
every 4 steps). `torch.autograd.gradcheck` in float64 on tiny shapes for every spec and for bodies that use every
function, a scalar and a 3-axis state, and states that read each other's new values; packed sequences with an
empty one; zero-length sequences; the old path (autograd through the loop) kept for comparison; a body the
derivation refuses (a diagonal read) falls back to it; the forward keeps O(T / every) states.
"""

from __future__ import annotations

import pytest
import sympy
import torch

import recurrence_dsl
from codegen.dispatch import ADJOINT_BLOCK, CHECKPOINT_EVERY, RECURRENT_BACKWARD, adjoint_block, checkpoint_every
from recurrence_dsl.adjoint import canonical_key, derive_adjoint, factor_sums, nest_sums
from recurrence_dsl.analysis import analyse
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPEC_FILES, as_dict, small_sizes, weighted_gradients
from .test_breadth import PROGRAMS

SPECS: dict[str, recurrence_dsl.Recurrence] = {}
for _path in SPEC_FILES:
    SPECS.update(recurrence_dsl.load(_path))

B, T, H, EVERY = 2, 11, 2, 4  # three segments: 4 + 4 + 3 steps
TOL = 1e-5

EVERY_FUNCTION = """
recurrence scalar_state(x, w[D]) -> y, z[D] {
    param a
    state c, m[D, E, F]
    c = tanh(a * c + x)
    m[d, e, f] = exp(-softplus(w[d])) * m[d, e, f] + silu(w[d]) * x * c
    y = c * 2 + sum(d, e, f, m[d, e, f]) / (D * E * F)
    z[d] = logsigmoid(w[d]) + elu(sum(e, f, m[d, e, f])) + relu(w[d]) + min(w[d], 0.1) + max(abs(w[d]), sqrt(a))
}

recurrence coupled_after(q[K], k[K], v[V]) -> o[V] {
    state S[K, V], z[K]
    z[i] = 0.5 * z[i] + elu(k[i])
    S[i, j] = S[i, j] + z[i] * v[j] + elu(k[i]) * exp(z[i])
    o[j] = sum(i, q[i] * S[i, j]) + sum(i, z[i] / sqrt(log(1 + z[i] * z[i]) + 1))
}

recurrence coupled_before(q[K], k[K], v[V]) -> o[V] {
    state S[K, V], z[K]
    before[j] = sum(i, q[i] * S[i, j])
    S[i, j] = S[i, j] + z[i] * v[j]
    z[i] = 0.5 * z[i] + k[i]
    o[j] = before[j] * sigmoid(sum(i, z[i])) + sum(i, q[i] * S[i, j]) ** 2
}

recurrence diagonal(x[D, D], a[D]) -> y[D] {
    state h[D]
    h[d] = a[d] * h[d] + x[d, d]
    y[d] = h[d]
}
"""
EXTRA = recurrence_dsl.load_text(EVERY_FUNCTION, "extra.rec")


@pytest.fixture
def every(monkeypatch):
    monkeypatch.setenv(CHECKPOINT_EVERY, str(EVERY))


def _grads(fn, rec, args, initial, weights=None, **kwargs):
    """conftest.weighted_gradients with this file's loss weights (seed 0)."""
    return weighted_gradients(fn, rec, args, initial, weights, seed=0, **kwargs)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _sample(rec, dtype=torch.float64, length=T, rows=None, batch=B, seed=0):
    return sample_arguments(rec.checked, small_sizes(rec), batch, length, H, dtype=dtype, seed=seed,
                            with_initial_state=True, rows=rows)


def _compare(rec, backend: str, block: str, monkeypatch):
    monkeypatch.setenv(ADJOINT_BLOCK, block)
    args, initial = _sample(rec)
    ref, weights = _grads(rec.reference, rec, args, initial)
    layer = recurrence_dsl.compile(rec, backend=backend, form="recurrent", tuning=False)
    args32 = [a.float() for a in args]
    init32 = {k: v.float() for k, v in as_dict(initial, rec.checked.states).items()}
    got, _ = _grads(layer, rec, args32, init32, weights)
    names = [s.name for s in rec.checked.inputs + rec.checked.params + rec.checked.states]
    errors = {n: _rel(g, r) for n, g, r in zip(names, got, ref)}
    assert max(errors.values()) <= TOL, errors


# Blocks of one step, and of three (segments of 4 + 4 + 3 steps: a block of three and a block of one, or a whole
# segment); the Triton adjoint has no blocks.
CASES = [pytest.param(name, backend, block, id=f"{name}-{backend}" + (f"-block{block}" if backend == "torch" else ""))
         for name in sorted(SPECS) for backend, block in (("torch", "1"), ("torch", "3"), ("triton", "0"))]


@pytest.mark.parametrize(("name", "backend", "block"), CASES)
def test_gradients_match_the_reference(name, backend, block, every, monkeypatch):
    _compare(SPECS[name], backend, block, monkeypatch)


def test_adjoint_block_choice(monkeypatch):
    """The block of steps whose gradients are computed at once: forced by the environment; else as many CPU steps
    as keep the block's states and total gradients within BLOCK_BYTES (4 MiB), between 1 and a segment."""
    monkeypatch.delenv(ADJOINT_BLOCK, raising=False)
    gla = [torch.zeros(2, 4, 64, 64)]  # 128 KiB of float32 a step: 16 steps of states and gradients in 4 MiB
    assert adjoint_block(gla, 64) == 16
    assert adjoint_block(gla, 8) == 8  # never more than a segment
    assert adjoint_block([torch.zeros(2, 4, 64)], 64) == 64  # small states: the whole segment
    assert adjoint_block([torch.zeros(8, 16, 128, 128)], 64) == 1  # 4 MiB a step: one step at a time
    monkeypatch.setenv(ADJOINT_BLOCK, "7")
    assert adjoint_block(gla, 64) == 7


@pytest.mark.parametrize("name", sorted(SPECS) + ["scalar_state", "coupled_after", "coupled_before"])
def test_gradcheck_float64(name, every):
    """torch.autograd.gradcheck on B=1, T=5, H=1 and sizes 2..4 (checkpoints every 4 steps: two segments)."""
    rec = SPECS.get(name) or EXTRA[name]
    sizes = {s: [3, 2, 4][n % 3] for n, s in enumerate(rec.checked.sizes)}
    args, initial = sample_arguments(rec.checked, sizes, 1, 5, 1, dtype=torch.float64, seed=3,
                                     with_initial_state=True)
    initial = as_dict(initial, rec.checked.states)
    names = list(initial)
    layer = recurrence_dsl.compile(rec, backend="torch", form="recurrent", tuning=False)

    def fn(*xs):
        states = dict(zip(names, xs[len(args):]))
        out, final = layer(*xs[: len(args)], initial_state=states if len(names) > 1 else states[names[0]],
                           output_final_state=True)
        return tuple(as_dict(out, rec.checked.outputs).values()) + tuple(as_dict(final, rec.checked.states).values())

    leaves = [a.clone().requires_grad_() for a in args] + [initial[n].clone().requires_grad_() for n in names]
    node = fn(*leaves)[0].grad_fn
    while type(node).__name__ == "FlipBackward0":  # a reverse run: the forward run's outputs, flipped back in time
        node = node.next_functions[0][0]
    assert "_AdjointBackward" in type(node).__name__  # the derived adjoint, not the loop's autograd
    assert torch.autograd.gradcheck(fn, leaves)


def test_packed_sequences(every):
    """cu_seqlens with an empty sequence: each sequence from its own initial state, gradients as the reference's."""
    rec = SPECS["gated_delta_net"]
    cu = torch.tensor([0, 6, 6, 15])
    args, initial = _sample(rec, length=15, rows=3, batch=1)
    ref, weights = _grads(rec.reference, rec, args, initial, cu_seqlens=cu)
    layer = recurrence_dsl.compile(rec, backend="torch", form="recurrent", tuning=False)
    got, _ = _grads(layer, rec, [a.float() for a in args], initial.float(), weights, cu_seqlens=cu)
    assert max(_rel(g, r) for g, r in zip(got, ref)) <= TOL


@pytest.mark.parametrize("name", ["gla", "minimal_rnn", "normalized_linear_attention"])
def test_zero_length_sequences(name):
    """No steps: zero gradients for inputs and params; the initial state takes the final state's gradient."""
    rec = SPECS[name]
    args, initial = _sample(rec, length=0)
    layer = recurrence_dsl.compile(rec, backend="torch", form="recurrent", tuning=False)
    got, weights = _grads(layer, rec, args, initial)
    n = len(args)
    for g, a in zip(got[:n], args):
        assert g.shape == a.shape and not g.any()
    for g, s in zip(got[n:], rec.checked.states):
        assert torch.equal(g, weights[1][s.name])


def test_the_old_path_gives_the_same_gradients(monkeypatch, every):
    """RECURRENCE_DSL_RECURRENT_BACKWARD=autograd: autograd through the step loop (for comparisons)."""
    rec = SPECS["rwkv7"]
    layer = recurrence_dsl.compile(rec, backend="torch", form="recurrent", tuning=False)
    args, initial = _sample(rec)
    ours, weights = _grads(layer, rec, args, initial)
    monkeypatch.setenv(RECURRENT_BACKWARD, "autograd")
    theirs, _ = _grads(layer, rec, args, initial, weights)
    assert max(_rel(a, b) for a, b in zip(ours, theirs)) <= 1e-12


def test_a_diagonal_read_falls_back_to_autograd_through_the_loop():
    rec = EXTRA["diagonal"]
    layer = recurrence_dsl.compile(rec, backend="torch", form="recurrent", tuning=False)
    assert "No derived backward (x is read with a repeated index" in layer.source
    x = torch.randn(1, 5, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    a = torch.rand(1, 5, 1, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a: layer(x, a)[0], (x, a))


def test_the_forward_keeps_checkpoints_only(monkeypatch):
    """Saved for the backward: the inputs, params and initial state, and one state every `every` steps."""
    rec = SPECS["gla"]
    layer = recurrence_dsl.compile(rec, backend="torch", form="recurrent", tuning=False)
    args, initial = _sample(rec, dtype=torch.float32, length=100)
    leaves = [a.requires_grad_() for a in args]
    for every, checkpoints in ((0, 2), (10, 10), (64, 2)):  # 0: max(64, isqrt(T))
        monkeypatch.setenv(CHECKPOINT_EVERY, str(every))
        out, _ = layer(*leaves, initial_state=initial)
        assert len(out.grad_fn.saved_tensors) == len(leaves) + 1 + checkpoints
    monkeypatch.delenv(CHECKPOINT_EVERY)
    assert checkpoint_every(100) == 64 and checkpoint_every(1 << 20) == 1024


def test_a_segment_of_large_states_is_shorter_on_cpu():
    """On CPU a segment's two buffers stay within SEGMENT_BYTES, never below MIN_EVERY steps; small states keep
    max(64, isqrt(T)); an explicit RECURRENCE_DSL_CHECKPOINT_EVERY wins."""
    from codegen.dispatch import MIN_EVERY, SEGMENT_BYTES

    gla = [torch.zeros(2, 4, 64, 64)]  # 128 KiB a step: 4 MiB / (2 * 128 KiB) = 16 steps
    assert checkpoint_every(2048, gla) == max(MIN_EVERY, SEGMENT_BYTES // (2 * 128 << 10)) == 16
    assert checkpoint_every(2048, [torch.empty(1).expand(2, 4, 64, 256, 256)]) == MIN_EVERY  # 32 MiB a step
    assert checkpoint_every(2048, [torch.zeros(2, 4, 64)]) == 64
    assert checkpoint_every(1 << 20, [torch.zeros(2, 4, 64)]) == 1024
    assert checkpoint_every(2048) == 64


def test_the_adjoint_of_gla_as_mathematics():
    """The derived step: dS_(t-1) = exp(g) * dS_t, dq = sum_j S_t[i, j] do[j] / sqrt(K), dk = dS_t v, ..."""
    a = analyse(SPECS["gla"].checked)
    adj = derive_adjoint(a.recurrence, a.ir)
    text = {n: str(d.expr) for n, d in {**adj.inputs, **adj.params, **adj.previous}.items()}
    assert text["S"] == "exp(g[i])*S__new__grad[i, j]"
    assert str(adj.new_states[0].expr) == "o__grad[j]*q[i]/K**0.5 + S__grad[i, j]"
    assert text["q"].startswith("Sum(S__new[i, j__") and "o__grad" in text["q"]
    assert text["g"].startswith("exp(g[i])*Sum(S[i, j__")


BREADTH = PROGRAMS[::4]  # generated bodies (tests/test_breadth.py): every shape, decay, readout and constant kind


@pytest.mark.parametrize("program", BREADTH, ids=[p.ident for p in BREADTH])
def test_gradients_of_generated_programs(program, every):
    """float64 gradients of generated programs (T = 9, three segments) against the reference's autograd."""
    rec = recurrence_dsl.load(program.text)[program.name]
    args, initial = sample_arguments(rec.checked, program.sizes, 2, 9, 1, dtype=torch.float64, seed=1,
                                     with_initial_state=True)
    ref, weights = _grads(rec.reference, rec, args, initial)
    layer = recurrence_dsl.compile(rec, backend="torch", form="recurrent", tuning=False)
    assert "No derived backward" not in layer.source
    got, _ = _grads(layer, rec, args, initial, weights)
    names = [s.name for s in rec.checked.inputs + rec.checked.params + rec.checked.states]
    errors = {n: _rel(g, r) if r.abs().max() > 0 else g.abs().max().item() for n, g, r in zip(names, got, ref)}
    assert max(errors.values()) <= 1e-9, (errors, program.text)


def test_nest_sums_keeps_the_shared_contraction_a_sum_of_its_own():
    """DeltaNet's dk holds sum(i, j, S[a, j] * dS[i, j] * k[i]); nested, its inner sum is dv's sum(i, dS[i, j] * k[i])
    (equal up to index names), which the printer then computes once for dk, dv and dbeta; no sum over several
    indices is left."""
    a = analyse(SPECS["delta_net"].checked)
    adj = derive_adjoint(a.recurrence, a.ir)
    flat = adj.inputs["k"].expr
    assert any(len(s.limits) == 2 for s in flat.atoms(sympy.Sum))
    nested = factor_sums(nest_sums(flat, adj.ranges))
    assert all(len(s.limits) == 1 for s in nested.atoms(sympy.Sum))
    (dv_sum,) = adj.inputs["v"].expr.atoms(sympy.Sum)
    assert canonical_key(dv_sum, adj.ranges)[0] in {canonical_key(s, adj.ranges)[0] for s in nested.atoms(sympy.Sum)}
    # The same value: at sizes K = V = 2 both expand to the same polynomial.
    sizes = {s: 2 for s in (nested - flat).free_symbols if s.name in ("K", "V")}
    assert sympy.expand((nested - flat).subs(sizes).doit()) == 0


def test_a_zero_start_keeps_the_checkpoint_rule_of_its_state_size(monkeypatch):
    """A call without an initial state passes no state to the torch recurrent form (`takes_no_initial_state`);
    its checkpoints still follow the CPU rule for the states' size (from the printed `state_dims`), not the
    length-only rule (GLA at K = V = 128: 16 steps, not 64)."""
    import sys

    from codegen import dispatch

    from .conftest import SPECS_DIR

    gla = recurrence_dsl.load(SPECS_DIR / "gla.rec")["gla"]
    layer = recurrence_dsl.compile(gla, backend="torch", tuning=False)
    module = sys.modules[type(layer).__module__]  # the layer's module, with its own copy of the dispatcher
    seen = []
    real = module.checkpoint_every
    monkeypatch.setattr(module, "checkpoint_every", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    q, k, v = (torch.randn(2, 200, 4, 128, requires_grad=True) for _ in range(3))
    g = (-torch.rand(2, 200, 4, 128)).requires_grad_()
    o, _ = layer(q, k, v, g, form="recurrent")
    o.sum().backward()
    assert seen == [max(dispatch.MIN_EVERY, dispatch.SEGMENT_BYTES // (2 * 2 * 4 * 128 * 128 * 4))] == [16]
