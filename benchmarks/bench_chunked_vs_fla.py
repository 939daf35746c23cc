"""Benchmark our chunked torch form against flash-linear-attention's pure-torch references on CPU.

    PYTHONPATH=.:/tmp/fla-site python benchmarks/bench_chunked_vs_fla.py [--T 2048] [--repeats 3] [--threads 1]
                                        [--out benchmarks/results/chunked_vs_fla_cpu.json]

For each pairing below (float32, B=2, H=4, K=V=64, T=2048, chunk 64, one torch thread by default) it times the
forward (no grad) and the forward + backward (loss: the sum of the outputs and of the final state; gradients of
every input and param) of our generated chunked torch form and of fla's reference, checks that the outputs, final
states and the q/k/v gradients agree (relative Frobenius error), prints a table and writes JSON.

| our spec          | fla 0.6.0 reference                                         |
| retention         | fla.ops.simple_gla.naive.naive_chunk_simple_gla (g = log gamma at every step) |
| delta_net         | fla.ops.delta_rule.naive.delta_rule_chunkwise                |
| gated_delta_net   | fla.ops.gated_delta_rule.naive.naive_chunk_gated_delta_rule  |
| gla               | fla.ops.gla.naive.naive_recurrent_gla (fla ships no pure-torch chunked GLA: a step loop) |

fla is optional: when `import fla` fails the fla columns are empty and the JSON says why (our timings are still
taken). fla's naive modules import einops; install both outside the project venv, e.g.
`pip install --no-deps --target /tmp/fla-site fla_core-0.6.0-*.whl flash_linear_attention-0.6.0-*.whl einops`.
`--smoke` runs a tiny shape once (for the tests).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import recurrence_dsl  # noqa: E402
from benchmarks.timing import results_path, thread_report, timed  # noqa: E402
from recurrence_dsl.sampling import sample_arguments  # noqa: E402


def _fla_references():
    """{spec: (reference name, callable(args, chunk) -> (o[B,T,H,V], S[B,H,K,V]))}, or (None, why fla is absent).

    Each callable maps our argument layout (inputs [B, T, H, ...], params [H]) to the reference's."""
    try:
        from fla.ops.delta_rule.naive import delta_rule_chunkwise
        from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule
        from fla.ops.gla.naive import naive_recurrent_gla
        from fla.ops.simple_gla.naive import naive_chunk_simple_gla
    except ImportError as exc:  # fla (or its einops dependency) not installed: our column only
        return None, f"flash-linear-attention not importable ({exc}); fla columns skipped"

    def retention(args, chunk):
        q, k, v, gamma = args
        g = torch.log(gamma).expand(q.shape[0], q.shape[1], -1)  # RetNet's constant decay as a per-step log gate
        return naive_chunk_simple_gla(q, k, v, g, output_final_state=True, chunk_size=chunk)

    def delta_net(args, chunk):
        q, k, v, beta = args
        o, s = delta_rule_chunkwise(*(x.transpose(1, 2) for x in (q, k, v, beta)), chunk_size=chunk)
        return o.transpose(1, 2), s

    def gated_delta_net(args, chunk):
        q, k, v, g, beta = args
        return naive_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=chunk, output_final_state=True)

    def gla(args, chunk):
        q, k, v, g = args
        return naive_recurrent_gla(q, k, v, g, output_final_state=True)

    import fla

    return {
        "retention": ("simple_gla.naive.naive_chunk_simple_gla", retention),
        "delta_net": ("delta_rule.naive.delta_rule_chunkwise", delta_net),
        "gated_delta_net": ("gated_delta_rule.naive.naive_chunk_gated_delta_rule", gated_delta_net),
        "gla": ("gla.naive.naive_recurrent_gla (step loop: fla has no torch chunked GLA)", gla),
    }, getattr(fla, "__version__", "unknown")


def _fwd_bwd(fn, args):
    """A closure: fn on fresh leaves, backward of sum(o) + sum(S); returns (o, S, grads)."""

    def run():
        leaves = [a.detach().requires_grad_() for a in args]
        o, s = fn(leaves)
        (o.sum() + s.sum()).backward()
        return o.detach(), s.detach(), [leaf.grad for leaf in leaves]

    return run


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=2)
    parser.add_argument("--H", type=int, default=4)
    parser.add_argument("--T", type=int, default=2048)
    parser.add_argument("--D", type=int, default=64, help="every size (K = V = D)")
    parser.add_argument("--chunk", type=int, default=64, help="chunk length, ours and fla's")
    parser.add_argument("--specs", default="gla,retention,delta_net,gated_delta_net")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)")
    parser.add_argument("--smoke", action="store_true", help="B=1, H=2, T=32, D=8, chunk 16, one repeat")
    parser.add_argument("--out", default=None,
                        help="the JSON written (default: benchmarks/results/chunked_vs_fla_cpu.json; "
                             "--smoke: the temporary folder)")
    args = parser.parse_args()
    args.out = results_path(args.out, args.smoke, "chunked_vs_fla_cpu.json")
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.B, args.H, args.T, args.D, args.chunk, args.repeats = 1, 2, 32, 8, 16, 1
    references, fla_version = _fla_references()
    if references is None:
        print(f"note: {fla_version}", file=sys.stderr)

    rows = []
    print(f"CPU float32, B={args.B}, H={args.H}, T={args.T}, K=V={args.D}, chunk {args.chunk}, "
          f"torch threads {torch.get_num_threads()}; seconds (median of {args.repeats})")
    print(f"{'spec':<16} {'ours fwd':>9} {'fla fwd':>9} {'ours f+b':>9} {'fla f+b':>9} "
          f"{'fla/ours fwd':>13} {'fla/ours f+b':>13} {'max rel err':>12}")
    for name in args.specs.split(","):
        rec = recurrence_dsl.load(ROOT / "specs" / f"{name}.rec")[name]
        layer = recurrence_dsl.compile(rec, backend="torch", tuning=False)
        sizes = {s: args.D for s in rec.checked.sizes}
        inputs, _ = sample_arguments(rec.checked, sizes, args.B, args.T, args.H, dtype=torch.float32, seed=0)

        def ours(xs):
            return layer(*xs, form="chunked", chunk_size=args.chunk, output_final_state=True)

        with torch.no_grad():
            ours_fwd = timed(lambda: ours(inputs), args.repeats)
        ours_run = _fwd_bwd(ours, inputs)
        ours_fb = timed(ours_run, args.repeats)
        row = {"spec": name, "ours_forward_s": ours_fwd, "ours_fwd_bwd_s": ours_fb, "fla_reference": None,
               "fla_forward_s": None, "fla_fwd_bwd_s": None, "fla_over_ours_forward": None,
               "fla_over_ours_fwd_bwd": None, "rel_err": None}
        if references is not None and name in references:
            ref_name, ref = references[name]

            def theirs(xs, ref=ref):
                return ref(xs, args.chunk)

            with torch.no_grad():
                fla_fwd = timed(lambda: theirs(inputs), args.repeats)
            fla_run = _fwd_bwd(theirs, inputs)
            fla_fb = timed(fla_run, args.repeats)
            (o1, s1, g1), (o2, s2, g2) = ours_run(), fla_run()
            # q, k, v are the first three arguments of every pairing; later ones (gates, beta, gamma) differ in
            # shape between the two (RetNet's gamma is our per-head param, fla's per-step g), so only q/k/v grads.
            rel = {"o": _rel(o1, o2), "final_state": _rel(s1, s2),
                   **{f"d{n}": _rel(a, b) for n, a, b in zip("qkv", g1[:3], g2[:3])}}
            row.update(fla_reference=ref_name, fla_forward_s=fla_fwd, fla_fwd_bwd_s=fla_fb,
                       fla_over_ours_forward=fla_fwd / ours_fwd, fla_over_ours_fwd_bwd=fla_fb / ours_fb, rel_err=rel)
            if not all(math.isfinite(e) and e < 1e-3 for e in rel.values()):
                raise SystemExit(f"{name}: ours and fla's {ref_name} disagree: {rel}")
        rows.append(row)

        def cell(value, width, fmt=".3f"):
            return f"{value:{width}{fmt}}" if value is not None else f"{'-':>{width}}"

        err = max(row["rel_err"].values()) if row["rel_err"] else None
        print(f"{name:<16} {cell(ours_fwd, 9)} {cell(row['fla_forward_s'], 9)} {cell(ours_fb, 9)} "
              f"{cell(row['fla_fwd_bwd_s'], 9)} {cell(row['fla_over_ours_forward'], 12, '.2f')}x "
              f"{cell(row['fla_over_ours_fwd_bwd'], 12, '.2f')}x {cell(err, 12, '.1e')}")

    result = {
        "benchmark": "chunked torch form vs flash-linear-attention's pure-torch references on CPU",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "threads": thread_report(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "recurrence_dsl": recurrence_dsl.__version__,
        "fla": fla_version if references is not None else None,
        "fla_note": None if references is not None else fla_version,
        "dtype": "float32",
        "shape": {"B": args.B, "H": args.H, "T": args.T, "K": args.D, "V": args.D, "chunk": args.chunk},
        "repeats": args.repeats,
        "smoke": args.smoke,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
