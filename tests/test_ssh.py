"""SSH launcher against a throwaway sshd on 127.0.0.1 (root): alias, keys, host keys, token, worker lifecycle, faults."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from edgeshard_kit.runtime.protocol import new_token
from edgeshard_kit.runtime.ssh_launcher import SSHLauncher
from edgeshard_kit.testbed.access import connect, resolve_target, run_json
from edgeshard_kit.testbed.inventory import Device
from edgeshard_kit.core.errors import KitError
from helpers import free_port, keygen

SSHD = "/usr/sbin/sshd"
pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="the throwaway sshd logs in as root: needs root"),
    pytest.mark.skipif(not os.path.exists(SSHD) or not shutil.which("ssh-keygen"),
                       reason="needs /usr/sbin/sshd and ssh-keygen (apt-get install openssh-server; make sysdeps)"),
]
PY = sys.executable  # the kit is installed (editable) in this interpreter: the "remote" python


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A private sshd on a free port of 127.0.0.1, an ssh_config alias `box`, and a known_hosts with its key."""
    d = tmp_path_factory.mktemp("sshd")
    host_key, key, wrong = keygen(d / "host_ed25519"), keygen(d / "id_ed25519"), keygen(d / "wrong_ed25519")
    (d / "authorized_keys").write_text((d / "id_ed25519.pub").read_text())
    port = free_port()
    (d / "sshd_config").write_text(textwrap.dedent(f"""\
        Port {port}
        ListenAddress 127.0.0.1
        HostKey {host_key}
        PidFile {d / 'sshd.pid'}
        AuthorizedKeysFile {d / 'authorized_keys'}
        PermitRootLogin yes
        StrictModes no
        UsePAM no
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        MaxStartups 50:30:100
        MaxSessions 50
        Subsystem sftp internal-sftp
        """))
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stderr=open(d / "sshd.log", "w"))
    hostpub = (d / "host_ed25519.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {hostpub[0]} {hostpub[1]}\n")
    (d / "ssh_config").write_text(textwrap.dedent(f"""\
        Host box
          HostName 127.0.0.1
          Port {port}
          User root
          IdentityFile {key}
        """))
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"throwaway sshd did not start: {(d / 'sshd.log').read_text()[-500:]}")
            time.sleep(0.05)
    yield {"dir": d, "port": port, "key": str(key), "wrong": str(wrong), "config": str(d / "ssh_config"),
           "known_hosts": str(d / "known_hosts")}
    proc.terminate()
    proc.wait(5)


def _device(**kw) -> Device:
    return Device(**{"name": "box0", "type": "cpu", "memory_bytes": 1 << 30, "launch": "ssh", "host": "box",
                     "python": PY, **kw})


def _opts(sshd, **kw) -> dict:
    return {"ssh_config": sshd["config"], "known_hosts": sshd["known_hosts"], **kw}


def test_alias_resolved_from_ssh_config(sshd):
    t = resolve_target(_device(), ssh_config=sshd["config"], known_hosts=sshd["known_hosts"])
    assert (t.hostname, t.port, t.user, t.key_files) == ("127.0.0.1", sshd["port"], "root", (sshd["key"],))
    assert resolve_target(_device(ssh_alias="box", host="10.0.0.9"), ssh_config=sshd["config"]).hostname == "127.0.0.1"


def test_run_json_round_trip_by_alias(sshd):
    code = "import json; print(json.dumps({'a': 1, 'b': [1.5, None]}))"
    assert run_json(_device(), [PY, "-c", code], **_opts(sshd)) == {"a": 1, "b": [1.5, None]}
    launcher = SSHLauncher(_device(), **_opts(sshd))
    assert launcher.run_json([PY, "-c", "print('{\"x\": \"y z\"}')"]) == {"x": "y z"}
    with pytest.raises(KitError, match=r"box0 .*exited with 3: boom"):
        launcher.run_json([PY, "-c", "import sys; sys.stderr.write('boom\\n'); sys.exit(3)"])
    with pytest.raises(KitError, match="did not print JSON"):
        launcher.run_json(["echo", "hello"])
    # netns.resolve_ssh's dict (explicit address, port, key; extra keys) works as keyword arguments too
    resolved = {"host": "127.0.0.1", "port": sshd["port"], "user": "root", "key": sshd["key"], "alias": None,
                "known_hosts": sshd["known_hosts"], "ssh_config": None, "namespace": None, "python": PY}
    assert run_json(_device(host="10.9.9.9"), [PY, "-c", code], **resolved)["a"] == 1
    assert SSHLauncher(_device(), **resolved).run_json(["echo", "{}"]) == {}


def test_wrong_key_is_rejected(sshd):
    with pytest.raises(KitError, match=r"device box0 \(root@127.0.0.1:\d+\): SSH authentication failed"):
        connect(_device(key=sshd["wrong"]), **_opts(sshd))


def test_unknown_host_key_is_rejected(sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(KitError, match="host key unknown.*accept_new_host_keys"):
        connect(_device(), ssh_config=sshd["config"], known_hosts=str(empty))
    assert empty.read_text() == ""


def test_accept_new_host_keys_saves_the_key(sshd, tmp_path):
    kh = tmp_path / "sub" / "known_hosts"  # neither file nor folder exist yet
    connect(_device(), ssh_config=sshd["config"], known_hosts=str(kh), accept_new_host_keys=True).close()
    hostpub = (sshd["dir"] / "host_ed25519.pub").read_text().split()[1]
    assert kh.read_text().split() == [f"[127.0.0.1]:{sshd['port']}", "ssh-ed25519", hostpub]
    connect(_device(), ssh_config=sshd["config"], known_hosts=str(kh)).close()  # now known: strict mode passes


def test_refused_port_fails_fast_with_a_clear_error(sshd):
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(KitError, match=rf"device box0 \(root@127.0.0.1:{port}\): connection refused"):
        SSHLauncher(_device(port=port), **_opts(sshd), connect_timeout=3).connect()
    assert time.monotonic() - t0 < 30  # generous: only checks that it does not hang


def test_silent_port_times_out_with_a_clear_error(sshd):
    with socket.socket() as silent:  # accepts TCP (backlog) but never speaks SSH
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        with pytest.raises(KitError, match=r"device box0 .*no SSH answer within 1 s"):
            SSHLauncher(_device(port=silent.getsockname()[1]), **_opts(sshd), connect_timeout=1).connect()


def test_preflight_errors_before_any_worker(sshd, tmp_path):
    token = new_token()
    launcher = SSHLauncher(**_opts(sshd))
    with pytest.raises(KitError, match=r"box0 .*model path /nonexistent/llama does not exist on the host"):
        launcher.start(_device(model_path="/nonexistent/llama"), token)
    with pytest.raises(KitError, match="no config.json"):
        launcher.start(_device(model_path=str(tmp_path)), token)
    with pytest.raises(KitError, match=r"python interpreter '/no/such/python3' not found"):
        launcher.start(_device(python="/no/such/python3"), token)
    bare = shutil.which("python3", path="/usr/bin")
    if bare and subprocess.run([bare, "-c", "import edgeshard_kit"], capture_output=True, cwd="/").returncode != 0:
        with pytest.raises(KitError, match="edgeshard_kit is not installed"):
            launcher.start(_device(python=bare), token)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_worker_lifecycle(sshd, tmp_path):
    token = new_token()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    launcher = SSHLauncher(**_opts(sshd), bind="127.0.0.1", log_dir=str(tmp_path / "logs"))
    h = launcher.start(_device(model_path=str(ckpt)), token)
    try:
        assert (h.device, h.host) == ("box0", "127.0.0.1") and h.port > 0
        lines: list[str] = []
        h.follow(lines.append, interval=0.1)
        with socket.create_connection((h.host, h.port), 5) as s:  # the worker answers on its port
            s.sendall(b"not the kit's handshake\n" * 4)
        deadline = time.monotonic() + 20
        while not any("dropped connection" in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert any("dropped connection" in line for line in lines), lines  # streamed from the remote log
        assert "dropped connection" in h.log_tail(5)
        # The token went over SFTP into a private dir, and the worker removed its file once it had read it.
        assert not Path(h.remote_dir, "token").exists() and stat.S_IMODE(Path(h.remote_dir).stat().st_mode) == 0o700
        assert h.alive()
        proc = psutil.Process(h.pid)
        assert proc.pid == os.getpgid(h.pid) and "edgeshard_kit.runtime.worker" in " ".join(proc.cmdline())
        assert token.hex() not in h.log_tail(200)
    finally:
        h.stop()
    assert _gone(h.pid) and not h.alive()
    assert not Path(h.remote_dir).exists()  # token and logs removed from the host
    h.stop()  # idempotent
    assert (tmp_path / "logs" / "box0.log").exists()


COORDINATOR = """
import sys, time
from edgeshard_kit.runtime.protocol import new_token
from edgeshard_kit.runtime.ssh_launcher import SSHLauncher
from edgeshard_kit.testbed.inventory import Device
dev = Device(name="box0", type="cpu", memory_bytes=1 << 30, launch="ssh", host="box", python=sys.executable)
h = SSHLauncher(ssh_config=sys.argv[1], known_hosts=sys.argv[2], bind="127.0.0.1").start(dev, new_token())
print(h.pid, h.remote_dir, flush=True)
time.sleep(120)
"""


def test_coordinator_sigterm_stops_remote_worker(sshd):
    coord = subprocess.Popen([PY, "-c", COORDINATOR, sshd["config"], sshd["known_hosts"]], stdout=subprocess.PIPE,
                             text=True)
    try:
        pid_s, remote_dir = coord.stdout.readline().split()
        assert not _gone(int(pid_s))
        coord.send_signal(signal.SIGTERM)
        assert coord.wait(30) == 128 + signal.SIGTERM
    finally:
        if coord.poll() is None:
            coord.kill()
    assert _gone(int(pid_s)) and not Path(remote_dir).exists()


def test_cli_ssh_check(sshd, tmp_path, capsys):
    from edgeshard_kit.cli.main import main

    tb = tmp_path / "tb.yaml"
    tb.write_text(textwrap.dedent(f"""\
        name: sshcheck
        devices:
          - {{name: box0, type: cpu, memory: 1GiB, source: true, launch: ssh, host: box, python: {PY}}}
          - {{name: box1, type: cpu, memory: 1GiB, launch: ssh, host: box, python: {PY}, model_path: /nonexistent}}
        """))
    flags = ["--ssh-config", sshd["config"], "--known-hosts", sshd["known_hosts"]]
    assert main(["ssh", "check", str(tb), "--device", "box0", *flags]) == 0
    assert f"box0         ok    root@127.0.0.1:{sshd['port']}  python " in capsys.readouterr().out
    assert main(["ssh", "check", str(tb), *flags]) == 2
    out = capsys.readouterr().out
    assert "box1         FAIL  device box1" in out and "/nonexistent does not exist on the host" in out
