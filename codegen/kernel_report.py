"""Compile every Triton kernel a call launches for a GPU target, without a GPU, and read what it costs.

    with compile_only("sm_90") as launches:
        layer_or_kernel(...)                 # CPU tensors; every kernel is compiled for sm_90, none runs
    for k in launches.kernels():             # one KernelReport per compiled kernel and grid, in launch order
        print(k.name, k.grid, k.registers, k.spill_bytes, k.shared_bytes, k.problems())

    report_recurrence(rec, {"K": 64, "V": 64}, 2, 256, 4, dtype=torch.bfloat16, target="sm_90", form="chunked")

`recdsl kernels` prints these reports; the tests and the tuner call the functions.

How a call compiles without a GPU. Triton's JIT asks its *active driver* for the target (`get_current_target`),
the device (the key of each kernel's cache) and the stream; it compiles a kernel the first time a
specialisation is launched (the Triton frontend, then `ptxas` from the triton wheel: nothing on the way needs a
GPU), and then hands the binary to the driver (`utils.load_binary`) and launches it through the driver's
launcher class. `compile_only(target)` makes a stand-in driver (`_CompileOnlyDriver`) the active one for the
duration of a `with` block and puts the previous one back after it:

- `get_current_target()` is `GPUTarget("cuda", arch, 32)`, so every kernel compiles exactly as Triton compiles
  it for that GPU (same frontend, same passes, same ptxas and flags);
- `get_current_device()` is a key of its own per block (`"compile-only:sm_90:3"`), so kernels compiled for one
  target or one block never answer a launch in another (the JIT caches compiled kernels per device key);
- `utils.load_binary` returns no module (so nothing is ever unloaded) and `launcher_cls` records the launch
  (kernel, grid) and runs nothing. `utils.get_device_properties` reports unbounded shared memory, so Triton
  does not stop the call at a kernel that would not fit; `KernelReport.problems` checks it against `TARGETS`.

Nothing of Triton is patched: `JITFunction.run` takes its usual path (binding, specialisation, cache, compile,
launch) and only the driver it talks to is a stand-in; the listener and hook used below are Triton's knobs
(`knobs.compilation.listener`, `knobs.runtime.jit_cache_hook`), set inside the knobs' own `scope()`.

Tensors stay on the CPU: Triton's JIT reads only a tensor's `data_ptr()` (for the 16-byte alignment it
specialises on) and dtype, and the host-side torch code of the forms (torch.empty, cumulative sums, the
`_check_steps` sync) runs on the CPU as it would on the GPU. Outputs are never written (the kernels do not run),
so a report's call returns uninitialised tensors; only the launches are the result.

Each block compiles every kernel afresh (`always_compile`), so `compile_seconds` is the compiler's wall time
(Triton's own `CompileTimes`), not a read from Triton's on-disk cache; `compile_only(target, cached=True)` lets
Triton answer from that cache instead (same binaries: the cache key holds the source, target and options), so a
sweep that meets a kernel again, or runs again after a change to a few kernels, compiles only what changed; such
a row has `cached` set and the lookup's seconds. Registers and local memory come from
`cuobjdump --dump-resource-usage` on the kernel's cubin (cuobjdump ships in the triton wheel next to ptxas):
`registers` is REG, `spill_bytes` is STACK + LOCAL, the local memory each thread uses, which for Triton kernels
(no calls, no local arrays) is where ptxas spills registers. On a GPU, Triton's `CompiledKernel.n_spills` is
the driver's CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES divided by 4 (triton/backends/nvidia/driver.c), so it
compares with spill_bytes / 4. `shared_bytes` is the compiled kernel's metadata.shared: the dynamic shared memory
Triton asks for at launch and checks against the device's opt-in maximum.

Triton's interpreter (TRITON_INTERPRET=1 set before the kernels were imported) runs kernels instead of
compiling them, so a process where it is on cannot make a report (`InterpreterOn`); run in a fresh process.
The stand-in driver is process-wide while a block runs: do not launch real kernels from another thread then.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import re
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

# The most dynamic shared memory one block may use (the opt-in maximum, cudaDevAttrMaxSharedMemoryPerBlockOptin,
# which Triton reads as `max_shared_mem` and checks every kernel against before it launches). Source: the CUDA C++
# Programming Guide, "Technical Specifications per Compute Capability": "Maximum amount of shared memory per thread
# block" 163 KB for 8.0, 227 KB for 9.0 and 10.0 (KB = 1024 bytes). sm_100 is sm_90's for this purpose.
# Registers: 255 per thread at most on all three (a kernel that needs more spills).


@dataclass(frozen=True)
class Target:
    """A GPU target: its name (`sm_90`), compute capability as Triton writes it (90) and shared-memory limit."""

    name: str
    arch: int
    max_shared_bytes: int
    gpus: str


TARGETS = {
    "sm_80": Target("sm_80", 80, 163 * 1024, "A100"),  # 166912 bytes
    "sm_90": Target("sm_90", 90, 227 * 1024, "H100, H200"),  # 232448 bytes
    "sm_100": Target("sm_100", 100, 227 * 1024, "B200"),  # 232448 bytes
}
MAX_REGISTERS = 255
# The most blocks along each grid axis (x, y, z; Triton's program_id 0, 1, 2) on every target here: the CUDA C++
# Programming Guide, "Technical Specifications per Compute Capability" (2^31 - 1 for x, 65535 for y and z). A
# launch past them fails on the GPU ("invalid argument") where the compile-only driver records it.
MAX_GRID = (2**31 - 1, 65535, 65535)

# cuobjdump on one cubin and `ptxas --version` answer in well under a second; past this a tool is taken as hung.
TOOL_TIMEOUT_S = 120.0
DEFAULT_SHAPE = {"B": 2, "T": 256, "H": 4}  # the call `recdsl kernels` compiles when --shape does not say
DEFAULT_DIM = 64  # every spec size (K, V, ...) not given


class KernelReportError(Exception):
    """A report cannot be made (the message says why and what to do); never a kernel's own problem."""


class ToolMissing(KernelReportError):
    """triton, or the ptxas / cuobjdump it ships, is not installed."""


class InterpreterOn(KernelReportError):
    """Triton's interpreter is on in this process, so kernels run instead of compiling."""


class CompileFailed(KernelReportError):
    """A kernel did not compile for the target (Triton's or ptxas's message, with the kernel's name)."""


@dataclass(frozen=True)
class KernelReport:
    """One compiled kernel launched with one grid (a kernel launched again with the same grid counts in
    `launches`). registers: per thread; spill_bytes: local memory per thread (STACK + LOCAL); shared_bytes: dynamic
    shared memory per block; compile_seconds: the compile of this binary (shared by its rows)."""

    name: str
    grid: tuple[int, int, int]
    num_warps: int
    num_stages: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    compile_seconds: float
    target: str
    launches: int = 1
    phase: str = "forward"
    cached: bool = False
    signature: dict = field(default_factory=dict, compare=False, repr=False)

    def problems(self) -> list[str]:
        """What would go wrong on the target: register spills, too much shared memory, a grid past `MAX_GRID`."""
        out = []
        for axis, (n, limit) in enumerate(zip(self.grid, MAX_GRID)):
            if n > limit:
                out.append(f"{self.name} launches {n} programs along grid axis {axis}; CUDA allows {limit}")
        if self.spill_bytes > 0:
            out.append(f"{self.name} spills: {self.spill_bytes} bytes of local memory per thread "
                       f"({self.registers} registers)")
        limit = TARGETS[self.target].max_shared_bytes
        if self.shared_bytes > limit:
            out.append(f"{self.name} needs {self.shared_bytes} bytes of shared memory per block; "
                       f"{self.target} allows {limit}")
        return out

    def as_dict(self) -> dict:
        return {"name": self.name, "grid": list(self.grid), "num_warps": self.num_warps, "num_stages": self.num_stages,
                "registers": self.registers, "spill_bytes": self.spill_bytes, "shared_bytes": self.shared_bytes,
                "compile_seconds": round(self.compile_seconds, 3), "target": self.target, "launches": self.launches,
                "phase": self.phase, **({"cached": True} if self.cached else {})}


def target_of(name: str) -> Target:
    """The `Target` called `name` (sm_80, sm_90, sm_100); ValueError naming the choices otherwise."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose from {', '.join(TARGETS)}")
    return TARGETS[name]


# -- the tools ------------------------------------------------------------------------------------------------


def find_tools(target: str | Target) -> dict[str, str]:
    """{"ptxas": path, "cuobjdump": path} for `target`, as Triton resolves them (the wheel's
    triton/backends/nvidia/bin, or $TRITON_PTXAS_PATH, $TRITON_PTXAS_BLACKWELL_PATH, $TRITON_CUOBJDUMP_PATH).
    Raises ToolMissing with what is missing and where it was looked for."""
    target = target if isinstance(target, Target) else target_of(target)
    try:
        import triton
        from triton import knobs
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as err:
        raise ToolMissing(f"triton with its NVIDIA backend is needed to compile kernels ({err}); "
                          "pip install 'recurrence-dsl[triton]'") from None
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    tools = {}
    for role, lookup, binary in (("ptxas", lambda: get_ptxas(target.arch),
                                  "ptxas" if target.arch < 90 else "ptxas-blackwell"),
                                 ("cuobjdump", lambda: knobs.nvidia.cuobjdump, "cuobjdump")):
        try:
            tools[role] = lookup().path
        except RuntimeError:
            env = f"TRITON_{binary.upper().replace('-', '_')}_PATH"
            raise ToolMissing(f"{binary} not found (needed for {target.name}): Triton looks for it in {bin_dir} "
                              f"and at ${env}; the Linux triton wheels ship it there") from None
    return tools


def tool_versions(target: str | Target = "sm_90") -> dict[str, str]:
    """The release of each tool (`ptxas` for the target, `cuobjdump`), for reports."""
    out = {}
    for role, path in find_tools(target).items():
        text = _run_tool([path, "--version"]).stdout
        found = re.search(r"release ([\d.]+), V([\d.]+)", text)
        out[role] = found.group(2) if found else "unknown"
    return out


def _run_tool(argv: list[str]) -> subprocess.CompletedProcess:
    """Run a CUDA tool (its text output captured), at most TOOL_TIMEOUT_S seconds. Raises KernelReportError naming
    the command when it does not answer in time or cannot start (a report never waits on a hung tool)."""
    shown = " ".join([Path(argv[0]).name, *argv[1:2]])
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise KernelReportError(f"{shown} ({argv[0]}) gave no answer within {TOOL_TIMEOUT_S:g} s; it was "
                                "stopped") from None
    except OSError as err:
        raise KernelReportError(f"{shown} ({argv[0]}) did not start: {err}") from None


_USAGE = re.compile(r"Function ([^:\s]+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def resource_usage(cubin: bytes, cuobjdump: str) -> dict[str, dict[str, int]]:
    """{function: {"registers", "stack", "static_shared", "local"}} of a cubin, from cuobjdump."""
    with tempfile.TemporaryDirectory(prefix="recdsl-kernels-") as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        done = _run_tool([cuobjdump, "--dump-resource-usage", str(path)])
    if done.returncode != 0:
        raise KernelReportError(f"cuobjdump --dump-resource-usage failed: {done.stderr.strip()[:400]}")
    return {m.group(1): {"registers": int(m.group(2)), "stack": int(m.group(3)), "static_shared": int(m.group(4)),
                         "local": int(m.group(5))} for m in _USAGE.finditer(done.stdout)}


# -- the stand-in driver --------------------------------------------------------------------------------------


def _driver_base():
    from triton.backends.driver import DriverBase

    return DriverBase


class _Utils:
    """The driver utilities Triton's JIT calls around a launch, none of which touches a GPU."""

    @staticmethod
    def load_binary(name, kernel, shared, device):
        # (module, function, n_regs, n_spills, n_max_threads): no module, so CompiledKernel.__del__ unloads nothing
        return None, None, 0, 0, 1024

    @staticmethod
    def get_device_properties(device):
        return {"max_shared_mem": 1 << 40, "multiprocessor_count": 1, "warpSize": 32}

    @staticmethod
    def unload_module(module):
        return None


class Launches:
    """What ran in a `compile_only` block: each launch (compiled kernel, grid, phase) and each compile's seconds
    by hash; `kernels()` turns them into KernelReports (inside the block or after it)."""

    def __init__(self, target: Target, device: str, tools: dict[str, str]):
        self.target, self.device, self.tools = target, device, tools
        self.records: list[tuple] = []
        self.compile_seconds: dict[str, float] = {}
        self.cache_hits: set[str] = set()
        self.compiling: str | None = None
        self.phase = "forward"
        self._kernels: dict[str, object] = {}  # hash -> CompiledKernel
        self._usage: dict[str, dict] = {}
        self._functions: dict[int, object] = {}

    def record(self, fn, metadata, grid) -> None:
        """A launch of `fn`'s compiled kernel (its metadata) with `grid`; called by the stand-in launcher."""
        hash_ = metadata.hash
        if hash_ not in self._kernels:
            self._functions[id(fn)] = fn
            found = [k for k in fn.device_caches[self.device][0].values()
                     if getattr(getattr(k, "metadata", None), "hash", None) == hash_]
            if not found:
                raise KernelReportError(f"the compiled kernel {hash_} of {fn} is not in its cache")
            self._kernels[hash_] = found[0]
        self.records.append((hash_, tuple(int(g) for g in grid), self.phase))

    def kernels(self, phase: str | None = None) -> list[KernelReport]:
        """One report per (compiled kernel, grid) in first-launch order; `phase` "forward" / "backward" or all."""
        rows: dict[tuple, list] = {}
        for hash_, grid, ph in self.records:
            if phase is not None and ph != phase:
                continue
            key = (hash_, grid, ph)
            if key in rows:
                rows[key][1] += 1
            else:
                rows[key] = [self._report(hash_, grid, ph), 1]
        return [KernelReport(**{**report.__dict__, "launches": count}) for report, count in rows.values()]

    def _report(self, hash_, grid, phase) -> KernelReport:
        kernel = self._kernels[hash_]
        meta = kernel.metadata
        if hash_ not in self._usage:
            usage = resource_usage(kernel.asm["cubin"], self.tools["cuobjdump"])
            if meta.name not in usage:
                raise KernelReportError(f"cuobjdump lists no function {meta.name} in its cubin ({sorted(usage)})")
            self._usage[hash_] = usage[meta.name]
        u = self._usage[hash_]
        return KernelReport(name=meta.name, grid=grid, num_warps=meta.num_warps, num_stages=meta.num_stages,
                            registers=u["registers"], spill_bytes=u["stack"] + u["local"], shared_bytes=meta.shared,
                            compile_seconds=self.compile_seconds.get(hash_, 0.0), target=self.target.name,
                            phase=phase, cached=hash_ in self.cache_hits, signature=dict(kernel.src.signature))

    def forget(self) -> None:
        """Drop this block's entries from the JIT caches (they belong to the stand-in device; the reports keep
        the compiled kernels they need)."""
        for fn in self._functions.values():
            fn.device_caches.pop(self.device, None)


_BLOCKS = itertools.count()


@contextlib.contextmanager
def compile_only(target: str | Target = "sm_90", *, cached: bool = False):
    """Within the block, every Triton kernel launched compiles for `target` and does not run; yields `Launches`.
    cached: take a kernel Triton compiled before from its on-disk cache (a report row then has `cached` set).

    Raises ToolMissing without triton, ptxas or cuobjdump; CompileFailed (naming the kernel) when a kernel does
    not compile for the target. The previous driver, knobs and hooks are back after the block.
    """
    target = target if isinstance(target, Target) else target_of(target)
    tools = find_tools(target)
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    if knobs.runtime.interpret:
        raise InterpreterOn(_INTERPRETER_ON)

    device = f"compile-only:{target.name}:{next(_BLOCKS)}"
    launches = Launches(target, device, tools)

    class _Launcher:
        def __init__(self, src, metadata):
            self.src, self.metadata = src, metadata

        def __call__(self, grid_0, grid_1, grid_2, *rest):
            launches.record(self.src.fn, self.metadata, (grid_0, grid_1, grid_2))

    class _CompileOnlyDriver(_driver_base()):
        """Triton's active driver for a compile-only block: reports `target`, compiles, launches nothing."""

        utils = _Utils()
        launcher_cls = _Launcher

        @classmethod
        def is_active(cls):
            return False  # never chosen by Triton itself

        def get_current_target(self):
            return GPUTarget("cuda", target.arch, 32)

        def get_current_device(self):
            return device

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise KernelReportError("a compile-only block runs no kernel, so it times none")

        def map_python_to_cpp_type(self, ty: str) -> str:
            raise KernelReportError("a compile-only block builds no launcher")

    # Triton calls jit_cache_hook just before it compiles a kernel and the listener when the compile is done,
    # so an exception raised while `compiling` is set came out of that kernel's compile.
    def before_compile(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        launches.compiling = fn.name
        return None  # compile as usual

    def listener(*, src, metadata, metadata_group, times, cache_hit):
        launches.compile_seconds[metadata["hash"]] = times.total / 1e6
        if cache_hit:
            launches.cache_hits.add(metadata["hash"])
        launches.compiling = None

    previous = driver._active  # None until a driver was chosen: setting it back keeps Triton's lazy choice
    driver.set_active(_CompileOnlyDriver())
    try:
        with knobs.compilation.scope(), knobs.runtime.scope(), warnings.catch_warnings():
            # Triton (3.9) warns once that its fp-fusion default changes in 3.10: noise for a report of today's code.
            warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION is unset")
            knobs.compilation.always_compile = not cached
            knobs.compilation.listener = listener
            knobs.runtime.jit_cache_hook = before_compile
            try:
                yield launches
            except KernelReportError:
                raise
            except Exception as err:
                if launches.compiling is None:
                    raise  # not from a compile: the call's own error (bad arguments, a bad config)
                raise CompileFailed(f"{launches.compiling} does not compile for {target.name}: "
                                    f"{type(err).__name__}: {str(err).strip()[:1500]}") from err
    finally:
        driver.set_active(previous)
        launches.forget()


_INTERPRETER_ON = ("Triton's interpreter is on in this process (TRITON_INTERPRET=1), so kernels run instead of "
                   "compiling: make the report in a process without TRITON_INTERPRET")


@contextlib.contextmanager
def _device_rules(layer):
    """Within a compile-only block the call's CPU tensors stand in for a GPU's, so the layer's generated module
    takes its checkpoint spacing by the GPU's rule (`checkpoint_every`: every max(64, sqrt T) steps; on a CPU it
    checkpoints more often, to bound the memory), and the bytes held until the backward are the GPU call's."""
    module = sys.modules[type(layer).__module__]
    rule = getattr(module, "checkpoint_every", None)
    if rule is None:
        yield
        return
    module.checkpoint_every = lambda length, states=(), on_cpu=None: rule(length, states, False)
    try:
        yield
    finally:
        module.checkpoint_every = rule


def _check_not_interpreted(module) -> None:
    from triton.runtime.interpreter import InterpretedFunction

    if any(isinstance(v, InterpretedFunction) for v in vars(module).values()):
        raise InterpreterOn(_INTERPRETER_ON + " (set before these kernels were imported)")


# -- a recurrence's call --------------------------------------------------------------------------------------


def run_call(layer, args, kwargs=None, *, form: str = "auto", chunk_size: int | None = None,
             config: dict | None = None, ran: list[str] | None = None):
    """Run `layer`'s call on its Triton forms as `layer(*args, backend="triton", form=..., ...)` does, on any
    device: the generated module's own `bind_call` and `run_forms` (dtype, packed sequences, the auto form and
    its fallbacks), skipping only the rule that Triton runs CUDA tensors. ValueError for a bad form or config.
    ran: a list that gets the name of each form whose function returned, in call order (what "auto" ran after
    its fallbacks: based's recurrent form does not fit at K = V = 64, so a short call runs chunked)."""
    module = sys.modules[type(layer).__module__]
    if getattr(layer, "shift", None) is not None:
        # a recurrence with shift states (codegen/shift_runtime.py): its shift in torch, then the rest's forms
        def rest(inner_args, inner_kwargs):
            try:
                return run_call(layer.inner, inner_args, inner_kwargs, form=form, chunk_size=chunk_size,
                                config=config, ran=ran)
            except ValueError as err:
                if type(err) is not ValueError:  # (a CallError: the shifted layer says it under its own name)
                    raise
                raise ValueError(str(err).replace(layer.inner.name, layer.name)) from None

        return layer._shifted(module.bind_call(layer.recurrence, tuple(args), dict(kwargs or {})), rest)
    fns = layer.triton_forms
    if fns is None:
        raise ToolMissing("triton does not import, so the layer has no Triton forms")
    if form != "auto" and form not in fns:
        raise ValueError(f"{layer.name} has no {form!r} form on the triton backend; it has {', '.join(fns)}")
    call = module.bind_call(layer.recurrence, tuple(args), dict(kwargs or {}))
    if call.dtype == torch.float64:
        raise ValueError("Triton kernels take float16, bfloat16 or float32 inputs, not float64")
    chunk = layer.chunk_size if chunk_size is None else chunk_size
    options = {}
    if config is not None:
        # the layer's own rule (each form its keys, its defaults for the rest, launch values Triton takes), as a
        # call with config= checks it
        shares = type(layer)._config_forms(config, None if form == "auto" else form, fns, "triton")
        chunk = config.get("chunk_size", chunk)
        options = {f: {k: v for k, v in share.items() if k != "chunk_size"} for f, share in shares.items()}
    if ran is None:
        return layer._run(call, form, "triton", chunk, options)  # the layer's own Triton path, on any device
    layer.triton_forms = {name: _recorded(name, fn, ran) for name, fn in fns.items()}
    try:
        return layer._run(call, form, "triton", chunk, options)
    finally:
        layer.triton_forms = fns


def _recorded(name: str, fn, ran: list[str]):
    """`fn` (a form function, its attributes kept: run_packed, input_dtype) that appends `name` to `ran` when
    it returns; one that raises (a form that does not fit, a decay that is not positive) is not counted."""
    def run(*args, **kwargs):
        result = fn(*args, **kwargs)
        ran.append(name)
        return result

    return functools.update_wrapper(run, fn)


def report_call(layer, args, kwargs=None, *, target: str | Target = "sm_90", form: str = "auto",
                chunk_size: int | None = None, config: dict | None = None,
                backward: bool = False, cached: bool = False) -> list[KernelReport]:
    """The kernels `layer`'s call on `args` launches on its Triton forms, compiled for `target`.

    args: CPU tensors (inputs and params in declared order) in the call's dtype; kwargs: the call's other
    arguments (initial_state, output_final_state, cu_seqlens). backward: also run a backward pass (outputs
    summed) and report its launches with phase "backward". cached: see `compile_only`. Raises ValueError for a
    bad call or config, KernelReportError when no report can be made.
    """
    return _report_call(layer, args, kwargs, target=target, form=form, chunk_size=chunk_size, config=config,
                        backward=backward, cached=cached)[0]


def _report_call(layer, args, kwargs=None, *, target, form, chunk_size, config, backward, count=False,
                 cached=False, ran=None):
    """(kernels, IntermediateReport or None): `report_call`, and with `count` the bytes of intermediate tensors
    the same call allocates (`codegen.intermediate_bytes.measure`, counted in the same compile-only block)."""
    _check_not_interpreted(sys.modules[type(layer).__module__])
    if backward:
        args = [a.detach().requires_grad_(a.is_floating_point()) for a in args]
    counted = None
    with compile_only(target, cached=cached) as launches, _device_rules(layer):
        if count:
            from .intermediate_bytes import measure

            inputs = [a for a in args if torch.is_tensor(a)]
            inputs += [v for v in (kwargs or {}).values() if torch.is_tensor(v)]

            def call():
                return run_call(layer, args, kwargs, form=form, chunk_size=chunk_size, config=config, ran=ran)

            def to_backward():
                launches.phase = "backward"

            with contextlib.nullcontext() if backward else torch.no_grad():
                counted = measure(call, inputs, backward=backward, before_backward=to_backward)
        elif backward:
            result = run_call(layer, args, kwargs, form=form, chunk_size=chunk_size, config=config, ran=ran)
            launches.phase = "backward"
            outputs = [t for t in _tensors(result) if t.requires_grad]
            if outputs:
                torch.autograd.backward([t.float().nan_to_num().sum() for t in outputs])
        else:
            with torch.no_grad():
                run_call(layer, args, kwargs, form=form, chunk_size=chunk_size, config=config, ran=ran)
    return launches.kernels(), counted


def _tensors(result) -> list:
    if torch.is_tensor(result):
        return [result]
    if isinstance(result, dict):
        return [t for v in result.values() for t in _tensors(v)]
    if isinstance(result, (tuple, list)):
        return [t for v in result for t in _tensors(v)]
    return []


def report_recurrence(rec, sizes: dict[str, int], batch: int, length: int, heads: int, *,
                      dtype: torch.dtype = torch.bfloat16, target: str | Target = "sm_90", form: str = "auto",
                      chunk_size: int | None = None, config: dict | None = None, backward: bool = False,
                      seed: int = 0, intermediates: bool = False, cached: bool = False,
                      ran: list[str] | None = None):
    """`report_call` on a recurrence's layer (its generated module, no tuning lookup) with arguments drawn by
    `recurrence_dsl.sampling.sample_arguments` (seeded, stable) at [batch, length, heads] and spec `sizes`.

    rec: a Recurrence, CheckedRecurrence or Analysis. intermediates: return (kernels, IntermediateReport), the
    bytes of intermediate tensors the call allocates (its final states asked for, so they are outputs) counted in
    the same compile-only block (`codegen.intermediate_bytes`); else the list of kernels. ran: see `run_call`."""
    from recurrence_dsl.analysis import Analysis, analyse
    from recurrence_dsl.sampling import sample_arguments

    from .load import load_layer

    analysis = rec if isinstance(rec, Analysis) else analyse(getattr(rec, "checked", rec))
    checked = analysis.recurrence
    missing = set(checked.sizes) - set(sizes)
    if missing:
        raise ValueError(f"sizes: {checked.name} needs {', '.join(sorted(missing))}")
    args, _ = sample_arguments(checked, {s: int(sizes[s]) for s in checked.sizes}, batch, length, heads,
                               dtype=torch.float64, seed=seed)
    args = [a.to(dtype) for a in args]
    if intermediates:
        return _report_call(load_layer(analysis), args, {"output_final_state": True}, target=target, form=form,
                            chunk_size=chunk_size, config=config, backward=backward, count=True, cached=cached,
                            ran=ran)
    return report_call(load_layer(analysis), args, target=target, form=form, chunk_size=chunk_size,
                       config=config, backward=backward, cached=cached)


def triton_forms_of(rec) -> list[str]:
    """The forms `rec`'s Triton backend has (recurrent, chunked, ...), as its generated module lists them."""
    from recurrence_dsl.analysis import Analysis, analyse

    from .load import load_layer

    analysis = rec if isinstance(rec, Analysis) else analyse(getattr(rec, "checked", rec))
    fns = load_layer(analysis).triton_forms
    return list(fns) if fns is not None else []


def format_table(kernels: list[KernelReport], indent: str = "  ") -> str:
    """The report as an aligned text table, one line per kernel."""
    head = ("kernel", "grid", "warps", "stages", "regs", "spill B", "shared B", "compile s")
    rows = [head] + [(k.name + (f" x{k.launches}" if k.launches > 1 else ""), "x".join(map(str, k.grid)),
                      str(k.num_warps), str(k.num_stages), str(k.registers), str(k.spill_bytes), str(k.shared_bytes),
                      f"{k.compile_seconds:.2f}") for k in kernels]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for r in rows:
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])] + [c.rjust(w) for c, w in zip(r[2:], widths[2:])]
        lines.append(indent + "  ".join(cells).rstrip())
    return "\n".join(lines)


def versions(target: str | Target = "sm_90") -> dict[str, str]:
    """torch, triton, ptxas and cuobjdump versions, for a report's header."""
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__, **tool_versions(target)}


__all__ = ["DEFAULT_DIM", "DEFAULT_SHAPE", "MAX_GRID", "MAX_REGISTERS", "TARGETS", "CompileFailed", "InterpreterOn",
           "KernelReport", "KernelReportError", "Launches", "Target", "ToolMissing", "compile_only", "find_tools",
           "format_table", "report_call", "report_recurrence", "resource_usage", "run_call", "target_of",
           "tool_versions", "triton_forms_of", "versions"]
