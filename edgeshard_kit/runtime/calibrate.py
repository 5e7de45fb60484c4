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

which gives s_src, step and every s_t, returned as `RuntimeCosts`. `planning.build.build_problem(...,
runtime=costs)` then puts `costs.stage_ms` on every device and `costs.step_ms` on the problem; the DPs
optimise with them.
"""

from __future__ import annotations

import statistics
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.units import Stage, format_stages
from edgeshard_kit.planning.build import Workload, build_problem
from edgeshard_kit.planning.plan import Plan, make_plan
from edgeshard_kit.profiling.profile import Profile
from edgeshard_kit.runtime.deployment import deploy
from edgeshard_kit.runtime.launch import LaunchOptions
from edgeshard_kit.testbed.inventory import Testbed

CALIBRATION_PROMPT = "The edge devices share the model"


@dataclass(frozen=True)
class RuntimeCosts:
    """The runtime's fixed costs in ms: per stage and step by device type, per token outside the stages; how measured.

    What `build_problem(..., runtime=costs)` reads is `stage_ms` and `step_ms` (clamped to >= 0); the raw
    estimates, one record per calibration deployment and the method stay for the run's manifest and CSVs.
    """

    stage_ms: dict[str, float]                      # device type -> ms every stage on such a device adds per step
    step_ms: float                                  # ms per token outside the stages (the coordinator's turn)
    raw_stage_ms: dict[str, float] = field(default_factory=dict)  # before clamping (noise can make them negative)
    raw_step_ms: float = 0.0
    records: list[dict] = field(default_factory=list)  # one per calibration deployment: predicted vs measured ms
    method: str = ""

    def to_dict(self, records: bool = False) -> dict:
        """{stage_ms, step_ms, raw: {stage_ms, step_ms}, method} (+ records): the manifest's runtime_overheads."""
        out = {"stage_ms": dict(self.stage_ms), "step_ms": self.step_ms,
               "raw": {"stage_ms": dict(self.raw_stage_ms), "step_ms": self.raw_step_ms}, "method": self.method}
        return {**out, "records": list(self.records)} if records else out

    @classmethod
    def from_dict(cls, d: dict) -> "RuntimeCosts":
        """From `to_dict`'s form (or just {stage_ms, step_ms})."""
        try:
            raw = d.get("raw") or {}
            return cls({str(k): float(v) for k, v in d["stage_ms"].items()}, float(d["step_ms"]),
                       {str(k): float(v) for k, v in raw.get("stage_ms", d["stage_ms"]).items()},
                       float(raw.get("step_ms", d["step_ms"])), list(d.get("records", [])), str(d.get("method", "")))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise KitError(f"runtime costs: expected {{stage_ms: {{type: ms}}, step_ms: ms}}, got {d!r} ({e})") from None


def _measure_plans(checkpoint: str | Path, testbed: Testbed, plans: dict[str, Plan], tokens: int,
                   repeats: int, launch_opts: LaunchOptions | dict | None) -> dict[str, list[float]]:
    """Per label: every repeat's per-token latency (ms). All plans are deployed at once and measured in turn,
    alternating the order, so that a slow spell of the host falls on every plan alike (idle workers block on
    their sockets and cost nothing)."""
    runs: dict[str, list[float]] = {label: [] for label in plans}
    with ExitStack() as stack:
        # No problem passed: calibration layouts (the whole model on the source, say) ignore the memory budgets
        # on purpose, and deploy() refuses an over-budget plan when it is given the problem.
        deps = {label: stack.enter_context(deploy(plan, testbed, checkpoint, launch_opts=launch_opts))
                for label, plan in plans.items()}
        for dep in deps.values():
            dep.generate([CALIBRATION_PROMPT], 2)  # warm-up: first-call allocations, page faults
        order = list(deps)
        for r in range(repeats):
            for label in (order if r % 2 == 0 else order[::-1]):
                runs[label].append(deps[label].generate([CALIBRATION_PROMPT], tokens).summary["per_token_ms"])
    return runs


def calibrate_runtime(checkpoint: str | Path, testbed: Testbed, profiles: dict[str, Profile], prompt_len: int = 8,
                      tokens: int = 16, repeats: int = 5, launch_opts: LaunchOptions | dict | None = None,
                      log: Callable[[str], Any] | None = None) -> RuntimeCosts:
    """The runtime's fixed costs per stage (by device type) and per token, measured on `testbed`.

    Every deployment has at most three stages and ignores memory budgets (it is a measurement, not a
    plan to keep). Negative estimates (noise on a fast machine) are clamped to 0; the raw values stay
    in the records.
    """
    if tokens < 4 or repeats < 1:
        raise KitError(f"calibrate_runtime: tokens must be >= 4 and repeats >= 1 (got {tokens}, {repeats})")
    problem = build_problem(profiles, testbed, Workload(prompt_len=prompt_len, gen_tokens=tokens), returns="tokens")
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
    runs = _measure_plans(checkpoint, testbed, plans, tokens, repeats, launch_opts)
    records, excess = [], {}
    for label, plan in plans.items():
        pred, meas = plan.latency_ms, statistics.median(runs[label])
        excess[label] = meas - pred
        records.append({"deployment": label, "stages": format_stages(plan.stages),
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
    return RuntimeCosts(stage_ms={t: max(0.0, v) for t, v in stage_ms.items()}, step_ms=max(0.0, step),
                        raw_stage_ms=stage_ms, raw_step_ms=step, records=records,
                        method=f"every deployment up at once, measured in turn: median per-token latency of {repeats} "
                               f"runs x {tokens} tokens, minus the paper's model of the same plan")
