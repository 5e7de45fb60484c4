"""SSH inside the emulated testbed: keys, one sshd per namespace, known_hosts and ssh_config."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

from edgeshard_kit.core.errors import KitError

SSHD = "/usr/sbin/sshd"
CLIENT_KEY = "id_ed25519"  # the testbed's client key (private), in the state dir


def _keygen(path: Path, comment: str) -> None:
    """An ed25519 key pair at `path` (+ .pub), unless it is already there."""
    if path.exists() and path.with_suffix(".pub").exists():
        return
    for p in (path, path.with_suffix(".pub")):
        p.unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True)


def ensure_keys(state_dir: Path, testbed: str, devices: list[str]) -> None:
    """Client key, authorized_keys and one host key per device under `state_dir` (kept across `up`)."""
    (state_dir / "hostkeys").mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    _keygen(state_dir / CLIENT_KEY, f"edgeshard-kit testbed {testbed}")
    pub = (state_dir / f"{CLIENT_KEY}.pub").read_text().strip()
    auth = state_dir / "authorized_keys"
    auth.write_text(pub + "\n")
    os.chmod(auth, 0o600)
    for dev in devices:
        _keygen(state_dir / "hostkeys" / f"{dev}_ed25519", f"edgeshard-kit {testbed} {dev} host")


def write_client_files(state_dir: Path, addresses: dict[str, str],
                       via: dict[str, str] | None = None) -> tuple[Path, Path]:
    """known_hosts (the address of every device) and ssh_config (a Host per device; ProxyJump for `via` devices)."""
    known, cfg = state_dir / "known_hosts", state_dir / "ssh_config"
    lines, blocks = [], []
    for dev, addr in addresses.items():
        hostpub = (state_dir / "hostkeys" / f"{dev}_ed25519.pub").read_text().split()
        lines.append(f"{addr} {hostpub[0]} {hostpub[1]}")
        jump = f"  ProxyJump {via[dev]}\n" if via and dev in via else ""
        blocks.append(
            f"Host {dev}\n  HostName {addr}\n  Port 22\n  User root\n{jump}"
            f"  IdentityFile {state_dir / CLIENT_KEY}\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {known}\n  GlobalKnownHostsFile /dev/null\n"
            f"  StrictHostKeyChecking yes\n  BatchMode yes\n  ConnectTimeout 5\n")
    known.write_text("\n".join(lines) + "\n")
    cfg.write_text("# edgeshard-kit emulated testbed: ssh -F this_file <device>\n\n" + "\n".join(blocks))
    return known, cfg


def sshd_config(state_dir: Path, dev: str, address: str, allow_from: str | None = None) -> Path:
    """The sshd_config of one device: listen on its address only, root by the testbed key only (from `allow_from`)."""
    path = state_dir / "run" / f"sshd_config-{dev}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"# edgeshard-kit: sshd of device {dev}\n"
        f"ListenAddress {address}:22\n"
        f"HostKey {state_dir / 'hostkeys' / f'{dev}_ed25519'}\n"
        f"PidFile {pid_file(state_dir, dev)}\n"
        f"AuthorizedKeysFile {state_dir / 'authorized_keys'}\n"
        "PermitRootLogin prohibit-password\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPrintMotd no\nUseDNS no\n"
        "X11Forwarding no\nAllowTcpForwarding yes\nMaxStartups 100:30:200\nMaxSessions 50\n"
        "Subsystem sftp internal-sftp\n"
        + (f"AllowUsers root@{allow_from}\n" if allow_from else ""))
    return path


def pid_file(state_dir: Path, dev: str) -> Path:
    return state_dir / "run" / f"sshd-{dev}.pid"


def sshd_pid(state_dir: Path, dev: str) -> int | None:
    """The pid of the device's sshd when it runs (pid file + the process names our config)."""
    try:
        pid = int(pid_file(state_dir, dev).read_text().split()[0])
        if f"sshd_config-{dev}" in " ".join(psutil.Process(pid).cmdline()):
            return pid
    except (OSError, ValueError, IndexError, psutil.Error):
        pass
    return None


def start_sshd(state_dir: Path, dev: str, namespace: str, address: str, cgroup_procs: list[Path],
               allow_from: str | None = None) -> int:
    """Start the device's sshd in its namespace and cgroups (children inherit both); return its pid.

    `allow_from`: the only client address sshd accepts (a device behind a gateway: the gateway's).
    """
    pid = sshd_pid(state_dir, dev)
    if pid is not None:
        return pid
    if not os.path.exists(SSHD):
        raise KitError(f"{SSHD} is missing: install openssh-server (`make sysdeps` as root)")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    cfg = sshd_config(state_dir, dev, address, allow_from)
    pid_file(state_dir, dev).unlink(missing_ok=True)

    def _enter_cgroups() -> None:  # runs in the child before exec: sshd and its children stay inside
        for procs in cgroup_procs:
            procs.write_text(str(os.getpid()))

    log = state_dir / "run" / f"sshd-{dev}.log"
    proc = subprocess.run(["nsenter", f"--net=/run/netns/{namespace}", SSHD, "-f", str(cfg), "-E", str(log)],
                          preexec_fn=_enter_cgroups, capture_output=True, text=True)
    if proc.returncode != 0:
        raise KitError(f"sshd of device {dev} did not start: {(proc.stderr or proc.stdout).strip()}")
    for _ in range(100):  # sshd daemonises: wait up to 5 s for its pid file
        pid = sshd_pid(state_dir, dev)
        if pid is not None:
            return pid
        time.sleep(0.05)
    tail = log.read_text()[-300:] if log.exists() else ""
    raise KitError(f"sshd of device {dev} did not write {pid_file(state_dir, dev)}: {tail.strip()}")


def kill_pids(pids: list[int], timeout: float = 3.0) -> None:
    """SIGTERM the given processes, then SIGKILL those still alive after `timeout` seconds."""
    procs = []
    for pid in set(pids):
        try:
            p = psutil.Process(pid)
            p.send_signal(signal.SIGTERM)
            procs.append(p)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=timeout)


def kit_sshd_pids(state_dir: Path) -> list[int]:
    """Every sshd (listener or session) started from a config under `state_dir` (also after a crash)."""
    marker = str(state_dir / "run" / "sshd_config-")
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if any(marker in part for part in (p.info["cmdline"] or [])):
            out.append(p.info["pid"])
    return out
