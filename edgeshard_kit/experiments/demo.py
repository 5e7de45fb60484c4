"""`edgeshard demo`: the full experiment (experiment.demo); `--split-only`: a local 3-stage split checked against one stage."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgeshard_kit.model.checkpoint import load_llama_config, write_tiny_checkpoint
from edgeshard_kit.model.generate import generate_split, print_result
from edgeshard_kit.core.units import n_units

DEMO_MODEL = Path("results/demo-model")
DEMO_PROMPTS = ["Edge devices share the work of a language model", "The network link between two boards"]


def three_way_split(total: int) -> list[tuple[int, int]]:
    """Cut [0, total) into 3 contiguous stages of near-equal size."""
    a, b = total // 3, 2 * total // 3
    return [(0, a), (a, b), (b, total)]


def run_demo(model: str | Path = DEMO_MODEL, max_new_tokens: int = 16) -> bool:
    """Run the demo; returns whether the 3-stage tokens equal the one-stage tokens."""
    model = Path(model)
    if not (model / "config.json").is_file():
        print(f"creating a tiny Llama checkpoint in {model} ...")
        write_tiny_checkpoint(model)
    config = load_llama_config(model)
    total = n_units(config.num_hidden_layers)
    split = three_way_split(total)
    print(f"model {model}: {config.num_hidden_layers} decoder layers = {total} units; split {split}")
    res = generate_split(model, split, prompts=DEMO_PROMPTS, max_new_tokens=max_new_tokens)
    print_result(res)
    ref = generate_split(model, None, prompts=DEMO_PROMPTS, max_new_tokens=max_new_tokens)
    same = ref.tokens == res.tokens
    print(f"one stage gives {'the same' if same else 'DIFFERENT'} tokens as the 3-stage split "
          f"(one stage: per token median {sorted(ref.per_token_ms)[len(ref.per_token_ms) // 2]:.2f} ms)")
    return same


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.split_only:
        return 0 if run_demo(args.model, args.max_new_tokens) else 1
    from edgeshard_kit.experiments.benchmark import demo  # the full experiment: profile, plan, deploy, benchmark

    demo(root=args.root, cloud_mbps=args.cloud_mbps, testbed=args.testbed)
    return 0


def add_commands(sub) -> None:
    """Register `edgeshard demo`."""
    p = sub.add_parser("demo", help="the full experiment on a tiny checkpoint: testbed up, profile, plan, deploy, "
                                     "benchmark vs baselines, results folder")
    p.add_argument("--model", default=str(DEMO_MODEL), help=f"checkpoint directory (created if missing; default {DEMO_MODEL})")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate with --split-only (default 16)")
    p.add_argument("--split-only", action="store_true", help="only the local 3-stage split check (no experiment)")
    p.add_argument("--root", default="results", help="where the experiment's run folder goes (default results)")
    p.add_argument("--cloud-mbps", default="2,20,200", help="cloud link bandwidths swept (default 2,20,200)")
    p.add_argument("--testbed", default="auto", choices=["auto", "emulated", "local"],
                   help="auto (default): the emulated testbed when root with sshd and cgroup v1, else local")
    p.set_defaults(func=_cmd_demo)
