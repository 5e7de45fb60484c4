"""The planner on hand-computable problems: cost model, solvers, evaluate/timeline, baselines, Pareto, errors, CLI."""

from __future__ import annotations

import json
import math

import pytest

from edgeshard_kit.cli.main import main
from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.units import Stage
from edgeshard_kit.planning import dp
from edgeshard_kit.planning.baselines import (baselines, cloud_edge_even, cloud_edge_opt, edge_solo,
                                              latency_bottleneck_frontier, memory_proportional, pareto,
                                              solve_constrained, solve_for_micro_batches)
from edgeshard_kit.planning.dp import solve
from edgeshard_kit.planning.plan import Plan, figures, load_plan, make_plan, save_plan
from edgeshard_kit.planning.problem import load_problem, problem_from_dict, save_problem, without_fixed_costs
from edgeshard_kit.planning.schedule import Evaluation, evaluate, release, timeline, timeline_figures


def two_devices(mbps: float = 8.0, mem_edge: float = 10, mem_cloud: float = 10) -> dict:
    """edge (source, 10 ms/unit) and cloud (1 ms/unit); 1000 bytes at 8 Mbps = 1 ms, + 0.5 ms per message."""
    return {"units": [{"name": f"u{i}", "mem_bytes": 1, "out_bytes": 1000} for i in range(4)],
            "devices": [{"name": "edge", "memory_bytes": mem_edge, "source": True, "unit_ms": [10, 10, 10, 10]},
                        {"name": "cloud", "memory_bytes": mem_cloud, "cloud": True, "unit_ms": [1, 1, 1, 1]}],
            "links": {"default": {"mbps": mbps, "latency_ms": 0.5}}, "return_bytes": 1000}


def test_cost_model_by_hand():
    p = problem_from_dict(two_devices())
    f = figures(p, [Stage("edge", 0, 1), Stage("cloud", 1, 4)])
    # edge 10 ms, edge->cloud 1.5 ms, cloud 3 ms, cloud->edge 1.5 ms
    assert f["stage_compute_ms"] == [10, 3]
    assert f["stage_transfer_ms"] == [1.5, 1.5]
    assert f["latency_ms"] == 16
    assert f["bottleneck_ms"] == 10
    assert f["throughput_per_s"] == 100
    assert f["memory_bytes"] == {"edge": 1, "cloud": 3}
    solo = figures(p, [Stage("edge", 0, 4)])
    assert solo["latency_ms"] == 40 and solo["stage_transfer_ms"] == [0.0]  # the source keeps its token


def test_solve_latency_and_throughput_by_hand():
    p = problem_from_dict(two_devices())
    lat = solve(p, "latency")
    assert [(s.device, s.start, s.end) for s in lat.stages] == [("edge", 0, 1), ("cloud", 1, 4)]
    assert lat.latency_ms == 16
    thr = solve(p, "throughput")
    assert thr.bottleneck_ms == 10 and thr.throughput_per_s == 100
    # a slow link makes edge-solo best for latency: 1000 bytes at 0.08 Mbps = 100 ms
    slow = solve(problem_from_dict(two_devices(mbps=0.08)), "latency")
    assert [s.device for s in slow.stages] == ["edge"] and slow.latency_ms == 40


def test_unneeded_devices_get_nothing_and_identical_devices_merge():
    d = two_devices()
    for i in range(5):
        d["devices"].append({"name": f"slow{i}", "memory_bytes": 10, "unit_ms": [50, 50, 50, 50]})
    p = problem_from_dict(d)
    assert len(dp.device_types(p)) == 3
    plan = solve(p, "latency")
    assert plan.devices == ["edge", "cloud"]


def test_memory_is_respected():
    p = problem_from_dict(two_devices(mem_cloud=2))
    plan = solve(p, "latency")
    assert plan.memory_bytes["cloud"] <= 2 and plan.feasible
    assert [(s.device, s.start, s.end) for s in plan.stages] == [("edge", 0, 2), ("cloud", 2, 4)]


def test_tied_tensor_counted_once_by_hand():
    """Tied embeddings: unit 0 (3 bytes) and the head (3 bytes) share 2; a device holding both needs 4, not 6."""
    d = two_devices(mem_edge=6, mem_cloud=10)
    for u, m in zip(d["units"], [3, 1, 1, 3]):
        u["mem_bytes"] = m
    d["tied_bytes"] = 2
    p = problem_from_dict(d)
    untied = problem_from_dict({**d, "tied_bytes": 0})
    solo = [Stage("edge", 0, 4)]
    assert figures(p, solo)["memory_bytes"] == {"edge": 6} and figures(p, solo)["feasible"]
    assert figures(untied, solo)["memory_bytes"] == {"edge": 8} and not figures(untied, solo)["feasible"]
    assert figures(p, [Stage("edge", 0, 3), Stage("cloud", 3, 4)])["memory_bytes"] == {"edge": 5, "cloud": 3}
    slow = problem_from_dict({**two_devices(mbps=0.08, mem_edge=6), "units": d["units"], "tied_bytes": 2})
    assert [(s.device, s.start, s.end) for s in solve(slow, "latency").stages] == [("edge", 0, 4)]
    # relay: two stages on the edge are two workers, each loading its own copy of the tied tensor (no sharing)
    around = [Stage("edge", 0, 1), Stage("cloud", 1, 3), Stage("edge", 3, 4)]
    assert figures(p, around)["memory_bytes"] == {"edge": 6, "cloud": 2}
    relay = problem_from_dict({**d, "devices": [{**d["devices"][0], "memory_bytes": 5},
                                                {**d["devices"][1], "memory_bytes": 2}]})
    with pytest.raises(KitError, match="infeasible"):
        solve(relay, "latency", relay=True)
    with pytest.raises(KitError, match="infeasible"):
        solve(relay, "latency")
    assert problem_from_dict(json.loads(json.dumps(p.to_dict()))).tied_bytes == 2
    with pytest.raises(KitError, match="tied_bytes"):
        problem_from_dict({**d, "tied_bytes": 4})  # more than unit 0 holds


def test_relay_routes_around_a_slow_link():
    # a is fast on units 0 and 2, b on unit 1; a holds two units, b one. Without relay: a:0-2, b:2-3.
    d = {"units": [{"name": f"u{i}", "mem_bytes": 1, "out_bytes": 1000} for i in range(3)],
         "devices": [{"name": "a", "memory_bytes": 2, "source": True, "unit_ms": [1, 100, 1]},
                     {"name": "b", "memory_bytes": 1, "unit_ms": [100, 1, 100]}],
         "links": {"default": {"mbps": 8, "latency_ms": 0}}, "return_bytes": 0}
    p = problem_from_dict(d)
    assert solve(p, "latency").latency_ms == pytest.approx(1 + 100 + 1 + 100)  # a:0-2, 1 ms transfer, b:2-3
    relay = solve(p, "latency", relay=True)
    assert [(s.device, s.start, s.end) for s in relay.stages] == [("a", 0, 1), ("b", 1, 2), ("a", 2, 3)]
    assert relay.latency_ms == pytest.approx(1 + 1 + 1 + 1 + 1)
    assert relay.memory_bytes == {"a": 2, "b": 1}
    # with a's memory at 1 unit the relay plan no longer fits: exact memory, not greedy
    d["devices"][0]["memory_bytes"] = 1
    with pytest.raises(KitError, match="infeasible"):
        solve(problem_from_dict(d), "latency", relay=True)


def test_infeasible_messages_name_the_tightest_constraint():
    d = two_devices(mem_edge=0.5)
    with pytest.raises(KitError, match="the source edge cannot hold unit 0"):
        solve(problem_from_dict(d), "latency")
    d = two_devices(mem_edge=1, mem_cloud=1)
    with pytest.raises(KitError, match="total memory of all devices .* < model"):
        solve(problem_from_dict(d), "throughput")


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["devices"][1].update(unit_ms=[1, 1, 1]), r"devices\[1\].unit_ms has 3 entries, units has 4"),
    (lambda d: d["devices"][1].update(source=True), "exactly one source device needed, found 2"),
    (lambda d: d["devices"][0].update(source=False), "exactly one source device needed, found 0"),
    (lambda d: d["links"].update(pairs=[{"src": "edge", "dst": "nope", "mbps": 1}]),
     r"links.pairs\[0\].dst: unknown device 'nope'"),
    (lambda d: d["links"].update(default={"mbps": -5}), "links.default.mbps: -5 is negative"),
    (lambda d: d["units"][2].update(mem_bytes="lots"), r"units\[2\].mem_bytes: 'lots' is not a number"),
    (lambda d: d["devices"][0]["unit_ms"].__setitem__(1, None), r"devices\[0\].unit_ms\[1\]"),
    (lambda d: d["devices"].append(dict(d["devices"][1])), "appears twice"),
])
def test_bad_input_names_the_field(mutate, message):
    d = two_devices()
    mutate(d)
    with pytest.raises(KitError, match=message):
        problem_from_dict(d)


def test_problem_and_plan_round_trip(tmp_path):
    d = two_devices()
    d["links"]["pairs"] = [{"src": "edge", "dst": "cloud", "mbps": None, "latency_ms": 3}]
    p = problem_from_dict(d)
    assert load_problem(save_problem(p, tmp_path / "p.json")) == p
    assert p.transfer_ms("edge", "cloud", 1e9) == 3  # mbps null = unshaped
    plan = solve(p, "throughput")
    back = load_plan(save_plan(plan, tmp_path / "plan.json"))
    assert back == plan and back.stages == plan.stages


def test_timeline_bubbles_and_no_bubbles():
    p = problem_from_dict(two_devices())
    plan = make_plan(p, [Stage("edge", 0, 2), Stage("cloud", 2, 4)], "throughput")
    # per token: edge 20, transfer 1.5, cloud 2, transfer back 1.5 -> latency 25, bottleneck 20
    one = timeline_figures(timeline(p, plan, 1, 4))
    assert one["makespan_ms"] == pytest.approx(100) and one["throughput_per_s"] == pytest.approx(40)
    nb = timeline(p, plan, 2, 10, "no-bubbles")
    b = timeline(p, plan, 2, 10, "bubbles")
    assert len(nb) == len(b) == 2 * 10 * 4
    assert {r["kind"] for r in nb} == {"compute", "transfer"}
    assert {r["resource"] for r in nb} == {"edge", "cloud", "edge->cloud", "cloud->edge"}
    for recs in (nb, b):  # no resource runs two tasks at once
        for res in {r["resource"] for r in recs}:
            spans = sorted((r["start_ms"], r["end_ms"]) for r in recs if r["resource"] == res)
            assert all(a[1] <= c[0] + 1e-9 for a, c in zip(spans, spans[1:]))
    t_nb, t_b = timeline_figures(nb)["throughput_per_s"], timeline_figures(b)["throughput_per_s"]
    assert t_b < t_nb <= 1000 / 20 + 1e-9  # the edge (20 ms per token) is the bottleneck
    assert t_nb == pytest.approx(2 * 10 * 1000 / (20 * 20 + 5), rel=1e-9)  # edge busy, then the last token's tail
    ev = evaluate(p, plan, micro_batches=2, tokens=10)
    assert isinstance(ev, Evaluation)
    assert ev.simulations["no-bubbles"].throughput_per_s == pytest.approx(t_nb)
    assert ev.simulations["bubbles"].throughput_per_s == pytest.approx(t_b)
    assert ev.latency_ms == 25 and ev.bottleneck_ms == 20 and ev.memory_bytes["cloud"] == 2


def test_baselines_and_out_of_memory():
    p = problem_from_dict(two_devices())
    names = [b.method for b in baselines(p)]
    assert names == ["Edge-Solo", "Cloud-Edge-Even", "Cloud-Edge-Opt", "Memory-Proportional"]
    assert edge_solo(p).latency_ms == 40
    even = cloud_edge_even(p)
    assert [(s.device, s.start, s.end) for s in even.stages] == [("edge", 0, 2), ("cloud", 2, 4)]
    assert cloud_edge_opt(p).latency_ms == 16
    mp = memory_proportional(p)
    assert [s.end - s.start for s in mp.stages] == [2, 2]
    small = problem_from_dict(two_devices(mem_edge=2))
    solo = edge_solo(small)
    assert not solo.feasible and "out of memory" in solo.reason and "edge" in solo.reason
    assert cloud_edge_opt(small).feasible


def test_pareto_frontier_and_constrained_solve():
    d = two_devices(mbps=80)
    d["devices"].append({"name": "mid", "memory_bytes": 10, "unit_ms": [4, 4, 4, 4]})
    p = problem_from_dict(d)
    front = latency_bottleneck_frontier(p)
    lats = [x.latency_ms for x in front]
    bots = [x.bottleneck_ms for x in front]
    assert lats == sorted(lats) and bots == sorted(bots, reverse=True)
    assert lats[0] == solve(p, "latency").latency_ms
    assert bots[-1] == pytest.approx(solve(p, "throughput").bottleneck_ms)
    pts = pareto(p, (1, 2, 4), tokens=6)
    assert all(a["latency_ms"] <= b["latency_ms"] and a["throughput_per_s"] < b["throughput_per_s"]
               for a, b in zip(pts, pts[1:]))
    loose = solve_constrained(p, max_latency_ms=1e9)
    assert loose.bottleneck_ms == pytest.approx(bots[-1])
    tight = solve_constrained(p, max_latency_ms=lats[0])
    assert tight.latency_ms == lats[0]
    with pytest.raises(KitError, match="lowest possible latency"):
        solve_constrained(p, max_latency_ms=lats[0] / 2)
    cap = solve_constrained(p, min_throughput_per_s=1000 / bots[-1])
    assert cap.bottleneck_ms <= bots[-1] + 1e-9


def test_cli_plan_json_out_and_evaluate(tmp_path, capsys):
    path = save_problem(problem_from_dict(two_devices()), tmp_path / "p.json")
    out = tmp_path / "plan.json"
    assert main(["plan", "--problem", str(path), "--objective", "latency", "--json", "--out", str(out)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["stages"] == [{"device": "edge", "start": 0, "end": 1}, {"device": "cloud", "start": 1, "end": 4}]
    assert got["latency_ms"] == 16 and "bottleneck_ms" in got and "throughput_per_s" in got
    assert isinstance(load_plan(out), Plan)
    assert main(["plan", "--evaluate", str(out), "--problem", str(path), "--micro-batches", "2", "--baselines"]) == 0
    text = capsys.readouterr().out
    assert "no-bubbles" in text and "Edge-Solo" in text
    assert main(["plan", "--problem", str(path), "--pareto", "1,2"]) == 0


def test_cli_infeasible_exits_2(tmp_path, capsys):
    path = save_problem(problem_from_dict(two_devices(mem_edge=1, mem_cloud=1)), tmp_path / "p.json")
    assert main(["plan", "--problem", str(path)]) == 2
    assert "infeasible: total memory" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**two_devices(), "devices": []}))
    assert main(["plan", "--problem", str(bad)]) == 2
    assert main(["plan", "--problem", str(tmp_path / "missing.json")]) == 2


def test_throughput_counts_a_relay_device_once():
    # relay plan a, b, a: a's two stages are one resource, their compute summed
    d = two_devices()
    p = problem_from_dict(d)
    f = figures(p, [Stage("edge", 0, 1), Stage("cloud", 1, 2), Stage("edge", 2, 4)])
    assert f["device_load_ms"]["edge"] == 30 and f["bottleneck_ms"] == 30
    assert math.isclose(f["link_load_ms"]["edge->cloud"], 1.5)


def test_throughput_ties_broken_by_latency():
    # unit 0 (20 ms, only on the source) is the bottleneck of every plan that moves units 1-3 away;
    # among those, one helper (26 ms per token) beats two or three (more transfers)
    d = two_devices()
    d["devices"] = [{"name": "edge", "memory_bytes": 10, "source": True, "unit_ms": [20, 1, 1, 1]}] + [
        {"name": f"h{i}", "memory_bytes": 10, "unit_ms": [1, 1, 1, 1]} for i in range(3)]
    plan = solve(problem_from_dict(d), "throughput")
    assert plan.bottleneck_ms == 20 and plan.latency_ms == 26 and len(plan.stages) == 2


def test_relay_search_gives_up_cleanly():
    d = {"units": [{"name": f"u{i}", "mem_bytes": 1, "out_bytes": 10} for i in range(12)],
         "devices": [{"name": f"d{i}", "memory_bytes": 4, "source": i == 0,
                      "unit_ms": [1 + ((i * 7 + u * 3) % 5) for u in range(12)]} for i in range(6)],
         "links": {"default": {"mbps": 100, "latency_ms": 0.1}}}
    p = problem_from_dict(d)
    with pytest.raises(KitError, match="relay search gave up after 5 states"):
        dp.solve_stages(p, "throughput", relay=True, max_states=5)


def test_solve_for_few_micro_batches_prefers_short_pipelines():
    d = two_devices(mbps=80)
    for i in range(3):
        d["devices"].append({"name": f"h{i}", "memory_bytes": 1, "unit_ms": [3, 3, 3, 3]})
    p = problem_from_dict(d)
    deep = solve(p, "throughput")
    one = solve_for_micro_batches(p, 1)
    assert one.latency_ms == solve(p, "latency").latency_ms
    many = solve_for_micro_batches(p, 64)
    assert many.bottleneck_ms == pytest.approx(deep.bottleneck_ms)
    for k in (1, 2, 4, 64):
        got = solve_for_micro_batches(p, k)
        cycle = max(got.latency_ms, k * got.bottleneck_ms)
        for other in latency_bottleneck_frontier(p):
            assert cycle <= max(other.latency_ms, k * other.bottleneck_ms) + 1e-9


def test_stage_and_step_overheads_are_in_the_cost_model():
    """A fixed cost per stage makes splitting dearer; the per-token step cost is a constant of latency."""
    d = {"units": [{"mem_bytes": 1, "out_bytes": 0}] * 3,
         "devices": [{"name": "a", "memory_bytes": 10, "source": True, "unit_ms": [1, 4, 4], "stage_ms": 0.5},
                     {"name": "b", "memory_bytes": 10, "unit_ms": [1, 1, 1], "stage_ms": 0.5}],
         "links": {"default": {"mbps": None, "latency_ms": 0.0}}, "step_ms": 2.0}
    p = problem_from_dict(d)
    f = figures(p, [Stage("a", 0, 1), Stage("b", 1, 3)])
    assert f["stage_compute_ms"] == [1.5, 2.5]
    assert f["latency_ms"] == 1.5 + 2.5 + 2.0
    assert solve(p, "latency").stages == (Stage("a", 0, 1), Stage("b", 1, 3))
    d["devices"][1]["stage_ms"] = 7.0  # a stage on b now costs more than running everything on a
    p = problem_from_dict(d)
    plan = solve(p, "latency")
    assert plan.stages == (Stage("a", 0, 3),) and plan.latency_ms == 9.5 + 2.0
    assert problem_from_dict(p.to_dict()) == p  # the fields survive the problem file
    ev = evaluate(p, plan, micro_batches=1, tokens=4)
    assert ev.latency_ms == plan.latency_ms
    bare = without_fixed_costs(p)
    assert bare.step_ms == 0 and all(dv.stage_ms == 0 for dv in bare.devices) and bare.units == p.units
    assert figures(bare, [Stage("a", 0, 3)])["latency_ms"] == 9.0


def test_evaluation_to_dict_is_the_plan_files_json():
    p = problem_from_dict(two_devices())
    plan = make_plan(p, [Stage("edge", 0, 2), Stage("cloud", 2, 4)], "throughput")
    ev = evaluate(p, plan, micro_batches=2, tokens=3)
    d = ev.to_dict()
    assert d["stages"] == [{"device": "edge", "start": 0, "end": 2}, {"device": "cloud", "start": 2, "end": 4}]
    assert d["latency_ms"] == 25 and d["memory_budget_bytes"] == {"edge": 10, "cloud": 10}
    assert d["throughput_no_bubbles_per_s"] == ev.simulations["no-bubbles"].throughput_per_s
    assert d["token_interval_bubbles_ms"] == ev.simulations["bubbles"].token_interval_ms
    assert len(d["timeline_no_bubbles"]) == 2 * 3 * 4
    bare = ev.to_dict(timelines=False)
    assert not any(k.startswith("timeline_") for k in bare) and "throughput_bubbles_per_s" in bare
    json.dumps(d)  # plain data
    quick = evaluate(p, plan, with_timeline=False)
    assert quick.simulations == {} and "throughput_bubbles_per_s" not in quick.to_dict()


def test_release_rule():
    assert release("no-bubbles", 1, 1, 3) == [1]
    assert release("bubbles", 1, 2, 3) == []
    assert release("bubbles", 0, 3, 3) == [0, 1, 2]
    assert release("bubbles", 0, 1, 1) == [0]
    with pytest.raises(KitError, match="schedule"):
        release("eager", 0, 1, 1)


def test_unknown_objective():
    with pytest.raises(KitError, match="objective 'speed'"):
        solve(problem_from_dict(two_devices()), "speed")
