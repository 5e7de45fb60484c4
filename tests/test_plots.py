"""Plotly figures from plain records: the right traces, the right numbers, clear errors on bad input."""

import pandas as pd
import pytest

from plotly.offline import get_plotlyjs

from edgeshard_kit.experiments import figure_files, plots
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


def test_bandwidth_sweep_names_infeasible_apart_from_the_data():
    recs = [{"method": "solo", "cloud_mbps": b, "latency_ms": None, "status": "oom"} for b in (1, 10)]
    recs += [{"method": "EdgeShard-latency", "cloud_mbps": b, "latency_ms": 100 / b, "status": "ok"} for b in (1, 10)]
    recs += [{"method": "opt", "cloud_mbps": 1, "latency_ms": None, "status": "oom"},
             {"method": "opt", "cloud_mbps": 10, "latency_ms": 7.0, "status": "ok"}]
    fig = plots.bandwidth_sweep(recs)
    # no trace carries an out-of-memory point: every drawn y is a measured value of an "ok" row
    drawn = {(t.name, x, y) for t in fig.data for x, y in zip(t.x, t.y) if y is not None}
    assert drawn == {("EdgeShard-latency", 1, 100), ("EdgeShard-latency", 10, 10), ("opt", 10, 7.0)}
    note = fig.layout.title.subtitle.text
    assert "out of memory, not plotted" in note and "solo at every bandwidth" in note and "opt at 1 Mbps" in note
    line = [t for t in fig.data if t.name == "EdgeShard-latency"][0]
    assert list(line.y) == [100, 10]


def test_axis_titles_have_units():
    recs = [{"method": "m", "source": s, "cloud_mbps": b, "latency_ms": 1.0 * b, "throughput_tps": 2.0, "status": "ok"}
            for s in ("measured", "predicted") for b in (1, 10)]
    sweep = plots.bandwidth_sweep(recs, dash="source")
    assert sweep.layout.xaxis.title.text == "edge-cloud bandwidth (Mbps)"
    assert sweep.layout.yaxis.title.text == "per-token latency (ms)"
    b = plots.bars(recs, "throughput_tps")
    assert b.layout.yaxis.title.text == "throughput (tokens/s)"
    pv = plots.predicted_vs_measured([{"predicted_ms": 1.0, "measured_ms": 2.0}])
    assert (pv.layout.xaxis.title.text, pv.layout.yaxis.title.text) == ("predicted (ms)", "measured (ms)")
    pu = plots.per_unit([{"unit": 0, "param_bytes": 3 * 2**20, "device": "d"}], y="param_bytes")
    assert pu.layout.yaxis.title.text == "parameters (MiB)" and list(pu.data[0].y) == [3.0]
    for title in (sweep.layout.xaxis.title.text, sweep.layout.yaxis.title.text, b.layout.yaxis.title.text,
                  plots.axis_title("stage_ms"), plots.axis_title("link_mbps")):
        assert "(" in title and "_" not in title  # a unit, no raw column name


def test_log_axis_ticks_are_the_swept_values_written_out():
    recs = [{"method": "m", "cloud_mbps": b, "latency_ms": 1.0, "status": "ok"} for b in (1, 2, 5, 20, 200)]
    ax = plots.bandwidth_sweep(recs).layout.xaxis
    assert ax.type == "log"
    assert list(ax.tickvals) == [1, 2, 5, 20, 200] and list(ax.ticktext) == ["1", "2", "5", "20", "200"]
    many = plots.log_ticks([1 + i * 7 for i in range(30)])  # 1..204: 1-2-5 steps
    assert many["ticktext"] == ["1", "2", "5", "10", "20", "50", "100", "200"]


def test_legend_fits_one_entry_per_method_plus_line_styles():
    methods = [f"method-number-{i}" for i in range(9)]
    recs = [{"method": m, "source": s, "cloud_mbps": b, "latency_ms": 1.0 + i, "status": "ok"}
            for i, m in enumerate(methods) for s in ("measured", "predicted") for b in (5, 50)]
    fig = plots.bandwidth_sweep(recs, dash="source")
    shown = [t.name for t in fig.data if t.showlegend is not False]
    assert shown == methods + ["measured", "predicted"]  # 11 entries, not 18
    assert fig.layout.legend.orientation == "h" and fig.layout.height > 450  # below the plot, with room for it
    small = plots.bandwidth_sweep(recs[:4], dash="source")
    assert fig.layout.height > small.layout.height


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



def _browser_or_skip():
    browser, why = figure_files.find_browser()
    if browser is None:
        pytest.skip(f"static figure export needs a Chrome/Chromium: {why}")
    return browser


def test_figures_export_png_svg_pdf(tmp_path, monkeypatch):
    _browser_or_skip()
    monkeypatch.delenv("EDGESHARD_FIGURE_FORMATS", raising=False)
    fig = plots.bars([{"method": "a", "latency_ms": 1.0}, {"method": "b", "latency_ms": 2.0}], "latency_ms")
    html = figure_files.write_html(fig, tmp_path / "f.html")
    written, why = figure_files.export_static([(fig, html)])
    assert why == ""
    assert sorted(p.name for p in written) == ["f.pdf", "f.png", "f.svg"]
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "f.pdf").read_bytes()[:5] == b"%PDF-"
    assert b"<svg" in (tmp_path / "f.svg").read_bytes()[:2000]


def test_export_without_browser_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chromium"))
    fig = plots.bars([{"method": "a", "latency_ms": 1.0}], "latency_ms")
    html = figure_files.write_html(fig, tmp_path / "f.html")
    written, why = figure_files.export_static([(fig, html)], ("png",))
    assert written == [] and "BROWSER_PATH" in why and "\n" not in why
    monkeypatch.setenv("EDGESHARD_FIGURE_FORMATS", "tiff")
    with pytest.raises(KitError, match="EDGESHARD_FIGURE_FORMATS"):
        figure_files.export_formats()


def test_html_shares_plotlyjs_and_opens_standalone_when_asked(tmp_path):
    fig = plots.bars([{"method": "a", "latency_ms": 1.0}], "latency_ms")
    js = tmp_path / figure_files.plotlyjs_name()
    a = figure_files.write_html(fig, tmp_path / "run1" / "a.html", js_dir=tmp_path)
    b = figure_files.write_html(fig, tmp_path / "run2" / "b.html", js_dir=tmp_path)
    assert js.is_file() and js.stat().st_size > 1e6 and not list(tmp_path.glob("run*/*.js"))  # one shared copy
    for p in (a, b):
        text = p.read_text()
        assert p.stat().st_size < 100_000 and f'src="../{js.name}"' in text
        assert "typeof Plotly" in text  # a page without its plotly.js says so instead of staying blank
    plotlyjs = get_plotlyjs()
    alone = figure_files.write_html(fig, tmp_path / "alone.html", standalone=True)
    assert plotlyjs[:2000] in alone.read_text()  # the library inline: opens on its own, offline
    copy = tmp_path / "copied.html"
    figure_files.make_standalone(a, copy)
    text = copy.read_text()
    assert plotlyjs[:2000] in text and f'src="../{js.name}"' not in text and "typeof Plotly ===" not in text
