"""The kit's one error type: `KitError`, a user-facing problem told in one line (the CLI prints it, exit 2)."""

from __future__ import annotations


class KitError(ValueError):
    """A user-facing error: one line that names the problem (file, field, device, host); the CLI exits 2."""
