"""The link probe: bandwidth and latency of every ordered pair of workers, measured over the kit's own wire."""

from __future__ import annotations

import statistics
from dataclasses import asdict

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.model.checkpoint import load_llama_config
from edgeshard_kit.planning.problem import TOKEN_ID_BYTES
from edgeshard_kit.runtime import wire
from edgeshard_kit.runtime.launch import LaunchOptions, default_launch_options, link_shape, start_workers
from edgeshard_kit.runtime.launchers import WorkerHandle
from edgeshard_kit.runtime.protocol import Kind, LinkShape, Role, new_token
from edgeshard_kit.testbed.inventory import Testbed

DEFAULT_SIZES = (64 * 1024, 1 << 20, 8 << 20)  # activation-sized and larger payloads, bytes
PING_BYTES = 64  # the ping-pong payload that measures latency, bytes


def message_sizes(profile, micro_batch_size: int = 1) -> tuple[int, ...]:
    """The payloads (bytes) a deployment of `profile`'s model sends on a link per decode step: the token id
    back to the source and the activation between two stages (hidden x dtype bytes per row of a micro-batch)."""
    batch = max(int(profile.batch or 1), 1)
    act = max(profile.out_bytes_per_token()[:-1]) // batch * micro_batch_size
    return (TOKEN_ID_BYTES * micro_batch_size, int(act))


def checkpoint_message_sizes(checkpoint, dtype_bytes: int = 4, micro_batch_size: int = 1) -> tuple[int, ...]:
    """message_sizes from a checkpoint's config.json alone (no profile): the token id (8 bytes a row) and one
    decode activation (hidden_size x dtype_bytes a row), bytes."""
    hidden = int(load_llama_config(checkpoint).hidden_size)
    return (TOKEN_ID_BYTES * micro_batch_size, hidden * dtype_bytes * micro_batch_size)


def measured_links(testbed: Testbed, sizes: tuple[int, ...], repeats: int = 3,
                   launch_opts: LaunchOptions | dict | None = None) -> tuple[dict, list[dict]]:
    """({(src, dst): (goodput Mbps, one-way latency ms)}, per-size records) of every ordered pair, probed at
    `sizes` (message_sizes: what the model sends): planning.build.LinkModel's `measured`."""
    out = probe_testbed(testbed, tuple(sizes), repeats, launch_opts=launch_opts)
    return {(p["src"], p["dst"]): (float(p["mbps"]), float(p["latency_ms"])) for p in out["links"]["pairs"]}, \
        out["records"]


def probe_pair(src_conn: wire.Connection, dst: WorkerHandle, sizes: tuple[int, ...], repeats: int,
               shape: LinkShape | None = None, timeout: float = 120.0) -> dict:
    """Ask the worker behind `src_conn` to send payloads to `dst`; its per-size round-trip times (ms)."""
    src_conn.send(Kind.PROBE_SEND, host=dst.host, port=dst.port, sizes=[PING_BYTES, *sizes], repeats=repeats,
                  shape=None if shape is None else asdict(shape))
    src_conn.settimeout(timeout)
    try:
        while True:
            f = src_conn.recv()
            if f.kind == Kind.PROBE_RESULT:
                break
    finally:
        src_conn.settimeout(None)
    if f.get("error"):
        raise KitError(f"probe to {dst.device} ({dst.host}:{dst.port}) failed: {f.get('error')}")
    return {int(r["bytes"]): r["ms"] for r in f["results"]}


def link_figures(times: dict[int, list[float]]) -> tuple[float, float, list[dict]]:
    """(mbps, one-way latency ms, per-size records) from round-trip times: rtt(size) = rtt(ping) + size / rate."""
    ping = statistics.median(times[PING_BYTES])
    recs = []
    for size, ms in sorted(times.items()):
        med = statistics.median(ms)
        extra = med - ping  # the time the payload itself took on the link, ms
        mbps = size * 8 / (extra * 1e3) if size > PING_BYTES and extra > 0 else None
        recs.append({"bytes": size, "ms_min": min(ms), "ms_median": med, "ms_max": max(ms), "mbps": mbps})
    rates = [r["mbps"] for r in recs if r["mbps"] is not None]
    big = [r for r in recs if r["mbps"] is not None and r["bytes"] == max(times)]
    mbps = big[0]["mbps"] if big else (max(rates) if rates else float("inf"))
    return mbps, ping / 2, recs


def probe_testbed(testbed: Testbed, sizes: tuple[int, ...] = DEFAULT_SIZES, repeats: int = 3,
                  devices: list[str] | None = None, launch_opts: LaunchOptions | dict | None = None) -> dict:
    """Start a worker on every device, probe every ordered pair; {"records", "links"} for the planner."""
    names = devices or testbed.names
    if len(names) < 2:
        raise KitError("probing needs at least two devices")
    token = new_token()
    opts = default_launch_options(testbed) if launch_opts is None else LaunchOptions.of(launch_opts)
    handles = start_workers([testbed.device(n) for n in names], token, opts)
    conns: list[wire.Connection] = []
    try:
        for h in handles:
            c = wire.connect(h.host, h.port, token, timeout=30.0)
            c.send(Kind.ROLE, role=Role.CONTROL)
            conns.append(c)
        records, pairs = [], []
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                if i == j:
                    continue
                times = probe_pair(conns[i], handles[j], tuple(sizes), repeats, link_shape(testbed, a, b))
                mbps, lat, recs = link_figures(times)
                records += [{"src": a, "dst": b, **r} for r in recs]
                pairs.append({"src": a, "dst": b, "mbps": round(mbps, 3), "latency_ms": round(lat, 4)})
    finally:
        for c in conns:
            try:
                c.send(Kind.SHUTDOWN)
            except OSError:
                pass
            c.close()
        for h in handles:
            h.stop(3.0)
    default = {"mbps": statistics.median(p["mbps"] for p in pairs),
               "latency_ms": statistics.median(p["latency_ms"] for p in pairs)}
    return {"records": records, "links": {"default": default, "pairs": pairs}}
