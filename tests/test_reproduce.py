"""The paper reproduction by simulation: its testbed, and the shape and sense of the results."""

from __future__ import annotations

import csv

import pytest

from edgeshard_kit.cli.main import main
from edgeshard_kit.experiments.paper import COLUMNS, paper_inventory, paper_problem, reproduce
from edgeshard_kit.planning.dp import solve
from edgeshard_kit.testbed.inventory import Testbed


def test_paper_problem_7b():
    p = paper_problem("llama2-7b", cloud_mbps=20)
    assert p.n_units == 34 and len(p.devices) == 15
    assert p.devices[p.source].name == "agx0"
    assert sum(d.cloud for d in p.devices) == 1
    # edge-edge 1000 Mbps, cloud links 20 Mbps, both + 2.1 ms per message
    assert p.transfer_ms("agx0", "agx1", 65536) == pytest.approx(2.1 + 65536 * 8 / 1e6)
    assert p.transfer_ms("agx0", "rtx0", 65536) == pytest.approx(2.1 + 65536 * 8 / 20e3)
    # at 20 Mbps the latency optimum (agx0: units 0-5, RTX 3090: 5-34) is the paper's 75.88 ms/token, nearly
    assert solve(p, "latency").latency_ms == pytest.approx(75.688, abs=0.01)
    assert p.return_bytes == 4  # one token id back per sequence, as the reproduction prices it


def test_paper_testbed_is_an_inventory():
    tb = paper_inventory(20)
    assert isinstance(tb, Testbed) and tb.source.name == "agx0" and len(tb.devices) == 15
    assert [d.name for d in tb.devices if d.cloud] == ["rtx0"]
    assert tb.link("rtx0", "agx3").mbps == 20 and tb.link("agx3", "nx1").mbps == 1000
    assert tb.device("nx0").memory_bytes == 14 * 2**30


def test_reproduce_rows():
    rows = reproduce(models=("llama2-7b", "llama2-70b"), cloud_mbps=(50,), tokens=4)
    assert set(rows[0]) == set(COLUMNS)
    by = {(r["model"], r["method"], r["objective"], r["schedule"]): r for r in rows}
    es_lat = by[("llama2-7b", "edgeshard", "latency", "sequential")]
    for m in ("Edge-Solo", "Cloud-Edge-Even", "Cloud-Edge-Opt", "Memory-Proportional"):
        b = by[("llama2-7b", m, "latency", "sequential")]
        assert b["feasible"] and es_lat["latency_ms"] <= b["latency_ms"] + 1e-6
    es_thr = by[("llama2-7b", "edgeshard", "throughput", "no-bubbles")]
    assert es_thr["throughput_per_s"] > by[("llama2-7b", "edgeshard", "throughput", "bubbles")]["throughput_per_s"]
    # 70B: every paper baseline is out of memory, EdgeShard fits
    for m in ("Edge-Solo", "Cloud-Edge-Even", "Cloud-Edge-Opt"):
        r = by[("llama2-70b", m, "latency", "sequential")]
        assert r["feasible"] is False and "out of memory" in r["reason"] and r["latency_ms"] == ""
    assert by[("llama2-70b", "edgeshard", "latency", "sequential")]["feasible"]
    assert by[("llama2-7b", "Edge-Solo", "latency", "sequential")]["stages"] == "agx0[0:34)"


def test_cli_writes_csv(tmp_path, capsys):
    out = tmp_path / "r.csv"
    assert main(["reproduce-paper", "--out", str(out), "--models", "llama2-7b", "--cloud-mbps", "1,50",
                 "--tokens", "2"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert {"model", "method", "cloud_mbps", "latency_ms", "throughput_per_s", "feasible"} <= set(rows[0])
    assert {r["cloud_mbps"] for r in rows} == {"1.0", "50.0"}
    assert "edgeshard" in capsys.readouterr().out
