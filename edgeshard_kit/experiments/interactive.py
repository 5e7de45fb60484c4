"""Notebook 02's planner explorer: ipywidgets over a Problem; every change re-solves and redraws, or says why nothing fits.

Controls: the objective (planning.objectives.OBJECTIVES), the micro-batches K, one bandwidth for every link to or
from a cloud device, one for every edge-to-edge link, per-link bandwidth (an advanced accordion), each device's
memory, devices on/off. Under them: a readout of the current plan (stages, predicted ms/token, tokens/s), the
layer-to-device map, the methods' bars, the pipeline Gantt chart and the methods' table. When no plan fits, the
readout shows the reason (the tightest constraint, `planning.dp.infeasible_reason`) and the figures are cleared.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import replace

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.units import format_stages
from edgeshard_kit.experiments import plots
from edgeshard_kit.experiments.paper import paper_problem
from edgeshard_kit.experiments.steps import method_plans
from edgeshard_kit.planning.objectives import METHOD_NAMES, OBJECTIVES, micro_batches_label
from edgeshard_kit.planning.problem import Problem, load_problem
from edgeshard_kit.planning.schedule import evaluate

GB = 1e9
OBJECTIVE_LABELS = {"latency": "latency", "throughput": "throughput at K", "throughput-steady": "steady-state throughput"}
TABLE_COLUMNS = {"method": "method", "status": "status", "n_stages": "stages", "latency_ms": "ms/token",
                 "throughput_tps": "tokens/s at K", "stages": "placement [start, end)", "reason": "why not"}
MBPS_RANGE = (-1.0, 4.0)  # log10 of the sliders' bandwidth range: 0.1 Mbps .. 10 Gbps


def problem_for(problem_file: str = "", model: str = "llama2-7b", cloud_mbps: float = 20.0) -> Problem:
    """The problem of a JSON file, or ("" ) the paper's setting for `model` with the cloud at `cloud_mbps`."""
    if problem_file:
        return load_problem(problem_file)
    return paper_problem(model, cloud_mbps)


def cloud_names(problem: Problem) -> set[str]:
    """Names of the problem's cloud devices."""
    return {d.name for d in problem.devices if d.cloud}


def edit_problem(problem: Problem, off: set[str] = frozenset(), memory_gb: dict[str, float] | None = None,
                 links_mbps: dict[str, float] | None = None, cloud_mbps: float | None = None,
                 edge_mbps: float | None = None) -> Problem:
    """A copy with devices switched off, memory budgets (GB) and bandwidths (Mbps, > 0).

    cloud_mbps: every link to or from a cloud device; edge_mbps: every other link (the default link too);
    links_mbps: then single links, "src->dst" or "default". Link latencies are kept. KitError when the source
    is switched off or a bandwidth is not > 0.
    """
    src = problem.devices[problem.source].name
    if src in off:
        raise KitError(f"the source device {src} holds the prompt and cannot be switched off")
    memory_gb, links_mbps = memory_gb or {}, links_mbps or {}
    for key, mbps in {"cloud_mbps": cloud_mbps, "edge_mbps": edge_mbps, **links_mbps}.items():
        if mbps is not None and not float(mbps) > 0:
            raise KitError(f"bandwidth of {key}: {mbps!r} Mbps is not > 0")
    devices = tuple(replace(d, memory_bytes=memory_gb[d.name] * GB) if d.name in memory_gb else d
                    for d in problem.devices if d.name not in off)
    clouds = cloud_names(problem)
    default = problem.default_link
    if edge_mbps is not None:
        default = replace(default, mbps=float(edge_mbps))
    if "default" in links_mbps:
        default = replace(default, mbps=float(links_mbps["default"]))
    pairs = {(a, b): ln for a, b, ln in problem.pairs if a not in off and b not in off}
    if edge_mbps is not None:
        pairs = {(a, b): ln if a in clouds or b in clouds else replace(ln, mbps=float(edge_mbps))
                 for (a, b), ln in pairs.items()}
    if cloud_mbps is not None:
        names = [d.name for d in devices]
        for a in names:
            for b in names:
                if a != b and (a in clouds or b in clouds):
                    pairs[(a, b)] = replace(pairs.get((a, b), problem.default_link), mbps=float(cloud_mbps))
    for key, mbps in links_mbps.items():
        a, _, b = key.partition("->")
        if key == "default" or a in off or b in off:
            continue
        pairs[(a, b)] = replace(pairs.get((a, b), default), mbps=float(mbps))
    return replace(problem, devices=devices, default_link=default,
                   pairs=tuple((a, b, ln) for (a, b), ln in pairs.items()))


def link_names(problem: Problem) -> list[str]:
    """Every directed link between two of the problem's devices, "src->dst"."""
    return [f"{a}->{b}" for a in problem.names for b in problem.names if a != b]


def method_row(problem: Problem, name: str, plan, micro_batches: int, tokens: int) -> dict:
    """A method's predicted figures (the columns of steps.predicted_methods): ms/token, tokens/s with
    `micro_batches` in flight (no-bubbles schedule), or the status and reason when it does not fit."""
    row = {"method": name, "source": "predicted", "micro_batches": micro_batches}
    if isinstance(plan, Exception) or not plan.feasible:
        reason = str(plan) if isinstance(plan, Exception) else plan.reason
        return {**row, "status": "oom" if "memory" in reason else "infeasible", "reason": reason,
                "latency_ms": None, "throughput_tps": None, "stages": ""}
    ev = evaluate(problem, plan, micro_batches=micro_batches, tokens=tokens)
    return {**row, "status": "ok", "reason": "", "latency_ms": plan.latency_ms,
            "throughput_tps": ev.simulations["no-bubbles"].throughput_per_s,
            "throughput_bubbles_tps": ev.simulations["bubbles"].throughput_per_s,
            "ideal_throughput_tps": plan.throughput_per_s, "stages": format_stages(plan.stages)}


def solve_all(problem: Problem, objective: str, micro_batches: int, tokens: int = 4) -> dict:
    """EdgeShard's plan for `objective` (throughput: with `micro_batches` in flight) with its evaluation, and every
    method's predicted figures for `micro_batches` x `tokens` (each plan solved once).

    Returns {"plan", "eval", "error", "methods"}: plan and eval None and error the reason (the tightest
    constraint) when no plan fits; methods: one row per method (method_row), the steady-state variant
    included when it is the objective.
    """
    if objective not in OBJECTIVES:
        raise KitError(f"objective: {objective!r} is not one of {', '.join(OBJECTIVES)}")
    plans = method_plans(problem, micro_batches, steady=objective == "throughput-steady")
    methods = [method_row(problem, name, plan, micro_batches, tokens) for name, plan in plans.items()]
    plan = plans[METHOD_NAMES[objective]]
    if isinstance(plan, Exception):
        return {"plan": None, "error": str(plan), "methods": methods, "eval": None}
    ev = evaluate(problem, plan, micro_batches=micro_batches, tokens=tokens)
    return {"plan": plan, "error": "", "eval": ev, "methods": methods}


def readout_html(result: dict, micro_batches: int) -> str:
    """One short HTML paragraph: the plan's stages, predicted ms/token and tokens/s; or why no plan fits."""
    if result.get("plan") is None:
        return ("<div class='edgeshard-infeasible' style='color:#b00020'><b>No feasible plan.</b> "
                f"{html.escape(result.get('error', ''))}<br>The figures are cleared until a setting fits.</div>")
    plan, ev = result["plan"], result["eval"]
    at_k = ev.simulations["no-bubbles"].throughput_per_s
    return (f"<div class='edgeshard-plan'><b>{html.escape(plan.method)}</b>: "
            f"<b>{len(plan.stages)} stage{'s' if len(plan.stages) != 1 else ''}</b> "
            f"({html.escape(format_stages(plan.stages))})<br>"
            f"predicted <b><span class='edgeshard-ms'>{ev.latency_ms:.1f}</span> ms/token</b> "
            f"(one micro-batch), <b><span class='edgeshard-tps'>{at_k:.1f}</span> tokens/s</b> with "
            f"{micro_batches_label(micro_batches)} in flight; bottleneck {ev.bottleneck_ms:.1f} ms, "
            f"steady state with a full pipeline {ev.throughput_per_s:.1f} tokens/s</div>")


def mbps_text(mbps: float) -> str:
    """'0.5 Mbps', '20 Mbps', '1,000 Mbps'."""
    return f"{mbps:,.0f} Mbps" if mbps >= 10 else f"{mbps:.2g} Mbps"


def _finite(mbps: float) -> float:
    return 10 ** MBPS_RANGE[1] if math.isinf(mbps) else float(mbps)


def _bundle(obj) -> dict:
    """A display_data output of a plotly figure, a DataFrame or an HTML string (no IPython shell needed)."""
    if isinstance(obj, str):
        data = {"text/html": obj, "text/plain": obj}
    elif hasattr(obj, "to_string"):  # a DataFrame
        data = {"text/html": obj.to_html(index=False, na_rep="", float_format=lambda x: f"{x:,.1f}"),
                "text/plain": obj.to_string(index=False)}
    else:
        data = {"application/vnd.plotly.v1+json": json.loads(obj.to_json()),
                "text/plain": f"plotly figure: {obj.layout.title.text or ''}"}
    return {"output_type": "display_data", "data": data, "metadata": {}}


class PlanExplorer:
    """Widgets over a Problem; every change re-solves and redraws readout, map, bars, Gantt chart and table.

    `widget` is the box to display. The widgets' outputs are set as state (no display capture), so building and
    driving it works the same in JupyterLab, papermill and plain Python.
    """

    def __init__(self, problem: Problem, objective: str = "throughput", micro_batches: int = 4, tokens: int = 4):
        import ipywidgets as w
        if objective not in OBJECTIVES:
            raise KitError(f"objective: {objective!r} is not one of {', '.join(OBJECTIVES)}")
        self.base, self.tokens = problem, tokens
        self.memory_gb = {d.name: d.memory_bytes / GB for d in problem.devices}
        self.link_edits: dict[str, float] = {}  # "src->dst" -> Mbps, set in the advanced accordion
        self._group_set = {"cloud": False, "edge": False}  # untouched group sliders leave the problem's links as given
        self._quiet = False
        clouds = sorted(cloud_names(problem))
        src = problem.devices[problem.source].name
        label = {"style": {"description_width": "initial"}}
        self.objective = w.ToggleButtons(options=[(OBJECTIVE_LABELS[o], o) for o in OBJECTIVES], value=objective,
                                         description="objective", style={"description_width": "initial",
                                                                         "button_width": "auto"},
                                         tooltips=["lowest ms/token, one request", "most tokens/s with K micro-batches",
                                                   "smallest bottleneck of a full pipeline (the paper's DP)"])
        self.micro = w.IntSlider(value=micro_batches, min=1, max=max(16, micro_batches), description="micro-batches K",
                                 continuous_update=False, layout=w.Layout(width="360px"), **label)
        cloud_links = [problem.link(a, b).mbps for a in problem.names for b in problem.names
                       if a != b and (a in clouds or b in clouds)]
        start_cloud = sorted(cloud_links)[len(cloud_links) // 2] if cloud_links else 10.0
        self.cloud = self._mbps_slider("edge ↔ cloud", start_cloud, "edgeshard-cloud", disabled=not clouds)
        self.edge = self._mbps_slider("edge ↔ edge", problem.default_link.mbps, "edgeshard-edge")
        self.link = w.Dropdown(options=link_names(problem), description="link", **label)
        self.link_mbps = self._mbps_slider("bandwidth", problem.link(*self.link.value.split("->")).mbps,
                                           "edgeshard-link")
        self.clear_links = w.Button(description="clear per-link edits", layout=w.Layout(width="auto"))
        self.device = w.Dropdown(options=problem.names, description="device", **label)
        self.mem = w.FloatSlider(value=self.memory_gb[problem.names[0]], min=0.0, max=max(self.memory_gb.values()) * 2,
                                 step=0.1, readout_format=".1f", description="memory (GB)", continuous_update=False,
                                 layout=w.Layout(width="360px"), **label)
        self.mem.add_class("edgeshard-memory")
        self.on = {d.name: w.Checkbox(value=True, description=d.name, disabled=d.name == src, indent=False,
                                      layout=w.Layout(width="auto", margin="0 14px 0 0")) for d in problem.devices}
        self.readout = w.HTML(layout=w.Layout(margin="6px 0"))
        self.readout.add_class("edgeshard-readout")
        self.out, self.table = w.Output(), w.Output()
        self.out.add_class("edgeshard-figures")
        self.table.add_class("edgeshard-table")
        for ctl in (self.objective, self.micro, *self.on.values()):
            ctl.observe(lambda _change: self.redraw(), names="value")
        self.cloud[0].observe(lambda c: self._set_group("cloud", c), names="value")
        self.edge[0].observe(lambda c: self._set_group("edge", c), names="value")
        self.link_mbps[0].observe(self._set_link, names="value")
        self.mem.observe(self._set_mem, names="value")
        self.link.observe(self._pick_link, names="value")
        self.device.observe(self._pick_device, names="value")
        self.clear_links.on_click(self._clear_links)
        advanced = w.Accordion([w.VBox([w.HBox([self.link, *self.link_mbps]), self.clear_links])],
                               titles=("advanced: one link at a time",), selected_index=None)
        wrap = w.Layout(flex_flow="row wrap", align_items="center")
        self.widget = w.VBox([
            w.HBox([self.objective], layout=wrap), w.HBox([self.micro], layout=wrap),
            w.HBox([*self.cloud, *self.edge], layout=wrap), advanced,
            w.HBox([self.device, self.mem], layout=wrap),
            w.HTML("<b>devices on</b> (the source cannot be switched off)"),
            w.HBox(list(self.on.values()), layout=wrap),
            self.readout, self.out, self.table])
        self.result: dict = {}
        self.redraw()

    def _mbps_slider(self, description: str, mbps: float, css: str, disabled: bool = False) -> tuple:
        """(log slider, its readout in Mbps): sliders' own readouts would print 1000 as 1.00e+3."""
        import ipywidgets as w
        value = min(max(_finite(mbps), 10 ** MBPS_RANGE[0]), 10 ** MBPS_RANGE[1])
        slider = w.FloatLogSlider(value=value, base=10, min=MBPS_RANGE[0], max=MBPS_RANGE[1], step=0.05,
                                  readout=False, continuous_update=False, description=description, disabled=disabled,
                                  style={"description_width": "initial"}, layout=w.Layout(width="300px"))
        text = w.Label(mbps_text(value) if not disabled else "(no cloud device)", layout=w.Layout(width="110px"))
        slider.add_class(css)
        text.add_class(f"{css}-mbps")
        slider.observe(lambda c: setattr(text, "value", mbps_text(c["new"])), names="value")
        return slider, text

    # ---- widget callbacks -------------------------------------------------------------------------------
    def _set_group(self, group: str, change) -> None:
        self._group_set[group] = True
        clouds = cloud_names(self.base)
        for key in list(self.link_edits):  # the group slider sets every link of its group
            a, _, b = key.partition("->")
            if (a in clouds or b in clouds) == (group == "cloud"):
                del self.link_edits[key]
        self._pick_link({"new": self.link.value})
        self.redraw()

    def _pick_link(self, change) -> None:
        self._quiet = True
        self.link_mbps[0].value = _finite(self.problem().link(*change["new"].split("->")).mbps)
        self._quiet = False

    def _set_link(self, change) -> None:
        if not self._quiet:
            self.link_edits[self.link.value] = change["new"]
            self.redraw()

    def _clear_links(self, _button) -> None:
        self.link_edits.clear()
        self._pick_link({"new": self.link.value})
        self.redraw()

    def _pick_device(self, change) -> None:
        self._quiet = True
        self.mem.value = self.memory_gb[change["new"]]
        self._quiet = False

    def _set_mem(self, change) -> None:
        if not self._quiet:
            self.memory_gb[self.device.value] = change["new"]
            self.redraw()

    # ---- solving and drawing ----------------------------------------------------------------------------
    def problem(self) -> Problem:
        """The base problem with the widgets' edits applied."""
        off = {n for n, cb in self.on.items() if not cb.value}
        cloud = self.cloud[0].value if self._group_set["cloud"] else None
        edge = self.edge[0].value if self._group_set["edge"] else None
        return edit_problem(self.base, off, self.memory_gb, self.link_edits, cloud_mbps=cloud, edge_mbps=edge)

    def resolve(self) -> dict:
        """Re-solve with the widgets' current settings (an edit that makes no problem counts as infeasible)."""
        try:
            self.result = solve_all(self.problem(), self.objective.value, self.micro.value, self.tokens)
        except KitError as e:
            self.result = {"plan": None, "error": str(e), "methods": [], "eval": None}
        return self.result

    def redraw(self) -> None:
        """Re-solve; update the readout, the figures (cleared when no plan fits) and the table."""
        self.resolve()
        self.readout.value = readout_html(self.result, self.micro.value)
        try:
            figs = list(self.figures().values())
        except Exception as e:  # noqa: BLE001 - a widget callback's exception would only reach the browser's log
            self.readout.value += f"<div style='color:#b00020'>could not draw: {html.escape(repr(e))}</div>"
            figs = []
        if self.result["plan"] is None:
            figs = ["<div style='color:#666;background:#eee;padding:24px;text-align:center'>no feasible plan: "
                    "nothing to draw</div>"]
        self.out.outputs = tuple(_bundle(f) for f in figs)
        self.table.outputs = (_bundle(self.table_frame()),) if self.result["methods"] else ()

    def figures(self) -> dict:
        """The current plan's figures: partition map, method bars, Gantt chart (no-bubbles schedule); {} if none."""
        r, figs = self.result, {}
        if r.get("plan") is None:
            return figs
        figs["partition"] = plots.partition_map(r["plan"], devices=self.problem().names, n_units=self.base.n_units,
                                                title=f"{r['plan'].method}: layer-to-device map")
        ok = [m for m in r["methods"] if m["status"] == "ok"]
        if ok:
            figs["methods"] = plots.latency_throughput_bars(
                ok, title=f"predicted: EdgeShard and the baselines, {micro_batches_label(self.micro.value)}")
        figs["timeline"] = plots.pipeline_gantt(r["eval"].simulations["no-bubbles"].records,
                                                title=f"pipeline timeline, {micro_batches_label(self.micro.value)}")
        return figs

    def show_static(self) -> None:
        """Display the current figures outside the widget (for exported HTML and papermill)."""
        from IPython.display import display
        if self.result.get("error"):
            print(self.result["error"])
        for fig in self.figures().values():
            display(fig)

    def summary(self):
        """A DataFrame of every method's predicted figures for the current settings (the methods.csv columns)."""
        import pandas as pd
        return pd.DataFrame(self.result["methods"])

    def table_frame(self):
        """The methods' table as shown: readable column names, one row per method."""
        df = self.summary()
        df["n_stages"] = [len(s.split()) if s else None for s in df.get("stages", [""] * len(df))]
        keep = [c for c in TABLE_COLUMNS if c in df.columns and (c != "reason" or df[c].astype(bool).any())]
        df = df[keep].rename(columns=TABLE_COLUMNS)
        return df.rename(columns={"tokens/s at K": f"tokens/s, {micro_batches_label(self.micro.value)}"})

    def save(self, run) -> None:
        """Write the current plan, the methods' figures and the figures into a results Run."""
        run.write_csv("methods", self.result["methods"])
        if self.result.get("eval") is not None:
            run.write_csv("timeline", self.result["eval"].simulations["no-bubbles"].records)
            run.record(plan=self.result["plan"], problem=self.problem())
        for name, fig in self.figures().items():
            run.save_figure(name, fig)
