"""Child processes the tests wait on, run in the background while the rest of the suite runs.

Several tests compile Triton kernels for a GPU target in a child process without TRITON_INTERPRET (the session's
interpreter runs kernels instead of compiling them; see codegen/kernel_report.py): ptxas runs, minutes of CPU in
all, while the test process only waits. A single-process session runs on one core, so on a two-core machine these
children can run on the other one, started as soon as collection is done, and the tests read their results when
they get there. Under pytest-xdist (the README's test command: a worker per core) nothing is started early: every
core runs tests already, and a test runs its child when it reaches `result()`.

    NO_SPILLS = Child("no_spills", [sys.executable, "-c", CHILD, ...])      # at module level: nothing runs yet

    @NO_SPILLS.needed
    def test_no_spills():
        done = NO_SPILLS.result()          # a subprocess.CompletedProcess (text stdout/stderr), as subprocess.run's

A child's command is fixed when its module is imported, and it runs in REPO with the environment the session had
when collection finished (before any test's monkeypatch), changed by `env` (by default: less TRITON_INTERPRET,
with PYTHONPATH = REPO, for compiles without the interpreter): the same command the test ran itself before.
`tests/conftest.py` starts the children the selected tests need, in the order of those tests, one at a time in a
background thread, so at most one child competes with the test process. A test that reaches `result()` before its
child started runs it at once itself; a reordered or `-k`-selected session only changes when a child runs, never
what it runs or what the test asserts. A child that fails or times out is reported by its test (`returncode`,
`stderr`, or the TimeoutExpired), as a foreground run was.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MARKER = "child"

_CHILDREN: dict[str, Child] = {}
_ENV: dict[str, str] | None = None  # the session's environment once collection is done
_QUEUE: list[Child] = []
_QUEUE_LOCK = threading.Lock()
_WORKER: threading.Thread | None = None
_STOPPED = threading.Event()  # set when the session ends: no child starts after it


COMPILE_ENV = {"TRITON_INTERPRET": None, "PYTHONPATH": str(REPO)}  # kernels compile for a GPU target


class Child:
    """One child process: `argv` run in REPO (see the module docstring). `env`: changes to the session's environment
    (a value of None removes the variable). `files` are written to a fresh temporary directory first, whose path
    replaces "{dir}" in argv and is `self.dir` until the session ends (for the files the child writes); `input` is
    its stdin; `timeout` its limit in seconds (subprocess.TimeoutExpired from `result()` past it, as
    subprocess.run raises)."""

    def __init__(self, name: str, argv: Sequence[str], *, env: dict[str, str | None] | None = None,
                 files: dict[str, str] | None = None, input: str | None = None, timeout: float = 600):
        if name in _CHILDREN and _CHILDREN[name].argv != list(argv):
            raise ValueError(f"a child named {name!r} exists already, with another command")
        self.name, self.argv, self.files, self.input, self.timeout = name, list(argv), files or {}, input, timeout
        self.env = COMPILE_ENV if env is None else env
        self.dir: Path | None = None
        self._lock = threading.Lock()  # held while the child runs: a second caller waits for the first's result
        self._done: subprocess.CompletedProcess | BaseException | None = None
        self._proc: subprocess.Popen | None = None
        _CHILDREN[name] = self

    def needed(self, test: Callable) -> Callable:
        """Mark `test` as reading this child's result, so the session starts it early."""
        import pytest

        return getattr(pytest.mark, MARKER)(self.name)(test)

    def result(self) -> subprocess.CompletedProcess:
        """The finished child's CompletedProcess (args, returncode, stdout, stderr as text); runs it now if the
        background thread has not started it yet, waits for it if it has."""
        with _QUEUE_LOCK:
            if self in _QUEUE:
                _QUEUE.remove(self)
        self._run()
        if isinstance(self._done, BaseException):
            raise self._done
        return self._done

    def _run(self) -> None:
        with self._lock:
            if self._done is not None:
                return
            env = dict(_ENV if _ENV is not None else os.environ)
            for key, value in self.env.items():
                if value is None:
                    env.pop(key, None)
                else:
                    env[key] = value
            if self.files or any("{dir}" in a for a in self.argv):
                self.dir = Path(tempfile.mkdtemp(prefix=f"child-{self.name}-"))
            try:
                if _STOPPED.is_set():
                    raise RuntimeError(f"child {self.name}: the test session has ended")
                for rel, text in self.files.items():
                    (self.dir / rel).write_text(text)
                argv = [a.replace("{dir}", str(self.dir)) if self.dir else a for a in self.argv]
                self._proc = subprocess.Popen(argv, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE,
                                              stdin=subprocess.PIPE if self.input is not None else None)
                try:
                    out, err = self._proc.communicate(self.input, timeout=self.timeout)
                except subprocess.TimeoutExpired as timeout:
                    self._proc.kill()
                    self._proc.communicate()
                    self._done = timeout
                    return
                self._done = subprocess.CompletedProcess(argv, self._proc.returncode, out, err)
            except Exception as err:  # (an OSError starting it): the test reports it, as subprocess.run would raise
                self._done = err
            finally:
                self._proc = None

    def stop(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def _work() -> None:
    while True:
        with _QUEUE_LOCK:
            if not _QUEUE:
                return
            child = _QUEUE.pop(0)
        child._run()


def start(items) -> None:
    """Queue the children the collected `items` need, in their order, and start the background thread."""
    global _ENV, _WORKER
    _ENV = dict(os.environ)
    _STOPPED.clear()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return  # under pytest-xdist every core runs tests already: a test runs its child when it reaches it
    wanted: list[Child] = []
    for item in items:
        if any(mark.args and mark.args[0] is True for mark in item.iter_markers("skipif")):
            continue  # a test skipped for a missing tool (ptxas) needs no child
        for mark in item.iter_markers(MARKER):
            child = _CHILDREN.get(mark.args[0])
            if child is not None and child not in wanted and child._done is None:
                wanted.append(child)
    with _QUEUE_LOCK:
        _QUEUE[:] = wanted
    if wanted:
        _WORKER = threading.Thread(target=_work, name="test-children", daemon=True)
        _WORKER.start()


def stop() -> None:
    """End the session: drop what has not started and kill what is running (an interrupted or -x session)."""
    _STOPPED.set()
    with _QUEUE_LOCK:
        _QUEUE.clear()
    for child in _CHILDREN.values():
        child.stop()
