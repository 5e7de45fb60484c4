"""The benchmark's measured side: fixed-length prompts, deployments measured in turn, tokens checked.

`measure_plans` deploys every stage list that some method chose at some bandwidth once and keeps up to
`MAX_LIVE` deployments up at a time; at each bandwidth it measures every repeat of every deployment in turn, the
order rotated from one repeat to the next, so that a slow spell of a shared host falls on every method alike
(idle workers block on their sockets and cost nothing). On an emulated testbed (netns) the kernel's links are
re-shaped under the running workers, so one deployment serves the whole sweep; with app-level shaping (pushed to
the workers when they are configured) every bandwidth gets its own deployment. Every generated row is compared
with one-device generation.
"""

from __future__ import annotations

import statistics
import time
from contextlib import ExitStack
from typing import Callable

from tqdm.auto import tqdm

from edgeshard_kit.core.units import format_stages
from edgeshard_kit.model.checkpoint import load_tokenizer
from edgeshard_kit.model.prompts import fixed_length_ids, pick_prompts
from edgeshard_kit.runtime.deployment import deploy

Log = Callable[[str], None]
SCHEDULES = ("no-bubbles", "bubbles")
MAX_LIVE = 3  # deployments up at once (memory: every one holds the whole model across its workers)
STAGE_FIELDS = ("compute_ms", "recv_ms", "send_ms", "wait_ms")


def prompt_ids(checkpoint, n: int, prompt_len: int):
    """(ids, mask): the first `n` prompts of the kit's set (one per micro-batch), each cut to `prompt_len` tokens."""
    return fixed_length_ids(load_tokenizer(checkpoint), pick_prompts(n), prompt_len)


def stage_records(res) -> list[dict]:
    """The runtime's per-stage timing of a sequential run's decode steps (step > 0): one row per stage and step."""
    return [{"stage": r["stage"], "step": r["step"], **{f: r.get(f) for f in STAGE_FIELDS}}
            for r in res.per_stage if r.get("step", 0) > 0]


def measure(dep, prompts, reference: list[list[int]], tokens: int, micro_batches: int, rep: int,
            schedules: tuple[str, ...] = SCHEDULES) -> tuple[list[dict], list[dict]]:
    """(rows, stage rows) of one repeat on a running deployment: sequential per-token latency (the first prompt)
    and pipelined tokens/s under `schedules` (one prompt per micro-batch); `tokens_match`: every row equals its
    one-device `reference`."""
    ids, mask = prompts
    runs = [("sequential", dep.generate(ids[:1], tokens, attention_mask=mask[:1]))]
    if micro_batches > 1:
        for sched in schedules:
            runs.append((sched, dep.generate(ids, tokens, mode="pipelined", micro_batches=micro_batches,
                                             schedule=sched, attention_mask=mask)))
    rows = []
    for sched, res in runs:
        s = res.summary
        rows.append({"source": "measured", "schedule": sched, "repeat": rep, "status": "ok", "reason": "",
                     "micro_batches": micro_batches if sched != "sequential" else 1,
                     "latency_ms": s["per_token_ms"], "throughput_tps": s["decode_tokens_per_s"]
                     or s["tokens_per_s"], "prefill_ms": s["prefill_ms"],
                     "tokens_match": all(t == ref for t, ref in zip(res.tokens, reference))})
    return rows, [{**r, "repeat": rep} for r in stage_records(runs[0][1])]


def measure_plans(checkpoint, testbed_at, chosen: list[tuple], prompts, reference: list[list[int]], tokens: int,
                  micro_batches: int, repeats: int, log: Log,
                  schedules: tuple[str, ...] = SCHEDULES) -> tuple[list[dict], list[dict]]:
    """(rows, stage rows) of every (mbps, method, plan, problem, testbed) in `chosen`, deploying each stage list once.

    `testbed_at(mbps)` gives the testbed at that cloud bandwidth (re-shaping an emulated one). Methods that chose
    the same stages at the same bandwidth share one measurement. Repeats are interleaved across deployments.
    """
    groups: dict[tuple, list[tuple]] = {}
    for item in chosen:
        mbps, _, plan, _, testbed = item
        key = (tuple(plan.stages),) if testbed.emulation == "netns" else (tuple(plan.stages), mbps)
        groups.setdefault(key, []).append(item)
    keys = list(groups)
    rows, stage_rows = [], []
    bar = tqdm(total=sum(len({i[0] for i in g}) for g in groups.values()) * repeats, desc="measure", unit="run",
               leave=False, disable=None)
    for b in range(0, len(keys), MAX_LIVE):
        batch = keys[b:b + MAX_LIVE]
        with ExitStack() as stack:
            deps = {}
            for key in batch:
                mbps0, _, plan0, problem0, tb0 = groups[key][0]
                testbed_at(mbps0)  # the links as this deployment's first measurement needs them
                t0 = time.perf_counter()
                deps[key] = stack.enter_context(deploy(plan0, tb0, checkpoint, problem=problem0))
                deps[key].generate(prompts[0][:1], 2, attention_mask=prompts[1][:1])  # warm-up: first-call allocations
                log(f"  deployed {format_stages(plan0.stages)} ({time.perf_counter() - t0:.1f} s)")
            bandwidths = sorted({i[0] for key in batch for i in groups[key]})
            for mbps in bandwidths:
                here = [k for k in batch if any(i[0] == mbps for i in groups[k])]
                testbed_at(mbps)  # netns: tc re-shaped under the running workers
                got: dict[tuple, tuple[list, list]] = {k: ([], []) for k in here}
                for rep in range(repeats):
                    shift = rep % len(here)
                    for key in here[shift:] + here[:shift]:  # the order rotates from one repeat to the next
                        r, s = measure(deps[key], prompts, reference, tokens, micro_batches, rep, schedules)
                        got[key][0].extend(r)
                        got[key][1].extend(s)
                        bar.update()
                for key in here:
                    for m, name, plan, _, _ in groups[key]:
                        if m != mbps:
                            continue
                        tag = {"method": name, "cloud_mbps": mbps, "stages": format_stages(plan.stages)}
                        rows += [{**r, **tag} for r in got[key][0]]
                        stage_rows += [{**r, **tag} for r in got[key][1]]
                        seq = sorted(r["latency_ms"] for r in got[key][0] if r["schedule"] == "sequential")
                        log(f"  {mbps:>7g} Mbps  {name:<22} {format_stages(plan.stages):<40} predicted "
                            f"{plan.latency_ms:8.2f} ms/token, measured {statistics.median(seq):8.2f} "
                            f"[{seq[0]:.2f}..{seq[-1]:.2f}]")
    bar.close()
    return rows, stage_rows
