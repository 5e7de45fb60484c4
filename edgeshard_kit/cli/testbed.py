"""`edgeshard testbed` (check/show an inventory; up, down, status of the emulated one), `ssh check` and `probe`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgeshard_kit.cli.main import COMMANDS
from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.numbers import format_size, parse_size
from edgeshard_kit.model import hub
from edgeshard_kit.runtime.probe import checkpoint_message_sizes, probe_testbed
from edgeshard_kit.runtime.ssh_launcher import check_devices
from edgeshard_kit.testbed.access import CONNECT_TIMEOUT_S
from edgeshard_kit.testbed.inventory import load_testbed
from edgeshard_kit.testbed.netns import testbed_down, testbed_status, testbed_up


def _cmd_show(args) -> int:
    tb = load_testbed(args.file)
    print(f"testbed {tb.name} ({tb.emulation} emulation{', subnet ' + tb.subnet if tb.subnet else ''})")
    for dev in tb.devices:
        tags = ",".join(t for t, on in (("source", dev.source), ("cloud", dev.cloud)) if on)
        reach = dev.ssh_alias or f"{dev.user + '@' if dev.user else ''}{dev.address or dev.host}:{dev.port}"
        reach += f" via {dev.via}" if dev.via else ""
        print(f"  {dev.name:12s} {dev.type:16s} {format_size(dev.memory_bytes):>8s}  {dev.launch:5s} "
              f"{reach if dev.launch == 'ssh' or tb.emulation == 'netns' else '127.0.0.1':24s} {tags}")
    d = tb.default
    print(f"  links: default {d.mbps if d.shaped else 'unshaped'} Mbps, {d.latency_ms} ms")
    for ln in tb.links:
        print(f"    {ln.src} -> {ln.dst}: {ln.mbps if ln.shaped else 'unshaped'} Mbps, {ln.latency_ms} ms")
    return 0


def _add_show(tsub) -> None:
    for name in ("show", "check"):
        p = tsub.add_parser(name, help="validate a testbed inventory and print its devices and links")
        p.add_argument("file", help="testbed YAML")
        p.set_defaults(func=_cmd_show)


def _print_status(st: dict) -> None:
    print(f"testbed {st['name']}: bridge {st['bridge']} {'up' if st['bridge_up'] else 'absent'} "
          f"({st['bridge_address']}), state {st['state_dir']}")
    for name, d in st["devices"].items():
        quota = d.get("cpu_quota")
        mem = d.get("mem_limit_bytes")
        mem_s = "-" if mem is None else ("unlimited" if mem >= 2**62 else format_size(mem))
        print(f"  {name:10s} {d['namespace']:24s} {'up' if d['exists'] else 'absent':6s} {d['address']:15s} "
              f"sshd {d['sshd_pid'] or 'down'}  cpu {quota if quota is not None else '-'}  mem {mem_s}"
              + (f"  behind {d['via']}" if d.get("via") else ""))
        for line in d.get("classes", []):
            print(f"      {line}")


def _cmd_up(args) -> int:
    tb = load_testbed(args.file)
    st = testbed_up(tb)
    print(f"testbed {tb.name} is up: {len(st.namespaces)} namespaces on {st.bridge} ({st.subnet})")
    print(f"  ssh -F {st.ssh_config} {tb.source.name} true")
    if tb.default.latency_ms or any(ln.latency_ms for ln in tb.links):
        print("  note: latency_ms is not emulated in netns mode (no netem here); only bandwidth is shaped")
    return 0


def _cmd_down(args) -> int:
    for item in testbed_down(load_testbed(args.file)):
        print(f"removed {item}")
    return 0


def _cmd_status(args) -> int:
    st = testbed_status(load_testbed(args.file))
    print(json.dumps(st, indent=1)) if args.json else _print_status(st)
    return 0


def _add_testbed(sub) -> None:
    """`edgeshard testbed up/down/status/show/check FILE`."""
    p = sub.add_parser("testbed", help=COMMANDS["testbed"][1])
    tsub = p.add_subparsers(dest="testbed_cmd", metavar="ACTION", required=True)
    for name, func, text in (("up", _cmd_up, "make namespaces, bridge, sshd, cgroups, tc (root; idempotent)"),
                             ("down", _cmd_down, "remove everything `up` made (also after a crash)"),
                             ("status", _cmd_status, "print devices, addresses, sshd, cgroup limits, qdiscs")):
        q = tsub.add_parser(name, help=text)
        q.add_argument("file", help="testbed YAML with emulation: {mode: netns}")
        if name == "status":
            q.add_argument("--json", action="store_true", help="print the status as JSON")
        q.set_defaults(func=func)
    _add_show(tsub)


# ---- ssh check ----------------------------------------------------------------------------------------------
def _cmd_ssh_check(args: argparse.Namespace) -> int:
    tb = load_testbed(args.file)
    if not args.device and not any(d.launch == "ssh" for d in tb.devices):
        print(f"testbed {tb.name}: no device has launch: ssh")
        return 0
    results = check_devices(tb, args.device, model_path=args.model_path, ssh_config=args.ssh_config,
                            known_hosts=args.known_hosts, accept_new_host_keys=args.accept_new_host_keys,
                            connect_timeout=args.timeout)
    for r in results:
        if "error" in r:
            print(f"{r['device']:12s} FAIL  {r['error']}")
        else:
            print(f"{r['device']:12s} ok    {r['where']}  python {r['python_version']} ({r['python']})  "
                  f"edgeshard-kit {r['kit_version']}  model {r['model_path'] or '(coordinator path, not checked)'}")
        for line in _path_lines(r.get("path") or []):
            print(f"{'':18s}{line}")
    return 2 if any("error" in r for r in results) else 0


def _path_lines(path: list[dict]) -> list[str]:
    """The SSH path of a device: the hops in order, then each hop's effective user, port, key and known_hosts."""
    if not path:
        return []
    lines = ["path: coordinator -> " + " -> ".join(f"{h['name']} ({h['where']})" for h in path)]
    for i, h in enumerate(path):
        role = "device" if i == len(path) - 1 else "jump"
        keys = ", ".join(h["keys"]) or "none"
        keys += " + agent" if h["agent"] else ""
        extra = f", ProxyCommand {h['proxy_command']}" if h.get("proxy_command") else ""
        lines.append(f"{role} {h['name']}: user {h['user']}, port {h['port']}, key {keys}, known_hosts "
                     f"{', '.join(h['known_hosts'])} (host key as {h['host_key_name']}){extra}")
    return lines


def _add_ssh(sub) -> None:
    """`edgeshard ssh check FILE`: preflight of the testbed's SSH devices."""
    p = sub.add_parser("ssh", help=COMMANDS["ssh"][1])
    ssub = p.add_subparsers(dest="ssh_cmd", metavar="ACTION", required=True)
    c = ssub.add_parser("check", help="connect to each SSH device; check python, edgeshard_kit and the model path")
    c.add_argument("file", help="testbed inventory (YAML)")
    c.add_argument("--device", action="append", help="only this device (repeatable)")
    c.add_argument("--ssh-config", help="ssh config file (default ~/.ssh/config)")
    c.add_argument("--known-hosts", help="known_hosts file (default ~/.ssh/known_hosts)")
    c.add_argument("--accept-new-host-keys", action="store_true", help="lab testbeds: accept and save unknown host keys")
    c.add_argument("--model-path", help="checkpoint path on the hosts, for devices without model_path")
    c.add_argument("--timeout", type=float, default=CONNECT_TIMEOUT_S, help="connection timeout, s")
    c.set_defaults(func=_cmd_ssh_check)


# ---- probe --------------------------------------------------------------------------------------------------
def _cmd_probe(args: argparse.Namespace) -> int:
    tb = load_testbed(args.testbed)
    if args.sizes:
        sizes = tuple(parse_size(s.strip(), "--sizes") for s in args.sizes.split(",") if s.strip())
    else:  # what a deployment of the model sends per decode step: the token id and one activation
        model = Path(args.model) if args.model else hub.model_dir()
        if not hub.is_checkpoint(model):
            raise KitError(f"--model: {model} is not a converted checkpoint (run `edgeshard fetch-model`, or give "
                           f"--sizes)")
        sizes = checkpoint_message_sizes(model, dtype_bytes=4 if args.dtype == "float32" else 2)
        print(f"probing at the message sizes of {model.name} ({args.dtype}): {', '.join(map(str, sizes))} bytes")
    out = probe_testbed(tb, sizes, args.repeats)
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{'src':>12s} -> {'dst':12s} {'bytes':>10s} {'median ms':>10s} {'Mbps':>10s}")
    for r in out["records"]:
        mbps = f"{r['mbps']:.1f}" if r["mbps"] else "-"
        print(f"{r['src']:>12s} -> {r['dst']:12s} {r['bytes']:>10d} {r['ms_median']:>10.3f} {mbps:>10s}")
    print("links section for the testbed / planner:")
    print(json.dumps(out["links"], indent=1))
    return 0


def _add_probe(sub) -> None:
    p = sub.add_parser("probe", help=COMMANDS["probe"][1])
    p.add_argument("--testbed", required=True, help="testbed inventory YAML")
    p.add_argument("--sizes", default=None,
                   help="payload sizes, e.g. 8,2304,64KiB (default: the token and the decode activation of --model)")
    p.add_argument("--model", default=None, help="checkpoint whose message sizes to probe (default: the kit's "
                                                 "default model, SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="activation dtype of the deployment (default float32)")
    p.add_argument("--repeats", type=int, default=3, help="repeats per size after one warm-up (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object {records, links}")
    p.set_defaults(func=_cmd_probe)


def add_parsers(sub) -> None:
    """Register `edgeshard testbed`, `edgeshard ssh` and `edgeshard probe`."""
    _add_testbed(sub)
    _add_ssh(sub)
    _add_probe(sub)
