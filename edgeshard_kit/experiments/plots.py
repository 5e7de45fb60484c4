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
TEMPLATE = "plotly_white"  # white background, light grid: prints and projects well
WIDTH = 900  # layout px the static export uses (the HTML fills its window)

# Axis titles with units for the columns the kit's tables use; other columns: see axis_title.
AXIS_TITLES = {
    "latency_ms": "per-token latency (ms)", "throughput_per_s": "throughput (tokens/s)",
    "throughput_tps": "throughput (tokens/s)", "bottleneck_ms": "bottleneck stage time (ms)",
    "cloud_mbps": "edge-cloud bandwidth (Mbps)", "mbps": "bandwidth (Mbps)",
    "predicted_ms": "predicted (ms)", "measured_ms": "measured (ms)",
    "latency_ms_predicted": "predicted per-token latency (ms)", "latency_ms_measured": "measured per-token latency (ms)",
    "decode_ms": "decode time (ms)", "prefill_ms": "prefill time (ms)", "median_ms": "time (ms)",
    "param_bytes": "parameters (MiB)", "mem_bytes": "memory (MiB)", "kv_bytes_per_token": "KV cache per token (KiB)",
    "micro_batches": "micro-batches", "unit": "unit (0 = embedding, 1..N = layers, N+1 = head)",
}
_SUFFIX_UNITS = (("_ms", "ms"), ("_mbps", "Mbps"), ("_tps", "tokens/s"), ("_per_s", "1/s"), ("_bytes", "bytes"),
                 ("_gb", "GB"), ("_mib", "MiB"), ("_s", "s"))
# bytes columns are drawn in these binary units
_BYTE_SCALE = {"param_bytes": 2**20, "mem_bytes": 2**20, "kv_bytes_per_token": 2**10}


def axis_title(column: str) -> str:
    """A readable axis title with its unit: "latency_ms" -> "per-token latency (ms)", "foo_ms" -> "foo (ms)"."""
    if column in AXIS_TITLES:
        return AXIS_TITLES[column]
    for suffix, unit in _SUFFIX_UNITS:
        if column.endswith(suffix) and len(column) > len(suffix):
            return f"{column[: -len(suffix)].replace('_', ' ')} ({unit})"
    return column.replace("_", " ")


def log_ticks(values: Any) -> dict:
    """Tick values and labels for a log axis: the data's own values written out (1, 2, 5, 10, 20, 50, 200),
    never plotly's abbreviated minor labels ("2" for 20). Many values: 1-2-5 steps over their range."""
    vals = sorted({float(v) for v in values if v is not None and not pd.isna(v) and float(v) > 0})
    if not vals:
        return {}
    if len(vals) > 10:
        lo, hi = math.floor(math.log10(vals[0])), math.ceil(math.log10(vals[-1]))
        vals = [m * 10.0**e for e in range(lo, hi + 1) for m in (1, 2, 5) if vals[0] <= m * 10.0**e <= vals[-1]]
    return {"tickvals": vals, "ticktext": [f"{v:g}" for v in vals]}


def _legend_rows(names: list[str], width: int = WIDTH) -> int:
    per_row = max(1, int((width - 80) // (7 * max((len(n) for n in names), default=8) + 45)))
    return math.ceil(len(names) / per_row)


def _style(fig: go.Figure, legend_names: list[str] | None = None, base_height: int = 420, top: int = 80) -> go.Figure:
    """The kit's look: white template, a horizontal legend under the plot with room for all its entries."""
    names = legend_names if legend_names is not None else [t.name for t in fig.data
                                                            if t.name and t.showlegend is not False]
    rows = _legend_rows(names) if names else 0
    height, bottom = base_height + 24 * rows, 90 + 24 * rows
    plot_h = max(height - top - bottom, 100)  # the legend starts 75 px under the plot, clear of the x-axis title
    fig.update_layout(template=TEMPLATE, font=dict(size=13), height=height, margin=dict(t=top, b=bottom),
                      legend=dict(orientation="h", yanchor="top", y=-75 / plot_h, xanchor="left", x=0,
                                  title_text=fig.layout.legend.title.text or None))
    return fig


def _wrap(text: str, width: int = 105) -> str:
    """Break `text` into lines of at most `width` characters at spaces (plotly titles do not wrap)."""
    lines, cur = [], ""
    for word in text.split(" "):
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}" if cur else word
    return "<br>".join(lines + [cur])


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
    fig.update_layout(title=title, xaxis_title=AXIS_TITLES["unit"], yaxis_title="device", template=TEMPLATE,
                      font=dict(size=13), height=160 + 40 * len(devices))
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
    fig.update_layout(title=title, barmode="overlay", xaxis_title="time (ms)",
                      yaxis_title="resource (device, or link src->dst)", legend_title="hatched = transfer;")
    _style(fig, base_height=200 + 35 * len(resources))
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
                                          arrayminus=g["median"] - g["min"], visible=bool(g["n"].max() > 1)),
                             customdata=g[["min", "max", "n"]].values,
                             hovertemplate="%{x}: median %{y:.3g} (min %{customdata[0]:.3g}, "
                                           "max %{customdata[1]:.3g}, n=%{customdata[2]})<extra></extra>"))
    fig.update_layout(title=title or f"{axis_title(y)} by {axis_title(x)}", barmode="group",
                      xaxis_title=axis_title(x), yaxis_title=y_title or axis_title(y), showlegend=color is not None)
    return _style(fig, None if color else [])


def latency_throughput_bars(records: Any, latency: str = "latency_ms", throughput: str = "throughput_tps",
                            x: str = "method", color: str | None = None,
                            title: str = "Latency and throughput") -> go.Figure:
    """Two panels: per-token latency (ms, lower is better) and throughput (tokens/s, higher is better)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("per-token latency (lower is better)",
                                                        "throughput (higher is better)"))
    for col, y in ((1, latency), (2, throughput)):
        for tr in bars(records, y, x, color).data:
            tr.showlegend = col == 1 and color is not None
            tr.legendgroup = tr.name
            fig.add_trace(tr, row=1, col=col)
        fig.update_yaxes(title_text=axis_title(y), row=1, col=col)
    fig.update_layout(title=title, barmode="group")
    return _style(fig)


_DASHES = {"measured": "solid", "predicted": "dash", "predicted-paper": "dot"}


def _range_text(xs: list[float], all_xs: list[float], unit: str) -> str:
    xs = sorted(xs)
    if xs == sorted(all_xs):
        return "at every bandwidth"
    return "at " + ", ".join(f"{v:g}" for v in xs) + f" {unit}"


def _missing_note(missing: list[tuple[str, str, str]]) -> str:
    """'out of memory, not plotted: A, B at every bandwidth; C at 1, 2 Mbps' from (why, method, where) triples."""
    parts = []
    for why in dict.fromkeys(w for w, _, _ in missing):
        by_where: dict[str, list[str]] = {}
        for w, method, where in missing:
            if w == why:
                by_where.setdefault(where, []).append(method)
        text = "; ".join(f"{', '.join(ms)} {where}" for where, ms in by_where.items())
        parts.append(f"{'out of memory' if why == 'oom' else why}, not plotted: {text}")
    return ". ".join(parts)


def bandwidth_sweep(records: Any, y: str = "latency_ms", x: str = "cloud_mbps", line: str = "method",
                    status: str = "status", dash: str | None = None, title: str | None = None,
                    y_title: str | None = None, line_dash: dict | None = None) -> go.Figure:
    """One line per method (`line`) over the cloud link bandwidth (log x, ticks at the swept values).

    `dash`: a column whose values get line styles (measured solid, predicted dashed, predicted-paper dotted), with
    one legend entry per method and one per style. `line_dash`: method -> plotly dash for single methods (drawn
    above the solid lines, so a method that coincides with another stays visible). Points that are not "ok"
    (out of memory, infeasible) are not drawn: the subtitle names them ("out of memory, not plotted: Edge-Solo
    at every bandwidth").
    """
    df = frame(records, (x, y, line), "bandwidth sweep")
    if status not in df:
        df[status] = ["ok" if pd.notna(v) else "infeasible" for v in df[y]]
    fig = go.Figure()
    styles = list(dict.fromkeys(df[dash].astype(str))) if dash else []
    style = {k: _DASHES.get(k, ("dashdot", "longdash", "dot")[i % 3]) for i, k in enumerate(styles)}
    all_x = sorted(set(df[x].dropna().astype(float)))
    missing = []
    legend = []
    for i, (method, gm) in enumerate(df.groupby(line, sort=False)):
        c = PALETTE[i % len(PALETTE)]  # one colour per method, one line style per `dash` value
        first = True
        for key, g in (gm.groupby(dash, sort=False) if dash else [(None, gm)]):
            good = _agg(g[g[status].astype(str) == "ok"], [x], y).sort_values(x)
            if not len(good):
                continue
            fig.add_trace(go.Scatter(
                x=good[x], y=good["median"], mode="lines+markers", name=str(method), legendgroup=str(method),
                showlegend=first, zorder=1 if (line_dash or {}).get(method) else 0,
                line=dict(color=c, dash=(line_dash or {}).get(method) or style.get(str(key), "solid")),
                hovertemplate=f"{method}{' / ' + str(key) if dash else ''}<br>%{{x:g}} Mbps: %{{y:.4g}}<extra></extra>",
                error_y=dict(type="data", symmetric=False, array=good["max"] - good["median"],
                             arrayminus=good["median"] - good["min"], visible=bool(good["n"].max() > 1))))
            if first:
                legend.append(str(method))
            first = False
        bad = gm[gm[status].astype(str) != "ok"]
        bad = bad[~bad[x].isin(gm[gm[status].astype(str) == "ok"][x])]  # not drawn at all at that bandwidth
        for why, gb in bad.groupby(status, sort=False):
            missing.append((str(why), str(method), _range_text(sorted(set(gb[x].astype(float))), all_x, "Mbps")))
    for key in styles:  # the key to the line styles: grey samples, no data
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=key, legendgroup="style:" + key,
                                 line=dict(color="grey", dash=style[key])))
        legend.append(key)
    note = _wrap(_missing_note(missing))
    extra = 18 * (note.count("<br>") + 1) if note else 0
    fig.update_layout(title=dict(text=title or f"{axis_title(y)} vs {axis_title(x)}",
                                 subtitle=dict(text=note) if note else None),
                      xaxis_title=axis_title(x), yaxis_title=y_title or axis_title(y))
    fig.update_xaxes(type="log", **log_ticks(df[x]))
    return _style(fig, legend, base_height=420 + extra, top=80 + extra)


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
    fig.update_layout(title=title, xaxis_title=axis_title(predicted), yaxis_title=axis_title(measured))
    return _style(fig)


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
    fig.update_layout(title=title, xaxis_title=axis_title(x) + ", lower is better",
                      yaxis_title=axis_title(y) + ", higher is better")
    return _style(fig)


def per_unit(records: Any, y: str = "decode_ms", x: str = "unit", color: str = "device",
             title: str | None = None) -> go.Figure:
    """Grouped bars of a per-unit quantity (time in ms or memory in bytes) per device."""
    df = frame(records, (x, y, color), "per-unit profile")
    scale = _BYTE_SCALE.get(y, 2**20 if y.endswith("_bytes") else 1)  # bytes drawn in MiB (KiB for small ones)
    y_name = AXIS_TITLES.get(y) or (f"{y[:-6].replace('_', ' ')} (MiB)" if y.endswith("_bytes") else axis_title(y))
    fig = go.Figure()
    for i, (name, g) in enumerate(df.groupby(color, sort=False)):
        fig.add_trace(go.Bar(x=g[x], y=g[y] / scale, name=str(name), marker_color=PALETTE[i % len(PALETTE)]))
    fig.update_layout(title=title or f"{y_name} per {x}", barmode="group", xaxis_title=axis_title(x),
                      yaxis_title=y_name)
    return _style(fig, base_height=400)


def notebook_renderer(renderer: str = "plotly_mimetype+notebook") -> None:
    """Show figures in notebooks as live plots and as inline-plotly.js HTML, so exported HTML works offline."""
    import plotly.io as pio
    pio.renderers.default = renderer

