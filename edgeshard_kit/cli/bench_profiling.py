"""`edgeshard bench` of the model and profiling layers: overhead, decode-speed, profile-check, analytic-vs-paper,
analytic-calibration."""

from __future__ import annotations

import argparse
import statistics
import sys

from edgeshard_kit.bench.analytic import analytic_calibration, analytic_vs_paper
from edgeshard_kit.bench.decode_speed import FIELDS as SPEED_FIELDS, IMPLS, bench_decode_speed, summarize
from edgeshard_kit.bench.overhead import FIELDS, measure_overhead, overhead_ratio
from edgeshard_kit.bench.profile_check import profile_check, ratio_summary
from edgeshard_kit.core.io import write_rows
from edgeshard_kit.profiling.measure import decode_read_bytes, measure_bandwidth


def _cmd_overhead(args: argparse.Namespace) -> int:
    rows = measure_overhead(args.model, tokens=args.tokens, repeats=args.repeats, dtype=args.dtype, device=args.device,
                            threads=args.threads)
    path = write_rows(rows, args.out, FIELDS)
    limit = _limit_ms(args.model, args.dtype, args.device)
    for impl in ("kit", "transformers"):
        meds = [r["decode_ms_median"] for r in rows if r["impl"] == impl]
        print(f"{impl:>12}: decode ms/token min {min(meds):.2f} median {statistics.median(meds):.2f} max {max(meds):.2f}"
              f" = {statistics.median(meds) / limit:.2f}x the memory-bandwidth limit {limit:.2f} ms")
    print(f"ratio kit/transformers (median decode ms/token): {overhead_ratio(rows):.3f}  "
          f"({rows[0]['param_bytes'] / 1e6:.0f} MB of weights, {args.repeats} repeats x {args.tokens} tokens) -> {path}")
    return 0


def _limit_ms(model: str, dtype: str, device: str) -> float:
    """weight bytes a decode step of `model` reads / this device's memory bandwidth, in ms (measured now)."""
    return decode_read_bytes(model, dtype) / (measure_bandwidth(device) * 1e9) * 1e3


def speed_table(rows: list[dict]) -> str:
    """decode-speed's summary as a Markdown table (the README's speed section)."""
    lines = ["| what | ms/token min / median / max | x limit (min..max) | compile s |", "|---|---|---|---|"]
    for r in summarize(rows):
        comp = f"{r['compile_s']:.0f}" if r["compile_s"] else ""
        same = "" if r["same_tokens"] else " (tokens differ)"
        lines.append(f"| {r['impl']}{same} | {r['ms_min']:.1f} / {r['ms_median']:.1f} / {r['ms_max']:.1f} | "
                     f"{r['ratio_to_limit']:.2f} ({r['ratio_min']:.2f}..{r['ratio_max']:.2f}) | {comp} |")
    return "\n".join(lines)


def _cmd_decode_speed(args: argparse.Namespace) -> int:
    """Run every path alternating, write the rows, print the summary table."""
    impls = tuple(i.strip() for i in args.impls.split(",") if i.strip()) if args.impls else IMPLS
    rows = bench_decode_speed(args.model, tokens=args.tokens, repeats=args.repeats, dtype=args.dtype,
                              device=args.device, threads=args.threads, impls=impls,
                              log=lambda m: print(m, file=sys.stderr, flush=True))
    path = write_rows(rows, args.out, SPEED_FIELDS)
    print(speed_table(rows))
    bw = [r["mem_bw_gbs"] for r in rows if r["impl"] == "limit"] or [rows[0]["mem_bw_gbs"]]
    print(f"memory bandwidth {min(bw):.1f}..{max(bw):.1f} GB/s, {rows[0]['weight_bytes'] / 1e6:.0f} MB of weights, "
          f"{args.threads} thread(s), {args.repeats} repeats x {args.tokens} tokens -> {path}")
    return 0


def _cmd_profile_check(args: argparse.Namespace) -> int:
    """Print predicted/measured per round and the median ratio; write the rows."""
    rows = profile_check(args.model, device=args.device, dtype=args.dtype, repeats=args.repeats,
                         rounds=args.rounds, new_tokens=args.new_tokens, prompt_len=args.prompt_len,
                         threads=args.threads)
    limit = _limit_ms(args.model, args.dtype, args.device)
    for r in rows:
        print(f"round {r['round']}: measured {r['measured_ms']:.2f} ms/token ({r['measured_ms'] / limit:.2f}x the "
              f"memory-bandwidth limit {limit:.2f} ms), predicted {r['predicted_ms']:.2f} "
              f"(units {r['units_only_ms']:.2f} + step overhead {r['decode_step_overhead_ms']:.2f}), "
              f"ratio {r['ratio']:.3f} (units only {r['ratio_units_only']:.3f})")
    s = ratio_summary(rows)
    print(f"predicted/measured over all rounds (sum/sum): {s['sum_ratio']:.3f}")
    print(f"predicted/measured: median {s['median_ratio']:.3f} (min {s['min_ratio']:.3f}, max {s['max_ratio']:.3f}) "
          f"over {s['rounds']} rounds")
    print(f"wrote {write_rows(rows, args.out)}")
    return 0


def markdown_table(rows: list[dict]) -> str:
    """The analytic-vs-paper comparison as a Markdown table (for docs/profiling.md)."""
    head = ["device type", "measured ms/token", "analytic uncalibrated", "error %", "analytic calibrated",
            "error %", "memory eff.", "unit overhead ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['device_type']} | {r['measured_ms']:.2f} | {r['analytic_uncalibrated_ms']:.2f} | "
                     f"{r['uncalibrated_error_pct']:+.1f} | {r['analytic_calibrated_ms']:.2f} | "
                     f"{r['calibrated_error_pct']:+.1f} | {r['memory_eff']:.2f} | {r['unit_overhead_ms']:.3f} |")
    return "\n".join(lines)


def _cmd_analytic_vs_paper(args: argparse.Namespace) -> int:
    """Print the table and write the CSV."""
    rows = analytic_vs_paper()
    out = write_rows(rows, args.out)
    print(markdown_table(rows))
    print(f"wrote {out}")
    return 0


def _cmd_analytic_calibration(args: argparse.Namespace) -> int:
    """Calibrate the roofline on one checkpoint, predict another; print both directions and write the rows."""
    rows = analytic_calibration(args.small, args.large, repeats=args.repeats, threads=args.threads)
    r0 = rows[0]
    print(f"this-machine: {r0['mem_bw_gbs']:.1f} GB/s, {r0['peak_gflops_float32']:.1f} GFLOP/s float32 (measured)")
    for r in rows:
        print(f"calibrated on {r['calibrated_on']} (fit error {r['fit_error_pct']:.1f}%), predicting {r['predicted']}: "
              f"measured {r['measured_ms']:.2f} ms/token, calibrated {r['calibrated_ms']:.2f} "
              f"({r['calibrated_error_pct']:+.1f}%), uncalibrated {r['uncalibrated_ms']:.2f} "
              f"({r['uncalibrated_error_pct']:+.1f}%)")
    print(f"wrote {write_rows(rows, args.out)}")
    return 0


def add_bench_parsers(bench_sub) -> None:
    """Register `edgeshard bench profile-check`, `analytic-vs-paper`, `analytic-calibration` and `overhead`."""
    b = bench_sub.add_parser("profile-check", help="profile's predicted decode ms/token vs measured generate_split")
    b.add_argument("--model", required=True, help="checkpoint directory (decode step >= 20 ms for a fair check)")
    b.add_argument("--device", default="cpu")
    b.add_argument("--dtype", default="float32")
    b.add_argument("--repeats", type=int, default=5, help="timed repeats per profile figure and round")
    b.add_argument("--rounds", type=int, default=7, help="alternating profile / generate rounds (median ratio)")
    b.add_argument("--new-tokens", type=int, default=12, help="tokens generated per measured run")
    b.add_argument("--prompt-len", type=int, default=32)
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--out", default="results/profile_check.csv")
    b.set_defaults(func=_cmd_profile_check)

    a = bench_sub.add_parser("analytic-vs-paper", help="roofline vs the paper's measured Llama2-7B decode times")
    a.add_argument("--out", default="results/analytic_vs_paper.csv")
    a.set_defaults(func=_cmd_analytic_vs_paper)

    c = bench_sub.add_parser("analytic-calibration", help="calibrate on one measured checkpoint, predict another")
    c.add_argument("--small", required=True, help="checkpoint to measure and calibrate on")
    c.add_argument("--large", required=True, help="checkpoint to measure and predict")
    c.add_argument("--repeats", type=int, default=5)
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--out", default="results/analytic_calibration.csv")
    c.set_defaults(func=_cmd_analytic_calibration)

    d = bench_sub.add_parser("decode-speed", help="per-token decode vs the memory-bandwidth limit: transformers and "
                                                  "the kit (one process, 2 workers), eager and compiled")
    d.add_argument("--model", required=True, help="Llama checkpoint directory (e.g. the converted SmolLM2)")
    d.add_argument("--tokens", type=int, default=32, help="new tokens per run (default 32)")
    d.add_argument("--repeats", type=int, default=5, help="alternating rounds of every path (default 5)")
    d.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    d.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    d.add_argument("--threads", type=int, default=1, help="torch threads of every path and worker (default 1)")
    d.add_argument("--impls", default=None, help=f"comma-separated subset of {','.join(IMPLS)} (default all)")
    d.add_argument("--out", default="results/decode_speed.csv", help="CSV written (default results/decode_speed.csv)")
    d.set_defaults(func=_cmd_decode_speed)

    p = bench_sub.add_parser("overhead", help="per-token decode time of the kit's one-stage path vs transformers")
    p.add_argument("--model", required=True, help="Llama checkpoint directory")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per run (default 32)")
    p.add_argument("--repeats", type=int, default=5, help="alternating runs of each (default 5)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="results/overhead_bench.csv", help="CSV written (default results/overhead_bench.csv)")
    p.set_defaults(func=_cmd_overhead)
