"""Drift detection while serving: per-token measured times against the plan's prediction, with hysteresis.

A *signal* is one figure per decoded token that the plan predicts: ``compute i`` (stage i's compute, ms),
``link i`` (the frame into stage i from the previous stage's device: first-to-last byte, ms, the bandwidth
part of the link's cost) and ``token`` (the whole per-token latency, ms). `predicted_signals` gives the
plan's values from a `Problem`, `measured_signals` reads one decode step from the workers' timing records.

`DriftDetector` keeps a moving window (median of `window` tokens) per signal. A signal *drifts* when its
median differs from the prediction by more than a factor `threshold` (either way) AND by more than
`min_excess_ms`, for `hold` windows in a row; it recovers only when it is back within the narrower factor
`clear` for `hold` windows (hysteresis band), and events are at least `cooldown` tokens apart. After a
re-plan the controller calls `rebase` with the new predictions (the measured level becomes the baseline),
so a changed but stable link raises one event, not one per token. Pure: no clock, no I/O.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass, field

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.units import Stage
from edgeshard_kit.planning.plan import figures
from edgeshard_kit.planning.problem import Problem

__all__ = ["DriftSettings", "Evidence", "DriftDetector", "predicted_signals", "measured_signals"]


@dataclass(frozen=True)
class DriftSettings:
    """The detector's knobs: window (tokens), threshold and clear (factors > 1), hold (windows), cooldown (tokens)."""

    window: int = 8
    threshold: float = 1.5
    clear: float = 1.2
    hold: int = 3
    cooldown: int = 8
    min_excess_ms: float = 1.0

    def __post_init__(self):
        for f in ("window", "hold"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise KitError(f"adaptive.{f}: expected an integer >= 1, got {v!r}")
        if isinstance(self.cooldown, bool) or not isinstance(self.cooldown, int) or self.cooldown < 0:
            raise KitError(f"adaptive.cooldown: expected an integer >= 0, got {self.cooldown!r}")
        if not (isinstance(self.threshold, (int, float)) and self.threshold > 1):
            raise KitError(f"adaptive.threshold: expected a factor > 1, got {self.threshold!r}")
        if not (isinstance(self.clear, (int, float)) and 1 <= self.clear <= self.threshold):
            raise KitError(f"adaptive.clear: expected a factor in [1, threshold={self.threshold}], got {self.clear!r}")
        if not (isinstance(self.min_excess_ms, (int, float)) and self.min_excess_ms >= 0):
            raise KitError(f"adaptive.min_excess_ms: expected a number >= 0, got {self.min_excess_ms!r}")


@dataclass(frozen=True)
class Evidence:
    """Why a signal drifts: predicted vs measured (median of the window, ms) at token `token`."""

    signal: str
    predicted_ms: float
    measured_ms: float
    token: int
    detail: dict = field(default_factory=dict)  # link: src, dst, bytes, mbps_predicted, mbps_measured; compute: device

    @property
    def ratio(self) -> float:
        return self.measured_ms / self.predicted_ms if self.predicted_ms > 0 else math.inf

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d


@dataclass
class _State:
    window: deque
    streak: int = 0  # consecutive windows beyond the threshold
    calm: int = 0  # consecutive windows within the clear band
    drifting: bool = False
    reported: bool = False


class DriftDetector:
    """Moving-window drift detection with hysteresis over named signals (see the module docstring)."""

    def __init__(self, settings: DriftSettings | None = None, predicted: dict[str, float] | None = None,
                 details: dict[str, dict] | None = None):
        self.settings = settings or DriftSettings()
        self.predicted: dict[str, float] = {}
        self.details: dict[str, dict] = {}
        self.states: dict[str, _State] = {}
        self.last_event: int | None = None
        self.rebase(predicted or {}, details)

    def rebase(self, predicted: dict[str, float], details: dict[str, dict] | None = None,
               token: int | None = None) -> None:
        """New predictions (after a re-plan): windows and states start over; `token` starts a cooldown."""
        self.predicted = {k: float(v) for k, v in predicted.items()}
        self.details = dict(details or {})
        self.states = {k: _State(deque(maxlen=self.settings.window)) for k in self.predicted}
        if token is not None:
            self.last_event = token

    def _beyond(self, pred: float, m: float, factor: float) -> bool:
        if abs(m - pred) <= self.settings.min_excess_ms:
            return False
        return m > pred * factor or m * factor < pred

    def observe(self, token: int, measured: dict[str, float]) -> list[Evidence]:
        """Feed one token's measured values (ms); the signals that began to drift, once cooldown allows (else [])."""
        s = self.settings
        for name, value in measured.items():
            st = self.states.get(name)
            if st is None or value is None or not math.isfinite(value):
                continue
            st.window.append(float(value))
            if len(st.window) < s.window:
                continue
            m, pred = statistics.median(st.window), self.predicted[name]
            st.streak = st.streak + 1 if self._beyond(pred, m, s.threshold) else 0
            st.calm = 0 if self._beyond(pred, m, s.clear) else st.calm + 1
            if not st.drifting and st.streak >= s.hold:
                st.drifting, st.reported = True, False
            elif st.drifting and st.calm >= s.hold:
                st.drifting = False
        if self.last_event is not None and token - self.last_event < s.cooldown:
            return []
        out = []
        for name, st in self.states.items():
            if st.drifting and not st.reported:
                st.reported = True
                out.append(Evidence(name, self.predicted[name], statistics.median(st.window), token,
                                    dict(self.details.get(name, {}))))
        if out:
            self.last_event = token
        return out


def predicted_signals(problem: Problem, stages: list[Stage] | tuple[Stage, ...]) -> tuple[dict, dict]:
    """(predicted ms per signal, detail per signal) of `stages` on `problem`, for one decode step."""
    f = figures(problem, stages)
    pred: dict[str, float] = {"token": float(f["latency_ms"])}
    details: dict[str, dict] = {"token": {}}
    for i, st in enumerate(stages):
        pred[f"compute {i}"] = float(f["stage_compute_ms"][i])
        details[f"compute {i}"] = {"stage": i, "device": st.device}
        if i == 0 or stages[i - 1].device == st.device:
            continue
        prev = stages[i - 1]
        ln = problem.link(prev.device, st.device)
        nbytes = float(problem.units[prev.end - 1].out_bytes)
        pred[f"link {i}"] = 0.0 if math.isinf(ln.mbps) else nbytes * 8.0 / (ln.mbps * 1000.0)
        details[f"link {i}"] = {"stage": i, "src": prev.device, "dst": st.device, "bytes": nbytes,
                                "mbps_predicted": ln.mbps}
    return pred, details


def measured_signals(records: list[dict], token_latency_ms: float | None, stages: list[Stage] | tuple[Stage, ...]
                     ) -> dict[str, float]:
    """One decode step's measured ms per signal from its worker records (one per stage: compute_ms, recv_ms)."""
    out: dict[str, float] = {}
    if token_latency_ms is not None:
        out["token"] = float(token_latency_ms)
    for r in records:
        i = int(r["stage"])
        out[f"compute {i}"] = float(r["compute_ms"])
        if 0 < i < len(stages) and stages[i - 1].device != stages[i].device:
            out[f"link {i}"] = float(r["recv_ms"])
    return out


def measured_mbps(evidence: Evidence, bytes_in: float | None = None) -> float:
    """Effective bandwidth (Mbps) of a drifting link: its frame bytes over the measured first-to-last-byte time."""
    nbytes = float(bytes_in if bytes_in is not None else evidence.detail.get("bytes", 0.0))
    if evidence.measured_ms <= 0:
        return math.inf
    return nbytes * 8.0 / (evidence.measured_ms * 1000.0)
