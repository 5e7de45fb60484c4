"""StageModel: split execution equals the unsplit HF model (bitwise here, tied embeddings too), per-request caches,
memory (a tied tensor held once), errors."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap

import pytest
import torch

from edgeshard_kit.model.stage import StageModel
from edgeshard_kit.core.errors import KitError

LAYERS = 4
TOTAL = LAYERS + 2
SMALL = dict(layers=LAYERS, hidden=64, intermediate=160, heads=4, kv_heads=2, vocab=320)
# Left-padded batch of two prompts of different lengths (pad id 3).
IDS = torch.tensor([[3, 3, 3, 1, 40, 99, 41, 7], [1, 5, 6, 7, 8, 9, 10, 11]])
MASK = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
STEPS = 6


def _random_splits(n: int, rng: random.Random) -> list[list[tuple[int, int]]]:
    out = []
    for _ in range(n):
        cuts = sorted(rng.sample(range(1, TOTAL), rng.randint(1, TOTAL - 1)))
        bounds = [0, *cuts, TOTAL]
        out.append(list(zip(bounds[:-1], bounds[1:])))
    return out


SPLITS = [
    [(0, TOTAL)],  # whole model as one stage
    [(u, u + 1) for u in range(TOTAL)],  # one unit per stage: embedding alone, each layer, head alone
    [(0, 1), (1, TOTAL)],
    [(0, TOTAL - 1), (TOTAL - 1, TOTAL)],
    *_random_splits(3, random.Random(7)),
]


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint_factory):
    return tiny_checkpoint_factory(shard_size=100_000, **SMALL)


@pytest.fixture(scope="module")
def hf_ref(ckpt):
    """HF greedy generate on the unsplit model: new tokens and per-step float32 logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    model.generation_config.eos_token_id = None  # always STEPS tokens
    out = model.generate(IDS, attention_mask=MASK, max_new_tokens=STEPS, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=3)
    return out.sequences[:, IDS.shape[1]:], [lg.float() for lg in out.logits]


def _run(stages, ids, mask, steps):
    caches = [s.new_cache() for s in stages]
    x, m, toks, logits = ids, mask, [], []
    for _ in range(steps):
        for s, c in zip(stages, caches):
            x = s.forward(x, c, m)
        logits.append(x)
        tok = x.argmax(-1)
        toks.append(tok)
        x, m = tok[:, None], None
    return torch.stack(toks, 1), logits


@pytest.mark.parametrize("split", SPLITS, ids=lambda s: ",".join(f"{a}:{b}" for a, b in s))
def test_split_equals_hf_generate(ckpt, hf_ref, split):
    ref_tokens, ref_logits = hf_ref
    stages = [StageModel(ckpt, a, b) for a, b in split]
    tokens, logits = _run(stages, IDS, MASK, STEPS)
    assert torch.equal(tokens, ref_tokens)
    for got, want in zip(logits, ref_logits):
        assert got.dtype == torch.float32 and got.shape == (2, SMALL["vocab"])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert torch.equal(got, want)  # bitwise on CPU float32 (same kernels, same shapes)


@pytest.fixture(scope="module")
def tied(tiny_checkpoint_factory):
    """Tied embeddings (SmolLM2, Llama-3.2): no lm_head.weight in the file, the head is the embedding."""
    return tiny_checkpoint_factory(tie_word_embeddings=True, **SMALL)


TIED_SPLITS = [[(0, TOTAL)], [(0, TOTAL - 1), (TOTAL - 1, TOTAL)], [(0, 1), (1, TOTAL)],
               [(u, u + 1) for u in range(TOTAL)]]


@pytest.mark.parametrize("split", TIED_SPLITS, ids=lambda s: ",".join(f"{a}:{b}" for a, b in s))
def test_tied_embeddings_equal_hf_generate(tied, split):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tied).eval()
    model.generation_config.eos_token_id = None
    out = model.generate(IDS, attention_mask=MASK, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=3)
    tokens, logits = _run([StageModel(tied, a, b) for a, b in split], IDS, MASK, STEPS)
    assert torch.equal(tokens, out.sequences[:, IDS.shape[1]:])
    for got, want in zip(logits, out.logits):
        assert torch.equal(got, want.float())


def test_tied_tensor_is_held_once(tied):
    """The whole model holds the tied tensor once (one parameter); a stage with only the head loads its own copy."""
    from transformers import AutoModelForCausalLM

    h, v = SMALL["hidden"], SMALL["vocab"]
    whole = StageModel(tied, 0, TOTAL)
    assert whole.tied_head and whole.lm_head.weight is whole.embed_tokens.weight
    hf = AutoModelForCausalLM.from_pretrained(tied)
    assert whole.param_bytes == 4 * sum(p.numel() for p in hf.parameters())  # HF counts the tied tensor once
    head = StageModel(tied, TOTAL - 1, TOTAL)
    assert head.tied_head and head.embed_tokens is None
    assert torch.equal(head.lm_head.weight, whole.embed_tokens.weight)
    assert head.param_bytes == 4 * (v * h + h)  # its own copy + the norm
    emb = StageModel(tied, 0, 1)
    assert whole.param_bytes == emb.param_bytes + StageModel(tied, 1, TOTAL).param_bytes - 4 * v * h


def test_interleaved_caches_are_independent(ckpt):
    """Two requests through the same stages, interleaved step by step, as pipelined micro-batches are."""
    stages = [StageModel(ckpt, 0, 3), StageModel(ckpt, 3, TOTAL)]
    alone_a, _ = _run(stages, IDS[:1], MASK[:1], 4)
    alone_b, _ = _run(stages, IDS[1:], MASK[1:], 4)
    ca, cb = [s.new_cache() for s in stages], [s.new_cache() for s in stages]
    xa, xb, ma, mb, ta, tb = IDS[:1], IDS[1:], MASK[:1], MASK[1:], [], []
    for _ in range(4):
        for s, c1, c2 in zip(stages, ca, cb):
            xa, xb = s.forward(xa, c1, ma), s.forward(xb, c2, mb)
        ta.append(xa.argmax(-1))
        tb.append(xb.argmax(-1))
        xa, xb, ma, mb = ta[-1][:, None], tb[-1][:, None], None, None
    assert torch.equal(torch.stack(ta, 1), alone_a) and torch.equal(torch.stack(tb, 1), alone_b)
    assert ca[0].seq_len == IDS.shape[1] + 3


def test_bfloat16_split_equals_unsplit(ckpt):
    whole = [StageModel(ckpt, 0, TOTAL, dtype="bfloat16")]
    split = [StageModel(ckpt, a, b, dtype="bfloat16") for a, b in [(0, 2), (2, 4), (4, TOTAL)]]
    assert split[1].layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    t_whole, l_whole = _run(whole, IDS, MASK, STEPS)
    t_split, l_split = _run(split, IDS, MASK, STEPS)
    assert torch.equal(t_whole, t_split)
    assert l_split[0].dtype == torch.float32


def test_float16_runs(ckpt):
    st = StageModel(ckpt, 0, TOTAL, dtype="float16")
    tokens, _ = _run([st], IDS, MASK, 2)
    assert tokens.shape == (2, 2)


def test_sizes_and_global_layer_index(ckpt):
    st = StageModel(ckpt, 2, 4)  # layers 1 and 2 (0-based)
    assert [layer.self_attn.layer_idx for layer in st.layers] == [1, 2]
    h, inter, kvh, hd = 64, 160, 2, 16
    per_layer = 4 * (2 * h * h + 2 * h * kvh * hd + 3 * h * inter + 2 * h)
    assert st.param_bytes == 2 * per_layer
    assert st.kv_bytes_per_token() == 2 * 2 * kvh * hd * 4
    assert st.out_bytes_per_token() == h * 4
    head = StageModel(ckpt, TOTAL - 1, TOTAL, dtype="bfloat16")
    assert head.out_bytes_per_token() == 4 * SMALL["vocab"] and head.kv_bytes_per_token() == 0
    x = torch.randn(2, 3, h)
    out = st.forward(x, st.new_cache())
    assert out.shape == (2, 3, h) and out.dtype == torch.float32


def test_stage_errors(ckpt):
    with pytest.raises(KitError, match="out of range"):
        StageModel(ckpt, 0, TOTAL + 1)
    with pytest.raises(KitError, match="out of range"):
        StageModel(ckpt, 3, 3)
    with pytest.raises(KitError, match="dtype"):
        StageModel(ckpt, 0, 1, dtype="int8")
    with pytest.raises(KitError, match="device"):
        StageModel(ckpt, 0, 1, device="tpu")
    emb = StageModel(ckpt, 0, 1)
    with pytest.raises(KitError, match="outside the vocabulary"):
        emb.forward(torch.tensor([[1, 320]]), emb.new_cache())
    mid = StageModel(ckpt, 1, 2)
    with pytest.raises(KitError, match="hidden states"):
        mid.forward(torch.randn(1, 2, 7), mid.new_cache())


MEM_SCRIPT = textwrap.dedent("""
    import gc, json, sys, psutil, torch, transformers
    from transformers import AutoModelForCausalLM
    from edgeshard_kit.model.stage import StageModel
    import transformers.masking_utils, transformers.models.llama.modeling_llama  # code, not weights: import first
    proc = psutil.Process()
    gc.collect(); before = proc.memory_info().rss
    with torch.inference_mode():
        if sys.argv[2] == "full":
            m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
            m(torch.tensor([[1, 2, 3]]))
        else:
            m = StageModel(sys.argv[1], 1, 3)  # a quarter of the 8 decoder layers
            m.forward(torch.zeros(1, 3, m.config.hidden_size), m.new_cache())
        # Touch every weight: HF maps the file lazily, so count what a real run makes resident.
        total = sum(float(p.float().sum()) for p in m.parameters())
    gc.collect(); after = proc.memory_info().rss
    print(json.dumps({"added": after - before}))
""")


@pytest.mark.slow
def test_stage_memory_is_a_fraction_of_the_model(tiny_checkpoint_factory):
    """A stage with 2 of 8 layers of a ~440 MB checkpoint adds well under half the RSS of the whole model."""
    d = tiny_checkpoint_factory(layers=8, hidden=1024, intermediate=2816, heads=8, kv_heads=4, vocab=8000)
    size = (d / "model.safetensors").stat().st_size
    added = {}
    for what in ("full", "stage"):
        r = subprocess.run([sys.executable, "-c", MEM_SCRIPT, str(d), what], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        added[what] = json.loads(r.stdout.strip().splitlines()[-1])["added"]
    print(f"checkpoint {size} bytes; RSS added: whole model {added['full']}, stage 1:3 {added['stage']}")
    assert added["full"] > 0.8 * size  # the whole model really is resident
    assert added["stage"] < 0.5 * added["full"]
