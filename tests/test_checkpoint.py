"""Tiny checkpoints are real HF Llama checkpoints; unit -> tensor mapping; config/tokenizer errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from edgeshard_kit.model.checkpoint import (INDEX_FILE, load_llama_config, load_tokenizer, unit_tensor_names,
                                      weight_files, write_tiny_checkpoint)
from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.units import n_units

SMALL = dict(layers=3, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=320)


@pytest.fixture(scope="module")
def ckpts(tiny_checkpoint_factory):
    """One plain and one sharded tiny checkpoint."""
    plain = tiny_checkpoint_factory(**SMALL)
    sharded = tiny_checkpoint_factory(shard_size=60_000, **SMALL)
    return plain, sharded


def test_files_and_hf_loads_unchanged(ckpts):
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    plain, sharded = ckpts
    for d in (plain, sharded):
        for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
            assert (d / name).is_file(), name
        model, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        assert type(model).__name__ == "LlamaForCausalLM"
        assert model.config.num_hidden_layers == 3 and model.config.vocab_size == 320
        # Untied like Llama2: the head is its own tensor.
        assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
        tok = AutoTokenizer.from_pretrained(d)
        assert isinstance(tok, PreTrainedTokenizerFast)
        assert len(tok) == 320
        assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
        ids = tok("Edge devices share the network.")["input_ids"]
        assert ids[0] == tok.bos_token_id == model.config.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == "Edge devices share the network."
    assert (plain / "model.safetensors").is_file() and not (plain / INDEX_FILE).exists()
    index = json.loads((sharded / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1


def test_same_seed_same_weights(ckpts, tmp_path):
    from safetensors.torch import load_file

    plain, _ = ckpts
    again = write_tiny_checkpoint(tmp_path / "again", **SMALL)
    a, b = load_file(plain / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = write_tiny_checkpoint(tmp_path / "other", seed=1, **SMALL)
    c = load_file(other / "model.safetensors")
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])


def test_units_cover_every_tensor_once(ckpts):
    for d in ckpts:
        config = load_llama_config(d)
        files = weight_files(d)
        names = [n for u in range(n_units(config.num_hidden_layers)) for n in unit_tensor_names(config, u)]
        assert len(names) == len(set(names))
        assert set(names) == set(files)
        assert all(p.is_file() for p in files.values())
    assert unit_tensor_names(config, 2)[0] == "model.layers.1.self_attn.q_proj.weight"
    with pytest.raises(KitError, match="out of range"):
        unit_tensor_names(config, 5)


def test_config_errors(tmp_path):
    with pytest.raises(KitError, match="does not exist"):
        load_llama_config(tmp_path / "nope")
    with pytest.raises(KitError, match="no config.json"):
        load_llama_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(KitError, match="not 'llama'"):
        load_llama_config(tmp_path)
    with pytest.raises(KitError, match="too small"):
        write_tiny_checkpoint(tmp_path / "x", vocab=100)
    with pytest.raises(KitError, match="heads"):
        write_tiny_checkpoint(tmp_path / "x", hidden=100, heads=8)


def test_tokenizer_is_left_padded(ckpts):
    tok = load_tokenizer(ckpts[0])
    enc = tok(["a b c d e f", "a"], padding=True)
    assert enc["attention_mask"][1][0] == 0 and enc["input_ids"][1][0] == tok.pad_token_id


def test_cli_tiny_model(tmp_path):
    out = tmp_path / "m"
    r = subprocess.run([sys.executable, "-m", "edgeshard_kit", "tiny-model", str(out), "--layers", "2", "--hidden",
                        "64", "--intermediate", "128", "--heads", "4", "--kv-heads", "2", "--vocab", "300",
                        "--shard-size", "50KB"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "2 layers (4 units)" in r.stdout
    assert (out / INDEX_FILE).is_file()
    assert load_llama_config(out).num_hidden_layers == 2


# ---- weight files as transformers picks them; one-line errors for broken files ----------------------------

def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _hf_greedy(d, ids, steps=6):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(d).eval()
    model.generation_config.eos_token_id = None
    return model.generate(ids, max_new_tokens=steps, do_sample=False, pad_token_id=3)[:, ids.shape[1]:].tolist()


def test_single_file_wins_over_the_index_as_in_transformers(ckpts, tiny_checkpoint_factory, tmp_path):
    """model.safetensors next to an index of other weights: transformers loads the single file, so does the kit."""
    from edgeshard_kit.model.generate import generate_split

    plain, _ = ckpts
    other = tiny_checkpoint_factory(shard_size=60_000, seed=1, **SMALL)  # different weights, sharded
    both = _copy(plain, tmp_path / "both")
    for f in other.glob("model*.safetensors*"):
        (both / f.name).write_bytes(f.read_bytes())
    assert (both / "model.safetensors").is_file() and (both / INDEX_FILE).is_file()
    assert set(weight_files(both).values()) == {both / "model.safetensors"}
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    want = _hf_greedy(both, ids)
    assert generate_split(both, [(0, 2), (2, 5)], prompt_ids=ids, max_new_tokens=6).tokens == want
    assert want != _hf_greedy(other, ids)  # the two weight sets really differ: the choice matters
    # config.json's `transformers_weights` names the file explicitly (transformers' first rule)
    cfg = json.loads((both / "config.json").read_text())
    (both / "config.json").write_text(json.dumps({**cfg, "transformers_weights": INDEX_FILE}))
    assert (both / "model.safetensors") not in set(weight_files(both).values())


def _one_line_error(d, message: str, capsys) -> None:
    """The broken checkpoint fails with `message` in one line: weight_files, StageModel and the CLI."""
    from edgeshard_kit.cli.main import main
    from edgeshard_kit.model.stage import StageModel

    with pytest.raises(KitError, match=message):
        weight_files(d)
    with pytest.raises(KitError, match=message):
        StageModel(d, 0, 5)
    assert main(["generate", "--model", str(d), "--prompt-ids", "1,2", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert message.replace("\\", "") in err and len(err.strip().splitlines()) == 1, err


def test_index_naming_a_tensor_its_shard_lacks(ckpts, tmp_path, capsys):
    _, sharded = ckpts
    d = _copy(sharded, tmp_path / "bad-index")
    index = json.loads((d / INDEX_FILE).read_text())
    wmap = index["weight_map"]
    shards = sorted(set(wmap.values()))
    name = next(n for n, f in wmap.items() if f == shards[0])
    wmap[name] = shards[1]  # the index now sends this tensor to a shard that does not hold it
    (d / INDEX_FILE).write_text(json.dumps(index))
    _one_line_error(d, f"the tensor {name} is not in its shard {shards[1]}", capsys)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_broken_safetensors_file(ckpts, tmp_path, capsys, damage):
    plain, sharded = ckpts
    d = _copy(plain, tmp_path / "plain")
    data = (d / "model.safetensors").read_bytes()
    bad = data[: len(data) // 2] if damage == "truncated" else b"not a safetensors file at all" * 10
    (d / "model.safetensors").write_bytes(bad)
    _one_line_error(d, "model.safetensors: not a readable safetensors file", capsys)
    d = _copy(sharded, tmp_path / "sharded")  # a broken shard is named as well
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])
    _one_line_error(d, f"{shard.name}: not a readable safetensors file", capsys)


def test_tied_tiny_checkpoint_is_what_transformers_ties(tiny_checkpoint_factory):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    d = tiny_checkpoint_factory(tie_word_embeddings=True, **SMALL)
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    model = AutoModelForCausalLM.from_pretrained(d)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight


# ---- generation settings, read as transformers' generate reads them ----------------------------------------

def test_generation_settings(ckpts, tmp_path):
    from edgeshard_kit.model.checkpoint import GenerationSettings, generation_settings

    plain, _ = ckpts
    gs = generation_settings(plain)
    assert (gs.eos_token_ids, gs.pad_token_id, gs.bos_token_id) == ((2,), 3, 1)
    assert gs.source.endswith("generation_config.json")
    d = _copy(plain, tmp_path / "list")
    # Llama-3 style: several EOS ids, no pad id -> finished rows get the first EOS id (transformers' rule);
    # generation_config.json wins over config.json's pad id 3
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [7, 2],
                                                          "pad_token_id": None}))
    assert generation_settings(d) == GenerationSettings((7, 2), 7, 1, str(d / "generation_config.json"))
    (d / "generation_config.json").unlink()  # no generation_config.json: config.json, as transformers falls back
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "eos_token_id": [5, 6], "pad_token_id": None}))
    assert generation_settings(d) == GenerationSettings((5, 6), 5, 1, str(d / "config.json"))
    (d / "config.json").write_text(json.dumps({**cfg, "eos_token_id": None, "pad_token_id": None}))
    assert generation_settings(d).eos_token_ids == () and generation_settings(d).pad_token_id is None
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": "two"}))
    with pytest.raises(KitError, match="eos_token_id"):
        generation_settings(d)
    (d / "generation_config.json").write_text("{not json")
    with pytest.raises(KitError, match="generation_config.json"):
        generation_settings(d)
