"""The committed golden files (tests/golden/) match what the compiler produces for every spec.

On a difference the test prints a unified diff; if the change is intended, regenerate with
`python -m tests.golden` and commit the updated files with the change.
"""

from __future__ import annotations

import difflib

import pytest

from .golden import GOLDEN, expected, golden_specs

SPEC_FILES = golden_specs()  # specs/ and the files of tests/data/ with golden files (`golden.EXTRA`)


@pytest.mark.parametrize("spec", SPEC_FILES, ids=[p.stem for p in SPEC_FILES])
def test_golden_files_match(spec):
    for name, text in expected(spec).items():
        path = GOLDEN / name
        assert path.is_file(), f"tests/golden/{name} is missing: run `python -m tests.golden`"
        golden = path.read_text()
        if golden != text:
            diff = "".join(list(difflib.unified_diff(golden.splitlines(True), text.splitlines(True),
                                                     f"tests/golden/{name}", "generated now"))[:80])
            pytest.fail(f"tests/golden/{name} differs from what the compiler generates now; if intended, run "
                        f"`python -m tests.golden` and commit the diff:\n{diff}")


def test_no_stale_golden_files():
    names = {name for spec in SPEC_FILES for name in expected(spec)}
    stale = sorted(p.name for p in GOLDEN.iterdir() if p.name not in names)
    assert not stale, f"golden files of no spec: {stale}; run `python -m tests.golden`"
