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
- embedding on the source, a quarter of the decoder layers
  on a device of type t, the rest on the source again:    Tt - Lt = 2 s_src + s_t + step

which gives s_src, step and every s_t, returned as `RuntimeCosts`. The same windows record every stage's
measured compute: its ratio to the profile's, per device type (`compute_scales`), scales the profiles first, so
that L is the compute as the deployed runtime measures it at that time, not as a profile measured alone earlier. `planning.build.build_problem(...,
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
from edgeshard_kit.planning.build import LinkModel, Workload, build_problem
from edgeshard_kit.planning.plan import Plan, make_plan
from edgeshard_kit.profiling.fit import nonneg_fit
from edgeshard_kit.profiling.profile import Profile
from edgeshard_kit.runtime.deployment import deploy
from edgeshard_kit.runtime.launch import LaunchOptions
from edgeshard_kit.testbed.inventory import Testbed

CALIBRATION_PROMPT = "The edge devices share the model"
OUTLIER_FACTOR = 3.0    # a device type's per-stage cost this many times its peers' median (or a third of it) ...
OUTLIER_FLOOR_MS = 1.0  # ... and this many ms away from it is measured again
MIN_SCALE_MS = 2.0      # stages profiled at less compute than this do not set their device type's compute scale


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
    spread: dict[str, list[float]] = field(default_factory=dict)  # device type -> [min, max] over the windows
    remeasured: dict[str, dict] = field(default_factory=dict)  # device type -> {first_ms, again_ms}
    compute_scale: dict[str, float] = field(default_factory=dict)  # device type -> measured / profiled compute
    compute_spread: dict[str, list[float]] = field(default_factory=dict)  # device type -> [min, max] over windows

    def to_dict(self, records: bool = False) -> dict:
        """{stage_ms, step_ms, raw: {stage_ms, step_ms}, method} (+ records): the manifest's runtime_overheads."""
        out = {"stage_ms": dict(self.stage_ms), "step_ms": self.step_ms,
               "raw": {"stage_ms": dict(self.raw_stage_ms), "step_ms": self.raw_step_ms}, "method": self.method,
               "spread": dict(self.spread), "remeasured": dict(self.remeasured),
               "compute_scale": dict(self.compute_scale), "compute_spread": dict(self.compute_spread)}
        return {**out, "records": list(self.records)} if records else out

    @classmethod
    def from_dict(cls, d: dict) -> "RuntimeCosts":
        """From `to_dict`'s form (or just {stage_ms, step_ms})."""
        try:
            raw = d.get("raw") or {}
            return cls({str(k): float(v) for k, v in d["stage_ms"].items()}, float(d["step_ms"]),
                       {str(k): float(v) for k, v in raw.get("stage_ms", d["stage_ms"]).items()},
                       float(raw.get("step_ms", d["step_ms"])), list(d.get("records", [])), str(d.get("method", "")),
                       spread={str(k): [float(x) for x in v] for k, v in (d.get("spread") or {}).items()},
                       remeasured={str(k): dict(v) for k, v in (d.get("remeasured") or {}).items()},
                       compute_scale={str(k): float(v) for k, v in (d.get("compute_scale") or {}).items()},
                       compute_spread={str(k): [float(x) for x in v] for k, v in (d.get("compute_spread") or {}).items()})
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise KitError(f"runtime costs: expected {{stage_ms: {{type: ms}}, step_ms: ms}}, got {d!r} ({e})") from None


def _measure_plans(checkpoint: str | Path, testbed: Testbed, plans: dict[str, Plan], tokens: int,
                   windows: int, launch_opts: LaunchOptions | dict | None,
                   prompt=None) -> tuple[dict[str, list[float]], dict[str, list[list[float]]]]:
    """(per-token latency (ms) of each window, per stage the median decode compute_ms of each window), by label.

    All plans are deployed at once; a window measures each in turn, the order rotating from one window to the
    next, so that a slow spell of the host falls on every plan alike (idle workers block on their sockets)."""
    runs: dict[str, list[float]] = {label: [] for label in plans}
    computes: dict[str, list[list[float]]] = {label: [] for label in plans}
    with ExitStack() as stack:
        # No problem passed: calibration layouts (the whole model on the source, say) ignore the memory budgets
        # on purpose, and deploy() refuses an over-budget plan when it is given the problem.
        deps = {label: stack.enter_context(deploy(plan, testbed, checkpoint, launch_opts=launch_opts))
                for label, plan in plans.items()}
        def generate(dep, n: int):
            if prompt is None:
                return dep.generate([CALIBRATION_PROMPT], n)
            return dep.generate(prompt[0], n, attention_mask=prompt[1])

        for dep in deps.values():
            generate(dep, 2)  # warm-up: first-call allocations, page faults
        order = list(deps)
        for w in range(windows):
            shift = w % len(order)
            for label in order[shift:] + order[:shift]:
                res = generate(deps[label], tokens)
                runs[label].append(res.summary["per_token_ms"])
                computes[label].append(_stage_compute(res, len(plans[label].stages)))
    return runs, computes


def _stage_compute(res, n_stages: int) -> list[float]:
    """Per stage: the median compute_ms of the decode steps (step > 0) of one generation."""
    out = []
    for i in range(n_stages):
        got = [r["compute_ms"] for r in res.per_stage if r.get("stage") == i and r.get("step", 0) > 0
               and r.get("compute_ms") is not None]
        out.append(statistics.median(got) if got else float("nan"))
    return out


def compute_scales(plans: dict[str, Plan], computes: dict[str, list[list[float]]], types: dict[str, str],
                   min_ms: float = MIN_SCALE_MS) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(scale, [min, max] over windows) by device type: measured / profiled decode compute of its stages.

    `types`: device name -> type. Per window, every stage on a device of the type whose profiled compute is at
    least `min_ms` counts (sum measured / sum profiled); the figure is the median over windows. A profile is
    measured once, alone on the device, and the deployment runs later, beside other workers: on a shared host
    the two differ (measured: SmolLM2's cloud stage profiled at 195 ms and run at 125 ms an hour later, the
    memory bandwidth of the same device 1.8 and 3.9 GB/s at two times), which no fixed cost explains.
    """
    per: dict[str, dict[int, list[tuple[float, float]]]] = {}  # type -> window -> (profiled, measured) per stage
    for label, plan in plans.items():
        for w, stages in enumerate(computes[label]):
            for st, pred, meas in zip(plan.stages, plan.stage_compute_ms, stages):
                if pred >= min_ms and meas == meas:
                    per.setdefault(types[st.device], {}).setdefault(w, []).append((pred, meas))
    scale, spread = {}, {}
    for t, windows in per.items():
        ratios = [sum(m for _, m in r) / sum(p for p, _ in r) for r in windows.values()]
        scale[t], spread[t] = statistics.median(ratios), [min(ratios), max(ratios)]
    return scale, spread


def _estimates(excess: dict[str, float], others: dict[str, str], src_type: str,
               constrained: bool = True) -> tuple[dict[str, float], float]:
    """(stage_ms by device type, step_ms) of the excess ms per deployment (see the module's equations).

    `constrained`: every term >= 0, solved together: (step, s_src) is the non-negative fit (profiling.fit.
    nonneg_fit) of the line excess = step + s_src x n through the one- and two-stage deployments (n = 1, 2), then
    s_t = max(0, excess_t - 2 s_src - step). Clamping each raw term alone is not a solution: a noise-negative
    s_src clamped to 0 left step = excess_one - s_src, all of the noise (measured: 32 ms "per token" from a
    -28.5 ms s_src on SmolLM2, whose tokens take 300 ms +- 10% on the emulated testbed). Unconstrained: the
    exact solution, which noise can make negative (kept as the raw figures).
    """
    one, two = excess["one stage on the source"], excess["two stages on the source"]
    if constrained:
        step, s_src = nonneg_fit([1.0, 2.0], [one, two])
    else:
        s_src = two - one
        step = one - s_src
    out = {src_type: s_src}
    for label, dtype in others.items():
        t = excess[label] - 2 * s_src - step
        out[dtype] = max(0.0, t) if constrained else t
    return out, step


def outliers(stage_ms: dict[str, float], factor: float = OUTLIER_FACTOR, floor_ms: float = OUTLIER_FLOOR_MS) -> list[str]:
    """Device types whose per-stage cost is far from its peers': more than `factor` x, and `floor_ms` ms, away from
    the median of all types (noise on a shared host, a slow spell during that type's window)."""
    if len(stage_ms) < 2:
        return []
    ref = statistics.median(stage_ms.values())  # all types: one far value moves the median of three least
    out = []
    for t, v in stage_ms.items():
        if abs(v - ref) > floor_ms and (v > factor * max(ref, 0.0) or v < max(ref, 0.0) / factor):
            out.append(t)
    return out


def calibrate_runtime(checkpoint: str | Path, testbed: Testbed, profiles: dict[str, Profile], prompt_len: int = 8,
                      tokens: int = 16, repeats: int = 6, launch_opts: LaunchOptions | dict | None = None,
                      log: Callable[[str], Any] | None = None, links: LinkModel | None = None,
                      prompt=None, scale_compute: bool = True) -> RuntimeCosts:
    """The runtime's fixed costs per stage (by device type) and per token, measured on `testbed`.

    `repeats` interleaved windows (each: every calibration deployment once, `tokens` tokens); every window gives an
    estimate, the median is kept and the spread (min, max over windows) is reported. A device type whose estimate
    is far from its peers' (`outliers`) is measured again in as many windows, and its record says so. Every
    deployment has at most three stages and ignores memory budgets (it is a measurement, not a plan to keep).
    Negative estimates (noise on a fast machine) are clamped to 0; the raw values stay in the records. `links`:
    the link model the planner will use (planning.build.LinkModel), so that link time is not taken for fixed cost.
    `prompt`: (ids (1, T), attention mask) to generate from instead of CALIBRATION_PROMPT (prompt_len is then T): the
    KV lengths of the runs to be predicted, so that the profile's decode time is read where it was measured (a
    profile's per-KV-token slope extrapolated to a short calibration prompt became 50 ms of "fixed cost").
    `scale_compute`: the same windows also give every device type's compute scale (`compute_scales`: the runtime's
    measured decode compute over the profile's, of stages with a quarter of the decoder layers on devices of other
    types), the fixed costs are what is left over the scaled compute, and `build_problem(..., runtime=costs)` scales
    the profiles by it.
    """
    if prompt is not None:
        prompt_len = int(prompt[0].shape[1])
    if tokens < 4 or repeats < 1:
        raise KitError(f"calibrate_runtime: tokens must be >= 4 and repeats >= 1 (got {tokens}, {repeats})")
    problem = build_problem(profiles, testbed, Workload(prompt_len=prompt_len, gen_tokens=tokens), returns="tokens",
                            links=links)
    n = problem.n_units
    src = testbed.source
    layouts = {"one stage on the source": [Stage(src.name, 0, n)],
               "two stages on the source": [Stage(src.name, 0, 1), Stage(src.name, 1, n)]}
    others = {}
    for dev in testbed.devices:
        if dev.type != src.type and dev.type not in others.values():
            # One decoder layer on the device, between two source stages: its fixed cost, not its compute model's error
            k = max(1, (n - 2) // 4) if scale_compute else 1  # enough layers to time the device's compute well
            label = f"source, {k} layer{'s' if k > 1 else ''} on {dev.type} ({dev.name}), source"
            layouts[label] = [Stage(src.name, 0, 1), Stage(dev.name, 1, 1 + k), Stage(src.name, 1 + k, n)]
            others[label] = dev.type
    plans = {k: make_plan(problem, st, "latency", relay=True, method="calibration") for k, st in layouts.items()}
    runs, computes = _measure_plans(checkpoint, testbed, plans, tokens, repeats, launch_opts, prompt)
    scale, scale_spread = {}, {}
    if scale_compute:
        types = {d.name: d.type for d in testbed.devices}
        scale, scale_spread = compute_scales(plans, computes, types)
        problem = build_problem(profiles, testbed, Workload(prompt_len=prompt_len, gen_tokens=tokens),
                                runtime={"stage_ms": {}, "step_ms": 0.0, "compute_scale": scale}, returns="tokens",
                                links=links)
        plans = {k: make_plan(problem, p.stages, "latency", relay=True, method="calibration") for k, p in plans.items()}
        if log:
            log("  compute measured / profiled (median [min..max] over windows): " + ", ".join(
                f"{t} {v:.3f} [{scale_spread[t][0]:.3f}..{scale_spread[t][1]:.3f}]" for t, v in scale.items()))
    windows = [_estimates({k: runs[k][w] - plans[k].latency_ms for k in plans}, others, src.type)
               for w in range(repeats)]  # per window: the spread
    # The figures: one constrained solve of the median excess per deployment (medians first: a slow window of one
    # deployment moves its median least), the unconstrained one kept as the raw figures.
    med = {k: statistics.median(runs[k]) - plans[k].latency_ms for k in plans}
    stage_ms, step = _estimates(med, others, src.type)
    raw_stage_ms, raw_step = _estimates(med, others, src.type, constrained=False)
    spread = {t: (min(w[0][t] for w in windows), max(w[0][t] for w in windows)) for t in stage_ms}
    remeasured = {}
    for dtype in outliers(stage_ms):
        label = next((k for k, t in others.items() if t == dtype), None)
        if label is None:  # the source type: it enters every equation, re-measuring it is re-running everything
            continue
        again = _measure_plans(checkpoint, testbed, {k: plans[k] for k in (*list(plans)[:2], label)}, tokens,
                               repeats, launch_opts, prompt)[0]
        est = [_estimates({k: again[k][w] - plans[k].latency_ms for k in again}, {label: dtype}, src.type)[0][dtype]
               for w in range(repeats)]
        value = _estimates({k: statistics.median(again[k]) - plans[k].latency_ms for k in again}, {label: dtype},
                           src.type)[0][dtype]
        remeasured[dtype] = {"first_ms": stage_ms[dtype], "again_ms": value}
        if log:
            log(f"  calibration: {dtype} {stage_ms[dtype]:.3f} ms per stage is far from its peers' "
                f"({', '.join(f'{t} {v:.3f}' for t, v in stage_ms.items() if t != dtype)}): re-measured "
                f"{value:.3f} ms [{min(est):.3f}..{max(est):.3f}]")
        stage_ms[dtype], spread[dtype] = value, (min(est), max(est))
        runs[label] = runs[label] + again[label]
    records = []
    for label, plan in plans.items():
        pred, meas = plan.latency_ms, statistics.median(runs[label])
        dtype = others.get(label, src.type)
        records.append({"deployment": label, "stages": format_stages(plan.stages),
                        "predicted_without_overheads_ms": pred, "measured_ms": meas,
                        "compute_scale": scale.get(dtype), "compute_scale_min": scale_spread.get(dtype, [None])[0],
                        "compute_scale_max": scale_spread.get(dtype, [None, None])[1],
                        "measured_min_ms": min(runs[label]), "measured_max_ms": max(runs[label]),
                        "excess_ms": meas - pred, "windows": repeats, "device_type": dtype,
                        "stage_ms": stage_ms[dtype], "stage_ms_min": spread[dtype][0], "stage_ms_max": spread[dtype][1],
                        "remeasured": dtype in remeasured and label in others,
                        "first_stage_ms": remeasured.get(dtype, {}).get("first_ms")})
        if log:
            log(f"  calibration {label:<44} predicted {pred:7.3f} ms/token without fixed costs, measured {meas:7.3f} "
                f"[{min(runs[label]):.3f}..{max(runs[label]):.3f}]")
    for r in records:
        r.update(stage_ms_source=stage_ms[src.type], step_ms=step,
                 step_ms_min=min(w[1] for w in windows), step_ms_max=max(w[1] for w in windows))
    if log:
        log("  fixed costs per stage (median [min..max] over windows): " + ", ".join(
            f"{t} {v:.3f} [{spread[t][0]:.3f}..{spread[t][1]:.3f}]{' re-measured' if t in remeasured else ''}"
            for t, v in stage_ms.items()) + f"; per token {step:.3f} ms")
    return RuntimeCosts(stage_ms={t: max(0.0, v) for t, v in stage_ms.items()}, step_ms=max(0.0, step),
                        raw_stage_ms=raw_stage_ms, raw_step_ms=raw_step, records=records,
                        method=f"every deployment up at once, {repeats} interleaved windows of {tokens} tokens each; "
                               f"per deployment the median per-token latency minus the model of the same plan "
                               f"without fixed costs, solved for non-negative terms together (spread: the same "
                               f"solve per window, min and max in the records); outlier device types "
                               f"re-measured: {sorted(remeasured) or 'none'}"
                               + ("; compute scaled per device type by the measured / profiled decode compute of "
                                  "the same windows" if scale_compute else ""),
                        spread={t: list(v) for t, v in spread.items()}, remeasured=remeasured,
                        compute_scale=scale, compute_spread=scale_spread)
