"""SSH connections with paramiko along the path `ssh -G` resolves (sshconfig.py): jump hosts, ProxyCommand, keys or
agent, host keys checked at every hop; remote commands, run_json, SFTP."""

from __future__ import annotations

import json
import os
import posixpath
import shlex
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import paramiko

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.testbed.hops import HopError, open_hop
from edgeshard_kit.testbed.sshconfig import Hop, resolve_hop

if TYPE_CHECKING:
    from edgeshard_kit.testbed.inventory import Device

CONNECT_TIMEOUT_S = 10.0   # TCP connect + SSH banner + auth, seconds
RUN_TIMEOUT_S = 600.0      # a remote command (e.g. a profile run), seconds
SFTP_TIMEOUT_S = 60.0      # one SFTP request, seconds


@dataclass(frozen=True)
class SSHTarget:
    """Where and how to reach one device over SSH: the path of hops that `ssh -G` resolved (sshconfig.Hop)."""

    device: str
    alias: str                   # the name given to ssh (the inventory's ssh_alias or host)
    hop: Hop                     # the device's own hop; hop.via: the jump hosts before it
    accept_new: bool = False     # lab testbeds: accept and save unknown host keys (every hop)

    hostname = property(lambda self: self.hop.hostname)
    port = property(lambda self: self.hop.port)
    user = property(lambda self: self.hop.user)
    key_files = property(lambda self: self.hop.key_files)

    @property
    def known_hosts(self) -> str:
        """The known_hosts file where the device's new host keys go (the first UserKnownHostsFile)."""
        return (self.hop.known_hosts or (os.path.expanduser("~/.ssh/known_hosts"),))[0]

    @property
    def jumps(self) -> list[Hop]:
        """The jump hosts, the coordinator's side first."""
        return self.hop.path()[:-1]

    @property
    def where(self) -> str:
        """user@host:port, with the jump hosts when there are any."""
        via = " -> ".join(h.where for h in self.jumps)
        return f"{self.hop.where} via {via}" if via else self.hop.where

    def to_dict(self) -> dict:
        """The path as `ssh check` shows it: every hop's address, user, port, keys, known_hosts."""
        return {"device": self.device, "alias": self.alias, "where": self.where,
                "path": [h.describe() for h in self.hop.path()]}


def _has_entry(name: str, ssh_config: str | None) -> bool:
    """Whether the ssh config gives `name` a HostName of its own (an emulated testbed's Host per device)."""
    try:
        return resolve_hop(name, ssh_config).hostname != name
    except KitError:
        return True  # an entry the kit refuses: use it, so the error names it


def resolve_target(device: "Device", ssh_config: str | None = None, known_hosts: str | None = None,
                   accept_new_host_keys: bool = False, host: str | None = None, port: int | None = None,
                   user: str | None = None, key: str | None = None, alias: str | None = None) -> SSHTarget:
    """The device's path as OpenSSH resolves it (`ssh -G`), with the inventory's fields (or overrides) on top."""
    if ssh_config and not Path(os.path.expanduser(ssh_config)).is_file():
        raise KitError(f"device {device.name}: ssh config file {ssh_config} does not exist")
    name = alias or host or device.ssh_alias or device.host
    if not (alias or host or device.ssh_alias) and device.host == "127.0.0.1" and _has_entry(device.name, ssh_config):
        name = device.name  # an emulated testbed's ssh_config has one Host per device name
    key = key or device.key
    if key and not os.path.isfile(os.path.expanduser(key)):
        raise KitError(f"device {device.name}: key file {key} does not exist")
    # Explicit fields win, as on the ssh command line (-l, -p); port 22 is the inventory default: the config's counts.
    try:
        hop = resolve_hop(name, ssh_config, user or device.user, port or (device.port if device.port != 22 else None),
                          key, os.path.expanduser(known_hosts) if known_hosts else None)
    except KitError as e:
        raise KitError(f"device {device.name}: {e}") from None
    if hop.hostname == name and host and name != host and hop.via is None and hop.proxy_command is None:
        hop = replace(hop, hostname=host)  # an alias without a Host entry: connect to the explicit address
    return SSHTarget(device=device.name, alias=name, hop=hop, accept_new=accept_new_host_keys)


class SSHConnection:
    """One authenticated SSH connection to a device (through its jump hosts): run commands, run_json, SFTP."""

    def __init__(self, target: SSHTarget, timeout: float = CONNECT_TIMEOUT_S):
        self.target = target
        self.timeout = timeout
        self.client: paramiko.SSHClient | None = None
        self._jumps: list[paramiko.SSHClient] = []
        self._sftp: paramiko.SFTPClient | None = None
        self._lock = threading.Lock()
        # paramiko's SFTPClient matches replies to requests without locking: one SFTP request at a time.
        self.sftp_lock = threading.RLock()

    def _err(self, what: str) -> KitError:
        return KitError(f"device {self.target.device} ({self.target.where}): {what}")

    def open(self) -> "SSHConnection":
        """Connect and authenticate every hop; KitError naming the device, its path and the failing hop."""
        opened: list[paramiko.SSHClient] = []
        try:
            client = open_hop(self.target.hop, self.target.accept_new, self.timeout, opened)
        except HopError as e:
            for c in reversed(opened):
                c.close()
            if e.hop is self.target.hop:
                raise self._err(e.what) from None
            raise self._err(f"jump host {e.hop.name} ({e.hop.where}): {e.what}") from None
        self.client, self._jumps = client, opened[:-1]
        return self

    def __enter__(self) -> "SSHConnection":
        return self if self.client else self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close SFTP, the connection and its jump hosts' connections; idempotent."""
        if self._sftp is not None:
            self._sftp.close()
            self._sftp = None
        if self.client is not None:
            self.client.close()
            self.client = None
        for jump in reversed(self._jumps):
            jump.close()
        self._jumps = []

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
            self.close()
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


__all__ = ["Hop", "SSHTarget", "SSHConnection", "resolve_target", "connect", "run_json", "CONNECT_TIMEOUT_S",
           "RUN_TIMEOUT_S"]
