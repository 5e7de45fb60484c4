"""The real default model, SmolLM2-135M-Instruct (30 layers = 32 units, tied embeddings, a chat template):
split generation on one host gives transformers' own greedy tokens for a left-padded batch of chat prompts.

The reference is `AutoModelForCausalLM.generate` on the same checkpoint, its prompts built by the tokenizer's
`apply_chat_template` (batched, left-padded), stopping at EOS as its generation_config.json says.
"""

from __future__ import annotations

import pytest
import torch

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.model.checkpoint import generation_settings, load_tokenizer
from edgeshard_kit.model.generate import build_stages, encode_prompts, generate_split

PROMPTS = ["What is the capital of France?", "Name a primary colour.", "Write one word about the sea."]
NEW = 12
TOTAL = 32
SPLITS = [
    [(0, TOTAL)],  # the whole model as one stage: embedding and head share one tensor
    [(0, 31), (31, 32)],  # the head alone: it loads the embedding as its own lm_head
    [(0, 1), (1, 32)],  # the embedding alone
    [(0, 16), (16, 32)],
    [(0, 1), (1, 11), (11, 21), (21, 31), (31, 32)],
]


@pytest.fixture(scope="module")
def reference(smollm2_checkpoint):
    """transformers' greedy generate on the chat-templated, left-padded batch: (input ids, new tokens, logits)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_checkpoint, padding_side="left")
    enc = tok.apply_chat_template([[{"role": "user", "content": p}] for p in PROMPTS], add_generation_prompt=True,
                                  padding=True, return_tensors="pt", return_dict=True)
    model = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint).eval()
    out = model.generate(**enc, max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return enc, out.sequences[:, enc["input_ids"].shape[1]:].tolist(), out.logits


def test_reference_is_a_left_padded_batch_that_stops_at_eos(smollm2_checkpoint, reference):
    enc, want, _ = reference
    assert not enc["attention_mask"][:, 0].all()  # prompts of different lengths: left padding present
    gs = generation_settings(smollm2_checkpoint)
    assert gs.eos_token_ids == (2,) and gs.pad_token_id == 2
    assert any(2 in row and row[-1] == 2 for row in want)  # some row ended at EOS and was padded


def test_chat_encoding_is_apply_chat_template(smollm2_checkpoint, reference):
    enc, _, _ = reference
    ids, mask = encode_prompts(load_tokenizer(smollm2_checkpoint), PROMPTS, chat=True)
    assert torch.equal(ids, enc["input_ids"]) and torch.equal(mask, enc["attention_mask"])


@pytest.mark.parametrize("split", SPLITS, ids=lambda s: ",".join(f"{a}:{b}" for a, b in s))
def test_greedy_tokens_equal_transformers(smollm2_checkpoint, reference, split):
    _, want, logits = reference
    res = generate_split(smollm2_checkpoint, split, prompts=PROMPTS, max_new_tokens=NEW, chat=True, keep_logits=True)
    assert res.tokens == want
    assert len(res.logits) == len(logits)
    for got, ref in zip(res.logits, logits):
        torch.testing.assert_close(got, ref.float(), rtol=0, atol=1e-4)
    assert res.text[0].startswith("The capital of France is Paris")


def test_tied_embedding_is_one_tensor(smollm2_checkpoint):
    from transformers import AutoModelForCausalLM

    whole, = build_stages(smollm2_checkpoint, [(0, TOTAL)])
    assert whole.lm_head.weight is whole.embed_tokens.weight
    hf = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint)
    assert whole.param_bytes == 4 * sum(p.numel() for p in hf.parameters())  # tied tensor once, as transformers
    head = build_stages(smollm2_checkpoint, [(0, 31), (31, 32)])[1]
    assert head.param_bytes == 4 * (49152 * 576 + 576)  # a stage with only the head holds its own copy


def test_prompt_edge_cases_as_transformers(smollm2_checkpoint):
    """SmolLM2 adds no BOS: "" encodes to nothing (refused); whitespace encodes to tokens and generates as HF does."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(smollm2_checkpoint)
    with pytest.raises(KitError, match="prompt 1 is empty: it encodes to no token"):
        encode_prompts(tok, ["hi", ""])
    prompts = ["   ", "The sea is"]
    enc = tok(prompts, padding=True, return_tensors="pt")
    model = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint).eval()
    model.generation_config.eos_token_id = None
    want = model.generate(**enc, max_new_tokens=4, do_sample=False)[:, enc["input_ids"].shape[1]:].tolist()
    assert generate_split(smollm2_checkpoint, [(0, 16), (16, 32)], prompts=prompts, max_new_tokens=4).tokens == want
