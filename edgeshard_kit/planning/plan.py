"""The plan and the cost model: `figures` of a stage list on a problem, `Plan` (stages + predicted figures), its file."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.io import read_json, write_json
from edgeshard_kit.core.numbers import human_sizes
from edgeshard_kit.core.schema import validate
from edgeshard_kit.core.units import Stage, validate_ranges
from edgeshard_kit.planning.problem import Problem
from edgeshard_kit.planning.schema import PlanIn


# EdgeShard's name per objective of the plain DP (planning.objectives.METHOD_NAMES is the full list, with the
# throughput at K micro-batches): a plan made without a method name gets this one.
EDGESHARD_METHOD = {"latency": "EdgeShard-latency", "throughput": "EdgeShard-throughput (steady state)"}


@dataclass(frozen=True)
class Plan:
    """A plan: ordered stages and the predicted figures (ms, tokens/s, bytes); `method` defaults to EdgeShard's
    name for `objective` (EDGESHARD_METHOD)."""

    objective: str
    stages: tuple[Stage, ...]
    latency_ms: float
    bottleneck_ms: float
    throughput_per_s: float
    stage_compute_ms: tuple[float, ...] = ()
    stage_transfer_ms: tuple[float, ...] = ()  # after stage i: to stage i+1, or back to the source
    memory_bytes: dict = field(default_factory=dict, compare=False, hash=False)  # device -> bytes
    relay: bool = False
    method: str = ""
    feasible: bool = True
    reason: str = ""
    micro_batch_size: int = 1

    def __post_init__(self):
        if not self.method:
            object.__setattr__(self, "method", EDGESHARD_METHOD.get(self.objective, f"EdgeShard-{self.objective}"))

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
        """A Plan from its JSON form; KitError "WHERE: field: why" (one line) when a field is missing or wrong.

        Coverage of the model's units and the devices are checked where the model and testbed are known
        (`figures`, `deploy`)."""
        x = validate(PlanIn, d, where)
        nan = float("nan")
        return cls(objective=x.objective, stages=tuple(Stage(s.device, s.start, s.end) for s in x.stages),
                   latency_ms=nan if x.latency_ms is None else x.latency_ms,
                   bottleneck_ms=nan if x.bottleneck_ms is None else x.bottleneck_ms,
                   throughput_per_s=nan if x.throughput_per_s is None else x.throughput_per_s,
                   stage_compute_ms=tuple(x.stage_compute_ms), stage_transfer_ms=tuple(x.stage_transfer_ms),
                   memory_bytes=dict(x.memory_bytes), relay=x.relay, method=x.method, feasible=x.feasible,
                   reason=x.reason, micro_batch_size=x.micro_batch_size)


def save_plan(plan: Plan, path: str | Path) -> Path:
    """Write a plan JSON file."""
    return write_json(plan.to_dict(), path)


def load_plan(path: str | Path) -> Plan:
    """Read a plan JSON file (the runtime reads `plan.stages`); KitError "FILE: field: why" when it is malformed."""
    p = Path(path)
    if not p.exists():
        raise KitError(f"plan file {p} does not exist")
    return Plan.from_dict(read_json(p), str(p))


def figures(problem: Problem, stages: list[Stage] | tuple[Stage, ...]) -> dict:
    """The cost model on a stage list: latency, bottleneck (per resource), per-stage figures, memory.

    Latency (ms per token) = every stage's compute + every transfer, the last one back to the source,
    + the per-token step cost. Bottleneck (ms) = the busiest resource: a device (its stages summed)
    or a directed link (its transfers summed). Memory: a device's units summed, a tied tensor once.
    """
    validate_ranges([(s.start, s.end) for s in stages], problem.n_units, "plan")
    idx = {d.name: i for i, d in enumerate(problem.devices)}
    for s in stages:
        if s.device not in idx:
            raise KitError(f"plan: unknown device {s.device!r} (devices: {', '.join(idx)})")
    src = problem.devices[problem.source].name
    comp, trans, mem, load, link_load = [], [], {}, {}, {}
    for i, s in enumerate(stages):
        dev = problem.devices[idx[s.device]]
        c = sum(dev.unit_ms[s.start:s.end]) + dev.stage_ms
        comp.append(c)
        mem[s.device] = mem.get(s.device, 0.0) + sum(u.mem_bytes for u in problem.units[s.start:s.end])
        load[s.device] = load.get(s.device, 0.0) + c  # a device is one resource, its stages summed
        nxt, nbytes = (stages[i + 1].device, problem.units[s.end - 1].out_bytes) if i + 1 < len(stages) \
            else (src, problem.return_bytes)
        t = problem.transfer_ms(s.device, nxt, nbytes)
        trans.append(t)
        if s.device != nxt:
            link_load[(s.device, nxt)] = link_load.get((s.device, nxt), 0.0) + t  # a directed link is one resource
    for s in stages:  # one worker per stage: only a stage holding unit 0 and the head holds the tied tensor once
        mem[s.device] -= problem.shared_bytes(range(s.start, s.end))
    over = ["{} needs {} > its {}".format(n, *human_sizes(m, problem.devices[idx[n]].memory_bytes))
            for n, m in mem.items() if m > problem.devices[idx[n]].memory_bytes * (1 + 1e-12)]
    if stages[0].device != src:
        over.insert(0, f"unit 0 must run on the source {src}, not {stages[0].device}")
    bottleneck = max(list(load.values()) + list(link_load.values()))
    return {"latency_ms": sum(comp) + sum(trans) + problem.step_ms, "bottleneck_ms": bottleneck,
            "throughput_per_s": problem.micro_batch_size * 1000.0 / bottleneck if bottleneck > 0 else math.inf,
            "stage_compute_ms": comp, "stage_transfer_ms": trans, "memory_bytes": mem,
            "device_load_ms": load, "link_load_ms": {f"{a}->{b}": v for (a, b), v in link_load.items()},
            "feasible": not over, "reason": "; ".join(over)}


def make_plan(problem: Problem, stages: list[Stage] | tuple[Stage, ...], objective: str, relay: bool = False,
              method: str = "") -> Plan:
    """A Plan with the figures the cost model predicts for `stages`."""
    f = figures(problem, stages)
    return Plan(objective, tuple(stages), f["latency_ms"], f["bottleneck_ms"], f["throughput_per_s"],
                tuple(f["stage_compute_ms"]), tuple(f["stage_transfer_ms"]), f["memory_bytes"], relay, method,
                f["feasible"], f["reason"], problem.micro_batch_size)


def with_method(plan: Plan, method: str) -> Plan:
    """The same plan under another method name."""
    return replace(plan, method=method)
