"""`edgeshard bench peer-llamacpp`: the kit's per-token decode beside llama.cpp's (bench/peer_llamacpp.py), printed
and CSV; one line and a 'skipped' row (exit 0) when llama.cpp cannot be built here."""

from __future__ import annotations

import argparse
import sys

from edgeshard_kit.bench import llamacpp
from edgeshard_kit.bench.peer_llamacpp import FIELDS, IMPLS, bench_peer_llamacpp, check_args, skipped_rows, summarize
from edgeshard_kit.core.io import write_rows


def cmd_peer_llamacpp(args: argparse.Namespace) -> int:
    """Build (once) and measure, alternating; print the per-impl table and the ratios; write the rows."""
    check_args(args.tokens, args.repeats, args.threads, args.jobs)
    impls = tuple(i.strip() for i in args.impls.split(",") if i.strip()) if args.impls else IMPLS
    try:
        rows = bench_peer_llamacpp(args.model, args.tokens, args.repeats, args.threads, args.llamacpp_version,
                                   args.cache_dir or None, not args.no_build, args.jobs, impls, args.root,
                                   log=lambda m: print(m, file=sys.stderr, flush=True))
    except llamacpp.LlamaCppUnavailable as e:
        path = write_rows(skipped_rows(str(e), args.model, args.llamacpp_version), args.out, FIELDS)
        print(f"bench peer-llamacpp: skipped: {e} (wrote {path})")
        return 0
    path = write_rows(rows, args.out, FIELDS)
    per_impl, ratios = summarize(rows)
    print(f"{'what':>16} | decode ms/token min / median / max (runs)")
    for r in per_impl:
        print(f"{r['impl']:>16} | {r['ms_min']:.2f} / {r['ms_median']:.2f} / {r['ms_max']:.2f} ({r['runs']})")
    for r in ratios:
        print(f"{r['ratio']}: median {r['median']:.3f} (min {r['min']:.3f}, max {r['max']:.3f}, n={r['n']})")
    print(f"{args.threads} thread(s) per process, {args.repeats} repeats x {args.tokens} tokens, alternating; "
          f"llama.cpp of llama-cpp-python {args.llamacpp_version} (build {rows[0]['llamacpp_build'] or '?'}) -> {path}")
    return 0


def add_bench_parsers(bench_sub) -> None:
    """Register `edgeshard bench peer-llamacpp`."""
    p = bench_sub.add_parser("peer-llamacpp", help="per-token decode of the kit (one process, 2 workers) beside "
                                                   "llama.cpp (one process, 1 and 2 RPC servers); optional: skips "
                                                   "when llama.cpp cannot be built")
    p.add_argument("--model", default="", help="checkpoint folder or model name (default: SmolLM2-135M-Instruct)")
    p.add_argument("--tokens", type=int, default=64, help="decode steps per run (default 64)")
    p.add_argument("--repeats", type=int, default=5, help="alternating rounds of every impl (default 5)")
    p.add_argument("--threads", type=int, default=1, help="threads of every process (default 1)")
    p.add_argument("--impls", default=None, help=f"comma-separated subset of {','.join(IMPLS)} (default all)")
    p.add_argument("--llamacpp-version", default=llamacpp.VERSION,
                   help=f"llama-cpp-python sdist whose vendored llama.cpp is built (default {llamacpp.VERSION})")
    p.add_argument("--cache-dir", default="",
                   help=f"where llama.cpp builds live (default ${llamacpp.CACHE_ENV}, else "
                        "<kit cache>/llama.cpp); one folder per version")
    p.add_argument("--no-build", action="store_true", help="use an existing build only; skip when there is none")
    p.add_argument("--jobs", type=int, default=2, help="parallel compile jobs of the build (default 2)")
    p.add_argument("--root", default="results", help="where a 'tiny' model is written (default results)")
    p.add_argument("--out", default="results/peer_llamacpp.csv", help="CSV written (default results/peer_llamacpp.csv)")
    p.set_defaults(func=cmd_peer_llamacpp)
