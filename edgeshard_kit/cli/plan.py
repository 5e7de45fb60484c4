"""The `edgeshard plan` command and `edgeshard bench solver` (solver speed on paper-sized problems)."""

from __future__ import annotations

import json
import math
import random
import time

from edgeshard_kit.core.units import KitError


def _problem(args):
    from edgeshard_kit.planning.problem import load_problem
    from edgeshard_kit.planning.build import problem_from_args

    if args.problem:
        return load_problem(args.problem)
    return problem_from_args(args)


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def cmd_plan(args) -> int:
    from edgeshard_kit.planning.baselines import baselines, pareto, solve_constrained, solve_for_micro_batches
    from edgeshard_kit.planning.problem import load_plan, save_plan, save_problem, solve
    from edgeshard_kit.planning.schedule import evaluate, format_evaluation

    if args.micro_batches < 1 or args.tokens < 1:
        raise KitError("--micro-batches and --tokens must be >= 1")
    if args.batch is None:
        args.batch = args.micro_batches
    problem = _problem(args)
    if args.dump_problem:
        path = save_problem(problem, args.dump_problem)
        print(f"wrote {path}: {problem.n_units} units, {len(problem.devices)} devices")
        if not (args.out or args.evaluate or args.json or args.baselines or args.pareto):
            return 0
    if args.pareto:
        front = pareto(problem, tuple(int(k) for k in args.pareto.split(",")), tokens=args.tokens)
        if args.json:
            print(json.dumps(_jsonable(front), indent=1))
        else:
            for r in front:
                devs = ",".join(dict.fromkeys(s["device"] for s in r["stages"]))
                print(f"  {r['latency_ms']:10.3f} ms/token  {r['throughput_per_s']:9.2f} tokens/s  "
                      f"K={r['micro_batches']:<3} devices {devs}")
        return 0
    if args.evaluate:
        plan = load_plan(args.evaluate)
    elif args.max_latency_ms is not None:
        plan = solve_constrained(problem, max_latency_ms=args.max_latency_ms)
    elif args.fit_micro_batches:
        plan = solve_for_micro_batches(problem, args.micro_batches)
    else:
        plan = solve(problem, args.objective, relay=args.relay)
    ev = evaluate(problem, plan, args.micro_batches, args.tokens)
    if args.out:
        save_plan(plan, args.out)
    plans = [ev]
    if args.baselines:
        plans += [evaluate(problem, b, args.micro_batches, args.tokens) for b in baselines(problem, args.objective)]
    if args.json:
        keep = ev if not args.baselines else {"plan": ev, "baselines": plans[1:]}
        if not args.timeline:
            for e in plans:
                e.pop("timeline_bubbles", None), e.pop("timeline_no_bubbles", None)
        print(json.dumps(_jsonable(keep), indent=1))
    else:
        for e in plans:
            print(format_evaluation(e))
        if args.out:
            print(f"wrote {args.out}")
    return 0


def add_plan_command(sub) -> None:
    p = sub.add_parser("plan", help="choose devices and layer ranges (exact DP), evaluate plans and baselines")
    p.add_argument("--problem", help="problem JSON (units, devices, links, return_bytes)")
    p.add_argument("--profiles", help="comma-separated profile JSON files (one per device type), with --testbed")
    p.add_argument("--testbed", help="testbed inventory YAML, with --profiles")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--gen-tokens", type=int, default=96, help="generated tokens (default 96)")
    p.add_argument("--batch", type=int, default=None, help="sequences in all (default: one per micro-batch)")
    p.add_argument("--phase", choices=("decode", "prefill"), default="decode", help="which step unit_ms times")
    p.add_argument("--dump-problem", metavar="OUT.json", help="write the problem built from profiles + testbed")
    p.add_argument("--objective", choices=("latency", "throughput"), default="latency")
    p.add_argument("--relay", action="store_true", help="a device may run several non-contiguous stages")
    p.add_argument("--micro-batches", type=int, default=1, help="micro-batches in flight (timeline, workload)")
    p.add_argument("--tokens", type=int, default=8, help="tokens per micro-batch in the simulated timeline")
    p.add_argument("--max-latency-ms", type=float, help="best throughput with per-token latency <= this")
    p.add_argument("--fit-micro-batches", action="store_true",
                   help="best throughput with exactly --micro-batches in flight (short pipelines for few)")
    p.add_argument("--evaluate", metavar="PLAN.json", help="evaluate this plan instead of solving")
    p.add_argument("--baselines", action="store_true", help="also evaluate Edge-Solo, Cloud-Edge-*, memory-prop.")
    p.add_argument("--pareto", metavar="K1,K2", help="latency/throughput Pareto frontier for these micro-batch counts")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--timeline", action="store_true", help="with --json: include the timeline records")
    p.add_argument("--out", metavar="PLAN.json", help="write the plan")
    p.set_defaults(func=cmd_plan)


# ---- solver benchmark ------------------------------------------------------------------------------

def _synthetic(n_units: int, types: list[tuple[str, int, float, float]], mbps_cloud: float, seed: int = 0):
    """A problem with `types` = (name, count, ms per layer, memory GB); distinct types get jittered times."""
    from edgeshard_kit.planning.problem import problem_from_dict

    rng = random.Random(seed)
    units = [{"name": f"u{u}", "mem_bytes": 0.754e9 if 0 < u < n_units - 1 else 0.488e9, "out_bytes": 65536}
             for u in range(n_units)]
    devices = []
    for name, count, ms, mem in types:
        base = [ms * (0.12 if u in (0, n_units - 1) else 1.0) * rng.uniform(0.9, 1.1) for u in range(n_units)]
        for i in range(count):
            devices.append({"name": f"{name}{i}", "memory_bytes": mem * 1e9, "source": not devices,
                            "cloud": name == "cloud", "unit_ms": base})
    pairs = [{"src": a["name"], "dst": b["name"], "mbps": mbps_cloud, "latency_ms": 2.1}
             for a in devices for b in devices if a is not b and "cloud" in (a["name"][:5], b["name"][:5])]
    return problem_from_dict({"units": units, "devices": devices, "return_bytes": 4,
                              "links": {"default": {"mbps": 1000, "latency_ms": 2.1}, "pairs": pairs}})


def _distinct(n_units: int, n_dev: int, seed: int = 1):
    """n_dev pairwise-distinct devices (different speeds and memories)."""
    rng = random.Random(seed)
    return _synthetic(n_units, [(f"dev{i}x", 1, rng.uniform(1, 8), rng.uniform(4, 30)) for i in range(n_dev)], 50)


def bench_solver(out: str = "results/solver_bench.csv", repeats: int = 3) -> list[dict]:
    """Time the solvers on paper-sized problems; write a CSV (median of repeats, ms)."""
    from edgeshard_kit.planning import dp
    from edgeshard_kit.planning.problem import solve

    cases = [
        ("latency", "80 layers x 16 devices (12 AGX-like + 3 NX-like + 1 cloud: 3 types)",
         _synthetic(82, [("agx", 12, 5.3, 29), ("nx", 3, 6.0, 14), ("cloud", 1, 0.8, 22)], 10)),
        ("latency", "80 layers x 16 devices (4 types of 4)",
         _synthetic(82, [("a", 4, 5.3, 29), ("b", 4, 6.0, 14), ("c", 4, 3.0, 8), ("cloud", 4, 0.8, 22)], 10)),
        ("throughput", "paper testbed: 34 units x 15 devices (12 AGX + 2 NX + 1 RTX 3090: 3 types)",
         _synthetic(34, [("agx", 12, 5.3, 29), ("nx", 2, 6.0, 14), ("cloud", 1, 0.8, 22)], 10)),
        ("latency", "34 units x 12 pairwise-distinct devices (2^12 device sets)", _distinct(34, 12)),
        ("throughput", "34 units x 12 pairwise-distinct devices (2^12 device sets)", _distinct(34, 12)),
    ]
    rows = []
    for objective, what, problem in cases:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            plan = solve(problem, objective)
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        rows.append({"objective": objective, "problem": what, "units": problem.n_units,
                     "devices": len(problem.devices), "types": len(dp.device_types(problem)),
                     "min_ms": round(times[0], 2), "median_ms": round(times[len(times) // 2], 2),
                     "max_ms": round(times[-1], 2), "plan_devices": len(plan.devices),
                     "value_ms": round(plan.latency_ms if objective == "latency" else plan.bottleneck_ms, 3)})
        print(f"{objective:<10} {rows[-1]['median_ms']:9.2f} ms (min {rows[-1]['min_ms']}, max {rows[-1]['max_ms']})"
              f"  {what}")
    from edgeshard_kit.experiments.results import write_rows
    print(f"wrote {write_rows(rows, out)}")
    return rows


def add_solver_bench(bench_sub) -> None:
    p = bench_sub.add_parser("solver", help="planner speed: latency and throughput DPs on paper-sized problems")
    p.add_argument("--out", default="results/solver_bench.csv")
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(func=lambda a: bench_solver(a.out, a.repeats) and 0)
