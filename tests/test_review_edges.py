"""Edges of the Triton scan form, the interpreter's vectorised scan and the compiler-figures cache (a review of
codegen/triton_scan.py, codegen/interpreter.py and autotune/figures.py).

Each test here failed before its fix:
- an empty scan (B = 0 or T = 0) returned b itself, cut off from a and the initial state: their gradients were
  None where the torch runtime (and the reference) give zeros, and the output was the caller's own tensor;
- shapes that do not fit raised torch's RuntimeError from expand, or an unpacking error for a 1-D b, instead of a
  ValueError naming the argument;
- the scan kernels' grid put the batch on the second axis, which CUDA caps at 65535 programs, while `_run_packed`
  makes one batch row of every packed sequence of a length;
- a cache file that parses but does not hold figures crashed `CompilerFigures.get`; a compile that failed was
  written to disk, so a passing fault pruned the config from every later tune; Triton's compile-changing
  environment variables and the compile-only driver were not in the key; a print to stdout in the compile worker
  (Python's or a child process's) broke its answers, and a worker that died was reported without its stderr;
- TRITON_INTERPRET=false (or off, no) counted as on: CPU tensors went to Triton kernels that cannot run there;
- the scan in blocks (`_BlockBackward`) gave an input no loss term depends on a zero gradient, where one block
  gives None (and differentiated every block's unused outputs against zeros to get it);
- num_warps=3 reached the scan kernels (the interpreter ignores it; a GPU compile refuses it).
The interpreter's scan is also checked against the interpreter's own on the shapes the kernels do not use
(1-D, the second axis, a scalar-returning combine, float16). About 30 s on an idle core.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import recurrence_dsl
from codegen.layer import interpreting
from recurrence_dsl.sampling import sample_arguments

from .conftest import REPO, SPECS_DIR

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
triton_scan = pytest.importorskip("codegen.triton_scan")
torch_runtime = pytest.importorskip("codegen.torch_runtime")

F64 = torch.float64


def _grads(fn, *xs):
    leaves = [x.clone().requires_grad_() for x in xs]
    s = fn(*leaves)
    s.sum().backward()
    return s, [x.grad for x in leaves]


@pytest.mark.parametrize("B,T", [(0, 5), (2, 0)])
@pytest.mark.parametrize("block", [False, True], ids=["diagonal", "block"])
def test_an_empty_scan_gives_every_argument_its_zero_gradient(B, T, block):
    a = torch.rand((1, 1, 3) + ((2, 2) if block else ()), dtype=F64)  # broadcast: a non-empty gradient
    b = torch.randn((B, T, 3) + ((2,) if block else ()), dtype=F64)
    h0 = torch.randn((B, 3) + ((2,) if block else ()), dtype=F64)
    mine = triton_scan.scan_block if block else triton_scan.scan_diagonal
    ref_scan = torch_runtime.scan_block if block else torch_runtime.scan_diagonal

    def ref(a_, b_, h_):  # (the torch runtime's scan_block takes a at its full shape only)
        return ref_scan(a_.expand(tuple(b_.shape) + a_.shape[b_.dim():]), b_, h_)

    s, grads = _grads(mine, a, b, h0)
    s_ref, ref_grads = _grads(ref, a, b, h0)
    assert s.shape == s_ref.shape == b.shape and s.dtype == F64
    for g, r, x in zip(grads, ref_grads, (a, b, h0)):  # (the torch runtime leaves h0 out at T = 0: None)
        assert g is not None and g.shape == x.shape and not g.any() and (r is None or torch.equal(g, r))
    assert mine(a, b, h0) is not b  # (float64 stays float64: b.to(dtype) is b itself)


def test_an_empty_batch_on_the_triton_scan_form_matches_the_torch_backend():
    rec = recurrence_dsl.load(SPECS_DIR / "mamba.rec")["mamba"]
    args, init = sample_arguments(rec.checked, {"D": 3, "N": 2}, 0, 6, 2, dtype=torch.float32, seed=1,
                                  with_initial_state=True)
    results = {}
    for backend in ("torch", "triton"):
        leaves = [a.clone().requires_grad_() for a in args] + [init.clone().requires_grad_()]
        layer = recurrence_dsl.compile(rec, backend=backend, form="scan", tuning=False)
        out, final = layer(*leaves[:-1], initial_state=leaves[-1], output_final_state=True)
        (out.sum() + final.sum()).backward()
        results[backend] = [out, final] + [x.grad for x in leaves]
    for g, r in zip(results["triton"], results["torch"]):
        assert g is not None and r is not None and g.shape == r.shape and torch.equal(g, r)


def test_scan_shapes_that_do_not_fit_name_the_argument():
    b = torch.randn(1, 5, 4)
    with pytest.raises(ValueError, match=r"a \[1, 5, 3\] does not broadcast to \[1, 5, 4\]"):
        triton_scan.scan_diagonal(torch.rand(1, 5, 3), b)
    with pytest.raises(ValueError, match=r"a \[2, 5, 4\] does not broadcast"):
        triton_scan.scan_diagonal(torch.rand(2, 5, 4), b)  # a larger than b
    with pytest.raises(ValueError, match=r"b must be \[B, T, \.\.\.\], got shape \[5\]"):
        triton_scan.scan_diagonal(torch.rand(5), torch.rand(5))
    with pytest.raises(ValueError, match=r"a \[1, 5, 3, 2, 2\] does not broadcast to \[1, 5, 4, 2, 2\]"):
        triton_scan.scan_block(torch.rand(1, 5, 3, 2, 2), torch.rand(1, 5, 4, 2))
    with pytest.raises(ValueError, match="num_warps must be a power of two, got 3"):  # the interpreter ignores it
        triton_scan.scan_diagonal(torch.rand(1, 5, 4), b, num_warps=3)


class _Recorded:
    """A kernel whose launch grids are recorded."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("block", [False, True], ids=["diagonal", "block"])
def test_scan_grids_have_one_axis_for_any_batch(block):
    """CUDA caps a grid's second and third axes at 65535: the batch (every packed sequence of one length, under
    `_run_packed`) must not sit there. B = 3 rows of three element blocks each, forward and backward."""
    gen = torch.Generator().manual_seed(2)
    m = 2 if block else 1
    a = torch.rand((3, 9, 5) + ((2, 2) if block else ()), generator=gen, dtype=F64)
    b = torch.randn((3, 9, 5) + ((2,) if block else ()), generator=gen, dtype=F64)
    h0 = torch.randn((3, 5) + ((2,) if block else ()), generator=gen, dtype=F64)
    pair = (triton_scan._block_kernels(2) if block else (triton_scan._scan_fwd_kernel, triton_scan._scan_bwd_kernel))
    kernels = tuple(_Recorded(k) for k in pair)
    leaves = [x.clone().requires_grad_() for x in (a, b, h0)]
    N = 5
    s = triton_scan._ScanFunction.apply(leaves[0], leaves[1], leaves[2], None, kernels, (4, 2, 1))
    w = torch.randn(s.shape, generator=gen, dtype=F64)
    (s * w).sum().backward()
    assert kernels[0].grids == kernels[1].grids == [(3 * triton.cdiv(N, 2),)]
    ref = [x.clone().requires_grad_() for x in (a, b, h0)]
    s_ref = (torch_runtime.scan_block if m == 2 else torch_runtime.scan_diagonal)(*ref)
    (s_ref * w).sum().backward()
    assert torch.allclose(s, s_ref, rtol=1e-12, atol=1e-12)
    for x, y in zip(leaves, ref):
        assert torch.allclose(x.grad, y.grad, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# codegen/interpreter.py against the interpreter's own scan
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _affine(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _lopsided(x, y):
    return tl.maximum(x, y) + 0.5 * x  # not commutative: a swapped argument order shows


@triton.jit
def _one(x, y):
    return 1.0  # a scalar, not a tensor


@triton.jit
def _scan_1d(a, b, oa, ob, N: tl.constexpr, REV: tl.constexpr):
    o = tl.arange(0, N)
    x, y = tl.associative_scan((tl.load(a + o), tl.load(b + o)), 0, _affine, reverse=REV)
    tl.store(oa + o, x)
    tl.store(ob + o, y)


@triton.jit
def _scan_2d(x, out, M: tl.constexpr, N: tl.constexpr, AXIS: tl.constexpr, REV: tl.constexpr, ONE: tl.constexpr):
    o = tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :]
    if ONE:
        r = tl.associative_scan(tl.load(x + o), AXIS, _one, reverse=REV)
    else:
        r = tl.associative_scan(tl.load(x + o), AXIS, _lopsided, reverse=REV)
    tl.store(out + o, r)


@pytest.mark.skipif(not interpreting(), reason="the patch applies to Triton's interpreter only")
def test_the_vectorised_scan_matches_the_interpreters_on_other_shapes(monkeypatch):
    from triton.runtime.interpreter import ScanOps

    from codegen import interpreter

    assert interpreter.vectorise_interpreter_scans() and ScanOps.generic_scan is not interpreter.ORIGINAL_GENERIC_SCAN
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(8, generator=gen), torch.randn(8, generator=gen)
    x = torch.randn(4, 8, generator=gen)

    def run():
        out = []
        for rev in (False, True):
            oa, ob = torch.empty(8), torch.empty(8)
            _scan_1d[(1,)](a, b, oa, ob, 8, rev)
            out += [oa, ob]
            for axis in (0, 1):
                for dtype in (torch.float32, torch.float16):
                    o = torch.empty(4, 8, dtype=dtype)
                    _scan_2d[(1,)](x.to(dtype), o, 4, 8, axis, rev, False)
                    out.append(o)
        o = torch.empty(4, 8)
        _scan_2d[(1,)](x, o, 4, 8, 1, False, True)
        return out + [o]

    fast = run()
    monkeypatch.setattr(ScanOps, "generic_scan", interpreter.ORIGINAL_GENERIC_SCAN)
    slow = run()
    assert len(fast) == 13
    for f, s in zip(fast, slow):
        assert f.dtype == s.dtype and torch.equal(f, s)


# ---------------------------------------------------------------------------------------------------------------
# autotune/figures.py's disk cache (no compile: `_compile` is replaced)
# ---------------------------------------------------------------------------------------------------------------

CONFIG = {"chunk_size": 16, "block_k": 16, "block_v": 16, "num_warps": 1, "num_stages": 1}
KERNEL = {"name": "k", "phase": "forward", "registers": 40, "spill_bytes": 0, "shared_bytes": 0, "num_warps": 1,
          "num_stages": 1}


def _figures(tmp_path, monkeypatch, answer):
    from autotune import figures
    from codegen import kernel_report
    from recurrence_dsl.analysis import analyse

    monkeypatch.setattr(kernel_report, "tool_versions", lambda target: {"ptxas": "test", "cuobjdump": "test"})
    rec = recurrence_dsl.load(SPECS_DIR / "linear_attention.rec")["linear_attention"]
    f = figures.CompilerFigures(analyse(rec.checked), {"K": 16, "V": 16}, 1, 16, 1, torch.float32, "chunked",
                                "sm_90", cache_dir=tmp_path)
    calls = []

    def compile_(config):
        calls.append(config)
        return answer

    monkeypatch.setattr(f, "_compile", compile_)
    return f, calls


def test_a_cache_file_that_holds_no_figures_is_a_miss(tmp_path, monkeypatch):
    f, calls = _figures(tmp_path, monkeypatch, ([KERNEL], None))
    key = f.key(CONFIG)
    path = f._path(key)
    bad = [[1, 2], {"key": key, "kernels": [{"name": "k"}]}, {"key": key, "kernels": "x"},
           {"key": key, "kernels": [{**KERNEL, "registers": "many"}]}, {"key": key, "kernels": [7]}]
    for n, data in enumerate(bad):
        path.write_text(json.dumps(data))
        f._memo.clear()
        got = f.get(CONFIG)  # compiled again, and the file rewritten with good figures
        assert len(calls) == n + 1 and not got.cached and got.registers == 40
        assert json.loads(path.read_text())["kernels"] == [KERNEL]
    f._memo.clear()
    assert f.get(CONFIG).cached and len(calls) == len(bad)


def test_a_failed_compile_is_not_written(tmp_path, monkeypatch):
    f, calls = _figures(tmp_path, monkeypatch, ([], "ptxas was killed"))
    assert f.get(CONFIG).problems() == ["does not compile for sm_90: ptxas was killed"]
    assert f.get(CONFIG).error and len(calls) == 1  # remembered for this tune
    assert not list(tmp_path.glob("*.json"))


def test_the_key_holds_tritons_compile_environment_and_the_driver(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_DEFAULT_FP_FUSION", raising=False)
    plain = _figures(tmp_path, monkeypatch, ([KERNEL], None))[0].key(CONFIG)
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "0")  # changes every cubin with a multiply-add
    fused = _figures(tmp_path, monkeypatch, ([KERNEL], None))[0].key(CONFIG)
    assert plain != fused and fused["triton_env"].get("TRITON_DEFAULT_FP_FUSION") in ("0", "false")
    assert plain["driver_sha256"] and (REPO / "codegen" / "kernel_report.py").is_file()


WORKER = r'''
import os, sys
import autotune.figures as figures

def noisy(request, analysis=None):
    print("a library's print")  # Python's stdout
    os.system("echo a tool print")  # descriptor 1, as a child process writes it
    return [dict(name="k", phase="forward", registers=1, spill_bytes=0, shared_bytes=0, num_warps=1,
                 num_stages=1)], None

figures._compile_request = noisy
sys.exit(figures._worker_main())
'''


def test_the_workers_answers_are_the_only_thing_on_its_stdout():
    import subprocess
    import sys

    text = (SPECS_DIR / "linear_attention.rec").read_text()
    request = json.dumps({"text": text, "filename": "linear_attention.rec", "name": "linear_attention"})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", WORKER], input=request + "\n" + request + "\n", capture_output=True,
                          text=True, timeout=120, cwd=REPO, env={**env, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and all(json.loads(x)["kernels"][0]["name"] == "k" for x in lines), done.stdout
    assert done.stderr.count("a library's print") == 2 and done.stderr.count("a tool print") == 2


@pytest.mark.skipif(not interpreting(), reason="the worker compiles only where Triton runs in its interpreter")
def test_a_dead_worker_is_reported_with_its_stderr(tmp_path, monkeypatch):
    from autotune import figures

    f, _ = _figures(tmp_path, monkeypatch, None)
    monkeypatch.undo()  # the real _compile, through a worker that dies at once
    start = figures._start_worker
    monkeypatch.setattr(figures, "_start_worker", lambda: start(("-c", "import sys; sys.exit('no ptxas here')")))
    with pytest.raises(RuntimeError, match="(?s)worker.*failed.*stderr ends:.*no ptxas here"):
        f._compile(CONFIG)
    assert f._worker is None


@pytest.mark.skipif(not interpreting(), reason="the worker compiles only where Triton runs in its interpreter")
def test_a_hung_worker_is_killed_after_the_timeout(tmp_path, monkeypatch):
    """A worker that never answers (a hung ptxas) must not hang the tune: after the timeout it is killed and the
    call raises, naming the variable that sets the limit."""
    import time

    from autotune import figures

    f, _ = _figures(tmp_path, monkeypatch, None)
    monkeypatch.undo()
    start = figures._start_worker
    monkeypatch.setattr(figures, "_start_worker", lambda: start(("-c", "import time; time.sleep(600)")))
    monkeypatch.setenv(figures.WORKER_TIMEOUT, "0.5")
    began = time.monotonic()
    with pytest.raises(RuntimeError, match="no answer within 0.5 s.*RECURRENCE_DSL_COMPILE_TIMEOUT.*killed"):
        f._compile(CONFIG)
    assert time.monotonic() - began < 60 and f._worker is None


@pytest.mark.parametrize("value", ["0", "-1", "soon", "inf"])
def test_the_compile_timeout_names_its_variable(value, monkeypatch):
    from autotune import figures

    monkeypatch.setenv(figures.WORKER_TIMEOUT, value)
    with pytest.raises(ValueError, match="RECURRENCE_DSL_COMPILE_TIMEOUT must be a positive number"):
        figures.worker_timeout()


@pytest.mark.parametrize("value", ["1", "true", "ON", "yes", "y", "0", "false", "off", "no", "2", ""])
def test_triton_interpret_is_read_as_triton_reads_it(value, monkeypatch):
    """A value Triton takes as off ("false", "off") must not send CPU tensors to Triton kernels that cannot run."""
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpreting() == triton.knobs.runtime.interpret


def test_blocks_give_an_unused_input_no_gradient_as_one_block_does(monkeypatch):
    """mlstm's final state does not depend on q: a loss on the final state alone gives q the gradient None through
    the whole sequence, and must through blocks of 4 steps too (zeros before); the other gradients agree."""
    from codegen.dispatch import SCAN_BLOCK

    rec = recurrence_dsl.load(SPECS_DIR / "mlstm.rec")["mlstm"]
    args, init = sample_arguments(rec.checked, {s: 3 for s in rec.checked.sizes}, 2, 9, 2, dtype=F64, seed=3,
                                  with_initial_state=True)
    layer = recurrence_dsl.compile(rec, backend="torch", tuning=False)
    grads = []
    for block in (4, 1000):
        monkeypatch.setenv(SCAN_BLOCK, str(block))
        leaves = [a.clone().requires_grad_() for a in args]
        _, final = layer(*leaves, initial_state=init, output_final_state=True, form="scan")
        grads.append(torch.autograd.grad(sum(f.sum() for f in final.values()), leaves, allow_unused=True))
    assert grads[1][0] is None and grads[0][0] is None
    for g, r in zip(grads[0][1:], grads[1][1:]):
        assert torch.allclose(g, r, rtol=1e-12, atol=1e-14)
