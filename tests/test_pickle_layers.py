"""Pickling compiled layers: `torch.save(model)` of a model holding a `recurrence_dsl.compile(...)` layer, loaded in
a fresh interpreter, gives the same outputs.

A compile() layer pickles as its spec's file text, its name and its defaults (form, backend, chunk_size, tuning),
and loads by compiling them again (`Layer.__reduce_ex__`, `recurrence_dsl.compiler._compiled_from_source`): its
generated module lives in the cache under a name no other process imports. A layer of a generated module imported
by name pickles as that module and its defaults; a layer of neither kind is a PicklingError that says why.
"""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys

import pytest

import recurrence_dsl
from codegen.load import load_layer
from recurrence_dsl.analysis import analyse
from recurrence_dsl.cli import main

from .conftest import REPO, SPECS_DIR

# A spec given as text (no file): a decayed running sum.
DECAYED_SUM = """recurrence decayed_sum(x[D], a[D]) -> y[D] {
    state h[D]
    h[d] = a[d] * h[d] + x[d]
    y[d] = h[d]
}
"""
# Run as a user would: the model's class in the user's module; one process builds the model and saves it and
# its outputs, another (with the module importable, as torch.load needs) loads both.
USER_MODEL = """
import sys, torch, recurrence_dsl

class Model(torch.nn.Module):
    def __init__(self, gla_path, decayed_sum_text):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)
        self.gla = recurrence_dsl.compile(recurrence_dsl.load(gla_path)["gla"], form="chunked",
                                          backend="torch", chunk_size=16)
        self.decayed = recurrence_dsl.compile(recurrence_dsl.load_text(decayed_sum_text)["decayed_sum"],
                                              backend="torch")

    def forward(self, x):
        q = self.proj(x)
        o, _ = self.gla(q, x, x, torch.nn.functional.logsigmoid(x))
        y, _ = self.decayed(o, torch.sigmoid(x))
        return y
"""
SAVE = """
import sys, torch
from user_model import Model
torch.manual_seed(0)
model = Model(sys.argv[2], sys.argv[3])
x = torch.randn(1, 40, 2, 16)
torch.save(model, sys.argv[1] + "/model.pt")
torch.save((x, model(x)), sys.argv[1] + "/io.pt")
"""
LOAD = """
import sys, torch
model = torch.load(sys.argv[1] + "/model.pt", weights_only=False)
x, expected = torch.load(sys.argv[1] + "/io.pt")
assert torch.equal(model(x), expected), (model(x) - expected).abs().max()
gla = model.gla
print(gla.form, gla.backend, gla.chunk_size, gla.chunk_size_given, gla.tuning, model.decayed.form)
"""


def _run(script: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join((str(REPO), args[0])))  # args[0]: the user's folder
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_saved_model_of_compiled_layers_loads_in_a_fresh_process_with_equal_outputs(tmp_path):
    (tmp_path / "user_model.py").write_text(USER_MODEL)
    _run(SAVE, str(tmp_path), str(SPECS_DIR / "gla.rec"), DECAYED_SUM)
    # The loading process never sees the spec file: the pickle holds its text.
    assert _run(LOAD, str(tmp_path)).split() == ["chunked", "torch", "16", "True", "True", "auto"]


def test_a_pickled_compiled_layer_loads_as_the_same_compiled_layer_in_its_own_process():
    layer = recurrence_dsl.compile(recurrence_dsl.load_text(DECAYED_SUM)["decayed_sum"], form="recurrent",
                                   tuning=False)
    assert pickle.loads(pickle.dumps(layer)) is layer  # compile()'s cache: the same arguments, the same layer
    twin = copy.deepcopy(layer)  # a copy stays a copy, not a rebuild from source
    assert twin is not layer and (twin.form, twin.tuning) == ("recurrent", False)


def test_a_layer_of_a_generated_module_imported_by_name_pickles_by_that_module(tmp_path, monkeypatch):
    assert main(["compile", str(SPECS_DIR / "gla.rec"), "-o", str(tmp_path / "gen_gla_pickled.py")]) == 0
    monkeypatch.syspath_prepend(str(tmp_path))
    import gen_gla_pickled

    layer = gen_gla_pickled.gla.options(form="chunked", chunk_size=32)
    loaded = pickle.loads(pickle.dumps(layer))
    assert type(loaded) is type(layer) and loaded is not layer
    assert (loaded.form, loaded.chunk_size, loaded.chunk_size_given) == ("chunked", 32, True)
    assert pickle.loads(pickle.dumps(gen_gla_pickled.gla)).chunk_size_given is False


def test_a_layer_neither_compiled_nor_importable_is_a_clear_pickling_error():
    layer = load_layer(analyse(recurrence_dsl.load_text(DECAYED_SUM)["decayed_sum"].checked))
    layer = type(layer)(layer.recurrence, layer.forms, layer.triton_forms)  # as load_layer's, without compile()
    with pytest.raises(pickle.PicklingError, match="cannot pickle the decayed_sum layer: its module .* was not "
                                                   "imported by name"):
        pickle.dumps(layer)
