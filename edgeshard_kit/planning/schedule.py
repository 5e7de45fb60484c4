"""Predicted figures of a plan: the pipeline's release rule and timeline of K micro-batches, `evaluate` -> `Evaluation`."""

from __future__ import annotations

import heapq
from collections.abc import Collection
from dataclasses import dataclass, field

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.numbers import human_size, plural
from edgeshard_kit.core.units import Stage
from edgeshard_kit.planning.plan import Plan, figures
from edgeshard_kit.planning.problem import Problem

SCHEDULES = ("bubbles", "no-bubbles")


def release(schedule: str, micro_batch: int, back: int, micro_batches: int,
            finished: Collection[int] = ()) -> list[int]:
    """The pipeline's release rule, shared by the simulator (`timeline`) and the runtime's coordinator.

    `micro_batch` just got its token of some step back at the source, and `back` micro-batches (it
    included) are now through that step: its token is back, or they finished at an earlier step.
    `finished` names the micro-batches that start no further token (every row ended, e.g. at EOS;
    possibly `micro_batch` itself). Returns the micro-batches that start their next token now:
    "no-bubbles" releases that micro-batch at once; "bubbles" waits until the whole batch is through
    the step and then releases every micro-batch that has not finished (none before).
    """
    if schedule not in SCHEDULES:
        raise KitError(f"schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if schedule == "no-bubbles" or micro_batches == 1:
        return [] if micro_batch in finished else [micro_batch]
    return [m for m in range(micro_batches) if m not in finished] if back == micro_batches else []


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
            back = done_token.setdefault(tok, [])
            back.append(end)
            released = release(schedule, m, len(back), micro_batches)
            t0 = end if released == [m] else max(back)  # bubbles: the whole batch is back
            for mm in released:
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


@dataclass(frozen=True)
class Simulation:
    """K micro-batches x T tokens of a plan simulated under one schedule: task records and what they add up to."""

    schedule: str
    records: list[dict]  # timeline's records, one per task
    makespan_ms: float
    throughput_per_s: float  # tokens/s over all sequences
    token_interval_ms: float  # mean time between two tokens of one micro-batch


@dataclass(frozen=True)
class Evaluation:
    """A plan's predicted figures on a problem (ms, tokens/s, bytes) and its simulated pipeline per schedule."""

    objective: str
    method: str
    relay: bool
    stages: tuple[Stage, ...]
    latency_ms: float
    bottleneck_ms: float
    throughput_per_s: float  # ideal: micro_batch_size x 1000 / bottleneck
    micro_batch_size: int
    stage_compute_ms: tuple[float, ...]
    stage_transfer_ms: tuple[float, ...]
    device_load_ms: dict[str, float]
    link_load_ms: dict[str, float]  # "src->dst" -> ms
    memory_bytes: dict[str, float]
    memory_budget_bytes: dict[str, float]
    feasible: bool
    reason: str
    micro_batches: int
    tokens: int
    simulations: dict[str, Simulation] = field(default_factory=dict)  # schedule -> simulation; {} without timeline

    def to_dict(self, timelines: bool = True) -> dict:
        """Plain JSON data: the figures, and per schedule `throughput_<s>_per_s`, `token_interval_<s>_ms`,
        `timeline_<s>` (the records; left out when `timelines` is False), s = bubbles / no_bubbles."""
        out = {"objective": self.objective, "method": self.method, "relay": self.relay,
               "stages": [s.to_dict() for s in self.stages],
               "latency_ms": self.latency_ms, "bottleneck_ms": self.bottleneck_ms,
               "throughput_per_s": self.throughput_per_s, "micro_batch_size": self.micro_batch_size,
               "stage_compute_ms": list(self.stage_compute_ms), "stage_transfer_ms": list(self.stage_transfer_ms),
               "device_load_ms": dict(self.device_load_ms), "link_load_ms": dict(self.link_load_ms),
               "memory_bytes": dict(self.memory_bytes), "memory_budget_bytes": dict(self.memory_budget_bytes),
               "feasible": self.feasible, "reason": self.reason, "micro_batches": self.micro_batches,
               "tokens": self.tokens}
        for sched, sim in self.simulations.items():
            key = sched.replace("-", "_")
            if timelines:
                out[f"timeline_{key}"] = sim.records
            out[f"throughput_{key}_per_s"] = sim.throughput_per_s
            out[f"token_interval_{key}_ms"] = sim.token_interval_ms
        return out


def simulate(problem: Problem, plan: Plan, micro_batches: int = 1, tokens: int = 8,
             schedule: str = "no-bubbles") -> Simulation:
    """The timeline of K micro-batches x T tokens under `schedule` and its figures."""
    recs = timeline(problem, plan, micro_batches, tokens, schedule)
    tf = timeline_figures(recs, problem.micro_batch_size)
    return Simulation(schedule, recs, tf["makespan_ms"], tf["throughput_per_s"], tf["token_interval_ms"])


def evaluate(problem: Problem, plan: Plan, micro_batches: int = 1, tokens: int = 8,
             with_timeline: bool = True) -> Evaluation:
    """Predicted per-token latency, bottleneck, throughput, per-stage figures, memory, and (with_timeline) both
    schedules simulated for K micro-batches x T tokens."""
    f = figures(problem, plan.stages)
    sims = {sched: simulate(problem, plan, micro_batches, tokens, sched) for sched in SCHEDULES} if with_timeline else {}
    return Evaluation(
        objective=plan.objective, method=plan.method, relay=plan.relay, stages=tuple(plan.stages),
        latency_ms=f["latency_ms"], bottleneck_ms=f["bottleneck_ms"], throughput_per_s=f["throughput_per_s"],
        micro_batch_size=problem.micro_batch_size, stage_compute_ms=tuple(f["stage_compute_ms"]),
        stage_transfer_ms=tuple(f["stage_transfer_ms"]), device_load_ms=f["device_load_ms"],
        link_load_ms=f["link_load_ms"], memory_bytes=f["memory_bytes"],
        memory_budget_bytes={d.name: d.memory_bytes for d in problem.devices if d.name in f["memory_bytes"]},
        feasible=f["feasible"], reason=f["reason"], micro_batches=micro_batches, tokens=tokens, simulations=sims)


def format_evaluation(ev: Evaluation) -> str:
    """A short human summary of `evaluate`'s result."""
    lines = [f"{ev.method} ({ev.objective}{', relay' if ev.relay else ''})"
             f"{'' if ev.feasible else '  OUT OF MEMORY: ' + ev.reason}"]
    for i, s in enumerate(ev.stages):
        mem = human_size(ev.memory_bytes[s.device])
        lines.append(f"  stage {i}: {s.device:<14} units [{s.start:>3}, {s.end:>3})  "
                     f"compute {ev.stage_compute_ms[i]:8.3f} ms  then transfer {ev.stage_transfer_ms[i]:8.3f} ms"
                     f"  ({mem} on the device)")
    lines.append(f"  per-token latency {ev.latency_ms:.3f} ms, bottleneck {ev.bottleneck_ms:.3f} ms, "
                 f"ideal throughput {ev.throughput_per_s:.2f} tokens/s")
    if ev.simulations:
        lines.append(f"  {plural(ev.micro_batches, 'micro-batch')} x {plural(ev.tokens, 'token')}: "
                     f"bubbles {ev.simulations['bubbles'].throughput_per_s:.2f} tokens/s, "
                     f"no-bubbles {ev.simulations['no-bubbles'].throughput_per_s:.2f} tokens/s")
    return "\n".join(lines)
