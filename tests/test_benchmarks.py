"""The benchmark scripts still run (tiny shapes): a GPU session should spend its minutes measuring, not fixing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .conftest import REPO


def test_triton_benchmark_smoke_run_writes_its_report(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_triton.py"), "--smoke", "--shape",
                          "B=1,T=20,H=1,K=16", "--cases", "retention,delta_net", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["versions"]["torch"] == __import__("torch").__version__
    assert set(report["cases"]) == {"retention", "delta_net"}
    for name, case in report["cases"].items():
        ours = case["paths"]["ours triton chunked"]
        assert ours["forward_ms"] > 0 and ours["forward_backward_ms"] > 0
        errors = [v for p in case["paths"].values() for k, v in p.items() if k.startswith("rel_error")]
        assert errors and max(errors) <= 1e-5, (name, case["paths"])
    assert "ours triton chunked" in run.stdout and "fwd+bwd ms" in run.stdout


def test_triton_benchmark_refuses_a_full_run_without_a_gpu(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_triton.py"), "--out",
                          str(tmp_path / "x.json")], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2 and "no GPU" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "x.json").exists()


def test_triton_benchmark_refuses_a_smoke_run_with_the_interpreter_off(tmp_path):
    """TRITON_INTERPRET=false is off for Triton: the smoke run must say so, not send CPU tensors to kernels."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "false"}
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_triton.py"), "--smoke", "--out",
                          str(tmp_path / "x.json")], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2 and "need TRITON_INTERPRET=1" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "x.json").exists()


def test_backward_benchmark_smoke_run_writes_its_report(tmp_path):
    out = tmp_path / "backward.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_backward.py"), "--smoke", "--specs",
                          "gla,indrnn", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert report["smoke"] is True and {r["spec"] for r in report["rows"]} == {"gla", "indrnn"}
    threads = report["threads"]  # the thread settings the timings ran with (issue 14)
    assert threads["torch_threads"] == 1 and "OMP_WAIT_POLICY" in threads and isinstance(threads["warnings"], list)
    for row in report["rows"]:
        assert row["recurrent_fwd_bwd_adjoint_s"] > 0 and row["max_rel_grad_difference_adjoint_vs_autograd"] <= 1e-5
    assert "fwd+bwd adjoint" in run.stdout


def test_context_parallel_benchmark_smoke_run_writes_its_report(tmp_path):
    out = tmp_path / "cp.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_context_parallel.py"), "--smoke",
                          "--specs", "gla", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["world"] == 2
    (row0, row1) = report["cases"]["gla"]["ranks"]
    for row in (row0, row1):
        gathered = row["all_gather"]
        # Gloo's bytes on the wire: the payload the all_gathers were handed, plus a few headers.
        assert 0 < gathered["sent_bytes_forward_payload"] <= gathered["sent_bytes_forward_measured"]
        assert gathered["sent_bytes_forward_measured"] < 1.5 * gathered["sent_bytes_forward_payload"] + 4096
        assert gathered["rel_error_output"] <= 1e-5 and row["relay"]["rel_error_output"] <= 1e-5
    assert "all_gather" in run.stdout and "relay" in run.stdout


def test_chunked_vs_fla_benchmark_smoke_run_writes_its_report(tmp_path):
    """Runs with whatever fla the environment has: without it the fla columns are empty and the JSON says why;
    with it (PYTHONPATH=...:/tmp/fla-site) ours and fla's references must agree."""
    out = tmp_path / "fla.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_chunked_vs_fla.py"), "--smoke",
                          "--specs", "retention,delta_net", "--out", str(out)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert report["smoke"] is True and [r["spec"] for r in report["rows"]] == ["retention", "delta_net"]
    for row in report["rows"]:
        assert row["ours_forward_s"] > 0 and row["ours_fwd_bwd_s"] > 0
        if report["fla"] is None:
            assert "fla columns skipped" in report["fla_note"] and row["fla_fwd_bwd_s"] is None
        else:
            assert row["fla_fwd_bwd_s"] > 0 and max(row["rel_err"].values()) <= 1e-5, row
    assert "fla/ours f+b" in run.stdout


def test_compare_adjoint_of_identical_modules_runs_and_agrees(tmp_path):
    out = tmp_path / "compare.json"
    golden = REPO / "tests" / "golden"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compare_adjoint.py"), "--before", str(golden),
                          "--after", str(golden), "--specs", "delta_net", "--T", "20", "--D", "8", "--repeats", "2",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["spec"] == "delta_net" and row["max_rel_grad_difference"] == 0.0
    assert row["fwd_bwd_before_s"] > 0 and row["fwd_bwd_after_s"] > 0 and "after/before" in run.stdout


def test_compare_adjoint_times_each_recurrence_of_a_file_on_either_clock(tmp_path):
    out = tmp_path / "compare.json"
    golden = REPO / "tests" / "golden"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compare_adjoint.py"), "--before", str(golden),
                          "--after", str(golden), "--specs", "bidirectional_mamba", "--T", "12", "--D", "4",
                          "--repeats", "1", "--clock", "cpu", "--out", str(out)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert report["clock"] == "cpu"
    assert [r["spec"] for r in report["rows"]] == ["bidirectional_mamba_forward", "bidirectional_mamba_backward"]
    assert all(r["max_rel_grad_difference"] == 0.0 for r in report["rows"])


def test_compare_adjoint_names_a_missing_module(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compare_adjoint.py"), "--before", str(tmp_path),
                          "--specs", "delta_net", "--out", str(tmp_path / "x.json")], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode != 0 and f"no generated module at {tmp_path / 'delta_net.module.py'}" in run.stderr


def test_scaling_benchmark_smoke_run_fits_an_exponent_per_form(tmp_path):
    out = tmp_path / "scaling.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_scaling.py"), "--smoke", "--specs",
                          "gla,delta_net", "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["shape"]["T"] == [64, 128] and report["limit"] == 1.15
    assert report["threads"]["torch_threads"] == 1 and "load_average_1m" in report["threads"]
    forms = {(r["spec"], r["form"]) for r in report["rows"]}
    assert forms == {("gla", "chunked"), ("gla", "scan"), ("gla", "recurrent"), ("delta_net", "chunked"),
                     ("delta_net", "recurrent")}, forms
    for row in report["rows"]:
        assert all(s > 0 for s in row["median_s"]) and len(row["exponent_per_repeat"]) == report["repeats"] == 1
        assert isinstance(row["exponent"], float)
        assert (row["within_limit"] is None) == (row["form"] == "recurrent")
    assert "exponent" in run.stdout and "delta_net" in run.stdout


def test_scaling_benchmark_fits_the_exponent_of_a_power_law():
    sys.path.insert(0, str(REPO))
    from benchmarks.bench_scaling import slope

    lengths = [1024, 2048, 4096, 8192]
    assert abs(slope(lengths, [3e-6 * t for t in lengths]) - 1.0) < 1e-12
    assert abs(slope(lengths, [1e-9 * t ** 1.5 for t in lengths]) - 1.5) < 1e-12


def test_varlen_benchmark_smoke_run_writes_its_report(tmp_path):
    out = tmp_path / "varlen.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_varlen.py"), "--smoke", "--specs", "gla",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert report["smoke"] is True and {r["pass"] for r in report["rows"]} == {"fwd", "fwd+bwd"}
    for row in report["rows"]:
        assert row["spec"] == "gla" and row["sequences"] == 4 and row["length"] == 3
        assert row["one_long_s"] > 0 and row["packed_s"] > 0 and row["loop_s"] > 0
        assert row["packed_over_one_long"] == row["packed_s"] / row["one_long_s"]
    assert "256 x 16" not in run.stdout and "4 x 3" in run.stdout
