"""Faults while deploying (docs/runtime.md, Faults): a worker stopped (SIGSTOP) in any phase is reported within the
silence bound, naming its stage, device and host; a slow load that keeps sending PROGRESS is not a fault.

Phases of a 3-stage local deployment of the tiny checkpoint, stage 1 (device d1) the victim:
spawn (stopped right after fork/exec, before it prints its listening line), listening (stopped once it listens,
before the coordinator's handshake), configuring (stopped as its CONFIG arrives, so stage 0 cannot reach it: the
fault must not be blamed on stage 0), loading (stopped 1 s into a slow load) and generating (stopped mid-run).
Each test prints the measured detection time; the assertion is the default bound plus generous slack (contended CI).
"""

import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.runtime import launch, liveness
from edgeshard_kit.runtime.deployment import PipelineError, deploy
from edgeshard_kit.runtime.launch import LaunchOptions
from edgeshard_kit.runtime.launchers import LocalLauncher
from edgeshard_kit.runtime.protocol import SILENCE_S, new_token
from edgeshard_kit.runtime.ssh_launcher import SSHLauncher
from edgeshard_kit.testbed.inventory import Device

from helpers import plan_of
from test_ssh import sshd  # noqa: F401  (the throwaway sshd fixture)

SLACK_S = 15.0  # the bound is SILENCE_S (5 s); a 2-core machine shared by many jobs may add seconds
PLAN = (("d0", 0, 2), ("d1", 2, 3), ("d2", 3, 4))  # tiny checkpoint: 2 layers, units [0, 4)

# A worker interpreter for tests only: it wraps `python -m edgeshard_kit.runtime.worker` and, as configured,
# sleeps in every stage's load (a slow disk) and/or stops itself (SIGSTOP) at a phase, stamping the time first.
WRAPPER = '''
import os, signal, sys, time
from edgeshard_kit.model import stage
from edgeshard_kit.runtime import worker

DELAY, STOP_AT, STOP_STAGE, STAMP = {delay!r}, {stop_at!r}, {stop_stage!r}, {stamp!r}

def stop_here():
    with open(STAMP, "w") as f:
        f.write(f"{{os.getpid()}} {{time.time()}}")
    os.kill(os.getpid(), signal.SIGSTOP)

_configure, _init = worker.Worker._configure, stage.StageModel.__init__

def configure(self, conn, meta):
    if STOP_AT == "config" and meta.get("stage") == STOP_STAGE:
        stop_here()
    return _configure(self, conn, meta)

def init(self, checkpoint, start, end, *a, **k):
    if STOP_AT == "loading" and start == dict({plan_units!r})[STOP_STAGE]:
        time.sleep(1.0)
        stop_here()
    time.sleep(DELAY)
    _init(self, checkpoint, start, end, *a, **k)

worker.Worker._configure, stage.StageModel.__init__ = configure, init
assert sys.argv[1:3] == ["-m", "edgeshard_kit.runtime.worker"], sys.argv
sys.exit(worker.main(sys.argv[3:]))
'''


def _wrapper(tmp_path: Path, delay: float = 0.0, stop_at: str | None = None, stop_stage: int = 1) -> str:
    """An executable "python" for LocalLauncher(python=...) that runs the worker through WRAPPER."""
    code = tmp_path / "slow_worker.py"
    code.write_text(WRAPPER.format(delay=delay, stop_at=stop_at, stop_stage=stop_stage,
                                   stamp=str(tmp_path / "stopped"), plan_units=[(i, s[1]) for i, s in enumerate(PLAN)]))
    exe = tmp_path / "python"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} {code} \"$@\"\n")
    exe.chmod(0o755)
    return str(exe)


class Victim:
    """The stopped worker: its pid and when it was stopped (time.time()); always resumed and killed at the end."""

    def __init__(self, stamp: Path | None = None):
        self.pid: int | None = None
        self.t: float | None = None
        self.stamp = stamp

    def stop(self, pid: int) -> None:
        self.pid, self.t = pid, time.time()
        os.kill(pid, signal.SIGSTOP)

    def read_stamp(self) -> None:
        if self.pid is None and self.stamp is not None and self.stamp.exists():
            pid, t = self.stamp.read_text().split()
            self.pid, self.t = int(pid), float(t)

    def release(self) -> None:
        self.read_stamp()
        if self.pid is not None:
            _resume_and_kill(self.pid)


def _resume_and_kill(pid: int) -> None:
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _stopping_launcher(victim: Victim, device: str, at: str) -> type:
    """A LocalLauncher that stops `device`'s worker right after spawning it (`at`="spawn") or once it listens."""

    class Stopping(LocalLauncher):
        def _spawn(self, dev, *args):
            proc = super()._spawn(dev, *args)
            if at == "spawn" and dev.name == device:
                victim.stop(proc.pid)
            return proc

        def start(self, dev, token, port=0, abort=None):
            h = super().start(dev, token, port, abort)
            if at == "listening" and dev.name == device:
                victim.stop(h.pid)
            return h

    return Stopping


def _workers_of(me: psutil.Process) -> list[int]:
    out = []
    for p in me.children(recursive=True):
        try:
            if "edgeshard_kit.runtime.worker" in " ".join(p.cmdline()):
                out.append(p.pid)
        except psutil.Error:
            pass
    return out


def _gone(pids: list[int]) -> bool:
    def dead(p):
        try:
            return psutil.Process(p).status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True
    return all(dead(p) for p in pids)


def _expect_fault(run, victim: Victim, words: str) -> float:
    """Run `run()`; it must raise a PipelineError naming stage 1, device d1, its host and `words`; seconds taken."""
    before = set(_workers_of(psutil.Process()))
    seen: set[int] = set()
    poll = threading.Event()

    def collect():  # the deployment's worker pids, to check none is left afterwards
        while not poll.wait(0.2):
            seen.update(p for p in _workers_of(psutil.Process()) if p not in before)

    watcher = threading.Thread(target=collect, daemon=True)
    watcher.start()
    try:
        with pytest.raises(PipelineError) as err:
            run()
        raised = time.time()
    finally:
        poll.set()
        watcher.join()
        victim.release()
    victim.read_stamp()
    assert victim.t is not None, "the worker was never stopped"
    took = raised - victim.t
    msg = str(err.value)
    kept = re.search(r"\(log (\S+)\)$", msg)  # a worker that did not start keeps its log: the message names it
    if kept:
        Path(kept.group(1)).unlink(missing_ok=True)
    print(f"\n{words!r}: reported {took:.2f} s after SIGSTOP: {msg[:300]}")
    assert "stage 1 (units 2:3) on device d1" in msg and "127.0.0.1" in msg and words in msg, msg
    assert took < SILENCE_S + SLACK_S, f"reported after {took:.1f} s"
    deadline = time.monotonic() + 15
    while not _gone(list(seen)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(list(seen)), "a worker of the failed deployment is still running"
    return took


@pytest.mark.slow
@pytest.mark.parametrize("at,words", [("spawn", "did not start listening"),
                                      ("listening", "did not complete the handshake")])
def test_worker_stopped_while_starting_is_named(tiny_checkpoint, local_testbed, monkeypatch, at, words):
    victim = Victim()
    monkeypatch.setattr(launch, "LocalLauncher", _stopping_launcher(victim, "d1", at))
    _expect_fault(lambda: deploy(plan_of(*PLAN), local_testbed(3), tiny_checkpoint), victim, words)


@pytest.mark.slow
@pytest.mark.parametrize("stop_at,words", [("config", "stopped answering"), ("loading", "while loading units 2:3")])
def test_worker_stopped_while_configuring_is_named(tiny_checkpoint, local_testbed, tmp_path, stop_at, words):
    """At CONFIG, stage 0 then tries to reach the stopped stage 1: the fault is stage 1's, not stage 0's."""
    victim = Victim(tmp_path / "stopped")
    opts = {"local": {"python": _wrapper(tmp_path, delay=0.0, stop_at=stop_at)}}
    _expect_fault(lambda: deploy(plan_of(*PLAN), local_testbed(3), tiny_checkpoint, launch_opts=opts), victim, words)


@pytest.mark.slow
def test_worker_stopped_while_generating_is_named(tiny_checkpoint, local_testbed):
    victim = Victim()
    dep = deploy(plan_of(*PLAN), local_testbed(3), tiny_checkpoint)
    timer = threading.Timer(1.0, victim.stop, args=(dep.handles[1].pid,))
    timer.start()
    try:
        _expect_fault(lambda: dep.generate([[5, 6, 7]], max_new_tokens=1900), victim, "stopped answering")
    finally:
        timer.cancel()
        dep.close()


@pytest.mark.slow
def test_slow_load_that_sends_progress_is_not_a_fault(tiny_checkpoint, local_testbed, tmp_path):
    """Every stage takes 2.5x the silence bound to load: PROGRESS frames keep it alive; tokens come back."""
    delay = 2.5 * SILENCE_S
    opts = {"local": {"python": _wrapper(tmp_path, delay=delay)}}
    with deploy(plan_of(*PLAN), local_testbed(3), tiny_checkpoint, launch_opts=opts) as dep:
        print("\nload seconds per stage:", [round(s.load_s, 1) for s in dep.info])
        assert all(s.load_s >= delay for s in dep.info), [s.load_s for s in dep.info]
        out = dep.generate([[5, 6, 7]], max_new_tokens=3)
    assert len(out.tokens[0]) == 3


def test_silence_bound_is_a_launch_option():
    opts = LaunchOptions.of({"local": {}, "silence_s": 2})
    assert opts.silence_s == 2.0 and opts.to_dict() == {"silence_s": 2.0}
    assert LaunchOptions.of(None).silence_s == SILENCE_S and LaunchOptions.of(None).to_dict() == {}
    for bad in (0, -1, "5", True, float("nan")):
        with pytest.raises(KitError, match="launch options: silence_s must be a number of seconds > 0"):
            LaunchOptions.of({"silence_s": bad})


def test_a_stall_of_the_coordinator_is_not_a_workers_silence(monkeypatch):
    """Clocks with a fake perf_counter: the coordinator's own 30 s stall does not count; worker silence does."""
    now = [100.0]
    monkeypatch.setattr(liveness.time, "perf_counter", lambda: now[0])
    c = liveness.Clocks(2)
    now[0] += 0.5
    c.heard(1)
    c.advance()
    now[0] += 30.0  # the loop did not run for 30 s (e.g. every core busy elsewhere)
    c.advance()
    assert c.silent(0) == pytest.approx(0.5) and c.silent(1) == pytest.approx(0.0)
    for _ in range(20):  # then 10 s of the loop running every 0.5 s, nothing heard from worker 0
        now[0] += 0.5
        c.advance()
    c.heard(1)
    assert c.silent(0) == pytest.approx(10.5) and c.silent(1) == 0.0


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="the throwaway sshd logs in as root: needs root")
@pytest.mark.skipif(not os.path.exists("/usr/sbin/sshd"), reason="needs /usr/sbin/sshd (apt-get install openssh-server)")
def test_ssh_worker_stopped_at_spawn_is_named(sshd, tmp_path):
    """The SSH launcher reads the remote process's state: a worker stopped at spawn is reported within the bound."""
    py = tmp_path / "python"  # stops itself (SIGSTOP) when started as the worker, not for the preflight check
    py.write_text(f"#!/bin/sh\ncase \"$*\" in *runtime.worker*) echo $$ > {tmp_path}/pid; kill -STOP $$;; esac\n"
                  f"exec {sys.executable} \"$@\"\n")
    py.chmod(0o755)
    dev = Device(name="box0", type="cpu", memory_bytes=1 << 30, launch="ssh", host="box", python=str(py))
    launcher = SSHLauncher(ssh_config=sshd["config"], known_hosts=sshd["known_hosts"], bind="127.0.0.1")
    pid_file = tmp_path / "pid"
    try:
        with pytest.raises(KitError) as err:
            launcher.start(dev, new_token())
        raised = time.time()
    finally:
        pid = int(pid_file.read_text()) if pid_file.exists() else None
        if pid is not None:
            _resume_and_kill(pid)
    took = raised - pid_file.stat().st_mtime  # the file was written just before it stopped itself
    msg = str(err.value)
    print(f"\nSSH spawn: reported {took:.2f} s after SIGSTOP: {msg[:300]}")
    assert "device box0" in msg and "127.0.0.1" in msg and "did not start listening" in msg and "stopped" in msg, msg
    assert took < SILENCE_S + SLACK_S
    assert pid is not None and _gone([pid])
