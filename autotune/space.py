"""The config space of each (form, backend) and the constraint model that prunes it before anything is timed.

A config is a plain dict of keyword arguments (JSON-able, ints only):

  (chunked, torch)      {"chunk_size"}                                        chunk_size in 16..256
  (chunked, triton)     {"chunk_size", "block_k", "block_v", "num_warps", "num_stages"}
                        chunk_size (BT) in 16..64, block_k / block_v in 16..128, num_warps 2/4/8, num_stages 1/2/3
  (parallel, triton)    {"block_t", "block_k", "block_v", "num_warps", "num_stages"}
                        block_t (rows of a query / key block) and block_k / block_v in 16..128, num_warps 2/4/8,
                        num_stages 1/2/3 (codegen/triton_parallel.py `parallel_linear_by`)
  (recurrent, triton)   {"num_warps"}                                         1/2/4/8
  (scan, triton)        {"block_t", "block_n", "num_warps"}
                        block_t (steps a chunk of the in-chunk associative scan) 8..128, block_n (state elements a
                        program) 8..256, num_warps 1/2/4/8 (codegen/triton_scan.py `_scan_config`)

`config_space(form, backend, problem, limits)` returns every config of the cartesian product, split into the
ones kept and the ones pruned, each pruned one with the reasons it cannot (or need not) run, in words. The
tuner only ever offers kept configs to optuna, so a pruned config is never timed. The model, in the spirit of
FlashRNN's constraint model (hardware limits written as inequalities over the tile sizes), is deliberately
simple and conservative; every estimate is float32 (the kernels upcast every tile before arithmetic):

- redundancy (hard): the Triton runtime runs BT = min(chunk_size, pow2(T)) (the parallel form BT =
  min(block_t, pow2(T))) and the torch runtime C = min(chunk_size, T), so a chunk_size (block_t) above the padded
  length is the same run as chunk_size (block_t) = padded T;
  a block_k (block_v) above the padded K (V) of every chunked state only adds masked padding lanes
  (K < 16 pads to 16, so BK = 16 is always legal).
- the delta rule (hard): chunked_delta's state program holds whole columns of S, so block_k >= K.
- shared memory (hard): the tiles a chunked kernel stages through shared memory, BT*BK (q/k) + BK*BV (state)
  + BT*BV (v/o) + BT*BT (scores), times num_stages (software pipelining keeps that many copies), 4 bytes each,
  must fit the device's per-block limit: 227 KiB on sm90+ (H100, H200), 163 KiB on sm80 (A100), 99 KiB on
  anything else (sm86/sm89, and unknown devices). The parallel form's attention kernel stages a query block and a
  key block of the contracted axis, a block of the other and the BT x BT scores, 2*BT*BX + BT*BZ + BT*BT, where
  (BX, BZ) is (BK, BV) in the forward and (BV, BK) in the backward's dq and dk; the larger of the two counts.
- registers (soft): NVIDIA caps a thread at 255 32-bit registers; a tile held in registers is spread over
  32 * num_warps threads, and more than 128 float32 elements of one kernel's live tiles per thread spills.
  Chunked: the BK x BV state tile; the BT x BV accumulator plus the BT x BT scores of the output kernel; for
  the delta rule the BT x BT inverse plus the BT x BK W tile. Parallel: the BT x BZ accumulator and the BT x BT
  scores, plus, with a key or value decay, two float64 BT x max(BK, BV) tiles of G (2 registers an element).
  Recurrent: the whole state (every state tile, each axis padded to a power of two >= 16) lives in registers.
- idle warps (hard, recurrent and scan): more threads than state elements (the scan: than its BT x BN tile) leaves
  whole warps without work.
- the scan (hard): a block_t above the padded T (pow2(T)) adds only masked steps to the one chunk that covers the
  sequence, a block_n above the padded lanes (pow2 of the widest scan's N = H * the state's elements, codegen/
  triton_scan.py's grid) only masked lanes to the one program that covers a row: both are redundant, except at the
  runtime's own default (kept, so that the untuned call is timed: an untuned call of T = 16 runs block_t 32).
  Registers (soft): an m x m block scan (m = 1: the diagonal scan) holds m*m + m tiles of [BT, BN] (A and b) and
  its backward 2m more, spread over 32 * num_warps threads, against the same 128 float32 a thread. A fused
  backward's own loads and derivatives (a spec's prologue VJP, `fused_scan`) are not counted: it runs chunks of
  min(block_t, 8) steps (`_SCAN_BT_VJP`), and the compiler's figures judge it.

Soft rules spill rather than fail: when every config that passes the hard rules fails a soft one (a state too
large for any num_warps), those with the fewest elements per thread are kept, and their `notes` say so.

The shared-memory and register rules are an estimate, kept by hand. The tuner uses them only when the toolchain
that compiles kernels for a GPU target (ptxas, cuobjdump from the triton wheel) is missing: otherwise it calls
`config_space(..., estimate=False)`, which applies only the exact rules (redundancy, padding, the delta rule, idle
warps), and drops a config when the compiler itself reports a spill or too much shared memory for it
(`autotune.figures`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

# -- the raw spaces ----------------------------------------------------------------------------------------

SPACES: dict[tuple[str, str], dict[str, tuple[int, ...]]] = {
    ("chunked", "torch"): {"chunk_size": (16, 32, 64, 128, 256)},
    ("chunked", "triton"): {
        "chunk_size": (16, 32, 64),
        "block_k": (16, 32, 64, 128),
        "block_v": (16, 32, 64, 128),
        "num_warps": (2, 4, 8),
        "num_stages": (1, 2, 3),
    },
    ("parallel", "triton"): {
        "block_t": (16, 32, 64, 128),
        "block_k": (16, 32, 64, 128),
        "block_v": (16, 32, 64, 128),
        "num_warps": (2, 4, 8),
        "num_stages": (1, 2, 3),
    },
    ("recurrent", "triton"): {"num_warps": (1, 2, 4, 8)},
    ("scan", "triton"): {
        "block_t": (8, 16, 32, 64, 128),
        "block_n": (8, 16, 32, 64, 128, 256),  # (8: the 4 x 4 block scan's default; the diagonal scan's is 64)
        "num_warps": (1, 2, 4, 8),
    },
}

# codegen/triton_parallel.py's defaults: block_t 64 (`_PARALLEL_BT`); BK, BV at most 64, and all three 32 with a key
# or value decay (`_PARALLEL_KEY_BLOCK`: its attention kernel holds float64 G tiles beside the scores). In float32
# (its "ieee" dots) block_t is 16 (`_PARALLEL_IEEE_BT`), BK and BV as in half precision.
PARALLEL_BLOCK = 64
PARALLEL_LANE_DECAY_BLOCK = 32
PARALLEL_IEEE_BLOCK_T = 16
# codegen/triton_runtime.py's float32 ("ieee" dots) chunked defaults: the linear form keeps chunks of 64 with K / V
# blocks of at most 32 (V 16 with a key or value decay: `_IEEE_LINEAR_BLOCK`, `_IEEE_LANE_DECAY_BV`) at 1 stage
# (`_IEEE_LINEAR_STAGES`); the delta rule runs chunks of at most 32 at 8 warps and 1 stage (`_IEEE_DELTA_BT`,
# `_IEEE_DELTA_WARPS`, `_IEEE_DELTA_STAGES`)
IEEE_LINEAR_BLOCK = 32
IEEE_LANE_DECAY_BV = 16
IEEE_LINEAR_STAGES = 1
IEEE_DELTA_CHUNK, IEEE_DELTA_WARPS, IEEE_DELTA_STAGES = 32, 8, 1
# codegen/triton_scan.py's defaults (any dtype: the scan kernels run float32 tiles): chunks of 32 steps (`_SCAN_BT`),
# 64 state elements a program (`_SCAN_BN`; an m x m block scan fewer, `_SCAN_BN_BLOCK`), 4 warps (`_SCAN_WARPS`).
# A fused backward that adds the gradients itself runs min(block_t, `_SCAN_BT_VJP`) steps a chunk, so these say
# the untuned call's backward too. (Not imported: codegen/triton_scan.py imports triton.)
SCAN_BLOCK_T = 32
SCAN_BLOCK_N = 64
SCAN_BLOCK_N_BLOCK = {2: 32, 3: 16, 4: 8}
SCAN_WARPS = 4

FLOAT_BYTES = 4  # every tile is float32 inside the kernels
REGISTER_TILE_LIMIT = 128  # float32 elements of live tiles per thread before spilling (of 255 registers)
THREADS_PER_WARP = 32
KIB = 1024


def tunable(form: str, backend: str) -> bool:
    """Whether (form, backend) has anything to tune."""
    return (form, backend) in SPACES


def _check_tunable(form: str, backend: str) -> None:
    if not tunable(form, backend):
        choices = ", ".join(f"{f}/{b}" for f, b in SPACES)
        raise ValueError(f"nothing to tune for form={form!r}, backend={backend!r}; tunable: {choices}")


def pow2_at_least_16(n: int) -> int:
    """The tile extent of an axis of n lanes (the runtimes' padding rule)."""
    return max(16, 1 << max(int(n) - 1, 0).bit_length())


def config_key(config: dict) -> str:
    """A canonical, readable string for a config (sorted keys): the categorical choice optuna sees."""
    return ",".join(f"{k}={config[k]}" for k in sorted(config))


def parse_config_key(key: str) -> dict:
    """The inverse of `config_key`."""
    return {k: int(v) for k, v in (part.split("=") for part in key.split(","))} if key else {}


def raw_configs(form: str, backend: str) -> list[dict]:
    """Every config of the cartesian product, before pruning, in a fixed order."""
    _check_tunable(form, backend)
    axes = SPACES[(form, backend)]
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def default_config(form: str, backend: str, problem: Problem) -> dict:
    """What an untuned call runs: compile()'s chunk_size=64 and the Triton runtimes' own defaults at the problem's
    dtype, as far as one config says them (a config's num_warps and block_v apply to every kernel, where an untuned
    call gives the chunked runtime's heaviest kernels 8 warps and the delta rule's state kernel a narrower BV, and
    the recurrent launcher picks num_warps from its tile sizes).

    float32 (the runtimes' "ieee" dots, allow_tf32 unset) differs from half precision: the parallel form's block_t
    is 16; the linear chunked form keeps chunk 64 with block_k, block_v at most 32 (block_v 16 with a key or value
    decay) at 1 stage; the delta rule runs chunks of at most 32 at 8 warps and 1 stage. A chunk_size (block_t)
    above the padded length is clamped to it (the runtimes run that anyway).

    The scan form's (codegen/triton_scan.py `_scan_config`) is the same in every dtype and not clamped (its kernels
    run block_t steps a chunk whatever T is): block_t 32, block_n 64 (an m x m block scan's narrower BN,
    `_SCAN_BN_BLOCK`; where a spec has both kinds, the block's, since a config's block_n applies to every launch),
    num_warps 4."""
    _check_tunable(form, backend)
    chunk = min(64, pow2_at_least_16(problem.length))
    if backend == "torch":
        return {"chunk_size": chunk}
    if form == "recurrent":
        return {"num_warps": 4}
    if form == "scan":
        m = problem.scan_block
        return {"block_t": SCAN_BLOCK_T, "block_n": SCAN_BLOCK_N if m == 1 else SCAN_BLOCK_N_BLOCK.get(m, 4),
                "num_warps": SCAN_WARPS}
    ieee = problem.dtype == "float32"
    K = max((s.K for s in problem.chunk_states), default=16)
    V = max((s.V for s in problem.chunk_states), default=16)
    if form == "parallel":  # codegen/triton_parallel.py `_parallel_config`, per call the widest state's
        most = PARALLEL_LANE_DECAY_BLOCK if problem.lane_decay else PARALLEL_BLOCK
        block_t = PARALLEL_IEEE_BLOCK_T if ieee else most
        return {"block_t": min(block_t, pow2_at_least_16(problem.length)), "block_k": min(most, pow2_at_least_16(K)),
                "block_v": min(most, pow2_at_least_16(V)), "num_warps": 4, "num_stages": 2}
    delta = any(s.delta for s in problem.chunk_states)
    bk = pow2_at_least_16(K) if delta else min(64, pow2_at_least_16(K))
    kb = max(min(64, bk), bk // 4) if delta else bk  # the delta rule's K blocks (`_delta_blocks`)
    bv = min(pow2_at_least_16(V), 64 if kb <= 64 else (32 if kb <= 128 else 16))
    if ieee and delta:  # codegen/triton_runtime.py `_delta_ieee_defaults`
        return {"chunk_size": min(chunk, IEEE_DELTA_CHUNK), "block_k": bk, "block_v": bv,
                "num_warps": IEEE_DELTA_WARPS, "num_stages": IEEE_DELTA_STAGES}
    if ieee:  # codegen/triton_runtime.py `_config`, `chunked_linear_by`
        return {"chunk_size": chunk, "block_k": min(bk, IEEE_LINEAR_BLOCK),
                "block_v": min(bv, IEEE_LANE_DECAY_BV if problem.lane_decay else IEEE_LINEAR_BLOCK), "num_warps": 4,
                "num_stages": IEEE_LINEAR_STAGES}
    return {"chunk_size": chunk, "block_k": bk, "block_v": bv, "num_warps": 4, "num_stages": 2}


# -- what the model needs to know about a call --------------------------------------------------------------


@dataclass(frozen=True)
class ChunkState:
    """One state as the chunked runtime sees it: keys of K lanes, values of V lanes (V = 1 with no value axis)."""

    name: str
    K: int
    V: int
    delta: bool  # a rank-one (delta rule) update: chunked_delta
    lane_decay: bool = False  # a key or value decay (a log decay per lane, not one per step and head)


@dataclass(frozen=True)
class ScanState:
    """One launch of the scan form's kernels: a diagonal state (m = 1) or a block of m coupled states (m x m blocks).
    lanes: the kernel's N, the elements it scans in one row (H times the state's elements)."""

    name: str
    lanes: int
    m: int = 1


@dataclass(frozen=True)
class Problem:
    """The sizes the constraint model reads: the (bucketed) length, the chunked states, the recurrent tile, the
    scan's launches."""

    length: int
    chunk_states: tuple[ChunkState, ...] = ()
    state_elements: int = 256  # padded elements of every state tile together (the recurrent kernel's registers)
    # the inputs' dtype by name ("float32", "bfloat16", "float16", "float64"; a torch.dtype is taken too): float32
    # runs other Triton defaults (`default_config`); float64 tunes only the torch backend's forms
    dtype: str = "bfloat16"
    scan_states: tuple[ScanState, ...] = ()  # the scan form's launches (none without a scan form)

    def __post_init__(self):
        name = str(self.dtype).removeprefix("torch.")
        if name not in ("float32", "bfloat16", "float16", "float64"):  # (float64: the torch backend's forms only)
            raise ValueError(f"Problem dtype must be float32, bfloat16, float16 or float64, got {self.dtype!r}")
        object.__setattr__(self, "dtype", name)

    @property
    def lane_decay(self) -> bool:
        """Whether a chunked state has a key or value decay (the parallel form's defaults and G tiles)."""
        return any(s.lane_decay for s in self.chunk_states)

    @property
    def scan_block(self) -> int:
        """The largest m of the scan's launches (1: diagonal scans only), which sets the scan's default block_n."""
        return max((s.m for s in self.scan_states), default=1)

    @classmethod
    def from_analysis(cls, analysis, sizes: dict[str, int], length: int, dtype="bfloat16", heads: int = 1) -> Problem:
        """Read the chunked states (key axis, value axes, delta or not), the state tiles and the scan's launches
        (lanes, m) off an `Analysis`; dtype: the call's (a name or torch.dtype); heads: the call's H (a scan kernel
        scans every head's lanes of a row)."""

        def extent(d) -> int:
            return int(sizes[d]) if isinstance(d, str) else int(d)

        if getattr(analysis, "inner", None) is not None:  # shift states: the forms run the rest of the recurrence
            analysis = analysis.inner
        chunk_states, elements = [], 0
        for name, st in analysis.chunk_analysis.states.items():  # (states chunked as transposes, transposed)
            dims = [extent(d) for d in st.dims]
            elements += math.prod(pow2_at_least_16(n) for n in dims) if dims else 16
            plan = st.chunk
            if plan is None:
                continue
            if plan.key_axis is None:
                K, rest = 1, dims
            elif plan.pair:  # a 3-axis state held as [X * Y, V] (its first two axes one key axis)
                K, rest = dims[0] * dims[1], dims[2:]
            else:
                K, rest = dims[plan.key_axis], dims[: plan.key_axis] + dims[plan.key_axis + 1 :]
            V = math.prod(rest) if (rest and plan.v is not None) else 1
            chunk_states.append(ChunkState(name, K, V, plan.beta is not None, plan.decay_axis in ("key", "value")))
        scan_states = []
        if "scan" in analysis.forms:  # one launch per diagonal state, one per block of m coupled states
            for s in analysis.recurrence.states:
                block = analysis.states[s.name].block
                if block is not None and block.states[0] != s.name:
                    continue
                lanes = int(heads) * math.prod(extent(d) for d in s.dims)
                scan_states.append(ScanState(s.name, lanes) if block is None else
                                   ScanState("+".join(block.states), lanes, len(block.states)))
        return cls(length=int(length), chunk_states=tuple(chunk_states), state_elements=elements, dtype=dtype,
                   scan_states=tuple(scan_states))


@dataclass(frozen=True)
class DeviceLimits:
    """Per-device limits of the constraint model."""

    name: str
    smem_bytes: int
    register_tile_limit: int = REGISTER_TILE_LIMIT


SM90 = DeviceLimits("sm90 (H100/H200)", 227 * KIB)
SM80 = DeviceLimits("sm80 (A100)", 163 * KIB)
OTHER = DeviceLimits("other GPU", 99 * KIB)


def limits_for_capability(major: int, minor: int = 0) -> DeviceLimits:
    """The limits of a CUDA compute capability: 227 KiB sm90+, 163 KiB sm80, 99 KiB otherwise."""
    if major >= 9:
        return DeviceLimits(f"sm{major}{minor}", SM90.smem_bytes)
    if (major, minor) == (8, 0):
        return DeviceLimits("sm80", SM80.smem_bytes)
    return DeviceLimits(f"sm{major}{minor}", OTHER.smem_bytes)


def device_limits(device=None) -> DeviceLimits:
    """The limits of a torch device. A CPU (Triton's interpreter) gets sm90's, so its configs stay GPU-legal."""
    import torch

    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return limits_for_capability(*torch.cuda.get_device_capability(device))
    return DeviceLimits("cpu, with sm90 limits", SM90.smem_bytes)


# -- the rules ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pruned:
    config: dict
    reason: str  # every rule it breaks, "; "-separated


@dataclass
class Space:
    form: str
    backend: str
    problem: Problem
    limits: DeviceLimits
    configs: list[dict]  # kept, in raw order
    pruned: list[Pruned]
    default: dict
    notes: list[str] = field(default_factory=list)

    def keys(self) -> list[str]:
        return [config_key(c) for c in self.configs]

    def reason(self, config: dict) -> str | None:
        """Why `config` was pruned (None when it is kept)."""
        key = config_key(config)
        return next((p.reason for p in self.pruned if config_key(p.config) == key), None)

    def summary(self) -> str:
        limits = f" ({self.limits.name})" if self.backend == "triton" else ""
        return (f"{self.form}/{self.backend}: {len(self.configs)} of {len(self.configs) + len(self.pruned)} "
                f"configs kept{limits}")


def shared_memory_bytes(config: dict) -> int:
    """The shared-memory estimate of a chunked Triton config (see the module docstring)."""
    bt, bk, bv = config["chunk_size"], config["block_k"], config["block_v"]
    return (bt * bk + bk * bv + bt * bv + bt * bt) * FLOAT_BYTES * max(1, config["num_stages"])


def _padding_rules(time_key: str, bt: int, bk: int, bv: int, problem: Problem) -> list[str]:
    """The hard rules a chunked or parallel Triton config shares: a time block (`time_key`, chunk_size or block_t)
    past the padded T runs the same kernel as the padded T; a K or V block past the padded K or V is masked
    padding."""
    hard = []
    padded_t = pow2_at_least_16(problem.length)
    if bt > padded_t:
        hard.append(f"redundant: {time_key} {bt} > padded T {padded_t} runs BT = {padded_t}, "
                    f"the same kernel as {time_key}={padded_t}")
    states = problem.chunk_states
    if states:
        pk = max(pow2_at_least_16(s.K) for s in states)
        pv = max(pow2_at_least_16(s.V) for s in states)
        if bk > pk:
            hard.append(f"padding: block_k {bk} > padded K {pk}: lanes beyond K are masked padding")
        if bv > pv:
            hard.append(f"padding: block_v {bv} > padded V {pv}: lanes beyond V are masked padding")
    return hard


def _chunked_triton_rules(config: dict, problem: Problem, limits: DeviceLimits,
                          estimate: bool = True) -> tuple[list[str], list[str]]:
    bt, bk, bv, nw = config["chunk_size"], config["block_k"], config["block_v"], config["num_warps"]
    hard, soft = _padding_rules("chunk_size", bt, bk, bv, problem), []
    states = problem.chunk_states
    for s in states:
        if s.delta and bk < s.K:
            hard.append(f"delta rule: state {s.name} needs block_k >= K = {s.K} (chunked_delta's state "
                        f"program holds whole columns of S), got {bk}")
    if not estimate:
        return hard, soft
    smem = shared_memory_bytes(config)
    if smem > limits.smem_bytes:
        hard.append(f"shared memory: (BT*BK + BK*BV + BT*BV + BT*BT) * 4 B * {config['num_stages']} stages = "
                    f"{smem / KIB:g} KiB > {limits.smem_bytes / KIB:g} KiB on {limits.name}")
    threads = THREADS_PER_WARP * nw
    limit = limits.register_tile_limit
    if bk * bv / threads > limit:
        soft.append(f"registers: the {bk}x{bv} state tile is {bk * bv // threads} float32 per thread "
                    f"at num_warps={nw} (> {limit})")
    if (bt * bv + bt * bt) / threads > limit:
        soft.append(f"registers: the output kernel's {bt}x{bv} accumulator and {bt}x{bt} scores are "
                    f"{(bt * bv + bt * bt) // threads} float32 per thread at num_warps={nw} (> {limit})")
    if any(s.delta for s in states) and (bt * bt + bt * bk) / threads > limit:
        soft.append(f"registers: the delta rule's {bt}x{bt} inverse and {bt}x{bk} W tile are "
                    f"{(bt * bt + bt * bk) // threads} float32 per thread at num_warps={nw} (> {limit})")
    return hard, soft


def parallel_shared_memory_bytes(config: dict) -> int:
    """The shared-memory estimate of a parallel Triton config (see the module docstring): the attention kernel's
    query and key blocks of the contracted axis, a block of the other axis and the scores, for the worse of the
    forward's (BK contracted) and the backward's (BV contracted) launches, times num_stages."""
    bt, bk, bv = config["block_t"], config["block_k"], config["block_v"]
    tiles = max(2 * bt * bk + bt * bv, 2 * bt * bv + bt * bk) + bt * bt
    return tiles * FLOAT_BYTES * max(1, config["num_stages"])


def _parallel_pressure(config: dict, problem: Problem) -> float:
    """float32 registers per thread of the parallel attention kernel's live tiles (see the module docstring)."""
    bt, bk, bv = config["block_t"], config["block_k"], config["block_v"]
    live = bt * max(bk, bv) + bt * bt + (2 * 2 * bt * max(bk, bv) if problem.lane_decay else 0)
    return live / (THREADS_PER_WARP * config["num_warps"])


def _parallel_triton_rules(config: dict, problem: Problem, limits: DeviceLimits,
                           estimate: bool = True) -> tuple[list[str], list[str]]:
    bt, bk, bv, nw = config["block_t"], config["block_k"], config["block_v"], config["num_warps"]
    hard, soft = _padding_rules("block_t", bt, bk, bv, problem), []
    if not estimate:
        return hard, soft
    smem = parallel_shared_memory_bytes(config)
    if smem > limits.smem_bytes:
        hard.append(f"shared memory: (2*BT*BX + BT*BZ + BT*BT) * 4 B * {config['num_stages']} stages = "
                    f"{smem / KIB:g} KiB > {limits.smem_bytes / KIB:g} KiB on {limits.name}")
    pressure = _parallel_pressure(config, problem)
    if pressure > limits.register_tile_limit:
        what = " and the float64 G tiles" if problem.lane_decay else ""
        soft.append(f"registers: the attention kernel's {bt}x{max(bk, bv)} accumulator, {bt}x{bt} scores{what} "
                    f"are {int(pressure)} float32 per thread at num_warps={nw} (> {limits.register_tile_limit})")
    return hard, soft


def _chunked_torch_rules(config: dict, problem: Problem, limits: DeviceLimits,
                        estimate: bool = True) -> tuple[list[str], list[str]]:
    c = config["chunk_size"]
    padded_t = 1 << max(problem.length - 1, 0).bit_length()
    if c > max(padded_t, 16):
        return [f"redundant: chunk_size {c} > padded T {padded_t} runs one chunk of T steps, "
                f"the same as chunk_size={max(padded_t, 16)}"], []
    return [], []


def _recurrent_triton_rules(config: dict, problem: Problem, limits: DeviceLimits,
                            estimate: bool = True) -> tuple[list[str], list[str]]:
    hard, soft = [], []
    nw = config["num_warps"]
    threads = THREADS_PER_WARP * nw
    n = problem.state_elements
    if nw > 1 and n < threads:
        hard.append(f"idle warps: {threads} threads at num_warps={nw} for {n} state elements")
    if estimate and n / threads > limits.register_tile_limit:
        soft.append(f"registers: the state tiles ({n} elements) are {n // threads} float32 per thread "
                    f"at num_warps={nw} (> {limits.register_tile_limit})")
    return hard, soft


def _scan_pressure(config: dict, problem: Problem) -> float:
    """float32 registers per thread of the scan kernels' live tiles (see the module docstring): m*m + m tiles of
    [BT, BN] and the backward's 2m more, m the largest block (1: the diagonal scan)."""
    m = problem.scan_block
    return (m * m + 3 * m) * config["block_t"] * config["block_n"] / (THREADS_PER_WARP * config["num_warps"])


def _scan_triton_rules(config: dict, problem: Problem, limits: DeviceLimits,
                       estimate: bool = True) -> tuple[list[str], list[str]]:
    bt, bn, nw = config["block_t"], config["block_n"], config["num_warps"]
    hard, soft = [], []
    default = default_config("scan", "triton", problem)  # (never redundant: the untuned call runs it)
    padded_t = 1 << max(problem.length - 1, 0).bit_length()
    if bt > max(padded_t, default["block_t"]):
        hard.append(f"redundant: block_t {bt} > padded T {padded_t}: one chunk of {padded_t} steps covers the "
                    "sequence, the rest are masked steps")
    if problem.scan_states:
        lanes = max(s.lanes for s in problem.scan_states)
        padded_n = 1 << max(lanes - 1, 0).bit_length()
        if bn > max(padded_n, default["block_n"]):
            hard.append(f"redundant: block_n {bn} > padded lanes {padded_n} (N = {lanes}): one program of "
                        f"{padded_n} lanes covers a row, the rest are masked lanes")
    threads = THREADS_PER_WARP * nw
    if nw > 1 and bt * bn < threads:
        hard.append(f"idle warps: {threads} threads at num_warps={nw} for a {bt}x{bn} tile")
    if estimate:
        pressure = _scan_pressure(config, problem)
        if pressure > limits.register_tile_limit:
            m = problem.scan_block
            what = "the diagonal scan's" if m == 1 else f"the {m}x{m} block scan's"
            soft.append(f"registers: {what} {m * m + 3 * m} tiles of {bt}x{bn} (with its backward's) are "
                        f"{int(pressure)} float32 per thread at num_warps={nw} (> {limits.register_tile_limit})")
    return hard, soft


_RULES = {
    ("chunked", "torch"): _chunked_torch_rules,
    ("chunked", "triton"): _chunked_triton_rules,
    ("parallel", "triton"): _parallel_triton_rules,
    ("recurrent", "triton"): _recurrent_triton_rules,
    ("scan", "triton"): _scan_triton_rules,
}


def _pressure(config: dict, form: str, problem: Problem) -> float:
    """Elements per thread of the largest register tile (to pick the least-spilling configs)."""
    threads = THREADS_PER_WARP * config["num_warps"]
    if form == "recurrent":
        return problem.state_elements / threads
    if form == "parallel":
        return _parallel_pressure(config, problem)
    if form == "scan":
        return _scan_pressure(config, problem)
    bt, bk, bv = config["chunk_size"], config["block_k"], config["block_v"]
    return max(bk * bv, bt * bv + bt * bt, bt * bt + bt * bk) / threads


def check_config(config: dict, form: str, backend: str, problem: Problem, limits: DeviceLimits = SM90,
                 estimate: bool = True) -> str | None:
    """Why `config` is pruned ("; "-joined reasons, hard and soft), or None when every rule holds; estimate=False
    leaves out the hand-kept shared-memory and register estimates (the compiler's figures decide those)."""
    _check_tunable(form, backend)
    expected = set(SPACES[(form, backend)])
    if set(config) != expected:
        return f"bad config: keys {sorted(config)}, expected {sorted(expected)}"
    for name, value in config.items():
        if value not in SPACES[(form, backend)][name]:
            return f"bad config: {name}={value!r} is not one of {SPACES[(form, backend)][name]}"
    hard, soft = _RULES[(form, backend)](config, problem, limits, estimate)
    return "; ".join(hard + soft) or None


def config_space(form: str, backend: str, problem: Problem, limits: DeviceLimits = SM90,
                 estimate: bool = True) -> Space:
    """Every config of (form, backend), pruned by the constraint model for `problem` on `limits`. estimate=False:
    only the exact rules (no shared-memory or register estimate; the tuner then prunes with the compiler's own
    figures, `autotune.figures`)."""
    _check_tunable(form, backend)
    rule = _RULES[(form, backend)]
    kept, pruned, soft_only = [], [], []
    for config in raw_configs(form, backend):
        hard, soft = rule(config, problem, limits, estimate)
        if not hard and not soft:
            kept.append(config)
        else:
            pruned.append(Pruned(config, "; ".join(hard + soft)))
            if not hard:
                soft_only.append(config)
    notes = []
    if not kept and soft_only:
        least = min(_pressure(c, form, problem) for c in soft_only)
        kept = [c for c in soft_only if _pressure(c, form, problem) == least]
        keys = {config_key(c) for c in kept}
        pruned = [p for p in pruned if config_key(p.config) not in keys]
        notes.append(f"every config spills registers; kept the {len(kept)} with the fewest float32 per thread "
                     f"({least:g})")
    return Space(form, backend, problem, limits, kept, pruned, default_config(form, backend, problem), notes)


__all__ = [
    "SPACES", "ChunkState", "DeviceLimits", "Problem", "Pruned", "ScanState", "Space", "check_config", "config_key",
    "config_space", "default_config", "device_limits", "limits_for_capability", "parse_config_key",
    "parallel_shared_memory_bytes", "pow2_at_least_16", "raw_configs", "shared_memory_bytes", "tunable",
]
