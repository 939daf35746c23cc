"""Wall-clock timing shared by the CPU benchmark scripts (GPU timings use triton.testing.do_bench)."""

from __future__ import annotations

import statistics
import time


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
