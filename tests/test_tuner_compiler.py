"""The tuner prunes with the compiler's own figures (issue 10): each Triton config is compiled for the target it is
tuned for (no GPU: `autotune.figures`, through `codegen.kernel_report`), a config whose kernels spill is dropped
untimed, the table shows every config's registers and spills, and the figures are cached on disk so a second tune
compiles nothing.

The test session runs Triton in its interpreter (conftest), so the compiles happen in the figures' worker child
process (without TRITON_INTERPRET) and the timings in the interpreter. One small call: linear attention, chunked,
K = V = 128, B = H = 1, T = 16, float32, forward only; about 30 s on two idle cores (two configs compiled once).
The parallel form's tune (K = V = 64, T = 64, three configs compiled, and `recdsl tune --form parallel` on a
smaller shape) takes about 80 s on two loaded cores.
"""

from __future__ import annotations

import json

import pytest
import torch

import recurrence_dsl
from autotune import tuner
from autotune.figures import CompilerFigures, target_for_device
from autotune.space import config_key, config_space
from autotune.store import TuningStore
from codegen import kernel_report
from codegen.layer import interpreting
from recurrence_dsl.analysis import analyse
from recurrence_dsl.cli import main

from .conftest import SPECS_DIR

pytest.importorskip("triton")

try:
    kernel_report.find_tools("sm_90")
    _MISSING = ""
except kernel_report.ToolMissing as err:
    _MISSING = str(err)

needs_tools = pytest.mark.skipif(bool(_MISSING), reason=_MISSING or "-")
needs_interpreter = pytest.mark.skipif(torch.cuda.is_available() or not interpreting(),
                                       reason="checks the CPU path: Triton in its interpreter, compiles in a child")

SIZES = {"K": 128, "V": 128}
# A 128 x 128 float32 state tile over 64 threads is 256 values a thread before anything else: more than the 255
# registers a thread may have, so ptxas must spill.
SPILLING = {"chunk_size": 16, "block_k": 128, "block_v": 128, "num_warps": 2, "num_stages": 1}


def _linear_attention():
    return recurrence_dsl.load(SPECS_DIR / "linear_attention.rec")["linear_attention"]


def _tune(store, **kw):
    return tuner.tune(_linear_attention(), SIZES, 1, 16, 1, torch.float32, "chunked", "triton", 4, store, "cpu",
                      warmup=1, repeat=1, mode="fwd", target="sm_90", candidates=[SPILLING], **kw)


@needs_tools
@needs_interpreter
def test_tuner_drops_a_spilling_config_and_caches_the_figures(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RECURRENCE_DSL_CACHE", str(tmp_path / "cache"))
    s = TuningStore(tmp_path / "tuning.sqlite")
    first = _tune(s)
    table = first.table()
    assert first.compiler["source"] == "compiler" and first.compiler["target"] == "sm_90"
    assert (first.compiler["compiled"], first.compiler["cached"]) == (2, 0), table
    by_key = {config_key(t.config): t for t in first.trials}
    default = config_key(first.space.default)
    assert set(by_key) == {default, config_key(SPILLING)}, table
    spilled = by_key[config_key(SPILLING)]
    assert spilled.pruned and not spilled.ok and spilled.times_ms == [], table
    assert "pruned by the compiler (sm_90)" in spilled.error and "spills" in spilled.error
    assert spilled.figures["spill_bytes"] > 0
    kept = by_key[default]
    assert kept.ok and not kept.pruned and kept.rel_error < 2e-3, table
    assert 0 < kept.figures["registers"] <= kernel_report.MAX_REGISTERS and kept.figures["spill_bytes"] == 0
    assert {k["name"] for k in kept.figures["kernels"]} >= {"_triton_chunk_state_kernel",
                                                            "_triton_chunk_output_kernel"}
    assert first.chosen is None and first.best == first.space.default  # the only timed config
    # the table has registers and spills beside the time, and says what pruned
    head = next(line for line in table.splitlines() if "median ms" in line)
    assert head.rstrip().endswith("vs slowest  regs  spill B")
    row = next(line for line in table.splitlines() if "(default)" in line)
    assert f"  {kept.figures['registers']:>4}  {0:>7}" in row
    assert "pruned" in next(line for line in table.splitlines() if config_key(SPILLING) in line)
    assert "compiler: 2 configs compiled for sm_90, 0 read from the cache" in table
    # the store keeps the pruned trial with the compiler's reason
    rows = s.trials(study=first.study)
    assert sorted(r.error is None for r in rows) == [False, True]

    second = _tune(s)
    assert (second.compiler["compiled"], second.compiler["cached"]) == (0, 2), second.table()
    assert [t.figures for t in sorted(second.trials, key=lambda t: config_key(t.config))] == \
        [{**t.figures, "cached": True} for t in sorted(first.trials, key=lambda t: config_key(t.config))]

    # `recdsl tune` prints the same columns (its default config's figures come from the cache: no compile)
    rc = main(["tune", str(SPECS_DIR / "linear_attention.rec"), "--shape", "B=1,T=16,H=1,K=128,V=128",
               "--form", "chunked",  # (auto would run the recurrent form at T=16: tune's default form then)
               "--dtype", "float32", "--backend", "triton", "--device", "cpu", "--mode", "fwd", "--trials", "1",
               "--warmup", "0", "--repeat", "1", "--target", "sm_90", "--store", str(tmp_path / "cli.sqlite"),
               "--no-progress", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    (result,) = out["results"]
    assert result["compiler"]["cached"] >= 1 and result["compiler"]["source"] == "compiler"
    timed = [t for t in result["trials"] if t["median_ms"] is not None]
    assert timed and all(t["figures"]["spill_bytes"] == 0 and t["figures"]["registers"] > 0 for t in timed)


def test_without_the_toolchain_the_hand_estimate_prunes(tmp_path, monkeypatch):
    monkeypatch.setattr(kernel_report, "tool_versions",
                        lambda target: (_ for _ in ()).throw(kernel_report.ToolMissing("ptxas not found (test)")))
    analysis = analyse(_linear_attention().checked)
    figures = CompilerFigures(analysis, SIZES, 1, 16, 1, torch.float32, "chunked", "sm_90",
                              cache_dir=tmp_path / "figures")
    assert not figures.available and "ptxas not found" in figures.why
    with pytest.raises(RuntimeError, match="no compile-only figures"):
        figures.get(SPILLING)
    info = tuner._compiler_figures(analysis, SIZES, 1, 16, 1, torch.float32, "chunked", "sm_90", "cpu", "fwd", None)
    assert info[0] is None and info[1]["source"] == "estimate"
    assert "ptxas not found" in info[1]["note"] and "hand-kept" in info[1]["note"]
    with pytest.raises(ValueError, match="compiler=True"):
        tuner._compiler_figures(analysis, SIZES, 1, 16, 1, torch.float32, "chunked", "sm_90", "cpu", "fwd", True)
    # the estimate prunes the spilling config by itself (its 128 x 128 state over 64 threads); without it, only
    # the exact rules run and the compiler decides
    problem = tuner.Problem.from_analysis(analysis, SIZES, 16)
    keys = config_space("chunked", "triton", problem).keys()
    exact = config_space("chunked", "triton", problem, estimate=False).keys()
    assert config_key(SPILLING) not in keys and config_key(SPILLING) in exact and set(keys) < set(exact)
    assert target_for_device("cpu") == "sm_90"


# The parallel form (codegen/triton_parallel.py) at K = V = 64, T = 64, float32 (sm_90): 64 x 64 blocks over two
# warps spill thousands of bytes a thread; 32 x 32 blocks over four warps use under 100 registers and spill nothing.
PARALLEL_SPILLING = {"block_t": 64, "block_k": 64, "block_v": 64, "num_warps": 2, "num_stages": 1}
PARALLEL_CLEAN = {"block_t": 32, "block_k": 32, "block_v": 32, "num_warps": 4, "num_stages": 1}


@needs_tools
@needs_interpreter
def test_the_parallel_form_is_tuned_with_the_compilers_figures(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RECURRENCE_DSL_CACHE", str(tmp_path / "cache"))
    s = TuningStore(tmp_path / "tuning.sqlite")
    sizes = {"K": 64, "V": 64}
    result = tuner.tune(_linear_attention(), sizes, 1, 64, 1, torch.float32, "parallel", "triton", 4, s, "cpu",
                        warmup=1, repeat=1, mode="fwd", target="sm_90",
                        candidates=[PARALLEL_SPILLING, PARALLEL_CLEAN])
    table = result.table()
    assert result.form == "parallel" and result.compiler["source"] == "compiler", table
    # float32 runs "ieee" dots, whose default query / key blocks are 16 rows (triton_parallel._PARALLEL_IEEE_BT)
    assert result.space.default == {"block_t": 16, "block_k": 64, "block_v": 64, "num_warps": 4, "num_stages": 2}
    by_key = {config_key(t.config): t for t in result.trials}
    assert set(by_key) == {config_key(result.space.default), config_key(PARALLEL_SPILLING),
                           config_key(PARALLEL_CLEAN)}, table
    spilled = by_key[config_key(PARALLEL_SPILLING)]
    assert spilled.pruned and spilled.times_ms == [] and "spills" in spilled.error and \
        spilled.figures["spill_bytes"] > 0, table
    clean = by_key[config_key(PARALLEL_CLEAN)]
    assert clean.ok and not clean.pruned and clean.rel_error < 2e-3, table
    assert 0 < clean.figures["registers"] <= kernel_report.MAX_REGISTERS and clean.figures["spill_bytes"] == 0
    assert {k["name"] for k in clean.figures["kernels"]} == {"_triton_parallel_attn_kernel",
                                                             "_triton_parallel_state_kernel"}
    for t in result.trials:  # whatever the default does, a config is timed exactly when it compiled clean
        assert t.pruned == (t.figures["spill_bytes"] > 0), table
    assert result.best is not None and config_key(result.best) != config_key(PARALLEL_SPILLING)
    row = next(line for line in table.splitlines() if config_key(PARALLEL_CLEAN) in line)
    assert f"  {clean.figures['registers']:>4}  {0:>7}" in row
    assert {r.form for r in s.trials(study=result.study)} == {"parallel"}

    # `recdsl tune --form parallel` (a small shape: one config compiled)
    rc = main(["tune", str(SPECS_DIR / "gla.rec"), "--form", "parallel", "--shape", "B=1,T=32,H=1,K=16,V=16",
               "--dtype", "float32", "--backend", "triton", "--device", "cpu", "--mode", "fwd", "--trials", "1",
               "--warmup", "0", "--repeat", "1", "--target", "sm_90", "--store", str(tmp_path / "cli.sqlite"),
               "--no-progress", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    (cli,) = out["results"]
    assert (cli["form"], cli["backend"]) == ("parallel", "triton")
    assert cli["default"] == {"block_t": 16, "block_k": 16, "block_v": 16, "num_warps": 4, "num_stages": 2}
    timed = [t for t in cli["trials"] if t["median_ms"] is not None]
    assert timed and all(t["figures"]["spill_bytes"] == 0 and t["figures"]["registers"] > 0 for t in timed)
    # the torch backend's parallel form has nothing to tune: skipped, not an error
    assert main(["tune", str(SPECS_DIR / "gla.rec"), "--form", "parallel", "--backend", "torch", "--device", "cpu",
                 "--shape", "B=1,T=32,H=1,K=16,V=16", "--store", str(tmp_path / "cli.sqlite"),
                 "--no-progress"]) == 0
    assert "the torch parallel form has nothing to tune" in capsys.readouterr().err
