"""The notebooks' steps as library calls: checkpoint, testbed, profiles, link probes, plan, deploy-and-compare.

A model is named the same way everywhere (notebooks' `model_path`, `BenchmarkConfig.model_path`, the demo):
"" = the kit's default real model, SmolLM2-135M-Instruct (converted once into the cache folder, model.hub);
"tiny" = a tiny seeded random checkpoint written into the run folder (fast tests); a name of model.hub
(e.g. "smollm2-135m"); or a Hugging Face Llama checkpoint folder.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.units import format_stages
from edgeshard_kit.model import hub
from edgeshard_kit.model.checkpoint import load_llama_config, write_tiny_checkpoint
from edgeshard_kit.model.generate import generate_split
from edgeshard_kit.planning import baselines
from edgeshard_kit.planning.build import Workload, build_problem
from edgeshard_kit.planning.objectives import METHOD_NAMES, solve_objective
from edgeshard_kit.planning.schedule import evaluate
from edgeshard_kit.profiling.measure import measure_profile, parse_kv_lens
from edgeshard_kit.profiling.profile import Profile, profiles_frame, save_profile
from edgeshard_kit.runtime import probe
from edgeshard_kit.runtime.deployment import deploy
from edgeshard_kit.runtime.ssh_launcher import SSHLauncher
from edgeshard_kit.testbed.inventory import load_testbed
from edgeshard_kit.testbed.netns import resolve_ssh

# The notebooks reach the testbed file and the profile table through this facade.
__all__ = ["params_of", "TINY", "checkpoint_for", "is_tiny", "hub_names", "tiny_checkpoint", "load_testbed",
           "profile_testbed", "profiles_frame", "probe_links", "plan_for", "edgeshard_plans", "method_plans", "predicted_methods", "reference_tokens",
           "stage_timing", "deploy_and_generate"]

_IPYTHON_NAMES = {"In", "Out", "exit", "quit", "get_ipython"}


def params_of(ns: dict) -> dict:
    """The flat literal parameters of a notebook namespace (what papermill injected or the cell set)."""
    return {k: v for k, v in ns.items() if not k.startswith("_") and k not in _IPYTHON_NAMES
            and isinstance(v, (str, int, float, bool)) and not callable(v)}


TINY = "tiny"  # model_path of a tiny seeded random checkpoint (fast tests)


def is_tiny(model_path: Any) -> bool:
    """True when `model_path` asks for a tiny random checkpoint rather than a real model."""
    return str(model_path).strip().lower() == TINY


def checkpoint_for(model_path: str, folder: str | Path, layers: int = 4, hidden: int = 128, seed: int = 0) -> Path:
    """The checkpoint a `model_path` names: "" the default real model (converted once into the cache folder),
    "tiny" a tiny seeded random Llama written to `folder`/tiny-model, a model.hub name, or a checkpoint folder."""
    model_path = str(model_path).strip()
    if not model_path:
        return hub.default_model()
    if is_tiny(model_path):
        return tiny_checkpoint(folder, layers, hidden, seed)
    if not Path(model_path).exists() and model_path.lower() in hub_names():
        return hub.fetch_model(model_path)
    load_llama_config(model_path)  # KitError early if it is not a Llama checkpoint
    return Path(model_path)


def tiny_checkpoint(folder: str | Path, layers: int = 4, hidden: int = 128, seed: int = 0) -> Path:
    """A tiny seeded random Llama checkpoint in `folder`/tiny-model (written once)."""
    heads = 4 if hidden % 8 else 8
    out = Path(folder) / "tiny-model"
    if (out / "config.json").is_file():
        return out
    return write_tiny_checkpoint(out, layers=layers, hidden=hidden, intermediate=hidden * 11 // 4,
                                 heads=heads, kv_heads=heads // 2, vocab=512, seed=seed)


def hub_names() -> set[str]:
    """Every name (and alias) of model.hub's real models, lower case."""
    return {n for m in hub.MODELS.values() for n in (m.name, *m.aliases)}


def _remote_profile(testbed, dev, checkpoint: str | Path, prompt_len: int, kvs: tuple[int, ...], repeats: int,
                    warmup: int) -> Profile:
    """Measured where it runs: `edgeshard profile --out -` over SSH, the profile JSON back on stdout."""
    model = dev.model_path or str(Path(checkpoint).resolve())
    ssh = resolve_ssh(testbed, dev)  # netns testbed: its address, key and known_hosts
    argv = [ssh["python"] or dev.python, "-m", "edgeshard_kit", "profile", "--model", model,
            "--device-type", dev.type, "--prompt-len", str(prompt_len), "--kv-lens", ",".join(map(str, kvs)),
            "--repeats", str(repeats), "--warmup", str(warmup), "--out", "-", "--quiet"]
    argv += ["--threads", str(dev.threads())] if dev.threads() else []
    return Profile.from_dict(SSHLauncher(dev, **ssh).run_json(argv, timeout=600), where=f"profile from {dev.name}")


def profile_testbed(checkpoint: str | Path, testbed, repeats: int = 5, prompt_len: int = 16,
                    kv_lens: Any = "16,32", warmup: int = 1, run=None, parallel: bool | None = None) -> dict:
    """One measured Profile per device type, on a device of that type (locally, or over SSH); devices of a type
    already measured share its profile (one measurement per type). A tqdm bar counts the device types.

    `parallel`: measure the SSH devices' types at once, each on its own device. None (default): at once on a
    testbed of separate machines (emulation mode app), one after another on an emulated testbed, whose devices
    share this host's memory bandwidth (a profile taken beside another would read slower than the device
    runs alone). Devices launched here (`launch: local`) are measured one after another in this process.
    """
    from tqdm.auto import tqdm

    kvs = parse_kv_lens(kv_lens)
    firsts = [dev for i, dev in enumerate(testbed.devices) if dev.type not in {d.type for d in testbed.devices[:i]}]
    parallel = testbed.emulation != "netns" if parallel is None else parallel
    remote = [dev for dev in firsts if dev.launch != "local"]
    bar = tqdm(total=len(firsts), desc="profile device types", unit="type", leave=False, disable=None)

    def measure(dev) -> Profile:
        if dev.launch == "local":
            return measure_profile(checkpoint, prompt_len=prompt_len, kv_lens=kvs, repeats=repeats, warmup=warmup,
                                   device_type=dev.type, progress=False, threads=dev.threads() or 1)
        return _remote_profile(testbed, dev, checkpoint, prompt_len, kvs, repeats, warmup)

    got: dict[str, Profile] = {}
    with ThreadPoolExecutor(max(1, len(remote))) if parallel and len(remote) > 1 else nullcontext() as pool:
        futures = {dev.type: pool.submit(measure, dev) for dev in remote} if pool else {}
        for dev in firsts:
            if dev.type in futures:
                continue
            bar.set_postfix_str(f"{dev.type} on {dev.name}")
            got[dev.type] = measure(dev)
            bar.update()
        for dev_type, fut in futures.items():  # a failure names its device (KitError from the SSH launcher)
            got[dev_type] = fut.result()
            bar.update()
    bar.close()
    out = {dev.type: got[dev.type] for dev in firsts}
    if run is not None:
        for dev_type, prof in out.items():
            save_profile(prof, run.path / f"profile-{dev_type}.json")
        run.record(profiles={t: f"profile-{t}.json" for t in out})
    return out


def probe_links(testbed, nbytes: int = 262144, repeats: int = 3) -> list[dict]:
    """Measured RTT (ms) and goodput (Mbps) of every ordered device pair, beside the declared figures."""
    out = probe.probe_testbed(testbed, sizes=(int(nbytes),), repeats=repeats)
    rows = []
    for p in out["links"]["pairs"]:
        declared = testbed.link(p["src"], p["dst"])
        rows.append({"src": p["src"], "dst": p["dst"], "rtt_ms": 2 * p["latency_ms"], "measured_mbps": p["mbps"],
                     "declared_mbps": declared.mbps if math.isfinite(declared.mbps) else None,
                     "declared_latency_ms": declared.latency_ms, "probe_bytes": int(nbytes)})
    return rows


def plan_for(profiles: dict, testbed, objective: str = "latency", prompt_len: int = 8, gen_tokens: int = 8,
             micro_batches: int = 1):
    """(problem, plan): EdgeShard's optimum for `objective` (planning.objectives.OBJECTIVES) on the measured
    profiles (the runtime's pricing); ``throughput`` is the throughput with `micro_batches` in flight."""
    problem = build_problem(profiles, testbed, Workload(prompt_len=prompt_len, gen_tokens=gen_tokens),
                            returns="tokens")
    return problem, solve_objective(problem, objective, micro_batches)


def edgeshard_plans(problem, micro_batches: int | None = None, steady: bool = False) -> dict:
    """EdgeShard's optimum per objective, by method name (METHOD_NAMES; the KitError where nothing fits).

    micro_batches: K for EdgeShard-throughput (throughput with K micro-batches in flight; None: the steady-state
    DP). steady: also the paper's steady-state throughput plan, as "EdgeShard-throughput (steady state)".
    """
    out = {}
    objectives = ("latency", "throughput") + (("throughput-steady",) if steady else ())
    for objective in objectives:
        name = METHOD_NAMES[objective]
        try:
            out[name] = solve_objective(problem, objective, micro_batches)
        except KitError as e:
            out[name] = e
    return out


def method_plans(problem, micro_batches: int | None = None, steady: bool = False) -> dict:
    """EdgeShard (see edgeshard_plans) and the four baselines, by method name (OOM ones have feasible=False)."""
    out = edgeshard_plans(problem, micro_batches, steady)
    for plan in baselines.baselines(problem, "latency"):
        out[plan.method] = plan
    return out


def predicted_methods(problem, micro_batches: int = 4, tokens: int = 8) -> list[dict]:
    """Predicted per-token latency (ms) and pipelined throughput (tokens/s, `micro_batches` in flight) of every
    method; EdgeShard-throughput is the plan for that many micro-batches."""
    rows = []
    for name, plan in method_plans(problem, micro_batches).items():
        row = {"method": name, "source": "predicted", "micro_batches": micro_batches}
        if isinstance(plan, Exception) or not plan.feasible:
            reason = str(plan) if isinstance(plan, Exception) else plan.reason
            rows.append({**row, "status": "oom" if "memory" in reason else "infeasible", "reason": reason,
                         "latency_ms": None, "throughput_tps": None, "stages": ""})
            continue
        ev = evaluate(problem, plan, micro_batches=micro_batches, tokens=tokens)
        rows.append({**row, "status": "ok", "reason": "", "latency_ms": plan.latency_ms,
                     "throughput_tps": ev.simulations["no-bubbles"].throughput_per_s,
                     "throughput_bubbles_tps": ev.simulations["bubbles"].throughput_per_s,
                     "ideal_throughput_tps": plan.throughput_per_s, "stages": format_stages(plan.stages)})
    return rows


def reference_tokens(checkpoint: str | Path, prompts: Any, max_new_tokens: int, attention_mask=None,
                     chat: bool = False) -> list[list[int]]:
    """Greedy tokens of the whole model on this host: what every split must reproduce exactly.

    `prompts`: text (str or list of str; `chat`: as user messages through the chat template, stopping at EOS)
    or token ids (B, T) with an optional `attention_mask`.
    """
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], str)):
        return generate_split(checkpoint, None, prompts=prompts, max_new_tokens=max_new_tokens, chat=chat).tokens
    return generate_split(checkpoint, None, prompt_ids=prompts, attention_mask=attention_mask,
                          max_new_tokens=max_new_tokens).tokens


def stage_timing(res, plan) -> list[dict]:
    """Per stage (compute) and per hop (transfer): measured mean ms per decode step beside the prediction."""
    import pandas as pd
    ps = pd.DataFrame(res.per_stage)
    pred = res.prediction
    rows = []
    dec = ps[ps["step"] > 0] if "step" in ps and (ps["step"] > 0).any() else ps
    for i, s in enumerate(plan.stages):
        g = dec[dec["stage"] == i]
        rows.append({"stage": i, "device": s.device, "start": s.start, "end": s.end, "kind": "compute",
                     "predicted_ms": pred["stage_compute_ms"][i], "measured_ms": float(g["compute_ms"].mean())})
        if "send_ms" in g:
            rows.append({"stage": i, "device": s.device, "start": s.start, "end": s.end, "kind": "transfer",
                         "predicted_ms": pred["stage_transfer_ms"][i], "measured_ms": float(g["send_ms"].mean())})
    return rows


def deploy_and_generate(checkpoint: str | Path, testbed, plan, prompt: str, max_new_tokens: int = 8,
                        problem=None, chat: bool = False) -> dict:
    """Deploy `plan`, generate greedily, compare tokens with one-device generation; records for CSVs.

    `chat`: the prompt is a user message put through the checkpoint's chat template; generation stops at EOS.
    """
    with deploy(plan, testbed, checkpoint, problem=problem) as dep:
        res = dep.generate([prompt], max_new_tokens=max_new_tokens, chat=chat)
    ref = reference_tokens(checkpoint, [prompt], max_new_tokens, chat=chat)[0]
    got = res.tokens[0]
    tokens = [{"position": i, "token": t, "reference_token": ref[i] if i < len(ref) else None}
              for i, t in enumerate(got)]
    return {"text": res.text[0] if res.text else "", "tokens": tokens, "matches_reference": got == ref,
            "stages": stage_timing(res, plan), "summary": res.summary, "result": res}
