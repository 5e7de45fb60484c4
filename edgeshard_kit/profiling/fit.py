"""Profiles that cannot lie about fixed costs: a non-negative fit of time = fixed + per-token cost over the raw
samples, non-negative overheads, and flags for figures whose repeats disagree."""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.profiling.profile import Profile
SPREAD_LIMIT = 0.5  # (max - min) / median of a figure's repeats above this: the profile is flagged


def nonneg_fit(xs: Iterable[float], ys: Iterable[float]) -> tuple[float, float]:
    """(fixed, per) >= 0 minimising sum (fixed + per * x - y)^2: non-negative least squares of a line.

    The active-set solution of the two-variable NNLS: the unconstrained fit if both terms are >= 0, else the
    best fit with the negative term held at 0 (per = 0: the mean; fixed = 0: a line through the origin), clamped.
    Times in ms, x in tokens (or any unit); noise can never make a term negative.
    """
    xs, ys = [float(x) for x in xs], [float(y) for y in ys]
    if not xs or len(xs) != len(ys):
        raise KitError(f"nonneg_fit: need as many x as y values, at least one (got {len(xs)} and {len(ys)})")
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    per = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
    fixed = my - per * mx
    if per >= 0 and fixed >= 0:
        return fixed, per
    if per < 0:  # a time that falls with the load is noise: a constant
        return max(0.0, my), 0.0
    sx2 = sum(x * x for x in xs)  # fixed < 0: the line through the origin
    return 0.0, max(0.0, sum(x * y for x, y in zip(xs, ys)) / sx2) if sx2 > 0 else 0.0


def fit_profile(profile: Profile) -> Profile:
    """The profile with every unit's decode time fitted as fixed + per-KV-token cost (nonneg_fit over all raw
    samples of `samples["decode"]`) and non-negative overheads (the raw ones kept as overhead["raw_<name>"]).

    Units without raw samples keep their medians. A negative overhead (plain step faster than the sum of its
    hooked units: noise) becomes 0.
    """
    dec = profile.samples.get("decode") or {}
    units = []
    for u in profile.units:
        pts = [(int(kv), float(y)) for kv, by_unit in dec.items() for y in (by_unit.get(str(u.unit)) or
                                                                          by_unit.get(u.unit) or [])]
        if len({kv for kv, _ in pts}) < 2:
            units.append(u)
            continue
        fixed, per = nonneg_fit([kv for kv, _ in pts], [y for _, y in pts])
        by_kv = {kv: fixed + per * kv for kv in u.decode_ms_by_kv}
        units.append(replace(u, decode_ms_by_kv=by_kv, decode_ms=by_kv.get(profile.ref_kv_len, u.decode_ms)))
    overhead = dict(profile.overhead)
    for k in ("prefill_ms", "decode_step_ms"):
        v = overhead.get(k)
        if isinstance(v, (int, float)) and v < 0:
            overhead[f"raw_{k}"], overhead[k] = v, 0.0
    return replace(profile, units=tuple(units), overhead=overhead)


def spread_flags(profile: Profile, limit: float = SPREAD_LIMIT) -> list[str]:
    """One line per figure whose repeats disagree: (max - min) / median > `limit` (prefill, decode at each kv_len)."""
    out = []
    for u in profile.units:
        figs = [("prefill", u.prefill_ms, u.prefill_min_ms, u.prefill_max_ms)]
        figs += [(f"decode at kv {kv}", u.decode_ms_by_kv.get(kv), lo, u.decode_max_ms_by_kv.get(kv))
                 for kv, lo in u.decode_min_ms_by_kv.items()]
        for what, med, lo, hi in figs:
            if med and lo is not None and hi is not None and med > 0 and (hi - lo) / med > limit:
                out.append(f"{profile.device_type} unit {u.unit} ({u.name}) {what}: {lo:.3f}..{hi:.3f} ms around "
                           f"{med:.3f} (spread {(hi - lo) / med:.0%} > {limit:.0%})")
    return out
