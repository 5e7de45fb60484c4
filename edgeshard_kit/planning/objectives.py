"""What each objective means, and the one name each EdgeShard method has everywhere (tables, figures, CSVs).

Three objectives:

- ``latency``: the lowest per-token latency (sum of stage compute and transfers, one micro-batch in flight).
- ``throughput``: the most tokens/s with exactly K micro-batches in flight, K the workload's micro-batch count.
  K micro-batches cycle through the pipeline in max(latency, K x bottleneck) ms, so with few micro-batches a short
  pipeline beats a long one whose steady state is never reached (`baselines.solve_for_micro_batches`).
- ``throughput-steady``: the paper's throughput DP, the smallest bottleneck of a pipeline kept full (as many
  micro-batches as it needs). Kept under its own name for the reproduction of the paper (arXiv 2405.14371,
  Sec. IV-C); with K micro-batches known, ``throughput`` is what a deployment actually gets.
"""

from __future__ import annotations

from dataclasses import replace

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.planning.baselines import solve_for_micro_batches
from edgeshard_kit.planning.dp import solve
from edgeshard_kit.planning.plan import Plan
from edgeshard_kit.planning.problem import Problem

OBJECTIVES = ("latency", "throughput", "throughput-steady")

# the method name of EdgeShard's plan for each objective: one naming in every table, figure and CSV
METHOD_NAMES = {
    "latency": "EdgeShard-latency",
    "throughput": "EdgeShard-throughput",
    "throughput-steady": "EdgeShard-throughput (steady state)",
}

BASELINE_NAMES = ("Edge-Solo", "Cloud-Edge-Even", "Cloud-Edge-Opt", "Memory-Proportional")


def solve_objective(problem: Problem, objective: str, micro_batches: int | None = None,
                    relay: bool = False) -> Plan:
    """EdgeShard's optimum for `objective` (one of OBJECTIVES), named with METHOD_NAMES.

    micro_batches: K for ``throughput`` (default: the problem is taken to be pipelined without limit, i.e. the
    steady-state DP, which is what ``throughput`` means when K is unknown). Raises KitError when nothing fits
    (the message names the tightest constraint) or the objective is unknown.
    """
    if objective not in OBJECTIVES:
        raise KitError(f"objective: {objective!r} is not one of {', '.join(OBJECTIVES)}")
    if objective == "throughput" and micro_batches is not None:
        if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
            raise KitError(f"micro_batches: expected an integer >= 1, got {micro_batches!r}")
        plan = solve_for_micro_batches(problem, micro_batches)
    elif objective == "latency":
        plan = solve(problem, "latency", relay=relay)
    else:
        plan = solve(problem, "throughput", relay=relay)
    return replace(plan, objective="latency" if objective == "latency" else "throughput",
                   method=METHOD_NAMES[objective])


def micro_batches_label(k: int) -> str:
    """'1 micro-batch', '4 micro-batches'."""
    return f"{k} micro-batch" if k == 1 else f"{k} micro-batches"
