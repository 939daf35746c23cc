"""`recdsl check|show`: exit codes, the report table, JSON, and compiler-style errors without tracebacks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import recurrence_dsl
from recurrence_dsl.cli import main
from recurrence_dsl.sampling import param_roles

from .conftest import REPO, SPECS_DIR

GLA = SPECS_DIR / "gla.rec"
SMALL = "B=1,T=6,H=2,K=4,V=3"
BAD = "recurrence f(x[D]) -> y[D] {\n    y[d] = expp(x[d])\n}\n"


@pytest.fixture
def bad_spec(tmp_path):
    path = tmp_path / "bad.rec"
    path.write_text(BAD)
    return path


@pytest.fixture
def two_recurrences(tmp_path):
    path = tmp_path / "two.rec"
    path.write_text(GLA.read_text() + "\n" + (SPECS_DIR / "mamba2.rec").read_text())
    return path


def _run_cli(*argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_check_a_spec_prints_the_table(capsys):
    code, out, err = _run_cli("check", GLA, "--shape", SMALL, capsys=capsys)
    assert code == 0, err
    assert "rel. error" in out and "tolerance" in out
    assert "gla" in out and "reference" in out and "final S" in out
    assert "K=4" in out and "V=3" in out
    assert "all paths within tolerance" in out
    assert err == ""


def test_check_in_float64_with_a_seed(capsys):
    code, out, _ = _run_cli("check", SPECS_DIR / "mamba2.rec", "--shape", "B=1,T=4,H=1,P=3,N=2",
                            "--dtype", "float64", "--seed", "3", capsys=capsys)
    assert code == 0
    assert "float64" in out and "rel. error" in out


def test_check_every_recurrence_of_a_file(two_recurrences, capsys):
    code, out, _ = _run_cli("check", two_recurrences, "--shape", "B=1,T=4,H=1,K=2,V=2,P=2,N=2", capsys=capsys)
    assert code == 0
    assert out.count("rel. error") == 2


def test_show_json(capsys):
    code, out, _ = _run_cli("show", GLA, "--json", capsys=capsys)
    assert code == 0
    data = json.loads(out)
    (rec,) = data["recurrences"]
    assert rec["name"] == "gla"
    assert rec["spec_hash"] == recurrence_dsl.load(GLA)["gla"].spec_hash
    assert [i["name"] for i in rec["inputs"]] == ["q", "k", "v", "g"]
    assert [(s["name"], s["shape"]) for s in rec["states"]] == [("S", ["K", "V"])]
    assert rec["sizes"] == ["K", "V"]
    assert rec["statements"] == ["S[i, j] = exp(g[i]) * S[i, j] + k[i] * v[j]",
                                 "o[j] = K ** -0.5 * sum(i, q[i] * S[i, j])"]


def test_show_text(capsys):
    code, out, _ = _run_cli("show", SPECS_DIR / "delta_net.rec", capsys=capsys)
    assert code == 0
    assert "recurrence delta_net" in out
    assert "states:      S[K, V]" in out
    assert "temporaries: u[V]" in out


def test_show_name_selects_one(two_recurrences, capsys):
    code, out, _ = _run_cli("show", two_recurrences, "--json", "--name", "mamba2", capsys=capsys)
    assert code == 0
    assert [r["name"] for r in json.loads(out)["recurrences"]] == ["mamba2"]


@pytest.mark.parametrize("command", ["check", "show"])
def test_bad_spec_exits_2_with_a_compiler_style_error(bad_spec, capsys, command):
    code, out, err = _run_cli(command, bad_spec, capsys=capsys)
    assert code == 2
    assert out == ""
    lines = err.rstrip("\n").split("\n")
    assert lines[0] == f"{bad_spec}:2:12: error: unknown function 'expp'"
    assert lines[1] == "        y[d] = expp(x[d])"
    assert lines[2] == "               ^~~~"
    assert lines[3] == "hint: did you mean 'exp'?"
    assert "Traceback" not in err


STATELESS = "recurrence double(x[D]) -> y[D] {\n    y[d] = 2 * x[d]\n}\n"


@pytest.mark.parametrize("command", ["check", "show", "explain", "compile", "kernels"])
def test_a_spec_without_a_state_is_one_error_before_any_output_in_every_command(tmp_path, capsys, command):
    """The reference runs a stateless body, but no form compiles: each command refuses it as compile() does,
    before printing anything (show printed its listing and its forms, then failed at its config lines)."""
    path = tmp_path / "double.rec"
    path.write_text(STATELESS + "\n" + GLA.read_text())
    extra = ["-o", tmp_path / "double.py"] if command == "compile" else []
    code, out, err = _run_cli(command, path, *extra, capsys=capsys)
    assert (code, out) == (2, "")
    assert err.startswith(f"{path}:1:12: error: recurrence 'double' has no state: a compiled recurrence needs "
                          "at least one state\n")
    assert "Traceback" not in err and not (tmp_path / "double.py").exists()
    # --name picks the file's other recurrence, which has a state: that one is shown.
    if command == "show":
        code, out, _ = _run_cli("show", path, "--name", "gla", capsys=capsys)
        assert code == 0 and out.startswith("recurrence gla")


@pytest.mark.parametrize("argv, words", [
    (["--name", "nope"], ["no recurrence 'nope'", "gla"]),
    (["--shape", "K=four"], ["--shape", "K"]),
    (["--shape", "Q=3"], ["--shape", "no size Q"]),
])
def test_bad_options_exit_2(capsys, argv, words):
    code, _, err = _run_cli("check", GLA, *argv, capsys=capsys)
    assert code == 2
    for word in words:
        assert word in err
    assert "Traceback" not in err


def test_show_unknown_name_exits_2(capsys):
    code, _, err = _run_cli("show", GLA, "--name", "nope", capsys=capsys)
    assert code == 2 and "nope" in err


def test_missing_file_exits_2(tmp_path, capsys):
    code, _, err = _run_cli("show", tmp_path / "absent.rec", capsys=capsys)
    assert code == 2
    assert "absent.rec" in err and "Traceback" not in err


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"recdsl {recurrence_dsl.__version__}"


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("recdsl: error: ") and err.count("\n") == 1 and "see recdsl --help" in err


def _subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_module_entry_point_in_a_subprocess(bad_spec):
    """A real process: the error goes to stderr as FILE:LINE:COL, the exit status is 2, and no traceback."""
    bad = subprocess.run([sys.executable, "-m", "recurrence_dsl.cli", "check", str(bad_spec)],
                         capture_output=True, text=True, env=_subprocess_env(), cwd=REPO, timeout=300)
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert bad.stderr.startswith(f"{bad_spec}:2:12: error: unknown function 'expp'")
    assert "Traceback" not in bad.stderr


@pytest.mark.skipif(shutil.which("recdsl") is None, reason="the console script is not installed (pip install -e .)")
def test_console_script():
    version = subprocess.run(["recdsl", "--version"], capture_output=True, text=True, timeout=300)
    assert version.returncode == 0
    assert version.stdout.strip() == f"recdsl {recurrence_dsl.__version__}"


PLAIN_DECAY = """recurrence plain(q[K], k[K], v[V], a[K]) -> o[V] {
    state S[K, V]
    S[i, j] = a[i] * S[i, j] + k[i] * v[j]
    o[j] = sum(i, q[i] * S[i, j])
}
"""


def test_a_path_that_raises_is_a_fail_row_not_a_traceback():
    from recurrence_dsl.validate import check_recurrence, format_report

    rec = recurrence_dsl.load(GLA)["gla"]

    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    report = check_recurrence(rec, {"K": 4, "V": 3}, 1, 6, 2, paths={"reference": rec.reference, "broken": broken})
    assert not report.ok
    assert [r.path for r in report.rows if not r.ok] == ["broken"]
    text = format_report(report)
    assert "FAIL: RuntimeError: kernel exploded" in text and "Traceback" not in text


def test_a_decay_the_inputs_make_non_positive_is_reported_as_skipped(tmp_path):
    from recurrence_dsl.validate import check_recurrence

    rec = recurrence_dsl.load(PLAIN_DECAY)["plain"]

    def refuses(*args, **kwargs):
        raise recurrence_dsl.DecayNotPositive("form 'chunked' takes the logarithm of the decay a[i] of S")

    paths = {"reference": rec.reference, "torch/chunked": refuses}
    report = check_recurrence(rec, {"K": 4, "V": 3}, 1, 6, 2, paths=paths)
    assert report.ok
    assert [p for p, _ in report.skipped] == ["torch/chunked"]
    assert "on these random inputs" in report.skipped[0][1]


# A decay the sampler cannot keep positive: tanh of a standard normal input is negative half the time.
SIGNED_DECAY = """recurrence signed(x[D], fg[D]) -> y[D] {
    state h[D]
    f[d] = tanh(fg[d])
    h[d] = f[d] * h[d] + (1 - f[d]) * x[d]
    y[d] = h[d]
}
"""


def test_a_compiled_layer_refusing_a_decay_is_a_skip_in_check(tmp_path, capsys):
    """The layers `check` runs come from generated modules, which carry dispatch.py: their refusal is
    recurrence_dsl.DecayNotPositive itself, so check reports the chunked forms as skipped, not failed."""
    rec = recurrence_dsl.load_text(SIGNED_DECAY)["signed"]
    layer = recurrence_dsl.compile(rec, tuning=False)
    x = torch.randn(1, 6, 1, 4)
    with pytest.raises(recurrence_dsl.DecayNotPositive):
        layer(x, -torch.ones(1, 6, 1, 4), form="chunked", backend="torch")
    path = tmp_path / "signed.rec"
    path.write_text(SIGNED_DECAY)
    code, out, err = _run_cli("check", path, "--shape", "B=1,T=24,H=2,D=8", "--no-triton", "--seed", "1",
                              capsys=capsys)
    assert code == 0, out + err
    assert "FAIL:" not in out, out
    assert out.count("on these random inputs") == 2, out  # the chunked and parallel forms, skipped


# HGRN's forget gate with a lower bound (Qin et al. 2023, Eq. 4): the decay is a temporary written in a param.
LOWER_BOUND_DECAY = """recurrence hgrn_lb(x[D], fg[D]) -> y[D] {
    param lb[D]
    state h[D]
    f[d] = lb[d] + (1 - lb[d]) * sigmoid(fg[d])
    h[d] = f[d] * h[d] + (1 - f[d]) * x[d]
    y[d] = h[d]
}
"""


def test_check_draws_a_decay_through_a_temporary_positive(tmp_path, capsys):
    """The sampler follows the temporary f to lb and draws it in (0.5, 0.95), so f > 0 and every seed runs the
    chunked and parallel forms (lb from N(0, 1) made f negative: those forms were skipped)."""
    rec = recurrence_dsl.load_text(LOWER_BOUND_DECAY)["hgrn_lb"]
    assert param_roles(rec.checked) == {"lb": "factor"}
    path = tmp_path / "hgrn_lb.rec"
    path.write_text(LOWER_BOUND_DECAY)
    for seed in ("0", "1"):
        code, out, err = _run_cli("check", path, "--shape", "B=1,T=24,H=2,D=8", "--no-triton", "--seed", seed,
                                  capsys=capsys)
        assert code == 0, out + err
        assert "on these random inputs" not in out, out
        for form in ("chunked", "parallel"):
            assert f"torch/{form}" in out


def test_check_draws_a_plain_decay_positive_so_every_form_runs(tmp_path, capsys):
    path = tmp_path / "plain.rec"
    path.write_text(PLAIN_DECAY)
    code, out, err = _run_cli("check", path, "--shape", "B=1,T=20,H=1,K=4,V=3", "--no-triton", capsys=capsys)
    assert code == 0, out + err
    for form in ("recurrent", "scan", "chunked", "parallel"):
        assert f"torch/{form}" in out and f"torch/{form}    not available" not in out


PAPER_DELTA = """recurrence dn(q[K], k[K], v[V], beta) -> o[V] {
    state S[V, K]
    u[i] = v[i] - sum(j, S[i, j] * k[j])
    S[i, j] = S[i, j] + beta * u[i] * k[j]
    o[i] = sum(j, S[i, j] * q[j])
}
"""


def test_show_says_a_state_is_chunked_as_its_transpose(tmp_path, capsys):
    path = tmp_path / "dn.rec"
    path.write_text(PAPER_DELTA)
    code, out, _ = _run_cli("show", path, "--json", capsys=capsys)
    assert code == 0
    (rec,) = json.loads(out)["recurrences"]
    assert rec["class"] == "rank-one-update" and "chunked" in rec["forms"]
    assert [(s["shape"], s["chunked_as_transpose"]) for s in rec["states"]] == [(["V", "K"], True)]
    code, out, _ = _run_cli("show", path, capsys=capsys)
    assert code == 0 and "chunked as S^T" in out
    code, out, _ = _run_cli("show", GLA, "--json", capsys=capsys)
    assert json.loads(out)["recurrences"][0]["states"][0]["chunked_as_transpose"] is False


# -- every subcommand on each kind of bad input: one line naming the problem and where, exit 2, no traceback --------

SYNTAX = "recurrence bad(q[K], k[K] -> o[K] {\n    state S[K]\n}\n"
COMMANDS = {"check": ["check"], "show": ["show"], "compile": ["compile", "-o", "{tmp}/out.py"],
            "tune": ["tune", "--no-progress"], "kernels": ["kernels"]}
# (what, extra argv before FILE, FILE, the commands it applies to, words the error line holds)
BAD_INPUTS = [
    ("missing file", [], "{tmp}/missing.rec", set(COMMANDS), ["no such .rec file", "missing.rec"]),
    ("a directory", [], "{tmp}", set(COMMANDS), ["is a directory, not a .rec file"]),
    ("syntax error", [], "{tmp}/syntax.rec", set(COMMANDS), ["syntax.rec:1:27: error: unexpected '->'"]),
    ("--shape key", ["--shape", "B=2,Q=3"], str(GLA), {"check", "tune", "kernels"}, ["--shape", "no size Q"]),
    ("--target", ["--target", "sm_75"], str(GLA), {"tune", "kernels"}, ["argument --target", "sm_75", "--help"]),
    ("--name", ["--name", "nope"], str(GLA), set(COMMANDS), ["--name", "no recurrence 'nope'", "it has gla"]),
]


CASES = [(command, *bad[:3], bad[4]) for bad in BAD_INPUTS for command in sorted(COMMANDS) if command in bad[3]]


@pytest.mark.parametrize("command, what, extra, file, words", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_each_command_reports_a_bad_input_in_one_line(tmp_path, capsys, monkeypatch, command, what, extra, file,
                                                      words):
    monkeypatch.setenv("RECURRENCE_DSL_DEBUG", "1")  # a traceback would print for an internal error only
    (tmp_path / "syntax.rec").write_text(SYNTAX)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in COMMANDS[command] + extra + [file]]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    out, err = capsys.readouterr()
    assert code == 2, (argv, out, err)
    assert "Traceback" not in err and "internal error" not in err, err
    # `recdsl tune` may first warn that the machine is too loaded to time on (a line of its own, not the error)
    err = "\n".join(line for line in err.splitlines() if not line.startswith(f"recdsl {command}: warning:"))
    first = err.splitlines()[0]
    assert all(w in first for w in words), (first, words)
    if what != "syntax error":  # a syntax error adds the source line and a caret under the column
        assert len(err.splitlines()) == 1, err


def test_tune_without_form_tunes_what_auto_runs_at_that_length():
    """`recdsl tune` without --form tunes the form a call of the shape runs under form="auto" (found by trying the
    tool: at T=64 it tuned chunked while the call ran the parallel form and never read that config)."""
    from autotune.space import tunable
    from recurrence_dsl.analysis import analyse
    from recurrence_dsl.cli import _form_to_tune

    gla = analyse(recurrence_dsl.load(SPECS_DIR / "gla.rec")["gla"].checked)
    assert _form_to_tune(gla, "triton", {"T": 64}, tunable) == "parallel"
    assert _form_to_tune(gla, "triton", {"T": 1024}, tunable) == "chunked"
    assert _form_to_tune(gla, "torch", {"T": 64}, tunable) == "chunked"  # the torch parallel form takes no config
    assert _form_to_tune(gla, "triton", {"T": 8, "B": 1}, tunable) == "recurrent"
    # vector states: auto runs the scan first (codegen/module.py `scan_first`), whose Triton form takes a config
    for name in ("rg_lru", "min_gru"):
        vector = analyse(recurrence_dsl.load(SPECS_DIR / f"{name}.rec")[name].checked)
        assert _form_to_tune(vector, "triton", {"T": 1024}, tunable) == "scan", name
        assert _form_to_tune(vector, "torch", {"T": 1024}, tunable) == "chunked", name  # (torch's scan: no config)
    rg = analyse(recurrence_dsl.load(SPECS_DIR / "rg_lru.rec")["rg_lru"].checked)
    # past the scan's byte limit auto runs the chunked form, and tune follows it (B * T * H * D * 4 B > 256 MiB)
    assert _form_to_tune(rg, "triton", {"B": 8, "T": 1 << 16, "H": 16, "D": 64}, tunable) == "chunked"
    mamba = analyse(recurrence_dsl.load(SPECS_DIR / "mamba.rec")["mamba"].checked)
    assert _form_to_tune(mamba, "triton", {"T": 1024}, tunable) == "scan"  # (no chunked form: was recurrent)
    # on torch neither its scan nor its recurrent form takes a config: the skip names the one auto runs (trial 8)
    assert _form_to_tune(mamba, "torch", {"T": 1024}, tunable) == "scan"


def test_explain_prints_the_analysis_show_prints_and_help_lists_it(capsys):
    """`recdsl explain FILE` (what a new user typed): the analysis alone, the same text `show` prints after the
    declarations, for each recurrence; forms that are missing say why, on either backend."""
    delta = SPECS_DIR / "delta_net.rec"
    assert main(["explain", str(delta)]) == 0
    explained = capsys.readouterr().out
    assert explained.startswith("recurrence delta_net: class rank-one-update; forms: recurrent, chunked\n")
    assert "  state S[i, j]: rank-one-update -- " in explained
    assert "  no scan form: S has a rank-one-update transition" in explained
    assert "  no parallel form: " in explained and "spec hash" not in explained and "config of a call" not in explained
    assert main(["show", str(delta)]) == 0
    assert explained.rstrip("\n") in capsys.readouterr().out  # one text, reused
    assert main(["explain", str(GLA), "--json"]) == 0
    (gla,) = json.loads(capsys.readouterr().out)["recurrences"]
    assert (gla["name"], gla["class"], gla["forms"]) == ("gla", "diagonal-row", ["recurrent", "scan", "chunked",
                                                                               "parallel"])
    assert isinstance(gla["unavailable"], dict) and isinstance(gla["triton_unavailable"], dict)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "    explain   " in capsys.readouterr().out


def test_explain_of_a_bad_spec_or_name_exits_2(bad_spec, capsys):
    assert main(["explain", str(bad_spec)]) == 2
    assert "bad.rec:2:12: error:" in capsys.readouterr().err
    assert main(["explain", str(GLA), "--name", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_compile_into_a_missing_folder_is_refused_and_a_written_module_is_readable(tmp_path, capsys):
    """-o into a folder that does not exist is a typo to report (as `tune --store` does), not folders to create;
    the module written has the mode an ordinary file gets (it was 0600, the cache's temporary-file mode)."""
    missing = tmp_path / "no" / "such" / "gla_layer.py"
    code, out, err = _run_cli("compile", GLA, "-o", missing, capsys=capsys)
    assert code == 2 and "the folder" in err and str(tmp_path / "no") in err and "does not exist" in err, err
    assert not (tmp_path / "no").exists()
    mask = os.umask(0o022)
    try:
        code, out, err = _run_cli("compile", GLA, "-o", tmp_path / "gla-layer.py", capsys=capsys)
    finally:
        os.umask(mask)
    assert code == 0, err
    assert "not an importable module name" in err
    assert oct(os.stat(tmp_path / "gla-layer.py").st_mode & 0o777) == oct(0o644)


def test_check_shows_which_path_runs_on_a_terminal_only():
    """`check` runs every path before it prints its table (30-70 s in Triton's interpreter): on a terminal one
    line says which path runs, erased before the table; a log or pipe gets nothing."""
    import io

    from recurrence_dsl.cli import _CheckProgress
    from recurrence_dsl.validate import check_recurrence

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, shown in ((Terminal(), True), (io.StringIO(), False)):
        progress = _CheckProgress("gla", stream)
        progress("torch/recurrent", 1, 2)
        progress("triton/chunked", 2, 2)
        progress.clear()
        text = stream.getvalue()
        assert ("gla: checking triton/chunked, path 2 of 2..." in text) is shown
        assert text.endswith("\r") if shown else text == ""
    calls = []
    rec = recurrence_dsl.load(GLA)["gla"]
    check_recurrence(rec, {"K": 4, "V": 3}, 1, 6, 2, paths={"reference": rec.reference}, grad=False,
                     progress=lambda *a: calls.append(a))
    assert calls == [("reference", 1, 1)]


def test_show_and_explain_say_which_form_auto_runs_and_what_triton_lacks(capsys):
    """A performance engineer's trial: only `recdsl kernels` revealed that auto runs RG-LRU's scan first, and
    `show --json` had no `triton_unavailable` (`explain --json` had)."""
    rg = SPECS_DIR / "rg_lru.rec"
    assert main(["explain", str(rg)]) == 0
    last = capsys.readouterr().out.rstrip("\n").splitlines()[-1]
    assert last.startswith("  form auto: recurrent for T <= 16; else the scan (every state is a vector"), last
    assert main(["explain", str(GLA)]) == 0
    assert "  form auto: recurrent for T <= 16; else parallel up to the chunk size and chunked beyond" in \
        capsys.readouterr().out
    assert main(["show", str(rg), "--json"]) == 0
    (shown,) = json.loads(capsys.readouterr().out)["recurrences"]
    assert isinstance(shown["triton_unavailable"], dict) and shown["auto_order"].startswith("recurrent for T <= 16")
    assert main(["explain", str(rg), "--json"]) == 0
    (explained,) = json.loads(capsys.readouterr().out)["recurrences"]
    assert explained["auto_order"] == shown["auto_order"]
    assert explained["triton_unavailable"] == shown["triton_unavailable"]


def test_show_shape_sets_the_config_lines_shape(capsys):
    """`show` printed its "config of a call" at B=2, T=1024, H=4 only (a performance engineer's trial); --shape sets
    it, names an unknown size, and is refused beside --json, which prints no config lines. A short call (T=8) runs
    the recurrent form, so the shape reaches `config_for`."""
    code, out, _ = _run_cli("show", GLA, "--shape", "B=1,T=8,H=3,K=16", capsys=capsys)
    assert code == 0
    assert "config of a call (B=1 T=8 H=3 K=16 V=64, float32, cpu)" in out
    assert "fwd     recurrent/" in out
    code, _, err = _run_cli("show", GLA, "--shape", "Q=3", capsys=capsys)
    assert code == 2 and "--shape: gla has no size Q; its sizes are B, T, H, K, V" in err
    code, out, err = _run_cli("show", GLA, "--json", "--shape", "T=8", capsys=capsys)
    assert code == 2 and out == "" and "show --json does not print" in err


def test_tune_warns_that_compiler_flags_do_nothing_on_torch(tmp_path, capsys):
    """--no-compiler and --target were accepted silently with --backend torch (a performance engineer's trial)."""
    code, _, err = _run_cli("tune", GLA, "--backend", "torch", "--no-compiler", "--target", "sm_80", "--form",
                            "parallel", "--store", tmp_path / "t.sqlite", capsys=capsys)
    assert code == 0
    assert "warning: --target and --no-compiler only concern the triton backend's kernels; ignored" in err
    code, _, err = _run_cli("tune", GLA, "--backend", "torch", "--form", "parallel", "--store",
                            tmp_path / "t.sqlite", capsys=capsys)
    assert code == 0 and "only concern" not in err
    # With the backend defaulted (a CPU), the warning says so instead of naming a --backend not passed.
    code, _, err = _run_cli("tune", GLA, "--target", "sm_80", "--form", "parallel", "--store",
                            tmp_path / "t.sqlite", capsys=capsys)
    assert code == 0
    assert "--target only concerns the triton backend's kernels; ignored on cpu, where the backend defaults " \
           "to torch (--backend triton tunes them)" in err
