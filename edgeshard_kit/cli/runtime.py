"""The runtime's commands: `generate --testbed` (plan, deploy, run, tear down) and the pipeline benchmarks."""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from typing import Any

from edgeshard_kit.runtime import wire
from edgeshard_kit.experiments.results import write_rows
from edgeshard_kit.core.units import KitError


def add_generate_args(p: argparse.ArgumentParser) -> None:
    """Add the distributed options to the `generate` parser (generate.py owns it)."""
    g = p.add_argument_group("distributed (workers over TCP; see docs/runtime.md)")
    g.add_argument("--testbed", default=None, help="testbed inventory YAML: run the plan on its workers")
    g.add_argument("--plan", default=None, help="plan JSON (default: profile quickly and solve for --objective)")
    g.add_argument("--objective", default="latency", choices=["latency", "throughput"],
                   help="objective when no --plan is given (default latency)")
    g.add_argument("--profile", action="append", default=None,
                   help="profile JSON per device type, for planning (default: a quick measurement on this host)")
    g.add_argument("--micro-batches", type=int, default=1, help="K > 1: pipelined generation of K micro-batches")
    g.add_argument("--schedule", default="no-bubbles", choices=["bubbles", "no-bubbles"],
                   help="pipelined schedule (default no-bubbles)")
    g.add_argument("--keep", action="store_true",
                   help="keep the deployment after the first prompt: read more prompts from stdin until EOF")


def quick_profiles(checkpoint: str, testbed: Any, dtype: str, batch: int, micro_batches: int, prompt_len: int,
                   gen_tokens: int, profiles: list[str] | None = None, threads: int = 1) -> dict:
    """Profiles by device type: given files, or one quick measurement on this host for every device type."""
    from edgeshard_kit.planning.build import load_profiles

    if profiles:
        return load_profiles(profiles)
    from edgeshard_kit.profiling.measure import measure_profile

    mbs = max(1, batch // micro_batches)
    p = measure_profile(checkpoint, dtype=dtype, batch=mbs, prompt_len=max(prompt_len, 1),
                        kv_lens=(max(prompt_len, 1) + max(gen_tokens, 1) // 2,), repeats=3, warmup=1,
                        progress=False, threads=threads)
    return {d.type: p for d in testbed.devices}  # local testbed: every device is this host


def quick_workload(batch: int, micro_batches: int, prompt_len: int, gen_tokens: int):
    """The workload of `batch` sequences in `micro_batches` (rounded to whole micro-batches)."""
    from edgeshard_kit.planning.build import Workload

    batch = max(batch, micro_batches) // micro_batches * micro_batches
    return Workload(prompt_len=max(prompt_len, 1), gen_tokens=gen_tokens, batch=batch, micro_batches=micro_batches)


def quick_problem(checkpoint: str, testbed: Any, dtype: str, batch: int, micro_batches: int, prompt_len: int,
                  gen_tokens: int, profiles: list[str] | None = None, threads: int = 1):
    """A planning problem: given profiles, or one quick measurement on this host for every device type."""
    from edgeshard_kit.planning.build import build_problem

    profs = quick_profiles(checkpoint, testbed, dtype, batch, micro_batches, prompt_len, gen_tokens, profiles, threads)
    return build_problem(profs, testbed, quick_workload(batch, micro_batches, prompt_len, gen_tokens))


def run_generate(args: argparse.Namespace) -> int:
    """`edgeshard generate --testbed ...`: plan (or load the plan), deploy, generate, tear down, print."""
    from edgeshard_kit.model.generate import _parse_ids
    from edgeshard_kit.runtime.deployment import deploy
    from edgeshard_kit.planning.problem import load_plan, solve
    from edgeshard_kit.testbed.inventory import load_testbed

    if args.split:
        raise KitError("--split and --testbed exclude each other (the plan decides the split)")
    if args.stop_at_eos:
        raise KitError("--stop-at-eos is not supported with --testbed (the pipeline generates --max-new-tokens)")
    tb = load_testbed(args.testbed)
    prompts: Any = args.prompt if args.prompt is not None else [_parse_ids(t) for t in args.prompt_ids]
    if args.prompt_ids is not None and len({len(p) for p in prompts}) > 1:
        raise KitError("--prompt-ids of different lengths: give prompts as text, or ids of one length")
    k = args.micro_batches
    if k < 1 or k > len(prompts):
        raise KitError(f"--micro-batches {k} must be between 1 and the number of prompts ({len(prompts)})")
    plen = 8 if args.prompt is not None else len(prompts[0])
    problem = None
    if args.plan:
        plan = load_plan(args.plan)
        if args.profile:
            problem = quick_problem(args.model, tb, args.dtype, len(prompts), k, plen, args.max_new_tokens,
                                    args.profile)
    else:
        problem = quick_problem(args.model, tb, args.dtype, len(prompts), k, plen, args.max_new_tokens, args.profile)
        plan = solve(problem, args.objective)
    mode = "pipelined" if k > 1 else "sequential"
    with deploy(plan, tb, args.model, dtype=args.dtype, device_map={d.name: args.device for d in tb.devices},
                problem=problem) as dep:
        while True:
            res = dep.generate(prompts, args.max_new_tokens, mode=mode, micro_batches=k, schedule=args.schedule,
                               temperature=args.temperature, top_p=args.top_p, seed=args.seed)
            print_run(res, plan, args.json)
            if not args.keep:
                break
            line = sys.stdin.readline()
            if not line.strip():
                break
            prompts = [line.rstrip("\n")]
            k = 1
            mode = "sequential"
    return 0


def print_run(res: Any, plan: Any, as_json: bool) -> None:
    """One JSON object, or text + timings with the planner's prediction beside them."""
    if as_json:
        print(json.dumps({"plan": [s.to_dict() for s in plan.stages], **res.to_dict()}, default=str))
        return
    for i, toks in enumerate(res.tokens):
        text = f"{res.text[i]!r}  " if res.text else ""
        print(f"[{i}] {text}tokens={toks}")
    s, p = res.summary, res.prediction
    print("plan: " + ", ".join(f"{st.device}[{st.start}:{st.end})" for st in plan.stages))
    pt = f"{s['per_token_ms']:.2f} ms" if s["per_token_ms"] is not None else "n/a"
    print(f"{s['mode']} (K={s['micro_batches']}, {s['schedule']}): prefill {s['prefill_ms']:.2f} ms, "
          f"per token {pt} (predicted {p.get('latency_ms', float('nan')):.2f} ms), "
          f"{s['tokens_per_s']:.2f} tokens/s (predicted {p.get('throughput_no_bubbles_per_s', p.get('throughput_per_s', float('nan'))):.2f})")
    by = {}
    for r in res.per_stage:
        by.setdefault(r["stage"], []).append(r)
    for i, recs in sorted(by.items()):
        med = {k: statistics.median(r[k] for r in recs) for k in ("compute_ms", "send_ms", "recv_ms", "wait_ms")}
        pred = p.get("stage_compute_ms", [None] * (i + 1))
        pc = f" (predicted {pred[i]:.2f})" if i < len(pred) and pred[i] is not None else ""
        print(f"  stage {i} {recs[0]['device']}: compute {med['compute_ms']:.2f} ms{pc}, send {med['send_ms']:.2f}, "
              f"recv {med['recv_ms']:.2f}, wait {med['wait_ms']:.2f} ms; "
              f"{sum(r['bytes_in'] for r in recs)} bytes in, {sum(r['bytes_out'] for r in recs)} out")


# ---- benchmarks ---------------------------------------------------------------------------------------------
def _local_testbed(n: int, pin: bool):
    from edgeshard_kit.testbed.inventory import testbed_from_dict

    ncpu = os.cpu_count() or 1
    devs = [{"name": f"w{i}", "type": "cpu-local", "memory": "64GiB", "source": i == 0,
             **({"cpus": [i % ncpu]} if pin else {})} for i in range(n)]
    return testbed_from_dict({"name": "bench-local", "devices": devs})


def _half_plan(checkpoint: str, devices: list[str]):
    from edgeshard_kit.model.checkpoint import load_llama_config
    from edgeshard_kit.planning.problem import Plan
    from edgeshard_kit.core.units import Stage

    total = load_llama_config(checkpoint).num_hidden_layers + 2
    cut = total // 2
    return Plan("latency", (Stage(devices[0], 0, cut), Stage(devices[1], cut, total)), 0.0, 0.0, 0.0)


def bench_latency(args: argparse.Namespace) -> int:
    """Per-token latency: 2 local workers vs one process on the same checkpoint, alternating."""
    import torch

    from edgeshard_kit.model.generate import generate_split
    from edgeshard_kit.runtime.deployment import deploy

    tb = _local_testbed(2, pin=False)
    plan = _half_plan(args.model, tb.names)
    ids = [[(7 * i) % 200 + 3 for i in range(args.prompt_len)]]
    threads = max(1, (os.cpu_count() or 1) // 2)
    torch.set_num_threads(threads)  # the one-process baseline gets the threads one worker gets
    from edgeshard_kit.model.generate import build_stages
    from edgeshard_kit.model.checkpoint import load_llama_config

    total = load_llama_config(args.model).num_hidden_layers + 2
    local = build_stages(args.model, [(0, total)], dtype=args.dtype)
    rows = []
    with deploy(plan, tb, args.model, dtype=args.dtype, threads=threads) as dep:
        dep.generate(ids, 4)  # warm-up
        generate_split(args.model, prompt_ids=ids, max_new_tokens=4, dtype=args.dtype, stages=local)
        for r in range(args.repeats):
            one = generate_split(args.model, prompt_ids=ids, max_new_tokens=args.tokens, dtype=args.dtype, stages=local)
            dist = dep.generate(ids, args.tokens)
            rows.append({"repeat": r, "one_process_ms": statistics.median(one.per_token_ms),
                         "pipeline_ms": dist.summary["per_token_ms"],
                         "ratio": dist.summary["per_token_ms"] / statistics.median(one.per_token_ms)})
            print(f"repeat {r}: one process {rows[-1]['one_process_ms']:.2f} ms/token, 2 workers "
                  f"{rows[-1]['pipeline_ms']:.2f} ms/token, ratio {rows[-1]['ratio']:.3f}")
    ratio = statistics.median(r["ratio"] for r in rows)
    print(f"per-token latency ratio (2 local workers / one process), median of {len(rows)}: {ratio:.3f}  "
          f"[target <= 1.10 when a decode step takes >= 20 ms]")
    write_rows(rows, args.out)
    print(f"wrote {args.out}")
    return 0


def bench_throughput(args: argparse.Namespace) -> int:
    """Throughput: 2 pinned workers, K micro-batches no-bubbles vs the same micro-batches one after another."""
    from edgeshard_kit.runtime.deployment import deploy
    from edgeshard_kit.planning.problem import make_plan, without_fixed_costs
    from edgeshard_kit.planning.build import build_problem

    k = args.micro_batches
    tb = _local_testbed(2, pin=True)
    batch = k * args.micro_batch_size
    profiles = quick_profiles(args.model, tb, args.dtype, batch, k, args.prompt_len, args.tokens, threads=1)
    runtime = None
    if args.calibrate:  # the fixed costs per stage and per token, measured on these two pinned workers
        from edgeshard_kit.runtime.calibrate import calibrate_runtime
        runtime = calibrate_runtime(args.model, tb, profiles, prompt_len=args.prompt_len, log=print)
    problem = build_problem(profiles, tb, quick_workload(batch, k, args.prompt_len, args.tokens), runtime)
    paper = without_fixed_costs(problem)
    stages = list(_half_plan(args.model, tb.names).stages)
    plan = make_plan(problem, stages, "throughput")
    pred_paper = make_plan(paper, stages, "throughput").throughput_per_s
    if args.calibrate:
        print(f"fixed costs: stage_ms {runtime['stage_ms']}, step_ms {runtime['step_ms']:.3f}")
    ids = [[(7 * i + j) % 200 + 3 for i in range(args.prompt_len)] for j in range(batch)]
    rows = []
    with deploy(plan, tb, args.model, dtype=args.dtype, problem=problem, threads=1) as dep:
        dep.generate(ids, 2, mode="pipelined", micro_batches=k)  # warm-up
        for r in range(args.repeats):
            # Decode throughput (tokens after the first, over the time after the prefill), as the planner predicts.
            t0, dec_tokens, dec_s = time.perf_counter(), 0, 0.0
            for j in range(k):
                one = dep.generate(ids[j * args.micro_batch_size:(j + 1) * args.micro_batch_size], args.tokens)
                dec_tokens += args.micro_batch_size * (args.tokens - 1)
                dec_s += one.summary["wall_s"] - one.summary["prefill_ms"] / 1e3
            seq_all = batch * args.tokens / (time.perf_counter() - t0)
            seq = dec_tokens / dec_s
            res = dep.generate(ids, args.tokens, mode="pipelined", micro_batches=k, schedule="no-bubbles")
            pipe, pipe_all = res.summary["decode_tokens_per_s"], res.summary["tokens_per_s"]
            pred = res.prediction.get("throughput_no_bubbles_per_s") or res.prediction.get("throughput_per_s")
            # The same cost model fed with the compute the workers measured during this run (ms per step):
            # separates the runtime's overhead from the profile's accuracy under a shared CPU.
            comp = [statistics.median(x["compute_ms"] for x in res.per_stage if x["stage"] == i and x["step"] > 0)
                    for i in range(len(plan.stages))]
            ideal = args.micro_batch_size * 1000.0 / max(comp)
            rows.append({"repeat": r, "sequential_tokens_per_s": seq, "pipelined_tokens_per_s": pipe,
                         "predicted_tokens_per_s": pred, "speedup": pipe / seq, "vs_prediction": pipe / pred,
                         "predicted_paper_model_tokens_per_s": pred_paper, "vs_paper_model": pipe / pred_paper,
                         "stage_compute_ms": "/".join(f"{c:.2f}" for c in comp),
                         "predicted_from_measured_compute": ideal, "vs_measured_compute": pipe / ideal,
                         "sequential_incl_prefill_tokens_per_s": seq_all, "pipelined_incl_prefill_tokens_per_s": pipe_all})
            print(f"repeat {r}: decode throughput sequential {seq:.1f} tok/s, pipelined K={k} {pipe:.1f} tok/s "
                  f"(x{pipe / seq:.2f}), predicted {pred:.1f} tok/s (measured/predicted {pipe / pred:.2f}); "
                  f"incl. prefill {seq_all:.1f} vs {pipe_all:.1f} tok/s; from measured stage compute "
                  f"{ideal:.1f} tok/s (measured/that {pipe / ideal:.2f})")
    sp = statistics.median(r["speedup"] for r in rows)
    vp = statistics.median(r["vs_prediction"] for r in rows)
    vm = statistics.median(r["vs_measured_compute"] for r in rows)
    vpp = statistics.median(r["vs_paper_model"] for r in rows)
    print(f"median speedup {sp:.2f} [target >= 1.7], measured/predicted {vp:.2f} [target within 0.85..1.15] "
          f"({'calibrated fixed costs' if args.calibrate else 'no fixed costs'}; the paper's model: {vpp:.2f}), "
          f"measured/predicted-from-measured-stage-compute {vm:.2f}")
    write_rows(rows, args.out)
    print(f"wrote {args.out}")
    return 0


_WIRE_RECEIVER = r"""
import socket, sys
from edgeshard_kit.runtime import wire
port, impl, nbytes, frames = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sock = socket.create_connection(("127.0.0.1", port))
if impl == "wire":
    conn = wire.Connection(sock)
    for _ in range(frames):
        conn.recv()
        conn.send("ack")
else:  # plain TCP into one preallocated buffer: what the host's loopback gives without the kit
    buf = memoryview(bytearray(nbytes))
    for _ in range(frames):
        got = 0
        while got < nbytes:
            got += sock.recv_into(buf[got:])
        sock.sendall(b"k")
sock.close()
"""


def bench_loopback(nbytes: int = 64 << 20, repeats: int = 5) -> list[dict]:
    """Frames of `nbytes` over TCP on 127.0.0.1 to a receiver process, the kit's wire (float32 tensor frames)
    and plain sockets alternating; one record (GB/s, send until the receiver has every byte) per frame."""
    import subprocess
    import sys

    import torch

    nbytes = nbytes // 4 * 4
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    peers, procs = {}, []
    try:
        for impl in ("wire", "socket"):
            procs.append(subprocess.Popen([sys.executable, "-c", _WIRE_RECEIVER, str(port), impl, str(nbytes),
                                           str(repeats + 1)]))
            server.settimeout(60)
            sock, _ = server.accept()
            peers[impl] = wire.Connection(sock) if impl == "wire" else sock
        t = torch.ones(nbytes // 4, dtype=torch.float32)
        raw = memoryview(t.numpy()).cast("B")

        def send(impl: str) -> float:
            t0 = time.perf_counter()
            if impl == "wire":
                peers[impl].send("act", t, step=0)
                peers[impl].recv()
            else:
                peers[impl].sendall(raw)
                peers[impl].recv(1)
            return time.perf_counter() - t0

        rows = []
        for i in range(repeats + 1):  # the first frame of each is a warm-up
            for impl in (("wire", "socket") if i % 2 == 0 else ("socket", "wire")):
                dt = send(impl)
                if i:
                    rows.append({"impl": impl, "repeat": i - 1, "bytes": nbytes, "seconds": dt,
                                 "gb_per_s": nbytes / dt / 1e9})
        return rows
    finally:
        for peer in peers.values():
            peer.close()
        for proc in procs:
            proc.wait(30)
        server.close()


def _cmd_bench_wire(args) -> int:
    rows = bench_loopback(args.mb << 20, args.repeats)
    med = {}
    for impl in ("wire", "socket"):
        rates = [r["gb_per_s"] for r in rows if r["impl"] == impl]
        med[impl] = statistics.median(rates)
        print(f"{impl:>7}: {args.mb} MiB frames, min {min(rates):.2f} / median {med[impl]:.2f} / max {max(rates):.2f} "
              f"GB/s over {len(rates)} frames")
    print(f"the kit's wire: {med['wire']:.2f} GB/s [target >= 1 GB/s], {med['wire'] / med['socket']:.2f}x plain TCP "
          f"on this host's loopback ({med['socket']:.2f} GB/s)")
    write_rows(rows, args.out)
    print(f"wrote {args.out}")
    return 0


def add_wire_bench(bench_sub) -> None:
    p = bench_sub.add_parser("wire", help="loopback throughput of the wire for large tensors (GB/s)")
    p.add_argument("--mb", type=int, default=64, help="tensor size in MiB (default 64)")
    p.add_argument("--repeats", type=int, default=10, help="frames of each kind after one warm-up (default 10)")
    p.add_argument("--out", default="results/wire.csv", help="CSV path")
    p.set_defaults(func=_cmd_bench_wire)


def add_bench_commands(bench_sub) -> None:
    p = bench_sub.add_parser("pipeline-latency", help="per-token latency: 2 local workers vs one process")
    p.add_argument("--model", required=True, help="Llama checkpoint directory")
    p.add_argument("--tokens", type=int, default=32, help="tokens per run (default 32)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats (default 3)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--out", default="results/pipeline_latency.csv", help="CSV path")
    p.set_defaults(func=bench_latency)
    p = bench_sub.add_parser("pipeline-throughput", help="pipelined vs sequential throughput, 2 pinned workers")
    p.add_argument("--model", required=True, help="Llama checkpoint directory")
    p.add_argument("--micro-batches", type=int, default=4, help="K (default 4)")
    p.add_argument("--micro-batch-size", type=int, default=1, help="prompts per micro-batch (default 1)")
    p.add_argument("--tokens", type=int, default=32, help="tokens per micro-batch (default 32)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats (default 3)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="predict without the runtime's measured fixed costs (the paper's model only)")
    p.add_argument("--out", default="results/pipeline_throughput.csv", help="CSV path")
    p.set_defaults(func=bench_throughput)
    add_wire_bench(bench_sub)
