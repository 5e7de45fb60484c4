"""The `edgeshard` command line: the table of commands, lazy dispatch to `cli/<family>.py`, one-line errors.

Each command family lives in one module of this package that defines `add_parsers(sub)` (its
argparse subcommands, handlers set with `set_defaults(func=handler)`, `handler(args) -> int | None`).
Only the module of the command that runs is imported, so `edgeshard results list` loads neither
torch nor the runtime; `edgeshard --help` lists every command from the table below.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

from edgeshard_kit import __version__
from edgeshard_kit.core.errors import KitError

# command -> (module of edgeshard_kit.cli that registers it, one-line help for `edgeshard --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "tiny-model": ("model", "write a small seeded random Llama checkpoint (HF format) with a tokenizer"),
    "fetch-model": ("model", "convert SmolLM2-135M-Instruct (the default model) once into the kit's cache folder"),
    "generate": ("generate", "generate text with the model split into stages (on this host by default)"),
    "profile": ("profile", "measure (or estimate) per-unit costs of a model on this device type"),
    "profile-show": ("profile", "print profiles as a table"),
    "devices": ("profile", "the device catalog used by analytic profiles (with sources)"),
    "plan": ("plan", "choose devices and layer ranges (exact DP), evaluate plans and baselines"),
    "reproduce-paper": ("plan", "simulate the EdgeShard paper's experiments (7B/13B/70B, 1-50 Mbps)"),
    "testbed": ("testbed", "the testbed: validate an inventory; bring the emulated testbed up or down"),
    "ssh": ("testbed", "SSH devices: check that every launch: ssh device is reachable and ready"),
    "probe": ("testbed", "measure bandwidth and latency between every ordered pair of devices"),
    "worker": ("worker", "run one pipeline worker (started by the coordinator's launcher)"),
    "results": ("experiments", "list and show run folders (results/<run-id>/)"),
    "run-notebooks": ("experiments", "execute the notebooks with papermill into results/<run-id>/"),
    "demo": ("demo", "the full experiment on SmolLM2-135M-Instruct: testbed up, profile, plan, deploy, "
                     "generate, benchmark vs baselines, results folder"),
    "bench": ("bench", "benchmarks that print figures and write CSVs under results/"),
}


def _command_of(argv: list[str]) -> str | None:
    """The first argument that names a command (options before it are the top-level parser's)."""
    return next((a for a in argv if a in COMMANDS), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser: every command listed; the full options only of the command in `argv` (all when None)."""
    parser = argparse.ArgumentParser(prog="edgeshard", description=__doc__.split(":")[0])
    parser.add_argument("--version", action="version", version=f"edgeshard-kit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _command_of(argv) if argv is not None else None
    wanted = {COMMANDS[chosen][0]} if chosen else ({m for m, _ in COMMANDS.values()} if argv is None else set())
    for family in dict.fromkeys(m for m, _ in COMMANDS.values()):
        if family in wanted:
            importlib.import_module(f"edgeshard_kit.cli.{family}").add_parsers(sub)
    for name, (family, text) in COMMANDS.items():
        if family not in wanted:
            sub.add_parser(name, help=text)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that every `with`/`finally` on the way out runs (workers stopped,
    an emulated testbed the command brought up taken down) before the command exits with 143."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Run one command; the kit's own errors (and file errors) print one line and exit 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        rc = func(args)
    except (KitError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        # One line, no traceback: the message names the file, field, device or host. Anything else is a
        # bug and keeps its traceback.
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"edgeshard: error: {msg}", file=sys.stderr)
        # a run folder the command opened is recorded failed with this message (only loaded if a run was opened)
        results = sys.modules.get("edgeshard_kit.experiments.results")
        if results is not None:
            results.fail_open_runs(msg)
        return 2
    except KeyboardInterrupt as e:
        term = isinstance(e, Terminated)
        print(f"edgeshard: {'terminated' if term else 'interrupted'}", file=sys.stderr)
        return 143 if term else 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())
