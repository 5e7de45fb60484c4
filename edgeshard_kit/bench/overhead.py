"""`edgeshard bench overhead`: rows of per-token decode time, the kit's one-stage path against transformers' generate."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.units import n_units
from edgeshard_kit.model.checkpoint import load_llama_config, load_tokenizer, quiet_progress
from edgeshard_kit.model.generate import build_stages, encode_prompts, run_stages
from edgeshard_kit.model.stage import parse_device, parse_dtype, synchronize

PROMPT = "Collaborative inference splits a large language model into shards that run on nearby devices."
FIELDS = ["impl", "repeat", "tokens", "prompt_len", "prefill_ms", "decode_ms_median", "decode_ms_mean",
          "decode_ms_min", "decode_ms_max", "dtype", "device", "threads", "param_bytes", "torch", "transformers"]


class _StepClock:
    """A transformers streamer that only records when each token arrives (perf_counter, s)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []

    def put(self, value) -> None:
        synchronize(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _hf_decode(model, ids, mask, tokens: int, device: torch.device) -> tuple[float, list[float]]:
    """One HF generate run; returns (prefill ms incl. first token, per decode step ms)."""
    clock = _StepClock(device)
    synchronize(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, max_new_tokens=tokens, do_sample=False, streamer=clock)
    # times[0] is the prompt being "streamed" (before prefill), times[1] the first new token.
    prefill = (clock.times[1] - t0) * 1e3
    steps = [(b - a) * 1e3 for a, b in zip(clock.times[1:], clock.times[2:])]
    return prefill, steps


def measure_overhead(model_dir: str | Path, tokens: int = 32, repeats: int = 5, dtype: str = "float32",
                     device: str = "cpu", prompt: str = PROMPT, threads: int | None = None) -> list[dict]:
    """Alternate the kit's one-stage generation and HF generate `repeats` times; one row per measurement."""
    from transformers import AutoModelForCausalLM
    import transformers

    if tokens < 2 or repeats < 1:
        raise KitError("bench overhead: --tokens must be >= 2 and --repeats >= 1")
    config = load_llama_config(model_dir)
    if threads:
        torch.set_num_threads(threads)  # both sides share it: the comparison stays fair
    dev, dt = parse_device(device), parse_dtype(dtype)
    tok = load_tokenizer(model_dir)
    ids, mask = encode_prompts(tok, [prompt])
    total = n_units(config.num_hidden_layers)
    stages = build_stages(model_dir, [(0, total)], dtype=dtype, device=device)
    with quiet_progress():
        hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dt, attn_implementation="sdpa").to(dev).eval()
    # Exactly `tokens` steps on both sides, without an extra logits processor (min_new_tokens would add one).
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = config.pad_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else 0

    def kit_run():
        _, prefill, steps, _ = run_stages(stages, ids, mask, tokens, pad_token_id=pad)
        return prefill, steps

    def hf_run():
        return _hf_decode(hf, ids.to(dev), mask.to(dev), tokens, dev)

    kit_run(), hf_run()  # warm-up: first calls allocate and pick kernels
    rows = []
    for r in range(repeats):
        order = [("kit", kit_run), ("transformers", hf_run)]
        for impl, fn in (order if r % 2 == 0 else order[::-1]):  # alternate who goes first
            prefill, steps = fn()
            rows.append({
                "impl": impl, "repeat": r, "tokens": tokens, "prompt_len": int(ids.shape[1]),
                "prefill_ms": round(prefill, 4), "decode_ms_median": round(statistics.median(steps), 4),
                "decode_ms_mean": round(statistics.fmean(steps), 4), "decode_ms_min": round(min(steps), 4),
                "decode_ms_max": round(max(steps), 4), "dtype": dtype, "device": str(dev), "threads": torch.get_num_threads(),
                "param_bytes": stages[0].param_bytes, "torch": torch.__version__,
                "transformers": transformers.__version__,
            })
    return rows


def overhead_ratio(rows: list[dict]) -> float:
    """Median kit decode ms per token over median transformers decode ms per token."""
    kit = statistics.median(r["decode_ms_median"] for r in rows if r["impl"] == "kit")
    hf = statistics.median(r["decode_ms_median"] for r in rows if r["impl"] == "transformers")
    return kit / hf

