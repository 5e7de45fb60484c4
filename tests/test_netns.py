"""The emulated testbed (root): namespaces, addresses, TCP, sshd, cgroups, tc bandwidth, a device behind a gateway,
and a clean `down`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from edgeshard_kit.testbed import cgroups, netns, sshd
from edgeshard_kit.testbed.access import connect
from edgeshard_kit.testbed.inventory import load_testbed, testbed_from_dict
from edgeshard_kit.core.errors import KitError

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="the emulated testbed needs root (namespaces, cgroups, tc)")
HAVE_SSHD = pytest.mark.skipif(not os.path.exists("/usr/sbin/sshd"),
                               reason="openssh-server is not installed (`make sysdeps` as root installs it)")
CGROUP_V1 = pytest.mark.skipif(not os.path.exists("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
                               reason="the emulated testbed needs cgroup v1 (cpu, memory) at /sys/fs/cgroup")
pytestmark = [pytest.mark.root, ROOT_ONLY, HAVE_SSHD, CGROUP_V1]

SHAPED_MBPS = 20.0  # a -> c
TESTBED = {
    "name": "estest",
    "devices": [
        {"name": "a", "type": "edge", "memory": "256MiB", "source": True, "launch": "ssh", "address": "10.78.31.10",
         "cpu_quota": 0.5, "mem_limit": "768MiB"},
        {"name": "b", "type": "edge", "memory": "256MiB", "launch": "ssh", "cpu_quota": 1.0, "mem_limit": "1GiB"},
        {"name": "c", "type": "cloud", "memory": "1GiB", "cloud": True, "launch": "ssh", "address": "10.78.31.20"},
    ],
    "links": {"default": {"mbps": 200, "latency_ms": 0.0},
              "pairs": [{"src": "a", "dst": "c", "mbps": SHAPED_MBPS, "latency_ms": 0.0}]},
    "emulation": {"mode": "netns", "subnet": "10.78.31.0/24"},
}

# Receiver: counts bytes from the first to the last one (Mbps of payload), then acknowledges.
SERVER = r"""
import json, socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); n = first = 0; t0 = None
while True:
    b = c.recv(1 << 20)
    if not b:
        break
    if t0 is None:
        t0, first = time.perf_counter(), len(b)
    n += len(b)
t1 = time.perf_counter(); c.sendall(b"ok"); c.close()
print(json.dumps({"bytes": n, "mbps": (n - first) * 8 / (t1 - t0) / 1e6}), flush=True)
"""
CLIENT = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
c.sendall(b"x" * int(sys.argv[3])); c.shutdown(socket.SHUT_WR); assert c.recv(2) == b"ok"
"""


def _tcp_transfer(src_ns: str, dst_ns: str, addr: str, nbytes: int, port: int = 5901) -> dict:
    srv = subprocess.Popen(["ip", "netns", "exec", dst_ns, sys.executable, "-c", SERVER, addr, str(port)],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout.readline().strip() == "ready"
        subprocess.run(["ip", "netns", "exec", src_ns, sys.executable, "-c", CLIENT, addr, str(port), str(nbytes)],
                       check=True, timeout=30)
        return json.loads(srv.communicate(timeout=30)[0])
    finally:
        srv.kill()
        srv.wait()


def _leftovers(tb) -> list[str]:
    """Everything of this testbed still on the machine (empty after `down`)."""
    out = [f"namespace {n}" for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
           .stdout.split() if n.startswith(f"es-{tb.name}-")]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    out += [f"link {n}" for n in (netns.bridge_name(tb), *(netns.veth_name(tb, d.name) for d in tb.devices)) if f" {n}" in links]
    out += [f"cgroup {c}" for c in ("cpu", "memory", "cpuset")
            if (Path("/sys/fs/cgroup") / c / cgroups.CGROUP_DIR / tb.name).exists()]
    marker = str(netns.state_root() / tb.name)
    out += [f"process {p.pid}" for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    out += [f"state {marker}"] if Path(marker).exists() else []
    return out


@pytest.fixture(scope="module")
def tb(tmp_path_factory):
    path = tmp_path_factory.mktemp("tb") / "estest.yaml"
    path.write_text(yaml.safe_dump(TESTBED))
    testbed = load_testbed(path)
    netns.testbed_down(testbed)  # a previous crashed run
    netns.testbed_up(testbed)
    yield testbed
    netns.testbed_down(testbed)


def test_up_is_idempotent(tb):
    first = netns.load_state(tb)
    again = netns.testbed_up(tb)
    assert again.sshd_pids == first.sshd_pids and again.addresses == first.addresses
    assert again.addresses == {"a": "10.78.31.10", "b": "10.78.31.11", "c": "10.78.31.20"}  # b: auto


def _two_devices(tmp_path, name: str, subnet: str) -> tuple[dict, Path]:
    """Devices a and b of TESTBED (addresses automatic) under another name and subnet, written as <name>.yaml."""
    data = {**TESTBED, "name": name, "emulation": {"mode": "netns", "subnet": subnet},
            "devices": [{k: v for k, v in d.items() if k != "address"} for d in TESTBED["devices"][:2]],
            "links": {"default": {"mbps": 100, "latency_ms": 0.0}}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return data, path


def test_session_brings_a_testbed_up_for_a_block_and_leaves_one_that_was_up(tb, tmp_path):
    _, path = _two_devices(tmp_path, "essess", "10.78.33.0/24")
    fresh = load_testbed(path)
    with netns.session(fresh):
        assert netns.load_state(fresh) is not None and netns.launch_opts(fresh)["ssh"]["known_hosts"]
    assert _leftovers(fresh) == []
    with netns.session(tb):  # already up: it stays up, with the file's rates re-applied
        pass
    assert netns.load_state(tb) is not None
    assert netns.unavailable() is None


def _ssh_true(state, dev: str) -> subprocess.CompletedProcess:
    """OpenSSH's own client, by the testbed's ssh_config: the reference for "this device's sshd answers"."""
    return subprocess.run(["ssh", "-F", state.ssh_config, "-o", "ConnectTimeout=10", dev, "true"],
                          capture_output=True, text=True, timeout=60)


def test_a_leftover_state_is_brought_up_again_and_a_half_running_testbed_repaired(tmp_path):
    """state.json of a testbed that no longer runs (the host restarted, or the run that brought it up was killed:
    its sshd gone, its namespaces gone) is not "up": a session brings it up again, takes it down after; a testbed
    with one sshd killed is repaired in place and left up. OpenSSH's client says whether each device answers."""
    data, path = _two_devices(tmp_path, "esleft", "10.78.35.0/24")
    left = load_testbed(path)
    netns.testbed_down(left)
    try:
        netns.testbed_up(left)
        state = netns.load_state(left)
        sshd.kill_pids(sshd.kit_sshd_pids(Path(state.state_dir)))  # what a restart leaves: state.json only
        for ns in state.namespaces.values():
            subprocess.run(["ip", "netns", "del", ns], check=True)
        assert netns.not_running(left, state) is not None and netns.load_state(left) is not None
        with pytest.raises(KitError, match=f"esleft is not running .*`edgeshard testbed up {path}`"):
            netns.reshape(left)
        with pytest.raises(KitError, match=r"not running .*`netns\.testbed_up\(tb\)` for this testbed built in Python"):
            netns.reshape(testbed_from_dict(data, "esleft as built in code"))  # no file to name in the hint
        with netns.session(left):
            for dev in left.names:
                out = _ssh_true(netns.load_state(left), dev)
                assert out.returncode == 0, out.stderr
        assert _leftovers(left) == []  # the leftover became this session's testbed: down after it
        netns.testbed_up(left)
        state = netns.load_state(left)
        sshd.kill_pids([state.sshd_pids["b"]])  # one device's sshd killed under a running testbed
        assert _ssh_true(state, "b").returncode != 0
        assert netns.acquire(left) is False  # repaired, still its owner's
        assert netns.not_running(left, netns.load_state(left)) is None
        out = _ssh_true(netns.load_state(left), "b")
        assert out.returncode == 0, out.stderr
    finally:
        netns.testbed_down(left)
    assert _leftovers(left) == []


def test_namespaces_have_addresses_and_no_way_out(tb):
    for dev, addr in netns.addresses(tb).items():
        ns = netns.namespace_name(tb, dev)
        out = subprocess.run(["ip", "netns", "exec", ns, "ip", "-o", "-4", "addr", "show", "dev", "eth0"],
                             capture_output=True, text=True, check=True).stdout
        assert f"{addr}/24" in out
        routes = subprocess.run(["ip", "netns", "exec", ns, "ip", "route"], capture_output=True, text=True).stdout
        assert "default" not in routes and routes.strip() == f"10.78.31.0/24 dev eth0 proto kernel scope link src {addr}"
    # An address outside the subnet is unreachable from a namespace (no default route, no NAT).
    probe = "import socket\ntry:\n socket.create_connection(('192.0.2.1', 80), timeout=2)\nexcept OSError as e:\n print(e.errno)"
    out = subprocess.run(["ip", "netns", "exec", "es-estest-a", sys.executable, "-c", probe],
                         capture_output=True, text=True, timeout=20).stdout.strip()
    assert out == "101"  # ENETUNREACH


def test_tcp_between_namespaces_and_shaped_bandwidth(tb):
    got = _tcp_transfer("es-estest-a", "es-estest-c", "10.78.31.20", int(SHAPED_MBPS * 1e6 / 8))  # ~1 s
    # Payload goodput sits a few % under the link rate (TCP/IP/Ethernet headers count against it).
    assert abs(got["mbps"] - SHAPED_MBPS) / SHAPED_MBPS < 0.15, got
    back = _tcp_transfer("es-estest-c", "es-estest-a", "10.78.31.10", 4_000_000)  # c -> a: the 200 Mbps default
    assert back["mbps"] > 1.5 * SHAPED_MBPS, back


def test_sshd_answers_openssh_and_paramiko(tb):
    import paramiko

    st = netns.load_state(tb)
    out = subprocess.run(["ssh", "-F", st.ssh_config, "b", "cat /proc/self/cgroup"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert f"/{cgroups.CGROUP_DIR}/estest/b" in out.stdout  # processes started by sshd land in the device's cgroup
    info = netns.resolve_ssh(tb, "c")
    assert info["host"] == "10.78.31.20" and info["port"] == 22 and info["user"] == "root"
    client = paramiko.SSHClient()
    client.load_host_keys(info["known_hosts"])
    client.set_missing_host_key_policy(paramiko.RejectPolicy())  # the host key must be known already
    client.connect(info["host"], port=info["port"], username=info["user"], key_filename=info["key"],
                   look_for_keys=False, allow_agent=False, timeout=10)
    try:
        _, stdout, _ = client.exec_command("true; echo $?")
        assert stdout.read().decode().strip() == "0"
        assert stdout.channel.recv_exit_status() == 0
    finally:
        client.close()


def test_cfs_limits_keep_the_share_within_the_kernel_minimum():
    assert cgroups.cfs_limits(None) == (cgroups.CFS_PERIOD_US, -1)
    for q in (0.05, 0.1, 0.25, 0.5, 1.0, 2.5):
        period, quota = cgroups.cfs_limits(q)
        assert quota >= 1000 and period >= cgroups.CFS_PERIOD_US and quota / period == pytest.approx(q, rel=0.01)


def test_cgroup_limits(tb):
    base = Path("/sys/fs/cgroup")
    a_cpu, a_mem = (base / c / cgroups.CGROUP_DIR / "estest" / "a" for c in ("cpu", "memory"))
    period = int((a_cpu / "cpu.cfs_period_us").read_text())
    assert period == cgroups.CFS_PERIOD_US and int((a_cpu / "cpu.cfs_quota_us").read_text()) == period // 2
    assert int((a_mem / "memory.limit_in_bytes").read_text()) == 768 * 2**20
    assert int((base / "cpu" / cgroups.CGROUP_DIR / "estest" / "c" / "cpu.cfs_quota_us").read_text()) == -1
    st = netns.testbed_status(tb)
    assert st["devices"]["a"]["cpu_quota"] == 0.5 and st["devices"]["a"]["sshd_pid"]
    assert st["devices"]["a"]["mem_limit_bytes"] == 768 * 2**20
    # each shaped link: an htb class (classification) with a tbf leaf metering it at the link's rate
    assert any("tbf" in line and "20Mbit" in line for line in st["devices"]["a"]["qdiscs"]), st["devices"]["a"]
    sshd_pid = st["devices"]["a"]["sshd_pid"]
    assert str(sshd_pid) in (a_cpu / "cgroup.procs").read_text().split()


def test_down_removes_everything_also_after_a_crash(tb):
    st = netns.load_state(tb)
    # A long-running process started over SSH (like a worker) must go with the testbed.
    out = subprocess.run(["ssh", "-F", st.ssh_config, "a", "nohup sleep 300 >/dev/null 2>&1 & echo $!"],
                         capture_output=True, text=True, check=True, timeout=30)
    sleeper = int(out.stdout)
    assert psutil.pid_exists(sleeper)
    assert _leftovers(tb)
    netns.testbed_down(tb)
    assert _leftovers(tb) == []
    assert not psutil.pid_exists(sleeper)
    with pytest.raises(KitError, match="is not up"):
        netns.resolve_ssh(tb, "a")
    # After a crash that lost the state dir, `down` still finds the kit's namespaces, cgroups and sshd.
    netns.testbed_up(tb)
    shutil.rmtree(netns.state_root() / tb.name)
    netns.testbed_down(tb)
    assert _leftovers(tb) == []



GATEWAY_TESTBED = {
    "name": "esgwnet",
    "devices": [
        {"name": "a", "type": "edge", "memory": "256MiB", "source": True, "launch": "ssh", "address": "10.78.38.10"},
        {"name": "g", "type": "edge", "memory": "256MiB", "launch": "ssh", "address": "10.78.38.11"},
        {"name": "f", "type": "edge", "memory": "256MiB", "launch": "ssh", "via": "g"},
    ],
    "links": {"default": {"mbps": 200, "latency_ms": 0.0},
              "pairs": [{"src": "g", "dst": "f", "mbps": SHAPED_MBPS}, {"src": "f", "dst": "a", "mbps": SHAPED_MBPS}]},
    "emulation": {"mode": "netns", "subnet": "10.78.38.0/24", "gateways": {"g": "10.78.39.0/24"}},
}


def test_a_device_behind_a_gateway_is_reached_only_through_it(tmp_path):
    path = tmp_path / "esgwnet.yaml"
    path.write_text(yaml.safe_dump(GATEWAY_TESTBED))
    gtb = load_testbed(path)
    netns.testbed_down(gtb)
    try:
        st = netns.testbed_up(gtb)
        assert netns.testbed_up(gtb).sshd_pids == st.sshd_pids  # idempotent, also with a gateway
        assert netns.addresses(gtb) == {"a": "10.78.38.10", "g": "10.78.38.11", "f": "10.78.39.10"}  # f: auto
        assert st.via == {"f": "g"} and netns.inner_address(gtb, "g") == "10.78.39.1"
        ns_f = netns.namespace_name(gtb, "f")
        routes = subprocess.run(["ip", "netns", "exec", ns_f, "ip", "route"], capture_output=True, text=True).stdout
        assert "default" not in routes and "10.78.38.0/24 via 10.78.39.1 dev eth0" in routes
        host_routes = subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
        assert f"10.78.39.0/24 via 10.78.38.11 dev {netns.bridge_name(gtb)}" in host_routes
        probe = "import socket\ntry:\n socket.create_connection(('192.0.2.1', 80), timeout=2)\nexcept OSError as e:\n print(e.errno)"
        out = subprocess.run(["ip", "netns", "exec", ns_f, sys.executable, "-c", probe], capture_output=True,
                             text=True, timeout=20).stdout.strip()
        assert out == "101"  # ENETUNREACH: behind the gateway there is no way out either
        # OpenSSH: through the jump host (ProxyJump g in ssh_config) f answers; directly its sshd refuses.
        ssh = subprocess.run(["ssh", "-F", st.ssh_config, "f", "echo $SSH_CONNECTION"], capture_output=True,
                             text=True, timeout=30)
        assert ssh.returncode == 0 and ssh.stdout.split()[0] == "10.78.39.1", ssh.stderr  # the client is g
        direct = subprocess.run(["ssh", "-F", st.ssh_config, "-o", "ProxyJump=none", "f", "true"],
                                capture_output=True, text=True, timeout=30)
        assert direct.returncode == 255 and "Permission denied" in direct.stderr
        # The kit takes the same path.
        with connect(gtb.device("f"), **netns.resolve_ssh(gtb, "f")) as conn:
            assert [h.where for h in conn.target.hop.path()] == ["root@10.78.38.11:22", "root@10.78.39.10:22"]
            assert conn.run("echo $SSH_CONNECTION")[1].split()[0] == "10.78.39.1"
        # Links are shaped once, at their sender: g -> f on g's inner bridge, f -> a at f, a -> f forwarded free.
        ns_a, ns_g = netns.namespace_name(gtb, "a"), netns.namespace_name(gtb, "g")
        for src, dst, addr in ((ns_g, ns_f, "10.78.39.10"), (ns_f, ns_a, "10.78.38.10")):
            got = _tcp_transfer(src, dst, addr, int(SHAPED_MBPS * 1e6 / 8))["mbps"]
            assert abs(got - SHAPED_MBPS) / SHAPED_MBPS < 0.15, (src, dst, got)
        assert _tcp_transfer(ns_a, ns_f, "10.78.39.10", 4_000_000)["mbps"] > 1.5 * SHAPED_MBPS
    finally:
        netns.testbed_down(gtb)
    assert _leftovers(gtb) == []
    assert "10.78.39.0/24" not in subprocess.run(["ip", "route"], capture_output=True, text=True).stdout


def test_via_and_gateways_are_checked_with_the_file_and_field():
    def err(change) -> str:
        data = yaml.safe_load(yaml.safe_dump(GATEWAY_TESTBED))
        change(data)
        with pytest.raises(KitError) as e:
            testbed_from_dict(data, "gw.yaml")
        return str(e.value)

    assert err(lambda d: d["emulation"].pop("gateways")) == \
        "gw.yaml: devices[2].via: no subnet behind g: add emulation.gateways: {g: 10.77.1.0/24}"
    assert err(lambda d: d["devices"][2].update(via="x")) == "gw.yaml: emulation.gateways.g: no device has via: g"
    assert "devices[2].via: only the emulated testbed" in err(lambda d: d.update(emulation={"mode": "app"}))
    assert "emulation.gateways.g: 10.78.38.0/25 overlaps emulation.subnet" in \
        err(lambda d: d["emulation"].update(gateways={"g": "10.78.38.0/25"}))
    assert "devices[2].address: 10.78.38.50 is not a host address of 10.78.39.0/24 (the subnet behind g)" in \
        err(lambda d: d["devices"][2].update(address="10.78.38.50"))
    assert "devices[1].via: gateway f is itself behind g (one level of gateways)" in \
        err(lambda d: d["devices"][1].update(via="f"))
    tb = testbed_from_dict(GATEWAY_TESTBED, "gw.yaml")
    assert testbed_from_dict(tb.to_dict(), "again").gateways == tb.gateways == (("g", "10.78.39.0/24"),)
    assert tb.with_devices([tb.device("a"), tb.device("g")]).gateways == ()  # no device behind g: no subnet


# ---- `down` without a usable state.json or with an edited inventory (issue 17, item 8) -----------------------
SMALL_TESTBED = {
    "name": "esbroken",
    "devices": [
        {"name": "a", "type": "edge", "memory": "256MiB", "source": True, "launch": "ssh", "cpu_quota": 0.5},
        {"name": "b", "type": "edge", "memory": "256MiB", "launch": "ssh", "mem_limit": "512MiB"},
        {"name": "c", "type": "cloud", "memory": "1GiB", "launch": "ssh", "cpus": [0]},
    ],
    "links": {"default": {"mbps": 100, "latency_ms": 0.0}},
    "emulation": {"mode": "netns", "subnet": "10.78.41.0/24"},
}


def _cli(*argv: str) -> tuple[int, str]:
    """(exit code, stderr) of the real `edgeshard` command."""
    res = subprocess.run([sys.executable, "-m", "edgeshard_kit", *argv], capture_output=True, text=True, timeout=300)
    return res.returncode, res.stderr


def _small(tmp_path, **change):
    path = tmp_path / "esbroken.yaml"
    path.write_text(yaml.safe_dump({**SMALL_TESTBED, **change}))
    return path, load_testbed(path)


UNREADABLE = {"empty": b"", "truncated": b'{"name": "esbroken", "namespa', "not-utf8": b"\xff\xfe garbage",
              "a-list": b"[]", "wrong-field": b'{"name": 5}'}


def test_down_cleans_up_by_the_kits_names_when_state_json_is_unreadable(tmp_path):
    """Every kind of broken state.json: each reader names the file in one line, `down` goes by the kit's names
    (one `up` for all of them: `down` reads the state through `_readable_state`, the same for each; the
    last one is taken down through the command line)."""
    path, tb = _small(tmp_path)
    netns.testbed_down(tb)
    netns.testbed_up(tb)
    assert len([x for x in _leftovers(tb) if x.startswith("namespace")]) == 3
    state = netns.state_root() / tb.name / "state.json"
    for name, content in UNREADABLE.items():
        state.write_bytes(content)
        with pytest.raises(KitError) as e:  # every reader of the state names the file, in one line
            netns.resolve_ssh(tb, "a")
        assert str(state) in str(e.value) and "\n" not in str(e.value) and "testbed down" in str(e.value), name
        assert netns._readable_state(tb) is None, name
        assert len([x for x in _leftovers(tb) if x.startswith("namespace")]) == 3, name
    rc, err = _cli("testbed", "down", str(path))
    assert rc == 0, err
    assert _leftovers(tb) == []


def test_down_after_the_inventory_was_edited(tmp_path):
    """A device removed from the file between up and down goes too: state.json lists it; without state.json the
    alias on its links names it; its cgroups lie under the testbed's."""
    path, tb = _small(tmp_path)
    netns.testbed_down(tb)
    for lose_state in (False, True):
        netns.testbed_up(tb)
        _, edited = _small(tmp_path, devices=SMALL_TESTBED["devices"][:2])  # c removed
        if lose_state:
            (netns.state_root() / tb.name / "state.json").write_text("")
        rc, err = _cli("testbed", "down", str(path))
        assert rc == 0, err
        assert _leftovers(tb) == [], lose_state
        path.write_text(yaml.safe_dump(SMALL_TESTBED))


def test_state_json_is_written_atomically(tmp_path, monkeypatch):
    """`up` writes state.json through a temporary file renamed over it: a reader never sees a part of one."""
    from edgeshard_kit.core import io as kio

    calls = []
    real = kio.write_text_atomic
    monkeypatch.setattr(netns, "write_text_atomic", lambda text, p: calls.append(p) or real(text, p))
    path, tb = _small(tmp_path, name="esatomic", emulation={"mode": "netns", "subnet": "10.78.42.0/24"})
    netns.testbed_down(tb)
    try:
        st = netns.testbed_up(tb)
        assert calls == [netns.state_root() / tb.name / "state.json"]
        assert netns.load_state(tb) == st
        assert not list((netns.state_root() / tb.name).glob(".state.json.*"))  # no temporary file left
    finally:
        netns.testbed_down(tb)
    assert _leftovers(tb) == []
