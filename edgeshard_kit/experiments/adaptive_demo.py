"""Notebook 06's live demonstration of adaptive serving: a generation runs in the background while a slider (tc on
the emulated testbed's namespace links) throttles the cloud links, and the per-token latency plot shows the
pipeline re-plan. Without root (no tc) the local testbed runs a forced switch to the plan the planner would choose
at the throttled bandwidth instead. `bench adaptive` (bench/adaptive.py) uses the same testbed and problem.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.units import format_stages
from edgeshard_kit.experiments import steps
from edgeshard_kit.experiments.adaptive import event_rows, latency_timeline, record_adaptive
from edgeshard_kit.experiments.measurements import prompt_ids
from edgeshard_kit.experiments.testbeds import EMULATED, bench_testbed, fit_cpu, scale_memory, with_cloud_mbps
from edgeshard_kit.planning.build import LinkModel, Workload, build_problem
from edgeshard_kit.planning.objectives import solve_objective
from edgeshard_kit.planning.replan import decide
from edgeshard_kit.runtime import wire
from edgeshard_kit.runtime.adaptive import AdaptivePolicy
from edgeshard_kit.runtime.deployment import deploy
from edgeshard_kit.testbed import netns, nsnet
from edgeshard_kit.testbed.inventory import Testbed, load_testbed, testbed_from_dict

TESTBED_KINDS = ("auto", "emulated", "local")
REDRAW_EVERY = 5  # tokens between redraws of the live plot


def adaptive_testbed(checkpoint: str | Path, name: str = "adaptive", subnet: str = "10.78.0",
                     source_share: float = 0.45) -> Testbed:
    """testbed/emulated.yaml under its own name and /24 subnet (`subnet`.0/24), so that it runs beside a
    `bench testbed-prediction` on `emulated`; memory scaled so that the source holds `source_share` of the model
    (0.45: the edge devices cannot hold it without the cloud; 0.6: they can, so the cloud is a choice), CPU quotas
    fitted to this host's cores (testbeds.fit_cpu: quotas beyond the host's cores let contention, not the file,
    set every device's speed)."""
    d = load_testbed(EMULATED).to_dict()
    old = str(d["emulation"]["subnet"]).rsplit(".", 1)[0]
    d["name"], d["emulation"]["subnet"] = name, f"{subnet}.0/24"
    for dev in d["devices"]:
        if dev.get("address"):
            dev["address"] = dev["address"].replace(old + ".", subnet + ".", 1)
    return fit_cpu(scale_memory(testbed_from_dict(d, f"{EMULATED} as {name}"), checkpoint, source_share))


def link_model(testbed: Testbed) -> LinkModel:
    """Idle links priced by the testbed's token bucket: tbf's (emulated) or the kit's app shaper's (local)."""
    burst = nsnet.LINK_BURST_BYTES if testbed.emulation == "netns" else wire.LinkShaper(1.0).burst
    return LinkModel(float(burst), True)


def problem_at(profiles: dict, testbed: Testbed, mbps: float, workload: Workload):
    """The planning problem with every cloud link at `mbps`."""
    return build_problem(profiles, with_cloud_mbps(testbed, mbps), workload, returns="tokens",
                         links=link_model(testbed))


class AdaptiveDemo:
    """A deployment of the latency-optimal plan at `cloud_mbps`, generating in a background thread with
    AdaptivePolicy; `throttle(mbps)` re-shapes the cloud links (emulated testbed: tc) and `widget()` shows a
    slider doing that beside a live per-token latency plot.

    `kind`: "auto" (emulated when this host can: root, sshd, cgroup v1; else local), "emulated" or "local".
    On the local testbed the links cannot change under running workers: a forced switch after `switch_at` tokens
    moves to the optimum at `throttle_mbps` instead (`live` is False). `parallel_profile`: steps.profile_testbed's
    `parallel` (None: one device type after another on the emulated testbed).
    """

    def __init__(self, checkpoint: str | Path, kind: str = "auto", cloud_mbps: float = 200.0,
                 throttle_mbps: float = 0.2, max_new_tokens: int = 60, switch_at: int = 20, prompt_len: int = 16,
                 profile_repeats: int = 3, run: Any = None, parallel_profile: bool | None = None):
        if kind not in TESTBED_KINDS:
            raise KitError(f"testbed: {kind!r} is not one of {', '.join(TESTBED_KINDS)}")
        if not 0 < switch_at < max_new_tokens:
            raise KitError(f"switch_at: {switch_at} must lie inside the {max_new_tokens}-token generation")
        why = netns.unavailable()
        if kind == "emulated" and why:
            raise KitError(f"testbed: emulated requested, but {why}")
        self.live = kind != "local" and not why
        self.checkpoint, self.cloud_mbps, self.throttle_mbps = Path(checkpoint), cloud_mbps, throttle_mbps
        self.tokens, self.switch_at = max_new_tokens, switch_at
        base = adaptive_testbed(checkpoint) if self.live else bench_testbed(checkpoint, cloud_mbps)
        self.testbed = with_cloud_mbps(base, cloud_mbps)
        self.result, self.error, self.thread, self.dep, self.out = None, None, None, None, None
        self.mine = self.live and netns.acquire(self.testbed)  # brought up here: taken down by close()
        self.workload = Workload(prompt_len=prompt_len, gen_tokens=max_new_tokens)
        try:
            self.profiles = steps.profile_testbed(checkpoint, self.testbed, repeats=profile_repeats,
                                                  prompt_len=prompt_len, kv_lens=f"{prompt_len},{prompt_len + 8}",
                                                  run=run, parallel=parallel_profile)
            self.problem = problem_at(self.profiles, self.testbed, cloud_mbps, self.workload)
            self.plan = solve_objective(self.problem, "latency")
            self.decision = decide(problem_at(self.profiles, self.testbed, throttle_mbps, self.workload),
                                   self.plan.stages, "latency")
            self.ids, self.mask = prompt_ids(checkpoint, 1, prompt_len)
        except BaseException:  # a failed (or interrupted) start leaves no testbed behind
            self.close()
            raise
        self.records: list[dict] = []
        self.shaped: list[dict] = []  # every throttle: {token, mbps}

    def summary(self) -> str:
        """One paragraph: the testbed, the plan, what the planner would do at the throttled bandwidth."""
        how = "emulated testbed (tc on the namespace links)" if self.live else "local testbed (no tc: forced switch)"
        return (f"{self.testbed.name}, {how}; plan at {self.cloud_mbps:g} Mbps: {format_stages(self.plan.stages)} "
                f"({self.plan.latency_ms:.1f} ms/token predicted). At {self.throttle_mbps:g} Mbps the planner: "
                f"{self.decision.reason}")

    # ---- the run ----------------------------------------------------------------------------------------------
    def _observe(self, rec: dict) -> None:
        self.records.append(rec)
        if self.out is not None and (len(self.records) % REDRAW_EVERY == 0 or rec.get("recompute")):
            self.redraw()

    def redraw(self) -> None:
        """The live plot, drawn again into the widget's output area (safe from the generation's thread)."""
        fig = latency_timeline(list(self.records), [], title="per-token latency, live (one colour per plan)")
        fig.update_layout(height=380)
        self.out.clear_output(wait=True)
        self.out.append_display_data(fig)

    def start(self) -> "AdaptiveDemo":
        """Deploy and start generating in a background thread (returns at once; `wait()` for the result)."""
        force = () if self.live or not self.decision.move else ((self.switch_at, self.decision.plan.stages),)
        policy = AdaptivePolicy(objective="latency", force=force, observer=self._observe)
        self.dep = deploy(self.plan, self.testbed, self.checkpoint, problem=self.problem, adaptive=policy)

        def work() -> None:
            try:
                self.result = self.dep.generate(self.ids, self.tokens, attention_mask=self.mask)
            except BaseException as e:  # reported by wait()
                self.error = e

        self.thread = threading.Thread(target=work, daemon=True)
        self.thread.start()
        return self

    def throttle(self, mbps: float) -> None:
        """Every cloud link at `mbps` now (emulated testbed: tc under the running workers); local: noted only."""
        self.shaped.append({"token": len(self.records), "mbps": float(mbps)})
        if self.live:
            netns.reshape(with_cloud_mbps(self.testbed, mbps))

    def throttle_after(self, tokens: int, mbps: float, timeout_s: float = 600.0) -> None:
        """Wait until `tokens` tokens are out (or the run ended), then `throttle(mbps)`: the slider, scripted."""
        deadline = time.monotonic() + timeout_s
        while len(self.records) < tokens and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.throttle(mbps)

    def wait(self, timeout_s: float = 1800.0):
        """The RunResult once the generation ends (its error re-raised); the deployment is closed."""
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise KitError(f"the generation did not end within {timeout_s:g} s")
        self.dep.close()
        if self.error is not None:
            raise self.error
        return self.result

    def tokens_match(self) -> bool:
        """The generation's tokens equal one-device generation (transformers)."""
        ref = steps.reference_tokens(self.checkpoint, self.ids, self.tokens, self.mask)
        return self.result.tokens == ref

    # ---- showing it -------------------------------------------------------------------------------------------
    def widget(self):
        """A slider (emulated testbed only) over a live per-token latency plot, redrawn every few tokens."""
        import ipywidgets as w

        self.out = w.Output()
        if not self.live:
            return w.VBox([w.HTML("<i>local testbed: no tc, the links cannot change under running workers; a "
                                  f"forced switch after {self.switch_at} tokens shows the move</i>"), self.out])
        slider = w.FloatLogSlider(value=self.cloud_mbps, base=10, min=-2, max=3, step=0.1,
                                  description="cloud Mbps", continuous_update=False)
        slider.observe(lambda c: self.throttle(c["new"]), names="value")
        return w.VBox([slider, self.out])

    def events(self) -> list[dict]:
        """The run's event records, flat (experiments.adaptive.event_rows)."""
        return event_rows(self.result.events if self.result is not None else [])

    def figure(self):
        """The static timeline: per-token latency, every event and every throttle marked."""
        marks = list(self.result.events) + [{"token": s["token"], "cause": "network", "moved": False,
                                             "new_plan": f"cloud links at {s['mbps']:g} Mbps"} for s in self.shaped]
        return latency_timeline(self.result.per_token, marks)

    def save(self, run: Any) -> dict:
        """Events, per-token records and the timeline into the run folder."""
        return record_adaptive(run, self.result)

    def close(self) -> None:
        """Stop the deployment; take the emulated testbed down if this demo brought it up."""
        if self.dep is not None:
            self.dep.close()
        if self.mine:
            netns.testbed_down(self.testbed)
            self.mine = False
