"""The testbed inventory: shipped files load, round trip, and every bad field is named with its file."""

import copy
import json
import math
from pathlib import Path

import pytest
import yaml

from edgeshard_kit.testbed import inventory as tbm
from edgeshard_kit.testbed.inventory import Device, Link, Testbed, load_testbed
from edgeshard_kit.core.numbers import format_size, parse_size
from edgeshard_kit.core.errors import KitError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["local.yaml", "emulated.yaml", "jetson-cluster.example.yaml"]

BASE = {
    "name": "t",
    "devices": [
        {"name": "edge", "type": "cpu", "memory": "1GiB", "source": True},
        {"name": "cloud", "type": "gpu", "memory": 4 * 2**30, "cloud": True, "launch": "ssh", "host": "10.0.0.2"},
    ],
    "links": {"default": {"mbps": 100, "latency_ms": 1.0},
              "pairs": [{"src": "edge", "dst": "cloud", "mbps": 10, "latency_ms": 5.0}]},
    "emulation": {"mode": "app"},
}


def _write(tmp_path: Path, data: dict, name: str = "x.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_testbeds_load_and_round_trip(name, tmp_path):
    tb = load_testbed(ROOT / "testbed" / name)
    assert sum(d.source for d in tb.devices) == 1
    again = load_testbed(tb.save(tmp_path / name))
    assert again.to_dict() == tb.to_dict()
    assert json.loads(json.dumps(tb.to_dict())) == tb.to_dict()  # JSON-safe (unshaped = null)


def test_shipped_contents():
    local = load_testbed(ROOT / "testbed" / "local.yaml")
    assert len(local.devices) == 3 and local.emulation == "app" and not local.default.shaped
    assert all(d.launch == "local" for d in local.devices)
    emu = load_testbed(ROOT / "testbed" / "emulated.yaml")
    assert emu.emulation == "netns" and emu.subnet == "10.77.0.0/24"
    assert [d.name for d in emu.devices if d.cloud] == ["cloud"] and len(emu.devices) == 5
    assert all(d.cpu_quota and d.mem_limit_bytes and d.address for d in emu.devices)
    assert emu.link("edge1", "cloud").mbps < emu.link("edge1", "edge2").mbps
    jet = load_testbed(ROOT / "testbed" / "jetson-cluster.example.yaml")
    assert all(d.launch == "ssh" and d.python and d.model_path for d in jet.devices)
    assert jet.device("agx0").ssh_alias == "agx0"


def test_link_lookup_and_api(tmp_path):
    tb = load_testbed(_write(tmp_path, BASE))
    assert tb.source.name == "edge" and tb.names == ["edge", "cloud"]
    assert tb.link("edge", "cloud") == Link("edge", "cloud", 10.0, 5.0)
    assert tb.link("cloud", "edge") == Link("cloud", "edge", 100.0, 1.0)  # ordered: reverse takes the default
    assert tb.link("edge", "edge").mbps == math.inf and tb.link("edge", "edge").latency_ms == 0.0
    assert tb.rtt_ms("edge", "cloud") == 6.0
    assert tb.link("edge", "cloud").bytes_per_s == 10e6 / 8
    assert tb.device("cloud").memory_bytes == 4 * 2**30 and tb.device("cloud").cloud
    assert tb.path == str(tmp_path / "x.yaml")
    with pytest.raises(KitError, match="unknown device 'cluod'"):
        tb.device("cluod")
    sub = tb.with_devices([tb.device("edge")])
    assert sub.names == ["edge"]


def test_sizes():
    assert parse_size("4GiB") == 4 * 2**30
    assert parse_size("512MB") == 512 * 10**6
    assert parse_size("1.5 GiB") == 3 * 2**29
    assert parse_size(1234) == 1234
    assert parse_size("2kib") == 2048
    for bad in ("4 GB?", "GiB", "-1", True, [1], "1e9"):
        with pytest.raises(KitError, match="is not a size"):
            parse_size(bad, "memory")
    assert format_size(4 * 2**30) == "4GiB" and format_size(1000) == "1000" and format_size(3 * 2**29) == "1536MiB"


def _mutated(path: str, value):
    d = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = d
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    if value is DELETE:
        del node[int(last) if last.isdigit() else last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return d


DELETE = object()
BAD = [
    ("devices.1.memory", "4 GB?", "devices[1].memory: '4 GB?' is not a size"),
    ("links.pairs.0.dst", "cluod", "links.pairs[0].dst: unknown device 'cluod'"),
    ("devices.1.source", True, "two source devices: edge, cloud"),
    ("devices.0.source", False, "no source device"),
    ("links.pairs.0.mbps", -5, "links.pairs[0].mbps: negative mbps"),
    ("links.default.mbps", 0, "links.default.mbps: mbps must be > 0"),
    ("links.pairs.0.latency_ms", -1, "links.pairs[0].latency_ms: negative latency"),
    ("links.pairs.0.mbps", "fast", "links.pairs[0].mbps: 'fast' is not a number"),
    ("devices.1.name", "edge", "devices[1].name: duplicate device name 'edge'"),
    ("devices.1.name", "a b", "devices[1].name: 'a b' may hold only"),
    ("devices.0.launch", "rsh", "devices[0].launch: 'rsh' is not 'local' or 'ssh'"),
    ("devices.0.memroy", "1GiB", "devices[0]: unknown field 'memroy'"),
    ("devices.0.type", DELETE, "devices[0]: missing field 'type'"),
    ("devices.1.port", 70000, "devices[1].port: 70000 is not an integer"),
    ("devices.0.cpu_quota", 0, "devices[0].cpu_quota: 0.0 must be > 0"),
    ("devices.0.cpus", [0, "x"], "devices[0].cpus[1]: 'x' is not an integer"),
    ("devices.0.mem_limit", "lots", "devices[0].mem_limit: 'lots' is not a size"),
    ("devices.0.address", "10.0.0.300", "devices[0].address: '10.0.0.300' is not an IPv4 address"),
    ("devices", [], "devices: expected a non-empty list"),
    ("emulation.mode", "tc", "emulation.mode: 'tc' is not 'app', 'netns' or 'none'"),
    ("emulation.subnet", "8.8.8.0/24", "emulation.subnet: '8.8.8.0/24' is not a private network"),
    ("emulation.mode", "netns", "emulation.subnet: netns mode needs a private subnet"),
    ("links.pairs.0.dst", "edge", "links.pairs[0]: src and dst are both 'edge'"),
    ("nmae", "x", "top level: unknown field 'nmae'"),
]


@pytest.mark.parametrize("path,value,message", BAD, ids=[b[2][:40] for b in BAD])
def test_errors_name_file_and_field(tmp_path, path, value, message):
    f = _write(tmp_path, _mutated(path, value))
    with pytest.raises(KitError) as e:
        load_testbed(f)
    text = str(e.value)
    assert text.startswith(f"{f}: "), text
    assert message in text, text
    assert "\n" not in text


def test_netns_address_checks(tmp_path):
    d = _mutated("emulation", {"mode": "netns", "subnet": "10.77.0.0/24"})
    d["devices"][0]["address"] = "10.78.0.5"
    with pytest.raises(KitError, match=r"devices\[0\].address: 10.78.0.5 is not a host address of 10.77.0.0/24"):
        tbm.testbed_from_dict(d, "f.yaml")
    d["devices"][0]["address"] = d["devices"][1]["address"] = "10.77.0.5"
    with pytest.raises(KitError, match=r"f.yaml: devices\[1\].address: 10.77.0.5 is also the address of edge"):
        tbm.testbed_from_dict(d, "f.yaml")


def test_duplicate_pair_and_files(tmp_path):
    d = copy.deepcopy(BASE)
    d["links"]["pairs"].append(dict(d["links"]["pairs"][0]))
    with pytest.raises(KitError, match=r"links.pairs\[1\]: duplicate link edge -> cloud"):
        load_testbed(_write(tmp_path, d))
    with pytest.raises(KitError, match="no such testbed file"):
        load_testbed(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    with pytest.raises(KitError, match="broken.yaml: not valid YAML"):
        load_testbed(tmp_path / "broken.yaml")


def test_unshaped_spellings_and_dataclass_round_trip(tmp_path):
    for spelling in (None, "inf", "unlimited", float("inf")):
        d = _mutated("links.default.mbps", spelling)
        assert not tbm.testbed_from_dict(d).default.shaped
    tb = tbm.testbed_from_dict(BASE, "mem")
    dev = tb.device("edge")
    assert isinstance(dev, Device) and isinstance(tb, Testbed)
    with pytest.raises(Exception):
        dev.name = "other"  # frozen
    assert tbm.testbed_from_dict(tb.to_dict()).to_dict() == tb.to_dict()


def test_cli_check(tmp_path, capsys):
    from edgeshard_kit.cli.main import main

    assert main(["testbed", "check", str(ROOT / "testbed" / "emulated.yaml")]) == 0
    assert "cloud" in capsys.readouterr().out
    f = _write(tmp_path, _mutated("devices.1.memory", "4 GB?"))
    assert main(["testbed", "check", str(f)]) == 2
    assert "devices[1].memory" in capsys.readouterr().err


def test_netns_names_and_ssh_resolution_without_root(tmp_path, monkeypatch):
    from edgeshard_kit.testbed import netns

    monkeypatch.setenv("EDGESHARD_STATE_DIR", str(tmp_path / "state"))
    jet = load_testbed(ROOT / "testbed" / "jetson-cluster.example.yaml")
    assert netns.resolve_ssh(jet, "agx0")["host"] == "agx0"  # an ~/.ssh/config alias
    nx1 = netns.resolve_ssh(jet, "nx1")
    assert (nx1["host"], nx1["user"], nx1["port"]) == ("192.168.1.21", "nvidia", 22) and nx1["key"].endswith("_jetson")
    assert netns.launch_opts(jet) == {}
    emu = load_testbed(ROOT / "testbed" / "emulated.yaml")
    assert netns.addresses(emu)["cloud"] == "10.77.0.20" and netns.bridge_address(emu) == "10.77.0.1"
    assert netns.namespace_name(emu, "edge1") == "es-emulated-edge1"
    assert all(len(n) <= 15 for n in [netns.bridge_name(emu), *(netns.veth_name(emu, d) for d in emu.names)])
    with pytest.raises(KitError, match="testbed emulated is not up: run `edgeshard testbed up"):
        netns.resolve_ssh(emu, "edge0")
    with pytest.raises(KitError, match="is not up"):
        netns.launch_opts(emu)


def test_up_without_root_says_app_level_emulation_is_used(monkeypatch):
    import os

    from edgeshard_kit.testbed import netns

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(KitError, match="needs root.*app-level emulation"):
        netns.testbed_up(load_testbed(ROOT / "testbed" / "emulated.yaml"))
