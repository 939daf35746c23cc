"""Shared helpers for the tests: where the specs and LANGUAGE.md live, small shapes.

Without a GPU every Triton kernel runs in Triton's interpreter, switched on here, before any test
module imports triton or the project's kernels, so the whole session sees one setting whatever
order the modules are collected in.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A developer's own tuning store must not change what the tests run.
os.environ.setdefault("RECURRENCE_DSL_TUNING", "0")

import recurrence_dsl
from recurrence_dsl.sampling import sample_arguments

from . import children, fast_interpreter

if os.environ.get("TRITON_INTERPRET") == "1":
    fast_interpreter.install()  # the per-launch search for builtins, done once (tests/fast_interpreter.py)

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SPECS_DIR = REPO / "specs"
SPEC_FILES = sorted(SPECS_DIR.glob("*.rec"))
# CI checks the shared design notes out beside the repository: <repo>/../shared/design/LANGUAGE.md.
LANGUAGE_MD = REPO.parent / "shared" / "design" / "LANGUAGE.md"
# A committed copy of LANGUAGE.md's ```rec blocks, used when the shared notes are absent.
LANGUAGE_EXAMPLES_FALLBACK = TESTS / "data" / "language_examples.rec"
EXAMPLE_SEPARATOR = "# ---- example {} ----"

_REC_BLOCK = re.compile(r"^```rec[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
_SEPARATOR = re.compile(r"^# ---- example \d+ ----[ \t]*\n", re.M)


def extract_rec_blocks(markdown: str) -> list[str]:
    """The contents of every ```rec fenced block, in order."""
    return [m.group(1) for m in _REC_BLOCK.finditer(markdown)]


def split_fallback(text: str) -> list[str]:
    """The blocks of the committed copy (the header before the first separator is not one)."""
    return _SEPARATOR.split(text)[1:]


def language_examples() -> tuple[list[str], str]:
    """LANGUAGE.md's ```rec blocks and where they came from (the shared file, or the committed copy)."""
    if LANGUAGE_MD.is_file():
        return extract_rec_blocks(LANGUAGE_MD.read_text()), str(LANGUAGE_MD)
    return split_fallback(LANGUAGE_EXAMPLES_FALLBACK.read_text()), str(LANGUAGE_EXAMPLES_FALLBACK)


def small_sizes(rec: recurrence_dsl.Recurrence) -> dict[str, int]:
    """Distinct small sizes, so a transposed axis shows up as a shape error rather than passing silently."""
    choices = [4, 3, 5, 2, 6, 7, 8]
    return {name: choices[i % len(choices)] for i, name in enumerate(rec.checked.sizes)}


def run_small(rec: recurrence_dsl.Recurrence, batch: int = 2, length: int = 5, heads: int = 2, seed: int = 0,
              with_initial_state: bool = True):
    """Run the reference on sampled arguments of small shapes: (args, initial, output, final)."""
    sizes = small_sizes(rec)
    args, initial = sample_arguments(rec.checked, sizes, batch, length, heads, dtype=torch.float64, seed=seed,
                                     with_initial_state=with_initial_state)
    out, final = rec.reference(*args, initial_state=initial, output_final_state=True)
    return args, initial, out, final


@pytest.fixture(scope="session")
def specs() -> dict[str, recurrence_dsl.Recurrence]:
    """Every recurrence of specs/, by name."""
    recs: dict[str, recurrence_dsl.Recurrence] = {}
    for path in SPEC_FILES:
        recs.update(recurrence_dsl.load(path))
    return recs


def made_by(t: torch.Tensor):
    """The autograd node that made a layer's result `t`, past the layer's copy of a view it returns
    (codegen/dispatch.py `_owned`: a CloneBackward0 right above the form's node)."""
    node = t.grad_fn
    return node.next_functions[0][0] if node is not None and node.name() == "CloneBackward0" else node


def as_dict(value, decls) -> dict:
    """An output or state as returned by a layer (tensor, tuple or dict) -> {name: tensor}."""
    if isinstance(value, dict):
        return value
    if isinstance(value, (tuple, list)):
        return dict(zip((d.name for d in decls), value, strict=True))
    return {decls[0].name: value}


def weighted_gradients(fn, rec, args, initial, weights=None, seed: int = 1, **kwargs):
    """(gradients of every argument and initial state, weights) for the loss sum(w * outputs) + sum(w * final
    states) of `fn(*args, initial_state=..., output_final_state=True, **kwargs)`; weights float64 normal, drawn
    from `seed` when not given (pass the reference's to compare another path's gradients with it)."""
    checked = rec.checked
    leaves = [a.detach().clone().requires_grad_() for a in args]
    init = {k: v.detach().clone().requires_grad_() for k, v in as_dict(initial, checked.states).items()}
    out, final = fn(*leaves, initial_state=init if len(init) > 1 else next(iter(init.values())),
                    output_final_state=True, **kwargs)
    out, final = as_dict(out, checked.outputs), as_dict(final, checked.states)
    if weights is None:
        gen = torch.Generator().manual_seed(seed)
        # drawn on the CPU (the same values on every machine), then moved to the outputs' device
        weights = [{k: torch.randn(v.shape, generator=gen, dtype=torch.float64).to(v.device) for k, v in d.items()}
                   for d in (out, final)]
    loss = sum((out[k].double() * w).sum() for k, w in weights[0].items())
    (loss + sum((final[k].double() * w).sum() for k, w in weights[1].items())).backward()
    return [x.grad for x in leaves] + [init[s.name].grad for s in checked.states], weights


# The torch runtime functions a generated module may call (codegen/torch_runtime.py): a Triton form must call none.
TORCH_RUNTIME = ("chunked_linear_by", "chunked_delta_by", "chunked_dplr_by", "scan_diagonal")


def no_torch_forms(layer, monkeypatch, function: str) -> list:
    """Make every torch runtime function (TORCH_RUNTIME) in the layer's generated module raise, and count the runs
    of the backward of its Triton autograd class `function` (e.g. "_triton_ChunkedLinearFunction"): the returned
    list gets one entry per backward run."""
    scope = layer.triton_forms["chunked"].__globals__

    def refuse(*args, **kwargs):
        raise AssertionError("a torch form ran on the Triton path")

    for name in TORCH_RUNTIME:
        if name in scope:
            monkeypatch.setitem(scope, name, refuse)
    fn_cls = scope[function]
    backward, runs = fn_cls.backward, []

    def counted(ctx, *grads):
        runs.append(len(grads))
        return backward(ctx, *grads)

    monkeypatch.setattr(fn_cls, "backward", staticmethod(counted))
    return runs


def pytest_collection_modifyitems(config, items):
    """Without CUDA, GPU tests are deselected (not skipped) unless a `-m` expression selects them on purpose:
    then they run and fail, so a GPU run can never pass without a GPU. Tests marked `extended` (CPU checks past
    CI's time budget, each a repeat of a CI test on more specs) are deselected unless RECDSL_EXTENDED=1 or a `-m`
    expression is given."""
    if config.getoption("markexpr"):
        return
    if os.environ.get("RECDSL_EXTENDED") != "1":
        extended = [item for item in items if item.get_closest_marker("extended")]
        if extended:
            config.hook.pytest_deselected(items=extended)
            items[:] = [item for item in items if not item.get_closest_marker("extended")]
    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


def pytest_configure(config):
    config.addinivalue_line("markers", f"{children.MARKER}(name): reads the result of tests/children.py's child `name`")


def pytest_collection_finish(session):
    """Start the child processes the selected tests wait on (tests/children.py), in the background."""
    if not session.config.option.collectonly:
        children.start(session.items)


def pytest_sessionfinish(session, exitstatus):
    children.stop()
