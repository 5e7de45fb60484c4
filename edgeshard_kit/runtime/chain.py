"""The coordinator's side of the wire: connect and configure stages, run the token schedules, detect faults."""

from __future__ import annotations

import queue
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from edgeshard_kit.runtime import wire

if TYPE_CHECKING:
    from edgeshard_kit.runtime.deployment import Deployment


def _fault(dep: "Deployment", i: int, what: str) -> Exception:
    from edgeshard_kit.runtime.deployment import PipelineError

    h = dep.handles[i]
    code = getattr(getattr(h, "proc", None), "returncode", None)
    extra = f" (exit code {code})" if code is not None else ""
    tail = ""
    try:
        lines = [ln for ln in h.log_tail(5).splitlines() if ln.strip()]
        tail = f"; last log line: {lines[-1][:200]}" if lines else ""
    except Exception:
        pass
    return PipelineError(f"{dep._where(i)} {what}{extra}{tail}")


def _exited(h: Any) -> bool:
    """True if a local worker process has exited (remote handles are judged by their connection instead)."""
    return getattr(h, "proc", None) is not None and not h.alive()


def send_to(dep: "Deployment", i: int, kind: str, tensor: torch.Tensor | None = None, **meta: Any) -> None:
    """Send a frame to stage i's worker; a failure is a PipelineError naming the stage."""
    try:
        dep.conns[i].send(kind, tensor, **meta)
    except OSError as e:
        raise _fault(dep, i, f"cannot be reached ({e})") from None


def _dead_stage(dep: "Deployment", grace_s: float = 0.3) -> int | None:
    """A stage whose process exited or whose connection closed (waits `grace_s` for the news to arrive)."""
    deadline = time.perf_counter() + grace_s
    while True:
        for i, h in enumerate(dep.handles):
            if _exited(h):
                return i
        try:
            kind, i, _, _ = dep.events.get(timeout=0.05)
            if kind == "closed":
                return i
        except queue.Empty:
            pass
        if time.perf_counter() > deadline:
            return None


class Waiter:
    """Waits for worker frames while pinging every worker; raises PipelineError naming a dead or silent stage."""

    def __init__(self, dep: "Deployment", heartbeat_s: float | None = None):
        from edgeshard_kit.runtime.deployment import HEARTBEAT_S

        self.dep = dep
        self.heartbeat = heartbeat_s or HEARTBEAT_S
        now = time.perf_counter()
        self.last_seen = [now] * len(dep.conns)
        self.last_ping = 0.0

    def next(self) -> tuple[int, wire.Frame, float]:
        """The next frame (not a pong) from any worker: (stage index, frame, arrival perf_counter)."""
        dep = self.dep
        while True:
            now = time.perf_counter()
            if now - self.last_ping >= self.heartbeat:
                self.last_ping = now
                for i in range(len(dep.conns)):
                    if _exited(dep.handles[i]):
                        raise _fault(dep, i, "died")
                    send_to(dep, i, "ping", t=now)
                for i, seen in enumerate(self.last_seen):
                    if now - seen > dep.fault_timeout:
                        raise _fault(dep, i, f"stopped answering for {now - seen:.1f} s")
            try:
                kind, i, f, t = dep.events.get(timeout=max(0.01, self.last_ping + self.heartbeat - now))
            except queue.Empty:
                continue
            self.last_seen[i] = t
            if kind == "closed":
                raise _fault(dep, i, f"died (connection closed: {f})")
            if f.kind == "pong":
                continue
            if f.kind == "error":
                dead = _dead_stage(dep)
                if dead is not None and dead != i:
                    raise _fault(dep, dead, "died")
                raise _fault(dep, i, f"failed: {f.get('message')}")
            return i, f, t


def connect_stages(dep: "Deployment", device_map: dict, threads: Any, load_timeout: float) -> None:
    """Open the control connections, push each stage's config, wait until every stage has loaded."""
    import threading

    from edgeshard_kit.runtime.deployment import PipelineError, StageInfo

    tb, stages, handles = dep.testbed, dep.stages, dep.handles
    src = tb.source.name
    emu = getattr(tb, "emulation", "app")
    for i, (s, h) in enumerate(zip(stages, handles)):
        shaper = wire.shaper_for(tb.link(src, s.device), emu) if i == 0 else None
        try:
            conn = wire.connect(h.host, h.port, dep._token, timeout=30.0, shaper=shaper)
        except (OSError, wire.ProtocolError) as e:
            raise PipelineError(f"{dep._where(i)}: cannot connect: {e}") from None
        conn.send("role", role="control")
        dep.conns.append(conn)
        threading.Thread(target=dep._reader, args=(i, conn), daemon=True).start()
    for i, (s, h, conn) in enumerate(zip(stages, handles, dep.conns)):
        dev = tb.device(s.device)
        last = i + 1 == len(stages)
        n_threads = threads.get(s.device) if isinstance(threads, dict) else threads
        if n_threads is None:
            # the device's rule (testbed.Device.threads), which its profile was measured with: local
            # workers share this machine's cores (oversubscribed torch threads spin and slow all down)
            n_threads = dev.threads()
        path = dev.model_path or str(Path(dep.checkpoint).resolve())
        conn.send("config", stage=i, device_name=s.device, model_path=path, start=s.start, end=s.end,
                  dtype=dep.dtype, device=device_map.get(s.device, "cpu"), threads=n_threads,
                  next=None if last else {"host": handles[i + 1].host, "port": handles[i + 1].port},
                  shape_next=None if last else _link(tb, s.device, stages[i + 1].device, emu),
                  shape_return=_link(tb, s.device, src, emu) if last else None)
    loaded: dict[int, dict] = {}
    deadline = time.perf_counter() + load_timeout
    while len(loaded) < len(stages):
        if time.perf_counter() > deadline:
            i = min(set(range(len(stages))) - set(loaded))
            raise _fault(dep, i, f"did not load its units within {load_timeout:.0f} s")
        try:
            kind, i, f, _ = dep.events.get(timeout=0.5)
        except queue.Empty:
            for i, h in enumerate(handles):
                if _exited(h):
                    raise _fault(dep, i, "died while loading")
            continue
        if kind == "closed":
            raise _fault(dep, i, f"died while loading (connection closed: {f})")
        if f.kind == "error":
            raise PipelineError(f"{dep._where(i)}: {f.get('message')}")
        if f.kind == "loaded":
            loaded[i] = f.meta
    for i, (s, h) in enumerate(zip(stages, handles)):
        m = loaded[i]
        dep.info.append(StageInfo(index=i, device=s.device, start=s.start, end=s.end, host=h.host, port=h.port,
                                  load_s=float(m.get("load_s", 0.0)), rss_bytes=int(m.get("rss_bytes", 0)),
                                  param_bytes=int(m.get("param_bytes", 0)), pid=int(m.get("pid", 0)),
                                  hostname=str(m.get("hostname", ""))))


def _link(tb: Any, a: str, b: str, emu: str) -> dict | None:
    """The link a -> b as a dict for the worker's shaper (None when it needs no app-level shaping)."""
    if emu != "app" or a == b:
        return None
    ln = tb.link(a, b)
    mbps = ln.mbps if ln.mbps != float("inf") else None
    if mbps is None and not ln.latency_ms:
        return None
    return {"mbps": mbps, "latency_ms": ln.latency_ms}


def request_all(dep: "Deployment", kind: str, reply: str, **meta: Any) -> list[dict]:
    """Send `kind` to every worker and collect each one's `reply` frame meta, in stage order."""
    for i in range(len(dep.conns)):
        send_to(dep, i, kind, **meta)
    got: dict[int, dict] = {}
    w = Waiter(dep)
    while len(got) < len(dep.conns):
        i, f, _ = w.next()
        if f.kind == reply:
            got[i] = f.meta
    return [got[i] for i in range(len(dep.conns))]


def run_schedule(dep: "Deployment", ids: torch.Tensor, mask: torch.Tensor, steps: int, k: int, schedule: str,
                 sample: dict) -> dict:
    """Drive `k` micro-batches for `steps` tokens each; "bubbles" waits for all per step, "no-bubbles" does not."""
    req = next(dep._req)
    rows = [p.tolist() for p in torch.tensor_split(torch.arange(ids.shape[0]), k)]
    tokens: list[list[int]] = [[] for _ in range(ids.shape[0])]
    sent_at: dict[tuple[int, int], float] = {}
    last_tok: dict[int, torch.Tensor] = {}
    per_token: list[dict] = []

    def send(mb: int, step: int, x: torch.Tensor, m: torch.Tensor | None) -> None:
        meta: dict[str, Any] = {"req": req, "mb": mb, "step": step}
        if step == 0:
            meta.update(mask=None if bool(m.all()) else m.tolist(), sample=sample)
        sent_at[(mb, step)] = time.perf_counter()
        send_to(dep, 0, "tokens", x, **meta)

    w = Waiter(dep)
    t_start = time.perf_counter()
    for j in range(k):
        send(j, 0, ids[rows[j]], mask[rows[j]])
    remaining = k * steps
    while remaining:
        i, f, t = w.next()
        if f.kind != "token" or f.get("req") != req:
            continue
        mb, step = int(f["mb"]), int(f["step"])
        tok = f.tensor.reshape(-1)
        for r, v in zip(rows[mb], tok.tolist()):
            tokens[r].append(v)
        per_token.append({"req": req, "mb": mb, "step": step, "rows": len(rows[mb]),
                          "sent_ms": (sent_at[(mb, step)] - t_start) * 1e3, "t_ms": (t - t_start) * 1e3,
                          "latency_ms": (t - sent_at[(mb, step)]) * 1e3})
        remaining -= 1
        last_tok[mb] = tok[:, None]
        if step + 1 >= steps:
            continue
        if schedule == "no-bubbles" or k == 1:
            send(mb, step + 1, last_tok[mb], None)
        elif sum(1 for r in per_token if r["step"] == step) == k:  # bubbles: the whole step is back
            for j in range(k):
                send(j, step + 1, last_tok[j], None)
    wall_s = time.perf_counter() - t_start
    for i in range(len(dep.conns)):
        send_to(dep, i, "release", req=req)
    stats = request_all(dep, "stats", "stats", clear=True)
    per_stage = [dict(r) for s in stats for r in s["records"] if r.get("req") == req]
    per_stage.sort(key=lambda r: (r["stage"], r["mb"], r["step"]))
    return {"tokens": tokens, "per_token": per_token, "per_stage": per_stage, "wall_s": wall_s,
            "counters": [s["counters"] for s in stats]}
