"""`edgeshard worker`: run one pipeline worker (the same as `python -m edgeshard_kit.runtime.worker`)."""

from __future__ import annotations

from edgeshard_kit.cli.main import COMMANDS
from edgeshard_kit.runtime import worker


def add_parsers(sub) -> None:
    """Register `edgeshard worker --port P --token-file F [--bind A]`."""
    p = sub.add_parser("worker", help=COMMANDS["worker"][1])
    worker.add_arguments(p)
    p.set_defaults(func=worker.run)
