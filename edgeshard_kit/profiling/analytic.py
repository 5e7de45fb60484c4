"""Analytic (roofline) profiles: Llama model specs, per-unit FLOPs and bytes, `analytic_profile`, `calibrate`."""

from __future__ import annotations

import datetime
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.io import read_json
from edgeshard_kit.core.units import unit_name
from edgeshard_kit.profiling.catalog import Hardware, get_device
from edgeshard_kit.profiling.profile import Profile, UnitProfile

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

# Published configs (Hugging Face meta-llama/Llama-2-*-hf config.json).
BUILTIN_SPECS = {
    "llama2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      intermediate_size=11008, vocab_size=32000),
    "llama2-13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                       intermediate_size=13824, vocab_size=32000),
    "llama2-70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                       intermediate_size=28672, vocab_size=32000),
}


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a Llama model (enough to count parameters, FLOPs and bytes)."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int = 0  # 0 = hidden_size // num_attention_heads
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def n_units(self) -> int:
        return self.num_hidden_layers + 2

    def to_dict(self) -> dict:
        return asdict(self)

    def hf_config(self):
        """A transformers LlamaConfig with these values."""
        from transformers import LlamaConfig

        return LlamaConfig(**{k: v for k, v in self.to_dict().items() if k not in ("name", "head_dim")},
                           head_dim=self.hd)


def model_spec(model) -> ModelSpec:
    """A built-in name (llama2-7b/13b/70b), a ModelSpec, a config dict, or a checkpoint dir / config.json path."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, dict):
        cfg, name = model, str(model.get("_name_or_path") or model.get("name") or "llama")
    else:
        key = str(model).strip().lower().replace("_", "-").replace("llama-2", "llama2")
        if key in BUILTIN_SPECS:
            return ModelSpec(name=key, **BUILTIN_SPECS[key])
        p = Path(model)
        cfg_file = p / "config.json" if p.is_dir() else p
        if not cfg_file.is_file():
            raise KitError(f"model {model!r} is neither a built-in spec ({', '.join(BUILTIN_SPECS)}) "
                           f"nor a checkpoint directory / config.json")
        cfg = read_json(cfg_file)
        name = p.name if p.is_dir() else p.parent.name
    if cfg.get("model_type") not in (None, "llama") or (cfg.get("model_type") is None and "hidden_size" not in cfg):
        raise KitError(f"model config {name!r}: model_type is {cfg.get('model_type')!r}, not 'llama'")
    try:
        return ModelSpec(
            name=name, hidden_size=int(cfg["hidden_size"]), num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=int(cfg["num_attention_heads"]),
            num_key_value_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
            intermediate_size=int(cfg["intermediate_size"]), vocab_size=int(cfg["vocab_size"]),
            head_dim=int(cfg.get("head_dim") or 0), tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)), mlp_bias=bool(cfg.get("mlp_bias", False)))
    except KeyError as e:
        raise KitError(f"model config {name!r} lacks the field {e.args[0]!r}") from None


def unit_params(spec: ModelSpec) -> list[int]:
    """Parameters per unit, counted on modules built on the meta device (no weights allocated)."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

    cfg = spec.hf_config()
    with torch.device("meta"):
        layer = sum(p.numel() for p in LlamaDecoderLayer(cfg, 0).parameters())
        embed = sum(p.numel() for p in torch.nn.Embedding(spec.vocab_size, spec.hidden_size).parameters())
        head = sum(p.numel() for p in LlamaRMSNorm(spec.hidden_size).parameters())
        head += sum(p.numel() for p in torch.nn.Linear(spec.hidden_size, spec.vocab_size, bias=False).parameters())
    # A tied lm_head still has to be resident on the stage that holds the head.
    return [embed] + [layer] * spec.num_hidden_layers + [head]


def total_params(spec: ModelSpec) -> int:
    """Parameters of the model as published (a tied lm_head counted once)."""
    p = unit_params(spec)
    return sum(p) - (spec.vocab_size * spec.hidden_size if spec.tie_word_embeddings else 0)


@dataclass(frozen=True)
class Efficiency:
    """Fractions of peak FLOP/s and bandwidth reached, plus fixed costs (ms); `source` says how they were set."""

    compute: float = 0.5
    memory: float = 0.7
    unit_overhead_ms: float = 0.05  # per decoder layer per forward: kernel launches / framework dispatch
    embed_overhead_ms: float = 0.02  # the embedding (one gather)
    head_overhead_ms: float = 0.05  # norm + lm_head
    step_overhead_ms: float = 0.0  # per generated token for the whole model (sampling, glue)
    source: str = "uncalibrated defaults"
    fit_error: float | None = None  # RMS relative error of the fit on the calibration profile

    def to_dict(self) -> dict:
        return asdict(self)


def unit_costs(spec: ModelSpec, dtype: str, batch: int, tokens: int, ctx: int) -> list[tuple[float, float]]:
    """(FLOPs, bytes moved) per unit for a forward of `tokens` new tokens with `ctx` tokens already cached."""
    if dtype not in DTYPE_BYTES:
        raise KitError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    s, h, b, t = DTYPE_BYTES[dtype], spec.hidden_size, batch, tokens
    hd, nh, nkv, inter = spec.hd, spec.num_attention_heads, spec.num_key_value_heads, spec.intermediate_size
    lin = h * nh * hd + 2 * h * nkv * hd + nh * hd * h + 3 * h * inter  # matmul weights of one layer
    kv_tok = 2 * nkv * hd * s  # bytes of K and V per token per sequence
    L = ctx + t  # keys each new query attends to (SDPA computes the full rectangle)
    attn_flops = 4 * b * nh * hd * t * L
    layer_flops = 2 * b * t * lin + attn_flops
    # weights once + KV read (ctx) and written (t) + activations in, out and the MLP's intermediates
    layer_bytes = (lin + 2 * h) * s + b * kv_tok * (ctx + t) + b * t * (6 * h + 3 * inter) * s
    embed = (0.0, float(2 * b * t * h * s))  # gather rows, write hidden
    # Head: norm on every position, lm_head on the last one (StageModel returns last-position logits).
    head = (2.0 * b * h * spec.vocab_size, float((h + h * spec.vocab_size) * s + b * t * h * s + b * spec.vocab_size * 4))
    return [embed] + [(float(layer_flops), float(layer_bytes))] * spec.num_hidden_layers + [head]


def _roofline(costs, dev: Hardware, dtype: str, eff: Efficiency) -> list[float]:
    peak, bw = dev.flops(dtype), dev.mem_bw_gbs * 1e9
    fixed = [eff.embed_overhead_ms] + [eff.unit_overhead_ms] * (len(costs) - 2) + [eff.head_overhead_ms]
    return [1e3 * max(f / (peak * eff.compute), by / (bw * eff.memory)) + o for (f, by), o in zip(costs, fixed)]


def analytic_profile(model, device, dtype: str = "float32", batch: int = 1, prompt_len: int = 32,
                     kv_lens=(32, 64, 128), efficiency: Efficiency | None = None,
                     device_type: str | None = None) -> Profile:
    """A roofline Profile of `model` on catalog device `device`; times are estimates, bytes are exact."""
    spec, dev = model_spec(model), get_device(device)
    eff = efficiency or Efficiency()
    if batch <= 0 or prompt_len <= 0:
        raise KitError(f"batch and prompt_len must be positive, got batch={batch} prompt_len={prompt_len}")
    kv_lens = tuple(sorted(set(int(k) for k in kv_lens)))
    if not kv_lens or kv_lens[0] <= 0:
        raise KitError(f"kv_lens must be positive integers, got {kv_lens}")
    s = DTYPE_BYTES.get(dtype) or 0
    prefill = _roofline(unit_costs(spec, dtype, batch, prompt_len, 0), dev, dtype, eff)
    dec = {kv: _roofline(unit_costs(spec, dtype, batch, 1, kv), dev, dtype, eff) for kv in kv_lens}
    ref = kv_lens[len(kv_lens) // 2]
    params = unit_params(spec)
    kv_tok = batch * 2 * spec.num_key_value_heads * spec.hd * s
    units = []
    for u in range(spec.n_units):
        last = u == spec.n_units - 1
        kv = kv_tok if 1 <= u <= spec.num_hidden_layers else 0
        out = batch * spec.vocab_size * 4 if last else batch * spec.hidden_size * s
        act = batch * prompt_len * (spec.hidden_size * 3 + spec.intermediate_size * 3) * s
        units.append(UnitProfile(unit=u, name=unit_name(u, spec.num_hidden_layers), prefill_ms=prefill[u],
                                 decode_ms=dec[ref][u], decode_ms_by_kv={kv_: dec[kv_][u] for kv_ in kv_lens},
                                 param_bytes=params[u] * s, kv_bytes_per_token=kv, out_bytes_per_token=out,
                                 tied_bytes=spec.vocab_size * spec.hidden_size * s if last and spec.tie_word_embeddings else 0,
                                 peak_mem_bytes=params[u] * s + kv * (max(kv_lens) + prompt_len) + act))
    meta = {"source": f"analytic roofline ({eff.source})", "method": "max(flops/(peak*compute), bytes/(bw*memory)) "
            "+ fixed per-unit overhead (embed / layer / head)", "efficiency": eff.to_dict(), "device_spec": dev.to_dict(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    return Profile(model=spec.name, n_layers=spec.num_hidden_layers, device_type=device_type or dev.name,
                   dtype=dtype, batch=batch, prompt_len=prompt_len, kv_lens=kv_lens, ref_kv_len=ref,
                   units=tuple(units), config={**spec.to_dict(), "model_type": "llama"},
                   overhead={"decode_step_ms": eff.step_overhead_ms, "prefill_ms": 0.0}, meta=meta)


def _grid_fit(points, dev: Hardware, dtype: str, compute: float | None) -> tuple[float, float, list[float], float]:
    """(compute, memory, [embed, layer, head] overhead ms, rms rel. error) over (flops, bytes, ms, group) points."""
    f = np.array([p[0] for p in points])
    by = np.array([p[1] for p in points])
    t = np.array([p[2] for p in points])
    g = np.array([p[3] for p in points])
    grid = np.logspace(-3, 1, 81)  # 0.001 .. 10 (>1 flags a device faster than its datasheet)
    cgrid = grid if compute is None else np.array([compute])
    tc = 1e3 * f[None, :] / (dev.flops(dtype) * cgrid[:, None])  # (Ec, P)
    tm = 1e3 * by[None, :] / (dev.mem_bw_gbs * 1e9 * grid[:, None])
    roof = np.maximum(tc[:, None, :], tm[None, :, :])  # (Ec, Em, P)
    # Per group (embed, layers, head): the overhead minimising squared relative error, closed form, >= 0.
    w = 1.0 / t**2
    o = np.zeros(roof.shape[:2] + (3,))
    for k in range(3):
        m = g == k
        if m.any():
            o[..., k] = np.clip(((t[m] - roof[..., m]) * w[m]).sum(-1) / w[m].sum(), 0.0, None)
    err = np.sqrt((((roof + o[..., g]) / t - 1.0) ** 2).mean(-1))
    # Ties (e.g. an unused compute roof): prefer the largest, i.e. least pessimistic, efficiency.
    best = np.unravel_index(np.argmin(err + 1e-9 * (-np.log(cgrid))[:, None] + 1e-9 * (-np.log(grid))[None, :]), err.shape)
    return float(cgrid[best[0]]), float(grid[best[1]]), [float(x) for x in o[best]], float(err[best])


def calibrate(measured: Profile, model=None, device: str | Hardware = "this-machine",
              fit_compute: bool | None = None) -> Efficiency:
    """Efficiency factors that make the roofline reproduce `measured` (prefill and decode of every unit).

    Decode alone cannot tell a compute roof from a memory roof, so the compute efficiency is fitted only
    when the profile has measured prefill times (fit_compute=None), else kept at the default.
    """
    spec = model_spec(model if model is not None else measured.config)
    if spec.n_units != measured.n_units:
        raise KitError(f"profile {measured.device_type} is for model {measured.model} with {measured.n_units} units, "
                       f"the spec {spec.name} has {spec.n_units}")
    dev = get_device(device)
    has_prefill = bool(measured.meta.get("prefill_measured", True))
    # Separate overheads for embed / layers / head need two operating points per unit (prefill and
    # decode); with decode alone one shared overhead keeps the fit from turning every layer into a constant.
    separate = has_prefill

    def group(u: int) -> int:
        return (0 if u == 0 else 2 if u == spec.n_units - 1 else 1) if separate else 1

    fit_compute = has_prefill if fit_compute is None else fit_compute
    points = []
    pre = unit_costs(spec, measured.dtype, measured.batch, measured.prompt_len, 0)
    if has_prefill:
        points += [(c[0], c[1], u.prefill_ms, group(u.unit)) for c, u in zip(pre, measured.units)]
    for u in measured.units:
        for kv, ms in (u.decode_ms_by_kv or {measured.ref_kv_len: u.decode_ms}).items():
            c = unit_costs(spec, measured.dtype, measured.batch, 1, kv)[u.unit]
            points.append((c[0], c[1], ms, group(u.unit)))
    points = [p for p in points if p[2] > 0]
    ec, em, o, err = _grid_fit(points, dev, measured.dtype, None if fit_compute else Efficiency().compute)
    o = o if separate else [o[1]] * 3
    # The step overhead (sampling, glue) is copied; a negative measured one is noise, so clipped at 0.
    return Efficiency(compute=ec, memory=em, unit_overhead_ms=o[1], embed_overhead_ms=o[0], head_overhead_ms=o[2],
                      step_overhead_ms=max(0.0, measured.decode_overhead_ms),
                      source=f"calibrated on {measured.model} / {measured.device_type} against {dev.name}",
                      fit_error=err)


def compare(predicted: Profile, measured: Profile, kv_len: int | None = None) -> dict:
    """Whole-model decode ms/token and per-unit error of a prediction against a measurement."""
    p, m = predicted.decode_ms(kv_len), measured.decode_ms(kv_len)
    rel = [abs(a / b - 1) for a, b in zip(p, m) if b > 0]
    tp, tm = predicted.predict_decode_ms(kv_len), measured.predict_decode_ms(kv_len)
    return {"predicted_ms": tp, "measured_ms": tm, "error_pct": 100 * (tp / tm - 1),
            "unit_mean_abs_error_pct": 100 * float(np.mean(rel))}


def calibration_transfer(small: Profile, large: Profile, device: str | Hardware = "this-machine") -> dict:
    """Calibrate on `small`, predict `large`: how well the calibrated roofline carries over to another size."""
    eff = calibrate(small, device=device)
    pred = analytic_profile(large.config, device, dtype=large.dtype, batch=large.batch,
                            prompt_len=large.prompt_len, kv_lens=large.kv_lens, efficiency=eff)
    raw = analytic_profile(large.config, device, dtype=large.dtype, batch=large.batch,
                           prompt_len=large.prompt_len, kv_lens=large.kv_lens)
    c, r = compare(pred, large), compare(raw, large)
    return {"calibrated_on": small.model, "predicted": large.model, "compute_eff": eff.compute,
            "memory_eff": eff.memory, "unit_overhead_ms": eff.unit_overhead_ms, "fit_error_pct": 100 * eff.fit_error,
            "measured_ms": c["measured_ms"], "calibrated_ms": c["predicted_ms"], "calibrated_error_pct": c["error_pct"],
            "uncalibrated_ms": r["predicted_ms"], "uncalibrated_error_pct": r["error_pct"]}


def with_efficiency(profile: Profile, eff: Efficiency) -> Profile:
    """Re-estimate an analytic profile with other efficiency factors."""
    return analytic_profile(profile.config, profile.meta["device_spec"]["name"], profile.dtype, profile.batch,
                            profile.prompt_len, profile.kv_lens, eff, device_type=profile.device_type)
