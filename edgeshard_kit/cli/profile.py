"""The `edgeshard profile`, `profile-show` and `devices` commands: measure or estimate profiles, print them and the device catalog."""

from __future__ import annotations

import json
import sys

from edgeshard_kit.cli.main import COMMANDS
from edgeshard_kit.core.errors import KitError
from edgeshard_kit.profiling.analytic import analytic_profile
from edgeshard_kit.profiling.catalog import CATALOG, GB, get_device
from edgeshard_kit.profiling.measure import measure_profile, parse_kv_lens
from edgeshard_kit.profiling.profile import Profile, load_profile, profiles_frame, save_profile


def _emit(profile: Profile, out: str, as_json: bool) -> None:
    if out == "-":
        sys.stdout.write(profile.to_json() + "\n")  # for SSH: stdout carries the JSON and nothing else
        return
    jp = save_profile(profile, out)
    limit = profile.bandwidth_limit_ms()
    if as_json:
        print(json.dumps({"profile": str(jp), "csv": str(jp.with_suffix(".csv")),
                          "device_type": profile.device_type, "n_units": profile.n_units,
                          "decode_ms_per_token": profile.predict_decode_ms(),
                          "prefill_ms": profile.predict_prefill_ms(), "compiled": profile.compiled,
                          "compile_s": profile.meta.get("compile_s"), "mem_bw_gbs": profile.mem_bw_gbs,
                          "bandwidth_limit_ms": limit,
                          "ratio_to_limit": profile.predict_decode_ms() / limit if limit else None}))
    else:
        print(profile.summary())
        if profile.compiled:
            print(f"compiled decode: {profile.meta.get('compile_s') or 0:.1f} s spent compiling")
        print(f"wrote {jp} and {jp.with_suffix('.csv')}")


def cmd_profile(args) -> int:
    """`edgeshard profile`: measure (--model) or estimate (--analytic) and write the profile."""
    kv_lens = parse_kv_lens(args.kv_lens)
    if args.analytic:
        if args.compile:
            raise KitError("--compile times the compiled decode path: it needs --model, not --analytic")
        if not args.device_type:
            raise KitError("--analytic needs --device-type NAME (see `edgeshard devices`)")
        prof = analytic_profile(args.analytic, args.device_type, dtype=args.dtype, batch=args.batch,
                                prompt_len=args.prompt_len, kv_lens=kv_lens)
    elif args.model:
        prof = measure_profile(args.model, device=args.device, dtype=args.dtype, batch=args.batch,
                               prompt_len=args.prompt_len, kv_lens=kv_lens, repeats=args.repeats,
                               warmup=args.warmup, device_type=args.device_type, progress=not args.quiet,
                               threads=args.threads, compile=args.compile)
    else:
        raise KitError("give --model DIR (measure) or --analytic MODEL (roofline estimate)")
    _emit(prof, args.out, args.json)
    return 0


def cmd_profile_show(args) -> int:
    """`edgeshard profile-show`: print profiles as a tidy table."""
    import pandas as pd

    profs = [load_profile(p) for p in args.paths]
    for p in profs:
        print(p.summary())
    with pd.option_context("display.width", 200, "display.max_rows", 400):
        print(profiles_frame(profs).to_string(index=False))
    return 0


def cmd_devices(args) -> int:
    """`edgeshard devices`: print the catalog (with --sources, where each figure came from)."""
    names = sorted(CATALOG) + (["this-machine"] if args.this_machine else [])
    if args.json:
        print(json.dumps([get_device(n).to_dict() for n in names], indent=1))
        return 0
    print(f"{'device type':24} {'kind':4} {'memory GB':>9} {'GB/s':>7} {'fp32 TFLOPS':>11} {'fp16 TFLOPS':>11}")
    for n in names:
        d = get_device(n)
        print(f"{d.name:24} {d.kind:4} {d.memory_bytes / GB:9.1f} {d.mem_bw_gbs:7.1f} "
              f"{d.peak_flops['float32'] / 1e12:11.2f} {d.peak_flops['float16'] / 1e12:11.2f}")
        if args.sources:
            for k, v in d.sources.items():
                print(f"    {k}: {v}")
    if not args.this_machine:
        print("(this-machine: measured on demand; `edgeshard devices --this-machine`)")
    return 0


def add_parsers(sub) -> None:
    """Register `edgeshard profile`, `profile-show` and `devices`."""
    p = sub.add_parser("profile", help=COMMANDS["profile"][1])
    p.add_argument("--model", help="checkpoint directory to measure")
    p.add_argument("--analytic", metavar="MODEL",
                   help="roofline estimate instead: llama2-7b|llama2-13b|llama2-70b or a checkpoint/config.json")
    p.add_argument("--device", default="cpu", help="torch device to measure on: cpu, cuda:0 (default cpu)")
    p.add_argument("--device-type", default=None,
                   help="device type name recorded in the profile (default: cpu-<host> / gpu name); catalog name with --analytic")
    p.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16 (default float32)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens timed for prefill (default 32)")
    p.add_argument("--kv-lens", default="32,64,128", help="cached tokens at which decode is timed (default 32,64,128)")
    p.add_argument("--repeats", type=int, default=20, help="timed repeats per figure (median, min, max kept)")
    p.add_argument("--warmup", type=int, default=3, help="untimed repeats first")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true",
                   help="also time decode on the compiled path (static KV cache + torch.compile) and record the "
                        "profile as compiled: plan `--compile` runs with it (the first step compiles: minutes on CPU)")
    p.add_argument("--out", required=True, help="PATH.json (a PATH.csv twin is written too); '-' = JSON on stdout only")
    p.add_argument("--json", action="store_true", help="print a JSON summary line instead of text")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_profile)
    s = sub.add_parser("profile-show", help=COMMANDS["profile-show"][1])
    s.add_argument("paths", nargs="+", help="profile JSON files")
    s.set_defaults(func=cmd_profile_show)
    d = sub.add_parser("devices", help=COMMANDS["devices"][1])
    d.add_argument("--sources", action="store_true", help="print where every figure came from")
    d.add_argument("--this-machine", action="store_true", help="also measure this host (about 2 s)")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_devices)
