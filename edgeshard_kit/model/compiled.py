"""The compiled decode path of a stage: a static KV cache sized from the workload and `torch.compile` of one decode step.

Prefill runs the stage's eager code (a transformers DynamicCache, exactly as without compile); at the first
decode step the prompt's keys and values are copied into static buffers (B, kv_heads, capacity, head_dim)
per layer, and every decode step from then on is one compiled call that writes its token's K/V at the next
slot (`index_copy_`, in place) and attends over all `capacity` slots with a (B, 1, 1, capacity) boolean mask
(slots not yet written and left padding masked out). Fixed shapes are what lets the compiler fuse the step
and, on CUDA, replay it as a CUDA graph (mode "reduce-overhead"); on CPU it is inductor's default mode (C++
kernels built with the host's C compiler). Buffers are reused across requests of the same shape (a pool per
stage), so a second request neither allocates nor recompiles.
"""

from __future__ import annotations

import shutil
import time
import weakref
from dataclasses import dataclass

import torch

from edgeshard_kit.core.errors import KitError

CAPACITY_STEP = 128  # static caches are sized in multiples of this many tokens (fewer distinct shapes to compile)
DEFAULT_CAPACITY = 512  # slots when the caller does not give the workload (a worker); doubled while too small


def cache_capacity(max_len: int | None, seq: int) -> int:
    """Slots of a static cache for a request of `max_len` positions (prompt + new tokens) that has seen `seq`:
    max_len rounded up to a multiple of CAPACITY_STEP; None: DEFAULT_CAPACITY, doubled until seq + 1 fits."""
    if max_len:
        return -(-max(int(max_len), seq + 1) // CAPACITY_STEP) * CAPACITY_STEP
    cap = DEFAULT_CAPACITY
    while cap < seq + 1:
        cap *= 2
    return cap


def compile_available(device: torch.device) -> str | None:
    """None when torch.compile can build kernels for `device` here, else the reason (CPU needs a C compiler)."""
    if device.type == "cpu" and not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        return "no C compiler (cc, gcc or clang) on PATH: inductor builds its CPU kernels with one"
    return None


@dataclass
class StaticKV:
    """Static buffers of one request: keys/values per layer (B, kv_heads, capacity, head_dim), the slot mask
    (B, capacity) bool (True = a real token is stored there), and `length`, the slots written so far."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    valid: torch.Tensor
    length: int = 0

    @property
    def capacity(self) -> int:
        return int(self.valid.shape[1])

    @property
    def shape_key(self) -> tuple:
        return (tuple(self.valid.shape), self.keys[0].dtype if self.keys else None)


class _SlotWriter:
    """What a transformers attention layer sees as its cache: `update` writes the step's K/V at `slot` in place
    and returns the whole static buffers of that (global) layer."""

    def __init__(self, layer_ids: list[int], keys: list[torch.Tensor], values: list[torch.Tensor], slot: torch.Tensor):
        self.index = {g: i for i, g in enumerate(layer_ids)}
        self.keys, self.values, self.slot = keys, values, slot

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        i = self.index[layer_idx]
        self.keys[i].index_copy_(2, self.slot, key_states)
        self.values[i].index_copy_(2, self.slot, value_states)
        return self.keys[i], self.values[i]


class CompiledDecode:
    """The compiled decode step of one StageModel, its buffer pool and its compile-time record."""

    def __init__(self, stage, cache_kwarg: str):
        reason = compile_available(stage.device)
        if reason:
            raise KitError(f"--compile on {stage.device}: {reason}")
        self.stage, self.cache_kwarg = stage, cache_kwarg
        self.mode = "reduce-overhead" if stage.device.type == "cuda" else None  # CUDA graphs on GPU
        self.step_fn = torch.compile(self._step, mode=self.mode, dynamic=False)
        self.compile_s = 0.0  # seconds spent in calls that compiled (first call of each new shape)
        self.compiles = 0
        self._shapes: set[tuple] = set()
        self._pool: dict[tuple, list[StaticKV]] = {}

    # ---- buffers --------------------------------------------------------------------------------------------
    def _allocate(self, batch: int, capacity: int) -> StaticKV:
        key = ((batch, capacity), self.stage.dtype)
        free = self._pool.get(key)
        if free:
            kv = free.pop()
            kv.valid.zero_()
            kv.length = 0
            return kv
        cfg, dev = self.stage.config, self.stage.device
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = (batch, cfg.num_key_value_heads, capacity, hd)
        make = [torch.zeros(shape, dtype=self.stage.dtype, device=dev) for _ in self.stage.layer_ids]
        kv = StaticKV(keys=make, values=[torch.zeros_like(t) for t in make],
                      valid=torch.zeros((batch, capacity), dtype=torch.bool, device=dev))
        if self.mode == "reduce-overhead":  # fixed addresses: CUDA graphs replay without copying the cache in
            for t in (*kv.keys, *kv.values, kv.valid):
                torch._dynamo.mark_static_address(t, guard=False)
        return kv

    def _release_later(self, cache, kv: StaticKV) -> None:
        """Give `kv` back to the pool when `cache` (a StageCache) is garbage collected."""
        weakref.finalize(cache, self._pool.setdefault((tuple(kv.valid.shape), self.stage.dtype), []).append, kv)

    def to_static(self, cache, capacity: int | None) -> StaticKV:
        """Move a prefilled StageCache's DynamicCache into static buffers of at least `capacity` slots."""
        seq = cache.seq_len
        kv = self._allocate(cache.mask.shape[0], cache_capacity(capacity, seq))
        self._fill(kv, cache, seq)
        self._release_later(cache, kv)
        cache.kv = None  # the DynamicCache's tensors are no longer needed
        return kv

    def _fill(self, kv: StaticKV, cache, seq: int) -> None:
        dyn = cache.kv
        for i, g in enumerate(self.stage.layer_ids):
            k, v = dyn.layers[g].keys, dyn.layers[g].values
            kv.keys[i][:, :, :seq].copy_(k)
            kv.values[i][:, :, :seq].copy_(v)
        kv.valid[:, :seq].copy_(cache.mask.bool())
        kv.length = seq

    def grow(self, cache, kv: StaticKV) -> StaticKV:
        """A full cache: new buffers of twice the capacity holding the same slots (one recompile for the shape)."""
        big = self._allocate(kv.valid.shape[0], 2 * kv.capacity)
        n = kv.length
        for dst, src in zip((*big.keys, *big.values), (*kv.keys, *kv.values)):
            dst[:, :, :n].copy_(src[:, :, :n])
        big.valid[:, :n].copy_(kv.valid[:, :n])
        big.length = n
        self._release_later(cache, big)
        return big

    # ---- the step ---------------------------------------------------------------------------------------------
    def _step(self, x: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor, valid: torch.Tensor,
              keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
        """One decode step: x ids (B, 1) or hidden (B, 1, H); pos (B, 1) int64; slot (1,) int64 -> hidden or logits."""
        st = self.stage
        valid.index_fill_(1, slot, True)
        mask = valid[:, None, None, :]  # (B, 1, 1, capacity): True = attend
        h = st.embed_tokens(x) if st.has_embed else x
        if st.layer_ids:
            pe = st.rotary_emb(h, position_ids=pos)
            kw = {self.cache_kwarg: _SlotWriter(st.layer_ids, keys, values, slot)}
            for layer in st.layers:
                h = layer(h, attention_mask=mask, position_ids=pos, use_cache=True, position_embeddings=pe, **kw)
        if st.has_head:
            return st.lm_head(st.norm(h))[:, -1, :].float()
        return h

    def decode(self, x: torch.Tensor, pos: torch.Tensor, kv: StaticKV) -> torch.Tensor:
        """Run the compiled step at slot `kv.length`; records compile time on the first call of a shape."""
        slot = torch.tensor([kv.length], dtype=torch.long, device=self.stage.device)
        shape = (tuple(x.shape), x.dtype, kv.shape_key)
        first = shape not in self._shapes
        t0 = time.perf_counter()
        out = self.step_fn(x, pos, slot, kv.valid, kv.keys, kv.values)
        if self.mode == "reduce-overhead":
            out = out.clone()  # a CUDA graph's output is overwritten by its next replay; the caller keeps this one
        if first:
            self._shapes.add(shape)
            self.compiles += 1
            self.compile_s += time.perf_counter() - t0
        kv.length += 1
        return out
