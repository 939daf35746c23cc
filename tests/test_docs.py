"""Every example of the language reference runs.

- each ```rec block of docs/language.md (and of the shared design notes' LANGUAGE.md, when present beside the
  repository) parses and checks; each of its recurrences runs in the float64 reference on small sampled inputs
  with an initial state, and every torch form the analysis offers, on the same float32 inputs, is within 1e-5
  relative error of it (outputs and final states);
- each ```rec-error block fails with exactly the error shown in the ```text block right after it (message,
  FILE:LINE:COL, caret and hint), the block being the file `bad.rec`;
- each ```python block runs as written from the repository root.

Test ids name the file and the line of the block's opening fence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import recurrence_dsl
from recurrence_dsl.analysis import analyse
from recurrence_dsl.sampling import sample_arguments

from .conftest import LANGUAGE_MD, REPO, as_dict

DOC = REPO / "docs" / "language.md"
B, T, H, SIZE = 1, 9, 2, 4
CHUNK = 4  # T = 9 spans two full chunks and a partial one
TOL = 1e-5
ERROR_FILE = "bad.rec"


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    following: Block | None = None  # for rec-error: the ```text block right after it

    @property
    def id(self) -> str:
        return f"{self.path.name}:{self.line}"


_FENCE = re.compile(r"^```([A-Za-z0-9_-]*)[ \t]*$")


def fenced_blocks(path: Path) -> list[Block]:
    """Every fenced block of a markdown file, in order; a rec-error block carries the text block after it."""
    lines = path.read_text().split("\n")
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i + 1, m.group(1)
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        if j == len(lines):
            raise AssertionError(f"{path}:{start}: unclosed ``` block")
        blocks.append(Block(path, start, lang, "\n".join(lines[i + 1 : j]) + "\n"))
        i = j + 1
    paired = []
    for n, block in enumerate(blocks):
        if block.lang == "rec-error":
            after = blocks[n + 1] if n + 1 < len(blocks) else None
            between = "\n".join(lines[block.line + block.text.count("\n") + 1 : after.line - 1]) if after else ""
            assert after is not None and after.lang == "text" and not between.strip(), (
                f"{path}:{block.line}: a ```rec-error block must be followed directly by a ```text block "
                "holding the expected error")
            block = Block(block.path, block.line, block.lang, block.text, after)
        paired.append(block)
    return paired


DOC_BLOCKS = fenced_blocks(DOC)


def _params(lang: str) -> list:
    return [pytest.param(b, id=b.id) for b in DOC_BLOCKS if b.lang == lang]


def _language_md_params() -> list:
    if not LANGUAGE_MD.is_file():
        return [pytest.param(None, id="LANGUAGE.md-absent")]
    return [pytest.param(b, id=b.id) for b in fenced_blocks(LANGUAGE_MD) if b.lang == "rec"]


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def check_block(block: Block) -> None:
    recs = recurrence_dsl.load_text(block.text, f"{block.path.name}:{block.line}")
    assert recs, f"{block.id}: no recurrence in the block"
    for name, rec in recs.items():
        checked = rec.checked
        sizes = {s: SIZE for s in checked.sizes}
        args, initial = sample_arguments(checked, sizes, B, T, H, dtype=torch.float32, seed=0,
                                         with_initial_state=bool(checked.states))
        # The float64 reference on the same float32 values: the error measured is the form's own.
        ref_out, ref_final = rec.reference(*args, initial_state=initial, output_final_state=True)
        expected = {f"out:{k}": v for k, v in as_dict(ref_out, checked.outputs).items()}
        expected.update({f"state:{k}": v for k, v in as_dict(ref_final, checked.states).items()})
        for value in expected.values():
            assert torch.isfinite(value).all(), f"{block.id} {name}: the reference is not finite"
        forms = analyse(checked).forms
        assert forms and forms[0] == "recurrent", f"{block.id} {name}: forms {forms}"
        layer = recurrence_dsl.compile(rec, backend="torch")
        for form in forms:
            out, final = layer(*args, initial_state=initial, output_final_state=True, form=form, chunk_size=CHUNK)
            got = {f"out:{k}": v for k, v in as_dict(out, checked.outputs).items()}
            got.update({f"state:{k}": v for k, v in as_dict(final, checked.states).items()})
            assert got.keys() == expected.keys()
            for key, ref in expected.items():
                assert got[key].shape == ref.shape, f"{block.id} {name} {form} {key}: shape {got[key].shape}"
                err = rel(got[key], ref)
                assert err <= TOL, f"{block.id} {name} {form} {key}: relative error {err:.2e} > {TOL}"


@pytest.mark.parametrize("block", _params("rec"))
def test_rec_example(block: Block) -> None:
    check_block(block)


@pytest.mark.parametrize("block", _language_md_params())
def test_language_md_example(block: Block | None) -> None:
    if block is None:
        pytest.skip(f"{LANGUAGE_MD} is absent")
    check_block(block)


_HEAD = re.compile(r"^(?P<file>[^:\n]+):(?P<line>\d+):(?P<col>\d+): error: (?P<message>.*)$")


@pytest.mark.parametrize("block", _params("rec-error"))
def test_rec_error_example(block: Block) -> None:
    expected = block.following.text.rstrip("\n")
    head = _HEAD.match(expected.split("\n")[0])
    assert head and head["file"] == ERROR_FILE, f"{block.id}: the expected error must start with {ERROR_FILE}:L:C:"
    with pytest.raises(recurrence_dsl.SpecError) as info:
        recurrence_dsl.load_text(block.text, ERROR_FILE)
    err = info.value
    assert (err.line, err.column) == (int(head["line"]), int(head["col"]))
    assert err.message == head["message"]
    assert err.render() == expected


@pytest.mark.parametrize("block", _params("python"))
def test_python_example(block: Block, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    code = compile(block.text, f"{block.path}:{block.line}", "exec")
    exec(code, {"__name__": f"docs_example_{block.line}"})


def test_doc_has_examples() -> None:
    """The extraction finds the blocks (a broken fence would silently drop them)."""
    langs = [b.lang for b in DOC_BLOCKS]
    assert langs.count("rec") >= 15 and langs.count("rec-error") >= 5 and langs.count("python") >= 3
    assert set(langs) <= {"rec", "rec-error", "python", "text", "sh"}


def test_readme_names_every_call_keyword() -> None:
    """README's list of the names an input or param cannot take is the checker's (it left out `reverse`)."""
    from recurrence_dsl.check import CALL_KEYWORDS

    text = " ".join((REPO / "README.md").read_text().split())
    listed = re.search(r"be called like the call's keywords \(([^)]*)\)", text)
    assert listed, "README's paragraph on names moved"
    assert set(re.findall(r"`(\w+)`", listed[1])) == set(CALL_KEYWORDS)
    language = " ".join(DOC.read_text().split())
    assert all(f"`{word}`" in language for word in CALL_KEYWORDS)
