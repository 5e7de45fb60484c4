"""The measured profiler: time every unit inside real prefill and decode steps of a StageModel."""

from __future__ import annotations

import copy
import datetime
from dataclasses import replace
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from edgeshard_kit import __version__
from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.units import unit_name
from edgeshard_kit.model.checkpoint import load_llama_config
from edgeshard_kit.model.generate import sample_next
from edgeshard_kit.model.stage import StageModel, parse_dtype, synchronize
from edgeshard_kit.profiling.analytic import model_spec, unit_params
from edgeshard_kit.profiling.fit import SPREAD_LIMIT, fit_profile, spread_flags
from edgeshard_kit.profiling.profile import Profile, UnitProfile, load_profile

BANDWIDTH_BYTES = 256 * 2**20  # the copied tensor: well past any last-level cache


def measure_bandwidth(device: str = "cpu", nbytes: int = BANDWIDTH_BYTES, repeats: int = 5) -> float:
    """The device's memory bandwidth in GB/s: best of `repeats` copies of an `nbytes` float32 tensor, counting
    the bytes read and written (2 x nbytes), with torch's current thread count. The decode limit of a stage is
    its weight bytes / this (every weight is read once per token)."""
    import torch

    dev = torch.device(device)
    a = torch.ones(max(1, int(nbytes) // 4), dtype=torch.float32, device=dev)
    b = torch.empty_like(a)
    b.copy_(a)  # touch the pages first
    best = float("inf")
    for _ in range(_positive_int("repeats", repeats)):
        synchronize(dev)
        t0 = time.perf_counter()
        b.copy_(a)
        synchronize(dev)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 4 / best / 1e9


def decode_read_bytes(checkpoint: str | Path, dtype: str = "float32") -> int:
    """Weight bytes one decode step of the whole model reads: every unit once except the embedding (one row)."""
    import torch

    size = torch.finfo(parse_dtype(dtype)).bits // 8
    return sum(unit_params(model_spec(checkpoint))[1:]) * size


def matching_profiles(paths: list[str], compiled: bool) -> list[str]:
    """Of profile files, those measured on the same decode path (`compiled` or eager); KitError naming the first
    file when a device type has no profile of that path (measure one with `edgeshard profile [--compile]`)."""
    profs = [(str(p), load_profile(p)) for p in paths]
    keep = [path for path, prof in profs if prof.compiled == bool(compiled)]
    covered = {prof.device_type for path, prof in profs if prof.compiled == bool(compiled)}
    for path, prof in profs:
        if prof.device_type not in covered:
            want = "compiled (edgeshard profile --compile)" if compiled else "eager (edgeshard profile without --compile)"
            raise KitError(f"profile {path}: field 'compiled' is {prof.compiled}, but the run is "
                           f"{'compiled' if compiled else 'eager'}: give a {want} profile of {prof.device_type}")
    return keep


def median_min_max(samples: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of timings in ms."""
    xs = sorted(samples)
    n = len(xs)
    med = xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])
    return med, xs[0], xs[-1]


def _positive_int(name: str, value: Any, allow_zero: bool = False) -> int:
    what = "a non-negative" if allow_zero else "a positive"
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise KitError(f"{name} must be {what} integer, got {value!r}") from None
    if v < 0 or (v == 0 and not allow_zero) or v != float(value):
        raise KitError(f"{name} must be {what} integer, got {value!r}")
    return v


def parse_kv_lens(text: str | Iterable[int]) -> tuple[int, ...]:
    """"32,64,128" -> (32, 64, 128); KitError naming kv_lens if one is not a positive integer."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = tuple(_positive_int("kv_lens", x.strip() if isinstance(x, str) else x) for x in items if str(x).strip())
    if not out:
        raise KitError("kv_lens is empty: give at least one KV length, e.g. 32,64,128")
    return tuple(sorted(set(out)))


class UnitTimer:
    """Forward hooks on a whole-model StageModel that time each unit (sync + perf_counter around it)."""

    def __init__(self, stage, track_cuda_memory: bool = False):
        self.stage, self.sync, self.cuda_mem = stage, (lambda: synchronize(stage.device)), track_cuda_memory
        n = stage.config.num_hidden_layers
        # (unit, module where it starts, module where it ends): the head is norm .. lm_head.
        self.spans = [(0, stage.embed_tokens, stage.embed_tokens)]
        self.spans += [(i + 1, layer, layer) for i, layer in enumerate(stage.layers)]
        self.spans += [(n + 1, stage.norm, stage.lm_head)]
        self.active = True  # hooks cost ~1 us when inactive: plain steps run with them installed
        self.ms: dict[int, float] = {}
        self.peak: dict[int, int] = {}
        self._t0: dict[int, float] = {}
        self._base: dict[int, int] = {}
        self.handles = []
        for u, first, last in self.spans:
            self.handles.append(first.register_forward_pre_hook(self._pre(u)))
            self.handles.append(last.register_forward_hook(self._post(u)))

    def _pre(self, u: int):
        def hook(module, args):
            if not self.active:
                return
            self.sync()
            if self.cuda_mem:
                import torch

                torch.cuda.reset_peak_memory_stats(self.stage.device)
                self._base[u] = torch.cuda.memory_allocated(self.stage.device)
            self._t0[u] = time.perf_counter()
        return hook

    def _post(self, u: int):
        def hook(module, args, output):
            if not self.active:
                return
            self.sync()
            self.ms[u] = (time.perf_counter() - self._t0[u]) * 1e3
            if self.cuda_mem:
                import torch

                self.peak[u] = max(self.peak.get(u, 0), torch.cuda.max_memory_allocated(self.stage.device) - self._base[u])
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _unit_param_bytes(stage) -> tuple[list[int], int]:
    """(parameter bytes per unit, bytes the head shares with unit 0): a tied tensor is in both units' bytes
    (a stage holding only the head needs its own copy) and reported once as the shared bytes."""
    def params(*mods):
        return {id(p): p for m in mods for p in m.parameters()}

    def nbytes(ps):
        return sum(p.numel() * p.element_size() for p in ps.values())

    embed, head = params(stage.embed_tokens), params(stage.norm, stage.lm_head)
    shared = {k: p for k, p in head.items() if k in embed}
    return [nbytes(embed)] + [nbytes(params(l)) for l in stage.layers] + [nbytes(head)], nbytes(shared)


def _host_meta(device: str) -> dict:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    return {"host": platform.node(), "cpu": cpu, "gpu": gpu, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "edgeshard_kit": __version__, "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def default_device_type(device: str) -> str:
    """cpu -> "cpu-local"; cuda -> "cuda-<gpu name>" (pass --device-type to name it after your testbed)."""
    if device.startswith("cuda"):
        import torch

        return "cuda-" + torch.cuda.get_device_name(torch.device(device)).lower().replace(" ", "-")
    return "cpu-local"


def measure_profile(checkpoint: str | Path, device: str = "cpu", dtype: str = "float32", batch: int = 1,
                    prompt_len: int = 32, kv_lens: Iterable[int] = (32, 64, 128), repeats: int = 20,
                    warmup: int = 3, device_type: str | None = None, progress: bool = True,
                    threads: int | None = None, stage=None, compile: bool = False) -> Profile:
    """Measure every unit of `checkpoint` on `device`: prefill, decode at each KV length, bytes, peak memory, and
    the device's memory bandwidth (`measure_bandwidth`).

    `compile`: the compiled decode step (model/compiled.py) is timed too at each KV length, and shared among
    the units and the step overhead in the proportions of their eager times (a compiled step is one fused call:
    it has no unit boundaries to time), so the profile predicts the compiled step. Prefill is eager on both paths.
    """
    import torch
    from tqdm.auto import tqdm

    batch, prompt_len = _positive_int("batch", batch), _positive_int("prompt_len", prompt_len)
    repeats, warmup = _positive_int("repeats", repeats), _positive_int("warmup", warmup, allow_zero=True)
    kv_lens = parse_kv_lens(kv_lens)
    if threads is not None:
        torch.set_num_threads(_positive_int("threads", threads))
    if stage is None:
        n = load_llama_config(checkpoint).num_hidden_layers
        stage = StageModel(checkpoint, 0, n + 2, dtype=dtype, device=device)
    comp = stage.enable_compile() if compile else None
    saved_path, stage.compiled = stage.compiled, None  # the unit timings run eager (hooks need module boundaries)
    mem_bw = measure_bandwidth(str(stage.device))
    cfg, n, dev = stage.config, stage.config.num_hidden_layers, stage.device
    cuda = dev.type == "cuda"
    gen = torch.Generator().manual_seed(0)

    def ids(t: int) -> torch.Tensor:
        return torch.randint(0, cfg.vocab_size, (batch, t), generator=gen).to(dev)

    def timed(fn) -> float:
        synchronize(dev)
        t0 = time.perf_counter()
        fn()
        synchronize(dev)
        return (time.perf_counter() - t0) * 1e3

    units: dict[int, dict] = {u: {"prefill": [], "decode": {k: [] for k in kv_lens}} for u in range(n + 2)}
    over: dict[str, list[float]] = {"prefill": [], "decode": []}  # plain step - sum of units, per pair
    bar = tqdm(total=(1 + len(kv_lens)) * 2 * (warmup + repeats), desc=f"profile {Path(str(checkpoint)).name}",
               unit="step", file=sys.stderr, disable=not progress)
    timer = UnitTimer(stage, track_cuda_memory=cuda)
    # Every repeat is a pair: one step with the unit hooks on, one plain step (forward + sampling, as
    # generate runs it), in alternating order; the pair's difference is the overhead outside the units.
    # Pairing keeps slow drifts of the machine's load out of the overhead.
    try:
        for i in range(warmup + repeats):  # prefill: a fresh cache every time
            got = {}
            for hooked in ((True, False) if i % 2 == 0 else (False, True)):
                timer.active = hooked
                cache, x = stage.new_cache(), ids(prompt_len)
                got[hooked] = (timed(lambda: sample_next(stage.forward(x, cache))), dict(timer.ms))
                bar.update()
            if i >= warmup:
                for u in units:
                    units[u]["prefill"].append(got[True][1][u])
                over["prefill"].append(got[False][0] - sum(got[True][1].values()))
        bases = {}
        for kv in kv_lens:
            # One untimed prefill of `kv` random tokens per KV length; every pair decodes from a copy of that cache
            # (a copy costs far less than a prefill), so every timed step sees kv or kv+1 cached tokens.
            timer.active = False
            base = stage.new_cache()
            bases[kv] = (base, sample_next(stage.forward(ids(kv), base)))
        for i in range(warmup + repeats):
            # The KV lengths take turns in every repeat: a drift of the host's load between KV lengths measured one
            # after the other became a per-KV-token slope (2 ms per cached token for a 135M model, summed over units).
            for kv in kv_lens:
                timer.active = False
                cache, tok = copy.deepcopy(bases[kv][0]), bases[kv][1]
                got = {}
                for hooked in ((True, False) if i % 2 == 0 else (False, True)):
                    timer.active = hooked
                    box = {}
                    ms = timed(lambda: box.setdefault("tok", sample_next(stage.forward(tok[:, None], cache))))
                    tok, got[hooked] = box["tok"], (ms, dict(timer.ms))
                    bar.update()
                if i >= warmup:
                    for u in units:
                        units[u]["decode"][kv].append(got[True][1][u])
                    over["decode"].append((kv, got[False][0], got[False][0] - sum(got[True][1].values())))
    finally:
        peaks = dict(timer.peak)
        timer.remove()
        bar.close()
    factor: dict[int, float] = {}  # compiled: the eager units scaled so that they sum to the compiled step
    if comp is not None:
        try:
            compiled_ms = _compiled_steps(stage, comp, ids, kv_lens, repeats, warmup, progress)
        finally:
            stage.compiled = saved_path
        eager_over = median_min_max([o for _, _, o in over["decode"]])[0]
        for kv in kv_lens:
            eager_ms = sum(median_min_max(units[u]["decode"][kv])[0] for u in units) + eager_over
            factor[kv] = compiled_ms[kv] / eager_ms
    else:
        stage.compiled = saved_path

    s = torch.finfo(stage.dtype).bits // 8
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_tok = batch * 2 * cfg.num_key_value_heads * hd * s  # bytes per token position per layer, whole batch
    pbytes, tied = _unit_param_bytes(stage)
    ref = kv_lens[len(kv_lens) // 2]
    out_units = []
    for u in range(n + 2):
        p_med, p_min, p_max = median_min_max(units[u]["prefill"])
        dec = {k: tuple(x * factor.get(k, 1.0) for x in median_min_max(v)) for k, v in units[u]["decode"].items()}
        kv = kv_tok if 1 <= u <= n else 0
        out = batch * cfg.vocab_size * 4 if u == n + 1 else batch * cfg.hidden_size * s
        # Transient activations: measured on CUDA; on CPU estimated as the prefill's hidden + MLP tensors.
        act = peaks.get(u) if cuda else batch * prompt_len * (3 * cfg.hidden_size + 3 * cfg.intermediate_size) * s
        out_units.append(UnitProfile(
            unit=u, name=unit_name(u, n), prefill_ms=p_med, prefill_min_ms=p_min, prefill_max_ms=p_max,
            decode_ms=dec[ref][0], decode_ms_by_kv={k: v[0] for k, v in dec.items()},
            decode_min_ms_by_kv={k: v[1] for k, v in dec.items()}, decode_max_ms_by_kv={k: v[2] for k, v in dec.items()},
            param_bytes=pbytes[u], kv_bytes_per_token=kv, out_bytes_per_token=out,
            peak_mem_bytes=pbytes[u] + kv * (max(kv_lens) + prompt_len) + int(act or 0),
            tied_bytes=tied if u == n + 1 else 0))
    # Per-step overhead = plain step - sum of units (mask, RoPE, sampling, Python glue), median of the pairs.
    step = {k: median_min_max([ms for kv, ms, _ in over["decode"] if kv == k])[0] for k in kv_lens}
    overhead = {"decode_step_ms": median_min_max([o for _, _, o in over["decode"]])[0] * factor.get(ref, 1.0),
                "prefill_ms": median_min_max(over["prefill"])[0],
                "decode_step_measured_ms": {str(k): v for k, v in step.items()}}
    if comp is not None:
        overhead.update(decode_step_eager_ms=overhead["decode_step_measured_ms"],
                        decode_step_measured_ms={str(k): v for k, v in compiled_ms.items()},
                        compile_s=comp.compile_s)
    meta = {**_host_meta(str(dev)), "source": f"measured by edgeshard profile on {str(dev)}",
            "checkpoint": str(checkpoint), "device": str(dev),
            "method": {"repeats": repeats, "warmup": warmup, "statistic": "median (min and max kept)",
                       "timer": "time.perf_counter after device synchronisation",
                       "units": "forward hooks inside real steps of the whole model as one stage",
                       "decode": "at each kv_len one untimed prefill of kv_len random tokens; each repeat, every kv_len in "
                                 "turn: a copy of that cache, then a pair of greedy decode steps (kv_len and kv_len + "
                                 "1 cached tokens)",
                       "pairs": "each repeat = a hooked step and a plain step in alternating order",
                       "overhead": "plain step minus the sum of units of its paired hooked step (median)",
                       "mem_bw": f"best of 5 copies of a {BANDWIDTH_BYTES >> 20} MiB float32 tensor, "
                                 f"(read + written bytes) / time, {torch.get_num_threads()} torch threads",
                       **({"compiled": "the compiled decode step timed at each kv_len (median), shared among the "
                                       "units and the step overhead in the proportions of their eager times; "
                                       "prefill eager"} if comp is not None else {})},
            "compile_s": comp.compile_s if comp is not None else None}
    config = {k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool, type(None)))}
    samples = {"prefill": {str(u): units[u]["prefill"] for u in units},
               # compiled: the eager samples scaled like the medians (factor), so that a fit keeps the compiled step
               "decode": {str(kv): {str(u): [x * factor.get(kv, 1.0) for x in units[u]["decode"][kv]] for u in units}
                          for kv in kv_lens},
               "overhead": {"prefill": over["prefill"], "decode": [[kv, ms * factor.get(kv, 1.0), o * factor.get(kv, 1.0)]
                                                                   for kv, ms, o in over["decode"]]}}
    prof = Profile(model=Path(str(checkpoint)).name, n_layers=n, device_type=device_type or default_device_type(str(dev)),
                   dtype=str(stage.dtype).removeprefix("torch."), batch=batch, prompt_len=prompt_len,
                   kv_lens=kv_lens, ref_kv_len=ref, units=tuple(out_units), config=config, overhead=overhead, meta=meta,
                   compiled=comp is not None, mem_bw_gbs=round(mem_bw, 2), samples=samples)
    prof = fit_profile(prof)  # decode = fixed + per-KV-token cost, both >= 0; overheads >= 0 (raw kept)
    flags = spread_flags(prof)
    for line in flags[:5] if progress else []:
        print(f"profile spread: {line}", file=sys.stderr)
    return replace(prof, meta={**prof.meta, "spread_limit": SPREAD_LIMIT, "spread_flags": flags,
                               "fit": "decode per unit: non-negative least squares of fixed + per-KV-token ms over "
                                      "every raw sample (profiling.fit)"})


def _compiled_steps(stage, comp, ids, kv_lens: tuple[int, ...], repeats: int, warmup: int,
                    progress: bool) -> dict[int, float]:
    """{kv_len: median ms of a compiled decode step (+ sampling)}: per repeat a fresh cache of kv_len random
    tokens (eager prefill), an untimed decode step (the first one compiles and fills the static cache), then one
    timed greedy step."""
    from tqdm.auto import tqdm

    capacity = max(kv_lens) + 3  # one static shape for every kv_len: one compile
    bar = tqdm(total=len(kv_lens) * (warmup + repeats), desc="profile compiled decode", unit="step",
               file=sys.stderr, disable=not progress)
    compiled_ms = {}
    stage.compiled = comp
    try:
        for kv in kv_lens:
            got = []
            for i in range(warmup + repeats):
                cache = stage.new_cache(max_len=capacity)
                tok = sample_next(stage.forward(ids(kv), cache))
                tok = sample_next(stage.forward(tok[:, None], cache))
                synchronize(stage.device)
                t0 = time.perf_counter()
                sample_next(stage.forward(tok[:, None], cache))
                synchronize(stage.device)
                if i >= warmup:
                    got.append((time.perf_counter() - t0) * 1e3)
                bar.update()
            compiled_ms[kv] = median_min_max(got)[0]
    finally:
        stage.compiled = None
        bar.close()
    return compiled_ms

