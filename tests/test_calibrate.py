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
