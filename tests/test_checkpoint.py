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
