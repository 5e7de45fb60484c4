"""`edgeshard bench solver`: the planner's speed on paper-sized synthetic problems, one row per case (ms)."""

from __future__ import annotations

import random
import statistics
import time

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.experiments.paper import paper_problem
from edgeshard_kit.planning.dp import device_types, solve, solve_stages
from edgeshard_kit.planning.plan import make_plan
from edgeshard_kit.planning.problem import Problem, problem_from_dict

RELAY_STATES = 5000  # the relay rows' state budget (the planner's default is 20 000)


def synthetic_problem(n_units: int, types: list[tuple[str, int, float, float]], mbps_cloud: float,
                      seed: int = 0) -> Problem:
    """A problem with `types` = (name, count, ms per layer, memory GB); distinct types get jittered times.

    Units are Llama2-7B-like (0.754 GB per layer, 0.488 GB embedding and head, 64 KiB activations);
    links 1000 Mbps + 2.1 ms, `mbps_cloud` to and from the devices of type "cloud".
    """
    rng = random.Random(seed)
    units = [{"name": f"u{u}", "mem_bytes": 0.754e9 if 0 < u < n_units - 1 else 0.488e9, "out_bytes": 65536}
             for u in range(n_units)]
    devices = []
    for name, count, ms, mem in types:
        base = [ms * (0.12 if u in (0, n_units - 1) else 1.0) * rng.uniform(0.9, 1.1) for u in range(n_units)]
        for i in range(count):
            devices.append({"name": f"{name}{i}", "memory_bytes": mem * 1e9, "source": not devices,
                            "cloud": name == "cloud", "unit_ms": base})
    pairs = [{"src": a["name"], "dst": b["name"], "mbps": mbps_cloud, "latency_ms": 2.1}
             for a in devices for b in devices if a is not b and "cloud" in (a["name"][:5], b["name"][:5])]
    return problem_from_dict({"units": units, "devices": devices, "return_bytes": 4,
                              "links": {"default": {"mbps": 1000, "latency_ms": 2.1}, "pairs": pairs}})


def distinct_problem(n_units: int, n_dev: int, seed: int = 1) -> Problem:
    """n_dev pairwise-distinct devices (different speeds and memories): no two merge into one type."""
    rng = random.Random(seed)
    return synthetic_problem(n_units, [(f"dev{i}x", 1, rng.uniform(1, 8), rng.uniform(4, 30)) for i in range(n_dev)], 50)


def cases() -> list[tuple[str, str, Problem]]:
    """(objective, description, problem) of every benchmarked case."""
    return [
        ("latency", "80 layers x 16 devices (12 AGX-like + 3 NX-like + 1 cloud: 3 types)",
         synthetic_problem(82, [("agx", 12, 5.3, 29), ("nx", 3, 6.0, 14), ("cloud", 1, 0.8, 22)], 10)),
        ("latency", "80 layers x 16 devices (4 types of 4)",
         synthetic_problem(82, [("a", 4, 5.3, 29), ("b", 4, 6.0, 14), ("c", 4, 3.0, 8), ("cloud", 4, 0.8, 22)], 10)),
        ("throughput", "paper testbed: 34 units x 15 devices (12 AGX + 2 NX + 1 RTX 3090: 3 types)",
         synthetic_problem(34, [("agx", 12, 5.3, 29), ("nx", 2, 6.0, 14), ("cloud", 1, 0.8, 22)], 10)),
        ("latency", "34 units x 12 pairwise-distinct devices (2^12 device sets)", distinct_problem(34, 12)),
        ("throughput", "34 units x 12 pairwise-distinct devices (2^12 device sets)", distinct_problem(34, 12)),
    ]


def relay_cases() -> list[tuple[str, str, Problem]]:
    """(objective, description, problem) of the relay rows: the paper's testbed (34 / 42 / 82 units x 15 devices)."""
    return [(obj, f"relay: paper {model} at {mbps} Mbps", paper_problem(model, mbps))
            for model, obj, mbps in [("llama2-70b", "latency", 1), ("llama2-70b", "latency", 10),
                                     ("llama2-70b", "latency", 20), ("llama2-70b", "latency", 50),
                                     ("llama2-13b", "latency", 50), ("llama2-7b", "throughput", 1),
                                     ("llama2-7b", "throughput", 10), ("llama2-7b", "throughput", 20),
                                     ("llama2-7b", "throughput", 50), ("llama2-13b", "throughput", 10),
                                     ("llama2-13b", "throughput", 50), ("llama2-70b", "throughput", 1),
                                     ("llama2-70b", "throughput", 50)]]


def _row(objective: str, what: str, problem: Problem, times: list[float], plan, status: str) -> dict:
    times = sorted(times)
    value = None if plan is None else round(plan.latency_ms if objective == "latency" else plan.bottleneck_ms, 3)
    return {"objective": objective, "problem": what, "units": problem.n_units,
            "devices": len(problem.devices), "types": len(device_types(problem)),
            "min_ms": round(times[0], 2), "median_ms": round(statistics.median(times), 2),
            "max_ms": round(times[-1], 2), "plan_devices": None if plan is None else len(plan.devices),
            "value_ms": value, "status": status}


def bench_solver(repeats: int = 3, relay: bool = True) -> list[dict]:
    """Time `solve` on every case: min / median / max of `repeats` (ms), and the plan it finds.

    With `relay`, also the relay search on every `relay_cases` row (`repeats` runs), with a budget of
    `RELAY_STATES` states: status "exact", or "gave up: optimum >= X" (the bound it proved).
    """
    if repeats < 1:
        raise KitError(f"repeats must be >= 1, got {repeats}")
    rows = []
    for objective, what, problem in cases():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            plan = solve(problem, objective)
            times.append((time.perf_counter() - t0) * 1e3)
        rows.append(_row(objective, what, problem, times, plan, "exact"))
    for objective, what, problem in (relay_cases() if relay else []):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            try:
                stages = solve_stages(problem, objective, relay=True, max_states=RELAY_STATES)
                plan, status = make_plan(problem, stages, objective, relay=True), "exact"
            except KitError as e:
                plan, status = None, "gave up: optimum >= " + str(e).split("at least ")[1].split(" ms")[0] + " ms"
            times.append((time.perf_counter() - t0) * 1e3)
        rows.append(_row(objective, what, problem, times, plan, status))
    return rows
