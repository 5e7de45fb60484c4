"""Plotly figures from plain records (list of dicts or DataFrame in, go.Figure out); results.save_figure writes them."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from edgeshard_kit.core.errors import KitError

PALETTE = qualitative.Plotly + qualitative.D3


def frame(records: Any, need: tuple[str, ...] = (), what: str = "records") -> pd.DataFrame:
    """A DataFrame from records (dicts, objects with to_dict(), a DataFrame); KitError if columns lack."""
    if isinstance(records, pd.DataFrame):
        df = records.copy()
    else:
        rows = [r.to_dict() if hasattr(r, "to_dict") else dict(r) for r in records]
        df = pd.DataFrame(rows)
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise KitError(f"{what}: missing column(s) {missing}; have {list(df.columns)}")
    return df


def _stages(plan: Any) -> list[dict]:
    stages = getattr(plan, "stages", plan)
    if isinstance(plan, dict) and "stages" in plan:
        stages = plan["stages"]
    return frame(stages, ("device", "start", "end"), "partition").to_dict("records")


def partition_map(plan: Any, devices: list[str] | None = None, n_units: int | None = None,
                  title: str = "Layer-to-device map") -> go.Figure:
    """Devices x units grid, each cell colored by the stage (half-open [start, end)) that owns it."""
    stages = _stages(plan)
    n_units = n_units or max(s["end"] for s in stages)
    devices = list(devices or dict.fromkeys(s["device"] for s in stages))
    z = [[math.nan] * n_units for _ in devices]
    text = [[""] * n_units for _ in devices]
    for i, s in enumerate(stages):
        row = devices.index(s["device"]) if s["device"] in devices else None
        if row is None:
            raise KitError(f"partition: stage device {s['device']!r} is not among {devices}")
        for u in range(s["start"], s["end"]):
            z[row][u], text[row][u] = i, f"stage {i}: {s['device']} [{s['start']}, {s['end']})"
    n = max(len(stages), 1)
    scale = []
    for i in range(n):  # discrete colours: one flat band per stage
        c = PALETTE[i % len(PALETTE)]
        scale += [[i / n, c], [(i + 1) / n, c]]
    fig = go.Figure(go.Heatmap(z=z, x=list(range(n_units)), y=devices, text=text, hoverinfo="text",
                               colorscale=scale, zmin=-0.5, zmax=n - 0.5, xgap=1, ygap=2, showscale=False))
    for i, s in enumerate(stages):
        fig.add_annotation(x=(s["start"] + s["end"] - 1) / 2, y=s["device"], text=f"S{i}", showarrow=False,
                           font=dict(color="white", size=12))
    fig.update_layout(title=title, xaxis_title="unit (0 = embed, 1..N = layers, N+1 = head)",
                      yaxis_title="device", height=140 + 40 * len(devices))
    fig.update_yaxes(autorange="reversed")
    return fig


def pipeline_gantt(records: Any, title: str = "Pipeline timeline") -> go.Figure:
    """Gantt chart of (micro_batch, token, resource, kind, start_ms, end_ms) records; gaps are bubbles."""
    df = frame(records, ("micro_batch", "resource", "kind", "start_ms", "end_ms"), "timeline")
    if "token" not in df:
        df["token"] = 0
    resources = list(dict.fromkeys(df["resource"]))
    fig = go.Figure()
    for mb, g in df.groupby("micro_batch", sort=True):
        shapes = ["/" if str(k) != "compute" else "" for k in g["kind"]]
        fig.add_trace(go.Bar(
            y=g["resource"], x=g["end_ms"] - g["start_ms"], base=g["start_ms"], orientation="h",
            name=f"micro-batch {mb}", marker=dict(color=PALETTE[int(mb) % len(PALETTE)], pattern_shape=shapes,
                                                 line=dict(width=0.5, color="black")),
            customdata=list(zip(g["kind"], g["token"], g["start_ms"], g["end_ms"])),
            hovertemplate="%{y}<br>%{customdata[0]} mb " + str(mb) + " token %{customdata[1]}"
                          "<br>%{customdata[2]:.2f} - %{customdata[3]:.2f} ms<extra></extra>"))
    fig.update_layout(title=title, barmode="overlay", xaxis_title="time (ms)", yaxis_title="resource",
                      height=160 + 35 * len(resources), legend_title="hatched = transfer")
    fig.update_yaxes(categoryorder="array", categoryarray=resources[::-1])
    return fig


def _agg(df: pd.DataFrame, keys: list[str], y: str) -> pd.DataFrame:
    g = df.dropna(subset=[y]).groupby(keys, sort=False)[y]
    return g.agg(median="median", min="min", max="max", n="count").reset_index()


def bars(records: Any, y: str, x: str = "method", color: str | None = None, title: str | None = None,
         y_title: str | None = None) -> go.Figure:
    """Bars of the median of `y` per `x` (grouped by `color`), error bars from min to max over repeats."""
    df = frame(records, (x, y) + ((color,) if color else ()), "bars")
    keys = [x] + ([color] if color else [])
    agg = _agg(df, keys, y)
    fig = go.Figure()
    groups = agg.groupby(color, sort=False) if color else [(None, agg)]
    for i, (name, g) in enumerate(groups):
        fig.add_trace(go.Bar(x=g[x].astype(str), y=g["median"], name=str(name) if name is not None else y,
                             marker_color=PALETTE[i % len(PALETTE)],
                             error_y=dict(type="data", symmetric=False, array=g["max"] - g["median"],
                                          arrayminus=g["median"] - g["min"]),
                             customdata=g[["min", "max", "n"]].values,
                             hovertemplate="%{x}: median %{y:.3g} (min %{customdata[0]:.3g}, "
                                           "max %{customdata[1]:.3g}, n=%{customdata[2]})<extra></extra>"))
    fig.update_layout(title=title or f"{y} by {x}", barmode="group", xaxis_title=x, yaxis_title=y_title or y,
                      showlegend=color is not None)
    return fig


def latency_throughput_bars(records: Any, latency: str = "latency_ms", throughput: str = "throughput_tps",
                            x: str = "method", color: str | None = None,
                            title: str = "Latency and throughput") -> go.Figure:
    """Two panels: per-token latency (ms, lower is better) and throughput (tokens/s, higher is better)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("latency (ms/token)", "throughput (tokens/s)"))
    for col, y in ((1, latency), (2, throughput)):
        for tr in bars(records, y, x, color).data:
            tr.showlegend = col == 1 and color is not None
            tr.legendgroup = tr.name
            fig.add_trace(tr, row=1, col=col)
    fig.update_layout(title=title, barmode="group", height=420)
    return fig


def bandwidth_sweep(records: Any, y: str = "latency_ms", x: str = "cloud_mbps", line: str = "method",
                    status: str = "status", dash: str | None = None, title: str | None = None) -> go.Figure:
    """One line per method over the cloud link bandwidth (log x); infeasible / OOM points marked with x."""
    df = frame(records, (x, y, line), "bandwidth sweep")
    if status not in df:
        df[status] = ["ok" if pd.notna(v) else "infeasible" for v in df[y]]
    fig = go.Figure()
    ok = df[df[status].astype(str) == "ok"]
    top = ok[y].max() if len(ok) else 1.0
    for i, (method, gm) in enumerate(df.groupby(line, sort=False)):
        c = PALETTE[i % len(PALETTE)]  # one colour per method; predicted dashed, measured solid
        for key, g in (gm.groupby(dash, sort=False) if dash else [(None, gm)]):
            name = f"{method} / {key}" if dash else str(method)
            good = _agg(g[g[status].astype(str) == "ok"], [x], y).sort_values(x)
            fig.add_trace(go.Scatter(
                x=good[x], y=good["median"], mode="lines+markers", name=name, legendgroup=str(method),
                line=dict(color=c, dash="dash" if key is not None and "predicted" in str(key) else "solid"),
                error_y=dict(type="data", symmetric=False, array=good["max"] - good["median"],
                             arrayminus=good["median"] - good["min"],
                             visible=bool(len(good) and good["n"].max() > 1))))
        bad = gm[gm[status].astype(str) != "ok"].drop_duplicates(x)
        if len(bad):  # no value to draw: an x above the lines, labelled with the method and why
            fig.add_trace(go.Scatter(x=bad[x], y=[top * (1.08 + 0.08 * i)] * len(bad), mode="markers+text",
                                     name=f"{method} ({bad[status].iloc[0]})", legendgroup=str(method),
                                     text=[f"{method}: {v}" if j == 0 else "" for j, v in enumerate(bad[status].astype(str))],
                                     textposition="middle right", marker=dict(symbol="x", size=10, color=c)))
    fig.update_layout(title=title or f"{y} vs cloud bandwidth", xaxis_title="cloud link bandwidth (Mbps)",
                      yaxis_title=y, height=450)
    fig.update_xaxes(type="log")
    return fig


def predicted_vs_measured(records: Any, predicted: str = "predicted_ms", measured: str = "measured_ms",
                          color: str | None = None, title: str = "Predicted vs measured") -> go.Figure:
    """Scatter of predicted against measured with the identity line (points on it = exact prediction)."""
    df = frame(records, (predicted, measured) + ((color,) if color else ()), "predicted vs measured")
    df = df.dropna(subset=[predicted, measured])
    fig = go.Figure()
    groups = df.groupby(color, sort=False) if color else [(None, df)]
    for i, (name, g) in enumerate(groups):
        fig.add_trace(go.Scatter(x=g[predicted], y=g[measured], mode="markers", name=str(name or "points"),
                                 marker=dict(color=PALETTE[i % len(PALETTE)], size=9)))
    lo = float(min(df[predicted].min(), df[measured].min(), 0)) if len(df) else 0.0
    hi = float(max(df[predicted].max(), df[measured].max())) * 1.05 if len(df) else 1.0
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="measured = predicted",
                             line=dict(color="grey", dash="dot")))
    fig.update_layout(title=title, xaxis_title=predicted, yaxis_title=measured, height=450)
    return fig


def pareto_points(df: pd.DataFrame, x: str, y: str) -> pd.Series:
    """Mask of points no other point beats: lower `x` (latency) and higher `y` (throughput)."""
    keep = []
    for _, r in df.iterrows():
        dominated = ((df[x] <= r[x]) & (df[y] >= r[y]) & ((df[x] < r[x]) | (df[y] > r[y]))).any()
        keep.append(not dominated)
    return pd.Series(keep, index=df.index)


def pareto_frontier(records: Any, x: str = "latency_ms", y: str = "throughput_tps", label: str = "method",
                    title: str = "Latency-throughput Pareto frontier") -> go.Figure:
    """All plans as points; the non-dominated ones joined as the frontier (uses a `pareto` column if given)."""
    df = frame(records, (x, y), "pareto").dropna(subset=[x, y])
    mask = df["pareto"].astype(bool) if "pareto" in df else pareto_points(df, x, y)
    text = df[label].astype(str) if label in df else None
    fig = go.Figure(go.Scatter(x=df[x], y=df[y], mode="markers+text", text=text, textposition="top center",
                               name="plans", marker=dict(color="lightgrey", size=9, line=dict(width=1))))
    front = df[mask].sort_values(x)
    fig.add_trace(go.Scatter(x=front[x], y=front[y], mode="lines+markers", name="Pareto frontier",
                             line=dict(shape="hv", color=PALETTE[1]), marker=dict(size=11)))
    fig.update_layout(title=title, xaxis_title=x + " (lower is better)", yaxis_title=y + " (higher is better)",
                      height=450)
    return fig


def per_unit(records: Any, y: str = "decode_ms", x: str = "unit", color: str = "device",
             title: str | None = None) -> go.Figure:
    """Grouped bars of a per-unit quantity (time in ms or memory in bytes) per device."""
    df = frame(records, (x, y, color), "per-unit profile")
    fig = go.Figure()
    for i, (name, g) in enumerate(df.groupby(color, sort=False)):
        fig.add_trace(go.Bar(x=g[x], y=g[y], name=str(name), marker_color=PALETTE[i % len(PALETTE)]))
    fig.update_layout(title=title or f"{y} per {x}", barmode="group", xaxis_title=x, yaxis_title=y, height=400)
    return fig


def notebook_renderer(renderer: str = "plotly_mimetype+notebook") -> None:
    """Show figures in notebooks as live plots and as inline-plotly.js HTML, so exported HTML works offline."""
    import plotly.io as pio
    pio.renderers.default = renderer

