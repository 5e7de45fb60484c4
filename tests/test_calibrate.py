"""runtime.calibrate's arithmetic: the fixed costs recovered from the deployments' excess, and outlier device types."""

from __future__ import annotations

import pytest

from edgeshard_kit.core.units import Stage
from edgeshard_kit.experiments.testbeds import bench_testbed
from edgeshard_kit.planning.build import build_problem
from edgeshard_kit.planning.plan import make_plan
from edgeshard_kit.planning.problem import DeviceSpec, LinkSpec, Problem, Unit
from edgeshard_kit.profiling.measure import measure_profile
from edgeshard_kit.runtime.calibrate import RuntimeCosts, _estimates, compute_scales, outliers


def test_estimates_invert_the_calibration_equations():
    s_src, step, s_t = 0.7, 1.9, 2.5  # ms: hand-chosen truth
    label = "source, 1 layer on slow (e1), source"
    excess = {"one stage on the source": s_src + step, "two stages on the source": 2 * s_src + step,
              label: 2 * s_src + s_t + step}
    stage_ms, got_step = _estimates(excess, {label: "slow"}, "fast")
    assert got_step == pytest.approx(step) and stage_ms["fast"] == pytest.approx(s_src)
    assert stage_ms["slow"] == pytest.approx(s_t)


def test_outliers_are_far_from_their_peers_by_a_factor_and_a_floor():
    assert outliers({"a": 1.0, "b": 1.2, "c": 10.0}) == ["c"]
    assert outliers({"a": 0.1, "b": 0.12, "c": 0.6}) == []  # 5x, but within the 1 ms floor: noise of a fast host
    assert outliers({"a": 3.0, "b": 3.3, "c": 0.2}) == ["c"]  # far below its peers
    assert outliers({"only": 5.0}) == []


def test_runtime_costs_round_trip_keeps_spread_and_remeasured():
    costs = RuntimeCosts({"a": 1.0}, 0.5, spread={"a": [0.8, 1.3]}, remeasured={"a": {"first_ms": 9.0, "again_ms": 1.0}})
    d = costs.to_dict()
    assert d["spread"] == {"a": [0.8, 1.3]} and d["remeasured"]["a"]["first_ms"] == 9.0
    assert RuntimeCosts.from_dict(d).stage_ms == {"a": 1.0}
    full = RuntimeCosts({"a": 1.0}, 0.5, {"a": 0.9}, 0.4, [{"deployment": "x"}], "m", {"a": [0.8, 1.3]},
                        {"a": {"first_ms": 9.0, "again_ms": 1.0}}, {"a": 0.9}, {"a": [0.8, 1.1]})
    assert RuntimeCosts.from_dict(full.to_dict(records=True)) == full


def _brute_force(one: float, two: float) -> tuple[float, float]:
    """(step, s_src) >= 0 minimising (s_src + step - one)^2 + (2 s_src + step - two)^2 on a 0.05 ms grid."""
    best = None
    for i in range(0, 401):
        for j in range(0, 401):
            step, s = i * 0.05, j * 0.05
            r = (s + step - one) ** 2 + (2 * s + step - two) ** 2
            if best is None or r < best[0]:
                best = (r, step, s)
    return best[1], best[2]


@pytest.mark.parametrize("one,two,other", [(3.8, -21.9, 21.0), (-5.0, 4.0, -1.0), (6.0, 9.5, 12.0), (10.0, 2.0, 9.0)])
def test_constrained_estimates_are_the_non_negative_least_squares_solution(one, two, other):
    # Noisy excesses (ms) as a 300 ms/token model gives them: the raw solution can be negative; the constrained one
    # is the non-negative least-squares fit of the one- and two-stage equations (brute force as the reference), and
    # the device type's term is what its own equation leaves, never below 0. A negative s_src must not leak into
    # step (the bug: step = one - s_src = 3.8 + 25.7 ms).
    label = "source, 1 layer on slow (e1), source"
    excess = {"one stage on the source": one, "two stages on the source": two, label: other}
    stage_ms, step = _estimates(excess, {label: "slow"}, "fast")
    ref_step, ref_src = _brute_force(one, two)
    assert step == pytest.approx(ref_step, abs=0.05) and stage_ms["fast"] == pytest.approx(ref_src, abs=0.05)
    assert stage_ms["slow"] == pytest.approx(max(0.0, other - 2 * ref_src - ref_step), abs=0.15)
    assert min(stage_ms.values()) >= 0 and step >= 0
    raw, raw_step = _estimates(excess, {label: "slow"}, "fast", constrained=False)
    assert raw["fast"] == pytest.approx(two - one) and raw_step == pytest.approx(2 * one - two)


def _two_type_problem():
    """A 6-unit problem on a fast source and a slow device, from hand-written profiles' unit times."""
    units = tuple(Unit(f"u{i}", 1e6, 1e3) for i in range(6))
    devs = (DeviceSpec("src", 1e9, (1.0,) * 6, True, False, 0.0), DeviceSpec("slow", 1e9, (4.0,) * 6, False, False, 0.0))
    return Problem(units, devs, LinkSpec(1e9, 0.0), (), 8.0, 1, {}, 0.0)


def test_compute_scales_are_measured_over_profiled_per_type_median_over_windows():
    problem = _two_type_problem()
    plans = {"one": make_plan(problem, [Stage("src", 0, 6)], "latency"),
             "mixed": make_plan(problem, [Stage("src", 0, 1), Stage("slow", 1, 4), Stage("src", 4, 6)], "latency")}
    # profiled: src 1 ms/unit, slow 4 ms/unit. Measured per window (hand-chosen): src runs at 0.5x, 0.6x, 0.7x of
    # its profile, slow at 2x, 1x, 1.5x; src's 1-unit stage (1 ms < MIN_SCALE_MS) must not count.
    computes = {"one": [[3.0], [3.6], [4.2]],
                "mixed": [[99.0, 24.0, 1.0], [99.0, 12.0, 1.2], [99.0, 18.0, 1.4]]}
    scale, spread = compute_scales(plans, computes, {"src": "fast", "slow": "slow"})
    # window ratios for fast: (3 + 1) / (6 + 2) = 0.5, (3.6 + 1.2) / 8 = 0.6, (4.2 + 1.4) / 8 = 0.7
    assert scale["fast"] == pytest.approx(0.6) and spread["fast"] == pytest.approx([0.5, 0.7])
    assert scale["slow"] == pytest.approx(1.5) and spread["slow"] == pytest.approx([1.0, 2.0])


def test_build_problem_scales_a_device_types_unit_times(tiny_checkpoint):
    prof = measure_profile(tiny_checkpoint, prompt_len=4, kv_lens=(4,), repeats=1, warmup=0, progress=False,
                           device_type="cpu-local")
    tb = bench_testbed(tiny_checkpoint, 20.0)
    plain = build_problem({"cpu-local": prof}, tb)
    scaled = build_problem({"cpu-local": prof}, tb, runtime={"stage_ms": {}, "step_ms": 0.0,
                                                             "compute_scale": {"cpu-local": 0.5}})
    for a, b in zip(plain.devices, scaled.devices):
        assert b.unit_ms == pytest.approx(tuple(0.5 * x for x in a.unit_ms))
    costs = RuntimeCosts({}, 0.0, compute_scale={"cpu-local": 2.0}, compute_spread={"cpu-local": [1.5, 2.5]})
    assert RuntimeCosts.from_dict(costs.to_dict()).compute_scale == {"cpu-local": 2.0}
