"""Starting and stopping workers: the WorkerHandle interface, the worker's command line, local subprocess workers."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.runtime.protocol import parse_listening, write_token_file
from edgeshard_kit.testbed.inventory import Device

LISTEN_TIMEOUT_S = 60.0  # a worker imports torch before listening: seconds on a loaded 2-core box


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


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the worker leads its own session/group: this reaches its children too
    except (ProcessLookupError, PermissionError):
        pass


class LocalLauncher:
    """Starts workers as subprocesses on 127.0.0.1 (this machine's interpreter unless `python` is given)."""

    def __init__(self, python: str | None = None, bind: str = "127.0.0.1", log_dir: str | None = None,
                 listen_timeout: float = LISTEN_TIMEOUT_S):
        self.python = python or sys.executable
        self.bind = bind
        self.log_dir = log_dir
        self.listen_timeout = listen_timeout

    def start(self, device: Device, token: bytes, port: int = 0) -> LocalWorkerHandle:
        """Start a worker for `device` (pinned to `device.cpus` if set) and wait until it listens."""
        port = port or getattr(device, "worker_port", 0) or 0
        token_file = write_token_file(token)
        fd, log_path = tempfile.mkstemp(prefix=f"edgeshard-worker-{device.name}-", suffix=".log", dir=self.log_dir)
        cpus = getattr(device, "cpus", None)
        preexec = None
        if cpus:
            # Affinity set before exec is inherited by every thread torch starts later.
            preexec = lambda: os.sched_setaffinity(0, set(cpus))  # noqa: E731
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if cpus:
            env.setdefault("OMP_NUM_THREADS", str(len(cpus)))
        proc = subprocess.Popen(worker_command(self.python, port, token_file, self.bind), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=fd, start_new_session=True, preexec_fn=preexec,
                                env=env)
        os.close(fd)
        handle = LocalWorkerHandle(device=device.name, host="127.0.0.1", port=0, proc=proc, log_path=log_path,
                                   token_file=token_file)
        try:
            msg = _wait_listening(proc, self.listen_timeout)
        except BaseException:
            handle.stop(1.0)
            raise
        if msg is None:
            tail = handle.log_tail(5).strip().splitlines()
            handle.stop(1.0, keep_log=True)  # the message names the log
            raise KitError(f"worker for device {device.name} did not start listening within "
                           f"{self.listen_timeout:.0f} s: {tail[-1] if tail else 'no output'} (log {log_path})")
        handle.port = int(msg["port"])
        return handle


def _wait_listening(proc: subprocess.Popen, timeout: float) -> dict | None:
    """Read the worker's stdout until its listening line, its exit, or `timeout` s."""
    deadline = time.monotonic() + timeout
    buf = b""
    fd = proc.stdout.fileno()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], min(0.2, max(0.0, deadline - time.monotonic())))
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = parse_listening(line.decode(errors="replace"))
                if msg is not None:
                    return msg
        elif proc.poll() is not None:
            return None
    return None
