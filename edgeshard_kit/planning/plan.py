"""The plan file: `Plan` (stages + predicted figures), `save_plan`, `load_plan`; the runtime reads `plan.stages`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeshard_kit.core.units import KitError, Stage, read_json


@dataclass(frozen=True)
class Plan:
    """A plan: ordered stages and the predicted figures (ms, tokens/s, bytes)."""

    objective: str
    stages: tuple[Stage, ...]
    latency_ms: float
    bottleneck_ms: float
    throughput_per_s: float
    stage_compute_ms: tuple[float, ...] = ()
    stage_transfer_ms: tuple[float, ...] = ()  # after stage i: to stage i+1, or back to the source
    memory_bytes: dict = field(default_factory=dict, compare=False, hash=False)  # device -> bytes
    relay: bool = False
    method: str = "edgeshard"
    feasible: bool = True
    reason: str = ""
    micro_batch_size: int = 1

    @property
    def devices(self) -> list[str]:
        return list(dict.fromkeys(s.device for s in self.stages))

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("objective", "latency_ms", "bottleneck_ms", "throughput_per_s",
                                           "relay", "method", "feasible", "reason", "micro_batch_size")}
        d["stages"] = [s.to_dict() for s in self.stages]
        d["stage_compute_ms"] = list(self.stage_compute_ms)
        d["stage_transfer_ms"] = list(self.stage_transfer_ms)
        d["memory_bytes"] = dict(self.memory_bytes)
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "plan") -> "Plan":
        if not isinstance(d, dict) or not isinstance(d.get("stages"), list):
            raise KitError(f"{where}: expected an object with a list of stages")
        stages = tuple(Stage.from_dict(s) for s in d["stages"])
        nan = float("nan")
        return cls(objective=str(d.get("objective", "latency")), stages=stages,
                   latency_ms=float(d.get("latency_ms", nan)), bottleneck_ms=float(d.get("bottleneck_ms", nan)),
                   throughput_per_s=float(d.get("throughput_per_s", nan)),
                   stage_compute_ms=tuple(d.get("stage_compute_ms", ())),
                   stage_transfer_ms=tuple(d.get("stage_transfer_ms", ())),
                   memory_bytes=dict(d.get("memory_bytes", {})), relay=bool(d.get("relay", False)),
                   method=str(d.get("method", "edgeshard")), feasible=bool(d.get("feasible", True)),
                   reason=str(d.get("reason", "")), micro_batch_size=int(d.get("micro_batch_size", 1)))


def save_plan(plan: Plan, path: str | Path) -> Path:
    """Write a plan JSON file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(plan.to_dict(), indent=1))
    return p


def load_plan(path: str | Path) -> Plan:
    """Read a plan JSON file (the runtime reads `plan.stages`)."""
    p = Path(path)
    if not p.is_file():
        raise KitError(f"plan file {p} does not exist")
    return Plan.from_dict(read_json(p), str(p))
