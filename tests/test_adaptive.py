"""Adaptive serving: the drift detector's hysteresis (synthetic timings), the re-plan decision (hand-computed
optima), and switches mid-generation (forced, and after a SIGKILLed worker) keep greedy tokens identical to
transformers' generate on one device."""

import itertools
import math
import os
import random
import signal

import pytest
import torch

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.units import Stage
from edgeshard_kit.planning.problem import DeviceSpec, LinkSpec, Problem, Unit
from edgeshard_kit.planning.replan import decide, plan_cost, with_device_scale, with_link_mbps, with_measured_link, without_device
from edgeshard_kit.runtime.adaptive import AdaptivePolicy
from edgeshard_kit.runtime.deployment import deploy
from edgeshard_kit.runtime.drift import DriftDetector, DriftSettings, predicted_signals
from edgeshard_kit.planning.build import Workload
from edgeshard_kit.runtime.quickplan import quick_problem
from helpers import plan_of

PROMPTS = ["hello world", "a b c", "the cat sat", "x"]
NEW = 12


# ---- the detector: synthetic timings ------------------------------------------------------------------------
def _events(det: DriftDetector, series: list[float], name: str = "link 1", start: int = 0) -> list[int]:
    out = []
    for t, v in enumerate(series, start=start):
        out += [e.token for e in det.observe(t, {name: v})]
    return out


def test_steady_and_noisy_timings_raise_nothing():
    rng = random.Random(0)
    det = DriftDetector(DriftSettings(), {"link 1": 5.0})
    assert _events(det, [5.0] * 300) == []
    # +-40% noise on single tokens and a 10x spike every 10th token: the window's median stays near 5 ms
    noisy = [5.0 * rng.uniform(0.6, 1.4) if t % 10 else 50.0 for t in range(500)]
    assert _events(det, noisy, start=300) == []


def test_a_step_change_raises_one_event_with_evidence():
    det = DriftDetector(DriftSettings(window=8, hold=3), {"link 1": 0.1}, {"link 1": {"src": "a", "dst": "b"}})
    series = [0.1] * 50 + [6.0] * 200
    ev = []
    for t, v in enumerate(series):
        ev += det.observe(t, {"link 1": v})
    assert len(ev) == 1
    e = ev[0]
    assert e.signal == "link 1" and e.predicted_ms == 0.1 and e.measured_ms == 6.0 and e.detail["dst"] == "b"
    # the median turns at the 5th slow token of the window, then `hold` windows in a row
    assert e.token == 50 + 3 + 2
    # after the re-plan the measured level is the baseline: nothing more, and no event on the way back either
    det.rebase({"link 1": 6.0}, token=e.token)
    assert _events(det, [6.0 * (1 + 0.1 * math.sin(t)) for t in range(300)], start=300) == []


def test_hysteresis_does_not_flap_where_a_single_threshold_would():
    # 1.7x for 12 tokens, then 1.3x for 12 tokens, repeated: beyond the threshold (1.5), then inside it
    # but outside the clear band (1.2)
    series = ([1.7] * 12 + [1.3] * 12) * 20
    settings = DriftSettings(window=4, threshold=1.5, clear=1.2, hold=2, cooldown=0, min_excess_ms=0.0)
    assert len(_events(DriftDetector(settings, {"token": 1.0}), series, "token")) == 1
    single = DriftSettings(window=4, threshold=1.5, clear=1.5, hold=2, cooldown=0, min_excess_ms=0.0)
    assert len(_events(DriftDetector(single, {"token": 1.0}), series, "token")) == 20  # the flapping it prevents


def test_small_absolute_changes_and_cooldown():
    s = DriftSettings(window=4, hold=2, cooldown=20, min_excess_ms=1.0)
    det = DriftDetector(s, {"link 1": 0.01, "link 2": 2.0, "compute 0": 2.0})
    ev = []
    for t in range(100):  # link 1: 5x but 0.04 ms more (noise on a free link); link 2 at t=10, compute 0 at t=15
        ev += [(e.signal, e.token) for e in det.observe(t, {"link 1": 0.05, "link 2": 2.0 if t < 10 else 9.0,
                                                             "compute 0": 2.0 if t < 15 else 0.5})]
    assert [n for n, _ in ev] == ["link 2", "compute 0"]  # faster than predicted is a drift too
    assert ev[1][1] - ev[0][1] >= 20


def test_settings_are_checked():
    for bad in (dict(window=0), dict(threshold=1.0), dict(clear=2.0, threshold=1.5), dict(cooldown=-1)):
        with pytest.raises(KitError, match="adaptive\\."):
            DriftSettings(**bad)
    with pytest.raises(KitError, match="adaptive.tolerance"):
        AdaptivePolicy(tolerance=1.5)
    with pytest.raises(KitError, match="adaptive.force\\[0\\]"):
        AdaptivePolicy(force=[(0, [("d0", 0, 4)])])


# ---- the re-plan decision: a problem whose optima are computed by hand -----------------------------------------
def _problem(mbps: float) -> Problem:
    """Source `edge` (10 ms/unit), `cloud` (1 ms/unit), 4 units of 1000 bytes out, link at `mbps` both ways."""
    units = tuple(Unit(f"u{i}", 1.0, 1000.0) for i in range(4))
    devices = (DeviceSpec("edge", 1e9, (10.0,) * 4, source=True), DeviceSpec("cloud", 1e9, (1.0,) * 4, cloud=True))
    return Problem(units, devices, LinkSpec(mbps, 0.0), return_bytes=8.0)


def test_decide_moves_only_beyond_the_tolerance():
    split = (Stage("edge", 0, 1), Stage("cloud", 1, 4))
    solo = (Stage("edge", 0, 4),)
    fast = _problem(1000.0)  # edge[0:1) cloud[1:4): 10 + 3 + 8 us + 0.064 us = 13.008 ms; solo: 40 ms
    assert plan_cost(fast, split, "latency") == pytest.approx(13.0 + 1000 * 8 / 1e6 + 8 * 8 / 1e6)
    slow = with_link_mbps(fast, "edge", "cloud", 0.5)  # 16 ms for 1000 bytes: split costs 29.1 ms, solo 40 ms
    d = decide(slow, split, "latency", tolerance=0.1)
    assert not d.move and d.plan.stages == split
    slower = with_link_mbps(fast, "edge", "cloud", 0.2)  # 40 ms for 1000 bytes: solo 40 ms beats 53.0 ms
    d = decide(slower, split, "latency", tolerance=0.1)
    assert d.move and d.plan.stages == solo
    assert d.current_ms == pytest.approx(13.0 + 40.0 + 8 * 8 / 1e6)  # the return hop at the default 1000 Mbps
    assert d.gain == pytest.approx((d.current_ms - 40.0) / d.current_ms)
    assert not decide(slower, split, "latency", tolerance=0.3).move  # 24.5% saved is within a 30% tolerance


def test_decide_without_a_lost_device():
    split = (Stage("edge", 0, 1), Stage("cloud", 1, 4))
    d = decide(without_device(_problem(1000.0), "cloud"), split)
    assert d.move and d.plan.stages == (Stage("edge", 0, 4),) and math.isinf(d.current_ms)
    with pytest.raises(KitError, match="source"):
        without_device(_problem(1000.0), "edge")


# ---- switches mid-generation on the local testbed -------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint_factory):
    return tiny_checkpoint_factory(layers=4, seed=1)


def _reference(ckpt, prompts, new):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from edgeshard_kit.model.generate import encode_prompts

    tok = AutoTokenizer.from_pretrained(ckpt)
    ids, mask = encode_prompts(tok, prompts)
    model = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, pad_token_id=tok.pad_token_id or 0)
    return out[:, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def reference(ckpt):
    return _reference(ckpt, PROMPTS, NEW)


FORCE = ((3, [("d0", 0, 2), ("d2", 2, 6)]), (7, [("d0", 0, 6)]), (9, [("d0", 0, 1), ("d1", 1, 4), ("d2", 4, 6)]))


@pytest.mark.slow
@pytest.mark.parametrize("mode,k,switches", [("sequential", 1, 3), ("pipelined", 2, 1)])
def test_forced_switches_keep_tokens_identical(ckpt, local_testbed, reference, mode, k, switches):
    """Sequential: three switches (two stages -> two others -> one -> three); pipelined (micro-batches in flight
    at the switch): the first of them (each switch starts a new set of workers: the suite's time)."""
    force = FORCE[:switches]
    policy = AdaptivePolicy(detect=False, force=force)
    with deploy(plan_of(("d0", 0, 3), ("d1", 3, 6)), local_testbed(3), ckpt, adaptive=policy) as dep:
        res = dep.generate(PROMPTS, NEW, mode=mode, micro_batches=k)
        assert res.tokens == reference
        moved = [e for e in res.events if e["moved"]]
        assert [e["cause"] for e in moved] == ["forced"] * switches
        want = ["d0[0:2) d2[2:6)", "d0[0:6)", "d0[0:1) d1[1:4) d2[4:6)"][:switches]
        assert [e["new_plan"] for e in moved] == want
        assert [e["token"] for e in moved] == [t for t, _ in force]  # forced switches stop at exactly their token
        for e in moved:
            assert e["pause_ms"] > 0
            plen = len(dep._encode(PROMPTS, None)[0][0])
            assert e["tokens_recomputed"] == len(PROMPTS) * (plen + e["token"])
        assert [s.device for s in dep.stages] == [d for d, _, _ in force[-1][1]]  # the deployment runs the last plan
        assert res.to_dict()["events"] == res.events
        assert dep.generate(PROMPTS, 2, mode=mode, micro_batches=k).tokens == [r[:2] for r in reference]
    assert dep.closed


@pytest.mark.slow
def test_sigkilled_worker_resumes_on_the_remaining_devices(ckpt, local_testbed, reference):
    tb = local_testbed(3)
    problem = quick_problem(ckpt, tb, Workload(prompt_len=4, gen_tokens=NEW, batch=4))
    state = {}

    def kill_at_5(rec):
        if rec["step"] == 5 and "pid" not in state:
            state["pid"] = state["dep"].handles[1].pid
            os.kill(state["pid"], signal.SIGKILL)

    policy = AdaptivePolicy(detect=False, observer=kill_at_5)
    with deploy(plan_of(("d0", 0, 2), ("d1", 2, 4), ("d2", 4, 6)), tb, ckpt, problem=problem,
                adaptive=policy) as dep:
        state["dep"] = dep
        res = dep.generate(PROMPTS, NEW)
        assert res.tokens == reference
        (e,) = res.events
        assert e["cause"] == "fault" and e["moved"] and e["evidence"][0]["device"] == "d1"
        assert "d1" not in e["new_plan"] and e["token"] == 6
        assert e["pause_ms"] > 0 and e["reason"]
        assert all(s.device != "d1" for s in dep.stages)


@pytest.mark.slow
@pytest.mark.parametrize("mode,k", [("sequential", 1), ("pipelined", 2)])
def test_a_stage_slower_than_planned_raises_a_drift_event(ckpt, local_testbed, reference, mode, k):
    """The problem says stage 1's device is 1000x faster than it is: detection (in pipelined mode too, from the
    workers' records read while other micro-batches are in flight) raises a drift event naming `compute 1`, with
    predicted < measured; whatever the re-plan decides, no TOKEN frame is lost and the tokens stay identical."""
    tb = local_testbed(2)
    problem = with_device_scale(quick_problem(ckpt, tb, Workload(prompt_len=4, gen_tokens=NEW, batch=4)), "d1", 1e-3)
    pred, _ = predicted_signals(problem, plan_of(("d0", 0, 3), ("d1", 3, 6)).stages)
    assert set(pred) == {"token", "compute 0", "compute 1", "link 1"}  # what detection compares with the records
    seen = []
    policy = AdaptivePolicy(drift=DriftSettings(window=2, hold=1, cooldown=2, min_excess_ms=0.0), max_switches=1,
                            observer=seen.append)
    with deploy(plan_of(("d0", 0, 3), ("d1", 3, 6)), tb, ckpt, problem=problem, adaptive=policy) as dep:
        res = dep.generate(PROMPTS, NEW, mode=mode, micro_batches=k)
    assert res.tokens == reference
    drift = [e for e in res.events if e["cause"] == "drift"]
    assert drift, res.events
    ev = {x["signal"]: x for x in drift[0]["evidence"]}
    assert "compute 1" in ev and ev["compute 1"]["measured_ms"] > ev["compute 1"]["predicted_ms"]
    if mode == "pipelined":  # a token's latency there includes queueing: stage signals only
        assert "token" not in ev
    # the run completed (a TOKEN frame swallowed by a stats round trip would leave it waiting), every token seen
    assert len({(r["segment"], r["mb"], r["step"]) for r in seen}) == len(seen)


# ---- the records and the timeline figure ------------------------------------------------------------------------
def test_event_records_and_timeline(tmp_path):
    from edgeshard_kit.experiments.adaptive import EVENT_COLUMNS, latency_timeline, record_adaptive
    from edgeshard_kit.experiments.results import new_run
    from edgeshard_kit.runtime.deployment import RunResult

    per_token = [{"step": t, "mb": 0, "latency_ms": 5.0 if t < 10 else 20.0, "segment": int(t >= 12),
                  "plan": "d0[0:3) d1[3:6)" if t < 12 else "d0[0:6)", "recompute": t == 12} for t in range(20)]
    events = [{"t_ms": 90.0, "token": 12, "cause": "drift", "moved": True, "old_plan": "d0[0:3) d1[3:6)",
               "new_plan": "d0[0:6)", "predicted_gain": 0.4, "pause_ms": 31.0, "tokens_recomputed": 16,
               "evidence": [{"signal": "link 1", "predicted_ms": 0.1, "measured_ms": 6.0}]}]
    fig = latency_timeline(per_token, events)
    assert [t.name for t in fig.data] == ["d0[0:3) d1[3:6)", "d0[0:6)", "prefill / recompute"]
    assert list(fig.data[2].x) == [0, 12]
    assert len(fig.layout.shapes) == 1 and fig.layout.shapes[0].x0 == 11.5
    assert "pause 31 ms" in fig.layout.annotations[0].text
    res = RunResult(tokens=[[1]], text=[], per_token=per_token, per_stage=[], summary={}, events=events)
    with new_run("adaptive-test", root=tmp_path) as run:
        paths = record_adaptive(run, res)
    import pandas as pd

    df = pd.read_csv(paths["events_csv"])
    assert list(df.columns) == list(EVENT_COLUMNS) and df.loc[0, "pause_ms"] == 31.0
    assert paths["timeline"].exists()


# ---- the emulated-testbed demonstration's pieces (bench adaptive, notebook 06) -------------------------------------
def test_the_demo_testbed_is_a_private_copy_of_the_emulated_one(ckpt):
    from edgeshard_kit.experiments.adaptive_demo import adaptive_testbed
    from edgeshard_kit.experiments.testbeds import EMULATED, fit_cpu
    from edgeshard_kit.testbed.inventory import load_testbed

    base, tb = load_testbed(EMULATED), adaptive_testbed(ckpt)
    assert tb.name == "adaptive" and tb.subnet == "10.78.0.0/24" and tb.names == base.names
    assert all(d.address.startswith("10.78.0.") for d in tb.devices)
    # quotas fitted to this host's cores as testbed-prediction's are (fit_cpu), in the file's proportions
    assert [d.cpu_quota for d in tb.devices] == [d.cpu_quota for d in fit_cpu(base).devices]
    assert sum(d.cpu_quota for d in tb.devices) <= max(os.cpu_count() or 1, sum(d.cpu_quota for d in base.devices))


def test_throttle_values_parse_bandwidths_and_auto_and_refuse_the_rest():
    from edgeshard_kit.bench.adaptive import throttle_values

    assert throttle_values("2,auto") == [2.0, "auto"] and throttle_values(0.5) == [0.5]
    for bad in ("0", "-1", "fast", "", "nan"):
        with pytest.raises(KitError, match="throttle-mbps"):
            throttle_values(bad)


def test_choose_throttle_keeps_a_plan_whose_decode_frames_fit_the_token_bucket(ckpt):
    """A tiny model's decode activation (4 layers x 128 hidden: 512 bytes + headers) fits tbf's 1600-byte bucket:
    an idle link passes it at line rate whatever its rate, so no throttle moves the plan (auto: None)."""
    from edgeshard_kit.bench.adaptive import THROTTLE_CANDIDATES, _parse, choose_throttle
    from edgeshard_kit.core.units import format_stages
    from edgeshard_kit.experiments.adaptive_demo import adaptive_testbed
    from edgeshard_kit.runtime.quickplan import quick_profiles

    tb = adaptive_testbed(ckpt)
    wl = Workload(prompt_len=4, gen_tokens=8)
    profiles = quick_profiles(ckpt, tb, wl)
    low, rows = choose_throttle(profiles, tb, 200.0, "auto", wl, 0.1)
    assert low is None and [r["throttle_mbps"] for r in rows] == list(THROTTLE_CANDIDATES)
    assert not any(r["moved"] for r in rows)
    low, rows = choose_throttle(profiles, tb, 200.0, 0.5, wl, 0.1)
    assert low == 0.5 and len(rows) == 1
    assert format_stages(_parse(rows[0]["old_plan"])) == rows[0]["old_plan"]


def test_decide_falls_back_to_relay_when_only_a_device_running_two_stages_fits():
    """After the cloud is lost, one stage per device cannot hold the model (unit 1 fills `mid`; the source holds
    unit 0 and has room for two more small units, not for unit 1): only the source running a second stage fits.
    Brute force over every relay assignment says which relay plan is the latency optimum."""
    units = (Unit("embed", 10, 1.0), Unit("L1", 30, 1.0), Unit("L2", 10, 1.0), Unit("head", 10, 1.0))
    devs = (DeviceSpec("src", 30, (1.0, 1.0, 1.0, 1.0), True), DeviceSpec("mid", 30, (2.0, 2.0, 2.0, 2.0)),
            DeviceSpec("cloud", 1000, (0.5, 0.5, 0.5, 0.5), cloud=True))
    full = Problem(units, devs, LinkSpec(1e6, 0.0))
    current = (Stage("src", 0, 1), Stage("cloud", 1, 4))
    left = without_device(full, "cloud")
    with pytest.raises(KitError):
        decide(left, current, "latency", relay_fallback=False)
    dec = decide(left, current, "latency")
    assert dec.move and {s.device for s in dec.plan.stages} == {"src", "mid"}
    best = None
    for assign in itertools.product(("src", "mid"), repeat=4):
        if assign[0] != "src":
            continue
        stages, start = [], 0
        for u in range(1, 5):
            if u == 4 or assign[u] != assign[start]:
                stages.append(Stage(assign[start], start, u))
                start = u
        try:
            cost = plan_cost(left, stages, "latency")
        except KitError:
            continue
        if math.isfinite(cost) and (best is None or cost < best[0]):
            best = (cost, stages)
    assert best is not None and plan_cost(left, dec.plan.stages, "latency") == pytest.approx(best[0])


def test_a_drifting_link_slows_every_link_of_its_non_source_endpoint():
    """edge0 (source) -> cloud measured at 0.02 Mbps: with the endpoint scope every link to or from the cloud gets
    at most that (the cloud's uplink), edge-edge links keep theirs; the link scope changes only that link."""
    units = tuple(Unit(f"u{i}", 1.0, 1.0) for i in range(4))
    devs = (DeviceSpec("edge0", 10, (1.0,) * 4, True), DeviceSpec("edge1", 10, (1.0,) * 4),
            DeviceSpec("cloud", 10, (1.0,) * 4, cloud=True))
    p = Problem(units, devs, LinkSpec(100.0, 0.0), (("edge1", "cloud", LinkSpec(0.01, 0.0)),))
    got = with_measured_link(p, "edge0", "cloud", 0.02)
    for a, b in itertools.permutations(p.names, 2):
        want = (0.01 if (a, b) == ("edge1", "cloud") else 0.02) if "cloud" in (a, b) else 100.0
        assert got.link(a, b).mbps == want, (a, b)
    only = with_measured_link(p, "edge0", "cloud", 0.02, scope="link")
    assert only.link("edge0", "cloud").mbps == 0.02 and only.link("cloud", "edge1").mbps == 100.0
    with pytest.raises(KitError, match="link scope"):
        with_measured_link(p, "edge0", "cloud", 0.02, scope="everything")
    with pytest.raises(KitError, match="link_scope"):
        AdaptivePolicy(link_scope="nowhere")


def test_a_drift_move_must_pay_for_its_load_over_the_tokens_left():
    """The saving (gain x measured per-token latency x tokens left) is weighed against the longest measured load:
    hand-computed cases on both sides, and the knob that turns it off."""
    from edgeshard_kit.planning.replan import Decision
    from edgeshard_kit.runtime.adaptive import _Session

    s = _Session.__new__(_Session)  # the weighing alone: no deployment
    s.policy, s.k, s.total, s.load_s = AdaptivePolicy(), 1, 200, 20.0
    s.per_token = [{"latency_ms": 300.0, "recompute": False}] * 8
    ok, why = s._worth_moving(Decision(True, None, 330.0, 287.0, 0.13, "x"), 121)  # 0.13 x 300 ms x 79 = 3.1 s
    assert not ok and "79 tokens left" in why and "20.0 s" in why
    s.per_token = [{"latency_ms": 1000.0, "recompute": False}] * 8
    assert s._worth_moving(Decision(True, None, 493.0, 345.0, 0.30, "x"), 67) == (True, "")  # 0.3 x 1 s x 133 = 40 s
    assert s._worth_moving(Decision(True, None, math.inf, 345.0, 1.0, "lost"), 199)[0]  # a lost device always moves
    s.policy = AdaptivePolicy(amortize=False)
    assert s._worth_moving(Decision(True, None, 330.0, 287.0, 0.13, "x"), 199)[0]
