"""`edgeshard bench peer-llamacpp`: per-token decode of the kit beside llama.cpp on the same checkpoint, as rows.

In one run, alternating (the order reversed every other repeat), batch 1, float32 weights, one thread per
process: the kit in one process and on 2 local workers (the model cut in two halves), and llama.cpp's
`llama-bench` (`-p 0 -n N -t 1`) on an F32 GGUF that llama.cpp's own converter made from the same checkpoint, in
one process and with every layer on 1 and on 2 RPC servers (127.0.0.1, one thread each). Both decode from a
one-token context (the BOS token) for `tokens` steps: llama-bench feeds random tokens, the kit its greedy ones.
A run's figure is its mean decode ms/token (what llama-bench reports); the kit's rows also give its steps'
min/median/max. Ratios are taken within a repeat: against llama.cpp in one process, and against the same
implementation in one process. llama.cpp is optional: bench/llamacpp.py raises LlamaCppUnavailable when it
cannot be built, and `skipped_rows` is what the CSV then holds.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Callable

import torch
import transformers

from edgeshard_kit.bench import llamacpp
from edgeshard_kit.bench.pipeline import half_plan, local_testbed
from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.units import n_units
from edgeshard_kit.experiments import steps
from edgeshard_kit.model.checkpoint import load_llama_config
from edgeshard_kit.model.generate import build_stages, generate_split
from edgeshard_kit.runtime.deployment import deploy

IMPLS = ("kit-1proc", "llamacpp-1proc", "kit-2workers", "llamacpp-2rpc", "llamacpp-1rpc")
PROCESSES = {"kit-1proc": 1, "kit-2workers": 3, "llamacpp-1proc": 1, "llamacpp-1rpc": 2, "llamacpp-2rpc": 3}
OWN_BASE = {"kit-1proc": "kit-1proc", "kit-2workers": "kit-1proc", "llamacpp-1proc": "llamacpp-1proc",
            "llamacpp-1rpc": "llamacpp-1proc", "llamacpp-2rpc": "llamacpp-1proc"}
FIELDS = ["impl", "repeat", "status", "reason", "tokens", "processes", "ms_per_token", "ms_min", "ms_median", "ms_max",
          "ratio_to_llamacpp_1proc", "ratio_to_own_1proc", "threads", "model", "gguf", "llama_cpp_python",
          "llamacpp_build", "backends", "torch", "transformers"]
# The ratios the command prints: (label, impl, the impl it is divided by).
RATIOS = (("kit 1 process / llama.cpp 1 process", "kit-1proc", "llamacpp-1proc"),
          ("kit 2 workers / kit 1 process", "kit-2workers", "kit-1proc"),
          ("llama.cpp 2 RPC servers / llama.cpp 1 process", "llamacpp-2rpc", "llamacpp-1proc"),
          ("llama.cpp 1 RPC server / llama.cpp 1 process", "llamacpp-1rpc", "llamacpp-1proc"),
          ("kit 2 workers / llama.cpp 2 RPC servers", "kit-2workers", "llamacpp-2rpc"))


def check_args(tokens: int, repeats: int, threads: int, jobs: int) -> None:
    """KitError naming the option when one is out of range."""
    for name, value, low in (("--tokens", tokens, 2), ("--repeats", repeats, 1), ("--threads", threads, 1),
                             ("--jobs", jobs, 1)):
        if value < low:
            raise KitError(f"bench peer-llamacpp: {name} must be at least {low}, got {value}")


def skipped_rows(reason: str, model: str = "", version: str = llamacpp.VERSION) -> list[dict]:
    """The CSV of a skipped run: one row saying why."""
    return [{"impl": "skipped", "status": "skipped", "reason": reason, "model": model, "llama_cpp_python": version}]


def bench_peer_llamacpp(model: str = "", tokens: int = 64, repeats: int = 5, threads: int = 1,
                        version: str = llamacpp.VERSION, cache: str | Path | None = None, build: bool = True,
                        jobs: int = 2, impls: tuple[str, ...] = IMPLS, workdir: str | Path = "results",
                        log: Callable[[str], Any] | None = None) -> list[dict]:
    """One row per (impl, repeat): the run's mean decode ms/token over `tokens` steps from a one-token context.

    `model`: "" the default model, a model name, "tiny" or a checkpoint folder (experiments.steps.checkpoint_for;
    "tiny" is written under `workdir`). Raises LlamaCppUnavailable (one-line reason) before measuring anything
    when llama.cpp cannot be built, converted or started; KitError for bad arguments.
    """
    check_args(tokens, repeats, threads, jobs)
    unknown = [i for i in impls if i not in IMPLS]
    if unknown or not impls:
        raise KitError(f"bench peer-llamacpp: --impls: unknown {unknown} (of {', '.join(IMPLS)})")
    say = log or (lambda msg: None)
    llama = llamacpp.prepare(version, cache, build=build, jobs=jobs, log=say)  # LlamaCppUnavailable: the caller skips
    checkpoint = steps.checkpoint_for(model, workdir)
    gguf = llamacpp.convert(llama, checkpoint, log=say)
    config = load_llama_config(checkpoint)
    bos = config.bos_token_id if isinstance(config.bos_token_id, int) else 1
    ids = [[bos]]
    torch.set_num_threads(threads)
    runs: dict[str, Callable[[], dict]] = {}
    info: dict[str, str] = {}

    def kit_one(stages):
        def run():
            res = generate_split(checkpoint, prompt_ids=ids, max_new_tokens=tokens + 1, stages=stages)
            return _steps_row(res.per_token_ms)
        return run

    def kit_dep(dep):
        def run():
            res = dep.generate(ids, tokens + 1)
            return _steps_row([r["latency_ms"] for r in res.per_token if r["step"] > 0])
        return run

    def peer(rpc):
        def run():
            got = llamacpp.bench_decode(llama, gguf, tokens, threads=threads, rpc=rpc)
            info["llamacpp_build"] = got["build"]
            return {"ms_per_token": got["ms_per_token"], "backends": got["backends"]}
        return run

    with _servers(llama, impls, threads) as (one, two):
        if "kit-1proc" in impls:
            total = n_units(config.num_hidden_layers)
            runs["kit-1proc"] = kit_one(build_stages(checkpoint, [(0, total)]))
        dep = None
        if "kit-2workers" in impls:
            say("starting 2 local workers")
            tb = local_testbed(2, pin=False)
            dep = deploy(half_plan(checkpoint, tb.names), tb, checkpoint, threads=threads)
            runs["kit-2workers"] = kit_dep(dep)
        try:
            for impl, rpc in (("llamacpp-1proc", None), ("llamacpp-1rpc", one), ("llamacpp-2rpc", two)):
                if impl in impls:
                    runs[impl] = peer(rpc)
            for impl, fn in runs.items():  # warm-up: first calls allocate and pick kernels
                say(f"warm-up: {impl}")
                fn()
            common = {"status": "ok", "tokens": tokens, "threads": threads, "model": str(checkpoint),
                      "gguf": str(gguf), "llama_cpp_python": version, "torch": torch.__version__,
                      "transformers": transformers.__version__}
            return _alternate(runs, repeats, common, info, say)
        finally:
            if dep is not None:
                dep.close()


class _servers:
    """The RPC servers the chosen impls need: (1 endpoint or None, 2 endpoints or None), stopped on exit."""

    def __init__(self, llama: llamacpp.LlamaCpp, impls: tuple[str, ...], threads: int):
        self.llama, self.impls, self.threads, self.ctx = llama, impls, threads, []

    def __enter__(self) -> tuple[list[str] | None, list[str] | None]:
        got = []
        try:
            for impl, n in (("llamacpp-1rpc", 1), ("llamacpp-2rpc", 2)):
                if impl in self.impls:
                    cm = llamacpp.rpc_servers(self.llama, n, self.threads)
                    got.append(cm.__enter__())
                    self.ctx.append(cm)
                else:
                    got.append(None)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return got[0], got[1]

    def __exit__(self, *exc) -> None:
        while self.ctx:
            self.ctx.pop().__exit__(None, None, None)


def _steps_row(step_ms: list[float]) -> dict:
    """A kit run's figures from its decode steps (ms): the mean (llama-bench's measure) and min/median/max."""
    return {"ms_per_token": statistics.fmean(step_ms), "ms_min": min(step_ms),
            "ms_median": statistics.median(step_ms), "ms_max": max(step_ms), "backends": "torch CPU"}


def _alternate(runs: dict[str, Callable[[], dict]], repeats: int, common: dict, info: dict,
               say: Callable[[str], Any]) -> list[dict]:
    """Every impl once per repeat, in IMPLS order on even repeats and reversed on odd ones; ratios per repeat."""
    order = [i for i in IMPLS if i in runs]
    rows = []
    for r in range(repeats):
        got = {impl: runs[impl]() for impl in (order if r % 2 == 0 else order[::-1])}
        for impl in order:
            ms = got[impl]["ms_per_token"]
            base, own = got.get("llamacpp-1proc"), got.get(OWN_BASE[impl])
            rows.append({**common, **got[impl], "impl": impl, "repeat": r, "processes": PROCESSES[impl],
                         "llamacpp_build": info.get("llamacpp_build", ""),
                         "ratio_to_llamacpp_1proc": ms / base["ms_per_token"] if base else None,
                         "ratio_to_own_1proc": ms / own["ms_per_token"] if own else None})
        say(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{i} {got[i]['ms_per_token']:.2f}" for i in order)
            + " ms/token")
    return rows


def summarize(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(one row per impl: ms/token min/median/max over the repeats' runs; one row per ratio of RATIOS: median,
    min, max over the repeats, each repeat's ratio taken between runs of that repeat)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    per_impl = []
    for impl in IMPLS:
        ms = [r["ms_per_token"] for r in ok if r["impl"] == impl]
        if ms:
            per_impl.append({"impl": impl, "runs": len(ms), "ms_min": min(ms), "ms_median": statistics.median(ms),
                             "ms_max": max(ms)})
    ratios = []
    for label, a, b in RATIOS:
        by_rep = {}
        for r in ok:
            by_rep.setdefault(r["repeat"], {})[r["impl"]] = r["ms_per_token"]
        vals = [d[a] / d[b] for d in by_rep.values() if a in d and b in d]
        if vals:
            ratios.append({"ratio": label, "median": statistics.median(vals), "min": min(vals), "max": max(vals),
                           "n": len(vals)})
    return per_impl, ratios
