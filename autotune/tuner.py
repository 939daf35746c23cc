"""`tune()`: time a layer's configs as it will run (forward, or forward and backward), interleaved and repeated,
and declare a config over the default only when it wins beyond the timing noise.

    from autotune import tune
    result = tune(gla, {"K": 64, "V": 64}, batch=4, length=2048, heads=8, dtype=torch.bfloat16,
                  form="chunked", backend="triton", trials=40, device="cuda", mode="fwdbwd")
    print(result.table())            # one row per timed config, fastest first, with its spread
    result.chosen                    # the declared config, or None when the default was kept
    result.reason                    # why, in words

How a search runs:

1. The config space of (form, backend) is pruned by the exact rules of `autotune.space` (redundant chunk sizes and
   scan blocks, padding lanes, the delta rule's whole-column state, idle warps) before anything is timed. On the
   Triton backend each config is then compiled for the GPU target it is tuned for (`target`: the CUDA device's, sm_90
   on a CPU) without running it, just before it would be timed (`autotune.figures`, cached on disk per kernel
   source, config, dtype, shape, target and toolchain): a config whose kernels spill registers or need more
   shared memory than the target has is dropped untimed (a "pruned" trial with the compiler's reason), and every
   timed config carries its registers and spills into the table. Without ptxas / cuobjdump (or compiler=False)
   the hand-kept shared-memory and register estimate of `autotune.space` prunes instead, and a note says so.
2. Candidates. When the pruned space has at most `trials` configs (the torch chunk sizes: five), every one is
   a candidate. Otherwise optuna's TPE sampler (fixed seed) screens `trials` distinct configs, each timed on
   its own (`warmup` + `repeat` runs, median), proposing them as ONE categorical parameter whose choices are
   the kept configs' keys (so a pruned config is never proposed); the untuned default is enqueued first; a
   config proposed again is answered from its first timing and the next untimed config (seeded order) is
   enqueued. The `finalists` fastest screened configs and the default are the candidates.
3. The final timing is interleaved: after `warmup` untimed runs of each candidate (the first run's outputs
   are checked against the torch form in float32, `||x - ref|| / ||ref||` within a dtype tolerance, so a fast
   but wrong config cannot win), `repeat` rounds each run every candidate once, in an order rotated by one per
   round, so drifting machine load touches every candidate alike. Each candidate's value is the median of its
   rounds and its spread the interquartile range (IQR) of them.
4. What is timed is `mode`: "fwd" runs the forward under `torch.no_grad()` (what inference runs), "fwdbwd"
   runs the forward with inputs and params requiring grad and a backward of the sum of the outputs (what a
   training step runs). A call looks up the choice of its own mode (codegen/tuning.py: fwdbwd when grad mode
   is on and an input or param requires grad).
5. The winner rule: the fastest candidate replaces the default only when its median is below the default's
   by more than MIN_GAIN (5%) of the default's median AND by more than half the sum of the two IQRs. Otherwise
   the default is kept and the result says so (`chosen` None, `reason`). When the default itself failed or
   was pruned, the fastest candidate is chosen.
6. Every trial (screening and final, with median, IQR or error) and the choice ("tuned" or "default kept")
   are written in one transaction at the end (`TuningStore.save_study`). A store another process holds
   locked is waited for (`lock_wait_s`, with `on_lock_wait` called as the wait goes on); after that the study
   goes to a side file and `StoreLocked` names it, so no measured trial is lost.

A failure of one config (Triton's OutOfResources, a CUDA out-of-memory, a wrong result, ...) is recorded with
its message and never stops the search. Triton kernels on a CPU run in Triton's interpreter (TRITON_INTERPRET=1
set before triton is imported): stored under the device "cpu-interpreter", never looked up. The CPU thread
settings (`autotune.threads`) are recorded with every trial, and `warnings` says when they make the timings
unreliable.
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
from .space import (
    SPACES,
    Problem,
    Space,
    check_config,
    config_key,
    config_space,
    device_limits,
    parse_config_key,
    raw_configs,
    tunable,
)
from .store import LOCK_WAIT_S, StoreLocked, TuningStore, dtype_name, library_versions, open_store, shape_bucket
from .threads import thread_settings, timing_warnings

# Relative error allowed against the float32 torch form, by input dtype (half inputs use tf32 dots).
TOLERANCE = {torch.float64: 1e-6, torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}
MAX_ERROR_CHARS = 2000
MODES = ("fwd", "fwdbwd")
MIN_GAIN = 0.05  # a winner is at least this fraction of the default's median faster (and beyond the IQRs)


class NoLegalConfig(ValueError):
    """The constraint model pruned every config of the space."""


@dataclass
class TrialResult:
    number: int  # the order in which it was first timed (0 = first)
    config: dict
    median_ms: float | None
    error: str | None
    times_ms: list[float] = field(default_factory=list)
    rel_error: float | None = None
    iqr_ms: float | None = None  # the interquartile range of times_ms: the trial's spread
    final: bool = False  # timed in the interleaved final (else only screened)
    figures: dict | None = None  # the compiler's figures for the target (autotune.figures.ConfigFigures.as_dict)
    pruned: bool = False  # dropped untimed because the compiler reported a spill or too much shared memory

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
    mode: str = "fwd"
    chosen: dict | None = None  # the declared config; None: the default was kept
    reason: str = ""
    threads: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    compiler: dict = field(default_factory=dict)  # target, what pruned (compiler or estimate), compiled, cached
    # The choice stored for this key and mode before this run (`TuningStore.choice_details`): `replaced` when this
    # run's choice took its place, `kept_earlier` when it stayed because this run timed fewer configs than its
    # study did (the replacement rule, `tune(replace=)`); both None when there was none.
    replaced: dict | None = None
    kept_earlier: dict | None = None

    @property
    def key(self) -> tuple[str, str, str, str, str, str]:
        """(spec_hash, device, dtype, bucket, form, backend): the store's key, as `TuningStore.best` takes it."""
        return (self.spec_hash, self.device, self.dtype, self.bucket, self.form, self.backend)

    @property
    def best_trial(self) -> TrialResult | None:
        """The fastest final (else screened) trial by median: not necessarily the choice (see `chosen`)."""
        ok = [t for t in self.trials if t.ok]
        final = [t for t in ok if t.final] or ok
        return min(final, key=lambda t: (t.median_ms, t.number)) if final else None

    @property
    def best(self) -> dict | None:
        """The config calls of this key will run: the chosen one, else the default (None: every trial failed)."""
        if self.chosen is not None:
            return dict(self.chosen)
        return dict(self.space.default) if self.best_trial is not None else None

    @property
    def best_ms(self) -> float | None:
        best = self.best_trial
        return best.median_ms if best else None

    @property
    def default_ms(self) -> float | None:
        key = config_key(self.space.default)
        found = [t for t in self.trials if config_key(t.config) == key and t.ok]
        return found[0].median_ms if found else None

    def table(self, warnings: bool = True) -> str:
        """One line per timed config, fastest first, failures last, with its spread and the speed-up over the
        slowest, then the decision. warnings=False leaves out the `warning:` lines (`recdsl tune` prints those
        on stderr, once per run)."""
        rows = sorted(self.trials, key=lambda t: (not t.ok, t.pruned, not t.final, t.median_ms or math.inf, t.number))
        slowest = max((t.median_ms for t in self.trials if t.ok), default=None)
        default = config_key(self.space.default)
        chosen = config_key(self.chosen) if self.chosen is not None else None
        # The bucket is the store's key: B*H and T rounded, so the choice also serves calls of nearby shapes.
        lines = [f"{self.form}/{self.backend}  shapes {self.bucket} (the store's bucket: B*H and T rounded)  "
                 f"{self.dtype}  mode {self.mode}  on {self.device}",
                 f"{self.space.summary()}; {len(self.trials)} timed in {self.elapsed_s:.1f} s; study {self.study}"]
        if self.threads:
            t = self.threads
            lines.append(f"threads: torch {t['torch_threads']}, OMP_NUM_THREADS={t.get('OMP_NUM_THREADS')}, "
                         f"OMP_WAIT_POLICY={t.get('OMP_WAIT_POLICY')}, load {t.get('load_average_1m')} on "
                         f"{t['cpu_count']} cores")
        lines += [f"note: {n}" for n in self.space.notes]
        if self.compiler.get("source") == "compiler":
            lines.append(f"compiler: {self.compiler['compiled']} configs compiled for {self.compiler['target']}, "
                         f"{self.compiler['cached']} read from the cache; regs and spill B are the worst kernel's")
        lines += [f"warning: {w}" for w in self.warnings] if warnings else []
        width = max([len(config_key(t.config)) for t in rows] + [6])
        lines.append(f"  {'#':>3}  {'config':<{width}}  {'median ms':>10}  {'IQR ms':>8}  {'runs':>4}  "
                     f"{'vs slowest':>10}  {'regs':>4}  {'spill B':>7}")
        for t in rows:
            key = config_key(t.config)
            mark = (" (default)" if key == default else "") + (" (chosen)" if key == chosen else "") + \
                ("" if t.final or t.pruned else " (screened only)")
            regs, spill = (f"{t.figures['registers']:>4}", f"{t.figures['spill_bytes']:>7}") if t.figures \
                else (f"{'-':>4}", f"{'-':>7}")
            if t.ok:
                speed = f"{slowest / t.median_ms:9.2f}x" if t.median_ms > 0 else "-"
                iqr = f"{t.iqr_ms:8.4f}" if t.iqr_ms is not None else f"{'-':>8}"
                lines.append(f"  {t.number:>3}  {key:<{width}}  {t.median_ms:>10.4f}  {iqr}  {len(t.times_ms):>4}  "
                             f"{speed:>10}  {regs}  {spill}{mark}")
            else:
                status = "pruned" if t.pruned else "failed"
                lines.append(f"  {t.number:>3}  {key:<{width}}  {status:>10}  {'':>8}  {'':>4}  {'':>10}  {regs}  "
                             f"{spill}{mark}  {t.error}")
        if self.chosen is not None:
            lines.append(f"chosen: {chosen}: {self.reason}")
        elif self.best_trial is not None:
            lines.append(f"default kept: {default}: {self.reason}")
        else:
            lines.append("best: none (every trial failed)")
        if self.kept_earlier is not None:
            lines.append(f"not stored: the store keeps its earlier choice, {describe_choice(self.kept_earlier)}: "
                         f"this run timed {self.timed} config{'s' * (self.timed != 1)}, fewer than its "
                         f"{self.kept_earlier['timed']} (this run's trials are stored; --replace, or "
                         "tune(replace=True), stores its choice instead)")
        elif self.replaced is not None:
            lines.append(f"replaced the earlier stored choice {describe_choice(self.replaced)}")
        return "\n".join(lines)

    @property
    def timed(self) -> int:
        """The number of distinct configs this run timed that ran (what the replacement rule counts)."""
        return len({config_key(t.config) for t in self.trials if t.ok})

    def as_dict(self) -> dict:
        """The result as JSON-able data (recdsl tune --json)."""
        return {"spec_hash": self.spec_hash, "device": self.device, "dtype": self.dtype, "bucket": self.bucket,
                "form": self.form, "backend": self.backend, "mode": self.mode, "study": self.study,
                "default": self.space.default, "chosen": self.chosen, "reason": self.reason,
                "elapsed_s": self.elapsed_s, "threads": self.threads, "warnings": self.warnings,
                "compiler": self.compiler, "replaced": self.replaced, "kept_earlier": self.kept_earlier,
                "trials": [{"number": t.number, "config": t.config, "median_ms": t.median_ms, "iqr_ms": t.iqr_ms,
                            "times_ms": t.times_ms, "error": t.error, "rel_error": t.rel_error, "final": t.final,
                            "pruned": t.pruned, "figures": t.figures}
                           for t in self.trials]}


# -- timing ---------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn, device: torch.device) -> float:
    """Milliseconds of one run of `fn` (CUDA: synchronized before and after; CPU: perf_counter)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


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


def spread(times: list[float]) -> float:
    """The interquartile range of `times` (0 for fewer than two)."""
    if len(times) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return q3 - q1


def describe_choice(choice: dict) -> str:
    """A stored choice (`TuningStore.choice_details`) in words: `chunk_size=16 (tuned, 3.1000 ms, 5 configs timed,
    2026-12-04T10:00:00.000Z, study abc)`."""
    facts = ["tuned" if choice.get("tuned") else "default kept"]
    if choice.get("median_ms") is not None:
        facts.append(f"{choice['median_ms']:.4f} ms")
    if choice.get("timed") is not None:
        facts.append(f"{choice['timed']} config{'s' * (choice['timed'] != 1)} timed")
    facts += [v for v in (choice.get("created"), choice.get("study") and f"study {choice['study']}") if v]
    return f"{config_key(choice['config'])} ({', '.join(facts)})"


def decide(default: TrialResult | None, fastest: TrialResult | None, timed: int = 2,
           candidates: int | None = None) -> tuple[bool, str]:
    """(whether `fastest` replaces the default, why in words): the winner rule of the module docstring. timed: the
    number of configs of the final that ran; candidates: of those it tried (timed when not given). When only the
    default ran there is nothing it was compared with, and the reason says so."""
    if fastest is None:
        return False, "every trial failed"
    if timed == 1 and default is not None and default.ok:
        alone = ("only the default was timed" if (candidates or timed) == 1 else
                 "only the default ran (the other candidates failed or were pruned)")
        return False, (f"{alone} ({default.median_ms:.4f} ms, IQR {default.iqr_ms or 0:.4f}): nothing to compare "
                       "it with (more --trials time other configs)")
    if default is None or not default.ok:
        why = ("was not timed (pruned)" if default is None else
               "was pruned by the compiler" if default.pruned else "failed")
        return True, f"the default {why}; the fastest config ran in {fastest.median_ms:.4f} ms"
    if config_key(fastest.config) == config_key(default.config):
        return False, f"the default is the fastest ({default.median_ms:.4f} ms, IQR {default.iqr_ms or 0:.4f})"
    gain = default.median_ms - fastest.median_ms
    noise = ((default.iqr_ms or 0.0) + (fastest.iqr_ms or 0.0)) / 2
    floor = MIN_GAIN * default.median_ms
    percent = 100 * gain / default.median_ms if default.median_ms > 0 else 0.0
    facts = (f"{fastest.median_ms:.4f} ms against the default's {default.median_ms:.4f} ms ({percent:.1f}% faster; "
             f"noise, half the two IQRs, {noise:.4f} ms; floor {100 * MIN_GAIN:g}% = {floor:.4f} ms)")
    if gain > noise and gain > floor:
        return True, f"beats the default beyond the noise: {facts}"
    return False, f"the fastest, {config_key(fastest.config)}, is not faster beyond the noise: {facts}"


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


def _step(layer, backend: str, form: str, config: dict, args: list, mode: str):
    """One timed unit of `mode`: the forward under no_grad (fwd), or forward and the backward of the outputs'
    sum (fwdbwd: `args` are leaves that require grad; their grads are dropped first so nothing accumulates)."""
    if mode == "fwd":
        with torch.no_grad():
            return run_config(layer, backend, form, config, *args)
    for a in args:
        a.grad = None
    out = run_config(layer, backend, form, config, *args)
    loss = [t.float().sum() for t in _tensors(out) if t.requires_grad]
    if not loss:
        raise RuntimeError("fwdbwd: the outputs do not require grad, so there is no backward to time")
    torch.stack(loss).sum().backward()
    return out


# -- the search -------------------------------------------------------------------------------------------------


def _compiler_figures(analysis, sizes, batch, length, heads, dtype, form, target, device, mode, compiler):
    """(a `figures.CompilerFigures` or None, what prunes: {"source", "target", "note", ...}) for a Triton tune."""
    from .figures import CompilerFigures, target_for_device

    estimate = "pruned by the hand-kept shared-memory and register estimate of autotune/space.py instead"
    if compiler is False:
        return None, {"source": "estimate", "note": f"compiler=False: {estimate}"}
    name = target or target_for_device(device)
    if name is None:
        cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
        why = f"no compile-only target for compute capability {cap} (pass target=)"
        if compiler:
            raise ValueError(why)
        return None, {"source": "estimate", "note": f"{why}: {estimate}"}
    figures = CompilerFigures(analysis, sizes, batch, length, heads, dtype, form, name, backward=mode == "fwdbwd")
    if not figures.available:
        if compiler:
            raise ValueError(f"compiler=True: {figures.why}")
        return None, {"source": "estimate", "target": name, "note": f"{figures.why}: {estimate}"}
    return figures, {"source": "compiler", "target": name, "compiled": 0, "cached": 0,
                     "note": f"each config is compiled for {name} before it is timed and dropped when a kernel "
                             "spills or needs more shared memory than the target has (the hand estimate is unused)"}



def tune(rec, sizes: dict[str, int], batch: int, length: int, heads: int, dtype: torch.dtype = torch.float32,
         form: str = "chunked", backend: str = "torch", trials: int = 20, store=None, device=None, *,
         warmup: int = 2, repeat: int = 5, seed: int = 0, limits=None, check: bool = True,
         verbose: bool = False, mode: str = "fwdbwd", finalists: int = 3, progress=None,
         lock_wait_s: float = LOCK_WAIT_S, on_lock_wait=None, target: str | None = None,
         compiler: bool | None = None, candidates: list[dict] | None = None, replace: bool = False) -> TuneResult:
    """Tune `rec`'s `form` on `backend` for inputs [batch, length, heads, ...] of `dtype` with spec `sizes`.

    rec: a `Recurrence` (or `CheckedRecurrence`); store: a `TuningStore`, a path (in a folder that exists), or None
    (the rule's store, `autotune.store.default_path`, created with its folders); device: "cpu", "cuda", a
    torch.device (default: cuda when available); limits: `space.DeviceLimits` to override the device's; mode:
    "fwdbwd" (what training runs, the default) or "fwd" (inference); finalists: screened configs re-timed against
    the default in the interleaved final; progress: `progress(done, total, label)` after each timed unit;
    lock_wait_s / on_lock_wait: see `TuningStore.save_study`; target: the GPU target the Triton backend's configs
    are compiled for to read their registers, spills and shared memory (sm_80, sm_90, sm_100; default: the CUDA
    device's, sm_90 on a CPU); compiler: None uses those figures when ptxas and cuobjdump are found (else the hand
    estimate, with a note), True requires them (ValueError without), False always uses the estimate; candidates:
    time only these configs (and the default), each still pruned by the rules and the compiler; replace: store this
    run's choice even when it timed fewer configs than the study of the choice stored for the key and mode (by
    default that earlier choice is kept, and the result's `kept_earlier` says so; `replaced` names a choice this
    run's took the place of). Returns a
    `TuneResult`; raises `NoLegalConfig` when the constraint model leaves nothing to time, ValueError for a bad
    request, `store.StoreError` for a store that cannot be written (before timing anything) and `store.StoreLocked`
    (naming the side file holding the trials) when it stays locked.
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
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if backend == "triton" and device.type == "cpu" and not interpreting():
        raise ValueError("Triton kernels on a CPU need Triton's interpreter: set TRITON_INTERPRET=1 before "
                         "triton is imported (its timings are stored as device 'cpu-interpreter')")
    if backend == "triton" and dtype == torch.float64:
        raise ValueError("dtype float64: the triton backend takes float32, float16 or bfloat16 (float64 tunes on "
                         "the torch backend)")
    if not tunable(form, backend):
        choices = ", ".join(f"{f}/{b}" for f, b in SPACES)
        raise ValueError(f"nothing to tune for form={form!r}, backend={backend!r}; tunable: {choices}")
    if trials < 1:
        raise ValueError(f"trials must be at least 1, got {trials}")
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    if warmup < 0:
        raise ValueError(f"warmup must be at least 0, got {warmup}")
    missing = set(checked.sizes) - set(sizes)
    if missing:
        raise ValueError(f"sizes: {checked.name} needs {', '.join(sorted(missing))}")
    sizes = {s: int(sizes[s]) for s in checked.sizes}

    analysis = analyse(checked)
    if form not in analysis.forms:
        raise ValueError(f"{checked.name} has no '{form}' form: {analysis.unavailable.get(form, 'unknown form')}")
    layer = load_layer(analysis).options(tuning=False)  # every trial runs exactly its config
    if backend == "triton" and layer.triton_forms is None:
        from codegen.load import triton_import_error

        raise ValueError(f"backend triton: triton is not importable here ({triton_import_error()}), so "
                         f"{checked.name} has no Triton forms: pip install triton, or tune the torch backend")
    if backend == "triton" and form not in (layer.triton_forms or {}):
        raise ValueError(f"{checked.name} has no '{form}' form on the triton backend; it has "
                         f"{', '.join(layer.triton_forms or {}) or 'none (triton does not import)'}")
    problem = Problem.from_analysis(analysis, sizes, length, dtype, heads)
    figures, compiler_info = (None, {"source": "none"}) if backend != "triton" else _compiler_figures(
        analysis, sizes, batch, length, heads, dtype, form, target, device, mode, compiler)
    space = config_space(form, backend, problem, limits if limits is not None else device_limits(device),
                         estimate=figures is None)
    if compiler_info.get("note"):
        space.notes.append(compiler_info["note"])
    if candidates is not None:
        raw = {config_key(c) for c in raw_configs(form, backend)}
        for c in candidates:
            if not isinstance(c, dict) or config_key(c) not in raw:
                raise ValueError(f"candidates: {c!r} is not a {form}/{backend} config "
                                 f"({check_config(c, form, backend, problem) if isinstance(c, dict) else 'a dict'})")
        wanted = {config_key(c) for c in candidates} | {config_key(space.default)}
        space.notes.append(f"restricted to {len(candidates)} given candidates and the default")
        space.configs = [c for c in space.configs if config_key(c) in wanted]
    if not space.configs:
        if figures is not None:
            figures.close()
        reasons = sorted({p.reason for p in space.pruned})[:5]
        raise NoLegalConfig(f"no {form}/{backend} config fits {checked.name} with sizes {sizes}, T={length} on "
                            f"{space.limits.name}; e.g. " + " | ".join(reasons))

    try:
        store = open_store(store)
        store.check_writable()  # a bad store fails here, before minutes of timing
    except BaseException:
        if figures is not None:
            figures.close()
        raise
    spec_hash = spec_hash_of(rec)
    dev_name = device_name(device, backend)
    dname = dtype_name(dtype)
    bucket = shape_bucket(batch, heads, length, sizes)
    study_id = uuid.uuid4().hex[:12]
    threads = thread_settings()
    notes = timing_warnings(threads) if device.type == "cpu" else []

    args, _ = sample_arguments(checked, sizes, batch, length, heads, dtype=dtype, seed=seed)
    args = [a.to(device) for a in args]
    if mode == "fwdbwd":
        args = [a.detach().requires_grad_(a.is_floating_point()) for a in args]
    reference = None
    if check:
        ref_layer = layer.options(backend="torch")
        with torch.no_grad():
            ref_args = [a.detach().float() if a.dtype != torch.float64 else a.detach() for a in args]
            reference = run_config(ref_layer, "torch", form, {"chunk_size": 64}, *ref_args) if form == "chunked" \
                else ref_layer(*ref_args, form=form)
    tolerance = TOLERANCE.get(dtype, 5e-2)

    keys = space.keys()
    budget = min(trials, len(keys))
    exhaustive = budget == len(keys)
    n_final = len(keys) if exhaustive else min(finalists, budget) + 1
    total = (0 if exhaustive else budget) + n_final * (1 + repeat)
    done_units = [0]

    def tick(label: str, count: int = 1) -> None:
        done_units[0] += count
        if progress is not None:
            progress(done_units[0], total, label)

    def call(config: dict):
        return _step(layer, backend, form, config, args, mode)

    def checked_first(config: dict) -> float | None:
        """Run `config` once and check its outputs; the relative error (None without a check)."""
        first = call(config)
        rel = relative_error(first, reference) if reference is not None else None
        if rel is not None and not rel <= tolerance:
            raise ArithmeticError(f"wrong result: relative error {rel:.3g} > {tolerance:g} against the "
                                  f"torch {form} form")
        return rel

    def failed(number: int, config: dict, err: BaseException) -> TrialResult:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return TrialResult(number, config, None, _message(err))

    def say(result: TrialResult, stage: str) -> None:
        if verbose:
            shown = f"{result.median_ms:.4f} ms (IQR {result.iqr_ms or 0:.4f})" if result.ok else result.error
            print(f"[tune {stage} {result.number}] {config_key(result.config)}: {shown}", flush=True)

    def compiled(number: int, config: dict) -> TrialResult | None:
        """The compiler's verdict on `config` before it is timed: a pruned trial, or None (time it)."""
        if figures is None:
            return None
        key = config_key(config)
        if key not in seen_figures:
            try:
                seen_figures[key] = figures.get(config)
            except Exception as err:  # noqa: BLE001 - no figures: time the config as the estimate let it through
                compiler_info.setdefault("errors", []).append(f"{key}: {_message(err)}")
                return None
        f = seen_figures[key]
        problems = f.problems()
        if not problems:
            return None
        result = TrialResult(number, config, None, f"pruned by the compiler ({f.target}): " + "; ".join(problems),
                             figures=f.as_dict(), pruned=True)
        say(result, "compile")
        return result

    def with_figures(result: TrialResult) -> TrialResult:
        f = seen_figures.get(config_key(result.config))
        if f is not None:
            result.figures = f.as_dict()
        return result

    def screen(number: int, config: dict) -> TrialResult:
        pruned = compiled(number, config)
        if pruned is not None:
            return pruned
        try:
            rel = checked_first(config)
            times, _ = measure(lambda: call(config), device, max(warmup - 1, 0), repeat)
            result = TrialResult(number, config, float(statistics.median(times)), None, times, rel, spread(times))
        except Exception as err:  # noqa: BLE001 - any failure of one config is that trial's result
            result = failed(number, config, err)
        tick(f"screen {config_key(config)}")
        say(result, "screen")
        return with_figures(result)

    old_verbosity = optuna.logging.get_verbosity()
    if not verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    done: dict[str, TrialResult] = {}
    seen_figures: dict = {}
    default = config_key(space.default)
    try:
        if exhaustive:
            candidates = ([default] if default in keys else []) + [k for k in keys if k != default]
        else:
            fill = keys[:]
            random.Random(seed).shuffle(fill)
            sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, min(10, budget // 3)))
            study = optuna.create_study(direction="minimize", sampler=sampler, study_name=f"recdsl-{study_id}")
            distributions = {"config": CategoricalDistribution(keys)}
            if default in keys:
                study.enqueue_trial({"config": default})
            asks = 0
            # configs the compiler prunes are not timed, so they do not use up the budget (the asks bound it)
            while (sum(not t.pruned for t in done.values()) < budget and asks < 4 * budget + 16
                   and len(done) < len(keys)):
                asks += 1
                trial = study.ask(distributions)
                key = trial.params["config"]
                if key not in done:
                    done[key] = screen(len(done), parse_config_key(key))
                else:  # proposed again: answer from the first timing and steer to an untimed config
                    study.enqueue_trial({"config": next(k for k in fill if k not in done)})
                if done[key].pruned and len(done) < len(keys):
                    study.enqueue_trial({"config": next(k for k in fill if k not in done)})
                result = done[key]
                if result.ok:
                    study.tell(trial, result.median_ms)
                else:
                    study.tell(trial, state=TrialState.PRUNED)
            ranked = sorted((t for t in done.values() if t.ok), key=lambda t: (t.median_ms, t.number))
            candidates = ([default] if default in keys else []) + \
                [config_key(t.config) for t in ranked if config_key(t.config) != default][:finalists]
        # the interleaved final: warm up (and check) every candidate, then rounds in rotated order
        final: dict[str, TrialResult] = {}
        for key in candidates:
            number = done[key].number if key in done else len(done) + len(final)
            config = parse_config_key(key)
            pruned = compiled(number, config)
            if pruned is not None:
                final[key] = pruned
                tick(f"pruned {key}", 1 + repeat)
                continue
            try:
                rel = checked_first(config)
                for _ in range(max(warmup - 1, 0)):
                    call(config)
                final[key] = TrialResult(number, config, None, None, [], rel, final=True)
            except Exception as err:  # noqa: BLE001
                final[key] = failed(number, config, err)
                final[key].final = True
                tick(f"failed {key}", repeat)
            tick(f"warm up {key}")
        running = [k for k in candidates if final[k].error is None]
        for key in running:
            with_figures(final[key])
        for r in range(repeat):
            order = running[r % len(running):] + running[:r % len(running)] if running else []
            for key in order:
                if final[key].error is not None:
                    tick(f"round {r + 1}/{repeat}")
                    continue
                try:
                    final[key].times_ms.append(time_once(lambda key=key: call(final[key].config), device))
                except Exception as err:  # noqa: BLE001
                    final[key] = failed(final[key].number, final[key].config, err)
                    final[key].final = True
                tick(f"round {r + 1}/{repeat} {key}")
        for t in final.values():
            if t.error is None:
                t.median_ms = float(statistics.median(t.times_ms))
                t.iqr_ms = spread(t.times_ms)
            t.times_ms = list(t.times_ms) if t.error is None else []
            say(t, "final")
        done.update(final)
    finally:
        optuna.logging.set_verbosity(old_verbosity)
        if figures is not None:
            compiler_info.update(compiled=figures.compiled, cached=figures.cached)
            figures.close()
    ok_final = [t for t in final.values() if t.ok]
    fastest = min(ok_final, key=lambda t: (t.median_ms, t.number)) if ok_final else None
    wins, reason = decide(final.get(default), fastest, len(ok_final), len(final))
    chosen = dict(fastest.config) if wins else None
    ordered = sorted(done.values(), key=lambda t: t.number)
    result = TuneResult(spec_hash, dev_name, dname, bucket, form, backend, study_id, space, ordered,
                        time.perf_counter() - started, mode, chosen, reason, threads, notes, compiler_info)
    versions = {**library_versions(), "threads": threads}
    rows = [dict(spec_hash=spec_hash, device=dev_name, dtype=dname, bucket=bucket, form=form, backend=backend,
                 config=t.config, median_ms=t.median_ms, error=t.error, study=study_id, versions=versions,
                 mode=mode, iqr_ms=t.iqr_ms) for t in ordered]
    choice = None
    if fastest is not None:
        choice = dict(spec_hash=spec_hash, device=dev_name, dtype=dname, bucket=bucket, form=form, backend=backend,
                      mode=mode, config=chosen if chosen is not None else dict(space.default),
                      tuned=chosen is not None, reason=reason, study=study_id)
    try:  # (the replacement rule is applied in the store's transaction: `TuningStore.save_study`)
        outcome = store.save_study(rows, choice, wait_s=lock_wait_s, on_wait=on_lock_wait, replace=replace)
        if outcome is not None:
            if outcome["replaced"]:
                result.replaced = outcome["earlier"]
            else:
                result.kept_earlier = outcome["earlier"]
    except StoreLocked as err:
        err.result = result  # the caller can still show what was measured
        raise
    finally:
        clear_cache()
    return result


__all__ = ["INTERPRETER", "MIN_GAIN", "MODES", "NoLegalConfig", "TrialResult", "TuneResult", "TuningStore", "decide",
           "describe_choice",
           "measure", "relative_error", "spread", "tune"]
