"""Build planning problems from profiles + testbed + workload (`build_problem`), and `edgeshard plan --dump-problem`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from edgeshard_kit.planning.problem import DeviceSpec, LinkSpec, Problem, Unit
from edgeshard_kit.core.units import KitError, unit_name


@dataclass(frozen=True)
class Workload:
    """What is generated: prompt and generated tokens, total batch, micro-batches it is cut into."""

    prompt_len: int = 32
    gen_tokens: int = 96
    batch: int = 1
    micro_batches: int = 1
    phase: str = "decode"  # "decode": unit time averaged over the generated tokens; "prefill": the prompt
    return_bytes: int | None = None  # bytes the last stage sends back; None = what the head outputs (logits)

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


def _unit_ms(profile: Any, workload: Workload) -> list[float]:
    """Per-unit ms of one step: decode averaged over the KV lengths of the generated tokens, or prefill."""
    if workload.phase == "prefill":
        return [float(x) for x in profile.prefill_ms()]
    kvs = range(workload.prompt_len, workload.prompt_len + max(workload.gen_tokens, 1))
    rows = [profile.decode_ms(kv) for kv in kvs]
    return [sum(r[u] for r in rows) / len(rows) for u in range(len(rows[0]))]


def build_problem(profiles: dict[str, Any], testbed: Any, workload: Workload | None = None,
                  runtime: dict | None = None) -> Problem:
    """The planning problem of `testbed` running the model of `profiles` (one per device type) on `workload`.

    `runtime` ({"stage_ms": {device type: ms}, "step_ms": ms}, from overheads.calibrate_runtime) adds the
    runtime's fixed costs per stage and per token; without it the model is the paper's.
    """
    workload = workload or Workload()
    runtime = runtime or {}
    stage_ms = runtime.get("stage_ms", {}) or {}
    if not profiles:
        raise KitError("build_problem: no profiles given")
    ref = next(iter(profiles.values()))
    n = ref.n_units
    for dtype, p in profiles.items():
        if p.n_units != n:
            raise KitError(f"profile {dtype!r} has {p.n_units} units, profile {ref.device_type!r} has {n}: "
                           f"profiles must be of the same model")
    mbs = workload.micro_batch_size
    pb = max(int(getattr(ref, "batch", 1) or 1), 1)  # profile byte figures are for the profile's batch
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
        devices.append(DeviceSpec(d.name, float(d.memory_bytes), tuple(_unit_ms(profiles[d.type], workload)),
                                  bool(d.source), bool(getattr(d, "cloud", False)), float(stage_ms.get(d.type, 0.0))))
    names = [d.name for d in testbed.devices]
    dl = testbed.default
    default = LinkSpec(dl.mbps, dl.latency_ms)
    pairs = []
    for a in names:  # every ordered pair that differs from the default is written out
        for b in names:
            if a != b:
                ln = testbed.link(a, b)
                if (ln.mbps, ln.latency_ms) != (default.mbps, default.latency_ms):
                    pairs.append((a, b, LinkSpec(ln.mbps, ln.latency_ms)))
    ret = float(outb[-1]) / pb * mbs if workload.return_bytes is None else float(workload.return_bytes)
    meta = {"model": getattr(ref, "model", ""), "workload": workload.to_dict(),
            "testbed": getattr(testbed, "name", ""), "profiles": {k: getattr(p, "model", "") for k, p in profiles.items()}}
    if runtime:
        meta["runtime_overheads"] = {"stage_ms": dict(stage_ms), "step_ms": float(runtime.get("step_ms", 0.0))}
    problem = Problem(units, tuple(devices), default, tuple(pairs), ret, mbs, meta, float(runtime.get("step_ms", 0.0)))
    from edgeshard_kit.planning.problem import problem_from_dict

    problem_from_dict(problem.to_dict())  # the same checks as a problem file (one source, lengths)
    return problem


def load_profiles(paths: list[str]) -> dict[str, Any]:
    """Profiles keyed by device type, from JSON files."""
    from edgeshard_kit.profiling.profile import load_profile

    out: dict[str, Any] = {}
    for p in paths:
        prof = load_profile(p)
        if prof.device_type in out:
            raise KitError(f"{p}: a second profile for device type {prof.device_type!r}")
        out[prof.device_type] = prof
    return out


def problem_from_args(args) -> Problem:
    """The problem of the CLI's --profiles / --testbed / workload flags."""
    from edgeshard_kit.testbed.inventory import load_testbed

    if not args.profiles or not args.testbed:
        raise KitError("give --problem FILE.json, or --profiles P1.json,P2.json and --testbed FILE.yaml")
    profiles = load_profiles([p for p in args.profiles.split(",") if p.strip()])
    wl = Workload(prompt_len=args.prompt_len, gen_tokens=args.gen_tokens, batch=args.batch,
                  micro_batches=args.micro_batches, phase=args.phase)
    return build_problem(profiles, load_testbed(args.testbed), wl)

