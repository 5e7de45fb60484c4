"""Opening one SSH path with paramiko: TCP (or ProxyCommand), then each jump host's direct-tcpip channel, with
the host key checked at every hop (known_hosts, HostKeyAlias, @revoked, StrictHostKeyChecking) and errors that
name the hop. What the path is comes from sshconfig.py; access.py holds the connection's commands and SFTP."""

from __future__ import annotations

import os
import shlex
import socket
import time
from typing import Any

import paramiko

from edgeshard_kit.testbed.sshconfig import Hop


class _UnknownHostKey(paramiko.SSHException):
    pass


class _RevokedHostKey(paramiko.SSHException):
    pass


class _RejectPolicy(paramiko.MissingHostKeyPolicy):
    def missing_host_key(self, client, hostname, key):
        raise _UnknownHostKey(f"{hostname} {key.get_name()}")


class _AcceptNewPolicy(paramiko.MissingHostKeyPolicy):
    """Like AutoAddPolicy, but appends one line to known_hosts (hashed if HashKnownHosts) instead of rewriting it."""

    def __init__(self, path: str | None, hashed: bool):
        self.path, self.hashed = path, hashed  # path None: UserKnownHostsFile none, nothing is saved (as ssh)

    def missing_host_key(self, client, hostname, key):
        client.get_host_keys().add(hostname, key.get_name(), key)
        if self.path is None:
            return
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
        name = paramiko.HostKeys.hash_host(hostname) if self.hashed else hostname
        with open(self.path, "a") as f:
            f.write(f"{name} {key.get_name()} {key.get_base64()}\n")


def _load_known_hosts(keys: paramiko.HostKeys, paths: list[str]) -> set[tuple[str, str]]:
    """Add the keys of known_hosts files to `keys`; return (type, base64) of their `@revoked` lines.

    paramiko's own loader stops at marker lines; `@cert-authority` lines are skipped (no host certificates).
    """
    revoked = set()
    for path in paths:
        with open(path, errors="replace") as f:
            for n, raw in enumerate(f, 1):
                line = raw.strip()
                if line.startswith("@"):
                    parts = line.split()
                    if parts[0] == "@revoked" and len(parts) >= 4:
                        revoked.add((parts[2], parts[3]))
                    continue
                if not line or line.startswith("#"):
                    continue
                try:
                    entry = paramiko.hostkeys.HostKeyEntry.from_line(line, n)
                except (paramiko.SSHException, paramiko.hostkeys.InvalidHostKey, ValueError):
                    continue  # a line ssh would skip too
                for name in entry.hostnames if entry is not None else ():
                    keys.add(name, entry.key.get_name(), entry.key)
    return revoked


def _transport_factory(revoked: set[tuple[str, str]]):
    class _Checked(paramiko.Transport):
        def get_remote_server_key(self):  # SSHClient asks for it before authenticating: refuse a revoked key here
            key = super().get_remote_server_key()
            if (key.get_name(), key.get_base64()) in revoked:
                raise _RevokedHostKey(key.get_name())
            return key
    return lambda sock, disabled_algorithms=None: _Checked(sock, disabled_algorithms=disabled_algorithms)


class HopError(Exception):
    """A failure at one hop of the path: `what` is the sentence, `hop` the host it happened at."""

    def __init__(self, hop: Hop, what: str):
        super().__init__(what)
        self.hop, self.what = hop, what


def _tcp(hop: Hop, timeout: float) -> socket.socket:
    """A TCP connection to the hop (AddressFamily, ConnectTimeout, ConnectionAttempts as ssh -G says)."""
    family = {"inet": socket.AF_INET, "inet6": socket.AF_INET6}.get(hop.address_family, socket.AF_UNSPEC)
    limit = min(timeout, hop.connect_timeout) if hop.connect_timeout else timeout
    try:
        infos = socket.getaddrinfo(hop.hostname, hop.port, family, socket.SOCK_STREAM)
    except socket.gaierror:
        raise HopError(hop, f"cannot resolve host name {hop.hostname!r} (not an address nor an ssh config alias)")
    err: OSError | None = None
    for attempt in range(hop.connection_attempts):  # ssh waits 1 s between attempts
        if attempt:
            time.sleep(1.0)
        for fam, kind, proto, _, addr in infos:
            sock = socket.socket(fam, kind, proto)
            sock.settimeout(limit)
            try:
                sock.connect(addr)
                sock.settimeout(None)
                return sock
            except OSError as e:
                sock.close()
                err = e
    if isinstance(err, ConnectionRefusedError):
        raise HopError(hop, "connection refused: is sshd running and the port right?")
    if isinstance(err, (socket.timeout, TimeoutError)):
        raise HopError(hop, f"SSH connection timed out after {limit:.0f} s")
    raise HopError(hop, f"cannot connect: {err}")


def _proxy_failure(sock: Any) -> str | None:
    """How a ProxyCommand ended, when it has: "exited with N: <last stderr line>"."""
    proc = getattr(sock, "process", None)
    if proc is None or proc.poll() is None:
        return None
    err = (proc.stderr.read() or b"").decode(errors="replace").strip().splitlines() if proc.stderr else []
    return f"ProxyCommand exited with {proc.returncode}: {err[-1] if err else 'no stderr'}"


def _explain(hop: Hop, e: BaseException, timeout: float) -> str:
    """The sentence for an exception of paramiko.SSHClient.connect at `hop`."""
    files = ", ".join(hop.known_hosts) or "no UserKnownHostsFile"
    if isinstance(e, _UnknownHostKey):
        alias = f" under HostKeyAlias {hop.host_key_alias}" if hop.host_key_alias else ""
        return (f"host key unknown (not in {files}{alias}); check and accept it once with "
                f"`ssh -p {hop.port} {hop.user}@{hop.hostname}`, or set accept_new_host_keys=True for a lab testbed")
    if isinstance(e, _RevokedHostKey):
        return f"host key {e} is marked @revoked in {files}"
    if isinstance(e, paramiko.BadHostKeyException):
        return (f"host key differs from the one in {files}: possible man-in-the-middle, "
                f"or the host was reinstalled (remove the old line with ssh-keygen -R {hop.key_name})")
    if isinstance(e, paramiko.AuthenticationException):
        keys = ", ".join(hop.existing_keys()) or "no key file"
        agent = " or the agent" if hop.agent and os.environ.get("SSH_AUTH_SOCK") else ""
        return (f"SSH authentication failed for user {hop.user} with {keys}{agent}: is the public key in the "
                f"host's authorized_keys?")
    if isinstance(e, (socket.timeout, TimeoutError)):
        return f"SSH connection timed out after {timeout:.0f} s"
    if "banner" in str(e) or "No existing session" in str(e) or isinstance(e, EOFError):
        return (f"no SSH answer within {timeout:.0f} s: the port is open but no SSH server "
                f"answered (wrong port, or the host is overloaded)")
    return f"SSH connection failed: {e}"


def open_hop(hop: Hop, accept_new: bool, timeout: float, opened: list[paramiko.SSHClient]) -> paramiko.SSHClient:
    """Connect and authenticate to `hop`, through its jump hosts (direct-tcpip) or ProxyCommand; host keys checked."""
    if hop.via is not None:
        jump = open_hop(hop.via, accept_new, timeout, opened)
        try:
            sock = jump.get_transport().open_channel("direct-tcpip", (hop.hostname, hop.port), ("127.0.0.1", 0),
                                                     timeout=timeout)
        except (paramiko.ChannelException, paramiko.SSHException) as e:
            raise HopError(hop, f"jump host {hop.via.name} could not connect to {hop.hostname}:{hop.port}: "
                                 f"{getattr(e, 'text', e)}") from None
    elif hop.proxy_command is not None:
        shell = os.environ.get("SHELL") or "/bin/sh"  # as ssh does: $SHELL -c "exec <command>"
        try:
            sock = paramiko.ProxyCommand(shlex.join([shell, "-c", f"exec {hop.proxy_command}"]))
        except (OSError, paramiko.SSHException) as e:
            raise HopError(hop, f"cannot run ProxyCommand {hop.proxy_command!r}: {e}") from None
    else:
        sock = _tcp(hop, timeout)
    client = paramiko.SSHClient()
    opened.append(client)
    files = [p for p in (*hop.known_hosts, *hop.global_known_hosts) if os.path.isfile(p)]
    revoked = _load_known_hosts(client.get_host_keys(), files)
    new_ok = accept_new or hop.strict in ("accept-new", "false")
    first = hop.known_hosts[0] if hop.known_hosts else None
    client.set_missing_host_key_policy(_AcceptNewPolicy(first, hop.hash_known_hosts) if new_ok else _RejectPolicy())
    # SSHClient names the host in known_hosts as host or [host]:port; with HostKeyAlias, as the alias alone.
    key_host, key_port = (hop.host_key_alias, 22) if hop.host_key_alias else (hop.hostname, hop.port)
    try:
        client.connect(key_host, port=key_port, username=hop.user, sock=sock,
                       key_filename=list(hop.existing_keys()) or None, look_for_keys=False,
                       allow_agent=hop.agent, timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                       disabled_algorithms=hop.disabled_algorithms(),
                       transport_factory=_transport_factory(revoked))
    except (paramiko.SSHException, EOFError, OSError) as e:
        raise HopError(hop, _proxy_failure(sock) or _explain(hop, e, timeout)) from None
    return client


__all__ = ["HopError", "open_hop"]
