"""Before/after for a change to the recurrent form's printed adjoint: two generated modules, timed in one process.

    python benchmarks/compare_adjoint.py --before /work/main/tests/golden [--after tests/golden]
                                         [--specs delta_net,gated_delta_net,gla] [--T 2048] [--repeats 5]
                                         [--out benchmarks/results/compare_adjoint_cpu.json]

`--before` and `--after` are folders of generated modules (`NAME.module.py`, as `python -m tests.golden` writes
them; `--before` is typically another checkout's tests/golden). For each spec (float32, B=2, H=4, K=V=64, no
initial state, one torch thread) it runs the after-module's recurrent forward (no grad), then the before- and
after-modules' recurrent forward + backward (loss: sum of the outputs and of the final states), interleaved
`--repeats` times, alternating which goes first, so that load on a shared machine hits both alike; it prints
and stores the medians, the fastest and slowest run of each, and the largest relative difference of their
gradients (which must be <= 1e-5, or the script exits non-zero). Run it with `--before` = `--after` first: the
after/before of two identical modules is the noise floor of the machine at that moment.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import recurrence_dsl  # noqa: E402
from benchmarks.timing import thread_report  # noqa: E402
from recurrence_dsl.sampling import sample_arguments  # noqa: E402


def _load(path: Path, name: str):
    if not path.is_file():
        raise SystemExit(f"no generated module at {path}")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # Triton's jit reads a kernel's source through its module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, type=Path, help="folder of NAME.module.py before the change")
    parser.add_argument("--after", type=Path, default=ROOT / "tests" / "golden")
    parser.add_argument("--specs", default="delta_net,gated_delta_net,gla")
    parser.add_argument("--T", type=int, default=2048)
    parser.add_argument("--D", type=int, default=64, help="every size (K = V = D)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compare_adjoint_cpu.json"))
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: time.perf_counter; cpu: this process's CPU time (time.process_time), which on a "
                             "machine with more runnable threads than cores does not count the time others hold it")
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(1)
    B, H = 2, 4
    rows = []
    # A spec file may hold several recurrences (bidirectional_mamba: a forward and a reverse one): each is a row.
    recurrences = [(file, name, r.checked) for file in args.specs.split(",")
                   for name, r in recurrence_dsl.load(ROOT / "specs" / f"{file}.rec").items()]
    for file, name, rec in recurrences:
        sizes = {s: args.D for s in rec.sizes}
        inputs, _ = sample_arguments(rec, sizes, B, args.T, H, dtype=torch.float32, seed=0)
        states = {s.name: torch.zeros((B, H) + tuple(sizes[d] for d in s.dims)) for s in rec.states}
        recurrent = {tag: getattr(_load(folder / f"{file}.module.py", f"_{tag}_{name}"), f"{name}__recurrent")
                     for tag, folder in (("before", args.before), ("after", args.after))}

        def fwd_bwd(fn):
            leaves = [a.detach().requires_grad_() for a in inputs]
            outputs, finals = fn(*leaves, states, *(sizes[s] for s in rec.sizes))
            (sum(o.sum() for o in outputs.values()) + sum(f.sum() for f in finals.values())).backward()
            return [leaf.grad for leaf in leaves]

        def forward():
            with torch.no_grad():
                recurrent["after"](*inputs, states, *(sizes[s] for s in rec.sizes))

        grads = {tag: fwd_bwd(fn) for tag, fn in recurrent.items()}  # also the warm-up
        difference = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item()
                         for a, b in zip(grads["before"], grads["after"]))
        if difference > 1e-5:
            raise SystemExit(f"{name}: the two adjoints' gradients differ by {difference:.1e}")
        forward()
        times: dict[str, list[float]] = {"forward": [], "before": [], "after": []}
        runs = [("forward", forward), ("before", lambda: fwd_bwd(recurrent["before"])),
                ("after", lambda: fwd_bwd(recurrent["after"]))]
        for repeat in range(args.repeats):
            # Alternate which of the two goes first: on a loaded machine the order alone moves a median by ~10%.
            for tag, run in runs if repeat % 2 == 0 else runs[:1] + runs[:0:-1]:
                start = clock()
                run()
                times[tag].append(clock() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"spec": name, "T": args.T, "forward_s": med["forward"],
                     "fwd_bwd_before_s": med["before"], "fwd_bwd_after_s": med["after"],
                     "range_before_s": [min(times["before"]), max(times["before"])],
                     "range_after_s": [min(times["after"]), max(times["after"])],
                     "before_over_forward": med["before"] / med["forward"],
                     "after_over_forward": med["after"] / med["forward"],
                     "max_rel_grad_difference": difference})
        print(f"{name:<16} T={args.T} fwd {med['forward']:.3f} s | fwd+bwd before {med['before']:.3f} s "
              f"({med['before'] / med['forward']:.2f}x) after {med['after']:.3f} s "
              f"({med['after'] / med['forward']:.2f}x) | after/before {med['after'] / med['before']:.3f} "
              f"| grads differ {difference:.1e}", flush=True)
    result = {
        "benchmark": "recurrent form fwd+bwd: two generated modules' adjoints, interleaved in one process",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": platform.processor() or platform.machine(),
        "threads": thread_report(),
        "torch": torch.__version__,
        "before": str(args.before), "after": str(args.after),
        "shape": {"B": B, "H": H, "T": args.T, "K": args.D, "V": args.D}, "dtype": "float32",
        "repeats": args.repeats, "clock": args.clock,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
