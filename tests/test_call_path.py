"""One call path: `recurrence_dsl.compile()` runs the module `recdsl compile` writes, imported from a per-user cache.

The three disagreements the old two paths had (the backend `auto` picked under TRITON_INTERPRET=1, a
chunk_size the Mamba module refused, a per-call `backend=`) are checked on both a compiled layer and a module
written by the CLI and imported from its file; the cache directory's permissions and the refusal of stale,
foreign or planted files are checked too.
"""

from __future__ import annotations

import importlib.util
import os
import stat
import sys

import pytest
import torch

import recurrence_dsl
import recurrence_dsl.compiler as compiler
from codegen import cache, load
from codegen.layer import interpreting
from recurrence_dsl.cli import main
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPECS_DIR

GLA = SPECS_DIR / "gla.rec"
MAMBA = SPECS_DIR / "mamba.rec"


def _written_module(tmp_path, spec, name):
    """`recdsl compile spec -o tmp/gen_NAME.py`, imported from that file."""
    out = tmp_path / f"gen_{name}.py"
    assert main(["compile", str(spec), "-o", str(out)]) == 0
    module_spec = importlib.util.spec_from_file_location(f"gen_{name}_{abs(hash(str(tmp_path)))}", out)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    return module, out


def _args(rec, T=20, seed=0):
    sizes = {s: 16 for s in rec.checked.sizes}
    args, init = sample_arguments(rec.checked, sizes, 1, T, 2, seed=seed, with_initial_state=True)
    return [a.float() for a in args], init


def test_compiled_layer_is_the_module_layer_and_the_module_is_what_the_cli_writes(tmp_path):
    rec = recurrence_dsl.load(GLA)["gla"]
    layer = recurrence_dsl.compile(rec)
    module = sys.modules[type(layer).__module__]
    assert layer is module.gla  # the default options (the rule's tuning store included): the module's own object
    assert recurrence_dsl.compile(rec, tuning=False).tuning is False and module.gla.tuning is True
    assert module.__file__.startswith(str(cache.cache_directory()))
    _, out = _written_module(tmp_path, GLA, "gla")
    assert layer.source == out.read_text()  # byte for byte what `recdsl compile` writes
    other = recurrence_dsl.compile(rec, backend="torch", chunk_size=32, tuning=False)
    assert type(other) is type(layer) and other.forms is layer.forms  # same class, same forms: other defaults
    assert (other.backend, other.chunk_size) == ("torch", 32)


def test_auto_picks_the_same_backend_in_compile_and_in_the_module(tmp_path):
    assert interpreting(), "conftest sets TRITON_INTERPRET=1 without a GPU"
    module, _ = _written_module(tmp_path, GLA, "gla_auto")
    layer = recurrence_dsl.compile(recurrence_dsl.load(GLA)["gla"], tuning=False)
    for dtype, expected in ((torch.float32, "triton"), (torch.float64, "torch")):
        assert layer.backend_for(torch.device("cpu"), dtype) == expected
        assert module.gla.backend_for(torch.device("cpu"), dtype) == expected


def test_mamba_runs_backend_triton_with_any_chunk_size_on_both_paths(tmp_path):
    rec = recurrence_dsl.load(MAMBA)["mamba"]
    module, _ = _written_module(tmp_path, MAMBA, "mamba")
    args, init = _args(rec)
    ref, ref_final = rec.reference(*[a.double() for a in args], initial_state=init, output_final_state=True)
    layer = recurrence_dsl.compile(rec, backend="triton", chunk_size=8, tuning=False)
    for fn in (layer, lambda *a, **k: module.mamba(*a, backend="triton", chunk_size=8, **k)):
        out, final = fn(*args, initial_state=init.float(), output_final_state=True)
        assert ((out.double() - ref).norm() / ref.norm()).item() <= 1e-5
        assert ((final.double() - ref_final).norm() / ref_final.norm()).item() <= 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_per_call_backend_is_taken_by_both_paths(tmp_path, backend):
    rec = recurrence_dsl.load(GLA)["gla"]
    module, _ = _written_module(tmp_path, GLA, f"gla_{backend}")
    layer = recurrence_dsl.compile(rec, tuning=False)
    args, init = _args(rec, T=40)
    ref = rec.reference(*[a.double() for a in args], initial_state=init)[0]
    for fn in (layer, module.gla):
        out, _ = fn(*args, initial_state=init.float(), backend=backend, chunk_size=16)
        assert ((out.double() - ref).norm() / ref.norm()).item() <= 1e-5
        with pytest.raises(recurrence_dsl.CallError, match="unknown backend"):
            fn(*args, backend="cuda-graphs")
    with pytest.raises(recurrence_dsl.CallError, match="power of two"):
        layer(*args, backend="triton", chunk_size=24)
    with pytest.raises(recurrence_dsl.CallError, match="power of two"):
        module.gla(*args, backend="triton", chunk_size=24)


def test_the_parallel_form_takes_any_chunk_size_on_triton(tmp_path):
    """The parallel form ignores chunk_size (its kernels walk blocks of block_t rows), so Triton's power-of-two rule,
    a block dimension of the chunked kernels, must not refuse it; where the chunked form runs it still does."""
    rec = recurrence_dsl.load(GLA)["gla"]
    module, _ = _written_module(tmp_path, GLA, "gla_parallel_chunk")
    layer = recurrence_dsl.compile(rec, tuning=False)
    args, init = _args(rec, T=20)
    ref, ref_final = rec.reference(*[a.double() for a in args], initial_state=init, output_final_state=True)
    runs = (layer, module.gla, recurrence_dsl.compile(rec, backend="triton", form="parallel", chunk_size=24,
                                                      tuning=False))
    for fn in runs:
        for form in ("parallel", "auto"):  # auto picks parallel: 16 < T = 20 <= 24
            out, final = fn(*args, initial_state=init.float(), output_final_state=True, backend="triton",
                            form=form, chunk_size=24)
            assert ((out.double() - ref).norm() / ref.norm()).item() <= 1e-5
            assert ((final.double() - ref_final).norm() / ref_final.norm()).item() <= 1e-5
    chosen = layer.config_for(*args, backend="triton", chunk_size=24)
    assert (chosen["form"], chosen["chunk_size"]) == ("parallel", 24)
    refused = "chunk_size must be a power of two >= 16 on the triton backend, got 24"
    for fn in (layer, module.gla):
        with pytest.raises(recurrence_dsl.CallError, match=refused):
            fn(*args, backend="triton", form="chunked", chunk_size=24)
        long_args, _ = _args(rec, T=40)
        with pytest.raises(recurrence_dsl.CallError, match=refused):  # auto picks chunked: T = 40 > 24
            fn(*long_args, backend="triton", chunk_size=24)
        with pytest.raises(recurrence_dsl.CallError, match=refused):  # packed sequences may each pick chunked
            fn(*args, backend="triton", chunk_size=24, cu_seqlens=torch.tensor([0, 5, 20]))
    with pytest.raises(recurrence_dsl.CallError, match=r"chunk_size must be an integer >= 1, got 0"):
        layer(*args, backend="triton", form="parallel", chunk_size=0)


def test_both_paths_raise_the_same_errors(tmp_path):
    rec = recurrence_dsl.load(GLA)["gla"]
    module, _ = _written_module(tmp_path, GLA, "gla_errors")
    layer = recurrence_dsl.compile(rec, tuning=False)
    args, _ = _args(rec)
    bad = [((args[0][..., :3],) + tuple(args[1:]), {}), (tuple(args), {"form": "bogus"}),
           (tuple(args), {"chunk_size": 0}), (tuple(args), {"config": {"chunk_size": 16, "block_q": 1}})]
    for call_args, kwargs in bad:
        messages = []
        for fn in (layer, module.gla):
            with pytest.raises(recurrence_dsl.CallError) as err:
                fn(*call_args, **kwargs)
            messages.append(str(err.value))
        assert messages[0] == messages[1]


# -- the cache -----------------------------------------------------------------------------------------


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RECURRENCE_DSL_CACHE", str(tmp_path / "cache"))
    # A fresh process as far as generated modules go (monkeypatch restores what was there).
    for name in [n for n in sys.modules if n.startswith("recdsl_")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(load, "_MODULES", {})
    monkeypatch.setattr(compiler, "_LAYERS", {})
    return tmp_path / "cache" / "modules"


def test_cache_directory_is_private_and_modules_come_from_their_source(fresh_cache):
    rec = recurrence_dsl.load(GLA)["gla"]
    layer = recurrence_dsl.compile(rec, tuning=False)
    path = sys.modules[type(layer).__module__].__file__
    assert os.path.dirname(path) == str(fresh_cache)
    assert stat.S_IMODE(fresh_cache.stat().st_mode) == 0o700
    assert not (fresh_cache / "__pycache__").exists()  # no bytecode written, so none to plant or go stale


def test_a_tampered_cached_file_is_rewritten_and_never_run(fresh_cache):
    from codegen.load import load_module
    from recurrence_dsl.analysis import analyse

    analysis = analyse(recurrence_dsl.load(GLA)["gla"].checked)
    module = load_module(analysis)
    path = module.__file__
    del sys.modules[module.__name__]  # as in a new process
    load._MODULES.clear()
    with open(path, "w") as f:
        f.write("raise SystemExit('planted code ran')\n")
    (fresh_cache / "__pycache__").mkdir()
    (fresh_cache / "__pycache__" / (os.path.basename(path)[:-3] + ".cpython-311.pyc")).write_bytes(b"garbage")
    module = load_module(analysis)
    assert "planted" not in open(path).read() and callable(module.gla)


def test_a_later_process_imports_the_indexed_module_without_generating(fresh_cache, monkeypatch):
    """The module index (codegen/cache.py `load_indexed`): a second "process" finds the module of the same spec
    text, file name and compiler without printing it; a tampered file, or another compiler, generates again."""
    from codegen.load import load_module
    from recurrence_dsl.analysis import analyse

    analysis = analyse(recurrence_dsl.load(GLA)["gla"].checked)
    first = load_module(analysis)
    generated = []
    real = load.module_source
    monkeypatch.setattr(load, "module_source", lambda *a: generated.append(1) or real(*a))

    def new_process():
        del sys.modules[first.__name__]
        load._MODULES.clear()
        return load_module(analysis)

    again = new_process()
    assert generated == [] and again.__file__ == first.__file__ and callable(again.gla)
    with open(first.__file__, "a") as f:
        f.write("raise SystemExit('planted code ran')\n")
    again = new_process()  # the file no longer hashes to its name: generated and rewritten
    assert generated == [1] and "planted" not in open(again.__file__).read()
    load.generator_fingerprint.cache_clear()
    monkeypatch.setattr(load, "generator_fingerprint", lambda: "another compiler")
    new_process()
    assert generated == [1, 1]


def test_recdsl_compile_reads_the_index_and_shares_it_with_compile(fresh_cache, tmp_path, monkeypatch):
    """`recdsl compile` writes the same text from the index as it generates (a second run prints nothing), and
    a module of one recurrence has one entry for the CLI and compile(); a file of two recurrences has its own."""
    from codegen.load import load_module, module_text
    from recurrence_dsl.analysis import analyse

    generated = []
    real = load.module_source
    monkeypatch.setattr(load, "module_source", lambda *a: generated.append(len(a[0])) or real(*a))
    analysis = analyse(recurrence_dsl.load(GLA)["gla"].checked)
    text = module_text([analysis], analysis.recurrence.source.filename)
    assert module_text([analysis], analysis.recurrence.source.filename) == text and generated == [1]
    assert callable(load_module(analysis).gla) and generated == [1]  # compile()'s path found the CLI's entry
    assert module_text([analysis], "other.rec") != text and generated == [1, 1]  # the file name is in the text
    pair = tmp_path / "pair.rec"
    gla_text = GLA.read_text()
    pair.write_text(gla_text + "\n" + gla_text.replace("recurrence gla(", "recurrence gla_twin("))
    both = [analyse(r.checked) for r in recurrence_dsl.load(str(pair)).values()]
    first = module_text(both, str(pair))
    assert module_text(both, str(pair)) == first and generated == [1, 1, 2]
    assert "def gla_twin" in first or "gla_twin =" in first


def test_a_cache_directory_others_can_write_is_refused(fresh_cache, tmp_path, monkeypatch):
    fresh_cache.mkdir(parents=True)
    fresh_cache.chmod(0o777)
    monkeypatch.setattr(cache, "_candidates", lambda: [fresh_cache])
    with pytest.raises(cache.CacheError, match="writable by others"):
        cache.cache_directory()


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="needs root to chown")
def test_a_cache_directory_owned_by_someone_else_is_refused(fresh_cache, monkeypatch):
    fresh_cache.mkdir(parents=True, mode=0o700)
    os.chown(fresh_cache, 4321, -1)
    monkeypatch.setattr(cache, "_candidates", lambda: [fresh_cache])
    with pytest.raises(cache.CacheError, match="owned by uid 4321"):
        cache.cache_directory()


def test_the_next_candidate_is_used_when_the_first_is_refused(fresh_cache, tmp_path, monkeypatch):
    fresh_cache.mkdir(parents=True)
    fresh_cache.chmod(0o777)
    second = tmp_path / "second"
    monkeypatch.setattr(cache, "_candidates", lambda: [fresh_cache, second])
    assert cache.cache_directory() == second and stat.S_IMODE(second.stat().st_mode) == 0o700


# -- found by trying to break it -----------------------------------------------------------------------


def test_a_file_name_cannot_inject_code_into_the_module(tmp_path, capsys):
    spec = tmp_path / "x\n        print('INJECTED'); #.rec"
    spec.write_text((SPECS_DIR / "indrnn.rec").read_text())
    rec = recurrence_dsl.load(spec)["indrnn"]
    layer = recurrence_dsl.compile(rec, backend="torch", tuning=False)
    layer(torch.randn(1, 3, 1, 4), torch.rand(1, 4))
    assert "INJECTED" not in capsys.readouterr().out
    assert "x\\n        print" in layer.source  # cited, escaped


def test_threads_compiling_one_spec_at_once_all_get_the_whole_module():
    import threading

    text = (SPECS_DIR / "retention.rec").read_text().replace("retention", "retention_threads")
    rec = recurrence_dsl.load_text(text)["retention_threads"]
    barrier, results, errors = threading.Barrier(4), [], []

    def worker():
        barrier.wait()
        try:
            results.append(recurrence_dsl.compile(rec, tuning=False))
        except Exception as err:  # noqa: BLE001 - the test reports any failure
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4 and all(r is results[0] for r in results)


def test_names_a_module_may_keep_run():
    text = ("recurrence GLA(options[K], k[K], v[V], g[K]) -> o[V] {\n    state S[K, V]\n"
            "    S[i, j] = exp(g[i]) * S[i, j] + k[i] * v[j]\n    o[j] = sum(i, options[i] * S[i, j])\n}\n")
    rec = recurrence_dsl.load_text(text)["GLA"]
    args, init = _args(rec, T=40)
    ref = rec.reference(*[a.double() for a in args], initial_state=init)[0]
    layer = recurrence_dsl.compile(rec, tuning=False)
    assert hasattr(sys.modules[type(layer).__module__], "GLAModule")
    for backend in ("torch", "triton"):
        out, _ = layer(*args, initial_state=init.float(), backend=backend, form="chunked", chunk_size=16)
        assert ((out.double() - ref).norm() / ref.norm()).item() <= 1e-5


def test_compile_refuses_bad_defaults_whatever_came_before():
    rec = recurrence_dsl.load(GLA)["gla"]
    recurrence_dsl.compile(rec, chunk_size=1)
    for bad in (True, 1.0, 64.0):
        with pytest.raises(ValueError, match="chunk_size"):
            recurrence_dsl.compile(rec, chunk_size=bad)
    recurrence_dsl.compile(rec, form="parallel", backend="triton")  # every linear class has it on Triton too
    with pytest.raises(ValueError, match="no 'parallel' form"):  # the delta rule has none on either backend
        recurrence_dsl.compile(recurrence_dsl.load(SPECS_DIR / "delta_net.rec")["delta_net"], form="parallel",
                               backend="triton")


def test_backend_rules_for_other_devices_forms_and_configs():
    rec = recurrence_dsl.load(GLA)["gla"]
    full = recurrence_dsl.compile(rec, tuning=False)
    assert full.backend_for(torch.device("cpu"), torch.float32, form="parallel") == "triton"
    # a layer whose Triton backend lacks a form the torch backend has (built so: every linear spec has them all)
    layer = type(full)(full.recurrence, full.forms, {n: f for n, f in full.triton_forms.items() if n != "parallel"},
                       tuning=False)
    assert layer.backend_for(torch.device("meta"), torch.float32) == "torch"
    assert layer.backend_for(torch.device("cpu"), torch.float32, form="parallel") == "torch"  # not on triton
    args, init = _args(rec, T=12)
    ref = rec.reference(*[a.double() for a in args], initial_state=init)[0]
    out, _ = layer(*args, initial_state=init.float(), form="parallel")  # auto: torch, the form triton lacks
    assert ((out.double() - ref).norm() / ref.norm()).item() <= 1e-5
    meta, _ = layer(*[a.to("meta") for a in args], backend="triton")  # meta: the shapes, on either backend
    assert meta.is_meta and meta.shape == out.shape
    # A chunked config with form auto applies when the chunked form runs, and is no error when it does not.
    layer(*args, config={"chunk_size": 16, "block_k": 16, "block_v": 16, "num_warps": 2, "num_stages": 1})
    with pytest.raises(recurrence_dsl.CallError, match="no form 'recurrent' takes a config"):
        layer(*args, form="recurrent", backend="torch", config={})
    with pytest.raises(recurrence_dsl.CallError, match="unexpected keyword argument 'foo'"):
        layer(*args, foo=1)
    with pytest.raises(recurrence_dsl.CallError, match="both by position and by name"):
        layer(*args, q=args[0])


def test_a_relative_cache_path_survives_a_chdir(tmp_path, monkeypatch):
    for name in [n for n in sys.modules if n.startswith("recdsl_")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(load, "_MODULES", {})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RECURRENCE_DSL_CACHE", "relcache")
    layer = recurrence_dsl.compile(recurrence_dsl.load(GLA)["gla"], tuning=False)
    monkeypatch.chdir("/")
    assert layer.source.startswith("# Generated by recurrence_dsl")


def test_a_cache_directory_in_a_shared_parent_is_refused(fresh_cache, monkeypatch):
    fresh_cache.parent.mkdir(parents=True)
    fresh_cache.parent.chmod(0o777)
    monkeypatch.setattr(cache, "_candidates", lambda: [fresh_cache])
    with pytest.raises(cache.CacheError, match="writable by others"):
        cache.cache_directory()
