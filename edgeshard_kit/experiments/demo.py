"""`edgeshard demo`: the full benchmark on a tiny checkpoint (`demo`), and the quick 3-stage split check (`split_check`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgeshard_kit.core.units import n_units
from edgeshard_kit.experiments import steps
from edgeshard_kit.experiments.benchmark import BenchmarkConfig, Log, run_benchmark
from edgeshard_kit.experiments.results import Outcome, new_run
from edgeshard_kit.experiments.testbeds import default_testbed
from edgeshard_kit.model.checkpoint import load_llama_config, write_tiny_checkpoint
from edgeshard_kit.model.generate import GenerationResult, generate_split

DEMO_MODEL = Path("results/demo-model")
DEMO_PROMPTS = ["Edge devices share the work of a language model", "The network link between two boards"]


def _quiet(msg: str) -> None:
    """No progress log."""


def demo_config(cloud_mbps: Any = "2,20,200") -> BenchmarkConfig:
    """The demo's knobs: a tiny 4-layer checkpoint, 6 tokens, 3 micro-batches, one measured generation per plan."""
    return BenchmarkConfig(tiny_layers=4, tiny_hidden=128, cloud_mbps=cloud_mbps, max_new_tokens=6,
                           micro_batches=3, repeats=1)


def demo(config: BenchmarkConfig, root: str | Path = "results", testbed: str = "auto",
         log: Log = _quiet) -> Outcome:
    """The full experiment: emulated testbed when this host can (root, sshd, cgroup v1), local otherwise.

    Creates the checkpoint, brings the testbed up, profiles, calibrates, plans, deploys and benchmarks EdgeShard
    against the baselines, writes `root/<run-id>/` with its figures and takes the testbed down.
    `testbed`: "auto", "emulated" or "local" (experiments.testbeds.default_testbed).
    """
    run = new_run("demo", {**config.to_dict(), "testbed": testbed}, root=root)
    checkpoint = steps.checkpoint_for(config.model_path, run.path, layers=config.tiny_layers, hidden=config.tiny_hidden)
    tb, why = default_testbed(checkpoint, config.cloud_mbps[0], testbed)
    local = tb.emulation != "netns"
    where = (f"local testbed (3 edge processes + cloud on 127.0.0.1, app-level link shaping: {why})" if local else
             f"emulated testbed {tb.name}: {len(tb.devices)} network namespaces with sshd, tc and cgroups")
    log(f"edgeshard demo: tiny Llama ({config.tiny_layers} layers), {where}\n"
        f"  EdgeShard vs baselines at cloud links of {','.join(f'{b:g}' for b in config.cloud_mbps)} Mbps")
    run.record(testbed_choice=where)
    # Local: the benchmark builds the same local testbed per bandwidth; emulated: this one, memory already scaled.
    return run_benchmark(run, config if local else replace(config, testbed_file=tb), log)


def three_way_split(total: int) -> list[tuple[int, int]]:
    """Cut [0, total) into 3 contiguous stages of near-equal size."""
    a, b = total // 3, 2 * total // 3
    return [(0, a), (a, b), (b, total)]


@dataclass(frozen=True)
class SplitCheck:
    """A 3-stage split's generation beside one stage's generation of the same prompts (greedy: tokens must match)."""

    model: Path
    layers: int
    split: list[tuple[int, int]]
    result: GenerationResult
    reference: GenerationResult

    @property
    def same(self) -> bool:
        return self.result.tokens == self.reference.tokens


def split_check(model: str | Path = DEMO_MODEL, max_new_tokens: int = 16, log: Log = _quiet) -> SplitCheck:
    """Generate with the model cut in 3 stages on this host and with one stage (a tiny checkpoint made if missing)."""
    model = Path(model)
    if not (model / "config.json").is_file():
        log(f"creating a tiny Llama checkpoint in {model} ...")
        write_tiny_checkpoint(model)
    layers = load_llama_config(model).num_hidden_layers
    split = three_way_split(n_units(layers))
    log(f"model {model}: {layers} decoder layers = {n_units(layers)} units; split {split}")
    res = generate_split(model, split, prompts=DEMO_PROMPTS, max_new_tokens=max_new_tokens)
    ref = generate_split(model, None, prompts=DEMO_PROMPTS, max_new_tokens=max_new_tokens)
    return SplitCheck(model, layers, split, res, ref)
