"""Registers, spills and shared memory of every Triton kernel a forward call launches, read on a real GPU.

    python benchmarks/gpu_kernel_report.py --out benchmarks/results/kernels_gpu.json

For every spec in `specs/`, at K = V in {64, 128}, bfloat16, B=2, T=256, H=4: run each Triton form once
(forward, default configs), then read what Triton compiled for that GPU from every kernel's cache:
registers per thread, spill bytes, shared memory, num_warps, num_stages. Prints one row per compiled
kernel and writes JSON (device, versions, date). This is the GPU's own answer to the question issue 10's
`recdsl kernels` answers without a GPU; the two can be compared.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def jit_functions() -> dict[str, object]:
    """Every Triton JITFunction reachable from a loaded module, by module.qualified name."""
    from triton.runtime.jit import JITFunction

    found = {}
    for module_name, module in list(sys.modules.items()):
        if not (module_name.startswith(("recdsl_", "codegen", "recurrence_dsl"))):
            continue
        for attr, value in list(vars(module).items()):
            fn = value
            while fn is not None and not isinstance(fn, JITFunction):
                fn = getattr(fn, "fn", None)
            if fn is not None:
                found[f"{module_name}.{attr}"] = fn
    return found


def compiled_kernels(fn) -> list[dict]:
    rows = []
    for entry in getattr(fn, "device_caches", {}).values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        for kernel in cache.values():
            meta = kernel.metadata
            rows.append({
                "registers": getattr(kernel, "n_regs", None),
                # Triton's n_spills is the local memory ptxas reports, in 4-byte words: bytes = 4 * n_spills
                "spill_bytes": None if getattr(kernel, "n_spills", None) is None else 4 * kernel.n_spills,
                "shared_bytes": getattr(meta, "shared", None),
                "num_warps": getattr(meta, "num_warps", None),
                "num_stages": getattr(meta, "num_stages", None),
            })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kernels_gpu.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    import triton

    import recurrence_dsl
    from codegen.triton_recurrent import triton_form_names
    from recurrence_dsl.analysis import analyse
    from recurrence_dsl.sampling import sample_arguments

    report = {"benchmark": "gpu_kernel_report.py", "date": datetime.date.today().isoformat(),
              "device": torch.cuda.get_device_name(),
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "triton": triton.__version__},
              "shape": {"B": 2, "T": 256, "H": 4}, "dtype": "bfloat16", "runs": []}
    for path in sorted((ROOT / "specs").glob("*.rec")):
        for name, rec in recurrence_dsl.load(path).items():
            layer = recurrence_dsl.compile(rec, backend="triton", tuning=False)
            for size in (64, 128):
                sizes = {s: size for s in rec.checked.sizes}
                drawn, _ = sample_arguments(rec.checked, sizes, 2, 256, 4, dtype=torch.float64, seed=0)
                drawn = [a.to("cuda", torch.bfloat16 if a.dim() > 1 else torch.float32) for a in drawn]
                for form in triton_form_names(analyse(rec.checked)):
                    before = {key: len(compiled_kernels(fn)) for key, fn in jit_functions().items()}
                    run = {"spec": path.name, "name": name, "size": size, "form": form}
                    try:
                        with torch.no_grad():
                            layer(*drawn, form=form)
                        torch.cuda.synchronize()
                    except Exception as err:  # noqa: BLE001 - a failing form is a result to report
                        run["error"] = f"{type(err).__name__}: {err}"[:400]
                    kernels = []
                    for key, fn in jit_functions().items():
                        rows = compiled_kernels(fn)
                        for row in rows[before.get(key, 0):]:
                            kernels.append({"kernel": key.split(".")[-1], **row})
                    run["kernels"] = kernels
                    report["runs"].append(run)
                    for k in kernels:
                        print(f"{name:<28} K=V={size:<4} {form:<10} {k['kernel']:<34} regs {k['registers']!s:>4} "
                              f"spill {k['spill_bytes']!s:>6} smem {k['shared_bytes']!s:>7} w{k['num_warps']} "
                              f"s{k['num_stages']}", flush=True)
                    if "error" in run:
                        print(f"{name:<28} K=V={size:<4} {form:<10} failed: {run['error'][:120]}", flush=True)
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(report, indent=1) + "\n")
    spilling = sum(1 for r in report["runs"] for k in r["kernels"] if (k["spill_bytes"] or 0) > 0)
    total = sum(len(r["kernels"]) for r in report["runs"])
    print(f"{spilling} of {total} compiled kernels spill; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
