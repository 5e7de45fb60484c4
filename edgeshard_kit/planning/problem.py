"""The planning problem and the plan: `Problem` (units, devices, links), `Plan`, the cost model, `solve`, the `plan` command."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgeshard_kit.planning.plan import Plan, load_plan, save_plan  # noqa: F401 (the plan file lives there)
from edgeshard_kit.core.units import KitError, Stage, read_json, validate_ranges

OBJECTIVES = ("latency", "throughput")
__all__ = ["OBJECTIVES", "Unit", "DeviceSpec", "LinkSpec", "Problem", "Plan", "problem_from_dict", "load_problem",
           "save_problem", "save_plan", "load_plan", "figures", "make_plan", "infeasible_reason", "solve", "evaluate",
           "with_method"]


def _num(value: Any, where: str, minimum: float = 0.0, allow_inf: bool = False) -> float:
    """A finite number >= minimum (or inf / null when allowed), else KitError naming `where`."""
    if allow_inf and value is None:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise KitError(f"{where}: {value!r} is not a number")
    try:
        v = float(value)
    except ValueError:
        raise KitError(f"{where}: {value!r} is not a number") from None
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise KitError(f"{where}: {value!r} is not a finite number")
    if v < minimum:
        raise KitError(f"{where}: {v:g} is negative" if v < 0 else f"{where}: {v:g} must be >= {minimum:g}")
    return v


@dataclass(frozen=True)
class Unit:
    """One unit: `mem_bytes` resident (params + KV), `out_bytes` sent when a stage ends after it."""

    name: str
    mem_bytes: float
    out_bytes: float


@dataclass(frozen=True)
class DeviceSpec:
    """A device of the problem: memory budget (bytes), per-unit time (ms per step), source / cloud flags.

    `stage_ms` is the fixed cost of one stage on this device per step, whatever units it holds: the
    runtime's framework work around the layers and its handling of the incoming and outgoing message
    (measured by `overheads.calibrate_runtime`; 0 in the paper's model).
    """

    name: str
    memory_bytes: float
    unit_ms: tuple[float, ...]
    source: bool = False
    cloud: bool = False
    stage_ms: float = 0.0


@dataclass(frozen=True)
class LinkSpec:
    """A directed link: `mbps` megabits/s (inf = free), `latency_ms` fixed cost per message."""

    mbps: float
    latency_ms: float = 0.0

    def transfer_ms(self, nbytes: float) -> float:
        """The paper's cost model: latency + bits / (Mbps * 1000) ms."""
        return self.latency_ms + (0.0 if math.isinf(self.mbps) else nbytes * 8.0 / (self.mbps * 1000.0))

    def to_dict(self) -> dict:
        return {"mbps": None if math.isinf(self.mbps) else self.mbps, "latency_ms": self.latency_ms}


@dataclass(frozen=True)
class Problem:
    """What the planner needs: units, devices (exactly one source), directed links, return bytes."""

    units: tuple[Unit, ...]
    devices: tuple[DeviceSpec, ...]
    default_link: LinkSpec = LinkSpec(math.inf, 0.0)
    pairs: tuple[tuple[str, str, LinkSpec], ...] = ()  # directed (src, dst, link); others use default
    return_bytes: float = 4.0
    micro_batch_size: int = 1  # sequences per micro-batch: tokens/s = this * 1000 / bottleneck
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    step_ms: float = 0.0  # fixed per-token cost outside the stages (the coordinator's round trip); latency only

    @property
    def n_units(self) -> int:
        return len(self.units)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.devices]

    @property
    def source(self) -> int:
        return next(i for i, d in enumerate(self.devices) if d.source)

    def index(self, name: str) -> int:
        for i, d in enumerate(self.devices):
            if d.name == name:
                return i
        raise KitError(f"unknown device {name!r} (devices: {', '.join(self.names)})")

    def link(self, src: str, dst: str) -> LinkSpec:
        """The directed link src -> dst: its pair entry, else the default."""
        for a, b, ln in self.pairs:
            if a == src and b == dst:
                return ln
        return self.default_link

    def transfer_ms(self, src: str, dst: str, nbytes: float) -> float:
        """Time (ms) to send `nbytes` from src to dst; nothing on the same device."""
        return 0.0 if src == dst else self.link(src, dst).transfer_ms(nbytes)

    def to_dict(self) -> dict:
        return {
            "units": [{"name": u.name, "mem_bytes": u.mem_bytes, "out_bytes": u.out_bytes} for u in self.units],
            "devices": [{"name": d.name, "memory_bytes": d.memory_bytes, "source": d.source, "cloud": d.cloud,
                         "unit_ms": list(d.unit_ms), "stage_ms": d.stage_ms} for d in self.devices],
            "links": {"default": self.default_link.to_dict(),
                      "pairs": [{"src": a, "dst": b, **ln.to_dict()} for a, b, ln in self.pairs]},
            "return_bytes": self.return_bytes,
            "micro_batch_size": self.micro_batch_size,
            "step_ms": self.step_ms,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "problem") -> "Problem":
        return problem_from_dict(d, where)


def _link_from(d: Any, where: str) -> LinkSpec:
    if not isinstance(d, dict):
        raise KitError(f"{where}: expected an object with mbps and latency_ms, got {d!r}")
    if "mbps" not in d:
        raise KitError(f"{where} lacks the field 'mbps'")
    mbps = _num(d["mbps"], f"{where}.mbps", allow_inf=True)
    if mbps == 0:
        raise KitError(f"{where}.mbps: must be > 0")
    return LinkSpec(mbps, _num(d.get("latency_ms", 0.0), f"{where}.latency_ms"))


def problem_from_dict(d: Any, where: str = "problem") -> Problem:
    """Build and validate a Problem from its JSON form; KitError names the bad field."""
    if not isinstance(d, dict):
        raise KitError(f"{where}: expected a JSON object")
    for key in ("units", "devices"):
        if not isinstance(d.get(key), list) or not d[key]:
            raise KitError(f"{where}.{key}: missing or empty list")
    units = []
    for i, u in enumerate(d["units"]):
        w = f"units[{i}]"
        if not isinstance(u, dict):
            raise KitError(f"{w}: expected an object")
        units.append(Unit(str(u.get("name", f"unit{i}")), _num(u.get("mem_bytes"), f"{w}.mem_bytes"),
                          _num(u.get("out_bytes", 0), f"{w}.out_bytes")))
    devices, seen = [], set()
    for i, dev in enumerate(d["devices"]):
        w = f"devices[{i}]"
        if not isinstance(dev, dict) or "name" not in dev:
            raise KitError(f"{w}: expected an object with a name")
        name = str(dev["name"])
        if name in seen:
            raise KitError(f"{w}.name: device {name!r} appears twice")
        seen.add(name)
        ms = dev.get("unit_ms")
        if not isinstance(ms, list):
            raise KitError(f"{w}.unit_ms: expected a list of {len(units)} numbers")
        if len(ms) != len(units):
            raise KitError(f"{w}.unit_ms has {len(ms)} entries, units has {len(units)}")
        devices.append(DeviceSpec(name, _num(dev.get("memory_bytes"), f"{w}.memory_bytes"),
                                  tuple(_num(x, f"{w}.unit_ms[{j}]") for j, x in enumerate(ms)),
                                  bool(dev.get("source", False)), bool(dev.get("cloud", False)),
                                  _num(dev.get("stage_ms", 0.0), f"{w}.stage_ms")))
    sources = [x.name for x in devices if x.source]
    if len(sources) != 1:
        raise KitError(f"{where}.devices: exactly one source device needed, found "
                       f"{len(sources)}{' (' + ', '.join(sources) + ')' if sources else ''}")
    links = d.get("links", {}) or {}
    if not isinstance(links, dict):
        raise KitError(f"{where}.links: expected an object with default and pairs")
    default = _link_from(links["default"], "links.default") if "default" in links else LinkSpec(math.inf, 0.0)
    pairs = []
    for i, p in enumerate(links.get("pairs", []) or []):
        w = f"links.pairs[{i}]"
        for end in ("src", "dst"):
            if not isinstance(p, dict) or p.get(end) not in seen:
                got = p.get(end) if isinstance(p, dict) else p
                raise KitError(f"{w}.{end}: unknown device {got!r} (devices: {', '.join(sorted(seen))})")
        pairs.append((str(p["src"]), str(p["dst"]), _link_from(p, w)))
    mbs = _num(d.get("micro_batch_size", 1), f"{where}.micro_batch_size", minimum=1)
    return Problem(tuple(units), tuple(devices), default, tuple(pairs),
                   _num(d.get("return_bytes", 4), f"{where}.return_bytes"), int(mbs), dict(d.get("meta", {}) or {}),
                   _num(d.get("step_ms", 0.0), f"{where}.step_ms"))


def load_problem(path: str | Path) -> Problem:
    """Read a problem JSON file."""
    p = Path(path)
    if not p.is_file():
        raise KitError(f"problem file {p} does not exist")
    return problem_from_dict(read_json(p), str(p))


def save_problem(problem: Problem, path: str | Path) -> Path:
    """Write a problem JSON file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(problem.to_dict(), indent=1))
    return p


def figures(problem: Problem, stages: list[Stage] | tuple[Stage, ...]) -> dict:
    """The cost model on a stage list: latency, bottleneck (per resource), per-stage figures, memory."""
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
    over = [f"{n} needs {m / 1e9:.3f} GB > its {problem.devices[idx[n]].memory_bytes / 1e9:.3f} GB"
            for n, m in mem.items() if m > problem.devices[idx[n]].memory_bytes * (1 + 1e-12)]
    if stages[0].device != src:
        over.insert(0, f"unit 0 must run on the source {src}, not {stages[0].device}")
    bottleneck = max(list(load.values()) + list(link_load.values()))
    return {"latency_ms": sum(comp) + sum(trans) + problem.step_ms, "bottleneck_ms": bottleneck,
            "throughput_per_s": problem.micro_batch_size * 1000.0 / bottleneck if bottleneck > 0 else math.inf,
            "stage_compute_ms": comp, "stage_transfer_ms": trans, "memory_bytes": mem,
            "device_load_ms": load, "link_load_ms": {f"{a}->{b}": v for (a, b), v in link_load.items()},
            "feasible": not over, "reason": "; ".join(over)}


def without_fixed_costs(problem: Problem) -> Problem:
    """The same problem under the paper's model: no per-stage and no per-token fixed costs."""
    meta = {k: v for k, v in problem.meta.items() if k != "runtime_overheads"}
    return replace(problem, step_ms=0.0, devices=tuple(replace(d, stage_ms=0.0) for d in problem.devices), meta=meta)


def make_plan(problem: Problem, stages: list[Stage], objective: str, relay: bool = False,
              method: str = "edgeshard") -> Plan:
    """A Plan with the figures the cost model predicts for `stages`."""
    f = figures(problem, stages)
    return Plan(objective, tuple(stages), f["latency_ms"], f["bottleneck_ms"], f["throughput_per_s"],
                tuple(f["stage_compute_ms"]), tuple(f["stage_transfer_ms"]), f["memory_bytes"], relay, method,
                f["feasible"], f["reason"], problem.micro_batch_size)


def infeasible_reason(problem: Problem) -> str:
    """The tightest memory constraint that no plan can meet."""
    gb = 1e9
    need = sum(u.mem_bytes for u in problem.units)
    have = sum(d.memory_bytes for d in problem.devices)
    src = problem.devices[problem.source]
    if problem.units[0].mem_bytes > src.memory_bytes:
        return (f"infeasible: the source {src.name} cannot hold unit 0 ({problem.units[0].mem_bytes / gb:.3f} GB "
                f"> {src.memory_bytes / gb:.3f} GB)")
    if have < need:
        return f"infeasible: total memory of all devices {have / gb:.3f} GB < model {need / gb:.3f} GB"
    biggest = max(d.memory_bytes for d in problem.devices)
    for i, u in enumerate(problem.units):
        if u.mem_bytes > biggest:
            return f"infeasible: unit {i} ({u.name}) needs {u.mem_bytes / gb:.3f} GB, more than any device ({biggest / gb:.3f} GB)"
    return ("infeasible: no split into contiguous stages fits the devices' memory "
            "(each device runs at most one stage; try --relay)")


def solve(problem: Problem, objective: str = "latency", relay: bool = False, cap_ms: float = math.inf) -> Plan:
    """The exact optimum for `objective`; KitError 'infeasible: ...' when nothing fits."""
    from edgeshard_kit.planning import dp

    if objective not in OBJECTIVES:
        raise KitError(f"objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    stages = dp.solve_stages(problem, objective, relay=relay, cap_ms=cap_ms)
    if stages is not None and objective == "throughput" and not relay:
        # among the plans with the optimal bottleneck, the one with the lowest latency (exact: every
        # resource under the bottleneck is the latency DP's cap)
        b = figures(problem, stages)["bottleneck_ms"]
        stages = dp.solve_stages(problem, "latency", cap_ms=min(cap_ms, b * (1 + 1e-12) + 1e-12)) or stages
    if stages is None:
        raise KitError(infeasible_reason(problem) if math.isinf(cap_ms)
                       else f"infeasible: no plan keeps every stage and transfer under {cap_ms:g} ms")
    return make_plan(problem, stages, objective, relay)


def evaluate(problem: Problem, plan: Plan, micro_batches: int = 1, tokens: int = 8) -> dict:
    """Predicted figures and bubbles / no-bubbles timelines of K micro-batches (see schedule.py)."""
    from edgeshard_kit.planning.schedule import evaluate as _evaluate

    return _evaluate(problem, plan, micro_batches, tokens)


def with_method(plan: Plan, method: str) -> Plan:
    """The same plan under another method name."""
    return replace(plan, method=method)


def add_commands(sub) -> None:
    from edgeshard_kit.cli.plan import add_plan_command

    add_plan_command(sub)


def add_bench_commands(bench_sub) -> None:
    from edgeshard_kit.cli.plan import add_solver_bench

    add_solver_bench(bench_sub)
