"""SmolLM2-135M-Instruct deployed on two local workers: greedy chat answers stopped at EOS equal transformers' generate.

The reference is `LlamaForCausalLM.generate` on one device, on the same left-padded batch of chat prompts
(`apply_chat_template(..., add_generation_prompt=True)`), with the checkpoint's generation config (EOS
<|im_end|>, finished rows padded). The deployment runs units [0, 16) and [16, 32) on two worker processes,
sequentially and as two pipelined micro-batches under both schedules.
"""

import pytest
import torch

from edgeshard_kit.core.units import Stage
from edgeshard_kit.model.checkpoint import generation_settings
from edgeshard_kit.planning.plan import Plan
from edgeshard_kit.runtime.deployment import deploy

# short answers first: micro-batch 0 of 2 ends well before micro-batch 1 (and is sent no step after)
PROMPTS = ["What is the capital of France? Answer in one word.", "Name three primary colors.",
           "Say hello.", "Is water wet? Answer yes or no."]
NEW = 32


@pytest.fixture(scope="module")
def reference(smollm2_checkpoint):
    """transformers' greedy generate on the whole left-padded batch of chat prompts (stops at EOS, pads)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    tok.padding_side = "left"
    enc = tok.apply_chat_template([[{"role": "user", "content": p}] for p in PROMPTS], add_generation_prompt=True,
                                  padding=True, return_tensors="pt", return_dict=True)
    model = LlamaForCausalLM.from_pretrained(smollm2_checkpoint, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=NEW,
                             do_sample=False)
    return out[:, enc["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def deployed(smollm2_checkpoint, local_testbed):
    plan = Plan("latency", (Stage("d0", 0, 16), Stage("d1", 16, 32)), 0.0, 0.0, 0.0)
    dep = deploy(plan, local_testbed(2), smollm2_checkpoint)
    yield dep
    dep.close()


def test_the_reference_stops_at_eos(reference, smollm2_checkpoint):
    eos = generation_settings(smollm2_checkpoint).eos_token_ids
    ended = [any(t in eos for t in row) for row in reference]
    assert ended[0] and ended[1]  # the short answers (micro-batch 0 of 2) end within NEW tokens
    assert max(row.index(t) for row in reference[:2] for t in row if t in eos) < NEW - 8


@pytest.mark.parametrize("mode,k,schedule", [("sequential", 1, "no-bubbles"), ("pipelined", 2, "no-bubbles"),
                                             ("pipelined", 2, "bubbles")])
def test_smollm2_deployed_equals_transformers(deployed, reference, mode, k, schedule):
    r = deployed.generate(PROMPTS, NEW, mode=mode, micro_batches=k, schedule=schedule, chat=True)
    assert r.tokens == reference
    # a micro-batch is sent no step after all its rows ended: steps = its last row's EOS step + 1
    eos = set(generation_settings(deployed.checkpoint).eos_token_ids)
    ends = [next((i + 1 for i, t in enumerate(row) if t in eos), NEW) for row in reference]
    rows = [list(range(len(PROMPTS)))] if k == 1 else [[0, 1], [2, 3]]
    sent = [sum(1 for rec in r.per_token if rec["mb"] == mb) for mb in range(k)]
    assert sent == [max(ends[i] for i in rs) for rs in rows]
    assert all(t.strip() for t in r.text)
    assert [s["start"] for s in r.stages] == [0, 16] and [s["end"] for s in r.stages] == [16, 32]
