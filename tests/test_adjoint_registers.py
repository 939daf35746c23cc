"""How the Triton recurrent adjoint keeps its registers (issue 10), checked on the printed source and the sympy
rewrites, without compiling: outer-product param gradients stored as per-step factors (`outer_factors`), the sums
over a [D0, D1] param read at each use merged into one (`merge_sums`), and the launch's register limit.
tests/test_no_spills.py compiles the kernels; tests/test_triton_adjoint.py checks their gradients."""

from __future__ import annotations

import re

import sympy

import recurrence_dsl
from codegen.triton_recurrent import merge_sums, outer_factors, triton_adjoint_source
from recurrence_dsl.analysis import analyse

from .conftest import REPO

d, e, v, w = sympy.symbols("d e v w", integer=True)
D = sympy.Symbol("D", integer=True, positive=True)
U, W, h, a, b = (sympy.IndexedBase(n) for n in ("U", "W", "h", "a", "b"))


def _source(name: str) -> str:
    rec = recurrence_dsl.load(REPO / "specs" / f"{name}.rec")[name]
    return triton_adjoint_source(analyse(rec.checked))


def test_outer_factors_groups_terms_by_their_column_factor():
    # minimal_rnn's dUh: a[d] h[e] - b[d] h[e] is one outer product, (a - b) x h
    pairs = outer_factors(a[d] * h[e] - b[d] * h[e], d, e)
    assert pairs is not None and len(pairs) == 1
    left, right = pairs[0]
    assert sympy.simplify(left - (a[d] - b[d])) == 0 and right == h[e]
    # two column factors: two pairs, whose outer products sum back to the expression
    expr = 2 * a[d] * h[e] + b[d] * a[e]
    pairs = outer_factors(expr, d, e)
    assert pairs is not None and len(pairs) == 2
    assert sympy.expand(sum(lhs * rhs for lhs, rhs in pairs) - expr) == 0


def test_outer_factors_refuses_a_factor_of_both_indices():
    S = sympy.IndexedBase("S")
    assert outer_factors(a[d] * S[d, e], d, e) is None  # mamba's dA reads the state S[d, n]
    assert outer_factors(a[d] * h[e] + b[d] * a[e] + h[d] * b[e], d, e, most=2) is None


def test_merge_sums_merges_the_passes_over_one_param_tile():
    expr = a[e] + sympy.Sum(U[v, e] * a[v], (v, 0, D - 1)) - sympy.Sum(U[w, e] * b[w], (w, 0, D - 1))
    merged = merge_sums(expr, {"U"})
    sums = list(merged.atoms(sympy.Sum))
    assert len(sums) == 1  # one pass over U
    (var, _, _), = sums[0].limits
    assert sympy.expand(sums[0].function - U[var, e] * (a[var] - b[var])) == 0
    assert sympy.expand(merged - a[e] - sums[0]) == 0
    # another tile, or a tile not in the set, stays as it was
    other = sympy.Sum(U[v, e] * a[v], (v, 0, D - 1)) + sympy.Sum(W[w, e] * b[w], (w, 0, D - 1))
    assert merge_sums(other, {"U", "W"}) == other
    assert merge_sums(expr, set()) == expr


def test_minimal_rnn_adjoint_keeps_no_param_tile_through_its_loops():
    source = _source("minimal_rnn")
    kernel = source.split("def minimal_rnn__triton_recurrent_adjoint(")[0]
    assert "b_dUh = tl.zeros" not in kernel and "b_dUz = tl.zeros" not in kernel  # no [D, D] gradient tiles
    assert "b_Uh = tl.load" not in kernel and "b_Uz = tl.load" not in kernel  # read at each use instead
    assert "tl.store(dUh_row" in kernel and "tl.store(dUz_col" in kernel
    assert kernel.count("tl.load(Uh + ") == 3  # forward recompute, adjoint's gate, dh's one merged pass
    assert 'torch.einsum("bthjr,bthjc->hrc", dUh_row, dUh_col)' in source
    assert "b_dbu = tl.zeros" in kernel  # a [D] param's gradient stays in registers


def test_every_adjoint_launch_asks_for_the_register_file():
    # the kernel is declared register-limited once and every launch of it goes through `_launch`, which applies it
    for name in ("retention", "minimal_rnn", "rwkv7"):
        source = _source(name)
        kernel = f"{name}__triton_recurrent_adjoint_kernel"
        assert f"@_register_limited()\n@triton.jit\ndef {kernel}(" in source
        assert re.search(rf"_launch\(\s*{kernel}, \(", source) and f"{kernel}[" not in source


def test_the_register_limit_is_the_register_file_over_the_threads_on_cuda_only(monkeypatch):
    from types import SimpleNamespace

    from codegen.cache import load_source
    from codegen.triton_recurrent import prelude

    module = load_source(prelude("limits"), "limits_triton_recurrent_prelude")
    assert module._register_limit(8) == {}  # the interpreter (conftest): no CUDA target to ask

    def driver(backend):  # a stand-in for `triton` whose active driver reports a target of `backend`
        target = SimpleNamespace(backend=backend, arch=90)
        active = SimpleNamespace(get_current_target=lambda: target)
        return SimpleNamespace(runtime=SimpleNamespace(driver=SimpleNamespace(active=active)))

    monkeypatch.setattr(module, "triton", driver("cuda"))
    assert [module._register_limit(w)["maxnreg"] for w in (4, 8, 16, 32)] == [255, 255, 128, 64]
    monkeypatch.setattr(module, "triton", driver("hip"))
    assert module._register_limit(8) == {}


def test_the_adjoints_warps_read_the_runtimes_arch_below_sm_90_only(monkeypatch):
    # A standalone recurrent module carries the Triton runtime's `_arch` (one helper, no copy kept in step).
    import ast
    from types import SimpleNamespace

    from codegen.cache import load_source
    from codegen.triton_recurrent import ADJOINT_ELEMENTS_AT_4_WARPS, prelude

    source = prelude("arch")
    defined = [n.name for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)]
    assert defined.count("_arch") == 1 and "_cuda_arch" not in defined
    assert "def _arch" not in prelude("arch", standalone=False)  # a generated module reads the runtime's
    module = load_source(source, "arch_triton_recurrent_prelude")
    elements = (ADJOINT_ELEMENTS_AT_4_WARPS + 1) * 32 * 4
    assert module._adjoint_warps(elements) == 4  # the interpreter: 90, no target to ask

    def driver(arch):
        target = SimpleNamespace(backend="cuda", arch=arch)
        active = SimpleNamespace(get_current_target=lambda: target)
        return SimpleNamespace(runtime=SimpleNamespace(driver=SimpleNamespace(active=active)))

    monkeypatch.setattr(module, "triton", driver(80))
    assert module._adjoint_warps(elements) == 8
    assert module._adjoint_warps(elements - 32 * 4) == 4  # at the bound: 4
    monkeypatch.setattr(module, "triton", driver(90))
    assert module._adjoint_warps(elements) == 4
