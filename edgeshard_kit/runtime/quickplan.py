"""A plan for a testbed in one call (what `generate --testbed` runs): quick profiles, the workload, the problem, the plan."""

from __future__ import annotations

from pathlib import Path

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.model.checkpoint import load_tokenizer
from edgeshard_kit.model.generate import encode_prompts
from edgeshard_kit.planning.build import Workload, build_problem, load_profiles
from edgeshard_kit.planning.objectives import solve_objective
from edgeshard_kit.planning.plan import Plan, load_plan
from edgeshard_kit.planning.problem import Problem
from edgeshard_kit.profiling.measure import measure_profile
from edgeshard_kit.profiling.profile import Profile
from edgeshard_kit.runtime.calibrate import RuntimeCosts
from edgeshard_kit.testbed.inventory import Testbed


def quick_profiles(checkpoint: str | Path, testbed: Testbed, workload: Workload, dtype: str = "float32",
                   profiles: list[str] | None = None, threads: int = 1, compile: bool = False) -> dict[str, Profile]:
    """Profiles by device type: the given files, or one quick measurement on this host for every device type
    (`compile`: of the compiled decode path, as a `--compile` run will decode)."""
    if profiles:
        return load_profiles(profiles)
    plen = workload.prompt_len
    p = measure_profile(checkpoint, dtype=dtype, batch=workload.micro_batch_size, prompt_len=plen,
                        kv_lens=(plen + max(workload.gen_tokens, 1) // 2,), repeats=3, warmup=1,
                        progress=False, threads=threads, compile=compile)
    return {d.type: p for d in testbed.devices}  # local testbed: every device is this host


def quick_workload(batch: int, micro_batches: int, prompt_len: int, gen_tokens: int) -> Workload:
    """The workload of `batch` sequences in `micro_batches` (rounded up to whole micro-batches of the largest size)."""
    if micro_batches < 1 or micro_batches > batch:
        raise KitError(f"micro-batches {micro_batches} must be between 1 and the number of prompts ({batch})")
    batch = -(-batch // micro_batches) * micro_batches  # the runtime's first micro-batches hold ceil(B / K) rows
    return Workload(prompt_len=max(prompt_len, 1), gen_tokens=gen_tokens, batch=batch, micro_batches=micro_batches)


def prompt_workload(checkpoint: str | Path, prompts: list[str] | list[list[int]], micro_batches: int,
                    max_new_tokens: int, chat: bool = False) -> Workload:
    """The workload of these prompts: their length after tokenizing (chat template when `chat`) and left-padding,
    their number, `micro_batches` and `max_new_tokens`; a prompt the generation would refuse is refused here."""
    if not prompts:
        raise KitError("no prompt given")
    if all(isinstance(p, str) for p in prompts):
        ids, _ = encode_prompts(load_tokenizer(checkpoint), list(prompts), chat=chat)
        batch, plen = ids.shape
    else:
        if chat:
            raise KitError("chat prompts must be text (the chat template applies to text), not token ids")
        batch, plen = len(prompts), max(len(p) for p in prompts)
    if max_new_tokens < 1:
        raise KitError(f"max-new-tokens must be at least 1, got {max_new_tokens}")
    return quick_workload(int(batch), micro_batches, int(plen), max_new_tokens)


def quick_problem(checkpoint: str | Path, testbed: Testbed, workload: Workload, dtype: str = "float32",
                  profiles: list[str] | None = None, threads: int = 1, runtime: RuntimeCosts | None = None,
                  compile: bool = False) -> Problem:
    """The planning problem: given profiles, or one quick measurement on this host for every device type."""
    profs = quick_profiles(checkpoint, testbed, workload, dtype, profiles, threads, compile)
    return build_problem(profs, testbed, workload, runtime=runtime)


def plan_for_run(checkpoint: str | Path, testbed: Testbed, workload: Workload, dtype: str = "float32",
                 objective: str = "latency", plan_file: str | Path | None = None,
                 profiles: list[str] | None = None, compile: bool = False) -> tuple[Plan, Problem | None]:
    """(plan, problem): the plan file if given (with a problem only when profiles are given, for the prediction),
    else the plan solved for `objective` (planning.objectives; throughput: for the workload's micro-batches) on a
    quick problem."""
    if plan_file:
        plan = load_plan(plan_file)
        return plan, (quick_problem(checkpoint, testbed, workload, dtype, profiles) if profiles else None)
    problem = quick_problem(checkpoint, testbed, workload, dtype, profiles, compile=compile)
    return solve_objective(problem, objective, workload.micro_batches), problem
