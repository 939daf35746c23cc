"""The GPU session kit without a GPU: bench_triton's roofline arithmetic, collect_gpu_results on a fake device
folder, gpu_kernel_report's shard merge, and gpu_session.sh's limits, steps and outputs (a stub python3)."""

from __future__ import annotations

import json
import os
import stat
import subprocess

import pytest

from benchmarks import bench_triton, collect_gpu_results, gpu_kernel_report

from .conftest import REPO

SESSION = REPO / "benchmarks" / "gpu_session.sh"


# -- bench_triton.py's roofline -----------------------------------------------------------------------------------


def test_chunked_flops_by_hand():
    # C = 64, K = V = 16, one head, 64 steps: 2*64*32 + 4*256 = 5120 per step (linear)
    assert bench_triton.chunked_flops("linear", 1, 64, 1, 16, 16, 64) == 64 * 5120
    # delta adds 4*64*16 + 2*64*16 + 2*256 + 64*64/3 per step
    assert bench_triton.chunked_flops("delta", 2, 64, 3, 16, 16, 64) == pytest.approx(
        2 * 3 * 64 * (5120 + 4096 + 2048 + 512 + 4096 / 3))
    assert bench_triton.attention_flops(1, 8, 2, 4) == 2 * 2 * 8 * 8 * 4
    with pytest.raises(ValueError, match="algorithm must be"):
        bench_triton.chunked_flops("dense", 1, 1, 1, 1, 1, 1)


def test_call_bytes_and_roofline_by_hand():
    import torch

    q, k, v = (torch.zeros(1, 64, 1, 16, dtype=torch.bfloat16) for _ in range(3))
    gamma = torch.zeros(1)  # a float32 param: read, no gradient
    out = torch.zeros(1, 64, 1, 16, dtype=torch.bfloat16)
    assert bench_triton.call_bytes([q, k, v, gamma], out, backward=False) == 3 * 2048 + 4 + 2048
    # forward, then the backward reads the inputs and the output's gradient and writes q, k, v's gradients
    assert bench_triton.call_bytes([q, k, v, gamma], out, backward=True) == 2 * (3 * 2048 + 4 + 2048) + 3 * 2048

    h200 = bench_triton.device_peaks("NVIDIA H200", "bfloat16", None, None)
    assert h200["bandwidth"] == 4.8e12 and h200["flops"]["bfloat16"] == 989e12
    line = bench_triton.roofline(4.8e9, 0.989e12, 2.0, h200, "bfloat16")  # each ceiling's time is 1 ms, of 2
    assert line["GB_per_s"] == pytest.approx(2400) and line["TFLOP_per_s"] == pytest.approx(494.5)
    assert line["of_peak_bandwidth"] == pytest.approx(0.5) and line["of_peak_flops"] == pytest.approx(0.5)
    assert line["of_roofline"] == pytest.approx(0.5)
    bound = bench_triton.roofline(4.8e9, 0.0989e12, 4.0, h200, "bfloat16")  # memory-bound: 1 ms of 4
    assert bound["of_roofline"] == pytest.approx(0.25)

    assert bench_triton.device_peaks("Some GPU", "bfloat16", None, None) is None
    assert "of_roofline" not in bench_triton.roofline(1e9, 1e12, 1.0, None, "bfloat16")
    given = bench_triton.device_peaks("NVIDIA H200", "bfloat16", 4000.0, None)
    assert given["bandwidth"] == 4e12 and given["flops"]["bfloat16"] == 989e12
    assert given["source"] == "command line over datasheet (H200)"


def test_shapes_parse_and_refuse():
    assert bench_triton.parse_shapes("4x4096x16x128,8x1024x8x64") == [
        dict(B=4, T=4096, H=16, K=128, V=128), dict(B=8, T=1024, H=8, K=64, V=64)]
    with pytest.raises(ValueError, match="'4x4096x16' is not BxTxHxK"):
        bench_triton.parse_shapes("4x4096x16")
    with pytest.raises(ValueError, match="below 1"):
        bench_triton.parse_shapes("0x4x4x4")


def test_budget_stops_cells_and_names_why():
    class Stopped(bench_triton.Budget):
        def left(self):
            return 1.0

    import torch

    qkv = [torch.zeros(1, 4, 1, 4)] * 3
    entry = bench_triton.run_sdpa(qkv, dict(B=1, T=4, H=1, K=4), Stopped(1, 1), True, None, "float32")
    assert entry["forward"] == {"skipped": "overall budget spent"} == entry["forward_backward"]


# -- collect_gpu_results.py -----------------------------------------------------------------------------------------

JUNIT = """<?xml version="1.0"?><testsuites><testsuite name="pytest" time="12.5">
<testcase classname="tests.test_gpu" name="test_a" time="1.5"/>
<testcase classname="tests.test_gpu" name="test_b" time="2"><failure message="boom">trace</failure></testcase>
<testcase time="0.000" />
</testsuite></testsuites>"""


def _cell(ms):
    return {"ms": ms, "first_call_s": 1.0, "method": "do_bench", "roofline": {"of_roofline": 0.25}}


def _case(layer, T, ours, fla):
    return {"layer": layer, "shape": dict(B=1, T=T, H=2, K=64, V=64),
            "paths": {"ours_chunked": {"forward": _cell(ours / 3), "forward_backward": _cell(ours)},
                      "fla_chunk": {"forward": _cell(fla / 3), "forward_backward": _cell(fla)},
                      "fla_fused_recurrent": {"skipped": "fla unavailable: ModuleNotFoundError"}}}


def test_collect_writes_json_table_and_plot(tmp_path):
    device = tmp_path / "device"
    device.mkdir()
    (device / "session.log").write_text("2026-12-01T05:00:00Z\nNVIDIA H200, 580.159.04, 143771 MiB\n"
                                        "3.12.3 2.11.0+cu130 3.6.0 NVIDIA H200\nfla 0.6.0\n")
    (device / "gpu_tests.xml").write_text(JUNIT)
    report = {"device": "NVIDIA H200", "dtype": "bfloat16", "date": "2026-12-01T05:00:00Z",
              "target": bench_triton.TARGET,
              "cases": {"gla/a": _case("gla", 4096, 2.0, 2.0), "delta_net/a": _case("delta_net", 4096, 4.0, 2.0),
                        "gla/b": _case("gla", 1024, 1.0, 0.5)},
              "sdpa": {"B1_T4096_H2_K64": {"forward": _cell(1.0), "forward_backward": _cell(3.0)}}}
    (device / "triton_gpu.json").write_text(json.dumps(report))
    results = tmp_path / "results"
    assert collect_gpu_results.main([str(device), "--tag", "x", "--results", str(results)]) == 0

    tests = json.loads((results / "gpu_tests_x.json").read_text())
    # the unnamed test case: one pytest was running when SIGINT stopped it at the step's limit
    assert tests["summary"] == {"passed": 1, "failure": 1, "error": 0, "skipped": 0, "interrupted": 1}
    assert tests["device"] == "NVIDIA H200" and tests["driver"] == "580.159.04" and tests["wall_seconds"] == 12.5
    assert json.loads((results / "triton_gpu_x.json").read_text()) == report
    table = (results / "triton_gpu_x.md").read_text().splitlines()
    rows = {line.split(" | ")[1]: line for line in table if line.startswith("| (1, 4096")}
    assert "| 1.00x | met |" in rows["gla"] and "| 0.50x | missed |" in rows["delta_net"]
    assert "| 3.000 |" in rows["gla"] and "| 25% |" in rows["gla"]  # SDPA fwd+bwd, ours of the roofline
    assert any(line.startswith("| (1, 1024") and "| 0.50x | n/a |" in line for line in table)
    png = (results / "triton_gpu_x.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_collect_refuses_a_missing_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        collect_gpu_results.main([str(tmp_path / "nope"), "--results", str(tmp_path)])
    assert stop.value.code == 2 and "no such folder" in capsys.readouterr().err


# -- gpu_kernel_report.py -----------------------------------------------------------------------------------------


def test_kernel_report_compares_and_merges_shards(tmp_path):
    gpu = [{"kernel": "fwd", "registers": 128, "spill_bytes": 0}, {"kernel": "bwd", "registers": 255,
                                                                     "spill_bytes": 8}]
    same = [{"name": "bwd", "registers": 255, "spill_bytes": 8}, {"name": "fwd", "registers": 128, "spill_bytes": 0}]
    assert gpu_kernel_report.compare(gpu, same)["agree"] is True
    other = gpu_kernel_report.compare(gpu, [{"name": "fwd", "registers": 120, "spill_bytes": 0}] + same[:1])
    assert other["agree"] is False
    assert other["disagree"] == {"gpu_only": [["fwd", 128, 0]], "compile_only_only": [["fwd", 120, 0]]}

    shards = []
    for i in range(2):
        shard = tmp_path / f"k{i}.json"
        shard.write_text(json.dumps({"device": "NVIDIA H200", "shard": f"{i}/2",
                                     "runs": [{"spec": f"s{i}.rec", "kernels": gpu, "agree": bool(i)}]}))
        shards.append(str(shard))
    out = tmp_path / "kernels.json"
    assert gpu_kernel_report.main(["--merge", *shards, str(tmp_path / "never_written.json"), "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert merged["shards"] == ["0/2", "1/2"] and [r["spec"] for r in merged["runs"]] == ["s0.rec", "s1.rec"]
    names = [p.name for p, _ in gpu_kernel_report.work_list()[:8:2]]
    assert names == list(gpu_kernel_report.BENCHMARKED)  # the benchmarked specs go first


# -- gpu_session.sh -------------------------------------------------------------------------------------------------

STUB = """#!/usr/bin/env bash
# python3 as gpu_session.sh calls it: writes what each --out / --junitxml names, logs its arguments
echo "$*" >> "$STUB_LOG"
prev=""
for a in "$@"; do
  case $a in --junitxml=*) echo '<testsuites><testsuite time="1"/></testsuites>' > "${a#--junitxml=}" ;; esac
  [ "$prev" = "--out" ] && echo '{"runs": []}' > "$a"
  prev=$a
done
echo "3.12.3 2.11.0 3.6.0 Stub GPU"
"""


def _session(args, **env):
    return subprocess.run(["bash", str(SESSION), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


def test_session_script_parses_and_checks_its_limits(tmp_path):
    assert subprocess.run(["bash", "-n", str(SESSION)], capture_output=True).returncode == 0
    plan = _session(["--dry-run", str(tmp_path / "out")])
    assert plan.returncode == 0, plan.stderr
    assert "bench: up to 420 s" in plan.stdout and "two calls: 630 s of SESSION_LIMIT 690 s" in plan.stdout
    assert not (tmp_path / "out").exists()
    bad = _session(["--dry-run", str(tmp_path), "tests", "benchmark"])
    assert bad.returncode == 2 and "unknown step 'benchmark'" in bad.stderr
    over = _session(["--dry-run", str(tmp_path)], BENCH_LIMIT="500")
    assert over.returncode == 2 and "over SESSION_LIMIT 690 s" in over.stderr


def test_session_script_runs_every_step_into_flat_outdir(tmp_path):
    """With python3 and nvidia-smi stubbed: every output is a file directly in OUTDIR, at most 8 of them (what the
    device returns), and bench gets a budget inside the call's limit."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("python3", STUB), ("nvidia-smi", "#!/usr/bin/env bash\necho 'Stub GPU, 1.0, 1 MiB'\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    log, out = tmp_path / "calls.log", tmp_path / "out"
    run = _session([str(out)], GPU_SESSION_LOGS=str(tmp_path / "logs"), PATH=f"{bin_dir}:{os.environ['PATH']}",
                   STUB_LOG=str(log), BENCH_ARGS="--shapes 8x1024x8x64 --cell-budget 5")
    assert run.returncode == 0, run.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_tests.xml", "kernels_gpu.json", "numerics_gpu.xml", "session.log", "triton_gpu.json"]
    calls = log.read_text()
    assert calls.count("gpu_kernel_report.py --shard") == 4 and "--merge" in calls
    bench = next(line for line in calls.splitlines() if "bench_triton.py" in line).split()
    budget = int(bench[bench.index("--budget") + 1])
    assert 0 < budget <= 420 - 60 and bench[-4:] == ["--shapes", "8x1024x8x64", "--cell-budget", "5"]
    session_log = (out / "session.log").read_text()
    assert "== tests: exit 0" in session_log and "== bench: exit 0" in session_log and "Stub GPU" in session_log
