"""Re-planning while serving: the problem updated with measured figures, and whether to move to its new optimum.

Pure functions over `Problem` and stage lists (no torch, no sockets). The runtime's adaptive controller
(runtime.adaptive) measures link times and stage compute, turns them into an updated `Problem`
(`with_link_mbps`, `with_device_scale`, `without_device`), and asks `decide` whether the new optimum beats
the current plan by more than a tolerance (hysteresis: within the tolerance, nothing moves).
Costs are in ms: per-token latency for ``latency``, the cycle max(latency, K x bottleneck) of K micro-batches for
``throughput``, the bottleneck for ``throughput-steady``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.units import Stage, format_stages
from edgeshard_kit.planning.objectives import OBJECTIVES, solve_objective
from edgeshard_kit.planning.plan import Plan, figures
from edgeshard_kit.planning.problem import LinkSpec, Problem

__all__ = ["Decision", "decide", "plan_cost", "with_link_mbps", "with_device_scale", "without_device"]


def plan_cost(problem: Problem, stages: list[Stage] | tuple[Stage, ...], objective: str,
              micro_batches: int = 1) -> float:
    """The objective's cost (ms, lower is better) of `stages` on `problem`; inf when they do not fit its memory."""
    if objective not in OBJECTIVES:
        raise KitError(f"objective: {objective!r} is not one of {', '.join(OBJECTIVES)}")
    f = figures(problem, stages)
    if not f["feasible"]:
        return math.inf
    if objective == "latency":
        return float(f["latency_ms"])
    if objective == "throughput":
        return float(max(f["latency_ms"], micro_batches * f["bottleneck_ms"]))
    return float(f["bottleneck_ms"])


def with_link_mbps(problem: Problem, src: str, dst: str, mbps: float) -> Problem:
    """`problem` with the directed link src -> dst at `mbps` (its latency kept); KitError for unknown devices."""
    problem.index(src), problem.index(dst)
    if not mbps > 0:
        raise KitError(f"link {src} -> {dst}: bandwidth must be > 0 Mbps, got {mbps!r}")
    old = problem.link(src, dst)
    pairs = [(a, b, ln) for a, b, ln in problem.pairs if (a, b) != (src, dst)]
    pairs.append((src, dst, LinkSpec(float(mbps), old.latency_ms)))
    return replace(problem, pairs=tuple(pairs))


LINK_SCOPES = ("endpoint", "link")


def with_measured_link(problem: Problem, src: str, dst: str, mbps: float, scope: str = "endpoint") -> Problem:
    """`problem` updated with a link's measured bandwidth.

    `scope` "link": only src -> dst. "endpoint" (what a running deployment can tell): the slowdown is taken as
    the access link of the endpoint that is not the source device (both endpoints when neither is) slowing down,
    so every link to or from it gets at most `mbps`. One drifting link cannot tell its own slowdown from its
    endpoint's uplink; assuming the uplink keeps the planner off links it has not measured (measured: with only
    edge0 -> cloud at 20 kbps, the re-plan moved to edge3 -> cloud -> edge2, which ran over the same throttled
    cloud uplink at a tenth of the predicted speed).
    """
    if scope not in LINK_SCOPES:
        raise KitError(f"link scope: {scope!r} is not one of {', '.join(LINK_SCOPES)}")
    problem = with_link_mbps(problem, src, dst, mbps)
    if scope == "link":
        return problem
    source = problem.names[problem.source]
    ends = {src, dst} - {source} or {src, dst}
    for a in problem.names:
        for b in problem.names:
            if a != b and (a, b) != (src, dst) and (a in ends or b in ends) and problem.link(a, b).mbps > mbps:
                problem = with_link_mbps(problem, a, b, mbps)
    return problem


def with_device_scale(problem: Problem, name: str, factor: float) -> Problem:
    """`problem` with every unit time of device `name` multiplied by `factor` (measured / predicted compute)."""
    i = problem.index(name)
    if not factor > 0 or math.isinf(factor):
        raise KitError(f"device {name}: compute scale must be a finite number > 0, got {factor!r}")
    d = problem.devices[i]
    devices = list(problem.devices)
    devices[i] = replace(d, unit_ms=tuple(u * factor for u in d.unit_ms))
    return replace(problem, devices=tuple(devices))


def without_device(problem: Problem, name: str) -> Problem:
    """`problem` without device `name` (a lost worker) and its links; KitError for the source (it holds unit 0)."""
    i = problem.index(name)
    if problem.devices[i].source:
        raise KitError(f"device {name} is the source (it holds unit 0 and the user's data): it cannot be removed")
    devices = tuple(d for d in problem.devices if d.name != name)
    pairs = tuple((a, b, ln) for a, b, ln in problem.pairs if name not in (a, b))
    return replace(problem, devices=devices, pairs=pairs)


@dataclass(frozen=True)
class Decision:
    """The outcome of a re-plan: the new optimum, both costs (ms) on the updated problem, and whether to move."""

    move: bool
    plan: Plan  # the new optimum of the updated problem (deployed only when `move`)
    current_ms: float  # cost of the current stages on the updated problem (inf: they no longer fit or run)
    new_ms: float  # cost of the new optimum
    gain: float  # (current - new) / current: the predicted fraction of time saved (1.0 from an infeasible plan)
    reason: str

    def to_dict(self) -> dict:
        return {"move": self.move, "new_plan": format_stages(self.plan.stages), "current_ms": self.current_ms,
                "new_ms": self.new_ms, "gain": self.gain, "reason": self.reason}


def decide(problem: Problem, current: list[Stage] | tuple[Stage, ...], objective: str = "latency",
           micro_batches: int = 1, tolerance: float = 0.1, relay_fallback: bool = True) -> Decision:
    """Re-solve `problem` for `objective`; move only when the optimum beats `current` by more than `tolerance`.

    `tolerance` is a fraction of the current cost (0.1: the new plan must be more than 10% faster). A current
    plan that uses a device the problem no longer has, or no longer fits, always moves. `relay_fallback`: when no
    plan of one stage per device fits (after a device is lost, the others may hold the model only if one of them
    runs two stages, e.g. the source holding both tied embedding ends), the relay optimum is taken instead.
    KitError when nothing fits.
    """
    if not 0 <= tolerance < 1:
        raise KitError(f"tolerance: expected a fraction in [0, 1), got {tolerance!r}")
    names = set(problem.names)
    lost = sorted({s.device for s in current} - names)
    cur = math.inf if lost else plan_cost(problem, current, objective, micro_batches)
    try:
        best = solve_objective(problem, objective, micro_batches if objective == "throughput" else None)
    except KitError as first:
        if not relay_fallback:
            raise
        try:  # throughput: the relay solver's steady state (it has no fixed-K variant)
            best = solve_objective(problem, objective, None, relay=True)
        except KitError:
            raise first from None
    new = plan_cost(problem, best.stages, objective, micro_batches)
    if tuple(best.stages) == tuple(current):
        return Decision(False, best, cur, new, 0.0, "the current plan is still the optimum")
    if math.isinf(cur):
        why = f"device(s) {', '.join(lost)} lost" if lost else "the current plan no longer fits"
        return Decision(True, best, cur, new, 1.0, why)
    gain = (cur - new) / cur if cur > 0 else 0.0
    if gain > tolerance:
        return Decision(True, best, cur, new, gain,
                        f"new optimum {new:.2f} ms beats the current {cur:.2f} ms by {gain:.0%} (> {tolerance:.0%})")
    return Decision(False, best, cur, new, gain,
                    f"new optimum {new:.2f} ms is within {tolerance:.0%} of the current {cur:.2f} ms: nothing moves")
