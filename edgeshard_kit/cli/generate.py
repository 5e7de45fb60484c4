"""`edgeshard generate`: split generation on this host (--split), or on a testbed's workers (--testbed: plan, deploy, run)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

from edgeshard_kit.cli.main import COMMANDS
from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.units import format_stages, n_units, parse_split
from edgeshard_kit.model.checkpoint import load_llama_config
from edgeshard_kit.model.generate import check_sampling, format_result, generate_split
from edgeshard_kit.planning.plan import Plan
from edgeshard_kit.runtime.adaptive import AdaptivePolicy
from edgeshard_kit.runtime.deployment import RunResult, deploy
from edgeshard_kit.planning.objectives import OBJECTIVES
from edgeshard_kit.profiling.measure import matching_profiles
from edgeshard_kit.runtime.quickplan import plan_for_run, prompt_workload
from edgeshard_kit.testbed.inventory import load_testbed


def parse_ids(text: str) -> list[int]:
    """"1,2,3" -> [1, 2, 3] (the --prompt-ids form)."""
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise KitError(f"--prompt-ids {text!r} is not a comma-separated list of integers") from None


def check_args(args: argparse.Namespace) -> None:
    """What both paths refuse before loading anything: sampling settings, token count, chat on token ids."""
    check_sampling(args.temperature, args.top_p)
    if args.max_new_tokens < 1:
        raise KitError(f"max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.chat and args.prompt is None:
        raise KitError("--chat needs --prompt text (the chat template applies to text), not --prompt-ids")


# ---- on this host -------------------------------------------------------------------------------------------
def run_local(args: argparse.Namespace) -> int:
    """The model split by --split (default one stage), every stage on this host."""
    check_args(args)
    total = n_units(load_llama_config(args.model).num_hidden_layers)
    ranges = parse_split(args.split, total) if args.split else [(0, total)]
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
              dtype=args.dtype, device=args.device, stop_at_eos=args.stop_at_eos, compile=args.compile)
    if args.prompt is not None:
        res = generate_split(args.model, ranges, prompts=args.prompt, chat=args.chat, **kw)
    else:
        res = generate_split(args.model, ranges, prompt_ids=[parse_ids(t) for t in args.prompt_ids], **kw)
    print(json.dumps(res.to_dict()) if args.json else format_result(res))
    return 0


# ---- on a testbed -------------------------------------------------------------------------------------------
def run_on_testbed(args: argparse.Namespace) -> int:
    """Check, plan for the real prompts (or load the plan), deploy, generate, tear down, print; with --keep,
    more prompts from stdin until EOF."""
    if args.split:
        raise KitError("--split and --testbed exclude each other (the plan decides the split)")
    check_args(args)
    tb = load_testbed(args.testbed)
    prompts: Any = args.prompt if args.prompt is not None else [parse_ids(t) for t in args.prompt_ids]
    if args.prompt_ids is not None and len({len(p) for p in prompts}) > 1:
        raise KitError("--prompt-ids of different lengths: give prompts as text, or ids of one length")
    k = args.micro_batches
    if k < 1 or k > len(prompts):
        raise KitError(f"--micro-batches {k} must be between 1 and the number of prompts ({len(prompts)})")
    # plan for what will run: the prompts' padded length (chat template applied), their number, the new tokens
    workload = prompt_workload(args.model, prompts, k, args.max_new_tokens, chat=args.chat)
    profiles = matching_profiles(args.profile, args.compile) if args.profile else None
    plan, problem = plan_for_run(args.model, tb, workload, args.dtype, args.objective, args.plan, profiles,
                                 compile=args.compile)
    mode = "pipelined" if k > 1 else "sequential"
    gen = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed, chat=args.chat,
               stop_at_eos=args.stop_at_eos)
    with deploy(plan, tb, args.model, dtype=args.dtype, device_map={d.name: args.device for d in tb.devices},
                problem=problem, compile=args.compile,
                adaptive=AdaptivePolicy(objective=args.objective) if args.adaptive else None) as dep:
        res = dep.generate(prompts, args.max_new_tokens, mode=mode, micro_batches=k, schedule=args.schedule, **gen)
        print_run(res, dep.plan, args.json)  # --adaptive: the plan it ended on (the events say how it got there)
        while args.keep:
            sys.stdout.flush()  # the answer is out before we wait for the next prompt
            line = sys.stdin.readline()
            if not line:  # EOF
                break
            try:
                res = dep.generate([line.rstrip("\n")], args.max_new_tokens, **gen)
            except KitError as e:
                if dep.closed:  # a worker failed: nothing left to serve
                    raise
                # refused before anything was sent (a prompt that encodes to nothing): say so, read the next one
                print(f"edgeshard: error: {e}", file=sys.stderr, flush=True)
                continue
            print_run(res, dep.plan, args.json)
    return 0


def print_run(res: RunResult, plan: Plan, as_json: bool) -> None:
    """One JSON object, or text + timings with the planner's prediction beside them."""
    if as_json:
        print(json.dumps({"plan": [s.to_dict() for s in plan.stages], **res.to_dict()}, default=str))
        return
    for i, toks in enumerate(res.tokens):
        text = f"{res.text[i]!r}  " if res.text else ""
        print(f"[{i}] {text}tokens={toks}")
    s, p = res.summary, res.prediction
    print(f"plan: {format_stages(plan.stages)}")
    for e in res.events:  # --adaptive: one line per re-plan event
        move = f"moved {e['old_plan']} -> {e['new_plan']}, pause {e['pause_ms']:.1f} ms" if e["moved"] else "stayed"
        print(f"  event at token {e['token']} ({e['cause']}): {move}; {e.get('reason') or e.get('error', '')}")
    pt = f"{s['per_token_ms']:.2f} ms" if s["per_token_ms"] is not None else "n/a"
    tput = p.get("throughput_no_bubbles_per_s", p.get("throughput_per_s", float("nan")))
    print(f"{s['mode']} (K={s['micro_batches']}, {s['schedule']}): prefill {s['prefill_ms']:.2f} ms, "
          f"per token {pt} (predicted {p.get('latency_ms', float('nan')):.2f} ms), "
          f"{s['tokens_per_s']:.2f} tokens/s (predicted {tput:.2f})")
    by: dict[int, list[dict]] = {}
    for r in res.per_stage:
        by.setdefault(r["stage"], []).append(r)
    for i, recs in sorted(by.items()):
        med = {k: statistics.median(r[k] for r in recs) for k in ("compute_ms", "send_ms", "recv_ms", "wait_ms")}
        pred = p.get("stage_compute_ms", [None] * (i + 1))
        pc = f" (predicted {pred[i]:.2f})" if i < len(pred) and pred[i] is not None else ""
        print(f"  stage {i} {recs[0]['device']}: compute {med['compute_ms']:.2f} ms{pc}, send {med['send_ms']:.2f}, "
              f"recv {med['recv_ms']:.2f}, wait {med['wait_ms']:.2f} ms; "
              f"{sum(r['bytes_in'] for r in recs)} bytes in, {sum(r['bytes_out'] for r in recs)} out")


def cmd_generate(args: argparse.Namespace) -> int:
    return run_on_testbed(args) if args.testbed else run_local(args)


def add_parsers(sub) -> None:
    """Register `edgeshard generate` (local options, then the distributed ones)."""
    p = sub.add_parser("generate", help=COMMANDS["generate"][1])
    p.add_argument("--model", required=True, help="Llama checkpoint directory")
    p.add_argument("--split", default=None,
                   help="half-open unit ranges covering [0, layers+2), e.g. 0:3,3:7,7:10 (default: one stage)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    src.add_argument("--prompt-ids", action="append", help="prompt token ids, e.g. 1,2,3 (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate (default 16)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), else sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--chat", action="store_true",
                   help="each prompt is a user message put through the checkpoint's chat template "
                        "(with the generation prompt); implies --stop-at-eos")
    p.add_argument("--stop-at-eos", action=argparse.BooleanOptionalAction, default=None,
                   help="stop a sequence at an end-of-sequence token of generation_config.json, pad it after "
                        "(default: on with --chat, else off)")
    p.add_argument("--compile", action="store_true",
                   help="compiled decode: a static KV cache sized for the prompt + new tokens and torch.compile of "
                        "each stage's decode step (CUDA graphs on GPU); the first decode step compiles (minutes on "
                        "CPU); with --testbed, plans on compiled profiles")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    g = p.add_argument_group("distributed (workers over TCP; see docs/runtime.md)")
    g.add_argument("--testbed", default=None, help="testbed inventory YAML: run the plan on its workers")
    g.add_argument("--plan", default=None, help="plan JSON (default: profile quickly and solve for --objective)")
    g.add_argument("--objective", default="latency", choices=list(OBJECTIVES),
                   help="objective when no --plan is given (default latency; throughput: the most tokens/s with "
                        "--micro-batches in flight; throughput-steady: the paper's full-pipeline bottleneck)")
    g.add_argument("--profile", action="append", default=None,
                   help="profile JSON per device type, for planning (default: a quick measurement on this host)")
    g.add_argument("--micro-batches", type=int, default=1, help="K > 1: pipelined generation of K micro-batches")
    g.add_argument("--schedule", default="no-bubbles", choices=["bubbles", "no-bubbles"],
                   help="pipelined schedule (default no-bubbles)")
    g.add_argument("--adaptive", action="store_true",
                   help="re-plan while generating: a link or stage that drifts from the plan's prediction, or a "
                        "worker that dies, moves the shards to the re-solved plan (see docs/adaptive.md)")
    g.add_argument("--keep", action="store_true",
                   help="keep the deployment after the first prompt: read more prompts from stdin until EOF")
    p.set_defaults(func=cmd_generate)
