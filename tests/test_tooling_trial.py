"""Fixes from a new user's trial of the tooling: `recdsl tune` re-runs against a stored choice, float64 tuning, what
`compile` may write over, which files `--store` accepts, the "Regenerate with" line, file names printed into
generated code, the store's fallback folder, and what `check` and generated modules say when triton is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import recurrence_dsl
from recurrence_dsl.cli import main

from .conftest import REPO, SPECS_DIR

GLA = SPECS_DIR / "gla.rec"
SMALL = {"K": 8, "V": 8}


def _run_cli(*argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECURRENCE_DSL_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


# -- 1. a re-run of `recdsl tune` against a stored choice ---------------------------------------------------------


def test_a_rerun_timing_fewer_configs_keeps_the_stored_choice_and_says_so(tmp_path, capsys):
    from autotune.store import TuningStore
    from autotune.tuner import tune

    gla = recurrence_dsl.load(GLA)["gla"]
    path = tmp_path / "store.sqlite"
    first = tune(gla, SMALL, 1, 64, 1, torch.float32, "chunked", "torch", trials=1, store=path, device="cpu",
                 warmup=0, repeat=1, mode="fwd")
    # only the default was timed: said so, not "the default is the fastest"
    assert first.chosen is None and "only the default was timed" in first.reason
    assert "the default is the fastest" not in first.table() and first.replaced is None
    # an earlier study of 4 configs that chose chunk_size=16
    key = dict(zip(("spec_hash", "device", "dtype", "bucket", "form", "backend"), first.key))
    trials = [dict(**key, config={"chunk_size": c}, median_ms=m, study="earlier", mode="fwd")
              for c, m in ((64, 2.0), (16, 1.0), (32, 1.5), (128, 2.5))]
    store = TuningStore(path)
    store.save_study(trials, dict(**key, mode="fwd", config={"chunk_size": 16}, tuned=True, reason="won",
                                  study="earlier"))
    again = tune(gla, SMALL, 1, 64, 1, torch.float32, "chunked", "torch", trials=1, store=path, device="cpu",
                 warmup=0, repeat=1, mode="fwd")
    assert again.kept_earlier is not None and again.kept_earlier["timed"] == 4 and again.replaced is None
    assert store.choice(*first.key, "fwd")["config"] == {"chunk_size": 16}  # kept
    assert len(store.trials(study=again.study)) == 1  # its trials are stored all the same
    table = again.table()
    assert "keeps its earlier choice, chunk_size=16 (tuned, 1.0000 ms, 4 configs timed" in table
    assert "fewer than its 4" in table and "--replace" in table
    # the command line says it too; --replace stores the new choice and names the one it replaced
    code, out, _ = _run_cli("tune", GLA, "--shape", "B=1,T=64,H=1,K=8,V=8", "--mode", "fwd", "--trials", "1",
                            "--repeat", "1", "--warmup", "0", "--store", path, "--no-progress", "--replace",
                            capsys=capsys)
    assert code == 0 and "replaced the earlier stored choice chunk_size=16 (tuned, 1.0000 ms, 4 configs" in out
    assert store.choice(*first.key, "fwd")["config"] == {"chunk_size": 64}
    code, out, _ = _run_cli("tune", GLA, "--shape", "B=1,T=64,H=1,K=8,V=8", "--mode", "fwd", "--trials", "1",
                            "--repeat", "1", "--warmup", "0", "--store", path, "--no-progress", "--json",
                            capsys=capsys)
    result = json.loads(out)["results"][0]
    assert code == 0 and result["replaced"]["config"] == {"chunk_size": 64} and result["kept_earlier"] is None


# -- 2. float64 tunes on the torch backend ------------------------------------------------------------------------


def test_float64_tunes_on_torch_and_is_refused_with_triton_at_once(tmp_path, capsys):
    from autotune.store import TuningStore

    path = tmp_path / "store.sqlite"
    code, out, err = _run_cli("tune", GLA, "--shape", "B=1,T=64,H=1,K=8,V=8", "--dtype", "float64", "--backend",
                              "torch", "--form", "chunked", "--mode", "fwd", "--trials", "2", "--repeat", "1",
                              "--warmup", "0", "--store", path, "--no-progress", "--json", capsys=capsys)
    assert code == 0, err
    result = json.loads(out)["results"][0]
    assert result["dtype"] == "float64" and all(t["median_ms"] is not None for t in result["trials"])
    key = (result["spec_hash"], result["device"], "float64", result["bucket"], "chunked", "torch")
    assert TuningStore(path).choice(*key, "fwd") is not None
    code, out, err = _run_cli("tune", tmp_path / "missing.rec", "--dtype", "float64", "--backend", "triton",
                              "--store", path, capsys=capsys)  # refused before the (missing) spec is read
    assert code == 2 and "--dtype float64 with --backend triton" in err and "--backend torch" in err


# -- 3. compile never writes onto the spec -------------------------------------------------------------------------


def test_compile_refuses_to_write_onto_the_spec_by_any_path(tmp_path, capsys, monkeypatch):
    spec = tmp_path / "gla.rec"
    text = GLA.read_text()
    spec.write_text(text)
    (tmp_path / "link.py").symlink_to(spec)
    monkeypatch.chdir(tmp_path)
    for out in (spec, "gla.rec", "./sub/../gla.rec", tmp_path / "link.py"):
        if str(out).startswith("./sub"):
            (tmp_path / "sub").mkdir(exist_ok=True)
        code, _, err = _run_cli("compile", spec, "-o", out, "--force", capsys=capsys)
        assert code == 2 and f"-o: {out} is the spec {spec}" in err and "never written onto it" in err, err
        assert spec.read_text() == text and (tmp_path / "link.py").is_symlink()
    code, _, err = _run_cli("compile", "gla.rec", "-o", spec, "--force", capsys=capsys)
    assert code == 2 and "is the spec gla.rec" in err


# -- 4. --store takes a tuning store, never another program's database --------------------------------------------


def test_store_refuses_another_database_and_an_empty_file(tmp_path, capsys, monkeypatch):
    import sqlite3

    from autotune import store as store_module
    from autotune.store import StoreError, TuningStore

    monkeypatch.setattr(store_module, "EMPTY_WAIT_S", 0.2)  # (how long an empty file may be another's new store)

    other = tmp_path / "app.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
    conn.close()
    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(b"")
    for path, words in ((other, "SQLite database with other tables (users)"), (empty, "an empty file (0 bytes)")):
        with pytest.raises(StoreError, match="not a tuning store"):
            TuningStore(path).check_writable()
        code, _, err = _run_cli("tune", GLA, "--shape", "B=1,T=64,H=1,K=8,V=8", "--store", path, "--no-progress",
                                capsys=capsys)
        assert code == 2 and f"tuning store {path} is {words if path == empty else 'an ' + words}" in err, err
        assert "Traceback" not in err
    with sqlite3.connect(other) as conn:  # untouched: no table of the store's added
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")] == ["users"]
    conn.close()
    assert empty.stat().st_size == 0
    # a store, and a path with no file, are taken (the store is created there)
    fresh = tmp_path / "fresh.sqlite"
    TuningStore(fresh).check_writable()
    TuningStore(fresh).check_writable()
    assert fresh.stat().st_size > 0


# -- 5, 6. the "Regenerate with" line; file names printed into generated code --------------------------------------


def test_regenerate_line_has_name_and_the_path_as_given_quoted(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "my specs"
    folder.mkdir()
    (folder / "two é.rec").write_text(GLA.read_text() + "\n" + (SPECS_DIR / "retention.rec").read_text())
    monkeypatch.chdir(tmp_path)
    code, _, err = _run_cli("compile", "my specs/two é.rec", "--name", "retention", "-o", "ret.py", capsys=capsys)
    assert code == 0, err
    text = (tmp_path / "ret.py").read_text()
    assert "Regenerate with `recdsl compile 'my specs/two é.rec' --name retention -o <this file>`" in text
    assert text.startswith("# Generated by recurrence_dsl") and " from two é.rec;" in text.splitlines()[0]
    # the command in it runs and writes the same module
    command = text.split("Regenerate with `")[1].split("`")[0].replace("<this file>", "again.py")
    assert main(__import__("shlex").split(command)[1:]) == 0
    assert (tmp_path / "again.py").read_text() == text


def test_file_names_in_generated_code_are_readable_and_inert(tmp_path):
    hostile = 'x"""\nprint("INJECTED")\n#é\\.rec'
    spec = tmp_path / hostile
    spec.write_text(GLA.read_text())
    out = tmp_path / "hostile_layer.py"
    assert main(["compile", str(spec), "-o", str(out)]) == 0
    text = out.read_text()
    header = text.splitlines()[0]
    assert header.endswith('from x"""\\nprint("INJECTED")\\n#é\\.rec; do not edit by hand.')
    assert '# x"""\\nprint("INJECTED")\\n#é\\.rec:10' in text  # a citation: as is, the line breaks escaped
    assert "\\xe9" not in text  # é is printed as é
    done = subprocess.run([sys.executable, "-c", "import hostile_layer; print(hostile_layer.__doc__.splitlines()[0])"],
                          cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert "INJECTED" not in done.stdout.replace('print("INJECTED")', "")  # the docstring names it, nothing runs it
    assert done.stdout.strip() == 'gla: linear-recurrence layers compiled from x"""\\nprint("INJECTED")\\n#é\\.rec.'
    # a process substitution (`<(cat gla.rec)`: /dev/fd/N) is named by its path as given, everywhere
    fd = os.open(GLA, os.O_RDONLY)
    try:
        assert main(["compile", f"/dev/fd/{fd}", "-o", str(tmp_path / "piped.py")]) == 0
    finally:
        os.close(fd)
    piped = (tmp_path / "piped.py").read_text()
    assert f" from /dev/fd/{fd};" in piped.splitlines()[0] and f"# /dev/fd/{fd}:10" in piped
    assert f"`recdsl compile /dev/fd/{fd} -o <this file>`" in piped


# -- 7. the tuning store falls back as the module cache does; errors name where the path came from ----------------


def test_store_falls_back_like_the_module_cache_under_an_unusable_home(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # HOME under a regular file: no folder can be made there, even by root
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = _env(HOME=str(blocker / "home"), TMPDIR=str(temp))
    env.pop("XDG_CACHE_HOME", None)
    done = subprocess.run([sys.executable, "-m", "recurrence_dsl", "tune", str(GLA), "--shape",
                           "B=1,T=64,H=1,K=8,V=8", "--mode", "fwd", "--trials", "1", "--repeat", "1", "--warmup", "0",
                           "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    fallback = temp / f"recurrence_dsl-{os.getuid()}"
    assert (fallback / "tuning.sqlite").is_file() and f"stored in {fallback / 'tuning.sqlite'}" in done.stdout
    assert "not the store calls read by default" not in done.stdout
    # calls read the same file (the rule is one function, copied into generated modules too)
    done = subprocess.run([sys.executable, "-c", "from codegen.tuning import tuning_store_path as p; "
                           "from codegen.cache import cache_directory as c; print(p()); print(c())"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(fallback / "tuning.sqlite"), str(fallback / "modules")]


def test_store_errors_name_where_the_path_came_from(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RECURRENCE_DSL_TUNING_STORE", str(tmp_path))  # a directory
    code, _, err = _run_cli("tune", GLA, "--shape", "B=1,T=64,H=1,K=8,V=8", "--no-progress", capsys=capsys)
    assert code == 2 and f"$RECURRENCE_DSL_TUNING_STORE: tuning store {tmp_path} is a directory" in err, err
    code, _, err = _run_cli("tune", GLA, "--shape", "B=1,T=64,H=1,K=8,V=8", "--no-progress", "--store", tmp_path,
                            capsys=capsys)
    assert code == 2 and f"--store: tuning store {tmp_path} is a directory" in err, err


# -- 8, 9. without an importable triton: check says the Triton rows were not run; errors carry the import's error ----

# A child's first lines: triton "present but missing numpy" (its import fails as a missing numpy would make it).
_NO_TRITON = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError("No module named 'numpy'", name="numpy")
        return None
sys.meta_path.insert(0, _Block())
"""


def _child(code: str, cwd, **env):
    done = subprocess.run([sys.executable, "-c", _NO_TRITON + code], cwd=cwd, capture_output=True, text=True,
                          env=_env(**env), timeout=600)
    return done.returncode, done.stdout, done.stderr


def test_check_says_the_triton_rows_were_not_run_and_why(tmp_path):
    code, out, err = _child(f"from recurrence_dsl.cli import main; sys.exit(main(['check', {str(GLA)!r}, "
                            "'--no-grad', '--shape', 'B=1,T=20,H=1,K=4,V=4']))", tmp_path)
    assert code == 0, err
    assert ("triton/*" in out and "the Triton rows were not run: triton does not import (ModuleNotFoundError: No "
            "module named 'numpy')" in out)
    code, out, err = _child(f"from recurrence_dsl.cli import main; sys.exit(main(['tune', {str(GLA)!r}, "
                            "'--backend', 'triton']))", tmp_path)
    assert code == 2 and err.startswith("recdsl tune: error: --backend triton: triton is not importable here "
                                        "(ModuleNotFoundError: No module named 'numpy')"), err


def test_a_generated_module_says_why_triton_does_not_import(tmp_path):
    assert main(["compile", str(SPECS_DIR / "retention.rec"), "-o", str(tmp_path / "ret_layer.py")]) == 0
    code, out, err = _child("""
import torch, ret_layer
assert ret_layer.HAVE_TRITON is False
try:
    ret_layer.Retention(2, {"K": 4, "V": 4}, backend="triton")
except ValueError as err:
    print("MODULE:", err)
q = torch.randn(1, 4, 2, 4)
try:
    ret_layer.retention(q, q, q, torch.full((2,), 0.9), backend="triton")
except ValueError as err:
    print("CALL:", err)
""", tmp_path)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("MODULE: ") and lines[1].startswith("CALL: "), out
    for line in lines:
        assert ("backend='triton' needs triton, which does not import here (ModuleNotFoundError: No module named "
                "'numpy'): install it (pip install triton)") in line, line


# -- 10. what compile's -o may name -------------------------------------------------------------------------------


def test_compile_output_dash_symlink_mode_and_extension(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = SPECS_DIR / "retention.rec"
    code, _, err = _run_cli("compile", spec, "-o", "-", capsys=capsys)
    assert code == 2 and "-o -: compile writes the module to a file, not to standard output" in err
    assert not (tmp_path / "-").exists()
    # a symlink is written through: the link stays, its target gets the module
    real = tmp_path / "real_layer.py"
    (tmp_path / "link.py").symlink_to(real)
    code, _, err = _run_cli("compile", spec, "-o", "link.py", capsys=capsys)
    assert code == 0, err
    assert (tmp_path / "link.py").is_symlink() and real.read_text().startswith("# Generated by recurrence_dsl")
    # re-compiling over a file keeps its mode
    real.chmod(0o640)
    code, _, err = _run_cli("compile", spec, "-o", real, capsys=capsys)
    assert code == 0 and (real.stat().st_mode & 0o777) == 0o640, err
    # a name import cannot find is warned of, with or without .py
    code, _, err = _run_cli("compile", spec, "-o", "noext", capsys=capsys)
    assert code == 0 and "warning: noext is not an importable module name" in err and "noext.py" in err


# -- 11. the command synopses name every option --help has ---------------------------------------------------------


@pytest.mark.parametrize("doc", ["README.md", "docs/language.md"])
def test_command_synopses_name_every_option(doc):
    import re

    from recurrence_dsl.cli import build_parser

    text = (REPO / doc).read_text()
    block = text[text.index("recdsl check FILE"):text.index("recdsl --version")]
    synopses = dict(re.findall(r"^recdsl (\w+) (FILE.*?)(?=^recdsl |\Z)", block, re.S | re.M))
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for command, parser in sub.choices.items():
        actions = [a.option_strings for a in parser._actions
                   if a.option_strings and not {"--help", "--debug"} & set(a.option_strings)]
        missing = sorted(names[-1] for names in actions  # (an option given as -o or --output: either will do)
                         if not any(re.search(r"(?<![\w-])" + re.escape(o) + r"\b", synopses[command]) for o in names))
        assert not missing, f"{doc}: recdsl {command}'s synopsis lacks {missing}"
