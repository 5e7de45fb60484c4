"""The wire and the protocol: exact round trips for every dtype, the decoder against random and truncated bytes,
auth, shaping; message kinds, the StageConfig both ends read, the listening line."""

import json
import socket
import struct
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.runtime import wire
from edgeshard_kit.runtime.protocol import (Kind, LinkShape, PeerAddress, ProtocolError, Role, StageConfig,
                                            listening_line, new_token, parse_listening, read_token_file,
                                            write_token_file)


def _sample(dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g, dtype=torch.int64).to(dtype)


@pytest.mark.parametrize("dtype", list(wire.DTYPES.values()), ids=list(wire.DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (7,), (2, 3, 5)])
def test_round_trip_exact(dtype, shape):
    t = _sample(dtype, shape)
    f = wire.decode_frame(wire.encode_frame("act", t, req=1, mb=2, step=3))
    assert f.kind == "act" and f.meta == {"req": 1, "mb": 2, "step": 3}
    assert f.tensor.dtype == dtype and tuple(f.tensor.shape) == shape
    assert torch.equal(f.tensor, t)  # atol = 0: the bytes after the wire are the bytes before


def test_bfloat16_bits_survive_noncontiguous():
    t = torch.randn(4, 6).to(torch.bfloat16).t()  # non-contiguous: sent as its contiguous copy
    back = wire.decode_frame(wire.encode_frame("act", t)).tensor
    assert torch.equal(back.view(torch.int16), t.contiguous().view(torch.int16))


def test_header_only_frame_keeps_meta():
    f = wire.decode_frame(wire.encode_frame("config", dtype="bfloat16", shape=[1, 2]))
    assert f.tensor is None and f["dtype"] == "bfloat16" and f["shape"] == [1, 2]


def test_oversized_frames_rejected_before_allocating():
    big_header = wire.PREFIX.pack(wire.MAGIC, wire.MAX_HEADER + 1, 0)
    with pytest.raises(wire.ProtocolError, match="header length"):
        wire.decode_frame(big_header)
    huge_payload = wire.PREFIX.pack(wire.MAGIC, 10, 1 << 60)
    with pytest.raises(wire.ProtocolError, match="exceeds"):
        wire.decode_frame(huge_payload)
    small_limit = wire.encode_frame("act", torch.zeros(100))
    with pytest.raises(wire.ProtocolError, match="exceeds"):
        wire.decode_frame(small_limit, max_payload=100)


def test_payload_must_match_shape():
    head = b'{"kind":"act","tensor":{"dtype":"float32","shape":[4]}}'
    with pytest.raises(wire.ProtocolError, match="does not match"):
        wire.decode_frame(wire.PREFIX.pack(wire.MAGIC, len(head), 12) + head + b"\0" * 12)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_protocol_error(data):
    try:
        wire.decode_frame(data)
    except wire.ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_truncated_frames_raise_protocol_error(data):
    dtype = data.draw(st.sampled_from(list(wire.DTYPES.values())))
    shape = tuple(data.draw(st.lists(st.integers(0, 4), max_size=3)))
    frame = wire.encode_frame("act", _sample(dtype, shape), step=data.draw(st.integers(0, 10)))
    cut = data.draw(st.integers(0, len(frame) - 1))
    with pytest.raises(wire.ProtocolError):
        wire.decode_frame(frame[:cut])


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_corrupted_frames_never_crash(data):
    frame = bytearray(wire.encode_frame("act", torch.arange(6, dtype=torch.int32).reshape(2, 3), req=0))
    for _ in range(data.draw(st.integers(1, 4))):
        frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    try:
        f = wire.decode_frame(bytes(frame))
        assert isinstance(f, wire.Frame)
    except wire.ProtocolError:
        pass


def _pair(shaper=None):
    a, b = socket.socketpair()
    return wire.Connection(a, shaper), wire.Connection(b)


def test_connection_counters_and_large_tensor():
    a, b = _pair()
    t = torch.randn(1 << 18)  # 1 MiB: goes out in its own sendall
    th = threading.Thread(target=lambda: a.send("act", t, step=0))
    th.start()
    f = b.recv()
    th.join()
    assert torch.equal(f.tensor, t)
    assert a.bytes_sent == b.bytes_received > t.numel() * 4 and a.msgs_sent == b.msgs_received == 1
    a.close()
    with pytest.raises(wire.ProtocolError, match="closed"):
        b.recv()


def _auth_both(tok_a: bytes, tok_b: bytes):
    a, b = _pair()
    errs = {}

    def run(conn, tok, role):
        try:
            wire.authenticate(conn, tok, role, timeout=5)
        except wire.ProtocolError as e:
            errs[role] = e

    ts = [threading.Thread(target=run, args=(a, tok_a, "client")), threading.Thread(target=run, args=(b, tok_b, "server"))]
    [t.start() for t in ts]
    [t.join() for t in ts]
    return errs


def test_auth_mutual():
    tok = new_token()
    assert _auth_both(tok, tok) == {}
    errs = _auth_both(tok, new_token())
    assert set(errs) == {"client", "server"} and all(isinstance(e, wire.AuthError) for e in errs.values())


def test_token_file_private(tmp_path):
    tok = new_token()
    path = write_token_file(tok, str(tmp_path))
    assert (tmp_path / path.split("/")[-1]).stat().st_mode & 0o777 == 0o600
    assert read_token_file(path) == tok


def test_shaper_meters_at_the_link_rate():
    # 400 KB at 8 Mbps (1 MB/s) beyond a 64 KiB burst must take at least ~0.33 s (a lower bound, not a race).
    a, b = _pair(wire.LinkShaper(mbps=8.0, latency_ms=20.0))
    t = torch.zeros(400_000, dtype=torch.uint8)
    got = []
    th = threading.Thread(target=lambda: got.append(b.recv()))
    th.start()
    t0 = time.perf_counter()
    a.send("act", t)
    th.join()
    assert time.perf_counter() - t0 >= 0.02 + (400_000 - 65536) / 1e6 * 0.95
    assert torch.equal(got[0].tensor, t)


def test_shaper_for_testbed_links():
    from edgeshard_kit.testbed.inventory import Link

    assert wire.shaper_for(Link("a", "b", float("inf"), 0.0)) is None
    assert wire.shaper_for(Link("a", "b", 100.0, 1.0), mode="netns") is None
    sh = wire.shaper_for({"mbps": 100.0, "latency_ms": 2.0})
    assert sh.rate == 100e6 / 8 and sh.latency_s == 0.002


def test_bad_magic_names_problem():
    with pytest.raises(wire.ProtocolError, match="magic"):
        wire.decode_frame(b"GET / HTTP/1.1\r\n\r\n")
    assert struct.calcsize("!4sIQ") == wire.PREFIX.size


def test_loopback_benchmark_alternates_the_wire_and_plain_tcp():
    from edgeshard_kit.bench.pipeline import bench_loopback

    rows = bench_loopback(1 << 20, repeats=2)
    assert [r["impl"] for r in rows] == ["socket", "wire", "wire", "socket"]  # alternating, warm-ups dropped
    assert all(r["bytes"] == 1 << 20 and r["seconds"] > 0 and r["gb_per_s"] > 0 for r in rows)


# ---- the protocol ---------------------------------------------------------------------------------------------
def test_kinds_and_roles_travel_as_plain_strings():
    f = wire.decode_frame(wire.encode_frame(Kind.ROLE, role=Role.CONTROL))
    assert f.kind == Kind.ROLE == "role" and type(f.kind) is str and f["role"] == Role.CONTROL
    assert len({k.value for k in Kind}) == len(Kind)  # one spelling per kind
    assert wire.ProtocolError is ProtocolError and issubclass(ProtocolError, KitError)


def test_stage_config_round_trips_through_json():
    cfg = StageConfig(stage=1, model_path="/m", start=2, end=5, device_name="edge1", threads=2,
                      next=PeerAddress("10.0.0.2", 5100), shape_next=LinkShape(50.0, 2.0))
    meta = wire.decode_frame(wire.encode_frame(Kind.CONFIG, **cfg.to_dict())).meta
    back = StageConfig.from_dict(json.loads(json.dumps(meta)))
    assert back == cfg and not back.last and StageConfig(0, "/m", 0, 2).last
    # what the worker does with the shapes: a token bucket at the link's rate
    assert wire.shaper_for(back.shape_next).rate == 50e6 / 8 and wire.shaper_for(back.shape_return) is None
    # the fields the coordinator may leave out take their defaults
    assert StageConfig.from_dict({"stage": 0, "model_path": "/m", "start": 0, "end": 3}).dtype == "float32"


@pytest.mark.parametrize("change, words", [
    ({"model_path": None}, "'model_path'"),
    ({"start": 4}, "units [4, 4)"),
    ({"stage": True}, "'stage'"),
    ({"threads": 0}, "threads 0"),
    ({"next": {"host": "h", "port": 70000}}, "port 70000"),
    ({"shape_next": {"mbps": -1}}, "mbps must be > 0"),
    ({"colour": "red"}, "unknown fields ['colour']"),
])
def test_stage_config_names_what_is_wrong(change, words):
    d = {**StageConfig(stage=0, model_path="/m", start=0, end=4).to_dict(), **change}
    with pytest.raises(ProtocolError) as e:
        StageConfig.from_dict(d)
    assert words in str(e.value)


def test_listening_line_round_trip():
    assert parse_listening(listening_line("0.0.0.0", 5100)) == {"event": "listening", "host": "0.0.0.0", "port": 5100}
    assert parse_listening("[worker 1] loading") is None and parse_listening('{"event": "other"}') is None


class _DribblingSocket:
    """sendmsg takes at most 7 bytes per call, as a kernel with a full buffer may."""

    def __init__(self):
        self.out = bytearray()
        self.calls = 0

    def sendmsg(self, parts):
        self.calls += 1
        data = b"".join(bytes(p) for p in parts)[:7]
        self.out += data
        return len(data)


def test_send_all_survives_partial_sends():
    t = torch.arange(40, dtype=torch.float32).reshape(5, 8)[:, ::2]  # non-contiguous: copied once, then sent
    head, payload = wire.encode_header(Kind.ACT, t, req=1, step=2)
    sock = _DribblingSocket()
    wire._send_all(sock, [memoryview(head), payload, memoryview(b"")])
    assert bytes(sock.out) == wire.encode_frame(Kind.ACT, t, req=1, step=2)
    assert sock.calls == -(-len(sock.out) // 7)
    f = wire.decode_frame(bytes(sock.out))
    assert torch.equal(f.tensor, t) and f["step"] == 2
