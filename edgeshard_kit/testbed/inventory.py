"""The testbed inventory: devices, links and emulation mode, loaded from YAML and validated."""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.io import check_size, read_text
from edgeshard_kit.core.numbers import format_size, integer, number, parse_size

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

_DEVICE_KEYS = {
    "name", "type", "memory", "source", "cloud", "launch", "host", "port", "user", "key",
    "ssh_alias", "python", "model_path", "worker_port", "cpus", "cpu_quota", "mem_limit", "address", "via",
}
_LINK_KEYS = {"src", "dst", "mbps", "latency_ms"}
_TOP_KEYS = {"name", "description", "devices", "links", "emulation"}


@dataclass(frozen=True)
class Link:
    """A directed link: `mbps` megabits/s (math.inf = unshaped), `latency_ms` one-way delay per message."""

    src: str
    dst: str
    mbps: float
    latency_ms: float = 0.0

    @property
    def shaped(self) -> bool:
        return math.isfinite(self.mbps)

    @property
    def bytes_per_s(self) -> float:
        return self.mbps * 1e6 / 8

    def to_dict(self) -> dict:
        # JSON has no infinity: an unshaped link is written as mbps null.
        return {"src": self.src, "dst": self.dst, "mbps": self.mbps if self.shaped else None,
                "latency_ms": self.latency_ms}


@dataclass(frozen=True)
class Device:
    """One device of the testbed and how to reach it (local subprocess or SSH)."""

    name: str
    type: str
    memory_bytes: int                   # memory budget for shards (bytes)
    source: bool = False                # holds the prompt and runs unit 0
    launch: str = "local"               # "local" (subprocess on 127.0.0.1) or "ssh"
    host: str = "127.0.0.1"             # ssh: address or ~/.ssh/config alias
    port: int = 22                      # ssh port
    user: str | None = None             # ssh user (None = ssh config / current user)
    key: str | None = None              # ssh private key path (None = agent / ssh config)
    ssh_alias: str | None = None        # Host entry of ~/.ssh/config (overrides host when set)
    python: str = "python3"             # interpreter with edgeshard_kit installed, on that host
    model_path: str | None = None       # checkpoint path on that host (None = coordinator's path)
    worker_port: int = 0                # TCP port of the worker (0 = pick a free one)
    cpus: tuple[int, ...] | None = None  # CPU pinning (local) / cpuset (netns)
    cpu_quota: float | None = None      # netns: cores worth of CPU time (cgroup cfs quota)
    mem_limit_bytes: int | None = None  # netns: cgroup memory limit (bytes)
    cloud: bool = False                 # a cloud server rather than an edge device (plots, docs)
    address: str | None = None          # netns: this device's address inside the kit's subnet
    via: str | None = None              # netns: reachable only through this (gateway) device: SSH by ProxyJump

    def threads(self) -> int | None:
        """Torch threads for this device's profile and workers (the same for both, so profiles predict runs).

        Pinned: one per CPU; CPU quota: whole cores of it (at least 1); local processes share this
        machine's cores, so 1; otherwise None (torch's default on that host).
        """
        if self.cpus:
            return len(self.cpus)
        if self.cpu_quota is not None:
            return max(1, int(self.cpu_quota))
        return 1 if self.launch == "local" else None

    def to_dict(self) -> dict:
        """The YAML/JSON form (sizes written as "4GiB"; fields at their default left out)."""
        out: dict[str, Any] = {"name": self.name, "type": self.type, "memory": format_size(self.memory_bytes)}
        defaults = Device(name="", type="", memory_bytes=0)
        for f in ("source", "cloud", "launch", "host", "port", "user", "key", "ssh_alias", "python",
                  "model_path", "worker_port", "cpu_quota", "address", "via"):
            v = getattr(self, f)
            if v != getattr(defaults, f):
                out[f] = v
        if self.cpus is not None:
            out["cpus"] = list(self.cpus)
        if self.mem_limit_bytes is not None:
            out["mem_limit"] = format_size(self.mem_limit_bytes)
        return out


@dataclass(frozen=True)
class Testbed:
    """Devices, directed links with a default, and how links are emulated ("app" or "netns")."""

    __test__ = False  # not a pytest test class, despite the name

    name: str
    devices: tuple[Device, ...]
    links: tuple[Link, ...] = ()
    default: Link = field(default_factory=lambda: Link("*", "*", math.inf, 0.0))
    emulation: str = "app"              # "app": token bucket in the wire; "netns": namespaces + tc (root);
    #                                     "none": real links, the figures only inform the planner
    subnet: str | None = None           # netns: private subnet of the namespaces, e.g. 10.77.0.0/24
    path: str | None = None             # file it was loaded from (not written by to_dict)
    description: str = ""
    gateways: tuple[tuple[str, str], ...] = ()  # netns: (gateway device, the subnet behind it) for `via` devices

    @property
    def gateway_subnets(self) -> dict[str, str]:
        """Gateway device -> the private subnet of the devices behind it (emulation.gateways)."""
        return dict(self.gateways)

    @property
    def source(self) -> Device:
        """The one source device (holds the prompt, runs unit 0)."""
        for d in self.devices:
            if d.source:
                return d
        raise KitError(f"{self.path or self.name}: no source device (mark one with source: true)")

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.devices]

    def device(self, name: str) -> Device:
        """The device called `name`; KitError naming the testbed otherwise."""
        for d in self.devices:
            if d.name == name:
                return d
        raise KitError(f"{self.path or self.name}: unknown device {name!r} (devices: {', '.join(self.names)})")

    def link(self, src: str, dst: str) -> Link:
        """The directed link src -> dst: its pair entry, else the default; same device = unshaped, 0 ms."""
        if src == dst:
            return Link(src, dst, math.inf, 0.0)
        for ln in self.links:
            if ln.src == src and ln.dst == dst:
                return ln
        return Link(src, dst, self.default.mbps, self.default.latency_ms)

    def rtt_ms(self, a: str, b: str) -> float:
        """Round trip a -> b -> a in ms (sum of the two one-way latencies)."""
        return self.link(a, b).latency_ms + self.link(b, a).latency_ms

    def to_dict(self) -> dict:
        d = self.default.to_dict()
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["devices"] = [dev.to_dict() for dev in self.devices]
        out["links"] = {"default": {"mbps": d["mbps"], "latency_ms": d["latency_ms"]},
                        "pairs": [ln.to_dict() for ln in self.links]}
        out["emulation"] = {"mode": self.emulation, **({"subnet": self.subnet} if self.subnet else {}),
                            **({"gateways": dict(self.gateways)} if self.gateways else {})}
        return out

    def save(self, path: str | Path) -> Path:
        """Write the inventory as YAML (loadable by `load_testbed`)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return p

    def with_devices(self, devices: list[Device]) -> "Testbed":
        """A copy with other devices (e.g. a subset; links between them kept), revalidated."""
        names = {d.name for d in devices}
        d = self.to_dict()
        d["devices"] = [dev.to_dict() for dev in devices]
        d["links"]["pairs"] = [p for p in d["links"]["pairs"] if p["src"] in names and p["dst"] in names]
        gws = {g: net for g, net in self.gateways if any(dev.via == g for dev in devices)}
        d["emulation"].pop("gateways", None)
        d["emulation"].update({"gateways": gws} if gws else {})
        return testbed_from_dict(d, self.path or "<testbed>")


def _str(value: Any, where: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, (str, int)) or isinstance(value, bool) or str(value) == "":
        raise KitError(f"{where}: {value!r} is not a non-empty string")
    return str(value)


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise KitError(f"{where}: {value!r} is not true/false")
    return value


def _private_net(value: Any, where: str, example: str) -> ipaddress.IPv4Network:
    """A private IPv4 network (the emulated testbed's traffic must stay inside), else KitError naming `where`."""
    try:
        net = ipaddress.IPv4Network(str(value), strict=True)
    except ValueError:
        raise KitError(f"{where}: {value!r} is not an IPv4 network such as {example}") from None
    if not net.is_private:
        raise KitError(f"{where}: {value!r} is not a private network (traffic must stay inside)")
    return net


def _check_keys(d: Any, allowed: set[str], where: str) -> dict:
    if not isinstance(d, dict):
        raise KitError(f"{where}: expected a mapping, got {type(d).__name__}")
    extra = sorted((k for k in d if k not in allowed), key=str)
    if extra:
        raise KitError(f"{where}: unknown field {extra[0]!r} (allowed: {', '.join(sorted(allowed))})")
    return d


def _device(d: Any, where: str) -> Device:
    _check_keys(d, _DEVICE_KEYS, where)
    for req in ("name", "type", "memory"):
        if req not in d:
            raise KitError(f"{where}: missing field {req!r}")
    name = _str(d["name"], f"{where}.name")
    if not _NAME_RE.match(name):
        raise KitError(f"{where}.name: {name!r} may hold only letters, digits, '_', '.', '-'")
    launch = d.get("launch", "local")
    if launch not in ("local", "ssh"):
        raise KitError(f"{where}.launch: {launch!r} is not 'local' or 'ssh'")
    cpus = d.get("cpus")
    if cpus is not None:
        if isinstance(cpus, int) and not isinstance(cpus, bool):
            cpus = [cpus]
        if not isinstance(cpus, list) or not cpus:
            raise KitError(f"{where}.cpus: {cpus!r} is not a non-empty list of CPU numbers")
        cpus = tuple(integer(c, f"{where}.cpus[{i}]") for i, c in enumerate(cpus))
    quota = d.get("cpu_quota")
    if quota is not None:
        quota = number(quota, f"{where}.cpu_quota")
        if quota <= 0:
            raise KitError(f"{where}.cpu_quota: {quota!r} must be > 0 (cores worth of CPU time)")
    mem_limit = d.get("mem_limit")
    address = _str(d.get("address"), f"{where}.address", optional=True)
    if address is not None:
        try:
            ipaddress.IPv4Address(address)
        except ValueError:
            raise KitError(f"{where}.address: {address!r} is not an IPv4 address") from None
    key = _str(d.get("key"), f"{where}.key", optional=True)
    return Device(
        name=name,
        type=_str(d["type"], f"{where}.type"),
        memory_bytes=parse_size(d["memory"], f"{where}.memory"),
        source=_bool(d.get("source", False), f"{where}.source"),
        cloud=_bool(d.get("cloud", False), f"{where}.cloud"),
        launch=launch,
        host=_str(d.get("host", "127.0.0.1"), f"{where}.host"),
        port=integer(d.get("port", 22), f"{where}.port", 1, 65535),
        user=_str(d.get("user"), f"{where}.user", optional=True),
        key=key,
        ssh_alias=_str(d.get("ssh_alias"), f"{where}.ssh_alias", optional=True),
        python=_str(d.get("python", "python3"), f"{where}.python"),
        model_path=_str(d.get("model_path"), f"{where}.model_path", optional=True),
        worker_port=integer(d.get("worker_port", 0), f"{where}.worker_port", 0, 65535),
        cpus=cpus,
        cpu_quota=quota,
        mem_limit_bytes=None if mem_limit is None else parse_size(mem_limit, f"{where}.mem_limit"),
        address=address,
        via=_str(d.get("via"), f"{where}.via", optional=True),
    )


def _link(d: Any, where: str, src: str = "*", dst: str = "*") -> Link:
    d = _check_keys(d, {"mbps", "latency_ms"}, where)
    mbps = number(d.get("mbps"), f"{where}.mbps", allow_inf=True)
    if mbps <= 0:
        raise KitError(f"{where}.mbps: negative mbps {mbps!r}" if mbps < 0 else f"{where}.mbps: mbps must be > 0")
    lat = number(d.get("latency_ms", 0.0), f"{where}.latency_ms")
    if lat < 0:
        raise KitError(f"{where}.latency_ms: negative latency {lat!r}")
    return Link(src=src, dst=dst, mbps=mbps, latency_ms=lat)


def testbed_from_dict(data: Any, where: str = "<testbed>") -> Testbed:
    """Build and validate a Testbed from its YAML/JSON form; errors name `where` and the field."""
    try:
        return _testbed_from_dict(data, where)
    except KitError as e:
        msg = str(e)
        raise KitError(msg if msg.startswith(f"{where}:") else f"{where}: {msg}") from None


testbed_from_dict.__test__ = False  # type: ignore[attr-defined]  # pytest: not a test despite the name


def _testbed_from_dict(data: Any, where: str) -> Testbed:
    d = _check_keys(data, _TOP_KEYS, "top level")
    name = _str(d.get("name"), "name")
    if not _NAME_RE.match(name):
        raise KitError(f"name: {name!r} may hold only letters, digits, '_', '.', '-'")
    devs_raw = d.get("devices")
    if not isinstance(devs_raw, list) or not devs_raw:
        raise KitError("devices: expected a non-empty list of devices")
    devices = [_device(x, f"devices[{i}]") for i, x in enumerate(devs_raw)]
    seen: set[str] = set()
    for i, dev in enumerate(devices):
        if dev.name in seen:
            raise KitError(f"devices[{i}].name: duplicate device name {dev.name!r}")
        seen.add(dev.name)
    sources = [dev.name for dev in devices if dev.source]
    if len(sources) > 1:
        raise KitError(f"devices: two source devices: {', '.join(sources)} (exactly one may have source: true)")
    if not sources:
        raise KitError("devices: no source device (mark the device holding the prompt with source: true)")

    links_raw = d.get("links") or {}
    _check_keys(links_raw, {"default", "pairs"}, "links")
    default = _link(links_raw.get("default", {"mbps": None}), "links.default")
    pairs: list[Link] = []
    seen_pairs: set[tuple[str, str]] = set()
    pairs_raw = links_raw.get("pairs") or []
    if not isinstance(pairs_raw, list):
        raise KitError("links.pairs: expected a list of {src, dst, mbps, latency_ms}")
    for i, p in enumerate(pairs_raw):
        w = f"links.pairs[{i}]"
        _check_keys(p, _LINK_KEYS, w)
        for end in ("src", "dst"):
            if end not in p:
                raise KitError(f"{w}: missing field {end!r}")
            if not isinstance(p[end], str) or p[end] not in seen:
                raise KitError(f"{w}.{end}: unknown device {p[end]!r} (devices: {', '.join(dev.name for dev in devices)})")
        if p["src"] == p["dst"]:
            raise KitError(f"{w}: src and dst are both {p['src']!r}")
        if (p["src"], p["dst"]) in seen_pairs:
            raise KitError(f"{w}: duplicate link {p['src']} -> {p['dst']}")
        seen_pairs.add((p["src"], p["dst"]))
        pairs.append(_link({k: v for k, v in p.items() if k not in ("src", "dst")}, w, p["src"], p["dst"]))

    emu = d.get("emulation") or {"mode": "app"}
    _check_keys(emu, {"mode", "subnet", "gateways"}, "emulation")
    mode = emu.get("mode", "app")
    if mode not in ("app", "netns", "none"):
        raise KitError(f"emulation.mode: {mode!r} is not 'app', 'netns' or 'none'")
    subnet = emu.get("subnet")
    if subnet is not None:
        subnet = str(_private_net(subnet, "emulation.subnet", "10.77.0.0/24"))
    gateways = _gateways(emu.get("gateways"), devices, mode, subnet)
    if not isinstance(d.get("description") or "", str):
        raise KitError(f"description: {d['description']!r} is not a string")
    if mode == "netns":
        if subnet is None:
            raise KitError("emulation.subnet: netns mode needs a private subnet, e.g. 10.77.0.0/24")
        seen_addr: dict[str, str] = {}
        for i, dev in enumerate(devices):
            if dev.address is None:
                continue
            net = ipaddress.IPv4Network(gateways[dev.via] if dev.via else subnet)
            a = ipaddress.IPv4Address(dev.address)
            if a not in net or a in (net.network_address, net.broadcast_address):
                raise KitError(f"devices[{i}].address: {dev.address} is not a host address of {net}"
                               + (f" (the subnet behind {dev.via})" if dev.via else ""))
            if dev.address in seen_addr:
                raise KitError(f"devices[{i}].address: {dev.address} is also the address of {seen_addr[dev.address]}")
            seen_addr[dev.address] = dev.name
    return Testbed(name=name, devices=tuple(devices), links=tuple(pairs), default=default, emulation=mode,
                   subnet=subnet, path=where, description=str(d.get("description") or ""),
                   gateways=tuple(gateways.items()))


def _gateways(raw: Any, devices: list[Device], mode: str, subnet: str | None) -> dict[str, str]:
    """emulation.gateways ({gateway device: subnet behind it}) checked against the devices' `via` fields."""
    names = [dev.name for dev in devices]
    gws: dict[str, str] = {}
    if raw is not None and not isinstance(raw, dict):
        raise KitError("emulation.gateways: expected a mapping {gateway device: subnet behind it}")
    for g, net_s in (raw or {}).items():
        w = f"emulation.gateways.{g}"
        if g not in names:
            raise KitError(f"{w}: unknown device {g!r} (devices: {', '.join(names)})")
        if not any(dev.via == g for dev in devices):
            raise KitError(f"{w}: no device has via: {g}")
        net = _private_net(net_s, w, "10.77.1.0/24")
        for other, other_net in ([("emulation.subnet", subnet)] if subnet else []) + list(gws.items()):
            if net.overlaps(ipaddress.IPv4Network(other_net)):
                raise KitError(f"{w}: {net} overlaps {other} ({other_net})")
        gws[g] = str(net)
    by_name = {dev.name: dev for dev in devices}
    for i, dev in enumerate(devices):
        if dev.via is None:
            continue
        w = f"devices[{i}].via"
        if mode != "netns":
            raise KitError(f"{w}: only the emulated testbed (emulation.mode netns) places devices behind others; "
                           "for real hosts put ProxyJump in the ssh config (docs/ssh.md)")
        if dev.via not in by_name:
            raise KitError(f"{w}: unknown device {dev.via!r} (devices: {', '.join(names)})")
        if dev.via == dev.name:
            raise KitError(f"{w}: a device cannot be behind itself")
        if by_name[dev.via].via is not None:
            raise KitError(f"{w}: gateway {dev.via} is itself behind {by_name[dev.via].via} (one level of gateways)")
        if dev.launch != "ssh":
            raise KitError(f"{w}: a device behind a gateway is reached over SSH: set launch: ssh")
        if dev.via not in gws:
            raise KitError(f"{w}: no subnet behind {dev.via}: add emulation.gateways: {{{dev.via}: 10.77.1.0/24}}")
    return gws


def load_testbed(path: str | Path) -> Testbed:
    """Load and validate a testbed YAML (or JSON) file; KitError names the file and the field."""
    p = Path(path)
    where = str(path)
    if not p.is_file():
        raise KitError(f"{where}: no such testbed file")
    text = read_text(p)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise KitError(f"{where}: not valid YAML ({' '.join(str(e).split())[:200]})") from None
    except RecursionError:
        raise KitError(f"{where}: not valid YAML (nested too deeply)") from None
    except (ValueError, OverflowError) as e:  # a value YAML parses but Python cannot hold (a 5,000-digit int)
        raise KitError(f"{where}: not valid YAML ({str(e).split(':')[0][:120]})") from None
    return testbed_from_dict(check_size(data, where), where)


__all__ = ["Device", "Link", "Testbed", "load_testbed", "testbed_from_dict"]
