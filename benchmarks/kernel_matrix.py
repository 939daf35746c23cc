"""Registers, spills and shared memory of every Triton kernel the specs launch, compiled without a GPU.

    nice python benchmarks/kernel_matrix.py [--out benchmarks/results/kernel_matrix.json]
        [--specs gla,delta_net] [--sizes 64,128] [--dtypes bfloat16,float16] [--targets sm_80,sm_90]
        [--forms recurrent,scan,chunked,parallel] [--forward-only] [--compare benchmarks/results/kernels_gpu_h200.json]
        [--cached] [--resume] [--shape B=1,T=16,H=1] [--merge A.json B.json ...]

For every recurrence of every spec in `specs/`, every spec size (K, V, ...) in {64, 128}, bfloat16 and float16
inputs, targets sm_80 and sm_90, and each form of the Triton backend the recurrence has (recurrent, scan, chunked,
parallel): the call at B=2, T=256, H=4 (the shape of benchmarks/gpu_kernel_report.py) with default configs, forward
and backward (outputs summed; --forward-only skips the backward), every kernel it launches compiled for the target by
`codegen.kernel_report` (the compile-only driver: no GPU); each kernel row carries its phase. Prints one row per kernel
and a summary (how many spill, how many need more shared memory than the target has), and writes JSON (date,
versions, every row) after every call, so a stopped run keeps what it did.

--cached: take kernels compiled before from Triton's on-disk cache ($TRITON_CACHE_DIR; the key holds the kernel's
source, target and options, so a hit is the same binary): float16 calls compile the kernels bfloat16 calls did, and
a run after a change to a few kernels compiles only those; such rows carry `cached` and the lookup's seconds.
--resume: keep the calls already in --out that compiled (no error) and run only the others (a stopped run goes on).
--merge: compile nothing; join runs made separately (per spec, or at another --shape) into one table and summary.
--dtypes float32 (not in the default matrix; benchmarks/results/kernel_matrix_float32.json): float32 calls keep
"ieee" dots, which Triton lowers to FMA loops with whole operand rows and columns in registers, so their defaults
are their own: the delta rule's smaller chunks and more warps (codegen/triton_runtime.py `_delta_ieee_defaults`),
the linear chunked form's chunks of 32 (16 with a key decay) and K / V blocks of 32 (`_linear_ieee_defaults`), the
parallel form's blocks of 16 rows (codegen/triton_parallel.py `_PARALLEL_IEEE_BT`).

--compare: a GPU run of benchmarks/gpu_kernel_report.py (registers from the device, `n_spills` = local bytes / 4);
its rows are set beside this run's sm_90 bfloat16 rows of the same spec, size, form and kernel.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.pop("TRITON_INTERPRET", None)  # kernels must compile, not run in Triton's interpreter

import torch  # noqa: E402

import recurrence_dsl  # noqa: E402
from codegen import kernel_report as kr  # noqa: E402

SHAPE = {"B": 2, "T": 256, "H": 4}


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _key(run: dict) -> tuple:
    return tuple(run[k] for k in ("spec", "name", "size", "dtype", "target", "form"))


def compare(rows: list[dict], gpu_path: Path) -> list[dict]:
    """This run's sm_90 bfloat16 kernels beside a GPU run's (same spec, size, form, kernel)."""
    gpu = json.loads(gpu_path.read_text())
    ours = {(r["name"], r["size"], r["form"], k["name"]): k for r in rows
            if r["target"] == "sm_90" and r["dtype"] == "bfloat16" for k in r.get("kernels", [])}
    out = []
    for run in gpu["runs"]:
        for g in run["kernels"]:
            name = g["kernel"]
            mine = ours.get((run["name"], run["size"], run["form"], name)) or next(
                (k for key, k in ours.items() if key[:3] == (run["name"], run["size"], run["form"])
                 and name.endswith(key[3])), None)
            out.append({"name": run["name"], "size": run["size"], "form": run["form"], "kernel": name,
                        "gpu": {"registers": g["registers"], "local_bytes": 4 * g["spill_bytes"],
                                "shared_bytes": g["shared_bytes"]},
                        "compile_only": None if mine is None else {"registers": mine["registers"],
                                                                   "local_bytes": mine["spill_bytes"],
                                                                   "shared_bytes": mine["shared_bytes"]}})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kernel_matrix.json")
    parser.add_argument("--specs", help="spec file stems (default: every spec in specs/)")
    parser.add_argument("--sizes", default="64,128", help="every spec size, one run each (default 64,128)")
    parser.add_argument("--dtypes", default="bfloat16,float16", help="input dtypes (default bfloat16,float16; "
                        "float32 too)")
    parser.add_argument("--targets", default="sm_80,sm_90")
    parser.add_argument("--forms", help="only these Triton forms, e.g. recurrent (default: every form)")
    parser.add_argument("--forward-only", action="store_true", help="compile the forward calls only")
    parser.add_argument("--shape", help="the call's B, T, H, e.g. B=1,T=16,H=1 (default B=2,T=256,H=4); rows "
                        "record a shape other than the default (for a form whose per-step states do not fit "
                        "this machine's memory at the default: based's scan at K = V = 128)")
    parser.add_argument("--cached", action="store_true", help="reuse Triton's on-disk cache of compiled kernels")
    parser.add_argument("--resume", action="store_true", help="keep the compiled calls already in --out")
    parser.add_argument("--merge", type=Path, nargs="+", help="compile nothing: join the runs of these JSON files "
                        "(a later file's call replaces an earlier one's) into --out with one summary")
    parser.add_argument("--compare", type=Path, help="a benchmarks/gpu_kernel_report.py JSON to set beside sm_90")
    args = parser.parse_args(argv)
    targets = _list(args.targets)
    for d in _list(args.dtypes):
        if d not in ("bfloat16", "float16", "float32"):
            parser.error(f"--dtypes: {d!r} is not bfloat16, float16 or float32 (the Triton kernels' input dtypes)")
    shape = dict(SHAPE)
    for item in _list(args.shape or ""):
        key, _, value = item.partition("=")
        if key not in shape or not value.isdigit():
            parser.error(f"--shape: {item!r} is not B=, T= or H= a number")
        shape[key] = int(value)
    for t in targets:
        if t not in kr.TARGETS:
            parser.error(f"--targets: unknown target {t!r}; choose from {', '.join(kr.TARGETS)}")
    try:
        for t in targets:
            kr.find_tools(t)
    except kr.KernelReportError as err:
        parser.error(str(err))
    paths = sorted((ROOT / "specs").glob("*.rec"))
    if args.specs:
        paths = [p for p in paths if p.stem in _list(args.specs)]
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "triton": __import__("triton").__version__, "cuobjdump": kr.tool_versions(targets[0])["cuobjdump"]}
    versions.update({f"ptxas_{t}": kr.tool_versions(t)["ptxas"] for t in targets})
    report = {"benchmark": "kernel_matrix.py", "date": datetime.date.today().isoformat(),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU needed", "versions": versions,
              "shape": SHAPE, "targets": {t: kr.TARGETS[t].max_shared_bytes for t in targets},
              "note": ("forward calls" if args.forward_only else "forward and backward calls")
              + ", default configs" + (", kernels compiled before taken from Triton's cache" if args.cached else "")
              + "; spill_bytes = local memory per thread (cuobjdump STACK + LOCAL); a GPU's "
                "Triton n_spills is spill_bytes / 4", "runs": []}
    done = {}
    if args.resume and args.out.exists():
        done = {_key(r): r for r in json.loads(args.out.read_text())["runs"] if "error" not in r}
    started = time.time()
    if args.merge:
        joined = {}
        for path in args.merge:
            joined.update({_key(r): r for r in json.loads(path.read_text())["runs"]})
        report["runs"] = list(joined.values())
        report["merged_from"] = [str(p) for p in args.merge]
        paths = []
    print(f"{'recurrence':<28} {'size':>4} {'dtype':<8} {'target':<6} {'form':<9} {'phase':<8} {'kernel':<44} "
          f"{'regs':>4} {'spill B':>7} {'shared B':>8} {'compile s':>9}", flush=True)
    for path in paths:
        for name, rec in recurrence_dsl.load(path).items():
            forms = [f for f in kr.triton_forms_of(rec) if not args.forms or f in _list(args.forms)]
            for size in (int(s) for s in _list(args.sizes)):
                sizes = {s: size for s in rec.checked.sizes}
                for dtype in _list(args.dtypes):
                    for target in targets:
                        for form in forms:
                            run = {"spec": path.name, "name": name, "size": size, "dtype": dtype, "target": target,
                                   "form": form, **({"shape": shape} if shape != SHAPE else {})}
                            if _key(run) in done:
                                report["runs"].append(done[_key(run)])
                                continue
                            try:
                                kernels = kr.report_recurrence(rec, sizes, shape["B"], shape["T"], shape["H"],
                                                               dtype=getattr(torch, dtype), target=target, form=form,
                                                               backward=not args.forward_only, cached=args.cached)
                                run["kernels"] = [k.as_dict() for k in kernels]
                                run["problems"] = [p for k in kernels for p in k.problems()]
                            except ValueError as err:
                                if not getattr(err, "does_not_fit", False):
                                    raise
                                # the form cannot hold its state at these sizes (the recurrent form's
                                # StateTooLarge): no kernel is compiled, and "auto" runs another form
                                run["does_not_fit"] = str(err)[:600]
                                print(f"{name:<28} {size:>4} {dtype:<8} {target:<6} {form:<9} does not fit: "
                                      f"{run['does_not_fit'][:160]}", flush=True)
                            except Exception as err:  # noqa: BLE001 - a kernel that does not compile is a result
                                run["error"] = f"{type(err).__name__}: {err}"[:600]
                                print(f"{name:<28} {size:>4} {dtype:<8} {target:<6} {form:<9} failed: "
                                      f"{run['error'][:160]}", flush=True)
                            for k in run.get("kernels", []):
                                flag = "  SPILLS" if k["spill_bytes"] else ""
                                if k["shared_bytes"] > kr.TARGETS[target].max_shared_bytes:
                                    flag += "  SHARED > LIMIT"
                                print(f"{name:<28} {size:>4} {dtype:<8} {target:<6} {form:<9} {k['phase']:<8} "
                                      f"{k['name']:<44} {k['registers']:>4} {k['spill_bytes']:>7} "
                                      f"{k['shared_bytes']:>8} {k['compile_seconds']:>9.2f}{flag}", flush=True)
                            report["runs"].append(run)
                            args.out.parent.mkdir(parents=True, exist_ok=True)
                            args.out.write_text(json.dumps(report, indent=1) + "\n")
    kernels = [k for r in report["runs"] for k in r.get("kernels", [])]
    spilling = [k for k in kernels if k["spill_bytes"] > 0]
    over = [(r["target"], k) for r in report["runs"] for k in r.get("kernels", [])
            if k["shared_bytes"] > kr.TARGETS[r["target"]].max_shared_bytes]
    failed = [r for r in report["runs"] if "error" in r]
    unfit = [r for r in report["runs"] if "does_not_fit" in r]
    illegal = [k for k in kernels if any(n > lim for n, lim in zip(k["grid"], kr.MAX_GRID))]
    by_target = {t: sum(1 for r in report["runs"] if r["target"] == t for k in r.get("kernels", [])
                        if k["spill_bytes"] > 0) for t in targets}
    by_phase = {p: sum(1 for k in spilling if k["phase"] == p) for p in ("forward", "backward")}
    kernels_by_phase = {p: sum(1 for k in kernels if k["phase"] == p) for p in ("forward", "backward")}
    names = sorted({k["name"] for k in spilling})
    report["summary"] = {"calls": len(report["runs"]), "kernels": len(kernels), "spilling": len(spilling),
                         "spilling_by_target": by_target,
                         "kernels_by_phase": kernels_by_phase, "spilling_by_phase": by_phase,
                         "over_shared_memory": len(over), "illegal_grids": len(illegal), "failed_calls": len(failed),
                         "forms_that_do_not_fit": sorted({f"{r['name']} {r['size']} {r['form']}" for r in unfit}),
                         "spilling_kernel_names": names, "compile_seconds": round(sum(k["compile_seconds"]
                                                                                      for k in kernels), 1),
                         "wall_seconds": round(time.time() - started, 1)}
    if args.compare:
        report["comparison_with"] = str(args.compare.relative_to(ROOT) if args.compare.is_absolute()
                                         and args.compare.is_relative_to(ROOT) else args.compare)
        report["comparison"] = compare(report["runs"], args.compare)
        print("\nsm_90 bfloat16 beside the GPU run (registers, local bytes, shared bytes: GPU / compile-only)")
        for c in report["comparison"]:
            g, m = c["gpu"], c["compile_only"] or {"registers": "-", "local_bytes": "-", "shared_bytes": "-"}
            print(f"{c['name']:<22} {c['size']:>4} {c['form']:<9} {c['kernel']:<44} regs {g['registers']:>3}/"
                  f"{m['registers']!s:>3}  local {g['local_bytes']:>5}/{m['local_bytes']!s:>5}  shared "
                  f"{g['shared_bytes']:>6}/{m['shared_bytes']!s:>6}")
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    s = report["summary"]
    per_target = ", ".join(f"{t}: {n}" for t, n in by_target.items())
    print(f"\n{s['spilling']} of {s['kernels']} compiled kernels spill ({per_target}; forward {by_phase['forward']} "
          f"of {kernels_by_phase['forward']}, backward {by_phase['backward']} of {kernels_by_phase['backward']}); "
          f"{s['over_shared_memory']} need more shared memory than their target; {s['illegal_grids']} launch a grid "
          f"past CUDA's limits; {len(unfit)} calls' forms do not fit; {s['failed_calls']} calls failed; "
          f"{s['compile_seconds']} s compiling, {s['wall_seconds']} s in all; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
