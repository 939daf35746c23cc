"""A sixth trial's fixes (recent layers written from their papers by a new user: KDA, Comba, Mamba-3, GSA, TTT,
LRU, ...): an output norm of a readout keeps the chunked forms, an angle param starts at zero, a maximum over an
index is named as such, and a state too large for the recurrent kernels says what runs instead."""

from __future__ import annotations

import pytest
import torch

import recurrence_dsl
from codegen.load import load_module
from recurrence_dsl.analysis import analyse
from recurrence_dsl.sampling import sample_arguments

# 1. An RMS norm over V of a readout (GLA's, RetNet's, TTT's output norm) is an epilogue of that readout: the
#    readout inside `sum(m, z[m] * z[m])` is indexed by the sum's m, and the three reads of z are one readout.

RMS = """
recurrence gla_rms(q[K], k[K], v[V], g[K]) -> o[V] {
    state S[K, V]
    S[i, j] = exp(g[i]) * S[i, j] + k[i] * v[j]
    z[j] = sum(i, q[i] * S[i, j])
    o[j] = z[j] / sqrt(sum(m, z[m] * z[m]) / V + 1e-5) + sum(m, abs(z[m]))
}
"""


def test_an_output_norm_of_a_readout_keeps_the_chunked_forms():
    rec = recurrence_dsl.load(RMS)["gla_rms"]
    analysis = analyse(rec.checked)
    assert {"chunked", "parallel"} <= set(analysis.forms), analysis.unavailable
    assert len(analysis.outputs["o"].readouts) == 1  # z read three times: one contraction
    layer = recurrence_dsl.compile(rec, backend="torch", tuning=False)
    args, init = sample_arguments(rec.checked, {"K": 8, "V": 8}, 2, 37, 2, dtype=torch.float64, seed=1,
                                  with_initial_state=True)
    want, want_final = rec.reference(*args, initial_state=init, output_final_state=True)
    for form in ("chunked", "parallel", "recurrent"):
        leaves = [a.detach().clone().requires_grad_() for a in args]
        out, final = layer(*leaves, initial_state=init, output_final_state=True, form=form, chunk_size=8)
        assert torch.allclose(out, want, atol=1e-9) and torch.allclose(final, want_final, atol=1e-9), form
        out.sum().backward()
        grads = [x.grad for x in leaves]
        if form == "chunked":
            chunked = grads
        elif form == "recurrent":
            assert all(torch.allclose(a, b, atol=1e-8) for a, b in zip(chunked, grads))


# 2. A param read only inside cos / sin is an angle (LRU's theta), not a decay: it starts at zero, as its
#    docstring says, where it started at a head decay's solution (an angle of ~1 rad on every channel).

ROTATION = """
recurrence rot_exp(x[D]) -> y[D] {
    param w[D]
    state hr[D], hi[D]
    hr2[d] = 0.9 * (cos(exp(w[d])) * hr[d] - sin(exp(w[d])) * hi[d]) + x[d]
    hi[d] = 0.9 * (sin(exp(w[d])) * hr[d] + cos(exp(w[d])) * hi[d])
    hr[d] = hr2[d]
    y[d] = hr[d]
}
"""


def test_an_angle_param_starts_at_zero():
    rec = recurrence_dsl.load(ROTATION)["rot_exp"]
    module = load_module(analyse(rec.checked))
    layer = module.RotExp(2, {"D": 4})
    assert torch.equal(layer.w.detach(), torch.zeros(2, 4))
    assert "w starts at zero" in " ".join(module.RotExp.__doc__.split())


# 3. `max(m, s[m])`, a maximum over an index (Gated Slot Attention's softmax shift), says that max compares two
#    values and sum is the only reduction, not "declare m as an input".

def test_a_maximum_over_an_index_is_named_as_such():
    text = """
recurrence gsa_max(q[K], g[M]) -> o {
    state Ks[M, K]
    Ks[m, i] = exp(g[m]) * Ks[m, i] + q[i]
    s[m] = sum(i, Ks[m, i] * q[i])
    o = max(m, s[m])
}
"""
    with pytest.raises(recurrence_dsl.SpecError) as err:
        recurrence_dsl.load(text)
    message = str(err.value)
    assert "undefined name 'm'" in message and "sum(m, ...) is the only reduction" in message
    assert "declare it" not in message


# 4. The recurrent kernels' refusal of a state too large for a program's registers no longer promises a chunked
#    form the recurrence may not have.

def test_a_state_too_large_for_the_recurrent_kernel_says_what_runs_instead(monkeypatch):
    rec = recurrence_dsl.load("""
recurrence tanh_rnn(x[D]) -> y[D] {
    param W[D, D]
    state h[D]
    h[d] = tanh(sum(e, W[d, e] * h[e]) + x[d])
    y[d] = h[d]
}
""")["tanh_rnn"]
    module = load_module(analyse(rec.checked))
    monkeypatch.setattr(module, "_triton_compiles_for_cuda", lambda: True)
    with pytest.raises(ValueError) as err:
        module._triton_check_fits(module.triton_REGISTER_FILE + 1, "the kernel")
    assert "backend='torch'" in str(err.value) and "(which form='auto' runs instead)" not in str(err.value)
