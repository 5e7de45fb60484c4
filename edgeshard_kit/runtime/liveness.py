"""Liveness of a chain's workers: when each was last heard from (`Clocks`), and the wait that pings them (`Waiter`).

The bound is on silence, not on how long anything takes: a worker is silent while the coordinator hears
nothing at all from it (no PONG, no PROGRESS, no other frame). Time during which the coordinator itself
did not run (a stall longer than STALL_S in its own waiting loop, e.g. on a machine with every core
busy) does not count against a worker.
"""

from __future__ import annotations

import time
from typing import Any

from edgeshard_kit.runtime import wire
from edgeshard_kit.runtime.protocol import Kind

HEARTBEAT_S = 0.5  # how often the coordinator pings every worker while it waits
STALL_S = 1.0  # a gap this long in the coordinator's own waiting loop (it was not running) is not a worker's silence


class Clocks:
    """Per worker, the perf_counter time it was last heard from; `silent(i)` in seconds of the coordinator running."""

    def __init__(self, n: int):
        now = time.perf_counter()
        self.seen = [now] * n  # written by the reader threads (one index each), in place
        self.tick = now

    def heard(self, i: int) -> float:
        """Worker i sent something now; returns the time."""
        self.seen[i] = t = time.perf_counter()
        return t

    def restart(self) -> None:
        """Every clock from now (a new wait begins after the coordinator was busy elsewhere)."""
        now = time.perf_counter()
        for i in range(len(self.seen)):
            self.seen[i] = now
        self.tick = now

    def advance(self) -> float:
        """Called from the waiting loop: a stall of the loop itself moves every older clock forward by it; now."""
        now = time.perf_counter()
        gap = now - self.tick
        if gap > STALL_S:
            for i, t in enumerate(self.seen):
                if t <= self.tick:
                    self.seen[i] = t + gap
        self.tick = now
        return now

    def silent(self, i: int) -> float:
        return time.perf_counter() - self.seen[i]


class Waiter:
    """Waits for worker frames while pinging every worker; raises PipelineError naming a dead or silent stage."""

    def __init__(self, chain: Any, heartbeat_s: float = HEARTBEAT_S):
        self.chain = chain
        self.heartbeat = heartbeat_s
        chain.clocks.restart()

    def next(self) -> tuple[int, wire.Frame, float]:
        """The next frame (not a pong) from any worker: (stage index, frame, arrival perf_counter)."""
        ch = self.chain
        while True:
            ch.check()
            ev = ch.feed.next_event(ch.events, self.heartbeat / 2, ch.silence_s, ch.clocks.heard)
            if ev is None:
                continue
            kind, i, f, t = ev
            if kind == "closed":
                raise ch.fault(i, f"died (connection closed: {f})")
            if f.kind in (Kind.PONG, Kind.PROGRESS):
                continue
            if f.kind == Kind.ERROR:
                dead = ch.dead_stage()
                if dead is not None and dead != i:
                    raise ch.fault(dead, "died")
                raise ch.fault(i, f"failed: {f.get('message')}")
            return i, f, t
