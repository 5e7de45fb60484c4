"""Plotly figures from plain records: the right traces, the right numbers, clear errors on bad input."""

import pandas as pd
import pytest

from edgeshard_kit.experiments import plots
from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.units import Stage


def test_partition_map_colors_units_by_stage():
    fig = plots.partition_map([Stage("a", 0, 3), Stage("b", 3, 5)], devices=["a", "b", "c"])
    z = fig.data[0].z
    assert list(z[0][:3]) == [0, 0, 0] and list(z[1][3:]) == [1, 1]
    assert all(pd.isna(v) for v in z[2])  # unused device: empty row
    assert len(z[0]) == 5


def test_gantt_bars_span_start_to_end():
    recs = [{"micro_batch": m, "token": 0, "resource": r, "kind": k, "start_ms": s, "end_ms": s + 2}
            for m, (r, k, s) in enumerate([("d0", "compute", 0), ("d0->d1", "transfer", 2), ("d1", "compute", 3)])]
    fig = plots.pipeline_gantt(recs)
    assert len(fig.data) == 3
    assert list(fig.data[1].base) == [2] and list(fig.data[1].x) == [2]
    assert fig.data[1].marker.pattern.shape[0] == "/"


def test_bars_median_and_min_max_error_bars():
    df = pd.DataFrame({"method": ["a"] * 3 + ["b"] * 2, "latency_ms": [1, 2, 9, 4, 4], "throughput_tps": 1.0})
    fig = plots.bars(df, "latency_ms")
    assert list(fig.data[0].y) == [2, 4]
    assert list(fig.data[0].error_y.array) == [7, 0] and list(fig.data[0].error_y.arrayminus) == [1, 0]
    assert len(plots.latency_throughput_bars(df).data) == 2


def test_bandwidth_sweep_marks_infeasible():
    recs = [{"method": "solo", "cloud_mbps": b, "latency_ms": None, "status": "oom"} for b in (1, 10)]
    recs += [{"method": "edgeshard", "cloud_mbps": b, "latency_ms": 100 / b, "status": "ok"} for b in (1, 10)]
    fig = plots.bandwidth_sweep(recs)
    marked = [t for t in fig.data if t.mode == "markers+text"]
    assert len(marked) == 1 and list(marked[0].text) == ["solo: oom", ""] and list(marked[0].x) == [1, 10]
    line = [t for t in fig.data if t.name == "edgeshard"][0]
    assert list(line.y) == [100, 10]


def test_predicted_vs_measured_has_identity_line():
    fig = plots.predicted_vs_measured([{"predicted_ms": 1.0, "measured_ms": 2.0}])
    assert fig.data[-1].x == fig.data[-1].y


def test_pareto_frontier_keeps_non_dominated():
    df = pd.DataFrame({"latency_ms": [1, 2, 3, 2.5], "throughput_tps": [1, 3, 4, 2]})
    assert list(plots.pareto_points(df, "latency_ms", "throughput_tps")) == [True, True, True, False]
    assert len(plots.pareto_frontier(df).data[1].x) == 3


def test_missing_columns_name_the_problem():
    with pytest.raises(KitError, match="missing column"):
        plots.bars([{"x": 1}], "latency_ms")

