"""SSH connections with paramiko: ssh config aliases, keys or agent, checked host keys, remote commands, run_json, SFTP."""

from __future__ import annotations

import json
import os
import posixpath
import shlex
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paramiko

from edgeshard_kit.core.errors import KitError

if TYPE_CHECKING:
    from edgeshard_kit.testbed.inventory import Device

CONNECT_TIMEOUT_S = 10.0   # TCP connect + SSH banner + auth, seconds
RUN_TIMEOUT_S = 600.0      # a remote command (e.g. a profile run), seconds
SFTP_TIMEOUT_S = 60.0      # one SFTP request, seconds
GLOBAL_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"


@dataclass(frozen=True)
class SSHTarget:
    """Where and how to reach one device over SSH, after ~/.ssh/config and the inventory are merged."""

    device: str
    alias: str                   # the name the inventory gave (ssh_alias or host)
    hostname: str                # address actually connected to
    port: int = 22
    user: str | None = None
    key_files: tuple[str, ...] = ()
    known_hosts: str = "~/.ssh/known_hosts"
    accept_new: bool = False     # lab testbeds: accept and save unknown host keys

    @property
    def where(self) -> str:
        return f"{self.user + '@' if self.user else ''}{self.hostname}:{self.port}"

    def to_dict(self) -> dict:
        return {**self.__dict__, "key_files": list(self.key_files)}

    @classmethod
    def from_dict(cls, d: dict) -> "SSHTarget":
        return cls(**{**d, "key_files": tuple(d.get("key_files", ()))})


def resolve_target(device: "Device", ssh_config: str | None = None, known_hosts: str | None = None,
                   accept_new_host_keys: bool = False, host: str | None = None, port: int | None = None,
                   user: str | None = None, key: str | None = None, alias: str | None = None) -> SSHTarget:
    """Merge the device's inventory fields (or explicit overrides) with its ssh config entry."""
    cfg_path = Path(os.path.expanduser(ssh_config or "~/.ssh/config"))
    if ssh_config and not cfg_path.is_file():
        raise KitError(f"device {device.name}: ssh config file {ssh_config} does not exist")
    config = paramiko.SSHConfig.from_path(str(cfg_path)) if cfg_path.is_file() else paramiko.SSHConfig()
    name = alias or host or device.ssh_alias or device.host
    if not (alias or host or device.ssh_alias) and device.host == "127.0.0.1" and device.name in config.get_hostnames():
        name = device.name  # an emulated testbed's ssh_config has one Host per device name
    cfg: dict[str, Any] = config.lookup(name)
    # Explicit fields win, as on the ssh command line; port 22 is the inventory default, so the config's counts.
    port = port or (device.port if device.port != 22 else int(cfg.get("port", 22)))
    keys = [key] if key else [device.key] if device.key else cfg.get("identityfile", [])
    strict = str(cfg.get("stricthostkeychecking", "yes")).lower()
    kh = known_hosts or (cfg.get("userknownhostsfile", "").split() or ["~/.ssh/known_hosts"])[0]
    hostname = cfg.get("hostname", name)
    if hostname == name and host and name != host:
        hostname = host  # an alias without a Host entry: connect to the explicit address
    return SSHTarget(device=device.name, alias=name, hostname=hostname, port=int(port),
                     user=user or device.user or cfg.get("user"), key_files=tuple(os.path.expanduser(k) for k in keys),
                     known_hosts=os.path.expanduser(kh),
                     accept_new=accept_new_host_keys or strict in ("accept-new", "no", "off"))


class _UnknownHostKey(paramiko.SSHException):
    pass


class _RejectPolicy(paramiko.MissingHostKeyPolicy):
    def missing_host_key(self, client, hostname, key):
        raise _UnknownHostKey(f"{hostname} {key.get_name()}")


class _AcceptNewPolicy(paramiko.MissingHostKeyPolicy):
    """Like AutoAddPolicy, but appends one line to known_hosts instead of rewriting the file."""

    def __init__(self, path: str):
        self.path = path

    def missing_host_key(self, client, hostname, key):
        client.get_host_keys().add(hostname, key.get_name(), key)
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")


class SSHConnection:
    """One authenticated SSH connection to a device: run commands, run_json, SFTP; a context manager."""

    def __init__(self, target: SSHTarget, timeout: float = CONNECT_TIMEOUT_S):
        self.target = target
        self.timeout = timeout
        self.client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._lock = threading.Lock()
        # paramiko's SFTPClient matches replies to requests without locking: one SFTP request at a time.
        self.sftp_lock = threading.RLock()

    def _err(self, what: str) -> KitError:
        return KitError(f"device {self.target.device} ({self.target.where}): {what}")

    def open(self) -> "SSHConnection":
        """Connect and authenticate; KitError naming device and host on any failure."""
        t = self.target
        client = paramiko.SSHClient()
        default = t.known_hosts == os.path.expanduser("~/.ssh/known_hosts")  # an explicit file is the only one
        for path in (t.known_hosts, GLOBAL_KNOWN_HOSTS) if default else (t.known_hosts,):
            if os.path.isfile(path):
                client.load_system_host_keys(path)  # one HostKeys object: loading again adds, never replaces
        client.set_missing_host_key_policy(_AcceptNewPolicy(t.known_hosts) if t.accept_new else _RejectPolicy())
        try:
            client.connect(t.hostname, port=t.port, username=t.user, key_filename=list(t.key_files) or None,
                           timeout=self.timeout, banner_timeout=self.timeout, auth_timeout=self.timeout,
                           allow_agent=True, look_for_keys=not t.key_files)
        except _UnknownHostKey:
            client.close()
            raise self._err(f"host key unknown (not in {t.known_hosts}); check and accept it once with "
                            f"`ssh -p {t.port} {t.user + '@' if t.user else ''}{t.hostname}`, or set "
                            f"accept_new_host_keys=True for a lab testbed") from None
        except paramiko.BadHostKeyException:
            client.close()
            raise self._err(f"host key differs from the one in {t.known_hosts}: possible man-in-the-middle, "
                            f"or the host was reinstalled (remove the old line with ssh-keygen -R)") from None
        except paramiko.AuthenticationException:
            client.close()
            keys = ", ".join(t.key_files) or "agent / default keys"
            raise self._err(f"SSH authentication failed for user {t.user or os.environ.get('USER', '?')} "
                            f"with {keys}: is the public key in the host's authorized_keys?") from None
        except paramiko.ssh_exception.NoValidConnectionsError:
            client.close()
            raise self._err("connection refused: is sshd running and the port right?") from None
        except socket.gaierror:
            client.close()
            raise self._err(f"cannot resolve host name {t.hostname!r} (not an address nor an ssh config alias)") from None
        except (socket.timeout, TimeoutError):
            client.close()
            raise self._err(f"SSH connection timed out after {self.timeout:.0f} s") from None
        except (paramiko.SSHException, EOFError, OSError) as e:
            client.close()
            if "banner" in str(e) or "No existing session" in str(e) or isinstance(e, EOFError):
                raise self._err(f"no SSH answer within {self.timeout:.0f} s: the port is open but no SSH server "
                                f"answered (wrong port, or the host is overloaded)") from None
            raise self._err(f"SSH connection failed: {e}") from None
        self.client = client
        return self

    def __enter__(self) -> "SSHConnection":
        return self if self.client else self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close SFTP and the connection; idempotent."""
        if self._sftp is not None:
            self._sftp.close()
            self._sftp = None
        if self.client is not None:
            self.client.close()
            self.client = None

    @property
    def sftp(self) -> paramiko.SFTPClient:
        """The SFTP session of this connection (opened on first use)."""
        with self._lock:
            if self._sftp is None:
                self._sftp = self._client().open_sftp()
                self._sftp.get_channel().settimeout(SFTP_TIMEOUT_S)  # a stuck request fails instead of hanging
            return self._sftp

    def _client(self) -> paramiko.SSHClient:
        if self.client is None or not self.client.get_transport() or not self.client.get_transport().is_active():
            self._sftp = None
            self.open()
        return self.client

    def run(self, argv: list[str] | str, timeout: float = RUN_TIMEOUT_S) -> tuple[int, str, str]:
        """Run a command (argv is shell-quoted) and return (exit code, stdout, stderr)."""
        cmd = argv if isinstance(argv, str) else shlex.join(argv)
        try:
            chan = self._client().get_transport().open_session(timeout=self.timeout)
        except paramiko.SSHException as e:
            raise self._err(f"cannot open an SSH channel: {e}") from None
        out, err = bytearray(), bytearray()
        deadline = time.monotonic() + timeout
        with chan:
            chan.exec_command(cmd)
            # Drain both streams: an unread stderr would fill the SSH window and stall stdout.
            while True:
                busy = False
                while chan.recv_ready():
                    out += chan.recv(65536)
                    busy = True
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                    busy = True
                if not busy and chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                if time.monotonic() > deadline:
                    raise self._err(f"command timed out after {timeout:.0f} s: {cmd[:120]}")
                if not busy:
                    time.sleep(0.005)
            rc = chan.recv_exit_status()
        return rc, out.decode(errors="replace"), err.decode(errors="replace")

    def run_json(self, argv: list[str] | str, timeout: float = RUN_TIMEOUT_S) -> dict:
        """Run a command whose stdout is one JSON object (e.g. `edgeshard profile ... --out -`) and parse it."""
        rc, out, err = self.run(argv, timeout)
        cmd = argv if isinstance(argv, str) else shlex.join(argv)
        last = (err.strip().splitlines() or ["no stderr"])[-1]
        if rc != 0:
            raise self._err(f"`{cmd[:120]}` exited with {rc}: {last}")
        try:
            value = json.loads(out)
        except ValueError:
            raise self._err(f"`{cmd[:120]}` did not print JSON on stdout ({out[:80]!r}); stderr: {last}") from None
        if not isinstance(value, dict):
            raise self._err(f"`{cmd[:120]}` printed JSON that is not an object")
        return value

    def stat(self, path: str) -> paramiko.SFTPAttributes | None:
        """SFTP stat of a remote path (~ = home), or None if it does not exist."""
        try:
            with self.sftp_lock:
                return self.sftp.stat(_sftp_path(path))
        except FileNotFoundError:
            return None

    def check_python(self, python: str) -> str:
        """"<python version> <kit version>" on the host; KitError if the interpreter or edgeshard_kit is missing."""
        code = "import sys, edgeshard_kit as k; print(sys.version.split()[0], k.__version__)"
        rc, out, err = self.run([python, "-c", code], 60)
        if rc == 127:
            raise self._err(f"python interpreter {python!r} not found on the host (set the device's python:)")
        if "No module named 'edgeshard_kit'" in err:
            raise self._err(f"edgeshard_kit is not installed for {python} on the host (pip install edgeshard-kit)")
        if rc != 0:
            raise self._err(f"{python} failed on the host: {(err.strip().splitlines() or ['?'])[-1]}")
        return out.strip()

    def check_model_path(self, path: str) -> None:
        """KitError unless `path` is a checkpoint directory (with config.json) on the host."""
        if self.stat(path) is None:
            raise self._err(f"model path {path} does not exist on the host (copy the checkpoint, or set model_path:)")
        if self.stat(posixpath.join(path, "config.json")) is None:
            raise self._err(f"model path {path} on the host has no config.json: not a Hugging Face checkpoint")


def _sftp_path(path: str) -> str:
    # SFTP paths are relative to the login directory; it has no `~`.
    return path[2:] if path.startswith("~/") else "." if path == "~" else path


def connect(device: "Device", timeout: float = CONNECT_TIMEOUT_S, **opts) -> SSHConnection:
    """An open SSHConnection to `device` (opts as for resolve_target; netns.resolve_ssh's dict is accepted)."""
    opts = {k: v for k, v in opts.items() if k not in ("python", "namespace")}
    return SSHConnection(resolve_target(device, **opts), timeout).open()


def run_json(device: "Device", argv: list[str] | str, timeout: float = RUN_TIMEOUT_S, **opts) -> dict:
    """Run `argv` on `device` over SSH and return its stdout parsed as JSON."""
    with connect(device, **opts) as conn:
        return conn.run_json(argv, timeout)


__all__ = ["SSHTarget", "SSHConnection", "resolve_target", "connect", "run_json", "CONNECT_TIMEOUT_S",
           "RUN_TIMEOUT_S"]
