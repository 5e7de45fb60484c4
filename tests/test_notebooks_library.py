"""The notebooks' library: the planner explorer's edits and solves, the experiment's helpers."""

import math

import pytest

from edgeshard_kit.experiments import benchmark as experiment
from edgeshard_kit.experiments import interactive
from edgeshard_kit.core.units import KitError


@pytest.fixture(scope="module")
def paper():
    return interactive.problem_for("")


def test_edit_problem_switches_devices_memory_and_links(paper):
    src = paper.devices[paper.source].name
    off = {paper.devices[-1].name}
    p = interactive.edit_problem(paper, off, {src: 1.5}, {"default": 5.0})
    assert len(p.devices) == len(paper.devices) - 1 and not (off & set(p.names))
    assert p.devices[p.source].memory_bytes == 1.5e9 and p.default_link.mbps == 5.0
    assert all(a not in off and b not in off for a, b, _ in p.pairs)
    with pytest.raises(KitError, match="source"):
        interactive.edit_problem(paper, {src})


def test_explorer_builds_headless_and_resolves(paper):
    ex = interactive.PlanExplorer(paper, objective="latency", micro_batches=2)
    assert ex.result["plan"] is not None and set(ex.figures()) == {"partition", "methods", "timeline"}
    ex.objective.value = "throughput"  # a change re-solves
    assert ex.result["plan"].objective == "throughput"
    table = ex.summary()
    assert {"EdgeShard-latency", "Edge-Solo", "Cloud-Edge-Opt"} <= set(table.method)
    ok = table[table.status == "ok"]
    assert ok.latency_ms.min() == pytest.approx(ok[ok.method == "EdgeShard-latency"].latency_ms.iloc[0])


def test_experiment_helpers():
    assert experiment.parse_list("2, 20,200") == [2.0, 20.0, 200.0]
    assert experiment.pick_methods("edgeshard-latency,mem-proportional") == ["EdgeShard-latency",
                                                                             "Memory-Proportional"]
    with pytest.raises(KitError, match="method"):
        experiment.pick_methods("nosuch")


def test_with_cloud_mbps_reshapes_only_cloud_links(tmp_path):
    from edgeshard_kit.testbed.inventory import testbed_from_dict
    tb = testbed_from_dict({"name": "t", "devices": [
        {"name": "e0", "type": "a", "memory": "1GiB", "source": True},
        {"name": "e1", "type": "a", "memory": "1GiB"},
        {"name": "c", "type": "b", "memory": "4GiB", "cloud": True}],
        "links": {"default": {"mbps": 100}, "pairs": [{"src": "e0", "dst": "c", "mbps": 20, "latency_ms": 1.0}]}})
    t2 = experiment.with_cloud_mbps(tb, 5)
    assert t2.link("e0", "c").mbps == 5 and t2.link("c", "e1").mbps == 5 and t2.link("e0", "c").latency_ms == 1.0
    assert t2.link("e0", "e1").mbps == 100
    no_cloud = testbed_from_dict({"name": "n", "devices": [{"name": "e0", "type": "a", "memory": "1GiB",
                                                            "source": True}]})
    with pytest.raises(KitError, match="cloud"):
        experiment.with_cloud_mbps(no_cloud, 5)
    assert math.isfinite(t2.link("e1", "c").mbps)


def test_scale_memory_keeps_proportions_and_gives_the_source_its_share(tmp_path):
    from edgeshard_kit.testbed.inventory import testbed_from_dict
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10_000)
    tb = testbed_from_dict({"name": "t", "devices": [
        {"name": "e0", "type": "a", "memory": "1GiB", "source": True},
        {"name": "e1", "type": "b", "memory": "512MiB"},
        {"name": "c", "type": "c", "memory": "8GiB", "cloud": True}]})
    small = experiment.scale_memory(tb, tmp_path, 0.45)
    mem = {d.name: d.memory_bytes for d in small.devices}
    assert mem["e0"] == 4500 and mem["e1"] == 2250 and mem["c"] == 36000
    assert small.name == tb.name and small.source.name == "e0" and [d.cloud for d in small.devices] == [0, 0, 1]
    with pytest.raises(KitError, match="share"):
        experiment.scale_memory(tb, tmp_path, 0)


def test_default_testbed_local_when_asked_and_emulated_only_when_possible(tmp_path):
    from edgeshard_kit.testbed import netns
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10_000)
    tb, why = experiment.default_testbed(tmp_path, 20, "local")
    assert tb.emulation == "app" and any(d.cloud for d in tb.devices) and why
    reason = netns.unavailable()
    if reason:
        with pytest.raises(KitError, match="emulated testbed requested"):
            experiment.default_testbed(tmp_path, 20, "emulated")
    else:
        tb, _ = experiment.default_testbed(tmp_path, 20, "emulated")
        assert tb.emulation == "netns" and tb.source.memory_bytes == 4500


def test_prediction_table_pairs_measured_with_both_models():
    import pandas as pd
    rows = []
    for src, lat, tps in (("measured", 12.0, 150.0), ("measured", 10.0, 170.0), ("predicted", 10.0, 200.0),
                          ("predicted-paper", 5.0, 400.0)):
        for sched in ("sequential", "no-bubbles", "bubbles"):
            rows.append({"method": "M", "cloud_mbps": 5.0, "source": src, "schedule": sched, "status": "ok",
                         "latency_ms": lat, "throughput_tps": tps, "stages": "e0[0,3)"})
    rows.append({"method": "Solo", "cloud_mbps": 5.0, "source": "measured", "schedule": "sequential",
                 "status": "oom", "latency_ms": None, "throughput_tps": None, "stages": None})
    t = experiment.prediction_table(pd.DataFrame(rows)).set_index("metric")
    assert list(t.method.unique()) == ["M"]
    assert t.loc["latency_ms", "measured"] == 11.0 and t.loc["latency_ms", "measured_over_predicted"] == 1.1
    assert t.loc["latency_ms", "measured_over_predicted_paper"] == 2.2
    assert t.loc["throughput_tps", "measured_over_predicted"] == pytest.approx(0.8)
    assert t.loc["latency_ms", "stages"] == "e0[0,3)"
