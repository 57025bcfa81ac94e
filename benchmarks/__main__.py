"""Benchmark suite: ``python -m benchmarks [generation faults preprocessing memory] [--quick] --out DIR``.

Each suite prints a table and writes JSON (and PNG plots) under the output folder, plus
``summary.md``. Figures are ratios measured in one run (ours vs a baseline, achieved vs ideal).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from benchmarks import suites

SUITES = {"generation": suites.generation, "faults": suites.faults,
          "preprocessing": suites.preprocessing, "memory": suites.memory}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("suites", nargs="*", help=f"any of {', '.join(SUITES)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes (a CI smoke test)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; choose from {', '.join(SUITES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
               "machine": platform.machine(), "cpus": __import__("os").cpu_count(),
               "quick": args.quick}
    summary = [f"# Benchmark results\n\nMachine: {machine}\n"]
    for name in args.suites or list(SUITES):
        print(f"== {name}")
        result = SUITES[name](out, quick=args.quick)
        (out / f"{name}.json").write_text(json.dumps({"machine": machine, **result}, indent=1))
        summary.append(f"## {name}\n\n{result['table']}\n")
        print(result["table"])
    (out / "summary.md").write_text("\n".join(summary))
    print(f"results in {out}")


if __name__ == "__main__":
    main()
