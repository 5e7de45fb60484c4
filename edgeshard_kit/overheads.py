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
- embedding on the source, the rest on a device of type t: Tt - Lt = s_src + s_t + step

which gives s_src, step and every s_t. `problem.build_problem(..., runtime=...)` then puts
`stage_ms` on every device and `step_ms` on the problem; the DPs optimise with them.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from edgeshard_kit.units import KitError, Stage

CALIBRATION_PROMPT = "The edge devices share the model"


def _measure_plan(checkpoint, testbed, problem, stages: list[Stage], tokens: int, repeats: int,
                  launch_opts: dict | None) -> tuple[float, float, list[float]]:
    """(predicted ms/token without fixed costs, measured median ms/token, every repeat's median)."""
    from edgeshard_kit.pipeline import deploy
    from edgeshard_kit.plan import make_plan

    plan = make_plan(problem, stages, "latency", relay=True, method="calibration")
    with deploy(plan, testbed, checkpoint, problem=problem, launch_opts=launch_opts) as dep:
        dep.generate([CALIBRATION_PROMPT], 2)  # warm-up: first-call allocations, page faults
        runs = [dep.generate([CALIBRATION_PROMPT], tokens).summary["per_token_ms"] for _ in range(repeats)]
    return plan.latency_ms, statistics.median(runs), runs


def calibrate_runtime(checkpoint: str | Path, testbed: Any, profiles: dict, prompt_len: int = 8,
                      tokens: int = 16, repeats: int = 3, launch_opts: dict | None = None,
                      log=None) -> dict:
    """{"stage_ms": {device type: ms}, "step_ms": ms, "records": [...]}, measured on `testbed`.

    Every deployment has at most two stages and ignores memory budgets (it is a measurement, not a
    plan to keep). Negative estimates (noise on a fast machine) are clamped to 0; the raw values stay
    in the records.
    """
    from edgeshard_kit.problem import Workload, build_problem

    if tokens < 4 or repeats < 1:
        raise KitError(f"calibrate_runtime: tokens must be >= 4 and repeats >= 1 (got {tokens}, {repeats})")
    problem = build_problem(profiles, testbed, Workload(prompt_len=prompt_len, gen_tokens=tokens, return_bytes=8))
    n = problem.n_units
    src = testbed.source
    records = []

    def run(label: str, stages: list[Stage]) -> float:
        pred, meas, runs = _measure_plan(checkpoint, testbed, problem, stages, tokens, repeats, launch_opts)
        records.append({"deployment": label, "stages": " ".join(f"{s.device}[{s.start},{s.end})" for s in stages),
                        "predicted_without_overheads_ms": pred, "measured_ms": meas,
                        "measured_min_ms": min(runs), "measured_max_ms": max(runs), "excess_ms": meas - pred})
        if log:
            log(f"  calibration {label:<28} predicted {pred:7.3f} ms/token without fixed costs, measured {meas:7.3f}")
        return meas - pred

    one = run("one stage on the source", [Stage(src.name, 0, n)])
    two = run("two stages on the source", [Stage(src.name, 0, 1), Stage(src.name, 1, n)])
    s_src = two - one
    step = one - s_src
    stage_ms = {src.type: s_src}
    for dev in testbed.devices:
        if dev.type in stage_ms:
            continue
        excess = run(f"source + {dev.type} ({dev.name})", [Stage(src.name, 0, 1), Stage(dev.name, 1, n)])
        stage_ms[dev.type] = excess - s_src - step
    for r in records:
        r.update(stage_ms_source=s_src, step_ms=step)
    return {"stage_ms": {t: max(0.0, v) for t, v in stage_ms.items()}, "step_ms": max(0.0, step),
            "raw": {"stage_ms": stage_ms, "step_ms": step}, "records": records,
            "method": f"median per-token latency of {repeats} runs x {tokens} tokens per deployment, minus the "
                      f"paper's model of the same plan"}
