"""Checks of profiles against reality: predicted vs measured decode latency, and calibrated-roofline transfer."""

from __future__ import annotations

import random
from pathlib import Path

from edgeshard_kit.profiling.measure import median_min_max, measure_profile


def profile_check(checkpoint: str | Path, device: str = "cpu", dtype: str = "float32", repeats: int = 5,
                  warmup: int = 2, rounds: int = 7, new_tokens: int = 12, prompt_len: int = 32,
                  progress: bool = True) -> list[dict]:
    """Alternate profiling and `generate_split` (one stage) on the same model; one row per round."""
    from edgeshard_kit.model.checkpoint import load_llama_config
    from edgeshard_kit.model.generate import generate_split
    from edgeshard_kit.model.stage import StageModel

    cfg = load_llama_config(checkpoint)
    n = cfg.num_hidden_layers
    stage = StageModel(checkpoint, 0, n + 2, dtype=dtype, device=device)  # shared: same weights, same memory
    rng = random.Random(0)
    prompt = [rng.randrange(cfg.vocab_size) for _ in range(prompt_len)]
    # generate_split's step k (k = 1..new_tokens) runs with prompt_len + k - 1 tokens cached.
    kv_mid = prompt_len + (new_tokens - 1) // 2
    rows = []
    for r in range(rounds):
        prof = measure_profile(checkpoint, device=device, dtype=dtype, prompt_len=prompt_len,
                               kv_lens=(kv_mid,), repeats=repeats, warmup=warmup,
                               progress=progress, stage=stage)
        res = generate_split(checkpoint, None, prompt, max_new_tokens=new_tokens + 1, dtype=dtype,
                             device=device, stages=[stage])
        measured = median_min_max(res.per_token_ms)
        units_only = sum(prof.decode_ms(kv_mid))
        predicted = units_only + prof.decode_overhead_ms
        rows.append({"model": Path(str(checkpoint)).name, "device": device, "dtype": dtype, "round": r,
                     "kv_len": kv_mid, "measured_ms": measured[0], "measured_min_ms": measured[1],
                     "measured_max_ms": measured[2], "predicted_ms": predicted, "units_only_ms": units_only,
                     "decode_step_overhead_ms": prof.decode_overhead_ms, "ratio": predicted / measured[0],
                     "ratio_units_only": units_only / measured[0], "repeats": repeats, "new_tokens": new_tokens})
    return rows


def _write(rows: list[dict], out: str) -> Path:
    import pandas as pd

    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(p, index=False)
    return p


def cmd_profile_check(args) -> int:
    """`edgeshard bench profile-check`: print predicted/measured per round and the median ratio."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = profile_check(args.model, device=args.device, dtype=args.dtype, repeats=args.repeats,
                         rounds=args.rounds, new_tokens=args.new_tokens, prompt_len=args.prompt_len)
    for r in rows:
        print(f"round {r['round']}: measured {r['measured_ms']:.2f} ms/token, predicted {r['predicted_ms']:.2f} "
              f"(units {r['units_only_ms']:.2f} + step overhead {r['decode_step_overhead_ms']:.2f}), "
              f"ratio {r['ratio']:.3f} (units only {r['ratio_units_only']:.3f})")
    med = median_min_max([r["ratio"] for r in rows])
    tot = sum(r["predicted_ms"] for r in rows) / sum(r["measured_ms"] for r in rows)
    print(f"predicted/measured over all rounds (sum/sum): {tot:.3f}")
    print(f"predicted/measured: median {med[0]:.3f} (min {med[1]:.3f}, max {med[2]:.3f}) over {len(rows)} rounds")
    print(f"wrote {_write(rows, args.out)}")
    return 0


def cmd_analytic_calibration(args) -> int:
    """`edgeshard bench analytic-calibration`: calibrate the roofline on one checkpoint, predict another."""
    import torch

    from edgeshard_kit.profiling.analytic import calibration_transfer

    if args.threads:
        torch.set_num_threads(args.threads)
    small = measure_profile(args.small, repeats=args.repeats, warmup=2, kv_lens=(32, 64))
    large = measure_profile(args.large, repeats=args.repeats, warmup=2, kv_lens=(32, 64))
    from edgeshard_kit.profiling.catalog import get_device

    dev = get_device("this-machine")
    print(f"this-machine: {dev.mem_bw_gbs:.1f} GB/s, {dev.peak_flops['float32'] / 1e9:.1f} GFLOP/s float32 (measured)")
    rows = [calibration_transfer(small, large, "this-machine"), calibration_transfer(large, small, "this-machine")]
    for r in rows:
        r.update(mem_bw_gbs=dev.mem_bw_gbs, peak_gflops_float32=dev.peak_flops["float32"] / 1e9)
    for r in rows:
        print(f"calibrated on {r['calibrated_on']} (fit error {r['fit_error_pct']:.1f}%), predicting {r['predicted']}: "
              f"measured {r['measured_ms']:.2f} ms/token, calibrated {r['calibrated_ms']:.2f} "
              f"({r['calibrated_error_pct']:+.1f}%), uncalibrated {r['uncalibrated_ms']:.2f} "
              f"({r['uncalibrated_error_pct']:+.1f}%)")
    print(f"wrote {_write(rows, args.out)}")
    return 0
