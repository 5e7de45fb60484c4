"""Faults: a worker killed (SIGKILL) or frozen (SIGSTOP) mid-generation gives a clear error and leaves no process."""

import os
import signal
import threading
import time

import psutil
import pytest

from edgeshard_kit.runtime.deployment import PipelineError, deploy
from edgeshard_kit.planning.plan import Plan
from edgeshard_kit.core.units import Stage

BOUND_S = 10.0  # the documented bound: the coordinator names the failed stage within this many seconds


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint_factory):
    return tiny_checkpoint_factory(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=320, seed=2)


def _deploy(ckpt, tb):
    """Three workers on d0 (the source), d1 and d2 of `tb`: units [0, 2), [2, 3), [3, 4)."""
    plan = Plan("latency", (Stage("d0", 0, 2), Stage("d1", 2, 3), Stage("d2", 3, 4)), 0.0, 0.0, 0.0)
    return deploy(plan, tb, ckpt)


def _gone(pids):
    return all(not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in pids)


@pytest.mark.slow
@pytest.mark.parametrize("sig,words", [(signal.SIGKILL, "died"), (signal.SIGSTOP, "stopped answering")])
def test_worker_fault_mid_generation(ckpt, local_testbed, sig, words):
    dep = _deploy(ckpt, local_testbed(3))
    pids = [h.pid for h in dep.handles]
    victim = dep.handles[1]
    hit = {}

    def strike():
        hit["t"] = time.monotonic()
        os.kill(victim.pid, sig)

    timer = threading.Timer(1.5, strike)
    timer.start()
    try:
        with pytest.raises(PipelineError) as err:
            dep.generate([[5, 6, 7]], max_new_tokens=1900)  # long enough to be cut off mid-generation
    finally:
        timer.cancel()
        dep.close()
    raised = time.monotonic()
    msg = str(err.value)
    assert "stage 1" in msg and "device d1" in msg and f"{victim.host}:{victim.port}" in msg and words in msg
    assert raised - hit["t"] <= BOUND_S
    assert dep.closed
    deadline = time.monotonic() + 10
    while not _gone(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(pids), "a worker process of the deployment is still running"


COORDINATOR = """
import sys, time
sys.path.insert(0, {tests!r})
from edgeshard_kit.testbed.inventory import testbed_from_dict
from test_pipeline_faults import _deploy
dep = _deploy({ckpt!r}, testbed_from_dict({testbed!r}))
print(" ".join(str(h.pid) for h in dep.handles), flush=True)
time.sleep(120)
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_no_worker_outlives_its_coordinator(ckpt, local_testbed, sig, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    code = COORDINATOR.format(tests=str(Path(__file__).parent), ckpt=str(ckpt), testbed=local_testbed(3).to_dict())
    # TMPDIR: the workers' logs, which a SIGKILLed coordinator leaves for a post-mortem, go with the test's folder
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 3 and all(psutil.pid_exists(p) for p in pids)
        proc.send_signal(sig)  # SIGTERM: atexit + handler stop the workers; SIGKILL: workers see their control EOF
        proc.wait(30)
    finally:
        proc.kill()
    deadline = time.monotonic() + 15
    while not _gone(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(pids)
