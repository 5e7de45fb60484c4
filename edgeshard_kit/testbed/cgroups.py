"""cgroup v1 limits of the emulated testbed's devices: CPU quota (CFS), memory limit, cpuset; set, read back, removed.

A device's cgroups are /sys/fs/cgroup/{cpu,memory,cpuset}/edgeshard-kit/<testbed>/<device>; its sshd and
every process started over SSH (the worker) run inside them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.testbed.inventory import Device, Testbed

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_DIR = "edgeshard-kit"         # the kit's subtree under every controller
CONTROLLERS = ("cpu", "memory", "cpuset")
CFS_PERIOD_US = 2_000                # cpu.cfs_quota_us = cpu_quota * this period (>= 1 ms); a short period spreads the
                                     # throttling finely, so a quota of 0.5 acts like a CPU at half speed
# cpu.shares of the kit's cgroups (the kit's subtree, the testbed's, every device's): the CFS weight against the
# host's other processes. With the default 1024 the kit's whole subtree weighs as much as ONE busy process of the
# root cgroup, so on a busy host every emulated device got a sliver of a core (measured: 19% of a core for a device
# of 2 cores' quota, load 9 on 2 cores) and its speed was the host's load, not its quota. A high weight lets a device
# take its quota whenever it runs; the quota (cpu.cfs_quota_us) still caps it, so the host keeps the rest.
CPU_SHARES = 65536


def unavailable() -> str | None:
    """Why this host has no cgroup v1 CPU controller, or None."""
    if not (CGROUP_ROOT / "cpu" / "cpu.cfs_quota_us").exists():
        return f"the emulated testbed needs the cgroup v1 cpu controller ({CGROUP_ROOT / 'cpu'} is missing)"
    return None


def testbed_dir(tb: Testbed, controller: str) -> Path:
    return CGROUP_ROOT / controller / CGROUP_DIR / tb.name


def device_dirs(tb: Testbed, dev: Device) -> list[Path]:
    """The device's cgroup directories: cpu and memory, and cpuset when it is pinned."""
    ctrls = ["cpu", "memory"] + (["cpuset"] if dev.cpus else [])
    return [testbed_dir(tb, c) / dev.name for c in ctrls]


def cfs_limits(cpu_quota: float | None) -> tuple[int, int]:
    """(cpu.cfs_period_us, cpu.cfs_quota_us) for `cpu_quota` cores: the short period, lengthened only as far as
    the kernel's 1 ms minimum quota needs (0.1 cores: 10 ms period, 1 ms quota); (period, -1) = no limit."""
    if cpu_quota is None:
        return CFS_PERIOD_US, -1
    period = max(CFS_PERIOD_US, math.ceil(1000 / cpu_quota))
    return period, max(1000, round(cpu_quota * period))


def setup(tb: Testbed, dev: Device) -> list[Path]:
    """The device's cgroups with its CPU quota, memory limit and cpuset; returns their cgroup.procs files."""
    procs = []
    for d in device_dirs(tb, dev):
        ctrl = d.relative_to(CGROUP_ROOT).parts[0]
        if not (CGROUP_ROOT / ctrl).is_dir():
            raise KitError(f"cgroup v1 controller {ctrl} is not mounted at {CGROUP_ROOT / ctrl}")
        if ctrl == "cpuset":  # v1 cpuset: every level needs cpus and mems before a task may join
            for level in (d.parent.parent, d.parent, d):
                level.mkdir(exist_ok=True)
                for f in ("cpuset.cpus", "cpuset.mems"):
                    if not (level / f).read_text().strip():
                        (level / f).write_text((level.parent / f).read_text().strip())
            (d / "cpuset.cpus").write_text(",".join(map(str, dev.cpus)))
        d.mkdir(parents=True, exist_ok=True)
        if ctrl == "cpu":
            for level in (d.parent.parent, d.parent, d):  # the kit's subtree, the testbed, the device
                (level / "cpu.shares").write_text(str(CPU_SHARES))
            period, quota = cfs_limits(dev.cpu_quota)
            (d / "cpu.cfs_period_us").write_text(str(period))
            (d / "cpu.cfs_quota_us").write_text(str(quota))
        if ctrl == "memory":
            (d / "memory.limit_in_bytes").write_text(str(dev.mem_limit_bytes or -1))
        procs.append(d / "cgroup.procs")
    return procs


def limits(tb: Testbed, dev: Device) -> dict:
    """What the kernel holds for the device: cpu_quota (cores, None = unlimited), cgroup_procs, mem_limit_bytes."""
    out: dict = {}
    cpu, mem = testbed_dir(tb, "cpu") / dev.name, testbed_dir(tb, "memory") / dev.name
    if cpu.is_dir():
        out["cpu_shares"] = int((cpu / "cpu.shares").read_text())
        q = int((cpu / "cpu.cfs_quota_us").read_text())
        out["cpu_quota"] = None if q < 0 else q / int((cpu / "cpu.cfs_period_us").read_text())
        out["cgroup_procs"] = len((cpu / "cgroup.procs").read_text().split())
    if mem.is_dir():
        out["mem_limit_bytes"] = int((mem / "memory.limit_in_bytes").read_text())
    return out


def all_dirs(tb: Testbed, known: list[str] = ()) -> set[str]:
    """Every cgroup directory of the testbed: its devices', `known` ones, and leftovers of devices since removed."""
    mine = tuple(f"{testbed_dir(tb, c)}/" for c in CONTROLLERS)  # `known` (state.json) only inside the kit's subtree
    dirs = {str(d) for dev in tb.devices for d in device_dirs(tb, dev)}
    dirs |= {k for k in known if k.startswith(mine) and ".." not in Path(k).parts}
    for ctrl in CONTROLLERS:
        base = testbed_dir(tb, ctrl)
        dirs |= {str(p) for p in base.iterdir() if p.is_dir()} if base.is_dir() else set()
    return dirs


def pids(dirs: set[str]) -> set[int]:
    """The processes in these cgroups."""
    out: set[int] = set()
    for d in dirs:
        procs = Path(d) / "cgroup.procs"
        out |= {int(p) for p in procs.read_text().split()} if procs.exists() else set()
    return out


def remove(tb: Testbed, dirs: set[str]) -> list[str]:
    """Remove these (empty) cgroups, deepest first, then the kit's empty parents; what went."""
    removed = []
    for d in sorted(dirs, key=lambda s: -len(s)):
        if Path(d).is_dir():
            os.rmdir(d)
            removed.append(f"cgroup {d}")
    for ctrl in CONTROLLERS:  # empty kit parents: ours to remove, others' testbeds kept
        for parent in (testbed_dir(tb, ctrl), testbed_dir(tb, ctrl).parent):
            try:
                parent.rmdir()
            except OSError:
                pass
    return removed
