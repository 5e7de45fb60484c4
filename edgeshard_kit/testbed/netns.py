"""The emulated testbed (root): a network namespace, cgroups (cgroups.py) and sshd (sshd.py) per device, a bridge, tc."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.testbed import cgroups, sshd
from edgeshard_kit.testbed.inventory import Device, Testbed

PREFIX = "es"                        # namespaces es-<testbed>-<device>; interfaces esbr*/esv*
UNSHAPED_RATE = "10gbit"             # htb class for traffic that no link shapes (coordinator on the bridge, ARP)


def state_root() -> Path:
    """Where testbeds keep keys and state: $EDGESHARD_STATE_DIR, /var/lib/edgeshard-kit as root, else ~/.cache."""
    env = os.environ.get("EDGESHARD_STATE_DIR")
    if env:
        return Path(env)
    return Path("/var/lib/edgeshard-kit") if os.geteuid() == 0 else Path.home() / ".cache" / "edgeshard-kit"


def _tag(tb: Testbed) -> str:
    return hashlib.sha1(tb.name.encode()).hexdigest()[:6]  # interface names are at most 15 chars


def namespace_name(tb: Testbed, dev: str) -> str:
    return f"{PREFIX}-{tb.name}-{dev}"


def bridge_name(tb: Testbed) -> str:
    return f"{PREFIX}br{_tag(tb)}"


def veth_name(tb: Testbed, dev: str) -> str:
    """The host side of the device's veth pair (the namespace side is eth0); 11 chars."""
    return f"{PREFIX}v" + hashlib.sha1(f"{tb.name}/{dev}".encode()).hexdigest()[:8]


def addresses(tb: Testbed) -> dict[str, str]:
    """Each device's address in the testbed subnet: its `address`, else the 10th host address on."""
    if tb.subnet is None:
        raise KitError(f"{tb.path or tb.name}: emulation.subnet is not set (netns mode needs one)")
    hosts = list(ipaddress.IPv4Network(tb.subnet).hosts())
    taken = {d.address for d in tb.devices if d.address} | {str(hosts[0])}
    free = (str(h) for h in hosts[9:] if str(h) not in taken)
    out = {}
    for d in tb.devices:
        if d.address == str(hosts[0]):
            raise KitError(f"{tb.path or tb.name}: device {d.name}: {d.address} is the bridge's address")
        out[d.name] = d.address or next(free)
    return out


def bridge_address(tb: Testbed) -> str:
    """The bridge's address in the root namespace (first host of the subnet): the coordinator's side."""
    return str(next(ipaddress.IPv4Network(tb.subnet).hosts()))


@dataclass(frozen=True)
class TestbedState:
    """What `testbed_up` made (saved as state.json, so `down` removes exactly that)."""

    __test__ = False  # not a pytest test class, despite the name

    name: str
    state_dir: str
    bridge: str
    bridge_address: str
    subnet: str
    namespaces: dict[str, str]       # device -> namespace
    addresses: dict[str, str]        # device -> address
    veths: dict[str, str]            # device -> host-side veth
    sshd_pids: dict[str, int]        # device -> sshd pid
    cgroups: list[str]               # cgroup directories, deepest first
    key: str                         # client private key (user root)
    known_hosts: str
    ssh_config: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TestbedState":
        return cls(**d)


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise KitError(f"`{' '.join(argv)}` failed: {(proc.stderr or proc.stdout).strip()}")
    return proc


def _ns(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run(["ip", "netns", "exec", ns, *argv], check=check)


def _missing_tool() -> str | None:
    """The first command the emulated testbed needs that is not installed, or None."""
    return next((tool for tool in ("ip", "tc", "nsenter", "ssh-keygen") if shutil.which(tool) is None), None)


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise KitError(f"edgeshard testbed {what} needs root (network namespaces, cgroups, tc); without root "
                       "the kit uses app-level emulation instead: set `emulation: {mode: app}` (see testbed/local.yaml)")
    tool = _missing_tool()
    if tool:
        raise KitError(f"`{tool}` is missing: install iproute2 / util-linux / openssh-client (`make sysdeps`)")


def _netns_list() -> set[str]:
    return {line.split()[0] for line in _run(["ip", "netns", "list"]).stdout.splitlines() if line.strip()}


def _link_exists(name: str) -> bool:
    return _run(["ip", "link", "show", name], check=False).returncode == 0


def _shape(tb: Testbed, ns: str, dev: str, addrs: dict[str, str]) -> None:
    """htb on the namespace's eth0: one class per shaped destination (u32 filter on its address)."""
    _ns(ns, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)
    _ns(ns, "tc", "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "1")
    _ns(ns, "tc", "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:1", "htb", "rate", UNSHAPED_RATE,
        "burst", "1mb", "cburst", "1mb")
    for j, (dst, addr) in enumerate(addrs.items()):
        link = tb.link(dev, dst)
        if dst == dev or not link.shaped:
            continue
        cls = f"1:{16 + j:x}"
        rate = f"{int(round(link.mbps * 1000))}kbit"
        _ns(ns, "tc", "class", "add", "dev", "eth0", "parent", "1:", "classid", cls, "htb", "rate", rate, "ceil", rate)
        _ns(ns, "tc", "filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip", "prio", "1", "u32",
            "match", "ip", "dst", f"{addr}/32", "flowid", cls)


def _check_subnet_free(tb: Testbed, br: str) -> None:
    """Refuse a subnet that overlaps an address of another interface: the testbed must stay private."""
    net = ipaddress.IPv4Network(tb.subnet)
    for line in _run(["ip", "-o", "-4", "addr", "show"]).stdout.splitlines():
        parts = line.split()
        iface, cidr = parts[1], parts[3]
        if iface != br and ipaddress.IPv4Interface(cidr).network.overlaps(net):
            raise KitError(f"{tb.path or tb.name}: emulation.subnet {tb.subnet} overlaps {cidr} on interface "
                           f"{iface}; pick another private subnet")


def testbed_up(tb: Testbed) -> TestbedState:
    """Bring the emulated testbed up (idempotent): bridge, namespaces, addresses, tc, cgroups, sshd."""
    _need_root("up")
    if tb.emulation != "netns":
        raise KitError(f"{tb.path or tb.name}: emulation.mode is {tb.emulation!r}; `testbed up` needs mode netns")
    addrs, sdir = addresses(tb), state_root() / tb.name
    prefix = ipaddress.IPv4Network(tb.subnet).prefixlen
    br, br_addr = bridge_name(tb), bridge_address(tb)
    _check_subnet_free(tb, br)
    if not _link_exists(br):
        _run(["ip", "link", "add", "name", br, "type", "bridge"])
    _run(["ip", "link", "set", "dev", br, "type", "bridge", "nf_call_iptables", "0"], check=False)
    _run(["ip", "addr", "replace", f"{br_addr}/{prefix}", "dev", br])
    _run(["ip", "link", "set", br, "up"])
    sshd.ensure_keys(sdir, tb.name, tb.names)
    known, cfg = sshd.write_client_files(sdir, addrs)
    existing = _netns_list()
    namespaces, veths, pids, cg_dirs = {}, {}, {}, []
    for dev in tb.devices:
        ns, veth = namespace_name(tb, dev.name), veth_name(tb, dev.name)
        namespaces[dev.name], veths[dev.name] = ns, veth
        if ns not in existing:
            _run(["ip", "netns", "add", ns])
        if not _link_exists(veth):
            _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
        _run(["ip", "link", "set", veth, "master", br, "up"])
        _ns(ns, "ip", "link", "set", "lo", "up")
        _ns(ns, "ip", "addr", "replace", f"{addrs[dev.name]}/{prefix}", "dev", "eth0")
        _ns(ns, "ip", "link", "set", "eth0", "up")  # no default route: nothing outside the subnet is reachable
        _shape(tb, ns, dev.name, addrs)
        procs = cgroups.setup(tb, dev)
        cg_dirs += [str(p.parent) for p in procs]
        pids[dev.name] = sshd.start_sshd(sdir, dev.name, ns, addrs[dev.name], procs)
    state = TestbedState(name=tb.name, state_dir=str(sdir), bridge=br, bridge_address=br_addr, subnet=tb.subnet,
                         namespaces=namespaces, addresses=addrs, veths=veths, sshd_pids=pids, cgroups=cg_dirs,
                         key=str(sdir / sshd.CLIENT_KEY), known_hosts=str(known), ssh_config=str(cfg))
    (sdir / "state.json").write_text(json.dumps(state.to_dict(), indent=1))
    return state


def reshape(tb: Testbed) -> None:
    """Apply `tb`'s link rates to the testbed that is up under its name (a bandwidth sweep without down/up)."""
    _need_root("reshape")
    state = load_state(tb)
    if state is None:
        raise KitError(f"testbed {tb.name} is not up: run `edgeshard testbed up {tb.path or tb.name}` (as root)")
    for dev in tb.devices:
        _shape(tb, state.namespaces[dev.name], dev.name, state.addresses)


def unavailable() -> str | None:
    """Why this host cannot run the emulated testbed (not root, no sshd, no cgroup v1 CPU controller), or None."""
    if os.geteuid() != 0:
        return "the emulated testbed needs root (network namespaces, cgroups, tc)"
    if not (shutil.which("sshd") or os.path.exists("/usr/sbin/sshd")):
        return "the emulated testbed needs sshd (Debian package openssh-server: `make sysdeps`)"
    why = cgroups.unavailable()
    if why:
        return why
    tool = _missing_tool()
    return tool and f"the emulated testbed needs `{tool}` (iproute2 / util-linux / openssh-client: `make sysdeps`)"


@contextmanager
def session(tb: Testbed):
    """The testbed, up for the block: a netns testbed is brought up if it is not, and down after if this brought it up.

    App-mode testbeds pass through unchanged. A testbed that was already up stays up (its owner takes it down).
    """
    if tb.emulation != "netns":
        yield tb
        return
    mine = load_state(tb) is None
    if mine:
        testbed_up(tb)
    else:
        reshape(tb)  # the file's rates, whatever an earlier sweep left
    try:
        yield tb
    finally:
        if mine:
            testbed_down(tb)


def load_state(tb: Testbed) -> TestbedState | None:
    """The saved state of a testbed that is up, or None."""
    p = state_root() / tb.name / "state.json"
    return TestbedState.from_dict(json.loads(p.read_text())) if p.is_file() else None


def testbed_down(tb: Testbed) -> list[str]:
    """Remove what `testbed_up` made (state file + kit-named leftovers after a crash); return what went."""
    _need_root("down")
    sdir, state = state_root() / tb.name, load_state(tb)
    namespaces = {namespace_name(tb, d.name) for d in tb.devices} | set((state.namespaces if state else {}).values())
    namespaces &= _netns_list()
    cg_dirs = cgroups.all_dirs(tb, state.cgroups if state else [])
    removed = []
    # Processes first: every sshd of this testbed, then whatever still runs in its namespaces / cgroups.
    pids = set(sshd.kit_sshd_pids(sdir))
    for ns in namespaces:
        pids |= {int(p) for p in _run(["ip", "netns", "pids", ns], check=False).stdout.split()}
    pids |= cgroups.pids(cg_dirs)
    pids.discard(os.getpid())
    sshd.kill_pids(sorted(pids))
    removed += [f"process {p}" for p in sorted(pids)]
    for ns in sorted(namespaces):  # deleting a namespace deletes its eth0 and so the veth pair
        _run(["ip", "netns", "del", ns])
        removed.append(f"namespace {ns}")
    for veth in {veth_name(tb, d.name) for d in tb.devices} | set((state.veths if state else {}).values()):
        # The kernel removes a pair with its namespace, asynchronously: only a leftover gets deleted here.
        if _link_exists(veth) and _run(["ip", "link", "del", veth], check=False).returncode == 0:
            removed.append(f"veth {veth}")
    br = bridge_name(tb)
    if _link_exists(br):
        _run(["ip", "link", "del", br])
        removed.append(f"bridge {br}")
    removed += cgroups.remove(tb, cg_dirs)
    if sdir.is_dir():
        shutil.rmtree(sdir)
        removed.append(f"state {sdir}")
    try:
        sdir.parent.rmdir()  # the state root, once no testbed is left in it
    except OSError:
        pass
    return removed


def testbed_status(tb: Testbed) -> dict:
    """Per device: namespace present, address, sshd alive, cgroup limits, qdiscs/classes on eth0."""
    _need_root("status")
    existing, addrs, sdir = _netns_list(), addresses(tb), state_root() / tb.name
    out = {"name": tb.name, "bridge": bridge_name(tb), "bridge_up": _link_exists(bridge_name(tb)),
           "bridge_address": bridge_address(tb), "state_dir": str(sdir), "devices": {}}
    for dev in tb.devices:
        ns = namespace_name(tb, dev.name)
        info: dict = {"namespace": ns, "exists": ns in existing, "address": addrs[dev.name],
                      "sshd_pid": sshd.sshd_pid(sdir, dev.name), **cgroups.limits(tb, dev)}
        if info["exists"]:
            info["addrs"] = _ns(ns, "ip", "-brief", "addr", "show", "dev", "eth0", check=False).stdout.split()[2:]
            info["qdiscs"] = _ns(ns, "tc", "qdisc", "show", "dev", "eth0", check=False).stdout.strip().splitlines()
            info["classes"] = _ns(ns, "tc", "class", "show", "dev", "eth0", check=False).stdout.strip().splitlines()
        out["devices"][dev.name] = info
    return out


def _python(dev: Device) -> str:
    # Namespaces share the host's files: the coordinator's interpreter (with the kit) is there too.
    return sys.executable if dev.python == "python3" else dev.python


def resolve_ssh(tb: Testbed, device: str | Device) -> dict:
    """How to SSH to a device: host, port, user, key, known_hosts, ssh_config, alias, namespace, python.

    The keys are SSHLauncher's keyword arguments: `SSHLauncher(dev, **resolve_ssh(tb, dev))`.
    """
    dev = tb.device(device) if isinstance(device, str) else device
    if tb.emulation != "netns":
        key = os.path.expanduser(dev.key) if dev.key else None
        return {"host": dev.ssh_alias or dev.host, "port": dev.port, "user": dev.user, "key": key,
                "known_hosts": None, "ssh_config": None, "alias": dev.ssh_alias, "namespace": None,
                "python": dev.python}
    state = load_state(tb)
    if state is None or dev.name not in state.addresses:
        raise KitError(f"testbed {tb.name} is not up: run `edgeshard testbed up {tb.path or tb.name}` (as root)")
    return {"host": state.addresses[dev.name], "port": 22, "user": "root", "key": state.key,
            "known_hosts": state.known_hosts, "ssh_config": state.ssh_config, "alias": dev.name,
            "namespace": state.namespaces[dev.name], "python": _python(dev)}


def launch_opts(tb: Testbed) -> dict:
    """Launch options for a netns testbed that is up: {"ssh": {ssh_config, known_hosts, python}}; else {}.

    The runtime's `deploy` and `probe_testbed` use them when given none (runtime.launch.default_launch_options).
    """
    if tb.emulation != "netns":
        return {}
    state = load_state(tb)
    if state is None:
        raise KitError(f"testbed {tb.name} is not up: run `edgeshard testbed up {tb.path or tb.name}` (as root)")
    opts = {"ssh_config": state.ssh_config, "known_hosts": state.known_hosts}
    pythons = {_python(d) for d in tb.devices}
    if len(pythons) == 1:  # one interpreter for every device (launch opts are per launch kind, not per device)
        opts["python"] = pythons.pop()
    return {"ssh": opts}


for _f in (testbed_up, testbed_down, testbed_status):
    _f.__test__ = False  # type: ignore[attr-defined]  # pytest: not tests despite their names

