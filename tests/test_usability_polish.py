"""Small usability fixes a new user met: a partial `config=` overrides the defaults for the keys it gives (bad
keys and values named), meta-device calls, `recdsl tune` checking its arguments before any work, every name
clash of a spec with the generated module in one error, and `recdsl explain`."""

from __future__ import annotations

import pytest
import torch

import recurrence_dsl
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPECS_DIR

GLA = str(SPECS_DIR / "gla.rec")


@pytest.fixture(scope="module")
def gla():
    rec = recurrence_dsl.load(GLA)["gla"]
    layer = recurrence_dsl.compile(rec, tuning=False)
    args, _ = sample_arguments(rec.checked, {"K": 16, "V": 16}, 1, 40, 1, dtype=torch.float32, seed=0)
    return layer, args


# -- 1. config= may give some of a form's keys --------------------------------------------------------------------


def test_a_single_key_config_overrides_that_key_and_keeps_the_other_defaults(gla):
    layer, args = gla
    plan = layer.config_for(*args, backend="torch", config={"chunk_size": 16})
    assert (plan["form"], plan["chunk_size"], plan["config"], plan["source"]) == ("chunked", 16, {}, "call")
    plan = layer.config_for(*args, backend="triton", form="chunked", config={"block_k": 16})
    assert (plan["chunk_size"], plan["config"]) == (64, {"block_k": 16})  # the layer's chunk_size is kept
    plan = layer.config_for(*args, backend="triton", form="parallel", config={"num_warps": 2})
    assert plan["config"] == {"num_warps": 2}
    # under auto each form gets the keys it takes, so the form auto runs has its share
    shares = type(layer)._config_forms({"num_warps": 4}, None, layer.triton_forms, "triton")
    assert shares == {f: {"num_warps": 4} for f in layer.triton_forms}
    for T, runs in ((40, "parallel"), (200, "chunked")):
        long_args, _ = sample_arguments(recurrence_dsl.load(GLA)["gla"].checked, {"K": 16, "V": 16}, 1, T, 1,
                                        dtype=torch.float32, seed=0)
        plan = layer.config_for(*long_args, backend="triton", config={"num_warps": 8})
        assert (plan["form"], plan["config"]) == (runs, {"num_warps": 8})
    plan = layer.config_for(*args, backend="triton", config={"block_k": 16})
    assert (plan["form"], plan["config"]) == ("parallel", {"block_k": 16})
    ref = layer(*args, backend="torch")[0]
    for backend in ("torch", "triton"):
        out = layer(*args, backend=backend, config={"chunk_size": 16})[0]
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    out = layer(*args, backend="triton", form="parallel", config={"block_t": 16})[0]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("backend", "form", "config", "message"), [
    ("torch", None, {"chunk_sise": 32}, r"config key 'chunk_sise' is not taken by any form on the torch backend "
     r"\(did you mean 'chunk_size'\?\); valid keys: chunked takes chunk_size$"),
    ("triton", "parallel", {"chunk_size": 32}, r"config key 'chunk_size' is not a key of the parallel form on the "
     r"triton backend; valid keys: parallel takes block_t, block_k, block_v, num_warps, num_stages$"),
    ("triton", "chunked", {"blok_v": 32}, r"'blok_v' is not a key of the chunked form .*did you mean 'block_v'.*"
     r"valid keys: chunked takes chunk_size, block_k, block_v, num_warps, num_stages"),
    ("triton", None, {"block_t": 16, "chunk_size": 32}, r"config block_t is for the scan and parallel forms, but "
     r"auto runs the chunked form for this call \(40 steps\): pass form="),
    ("triton", None, {"block_n": 16}, r"config block_n is for the scan form, but auto runs the parallel form for "
     r"this call \(40 steps\)"),
    ("triton", "chunked", {"block_k": 24}, r"config block_k must be a power of two >= 16, got 24 \(the chunked"),
    ("triton", "scan", {"block_n": 0}, r"config block_n must be a power of two >= 1, got 0 \(the scan form\)"),
    ("triton", "chunked", {"num_warps": 64}, r"config num_warps must be a power of two from 1 to 32, got 64"),
    ("triton", "chunked", {"num_stages": 0}, r"config num_stages must be an integer >= 1, got 0"),
    ("triton", "chunked", {"block_v": "32"}, r"config block_v must be an integer, got '32'"),
    ("triton", None, {"chunk_size": 24}, r"chunk_size must be a power of two >= 16 on the triton backend, got 24"),
    ("torch", None, {"chunk_size": -1}, r"chunk_size must be an integer >= 1, got -1"),
    ("torch", None, {}, r"config is empty"),
])
def test_a_bad_config_key_or_value_is_named(gla, backend, form, config, message):
    layer, args = gla
    with pytest.raises(recurrence_dsl.CallError, match=message):
        layer.config_for(*args, backend=backend, form=form, config=config)
    with pytest.raises(recurrence_dsl.CallError, match=message):  # the call itself, before any kernel runs
        layer(*args, backend=backend, form=form, config=config)


# -- 2. meta tensors: outputs of the right shapes, no values read --------------------------------------------------


def test_a_meta_call_gives_meta_outputs_of_the_shapes_a_real_call_gives(gla):
    layer, args = gla
    real, real_final = layer(*args, backend="torch", output_final_state=True)
    meta = [a.to("meta").requires_grad_() for a in args]
    out, final = layer(*meta, output_final_state=True)
    assert (out.device.type, out.shape, out.dtype) == ("meta", real.shape, real.dtype)
    assert (final.device.type, final.shape, final.dtype) == ("meta", real_final.shape, real_final.dtype)
    out.sum().backward()  # autograd reaches every input: meta gradients of the inputs' shapes
    assert all(a.grad is not None and a.grad.shape == a.shape and a.grad.is_meta for a in meta)
    half = [a.to("meta", torch.bfloat16) for a in args]
    out, final = layer(*half, cu_seqlens=torch.tensor([0, 15, 40], device="meta"), output_final_state=True,
                       form="chunked")  # packed: a final state per sequence, boundaries not read
    assert (out.shape, out.dtype, final.shape, final.dtype) == (real.shape, torch.bfloat16,
                                                                (2,) + real_final.shape[1:], torch.float32)
    with pytest.raises(recurrence_dsl.CallError, match="cu_seqlens is on meta but the inputs are on cpu"):
        layer(*[a[:1] for a in args], cu_seqlens=torch.tensor([0, 15, 40], device="meta"))
    with pytest.raises(recurrence_dsl.CallError, match="input 'k' is on cpu but 'q' is on meta"):
        layer(meta[0], *args[1:])
    # a layer built for the Triton backend infers shapes on meta too (no kernel runs for a meta call)
    out, final = layer(*meta, backend="triton", form="chunked", output_final_state=True)
    assert (out.device.type, out.shape, final.shape) == ("meta", real.shape, real_final.shape)
    with pytest.raises(recurrence_dsl.CallError, match="config key 'blok_v' is not a key of the chunked form"):
        layer(*meta, backend="triton", form="chunked", config={"blok_v": 16})  # the call's checks still run


def test_a_module_built_on_the_meta_device_runs_forward_and_backward():
    import sys

    rec = recurrence_dsl.load(str(SPECS_DIR / "mamba2.rec"))["mamba2"]
    layer = recurrence_dsl.compile(rec, tuning=False)
    cls = sys.modules[type(layer).__module__].Mamba2
    with torch.device("meta"):
        module = cls(2, sizes={"N": 4, "P": 3})
        x, dt, b, c = (torch.randn(1, 40, 2, n) for n in (3, 1, 4, 4))  # T > 16: auto runs chunks
    out, _ = module(x, dt[..., 0], b, c)
    assert out.is_meta and out.shape == (1, 40, 2, 3)
    out.sum().backward()
    assert {name: p.grad.shape for name, p in module.named_parameters()} == {"A": (2,), "D": (2,)}


# -- 3. recdsl tune checks its counts while parsing, before any work -----------------------------------------------


@pytest.mark.parametrize(("argv", "message"), [
    (["--trials", "0"], "argument --trials: must be an integer >= 1, got 0"),
    (["--trials", "many"], "argument --trials: must be an integer >= 1, got 'many'"),
    (["--repeat", "0"], "argument --repeat: must be an integer >= 1, got 0"),
    (["--warmup", "-1"], "argument --warmup: must be an integer >= 0, got -1"),
])
def test_tune_refuses_a_bad_count_before_reading_the_spec_or_drawing_progress(argv, message, capsys, tmp_path):
    from recurrence_dsl.cli import main

    missing = str(tmp_path / "not_there.rec")  # never read: the command line is refused first
    with pytest.raises(SystemExit) as info:
        main(["tune", missing, "--store", str(tmp_path / "t.sqlite"), *argv])
    out, err = capsys.readouterr()
    assert info.value.code == 2 and out == ""
    assert err == f"recdsl tune: error: {message}; see recdsl tune --help\n"  # one line: no bar, no warning
    assert not (tmp_path / "t.sqlite").exists()


def test_tune_itself_refuses_a_negative_warmup():
    from autotune.tuner import tune

    rec = recurrence_dsl.load(GLA)["gla"]
    with pytest.raises(ValueError, match="warmup must be at least 0, got -1"):
        tune(rec, {"K": 16, "V": 16}, 1, 32, 1, warmup=-1, store=False)


# -- 4. every name clash with the generated module in one error -----------------------------------------------------

CLASHES = """\
recurrence tl(x[D], self) -> y[D] {
    param training[D], sizes[D]
    state h[D]
    h[d] = sigmoid(training[d] + sizes[d] + self) * h[d] + x[d]
    y[d] = h[d]
}
"""


def test_every_name_clash_is_reported_in_one_error(tmp_path, capsys):
    from recurrence_dsl.cli import main

    spec = tmp_path / "clashes.rec"
    spec.write_text(CLASHES)
    assert main(["compile", str(spec), "-o", str(tmp_path / "out.py")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{spec}: error: 4 names clash with the generated module's own; rename them all:\n")
    for where, words in (("1:1", "the recurrence name 'tl' clashes"), ("1:21", "'self' would hide 'self'"),
                         ("2:11", "param 'training' would replace the attribute"),
                         ("2:24", "param 'sizes' would clash with the argument 'sizes'")):
        assert f"clashes.rec:{where}: error: {words}" in err, err
    assert err.count("hint: rename") == 4 and "Traceback" not in err
    assert not (tmp_path / "out.py").exists()
    with pytest.raises(recurrence_dsl.SpecError) as info:  # compile() raises the same one error
        recurrence_dsl.compile(recurrence_dsl.load_text(CLASHES, "clashes.rec")["tl"])
    assert (info.value.line, info.value.column) == (1, 1) and len(info.value.clashes) == 4
    assert "and 3 more name clashes" in info.value.message
