"""Starting and stopping workers: the WorkerHandle interface, the worker's command line, local subprocess workers."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.runtime.protocol import SILENCE_S, parse_listening, write_token_file
from edgeshard_kit.testbed.inventory import Device

LISTEN_TIMEOUT_S = 60.0  # a worker imports torch before listening: seconds on a loaded 2-core box
POLL_S = 0.2  # how often a launcher looks at a starting worker (its stdout, its process state)
STOPPED = frozenset({"stopped", "tracing-stop"})  # process states (psutil's names) of a worker that cannot answer
PROC_STATES = {"R": "running", "S": "sleeping", "D": "disk-sleep", "T": "stopped", "t": "tracing-stop",
               "Z": "zombie", "X": "dead", "I": "idle", "W": "waking", "P": "parked"}  # /proc/PID/stat letters


class StoppedClock:
    """How long a starting worker's process has been seen stopped (SIGSTOP) without a break, seconds."""

    def __init__(self) -> None:
        self.since: float | None = None

    def see(self, state: str | None) -> float:
        now = time.monotonic()
        if state not in STOPPED:
            self.since = None
            return 0.0
        if self.since is None:
            self.since = now
        return now - self.since


@dataclass
class WorkerHandle:
    """One running worker: `host:port` is the address the coordinator and the previous stage connect to."""

    device: str
    host: str
    port: int

    def alive(self) -> bool:
        """True while the worker process runs."""
        raise NotImplementedError

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker (SIGTERM, then SIGKILL after `timeout` s); idempotent."""
        raise NotImplementedError

    def log_tail(self, n: int = 50) -> str:
        """The last `n` lines of the worker's stderr log."""
        raise NotImplementedError

    def state(self) -> str | None:
        """The worker process's state in psutil's words ("running", "sleeping", "stopped", ...); None if gone."""
        raise NotImplementedError


def worker_command(python: str, port: int, token_file: str, bind: str = "0.0.0.0") -> list[str]:
    """The argv that starts a worker listening on `bind:port` (port 0 = the OS picks)."""
    return [python, "-m", "edgeshard_kit.runtime.worker", "--port", str(int(port)), "--token-file", token_file,
            "--bind", bind]


@dataclass
class LocalWorkerHandle(WorkerHandle):
    """A worker running as a subprocess of this machine, in its own process group."""

    proc: Any = None
    log_path: str = ""
    token_file: str = ""
    _stopped: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 5.0, keep_log: bool = False) -> None:
        """Stop the worker's process group; remove its token file and (unless `keep_log`) its log file."""
        if self._stopped:
            return
        self._stopped = True
        if self.proc is not None and self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGCONT)  # a stopped (SIGSTOP) worker cannot handle SIGTERM
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        if self.token_file:
            Path(self.token_file).unlink(missing_ok=True)
        if self.log_path and not keep_log:
            Path(self.log_path).unlink(missing_ok=True)  # a finished deployment leaves no files behind

    def log_tail(self, n: int = 50) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(deque(f, maxlen=n))
        except OSError:
            return ""

    def state(self) -> str | None:
        return process_state(self.proc.pid) if self.proc is not None and self.proc.poll() is None else None


def process_state(pid: int) -> str | None:
    """A local process's state in psutil's words; None when it is gone."""
    try:
        return psutil.Process(pid).status()
    except psutil.Error:
        return None


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the worker leads its own session/group: this reaches its children too
    except (ProcessLookupError, PermissionError):
        pass


class LocalLauncher:
    """Starts workers as subprocesses on 127.0.0.1 (this machine's interpreter unless `python` is given).

    `listen_timeout`: seconds a worker may take to listen (it imports torch first); `silence_s`: a starting
    worker whose process is stopped (SIGSTOP) this long is reported at once, not after `listen_timeout`.
    """

    def __init__(self, python: str | None = None, bind: str = "127.0.0.1", log_dir: str | None = None,
                 listen_timeout: float = LISTEN_TIMEOUT_S, silence_s: float = SILENCE_S):
        self.python = python or sys.executable
        self.bind = bind
        self.log_dir = log_dir
        self.listen_timeout, self.silence_s = listen_timeout, silence_s

    def _spawn(self, device: Device, port: int, token_file: str, log_fd: int) -> subprocess.Popen:
        """Start the worker's process (its own session; stdout piped, stderr to the log)."""
        cpus = getattr(device, "cpus", None)
        preexec = None
        if cpus:
            # Affinity set before exec is inherited by every thread torch starts later.
            preexec = lambda: os.sched_setaffinity(0, set(cpus))  # noqa: E731
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if cpus:
            env.setdefault("OMP_NUM_THREADS", str(len(cpus)))
        return subprocess.Popen(worker_command(self.python, port, token_file, self.bind), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=log_fd, start_new_session=True, preexec_fn=preexec,
                                env=env)

    def start(self, device: Device, token: bytes, port: int = 0,
              abort: threading.Event | None = None) -> LocalWorkerHandle:
        """Start a worker for `device` (pinned to `device.cpus` if set) and wait until it listens.

        KitError naming the device, host, pid and the worker's last log line when it exits, stays stopped for
        `silence_s`, does not listen within `listen_timeout`, or `abort` is set meanwhile.
        """
        port = port or getattr(device, "worker_port", 0) or 0
        token_file = write_token_file(token)
        fd, log_path = tempfile.mkstemp(prefix=f"edgeshard-worker-{device.name}-", suffix=".log", dir=self.log_dir)
        try:
            proc = self._spawn(device, port, token_file, fd)
        except BaseException:
            Path(token_file).unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        handle = LocalWorkerHandle(device=device.name, host="127.0.0.1", port=0, proc=proc, log_path=log_path,
                                   token_file=token_file)
        try:
            msg = _wait_listening(proc, self.listen_timeout, self.silence_s, abort)
        except BaseException:
            handle.stop(1.0)
            raise
        if isinstance(msg, str):
            tail = [ln for ln in handle.log_tail(20).splitlines() if ln.strip()]
            own = [ln for ln in tail if ln.startswith("[worker ")] or tail
            handle.stop(1.0, keep_log=not (abort is not None and abort.is_set()))  # the message names the log
            raise KitError(f"worker for device {device.name} did not start listening {msg} (host 127.0.0.1, "
                           f"pid {proc.pid}): {own[-1][:200] if own else 'no output'} (log {log_path})")
        handle.port = int(msg["port"])
        return handle


def _wait_listening(proc: subprocess.Popen, timeout: float, silence_s: float = SILENCE_S,
                    abort: threading.Event | None = None) -> dict | str:
    """Read the worker's stdout until its listening line (returned); else why not, in words ("within 60 s")."""
    deadline = time.monotonic() + timeout
    buf = b""
    fd = proc.stdout.fileno()
    stopped = StoppedClock()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], min(POLL_S, max(0.0, deadline - time.monotonic())))
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                try:
                    proc.wait(1.0)
                except subprocess.TimeoutExpired:
                    pass
                return f"(it closed its output, exit code {proc.poll()})"
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = parse_listening(line.decode(errors="replace"))
                if msg is not None:
                    return msg
        elif proc.poll() is not None:
            return f"(it exited with code {proc.returncode})"
        if abort is not None and abort.is_set():
            return "(not waited for: another worker failed to start)"
        state = process_state(proc.pid)
        if stopped.see(state) >= silence_s:
            return f"(it stopped answering: its process has been {state} for {silence_s:g} s)"
    return f"within {timeout:.0f} s"
