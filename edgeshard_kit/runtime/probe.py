"""The link probe: bandwidth and latency of every ordered pair of workers, measured over the kit's own wire."""

from __future__ import annotations

import argparse
import json
import statistics
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from edgeshard_kit.runtime import wire
from edgeshard_kit.runtime.launchers import WorkerHandle, launcher_for, new_token
from edgeshard_kit.testbed.inventory import parse_size
from edgeshard_kit.core.units import KitError

DEFAULT_SIZES = (64 * 1024, 1 << 20, 8 << 20)  # activation-sized and larger payloads, bytes
PING_BYTES = 64  # the ping-pong payload that measures latency, bytes


def probe_pair(src_conn: wire.Connection, dst: WorkerHandle, sizes: tuple[int, ...], repeats: int,
               shape: dict | None = None, timeout: float = 120.0) -> dict:
    """Ask the worker behind `src_conn` to send payloads to `dst`; its per-size round-trip times (ms)."""
    src_conn.send("probe_send", host=dst.host, port=dst.port, sizes=[PING_BYTES, *sizes], repeats=repeats,
                  shape=shape)
    src_conn.settimeout(timeout)
    try:
        while True:
            f = src_conn.recv()
            if f.kind == "probe_result":
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


def probe_testbed(testbed: Any, sizes: tuple[int, ...] = DEFAULT_SIZES, repeats: int = 3,
                  devices: list[str] | None = None, launch_opts: dict | None = None) -> dict:
    """Start a worker on every device, probe every ordered pair; {"records", "links"} for the planner."""
    names = devices or testbed.names
    if len(names) < 2:
        raise KitError("probing needs at least two devices")
    from edgeshard_kit.runtime.deployment import default_launch_opts
    token = new_token()
    opts = default_launch_opts(testbed) if launch_opts is None else launch_opts
    handles: list[WorkerHandle] = []
    conns: list[wire.Connection] = []
    try:
        with ThreadPoolExecutor(max_workers=len(names)) as ex:
            futs = [ex.submit(lambda d: launcher_for(d, **opts.get(d.launch, {})).start(d, token), testbed.device(n))
                    for n in names]
            for f in futs:
                handles.append(f.result())
        for h in handles:
            c = wire.connect(h.host, h.port, token, timeout=30.0)
            c.send("role", role="control")
            conns.append(c)
        records, pairs = [], []
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                if i == j:
                    continue
                shape = None
                if getattr(testbed, "emulation", "app") == "app":
                    ln = testbed.link(a, b)
                    if ln.shaped or ln.latency_ms:
                        shape = {"mbps": ln.mbps if ln.shaped else None, "latency_ms": ln.latency_ms}
                times = probe_pair(conns[i], handles[j], tuple(sizes), repeats, shape)
                mbps, lat, recs = link_figures(times)
                records += [{"src": a, "dst": b, **r} for r in recs]
                pairs.append({"src": a, "dst": b, "mbps": round(mbps, 3), "latency_ms": round(lat, 4)})
    finally:
        for c in conns:
            try:
                c.send("shutdown")
            except OSError:
                pass
            c.close()
        for h in handles:
            h.stop(3.0)
    default = {"mbps": statistics.median(p["mbps"] for p in pairs),
               "latency_ms": statistics.median(p["latency_ms"] for p in pairs)}
    return {"records": records, "links": {"default": default, "pairs": pairs}}


def _cmd_probe(args: argparse.Namespace) -> int:
    from edgeshard_kit.testbed.inventory import load_testbed

    tb = load_testbed(args.testbed)
    sizes = tuple(parse_size(s.strip(), "--sizes") for s in args.sizes.split(",") if s.strip())
    out = probe_testbed(tb, sizes, args.repeats)
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{'src':>12s} -> {'dst':12s} {'bytes':>10s} {'median ms':>10s} {'Mbps':>10s}")
    for r in out["records"]:
        mbps = f"{r['mbps']:.1f}" if r["mbps"] else "-"
        print(f"{r['src']:>12s} -> {r['dst']:12s} {r['bytes']:>10d} {r['ms_median']:>10.3f} {mbps:>10s}")
    print("links section for the testbed / planner:")
    print(json.dumps(out["links"], indent=1))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("probe", help="measure bandwidth and latency between every ordered pair of devices")
    p.add_argument("--testbed", required=True, help="testbed inventory YAML")
    p.add_argument("--sizes", default="64KiB,1MiB,8MiB", help="payload sizes (default 64KiB,1MiB,8MiB)")
    p.add_argument("--repeats", type=int, default=3, help="repeats per size after one warm-up (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object {records, links}")
    p.set_defaults(func=_cmd_probe)
