"""Training on generated layers: a two-layer GLA + DeltaNet model learns associative recall on CPU.

The task (benchmarks/recall_study.py): 8 (key, value) pairs written as interleaved tokens k1 v1 ... k8 v8, then 8
keys from them; the target at each query is its key's value (16 keys, 16 values: chance is 1/16). Retrieving the
value means matching the query against the token *before* each value: a previous-token mechanism. Without one,
two recurrent layers are stuck (benchmarks/results/recall_study.json, 600 steps of Adam: gla+delta_net 27% at T=24
and 19% at T=48; the same model on causal softmax attention, no positions, 95% and 77%); with a token shift (each
position also sees the previous token, as RWKV's token shift or the short convolutions of GLA, DeltaNet and Mamba)
both reach 100% at T=24 and T=48. So the plateau measured before (12% at T=48) was the model, not the layers: the
test trains the model with the token shift. At T=192 (64 pairs) only softmax with the token shift learns (100%;
gla+delta_net with it: 12%, dim 64, 2 heads); whether a larger state per head closes that gap is not measured yet
(a dim-128, one-head run did not finish on the shared machine; docs/development.md,
"Training: associative recall on CPU").
"""

from __future__ import annotations

import importlib.util
import sys
import time

import pytest
import torch

from .conftest import REPO


def _study():
    spec = importlib.util.spec_from_file_location("recall_study", REPO / "benchmarks" / "recall_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# Issue 9: the model learns "on CPU in under a minute". Wall time on a shared CI machine measures its load, so the
# bound is on the training loop's CPU time (`time.process_time`: this process, every thread) with torch on one thread
# (no pool threads spinning): 300 steps, eager and compiled (the compile included), took 19 s and 24 s of CPU time on
# the 2-core development machine at load 9, where their wall time was 52 s and 66 s.
MINUTE = 60.0


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train_timed(study, model, task) -> dict:
    start = time.process_time()
    result = study.train(model, task, steps=300)
    result = {**result, "cpu_seconds": time.process_time() - start}
    print(result)  # shown with -s: the loss, accuracy, wall and CPU seconds
    return result


def test_gla_and_delta_net_layers_learn_associative_recall(one_thread):
    study = _study()
    task = study.Task(pairs=8, queries=8)
    torch.manual_seed(0)
    model = study.build("recurrent", task, dim=64, heads=2, token_shift=True, backend="torch")
    result = _train_timed(study, model, task)
    # Chance is 1/16 (loss log(16) = 2.77 on the query positions); the model ends near exact recall.
    assert result["first_loss"] > 3.0
    assert result["last_loss"] < 0.2, result
    assert result["accuracy"] >= 0.95, result
    assert result["cpu_seconds"] < MINUTE, result


def test_the_same_model_learns_under_torch_compile_fullgraph(one_thread):
    """The model compiled whole (`fullgraph=True`: each generated layer is one custom op, tests/test_compile.py)
    trains as the eager one does."""
    study = _study()
    task = study.Task(pairs=8, queries=8)
    torch.manual_seed(0)
    model = study.build("recurrent", task, dim=64, heads=2, token_shift=True, backend="torch")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    result = _train_timed(study, compiled, task)  # the compile itself (Dynamo, AOTAutograd) is inside the minute
    assert result["last_loss"] < 0.2, result
    assert result["accuracy"] >= 0.95, result
    assert result["cpu_seconds"] < MINUTE, result
