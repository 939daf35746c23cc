"""Turn what `benchmarks/gpu_session.sh OUTDIR` left in OUTDIR into the committed results under benchmarks/results/.

    python benchmarks/collect_gpu_results.py /work/.device/N [--tag h200]

Writes `<suite>_<tag>.json` for every JUnit XML (gpu_tests.xml, numerics_gpu.xml): date, device, driver and
versions from the session log's header, pass/fail counts, every test's status and seconds, and the failure
messages; copies triton_gpu.json and kernels_gpu.json as `triton_gpu_<tag>.json` / `kernels_gpu_<tag>.json`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


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
        status, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                status, message = tag, (found.get("message") or "")[:500]
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "status": status,
                      "seconds": float(case.get("time") or 0), **({"message": message} if message else {})})
    counts = {k: sum(t["status"] == k for t in tests) for k in ("passed", "failure", "error", "skipped")}
    return {"run": f"benchmarks/gpu_session.sh ({path.name})", **header, "summary": counts,
            "wall_seconds": float(suite.get("time") or 0), "tests": tests}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--tag", default="h200")
    args = parser.parse_args(argv)
    header = session_header(args.outdir / "session.log")
    RESULTS.mkdir(exist_ok=True)
    for xml in sorted(args.outdir.glob("*.xml")):
        summary = junit_summary(xml, header)
        target = RESULTS / f"{xml.stem}_{args.tag}.json"
        target.write_text(json.dumps(summary, indent=1) + "\n")
        print(f"{target.name}: {summary['summary']}")
    for name in ("triton_gpu.json", "kernels_gpu.json"):
        if (args.outdir / name).exists():
            target = RESULTS / f"{Path(name).stem}_{args.tag}.json"
            shutil.copyfile(args.outdir / name, target)
            print(f"{target.name}: copied")
    return 0


if __name__ == "__main__":
    sys.exit(main())
