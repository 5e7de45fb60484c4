"""The emulated testbed's network: names, addresses, veth pairs into the bridge or behind a gateway, the routes
through gateways, and tc htb shaping per directed link. netns.py brings it up and down."""

from __future__ import annotations

import hashlib
import ipaddress
import subprocess

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.testbed.inventory import Device, Link, Testbed

PREFIX = "es"                        # namespaces es-<testbed>-<device>; interfaces esbr*/esv*
UNSHAPED_RATE = "10gbit"             # htb class for traffic that no link shapes (coordinator on the bridge, ARP)
# A shaped link is an htb class (classification only, at UNSHAPED_RATE) with a tbf leaf that meters it. tbf cuts
# GSO super-packets into segments and lets a packet go only when its bytes are in the bucket; the bucket holds
# LINK_BURST_BYTES (one full Ethernet frame, the least tbf accepts), which an idle link passes at line rate. An htb
# class alone lets a whole GSO packet (up to 64 KiB) through at line rate whenever it is not in debt, so a decode
# activation cost nothing on a 2 Mbps link that is idle between tokens. planning.build's link model charges
# max(0, wire bytes - burst) on an idle link and every wire byte on a busy one (tests/test_link_model.py).
LINK_BURST_BYTES = 1600
# Above ~13 Mbps the bucket is BURST_MS of line rate instead: with a one-frame bucket the qdisc must release every
# packet exactly on time, and on a busy host its timer runs late, so a 40 Mbps link delivered ~33 Mbps (measured in
# tests/test_e2e_ssh.py). The model's burst (LINK_BURST_BYTES) is then below the real bucket: it overcharges an idle
# link by at most BURST_MS (0.2 ms for a 2.3 KB activation at 40 Mbps).
BURST_MS = 1.0


def link_burst_bytes(mbps: float) -> int:
    """The tbf bucket of a link shaped to `mbps`: one Ethernet frame, or BURST_MS of line rate when larger."""
    return max(LINK_BURST_BYTES, int(mbps * 1e6 / 8 * BURST_MS / 1000))
LINK_QUEUE_BYTES = 4 << 20           # tbf queue limit: the largest message waits, none is dropped
INNER_BRIDGE = "esinner"             # inside a gateway's namespace: the bridge of the devices behind it
OWNER = "edgeshard-kit"              # alias prefix of the links the kit makes (owner_alias)


def _tag(tb: Testbed) -> str:
    return hashlib.sha1(tb.name.encode()).hexdigest()[:6]  # interface names are at most 15 chars


def namespace_name(tb: Testbed, dev: str) -> str:
    return f"{PREFIX}-{tb.name}-{dev}"


def owner_alias(tb: Testbed, dev: str) -> str:
    """The alias the kit sets on a device's links (host-side veth, the namespace's eth0): "edgeshard-kit:<testbed>:
    <device>". Testbed names hold no ':', so `down` tells its own links and namespaces from another testbed's
    even when state.json is lost and the inventory was edited."""
    return f"{OWNER}:{tb.name}:{dev}"


def link_aliases(ns: str | None = None) -> dict[str, str]:
    """{interface: alias} of the links that carry one, in the root namespace or in namespace `ns`."""
    argv = ["ip", "-o", "link", "show"] if ns is None else ["ip", "-n", ns, "-o", "link", "show"]
    out = {}
    for line in run(argv, check=False).stdout.splitlines():
        parts = line.split()
        if "alias" in parts and len(parts) > 1:
            out[parts[1].rstrip(":").split("@")[0]] = parts[parts.index("alias") + 1]
    return out


def bridge_name(tb: Testbed) -> str:
    return f"{PREFIX}br{_tag(tb)}"


def veth_name(tb: Testbed, dev: str) -> str:
    """The host side of the device's veth pair (the namespace side is eth0); 11 chars."""
    return f"{PREFIX}v" + hashlib.sha1(f"{tb.name}/{dev}".encode()).hexdigest()[:8]


def addresses(tb: Testbed) -> dict[str, str]:
    """Each device's address: its `address`, else the 10th host address on, of the testbed subnet or, for a
    device with `via`, of the subnet behind its gateway (whose first address is the gateway's there)."""
    if tb.subnet is None:
        raise KitError(f"{tb.path or tb.name}: emulation.subnet is not set (netns mode needs one)")
    out = {}
    for gw, net in [(None, tb.subnet), *tb.gateways]:
        hosts = list(ipaddress.IPv4Network(net).hosts())
        members = [d for d in tb.devices if d.via == gw]
        taken = {d.address for d in members if d.address} | {str(hosts[0])}
        free = (str(h) for h in hosts[9:] if str(h) not in taken)
        for d in members:
            if d.address == str(hosts[0]):
                owner = "the bridge's" if gw is None else f"gateway {gw}'s"
                raise KitError(f"{tb.path or tb.name}: device {d.name}: {d.address} is {owner} address")
            out[d.name] = d.address or next(free)
    return {d.name: out[d.name] for d in tb.devices}


def inner_address(tb: Testbed, gateway: str) -> str:
    """The gateway's address on the subnet behind it (first host): the next hop of the devices there."""
    return str(next(ipaddress.IPv4Network(tb.gateway_subnets[gateway]).hosts()))


def bridge_address(tb: Testbed) -> str:
    """The bridge's address in the root namespace (first host of the subnet): the coordinator's side."""
    return str(next(ipaddress.IPv4Network(tb.subnet).hosts()))


def run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """Run a command; KitError with its stderr when it fails (and `check`)."""
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise KitError(f"`{' '.join(argv)}` failed: {(proc.stderr or proc.stdout).strip()}")
    return proc


def ns_run(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """`argv` run inside namespace `ns`."""
    return run(["ip", "netns", "exec", ns, *argv], check=check)


def link_exists(name: str) -> bool:
    return run(["ip", "link", "show", name], check=False).returncode == 0


def shape(tb: Testbed, ns: str, dev: str, addrs: dict[str, str]) -> None:
    """htb on the namespace's eth0: one class per shaped destination (u32 filter on its address).

    A gateway forwards its devices' traffic unshaped (their sender shaped it: prio-1 filter on the source
    subnet) and shapes what it sends itself to the devices behind it on its inner bridge.
    """
    _htb(ns, "eth0", [([f"match ip dst {addr}/32"], tb.link(dev, dst)) for dst, addr in addrs.items() if dst != dev],
         forwarded=tb.gateway_subnets.get(dev))
    if dev in tb.gateway_subnets:
        mine = (addrs[dev], inner_address(tb, dev))  # what the gateway sends from either of its addresses
        _htb(ns, INNER_BRIDGE, [([f"match ip src {src}/32 match ip dst {addrs[d.name]}/32" for src in mine],
                                 tb.link(dev, d.name)) for d in tb.devices if d.via == dev])


def _htb(ns: str, iface: str, rules: list[tuple[list[str], Link]], forwarded: str | None = None) -> None:
    """An htb root on `iface`: unshaped class 1:1 by default, one class per shaped link chosen by u32 matches,
    metered by its tbf leaf (rate = the link's Mbps, bucket LINK_BURST_BYTES)."""
    ns_run(ns, "tc", "qdisc", "del", "dev", iface, "root", check=False)
    ns_run(ns, "tc", "qdisc", "add", "dev", iface, "root", "handle", "1:", "htb", "default", "1")
    ns_run(ns, "tc", "class", "add", "dev", iface, "parent", "1:", "classid", "1:1", "htb", "rate", UNSHAPED_RATE,
        "burst", "1mb", "cburst", "1mb")
    if forwarded:
        ns_run(ns, "tc", "filter", "add", "dev", iface, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
            "match", "ip", "src", forwarded, "flowid", "1:1")
    for j, (matches, link) in enumerate(rules):
        if not link.shaped:
            continue
        cls = f"1:{16 + j:x}"
        rate = f"{int(round(link.mbps * 1000))}kbit"
        ns_run(ns, "tc", "class", "add", "dev", iface, "parent", "1:", "classid", cls, "htb", "rate", UNSHAPED_RATE,
               "burst", "1mb", "cburst", "1mb")
        ns_run(ns, "tc", "qdisc", "add", "dev", iface, "parent", cls, "handle", f"{16 + j:x}:", "tbf", "rate", rate,
               "burst", str(link_burst_bytes(link.mbps)), "limit", str(LINK_QUEUE_BYTES))
        for match in matches:
            ns_run(ns, "tc", "filter", "add", "dev", iface, "parent", "1:", "protocol", "ip", "prio", "2", "u32",
                *match.split(), "flowid", cls)


def gateway_side(tb: Testbed, dev: Device, ns: str, veth: str, prefix: int) -> None:
    """Plug a `via` device into the inner bridge of its gateway's namespace (made here, forwarding on)."""
    gw_ns = namespace_name(tb, dev.via)
    if ns_run(gw_ns, "ip", "link", "show", INNER_BRIDGE, check=False).returncode != 0:
        ns_run(gw_ns, "ip", "link", "add", "name", INNER_BRIDGE, "type", "bridge")
    ns_run(gw_ns, "ip", "addr", "replace", f"{inner_address(tb, dev.via)}/{prefix}", "dev", INNER_BRIDGE)
    ns_run(gw_ns, "ip", "link", "set", INNER_BRIDGE, "up")
    ns_run(gw_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")  # the gateway routes between its two networks
    if ns_run(gw_ns, "ip", "link", "show", veth, check=False).returncode != 0:
        if not link_exists(veth):
            run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
        run(["ip", "link", "set", veth, "netns", gw_ns])
    ns_run(gw_ns, "ip", "link", "set", veth, "master", INNER_BRIDGE, "up")


def routes(tb: Testbed, addrs: dict[str, str]) -> None:
    """Routes to the subnets behind gateways: from the coordinator and the other devices via the gateway's
    address, from a device behind a gateway to everything else via the gateway's inner address. No default route."""
    br = bridge_name(tb)
    for gw, net in tb.gateways:
        run(["ip", "route", "replace", net, "via", addrs[gw], "dev", br])
        for d in tb.devices:
            ns = namespace_name(tb, d.name)
            if d.via is None and d.name != gw:
                ns_run(ns, "ip", "route", "replace", net, "via", addrs[gw], "dev", "eth0")
            elif d.via == gw:
                for other in [tb.subnet] + [n for g, n in tb.gateways if g != gw]:
                    ns_run(ns, "ip", "route", "replace", other, "via", inner_address(tb, gw), "dev", "eth0")


def check_subnets_free(tb: Testbed, br: str) -> None:
    """Refuse a subnet that overlaps an address or a route of another interface: the testbed must stay private
    (and `up` must not replace someone else's route to it)."""
    addrs = [(p[1], p[3]) for p in map(str.split, run(["ip", "-o", "-4", "addr", "show"]).stdout.splitlines())]
    route_lines = run(["ip", "-o", "-4", "route", "show"]).stdout.splitlines()
    routes = [(p[p.index("dev") + 1] if "dev" in p else "-", _network(p)) for p in map(str.split, route_lines)]
    nets = [("emulation.subnet", tb.subnet)] + [(f"emulation.gateways.{g}", n) for g, n in tb.gateways]
    for field_name, subnet in nets:
        net = ipaddress.IPv4Network(subnet)
        for iface, cidr in addrs + [r for r in routes if r[1]]:
            if iface != br and ipaddress.IPv4Network(cidr, strict=False).overlaps(net):
                raise KitError(f"{tb.path or tb.name}: {field_name} {subnet} overlaps {cidr} on interface "
                               f"{iface}; pick another private subnet")


def _network(route: list[str]) -> str | None:
    """The destination of an `ip -o route` line (`10.1.0.0/16 via ...`, `unreachable 10.2.0.0/16`), None for default."""
    for word in route[:2]:
        try:
            return str(ipaddress.IPv4Network(word, strict=False))
        except ValueError:
            continue
    return None
