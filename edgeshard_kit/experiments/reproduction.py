"""Notebook 05: the paper's setting by simulation (experiments.paper) into a run folder, beside the paper's numbers."""

from __future__ import annotations

from typing import Any

from edgeshard_kit.experiments import paper, plots
from edgeshard_kit.experiments.benchmark import parse_list
from edgeshard_kit.experiments.results import Outcome, Run
from edgeshard_kit.profiling.reference import paper_testbed

# (model, method, key of the paper's reported figures) compared at the highest swept bandwidth
REPORTED = (("llama2-7b", "EdgeShard", "llama2_7b_edgeshard"), ("llama2-7b", "Edge-Solo", "llama2_7b_edge_solo_approx"),
            ("llama2-70b", "EdgeShard", "llama2_70b_edgeshard"))


def paper_comparison(df) -> list[dict]:
    """Our simulated figures at the highest swept bandwidth beside the numbers the paper reports."""
    rep = paper_testbed()["reported"]
    top = df[df.cloud_mbps == df.cloud_mbps.max()]
    rows = []
    for model, method, key in REPORTED:
        reported = rep.get(key, {})
        mine = top[(top.model == model) & (top.method.str.lower() == method.lower())]
        lat = mine[mine.objective == "latency"]
        thr = mine[(mine.objective == "throughput") & (mine.schedule == "no-bubbles")]
        for metric, ours, theirs in (("latency_ms", lat.latency_ms, reported.get("latency_ms_per_token")),
                                     ("throughput_tps", thr.throughput_per_s, reported.get("throughput_tokens_per_s"))):
            if len(ours) and theirs is not None:
                rows += [{"model": model, "method": method, "metric": metric, "source": "simulated (kit)",
                          "value": float(ours.iloc[0])},
                         {"model": model, "method": method, "metric": metric, "source": "paper", "value": float(theirs)}]
    return rows


def paper_reproduction(run: Run, models: Any = "llama2-7b,llama2-13b,llama2-70b",
                       cloud_mbps: Any = "1,5,10,20,50") -> Outcome:
    """Simulate EdgeShard and the baselines on the paper's testbed; CSVs and figures against the paper's figures."""
    import pandas as pd

    mods, bws = parse_list(models, str), parse_list(cloud_mbps)
    df = pd.DataFrame(paper.reproduce(tuple(mods), tuple(bws)))
    for c in ("latency_ms", "throughput_per_s", "bottleneck_ms"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    df["status"] = ["ok" if f is True or str(f) == "True" else "oom" for f in df["feasible"]]
    df["label"] = df["model"] + " " + df["method"]
    run.write_csv("sweep", df)
    figs = {}
    for model in mods:
        d = df[df.model == model]
        figs[f"{model}_latency"] = plots.bandwidth_sweep(d[d.objective == "latency"], y="latency_ms",
                                                         title=f"{model}: per-token latency (ms), simulated")
        thr = d[(d.objective == "throughput") & (d.schedule.isin(["no-bubbles", ""]))]
        figs[f"{model}_throughput"] = plots.bandwidth_sweep(thr, y="throughput_per_s",
                                                            title=f"{model}: throughput (tokens/s, no-bubbles), simulated")
    comp = pd.DataFrame(paper_comparison(df))
    if len(comp):
        run.write_csv("vs_paper", comp)
        comp["what"] = comp["model"] + " " + comp["method"]
        for metric in ("latency_ms", "throughput_tps"):
            figs[f"vs_paper_{metric}"] = plots.bars(comp[comp.metric == metric], "value", x="what", color="source",
                                                    title=f"{metric}: the kit's simulation vs the paper", y_title=metric)
    for name, fig in figs.items():
        run.save_figure(name, fig)
    top = df[(df.cloud_mbps == max(bws)) & (df.schedule.isin(["sequential", "no-bubbles"]))]
    table = top[["model", "objective", "method", "schedule", "latency_ms", "throughput_per_s", "devices", "status"]]
    run.finish(models=mods, cloud_mbps=bws)
    return Outcome(run.path, {"sweep": df, "vs_paper": comp}, figs, table.reset_index(drop=True))
