"""`edgeshard bench`: the benchmark families' subcommands (profiling, planning, runtime), each registered by its module."""

from __future__ import annotations

from edgeshard_kit.cli import bench_adaptive, bench_peer, bench_planning, bench_profiling, bench_runtime
from edgeshard_kit.cli.main import COMMANDS


def add_parsers(sub) -> None:
    """Register `edgeshard bench` and its subcommands."""
    bench = sub.add_parser("bench", help=COMMANDS["bench"][1])
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCHMARK")
    for family in (bench_profiling, bench_planning, bench_runtime, bench_adaptive, bench_peer):
        family.add_bench_parsers(bench_sub)
