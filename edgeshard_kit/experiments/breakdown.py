"""Predicted vs measured, term by term: the benchmark's tables (min/median/max of the repeats beside the kit's and the
paper's prediction), the per-stage breakdown of one plan, and their figures (error bars = min..max of the repeats).

Tables are pandas DataFrames of the benchmark's tidy rows (experiments.benchmark.sweep): `measurements` (one row per
predicted figure and per measured repeat), `stage_terms` (predicted compute / fixed / transfer ms per stage of every
deployed plan) and `stage_records` (the runtime's compute_ms / recv_ms / send_ms / wait_ms per stage and decode step).
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

METRIC = {"sequential": "latency_ms", "no-bubbles": "throughput_tps"}
MEASURED = ("compute_ms", "recv_ms", "send_ms", "wait_ms")
PREDICTED = ("compute_ms", "fixed_ms", "transfer_ms")
COLOURS = {"compute_ms": "#1f77b4", "fixed_ms": "#ff7f0e", "transfer_ms": "#2ca02c", "recv_ms": "#2ca02c",
           "send_ms": "#98df8a", "wait_ms": "#c7c7c7"}


def _values(df):
    """The compared figure per row: per-token latency (ms) of sequential rows, tokens/s of no-bubbles rows."""
    ok = df[(df.status == "ok") & df.schedule.isin(list(METRIC))].copy()
    ok["value"] = ok.latency_ms.where(ok.schedule == "sequential", ok.throughput_tps)
    return ok


def prediction_table(df):
    """Per (bandwidth, method, schedule): measured min/median/max over the repeats beside the kit's prediction and
    the paper model's, with median/prediction ratios.

    Sequential rows compare per-token latency (ms); no-bubbles rows compare pipelined throughput (tokens/s) at K
    micro-batches (column micro_batches, the same K for every method). `measured` is the median.
    """
    import pandas as pd

    ok = _values(df)
    keys = ["cloud_mbps", "method", "schedule"]
    meas = ok[ok.source == "measured"].groupby(keys, sort=False)["value"].agg(
        measured_min="min", measured="median", measured_max="max", repeats="count").reset_index()
    pred = ok[ok.source != "measured"].pivot_table(index=keys, columns="source", values="value",
                                                   aggfunc="median").reset_index()
    pred.columns.name = None
    t = pd.merge(meas, pred, on=keys, how="outer")
    t.insert(3, "metric", t.schedule.map(METRIC))
    if "micro_batches" in ok:
        k = ok.dropna(subset=["micro_batches"]).drop_duplicates(keys)[keys + ["micro_batches"]]
        t = pd.merge(t, k, on=keys, how="left")
    for src in ("predicted", "predicted-paper"):
        if src in t:
            t[f"measured_over_{src.replace('-', '_')}"] = t["measured"] / t[src]
    stages = df[df.source == "measured"].drop_duplicates(["cloud_mbps", "method"])[["cloud_mbps", "method", "stages"]]
    return pd.merge(t, stages, on=["cloud_mbps", "method"], how="left").sort_values(keys, kind="stable") \
        .reset_index(drop=True)


def errors(table) -> dict:
    """{"<metric> <model>": (median, max) of |measured/predicted - 1|} over the table's rows (methods x bandwidths)."""
    out = {}
    for metric in ("latency_ms", "throughput_tps"):
        t = table[table.metric == metric]
        for col, label in (("measured_over_predicted", "kit"), ("measured_over_predicted_paper", "paper")):
            if col in t and t[col].notna().any():
                e = (t[col] - 1).abs()
                out[f"{metric} {label}"] = (float(e.median()), float(e.max()))
    return out


def summary_table(df):
    """Per (bandwidth, method): measured latency and throughput min/median/max, the kit's and the paper's prediction."""
    import pandas as pd

    t = prediction_table(df)
    parts = []
    for sched, short in (("sequential", "latency_ms"), ("no-bubbles", "tps")):
        s = t[t.schedule == sched].set_index(["cloud_mbps", "method"])
        cols = {"measured_min": f"{short}_min", "measured": f"{short}_median", "measured_max": f"{short}_max",
                "predicted": f"{short}_predicted", "predicted-paper": f"{short}_paper"}
        parts.append(s[[c for c in cols if c in s]].rename(columns=cols))
    bad = df[df.status != "ok"].drop_duplicates(["cloud_mbps", "method"]).set_index(["cloud_mbps", "method"])["status"]
    out = pd.concat(parts + [bad], axis=1).reset_index()
    out["status"] = out["status"].fillna("ok")
    return out.round(2)


def stage_table(stage_terms, stage_records, method: str | None = None, cloud_mbps: float | None = None):
    """Per stage of one deployed plan (default: the first of `stage_terms`): predicted compute, fixed and transfer ms
    beside the runtime's median compute_ms, recv_ms (the incoming message), send_ms and wait_ms per decode step."""
    import pandas as pd

    terms = pd.DataFrame(stage_terms)
    recs = pd.DataFrame(stage_records)
    if terms.empty:
        return terms
    method = terms.method.iloc[0] if method is None else method
    cloud_mbps = terms[terms.method == method].cloud_mbps.iloc[0] if cloud_mbps is None else cloud_mbps
    t = terms[(terms.method == method) & (terms.cloud_mbps == cloud_mbps)].copy()
    t = t.rename(columns={c: f"predicted_{c}" for c in PREDICTED})
    if not recs.empty:
        r = recs[(recs.method == method) & (recs.cloud_mbps == cloud_mbps)]
        med = r.groupby("stage")[list(MEASURED)].median().add_prefix("measured_").reset_index()
        t = pd.merge(t, med, on="stage", how="left")
    return t.reset_index(drop=True)


def stage_figure(table) -> go.Figure:
    """Two stacked bars per stage: predicted (compute, fixed, transfer to the next stage) and measured (compute,
    receiving the incoming message, sending, waiting in the queue), ms per decode step."""
    fig = go.Figure()
    label = [f"stage {s} ({d})" for s, d in zip(table.stage, table.device)]
    for c in PREDICTED:
        fig.add_trace(go.Bar(x=[label, ["predicted"] * len(label)], y=table[f"predicted_{c}"], name=f"predicted {c[:-3]}",
                             marker_color=COLOURS[c], offsetgroup="p"))
    for c in MEASURED:
        if f"measured_{c}" in table:
            fig.add_trace(go.Bar(x=[label, ["measured"] * len(label)], y=table[f"measured_{c}"],
                                 name=f"measured {c[:-3]}", marker_color=COLOURS[c], marker_pattern_shape="/",
                                 offsetgroup="m"))
    m = table.iloc[0]
    fig.update_layout(barmode="stack", title=f"{m.method} at {m.cloud_mbps:g} Mbps: per-stage terms per decode step",
                      yaxis_title="time per decode step (ms)", xaxis_title="stage", legend_title="term")
    return fig


def prediction_figure(table, metric: str = "latency_ms", model: str = "predicted") -> go.Figure:
    """Measured median (error bars: min..max of the repeats) against the prediction, one colour per bandwidth,
    with the identity line and the +-10% band."""
    t = table[(table.metric == metric)].dropna(subset=["measured", model])
    fig = go.Figure()
    for mbps, g in t.groupby("cloud_mbps", sort=True):
        fig.add_trace(go.Scatter(x=g[model], y=g["measured"], mode="markers", name=f"{mbps:g} Mbps", text=g.method,
                                 error_y=dict(type="data", symmetric=False, array=g["measured_max"] - g["measured"],
                                              arrayminus=g["measured"] - g["measured_min"]),
                                 hovertemplate="%{text}<br>predicted %{x:.2f}<br>measured %{y:.2f}<extra></extra>"))
    hi = float(max(t[model].max(), t["measured_max"].max())) * 1.05 if len(t) else 1.0
    for f, dash, name in ((1.0, "solid", "measured = predicted"), (1.1, "dot", "+10%"), (0.9, "dot", "-10%")):
        fig.add_trace(go.Scatter(x=[0, hi], y=[0, hi * f], mode="lines", name=name,
                                 line=dict(color="grey", dash=dash, width=1)))
    unit = "per-token latency (ms)" if metric == "latency_ms" else "pipelined throughput (tokens/s)"
    fig.update_layout(title=f"{unit}: measured (min..median..max) vs {model.replace('-', ' ')}",
                      xaxis_title=f"{model} {unit}", yaxis_title=f"measured {unit}")
    return fig


def figures(table, terms: Any = None, records: Any = None) -> dict:
    """The prediction figures with error bars, and the per-stage breakdown of EdgeShard-latency at the lowest
    bandwidth (or the first deployed plan)."""
    figs = {f"measured_vs_{m}_{metric.split('_')[0]}": prediction_figure(table, metric, m)
            for metric in ("latency_ms", "throughput_tps") for m in ("predicted", "predicted-paper")
            if m in table and (table.metric == metric).any()}
    if terms:
        import pandas as pd

        tf = pd.DataFrame(terms)
        pick = tf[tf.method == "EdgeShard-latency"]
        pick = pick if len(pick) else tf
        low = pick.cloud_mbps.min()
        st = stage_table(terms, records or [], pick.method.iloc[0], low)
        if len(st):
            figs["stage_breakdown"] = stage_figure(st)
    return figs
