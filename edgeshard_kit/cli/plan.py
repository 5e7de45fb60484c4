"""The `edgeshard plan` command (solve, evaluate, baselines, Pareto) and `edgeshard reproduce-paper`: parsing and printing."""

from __future__ import annotations

import argparse
import json
import math

from edgeshard_kit.cli.main import COMMANDS
from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.io import write_rows
from edgeshard_kit.experiments.paper import CLOUD_MBPS, COLUMNS, MODELS, reproduce, summary
from edgeshard_kit.planning.baselines import baselines, pareto, solve_constrained
from edgeshard_kit.planning.build import RETURNS, Workload, build_problem, load_profiles
from edgeshard_kit.planning.objectives import OBJECTIVES, solve_objective
from edgeshard_kit.planning.plan import load_plan, save_plan
from edgeshard_kit.planning.problem import Problem, load_problem, save_problem
from edgeshard_kit.planning.schedule import evaluate, format_evaluation
from edgeshard_kit.testbed.inventory import load_testbed


def problem_from_args(args: argparse.Namespace) -> Problem:
    """The problem of --problem FILE, or of the --profiles / --testbed / workload flags."""
    if args.problem:
        return load_problem(args.problem)
    if not args.profiles or not args.testbed:
        raise KitError("give --problem FILE.json, or --profiles P1.json,P2.json and --testbed FILE.yaml")
    profiles = load_profiles([p for p in args.profiles.split(",") if p.strip()])
    wl = Workload(prompt_len=args.prompt_len, gen_tokens=args.gen_tokens, batch=args.batch,
                  micro_batches=args.micro_batches, phase=args.phase)
    return build_problem(profiles, load_testbed(args.testbed), wl, returns=args.returns)


def _finite(x):
    """JSON has no infinity: inf and nan become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _print_pareto(front: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(_finite(front), indent=1))
        return
    for r in front:
        devs = ",".join(dict.fromkeys(s["device"] for s in r["stages"]))
        print(f"  {r['latency_ms']:10.3f} ms/token  {r['throughput_per_s']:9.2f} tokens/s  "
              f"K={r['micro_batches']:<3} devices {devs}")


def _numbers(text: str, flag: str, cast, minimum: float) -> list:
    """Comma-separated numbers of a flag; KitError naming the flag and the bad entry."""
    out = []
    for item in text.split(","):
        try:
            v = cast(item.strip())
        except ValueError:
            raise KitError(f"{flag}: {item.strip()!r} is not {'an integer' if cast is int else 'a number'}") from None
        if not v >= minimum or v != v or v == float("inf"):
            raise KitError(f"{flag}: {item.strip()} must be >= {minimum:g} and finite")
        out.append(v)
    return out


def cmd_plan(args: argparse.Namespace) -> int:
    """`edgeshard plan`: solve (or load) a plan, evaluate it (and the baselines), print text or JSON."""
    k_given = args.micro_batches is not None  # throughput means "at K micro-batches" only where K is given
    args.micro_batches = 1 if args.micro_batches is None else args.micro_batches
    if args.micro_batches < 1 or args.tokens < 1:
        raise KitError("--micro-batches and --tokens must be >= 1")
    if args.batch is None:
        args.batch = args.micro_batches
    problem = problem_from_args(args)
    if args.dump_problem:
        path = save_problem(problem, args.dump_problem)
        print(f"wrote {path}: {problem.n_units} units, {len(problem.devices)} devices")
        if not (args.out or args.evaluate or args.json or args.baselines or args.pareto):
            return 0
    if args.pareto:
        ks = tuple(int(k) for k in _numbers(args.pareto, "--pareto", int, minimum=1))
        _print_pareto(pareto(problem, ks, tokens=args.tokens), args.json)
        return 0
    if args.evaluate:
        plan = load_plan(args.evaluate)
    elif args.max_latency_ms is not None:
        plan = solve_constrained(problem, max_latency_ms=args.max_latency_ms)
    elif args.fit_micro_batches or (args.objective == "throughput" and k_given and not args.relay):
        plan = solve_objective(problem, "throughput", args.micro_batches)
    else:
        plan = solve_objective(problem, args.objective, relay=args.relay)
    try:
        evs = [evaluate(problem, plan, args.micro_batches, args.tokens)]
    except KitError as e:  # a plan file that does not fit the problem: name the file
        if not args.evaluate:
            raise
        raise KitError(f"{args.evaluate}: {e}") from None
    if args.out:
        save_plan(plan, args.out)
    if args.baselines:
        evs += [evaluate(problem, b, args.micro_batches, args.tokens) for b in baselines(problem, "latency" if args.objective == "latency" else "throughput")]
    if args.json:
        dicts = [e.to_dict(timelines=args.timeline) for e in evs]
        keep = dicts[0] if not args.baselines else {"plan": dicts[0], "baselines": dicts[1:]}
        print(json.dumps(_finite(keep), indent=1))
    else:
        for e in evs:
            print(format_evaluation(e))
        if args.out:
            print(f"wrote {args.out}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    """`edgeshard reproduce-paper`: simulate the paper's experiments, print the summary, write the CSV."""
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    mbps = tuple(_numbers(args.cloud_mbps, "--cloud-mbps", float, minimum=1e-9))
    if args.micro_batches is not None and args.micro_batches < 1:
        raise KitError(f"--micro-batches: {args.micro_batches} must be >= 1")
    rows = reproduce(models, mbps, tokens=args.tokens, micro_batches=args.micro_batches)
    p = write_rows(rows, args.out, COLUMNS)
    print(summary(rows))
    print(f"wrote {p} ({len(rows)} rows)")
    return 0


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help=COMMANDS["plan"][1])
    p.add_argument("--problem", help="problem JSON (units, devices, links, return_bytes)")
    p.add_argument("--profiles", help="comma-separated profile JSON files (one per device type), with --testbed")
    p.add_argument("--testbed", help="testbed inventory YAML, with --profiles")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--gen-tokens", type=int, default=96, help="generated tokens (default 96)")
    p.add_argument("--batch", type=int, default=None, help="sequences in all (default: one per micro-batch)")
    p.add_argument("--phase", choices=("decode", "prefill"), default="decode", help="which step unit_ms times")
    p.add_argument("--returns", choices=RETURNS, default="tokens",
                   help="what the last stage sends back: tokens (the runtime: 8 bytes a sequence, default) or "
                        "logits (the paper's model)")
    p.add_argument("--dump-problem", metavar="OUT.json", help="write the problem built from profiles + testbed")
    p.add_argument("--objective", choices=OBJECTIVES, default="latency",
                   help="latency (default); throughput: the most tokens/s with --micro-batches in flight; "
                        "throughput-steady: the paper's DP, the smallest bottleneck of a full pipeline")
    p.add_argument("--relay", action="store_true", help="a device may run several non-contiguous stages")
    p.add_argument("--micro-batches", type=int, default=None,
                   help="micro-batches in flight (timeline, workload; default 1); with --objective throughput the "
                        "plan is the best for this many")
    p.add_argument("--tokens", type=int, default=8, help="tokens per micro-batch in the simulated timeline")
    p.add_argument("--max-latency-ms", type=float, help="best throughput with per-token latency <= this")
    p.add_argument("--fit-micro-batches", action="store_true",
                   help="the same as --objective throughput (kept for old scripts)")
    p.add_argument("--evaluate", metavar="PLAN.json", help="evaluate this plan instead of solving")
    p.add_argument("--baselines", action="store_true", help="also evaluate Edge-Solo, Cloud-Edge-*, memory-prop.")
    p.add_argument("--pareto", metavar="K1,K2", help="latency/throughput Pareto frontier for these micro-batch counts")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--timeline", action="store_true", help="with --json: include the timeline records")
    p.add_argument("--out", metavar="PLAN.json", help="write the plan")
    p.set_defaults(func=cmd_plan)


def _add_reproduce(sub) -> None:
    p = sub.add_parser("reproduce-paper", help=COMMANDS["reproduce-paper"][1])
    p.add_argument("--out", default="results/paper_reproduction.csv")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--cloud-mbps", default=",".join(str(x) for x in CLOUD_MBPS), help="cloud link bandwidths")
    p.add_argument("--tokens", type=int, default=96, help="generated tokens per micro-batch in the timeline")
    p.add_argument("--micro-batches", type=int, default=None,
                   help="K: every method's throughput at K micro-batches (default per setting: the fewest that keep "
                        "every method's pipeline full)")
    p.set_defaults(func=cmd_reproduce)


def add_parsers(sub) -> None:
    """Register `edgeshard plan` and `edgeshard reproduce-paper`."""
    _add_plan(sub)
    _add_reproduce(sub)
