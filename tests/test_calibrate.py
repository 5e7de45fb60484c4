"""runtime.calibrate's arithmetic: the fixed costs recovered from the deployments' excess, and outlier device types."""

from __future__ import annotations

import pytest

from edgeshard_kit.runtime.calibrate import RuntimeCosts, _estimates, outliers


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
