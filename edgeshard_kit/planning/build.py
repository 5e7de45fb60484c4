"""The one problem builder: profiles + testbed inventory + `Workload` -> `Problem` (`build_problem`), and profile files."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.units import unit_name
from edgeshard_kit.planning.problem import DeviceSpec, LinkSpec, Problem, TOKEN_ID_BYTES, Unit, problem_from_dict
from edgeshard_kit.profiling.profile import Profile, load_profile
from edgeshard_kit.testbed.inventory import Testbed

RETURNS = ("tokens", "logits")
FRAME_HEADER_BYTES = 110     # the kit's wire header of an activation or token frame (runtime.wire: about 100-120)
SEGMENT_BYTES = 1448         # TCP payload per segment at MTU 1500 (with TCP timestamps)
PACKET_OVERHEAD_BYTES = 66   # per segment on the link: Ethernet 14 + IPv4 20 + TCP 20 + timestamps 12


def wire_bytes(payload: float, frame_bytes: float = FRAME_HEADER_BYTES) -> float:
    """Bytes a shaper meters for one message of `payload` bytes: the frame header and every segment's headers."""
    n = payload + frame_bytes
    return n + PACKET_OVERHEAD_BYTES * math.ceil(n / SEGMENT_BYTES)


@dataclass(frozen=True)
class LinkModel:
    """How a message is priced on a shaped link, beyond the paper's latency + bytes x 8 / Mbps.

    A token-bucket shaper (the emulated testbed's tbf, testbed.nsnet) passes `burst_bytes` at line rate when
    the bucket is full: `idle` = the link idles between messages, as in sequential decode (one message per
    link per token), so a message costs max(0, wire bytes - burst) x 8 / Mbps; not idle = a busy, pipelined
    link, every wire byte at the rate. `measured`: (src, dst) -> (goodput Mbps, one-way latency ms) from
    `edgeshard probe` at the message sizes the model sends: the latency replaces the inventory's; the goodput
    replaces the rate only on a link without a known shaper (burst_bytes 0 or an unshaped link), where it
    already counts the headers. On a shaped link the rate stays the declared one (the shaper's), because a probe
    of bucket-sized messages measures the burst, not the rate. The problem's links are the lines through the costs of the two message
    sizes a link carries (the return token and the decode activation), exact at both.
    """

    burst_bytes: float = 0.0
    idle: bool = True
    measured: Mapping[tuple[str, str], tuple[float, float]] = field(default_factory=dict)
    frame_bytes: float = FRAME_HEADER_BYTES

    def message_ms(self, src: str, dst: str, declared: LinkSpec, nbytes: float) -> float:
        """ms for one message of `nbytes` payload from src to dst (declared: the inventory's link)."""
        mbps, lat = declared.mbps, declared.latency_ms
        if (src, dst) in self.measured:
            lat = self.measured[(src, dst)][1]
            if not (self.burst_bytes > 0 and math.isfinite(declared.mbps)):
                # No shaper we know of: the probe's goodput is the rate (it already counts the headers).
                goodput = self.measured[(src, dst)][0]
                return lat + (0.0 if math.isinf(goodput) else nbytes * 8.0 / (goodput * 1000.0))
        # A token-bucket shaper meters wire bytes at its rate: a probe's goodput at message sizes that fit the
        # bucket mixes the burst into the rate (counted twice if subtracted again), so the declared rate is kept.
        if math.isinf(mbps):
            return lat
        wire = wire_bytes(nbytes, self.frame_bytes)
        if self.idle:
            wire = max(0.0, wire - self.burst_bytes)
        return lat + wire * 8.0 / (mbps * 1000.0)

    def effective(self, src: str, dst: str, declared: LinkSpec, small: float, large: float) -> LinkSpec:
        """The LinkSpec whose latency + bytes x 8 / Mbps equals `message_ms` at `small` and `large` bytes."""
        t1, t2 = (self.message_ms(src, dst, declared, b) for b in (small, large))
        if large <= small or t2 <= t1:
            return LinkSpec(math.inf, max(t1, t2, 0.0))
        mbps = (large - small) * 8.0 / ((t2 - t1) * 1000.0)
        return LinkSpec(mbps, max(0.0, t1 - small * 8.0 / (mbps * 1000.0)))

    def to_dict(self) -> dict:
        return {"burst_bytes": self.burst_bytes, "idle": self.idle, "frame_bytes": self.frame_bytes,
                "measured": [{"src": a, "dst": b, "mbps": m, "latency_ms": lat}
                             for (a, b), (m, lat) in self.measured.items()]}


@dataclass(frozen=True)
class Workload:
    """What is generated: prompt and generated tokens, total batch, micro-batches it is cut into."""

    prompt_len: int = 32
    gen_tokens: int = 96
    batch: int = 1
    micro_batches: int = 1
    phase: str = "decode"  # "decode": unit time averaged over the generated tokens; "prefill": the prompt

    def __post_init__(self):
        for f in ("prompt_len", "gen_tokens", "batch", "micro_batches"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if f == "gen_tokens" else 1):
                raise KitError(f"workload.{f}: expected a positive integer, got {v!r}")
        if self.batch % self.micro_batches:
            raise KitError(f"workload: batch {self.batch} is not a multiple of micro_batches {self.micro_batches}")
        if self.phase not in ("decode", "prefill"):
            raise KitError(f"workload.phase: {self.phase!r} is not decode or prefill")

    @property
    def micro_batch_size(self) -> int:
        return self.batch // self.micro_batches

    def to_dict(self) -> dict:
        return asdict(self)


class FixedCosts(Protocol):
    """The runtime's fixed costs as the planner reads them (runtime.calibrate's `RuntimeCosts` is one)."""

    stage_ms: dict[str, float]  # device type -> ms every stage on such a device adds per step
    step_ms: float  # ms per token outside the stages
    # device type -> measured compute / profiled compute in the deployed runtime (1 = the profile as it is); optional


def _fixed_costs(runtime: FixedCosts | Mapping[str, Any] | None) -> tuple[dict[str, float], float, dict[str, float]]:
    """(stage_ms by device type, step_ms, compute_scale by device type) of a `FixedCosts` object or its dict form;
    none without. compute_scale multiplies a device type's profiled unit times (absent: 1)."""
    if not runtime:
        return {}, 0.0, {}
    get = runtime.get if isinstance(runtime, Mapping) else lambda k: getattr(runtime, k, None)
    scale = {str(k): float(v) for k, v in (get("compute_scale") or {}).items()}
    for t, v in scale.items():
        if not v > 0:
            raise KitError(f"runtime costs: compute_scale of {t!r} is {v} (must be > 0)")
    return dict(get("stage_ms") or {}), float(get("step_ms") or 0.0), scale


def _unit_ms(profile: Profile, workload: Workload) -> list[float]:
    """Per-unit ms of one step: decode averaged over the KV lengths of the generated tokens, or prefill."""
    if workload.phase == "prefill":
        return [float(x) for x in profile.prefill_ms()]
    kvs = range(workload.prompt_len, workload.prompt_len + max(workload.gen_tokens, 1))
    rows = [profile.decode_ms(kv) for kv in kvs]
    return [sum(r[u] for r in rows) / len(rows) for u in range(len(rows[0]))]


def _return_bytes(returns: str | float, head_out_bytes: float) -> float:
    """Bytes the last stage sends back to the source per sequence: "tokens" (an int64 id, what the runtime sends),
    "logits" (the head's output, what the paper's planning scripts price), or a byte count."""
    if returns == "tokens":
        return float(TOKEN_ID_BYTES)
    if returns == "logits":
        return float(head_out_bytes)
    if isinstance(returns, (int, float)) and not isinstance(returns, bool) and returns >= 0:
        return float(returns)
    raise KitError(f"returns: {returns!r} is not one of {', '.join(RETURNS)} or a byte count per sequence")


def build_problem(profiles: dict[str, Profile], testbed: Testbed, workload: Workload | None = None,
                  runtime: FixedCosts | Mapping[str, Any] | None = None, returns: str | float = "tokens",
                  links: LinkModel | None = None) -> Problem:
    """The planning problem of `testbed` running the model of `profiles` (one per device type) on `workload`.

    `runtime` (`stage_ms` by device type and `step_ms`: runtime.calibrate's `RuntimeCosts`, or a dict of
    the two) adds the runtime's fixed costs per stage and per token, and its optional `compute_scale` (device
    type -> measured / profiled compute in the deployed runtime) scales that type's unit times; without it the
    model is the paper's.
    `returns` prices the hop back to the source, per sequence of a micro-batch: "tokens" = 8 bytes (the
    runtime's int64 token ids), "logits" = the head's output bytes (the paper's scripts), or a byte count.
    `links` (a LinkModel): every link priced by the shaper's burst and the probe's measurements, at this
    workload's message sizes; without it every link is the inventory's (the paper's model).
    """
    workload = workload or Workload()
    stage_ms, step_ms, scale = _fixed_costs(runtime)
    if not profiles:
        raise KitError("build_problem: no profiles given")
    ref = next(iter(profiles.values()))
    n = ref.n_units
    for dtype, p in profiles.items():
        if p.n_units != n:
            raise KitError(f"profile {dtype!r} has {p.n_units} units, profile {ref.device_type!r} has {n}: "
                           f"profiles must be of the same model")
    mbs = workload.micro_batch_size
    pb = max(int(ref.batch or 1), 1)  # profile byte figures are for the profile's batch
    ctx = workload.prompt_len + workload.gen_tokens
    params = ref.param_bytes()
    kv = ref.kv_bytes_per_token()
    outb = ref.out_bytes_per_token()
    units = tuple(Unit(unit_name(u, n - 2), float(params[u]) + kv[u] / pb * ctx * workload.batch,
                       float(outb[u]) / pb * mbs) for u in range(n))
    devices = []
    for d in testbed.devices:
        if d.type not in profiles:
            raise KitError(f"testbed device {d.name!r} is of type {d.type!r}, but no profile is given for it "
                           f"(profiles: {', '.join(profiles)})")
        k = scale.get(d.type, 1.0)
        devices.append(DeviceSpec(d.name, float(d.memory_bytes), tuple(k * x for x in _unit_ms(profiles[d.type], workload)),
                                  bool(d.source), bool(d.cloud), float(stage_ms.get(d.type, 0.0))))
    names = [d.name for d in testbed.devices]
    dl = testbed.default
    default = LinkSpec(dl.mbps, dl.latency_ms)
    ret = _return_bytes(returns, float(outb[-1]) / pb) * mbs
    act = max(float(outb[u]) / pb * mbs for u in range(n - 1))  # a decode activation between two stages
    pairs = []
    for a in names:  # every ordered pair that differs from the default is written out
        for b in names:
            if a != b:
                ln = testbed.link(a, b)
                spec = LinkSpec(ln.mbps, ln.latency_ms)
                if links is not None:
                    spec = links.effective(a, b, spec, ret, act)
                if (spec.mbps, spec.latency_ms) != (default.mbps, default.latency_ms):
                    pairs.append((a, b, spec))
    meta = {"model": ref.model, "workload": workload.to_dict(), "returns": returns, "testbed": testbed.name,
            "profiles": {k: p.model for k, p in profiles.items()}}
    if runtime:
        meta["runtime_overheads"] = {"stage_ms": stage_ms, "step_ms": step_ms, **({"compute_scale": scale} if scale else {})}
    if links is not None:
        meta["link_model"] = links.to_dict()
    # tied embeddings: the head's bytes include unit 0's tensor, held once by a device that has both
    problem = Problem(units, tuple(devices), default, tuple(pairs), ret, mbs, meta, step_ms,
                      tied_bytes=float(ref.tied_bytes))
    problem_from_dict(problem.to_dict())  # the same checks as a problem file (one source, lengths)
    return problem


def load_profiles(paths: list[str]) -> dict[str, Profile]:
    """Profiles keyed by device type, from JSON files."""
    out: dict[str, Profile] = {}
    for p in paths:
        prof = load_profile(p)
        if prof.device_type in out:
            raise KitError(f"{p}: a second profile for device type {prof.device_type!r}")
        out[prof.device_type] = prof
    return out
