"""Benchmark packed sequences (`cu_seqlens`) on the CPU torch path: N short sequences against one long one.

    python benchmarks/bench_varlen.py [--specs gla,delta_net,mamba2] [--packed 256x16] [--H 4] [--K 64]
                                      [--repeats 5] [--threads 1] [--out benchmarks/results/varlen_cpu.json]

For each spec (float32, H heads, every size K) it times, with the default form ("auto") on the torch backend:
one sequence of N * L steps (B = 1, no cu_seqlens), the same steps packed as N sequences of L steps
(`cu_seqlens`; codegen/dispatch.py runs the sequences of one length as one batch), and the same N sequences
one call each (what a packed call cost before it was batched: a Python loop over the sequences), forward only
and forward + backward (loss: the outputs' and final states' sum). Issue 10's target: packed <= 2x one long
sequence for 256 x 16 against 1 x 4096. It prints a table and writes JSON (machine, versions, date, the median of
`--repeats` runs; the loop once, as it is slow). `--smoke` runs a tiny shape once (for the tests).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import recurrence_dsl  # noqa: E402
from benchmarks.timing import results_path, thread_report, timed  # noqa: E402
from recurrence_dsl.sampling import sample_arguments  # noqa: E402


def _results(out, final) -> list:
    outs = out if isinstance(out, tuple) else (out,)
    finals = tuple(final.values()) if isinstance(final, dict) else (final,)
    return list(outs) + list(finals)


def make_runs(layer, args, count: int, length: int, backward: bool) -> dict:
    """Closures for the three ways of running N = count sequences of `length` steps ([1, count * length, ...])."""
    cu = torch.arange(0, count * length + 1, length)

    def call(tensors, **kwargs):
        if not backward:
            with torch.no_grad():
                return _results(*layer(*tensors, output_final_state=True, backend="torch", **kwargs))
        leaves = [a.detach().requires_grad_() for a in tensors]
        results = _results(*layer(*leaves, output_final_state=True, backend="torch", **kwargs))
        sum(r.sum() for r in results).backward()
        return [leaf.grad for leaf in leaves]

    inputs = len(layer.recurrence.inputs)

    def loop():  # one call per sequence: the packed path before it ran batched
        got = []
        for n in range(count):
            piece = [a[:, n * length:(n + 1) * length] if i < inputs else a for i, a in enumerate(args)]
            got.append(call(piece))
        return got

    return {"one_long": lambda: call(args), "packed": lambda: call(args, cu_seqlens=cu), "loop": loop}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--specs", default="gla,delta_net,mamba2")
    parser.add_argument("--packed", default="256x16", help="N x L: N sequences of L steps")
    parser.add_argument("--H", type=int, default=4)
    parser.add_argument("--K", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="a tiny shape, once (for the tests)")
    parser.add_argument("--out", default=None,
                        help="the JSON written (default: benchmarks/results/varlen_cpu.json; "
                             "--smoke: the temporary folder)")
    opts = parser.parse_args()
    opts.out = results_path(opts.out, opts.smoke, "varlen_cpu.json")
    torch.set_num_threads(opts.threads)
    count, length = (int(x) for x in opts.packed.lower().split("x"))
    heads, size, repeats = opts.H, opts.K, opts.repeats
    if opts.smoke:
        count, length, heads, size, repeats = 4, 3, 1, 8, 1
    rows = []
    print(f"{'spec':10s} {'pass':8s} {'1 x ' + str(count * length):>12s} {f'{count} x {length}':>12s} "
          f"{'ratio':>6s} {'loop':>10s}  (seconds, torch backend, form auto)")
    for name in opts.specs.split(","):
        rec = recurrence_dsl.load(ROOT / "specs" / f"{name}.rec")[name]
        layer = recurrence_dsl.compile(rec)
        args, _ = sample_arguments(rec.checked, {s: size for s in rec.checked.sizes}, 1, count * length, heads,
                                   dtype=torch.float32, seed=0)
        for backward in (False, True):
            runs = make_runs(layer, args, count, length, backward)
            one = timed(runs["one_long"], repeats)
            packed = timed(runs["packed"], repeats)
            loop = timed(runs["loop"], 1)
            row = {"spec": name, "pass": "fwd+bwd" if backward else "fwd", "sequences": count, "length": length,
                   "heads": heads, "size": size, "one_long_s": one, "packed_s": packed, "loop_s": loop,
                   "packed_over_one_long": packed / one, "loop_over_packed": loop / packed}
            rows.append(row)
            print(f"{name:10s} {row['pass']:8s} {one:12.4f} {packed:12.4f} {packed / one:6.2f} {loop:10.3f}")
    report = {"benchmark": "bench_varlen", "smoke": opts.smoke, "date": datetime.date.today().isoformat(),
              "machine": platform.processor() or platform.machine(), "threads": thread_report(),
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "target": "packed_over_one_long <= 2 for 256 x 16 against 1 x 4096 (issue 10)", "rows": rows}
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
