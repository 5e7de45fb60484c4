"""The experiments' testbeds: the built-in local one, cloud links set per swept bandwidth, memory scaled to a model."""

from __future__ import annotations

import os
from pathlib import Path

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.testbed import netns
from edgeshard_kit.testbed.inventory import Testbed, load_testbed, testbed_from_dict

EMULATED = Path(__file__).resolve().parents[2] / "testbed" / "emulated.yaml"  # ships with the repository


def model_bytes(checkpoint: str | Path) -> int:
    """Bytes of the checkpoint's weight files."""
    return sum(p.stat().st_size for p in Path(checkpoint).glob("*.safetensors"))


def bench_testbed(checkpoint: str | Path, cloud_mbps: float, edges: int = 3, lan_mbps: float = 100.0,
                  cloud_latency_ms: float = 1.0) -> Testbed:
    """A local testbed: `edges` edge processes (each too small for the whole model) and a cloud behind a shaped link."""
    size = model_bytes(checkpoint)
    # Two edge devices together hold ~80% of the model: Edge-Solo runs out of memory, the edges alone
    # need all three, and the cloud (4x the model) is the way out: the same forces as in the paper.
    edge_mem, cloud_mem = int(size * 0.45), int(size * 4)
    devs = [{"name": f"edge{i}", "type": "cpu-local", "memory": edge_mem, "source": i == 0, "launch": "local"}
            for i in range(edges)]
    devs.append({"name": "cloud", "type": "cpu-local", "memory": cloud_mem, "cloud": True, "launch": "local"})
    pairs = [{"src": a, "dst": b, "mbps": cloud_mbps, "latency_ms": cloud_latency_ms}
             for i in range(edges) for a, b in ((f"edge{i}", "cloud"), ("cloud", f"edge{i}"))]
    return testbed_from_dict({"name": f"bench-cloud-{cloud_mbps:g}Mbps", "devices": devs,
                              "links": {"default": {"mbps": lan_mbps, "latency_ms": 0.0}, "pairs": pairs},
                              "emulation": {"mode": "app"}}, "bench testbed")


def with_cloud_mbps(testbed: Testbed, cloud_mbps: float) -> Testbed:
    """The testbed with every link to or from a cloud device set to `cloud_mbps`."""
    d = testbed.to_dict()
    clouds = {x.name for x in testbed.devices if x.cloud}
    if not clouds:
        raise KitError(f"testbed {testbed.name}: no device is marked cloud: true (needed for the bandwidth sweep)")
    names = [x.name for x in testbed.devices]
    links = d.setdefault("links", {})
    pairs = [p for p in links.get("pairs", []) if p["src"] not in clouds and p["dst"] not in clouds]
    for c in clouds:
        for n in names:
            if n != c:
                lat = testbed.link(n, c).latency_ms
                pairs += [{"src": n, "dst": c, "mbps": cloud_mbps, "latency_ms": lat},
                          {"src": c, "dst": n, "mbps": cloud_mbps, "latency_ms": lat}]
    links["pairs"] = pairs
    return testbed_from_dict(d, f"{testbed.name} at {cloud_mbps:g} Mbps")


def scale_memory(testbed: Testbed, checkpoint: str | Path, source_share: float = 0.45) -> Testbed:
    """The testbed with every memory budget scaled by one factor, so that the source holds `source_share` of the model.

    A testbed file describes its devices for real models; a tiny checkpoint fits anywhere, and then there is
    nothing to plan. Scaling every budget alike keeps the file's proportions between devices.
    """
    if not 0 < source_share:
        raise KitError(f"memory share must be > 0 (got {source_share})")
    factor = source_share * model_bytes(checkpoint) / testbed.source.memory_bytes
    d = testbed.to_dict()
    for dev in d["devices"]:
        dev["memory"] = int(testbed.device(dev["name"]).memory_bytes * factor)
    return testbed_from_dict(d, f"{testbed.name} (memory x{factor:.3g})")


def fit_cpu(testbed: Testbed, cores: float | None = None) -> Testbed:
    """The testbed with every CPU quota scaled by one factor, so that together they fit `cores` (this host's).

    An emulated device is only as fast as its quota when the host can give it that CPU time: quotas that add up
    to more cores than the host has (emulated.yaml asks for 4.5 on a 2-core machine) let the host's contention,
    not the quota, set every device's speed, and a device of 2 cores worth (2 torch threads) is then slower
    than one of 1 (measured: 6.9 s vs 0.19 s per SmolLM2 token, OpenMP threads waiting for each other on busy
    cores). Scaled, every quota stays below one core (one torch thread) and the file's speed ratios are kept.
    Quotas that fit already are left as they are.
    """
    cores = float(cores or os.cpu_count() or 1)
    total = sum(d.cpu_quota for d in testbed.devices if d.cpu_quota)
    if total <= cores:
        return testbed
    factor = cores / total
    d = testbed.to_dict()
    for dev in d["devices"]:
        if dev.get("cpu_quota"):
            dev["cpu_quota"] = round(float(dev["cpu_quota"]) * factor, 4)
    return testbed_from_dict(d, f"{testbed.name} (cpu quota x{factor:.3g} to fit {cores:g} cores)")


def sweep_testbed(base: Testbed):
    """mbps -> `base` with its cloud links at mbps; on an emulated testbed that is up, tc is re-shaped to match."""
    def at(mbps: float) -> Testbed:
        tb = with_cloud_mbps(base, mbps)
        if tb.emulation == "netns":
            netns.reshape(tb)
        return tb
    return at


def default_testbed(checkpoint: str | Path, cloud_mbps: float, prefer: str = "auto") -> tuple[Testbed, str]:
    """(testbed, why): testbed/emulated.yaml (memory scaled to the model, CPU quotas fitted to the host: fit_cpu)
    when this host can emulate, else local.

    `prefer`: "auto", "emulated" (KitError when the host cannot) or "local" (bench_testbed: app-level shaping).
    """
    why = netns.unavailable()
    if prefer == "emulated" and why:
        raise KitError(f"emulated testbed requested: {why}")
    if prefer == "local" or why:
        return bench_testbed(checkpoint, cloud_mbps), why or "local testbed requested"
    if not EMULATED.is_file():
        raise KitError(f"{EMULATED}: the emulated testbed file is missing (it ships with the repository)")
    tb = fit_cpu(scale_memory(load_testbed(EMULATED), checkpoint))
    quotas = ", ".join(f"{d.name} {d.cpu_quota:g}" for d in tb.devices if d.cpu_quota)
    return tb, f"emulated ({EMULATED}; cpu quotas fitted to this host's {os.cpu_count()} cores: {quotas})"
