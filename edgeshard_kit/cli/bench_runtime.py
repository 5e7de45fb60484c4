"""`edgeshard bench wire / pipeline-latency / pipeline-throughput / testbed-prediction`: run, print the figures, write CSVs."""

from __future__ import annotations

import argparse
import statistics
import time

from edgeshard_kit.bench.pipeline import bench_latency, bench_loopback, bench_throughput, stage_cost
from edgeshard_kit.bench.testbed_prediction import (TARGET_MAX, TARGET_MEDIAN, TESTBEDS, prediction_errors,
                                                     testbed_prediction)
from edgeshard_kit.core.io import write_rows

DTYPES = ["float32", "float16", "bfloat16"]


def cmd_wire(args: argparse.Namespace) -> int:
    rows = bench_loopback(args.mb << 20, args.repeats)
    med = {}
    for impl in ("wire", "socket"):
        rates = [r["gb_per_s"] for r in rows if r["impl"] == impl]
        med[impl] = statistics.median(rates)
        print(f"{impl:>7}: {args.mb} MiB frames, min {min(rates):.2f} / median {med[impl]:.2f} / max {max(rates):.2f} "
              f"GB/s over {len(rates)} frames")
    print(f"the kit's wire: {med['wire']:.2f} GB/s [target >= 1 GB/s], {med['wire'] / med['socket']:.2f}x plain TCP "
          f"on this host's loopback ({med['socket']:.2f} GB/s)")
    print(f"wrote {write_rows(rows, args.out)}")
    return 0


def cmd_latency(args: argparse.Namespace) -> int:
    rows = bench_latency(args.model, args.tokens, args.prompt_len, args.repeats, args.dtype, floor=args.floor)
    for r in rows:
        print(f"repeat {r['repeat']}: one process {r['one_process_ms']:.2f} ms/token, 2 workers "
              f"{r['pipeline_ms']:.2f} ms/token, ratio {r['ratio']:.3f} (per-step pairs {r['paired_ratio']:.3f})"
              + (f"; 2 processes without the runtime {r['floor_ms']:.2f} ms/token" if "floor_ms" in r else "")
              + f"; same tokens: {r['same_tokens']}")

    def spread(key: str) -> str:
        v = [r[key] for r in rows]
        return f"{statistics.median(v):.3f} ({min(v):.3f}..{max(v):.3f})"

    print(f"per-token latency, 2 local workers / one process, decode steps interleaved, median of {len(rows)} "
          f"repeats: {spread('ratio')}; per-step pairs {spread('paired_ratio')}  "
          f"[target <= 1.03 on SmolLM2-135M; <= 1.10 when a decode step takes >= 20 ms]")
    if args.floor:
        print(f"  2 processes without the runtime (plain sockets) / one process: {spread('floor_ratio')}; "
              f"2 workers / 2 processes without the runtime: {spread('runtime_ratio')} (the runtime's own share)")
    ex = [r["excess_ms"] for r in rows]
    print(f"2 workers - one process, ms per token: median {statistics.median(ex):.2f} (min {min(ex):.2f}, "
          f"max {max(ex):.2f})")
    if args.calibrate:
        costs = stage_cost(args.model, args.tokens, args.prompt_len, args.calibrate, args.dtype, log=print)
        lo, hi = costs.spread.get("cpu-local", [float("nan")] * 2)
        s = costs.stage_ms.get("cpu-local", 0.0)
        print(f"fixed cost per stage (calibrated, {args.calibrate} interleaved windows): {s:.3f} ms "
              f"[{lo:.3f}..{hi:.3f}], raw {costs.raw_stage_ms.get('cpu-local', 0.0):.3f} ms [target <= 1 ms]; "
              f"per token {costs.step_ms:.3f} ms; compute measured / profiled "
              f"{costs.compute_scale.get('cpu-local', 1.0):.3f}")
        for r in rows:
            r.update(stage_ms=s, stage_ms_min=lo, stage_ms_max=hi, step_ms=costs.step_ms)
    print(f"wrote {write_rows(rows, args.out)}")
    return 0


def cmd_throughput(args: argparse.Namespace) -> int:
    k = args.micro_batches
    rows, costs = bench_throughput(args.model, k, args.micro_batch_size, args.tokens, args.prompt_len,
                                   args.repeats, args.dtype, args.calibrate, log=print)
    if costs is not None:
        print(f"fixed costs: stage_ms {costs.stage_ms}, step_ms {costs.step_ms:.3f}")
    for r in rows:
        seq, pipe, pred = r["sequential_tokens_per_s"], r["pipelined_tokens_per_s"], r["predicted_tokens_per_s"]
        print(f"repeat {r['repeat']}: decode throughput sequential {seq:.1f} tok/s, pipelined K={k} {pipe:.1f} tok/s "
              f"(x{r['speedup']:.2f}), predicted {pred:.1f} tok/s (measured/predicted {r['vs_prediction']:.2f}); "
              f"incl. prefill {r['sequential_incl_prefill_tokens_per_s']:.1f} vs "
              f"{r['pipelined_incl_prefill_tokens_per_s']:.1f} tok/s; from measured stage compute "
              f"{r['predicted_from_measured_compute']:.1f} tok/s (measured/that {r['vs_measured_compute']:.2f})")
    med = {c: statistics.median(r[c] for r in rows)
           for c in ("speedup", "vs_prediction", "vs_measured_compute", "vs_paper_model")}
    print(f"median speedup {med['speedup']:.2f} [target >= 1.7], measured/predicted {med['vs_prediction']:.2f} "
          f"[target within 0.85..1.15] ({'calibrated fixed costs' if args.calibrate else 'no fixed costs'}; "
          f"the paper's model: {med['vs_paper_model']:.2f}), "
          f"measured/predicted-from-measured-stage-compute {med['vs_measured_compute']:.2f}")
    print(f"wrote {write_rows(rows, args.out)}")
    return 0


def cmd_testbed_prediction(args: argparse.Namespace) -> int:
    import pandas as pd

    t0 = time.perf_counter()
    table, run_path = testbed_prediction(args.testbed, args.model, args.cloud_mbps, args.methods, args.max_new_tokens,
                                         args.micro_batches, args.repeats, args.root, log=print)
    cols = ["cloud_mbps", "method", "metric", "micro_batches", "measured_min", "measured", "measured_max", "predicted",
            "predicted-paper", "measured_over_predicted", "measured_over_predicted_paper"]
    with pd.option_context("display.width", 220, "display.max_columns", 20, "display.float_format", "{:.3f}".format):
        print(table[[c for c in cols if c in table]].to_string(index=False))
    for k, (med, worst) in prediction_errors(table).items():
        print(f"|measured/predicted - 1|, {k:>20}'s model: median {100 * med:5.1f}% [target <= "
              f"{100 * TARGET_MEDIAN:.0f}%], worst plan {100 * worst:5.1f}% [target <= {100 * TARGET_MAX:.0f}%]")
    rows = table.astype(object).where(table.notna(), None).to_dict("records")  # NaN -> empty cell
    print(f"-> {write_rows(rows, args.out)}  (run folder {run_path}; {time.perf_counter() - t0:.0f} s)")
    return 0


def add_bench_parsers(bench_sub) -> None:
    """Register the runtime's benchmarks under `edgeshard bench`."""
    p = bench_sub.add_parser("pipeline-latency",
                             help="per-token latency: 2 local workers vs one process, decode steps interleaved")
    p.add_argument("--model", required=True, help="Llama checkpoint directory")
    p.add_argument("--tokens", type=int, default=32, help="tokens per run (default 32)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats (default 3)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--no-floor", dest="floor", action="store_false",
                   help="leave out the floor: the same two halves in two processes over plain sockets, no runtime")
    p.add_argument("--calibrate", type=int, default=0, metavar="WINDOWS",
                   help="also calibrate the fixed cost per stage on the 2 workers, in this many interleaved "
                        "windows (default 0: not)")
    p.add_argument("--out", default="results/pipeline_latency.csv", help="CSV path")
    p.set_defaults(func=cmd_latency)

    p = bench_sub.add_parser("pipeline-throughput", help="pipelined vs sequential throughput, 2 pinned workers")
    p.add_argument("--model", required=True, help="Llama checkpoint directory")
    p.add_argument("--micro-batches", type=int, default=4, help="K (default 4)")
    p.add_argument("--micro-batch-size", type=int, default=1, help="prompts per micro-batch (default 1)")
    p.add_argument("--tokens", type=int, default=32, help="tokens per micro-batch (default 32)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats (default 3)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="predict without the runtime's measured fixed costs (the paper's model only)")
    p.add_argument("--out", default="results/pipeline_throughput.csv", help="CSV path")
    p.set_defaults(func=cmd_throughput)

    p = bench_sub.add_parser("wire", help="loopback throughput of the wire for large tensors (GB/s)")
    p.add_argument("--mb", type=int, default=64, help="tensor size in MiB (default 64)")
    p.add_argument("--repeats", type=int, default=10, help="frames of each kind after one warm-up (default 10)")
    p.add_argument("--out", default="results/wire.csv", help="CSV path")
    p.set_defaults(func=cmd_wire)

    p = bench_sub.add_parser("testbed-prediction",
                             help="measured latency/throughput on a testbed vs the planner's prediction "
                                  "(calibrated fixed costs) and the paper's model")
    p.add_argument("--testbed", default="auto", choices=list(TESTBEDS),
                   help="auto (default): testbed/emulated.yaml when root with sshd and cgroup v1, else the local one")
    p.add_argument("--model", default="", help="a Llama checkpoint folder, a model name or 'tiny' (default: "
                                               "SmolLM2-135M-Instruct, converted once into the cache folder)")
    p.add_argument("--cloud-mbps", default="2,20,200", help="cloud link bandwidths swept (default 2,20,200)")
    p.add_argument("--methods", default="", help="comma-separated methods (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens per generation (default 16)")
    p.add_argument("--micro-batches", type=int, default=3,
                   help="K: micro-batches of the pipelined runs, the same for every method (default 3)")
    p.add_argument("--repeats", type=int, default=3, help="measured generations per plan, interleaved (default 3)")
    p.add_argument("--root", default="results", help="where the run folder goes (default results)")
    p.add_argument("--out", default="results/testbed_prediction.csv", help="CSV written")
    p.set_defaults(func=cmd_testbed_prediction)
