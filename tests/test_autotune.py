"""The tuning stage (autotune/): constraint model, SQLite store, optuna search, stored-config lookup.

Everything runs on a CPU in a few seconds: the torch chunked form's chunk_size is tuned for real (small
shapes, few trials); the Triton spaces are searched with a stub runner (no kernel) or, for the recurrent
kernel, in Triton's interpreter (two trials), whose timings are stored as "cpu-interpreter". The parallel and scan
forms' spaces are checked rule by rule, and their configs are followed from the call (and from the store) to the
runtime; `recdsl tune` on rg_lru tunes the scan form auto runs, in the interpreter, posing as a GPU so that a call
reads the stored choice.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest
import torch

import recurrence_dsl
from autotune import lookup, space, store, tuner
from autotune.space import (
    SM80,
    SM90,
    SPACES,
    ChunkState,
    DeviceLimits,
    Problem,
    ScanState,
    check_config,
    config_key,
    config_space,
    limits_for_capability,
    parallel_shared_memory_bytes,
    raw_configs,
    shared_memory_bytes,
    tunable,
)
from autotune.store import TuningStore, shape_bucket
from codegen.layer import interpreting
from codegen.load import triton_available
from recurrence_dsl.analysis import analyse

from .conftest import REPO, SPECS_DIR


def _spec(name: str) -> recurrence_dsl.Recurrence:
    return recurrence_dsl.load(SPECS_DIR / f"{name}.rec")[name]


def _problem(name: str, sizes: dict[str, int], length: int) -> Problem:
    return Problem.from_analysis(analyse(_spec(name).checked), sizes, length)


def _chunked(bt, bk, bv, nw, ns) -> dict:
    return {"chunk_size": bt, "block_k": bk, "block_v": bv, "num_warps": nw, "num_stages": ns}


def _parallel(bt, bk, bv, nw, ns) -> dict:
    return {"block_t": bt, "block_k": bk, "block_v": bv, "num_warps": nw, "num_stages": ns}


def _scan(bt, bn, nw) -> dict:
    return {"block_t": bt, "block_n": bn, "num_warps": nw}


# -- the constraint model -------------------------------------------------------------------------------------


def test_problem_reads_the_chunked_states():
    p = _problem("normalized_linear_attention", {"K": 64, "V": 32}, 100)
    assert p.chunk_states == (ChunkState("S", 64, 32, False), ChunkState("z", 64, 1, False))
    assert p.state_elements == 64 * 32 + 64
    assert _problem("delta_net", {"K": 128, "V": 64}, 64).chunk_states == (ChunkState("S", 128, 64, True),)
    assert _problem("mamba", {"D": 8, "N": 4}, 64).chunk_states == ()


def test_chunked_triton_space_prunes_with_reasons_and_keeps_legal_configs():
    problem = _problem("gla", {"K": 64, "V": 64}, 2048)
    sp = config_space("chunked", "triton", problem, SM80)
    assert len(sp.configs) + len(sp.pruned) == len(raw_configs("chunked", "triton")) == 3 * 4 * 4 * 3 * 3
    assert sp.configs and sp.pruned
    for p in sp.pruned:  # every prune says why, and the same rules say so again
        assert p.reason and check_config(p.config, "chunked", "triton", problem, SM80) == p.reason
    for c in sp.configs:
        assert check_config(c, "chunked", "triton", problem, SM80) is None
        assert shared_memory_bytes(c) <= SM80.smem_bytes
        assert c["block_k"] * c["block_v"] <= 128 * 32 * c["num_warps"]
        assert c["block_k"] <= 64 and c["block_v"] <= 64
    # one config that breaks every kind of rule, and one that breaks none
    reason = sp.reason(_chunked(64, 128, 128, 2, 3))
    for word in ("padding: block_k 128 > padded K 64", "padding: block_v 128", "shared memory", "432 KiB > 163 KiB",
                 "registers: the 128x128 state tile is 256 float32 per thread"):
        assert word in reason
    assert sp.reason(_chunked(64, 64, 64, 4, 2)) is None
    assert sp.default == _chunked(64, 64, 64, 4, 2) and sp.default in sp.configs


def test_shared_memory_limit_depends_on_the_device():
    problem = _problem("gla", {"K": 64, "V": 64}, 2048)
    config = _chunked(64, 64, 64, 4, 3)  # (4 * 64 * 64) * 4 B * 3 stages = 192 KiB
    assert shared_memory_bytes(config) == 192 * 1024
    assert check_config(config, "chunked", "triton", problem, SM90) is None
    assert "shared memory" in check_config(config, "chunked", "triton", problem, SM80)
    assert limits_for_capability(9, 0).smem_bytes == 227 * 1024
    assert limits_for_capability(10, 0).smem_bytes == 227 * 1024
    assert limits_for_capability(8, 0).smem_bytes == 163 * 1024
    assert limits_for_capability(8, 6).smem_bytes == limits_for_capability(7, 5).smem_bytes == 99 * 1024
    assert space.device_limits("cpu").smem_bytes == 227 * 1024  # the interpreter keeps configs GPU-legal for sm90


def test_padding_and_delta_rules():
    small = config_space("chunked", "triton", _problem("gla", {"K": 8, "V": 8}, 64), SM90)
    assert {(c["block_k"], c["block_v"]) for c in small.configs} == {(16, 16)}  # K < 16 pads to 16: BK = 16 legal
    assert "padded K 16" in small.reason(_chunked(16, 32, 16, 2, 1))
    delta = config_space("chunked", "triton", _problem("delta_net", {"K": 128, "V": 64}, 512), SM90)
    assert delta.configs and all(c["block_k"] == 128 for c in delta.configs)
    assert "delta rule: state S needs block_k >= K = 128" in delta.reason(_chunked(32, 64, 32, 4, 1))
    assert delta.default["block_k"] == 128 and delta.default in delta.configs
    # several chunked states share one config: the widest state decides (z has V = 1, S has V = 64)
    nla = config_space("chunked", "triton", _problem("normalized_linear_attention", {"K": 32, "V": 64}, 256), SM90)
    assert max(c["block_v"] for c in nla.configs) == 64


def test_chunk_sizes_above_the_padded_length_are_redundant():
    torch_space = config_space("chunked", "torch", _problem("gla", {"K": 16, "V": 16}, 100), SM90)
    assert [c["chunk_size"] for c in torch_space.configs] == [16, 32, 64, 128]
    assert "redundant: chunk_size 256 > padded T 128" in torch_space.reason({"chunk_size": 256})
    triton_space = config_space("chunked", "triton", _problem("gla", {"K": 16, "V": 16}, 20), SM90)
    assert {c["chunk_size"] for c in triton_space.configs} == {16, 32}
    assert triton_space.default["chunk_size"] == 32  # the default, clamped as the runtime would run it
    assert config_space("chunked", "torch", _problem("gla", {"K": 16, "V": 16}, 4096), SM90).pruned == []


def test_recurrent_space_prunes_idle_warps_and_keeps_the_least_spilling():
    tiny = config_space("recurrent", "triton", _problem("indrnn", {"D": 16}, 64), SM90)
    assert tiny.configs == [{"num_warps": 1}]
    assert "idle warps: 64 threads at num_warps=2 for 16 state elements" in tiny.reason({"num_warps": 2})
    huge = config_space("recurrent", "triton", _problem("gla", {"K": 256, "V": 256}, 64), SM90)
    assert huge.configs == [{"num_warps": 8}] and huge.notes  # every num_warps spills: 8 spills least
    assert "registers" in huge.reason({"num_warps": 4})
    mid = config_space("recurrent", "triton", _problem("gla", {"K": 64, "V": 64}, 64), SM90)
    assert mid.configs == [{"num_warps": w} for w in (1, 2, 4, 8)] and not mid.notes


def test_check_config_rejects_configs_outside_the_space():
    problem = _problem("gla", {"K": 64, "V": 64}, 256)
    assert "bad config" in check_config({"chunk_size": 48}, "chunked", "torch", problem)
    assert "bad config" in check_config({"chunk_size": 64, "block_k": 64}, "chunked", "torch", problem)
    with pytest.raises(ValueError, match="nothing to tune"):
        config_space("scan", "torch", problem)


# -- the store ------------------------------------------------------------------------------------------------

KEY = ("abc123", "NVIDIA H100 80GB HBM3", "bfloat16", "BH=8,T=1024,K=64,V=64", "chunked", "triton")


def test_shape_buckets():
    assert shape_bucket(2, 3, 100, {"V": 64, "K": 32}) == "BH=8,T=128,K=32,V=64"  # sizes sorted, exact
    assert shape_bucket(1, 5, 128, {"K": 7}) == "BH=4,T=128,K=7"
    assert shape_bucket(3, 4, 129, {}) == "BH=16,T=256"
    assert shape_bucket(1, 1, 1, {"D": 3}) == "BH=1,T=1,D=3"
    assert shape_bucket(4, 8, 2048, {"K": 64}) == shape_bucket(4, 8, 1025, {"K": 64}) == "BH=32,T=2048,K=64"
    assert store.parse_bucket("BH=8,T=128,K=32") == {"BH": 8, "T": 128, "K": 32}


def test_store_roundtrip_best_and_errors(tmp_path):
    s = TuningStore(tmp_path / "sub" / "tuning.sqlite", create_folders=True)
    assert s.best(*KEY) is None
    s.record(*KEY, {"chunk_size": 64, "block_k": 64}, 2.5, study="s1")
    fastest = s.record(*KEY, {"chunk_size": 32, "block_k": 64}, 1.25, study="s1")
    s.record(*KEY, {"chunk_size": 16, "block_k": 16}, error="OutOfResources: shared memory", study="s1")
    s.record(*KEY[:2], "float16", *KEY[3:], {"chunk_size": 16, "block_k": 16}, 0.5)  # another dtype
    assert s.best(*KEY) == {"block_k": 64, "chunk_size": 32}
    best = s.best_trial(*KEY)
    assert best.id == fastest and best.median_ms == 1.25 and best.error is None and best.ok
    assert s.best(KEY[0], KEY[1], torch.float16, *KEY[3:]) == {"chunk_size": 16, "block_k": 16}
    assert s.best(KEY[0], "cpu-interpreter", *KEY[2:]) is None
    rows = s.trials(study="s1")
    assert len(rows) == 3 and s.count() == 4
    failed = rows[2]
    assert failed.median_ms is None and failed.error.startswith("OutOfResources") and not failed.ok
    for row in rows:
        assert (row.spec_hash, row.device, row.dtype, row.bucket, row.form, row.backend) == KEY
        assert row.created.endswith("Z") and row.versions["python"] and "torch" in row.versions
    with pytest.raises(ValueError, match="either"):
        s.record(*KEY, {"chunk_size": 16}, 1.0, error="both")
    with pytest.raises(ValueError, match="either"):
        s.record(*KEY, {"chunk_size": 16})
    with pytest.raises(ValueError, match="finite"):
        s.record(*KEY, {"chunk_size": 16}, float("nan"))
    with sqlite3.connect(s.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert s.integrity_check() == "ok"


def test_default_store_path(monkeypatch, tmp_path):
    monkeypatch.setenv("RECURRENCE_DSL_CACHE", str(tmp_path))
    assert store.default_path() == tmp_path / "tuning.sqlite"
    assert TuningStore().path == tmp_path / "tuning.sqlite"
    monkeypatch.delenv("RECURRENCE_DSL_CACHE")
    assert store.default_path() == store.Path.home() / ".cache" / "recurrence_dsl" / "tuning.sqlite"


_WRITER = textwrap.dedent("""
    import sys, time
    from autotune.store import TuningStore
    path, tag, n, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    while time.time() < start:
        time.sleep(0.001)
    s = TuningStore(path)
    for i in range(n):
        s.record("h", "dev", "float32", "BH=1,T=16", "chunked", "torch", {"chunk_size": 16, "i": i},
                 float(i) + (0.5 if tag == "a" else 0.25), study=tag)
    print("done")
""")


def test_concurrent_writers_from_two_processes(tmp_path):
    import time

    path = tmp_path / "shared.sqlite"  # fresh: both processes also race to create the schema
    n = 150
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.time() + 1.0
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), tag, str(n), str(start)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for tag in "ab"]
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert out.strip() == "done"
    s = TuningStore(path)
    assert s.integrity_check() == "ok"
    assert s.count() == 2 * n
    for tag, offset in (("a", 0.5), ("b", 0.25)):
        rows = s.trials(study=tag)
        assert sorted(r.config["i"] for r in rows) == list(range(n))
        assert all(r.median_ms == r.config["i"] + offset for r in rows)
    assert len({r.id for r in s.trials()}) == 2 * n
    assert s.best("h", "dev", "float32", "BH=1,T=16", "chunked", "torch") == {"chunk_size": 16, "i": 0}


_CREATOR = textwrap.dedent("""
    import sys, time
    from autotune.store import TuningStore
    path, tag, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
    while time.time() < start:
        pass  # spin, not sleep: the processes must reach the fresh file as close together as possible
    s = TuningStore(path)
    for i in range(3):
        s.record("h", "dev", "float32", "b", "chunked", "torch", {"i": i}, 1.0, study=tag)
""")


def test_many_processes_racing_to_create_a_fresh_store(tmp_path):
    # Switching a new file to WAL while others create it makes SQLite answer "database is locked" without
    # waiting; the store must back off and retry instead of failing (this once failed CI).
    import time

    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for round_ in range(4):
        path = tmp_path / f"race{round_}.sqlite"
        start = time.time() + 0.5
        procs = [subprocess.Popen([sys.executable, "-c", _CREATOR, str(path), str(k), str(start)], env=env,
                                  stderr=subprocess.PIPE, text=True) for k in range(6)]
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
        s = TuningStore(path)
        assert s.integrity_check() == "ok"
        assert s.count() == 6 * 3


def test_store_setup_retries_when_sqlite_refuses_to_wait(tmp_path, monkeypatch):
    # The race above is timing-dependent; this pins the behaviour it needs: a "locked" answer during setup
    # is retried, any other error is not.
    real = TuningStore._create_schema
    refusals = []

    def refuse_twice(conn):
        if len(refusals) < 2:
            refusals.append(1)
            raise store.sqlite3.OperationalError("database is locked")
        real(conn)

    monkeypatch.setattr(TuningStore, "_create_schema", staticmethod(refuse_twice))
    s = TuningStore(tmp_path / "t.sqlite")
    s.record("h", "dev", "float32", "b", "chunked", "torch", {"i": 0}, 1.0)
    assert len(refusals) == 2 and s.count() == 1

    def broken(conn):
        refusals.append(1)
        raise store.sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(TuningStore, "_create_schema", staticmethod(broken))
    with pytest.raises(store.sqlite3.OperationalError, match="disk I/O"):
        TuningStore(tmp_path / "u.sqlite").record("h", "dev", "float32", "b", "chunked", "torch", {"i": 0}, 1.0)
    assert len(refusals) == 3  # tried once, not retried


def test_every_space_offers_exactly_the_keys_its_form_takes():
    from codegen.layer import CONFIG_KEYS

    for (form, backend), axes in SPACES.items():
        assert set(axes) == set(CONFIG_KEYS[(form, backend)]), (form, backend)
    assert tunable("parallel", "triton") and not tunable("parallel", "torch")


def test_parallel_triton_space_prunes_with_reasons_and_defaults_as_the_runtime():
    problem = _problem("retention", {"K": 64, "V": 64}, 64)  # a scalar decay
    assert not problem.lane_decay
    sp = config_space("parallel", "triton", problem, SM80)
    assert len(sp.configs) + len(sp.pruned) == len(raw_configs("parallel", "triton")) == 4 * 4 * 4 * 3 * 3
    for p in sp.pruned:
        assert p.reason and check_config(p.config, "parallel", "triton", problem, SM80) == p.reason
    for c in sp.configs:
        assert check_config(c, "parallel", "triton", problem, SM80) is None
        assert c["block_t"] <= 64 and c["block_k"] <= 64 and c["block_v"] <= 64
        assert parallel_shared_memory_bytes(c) <= SM80.smem_bytes
    # codegen/triton_parallel.py's defaults: 64 rows and lanes for a scalar decay, the config an untuned call runs
    assert sp.default == _parallel(64, 64, 64, 4, 2) and sp.default in sp.configs
    reason = sp.reason(_parallel(128, 128, 16, 2, 3))
    for words in ("redundant: block_t 128 > padded T 64 runs BT = 64", "padding: block_k 128 > padded K 64",
                  "shared memory", "> 163 KiB", "registers: the attention kernel's 128x128 accumulator"):
        assert words in reason, reason
    # (2*64*64 + 64*64 + 64*64) * 4 B * 3 stages: 192 KiB, within sm90's 227, not sm80's 163
    assert parallel_shared_memory_bytes(_parallel(64, 64, 64, 4, 3)) == 192 * 1024
    assert check_config(_parallel(64, 64, 64, 4, 3), "parallel", "triton", problem, SM90) is None
    assert "shared memory" in sp.reason(_parallel(64, 64, 64, 4, 3))
    # the backward's dq and dk contract V: a wide block_v counts twice there
    assert parallel_shared_memory_bytes(_parallel(16, 16, 128, 4, 1)) == (2 * 16 * 128 + 16 * 16 + 16 * 16) * 4
    # a short call: block_t above pow2(T) is the same run (the default clamped to it, as `_parallel_config` runs)
    short = config_space("parallel", "triton", _problem("retention", {"K": 16, "V": 16}, 20), SM90)
    assert {c["block_t"] for c in short.configs} == {16, 32} and short.default == _parallel(32, 16, 16, 4, 2)
    assert {(c["block_k"], c["block_v"]) for c in short.configs} == {(16, 16)}
    # only the exact rules without the estimate (the compiler's figures decide the rest)
    exact = config_space("parallel", "triton", problem, SM80, estimate=False)
    assert set(sp.keys()) < set(exact.keys()) and len(exact.configs) == 3 * 3 * 3 * 3 * 3


def test_parallel_space_of_a_key_decay():
    gla = _problem("gla", {"K": 64, "V": 64}, 64)
    assert gla.lane_decay and gla.chunk_states == (ChunkState("S", 64, 64, False, True),)
    assert _problem("min_gru", {"D": 16}, 64).lane_decay  # a value decay
    sp = config_space("parallel", "triton", gla, SM90)
    assert sp.default == _parallel(32, 32, 32, 4, 2) and sp.default in sp.configs  # `_PARALLEL_KEY_BLOCK`
    # the float64 G tiles count: a config the scalar decay keeps spills with a key decay
    config = _parallel(64, 64, 64, 4, 1)
    assert check_config(config, "parallel", "triton", _problem("retention", {"K": 64, "V": 64}, 64)) is None
    assert "float64 G tiles" in sp.reason(config)
    assert len(sp.configs) < len(config_space("parallel", "triton", _problem("retention", {"K": 64, "V": 64}, 64),
                                              SM90).configs)


def test_scan_triton_space_prunes_with_reasons_and_defaults_as_the_runtime():
    problem = Problem.from_analysis(analyse(_spec("rg_lru").checked), {"D": 16}, 64, heads=2)
    assert problem.scan_states == (ScanState("h", 32),)  # N = H * D lanes a row, the scan kernels' grid
    assert _problem("gla", {"K": 16, "V": 16}, 64).scan_states == (ScanState("S", 256),)
    assert _problem("delta_net", {"K": 16, "V": 16}, 64).scan_states == ()  # no scan form
    sp = config_space("scan", "triton", problem, SM90)
    assert len(sp.configs) + len(sp.pruned) == len(raw_configs("scan", "triton")) == 5 * 6 * 4
    for p in sp.pruned:
        assert p.reason and check_config(p.config, "scan", "triton", problem, SM90) == p.reason
    # codegen/triton_scan.py's defaults, what an untuned call runs: kept though block_n 64 > the 32 lanes
    assert sp.default == _scan(32, 64, 4) and sp.default in sp.configs
    assert "redundant: block_t 128 > padded T 64: one chunk of 64 steps" in sp.reason(_scan(128, 32, 4))
    assert sp.reason(_scan(64, 32, 4)) is None
    assert "redundant: block_n 128 > padded lanes 32 (N = 32)" in sp.reason(_scan(32, 128, 4))
    assert {c["block_n"] for c in sp.configs} == {8, 16, 32, 64}
    assert "idle warps: 256 threads at num_warps=8 for a 8x16 tile" in sp.reason(_scan(8, 16, 8))
    assert sp.reason(_scan(8, 16, 4)) is None  # 128 elements over 128 threads
    short = config_space("scan", "triton", Problem(16, scan_states=(ScanState("h", 16),)), SM90)
    assert short.default == _scan(32, 64, 4) and short.default in short.configs  # (the runtime does not clamp)
    assert {c["block_t"] for c in short.configs} == {8, 16, 32}
    # registers (the estimate): the diagonal scan's 4 tiles of 32 x 64 over one warp are 256 float32 a thread
    wide = _problem("rg_lru", {"D": 256}, 4096)
    reason = check_config(_scan(32, 64, 1), "scan", "triton", wide)
    assert "registers: the diagonal scan's 4 tiles of 32x64" in reason and "256 float32 per thread" in reason
    assert check_config(_scan(32, 64, 1), "scan", "triton", wide, estimate=False) is None
    assert check_config(_scan(32, 64, 4), "scan", "triton", wide) is None
    # a 2 x 2 block scan (a cascade of two decays) narrows BN: 32 by default, and at 64 its 10 tiles spill (its
    # backward reached 255 registers, codegen/triton_scan.py `_scan_config`)
    cascade = recurrence_dsl.load(REPO / "tests" / "data" / "coupled.rec")["cascade"]
    blocks = Problem.from_analysis(analyse(cascade.checked), {"D": 64}, 1024)
    assert blocks.scan_states == (ScanState("h1+h2", 64, 2),)
    block_space = config_space("scan", "triton", blocks, SM90)
    assert block_space.default == _scan(32, 32, 4) and block_space.default in block_space.configs
    assert "the 2x2 block scan's 10 tiles of 32x64" in block_space.reason(_scan(32, 64, 4))
    # the constants autotune/space.py repeats are the runtime's (`_scan_config` with nothing given)
    if triton_available():
        from codegen import triton_scan

        for m in (1, 2, 3, 4):
            p = Problem(1024, scan_states=(ScanState("h", 64, m),))
            assert triton_scan._scan_config(None, None, None, m) == tuple(space.default_config("scan", "triton", p)
                                                                          .values()), m
        assert triton_scan._SCAN_BT_VJP <= space.SCAN_BLOCK_T  # the default's fused backward is the untuned one's


def test_the_scan_default_runs_as_an_untuned_call_and_a_stored_config_reaches_the_runtime(tmp_path, monkeypatch):
    """The scan's default config runs exactly what an untuned call runs, forward and backward (a fused backward runs
    min(block_t, 8) steps a chunk), and a config given to a call or stored for its key is what `fused_scan` gets."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and not interpreting():
        pytest.skip("Triton on a CPU needs TRITON_INTERPRET=1 (conftest sets it)")
    rg = _spec("rg_lru")
    sizes = {"D": 16}
    layer = recurrence_dsl.compile(rg, backend="triton", tuning=False)
    module = sys.modules[type(layer).__module__]
    seen = []

    class Spy(module._triton_FusedPlan):
        def __init__(self, *args):
            super().__init__(*args)
            seen.append((self.config, self.vjp_block_t))

    monkeypatch.setattr(module, "_triton_FusedPlan", Spy)
    args, _ = recurrence_dsl.sampling.sample_arguments(rg.checked, sizes, 1, 32, 2)
    args = [a.detach().requires_grad_() for a in args]

    def step(**kwargs):
        layer(*args, **kwargs)[0].sum().backward()
        return seen[-1]

    default = config_space("scan", "triton", Problem.from_analysis(analyse(rg.checked), sizes, 32, heads=2)).default
    assert step() == step(form="scan", config=default) == ((32, 64, 4), 8)  # auto runs the scan (vector state)
    assert step(form="scan", config=_scan(64, 16, 2)) == ((64, 16, 2), 8)
    assert step(form="scan", config={"block_t": 4}) == ((4, 64, 4), 4)
    # the store's choice for the key a training step of this shape reads (the interpreter's timings are never
    # looked up: the call poses as a GPU)
    monkeypatch.setattr(module, "tuning_device_name", lambda device, backend: "a GPU (test)")
    s = TuningStore(tmp_path / "tuning.sqlite")
    s.choose(rg.spec_hash, "a GPU (test)", "float32", shape_bucket(1, 2, 32, sizes), "scan", "triton", "fwdbwd",
             _scan(16, 16, 2), True, "test")
    lookup.clear_cache()
    stored = recurrence_dsl.compile(rg, backend="triton", tuning=s)
    chosen = stored.config_for(*args)
    assert (chosen["form"], chosen["source"], chosen["config"]) == ("scan", "store", _scan(16, 16, 2))
    stored(*args)[0].sum().backward()
    assert seen[-1] == ((16, 16, 2), 8)


def test_a_parallel_config_reaches_the_parallel_runtime(tmp_path, monkeypatch):
    """A config for (parallel, triton), given to the call or chosen in the store, is what `parallel_linear_by` gets:
    through `Layer._plan`, `run_forms`' options and `in_parallel`'s block_t."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and not interpreting():
        pytest.skip("Triton on a CPU needs TRITON_INTERPRET=1 (conftest sets it)")
    gla = _spec("gla")
    layer = recurrence_dsl.compile(gla, backend="triton", tuning=False)
    module = sys.modules[type(layer).__module__]
    seen = []
    original = module.triton_parallel_linear_by

    def spy(*args, **kwargs):
        seen.append({k: kwargs[k] for k in ("block_t", "block_k", "block_v", "num_warps", "num_stages")})
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "triton_parallel_linear_by", spy)
    args, init = recurrence_dsl.sampling.sample_arguments(gla.checked, GLA_SIZES, 1, 32, 2, with_initial_state=True)
    ref = gla.reference(*args, initial_state=init)[0]
    args = [a.float() for a in args]
    config = _parallel(16, 16, 16, 2, 1)
    out = layer(*args, initial_state=init.float(), form="parallel", config=config)[0]
    assert seen == [config] and ((out.double() - ref).norm() / ref.norm()).item() < 1e-5
    layer(*args, form="parallel")
    assert seen[-1] == dict.fromkeys(config)  # untuned: the runtime's own defaults
    with pytest.raises(recurrence_dsl.CallError, match="parallel takes"):
        layer(*args, form="parallel", config=_chunked(16, 16, 16, 2, 1))
    # the store's choice for the key a forward call of T = 32 reads (auto picks parallel: 16 < 32 <= 64); the
    # interpreter's timings are never looked up, so the call here poses as a GPU
    monkeypatch.setattr(module, "tuning_device_name", lambda device, backend: "a GPU (test)")
    s = TuningStore(tmp_path / "tuning.sqlite")
    s.choose(gla.spec_hash, "a GPU (test)", "float32", shape_bucket(1, 2, 32, GLA_SIZES), "parallel", "triton",
             "fwd", config, True, "test")
    lookup.clear_cache()
    stored = recurrence_dsl.compile(gla, backend="triton", tuning=s)
    chosen = stored.config_for(*args)
    assert (chosen["form"], chosen["source"], chosen["config"]) == ("parallel", "store", config)
    seen.clear()
    with torch.no_grad():
        assert torch.equal(stored(*args, initial_state=init.float())[0], out)
    assert seen == [config]


# -- the tuner ------------------------------------------------------------------------------------------------

GLA_SIZES = {"K": 16, "V": 16}


def test_tune_torch_chunked_on_cpu(tmp_path):
    gla = _spec("gla")
    s = TuningStore(tmp_path / "tuning.sqlite")
    result = tuner.tune(gla, GLA_SIZES, 1, 256, 2, torch.float32, "chunked", "torch", 4, s, "cpu",
                        warmup=1, repeat=3, mode="fwd")
    # 5 chunk sizes > 4 trials: 4 screened by optuna, then the 3 fastest and the default timed interleaved
    assert len(result.trials) == 4 and result.mode == "fwd"
    rows = s.trials(study=result.study)
    assert len(rows) == 4 == s.count()
    assert {config_key(r.config) for r in rows} == {config_key(t.config) for t in result.trials}  # distinct
    assert all(r.ok and r.median_ms > 0 and r.mode == "fwd" and r.iqr_ms >= 0 for r in rows)
    assert rows[0].config == {"chunk_size": 64}  # the default is timed first: the baseline
    assert result.best["chunk_size"] in SPACES[("chunked", "torch")]["chunk_size"]
    assert result.key == (gla.spec_hash, lookup.device_name("cpu", "torch"), "float32", "BH=2,T=256,K=16,V=16",
                          "chunked", "torch")
    assert result.best_ms == min(t.median_ms for t in result.trials if t.final)
    assert all(len(t.times_ms) == 3 for t in result.trials)
    assert all(t.rel_error is not None and t.rel_error < 1e-4 for t in result.trials)
    table = result.table()
    assert ("chosen: chunk_size=" in table) != ("default kept: chunk_size=64" in table)
    assert "(default)" in table and "IQR ms" in table and "threads: torch" in table
    choice = s.choice(*result.key, "fwd")
    assert choice["tuned"] == (result.chosen is not None) and choice["config"] == result.best
    assert choice["reason"] == result.reason and rows[0].versions["threads"]["torch_threads"] >= 1
    # the choice is what a compiled layer reads for a forward call of this bucket (T = 200 rounds up to 256)
    args, _ = recurrence_dsl.sampling.sample_arguments(gla.checked, GLA_SIZES, 1, 200, 2)
    expected = result.chosen  # None when the default was kept
    assert lookup.tuned_config(gla, "cpu", torch.float32, 1, 2, 200, GLA_SIZES, "chunked", "torch", s) == expected
    assert lookup.tuned_config(gla, "cpu", torch.float32, 1, 2, 200, GLA_SIZES, "chunked", "torch", s,
                               mode="fwdbwd") is None  # a forward timing is never used for training
    assert lookup.tuned_config(gla, "cpu", torch.float32, 1, 2, 512, GLA_SIZES, "chunked", "torch", s) is None
    assert lookup.tuned_config(gla, "cpu", torch.float64, 1, 2, 200, GLA_SIZES, "chunked", "torch", s) is None
    layer = recurrence_dsl.compile(gla, backend="torch", form="chunked")
    from autotune.runner import run_config

    tuned = run_config(layer, "torch", "chunked", result.best, *args)[0]
    plain = layer(*args, chunk_size=result.best["chunk_size"])[0]
    assert torch.equal(tuned, plain)


def test_tune_is_exhaustive_on_a_small_space_and_never_times_a_pruned_config(tmp_path):
    gla = _spec("gla")
    s = TuningStore(tmp_path / "tuning.sqlite")
    # T = 100: chunk_size 256 is pruned (redundant); 10 trials asked, 4 legal configs: each timed once
    result = tuner.tune(gla, GLA_SIZES, 1, 100, 1, torch.float32, "chunked", "torch", 10, s, "cpu",
                        warmup=0, repeat=1, check=False)
    assert sorted(t.config["chunk_size"] for t in result.trials) == [16, 32, 64, 128]
    assert all(t.final for t in result.trials)  # all timed interleaved, none screened
    assert s.count() == 4 and result.mode == "fwdbwd"  # tune()'s default: what training runs


def _stub_runner(seen: list, fail=lambda c: False):
    def run(layer, backend, form, config, *args, **kwargs):
        seen.append(dict(config))
        if fail(config):
            raise RuntimeError(f"out of resources: stub refuses block_k={config['block_k']}")
        return torch.zeros(1) + sum(config.values())

    return run


def test_optuna_never_proposes_a_pruned_config_and_failures_are_recorded(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and not interpreting():
        pytest.skip("Triton on a CPU needs TRITON_INTERPRET=1 (conftest sets it)")
    seen: list[dict] = []
    monkeypatch.setattr(tuner, "run_config", _stub_runner(seen, fail=lambda c: c["block_k"] == 16))
    s = TuningStore(tmp_path / "tuning.sqlite")
    sizes = {"K": 64, "V": 32}
    limits = SM80
    result = tuner.tune(_spec("gla"), sizes, 2, 512, 2, torch.float16, "chunked", "triton", 30, s, "cpu",
                        warmup=1, repeat=2, check=False, limits=limits, mode="fwd",
                        compiler=False)  # the hand estimate prunes here (tests/test_tuner_compiler.py: the compiler)
    sp = config_space("chunked", "triton", _problem("gla", sizes, 512), limits)
    kept, pruned = set(sp.keys()), {config_key(p.config) for p in sp.pruned}
    assert len(pruned) > 200 and len(kept) > 30
    assert seen and all(config_key(c) in kept and config_key(c) not in pruned for c in seen)
    assert len(result.trials) == 30 == s.count()
    assert len({config_key(t.config) for t in result.trials}) == 30
    failed = [t for t in result.trials if not t.ok]
    assert failed and all(t.config["block_k"] == 16 and "out of resources" in t.error for t in failed)
    rows = s.trials(study=result.study)
    assert sum(r.error is not None for r in rows) == len(failed)
    assert all(r.device == "cpu-interpreter" and r.dtype == "float16" for r in rows)
    assert result.best["block_k"] != 16
    assert sum(t.final for t in result.trials) == 4  # the 3 fastest screened configs and the default
    # interpreter timings are never handed to a layer (nor stored under a GPU's name)
    assert lookup.tuned_config(_spec("gla"), "cpu", torch.float16, 2, 2, 512, sizes, "chunked", "triton", s) is None
    assert s.best(result.key[0], "NVIDIA H100 80GB HBM3", *result.key[2:]) is None


def test_tune_triton_recurrent_in_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    if torch.cuda.is_available() or not interpreting():
        pytest.skip("checks the CPU interpreter path")
    s = TuningStore(tmp_path / "tuning.sqlite")
    result = tuner.tune(_spec("gla"), GLA_SIZES, 1, 16, 1, torch.float32, "recurrent", "triton", 2, s, "cpu",
                        warmup=1, repeat=1, compiler=False)
    assert [t.config for t in result.trials][0] == {"num_warps": 4} and len(result.trials) == 2
    assert all(t.ok and t.rel_error < 1e-4 for t in result.trials), result.table()
    assert {r.device for r in s.trials()} == {"cpu-interpreter"} and s.count() == 2


def test_tune_rejects_bad_requests(tmp_path):
    s = TuningStore(tmp_path / "tuning.sqlite")
    gla = _spec("gla")
    with pytest.raises(ValueError, match="trials"):
        tuner.tune(gla, GLA_SIZES, 1, 64, 1, trials=0, store=s, device="cpu")
    with pytest.raises(ValueError, match="needs K"):
        tuner.tune(gla, {"V": 16}, 1, 64, 1, store=s, device="cpu")
    with pytest.raises(ValueError, match="no 'chunked' form"):
        tuner.tune(_spec("mamba"), {"D": 4, "N": 4}, 1, 64, 1, trials=1, store=s, device="cpu")
    with pytest.raises(ValueError, match="nothing to tune"):
        tuner.tune(gla, GLA_SIZES, 1, 64, 1, form="recurrent", backend="torch", trials=1, store=s, device="cpu")
    if triton_available() and interpreting():
        with pytest.raises(tuner.NoLegalConfig, match="no chunked/triton config fits"):
            tuner.tune(gla, GLA_SIZES, 1, 64, 1, form="chunked", backend="triton", trials=1, store=s,
                       device="cpu", limits=DeviceLimits("tiny", 1024), compiler=False)
    assert s.count() == 0


def test_failing_trials_do_not_stop_the_search(tmp_path, monkeypatch):
    seen: list[dict] = []

    def flaky(layer, backend, form, config, *args, **kwargs):
        seen.append(config)
        if config["chunk_size"] == 32:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (stub)")
        return torch.ones(1)

    monkeypatch.setattr(tuner, "run_config", flaky)
    s = TuningStore(tmp_path / "tuning.sqlite")
    result = tuner.tune(_spec("gla"), GLA_SIZES, 1, 256, 1, torch.float32, "chunked", "torch", 5, s, "cpu",
                        warmup=1, repeat=1, check=False, mode="fwd")
    assert len(result.trials) == 5 == s.count()
    errors = [r for r in s.trials() if r.error]
    assert [r.config for r in errors] == [{"chunk_size": 32}] and "OutOfMemoryError" in errors[0].error
    assert result.best["chunk_size"] != 32 and "failed" in result.table()


def test_lookup_never_creates_a_store_and_can_be_switched_off(tmp_path, monkeypatch):
    missing = tmp_path / "none" / "tuning.sqlite"
    gla = _spec("gla")
    assert lookup.tuned_config(gla, "cpu", torch.float32, 1, 1, 64, GLA_SIZES, "chunked", "torch", missing) is None
    assert not missing.parent.exists()
    s = TuningStore(tmp_path / "tuning.sqlite")
    bucket = shape_bucket(1, 1, 64, GLA_SIZES)
    name = lookup.device_name("cpu", "torch")
    s.choose(gla.spec_hash, name, "float32", bucket, "chunked", "torch", "fwd", {"chunk_size": 32}, True, "test")
    s.choose(gla.spec_hash, name, "float16", bucket, "chunked", "torch", "fwd", {"chunk_size": 48}, True,
             "not in the space")
    lookup.clear_cache()
    assert lookup.tuned_config(gla, "cpu", torch.float32, 1, 1, 64, GLA_SIZES, "chunked", "torch", s) == \
        {"chunk_size": 32}
    assert lookup.tuned_config(gla, "cpu", torch.float16, 1, 1, 64, GLA_SIZES, "chunked", "torch", s) is None
    assert lookup.tuned_config(gla, "cpu", torch.float32, 1, 1, 64, GLA_SIZES, "chunked", "torch", False) is None
    monkeypatch.setenv("RECURRENCE_DSL_CACHE", str(tmp_path))  # the default store is now s
    monkeypatch.setenv("RECURRENCE_DSL_TUNING", "1")
    lookup.clear_cache()
    assert lookup.tuned_config(gla, "cpu", torch.float32, 1, 1, 64, GLA_SIZES, "chunked", "torch") == \
        {"chunk_size": 32}
    monkeypatch.setenv("RECURRENCE_DSL_TUNING", "0")  # off for the default store, an explicit one still reads
    lookup.clear_cache()
    assert lookup.tuned_config(gla, "cpu", torch.float32, 1, 1, 64, GLA_SIZES, "chunked", "torch") is None
    assert lookup.tuned_config(gla, "cpu", torch.float32, 1, 1, 64, GLA_SIZES, "chunked", "torch", s) == \
        {"chunk_size": 32}


def test_measure_on_cpu():
    calls = []
    times, first = tuner.measure(lambda: calls.append(1) or len(calls), torch.device("cpu"), warmup=2, repeat=3)
    assert len(times) == 3 and all(t >= 0 for t in times) and first == 1 and len(calls) == 5


def test_tune_command(tmp_path, capsys):
    from recurrence_dsl.cli import main

    path = tmp_path / "cli.sqlite"
    rc = main(["tune", str(SPECS_DIR / "gla.rec"), "--shape", "B=1,T=64,H=1,K=16,V=16", "--trials", "2",
               "--device", "cpu", "--backend", "torch", "--store", str(path), "--warmup", "0", "--repeat", "1"])
    out, err = capsys.readouterr()
    assert rc == 0 and ("chosen: chunk_size=" in out or "default kept: chunk_size=64" in out) and str(path) in out
    assert TuningStore(path).count() == 2
    # at T=64 auto runs the torch parallel form (no config): tune says that the chunked config it tunes is not it
    assert ("note: at this shape auto runs the torch parallel form, which takes no config; this tuned the chunked "
            "form instead, whose config a call of this shape reads with form='chunked'") in out, err
    assert main(["tune", str(SPECS_DIR / "gla.rec"), "--shape", "Q=3", "--store", str(path)]) == 2


def test_tune_command_tunes_the_scan_auto_runs_and_the_call_reads_the_choice(tmp_path, capsys, monkeypatch):
    """`recdsl tune` without --form on rg_lru tunes the Triton scan form (what form="auto" runs for its vector
    state), shows each config in its table, and a later call of that shape reads the stored choice: the chosen
    config, or with the default kept, the runtime's defaults (the default config)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available() or not interpreting():
        pytest.skip("checks the CPU interpreter path")
    from recurrence_dsl.cli import main

    rg = _spec("rg_lru")
    path = tmp_path / "cli.sqlite"
    layer = recurrence_dsl.compile(rg, backend="triton", tuning=path)
    module = sys.modules[type(layer).__module__]
    # the interpreter's timings are stored as "cpu-interpreter" and never looked up: the tune and the call pose as a
    # GPU
    monkeypatch.setattr(lookup, "tuning_device_name", lambda device, backend: "a GPU (test)")
    monkeypatch.setattr(module, "tuning_device_name", lambda device, backend: "a GPU (test)")
    seen = []

    class Spy(module._triton_FusedPlan):
        def __init__(self, *args):
            super().__init__(*args)
            seen.append(self.config)

    monkeypatch.setattr(module, "_triton_FusedPlan", Spy)
    rc = main(["tune", str(SPECS_DIR / "rg_lru.rec"), "--shape", "B=1,T=32,H=2,D=16", "--backend", "triton",
               "--device", "cpu", "--mode", "fwd", "--trials", "2", "--warmup", "0", "--repeat", "1",
               "--no-compiler", "--store", str(path), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "scan/triton  shapes BH=2,T=32,D=16" in out
    rows = TuningStore(path).trials()
    assert len(rows) >= 2 and {(r.form, r.backend, r.device) for r in rows} == {("scan", "triton", "a GPU (test)")}
    for r in rows:  # every timed config has its row in the table, the default first
        assert r.error is None and f"  {config_key(r.config)}  " in out, out
    assert rows[0].config == _scan(32, 64, 4)
    choice = TuningStore(path).choice(rg.spec_hash, "a GPU (test)", "float32", "BH=2,T=32,D=16", "scan", "triton",
                                      "fwd")
    assert choice is not None and (("chosen: " in out) == choice["tuned"])
    args, _ = recurrence_dsl.sampling.sample_arguments(rg.checked, {"D": 16}, 1, 32, 2)
    with torch.no_grad():  # a forward call reads the "fwd" choice
        planned = layer.config_for(*args)
        assert planned["form"] == "scan" and planned["source"] == ("store" if choice["tuned"] else "default")
        assert planned["config"] == (choice["config"] if choice["tuned"] else {}), planned
        seen.clear()
        layer(*args)
    assert seen == [tuple(choice["config"][k] for k in ("block_t", "block_n", "num_warps"))]
    # --form scan is a choice; the torch scan form takes no config (skipped, nothing timed)
    assert main(["tune", str(SPECS_DIR / "rg_lru.rec"), "--form", "scan", "--backend", "torch", "--device", "cpu",
                 "--shape", "B=1,T=32,H=2,D=16", "--store", str(tmp_path / "torch.sqlite"), "--no-progress"]) == 0
    assert "the torch scan form has nothing to tune" in capsys.readouterr().err
    # as itself, the interpreter's tune says that no call reads what it stored
    assert "CPU interpreter" not in out
    monkeypatch.undo()
    assert main(["tune", str(SPECS_DIR / "rg_lru.rec"), "--shape", "B=1,T=32,H=2,D=16", "--backend", "triton",
                 "--device", "cpu", "--mode", "fwd", "--trials", "1", "--warmup", "0", "--repeat", "1",
                 "--no-compiler", "--store", str(tmp_path / "interp.sqlite"), "--no-progress"]) == 0
    assert ("(timed in Triton's CPU interpreter, stored under the device 'cpu-interpreter', which no call looks up"
            in capsys.readouterr().out)


def test_compiled_layers_read_the_store(tmp_path, monkeypatch):
    """Active once compile() takes `tuning=` (the integration in recurrence_dsl/compiler.py)."""
    import inspect

    if "tuning" not in inspect.signature(recurrence_dsl.compile).parameters:
        pytest.skip("compile() does not read the tuning store yet")
    gla = _spec("gla")
    module = sys.modules[type(recurrence_dsl.compile(gla)).__module__]  # every layer of gla runs this module
    chunks = []
    original = module.chunked_linear_by

    def spy(*args, chunk_size=64, **kwargs):
        chunks.append(chunk_size)
        return original(*args, chunk_size=chunk_size, **kwargs)

    monkeypatch.setattr(module, "chunked_linear_by", spy)
    s = TuningStore(tmp_path / "tuning.sqlite")
    s.choose(gla.spec_hash, lookup.device_name("cpu", "torch"), "float32", shape_bucket(1, 2, 200, GLA_SIZES),
             "chunked", "torch", "fwd", {"chunk_size": 16}, True, "test")
    lookup.clear_cache()
    args, _ = recurrence_dsl.sampling.sample_arguments(gla.checked, GLA_SIZES, 1, 200, 2)
    layer = recurrence_dsl.compile(gla, backend="torch", form="chunked", tuning=s)
    out = layer(*args)[0]
    layer(*args, chunk_size=32)
    layer(*args, config={"chunk_size": 128})
    recurrence_dsl.compile(gla, backend="torch", form="chunked", chunk_size=32, tuning=s)(*args)  # explicit wins
    recurrence_dsl.compile(gla, backend="torch", form="chunked", tuning=False)(*args)
    recurrence_dsl.compile(gla, backend="torch", form="chunked", chunk_size=32, tuning=False)(*args)
    assert chunks == [16, 32, 128, 32, 64, 32]
    assert torch.equal(out, layer(*args, chunk_size=16)[0])
    with pytest.raises(recurrence_dsl.CallError, match="keys"):
        layer(*args, config={"block_k": 16})
