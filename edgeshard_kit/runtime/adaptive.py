"""Adaptive serving: while generating, detect a drifting link or stage or a lost worker, re-plan, switch plans.

`deploy(..., adaptive=AdaptivePolicy(...))` makes `Deployment.generate` run `generate_adaptive`:

1. **Detect** (sequential mode): after every `check_every`-th decoded token the workers' timing records of
   that token feed a `drift.DriftDetector` against the plan's prediction (`compute i`, `link i`, `token`).
2. **Re-plan**: a drift event updates the problem with the measured figures (link Mbps from the frame's bytes
   over its measured time; a device's unit times scaled by measured / predicted compute), a dead or silent
   worker removes its device; `planning.replan.decide` re-solves under the same objective and memory budgets
   and moves only when the optimum beats the current plan by more than `tolerance`.
3. **Move without losing work**: the new plan's workers are deployed in a background thread while the old
   pipeline keeps generating; at the first token boundary after they are loaded the old run stops
   (`Chain.run_schedule`'s `on_token` hook), the old workers are shut down, and the new deployment rebuilds
   every KV cache by RECOMPUTATION: it prefills prompt + tokens generated so far, then decoding goes on. After
   a worker death the same path runs (synchronously: the deploy is part of the reported pause).

Greedy tokens are identical to one-device generation across any number of switches (prefill of the extended
prompt gives the next token the incremental decode would have given). With sampling (temperature > 0) each
segment re-seeds its sampler, so tokens differ from a run without switches. In pipelined mode the
micro-batches stop at the same boundary (tokens past the slowest one are regenerated); drift detection there
is not implemented (forced switches and worker deaths are).
"""

from __future__ import annotations

import math
import re
import statistics
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.units import Stage, format_stages
from edgeshard_kit.planning.objectives import OBJECTIVES
from edgeshard_kit.planning.plan import Plan, make_plan
from edgeshard_kit.planning.replan import LINK_SCOPES, decide, with_device_scale, with_measured_link, without_device
from edgeshard_kit.runtime.chain import PipelineError
from edgeshard_kit.runtime.deployment import Deployment, RunResult, _summarise, deploy
from edgeshard_kit.runtime.drift import DriftDetector, DriftSettings, Evidence, measured_mbps, measured_signals, \
    predicted_signals

__all__ = ["AdaptivePolicy", "generate_adaptive"]
_FAULT_STAGE = re.compile(r"stage (\d+) \(units \d+:\d+\) on device ([^,\s]+)")


@dataclass(frozen=True)
class AdaptivePolicy:
    """How a deployment adapts while serving: detection knobs, re-plan tolerance, forced switches (tests, demos).

    `force`: ((after_token, stages), ...) switch to `stages` (a Plan or a list of Stage / (device, start, end))
    once `after_token` tokens are generated, whatever the timings say; the run stops at exactly that token and
    waits for the new workers to load (deterministic: tests, demos). Drift moves load in the background instead.
    """

    objective: str = "latency"
    tolerance: float = 0.1  # a new plan must beat the current one by more than this fraction of its cost
    detect: bool = True
    drift: DriftSettings = field(default_factory=DriftSettings)
    check_every: int = 1  # pull the workers' timing records every N decoded tokens (one round trip each)
    resume_on_fault: bool = True
    amortize: bool = True  # drift moves only when the predicted saving over the tokens left exceeds a load's time
    link_scope: str = "endpoint"  # a drifting link updates: "endpoint" its non-source endpoint's links, "link" itself
    max_switches: int = 16
    force: tuple = ()
    observer: Any = field(default=None, compare=False)  # called with every per-token record (live plots, tests)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise KitError(f"adaptive.objective: {self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        if not 0 <= self.tolerance < 1:
            raise KitError(f"adaptive.tolerance: expected a fraction in [0, 1), got {self.tolerance!r}")
        if self.link_scope not in LINK_SCOPES:
            raise KitError(f"adaptive.link_scope: {self.link_scope!r} is not one of {', '.join(LINK_SCOPES)}")
        for f in ("check_every", "max_switches"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise KitError(f"adaptive.{f}: expected an integer >= 1, got {v!r}")
        forced = []
        for j, item in enumerate(self.force):
            try:
                at, stages = item
                stages = stages.stages if isinstance(stages, Plan) else stages
                stages = tuple(s if isinstance(s, Stage) else Stage(*s) for s in stages)
            except (TypeError, ValueError):
                raise KitError(f"adaptive.force[{j}]: expected (after_token, stages), got {item!r}") from None
            if isinstance(at, bool) or not isinstance(at, int) or at < 1 or not stages:
                raise KitError(f"adaptive.force[{j}]: after_token must be an integer >= 1 and stages non-empty")
            forced.append((at, stages))
        object.__setattr__(self, "force", tuple(sorted(forced, key=lambda x: x[0])))

    def generate(self, dep: Deployment, *args: Any, **kwargs: Any) -> RunResult:
        """`Deployment.generate` with this policy (the deployment calls this when deployed with `adaptive=`)."""
        return generate_adaptive(dep, self, *args, **kwargs)


@dataclass
class _Pending:
    """A switch in preparation: the new plan's deployment loading in the background, and its event record."""

    future: Future
    event: dict
    started: float


class _Session:
    """One adaptive `generate` call: segments of generation on the current deployment, switches between them."""

    def __init__(self, dep: Deployment, policy: AdaptivePolicy, k: int):
        self.dep, self.policy, self.k = dep, policy, k
        self.problem = dep.problem
        self.detector = DriftDetector(policy.drift)
        self.events: list[dict] = []
        self.pending: _Pending | None = None
        self.forced = list(policy.force)
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.t0 = time.perf_counter()
        self.last_token_t = self.t0
        self.await_first: dict | None = None  # the event whose pause ends with the next token
        self.per_token: list[dict] = []
        self.done = 0  # tokens per row committed before the current segment
        self.live: list[list[int]] = []
        self.rows: list[list[int]] = []
        self.stop_at: int | None = None
        self.segment = 0
        self.total = 0  # tokens per row asked for (set by generate_adaptive)
        self.load_s = max((i.load_s for i in getattr(dep, "info", ()) or ()), default=0.0)  # the longest load measured
        self._rebase()

    # ---- detection --------------------------------------------------------------------------------------------
    def _rebase(self, token: int | None = None) -> None:
        if self.problem is not None:
            pred, details = predicted_signals(self.problem, self.dep.stages)
            self.detector.rebase(pred, details, token)

    def on_token(self, rec: dict, toks: list[int]) -> bool:
        """run_schedule's hook: record the token, check drift and forced switches; True = stop at this boundary."""
        now = time.perf_counter()
        step, mb = int(rec["step"]), int(rec["mb"])
        for r, v in zip(self.rows[mb], toks):
            self.live[r].append(v)
        token = self.done + step + 1  # tokens per row once this one is in
        self.per_token.append({**rec, "step": self.done + step, "t_ms": (now - self.t0) * 1e3,
                               "segment": self.segment, "plan": format_stages(self.dep.stages),
                               "recompute": step == 0 and self.done > 0})
        if self.policy.observer is not None:
            self.policy.observer(self.per_token[-1])
        if self.await_first is not None:
            self.await_first["pause_ms"] = (now - self.last_token_t) * 1e3
            self.await_first = None
        self.last_token_t = now
        if self.stop_at is not None:
            return True
        p = self.policy
        if (p.detect and self.problem is not None and step > 0 and self.pending is None
                and step % p.check_every == 0):
            chain = self.dep.chain  # pipelined: other micro-batches are in flight, their TOKEN frames are kept
            stats = chain.stats(clear=False) if self.k == 1 else chain.stats_in_flight()
            recs = [r for r in stats for r in r["records"]
                    if r.get("req") == rec["req"] and r.get("step") == step and r.get("mb", mb) == mb]
            # pipelined, a token's latency includes queueing behind the other micro-batches: stage signals only
            latency = rec["latency_ms"] if self.k == 1 else None
            ev = self.detector.observe(token, measured_signals(recs, latency, self.dep.stages))
            if ev:
                self._on_drift(ev, token)
        if self.pending is None and self.forced and self.forced[0][0] <= token and self._switches() < p.max_switches:
            _, stages = self.forced.pop(0)
            plan = make_plan(self.problem, stages, p.objective) if self.problem is not None else \
                Plan(p.objective, stages, math.nan, math.nan, math.nan)
            self._prepare(plan, {"cause": "forced", "evidence": [], "predicted_gain": None})
            self.stop_at = token
            return True
        if self.pending is not None and self.pending.future.done():
            if self.pending.future.exception() is not None:  # the new plan could not start: keep serving on the old
                self.pending.event.update(moved=False, error=str(self.pending.future.exception()))
                self.events.append(self.pending.event)
                self.pending = None
                return False
            self.stop_at = token
            return True
        return False

    def _switches(self) -> int:
        return sum(1 for e in self.events if e.get("moved"))

    def _on_drift(self, evidence: list[Evidence], token: int) -> None:
        """Update the problem with the evidence, re-solve, move if the gain beats the tolerance."""
        prob, scaled = self.problem, set()
        for ev in evidence:
            d = ev.detail
            if ev.signal.startswith("link"):
                prob = with_measured_link(prob, d["src"], d["dst"], max(measured_mbps(ev), 1e-3),
                                          self.policy.link_scope)
                ev.detail["mbps_measured"] = measured_mbps(ev)
            elif ev.signal.startswith("compute") and d["device"] not in scaled and ev.predicted_ms > 0:
                scaled.add(d["device"])
                prob = with_device_scale(prob, d["device"], ev.measured_ms / ev.predicted_ms)
        self.problem = prob
        dec = decide(prob, self.dep.stages, self.policy.objective, self.k, self.policy.tolerance)
        event = {"cause": "drift", "evidence": [e.to_dict() for e in evidence], "predicted_gain": dec.gain,
                 "predicted_old_ms": dec.current_ms, "predicted_new_ms": dec.new_ms, "reason": dec.reason}
        worth, why = self._worth_moving(dec, token)
        if not worth:
            event["reason"] = f"{dec.reason}; {why}: nothing moves"
        if dec.move and worth and self._switches() < self.policy.max_switches:
            self._prepare(dec.plan, event)
        else:
            self.events.append(self._event(event, token, self.dep.stages, moved=False))
            self._rebase(token)  # the measured level is the new baseline: no flapping

    def _worth_moving(self, dec, token: int) -> tuple[bool, str]:
        """(move?, why not): with `amortize`, the predicted saving (the gain's fraction of the measured per-token
        latency, median of the last detector window; pipelined: of the predicted one) over the tokens left must
        exceed the longest load measured on this deployment: loading the new workers beside the old ones slows the old pipeline on
        shared devices (measured: a 13% gain with 79 tokens left cost 60 tokens at 2-3x latency during the load)."""
        if not (self.policy.amortize and dec.move) or math.isinf(dec.current_ms):
            return True, ""
        left = max(self.total - token, 0)
        recent = [r["latency_ms"] for r in self.per_token[-self.policy.drift.window:] if not r.get("recompute")]
        now_ms = statistics.median(recent) if self.k == 1 and recent else dec.current_ms
        saving_ms, cost_ms = dec.gain * now_ms * left, self.load_s * 1e3
        if saving_ms > cost_ms:
            return True, ""
        return False, (f"saving {dec.gain:.0%} of {now_ms:.0f} ms x {left} tokens left = {saving_ms / 1e3:.1f} s "
                       f"<= the longest load's {self.load_s:.1f} s")

    def _event(self, event: dict, token: int, new: tuple | list, moved: bool) -> dict:
        return {"t_ms": (time.perf_counter() - self.t0) * 1e3, "token": token,
                "old_plan": format_stages(self.dep.stages), "new_plan": format_stages(new), "moved": moved,
                "pause_ms": 0.0, "tokens_recomputed": 0, "tokens_discarded": 0, "load_s": 0.0, **event}

    # ---- switching ----------------------------------------------------------------------------------------------
    def _deploy(self, plan: Plan) -> Deployment:
        d = self.dep
        return deploy(plan, d.testbed, d.checkpoint, problem=self.problem, **getattr(d, "deploy_args", {"dtype": d.dtype}))

    def _prepare(self, plan: Plan, event: dict) -> None:
        tok = self.done + max((len(x) for x in self.live), default=0)
        self.pending = _Pending(self.pool.submit(self._deploy, plan), self._event(event, tok, plan.stages, True),
                                time.perf_counter())

    def _adopt(self, new: Deployment, event: dict, token: int) -> None:
        """Make `new` the deployment's pipeline (the old workers shut down); its first token ends the pause."""
        old = self.dep.chain
        self.dep.plan, self.dep.stages, self.dep.chain = new.plan, new.stages, new.chain
        if self.problem is not None:
            self.dep.problem = self.problem
        old.close()
        event.update(token=token, load_s=max((i.load_s for i in new.info), default=0.0))
        self.load_s = max(self.load_s, event["load_s"])
        self.events.append(event)
        self.await_first = event
        self._rebase(token)

    def recover(self, err: PipelineError, token: int) -> None:
        """A worker died or stopped answering: re-plan without its device, deploy, resume (the pause includes it)."""
        m = _FAULT_STAGE.search(str(err))
        lost = m.group(2) if m else None
        old = tuple(self.dep.stages)
        self.dep.chain.close()
        if self.pending is not None:  # a switch in preparation is moot: its plan may use the lost device
            try:
                self.pending.future.result().close()
            except Exception:  # the pending deploy's own failure changes nothing here
                pass
            self.pending = None
        if self.problem is None:
            raise KitError(f"adaptive: cannot resume after a worker fault without the planning problem "
                           f"(deploy(..., problem=...)): {err}") from err
        src = self.dep.testbed.source.name
        if lost is not None and lost != src and lost in self.problem.names:
            self.problem = without_device(self.problem, lost)
        dec = decide(self.problem, old, self.policy.objective, self.k, self.policy.tolerance)
        plan = dec.plan if dec.move else make_plan(self.problem, old, self.policy.objective)
        event = self._event({"cause": "fault", "evidence": [{"error": str(err), "device": lost}],
                             "predicted_gain": dec.gain, "predicted_old_ms": dec.current_ms,
                             "predicted_new_ms": dec.new_ms, "reason": dec.reason}, token, plan.stages, True)
        new = self._deploy(plan)
        self._adopt(new, event, token)
        self.await_first = event  # the pause runs from the last token before the fault

    def close(self) -> None:
        """End the call: a switch still in preparation is recorded as not made, its workers shut down."""
        if self.pending is not None:
            ev = self.pending.event
            ev.update(moved=False, error=ev.get("error") or "the generation ended before the new plan's workers "
                                                            "were loaded")
            self.events.append(ev)
            try:
                self.pending.future.result().close()
            except Exception:  # a failed background deploy has nothing to close
                pass
            self.pending = None
        self.pool.shutdown(wait=True)


def _finish(gen: list[list[int]], rows: list[list[int]], eos_ids: tuple, pad_id: int | None) -> list[list[int]]:
    """The EOS rule over the whole generation (segments re-start it): pad after a row's first EOS, and cut the
    batch to where its last micro-batch to finish stopped, as Chain.run_schedule and transformers do."""
    if not eos_ids:
        return gen
    out, width = [list(t) for t in gen], 0
    for mb in rows:
        ends = []
        for r in mb:
            hit = next((i for i, v in enumerate(out[r]) if v in eos_ids), None)
            if hit is not None:
                out[r][hit + 1:] = [pad_id] * (len(out[r]) - hit - 1)
            ends.append(len(out[r]) if hit is None else hit + 1)
        width = max(width, max(ends))
    return [t[:width] for t in out]


def generate_adaptive(dep: Deployment, policy: AdaptivePolicy, prompts: Any, max_new_tokens: int = 16,
                      mode: str = "sequential", micro_batches: int = 1, schedule: str = "no-bubbles",
                      temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                      attention_mask: torch.Tensor | None = None, chat: bool = False,
                      stop_at_eos: bool | None = None) -> RunResult:
    """`Deployment.generate` that re-plans and switches plans while it generates; the RunResult's `events`
    hold one record per event (t_ms, token, cause, evidence, old_plan, new_plan, moved, predicted_gain,
    pause_ms, tokens_recomputed, tokens_discarded, load_s). Arguments and errors as `Deployment.generate`."""
    ids, mask, texts_in, k = dep.check_request(prompts, max_new_tokens, mode, micro_batches, schedule, temperature,
                                               top_p, attention_mask, chat)
    n_rows = ids.shape[0]
    eos_ids, pad_id = dep._stop_tokens(chat if stop_at_eos is None else bool(stop_at_eos))
    sample = {"temperature": float(temperature), "top_p": float(top_p), "seed": int(seed)}
    s = _Session(dep, policy, k)
    s.total = max_new_tokens
    s.rows = [p.tolist() for p in torch.tensor_split(torch.arange(n_rows), k)]
    gen: list[list[int]] = [[] for _ in range(n_rows)]
    per_stage: list[dict] = []
    try:
        while s.done < max_new_tokens and not (eos_ids and all(any(v in eos_ids for v in t) for t in gen)):
            x = torch.cat([ids, torch.tensor(gen, dtype=torch.int64)], 1) if s.done else ids
            m = torch.cat([mask, torch.ones(n_rows, s.done, dtype=torch.int64)], 1) if s.done else mask
            s.live, s.stop_at = [[] for _ in range(n_rows)], None
            try:
                out = dep.chain.run_schedule(x, m, max_new_tokens - s.done, k, schedule, sample, eos_ids, pad_id,
                                             on_token=s.on_token)
            except PipelineError as err:
                if not policy.resume_on_fault or s._switches() >= policy.max_switches:
                    raise
                n = min(len(t) for t in s.live)
                for r in range(n_rows):
                    gen[r] += s.live[r][:n]
                s.per_token = [r for r in s.per_token if r["segment"] != s.segment or r["step"] < s.done + n]
                s.done += n
                s.segment += 1
                s.recover(err, s.done)
                s.events[-1]["tokens_recomputed"] = n_rows * (ids.shape[1] + s.done)
                continue
            stopped = set(out.get("stopped", {}))
            n = min((len(s.live[r]) for mb, rs in enumerate(s.rows) if mb not in stopped for r in rs),
                    default=max(len(t) for t in out["tokens"]))
            for r in range(n_rows):
                gen[r] += out["tokens"][r][:n]
            per_stage += [{**r, "step": s.done + r["step"], "segment": s.segment} for r in out["per_stage"]
                          if r["step"] < n]
            dropped = sum(1 for r in s.per_token if r["segment"] == s.segment and r["step"] >= s.done + n)
            s.per_token = [r for r in s.per_token if r["segment"] != s.segment or r["step"] < s.done + n]
            s.done += n
            s.segment += 1
            if s.stop_at is None or s.done >= max_new_tokens:
                break
            pending, s.pending = s.pending, None
            try:
                new = pending.future.result()
            except Exception as e:  # the new plan could not start: go on with the old workers (re-prefilling)
                pending.event.update(moved=False, error=str(e), token=s.done)
                s.events.append(pending.event)
                continue
            pending.event.update(tokens_recomputed=n_rows * (ids.shape[1] + s.done), tokens_discarded=dropped)
            s._adopt(new, pending.event, s.done)
    except BaseException:
        s.close()
        dep.close()
        raise
    s.close()
    tokens = _finish(gen, s.rows, eos_ids, pad_id)
    text = [dep.tokenizer().decode(t, skip_special_tokens=True) for t in tokens] if texts_in is not None else []
    wall_s = time.perf_counter() - s.t0
    steady = [r for r in s.per_token if not r["recompute"]]
    summary = _summarise(steady, n_rows, wall_s, mode, k, schedule)
    summary.update(adaptive=True, events=len(s.events), switches=s._switches(),
                   pause_ms_total=sum(e.get("pause_ms") or 0.0 for e in s.events if e.get("moved")))
    return RunResult(tokens=tokens, text=text, per_token=s.per_token, per_stage=per_stage, summary=summary,
                     prediction=dep.prediction(k, max_new_tokens), stages=[_asdict(i) for i in dep.info],
                     events=s.events)


def _asdict(info: Any) -> dict:
    return {k: getattr(info, k) for k in info.__dataclass_fields__}

