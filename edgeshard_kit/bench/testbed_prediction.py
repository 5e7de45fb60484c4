"""`edgeshard bench testbed-prediction`: measured latency and throughput on a testbed vs the kit's and the paper's model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from edgeshard_kit.experiments import breakdown
from edgeshard_kit.experiments.benchmark import BenchmarkConfig, run_benchmark
from edgeshard_kit.experiments.results import new_run
from edgeshard_kit.experiments.steps import checkpoint_for
from edgeshard_kit.experiments.testbeds import default_testbed, model_bytes
from edgeshard_kit.planning.objectives import micro_batches_label

TESTBEDS = ("auto", "emulated", "local")
TARGET_MEDIAN, TARGET_MAX = 0.10, 0.25  # |measured / predicted - 1|: median over methods x bandwidths, worst plan


def _quiet(msg: str) -> None:
    """No progress log (the command passes `print`)."""


def testbed_prediction(testbed: str = "auto", model: str = "", cloud_mbps: str = "2,20,200", methods: str = "",
                       max_new_tokens: int = 16, micro_batches: int = 3, repeats: int = 3,
                       root: str | Path = "results", log: Callable[[str], Any] = _quiet):
    """(table, run folder): every method measured on a testbed beside the kit's and the paper's prediction.

    `model`: "" the default real model (SmolLM2-135M-Instruct), "tiny" a tiny random one (in the run folder), a
    model.hub name or a checkpoint folder. Every method is compared at the same K = `micro_batches`; the table
    (prediction.csv in the run folder root/<run-id>/) has measured min/median/max of `repeats` interleaved repeats.
    """
    params = {"testbed": testbed, "model": model, "cloud_mbps": cloud_mbps, "max_new_tokens": max_new_tokens,
              "micro_batches": micro_batches, "repeats": repeats}
    run = new_run("testbed-prediction", params, root=root)
    checkpoint = checkpoint_for(model, run.path, layers=4, hidden=128)
    config = BenchmarkConfig(model_path=str(checkpoint), cloud_mbps=cloud_mbps, methods=methods,
                             max_new_tokens=max_new_tokens, micro_batches=micro_batches, repeats=repeats,
                             profile_repeats=5, calibrate=True)
    tb, why = default_testbed(checkpoint, config.cloud_mbps[0], testbed)
    if tb.emulation == "netns":
        config = replace(config, testbed_file=tb)  # brought up for the run (and down after) if it is not up
    log(f"testbed: {tb.name} ({'netns + tc + cgroups, ' + why if tb.emulation == 'netns' else why}); "
        f"model {checkpoint} ({model_bytes(checkpoint) / 1e6:.0f} MB); K = {micro_batches_label(micro_batches)}")
    outcome = run_benchmark(run, config, log=log)
    table = outcome.tables["prediction"].copy()
    table.insert(0, "testbed", tb.name)
    return table, outcome.path


def prediction_errors(table) -> dict:
    """{"<metric> <model>": (median, max) of |measured median / predicted - 1|} (methods x bandwidths)."""
    return breakdown.errors(table)
