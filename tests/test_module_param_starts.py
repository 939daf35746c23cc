"""The generated nn.Module's params as constructed: a param of a decay starts where every head's decay is in (0, 1)
(RetNet's 1 - 2^(-5 - h)), so form="auto" runs the chunked or parallel form, not the recurrent one."""

from __future__ import annotations

import math

import pytest
import torch

import recurrence_dsl
from codegen.load import load_module
from recurrence_dsl.analysis import analyse
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPECS_DIR, as_dict


def _module_and_rec(name: str):
    rec = recurrence_dsl.load(SPECS_DIR / f"{name}.rec")[name]
    return load_module(analyse(rec.checked)), rec


def _spy(monkeypatch, forms: dict) -> list[str]:
    """Record the name of every form function of `forms` that runs (the layer holds this same dict)."""
    ran: list[str] = []
    for form, fn in list(forms.items()):
        def spy(*args, _fn=fn, _form=form, **kwargs):
            ran.append(_form)
            return _fn(*args, **kwargs)
        spy.__dict__.update(fn.__dict__)  # the dispatcher reads marks such as `no_initial_state`
        monkeypatch.setitem(forms, form, spy)
    return ran


@pytest.mark.parametrize(("name", "param", "T", "form"), [
    ("retention", "gamma", 40, "chunked"), ("retention", "gamma", 12 + 8, "parallel"),
    ("lightning_attention", "slope", 40, "chunked"),
])
def test_constructed_module_runs_a_chunk_form_and_matches_the_reference(monkeypatch, name, param, T, form):
    module, rec = _module_and_rec(name)
    H, sizes = 3, {"K": 8, "V": 4}
    cls = getattr(module, "".join(part.title() for part in name.split("_")))
    layer = cls(H, sizes, backend="torch", chunk_size=16 if form == "chunked" else 32)
    assert getattr(layer, param).dtype == torch.float32
    value = getattr(layer, param).detach().double()
    decay = value if param == "gamma" else torch.exp(-value)
    expected = torch.tensor([1 - 2.0 ** (-5 - h) for h in range(H)], dtype=torch.float64)
    torch.testing.assert_close(decay, expected, rtol=1e-6, atol=0)
    assert value.shape == (H,)

    ran = _spy(monkeypatch, getattr(module, f"_{name}_forms"))
    args, _ = sample_arguments(rec.checked, sizes, 2, T, H, dtype=torch.float64, seed=3)
    inputs = [a.float() for a in args[:len(rec.checked.inputs)]]
    out, _ = layer(*inputs)
    assert ran == [form], f"form='auto' ran {ran}, expected the {form} form"

    ref, _ = rec.reference(*[x.double() for x in inputs], getattr(layer, param).detach().double())
    out, ref = as_dict(out, rec.checked.outputs), as_dict(ref, rec.checked.outputs)
    for key in ref:
        err = (out[key].double() - ref[key]).norm() / ref[key].norm()
        assert err < 1e-5, f"{key}: relative error {err:.2e}"


def test_decay_params_start_per_head_and_other_params_at_zero():
    module, _ = _module_and_rec("mamba")
    layer = module.Mamba(2, {"D": 3, "N": 5}, backend="torch")
    assert layer.A.shape == (2, 3, 5) and layer.Dskip.shape == (2, 3)
    for h in range(2):  # exp(dt * A) with dt = 1 is head h's decay
        assert torch.allclose(layer.A[h].double(), torch.full((3, 5), math.log1p(-2.0 ** (-5 - h)),
                                                              dtype=torch.float64))
    assert not layer.Dskip.detach().any()
    rwkv, _ = _module_and_rec("rwkv6")
    assert not rwkv.Rwkv6(2, {"K": 4}).u.detach().any()  # a bonus, not a decay
    given = module.Mamba(2, {"D": 3, "N": 5}, A=torch.full((2, 3, 5), -0.5))
    assert torch.equal(given.A.detach(), torch.full((2, 3, 5), -0.5))


def test_a_late_head_keeps_a_decay_below_one_in_its_log():
    module, _ = _module_and_rec("lightning_attention")
    slope = module.LightningAttention(24).slope.detach()
    assert (slope > 0).all(), "1 - 2^(-28) rounds to 1 in float32; its log must not"
