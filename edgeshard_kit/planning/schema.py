"""The schemas of the planner's files (pydantic): a problem JSON and a plan JSON, field by field.

They check each field's type and range; problem.py and plan.py then apply the rules between fields
(exactly one source, unit_ms as long as units, pairs between known devices). Units: bytes, ms, Mbps.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from edgeshard_kit.core.schema import Bytes, Count, FileModel, Flag, Mbps, Ms, Name, OpenFileModel, PosCount, Text

MAX_UNITS = 100_000  # more units or devices than any model or testbed: a file claiming more is refused
MAX_DEVICES = 10_000


def _not_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError(f"{v!r} is not a number")
    return v


def _figure(v: float) -> float:
    if v < 0:  # NaN (a plan written by hand has no prediction) and inf pass
        raise ValueError(f"{v:g} is negative")
    return v


# A predicted figure of a plan: >= 0, inf (infeasible, or no bottleneck) or NaN/null (not predicted).
Figure = Annotated[float, Field(allow_inf_nan=True), BeforeValidator(_not_bool), AfterValidator(_figure)]


class UnitIn(FileModel):
    """units[i]: bytes resident on the device holding it, bytes sent when a stage ends after it."""

    name: Name | None = None
    mem_bytes: Bytes
    out_bytes: Bytes = 0.0


class DeviceIn(FileModel):
    """devices[i]: memory budget (bytes), per-unit time (ms per step), fixed per-stage cost (ms)."""

    name: Name
    memory_bytes: Bytes
    unit_ms: list[Ms] = Field(max_length=MAX_UNITS)
    source: Flag = False
    cloud: Flag = False
    stage_ms: Ms = 0.0


class LinkIn(FileModel):
    """links.default: megabits/s (null = unshaped) and a fixed latency per message (ms)."""

    mbps: Mbps
    latency_ms: Ms = 0.0


class PairIn(LinkIn):
    """links.pairs[i]: a directed link src -> dst."""

    src: Name
    dst: Name


class LinksIn(FileModel):
    default: LinkIn | None = None
    pairs: list[PairIn] | None = Field(default=None, max_length=MAX_DEVICES ** 2)


class ProblemIn(FileModel):
    """A problem JSON file (what `Problem.to_dict` writes)."""

    units: list[UnitIn] = Field(min_length=1, max_length=MAX_UNITS)
    devices: list[DeviceIn] = Field(min_length=1, max_length=MAX_DEVICES)
    links: LinksIn | None = None
    return_bytes: Bytes | None = None
    micro_batch_size: PosCount = 1
    step_ms: Ms = 0.0
    tied_bytes: Bytes = 0.0
    meta: dict[str, Any] | None = None


class StageIn(OpenFileModel):
    """stages[i]: `device` runs units [start, end) (half-open)."""

    device: Name
    start: Count
    end: Count

    @model_validator(mode="after")
    def _ordered(self) -> "StageIn":
        if self.end <= self.start:
            raise ValueError(f"range {self.start}:{self.end} is empty or reversed (ranges are half-open [start, end))")
        return self


class PlanIn(OpenFileModel):
    """A plan JSON file (what `Plan.to_dict` writes; fields of newer versions are ignored). Predicted figures
    may be null or NaN (a plan written by hand has none)."""

    objective: Name = "latency"
    stages: list[StageIn] = Field(min_length=1, max_length=MAX_UNITS)
    latency_ms: Figure | None = None
    bottleneck_ms: Figure | None = None
    throughput_per_s: Figure | None = None
    stage_compute_ms: list[Figure] = Field(default=[], max_length=MAX_UNITS)
    stage_transfer_ms: list[Figure] = Field(default=[], max_length=MAX_UNITS)
    memory_bytes: dict[str, Figure] = {}
    relay: Flag = False
    method: Text = ""  # empty: Plan names it after its objective (EDGESHARD_METHOD)
    feasible: Flag = True
    reason: Text = ""
    micro_batch_size: PosCount = 1
