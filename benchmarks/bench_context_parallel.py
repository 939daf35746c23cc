"""Benchmark context parallelism on CPU: 4 gloo processes against one process, and the bytes each rank sends.

    python benchmarks/bench_context_parallel.py [--world 4] [--T 16384] [--specs gla,delta_net,linear_attention]
                                                [--repeats 3] [--out benchmarks/results/context_parallel_cpu.json]

For each spec (float32, B=1, H=4, every size (K, V) 64, the chunked torch form, chunk 64, one torch thread per
process) it times the single-process layer on the whole sequence (forward; forward + backward) and then, in
`--world` gloo processes on localhost each holding T / world steps, `distributed.context_parallel` on both paths:
"all_gather" (LASP-2) and "relay" (the state handed rank to rank, ring-style). Per rank it reports the
median time and the bytes it sent per layer call, measured from the kernel's count of bytes this process
wrote (`wchar` in /proc/self/io, which counts gloo's socket writes) around the forward and around the backward,
beside the payload the collectives were handed (`ContextParallel.sent_bytes`). It checks every rank's output
slice against the single-process output. Writes JSON (machine, versions, date, every number).

On a 2-core machine shared with other work, 4 processes share 2 cores: per-rank times there measure
contention, not the algorithm; the bytes do not depend on the machine. `--smoke` runs a tiny shape (tests).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import recurrence_dsl  # noqa: E402
from benchmarks.timing import results_path, timed  # noqa: E402
from recurrence_dsl.sampling import sample_arguments  # noqa: E402


def _written() -> int:
    """Bytes this process has written through write()-family calls (gloo's TCP sends included)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("wchar:")).split()[1])


def _setup(spec: str, length: int, heads: int, chunk: int, size: int):
    rec = recurrence_dsl.load(ROOT / "specs" / f"{spec}.rec")[spec]
    layer = recurrence_dsl.compile(rec, backend="torch", form="chunked", chunk_size=chunk, tuning=False)
    sizes = {s: size for s in rec.checked.sizes}
    args, _ = sample_arguments(rec.checked, sizes, 1, length, heads, dtype=torch.float32, seed=0)
    return rec, layer, args


def _fwd_bwd(fn, args):
    leaves = [a.detach().requires_grad_() for a in args]
    out, final = fn(leaves)
    (out.sum() + final.sum()).backward()


def _worker(rank: int, world: int, port: int, opts: dict, out_dir: str) -> None:
    import torch.distributed as dist

    from recurrence_dsl.distributed import context_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    report = {}
    try:
        for spec in opts["specs"]:
            rec, layer, args = _setup(spec, opts["T"], opts["H"], opts["chunk"], opts["size"])
            n_in = len(rec.checked.inputs)
            step = opts["T"] // world
            lo, hi = rank * step, (rank + 1) * step if rank < world - 1 else opts["T"]
            local = [a[:, lo:hi] if i < n_in else a for i, a in enumerate(args)]
            reference = torch.load(Path(out_dir, f"{spec}_out.pt"))[:, lo:hi]
            rows = {}
            for path in ("all_gather", "relay"):
                cp = context_parallel(layer, path=path)

                def forward(cp=cp):
                    with torch.no_grad():
                        return cp(*local, output_final_state=True)

                def fwd_bwd(cp=cp):
                    _fwd_bwd(lambda leaves: cp(*leaves, output_final_state=True), local)

                out, _ = forward()
                error = float((out - reference).norm() / reference.norm())
                dist.barrier()
                t_fwd = timed(forward, opts["repeats"])
                dist.barrier()
                t_fb = timed(fwd_bwd, opts["repeats"])
                # Bytes of one call, measured: forward alone, then forward + backward.
                dist.barrier()
                before = _written()
                forward()
                fwd_bytes = _written() - before
                dist.barrier()
                before = _written()
                fwd_bwd()
                fb_bytes = _written() - before
                rows[path] = {"forward_s": t_fwd, "forward_backward_s": t_fb, "rel_error_output": error,
                              "sent_bytes_forward_measured": fwd_bytes,
                              "sent_bytes_backward_measured": fb_bytes - fwd_bytes,
                              "sent_bytes_forward_payload": cp.sent_bytes["forward"],
                              "sent_bytes_backward_payload": cp.sent_bytes["backward"]}
            report[spec] = {"slice": [lo, hi], "paths": rows}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--T", type=int, default=16384)
    parser.add_argument("--H", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--size", type=int, default=64, help="every spec size (K, V)")
    parser.add_argument("--specs", default="gla,delta_net,linear_attention")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat (for the tests)")
    parser.add_argument("--out", default=None,
                        help="the JSON written (default: benchmarks/results/context_parallel_cpu.json; "
                             "--smoke: the temporary folder)")
    opts = parser.parse_args()
    opts.out = results_path(opts.out, opts.smoke, "context_parallel_cpu.json")
    if opts.smoke:
        opts.T, opts.H, opts.chunk, opts.repeats, opts.world, opts.size = 64, 1, 16, 1, 2, 16
    torch.set_num_threads(1)
    os.environ.setdefault("RECURRENCE_DSL_TUNING", "0")
    specs = opts.specs.split(",")
    config = {"T": opts.T, "H": opts.H, "chunk": opts.chunk, "size": opts.size, "repeats": opts.repeats,
              "specs": specs}
    single = {}
    with tempfile.TemporaryDirectory() as out_dir:
        for spec in specs:
            rec, layer, args = _setup(spec, opts.T, opts.H, opts.chunk, opts.size)
            with torch.no_grad():
                out, _ = layer(*args, output_final_state=True)
            torch.save(out, Path(out_dir, f"{spec}_out.pt"))

            def forward(layer=layer, args=args):
                with torch.no_grad():
                    layer(*args, output_final_state=True)

            single[spec] = {"forward_s": timed(forward, opts.repeats),
                            "forward_backward_s": timed(lambda layer=layer, args=args: _fwd_bwd(
                                lambda leaves: layer(*leaves, output_final_state=True), args), opts.repeats)}
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        start = time.perf_counter()
        torch.multiprocessing.spawn(_worker, args=(opts.world, port, config, out_dir), nprocs=opts.world, join=True)
        ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(opts.world)]
        wall = time.perf_counter() - start
    cases = {}
    for spec in specs:
        cases[spec] = {"single_process": single[spec],
                       "ranks": [{"rank": r, "slice": ranks[r][spec]["slice"], **{
                           path: ranks[r][spec]["paths"][path] for path in ("all_gather", "relay")}}
                                 for r in range(opts.world)]}
    report = {
        "what": "context_parallel on gloo (CPU): single-process time vs per-rank time and bytes sent per layer",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "world": opts.world, "B": 1, "dtype": "float32", "form": "chunked",
        "smoke": opts.smoke, "spawn_and_run_s": wall, **config, "cases": cases,
    }
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"{'spec':18} {'path':10} {'rank':>4} {'fwd s':>8} {'fwd+bwd s':>10} {'fwd bytes':>10} {'bwd bytes':>10}"
          f" {'payload fwd':>11} {'payload bwd':>11} {'rel err':>8}")
    for spec, case in cases.items():
        s = case["single_process"]
        print(f"{spec:18} {'single':10} {'-':>4} {s['forward_s']:8.3f} {s['forward_backward_s']:10.3f}")
        for row in case["ranks"]:
            for path in ("all_gather", "relay"):
                p = row[path]
                print(f"{spec:18} {path:10} {row['rank']:4d} {p['forward_s']:8.3f} {p['forward_backward_s']:10.3f} "
                      f"{p['sent_bytes_forward_measured']:10d} {p['sent_bytes_backward_measured']:10d} "
                      f"{p['sent_bytes_forward_payload']:11d} {p['sent_bytes_backward_payload']:11d} "
                      f"{p['rel_error_output']:8.1e}")
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
