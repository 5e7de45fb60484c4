"""Small helpers shared by the tests (fixtures live in conftest.py): free loopback ports, SSH keys, hand-made plans."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from edgeshard_kit.core.units import Stage
from edgeshard_kit.planning.plan import Plan


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> Path:
    """A throwaway ed25519 key pair at `path` (and `path`.pub)."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def plan_of(*stages: tuple[str, int, int]) -> Plan:
    """A latency plan of (device, start, end) stages with no predicted figures (for deploying by hand)."""
    return Plan("latency", tuple(Stage(*s) for s in stages), 0.0, 0.0, 0.0)
