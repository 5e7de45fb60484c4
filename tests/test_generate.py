"""Split generation equals transformers' generate (every split, tied embeddings, EOS lists, null pad, chat
templates, whitespace prompts); sampling checks and reproducibility; CLI output and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from edgeshard_kit.model.checkpoint import load_tokenizer
from edgeshard_kit.model.generate import (GenerationResult, check_sampling, encode_prompts, finish_step, generate_split,
                                          sample_next)
from edgeshard_kit.core.errors import KitError

SMALL = dict(layers=3, hidden=64, intermediate=160, heads=4, kv_heads=2, vocab=320)
TOTAL = 5
PROMPTS = ["Edge devices share the work", "A network link"]
SPLITS = [None, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)], [(0, 2), (2, 5)], [(0, 4), (4, 5)]]


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint_factory):
    return tiny_checkpoint_factory(**SMALL)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeshard_kit", *args], capture_output=True, text=True)


def test_encode_prompts_left_pads(ckpt):
    tok = load_tokenizer(ckpt)
    ids, mask = encode_prompts(tok, PROMPTS)
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape
    assert mask[0].all() and mask[1, 0] == 0 and mask[1, -1] == 1
    assert ids[1, 0] == tok.pad_token_id and ids[:, -1].ne(tok.pad_token_id).all()
    ref = tok(PROMPTS, padding=True, return_tensors="pt")  # transformers' own left padding
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    with pytest.raises(KitError, match="no prompt"):
        encode_prompts(tok, [])
    with pytest.raises(KitError, match="prompt 1 is not text"):
        encode_prompts(tok, ["ok", 5])
    # Whitespace-only prompts are encoded as transformers encodes them (here <s> + the spaces).
    ids, _ = encode_prompts(tok, ["  "])
    assert ids[0].tolist() == tok("  ")["input_ids"] and len(ids[0]) > 1


def test_whitespace_prompt_generates_as_transformers_does(ckpt):
    from transformers import AutoModelForCausalLM

    prompts = ["   ", "Edge devices share the work"]
    tok = load_tokenizer(ckpt)
    enc = tok(prompts, padding=True, return_tensors="pt")
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    want = model.generate(**enc, max_new_tokens=6, do_sample=False)[:, enc["input_ids"].shape[1]:].tolist()
    for split in (None, [(0, 2), (2, 5)]):
        assert generate_split(ckpt, split, prompts=prompts, max_new_tokens=6).tokens == want


def test_sample_next():
    logits = torch.tensor([[0.0, 3.0, 1.0, -2.0], [5.0, 0.0, 0.0, 4.9]])
    assert sample_next(logits).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    # A tiny nucleus keeps only the top token.
    assert all(sample_next(logits, 1.0, 1e-3, g).tolist() == [1, 0] for _ in range(20))
    a = [sample_next(logits, 1.0, 1.0, torch.Generator().manual_seed(s)).tolist() for s in range(10)]
    b = [sample_next(logits, 1.0, 1.0, torch.Generator().manual_seed(s)).tolist() for s in range(10)]
    assert a == b and len({tuple(x) for x in a}) > 1
    # top-p 0.9 on row 1 keeps tokens 0 and 3 (0.52 + 0.47), never 1 or 2.
    seen = {sample_next(logits[1:], 1.0, 0.9, g).item() for _ in range(200)}
    assert seen == {0, 3}
    with pytest.raises(KitError, match="temperature"):
        sample_next(logits, -1.0)
    with pytest.raises(KitError, match="top-p"):
        sample_next(logits, 1.0, 0.0)


@pytest.mark.parametrize("temperature, top_p, message", [
    (-0.5, 1.0, "temperature must be a finite number >= 0"),
    (float("nan"), 1.0, "temperature must be a finite number >= 0"),
    (float("inf"), 1.0, "temperature must be a finite number >= 0"),
    ("hot", 1.0, "temperature must be a number"),
    (True, 1.0, "temperature must be a number"),
    (1.0, 0.0, r"top-p must be in \(0, 1\]"),
    (1.0, 1.5, r"top-p must be in \(0, 1\]"),
    (1.0, float("nan"), r"top-p must be in \(0, 1\]"),
    (1.0, None, "top-p must be a number"),
])
def test_check_sampling_is_the_one_check(ckpt, temperature, top_p, message):
    with pytest.raises(KitError, match=message):
        check_sampling(temperature, top_p)
    with pytest.raises(KitError, match=message):
        sample_next(torch.zeros(1, 4), temperature, top_p)
    with pytest.raises(KitError, match=message):  # refused before any weight is loaded
        generate_split(ckpt, None, prompt_ids=[1, 2], temperature=temperature, top_p=top_p)


def test_check_sampling_accepts():
    assert check_sampling(0, 1) == (0.0, 1.0)
    assert check_sampling("0.7", 0.9) == (0.7, 0.9)
    assert check_sampling(2.0, 1e-6) == (2.0, 1e-6)


def test_finish_step_by_hand():
    """transformers' rule: a finished row gets the pad id; any EOS id finishes a row; no pad -> the first EOS id."""
    fin = torch.tensor([False, False, True, False])
    tok, fin2 = finish_step(torch.tensor([5, 9, 5, 7]), fin, (9, 7), pad_id=0)
    assert tok.tolist() == [5, 9, 0, 7] and fin2.tolist() == [False, True, True, True]
    tok, fin3 = finish_step(torch.tensor([7, 1, 1, 1]), fin2, (9, 7), pad_id=None)
    assert tok.tolist() == [7, 9, 9, 9] and fin3.tolist() == [True] * 4
    tok, fin4 = finish_step(torch.tensor([4, 4]), None, (), pad_id=0)  # no EOS ids: nothing changes
    assert tok.tolist() == [4, 4] and fin4.tolist() == [False, False]
    assert fin.tolist() == [False, False, True, False]  # inputs are not modified


@pytest.mark.parametrize("stop_at_eos", [False, True])
def test_greedy_equals_hf_for_every_split(ckpt, stop_at_eos):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(ckpt)
    ids, mask = encode_prompts(tok, PROMPTS)
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    if not stop_at_eos:
        model.generation_config.eos_token_id = None  # HF stops at eos unless told otherwise
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    want = out.sequences[:, ids.shape[1]:].tolist()
    for split in SPLITS:
        res = generate_split(ckpt, split, prompts=PROMPTS, max_new_tokens=10, stop_at_eos=stop_at_eos,
                             keep_logits=True)
        assert res.tokens == want, split
        assert res.text == tok.batch_decode(want, skip_special_tokens=True)
        for got, ref in zip(res.logits, out.logits):
            torch.testing.assert_close(got, ref.float(), rtol=0, atol=1e-5)


def test_sampling_reproducible_across_splits(ckpt):
    runs = [generate_split(ckpt, s, prompt_ids=[[1, 40, 41, 42], [1, 7]], max_new_tokens=8, temperature=0.9,
                           top_p=0.95, seed=3) for s in SPLITS]
    assert all(r.tokens == runs[0].tokens for r in runs)
    other = generate_split(ckpt, None, prompt_ids=[[1, 40, 41, 42], [1, 7]], max_new_tokens=8, temperature=0.9,
                           top_p=0.95, seed=4)
    assert other.tokens != runs[0].tokens


def test_result_fields_and_json_round_trip(ckpt):
    res = generate_split(ckpt, [(0, 2), (2, 5)], prompt_ids=[1, 50, 60], max_new_tokens=4)
    assert len(res.tokens) == 1 and len(res.tokens[0]) == 4 and len(res.per_token_ms) == 3
    assert res.prefill_ms > 0 and all(ms > 0 for ms in res.per_token_ms)
    back = GenerationResult.from_dict(json.loads(json.dumps(res.to_dict())))
    assert back == res


def test_cli_generate_json_and_text(ckpt):
    r = _cli("generate", "--model", str(ckpt), "--split", "0:2,2:3,3:5", "--prompt-ids", "1,2,3",
             "--max-new-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert {"tokens", "text", "per_token_ms", "prefill_ms", "split"} <= d.keys()
    assert d["tokens"] == generate_split(ckpt, None, prompt_ids=[1, 2, 3], max_new_tokens=4).tokens
    assert d["split"] == [[0, 2], [2, 3], [3, 5]]


def test_cli_generate_text(ckpt, capsys):
    from edgeshard_kit.cli.main import main

    assert main(["generate", "--model", str(ckpt), "--prompt", "Edge devices", "--max-new-tokens", "3"]) == 0
    assert "per token median" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--split", "0:2,3:5"], "not covered"),
    (["--split", "0:3,2:5"], "overlaps"),
    (["--split", "0:6"], "out of range"),
    (["--split", "0-2,2:5"], "not of the form"),
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--top-p", "0"], "top-p must be in (0, 1]"),
    (["--prompt-ids", "1,320"], "outside the vocabulary"),
    (["--prompt-ids", "1,x"], "comma-separated"),
])
def test_cli_bad_input(ckpt, args, message, capsys):
    """In-process through the CLI's main (one subprocess check of the real entry point follows)."""
    from edgeshard_kit.cli.main import main

    if "--prompt" not in args and "--prompt-ids" not in args:
        args = [*args, "--prompt-ids", "1,2"]
    assert main(["generate", "--model", str(ckpt), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_bad_input_subprocess(ckpt, tmp_path):
    r = _cli("generate", "--model", str(ckpt), "--split", "0:2,3:5", "--prompt-ids", "1,2")
    assert r.returncode == 2 and "not covered" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_missing_model(tmp_path, capsys):
    from edgeshard_kit.cli.main import main

    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_checkpoint(tmp_path, capsys):
    from edgeshard_kit.cli.main import main

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert "not 'llama'" in capsys.readouterr().err
    with pytest.raises(KitError, match="not 'llama'"):
        generate_split(tmp_path, None, prompts="hi")


def test_demo_split_matches_one_stage(ckpt, capsys):
    from edgeshard_kit.cli.main import main
    from edgeshard_kit.experiments.demo import split_check, three_way_split

    assert three_way_split(10) == [(0, 3), (3, 6), (6, 10)]
    assert split_check(ckpt, max_new_tokens=3).same
    assert main(["demo", "--split-only", "--model", str(ckpt), "--max-new-tokens", "3"]) == 0
    assert "the same tokens" in capsys.readouterr().out


def test_bench_overhead_writes_rows(ckpt, tmp_path):
    import csv

    from edgeshard_kit.bench.overhead import measure_overhead, overhead_ratio
    from edgeshard_kit.core.io import write_rows

    rows = measure_overhead(ckpt, tokens=3, repeats=2)
    assert [r["impl"] for r in rows] == ["kit", "transformers", "transformers", "kit"]  # alternating
    assert overhead_ratio(rows) > 0
    path = write_rows(rows, tmp_path / "o.csv")
    with path.open() as f:
        back = list(csv.DictReader(f))
    assert len(back) == 4 and float(back[0]["decode_ms_median"]) > 0


# ---- transformers' generate on real-world checkpoint shapes: tied embeddings, EOS lists, null pad, chat -----

def _hf(d):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d).eval()


def _new_tokens(out, ids) -> list[list[int]]:
    return out[:, ids.shape[1]:].tolist()


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_tied_embeddings_equal_hf_for_every_split(tiny_checkpoint_factory):
    """SmolLM2 / Llama-3.2 shape: no lm_head.weight, the head is the embedding (one stage, or the head alone)."""
    tied = tiny_checkpoint_factory(tie_word_embeddings=True, **SMALL)
    tok = load_tokenizer(tied)
    ids, mask = encode_prompts(tok, PROMPTS)
    model = _hf(tied)
    model.generation_config.eos_token_id = None
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    want = _new_tokens(out.sequences, ids)
    for split in SPLITS:
        res = generate_split(tied, split, prompts=PROMPTS, max_new_tokens=8, keep_logits=True)
        assert res.tokens == want, split
        for got, ref in zip(res.logits, out.logits):
            torch.testing.assert_close(got, ref.float(), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def eos_ids(ckpt):
    """Two EOS ids that greedy decoding of PROMPTS produces: row 1 meets the second early, row 0 the first later.

    Returns ((first, second), step at which row 0 ends, step at which row 1 ends, the EOS-free tokens).
    """
    tok = load_tokenizer(ckpt)
    ids, mask = encode_prompts(tok, PROMPTS)
    model = _hf(ckpt)
    model.generation_config.eos_token_id = None
    free = _new_tokens(model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False), ids)
    r0, r1 = free
    for j in range(1, 5):
        for i in range(j + 2, 11):
            a, b = r0[i], r1[j]
            if (a != b and {a, b}.isdisjoint({2, 3}) and a not in r0[:i] and a not in r1[:j + 1]
                    and b not in r0[:i + 1] and b not in r1[:j]):
                return (a, b), i, j, free
    pytest.fail(f"no usable EOS ids in the greedy output {free}")


@pytest.mark.parametrize("where", ["generation_config.json", "config.json"])
def test_eos_list_and_null_pad_equal_hf(ckpt, eos_ids, tmp_path, where):
    """Llama-3 style `eos_token_id: [a, b]` and `pad_token_id: null`: a row stops at either id, finished rows
    get the first EOS id; read from generation_config.json, else from config.json, as transformers reads them."""
    (a, b), i, j, free = eos_ids
    d = _copy(ckpt, tmp_path / "eos")
    if where == "generation_config.json":
        (d / where).write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [a, b], "pad_token_id": None}))
    else:
        (d / "generation_config.json").unlink()
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "eos_token_id": [a, b], "pad_token_id": None}))
    tok = load_tokenizer(d)
    ids, mask = encode_prompts(tok, PROMPTS)
    want = _new_tokens(_hf(d).generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False), ids)
    # the case is exercised: row 1 stopped on the second id and was padded with the first, row 0 stopped on it
    assert want == [free[0][:i + 1], free[1][:j + 1] + [a] * (i - j)]
    for split in SPLITS:
        assert generate_split(d, split, prompts=PROMPTS, max_new_tokens=12, stop_at_eos=True).tokens == want, split
    assert generate_split(d, None, prompts=PROMPTS, max_new_tokens=12).tokens == free  # stop_at_eos off: no stop


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def test_chat_template_equals_hf(ckpt, tmp_path):
    """chat=True: each prompt is a user message through the checkpoint's chat template, as apply_chat_template
    does, left-padded; stop-at-EOS is on by default for chat (an EOS id greedy decoding meets is chosen)."""
    from transformers import AutoTokenizer

    d = _copy(ckpt, tmp_path / "chat")
    hf_tok = AutoTokenizer.from_pretrained(d)
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(d)
    hf_tok = AutoTokenizer.from_pretrained(d, padding_side="left")
    enc = hf_tok.apply_chat_template([[{"role": "user", "content": p}] for p in PROMPTS], add_generation_prompt=True,
                                     padding=True, return_tensors="pt", return_dict=True)
    ids, mask = encode_prompts(load_tokenizer(d), PROMPTS, chat=True)
    assert torch.equal(ids, enc["input_ids"]) and torch.equal(mask, enc["attention_mask"])
    model = _hf(d)
    model.generation_config.eos_token_id = None
    free = _new_tokens(model.generate(**enc, max_new_tokens=8, do_sample=False), ids)
    eos = free[1][2]  # row 1 ends at its third token
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": eos, "pad_token_id": 3}))
    want = _new_tokens(_hf(d).generate(**enc, max_new_tokens=8, do_sample=False), ids)
    assert want[1][:3] == free[1][:3] and want[1][3:] == [3] * (len(want[1]) - 3)
    for split in ([(0, 5)], [(0, 2), (2, 4), (4, 5)]):
        res = generate_split(d, split, prompts=PROMPTS, max_new_tokens=8, chat=True)
        assert res.tokens == want, split
        assert res.text == hf_tok.batch_decode(want, skip_special_tokens=True)
    assert generate_split(d, None, prompts=PROMPTS, max_new_tokens=8, chat=True, stop_at_eos=False).tokens == free


def test_chat_needs_a_template_and_text(ckpt):
    with pytest.raises(KitError, match=f"checkpoint '{ckpt}' has no chat template"):
        generate_split(ckpt, None, prompts=PROMPTS, chat=True)
    with pytest.raises(KitError, match="has no chat template"):
        encode_prompts(load_tokenizer(ckpt), PROMPTS, chat=True)
    with pytest.raises(KitError, match="chat prompts must be text"):
        generate_split(ckpt, None, prompt_ids=[1, 2], chat=True)


def test_stop_at_eos_needs_an_eos_id(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path / "no-eos")
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": None}))
    with pytest.raises(KitError, match="names no EOS token"):
        generate_split(d, None, prompt_ids=[1, 2], stop_at_eos=True)
    assert len(generate_split(d, None, prompt_ids=[1, 2], max_new_tokens=3).tokens[0]) == 3  # no stop: fine
