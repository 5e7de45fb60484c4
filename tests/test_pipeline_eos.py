"""Stop at EOS and chat prompts on workers: tokens equal transformers' generate with the checkpoint's generation config.

The tiny checkpoint never emits its EOS by chance, so each test copies it and writes a generation_config.json
whose EOS ids are tokens that greedy decoding produces: rows 0 and 1 (micro-batch 0 of 2) end early, row 2
never does, so micro-batch 0 stops while micro-batch 1 goes on (its rows are padded as transformers pads).
"""

import json
import shutil

import pytest
import torch

from edgeshard_kit.model.generate import generate_split
from edgeshard_kit.runtime.deployment import deploy
from helpers import plan_of

PROMPTS = ["hello world", "a b c", "the cat sat", "x"]
NEW = 8
# a ChatML-like template for the tiny tokenizer (which has none): user turns, then the assistant's generation prompt
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
RUNS = [("sequential", 1, "no-bubbles"), ("pipelined", 2, "bubbles"), ("pipelined", 2, "no-bubbles"),
        ("pipelined", 4, "bubbles"), ("pipelined", 4, "no-bubbles")]


def hf_batch(ckpt, prompts, chat=False):
    """Left-padded ids and mask as transformers makes them (apply_chat_template for chat)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    tok.padding_side = "left"
    if chat:
        enc = tok.apply_chat_template([[{"role": "user", "content": p}] for p in prompts], add_generation_prompt=True,
                                      padding=True, return_tensors="pt", return_dict=True)
    else:
        enc = tok(prompts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def hf_generate(ckpt, prompts, new, chat=False, **kw):
    """transformers' greedy generate on the whole padded batch, with the checkpoint's generation config."""
    from transformers import LlamaForCausalLM

    ids, mask = hf_batch(ckpt, prompts, chat)
    model = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, **kw)
    return out[:, ids.shape[1]:].tolist()


def choose_eos(greedy: list[list[int]]) -> list[int]:
    """EOS ids from greedy rows: rows 0 and 1 (micro-batch 0 of 2) end early, row 2 or 3 never ends, the other
    one when it can (each id is a token the surviving row does not produce)."""
    for live, other in ((2, 3), (3, 2)):
        keep = set(greedy[live])
        eos: list[int] = []
        for r, last in ((0, NEW - 3), (1, NEW - 3), (other, NEW - 2)):
            eos += [t for t in greedy[r][:last] if t not in keep][:1]
        ends = [next((s for s, t in enumerate(row) if t in eos), NEW) for row in greedy]
        if max(ends[:2]) < NEW - 2 and ends[live] == NEW:
            return eos
    raise AssertionError(f"no EOS choice for this scenario: {greedy}")


def copy_with(src, dst, eos: list[int], pad: int | None, template: str | None = None):
    """A copy of checkpoint `src` with these EOS ids and pad id in generation_config.json (and a chat template)."""
    shutil.copytree(src, dst)
    (dst / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": eos, "pad_token_id": pad, "do_sample": False}))
    if template is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(dst)
        tok.chat_template = template
        tok.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def base(tiny_checkpoint_factory):
    return tiny_checkpoint_factory(layers=4, seed=1)


@pytest.fixture(scope="module")
def eos_ckpt(base, tmp_path_factory):
    """EOS ids that greedy decoding of PROMPTS produces; pad null (transformers pads with the first EOS id)."""
    greedy = hf_generate(base, PROMPTS, NEW, min_new_tokens=NEW)
    return copy_with(base, tmp_path_factory.mktemp("eos") / "ck", choose_eos(greedy), None)


@pytest.fixture(scope="module")
def chat_ckpt(base, tmp_path_factory):
    """A chat template, and EOS ids that greedy decoding of the chat prompts produces; pad 3."""
    d = copy_with(base, tmp_path_factory.mktemp("chat") / "ck", [2], 3, TEMPLATE)
    greedy = hf_generate(d, PROMPTS, NEW, chat=True, min_new_tokens=NEW)
    (d / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": choose_eos(greedy), "pad_token_id": 3, "do_sample": False}))
    return d


@pytest.fixture(scope="module")
def eos_dep(eos_ckpt, local_testbed):
    dep = deploy(plan_of(("d0", 0, 3), ("d1", 3, 6)), local_testbed(2), eos_ckpt)
    yield dep
    dep.close()


@pytest.fixture(scope="module")
def chat_dep(chat_ckpt, local_testbed):
    dep = deploy(plan_of(("d0", 0, 2), ("d1", 2, 6)), local_testbed(2), chat_ckpt)
    yield dep
    dep.close()


def _steps(res) -> dict[int, int]:
    """Micro-batch -> tokens it was sent for (the coordinator sends nothing after a micro-batch stopped)."""
    out: dict[int, int] = {}
    for r in res.per_token:
        out[r["mb"]] = out.get(r["mb"], 0) + 1
    return out


@pytest.mark.timeout(120)  # a release rule that waits for a stopped micro-batch would hang here
@pytest.mark.parametrize("mode,k,schedule", RUNS)
def test_stop_at_eos_equals_transformers(eos_dep, eos_ckpt, mode, k, schedule):
    ref = hf_generate(eos_ckpt, PROMPTS, NEW)
    assert len(ref[0]) == NEW and any(t == ref[0][-1] for t in ref[0][:-1])  # row 0 ended, then padded
    r = eos_dep.generate(PROMPTS, NEW, mode=mode, micro_batches=k, schedule=schedule, stop_at_eos=True)
    assert r.tokens == ref
    if k == 2:  # micro-batch 0 (rows 0, 1) stopped early, micro-batch 1 went on to NEW tokens
        steps = _steps(r)
        assert steps[0] < NEW - 1 and steps[1] == NEW
        assert r.summary["generated_tokens"] == 2 * steps[0] + 2 * NEW
    assert len(r.per_stage) == 2 * len(r.per_token)


def test_stop_at_eos_is_off_by_default_for_text(eos_dep, base):
    r = eos_dep.generate(PROMPTS, NEW, mode="pipelined", micro_batches=2)
    assert r.tokens == generate_split(base, prompts=PROMPTS, max_new_tokens=NEW).tokens  # EOS ids ignored


def test_stop_at_eos_matches_the_local_split(eos_dep, eos_ckpt):
    local = generate_split(eos_ckpt, [(0, 2), (2, 6)], prompts=PROMPTS, max_new_tokens=NEW, stop_at_eos=True)
    assert eos_dep.generate(PROMPTS, NEW, stop_at_eos=True).tokens == local.tokens


def test_stop_at_eos_with_token_ids_and_sampling(eos_dep, eos_ckpt):
    ids, mask = hf_batch(eos_ckpt, PROMPTS)
    a = eos_dep.generate(ids, NEW, attention_mask=mask, mode="pipelined", micro_batches=2, stop_at_eos=True)
    assert a.tokens == hf_generate(eos_ckpt, PROMPTS, NEW) and a.text == []
    s = eos_dep.generate(PROMPTS[:2], NEW, temperature=0.9, seed=5, stop_at_eos=True)
    local = generate_split(eos_ckpt, prompts=PROMPTS[:2], max_new_tokens=NEW, temperature=0.9, seed=5,
                           stop_at_eos=True)
    assert s.tokens == local.tokens


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode,k,schedule", RUNS[:3])
def test_chat_equals_transformers(chat_dep, chat_ckpt, mode, k, schedule):
    ref = hf_generate(chat_ckpt, PROMPTS, NEW, chat=True)
    r = chat_dep.generate(PROMPTS, NEW, mode=mode, micro_batches=k, schedule=schedule, chat=True)  # stops at EOS
    assert r.tokens == ref
    assert any(3 in row for row in r.tokens)  # finished rows padded with pad id 3
    if k == 2:
        steps = _steps(r)
        assert steps[0] < NEW - 1 and steps[1] == NEW
    local = generate_split(chat_ckpt, prompts=PROMPTS, max_new_tokens=NEW, chat=True)
    assert r.tokens == local.tokens and r.text == local.text


def test_chat_without_stopping_and_chat_needs_text(chat_dep, chat_ckpt):
    from edgeshard_kit.core.errors import KitError

    r = chat_dep.generate(PROMPTS[:2], NEW, chat=True, stop_at_eos=False)
    local = generate_split(chat_ckpt, prompts=PROMPTS[:2], max_new_tokens=NEW, chat=True, stop_at_eos=False)
    assert r.tokens == local.tokens and all(len(t) == NEW for t in r.tokens)
    with pytest.raises(KitError, match="text"):
        chat_dep.generate([[1, 5, 6]], 2, chat=True)
    assert not chat_dep.closed
