"""The compiled decode path (static KV cache + torch.compile): the same greedy tokens as transformers' generate and
the eager path, in one process and over 2 local workers; the memory-bandwidth measurement; the compile flag in
stage configs and profiles. Compiling a tiny model on CPU takes tens of seconds: one compile per path."""

from __future__ import annotations

import pytest
import torch

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.model import compiled
from edgeshard_kit.model.compiled import CAPACITY_STEP, DEFAULT_CAPACITY, cache_capacity, compile_available
from edgeshard_kit.model.generate import build_stages, generate_split
from edgeshard_kit.model.stage import StageModel
from edgeshard_kit.profiling.measure import matching_profiles, measure_bandwidth
from edgeshard_kit.profiling.profile import Profile, load_profile, save_profile
from edgeshard_kit.runtime.deployment import deploy
from edgeshard_kit.runtime.protocol import StageConfig
from helpers import plan_of

# Left-padded batch of two prompts of different lengths (pad id 3), as in test_stage.py.
IDS = torch.tensor([[3, 3, 3, 1, 40, 99, 41, 7], [1, 5, 6, 7, 8, 9, 10, 11]])
MASK = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
STEPS = 10

needs_compiler = pytest.mark.skipif(compile_available(torch.device("cpu")) is not None,
                                    reason=str(compile_available(torch.device("cpu"))))


@pytest.fixture(scope="module")
def hf_tokens(tiny_checkpoint):
    """The reference: transformers' greedy generate on the unsplit model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    model.generation_config.eos_token_id = None  # always STEPS tokens
    out = model.generate(IDS, attention_mask=MASK, max_new_tokens=STEPS, do_sample=False, pad_token_id=3)
    return out[:, IDS.shape[1]:].tolist()


@needs_compiler
def test_compiled_split_in_one_process_equals_eager_and_transformers(tiny_checkpoint, hf_tokens):
    eager = generate_split(tiny_checkpoint, [(0, 2), (2, 4)], prompt_ids=IDS, attention_mask=MASK,
                           max_new_tokens=STEPS, keep_logits=True)
    stages = build_stages(tiny_checkpoint, [(0, 2), (2, 4)], compile=True)
    comp = generate_split(tiny_checkpoint, prompt_ids=IDS, attention_mask=MASK, max_new_tokens=STEPS,
                          keep_logits=True, stages=stages)
    assert eager.tokens == hf_tokens
    assert comp.tokens == hf_tokens
    assert comp.compiled and not eager.compiled and comp.compile_s > 0
    diff = max(float((a - b).abs().max()) for a, b in zip(eager.logits, comp.logits))
    assert diff < 1e-4, f"compiled logits differ from eager by {diff}"
    # Static caches are sized from the workload (prompt + new tokens, rounded up) and reused: a second
    # request of the same shape compiles nothing more.
    again = generate_split(tiny_checkpoint, prompt_ids=IDS, attention_mask=MASK, max_new_tokens=STEPS, stages=stages)
    assert again.tokens == hf_tokens
    assert [s.compiled.compiles for s in stages] == [1, 1]


@needs_compiler
def test_a_full_static_cache_grows(tiny_checkpoint, hf_tokens, monkeypatch):
    monkeypatch.setattr(compiled, "CAPACITY_STEP", 8)  # 8 prompt tokens in 16 slots: full after 8 decode steps
    stage = StageModel(tiny_checkpoint, 0, 4, compile=True)
    cache = stage.new_cache(max_len=9)
    x, m, toks = IDS, MASK, []
    for _ in range(STEPS):
        tok = stage.forward(x, cache, m).argmax(-1)
        toks.append(tok)
        x, m = tok[:, None], None
    assert cache.static.capacity == 32 and cache.static.length == IDS.shape[1] + STEPS - 1
    assert torch.stack(toks, 1).tolist() == hf_tokens
    with pytest.raises(KitError, match="batch size"):
        stage.forward(x[:1], cache)


@needs_compiler
def test_compiled_workers_equal_transformers(tiny_checkpoint, hf_tokens, local_testbed):
    tb = local_testbed(2)
    with deploy(plan_of(("d0", 0, 2), ("d1", 2, 4)), tb, tiny_checkpoint, threads=1, compile=True) as dep:
        res = dep.generate(IDS, STEPS, attention_mask=MASK)
    assert res.tokens == hf_tokens


def test_static_cache_capacity():
    assert cache_capacity(20, 8) == CAPACITY_STEP  # sized from the workload, rounded up
    assert cache_capacity(CAPACITY_STEP + 1, 8) == 2 * CAPACITY_STEP
    assert cache_capacity(4, 8) == CAPACITY_STEP  # never smaller than what was seen + the next token
    assert cache_capacity(None, 8) == DEFAULT_CAPACITY  # a worker, not told the workload
    assert cache_capacity(None, DEFAULT_CAPACITY) == 2 * DEFAULT_CAPACITY


def test_bandwidth_is_measured():
    bw = measure_bandwidth("cpu", nbytes=16 << 20, repeats=2)
    assert bw > 0 and bw == bw and bw < float("inf")


def test_compile_flag_in_stage_config():
    cfg = StageConfig(stage=0, model_path="/m", start=0, end=2, compile=True)
    assert StageConfig.from_dict(cfg.to_dict()).compile is True
    old = {k: v for k, v in cfg.to_dict().items() if k != "compile"}  # a coordinator without the field
    assert StageConfig.from_dict(old).compile is False
    with pytest.raises(KitError, match="compile"):
        StageConfig.from_dict({**cfg.to_dict(), "compile": "yes"})


def _profile(compiled: bool, device_type: str = "cpu") -> Profile:
    d = {"model": "m", "n_layers": 1, "device_type": device_type, "dtype": "float32", "batch": 1,
         "units": [{"unit": i, "name": f"u{i}", "prefill_ms": 1.0, "decode_ms": 0.5, "param_bytes": 1000}
                   for i in range(3)], "compiled": compiled, "mem_bw_gbs": 10.0}
    return Profile.from_dict(d)


def test_profiles_record_compiled_and_the_planner_gets_the_matching_one(tmp_path):
    eager, comp = _profile(False), _profile(True)
    paths = [str(save_profile(eager, tmp_path / "eager")), str(save_profile(comp, tmp_path / "compiled"))]
    assert load_profile(paths[1]).compiled and not load_profile(paths[0]).compiled
    assert load_profile(paths[0]).mem_bw_gbs == 10.0
    # units 1 and 2 (the embedding reads one row per token): 2000 bytes at 10 GB/s
    assert load_profile(paths[0]).bandwidth_limit_ms() == pytest.approx(2000 / 10e9 * 1e3)
    assert matching_profiles(paths, compiled=True) == [paths[1]]
    assert matching_profiles(paths, compiled=False) == [paths[0]]
    with pytest.raises(KitError, match="compiled"):
        matching_profiles([paths[0]], compiled=True)
    with pytest.raises(KitError, match="mem_bw_gbs"):
        Profile.from_dict({**eager.to_dict(), "mem_bw_gbs": -1})
