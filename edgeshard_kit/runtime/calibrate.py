"""The runtime's fixed costs, measured on the testbed: per stage (per device type) and per token.

Per-unit profiles time the layers; a deployed pipeline also pays, on every step, a fixed cost per
stage (the worker's framework work around its layers, receiving and decoding the incoming frame,
encoding and sending the outgoing one) and a fixed cost per token outside the stages (the
coordinator feeding the first stage and taking the token back). On small models these costs are
of the order of the layers themselves, so the planner's prediction misses them unless it models
them. `calibrate_runtime` measures them with three kinds of small deployments, each against the
paper's model of the same plan (layers + transfers, no fixed costs):

- the whole model as one stage on the source:            T1 - L1 = s_src + step
- embedding on the source, the rest on a second worker
  on the source (the relay form, no link crossed):        T2 - L2 = 2 s_src + step
- embedding on the source, one decoder layer on a device
  of type t, the rest on the source again:                Tt - Lt = 2 s_src + s_t + step

which gives s_src, step and every s_t. `problem.build_problem(..., runtime=...)` then puts
`stage_ms` on every device and `step_ms` on the problem; the DPs optimise with them.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from edgeshard_kit.core.units import KitError, Stage

CALIBRATION_PROMPT = "The edge devices share the model"


def _measure_plans(checkpoint, testbed, problem, plans: dict, tokens: int, repeats: int,
                   launch_opts: dict | None) -> dict[str, list[float]]:
    """Per label: every repeat's per-token latency (ms). All plans are deployed at once and measured in turn,
    alternating the order, so that a slow spell of the host falls on every plan alike (idle workers block on
    their sockets and cost nothing)."""
    from contextlib import ExitStack

    from edgeshard_kit.runtime.deployment import deploy

    runs: dict[str, list[float]] = {label: [] for label in plans}
    with ExitStack() as stack:
        deps = {label: stack.enter_context(deploy(plan, testbed, checkpoint, problem=problem,
                                                  launch_opts=launch_opts)) for label, plan in plans.items()}
        for dep in deps.values():
            dep.generate([CALIBRATION_PROMPT], 2)  # warm-up: first-call allocations, page faults
        order = list(deps)
        for r in range(repeats):
            for label in (order if r % 2 == 0 else order[::-1]):
                runs[label].append(deps[label].generate([CALIBRATION_PROMPT], tokens).summary["per_token_ms"])
    return runs


def calibrate_runtime(checkpoint: str | Path, testbed: Any, profiles: dict, prompt_len: int = 8,
                      tokens: int = 16, repeats: int = 5, launch_opts: dict | None = None,
                      log=None) -> dict:
    """{"stage_ms": {device type: ms}, "step_ms": ms, "records": [...]}, measured on `testbed`.

    Every deployment has at most three stages and ignores memory budgets (it is a measurement, not a
    plan to keep). Negative estimates (noise on a fast machine) are clamped to 0; the raw values stay
    in the records.
    """
    from edgeshard_kit.planning.problem import make_plan
    from edgeshard_kit.experiments.steps import build_problem

    if tokens < 4 or repeats < 1:
        raise KitError(f"calibrate_runtime: tokens must be >= 4 and repeats >= 1 (got {tokens}, {repeats})")
    problem = build_problem(profiles, testbed, prompt_len=prompt_len, gen_tokens=tokens)
    n = problem.n_units
    src = testbed.source
    layouts = {"one stage on the source": [Stage(src.name, 0, n)],
               "two stages on the source": [Stage(src.name, 0, 1), Stage(src.name, 1, n)]}
    others = {}
    for dev in testbed.devices:
        if dev.type != src.type and dev.type not in others.values():
            # One decoder layer on the device, between two source stages: its fixed cost, not its compute model's error
            label = f"source, 1 layer on {dev.type} ({dev.name}), source"
            layouts[label] = [Stage(src.name, 0, 1), Stage(dev.name, 1, 2), Stage(src.name, 2, n)]
            others[label] = dev.type
    plans = {k: make_plan(problem, st, "latency", relay=True, method="calibration") for k, st in layouts.items()}
    runs = _measure_plans(checkpoint, testbed, problem, plans, tokens, repeats, launch_opts)
    records, excess = [], {}
    for label, plan in plans.items():
        pred, meas = plan.latency_ms, statistics.median(runs[label])
        excess[label] = meas - pred
        records.append({"deployment": label, "stages": " ".join(f"{s.device}[{s.start},{s.end})" for s in plan.stages),
                        "predicted_without_overheads_ms": pred, "measured_ms": meas,
                        "measured_min_ms": min(runs[label]), "measured_max_ms": max(runs[label]),
                        "excess_ms": meas - pred})
        if log:
            log(f"  calibration {label:<44} predicted {pred:7.3f} ms/token without fixed costs, measured {meas:7.3f}")
    one, two = excess["one stage on the source"], excess["two stages on the source"]
    s_src = two - one
    step = one - s_src
    stage_ms = {src.type: s_src}
    for label, dtype in others.items():
        stage_ms[dtype] = excess[label] - 2 * s_src - step
    for r in records:
        r.update(stage_ms_source=s_src, step_ms=step)
    return {"stage_ms": {t: max(0.0, v) for t, v in stage_ms.items()}, "step_ms": max(0.0, step),
            "raw": {"stage_ms": stage_ms, "step_ms": step}, "records": records,
            "method": f"every deployment up at once, measured in turn: median per-token latency of {repeats} runs x "
                      f"{tokens} tokens, minus the paper's model of the same plan"}


# ---- `edgeshard bench testbed-prediction` -------------------------------------------------------------------
def testbed_prediction(out: str | Path = "results/testbed_prediction.csv", testbed: str = "auto", layers: int = 8,
                       hidden: int = 768, cloud_mbps: str = "5,50", methods: str = "", max_new_tokens: int = 8,
                       micro_batches: int = 3, repeats: int = 2, root: str | Path = "results", log=print):
    """Measured vs predicted on a testbed, for the kit's calibrated model and the paper's model; (table, run path).

    The checkpoint (seeded, `layers` x `hidden`) is kept in `root`/bench-model-<layers>x<hidden>/tiny-model.
    """
    from edgeshard_kit.experiments import benchmark as ex
    from edgeshard_kit.experiments import steps
    from edgeshard_kit.experiments.results import new_run

    params = {"testbed": testbed, "layers": layers, "hidden": hidden, "cloud_mbps": cloud_mbps,
              "max_new_tokens": max_new_tokens, "micro_batches": micro_batches, "repeats": repeats}
    checkpoint = steps.checkpoint_for("", Path(root) / f"bench-model-{layers}x{hidden}", layers=layers, hidden=hidden)
    bandwidths = ex.parse_list(cloud_mbps)
    tb, why = ex.default_testbed(checkpoint, bandwidths[0], testbed)
    log(f"testbed: {tb.name} ({'emulated: netns + tc + cgroups' if tb.emulation == 'netns' else why}); "
        f"model {checkpoint} ({ex.model_bytes(checkpoint) / 1e6:.0f} MB)")
    run = new_run("testbed-prediction", params, root=root)
    outcome = ex.run_benchmark(run, model_path=str(checkpoint), testbed_file="" if tb.emulation != "netns" else tb,
                               cloud_mbps=cloud_mbps, methods=methods or ",".join(ex.ALL_METHODS),
                               max_new_tokens=max_new_tokens, micro_batches=micro_batches, repeats=repeats,
                               profile_repeats=5, calibrate=True, log=log)
    table = ex.prediction_table(outcome.tables["measurements"])
    table.insert(0, "testbed", tb.name)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    run.write_csv("prediction", table)
    return table, outcome.path, path


def prediction_errors(table) -> dict:
    """Median |measured / predicted - 1| per metric, for the kit's model and the paper's model."""
    out = {}
    for metric in ("latency_ms", "throughput_tps"):
        t = table[table.metric == metric]
        for col, label in (("measured_over_predicted", "kit"), ("measured_over_predicted_paper", "paper")):
            if col in t and t[col].notna().any():
                out[f"{metric} {label}"] = float((t[col] - 1).abs().median())
    return out


def _cmd_testbed_prediction(args) -> int:
    import pandas as pd
    table, run_path, path = testbed_prediction(args.out, args.testbed, args.layers, args.hidden, args.cloud_mbps,
                                               args.methods, args.max_new_tokens, args.micro_batches, args.repeats,
                                               args.root)
    cols = ["cloud_mbps", "method", "metric", "measured", "predicted", "predicted-paper", "measured_over_predicted",
            "measured_over_predicted_paper"]
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.3f}".format):
        print(table[[c for c in cols if c in table]].to_string(index=False))
    for k, v in prediction_errors(table).items():
        print(f"median |measured/predicted - 1|, {k:>20}'s model: {100 * v:5.1f}%")
    print(f"-> {path}  (run folder {run_path})")
    return 0


def add_bench_commands(bench_sub) -> None:
    """Register `edgeshard bench testbed-prediction`."""
    p = bench_sub.add_parser("testbed-prediction",
                             help="measured latency/throughput on a testbed vs the planner's prediction "
                                  "(calibrated fixed costs) and the paper's model")
    p.add_argument("--testbed", default="auto", choices=["auto", "emulated", "local"],
                   help="auto (default): testbed/emulated.yaml when root with sshd and cgroup v1, else the local one")
    p.add_argument("--layers", type=int, default=8, help="decoder layers of the seeded checkpoint (default 8)")
    p.add_argument("--hidden", type=int, default=768, help="hidden size of the seeded checkpoint (default 768)")
    p.add_argument("--cloud-mbps", default="5,50", help="cloud link bandwidths swept (default 5,50)")
    p.add_argument("--methods", default="", help="comma-separated methods (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="tokens per generation (default 8)")
    p.add_argument("--micro-batches", type=int, default=3, help="micro-batches for pipelined runs (default 3)")
    p.add_argument("--repeats", type=int, default=2, help="measured generations per plan (default 2)")
    p.add_argument("--root", default="results", help="where the run folder and the checkpoint go (default results)")
    p.add_argument("--out", default="results/testbed_prediction.csv", help="CSV written")
    p.set_defaults(func=_cmd_testbed_prediction)
