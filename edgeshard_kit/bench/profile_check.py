"""`edgeshard bench profile-check`: rows of a profile's predicted decode latency against measured `generate_split`."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from edgeshard_kit.model.checkpoint import load_llama_config
from edgeshard_kit.model.generate import generate_split
from edgeshard_kit.model.stage import StageModel
from edgeshard_kit.profiling.measure import median_min_max, measure_profile


def profile_check(checkpoint: str | Path, device: str = "cpu", dtype: str = "float32", repeats: int = 5,
                  warmup: int = 2, rounds: int = 7, new_tokens: int = 12, prompt_len: int = 32,
                  progress: bool = True, threads: int | None = None) -> list[dict]:
    """Alternate profiling and `generate_split` (one stage) on the same model; one row per round."""
    if threads:
        torch.set_num_threads(threads)
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


def ratio_summary(rows: list[dict]) -> dict:
    """Predicted/measured over all rounds: sum over sum, and the median, min and max of the per-round ratios."""
    med, lo, hi = median_min_max([r["ratio"] for r in rows])
    total = sum(r["predicted_ms"] for r in rows) / sum(r["measured_ms"] for r in rows)
    return {"sum_ratio": total, "median_ratio": med, "min_ratio": lo, "max_ratio": hi, "rounds": len(rows)}
