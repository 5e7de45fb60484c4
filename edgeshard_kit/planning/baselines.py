"""Baselines (Edge-Solo, Cloud-Edge-Even/-Opt, memory-proportional), the latency/throughput Pareto frontier, constrained solves."""

from __future__ import annotations

import math
from dataclasses import replace

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.units import Stage
from edgeshard_kit.planning.dp import solve
from edgeshard_kit.planning.plan import Plan, make_plan
from edgeshard_kit.planning.problem import Problem
from edgeshard_kit.planning.schedule import simulate

BASELINES = ("Edge-Solo", "Cloud-Edge-Even", "Cloud-Edge-Opt", "Memory-Proportional")


def cloud_device(problem: Problem) -> int | None:
    """The device marked cloud, else the fastest non-source device (least total unit time); None if alone."""
    marked = [i for i, d in enumerate(problem.devices) if d.cloud]
    if marked:
        return marked[0]
    others = [i for i in range(len(problem.devices)) if i != problem.source]
    return min(others, key=lambda i: sum(problem.devices[i].unit_ms)) if others else None


def _oom(problem: Problem, stages: list[Stage], objective: str, method: str, reason: str) -> Plan:
    p = make_plan(problem, stages, objective, method=method)
    return replace(p, feasible=False, reason=reason)


def edge_solo(problem: Problem, objective: str = "latency") -> Plan:
    """Everything on the source device."""
    src = problem.devices[problem.source].name
    p = make_plan(problem, [Stage(src, 0, problem.n_units)], objective, method="Edge-Solo")
    return p if p.feasible else _oom(problem, list(p.stages), objective, "Edge-Solo", "out of memory: " + p.reason)


def _two_stage(problem: Problem, k: int, cloud: int) -> list[Stage]:
    src = problem.devices[problem.source].name
    return [Stage(src, 0, k), Stage(problem.devices[cloud].name, k, problem.n_units)]


def cloud_edge_even(problem: Problem, objective: str = "latency") -> Plan:
    """Source + cloud, decoder layers split evenly: source gets embed + first half, cloud the rest + head."""
    cloud = cloud_device(problem)
    if cloud is None:
        return _oom(problem, [Stage(problem.names[problem.source], 0, problem.n_units)], objective,
                    "Cloud-Edge-Even", "no device besides the source")
    n_layers = problem.n_units - 2
    k = 1 + (n_layers + 1) // 2 if n_layers > 0 else 1
    k = min(max(k, 1), problem.n_units - 1) if problem.n_units > 1 else 1
    stages = _two_stage(problem, k, cloud) if problem.n_units > 1 else [Stage(problem.names[problem.source], 0, 1)]
    p = make_plan(problem, stages, objective, method="Cloud-Edge-Even")
    return p if p.feasible else _oom(problem, stages, objective, "Cloud-Edge-Even", "out of memory: " + p.reason)


def cloud_edge_opt(problem: Problem, objective: str = "latency") -> Plan:
    """Source + cloud at the best split point for the objective (out of memory if no split fits)."""
    cloud = cloud_device(problem)
    if cloud is None or problem.n_units < 2:
        return _oom(problem, [Stage(problem.names[problem.source], 0, problem.n_units)], objective,
                    "Cloud-Edge-Opt", "no device besides the source")
    key = "latency_ms" if objective == "latency" else "bottleneck_ms"
    plans = [make_plan(problem, _two_stage(problem, k, cloud), objective, method="Cloud-Edge-Opt")
             for k in range(1, problem.n_units)]
    ok = [p for p in plans if p.feasible]
    if ok:
        return min(ok, key=lambda p: getattr(p, key))
    # nothing fits: report the split that overflows least
    def overflow(p: Plan) -> float:
        return sum(max(0.0, m - problem.devices[problem.index(d)].memory_bytes) for d, m in p.memory_bytes.items())
    worst = min(plans, key=overflow)
    return _oom(problem, list(worst.stages), objective, "Cloud-Edge-Opt", "out of memory: no split point fits; best " +
                worst.reason)


def memory_proportional(problem: Problem, objective: str = "latency") -> Plan:
    """All devices, source first, units in proportion to memory (what exo and llama.cpp RPC do)."""
    order = [problem.source] + [i for i in range(len(problem.devices)) if i != problem.source]
    mems = [problem.devices[i].memory_bytes for i in order]
    total_mem = sum(mems) or 1.0
    n = problem.n_units
    # unit u goes to the device whose share of the cumulative memory covers the unit's index midpoint
    bounds, acc = [], 0.0
    for m in mems:
        acc += m
        bounds.append(acc / total_mem * n)
    stages, start = [], 0
    for j, i in enumerate(order):
        end = n if j == len(order) - 1 else min(n, max(start, round(bounds[j])))
        if j == 0:
            end = max(end, 1)
        if end > start:
            stages.append(Stage(problem.devices[i].name, start, end))
            start = end
    p = make_plan(problem, stages, objective, method="Memory-Proportional")
    return p if p.feasible else _oom(problem, stages, objective, "Memory-Proportional", "out of memory: " + p.reason)


def baselines(problem: Problem, objective: str = "latency") -> list[Plan]:
    """Every baseline, out-of-memory ones included (feasible=False, reason)."""
    return [edge_solo(problem, objective), cloud_edge_even(problem, objective),
            cloud_edge_opt(problem, objective), memory_proportional(problem, objective)]


def latency_bottleneck_frontier(problem: Problem, max_points: int = 500) -> list[Plan]:
    """Exact Pareto set of (latency, bottleneck) by epsilon-constraint: min latency s.t. every resource <= cap."""
    plans: list[Plan] = []
    cap = math.inf
    while len(plans) < max_points:
        try:
            p = solve(problem, "latency", cap_ms=cap)
        except KitError:
            break
        if plans and p.latency_ms <= plans[-1].latency_ms + 1e-12:
            plans.pop()  # same latency, lower bottleneck: the previous point is dominated
        plans.append(p)
        cap = p.bottleneck_ms * (1 - 1e-9) - 1e-9
    return plans


def pareto(problem: Problem, micro_batch_counts: tuple[int, ...] = (1, 2, 4, 8), tokens: int = 8,
           schedule: str = "no-bubbles") -> list[dict]:
    """Non-dominated (per-token latency, tokens/s) points over plans and micro-batch counts."""
    points = []
    for p in latency_bottleneck_frontier(problem):
        for k in micro_batch_counts:
            sim = simulate(problem, p, k, tokens, schedule)
            points.append({"micro_batches": k, "latency_ms": sim.token_interval_ms,
                           "throughput_per_s": sim.throughput_per_s, "plan_latency_ms": p.latency_ms,
                           "bottleneck_ms": p.bottleneck_ms, "n_devices": len(p.devices),
                           "stages": [s.to_dict() for s in p.stages]})
    points.sort(key=lambda r: (r["latency_ms"], -r["throughput_per_s"]))
    front, best = [], -math.inf
    for r in points:
        if r["throughput_per_s"] > best + 1e-12:
            front.append(r)
            best = r["throughput_per_s"]
    return front


def solve_constrained(problem: Problem, max_latency_ms: float | None = None,
                      min_throughput_per_s: float | None = None) -> Plan:
    """Best throughput with latency <= max_latency_ms, or best latency with throughput >= min_throughput_per_s."""
    if (max_latency_ms is None) == (min_throughput_per_s is None):
        raise KitError("give exactly one of max_latency_ms and min_throughput_per_s")
    if min_throughput_per_s is not None:
        if min_throughput_per_s <= 0:
            raise KitError(f"min_throughput_per_s must be > 0, got {min_throughput_per_s}")
        return solve(problem, "latency", cap_ms=problem.micro_batch_size * 1000.0 / min_throughput_per_s)
    ok = [p for p in latency_bottleneck_frontier(problem) if p.latency_ms <= max_latency_ms * (1 + 1e-12)]
    if not ok:
        fastest = solve(problem, "latency")
        raise KitError(f"infeasible: the lowest possible latency is {fastest.latency_ms:.3f} ms "
                       f"> the bound {max_latency_ms:g} ms")
    best = min(ok, key=lambda p: p.bottleneck_ms)
    return replace(best, objective="throughput")


def solve_for_micro_batches(problem: Problem, micro_batches: int) -> Plan:
    """Best throughput with exactly K micro-batches in flight: max K / max(latency, K x bottleneck).

    The throughput objective assumes enough micro-batches to fill the pipeline; with few, a
    shorter pipeline wins. The cycle time of K micro-batches is max(latency, K x bottleneck), which
    falls with both, so the optimum lies on the exact (latency, bottleneck) frontier.
    """
    if micro_batches < 1:
        raise KitError(f"micro_batches must be >= 1, got {micro_batches}")
    front = latency_bottleneck_frontier(problem)
    if not front:
        solve(problem, "latency")  # raises the infeasibility message
    best = min(front, key=lambda p: (max(p.latency_ms, micro_batches * p.bottleneck_ms), p.latency_ms))
    return replace(best, objective="throughput")
