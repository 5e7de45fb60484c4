"""`edgeshard bench testbed-prediction`: measured latency and throughput on a testbed vs the kit's and the paper's model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from edgeshard_kit.experiments.benchmark import BenchmarkConfig, prediction_table, run_benchmark
from edgeshard_kit.experiments.results import new_run
from edgeshard_kit.experiments.steps import checkpoint_for
from edgeshard_kit.experiments.testbeds import default_testbed, model_bytes

TESTBEDS = ("auto", "emulated", "local")


def _quiet(msg: str) -> None:
    """No progress log (the command passes `print`)."""


def testbed_prediction(testbed: str = "auto", layers: int = 8, hidden: int = 768, cloud_mbps: str = "5,50",
                       methods: str = "", max_new_tokens: int = 8, micro_batches: int = 3, repeats: int = 2,
                       root: str | Path = "results", log: Callable[[str], Any] = _quiet):
    """(table, run folder): every method measured on a testbed beside the calibrated and the paper's prediction.

    The checkpoint (seeded, `layers` x `hidden`) is kept in `root`/bench-model-<layers>x<hidden>/tiny-model; the
    run folder (root/<run-id>/) gets the benchmark's CSVs and figures and the table as prediction.csv.
    """
    params = {"testbed": testbed, "layers": layers, "hidden": hidden, "cloud_mbps": cloud_mbps,
              "max_new_tokens": max_new_tokens, "micro_batches": micro_batches, "repeats": repeats}
    checkpoint = checkpoint_for("tiny", Path(root) / f"bench-model-{layers}x{hidden}", layers=layers, hidden=hidden)
    config = BenchmarkConfig(model_path=str(checkpoint), cloud_mbps=cloud_mbps, methods=methods,
                             max_new_tokens=max_new_tokens, micro_batches=micro_batches, repeats=repeats,
                             profile_repeats=5, calibrate=True)
    tb, why = default_testbed(checkpoint, config.cloud_mbps[0], testbed)
    if tb.emulation == "netns":
        config = replace(config, testbed_file=tb)  # brought up for the run (and down after) if it is not up
    log(f"testbed: {tb.name} ({'emulated: netns + tc + cgroups' if tb.emulation == 'netns' else why}); "
        f"model {checkpoint} ({model_bytes(checkpoint) / 1e6:.0f} MB)")
    run = new_run("testbed-prediction", params, root=root)
    outcome = run_benchmark(run, config, log=log)
    table = prediction_table(outcome.tables["measurements"])
    table.insert(0, "testbed", tb.name)
    run.write_csv("prediction", table)
    return table, outcome.path


def prediction_errors(table) -> dict:
    """Median |measured / predicted - 1| per metric, for the kit's model and the paper's model."""
    out = {}
    for metric in ("latency_ms", "throughput_tps"):
        t = table[table.metric == metric]
        for col, label in (("measured_over_predicted", "kit"), ("measured_over_predicted_paper", "paper")):
            if col in t and t[col].notna().any():
                out[f"{metric} {label}"] = float((t[col] - 1).abs().median())
    return out
