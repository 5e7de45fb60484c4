"""Parsing and printing of the numbers users write: byte sizes ("4GiB", "512MB"), checked numbers and integers."""

from __future__ import annotations

import math
import re
from typing import Any

from edgeshard_kit.core.errors import KitError

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
UNSHAPED_WORDS = ("inf", "unlimited", "unshaped", "none")  # how a user writes "no bandwidth limit"


def parse_size(value: Any, where: str = "size") -> int:
    """Bytes from an int or a string such as "4GiB", "512MB", "1.5 GiB"; KitError naming `where` otherwise."""
    if isinstance(value, bool):
        raise KitError(f"{where}: {value!r} is not a size")
    if isinstance(value, int):
        if value < 0:
            raise KitError(f"{where}: {value!r} is negative")
        return value
    if isinstance(value, float) and value >= 0 and value.is_integer():
        return int(value)
    m = _SIZE_RE.match(value) if isinstance(value, str) else None
    if not m:
        raise KitError(f"{where}: {value!r} is not a size (bytes, or a number with KiB/MiB/GiB/KB/MB/GB)")
    return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()])


def format_size(n: int) -> str:
    """Shortest exact binary form of a byte count ("4GiB", "512MiB", "1000")."""
    for unit, mult in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


_BINARY = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def _unit_of(n: float) -> tuple[str, int]:
    for unit, mult in _BINARY:
        if abs(n) >= mult:
            return unit, mult
    return "B", 1


def human_size(n: float, digits: int = 3) -> str:
    """A byte count to read, in the largest binary unit it reaches ("1.95 MiB", "31.00 GiB", "512 B").

    `digits`: significant digits (at least 3; whole bytes are shown as they are).
    """
    unit, mult = _unit_of(n)
    if mult == 1:
        return f"{n:.0f} B"
    v = n / mult
    decimals = max(digits - len(str(int(abs(v)))), 0)
    return f"{v:.{decimals}f} {unit}"


def human_sizes(*ns: float) -> list[str]:
    """Byte counts, each in its own binary unit, with as many decimals as it takes to tell unequal ones apart:
    (2_000_000, 1_999_000) -> ["1.907 MiB", "1.906 MiB"]; (27e9, 2e6) -> ["25.15 GiB", "1.91 MiB"];
    (2_097_153, 2_097_152) -> ["2.000001 MiB", "2.000000 MiB"]; whole bytes when 9 decimals do not suffice."""
    units = [_unit_of(n) for n in ns]
    for decimals in range(2, 10):
        out = [f"{n:.0f} B" if mult == 1 else f"{n / mult:.{decimals}f} {unit}" for n, (unit, mult) in zip(ns, units)]
        if all((a == b) == (round(x) == round(y)) for x, a in zip(ns, out) for y, b in zip(ns, out)):
            return out
    return [f"{n:.0f} B" for n in ns]


def plural(n: int, word: str, words: str | None = None) -> str:
    """'1 micro-batch', '4 micro-batches' (`words` when the plural is not word + 's'/'es')."""
    if n == 1:
        return f"{n} {word}"
    return f"{n} {words or (word + 'es' if word.endswith(('ch', 'sh', 's', 'x')) else word + 's')}"


def number(value: Any, where: str, minimum: float | None = None, allow_inf: bool = False) -> float:
    """A finite number (>= `minimum` when given; inf when `allow_inf` and None/"inf"/"unshaped"), else KitError."""
    if allow_inf and (value is None or (isinstance(value, str) and value.strip().lower() in UNSHAPED_WORDS)):
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise KitError(f"{where}: {value!r} is not a number")
    try:
        v = float(value)
    except ValueError:
        raise KitError(f"{where}: {value!r} is not a number") from None
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise KitError(f"{where}: {value!r} is not a finite number")
    if minimum is not None and v < minimum:
        raise KitError(f"{where}: {v:g} is negative" if v < 0 <= minimum else f"{where}: {v:g} must be >= {minimum:g}")
    return v


def integer(value: Any, where: str, lo: int = 0, hi: int | None = None) -> int:
    """An int in [lo, hi] (bools refused), else KitError naming `where`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise KitError(f"{where}: {value!r} is not an integer {rng}")
    return value
