"""The emulated testbed's CPU: quotas fitted to the host's cores (experiments.testbeds.fit_cpu) and the kit's cgroups
weighted above the host's other processes (testbed.cgroups.CPU_SHARES), so that a device runs at its quota."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from edgeshard_kit.experiments.testbeds import EMULATED, fit_cpu
from edgeshard_kit.testbed import cgroups
from edgeshard_kit.testbed.inventory import load_testbed, testbed_from_dict


def test_fit_cpu_scales_every_quota_alike_to_fit_the_cores():
    tb = load_testbed(EMULATED)
    quotas = {d.name: d.cpu_quota for d in tb.devices}
    fitted = fit_cpu(tb, cores=2)
    got = {d.name: d.cpu_quota for d in fitted.devices}
    assert sum(got.values()) == pytest.approx(2.0, abs=1e-3)
    factor = 2.0 / sum(quotas.values())  # the file's ratios between devices are kept
    assert all(got[n] == pytest.approx(q * factor, abs=1e-4) for n, q in quotas.items())
    assert all(d.threads() == 1 for d in fitted.devices)  # no device gets more torch threads than a core
    assert fit_cpu(tb, cores=64) is tb  # quotas that fit are left alone


def _one_device(name: str):
    return testbed_from_dict({"name": name, "devices": [
        {"name": "a", "type": "t", "memory": "1GiB", "source": True, "launch": "ssh", "host": "10.0.0.1",
         "cpu_quota": 0.25}], "links": {"default": {"mbps": 100}}}, "test")


@pytest.mark.skipif(os.geteuid() != 0 or cgroups.unavailable() is not None,
                    reason="needs root and the cgroup v1 cpu controller")
def test_device_cgroups_weigh_more_than_a_host_process():
    tb = _one_device(f"esfit{uuid.uuid4().hex[:6]}")
    dev = tb.devices[0]
    try:
        cgroups.setup(tb, dev)
        cpu = cgroups.testbed_dir(tb, "cpu") / dev.name
        for level in (cpu, cpu.parent, cpu.parent.parent):  # device, testbed, the kit's subtree
            assert int((level / "cpu.shares").read_text()) == cgroups.CPU_SHARES > 1024 * (os.cpu_count() or 1)
        root_shares = int((Path(cgroups.CGROUP_ROOT) / "cpu" / "cpu.shares").read_text())
        assert cgroups.CPU_SHARES >= 16 * root_shares
        assert cgroups.limits(tb, dev)["cpu_quota"] == pytest.approx(0.25)
    finally:
        cgroups.remove(tb, cgroups.all_dirs(tb))
