"""The coordinator on the source: deploy a plan to workers, run sequential or pipelined generation, time it."""

from __future__ import annotations

import atexit
import dataclasses
import signal
import statistics
import threading
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.units import Stage, n_units, validate_ranges
from edgeshard_kit.model.checkpoint import GenerationSettings, generation_settings, load_llama_config, load_tokenizer
from edgeshard_kit.model.generate import check_sampling, encode_prompts
from edgeshard_kit.planning.plan import Plan, figures
from edgeshard_kit.planning.problem import Problem
from edgeshard_kit.planning.schedule import SCHEDULES, evaluate
from edgeshard_kit.runtime import wire
from edgeshard_kit.runtime.chain import FAULT_TIMEOUT_S, Chain, PipelineError, StageInfo
from edgeshard_kit.runtime.launch import LaunchOptions, StartError, default_launch_options, link_shape, start_workers
from edgeshard_kit.runtime.launchers import WorkerHandle
from edgeshard_kit.runtime.protocol import PeerAddress, StageConfig, new_token
from edgeshard_kit.testbed.inventory import Testbed

LOAD_TIMEOUT_S = 600.0  # loading a stage's weights (a 7B shard from a slow disk)
MODES = ("sequential", "pipelined")
_LIVE: "weakref.WeakSet[Deployment]" = weakref.WeakSet()
_HOOKED = False

__all__ = ["Deployment", "PipelineError", "RunResult", "StageInfo", "check_plan", "deploy", "stage_configs",
           "FAULT_TIMEOUT_S", "LOAD_TIMEOUT_S"]


@dataclass
class RunResult:
    """Tokens, text, timing records and the planner's prediction of one `Deployment.generate` call."""

    tokens: list[list[int]]
    text: list[str]
    per_token: list[dict]  # one record per (micro-batch, step): latency_ms, t_ms since start
    per_stage: list[dict]  # one record per (stage, micro-batch, step): wait/recv/compute/send ms, bytes
    summary: dict
    prediction: dict = field(default_factory=dict)
    stages: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)  # adaptive runs: one record per re-plan event (runtime.adaptive)

    def to_dict(self) -> dict:
        return asdict(self)

    def frames(self) -> dict:
        """pandas DataFrames: per_token, per_stage, stages."""
        import pandas as pd

        return {k: pd.DataFrame(getattr(self, k)) for k in ("per_token", "per_stage", "stages")}


def _cleanup_all() -> None:
    for dep in list(_LIVE):
        dep.close()


def _install_hooks() -> None:
    """Once per process: close deployments at exit and on SIGTERM (if nobody else handles it)."""
    global _HOOKED
    if _HOOKED:
        return
    _HOOKED = True
    atexit.register(_cleanup_all)
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        def on_term(signum, frame):  # turn SIGTERM into SystemExit so finally blocks and atexit run
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, on_term)


class Deployment:
    """Running workers of one plan, connected in a chain; use as a context manager or call close()."""

    def __init__(self, plan: Plan, testbed: Testbed, checkpoint: str | Path, dtype: str, chain: Chain,
                 problem: Problem | None = None):
        self.plan, self.testbed, self.checkpoint, self.dtype = plan, testbed, str(checkpoint), dtype
        self.stages: list[Stage] = list(plan.stages)
        self.chain = chain
        self.problem = problem
        self._tokenizer = None
        self._generation: GenerationSettings | None = None
        self.adaptive: Any = None  # runtime.adaptive.AdaptivePolicy: generate re-plans and switches while serving
        self.deploy_args: dict = {"dtype": dtype}  # what `deploy` was given, for the adaptive re-deploys

    @property
    def handles(self) -> list[WorkerHandle]:
        return self.chain.handles

    @property
    def info(self) -> list[StageInfo]:
        return self.chain.info

    @property
    def closed(self) -> bool:
        return self.chain.closed

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Shut every worker down and stop its process; idempotent."""
        self.chain.close()
        _LIVE.discard(self)

    # ---- generation -----------------------------------------------------------------------------------------
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.checkpoint)
        return self._tokenizer

    def generation(self) -> GenerationSettings:
        """EOS ids and pad id of the checkpoint (its generation_config.json, read as transformers reads it)."""
        if self._generation is None:
            self._generation = generation_settings(self.checkpoint)
        return self._generation

    def generate(self, prompts: Any, max_new_tokens: int = 16, mode: str = "sequential", micro_batches: int = 1,
                 schedule: str = "no-bubbles", temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 attention_mask: torch.Tensor | None = None, chat: bool = False,
                 stop_at_eos: bool | None = None, on_token: Callable[[dict, list[int]], Any] | None = None
                 ) -> RunResult:
        """Generate up to `max_new_tokens` for prompts (str, list of str, or ids (B,T)) through the chain of workers.

        `chat`: each text prompt is a user message put through the checkpoint's chat template (with the
        generation prompt). `stop_at_eos` (default: True for chat prompts, else False): a row that produced
        an EOS id gets the pad id afterwards and a micro-batch whose rows all finished stops, as in
        transformers' generate. Bad arguments raise KitError before anything is sent: the deployment stays usable.
        `on_token(record, token_ids)`: called on the coordinator as each token arrives (streaming), with the
        token's per_token record (micro-batch `mb`, `step`, `latency_ms`, ...) and the micro-batch's new ids;
        a true return stops the run at that token boundary (every micro-batch: no further step is sent, those
        in flight are drained). Its micro-batch's next step is sent when it returns, so in sequential mode its
        time is in no step's latency (with micro-batches in flight, the tokens that arrive meanwhile wait for it).
        An exception it raises ends the run like any failure: it reaches the caller and the deployment is closed
        (frames were in flight). Not with an adaptive deployment (KitError).
        """
        if on_token is not None and self.adaptive is not None:
            raise KitError("on_token is not available on an adaptive deployment (its re-planning uses the hook)")
        if self.adaptive is not None:  # deployed with adaptive=AdaptivePolicy(...): runtime.adaptive drives the run
            return self.adaptive.generate(self, prompts, max_new_tokens, mode, micro_batches, schedule, temperature,
                                          top_p, seed, attention_mask, chat, stop_at_eos)
        ids, mask, texts_in, k = self.check_request(prompts, max_new_tokens, mode, micro_batches, schedule,
                                                    temperature, top_p, attention_mask, chat)
        eos_ids, pad_id = self._stop_tokens(chat if stop_at_eos is None else bool(stop_at_eos))
        try:
            out = self.chain.run_schedule(ids, mask, max_new_tokens, k, schedule,
                                          {"temperature": float(temperature), "top_p": float(top_p), "seed": int(seed)},
                                          eos_ids, pad_id, on_token=on_token)
        except BaseException:  # a failed or interrupted run leaves frames in flight: the deployment is done
            self.close()
            raise
        tokens = out["tokens"]
        text = []
        if texts_in is not None:
            tok = self.tokenizer()
            text = [tok.decode(t, skip_special_tokens=True) for t in tokens]
        summary = _summarise(out["per_token"], ids.shape[0], out["wall_s"], mode, k, schedule)
        return RunResult(tokens=tokens, text=text, per_token=out["per_token"], per_stage=out["per_stage"],
                         summary=summary, prediction=self.prediction(k, max_new_tokens),
                         stages=[asdict(s) for s in self.info])

    def check_request(self, prompts: Any, max_new_tokens: int, mode: str, micro_batches: int, schedule: str,
                      temperature: float, top_p: float, attention_mask: torch.Tensor | None, chat: bool):
        """(ids (B,T), mask (B,T), texts or None, K): a generate request checked and encoded; KitError naming the
        argument before anything is sent, so the deployment stays usable."""
        if self.closed:
            raise KitError("this deployment is closed (deploy again)")
        if mode not in MODES:
            raise KitError(f"mode {mode!r}: choose sequential or pipelined")
        if schedule not in SCHEDULES:
            raise KitError(f"schedule {schedule!r}: choose bubbles or no-bubbles")
        if max_new_tokens < 1:
            raise KitError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        check_sampling(temperature, top_p)
        ids, mask, texts_in = self._encode(prompts, attention_mask, chat)
        k = 1 if mode == "sequential" else int(micro_batches)
        if not 1 <= k <= ids.shape[0]:
            raise KitError(f"micro_batches={micro_batches} must be between 1 and the number of prompts ({ids.shape[0]})")
        return ids, mask, texts_in, k

    def _stop_tokens(self, stop: bool) -> tuple[tuple[int, ...], int | None]:
        """(EOS ids, pad id) when generation stops at EOS, else ((), None)."""
        if not stop:
            return (), None
        gs = self.generation()
        if not gs.eos_token_ids:
            raise KitError(f"checkpoint {self.checkpoint} names no EOS token (generation_config.json, config.json): "
                           f"cannot stop at EOS")
        return tuple(int(e) for e in gs.eos_token_ids), gs.pad_token_id

    def _encode(self, prompts: Any, mask: torch.Tensor | None, chat: bool = False):
        if isinstance(prompts, str):
            prompts = [prompts]
        if isinstance(prompts, (list, tuple)) and all(isinstance(p, str) for p in prompts):  # [] too: no prompt
            ids, m = encode_prompts(self.tokenizer(), list(prompts), chat=chat)
            return ids, m, list(prompts)
        if chat:
            raise KitError("chat prompts must be text (the chat template applies to text), not token ids")
        ids = torch.as_tensor(prompts, dtype=torch.int64)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise KitError(f"prompt ids must be (B, T) with B, T >= 1, got shape {tuple(ids.shape)}")
        vocab = load_llama_config(self.checkpoint).vocab_size
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise KitError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        m = torch.ones_like(ids) if mask is None else torch.as_tensor(mask, dtype=torch.int64)
        if m.shape != ids.shape:
            raise KitError(f"attention mask of shape {tuple(m.shape)} does not match the prompt ids {tuple(ids.shape)}")
        return ids, m, None

    def prediction(self, micro_batches: int = 1, tokens: int = 8) -> dict:
        """The planner's figures for this plan (planning's evaluate on the problem if known, else the plan's own)."""
        if self.problem is not None:
            ev = evaluate(self.problem, self.plan, micro_batches=micro_batches, tokens=tokens)
            return ev.to_dict(timelines=False)  # figures, not the simulated task records
        keys = ("latency_ms", "bottleneck_ms", "throughput_per_s", "stage_compute_ms", "stage_transfer_ms")
        return {k: getattr(self.plan, k) for k in keys if hasattr(self.plan, k)}

    def stats(self, clear: bool = True) -> list[dict]:
        """Fetch every worker's timing records and byte counters."""
        return self.chain.stats(clear)


def _summarise(per_token: list[dict], rows: int, wall_s: float, mode: str, k: int, schedule: str) -> dict:
    """Prefill and per-token ms (median, min, max) and tokens/s; tokens counted as generated (stops at EOS included)."""
    first = [r["latency_ms"] for r in per_token if r["step"] == 0]
    rest = [r["latency_ms"] for r in per_token if r["step"] > 0]
    generated = sum(r["rows"] for r in per_token)
    decoded = sum(r["rows"] for r in per_token if r["step"] > 0)
    steps = 1 + max((r["step"] for r in per_token), default=0)
    return {"mode": mode, "micro_batches": k, "schedule": schedule, "prompts": rows, "new_tokens": steps,
            "generated_tokens": generated, "wall_s": wall_s, "prefill_ms": statistics.median(first) if first else None,
            "per_token_ms": statistics.median(rest) if rest else None,
            "per_token_ms_min": min(rest) if rest else None, "per_token_ms_max": max(rest) if rest else None,
            "tokens_per_s": generated / wall_s if wall_s > 0 else None,
            "decode_tokens_per_s": decoded / (wall_s - max(first) / 1e3)
            if decoded and first and wall_s > max(first) / 1e3 else None}


def stage_configs(stages: list[Stage], testbed: Testbed, handles: list[WorkerHandle], checkpoint: str | Path,
                  dtype: str = "float32", device_map: dict[str, str] | None = None,
                  threads: dict[str, int] | int | None = None, compile: bool = False) -> list[StageConfig]:
    """What each stage's worker is told: its units, checkpoint path on its host, torch device and threads, next hop,
    and whether to build the compiled decode path (`compile`)."""
    src = testbed.source.name
    out = []
    for i, (s, h) in enumerate(zip(stages, handles)):
        dev = testbed.device(s.device)
        last = i + 1 == len(stages)
        n_threads = threads.get(s.device) if isinstance(threads, dict) else threads
        if n_threads is None:
            # the device's rule (testbed.Device.threads), which its profile was measured with: local
            # workers share this machine's cores (oversubscribed torch threads spin and slow all down)
            n_threads = dev.threads()
        out.append(StageConfig(
            stage=i, model_path=dev.model_path or str(Path(checkpoint).resolve()), start=s.start, end=s.end,
            device_name=s.device, dtype=dtype, device=(device_map or {}).get(s.device, "cpu"), threads=n_threads,
            next=None if last else PeerAddress(handles[i + 1].host, handles[i + 1].port),
            shape_next=None if last else link_shape(testbed, s.device, stages[i + 1].device),
            shape_return=link_shape(testbed, s.device, src) if last else None, compile=bool(compile)))
    return out


def check_plan(stages: list[Stage], testbed: Testbed, checkpoint: str | Path, problem: Problem | None = None) -> None:
    """KitError unless the stages cover the checkpoint's units [0, N+2) exactly, in order, on the testbed's
    devices, unit 0 on the source; with a problem, unless every device holds its stages (memory budgets)."""
    total = n_units(load_llama_config(checkpoint).num_hidden_layers)
    validate_ranges([(s.start, s.end) for s in stages], total, "plan")
    for s in stages:
        if s.device not in testbed.names:
            raise KitError(f"plan: units {s.start}:{s.end} on unknown device {s.device!r} "
                           f"(testbed {testbed.name}: {', '.join(testbed.names)})")
    src = testbed.source.name
    if stages[0].device != src:
        raise KitError(f"plan: unit 0 must run on the source device {src}, not {stages[0].device}")
    if problem is not None:
        f = figures(problem, stages)
        if not f["feasible"]:
            raise KitError(f"plan does not fit the devices' memory for this workload: {f['reason']}")


def deploy(plan: Plan, testbed: Testbed, checkpoint: str | Path, dtype: str = "float32",
           device_map: dict[str, str] | None = None, problem: Problem | None = None,
           launch_opts: LaunchOptions | dict | None = None, threads: dict[str, int] | int | None = None,
           fault_timeout: float | None = None, load_timeout: float = LOAD_TIMEOUT_S, adaptive: Any = None,
           compile: bool = False) -> Deployment:
    """Start one worker per stage of `plan` on its testbed device, load the stages, chain them; a Deployment.

    `compile`: every worker builds the compiled decode path (static KV cache + torch.compile) and compiles it
    while loading (minutes on CPU: give a `load_timeout` to match).
    `launch_opts`: options per launch kind ({"ssh": {...}} or a LaunchOptions); None = default_launch_options.
    `fault_timeout`: the silence bound in seconds, in every phase (None: the launch options' `silence_s`, 5 s by
    default); a worker silent longer, from its start to the end of generation, is a PipelineError naming its
    stage, device, host and phase. `load_timeout`: the bound on a whole load that keeps sending PROGRESS.
    `adaptive`: a runtime.adaptive.AdaptivePolicy: generate re-plans and moves shards while serving (off: None).
    """
    stages = list(plan.stages)
    if not stages:
        raise KitError("plan has no stages")
    src = testbed.source.name
    if not Path(checkpoint).is_dir():
        raise KitError(f"checkpoint {checkpoint} is not a directory")
    check_plan(stages, testbed, checkpoint, problem)
    devices = [testbed.device(s.device) for s in stages]
    _install_hooks()
    token = new_token()
    opts = default_launch_options(testbed) if launch_opts is None else LaunchOptions.of(launch_opts)
    if fault_timeout is not None:
        opts = dataclasses.replace(opts, silence_s=float(fault_timeout))
    chain = Chain(stages, token, opts.silence_s, wire.shaper_for(link_shape(testbed, src, stages[0].device)))
    dep = Deployment(plan, testbed, checkpoint, dtype, chain, problem)
    dep.adaptive = adaptive
    dep.deploy_args = dict(dtype=dtype, device_map=device_map, launch_opts=opts, threads=threads, compile=compile,
                           fault_timeout=fault_timeout, load_timeout=load_timeout)
    _LIVE.add(dep)
    try:
        try:
            start_workers(devices, token, opts, ready=chain.attach, watch=chain.watch)
        except StartError as e:  # name the stage; a fault found by `attach` is already named
            if isinstance(e.cause, PipelineError):
                raise e.cause from None
            raise PipelineError(f"{chain.where(e.index)}: {e.cause}") from None
        configs = stage_configs(stages, testbed, chain.handles, checkpoint, dtype, device_map, threads, compile)
        chain.load(configs, load_timeout)
    except BaseException:
        dep.close()
        raise
    return dep
