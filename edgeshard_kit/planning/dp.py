"""The exact planner: `solve` (a Plan, or KitError naming the tightest constraint), the latency and throughput DPs.

Default variant (each device runs at most one contiguous stage). Identical devices (same unit times,
memory and links) are merged into a type with a count, so the DP state is (units done, type of the
last stage, how many devices of each type are used): O(N^2 * T^2 * prod(count_t + 1)) work,
vectorised with numpy over the count vectors. With M distinct devices this is the paper's
O(N^2 2^M M^2); the paper's 15-device testbed has 3 types and only 13*3*2 count vectors.

The relay variant (a device may host several stages) is an exact A* search, in relay.py; this
module gives it the default-variant optimum as its incumbent and the device types for symmetry.
"""

from __future__ import annotations

import math

import numpy as np

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.numbers import human_sizes
from edgeshard_kit.core.units import Stage
from edgeshard_kit.planning.plan import Plan, figures, make_plan
from edgeshard_kit.planning.problem import EPS_MS, Problem
from edgeshard_kit.planning.relay import relay_search

OBJECTIVES = ("latency", "throughput")


def device_types(problem: Problem) -> list[list[int]]:
    """Groups of interchangeable devices (swapping two of them changes nothing but names)."""
    m = len(problem.devices)
    names = problem.names
    lat = np.zeros((m, m))
    inv = np.zeros((m, m))
    pairs = {}
    for a, b, ln in problem.pairs:  # Problem.link: the first matching pair wins
        pairs.setdefault((a, b), ln)
    for a in range(m):
        for b in range(m):
            if a != b:
                ln = pairs.get((names[a], names[b]), problem.default_link)
                lat[a, b], inv[a, b] = ln.latency_ms, (0.0 if math.isinf(ln.mbps) else 8.0 / (ln.mbps * 1000.0))

    def swappable(a: int, b: int) -> bool:
        da, db = problem.devices[a], problem.devices[b]
        if da.unit_ms != db.unit_ms or da.memory_bytes != db.memory_bytes or da.stage_ms != db.stage_ms:
            return False
        others = np.ones(m, dtype=bool)
        others[[a, b]] = False
        return (np.array_equal(lat[a, others], lat[b, others]) and np.array_equal(lat[others, a], lat[others, b])
                and np.array_equal(inv[a, others], inv[b, others]) and np.array_equal(inv[others, a], inv[others, b])
                and lat[a, b] == lat[b, a] and inv[a, b] == inv[b, a])

    groups: list[list[int]] = []
    for i in range(m):
        for g in groups:
            if all(swappable(i, j) for j in g):
                g.append(i)
                break
        else:
            groups.append([i])
    src = problem.source
    groups.sort(key=lambda g: src not in g)  # the source's type first
    g0 = groups[0]
    g0.remove(src)
    g0.insert(0, src)
    return groups


class _Tables:
    """Per-type arrays the DPs share: prefix times, memory windows, transfer times, count vectors."""

    def __init__(self, problem: Problem, cap_ms: float):
        self.groups = device_types(problem)
        T = self.T = len(self.groups)
        N = self.N = problem.n_units
        rep = [g[0] for g in self.groups]
        self.counts = np.array([len(g) for g in self.groups])
        self.P = np.zeros((T, N + 1))
        for t, i in enumerate(rep):
            self.P[t, 1:] = np.cumsum(problem.devices[i].unit_ms)
        self.Q = np.concatenate([[0.0], np.cumsum([u.mem_bytes for u in problem.units])])
        self.mem = np.array([problem.devices[i].memory_bytes for i in rep])
        self.O = np.array([problem.devices[i].stage_ms for i in rep])  # fixed cost of a stage on type t
        # lo[t, e]: the smallest start s such that units [s, e) fit type t's memory (and the cap)
        self.lo = np.zeros((T, N + 1), dtype=int)
        for t in range(T):
            lo = np.searchsorted(self.Q, self.Q - self.mem[t] * (1 + 1e-12) - 1e-6, side="left")
            if math.isfinite(cap_ms):
                lo = np.maximum(lo, np.searchsorted(self.P[t], self.P[t] - (cap_ms - self.O[t]) - EPS_MS, side="left"))
            self.lo[t] = lo
        names = problem.names
        out = np.array([0.0] + [u.out_bytes for u in problem.units])  # out[s] = bytes into a stage at s
        # Tr[s, l, t]: transfer into a stage starting at unit s on type t from a stage on type l
        self.Tr = np.full((N + 1, T, T), np.inf)
        self.ret = np.zeros(T)
        src = names[problem.source]
        for l in range(T):
            for t in range(T):
                if t == l and len(self.groups[t]) < 2:
                    continue
                b = self.groups[t][1] if t == l else rep[t]
                ln = problem.link(names[rep[l]], names[b])
                self.Tr[:, l, t] = ln.transfer_ms(out)
            a = self.groups[l][1] if (l == 0 and len(self.groups[0]) > 1) else rep[l]
            self.ret[l] = problem.transfer_ms(names[a], src, problem.return_bytes)
        self.Tr[self.Tr > cap_ms + EPS_MS] = np.inf
        self.stride = np.cumprod(np.concatenate([[1], self.counts[:-1] + 1])).astype(int)
        self.S = int(np.prod(self.counts + 1))
        idx = np.arange(self.S)
        self.cnt = (idx[None, :] // self.stride[:, None]) % (self.counts[:, None] + 1)  # (T, S)
        self.full = self.cnt >= self.counts[:, None]  # type t exhausted in count vector C
        # final transfer back to the source; zero when the only stage is the source's
        self.ret_cs = np.broadcast_to(self.ret[:, None], (T, self.S)).copy()
        self.ret_cs[0, self.stride[0]] = 0.0
        self.ret_cs[self.ret_cs > cap_ms + EPS_MS] = np.inf


def _whole_fits(problem: Problem, tb: _Tables, cap_ms: float) -> bool:
    """Whether the source holds the whole model as one stage: its tied tensor (`Problem.tied_bytes`) counted once."""
    fits = tb.Q[-1] - problem.shared_bytes(range(problem.n_units)) <= tb.mem[0] * (1 + 1e-12) + 1e-6
    return fits and tb.P[0, -1] + tb.O[0] <= cap_ms + EPS_MS


class _WindowMin:
    """Minima over the rows [lo, e) of a table filled row by row, lo and e never decreasing.

    A two-stack queue: rows before `mid` keep suffix minima (computed in one numpy call when the
    window's start passes `mid`), rows from `mid` on are folded into one running minimum; every row
    is touched O(1) times, so a window minimum costs O(S) instead of O(window x S).
    """

    def __init__(self, rows: np.ndarray):
        self.rows = rows  # (N + 1, S), row s final once the caller asks for a window ending after s
        self.suf = np.full(rows.shape, np.inf)
        self.back = np.full(rows.shape[1], np.inf)
        self.mid = self.end = 0

    def min(self, lo: int, e: int) -> np.ndarray:
        """Elementwise minimum of rows[lo:e] (lo < e), shape (S,)."""
        if e > self.end:
            start = max(self.end, self.mid)
            if e == start + 1:
                np.minimum(self.back, self.rows[start], out=self.back)
            elif e > start:
                np.minimum(self.back, self.rows[start:e].min(axis=0), out=self.back)
            self.end = e
        if lo >= self.mid:  # the suffix part is used up: rebuild it from the rows now in the window
            self.suf[lo:e] = np.minimum.accumulate(self.rows[lo:e][::-1], axis=0)[::-1]
            self.mid = e
            self.back.fill(np.inf)
            return self.suf[lo].copy()
        return np.minimum(self.suf[lo], self.back)


def _default_dp(problem: Problem, objective: str, cap_ms: float = math.inf):
    """The default-variant DP; returns (best value, stages) or None.

    Only values are stored; the walk back recomputes each step's argmin from the same expressions,
    so it reproduces the stored optimum exactly. For latency the stage cost separates, so each step
    is a sliding-window minimum (`_WindowMin`); for throughput it is a minimum over the window.
    """
    tb = _Tables(problem, cap_ms)
    T, N, S, P, O = tb.T, tb.N, tb.S, tb.P, tb.O
    lat = objective == "latency"
    D = np.full((N + 1, T, S), np.inf)
    A = np.full((N + 1, T, S), np.inf)  # best value entering a stage at s on type t (latency: minus P[t, s])
    blocked = np.where(tb.full, np.inf, 0.0)  # (T, S): inf where count vector C has no device of type t left
    s0 = tb.stride[0]
    for e in range(1, N + 1):  # the first stage: the source, units [0, e)
        if tb.lo[0, e] == 0 or (e == N and _whole_fits(problem, tb, cap_ms)):
            D[e, 0, s0] = P[0, e] + O[0]
    wins = [_WindowMin(A[:, t, :]) for t in range(T)] if lat else []
    for e in range(1, N + 1):
        for t in range(T):
            lo = max(int(tb.lo[t, e]), 1)
            if lo >= e:
                continue
            if lat:
                v = wins[t].min(lo, e)
                v += P[t, e] + O[t]
            else:
                v = np.maximum(A[lo:e, t, :], (P[t, e] - P[t, lo:e] + O[t])[:, None]).min(axis=0)
            st = tb.stride[t]
            np.minimum(D[e, t, st:], v[: S - st], out=D[e, t, st:])
        if e < N:  # X[l, t, C]: D[e, l, C] then the transfer from type l into a stage on type t at e
            X = D[e][:, None, :] + tb.Tr[e][:, :, None] if lat else np.maximum(D[e][:, None, :], tb.Tr[e][:, :, None])
            A[e] = X.min(axis=0) + blocked - (P[:, e][:, None] if lat else 0.0)
    final = D[N] + tb.ret_cs if lat else np.maximum(D[N], tb.ret_cs)
    if not np.isfinite(final).any():
        return None
    t, c = np.unravel_index(int(np.argmin(final)), final.shape)
    best = float(final[t, c]) + (problem.step_ms if lat else 0.0)
    # walk back: (end, type, counts) -> stages with types; then give each type's devices in order
    typed, e = [], N
    while not (t == 0 and c == s0):  # until the first stage (only the source used so far)
        pc = c - tb.stride[t]
        lo = max(int(tb.lo[t, e]), 1)
        col = A[lo:e, t, pc] if lat else np.maximum(A[lo:e, t, pc], P[t, e] - P[t, lo:e] + O[t])
        s = lo + int(np.argmin(col))
        x = D[s, :, pc] + tb.Tr[s, :, t] if lat else np.maximum(D[s, :, pc], tb.Tr[s, :, t])
        typed.append((t, s, e))
        t, c, e = int(np.argmin(x)), pc, s
    typed.append((0, 0, e))
    typed.reverse()
    used = {g: 0 for g in range(T)}
    stages = []
    for t, s, e in typed:
        stages.append(Stage(problem.devices[tb.groups[t][used[t]]].name, s, e))
        used[t] += 1
    return best, stages


def _search(problem: Problem, objective: str, relay: bool, cap_ms: float, max_states: int):
    """(best value, stages) of the default-variant DP or the relay search, or None when nothing fits."""
    if objective not in OBJECTIVES:
        raise KitError(f"objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    incumbent = _default_dp(problem, objective, cap_ms)
    if not relay:
        return incumbent
    return relay_search(problem, objective, cap_ms, max_states, incumbent, device_types(problem))


def solve_stages(problem: Problem, objective: str, relay: bool = False, cap_ms: float = math.inf,
                 max_states: int = 20_000) -> list[Stage] | None:
    """The optimal stage list for the objective (None when nothing fits)."""
    out = _search(problem, objective, relay, cap_ms, max_states)
    return None if out is None else out[1]


def solve_value(problem: Problem, objective: str, relay: bool = False, cap_ms: float = math.inf,
                max_states: int = 20_000) -> float | None:
    """The optimal objective value (ms), or None when nothing fits."""
    out = _search(problem, objective, relay, cap_ms, max_states)
    return None if out is None else out[0]


def infeasible_reason(problem: Problem) -> str:
    """The tightest memory constraint that no plan can meet."""
    need = sum(u.mem_bytes for u in problem.units) - problem.shared_bytes(range(problem.n_units))  # tied: once
    have = sum(d.memory_bytes for d in problem.devices)
    src = problem.devices[problem.source]
    if problem.units[0].mem_bytes > src.memory_bytes:
        return ("infeasible: the source {} cannot hold unit 0 ({} > {})"
                .format(src.name, *human_sizes(problem.units[0].mem_bytes, src.memory_bytes)))
    if have < need:
        return "infeasible: total memory of all devices {} < model {}".format(*human_sizes(have, need))
    biggest = max(d.memory_bytes for d in problem.devices)
    for i, u in enumerate(problem.units):
        if u.mem_bytes > biggest:
            return ("infeasible: unit {} ({}) needs {}, more than any device ({})"
                    .format(i, u.name, *human_sizes(u.mem_bytes, biggest)))
    return ("infeasible: no split into contiguous stages fits the devices' memory "
            "(each device runs at most one stage; try --relay)")


def solve(problem: Problem, objective: str = "latency", relay: bool = False, cap_ms: float = math.inf) -> Plan:
    """The exact optimum for `objective`; KitError 'infeasible: ...' when nothing fits."""
    stages = solve_stages(problem, objective, relay=relay, cap_ms=cap_ms)
    if stages is not None and objective == "throughput" and not relay:
        # among the plans with the optimal bottleneck, the one with the lowest latency (exact: every
        # resource under the bottleneck is the latency DP's cap)
        b = figures(problem, stages)["bottleneck_ms"]
        stages = solve_stages(problem, "latency", cap_ms=min(cap_ms, b * (1 + 1e-12) + 1e-12)) or stages
    if stages is None:
        raise KitError(infeasible_reason(problem) if math.isinf(cap_ms)
                       else f"infeasible: no plan keeps every stage and transfer under {cap_ms:g} ms")
    return make_plan(problem, stages, objective, relay)
