"""Notebook 02's planner explorer: ipywidgets for links, memory, devices, objective, micro-batches; re-solve and redraw."""

from __future__ import annotations

import math
from dataclasses import replace

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.experiments import plots
from edgeshard_kit.experiments.paper import paper_problem
from edgeshard_kit.experiments.steps import predicted_methods
from edgeshard_kit.planning.dp import solve
from edgeshard_kit.planning.problem import Problem, load_problem
from edgeshard_kit.planning.schedule import evaluate

GB = 1e9


def problem_for(problem_file: str = "", model: str = "llama2-7b", cloud_mbps: float = 20.0) -> Problem:
    """The problem of a JSON file, or ("" ) the paper's setting for `model` with the cloud at `cloud_mbps`."""
    if problem_file:
        return load_problem(problem_file)
    return paper_problem(model, cloud_mbps)


def edit_problem(problem: Problem, off: set[str] = frozenset(), memory_gb: dict[str, float] | None = None,
                 links_mbps: dict[str, float] | None = None) -> Problem:
    """A copy with devices switched off, memory budgets (GB) and link bandwidths (Mbps, "src->dst" or "default")."""
    src = problem.devices[problem.source].name
    if src in off:
        raise KitError(f"the source device {src} holds the prompt and cannot be switched off")
    memory_gb, links_mbps = memory_gb or {}, links_mbps or {}
    devices = tuple(replace(d, memory_bytes=memory_gb[d.name] * GB) if d.name in memory_gb else d
                    for d in problem.devices if d.name not in off)
    default = problem.default_link
    if "default" in links_mbps:
        default = replace(default, mbps=float(links_mbps["default"]))
    pairs = {(a, b): ln for a, b, ln in problem.pairs if a not in off and b not in off}
    for key, mbps in links_mbps.items():
        if key == "default":
            continue
        a, _, b = key.partition("->")
        if a in off or b in off:
            continue
        pairs[(a, b)] = replace(pairs.get((a, b), problem.default_link), mbps=float(mbps))
    return replace(problem, devices=devices, default_link=default,
                   pairs=tuple((a, b, ln) for (a, b), ln in pairs.items()))


def link_names(problem: Problem) -> list[str]:
    """"default" then every listed directed pair as "src->dst"."""
    return ["default"] + [f"{a}->{b}" for a, b, _ in problem.pairs]


def solve_all(problem: Problem, objective: str, micro_batches: int, tokens: int = 4) -> dict:
    """EdgeShard's plan for `objective` with its evaluation, and every method's predicted figures."""
    try:
        plan = solve(problem, objective)
    except KitError as e:
        return {"plan": None, "error": str(e), "methods": predicted_methods(problem, micro_batches), "eval": None}
    ev = evaluate(problem, plan, micro_batches=micro_batches, tokens=tokens)
    return {"plan": plan, "error": "", "eval": ev, "methods": predicted_methods(problem, micro_batches)}


class PlanExplorer:
    """Widgets over a Problem; every change re-solves and redraws map, bars and Gantt chart."""

    def __init__(self, problem: Problem, objective: str = "throughput", micro_batches: int = 4, tokens: int = 4):
        import ipywidgets as w
        self.base, self.tokens = problem, tokens
        self.memory_gb = {d.name: d.memory_bytes / GB for d in problem.devices}
        self.links_mbps = {k: (problem.default_link.mbps if k == "default" else ln.mbps)
                           for k, ln in zip(link_names(problem), [problem.default_link] + [p[2] for p in problem.pairs])}
        src = problem.devices[problem.source].name
        self.objective = w.ToggleButtons(options=["latency", "throughput"], value=objective, description="objective")
        self.micro = w.IntSlider(value=micro_batches, min=1, max=16, description="micro-batches")
        self.link = w.Dropdown(options=list(self.links_mbps), description="link")
        self.mbps = w.FloatLogSlider(value=_finite(self.links_mbps["default"]), base=10, min=-1, max=4.5, step=0.05,
                                     description="Mbps")
        self.device = w.Dropdown(options=[d.name for d in problem.devices], description="device")
        self.mem = w.FloatSlider(value=self.memory_gb[problem.devices[0].name], min=0.0,
                                 max=max(self.memory_gb.values()) * 2, step=0.1, description="memory GB")
        self.on = {d.name: w.Checkbox(value=True, description=d.name, disabled=d.name == src, indent=False,
                                      layout=w.Layout(width="150px")) for d in problem.devices}
        self.out = w.Output()
        self._quiet = False
        for ctl in (self.objective, self.micro, *self.on.values()):
            ctl.observe(self._changed, names="value")
        self.mbps.observe(self._set_link, names="value")
        self.mem.observe(self._set_mem, names="value")
        self.link.observe(self._pick_link, names="value")
        self.device.observe(self._pick_device, names="value")
        self.widget = w.VBox([
            w.HBox([self.objective, self.micro]),
            w.HBox([self.link, self.mbps]), w.HBox([self.device, self.mem]),
            w.HTML("<b>devices on</b> (the source cannot be switched off)"),
            w.GridBox(list(self.on.values()), layout=w.Layout(grid_template_columns="repeat(6, 160px)")),
            self.out])
        self.result: dict = {}
        # The first solve is computed, not drawn: show_static() displays it (drawing into an Output widget
        # while the cell that builds it still runs hangs headless nbclient/papermill runs).
        self.resolve()

    # ---- widget callbacks -------------------------------------------------------------------------------
    def _pick_link(self, change) -> None:
        self._quiet = True
        self.mbps.value = _finite(self.links_mbps[change["new"]])
        self._quiet = False

    def _pick_device(self, change) -> None:
        self._quiet = True
        self.mem.value = self.memory_gb[change["new"]]
        self._quiet = False

    def _set_link(self, change) -> None:
        if not self._quiet:
            self.links_mbps[self.link.value] = change["new"]
            self.redraw()

    def _set_mem(self, change) -> None:
        if not self._quiet:
            self.memory_gb[self.device.value] = change["new"]
            self.redraw()

    def _changed(self, change) -> None:
        self.redraw()

    # ---- solving and drawing ----------------------------------------------------------------------------
    def problem(self) -> Problem:
        """The base problem with the widgets' edits applied."""
        off = {n for n, cb in self.on.items() if not cb.value}
        links = {k: v for k, v in self.links_mbps.items() if not math.isinf(v)}
        return edit_problem(self.base, off, self.memory_gb, links)

    def resolve(self) -> dict:
        """Re-solve with the widgets' current settings."""
        self.result = solve_all(self.problem(), self.objective.value, self.micro.value, self.tokens)
        return self.result

    def redraw(self) -> None:
        """Re-solve and redraw into the output area."""
        from IPython.display import display
        self.resolve()
        self.out.clear_output(wait=True)
        with self.out:
            for fig in self.figures().values():
                display(fig)

    def figures(self) -> dict:
        """The current solve's figures: partition map, method bars, Gantt chart (no-bubbles schedule)."""
        r, figs = self.result, {}
        if r.get("plan") is not None:
            figs["partition"] = plots.partition_map(r["plan"], devices=self.problem().names,
                                                    n_units=self.base.n_units,
                                                    title=f"EdgeShard ({self.objective.value}) layer-to-device map")
        ok = [m for m in r["methods"] if m["status"] == "ok"]
        if ok:
            figs["methods"] = plots.latency_throughput_bars(ok, title="predicted: EdgeShard and the baselines")
        if r.get("eval") is not None:
            figs["timeline"] = plots.pipeline_gantt(r["eval"].simulations["no-bubbles"].records,
                                                    title=f"pipeline timeline, {self.micro.value} micro-batches")
        return figs

    def show_static(self) -> None:
        """Display the current figures outside the widget (for exported HTML and papermill)."""
        from IPython.display import display
        if self.result.get("error"):
            print(self.result["error"])
        for fig in self.figures().values():
            display(fig)

    def summary(self):
        """A DataFrame of every method's predicted figures for the current settings."""
        import pandas as pd
        return pd.DataFrame(self.result["methods"])

    def save(self, run) -> None:
        """Write the current plan, the methods' figures and the figures into a results Run."""
        run.write_csv("methods", self.result["methods"])
        if self.result.get("eval") is not None:
            run.write_csv("timeline", self.result["eval"].simulations["no-bubbles"].records)
            run.record(plan=self.result["plan"], problem=self.problem())
        for name, fig in self.figures().items():
            run.save_figure(name, fig)


def _finite(mbps: float) -> float:
    return 10000.0 if math.isinf(mbps) else float(mbps)
