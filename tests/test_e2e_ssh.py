"""End to end on the emulated testbed (root): up, profile over SSH, probe, plan, deploy over SSH, same tokens, down;
and the same through a jump host (testbed/emulated-gateway.yaml: a device reachable only through another)."""

import math
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import yaml

from edgeshard_kit.cli.main import main
from edgeshard_kit.testbed import cgroups, netns
from edgeshard_kit.runtime import probe
from edgeshard_kit.model.generate import generate_split
from edgeshard_kit.runtime.deployment import deploy
from edgeshard_kit.planning.dp import solve
from edgeshard_kit.planning.build import Workload, build_problem
from edgeshard_kit.profiling.profile import Profile
from edgeshard_kit.runtime.ssh_launcher import SSHLauncher
from edgeshard_kit.testbed.inventory import load_testbed, testbed_from_dict

pytestmark = [
    pytest.mark.root, pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="the emulated testbed needs root (namespaces, cgroups, tc)"),
    pytest.mark.skipif(not os.path.exists("/usr/sbin/sshd"),
                       reason="openssh-server is not installed (`make sysdeps` as root installs it)"),
    pytest.mark.skipif(not os.path.exists("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
                       reason="the emulated testbed needs cgroup v1 (cpu, memory) at /sys/fs/cgroup"),
]

PROMPTS = ["hello world", "the cat sat"]
NEW = 6
# Two edge devices and a cloud server behind a slower link; the model (12 MiB) does not fit one edge device.
TESTBED = {
    "name": "ese2e",
    "devices": [
        {"name": "a", "type": "edge-a", "memory": "7MiB", "source": True, "launch": "ssh",
         "cpu_quota": 1.0, "mem_limit": "2GiB"},
        {"name": "b", "type": "edge-b", "memory": "7MiB", "launch": "ssh", "cpu_quota": 1.0, "mem_limit": "2GiB"},
        {"name": "c", "type": "cloud", "memory": "1GiB", "launch": "ssh", "cloud": True, "mem_limit": "2GiB"},
    ],
    "links": {"default": {"mbps": 200, "latency_ms": 0.0},
              "pairs": [{"src": "a", "dst": "c", "mbps": 40}, {"src": "c", "dst": "a", "mbps": 40}]},
    "emulation": {"mode": "netns", "subnet": "10.78.32.0/24"},
}


def _profile_over_ssh(tb, dev, ckpt) -> Profile:
    """`edgeshard profile ... --out -` run by the device's sshd (so inside its namespace and cgroups)."""
    ssh = netns.resolve_ssh(tb, dev)
    argv = [ssh["python"], "-m", "edgeshard_kit", "profile", "--model", str(ckpt), "--device-type", dev.type,
            "--prompt-len", "8", "--kv-lens", "8,16", "--repeats", "2", "--warmup", "1", "--threads", "1",
            "--out", "-", "--quiet"]
    return Profile.from_dict(SSHLauncher(dev, **ssh).run_json(argv, timeout=300), where=f"profile of {dev.name}")


def _leftovers(tb) -> list[str]:
    names = [n for n in os.listdir("/run/netns") if n.startswith(f"es-{tb.name}-")] if os.path.isdir("/run/netns") else []
    marker = str(netns.state_root() / tb.name)
    procs = [p.pid for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    groups = [c for c in ("cpu", "memory") if os.path.exists(f"/sys/fs/cgroup/{c}/{cgroups.CGROUP_DIR}/{tb.name}")]
    bridge = [netns.bridge_name(tb)] if os.path.exists(f"/sys/class/net/{netns.bridge_name(tb)}") else []
    return names + [f"pid {p}" for p in procs] + groups + bridge


def test_emulated_testbed_end_to_end(tiny_checkpoint_factory):
    tb = testbed_from_dict(TESTBED, "test_e2e_ssh")
    ckpt = tiny_checkpoint_factory(layers=4, seed=3)
    netns.testbed_down(tb)  # a previous crashed run
    t0 = time.perf_counter()
    netns.testbed_up(tb)
    took = {"up": time.perf_counter() - t0}
    try:
        # Profile every device over SSH, in parallel: the profile says which host measured it.
        with ThreadPoolExecutor(len(tb.devices)) as ex:
            profs = list(ex.map(lambda d: _profile_over_ssh(tb, d, ckpt), tb.devices))
        took["profile"] = time.perf_counter() - t0 - sum(took.values())
        assert [p.device_type for p in profs] == [d.type for d in tb.devices]
        assert all(p.n_units == 6 and all(u.prefill_ms > 0 for u in p.units) for p in profs)

        # Probe every ordered link over the kit's wire: the kernel's shaping shows within 15%.
        links = probe.probe_testbed(tb, sizes=(1 << 20,), launch_opts=netns.launch_opts(tb))["links"]  # 3 repeats: a median
        took["probe"] = time.perf_counter() - t0 - sum(took.values())
        print("probed links:", links["pairs"])
        assert len(links["pairs"]) == 6
        for p in links["pairs"]:
            want = tb.link(p["src"], p["dst"]).mbps
            assert math.isfinite(p["mbps"]) and abs(p["mbps"] - want) / want < 0.15, (p, want)

        # Plan on the measured profiles and the inventory; deploy over SSH; tokens equal one device's.
        problem = build_problem({p.device_type: p for p in profs}, tb, Workload(prompt_len=8, gen_tokens=NEW))
        plan = solve(problem, "latency")
        assert {s.device for s in plan.stages} >= {"a"} and len(plan.stages) >= 2, plan.stages
        with deploy(plan, tb, ckpt, problem=problem, launch_opts=netns.launch_opts(tb), fault_timeout=120.0) as dep:
            hosts = {h.device: h.host for h in dep.handles}
            assert all(hosts[d] == netns.addresses(tb)[d] for d in hosts)  # each worker in its namespace
            got = dep.generate(PROMPTS, max_new_tokens=NEW)
        want = generate_split(ckpt, None, prompts=PROMPTS, max_new_tokens=NEW).tokens
        assert got.tokens == want
        took["deploy+generate"] = time.perf_counter() - t0 - sum(took.values())
    finally:
        netns.testbed_down(tb)
    print("seconds per phase:", {k: round(v, 1) for k, v in took.items()}, "plan:", plan.stages)
    assert _leftovers(tb) == []


def _gateway_testbed(tmp_path):
    """testbed/emulated-gateway.yaml under another name and subnets (a running copy of it is left alone),
    with memory budgets that the 12 MiB model fills only with `far`, the device behind the gateway."""
    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "testbed" / "emulated-gateway.yaml").read_text())
    data["name"] = "esgw"
    data["emulation"] = {"mode": "netns", "subnet": "10.78.36.0/24", "gateways": {"gw": "10.78.37.0/24"}}
    memory = {"edge0": "7MiB", "gw": "1MiB", "far": "1GiB"}
    for d in data["devices"]:
        d["memory"] = memory[d["name"]]
        d["address"] = d["address"].replace("10.77.4.", "10.78.36.").replace("10.77.5.", "10.78.37.")
    path = tmp_path / "esgw.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_testbed(path)


def test_gateway_testbed_end_to_end(tiny_checkpoint_factory, tmp_path, capsys):
    """A device behind a jump host: ssh check shows the path, profile and deploy go through gw, tokens match."""
    tb = _gateway_testbed(tmp_path)
    ckpt = tiny_checkpoint_factory(layers=4, seed=3)
    netns.testbed_down(tb)  # a previous crashed run
    t0 = time.perf_counter()
    netns.testbed_up(tb)
    took = {"up": time.perf_counter() - t0}
    try:
        assert main(["ssh", "check", tb.path]) == 0
        out = capsys.readouterr().out
        print(out)
        assert "path: coordinator -> gw (root@10.78.36.11:22) -> far (root@10.78.37.10:22)" in out
        assert "far          ok    root@10.78.37.10:22 via root@10.78.36.11:22" in out
        # OpenSSH agrees: through the jump host far answers; directly its sshd refuses (logins from gw only).
        st = netns.load_state(tb)
        assert subprocess.run(["ssh", "-F", st.ssh_config, "far", "true"], timeout=30).returncode == 0
        direct = subprocess.run(["ssh", "-F", st.ssh_config, "-o", "ProxyJump=none", "far", "true"],
                                capture_output=True, text=True, timeout=30)
        assert direct.returncode == 255 and "Permission denied" in direct.stderr

        with ThreadPoolExecutor(len(tb.devices)) as ex:
            profs = list(ex.map(lambda d: _profile_over_ssh(tb, d, ckpt), tb.devices))
        took["profile"] = time.perf_counter() - t0 - sum(took.values())
        assert [p.device_type for p in profs] == [d.type for d in tb.devices]

        problem = build_problem({p.device_type: p for p in profs}, tb, Workload(prompt_len=8, gen_tokens=NEW))
        plan = solve(problem, "latency")
        assert plan.stages[0].device == "edge0" and "far" in {s.device for s in plan.stages}, plan.stages
        with deploy(plan, tb, ckpt, problem=problem, fault_timeout=120.0) as dep:  # launch options from the testbed
            handles = list(dep.handles)
            far = next(h for h in handles if h.device == "far")
            assert far.host == "10.78.37.10" and far.conn.target.jumps[0].name == "gw"
            assert [hop.name for hop in far.conn.target.hop.path()] == ["gw", "far"]
            got = dep.generate(PROMPTS, max_new_tokens=NEW)
        want = generate_split(ckpt, None, prompts=PROMPTS, max_new_tokens=NEW).tokens
        assert got.tokens == want
        for h in handles:  # every worker stopped, its folder (token, logs) gone
            assert not h.alive() and not Path(h.remote_dir).exists()
            assert not psutil.pid_exists(h.pid) or psutil.Process(h.pid).status() == psutil.STATUS_ZOMBIE
        took["deploy+generate"] = time.perf_counter() - t0 - sum(took.values())
    finally:
        netns.testbed_down(tb)
    print("seconds per phase:", {k: round(v, 1) for k, v in took.items()}, "plan:", plan.stages)
    assert _leftovers(tb) == []
    assert "10.78.37.0/24" not in subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
