"""The full experiment behind `make demo` and notebook 04: EdgeShard vs the baselines, swept over the cloud link, measured."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeshard_kit.experiments import steps
from edgeshard_kit.experiments.steps import params_of  # noqa: F401  (notebooks call ex.params_of)
from edgeshard_kit.core.units import KitError

PROMPT = "The edge devices share the model"
ALL_METHODS = ("EdgeShard-latency", "EdgeShard-throughput", "Edge-Solo", "Cloud-Edge-Even", "Cloud-Edge-Opt",
               "Memory-Proportional")


@dataclass
class Outcome:
    """What an experiment hands a notebook: its run folder, tidy tables, figures and a summary table."""

    path: Path
    tables: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)
    summary: Any = None


def parse_list(text: Any, cast=float) -> list:
    """"2,20,200" (or a list) -> [2.0, 20.0, 200.0]."""
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    try:
        return [cast(str(x).strip()) for x in items if str(x).strip()]
    except ValueError:
        raise KitError(f"expected a comma-separated list, got {text!r}") from None


def pick_methods(text: Any) -> list[str]:
    """Method names from "edgeshard-latency,edge-solo,..." (case and '-'/'_' insensitive)."""
    canon = {m.lower().replace("_", "-"): m for m in ALL_METHODS}
    canon["mem-proportional"] = "Memory-Proportional"
    out = []
    for name in parse_list(text, str):
        key = name.lower().replace("_", "-")
        if key not in canon:
            raise KitError(f"method {name!r}: choose from {', '.join(m.lower() for m in ALL_METHODS)}")
        out.append(canon[key])
    return out


def model_bytes(checkpoint: str | Path) -> int:
    """Bytes of the checkpoint's weight files."""
    return sum(p.stat().st_size for p in Path(checkpoint).glob("*.safetensors"))


def bench_testbed(checkpoint: str | Path, cloud_mbps: float, edges: int = 3, lan_mbps: float = 100.0,
                  cloud_latency_ms: float = 1.0):
    """A local testbed: `edges` edge processes (each too small for the whole model) and a cloud behind a shaped link."""
    from edgeshard_kit.testbed.inventory import testbed_from_dict
    size = model_bytes(checkpoint)
    # Two edge devices together hold ~80% of the model: Edge-Solo runs out of memory, the edges alone
    # need all three, and the cloud (4x the model) is the way out: the same forces as in the paper.
    edge_mem, cloud_mem = int(size * 0.45), int(size * 4)
    devs = [{"name": f"edge{i}", "type": "cpu-local", "memory": edge_mem, "source": i == 0, "launch": "local"}
            for i in range(edges)]
    devs.append({"name": "cloud", "type": "cpu-local", "memory": cloud_mem, "cloud": True, "launch": "local"})
    pairs = [{"src": a, "dst": b, "mbps": cloud_mbps, "latency_ms": cloud_latency_ms}
             for i in range(edges) for a, b in ((f"edge{i}", "cloud"), ("cloud", f"edge{i}"))]
    return testbed_from_dict({"name": f"bench-cloud-{cloud_mbps:g}Mbps", "devices": devs,
                              "links": {"default": {"mbps": lan_mbps, "latency_ms": 0.0}, "pairs": pairs},
                              "emulation": {"mode": "app"}}, "bench testbed")


def with_cloud_mbps(testbed, cloud_mbps: float):
    """The testbed with every link to or from a cloud device set to `cloud_mbps`."""
    from edgeshard_kit.testbed.inventory import testbed_from_dict
    d = testbed.to_dict()
    clouds = {x.name for x in testbed.devices if x.cloud}
    if not clouds:
        raise KitError(f"testbed {testbed.name}: no device is marked cloud: true (needed for the bandwidth sweep)")
    names = [x.name for x in testbed.devices]
    links = d.setdefault("links", {})
    pairs = [p for p in links.get("pairs", []) if p["src"] not in clouds and p["dst"] not in clouds]
    for c in clouds:
        for n in names:
            if n != c:
                lat = testbed.link(n, c).latency_ms
                pairs += [{"src": n, "dst": c, "mbps": cloud_mbps, "latency_ms": lat},
                          {"src": c, "dst": n, "mbps": cloud_mbps, "latency_ms": lat}]
    links["pairs"] = pairs
    return testbed_from_dict(d, f"{testbed.name} at {cloud_mbps:g} Mbps")


def scale_memory(testbed, checkpoint: str | Path, source_share: float = 0.45):
    """The testbed with every memory budget scaled by one factor, so that the source holds `source_share` of the model.

    A testbed file describes its devices for real models; a tiny checkpoint fits anywhere, and then there is
    nothing to plan. Scaling every budget alike keeps the file's proportions between devices.
    """
    from edgeshard_kit.testbed.inventory import testbed_from_dict
    if not 0 < source_share:
        raise KitError(f"memory share must be > 0 (got {source_share})")
    factor = source_share * model_bytes(checkpoint) / testbed.source.memory_bytes
    d = testbed.to_dict()
    for dev in d["devices"]:
        dev["memory"] = int(testbed.device(dev["name"]).memory_bytes * factor)
    return testbed_from_dict(d, f"{testbed.name} (memory x{factor:.3g})")


def sweep_testbed(base):
    """mbps -> `base` with its cloud links at mbps; on an emulated testbed that is up, tc is re-shaped to match."""
    def at(mbps: float):
        tb = with_cloud_mbps(base, mbps)
        if tb.emulation == "netns":
            from edgeshard_kit.testbed import netns
            netns.reshape(tb)
        return tb
    return at


def default_testbed(checkpoint: str | Path, cloud_mbps: float, prefer: str = "auto"):
    """(testbed, why): testbed/emulated.yaml (memory scaled to the model) when this host can emulate, else local.

    `prefer`: "auto", "emulated" (KitError when the host cannot) or "local" (bench_testbed: app-level shaping).
    """
    from edgeshard_kit.testbed import netns
    why = netns.unavailable()
    if prefer == "emulated" and why:
        raise KitError(f"emulated testbed requested: {why}")
    if prefer == "local" or why:
        return bench_testbed(checkpoint, cloud_mbps), why or "local testbed requested"
    path = Path(__file__).resolve().parents[2] / "testbed" / "emulated.yaml"
    if not path.is_file():
        raise KitError(f"{path}: the emulated testbed file is missing (it ships with the repository)")
    return scale_memory(steps.load_testbed(path), checkpoint), f"emulated ({path})"


def _measure(checkpoint, testbed, problem, plan, name: str, micro_batches: int, max_new_tokens: int,
             repeats: int, reference: list[int]) -> list[dict]:
    """Deploy one plan and measure: sequential per-token latency, pipelined tokens/s under both schedules."""
    from edgeshard_kit.runtime.deployment import deploy
    base = {"method": name, "source": "measured", "stages": steps.stages_text(plan.stages)}
    rows = []
    with deploy(plan, testbed, checkpoint, problem=problem) as dep:
        for rep in range(repeats):
            runs = [("sequential", dep.generate([PROMPT], max_new_tokens))]
            if micro_batches > 1:
                for sched in ("no-bubbles", "bubbles"):
                    runs.append((sched, dep.generate([PROMPT] * micro_batches, max_new_tokens, mode="pipelined",
                                                     micro_batches=micro_batches, schedule=sched)))
            for sched, res in runs:
                s = res.summary
                rows.append({**base, "schedule": sched, "repeat": rep, "status": "ok", "reason": "",
                             "latency_ms": s["per_token_ms"], "throughput_tps": s["decode_tokens_per_s"]
                             or s["tokens_per_s"], "prefill_ms": s["prefill_ms"],
                             "tokens_match": all(t == reference for t in res.tokens)})
    return rows


def _predicted(problem, plan, name: str, micro_batches: int, tokens: int) -> list[dict]:
    from edgeshard_kit.planning.schedule import evaluate
    ev = evaluate(problem, plan, micro_batches=micro_batches, tokens=tokens)
    base = {"method": name, "source": "predicted", "stages": steps.stages_text(plan.stages), "repeat": 0,
            "status": "ok", "reason": "", "prefill_ms": None, "tokens_match": None}
    rows = [{**base, "schedule": "sequential", "latency_ms": plan.latency_ms, "throughput_tps": 1000.0 / plan.latency_ms}]
    if micro_batches > 1:
        for sched in ("no-bubbles", "bubbles"):
            key = sched.replace("-", "_")
            rows.append({**base, "schedule": sched, "latency_ms": ev[f"token_interval_{key}_ms"],
                         "throughput_tps": ev[f"throughput_{key}_per_s"]})
    return rows


def _paper_model_plans(paper, plans: dict, methods: list[str]) -> dict:
    """EdgeShard's own choice under the paper's model, where it differs from the calibrated choice."""
    out = {}
    for name, plan in steps.edgeshard_plans(paper).items():
        if name not in methods or isinstance(plan, Exception) or not plan.feasible:
            continue
        mine = plans.get(name)
        if isinstance(mine, Exception) or not mine.feasible or tuple(mine.stages) != tuple(plan.stages):
            out[f"{name} (paper's model)"] = plan
    return out


def sweep(checkpoint, testbed_at, profiles: dict, bandwidths: list[float], methods: list[str], micro_batches: int,
          max_new_tokens: int, repeats: int, log=print, runtime: dict | None = None) -> list[dict]:
    """Every method at every cloud bandwidth: predicted rows, and measured rows from real deployments.

    With `runtime` (overheads.calibrate_runtime) the planner works with the runtime's fixed costs; every plan
    then also gets a "predicted-paper" row (the paper's model: layers + transfers only) for the same stages, and
    where EdgeShard's choice under the paper's model differs, that plan is deployed too, as "<method> (paper's model)".
    """
    from edgeshard_kit.planning.problem import make_plan, without_fixed_costs
    reference = steps.reference_tokens(checkpoint, [PROMPT], max_new_tokens)[0]
    rows = []
    for mbps in bandwidths:
        testbed = testbed_at(mbps)
        problem = steps.build_problem(profiles, testbed, prompt_len=8, gen_tokens=max_new_tokens, runtime=runtime)
        paper = without_fixed_costs(problem) if runtime else None
        plans = steps.method_plans(problem)
        names = list(methods)
        if paper is not None:
            extra = _paper_model_plans(paper, plans, methods)
            plans.update({k: make_plan(problem, p.stages, p.objective, p.relay, k) for k, p in extra.items()})
            names += list(extra)
        measured: dict[tuple, list[dict]] = {}  # identical stage lists are deployed once
        for name in names:
            plan = plans[name]
            if isinstance(plan, Exception) or not plan.feasible:
                reason = str(plan) if isinstance(plan, Exception) else plan.reason
                status = "oom" if "memory" in reason else "infeasible"
                rows += [{"method": name, "cloud_mbps": mbps, "source": src, "schedule": "sequential",
                          "status": status, "reason": reason, "latency_ms": None, "throughput_tps": None}
                         for src in ("predicted", "measured")]
                log(f"  {mbps:>7g} Mbps  {name:<22} {status}: {reason}")
                continue
            rows += [{**r, "cloud_mbps": mbps} for r in _predicted(problem, plan, name, micro_batches, max_new_tokens)]
            if paper is not None:
                same = make_plan(paper, plan.stages, plan.objective, plan.relay, name)
                rows += [{**r, "cloud_mbps": mbps, "source": "predicted-paper"}
                         for r in _predicted(paper, same, name, micro_batches, max_new_tokens)]
            key = tuple(plan.stages)
            t0 = time.perf_counter()
            if key not in measured:
                measured[key] = _measure(checkpoint, testbed, problem, plan, name, micro_batches, max_new_tokens,
                                         repeats, reference)
            rows += [{**r, "method": name, "cloud_mbps": mbps} for r in measured[key]]
            seq = [r["latency_ms"] for r in measured[key] if r["schedule"] == "sequential"]
            log(f"  {mbps:>7g} Mbps  {name:<22} {steps.stages_text(plan.stages):<40} predicted "
                f"{plan.latency_ms:8.2f} ms/token, measured {min(seq):8.2f} ({time.perf_counter() - t0:.1f} s)")
    return rows


def figures(df) -> dict:
    """The experiment's figures: latency and throughput sweeps, bars at the lowest bandwidth, pred vs measured."""
    from edgeshard_kit.experiments import plots
    figs = {}
    seq = df[df.schedule == "sequential"]
    figs["latency_sweep"] = plots.bandwidth_sweep(seq, y="latency_ms", dash="source",
                                                  title="per-token latency (ms) vs cloud bandwidth")
    pipe = df[(df.schedule == "no-bubbles") | (df.status != "ok")]
    if (df.schedule == "no-bubbles").any():
        figs["throughput_sweep"] = plots.bandwidth_sweep(pipe, y="throughput_tps", dash="source",
                                                         title="pipelined throughput (tokens/s, no-bubbles) vs cloud bandwidth")
    low = df[(df.cloud_mbps == df.cloud_mbps.min()) & (df.status == "ok")]
    figs["methods_at_lowest_bandwidth"] = plots.bars(low[low.schedule == "sequential"], "latency_ms", color="source",
                                                     title=f"per-token latency at {df.cloud_mbps.min():g} Mbps")
    ok = df[df.status == "ok"]
    paired = ok[ok.source == "measured"].groupby(["method", "cloud_mbps", "schedule"], as_index=False)["latency_ms"] \
        .median().merge(ok[ok.source == "predicted"][["method", "cloud_mbps", "schedule", "latency_ms"]],
                        on=["method", "cloud_mbps", "schedule"], suffixes=("_measured", "_predicted"))
    figs["predicted_vs_measured"] = plots.predicted_vs_measured(
        paired, "latency_ms_predicted", "latency_ms_measured", color="schedule",
        title="per-token latency: predicted vs measured (ms)")
    return figs


def summary_table(df):
    """Median measured and predicted latency / throughput per (bandwidth, method)."""
    import pandas as pd
    ok = df[df.status == "ok"]
    lat = ok[ok.schedule == "sequential"].pivot_table(index=["cloud_mbps", "method"], columns="source",
                                                       values="latency_ms", aggfunc="median")
    lat.columns = [f"latency_ms_{c}" for c in lat.columns]
    thr = ok[ok.schedule == "no-bubbles"].pivot_table(index=["cloud_mbps", "method"], columns="source",
                                                       values="throughput_tps", aggfunc="median")
    thr.columns = [f"tps_{c}" for c in thr.columns]
    bad = df[df.status != "ok"].drop_duplicates(["cloud_mbps", "method"]).set_index(["cloud_mbps", "method"])["status"]
    out = pd.concat([lat, thr, bad], axis=1).reset_index()
    out["status"] = out["status"].fillna("ok")
    return out.round(2)


def run_benchmark(run, model_path: str = "", tiny_layers: int = 6, tiny_hidden: int = 128, testbed_file: Any = "",
                  cloud_mbps: Any = "2,20,200", methods: Any = ",".join(ALL_METHODS), max_new_tokens: int = 6,
                  micro_batches: int = 3, repeats: int = 1, profile_repeats: int = 3, calibrate: bool = True,
                  memory_share: float = 0.0, log=print) -> Outcome:
    """Profile, calibrate the runtime's fixed costs, plan every method at every cloud bandwidth, deploy and measure.

    `testbed_file`: a testbed YAML path or a Testbed ("" = the built-in local testbed, bench_testbed). An emulated
    (netns) testbed is brought up for the run if it is not up, and down afterwards. `memory_share` > 0 scales every
    device's memory budget so that the source holds that share of the model (scale_memory). `calibrate`: measure
    the per-stage and per-token fixed costs (overheads.calibrate_runtime) and plan with them; the paper's model's
    predictions of the same plans are kept beside them ("predicted-paper" rows). CSVs and figures go into `run`.
    """
    from edgeshard_kit.testbed import netns

    checkpoint = steps.checkpoint_for(model_path, run.path, layers=tiny_layers, hidden=tiny_hidden)
    bandwidths, chosen = parse_list(cloud_mbps), pick_methods(methods)
    if testbed_file:
        base = steps.load_testbed(testbed_file) if isinstance(testbed_file, (str, Path)) else testbed_file
        if memory_share > 0:
            base = scale_memory(base, checkpoint, memory_share)
        testbed_at = sweep_testbed(base)
    else:
        base = bench_testbed(checkpoint, bandwidths[0])
        testbed_at = lambda mbps: bench_testbed(checkpoint, mbps)  # noqa: E731
    with netns.session(base):
        return _run_benchmark(run, checkpoint, testbed_at, bandwidths, chosen, max_new_tokens, micro_batches,
                              repeats, profile_repeats, calibrate, log)


def _run_benchmark(run, checkpoint, testbed_at, bandwidths, chosen, max_new_tokens, micro_batches, repeats,
                   profile_repeats, calibrate, log) -> Outcome:
    import pandas as pd

    from edgeshard_kit.runtime.calibrate import calibrate_runtime
    first = testbed_at(bandwidths[0])
    run.record(testbed=first, seeds={"tiny_model": 0, "sampling": "greedy"}, checkpoint=str(checkpoint))
    log(f"profiling {checkpoint} on {first.name} ...")
    profiles = steps.profile_testbed(checkpoint, first, repeats=profile_repeats, prompt_len=8,
                                     kv_lens=f"8,{8 + max_new_tokens}", run=run)
    run.write_csv("profiles", steps.profile_table(profiles))
    runtime = None
    if calibrate:
        top = max(bandwidths)  # the fastest cloud link: the least of the measured excess is link time
        log(f"calibrating the runtime's fixed costs per stage and per token (cloud link {top:g} Mbps) ...")
        runtime = calibrate_runtime(checkpoint, testbed_at(top), profiles, tokens=max(8, 2 * max_new_tokens),
                                    log=log)
        run.write_csv("runtime_overheads", runtime["records"])
        run.record(runtime_overheads={k: runtime[k] for k in ("stage_ms", "step_ms", "raw", "method")})
        log(f"  stage_ms {', '.join(f'{t} {v:.3f}' for t, v in runtime['stage_ms'].items())}; "
            f"step_ms {runtime['step_ms']:.3f}")
    log(f"sweeping {len(chosen)} methods over cloud bandwidths {bandwidths} Mbps ...")
    df = pd.DataFrame(sweep(checkpoint, testbed_at, profiles, bandwidths, chosen, micro_batches, max_new_tokens,
                            repeats, log, runtime=runtime))
    run.write_csv("measurements", df)
    figs = figures(df)
    for name, fig in figs.items():
        run.save_figure(name, fig)
    table = summary_table(df)
    run.write_csv("summary", table)
    ok = df[(df.source == "measured") & (df.status == "ok")]
    run.finish(tokens_match=bool(ok["tokens_match"].all()) if len(ok) else None,
               measured_runs=int(len(ok)), bandwidths=bandwidths, methods=chosen)
    return Outcome(run.path, {"measurements": df, "summary": table}, figs, table)


def prediction_table(df):
    """Per (bandwidth, method, schedule): median measured beside the kit's prediction and the paper model's, with ratios.

    Sequential rows compare per-token latency (ms); no-bubbles rows compare pipelined throughput (tokens/s).
    """
    import pandas as pd
    ok = df[(df.status == "ok") & df.schedule.isin(["sequential", "no-bubbles"])].copy()
    ok["value"] = ok.latency_ms.where(ok.schedule == "sequential", ok.throughput_tps)
    t = ok.pivot_table(index=["cloud_mbps", "method", "schedule"], columns="source", values="value",
                       aggfunc="median").reset_index()
    t.columns.name = None
    t.insert(3, "metric", t.schedule.map({"sequential": "latency_ms", "no-bubbles": "throughput_tps"}))
    for src in ("predicted", "predicted-paper"):
        if src in t:
            t[f"measured_over_{src.replace('-', '_')}"] = t["measured"] / t[src]
    stages = df[df.source == "measured"].drop_duplicates(["cloud_mbps", "method"])[["cloud_mbps", "method", "stages"]]
    return pd.merge(t, stages, on=["cloud_mbps", "method"], how="left")


# ---- the paper's setting, by simulation (notebook 05) ------------------------------------------------------
def paper_problem(model: str = "llama2-7b", cloud_mbps: float = 20.0, micro_batches: int = 1):
    """The planning problem of the paper's 15-device testbed (reproduce.py)."""
    from edgeshard_kit.experiments.paper import paper_problem as _pp
    return _pp(model, cloud_mbps, micro_batches)


def paper_comparison(df) -> list[dict]:
    """Our simulated figures at the highest swept bandwidth beside the numbers the paper reports."""
    from edgeshard_kit.profiling.reference import paper_testbed
    rep = paper_testbed()["reported"]
    top = df[df.cloud_mbps == df.cloud_mbps.max()]
    pairs = [("llama2-7b", "EdgeShard", "llama2_7b_edgeshard"), ("llama2-7b", "Edge-Solo", "llama2_7b_edge_solo_approx"),
             ("llama2-70b", "EdgeShard", "llama2_70b_edgeshard")]
    rows = []
    for model, method, key in pairs:
        paper = rep.get(key, {})
        lat = top[(top.model == model) & (top.method.str.lower() == method.lower()) & (top.objective == "latency")]
        thr = top[(top.model == model) & (top.method.str.lower() == method.lower()) & (top.objective == "throughput")
                  & (top.schedule == "no-bubbles")]
        for metric, ours, theirs in (("latency_ms", lat.latency_ms, paper.get("latency_ms_per_token")),
                                     ("throughput_tps", thr.throughput_per_s, paper.get("throughput_tokens_per_s"))):
            if len(ours) and theirs is not None:
                rows += [{"model": model, "method": method, "metric": metric, "source": "simulated (kit)",
                          "value": float(ours.iloc[0])},
                         {"model": model, "method": method, "metric": metric, "source": "paper", "value": float(theirs)}]
    return rows


def paper_reproduction(run, models: Any = "llama2-7b,llama2-13b,llama2-70b", cloud_mbps: Any = "1,5,10,20,50") -> Outcome:
    """Simulate EdgeShard and the baselines on the paper's testbed; CSVs and figures against the paper's figures."""
    import pandas as pd

    from edgeshard_kit.experiments import plots
    from edgeshard_kit.experiments import paper as reproduce
    mods, bws = parse_list(models, str), parse_list(cloud_mbps)
    df = pd.DataFrame(reproduce.reproduce(tuple(mods), tuple(bws)))
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


# ---- `make demo` ---------------------------------------------------------------------------------------------
def demo(root: str | Path = "results", cloud_mbps: Any = "2,20,200", max_new_tokens: int = 6, layers: int = 4,
         testbed: str = "auto") -> Path:
    """The full experiment on a tiny model: emulated testbed when this host can (root), local otherwise.

    Creates the checkpoint, brings the testbed up, profiles, calibrates, plans, deploys and benchmarks EdgeShard
    against the baselines, writes the run folder with its figures, takes the testbed down, prints a summary.
    """
    import pandas as pd

    from edgeshard_kit.experiments.results import new_run
    t0 = time.perf_counter()
    bandwidths = parse_list(cloud_mbps)
    run = new_run("demo", {"cloud_mbps": cloud_mbps, "max_new_tokens": max_new_tokens, "tiny_layers": layers,
                           "testbed": testbed}, root=root)
    checkpoint = steps.checkpoint_for("", run.path, layers=layers, hidden=128)
    tb, why = default_testbed(checkpoint, bandwidths[0], testbed)
    local = tb.emulation != "netns"
    where = (f"local testbed (3 edge processes + cloud on 127.0.0.1, app-level link shaping: {why})" if local else
             f"emulated testbed {tb.name}: {len(tb.devices)} network namespaces with sshd, tc and cgroups")
    print(f"edgeshard demo: tiny Llama ({layers} layers), {where}\n"
          f"  EdgeShard vs baselines at cloud links of {cloud_mbps} Mbps")
    run.record(testbed_choice=where)
    out = run_benchmark(run, tiny_layers=layers, tiny_hidden=128, testbed_file="" if local else tb,
                        cloud_mbps=cloud_mbps, max_new_tokens=max_new_tokens, micro_batches=3, repeats=1)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print("\n" + out.summary.to_string(index=False))
    m = out.tables["measurements"]
    ok = m[(m.source == "measured") & (m.status == "ok")]
    print(f"\nall measured tokens equal one-device generation: {bool(ok.tokens_match.all())} ({len(ok)} runs)")
    print(f"results (manifest, CSVs, HTML figures): {out.path}   [{time.perf_counter() - t0:.0f} s]")
    print(f"look at them with: edgeshard results show {out.path.name}")
    return out.path
