"""Llama checkpoint I/O: tiny seeded checkpoints, config/tokenizer/generation settings, weight files, unit tensors."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Iterator

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.io import read_json
from edgeshard_kit.core.units import n_units
from edgeshard_kit.model.config_schema import check_config, expected_shape

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
    tie_word_embeddings: bool = False,
) -> Path:
    """Write a seeded random Hugging Face Llama checkpoint with a locally trained tokenizer; returns the dir.

    `tie_word_embeddings=True` writes a SmolLM2 / Llama-3.2-style checkpoint: no lm_head.weight in the file,
    the head reads the embedding.
    """
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
        tie_word_embeddings=bool(tie_word_embeddings),  # untied by default, like Llama2
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
    from huggingface_hub.errors import StrictDataclassError
    from transformers import LlamaConfig

    path = Path(dir)
    if not path.is_dir():
        raise KitError(f"checkpoint directory {str(path)!r} does not exist")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise KitError(f"checkpoint {str(path)!r} has no config.json")
    raw = read_json(cfg_file)
    if not isinstance(raw, dict):
        raise KitError(f"{cfg_file}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("model_type") != "llama":
        raise KitError(f"{cfg_file}: model_type is {raw.get('model_type')!r}, not 'llama'")
    check_config(raw, str(cfg_file))
    try:
        config = LlamaConfig.from_pretrained(path)
    except (ValueError, TypeError, OSError, StrictDataclassError) as e:  # transformers' own checks of the fields
        raise KitError(f"{cfg_file}: {' '.join(str(e).split())[:200]}") from None
    config._attn_implementation = "sdpa"  # HF's default on CPU and GPU: same numbers as transformers
    return config


def load_tokenizer(dir: str | Path):
    """Load the checkpoint's tokenizer (left padding, as decoder-only generation needs)."""
    from transformers import AutoTokenizer

    load_llama_config(dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(dir) / name).is_file() and not isinstance(read_json(Path(dir) / name), dict):  # names the file
            raise KitError(f"{Path(dir) / name}: expected a JSON object")
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


def head_reads_embedding(config, files: dict[str, Path]) -> bool:
    """True when the head's weight is unit 0's tensor: tied embeddings and no lm_head.weight in the files.

    transformers' rule: with `tie_word_embeddings` and no lm_head.weight the head is the embedding; an
    lm_head.weight in the file is loaded as the head's own tensor.
    """
    return bool(getattr(config, "tie_word_embeddings", False)) and "lm_head.weight" not in files


def _weights_file(path: Path) -> Path:
    """The file transformers loads: config.json's `transformers_weights`, else model.safetensors, else the index."""
    explicit = read_json(path / "config.json").get("transformers_weights") if (path / "config.json").is_file() else None
    if explicit:
        f = path / str(explicit)
        if not f.name.endswith((".safetensors", ".safetensors.index.json")) or f.resolve().parent != path.resolve():
            raise KitError(f"{path / 'config.json'}: transformers_weights {explicit!r} is not a safetensors file "
                           f"or index inside the checkpoint")
        if not f.is_file():
            raise KitError(f"{path / 'config.json'}: transformers_weights names {explicit}, which is missing")
        return f
    for name in (SINGLE_FILE, INDEX_FILE):  # the single file first, as transformers' from_pretrained
        if (path / name).is_file():
            return path / name
    raise KitError(f"checkpoint {str(path)!r} has no {SINGLE_FILE} or {INDEX_FILE} (only safetensors are supported)")


@contextmanager
def open_safetensors(path: str | Path):
    """safetensors' safe_open (torch, CPU) with a one-line KitError naming the file when it is not readable."""
    from safetensors import SafetensorError, safe_open

    try:
        f = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise KitError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    with f:
        yield f


def _check_shapes(f, path: Path, config) -> None:
    """KitError naming the file and the tensor when a tensor's shape (header only) is not what config.json gives."""
    for name in f.keys():
        want = expected_shape(config, name)
        if want is not None:
            got = list(f.get_slice(name).get_shape())
            if got != want:
                raise KitError(f"{path}: tensor {name} has shape {got}, but config.json gives {want} "
                               "(the weights are of another model size)")


def weight_files(dir: str | Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it: the one file transformers would load
    (model.safetensors before the index), every shard's header checked against the index."""
    path = Path(dir)
    chosen = _weights_file(path)
    config = load_llama_config(path)
    if chosen.name.endswith(".safetensors"):
        with open_safetensors(chosen) as f:
            _check_shapes(f, chosen, config)
            return {name: chosen for name in f.keys()}
    try:
        wmap = json.loads(chosen.read_text())["weight_map"]
        files = {str(name): path / str(fname) for name, fname in wmap.items()}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise KitError(f"{chosen}: not a safetensors index (no weight_map)") from None
    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        if f.resolve().parent != path.resolve():
            raise KitError(f"{chosen}: weight_map: shard {str(f.relative_to(path))!r} is not a file of the checkpoint "
                           "folder")
        if not f.is_file():
            raise KitError(f"{chosen}: shard {f.name} is missing")
        with open_safetensors(f) as sf:
            present = set(sf.keys())
            _check_shapes(sf, f, config)
        lacking = [n for n in names if n not in present]
        if lacking:
            more = f" (and {len(lacking) - 1} more)" if len(lacking) > 1 else ""
            raise KitError(f"{chosen}: the tensor {lacking[0]} is not in its shard {f.name}{more}")
    return files


def read_tensors(files: dict[str, Path], names: Iterable[str]) -> Iterator[tuple[str, object]]:
    """(name, CPU tensor) of each name, every file opened once (memory-mapped); one-line KitError on a bad file."""
    from safetensors import SafetensorError

    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    for path, group in by_file.items():
        with open_safetensors(path) as f:
            for name in group:
                try:
                    yield name, f.get_tensor(name)
                except (SafetensorError, OSError) as e:
                    raise KitError(f"{path}: cannot read the tensor {name} ({str(e).splitlines()[0]})") from None


@dataclass(frozen=True)
class GenerationSettings:
    """When a sequence ends and what follows, read as transformers' generate reads them.

    `eos_token_ids`: a sequence finishes on any of them (Llama-3 lists several); `pad_token_id`: the id a
    finished row gets from then on: the configured pad token, else the first EOS id (transformers' rule;
    None only when there is no EOS id); `source`: the file they come from.
    """

    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    bos_token_id: int | None = None
    source: str = ""


def _ids(value, where: str) -> tuple[int, ...]:
    """An id or a list of ids (or None) -> a tuple of ints; KitError naming the field otherwise."""
    items = [] if value is None else (list(value) if isinstance(value, (list, tuple)) else [value])
    if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in items):
        raise KitError(f"{where}: expected a token id or a list of token ids, got {value!r}")
    return tuple(items)


def generation_settings(checkpoint: str | Path) -> GenerationSettings:
    """EOS ids and pad id of a checkpoint: generation_config.json, else config.json (as from_pretrained + generate)."""
    from transformers import GenerationConfig

    path = Path(checkpoint)
    load_llama_config(path)
    gen_file = path / "generation_config.json"
    source = gen_file if gen_file.is_file() else path / "config.json"
    if not isinstance(read_json(source), dict):  # a one-line error for a file that is not a JSON object
        raise KitError(f"{source}: expected a JSON object")
    try:
        if gen_file.is_file():
            gc = GenerationConfig.from_pretrained(str(path))
        else:  # transformers' fallback: a generation config built from the model config
            gc = GenerationConfig.from_pretrained(str(path), config_file_name="config.json", _from_model_config=True)
    except (OSError, ValueError, TypeError) as e:
        raise KitError(f"{source}: cannot read the generation settings ({str(e).splitlines()[0]})") from None
    eos = _ids(gc.eos_token_id, f"{source}: eos_token_id")
    pad = _ids(gc.pad_token_id, f"{source}: pad_token_id")
    bos = _ids(gc.bos_token_id, f"{source}: bos_token_id")
    if len(pad) > 1 or len(bos) > 1:
        raise KitError(f"{source}: pad_token_id and bos_token_id must be single token ids")
    fill = pad[0] if pad else (eos[0] if eos else None)
    return GenerationSettings(eos_token_ids=eos, pad_token_id=fill, bos_token_id=bos[0] if bos else None,
                              source=str(source))
