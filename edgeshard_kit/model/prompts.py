"""The kit's prompt set (data/prompts.txt) and fixed-length prompts cut from it, as the paper cut WikiText-2.

EdgeShard measured with WikiText-2 prompts of 32 tokens and 96 generated tokens. The kit ships its own
natural-language prompts (questions and requests on varied topics, each at least 32 tokens long under
SmolLM2's tokenizer) and cuts each one to a fixed prompt length in tokens: the first `prompt_len` tokens as
the checkpoint's tokenizer encodes the text, or, for a shorter one, the whole text left-padded with the pad
id (mask 0). The same prompts serve whole as chat prompts.
"""

from __future__ import annotations

from importlib import resources

import torch

from edgeshard_kit.core.errors import KitError

PROMPT_LEN = 32  # tokens per prompt in the paper's measurements (WikiText-2 prompts)
GEN_TOKENS = 96  # tokens generated per prompt in the paper's measurements


def prompt_set() -> list[str]:
    """The kit's prompts, in file order (blank lines and '#' comments skipped)."""
    text = resources.files("edgeshard_kit").joinpath("data", "prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def pick_prompts(n: int, offset: int = 0) -> list[str]:
    """`n` prompts of the set from `offset` on, cycling when `n` exceeds the set."""
    if n < 1:
        raise KitError(f"number of prompts must be >= 1, got {n}")
    prompts = prompt_set()
    return [prompts[(offset + i) % len(prompts)] for i in range(n)]


def fixed_length_ids(tokenizer, prompts: str | list[str], prompt_len: int = PROMPT_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as ids (B, prompt_len) int64 and a 0/1 mask: cut to their first prompt_len tokens, short ones left-padded."""
    if prompt_len < 1:
        raise KitError(f"prompt length must be >= 1 token, got {prompt_len}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise KitError("no prompt given")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, masks = [], []
    for i, text in enumerate(prompts):
        ids = tokenizer(text).input_ids[:prompt_len]
        if not ids:
            raise KitError(f"prompt {i} is empty")
        fill = prompt_len - len(ids)
        rows.append([pad] * fill + ids)
        masks.append([0] * fill + [1] * len(ids))
    return torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long)
