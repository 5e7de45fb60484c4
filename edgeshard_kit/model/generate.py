"""Split generation on one host: prompt encoding (chat template), sampling, the EOS rule, the stage loop, timings."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from edgeshard_kit.model.checkpoint import GenerationSettings, generation_settings, load_llama_config, load_tokenizer
from edgeshard_kit.model.stage import StageModel, parse_device, synchronize
from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.units import n_units, validate_ranges


@dataclass(frozen=True)
class GenerationResult:
    """Generated tokens (per sequence, prompt excluded), their text, and timings in ms."""

    tokens: list[list[int]]
    text: list[str]
    per_token_ms: list[float]  # one entry per decode step (token 2..N); token 1 is in prefill_ms
    prefill_ms: float  # prompt pass through all stages + choosing the first token
    split: list[tuple[int, int]] = field(default_factory=list)
    compiled: bool = False  # the stages ran the compiled decode path
    compile_s: float = 0.0  # seconds the stages have spent compiling so far (included in the first decode step)
    logits: list | None = field(default=None, repr=False, compare=False)  # per step (B, V) float32, tests only

    def to_dict(self) -> dict:
        """JSON-ready dict (logits left out)."""
        d = asdict(self)
        d.pop("logits")
        d["split"] = [list(r) for r in self.split]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationResult":
        return cls(tokens=[list(t) for t in d["tokens"]], text=list(d["text"]), per_token_ms=list(d["per_token_ms"]),
                   prefill_ms=float(d["prefill_ms"]), split=[tuple(r) for r in d.get("split", [])],
                   compiled=bool(d.get("compiled", False)), compile_s=float(d.get("compile_s", 0.0)))


def encode_prompts(tokenizer, prompts: str | list[str], chat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize prompts into left-padded ids (B, T) int64 and a 0/1 mask (B, T) int64.

    As transformers does: whitespace-only prompts are encoded like any other; a prompt that encodes to no
    token at all is refused. `chat`: each prompt becomes one user message put through the checkpoint's
    chat template with the generation prompt (`tokenizer.apply_chat_template(..., add_generation_prompt=True)`).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise KitError("no prompt given")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise KitError(f"prompt {i} is not text: {type(p).__name__}")
    tokenizer.padding_side = "left"
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise KitError(f"checkpoint {str(getattr(tokenizer, 'name_or_path', '?'))!r} has no chat template "
                           f"(tokenizer_config.json or chat_template.jinja): generate without chat")
        seqs = []
        for p in prompts:
            enc = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
            seqs.append(list(enc["input_ids"] if hasattr(enc, "keys") else enc))
    else:
        seqs = [list(x) for x in tokenizer(list(prompts))["input_ids"]]
    for i, s in enumerate(seqs):
        if not s:
            raise KitError(f"prompt {i} is empty: it encodes to no token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return pad_prompt_ids(seqs, pad)


def pad_prompt_ids(prompt_ids, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids as a tensor (B, T) or list(s) of ints -> left-padded ids and mask."""
    if isinstance(prompt_ids, torch.Tensor):
        ids = prompt_ids.to(torch.long)
        ids = ids[None, :] if ids.dim() == 1 else ids
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise KitError("prompt ids must be a non-empty (B, T) tensor")
        return ids, torch.ones_like(ids)
    seqs = [list(prompt_ids)] if prompt_ids and isinstance(list(prompt_ids)[0], int) else [list(s) for s in prompt_ids]
    if not seqs or any(len(s) == 0 for s in seqs):
        raise KitError("prompt ids are empty")
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
    return ids, mask


def check_sampling(temperature: float, top_p: float) -> tuple[float, float]:
    """The one check of sampling settings: temperature a finite number >= 0 (0 = greedy), top-p in (0, 1]."""
    def num(x, what):
        if isinstance(x, bool):
            raise KitError(f"{what} must be a number, got {x!r}")
        try:
            return float(x)
        except (TypeError, ValueError):
            raise KitError(f"{what} must be a number, got {x!r}") from None

    t, p = num(temperature, "temperature"), num(top_p, "top-p")
    if not (math.isfinite(t) and t >= 0):
        raise KitError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if not 0 < p <= 1:  # also refuses nan
        raise KitError(f"top-p must be in (0, 1], got {top_p}")
    return t, p


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row of logits (B, V): argmax when temperature == 0, else temperature + nucleus (top-p)."""
    temperature, top_p = check_sampling(temperature, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    out_device = logits.device
    if generator is not None and generator.device != logits.device:
        logits = logits.to(generator.device)  # the generator's device decides, so splits on any device agree
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p (the top one is always kept).
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(out_device)


def finish_step(tok: torch.Tensor, finished: torch.Tensor | None, eos_ids: Sequence[int],
                pad_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The end-of-sequence rule of one decode step, as transformers' generate applies it.

    `tok` (B,) the step's tokens, `finished` (B,) bool (None = none yet). A row already finished gets
    `pad_id` (None: the first EOS id, transformers' fallback); a row finishes when its token is any of
    `eos_ids`. Returns the tokens to keep and the new `finished`. No EOS ids: nothing changes.
    """
    if finished is None:
        finished = torch.zeros(tok.shape, dtype=torch.bool, device=tok.device)
    if not eos_ids:
        return tok, finished
    fill = int(eos_ids[0]) if pad_id is None else int(pad_id)
    finished = finished.to(tok.device)
    tok = torch.where(finished, torch.full_like(tok, fill), tok)
    finished = finished | torch.isin(tok, torch.tensor([int(e) for e in eos_ids], dtype=tok.dtype, device=tok.device))
    return tok, finished


def build_stages(checkpoint: str | Path, ranges: list[tuple[int, int]], dtype: str = "float32",
                 device: str = "cpu", compile: bool = False) -> list[StageModel]:
    """Check that the ranges cover the model's units exactly, then build one StageModel per range
    (`compile`: each with the compiled decode path, model/compiled.py)."""
    config = load_llama_config(checkpoint)
    validate_ranges([tuple(r) for r in ranges], n_units(config.num_hidden_layers))
    return [StageModel(checkpoint, a, b, dtype=dtype, device=device, compile=compile) for a, b in ranges]


def run_stages(stages: list[StageModel], ids: torch.Tensor, mask: torch.Tensor | None, max_new_tokens: int,
               temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
               eos_token_ids: Sequence[int] | int | None = None, pad_token_id: int | None = None,
               keep_logits: bool = False) -> tuple[torch.Tensor, float, list[float], list]:
    """The generation loop over built stages: returns (tokens (B, N), prefill_ms, per_token_ms, logits).

    With `eos_token_ids` a row stops at any of them and is padded with `pad_token_id` (None: the first
    EOS id) until every row has stopped (`finish_step`).
    """
    if max_new_tokens < 1:
        raise KitError(f"max-new-tokens must be at least 1, got {max_new_tokens}")
    temperature, top_p = check_sampling(temperature, top_p)
    eos = (eos_token_ids,) if isinstance(eos_token_ids, int) else tuple(eos_token_ids or ())
    vocab = stages[0].config.vocab_size
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise KitError(f"token id {bad} is outside the vocabulary [0, {vocab})")
    device = stages[-1].device
    gen = torch.Generator(device="cpu").manual_seed(seed) if temperature > 0 else None
    caches = [s.new_cache(max_len=ids.shape[1] + max_new_tokens) for s in stages]  # sizes static KV caches
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    out, logits_log, step_ms = [], [], []
    x, m = ids, mask
    prefill_ms = 0.0
    for step in range(max_new_tokens):
        t0 = time.perf_counter()
        for stage, cache in zip(stages, caches):
            x = stage.forward(x, cache, m)
        tok = sample_next(x, temperature, top_p, gen)
        tok, finished = finish_step(tok, finished, eos, pad_token_id)
        synchronize(device)
        ms = (time.perf_counter() - t0) * 1e3
        if step == 0:
            prefill_ms = ms
        else:
            step_ms.append(ms)
        if keep_logits:
            logits_log.append(x.cpu())
        out.append(tok)
        if eos and bool(finished.all()):
            break
        x, m = tok[:, None], None
    return torch.stack(out, dim=1).cpu(), prefill_ms, step_ms, logits_log


def generate_split(checkpoint: str | Path, ranges: list[tuple[int, int]] | None = None, prompt_ids=None,
                   max_new_tokens: int = 16, *, prompts: str | list[str] | None = None,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, dtype: str = "float32",
                   device: str = "cpu", stop_at_eos: bool | None = None, chat: bool = False,
                   attention_mask: torch.Tensor | None = None, keep_logits: bool = False,
                   stages: list[StageModel] | None = None, compile: bool = False) -> GenerationResult:
    """Generate with the model split into stages `ranges` (None = one stage), all on this host.

    `chat`: each prompt is a user message put through the checkpoint's chat template. `stop_at_eos`
    (None = True for chat prompts, else False): stop a row at any EOS id of generation_config.json and pad
    it, as transformers' generate does. `compile`: stages built with the compiled decode path (a static KV
    cache and torch.compile of each stage's decode step; the first decode step compiles, see `compile_s`).
    """
    config = load_llama_config(checkpoint)
    total = n_units(config.num_hidden_layers)
    if ranges is None and stages is not None:
        ranges = [(s.start, s.end) for s in stages]
    ranges = [tuple(r) for r in (ranges or [(0, total)])]
    validate_ranges(ranges, total)
    parse_device(device)
    if max_new_tokens < 1:
        raise KitError(f"max-new-tokens must be at least 1, got {max_new_tokens}")
    check_sampling(temperature, top_p)  # before loading weights
    if (prompt_ids is None) == (prompts is None):
        raise KitError("give exactly one of prompt ids or prompt text")
    if chat and prompts is None:
        raise KitError("chat prompts must be text (the chat template applies to text), not token ids")
    stop = chat if stop_at_eos is None else bool(stop_at_eos)
    settings = generation_settings(checkpoint) if stop else GenerationSettings((), None)
    if stop and not settings.eos_token_ids:
        raise KitError(f"checkpoint {str(checkpoint)!r} names no EOS token (generation_config.json, config.json): "
                       f"cannot stop at EOS")
    tokenizer = load_tokenizer(checkpoint) if prompts is not None or _has_tokenizer(checkpoint) else None
    if prompts is not None:
        ids, mask = encode_prompts(tokenizer, prompts, chat=chat)
    else:
        pad_id = config.pad_token_id if config.pad_token_id is not None else 0  # masked out: any id will do
        ids, mask = pad_prompt_ids(prompt_ids, pad_id)
        if attention_mask is not None:
            mask = attention_mask.to(torch.long)
    if stages is None:
        stages = build_stages(checkpoint, ranges, dtype=dtype, device=device, compile=compile)
    toks, prefill_ms, step_ms, logits = run_stages(stages, ids, mask, max_new_tokens, temperature, top_p, seed,
                                                   settings.eos_token_ids, settings.pad_token_id, keep_logits)
    tokens = toks.tolist()
    text = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens] if tokenizer is not None else [""] * len(tokens)
    return GenerationResult(tokens=tokens, text=text, per_token_ms=step_ms, prefill_ms=prefill_ms, split=ranges,
                            logits=logits if keep_logits else None, compiled=any(s.compiled is not None for s in stages),
                            compile_s=sum(s.compile_s for s in stages))


def _has_tokenizer(checkpoint: str | Path) -> bool:
    return (Path(checkpoint) / "tokenizer.json").is_file() or (Path(checkpoint) / "tokenizer.model").is_file()


def format_result(res: GenerationResult) -> str:
    """A result as text: each sequence's text and tokens, then the split and a timing summary."""
    lines = [f"[{i}] {t!r}  tokens={toks}" for i, (t, toks) in enumerate(zip(res.text, res.tokens))]
    split = ",".join(f"{a}:{b}" for a, b in res.split)
    steps = sorted(res.per_token_ms)
    med = f"{statistics.median(steps):.2f} ms" if steps else "n/a"
    lines.append(f"split {split}: prefill {res.prefill_ms:.2f} ms, per token median {med} over {len(steps)} decode steps")
    if res.compiled:
        lines.append(f"compiled decode: {res.compile_s:.1f} s spent compiling (in the first decode step's time)")
    return "\n".join(lines)
