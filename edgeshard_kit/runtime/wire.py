"""The wire: frames (fixed prefix + JSON header + raw tensor bytes), HMAC auth, byte counters, app-level shaping."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import secrets
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from edgeshard_kit.runtime.protocol import AuthError, Kind, ProtocolError

MAGIC = b"ESK1"
PREFIX = struct.Struct("!4sIQ")  # magic, header length (bytes), payload length (bytes)
MAX_HEADER = 1 << 20  # 1 MiB of JSON is far more than any header needs
MAX_PAYLOAD = 1 << 31  # 2 GiB: a frame larger than this is refused before allocating
HANDSHAKE_HEADER = 4096  # before authentication only header-only frames of at most 4 KiB are read
SOCK_BUF = 4 << 20  # socket send/receive buffer, bytes
SEND_CHUNK = 1 << 20  # bytes per sendall; the shaper meters each chunk

# The fixed table of dtypes a frame may carry (name on the wire -> torch dtype).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ITEMSIZE = {v: torch.empty((), dtype=v).element_size() for v in DTYPES.values()}


@dataclass
class Frame:
    """One message: `kind`, the rest of the JSON header in `meta`, and an optional tensor."""

    kind: str
    meta: dict = field(default_factory=dict)
    tensor: torch.Tensor | None = None

    def __getitem__(self, key: str) -> Any:
        return self.meta[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.meta.get(key, default)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of `t` (contiguous, CPU; no copy when it already is); bfloat16 and bool travel as a uint8 view."""
    t = t.detach()
    if t.device.type != "cpu" or not t.is_contiguous():
        t = t.to("cpu").contiguous()
    if not t.numel():
        return memoryview(b"")
    if t.dtype in (torch.bfloat16, torch.bool):  # no numpy dtype of their own
        t = t.reshape(-1).view(torch.uint8)
    return memoryview(t.numpy()).cast("B")


def encode_header(kind: str, tensor: torch.Tensor | None = None, **meta: Any) -> tuple[bytes, memoryview]:
    """The prefix + JSON header bytes and the payload view of one frame."""
    head: dict[str, Any] = {"kind": kind, **meta}
    payload = memoryview(b"")
    if tensor is not None:
        if tensor.dtype not in DTYPE_NAMES:
            raise ProtocolError(f"dtype {tensor.dtype} cannot travel on the wire (allowed: {', '.join(DTYPES)})")
        head["tensor"] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape)}
        payload = _tensor_bytes(tensor)
    hb = json.dumps(head, separators=(",", ":")).encode()
    if len(hb) > MAX_HEADER:
        raise ProtocolError(f"frame header of {len(hb)} bytes exceeds {MAX_HEADER}")
    return PREFIX.pack(MAGIC, len(hb), payload.nbytes) + hb, payload


def encode_frame(kind: str, tensor: torch.Tensor | None = None, **meta: Any) -> bytes:
    """One whole frame as bytes (tests and small messages)."""
    head, payload = encode_header(kind, tensor, **meta)
    return head + bytes(payload)


def _read_exact(readinto: Callable[[memoryview], int], view: memoryview) -> None:
    """Fill `view` completely; EOF before it is full is a ProtocolError."""
    got = 0
    n = view.nbytes
    while got < n:
        k = readinto(view[got:])
        if not k:
            raise ProtocolError(f"connection closed mid-frame ({got} of {n} bytes)")
        got += k


def read_frame_from(readinto: Callable[[memoryview], int], max_payload: int = MAX_PAYLOAD,
                    max_header: int = MAX_HEADER) -> tuple[Frame, int]:
    """Read one frame through `readinto` (like socket.recv_into); return it and its size in bytes.

    Every malformed frame raises ProtocolError (never RecursionError, RuntimeError, ...).
    """
    pre = bytearray(PREFIX.size)
    _read_exact(readinto, memoryview(pre))
    magic, hlen, plen = PREFIX.unpack(pre)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r} (not an edgeshard peer)")
    if hlen > min(max_header, MAX_HEADER) or hlen == 0:
        raise ProtocolError(f"frame header length {hlen} is out of range (1..{min(max_header, MAX_HEADER)})")
    if plen > max_payload:
        raise ProtocolError(f"frame payload of {plen} bytes exceeds the maximum {max_payload}")
    hb = bytearray(hlen)
    _read_exact(readinto, memoryview(hb))
    try:
        head = json.loads(hb.decode())  # UnicodeDecodeError is a ValueError
    except (ValueError, RecursionError):
        raise ProtocolError("frame header is not valid JSON (or nested too deeply)") from None
    if not isinstance(head, dict) or not isinstance(head.get("kind"), str):
        raise ProtocolError("frame header lacks a string 'kind'")
    kind = head.pop("kind")
    tensor = None
    if "tensor" in head:
        desc = head.pop("tensor")
        if not isinstance(desc, dict):
            raise ProtocolError("frame header field 'tensor' is not an object")
        name = desc.get("dtype")
        dtype = DTYPES.get(name) if isinstance(name, str) else None
        shape = desc.get("shape")
        if dtype is None:
            raise ProtocolError("frame header has an unknown dtype")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**40
                                                  for s in shape) or len(shape) > 8:
            raise ProtocolError("frame header has an invalid shape")
        numel = 1
        for s in shape:
            numel *= s
        if numel * ITEMSIZE[dtype] != plen:
            raise ProtocolError(f"payload of {plen} bytes does not match shape {shape} of {DTYPE_NAMES[dtype]}")
        if any(s > max_payload for s in shape):  # a zero-size tensor with huge dims overflows torch's strides
            raise ProtocolError(f"frame header has a dimension over {max_payload} in shape {shape}")
        buf = torch.empty(plen, dtype=torch.uint8)
        if plen:
            _read_exact(readinto, memoryview(buf.numpy()))
        try:
            tensor = buf.view(dtype).reshape(shape)
        except (RuntimeError, ValueError, OverflowError) as e:
            raise ProtocolError(f"frame tensor of shape {shape} cannot be built: {str(e)[:100]}") from None
    elif plen:
        raise ProtocolError("frame has payload bytes but no dtype/shape")
    return Frame(kind, head, tensor), PREFIX.size + hlen + plen


def decode_frame(data: bytes, max_payload: int = MAX_PAYLOAD) -> Frame:
    """Decode one frame from bytes; ProtocolError if invalid or truncated."""
    return read_frame_from(io.BytesIO(data).readinto, max_payload)[0]


class LinkShaper:
    """APPLICATION-LEVEL link emulation (no root): a token bucket of `mbps` plus a fixed `latency_ms` per message.

    Applied by the sender: each message first waits `latency_ms`, then its bytes are metered at the rate.
    It is an approximation of a real link (latency also delays the sender's next message); use the netns
    emulation (tc) for kernel-level shaping.
    """

    def __init__(self, mbps: float, latency_ms: float = 0.0, burst_bytes: int = 64 * 1024):
        self.rate = mbps * 1e6 / 8  # bytes/s
        self.latency_s = latency_ms / 1e3
        self.burst = float(burst_bytes)
        self.tokens = self.burst
        self.last = time.perf_counter()

    def message(self) -> None:
        """Called once per message before its bytes: the fixed latency."""
        if self.latency_s > 0:
            time.sleep(self.latency_s)

    def take(self, n: int) -> None:
        """Block until `n` bytes may go out at the link rate."""
        now = time.perf_counter()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= n
        if self.tokens < 0:
            time.sleep(-self.tokens / self.rate)


def shaper_for(link: Any, mode: str = "app") -> LinkShaper | None:
    """A LinkShaper for a link (testbed Link, protocol.LinkShape or {mbps, latency_ms}) in mode "app"; None if unshaped."""
    if mode != "app" or link is None:
        return None
    mbps = link.get("mbps") if isinstance(link, dict) else getattr(link, "mbps", None)
    lat = (link.get("latency_ms") if isinstance(link, dict) else getattr(link, "latency_ms", 0.0)) or 0.0
    if mbps is None or mbps == float("inf"):
        return LinkShaper(float("inf"), lat) if lat > 0 else None
    return LinkShaper(float(mbps), lat)


def _send_all(sock: socket.socket, parts: list[memoryview]) -> None:
    """Send every byte of `parts` with sendmsg (gathered, no concatenation copy), however the kernel splits it."""
    parts = [p for p in parts if p.nbytes]
    while parts:
        n = sock.sendmsg(parts)
        while parts and n >= parts[0].nbytes:
            n -= parts[0].nbytes
            parts.pop(0)
        if parts and n:
            parts[0] = parts[0][n:]


class Connection:
    """A framed, counted connection over a socket; `send` is thread-safe, `recv` is for one reader."""

    def __init__(self, sock: socket.socket, shaper: LinkShaper | None = None, max_payload: int = MAX_PAYLOAD):
        self.sock = sock
        self.shaper = shaper
        self.max_payload = max_payload
        self.bytes_sent = self.bytes_received = self.msgs_sent = self.msgs_received = 0
        self.last_transfer_s = 0.0  # seconds from the first byte to the last of the latest frame received
        self.last_frame_bytes = 0
        self._lock = threading.Lock()
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small token frames must not wait
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):  # fewer syscalls for multi-MB activations
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)
        except OSError:
            pass

    def send(self, kind: str, tensor: torch.Tensor | None = None, **meta: Any) -> int:
        """Send one frame; return its size in bytes."""
        head, payload = encode_header(kind, tensor, **meta)
        with self._lock:
            sh = self.shaper
            if sh is not None:
                sh.message()
            if sh is None or sh.rate == float("inf"):
                _send_all(self.sock, [memoryview(head), payload])  # one syscall: a receiver wakes once per frame
            else:
                for part in (memoryview(head), payload):
                    for i in range(0, part.nbytes, SEND_CHUNK // 16):
                        chunk = part[i:i + SEND_CHUNK // 16]
                        sh.take(chunk.nbytes)
                        self.sock.sendall(chunk)
            n = len(head) + payload.nbytes
            self.bytes_sent += n
            self.msgs_sent += 1
        return n

    def recv(self, deadline: float | None = None, max_payload: int | None = None,
             max_header: int = MAX_HEADER) -> Frame:
        """Read one frame (exact-size reads); ProtocolError on garbage or EOF mid-frame.

        `deadline` (time.monotonic()): the whole frame must arrive by then, across all reads (socket.timeout).
        """
        first: list[float] = []

        def readinto(view: memoryview) -> int:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout("deadline passed")
                self.sock.settimeout(left)
            k = self.sock.recv_into(view)
            if not first:
                first.append(time.perf_counter())  # the frame began to arrive: time before this was idle
            return k

        limit = self.max_payload if max_payload is None else max_payload
        frame, n = read_frame_from(readinto, limit, max_header)
        self.last_transfer_s = time.perf_counter() - first[0]
        self.last_frame_bytes = n
        self.bytes_received += n
        self.msgs_received += 1
        return frame

    def counters(self) -> dict:
        return {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
                "msgs_sent": self.msgs_sent, "msgs_received": self.msgs_received}

    def settimeout(self, seconds: float | None) -> None:
        self.sock.settimeout(seconds)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _mac(token: bytes, nonce: bytes, role: str) -> bytes:
    return hmac.new(token, nonce + role.encode(), hashlib.sha256).digest()


def authenticate(conn: Connection, token: bytes, role: str, timeout: float = 10.0) -> None:
    """Mutual HMAC-SHA256 challenge-response: each side proves HMAC(token, peer_nonce || own role).

    `role` is "client" (the side that connected) or "server"; AuthError if the peer fails. `timeout` bounds
    the whole handshake (one deadline across all reads), and its frames may only be small and header-only.
    """
    peer_role = {"client": "server", "server": "client"}[role]
    old = conn.sock.gettimeout()
    conn.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        nonce = secrets.token_bytes(32)
        conn.send(Kind.HELLO, nonce=nonce.hex(), role=role)
        hello = conn.recv(deadline, max_payload=0, max_header=HANDSHAKE_HEADER)
        if hello.kind != Kind.HELLO or hello.get("role") != peer_role or not isinstance(hello.get("nonce"), str):
            raise AuthError("peer did not start the handshake")
        try:
            peer_nonce = bytes.fromhex(hello["nonce"])
        except ValueError:
            raise AuthError("peer sent a malformed nonce") from None
        if len(peer_nonce) < 16 or peer_nonce == nonce:
            raise AuthError("peer sent a weak nonce")
        conn.send(Kind.PROOF, mac=_mac(token, peer_nonce, role).hex())
        proof = conn.recv(deadline, max_payload=0, max_header=HANDSHAKE_HEADER)
        mac = proof.get("mac") if proof.kind == Kind.PROOF else None
        want = _mac(token, nonce, peer_role).hex()
        if not isinstance(mac, str) or not hmac.compare_digest(mac.encode(), want.encode()):
            raise AuthError("peer failed authentication (wrong deployment token)")
    except (socket.timeout, OSError) as e:
        if isinstance(e, ProtocolError):
            raise
        raise AuthError(f"handshake failed: {e}") from None
    finally:
        try:
            conn.settimeout(old)
        except OSError:
            pass


def connect(host: str, port: int, token: bytes, timeout: float = 10.0, shaper: LinkShaper | None = None) -> Connection:
    """Open an authenticated connection to a worker at host:port."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise ConnectionError(f"cannot connect to {host}:{port}: {e}") from None
    conn = Connection(sock, shaper)
    try:
        authenticate(conn, token, "client", timeout)
    except BaseException:
        conn.close()
        raise
    sock.settimeout(None)
    return conn


def accept(conn: Connection, token: bytes, timeout: float = 10.0) -> Frame:
    """The server's side of a new connection: the handshake and the first frame (ROLE), all within `timeout`."""
    deadline = time.monotonic() + timeout
    authenticate(conn, token, "server", timeout)
    first = conn.recv(deadline, max_payload=0, max_header=HANDSHAKE_HEADER)
    conn.settimeout(None)
    return first
