"""Throughput relay: the exact optimum of its packing relaxation, by bin completion, and the plan it gives.

For the bottleneck objective a relay plan is an assignment of units to devices (unit 0 on the source;
the stages are the runs of consecutive units on one device). The *packing relaxation* forgets the
order of the units: an assignment's relaxed value is the largest, over the devices d that get units, of
  - d's load: its units' `unit_ms` and one `stage_ms` (the source always holds unit 0 and pays one);
  - if d is not the source, theta[d] = max(cheapest transfer into d, cheapest transfer out of d or its
    return), over every boundary: d runs some stage, entered from another device and left to another
    device or back to the source, so some link into d and some link out of d carry at least these;
  - if d is not the source and holds the last unit, its return to the source (that link's load);
subject to each device's units' bytes fitting its memory (a tied tensor counted twice) and no unit or
transfer over `cap_ms`. Every term is the load of one resource of the plan (a device's stages summed:
at least one `stage_ms`; a directed link's transfers summed) or a lower bound on one, so the relaxed
value is at most the plan's bottleneck (`plan.figures`; `step_ms` is no part of it), and the relaxation's
optimum R is a lower bound on every relay plan but one: the one-stage plan on the source, when it fits
only by holding a tied tensor once (the caller's incumbent, the default DP's optimum, covers it). When
the plan the optimal packing gives (`realize`) has bottleneck R, it is the relay optimum, proved. On the
paper's 7B throughput problems at 1-20 Mbps the RTX is out of reach and the relaxation is a
number-partitioning problem (which three of the cheapest layers share an AGX); transfers stay far
below the bottleneck, so the packing's plan meets R.

The search is bin completion (Korf, "An improved algorithm for optimal bin packing", IJCAI 2003) as a
depth-first branch and bound whose bound B is the best packing so far (at first the caller's
incumbent); it finds a packing below B whenever one exists, so the last one is optimal (up to float
rounding, a relative 1e-12). The largest unit left goes on some device: branch on the device kind (the
devices of one type that hold nothing yet are interchangeable: one branch per kind) and on the whole
set of units that device takes; then that device is closed. Only undominated sets are tried, by two
exchange arguments that keep a packing under B: a set with room for another unit left is dominated
(moving that unit here only unloads its device), and so is a set holding a unit x where a unit y left
that is at least as slow as x on every kind and at least as big fits instead (swap them: y's device
gets lighter). A set counts as dominated only when the set that replaces it is under B and the memory
by a margin (SLACK): the enumeration sums a set's times in its own order, and float sums depend on the
order, so without it a set at the bound could be dominated by a fuller set that the enumeration finds
not below B, and neither be tried (brute force found such a problem: tests/test_relay_packing.py,
FLOAT_TIE). Both rules depend on B, so a node looks at its sets again when a packing lowers B. A state
(units left, devices left) whose search found nothing below B is remembered as a failure, which also
holds for every B' <= B. Bounds prune: a device takes at most f units (its kind's cheapest f left fit
under B); n units on c devices of a kind fill at least j = n - c (f - 1) of them with f units, whose
loads, each under B, sum to at least the j f cheapest units'; and the units' least times must fit the
room left. A problem where unit 0 does not fit the source has no plan and no packing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgeshard_kit.planning.problem import EPS_MS, Problem

MAX_CANDIDATES = 5000  # the most candidate sets a device may take at the root (else the search is not tried)
# Relative margin of the dominance tests: a set is dominated only when the set that replaces it is under the bound
# (and the memory) by this much, so that the other set, whose load `grow` sums in another order, is surely tried.
SLACK = 1e-12


def _below(x: float) -> float:
    """x less the dominance margin (SLACK, relative; at least SLACK absolute); inf stays inf."""
    return x - SLACK * max(1.0, abs(x)) if math.isfinite(x) else x


@dataclass(frozen=True)
class Packing:
    """The packing search's answer. `proved`: it finished, so `value` is the relaxation's optimum below the
    bound it was given (None: no packing below it) and `assignment` (device index per unit) a packing
    reaching it; otherwise it ran out of nodes or was not tried (`value` is then None). `nodes`: states."""

    proved: bool
    value: float | None = None
    assignment: tuple[int, ...] | None = None
    nodes: int = 0


class _OutOfNodes(Exception):
    pass


class _Search:
    """Bin completion over the relaxation; items are units 1..N-1, sorted by their least time, largest first."""

    def __init__(self, problem: Problem, cap_ms: float, groups: list[list[int]], theta, ret, memcap, ub: float,
                 max_nodes: int):
        N, src = problem.n_units, problem.source
        devs = problem.devices
        kinds = [[src]] + [[d for d in g if d != src] for g in groups]
        self.kinds = [k for k in kinds if k and (k[0] == src or theta[k[0]] < ub)]  # the others can take nothing
        units = range(1, N)

        def times(d):
            return [x if x <= cap_ms + EPS_MS else math.inf for x in (devs[d].unit_ms[u] for u in units)]

        least = [min(times(k[0])[i] for k in self.kinds) for i in range(N - 1)]
        self.order = sorted(range(N - 1), key=lambda i: (-least[i], i))  # item j is unit order[j] + 1
        self.t = [[times(k[0])[i] for i in self.order] for k in self.kinds]
        self.m = [problem.units[i + 1].mem_bytes for i in self.order]
        self.head = self.order.index(N - 2)  # the last unit: its device pays the return
        self.base = [devs[k[0]].unit_ms[0] + devs[k[0]].stage_ms if k[0] == src else devs[k[0]].stage_ms
                     for k in self.kinds]
        self.cap = [memcap[k[0]] - (problem.units[0].mem_bytes if k[0] == src else 0.0) for k in self.kinds]
        self.theta = [0.0 if k[0] == src else float(theta[k[0]]) for k in self.kinds]
        self.ret = [0.0 if k[0] == src else float(ret[k[0]]) for k in self.kinds]
        n = N - 1
        self.dom_by: list[int] = []  # dom_by[x]: items y that may replace x (`dominance`)
        self.by_time = [sorted(range(n), key=lambda i, t=t: (t[i], i)) for t in self.t]  # ascending, per kind
        self.by_mem = sorted(range(n), key=lambda i: (self.m[i], i))
        self.ub, self.max_nodes, self.nodes = ub, max_nodes, 0
        self.memo: dict = {}
        self.path: list = []
        self.best: list | None = None
        self.best_value: float | None = None

    def dominance(self) -> None:
        """dom_by[x]: the items y (neither the last unit) at least as slow as x on every kind and at least as big;
        between equal items, the earlier one."""
        T, m = np.array(self.t).T, np.array(self.m)  # (n, kinds), (n,)
        n = len(m)
        geq = (T[:, None, :] >= T[None, :, :]).all(axis=2) & (m[:, None] >= m[None, :])  # [y, x]: y >= x
        same = (T[:, None, :] == T[None, :, :]).all(axis=2) & (m[:, None] == m[None, :])
        dom = geq & (~same | (np.arange(n)[:, None] < np.arange(n)[None, :]))
        dom[self.head, :] = dom[:, self.head] = False
        np.fill_diagonal(dom, False)
        self.dom_by = [sum(1 << int(y) for y in np.flatnonzero(dom[:, x])) for x in range(n)]

    def candidates_at_root(self) -> int:
        """How many sets a device of each kind may take at the root, summed: a cheap estimate of the search's size."""
        n = len(self.m)
        total = 0
        for k in range(len(self.kinds)):
            if self.theta[k] >= self.ub:
                continue
            most = self._fits(k, (1 << n) - 1)
            total += sum(math.comb(n - 1, j) for j in range(most))
        return total

    def _fits(self, k: int, rem: int) -> int:
        """The most units left a fresh device of kind k can take under the bound (its cheapest, by time and by bytes).

        The bounds (`_fits`, `_takes`, `_bounded`) allow EPS_MS (and a relative 1e-9 on bytes) more than the search
        does, so that sums taken in another order never make them prune a packing the search would accept."""
        load, t, ub = self.base[k], self.t[k], self.ub + EPS_MS
        count = 0
        for i in self.by_time[k]:
            if rem >> i & 1:
                if load + t[i] >= ub:
                    break
                load += t[i]
                count += 1
        cap, m, by_mem = self.cap[k] * (1 + 1e-9), self.m, 0
        for i in self.by_mem:
            if by_mem == count:
                break
            if rem >> i & 1:
                if m[i] > cap:
                    break
                cap -= m[i]
                by_mem += 1
        return by_mem

    def _takes(self, k: int, rem: int, c: int) -> int:
        """The most units left that c fresh devices of kind k can take under the bound.

        Each takes at most f = `_fits` units; n units on c devices put f units on at least
        j = n - c (f - 1) of them, whose loads (each under the bound) sum to at least the j f cheapest units'."""
        f = self._fits(k, rem)
        if not f:
            return 0
        t, base, ub = self.t[k], self.base[k], self.ub + EPS_MS
        pre = [0.0]
        for i in self.by_time[k]:
            if rem >> i & 1 and t[i] < math.inf:
                pre.append(pre[-1] + t[i])
        n = min(c * f, len(pre) - 1)
        while n > 0:
            j = n - c * (f - 1)
            if j <= 0 or pre[j * f] + j * base < j * ub:
                break
            n -= 1
        return n

    def _bounded(self, rem: int, left: tuple) -> bool:
        """Whether the devices left can still take every unit left: by count, and by least time against room."""
        items = [i for i in range(len(self.m)) if rem >> i & 1]
        usable = [k for k, c in enumerate(left) if c and self.theta[k] < self.ub]
        if not usable:
            return False
        take, room = 0, 0.0
        for k in usable:
            take += self._takes(k, rem, left[k])
            room += left[k] * max(self.ub + EPS_MS - self.base[k], 0.0)
        if take < len(items):
            return False
        ts = [self.t[k] for k in usable]
        return sum(min(t[i] for t in ts) for i in items) < room

    def _completions(self, k: int, a: int, rem: int) -> list:
        """(value, mask, items) of every undominated, maximal set with item `a` that a device of kind k may take."""
        t, m, head, ub = self.t[k], self.m, self.head, self.ub
        cap, rt = self.cap[k], self.ret[k]
        load0 = self.base[k] + t[a]
        if load0 >= ub or m[a] > cap or self.theta[k] >= ub or (a == head and rt >= ub):
            return []
        cand = []
        for i in self.by_time[k]:
            if rem >> i & 1 and i != a and (i != head or rt < ub):
                if load0 + t[i] >= ub:
                    break
                cand.append(i)
        out: list = []
        # The tests of `undominated` keep a margin (`_below`): sums of floats depend on their order, so without it a
        # set could be dominated by a fuller one whose load `grow` finds equal to the bound, and neither be tried.
        ub_dom, cap_dom = _below(ub), _below(cap)

        def undominated(load: float, mem: float, mask: int, items: list) -> bool:
            for y in cand:  # room for one more unit left: not maximal
                if load + t[y] >= ub_dom:
                    break
                if not mask >> y & 1 and mem + m[y] <= cap_dom:
                    return False
            for x in items[1:]:  # a unit left at least as slow everywhere fits instead of x
                ys = self.dom_by[x] & rem & ~mask
                while ys:
                    low = ys & -ys
                    y = low.bit_length() - 1
                    ys ^= low
                    if load - t[x] + t[y] < ub_dom and mem - m[x] + m[y] <= cap_dom:
                        return False
            return True

        def grow(j: int, load: float, mem: float, mask: int, items: list) -> None:
            if undominated(load, mem, mask, items):
                value = max(load, self.theta[k], rt if mask >> head & 1 else 0.0)
                out.append((value, mask, tuple(items)))
            for jj in range(j, len(cand)):
                y = cand[jj]
                if load + t[y] >= ub:
                    break
                if mem + m[y] <= cap:
                    items.append(y)
                    grow(jj + 1, load + t[y], mem + m[y], mask | 1 << y, items)
                    items.pop()

        grow(0, load0, m[a], 1 << a, [a])
        out.sort(key=lambda c: -c[0])  # the fullest devices first: good packings early
        return out

    def run(self, rem: int, left: tuple, g: float) -> None:
        if g >= self.ub:
            return
        if not rem:
            self.ub, self.best_value, self.best = g, g, list(self.path)
            return
        key = (rem, left)
        if self.memo.get(key, -math.inf) >= self.ub:
            return  # already searched under a bound at least this one, in vain
        self.nodes += 1
        if self.nodes > self.max_nodes:
            raise _OutOfNodes
        if not self._bounded(rem, left):
            self.memo[key] = self.ub
            return
        a = (rem & -rem).bit_length() - 1  # the largest unit left
        tried: set = set()
        bound = None
        while bound != self.ub:  # dominance depends on the bound: when a packing lowers it, look again
            bound = self.ub
            for k, c in enumerate(left):
                if not c:
                    continue
                nxt = left[:k] + (c - 1,) + left[k + 1:]
                for value, mask, items in self._completions(k, a, rem):
                    if value >= self.ub or (k, mask) in tried:
                        continue
                    tried.add((k, mask))
                    self.path.append((k, items))
                    self.run(rem & ~mask, nxt, max(g, value))
                    self.path.pop()
                    if g >= self.ub:
                        return  # the bound fell below this branch's value: nothing to remember
        self.memo[key] = self.ub

    def assignment(self, n_units: int, src: int) -> tuple[int, ...]:
        dev = [src] * n_units
        used = [0] * len(self.kinds)
        for k, items in self.best:
            d = self.kinds[k][used[k]]
            used[k] += 1
            for i in items:
                dev[self.order[i] + 1] = d
        return tuple(dev)


def packing_optimum(problem: Problem, cap_ms: float, groups: list[list[int]], theta, ret, memcap, ub: float,
                    max_nodes: int) -> Packing:
    """The packing relaxation's optimum below `ub` (ms), exact, with a packing reaching it; see the module doc.

    `groups`: the device types (dp.device_types); `theta[d]`: the larger of the cheapest transfers into and
    out of device d (ms); `ret[d]`: d's return to the source (ms); `memcap[d]`: bytes. Not tried (proved False)
    when a device could take more than MAX_CANDIDATES sets at the root, or for a one-unit model; gives up
    (proved False) after `max_nodes` states.
    """
    if problem.n_units < 2:
        return Packing(False)
    src = problem.devices[problem.source]
    if problem.units[0].mem_bytes > memcap[problem.source] or src.unit_ms[0] + src.stage_ms > cap_ms + EPS_MS:
        return Packing(True)  # unit 0 cannot run on the source: no plan at all
    s = _Search(problem, cap_ms, groups, theta, ret, memcap, ub, max_nodes)
    if s.candidates_at_root() > MAX_CANDIDATES:
        return Packing(False)
    s.dominance()
    n = problem.n_units - 1
    try:
        s.run((1 << n) - 1, (1,) + tuple(len(k) for k in s.kinds[1:]), s.base[0])
    except _OutOfNodes:
        return Packing(False, nodes=s.nodes)
    if s.best is None:
        return Packing(True, nodes=s.nodes)
    return Packing(True, s.best_value, s.assignment(problem.n_units, problem.source), s.nodes)


def realize(problem: Problem, assignment: tuple[int, ...], cap_ms: float, memcap, transfer) -> tuple | None:
    """(bottleneck ms, [(device, start, end)]) of the plan whose stages are the runs of `assignment`, or None when a
    stage or transfer exceeds `cap_ms` or a device's memory. `transfer(a, b, nbytes)`: ms on the link a -> b."""
    stages: list = []
    for u, d in enumerate(assignment):
        if stages and stages[-1][0] == d:
            stages[-1][2] = u + 1
        else:
            stages.append([d, u, u + 1])
    load: dict = {}
    mem: dict = {}
    links: dict = {}
    src = problem.source
    for i, (d, s, e) in enumerate(stages):
        c = sum(problem.devices[d].unit_ms[s:e]) + problem.devices[d].stage_ms
        nxt, nbytes = (stages[i + 1][0], problem.units[e - 1].out_bytes) if i + 1 < len(stages) \
            else (src, problem.return_bytes)
        tr = transfer(d, nxt, nbytes) if nxt != d else 0.0
        if c > cap_ms + EPS_MS or tr > cap_ms + EPS_MS:
            return None
        load[d] = load.get(d, 0.0) + c
        mem[d] = mem.get(d, 0.0) + sum(u.mem_bytes for u in problem.units[s:e]) - \
            (problem.shared_bytes(range(s, e)) if len(stages) == 1 else 0.0)
        if nxt != d:
            links[(d, nxt)] = links.get((d, nxt), 0.0) + tr
    if any(v > memcap[d] for d, v in mem.items()):
        return None
    return max(list(load.values()) + list(links.values())), [tuple(s) for s in stages]
