"""The worker process: survives garbage and bad tokens, reports a missing model path, exits with its coordinator."""

import socket

import psutil
import torch
import pytest

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.runtime import wire
from edgeshard_kit.runtime.launch import LaunchOptions, launcher_for, link_shape
from edgeshard_kit.runtime.launchers import LocalLauncher, worker_command
from edgeshard_kit.runtime.protocol import Kind, LinkShape, new_token
from edgeshard_kit.runtime.ssh_launcher import SSHLauncher
from edgeshard_kit.testbed.inventory import Device

DEV = Device(name="w0", type="cpu", memory_bytes=1 << 30)


@pytest.fixture(scope="module")
def worker():
    token = new_token()
    h = LocalLauncher().start(DEV, token)
    yield h, token
    h.stop()
    assert not h.alive()


def _raw(h, data: bytes) -> None:
    s = socket.create_connection((h.host, h.port), timeout=5)
    s.sendall(data)
    s.close()


def test_worker_command_and_launcher_for():
    argv = worker_command("python3", 0, "/tmp/tok", bind="127.0.0.1")
    assert argv == ["python3", "-m", "edgeshard_kit.runtime.worker", "--port", "0", "--token-file", "/tmp/tok",
                    "--bind", "127.0.0.1"]
    assert isinstance(launcher_for(DEV), LocalLauncher)


def test_worker_survives_garbage_wrong_token_and_truncation(worker):
    h, token = worker
    _raw(h, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # garbage
    _raw(h, wire.encode_frame("hello", nonce="zz", role="client")[:10])  # truncated frame, then EOF
    with pytest.raises(wire.AuthError):
        wire.connect(h.host, h.port, new_token(), timeout=5)  # wrong token
    _raw(h, wire.PREFIX.pack(wire.MAGIC, 1 << 30, 0))  # an absurd header length
    c = wire.connect(h.host, h.port, token, timeout=5)  # a good connection still works
    c.send("role", role="probe")
    c.send("ping")
    assert c.recv().kind == "probe_ack"
    c.close()
    assert h.alive()
    assert "dropped connection" in h.log_tail()
    assert token.hex() not in h.log_tail(1000)  # the token is never logged


def test_missing_model_path_names_host_and_path(worker):
    h, token = worker
    c = wire.connect(h.host, h.port, token, timeout=5)
    c.send("role", role="control")
    c.send("config", stage=0, model_path="/no/such/model", start=0, end=2, dtype="float32", device="cpu")
    f = c.recv()
    assert f.kind == "error"
    assert "/no/such/model" in f["message"] and socket.gethostname() in f["message"]
    c.send(Kind.CONFIG, stage=0, model_path="/m", start=3, end=3)  # a config that is not a stage's: named, not fatal
    f = c.recv()
    assert f.kind == Kind.ERROR and "units [3, 3)" in f["message"] and socket.gethostname() in f["message"]
    c.send("shutdown")
    assert c.recv().kind == "bye"
    c.close()


def test_launch_options_and_link_shapes(local_testbed):
    opts = LaunchOptions.of({"ssh": {"python": "/usr/bin/python3"}})
    assert opts.for_kind("ssh") == {"python": "/usr/bin/python3"} and opts.for_kind("local") == {}
    assert LaunchOptions.of(opts) is opts and LaunchOptions.of(None) == LaunchOptions()
    with pytest.raises(KitError, match="unknown launch kinds"):
        LaunchOptions.of({"docker": {}})
    assert isinstance(launcher_for(Device(name="r", type="cpu", memory_bytes=1, launch="ssh")), SSHLauncher)
    tb = local_testbed(2, names=["a", "b"],
                       links={"default": {"mbps": None}, "pairs": [{"src": "a", "dst": "b", "mbps": 40}]})
    assert link_shape(tb, "a", "b") == LinkShape(40.0, 0.0)
    assert link_shape(tb, "b", "a") is None and link_shape(tb, "a", "a") is None


def test_worker_exits_when_its_coordinator_disconnects():
    token = new_token()
    h = LocalLauncher().start(DEV, token)
    try:
        c = wire.connect(h.host, h.port, token, timeout=5)
        c.send("role", role="control")
        c.send("ping", t=1.0)
        assert c.recv().kind == "pong"
        c.close()
        h.proc.wait(20)
        assert not h.alive()
    finally:
        h.stop()
    assert not psutil.pid_exists(h.pid) or psutil.Process(h.pid).status() == psutil.STATUS_ZOMBIE


def test_launcher_reports_a_worker_that_cannot_start(tmp_path):
    bad = tmp_path / "python"
    bad.write_text("#!/bin/sh\necho 'no such module' >&2\nexit 3\n")
    bad.chmod(0o755)
    with pytest.raises(KitError, match="w0 did not start listening"):
        LocalLauncher(python=str(bad), log_dir=str(tmp_path)).start(DEV, new_token())  # the log is kept


def test_local_worker_pinned_to_its_cpus():
    dev = Device(name="pin", type="cpu", memory_bytes=1 << 30, cpus=(0,))
    h = LocalLauncher().start(dev, new_token())
    try:
        assert psutil.Process(h.pid).cpu_affinity() == [0]
    finally:
        h.stop()
    assert not h.alive()


def _loaded(c: wire.Connection) -> wire.Frame:
    """The first frame after CONFIG that is not PROGRESS (LOADED or ERROR)."""
    while True:
        f = c.recv()
        if f.kind != Kind.PROGRESS:
            return f


def test_a_stage_runs_its_data_connection_and_returns_tokens_on_it(tiny_checkpoint):
    """The coordinator's data connection with `returns`: TOKENS in, the greedy TOKEN back on it (transformers' token);
    a frame that is not this stage's input is answered with an ERROR on control, and the worker keeps serving."""
    from transformers import AutoModelForCausalLM

    token = new_token()
    h = LocalLauncher().start(DEV, token)
    try:
        c = wire.connect(h.host, h.port, token, timeout=30)
        c.send(Kind.ROLE, role="control")
        c.send(Kind.CONFIG, stage=0, model_path=str(tiny_checkpoint), start=0, end=4, threads=1)
        assert _loaded(c).kind == Kind.LOADED
        d = wire.connect(h.host, h.port, token, timeout=30)
        d.send(Kind.ROLE, role="data", returns=True)
        ids = torch.tensor([[5, 17, 42, 9, 100]])
        d.send(Kind.TOKENS, ids, req=0, mb=0, step=0, sample={"temperature": 0.0})
        d.settimeout(60)
        f = d.recv()
        hf = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint), dtype=torch.float32).eval()
        with torch.inference_mode():
            want = int(hf(ids).logits[0, -1].argmax())
        assert f.kind == Kind.TOKEN and f["step"] == 0 and int(f.tensor.reshape(-1)[0]) == want
        d.send(Kind.ACT, torch.zeros(1, 1, 64), req=0, mb=0, step=1)  # stage 0 takes TOKENS, not ACT
        c.settimeout(60)
        while (f := c.recv()).kind != Kind.ERROR:
            pass
        assert "not stage 0's input" in f["message"]
        d.send(Kind.TOKENS, torch.tensor([[want]]), req=0, mb=0, step=1)  # the cache of step 0 is still there
        with torch.inference_mode():
            want2 = int(hf(torch.cat([ids, torch.tensor([[want]])], 1)).logits[0, -1].argmax())
        assert int(d.recv().tensor.reshape(-1)[0]) == want2
        c.send(Kind.SHUTDOWN)
        assert c.recv().kind == Kind.BYE
    finally:
        h.stop()
