"""The `edgeshard demo` command: the full experiment on SmolLM2-135M-Instruct, or (`--split-only`) the 3-stage split check."""

from __future__ import annotations

import statistics
import time

from edgeshard_kit.cli.main import COMMANDS
from edgeshard_kit.experiments.demo import demo, demo_config, latency_sanity, split_check
from edgeshard_kit.model.generate import format_result


def _split_only(args) -> int:
    check = split_check(args.model, args.max_new_tokens, log=print)
    print(format_result(check.result))
    per_token = sorted(check.reference.per_token_ms)
    median = f"{statistics.median(per_token):.2f} ms" if per_token else "n/a"
    print(f"one stage gives {'the same' if check.same else 'DIFFERENT'} tokens as the 3-stage split "
          f"(one stage: per token median {median})")
    return 0 if check.same else 1


def _cmd_demo(args) -> int:
    if args.split_only:
        return _split_only(args)
    import pandas as pd

    t0 = time.perf_counter()

    def log(line: str) -> None:  # each step with the minutes:seconds since the start: where the time goes
        m, sec = divmod(int(time.perf_counter() - t0), 60)
        print(f"[{m:d}:{sec:02d}] {line}", flush=True)

    out = demo(demo_config(cloud_mbps=args.cloud_mbps, model_path=args.model), root=args.root,
               testbed=args.testbed, log=log)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print("\n" + out.summary.to_string(index=False))
    print("\nmeasured columns: min / median / max of the interleaved repeats; every method at K = "
          f"{out.tables['measurements'].micro_batches.max():g} micro-batches")
    for line in latency_sanity(out.summary):
        print(line)
    m = out.tables["measurements"]
    ok = m[(m.source == "measured") & (m.status == "ok")]
    print(f"\nall measured tokens equal one-device generation: {bool(ok.tokens_match.all())} ({len(ok)} runs)")
    print(f"results (manifest, CSVs, HTML figures): {out.path}   [{time.perf_counter() - t0:.0f} s]")
    print(f"look at them with: edgeshard results show {out.path.name}")
    return 0


def add_parsers(sub) -> None:
    """Register `edgeshard demo`."""
    p = sub.add_parser("demo", help=COMMANDS["demo"][1])
    p.add_argument("--model", default="",
                   help="a Llama checkpoint folder; 'tiny': a tiny random one; default: SmolLM2-135M-Instruct, "
                        "converted once into the cache folder (edgeshard fetch-model), else a tiny random one")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate with --split-only (default 16)")
    p.add_argument("--split-only", action="store_true", help="only the local 3-stage split check (no experiment)")
    p.add_argument("--root", default="results", help="where the experiment's run folder goes (default results)")
    p.add_argument("--cloud-mbps", default="2,20,200", help="cloud link bandwidths swept (default 2,20,200)")
    p.add_argument("--testbed", default="auto", choices=["auto", "emulated", "local"],
                   help="auto (default): the emulated testbed when root with sshd and cgroup v1, else local")
    p.set_defaults(func=_cmd_demo)
