"""The planner's DPs and relay search agree with exhaustive search on random small problems (tied embeddings too)."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.units import Stage
from edgeshard_kit.planning import dp, relay
from edgeshard_kit.planning.baselines import latency_bottleneck_frontier
from edgeshard_kit.planning.plan import figures
from edgeshard_kit.planning.problem import problem_from_dict
from edgeshard_kit.planning.relay_bounds import ClassBound, transfer_minima


def random_problem(rng: random.Random, n_units: int, n_dev: int, tight: bool) -> dict:
    """A random problem; `tight` gives memories near the model size (often infeasible)."""
    units = [{"name": f"u{i}", "mem_bytes": rng.randint(1, 5), "out_bytes": rng.choice([0, 1000, 4000, 20000])}
             for i in range(n_units)]
    total = sum(u["mem_bytes"] for u in units)
    kinds = [[round(rng.uniform(0.1, 5), 2) for _ in range(n_units)] for _ in range(2)]
    devices = []
    for d in range(n_dev):
        ms = rng.choice(kinds) if rng.random() < 0.5 else [round(rng.uniform(0.1, 5), 2) for _ in range(n_units)]
        cap = rng.randint(max(1, total // (n_dev + 1)), total // 2 + 3) if tight else rng.randint(total // 2, total + 2)
        devices.append({"name": f"d{d}", "memory_bytes": cap, "source": d == 0, "unit_ms": ms})
        if rng.random() < 0.5:  # the runtime's fixed cost per stage (calibrated overheads)
            devices[-1]["stage_ms"] = rng.choice([0.0, 0.3, 1.5])
    pairs = []
    for a, b in itertools.permutations(range(n_dev), 2):
        if rng.random() < 0.4:
            pairs.append({"src": f"d{a}", "dst": f"d{b}", "mbps": rng.choice([1, 10, 100, None]),
                          "latency_ms": rng.choice([0, 0.5, 2.0])})
    return {"units": units, "devices": devices, "links": {"default": {"mbps": 50, "latency_ms": 0.2}, "pairs": pairs},
            "return_bytes": rng.choice([4, 4000]), "step_ms": rng.choice([0.0, 0.0, 0.7])}


def all_plans(problem, relay: bool):
    """Every stage list: compositions of the units x device sequences starting at the source."""
    n, names = problem.n_units, problem.names
    src = names[problem.source]
    for k in range(1, n + 1):
        for cuts in itertools.combinations(range(1, n), k - 1):
            bounds = (0,) + cuts + (n,)
            seqs = itertools.product(names, repeat=k - 1)
            for rest in seqs:
                devs = (src,) + rest
                if relay:
                    if any(devs[i] == devs[i + 1] for i in range(k - 1)):
                        continue
                elif len(set(devs)) < k:
                    continue
                yield [Stage(devs[i], bounds[i], bounds[i + 1]) for i in range(k)]


def brute(problem, objective: str, relay: bool):
    best = None
    key = "latency_ms" if objective == "latency" else "bottleneck_ms"
    for stages in all_plans(problem, relay):
        f = figures(problem, stages)
        if f["feasible"] and (best is None or f[key] < best):
            best = f[key]
    return best


@pytest.mark.parametrize("objective", ["latency", "throughput"])
@pytest.mark.parametrize("relay", [False, True])
def test_agrees_with_brute_force(objective, relay):
    rng = random.Random(hash((objective, relay)) % 1000)
    key = "latency_ms" if objective == "latency" else "bottleneck_ms"
    infeasible = 0
    for i in range(300):
        n_units = rng.randint(1, 6)
        n_dev = rng.randint(1, 4)
        d = random_problem(rng, n_units, n_dev, tight=i % 2 == 0)
        if i % 3 == 0:  # identical devices (the source among them half the time): exercises the type merge
            first = 0 if i % 2 else min(1, n_dev - 1)
            for dev in d["devices"][first:]:
                dev["unit_ms"], dev["memory_bytes"] = d["devices"][-1]["unit_ms"], d["devices"][-1]["memory_bytes"]
                dev["stage_ms"] = d["devices"][-1].get("stage_ms", 0.0)
            d["links"]["pairs"] = []
        if i % 4 == 1 and n_units > 1:  # tied embeddings: unit 0 and the last unit share bytes
            d["tied_bytes"] = rng.randint(1, min(d["units"][0]["mem_bytes"], d["units"][-1]["mem_bytes"]))
        problem = problem_from_dict(d)
        want = brute(problem, objective, relay)
        stages = dp.solve_stages(problem, objective, relay=relay)
        if want is None:
            infeasible += 1
            assert stages is None, (i, stages)
            continue
        assert stages is not None, i
        f = figures(problem, stages)
        assert f["feasible"], (i, f["reason"])
        if not relay:
            assert len({s.device for s in stages}) == len(stages)
        assert f[key] == pytest.approx(want, rel=1e-9, abs=1e-9), (i, stages)
    assert infeasible > 10  # the tight half really exercises infeasibility


def test_frontier_agrees_with_brute_force():
    rng = random.Random(7)
    for i in range(80):
        problem = problem_from_dict(random_problem(rng, rng.randint(1, 5), rng.randint(1, 4), tight=i % 2 == 0))
        pts = []
        for stages in all_plans(problem, relay=False):
            f = figures(problem, stages)
            if f["feasible"]:
                pts.append((round(f["latency_ms"], 9), round(f["bottleneck_ms"], 9)))
        want = sorted({(lat, b) for lat, b in pts
                       if not any(l2 <= lat and b2 <= b and (l2, b2) != (lat, b) for l2, b2 in pts)})
        got = [(round(p.latency_ms, 9), round(p.bottleneck_ms, 9)) for p in latency_bottleneck_frontier(problem)]
        assert got == want, i


def typed_problem(rng: random.Random, n_units: int, n_types: int, per_type: int, tight: bool) -> dict:
    """Devices in `n_types` types of up to `per_type` identical devices (the source's type too): for symmetry."""
    d = random_problem(rng, n_units, n_types, tight)
    d["links"]["pairs"] = []  # identical links, so devices of one type are interchangeable
    devices = []
    for t, proto in enumerate(d["devices"]):
        for i in range(rng.randint(1, per_type)):
            devices.append({**proto, "name": f"t{t}x{i}", "source": t == 0 and i == 0})
    d["devices"] = devices
    return d


@pytest.mark.parametrize("objective", ["latency", "throughput"])
@pytest.mark.parametrize("relay", [False, True])
def test_identical_devices_agree_with_brute_force(objective, relay):
    """Symmetry (one key per renaming of identical devices), the reuse exchange rule and the window minimum."""
    rng = random.Random(hash(("typed", objective, relay)) % 1000)
    key = "latency_ms" if objective == "latency" else "bottleneck_ms"
    solved = reused = 0
    for i in range(70):
        n_units = rng.randint(2, 5)
        d = typed_problem(rng, n_units, rng.randint(1, 2), 3, tight=i % 2 == 0)
        if i % 3 == 0:  # small memories: plans must reuse devices (relay) or use many
            for dev in d["devices"]:
                dev["memory_bytes"] = max(u["mem_bytes"] for u in d["units"]) + rng.randint(0, 3)
        if i % 4 == 1:  # equal unit sizes: memory no longer tells apart which units a device holds
            for u in d["units"]:
                u["mem_bytes"] = 1
        problem = problem_from_dict(d)
        if len(problem.devices) > 5:
            continue
        want = brute(problem, objective, relay)
        stages = dp.solve_stages(problem, objective, relay=relay, max_states=10**6)
        if want is None:
            assert stages is None, (i, stages)
            continue
        f = figures(problem, stages)
        assert f["feasible"], (i, f["reason"])
        assert f[key] == pytest.approx(want, rel=1e-9, abs=1e-9), (i, stages)
        solved += 1
        reused += len({s.device for s in stages}) < len(stages)
    assert solved > 20
    if relay:
        assert reused > 0  # some optimum really reuses a device


def test_window_min_matches_numpy():
    rng = np.random.default_rng(3)
    rows = rng.uniform(0, 10, size=(40, 7))
    rows[rng.uniform(size=rows.shape) < 0.2] = np.inf
    win = dp._WindowMin(rows)
    lo = 1
    for e in range(2, 41):
        lo = min(e - 1, lo + int(rng.integers(0, 3)))  # lo and e never decrease
        assert np.array_equal(win.min(lo, e), rows[lo:e].min(axis=0)), (lo, e)


def test_relay_give_up_reports_the_proven_bound():
    rng = random.Random(5)
    problem = problem_from_dict(typed_problem(rng, 6, 2, 3, tight=False))
    exact = dp.solve_value(problem, "throughput", relay=True, max_states=10**6)
    try:
        dp.solve_value(problem, "throughput", relay=True, max_states=1)
    except KitError as e:
        low = float(str(e).split("at least ")[1].split(" ms")[0])
        assert low <= exact * (1 + 1e-5)


@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_class_bound_is_below_every_completion(objective):
    """The integral packing bound (relay_bounds.ClassBound) never exceeds the value of any feasible plan
    through the partial plan it bounds: checked on every prefix of every feasible plan of random problems."""
    rng = random.Random(hash(("class-bound", objective)) % 1000)
    key = "latency_ms" if objective == "latency" else "bottleneck_ms"
    checked = 0
    for i in range(60):
        d = typed_problem(rng, rng.randint(2, 5), rng.randint(1, 2), 2, tight=i % 2 == 0) if i % 2 else \
            random_problem(rng, rng.randint(2, 5), rng.randint(1, 3), tight=i % 3 == 0)
        if i % 4 == 1:  # equal units: the classes merge
            for u in d["units"]:
                u["mem_bytes"] = 1
        problem = problem_from_dict(d)
        if len(problem.devices) > 4:
            continue
        names = problem.names
        memcap = np.array([dev.memory_bytes * (1 + 1e-12) + 1e-6 for dev in problem.devices])
        lat_m, mbps = relay._link_arrays(problem)
        cb = ClassBound(problem, objective, math.inf, memcap,
                        *transfer_minima(problem, lambda nb: relay._transfer_matrix(lat_m, mbps, nb), problem.source))
        for stages in all_plans(problem, relay=True):
            f = figures(problem, stages)
            if not f["feasible"]:
                continue
            value = f[key] - (problem.step_ms if objective == "latency" else 0.0)
            mem, loads, links = [0.0] * len(names), [0.0] * len(names), {}
            g = 0.0
            for k, st in enumerate(stages[:-1]):
                di = names.index(st.device)
                mem[di] += sum(u.mem_bytes for u in problem.units[st.start:st.end])
                c = sum(problem.devices[di].unit_ms[st.start:st.end]) + problem.devices[di].stage_ms
                loads[di] += c
                if k:
                    prev = names.index(stages[k - 1].device)
                    tr = problem.transfer_ms(names[prev], st.device, problem.units[st.start - 1].out_bytes)
                    links[(prev, di)] = links.get((prev, di), 0.0) + tr
                else:
                    tr = 0.0
                g = g + c + tr if objective == "latency" else max([g, c, loads[di]] + list(links.values()))
                b = cb.bound(st.end, di, tuple(mem), tuple(loads), g)
                assert b <= value * (1 + 1e-9) + 1e-9, (i, stages, k, b, value)
                checked += 1
    assert checked > 200
