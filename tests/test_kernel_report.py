"""`recdsl kernels` and codegen.kernel_report: Triton kernels compiled for a GPU target without a GPU.

The test session runs Triton in its interpreter (conftest), where kernels run instead of compiling, so
every compile here happens in a child process without TRITON_INTERPRET. Shapes are small: the whole file
runs in about half a minute on two cores (each compile is a real ptxas run for sm_90).
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

from codegen import kernel_report
from codegen.kernel_report import TARGETS, KernelReport
from recurrence_dsl.cli import main

from .children import Child
from .conftest import SPECS_DIR

triton = pytest.importorskip("triton")



def _tools_missing() -> str:
    try:
        for target in ("sm_80", "sm_90"):
            kernel_report.find_tools(target)
    except kernel_report.ToolMissing as err:
        return str(err)
    return ""


needs_tools = pytest.mark.skipif(bool(_tools_missing()), reason=_tools_missing() or "-")

GLA_KERNELS = {"_triton_intra_attn_kernel", "_triton_chunk_state_kernel", "_triton_chunk_output_kernel"}


def _recdsl(name: str, *argv) -> Child:
    """`recdsl ARGV` in a child process, run in the background from the start of the session (tests/children.py)."""
    return Child(name, [sys.executable, "-m", "recurrence_dsl", *map(str, argv)], timeout=300)


GLA_JSON = _recdsl("kernels_gla_json", "kernels", SPECS_DIR / "gla.rec", "--shape", "B=1,T=64,H=1,K=16,V=16",
                   "--target", "sm_90", "--form", "chunked", "--backward", "--json")
SPILLING = _recdsl("kernels_spilling", "kernels", SPECS_DIR / "minimal_rnn.rec", "--shape", "B=1,T=16,H=1,D=128",
                   "--form", "recurrent", "--dtype", "float32", "--config", '{"num_warps": 1}')
BASED_K32 = _recdsl("kernels_based_k32", "kernels", SPECS_DIR / "based.rec", "--shape", "B=1,T=16,H=1,K=32,V=32",
                    "--form", "recurrent", "--target", "sm_90", "--json")
GLA_PARALLEL = _recdsl("kernels_gla_parallel", "kernels", SPECS_DIR / "gla.rec", "--shape", "B=1,T=64,H=1,K=16,V=16",
                       "--target", "sm_80", "--form", "parallel", "--backward", "--json")
# recurrences with shift states (recurrence_dsl/shift.py): the shift in torch, then the rest's kernels
TOKEN_SHIFT = _recdsl("kernels_token_shift", "kernels", SPECS_DIR.parent / "tests" / "data" / "token_shift.rec",
                      "--shape", "B=1,T=64,H=1,K=16,V=16", "--form", "chunked", "--backward", "--json")
TOO_LARGE = _recdsl("kernels_too_large", "kernels", SPECS_DIR / "minimal_rnn.rec", "--shape", "B=1,T=16,H=1,D=256",
                    "--form", "recurrent", "--dtype", "float32")


@needs_tools
@GLA_JSON.needed
def test_gla_forward_and_backward_for_sm90_as_json():
    run = GLA_JSON.result()
    assert "Traceback" not in run.stderr, run.stderr
    report = json.loads(run.stdout)
    assert report["target"] == "sm_90" and report["max_shared_bytes"] == 232448 == TARGETS["sm_90"].max_shared_bytes
    assert report["versions"]["triton"] == triton.__version__ and report["versions"]["ptxas"]
    (gla,) = report["runs"]
    assert gla["name"] == "gla" and gla["form"] == "chunked"
    assert {k["name"] for k in gla["kernels"]} == GLA_KERNELS
    for k in gla["kernels"]:
        assert k["registers"] > 0 and k["target"] == "sm_90" and k["phase"] == "forward"
        assert len(k["grid"]) == 3 and all(g >= 1 for g in k["grid"]) and k["launches"] >= 1
        # a key decay's output and state kernels default to 8 warps (codegen/triton_runtime.py, _KEY_OUTPUT_WARPS,
        # _KEY_STATE_WARPS)
        assert k["num_warps"] == (8 if k["name"] in ("_triton_chunk_output_kernel", "_triton_chunk_state_kernel")
                                  else 4)
        assert k["num_stages"] >= 1 and k["compile_seconds"] > 0
        assert 0 < k["shared_bytes"] <= 232448
    # B*H = 1, T = 64 in one chunk of 64 = 4 sub-chunks of 16: the intra-chunk scores are 4 x 4 sub-blocks
    grids = {k["name"]: k["grid"] for k in gla["kernels"]}
    assert grids["_triton_intra_attn_kernel"] == [1, 16, 1] and grids["_triton_chunk_state_kernel"] == [1, 1, 1]
    # the linear chunked form's backward runs in Triton kernels (codegen/triton_runtime.py, _linear_backward)
    back = {k["name"] for k in gla["backward"]}
    assert {"_triton_chunk_dstate_kernel", "_triton_chunk_bwd_decayed_kernel", "_triton_chunk_bwd_plain_kernel",
            "_triton_dlog_chunk_kernel"} <= back and "backward_note" not in gla
    assert all(k["phase"] == "backward" and k["spill_bytes"] == 0 for k in gla["backward"])
    # with --backward the hand-written figure is fla's forward + backward (`hand_written_backward_bytes`)
    counted, hand = gla["intermediate_bytes"], gla["intermediate_bytes"]["hand_written"]
    assert hand["kind"] == "gla" and hand["total"] == hand["forward"] + hand["backward"] > hand["forward"] > 0
    assert set(hand["backward_buffers"]) >= {"h", "dh", "dA"} and counted["by_phase"]["backward"] > 0
    # at K = V = 16 nothing spills, so the command succeeds
    assert report["problems"] == [] and report["ok"] is True and run.returncode == 0, run.stdout


@needs_tools
@GLA_PARALLEL.needed
def test_the_parallel_form_for_sm80_forward_and_backward():
    # `--form parallel` (codegen/triton_parallel.py): the log decays' cumulative sum, the attention-style output
    # kernel and the final state's pass forward, the same attention kernel for dq, dk and dv backward
    # (benchmarks/kernel_matrix.py runs this form too)
    run = GLA_PARALLEL.result()
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stdout + run.stderr
    (gla,) = json.loads(run.stdout)["runs"]
    assert gla["form"] == "parallel"
    assert [k["name"] for k in gla["kernels"]] == ["_triton_parallel_cumsum_kernel", "_triton_parallel_attn_kernel",
                                                  "_triton_parallel_state_kernel"]
    back = [k["name"] for k in gla["backward"]]
    assert back.count("_triton_parallel_attn_kernel") >= 3 and "backward_note" not in gla
    for k in gla["kernels"] + gla["backward"]:
        assert k["target"] == "sm_80" and k["registers"] > 0 and k["spill_bytes"] == 0
        assert k["phase"] == ("forward" if k in gla["kernels"] else "backward")


@needs_tools
@SPILLING.needed
def test_a_spilling_kernel_exits_1_and_is_named():
    # minimal_rnn's recurrent kernel holds its two [D, D] params in registers (no axis of its state can be split
    # over programs: the step reads h across D): at D = 128 on one warp, 32 K float32 on 32 threads, 1024 values
    # per thread. (At D = 256 the footprint passes an SM's registers and the launcher refuses before compiling.)
    run = SPILLING.result()
    assert run.returncode == 1, run.stdout + run.stderr
    assert "minimal_rnn__triton_recurrent_kernel spills" in run.stdout and "Traceback" not in run.stderr
    header = next(line for line in run.stdout.splitlines() if "regs" in line)
    assert header.split()[:3] == ["kernel", "grid", "warps"] and "spill B" in header and "compile s" in header


@needs_tools
@BASED_K32.needed
def test_based_at_k32_compiles_on_the_narrowed_value_tile_without_spills():
    # based's S2[K, K, V] at K = V = 32 passes an SM's registers on 32 lanes of V; `_fit_tile` halves the tile to
    # 16 lanes, so two programs share V and each compiles without spilling (measured: 16 warps, 128 registers).
    run = BASED_K32.result()
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stdout + run.stderr
    (based,) = json.loads(run.stdout)["runs"]
    (kernel,) = based["kernels"]
    assert kernel["name"] == "based__triton_recurrent_kernel" and kernel["grid"] == [1, 2, 1], kernel
    assert kernel["spill_bytes"] == 0 and 0 < kernel["registers"] <= kernel_report.MAX_REGISTERS


@TOO_LARGE.needed
def test_a_form_that_cannot_hold_its_state_exits_1_with_the_reason():
    # At D = 256 minimal_rnn's recurrent kernel would hold 2 [D, D] params: more than an SM's 65536 registers.
    run = TOO_LARGE.result()
    assert run.returncode == 1, run.stdout + run.stderr
    assert "cannot keep its state in registers" in run.stdout and "Traceback" not in run.stderr
    assert "0 kernels (0 launches) compiled" in run.stdout

HOG = '''
import triton
import triton.language as tl


@triton.jit
def hog_kernel(x, y, N: tl.constexpr):
    """An N x N float32 tile live across two reductions: 65536 values on 128 threads at N = 256."""
    o = tl.arange(0, N)
    a = tl.load(x + o[:, None] * N + o[None, :])
    b = tl.exp(a) * tl.sum(a, axis=0)[None, :]
    tl.store(y + o[:, None] * N + o[None, :], b + tl.sum(b, axis=1)[:, None] * a)


@triton.jit
def odd_block_kernel(x, y):
    """A block of 10 lanes: Triton's blocks are powers of two, so this does not compile."""
    o = tl.arange(0, 10)
    tl.store(y + o, tl.load(x + o))
'''

HOG_RUN = '''
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
from hog_kernel import hog_kernel, odd_block_kernel
from codegen.kernel_report import CompileFailed, compile_only

try:
    with compile_only("sm_80"):
        x = torch.zeros(64)
        odd_block_kernel[(1,)](x, torch.empty_like(x))
except CompileFailed as err:
    print("CompileFailed:", str(err).splitlines()[0])
with compile_only("sm_90") as launches:
    for n in (16, 256):
        x = torch.zeros(n * n)
        hog_kernel[(3,)](x, torch.empty_like(x), n)
    hog_kernel[(3,)](x, torch.empty_like(x), 256)
print(json.dumps([dict(k.as_dict(), problems=k.problems()) for k in launches.kernels()]))
'''


# hog_kernel.py written to a temporary directory ("{dir}"), run in the background (tests/children.py)
HOG_COMPILES = Child("kernels_hog", [sys.executable, "-c", HOG_RUN, "{dir}"],
                     files={"hog_kernel.py": textwrap.dedent(HOG)}, timeout=300)


@needs_tools
@HOG_COMPILES.needed
def test_compile_only_reports_a_kernel_written_to_spill_and_one_that_does_not_compile():
    run = HOG_COMPILES.result()
    assert run.returncode == 0, run.stderr
    assert "CompileFailed: odd_block_kernel does not compile for sm_80" in run.stdout, run.stdout
    small, big = json.loads(run.stdout.splitlines()[-1])
    assert small["name"] == big["name"] == "hog_kernel" and small["grid"] == big["grid"] == [3, 1, 1]
    assert small["spill_bytes"] == 0 and small["problems"] == [] and small["launches"] == 1
    assert big["spill_bytes"] > 0 and big["launches"] == 2 and "hog_kernel spills" in big["problems"][0]


def test_problems_name_spills_and_shared_memory_over_the_target():
    def kernel(**kw):
        base = dict(name="k", grid=(1, 1, 1), num_warps=4, num_stages=2, registers=128, spill_bytes=0,
                    shared_bytes=1024, compile_seconds=0.1, target="sm_80")
        return KernelReport(**{**base, **kw})

    assert kernel().problems() == []
    assert kernel(shared_bytes=166912).problems() == []  # exactly A100's 163 KB
    (too_big,) = kernel(shared_bytes=166913).problems()
    assert "166913 bytes of shared memory" in too_big and "sm_80 allows 166912" in too_big
    assert kernel(shared_bytes=200000, target="sm_90").problems() == []
    assert "spills: 8 bytes" in kernel(spill_bytes=8).problems()[0]
    assert TARGETS["sm_100"].max_shared_bytes == TARGETS["sm_90"].max_shared_bytes == 227 * 1024


@pytest.mark.parametrize("argv, message", [
    (["--shape", "K=abc"], "size K must be an integer"),
    (["--name", "nope"], "no recurrence 'nope'"),
    (["--shape", "Q=4"], "gla has no size Q"),
    (["--config", "{bad"], "--config: not JSON"),
])
def test_bad_command_lines_exit_2_without_a_traceback(argv, message, capsys):
    code = main(["kernels", str(SPECS_DIR / "gla.rec"), *argv])
    out, err = capsys.readouterr()
    assert code == 2 and message in err and "Traceback" not in err, err


def test_a_config_with_an_unknown_key_names_it():
    """A config may give some of a form's keys (its defaults fill in the rest), but a key the form does not take
    is refused, naming it and the form's keys (checked before any kernel runs, so here in the interpreter too)."""
    import recurrence_dsl
    from recurrence_dsl.sampling import sample_arguments

    rec = recurrence_dsl.load(SPECS_DIR / "gla.rec")["gla"]
    layer = recurrence_dsl.compile(rec, tuning=False)
    args, _ = sample_arguments(rec.checked, {"K": 16, "V": 16}, 1, 8, 1, dtype=torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"config key 'nope' is not a key of the chunked form on the triton "
                       r"backend; valid keys: chunked takes chunk_size, block_k, block_v, num_warps, num_stages"):
        kernel_report.run_call(layer, args, form="chunked", config={"chunk_size": 32, "nope": 1})
    # launch values Triton refuses are named before any kernel compiles, not met as Triton's own assertion
    config = {"chunk_size": 32, "block_k": 16, "block_v": 16, "num_warps": 3, "num_stages": 2}
    with pytest.raises(ValueError, match=r"config num_warps must be a power of two from 1 to 32, got 3"):
        kernel_report.run_call(layer, args, form="chunked", config=config)
    with pytest.raises(ValueError, match=r"config num_stages must be an integer >= 1, got 0"):
        kernel_report.run_call(layer, args, form="chunked", config=dict(config, num_warps=4, num_stages=0))
    with pytest.raises(ValueError, match=r"config num_warps must be .* got 0"):  # the layer's call, the same rule
        layer(*args, form="chunked", backend="triton", config=dict(config, num_warps=0))


def test_an_unknown_target_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["kernels", str(SPECS_DIR / "gla.rec"), "--target", "sm_70"])
    assert info.value.code == 2 and "invalid choice: 'sm_70'" in capsys.readouterr().err


def test_missing_ptxas_is_said_clearly(monkeypatch, capsys):
    import triton.backends.nvidia.compiler as nvidia

    def no_ptxas(arch):
        raise RuntimeError("Cannot find ptxas-blackwell")

    monkeypatch.setattr(nvidia, "get_ptxas", no_ptxas)
    with pytest.raises(kernel_report.ToolMissing, match="ptxas-blackwell not found .*TRITON_PTXAS_BLACKWELL_PATH"):
        kernel_report.find_tools("sm_90")
    code = main(["kernels", str(SPECS_DIR / "gla.rec"), "--target", "sm_90"])
    err = capsys.readouterr().err
    assert code == 2 and "recdsl kernels: error: ptxas-blackwell not found" in err and "Traceback" not in err


def test_the_interpreter_is_refused_with_a_reason():
    from codegen.layer import interpreting

    if not interpreting():
        pytest.skip("Triton's interpreter is off in this session (a GPU machine)")
    import recurrence_dsl

    rec = recurrence_dsl.load(SPECS_DIR / "gla.rec")["gla"]
    with pytest.raises(kernel_report.InterpreterOn, match="TRITON_INTERPRET"):
        kernel_report.report_recurrence(rec, {"K": 16, "V": 16}, 1, 32, 1)


def test_a_tool_that_hangs_is_a_report_error_naming_it(tmp_path, monkeypatch):
    # cuobjdump and `ptxas --version` run with a timeout: a hung tool ends the report with a reason, not a hang.
    tool = tmp_path / "cuobjdump"
    tool.write_text("#!/bin/sh\nexec sleep 30\n")
    tool.chmod(0o755)
    monkeypatch.setattr(kernel_report, "TOOL_TIMEOUT_S", 0.2)
    with pytest.raises(kernel_report.KernelReportError, match=r"cuobjdump .*no answer within 0\.2 s"):
        kernel_report.resource_usage(b"\0", str(tool))
    monkeypatch.setattr(kernel_report, "find_tools", lambda target: {"cuobjdump": str(tool)})
    with pytest.raises(kernel_report.KernelReportError, match=r"cuobjdump --version.*no answer within 0\.2 s"):
        kernel_report.tool_versions("sm_90")


def test_run_call_names_the_form_auto_ran_after_a_form_that_does_not_fit(monkeypatch):
    # `recdsl kernels --form auto` said "runs recurrent" for a short based call (pick_form's choice) while the
    # recurrent form, refused (StateTooLarge at K = V = 64 on a CUDA target), left the call to the chunked form.
    import recurrence_dsl
    from recurrence_dsl.sampling import sample_arguments

    rec = recurrence_dsl.load(SPECS_DIR / "based.rec")["based"]
    layer = recurrence_dsl.compile(rec, tuning=False)
    module = sys.modules[type(layer).__module__]
    monkeypatch.setattr(module, "_triton_compiles_for_cuda", lambda: True)  # the refusal only a GPU target makes
    args, _ = sample_arguments(rec.checked, {s: 64 for s in rec.checked.sizes}, 1, 8, 1, dtype=torch.float32)
    ran: list[str] = []
    forms = layer.triton_forms
    out = kernel_report.run_call(layer, args, form="auto", ran=ran)
    assert ran == ["chunked"] and layer.triton_forms is forms  # the layer's own forms are back
    want = layer(*args, backend="torch", form="chunked")
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


@needs_tools
@TOKEN_SHIFT.needed
def test_recurrences_with_shift_states():
    # `recdsl kernels` on a recurrence with shift states crashed (the report swapped the forms of a ShiftedLayer,
    # which has none of its own); it reports the rest's kernels, and the shift's tensors among the intermediates
    run = TOKEN_SHIFT.result()
    assert "Traceback" not in run.stderr and run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["ok"] is True and [r["name"] for r in report["runs"]] == ["token_shift_la", "conv_gla"]
    for r, states in zip(report["runs"], (["klast"], ["k1", "k2"])):
        assert r["shift"] == {"states": states, "rest": f"{r['name']}_unshifted"}
        names = {k["name"] for k in r["kernels"]}
        assert {"_triton_chunk_state_kernel", "_triton_chunk_output_kernel"} <= names, names
        assert r["backward"] and all(k["spill_bytes"] == 0 for k in r["kernels"] + r["backward"])
        assert any("shift_steps" in t["where"] for t in r["intermediate_bytes"]["tensors"]), r["intermediate_bytes"]


def test_run_call_of_a_recurrence_with_shift_states():
    # (in the interpreter: the call itself, against the torch backend, and the form it ran)
    import recurrence_dsl
    from recurrence_dsl.sampling import sample_arguments

    rec = recurrence_dsl.load(SPECS_DIR.parent / "tests" / "data" / "token_shift.rec")["conv_gla"]
    layer = recurrence_dsl.compile(rec, tuning=False)
    args, initial = sample_arguments(rec.checked, {"K": 4, "V": 4}, 1, 9, 2, dtype=torch.float32,
                                     with_initial_state=True)
    kwargs = {"initial_state": initial, "output_final_state": True, "cu_seqlens": torch.tensor([0, 4, 9])}
    ran: list[str] = []
    args = [a[:1] if i < 4 else a for i, a in enumerate(args)]
    kwargs["initial_state"] = {k: torch.cat([v, v]) for k, v in initial.items()}
    out, final = kernel_report.run_call(layer, args, kwargs, form="chunked", ran=ran)
    assert ran == ["chunked"] and set(final) == {"k1", "k2", "S"}
    want, want_final = layer(*args, **kwargs, backend="torch", form="chunked")
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    for n in want_final:
        torch.testing.assert_close(final[n], want_final[n], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="^conv_gla has no 'chunky' form on the triton backend"):
        kernel_report.run_call(layer, args, kwargs, form="chunky")
