"""Predicted figures of a plan: `evaluate` and the pipeline timeline of K micro-batches (bubbles / no-bubbles)."""

from __future__ import annotations

import heapq

from edgeshard_kit.planning.problem import Plan, Problem, figures
from edgeshard_kit.core.units import KitError

SCHEDULES = ("bubbles", "no-bubbles")


def timeline(problem: Problem, plan: Plan, micro_batches: int = 1, tokens: int = 8,
             schedule: str = "no-bubbles") -> list[dict]:
    """Simulated pipeline: one record per task (micro_batch, token, stage, resource, kind, start_ms, end_ms).

    Every device and every directed link is a resource serving one task at a time, first come first
    served. "bubbles": token t+1 of any micro-batch waits until all micro-batches have token t back;
    "no-bubbles": a micro-batch starts its next token as soon as its own token is back at the source.
    """
    if schedule not in SCHEDULES:
        raise KitError(f"schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if micro_batches < 1 or tokens < 1:
        raise KitError("micro_batches and tokens must be >= 1")
    f = figures(problem, plan.stages)
    src = problem.devices[problem.source].name
    # the chain of tasks one token of one micro-batch goes through: compute, transfer, compute, ...
    chain = []
    for i, s in enumerate(plan.stages):
        chain.append((s.device, "compute", i, f["stage_compute_ms"][i]))
        nxt = plan.stages[i + 1].device if i + 1 < len(plan.stages) else src
        if nxt != s.device:
            chain.append((f"{s.device}->{nxt}", "transfer", i, f["stage_transfer_ms"][i]))
    if problem.step_ms > 0:  # the coordinator takes the token and feeds the next step: one more resource
        chain.append(("coordinator", "step", len(plan.stages), problem.step_ms))
    free: dict[str, float] = {}
    records: list[dict] = []
    heap: list = [(0.0, m, 0, 0) for m in range(micro_batches)]  # (ready_ms, micro_batch, token, task)
    heapq.heapify(heap)
    done_token: dict[int, list[float]] = {}
    while heap:
        ready, m, tok, k = heapq.heappop(heap)
        res, kind, stage, dur = chain[k]
        start = max(ready, free.get(res, 0.0))
        end = start + dur
        free[res] = end
        records.append({"micro_batch": m, "token": tok, "stage": stage, "resource": res, "kind": kind,
                        "start_ms": start, "end_ms": end})
        if k + 1 < len(chain):
            heapq.heappush(heap, (end, m, tok, k + 1))
        elif tok + 1 < tokens:
            if schedule == "no-bubbles":
                heapq.heappush(heap, (end, m, tok + 1, 0))
            else:
                back = done_token.setdefault(tok, [])
                back.append(end)
                if len(back) == micro_batches:  # the whole batch is back: everyone starts the next token
                    t0 = max(back)
                    for mm in range(micro_batches):
                        heapq.heappush(heap, (t0, mm, tok + 1, 0))
    records.sort(key=lambda r: (r["start_ms"], r["micro_batch"]))
    return records


def timeline_figures(records: list[dict], micro_batch_size: int = 1) -> dict:
    """Makespan, tokens/s and the mean per-token latency a micro-batch sees, from timeline records."""
    if not records:
        return {"makespan_ms": 0.0, "throughput_per_s": 0.0, "token_interval_ms": 0.0}
    makespan = max(r["end_ms"] for r in records)
    mbs = {r["micro_batch"] for r in records}
    toks = {r["token"] for r in records}
    n_tokens = len(mbs) * len(toks) * micro_batch_size
    return {"makespan_ms": makespan, "throughput_per_s": n_tokens * 1000.0 / makespan if makespan > 0 else 0.0,
            "token_interval_ms": makespan / len(toks)}


def evaluate(problem: Problem, plan: Plan, micro_batches: int = 1, tokens: int = 8,
             with_timeline: bool = True) -> dict:
    """Predicted per-token latency, bottleneck, throughput, per-stage figures, memory, and timelines."""
    f = figures(problem, plan.stages)
    out = {"objective": plan.objective, "method": plan.method, "relay": plan.relay,
           "stages": [s.to_dict() for s in plan.stages],
           "latency_ms": f["latency_ms"], "bottleneck_ms": f["bottleneck_ms"],
           "throughput_per_s": f["throughput_per_s"], "micro_batch_size": problem.micro_batch_size,
           "stage_compute_ms": f["stage_compute_ms"], "stage_transfer_ms": f["stage_transfer_ms"],
           "device_load_ms": f["device_load_ms"], "link_load_ms": f["link_load_ms"],
           "memory_bytes": f["memory_bytes"],
           "memory_budget_bytes": {d.name: d.memory_bytes for d in problem.devices if d.name in f["memory_bytes"]},
           "feasible": f["feasible"], "reason": f["reason"], "micro_batches": micro_batches, "tokens": tokens}
    if with_timeline:
        for sched in SCHEDULES:
            recs = timeline(problem, plan, micro_batches, tokens, sched)
            tf = timeline_figures(recs, problem.micro_batch_size)
            key = sched.replace("-", "_")
            out[f"timeline_{key}"] = recs
            out[f"throughput_{key}_per_s"] = tf["throughput_per_s"]
            out[f"token_interval_{key}_ms"] = tf["token_interval_ms"]
    return out


def format_evaluation(ev: dict) -> str:
    """A short human summary of `evaluate`'s result."""
    lines = [f"{ev['method']} ({ev['objective']}{', relay' if ev['relay'] else ''})"
             f"{'' if ev['feasible'] else '  OUT OF MEMORY: ' + ev['reason']}"]
    for i, s in enumerate(ev["stages"]):
        mem = ev["memory_bytes"][s["device"]] / 1e9
        lines.append(f"  stage {i}: {s['device']:<14} units [{s['start']:>3}, {s['end']:>3})  "
                     f"compute {ev['stage_compute_ms'][i]:8.3f} ms  then transfer {ev['stage_transfer_ms'][i]:8.3f} ms"
                     f"  ({mem:.3f} GB on the device)")
    lines.append(f"  per-token latency {ev['latency_ms']:.3f} ms, bottleneck {ev['bottleneck_ms']:.3f} ms, "
                 f"ideal throughput {ev['throughput_per_s']:.2f} tokens/s")
    if "throughput_bubbles_per_s" in ev:
        lines.append(f"  {ev['micro_batches']} micro-batches x {ev['tokens']} tokens: "
                     f"bubbles {ev['throughput_bubbles_per_s']:.2f} tokens/s, "
                     f"no-bubbles {ev['throughput_no_bubbles_per_s']:.2f} tokens/s")
    return "\n".join(lines)
