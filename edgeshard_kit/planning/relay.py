"""Exact relay planning (a device may host several stages): A* over partial plans with exact per-device memory.

The state carries every device's used memory (and, for throughput, every device's and directed
link's load), so memory is exact, unlike the paper's greedy tracking. Lower bounds: the relay DP
that checks memory per stage only, a fractional memory-capacity bound, and the integral packing
bound of relay_bounds.py (memory over all visits, transfers per visit); upper bound: the
default-variant optimum, which the caller (dp.py) passes in. For throughput, the exact optimum of the
packing relaxation (relay_packing.py) comes first and usually settles it. Worst case exponential; it
gives up with a KitError after `max_states`.
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.units import Stage
from edgeshard_kit.planning.problem import EPS_MS, Problem
from edgeshard_kit.planning.relay_bounds import ClassBound, transfer_minima
from edgeshard_kit.planning.relay_packing import packing_optimum, realize

# Throughput tries the packing relaxation (relay_packing.py) before the A* search (False: the A* search alone, which
# gives up on the paper's 7B throughput problems).
USE_PACKING = True


def _link_arrays(problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    """(latency_ms, mbps) of every directed link as (M, M) arrays; the diagonal is unused."""
    M, names = len(problem.devices), problem.names
    pairs: dict = {}
    for a, b, ln in problem.pairs:  # Problem.link: the first matching pair wins
        pairs.setdefault((a, b), ln)
    lat, mbps = np.zeros((M, M)), np.full((M, M), np.inf)
    for a in range(M):
        for b in range(M):
            ln = pairs.get((names[a], names[b]), problem.default_link)
            lat[a, b], mbps[a, b] = ln.latency_ms, ln.mbps
    return lat, mbps


def _transfer_matrix(lat: np.ndarray, mbps: np.ndarray, nbytes: float) -> np.ndarray:
    """Tr[a, b]: ms to send nbytes from a to b (as LinkSpec.transfer_ms computes it); inf on the diagonal."""
    with np.errstate(divide="ignore", invalid="ignore"):
        tr = lat + np.where(np.isinf(mbps), 0.0, nbytes * 8.0 / (mbps * 1000.0))
    np.fill_diagonal(tr, np.inf)
    return tr


def _relay_bound(problem: Problem, objective: str, cap_ms: float) -> np.ndarray:
    """H[u, d]: a lower bound on finishing units [u, N) after a stage on d ended at u (memory per stage only).

    H[u, d] = min over d2 != d, e > u of Tr[d, d2] + comp[d2, u, e] + H[e, d2] (throughput: max);
    the minimum over e does not depend on d, so each u costs O(M (N + M)) in a few numpy calls.
    """
    N, M = problem.n_units, len(problem.devices)
    Q = np.concatenate([[0.0], np.cumsum([u.mem_bytes for u in problem.units])])
    P = np.array([np.concatenate([[0.0], np.cumsum(d.unit_ms)]) for d in problem.devices])
    memcap = np.array([d.memory_bytes * (1 + 1e-12) + 1e-6 for d in problem.devices])
    stage_ms = np.array([d.stage_ms for d in problem.devices])
    lat_m, mbps = _link_arrays(problem)
    H = np.full((N + 1, M), np.inf)
    src = problem.source
    ret = _transfer_matrix(lat_m, mbps, problem.return_bytes)[:, src]
    ret[src] = 0.0
    H[N] = np.where(ret <= cap_ms + EPS_MS, ret, np.inf)
    lat = objective == "latency"
    for u in range(N - 1, 0, -1):
        tr = _transfer_matrix(lat_m, mbps, problem.units[u - 1].out_bytes)
        tr[tr > cap_ms + EPS_MS] = np.inf
        comp = P[:, u + 1:] - P[:, u:u + 1] + stage_ms[:, None]  # (d2, e) for e = u+1..N
        ok = (Q[None, u + 1:] - Q[u] <= memcap[:, None]) & (comp <= cap_ms + EPS_MS)
        inner = comp + H[u + 1:].T if lat else np.maximum(comp, H[u + 1:].T)
        R = np.where(ok, inner, np.inf).min(axis=1)  # best finish after entering d2 at u
        H[u] = (tr + R[None, :]).min(axis=1) if lat else np.maximum(tr, R[None, :]).min(axis=1)
    return H


def _canonical(groups: list[list[int]], src: int):
    """key(last, mem, loads, links, nst): one key for states that differ only by a renaming of interchangeable devices.

    Devices of one type (`groups`, the source kept apart: it starts and may end the plan) are sorted by
    their (memory, load, stages) and renamed by rank; links are renamed the same way. Two states with
    one key are the same up to such a renaming, so they have the same completions (ties in the sort
    only cost merges, never correctness: the key holds everything renamed).
    """
    classes = [[d for d in g if d != src] for g in groups] + [[src]]

    def key(last, mem, loads, links, nst):
        rank, parts = {}, []
        for ci, g in enumerate(classes):
            rows = sorted((mem[d], loads[d], nst[d], d) for d in g if d != last)
            for r, row in enumerate(rows):
                rank[row[3]] = (ci, r)
            parts.append(tuple(row[:3] for row in rows))
            if last in g:
                rank[last] = (ci, -1)
                parts.append((ci, mem[last], loads[last], nst[last]))
        return tuple(parts), tuple(sorted((rank[a], rank[b], v) for (a, b), v in links))

    return key


def _owed(groups: list[list[int]], src: int, last: int, nst: tuple, u: int, n: int) -> int:
    """Stages a canonical completion still owes: devices never used, of a type one of whose devices runs 2+ stages.

    Exchange argument: a stage on a device with two or more stages moves to an unused device of its
    type without raising any device's or link's load or the latency, so some optimal plan reuses a
    device only once all devices of its type are in use. The one exception is the source ending the
    plan with its second stage (that saves the return transfer).
    """
    owed = 0
    for g in groups:
        unused = sum(1 for d in g if nst[d] == 0)
        if not unused:
            continue
        for d in g:
            if nst[d] >= 3 or (nst[d] == 2 and not (d == src and u == n and last == src)):
                owed += unused
                break
    return owed


def relay_search(problem: Problem, objective: str, cap_ms: float, max_states: int,
                 incumbent: tuple[float, list[Stage]] | None, groups: list[list[int]]):
    """Exact relay optimum (value, stages) by A* over partial plans with per-device memory (and loads) in the state.

    Throughput first tries the packing relaxation (relay_packing.py, within `max_states` states of its
    own): when it proves that no plan beats `incumbent`, or the plan of its optimal packing meets its
    bound, that is the answer; else its optimum is a lower bound and its plan may be a better incumbent.
    A* is pruned by `incumbent`, the default-variant optimum (a relay plan too; None if none fits), as an
    upper bound; by symmetry: of the not-yet-used devices of one type (`groups`, dp.device_types)
    only the first is tried, and states equal up to a renaming of devices of one type are merged
    (`_canonical`); and by the exchange argument of `_owed` (a device runs a second stage only when
    its whole type is in use, or the source ends the plan).
    """
    N, M = problem.n_units, len(problem.devices)
    names = problem.names
    memcap = [d.memory_bytes * (1 + 1e-12) + 1e-6 for d in problem.devices]
    src = problem.source
    lat = objective == "latency"
    step = problem.step_ms if lat else 0.0  # a constant of every plan: kept out of g, added at the end
    link_lat, link_mbps = _link_arrays(problem)
    minima = transfer_minima(problem, lambda nb: _transfer_matrix(link_lat, link_mbps, nb), src)

    def transfer(a: int, b: int, nbytes: float) -> float:  # Problem.transfer_ms without the name look-ups
        if a == b:
            return 0.0
        mb = link_mbps[a, b]
        return float(link_lat[a, b] + (0.0 if math.isinf(mb) else nbytes * 8.0 / (mb * 1000.0)))

    floor = 0.0  # a lower bound on the optimum, proved by the packing relaxation
    if not lat and USE_PACKING:
        packed = _by_packing(problem, cap_ms, groups, minima, memcap, incumbent, max_states, transfer)
        if packed[0] == "optimal":
            return packed[1]
        floor, better = packed[1], packed[2]
        if better is not None and (incumbent is None or better[0] < incumbent[0]):
            incumbent = better
    ub = (incumbent[0] - step) * (1 - 1e-12) if incumbent else math.inf
    H = _relay_bound(problem, objective, cap_ms)
    Q = np.concatenate([[0.0], np.cumsum([u.mem_bytes for u in problem.units])])
    P = [np.concatenate([[0.0], np.cumsum(d.unit_ms)]) for d in problem.devices]
    cap_bound = _capacity_bound(problem, objective)
    canon = _canonical(groups, src)
    class_bound = ClassBound(problem, objective, cap_ms, np.array(memcap), *minima).bound
    heap: list = []
    seen: dict = {}
    counter = 0

    def state_key(u, last, mem, loads, links, nst):
        return (u,) + canon(last, mem, loads if not lat else (0.0,) * M, () if lat else links, nst)

    def push(u, last, mem, loads, links, nst, g, stages):
        nonlocal counter
        owed = _owed(groups, src, last, nst, u, N)
        if owed > N - u:
            return  # not enough units left for the unused devices a canonical plan must still use
        if u == N:
            r = transfer(last, src, problem.return_bytes)
            if r > cap_ms + EPS_MS:
                return
            f = g + r if lat else (max(g, dict(links).get((last, src), 0.0) + r) if last != src else g)
        else:
            h = H[u, last]
            f = g + h if lat else max(g, h)
        if f >= ub:  # cannot beat the default-variant plan
            return
        key = state_key(u, last, mem, loads, links, nst)
        if seen.get(key, math.inf) <= g:
            return  # an equivalent state (up to renaming devices of one type) is already as good
        seen[key] = g
        heapq.heappush(heap, (f, counter, u, last, mem, loads, links, nst, g, stages, u == N, key))
        counter += 1

    stage_ms = [d.stage_ms for d in problem.devices]
    tied = problem.shared_bytes(range(N))  # the whole model as one stage on the source holds the tied tensor once
    for e in range(1, N + 1):
        c = P[src][e] + stage_ms[src]
        q = Q[e] - (tied if e == N else 0.0)
        if q <= memcap[src] and c <= cap_ms + EPS_MS:
            mem = tuple(q if i == src else 0.0 for i in range(M))
            loads = tuple(c if i == src else 0.0 for i in range(M))
            nst = tuple(1 if i == src else 0 for i in range(M))
            push(e, src, mem, loads, (), nst, c, ((src, 0, e),))
    expanded = 0
    while heap:
        f, _, u, last, mem, loads, links, nst, g, stages, bounded, key = heapq.heappop(heap)
        if seen.get(key, math.inf) < g:
            continue  # superseded by a better equivalent state
        if u == N:
            return f + step, [Stage(names[d], s, e) for d, s, e in stages]
        if not bounded:  # lazily tighten with the memory/capacity bound, then queue again
            f2 = max(f, cap_bound(u, mem, loads, g))
            if f2 < ub:
                f2 = max(f2, class_bound(u, last, mem, loads, g, ub))
            if f2 >= ub:
                continue
            if f2 > f:
                heapq.heappush(heap, (f2, counter, u, last, mem, loads, links, nst, g, stages, True, key))
                counter += 1
                continue
        expanded += 1
        if expanded > max_states:
            best = f"{incumbent[0]:.6g}" if incumbent else "none found"
            raise KitError(f"relay search gave up after {max_states} states (exact relay planning is exponential "
                           f"in the worst case): the relay optimum is at least {max(f, floor) + step:.6g} ms "
                           f"(best plan: {best}); plan without --relay")
        cands = [d for d in range(M) if nst[d] and d != last]
        cands += [next(d for d in g_ if not nst[d]) for g_ in groups if any(not nst[d] for d in g_)]
        nbytes = problem.units[u - 1].out_bytes
        for d in cands:
            tr = transfer(last, d, nbytes)
            if tr > cap_ms + EPS_MS:
                continue
            ld = dict(links)
            ld[(last, d)] = ld.get((last, d), 0.0) + tr
            new_links = tuple(sorted(ld.items()))
            new_nst = nst[:d] + (nst[d] + 1,) + nst[d + 1:]
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
                push(e, d, mem[:d] + (m,) + mem[d + 1:], new_loads, new_links, new_nst, g2, stages + ((d, u, e),))
    return incumbent


def _by_packing(problem: Problem, cap_ms: float, groups: list[list[int]], minima, memcap, incumbent,
                max_states: int, transfer):
    """Throughput: ("optimal", incumbent or (value, stages) or None) when the packing relaxation (relay_packing.py)
    proves the optimum, else ("open", lower bound, a better plan (value, stages) or None) for the A* search."""
    min_in, min_out, _ = minima
    theta = np.maximum(min_in[:, 1], min_out[:, 1])  # a device that gets units needs a way in and a way out
    ret = min_out[:, -1].copy()
    theta[theta > cap_ms + EPS_MS] = np.inf
    ret[ret > cap_ms + EPS_MS] = np.inf
    bound = incumbent[0] if incumbent else math.inf
    pk = packing_optimum(problem, cap_ms, groups, theta, ret, memcap, bound, max_states)
    if not pk.proved:
        return "open", 0.0, None
    if pk.value is None:  # no relay plan beats the incumbent (a one-stage plan sharing a tied tensor is the DP's)
        return "optimal", incumbent
    got = realize(problem, pk.assignment, cap_ms, memcap, transfer)
    plan = None if got is None else (got[0], [Stage(problem.names[d], s, e) for d, s, e in got[1]])
    if plan is not None and plan[0] <= pk.value * (1 + 1e-12) + EPS_MS:
        return "optimal", plan  # it meets the relaxation's bound
    return "open", min(pk.value, bound), plan  # (a one-stage plan sharing a tied tensor is at least `bound`)


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
        # cover(B) is piecewise linear between the breakpoints (a load, a saturation, a cheapest
        # transfer), so the least B is found exactly: the first breakpoint that covers, then back
        # along the segment before it
        ld, mi = np.asarray(loads), min_in[:, u]
        use = np.isfinite(r) & (avail > 0)
        if not use.any():
            return g
        ld, mi, rr, av = ld[use], mi[use], r[use], avail[use]
        with np.errstate(divide="ignore", invalid="ignore"):
            sat = ld + av * rr  # B at which the device's free memory is used up
            bs = np.unique(np.concatenate([[g], ld, sat, mi]))
            bs = bs[np.isfinite(bs) & (bs >= g)]
            span = np.maximum(bs[:, None] - ld[None, :], 0.0)
            part = np.where(rr[None, :] > 0, span / rr[None, :], np.where(span > 0, np.inf, 0.0))
            part = np.where(mi[None, :] <= bs[:, None], np.minimum(av[None, :], part), 0.0)
        cov = part.sum(axis=1)
        k = int(np.argmax(cov >= need - 1e-6))
        if cov[k] < need - 1e-6:
            return math.inf  # the rest of the model no longer fits anywhere
        if k == 0:
            return max(g, float(bs[0]))
        b0 = bs[k - 1]
        if ((rr == 0) & (mi <= b0) & (ld <= b0)).any():
            return max(g, float(b0))  # a device with free units fills its memory just above b0
        live = (mi <= b0) & (ld <= b0) & (sat > b0) & (rr > 0)
        slope = float((1.0 / rr[live]).sum())
        b = b0 + (need - 1e-6 - cov[k - 1]) / slope if slope > 0 else bs[k]
        return max(g, min(float(b), float(bs[k])) * (1 - 1e-12))

    return bound
