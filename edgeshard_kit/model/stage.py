"""One pipeline stage: the units [start, end) of a Llama checkpoint, built on meta, only its own tensors loaded."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.units import n_units
from edgeshard_kit.model.checkpoint import (head_reads_embedding, load_llama_config, read_tensors, unit_tensor_names,
                                            weight_files)
from edgeshard_kit.model.compiled import CompiledDecode, StaticKV

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map "float32"/"float16"/"bfloat16" (or a torch dtype) to a torch dtype; KitError otherwise."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise KitError(f"dtype {dtype} is not supported (use one of {', '.join(DTYPES)})")
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise KitError(f"dtype {dtype!r} is not supported (use one of {', '.join(DTYPES)})")
    return DTYPES[name]


def parse_device(device: str | torch.device) -> torch.device:
    """Check a device string ("cpu", "cuda", "cuda:1"); KitError when it cannot be used here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise KitError(f"device {device!r} is not a torch device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise KitError(f"device {device!r}: this torch has no usable CUDA GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise KitError(f"device {device!r}: only {torch.cuda.device_count()} CUDA GPU(s) present")
    elif dev.type != "cpu":
        raise KitError(f"device {device!r} is not supported (use cpu, cuda or cuda:N)")
    return dev


@dataclass
class StageCache:
    """Per-request state of one stage: its layers' KV cache and the 0/1 attention-mask history (B, S)."""

    kv: object  # transformers DynamicCache; layers are indexed by *global* layer index
    mask: torch.Tensor | None = None  # (B, S) int64, 0 = left padding
    next_pos: torch.Tensor | None = None  # (B,) int64: position id of the next real token
    all_ones: bool = True  # no padding seen: pass no mask at all, as HF generate does
    extra: dict = field(default_factory=dict)
    capacity: int | None = None  # compiled stages: positions (prompt + new tokens) the static cache is sized for
    static: StaticKV | None = None  # compiled stages, from the first decode step on: the static KV cache

    @property
    def seq_len(self) -> int:
        """Tokens seen so far (padding included)."""
        if self.static is not None:
            return self.static.length
        return 0 if self.mask is None else int(self.mask.shape[1])


class StageModel(nn.Module):
    """Units [start, end) of a Llama checkpoint: embedding, decoder layers and/or norm + lm_head."""

    def __init__(self, checkpoint: str | Path, start: int, end: int, dtype: str = "float32", device: str = "cpu",
                 compile: bool = False):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

        self.checkpoint = Path(checkpoint)
        self.config = load_llama_config(checkpoint)
        n = self.config.num_hidden_layers
        if not (0 <= start < end <= n_units(n)):
            raise KitError(f"stage {start}:{end} is empty or out of range [0, {n_units(n)}) (half-open units)")
        self.start, self.end = start, end
        self.dtype = parse_dtype(dtype)
        self.device = parse_device(device)
        cfg = self.config
        self.layer_ids = [u - 1 for u in range(start, end) if 1 <= u <= n]  # global decoder-layer indices
        self.has_embed = start == 0
        self.has_head = end == n_units(n)
        # Build on meta: no memory is allocated until the real tensors are assigned below.
        with torch.device("meta"):
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, cfg.pad_token_id) if self.has_embed else None
            self.layers = nn.ModuleList([LlamaDecoderLayer(cfg, i) for i in self.layer_ids])
            self.norm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps) if self.has_head else None
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if self.has_head else None
        # RoPE tables are computed, not stored: build them for real (tiny), exactly as HF does.
        self.rotary_emb = LlamaRotaryEmbedding(cfg).to(self.device) if self.layer_ids else None
        self.tied_head = False  # set by _load_weights: the head's weight is unit 0's tensor (tied embeddings)
        self._load_weights()
        self.eval()
        self.param_bytes = sum(p.numel() * p.element_size() for p in self.parameters())
        # Opt-in compiled decode (model/compiled.py): prefill stays eager, decode steps run one compiled call.
        self.compiled: CompiledDecode | None = None
        if compile:
            self.enable_compile()

    def _local_name(self, name: str) -> str:
        """Checkpoint tensor name -> this module's parameter name."""
        if name.startswith("model.layers."):
            idx, rest = name[len("model.layers."):].split(".", 1)
            return f"layers.{self.layer_ids.index(int(idx))}.{rest}"
        return name.removeprefix("model.")

    def _load_weights(self) -> None:
        """Read only this stage's tensors from the (memory-mapped) safetensors files, cast, assign.

        Tied embeddings (no lm_head.weight in the file): the head reads unit 0's tensor; a stage holding
        both units holds it once, the head's weight being the embedding's parameter itself.
        """
        files = weight_files(self.checkpoint)
        self.tied_head = self.has_head and head_reads_embedding(self.config, files)
        wanted: dict[str, list[str]] = {}  # checkpoint name -> local names (two for a tied embedding + head)
        for u in range(self.start, self.end):
            for name in unit_tensor_names(self.config, u):
                source = "model.embed_tokens.weight" if name == "lm_head.weight" and self.tied_head else name
                wanted.setdefault(source, []).append(self._local_name(name))
        lacking = [name for name in wanted if name not in files]
        if lacking:
            raise KitError(f"checkpoint {str(self.checkpoint)!r} lacks the tensor {lacking[0]} "
                           f"(unit range {self.start}:{self.end})")
        state = {}
        for name, tensor in read_tensors(files, wanted):
            state[wanted[name][0]] = tensor.to(device=self.device, dtype=self.dtype)
        missing, unexpected = self.load_state_dict(state, strict=False, assign=True)
        if self.tied_head and self.has_embed:
            self.lm_head.weight = self.embed_tokens.weight  # one tensor in memory, as transformers ties them
            missing = [m for m in missing if m != "lm_head.weight"]
        missing = [m for m in missing if not m.startswith("rotary_emb.")]
        if missing or unexpected:
            raise KitError(f"stage {self.start}:{self.end}: tensors missing {missing[:3]} / unexpected {unexpected[:3]}")

    def enable_compile(self) -> CompiledDecode:
        """Turn on the compiled decode path (kept if already on); KitError when this host cannot compile."""
        if self.compiled is None:
            kwarg = _cache_kwarg(type(self.layers[0]).forward) if self.layer_ids else "cache"
            self.compiled = CompiledDecode(self, kwarg)
        return self.compiled

    def warm_compile(self, batch: int = 1, max_len: int | None = None) -> float:
        """Compile the decode step now for `batch` sequences and a static cache sized for `max_len` positions
        (None: compiled.DEFAULT_CAPACITY, a worker's size) with a dummy one-token request; returns compile_s."""
        comp = self.enable_compile()
        if self.has_embed:
            x = torch.zeros((batch, 1), dtype=torch.long)
        else:
            x = torch.zeros((batch, 1, self.config.hidden_size), dtype=self.dtype)
        cache = self.new_cache(max_len=max_len)
        self.forward(x, cache)  # prefill (eager)
        self.forward(x, cache)  # the first decode step: compiles
        return comp.compile_s

    @property
    def compile_s(self) -> float:
        """Seconds spent compiling the decode step so far (0 for an eager stage)."""
        return self.compiled.compile_s if self.compiled is not None else 0.0

    def new_cache(self, max_len: int | None = None) -> StageCache:
        """Fresh per-request state (one per request or micro-batch); `max_len` (prompt + new tokens) sizes a
        compiled stage's static KV cache (None: compiled.DEFAULT_CAPACITY, doubled when full)."""
        from transformers import DynamicCache

        return StageCache(kv=DynamicCache(), capacity=max_len)

    def forward(self, x: torch.Tensor, cache: StageCache, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the stage on new tokens: ids (B,T) for unit 0, else hidden (B,T,H); returns hidden or last logits (B,V)."""
        with torch.inference_mode():
            return self._forward(x, cache, attention_mask)

    def _forward(self, x: torch.Tensor, cache: StageCache, attention_mask: torch.Tensor | None) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        if self.has_embed:
            if x.dtype != torch.long or x.dim() != 2:
                raise KitError(f"stage {self.start}:{self.end} takes token ids (B, T) int64, got {tuple(x.shape)} {x.dtype}")
            if x.device.type == "cpu" and x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.config.vocab_size):
                bad = int(x.min()) if int(x.min()) < 0 else int(x.max())
                raise KitError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
            x = x.to(self.device)
        elif x.dim() != 3 or x.shape[-1] != self.config.hidden_size:
            raise KitError(f"stage {self.start}:{self.end} takes hidden states (B, T, {self.config.hidden_size}), got {tuple(x.shape)}")
        else:
            x = x.to(device=self.device, dtype=self.dtype)
        bsz, t = x.shape[0], x.shape[1]
        if self.compiled is not None and self._static_step(cache, attention_mask, t):
            return self._compiled_step(x, cache)
        new_mask = self._update_mask(cache, attention_mask, bsz, t)
        # Position ids exactly as HF generate: cumsum of the mask history - 1, padding at 0.
        pos = cache.next_pos[:, None] + new_mask.cumsum(-1) - 1
        if not cache.all_ones:
            pos = pos.masked_fill(new_mask == 0, 0)
        cache.next_pos = cache.next_pos + new_mask.sum(-1)
        h = self.embed_tokens(x) if self.has_embed else x
        if self.layer_ids:
            causal = create_causal_mask(
                config=self.config,
                inputs_embeds=h,
                attention_mask=None if cache.all_ones else cache.mask,
                position_ids=pos,
                layer_idx=self.layer_ids[0],  # this stage's cache length, not global layer 0's
                **{_cache_kwarg(create_causal_mask): cache.kv},
            )
            pos_emb = self.rotary_emb(h, position_ids=pos)
            kv = {_cache_kwarg(type(self.layers[0]).forward): cache.kv}
            for layer in self.layers:
                h = layer(h, attention_mask=causal, position_ids=pos, use_cache=True, position_embeddings=pos_emb,
                          **kv)
        if self.has_head:
            h = self.norm(h)
            # Like HF generate (logits_to_keep=1): project only the last position, return float32.
            return self.lm_head(h[:, -1:, :])[:, -1, :].float()
        return h

    def _static_step(self, cache: StageCache, attention_mask: torch.Tensor | None, t: int) -> bool:
        """Whether this step runs compiled: a one-token step of real tokens after the prefill."""
        if cache.static is None and cache.mask is None:
            return False  # the prefill: eager
        if t != 1 or (attention_mask is not None and not bool(attention_mask.all())):
            if cache.static is not None:
                raise KitError(f"stage {self.start}:{self.end} (compiled): after the first decode step only one-token "
                               f"steps of real tokens can follow, got {t} token(s)")
            return False
        return True

    def _compiled_step(self, x: torch.Tensor, cache: StageCache) -> torch.Tensor:
        """One decode step through the compiled path (static KV cache; positions as the eager path counts them)."""
        bsz = cache.static.valid.shape[0] if cache.static is not None else cache.mask.shape[0]
        if bsz != x.shape[0]:
            raise KitError(f"batch size {x.shape[0]} differs from the cache's batch size {bsz}")
        if cache.static is None:
            cache.static = self.compiled.to_static(cache, cache.capacity)
        elif cache.static.length >= cache.static.capacity:
            cache.static = self.compiled.grow(cache, cache.static)
        pos = cache.next_pos[:, None]
        cache.next_pos = cache.next_pos + 1
        return self.compiled.decode(x, pos, cache.static)

    def _update_mask(self, cache: StageCache, attention_mask: torch.Tensor | None, bsz: int, t: int) -> torch.Tensor:
        """Append the new tokens' 0/1 mask to the history; returns the new part (B, T) int64 on the stage device."""
        if attention_mask is None:
            new_mask = torch.ones((bsz, t), dtype=torch.long, device=self.device)
        else:
            if tuple(attention_mask.shape) != (bsz, t):
                raise KitError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(bsz, t)}")
            new_mask = attention_mask.to(device=self.device, dtype=torch.long)
            if cache.all_ones and not bool(new_mask.all()):
                cache.all_ones = False
        if cache.mask is None:
            cache.mask = new_mask
            cache.next_pos = torch.zeros(bsz, dtype=torch.long, device=self.device)
        else:
            if cache.mask.shape[0] != bsz:
                raise KitError(f"batch size {bsz} differs from the cache's batch size {cache.mask.shape[0]}")
            cache.mask = torch.cat([cache.mask, new_mask], dim=-1)
        return new_mask

    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes this stage adds per token of one sequence (keys + values of its layers)."""
        cfg = self.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return 2 * len(self.layer_ids) * cfg.num_key_value_heads * head_dim * torch.finfo(self.dtype).bits // 8

    def out_bytes_per_token(self) -> int:
        """Bytes this stage sends on per token of one sequence: hidden state, or float32 logits for the head."""
        if self.has_head:
            return 4 * self.config.vocab_size
        return self.config.hidden_size * torch.finfo(self.dtype).bits // 8

    def extra_repr(self) -> str:
        return f"units [{self.start}, {self.end}), dtype={self.dtype}, device={self.device}, {self.param_bytes} bytes"


@lru_cache(maxsize=None)
def _cache_kwarg(fn) -> str:
    """The KV-cache keyword of a transformers function: `cache` in current transformers (the old name
    `past_key_values` warns there), `past_key_values` in versions before the rename."""
    params = inspect.signature(fn).parameters
    return "cache" if "cache" in params else "past_key_values"


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work (timings must not stop while kernels still run)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
