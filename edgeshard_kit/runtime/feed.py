"""The coordinator's data connections: TOKENS to stage 0 and the last stage's TOKENs back, read on the waiting thread.

Per token the runtime's fixed cost is mostly hand-offs between threads (on a host with every core busy a
woken thread waits for a core), so the token path has none it can avoid: the coordinator sends TOKENS on a
data connection to stage 0, whose worker computes on the thread that reads it (as every later stage does
with ACT), and the last stage sends its TOKEN on a data connection that the coordinator's waiting thread
reads itself. Every other frame (PONG, PROGRESS, STATS, ERROR) still arrives through the reader threads'
queue; a reader pokes a socket pair after each frame so that the waiting thread, blocked in `select` on
both, wakes for either. One stage: one connection both ways.
"""

from __future__ import annotations

import queue
import select
import socket
import time
from typing import Any, Callable

import torch

from edgeshard_kit.runtime import wire
from edgeshard_kit.runtime.protocol import ProtocolError


class Feed:
    """TOKENS out to stage 0 and TOKENs back from the last stage of an `n`-stage chain, after `open`."""

    def __init__(self, n: int):
        self.n = n
        self.first: wire.Connection | None = None  # coordinator -> stage 0 (TOKENS)
        self.back: wire.Connection | None = None  # last stage -> coordinator (TOKEN); `first` itself when n == 1
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def open(self, connect: Callable[[int, bool, wire.LinkShaper | None], wire.Connection],
             first_shaper: wire.LinkShaper | None) -> None:
        """`connect(stage, returns, shaper)` opens one authenticated data connection (ROLE data, meta returns)."""
        self.first = connect(0, self.n == 1, first_shaper)
        self.back = self.first if self.n == 1 else connect(self.n - 1, True, None)

    def poke(self) -> None:
        """A reader thread queued a frame: wake the waiting thread (a full socket pair is already a wake-up)."""
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def send(self, kind: str, tensor: torch.Tensor | None = None, **meta: Any) -> None:
        """TOKENS to stage 0 (OSError when it cannot be reached)."""
        self.first.send(kind, tensor, **meta)

    def next_event(self, events: queue.Queue, timeout: float, silence_s: float,
                   heard: Callable[[int], float]) -> tuple | None:
        """The next event within `timeout` s: a queued one, or ("frame", n-1, TOKEN, t) read from the return connection
        (a frame begun must end within `silence_s`); ("closed", n-1, why, t) when that connection fails; None."""
        try:
            return events.get_nowait()
        except queue.Empty:
            pass
        if self.back is None:  # not opened: every frame comes through the queue
            try:
                return events.get(timeout=timeout)
            except queue.Empty:
                return None
        try:
            ready, _, _ = select.select([self.back.sock, self._wake_r], [], [], timeout)
        except (OSError, ValueError) as e:  # closed meanwhile
            return ("closed", self.n - 1, str(e), time.perf_counter())
        if self._wake_r in ready:
            try:
                self._wake_r.recv(4096)
            except OSError:
                pass
        if self.back.sock in ready:
            try:
                f = self.back.recv(deadline=time.monotonic() + silence_s)
                self.back.settimeout(None)
            except (OSError, ProtocolError) as e:
                return ("closed", self.n - 1, str(e) or type(e).__name__, time.perf_counter())
            return ("frame", self.n - 1, f, heard(self.n - 1))
        try:
            return events.get_nowait()
        except queue.Empty:
            return None

    def close(self) -> None:
        for c in {id(c): c for c in (self.first, self.back) if c is not None}.values():
            c.close()
        self._wake_r.close()
        self._wake_w.close()
