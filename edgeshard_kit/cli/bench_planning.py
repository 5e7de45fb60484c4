"""`edgeshard bench solver`: run the planner benchmark (bench/solver.py), print its rows, write the CSV."""

from __future__ import annotations

import argparse

from edgeshard_kit.bench.solver import bench_solver
from edgeshard_kit.core.io import write_rows


def cmd_solver(args: argparse.Namespace) -> int:
    """Time the solvers; one line per case, then the CSV."""
    rows = bench_solver(args.repeats, relay=not args.no_relay)
    for r in rows:
        print(f"{r['objective']:<10} {r['median_ms']:9.2f} ms (min {r['min_ms']}, max {r['max_ms']})  {r['problem']}"
              f"  [{r['status']}, value {r['value_ms']}]")
    print(f"wrote {write_rows(rows, args.out)}")
    return 0


def add_bench_parsers(bench_sub) -> None:
    """Register `edgeshard bench solver`."""
    p = bench_sub.add_parser("solver", help="planner speed: the DPs on paper-sized problems, the relay search on the paper's testbed")
    p.add_argument("--out", default="results/solver_bench.csv")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-relay", action="store_true", help="skip the relay-search rows (the paper's testbed)")
    p.set_defaults(func=cmd_solver)
