"""Our Triton forms against flash-linear-attention and SDPA on a GPU: forward and forward + backward, with a roofline.

    python benchmarks/bench_triton.py                      # fla's benchmark shapes, bfloat16 (H100 / H200)
    python benchmarks/bench_triton.py --budget 400         # stop starting cells after 400 s; the JSON keeps the rest
    python benchmarks/bench_triton.py --smoke              # tiny shapes; runs on CPU under TRITON_INTERPRET=1

For GLA, RetNet (retention, fla's simple GLA with fixed per-head decays), DeltaNet and gated DeltaNet from
`specs/`, at each shape (B, T, H, K = V; default fla's (1, 8192, 96, 128), (4, 4096, 16, 128), (8, 1024, 8, 64)):

    ours_chunked        our Triton chunked form            fla_chunk            fla's chunk_* kernel
    ours_recurrent      our Triton recurrent form          fla_fused_recurrent  fla's fused_recurrent_* kernel
    ours_torch_chunked  our torch chunked form (only when fla is absent, as the reference, or with --paths)
    sdpa                torch's causal scaled_dot_product_attention at the same B, T, H and head dim: the
                        quadratic baseline, once per shape

Every cell (a path, a layer, a shape, forward or forward + backward) gets milliseconds (median of
`triton.testing.do_bench`, or of a few wall-clock runs when one call is too slow for the cell's budget), the time
of its first call (compiles and fla's autotuning included), the relative error of its output and input gradients
against fla's chunk kernel (or our torch chunked form when fla is absent), and a roofline: the bytes the call must
move and the FLOPs of the chunked algorithm (`call_bytes`, `chunked_flops`) over the measured time, against the
device's peak (`PEAKS`). fla missing or failing leaves its cells empty with the reason. The core cells (fla's and
our chunk kernels, SDPA) of every shape run before the recurrent ones, so a run cut short by `--budget` still has
the table issue 10's target stands beside. The JSON (device, versions, date, shapes, ms, ratios, roofline) is
rewritten after every cell.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.timing import results_path  # noqa: E402
from codegen.layer import interpreting  # noqa: E402

# Each layer: our spec, fla's module, its chunk and fused-recurrent functions, and how our arguments (declared
# order: q, k, v, then g / beta / gamma) map onto each, and which chunked algorithm's FLOPs it does.
CASES = {
    "gla": dict(spec="gla.rec", module="fla.ops.gla", chunk="chunk_gla", recurrent="fused_recurrent_gla",
                chunk_args=lambda a: dict(q=a[0], k=a[1], v=a[2], g=a[3]),
                recurrent_args=lambda a: dict(q=a[0], k=a[1], v=a[2], gk=a[3]), algorithm="linear"),
    "retention": dict(spec="retention.rec", module="fla.ops.retention", chunk="chunk_retention",
                      recurrent="fused_recurrent_retention",
                      chunk_args=lambda a: dict(q=a[0], k=a[1], v=a[2]),
                      recurrent_args=lambda a: dict(q=a[0], k=a[1], v=a[2]), algorithm="linear"),
    "delta_net": dict(spec="delta_net.rec", module="fla.ops.delta_rule", chunk="chunk_delta_rule",
                      recurrent="fused_recurrent_delta_rule",
                      chunk_args=lambda a: dict(q=a[0], k=a[1], v=a[2], beta=a[3]),
                      recurrent_args=lambda a: dict(q=a[0], k=a[1], v=a[2], beta=a[3]), algorithm="delta"),
    "gated_delta_net": dict(spec="gated_delta_net.rec", module="fla.ops.gated_delta_rule",
                            chunk="chunk_gated_delta_rule", recurrent="fused_recurrent_gated_delta_rule",
                            chunk_args=lambda a: dict(q=a[0], k=a[1], v=a[2], g=a[3], beta=a[4]),
                            recurrent_args=lambda a: dict(q=a[0], k=a[1], v=a[2], g=a[3], beta=a[4]),
                            algorithm="delta"),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FLA_SHAPES = "4x4096x16x128,1x8192x96x128,8x1024x8x64"  # fla's benchmark shapes, the T >= 2048 ones first
SMOKE_SHAPES = "1x48x2x16"
CORE_PATHS = ("fla_chunk", "ours_torch_chunked", "ours_chunked", "sdpa")  # pass 1, in this order
RECURRENT_PATHS = ("fla_fused_recurrent", "ours_recurrent")  # pass 2
ALL_PATHS = CORE_PATHS + RECURRENT_PATHS
REFERENCES = ("fla_chunk", "ours_torch_chunked", "ours_chunked")  # the first that ran is what the others match
TARGET = {"fla_over_ours_forward_backward_at_least": 0.9, "from_T": 2048}  # issue 10's target

# Datasheet peaks, keyed by a substring of torch.cuda.get_device_name(): HBM bytes/s, and dense tensor-core
# FLOP/s per dtype (float32: TF32, which tl.dot uses for float32 by default). The first key found in the name wins.
PEAKS = {
    "H200": {"bandwidth": 4.8e12, "flops": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12}},
    "H100": {"bandwidth": 3.35e12, "flops": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12}},
    "A100": {"bandwidth": 2.039e12, "flops": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12}},
}


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "fla"):
        try:
            found[name] = getattr(__import__(name), "__version__", "unknown")
        except Exception as err:  # noqa: BLE001 - a missing or broken package is recorded, not fatal
            found[name] = f"not available ({type(err).__name__})"
    return found


def fla_function(module: str, name: str):
    """(fla's function, None), or (None, why it is missing)."""
    try:
        return getattr(__import__(module, fromlist=[name]), name), None
    except Exception as err:  # noqa: BLE001
        return None, f"{type(err).__name__}: {err}"[:300]


def parse_shapes(text: str) -> list[dict]:
    """'4x4096x16x128,8x1024x8x64' -> [{B, T, H, K, V}] (V = K). ValueError naming the bad part."""
    shapes = []
    for part in text.split(","):
        try:
            B, T, H, K = (int(x) for x in part.strip().split("x"))
        except ValueError:
            raise ValueError(f"--shapes: {part!r} is not BxTxHxK (four integers, e.g. 4x4096x16x128)") from None
        if min(B, T, H, K) < 1:
            raise ValueError(f"--shapes: {part!r} has a size below 1")
        shapes.append(dict(B=B, T=T, H=H, K=K, V=K))
    return shapes


def shape_key(shape: dict) -> str:
    return f"B{shape['B']}_T{shape['T']}_H{shape['H']}_K{shape['K']}"


# -- the roofline ---------------------------------------------------------------------------------------------


def chunked_flops(algorithm: str, B: int, T: int, H: int, K: int, V: int, chunk: int) -> float:
    """FLOPs of one forward of the chunked algorithm that keeps the state at each chunk's start (matmuls only,
    a causal block counted whole, as tl.dot computes it), per head and step:

        linear: 2C(K + V)  intra-chunk scores q k^T and their product with v
              + 4KV        the readout q S and the state update k^T v
        delta:  linear + 4CK + 2CV + 2KV + C^2/3
                           beta k k^T, the WY factors w = A k and u = A v, v - w S, the triangular solve for A
    """
    C = chunk
    per_step = 2 * C * (K + V) + 4 * K * V
    if algorithm == "delta":
        per_step += 4 * C * K + 2 * C * V + 2 * K * V + C * C / 3
    elif algorithm != "linear":
        raise ValueError(f"algorithm must be 'linear' or 'delta', got {algorithm!r}")
    return float(B * H * T * per_step)


def attention_flops(B: int, T: int, H: int, D: int) -> float:
    """FLOPs of one causal attention forward: q k^T and p v, 2 T^2 D each, half of them under the mask."""
    return float(2 * B * H * T * T * D)


# Forward + backward FLOPs over forward FLOPs: every matmul's two gradient products (chunked forms); the flash
# attention convention (2.5x the forward for the backward) for SDPA.
BACKWARD_FACTOR = {"chunked": 3.0, "attention": 3.5}


def call_bytes(inputs: list[torch.Tensor], output: torch.Tensor, backward: bool) -> int:
    """Bytes a call must move at least: its inputs read and its output written (forward); forward + backward
    as two calls adds the inputs and the output's gradient read again and the inputs' gradients written."""
    read = sum(t.numel() * t.element_size() for t in inputs)
    written = output.numel() * output.element_size()
    if not backward:
        return read + written
    grads = sum(t.numel() * t.element_size() for t in inputs if t.is_floating_point() and t.dim() > 1)
    return 2 * (read + written) + grads


def roofline(nbytes: float, flops: float, ms: float, peaks: dict | None, dtype: str) -> dict:
    """Achieved GB/s and TFLOP/s of a call moving `nbytes` and doing `flops` in `ms`; with `peaks` (a `PEAKS`
    entry) also each as a fraction of the peak, and `of_roofline`: the roofline's time (bytes over peak bandwidth
    or FLOPs over peak FLOP/s, whichever is longer) over the measured time, 1.0 at the roofline."""
    seconds = ms / 1e3
    out = {"bytes": int(nbytes), "flops": flops, "GB_per_s": nbytes / seconds / 1e9,
           "TFLOP_per_s": flops / seconds / 1e12}
    if peaks:
        peak_flops = peaks["flops"].get(dtype)
        out["of_peak_bandwidth"] = nbytes / seconds / peaks["bandwidth"]
        if peak_flops:
            out["of_peak_flops"] = flops / seconds / peak_flops
            out["of_roofline"] = max(nbytes / peaks["bandwidth"], flops / peak_flops) / seconds
    return out


def device_peaks(name: str, dtype: str, bandwidth: float | None, tflops: float | None) -> dict | None:
    """The `PEAKS` entry whose key is in the device's name, with the command line's values over it; None when
    neither says (a CPU run, an unknown GPU without --peak-gbps/--peak-tflops)."""
    found = next((dict(v, source=f"datasheet ({k})") for k, v in PEAKS.items() if k in name), None)
    if bandwidth is None and tflops is None:
        return found
    found = found or {"bandwidth": None, "flops": {}, "source": ""}
    if bandwidth is not None:
        found["bandwidth"] = bandwidth * 1e9
    if tflops is not None:
        found["flops"] = {**found["flops"], dtype: tflops * 1e12}
    found["source"] = "command line" + (f" over {found['source']}" if found["source"] else "")
    return found if found["bandwidth"] else None


def cell_outcome(cell: dict) -> str:
    """How a path's cells went, for the progress log: "skipped: why" (the path could not run, fla missing say),
    "failed" where a direction raised, else "measured"."""
    if "skipped" in cell:
        return f"skipped ({cell['skipped'][:80]}):"
    runs = [cell.get(d, {}) for d in ("forward", "forward_backward")]
    if any("error" in r for r in runs):
        return "failed (see the JSON):"
    if all("skipped" in r for r in runs):
        return "skipped (overall budget spent):"
    return "measured"


def measured_ceilings(measure_ms) -> dict:
    """What this GPU does today: a 1 GiB device copy (bytes read + written) and an 8192^3 bf16 matmul."""
    x = torch.empty(2**29, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    copy_ms = measure_ms(lambda: y.copy_(x))
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn_like(a)
    mm_ms = measure_ms(lambda: a @ b)
    return {"copy_GB_per_s": 2 * 2**30 / (copy_ms / 1e3) / 1e9,
            "bf16_matmul_TFLOP_per_s": 2 * 8192**3 / (mm_ms / 1e3) / 1e12}


# -- timing ---------------------------------------------------------------------------------------------------


class Budget:
    """The run's overall deadline (`total_s`, None: none) and each cell's measuring time (`cell_s`)."""

    def __init__(self, total_s: float | None, cell_s: float):
        self.start, self.total_s, self.cell_s = time.monotonic(), total_s, cell_s

    def left(self) -> float:
        return math.inf if self.total_s is None else self.total_s - (time.monotonic() - self.start)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def wall_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    synchronize()
    return (time.perf_counter() - start) * 1e3


def measure(fn, cell_s: float, smoke: bool, grad_to_none=None) -> dict:
    """Time `fn`: a first call (compiles, autotunes), a probe call, then `do_bench`'s median when twenty probe
    times fit in what is left of `cell_s`, else the median of as many wall-clock calls as fit (at least the
    probe). Returns {"ms", "first_call_s", "method", "samples"}."""
    start = time.monotonic()
    first_s = wall_ms(fn) / 1e3
    probe = wall_ms(fn)
    left_ms = (cell_s - (time.monotonic() - start)) * 1e3
    if not smoke and probe * 20 < left_ms:
        from triton.testing import do_bench

        rep = min(100.0, left_ms / 4)
        ms = float(do_bench(fn, warmup=min(25.0, rep / 4), rep=rep, grad_to_none=grad_to_none,
                            return_mode="median"))
        return {"ms": ms, "first_call_s": first_s, "method": "do_bench"}
    samples = [probe] + [wall_ms(fn) for _ in range(min(2, int(left_ms // max(probe, 1e-3))))]
    return {"ms": statistics.median(samples), "first_call_s": first_s, "method": "wall clock",
            "samples": len(samples)}


# -- one layer at one shape -----------------------------------------------------------------------------------


def arguments(rec, shape, dtype, device, seed=0):
    from recurrence_dsl.sampling import sample_arguments

    B, T, H = shape["B"], shape["T"], shape["H"]
    args, _ = sample_arguments(rec.checked, {"K": shape["K"], "V": shape["V"]}, B, T, H, dtype=torch.float64,
                               seed=seed, device=device)  # drawn where they run: seconds less per layer on a GPU
    if rec.name == "retention":  # RetNet's per-head decays, as fla's chunk_retention fixes them
        args[3] = 1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float64))
    return [a.to(device=device, dtype=dtype if a.dim() > 1 else torch.float32) for a in args]


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


class Group:
    """One layer at one shape: its inputs (drawn once, kept on the device), its callables per path, the
    reference output and gradients, and the JSON entry its cells fill."""

    def __init__(self, name: str, shape: dict, dtype, device, chunk_size: int):
        import recurrence_dsl

        case = CASES[name]
        self.name, self.shape, self.case = name, shape, case
        rec = recurrence_dsl.load(ROOT / "specs" / case["spec"])[name]
        self.args = arguments(rec, shape, dtype, device)
        self.reference = {"path": None, "output": None, "grads": None}  # see _check
        self._seed_grad = None
        self.entry = {"layer": name, "spec": case["spec"], "shape": shape, "chunk_size": chunk_size, "paths": {}}
        self.fns, self.missing = {}, {}
        triton_layer = recurrence_dsl.compile(rec, backend="triton", chunk_size=chunk_size, tuning=False)
        self.fns["ours_chunked"] = lambda *a: triton_layer(*a, form="chunked")[0]
        self.fns["ours_recurrent"] = lambda *a: triton_layer(*a, form="recurrent")[0]
        torch_layer = recurrence_dsl.compile(rec, backend="torch", chunk_size=chunk_size, tuning=False)
        self.fns["ours_torch_chunked"] = lambda *a: torch_layer(*a, form="chunked")[0]
        scale = shape["K"] ** -0.5
        for path, key, mapper in (("fla_chunk", "chunk", "chunk_args"),
                                  ("fla_fused_recurrent", "recurrent", "recurrent_args")):
            fn, why = fla_function(case["module"], case[key])
            self.entry.setdefault("fla", {})[path] = f"{case['module']}.{case[key]}"
            if fn is None:
                self.missing[path] = f"fla unavailable: {why}"
            else:
                self.fns[path] = lambda *a, fn=fn, mapper=case[mapper]: fn(**mapper(list(a)), scale=scale)[0]

    def seed_grad(self, output: torch.Tensor) -> torch.Tensor:
        """The output gradient every path's backward gets (one draw per group, so gradients compare)."""
        if self._seed_grad is None:
            gen = torch.Generator(device=output.device).manual_seed(1)
            self._seed_grad = torch.randn(output.shape, generator=gen, device=output.device).to(output.dtype)
        return self._seed_grad

    def flops(self) -> float:
        s = self.shape
        return chunked_flops(self.case["algorithm"], s["B"], s["T"], s["H"], s["K"], s["V"],
                             self.entry["chunk_size"])

    def run_path(self, path: str, budget: Budget, smoke: bool, peaks, dtype_name: str, on_cell) -> None:
        """Both cells of `path` (forward, then forward + backward) into self.entry["paths"][path]."""
        cell = self.entry["paths"].setdefault(path, {})
        if path in self.missing:
            cell["skipped"] = self.missing[path]
            return on_cell()
        fn = self.fns[path]
        flops = self.flops()
        for direction in ("forward", "forward_backward"):
            if budget.left() < 5:
                cell[direction] = {"skipped": "overall budget spent"}
                on_cell()
                continue
            cell_s = min(budget.cell_s, budget.left())
            try:
                if direction == "forward":
                    with torch.no_grad():
                        output = fn(*self.args)
                        timing = measure(lambda: fn(*self.args), cell_s, smoke)
                    nbytes, grads = call_bytes(self.args, output, backward=False), None
                    work = flops
                else:
                    leaves = [a.detach().clone().requires_grad_(a.is_floating_point() and a.dim() > 1)
                              for a in self.args]
                    seed_grad = self.seed_grad(fn(*leaves))

                    def forward_backward(fn=fn, leaves=leaves, seed_grad=seed_grad):
                        for leaf in leaves:
                            leaf.grad = None
                        fn(*leaves).backward(seed_grad)

                    timing = measure(forward_backward, cell_s, smoke,
                                     grad_to_none=[x for x in leaves if x.requires_grad])
                    grads = [x.grad for x in leaves if x.requires_grad]
                    nbytes = call_bytes(self.args, seed_grad, backward=True)
                    work = flops * BACKWARD_FACTOR["chunked"]
            except Exception as err:  # noqa: BLE001 - a failing cell is a result; the others still run
                cell[direction] = {"error": f"{type(err).__name__}: {err}"[:500]}
                on_cell()
                continue
            result = {**timing, "roofline": roofline(nbytes, work, timing["ms"], peaks, dtype_name)}
            self._check(path, direction, output if direction == "forward" else None, grads, result)
            cell[direction] = result
            on_cell()
        del self.fns[path]

    def _check(self, path, direction, output, grads, result) -> None:
        """Relative error of the output (forward) or the gradients (forward_backward) against the reference:
        the first path of REFERENCES that ran, which becomes the reference when there is none yet."""
        ref = self.reference
        if path in REFERENCES and ref["path"] in (None, path):
            ref["path"] = path
            ref["output" if direction == "forward" else "grads"] = output if direction == "forward" else grads
            return
        if ref["path"] is None:
            return
        if output is not None and ref["output"] is not None:
            result[f"rel_error_vs_{ref['path']}"] = rel(output, ref["output"])
        if grads is not None and ref["grads"] is not None:
            result[f"grad_rel_error_vs_{ref['path']}"] = max(rel(g, r) for g, r in zip(grads, ref["grads"]))

    def ratios(self) -> None:
        """fla's chunk time over ours (above 1: ours faster), and whether issue 10's target holds."""
        paths = self.entry["paths"]
        ours, fla = paths.get("ours_chunked", {}), paths.get("fla_chunk", {})
        for direction in ("forward", "forward_backward"):
            a, b = ours.get(direction, {}), fla.get(direction, {})
            if "ms" in a and "ms" in b:
                self.entry[f"fla_over_ours_{direction}"] = b["ms"] / a["ms"]
        if "fla_over_ours_forward_backward" in self.entry and self.shape["T"] >= TARGET["from_T"]:
            self.entry["meets_target"] = (self.entry["fla_over_ours_forward_backward"]
                                          >= TARGET["fla_over_ours_forward_backward_at_least"])


def run_sdpa(args, shape, budget: Budget, smoke: bool, peaks, dtype_name: str) -> dict:
    """Causal scaled_dot_product_attention on the layer's q, k, v ([B, T, H, D] as [B, H, T, D] views)."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    q, k, v = (a.transpose(1, 2) for a in args[:3])
    entry = {"callee": "torch.nn.functional.scaled_dot_product_attention(is_causal=True)"}
    flops = attention_flops(shape["B"], shape["T"], shape["H"], shape["K"])
    for direction in ("forward", "forward_backward"):
        if budget.left() < 5:
            entry[direction] = {"skipped": "overall budget spent"}
            continue
        cell_s = min(budget.cell_s, budget.left())
        try:
            if direction == "forward":
                with torch.no_grad():
                    out = sdpa(q, k, v, is_causal=True)
                    timing = measure(lambda: sdpa(q, k, v, is_causal=True), cell_s, smoke)
                nbytes, work = call_bytes([q, k, v], out, backward=False), flops
            else:
                leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
                seed_grad = torch.randn_like(out)

                def forward_backward():
                    for leaf in leaves:
                        leaf.grad = None
                    sdpa(*leaves, is_causal=True).backward(seed_grad)

                timing = measure(forward_backward, cell_s, smoke, grad_to_none=leaves)
                nbytes, work = call_bytes([q, k, v], seed_grad, backward=True), flops * BACKWARD_FACTOR["attention"]
        except Exception as err:  # noqa: BLE001
            entry[direction] = {"error": f"{type(err).__name__}: {err}"[:500]}
            continue
        entry[direction] = {**timing, "roofline": roofline(nbytes, work, timing["ms"], peaks, dtype_name)}
    return entry


# -- the report -----------------------------------------------------------------------------------------------


def finite(value):
    """`value` with every non-finite float as a string ("nan", "inf"), which JSON can hold."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write_report(report: dict, out: Path) -> None:
    out.write_text(json.dumps(finite(report), indent=1, default=str) + "\n")


def print_table(report: dict) -> None:
    print(f"{report['device']}; {report['dtype']}; peaks: {report['peaks']}")
    print(f"{'shape':<22} {'layer':<16} {'path':<20} {'fwd ms':>9} {'fwd+bwd ms':>11} {'rel. error':>10} "
          f"{'roofline':>9}")

    def cells(entry):
        fwd, both = entry.get("forward", {}), entry.get("forward_backward", {})
        ms = [f"{c['ms']:.3f}" if "ms" in c else ("err" if "error" in c else "-") for c in (fwd, both)]
        error = next((v for k, v in fwd.items() if k.startswith("rel_error")), None)
        share = both.get("roofline", {}).get("of_roofline")
        return ms, "-" if error is None else f"{error:.1e}", "-" if share is None else f"{100 * share:.0f}%"

    for case in report["cases"].values():
        for path, entry in case["paths"].items():
            if "skipped" in entry:
                print(f"{shape_key(case['shape']):<22} {case['layer']:<16} {path:<20} {entry['skipped'][:60]}")
                continue
            (fwd, both), error, share = cells(entry)
            print(f"{shape_key(case['shape']):<22} {case['layer']:<16} {path:<20} {fwd:>9} {both:>11} {error:>10} "
                  f"{share:>9}")
        if "fla_over_ours_forward_backward" in case:  # above 1: ours is faster
            print(f"{'':<22} {case['layer']:<16} fla chunk / ours: forward "
                  f"{case.get('fla_over_ours_forward', float('nan')):.2f}x, forward+backward "
                  f"{case['fla_over_ours_forward_backward']:.2f}x" + (
                      "" if "meets_target" not in case else f" (target >= 0.9: {case['meets_target']})"))
    for key, entry in report["sdpa"].items():
        (fwd, both), _, share = cells(entry)
        print(f"{key:<22} {'(attention)':<16} {'sdpa':<20} {fwd:>9} {both:>11} {'-':>10} {share:>9}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU under TRITON_INTERPRET=1 works)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    parser.add_argument("--shapes", default=None, help=f"BxTxHxK,... (V = K); default {FLA_SHAPES}")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--paths", default=None, help="comma-separated: " + ", ".join(ALL_PATHS)
                        + " (default: all but ours_torch_chunked, which runs only when fla is absent)")
    parser.add_argument("--budget", type=float, default=None, help="seconds after which no cell starts")
    parser.add_argument("--cell-budget", type=float, default=20.0, help="seconds of timing per cell (after its "
                        "first call): past it, fewer wall-clock runs instead of do_bench")
    parser.add_argument("--peak-gbps", type=float, default=None, help="peak bandwidth, GB/s (over PEAKS)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s in --dtype (over PEAKS)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the JSON written (default: benchmarks/results/triton_gpu.json; "
                             "--smoke: the temporary folder)")
    args = parser.parse_args(argv)
    args.out = results_path(args.out, args.smoke, "triton_gpu.json")
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        parser.error("no GPU: pass --smoke (tiny shapes in Triton's interpreter) or run on a GPU machine")
    if not cuda and not interpreting():  # Triton's own reading: "false" or "off" is off, as "0" is
        parser.error("on CPU the Triton kernels need TRITON_INTERPRET=1 set before Python starts")
    try:
        shapes = parse_shapes(args.shapes or (SMOKE_SHAPES if args.smoke else FLA_SHAPES))
    except ValueError as err:
        parser.error(str(err))
    cases = args.cases.split(",")
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"--cases: unknown {sorted(unknown)}; choose from {', '.join(CASES)}")
    fla_ok = fla_function(CASES[cases[0]]["module"], CASES[cases[0]]["chunk"])[0] is not None
    paths = args.paths.split(",") if args.paths else [p for p in ALL_PATHS
                                                      if p != "ours_torch_chunked" or not fla_ok]
    unknown = set(paths) - set(ALL_PATHS)
    if unknown:
        parser.error(f"--paths: unknown {sorted(unknown)}; choose from {', '.join(ALL_PATHS)}")
    dtype_name = args.dtype or ("float32" if not cuda else "bfloat16")
    device = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})"
    budget = Budget(args.budget, args.cell_budget)
    peaks = device_peaks(name, dtype_name, args.peak_gbps, args.peak_tflops)
    report = {
        "benchmark": "bench_triton.py",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": name + ("" if cuda else ", Triton interpreter"),
        "versions": versions(),
        "dtype": dtype_name,
        "smoke": args.smoke,
        "shapes": shapes,
        "paths": paths,
        "peaks": None if peaks is None else {"bandwidth_GB_per_s": peaks["bandwidth"] / 1e9,
                                             "TFLOP_per_s": (peaks["flops"].get(dtype_name) or 0) / 1e12,
                                             "source": peaks["source"]},
        "measured": None,
        "budget": {"total_s": args.budget, "cell_s": args.cell_budget},
        "target": TARGET,
        "conventions": {"bytes": call_bytes.__doc__.split(":", 1)[1].strip(),
                        "flops": "chunked algorithm (chunked_flops); forward+backward = 3x forward; "
                                 "SDPA 2*B*H*T^2*D forward, 3.5x for forward+backward",
                        "ratios": "fla_over_ours = fla chunk ms / ours chunked ms (above 1: ours faster)"},
        "cases": {},
        "sdpa": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if cuda:
        try:
            report["measured"] = measured_ceilings(lambda fn: measure(fn, 5.0, False)["ms"])
        except Exception as err:  # noqa: BLE001
            report["measured"] = {"error": f"{type(err).__name__}: {err}"[:300]}
    write_report(report, args.out)

    def on_cell():
        write_report(report, args.out)  # after every cell, so a run stopped at its limit keeps what it measured

    groups = {}
    for passing in (CORE_PATHS, RECURRENT_PATHS):
        for shape in shapes:
            for case in cases:
                key = f"{case}/{shape_key(shape)}"
                todo = [p for p in passing if p in paths]
                if not todo or budget.left() < 5:
                    continue
                if key not in groups:
                    groups[key] = Group(case, shape, DTYPES[dtype_name], device, args.chunk_size)
                    report["cases"][key] = groups[key].entry
                group = groups[key]
                for path in todo:
                    if path == "sdpa":
                        if shape_key(shape) not in report["sdpa"]:
                            report["sdpa"][shape_key(shape)] = run_sdpa(group.args, shape, budget, args.smoke,
                                                                        peaks, dtype_name)
                            on_cell()
                        continue
                    group.run_path(path, budget, args.smoke, peaks, dtype_name, on_cell)
                    group.ratios()
                    left = f" ({budget.left():.0f} s left)" if args.budget else ""
                    print(f"{cell_outcome(group.entry['paths'][path])} {key} {path}{left}", flush=True)
    for case in report["cases"].values():  # cells the budget never reached say so
        for path in paths:
            if path != "sdpa" and path not in case["paths"]:
                case["paths"][path] = {"skipped": "overall budget spent"}
    del groups
    write_report(report, args.out)
    print_table(report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
