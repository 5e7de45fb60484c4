"""Profiles as data: per-unit prefill/decode times and bytes of one (model, device type, dtype, batch); JSON + CSV twin."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.io import read_json
from edgeshard_kit.profiling.schema import check_profile

FORMAT = "edgeshard-profile/1"


def _kv_dict(d: Any, what: str) -> dict[int, float]:
    """{kv_len: ms} from JSON (keys arrive as strings)."""
    if not isinstance(d, dict):
        raise KitError(f"{what} must be a mapping {{kv_len: ms}}, got {type(d).__name__}")
    try:
        return {int(k): float(v) for k, v in sorted(d.items(), key=lambda kv: int(kv[0]))}
    except (TypeError, ValueError, OverflowError):
        raise KitError(f"{what} has a non-numeric kv_len or time: {d!r}") from None


@dataclass(frozen=True)
class UnitProfile:
    """Measured (or estimated) cost of one unit; times in ms, sizes in bytes."""

    unit: int
    name: str
    prefill_ms: float  # median time of the unit on a prompt of `Profile.prompt_len` tokens
    decode_ms: float  # median time of one decode step at `Profile.ref_kv_len` cached tokens
    decode_ms_by_kv: dict[int, float] = field(default_factory=dict)  # {kv_len: median ms}
    prefill_min_ms: float | None = None
    prefill_max_ms: float | None = None
    decode_min_ms_by_kv: dict[int, float] = field(default_factory=dict)
    decode_max_ms_by_kv: dict[int, float] = field(default_factory=dict)
    param_bytes: int = 0
    # For the whole batch, per token position: K and V of every KV head (0 for embed/head).
    kv_bytes_per_token: int = 0
    # Bytes a stage ending at this unit sends per token position of the batch: hidden states
    # (batch x hidden x dtype size); for the head, the float32 logits of the last position
    # (batch x vocab x 4), which is what StageModel returns.
    out_bytes_per_token: int = 0
    peak_mem_bytes: int = 0  # parameters + KV at the largest kv_len + transient activations
    # Of param_bytes, the bytes that are unit 0's tensor (the head of tied embeddings): a stage holding only
    # this unit needs its own copy, a device that also holds unit 0 holds them once. 0 when untied.
    tied_bytes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "unit") -> "UnitProfile":
        if not isinstance(d, dict):
            raise KitError(f"{where} must be a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        for req in ("unit", "name", "prefill_ms", "decode_ms"):
            if req not in d:
                raise KitError(f"{where} lacks the field {req!r}")
        kw: dict[str, Any] = {}
        for k, v in d.items():
            if k not in known:
                continue  # forward compatible: ignore fields of newer versions
            try:
                if k.endswith("_by_kv"):
                    kw[k] = _kv_dict(v, f"{where}.{k}")
                elif k in ("unit", "param_bytes", "kv_bytes_per_token", "out_bytes_per_token", "peak_mem_bytes",
                           "tied_bytes"):
                    kw[k] = int(v)
                elif k == "name":
                    kw[k] = str(v)
                else:
                    kw[k] = None if v is None else float(v)
            except (TypeError, ValueError, OverflowError):
                raise KitError(f"{where}.{k} is not a number: {v!r}") from None
        tied, params = kw.get("tied_bytes", 0), kw.get("param_bytes", 0)
        if params < 0:
            raise KitError(f"{where}.param_bytes: {params} is negative")
        if not 0 <= tied <= params:
            raise KitError(f"{where}.tied_bytes must be between 0 and param_bytes ({params}), got {tied}")
        return cls(**kw)


def _interp(xs: list[int], ys: list[float], x: float) -> float:
    """Piecewise-linear in kv_len, extrapolated linearly past the ends (attention is linear in kv_len)."""
    if len(xs) == 1:
        return ys[0]
    if x <= xs[0]:
        i = 0
    elif x >= xs[-1]:
        i = len(xs) - 2
    else:
        i = max(j for j in range(len(xs) - 1) if xs[j] <= x)
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@dataclass(frozen=True)
class Profile:
    """Costs of every unit of one model on one device type (serves every device of that type)."""

    model: str
    n_layers: int
    device_type: str
    dtype: str
    batch: int
    prompt_len: int
    kv_lens: tuple[int, ...]
    ref_kv_len: int
    units: tuple[UnitProfile, ...]
    config: dict = field(default_factory=dict)  # the model's config.json values (or the spec)
    # Costs not inside any unit, in ms: decode_step_ms once per generated token (framework
    # overhead between units, sampling); prefill_ms once per prompt. Included in predictions.
    overhead: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # host, cpu/gpu, versions, date, method, source
    compiled: bool = False  # decode measured on the compiled path (generate/deploy --compile); plan with a matching one
    mem_bw_gbs: float | None = None  # the device's memory bandwidth (GB/s), measured by `edgeshard profile`
    # Every raw timing (ms): {"prefill": {unit: [...]}, "decode": {kv_len: {unit: [...]}}, "overhead": {...}};
    # the medians above are fitted from them (fit_profile) and checked for spread (spread_flags).
    samples: dict = field(default_factory=dict)

    def bandwidth_limit_ms(self, start: int = 0, end: int | None = None) -> float | None:
        """The least ms per decoded token of units [start, end): the weights a step reads at `mem_bw_gbs` (None
        when not measured). Every unit's weights are read once, except the embedding's (one row per token)."""
        if not self.mem_bw_gbs:
            return None
        end = self.n_units if end is None else end
        return sum(self.param_bytes()[max(start, 1):end]) / (self.mem_bw_gbs * 1e9) * 1e3

    # ---- accessors the planner uses -------------------------------------------------------
    @property
    def n_units(self) -> int:
        return len(self.units)

    def prefill_ms(self) -> list[float]:
        """Per-unit prefill time (ms) for `prompt_len` tokens."""
        return [u.prefill_ms for u in self.units]

    def decode_ms(self, kv_len: float | None = None) -> list[float]:
        """Per-unit decode time (ms per token) at `kv_len` cached tokens (None = ref_kv_len)."""
        if kv_len is None:
            return [u.decode_ms for u in self.units]
        out = []
        for u in self.units:
            if not u.decode_ms_by_kv:
                out.append(u.decode_ms)
                continue
            xs = sorted(u.decode_ms_by_kv)
            out.append(_interp(xs, [u.decode_ms_by_kv[x] for x in xs], float(kv_len)))
        return out

    def param_bytes(self) -> list[int]:
        """Per-unit parameter bytes; the head of tied embeddings carries the shared tensor (see `tied_bytes`)."""
        return [u.param_bytes for u in self.units]

    @property
    def tied_bytes(self) -> int:
        """Bytes the last unit shares with unit 0 (tied embeddings): counted once on a device holding both."""
        return self.units[-1].tied_bytes

    def model_param_bytes(self) -> int:
        """Parameter bytes of the whole model, a tied tensor counted once."""
        return sum(self.param_bytes()) - self.tied_bytes

    def kv_bytes_per_token(self) -> list[int]:
        return [u.kv_bytes_per_token for u in self.units]

    def out_bytes_per_token(self) -> list[int]:
        return [u.out_bytes_per_token for u in self.units]

    def peak_mem_bytes(self) -> list[int]:
        return [u.peak_mem_bytes for u in self.units]

    @property
    def decode_overhead_ms(self) -> float:
        return float(self.overhead.get("decode_step_ms", 0.0))

    @property
    def prefill_overhead_ms(self) -> float:
        return float(self.overhead.get("prefill_ms", 0.0))

    def predict_decode_ms(self, kv_len: float | None = None, start: int = 0, end: int | None = None) -> float:
        """Predicted ms per token of units [start, end) as one stage; the whole model adds the step overhead."""
        end = self.n_units if end is None else end
        t = sum(self.decode_ms(kv_len)[start:end])
        return t + (self.decode_overhead_ms if (start, end) == (0, self.n_units) else 0.0)

    def predict_prefill_ms(self, start: int = 0, end: int | None = None) -> float:
        """Predicted prefill ms of units [start, end); the whole model adds the prefill overhead."""
        end = self.n_units if end is None else end
        t = sum(self.prefill_ms()[start:end])
        return t + (self.prefill_overhead_ms if (start, end) == (0, self.n_units) else 0.0)

    # ---- data ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"format": FORMAT}
        d.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "units"})
        d["kv_lens"] = list(self.kv_lens)
        d["units"] = [u.to_dict() for u in self.units]
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "profile") -> "Profile":
        if not isinstance(d, dict):
            raise KitError(f"{where} is not a JSON object")
        for req in ("model", "n_layers", "device_type", "dtype", "batch", "units"):
            if req not in d:
                raise KitError(f"{where} lacks the field {req!r}")
        if not isinstance(d["units"], list) or not d["units"]:
            raise KitError(f"{where}: field 'units' must be a non-empty list")
        units = tuple(UnitProfile.from_dict(u, f"{where}: units[{i}]") for i, u in enumerate(d["units"]))
        try:
            n_layers = int(d["n_layers"])
            batch = int(d["batch"])
            prompt_len = int(d.get("prompt_len", 0))
            kv_lens = tuple(int(k) for k in d.get("kv_lens", []))
            ref_kv_len = int(d.get("ref_kv_len", kv_lens[0] if kv_lens else 0))
        except (TypeError, ValueError, OverflowError) as e:
            check_profile(d, where)  # names the one field that is wrong
            raise KitError(f"{where}: n_layers/batch/prompt_len/kv_lens/ref_kv_len must be integers ({e})") from None
        for i, u in enumerate(units):
            if u.unit != i:
                raise KitError(f"{where}: units[{i}] has unit={u.unit}; units must be listed 0..{len(units) - 1} in order")
            if u.tied_bytes and i != len(units) - 1:
                raise KitError(f"{where}: units[{i}].tied_bytes: only the last unit (the head) shares unit 0's tensor")
        if units[-1].tied_bytes > units[0].param_bytes:
            raise KitError(f"{where}: the head's tied_bytes {units[-1].tied_bytes} exceed unit 0's param_bytes "
                           f"{units[0].param_bytes}")
        if len(units) != n_layers + 2:
            raise KitError(f"{where}: {len(units)} units listed but n_layers={n_layers} needs {n_layers + 2}")
        for key in ("config", "overhead", "meta"):
            if not isinstance(d.get(key, {}), dict):
                raise KitError(f"{where}: field {key!r} must be a JSON object")
        check_profile(d, where)  # every field's type and range (negative bytes, batch 0, NaN times)
        bw = d.get("mem_bw_gbs")
        if bw is not None and (isinstance(bw, bool) or not isinstance(bw, (int, float)) or not 0 < bw < float("inf")):
            raise KitError(f"{where}: field 'mem_bw_gbs' must be a positive number of GB/s, got {bw!r}")
        return cls(model=str(d["model"]), n_layers=n_layers, device_type=str(d["device_type"]),
                   dtype=str(d["dtype"]), batch=batch, prompt_len=prompt_len, kv_lens=kv_lens,
                   ref_kv_len=ref_kv_len, units=units, config=dict(d.get("config", {})),
                   overhead=dict(d.get("overhead", {})), meta=dict(d.get("meta", {})),
                   compiled=d.get("compiled") is True,
                   mem_bw_gbs=None if d.get("mem_bw_gbs") is None else float(d["mem_bw_gbs"]),
                   samples=dict(d.get("samples") or {}) if isinstance(d.get("samples"), dict) else {})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def records(self) -> list[dict]:
        """Tidy rows: one per unit x measurement (prefill, decode at each kv_len)."""
        rows = []
        base = {"model": self.model, "device_type": self.device_type, "dtype": self.dtype, "batch": self.batch}
        for u in self.units:
            common = {"unit": u.unit, "name": u.name, "param_bytes": u.param_bytes,
                      "kv_bytes_per_token": u.kv_bytes_per_token, "out_bytes_per_token": u.out_bytes_per_token,
                      "peak_mem_bytes": u.peak_mem_bytes, "tied_bytes": u.tied_bytes}
            rows.append({**base, **common, "phase": "prefill", "tokens": self.prompt_len, "kv_len": 0,
                         "median_ms": u.prefill_ms, "min_ms": u.prefill_min_ms, "max_ms": u.prefill_max_ms})
            by_kv = u.decode_ms_by_kv or {self.ref_kv_len: u.decode_ms}
            for kv, ms in by_kv.items():
                rows.append({**base, **common, "phase": "decode", "tokens": 1, "kv_len": kv, "median_ms": ms,
                             "min_ms": u.decode_min_ms_by_kv.get(kv), "max_ms": u.decode_max_ms_by_kv.get(kv)})
        return rows

    def to_frame(self):
        """The tidy pandas DataFrame (same columns as the CSV twin)."""
        import pandas as pd

        return pd.DataFrame.from_records(self.records(), columns=CSV_COLUMNS)

    def summary(self) -> str:
        """One line for humans."""
        limit = self.bandwidth_limit_ms()
        ratio = (f" = {self.predict_decode_ms() / limit:.2f}x the memory-bandwidth limit {limit:.2f} ms "
                 f"({self.mem_bw_gbs:.1f} GB/s)") if limit else ""
        return (f"{self.model} on {self.device_type} ({self.dtype}, batch {self.batch}"
                f"{', compiled' if self.compiled else ''}): {self.n_units} units, "
                f"decode {self.predict_decode_ms():.2f} ms/token at kv {self.ref_kv_len}{ratio}, "
                f"prefill {self.predict_prefill_ms():.1f} ms for {self.prompt_len} tokens, "
                f"{self.model_param_bytes() / 2**20:.1f} MiB of parameters"
                f"{' (tied embeddings)' if self.tied_bytes else ''}")


CSV_COLUMNS = ["model", "device_type", "dtype", "batch", "unit", "name", "phase", "tokens", "kv_len",
               "median_ms", "min_ms", "max_ms", "param_bytes", "kv_bytes_per_token", "out_bytes_per_token",
               "peak_mem_bytes", "tied_bytes"]


def _json_path(path: str | Path) -> Path:
    p = Path(path)
    return p if p.suffix == ".json" else p.with_name(p.name + ".json")


def save_profile(profile: Profile, path: str | Path) -> Path:
    """Write PATH.json (authoritative) and PATH.csv (tidy twin for pandas); return the JSON path."""
    jp = _json_path(path)
    jp.parent.mkdir(parents=True, exist_ok=True)
    jp.write_text(profile.to_json() + "\n")
    profile.to_frame().to_csv(jp.with_suffix(".csv"), index=False)
    return jp


def load_profile(path: str | Path) -> Profile:
    """Read a profile JSON (KitError naming the file and the field if it is malformed)."""
    p = Path(path)
    if p.suffix == ".csv":
        p = p.with_suffix(".json")  # the CSV is a view; the JSON holds everything
    if not p.exists() and p.suffix != ".json":
        p = _json_path(p)
    if not p.exists():
        raise KitError(f"profile {path}: no such file")
    return Profile.from_dict(read_json(p, "profile "), where=f"profile {p}")


def merge_profiles(profiles: Iterable[Profile | str | Path]) -> dict[str, Profile]:
    """A collection keyed by device type; all profiles must be of the same model (same unit count)."""
    out: dict[str, Profile] = {}
    for p in profiles:
        p = p if isinstance(p, Profile) else load_profile(p)
        if out:
            first = next(iter(out.values()))
            if p.n_units != first.n_units or p.model != first.model:
                raise KitError(f"profile for {p.device_type} is for model {p.model} with {p.n_units} units, "
                               f"but {first.device_type}'s is for {first.model} with {first.n_units}")
        if p.device_type in out and out[p.device_type] != p:
            raise KitError(f"two different profiles for device type {p.device_type!r}")
        out[p.device_type] = p
    return out


def profiles_frame(profiles: dict[str, Profile] | Iterable[Profile]):
    """One tidy DataFrame of several profiles (rows tagged by device_type)."""
    import pandas as pd

    ps = profiles.values() if isinstance(profiles, dict) else profiles
    return pd.concat([p.to_frame() for p in ps], ignore_index=True)


def check_profile_matches(profile: Profile, model: Any) -> None:
    """KitError unless `profile` fits a model given as n_layers, a config dict or a config object."""
    if isinstance(model, int):
        n_layers, hidden = model, None
    elif isinstance(model, dict):
        n_layers, hidden = model.get("num_hidden_layers"), model.get("hidden_size")
    else:
        n_layers, hidden = getattr(model, "num_hidden_layers", None), getattr(model, "hidden_size", None)
    if n_layers is None:
        raise KitError(f"cannot tell the layer count of the plan's model from {type(model).__name__}")
    m = int(n_layers) + 2
    if profile.n_units != m:
        raise KitError(f"profile {profile.device_type} is for model {profile.model} with {profile.n_units} units, "
                       f"the plan's model has {m}")
    ph = profile.config.get("hidden_size")
    if hidden is not None and ph is not None and int(ph) != int(hidden):
        raise KitError(f"profile {profile.device_type} is for model {profile.model} with hidden size {ph}, "
                       f"the plan's model has {hidden}")


def scale_times(profile: Profile, factor: float, device_type: str | None = None) -> Profile:
    """A copy with every time multiplied by `factor` (e.g. a slower device of the same family)."""
    def s(x):
        return None if x is None else x * factor
    units = tuple(replace(u, prefill_ms=u.prefill_ms * factor, decode_ms=u.decode_ms * factor,
                          prefill_min_ms=s(u.prefill_min_ms), prefill_max_ms=s(u.prefill_max_ms),
                          decode_ms_by_kv={k: v * factor for k, v in u.decode_ms_by_kv.items()},
                          decode_min_ms_by_kv={k: v * factor for k, v in u.decode_min_ms_by_kv.items()},
                          decode_max_ms_by_kv={k: v * factor for k, v in u.decode_max_ms_by_kv.items()})
                  for u in profile.units)
    overhead = {k: (v * factor if isinstance(v, (int, float)) and k.endswith("_ms") else v)
                for k, v in profile.overhead.items()}
    meta = {**profile.meta, "scaled_by": factor, "scaled_from": profile.device_type}
    return replace(profile, units=units, overhead=overhead, meta=meta, device_type=device_type or profile.device_type)


