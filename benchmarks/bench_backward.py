"""Benchmark the recurrent form's backward on CPU: the derived adjoint against autograd through the step loop.

    python benchmarks/bench_backward.py [--T 512,2048] [--specs gla,delta_net,indrnn] [--repeats 5] [--threads 1]
                                        [--out benchmarks/results/backward_cpu.json]

For each spec and length (float32, B=2, H=4, K=V=D=64 by default) it times the recurrent form's forward (no
grad), its forward + backward with the derived adjoint (checkpoints, the default), the same with autograd
through the loop (RECURRENCE_DSL_RECURRENT_BACKWARD=autograd: every step's tensors kept), and the chunked form's
forward + backward where the spec has one; it prints a table and writes JSON (machine, versions, date, every
timing, the median of `--repeats` runs; the autograd path once). Ratios within one run are what to compare;
absolute times depend on the machine and its load (one torch thread by default: on a shared 2-core machine two
threads fight the other processes and the timings scatter by 10x).
`--smoke` runs a tiny shape once (for the tests).
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import recurrence_dsl  # noqa: E402
from benchmarks.timing import results_path, thread_report, timed  # noqa: E402
from codegen.dispatch import RECURRENT_BACKWARD  # noqa: E402
from recurrence_dsl.sampling import sample_arguments  # noqa: E402


def forward_backward(layer, args, form: str, backward: str | None = None):
    """A closure running `form` forward and backward (loss: the sum of the outputs and of the final state)."""

    def run():
        before = os.environ.get(RECURRENT_BACKWARD)
        if backward is not None:
            os.environ[RECURRENT_BACKWARD] = backward
        try:
            leaves = [a.detach().requires_grad_() for a in args]
            out, final = layer(*leaves, form=form, output_final_state=True)
            outs = out if isinstance(out, tuple) else (out,)
            finals = tuple(final.values()) if isinstance(final, dict) else (final,)
            sum(o.sum() for o in outs + finals).backward()
            return [leaf.grad for leaf in leaves]
        finally:
            if before is None:
                os.environ.pop(RECURRENT_BACKWARD, None)
            else:
                os.environ[RECURRENT_BACKWARD] = before

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=2)
    parser.add_argument("--H", type=int, default=4)
    parser.add_argument("--T", default="512,2048", help="comma-separated lengths")
    parser.add_argument("--D", type=int, default=64, help="every size (K = V = D)")
    parser.add_argument("--specs", default="gla,delta_net,indrnn")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)")
    parser.add_argument("--no-autograd", action="store_true", help="skip the (slow) autograd-through-the-loop runs")
    parser.add_argument("--smoke", action="store_true", help="B=1, H=1, T=20, D=8, one repeat")
    parser.add_argument("--out", default=None,
                        help="the JSON written (default: benchmarks/results/backward_cpu.json; "
                             "--smoke: the temporary folder)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: time.perf_counter; cpu: this process's CPU time (time.process_time)")
    args = parser.parse_args()
    args.out = results_path(args.out, args.smoke, "backward_cpu.json")
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    lengths = [int(t) for t in args.T.split(",")]
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.B, args.H, args.D, args.repeats, lengths = 1, 1, 8, 1, [20]

    rows = []
    print(f"CPU float32, B={args.B}, H={args.H}, K=V={args.D}, torch threads {torch.get_num_threads()}; seconds")
    header = (f"{'spec':<10} {'T':>6} {'recurrent fwd':>14} {'fwd+bwd adjoint':>16} {'fwd+bwd autograd':>17} "
              f"{'adjoint/fwd':>12} {'autograd/adjoint':>17} {'chunked fwd+bwd':>16}")
    print(header)
    for name in args.specs.split(","):
        rec = recurrence_dsl.load(ROOT / "specs" / f"{name}.rec")[name]
        layer = recurrence_dsl.compile(rec, backend="torch", tuning=False)
        for length in lengths:
            sizes = {s: args.D for s in rec.checked.sizes}
            inputs, _ = sample_arguments(rec.checked, sizes, args.B, length, args.H, dtype=torch.float32, seed=0)
            with torch.no_grad():
                forward = timed(lambda: layer(*inputs, form="recurrent", output_final_state=True), args.repeats, clock)
            adjoint_run = forward_backward(layer, inputs, "recurrent")
            adjoint = timed(adjoint_run, args.repeats, clock)
            autograd = None
            error = None
            if not args.no_autograd:
                autograd_run = forward_backward(layer, inputs, "recurrent", "autograd")
                autograd = timed(autograd_run, 1, clock)
                ours, theirs = adjoint_run(), autograd_run()
                error = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(ours, theirs))
            chunked = None
            if "chunked" in layer.forms:
                chunked = timed(forward_backward(layer, inputs, "chunked"), args.repeats, clock)
            row = {"spec": name, "T": length, "recurrent_forward_s": forward, "recurrent_fwd_bwd_adjoint_s": adjoint,
                   "recurrent_fwd_bwd_autograd_s": autograd, "chunked_fwd_bwd_s": chunked,
                   "adjoint_over_forward": adjoint / forward,
                   "autograd_over_adjoint": autograd / adjoint if autograd else None,
                   "max_rel_grad_difference_adjoint_vs_autograd": error}
            rows.append(row)

            def cell(value, width, fmt=".3f"):
                return f"{value:{width}{fmt}}" if value is not None else f"{'-':>{width}}"

            print(f"{name:<10} {length:>6} {cell(forward, 14)} {cell(adjoint, 16)} {cell(autograd, 17)} "
                  f"{cell(adjoint / forward, 11, '.2f')}x "
                  f"{cell(row['autograd_over_adjoint'], 16, '.1f')}{'x' if autograd else ' '} {cell(chunked, 16)}")

    result = {
        "benchmark": "recurrent form backward on CPU: derived adjoint vs autograd through the loop",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "threads": thread_report(),  # torch threads, OMP_NUM_THREADS, OMP_WAIT_POLICY, load, warnings
        "python": platform.python_version(),
        "torch": torch.__version__,
        "recurrence_dsl": recurrence_dsl.__version__,
        "dtype": "float32",
        "shape": {"B": args.B, "H": args.H, "K": args.D, "V": args.D, "T": lengths},
        "smoke": args.smoke, "clock": args.clock,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
