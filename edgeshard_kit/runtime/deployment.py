"""The coordinator on the source: deploy a plan to workers, run sequential or pipelined generation, time it."""

from __future__ import annotations

import atexit
import itertools
import queue
import signal
import statistics
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgeshard_kit.runtime import wire
from edgeshard_kit.runtime.launchers import WorkerHandle, launcher_for, new_token
from edgeshard_kit.core.units import KitError, Stage

HEARTBEAT_S = 0.5  # how often the coordinator pings every worker while it waits for tokens
FAULT_TIMEOUT_S = 5.0  # a worker silent this long (no pong, no frame) is declared stopped
LOAD_TIMEOUT_S = 600.0  # loading a stage's weights (a 7B shard from a slow disk)
_LIVE: "weakref.WeakSet[Deployment]" = weakref.WeakSet()
_HOOKED = False


class PipelineError(KitError):
    """A stage failed: its message names the stage, device and host."""


@dataclass(frozen=True)
class StageInfo:
    """A deployed stage: where it runs and what loading it cost (seconds, bytes)."""

    index: int
    device: str
    start: int
    end: int
    host: str
    port: int
    load_s: float = 0.0
    rss_bytes: int = 0
    param_bytes: int = 0
    pid: int = 0
    hostname: str = ""

    def where(self) -> str:
        return f"stage {self.index} (units {self.start}:{self.end}) on device {self.device}, host {self.host}:{self.port}"


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

    def __init__(self, plan: Any, testbed: Any, checkpoint: str, dtype: str, handles: list[WorkerHandle],
                 token: bytes, problem: Any = None, fault_timeout: float = FAULT_TIMEOUT_S):
        self.plan, self.testbed, self.checkpoint, self.dtype = plan, testbed, str(checkpoint), dtype
        self.stages: list[Stage] = list(plan.stages)
        self.handles = handles
        self.problem = problem
        self.fault_timeout = fault_timeout
        self._token = token
        self.conns: list[wire.Connection] = []
        self.info: list[StageInfo] = []
        self.events: queue.Queue = queue.Queue()
        self.closed = False
        self._req = itertools.count()
        self._tokenizer = None

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Shut every worker down and stop its process; idempotent."""
        if self.closed:
            return
        self.closed = True
        for c in self.conns:
            try:
                c.send("shutdown")
            except OSError:
                pass
            c.close()
        for h in self.handles:
            try:
                h.stop(3.0)
            except Exception:  # stopping the others matters more than one failure here
                pass
        _LIVE.discard(self)

    def _where(self, i: int) -> str:
        if i < len(self.info):
            return self.info[i].where()
        s, h = self.stages[i], self.handles[i]
        return f"stage {i} (units {s.start}:{s.end}) on device {s.device}, host {h.host}:{h.port}"

    def _reader(self, i: int, conn: wire.Connection) -> None:
        try:
            while True:
                self.events.put(("frame", i, conn.recv(), time.perf_counter()))
        except (wire.ProtocolError, OSError) as e:
            self.events.put(("closed", i, str(e), time.perf_counter()))

    # ---- generation -----------------------------------------------------------------------------------------
    def tokenizer(self):
        if self._tokenizer is None:
            from edgeshard_kit.model.checkpoint import load_tokenizer

            self._tokenizer = load_tokenizer(self.checkpoint)
        return self._tokenizer

    def generate(self, prompts: Any, max_new_tokens: int = 16, mode: str = "sequential", micro_batches: int = 1,
                 schedule: str = "no-bubbles", temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 attention_mask: torch.Tensor | None = None) -> RunResult:
        """Generate `max_new_tokens` for prompts (str, list of str, or ids (B,T)) through the chain of workers."""
        from edgeshard_kit.runtime.chain import run_schedule

        if self.closed:
            raise KitError("this deployment is closed (deploy again)")
        if mode not in ("sequential", "pipelined"):
            raise KitError(f"mode {mode!r}: choose sequential or pipelined")
        if schedule not in ("bubbles", "no-bubbles"):
            raise KitError(f"schedule {schedule!r}: choose bubbles or no-bubbles")
        if max_new_tokens < 1:
            raise KitError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ids, mask, texts_in = self._encode(prompts, attention_mask)
        k = 1 if mode == "sequential" else int(micro_batches)
        if not 1 <= k <= ids.shape[0]:
            raise KitError(f"micro_batches={micro_batches} must be between 1 and the number of prompts ({ids.shape[0]})")
        try:
            out = run_schedule(self, ids, mask, max_new_tokens, k, schedule,
                               {"temperature": float(temperature), "top_p": float(top_p), "seed": int(seed)})
        except BaseException:  # a failed or interrupted run leaves frames in flight: the deployment is done
            self.close()
            raise
        tokens = out["tokens"]
        text = []
        if texts_in is not None:
            tok = self.tokenizer()
            text = [tok.decode(t, skip_special_tokens=True) for t in tokens]
        summary = _summarise(out["per_token"], ids.shape[0], max_new_tokens, out["wall_s"], mode, k, schedule)
        return RunResult(tokens=tokens, text=text, per_token=out["per_token"], per_stage=out["per_stage"],
                         summary=summary, prediction=self.prediction(k, max_new_tokens), stages=[asdict(s) for s in self.info])

    def _encode(self, prompts: Any, mask: torch.Tensor | None):
        if isinstance(prompts, str):
            prompts = [prompts]
        if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, str) for p in prompts):
            from edgeshard_kit.model.generate import encode_prompts

            ids, m = encode_prompts(self.tokenizer(), list(prompts))
            return ids, m, list(prompts)
        ids = torch.as_tensor(prompts, dtype=torch.int64)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise KitError(f"prompt ids must be (B, T) with B, T >= 1, got shape {tuple(ids.shape)}")
        m = torch.ones_like(ids) if mask is None else torch.as_tensor(mask, dtype=torch.int64)
        return ids, m, None

    def prediction(self, micro_batches: int = 1, tokens: int = 8) -> dict:
        """The planner's figures for this plan (plan.evaluate on the problem if known, else the plan's own)."""
        from edgeshard_kit.planning import problem as planmod

        if self.problem is not None:
            ev = planmod.evaluate(self.problem, self.plan, micro_batches=micro_batches, tokens=tokens)
            return {k: v for k, v in ev.items() if not k.startswith("timeline_")}  # records, not figures
        keys = ("latency_ms", "bottleneck_ms", "throughput_per_s", "stage_compute_ms", "stage_transfer_ms")
        return {k: getattr(self.plan, k) for k in keys if hasattr(self.plan, k)}

    def stats(self, clear: bool = True) -> list[dict]:
        """Fetch every worker's timing records and byte counters."""
        from edgeshard_kit.runtime.chain import request_all

        return request_all(self, "stats", "stats", clear=clear)


def _summarise(per_token: list[dict], rows: int, steps: int, wall_s: float, mode: str, k: int, schedule: str) -> dict:
    first = [r["latency_ms"] for r in per_token if r["step"] == 0]
    rest = [r["latency_ms"] for r in per_token if r["step"] > 0]
    return {"mode": mode, "micro_batches": k, "schedule": schedule, "prompts": rows, "new_tokens": steps,
            "wall_s": wall_s, "prefill_ms": statistics.median(first) if first else None,
            "per_token_ms": statistics.median(rest) if rest else None,
            "per_token_ms_min": min(rest) if rest else None, "per_token_ms_max": max(rest) if rest else None,
            "tokens_per_s": rows * steps / wall_s if wall_s > 0 else None,
            "decode_tokens_per_s": rows * (steps - 1) / (wall_s - max(first) / 1e3)
            if steps > 1 and first and wall_s > max(first) / 1e3 else None}


def default_launch_opts(testbed: Any) -> dict:
    """How to reach the testbed's devices when the caller says nothing: an emulated (netns) testbed's SSH options."""
    if getattr(testbed, "emulation", "app") == "netns":
        from edgeshard_kit.testbed import netns
        return netns.launch_opts(testbed)  # KitError when the testbed is not up
    return {}


def deploy(plan: Any, testbed: Any, checkpoint: str | Path, dtype: str = "float32",
           device_map: dict[str, str] | None = None, problem: Any = None, launch_opts: dict | None = None,
           threads: dict[str, int] | int | None = None, fault_timeout: float = FAULT_TIMEOUT_S,
           load_timeout: float = LOAD_TIMEOUT_S) -> Deployment:
    """Start one worker per stage of `plan` on its testbed device, load the stages, chain them; a Deployment."""
    from edgeshard_kit.runtime.chain import connect_stages

    stages = list(plan.stages)
    if not stages:
        raise KitError("plan has no stages")
    for s in stages:
        testbed.device(s.device)  # KitError naming an unknown device
    src = testbed.source.name
    if stages[0].device != src:
        raise KitError(f"plan: unit 0 must run on the source device {src}, not {stages[0].device}")
    if not Path(checkpoint).is_dir():
        raise KitError(f"checkpoint {checkpoint} is not a directory")
    _install_hooks()
    token = new_token()
    opts = default_launch_opts(testbed) if launch_opts is None else launch_opts

    def start(s: Stage) -> WorkerHandle:
        dev = testbed.device(s.device)
        return launcher_for(dev, **opts.get(dev.launch, {})).start(dev, token)

    handles: list[WorkerHandle] = []
    with ThreadPoolExecutor(max_workers=len(stages)) as ex:
        futures = [ex.submit(start, s) for s in stages]
        errors = []
        for f in futures:
            try:
                handles.append(f.result())
            except Exception as e:
                errors.append(e)
    if errors:
        for h in handles:
            h.stop(3.0)
        raise errors[0]
    dep = Deployment(plan, testbed, str(checkpoint), dtype, handles, token, problem, fault_timeout)
    _LIVE.add(dep)
    try:
        connect_stages(dep, device_map or {}, threads, load_timeout)
    except BaseException:
        dep.close()
        raise
    return dep


def add_commands(sub) -> None:
    """Extend `edgeshard generate` (generate.py's parser) with --testbed/--plan/...; dispatch to the runtime."""
    from edgeshard_kit.cli import runtime as runtime_cli

    p = sub.choices.get("generate")
    if p is None:
        return
    runtime_cli.add_generate_args(p)
    local = p.get_default("func")

    def dispatch(args):
        if args.testbed:
            return runtime_cli.run_generate(args)
        return local(args)

    p.set_defaults(func=dispatch)


def add_bench_commands(bench_sub) -> None:
    from edgeshard_kit.cli.runtime import add_bench_commands as add

    add(bench_sub)  # pipeline-latency, pipeline-throughput, wire
