"""The `edgeshard` command line: one dispatcher; each module registers its own subcommands."""

from __future__ import annotations

import argparse
import importlib
import sys

from edgeshard_kit import __version__
from edgeshard_kit.core.units import KitError

# Modules that offer commands. Each defines `add_commands(sub)` (top-level commands) and/or
# `add_bench_commands(bench_sub)` (subcommands of `edgeshard bench`). A parser's handler is
# stored with `set_defaults(func=...)`; it returns an exit code or None.
COMMAND_MODULES = [
    "edgeshard_kit.model.checkpoint",
    "edgeshard_kit.model.generate",
    "edgeshard_kit.profiling.profile",
    "edgeshard_kit.profiling.analytic",
    "edgeshard_kit.planning.problem",
    "edgeshard_kit.experiments.paper",
    "edgeshard_kit.runtime.worker",
    "edgeshard_kit.runtime.deployment",
    "edgeshard_kit.runtime.ssh_launcher",
    "edgeshard_kit.runtime.probe",
    "edgeshard_kit.testbed.netns",
    "edgeshard_kit.experiments.results",
    "edgeshard_kit.experiments.notebooks",
    "edgeshard_kit.experiments.demo",
    "edgeshard_kit.bench.overhead",
    "edgeshard_kit.runtime.calibrate",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeshard", description=__doc__.split(":")[0])
    parser.add_argument("--version", action="version", version=f"edgeshard-kit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench = sub.add_parser("bench", help="benchmarks that print figures and write CSVs under results/")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCHMARK")
    for name in COMMAND_MODULES:
        mod = importlib.import_module(name)
        if hasattr(mod, "add_commands"):
            mod.add_commands(sub)
        if hasattr(mod, "add_bench_commands"):
            mod.add_bench_commands(bench_sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        rc = func(args)
    except (KitError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        # One line, no traceback: CLI users get the message that names the problem.
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"edgeshard: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgeshard: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())
