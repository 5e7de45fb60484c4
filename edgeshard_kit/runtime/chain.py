"""The coordinator's side of the wire: a chain of connected stage workers, configs pushed, token schedules run, faults named.

A `Chain` owns the control connections to one plan's workers (stage order) and the queue their frames
arrive on; it knows nothing of testbeds or plans: the deployment gives it the stages, and each worker's
handle as soon as that worker listens (`attach`), then each stage's `StageConfig` (`load`).

Liveness, in every phase: a reader thread per control connection stamps the time of every frame; while
the coordinator waits (workers starting, stages loading, tokens coming back) it pings every connected
worker every HEARTBEAT_S, and a worker that sends nothing at all (no PONG, no PROGRESS, no other frame)
for `silence_s` is reported, naming its stage, host and what it was doing. A stage busy loading sends
PROGRESS frames, so a long load is not silence.
"""

from __future__ import annotations

import itertools
import queue
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.units import Stage
from edgeshard_kit.model.generate import finish_step
from edgeshard_kit.planning.schedule import release
from edgeshard_kit.runtime import wire
from edgeshard_kit.runtime.feed import Feed
from edgeshard_kit.runtime.launchers import STOPPED, WorkerHandle
from edgeshard_kit.runtime.liveness import HEARTBEAT_S, Clocks, Waiter
from edgeshard_kit.runtime.protocol import PROGRESS_S, SILENCE_S, Kind, ProtocolError, Role, StageConfig

FAULT_TIMEOUT_S = SILENCE_S  # a worker silent this long (no pong, no frame) is declared stopped


class PipelineError(KitError):
    """A stage failed: its message names the stage, device and host."""


@dataclass(frozen=True)
class StageInfo:
    """A deployed stage: where it runs and what loading it cost (seconds, bytes)."""

    index: int
    device: str
    start: int
    end: int
    host: str
    port: int
    load_s: float = 0.0
    rss_bytes: int = 0
    param_bytes: int = 0
    pid: int = 0
    hostname: str = ""

    def where(self) -> str:
        return f"stage {self.index} (units {self.start}:{self.end}) on device {self.device}, host {self.host}:{self.port}"


def _exited(h: WorkerHandle | None) -> bool:
    """True if a local worker process has exited (remote handles are judged by their connection instead)."""
    return getattr(h, "proc", None) is not None and not h.alive()


class Chain:
    """Control connections to the workers of one plan's stages; every frame they send lands on `events`.

    `silence_s`: the bound on a worker's silence, in seconds (see the module's docstring); `first_shaper`
    shapes the coordinator -> stage 0 link.
    """

    def __init__(self, stages: list[Stage], token: bytes, silence_s: float = SILENCE_S,
                 first_shaper: wire.LinkShaper | None = None):
        n = len(stages)
        self.stages = list(stages)
        self.handles: list[WorkerHandle | None] = [None] * n  # filled by attach, as the workers come up
        self.conns: list[wire.Connection | None] = [None] * n
        self.feed = Feed(n)  # TOKENS to stage 0, TOKENs back from the last stage (connections opened by `load`)
        self.silence_s, self.first_shaper = silence_s, first_shaper
        self._token = token
        self.info: list[StageInfo] = []
        self.events: queue.Queue = queue.Queue()  # ("frame", i, Frame, t) or ("closed", i, why, t)
        self.clocks = Clocks(n)  # when each worker was last heard from (or attached)
        self.doing = ["starting"] * n  # what each stage is doing, for fault messages
        self.loaded: dict[int, dict] = {}  # stage -> its LOADED frame's fields
        self.progress: dict[int, dict] = {}  # stage -> its latest PROGRESS frame's fields (phase, elapsed_s, rss_bytes)
        self._last_ping = 0.0
        self._req = itertools.count()
        self._lock = threading.Lock()
        self.closed = False

    # ---- faults ---------------------------------------------------------------------------------------------
    def where(self, i: int) -> str:
        if i < len(self.info):
            return self.info[i].where()
        s, h = self.stages[i], self.handles[i]
        at = f", host {h.host}:{h.port}" if h is not None else ""
        return f"stage {i} (units {s.start}:{s.end}) on device {s.device}{at}"

    def fault(self, i: int, what: str) -> PipelineError:
        """A PipelineError naming stage i, with its exit code and last log line when known."""
        h = self.handles[i]
        code = getattr(getattr(h, "proc", None), "returncode", None)
        extra = f" (exit code {code})" if code is not None else ""
        tail = ""
        try:
            lines = [ln for ln in h.log_tail(50).splitlines() if ln.strip()]
            own = [ln for ln in lines if ln.startswith("[worker ")]  # its own lines, not a library's warnings
            lines = own or lines
            tail = f"; last log line: {lines[-1][:200]}" if lines else ""
        except Exception:  # the log is a courtesy: the fault is reported without it
            pass
        return PipelineError(f"{self.where(i)} {what}{extra}{tail}")

    def _stopped_note(self, i: int) -> str:
        """"; its process is stopped" when stage i's process is stopped (SIGSTOP), else ""."""
        try:
            st = self.handles[i].state()
            return f"; its process is {st}" if st in STOPPED else ""
        except Exception:  # the state is a courtesy (an SSH host may not answer either)
            return ""

    def silent_fault(self, i: int, silent_s: float) -> PipelineError:
        """Stage i sent nothing for `silent_s`: the fault, with its process state when it is stopped."""
        return self.fault(i, f"stopped answering {self.doing[i]}: nothing from it for {silent_s:.1f} s "
                             f"(bound {self.silence_s:g} s){self._stopped_note(i)}")

    def dead_stage(self, grace_s: float = 0.3) -> int | None:
        """A stage whose process exited or whose connection closed (waits `grace_s` for the news to arrive)."""
        deadline = time.perf_counter() + grace_s
        while True:
            for i, h in enumerate(self.handles):
                if _exited(h):
                    return i
            try:
                kind, i, _, _ = self.events.get(timeout=0.05)
                if kind == "closed":
                    return i
            except queue.Empty:
                pass
            if time.perf_counter() > deadline:
                return None

    def send_to(self, i: int, kind: Kind, tensor: torch.Tensor | None = None, **meta: Any) -> None:
        """Send a frame to stage i's worker; a failure is a PipelineError naming the stage."""
        try:
            self.conns[i].send(kind, tensor, **meta)
        except OSError as e:
            raise self.fault(i, f"cannot be reached ({e})") from None

    def _reader(self, i: int, conn: wire.Connection) -> None:
        try:
            while True:
                f = conn.recv()
                self.events.put(("frame", i, f, self.clocks.heard(i)))
                self.feed.poke()
        except (ProtocolError, OSError) as e:
            self.events.put(("closed", i, str(e), time.perf_counter()))
            self.feed.poke()

    # ---- liveness -------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Ping every connected worker when due; PipelineError for one that exited or is silent over the bound."""
        now = self.clocks.advance()
        if now - self._last_ping >= HEARTBEAT_S:
            self._last_ping = now
            for i, c in enumerate(self.conns):
                if c is None:
                    continue
                if _exited(self.handles[i]):
                    raise self.fault(i, f"died {self.doing[i]}")
                self.send_to(i, Kind.PING, t=now)
        attached = [(self.clocks.silent(i), i) for i, c in enumerate(self.conns) if c is not None]
        silent_s, i = max(attached, default=(0.0, -1))
        if silent_s > self.silence_s:
            raise self.silent_fault(i, silent_s)

    def _setup_event(self, kind: str, i: int, f: Any) -> None:
        """One event while workers start or load: PROGRESS and LOADED noted, a closed connection or ERROR raised."""
        if kind == "closed":
            raise self.fault(i, f"died {self.doing[i]} (connection closed: {f})")
        if f.kind == Kind.PROGRESS:
            self.doing[i] = f"while {f.get('phase', 'loading')}"
            self.progress[i] = f.meta
        elif f.kind == Kind.LOADED:
            self.loaded[i] = f.meta
            self.doing[i] = "after loading"
        elif f.kind == Kind.ERROR:
            peer = f.get("peer")
            if isinstance(peer, int) and 0 <= peer < len(self.stages) and self.conns[peer] is not None:
                quiet = self.clocks.silent(peer)
                if quiet > 2 * PROGRESS_S or _exited(self.handles[peer]):  # stage i could not reach a silent peer
                    raise self.silent_fault(peer, quiet)
            raise PipelineError(f"{self.where(i)}: {f.get('message')}")

    def watch(self, timeout: float = 0.0) -> None:
        """Handle the events that arrive within `timeout` s (all that are queued), then `check`."""
        try:
            ev = self.events.get(timeout=timeout) if timeout > 0 else self.events.get_nowait()
            while True:
                self._setup_event(ev[0], ev[1], ev[2])
                ev = self.events.get_nowait()
        except queue.Empty:
            pass
        self.check()

    # ---- setup and teardown ---------------------------------------------------------------------------------
    def attach(self, i: int, handle: WorkerHandle) -> None:
        """Stage i's worker listens: open its control connection (handshake within `silence_s`), start its reader."""
        self.handles[i] = handle
        self.doing[i] = "in the handshake"
        try:
            conn = wire.connect(handle.host, handle.port, self._token, timeout=self.silence_s,
                                shaper=self.first_shaper if i == 0 else None)
            conn.send(Kind.ROLE, role=Role.CONTROL)
        except (OSError, ProtocolError) as e:
            raise self.fault(i, f"did not complete the handshake within {self.silence_s:g} s: {e}"
                                f"{self._stopped_note(i)}") from None
        with self._lock:
            if self.closed:  # the deployment was given up meanwhile
                conn.close()
                return
            self.clocks.heard(i)
            self.doing[i] = "while waiting for its configuration"
            self.conns[i] = conn
        threading.Thread(target=self._reader, args=(i, conn), daemon=True).start()

    def load(self, configs: list[StageConfig], load_timeout: float) -> None:
        """Push each stage's config, wait until every stage has loaded (PROGRESS frames keep a slow load alive)."""
        self.clocks.restart()
        for i, cfg in enumerate(configs):
            self.doing[i] = f"while loading units {cfg.start}:{cfg.end}"
            self.send_to(i, Kind.CONFIG, **cfg.to_dict())
        deadline = time.perf_counter() + load_timeout
        n = len(self.stages)
        with tqdm(total=n, desc="load stages", unit="stage", file=sys.stderr, delay=2.0, mininterval=1.0,
                  leave=False) as bar:  # shown only when loading takes more than 2 s
            while len(self.loaded) < n:
                if time.perf_counter() > deadline:
                    i = min(set(range(n)) - set(self.loaded))
                    raise self.fault(i, f"did not load its units within {load_timeout:.0f} s")
                self.watch(0.1)
                busy = [i for i in range(n) if i not in self.loaded and i in self.progress]
                if busy:
                    p = self.progress[busy[-1]]
                    bar.set_postfix_str(f"stage {busy[-1]} {p.get('phase')}: {p.get('elapsed_s', 0):.0f} s, "
                                        f"{p.get('rss_bytes', 0) / 1e6:.0f} MB", refresh=False)
                bar.update(len(self.loaded) - bar.n)
        for i, (s, h) in enumerate(zip(self.stages, self.handles)):
            m = self.loaded[i]
            self.info.append(StageInfo(index=i, device=s.device, start=s.start, end=s.end, host=h.host, port=h.port,
                                       load_s=float(m.get("load_s", 0.0)), rss_bytes=int(m.get("rss_bytes", 0)),
                                       param_bytes=int(m.get("param_bytes", 0)), pid=int(m.get("pid", 0)),
                                       hostname=str(m.get("hostname", ""))))
            self.doing[i] = "during generation"
        self.feed.open(self._data_conn, self.first_shaper)

    def _data_conn(self, i: int, returns: bool, shaper: wire.LinkShaper | None) -> wire.Connection:
        """A data connection of the coordinator's own to stage i (runtime.feed); `returns`: its TOKENs come back on it."""
        h = self.handles[i]
        try:
            conn = wire.connect(h.host, h.port, self._token, timeout=self.silence_s, shaper=shaper)
            conn.send(Kind.ROLE, role=Role.DATA, returns=returns)
        except (OSError, ProtocolError) as e:
            raise self.fault(i, f"did not accept the coordinator's data connection: {e}") from None
        return conn

    def close(self) -> None:
        """Ask every worker to shut down, close the connections, stop the processes; idempotent."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        for c in self.conns:
            if c is None:
                continue
            try:
                c.send(Kind.SHUTDOWN)
            except OSError:
                pass
            c.close()
        self.feed.close()
        for h in self.handles:
            if h is None:
                continue
            try:
                h.stop(3.0)
            except Exception:  # stopping the others matters more than one failure here
                pass

    # ---- requests -------------------------------------------------------------------------------------------
    def request_all(self, kind: Kind, reply: Kind, **meta: Any) -> list[dict]:
        """Send `kind` to every worker and collect each one's `reply` frame meta, in stage order."""
        for i in range(len(self.conns)):
            self.send_to(i, kind, **meta)
        got: dict[int, dict] = {}
        w = Waiter(self)
        while len(got) < len(self.conns):
            i, f, _ = w.next()
            if f.kind == reply:
                got[i] = f.meta
        return [got[i] for i in range(len(self.conns))]

    def stats(self, clear: bool = True) -> list[dict]:
        """Every worker's timing records, byte counters and RSS."""
        return self.request_all(Kind.STATS, Kind.STATS, clear=clear)

    def stats_in_flight(self) -> list[dict]:
        """`stats(clear=False)` while a schedule runs (runtime.adaptive reads it from run_schedule's `on_token` hook,
        micro-batches in flight): every other frame that arrives meanwhile (a TOKEN) goes back on the queue, in
        order and with its arrival time, for run_schedule to read when the hook returns."""
        for i in range(len(self.conns)):
            self.send_to(i, Kind.STATS, clear=False)
        got: dict[int, dict] = {}
        held: list[tuple] = []
        try:
            while len(got) < len(self.conns):
                self.check()
                try:
                    ev = self.events.get(timeout=HEARTBEAT_S / 2)
                except queue.Empty:
                    continue
                if ev[0] == "frame" and ev[2].kind == Kind.STATS and ev[1] not in got:
                    got[ev[1]] = ev[2].meta
                elif not (ev[0] == "frame" and ev[2].kind == Kind.PONG):
                    held.append(ev)  # a TOKEN, or a fault that run_schedule's Waiter reports when it reads it
                    if ev[0] == "closed":
                        raise self.fault(ev[1], f"died (connection closed: {ev[2]})")
        finally:
            while True:  # what arrived after the last reply goes behind what was held, in arrival order
                try:
                    held.append(self.events.get_nowait())
                except queue.Empty:
                    break
            for ev in held:
                self.events.put(ev)
        return [got[i] for i in range(len(self.conns))]

    def run_schedule(self, ids: torch.Tensor, mask: torch.Tensor, steps: int, k: int, schedule: str,
                     sample: dict, eos_ids: tuple[int, ...] = (), pad_id: int | None = None,
                     on_token: Any = None) -> dict:
        """Drive `k` micro-batches for up to `steps` tokens each, released by planning.schedule.release.

        `on_token(record, token_ids) -> bool` (runtime.adaptive's hook) sees every token as it arrives (its
        per_token record and the micro-batch's ids, EOS rule applied); True stops the run at this token
        boundary: no further step is sent, the ones in flight are drained, rows are left as generated.

        With `eos_ids`, every token back goes through model.generate.finish_step (a finished row gets
        `pad_id`, as transformers does); a micro-batch whose rows have all finished starts no further token,
        and the rows of one that stopped early are padded with `pad_id` to the batch's final length.
        """
        req = next(self._req)
        rows = [p.tolist() for p in torch.tensor_split(torch.arange(ids.shape[0]), k)]
        tokens: list[list[int]] = [[] for _ in range(ids.shape[0])]
        sent_at: dict[tuple[int, int], float] = {}
        last_tok: dict[int, torch.Tensor] = {}
        back: dict[int, int] = {}  # step -> micro-batches that have its token back
        finished = [torch.zeros(len(r), dtype=torch.bool) for r in rows]  # per micro-batch, per row
        stopped: dict[int, int] = {}  # micro-batch -> the step after which all its rows had finished
        per_token: list[dict] = []

        def send(mb: int, step: int, x: torch.Tensor, m: torch.Tensor | None) -> None:
            meta: dict[str, Any] = {"req": req, "mb": mb, "step": step}
            if step == 0:
                meta.update(mask=None if bool(m.all()) else m.tolist(), sample=sample)
            sent_at[(mb, step)] = time.perf_counter()
            if self.feed.first is None:  # not loaded through `load`: stage 0's control connection takes them
                self.send_to(0, Kind.TOKENS, x, **meta)
                return
            try:
                self.feed.send(Kind.TOKENS, x, **meta)
            except OSError as e:
                raise self.fault(0, f"cannot be reached ({e})") from None

        w = Waiter(self)
        t_start = time.perf_counter()
        for j in range(k):
            send(j, 0, ids[rows[j]], mask[rows[j]])
        in_flight = k
        while in_flight:
            i, f, t = w.next()
            if f.kind != Kind.TOKEN or f.get("req") != req:
                continue
            in_flight -= 1
            mb, step = int(f["mb"]), int(f["step"])
            tok = f.tensor.reshape(-1).to(torch.int64)
            if eos_ids:
                tok, finished[mb] = finish_step(tok, finished[mb], eos_ids, pad_id)
                if bool(finished[mb].all()):
                    stopped[mb] = step
            for r, v in zip(rows[mb], tok.tolist()):
                tokens[r].append(v)
            per_token.append({"req": req, "mb": mb, "step": step, "rows": len(rows[mb]),
                              "sent_ms": (sent_at[(mb, step)] - t_start) * 1e3, "t_ms": (t - t_start) * 1e3,
                              "latency_ms": (t - sent_at[(mb, step)]) * 1e3})
            last_tok[mb] = tok[:, None]
            back[step] = back.get(step, 0) + 1
            if on_token is not None and on_token(per_token[-1], tok.tolist()):
                steps = min(steps, step + 1)  # adaptive switch-over: release nothing after this boundary
            if step + 1 < steps:
                # a micro-batch that stopped at an earlier step is through this one too (bubbles do not wait for it)
                through = back[step] + sum(1 for s in stopped.values() if s < step)
                for j in release(schedule, mb, through, k, stopped.keys()):
                    send(j, step + 1, last_tok[j], None)
                    in_flight += 1
        wall_s = time.perf_counter() - t_start
        width = max(len(t) for t in tokens)
        for t in tokens:  # rows of a micro-batch that stopped early: padded as transformers pads finished rows
            t.extend([pad_id] * (width - len(t)))
        for i in range(len(self.conns)):
            self.send_to(i, Kind.RELEASE, req=req)
        stats = self.stats(clear=True)
        per_stage = [dict(r) for s in stats for r in s["records"] if r.get("req") == req]
        per_stage.sort(key=lambda r: (r["stage"], r["mb"], r["step"]))
        return {"tokens": tokens, "per_token": per_token, "per_stage": per_stage, "wall_s": wall_s,
                "counters": [s["counters"] for s in stats], "stopped": dict(stopped)}
