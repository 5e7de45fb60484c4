"""The unit convention: unit 0 = embedding, 1..N = decoder layers, N+1 = norm + lm_head; half-open stage ranges."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edgeshard_kit.core.errors import KitError


@dataclass(frozen=True)
class Stage:
    """One stage of a plan: `device` runs units `[start, end)`."""

    device: str
    start: int
    end: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Stage":
        try:
            return cls(device=str(d["device"]), start=int(d["start"]), end=int(d["end"]))
        except KeyError as e:
            raise KitError(f"stage {d!r} lacks the field {e.args[0]!r}") from None

    @property
    def units(self) -> range:
        return range(self.start, self.end)


def n_units(n_layers: int) -> int:
    """Units of a model with `n_layers` decoder layers: embedding + layers + head."""
    return n_layers + 2


def unit_name(u: int, n_layers: int) -> str:
    """Human name of unit `u` ("embed", "layer1".."layerN", "head")."""
    if u == 0:
        return "embed"
    if u == n_layers + 1:
        return "head"
    if 1 <= u <= n_layers:
        return f"layer{u}"
    raise KitError(f"unit {u} is out of range [0, {n_layers + 2})")


def validate_ranges(ranges: list[tuple[int, int]], total: int, what: str = "split") -> None:
    """Raise KitError unless the half-open ranges cover [0, total) exactly, in order."""
    if not ranges:
        raise KitError(f"{what} is empty: it must cover units [0, {total})")
    pos = 0
    for start, end in ranges:
        if start < 0 or end > total:
            raise KitError(f"{what}: range {start}:{end} is out of range [0, {total})")
        if end <= start:
            raise KitError(f"{what}: range {start}:{end} is empty or reversed (ranges are half-open [start, end))")
        if start < pos:
            raise KitError(f"{what}: range {start}:{end} overlaps the previous range ending at {pos}")
        if start > pos:
            raise KitError(f"{what}: units [{pos}, {start}) are not covered")
        pos = end
    if pos != total:
        raise KitError(f"{what}: units [{pos}, {total}) are not covered (the model has {total} units)")


def parse_split(text: str, total: int) -> list[tuple[int, int]]:
    """Parse "0:3,3:7,7:10" into ranges and check they cover [0, total) exactly."""
    ranges = []
    for part in text.split(","):
        part = part.strip()
        bits = part.split(":")
        if len(bits) != 2:
            raise KitError(f"split: {part!r} is not of the form START:END")
        try:
            ranges.append((int(bits[0]), int(bits[1])))
        except ValueError:
            raise KitError(f"split: {part!r} is not of the form START:END (integers)") from None
    validate_ranges(ranges, total)
    return ranges


def format_stages(stages) -> str:
    """The one text form of a stage list: "edge0[0:12) cloud[12:32)" (half-open unit ranges)."""
    return " ".join(f"{s.device}[{s.start}:{s.end})" for s in stages)
