"""The planning problem: units, devices and directed links (`Problem`), its JSON file, and its paper's-model twin."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.io import read_json, write_json
from edgeshard_kit.core.schema import validate
from edgeshard_kit.planning.schema import LinksIn, ProblemIn

EPS_MS = 1e-9  # tolerance of the solvers' comparisons of times (ms) against caps and bounds
__all__ = ["EPS_MS", "Unit", "DeviceSpec", "LinkSpec", "Problem", "problem_from_dict", "load_problem", "save_problem",
           "without_fixed_costs"]


TOKEN_ID_BYTES = 8  # the runtime's last stage samples and sends back one int64 token id per sequence

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
    return_bytes: float = 8.0  # bytes the last stage sends back to the source (one int64 token id per sequence)
    micro_batch_size: int = 1  # sequences per micro-batch: tokens/s = this * 1000 / bottleneck
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    step_ms: float = 0.0  # fixed per-token cost outside the stages (the coordinator's round trip); latency only
    # Bytes of the last unit's mem_bytes that are unit 0's tensor (tied embeddings): a device holding both
    # unit 0 and the last unit holds them once (`shared_bytes`).
    tied_bytes: float = 0.0

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

    def shared_bytes(self, units: set[int] | range) -> float:
        """Bytes counted twice when one device holds `units`: the tied tensor, if they include 0 and the last unit."""
        return self.tied_bytes if self.n_units > 1 and 0 in units and self.n_units - 1 in units else 0.0

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
            "tied_bytes": self.tied_bytes,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "problem") -> "Problem":
        return problem_from_dict(d, where)


def problem_from_dict(d: Any, where: str = "problem") -> Problem:
    """Build and validate a Problem from its JSON form; KitError "WHERE: field: why" (one line) otherwise.

    The schema (planning.schema.ProblemIn) checks every field's type and range; here the rules between
    fields: unit_ms as long as units, device names unique, exactly one source, pairs between known devices.
    """
    x = validate(ProblemIn, d, where)
    units = tuple(Unit(u.name or f"unit{i}", u.mem_bytes, u.out_bytes) for i, u in enumerate(x.units))
    devices, seen = [], set()
    for i, dev in enumerate(x.devices):
        w = f"{where}: devices[{i}]"
        if dev.name in seen:
            raise KitError(f"{w}.name: device {dev.name!r} appears twice")
        seen.add(dev.name)
        if len(dev.unit_ms) != len(units):
            raise KitError(f"{w}.unit_ms has {len(dev.unit_ms)} entries, units has {len(units)}")
        devices.append(DeviceSpec(dev.name, dev.memory_bytes, tuple(dev.unit_ms), dev.source, dev.cloud, dev.stage_ms))
    sources = [dev.name for dev in devices if dev.source]
    if len(sources) != 1:
        raise KitError(f"{where}: devices: exactly one source device needed, found "
                       f"{len(sources)}{' (' + ', '.join(sources) + ')' if sources else ''}")
    links = x.links or LinksIn()
    default = LinkSpec(links.default.mbps, links.default.latency_ms) if links.default else LinkSpec(math.inf, 0.0)
    pairs, seen_pairs = [], set()
    for i, p in enumerate(links.pairs or []):
        w = f"{where}: links.pairs[{i}]"
        for end in ("src", "dst"):
            if getattr(p, end) not in seen:
                raise KitError(f"{w}.{end}: unknown device {getattr(p, end)!r} (devices: {', '.join(sorted(seen))})")
        if p.src == p.dst:
            raise KitError(f"{w}: src and dst are both {p.src!r}")
        if (p.src, p.dst) in seen_pairs:
            raise KitError(f"{w}: duplicate link {p.src} -> {p.dst}")
        seen_pairs.add((p.src, p.dst))
        pairs.append((p.src, p.dst, LinkSpec(p.mbps, p.latency_ms)))
    tied = x.tied_bytes
    if tied and (len(units) < 2 or tied > min(units[0].mem_bytes, units[-1].mem_bytes)):
        raise KitError(f"{where}: tied_bytes: {tied:g} bytes cannot be shared by unit 0 and the last unit "
                       f"(their mem_bytes: {units[0].mem_bytes:g} and {units[-1].mem_bytes:g})")
    mbs = x.micro_batch_size
    return_bytes = TOKEN_ID_BYTES * mbs if x.return_bytes is None else x.return_bytes
    return Problem(units, tuple(devices), default, tuple(pairs), return_bytes, mbs, dict(x.meta or {}), x.step_ms, tied)


def load_problem(path: str | Path) -> Problem:
    """Read a problem JSON file; KitError "FILE: field: why" (one line) when it is not a valid problem."""
    p = Path(path)
    if not p.exists():
        raise KitError(f"problem file {p} does not exist")
    return problem_from_dict(read_json(p), str(p))


def save_problem(problem: Problem, path: str | Path) -> Path:
    """Write a problem JSON file."""
    return write_json(problem.to_dict(), path)


def without_fixed_costs(problem: Problem) -> Problem:
    """The same problem under the paper's model: no per-stage and no per-token fixed costs."""
    meta = {k: v for k, v in problem.meta.items() if k != "runtime_overheads"}
    return replace(problem, step_ms=0.0, devices=tuple(replace(d, stage_ms=0.0) for d in problem.devices), meta=meta)
