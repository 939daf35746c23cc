"""`recdsl tune`: tune a spec's block sizes on this machine and store every trial.

    recdsl tune FILE [--name NAME] [--shape B=2,T=1024,H=4,K=64,V=64] [--dtype float32]
                [--form chunked|recurrent] [--backend torch|triton] [--trials 20] [--device cpu|cuda]
                [--store PATH] [--warmup 2] [--repeat 5] [--seed 0] [--no-check] [--verbose]

Until `recdsl` registers the command (`add_tune_parser` in `recurrence_dsl.cli.build_parser`), the same
command runs as `python -m autotune tune ...`. Exit status: 0 when a config was found, 1 when every trial
failed, 2 on a spec error or a bad command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TUNE_DEFAULTS = {"B": 2, "T": 1024, "H": 4}
TUNE_DIM = 64


def add_tune_parser(sub) -> argparse.ArgumentParser:
    """Add the `tune` subcommand to an argparse subparsers object (recdsl's)."""
    from recurrence_dsl.cli import DTYPES

    tune = sub.add_parser("tune", help="tune block sizes on this machine and store every trial",
                          description="Search the config space of a form (chunk size; block sizes, warps and "
                          "stages of the Triton kernels) with optuna, pruning configs that cannot fit before "
                          "timing any, and record every trial in the tuning store that compile() reads.")
    tune.add_argument("file", metavar="FILE")
    tune.add_argument("--name", help="only this recurrence (default: every one in FILE)")
    tune.add_argument("--shape", help=f"sizes, e.g. B=2,T=1024,H=4,K=64,V=64 (defaults B=2, T=1024, H=4, "
                      f"every spec size {TUNE_DIM})")
    tune.add_argument("--dtype", choices=DTYPES, default="float32", help="input dtype (default float32)")
    tune.add_argument("--form", choices=("chunked", "recurrent"), help="the form to tune (default: chunked "
                      "where the spec has it, else recurrent)")
    tune.add_argument("--backend", choices=("torch", "triton"), help="default: triton on cuda, torch on cpu")
    tune.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available (on cpu, Triton "
                      "runs in its interpreter and is stored as 'cpu-interpreter')")
    tune.add_argument("--trials", type=int, default=20, help="configs to time (default 20)")
    tune.add_argument("--store", metavar="PATH", help="the SQLite store (default $RECURRENCE_DSL_CACHE/"
                      "tuning.sqlite or ~/.cache/recurrence_dsl/tuning.sqlite)")
    tune.add_argument("--warmup", type=int, default=2, help="untimed runs per config (default 2)")
    tune.add_argument("--repeat", type=int, default=5, help="timed runs per config, median kept (default 5)")
    tune.add_argument("--seed", type=int, default=0, help="seed of the inputs and of the sampler")
    tune.add_argument("--no-check", action="store_true", help="skip the check of each config's outputs "
                      "against the torch form")
    tune.add_argument("--verbose", action="store_true", help="print each trial as it finishes")
    tune.set_defaults(run=cmd_tune)
    return tune


def cmd_tune(args) -> int:
    import torch

    from recurrence_dsl.analysis import analyse
    from recurrence_dsl.api import load
    from recurrence_dsl.cli import UsageError, _prepare_triton, _select, check_shape_names, parse_shape

    from .store import open_store
    from .tuner import NoLegalConfig, tune

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    backend = args.backend or ("triton" if device == "cuda" else "torch")
    if backend == "triton" and not _prepare_triton(device):
        raise UsageError("--backend triton: triton is not installed (pip install 'recurrence-dsl[triton]')")
    if args.trials < 1 or args.repeat < 1 or args.warmup < 0:
        raise UsageError("--trials and --repeat must be at least 1, --warmup at least 0")
    recs = _select(load(Path(args.file)), args.name)
    given = parse_shape(args.shape)
    store = open_store(args.store)
    status = 0
    for rec in recs:
        check_shape_names(rec, given, TUNE_DEFAULTS, only=len(recs) == 1)
        forms = analyse(rec.checked).forms
        form = args.form or ("chunked" if "chunked" in forms else "recurrent")
        if form not in forms:
            print(f"{rec.name}: no {form} form; skipped", file=sys.stderr)
            continue
        if (form, backend) == ("recurrent", "torch"):
            print(f"{rec.name}: the torch recurrent form has nothing to tune; skipped (try --backend triton)",
                  file=sys.stderr)
            continue
        sizes = {s: given.get(s, TUNE_DIM) for s in rec.checked.sizes}
        try:
            result = tune(rec, sizes, given.get("B", TUNE_DEFAULTS["B"]), given.get("T", TUNE_DEFAULTS["T"]),
                          given.get("H", TUNE_DEFAULTS["H"]), getattr(torch, args.dtype), form, backend,
                          args.trials, store, device, warmup=args.warmup, repeat=args.repeat, seed=args.seed,
                          check=not args.no_check, verbose=args.verbose)
        except NoLegalConfig as err:
            print(f"{rec.name}: {err}", file=sys.stderr)
            status = 1
            continue
        except ValueError as err:
            raise UsageError(str(err)) from None
        print(f"{rec.name} (spec hash {result.spec_hash})")
        print(result.table())
        print()
        if result.best is None:
            status = 1
    print(f"trials stored in {store.path}")
    return status


def main(argv: list[str] | None = None) -> int:
    """`python -m autotune tune ...`, with recdsl's error handling."""
    from recurrence_dsl.cli import run_command

    parser = argparse.ArgumentParser(prog="python -m autotune", description="Tune recurrence_dsl layers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_tune_parser(sub)
    return run_command(parser.parse_args(argv))


__all__ = ["add_tune_parser", "cmd_tune", "main"]
