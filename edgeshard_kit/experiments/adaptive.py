"""Adaptive runs on paper: the event records as tidy rows and run-folder files, and the per-token latency timeline
with every re-plan event marked (runtime.adaptive produces both; this module only shapes and draws them)."""

from __future__ import annotations

import json
from typing import Any

import plotly.graph_objects as go

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.experiments.plots import PALETTE, TEMPLATE, WIDTH, frame

EVENT_COLUMNS = ("t_ms", "token", "cause", "moved", "old_plan", "new_plan", "predicted_gain", "predicted_old_ms",
                 "predicted_new_ms", "pause_ms", "tokens_recomputed", "tokens_discarded", "load_s", "reason",
                 "evidence", "error")
CAUSE_COLORS = {"drift": PALETTE[1], "fault": PALETTE[3], "forced": PALETTE[2]}


def event_rows(events: list[dict]) -> list[dict]:
    """One flat row per event (the evidence as a JSON string), columns in EVENT_COLUMNS order."""
    rows = []
    for e in events:
        row = {k: e.get(k) for k in EVENT_COLUMNS}
        row["evidence"] = json.dumps(e.get("evidence") or [], default=str)
        rows.append(row)
    return rows


def record_adaptive(run: Any, result: Any, name: str = "adaptive") -> dict:
    """Write an adaptive RunResult into a run folder (experiments.results.Run): `<name>_events.csv` and `.json`,
    `<name>_per_token.csv`, and the timeline figure; returns their paths by kind."""
    events = list(getattr(result, "events", []) or [])
    return {"events_csv": run.write_csv(f"{name}_events", event_rows(events) or [dict.fromkeys(EVENT_COLUMNS)]),
            "events_json": run.write_json(f"{name}_events", events),
            "per_token_csv": run.write_csv(f"{name}_per_token", result.per_token),
            "timeline": run.save_figure(f"{name}_timeline", latency_timeline(result.per_token, events))}


def latency_timeline(per_token: Any, events: list[dict] | None = None,
                     title: str = "Per-token latency with re-plan events") -> go.Figure:
    """Per-token latency (ms) against the token index, one line per plan segment, recomputation prefills as
    crosses, and a vertical line per event (colour by cause) labelled with the move and its pause."""
    df = frame(per_token, ("step", "latency_ms"), "per-token records")
    if "recompute" not in df:
        df["recompute"] = False
    if "segment" not in df:
        df["segment"] = 0
    df = df.sort_values(["step", "mb"] if "mb" in df else ["step"])
    fig = go.Figure()
    for i, (seg, part) in enumerate(df.groupby("segment", sort=True)):
        steady = part[(~part["recompute"].astype(bool)) & (part["step"] > 0)]
        label = str(part["plan"].iloc[0]) if "plan" in part else f"segment {seg}"
        fig.add_trace(go.Scatter(x=steady["step"], y=steady["latency_ms"], mode="lines+markers", name=label,
                                 line={"color": PALETTE[i % len(PALETTE)]}, marker={"size": 4},
                                 legendgroup=label))
    pre = df[df["recompute"].astype(bool) | (df["step"] == 0)]
    if len(pre):
        fig.add_trace(go.Scatter(x=pre["step"], y=pre["latency_ms"], mode="markers", name="prefill / recompute",
                                 marker={"symbol": "x", "size": 9, "color": "black"}))
    for e in events or []:
        if e.get("token") is None:
            raise KitError(f"event record {e!r} lacks the field 'token'")
        color = CAUSE_COLORS.get(e.get("cause"), "grey")
        verb = "moved to " + str(e.get("new_plan")) if e.get("moved") else "stayed"
        pause = f", pause {e['pause_ms']:.0f} ms" if e.get("moved") and e.get("pause_ms") else ""
        fig.add_vline(x=e["token"] - 0.5, line={"color": color, "dash": "dash"})
        fig.add_annotation(x=e["token"] - 0.5, y=1.0, yref="paper", text=f"{e.get('cause')}: {verb}{pause}",
                           showarrow=False, textangle=-90, xanchor="right", yanchor="top", font={"size": 10,
                                                                                                 "color": color})
    fig.update_layout(template=TEMPLATE, width=WIDTH, height=440, title=title,
                      xaxis_title="token (index in the generation)", yaxis_title="per-token latency (ms)",
                      legend={"orientation": "h", "y": -0.2})
    return fig
