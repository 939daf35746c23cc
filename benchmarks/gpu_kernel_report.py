"""Registers, spills and shared memory of every Triton kernel a forward call launches, read on a real GPU, beside
the compile-only figures `recdsl kernels` gives without one.

    python benchmarks/gpu_kernel_report.py --out benchmarks/results/kernels_gpu.json
    python benchmarks/gpu_kernel_report.py --shard 0/4 --out /tmp/k0.json      # every 4th run, from the first
    python benchmarks/gpu_kernel_report.py --merge /tmp/k*.json --out kernels_gpu.json

For every spec in `specs/` (the four issue 10 benchmarks first), at K = V in {64, 128}, bfloat16, B=2, T=256, H=4:
run each Triton form once (forward, default configs), then read what Triton compiled for that GPU from every
kernel's cache: registers per thread, spill bytes, shared memory, num_warps, num_stages. Then the same call through
`codegen.kernel_report.report_call` (the compile-only driver `recdsl kernels` uses, for the GPU's own target, taking
Triton's on-disk cache where it has the kernel) gives its rows; `agree` says whether the two give the same
(kernel, registers, spill bytes) multiset, and `disagree` lists the rows of either that the other lacks. Prints one
row per compiled kernel and writes JSON (device, versions, date) after every run; `--shard I/N` runs every N-th run
so N processes share the work, and `--merge` joins their JSON files into one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def jit_functions() -> dict[str, object]:
    """Every Triton JITFunction reachable from a loaded module, by module.qualified name; a function imported
    into several modules once (its first name), so its kernels are not counted twice."""
    from triton.runtime.jit import JITFunction

    found, seen = {}, set()
    for module_name, module in list(sys.modules.items()):
        if not (module_name.startswith(("recdsl_", "codegen", "recurrence_dsl"))):
            continue
        for attr, value in list(vars(module).items()):
            fn = value
            while fn is not None and not isinstance(fn, JITFunction):
                fn = getattr(fn, "fn", None)
            if fn is not None and id(fn) not in seen:
                seen.add(id(fn))
                found[f"{module_name}.{attr}"] = fn
    return found


def compiled_kernels(fn) -> list[dict]:
    """What Triton compiled `fn` into for the CUDA devices (integer keys; a compile-only block's are strings)."""
    rows = []
    for device, entry in getattr(fn, "device_caches", {}).items():
        if not isinstance(device, int):
            continue
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


BENCHMARKED = ("gla.rec", "retention.rec", "delta_net.rec", "gated_delta_net.rec")  # bench_triton.py's, first


def work_list() -> list[tuple[Path, int]]:
    """(spec file, K = V) pairs in the order runs go: the benchmarked specs first, then the rest by name."""
    paths = sorted((ROOT / "specs").glob("*.rec"), key=lambda p: (p.name not in BENCHMARKED,
                                                                  BENCHMARKED.index(p.name)
                                                                  if p.name in BENCHMARKED else 0, p.name))
    return [(path, size) for path in paths for size in (64, 128)]


def compile_only_rows(layer, drawn, form: str, target: str | None) -> dict:
    """The compile-only report of the same call for `target` (rows as `recdsl kernels --json` gives them)."""
    if target is None:
        return {"compile_only_error": "this GPU's target is not one recdsl kernels compiles for"}
    from codegen import kernel_report

    try:
        rows = kernel_report.report_call(layer, [a.cpu() for a in drawn], target=target, form=form, cached=True)
    except Exception as err:  # noqa: BLE001 - a report that cannot be made is recorded beside the GPU's rows
        return {"compile_only_error": f"{type(err).__name__}: {err}"[:400]}
    return {"compile_only": [k.as_dict() for k in rows]}


def compare(gpu: list[dict], compile_only: list[dict]) -> dict:
    """Whether the GPU's rows and the compile-only rows are the same multiset of (kernel, registers, spill bytes);
    the rows of each the other lacks."""
    ours = Counter((k["kernel"], k["registers"], k["spill_bytes"]) for k in gpu)
    theirs = Counter((k["name"], k["registers"], k["spill_bytes"]) for k in compile_only)
    return {"agree": ours == theirs,
            "disagree": {"gpu_only": [list(x) for x in (ours - theirs).elements()],
                         "compile_only_only": [list(x) for x in (theirs - ours).elements()]}}


def merge(files: list[Path], out: Path) -> int:
    """Join shard reports (one header, every run) into `out`."""
    reports = [json.loads(f.read_text()) for f in files if f.exists() and f.stat().st_size]
    if not reports:
        print(f"no shard report among {[str(f) for f in files]}", file=sys.stderr)
        return 1
    merged = {k: v for k, v in reports[0].items() if k not in ("runs", "shard")}
    merged["shards"] = [r.get("shard") for r in reports]
    merged["runs"] = [run for r in reports for run in r["runs"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=1) + "\n")
    summarize(merged, out)
    return 0


def summarize(report: dict, out: Path) -> None:
    rows = [k for r in report["runs"] for k in r["kernels"]]
    spilling = sum(1 for k in rows if (k["spill_bytes"] or 0) > 0)
    compared = [r for r in report["runs"] if "agree" in r]
    print(f"{len(report['runs'])} runs; {spilling} of {len(rows)} compiled kernels spill; compile-only figures "
          f"agree in {sum(r['agree'] for r in compared)} of {len(compared)} runs compared; wrote {out}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kernels_gpu.json")
    parser.add_argument("--shard", default="0/1", help="I/N: only the runs whose index is I modulo N")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, help="shard reports to join into --out")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    try:
        shard, shards = (int(x) for x in args.shard.split("/"))
        assert 0 <= shard < shards
    except (ValueError, AssertionError):
        parser.error(f"--shard: {args.shard!r} is not I/N with 0 <= I < N")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    import triton

    import recurrence_dsl
    from codegen.kernel_report import TARGETS
    from codegen.triton_recurrent import triton_form_names
    from recurrence_dsl.analysis import analyse
    from recurrence_dsl.sampling import sample_arguments

    major, minor = torch.cuda.get_device_capability()
    target = f"sm_{major}{minor}" if f"sm_{major}{minor}" in TARGETS else None
    report = {"benchmark": "gpu_kernel_report.py", "date": datetime.date.today().isoformat(),
              "device": torch.cuda.get_device_name(), "compile_only_target": target,
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "triton": triton.__version__},
              "shape": {"B": 2, "T": 256, "H": 4}, "dtype": "bfloat16", "shard": args.shard, "runs": []}
    layers = {}
    for index, (path, size) in enumerate(work_list()):
        if index % shards != shard:
            continue
        for name, rec in recurrence_dsl.load(path).items():
            if (path, name) not in layers:
                layers[path, name] = recurrence_dsl.compile(rec, backend="triton", tuning=False)
            layer = layers[path, name]
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
                if "error" not in run:
                    run.update(compile_only_rows(layer, drawn, form, target))
                    if "compile_only" in run:
                        run.update(compare(kernels, run["compile_only"]))
                report["runs"].append(run)
                for k in kernels:
                    print(f"{name:<28} K=V={size:<4} {form:<10} {k['kernel']:<34} regs {k['registers']!s:>4} "
                          f"spill {k['spill_bytes']!s:>6} smem {k['shared_bytes']!s:>7} w{k['num_warps']} "
                          f"s{k['num_stages']}", flush=True)
                if "error" in run:
                    print(f"{name:<28} K=V={size:<4} {form:<10} failed: {run['error'][:120]}", flush=True)
                elif "agree" in run and not run["agree"]:
                    print(f"{name:<28} K=V={size:<4} {form:<10} compile-only differs: {run['disagree']}", flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(report, indent=1) + "\n")
    summarize(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
