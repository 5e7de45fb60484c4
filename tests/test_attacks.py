"""Attacks on a worker (docs/security.md): memory, time and descriptors before authentication, bad frames, orphans."""

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeshard_kit.runtime import wire
from edgeshard_kit.runtime.launchers import LocalLauncher
from edgeshard_kit.runtime.protocol import Kind, ProtocolError, new_token, write_token_file
from edgeshard_kit.testbed.inventory import Device

MB = 1 << 20


class Proc:
    """A worker started directly, with extra options and an optional descriptor limit; stderr to a log file."""

    def __init__(self, tmp_path: Path, *extra: str, nofile: int | None = None):
        self.token = new_token()
        self.token_file = write_token_file(self.token)
        self.log = tmp_path / f"worker-{time.monotonic_ns()}.log"

        def limit():
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgeshard_kit.runtime.worker", "--port", "0", "--token-file",
                 self.token_file, "--bind", "127.0.0.1", *extra], stdout=subprocess.PIPE, stderr=err,
                stdin=subprocess.DEVNULL, text=True, preexec_fn=limit)
        line = self.proc.stdout.readline()  # the listening line (the worker is up within seconds)
        assert line, f"worker did not start: {self.log.read_text()[-500:]}"
        self.port = json.loads(line)["port"]
        self.ps = psutil.Process(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def serves(self) -> bool:
        """An authenticated coordinator still gets answers (a probe connection: ping -> ack)."""
        c = wire.connect("127.0.0.1", self.port, self.token, timeout=10)
        try:
            c.settimeout(10)
            c.send(Kind.ROLE, role="probe")
            c.send(Kind.PROBE)
            return c.recv().kind == Kind.PROBE_ACK
        finally:
            c.close()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()
        Path(self.token_file).unlink(missing_ok=True)


@pytest.fixture
def start(tmp_path):
    procs: list[Proc] = []

    def _start(*extra: str, nofile: int | None = None) -> Proc:
        procs.append(Proc(tmp_path, *extra, nofile=nofile))
        return procs[-1]

    yield _start
    for p in procs:
        p.stop()


def _until_closed(s: socket.socket, limit_s: float) -> float:
    """Read until the peer closes (EOF or reset); the seconds it took (bounded by `limit_s`)."""
    t0 = time.monotonic()
    s.settimeout(0.5)
    for _ in range(int(limit_s / 0.5) + 2):
        try:
            if not s.recv(65536):
                break
        except socket.timeout:
            pass
        except OSError:
            break
        if time.monotonic() - t0 > limit_s:
            break
    return time.monotonic() - t0


# ---- 1. memory before authentication ---------------------------------------------------------------------------
def test_unauthenticated_huge_payloads_cost_no_memory(start):
    w = start()
    assert w.serves()  # warm: the first connection's thread and buffers are in the baseline
    base = w.rss()
    hello = json.dumps({"kind": "hello", "nonce": "00" * 32, "role": "client",
                        "tensor": {"dtype": "uint8", "shape": [1 << 31]}}).encode()
    chunk = b"\0" * MB
    dropped = 0
    for _ in range(4):  # four peers, each claiming 2 GiB and sending up to 256 MiB
        s = socket.create_connection(("127.0.0.1", w.port), timeout=5)
        s.sendall(wire.PREFIX.pack(wire.MAGIC, len(hello), 1 << 31) + hello)
        try:
            for _ in range(256):
                s.sendall(chunk)
        except OSError:
            dropped += 1  # the worker closed the connection: our sends fail
        assert _until_closed(s, 10) < 10
        s.close()
    growth = w.rss() - base
    print(f"RSS growth after 4 unauthenticated 2 GiB claims: {growth / MB:.2f} MB")
    assert growth < 10 * MB
    assert dropped >= 1
    assert w.alive() and w.serves()
    assert "dropped connection" in w.text()


def test_authenticated_frames_follow_the_role_limit(start):
    w = start()
    c = wire.connect("127.0.0.1", w.port, w.token, timeout=10)
    c.send(Kind.ROLE, role="data")  # a data connection of an unconfigured stage accepts no activation yet
    c.close()
    c = wire.connect("127.0.0.1", w.port, w.token, timeout=10)
    c.send(Kind.ROLE, role="probe")
    c.sock.sendall(wire.PREFIX.pack(wire.MAGIC, 2, 1 << 30) + b"{}")  # 1 GiB claimed on a probe connection
    assert _until_closed(c.sock, 10) < 10
    c.close()
    assert w.alive() and w.serves()
    assert "exceeds the maximum" in w.text()


# ---- 2. connections that never finish --------------------------------------------------------------------------
def test_slow_loris_is_dropped_within_the_handshake_bound(start):
    w = start("--handshake-timeout", "2")
    s = socket.create_connection(("127.0.0.1", w.port), timeout=5)
    frame = wire.encode_frame("hello", nonce="00" * 32, role="client")
    t0 = time.monotonic()
    closed_at = None
    for i in range(len(frame)):  # one byte every 0.25 s: each read is quick, the whole is slow
        if time.monotonic() - t0 > 15:
            break
        try:
            s.sendall(frame[i:i + 1])
        except OSError:
            closed_at = time.monotonic() - t0
            break
        time.sleep(0.25)
        s.setblocking(False)
        try:
            data = s.recv(65536)
            while data:
                data = s.recv(65536)
            closed_at = time.monotonic() - t0  # EOF
            break
        except BlockingIOError:
            pass
        except OSError:
            closed_at = time.monotonic() - t0
            break
        finally:
            s.setblocking(True)
    s.close()
    print(f"slow-loris dropped after {closed_at} s (bound 2 s)")
    assert closed_at is not None and closed_at < 2 + 3
    assert w.alive() and w.serves()


def test_descriptor_pressure_does_not_kill_the_worker(start):
    w = start("--handshake-timeout", "3", "--max-pending", "1000", nofile=24)
    socks = []
    for _ in range(120):  # more than the worker's descriptors: its accept() fails with EMFILE
        try:
            socks.append(socket.create_connection(("127.0.0.1", w.port), timeout=2))
        except OSError:
            break
    time.sleep(1.0)
    assert w.alive()
    for s in socks:
        s.close()
    time.sleep(4.0)  # the handshake deadline frees the worker's descriptors
    assert w.alive()
    ok = False
    for _ in range(5):  # bounded retries while the backlog drains
        try:
            ok = w.serves()
            break
        except (OSError, ProtocolError):
            time.sleep(1.0)
    assert ok
    log = w.text()
    assert "accept failed" in log and log.count("accept failed") < 10  # one line per cause, not per attempt


def test_unauthenticated_connections_beyond_the_cap_are_closed(start):
    w = start("--handshake-timeout", "5", "--max-pending", "4")
    socks = [socket.create_connection(("127.0.0.1", w.port), timeout=5) for _ in range(12)]
    time.sleep(0.5)
    closed = 0
    for s in socks:
        s.settimeout(2)
        try:
            data = s.recv(4096)
            closed += not data
        except OSError:
            closed += 1
    for s in socks:
        s.close()
    assert closed >= 8  # the first 4 got a HELLO and wait; the rest were closed at accept
    time.sleep(0.5)
    assert w.alive() and w.serves()


# ---- 3. malformed frames raise only ProtocolError --------------------------------------------------------------
def _frame(head: bytes, payload: bytes = b"") -> bytes:
    return wire.PREFIX.pack(wire.MAGIC, len(head), len(payload)) + head + payload


def test_deep_json_and_overflowing_shapes_are_protocol_errors():
    with pytest.raises(ProtocolError):
        wire.decode_frame(_frame(b'{"kind":"x","a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"))
    for shape in ([0, 1 << 39, 1 << 39, 1 << 39], [0] + [(1 << 40) - 1] * 7):
        head = json.dumps({"kind": "act", "tensor": {"dtype": "float32", "shape": shape}}).encode()
        with pytest.raises(ProtocolError):
            wire.decode_frame(_frame(head))
    good = wire.decode_frame(_frame(json.dumps({"kind": "act", "tensor": {"dtype": "int8", "shape": [0, 3]}}).encode()))
    assert tuple(good.tensor.shape) == (0, 3)


def _valid_frames() -> list[bytes]:
    import torch

    return [wire.encode_frame("hello", nonce="ab" * 32, role="client"),
            wire.encode_frame("act", torch.arange(12, dtype=torch.float32).reshape(3, 4), req=1, mb=0, step=0),
            wire.encode_frame("tokens", torch.ones(2, 1, dtype=torch.int64), mask=[[1], [1]])]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.sampled_from(range(3)), edits=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)),
                                                       max_size=6), cut=st.integers(0, 400), junk=st.binary(max_size=64))
def test_mutated_frames_raise_only_protocol_error(base, edits, cut, junk):
    data = bytearray(_valid_frames()[base])
    for pos, val in edits:
        data[pos % len(data)] = val
    data = bytes(data[:max(cut, 1)]) + junk if cut < len(data) else bytes(data) + junk
    try:
        wire.decode_frame(data, max_payload=1 << 20)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(head=st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                         lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                         max_leaves=20),
       shape=st.lists(st.integers(-2, 1 << 62), max_size=10), dtype=st.sampled_from(["float32", "bool", "x", 3]),
       payload=st.binary(max_size=64))
def test_random_headers_raise_only_protocol_error(head, shape, dtype, payload):
    for h in (head, {"kind": "act", "tensor": {"dtype": dtype, "shape": shape}}, {"kind": "k", "tensor": head}):
        try:
            wire.decode_frame(_frame(json.dumps(h).encode(), payload), max_payload=1 << 20)
        except ProtocolError:
            pass


def test_worker_logs_a_bad_frame_in_one_line(start):
    w = start()
    s = socket.create_connection(("127.0.0.1", w.port), timeout=5)
    s.sendall(_frame(b"[" * 3000))
    _until_closed(s, 10)
    s.close()
    assert w.alive() and w.serves()
    log = w.text()
    assert "dropped connection" in log and "Traceback" not in log


# ---- 4. control messages with missing fields -------------------------------------------------------------------
def test_bad_control_message_is_answered_and_the_worker_stays_up(start):
    w = start()
    c = wire.connect("127.0.0.1", w.port, w.token, timeout=10)
    c.settimeout(10)
    c.send(Kind.ROLE, role="control")
    c.send(Kind.PROBE_SEND)  # no host, no port
    f = c.recv()
    assert f.kind == Kind.ERROR and "probe_send" in f["message"]
    c.send(Kind.PING, t=1)
    assert c.recv().kind == Kind.PONG
    assert w.alive()
    assert "bad 'probe_send' request: KeyError" in w.text()
    c.send(Kind.SHUTDOWN)
    assert c.recv().kind == Kind.BYE
    c.close()


# ---- 5. orphans ------------------------------------------------------------------------------------------------
def test_worker_without_a_coordinator_exits(start):
    w = start("--idle-exit", "2")
    try:
        rc = w.proc.wait(20)
    except subprocess.TimeoutExpired:
        rc = None
    assert rc == 0
    assert "no coordinator connected within 2 s" in w.text()


def test_stopped_worker_leaves_no_token_or_log_file(tmp_path):
    h = LocalLauncher(log_dir=str(tmp_path)).start(Device(name="w0", type="cpu", memory_bytes=1 << 30), new_token())
    token_file, log_file = h.token_file, h.log_path
    assert not Path(token_file).exists()  # read and removed by the worker before it listens
    assert Path(log_file).exists()
    h.stop()
    assert not h.alive()
    assert not Path(log_file).exists()


def test_no_token_file_outlives_a_killed_coordinator(tmp_path):
    """The coordinator SIGKILLed right after its workers listen: no `finally` of it runs, and still no file
    holding the deployment token is left behind (the worker removed it once read)."""
    script = ("import sys; from edgeshard_kit.runtime.launchers import LocalLauncher;"
              "from edgeshard_kit.runtime.protocol import new_token; from edgeshard_kit.testbed.inventory import Device;"
              f"h = LocalLauncher(log_dir={str(tmp_path)!r}).start(Device(name='w0', type='cpu', memory_bytes=1 << 30),"
              " new_token()); print(h.token_file, h.proc.pid, flush=True); import time; time.sleep(60)")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        token_file, pid = proc.stdout.readline().split()
        proc.kill()
        proc.wait(10)
        assert Path(token_file).parent == tmp_path and not Path(token_file).exists()
        assert not list(tmp_path.glob("edgeshard-token-*"))
    finally:
        proc.kill()
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (OSError, UnboundLocalError, ValueError):
            pass


def test_worker_exits_when_its_control_connection_is_gone(start):
    w = start()
    c = wire.connect("127.0.0.1", w.port, w.token, timeout=10)
    c.send(Kind.ROLE, role="control")
    c.close()
    try:
        rc = w.proc.wait(20)
    except subprocess.TimeoutExpired:
        rc = None
    assert rc == 0
    assert os.path.exists(w.log)
