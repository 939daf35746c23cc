"""Wall-clock timing shared by the CPU benchmark scripts (GPU timings use triton.testing.do_bench)."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path


def timed(fn, repeats: int, clock=time.perf_counter) -> float:
    """Median time of `fn()` in seconds over `repeats` runs, after one warm-up: wall time, or `clock` (such as
    time.process_time, this process's CPU time, which on an oversubscribed machine leaves out others' turns)."""
    fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def thread_report() -> dict:
    """The CPU thread settings of this run (`autotune.threads.thread_settings`) plus "warnings": why
    multi-threaded timings under them may be unreliable (each also printed to stderr). Every CPU benchmark
    stores this in its JSON as "threads"."""
    import sys

    from autotune.threads import thread_settings, timing_warnings

    settings = thread_settings()
    notes = timing_warnings(settings)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    return {**settings, "warnings": notes}


def results_path(out: str | None, smoke: bool, name: str) -> Path:
    """Where a benchmark writes its JSON: `out` when given; else benchmarks/results/<name> for a full run, and for a
    --smoke run <the system's temporary folder>/recdsl-smoke-<name>, so that a smoke run's tiny shapes never
    replace the committed results."""
    if out is not None:
        return Path(out)
    if smoke:
        return Path(tempfile.gettempdir()) / f"recdsl-smoke-{name}"
    return Path(__file__).resolve().parent / "results" / name
