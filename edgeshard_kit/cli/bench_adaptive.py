"""`edgeshard bench adaptive`: re-planning while serving on the emulated testbed (bench/adaptive.py), printed and CSV."""

from __future__ import annotations

import argparse
import statistics

from edgeshard_kit.bench.adaptive import TARGET_RATIO, bench_adaptive
from edgeshard_kit.core.io import write_rows


def _spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.3f} (min {min(values):.3f}, max {max(values):.3f}, n={len(values)})"


def cmd_adaptive(args: argparse.Namespace) -> int:
    """Run both scenarios; one line per run (bench_adaptive logs them), the verdicts, then the CSV."""
    rows, run_path = bench_adaptive(args.model, args.high_mbps, args.throttle_mbps, args.tokens, args.switch_at, args.kill_at,
                                    args.prompt_len, args.repeats, args.tolerance, args.profile or None, args.root,
                                    log=print)
    adaptive = [r for r in rows if r.get("scenario") == "throttle" and r.get("run") == "adaptive"]
    for mbps in sorted({r["throttle_mbps"] for r in adaptive}, reverse=True):
        here = [r for r in adaptive if r["throttle_mbps"] == mbps]
        ratios = [r["ratio"] for r in here if r.get("ratio") is not None]
        moved = sum(1 for r in here if r["switches"])
        agree = sum(1 for r in here if r["new_plan"] == r["planner_plan"])
        print(f"throttle to {mbps:g} Mbps: re-planned in {moved} of {len(here)} runs (the plan held at the end is "
              f"the planner's choice in {agree}: {here[0]['planner_plan']}); per-token latency after the throttle / "
              f"fresh deployment of that plan: {_spread(ratios) if ratios else 'n/a'} [target within "
              f"{1 - TARGET_RATIO:.2f}..{1 + TARGET_RATIO:.2f}]")
    kills = [r for r in rows if r.get("scenario") == "kill"]
    pauses = [r["pause_ms"] for r in kills if r.get("pause_ms") is not None]
    print(f"kill: completed {sum(1 for r in kills if r['tokens_match'])} of {len(kills)} runs with identical tokens; "
          f"pause (ms) {_spread(pauses) if pauses else 'n/a'}")
    print(f"tokens identical to one-device generation in every run: "
          f"{all(r['tokens_match'] for r in rows if 'tokens_match' in r)}")
    print(f"wrote {write_rows(rows, args.out)} (run folder {run_path}: events, per-token records, timeline figure)")
    return 0


def add_bench_parsers(bench_sub) -> None:
    """Register `edgeshard bench adaptive`."""
    p = bench_sub.add_parser("adaptive", help="adaptive serving on the emulated testbed (root): a throttled cloud "
                                              "link re-plans; a SIGKILLed worker resumes on the others")
    p.add_argument("--model", default="", help="checkpoint folder or model name (default: SmolLM2-135M-Instruct)")
    p.add_argument("--high-mbps", type=float, default=200.0, help="cloud links before the throttle (default 200)")
    p.add_argument("--throttle-mbps", default="2,auto",
                   help="cloud links after the throttle, one scenario each (default 2,auto); auto: the highest of "
                        "2, 1, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01 Mbps at which the planner moves away from the plan at --high-mbps")
    p.add_argument("--tokens", type=int, default=200, help="tokens per generation (default 200)")
    p.add_argument("--switch-at", type=int, default=60, help="throttle after this many tokens (default 60)")
    p.add_argument("--kill-at", type=int, default=60, help="SIGKILL the last stage after this many tokens (default 60)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
    p.add_argument("--repeats", type=int, default=2, help="repeats of each scenario, alternating (default 2)")
    p.add_argument("--tolerance", type=float, default=0.1, help="re-plan tolerance (default 0.1)")
    p.add_argument("--profile", action="append", default=[],
                   help="profile JSON per device type (repeatable; default: measured on the testbed first)")
    p.add_argument("--root", default="results", help="where the run folder goes (default results)")
    p.add_argument("--out", default="results/adaptive.csv", help="CSV written (default results/adaptive.csv)")
    p.set_defaults(func=cmd_adaptive)
