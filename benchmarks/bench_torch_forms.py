"""Benchmark the torch forms on CPU: chunked vs recurrent vs the reference interpreter,
and the time from spec text to a ready torch callable.

    python benchmarks/bench_torch_forms.py [--T 4096] [--repeats 3] [--out benchmarks/results/torch_forms_cpu.json]

Prints a table and writes JSON (machine, versions, date, every timing). Ratios
within one run are what to compare; absolute times depend on the machine.
"""

from __future__ import annotations

import argparse
import datetime
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
from benchmarks.timing import thread_report, timed  # noqa: E402
from codegen.cache import load_source  # noqa: E402
from codegen.module import module_source  # noqa: E402
from recurrence_dsl.analysis import analyse  # noqa: E402
from recurrence_dsl.sampling import sample_arguments  # noqa: E402

SPECS = ("gla", "retention", "delta_net", "rwkv7")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=2)
    parser.add_argument("--H", type=int, default=4)
    parser.add_argument("--T", type=int, default=4096)
    parser.add_argument("--D", type=int, default=64, help="K = V")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-reference", action="store_true", help="skip timing the (slow) interpreter")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "torch_forms_cpu.json"))
    args = parser.parse_args()

    rows = []
    print(f"CPU float32, B={args.B}, H={args.H}, T={args.T}, K=V={args.D}, chunk {args.chunk_size}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'spec':<12} {'reference s':>12} {'recurrent s':>12} {'chunked s':>10} {'chunked vs recurrent':>21}")
    for name in SPECS:
        rec = recurrence_dsl.load(ROOT / "specs" / f"{name}.rec")[name]
        sizes = {s: args.D for s in rec.checked.sizes}
        inputs, _ = sample_arguments(rec.checked, sizes, args.B, args.T, args.H, dtype=torch.float32, seed=0)
        layer = recurrence_dsl.compile(rec, backend="torch", chunk_size=args.chunk_size)
        with torch.no_grad():
            recurrent = timed(lambda: layer(*inputs, form="recurrent"), args.repeats)
            chunked = timed(lambda: layer(*inputs, form="chunked"), args.repeats)
            reference = None
            if not args.no_reference:
                reference = timed(lambda: rec.reference(*inputs, dtype=torch.float32), 1)
        ratio = recurrent / chunked
        ref_text = f"{reference:12.3f}" if reference is not None else f"{'-':>12}"
        print(f"{name:<12} {ref_text} {recurrent:12.3f} {chunked:10.4f} {ratio:20.1f}x")
        rows.append({"spec": name, "reference_s": reference, "recurrent_s": recurrent, "chunked_s": chunked,
                     "chunked_speedup_over_recurrent": ratio})

    # Spec text -> ready layer (parse, check, analyse, generate the module, import it), warm process: what
    # compile() does the first time it sees a spec (it memoises per process); the module's import is memoised
    # by its source hash, so the samples time everything but that import.
    compile_times = {}
    for name in SPECS:
        text = (ROOT / "specs" / f"{name}.rec").read_text()

        def build(text=text, name=name):
            rec = recurrence_dsl.load_text(text)[name]
            return getattr(load_source(module_source([analyse(rec.checked)], f"{name}.rec"), name), name)

        build()  # the first build in a process pays for imports; the issue excludes the cold process
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            build()
            samples.append(time.perf_counter() - start)
        compile_times[name] = statistics.median(samples)
    print("spec text -> ready layer (median of 5, warm process): " +
          ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in compile_times.items()))

    result = {
        "benchmark": "torch forms on CPU",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": platform.processor() or platform.machine(),
        "cpu_count": torch.get_num_threads(),
        "threads": thread_report(),  # torch threads, OMP_NUM_THREADS, OMP_WAIT_POLICY, load, warnings
        "python": platform.python_version(),
        "torch": torch.__version__,
        "recurrence_dsl": recurrence_dsl.__version__,
        "dtype": "float32",
        "shape": {"B": args.B, "H": args.H, "T": args.T, "K": args.D, "V": args.D},
        "chunk_size": args.chunk_size,
        "rows": rows,
        "compile_median_s": compile_times,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
