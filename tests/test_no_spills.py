"""No register spills at the default configs (issue 10), on a representative subset, compiled without a GPU.

benchmarks/kernel_matrix.py checks every spec (K = V in {64, 128}, bfloat16 and float16, sm_80 and sm_90, each
Triton form, forward and backward); this file checks the kernels with the least headroom there, in bfloat16:
gla's chunked form (a per-key decay: cumulative sums, intra-chunk scores, state and output kernels) and
gated_delta_net's (the delta rule: WY kernel and the state kernel holding whole columns of S) at K = V = 128 for
sm_90 and sm_80, with their backward kernels; on sm_80 also at K = V = 64, where the delta rule's backward
(dq/dk, WY, dL and local kernels) and the linear forms' `_chunk_bwd_plain_kernel` once spilled; one recurrent
kernel (rwkv7, whose [K, V] state is split over programs along V) for sm_90 and its adjoint for sm_80 at 64;
rwkv7's chunked form (diagonal plus rank one) for sm_80 at 128 with its backward (the chunk-parallel adjoint); the
key-decay delta rule's (tests/data/kda.rec, KDA) with its backward kernels for sm_90; and the recurrent adjoints
that spilled last (minimal_rnn's at D = 128 on both targets, retention's and mamba2's at K = V = 128 on sm_90);
the key-decay chunked forward's last two spills (hgrn2's state kernel on sm_80, rwkv6's scores in float16 on sm_90);
and six float32 calls ("ieee" dots) at float32's own defaults: three of the parallel form's (linear_attention,
retention, gla; benchmarks/results/kernel_matrix_float32.json), about 15 s of CPU time more, and three of the linear
chunked form's (linear_attention, gla, mamba2; benchmarks/results/kernel_matrix_float32_chunked.json), about 40 s more.
Every kernel must use no local memory (`spill_bytes == 0`: cuobjdump's STACK + LOCAL), fit the target's shared
memory and launch a grid within CUDA's limits (tests/test_grid_limits.py checks a call past them).

The test session runs Triton in its interpreter (conftest), where kernels run instead of compiling, so the
compiles happen in one child process without TRITON_INTERPRET (as in tests/test_kernel_report.py): about 25 s
on two idle cores, about 50 s with the sm_80 backward calls; with the recurrent adjoints 72 s of CPU time (7 minutes
of wall time on the shared machine under load, 2026-11-30; 190 s with the hgrn2 and rwkv6 calls, 2026-12-01). The
last two tests check the register-limit declarations (`_register_limited`, `_launch`) without compiling.
"""

from __future__ import annotations

import json
import sys

import pytest

from codegen import kernel_report

from .children import Child
from .conftest import REPO

pytest.importorskip("triton")

try:
    for _target in ("sm_80", "sm_90"):
        kernel_report.find_tools(_target)
    _MISSING = ""
except kernel_report.ToolMissing as err:
    _MISSING = str(err)

# (spec, form, target, B, T, H, backward, K = V[, dtype]): the calls compiled, in bfloat16 unless a dtype is given;
# with backward, the backward's kernels too (the chunked forms' Triton backward kernels, codegen/triton_runtime.py;
# the recurrent adjoint)
CALLS = [
    ("gla", "chunked", "sm_90", 2, 256, 4, True, 128),
    ("gla", "chunked", "sm_80", 2, 256, 4, False, 128),
    ("gla", "chunked", "sm_80", 1, 128, 2, True, 64),  # _chunk_bwd_plain_kernel spilled 16 B at 4 warps
    ("gated_delta_net", "chunked", "sm_90", 2, 256, 4, True, 128),
    ("gated_delta_net", "chunked", "sm_80", 2, 256, 4, True, 128),
    ("gated_delta_net", "chunked", "sm_80", 1, 128, 2, True, 64),  # dqk / WY spilled 832 / 840 B here
    # the diagonal-plus-rank-one chunked form: its state kernel (DPLR) at 1 stage below sm_90 (2 needed 177 KB of
    # shared memory), its WY kernel at 8 warps (16 B spilled at 4); the backward is the recurrent adjoint
    ("rwkv7", "chunked", "sm_80", 1, 128, 2, True, 128),
    ("rwkv7", "recurrent", "sm_90", 1, 64, 16, True, 128),  # the grid at decode shapes, forward and adjoint
    ("rwkv7", "recurrent", "sm_80", 1, 64, 2, True, 64),  # the adjoint spilled 8 B at 4 warps
    ("kda", "chunked", "sm_90", 1, 256, 2, True, 128),  # tests/data/kda.rec: the key-decay delta rule's backward
    # The recurrent adjoints that spilled last: minimal_rnn's (its [D, D] params; 608-728 B), and on sm_90 those
    # ptxas stopped at 128 registers at 8 warps (8-32 B) before the launcher passed maxnreg.
    ("minimal_rnn", "recurrent", "sm_90", 1, 64, 2, True, 128),
    ("minimal_rnn", "recurrent", "sm_80", 1, 64, 2, True, 128),
    ("retention", "recurrent", "sm_90", 1, 64, 2, True, 128),
    ("mamba2", "recurrent", "sm_90", 1, 64, 2, True, 128),
    # the log-decay gradient of an exclusive query (rwkv6 reads S before the update) spilled 24 B at 4 warps
    ("rwkv6", "chunked", "sm_90", 1, 64, 2, True, 128),
    # the chunk state kernel without maxnreg: 8 B at ptxas' 168-register cap (normalized_linear_attention) and a
    # stack slot at 80 registers (mlstm), bfloat16 on sm_80 (benchmarks/kernel_matrix.py, 2026-12-01)
    ("normalized_linear_attention", "chunked", "sm_80", 1, 64, 2, False, 64),
    ("mlstm", "chunked", "sm_80", 1, 64, 2, False, 64),
    # the key-decay chunk state kernel at 4 warps: 8 B at 255 registers (hgrn2, sm_80; T = 128, for with one chunk
    # Triton specialises NT = 1 and the loop compiles clean), and the key decay's forward scores without maxnreg: a
    # stack slot at 72 registers (rwkv6, float16, sm_90; benchmarks/kernel_matrix.py, 2026-12-01)
    ("hgrn2", "chunked", "sm_80", 1, 128, 2, False, 64),
    ("rwkv6", "chunked", "sm_90", 1, 64, 4, False, 128, "float16"),
    # the parallel form's attention kernel with a mapped load or gradient store at 4 warps: 8-32 B at 255
    # registers (normalized_linear_attention's backward, sm_80; benchmarks/kernel_matrix.py --forms parallel)
    ("normalized_linear_attention", "parallel", "sm_80", 1, 64, 2, True, 64),
    # float32 ("ieee" dots: FMA loops holding a thread's operand rows and columns in registers) at the half-precision
    # blocks spilled: the parallel attention kernels 1.1-1.6 KB (block_t 64; linear_attention, sm_80) and 248-296 B
    # (retention at K = V = 128, sm_90), gla's 16 B and its log-decay kernel 56 B (block_t 32; benchmarks/
    # kernel_matrix.py --dtypes float32, 2026-12-01)
    ("linear_attention", "parallel", "sm_80", 1, 64, 2, True, 64, "float32"),
    ("retention", "parallel", "sm_90", 1, 64, 2, True, 128, "float32"),
    ("gla", "parallel", "sm_90", 1, 64, 2, True, 64, "float32"),
    # the linear chunked form in float32 at the half-precision blocks (BK = BV = 64, 4 warps, 2 stages) spilled:
    # linear_attention's output kernel 9.8 KB (32 registers), gla's state, dstate and plain kernels up to 7.3 KB,
    # Mamba2's output and scalar log-decay kernels 16-112 B; now chunks of 64 still, with K / V blocks of 32 (V 16
    # for gla), 1 stage, 8 warps for the state and output kernels (results/kernel_matrix_float32_chunked.json)
    ("linear_attention", "chunked", "sm_80", 1, 128, 2, True, 64, "float32"),
    ("gla", "chunked", "sm_80", 1, 128, 2, True, 64, "float32"),
    ("mamba2", "chunked", "sm_90", 1, 128, 2, True, 128, "float32"),
    # the fused scan's backward adding the prologue's gradients in its kernels (mamba__scan_h_vjp): 16 B at 255
    # registers in chunks of 32 steps on sm_90 (D = 64 and 128, N = 16), 168 registers in chunks of 16; mlstm's n
    # state a stack slot (8 B at 96 registers) in chunks of 16: now 8 (`_SCAN_BT_VJP`)
    ("mamba", "scan", "sm_90", 1, 64, 2, True, 64),
    ("mlstm", "scan", "sm_90", 1, 64, 2, True, 64),
]

CHILD = '''
import json, os, sys
import torch
import recurrence_dsl
from codegen import kernel_report as kr

calls, dirs = json.loads(sys.argv[1]), sys.argv[2:]
runs = []
for name, form, target, B, T, H, backward, size, *dtype in calls:
    path = next(p for p in (f"{d}/{name}.rec" for d in dirs) if os.path.exists(p))
    rec = recurrence_dsl.load(path)[name]
    sizes = {s: size for s in rec.checked.sizes}
    kernels = kr.report_recurrence(rec, sizes, B, T, H, dtype=getattr(torch, (dtype or ["bfloat16"])[0]),
                                   target=target, form=form, backward=backward)
    runs.append({"name": name, "form": form, "target": target, "size": size, "dtype": (dtype or ["bfloat16"])[0],
                 "kernels": [k.as_dict() for k in kernels]})
print(json.dumps(runs))
'''


# run in the background from the start of the session (tests/children.py)
COMPILES = Child("no_spills", [sys.executable, "-c", CHILD, json.dumps(CALLS), str(REPO / "specs"),
                               str(REPO / "tests" / "data")])


@pytest.mark.skipif(bool(_MISSING), reason=_MISSING or "-")
@COMPILES.needed
def test_no_spills_at_default_configs():
    done = COMPILES.result()
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    assert [(r["name"], r["form"], r["target"]) for r in runs] == [c[:3] for c in CALLS]
    rows = [(f"{r['name']} K=V={r['size']}", r["target"], k) for r in runs for k in r["kernels"]]
    table = "\n".join(f"{n} {t} {k['phase']} {k['name']}: grid {k['grid']}, {k['num_warps']} warps, "
                      f"{k['registers']} registers, {k['spill_bytes']} B local, {k['shared_bytes']} B shared"
                      for n, t, k in rows)
    print(table)
    spilling = [f"{n} {t} {k['name']}" for n, t, k in rows if k["spill_bytes"] != 0]
    assert not spilling, f"spilling kernels: {spilling}\n{table}"
    for _, t, k in rows:
        assert 0 < k["registers"] <= kernel_report.MAX_REGISTERS
        assert k["shared_bytes"] <= kernel_report.TARGETS[t].max_shared_bytes, table
        assert all(n <= limit for n, limit in zip(k["grid"], kernel_report.MAX_GRID)), table
    names = {(r["name"], r["target"], phase): {k["name"] for k in r["kernels"] if k["phase"] == phase}
             for r in runs if r["size"] == 128 for phase in ("forward", "backward")}
    small = {(r["name"], r["target"]): {k["name"] for k in r["kernels"] if k["phase"] == "backward"}
             for r in runs if r["size"] == 64}
    assert names[("gla", "sm_90", "forward")] == {"_triton_intra_attn_kernel",
                                                  "_triton_chunk_state_kernel", "_triton_chunk_output_kernel"}
    assert names[("gla", "sm_90", "backward")] == {
        "_triton_cumsum_kernel", "_triton_chunk_dstate_kernel", "_triton_intra_attn_kernel",
        "_triton_chunk_output_value_kernel", "_triton_chunk_bwd_decayed_kernel", "_triton_chunk_bwd_plain_kernel",
        "_triton_dlog_chunk_kernel"}
    assert not names[("gla", "sm_80", "backward")]  # a forward-only call
    assert "_triton_chunk_bwd_plain_kernel" in small[("gla", "sm_80")]
    assert {f"_triton_delta_bwd_{k}_kernel" for k in ("local", "dh", "dqk", "wy", "dl", "wy_k")} <= small[
        ("gated_delta_net", "sm_80")] == names[("gated_delta_net", "sm_80", "backward")]
    assert small[("rwkv7", "sm_80")] == {"rwkv7__triton_recurrent_adjoint_kernel"}
    assert names[("gated_delta_net", "sm_80", "forward")] == {"_triton_cumsum_kernel", "_triton_delta_wy_kernel",
                                                   "_triton_delta_state_kernel", "_triton_chunk_output_kernel"}
    assert {f"_triton_delta_bwd_{k}_kernel" for k in ("local", "dh", "dqk", "wy", "wy_k")} <= names[
        ("gated_delta_net", "sm_90", "backward")]
    assert {f"_triton_delta_bwd_{k}_kernel" for k in ("local", "dh", "dqk", "intra", "wy", "wy_k")} <= names[
        ("kda", "sm_90", "backward")]
    assert names[("rwkv7", "sm_80", "forward")] == {"_triton_cumsum_kernel", "_triton_intra_attn_kernel",
                                                    "_triton_dplr_wy_kernel", "_triton_delta_state_kernel",
                                                    "_triton_chunk_output_kernel"}  # (no prologue kernel: its b and
    # bonus are formed where the kernels load a, kk and r, k: `b_map`, `bonus`)
    # (the chunked form trains through the recurrent adjoint's chunk-parallel mode: its scan over the chunks too)
    assert names[("rwkv7", "sm_80", "backward")] == {"rwkv7__triton_recurrent_adjoint_kernel",
                                                     "rwkv7__triton_segment_scan_kernel"}
    # The recurrent kernel and its derived adjoint tile V (issue 10: B = 1, H = 16, K = V = 128 launches at least 64
    # programs): 16 x 4 programs of [128, 32] state tiles each.
    recurrent, adjoint = next(r for r in runs if (r["name"], r["target"]) == ("rwkv7", "sm_90"))["kernels"]
    assert recurrent["name"] == "rwkv7__triton_recurrent_kernel" and recurrent["grid"] == [16, 4, 1]
    assert adjoint["name"] == "rwkv7__triton_recurrent_adjoint_kernel" and adjoint["grid"] == [16, 4, 1]
    adjoints = {(r["name"], r["target"]): [k for k in r["kernels"] if k["phase"] == "backward"] for r in runs
                if r["form"] == "recurrent" and r["size"] == 128}
    for key in [("minimal_rnn", "sm_90"), ("minimal_rnn", "sm_80"), ("retention", "sm_90"), ("mamba2", "sm_90")]:
        (adjoint,) = adjoints[key]
        assert adjoint["name"] == f"{key[0]}__triton_recurrent_adjoint_kernel", adjoint
    # minimal_rnn holds its whole [128, 128] params' step in one program per (batch, head): 8 warps, and the
    # register limit lets ptxas use 255 registers a thread (it stopped at 128 unasked)
    assert [k["num_warps"] for k in adjoints[("minimal_rnn", "sm_90")]] == [8]
    assert adjoints[("minimal_rnn", "sm_90")][0]["registers"] > 128
    # the key decay's chunk state kernel runs 8 warps (hgrn2), its forward scores kernel with maxnreg (rwkv6 float16:
    # more than the 72 registers ptxas stopped at unasked)
    hgrn2 = {k["name"]: k for r in runs if r["name"] == "hgrn2" for k in r["kernels"]}
    assert hgrn2["_triton_chunk_state_kernel"]["num_warps"] == 8
    rwkv6 = {k["name"]: k for r in runs if (r["name"], r["dtype"]) == ("rwkv6", "float16") for k in r["kernels"]}
    assert rwkv6.keys() == {"_triton_chunk_state_kernel", "_triton_intra_attn_kernel", "_triton_chunk_output_kernel",
                            "rwkv6__chunked_prologue_triton_kernel"}
    assert rwkv6["_triton_intra_attn_kernel"]["registers"] > 72
    # float32's defaults: the parallel form's blocks of 16 rows (T = 64: 4 query blocks), the scalar log-decay kernel
    # at 4 warps, a key decay's attention kernel at 8
    f32 = {(r["name"], r["form"]): r["kernels"] for r in runs if r["dtype"] == "float32"}
    for name in ("linear_attention", "retention", "gla"):
        attn = [k for k in f32[(name, "parallel")] if k["name"] == "_triton_parallel_attn_kernel"]
        assert len(attn) == 4 and all(k["grid"][1] == 4 for k in attn), attn
        assert {k["num_warps"] for k in attn} == ({8} if name == "gla" else {4})
    (dlog,) = [k for k in f32[("retention", "parallel")] if k["name"] == "_triton_parallel_dlog_scalar_kernel"]
    assert dlog["num_warps"] == 4 and dlog["grid"][0] == 4
    # the linear chunked form in float32: T = 128 still runs 2 chunks of 64 (grid axis 1 of the output kernel), its
    # V in blocks of 32 (16 with gla's key decay), its state, output and plain kernels at 1 stage
    for name, vblocks in (("linear_attention", 2), ("gla", 4), ("mamba2", 4)):
        kernels = f32[(name, "chunked")]
        out = [k for k in kernels if k["name"] == "_triton_chunk_output_kernel" and k["phase"] == "forward"]
        assert out and all(k["grid"][:2] == [vblocks, 2] and k["num_warps"] == 8 for k in out), out
        assert {k["num_stages"] for k in kernels if k["name"] in (
            "_triton_chunk_state_kernel", "_triton_chunk_output_kernel", "_triton_chunk_bwd_plain_kernel")} == {1}


def test_launch_adds_the_register_limit_where_a_kernel_declares_it(monkeypatch):
    from types import SimpleNamespace

    from codegen import triton_runtime as rt

    launched = []

    class Kernel:  # stands in for a @triton.jit function: kernel[grid](*args, **options) records the launch
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **options: launched.append(options)

    def fn(x, DECAY, PREC="tf32"):
        pass

    key_only = rt._register_limited(lambda a: a["DECAY"] == 2)(Kernel(fn))
    always, plain = rt._register_limited()(Kernel(fn)), Kernel(fn)
    target = SimpleNamespace(backend="cuda", arch=90)
    monkeypatch.setattr(rt, "triton", SimpleNamespace(runtime=SimpleNamespace(driver=SimpleNamespace(
        active=SimpleNamespace(get_current_target=lambda: target)))))
    rt._launch(key_only, (1,), 0, 2, num_warps=16)  # DECAY given by position
    rt._launch(key_only, (1,), 0, DECAY=2, num_warps=4)  # ... and by name
    rt._launch(key_only, (1,), 0, 1, num_warps=16)
    rt._launch(always, (1,), 0, 1, num_warps=8)
    rt._launch(always, (1,), 0, 1, num_warps=8, maxnreg=96)  # a limit the call gives wins
    rt._launch(plain, (1,), 0, 2, num_warps=8)
    assert [o.get("maxnreg") for o in launched] == [128, 255, None, 255, 96, None]
    target.backend = "hip"  # not a CUDA target: no limit
    rt._launch(always, (1,), 0, 1, num_warps=8)
    assert "maxnreg" not in launched[-1]


def test_every_register_limited_kernel_launches_through_the_one_helper():
    # a kernel declared `_register_limited` launched as kernel[grid](...) would silently lose its limit, and a launch
    # site that adds `_register_limit` itself is the per-site special case the declaration replaces
    import ast

    runtime = (REPO / "codegen" / "triton_runtime.py").read_text()
    tree = ast.parse(runtime)
    declared = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)
                and any("_register_limited" in ast.unparse(d) for d in node.decorator_list)}
    assert {"_intra_attn_kernel", "_chunk_state_kernel", "_chunk_output_kernel", "_chunk_bwd_plain_kernel",
            "_dlog_chunk_kernel", "_delta_bwd_dqk_kernel"} <= declared
    for path in ("triton_runtime.py", "triton_recurrent.py"):
        text = (REPO / "codegen" / path).read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                assert ast.unparse(node.func.value) not in declared, f"{path}: {ast.unparse(node)[:120]}"
        outside = [ast.unparse(n)[:120] for f in ast.parse(text).body if isinstance(f, ast.FunctionDef)
                   and f.name not in ("_launch", "_register_limit") for n in ast.walk(f)
                   if isinstance(n, ast.Call) and ast.unparse(n.func) == "_register_limit"]
        assert not outside, f"{path}: {outside}"


def test_float32_defaults_leave_half_precision_as_they_were():
    # the float32 ("ieee") block sizes of the parallel form, and that a half-precision call (or a float32 one with
    # allow_tf32) keeps the defaults the bfloat16 matrix was run at
    import torch

    from codegen import triton_parallel as tp

    def k_of(dtype, K=128):
        return torch.zeros(1, 256, 2, K, dtype=dtype)

    for key in (False, True):
        assert tp._parallel_config(k_of(torch.float32), 128, None, None, None, None, key)[::3] == (16, "ieee")
        assert tp._parallel_config(k_of(torch.float32), 128, 64, None, None, None, key)[0] == 64  # a given block
    assert tp._parallel_config(k_of(torch.bfloat16), 128, None, None, None, None) == (64, 64, 64, "tf32")
    assert tp._parallel_config(k_of(torch.float16), 128, None, None, None, None, True) == (32, 32, 32, "tf32")
    assert tp._parallel_config(k_of(torch.float32), 128, None, None, None, True) == (64, 64, 64, "tf32")


def test_float32_chunked_defaults_keep_the_chunk_and_leave_half_precision_as_they_were():
    # the linear chunked form in float32 ("ieee" dots) narrows only its K / V blocks (chunk 64 kept: the chunk states
    # a training step keeps scale with 1 / BT, tests/test_intermediate_bytes.py); half precision, a float32 call with
    # allow_tf32 and given blocks keep what they ran; the delta rule keeps BK = K
    import torch

    from codegen import triton_runtime as rt

    def k_of(dtype, K=128):
        return torch.zeros(1, 256, 2, K, dtype=dtype)

    f32 = k_of(torch.float32)
    assert rt._config(f32, 128, 64, None, None, None, delta=False) == (64, 32, 32, "ieee")
    assert rt._config(f32, 128, 64, None, None, None, delta=False, lane_decay=True) == (64, 32, 16, "ieee")
    assert rt._config(k_of(torch.float32, 16), 8, 64, None, None, None, delta=False) == (64, 16, 16, "ieee")
    assert rt._config(f32, 128, 64, 64, 64, None, delta=False, lane_decay=True) == (64, 64, 64, "ieee")  # given
    assert rt._config(f32, 128, 64, None, None, True, delta=False) == (64, 64, 64, "tf32")
    for half in (torch.bfloat16, torch.float16):
        for lane_decay in (False, True):
            assert rt._config(k_of(half), 128, 64, None, None, None, delta=False,
                              lane_decay=lane_decay) == (64, 64, 64, "tf32")
        assert rt._config(k_of(half), 128, 64, None, None, None, delta=True) == (64, 128, 64, "tf32")
    assert rt._config(f32, 128, 32, None, None, None, delta=True) == (32, 128, 64, "ieee")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_default_config_says_the_runtimes_defaults_at_the_dtype(dtype):
    # autotune's default config (what an untuned call runs) follows the dtype: float32's parallel block_t 16, its
    # linear chunked blocks of 32 (16 for V with a key decay) at chunk 64, its delta rule's chunks of 32 at 8 warps
    import torch

    import recurrence_dsl
    from autotune.space import Problem, default_config
    from codegen import triton_parallel as tp
    from codegen import triton_runtime as rt
    from recurrence_dsl.analysis import analyse

    def problem(name, size, length=256):
        rec = recurrence_dsl.load(REPO / "specs" / f"{name}.rec")[name]
        return Problem.from_analysis(analyse(rec.checked), {s: size for s in rec.checked.sizes}, length, dtype)

    k = torch.zeros(1, 256, 2, 128, dtype=getattr(torch, dtype))
    f32 = dtype == "float32"
    for name, lane in (("linear_attention", False), ("gla", True)):
        bt, bk, bv, _ = rt._config(k, 128, 64, None, None, None, delta=False, lane_decay=lane)
        assert default_config("chunked", "triton", problem(name, 128)) == {
            "chunk_size": bt, "block_k": bk, "block_v": bv, "num_warps": 4, "num_stages": rt._IEEE_LINEAR_STAGES
            if f32 else 2}
        assert (bt, bk, bv) == ((64, 32, 16 if lane else 32) if f32 else (64, 64, 64))
        bt, bk, bv, _ = tp._parallel_config(k, 128, None, None, None, None, lane)
        assert default_config("parallel", "triton", problem(name, 128)) == {
            "block_t": bt, "block_k": bk, "block_v": bv, "num_warps": 4, "num_stages": 2}
        assert bt == (16 if f32 else 32 if lane else 64)
    chunk, warps, stages = rt._delta_ieee_defaults(k, 64, None, None, None)
    delta = default_config("chunked", "triton", problem("delta_net", 128))
    assert (delta["chunk_size"], delta["num_warps"], delta["num_stages"]) == (chunk, warps or 4, stages or 2)
    assert delta["chunk_size"] == (32 if f32 else 64) and delta["block_k"] == 128
    assert delta["block_v"] == rt._config(k, 128, 64, None, None, None, delta=True)[2] == 64  # K blocks of 64
    assert default_config("chunked", "torch", problem("gla", 64)) == {"chunk_size": 64}
    assert default_config("chunked", "triton", problem("gla", 64, length=20))["chunk_size"] == 32  # clamped


def test_problem_dtype_defaults_to_bfloat16_and_takes_torch_dtypes():
    import torch

    from autotune.space import Problem

    assert Problem(length=64).dtype == "bfloat16"
    assert Problem(length=64, dtype=torch.float32).dtype == "float32"
    assert Problem(length=64, dtype=torch.float64).dtype == "float64"  # (tuned on the torch backend only)
    with pytest.raises(ValueError, match="float32, bfloat16, float16 or float64"):
        Problem(length=64, dtype="int8")
