"""The notebooks' steps as library calls: checkpoint, testbed, profiles, link probes, plan, deploy-and-compare."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeshard_kit.core.units import KitError

_IPYTHON_NAMES = {"In", "Out", "exit", "quit", "get_ipython"}


def params_of(ns: dict) -> dict:
    """The flat literal parameters of a notebook namespace (what papermill injected or the cell set)."""
    return {k: v for k, v in ns.items() if not k.startswith("_") and k not in _IPYTHON_NAMES
            and isinstance(v, (str, int, float, bool)) and not callable(v)}


def checkpoint_for(model_path: str, folder: str | Path, layers: int = 4, hidden: int = 128, seed: int = 0) -> Path:
    """`model_path` if given, else a tiny seeded random Llama checkpoint written to `folder`/tiny-model."""
    from edgeshard_kit.model.checkpoint import load_llama_config, write_tiny_checkpoint
    if model_path:
        load_llama_config(model_path)  # KitError early if it is not a Llama checkpoint
        return Path(model_path)
    heads = 4 if hidden % 8 else 8
    out = Path(folder) / "tiny-model"
    if (out / "config.json").is_file():
        return out
    return write_tiny_checkpoint(out, layers=layers, hidden=hidden, intermediate=hidden * 11 // 4,
                                 heads=heads, kv_heads=heads // 2, vocab=512, seed=seed)


def load_testbed(path: str | Path):
    """The testbed inventory (YAML)."""
    from edgeshard_kit.testbed.inventory import load_testbed as _load
    return _load(path)


def _device_checkpoint(device, checkpoint: Path) -> str:
    return device.model_path or str(Path(checkpoint).resolve())


def profile_testbed(checkpoint: str | Path, testbed, repeats: int = 5, prompt_len: int = 16,
                    kv_lens: Any = "16,32", warmup: int = 1, run=None) -> dict:
    """One measured Profile per device type, on a device of that type (locally, or over SSH)."""
    from edgeshard_kit.profiling.measure import measure_profile, parse_kv_lens
    from edgeshard_kit.profiling.profile import Profile, save_profile
    kvs = parse_kv_lens(kv_lens)
    out = {}
    for dev in testbed.devices:
        if dev.type in out:
            continue
        if dev.launch == "local":
            prof = measure_profile(checkpoint, prompt_len=prompt_len, kv_lens=kvs, repeats=repeats, warmup=warmup,
                                   device_type=dev.type, progress=False, threads=dev.threads() or 1)
        else:  # measured where it runs: the profile JSON comes back on stdout
            from edgeshard_kit.testbed.netns import resolve_ssh
            from edgeshard_kit.runtime.ssh_launcher import SSHLauncher
            argv = [dev.python, "-m", "edgeshard_kit", "profile", "--model", _device_checkpoint(dev, checkpoint),
                    "--device-type", dev.type, "--prompt-len", str(prompt_len), "--kv-lens",
                    ",".join(map(str, kvs)), "--repeats", str(repeats), "--warmup", str(warmup),
                    "--out", "-", "--quiet"] + (["--threads", str(dev.threads())] if dev.threads() else [])
            ssh = resolve_ssh(testbed, dev)  # netns testbed: its address, key and known_hosts
            argv[0] = ssh["python"] or dev.python
            prof = Profile.from_dict(SSHLauncher(dev, **ssh).run_json(argv, timeout=600),
                                     where=f"profile from {dev.name}")
        out[dev.type] = prof
        if run is not None:
            save_profile(prof, run.path / f"profile-{dev.type}.json")
    if run is not None:
        run.record(profiles={t: f"profile-{t}.json" for t in out})
    return out


def profile_table(profiles: dict):
    """One tidy DataFrame of the profiles (a row per unit x measurement)."""
    from edgeshard_kit.profiling.profile import profiles_frame
    return profiles_frame(profiles)


def probe_links(testbed, nbytes: int = 262144, repeats: int = 3) -> list[dict]:
    """Measured RTT (ms) and goodput (Mbps) of every ordered device pair, beside the declared figures."""
    import math

    from edgeshard_kit.runtime import probe
    out = probe.probe_testbed(testbed, sizes=(int(nbytes),), repeats=repeats)
    rows = []
    for p in out["links"]["pairs"]:
        declared = testbed.link(p["src"], p["dst"])
        rows.append({"src": p["src"], "dst": p["dst"], "rtt_ms": 2 * p["latency_ms"], "measured_mbps": p["mbps"],
                     "declared_mbps": declared.mbps if math.isfinite(declared.mbps) else None,
                     "declared_latency_ms": declared.latency_ms, "probe_bytes": int(nbytes)})
    return rows


def build_problem(profiles: dict, testbed, prompt_len: int = 8, gen_tokens: int = 8, runtime: dict | None = None):
    """The planning problem of these profiles on this testbed (decode cost averaged over the generated tokens).

    `runtime`: the runtime's fixed costs per stage and per token (overheads.calibrate_runtime), if measured.
    """
    from edgeshard_kit.planning.build import Workload
    from edgeshard_kit.planning.build import build_problem as _build
    # The runtime samples on the last stage and sends back token ids (int64): 8 bytes, not the logits.
    return _build(profiles, testbed, Workload(prompt_len=prompt_len, gen_tokens=gen_tokens, return_bytes=8), runtime)


def plan_for(profiles: dict, testbed, objective: str = "latency", prompt_len: int = 8, gen_tokens: int = 8):
    """(problem, plan): EdgeShard's optimum for `objective` on the measured profiles."""
    from edgeshard_kit.planning.problem import solve
    problem = build_problem(profiles, testbed, prompt_len, gen_tokens)
    return problem, solve(problem, objective)


def edgeshard_plans(problem) -> dict:
    """EdgeShard's optimum for both objectives, by method name (the KitError where nothing fits)."""
    from dataclasses import replace

    from edgeshard_kit.planning.problem import solve
    out = {}
    for objective in ("latency", "throughput"):
        try:
            out[f"EdgeShard-{objective}"] = replace(solve(problem, objective), method=f"EdgeShard-{objective}")
        except KitError as e:
            out[f"EdgeShard-{objective}"] = e
    return out


def method_plans(problem) -> dict:
    """EdgeShard (both objectives) and the four baselines, by method name (OOM ones have feasible=False)."""
    from edgeshard_kit.planning import baselines
    out = edgeshard_plans(problem)
    for plan in baselines.baselines(problem, "latency"):
        out[plan.method] = plan
    return out


def predicted_methods(problem, micro_batches: int = 4, tokens: int = 8) -> list[dict]:
    """Predicted per-token latency (ms) and pipelined throughput (tokens/s) of every method."""
    from edgeshard_kit.planning.schedule import evaluate
    rows = []
    for name, plan in method_plans(problem).items():
        row = {"method": name, "source": "predicted", "micro_batches": micro_batches}
        if isinstance(plan, Exception) or not plan.feasible:
            reason = str(plan) if isinstance(plan, Exception) else plan.reason
            rows.append({**row, "status": "oom" if "memory" in reason else "infeasible", "reason": reason,
                         "latency_ms": None, "throughput_tps": None, "stages": ""})
            continue
        ev = evaluate(problem, plan, micro_batches=micro_batches, tokens=tokens)
        rows.append({**row, "status": "ok", "reason": "", "latency_ms": plan.latency_ms,
                     "throughput_tps": ev["throughput_no_bubbles_per_s"],
                     "throughput_bubbles_tps": ev["throughput_bubbles_per_s"],
                     "ideal_throughput_tps": plan.throughput_per_s, "stages": stages_text(plan.stages)})
    return rows


def stages_text(stages) -> str:
    """"edge0[0,3) cloud[3,6)" — a plan's stages in one cell."""
    return " ".join(f"{s.device}[{s.start},{s.end})" for s in stages)


def reference_tokens(checkpoint: str | Path, prompts: Any, max_new_tokens: int) -> list[list[int]]:
    """Greedy tokens of the whole model on this host: what every split must reproduce exactly."""
    from edgeshard_kit.model.generate import generate_split
    return generate_split(checkpoint, None, prompts=prompts, max_new_tokens=max_new_tokens).tokens


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
                        problem=None) -> dict:
    """Deploy `plan`, generate greedily, compare tokens with one-device generation; records for CSVs."""
    from edgeshard_kit.runtime.deployment import deploy
    with deploy(plan, testbed, checkpoint, problem=problem) as dep:
        res = dep.generate([prompt], max_new_tokens=max_new_tokens)
    ref = reference_tokens(checkpoint, [prompt], max_new_tokens)[0]
    got = res.tokens[0]
    tokens = [{"position": i, "token": t, "reference_token": ref[i] if i < len(ref) else None}
              for i, t in enumerate(got)]
    return {"text": res.text[0] if res.text else "", "tokens": tokens, "matches_reference": got == ref,
            "stages": stage_timing(res, plan), "summary": res.summary, "result": res}
