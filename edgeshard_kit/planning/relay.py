"""Exact relay planning (a device may host several stages): A* over partial plans with exact per-device memory.

The state carries every device's used memory (and, for throughput, every device's and directed
link's load), so memory is exact, unlike the paper's greedy tracking. Lower bounds: the relay DP
that checks memory per stage only, and a fractional memory-capacity bound; upper bound: the
default-variant optimum, which the caller (dp.py) passes in. Worst case exponential; it gives up
with a KitError after `max_states`.
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.units import Stage
from edgeshard_kit.planning.problem import EPS_MS, Problem


def _relay_bound(problem: Problem, objective: str, cap_ms: float) -> np.ndarray:
    """H[u, d]: a lower bound on finishing units [u, N) after a stage on d ended at u (memory per stage only)."""
    N, M = problem.n_units, len(problem.devices)
    names = problem.names
    Q = np.concatenate([[0.0], np.cumsum([u.mem_bytes for u in problem.units])])
    P = np.array([np.concatenate([[0.0], np.cumsum(d.unit_ms)]) for d in problem.devices])
    H = np.full((N + 1, M), np.inf)
    src = problem.source
    for d in range(M):
        r = problem.transfer_ms(names[d], names[src], problem.return_bytes)
        H[N, d] = r if r <= cap_ms + EPS_MS else np.inf
    lat = objective == "latency"
    for u in range(N - 1, 0, -1):
        nbytes = problem.units[u - 1].out_bytes
        for d in range(M):
            best = np.inf
            for d2 in range(M):
                if d2 == d:
                    continue
                tr = problem.transfer_ms(names[d], names[d2], nbytes)
                if tr > cap_ms + EPS_MS:
                    continue
                es = np.arange(u + 1, N + 1)
                ok = (Q[es] - Q[u] <= problem.devices[d2].memory_bytes * (1 + 1e-12) + 1e-6)
                comp = P[d2, es] - P[d2, u] + problem.devices[d2].stage_ms
                ok &= comp <= cap_ms + EPS_MS
                if not ok.any():
                    continue
                vals = (tr + comp + H[es, d2]) if lat else np.maximum(np.maximum(tr, comp), H[es, d2])
                best = min(best, float(vals[ok].min()))
            H[u, d] = best
    return H


def relay_search(problem: Problem, objective: str, cap_ms: float, max_states: int,
                 incumbent: tuple[float, list[Stage]] | None, groups: list[list[int]]):
    """Exact relay optimum (value, stages) by A* over partial plans with per-device memory (and loads) in the state.

    Pruned by `incumbent`, the default-variant optimum (a relay plan too; None if none fits), as an
    upper bound, and by symmetry: of the not-yet-used devices of one type (`groups`, dp.device_types)
    only the first is tried.
    """
    N, M = problem.n_units, len(problem.devices)
    names = problem.names
    H = _relay_bound(problem, objective, cap_ms)
    Q = np.concatenate([[0.0], np.cumsum([u.mem_bytes for u in problem.units])])
    P = [np.concatenate([[0.0], np.cumsum(d.unit_ms)]) for d in problem.devices]
    memcap = [d.memory_bytes * (1 + 1e-12) + 1e-6 for d in problem.devices]
    src = problem.source
    lat = objective == "latency"
    step = problem.step_ms if lat else 0.0  # a constant of every plan: kept out of g, added at the end
    ub = (incumbent[0] - step) * (1 - 1e-12) if incumbent else math.inf
    cap_bound = _capacity_bound(problem, objective)
    heap: list = []
    seen: dict = {}
    counter = 0

    def push(u, last, mem, loads, links, g, stages):
        nonlocal counter
        if u == N:
            r = problem.transfer_ms(names[last], names[src], problem.return_bytes)
            if r > cap_ms + EPS_MS:
                return
            f = g + r if lat else (max(g, dict(links).get((last, src), 0.0) + r) if last != src else g)
        else:
            h = H[u, last]
            f = g + h if lat else max(g, h)
        if f >= ub:  # cannot beat the default-variant plan
            return
        heapq.heappush(heap, (f, counter, u, last, mem, loads, links, g, stages, u == N))
        counter += 1

    stage_ms = [d.stage_ms for d in problem.devices]
    tied = problem.shared_bytes(range(N))  # the whole model as one stage on the source holds the tied tensor once
    for e in range(1, N + 1):
        c = P[src][e] + stage_ms[src]
        q = Q[e] - (tied if e == N else 0.0)
        if q <= memcap[src] and c <= cap_ms + EPS_MS:
            mem = tuple(q if i == src else 0.0 for i in range(M))
            loads = tuple(c if i == src else 0.0 for i in range(M))
            push(e, src, mem, loads, (), c, ((src, 0, e),))
    expanded = 0
    while heap:
        f, _, u, last, mem, loads, links, g, stages, bounded = heapq.heappop(heap)
        if u == N:
            return f + step, [Stage(names[d], s, e) for d, s, e in stages]
        if not bounded:  # lazily tighten with the memory/capacity bound, then queue again
            f2 = max(f, cap_bound(u, mem, loads, g))
            if f2 >= ub:
                continue
            if f2 > f:
                heapq.heappush(heap, (f2, counter, u, last, mem, loads, links, g, stages, True))
                counter += 1
                continue
        key = (u, last, mem, None if lat else loads, None if lat else links)
        if seen.get(key, math.inf) <= g:
            continue
        seen[key] = g
        expanded += 1
        if expanded > max_states:
            raise KitError(f"relay search gave up after {max_states} states (exact relay planning is exponential "
                           f"in the worst case); plan without --relay")
        used = {d for d, _, _ in stages}
        cands = [d for d in sorted(used) if d != last]
        cands += [next(d for d in g_ if d not in used) for g_ in groups if any(d not in used for d in g_)]
        nbytes = problem.units[u - 1].out_bytes
        for d in cands:
            tr = problem.transfer_ms(names[last], names[d], nbytes)
            if tr > cap_ms + EPS_MS:
                continue
            ld = dict(links)
            ld[(last, d)] = ld.get((last, d), 0.0) + tr
            new_links = tuple(sorted(ld.items()))
            for e in range(u + 1, N + 1):
                m = mem[d] + Q[e] - Q[u]  # a later stage is another worker: no tied tensor to share
                if m > memcap[d]:
                    break
                c = P[d][e] - P[d][u] + stage_ms[d]
                if c > cap_ms + EPS_MS:
                    break
                new_loads = loads[:d] + (loads[d] + c,) + loads[d + 1:]
                g2 = g + tr + c if lat else max(g, ld[(last, d)], new_loads[d])
                if g2 >= ub:
                    break  # longer stages only cost more
                push(e, d, mem[:d] + (m,) + mem[d + 1:], new_loads, new_links, g2, stages + ((d, u, e),))
    return incumbent


def _capacity_bound(problem: Problem, objective: str):
    """A lower bound from memory: the remaining bytes must fit the devices' free memory, each byte costing
    at least the device's least ms per byte over the remaining units (a fractional relaxation)."""
    N, M = problem.n_units, len(problem.devices)
    Q = np.concatenate([[0.0], np.cumsum([u.mem_bytes for u in problem.units])])
    memcap = np.array([d.memory_bytes * (1 + 1e-12) + 1e-6 for d in problem.devices])
    ratio = np.full((M, N + 1), np.inf)  # ratio[d, u]: least ms per byte of d over units [u, N)
    for d, dev in enumerate(problem.devices):
        for u in range(N - 1, -1, -1):
            mb = problem.units[u].mem_bytes
            here = dev.unit_ms[u] / mb if mb > 0 else np.inf
            ratio[d, u] = min(here, ratio[d, u + 1])
    lat = objective == "latency"
    names = problem.names
    out = [u.out_bytes for u in problem.units]
    min_in = np.full((M, N + 1), np.inf)  # min_in[d, u]: cheapest transfer into d at a boundary >= u
    for d in range(M):
        for u in range(N - 1, 0, -1):
            here = min((problem.transfer_ms(names[a], names[d], out[u - 1]) for a in range(M) if a != d),
                       default=np.inf)
            min_in[d, u] = min(here, min_in[d, u + 1])

    def bound(u: int, mem: tuple, loads: tuple, g: float) -> float:
        need = Q[N] - Q[u]  # after the first stage, no stage holds both unit 0 and the head
        avail = np.maximum(memcap - np.asarray(mem), 0.0)
        if avail.sum() < need - 1e-6:
            return math.inf  # the rest of the model no longer fits anywhere
        r = ratio[:, u]
        if lat:
            order = np.argsort(r)
            take = np.minimum(avail[order], np.maximum(need - np.concatenate([[0.0], np.cumsum(avail[order])[:-1]]), 0))
            fin = np.isfinite(r[order])
            return g + float((take[fin] * r[order][fin]).sum())
        # throughput: smallest B with sum_d min(avail_d, (B - load_d) / r_d) >= need, where a device
        # counts only if B covers the cheapest transfer into it (every later stage starts with one)
        ld = np.asarray(loads)
        fin = np.isfinite(r) & (r > 0)
        if not fin.any():
            return g

        def cover(b: float) -> float:
            ok = fin & (min_in[:, u] <= b)
            return float(np.minimum(avail[ok], np.maximum(b - ld[ok], 0.0) / r[ok]).sum())

        lo_b, hi_b = g, max(g, 1.0)
        while cover(hi_b) < need - 1e-6:
            hi_b *= 2
            if hi_b > 1e12:
                return math.inf
        for _ in range(40):
            mid = (lo_b + hi_b) / 2
            if cover(mid) >= need - 1e-6:
                hi_b = mid
            else:
                lo_b = mid
        return max(g, lo_b)

    return bound
