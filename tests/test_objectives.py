"""The three objectives (planning.objectives) against exhaustive search: throughput at K micro-batches is the
plan with the smallest cycle max(latency, K x bottleneck); throughput-steady is the smallest bottleneck."""

from __future__ import annotations

import random

import pytest

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.planning.objectives import METHOD_NAMES, OBJECTIVES, micro_batches_label, solve_objective
from edgeshard_kit.planning.plan import figures
from edgeshard_kit.planning.problem import problem_from_dict
from test_plan_bruteforce import all_plans, random_problem


def _best_cycle(problem, k: int) -> float | None:
    best = None
    for stages in all_plans(problem, relay=False):
        f = figures(problem, stages)
        if f["feasible"]:
            cycle = max(f["latency_ms"], k * f["bottleneck_ms"])
            best = cycle if best is None else min(best, cycle)
    return best


@pytest.mark.parametrize("k", [1, 2, 4, 16])
def test_throughput_at_k_agrees_with_brute_force(k):
    rng = random.Random(100 + k)
    checked = 0
    for i in range(120):
        problem = problem_from_dict(random_problem(rng, rng.randint(1, 5), rng.randint(1, 4), tight=i % 2 == 0))
        want = _best_cycle(problem, k)
        if want is None:
            with pytest.raises(KitError):
                solve_objective(problem, "throughput", k)
            continue
        plan = solve_objective(problem, "throughput", k)
        assert plan.method == METHOD_NAMES["throughput"]
        assert max(plan.latency_ms, k * plan.bottleneck_ms) == pytest.approx(want, rel=1e-9, abs=1e-9), i
        checked += 1
    assert checked > 30


def test_k_one_is_the_latency_plan_and_many_approach_the_steady_state():
    rng = random.Random(5)
    for i in range(60):
        problem = problem_from_dict(random_problem(rng, rng.randint(2, 5), rng.randint(2, 4), tight=False))
        try:
            lat = solve_objective(problem, "latency")
        except KitError:
            continue  # nothing fits (the source too small for unit 0)
        one = solve_objective(problem, "throughput", 1)
        assert one.latency_ms == pytest.approx(lat.latency_ms, rel=1e-9, abs=1e-9)
        steady = solve_objective(problem, "throughput-steady")
        many = solve_objective(problem, "throughput", 10**6)
        assert many.bottleneck_ms == pytest.approx(steady.bottleneck_ms, rel=1e-9, abs=1e-9)
        assert steady.method == METHOD_NAMES["throughput-steady"]


def test_bad_objective_and_k_are_named():
    problem = problem_from_dict(random_problem(random.Random(1), 3, 2, tight=False))
    with pytest.raises(KitError, match="objective"):
        solve_objective(problem, "speed")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(KitError, match="micro_batches"):
            solve_objective(problem, "throughput", bad)
    assert set(OBJECTIVES) == set(METHOD_NAMES)
    assert micro_batches_label(1) == "1 micro-batch" and micro_batches_label(4) == "4 micro-batches"
