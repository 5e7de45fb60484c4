"""`edgeshard bench analytic-vs-paper` and `analytic-calibration`: rows of roofline estimates against measured times."""

from __future__ import annotations

from pathlib import Path

import torch

from edgeshard_kit.profiling.analytic import analytic_profile, calibrate, calibration_transfer, compare
from edgeshard_kit.profiling.catalog import get_device
from edgeshard_kit.profiling.measure import measure_profile
from edgeshard_kit.profiling.reference import paper_profiles


def analytic_vs_paper() -> list[dict]:
    """Per paper device: measured decode ms/token vs roofline, uncalibrated and calibrated on the same data."""
    rows = []
    for dev, measured in paper_profiles().items():
        raw = analytic_profile("llama2-7b", dev, dtype="float32", batch=1, prompt_len=32, kv_lens=(64,))
        eff = calibrate(measured, "llama2-7b", dev)
        cal = analytic_profile("llama2-7b", dev, dtype="float32", batch=1, prompt_len=32, kv_lens=(64,),
                               efficiency=eff)
        # The paper's figures carry no KV length: compare at the analytic profile's reference (64 tokens).
        r, c = compare(raw, measured), compare(cal, measured)
        rows.append({"device_type": dev, "measured_ms": round(r["measured_ms"], 2),
                     "analytic_uncalibrated_ms": round(r["predicted_ms"], 2),
                     "uncalibrated_error_pct": round(r["error_pct"], 1),
                     "analytic_calibrated_ms": round(c["predicted_ms"], 2),
                     "calibrated_error_pct": round(c["error_pct"], 1),
                     "calibrated_unit_error_pct": round(c["unit_mean_abs_error_pct"], 1),
                     "memory_eff": round(eff.memory, 3), "compute_eff": round(eff.compute, 3),
                     "unit_overhead_ms": round(eff.unit_overhead_ms, 3)})
    return rows


def analytic_calibration(small: str | Path, large: str | Path, repeats: int = 5,
                         threads: int | None = None) -> list[dict]:
    """Measure two checkpoints here; calibrate the roofline on each and predict the other (two rows)."""
    if threads:
        torch.set_num_threads(threads)
    p_small = measure_profile(small, repeats=repeats, warmup=2, kv_lens=(32, 64))
    p_large = measure_profile(large, repeats=repeats, warmup=2, kv_lens=(32, 64))
    dev = get_device("this-machine")
    rows = [calibration_transfer(p_small, p_large, "this-machine"), calibration_transfer(p_large, p_small, "this-machine")]
    for r in rows:
        # the measured figures of this host that the uncalibrated roofline used (GB/s, GFLOP/s)
        r.update(mem_bw_gbs=dev.mem_bw_gbs, peak_gflops_float32=dev.peak_flops["float32"] / 1e9)
    return rows
