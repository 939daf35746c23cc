"""The tuning store under bad paths, locks and bad contents (issue 11), and the rule of which config runs (issue 14).

Each bad input of issue 11's "Tuning store" section is one test: `recdsl tune --store` at a corrupt file, a
directory, a read-only file and a read-only filesystem exits 2 with a message; a forward call never waits on a
locked store and never fails on a config that is not JSON; lookups work from a read-only store; `tune` waits
for a lock with progress shown, then fails naming a side file that keeps every trial. Tiny shapes and a stub
runner where timing itself is not the point.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

import recurrence_dsl
from autotune import lookup, store, tuner
from autotune.store import StoreError, TuningStore, shape_bucket
from autotune.threads import thread_settings, timing_warnings
from codegen import tuning
from recurrence_dsl.cli import main

from .conftest import SPECS_DIR

GLA = SPECS_DIR / "gla.rec"
SIZES = {"K": 16, "V": 16}
TINY = "B=1,T=32,H=1,K=16,V=16"


def _gla():
    return recurrence_dsl.load(GLA)["gla"]


def _key(mode: str = "fwd", length: int = 20, heads: int = 2) -> tuple:
    gla = _gla()
    return (gla.spec_hash, lookup.device_name("cpu", "torch"), "float32", shape_bucket(1, heads, length, SIZES),
            "chunked", "torch", mode)


def _args(length: int = 20, heads: int = 2):
    args, _ = recurrence_dsl.sampling.sample_arguments(_gla().checked, SIZES, 1, length, heads)
    return args


@pytest.fixture(autouse=True)
def _fresh_lookups():
    lookup.clear_cache()
    yield
    lookup.clear_cache()


def _stub(layer, backend, form, config, *args, **kwargs):
    """A run that takes no time worth measuring: the tests below are about the store, not the timings."""
    return torch.zeros(2) + config["chunk_size"]


def _tune_cli(store_arg, *extra, capsys=None):
    code = main(["tune", str(GLA), "--shape", TINY, "--device", "cpu", "--backend", "torch", "--trials", "2",
                 "--warmup", "0", "--repeat", "1", "--mode", "fwd", "--no-progress", "--no-check",
                 "--store", str(store_arg), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def _as_readonly(monkeypatch, path: Path) -> None:
    """Make `path` read-only for this process. chmod is enough for a normal user; root writes through mode bits,
    so there every SQLite connection to it is opened with SQLite's own read-only flag (the real SQLite error
    path: "attempt to write a readonly database")."""
    os.chmod(path, 0o444)
    if os.geteuid() != 0:
        return
    real = sqlite3.connect

    def connect(database, *args, **kwargs):
        if not kwargs.get("uri") and Path(database).resolve() == path.resolve():
            kwargs["uri"] = True
            database = f"file:{Path(database).resolve()}?mode=ro"
        return real(database, *args, **kwargs)

    monkeypatch.setattr(store.sqlite3, "connect", connect)


# -- bad --store paths: exit 2 with a message, never a traceback, nothing timed ---------------------------------


def test_tune_store_at_a_corrupt_file(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "corrupt.sqlite"
    bad.write_bytes(b"this is not an SQLite database at all\n" * 50)
    timed = []
    monkeypatch.setattr(tuner, "run_config", lambda *a, **k: timed.append(1))
    code, _, err = _tune_cli(bad, capsys=capsys)
    assert code == 2 and "--store" in err and str(bad) in err and "not an SQLite tuning store" in err
    assert "Traceback" not in err and not timed
    assert bad.read_bytes().startswith(b"this is not")  # left as it was


def test_tune_store_at_a_directory(tmp_path, capsys):
    code, _, err = _tune_cli(tmp_path, capsys=capsys)
    assert code == 2 and "is a directory" in err and "Traceback" not in err


def test_tune_store_under_a_regular_file(tmp_path, capsys):
    (tmp_path / "plain").write_text("x")
    code, _, err = _tune_cli(tmp_path / "plain" / "tuning.sqlite", capsys=capsys)
    assert code == 2 and "plain is a file, not a directory" in err and "Traceback" not in err


def test_tune_store_at_a_read_only_file(tmp_path, capsys, monkeypatch):
    path = tmp_path / "ro.sqlite"
    TuningStore(path).record("h", "d", "float32", "b", "chunked", "torch", {"chunk_size": 16}, 1.0)
    _as_readonly(monkeypatch, path)
    code, _, err = _tune_cli(path, capsys=capsys)
    assert code == 2 and "read-only" in err and str(path) in err and "Traceback" not in err
    assert TuningStore(path).count() == 1


def test_tune_store_on_a_read_only_filesystem(tmp_path, capsys, monkeypatch):
    target = tmp_path / "mnt" / "sub" / "tuning.sqlite"
    real = Path.mkdir

    def mkdir(self, *args, **kwargs):  # what a read-only mount answers
        if str(self).startswith(str(tmp_path / "mnt")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    # the rule's store is the one whose folders are created (a --store PATH's folder must exist already)
    monkeypatch.setenv("RECURRENCE_DSL_TUNING_STORE", str(target))
    code = main(["tune", str(GLA), "--shape", TINY, "--device", "cpu", "--backend", "torch", "--trials", "2",
                 "--warmup", "0", "--repeat", "1", "--mode", "fwd", "--no-progress", "--no-check"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot be created" in err and "Read-only file system" in err and "Traceback" not in err
    with pytest.raises(StoreError, match="Read-only file system"):
        TuningStore().check_writable()
    with pytest.raises(StoreError, match="Read-only file system"):
        TuningStore(target, create_folders=True).check_writable()


# -- a forward call never waits on the store, and never fails because of it -------------------------------------

_HOLD = textwrap.dedent("""
    import sqlite3, sys, time
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("PRAGMA locking_mode = EXCLUSIVE")  # readers are shut out too, WAL or not
    conn.execute("BEGIN EXCLUSIVE")
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    conn.execute("COMMIT")
""")


def _hold_lock(path: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_forward_call_does_not_wait_on_a_locked_store(tmp_path):
    path = tmp_path / "tuning.sqlite"
    TuningStore(path).choose(*_key(), {"chunk_size": 16}, True, "test")
    layer = recurrence_dsl.compile(_gla(), backend="torch", form="chunked", tuning=path)
    holder = _hold_lock(path, 20)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            chosen = layer.config_for(*_args())
            looked_up = time.perf_counter() - start
            out = layer(*_args())[0]
            layer(*_args())
        assert looked_up < 2.0  # the busy timeout is 0.05 s; before the fix a call waited 60 s
        assert chosen["chunk_size"] == 64 and chosen["source"] == "default" and "cannot be read" in chosen["why"]
        assert torch.isfinite(out).all()
        store_warnings = [w for w in caught if "tuning store" in str(w.message)]
        assert len(store_warnings) == 1 and "locked" in str(store_warnings[0].message)
    finally:
        holder.kill()
        holder.wait()
    # once the lock is gone (and the retry interval passed) the choice is read again
    lookup.clear_cache()
    assert layer.config_for(*_args())["chunk_size"] == 16


def test_a_stored_config_that_is_not_json_runs_the_defaults(tmp_path):
    path = tmp_path / "tuning.sqlite"
    s = TuningStore(path)
    s.choose(*_key(), {"chunk_size": 16}, True, "test")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE choices SET config = '{chunk_size: 16,,'")
    layer = recurrence_dsl.compile(_gla(), backend="torch", form="chunked", tuning=path)
    with pytest.warns(RuntimeWarning, match="not a JSON object"):
        plan = layer.config_for(*_args())
    assert plan["chunk_size"] == 64 and plan["source"] == "default"
    out = layer(*_args())[0]
    assert torch.equal(out, layer(*_args(), chunk_size=64)[0])
    # a JSON value of the wrong shape is refused the same way
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE choices SET config = '{\"chunk_size\": \"sixteen\"}'")
    lookup.clear_cache()
    with pytest.warns(RuntimeWarning, match="not a JSON object"):
        assert layer.config_for(*_args())["source"] == "default"


def test_a_corrupt_store_never_fails_a_call(tmp_path):
    path = tmp_path / "tuning.sqlite"
    path.write_bytes(os.urandom(4096))
    layer = recurrence_dsl.compile(_gla(), backend="torch", form="chunked", tuning=path)
    with pytest.warns(RuntimeWarning, match="not a usable SQLite store"):
        out = layer(*_args())[0]
    assert torch.isfinite(out).all()


def test_lookups_work_from_a_read_only_store(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "tuning.sqlite"
    TuningStore(path).choose(*_key(), {"chunk_size": 16}, True, "beat the default")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    _as_readonly(monkeypatch, path)
    os.chmod(folder, 0o555)
    try:
        layer = recurrence_dsl.compile(_gla(), backend="torch", form="chunked", tuning=path)
        plan = layer.config_for(*_args())
        assert plan["chunk_size"] == 16 and plan["source"] == "store" and "beat the default" in plan["why"]
        s = TuningStore(path)
        assert s.choice(*_key())["config"] == {"chunk_size": 16} and s.trials() == [] and s.count() == 0
        assert lookup.tuned_config(_gla(), "cpu", torch.float32, 1, 2, 20, SIZES, "chunked", "torch", path) == \
            {"chunk_size": 16}
    finally:
        os.chmod(folder, 0o755)
    after = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert after["tuning.sqlite"] == before["tuning.sqlite"]  # nothing written
    # Only SQLite's WAL index may appear, and only where the directory could be written after all (as root)
    assert set(after) - set(before) <= ({"tuning.sqlite-shm", "tuning.sqlite-wal"} if os.geteuid() == 0 else set())


def test_a_read_only_wal_store_without_its_index_is_read_as_immutable(tmp_path, monkeypatch):
    """What a read-only directory does to a WAL store (SQLite cannot create the -shm file), made to happen as
    root too: the first, plain read-only open fails the way SQLite fails there, the immutable open then reads."""
    path = tmp_path / "tuning.sqlite"
    TuningStore(path).choose(*_key(), {"chunk_size": 32}, True, "test")
    real = sqlite3.connect
    opened = []

    def connect(database, *args, **kwargs):
        opened.append(str(database))
        conn = real(database, *args, **kwargs)
        if "immutable=1" not in str(database):
            conn.close()
            return real("file:/nonexistent-dir/x.sqlite?mode=ro", uri=True)  # "unable to open database file"
        return conn

    monkeypatch.setattr(sqlite3, "connect", connect)
    assert tuning.tuning_read_choice(str(path), _key(), ("chunk_size",))[0] == {"chunk_size": 32}
    assert TuningStore(path).choice(*_key())["config"] == {"chunk_size": 32}
    assert any("immutable=1" in d for d in opened) and any("immutable" not in d for d in opened)


# -- tune and a locked store: wait with progress, then fail keeping every trial -----------------------------------


def test_tune_waits_for_a_lock_then_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(tuner, "run_config", _stub)
    path = tmp_path / "tuning.sqlite"
    TuningStore(path).check_writable()
    holder = _hold_lock(path, 1.5)
    waits = []
    try:
        result = tuner.tune(_gla(), SIZES, 1, 32, 1, torch.float32, "chunked", "torch", 5, path, "cpu", warmup=0,
                            repeat=1, check=False, mode="fwd", lock_wait_s=30,
                            on_lock_wait=lambda waited, limit: waits.append(waited))
    finally:
        holder.wait()
    assert waits and max(waits) < 30
    assert TuningStore(path).count() == len(result.trials) == 2  # T = 32: chunk sizes 16 and 32
    assert TuningStore(path).choice(*result.key, "fwd") is not None


def test_tune_fails_on_a_lock_that_stays_and_keeps_its_trials(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tuner, "run_config", _stub)
    path = tmp_path / "tuning.sqlite"
    TuningStore(path).check_writable()
    holder = _hold_lock(path, 60)
    try:
        code, out, err = _tune_cli(path, "--lock-wait", "1", capsys=capsys)
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and "still locked by another process" in err and "Traceback" not in err
    assert "waiting for the tuning store's lock" in err  # the wait is shown even with --no-progress
    assert "chunk_size=16" in out and "(default)" in out  # the table of what was measured
    side = Path(err.split("saved in ")[1].split(":")[0])
    data = json.loads(side.read_text())
    assert len(data["trials"]) == 2 and data["choice"]["mode"] == "fwd" and data["store"] == str(path)
    assert TuningStore(path).count() == 0
    # the lock is gone: the side file goes in with one command
    done = subprocess.run([sys.executable, "-m", "autotune.store", "merge", str(side)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(SPECS_DIR.parent)})
    assert done.returncode == 0, done.stderr
    assert TuningStore(path).count() == 2 and not side.exists()


# -- which config a call runs -----------------------------------------------------------------------------------


def test_explicit_chunk_size_wins_over_the_store_and_modes_are_kept_apart(tmp_path):
    path = tmp_path / "tuning.sqlite"
    s = TuningStore(path)
    s.choose(*_key("fwd"), {"chunk_size": 16}, True, "fwd winner")
    s.choose(*_key("fwdbwd"), {"chunk_size": 32}, True, "fwdbwd winner")
    layer = recurrence_dsl.compile(_gla(), backend="torch", form="chunked", tuning=path)
    assert layer.config_for(*_args())["chunk_size"] == 16
    leaves = [a.detach().requires_grad_() for a in _args()]
    assert layer.config_for(*leaves)["chunk_size"] == 32  # a training call reads the fwdbwd choice
    with torch.no_grad():
        assert layer.config_for(*leaves)["chunk_size"] == 16
    assert layer.config_for(*_args(), chunk_size=128) | {"why": ""} == \
        {"backend": "torch", "form": "chunked", "chunk_size": 128, "config": {}, "source": "call", "why": ""}
    fixed = recurrence_dsl.compile(_gla(), backend="torch", form="chunked", chunk_size=128, tuning=path)
    plan = fixed.config_for(*_args())
    assert plan["chunk_size"] == 128 and plan["source"] == "compile" and "wins over the store" in plan["why"]
    assert fixed.options(form="auto").chunk_size_given  # copies keep an explicit chunk_size
    # "default kept" is stored but runs the defaults
    s.choose(*_key("fwd"), {"chunk_size": 64}, False, "not beyond the noise")
    lookup.clear_cache()
    plan = layer.config_for(*_args())
    assert plan["source"] == "default" and "default kept" in plan["why"] and "noise" in plan["why"]


def test_one_rule_names_the_store(tmp_path, monkeypatch):
    monkeypatch.delenv("RECURRENCE_DSL_TUNING_STORE", raising=False)
    monkeypatch.setenv("RECURRENCE_DSL_CACHE", str(tmp_path / "cache"))
    assert store.default_path() == tmp_path / "cache" / "tuning.sqlite"
    explicit = tmp_path / "elsewhere" / "mine.sqlite"
    monkeypatch.setenv("RECURRENCE_DSL_TUNING_STORE", str(explicit))
    assert store.default_path() == explicit == Path(tuning.tuning_store_path()) == TuningStore().path
    # recdsl tune without --store writes there, and a plain compile() reads it
    monkeypatch.setattr(tuner, "run_config", _stub)
    monkeypatch.setenv("RECURRENCE_DSL_TUNING", "1")
    code = main(["tune", str(GLA), "--shape", "B=1,T=20,H=2,K=16,V=16", "--device", "cpu", "--backend", "torch",
                 "--warmup", "0", "--repeat", "1", "--mode", "fwd", "--no-progress", "--no-check"])
    assert code == 0 and TuningStore(explicit).count() >= 1
    choice = TuningStore(explicit).choice(*_key())
    plan = recurrence_dsl.compile(_gla(), backend="torch", form="chunked").config_for(*_args())
    assert str(explicit) in plan["why"] and plan["source"] == ("store" if choice["tuned"] else "default")
    monkeypatch.setenv("RECURRENCE_DSL_TUNING", "0")
    lookup.clear_cache()
    plan = recurrence_dsl.compile(_gla(), backend="torch", form="chunked").config_for(*_args())
    assert "RECURRENCE_DSL_TUNING=0" in plan["why"] and plan["source"] == "default"


def test_generated_modules_read_the_store(tmp_path, monkeypatch):
    out = tmp_path / "gla_module.py"
    assert main(["compile", str(GLA), "-o", str(out)]) == 0
    path = tmp_path / "tuning.sqlite"
    TuningStore(path).choose(*_key(), {"chunk_size": 16}, True, "test")
    monkeypatch.setenv("RECURRENCE_DSL_TUNING_STORE", str(path))
    monkeypatch.setenv("RECURRENCE_DSL_TUNING", "1")
    script = textwrap.dedent(f"""
        import importlib.util, sys, torch
        spec = importlib.util.spec_from_file_location("gla_module", {str(out)!r})
        module = importlib.util.module_from_spec(spec)
        sys.modules["gla_module"] = module
        spec.loader.exec_module(module)
        assert "autotune" not in sys.modules and "codegen" not in sys.modules  # the module's own read path
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 20, 2, 16) for _ in range(3))
        g = torch.nn.functional.logsigmoid(torch.randn(1, 20, 2, 16))
        plan = module.gla.config_for(q, k, v, g, backend="torch", form="chunked")
        print(plan["chunk_size"], plan["source"])
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["16", "store"]


def test_show_and_check_say_which_config_a_call_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RECURRENCE_DSL_TUNING_STORE", str(tmp_path / "none.sqlite"))
    monkeypatch.setenv("RECURRENCE_DSL_TUNING", "1")
    assert main(["show", str(GLA)]) == 0
    out = capsys.readouterr().out
    assert "config of a call (B=2 T=1024 H=4 K=64 V=64, float32" in out
    assert "fwd     chunked/" in out and "fwdbwd  chunked/" in out
    # on this CPU a call runs the torch form (no store there yet), or Triton's interpreter (never looked up)
    assert "no tuning store at" in out or "Triton's interpreter: its timings are never looked up" in out
    assert main(["check", str(GLA), "--shape", "B=1,T=20,H=2,K=16,V=16", "--no-triton"]) == 0
    assert "config of a call (B=1 T=20 H=2 K=16 V=16" in capsys.readouterr().out


# -- the tuner's own rules -------------------------------------------------------------------------------------


def test_winner_rule_needs_a_gain_beyond_the_noise():
    d = tuner.TrialResult(0, {"chunk_size": 64}, 10.0, None, iqr_ms=0.4)
    assert tuner.decide(d, tuner.TrialResult(1, {"chunk_size": 32}, 9.0, None, iqr_ms=0.4))[0]  # 10% > 5%, > 0.4
    kept, why = tuner.decide(d, tuner.TrialResult(1, {"chunk_size": 32}, 9.7, None, iqr_ms=0.1))  # 3% < floor
    assert not kept and "not faster beyond the noise" in why
    assert not tuner.decide(d, tuner.TrialResult(1, {"chunk_size": 32}, 8.0, None, iqr_ms=4.0))[0]  # 2 ms < 2.2
    assert not tuner.decide(d, d)[0]
    assert tuner.decide(tuner.TrialResult(0, {"chunk_size": 64}, None, "boom"), d)[0]  # a failed default
    assert tuner.spread([1.0, 2.0, 3.0, 4.0, 5.0]) == 2.0 and tuner.spread([3.0]) == 0.0


def test_interleaved_rounds_and_a_noise_winner_is_not_declared(tmp_path, monkeypatch):
    """Timings made up (a monkeypatched clock): chunk 32 is 3% faster than the default, under the 5% floor."""
    order = []
    clock = {"t": 0.0}
    cost = {16: 0.020, 32: 0.0097, 64: 0.010}
    jitter = (1.0, 1.04, 0.98, 1.02, 1.0)

    def fake_run(layer, backend, form, config, *args, **kwargs):
        chunk = config["chunk_size"]
        clock["t"] += cost[chunk] * jitter[order.count(chunk) % len(jitter)]
        order.append(chunk)
        return torch.zeros(1)

    monkeypatch.setattr(tuner, "run_config", fake_run)
    monkeypatch.setattr(tuner.time, "perf_counter", lambda: clock["t"])
    s = TuningStore(tmp_path / "tuning.sqlite")
    result = tuner.tune(_gla(), SIZES, 1, 64, 1, torch.float32, "chunked", "torch", 10, s, "cpu", warmup=1,
                        repeat=4, check=False, mode="fwd")
    timed = order[3:]  # after one warm-up run each: 4 rounds of the 3 configs, each round rotated
    assert [sorted(timed[i:i + 3]) for i in range(0, 12, 3)] == [[16, 32, 64]] * 4
    assert len({tuple(timed[i:i + 3]) for i in range(0, 12, 3)}) > 1
    assert result.chosen is None and "not faster beyond the noise" in result.reason
    assert s.choice(*result.key, "fwd")["tuned"] is False and "default kept" in result.table()
    assert all(len(t.times_ms) == 4 and t.iqr_ms is not None for t in result.trials)


def test_fwdbwd_times_a_backward(tmp_path, monkeypatch):
    calls = []
    real = tuner.run_config

    def spy(layer, backend, form, config, *args, **kwargs):
        calls.append(torch.is_grad_enabled() and all(a.requires_grad for a in args))
        return real(layer, backend, form, config, *args, **kwargs)

    monkeypatch.setattr(tuner, "run_config", spy)
    s = TuningStore(tmp_path / "tuning.sqlite")
    result = tuner.tune(_gla(), SIZES, 1, 32, 1, torch.float32, "chunked", "torch", 5, s, "cpu", warmup=1,
                        repeat=2, mode="fwdbwd")
    assert calls[0] is False  # the reference the outputs are checked against: a forward only
    assert len(calls) > 1 and all(calls[1:]) and result.mode == "fwdbwd"
    assert {t.mode for t in s.trials()} == {"fwdbwd"} and s.choice(*result.key, "fwdbwd") is not None
    with pytest.raises(ValueError, match="mode"):
        tuner.tune(_gla(), SIZES, 1, 32, 1, store=s, device="cpu", mode="train")


def test_thread_settings_are_recorded_and_spinning_threads_warned(tmp_path, capsys, monkeypatch):
    settings = thread_settings()
    assert settings["torch_threads"] == torch.get_num_threads() and "OMP_WAIT_POLICY" in settings
    busy = dict(settings, torch_threads=2, cpu_count=2, load_average_1m=6.0, OMP_WAIT_POLICY=None)
    assert any("OMP_WAIT_POLICY" in w and "PASSIVE" in w for w in timing_warnings(busy))
    assert timing_warnings(dict(busy, OMP_WAIT_POLICY="passive")) == []
    assert timing_warnings(dict(busy, torch_threads=1)) == []
    assert any("usable cores" in w for w in timing_warnings(dict(busy, torch_threads=4, OMP_WAIT_POLICY="PASSIVE")))
    monkeypatch.setattr(tuner, "run_config", _stub)
    code, out, _ = _tune_cli(tmp_path / "t.sqlite", "--json", capsys=capsys)
    data = json.loads(out)
    assert code == 0 and data["results"][0]["threads"]["torch_threads"] == torch.get_num_threads()
    assert data["results"][0]["mode"] == "fwd"


def test_tune_help_documents_the_store_rule(capsys):
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for word in ("RECURRENCE_DSL_TUNING_STORE", "RECURRENCE_DSL_CACHE", "RECURRENCE_DSL_TUNING=0", "--mode",
                 "fwdbwd", "--lock-wait", "IQR"):
        assert word in text


def test_tune_shows_progress_and_ends_with_its_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tuner, "run_config", _stub)
    code = main(["tune", str(GLA), "--shape", TINY, "--device", "cpu", "--backend", "torch", "--warmup", "0",
                 "--repeat", "2", "--mode", "fwd", "--no-check", "--store", str(tmp_path / "t.sqlite")])
    out, err = capsys.readouterr()
    assert code == 0 and "tune gla" in err and "/6" in err  # the bar (tqdm) or the plain line: 2 x (1 + 2) runs
    lines = out.strip().splitlines()
    assert lines[0].startswith("gla (spec hash") and any(line.startswith(("chosen:", "default kept:"))
                                                         for line in lines)
    assert lines[-1].startswith("(not the store calls read by default") or "stored in" in lines[-1]
