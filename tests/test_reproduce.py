"""The paper reproduction by simulation: its testbed, and the shape and sense of the results."""

from __future__ import annotations

import csv
import math
import re
from dataclasses import replace

import pytest

from edgeshard_kit.cli.main import main
from edgeshard_kit.experiments.paper import COLUMNS, paper_inventory, paper_problem, reproduce
from edgeshard_kit.core.numbers import human_sizes, plural
from edgeshard_kit.core.units import Stage
from edgeshard_kit.planning.baselines import baselines
from edgeshard_kit.planning.dp import solve
from edgeshard_kit.planning.objectives import BASELINE_NAMES, METHOD_NAMES, solve_objective
from edgeshard_kit.planning.plan import EDGESHARD_METHOD, figures
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


ES_LAT, ES_STEADY, ES_K = (METHOD_NAMES[o] for o in ("latency", "throughput-steady", "throughput"))


def test_reproduce_rows():
    rows = reproduce(models=("llama2-7b", "llama2-70b"), cloud_mbps=(50,), tokens=4)
    assert set(rows[0]) == set(COLUMNS)
    assert {r["method"] for r in rows} == {ES_LAT, ES_STEADY, ES_K, *BASELINE_NAMES}  # one naming
    by = {(r["model"], r["method"], r["objective"], r["schedule"]): r for r in rows}
    es_lat = by[("llama2-7b", ES_LAT, "latency", "sequential")]
    for m in BASELINE_NAMES:
        b = by[("llama2-7b", m, "latency", "sequential")]
        assert b["feasible"] and es_lat["latency_ms"] <= b["latency_ms"] + 1e-6
    es_thr = by[("llama2-7b", ES_STEADY, "throughput", "no-bubbles")]
    assert es_thr["throughput_per_s"] > by[("llama2-7b", ES_STEADY, "throughput", "bubbles")]["throughput_per_s"]
    # 70B: every paper baseline is out of memory, EdgeShard fits
    for m in ("Edge-Solo", "Cloud-Edge-Even", "Cloud-Edge-Opt"):
        r = by[("llama2-70b", m, "latency", "sequential")]
        assert r["feasible"] is False and "out of memory" in r["reason"] and r["latency_ms"] == ""
        assert "GiB" in r["reason"]  # sizes with binary units
    assert by[("llama2-70b", ES_LAT, "latency", "sequential")]["feasible"]
    assert by[("llama2-7b", "Edge-Solo", "latency", "sequential")]["stages"] == "agx0[0:34)"


def _fill(plan) -> int:  # micro-batches that keep a pipeline full, from the plan's figures
    return max(len(plan.stages), math.ceil(plan.latency_ms / plan.bottleneck_ms - 1e-9))


def test_every_method_of_a_setting_is_simulated_at_the_same_k():
    rows = reproduce(models=("llama2-70b",), cloud_mbps=(10, 50), tokens=4)
    for mbps in (10, 50):
        thr = [r for r in rows if r["cloud_mbps"] == mbps and r["objective"] == "throughput"]
        ks = {r["micro_batches"] for r in thr}
        assert len(ks) == 1, ks  # one K for every method and schedule of the setting
        (k,) = ks
        # K fills every feasible throughput plan's pipeline (brute force over the plans the rows came from)
        problem = paper_problem("llama2-70b", mbps)
        plans = [solve_objective(problem, "throughput-steady")] + baselines(problem, "throughput")
        assert k == max(_fill(p) for p in plans if p.feasible)
        # at the same K, a plan with EdgeShard's bottleneck cannot show more tokens/s than EdgeShard (issue 15.4)
        nb = {r["method"]: r for r in thr if r["schedule"] == "no-bubbles"}
        for m in BASELINE_NAMES:
            if nb[m]["feasible"]:
                assert nb[m]["throughput_per_s"] <= nb[ES_STEADY]["throughput_per_s"] + 1e-9
        assert nb[ES_K]["throughput_per_s"] >= nb[ES_STEADY]["throughput_per_s"] - 1e-9  # the best at K
    assert {r["micro_batches"] for r in rows if r["objective"] == "latency"} == {1}


def test_a_given_k_is_used_for_every_method():
    rows = reproduce(models=("llama2-7b",), cloud_mbps=(20,), tokens=4, micro_batches=4)
    thr = [r for r in rows if r["objective"] == "throughput"]
    assert {r["micro_batches"] for r in thr} == {4} and len({r["method"] for r in thr}) == 6
    nb = {r["method"]: r for r in thr if r["schedule"] == "no-bubbles"}
    # with 4 micro-batches the K-aware plan is the better one (the steady-state DP assumes a full pipeline)
    assert nb[ES_K]["throughput_per_s"] >= nb[ES_STEADY]["throughput_per_s"]


def test_cli_writes_csv(tmp_path, capsys):
    out = tmp_path / "r.csv"
    assert main(["reproduce-paper", "--out", str(out), "--models", "llama2-7b", "--cloud-mbps", "1,50",
                 "--tokens", "2"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert {"model", "method", "cloud_mbps", "micro_batches", "latency_ms", "throughput_per_s",
            "feasible"} <= set(rows[0])
    assert {r["cloud_mbps"] for r in rows} == {"1.0", "50.0"}
    printed = capsys.readouterr().out
    assert ES_LAT in printed and "15 micro-batches" in printed and "1 request" in printed


def test_plan_method_names_match_the_objectives():
    assert EDGESHARD_METHOD == {"latency": METHOD_NAMES["latency"], "throughput": METHOD_NAMES["throughput-steady"]}
    p = solve(paper_problem("llama2-7b", 20), "latency")
    assert p.method == ES_LAT


def test_sizes_in_memory_messages_tell_the_numbers_apart():
    assert human_sizes(2_000_000, 1_999_000) == ["1.907 MiB", "1.906 MiB"]  # was "0.002 GB > 0.002 GB"
    assert human_sizes(2_097_153, 2_097_152)[0] != human_sizes(2_097_153, 2_097_152)[1]
    assert human_sizes(5, 3) == ["5 B", "3 B"] and human_sizes(3 * 2**30, 2**30) == ["3.00 GiB", "1.00 GiB"]
    assert plural(1, "micro-batch") == "1 micro-batch" and plural(4, "micro-batch") == "4 micro-batches"
    p = paper_problem("llama2-7b", 20)
    tight = replace(p, devices=tuple(replace(d, memory_bytes=2_000_000 if d.name == "agx0" else d.memory_bytes)
                                     for d in p.devices))
    reason = figures(tight, [Stage("agx0", 0, 34)])["reason"]
    need, have = re.search(r"agx0 needs (.+) > its (.+)$", reason).groups()
    assert need.endswith(" GiB") and have == "1.91 MiB"  # each in its unit, not "25.230 GB > 0.002 GB"
