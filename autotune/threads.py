"""The CPU thread settings a timing ran with, and when they make multi-threaded timings unreliable.

torch's intra-op pool is OpenMP. With OMP_WAIT_POLICY unset (or ACTIVE), an idle OpenMP thread spins for a
while before it sleeps; on a machine whose cores are busy with other processes, the spinning threads of a
multi-threaded run fight those processes for the cores, and the run can take 10-100x longer than with one
thread (measured on a shared 2-core machine under load: 2 threads ran 12-120x slower than 1 until
OMP_WAIT_POLICY=PASSIVE). The benchmarks and the tuner record these settings in their results and print the
warnings below; they change nothing themselves.
"""

from __future__ import annotations

import os

_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "KMP_BLOCKTIME", "GOMP_SPINCOUNT")


def thread_settings() -> dict:
    """{"torch_threads", "torch_interop_threads", "cpu_count", "load_average_1m" (None where unknown),
    OMP_NUM_THREADS, OMP_WAIT_POLICY, MKL_NUM_THREADS, KMP_BLOCKTIME, GOMP_SPINCOUNT (None when unset)}."""
    import torch

    try:
        load = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        load = None
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    settings = {"torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
                "cpu_count": cpus, "load_average_1m": load}
    settings.update({name: os.environ.get(name) for name in _ENV})
    return settings


def timing_warnings(settings: dict | None = None) -> list[str]:
    """Why multi-threaded CPU timings under these settings may be unreliable (empty when they look sound).

    Warned: more torch threads than usable cores; several torch threads with OMP_WAIT_POLICY other than
    PASSIVE while the 1-minute load average leaves fewer idle cores than the run has threads (the load of
    the timing process itself counts too, so on an otherwise idle machine this stays quiet)."""
    s = thread_settings() if settings is None else settings
    threads, cpus, load = s["torch_threads"], s["cpu_count"], s.get("load_average_1m")
    policy = (s.get("OMP_WAIT_POLICY") or "").upper()
    notes = []
    if threads > cpus:
        notes.append(f"{threads} torch threads on {cpus} usable cores: threads share cores and timings scatter; "
                     f"use torch.set_num_threads({cpus}) or fewer")
    if threads > 1 and policy != "PASSIVE" and load is not None and load > cpus - threads + 1:
        shown = policy or "unset (spinning)"
        notes.append(f"{threads} torch threads with OMP_WAIT_POLICY {shown} on a machine with load average "
                     f"{load:g} over {cpus} cores: spinning OpenMP threads compete with the other work and "
                     "multi-threaded timings can be 10-100x slow and noisy; set OMP_WAIT_POLICY=PASSIVE (before "
                     "the process starts) or time with one thread")
    return notes


__all__ = ["thread_settings", "timing_warnings"]
