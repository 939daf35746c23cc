"""The import layers: the `[tool.importlinter]` contracts in pyproject.toml hold (lint-imports), no module
takes another package's private names (ruff's PLC2701), and the lazy facade keeps a lower module's import
free of codegen and autotune at run time."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import REPO


def _env() -> dict[str, str]:
    """This checkout's packages first on the path (an editable install may point at another checkout)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _tool(name: str) -> str:
    """A console script of this interpreter's environment (next to sys.executable), else from PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.is_file() else shutil.which(name)
    assert found, f"{name} is not installed: pip install -e '.[dev]'"
    return found


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)


def test_import_contracts_are_kept():
    result = _run([_tool("lint-imports"), "--no-cache", "--no-logo"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_private_names_across_packages():
    result = _run([_tool("ruff"), "check", "--no-cache", "--preview", "--select", "PLC2701",
                   "--output-format", "concise", "recurrence_dsl", "codegen", "autotune", "grammar"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_facade_is_lazy():
    probe = """
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
    result = _run([sys.executable, "-c", probe])
    assert result.returncode == 0, result.stdout + result.stderr
