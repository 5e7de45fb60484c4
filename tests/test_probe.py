"""The link probe: every ordered pair measured over the kit's wire; an app-shaped link is seen at its rate."""

import json
import subprocess
import sys

import pytest

from edgeshard_kit.testbed import inventory as tbmod
from edgeshard_kit.runtime.probe import PING_BYTES, link_figures, probe_testbed


def test_link_figures_from_round_trips():
    # rtt(size) = 2 ms + size / (1 MB/s): 1 MB takes 1000 ms more than the ping.
    mbps, lat, recs = link_figures({PING_BYTES: [2.0, 2.0, 2.0], 1_000_000: [1002.0, 1002.0, 1003.0]})
    assert mbps == pytest.approx(8.0)
    assert lat == pytest.approx(1.0)
    assert [r["bytes"] for r in recs] == [PING_BYTES, 1_000_000]


def test_probe_every_ordered_pair_with_a_shaped_link(local_testbed):
    tb = local_testbed(3, names=["a", "b", "c"], links={
        "default": {"mbps": None}, "pairs": [{"src": "a", "dst": "c", "mbps": 40, "latency_ms": 0.0}]})
    out = probe_testbed(tb, sizes=(64 * 1024, 512 * 1024), repeats=2)
    pairs = {(p["src"], p["dst"]): p for p in out["links"]["pairs"]}
    assert set(pairs) == {(x, y) for x in "abc" for y in "abc" if x != y}
    # The token bucket holds a -> c to 40 Mbps (it can only be slower under load, never faster).
    assert pairs[("a", "c")]["mbps"] <= 40 * 1.1
    assert pairs[("a", "b")]["mbps"] > pairs[("a", "c")]["mbps"]
    assert {"default", "pairs"} == set(out["links"]) and out["links"]["default"]["mbps"] > 0
    assert all(r["ms_median"] > 0 for r in out["records"])
    # The links section drops into a testbed inventory as it is.
    tbmod.testbed_from_dict({**tb.to_dict(), "links": out["links"]})


def test_probe_cli_json(tmp_path):
    path = tmp_path / "tb.yaml"
    path.write_text("name: t\ndevices:\n  - {name: a, type: cpu, memory: 1GiB, source: true}\n"
                    "  - {name: b, type: cpu, memory: 1GiB}\n")
    out = subprocess.run([sys.executable, "-m", "edgeshard_kit", "probe", "--testbed", str(path), "--json",
                          "--sizes", "64KiB", "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert len(data["links"]["pairs"]) == 2
