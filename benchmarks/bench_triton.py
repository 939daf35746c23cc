"""Triton forms against the torch forms and flash-linear-attention, on a GPU (forward, and forward + backward).

    python benchmarks/bench_triton.py                      # H100/H200: B=4, T=4096, H=16, K=V=128, bfloat16
    python benchmarks/bench_triton.py --smoke              # tiny shapes; runs on CPU under TRITON_INTERPRET=1

For GLA, RetNet (retention), DeltaNet and gated DeltaNet from `specs/`, in one run: our Triton chunked form,
our Triton recurrent form, our torch chunked form, and fla's chunk kernel for the same layer when
`fla` imports (flash-linear-attention / fla-core; on the device machine carry their wheels). Every path's
output is compared with fla's (or with our torch chunked form when fla is absent), so a fast wrong kernel
shows. Times are medians from `triton.testing.do_bench` on a GPU, of a few `perf_counter` runs in smoke
mode. Prints a table and writes JSON (device, versions, date, shapes, milliseconds, ratios) to `--out`.
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

from codegen.layer import interpreting  # noqa: E402

# Each case: our spec, the fla function (module, name) and how our arguments map onto it.
CASES = {
    "gla": ("gla.rec", ("fla.ops.gla", "chunk_gla"),
            lambda a, scale: dict(q=a[0], k=a[1], v=a[2], g=a[3], scale=scale)),
    "retention": ("retention.rec", ("fla.ops.retention", "chunk_retention"),
                  lambda a, scale: dict(q=a[0], k=a[1], v=a[2], scale=scale)),
    "delta_net": ("delta_net.rec", ("fla.ops.delta_rule", "chunk_delta_rule"),
                  lambda a, scale: dict(q=a[0], k=a[1], v=a[2], beta=a[3], scale=scale)),
    "gated_delta_net": ("gated_delta_net.rec", ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
                        lambda a, scale: dict(q=a[0], k=a[1], v=a[2], g=a[3], beta=a[4], scale=scale)),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "fla"):
        try:
            found[name] = getattr(__import__(name), "__version__", "unknown")
        except Exception as err:  # noqa: BLE001 - a missing or broken package is recorded, not fatal
            found[name] = f"not available ({type(err).__name__})"
    return found


def fla_function(module: str, name: str):
    try:
        return getattr(__import__(module, fromlist=[name]), name), None
    except Exception as err:  # noqa: BLE001
        return None, f"{type(err).__name__}: {err}"


def timer(smoke: bool):
    if smoke:
        def run(fn) -> float:
            fn()
            samples = []
            for _ in range(3):
                start = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - start) * 1e3)
            return statistics.median(samples)
        return run
    from triton.testing import do_bench

    return lambda fn: float(do_bench(fn, warmup=25, rep=100))


def arguments(rec, sizes, B, T, H, dtype, device, seed=0):
    from recurrence_dsl.sampling import sample_arguments

    args, _ = sample_arguments(rec.checked, sizes, B, T, H, dtype=torch.float64, seed=seed)
    if rec.name == "retention":  # RetNet's per-head decays, as fla's chunk_retention fixes them
        args[3] = 1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float64))
    return [a.to(device=device, dtype=dtype if a.dim() > 1 else torch.float32) for a in args]


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def bench_case(name: str, shape: dict, dtype, device, measure, chunk_size: int) -> dict:
    import recurrence_dsl

    spec, (fla_module, fla_name), fla_args = CASES[name]
    rec = recurrence_dsl.load(ROOT / "specs" / spec)[name]
    B, T, H, K = shape["B"], shape["T"], shape["H"], shape["K"]
    sizes = {"K": K, "V": K}
    args = arguments(rec, sizes, B, T, H, dtype, device)
    triton_layer = recurrence_dsl.compile(rec, backend="triton", chunk_size=chunk_size, tuning=False)
    torch_layer = recurrence_dsl.compile(rec, backend="torch", chunk_size=chunk_size, tuning=False)
    paths = {
        "ours triton chunked": lambda *a: triton_layer(*a, form="chunked")[0],
        "ours triton recurrent": lambda *a: triton_layer(*a, form="recurrent")[0],
        "ours torch chunked": lambda *a: torch_layer(*a, form="chunked")[0],
    }
    fla_fn, fla_missing = fla_function(fla_module, fla_name)
    if fla_fn is not None:
        paths[f"fla {fla_name}"] = lambda *a: fla_fn(**fla_args(list(a), K ** -0.5))[0]
    result = {"spec": spec, "shape": {**shape, "V": K}, "chunk_size": chunk_size, "paths": {},
              "fla": f"{fla_module}.{fla_name}" if fla_fn is not None else f"unavailable: {fla_missing}"}
    outputs = {}
    for path, fn in list(paths.items()):
        try:
            with torch.no_grad():
                outputs[path] = fn(*args)
        except Exception as err:  # noqa: BLE001 - a path that fails is reported in the table, the rest still run
            result["paths"][path] = {"error": f"{type(err).__name__}: {err}"[:500]}
            del paths[path]
    baseline = f"fla {fla_name}" if f"fla {fla_name}" in outputs else "ours torch chunked"
    for path, fn in paths.items():
        entry = {"rel_error_vs_" + baseline.replace(" ", "_"): rel(outputs[path], outputs[baseline])}
        with torch.no_grad():
            entry["forward_ms"] = measure(lambda fn=fn: fn(*args))
        grads = [a.detach().clone().requires_grad_(a.dim() > 1) for a in args]
        out = fn(*grads)
        seed_grad = torch.randn_like(out)

        def forward_backward(fn=fn, grads=grads, seed_grad=seed_grad):
            for g in grads:
                g.grad = None
            fn(*grads).backward(seed_grad)

        entry["forward_backward_ms"] = measure(forward_backward)
        result["paths"][path] = entry
    reference = result["paths"].get(f"fla {fla_name}")
    if reference is not None and "error" not in reference:
        ours = result["paths"]["ours triton chunked"]
        result["fla_over_ours_forward"] = reference["forward_ms"] / ours["forward_ms"]
        result["fla_over_ours_forward_backward"] = reference["forward_backward_ms"] / ours["forward_backward_ms"]
    return result


def write_report(report: dict, out: Path) -> None:
    out.write_text(json.dumps(report, indent=2, default=lambda x: x if math.isfinite(x) else str(x)) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU under TRITON_INTERPRET=1 works)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    parser.add_argument("--shape", default=None, help="B=4,T=4096,H=16,K=128 (V = K)")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "triton_gpu.json")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        parser.error("no GPU: pass --smoke (tiny shapes in Triton's interpreter) or run on a GPU machine")
    if not cuda and not interpreting():  # Triton's own reading: "false" or "off" is off, as "0" is
        parser.error("on CPU the Triton kernels need TRITON_INTERPRET=1 set before Python starts")
    shape = dict(B=1, T=48, H=2, K=16) if args.smoke else dict(B=4, T=4096, H=16, K=128)
    if args.shape:
        shape.update({k: int(v) for k, v in (part.split("=") for part in args.shape.split(","))})
    dtype_name = args.dtype or ("float32" if not cuda else "bfloat16")
    unknown = set(args.cases.split(",")) - set(CASES)
    if unknown:
        parser.error(f"unknown case(s) {sorted(unknown)}; choose from {', '.join(CASES)}")
    device = "cuda" if cuda else "cpu"
    measure = timer(args.smoke or not cuda)
    report = {
        "benchmark": "bench_triton.py",
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()}), "
                                                              "Triton interpreter",
        "versions": versions(),
        "dtype": dtype_name,
        "smoke": args.smoke,
        "cases": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.cases.split(","):
        report["cases"][name] = bench_case(name, shape, DTYPES[dtype_name], device, measure, args.chunk_size)
        write_report(report, args.out)  # after every case, so a run stopped at its time limit keeps what it measured
        print(f"measured {name}", flush=True)
    print(f"{report['device']}; {dtype_name}; B={shape['B']} T={shape['T']} H={shape['H']} K=V={shape['K']}")
    print(f"{'case':<16} {'path':<34} {'fwd ms':>9} {'fwd+bwd ms':>11} {'rel. error':>11}")
    for name, case in report["cases"].items():
        for path, entry in case["paths"].items():
            if "error" in entry:
                print(f"{name:<16} {path:<34} failed: {entry['error'][:80]}")
                continue
            error = next(v for k, v in entry.items() if k.startswith("rel_error"))
            both = entry["forward_backward_ms"]
            print(f"{name:<16} {path:<34} {entry['forward_ms']:>9.3f} {'-' if both is None else f'{both:.3f}':>11} "
                  f"{error:>11.2e}")
        if "fla_over_ours_forward" in case:  # ratios > 1: ours is faster
            print(f"{name:<16} fla time / ours (triton chunked): forward {case['fla_over_ours_forward']:.2f}x, "
                  f"forward+backward {case['fla_over_ours_forward_backward']:.2f}x")
        else:
            print(f"{name:<16} fla: {case['fla']}")
    write_report(report, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
