"""How forward+backward time of each torch form grows with T: the fitted log-log exponent (issue 14).

    python benchmarks/bench_scaling.py [--T 1024,2048,4096,8192,16384] [--specs gla,rwkv7] [--forms chunked,scan]
                                       [--repeats 3] [--out benchmarks/results/scaling_cpu.json] [--smoke]

For each spec in specs/ and each of its torch forms among chunked, scan and recurrent, it times the forward and
backward (float32, B=1, H=2, K=V=D=64, chunk 64, one torch thread; loss: the sum of the outputs and of the final
states) at every T. The lengths are interleaved: each repeat runs every T once, so a change in machine load hits all
lengths alike rather than one. It reports the median and the spread (min, max) per T and fits the slope of
log(median time) against log(T) by least squares: 1.0 is linear. The chunked and scan forms must stay at or below
1.15 (issue 14); the recurrent form is reported only. Also the slope from each repeat alone (its own fit), whose
range says how noisy the exponent is on this machine, and the slope over the last two lengths alone (where a
superlinear term shows first). Writes JSON with the thread settings, load average, versions and date.
`--smoke` runs T = 64, 128, D = 8, one repeat (for the tests).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import recurrence_dsl  # noqa: E402
from benchmarks.timing import results_path, thread_report  # noqa: E402
from recurrence_dsl.sampling import sample_arguments  # noqa: E402

FORMS = ("chunked", "scan", "recurrent")
LIMIT = 1.15  # the exponent issue 14 allows the chunked and scan forms


def slope(lengths: list[int], seconds: list[float]) -> float:
    """Least-squares slope of log(seconds) against log(length): the exponent p in time ~ T^p."""
    xs, ys = [math.log(t) for t in lengths], [math.log(s) for s in seconds]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def fwd_bwd(layer, inputs, form: str):
    """A closure running `form` forward and backward once."""

    def run():
        leaves = [a.detach().requires_grad_() for a in inputs]
        out, final = layer(*leaves, form=form, output_final_state=True)
        outs = out if isinstance(out, tuple) else (out,)
        finals = tuple(final.values()) if isinstance(final, dict) else (final,)
        sum(o.sum() for o in outs + finals).backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--H", type=int, default=2)
    parser.add_argument("--D", type=int, default=64, help="every size (K = V = D)")
    parser.add_argument("--T", default="1024,2048,4096,8192,16384", help="comma-separated lengths")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--specs", default=None, help="comma-separated spec names (default: every spec in specs/)")
    parser.add_argument("--forms", default=",".join(FORMS), help="comma-separated among chunked,scan,recurrent")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)")
    parser.add_argument("--smoke", action="store_true", help="T = 64,128, D = 8, one repeat")
    parser.add_argument("--out", default=None,
                        help="the JSON written (default: benchmarks/results/scaling_cpu.json; "
                             "--smoke: the temporary folder)")
    args = parser.parse_args()
    args.out = results_path(args.out, args.smoke, "scaling_cpu.json")
    torch.set_num_threads(args.threads)
    lengths = [int(t) for t in args.T.split(",")]
    if args.smoke:
        args.D, args.repeats, lengths = 8, 1, [64, 128]
    if len(lengths) < 2:
        parser.error(f"--T needs at least two lengths to fit an exponent, got {args.T!r}")
    forms = [f for f in args.forms.split(",") if f]
    unknown = [f for f in forms if f not in FORMS]
    if unknown:
        parser.error(f"--forms: unknown {unknown}; choose among {list(FORMS)}")
    names = args.specs.split(",") if args.specs else sorted(p.stem for p in (ROOT / "specs").glob("*.rec"))

    threads = thread_report()
    load_before = threads["load_average_1m"]
    print(f"CPU float32, B={args.B}, H={args.H}, K=V={args.D}, chunk {args.chunk_size}, torch threads "
          f"{torch.get_num_threads()}, load {load_before}; fwd+bwd seconds, median of {args.repeats} +- half the "
          "range as % of it")
    print(f"{'spec':<28} {'form':<10} " + " ".join(f"{'T=' + str(t):>16}" for t in lengths)
          + f" {'exponent':>9} {'per-repeat':>12} {'last 2':>6}")

    def write() -> None:  # after every row: a run stopped part-way still leaves what it measured
        result = {
            "benchmark": "fwd+bwd time against T per torch form: fitted log-log exponent (issue 14)",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": platform.processor() or platform.machine(),
            "threads": threads,  # torch threads, OMP_NUM_THREADS, OMP_WAIT_POLICY, cpu count, load, warnings
            "load_average_before": load_before,
            "load_average_after": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "recurrence_dsl": recurrence_dsl.__version__,
            "dtype": "float32",
            "shape": {"B": args.B, "H": args.H, "K": args.D, "V": args.D, "T": lengths, "chunk_size": args.chunk_size},
            "repeats": args.repeats,
            "limit": LIMIT,
            "smoke": args.smoke,
            "rows": rows,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    rows = []
    for name in names:
        for rec_name, rec in recurrence_dsl.load(ROOT / "specs" / f"{name}.rec").items():
            layer = recurrence_dsl.compile(rec, backend="torch", chunk_size=args.chunk_size, tuning=False)
            sizes = {s: args.D for s in rec.checked.sizes}
            for form in (f for f in forms if f in layer.forms):
                runs = {}
                for length in lengths:
                    inputs, _ = sample_arguments(rec.checked, sizes, args.B, length, args.H, dtype=torch.float32,
                                                 seed=0)
                    runs[length] = fwd_bwd(layer, inputs, form)
                    runs[length]()  # warm-up
                times = {length: [] for length in lengths}
                for _ in range(args.repeats):  # interleaved: every length once per repeat
                    for length in lengths:
                        start = time.perf_counter()
                        runs[length]()
                        times[length].append(time.perf_counter() - start)
                medians = [statistics.median(times[t]) for t in lengths]
                exponent = slope(lengths, medians)
                tail = slope(lengths[-2:], medians[-2:])  # the last doubling alone: where superlinearity shows
                per_repeat = [slope(lengths, [times[t][r] for t in lengths]) for r in range(args.repeats)]
                held = form in ("chunked", "scan")
                row = {"spec": rec_name, "file": f"specs/{name}.rec", "form": form, "T": lengths,
                       "median_s": medians, "min_s": [min(times[t]) for t in lengths],
                       "max_s": [max(times[t]) for t in lengths], "all_s": [times[t] for t in lengths],
                       "exponent": exponent, "exponent_last_two_T": tail, "exponent_per_repeat": per_repeat,
                       "limit": LIMIT if held else None, "within_limit": exponent <= LIMIT if held else None}
                rows.append(row)
                cells = " ".join(f"{m:9.3f} +-{50 * (hi - lo) / m:3.0f}%"
                                 for m, lo, hi in zip(medians, row["min_s"], row["max_s"]))
                flag = "" if not held or exponent <= LIMIT else "  > 1.15"
                print(f"{rec_name:<28} {form:<10} {cells} {exponent:9.2f} "
                      f"{min(per_repeat):5.2f}-{max(per_repeat):<5.2f} {tail:6.2f}{flag}", flush=True)
                del runs
                write()

    write()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
