"""A new user's trial of the CLI and the generated modules (sixth trial): what broke, each with the test that
failed before its fix. A hand-edited generated module (or graph) is not replaced silently by a re-run of
`recdsl compile` (`show --graph`); `recdsl show`'s chunked-form lines name their indices with letters the spec
does not use; a generated nn.Module checks form=, backend= and chunk_size= when it is built, says what it was
built with when printed, and reports a 3-D input's shape rather than a wrong H; a ';' ending a statement gets a
hint."""

from __future__ import annotations

import pytest
import torch

import recurrence_dsl
from codegen.load import load_module
from recurrence_dsl.analysis import analyse
from recurrence_dsl.cli import main
from recurrence_dsl.errors import CallError
from recurrence_dsl.explain import explain

from .conftest import SPECS_DIR

GLA = SPECS_DIR / "gla.rec"
# A gated delta rule with a per-key log decay `a` and a scalar gate `b`: names the chunk plan's own index letters.
KEY_DECAY_DELTA = """recurrence kgdn(q[K], k[K], v[V], a[K], b) -> o[V] {
    state S[K, V]
    u[j] = v[j] - sum(i, exp(a[i]) * k[i] * S[i, j])
    S[i, j] = exp(a[i]) * S[i, j] + sigmoid(b) * k[i] * u[j]
    o[j] = sum(i, q[i] * S[i, j])
}
"""


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# 1. a generated module the user edited is not replaced by `recdsl compile` without --force

def test_compile_keeps_a_generated_module_the_user_edited(tmp_path, capsys):
    out = tmp_path / "gla_layer.py"
    assert _run(capsys, "compile", GLA, "-o", out)[0] == 0
    assert _run(capsys, "compile", GLA, "-o", out)[0] == 0  # unedited: replaced as before
    edited = out.read_text().replace("\nimport ast\n", "\nimport ast  # my change\n", 1)
    out.write_text(edited)
    code, _, err = _run(capsys, "compile", GLA, "-o", out)
    assert code == 2 and "has been edited since" in err and "--force" in err, err
    assert out.read_text() == edited
    assert _run(capsys, "compile", GLA, "-o", out, "--force")[0] == 0
    assert "# my change" not in out.read_text()


def test_compile_refuses_a_generated_module_without_a_digest(tmp_path, capsys):
    # (written by a recurrence_dsl from before the digest line: whether it was edited cannot be told)
    out = tmp_path / "old.py"
    assert _run(capsys, "compile", GLA, "-o", out)[0] == 0
    first, _, rest = out.read_text().partition("\n")
    old = first + "\n" + rest.partition("\n")[2]
    out.write_text(old)
    code, _, err = _run(capsys, "compile", GLA, "-o", out)
    assert code == 2 and "no sha256" in err and "--force" in err, err
    assert out.read_text() == old


def test_show_graph_keeps_a_graph_the_user_edited(tmp_path, capsys):
    graph = tmp_path / "gla.dot"
    assert _run(capsys, "show", GLA, "--graph", graph)[0] == 0
    assert _run(capsys, "show", GLA, "--graph", graph)[0] == 0
    edited = graph.read_text() + "// my note\n"
    graph.write_text(edited)
    code, _, err = _run(capsys, "show", GLA, "--graph", graph)
    assert code == 2 and "has been edited since" in err, err
    assert graph.read_text() == edited


# 2. `recdsl show` / `explain`: the chunk plan's index letters never read as one of the spec's names

def test_explain_writes_plan_indices_with_letters_the_spec_does_not_use():
    text = explain(analyse(recurrence_dsl.load(KEY_DECAY_DELTA)["kgdn"].checked))
    lines = {line.split("=")[0].strip(): line.strip() for line in text.splitlines() if "_t[" in line.split("=")[0]}
    # before: `v_t[b] = sigmoid(b)*v[b]` (b the scalar input) and `g_t[a] = a[a]` (a the log decay)
    assert lines["v_t[d]"] == "v_t[d] = sigmoid(b)*v[d]", text
    assert lines["log decay (key) g_t[c]"] == "log decay (key) g_t[c] = a[c]", text
    assert lines["k_t[a]"] == "k_t[a] = k[a]", text  # no clash in this line: the usual letter


def test_explain_of_rwkv7_and_based_reads_cleanly():
    rwkv7 = explain(analyse(recurrence_dsl.load(SPECS_DIR / "rwkv7.rec")["rwkv7"].checked))
    assert "a[a]" not in rwkv7 and "b_t = -a[c]*kk[c]" in rwkv7, rwkv7
    based = explain(analyse(recurrence_dsl.load(SPECS_DIR / "based.rec")["based"].checked))
    assert "__" not in based, based  # before: `readout R_1[b__5] = ...`, an IR name


# 3. a generated nn.Module: its defaults checked when built, its repr, a 3-D input's error

@pytest.fixture(scope="module")
def retention_module():
    rec = recurrence_dsl.load(SPECS_DIR / "retention.rec")["retention"]
    return load_module(analyse(rec.checked)).Retention


@pytest.mark.parametrize("keywords, says", [
    ({"form": "chunk"}, "Retention: retention has no 'chunk' form"),
    ({"backend": "cuda"}, "Retention: unknown backend 'cuda'"),
    ({"chunk_size": 0}, "Retention: chunk_size must be an integer >= 1"),
])
def test_module_checks_its_defaults_when_built(retention_module, keywords, says):
    # before: built without complaint, failing at the first forward, far from the typo
    with pytest.raises(CallError, match=says):
        retention_module(2, {"K": 4, "V": 4}, **keywords)


def test_module_repr_says_what_it_was_built_with(retention_module):
    assert repr(retention_module(2, {"K": 4, "V": 4})) == "Retention(heads=2, sizes={'K': 4, 'V': 4})"
    module = retention_module(2, form="chunked", chunk_size=32)
    assert repr(module) == "Retention(heads=2, sizes={}, form='chunked', chunk_size=32)"


def test_module_reports_a_3d_input_by_its_shape(retention_module):
    q = torch.randn(1, 5, 8)  # [B, T, H * K]: the heads not split off
    with pytest.raises(CallError, match=r"input 'q' must have shape \[B, T, H, K\], got \[1, 5, 8\]") as err:
        retention_module(2, {"K": 4, "V": 4})(q, q, q)
    assert "heads=" not in str(err.value)  # before: "built with heads=2, but input 'q' has H=8"


# 4. a statement ended with ';' (C, or a paper's pseudo-code): the error says what to do

def test_a_semicolon_at_a_statements_end_gets_a_hint(tmp_path, capsys):
    spec = tmp_path / "semi.rec"
    spec.write_text(GLA.read_text().replace("* v[j]\n", "* v[j];\n", 1))
    code, _, err = _run(capsys, "show", spec)
    assert code == 2 and "unexpected character ';'" in err and "hint: a statement ends at the end of its line" in err
