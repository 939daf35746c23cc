"""torch.func transforms over a layer call: the forms' backwards are torch.autograd.Functions without functorch
rules, so a transform gets a CallError naming the layer, form and backend and what works instead (and the torch
recurrent form with RECURRENCE_DSL_RECURRENT_BACKWARD=autograd, plain torch ops, is differentiated by torch.func)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import recurrence_dsl
from recurrence_dsl.errors import CallError
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPECS_DIR

ROOT = SPECS_DIR.parent


@pytest.fixture(scope="module")
def gla():
    rec = recurrence_dsl.load(str(SPECS_DIR / "gla.rec"))["gla"]
    layer = recurrence_dsl.compile(rec, tuning=False)
    args, _ = sample_arguments(rec.checked, {"K": 8, "V": 8}, 1, 40, 1, dtype=torch.float32, seed=0)
    return layer, args


@pytest.mark.parametrize(("backend", "form"), [("torch", "chunked"), ("torch", "recurrent"), ("triton", "chunked")])
def test_torch_func_grad_gets_a_call_error_naming_what_works(gla, backend, form):
    layer, args = gla

    def loss(q):
        return layer(q, *args[1:], backend=backend, form=form)[0].sum()

    with pytest.raises(CallError, match=r"gla: torch.func transforms .* not supported here: .*torch.autograd.grad.*"
                                        r"RECURRENCE_DSL_RECURRENT_BACKWARD=autograd.*\(torch: "):
        torch.func.grad(loss)(args[0])
    qs = torch.stack([args[0], 2 * args[0]])  # a vmapped axis over q: each call one of the two

    def one(q):
        return layer(q, *args[1:], backend=backend, form=form)[0]

    if form == "recurrent":  # its forward is plain torch ops: vmap runs it
        torch.testing.assert_close(torch.func.vmap(one)(qs), torch.stack([one(q) for q in qs]))
    else:  # the step check reads values on the host
        with pytest.raises(CallError, match="torch.func transforms"):
            torch.func.vmap(one)(qs)


def test_the_autograd_recurrent_form_is_differentiated_by_torch_func():
    """In a fresh process (the variable is read when the module is generated and loaded): torch.func.grad of the
    torch recurrent form equals torch.autograd.grad's."""
    script = (
        "import torch, recurrence_dsl\n"
        "from recurrence_dsl.sampling import sample_arguments\n"
        f"rec = recurrence_dsl.load({str(SPECS_DIR / 'gla.rec')!r})['gla']\n"
        "layer = recurrence_dsl.compile(rec, tuning=False)\n"
        "args, _ = sample_arguments(rec.checked, {'K': 8, 'V': 8}, 1, 24, 1, dtype=torch.float64, seed=1)\n"
        "f = lambda q: layer(q, *args[1:], backend='torch', form='recurrent')[0].sum()\n"
        "got = torch.func.grad(f)(args[0])\n"
        "q = args[0].clone().requires_grad_(True)\n"
        "want, = torch.autograd.grad(f(q), q)\n"
        "torch.testing.assert_close(got, want)\n"
        "print('same', float(got.abs().sum()))\n")
    env = dict(os.environ, RECURRENCE_DSL_RECURRENT_BACKWARD="autograd", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("same ") and float(done.stdout.split()[1]) > 0
