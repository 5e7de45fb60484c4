"""The coordinator's side of the wire: a chain of connected stage workers, configs pushed, token schedules run, faults named.

A `Chain` owns the control connections to one plan's workers (stage order) and the queue their frames
arrive on; it knows nothing of testbeds or plans: the deployment gives it the stages, the worker
handles and each stage's `StageConfig`.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.units import Stage
from edgeshard_kit.model.generate import finish_step
from edgeshard_kit.planning.schedule import release
from edgeshard_kit.runtime import wire
from edgeshard_kit.runtime.launchers import WorkerHandle
from edgeshard_kit.runtime.protocol import Kind, ProtocolError, Role, StageConfig

HEARTBEAT_S = 0.5  # how often the coordinator pings every worker while it waits for tokens
FAULT_TIMEOUT_S = 5.0  # a worker silent this long (no pong, no frame) is declared stopped


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


def _exited(h: WorkerHandle) -> bool:
    """True if a local worker process has exited (remote handles are judged by their connection instead)."""
    return getattr(h, "proc", None) is not None and not h.alive()


class Chain:
    """Control connections to the workers of one plan's stages; every frame they send lands on `events`."""

    def __init__(self, stages: list[Stage], handles: list[WorkerHandle], token: bytes,
                 fault_timeout: float = FAULT_TIMEOUT_S):
        self.stages, self.handles = list(stages), list(handles)
        self.fault_timeout = fault_timeout
        self._token = token
        self.conns: list[wire.Connection] = []
        self.info: list[StageInfo] = []
        self.events: queue.Queue = queue.Queue()  # ("frame", i, Frame, t) or ("closed", i, why, t)
        self._req = itertools.count()
        self.closed = False

    # ---- faults ---------------------------------------------------------------------------------------------
    def where(self, i: int) -> str:
        if i < len(self.info):
            return self.info[i].where()
        s, h = self.stages[i], self.handles[i]
        return f"stage {i} (units {s.start}:{s.end}) on device {s.device}, host {h.host}:{h.port}"

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
                self.events.put(("frame", i, conn.recv(), time.perf_counter()))
        except (ProtocolError, OSError) as e:
            self.events.put(("closed", i, str(e), time.perf_counter()))

    # ---- setup and teardown ---------------------------------------------------------------------------------
    def connect(self, configs: list[StageConfig], first_shaper: wire.LinkShaper | None, load_timeout: float) -> None:
        """Open the control connections, push each stage's config, wait until every stage has loaded."""
        for i, h in enumerate(self.handles):
            try:
                conn = wire.connect(h.host, h.port, self._token, timeout=30.0, shaper=first_shaper if i == 0 else None)
            except (OSError, ProtocolError) as e:
                raise PipelineError(f"{self.where(i)}: cannot connect: {e}") from None
            conn.send(Kind.ROLE, role=Role.CONTROL)
            self.conns.append(conn)
            threading.Thread(target=self._reader, args=(i, conn), daemon=True).start()
        for conn, cfg in zip(self.conns, configs):
            conn.send(Kind.CONFIG, **cfg.to_dict())
        loaded: dict[int, dict] = {}
        deadline = time.perf_counter() + load_timeout
        while len(loaded) < len(self.stages):
            if time.perf_counter() > deadline:
                i = min(set(range(len(self.stages))) - set(loaded))
                raise self.fault(i, f"did not load its units within {load_timeout:.0f} s")
            try:
                kind, i, f, _ = self.events.get(timeout=0.5)
            except queue.Empty:
                for i, h in enumerate(self.handles):
                    if _exited(h):
                        raise self.fault(i, "died while loading")
                continue
            if kind == "closed":
                raise self.fault(i, f"died while loading (connection closed: {f})")
            if f.kind == Kind.ERROR:
                raise PipelineError(f"{self.where(i)}: {f.get('message')}")
            if f.kind == Kind.LOADED:
                loaded[i] = f.meta
        for i, (s, h) in enumerate(zip(self.stages, self.handles)):
            m = loaded[i]
            self.info.append(StageInfo(index=i, device=s.device, start=s.start, end=s.end, host=h.host, port=h.port,
                                       load_s=float(m.get("load_s", 0.0)), rss_bytes=int(m.get("rss_bytes", 0)),
                                       param_bytes=int(m.get("param_bytes", 0)), pid=int(m.get("pid", 0)),
                                       hostname=str(m.get("hostname", ""))))

    def close(self) -> None:
        """Ask every worker to shut down, close the connections, stop the processes; idempotent."""
        if self.closed:
            return
        self.closed = True
        for c in self.conns:
            try:
                c.send(Kind.SHUTDOWN)
            except OSError:
                pass
            c.close()
        for h in self.handles:
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

    def run_schedule(self, ids: torch.Tensor, mask: torch.Tensor, steps: int, k: int, schedule: str,
                     sample: dict, eos_ids: tuple[int, ...] = (), pad_id: int | None = None) -> dict:
        """Drive `k` micro-batches for up to `steps` tokens each, released by planning.schedule.release.

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
            self.send_to(0, Kind.TOKENS, x, **meta)

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


class Waiter:
    """Waits for worker frames while pinging every worker; raises PipelineError naming a dead or silent stage."""

    def __init__(self, chain: Chain, heartbeat_s: float = HEARTBEAT_S):
        self.chain = chain
        self.heartbeat = heartbeat_s
        self.last_seen = [time.perf_counter()] * len(chain.conns)
        self.last_ping = 0.0

    def next(self) -> tuple[int, wire.Frame, float]:
        """The next frame (not a pong) from any worker: (stage index, frame, arrival perf_counter)."""
        ch = self.chain
        while True:
            now = time.perf_counter()
            if now - self.last_ping >= self.heartbeat:
                self.last_ping = now
                for i in range(len(ch.conns)):
                    if _exited(ch.handles[i]):
                        raise ch.fault(i, "died")
                    ch.send_to(i, Kind.PING, t=now)
                for i, seen in enumerate(self.last_seen):
                    if now - seen > ch.fault_timeout:
                        raise ch.fault(i, f"stopped answering for {now - seen:.1f} s")
            try:
                kind, i, f, t = ch.events.get(timeout=max(0.01, self.last_ping + self.heartbeat - now))
            except queue.Empty:
                continue
            self.last_seen[i] = t
            if kind == "closed":
                raise ch.fault(i, f"died (connection closed: {f})")
            if f.kind == Kind.PONG:
                continue
            if f.kind == Kind.ERROR:
                dead = ch.dead_stage()
                if dead is not None and dead != i:
                    raise ch.fault(dead, "died")
                raise ch.fault(i, f"failed: {f.get('message')}")
            return i, f, t
