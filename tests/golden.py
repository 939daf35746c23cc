"""Golden files: per spec in `specs/` (and in `EXTRA`), the analysis report (`recdsl show --json`) and the
generated module (`recdsl compile`), committed under tests/golden/ so a reviewer sees in a diff what a change did to
the code users get. `tests/test_golden.py` compares them; after an intended change, regenerate them all with

    python -m tests.golden

(from the repository root) and commit the diff with the change.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
GOLDEN = TESTS / "golden"
SPECS = TESTS.parent / "specs"
# Spec files of tests/data/ whose generated code is worth a golden file too (shift states before a chunked form: a
# token shift and a short convolution's window, beside specs/mamba3.rec's last B and x).
EXTRA = (TESTS / "data" / "token_shift.rec",)


def golden_specs() -> list[Path]:
    """Every spec file with golden files: those of specs/, then `EXTRA`."""
    return sorted(SPECS.glob("*.rec")) + list(EXTRA)


def expected(spec: Path) -> dict[str, str]:
    """file name under tests/golden/ -> the text it must hold, for one spec file."""
    from codegen.module import module_source
    from recurrence_dsl.analysis import analyse
    from recurrence_dsl.api import load
    from recurrence_dsl.cli import describe

    recs = list(load(spec).values())
    report = json.dumps({"recurrences": [describe(r) for r in recs]}, indent=2) + "\n"
    module = module_source([analyse(r.checked) for r in recs], str(spec))
    return {f"{spec.stem}.show.json": report, f"{spec.stem}.module.py": module}


def update() -> list[str]:
    """Rewrite every golden file (and remove those of specs that are gone); the names of those that changed."""
    GOLDEN.mkdir(exist_ok=True)
    wanted: dict[str, str] = {}
    for spec in golden_specs():
        wanted.update(expected(spec))
    changed = []
    for name, text in wanted.items():
        path = GOLDEN / name
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            changed.append(name)
    for path in GOLDEN.iterdir():
        if path.name not in wanted:
            path.unlink()
            changed.append(f"{path.name} (removed)")
    return changed


if __name__ == "__main__":
    changed = update()
    print("\n".join(f"updated tests/golden/{name}" for name in changed) or "golden files are up to date")
    sys.exit(0)
