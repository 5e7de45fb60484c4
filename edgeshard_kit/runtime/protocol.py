"""The coordinator-worker protocol: message kinds and roles, the `StageConfig` a worker is given, token file, listening line.

Both ends import this module (the worker may import only core, model, wire and this), so a kind is
spelt once. A conversation, by connection:

- control (coordinator -> worker): ROLE(control), then CONFIG(StageConfig) -> PROGRESS* then LOADED | ERROR;
  PING -> PONG; RELEASE (forget a request's caches); STATS -> STATS; PROBE_SEND -> PROBE_RESULT;
  SHUTDOWN -> BYE; any stage ERROR.
- data (stage i -> stage i+1): ROLE(data), then ACT frames (activations). The coordinator's own data
  connection to stage 0 (runtime.feed) carries TOKENS (stage 0's input) in, and, opened with `returns`, the
  last stage's TOKEN frames back, so a token's path has no thread hand-off.
- probe (worker -> worker, for the link probe): ROLE(probe), then PROBE -> PROBE_ACK.
Every connection starts with the wire's HELLO/PROOF handshake (wire.authenticate).
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

from edgeshard_kit.core.errors import KitError

# The worker's bounds against peers that have not authenticated (docs/security.md) and per-role frame limits.
HANDSHAKE_S = 10.0  # the whole handshake plus the ROLE frame must arrive within this (one deadline)
MAX_PENDING = 32  # connections not yet authenticated at once; more are closed at accept
IDLE_EXIT_S = 120.0  # exit when no authenticated coordinator has connected within this after start
CONTROL_MAX = 64 << 20  # control frames carry token ids and small records
PROBE_MAX = 256 << 20  # probe payloads (the probe's sizes are a few MiB)
ACT_TOKENS_MAX = 1 << 16  # batch x tokens of one activation frame, at most

# Liveness (docs/runtime.md, Faults): a worker busy with CONFIG sends PROGRESS this often; the coordinator declares
# a worker stopped after SILENCE_S without any frame from it (or, before it listens, without its process running).
PROGRESS_S = 1.0
SILENCE_S = 5.0


class ProtocolError(KitError):
    """The peer sent something that is not a valid frame or message (or closed the connection mid-frame)."""


class AuthError(ProtocolError):
    """The peer failed the HMAC challenge-response."""


class Kind(StrEnum):
    """The `kind` of every frame (a str: it goes into the JSON header as it is)."""

    HELLO = "hello"                  # handshake, both ways: a nonce and the sender's side
    PROOF = "proof"                  # handshake, both ways: HMAC(token, peer nonce || own side)
    ROLE = "role"                    # first frame after the handshake: meta role = Role
    PING = "ping"                    # coordinator -> worker heartbeat (meta t) ...
    PONG = "pong"                    # ... and its answer
    CONFIG = "config"                # coordinator -> worker: StageConfig.to_dict() as meta
    PROGRESS = "progress"            # worker -> coordinator, every PROGRESS_S while CONFIG runs: phase, elapsed_s, rss
    LOADED = "loaded"                # worker -> coordinator: load_s, rss_bytes, param_bytes, pid, hostname, threads
    TOKENS = "tokens"                # coordinator -> stage 0: prompt ids or last tokens (meta req, mb, step, ...)
    ACT = "act"                      # stage i -> stage i+1: activations (same meta)
    TOKEN = "token"                  # last stage -> coordinator: the sampled token ids
    RELEASE = "release"              # coordinator -> every stage: drop the caches of request `req`
    STATS = "stats"                  # coordinator asks (meta clear), worker answers (records, counters, rss_bytes)
    PROBE_SEND = "probe_send"        # coordinator -> worker: send payloads to a peer worker and time them
    PROBE_RESULT = "probe_result"    # ... and the round-trip times (or meta error)
    PROBE = "probe"                  # worker -> peer worker: one payload ...
    PROBE_ACK = "probe_ack"          # ... acknowledged
    ERROR = "error"                  # worker -> coordinator: meta message names stage, device and host
    SHUTDOWN = "shutdown"            # coordinator -> worker: stop serving ...
    BYE = "bye"                      # ... acknowledged


class Role(StrEnum):
    """What a connection to a worker is for (the meta `role` of its first frame, Kind.ROLE)."""

    CONTROL = "control"
    DATA = "data"
    PROBE = "probe"


def _field(d: dict, key: str, kinds: tuple, where: str, optional: bool = False) -> Any:
    v = d.get(key)
    if v is None and optional:
        return None
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        raise ProtocolError(f"{where}: field {key!r} is {v!r}, not {' or '.join(k.__name__ for k in kinds)}")
    return v


@dataclass(frozen=True)
class PeerAddress:
    """Where the next stage's worker listens."""

    host: str
    port: int

    @classmethod
    def from_dict(cls, d: Any, where: str = "peer") -> "PeerAddress":
        if not isinstance(d, dict):
            raise ProtocolError(f"{where}: expected {{host, port}}, got {d!r}")
        port = _field(d, "port", (int,), where)
        if not 0 < port < 65536:
            raise ProtocolError(f"{where}: port {port} is out of range")
        return cls(_field(d, "host", (str,), where), port)


@dataclass(frozen=True)
class LinkShape:
    """App-level shaping of a link, applied by the sender: `mbps` megabits/s (None = no rate limit), `latency_ms`."""

    mbps: float | None = None
    latency_ms: float = 0.0

    @classmethod
    def from_dict(cls, d: Any, where: str = "link") -> "LinkShape":
        if not isinstance(d, dict):
            raise ProtocolError(f"{where}: expected {{mbps, latency_ms}}, got {d!r}")
        mbps = _field(d, "mbps", (int, float), where, optional=True)
        lat = _field(d, "latency_ms", (int, float), where, optional=True) or 0.0
        if (mbps is not None and not mbps > 0) or not lat >= 0:
            raise ProtocolError(f"{where}: mbps must be > 0 and latency_ms >= 0, got {mbps!r} and {lat!r}")
        return cls(None if mbps is None else float(mbps), float(lat))


@dataclass(frozen=True)
class StageConfig:
    """Everything a worker is told (Kind.CONFIG): which units `[start, end)` of which checkpoint, and where to send."""

    stage: int                              # index of the stage in the plan
    model_path: str                         # checkpoint directory on the worker's host
    start: int                              # first unit (0 = embedding)
    end: int                                # one past the last unit
    device_name: str = ""                   # the testbed device (for records and messages)
    dtype: str = "float32"
    device: str = "cpu"                     # torch device: cpu, cuda, cuda:N
    threads: int | None = None              # torch threads (None: torch's default)
    next: PeerAddress | None = None         # the next stage; None: this is the last stage, tokens go back
    shape_next: LinkShape | None = None     # app-level shaping of the link to the next stage
    shape_return: LinkShape | None = None   # last stage: of the link back to the source
    compile: bool = False                   # the compiled decode path (static KV cache + torch.compile), built at load

    @property
    def last(self) -> bool:
        return self.next is None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "StageConfig":
        """The config of a CONFIG frame's meta; ProtocolError naming the field that is missing or wrong."""
        where = "stage config"
        if not isinstance(d, dict):
            raise ProtocolError(f"{where}: expected an object, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ProtocolError(f"{where}: unknown fields {sorted(unknown)} (coordinator and worker versions differ?)")
        stage, start, end = (_field(d, k, (int,), where) for k in ("stage", "start", "end"))
        if stage < 0 or not 0 <= start < end:
            raise ProtocolError(f"{where}: stage {stage}, units [{start}, {end}) are not a stage's range")
        threads = _field(d, "threads", (int,), where, optional=True)
        if threads is not None and threads < 1:
            raise ProtocolError(f"{where}: threads {threads} must be >= 1")
        shapes = {k: None if d.get(k) is None else LinkShape.from_dict(d[k], f"{where} {k}")
                  for k in ("shape_next", "shape_return")}
        return cls(stage=stage, model_path=_field(d, "model_path", (str,), where), start=start, end=end,
                   device_name=_field(d, "device_name", (str,), where, optional=True) or "",
                   dtype=_field(d, "dtype", (str,), where, optional=True) or "float32",
                   device=_field(d, "device", (str,), where, optional=True) or "cpu", threads=threads,
                   compile=bool(_field(d, "compile", (bool,), where, optional=True)),
                   next=None if d.get("next") is None else PeerAddress.from_dict(d["next"], f"{where} next"),
                   **shapes)


# ---- the deployment token, handed to a worker in a file -------------------------------------------------------
def new_token() -> bytes:
    """A fresh random deployment token (32 bytes); never print or log it."""
    return secrets.token_bytes(32)


def write_token_file(token: bytes, directory: str | None = None) -> str:
    """Write the token (hex) to a new file readable only by its owner (mode 0600); return its path."""
    fd, path = tempfile.mkstemp(prefix="edgeshard-token-", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, token.hex().encode())
    finally:
        os.close(fd)
    return path


def read_token_file(path: str) -> bytes:
    """Read a token written by `write_token_file` (hex text); KitError if missing or malformed."""
    try:
        token = bytes.fromhex(Path(path).read_text().strip())
    except FileNotFoundError:
        raise KitError(f"{path}: no such token file") from None
    except ValueError:
        raise KitError(f"{path}: the token file does not hold a hex token") from None
    if len(token) < 16:
        raise KitError(f"{path}: the token is shorter than 16 bytes")
    return token


# ---- the one line a worker prints on stdout, once it listens ----------------------------------------------------
LISTENING = "listening"


def listening_line(host: str, port: int) -> str:
    """`{"event": "listening", "host": ..., "port": ...}`: how a launcher learns the worker's port."""
    return json.dumps({"event": LISTENING, "host": host, "port": port})


def parse_listening(line: str) -> dict | None:
    """The worker's listening line as a dict, or None for any other line."""
    try:
        msg = json.loads(line)
    except ValueError:
        return None
    if isinstance(msg, dict) and msg.get("event") == LISTENING and isinstance(msg.get("port"), int):
        return msg
    return None
