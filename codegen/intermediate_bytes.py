"""The bytes of intermediate tensors a call allocates, and what the hand-written kernels allocate for the same call.

    report = measure_call(layer, args, form="chunked")           # CPU tensors; kernels run (interpreter) or not
    report.total                                                   # bytes
    for row in report.rows: print(row.bytes, row.count, row.where)  # per allocation site, largest first
    hand_written_bytes("gla", B=2, T=256, H=4, K=64, V=64, chunk=64)

An intermediate is a tensor whose storage the call allocates and that is neither an input, an output, a final
state nor (with `backward`) a gradient handed back to an input: the prologue's products (`beta[..., None] * v`),
the epilogue's (`read_S / K**0.5`), the kernels' buffers (chunk states, cumulative log decays, score blocks, WY
factors), dtype casts, the `_check_steps` flags. It is counted by a `TorchDispatchMode` around the call: every
ATen op's outputs whose storage is new (not an argument's, not one seen before) is one allocation, its size the
storage's bytes, its site the innermost frame of the call outside torch (function, file:line, the source line).
Views (`broadcast_to`, `[..., None]`, `.transpose`) share storage and cost nothing; a no-op `.to()` or
`.contiguous()` returns its argument and costs nothing. The figure is the sum over the call, not its peak: a
temporary freed at once counts in full, because a hand-written kernel would not allocate it at all.

Allocations made while a Triton kernel runs in the interpreter (its argument copies) are not the call's and are
skipped (any frame inside the `triton` package); under `kernel_report.compile_only` no kernel runs and the
buffers the host code allocates for them are counted exactly as on a GPU. Every allocated storage is kept alive
until the count is done, so an address freed and reused cannot hide a later allocation; the storage, not the tensor:
a reference to the tensor would make autograd's AccumulateGrad copy a gradient it would otherwise keep as `.grad`,
and the gradient the call handed back would then count as an intermediate.

The hand-written figures (`hand_written_bytes`) are formulas, one per class of spec, from the buffers the
published chunked kernels allocate for one forward call (see each class's docstring): B, T, H, K, V as the call,
NT = ceil(T / BT) chunks of BT = min(chunk, pow2(T), >= 16) steps, `elt` the bytes of the call's dtype for the
tensors those kernels keep in the input dtype, float32 for the rest. Outputs and final states are not counted.
`hand_written_backward_bytes` gives the buffers the same libraries' backward allocates besides the gradients it
hands back (recomputed forward buffers included), so a training step's figure is the sum of the two.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: PLC2701 - its documented home

_TORCH_DIR = str(Path(torch.__file__).parent)
_THIS = str(Path(__file__).resolve())
try:  # frames inside the triton package belong to a kernel launch, not to the call
    import triton as _triton

    _TRITON_DIR = str(Path(_triton.__file__).parent)
except ImportError:
    _TRITON_DIR = None


@dataclass
class Site:
    """The tensors allocated at one place in the call: where (function (file:line): the line), their total bytes,
    how many, and the shape and dtype of the first."""

    where: str
    bytes: int = 0
    count: int = 0
    shape: tuple = ()
    dtype: str = ""

    def as_dict(self) -> dict:
        return {"where": self.where, "bytes": self.bytes, "count": self.count, "shape": list(self.shape),
                "dtype": self.dtype}


@dataclass
class IntermediateReport:
    """`total` bytes of intermediates in `rows` (one per allocation site, largest first), by `phase`."""

    total: int
    rows: list[Site] = field(default_factory=list)
    by_phase: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"total": self.total, "by_phase": dict(self.by_phase), "tensors": [r.as_dict() for r in self.rows]}


def _site(depth_limit: int = 80) -> str | None:
    """The call's innermost frame outside torch and this file, as `fn (file:line): source`; None inside a Triton
    launch; the autograd engine's own work (gradient casts and sums it makes between the call's backward
    functions) when the backward reaches `measure` first."""
    frame = sys._getframe(2)
    chosen = None
    for _ in range(depth_limit):
        if frame is None:
            break
        name = frame.f_code.co_filename
        if _TRITON_DIR and name.startswith(_TRITON_DIR):
            return None  # inside a Triton launch (the interpreter's argument copies)
        if frame.f_code is measure.__code__:
            return "(autograd engine: gradient casts and accumulation between the call's backward functions)"
        if not name.startswith(_TORCH_DIR) and str(Path(name).resolve()) != _THIS:
            chosen = frame
            break
        frame = frame.f_back
    if chosen is None:
        return "(torch internals)"
    import linecache

    line = linecache.getline(chosen.f_code.co_filename, chosen.f_lineno).strip()
    return f"{chosen.f_code.co_name} ({Path(chosen.f_code.co_filename).name}:{chosen.f_lineno}): {line[:160]}"


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return st.data_ptr() if st.nbytes() else None


class _Counter(TorchDispatchMode):
    """Records every new storage an op returns (size, site, phase), keeping the storages alive (not the tensors:
    a tensor's extra reference would change what autograd does with a gradient)."""

    def __init__(self, known: set[int]):
        super().__init__()
        self.known = set(known)
        self.records: list[tuple[int, int, str, tuple, str, str]] = []  # (key, bytes, where, shape, dtype, phase)
        self.alive: list = []  # untyped storages
        self.phase = "forward"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in _flat(out):
            key = _storage_key(t)
            if key is None or key in self.known:
                continue
            self.known.add(key)
            where = _site()
            if where is None:
                continue
            self.alive.append(t.untyped_storage())
            self.records.append((key, t.untyped_storage().nbytes(), where, tuple(t.shape),
                                 str(t.dtype).replace("torch.", ""), self.phase))
        return out


def _flat(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _flat(v)]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _flat(v)]
    return []


def measure(fn, inputs: list[torch.Tensor], *, backward: bool = False, before_backward=None) -> IntermediateReport:
    """Intermediate bytes of `fn()` (it returns its outputs and final states, any nesting of tensors); `inputs`:
    the tensors it reads (their storages are not counted). backward: also run a backward pass from the outputs
    that require grad (seeded with ones made outside the count) and count its allocations, less the gradients
    handed to `inputs`; `before_backward()` is called just before it."""
    known = {k for k in map(_storage_key, inputs) if k is not None}
    counter = _Counter(known)
    with counter:
        result = fn()
    kept = {k for k in map(_storage_key, _flat(result)) if k is not None}
    if backward:
        outs = [t for t in _flat(result) if t.requires_grad]
        seeds = [torch.ones_like(t) for t in outs]  # outside the count: the caller's gradient, not the call's
        counter.phase = "backward"
        if before_backward is not None:
            before_backward()
        with counter:
            torch.autograd.backward(outs, seeds)
        kept |= {k for k in (_storage_key(x.grad) for x in inputs if x.grad is not None) if k is not None}
    sites: dict[str, Site] = {}
    phases: dict[str, int] = {}
    for key, nbytes, where, shape, dtype, phase in counter.records:
        if key in kept:
            continue
        row = sites.setdefault(where, Site(where, shape=shape, dtype=dtype))
        row.bytes += nbytes
        row.count += 1
        phases[phase] = phases.get(phase, 0) + nbytes
    rows = sorted(sites.values(), key=lambda r: -r.bytes)
    return IntermediateReport(sum(r.bytes for r in rows), rows, phases)


def measure_call(layer, args, kwargs=None, *, form: str = "auto", chunk_size: int | None = None,
                 config: dict | None = None, backward: bool = False, target: str | None = None) -> IntermediateReport:
    """`measure` of `layer`'s call on its Triton forms (`kernel_report.run_call`), its final states asked for.

    args: CPU tensors (inputs and params in declared order) in the call's dtype. target (sm_80, sm_90, sm_100):
    compile the kernels for it instead of running them (`kernel_report.compile_only`; Triton's interpreter must be
    off); None: run them (on CPU tensors that needs Triton's interpreter). Raises as `run_call` does."""
    from . import kernel_report as kr

    kwargs = dict(kwargs or {})
    kwargs.setdefault("output_final_state", True)
    if backward:
        args = [a.detach().requires_grad_(a.is_floating_point()) for a in args]
    inputs = [a for a in args if torch.is_tensor(a)] + [v for v in kwargs.values() if torch.is_tensor(v)]

    def call():
        return kr.run_call(layer, args, kwargs, form=form, chunk_size=chunk_size, config=config)

    if target is None:
        if backward:
            return measure(call, inputs, backward=True)
        with torch.no_grad():
            return measure(call, inputs)
    kr._check_not_interpreted(sys.modules[type(layer).__module__])
    with kr.compile_only(target), kr._device_rules(layer):
        if backward:
            return measure(call, inputs, backward=True)
        with torch.no_grad():
            return measure(call, inputs)


# -- the hand-written kernels' figures --------------------------------------------------------------------------


def _chunk(T: int, chunk: int) -> tuple[int, int]:
    BT = min(chunk, max(16, 1 << max(T - 1, 0).bit_length()))
    return BT, math.ceil(T / BT)


def hand_written_bytes(kind: str, *, B: int, T: int, H: int, K: int, V: int, chunk: int = 64,
                       elt: int = 4) -> dict[str, int]:
    """{buffer: bytes} the published chunked forward allocates for one call, besides its output and final state.

    kind:
      "gla"    (diagonal-row decay) flash-linear-attention `fla/ops/gla/chunk.py`, `chunk_gla_fwd`: the chunk-local
               cumsum of the log decays `g_cumsum` [B, T, H, K] float32 (`chunk_local_cumsum`), the chunk-start
               states `h` [B, NT, H, K, V] in the input dtype (`chunk_fwd_h(..., states_in_fp32=False)`), the
               intra-chunk scores `A` [B, T, H, BT] float32 (`chunk_gla_fwd_intra_gk`; "the intra A is kept in
               fp32").
      "gated_delta" (rank-one update, scalar decay) flash-linear-attention `fla/ops/gated_delta_rule/chunk.py`,
               `chunk_gated_delta_rule_fwd`: `g` cumsum [B, T, H] float32, the K K^T scores `A` [B, T, H, BT]
               float32 (`chunk_scaled_dot_kkt_fwd`), their inverse [B, T, H, BT] in the input dtype (`solve_tril`),
               the WY factors `w` [B, T, H, K] and `u` [B, T, H, V] (`recompute_w_u_fwd`), the states `h`
               [B, NT, H, K, V] and the pseudo-values `v_new` [B, T, H, V] in the input dtype
               (`chunk_gated_delta_rule_fwd_h`).
      "mamba2" (scalar decay, SSD) the Mamba-2 authors' kernels, mamba_ssm `ops/triton/ssd_combined.py`,
               `_mamba_chunk_scan_combined_fwd` (what flash-linear-attention's Mamba2 layer calls): `dA_cumsum` and
               the processed `dt` [B, H, NT, BT] float32 each (`_chunk_cumsum_fwd`), the chunk states
               [B, NT, H, P, N] float32 (`_chunk_state_fwd(..., states_in_fp32=True)`), the passed states
               [B, NT, H, P, N] in the input dtype (`_state_passing_fwd`), the scores `CB` [B, NT, G, BT, BT]
               float32 (`_bmm_chunk_fwd`) with G = H groups (B and C per head, as a spec writes them). Here K = N
               (the state's key axis) and V = P.
    Raises ValueError for another kind."""
    BT, NT = _chunk(T, chunk)
    states = B * NT * H * K * V
    if kind == "gla":
        return {"g_cumsum": 4 * B * T * H * K, "h": elt * states, "A": 4 * B * T * H * BT}
    if kind == "gated_delta":
        return {"g_cumsum": 4 * B * T * H, "A_kkt": 4 * B * T * H * BT, "A_inv": elt * B * T * H * BT,
                "w": elt * B * T * H * K, "u": elt * B * T * H * V, "h": elt * states, "v_new": elt * B * T * H * V}
    if kind == "mamba2":
        return {"dA_cumsum": 4 * B * H * NT * BT, "dt": 4 * B * H * NT * BT, "states": 4 * states,
                "states_passed": elt * states, "CB": 4 * B * NT * H * BT * BT}
    raise ValueError(f"unknown kind {kind!r}; choose from gla, gated_delta, mamba2")


def hand_written_backward_bytes(kind: str, *, B: int, T: int, H: int, K: int, V: int, chunk: int = 64,
                                elt: int = 4) -> dict[str, int]:
    """{buffer: bytes} the published chunked backward allocates for one call besides the gradients it hands back
    (the same kinds and conventions as `hand_written_bytes`; buffers it recomputes count again). A gradient kept in
    float32 for an input of another dtype counts (its cast is what is handed back); `elt` 4 is float32 inputs.

    kind:
      "gla"    flash-linear-attention `fla/ops/gla/chunk.py`, `ChunkGLAFunction.backward` -> `chunk_gla_bwd`: the
               states recomputed `h` [B, NT, H, K, V] float32 (`chunk_fwd_h(..., states_in_fp32=True)`), their
               gradients `dh` [B, NT, H, K, V] float32 (`chunk_bwd_dh(..., states_in_fp32=True)`), the scores' gradient
               `dA` [B, T, H, BT] float32 (`chunk_gla_bwd_dA`), the intra-chunk dq, dk [B, T, H, K] float32 each
               (`chunk_gla_bwd_dqk_intra`), and for inputs not in float32 the cumsum `g_cumsum` recomputed (its
               forward keeps it only for float32 g) and the float32 dq, dk, dg that `chunk_gla_bwd_dqkg` returns
               (cast to the input dtype on the way out). dv (`chunk_gla_bwd_dv`, like do) is the gradient.
      "gated_delta" flash-linear-attention `fla/ops/gated_delta_rule/chunk.py`, `chunk_gated_delta_rule_bwd`: W and U
               recomputed (`recompute_w_u_fwd`, [B, T, H, K] and [B, T, H, V] in the input dtype), h and v_new
               recomputed (`chunk_gated_delta_rule_fwd_h`: [B, NT, H, K, V] and [B, T, H, V], input dtype), the local
               dv (`chunk_bwd_dv_local`, [B, T, H, V]), dh [B, NT, H, K, V] and the updated dv
               (`chunk_gated_delta_rule_bwd_dhu`, input dtype), dw [B, T, H, K] and the per-key-block dg
               [NK, B, T, H] float32 with its sum (`chunk_bwd_dqkwg`, NK = K / 128 on sm_90), and from
               `prepare_wy_repr_bwd` dk2 [B, T, H, K] (added into dk) and dg2 [B, T, H] float32; for inputs not in
               float32, the reverse cumsum of dg [B, T, H] float32 before its cast. dq, dk, dv, dbeta: gradients.
      "mamba2" mamba_ssm `ops/triton/ssd_combined.py`, `_mamba_chunk_scan_combined_bwd` (fla's Mamba2 layer calls
               it): dt's copy `dt_in` [B, T, H] (dt's dtype), `dA_cumsum` and `dt` again [B, H, NT, BT] float32
               (`_chunk_cumsum_fwd`), `CB` [B, NT, H, BT, BT] float32 (`_bmm_chunk_fwd`), the chunk states and the
               passed states [B, NT, H, P, N] float32 (`_chunk_state_fwd(..., states_in_fp32=True)`,
               `_state_passing_fwd`), `dstates` [B, NT, H, P, N] float32 (`_chunk_scan_bwd_dstates`), then the passed
               dstates and states in the input dtype (`_state_passing_bwd(..., dstates_dtype=x.dtype,
               states_dtype=x.dtype)`), `ddt` [B, H, NT, BT] float32 (`_chunk_scan_chunk_state_bwd_dx`), `dB`
               [B, T, H, N] float32 with `ddA_next` (`_chunk_state_bwd_db`), `dC` [B, T, H, N] float32 with
               `ddA_cumsum_prev` (`_chunk_scan_bwd_dC`), `dCB` [B, NT, H, BT, BT] float32 (`_chunk_scan_bwd_dcb`),
               the reverse cumsum of ddA_cumsum_prev (flip, cumsum, flip) and `ddA` (`_chunk_scan_bwd_ddAcs_stable`),
               each [B, H, NT, BT] float32. G = H groups, K = N, V = P as in `hand_written_bytes`.
    Raises ValueError for another kind."""
    BT, NT = _chunk(T, chunk)
    states = B * NT * H * K * V
    steps = B * T * H
    half = elt != 4  # a float32 gradient is then not the one handed back
    if kind == "gla":
        out = {"h": 4 * states, "dh": 4 * states, "dA": 4 * steps * BT, "dq_dk_intra": 8 * steps * K}
        if half:
            out.update(g_cumsum=4 * steps * K, dq_dk_dg_float32=12 * steps * K)
        return out
    if kind == "gated_delta":
        NK = -(-K // 128)
        out = {"w": elt * steps * K, "u": elt * steps * V, "h": elt * states, "v_new": elt * steps * V,
               "dv_local": elt * steps * V, "dh": elt * states, "dv_dhu": elt * steps * V, "dw": elt * steps * K,
               "dg_blocks": 4 * NK * steps + 4 * steps, "dk_wy": elt * steps * K, "dg_wy": 4 * steps}
        if half:
            out["dg_cumsum"] = 4 * steps
        return out
    if kind == "mamba2":
        Q = B * H * NT * BT  # one float32 [B, H, NT, BT] buffer
        return {"dt_in": elt * steps, "dA_cumsum": 4 * Q, "dt": 4 * Q, "CB": 4 * B * NT * H * BT * BT,
                "states": 4 * states, "states_passed": 4 * states, "dstates": 4 * states,
                "dstates_passed": elt * states, "states_cast": elt * states, "ddt": 4 * Q, "dB": 4 * steps * K,
                "ddA_next": 4 * Q, "dC": 4 * steps * K, "ddA_cumsum_prev": 4 * Q, "dCB": 4 * B * NT * H * BT * BT,
                "ddA_prev": 3 * 4 * Q, "ddA": 4 * Q}
    raise ValueError(f"unknown kind {kind!r}; choose from gla, gated_delta, mamba2")


# Which published kernels a spec of `specs/` compares with (by name).
HAND_WRITTEN = {"gla": "gla", "gated_delta_net": "gated_delta", "mamba2": "mamba2"}


def hand_written_for(name: str, sizes: dict[str, int], B: int, T: int, H: int, *, chunk: int = 64,
                     dtype: torch.dtype = torch.float32, backward: bool = False) -> dict | None:
    """{"kind", "total", "buffers"} of the hand-written figure for the spec called `name` at this call's shape,
    or None when no published kernel is compared with it. sizes: the spec's sizes (K, V; mamba2's N, P).
    backward: the figure of a forward and backward call (a training step): "total" is the sum of the forward's
    and the backward's buffers, "forward" and "backward" each one's, "buffers" the forward's and
    "backward_buffers" the backward's (`hand_written_backward_bytes`)."""
    kind = HAND_WRITTEN.get(name)
    if kind is None:
        return None
    K, V = (sizes["N"], sizes["P"]) if kind == "mamba2" else (sizes["K"], sizes["V"])
    elt = torch.empty((), dtype=dtype).element_size()
    buffers = hand_written_bytes(kind, B=B, T=T, H=H, K=K, V=V, chunk=chunk, elt=elt)
    out = {"kind": kind, "total": sum(buffers.values()), "buffers": buffers}
    if backward:
        back = hand_written_backward_bytes(kind, B=B, T=T, H=H, K=K, V=V, chunk=chunk, elt=elt)
        out.update(forward=out["total"], backward=sum(back.values()), backward_buffers=back)
        out["total"] = out["forward"] + out["backward"]
    return out


def format_rows(report: IntermediateReport, indent: str = "  ", limit: int = 12) -> str:
    """The report's sites as text lines, largest first. A site of several tensors shows the first one's dtype and
    shape (`first [..]`): the others' may differ, and the row's bytes are their sum."""
    lines = [f"{indent}{r.bytes:>12,d} B  x{r.count:<3d} {r.dtype:<8s} {'first ' if r.count > 1 else ''}"
             f"{list(r.shape)}  {r.where}" for r in report.rows[:limit]]
    if len(report.rows) > limit:
        rest = sum(r.bytes for r in report.rows[limit:])
        lines.append(f"{indent}{rest:>12,d} B  in {len(report.rows) - limit} more sites")
    return "\n".join(lines)


__all__ = ["HAND_WRITTEN", "IntermediateReport", "Site", "format_rows", "hand_written_backward_bytes",
           "hand_written_bytes", "hand_written_for", "measure", "measure_call"]
