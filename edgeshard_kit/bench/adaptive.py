"""`edgeshard bench adaptive`: adaptive serving on the emulated testbed with the real model, as rows.

Two scenarios on a private copy of testbed/emulated.yaml (its own name and subnet, so it does not disturb a
testbed-prediction run on `emulated` nor notebook 06 on `adaptive`), each repeated with its reference measured in turn (alternating):

* **throttle**: the latency-optimal plan at `high_mbps` is deployed with `AdaptivePolicy` (drift detection on);
  after `switch_at` tokens of a `tokens`-token generation a background thread re-shapes every cloud link to
  `throttle_mbps` with tc (netns.reshape), as a real network would change under a running job. The detector sees
  the link, the planner re-solves, the shards move. The reference is a fresh deployment of the plan it moved to,
  generating the same tokens on the throttled links: the median per-token latency over the same token positions
  after the switch is compared (target: within 15%).
* **kill**: the same plan at `high_mbps`; after `kill_at` tokens one worker (the last stage's, the cloud) is
  SIGKILLed; the generation must complete on the remaining devices; the pause is reported.

Every generation's tokens are compared with one-device generation (transformers via model.generate).
`throttle_mbps="auto"` picks the highest of THROTTLE_CANDIDATES at which the planner (same profiles, the tbf link
model) moves away from the plan at `high_mbps`; the candidates' decisions are returned as rows too.
"""

from __future__ import annotations

import os
import signal
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.units import Stage, format_stages
from edgeshard_kit.experiments import steps
from edgeshard_kit.experiments.adaptive import event_rows, latency_timeline
from edgeshard_kit.experiments.measurements import prompt_ids
from edgeshard_kit.experiments.results import new_run
from edgeshard_kit.experiments.adaptive_demo import adaptive_testbed, problem_at
from edgeshard_kit.experiments.testbeds import with_cloud_mbps
from edgeshard_kit.planning.build import Workload, load_profiles
from edgeshard_kit.planning.objectives import solve_objective
from edgeshard_kit.planning.plan import make_plan
from edgeshard_kit.planning.replan import decide
from edgeshard_kit.runtime.adaptive import AdaptivePolicy
from edgeshard_kit.runtime.deployment import deploy
from edgeshard_kit.runtime.drift import DriftSettings
from edgeshard_kit.testbed import netns
from edgeshard_kit.testbed.inventory import Testbed

THROTTLE_CANDIDATES = (2.0, 1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01)  # Mbps, tried in this order by "auto"
# The source holds 60% of the model: the edge devices hold it between them, so the cloud is a choice the planner
# can undo when its link slows down (at 45%, as in testbed-prediction, every plan needs the cloud's memory).
SOURCE_SHARE = 0.6
TESTBED_NAME, TESTBED_SUBNET = "adaptive-bench", "10.79.0"  # its own namespaces: notebook 06 and the tests use
# "adaptive" (10.78.0.0/24), testbed-prediction "emulated" (10.77.0.0/24); one may run beside the other
TARGET_RATIO = 0.15  # |adaptive after the switch / fresh deployment of the new plan - 1|
SETTLE_TOKENS = 8  # tokens after the first token of the new plan left out of the comparison (caches, allocator)
Log = Callable[[str], Any]


def _quiet(msg: str) -> None:
    """No progress log (the command passes `print`)."""


def _problem(profiles: dict, testbed: Testbed, mbps: float, workload: Workload):
    """The planning problem at cloud links of `mbps`, links priced by the emulated testbed's tbf (idle links)."""
    return problem_at(profiles, testbed, mbps, workload)


def choose_throttle(profiles: dict, testbed: Testbed, high_mbps: float, throttle: Any, workload: Workload,
                    tolerance: float) -> tuple[float | None, list[dict]]:
    """(throttle Mbps, one row per candidate: the planner's decision for the plan at `high_mbps`); None when
    `throttle` is "auto" and no candidate moves the plan (the profiles leave the cloud link off the critical path)."""
    start = solve_objective(_problem(profiles, testbed, high_mbps, workload), "latency")
    cands = THROTTLE_CANDIDATES if throttle == "auto" else (float(throttle),)
    rows = []
    for mbps in cands:
        dec = decide(_problem(profiles, testbed, mbps, workload), start.stages, "latency", tolerance=tolerance)
        rows.append({"scenario": "planner", "throttle_mbps": mbps, "old_plan": format_stages(start.stages),
                     "new_plan": format_stages(dec.plan.stages), "moved": dec.move,
                     "predicted_old_ms": dec.current_ms, "predicted_new_ms": dec.new_ms,
                     "predicted_gain": dec.gain, "reason": dec.reason})
        if dec.move:
            return mbps, rows
    if throttle == "auto":  # nothing to demonstrate: the caller skips the throttle scenario
        return None, rows
    return float(throttle), rows


def _steady(per_token: list[dict], first: int, last: int) -> list[float]:
    """Per-token latencies (ms) of decode steps first..last-1 that are no recomputation prefill."""
    return [r["latency_ms"] for r in per_token if first <= r["step"] < last and not r.get("recompute")]


def _throttle_run(ctx: dict, rep: int, log: Log) -> tuple[dict, Any]:
    """Deploy the plan at high_mbps adaptively, throttle the cloud links after switch_at tokens; (row, result)."""
    tb, high, low, at = ctx["testbed"], ctx["high_mbps"], ctx["throttle_mbps"], ctx["switch_at"]
    netns.reshape(with_cloud_mbps(tb, high))
    shaped: dict = {}

    def throttle() -> None:
        netns.reshape(with_cloud_mbps(tb, low))
        shaped["done_ms"] = time.perf_counter()

    def observer(rec: dict) -> None:
        if rec["step"] == at - 1 and "thread" not in shaped:  # the at-th token is out: the network changes
            shaped["token"], shaped["start"] = at, time.perf_counter()
            shaped["thread"] = threading.Thread(target=throttle, daemon=True)
            shaped["thread"].start()

    policy = AdaptivePolicy(objective="latency", tolerance=ctx["tolerance"], drift=ctx["drift"], observer=observer)
    with deploy(ctx["plan"], tb, ctx["checkpoint"], problem=ctx["problem"], adaptive=policy) as dep:
        t0 = time.perf_counter()
        res = dep.generate(ctx["ids"], ctx["tokens"], attention_mask=ctx["mask"])
        if "thread" in shaped:
            shaped["thread"].join()
        final = format_stages(dep.stages)
    moved = [e for e in res.events if e.get("moved")]
    switch = moved[0]["token"] if moved else None
    after = _steady(res.per_token, (at if switch is None else switch) + SETTLE_TOKENS, ctx["tokens"])
    before = _steady(res.per_token, 1, at)
    row = {"scenario": "throttle", "repeat": rep, "run": "adaptive", "throttle_mbps": low, "high_mbps": high,
           "throttle_at_token": at, "tc_applied_ms": (shaped.get("done_ms", t0) - shaped.get("start", t0)) * 1e3,
           "events": len(res.events), "switches": len(moved), "switch_token": switch,
           "detect_tokens": None if switch is None else switch - at,
           "old_plan": format_stages(ctx["plan"].stages), "new_plan": final, "planner_plan": ctx["expected"],
           "pause_ms": moved[0]["pause_ms"] if moved else None,
           "tokens_recomputed": moved[0]["tokens_recomputed"] if moved else None,
           "before_ms": statistics.median(before) if before else None,
           "after_ms": statistics.median(after) if after else None,
           "after_ms_min": min(after) if after else None, "after_ms_max": max(after) if after else None,
           "tokens_match": res.tokens == ctx["reference"]}
    log(f"  repeat {rep} adaptive: {len(res.events)} event(s), {row['old_plan']} -> {final} at token {switch} "
        f"({row['detect_tokens']} tokens after the throttle), pause {row['pause_ms'] or 0:.0f} ms; per-token "
        f"{row['before_ms'] or 0:.1f} ms before, {row['after_ms'] or 0:.1f} ms after; tokens match: "
        f"{row['tokens_match']}")
    return row, res


def _fresh_run(ctx: dict, rep: int, stages: Any, first: int, log: Log) -> dict:
    """A fresh deployment of `stages` on the throttled links: the same generation, per-token from token `first`."""
    tb = ctx["testbed"]
    netns.reshape(with_cloud_mbps(tb, ctx["throttle_mbps"]))
    low = ctx["low_problem"]
    plan = make_plan(low, stages, "latency")
    with deploy(plan, tb, ctx["checkpoint"], problem=low) as dep:
        res = dep.generate(ctx["ids"], ctx["tokens"], attention_mask=ctx["mask"])
    after = _steady(res.per_token, first, ctx["tokens"])
    row = {"scenario": "throttle", "repeat": rep, "run": "fresh", "throttle_mbps": ctx["throttle_mbps"],
           "high_mbps": ctx["high_mbps"], "new_plan": format_stages(stages), "switch_token": first - SETTLE_TOKENS,
           "after_ms": statistics.median(after), "after_ms_min": min(after), "after_ms_max": max(after),
           "predicted_ms": plan.latency_ms, "tokens_match": res.tokens == ctx["reference"]}
    log(f"  repeat {rep} fresh {row['new_plan']}: {row['after_ms']:.1f} ms per token over tokens {first}.."
        f"{ctx['tokens'] - 1} (predicted {plan.latency_ms:.1f} ms); tokens match: {row['tokens_match']}")
    return row


def _kill_run(ctx: dict, rep: int, log: Log) -> tuple[dict, Any]:
    """The plan at high_mbps; the last stage's worker is SIGKILLed after kill_at tokens; (row, result)."""
    tb, at = ctx["testbed"], ctx["kill_at"]
    netns.reshape(with_cloud_mbps(tb, ctx["high_mbps"]))
    state: dict = {}

    def observer(rec: dict) -> None:
        if rec["step"] == at - 1 and "pid" not in state:
            handle = state["dep"].handles[-1]
            state["pid"], state["device"] = handle.pid, state["dep"].stages[-1].device
            os.kill(state["pid"], signal.SIGKILL)

    policy = AdaptivePolicy(objective="latency", detect=False, observer=observer)
    with deploy(ctx["plan"], tb, ctx["checkpoint"], problem=ctx["problem"], adaptive=policy) as dep:
        state["dep"] = dep
        res = dep.generate(ctx["ids"], ctx["tokens"], attention_mask=ctx["mask"])
        final = format_stages(dep.stages)
    faults = [e for e in res.events if e.get("cause") == "fault"]
    e = faults[0] if faults else {}
    row = {"scenario": "kill", "repeat": rep, "run": "adaptive", "high_mbps": ctx["high_mbps"],
           "killed_device": state.get("device"), "killed_at_token": at, "events": len(res.events),
           "switches": len(faults), "switch_token": e.get("token"), "old_plan": format_stages(ctx["plan"].stages),
           "new_plan": final, "pause_ms": e.get("pause_ms"), "tokens_recomputed": e.get("tokens_recomputed"),
           "load_s": e.get("load_s"), "completed_tokens": len(res.tokens[0]),
           "tokens_match": res.tokens == ctx["reference"]}
    log(f"  repeat {rep} kill {row['killed_device']} after {at} tokens: resumed on {final} at token "
        f"{row['switch_token']}, pause {row['pause_ms'] or 0:.0f} ms, {row['completed_tokens']} tokens, "
        f"tokens match: {row['tokens_match']}")
    return row, res


def throttle_values(text: Any) -> list[Any]:
    """"2,auto" (or a number, or a list) -> [2.0, "auto"]: the cloud bandwidths (Mbps) of the throttle scenarios."""
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    out: list[Any] = []
    for item in items:
        item = str(item).strip().lower()
        if item == "auto":
            out.append("auto")
            continue
        try:
            mbps = float(item)
        except ValueError:
            mbps = float("nan")
        if not mbps > 0:
            raise KitError(f"--throttle-mbps: {item!r} is not a bandwidth > 0 (Mbps) or auto")
        out.append(mbps)
    if not out:
        raise KitError("--throttle-mbps: give one or more bandwidths (Mbps) or auto")
    return list(dict.fromkeys(out))  # each scenario once


def bench_adaptive(model: str = "", high_mbps: float = 200.0, throttle_mbps: Any = "2,auto", tokens: int = 200,
                   switch_at: int = 60, kill_at: int = 60, prompt_len: int = 16, repeats: int = 2,
                   tolerance: float = 0.1, profiles: list[str] | None = None, root: str | Path = "results",
                   log: Log = _quiet) -> tuple[list[dict], Path]:
    """(rows, run folder): the throttle scenario at every bandwidth of `throttle_mbps` ("2,auto": 2 Mbps, then the
    highest candidate that moves the plan) and the kill scenario on the emulated testbed (root), `repeats` times
    each, adaptive and fresh runs alternating. A throttle at which the planner keeps the plan (within `tolerance`
    of the new optimum) is compared with a fresh deployment of that same plan. KitError when this host cannot
    emulate (netns.unavailable)."""
    why = netns.unavailable()
    if why:
        raise KitError(f"bench adaptive: {why}")
    if not 0 < switch_at < tokens - 2 * SETTLE_TOKENS or not 0 < kill_at < tokens:
        raise KitError(f"switch_at={switch_at} / kill_at={kill_at}: must lie inside the {tokens}-token generation "
                       f"(switch_at with {2 * SETTLE_TOKENS} tokens to spare)")
    throttles = throttle_values(throttle_mbps)
    params = {"model": model, "high_mbps": high_mbps, "throttle_mbps": throttles, "tokens": tokens,
              "switch_at": switch_at, "kill_at": kill_at, "prompt_len": prompt_len, "repeats": repeats,
              "tolerance": tolerance}
    rows: list[dict] = []
    with new_run("bench-adaptive", params, root=root) as run:
        checkpoint = steps.checkpoint_for(model, run.path)
        tb = adaptive_testbed(checkpoint, name=TESTBED_NAME, subnet=TESTBED_SUBNET, source_share=SOURCE_SHARE)
        run.record(testbed=tb, checkpoint=str(checkpoint))
        with netns.session(with_cloud_mbps(tb, high_mbps)):
            workload = Workload(prompt_len=prompt_len, gen_tokens=tokens)
            if profiles:
                profs = load_profiles(profiles)
            else:
                log(f"profiling {checkpoint} on every device type of {tb.name} (over SSH, under its cgroup) ...")
                profs = steps.profile_testbed(checkpoint, tb, repeats=3, prompt_len=prompt_len,
                                              kv_lens=f"{prompt_len},{prompt_len + tokens}", run=run)
            problem = _problem(profs, tb, high_mbps, workload)
            plan = solve_objective(problem, "latency")
            ids, mask = prompt_ids(checkpoint, 1, prompt_len)
            log(f"reference: {tokens} tokens on one device (transformers) ...")
            reference = steps.reference_tokens(checkpoint, ids, tokens, mask)
            ctx = {"testbed": tb, "checkpoint": checkpoint, "plan": plan, "problem": problem, "tokens": tokens,
                   "high_mbps": high_mbps, "switch_at": switch_at, "kill_at": kill_at, "tolerance": tolerance,
                   "ids": ids, "mask": mask, "reference": reference, "drift": DriftSettings()}
            log(f"plan at {high_mbps:g} Mbps: {format_stages(plan.stages)} ({plan.latency_ms:.1f} ms predicted); "
                f"{tokens} tokens per generation; {repeats} repeats per scenario")
            events, timelines, done = [], {}, set()
            for throttle in throttles:
                low, cand = choose_throttle(profs, tb, high_mbps, throttle, workload, tolerance)
                rows += cand
                for c in cand:
                    log(f"  planner at {c['throttle_mbps']:g} Mbps: {c['reason']}")
                if low is None:
                    log(f"no throttle of {', '.join(f'{c:g}' for c in THROTTLE_CANDIDATES)} Mbps moves the plan "
                        f"{format_stages(plan.stages)}: the auto throttle scenario is skipped (the planner rows say why)")
                    continue
                if low in done:
                    continue
                done.add(low)
                here = {**ctx, "throttle_mbps": low, "low_problem": _problem(profs, tb, low, workload),
                        "expected": cand[-1]["new_plan"]}
                log(f"throttle: cloud links {high_mbps:g} -> {low:g} Mbps after {switch_at} tokens; the planner "
                    f"{'moves to ' + cand[-1]['new_plan'] if cand[-1]['moved'] else 'keeps the plan'}")
                for rep in range(repeats):
                    row, res = _throttle_run(here, rep, log)
                    rows.append(row)
                    events += [{"scenario": "throttle", "throttle_mbps": low, "repeat": rep, **e}
                               for e in event_rows(res.events)]
                    timelines.setdefault(f"throttle_{low:g}Mbps", (res, row))
                    first = (row["switch_token"] if row["switch_token"] is not None else switch_at) + SETTLE_TOKENS
                    fresh = _fresh_run(here, rep, _parse(here["expected"]), first, log)
                    rows.append(fresh)
                    if row["after_ms"] is not None:
                        row["fresh_after_ms"] = fresh["after_ms"]
                        row["ratio"] = row["after_ms"] / fresh["after_ms"]
            for rep in range(repeats):
                row, res = _kill_run(ctx, rep, log)
                rows.append(row)
                timelines.setdefault("kill", (res, row))
                events += [{"scenario": "kill", "repeat": rep, **e} for e in event_rows(res.events)]
        run.write_csv("adaptive", rows)
        run.write_csv("adaptive_events", events)
        for name, (res, row) in timelines.items():
            marks = list(res.events)
            if row["scenario"] == "throttle":
                marks.append({"token": row["throttle_at_token"], "cause": "network", "moved": False,
                              "new_plan": f"cloud links {high_mbps:g} -> {row['throttle_mbps']:g} Mbps (tc)"})
                title = f"SmolLM2 on the emulated testbed: cloud links {high_mbps:g} -> {row['throttle_mbps']:g} " \
                        f"Mbps after {switch_at} tokens"
            else:
                title = f"SmolLM2 on the emulated testbed: worker of {row.get('killed_device')} SIGKILLed after " \
                        f"{kill_at} tokens"
            run.write_csv(f"adaptive_per_token_{name}", res.per_token)
            run.save_figure(f"adaptive_timeline_{name}", latency_timeline(res.per_token, marks, title=title))
        ratios = [r["ratio"] for r in rows if r.get("ratio") is not None]
        run.finish(throttle_mbps=sorted(done), ratios=ratios,
                   tokens_match=all(r["tokens_match"] for r in rows if "tokens_match" in r))
    return rows, run.path


def _parse(text: str) -> list[Stage]:
    """"edge0[0:4) cloud[4:32)" (core.units.format_stages) -> [Stage("edge0", 0, 4), Stage("cloud", 4, 32)]."""
    out = []
    for part in text.split():
        dev, rng = part.split("[")
        a, b = rng.rstrip(")").split(":")
        out.append(Stage(dev, int(a), int(b)))
    return out
