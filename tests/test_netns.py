"""The emulated testbed (root): namespaces, addresses, TCP, sshd, cgroups, tc bandwidth, and a clean `down`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from edgeshard_kit.testbed import cgroups, netns
from edgeshard_kit.testbed.inventory import load_testbed
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


def test_session_brings_a_testbed_up_for_a_block_and_leaves_one_that_was_up(tb, tmp_path):
    data = {**TESTBED, "name": "essess", "emulation": {"mode": "netns", "subnet": "10.78.33.0/24"},
            "devices": [{k: v for k, v in d.items() if k != "address"} for d in TESTBED["devices"][:2]],
            "links": {"default": {"mbps": 100, "latency_ms": 0.0}}}
    path = tmp_path / "essess.yaml"
    path.write_text(yaml.safe_dump(data))
    fresh = load_testbed(path)
    with netns.session(fresh):
        assert netns.load_state(fresh) is not None and netns.launch_opts(fresh)["ssh"]["known_hosts"]
    assert _leftovers(fresh) == []
    with netns.session(tb):  # already up: it stays up, with the file's rates re-applied
        pass
    assert netns.load_state(tb) is not None
    assert netns.unavailable() is None


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
    assert any("20Mbit" in line for line in st["devices"]["a"]["classes"])
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

