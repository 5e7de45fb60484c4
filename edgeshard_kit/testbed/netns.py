"""The emulated testbed (root): a network namespace, cgroups (cgroups.py) and sshd (sshd.py) per device, a bridge,
devices behind gateways, tc (the network plumbing: nsnet.py); up, down, status, and how to SSH to each device."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.io import read_json, write_text_atomic
from edgeshard_kit.core.schema import Count, FileModel, Name, validate
from edgeshard_kit.testbed import cgroups, sshd
from edgeshard_kit.testbed.inventory import Device, Testbed
from edgeshard_kit.testbed.nsnet import (PREFIX, addresses, bridge_address, bridge_name, check_subnets_free,
                                         gateway_side, inner_address, link_aliases, link_exists, namespace_name,
                                         ns_run, owner_alias, routes, run, shape, veth_name)

# Re-exported: netns.addresses, .bridge_address, .bridge_name, .inner_address, .namespace_name, .veth_name.
__all__ = ["TestbedState", "testbed_up", "testbed_down", "testbed_status", "reshape", "session", "unavailable",
           "load_state", "acquire", "not_running", "state_root", "resolve_ssh", "launch_opts", "addresses",
           "bridge_address", "bridge_name", "inner_address", "namespace_name", "veth_name"]


def state_root() -> Path:
    """Where testbeds keep keys and state: $EDGESHARD_STATE_DIR, /var/lib/edgeshard-kit as root, else ~/.cache."""
    env = os.environ.get("EDGESHARD_STATE_DIR")
    if env:
        return Path(env)
    return Path("/var/lib/edgeshard-kit") if os.geteuid() == 0 else Path.home() / ".cache" / "edgeshard-kit"


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
    via: dict[str, str] = field(default_factory=dict)   # device -> the gateway it sits behind

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "state.json") -> "TestbedState":
        """The state from its JSON form; KitError "WHERE: field: why" (one line) when it is not one."""
        return cls(**validate(_StateIn, d, where).model_dump())


class _StateIn(FileModel):
    """The schema of state.json (what `TestbedState.to_dict` writes)."""

    name: Name
    state_dir: Name
    bridge: Name
    bridge_address: Name
    subnet: Name
    namespaces: dict[str, Name]
    addresses: dict[str, Name]
    veths: dict[str, Name]
    sshd_pids: dict[str, Count]
    cgroups: list[Name]
    key: Name
    known_hosts: Name
    ssh_config: Name
    via: dict[str, Name] = {}


def _cli_hint(tb: Testbed, verb: str) -> str:
    """`edgeshard testbed <verb> FILE` when the testbed came from a file; else the Python call that does it (a
    testbed built in code, e.g. notebook 06's, has no file to name)."""
    if tb.path and Path(tb.path).is_file():
        return f"`edgeshard testbed {verb} {tb.path}`"
    return f"`netns.testbed_{verb}(tb)` for this testbed built in Python (from a file: `edgeshard testbed {verb} FILE`)"


def _not_up(tb: Testbed) -> KitError:
    """The error for a testbed without state (never up, or taken down), naming the command that brings it up."""
    return KitError(f"testbed {tb.name} is not up: run {_cli_hint(tb, 'up')} (as root)")


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
    return {line.split()[0] for line in run(["ip", "netns", "list"]).stdout.splitlines() if line.strip()}


def testbed_up(tb: Testbed) -> TestbedState:
    """Bring the emulated testbed up (idempotent): bridge, namespaces, addresses, tc, cgroups, sshd."""
    _need_root("up")
    if tb.emulation != "netns":
        raise KitError(f"{tb.path or tb.name}: emulation.mode is {tb.emulation!r}; `testbed up` needs mode netns")
    addrs, sdir = addresses(tb), state_root() / tb.name
    prefix = ipaddress.IPv4Network(tb.subnet).prefixlen
    br, br_addr = bridge_name(tb), bridge_address(tb)
    check_subnets_free(tb, br)
    if not link_exists(br):
        run(["ip", "link", "add", "name", br, "type", "bridge"])
    run(["ip", "link", "set", "dev", br, "type", "bridge", "nf_call_iptables", "0"], check=False)
    run(["ip", "addr", "replace", f"{br_addr}/{prefix}", "dev", br])
    run(["ip", "link", "set", br, "up"])
    sshd.ensure_keys(sdir, tb.name, tb.names)
    via = {d.name: d.via for d in tb.devices if d.via}
    known, cfg = sshd.write_client_files(sdir, addrs, via)
    existing = _netns_list()
    namespaces, veths, pids, cg_dirs = {}, {}, {}, []
    for dev in sorted(tb.devices, key=lambda d: d.via is not None):  # a gateway's namespace before its devices
        ns, veth = namespace_name(tb, dev.name), veth_name(tb, dev.name)
        namespaces[dev.name], veths[dev.name] = ns, veth
        if ns not in existing:
            run(["ip", "netns", "add", ns])
        net = ipaddress.IPv4Network(tb.gateway_subnets[dev.via] if dev.via else tb.subnet)
        if dev.via:
            gateway_side(tb, dev, ns, veth, net.prefixlen)
        else:
            if not link_exists(veth):
                run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
            run(["ip", "link", "set", veth, "alias", owner_alias(tb, dev.name)])  # `down` finds it by this
            run(["ip", "link", "set", veth, "master", br, "up"])
        ns_run(ns, "ip", "link", "set", "eth0", "alias", owner_alias(tb, dev.name))  # marks the namespace as ours
        ns_run(ns, "ip", "link", "set", "lo", "up")
        ns_run(ns, "ip", "addr", "replace", f"{addrs[dev.name]}/{net.prefixlen}", "dev", "eth0")
        ns_run(ns, "ip", "link", "set", "eth0", "up")  # no default route: nothing outside the testbed is reachable
        procs = cgroups.setup(tb, dev)
        cg_dirs += [str(p.parent) for p in procs]
        # Behind a gateway, sshd takes logins only from the gateway: SSH must come through the jump host.
        allow = inner_address(tb, dev.via) if dev.via else None
        pids[dev.name] = sshd.start_sshd(sdir, dev.name, ns, addrs[dev.name], procs, allow)
    routes(tb, addrs)
    for dev in tb.devices:
        shape(tb, namespaces[dev.name], dev.name, addrs)
    state = TestbedState(name=tb.name, state_dir=str(sdir), bridge=br, bridge_address=br_addr, subnet=tb.subnet,
                         namespaces=namespaces, addresses=addrs, veths=veths, sshd_pids=pids, cgroups=cg_dirs,
                         key=str(sdir / sshd.CLIENT_KEY), known_hosts=str(known), ssh_config=str(cfg), via=via)
    # Atomically: an interrupted `up` leaves the previous state.json or none, never half of one.
    write_text_atomic(json.dumps(state.to_dict(), indent=1), sdir / "state.json")
    return state


def reshape(tb: Testbed) -> None:
    """Apply `tb`'s link rates to the testbed that is up under its name (a bandwidth sweep without down/up)."""
    _need_root("reshape")
    state = load_state(tb)
    if state is None:
        raise _not_up(tb)
    missing = [d.name for d in tb.devices if d.name not in state.namespaces]
    if missing:
        raise KitError(f"{tb.path or tb.name}: device {missing[0]} is not in the testbed that is up (the inventory "
                       f"was edited): run `edgeshard testbed down` and `up` again")
    why = not_running(tb, state)
    if why:
        raise KitError(f"testbed {tb.name} is not running ({why}: the host restarted, or the run that brought it "
                       f"up was killed): run {_cli_hint(tb, 'up')} (as root)")
    _apply_rates(tb, state)


def _apply_rates(tb: Testbed, state: TestbedState) -> None:
    """`tb`'s link rates on the namespace links of the running testbed `state` describes."""
    for dev in tb.devices:
        shape(tb, state.namespaces[dev.name], dev.name, state.addresses)


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
    mine = acquire(tb)
    try:
        yield tb
    finally:
        if mine:
            testbed_down(tb)


def acquire(tb: Testbed) -> bool:
    """Make sure the netns testbed `tb` runs, with the file's link rates; True when this call brought it up (the
    caller then takes it down), False when it was up already (its owner takes it down).

    A state.json whose testbed no longer runs (no sshd of it alive: the host restarted, or the run that brought it
    up was killed) is a leftover: the testbed is brought up again and counts as this call's. One that runs with a
    part missing (a namespace deleted, an sshd killed) is repaired in place (`testbed_up` is idempotent).
    """
    state = load_state(tb)
    if state is None or not sshd.kit_sshd_pids(Path(state.state_dir)):
        testbed_up(tb)
        return True
    if not_running(tb, state):
        testbed_up(tb)  # restarts what is gone and re-applies the rates
    else:
        _apply_rates(tb, state)  # the file's rates, whatever an earlier sweep left
    return False


def not_running(tb: Testbed, state: TestbedState) -> str | None:
    """What of a testbed with saved state is not running (a device's namespace or sshd), or None when all is."""
    existing = _netns_list()
    for dev in tb.devices:
        ns = state.namespaces.get(dev.name)
        if ns is None:
            return f"device {dev.name} is not in the testbed that is up"
        if ns not in existing:
            return f"namespace {ns} of device {dev.name} is gone"
        if sshd.sshd_pid(Path(state.state_dir), dev.name) is None:
            return f"the sshd of device {dev.name} is not running"
    return None


def load_state(tb: Testbed) -> TestbedState | None:
    """The saved state of a testbed that is up, or None; KitError naming state.json when it is unreadable
    (empty, truncated, edited): `edgeshard testbed down` still cleans up, by the kit's names."""
    p = state_root() / tb.name / "state.json"
    if not p.is_file():
        return None
    try:
        return TestbedState.from_dict(read_json(p), str(p))
    except KitError as e:
        raise KitError(f"{e} (testbed {tb.name}: run {_cli_hint(tb, 'down')}, then up)") from None


def _readable_state(tb: Testbed) -> TestbedState | None:
    """The saved state, or None when there is none or it cannot be read (`down` then goes by the kit's names)."""
    try:
        return load_state(tb)
    except KitError:
        return None


def _kit_namespaces(tb: Testbed, state: TestbedState | None) -> set[str]:
    """The testbed's namespaces that exist: its devices', the state's, and every other "es-<testbed>-*" one whose
    eth0 carries this testbed's alias (a device since removed from the inventory) or, without an alias (an `up`
    interrupted early), that no longer-named testbed with a state folder claims."""
    existing = _netns_list()
    prefix = f"{PREFIX}-{tb.name}-"  # a hand-edited state.json names nothing outside the kit's names
    ours = {namespace_name(tb, d.name) for d in tb.devices}
    ours |= {ns for ns in (state.namespaces if state else {}).values() if ns.startswith(prefix)}
    root = state_root()
    others = [p.name for p in root.iterdir() if p.is_dir() and p.name != tb.name] if root.is_dir() else []
    for ns in existing - ours:
        if not ns.startswith(prefix):
            continue
        alias = link_aliases(ns).get("eth0")
        if alias is not None:
            if alias.startswith(owner_alias(tb, "")):
                ours.add(ns)
        elif not any(len(o) > len(tb.name) and ns.startswith(f"{PREFIX}-{o}-") for o in others):
            ours.add(ns)
    return ours & existing


def testbed_down(tb: Testbed) -> list[str]:
    """Remove what `testbed_up` made (state file + kit-named leftovers after a crash); return what went."""
    _need_root("down")
    sdir, state = state_root() / tb.name, _readable_state(tb)
    namespaces = _kit_namespaces(tb, state)
    cg_dirs = cgroups.all_dirs(tb, state.cgroups if state else [])
    removed = []
    # Processes first: every sshd of this testbed, then whatever still runs in its namespaces / cgroups.
    pids = set(sshd.kit_sshd_pids(sdir))
    for ns in namespaces:
        pids |= {int(p) for p in run(["ip", "netns", "pids", ns], check=False).stdout.split()}
    pids |= cgroups.pids(cg_dirs)
    pids.discard(os.getpid())
    sshd.kill_pids(sorted(pids))
    removed += [f"process {p}" for p in sorted(pids)]
    for ns in sorted(namespaces):  # deleting a namespace deletes its eth0 and so the veth pair
        run(["ip", "netns", "del", ns])
        removed.append(f"namespace {ns}")
    mine = owner_alias(tb, "")
    kit_veths = {name for name, alias in link_aliases().items() if alias.startswith(mine)}
    listed = {v for v in (state.veths if state else {}).values() if v.startswith(f"{PREFIX}v")}
    for veth in {veth_name(tb, d.name) for d in tb.devices} | listed | kit_veths:
        # The kernel removes a pair with its namespace, asynchronously: only a leftover gets deleted here.
        if link_exists(veth) and run(["ip", "link", "del", veth], check=False).returncode == 0:
            removed.append(f"veth {veth}")
    br = bridge_name(tb)
    if link_exists(br):
        run(["ip", "link", "del", br])
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
    out = {"name": tb.name, "bridge": bridge_name(tb), "bridge_up": link_exists(bridge_name(tb)),
           "bridge_address": bridge_address(tb), "state_dir": str(sdir), "devices": {}}
    for dev in tb.devices:
        ns = namespace_name(tb, dev.name)
        info: dict = {"namespace": ns, "exists": ns in existing, "address": addrs[dev.name], "via": dev.via,
                      "sshd_pid": sshd.sshd_pid(sdir, dev.name), **cgroups.limits(tb, dev)}
        if info["exists"]:
            info["addrs"] = ns_run(ns, "ip", "-brief", "addr", "show", "dev", "eth0", check=False).stdout.split()[2:]
            info["qdiscs"] = ns_run(ns, "tc", "qdisc", "show", "dev", "eth0", check=False).stdout.strip().splitlines()
            info["classes"] = ns_run(ns, "tc", "class", "show", "dev", "eth0", check=False).stdout.strip().splitlines()
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
        raise _not_up(tb)
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
        raise _not_up(tb)
    opts = {"ssh_config": state.ssh_config, "known_hosts": state.known_hosts}
    pythons = {_python(d) for d in tb.devices}
    if len(pythons) == 1:  # one interpreter for every device (launch opts are per launch kind, not per device)
        opts["python"] = pythons.pop()
    return {"ssh": opts}


for _f in (testbed_up, testbed_down, testbed_status):
    _f.__test__ = False  # type: ignore[attr-defined]  # pytest: not tests despite their names

