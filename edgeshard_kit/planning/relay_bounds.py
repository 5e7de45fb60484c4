"""An integral lower bound for the relay search: the units left, in classes, packed device by device.

The relay search (relay.py) needs a bound on how a partial plan can finish. Its relay DP checks memory
per stage only (a device's memory looks fresh at every visit) and its capacity bound is fractional and
ignores transfers. This bound keeps what those lose: every unit left is placed on exactly one device,
a whole number of units per device, a device's units over *all* its later visits fit its free memory,
and every visit to a device pays its fixed stage cost and its transfers in and out (at least the
cheapest ones into and out of that device). What it drops: the order of the units (which is what keeps
it cheap). Units are grouped into classes of equal units (same bytes, same time on every device);
when that gives too many count vectors, the classes are coarser and each takes its members' least
time and bytes, which only lowers the bound. A DP over the devices then gives the least total
(latency) or least bottleneck (throughput) over every count vector a device may take.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from edgeshard_kit.planning.problem import Problem

MAX_PAIRS = 20_000  # the most (count vector, part of it) pairs a class split may have before it is coarsened


def _classes(problem: Problem, u: int, cap_ms: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(counts (C,), times (M, C) ms, bytes (C,)) of units [u, N) in classes, the finest within MAX_PAIRS.

    A unit slower than `cap_ms` on a device counts as impossible there (inf)."""
    N, M = problem.n_units, len(problem.devices)
    T = np.array([d.unit_ms for d in problem.devices], dtype=float).reshape(M, N)[:, u:]
    mem = np.array([x.mem_bytes for x in problem.units[u:]], dtype=float)
    last = N - 1 - u  # the last unit keeps a class of its own: its device pays the return
    keys = [lambda i: (i == last, mem[i], tuple(T[:, i])), lambda i: (i == last, mem[i]), lambda i: (i == last,)]
    for key in keys:
        groups: dict = {}
        for i in range(N - u):
            groups.setdefault(key(i), []).append(i)
        counts = np.array([len(g) for g in groups.values()])
        if np.prod((counts + 1.0) * (counts + 2.0) / 2.0) <= MAX_PAIRS or key is keys[-1]:
            break
    times = np.stack([T[:, g].min(axis=1) for g in groups.values()], axis=1)
    times[times > cap_ms] = np.inf
    return counts, times, np.array([mem[g].min() for g in groups.values()])


class _Packing:
    """The count vectors of one class split and, for the min-plus step, every (vector s, part n <= s) pair."""

    def __init__(self, counts: np.ndarray, times: np.ndarray, nbytes: np.ndarray):
        self.vecs = np.array(list(itertools.product(*[range(int(c) + 1) for c in counts])), dtype=int)  # (V, C)
        self.vbytes = self.vecs @ nbytes  # (V,)
        fin = np.isfinite(times)  # (M, C): False where a class cannot go on the device
        self.vtime = self.vecs @ np.where(fin, times, 0.0).T  # (V, M) ms
        self.vtime[((self.vecs[:, None, :] > 0) & ~fin[None, :, :]).any(axis=2)] = np.inf
        stride = np.cumprod(np.concatenate([[1], (counts + 1)[::-1][:-1]]))[::-1]  # itertools order: last varies fastest
        idx = self.vecs @ stride
        s_i, n_i = np.nonzero((self.vecs[:, None, :] >= self.vecs[None, :, :]).all(axis=2))  # sorted by s
        self.pn, self.pd = n_i, np.searchsorted(idx, idx[s_i] - idx[n_i])  # idx is increasing
        self.starts = np.searchsorted(s_i, np.arange(len(idx)))
        self.has_last = self.vecs[:, -1] > 0 if len(counts) else np.zeros(len(idx), bool)  # the last unit's class


class ClassBound:
    """`bound(u, last, mem, loads, g, ub)`: a lower bound on the plan's value (ms) from a partial plan ending at u on `last`.

    `mem` and `loads`: every device's used bytes and compute load (ms) so far; `g` the value so far
    (latency: the sum; throughput: the bottleneck). `min_in[d, u]` / `min_out[d, u]`: the cheapest
    transfer into / out of device d at a boundary >= u (out: the return to the source included, 0 on
    the source). Latency: every transfer left is the way into one later visit and the way out of the
    one before, so their sum is at least half of (the cheapest way out of `last` + the cheapest ways
    in and out of every later visit). Throughput: a device that gets a visit gets a link into it and
    one out of it, each carrying at least the cheapest such transfer. Per device the step is a
    min-plus (min-max) convolution over the count vectors, one numpy gather and reduceat.
    """

    def __init__(self, problem: Problem, objective: str, cap_ms: float, memcap: np.ndarray,
                 min_in: np.ndarray, min_out: np.ndarray, out_now: np.ndarray):
        self.problem, self.lat, self.cap_ms = problem, objective == "latency", cap_ms
        self.memcap, self.min_in, self.min_out, self.out_now = memcap, min_in, min_out, out_now
        self.stage_ms = np.array([d.stage_ms for d in problem.devices])
        self._packs: dict = {}
        self.ret = min_out[:, -1]  # the return to the source from each device (0 from the source)

    def _pack(self, u: int) -> _Packing:
        if u not in self._packs:
            self._packs[u] = _Packing(*_classes(self.problem, u, self.cap_ms))
        return self._packs[u]

    def bound(self, u: int, last: int, mem: tuple, loads: tuple, g: float, ub: float = math.inf) -> float:
        """The bound (ms); a device's count vectors that alone reach `ub` are skipped (the result is then >= ub or exact)."""
        pk = self._pack(u)
        free = self.memcap - np.asarray(mem)
        if not self.lat:
            return max(g, self.out_now[last, u], self._pack_dp(pk, u, free, np.asarray(loads), ub))
        # the transfers left: one into every later visit, or one out of `last` and out of every later visit
        # but the last, whose way out is the return (min_out counts it)
        by_in = self._pack_dp(pk, u, free, self.stage_ms + self.min_in[:, u], ub - g, True)
        if by_in + g >= ub:
            return by_in + g
        out_now = self.out_now[last, u]
        return g + max(by_in, out_now + self._pack_dp(pk, u, free, self.stage_ms + self.min_out[:, u], ub - g - out_now))

    def _pack_dp(self, pk: _Packing, u: int, free: np.ndarray, extra: np.ndarray, limit: float,
                 pay_return: bool = False) -> float:
        """Least total (latency: sum of vector time + extra[d] per device visited) or least bottleneck (throughput:
        max of extra[d] (the load) + vector time, and the cheapest transfers in and out) over all packings.

        `pay_return` (latency): the device that gets the last unit also pays its return to the source."""
        W = np.full(len(pk.vecs), np.inf)
        W[0] = 0.0
        for d in range(len(self.memcap)):
            cost = pk.vtime[:, d] + (self.stage_ms[d] + extra[d] if not self.lat else extra[d])
            if pay_return:
                cost = cost + np.where(pk.has_last, self.ret[d], 0.0)
            if not self.lat:
                cost = np.maximum(cost, max(self.min_in[d, u], self.min_out[d, u]))
            cost[(pk.vbytes > free[d]) | ~(cost < limit)] = np.inf
            cost[0] = 0.0  # no visit
            if not np.isfinite(cost[1:]).any():
                continue
            vals = W[pk.pd] + cost[pk.pn] if self.lat else np.maximum(W[pk.pd], cost[pk.pn])
            W = np.minimum.reduceat(vals, pk.starts)
        return float(W[-1])


def transfer_minima(problem: Problem, tr_of, src: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(min_in, min_out, out_now), each (M, N + 1): cheapest transfers into / out of d at boundaries >= u, and out of d at u.

    `tr_of(nbytes)` gives the (M, M) transfer matrix (inf on the diagonal); min_out counts the return
    to the source (0 on the source itself, which may end the plan)."""
    N, M = problem.n_units, len(problem.devices)
    min_in = np.full((M, N + 1), np.inf)
    min_out = np.full((M, N + 1), np.inf)
    out_now = np.zeros((M, N + 1))
    ret = tr_of(problem.return_bytes)[:, src].copy()
    ret[src] = 0.0
    min_out[:, N] = ret
    for b in range(N - 1, 0, -1):  # a stage starting at unit b receives out_bytes[b - 1]
        tr = tr_of(problem.units[b - 1].out_bytes)
        min_in[:, b] = np.minimum(min_in[:, b + 1], tr.min(axis=0))
        min_out[:, b] = np.minimum(min_out[:, b + 1], tr.min(axis=1))
        out_now[:, b] = tr.min(axis=1)
    return min_in, min_out, out_now
