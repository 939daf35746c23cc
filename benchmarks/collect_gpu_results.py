"""Turn what `benchmarks/gpu_session.sh OUTDIR` left in OUTDIR into the committed results under benchmarks/results/.

    python benchmarks/collect_gpu_results.py /work/.device/N [/work/.device/M ...] [--tag h200] [--results DIR]

The session's two device calls leave two folders; give both. Writes `<suite>_<tag>.json` for every JUnit XML
(gpu_tests.xml, numerics_gpu.xml): date, device, driver and versions from the session log's header, pass/fail
counts, every test's status and seconds, and the failure messages; copies triton_gpu.json and kernels_gpu.json as
`triton_gpu_<tag>.json` / `kernels_gpu_<tag>.json`; and from triton_gpu.json makes `triton_gpu_<tag>.png` (ms per
layer per shape: ours, fla's, SDPA; forward and forward + backward) and `triton_gpu_<tag>.md`, the table the
README pastes, with issue 10's 0.9x target column (also printed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# The bars of the plot and the columns of the table: bench_triton.py's path keys and how they are labelled.
PLOTTED = {"ours_chunked": "ours chunked", "fla_chunk": "fla chunk_*", "ours_recurrent": "ours recurrent",
           "fla_fused_recurrent": "fla fused_recurrent_*"}
DIRECTIONS = {"forward": "forward", "forward_backward": "forward + backward"}


def session_header(log: Path) -> dict:
    lines = log.read_text().splitlines() if log.exists() else []
    if len(lines) < 3:
        return {}
    python, torch_version, triton_version, *device = lines[2].split()
    return {"date": lines[0], "device": " ".join(device), "driver": lines[1].split(", ")[1],
            "versions": {"python": python, "torch": torch_version, "triton": triton_version}}


def junit_summary(path: Path, header: dict) -> dict:
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    tests = []
    for case in suite.iter("testcase"):
        if case.get("name") is None:  # a test in flight when the step's limit stopped pytest (SIGINT)
            tests.append({"test": "(unnamed: running at the step's time limit)", "status": "interrupted",
                          "seconds": 0.0})
            continue
        status, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                status, message = tag, (found.get("message") or "")[:500]
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "status": status,
                      "seconds": float(case.get("time") or 0), **({"message": message} if message else {})})
    counts = {k: sum(t["status"] == k for t in tests) for k in ("passed", "failure", "error", "skipped")}
    if any(t["status"] == "interrupted" for t in tests):
        counts["interrupted"] = sum(t["status"] == "interrupted" for t in tests)
    return {"run": f"benchmarks/gpu_session.sh ({path.name})", **header, "summary": counts,
            "wall_seconds": float(suite.get("time") or 0), "tests": tests}


# -- bench_triton.py's report as a table and a plot -----------------------------------------------------------


def _ms(case: dict, path: str, direction: str) -> float | None:
    cell = case["paths"].get(path, {}).get(direction, {})
    return cell.get("ms") if isinstance(cell.get("ms"), (int, float)) else None


def _fmt(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def bench_rows(report: dict) -> list[dict]:
    """One row per (shape, layer), in the report's order: the ms of every path, SDPA's at that shape, fla's time
    over ours and whether the target holds (None where it does not apply or a time is missing)."""
    rows = []
    for case in report["cases"].values():
        shape = case["shape"]
        key = f"B{shape['B']}_T{shape['T']}_H{shape['H']}_K{shape['K']}"
        row = {"shape": shape, "shape_key": key, "layer": case["layer"],
               "ms": {d: {p: _ms(case, p, d) for p in PLOTTED} for d in DIRECTIONS},
               "sdpa": {d: (report.get("sdpa", {}).get(key, {}).get(d, {}) or {}).get("ms") for d in DIRECTIONS},
               "roofline": case["paths"].get("ours_chunked", {}).get("forward_backward", {})
               .get("roofline", {}).get("of_roofline")}
        ours, fla = row["ms"]["forward_backward"]["ours_chunked"], row["ms"]["forward_backward"]["fla_chunk"]
        row["ratio"] = None if ours is None or fla is None else fla / ours
        target = report.get("target", {"fla_over_ours_forward_backward_at_least": 0.9, "from_T": 2048})
        row["meets_target"] = (None if row["ratio"] is None or shape["T"] < target["from_T"]
                               else row["ratio"] >= target["fla_over_ours_forward_backward_at_least"])
        rows.append(row)
    return rows


def markdown_table(report: dict) -> str:
    """The README's table: fwd+bwd (and fwd) ms per layer and shape, fla / ours, the 0.9x target column."""
    head = ["shape (B, T, H, K=V)", "layer", "ours chunked fwd / fwd+bwd", "fla chunk fwd / fwd+bwd",
            "fla / ours fwd+bwd", "target >= 0.9x (T >= 2048)", "ours recurrent fwd+bwd",
            "fla fused_recurrent fwd+bwd", "SDPA fwd+bwd", "ours fwd+bwd of roofline"]
    lines = [f"{report['device']}, {report['dtype']}, {report['date']}; milliseconds (lower is better); "
             "fla / ours above 1: ours faster", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in bench_rows(report):
        s, ms = row["shape"], row["ms"]
        target = {None: "n/a" if s["T"] < 2048 else "-", True: "met", False: "missed"}[row["meets_target"]]
        cells = [f"({s['B']}, {s['T']}, {s['H']}, {s['K']})", row["layer"],
                 f"{_fmt(ms['forward']['ours_chunked'])} / {_fmt(ms['forward_backward']['ours_chunked'])}",
                 f"{_fmt(ms['forward']['fla_chunk'])} / {_fmt(ms['forward_backward']['fla_chunk'])}",
                 "-" if row["ratio"] is None else f"{row['ratio']:.2f}x", target,
                 _fmt(ms["forward_backward"]["ours_recurrent"]), _fmt(ms["forward_backward"]["fla_fused_recurrent"]),
                 _fmt(row["sdpa"]["forward_backward"]),
                 "-" if row["roofline"] is None else f"{100 * row['roofline']:.0f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, out: Path) -> None:
    """Bars of ms (log scale) per layer, one panel per shape and direction; SDPA as a dashed line per panel."""
    import matplotlib

    matplotlib.use("Agg")  # no display on the machines this runs on
    import matplotlib.pyplot as plt

    rows = bench_rows(report)
    shapes = list(dict.fromkeys(r["shape_key"] for r in rows))
    fig, axes = plt.subplots(len(DIRECTIONS), max(1, len(shapes)), figsize=(4.5 * max(1, len(shapes)), 7),
                             squeeze=False)
    width = 0.8 / len(PLOTTED)
    for col, key in enumerate(shapes):
        mine = [r for r in rows if r["shape_key"] == key]
        for row_index, direction in enumerate(DIRECTIONS):
            ax = axes[row_index][col]
            for i, (path, label) in enumerate(PLOTTED.items()):
                xs = [j + (i - (len(PLOTTED) - 1) / 2) * width for j in range(len(mine))]
                heights = [r["ms"][direction][path] or 0 for r in mine]
                ax.bar(xs, heights, width, label=label)
            sdpa = mine[0]["sdpa"][direction] if mine else None
            if sdpa:
                ax.axhline(sdpa, color="black", linestyle="--", linewidth=1, label="SDPA (causal)")
            ax.set_xticks(range(len(mine)), [r["layer"] for r in mine], rotation=20, fontsize=8)
            if any(r["ms"][direction][p] for r in mine for p in PLOTTED):
                ax.set_yscale("log")
            ax.set_title(f"{key}, {DIRECTIONS[direction]}", fontsize=9)
            if col == 0:
                ax.set_ylabel("ms")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{report['device']}, {report['dtype']} ({report['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdirs", type=Path, nargs="+", help="the folders the device calls' files landed in")
    parser.add_argument("--tag", default="h200")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the results go")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.outdirs if not d.is_dir()]
    if missing:
        parser.error(f"outdirs: no such folder {', '.join(missing)}")
    header = next((h for h in (session_header(d / "session.log") for d in args.outdirs) if h), {})
    args.results.mkdir(parents=True, exist_ok=True)
    for xml in sorted(x for d in args.outdirs for x in d.glob("*.xml")):
        summary = junit_summary(xml, header)
        target = args.results / f"{xml.stem}_{args.tag}.json"
        target.write_text(json.dumps(summary, indent=1) + "\n")
        print(f"{target.name}: {summary['summary']}")
    for name in ("triton_gpu.json", "kernels_gpu.json"):
        for outdir in args.outdirs:  # a later folder's copy wins
            if (outdir / name).exists():
                target = args.results / f"{Path(name).stem}_{args.tag}.json"
                shutil.copyfile(outdir / name, target)
                print(f"{target.name}: copied from {outdir}")
    bench = args.results / f"triton_gpu_{args.tag}.json"
    if bench.exists():
        report = json.loads(bench.read_text())
        table = markdown_table(report)
        (args.results / f"triton_gpu_{args.tag}.md").write_text(table)
        print(table)
        try:
            plot(report, args.results / f"triton_gpu_{args.tag}.png")
        except ImportError as err:
            print(f"no plot: {err} (matplotlib is in the dev extra: pip install -e '.[dev]')", file=sys.stderr)
            return 1
        print(f"triton_gpu_{args.tag}.png, triton_gpu_{args.tag}.md: written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
