"""`tune()`: search a layer's config space with optuna, timing real runs, recording every trial in the store.

    from autotune import tune
    result = tune(gla, {"K": 64, "V": 64}, batch=4, length=2048, heads=8, dtype=torch.bfloat16,
                  form="chunked", backend="triton", trials=40, device="cuda")
    print(result.table())            # one row per timed config, fastest first
    result.best                      # {"chunk_size": 64, "block_k": 64, ...}: also the store's best() now

How a search runs:

1. The config space of (form, backend) is pruned by the constraint model (`autotune.space`) for these sizes
   and this device before anything is timed.
2. optuna's TPE sampler (fixed seed) proposes configs as ONE categorical parameter whose choices are the kept
   configs' keys, so a pruned config can never be proposed. The untuned default config is enqueued first (when
   it is kept), so every search measures the baseline. When TPE proposes a config already timed, it is told
   the stored time again and the next untimed config (in a seeded random order) is enqueued, so the budget
   `trials` is spent on distinct configs (at most the size of the pruned space: a small space is exhaustive).
3. A trial compiles the layer for (backend, form), runs it on sampled inputs (`sample_arguments`, seeded) with
   the config (`autotune.runner.run_config`): `warmup` untimed runs (the first also JIT-compiles a Triton
   kernel), then `repeat` timed runs; the trial's value is their median in milliseconds (CUDA events after a
   synchronize on a GPU, `perf_counter` on a CPU). The first run's outputs are checked against the torch
   backend's form in float32 (relative error `||x - ref|| / ||ref||` within a dtype tolerance), so a fast but
   wrong config cannot win.
4. Every trial is stored, with its median or its error. A failure (an exception: Triton's OutOfResources,
   a CUDA out-of-memory, a wrong result, ...) is recorded with its message and the optuna trial is marked
   PRUNED; it never stops the search.

Triton kernels on a CPU run in Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported): that
works and is stored under the device "cpu-interpreter", whose timings are never used for a GPU (nor looked
up at all). The useful CPU case is the torch backend's chunked form, whose chunk_size matters there too.
"""

from __future__ import annotations

import math
import random
import statistics
import time
import uuid
from dataclasses import dataclass, field

import torch

from .lookup import INTERPRETER, clear_cache, device_name, spec_hash_of
from .runner import run_config
from .space import SPACES, Problem, Space, config_key, config_space, device_limits, parse_config_key, tunable
from .store import TuningStore, dtype_name, open_store, shape_bucket

# Relative error allowed against the float32 torch form, by input dtype (half inputs use tf32 dots).
TOLERANCE = {torch.float64: 1e-6, torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}
MAX_ERROR_CHARS = 2000


class NoLegalConfig(ValueError):
    """The constraint model pruned every config of the space."""


@dataclass
class TrialResult:
    number: int  # the order in which it was timed (0 = first)
    config: dict
    median_ms: float | None
    error: str | None
    times_ms: list[float] = field(default_factory=list)
    rel_error: float | None = None

    @property
    def ok(self) -> bool:
        return self.median_ms is not None


@dataclass
class TuneResult:
    spec_hash: str
    device: str
    dtype: str
    bucket: str
    form: str
    backend: str
    study: str
    space: Space
    trials: list[TrialResult]
    elapsed_s: float

    @property
    def key(self) -> tuple[str, str, str, str, str, str]:
        """(spec_hash, device, dtype, bucket, form, backend): the store's key, as `TuningStore.best` takes it."""
        return (self.spec_hash, self.device, self.dtype, self.bucket, self.form, self.backend)

    @property
    def best_trial(self) -> TrialResult | None:
        ok = [t for t in self.trials if t.ok]
        return min(ok, key=lambda t: (t.median_ms, t.number)) if ok else None

    @property
    def best(self) -> dict | None:
        """The fastest config of this search (None when every trial failed)."""
        best = self.best_trial
        return dict(best.config) if best else None

    @property
    def best_ms(self) -> float | None:
        best = self.best_trial
        return best.median_ms if best else None

    @property
    def default_ms(self) -> float | None:
        key = config_key(self.space.default)
        return next((t.median_ms for t in self.trials if config_key(t.config) == key and t.ok), None)

    def table(self) -> str:
        """One line per timed config, fastest first, failures last, with the speed-up over the slowest."""
        rows = sorted(self.trials, key=lambda t: (not t.ok, t.median_ms or math.inf, t.number))
        slowest = max((t.median_ms for t in self.trials if t.ok), default=None)
        default = config_key(self.space.default)
        lines = [f"{self.form}/{self.backend}  {self.bucket}  {self.dtype}  on {self.device}",
                 f"{self.space.summary()}; {len(self.trials)} timed in {self.elapsed_s:.1f} s; study {self.study}"]
        lines += [f"note: {n}" for n in self.space.notes]
        width = max([len(config_key(t.config)) for t in rows] + [6])
        lines.append(f"  {'#':>3}  {'config':<{width}}  {'median ms':>10}  {'vs slowest':>10}")
        for t in rows:
            key = config_key(t.config)
            mark = " (default)" if key == default else ""
            if t.ok:
                speed = f"{slowest / t.median_ms:9.2f}x" if t.median_ms > 0 else "-"
                lines.append(f"  {t.number:>3}  {key:<{width}}  {t.median_ms:>10.4f}  {speed:>10}{mark}")
            else:
                lines.append(f"  {t.number:>3}  {key:<{width}}  {'failed':>10}  {'':>10}{mark}  {t.error}")
        best = self.best_trial
        if best is not None:
            versus = f"; default {self.default_ms:.4f} ms" if self.default_ms else ""
            lines.append(f"best: {config_key(best.config)} at {best.median_ms:.4f} ms{versus}")
        else:
            lines.append("best: none (every trial failed)")
        return "\n".join(lines)


# -- timing ---------------------------------------------------------------------------------------------------


def measure(fn, device: torch.device, warmup: int = 2, repeat: int = 5) -> tuple[list[float], object]:
    """(times in ms of `repeat` runs after `warmup` runs, the first run's result). CUDA: one event pair per run,
    read after a synchronize; CPU: perf_counter around each run."""
    first = None
    for i in range(max(warmup, 1)):
        out = fn()
        if i == 0:
            first = out
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeat)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times, first


def _tensors(result) -> list[torch.Tensor]:
    if torch.is_tensor(result):
        return [result]
    if isinstance(result, dict):
        result = list(result.values())
    if isinstance(result, (list, tuple)):
        return [t for r in result for t in _tensors(r)]
    return []


def relative_error(got, ref) -> float:
    """max over the output tensors of ||got - ref|| / ||ref|| (in float64)."""
    errors = []
    for g, r in zip(_tensors(got), _tensors(ref)):
        g, r = g.detach().double(), r.detach().double()
        if not torch.isfinite(g).all():
            return math.inf
        errors.append(((g - r).norm() / r.norm().clamp_min(1e-30)).item())
    return max(errors, default=0.0)


def _message(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


# -- the search -------------------------------------------------------------------------------------------------


def tune(rec, sizes: dict[str, int], batch: int, length: int, heads: int, dtype: torch.dtype = torch.float32,
         form: str = "chunked", backend: str = "torch", trials: int = 20, store=None, device=None, *,
         warmup: int = 2, repeat: int = 5, seed: int = 0, limits=None, check: bool = True,
         verbose: bool = False) -> TuneResult:
    """Tune `rec`'s `form` on `backend` for inputs [batch, length, heads, ...] of `dtype` with spec `sizes`.

    rec: a `Recurrence` (or `CheckedRecurrence`); store: a `TuningStore`, a path, or None (the default store);
    device: "cpu", "cuda", a torch.device (default: cuda when available); limits: `space.DeviceLimits` to
    override the device's (shared memory per block, register budget). Returns a `TuneResult`; raises
    `NoLegalConfig` when the constraint model leaves nothing to time, ValueError for a bad request.
    """
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState

    from codegen.layer import interpreting
    from codegen.load import load_layer
    from recurrence_dsl.analysis import analyse
    from recurrence_dsl.sampling import sample_arguments

    checked = getattr(rec, "checked", rec)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
    if backend == "triton" and device.type == "cpu" and not interpreting():
        raise ValueError("Triton kernels on a CPU need Triton's interpreter: set TRITON_INTERPRET=1 before "
                         "triton is imported (its timings are stored as device 'cpu-interpreter')")
    if not tunable(form, backend):
        choices = ", ".join(f"{f}/{b}" for f, b in SPACES)
        raise ValueError(f"nothing to tune for form={form!r}, backend={backend!r}; tunable: {choices}")
    if trials < 1:
        raise ValueError(f"trials must be at least 1, got {trials}")
    missing = set(checked.sizes) - set(sizes)
    if missing:
        raise ValueError(f"sizes: {checked.name} needs {', '.join(sorted(missing))}")
    sizes = {s: int(sizes[s]) for s in checked.sizes}

    # A layer loaded here reads no store (it has no tuning lookup): every trial runs exactly its config.
    analysis = analyse(checked)
    if form not in analysis.forms:
        raise ValueError(f"{checked.name} has no '{form}' form: {analysis.unavailable.get(form, 'unknown form')}")
    layer = load_layer(analysis)
    problem = Problem.from_analysis(analysis, sizes, length)
    space = config_space(form, backend, problem, limits if limits is not None else device_limits(device))
    if not space.configs:
        reasons = sorted({p.reason for p in space.pruned})[:5]
        raise NoLegalConfig(f"no {form}/{backend} config fits {checked.name} with sizes {sizes}, T={length} on "
                            f"{space.limits.name}; e.g. " + " | ".join(reasons))

    store = open_store(store)
    spec_hash = spec_hash_of(rec)
    dev_name = device_name(device, backend)
    dname = dtype_name(dtype)
    bucket = shape_bucket(batch, heads, length, sizes)
    study_id = uuid.uuid4().hex[:12]

    args, _ = sample_arguments(checked, sizes, batch, length, heads, dtype=dtype, seed=seed)
    args = [a.to(device) for a in args]
    reference = None
    if check:
        ref_layer = layer.options(backend="torch")
        with torch.no_grad():
            ref_args = [a.float() if a.dtype != torch.float64 else a for a in args]
            reference = run_config(ref_layer, "torch", form, {"chunk_size": 64}, *ref_args) if form == "chunked" \
                else ref_layer(*ref_args, form=form)
    tolerance = TOLERANCE.get(dtype, 5e-2)

    def run_trial(number: int, config: dict) -> TrialResult:
        def call():
            return run_config(layer, backend, form, config, *args)

        try:
            with torch.no_grad():
                times, first = measure(call, device, warmup, repeat)
            rel = relative_error(first, reference) if reference is not None else None
            if rel is not None and not rel <= tolerance:
                raise ArithmeticError(f"wrong result: relative error {rel:.3g} > {tolerance:g} against the "
                                      f"torch {form} form")
            result = TrialResult(number, config, float(statistics.median(times)), None, times, rel)
        except Exception as err:  # noqa: BLE001 - any failure of one config is that trial's result
            if device.type == "cuda":
                torch.cuda.empty_cache()
            result = TrialResult(number, config, None, _message(err))
        store.record(spec_hash, dev_name, dname, bucket, form, backend, config, result.median_ms, result.error,
                     study=study_id)
        if verbose:
            shown = f"{result.median_ms:.4f} ms" if result.ok else result.error
            print(f"[tune {number}] {config_key(config)}: {shown}", flush=True)
        return result

    keys = space.keys()
    budget = min(trials, len(keys))
    fill = keys[:]
    random.Random(seed).shuffle(fill)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, min(10, budget // 3)))
    old_verbosity = optuna.logging.get_verbosity()
    if not verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    done: dict[str, TrialResult] = {}
    try:
        study = optuna.create_study(direction="minimize", sampler=sampler, study_name=f"recdsl-{study_id}")
        distributions = {"config": CategoricalDistribution(keys)}
        default = config_key(space.default)
        if default in keys:
            study.enqueue_trial({"config": default})
        asks = 0
        while len(done) < budget and asks < 4 * budget + 16:
            asks += 1
            trial = study.ask(distributions)
            key = trial.params["config"]
            if key not in done:
                done[key] = run_trial(len(done), parse_config_key(key))
            else:  # proposed again: answer from the first timing and steer to an untimed config
                study.enqueue_trial({"config": next(k for k in fill if k not in done)})
            result = done[key]
            if result.ok:
                study.tell(trial, result.median_ms)
            else:
                study.tell(trial, state=TrialState.PRUNED)
    finally:
        optuna.logging.set_verbosity(old_verbosity)
        clear_cache()
    return TuneResult(spec_hash, dev_name, dname, bucket, form, backend, study_id, space, list(done.values()),
                      time.perf_counter() - started)


__all__ = ["INTERPRETER", "NoLegalConfig", "TrialResult", "TuneResult", "TuningStore", "measure", "relative_error",
           "tune"]
