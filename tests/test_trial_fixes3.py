"""A third trial's leftovers: an empty --config (refused as a call's config={} is), the generated nn.Module's checks
of heads, sizes and params (codegen/module.py), `recdsl tune` that tunes nothing, and "an int64 tensor"."""

from __future__ import annotations

import json

import pytest
import torch

import recurrence_dsl
from codegen.load import load_module
from recurrence_dsl.analysis import analyse
from recurrence_dsl.cli import main
from recurrence_dsl.errors import CallError
from recurrence_dsl.sampling import sample_arguments

from .conftest import SPECS_DIR


def _spec(name: str):
    return recurrence_dsl.load(SPECS_DIR / f"{name}.rec")[name]


def _module_class(name: str):
    rec = _spec(name)
    return getattr(load_module(analyse(rec.checked)), "".join(p.title() for p in name.split("_"))), rec


# 1. an empty config: refused by the API and the CLI alike

def test_an_empty_config_is_refused_by_a_call_and_by_recdsl_kernels(capsys):
    rec = _spec("retention")
    layer = recurrence_dsl.compile(rec, backend="torch", tuning=False)
    args, _ = sample_arguments(rec.checked, {"K": 4, "V": 4}, 1, 5, 2, seed=0)
    with pytest.raises(CallError, match=r"^config is empty: give at least one key, or leave config out$"):
        layer(*args, config={})
    # (the check comes before ptxas is looked for, so this runs on any machine)
    code = main(["kernels", str(SPECS_DIR / "retention.rec"), "--config", "{}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == ("recdsl kernels: error: --config: config is empty: give at least one key, or leave "
                           "--config out")


def test_an_empty_config_string_is_not_json_rather_than_no_config(capsys):
    assert main(["kernels", str(SPECS_DIR / "retention.rec"), "--config", ""]) == 2
    assert "--config: not JSON" in capsys.readouterr().err


# 2. the generated module's heads and sizes

@pytest.mark.parametrize("name", ["mlstm", "rwkv6"])
@pytest.mark.parametrize(("heads", "sizes", "message"), [
    (0, {"K": 4, "V": 4}, "heads must be a positive int, got 0"),
    (-2, {"K": 4, "V": 4}, "heads must be a positive int, got -2"),
    (2.0, {"K": 4, "V": 4}, "heads must be a positive int, got 2.0"),
    (True, {"K": 4, "V": 4}, "heads must be a positive int, got True"),
    (2, {"K": 0, "V": 4}, "sizes['K'] must be a positive int, got 0"),
    (2, {"K": 4, "V": -1}, "sizes['V'] must be a positive int, got -1"),
    (2, {"K": "4"}, "sizes['K'] must be a positive int, got '4'"),
    (2, {"k": 4}, "sizes has 'k', which {name} does not declare (its sizes: K, V)"),
    (2, [("K", 4)], "sizes must be a dict of size name -> int, e.g. {'K': 64}, got list"),
])
def test_a_module_refuses_heads_and_sizes_that_are_not_positive_ints(name, heads, sizes, message):
    cls, _ = _module_class(name)
    with pytest.raises(ValueError) as info:
        cls(heads, sizes, backend="torch")
    assert str(info.value) == f"{cls.__name__}: {message.replace('{name}', name)}"


def test_a_module_takes_numpy_like_ints_and_keeps_its_sizes():
    cls, _ = _module_class("rwkv6")
    module = cls(torch.tensor(3), {"K": torch.tensor(4)}, backend="torch")  # (objects with __index__)
    assert tuple(module.u.shape) == (3, 4)


def test_a_module_without_params_checks_the_heads_of_its_inputs():
    cls, rec = _module_class("mlstm")
    module = cls(3, backend="torch")
    args, _ = sample_arguments(rec.checked, {"K": 4, "V": 4}, 1, 5, 2, seed=0)
    with pytest.raises(CallError, match=r"^Mlstm was built with heads=3, but input 'q' has H=2 \(inputs are "
                                        r"\[B, T, H, \.\.\.\], got shape \[1, 5, 2, 4\]\)$"):
        module(*args)
    out, _ = cls(2, backend="torch")(*args)  # the heads it was built with: runs
    assert out.shape == (1, 5, 2, 4)


def test_a_module_refuses_a_given_param_of_other_heads_or_sizes():
    cls, _ = _module_class("rwkv6")
    with pytest.raises(ValueError, match=r"^Rwkv6: param u must have shape \[H, K\] \(\[H=3, K=4\] from heads and "
                                         r"sizes\), got \[2, 4\]$"):
        cls(3, {"K": 4}, u=torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"^Rwkv6: param u must have shape \[H, K\] \(\[H=2, K=8\] from heads"):
        cls(2, {"K": 8}, u=torch.zeros(2, 4))
    assert tuple(cls(2, u=torch.zeros(2, 4)).u.shape) == (2, 4)  # no sizes=: the given param fixes K


# 3. a param passed to forward

def _rwkv6_call():
    cls, rec = _module_class("rwkv6")
    module = cls(2, {"K": 4}, backend="torch")
    args, _ = sample_arguments(rec.checked, {"K": 4, "V": 3}, 1, 5, 2, seed=0)
    return module, args[:4], args[4]


def test_a_param_passed_to_forward_by_name_says_the_module_owns_it():
    module, inputs, u = _rwkv6_call()
    with pytest.raises(CallError, match=r"^Rwkv6.forward\(\) got param 'u': the module owns 'u' \(the "
                                        r"nn.Parameter Rwkv6.u, set when the module is built\), so it is not a "
                                        r"forward argument; forward takes r, k, v, w, initial_state, "):
        module(*inputs, u=u)
    with pytest.raises(TypeError, match=r"^Rwkv6.forward\(\) got an unexpected keyword argument 'x'; it takes r, "):
        module(*inputs, x=u)
    with pytest.raises(TypeError, match=r"^Rwkv6.forward\(\) got 'form': a module's form is set when it is built "
                                        r"\(Rwkv6\(heads, form=...\)\) or on the module afterwards "
                                        r"\(module.form = ...\)"):
        module(*inputs, form="recurrent")
    module.form = "recurrent"  # as the message says
    torch.testing.assert_close(module(*inputs)[0], module.__class__(2, {"K": 4}, backend="torch")(*inputs)[0])


def test_a_param_passed_to_forward_by_position_says_the_module_owns_it():
    module, inputs, u = _rwkv6_call()
    with pytest.raises(CallError, match=r"^Rwkv6.forward\(\): the argument after the inputs is initial_state, and "
                                        r"it has the shape of param 'u' \[2, 4\]; the module owns 'u'"):
        module(*inputs, u)
    out, final = module(*inputs, torch.zeros(1, 2, 4, 3), True)  # a real initial state by position still works
    assert out.shape == (1, 5, 2, 3) and final.shape == (1, 2, 4, 3)


# 4. recdsl tune that tunes nothing

@pytest.mark.parametrize(("argv", "why"), [
    (["--form", "parallel", "--backend", "torch"], "retention: the torch parallel form has nothing to tune (it takes "
                                                   "no config); skipped (try --backend triton)"),
    (["--form", "recurrent", "--backend", "torch"], "retention: the torch recurrent form has nothing to tune"),
])
def test_tune_that_tunes_nothing_says_so_and_stores_nothing(tmp_path, capsys, argv, why):
    store = tmp_path / "t.sqlite"
    argv = ["tune", str(SPECS_DIR / "retention.rec"), "--device", "cpu", "--store", str(store), "--shape",
            "B=1,T=8,H=1,K=4,V=4", "--no-progress", *argv]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0  # (not an error: a script may tune each form in turn)
    assert "trials and choices stored in" not in captured.out
    assert captured.out.strip() == ("nothing tuned: the recurrence was skipped (see above), so nothing was stored "
                                    f"in {store}")
    assert why in captured.err
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["results"] == [] and len(out["skipped"]) == 1 and why in out["skipped"][0]
    assert not store.exists()


def test_tune_of_a_form_one_recurrence_lacks_skips_it_and_tunes_the_other(tmp_path, capsys):
    spec = tmp_path / "two.rec"
    spec.write_text(
        "recurrence lin(k[K], v[V]) -> o[V] {\n    state S[K, V]\n    S[i, j] = 0.5 * S[i, j] + k[i] * v[j]\n"
        "    o[j] = sum(i, S[i, j])\n}\n"
        "recurrence sq(x) -> y {\n    state h\n    h = 0.5 * h * h + x\n    y = h\n}\n")
    store = tmp_path / "t.sqlite"
    code = main(["tune", str(spec), "--device", "cpu", "--store", str(store), "--shape", "B=1,T=8,H=1,K=4,V=4",
                 "--form", "chunked", "--backend", "torch", "--trials", "1", "--repeat", "1", "--warmup", "0",
                 "--no-progress", "--no-check"])
    captured = capsys.readouterr()
    assert "sq: no chunked form (it has recurrent); skipped" in captured.err
    assert "lin:" not in captured.err
    assert "lin (spec hash" in captured.out and "stored in" in captured.out
    assert code in (0, 1) and store.exists()


# 5. articles

@pytest.mark.parametrize(("dtype", "shown"), [(torch.int64, "an int64"), (torch.int32, "an int32"),
                                              (torch.int8, "an int8"), (torch.uint8, "a uint8"),
                                              (torch.bool, "a bool"), (torch.complex64, "a complex64")])
def test_a_tensor_of_the_wrong_kind_is_named_with_its_article(dtype, shown):
    rec = _spec("min_gru")
    layer = recurrence_dsl.compile(rec, backend="torch", tuning=False)
    args, _ = sample_arguments(rec.checked, {"D": 4}, 1, 5, 2, seed=0)
    with pytest.raises(CallError, match=rf"^initial_state must be a floating-point tensor of shape \[B, H, D\], got "
                                        rf"{shown} tensor of shape \[1, 2, 4\]$"):
        layer(*args, initial_state=torch.zeros(1, 2, 4, dtype=dtype))
    with pytest.raises(CallError, match=r"got an int64 tensor of shape \[1, 3\]$"):
        layer(*args, cu_seqlens=torch.tensor([[0, 2, 5]]))
    with pytest.raises(CallError, match=r"got a float32 tensor of shape \[3\]$"):
        layer(*args, cu_seqlens=torch.tensor([0.0, 2.0, 5.0]))


# found trying the CLI as a new user

def test_debug_is_taken_after_the_command_too(capsys, monkeypatch):
    monkeypatch.delenv("RECURRENCE_DSL_DEBUG", raising=False)
    assert main(["explain", str(SPECS_DIR / "gla.rec"), "--debug"]) == 0
    assert "recurrence gla" in capsys.readouterr().out
    import recurrence_dsl.cli as cli

    def broken(args):
        raise KeyError("boom")

    # the subcommand's --debug reaches run_command: the internal error comes with its traceback
    args, _ = cli.build_parser().parse_known_args(["explain", str(SPECS_DIR / "gla.rec"), "--debug"])
    args.run = broken
    assert cli.run_command(args) == cli.BUG_EXIT
    assert "Traceback" in capsys.readouterr().err
    args, _ = cli.build_parser().parse_known_args(["explain", str(SPECS_DIR / "gla.rec")])
    args.run = broken
    assert cli.run_command(args) == cli.BUG_EXIT
    assert "Traceback" not in capsys.readouterr().err


def test_an_unknown_option_is_named_by_its_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["kernels", str(SPECS_DIR / "gla.rec"), "--bogus", "1"])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == ("recdsl kernels: error: unrecognized arguments: --bogus 1; see recdsl "
                                               "kernels --help")


def test_compile_onto_a_directory_suggests_a_file_in_it(tmp_path, capsys):
    assert main(["compile", str(SPECS_DIR / "gla.rec"), "-o", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"recdsl compile: error: -o: {tmp_path} is a directory; give the "
                                               f"module's file, e.g. -o {tmp_path / 'gla.py'}")


def test_recdsl_help_lists_the_exit_statuses(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Exit status: 0 success; 1 a path past its tolerance (check)" in text
    assert "2 a spec error or a bad command line; 3 an internal error" in text


def test_an_input_named_like_the_forward_catch_all_is_a_spec_error(tmp_path, capsys):
    spec = tmp_path / "kw.rec"
    spec.write_text("recurrence kw(x[D], keywords) -> y[D] {\n    state h[D]\n"
                    "    h[d] = sigmoid(keywords) * h[d] + x[d]\n    y[d] = h[d]\n}\n")
    out = tmp_path / "kw.py"
    assert main(["compile", str(spec), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "kw.rec:1:21: error: input 'keywords' would clash with the argument '**keywords' of the generated " \
           "torch.nn.Module's forward" in err, err
    assert not out.exists()
