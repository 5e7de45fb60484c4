"""SSH launching: deploy the token, start, watch and stop remote workers, clean up at exit; the `ssh check` preflight.

The SSH connection itself (targets, host keys, remote commands, SFTP) is testbed.access.
"""

from __future__ import annotations

import atexit
import logging
import posixpath
import secrets
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import paramiko

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.runtime.launchers import LISTEN_TIMEOUT_S, PROC_STATES, StoppedClock, WorkerHandle, worker_command
from edgeshard_kit.runtime.protocol import SILENCE_S, parse_listening
from edgeshard_kit.testbed.access import CONNECT_TIMEOUT_S, RUN_TIMEOUT_S, SSHConnection, SSHTarget, resolve_target
from edgeshard_kit.testbed.inventory import Device, Testbed
from edgeshard_kit.testbed.netns import resolve_ssh

POLL_S = 0.2               # polling interval for the listening line and for stop, seconds
LOG_KEEP_BYTES = 1 << 20   # at stop, keep at most the last 1 MiB of the remote log
_log = logging.getLogger(__name__)


_LIVE: "set[SSHWorkerHandle]" = set()  # strong refs: a handle dropped without stop() is still stopped at exit
_HOOKS = {"atexit": False, "signals": False}


def stop_all(timeout: float = 5.0) -> None:
    """Stop every remote worker this process started and has not stopped yet."""
    for handle in list(_LIVE):
        try:
            handle.stop(timeout)
        except Exception as e:  # cleanup must go on with the other workers
            _log.warning("could not stop the worker on %s: %s", handle.device, e)


def install_cleanup() -> None:
    """Stop remote workers at exit; in the main thread also on SIGINT/SIGTERM (called by start(); idempotent)."""
    if not _HOOKS["atexit"]:
        _HOOKS["atexit"] = True
        atexit.register(stop_all)
    if _HOOKS["signals"] or threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread: a later call there does it
    _HOOKS["signals"] = True
    for sig in (signal.SIGINT, signal.SIGTERM):
        prev = signal.getsignal(sig)
        if prev in (signal.SIG_IGN, None):
            continue

        def handler(signum, frame, prev=prev):
            if callable(prev) and prev is not signal.default_int_handler:
                if signum == signal.SIGTERM:
                    stop_all()  # someone else's SIGTERM handler may exit without running atexit: clean up first
                return prev(signum, frame)  # a custom SIGINT handler (a notebook's) decides for itself
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)  # unwinds context managers; atexit then stops what is left

        signal.signal(sig, handler)


@dataclass(eq=False)
class SSHWorkerHandle(WorkerHandle):
    """A worker running on an SSH host in its own session; its token and logs live in a private remote dir."""

    __hash__ = object.__hash__  # identity: handles live in the cleanup set

    conn: Any = None
    pid: int = 0
    remote_dir: str = ""
    log_dir: str | None = None
    _stopped: bool = field(default=False, repr=False)
    _last_log: str = field(default="", repr=False)
    _follow_stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def _alive_cmd(self) -> str:
        # kill -0 also succeeds on a zombie, which nobody may reap in a container: read the state too.
        return f"test -d /proc/{self.pid} && ! grep -q '^State:.*Z' /proc/{self.pid}/status"

    def alive(self) -> bool:
        if self._stopped or not self.pid:
            return False
        try:
            return self.conn.run(self._alive_cmd(), 30)[0] == 0
        except KitError:
            return False  # the host is unreachable over SSH: for the coordinator the worker is gone

    def state(self) -> str | None:
        """The remote process's state (/proc/PID/stat, in psutil's words); None if gone or unreachable."""
        if self._stopped or not self.pid:
            return None
        try:
            rc, out, _ = self.conn.run(f"cat /proc/{self.pid}/stat 2>/dev/null", 30)
        except KitError:
            return None
        fields = out.rpartition(")")[2].split()  # the command name, in parentheses, may hold spaces
        state = PROC_STATES.get(fields[0], fields[0]) if rc == 0 and fields else None
        return None if state in (None, "zombie", "dead") else state

    def stop(self, timeout: float = 5.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._follow_stop.set()
        _LIVE.discard(self)
        pid = self.pid
        try:
            if pid:
                # The worker leads its own process group (setsid): signal the group to reach its children too.
                self.conn.run(f"kill -CONT -- -{pid} 2>/dev/null; kill -TERM -- -{pid} 2>/dev/null", 30)
                if not self._wait_gone(timeout):
                    self.conn.run(f"kill -KILL -- -{pid} 2>/dev/null", 30)
                    if not self._wait_gone(timeout):
                        raise self.conn._err(f"worker pid {pid} survived SIGKILL")
                self.conn.run(f"kill -KILL -- -{pid} 2>/dev/null", 30)  # stragglers of the group
            self._last_log = self._read_log(LOG_KEEP_BYTES)
            if self.log_dir and self._last_log:
                Path(self.log_dir).mkdir(parents=True, exist_ok=True)
                Path(self.log_dir, f"{self.device}.log").write_text(self._last_log)
        finally:
            try:
                if self.remote_dir:  # the token goes whatever happened above
                    self.conn.run(["rm", "-rf", "--", self.remote_dir], 30)
            finally:
                self.conn.close()

    def _wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.conn.run(self._alive_cmd(), 30)[0] != 0:
                return True
            time.sleep(POLL_S)
        return False

    def _read_bytes(self, max_bytes: int, name: str = "worker.log", offset: int | None = None) -> bytes:
        try:
            with self.conn.sftp_lock, self.conn.sftp.open(posixpath.join(self.remote_dir, name), "rb") as f:
                size = f.stat().st_size
                f.seek(max(0, size - max_bytes) if offset is None else offset)
                return f.read(max_bytes)
        except (FileNotFoundError, OSError, paramiko.SSHException):
            return b""

    def _read_log(self, max_bytes: int, name: str = "worker.log", offset: int | None = None) -> str:
        return self._read_bytes(max_bytes, name, offset).decode(errors="replace")

    def log_tail(self, n: int = 50) -> str:
        text = self._last_log if self._stopped else self._read_log(64 * 1024 + 200 * n)
        return "".join(text.splitlines(keepends=True)[-n:])

    def follow(self, callback: Callable[[str], None] | None = None, interval: float = 0.5) -> threading.Thread:
        """Stream new log lines to `callback` (default: stderr, prefixed with the device) until stop()."""
        callback = callback or (lambda line: sys.stderr.write(f"[{self.device}] {line}\n"))

        def loop() -> None:
            offset, partial = 0, b""
            while not self._follow_stop.wait(interval):
                chunk = self._read_bytes(LOG_KEEP_BYTES, offset=offset)
                offset += len(chunk)
                *lines, partial = (partial + chunk).split(b"\n")
                for line in lines:
                    callback(line.decode(errors="replace"))

        thread = threading.Thread(target=loop, name=f"edgeshard-log-{self.device}", daemon=True)
        thread.start()
        return thread


class SSHLauncher:
    """Starts workers on SSH hosts (launch: ssh); `start(device, token, port=0) -> SSHWorkerHandle`."""

    def __init__(self, device: Device | None = None, *, python: str | None = None, bind: str | None = None,
                 ssh_config: str | None = None, known_hosts: str | None = None, accept_new_host_keys: bool = False,
                 connect_timeout: float = CONNECT_TIMEOUT_S, listen_timeout: float = LISTEN_TIMEOUT_S,
                 silence_s: float = SILENCE_S, model_path: str | None = None, remote_tmp: str = "/tmp",
                 log_dir: str | None = None,
                 host: str | None = None, port: int | None = None, user: str | None = None, key: str | None = None,
                 alias: str | None = None, namespace: str | None = None):
        # namespace: given by netns.resolve_ssh; informational (the namespace is reached over its address).
        self.namespace = namespace
        self.device, self.python, self.bind = device, python, bind
        self.target_opts = dict(ssh_config=ssh_config, known_hosts=known_hosts,
                                accept_new_host_keys=accept_new_host_keys, host=host, port=port, user=user,
                                key=key, alias=alias)
        self.connect_timeout, self.listen_timeout, self.silence_s = connect_timeout, listen_timeout, silence_s
        self.model_path, self.remote_tmp, self.log_dir = model_path, remote_tmp, log_dir

    def _dev(self, device: Device | None) -> Device:
        if (device or self.device) is None:
            raise KitError("SSHLauncher: no device given (pass it to SSHLauncher(device) or to the call)")
        return device or self.device

    def target(self, device: Device | None = None) -> SSHTarget:
        """The device's SSH path as OpenSSH resolves it (`ssh -G`, jump hosts included), without connecting."""
        return resolve_target(self._dev(device), **self.target_opts)

    def connect(self, device: Device | None = None) -> SSHConnection:
        """A new open connection to `device` (KitError naming device and host if it fails)."""
        return SSHConnection(self.target(device), self.connect_timeout).open()

    def run_json(self, argv: list[str] | str, device: Device | None = None, timeout: float = RUN_TIMEOUT_S) -> dict:
        """Run `argv` on the device and return its stdout parsed as JSON."""
        with self.connect(device) as conn:
            return conn.run_json(argv, timeout)

    def check(self, device: Device | None = None, model_path: str | None = None) -> dict:
        """Preflight without starting anything: connect, python + kit on the host, model path; KitError if not."""
        device = self._dev(device)
        with self.connect(device) as conn:
            py, kit = conn.check_python(self.python or device.python).split()
            path = device.model_path or model_path or self.model_path
            if path:
                conn.check_model_path(path)
            return {**conn.target.to_dict(), "python": self.python or device.python,
                    "python_version": py, "kit_version": kit, "model_path": path}

    def _bind_address(self, conn: SSHConnection, device: Device) -> str:
        """Where the worker listens: `bind` if given, else the inventory's address, else the address SSH reached."""
        if self.bind:
            return self.bind
        if device.address:
            return device.address
        rc, out, _ = conn.run("echo $SSH_CONNECTION", 30)  # "client_ip client_port server_ip server_port"
        parts = out.split()
        return parts[2] if rc == 0 and len(parts) == 4 else "0.0.0.0"

    def start(self, device: Device | None = None, token: bytes = b"", port: int = 0,
              model_path: str | None = None, abort: threading.Event | None = None) -> SSHWorkerHandle:
        """Check the host (python, kit, model path), copy the token, start the worker and wait until it listens.

        KitError naming device and host when the worker exits, stays stopped (SIGSTOP) for `silence_s`, does not
        listen within `listen_timeout`, or `abort` is set meanwhile (another worker of the deployment failed).
        """
        device = self._dev(device)
        if not token:
            raise KitError(f"device {device.name}: no deployment token given")
        python = self.python or device.python
        port = port or device.worker_port or 0
        conn = self.connect(device)
        try:
            conn.check_python(python)
            path = device.model_path or model_path or self.model_path
            if path:
                conn.check_model_path(path)
            remote_dir = self._make_private_dir(conn)
        except BaseException:
            conn.close()
            raise
        install_cleanup()
        handle = SSHWorkerHandle(device=device.name, host=conn.target.hostname, port=0, conn=conn,
                                 remote_dir=remote_dir, log_dir=self.log_dir)
        _LIVE.add(handle)
        try:
            token_file = posixpath.join(remote_dir, "token")
            with conn.sftp_lock, conn.sftp.open(token_file, "wx") as f:
                f.chmod(0o600)  # before any byte of the token is written
                f.write(token.hex().encode())
            argv = ["env", "PYTHONUNBUFFERED=1", "setsid", "nohup",
                    *worker_command(python, port, token_file, self._bind_address(conn, device))]
            # A simple command in the background: $! is the pid that setsid turns into the group leader.
            cmd = (f"{shlex.join(argv)} > {shlex.quote(remote_dir)}/stdout.log 2> {shlex.quote(remote_dir)}"
                   f"/worker.log < /dev/null & echo $!")
            rc, out, err = conn.run(cmd, 60)
            if rc != 0 or not out.strip().isdigit():
                raise conn._err(f"could not start the worker: {err.strip() or out.strip()}")
            handle.pid = int(out.strip())
            msg = self._wait_listening(handle, abort)
            host = msg.get("host")
            if host and host not in ("0.0.0.0", "::", "127.0.0.1", "localhost"):
                handle.host = host  # a worker bound to one address is reachable there only
            handle.port = int(msg["port"])
        except BaseException:
            handle.stop(1.0)
            conn.close()
            raise
        return handle

    def _make_private_dir(self, conn: SSHConnection) -> str:
        path = posixpath.join(self.remote_tmp, f"edgeshard-{secrets.token_hex(8)}")
        with conn.sftp_lock:
            conn.sftp.mkdir(path, 0o700)
            conn.sftp.chmod(path, 0o700)  # mkdir's mode is masked by the server's umask: set it exactly
        return path

    def _wait_listening(self, handle: SSHWorkerHandle, abort: threading.Event | None = None) -> dict:
        deadline = time.monotonic() + self.listen_timeout
        stopped = StoppedClock()
        while time.monotonic() < deadline:
            for line in handle._read_log(64 * 1024, "stdout.log", offset=0).splitlines():
                msg = parse_listening(line)
                if msg is not None:
                    return msg
            state = handle.state()
            if state is None:
                raise handle.conn._err(f"worker did not start listening (pid {handle.pid} exited): {_last_line(handle)}")
            if abort is not None and abort.is_set():
                raise handle.conn._err("worker did not start listening (not waited for: another worker failed to start)")
            if stopped.see(state) >= self.silence_s:
                raise handle.conn._err(f"worker did not start listening (it stopped answering: its process, pid "
                                       f"{handle.pid}, has been {state} for {self.silence_s:g} s); {_last_line(handle)}")
            time.sleep(POLL_S)
        raise handle.conn._err(f"worker did not start listening within {self.listen_timeout:.0f} s: "
                               f"{_last_line(handle)}")


def _last_line(handle: SSHWorkerHandle) -> str:
    """The worker's last own log line (else its last line), for messages."""
    lines = [ln for ln in handle.log_tail(20).splitlines() if ln.strip()]
    own = [ln for ln in lines if ln.startswith("[worker ")] or lines
    return f"last log line: {own[-1][:200]}" if own else "no output"


def check_devices(testbed: Testbed, names: list[str] | None = None, model_path: str | None = None,
                  **opts: Any) -> list[dict]:
    """`ssh check`: per launch: ssh device (or each of `names`), SSHLauncher.check's dict, or {device, error[, path]}.

    `opts` are SSHLauncher's keyword options (ssh_config, known_hosts, accept_new_host_keys, connect_timeout);
    on an emulated (netns) testbed each device's address, key and known_hosts come from the testbed's state.
    """
    names = names or [d.name for d in testbed.devices if d.launch == "ssh"]
    out = []
    for name in names:
        dev = testbed.device(name)
        dev_opts = {k: v for k, v in resolve_ssh(testbed, dev).items() if v is not None} \
            if testbed.emulation == "netns" else {}
        dev_opts.update({k: v for k, v in opts.items() if v is not None})
        launcher = SSHLauncher(**dev_opts)
        try:
            out.append(launcher.check(dev, model_path=model_path))
        except KitError as e:
            row = {"device": name, "error": str(e)}
            try:
                row["path"] = launcher.target(dev).to_dict()["path"]  # where it failed along the way
            except KitError:
                pass  # the path itself did not resolve: the error says why
            out.append(row)
    return out
