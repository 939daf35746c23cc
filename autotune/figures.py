"""The compiler's own figures for a tuning config: registers, spills and shared memory of every Triton kernel the
config's call launches, compiled for a GPU target without running anything (`codegen.kernel_report`), cached on
disk so that a second tune of the same call compiles nothing.

    figures = CompilerFigures(analysis, sizes, batch, length, heads, torch.bfloat16, "chunked", "sm_90",
                              backward=True)
    f = figures.get({"chunk_size": 64, "block_k": 64, "block_v": 64, "num_warps": 4, "num_stages": 2})
    f.registers, f.spill_bytes, f.shared_bytes, f.problems()     # the worst kernel's; why it cannot run well
    figures.compiled, figures.cached                            # configs compiled here / read from the cache
    figures.close()

The tuner (`autotune.tuner.tune`) asks for a config's figures just before it would time it and drops the config,
untimed, when a kernel spills registers (local memory per thread > 0) or needs more shared memory per block than
the target has; `recdsl tune` prints each config's registers and spills beside its time.

Where the compiles run. Triton's interpreter (TRITON_INTERPRET=1, how Triton kernels run on a CPU) replaces the
kernels at import, so a process where it is on cannot compile them: there, one worker child process without
TRITON_INTERPRET (`python -m autotune.figures`, started on the first miss, kept for the tune and closed after it)
loads the recurrence from its spec text and compiles each config it is sent. A worker that gives no answer within
$RECURRENCE_DSL_COMPILE_TIMEOUT seconds (default 600) is killed and the call raises RuntimeError. Elsewhere (a
GPU tune) the compiles run in this process, inside `kernel_report.compile_only` blocks.

The cache. One JSON file per (call, config) under the cache directory family of generated modules
(`codegen.cache.cache_directory("kernel-figures")`, next to `modules/`), named by a SHA-256 of: the generated
module's source (which holds every kernel's source, so a changed kernel or default is another key), the form, the
config (block sizes, num_warps, num_stages: the kernels' constexprs), the input dtype, the call's shape and spec
sizes (Triton specialises on the strides' divisibility), the target, fwd or fwd+bwd, the versions of triton,
ptxas and cuobjdump, the environment variables Triton itself counts as changing a compile (TRITON_DEFAULT_FP_FUSION,
...) and the source of the compile-only driver (`codegen/kernel_report.py`, which draws the call's arguments). A
file is written atomically and read only when its recorded key matches; a file that does not parse or does not
hold figures is a miss. A config that failed to compile is remembered for this object only, never written: the
failure may be a passing one (a full disk, a killed ptxas) and must not prune the config from every later tune.

When ptxas or cuobjdump is missing (`kernel_report.ToolMissing`), `CompilerFigures.available` is False and `why`
says so: the tuner then prunes with the hand-kept estimate of `autotune.space` instead, and its table says that.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMAT = 1  # bump when what a cache file holds changes

# Seconds the compile-only worker may take over one config (all its kernels, forward and backward) before it is
# taken as hung and killed: ptxas on the largest configs takes tens of seconds, a hang takes forever. The
# environment variable of that name overrides it.
WORKER_TIMEOUT = "RECURRENCE_DSL_COMPILE_TIMEOUT"
WORKER_TIMEOUT_SECONDS = 600.0


@dataclass(frozen=True)
class KernelFigures:
    """One compiled kernel of a config's call: per-thread registers, local (spill) bytes per thread, dynamic
    shared memory per block, as `codegen.kernel_report.KernelReport` reads them."""

    name: str
    phase: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    num_warps: int
    num_stages: int


@dataclass
class ConfigFigures:
    """The figures of every kernel one config launches for `target`, or why it did not compile (`error`)."""

    config: dict
    target: str
    max_shared_bytes: int
    kernels: list[KernelFigures] = field(default_factory=list)
    error: str | None = None
    cached: bool = False

    @property
    def registers(self) -> int:
        """The most registers a thread of any kernel uses (0 with no kernels)."""
        return max((k.registers for k in self.kernels), default=0)

    @property
    def spill_bytes(self) -> int:
        """The most local memory per thread of any kernel (bytes; > 0: ptxas spilled registers)."""
        return max((k.spill_bytes for k in self.kernels), default=0)

    @property
    def shared_bytes(self) -> int:
        return max((k.shared_bytes for k in self.kernels), default=0)

    def problems(self) -> list[str]:
        """Why the config should not be timed on `target`: it does not compile, a kernel spills, or a kernel needs
        more shared memory than a block may have. Empty when it runs clean."""
        if self.error is not None:
            return [f"does not compile for {self.target}: {self.error}"]
        out = []
        for k in self.kernels:
            if k.spill_bytes > 0:
                out.append(f"{k.name} ({k.phase}) spills {k.spill_bytes} B per thread at {k.registers} registers")
            if k.shared_bytes > self.max_shared_bytes:
                out.append(f"{k.name} ({k.phase}) needs {k.shared_bytes} B of shared memory, {self.target} allows "
                           f"{self.max_shared_bytes}")
        return out

    def as_dict(self) -> dict:
        return {"target": self.target, "registers": self.registers, "spill_bytes": self.spill_bytes,
                "shared_bytes": self.shared_bytes, "error": self.error, "cached": self.cached,
                "kernels": [k.__dict__ for k in self.kernels]}


def target_for_device(device) -> str | None:
    """The compile-only target of a torch device: sm_80 / sm_90 / sm_100 for a CUDA device of that compute
    capability (sm_10x for 10.x), None for other CUDA devices; a CPU tunes for sm_90 (as `space.device_limits`)."""
    from codegen.kernel_report import TARGETS

    device = torch.device(device if device is not None else "cpu")
    if device.type != "cuda" or not torch.cuda.is_available():
        return "sm_90"
    major, minor = torch.cuda.get_device_capability(device)
    name = f"sm_{major}{minor}"
    return name if name in TARGETS else None


class CompilerFigures:
    """Compile-only figures of one tuning call (a recurrence, sizes, shape, dtype, form) for one target, per
    config, cached on disk. See the module docstring.

    analysis: the recurrence's `Analysis`; sizes: spec sizes; batch / length / heads: the call's shape; dtype:
    the input dtype (float16, bfloat16, float32); form: "chunked", "parallel", "recurrent" or "scan" (its forward
    and backward scan kernels, the printed fused ones where the spec has them); target: a name of
    `codegen.kernel_report.TARGETS`; backward: also the backward's kernels (the tuner's fwdbwd mode);
    cache_dir: where the figures live (default: `codegen.cache.cache_directory("kernel-figures")`).
    Raises ValueError for an unknown target. `available` is False (and `why` says why) when triton, ptxas or
    cuobjdump is missing; `get` must not be called then.
    """

    def __init__(self, analysis, sizes: dict[str, int], batch: int, length: int, heads: int, dtype: torch.dtype,
                 form: str, target: str, *, backward: bool = False, cache_dir: Path | None = None):
        from codegen import kernel_report as kr
        from codegen.load import load_module

        self.target = kr.target_of(target).name
        self.max_shared_bytes = kr.TARGETS[self.target].max_shared_bytes
        self.analysis, self.form, self.backward = analysis, form, backward
        self.sizes = {k: int(v) for k, v in sizes.items()}
        self.shape = (int(batch), int(length), int(heads))
        self.dtype = str(dtype).removeprefix("torch.")
        self.compiled = 0  # configs compiled by this object (not read from the cache)
        self.cached = 0  # configs read from the cache
        self._worker: subprocess.Popen | None = None
        self._memo: dict[str, ConfigFigures] = {}
        try:
            tools = kr.tool_versions(self.target)
            import triton
        except kr.ToolMissing as err:
            self.available, self.why, self._base = False, str(err), {}
            return
        self.available, self.why = True, f"compiled for {self.target} (ptxas {tools['ptxas']})"
        module_file = Path(load_module(analysis).__file__)
        self._base = {"format": FORMAT, "module_sha256": hashlib.sha256(module_file.read_bytes()).hexdigest(),
                      "driver_sha256": hashlib.sha256(Path(kr.__file__).read_bytes()).hexdigest(),
                      "form": form, "dtype": self.dtype, "shape": list(self.shape), "sizes": self.sizes,
                      "target": self.target, "backward": backward, "triton": triton.__version__,
                      "triton_env": _triton_compile_env(), **tools}
        if cache_dir is None:
            from codegen.cache import cache_directory

            cache_dir = cache_directory("kernel-figures")
        self.cache_dir = Path(cache_dir)

    # -- the cache ------------------------------------------------------------------------------------------

    def key(self, config: dict) -> dict:
        """Everything a config's figures depend on (see the module docstring)."""
        return {**self._base, "config": {k: int(config[k]) for k in sorted(config)}}

    def _path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        return self.cache_dir / f"{digest}.json"

    def _read(self, key: dict) -> ConfigFigures | None:
        path = self._path(key)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("key") != key:
            return None  # another key with the same digest prefix, or a stale format
        kernels = data.get("kernels")
        if data.get("error") is not None or not isinstance(kernels, list):
            return None  # (errors are never written: such a file is not this module's)
        try:
            found = self._figures(key["config"], kernels, None, cached=True)
        except TypeError:  # kernel entries without the fields of KernelFigures
            return None
        return found if all(_well_formed(k) for k in found.kernels) else None

    def _write(self, key: dict, figures: ConfigFigures) -> None:
        from codegen.cache import write_atomically

        data = {"key": key, "error": figures.error, "kernels": [k.__dict__ for k in figures.kernels]}
        try:
            self.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomically(self._path(key), json.dumps(data, indent=1) + "\n")
        except OSError:
            pass  # a cache that cannot be written costs a compile next time, nothing else

    def _figures(self, config: dict, kernels: list[dict], error: str | None, cached: bool) -> ConfigFigures:
        return ConfigFigures(dict(config), self.target, self.max_shared_bytes,
                             [KernelFigures(**k) for k in kernels], error, cached)

    # -- the compiles ---------------------------------------------------------------------------------------

    def get(self, config: dict) -> ConfigFigures:
        """The figures of `config` (from memory, the disk cache, or a compile now)."""
        if not self.available:
            raise RuntimeError(f"no compile-only figures: {self.why}")
        key = self.key(config)
        memo = json.dumps(key["config"], sort_keys=True)
        if memo in self._memo:
            return self._memo[memo]
        found = self._read(key)
        if found is not None:
            self.cached += 1
        else:
            kernels, error = self._compile(key["config"])
            self.compiled += 1
            found = self._figures(key["config"], kernels, error, cached=False)
            if error is None:  # a failure may pass (see the module docstring): this object remembers it, no file
                self._write(key, found)
        self._memo[memo] = found
        return found

    def _request(self, config: dict) -> dict:
        rec = self.analysis.recurrence
        b, t, h = self.shape
        return {"text": rec.text, "filename": rec.source.filename, "name": rec.name, "sizes": self.sizes,
                "batch": b, "length": t, "heads": h, "dtype": self.dtype, "form": self.form,
                "target": self.target, "backward": self.backward, "config": config}

    def _compile(self, config: dict) -> tuple[list[dict], str | None]:
        from codegen.layer import interpreting

        request = self._request(config)
        if not interpreting():
            return _compile_request(request, self.analysis)
        timeout = worker_timeout()
        if self._worker is None or self._worker.poll() is not None:
            self._worker = _start_worker()
        try:
            self._worker.stdin.write(json.dumps(request) + "\n")
            self._worker.stdin.flush()
            line = _read_answer(self._worker, timeout)
        except TimeoutError:  # (an OSError too: caught first)
            line, why = "", f"no answer within {timeout:g} s ({WORKER_TIMEOUT}); it was killed"
        except (BrokenPipeError, OSError) as err:
            line, why = "", str(err)
        else:
            why = "it exited"
        if not line:
            log = _worker_log(self._worker)
            self.close()
            raise RuntimeError(f"the compile-only worker (python -m autotune.figures) failed: {why}"
                               + (f"; its stderr ends:\n{log}" if log else ""))
        answer = json.loads(line)
        if "fatal" in answer:
            raise RuntimeError(f"the compile-only worker failed: {answer['fatal']}")
        return answer["kernels"], answer["error"]

    def close(self) -> None:
        """Stop the worker process, if one was started."""
        worker, self._worker = self._worker, None
        if worker is not None and worker.poll() is None:
            try:
                worker.stdin.close()
                worker.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                worker.kill()
                worker.wait()
        if getattr(worker, "log", None) is not None:
            worker.log.close()

    def __enter__(self) -> CompilerFigures:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _well_formed(kernel: KernelFigures) -> bool:
    """Whether a kernel's figures read from a file are of the types a compile gives (names, counts >= 0)."""
    counts = (kernel.registers, kernel.spill_bytes, kernel.shared_bytes, kernel.num_warps, kernel.num_stages)
    return (isinstance(kernel.name, str) and isinstance(kernel.phase, str)
            and all(type(n) is int and n >= 0 for n in counts))


def _triton_compile_env() -> dict[str, str]:
    """The environment variables set now that Triton counts as changing a compile (its own cache key holds them);
    empty where this Triton does not say (the name is not public API, so it is looked up, not relied on)."""
    try:
        from triton.runtime.jit import get_cache_invalidating_env_vars
    except ImportError:
        return {}
    return {str(k): str(v) for k, v in sorted(get_cache_invalidating_env_vars().items())}


def _start_worker(args: tuple[str, ...] = ("-m", "autotune.figures")) -> subprocess.Popen:
    """The worker process (`_worker_main`; args: what the Python interpreter runs), without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[1])  # the directory holding the autotune package
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    log = tempfile.TemporaryFile()  # the worker's stderr (and its stray stdout), read back when it fails
    worker = subprocess.Popen([sys.executable, *args], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=log, text=True, env=env, bufsize=1)
    worker.log = log
    return worker


def worker_timeout() -> float:
    """Seconds the compile worker may take over one config: $RECURRENCE_DSL_COMPILE_TIMEOUT, else
    WORKER_TIMEOUT_SECONDS. Raises ValueError naming the variable for a value that is not a positive number."""
    text = os.environ.get(WORKER_TIMEOUT, "").strip()
    if not text:
        return WORKER_TIMEOUT_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{WORKER_TIMEOUT} must be a positive number of seconds, got {text!r}")
    return seconds


def _read_answer(worker: subprocess.Popen, timeout: float) -> str:
    """The worker's next line on stdout ("" when it exits first). Raises TimeoutError after `timeout` seconds
    without a full line, having killed the worker (a blocking readline would otherwise hang the tune for ever)."""
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(worker.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive():
        worker.kill()  # closes the pipe's far end, so the reader's readline returns and the thread ends
        worker.wait()
        reader.join()
        raise TimeoutError
    return got[0] if got else ""


def _worker_log(worker: subprocess.Popen | None, chars: int = 2000) -> str:
    """The last `chars` characters the worker wrote to its stderr."""
    log = getattr(worker, "log", None)
    if log is None or log.closed:
        return ""
    log.seek(0)
    return log.read().decode(errors="replace")[-chars:].strip()


def _compile_request(request: dict, analysis=None) -> tuple[list[dict], str | None]:
    """Compile one request's call for its target: (the kernels' figures, None) or ([], why it failed)."""
    from codegen import kernel_report as kr

    if analysis is None:
        from recurrence_dsl.analysis import analyse
        from recurrence_dsl.api import load_text

        analysis = analyse(load_text(request["text"], request["filename"])[request["name"]].checked)
    try:
        reports = kr.report_recurrence(analysis, request["sizes"], request["batch"], request["length"],
                                       request["heads"], dtype=getattr(torch, request["dtype"]),
                                       target=request["target"], form=request["form"], config=request["config"],
                                       backward=request["backward"])
    except kr.CompileFailed as err:
        return [], str(err)[:1000]
    seen, kernels = set(), []
    for r in reports:  # one row per compiled kernel (a kernel launched with several grids is one binary)
        if (r.name, r.phase) in seen:
            continue
        seen.add((r.name, r.phase))
        kernels.append({"name": r.name, "phase": r.phase, "registers": r.registers, "spill_bytes": r.spill_bytes,
                        "shared_bytes": r.shared_bytes, "num_warps": r.num_warps, "num_stages": r.num_stages})
    return kernels, None


def _worker_main() -> int:
    """The worker loop: one JSON request a line on stdin, one JSON answer a line on stdout, until stdin closes.

    The answers go to a copy of the stdout file descriptor taken first; stdout itself (descriptor 1) then points
    where stderr does, so a print of Triton, ptxas or a library during a compile cannot land inside the answers."""
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout.flush()
    os.dup2(2, 1)
    analyses: dict[tuple[str, str, str], object] = {}
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            key = (request["text"], request["filename"], request["name"])
            if key not in analyses:
                from recurrence_dsl.analysis import analyse
                from recurrence_dsl.api import load_text

                analyses[key] = analyse(load_text(request["text"], request["filename"])[request["name"]].checked)
            kernels, error = _compile_request(request, analyses[key])
            answer = {"kernels": kernels, "error": error}
        except Exception as err:  # noqa: BLE001 - reported to the tuner, which stops with it
            answer = {"fatal": f"{type(err).__name__}: {err}"[:2000]}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()
    return 0


__all__ = ["FORMAT", "CompilerFigures", "ConfigFigures", "KernelFigures", "target_for_device"]


if __name__ == "__main__":
    sys.exit(_worker_main())
