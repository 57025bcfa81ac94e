"""Benchmark suite: ``python -m benchmarks [SUITE ...] [--quick] --out DIR`` (suites: generation
faults preprocessing memory budget occupancy jsonl_reading autotune concurrency resume llamacpp
plan startup).

Each suite prints a table and writes JSON (and PNG plots) under the output folder, plus
``summary.md``. Figures are ratios measured in one run (ours vs a baseline, achieved vs ideal).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from benchmarks import autotune, cluster, concurrency, llamacpp, plan, resume, startup, suites

SUITES = {"generation": suites.generation, "faults": suites.faults,
          "preprocessing": suites.preprocessing, "memory": suites.memory,
          "budget": cluster.budget, "occupancy": cluster.occupancy,
          "jsonl_reading": cluster.jsonl_reading, "autotune": autotune.autotune,
          "concurrency": concurrency.concurrency, "resume": resume.resume,
          "llamacpp": llamacpp.llamacpp, "plan": plan.plan_accuracy,
          "startup": startup.startup}


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
    machine = describe_machine(args.quick)
    for name in args.suites or list(SUITES):
        print(f"== {name}")
        result = SUITES[name](out, quick=args.quick)
        (out / f"{name}.json").write_text(json.dumps({"machine": machine, **result}, indent=1))
        print(result["table"])
    write_summary(out)
    print(f"results in {out}")


def describe_machine(quick: bool) -> dict:
    """Date, Python, CPU model and count, memory: stored with every suite's results."""
    cpu = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor() or platform.machine())
    mem_kb = next((int(line.split()[1]) for line in _read_lines("/proc/meminfo")
                   if line.startswith("MemTotal:")), 0)
    return {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
            "cpu": cpu, "cpus": os.cpu_count(), "memory_gib": round(mem_kb / 2**20, 1),
            "quick": quick}


def _read_lines(path: str) -> list[str]:
    try:
        with open(path) as fh:
            return fh.readlines()
    except OSError:
        return []


def write_summary(out: Path) -> None:
    """``summary.md`` from every suite's JSON in ``out`` (suites run earlier are kept)."""
    parts = ["# Benchmark results\n"]
    for name in SUITES:
        path = out / f"{name}.json"
        if path.exists():
            result = json.loads(path.read_text())
            parts.append(f"## {name}\n\nMachine: {result['machine']}\n\n{result['table']}\n")
    (out / "summary.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
