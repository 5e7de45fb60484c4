"""The benchmark's measured side: fixed-length prompts, one deployment per distinct stage list, tokens checked.

`measure_plans` deploys every stage list that some method chose at some bandwidth once and measures it at each
such bandwidth: on an emulated testbed (netns) the kernel's links are re-shaped under the running workers, so
one deployment serves the whole sweep; with app-level shaping (pushed to the workers when they are configured)
every bandwidth gets its own deployment. Every generated row is compared with one-device generation.
"""

from __future__ import annotations

import time
from typing import Callable

from edgeshard_kit.core.units import format_stages
from edgeshard_kit.model.checkpoint import load_tokenizer
from edgeshard_kit.model.prompts import fixed_length_ids, pick_prompts
from edgeshard_kit.runtime.deployment import deploy

Log = Callable[[str], None]
SCHEDULES = ("no-bubbles", "bubbles")


def prompt_ids(checkpoint, n: int, prompt_len: int):
    """(ids, mask): the first `n` prompts of the kit's set (one per micro-batch), each cut to `prompt_len` tokens."""
    return fixed_length_ids(load_tokenizer(checkpoint), pick_prompts(n), prompt_len)


def measure(dep, prompts, reference: list[list[int]], tokens: int, micro_batches: int, repeats: int) -> list[dict]:
    """Rows of a running deployment: sequential per-token latency (the first prompt), pipelined tokens/s under both
    schedules (one prompt per micro-batch); `tokens_match`: every row equals its one-device `reference`."""
    ids, mask = prompts
    rows = []
    for rep in range(repeats):
        runs = [("sequential", dep.generate(ids[:1], tokens, attention_mask=mask[:1]))]
        if micro_batches > 1:
            for sched in SCHEDULES:
                runs.append((sched, dep.generate(ids, tokens, mode="pipelined", micro_batches=micro_batches,
                                                 schedule=sched, attention_mask=mask)))
        for sched, res in runs:
            s = res.summary
            rows.append({"source": "measured", "schedule": sched, "repeat": rep, "status": "ok", "reason": "",
                         "latency_ms": s["per_token_ms"], "throughput_tps": s["decode_tokens_per_s"]
                         or s["tokens_per_s"], "prefill_ms": s["prefill_ms"],
                         "tokens_match": all(t == ref for t, ref in zip(res.tokens, reference))})
    return rows


def measure_plans(checkpoint, testbed_at, chosen: list[tuple], prompts, reference: list[list[int]], tokens: int,
                  micro_batches: int, repeats: int, log: Log) -> list[dict]:
    """Measured rows of every (mbps, method, plan, problem, testbed) in `chosen`, deploying each stage list once.

    `testbed_at(mbps)` gives the testbed at that cloud bandwidth (re-shaping an emulated one). Methods that chose
    the same stages at the same bandwidth share one measurement.
    """
    groups: dict[tuple, list[tuple]] = {}
    for item in chosen:
        mbps, _, plan, _, testbed = item
        key = (tuple(plan.stages),) if testbed.emulation == "netns" else (tuple(plan.stages), mbps)
        groups.setdefault(key, []).append(item)
    rows = []
    for items in groups.values():
        first_mbps, _, first_plan, first_problem, first_tb = items[0]
        t0 = time.perf_counter()
        testbed_at(first_mbps)  # the links as this deployment's first measurement needs them
        with deploy(first_plan, first_tb, checkpoint, problem=first_problem) as dep:
            dep.generate(prompts[0][:1], 2, attention_mask=prompts[1][:1])  # warm-up: first-call allocations
            measured: dict[float, list[dict]] = {}
            for mbps, name, plan, _, _ in items:
                if mbps not in measured:
                    testbed_at(mbps)  # netns: tc re-shaped under the running workers
                    measured[mbps] = measure(dep, prompts, reference, tokens, micro_batches, repeats)
                rows += [{**r, "method": name, "cloud_mbps": mbps, "stages": format_stages(plan.stages)}
                         for r in measured[mbps]]
                seq = [r["latency_ms"] for r in measured[mbps] if r["schedule"] == "sequential"]
                log(f"  {mbps:>7g} Mbps  {name:<22} {format_stages(plan.stages):<40} predicted "
                    f"{plan.latency_ms:8.2f} ms/token, measured {min(seq):8.2f} ({time.perf_counter() - t0:.1f} s)")
                t0 = time.perf_counter()
    return rows
