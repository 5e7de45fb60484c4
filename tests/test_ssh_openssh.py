"""The kit's SSH against OpenSSH itself (root): the same ssh_config must connect, or fail, the same way.

Three throwaway sshd servers on free ports of 127.0.0.1 (own host keys, one client key, LogLevel DEBUG1 so
their logs show each direct-tcpip forward). Each case writes an ssh_config, runs the real
`ssh -F cfg -o BatchMode=yes HOST true`, then connects with the kit (`testbed.access.connect`) and compares.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import paramiko
import pytest

from edgeshard_kit.cli.main import main
from edgeshard_kit.core.errors import KitError
from edgeshard_kit.testbed import sshconfig
from edgeshard_kit.testbed.access import connect, resolve_target
from edgeshard_kit.testbed.inventory import Device
from helpers import free_port, keygen

SSHD = "/usr/sbin/sshd"
WHY_SKIP = ("the throwaway sshd servers log in as root: needs root" if os.geteuid() != 0 else
            "needs /usr/sbin/sshd, ssh and ssh-keygen (apt-get install openssh-server; make sysdeps)"
            if not os.path.exists(SSHD) or not shutil.which("ssh") or not shutil.which("ssh-keygen") else None)
PY = sys.executable
NAMES = ("a", "b", "c")

# A ProxyCommand: logs its arguments (to compare the token expansion), then relays stdin/stdout to host:port.
RELAY = r"""
import os, select, socket, sys
*args, log = sys.argv[1:]
with open(log, "a") as f:
    f.write(" ".join(args) + "\n")
s = socket.create_connection((args[0], int(args[1])), 10)
while True:
    ready, _, _ = select.select([0, s], [], [], 60)  # idle for a minute: give up
    if not ready:
        break
    if 0 in ready:
        data = os.read(0, 65536)
        if not data:
            break
        s.sendall(data)
    if s in ready:
        data = s.recv(65536)
        if not data:
            break
        os.write(1, data)
"""


def test_jump_specs_and_tokens_parse_as_in_openssh():
    assert sshconfig.parse_jump("gw") == (None, "gw", None)
    assert sshconfig.parse_jump("admin@gw.example.org:2222") == ("admin", "gw.example.org", 2222)
    assert sshconfig.parse_jump("ssh://u@h:5") == ("u", "h", 5)
    assert sshconfig.parse_jump("[fe80::1]:22") == (None, "fe80::1", 22)
    tokens = {"h": "10.0.0.5", "p": "22", "r": "nvidia"}
    assert sshconfig.percent_expand("nc %h %p # %r 100%%", tokens, "x") == "nc 10.0.0.5 22 # nvidia 100%"
    with pytest.raises(KitError, match="host orin1: ProxyCommand: token %C is not expanded by the kit"):
        sshconfig.percent_expand("nc %C", tokens, "host orin1: ProxyCommand")
    assert not (sshconfig.HONOURED & sshconfig.IGNORED) and not (set(sshconfig.WHY_REFUSED) & sshconfig.HONOURED)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """sshd a, b, c: {name: {port, hostkey line, log}}, the client key and a known_hosts naming all three."""
    if WHY_SKIP:
        pytest.skip(WHY_SKIP)
    d = tmp_path_factory.mktemp("openssh")
    key = keygen(d / "id_ed25519")
    (d / "authorized_keys").write_text((d / "id_ed25519.pub").read_text())
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    out, procs = {"dir": d, "key": str(key)}, []
    for name in NAMES:
        port, host_key = free_port(), keygen(d / f"host_{name}")
        (d / f"sshd_{name}").write_text(textwrap.dedent(f"""\
            Port {port}
            ListenAddress 127.0.0.1
            HostKey {host_key}
            PidFile {d / f'sshd_{name}.pid'}
            AuthorizedKeysFile {d / 'authorized_keys'}
            PermitRootLogin prohibit-password
            StrictModes no
            UsePAM no
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            AllowTcpForwarding yes
            LogLevel DEBUG1
            MaxStartups 50:30:100
            """))
        log = d / f"sshd_{name}.log"
        procs.append(subprocess.Popen([SSHD, "-D", "-f", str(d / f"sshd_{name}"), "-E", str(log)]))
        pub = (d / f"host_{name}.pub").read_text().split()
        out[name] = {"port": port, "hostkey": f"{pub[0]} {pub[1]}", "log": log}
    (d / "known_hosts").write_text("".join(f"[127.0.0.1]:{out[n]['port']} {out[n]['hostkey']}\n" for n in NAMES))
    out["known_hosts"] = str(d / "known_hosts")
    deadline = time.monotonic() + 10
    for name in NAMES:
        while True:
            try:
                socket.create_connection(("127.0.0.1", out[name]["port"]), 0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"sshd {name} did not start: {out[name]['log'].read_text()[-500:]}")
                time.sleep(0.05)
    yield out
    for p in procs:
        p.terminate()
        p.wait(5)


def _config(servers, tmp_path: Path, body: str, known_hosts: str | None = None) -> str:
    """ssh_config = `body` + per-server Host blocks a/b/c + defaults last (ssh takes the first value it reads)."""
    blocks = "".join(f"Host {n}\n  HostName 127.0.0.1\n  Port {servers[n]['port']}\n" for n in NAMES)
    cfg = tmp_path / "ssh_config"
    cfg.write_text(textwrap.dedent(body) + blocks + textwrap.dedent(f"""\
        Host *
          User root
          IdentityFile {servers['key']}
          IdentitiesOnly yes
          UserKnownHostsFile {known_hosts or servers['known_hosts']}
          GlobalKnownHostsFile /dev/null
          StrictHostKeyChecking yes
          ConnectTimeout 5
        """))
    return str(cfg)


def openssh(cfg: str, host: str) -> subprocess.CompletedProcess:
    """The reference: OpenSSH's own client, no agent, no prompts."""
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    return subprocess.run(["ssh", "-F", cfg, "-o", "BatchMode=yes", host, "true"], capture_output=True, text=True,
                          timeout=60, env=env, stdin=subprocess.DEVNULL)


def kit(cfg: str, host: str, **opts) -> str | None:
    """None when the kit connects and runs `true`, else its error line."""
    dev = Device(name="dev", type="cpu", memory_bytes=1 << 30, launch="ssh", host=host, python=PY)
    try:
        with connect(dev, ssh_config=cfg, **opts) as conn:
            assert conn.run(["true"], 30)[0] == 0
        return None
    except KitError as e:
        return str(e)


def _agree(cfg: str, host: str, connects: bool, **opts) -> str | None:
    ref, got = openssh(cfg, host), kit(cfg, host, **opts)
    assert (ref.returncode == 0) is connects, ref.stderr
    assert (got is None) is connects, got
    return got


@pytest.fixture(autouse=True)
def _no_agent(monkeypatch):
    """The reference ssh runs without an agent: so does the kit."""
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


def _forwards(servers, name: str, since: int, port: int) -> int:
    """How many direct-tcpip forwards to 127.0.0.1:port sshd `name` logged after byte `since` of its log."""
    text = servers[name]["log"].read_bytes()[since:].decode(errors="replace")
    return text.count(f"target 127.0.0.1 port {port}")


def _log_size(servers, name: str) -> int:
    return servers[name]["log"].stat().st_size


@pytest.mark.root
def test_include_finds_a_host_in_an_included_file(servers, tmp_path):
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "orin.conf").write_text(f"Host orin1\n  HostName 127.0.0.1\n  Port {servers['a']['port']}\n")
    cfg = _config(servers, tmp_path, f"Include {tmp_path}/conf.d/*.conf\n")
    assert paramiko.SSHConfig.from_path(cfg).lookup("orin1")["hostname"] == "orin1"  # paramiko alone: not found
    _agree(cfg, "orin1", connects=True)


@pytest.mark.root
def test_host_key_alias_names_the_known_hosts_entry(servers, tmp_path):
    kh = tmp_path / "kh_alias"
    kh.write_text(f"labhost {servers['a']['hostkey']}\n")  # keyed by the alias only, not [127.0.0.1]:port
    body = f"Host lab\n  HostName 127.0.0.1\n  Port {servers['a']['port']}\n  HostKeyAlias labhost\n"
    _agree(_config(servers, tmp_path, body, known_hosts=str(kh)), "lab", connects=True)
    kh.write_text(f"labhost {servers['b']['hostkey']}\n")  # another host's key under the alias: both refuse
    err = _agree(_config(servers, tmp_path, body, known_hosts=str(kh)), "lab", connects=False)
    assert "host key differs" in err and "ssh-keygen -R labhost" in err


@pytest.mark.root
def test_proxyjump_to_a_missing_jump_host_fails_as_in_openssh(servers, tmp_path):
    dead = free_port()  # nothing listens there
    body = f"Host far\n  HostName 127.0.0.1\n  Port {servers['a']['port']}\n  ProxyJump root@127.0.0.1:{dead}\n"
    err = _agree(_config(servers, tmp_path, body), "far", connects=False)
    assert f"jump host 127.0.0.1 (root@127.0.0.1:{dead}): connection refused" in err
    assert f"root@127.0.0.1:{servers['a']['port']} via root@127.0.0.1:{dead}" in err
    body = f"Host far\n  HostName 127.0.0.1\n  Port {servers['a']['port']}\n  ProxyJump nosuchjump.invalid\n"
    err = _agree(_config(servers, tmp_path, body), "far", connects=False)
    assert "jump host nosuchjump.invalid" in err and "cannot resolve" in err


@pytest.mark.root
def test_proxyjump_goes_through_the_jump_host(servers, tmp_path):
    body = f"Host far\n  HostName 127.0.0.1\n  Port {servers['b']['port']}\n  ProxyJump a\n"
    cfg = _config(servers, tmp_path, body)
    for who in ("openssh", "kit"):
        before = _log_size(servers, "a")
        assert openssh(cfg, "far").returncode == 0 if who == "openssh" else kit(cfg, "far") is None
        time.sleep(0.2)  # sshd's children write their log lines asynchronously
        assert _forwards(servers, "a", before, servers["b"]["port"]) == 1, who


@pytest.mark.root
def test_two_hop_proxyjump_chain(servers, tmp_path):
    body = f"Host far\n  HostName 127.0.0.1\n  Port {servers['c']['port']}\n  ProxyJump a,b\n"
    cfg = _config(servers, tmp_path, body)
    t = resolve_target(Device(name="dev", type="cpu", memory_bytes=1, launch="ssh", host="far"), ssh_config=cfg)
    assert [h.port for h in t.hop.path()] == [servers[n]["port"] for n in NAMES]  # a, then b, then c
    sizes = {n: _log_size(servers, n) for n in "ab"}
    _agree(cfg, "far", connects=True)
    time.sleep(0.2)
    # Each tool went a -> b -> c once: a forwarded to b twice, b to c twice (OpenSSH, then the kit).
    assert _forwards(servers, "a", sizes["a"], servers["b"]["port"]) == 2
    assert _forwards(servers, "b", sizes["b"], servers["c"]["port"]) == 2


@pytest.mark.root
def test_unknown_host_key_at_the_jump_host_is_refused(servers, tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{servers['b']['port']} {servers['b']['hostkey']}\n")  # the target's key only
    body = f"Host far\n  HostName 127.0.0.1\n  Port {servers['b']['port']}\n  ProxyJump a\n"
    err = _agree(_config(servers, tmp_path, body, known_hosts=str(kh)), "far", connects=False)
    assert f"jump host a (root@127.0.0.1:{servers['a']['port']}): host key unknown" in err
    assert kh.read_text().count("\n") == 1  # nothing was added


@pytest.mark.root
def test_proxycommand_tokens_expand_as_in_openssh(servers, tmp_path):
    relay, log = tmp_path / "relay.py", tmp_path / "proxy.log"
    relay.write_text(RELAY)
    body = (f"Host pc\n  HostName 127.0.0.1\n  Port {servers['a']['port']}\n  HostKeyAlias [127.0.0.1]:"
            f"{servers['a']['port']}\n  ProxyCommand {PY} {relay} %h %p %r %n %k %% {log}\n")
    cfg = _config(servers, tmp_path, body)
    assert sshconfig.resolve_hop("pc", cfg).proxy_command.startswith(f"{PY} {relay} 127.0.0.1 ")
    _agree(cfg, "pc", connects=True)
    ours, theirs = log.read_text().splitlines()[::-1]  # OpenSSH ran first
    assert ours == theirs == f"127.0.0.1 {servers['a']['port']} root pc [127.0.0.1]:{servers['a']['port']} %"


@pytest.mark.root
def test_match_blocks_apply_as_in_openssh(servers, tmp_path):
    flag = tmp_path / "flag"
    body = (f'Match originalhost mbox exec "test -e {flag}"\n  Port {servers["a"]["port"]}\n'
            f"Host mbox\n  HostName 127.0.0.1\n  Port {free_port()}\n")
    cfg = _config(servers, tmp_path, body)
    _agree(cfg, "mbox", connects=False)  # no flag: the Match block does not apply, the dead port does
    flag.write_text("")
    _agree(cfg, "mbox", connects=True)


@pytest.mark.root
def test_accept_new_from_the_config_writes_what_openssh_writes(servers, tmp_path):
    body = f"Host new\n  HostName 127.0.0.1\n  Port {servers['c']['port']}\n  StrictHostKeyChecking accept-new\n"
    files = {}
    for who in ("openssh", "kit"):
        kh = tmp_path / f"kh_{who}"
        cfg = _config(servers, tmp_path, body, known_hosts=str(kh))
        assert (openssh(cfg, "new").returncode == 0) if who == "openssh" else kit(cfg, "new") is None
        files[who] = kh.read_text()
    assert files["kit"] == files["openssh"] == f"[127.0.0.1]:{servers['c']['port']} {servers['c']['hostkey']}\n"


@pytest.mark.root
def test_algorithm_lists_are_honoured_or_refused(servers, tmp_path):
    body = f"Host ctr\n  HostName 127.0.0.1\n  Port {servers['a']['port']}\n  Ciphers aes256-ctr\n"
    cfg = _config(servers, tmp_path, body)
    _agree(cfg, "ctr", connects=True)
    dev = Device(name="dev", type="cpu", memory_bytes=1, launch="ssh", host="ctr")
    with connect(dev, ssh_config=cfg) as conn:
        assert conn.client.get_transport().remote_cipher == "aes256-ctr"
    body = f"Host cha\n  HostName 127.0.0.1\n  Port {servers['a']['port']}\n  Ciphers chacha20-poly1305@openssh.com\n"
    cfg = _config(servers, tmp_path, body)
    assert openssh(cfg, "cha").returncode == 0
    assert f"{cfg} line 4: Ciphers chacha20-poly1305@openssh.com cannot be honoured" in kit(cfg, "cha")


@pytest.mark.root
def test_no_directive_is_ignored_silently(servers, tmp_path, capsys):
    body = (f"Host fwd\n  HostName 127.0.0.1\n  Port {servers['a']['port']}\n  ForwardAgent yes\n"
            f"  LocalForward 5999 127.0.0.1:22\n  SendEnv LANG\n"   # session features: safe to ignore
            f"Host bound\n  HostName 127.0.0.1\n  Port {servers['a']['port']}\n  BindAddress 127.0.0.1\n")
    cfg = _config(servers, tmp_path, body)
    _agree(cfg, "fwd", connects=True)
    assert openssh(cfg, "bound").returncode == 0
    err = kit(cfg, "bound")
    assert err == (f"device dev: host bound: {cfg} line 10: BindAddress 127.0.0.1 cannot be honoured by the kit's "
                   "SSH (the kit does not choose the local address); remove it for this host (docs/ssh.md lists "
                   "what the kit honours)")
    tb = tmp_path / "tb.yaml"
    tb.write_text(f"name: t\ndevices:\n  - {{name: dev, type: cpu, memory: 1GiB, source: true, launch: ssh, "
                  f"ssh_alias: bound, python: {PY}}}\n")
    assert main(["ssh", "check", str(tb), "--ssh-config", cfg]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "FAIL" in out[0] and "BindAddress" in out[0] and cfg in out[0]


@pytest.mark.root
def test_without_ssh_paramiko_parses_and_refuses_what_it_cannot_honour(servers, tmp_path, monkeypatch):
    monkeypatch.setattr(sshconfig, "SSH_PROGRAM", "edgeshard-no-such-ssh")
    assert sshconfig.ssh_available() is None
    plain = _config(servers, tmp_path, "")
    assert kit(plain, "a") is None  # Host blocks, HostName, Port, User, IdentityFile, known_hosts: fine
    (tmp_path / "inc.conf").write_text("Host x\n  Port 1\n")
    cfg = _config(servers, tmp_path, f"Include {tmp_path}/inc.conf\n")
    assert f"{cfg} line 1: Include needs OpenSSH's `ssh -G`" in kit(cfg, "a")
    body = f"Host far\n  HostName 127.0.0.1\n  Port {servers['b']['port']}\n  ProxyJump a\n"
    cfg = _config(servers, tmp_path, body)
    err = kit(cfg, "far")
    assert f"host far: {cfg} line 4: ProxyJump a cannot be honoured" in err and "install openssh-client" in err


@pytest.mark.root
def test_a_revoked_host_key_is_refused_as_in_openssh(servers, tmp_path):
    kh = tmp_path / "known_hosts"
    line = f"[127.0.0.1]:{servers['a']['port']} {servers['a']['hostkey']}\n"
    kh.write_text(line + f"@revoked * {servers['a']['hostkey']}\n")  # paramiko alone would skip the marker line
    err = _agree(_config(servers, tmp_path, "", known_hosts=str(kh)), "a", connects=False)
    assert "is marked @revoked" in err
