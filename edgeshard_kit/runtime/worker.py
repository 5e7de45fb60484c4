"""The worker: listens, authenticates every connection, takes its StageConfig from the coordinator, runs its stage.

Its life, top to bottom: `serve` prints the listening line and accepts connections; the coordinator's
control connection sends CONFIG (load the units, connect to the next stage), then frames flow:
TOKENS/ACT in -> `_step` computes -> ACT to the next stage, or (last stage) a sampled TOKEN back.
A data connection's frames (ACT from the previous stage, TOKENS from the coordinator's feed) are read,
computed and sent on one thread: no hand-off between threads, which on a busy host costs a wait for a core.
It imports only core, model, the wire and the protocol: it starts on remote hosts.
"""

from __future__ import annotations

import argparse
import os
import queue
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from edgeshard_kit.model.generate import sample_next
from edgeshard_kit.model.stage import StageModel
from edgeshard_kit.runtime import wire
from edgeshard_kit.runtime.protocol import (ACT_TOKENS_MAX, CONTROL_MAX, HANDSHAKE_S, IDLE_EXIT_S, MAX_PENDING, PROBE_MAX,
                                            PROGRESS_S, Kind, ProtocolError, Role, StageConfig, listening_line,
                                            read_token_file)

# A worker's reader, compute and sender threads hand frames to each other; with Python's default 5 ms GIL
# switch interval a woken thread can wait that long for the GIL, which is more than a small stage's compute.
SWITCH_INTERVAL_S = 0.0002
ACCEPT_BACKOFF_S = 0.2  # pause after accept() fails (e.g. EMFILE) before trying again
NEXT_CONNECT_S = 30.0  # connecting to the next stage (the coordinator reports a silent next stage well before)


def _log(msg: str) -> None:
    sys.stderr.write(f"[worker {os.getpid()}] {msg}\n")  # stderr is the worker's log file; one write per line
    sys.stderr.flush()


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


class Worker:
    """One stage of the chain: control from the coordinator, activations in from the previous stage, out to the next."""

    def __init__(self, token: bytes, bind: str = "0.0.0.0", port: int = 0, handshake_s: float = HANDSHAKE_S,
                 max_pending: int = MAX_PENDING, idle_exit_s: float = IDLE_EXIT_S):
        self.token, self.handshake_s, self.idle_exit_s, self.started = token, handshake_s, idle_exit_s, time.monotonic()
        self.pending = threading.BoundedSemaphore(max_pending)  # unauthenticated connections in their handshake
        self.listener = socket.create_server((bind, port), reuse_port=False, backlog=16)
        self.host, self.port = self.listener.getsockname()[:2]
        self.model: StageModel | None = None
        self.load_s = 0.0  # seconds the stage's units took to load
        self.cfg: StageConfig | None = None
        self.control: wire.Connection | None = None
        self.next: wire.Connection | None = None
        self.prev: wire.Connection | None = None
        self.back: wire.Connection | None = None  # the coordinator's data connection that takes the last stage's TOKENs
        self.caches: dict[tuple, Any] = {}
        self.generators: dict[tuple, torch.Generator] = {}
        self.sampling: dict[tuple, dict] = {}
        self.inbox: queue.Queue = queue.Queue()
        self.outbox: queue.Queue = queue.Queue()
        self.records: dict[tuple, dict] = {}
        self.lock = threading.Lock()  # the records
        self.step_lock = threading.Lock()  # one step at a time (data threads and the compute thread)
        self.done, self.configured = threading.Event(), threading.Event()  # configured: CONFIG loaded the stage

    @property
    def stage(self) -> int | None:
        return self.cfg.stage if self.cfg else None

    # ---- connections ---------------------------------------------------------------------------------------
    def serve(self) -> None:
        """Accept connections until the coordinator's control connection closes or asks to shut down."""
        print(listening_line(self.host, self.port), flush=True)  # the launcher reads the port from stdout
        self.listener.settimeout(0.5)
        threading.Thread(target=self._compute_loop, daemon=True).start()
        threading.Thread(target=self._send_loop, daemon=True).start()
        last_err = ""
        while not self.done.is_set():
            if self.control is None and time.monotonic() - self.started > self.idle_exit_s:
                _log(f"no coordinator connected within {self.idle_exit_s:g} s: exiting")
                os._exit(0)
            try:
                sock, addr = self.listener.accept()
            except socket.timeout:
                continue
            except OSError as e:  # EMFILE, ENFILE, ENOBUFS, ...: never fatal; one line per new cause, back off
                if str(e) != last_err:
                    _log(f"accept failed: {e}; backing off")
                last_err = str(e)
                time.sleep(ACCEPT_BACKOFF_S)
                continue
            if not self.pending.acquire(blocking=False):
                sock.close()  # too many unauthenticated connections at once
                continue
            try:
                threading.Thread(target=self._handle, args=(sock, addr), daemon=True).start()
            except RuntimeError as e:  # cannot start a thread: drop this one, keep serving
                self.pending.release()
                sock.close()
                _log(f"dropped connection from {addr[0]}: {e}")
        self.listener.close()

    def _handle(self, sock: socket.socket, addr: Any) -> None:
        try:
            conn = wire.Connection(sock)
            try:  # the handshake and the ROLE frame share one deadline; their frames are small and header-only
                first = wire.accept(conn, self.token, self.handshake_s)
            except (ProtocolError, OSError) as e:
                _log(f"dropped connection from {addr[0]}: {str(e)[:200]}")  # garbage, wrong token, slow: keep serving
                conn.close()
                return
        finally:
            self.pending.release()
        role = first.get("role") if first.kind == Kind.ROLE else None
        conn.max_payload = CONTROL_MAX if role == Role.CONTROL else PROBE_MAX if role == Role.PROBE else 0
        try:
            if role == Role.CONTROL:
                self._control_loop(conn)
            elif role == Role.DATA:
                self._data_loop(conn, bool(first.get("returns")))
            elif role == Role.PROBE:
                self._probe_loop(conn)
            else:
                _log(f"dropped connection from {addr[0]}: unknown role {role!r}")
        except (ProtocolError, OSError) as e:
            _log(f"{role} connection from {addr[0]} ended: {str(e)[:200]}")
        finally:
            conn.close()
            if role == Role.CONTROL and conn is self.control:
                self.done.set()  # the coordinator is gone: nothing left to serve
                _log("control connection closed: exiting")
                os._exit(0)

    def _control_loop(self, conn: wire.Connection) -> None:
        if self.control is None:
            self.control = conn
        while True:
            f = conn.recv()
            try:
                if not self._control_message(conn, f):
                    return
            except (KeyError, TypeError, ValueError, AttributeError) as e:  # a malformed request: answer, stay up
                if isinstance(e, ProtocolError):
                    raise
                msg = f"bad {f.kind!r} request: {type(e).__name__}: {str(e)[:200]}"
                _log(msg)
                conn.send(Kind.ERROR, message=f"stage {self.stage} worker {self.host}:{self.port}: {msg}")

    def _control_message(self, conn: wire.Connection, f: wire.Frame) -> bool:
        """Serve one control request; False after SHUTDOWN."""
        if f.kind == Kind.PING:
            conn.send(Kind.PONG, t=f.get("t"))
        elif f.kind == Kind.CONFIG:
            self._configure(conn, f.meta)
        elif f.kind in (Kind.TOKENS, Kind.RELEASE):
            self.inbox.put((f, time.perf_counter(), conn.last_transfer_s * 1e3, conn.last_frame_bytes))
        elif f.kind == Kind.STATS:
            conn.send(Kind.STATS, **self._stats(bool(f.get("clear"))))
        elif f.kind == Kind.PROBE_SEND:
            conn.send(Kind.PROBE_RESULT, **self._probe_send(f.meta))
        elif f.kind == Kind.SHUTDOWN:
            conn.send(Kind.BYE)
            self.done.set()
            return False
        else:
            conn.send(Kind.ERROR, message=f"unknown request {f.kind!r}")
        return True

    def _data_loop(self, conn: wire.Connection, returns: bool = False) -> None:
        """ACT (or stage 0's TOKENS) in; with `returns` (the coordinator's), the last stage's TOKENs go back on it."""
        if returns:
            self.back = conn
        else:
            self.prev = conn
        self.configured.wait()  # the activation limit, batch x tokens x hidden x 4 (float32, the widest), needs it
        if returns:
            conn.shaper = wire.shaper_for(self.cfg.shape_return)
        limit = min(wire.MAX_PAYLOAD, ACT_TOKENS_MAX * int(self.model.config.hidden_size) * 4)
        while True:
            f = conn.recv(max_payload=limit)
            self._run(f, time.perf_counter(), conn.last_transfer_s * 1e3, conn.last_frame_bytes)  # on this thread

    def _probe_loop(self, conn: wire.Connection) -> None:
        while True:
            f = conn.recv()
            conn.send(Kind.PROBE_ACK, n=0 if f.tensor is None else f.tensor.numel())

    # ---- configuration --------------------------------------------------------------------------------------
    def _configure(self, conn: wire.Connection, meta: dict) -> None:
        """Load the configured units and connect to the next stage; LOADED, or ERROR naming host and path.

        Meanwhile a thread sends PROGRESS every PROGRESS_S (phase, elapsed_s, rss_bytes): a long load is not silence.
        """
        host = socket.gethostname()
        try:
            cfg = StageConfig.from_dict(meta)
        except ProtocolError as e:
            conn.send(Kind.ERROR, message=f"worker on host {host}: {e}")
            return
        if not Path(cfg.model_path).is_dir():
            conn.send(Kind.ERROR, message=f"model path {cfg.model_path} does not exist on host {host} "
                                          f"(worker {self.host}:{self.port})")
            return
        t0 = time.perf_counter()
        phase = [f"loading units {cfg.start}:{cfg.end}"]
        stop = threading.Event()
        beat = threading.Thread(target=self._progress, args=(conn, phase, t0, stop), daemon=True)
        beat.start()
        try:
            error = self._load(cfg, conn, phase, host)
        finally:
            stop.set()
            beat.join(PROGRESS_S)  # no PROGRESS after LOADED or ERROR (but never wait long on a blocked send)
        if error is not None:
            conn.send(Kind.ERROR, **error)
            return
        self.configured.set()
        _log(f"stage {cfg.stage}: ready after {time.perf_counter() - t0:.1f} s")
        conn.send(Kind.LOADED, load_s=self.load_s, rss_bytes=_rss(),
                  param_bytes=int(getattr(self.model, "param_bytes", 0)), pid=os.getpid(), hostname=host, threads=torch.get_num_threads())

    def _load(self, cfg: StageConfig, conn: wire.Connection, phase: list[str], host: str) -> dict | None:
        """Load the stage's units, connect to the next stage; None, or the ERROR frame's fields (and the log line)."""
        try:
            _log(f"stage {cfg.stage}: loading units [{cfg.start}, {cfg.end}) of {cfg.model_path}")
            if cfg.threads:
                torch.set_num_threads(cfg.threads)
            t0 = time.perf_counter()
            self.model = StageModel(cfg.model_path, cfg.start, cfg.end, dtype=cfg.dtype, device=cfg.device,
                                    compile=cfg.compile)
            if cfg.compile:  # compile now, under the load's PROGRESS frames, not in the first request
                phase[0] = f"compiling the decode step of units {cfg.start}:{cfg.end}"
                self.model.warm_compile()
            self.load_s = time.perf_counter() - t0
            self.cfg = cfg
            conn.shaper = wire.shaper_for(cfg.shape_return)
        except Exception as e:  # any failure to load is reported to the coordinator, not fatal to the worker
            _log(f"stage {cfg.stage}: failed to load: {type(e).__name__}: {str(e)[:200]}")
            return {"message": f"stage {cfg.stage} on host {host}: {type(e).__name__}: {e}"}
        if cfg.next is None:
            return None
        phase[0] = f"connecting to stage {cfg.stage + 1} at {cfg.next.host}:{cfg.next.port}"
        _log(f"stage {cfg.stage}: {phase[0]}")
        try:
            self.next = wire.connect(cfg.next.host, cfg.next.port, self.token, timeout=NEXT_CONNECT_S,
                                     shaper=wire.shaper_for(cfg.shape_next))
            self.next.send(Kind.ROLE, role=Role.DATA, stage=cfg.stage)
        except (OSError, ProtocolError) as e:  # the coordinator decides whom to blame (`peer`: maybe it is silent)
            _log(f"stage {cfg.stage}: cannot reach stage {cfg.stage + 1}: {str(e)[:200]}")
            return {"peer": cfg.stage + 1, "message": f"stage {cfg.stage} on host {host} cannot reach the next stage "
                                                      f"at {cfg.next.host}:{cfg.next.port}: {type(e).__name__}: {e}"}
        return None

    @staticmethod
    def _progress(conn: wire.Connection, phase: list[str], t0: float, stop: threading.Event) -> None:
        """PROGRESS frames on the control connection every PROGRESS_S until `stop` (the coordinator's silence bound)."""
        while not stop.wait(PROGRESS_S):
            try:
                conn.send(Kind.PROGRESS, phase=phase[0], elapsed_s=round(time.perf_counter() - t0, 3), rss_bytes=_rss())
            except OSError:
                return

    # ---- the data path --------------------------------------------------------------------------------------
    def _report(self, message: str) -> None:
        """An ERROR to the coordinator, if it is still there."""
        if self.control is not None:
            try:
                self.control.send(Kind.ERROR, message=message)
            except OSError:
                pass

    def _compute_loop(self) -> None:
        """Frames from the control connection (TOKENS, RELEASE): computed here, so that PINGs are answered meanwhile."""
        while True:
            self._run(*self.inbox.get())

    def _run(self, f: wire.Frame, t_in: float, recv_ms: float, nbytes: int) -> None:
        with self.step_lock:
            try:
                self._step(f, t_in, recv_ms, nbytes)
            except Exception as e:
                _log(f"step failed: {type(e).__name__}: {e}")
                self._report(f"stage {self.stage} failed: {type(e).__name__}: {e}")

    def _release(self, req: Any) -> None:
        for d in (self.caches, self.generators, self.sampling):
            for k in [k for k in d if k[0] == req]:
                del d[k]

    def _step(self, f: wire.Frame, t_in: float, recv_ms: float, nbytes: int) -> None:
        """One micro-batch through this stage: TOKENS/ACT in; ACT to the next stage, or a TOKEN back."""
        req, mb, step = f.get("req"), f.get("mb"), f.get("step")
        if f.kind == Kind.RELEASE:
            self._release(req)
            return
        if (f.kind == Kind.TOKENS) != (self.stage == 0) or f.kind not in (Kind.TOKENS, Kind.ACT):
            raise ValueError(f"a {f.kind!r} frame is not stage {self.stage}'s input")
        key = (req, mb)
        t0 = time.perf_counter()
        if step == 0:
            self.caches[key] = self.model.new_cache()
            self.sampling[key] = f.get("sample") or {}
        mask = f.get("mask")
        mask_t = torch.tensor(mask, dtype=torch.int64) if mask is not None else None
        with torch.inference_mode():
            out = self.model.forward(f.tensor, self.caches[key], mask_t)
        t1 = time.perf_counter()
        rec = {"stage": self.stage, "device": self.cfg.device_name, "req": req, "mb": mb,
               "step": step, "wait_ms": (t0 - t_in) * 1e3, "recv_ms": recv_ms, "compute_ms": (t1 - t0) * 1e3,
               "send_ms": 0.0, "bytes_in": nbytes, "bytes_out": 0}
        with self.lock:
            self.records[(req, mb, step)] = rec
        meta = {"req": req, "mb": mb, "step": step}
        if self.next is not None:
            if step == 0:
                meta.update(mask=mask, sample=f.get("sample"))
            if self.next.shaper is None:  # the socket buffer lets the next step compute while these bytes travel
                self._send_next(out, meta)
            else:  # an app-level shaper sleeps in send: a separate sender keeps this thread computing
                self.outbox.put((out, meta))
            return
        s = self.sampling.get(key, {})
        if key not in self.generators:
            self.generators[key] = torch.Generator().manual_seed(int(s.get("seed") or 0) + int(mb or 0))
        # the coordinator checked the settings (model.generate.check_sampling); a missing one is the default
        tok = sample_next(out, float(s.get("temperature", 0.0)), float(s.get("top_p", 1.0)), self.generators[key])
        t2 = time.perf_counter()
        n = (self.back or self.control).send(Kind.TOKEN, tok.to(torch.int64), **meta)
        rec.update(compute_ms=(t2 - t0) * 1e3, send_ms=(time.perf_counter() - t2) * 1e3, bytes_out=n)

    def _send_loop(self) -> None:
        # With an app-level shaper, a separate sender lets the next micro-batch compute while this one is on the link.
        while True:
            self._send_next(*self.outbox.get())

    def _send_next(self, out: torch.Tensor, meta: dict) -> None:
        t0 = time.perf_counter()
        try:
            n = self.next.send(Kind.ACT, out, **meta)
        except Exception as e:  # the next stage is gone (or the frame is bad): tell the coordinator, go on
            self._report(f"stage {self.stage} cannot send to the next stage: {e}")
            return
        with self.lock:
            rec = self.records.get((meta["req"], meta["mb"], meta["step"]))
            if rec is not None:
                rec.update(send_ms=(time.perf_counter() - t0) * 1e3, bytes_out=n)

    # ---- stats and probes -----------------------------------------------------------------------------------
    def _stats(self, clear: bool) -> dict:
        with self.lock:
            recs = list(self.records.values())
            if clear:
                self.records.clear()
        conns = {name: c.counters() for name, c in (("control", self.control), ("prev", self.prev),
                                                    ("next", self.next), ("back", self.back)) if c is not None}
        return {"records": recs, "counters": conns, "rss_bytes": _rss()}

    def _probe_send(self, req: dict) -> dict:
        """Send payloads of each size to a peer worker; report per-message round-trip times (ms)."""
        try:
            peer = wire.connect(req["host"], int(req["port"]), self.token, timeout=10.0,
                                shaper=wire.shaper_for(req.get("shape")))
        except (OSError, ProtocolError) as e:
            return {"error": f"cannot reach {req['host']}:{req['port']}: {e}"}
        out: list[dict] = []
        try:
            peer.send(Kind.ROLE, role=Role.PROBE)
            for size in req.get("sizes", []):
                payload = torch.zeros(int(size), dtype=torch.uint8)
                times = []
                for _ in range(int(req.get("repeats", 3)) + 1):  # the first is a warm-up
                    t0 = time.perf_counter()
                    peer.send(Kind.PROBE, payload)
                    peer.recv()
                    times.append((time.perf_counter() - t0) * 1e3)
                out.append({"bytes": int(size), "ms": times[1:]})
        except (OSError, ProtocolError) as e:  # the peer went away mid-probe: an answer, not the end of control
            return {"error": f"probe to {req['host']}:{req['port']} failed: {e}", "results": out}
        finally:
            peer.close()
        return {"results": out}


# ---- entry point: `python -m edgeshard_kit.runtime.worker` (what launchers start) and `edgeshard worker` -------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The worker's options: a port and a token file; the coordinator pushes everything else."""
    p.add_argument("--port", type=int, default=0, help="TCP port (0 = the OS picks; printed on stdout)")
    p.add_argument("--token-file", required=True, help="file holding the deployment token (hex, mode 0600)")
    p.add_argument("--bind", default="0.0.0.0", help="address to listen on")
    p.add_argument("--handshake-timeout", type=float, default=HANDSHAKE_S, help="seconds for the whole handshake")
    p.add_argument("--max-pending", type=int, default=MAX_PENDING, help="unauthenticated connections at once")
    p.add_argument("--idle-exit", type=float, default=IDLE_EXIT_S, help="exit if no coordinator within this (s)")


def run(args: argparse.Namespace) -> int:
    """Serve until the coordinator is done."""
    token = read_token_file(args.token_file)
    try:  # the token lives on disk only until the worker holds it: nothing is left if the coordinator is killed
        os.unlink(args.token_file)
    except OSError:
        pass
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    Worker(token, args.bind, args.port, handshake_s=args.handshake_timeout, max_pending=args.max_pending,
           idle_exit_s=args.idle_exit).serve()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edgeshard worker", description="run one pipeline worker")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
