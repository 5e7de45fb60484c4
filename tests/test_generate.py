"""Split generation: equals HF generate, sampling reproducible across splits, CLI output and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from edgeshard_kit.model.checkpoint import load_tokenizer
from edgeshard_kit.model.generate import GenerationResult, encode_prompts, generate_split, sample_next
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
    for bad in ([], ["ok", ""], ["  "]):
        with pytest.raises(KitError, match="prompt"):
            encode_prompts(tok, bad)


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
    with pytest.raises(KitError):
        sample_next(logits, -1.0)


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
    r = _cli("generate", "--model", str(ckpt), "--prompt", "Edge devices", "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr
    assert "per token median" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--split", "0:2,3:5"], "not covered"),
    (["--split", "0:3,2:5"], "overlaps"),
    (["--split", "0:6"], "out of range"),
    (["--split", "0-2,2:5"], "not of the form"),
    (["--prompt", ""], "prompt 0 is empty"),
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
    r = _cli("generate", "--model", str(tmp_path / "missing"), "--prompt", "hi")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


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
