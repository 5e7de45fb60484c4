"""`edgeshard bench decode-speed`: per-token decode against the memory-bandwidth limit, eager and compiled, as rows.

In one run, alternating with repeats (the order reversed every other repeat): the limit (weight bytes /
memory bandwidth, the bandwidth measured at that point of the run), transformers' `generate` eager and with a
static cache + torch.compile, the kit in one process eager and compiled, and the kit on 2 local workers eager
and compiled. Every path decodes the same greedy tokens from the same converted weights, batch 1.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.units import n_units
from edgeshard_kit.model.checkpoint import load_llama_config, load_tokenizer, quiet_progress
from edgeshard_kit.model.generate import build_stages, encode_prompts, generate_split
from edgeshard_kit.model.stage import parse_device, parse_dtype, synchronize
from edgeshard_kit.profiling.measure import decode_read_bytes, measure_bandwidth
from edgeshard_kit.runtime.deployment import deploy
from edgeshard_kit.bench.pipeline import half_plan, local_testbed

PROMPT = "Collaborative inference splits a large language model into shards that run on nearby devices."
IMPLS = ("limit", "transformers-eager", "transformers-compiled", "kit-eager", "kit-compiled",
         "kit-2workers-eager", "kit-2workers-compiled")
FIELDS = ["impl", "repeat", "tokens", "prompt_len", "ms_min", "ms_median", "ms_max", "limit_ms", "ratio_to_limit",
          "mem_bw_gbs", "weight_bytes", "same_tokens", "compile_s", "threads", "dtype", "device", "torch",
          "transformers"]


class _StepClock:
    """A transformers streamer recording when each token arrives (perf_counter, s) and the tokens."""

    def __init__(self, device: torch.device):
        self.device, self.times, self.tokens = device, [], []

    def put(self, value) -> None:
        synchronize(self.device)
        self.times.append(time.perf_counter())
        self.tokens.append(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def _hf_run(model, ids, mask, tokens: int, device, **kw) -> tuple[list[float], list[int]]:
    """One transformers generate: (per decode step ms, generated tokens)."""
    clock = _StepClock(device)
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, max_new_tokens=tokens, do_sample=False, streamer=clock, **kw)
    # times[0] is the prompt being "streamed" (before prefill), times[1] the first new token.
    steps = [(b - a) * 1e3 for a, b in zip(clock.times[1:], clock.times[2:])]
    return steps, [t[0] for t in clock.tokens[1:]]


def bench_decode_speed(checkpoint: str | Path, tokens: int = 32, repeats: int = 5, dtype: str = "float32",
                       device: str = "cpu", threads: int = 1, prompt: str = PROMPT,
                       impls: tuple[str, ...] = IMPLS, log: Callable[[str], Any] | None = None) -> list[dict]:
    """One row per (impl, repeat): decode ms/token min/median/max of one run of `tokens` greedy tokens and its
    ratio to the limit measured in the same repeat. Compile time (s) is in `compile_s` of the compiled paths."""
    from transformers import AutoModelForCausalLM, CompileConfig
    import transformers

    unknown = [i for i in impls if i not in IMPLS]
    if unknown or tokens < 3 or repeats < 1:
        raise KitError(f"bench decode-speed: unknown impls {unknown} (of {', '.join(IMPLS)})" if unknown
                       else "bench decode-speed: --tokens must be >= 3 and --repeats >= 1")
    say = log or (lambda msg: None)
    torch.set_num_threads(threads)
    dev, dt = parse_device(device), parse_dtype(dtype)
    ids, mask = encode_prompts(load_tokenizer(checkpoint), [prompt])
    id_list = ids[0].tolist()
    total = n_units(load_llama_config(checkpoint).num_hidden_layers)
    runs: dict[str, Callable[[], tuple[list[float], list[int]]]] = {}
    compile_s: dict[str, float] = {}
    closers = []
    eager = build_stages(checkpoint, [(0, total)], dtype=dtype, device=device)
    weight_bytes = decode_read_bytes(checkpoint, dtype)  # every weight once per token, the embedding one row

    def kit(stages):
        def run():
            res = generate_split(checkpoint, prompt_ids=ids, max_new_tokens=tokens, stages=stages)
            return res.per_token_ms, res.tokens[0]
        return run

    try:
        if "kit-eager" in impls:
            runs["kit-eager"] = kit(eager)
        if "kit-compiled" in impls:
            say("kit, one process: compiling the decode step")
            comp = build_stages(checkpoint, [(0, total)], dtype=dtype, device=device, compile=True)
            comp[0].warm_compile(max_len=ids.shape[1] + tokens)
            compile_s["kit-compiled"] = comp[0].compile_s
            runs["kit-compiled"] = kit(comp)
        if any(i.startswith("transformers") for i in impls):
            with quiet_progress():
                hf = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=dt, attn_implementation="sdpa")
            hf = hf.to(dev).eval()
            hf.generation_config.eos_token_id = None  # exactly `tokens` steps, as the kit runs
            hf.generation_config.pad_token_id = hf.config.pad_token_id
            hf_args = (hf, ids.to(dev), mask.to(dev), tokens, dev)
            if "transformers-eager" in impls:
                runs["transformers-eager"] = lambda: _hf_run(*hf_args)
            if "transformers-compiled" in impls:
                cc = CompileConfig(mode="reduce-overhead" if dev.type == "cuda" else "default")
                cc._compile_all_devices = True  # transformers compiles on CUDA only unless told
                static = dict(cache_implementation="static", compile_config=cc)
                say("transformers: compiling generate's decode step (static cache)")
                t0 = time.perf_counter()
                _hf_run(*hf_args, **static)
                first = time.perf_counter() - t0
                t0 = time.perf_counter()
                _hf_run(*hf_args, **static)
                compile_s["transformers-compiled"] = first - (time.perf_counter() - t0)
                runs["transformers-compiled"] = lambda: _hf_run(*hf_args, **static)
        tb = local_testbed(2, pin=False)
        plan = half_plan(checkpoint, tb.names)
        for name, c in (("kit-2workers-eager", False), ("kit-2workers-compiled", True)):
            if name not in impls:
                continue
            say(f"2 local workers{' (compiling at load)' if c else ''}")
            t0 = time.perf_counter()
            dep = deploy(plan, tb, checkpoint, dtype=dtype, threads=threads, compile=c,
                         device_map={n: str(dev) for n in tb.names})
            closers.append(dep.close)
            compile_s[name] = time.perf_counter() - t0  # deploy wall; the eager one is subtracted below
            runs[name] = _dep_run(dep, id_list, tokens)
        if "kit-2workers-compiled" in compile_s:
            compile_s["kit-2workers-compiled"] -= compile_s.pop("kit-2workers-eager", 0.0)
        else:
            compile_s.pop("kit-2workers-eager", None)
        for fn in runs.values():  # warm-up: first calls allocate and pick kernels
            fn()
        return _alternate(runs, impls, repeats, weight_bytes, compile_s, str(dev), say,
                          dict(tokens=tokens, prompt_len=int(ids.shape[1]), threads=threads, dtype=dtype,
                               device=str(dev), torch=torch.__version__, transformers=transformers.__version__))
    finally:
        for close in closers:
            close()


def _dep_run(dep, id_list: list[int], tokens: int) -> Callable[[], tuple[list[float], list[int]]]:
    """A deployment's run: ([min, median, max] of its decode steps as the coordinator saw them, the tokens)."""
    def run():
        res = dep.generate([id_list], tokens)
        s = res.summary
        return [s["per_token_ms_min"], s["per_token_ms"], s["per_token_ms_max"]], list(res.tokens[0])
    return run


def _alternate(runs: dict, impls: tuple[str, ...], repeats: int, weight_bytes: int, compile_s: dict, device: str,
               say: Callable[[str], Any], common: dict) -> list[dict]:
    """The repeats: every impl once per repeat, in IMPLS order on even repeats and reversed on odd ones."""
    order = [i for i in IMPLS if i in impls]
    rows, reference = [], None
    for r in range(repeats):
        got: dict[str, tuple[list[float], list[int] | None]] = {}
        bw = None
        for impl in (order if r % 2 == 0 else order[::-1]):
            if impl == "limit":
                bw = measure_bandwidth(device)
                continue
            got[impl] = runs[impl]()
        if bw is None:
            bw = measure_bandwidth(device)
        limit = weight_bytes / (bw * 1e9) * 1e3
        reference = reference or (got.get("kit-eager") or got.get("transformers-eager") or (None, None))[1]
        if "limit" in impls:
            rows.append({**common, "impl": "limit", "repeat": r, "ms_min": limit, "ms_median": limit, "ms_max": limit,
                         "limit_ms": limit, "ratio_to_limit": 1.0, "mem_bw_gbs": bw, "weight_bytes": weight_bytes})
        for impl in order:
            if impl not in got:
                continue
            steps, toks = got[impl]
            med = statistics.median(steps)
            rows.append({**common, "impl": impl, "repeat": r, "ms_min": min(steps), "ms_median": med,
                         "ms_max": max(steps), "limit_ms": limit, "ratio_to_limit": med / limit, "mem_bw_gbs": bw,
                         "weight_bytes": weight_bytes, "compile_s": compile_s.get(impl),
                         "same_tokens": None if reference is None or toks is None else toks == reference})
        say(f"repeat {r + 1}/{repeats}: limit {limit:.2f} ms ({bw:.1f} GB/s); "
            + ", ".join(f"{i} {statistics.median(got[i][0]):.2f}" for i in order if i in got))
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """One row per impl: ms/token min (of all steps), median (of the runs' medians), max; the median ratio to the
    limit (each run against the limit of its own repeat) and its min..max; compile seconds."""
    out = []
    for impl in IMPLS:
        rs = [r for r in rows if r["impl"] == impl]
        if not rs:
            continue
        ratios = [r["ratio_to_limit"] for r in rs]
        out.append({"impl": impl, "runs": len(rs), "ms_min": min(r["ms_min"] for r in rs),
                    "ms_median": statistics.median(r["ms_median"] for r in rs),
                    "ms_max": max(r["ms_max"] for r in rs), "ratio_to_limit": statistics.median(ratios),
                    "ratio_min": min(ratios), "ratio_max": max(ratios), "compile_s": rs[0].get("compile_s"),
                    "same_tokens": all(r.get("same_tokens") is not False for r in rs)})
    return out
