"""Notebook 04's experiment, also behind `demo` and `bench testbed-prediction`: `BenchmarkConfig`, sweep, measure."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.numbers import integer, number
from edgeshard_kit.core.units import format_stages
from edgeshard_kit.experiments import breakdown, plots, steps
from edgeshard_kit.experiments.measurements import measure_plans, prompt_ids
from edgeshard_kit.experiments.results import Outcome, Run, experiment
from edgeshard_kit.experiments.testbeds import bench_testbed, scale_memory, sweep_testbed
from edgeshard_kit.model.prompts import GEN_TOKENS, PROMPT_LEN, pick_prompts
from edgeshard_kit.planning.build import LinkModel, Workload, build_problem
from edgeshard_kit.planning.plan import make_plan
from edgeshard_kit.planning.problem import without_fixed_costs
from edgeshard_kit.planning.schedule import evaluate
from edgeshard_kit.runtime import probe, wire
from edgeshard_kit.runtime.calibrate import RuntimeCosts, calibrate_runtime
from edgeshard_kit.testbed import netns, nsnet
from edgeshard_kit.testbed.inventory import Testbed, load_testbed
from edgeshard_kit.planning.objectives import micro_batches_label

ALL_METHODS = ("EdgeShard-latency", "EdgeShard-throughput", "Edge-Solo", "Cloud-Edge-Even", "Cloud-Edge-Opt",
               "Memory-Proportional")
RUN_LOCATION = ("out_dir", "results_root")  # notebook parameters that say where the run goes, not what it does
Log = Callable[[str], None]


def _quiet(msg: str) -> None:
    """The default progress log: nothing (a notebook or a command passes `print`)."""


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


@dataclass(frozen=True)
class BenchmarkConfig:
    """The experiment's knobs: notebook 04's parameters cell, one field each (the run's folder is the Run's).

    `cloud_mbps` and `methods` may be given as comma-separated text (as in the notebook); they are kept as
    tuples of floats and of method names ("" = every method). Every field is checked; a bad one is a KitError
    that names it.
    """

    model_path: str = ""           # "": SmolLM2-135M-Instruct (the default real model); "tiny": a tiny seeded random
                                   # one in the run folder; or a Hugging Face Llama checkpoint folder
    tiny_layers: int = 6           # tiny checkpoint: decoder layers
    tiny_hidden: int = 128         # tiny checkpoint: hidden size (8 heads of an even size)
    testbed_file: Any = ""         # a testbed YAML path (or a Testbed); "": bench_testbed (local, app-level shaping)
    cloud_mbps: Any = (2.0, 20.0, 200.0)  # cloud link bandwidths swept (Mbps)
    methods: Any = ALL_METHODS     # EdgeShard (both objectives) and the baselines to deploy
    prompt_len: int = PROMPT_LEN   # prompt tokens: the kit's prompts cut to this length (the paper: 32)
    max_new_tokens: int = GEN_TOKENS  # tokens generated per prompt (the paper: 96)
    micro_batches: int = 3         # pipelined runs; 1 = sequential only
    repeats: int = 3               # measured generations per (method, bandwidth), interleaved across methods
    profile_repeats: int = 3       # timed repeats per profiled figure
    calibrate: bool = True         # measure the runtime's fixed costs first and plan with them
    calibrate_repeats: int = 6     # generations per calibration deployment, in interleaved windows
    probe: bool = True             # emulated testbed: probe every link at the model's message sizes, plan with it
    memory_share: float = 0.0      # > 0: scale the testbed file's memory so the source holds this share of the model

    def __post_init__(self) -> None:
        def where(name: str) -> str:
            return f"BenchmarkConfig.{name}"

        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)  # frozen: normalised once, here

        if not isinstance(self.model_path, (str, Path)):
            raise KitError(f"{where('model_path')}: {self.model_path!r} is not a path")
        put("model_path", str(self.model_path).strip())
        if self.model_path and not steps.is_tiny(self.model_path) and not Path(self.model_path).is_dir() \
                and self.model_path.lower() not in steps.hub_names():
            raise KitError(f"{where('model_path')}: {self.model_path} is not a checkpoint folder (nor \"\" for the "
                           f"default model, \"tiny\" for a tiny random one)")
        integer(self.tiny_layers, where("tiny_layers"), lo=1)
        if integer(self.tiny_hidden, where("tiny_hidden"), lo=16) % 16:
            raise KitError(f"{where('tiny_hidden')}: {self.tiny_hidden} is not a multiple of 16 (8 heads of an "
                           f"even size)")
        if isinstance(self.testbed_file, Path) or (isinstance(self.testbed_file, str) and self.testbed_file):
            put("testbed_file", str(self.testbed_file))
            if not Path(self.testbed_file).is_file():
                raise KitError(f"{where('testbed_file')}: {self.testbed_file} does not exist")
        elif not (self.testbed_file == "" or isinstance(self.testbed_file, Testbed)):
            raise KitError(f"{where('testbed_file')}: {self.testbed_file!r} is not a testbed file or a Testbed")
        bandwidths = tuple(number(v, where("cloud_mbps")) for v in parse_list(self.cloud_mbps, str))
        if not bandwidths or min(bandwidths) <= 0:
            raise KitError(f"{where('cloud_mbps')}: {self.cloud_mbps!r}: give one or more bandwidths > 0 (Mbps)")
        put("cloud_mbps", bandwidths)
        try:
            put("methods", tuple(pick_methods(self.methods)) or ALL_METHODS)
        except KitError as e:
            raise KitError(f"{where('methods')}: {e}") from None
        integer(self.prompt_len, where("prompt_len"), lo=1)
        integer(self.max_new_tokens, where("max_new_tokens"), lo=1)
        integer(self.micro_batches, where("micro_batches"), lo=1)
        integer(self.repeats, where("repeats"), lo=1)
        integer(self.profile_repeats, where("profile_repeats"), lo=1)
        for flag in ("calibrate", "probe"):
            if not isinstance(getattr(self, flag), bool):
                raise KitError(f"{where(flag)}: {getattr(self, flag)!r} is not True or False")
        integer(self.calibrate_repeats, where("calibrate_repeats"), lo=1)
        put("memory_share", number(self.memory_share, where("memory_share"), minimum=0.0))
        if self.memory_share > 0 and not self.testbed_file:
            raise KitError(f"{where('memory_share')}: scales a testbed file's memory; the built-in testbed "
                           f"(testbed_file = \"\") is already sized to the model")

    @classmethod
    def from_params(cls, params: dict) -> "BenchmarkConfig":
        """The config of a notebook's parameters (`steps.params_of(globals())`): its fields; other names ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})

    def to_dict(self) -> dict:
        """Plain data for the manifest (a Testbed given in place of a file is named by its name)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        tb = self.testbed_file
        out["testbed_file"] = tb if isinstance(tb, str) else tb.name
        out["cloud_mbps"], out["methods"] = list(self.cloud_mbps), list(self.methods)
        return out


def _predicted(problem, plan, name: str, micro_batches: int, tokens: int, pipe_problem=None) -> list[dict]:
    """Predicted rows of `plan`: sequential per-token latency on `problem`, pipelined figures at `micro_batches`
    on `pipe_problem` (the busy-link pricing; default `problem`)."""
    seq = make_plan(problem, plan.stages, plan.objective, plan.relay, name)
    ev = evaluate(pipe_problem or problem, plan, micro_batches=micro_batches, tokens=tokens)
    base = {"method": name, "source": "predicted", "stages": format_stages(plan.stages), "repeat": 0,
            "status": "ok", "reason": "", "prefill_ms": None, "tokens_match": None}
    rows = [{**base, "schedule": "sequential", "micro_batches": 1, "latency_ms": seq.latency_ms,
             "throughput_tps": 1000.0 / seq.latency_ms}]
    base["micro_batches"] = micro_batches
    if micro_batches > 1:
        for sched in ("no-bubbles", "bubbles"):
            sim = ev.simulations[sched]
            rows.append({**base, "schedule": sched, "latency_ms": sim.token_interval_ms,
                         "throughput_tps": sim.throughput_per_s})
    return rows


def _paper_model_plans(paper, plans: dict, methods: tuple[str, ...], micro_batches: int) -> dict:
    """EdgeShard's own choice under the paper's model, where it differs from the calibrated choice."""
    out = {}
    for name, plan in steps.edgeshard_plans(paper, micro_batches).items():
        if name not in methods or isinstance(plan, Exception) or not plan.feasible:
            continue
        mine = plans.get(name)
        if isinstance(mine, Exception) or not mine.feasible or tuple(mine.stages) != tuple(plan.stages):
            out[f"{name} (paper's model)"] = plan
    return out


def link_models(config: BenchmarkConfig, testbed: Testbed, profiles: dict,
                log: Log = _quiet) -> tuple[LinkModel | None, LinkModel | None, list[dict]]:
    """(idle-link model for sequential latency, busy-link model for pipelines, probe records) of `testbed` as it is
    shaped now: the emulated testbed's tbf bucket (testbed.nsnet) or the app shaper's, and on an emulated testbed
    (`config.probe`) every link probed at the model's message sizes (runtime.probe.message_sizes)."""
    if testbed.emulation == "netns":
        burst = float(nsnet.LINK_BURST_BYTES)
    elif testbed.emulation == "app":
        burst = wire.LinkShaper(1.0).burst
    else:
        return None, None, []
    measured, records = {}, []
    if config.probe and testbed.emulation == "netns":
        sizes = probe.message_sizes(next(iter(profiles.values())))
        measured, records = probe.measured_links(testbed, sizes, repeats=3)
        log(f"  probed {len(measured)} links at {', '.join(f'{b} B' for b in sizes)}: "
            f"{', '.join(f'{a}->{b} {m:.3g} Mbps' for (a, b), (m, _) in list(measured.items())[:4])}, ...")
    return LinkModel(burst, True, measured), LinkModel(burst, False, measured), records


def sweep(config: BenchmarkConfig, checkpoint, testbed_at, profiles: dict, runtime: RuntimeCosts | None = None,
          log: Log = _quiet, links: dict | None = None) -> dict[str, list[dict]]:
    """Every method at every cloud bandwidth of `config`: tables {measurements, stage_terms, stage_records, probes}.

    Rows: predicted, and measured from real deployments, every method at the same K = `config.micro_batches`
    (EdgeShard-throughput is planned for that K). The kit's prediction prices links by the shaper's burst and
    the probe (`link_models`: an idle link for sequential latency, a busy one for pipelines) and, with `runtime`
    (runtime.calibrate's RuntimeCosts), the runtime's fixed costs; every plan also gets a "predicted-paper" row
    (the paper's model: layers + the inventory's links, bytes x 8 / Mbps) for the same stages, and where
    EdgeShard's choice under the paper's model differs, that plan is deployed too, as "<method> (paper's model)".
    `links`: link_models' results already taken, by bandwidth (filled in here).
    """
    links = {} if links is None else links
    k, tokens = config.micro_batches, config.max_new_tokens
    prompts = prompt_ids(checkpoint, config.micro_batches, config.prompt_len)
    # One prompt at a time, as the runtime's micro-batches of one row: the reference is batch-size exact.
    reference = [steps.reference_tokens(checkpoint, prompts[0][i:i + 1], tokens, prompts[1][i:i + 1])[0]
                 for i in range(prompts[0].shape[0])]
    rows, chosen, probes, terms = [], [], [], []  # plans first (every bandwidth), then the deployments
    workload = Workload(prompt_len=config.prompt_len, gen_tokens=tokens)
    for mbps in config.cloud_mbps:
        testbed = testbed_at(mbps)
        if mbps not in links:
            links[mbps] = link_models(config, testbed, profiles, log)
        idle, busy, recs = links[mbps]
        probes += [{**r, "cloud_mbps": mbps} for r in recs]
        problem = build_problem(profiles, testbed, workload, runtime, returns="tokens", links=idle)
        pipe = build_problem(profiles, testbed, workload, runtime, returns="tokens", links=busy)
        paper = without_fixed_costs(build_problem(profiles, testbed, workload, returns="tokens"))
        plans = steps.method_plans(problem, k)
        plans["EdgeShard-throughput"] = steps.edgeshard_plans(pipe, k)["EdgeShard-throughput"]
        names = list(config.methods)
        if runtime is not None or idle is not None:
            extra = _paper_model_plans(paper, plans, config.methods, k)
            plans.update({n: make_plan(problem, p.stages, p.objective, p.relay, n) for n, p in extra.items()})
            names += list(extra)
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
            rows += [{**r, "cloud_mbps": mbps} for r in _predicted(problem, plan, name, k, tokens, pipe)]
            same = make_plan(paper, plan.stages, plan.objective, plan.relay, name)
            rows += [{**r, "cloud_mbps": mbps, "source": "predicted-paper"}
                     for r in _predicted(paper, same, name, k, tokens)]
            terms += _stage_terms(problem, plan, name, mbps)
            chosen.append((mbps, name, make_plan(problem, plan.stages, plan.objective, plan.relay, name), problem,
                           testbed))
    measured, stage_rows = measure_plans(checkpoint, testbed_at, chosen, prompts, reference, tokens, k,
                                         config.repeats, log, schedules=("no-bubbles",))
    return {"measurements": rows + measured, "stage_terms": terms, "stage_records": stage_rows, "probes": probes}


def _stage_terms(problem, plan, name: str, mbps: float) -> list[dict]:
    """The kit's prediction of every stage of `plan`, term by term (ms per decode step)."""
    out = []
    for i, s in enumerate(plan.stages):
        dev = problem.devices[problem.index(s.device)]
        out.append({"method": name, "cloud_mbps": mbps, "stage": i, "device": s.device, "start": s.start,
                    "end": s.end, "compute_ms": sum(dev.unit_ms[s.start:s.end]), "fixed_ms": dev.stage_ms,
                    "transfer_ms": plan.stage_transfer_ms[i]})
    return out


def figures(df) -> dict:
    """The experiment's figures: latency and throughput sweeps, bars at the lowest bandwidth, pred vs measured."""
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
                                                     title=f"per-token latency at {df.cloud_mbps.min():g} Mbps "
                                                           f"(median, error bars min..max of the repeats)")
    return figs


summary_table = breakdown.summary_table  # min/median/max per (bandwidth, method), the kit's and the paper's prediction
prediction_table = breakdown.prediction_table


@experiment
def run_benchmark(run: Run, config: BenchmarkConfig, log: Log = _quiet) -> Outcome:
    """Profile, calibrate the runtime's fixed costs, plan every method at every cloud bandwidth, deploy and measure.

    An emulated (netns) testbed is brought up for the run if it is not up, and down afterwards. With
    `config.calibrate` the per-stage and per-token fixed costs are measured (runtime.calibrate) and planned with;
    the paper's model's predictions of the same plans are kept beside them ("predicted-paper" rows). The config,
    CSVs and figures go into `run`, which is finished.
    """
    checkpoint = steps.checkpoint_for(config.model_path, run.path, layers=config.tiny_layers,
                                      hidden=config.tiny_hidden)
    if config.testbed_file:
        tb = config.testbed_file
        base = load_testbed(tb) if isinstance(tb, str) else tb
        if config.memory_share > 0:
            base = scale_memory(base, checkpoint, config.memory_share)
        testbed_at = sweep_testbed(base)
    else:
        base = bench_testbed(checkpoint, config.cloud_mbps[0])
        testbed_at = lambda mbps: bench_testbed(checkpoint, mbps)  # noqa: E731
    run.record(config=config)
    with netns.session(base):
        return _run_benchmark(run, config, checkpoint, testbed_at, log)


def _run_benchmark(run: Run, config: BenchmarkConfig, checkpoint: Path, testbed_at, log: Log) -> Outcome:
    import pandas as pd

    first = testbed_at(config.cloud_mbps[0])
    run.record(testbed=first, seeds={"tiny_model": 0, "sampling": "greedy"}, checkpoint=str(checkpoint),
               prompts={"set": "edgeshard_kit/data/prompts.txt", "used": pick_prompts(config.micro_batches),
                        "prompt_len": config.prompt_len, "max_new_tokens": config.max_new_tokens})
    log(f"profiling {checkpoint} on {first.name} ...")
    p = config.prompt_len
    profiles = steps.profile_testbed(checkpoint, first, repeats=config.profile_repeats, prompt_len=p,
                                     kv_lens=f"{p},{p + config.max_new_tokens}", run=run)
    run.write_csv("profiles", steps.profiles_frame(profiles))
    runtime, links = None, {}
    if config.calibrate:
        top = max(config.cloud_mbps)  # the fastest cloud link: the least of the measured excess is link time
        log(f"calibrating the runtime's fixed costs per stage and per token (cloud link {top:g} Mbps) ...")
        # As many decode steps as a measured generation (at least 8, at most 32): windows of a model whose tokens take
        # 300 ms on the emulated testbed cost minutes, not the paper's 96 tokens x 5 repeats x 4 deployments.
        tb_top = testbed_at(top)
        links[top] = link_models(config, tb_top, profiles, log)
        runtime = calibrate_runtime(checkpoint, tb_top, profiles, tokens=min(32, max(8, config.max_new_tokens)),
                                    repeats=config.calibrate_repeats, log=log, links=links[top][0],
                                    prompt=prompt_ids(checkpoint, 1, config.prompt_len))
        run.write_csv("runtime_overheads", runtime.records)
        run.record(runtime_overheads=runtime.to_dict())
        log(f"  stage_ms {', '.join(f'{t} {v:.3f}' for t, v in runtime.stage_ms.items())}; "
            f"step_ms {runtime.step_ms:.3f}")
    log(f"sweeping {len(config.methods)} methods over cloud bandwidths {list(config.cloud_mbps)} Mbps, "
        f"{config.repeats} repeats interleaved, every method at K = {micro_batches_label(config.micro_batches)} ...")
    tables = sweep(config, checkpoint, testbed_at, profiles, runtime, log, links)
    df = pd.DataFrame(tables["measurements"])
    run.write_csv("measurements", df)
    for name in ("stage_terms", "stage_records", "probes"):
        if tables[name]:
            run.write_csv(name, tables[name])
    pred = prediction_table(df)
    run.write_csv("prediction", pred)
    if tables["stage_terms"]:
        st = tables["stage_terms"]
        pick = [t for t in st if t["method"] == "EdgeShard-latency"] or st
        low = min(t["cloud_mbps"] for t in pick)
        run.write_csv("stage_breakdown", breakdown.stage_table(st, tables["stage_records"], pick[0]["method"], low))
    figs = {**figures(df), **breakdown.figures(pred, tables["stage_terms"], tables["stage_records"])}
    for name, fig in figs.items():
        run.save_figure(name, fig)
    table = summary_table(df)
    run.write_csv("summary", table)
    ok = df[(df.source == "measured") & (df.status == "ok")]
    run.finish(tokens_match=bool(ok["tokens_match"].all()) if len(ok) else None,
               measured_runs=int(len(ok)), bandwidths=list(config.cloud_mbps), methods=list(config.methods))
    return Outcome(run.path, {"measurements": df, "summary": table, "prediction": pred,
                              "stage_terms": tables["stage_terms"], "stage_records": tables["stage_records"]},
                   figs, table)
