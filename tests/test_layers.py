"""The import layers: the `[tool.importlinter]` contracts in pyproject.toml hold (lint-imports), no module
takes another package's private names (ruff's PLC2701), and the lazy facade keeps a lower module's import
free of codegen and autotune at run time."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from .children import Child
from .conftest import REPO

# This checkout's packages first on the path (an editable install may point at another checkout).
_ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def _tool(name: str) -> str | None:
    """A console script of this interpreter's environment (next to sys.executable), else from PATH."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.is_file() else shutil.which(name)


def _run(name: str, tool: str, *argv: str) -> Child:
    """`tool ARGV` in REPO, run in the background from the start of the session (tests/children.py)."""
    return Child(name, [_tool(tool) or tool, *argv], env=_ENV, timeout=300)


LINT_IMPORTS = _run("lint_imports", "lint-imports", "--no-cache", "--no-logo")
PRIVATE_NAMES = _run("ruff_private_names", "ruff", "check", "--no-cache", "--preview", "--select", "PLC2701",
                     "--output-format", "concise", "recurrence_dsl", "codegen", "autotune", "grammar")


@LINT_IMPORTS.needed
def test_import_contracts_are_kept():
    assert _tool("lint-imports"), "lint-imports is not installed: pip install -e '.[dev]'"
    result = LINT_IMPORTS.result()
    assert result.returncode == 0, result.stdout + result.stderr


@PRIVATE_NAMES.needed
def test_no_private_names_across_packages():
    assert _tool("ruff"), "ruff is not installed: pip install -e '.[dev]'"
    result = PRIVATE_NAMES.result()
    assert result.returncode == 0, result.stdout + result.stderr


FACADE_PROBE = """
import sys
import recurrence_dsl.analysis
assert not any(m.split(".")[0] in ("codegen", "autotune") for m in sys.modules), sorted(sys.modules)
assert "recurrence_dsl.compiler" not in sys.modules
import recurrence_dsl
from recurrence_dsl import CallError, Recurrence, SpecError, __version__, compile, load, load_text
from recurrence_dsl.compiler import compile_recurrence
from recurrence_dsl.version import __version__ as version
assert compile is compile_recurrence is recurrence_dsl.compile and __version__ == version
assert set(recurrence_dsl.__all__) <= set(dir(recurrence_dsl))
try:
    recurrence_dsl.no_such_name
except AttributeError:
    pass
else:
    raise AssertionError("recurrence_dsl.no_such_name")
"""
FACADE = Child("lazy_facade", [sys.executable, "-c", FACADE_PROBE], env=_ENV, timeout=300)


@FACADE.needed
def test_the_facade_is_lazy():
    result = FACADE.result()
    assert result.returncode == 0, result.stdout + result.stderr
