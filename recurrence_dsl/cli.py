"""`recdsl`: check, show, explain, compile, tune `.rec` specs and report their kernels from the command line.

Exit status: 0 on success, 1 when a path exceeds its tolerance (check), every trial failed (tune) or a kernel
spills, needs too much shared memory, launches a grid past CUDA's limits or does not compile (kernels), 2 on a spec
error (a FILE that is not UTF-8 or holds no recurrence too), a bad command line or an output it will not replace
(kernels: also when triton, ptxas or cuobjdump is missing). None of these prints a Python traceback. Any other
exception is a bug in recurrence_dsl: one line `recdsl COMMAND: internal error (recdsl VERSION): ...` asking for a
report, exit 3; the traceback follows only with `--debug` or RECURRENCE_DSL_DEBUG set (0, off, false, no: unset).

    recdsl show FILE [--name NAME] [--json] [--shape B=2,T=1024,H=4,K=64,V=64] [--graph OUT.dot [--force]]
    recdsl explain FILE [--name NAME] [--json]
    recdsl tune FILE [--name NAME] [--shape B=2,T=1024,H=4,K=64,V=64] [--dtype float32] [--mode fwd|fwdbwd]
                [--form chunked|parallel|recurrent|scan] [--backend torch|triton] [--trials 20] [--device cpu|cuda]
                [--store PATH] [--lock-wait 60] [--target sm_80|sm_90|sm_100] [--no-compiler] [--warmup 2]
                [--repeat 5] [--seed 0] [--no-check] [--replace] [--verbose]
                [--no-progress] [--json]
    recdsl kernels FILE [--name NAME] [--shape B=2,T=256,H=4,K=64,V=64] [--dtype bfloat16]
                [--target sm_80|sm_90|sm_100] [--form auto|recurrent|scan|chunked|parallel|all]
                [--config JSON] [--backward] [--json]

This module is in the top import layer: it may use every package (autotune's tuner and store for `tune`,
codegen's module writer for `compile`, codegen.kernel_report for `kernels`), and nothing below imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from .analysis import TransitionClass, analyse
from .api import Recurrence, load
from .check import require_state
from .errors import CallError, SpecError
from .explain import explain
from .version import __version__

DEFAULT_SIZES = {"B": 2, "T": 64, "H": 2}
DEFAULT_DIM = 16
DTYPES = ("float64", "float32", "float16", "bfloat16")
TUNE_DEFAULTS = {"B": 2, "T": 1024, "H": 4}
TUNE_DIM = 64


BUG_EXIT = 3  # the exit status of an internal error (a bug in recurrence_dsl, not in what the user gave)
MAX_SIZE = 2**31 - 1  # the largest --shape size: the kernels index with 32-bit integers
GRAPH_MARKER = "// recdsl graph"  # the first line of a graph `show --graph` wrote: it may replace the file
FILE_HELP = "the .rec spec file (a pipe such as <(...) too)"
DEBUG_HELP = "print the Python traceback of an internal error (also RECURRENCE_DSL_DEBUG=1)"


class UsageError(Exception):
    """A bad command line (exit 2)."""


class FileError(Exception):
    """A problem with a whole input file, printed as `FILE: error: ...` (exit 2)."""


def load_file(file: str) -> dict[str, Recurrence]:
    """The recurrences of the `.rec` file `file`; an error if it has none (empty, or only comments)."""
    recs = load(Path(file))
    if not recs:
        raise FileError(f"{file}: error: no recurrence in this file")
    # Every command that reads a spec says what in it is most likely a mistake, on stderr (stdout stays the
    # command's own output, e.g. `show --json`).
    for rec in recs.values():
        for warning in rec.warnings:
            print(warning.render(), file=sys.stderr)
    return recs


def parse_shape(text: str | None) -> dict[str, int]:
    """`B=2,T=64,K=16` -> {"B": 2, "T": 64, "K": 16}."""
    sizes: dict[str, int] = {}
    if not text:
        return sizes
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise UsageError(f"--shape: expected NAME=INT pairs separated by commas, got '{part}'")
        digits = value.strip()
        if not (digits.isascii() and digits.lstrip("+-").isdigit()) or len(digits) > 30:
            raise UsageError(f"--shape: size {name} must be an integer, got '{value[:40]}'")
        number = int(digits)
        least = 0 if name == "T" else 1
        if not least <= number <= MAX_SIZE:
            raise UsageError(f"--shape: size {name} must be between {least} and {MAX_SIZE}, got {number}")
        if name in sizes and sizes[name] != number:
            raise UsageError(f"--shape: size {name} is given twice, as {sizes[name]} and {number}")
        sizes[name] = number
    return sizes


def _select(recs: dict[str, Recurrence], name: str | None) -> list[Recurrence]:
    """The recurrences a command works on (all, or --name's). A selected one without a state is a SpecError
    here, before the command prints anything: every command compiles or describes compiled forms, which a
    stateless body has none of (`require_state`, the error compile() raises)."""
    if name is not None and name not in recs:
        raise UsageError(f"--name: no recurrence '{name}' in the file; it has {', '.join(recs)}")
    selected = list(recs.values()) if name is None else [recs[name]]
    for rec in selected:
        require_state(rec.checked)
    return selected


def _prepare_triton(device: str) -> bool:
    """Whether Triton paths can run; on a machine without a GPU they run in Triton's interpreter, which
    must be switched on before the kernels are imported."""
    import os

    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        import warnings

        # The interpreter runs the kernels in numpy, which warns of each overflow and division by zero that the
        # kernels' float32 arithmetic meets on purpose (exp(-inf), a masked lane); a GPU is silent, and every path
        # is checked against the reference anyway.
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.runtime\.interpreter")
    from .compiler import triton_available

    return triton_available()


def _device(args) -> str:
    """--device, or cuda when there is one; a UsageError (exit 2) for --device cuda on a machine without CUDA."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        why = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        raise UsageError(f"--device cuda: {why}; the only device available here is cpu (--device cpu)")
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def check_shape_names(rec, given: dict, call_sizes, only: bool) -> None:
    """--shape may name the call's own sizes (B, T, H) and the recurrence's; with one recurrence, nothing else."""
    unknown = set(given) - set(call_sizes) - set(rec.checked.sizes)
    if unknown and only:
        raise UsageError(f"--shape: {rec.name} has no size {', '.join(sorted(unknown))}; its sizes are "
                         f"B, T, H{''.join(', ' + s for s in rec.checked.sizes)}")


def cmd_check(args) -> int:
    import torch

    from .validate import check_recurrence, format_report

    recs = _select(load_file(args.file), args.name)
    given = parse_shape(args.shape)
    dtype = getattr(torch, args.dtype)
    device = _device(args)
    use_triton = not args.no_triton  # (without triton, the report says the Triton rows were not run, and why)
    if use_triton:
        _prepare_triton(device)
    status = 0
    for rec in recs:
        check_shape_names(rec, given, DEFAULT_SIZES, only=len(recs) == 1)
        sizes = {s: given.get(s, DEFAULT_DIM) for s in rec.checked.sizes}
        batch = given.get("B", DEFAULT_SIZES["B"])
        length = given.get("T", DEFAULT_SIZES["T"])
        heads = given.get("H", DEFAULT_SIZES["H"])
        shown = _CheckProgress(rec.name, sys.stderr)
        try:
            report = check_recurrence(rec, sizes, batch, length, heads, dtype=dtype, seed=args.seed, device=device,
                                      triton=use_triton, grad=not args.no_grad, progress=shown)
        finally:
            shown.clear()
        print(format_report(report))
        print("\n".join(config_lines(rec, sizes, batch, length, heads, dtype, device)))
        print()
        if not report.ok:
            status = 1
        if args.prove and not print_proof(rec):
            status = 1
    if status:
        print("some paths exceed their tolerance")
    elif length == 0:  # no relative error to speak of: say what was checked instead
        print("all paths agree at T=0: each returned empty outputs of the reference's shape and, as its final "
              "state, the initial state unchanged")
    else:
        print("all paths within tolerance")
    return status


def print_proof(rec: Recurrence) -> bool:
    """Unroll T=4 steps with sizes 2 symbolically; print whether each form equals the recurrence exactly."""
    from .prove import proof_setup, prove

    analysis = analyse(rec.checked)
    results = prove(analysis, progress=_proof_progress(rec.name))
    print(f"{rec.name}: symbolic proof ({proof_setup(analysis)}) that each form equals the recurrence")
    if results and "chunked" in analysis.forms:
        for s in rec.checked.states:
            if _flattened_axes(analysis, s.name):
                x, y, v = s.dims
                print(f"  (chunked, parallel: {s.name}[{x}, {y}, {v}] held as [{x} * {y}, {v}], its first two axes "
                      "flattened into one key axis, k and q built over the pair)")
    if not results:
        print(f"  only the recurrent form exists ({analysis.cls.value}): nothing to prove")
    for r in results:
        print(f"  {r.form:<9} {r.value:<10} {r.elements:>3} elements  {r.verdict}")
    print()
    return all(r.proved for r in results)


class _CheckProgress:
    """`check`'s progress on a terminal: one line, rewritten as each path starts (`gla: checking triton/chunked,
    path 7 of 12...`) and erased before the table prints; nothing when stderr is not a terminal (a log, a pipe)."""

    def __init__(self, name: str, stream):
        self.name, self.stream, self.width = name, stream, 0
        self.enabled = bool(getattr(stream, "isatty", lambda: False)())

    def __call__(self, path: str, number: int, count: int) -> None:
        if self.enabled:
            text = f"{self.name}: checking {path}, path {number} of {count}..."
            self.stream.write("\r" + text.ljust(self.width))
            self.stream.flush()
            self.width = len(text)

    def clear(self) -> None:
        if self.enabled and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


def _proof_progress(name: str):
    """`prove`'s progress on stderr, one line a part, its time when it ends (`gla: proving chunked o (8
    elements)... 3.2 s`): an element can take seconds of expansion, a proof minutes, never on a silent terminal."""
    def show(part: str, seconds: float | None) -> None:
        if seconds is None:
            print(f"{name}: {part}...", end="", file=sys.stderr, flush=True)
        else:
            print(f" {seconds:.1f} s", file=sys.stderr, flush=True)
    return show


def _flattened_axes(analysis, name: str) -> list[int]:
    """The state axes the chunked form flattens into one key axis ([0, 1] for a 3-axis state's pair), else []."""
    sa = analysis.chunk_analysis.states.get(name)
    return [0, 1] if sa is not None and sa.chunk is not None and sa.chunk.pair else []


def _outer_products(analysis, name: str) -> dict:
    """{"chunked_outer_products": r} for a state whose injection the chunked form runs as a sum of r outer products
    (r sub-steps per step, `analysis._plan_sum_of_outer`), else {}."""
    sa = analysis.chunk_analysis.states.get(name)
    if sa is None or sa.chunk is None or not sa.chunk.sub_steps or sa.cls is TransitionClass.RANK_R_UPDATE:
        return {}
    return {"chunked_outer_products": len(sa.chunk.sub_steps)}


def describe(rec: Recurrence, analysis=None) -> dict:
    """The JSON form of a recurrence (`recdsl show --json`); `analysis`: `analyse(rec.checked)`, when the caller has
    it already."""
    from codegen.triton_recurrent import triton_unavailable

    c = rec.checked
    analysis = analysis or analyse(c)

    def sym(s):
        return {"name": s.name, "shape": [d for d in s.dims]}

    return {
        "name": c.name,
        "spec_hash": rec.spec_hash,
        "direction": "reverse" if c.reverse else "forward",
        "sizes": list(c.sizes),
        "inputs": [sym(s) for s in c.inputs],
        "params": [sym(s) for s in c.params],
        "states": [{**sym(s), "class": analysis.states[s.name].cls.value, "reason": analysis.states[s.name].reason,
                    "chunked_as_transpose": s.name in analysis.transposed,
                    "chunked_with_unit_key_axis": s.name in analysis.lifted,
                    "chunked_with_flattened_axes": _flattened_axes(analysis, s.name),
                    **_outer_products(analysis, s.name),
                    **({"rank": analysis.states[s.name].rank}
                       if analysis.states[s.name].cls is TransitionClass.RANK_R_UPDATE else {})} for s in c.states],
        "outputs": [sym(s) for s in c.outputs],
        "temporaries": [sym(s) for s in c.temps],
        "statements": [c.source.line_text(s.span.line).strip() for s in c.statements],
        "class": analysis.cls.value,
        "forms": list(analysis.forms),
        "unavailable": dict(analysis.unavailable),
        "triton_unavailable": dict(triton_unavailable(analysis)),
        "auto_order": _auto_order(analysis),
    }


def _auto_order(analysis) -> str:
    """Which form `form="auto"` runs (`codegen.dispatch.pick_form`), in words."""
    from codegen.dispatch import SCAN_BYTES, SCAN_HELD_BYTES
    from codegen.module import scan_first

    limit = f"{SCAN_HELD_BYTES >> 20} MiB, or ${SCAN_BYTES}"
    if scan_first(analysis):
        return ("recurrent for T <= 16; else the scan (every state is a vector, which the chunked and parallel forms "
                f"take lifted to [1, D]) unless, on the Triton backend, what it keeps for its backward passes {limit}; "
                "past that, parallel up to the chunk size and chunked beyond")
    return ("recurrent for T <= 16; else parallel up to the chunk size and chunked beyond, where the spec has them; "
            "else the scan, or on the Triton backend the recurrent form where the scan would keep more than "
            f"{limit} for its backward")


def explanation(rec: Recurrence, analysis=None) -> str:
    """The analysis in words (`recdsl explain`, and `recdsl show` after the declarations): the recurrence's class,
    each state's class and why, the forms derived with their mathematics, why each other form is not there, and
    the forms the Triton backend lacks and why. `analysis`: `analyse(rec.checked)`, when the caller has it."""
    from codegen.triton_recurrent import triton_unavailable

    analysis = analysis or analyse(rec.checked)
    lines = [explain(analysis)]
    lines += [f"  on the triton backend, no {form} form: {why}" for form, why in triton_unavailable(analysis).items()]
    lines.append(f"  form auto: {_auto_order(analysis)}")
    return "\n".join(lines)


def cmd_explain(args) -> int:
    recs = _select(load_file(args.file), args.name)
    if args.json:
        keys = ("name", "spec_hash", "class", "states", "forms", "unavailable", "triton_unavailable", "auto_order")
        print(json.dumps({"recurrences": [{k: v for k, v in describe(r).items() if k in keys} for r in recs]},
                         indent=2))
        return 0
    print("\n\n".join(explanation(rec) for rec in recs))
    return 0


def cmd_show(args) -> int:
    recs = _select(load_file(args.file), args.name)
    given = parse_shape(args.shape)
    if args.json and given:
        raise UsageError("--shape sets the shape of the text's 'config of a call' lines, which show --json does not "
                         "print; drop --json, or drop --shape")
    for rec in recs:  # every name checked before anything is printed or written
        check_shape_names(rec, given, TUNE_DEFAULTS, only=len(recs) == 1)
    if args.graph:
        write_graphs(recs, Path(args.graph), Path(args.file), force=args.force)
    if args.json:
        print(json.dumps({"recurrences": [describe(r) for r in recs]}, indent=2))
        return 0
    for rec in recs:
        analysis = analyse(rec.checked)
        d = describe(rec, analysis)

        def fmt(items):
            return ", ".join(f"{s['name']}[{', '.join(map(str, s['shape']))}]" if s["shape"] else s["name"]
                             for s in items) or "-"

        print(f"{'reverse ' if d['direction'] == 'reverse' else ''}recurrence {d['name']}  "
              f"(spec hash {d['spec_hash']})")
        print(f"  inputs:      {fmt(d['inputs'])}")
        print(f"  params:      {fmt(d['params'])}")
        print(f"  states:      {fmt(d['states'])}")
        print(f"  outputs:     {fmt(d['outputs'])}")
        print(f"  temporaries: {fmt(d['temporaries'])}")
        print("  step:")
        for line in d["statements"]:
            print(f"    {line}")
        print()
        print(explanation(rec, analysis))
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        sizes = {s: given.get(s, TUNE_DIM) for s in rec.checked.sizes}
        call = {k: given.get(k, v) for k, v in TUNE_DEFAULTS.items()}
        print("\n".join(config_lines(rec, sizes, call["B"], call["T"], call["H"], torch.float32, device)))
        print()
    return 0


# Graphviz renders a step's dataflow graph in well under a second; past this `dot` is taken as hung.
GRAPH_TIMEOUT_S = 120.0


def _same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` name one file (a symlink, a relative path, a hard link, /dev/fd/N: `os.path.samefile`);
    False when either does not exist."""
    try:
        return a.exists() and a.samefile(b)
    except OSError:
        return False


def write_graphs(recs: list[Recurrence], path: Path, spec: Path, force: bool = False) -> None:
    """The dataflow graph as Graphviz source at `path` (one file per recurrence when there are several),
    and a PNG beside it when the `dot` program is installed. A file there that does not start with
    GRAPH_MARKER (one recdsl did not write), or whose text no longer matches the sha256 on its second line (edited
    since), is replaced only with `force`; the spec itself never."""
    import shutil
    import subprocess

    from codegen.cache import write_atomically
    from codegen.module import OverwriteError, check_target, stamp

    from .dataflow import build_dataflow, to_dot

    plans = []
    for rec in recs:
        target = path if len(recs) == 1 else path.with_name(f"{path.stem}.{rec.name}{path.suffix}")
        dot_path = target.with_suffix(".dot") if target.suffix == ".png" else target
        png = dot_path.with_suffix(".png")
        for out in (dot_path, png):
            if _same_file(out, spec):
                raise UsageError(f"--graph: {out} is the spec {spec}; the graph is never written onto it")
        try:
            in_place = check_target(dot_path, GRAPH_MARKER, force, "written")
        except OverwriteError as err:
            raise UsageError(f"--graph: {err}") from None
        plans.append((rec, dot_path, png, in_place))
    for rec, dot_path, png, in_place in plans:
        text = f"{GRAPH_MARKER} of {rec.name}; written by recurrence_dsl, replaced by `recdsl show --graph`\n"
        text = stamp(text + to_dot(build_dataflow(rec.checked)), comment="//")
        try:
            if in_place:
                with dot_path.open("w") as f:
                    f.write(text)
            else:
                write_atomically(dot_path, text, private=False)
        except OSError as err:
            raise UsageError(f"--graph: cannot write {dot_path}: {err.strerror or err}") from None
        print(f"wrote {dot_path}", file=sys.stderr)
        if shutil.which("dot") and not in_place:
            try:
                done = subprocess.run(["dot", "-Tpng", str(dot_path), "-o", str(png)], capture_output=True,
                                      text=True, timeout=GRAPH_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise UsageError(f"--graph: dot gave no answer within {GRAPH_TIMEOUT_S:g} s rendering {png}; it "
                                 f"was stopped ({dot_path} is written)") from None
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["failed"])[-1]
                raise UsageError(f"--graph: dot could not write {png}: {last}")
            print(f"wrote {png}", file=sys.stderr)


def cmd_compile(args) -> int:
    from codegen.load import module_text
    from codegen.module import OverwriteError, write_module

    if args.output == "-":  # (a module is a file recdsl stamps and checks before replacing, never a stream)
        raise UsageError("-o -: compile writes the module to a file, not to standard output; give its file name, "
                         f"e.g. -o {Path(args.file).stem if Path(args.file).stem.isidentifier() else 'layer'}.py")
    out = Path(args.output)
    if out.is_dir():  # (before the module is generated: say where a file could go)
        example = out / f"{Path(args.file).stem}.py"
        raise UsageError(f"-o: {out} is a directory; give the module's file, e.g. -o {example}")
    if not out.parent.is_dir():  # (before the module is generated, which takes seconds)
        missing = [p for p in reversed((out.parent, *out.parent.parents)) if not p.exists()]
        if not missing:  # the parent exists, as something other than a folder
            raise UsageError(f"-o: cannot write {out}: {out.parent} is not a folder")
        raise UsageError(f"-o: cannot write {out}: the folder {missing[0]} does not exist; folders are not created: "
                         "check it for a typo, or create the folder first")
    if out.exists() and not out.is_file():
        pass  # (a device or a pipe, with --force: no module to import; check_target refuses it otherwise)
    elif out.suffix != ".py":
        print(f"recdsl compile: warning: {out.name} is not an importable module name (`import` finds only a file "
              f"ending in .py); name it like {out.stem if out.stem.isidentifier() else 'layer'}.py", file=sys.stderr)
    elif not out.stem.isidentifier():
        print(f"recdsl compile: warning: {out.name} is not an importable module name (`import {out.stem}` "
              "fails); name it with letters, digits and _ only", file=sys.stderr)
    if _same_file(out, Path(args.file)):  # (--force too: the spec is never a module's to replace)
        raise UsageError(f"-o: {args.output} is the spec {args.file}; the module is never written onto it (give "
                         "another -o OUT.py)")
    everything = load_file(args.file)
    recs = _select(everything, args.name)
    # (--name is in the module's "Regenerate with" line where it selects: on a file of one recurrence the module is
    # the same without it, the one compile() imports)
    source = module_text([analyse(r.checked) for r in recs], args.file, args.name if len(everything) > 1 else None)
    try:
        write_module(source, Path(args.output), force=args.force)
    except OverwriteError as err:
        raise UsageError(f"-o: {err}") from None
    except OSError as err:
        raise UsageError(f"-o: cannot write {args.output}: {err.strerror or err}") from None
    for rec in recs:
        a = analyse(rec.checked)
        print(f"{rec.name}: {a.cls.value}; forms {', '.join(a.forms)}")
    print(f"wrote {args.output} ({len(source.splitlines())} lines)")
    return 0


STORE_RULE = ("Which tuning store: $RECURRENCE_DSL_TUNING_STORE (a file path) when set, else tuning.sqlite in "
              "the generated modules' cache folder: $RECURRENCE_DSL_CACHE, else $XDG_CACHE_HOME/recurrence_dsl or "
              "~/.cache/recurrence_dsl, else (that folder unusable: a read-only HOME) $TMPDIR/recurrence_dsl-UID. "
              "compile(), generated "
              "modules and recdsl tune all use that rule; --store PATH (or compile(tuning=PATH)) names another store "
              "for one run. RECURRENCE_DSL_TUNING=0 switches off the lookups of calls in the rule's store. A call "
              "runs, in order: its own chunk_size=/config=, compile()'s explicit chunk_size=, the store's choice for "
              "its key and mode (fwdbwd when grad is on and an input or param requires grad, else fwd), the "
              "defaults.")


class _Progress:
    """The progress of one `tune()` on stderr: a tqdm bar (tqdm comes with optuna), else a plain line."""

    def __init__(self, name: str, enabled: bool):
        self.name, self.enabled, self.bar, self.last = name, enabled, None, 0.0
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=1, desc=f"tune {name}", unit="run", file=sys.stderr, leave=False,
                                dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def step(self, done: int, total: int, label: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.total = total
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(done - self.bar.n)
            self.bar.refresh()  # every step: a step is at least one timed run, and short runs must show too
        else:
            print(f"\rtune {self.name}: {done}/{total} {label[:60]:<60}", end="", file=sys.stderr, flush=True)

    def waiting(self, waited: float, limit: float) -> None:
        """Shown while another process holds the store locked (always, even with --no-progress)."""
        text = f"tune {self.name}: waiting for the tuning store's lock, {waited:.0f} of {limit:.0f} s"
        if self.bar is not None:
            self.bar.set_description_str(text)
        else:
            print(f"\r{text:<100}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


def _auto_form(analysis, backend: str, given: dict) -> str:
    """The form `form="auto"` runs on `backend` for the shape's sequences at the default chunk_size (on the Triton
    backend the scan form of vector states, RG-LRU's and minGRU's, while what it keeps for its backward is within
    auto's limit, `scan_held_bytes`)."""
    from types import SimpleNamespace

    from codegen.dispatch import pick_form, scan_held_bytes
    from codegen.layer import DEFAULT_CHUNK_SIZE
    from codegen.load import load_layer
    from codegen.module import scan_first

    forms = analysis.forms
    batch, length = given.get("B", TUNE_DEFAULTS["B"]), given.get("T", TUNE_DEFAULTS["T"])

    def held() -> int:  # (what the layer's auto weighs on the Triton backend: its spec's scan_held, the shape)
        sizes = {s: given.get(s, TUNE_DIM) for s in analysis.recurrence.sizes}
        call = SimpleNamespace(heads=given.get("H", TUNE_DEFAULTS["H"]),
                               dims=lambda sym: tuple(sizes[d] if isinstance(d, str) else d for d in sym.dims))
        return scan_held_bytes(load_layer(analysis).recurrence, call, length, batch)

    return pick_form(tuple(forms), length, DEFAULT_CHUNK_SIZE, batch, held if backend == "triton" else 0,
                     scan_first=scan_first(analysis))


def _form_to_tune(analysis, backend: str, given: dict, tunable, auto: str | None = None) -> str:
    """The form `recdsl tune` tunes without --form: the one auto runs at the shape (`_auto_form`, or `auto` when
    given), so that the stored config is the one a call of that shape reads, where that form takes a config on
    `backend`; else chunked where the spec has it, else recurrent, where that takes a config (else auto's form,
    which `recdsl tune` then skips as having nothing to tune)."""
    picked = auto if auto is not None else _auto_form(analysis, backend, given)
    if tunable(picked, backend):
        return picked
    instead = "chunked" if "chunked" in analysis.forms else "recurrent"
    return instead if tunable(instead, backend) else picked  # (nothing to tune: the skip names what auto runs)


def _warn_once(notes: list[str], warned: set[str]) -> None:
    """Print each timing warning on stderr unless one that differs from it only in its figures was printed in
    this run: the tuner records the thread warnings with every result, read again when it starts (a load
    average that moved is the same warning), and `recdsl tune` printed them before any timing."""
    for note in notes:
        kind = re.sub(r"\d+(?:\.\d+)?", "#", note)
        if kind not in warned:
            warned.add(kind)
            print(f"recdsl tune: warning: {note}", file=sys.stderr)


def cmd_tune(args) -> int:
    import torch

    from autotune.space import tunable
    from autotune.store import StoreError, StoreLocked, open_store, store_source
    from autotune.threads import thread_settings, timing_warnings
    from autotune.tuner import NoLegalConfig, tune

    if args.backend == "triton" and args.dtype == "float64":  # (refused before anything is read or imported)
        raise UsageError("--dtype float64 with --backend triton: the triton backend takes float32, float16 or "
                         "bfloat16; float64 tunes the torch backend's forms (--backend torch)")
    device = _device(args)
    backend = args.backend or ("triton" if device == "cuda" else "torch")
    if backend == "triton" and args.dtype == "float64":  # (the backend defaulted to triton on cuda)
        raise UsageError(f"--dtype float64: on {device} the backend defaults to triton, which takes float32, float16 "
                         "or bfloat16; float64 tunes the torch backend's forms (--backend torch)")
    if args.lock_wait < 0:
        raise UsageError(f"--lock-wait must be >= 0 seconds, got {args.lock_wait:g}")
    if backend == "triton" and not _prepare_triton(device):
        from .compiler import triton_import_error

        how = "--backend triton:" if args.backend else f"on {device} the backend defaults to triton, but"
        raise UsageError(f"{how} triton is not importable here ({triton_import_error()}): pip install triton (or "
                         "what its import error names), or tune the torch backend (--backend torch)")
    recs = _select(load_file(args.file), args.name)
    given = parse_shape(args.shape)
    unused = [flag for flag, given_ in (("--target", args.target), ("--no-compiler", args.no_compiler)) if given_]
    if backend == "torch" and unused:  # (a warning: a script may pass the same flags to both backends)
        # (The backend defaulted on a CPU: say so, rather than name a flag the user did not pass.)
        why = "with --backend torch" if args.backend else f"on {device}, where the backend defaults to torch"
        print(f"recdsl tune: warning: {' and '.join(unused)} only concern{'s' * (len(unused) == 1)} the triton "
              f"backend's kernels; ignored {why} (--backend triton tunes them)", file=sys.stderr)
    if given.get("T", 1) < 1:  # (check and kernels run T = 0; a timing of no steps has no backward, no meaning)
        raise UsageError("--shape: tune times calls of at least one step, got T=0")
    # What each recurrence tunes, decided before the store is touched: a run that tunes nothing stores nothing
    plan, skipped, instead = [], [], {}
    for rec in recs:
        check_shape_names(rec, given, TUNE_DEFAULTS, only=len(recs) == 1)
        analysis = analyse(rec.checked)
        forms = analysis.forms
        auto = None if args.form else _auto_form(analysis, backend, given)
        form = args.form or _form_to_tune(analysis, backend, given, tunable, auto)
        if auto is not None and form != auto and form in forms and tunable(form, backend):
            instead[rec.name] = (f"note: at this shape auto runs the {backend} {auto} form, which takes no config; "
                                 f"this tuned the {form} form instead, whose config a call of this shape reads with "
                                 f"form='{form}'")
        if form not in forms:
            skipped.append(f"{rec.name}: no {form} form (it has {', '.join(forms)}); skipped")
        elif not tunable(form, backend):  # the torch recurrent and parallel forms take no config
            skipped.append(f"{rec.name}: the {backend} {form} form has nothing to tune (it takes no config); skipped"
                           + (" (try --backend triton)" if backend == "torch" else ""))
        else:
            plan.append((rec, form))
    for line in skipped:
        print(line, file=sys.stderr)
    store = open_store(args.store)  # (a path only: nothing is read or written yet)
    if not plan:  # not an error (a script may tune each form in turn), but nothing may read as stored
        if args.json:
            print(json.dumps({"store": str(store.path), "results": [], "skipped": skipped}, indent=1))
        else:
            print(f"nothing tuned: {'the recurrence was' if len(recs) == 1 else 'every recurrence was'} skipped "
                  f"(see above), so nothing was stored in {store.path}")
        return 0
    try:
        store.check_writable()  # a bad --store fails before any timing
    except StoreError as err:
        raise UsageError(f"{store_source(args.store)}: {err}") from None
    warned: set[str] = set()
    if device == "cpu":  # said before the (possibly long) timing starts
        _warn_once(timing_warnings(thread_settings()), warned)
    if args.repeat < 3:  # a median of one or two runs cannot set a slow outlier aside, nor an IQR measure spread
        print(f"recdsl tune: warning: --repeat {args.repeat}: with fewer than 3 timed runs per config one slow run "
              "can decide the choice; use --repeat 3 or more (default 5) for a config worth storing",
              file=sys.stderr)
    status = 0
    results = []
    for rec, form in plan:
        sizes = {s: given.get(s, TUNE_DIM) for s in rec.checked.sizes}
        progress = _Progress(rec.name, not args.no_progress)
        try:
            result = tune(rec, sizes, given.get("B", TUNE_DEFAULTS["B"]), given.get("T", TUNE_DEFAULTS["T"]),
                          given.get("H", TUNE_DEFAULTS["H"]), getattr(torch, args.dtype), form, backend,
                          args.trials, store, device, warmup=args.warmup, repeat=args.repeat, seed=args.seed,
                          check=not args.no_check, verbose=args.verbose, mode=args.mode, progress=progress.step,
                          lock_wait_s=args.lock_wait, on_lock_wait=progress.waiting, target=args.target,
                          compiler=False if args.no_compiler else None, replace=args.replace)
        except NoLegalConfig as err:
            print(f"{rec.name}: {err}", file=sys.stderr)
            status = 1
            continue
        except StoreLocked as err:
            if getattr(err, "result", None) is not None:
                _warn_once(err.result.warnings, warned)
                print(f"{rec.name} (spec hash {err.result.spec_hash})")
                print(err.result.table(warnings=False))
                print()
            raise UsageError(str(err)) from None
        except StoreError as err:
            raise UsageError(f"{store_source(args.store)}: {err}") from None
        except ValueError as err:
            raise UsageError(str(err)) from None
        finally:
            progress.close()  # (an interrupt too: the bar never outlives the run)
        results.append(result)
        _warn_once(result.warnings, warned)  # (the tuner's own reading, a moment later: new only if it differs)
        if not args.json:
            print(f"{rec.name} (spec hash {result.spec_hash})")
            print(result.table(warnings=False))
            if rec.name in instead:
                print(instead[rec.name])
            print()
        if result.best is None:
            status = 1
    if args.json:
        print(json.dumps({"store": str(store.path), "results": [r.as_dict() for r in results], "skipped": skipped},
                         indent=1))
    else:
        from autotune.lookup import INTERPRETER as TUNING_INTERPRETER
        from autotune.store import default_path

        print(f"trials and choices stored in {store.path}")
        if any(r.device == TUNING_INTERPRETER for r in results):
            print(f"(timed in Triton's CPU interpreter, stored under the device '{TUNING_INTERPRETER}', which no call "
                  "looks up: these times exercise the tuner and say nothing of a GPU's; tune on the GPU that runs "
                  "the layer)")
        if store.path.resolve() != default_path().resolve():
            print(f"(not the store calls read by default: set RECURRENCE_DSL_TUNING_STORE={store.path} or pass "
                  "compile(..., tuning=PATH))")
    return status


def config_lines(rec: Recurrence, sizes: dict[str, int], batch: int, length: int, heads: int, dtype,
                 device: str) -> list[str]:
    """Which config a call of this shape would run, per mode (fwd and fwdbwd), and why (`Layer.config_for`)."""
    import torch

    from .compiler import compile_recurrence
    from .sampling import sample_arguments

    layer = compile_recurrence(rec, backend="torch" if device == "cpu" and dtype == torch.float64 else "auto")
    args, _ = sample_arguments(rec.checked, sizes, batch, min(length, 1 << 20), heads, dtype=dtype, seed=0)
    args = [a.to(device) for a in args]
    shape = " ".join(f"{k}={v}" for k, v in {"B": batch, "T": length, "H": heads, **sizes}.items())
    lines = [f"  config of a call ({shape}, {str(dtype).removeprefix('torch.')}, {device}):"]
    for mode in ("fwd", "fwdbwd"):
        with torch.set_grad_enabled(mode == "fwdbwd"):
            leaves = [a.detach().requires_grad_(mode == "fwdbwd" and a.is_floating_point()) for a in args]
            try:
                c = layer.config_for(*leaves)
            except CallError as err:
                lines.append(f"    {mode:<6}  cannot run: {err}")
                continue
        blocks = "".join(f", {k}={v}" for k, v in sorted(c["config"].items()))
        size = f" chunk_size={c['chunk_size']}" if c["form"] in ("chunked",) else ""
        lines.append(f"    {mode:<6}  {c['form']}/{c['backend']}{size}{blocks}  [{c['source']}: {c['why']}]")
    return lines


def _intermediates(rec, counted, sizes, batch, length, heads, dtype, config, backward=False) -> dict:
    """The run's "intermediate_bytes": the bytes of intermediate tensors the call allocated (total, per phase, per
    allocation site) and, for a spec a published kernel implements, that kernel's figure at the same shape (with
    `backward`, its forward and backward: `hand_written_backward_bytes`)."""
    from codegen.intermediate_bytes import hand_written_for

    out = counted.as_dict()
    chunk = (config or {}).get("chunk_size", 64)
    out["hand_written"] = hand_written_for(rec.name, sizes, batch, length, heads, chunk=chunk, dtype=dtype,
                                           backward=backward)
    return out


def _print_intermediates(summary: dict, counted) -> None:
    from codegen.intermediate_bytes import format_rows

    phases = ", ".join(f"{k} {v:,d}" for k, v in summary["by_phase"].items())
    line = f"  intermediate tensors: {summary['total']:,d} bytes" + (f" ({phases})" if phases else "")
    hand = summary.get("hand_written")
    if hand and "backward" in hand:
        line += (f"; hand-written forward + backward ({hand['kind']}): {hand['total']:,d} bytes (forward "
                 f"{hand['forward']:,d}, backward {hand['backward']:,d})")
    elif hand:
        line += f"; hand-written forward ({hand['kind']}): {hand['total']:,d} bytes"
    print(line)
    if counted.rows:
        print(format_rows(counted, indent="    ", limit=8))


def cmd_kernels(args) -> int:
    import os

    if "triton" not in sys.modules:
        # Kernels must compile, so Triton's interpreter (which runs them instead) stays off in this process.
        os.environ.pop("TRITON_INTERPRET", None)
    import torch

    from codegen import kernel_report as kr

    target = kr.TARGETS[args.target]
    recs = _select(load_file(args.file), args.name)
    given = parse_shape(args.shape)
    config = None
    if args.config is not None:  # (an empty --config "" is not JSON, not "no config")
        try:
            config = json.loads(args.config)
        except json.JSONDecodeError as err:
            raise UsageError(f"--config: not JSON ({err})") from None
        if not isinstance(config, dict):
            raise UsageError(f"--config: expected a JSON object of block sizes, got {args.config}")
        if not config:  # refused as a call's config={} is (codegen/dispatch.py `config_forms`): likely a slip
            raise UsageError("--config: config is empty: give at least one key, or leave --config out")
    try:
        kr.find_tools(target)
    except kr.KernelReportError as err:
        raise UsageError(str(err)) from None
    batch, length, heads = (given.get(s, kr.DEFAULT_SHAPE[s]) for s in ("B", "T", "H"))
    dtype = getattr(torch, args.dtype)
    runs, problems = [], []
    for rec in recs:
        check_shape_names(rec, given, kr.DEFAULT_SHAPE, only=len(recs) == 1)
        sizes = {s: given.get(s, kr.DEFAULT_DIM) for s in rec.checked.sizes}
        available = kr.triton_forms_of(rec)
        forms = available if args.form == "all" else [args.form]
        missing = [f for f in forms if f != "auto" and f not in available]
        if missing:
            why = f"{rec.name} has no {missing[0]} form on the triton backend (it has {', '.join(available)})"
            if len(recs) == 1:
                raise UsageError(why)
            print(f"{why}; skipped", file=sys.stderr)
            continue
        shift = analyse(rec.checked).shift
        for form in forms:
            run = {"name": rec.name, "form": form, "sizes": sizes}
            if shift is not None:  # its shift runs in torch before the rest's kernels (recurrence_dsl/shift.py)
                run["shift"] = {"states": list(shift.names), "rest": shift.inner.name}
            ran: list[str] = []  # the forms the call ran, after "auto"'s fallbacks (a form that does not fit)
            try:
                kernels, counted = kr.report_recurrence(rec, sizes, batch, length, heads, dtype=dtype,
                                                        target=target, form=form, config=config,
                                                        backward=args.backward, intermediates=True, ran=ran)
            except (kr.KernelReportError, ValueError) as err:
                # A failed compile, or a form that cannot hold its state at these sizes, is a row of the report;
                # any other error is the command's (a bad config or call).
                if not isinstance(err, kr.CompileFailed) and not getattr(err, "does_not_fit", False):
                    raise UsageError(str(err)) from None
                run["error"] = str(err)
                problems.append(str(err))
                runs.append(run)
                if not args.json:
                    print(f"{rec.name} ({form}): {err}\n")
                continue
            if form == "auto":
                run["runs_form"] = ", ".join(dict.fromkeys(ran))
            run["kernels"] = [k.as_dict() for k in kernels if k.phase == "forward"]
            if args.backward:
                run["backward"] = [k.as_dict() for k in kernels if k.phase == "backward"]
                if not run["backward"]:
                    run["backward_note"] = "no Triton backward kernels yet: the backward re-runs the torch form"
            run["problems"] = [p for k in kernels for p in k.problems()]
            run["intermediate_bytes"] = _intermediates(rec, counted, sizes, batch, length, heads, dtype, config,
                                                       args.backward)
            problems += run["problems"]
            runs.append(run)
            if not args.json:
                shape = " ".join(f"{k}={v}" for k, v in {"B": batch, "T": length, "H": heads, **sizes}.items())
                shown = form + (f" (runs {run['runs_form']})" if form == "auto" else "")
                print(f"{rec.name}: form {shown}, {shape}, {args.dtype}, {target.name} ({target.gpus})")
                if shift is not None:
                    print(f"  shift states {', '.join(shift.names)}: computed in torch by shifting along T (their "
                          f"tensors are among the intermediates); the kernels run the rest, {shift.inner.name}")
                print(kr.format_table([k for k in kernels if k.phase == "forward"]))
                if args.backward:
                    back = [k for k in kernels if k.phase == "backward"]
                    print(kr.format_table(back) if back else f"  backward: {run['backward_note']}")
                _print_intermediates(run["intermediate_bytes"], counted)
                for p in run["problems"]:
                    print(f"  ! {p}")
                print()
    rows = [k for r in runs for k in r.get("kernels", []) + r.get("backward", [])]
    if args.json:
        print(json.dumps({"target": target.name, "max_shared_bytes": target.max_shared_bytes, "dtype": args.dtype,
                          "shape": {"B": batch, "T": length, "H": heads}, "config": config,
                          "versions": kr.versions(target), "runs": runs, "problems": problems, "ok": not problems},
                         indent=1))
    else:
        print(f"{len(rows)} kernels ({sum(k['launches'] for k in rows)} launches) compiled for {target.name} "
              f"(shared memory per block at most {target.max_shared_bytes} bytes): "
              + (f"{len(problems)} problem{'s' * (len(problems) != 1)}" if problems
                 else "no spills, shared memory and grids within the limits"))
    return 1 if problems else 0


def _integer_at_least(least: int):
    """An argparse type: an integer >= `least`, so a bad count is refused while the command line is parsed, before
    any spec is read or any work (a progress bar, a timing) starts."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {least}, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be an integer >= {least}, got {value}")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    """argparse's parser (its subcommands' too) with a bad command line reported in one line, as recdsl's other
    errors are: `recdsl kernels: error: argument --target: invalid choice: ...; see recdsl kernels --help`, not the
    whole usage block first. Exit status 2, as argparse's."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="recdsl", description="Compile and check linear recurrences written "
                                     "as .rec specs.",
                     epilog="Run `recdsl COMMAND --help` for a command's options. Exit status: 0 success; 1 a path "
                     "past its tolerance (check), every trial failed (tune), a kernel that spills, needs too much "
                     "shared memory, launches too large a grid or does not compile (kernels); 2 a spec error or a "
                     "bad command line; 3 an internal error (a bug in recurrence_dsl: please report it).")
    parser.add_argument("--version", action="version", version=f"recdsl {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    check = sub.add_parser("check", help="run every executable path against the reference",
                           description="Parse and check FILE, run the float64 reference on random inputs, and "
                           "compare every executable path against it. Exits 1 if any exceeds its tolerance.")
    check.add_argument("file", metavar="FILE", help=FILE_HELP)
    check.add_argument("--name", help="only this recurrence (default: every one in FILE)")
    check.add_argument("--shape", help=f"sizes, e.g. B=2,T=64,H=2,K=16,V=16 (defaults B={DEFAULT_SIZES['B']}, "
                       f"T={DEFAULT_SIZES['T']}, H={DEFAULT_SIZES['H']}, every spec size {DEFAULT_DIM})")
    check.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the paths under test (default "
                       "float32)")
    check.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    check.add_argument("--device", choices=("cpu", "cuda"), help="where the paths run (default: cuda if available; "
                       "on cpu, Triton kernels run in Triton's interpreter)")
    check.add_argument("--no-triton", action="store_true", help="skip the Triton paths")
    check.add_argument("--no-grad", action="store_true", help="skip the gradient rows (each path's gradients of "
                       "a weighted sum of its outputs and final states, against the reference's autograd)")
    check.add_argument("--prove", action="store_true", help="also prove with sympy, on a small unrolled "
                       "instance, that each derived form equals the recurrence exactly")
    check.set_defaults(run=cmd_check)

    show = sub.add_parser("show", help="print the parsed recurrence",
                          description="Print the declarations and the step of each recurrence in FILE.")
    show.add_argument("file", metavar="FILE", help=FILE_HELP)
    show.add_argument("--name", help="only this recurrence")
    show.add_argument("--json", action="store_true", help="print JSON {\"recurrences\": [...]}")
    show.add_argument("--shape", help=f"sizes of the 'config of a call' lines, e.g. B=1,T=8192,H=16,K=128,V=128 "
                      f"(defaults B={TUNE_DEFAULTS['B']}, T={TUNE_DEFAULTS['T']}, H={TUNE_DEFAULTS['H']}, every spec "
                      f"size {TUNE_DIM})")
    show.add_argument("--graph", metavar="OUT.dot", help="write the step's dataflow graph (Graphviz; .png too "
                      "when graphviz is installed)")
    show.add_argument("--force", action="store_true", help="let --graph replace a file recdsl did not write "
                      "(never the spec itself)")
    show.set_defaults(run=cmd_show)

    expl = sub.add_parser("explain", help="explain the analysis: classes, forms, why the others are not there",
                          description="Print, per recurrence of FILE, what the analysis derived: the recurrence's "
                          "class, each state's class and why, the forms it has with their mathematics, why each "
                          "other form is not there, and the forms the Triton backend lacks (what `recdsl show` "
                          "prints after the declarations).")
    expl.add_argument("file", metavar="FILE", help=FILE_HELP)
    expl.add_argument("--name", help="only this recurrence")
    expl.add_argument("--json", action="store_true", help="print JSON {\"recurrences\": [{\"name\", \"class\", "
                      "\"states\", \"forms\", \"unavailable\", \"triton_unavailable\", ...}]}")
    expl.set_defaults(run=cmd_explain)

    comp = sub.add_parser("compile", help="write a standalone Python module for the recurrences of FILE",
                          description="Write one standalone, readable module (importing only torch, and triton "
                          "when installed) with a function and a torch.nn.Module per recurrence.")
    comp.add_argument("file", metavar="FILE", help=FILE_HELP)
    comp.add_argument("-o", "--output", required=True, metavar="OUT.py", help="the module to write")
    comp.add_argument("--name", help="only this recurrence")
    comp.add_argument("--force", action="store_true", help="overwrite OUT.py even if recurrence_dsl did not "
                      "generate it")
    comp.set_defaults(run=cmd_compile)

    tune = sub.add_parser("tune", help="tune block sizes on this machine and store every trial",
                          description="Time the configs of a form (chunk size; block sizes, warps and stages of "
                          "the Triton kernels) as the layer runs them (--mode), pruning configs that cannot fit "
                          "before timing any (optuna screens large spaces), then time the default and the "
                          "fastest candidates interleaved, --repeat rounds each, and report each one's median and "
                          "spread (IQR). A config is chosen only when its median beats the default's by more "
                          "than 5% and by more than half the sum of the two IQRs; otherwise the default is kept "
                          "and the table says so. Every trial and the choice go to the tuning store that "
                          "compile() and generated modules read.",
                          epilog=STORE_RULE.replace("%", "%%"))
    tune.add_argument("file", metavar="FILE", help=FILE_HELP)
    tune.add_argument("--name", help="only this recurrence (default: every one in FILE)")
    tune.add_argument("--shape", help=f"sizes, e.g. B=2,T=1024,H=4,K=64,V=64 (defaults B=2, T=1024, H=4, "
                      f"every spec size {TUNE_DIM})")
    tune.add_argument("--dtype", choices=DTYPES, default="float32", help="input dtype (default float32; float64 "
                      "tunes the torch backend only)")
    tune.add_argument("--form", choices=("chunked", "parallel", "recurrent", "scan"), help="the form to tune "
                      "(default: the one form='auto' runs at the shape with the default chunk_size, where it takes "
                      "a config, else chunked where the spec has it, else recurrent; parallel: the Triton backend's, "
                      "which auto runs for 16 < T <= chunk_size; scan: the Triton backend's block_t, block_n and "
                      "num_warps, which auto runs first for vector states such as RG-LRU's and minGRU's)")
    tune.add_argument("--backend", choices=("torch", "triton"), help="default: triton on cuda, torch on cpu")
    tune.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available (on cpu, Triton "
                      "runs in its interpreter and is stored as 'cpu-interpreter')")
    tune.add_argument("--trials", type=_integer_at_least(1), default=20, help="configs to time (default 20)")
    tune.add_argument("--mode", choices=("fwd", "fwdbwd"), default="fwdbwd",
                      help="what is timed: fwdbwd (default), forward and backward, what a training step runs and "
                      "what a call with grad on and inputs or params requiring grad looks up; fwd, the forward "
                      "under no_grad, what inference calls look up")
    tune.add_argument("--store", metavar="PATH", help="the SQLite store (default: $RECURRENCE_DSL_TUNING_STORE, "
                      "else tuning.sqlite in the cache folder, created with its folders: see below); PATH's folder "
                      "must exist (exit 2 otherwise: a typo creates no folders), and an existing PATH must be a "
                      "tuning store")
    tune.add_argument("--lock-wait", type=float, default=60.0, metavar="SECONDS",
                      help="how long to wait for a store another process holds locked before saving the trials "
                      "to a side file (default 60)")
    tune.add_argument("--target", choices=("sm_80", "sm_90", "sm_100"),
                      help="triton: the GPU target each config is compiled for (without running) to read its "
                           "registers, spills and shared memory; configs that spill are dropped untimed "
                           "(default: the CUDA device's, sm_90 on cpu)")
    tune.add_argument("--no-compiler", action="store_true",
                      help="triton: prune with the hand-kept estimate of autotune/space.py instead of the "
                           "compiler's figures (what happens anyway without ptxas / cuobjdump)")
    tune.add_argument("--warmup", type=_integer_at_least(0), default=2, help="untimed runs per config (default 2)")
    tune.add_argument("--repeat", type=_integer_at_least(1), default=5, help="interleaved rounds: timed runs per "
                      "config, median and IQR kept (default 5)")
    tune.add_argument("--seed", type=int, default=0, help="seed of the inputs and of the sampler")
    tune.add_argument("--no-check", action="store_true", help="skip the check of each config's outputs "
                      "against the torch form")
    tune.add_argument("--replace", action="store_true", help="store this run's choice even when it timed fewer "
                      "configs than the run whose choice is stored for the same key and mode (by default that "
                      "earlier choice is kept, and the table says so; a choice replaced is always named)")
    tune.add_argument("--verbose", action="store_true", help="print each trial as it finishes")
    tune.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    tune.add_argument("--json", action="store_true", help="print JSON {\"store\", \"results\": [...], \"skipped\": "
                      "[why, ...]} (with the thread settings) instead of the tables")
    tune.set_defaults(run=cmd_tune)

    kernels = sub.add_parser("kernels", help="compile every Triton kernel a call launches for a GPU, without one, "
                             "and report registers, spills and shared memory",
                             description="Compile, for a GPU target and without a GPU, every Triton kernel the "
                             "call launches (forward; --backward also runs a backward pass), and print per kernel "
                             "its grid, num_warps, num_stages, registers, spilled bytes (local memory per thread), "
                             "shared memory and compile time. Exits 1 if a kernel spills, needs more shared "
                             "memory than the target has, launches a grid past CUDA's limits (2^31 - 1 programs "
                             "on axis 0, 65535 on axes 1 and 2) or does not compile.")
    kernels.add_argument("file", metavar="FILE", help=FILE_HELP)
    kernels.add_argument("--name", help="only this recurrence (default: every one in FILE)")
    kernels.add_argument("--shape", help="sizes, e.g. B=2,T=256,H=4,K=64,V=64 (defaults B=2, T=256, H=4, every "
                         "spec size 64)")
    kernels.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="bfloat16",
                         help="dtype of the call's inputs (default bfloat16)")
    kernels.add_argument("--target", choices=("sm_80", "sm_90", "sm_100"), default="sm_90",
                         help="the GPU to compile for: sm_80 (A100), sm_90 (H100, H200; the default), sm_100 (B200)")
    kernels.add_argument("--form", choices=("auto", "recurrent", "scan", "chunked", "parallel", "all"), default="auto",
                         help="the form the call runs (default auto, as a call would; all: each Triton form)")
    kernels.add_argument("--config", metavar="JSON", help="a tuning config for the form, e.g. '{\"chunk_size\": 64, "
                         "\"block_k\": 64, \"block_v\": 32, \"num_warps\": 4, \"num_stages\": 2}'")
    kernels.add_argument("--backward", action="store_true", help="also run a backward pass and report the Triton "
                         "kernels it launches")
    kernels.add_argument("--json", action="store_true", help="print JSON {\"target\", \"runs\": [{\"name\", "
                         "\"form\", \"kernels\": [...], \"intermediate_bytes\": {\"total\", \"tensors\", "
                         "\"hand_written\"}}], \"problems\", \"ok\", ...}")
    kernels.set_defaults(run=cmd_kernels)
    for command in sub.choices.values():
        # --debug after the command too (`recdsl check FILE --debug`); SUPPRESS leaves recdsl's own where not given
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        command.set_defaults(command_parser=command)
    return parser


def run_command(args) -> int:
    """Run a parsed command with recdsl's error handling: spec and usage errors exit 2, never a traceback."""
    try:
        return args.run(args)
    except SpecError as err:
        print(err.render(), file=sys.stderr)
        return 2
    except FileError as err:
        print(err, file=sys.stderr)
        return 2
    except (UsageError, FileNotFoundError, CallError) as err:
        print(f"recdsl {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `recdsl show ... | head`
        sys.stderr.close()
        return 0
    except OSError as err:  # reading the spec or writing an output: a one-line error, never a traceback
        where = f"{err.filename}: " if err.filename else ""
        print(f"recdsl {args.command}: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - anything else is ours to fix: say so, in one line
        if getattr(args, "debug", False) or _debug_from_environment():
            traceback.print_exc()
        what = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        print(f"recdsl {args.command}: internal error (recdsl {__version__}): {what}; this is a bug in "
              "recurrence_dsl: please report it with the spec file and this command line (run again with --debug "
              "for the traceback)", file=sys.stderr)
        return BUG_EXIT


def _debug_from_environment() -> bool:
    """Whether RECURRENCE_DSL_DEBUG asks for tracebacks: set and not 0, off, false or no (any case, spaces
    ignored), read as RECURRENCE_DSL_TUNING is (codegen/tuning.py), so RECURRENCE_DSL_DEBUG=false means off."""
    return os.environ.get("RECURRENCE_DSL_DEBUG", "").strip().lower() not in ("", "0", "off", "false", "no")


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if extra:  # named by the command that did not take them: `recdsl kernels: error: unrecognized arguments: ...`
        args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
