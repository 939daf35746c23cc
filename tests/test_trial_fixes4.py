"""A fourth trial's leftovers: `recdsl tune`'s thread warning printed once, an explicit tuning store in a folder
that does not exist refused, a generated module without params checking its inputs' sizes, and generated text
that does not depend on what sympy generated before in the process."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import recurrence_dsl
from recurrence_dsl.cli import main

from .conftest import SPECS_DIR

TUNE = ["tune", str(SPECS_DIR / "linear_attention.rec"), "--shape", "B=1,T=8,H=1,K=4,V=4", "--backend", "torch",
        "--device", "cpu", "--trials", "1", "--warmup", "0", "--repeat", "3", "--mode", "fwd", "--no-progress",
        "--no-check"]


# 1. the load-average warning of `recdsl tune`: once, not on stderr and again in the table

def test_tune_prints_the_thread_warning_once(tmp_path, capsys, monkeypatch):
    import autotune.threads
    import autotune.tuner

    real = autotune.threads.thread_settings
    loads = iter([6.0, 7.5, 8.25, 9.0])  # the load average moves between the CLI's reading and the tuner's

    def busy():
        return dict(real(), torch_threads=2, cpu_count=2, load_average_1m=next(loads), OMP_WAIT_POLICY=None)

    monkeypatch.setattr(autotune.threads, "thread_settings", busy)
    monkeypatch.setattr(autotune.tuner, "thread_settings", busy)
    assert main(TUNE + ["--store", str(tmp_path / "t.sqlite")]) == 0
    captured = capsys.readouterr()
    both = captured.out + captured.err
    assert both.count("OMP_WAIT_POLICY unset (spinning)") == 1, both
    assert "recdsl tune: warning: 2 torch threads with OMP_WAIT_POLICY unset" in captured.err
    assert "load average 6 over 2 cores" in captured.err  # the first reading, before any timing
    assert "threads: torch 2" in captured.out  # the table still says what the timings ran with


# 2. an explicit store in a folder that does not exist: refused, no folders created

def test_tune_refuses_a_store_in_a_missing_folder_and_creates_none(tmp_path, capsys):
    store = tmp_path / "tunnig" / "runs" / "x.sqlite"  # a typo'd folder
    assert main(TUNE + ["--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("recdsl tune: error: --store: ") and len(err.splitlines()) == 1, err
    assert f"the folder {tmp_path / 'tunnig'} does not exist (nor does {store.parent})" in err
    assert not (tmp_path / "tunnig").exists()


def test_the_api_refuses_a_store_in_a_missing_folder_but_creates_the_rules(tmp_path, monkeypatch):
    from autotune.store import StoreError, TuningStore
    from autotune.tuner import tune

    rec = recurrence_dsl.load(SPECS_DIR / "linear_attention.rec")["linear_attention"]
    missing = tmp_path / "nope" / "x.sqlite"
    with pytest.raises(StoreError, match=f"the folder {re.escape(str(missing.parent))} does not exist; "):
        tune(rec, {"K": 4, "V": 4}, 1, 8, 1, trials=1, store=missing, device="cpu", mode="fwd", check=False)
    with pytest.raises(StoreError, match="does not exist"):
        TuningStore(missing).record("h", "d", "float32", "b", "chunked", "torch", {"chunk_size": 16}, 1.0)
    assert not missing.parent.exists()
    # the rule's store (a cache folder) is still created with its folders, as is an explicit one when asked
    monkeypatch.setenv("RECURRENCE_DSL_CACHE", str(tmp_path / "cache" / "deeper"))
    monkeypatch.delenv("RECURRENCE_DSL_TUNING_STORE", raising=False)
    TuningStore().check_writable()
    assert (tmp_path / "cache" / "deeper" / "tuning.sqlite").is_file()
    TuningStore(missing, create_folders=True).check_writable()
    assert missing.is_file()


# 3. a module without params checks its inputs' sizes against sizes=

def _compiled_module(tmp_path, name: str):
    """The class `recdsl compile` writes for specs/NAME.rec, imported from the file it wrote."""
    import importlib.util

    out = tmp_path / f"{name}_module.py"
    assert main(["compile", str(SPECS_DIR / f"{name}.rec"), "-o", str(out)]) == 0
    spec = importlib.util.spec_from_file_location(f"recdsl_test_{name}", out)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up there)
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return getattr(module, "".join(p.title() for p in name.split("_")))


def test_a_module_without_params_checks_its_inputs_sizes(tmp_path):
    from recurrence_dsl.sampling import sample_arguments

    cls = _compiled_module(tmp_path, "mlstm")
    rec = recurrence_dsl.load(SPECS_DIR / "mlstm.rec")["mlstm"]
    module = cls(2, {"K": 4, "V": 4}, backend="torch")
    assert module.sizes == {"K": 4, "V": 4}
    args, _ = sample_arguments(rec.checked, {"K": 8, "V": 4}, 1, 5, 2, seed=0)
    with pytest.raises(ValueError, match=r"^Mlstm was built with sizes K=4, but input 'q' has K=8 on axis 3 \('q' "
                                         r"is \[B, T, H, K\], got shape \[1, 5, 2, 8\]\)$") as info:
        module(*args)
    assert type(info.value).__name__ == "CallError"
    args, _ = sample_arguments(rec.checked, {"K": 4, "V": 3}, 1, 5, 2, seed=0)
    with pytest.raises(ValueError, match=r"^Mlstm was built with sizes V=4, but input 'v' has V=3 on axis 3"):
        module(*args)
    args, _ = sample_arguments(rec.checked, {"K": 4, "V": 4}, 1, 5, 2, seed=0)
    out, _ = module(*args)  # the sizes it was built with: runs
    assert out.shape == (1, 5, 2, 4)
    out, _ = cls(2, {"K": 4}, backend="torch")(*sample_arguments(rec.checked, {"K": 4, "V": 6}, 1, 5, 2)[0])
    assert out.shape == (1, 5, 2, 6)  # a size sizes= leaves out is the inputs'


# 4. generated text that does not depend on what ran before in the process, nor on the process's string hashes

NEAR_MISS = SPECS_DIR.parent / "tests" / "data" / "delta_product_near_miss.rec"
_MODULE_TEXT = """
import sys
from pathlib import Path

import recurrence_dsl
from codegen.module import module_source
from recurrence_dsl.analysis import analyse


def text(path):
    return module_source([analyse(r.checked) for r in recurrence_dsl.load(path).values()], path.name)


for spec in sorted(Path(sys.argv[2]).glob("*.rec")) if len(sys.argv) > 2 else ():
    text(spec)
sys.stdout.write(text(Path(sys.argv[1])))
"""


def _module_text(*argv: str, hash_seed: int) -> str:
    env = dict(os.environ, PYTHONPATH=str(SPECS_DIR.parent), PYTHONHASHSEED=str(hash_seed))
    done = subprocess.run([sys.executable, "-c", _MODULE_TEXT, *argv], capture_output=True, text=True, env=env,
                          cwd=SPECS_DIR.parent, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_generated_text_is_the_same_whatever_ran_before_in_the_process():
    """The summation indices the step IR numbers (`i__3`, printed `i_3` in the reasons the module quotes) were
    numbered in the order of a set of sums, which followed the symbols' string hashes: two processes (seeds
    chosen to differ on the old code) printed i_2 or i_3. Fresh, and after every spec of specs/: one text."""
    fresh = _module_text(str(NEAR_MISS), hash_seed=3)
    after_all = _module_text(str(NEAR_MISS), str(SPECS_DIR), hash_seed=0)
    assert "sum(i_0, k1[i_0]" in fresh  # (the quoted sum this is about is still there)
    assert fresh == after_all


def test_a_param_named_like_an_init_argument_is_one_clash(tmp_path, capsys):
    """`heads` and `sizes` are both __init__ arguments and attributes of a generated module: a param so named is
    reported once, as the argument it would clash with (not a second time as an attribute)."""
    from recurrence_dsl.cli import main

    spec = tmp_path / "heads.rec"
    spec.write_text("recurrence tl2(x[D]) -> y[D] {\n    param heads[D]\n    state h[D]\n"
                    "    h[d] = sigmoid(heads[d]) * h[d] + x[d]\n    y[d] = h[d]\n}\n")
    assert main(["compile", str(spec), "-o", str(tmp_path / "out.py")]) == 2
    err = capsys.readouterr().err
    assert "heads.rec:2:11: error: param 'heads' would clash with the argument 'heads'" in err, err
    assert "names clash" not in err and err.count("hint: rename") == 1 and "would replace the attribute" not in err
    assert not (tmp_path / "out.py").exists()
