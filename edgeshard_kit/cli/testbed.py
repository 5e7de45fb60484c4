"""The `edgeshard testbed` commands: check/show an inventory; up, down and status of the emulated testbed."""

from __future__ import annotations

import json

from edgeshard_kit.testbed.netns import testbed_down, testbed_status, testbed_up
from edgeshard_kit.testbed.inventory import format_size, load_testbed


def _cmd_show(args) -> int:
    tb = load_testbed(args.file)
    print(f"testbed {tb.name} ({tb.emulation} emulation{', subnet ' + tb.subnet if tb.subnet else ''})")
    for dev in tb.devices:
        tags = ",".join(t for t, on in (("source", dev.source), ("cloud", dev.cloud)) if on)
        reach = dev.ssh_alias or f"{dev.user + '@' if dev.user else ''}{dev.address or dev.host}:{dev.port}"
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
              f"sshd {d['sshd_pid'] or 'down'}  cpu {quota if quota is not None else '-'}  mem {mem_s}")
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


def add_commands(sub) -> None:
    """`edgeshard testbed up/down/status/show FILE`."""
    p = sub.add_parser("testbed", help="the testbed: validate an inventory; bring the emulated testbed up or down")
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
