"""Llama checkpoint I/O: tiny seeded checkpoints, config/tokenizer loading, which tensors belong to which unit."""

from __future__ import annotations

import json
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.io import read_json
from edgeshard_kit.core.units import n_units

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, Llama2's order plus a pad token
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@contextmanager
def quiet_progress():
    """Silence transformers' progress bars for a while (restoring the user's setting)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _corpus() -> str:
    """The plain-English text the kit ships to train tiny tokenizers."""
    return resources.files("edgeshard_kit").joinpath("data", "corpus.txt").read_text(encoding="utf-8")


def _train_tokenizer(vocab: int):
    """Train a byte-level BPE tokenizer on the shipped corpus; returns a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus().splitlines(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    # Like Llama2: every encoded prompt starts with <s>.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def write_tiny_checkpoint(
    dir: str | Path,
    layers: int = 8,
    hidden: int = 256,
    intermediate: int = 688,
    heads: int = 8,
    kv_heads: int = 4,
    vocab: int = 512,
    seed: int = 0,
    shard_size: int | str | None = None,
) -> Path:
    """Write a seeded random Hugging Face Llama checkpoint with a locally trained tokenizer; returns the dir."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if layers < 1 or hidden < 1 or intermediate < 1 or heads < 1 or kv_heads < 1:
        raise KitError("tiny-model: layers, hidden, intermediate, heads and kv-heads must be positive")
    if hidden % heads or heads % kv_heads or (hidden // heads) % 2:
        raise KitError(
            f"tiny-model: hidden {hidden} must split into {heads} heads of even size and heads into {kv_heads} kv-heads"
        )
    if vocab < 300:  # 256 byte symbols + special tokens + a few merges
        raise KitError(f"tiny-model: vocab {vocab} is too small (byte-level BPE needs at least 300)")
    out = Path(dir)
    if out.exists() and not out.is_dir():
        raise KitError(f"tiny-model: {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,  # untied, like Llama2
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    kwargs = {"max_shard_size": shard_size} if shard_size is not None else {}
    with quiet_progress():
        model.save_pretrained(out, **kwargs)
    del model
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3, do_sample=False).save_pretrained(out)
    _train_tokenizer(vocab).save_pretrained(out)
    return out


def load_llama_config(dir: str | Path):
    """Load and check config.json of a Llama checkpoint (KitError if missing or not Llama)."""
    from transformers import LlamaConfig

    path = Path(dir)
    if not path.is_dir():
        raise KitError(f"checkpoint directory {str(path)!r} does not exist")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise KitError(f"checkpoint {str(path)!r} has no config.json")
    raw = read_json(cfg_file)
    if raw.get("model_type") != "llama":
        raise KitError(f"{cfg_file}: model_type is {raw.get('model_type')!r}, not 'llama'")
    config = LlamaConfig.from_pretrained(path)
    config._attn_implementation = "sdpa"  # HF's default on CPU and GPU: same numbers as transformers
    return config


def load_tokenizer(dir: str | Path):
    """Load the checkpoint's tokenizer (left padding, as decoder-only generation needs)."""
    from transformers import AutoTokenizer

    load_llama_config(dir)
    try:
        tok = AutoTokenizer.from_pretrained(str(dir))
    except (OSError, ValueError) as e:
        raise KitError(f"checkpoint {str(dir)!r}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def unit_tensor_names(config, u: int) -> list[str]:
    """Names of the checkpoint tensors that unit `u` needs (embedding, decoder layer u-1, or norm + lm_head)."""
    n = config.num_hidden_layers
    if u == 0:
        return ["model.embed_tokens.weight"]
    if u == n + 1:
        return ["model.norm.weight", "lm_head.weight"]
    if not 1 <= u <= n:
        raise KitError(f"unit {u} is out of range [0, {n_units(n)})")
    p = f"model.layers.{u - 1}."
    names = [p + s + ".weight" for s in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")]
    if getattr(config, "attention_bias", False):
        names += [p + s + ".bias" for s in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")]
    names += [p + s + ".weight" for s in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    if getattr(config, "mlp_bias", False):
        names += [p + s + ".bias" for s in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    return names


def weight_files(dir: str | Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it (sharded via the index json, or one file)."""
    from safetensors import safe_open

    path = Path(dir)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise KitError(f"{index}: not a safetensors index (no weight_map)") from None
        files = {name: path / fname for name, fname in wmap.items()}
        for f in set(files.values()):
            if not f.is_file():
                raise KitError(f"{index}: shard {f.name} is missing")
        return files
    single = path / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    raise KitError(f"checkpoint {str(path)!r} has no {SINGLE_FILE} or {INDEX_FILE} (only safetensors are supported)")

